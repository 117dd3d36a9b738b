//! Forwarding of names outside the cluster, as CoreDNS's `forward` and NodeLocal
//! DNSCache do it: stub domains from flags and from the kube-dns ConfigMap, a dead
//! upstream skipped, and a forwarding loop detected. Real `dig` in a pod, upstream
//! servers (and a relaying dnsmasq) on the external client's address.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_tests::cluster::{EXT_IP, NODE_IP, poll};
use ferry_tests::dig::{self, DigAnswer};
use ferry_tests::{Cluster, Mode};

/// Servers started for a test, stopped with it.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Node {
    c: Cluster,
    servers: Servers,
    logs: Vec<PathBuf>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for log in &self.logs {
            let _ = std::fs::remove_file(log);
        }
    }
}

impl Node {
    fn new() -> Self {
        Self {
            c: Cluster::new(Mode::Iptables, &["client"]),
            servers: Servers(Vec::new()),
            logs: Vec::new(),
        }
    }

    /// A test upstream on the external client at `port` answering `answers`
    /// (NAME=IPV4); returns its question log.
    fn upstream(&mut self, port: u16, answers: &str) -> PathBuf {
        let log = std::env::temp_dir().join(format!("ferry-fwd-{}-{port}.log", self.c.id()));
        let child = dig::start_upstream(
            self.c
                .ext_command(self.c.bin("ferry-probe"))
                .args(["dns-upstream", "--listen", &format!("{EXT_IP}:{port}")])
                .args(["--answer", answers, "--ttl", "60", "--log"])
                .arg(&log),
        );
        self.servers.0.push(child);
        self.logs.push(log.clone());
        log
    }

    fn start_agent(&mut self, extra: &[&str]) {
        let listen = format!("{NODE_IP}:53");
        let mut args = vec!["--dns-listen", listen.as_str()];
        args.extend_from_slice(extra);
        self.c.start_agent_with(&args);
    }

    fn dig(&self, name: &str) -> DigAnswer {
        dig::run(
            self.c.pod_command("client", "dig"),
            NODE_IP,
            name,
            "A",
            &["+tries=1", "+time=5"],
        )
    }
}

fn asked(log: &PathBuf, name: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(name))
        .count()
}

#[test]
fn stub_domains_go_to_their_own_servers() {
    let mut n = Node::new();
    let main = n.upstream(53, "www.outside.test=192.0.2.80");
    let stub = n.upstream(5300, "db.corp.test=192.0.2.77");
    n.start_agent(&[
        "--dns-upstream",
        &format!("{EXT_IP}:53"),
        "--dns-stub-domain",
        &format!("corp.test={EXT_IP}:5300"),
    ]);
    assert_eq!(n.dig("db.corp.test").data("A"), ["192.0.2.77"]);
    assert_eq!(n.dig("www.outside.test").data("A"), ["192.0.2.80"]);
    assert_eq!(asked(&stub, "db.corp.test."), 1);
    assert_eq!(
        asked(&main, "db.corp.test."),
        0,
        "the stub zone never reaches the default upstream"
    );
    assert_eq!(asked(&stub, "www.outside.test."), 0);
}

#[test]
fn kube_dns_configmap_is_followed() {
    let mut n = Node::new();
    let main = n.upstream(53, "www.outside.test=192.0.2.80");
    let other = n.upstream(5300, "db.corp.test=192.0.2.77,www.outside.test=192.0.2.81");
    let dir = std::env::temp_dir().join(format!("ferry-kube-dns-{}", n.c.id()));
    std::fs::create_dir_all(&dir).expect("ConfigMap dir");
    let _cleanup = DirGuard(dir.clone());
    std::fs::write(
        dir.join("stubDomains"),
        format!(r#"{{"corp.test": ["{EXT_IP}:5300"]}}"#),
    )
    .expect("stubDomains");
    n.start_agent(&[
        "--dns-upstream",
        &format!("{EXT_IP}:53"),
        "--dns-kube-dns-config",
        &dir.display().to_string(),
    ]);
    assert_eq!(
        n.dig("db.corp.test").data("A"),
        ["192.0.2.77"],
        "stubDomains"
    );
    assert_eq!(n.dig("www.outside.test").data("A"), ["192.0.2.80"]);
    // kubelet updates a mounted ConfigMap in place: upstreamNameservers now replace
    // the default upstreams.
    std::fs::write(
        dir.join("upstreamNameservers"),
        format!(r#"["{EXT_IP}:5300"]"#),
    )
    .expect("upstreamNameservers");
    let followed = poll(Duration::from_secs(30), || {
        n.dig(&format!("r{}.outside.test", rand_suffix())).status == "NXDOMAIN"
            && asked(&other, "r") > 0
    });
    assert!(followed, "new names go to upstreamNameservers");
    let fresh = format!("f{}.outside.test", rand_suffix());
    assert_eq!(n.dig(&fresh).status, "NXDOMAIN");
    assert_eq!(asked(&other, &fresh), 1);
    assert_eq!(asked(&main, &fresh), 0, "the default upstream is replaced");
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_dead_upstream_is_skipped() {
    let mut n = Node::new();
    let alive = n.upstream(
        53,
        "a.outside.test=192.0.2.1,b.outside.test=192.0.2.2,c.outside.test=192.0.2.3",
    );
    // Nothing listens on port 5399: every question to it fails.
    n.start_agent(&["--dns-upstream", &format!("{EXT_IP}:5399,{EXT_IP}:53")]);
    for (name, ip) in [("a", "192.0.2.1"), ("b", "192.0.2.2"), ("c", "192.0.2.3")] {
        let answer = n.dig(&format!("{name}.outside.test"));
        assert_eq!(answer.data("A"), [ip], "{answer:?}");
    }
    assert_eq!(asked(&alive, "a.outside.test."), 1);
}

#[test]
fn a_forwarding_loop_is_detected() {
    let mut n = Node::new();
    // dnsmasq on the external client relays everything back to this node's DNS.
    let relay =
        n.c.ext_command("dnsmasq")
            .args([
                "-k",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
                "--port=5301",
                &format!("--listen-address={EXT_IP}"),
                &format!("--server={NODE_IP}#53"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
    n.servers.0.push(relay);
    n.start_agent(&["--dns-upstream", &format!("{EXT_IP}:5301")]);
    let detected = poll(Duration::from_secs(30), || {
        n.c.agent_log().contains("forwarding loop")
    });
    assert!(detected, "the loop probe came back\n{}", n.c.agent_log());
    let answer = n.dig("www.outside.test");
    assert_eq!(
        answer.status, "SERVFAIL",
        "no upstream left, and no loop: {answer:?}"
    );
}

/// CoreDNS's metric names and labels (so its dashboards work), its readiness
/// endpoint and its query log.
#[test]
fn coredns_metrics_readiness_and_query_log() {
    let mut n = Node::new();
    n.upstream(53, "www.outside.test=192.0.2.80");
    n.start_agent(&[
        "--dns-upstream",
        &format!("{EXT_IP}:53"),
        "--dns-ready-bind-address",
        "127.0.0.1:18181",
        "--dns-log",
    ]);
    let ready = poll(Duration::from_secs(20), || {
        n.c.http_get(18181, "/ready")
            .is_some_and(|(code, body)| code == 200 && body.ends_with("OK"))
    });
    assert!(ready, "/ready answers 200 OK once the zone is served");
    for _ in 0..2 {
        assert_eq!(n.dig("www.outside.test").data("A"), ["192.0.2.80"]);
    }
    assert_eq!(
        n.dig("nothing.default.svc.cluster.local").status,
        "NXDOMAIN"
    );
    let text = n.c.metrics();
    for wanted in [
        "coredns_dns_requests_total{server=\"dns://172.18.0.2:53\",zone=\".\",view=\"\",proto=\"udp\",family=\"1\",type=\"A\"} 3",
        "coredns_dns_responses_total{server=\"dns://172.18.0.2:53\",zone=\".\",view=\"\",rcode=\"NXDOMAIN\",plugin=\"kubernetes\"} 1",
        "coredns_dns_responses_total{server=\"dns://172.18.0.2:53\",zone=\".\",view=\"\",rcode=\"NOERROR\",plugin=\"forward\"} 1",
        "coredns_dns_responses_total{server=\"dns://172.18.0.2:53\",zone=\".\",view=\"\",rcode=\"NOERROR\",plugin=\"cache\"} 1",
        "coredns_dns_request_duration_seconds_count{server=\"dns://172.18.0.2:53\",zone=\".\",view=\"\",type=\"A\"} 3",
        "coredns_cache_hits_total{server=\"dns://\",type=\"success\"} 1",
        "coredns_forward_requests_total{to=\"172.18.0.100:53\"}",
        "coredns_forward_responses_total{to=\"172.18.0.100:53\",rcode=\"NOERROR\"}",
        "coredns_cache_entries{server=\"dns://\",type=\"success\"} 1",
    ] {
        assert!(text.contains(wanted), "missing {wanted}\n{text}");
    }
    let log = n.c.agent_log();
    assert!(
        log.contains("\"A IN www.outside.test. udp\" NOERROR"),
        "one line per query\n{log}"
    );
}

/// `--dns-rate-limit`: a client asking faster than its share gets its burst, then
/// only what the limit refills; the rest goes unanswered.
#[test]
fn a_client_over_its_rate_limit_is_not_answered() {
    let mut n = Node::new();
    n.upstream(53, "www.outside.test=192.0.2.80");
    n.start_agent(&[
        "--dns-upstream",
        &format!("{EXT_IP}:53"),
        "--dns-rate-limit",
        "5",
    ]);
    let stop = std::env::temp_dir().join(format!("ferry-rrl-never-{}", n.c.id()));
    let out =
        n.c.pod_command("client", n.c.bin("ferry-probe"))
            .args(["dns-queries", "--server", &format!("{NODE_IP}:53")])
            .args(["--name", "www.outside.test", "--expect", "192.0.2.80"])
            .args([
                "--interval-ms",
                "0",
                "--timeout-ms",
                "100",
                "--max",
                "30",
                "--stop-file",
            ])
            .arg(&stop)
            .output()
            .expect("run the DNS client");
    let tally: serde_json::Value = serde_json::from_slice(&out.stdout).expect("tally");
    let (answered, lost) = (
        tally["expected"].as_u64().unwrap_or(0),
        tally["lost"].as_u64().unwrap_or(0),
    );
    assert!(answered >= 5, "the burst is answered: {tally}");
    assert!(lost >= 5, "questions beyond the limit are dropped: {tally}");
    assert_eq!(answered + lost, 30, "{tally}");
}

/// `ferry inspect dns` tells where an answer comes from: the cluster zone, the
/// forwarding cache once a pod asked, or upstream while nothing is cached; and
/// inspecting never asks upstream itself.
#[test]
fn inspect_dns_tells_zone_cache_and_upstream() {
    use ferry_tests::manifests::{Service, docs, port};
    let mut n = Node::new();
    let main = n.upstream(53, "www.outside.test=192.0.2.80");
    n.c.write_manifest(
        "web.yaml",
        &docs(&[Service::new("web")
            .cluster_ip("10.96.0.44")
            .port(port("http", "TCP", 80))
            .yaml()]),
    );
    n.start_agent(&["--dns-upstream", &format!("{EXT_IP}:53")]);
    let inspect = |args: &[&str]| {
        let out =
            n.c.node_command(n.c.bin("ferry"))
                .args(["inspect", "dns"])
                .args(args)
                .output()
                .expect("ferry inspect dns");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let zone = inspect(&["web.default.svc.cluster.local"]);
    assert!(zone.contains("from the cluster zone"), "{zone}");
    assert!(zone.contains("status: NOERROR"), "{zone}");
    assert!(zone.contains("IN A 10.96.0.44"), "{zone}");
    let missing = inspect(&["nope.default.svc.cluster.local", "--type", "aaaa"]);
    assert!(missing.contains("status: NXDOMAIN"), "{missing}");

    let before = inspect(&["www.outside.test"]);
    assert!(before.contains("from upstream: nothing cached"), "{before}");
    assert_eq!(
        asked(&main, "www.outside.test."),
        0,
        "inspecting forwards nothing"
    );
    assert_eq!(n.dig("www.outside.test").data("A"), ["192.0.2.80"]);
    let cached = inspect(&["www.outside.test", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&cached).expect("JSON");
    assert_eq!(json["source"], "cache", "{json}");
    assert!(
        json["expires_in_s"].as_u64().is_some_and(|s| s <= 60),
        "{json}"
    );
    let answer = json["answers"][0].as_str().unwrap_or_default();
    assert!(answer.contains("192.0.2.80"), "{json}");
    assert_eq!(asked(&main, "www.outside.test."), 1);
}
