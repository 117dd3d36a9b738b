//! A cluster of several nodes in network namespaces, each running its own Ferry agent,
//! as a simple routed CNI would lay them out: every node has its pods on routed /32
//! veths (as in [`Cluster`](crate::Cluster)) out of its own pod CIDR, the nodes share
//! an underlay, and each node routes the other nodes' pod CIDRs to them over it. The
//! external client `ext` owns the underlay (a bridge with a veth to every node) and is
//! every node's default router. Everything is removed when the value drops.
//!
//! ```text
//!                       ext (172.18.0.100, br0)
//!                  ┌─────────────┴─────────────┐
//!   node-0 (172.18.0.10, zone-a)     node-1 (172.18.0.11, zone-b)   ...
//!     └─v0── pod (10.244.0.10)         └─v0── pod (10.244.1.10)
//!     └─v1── pod (10.244.0.11)         ...
//! ```
//!
//! Every node's agent watches its own manifest directory; [`MultiNode::write_manifest`]
//! writes to all of them, since Services, EndpointSlices and Nodes are cluster-wide.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::cgroup::Cgroup;
use crate::cluster::{
    AgentProcess, Mode, NODE_SYSCTLS, Pod, QUIET_DAD, Report, RunningProbe, agent_flags, bin_dir,
    check_binaries, ebpf_cleanup, http_get_in, pod_link, poll, scratch_dir, start_probe_server,
    unique_id, write_atomic,
};
use crate::manifests::{self, Endpoint};
use crate::netns::Netns;

/// The external client's address on the underlay (the nodes' default router).
pub const EXT_IP: &str = "172.18.0.100";
pub const EXT_IP6: &str = "fd00:18::100";
/// Pod CIDRs of the whole cluster, passed as `--cluster-cidr`.
pub const CLUSTER_CIDRS: &str = "10.244.0.0/16,fd00:244::/48";
/// Zone label values of nodes 0, 1, 2...
pub const ZONES: [&str; 4] = ["zone-a", "zone-b", "zone-c", "zone-d"];

/// Name of node `n`.
pub fn node_name(n: usize) -> String {
    format!("node-{n}")
}

/// Underlay address of node `n`.
pub fn node_ip(n: usize) -> String {
    format!("172.18.0.{}", 10 + n)
}

pub fn node_ip6(n: usize) -> String {
    v6(&format!("fd00:18::{}", 10 + n))
}

/// Pod CIDRs of node `n`.
pub fn pod_cidr(n: usize) -> String {
    format!("10.244.{n}.0/24")
}

pub fn pod_cidr6(n: usize) -> String {
    format!("{}/64", v6(&format!("fd00:244:{n:x}::")))
}

/// An IPv6 address in the canonical text form the probe reports.
fn v6(text: &str) -> String {
    text.parse::<Ipv6Addr>()
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .to_string()
}

/// Where a client runs.
#[derive(Clone, Copy, Debug)]
pub enum From<'a> {
    /// Inside a pod (in its node's cgroup, as pods are on a real node).
    Pod(&'a str),
    /// A process of node `n` itself (in its cgroup).
    Node(usize),
    /// The external client on the underlay (not subject to any node's socket hooks).
    External,
}

/// One node: its namespace, cgroup, manifest directory, agent and pods.
pub struct Node {
    pub name: String,
    pub index: usize,
    /// Underlay addresses (the Node object's InternalIPs).
    pub ip: String,
    pub ip6: String,
    pub zone: String,
    pub pods: Vec<Pod>,
    netns: Netns,
    cgroup: Cgroup,
    manifests: PathBuf,
    pin_dir: PathBuf,
    agent: AgentProcess,
}

impl Node {
    /// The manifest directory this node's agent watches.
    pub fn manifest_dir(&self) -> &Path {
        &self.manifests
    }

    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }

    /// bpffs directory this node's agent pins to (eBPF mode).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The agent's logs so far.
    pub fn agent_log(&self) -> String {
        self.agent.log()
    }

    /// GET on 127.0.0.1:`port` inside the node: status code and whole response.
    pub fn http_get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.netns, ([127, 0, 0, 1], port).into(), path)
    }

    /// Status of the agent's /healthz, or None if it does not answer.
    pub fn healthz(&self) -> Option<u16> {
        self.http_get(10256, "/healthz").map(|(code, _)| code)
    }
}

/// The nodes, the external client, and the agents.
pub struct MultiNode {
    id: String,
    mode: Mode,
    dir: PathBuf,
    bin_dir: PathBuf,
    pub nodes: Vec<Node>,
    ext: Netns,
    /// Extra servers started with [`MultiNode::serve_in_pod`] and
    /// [`MultiNode::serve_external`], stopped on drop.
    servers: Vec<Child>,
}

impl MultiNode {
    /// Builds one node per entry of `pods`, with those pods on it (pod names are
    /// unique across the cluster), and writes the Node objects to every manifest
    /// directory. The agents are not started yet.
    pub fn new(mode: Mode, pods: &[&[&str]]) -> Self {
        assert!(
            (1..=ZONES.len()).contains(&pods.len()),
            "1 to {} nodes",
            ZONES.len()
        );
        let bin_dir = bin_dir();
        check_binaries(&bin_dir);
        let id = unique_id();
        let dir = scratch_dir(&id);

        let ext = Netns::create(&format!("{id}-ext"));
        ext.sysctl(&QUIET_DAD);
        ext.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        ext.ip_batch(&[
            "link add br0 type bridge forward_delay 0 mcast_snooping 0".to_string(),
            "link set br0 up".into(),
            format!("addr add {EXT_IP}/24 dev br0"),
            format!("addr add {EXT_IP6}/64 dev br0 nodad"),
        ]);

        let mut nodes = Vec::new();
        for (n, pod_names) in pods.iter().enumerate() {
            let name = node_name(n);
            let netns = Netns::create(&format!("{id}-n{n}"));
            netns.sysctl(&NODE_SYSCTLS);
            let (ip, ip6) = (node_ip(n), node_ip6(n));
            let uplink = format!("n{n}");
            let mut commands = vec![
                format!(
                    "link add eth0 type veth peer name {uplink} netns {}",
                    ext.name()
                ),
                "link set eth0 up".into(),
                format!("addr add {ip}/24 dev eth0"),
                format!("addr add {ip6}/64 dev eth0 nodad"),
                format!("route add default via {EXT_IP}"),
                format!("route add default via {EXT_IP6}"),
            ];
            // The routed CNI: every other node's pod CIDRs via that node.
            for m in (0..pods.len()).filter(|&m| m != n) {
                commands.push(format!("route add {} via {}", pod_cidr(m), node_ip(m)));
                commands.push(format!("route add {} via {}", pod_cidr6(m), node_ip6(m)));
            }
            let mut sysctls = Vec::new();
            let mut pod_netns = Vec::new();
            for (i, pod) in pod_names.iter().enumerate() {
                let ns = Netns::create(&format!("{id}-{pod}"));
                ns.sysctl(&QUIET_DAD);
                let host = 10 + i;
                let pod_ip = format!("10.244.{n}.{host}");
                let pod_ip6 = v6(&format!("fd00:244:{n:x}::{host}"));
                let (link, link_sysctls) = pod_link(&format!("v{i}"), &ns, &pod_ip, &pod_ip6);
                commands.extend(link);
                sysctls.extend(link_sysctls);
                pod_netns.push((pod.to_string(), pod_ip, pod_ip6, ns));
            }
            netns.ip_batch(&commands);
            if !sysctls.is_empty() {
                netns.sysctl(&sysctls);
            }
            ext.ip_batch(&[
                format!("link set {uplink} master br0"),
                format!("link set {uplink} up"),
            ]);
            let pods = pod_netns
                .into_iter()
                .map(|(pod, pod_ip, pod_ip6, ns)| {
                    Pod::start(&bin_dir, &pod, &name, &pod_ip, &pod_ip6, ns)
                })
                .collect();
            let manifests = dir.join(format!("{name}-manifests"));
            std::fs::create_dir_all(&manifests).expect("create manifest dir");
            nodes.push(Node {
                cgroup: Cgroup::create(&format!("{id}-{name}")),
                pin_dir: PathBuf::from("/sys/fs/bpf").join(format!("ferry-test-{id}-{name}")),
                agent: AgentProcess::new(&dir, &name),
                zone: ZONES[n].to_owned(),
                name,
                index: n,
                ip,
                ip6,
                pods,
                netns,
                manifests,
            });
        }
        let cluster = Self {
            id,
            mode,
            dir,
            bin_dir,
            nodes,
            ext,
            servers: Vec::new(),
        };
        cluster.write_nodes();
        cluster
    }

    /// Writes the Node objects (names, zone labels, pod CIDRs, InternalIPs).
    fn write_nodes(&self) {
        let node_objects: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                manifests::node(
                    &n.name,
                    &n.zone,
                    &[&pod_cidr(n.index), &pod_cidr6(n.index)],
                    &[&n.ip, &n.ip6],
                )
            })
            .collect();
        self.write_manifest("nodes.yaml", &manifests::docs(&node_objects));
    }

    /// Relabels the nodes' zones (one per node, e.g. two nodes sharing `zone-a`),
    /// before the agents start; [`MultiNode::ep`] then records the new zones.
    pub fn set_zones(&mut self, zones: &[&str]) {
        assert_eq!(zones.len(), self.nodes.len(), "one zone per node");
        for (node, zone) in self.nodes.iter_mut().zip(zones) {
            node.zone = zone.to_string();
        }
        self.write_nodes();
    }

    /// Starts another server in `pod` (named after the pod) on extra TCP and UDP
    /// ports, e.g. a Service's target ports beyond the default ones.
    pub fn serve_in_pod(&mut self, pod: &str, tcp: &[u16], udp: &[u16]) {
        let command = self
            .pod(pod)
            .netns
            .command(self.bin_dir.join("ferry-probe"), None);
        let server = start_probe_server(command, pod, tcp, udp);
        self.servers.push(server);
    }

    /// Starts a server called `name` on the external client (a load balancer or an
    /// outside service), answering on every local address of ext.
    pub fn serve_external(&mut self, name: &str, tcp: &[u16], udp: &[u16]) {
        let command = self.ext.command(self.bin_dir.join("ferry-probe"), None);
        let server = start_probe_server(command, name, tcp, udp);
        self.servers.push(server);
    }

    /// Runs `ip` commands inside `pod` (e.g. removing an address).
    pub fn pod_ip_batch(&self, pod: &str, commands: &[impl AsRef<str>]) {
        self.pod(pod).netns.ip_batch(commands);
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Name prefix of this cluster's namespaces (`<id>-n0`, `<id>-<pod>`, `<id>-ext`).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n]
    }

    /// The pod called `name`, on whichever node.
    pub fn pod(&self, name: &str) -> &Pod {
        self.nodes
            .iter()
            .flat_map(|n| &n.pods)
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn node_of(&self, pod: &str) -> &Node {
        let node = &self.pod(pod).node;
        self.nodes
            .iter()
            .find(|n| &n.name == node)
            .expect("pod's node")
    }

    /// A ready IPv4 endpoint for `pod`, on its node and in its zone, as the
    /// EndpointSlice controller would list it.
    pub fn ep(&self, pod: &str) -> Endpoint {
        let node = self.node_of(pod);
        manifests::ep(&self.pod(pod).ip)
            .on_node(&node.name)
            .in_zone(&node.zone)
    }

    /// The IPv6 endpoint for `pod`.
    pub fn ep6(&self, pod: &str) -> Endpoint {
        let node = self.node_of(pod);
        manifests::ep(&self.pod(pod).ip6)
            .on_node(&node.name)
            .in_zone(&node.zone)
    }

    /// Writes a manifest (atomically) into every node's manifest directory.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        for node in &self.nodes {
            write_atomic(&node.manifests, file, yaml);
        }
    }

    pub fn remove_manifest(&self, file: &str) {
        for node in &self.nodes {
            std::fs::remove_file(node.manifests.join(file)).expect("remove manifest");
        }
    }

    /// Starts every node's agent and waits until all report healthy.
    pub fn start_agents(&mut self) {
        self.start_agents_with(&[]);
    }

    /// Starts every node's agent with extra flags and waits until all are healthy.
    pub fn start_agents_with(&mut self, extra: &[&str]) {
        let ferry = self.bin_dir.join("ferry");
        for node in &mut self.nodes {
            let mut args = agent_flags(
                ["--manifests".into(), node.manifests.display().to_string()],
                self.mode,
                &node.name,
                CLUSTER_CIDRS,
                node.cgroup.path(),
                &node.pin_dir,
            );
            args.extend(extra.iter().map(|s| s.to_string()));
            node.agent.spawn(&node.netns, &ferry, &args, &[]);
        }
        for node in &mut self.nodes {
            let netns = &node.netns;
            node.agent.wait_healthy(Duration::from_secs(180), || {
                http_get_in(netns, ([127, 0, 0, 1], 10256).into(), "/healthz").map(|(code, _)| code)
            });
        }
    }

    /// Every agent's logs, node by node.
    pub fn agent_logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("===== {} =====\n{}", n.name, n.agent.log()))
            .collect()
    }

    /// A command inside node `n`'s namespace (e.g. `iptables-save`).
    pub fn node_command(&self, n: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.nodes[n].netns.command(program, None)
    }

    /// A command on the external client.
    pub fn ext_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ext.command(program, None)
    }

    /// Runs `ip` commands on the external client (e.g. routes to a load balancer IP).
    pub fn ext_ip_batch(&self, commands: &[impl AsRef<str>]) {
        self.ext.ip_batch(commands);
    }

    /// GET from the external client: status code and whole response, or None if the
    /// connection failed.
    pub fn http_get_external(&self, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.ext, addr, path)
    }

    /// Path of a binary next to the tests (`ferry`, `ferry-probe`).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    fn client(&self, from: From<'_>) -> Command {
        let probe = self.bin_dir.join("ferry-probe");
        match from {
            From::Pod(name) => {
                let node = self.node_of(name);
                self.pod(name)
                    .netns
                    .command(probe, Some(node.cgroup.path()))
            }
            From::Node(n) => {
                let node = &self.nodes[n];
                node.netns.command(probe, Some(node.cgroup.path()))
            }
            From::External => self.ext.command(probe, None),
        }
    }

    /// Starts a probe client in the background.
    pub fn spawn_probe(&self, from: From<'_>, args: &[String]) -> RunningProbe {
        RunningProbe::spawn(self.client(from), args)
    }

    /// `count` TCP connections from `from` to `addr` (`ip:port` or `[ip6]:port`).
    pub fn tcp(&self, from: From<'_>, addr: &str, count: u32) -> Report {
        self.tcp_with(from, addr, count, 1000)
    }

    /// TCP with an explicit per-attempt timeout (connect and reply).
    pub fn tcp_with(&self, from: From<'_>, addr: &str, count: u32, timeout_ms: u64) -> Report {
        let args = [
            "tcp",
            addr,
            "--count",
            &count.to_string(),
            "--timeout-ms",
            &timeout_ms.to_string(),
        ];
        self.spawn_probe(from, &args.map(String::from)).wait()
    }

    /// `count` UDP request/responses (unconnected sendto/recvfrom).
    pub fn udp(&self, from: From<'_>, addr: &str, count: u32) -> Report {
        let args = ["udp", addr, "--count", &count.to_string()];
        self.spawn_probe(from, &args.map(String::from)).wait()
    }

    /// Runs `probe` until `done` accepts its report or `timeout` passes, and returns
    /// the last report (for the caller to assert on, so a failure shows what was seen).
    pub fn settle(
        &self,
        timeout: Duration,
        mut probe: impl FnMut() -> Report,
        done: impl Fn(&Report) -> bool,
    ) -> Report {
        let mut last = None;
        poll(timeout, || {
            let report = probe();
            let ok = done(&report);
            last = Some(report);
            ok
        });
        last.unwrap_or_else(&mut probe)
    }

    /// Polls `check` until it returns true; panics with every agent log after
    /// `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, check: impl FnMut() -> bool) {
        if !poll(timeout, check) {
            panic!("timed out waiting for {what}\n{}", self.agent_logs());
        }
    }
}

impl Drop for MultiNode {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        for node in &mut self.nodes {
            node.agent.kill();
            if self.mode == Mode::Ebpf {
                ebpf_cleanup(&node.netns, &self.bin_dir, &node.pin_dir);
            }
            let _ = std::fs::remove_file(crate::cluster::dns_handover_socket(&node.pin_dir));
        }
        let failed: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| n.agent.unexpected_sync_failures())
            .collect();
        let logs = self.agent_logs();
        if std::thread::panicking() {
            eprintln!("{logs}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !failed.is_empty() && !std::thread::panicking() {
            panic!("an agent failed a sync:\n{}\n{logs}", failed.join("\n"));
        }
        // Pods stop their servers, then the namespaces and cgroups go as fields drop.
    }
}

/// `ip:port`, or `[ip]:port` for IPv6.
pub fn addr(ip: &str, port: u16) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{ip}]:{port}"),
        _ => format!("{ip}:{port}"),
    }
}
