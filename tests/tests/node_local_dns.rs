//! The kube-dns ClusterIP answered by the node's own DNS server, in every mode: pods
//! keep their resolv.conf (the ClusterIP), get Ferry's answers while it serves, the
//! Service's endpoints (a stand-in "CoreDNS" pod) while the agent is down, and lose
//! no query when the agent is replaced by a new one.

use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_tests::cluster::poll;
use ferry_tests::dig;
use ferry_tests::manifests::{Service, docs, ep, port, slice_in};
use ferry_tests::{Cluster, Mode};

const KUBE_DNS: &str = "10.96.0.10";
/// The node-local listen address (NodeLocal DNSCache's usual one).
const LISTEN: &str = "169.254.20.10:53";
const WEB: &str = "web.shop.svc.cluster.local";
/// What Ferry answers for `WEB` (its ClusterIP).
const WEB_IP: &str = "10.96.1.1";
/// What the stand-in CoreDNS answers for `WEB`, so a test can tell who answered.
const STAND_IN_IP: &str = "192.0.2.53";

/// A node with a kube-dns Service whose one endpoint is a stand-in CoreDNS pod.
struct DnsNode {
    c: Cluster,
    coredns: Child,
}

impl Drop for DnsNode {
    fn drop(&mut self) {
        let _ = self.coredns.kill();
        let _ = self.coredns.wait();
    }
}

impl DnsNode {
    fn start(mode: Mode) -> Self {
        let c = Cluster::new(mode, &["coredns", "client"]);
        let coredns_ip = c.pod("coredns").ip.clone();
        let ports = [port("dns", "UDP", 53), port("dns-tcp", "TCP", 53)];
        c.write_manifest(
            "dns.yaml",
            &docs(&[
                Service::new("kube-dns")
                    .namespace("kube-system")
                    .cluster_ip(KUBE_DNS)
                    .port(ports[0].clone())
                    .port(ports[1].clone())
                    .yaml(),
                slice_in(
                    "kube-system",
                    "kube-dns-1",
                    "kube-dns",
                    "IPv4",
                    &ports,
                    &[ep(&coredns_ip)],
                ),
                Service::new("web")
                    .namespace("shop")
                    .cluster_ip(WEB_IP)
                    .port(port("http", "TCP", 80))
                    .yaml(),
            ]),
        );
        let coredns = dig::start_upstream(
            c.pod_command("coredns", c.bin("ferry-probe"))
                .args(["dns-upstream", "--listen", &format!("{coredns_ip}:53")])
                .args(["--answer", &format!("{WEB}={STAND_IN_IP}"), "--ttl", "1"]),
        );
        let mut node = Self { c, coredns };
        node.start_agent();
        node
    }

    fn flags(&self) -> Vec<String> {
        let upstream = format!("{}:53", self.c.pod("coredns").ip);
        ["--dns-listen", LISTEN, "--dns-upstream", &upstream]
            .map(String::from)
            .to_vec()
    }

    fn start_agent(&mut self) {
        let flags = self.flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        self.c.start_agent_with(&flags);
    }

    /// `WEB`'s A records as the client pod's `dig` gets them from the kube-dns
    /// ClusterIP (`+tcp` in `extra` for TCP).
    fn ask(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec!["+tries=1", "+time=1"];
        args.extend_from_slice(extra);
        dig::run(
            self.c.pod_command("client", "dig"),
            KUBE_DNS,
            WEB,
            "A",
            &args,
        )
        .data("A")
    }

    /// `getent ahostsv4 NAME` in the client pod with a pod's resolv.conf (the
    /// kube-dns ClusterIP and the search path of namespace `shop`): glibc's
    /// resolver, which sends over connected UDP sockets.
    fn getent(&self, name: &str) -> Vec<String> {
        let resolv = std::env::temp_dir().join(format!("ferry-resolv-{}.conf", self.c.id()));
        std::fs::write(
            &resolv,
            format!("nameserver {KUBE_DNS}\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5 attempts:1 timeout:2\n"),
        )
        .expect("write resolv.conf");
        let script = format!(
            "mount --bind {} /etc/resolv.conf && getent ahostsv4 {name}",
            resolv.display()
        );
        let out = self
            .c
            .pod_command("client", "unshare")
            .args(["-m", "sh", "-c", &script])
            .output()
            .expect("run getent");
        let _ = std::fs::remove_file(&resolv);
        let mut ips: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect();
        ips.dedup();
        ips
    }

    /// Waits until the answer is `ip`; whether it came.
    fn answers(&self, ip: &str) -> bool {
        poll(Duration::from_secs(20), || self.ask(&[]) == [ip])
    }
}

fn kube_dns_cluster_ip_is_answered_on_the_node(mode: Mode) {
    let n = DnsNode::start(mode);
    assert!(
        n.answers(WEB_IP),
        "over UDP: {:?}\n{}",
        n.ask(&[]),
        n.c.agent_log()
    );
    assert_eq!(n.ask(&["+tcp"]), [WEB_IP], "over TCP");
    assert_eq!(
        n.getent("web"),
        [WEB_IP],
        "glibc with the pod's search path"
    );
}

fn a_removed_listen_address_is_put_back(mode: Mode) {
    let n = DnsNode::start(mode);
    assert!(n.answers(WEB_IP), "Ferry answers first: {:?}", n.ask(&[]));
    // The agent's `ferry-dns` dummy interface holds it, or `lo` on kernels without
    // the dummy driver.
    let holder = || {
        let out =
            n.c.node_command("ip")
                .args(["-o", "addr", "show", "to", "169.254.20.10/32"])
                .output()
                .expect("ip addr show");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace().nth(1).map(str::to_owned)
    };
    let device = holder().expect("the agent put its listen address on an interface");
    let status =
        n.c.node_command("ip")
            .args(["addr", "del", "169.254.20.10/32", "dev", &device])
            .status()
            .expect("ip addr del");
    assert!(status.success(), "the address was on {device}");
    let back = poll(Duration::from_secs(20), || holder().is_some());
    assert!(
        back,
        "the agent re-adds its listen address\n{}",
        n.c.agent_log()
    );
    let answer = dig::run(
        n.c.pod_command("client", "dig"),
        "169.254.20.10",
        WEB,
        "A",
        &[],
    );
    assert_eq!(answer.data("A"), [WEB_IP], "and answers on it again");
}

fn kube_dns_falls_back_to_its_endpoints_while_the_agent_is_down(mode: Mode) {
    let mut n = DnsNode::start(mode);
    assert!(n.answers(WEB_IP), "Ferry answers first: {:?}", n.ask(&[]));
    n.c.kill_agent();
    assert!(
        n.answers(STAND_IN_IP),
        "with the agent SIGKILLed, the Service's endpoint answers: {:?}",
        n.ask(&[])
    );
    n.start_agent();
    assert!(
        n.answers(WEB_IP),
        "back on the node once the agent serves again: {:?}",
        n.ask(&[])
    );
}

fn replacing_the_agent_loses_no_query(mode: Mode) {
    let mut n = DnsNode::start(mode);
    assert!(n.answers(WEB_IP), "Ferry answers first: {:?}", n.ask(&[]));
    let stop = std::env::temp_dir().join(format!("ferry-dns-stop-{}", n.c.id()));
    let _ = std::fs::remove_file(&stop);
    let load =
        n.c.pod_command("client", n.c.bin("ferry-probe"))
            .args([
                "dns-queries",
                "--server",
                &format!("{KUBE_DNS}:53"),
                "--name",
                WEB,
            ])
            .args(["--expect", WEB_IP, "--interval-ms", "2", "--stop-file"])
            .arg(&stop)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the DNS client");
    // The successor starts while the agent serves (a DaemonSet rolled with
    // maxSurge), takes the sockets once its zone is complete, then the old agent
    // gets SIGTERM.
    let mut args = n.c.agent_args();
    args.extend(n.flags());
    let mut successor = Successor(
        n.c.node_command(n.c.bin("ferry"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the successor"),
    );
    assert!(
        poll(Duration::from_secs(60), || n
            .c
            .agent_log()
            .contains("handed the DNS sockets")),
        "the old agent hands its sockets over:\n{}",
        n.c.agent_log()
    );
    let pid = n.c.agent_pid().expect("the old agent runs").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(
        n.c.wait_agent_exit(Duration::from_secs(20)).is_some(),
        "the old agent exits on SIGTERM"
    );
    std::thread::sleep(Duration::from_millis(500));
    let _ = std::fs::write(&stop, b"");
    let out = load.wait_with_output().expect("DNS client result");
    let _ = std::fs::remove_file(&stop);
    let tally: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("the DNS client's tally");
    assert!(
        successor.0.try_wait().ok().flatten().is_none(),
        "the successor still runs"
    );
    assert!(
        tally["asked"].as_u64().unwrap_or(0) > 50,
        "enough load: {tally}"
    );
    assert_eq!(tally["lost"], 0, "no query lost: {tally}");
    assert_eq!(tally["errors"], 0, "no SERVFAIL: {tally}");
    assert_eq!(tally["other"], 0, "every answer is Ferry's: {tally}");
    assert_eq!(
        n.ask(&["+tcp"]),
        [WEB_IP],
        "the successor answers over TCP too"
    );
    successor.stop();
}

/// The replacing agent, killed when the test ends.
struct Successor(Child);

impl Successor {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        self.stop();
    }
}

ferry_tests::scenarios!(
    kube_dns_cluster_ip_is_answered_on_the_node,
    a_removed_listen_address_is_put_back,
    kube_dns_falls_back_to_its_endpoints_while_the_agent_is_down,
    replacing_the_agent_loses_no_query,
);
