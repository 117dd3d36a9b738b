//! A one-node "cluster" in network namespaces: the node, pods attached to it by routed
//! veths (Calico-style, so every pod-to-pod packet crosses the node's stack), an
//! external client beside the node, backend servers in the pods, and the Ferry agent
//! running in the node namespace. Everything is removed when the value drops.
//!
//! ```text
//!   ext (172.18.0.100) ──eth0── node (172.18.0.2) ──v0── pod0 (10.244.0.10)
//!                                                  └─v1── pod1 (10.244.0.11) ...
//! ```

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::cgroup::Cgroup;
use crate::netns::{self, Netns};

/// The node name the agent runs as; endpoints on it are local.
pub const NODE_NAME: &str = "node-a";
/// Node address on the link to the external client.
pub const NODE_IP: &str = "172.18.0.2";
pub const NODE_IP6: &str = "fd00:18::2";
pub const EXT_IP: &str = "172.18.0.100";
/// Pod CIDRs passed as `--cluster-cidr`.
pub const CLUSTER_CIDRS: &str = "10.244.0.0/16,fd00:244::/64";
/// Ports every pod serves its identity on.
pub const TCP_PORTS: [u16; 2] = [8080, 8081];
pub const UDP_PORTS: [u16; 1] = [5353];

const PREFIX: &str = "ft";

/// Which data plane the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
    Ebpf,
}

impl Mode {
    pub fn flag(self) -> &'static str {
        match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Ebpf => "ebpf",
        }
    }

    /// Whether services are translated by kernel NAT (iptables, nftables): the
    /// backend sees what conntrack rewrote, and a ClusterIP connection's peer is
    /// the backend until the reply is un-NATed.
    pub fn nats(self) -> bool {
        self != Self::Ebpf
    }
}

/// Where a client runs.
#[derive(Clone, Copy, Debug)]
pub enum From<'a> {
    /// Inside a pod (in the node's cgroup, as pods are on a real node).
    Pod(&'a str),
    /// A process of the node itself.
    Node,
    /// A machine outside the node (not subject to the node's socket hooks).
    External,
}

/// A pod: its own network namespace on a routed veth of its node, running the
/// `ferry-probe` server. The server is stopped when the pod drops.
pub struct Pod {
    pub name: String,
    pub ip: String,
    pub ip6: String,
    /// The node it runs on (endpoints of it are local there).
    pub node: String,
    pub(crate) netns: Netns,
    server: Child,
}

impl Pod {
    /// Configures the pod side of its veth (`eth0`, attached with [`pod_link`]) and
    /// starts its server.
    pub(crate) fn start(
        bin_dir: &Path,
        name: &str,
        node: &str,
        ip: &str,
        ip6: &str,
        netns: Netns,
    ) -> Self {
        netns.ip_batch(&[
            "link set eth0 up".to_string(),
            format!("addr add {ip}/32 dev eth0"),
            format!("addr add {ip6}/128 dev eth0 nodad"),
            "route add 169.254.1.1 dev eth0 scope link".into(),
            "route add default via 169.254.1.1 dev eth0".into(),
            "route add default via fe80::1 dev eth0".into(),
        ]);
        let server = start_server(bin_dir, &netns, name);
        Self {
            name: name.to_owned(),
            ip: ip.to_owned(),
            ip6: ip6.to_owned(),
            node: node.to_owned(),
            netns,
            server,
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// Sysctls that make IPv6 addresses usable at once (no duplicate address detection).
pub(crate) const QUIET_DAD: [&str; 2] = [
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
];

/// Sysctls of a node namespace: a router without reverse-path filtering.
pub(crate) const NODE_SYSCTLS: [&str; 6] = [
    "net.ipv4.ip_forward=1",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
    QUIET_DAD[0],
    QUIET_DAD[1],
];

/// The node side of a pod's routed veth (Calico-style): `ip` commands that create
/// `veth` with its peer `eth0` in `pod`, route the pod's /32 and /128 to it, and the
/// sysctls that make the node answer the pod's ARP for its gateway at once.
pub(crate) fn pod_link(veth: &str, pod: &Netns, ip: &str, ip6: &str) -> (Vec<String>, Vec<String>) {
    let commands = vec![
        format!(
            "link add {veth} type veth peer name eth0 netns {}",
            pod.name()
        ),
        format!("link set {veth} up"),
        format!("addr add fe80::1/64 dev {veth} nodad"),
        format!("route add {ip}/32 dev {veth}"),
        format!("route add {ip6}/128 dev {veth}"),
    ];
    let sysctls = vec![
        format!("net.ipv4.conf.{veth}.proxy_arp=1"),
        // Answer proxy ARP at once (the default delays it up to 0.8 s), as Calico does.
        format!("net.ipv4.neigh.{veth}.proxy_delay=0"),
    ];
    (commands, sysctls)
}

/// A fresh namespace-name prefix, unique per test process and call; namespaces left
/// by dead test processes are removed on first use.
pub(crate) fn unique_id() -> String {
    static STALE: std::sync::Once = std::sync::Once::new();
    STALE.call_once(|| netns::remove_stale(PREFIX));
    format!(
        "{PREFIX}{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::SeqCst)
    )
}

/// Panics unless `ferry` and `ferry-probe` are in `bin_dir`.
pub(crate) fn check_binaries(bin_dir: &Path) {
    for bin in ["ferry", "ferry-probe"] {
        assert!(
            bin_dir.join(bin).exists(),
            "{} is missing: build first (`cargo xtask test` does) or set FERRY_BIN_DIR",
            bin_dir.join(bin).display()
        );
    }
}

/// A per-test scratch directory (manifests, logs), emptied first.
pub(crate) fn scratch_dir(id: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferry-test-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

/// Writes `dir/file` atomically, like an editor's save.
pub(crate) fn write_atomic(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("rename manifest");
}

/// The flags every test agent runs with: its source, mode, node name, cluster
/// CIDRs, health and metrics ports, and in eBPF mode its cgroup and pins.
/// Conntrack's limit is left alone (`--conntrack-max-per-core 0`): the table size is
/// global to the kernel, so a test node must not change it.
pub(crate) fn agent_flags(
    source: [String; 2],
    mode: Mode,
    node_name: &str,
    cluster_cidrs: &str,
    cgroup: &Path,
    pin_dir: &Path,
) -> Vec<String> {
    let [source_flag, source_value] = source;
    let mut args: Vec<String> = vec![
        "-v".into(),
        "run".into(),
        source_flag,
        source_value,
        "--mode".into(),
        mode.flag().into(),
        "--node-name".into(),
        node_name.into(),
        "--cluster-cidr".into(),
        cluster_cidrs.into(),
        "--healthz-bind-address".into(),
        "127.0.0.1:10256".into(),
        "--metrics-bind-address".into(),
        "127.0.0.1:10249".into(),
        "--conntrack-max-per-core".into(),
        "0".into(),
    ];
    args.extend(ebpf_flags(mode, cgroup, pin_dir));
    args.extend([
        "--dns-handover-socket".into(),
        dns_handover_socket(pin_dir).display().to_string(),
    ]);
    args
}

/// The DNS handover socket of the test node pinning to `pin_dir` (its own, so
/// parallel tests never take each other's DNS sockets).
pub fn dns_handover_socket(pin_dir: &Path) -> PathBuf {
    let node = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::env::temp_dir().join(format!("{node}-dns-handover.sock"))
}

/// `--cgroup` and `--bpf-pin-path`, in eBPF mode.
pub(crate) fn ebpf_flags(mode: Mode, cgroup: &Path, pin_dir: &Path) -> Vec<String> {
    if mode != Mode::Ebpf {
        return Vec::new();
    }
    vec![
        "--cgroup".into(),
        cgroup.display().to_string(),
        "--bpf-pin-path".into(),
        pin_dir.display().to_string(),
    ]
}

/// Removes what an eBPF agent left pinned (it keeps its programs pinned on exit).
pub(crate) fn ebpf_cleanup(node: &Netns, bin_dir: &Path, pin_dir: &Path) {
    let _ = node
        .command(bin_dir.join("ferry"), None)
        .args(["cleanup", "--bpf-pin-path"])
        .arg(pin_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// An agent of one node, across restarts: the running process, if any, and the logs
/// of every run (`<log_dir>/<prefix>-<run>.log`).
pub(crate) struct AgentProcess {
    log_dir: PathBuf,
    prefix: String,
    runs: u32,
    child: Option<Child>,
    /// The test makes the kernel refuse a sync on purpose.
    pub(crate) sync_failures_expected: bool,
}

impl AgentProcess {
    pub(crate) fn new(log_dir: &Path, prefix: &str) -> Self {
        Self {
            log_dir: log_dir.to_path_buf(),
            prefix: prefix.to_owned(),
            runs: 0,
            child: None,
            sync_failures_expected: false,
        }
    }

    /// The "sync failed" lines of every run, unless the test expects some: a sync
    /// the agent repairs with a full resync a second later would otherwise pass
    /// every traffic assertion that polls.
    pub(crate) fn unexpected_sync_failures(&self) -> Vec<String> {
        if self.sync_failures_expected {
            return Vec::new();
        }
        let log = self.log();
        let failed = log.lines().filter(|l| l.contains("sync failed"));
        failed.map(str::to_owned).collect()
    }

    /// Starts `ferry` with `args` and `env` inside `node`, its output to a new log.
    pub(crate) fn spawn(
        &mut self,
        node: &Netns,
        ferry: &Path,
        args: &[String],
        env: &[(String, String)],
    ) {
        assert!(self.child.is_none(), "agent already running");
        let log_path = self
            .log_dir
            .join(format!("{}-{}.log", self.prefix, self.runs));
        self.runs += 1;
        let log = std::fs::File::create(&log_path).expect("create agent log");
        let child = node
            .command(ferry, None)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn ferry");
        self.child = Some(child);
    }

    /// The exit status if the agent has exited (it is then no longer running).
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    pub(crate) fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the agent with SIGKILL (no chance to clean up), and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Polls `healthz` until it answers 200; panics (with the log) if the agent exits
    /// or `timeout` passes first.
    pub(crate) fn wait_healthy(&mut self, timeout: Duration, healthz: impl Fn() -> Option<u16>) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                panic!("agent exited early ({status}):\n{}", self.log());
            }
            if healthz() == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("agent did not become healthy:\n{}", self.log());
    }

    /// All logs so far.
    pub(crate) fn log(&self) -> String {
        let mut out = String::new();
        for run in 0..self.runs {
            let path = self.log_dir.join(format!("{}-{run}.log", self.prefix));
            out.push_str(&format!("--- {} run {run} ---\n", self.prefix));
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        out
    }
}

/// Polls `check` every 25 ms until it returns true or `timeout` passes.
pub fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// What a probe client saw (see `ferry-probe`).
#[derive(Debug, Default, Deserialize)]
pub struct Report {
    /// Replies by identity `"POD PORT"`.
    pub ok: BTreeMap<String, u32>,
    /// Failures by kind: refused, timeout, unreachable, eperm, reset, ...
    pub errors: BTreeMap<String, u32>,
    /// Peer address the client socket reported, by address.
    pub peers: BTreeMap<String, u32>,
    /// Source address the backend saw (the client's own, or the SNAT address), by
    /// address.
    #[serde(default)]
    pub sources: BTreeMap<String, u32>,
    pub max_ms: u64,
    pub held: Option<String>,
}

impl Report {
    /// Total successful replies.
    pub fn successes(&self) -> u32 {
        self.ok.values().sum()
    }

    /// Pods that answered (identity without the port).
    pub fn pods(&self) -> Vec<String> {
        let mut pods: Vec<String> = self
            .ok
            .keys()
            .filter_map(|k| k.split_whitespace().next().map(str::to_owned))
            .collect();
        pods.dedup();
        pods
    }

    /// Source addresses the backends saw, sorted.
    pub fn sources(&self) -> Vec<String> {
        self.sources.keys().cloned().collect()
    }

    /// The only identity that answered; panics otherwise.
    pub fn single(&self) -> &str {
        assert_eq!(self.ok.len(), 1, "expected one identity, got {self:?}");
        self.ok
            .keys()
            .next()
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// Count of one error kind.
    pub fn error(&self, kind: &str) -> u32 {
        self.errors.get(kind).copied().unwrap_or(0)
    }
}

/// A probe client running in the background.
pub struct RunningProbe {
    child: Child,
    args: Vec<String>,
}

impl RunningProbe {
    /// Starts `command` (a `ferry-probe` in some namespace) with `args`.
    pub(crate) fn spawn(mut command: Command, args: &[String]) -> Self {
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferry-probe");
        Self {
            child,
            args: args.to_vec(),
        }
    }

    /// Waits for the client and returns what it saw.
    pub fn wait(self) -> Report {
        let out = self.child.wait_with_output().expect("wait ferry-probe");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "ferry-probe {:?} gave no report ({e}): {stdout} {}",
                self.args,
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }
}

/// The test node and everything around it.
pub struct Cluster {
    id: String,
    mode: Mode,
    dir: PathBuf,
    bin_dir: PathBuf,
    pub pods: Vec<Pod>,
    node: Netns,
    ext: Netns,
    cgroup: Cgroup,
    agent: AgentProcess,
    manifests: PathBuf,
    /// Watch an API server through this kubeconfig instead of the manifest directory.
    kubeconfig: Option<PathBuf>,
    /// Environment variables every agent start gets (flags still win over them).
    agent_env: Vec<(String, String)>,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Directory holding `ferry` and `ferry-probe`: `$FERRY_BIN_DIR`, else the cargo
/// target directory this test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

impl Cluster {
    /// Builds a node with pods of the given names; the agent is not started yet.
    /// Names are unique per test process, so tests can run in parallel.
    pub fn new(mode: Mode, pod_names: &[&str]) -> Self {
        Self::build(mode, unique_id(), pod_names)
    }

    /// Builds a node whose namespaces are called `<id>-node`, `<id>-<pod>`... so other
    /// processes can find them (the demo). Leftovers of an earlier run are removed.
    pub fn named(mode: Mode, id: &str, pod_names: &[&str]) -> Self {
        netns::remove_named(id);
        Self::build(mode, id.to_owned(), pod_names)
    }

    fn build(mode: Mode, id: String, pod_names: &[&str]) -> Self {
        let bin_dir = bin_dir();
        check_binaries(&bin_dir);
        let dir = scratch_dir(&id);
        std::fs::create_dir_all(dir.join("manifests")).expect("create test dir");

        let node = Netns::create(&format!("{id}-node"));
        let ext = Netns::create(&format!("{id}-ext"));
        node.sysctl(&NODE_SYSCTLS);
        ext.sysctl(&QUIET_DAD);

        let mut node_cmds = vec![
            format!(
                "link add eth0 type veth peer name eth0 netns {}",
                ext.name()
            ),
            "link set eth0 up".into(),
            format!("addr add {NODE_IP}/24 dev eth0"),
            format!("addr add {NODE_IP6}/64 dev eth0 nodad"),
            format!("route add default via {EXT_IP}"),
        ];
        let mut pod_netns = Vec::new();
        let mut proxy_arp = Vec::new();
        for (i, name) in pod_names.iter().enumerate() {
            let ns = Netns::create(&format!("{id}-{name}"));
            ns.sysctl(&QUIET_DAD);
            let host = 10 + i;
            let ip = format!("10.244.0.{host}");
            let ip6 = format!("fd00:244::{host}");
            let (commands, sysctls) = pod_link(&format!("v{i}"), &ns, &ip, &ip6);
            node_cmds.extend(commands);
            proxy_arp.extend(sysctls);
            pod_netns.push((name.to_string(), ip, ip6, ns));
        }
        node.ip_batch(&node_cmds);
        ext.ip_batch(&[
            "link set eth0 up".to_string(),
            format!("addr add {EXT_IP}/24 dev eth0"),
            "addr add fd00:18::100/64 dev eth0 nodad".into(),
            format!("route add default via {NODE_IP}"),
            format!("route add default via {NODE_IP6}"),
        ]);

        if !proxy_arp.is_empty() {
            node.sysctl(&proxy_arp);
        }

        let pods = pod_netns
            .into_iter()
            .map(|(name, ip, ip6, ns)| Pod::start(&bin_dir, &name, NODE_NAME, &ip, &ip6, ns))
            .collect();

        let cgroup = Cgroup::create(&id);
        Self {
            id,
            mode,
            bin_dir,
            pods,
            node,
            ext,
            cgroup,
            agent: AgentProcess::new(&dir, "agent"),
            agent_env: Vec::new(),
            manifests: dir.join("manifests"),
            kubeconfig: None,
            dir,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Sets sysctls inside the node's network namespace.
    pub fn node_sysctl(&self, settings: &[&str]) {
        self.node.sysctl(settings);
    }

    /// Sets sysctls inside a pod's network namespace.
    pub fn pod_sysctl(&self, pod: &str, settings: &[&str]) {
        self.pod(pod).netns.sysctl(settings);
    }

    /// The manifest directory the agent watches.
    pub fn manifest_dir(&self) -> PathBuf {
        self.manifests.clone()
    }

    /// Makes the agent watch a Kubernetes API server (kubeconfig text) instead of
    /// the manifest directory.
    pub fn use_kubeconfig(&mut self, kubeconfig: &str) {
        let path = self.dir.join("kubeconfig");
        std::fs::write(&path, kubeconfig).expect("write kubeconfig");
        self.kubeconfig = Some(path);
    }

    /// Runs `f` on a thread inside the node's network namespace; threads it starts
    /// stay there (how the fake API server runs "on the node").
    pub fn in_node<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.node.run_in(f)
    }

    /// Makes the agent watch another directory (the demo serves `examples/`).
    pub fn use_manifest_dir(&mut self, dir: &Path) {
        self.manifests = dir.to_path_buf();
    }

    /// Name prefix of this cluster's namespaces (`<id>-node`, `<id>-<pod>`, `<id>-ext`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Writes (atomically, like an editor's save) a manifest file.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        write_atomic(&self.manifest_dir(), file, yaml);
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifest_dir().join(file)).expect("remove manifest");
    }

    /// The node's cgroup (what the eBPF hooks attach to).
    pub fn cgroup_path(&self) -> &Path {
        self.cgroup.path()
    }

    /// bpffs directory this cluster's agent pins to.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(format!("ferry-test-{}", self.id))
    }

    /// Starts the agent and waits until it reports healthy (first sync done).
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Starts the agent with extra flags and waits until it reports healthy.
    pub fn start_agent_with(&mut self, extra: &[&str]) {
        self.spawn_agent(extra);
        self.wait_healthy();
    }

    /// Environment for every later agent start (e.g. a ConfigMap's `FERRY_*` values).
    pub fn set_agent_env(&mut self, env: Vec<(String, String)>) {
        self.agent_env = env;
    }

    /// Starts the agent without waiting for it.
    pub fn spawn_agent(&mut self, extra: &[&str]) {
        let mut args = self.agent_args();
        // A flag `extra` gives replaces the default of the same name (with its value).
        for flag in extra.iter().filter(|f| f.starts_with("--")) {
            if let Some(at) = args.iter().position(|a| a == flag)
                && at + 1 < args.len()
                && !args[at + 1].starts_with("--")
            {
                args.drain(at..at + 2);
            }
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn_agent_raw(&args);
    }

    /// The flags every test agent runs with: its source, mode, node name, cluster
    /// CIDRs, health and metrics ports, cgroup and pins. Conntrack's limit is left
    /// alone (`--conntrack-max-per-core 0`): the table size is global to the kernel,
    /// so a test node must not change it.
    pub fn agent_args(&self) -> Vec<String> {
        let manifests = self.manifest_dir();
        let source = match &self.kubeconfig {
            Some(path) => ["--kubeconfig".to_string(), path.display().to_string()],
            None => ["--manifests".to_string(), manifests.display().to_string()],
        };
        agent_flags(
            source,
            self.mode,
            NODE_NAME,
            CLUSTER_CIDRS,
            self.cgroup.path(),
            &self.pin_dir(),
        )
    }

    /// `--cgroup` and `--bpf-pin-path` of this test node, in eBPF mode.
    pub fn ebpf_args(&self) -> Vec<String> {
        ebpf_flags(self.mode, self.cgroup.path(), &self.pin_dir())
    }

    /// Starts the agent with exactly these arguments (and the agent environment),
    /// without waiting for it.
    pub fn spawn_agent_raw(&mut self, args: &[String]) {
        self.agent.spawn(
            &self.node,
            &self.bin_dir.join("ferry"),
            args,
            &self.agent_env,
        );
    }

    /// Waits for the agent to exit on its own; its exit status.
    pub fn wait_agent_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        poll(timeout, || {
            status = self.agent.exited();
            status.is_some()
        });
        status
    }

    /// Waits until the agent reports healthy (its first sync is done).
    pub fn wait_healthy(&mut self) {
        let node = &self.node;
        self.agent.wait_healthy(Duration::from_secs(180), || {
            http_get_in(node, ([127, 0, 0, 1], 10256).into(), "/healthz").map(|(code, _)| code)
        });
    }

    /// Kills the agent with SIGKILL (no chance to clean up), and reaps it.
    pub fn kill_agent(&mut self) {
        self.agent.kill();
    }

    /// Kills the agent and starts it again (same flags as the first start).
    pub fn restart_agent(&mut self) {
        self.kill_agent();
        self.start_agent();
    }

    /// Value of a metric line (`name{labels} value`) whose name+labels start with
    /// `prefix`, summed over matching lines; None if absent.
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let text = self.metrics();
        let values: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.pid()
    }

    /// Runs the `ferry-probe load` generator from `from` and returns its JSON report.
    pub fn load(&self, from: From<'_>, args: &[String]) -> serde_json::Value {
        let out = self
            .client(from)
            .arg("load")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry-probe load");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry-probe load {args:?} gave no report ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// Whether the agent process is still running.
    pub fn agent_alive(&mut self) -> bool {
        self.agent.alive()
    }

    /// All agent logs so far.
    pub fn agent_log(&self) -> String {
        self.agent.log()
    }

    /// The test makes the kernel refuse syncs on purpose: dropping the cluster does
    /// not fail on the agent's "sync failed" lines.
    pub fn expect_sync_failures(&mut self) {
        self.agent.sync_failures_expected = true;
    }

    /// Values of `field=N` in the agent log lines containing `marker` (the agent logs
    /// its own timings, e.g. `dns updated ... latency_us=42`).
    pub fn agent_log_values(&self, marker: &str, field: &str) -> Vec<u64> {
        let key = format!("{field}=");
        self.agent_log()
            .lines()
            .filter(|l| l.contains(marker))
            .filter_map(|l| {
                let rest = &l[l.find(&key)? + key.len()..];
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// GET on the agent's health port; the status code, or None if unreachable.
    pub fn healthz(&self) -> Option<u16> {
        self.http_get(10256, "/healthz").map(|(code, _)| code)
    }

    /// The agent's metrics text.
    pub fn metrics(&self) -> String {
        self.http_get(10249, "/metrics")
            .and_then(|(_, response)| Some(response.split_once("\r\n\r\n")?.1.to_owned()))
            .unwrap_or_default()
    }

    /// GET on 127.0.0.1:`port` in the node: the status code and the whole response.
    pub fn http_get(&self, port: u16, path: &str) -> Option<(u16, String)> {
        http_get_in(&self.node, ([127, 0, 0, 1], port).into(), path)
    }

    /// GET from the external client (as a cloud load balancer's health probe does):
    /// the status code and the whole response, or None if the connection failed.
    pub fn http_get_external(
        &self,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> Option<(u16, String)> {
        http_get_in(&self.ext, addr, path)
    }

    /// Runs a command inside the node namespace (e.g. `ferry inspect`, iptables-save).
    pub fn node_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.node.command(program, None)
    }

    /// Every packet-filter rule of the node: `iptables-save` and `nft list ruleset`.
    pub fn node_rules(&self) -> String {
        let mut rules = String::new();
        for (program, args) in [
            ("iptables-save", &[][..]),
            ("nft", &["list", "ruleset"][..]),
        ] {
            let out = self.node_command(program).args(args).output();
            let out = out.unwrap_or_else(|e| panic!("{program}: {e}"));
            rules.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        rules
    }

    /// A command that runs inside a pod (and the node's cgroup, like the pod's own
    /// processes).
    pub fn pod_command(&self, pod: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.pod(pod)
            .netns
            .command(program, Some(self.cgroup.path()))
    }

    /// A command that runs on the external client.
    pub fn ext_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        self.ext.command(program, None)
    }

    /// Runs `f` on a thread inside the external client's network namespace.
    pub fn in_ext<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.ext.run_in(f)
    }

    /// Runs `f` on a thread inside a pod's network namespace.
    pub fn in_pod<T: Send + 'static>(
        &self,
        pod: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        self.pod(pod).netns.run_in(f)
    }

    /// Path of a binary next to the tests (`ferry`, `ferry-probe`).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    fn client(&self, from: From<'_>) -> Command {
        let probe = self.bin_dir.join("ferry-probe");
        let cgroup = Some(self.cgroup.path());
        match from {
            From::Pod(name) => self.pod(name).netns.command(probe, cgroup),
            From::Node => self.node.command(probe, cgroup),
            From::External => self.ext.command(probe, None),
        }
    }

    fn probe(&self, from: From<'_>, args: &[String]) -> Report {
        self.spawn_probe(from, args).wait()
    }

    /// Starts a probe client in the background (e.g. a long-lived flow that must
    /// survive a change the test makes meanwhile).
    pub fn spawn_probe(&self, from: From<'_>, args: &[String]) -> RunningProbe {
        RunningProbe::spawn(self.client(from), args)
    }

    /// `count` TCP connections from `from` to `addr` (`ip:port` or `[ip6]:port`).
    pub fn tcp(&self, from: From<'_>, addr: &str, count: u32) -> Report {
        self.probe(
            from,
            &[
                "tcp".into(),
                addr.into(),
                "--count".into(),
                count.to_string(),
            ],
        )
    }

    /// TCP with explicit timeout and a final held connection checked after `hold_ms`.
    pub fn tcp_with(
        &self,
        from: From<'_>,
        addr: &str,
        count: u32,
        timeout_ms: u64,
        hold_ms: u64,
    ) -> Report {
        self.probe(
            from,
            &[
                "tcp".into(),
                addr.into(),
                "--count".into(),
                count.to_string(),
                "--timeout-ms".into(),
                timeout_ms.to_string(),
                "--hold-ms".into(),
                hold_ms.to_string(),
            ],
        )
    }

    /// `count` UDP request/responses (unconnected sendto/recvfrom).
    pub fn udp(&self, from: From<'_>, addr: &str, count: u32) -> Report {
        self.probe(
            from,
            &[
                "udp".into(),
                addr.into(),
                "--count".into(),
                count.to_string(),
            ],
        )
    }

    /// UDP over a connected socket.
    pub fn udp_connected(&self, from: From<'_>, addr: &str, count: u32) -> Report {
        self.probe(
            from,
            &[
                "udp".into(),
                addr.into(),
                "--count".into(),
                count.to_string(),
                "--connected".into(),
            ],
        )
    }

    /// Polls `check` until it returns true; panics with the agent log after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, check: impl FnMut() -> bool) {
        if !poll(timeout, check) {
            panic!("timed out waiting for {what}\n{}", self.agent_log());
        }
    }
}

/// A pod's server on the harness's standard ports.
pub(crate) fn start_server(bin_dir: &Path, ns: &Netns, name: &str) -> Child {
    let command = ns.command(bin_dir.join("ferry-probe"), None);
    start_probe_server(command, name, &TCP_PORTS, &UDP_PORTS)
}

/// Starts `ferry-probe serve` (`command` is the probe in some namespace) and waits
/// until it listens, so tests never race the listener.
pub(crate) fn start_probe_server(
    mut command: Command,
    name: &str,
    tcp: &[u16],
    udp: &[u16],
) -> Child {
    let ports = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    command.args(["serve", "--name", name]);
    if !tcp.is_empty() {
        command.args(["--tcp", &ports(tcp)]);
    }
    if !udp.is_empty() {
        command.args(["--udp", &ports(udp)]);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server");
    let mut buf = [0u8; 6];
    if let Some(out) = child.stdout.as_mut() {
        let _ = out.read_exact(&mut buf);
    }
    assert_eq!(&buf, b"ready\n", "server {name} did not start");
    child
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_agent();
        if self.mode == Mode::Ebpf {
            ebpf_cleanup(&self.node, &self.bin_dir, &self.pin_dir());
        }
        let _ = std::fs::remove_file(dns_handover_socket(&self.pin_dir()));
        // Pods stop their servers as they drop.
        let failed = self.agent.unexpected_sync_failures();
        let log = self.agent_log();
        if std::thread::panicking() {
            eprintln!("{log}");
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        if !failed.is_empty() && !std::thread::panicking() {
            panic!("the agent failed a sync:\n{}\n{log}", failed.join("\n"));
        }
    }
}

/// One HTTP/1.0 GET from inside `netns`: the status code and the whole response text
/// (head and body), or None if the connection or the response failed.
pub(crate) fn http_get_in(
    netns: &Netns,
    addr: std::net::SocketAddr,
    path: &str,
) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    netns.run_in(move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let code = response.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, response))
    })
}
