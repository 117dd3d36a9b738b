//! What `ferry inspect` reads back from the kernel (eBPF maps, nftables tables),
//! `ferry monitor` and the per-service counters, and eBPF-only behaviour: dual-stack
//! sockets reaching IPv4 services through IPv4-mapped addresses.

use std::process::{Child, Stdio};
use std::time::Duration;

use ferry_tests::manifests::{Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

const WAIT: Duration = Duration::from_secs(10);

/// `ferry inspect services` in every mode.
mod inspect_services_reads_the_kernel {
    #[test]
    fn ebpf() {
        super::inspect_services_reads_the_kernel(ferry_tests::Mode::Ebpf);
    }

    #[test]
    fn nftables() {
        super::inspect_services_reads_the_kernel(ferry_tests::Mode::Nftables);
    }

    #[test]
    fn iptables() {
        super::inspect_services_reads_the_kernel(ferry_tests::Mode::Iptables);
    }
}

fn inspect_services_reads_the_kernel(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.10")
                .spec("type: NodePort")
                .spec("externalIPs: [192.0.2.10]")
                .spec("sessionAffinity: ClientIP")
                .port(port("http", "TCP", 80).node_port(30080))
                .yaml(),
            slice(
                "web-1",
                "web",
                "IPv4",
                &p,
                &[ep(&c.pod("a").ip), ep(&c.pod("b").ip)],
            ),
            Service::new("empty")
                .cluster_ip("10.96.0.11")
                .port(port("http", "TCP", 80))
                .yaml(),
        ]),
    );
    c.start_agent();
    let out = c
        .node_command(c.bin("ferry"))
        .args(["inspect", "services", "--json", "--bpf-pin-path"])
        .arg(c.pin_dir())
        .output()
        .expect("ferry inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let frontends = view["frontends"].as_array().expect("frontends");
    let find = |addr: &str| {
        frontends
            .iter()
            .find(|f| f["address"] == addr)
            .unwrap_or_else(|| panic!("{addr} not in {view}"))
    };
    let web = find("10.96.0.10:80");
    assert_eq!(web["kind"], "ClusterIP");
    assert_eq!(web["action"], "forward");
    assert_eq!(web["affinity_timeout_seconds"], 10800);
    let mut backends: Vec<&str> = web["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    backends.sort();
    assert_eq!(backends, ["10.244.0.10:8080", "10.244.0.11:8080"]);
    if mode != Mode::Nftables {
        // From the rule comments, or (eBPF) named by the running agent.
        assert_eq!(web["service"], "default/web:http", "{view}");
        assert_eq!(find("10.96.0.11:80")["service"], "default/empty:http");
    }
    assert_eq!(find("192.0.2.10:80")["kind"], "External");
    // NodePorts (in eBPF mode, from the iptables rules it keeps for them).
    let node_port = find("*:30080");
    assert_eq!(node_port["kind"], "NodePort", "{view}");
    assert_eq!(
        node_port["backends"].as_array().map(Vec::len),
        Some(2),
        "{view}"
    );
    assert_eq!(find("10.96.0.11:80")["action"], "reject");
    assert_eq!(view["backends"], 2);

    // The table form names the same things.
    let out = c
        .node_command(c.bin("ferry"))
        .args(["inspect", "services", "--bpf-pin-path"])
        .arg(c.pin_dir())
        .output()
        .expect("ferry inspect");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("10.96.0.10:80") && table.contains("10.244.0.11:8080"),
        "{table}"
    );
}

#[test]
fn dual_stack_socket_reaches_ipv4_service() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.10")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("web-1", "web", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
    c.start_agent();
    let r = c.tcp(From::Pod("client"), "[::ffff:10.96.0.10]:80", 3);
    assert_eq!(r.successes(), 3, "{r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        ["[::ffff:10.96.0.10]:80"],
        "{r:?}"
    );
}

/// Services `s0`, `s1`... on `PREFIX.0`, `PREFIX.1`...:80, each backed by one pod
/// of `pods` (in order) on 8080.
fn services_s0_up(c: &Cluster, prefix: &str, pods: &[&str]) -> String {
    let p = [port("http", "TCP", 8080)];
    let mut parts = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let name = format!("s{i}");
        parts.push(
            Service::new(&name)
                .cluster_ip(&format!("{prefix}.{i}"))
                .port(port("http", "TCP", 80))
                .yaml(),
        );
        parts.push(slice(
            &format!("{name}-1"),
            &name,
            "IPv4",
            &p,
            &[ep(&c.pod(pod).ip)],
        ));
    }
    docs(&parts)
}

#[test]
fn full_maps_are_counted_not_fatal() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    let pods = ["a"; 4];
    c.write_manifest("svc.yaml", &services_s0_up(&c, "10.96.1", &pods));
    // Room for two frontends only.
    c.start_agent_with(&["--bpf-max-frontends", "2"]);
    let served = (0..4)
        .filter(|i| {
            c.tcp(From::Pod("client"), &format!("10.96.1.{i}:80"), 1)
                .successes()
                == 1
        })
        .count();
    assert_eq!(served, 2, "the frontends that fit work");
    let full = c.metric("ferry_ebpf_map_full_errors_total").unwrap_or(0.0);
    assert!(
        full >= 2.0,
        "every refused frontend is counted: {}",
        c.metrics()
    );
    assert!(c.agent_alive());
    assert!(c.agent_log().contains("eBPF map full"), "and logged");
}

/// A frontend whose backends find no room refuses connections (never lets them
/// through untranslated), and a restart with larger `--bpf-max-*` sizes applies them
/// to the maps the first agent pinned.
#[test]
fn a_frontend_without_room_refuses_and_bigger_sizes_apply_on_restart() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "b", "client"]);
    c.write_manifest("svc.yaml", &services_s0_up(&c, "10.96.2", &["a", "b"]));
    // Room for one backend only: s0's pod a, or s1's pod b, not both.
    c.start_agent_with(&["--bpf-max-backends", "1"]);
    let reports: Vec<_> = (0..2)
        .map(|i| c.tcp_with(From::Pod("client"), &format!("10.96.2.{i}:80"), 1, 2000, 0))
        .collect();
    let served = reports.iter().filter(|r| r.successes() == 1).count();
    let refused = reports.iter().filter(|r| r.error("refused") == 1).count();
    assert_eq!(
        (served, refused),
        (1, 1),
        "one fits, the other refuses: {reports:?}"
    );

    c.kill_agent();
    c.start_agent();
    for i in 0..2 {
        let r = c.tcp(From::Pod("client"), &format!("10.96.2.{i}:80"), 2);
        assert_eq!(r.successes(), 2, "10.96.2.{i} after the resize: {r:?}");
    }
    assert!(
        c.agent_log().contains("eBPF map resized"),
        "the resize is logged"
    );
}

/// A child process killed (and reaped) when the test ends, passing or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The web service (one backend), one without endpoints, and one whose only
/// endpoint is on another node while its internal traffic policy is Local.
fn monitored_cluster() -> Cluster {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.10")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("web-1", "web", "IPv4", &p, &[ep(&c.pod("a").ip)]),
            Service::new("empty")
                .cluster_ip("10.96.0.11")
                .port(port("http", "TCP", 80))
                .yaml(),
            Service::new("local")
                .cluster_ip("10.96.0.12")
                .spec("internalTrafficPolicy: Local")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "local-1",
                "local",
                "IPv4",
                &p,
                &[ep("10.244.9.9").on_node("node-b")],
            ),
        ]),
    );
    c.start_agent();
    c
}

/// `ferry monitor` with `args`, its stdout piped, its stderr in `stderr`.
fn monitor(c: &Cluster, args: &[&str], stderr: &std::path::Path) -> Running {
    let child = c
        .node_command(c.bin("ferry"))
        .arg("monitor")
        .args(args)
        .arg("--bpf-pin-path")
        .arg(c.pin_dir())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).expect("stderr file"))
        .spawn()
        .expect("ferry monitor");
    Running(child)
}

/// `ferry monitor` shows each decision with its service and backend, a refusal as
/// one; `/metrics` counts both per service frontend.
#[test]
fn monitor_shows_forwarded_and_refused_connections() {
    let c = monitored_cluster();
    let stderr = c.pin_dir().with_extension("monitor-err");
    let stderr = std::env::temp_dir().join(stderr.file_name().expect("a name"));
    let mut m = monitor(&c, &["--json", "--count", "6"], &stderr);
    // Connect to all three until the monitor has printed six events (it may start
    // listening after the first few connections).
    c.wait_for("ferry monitor to report six events", WAIT, || {
        assert_eq!(
            c.tcp(From::Pod("client"), "10.96.0.12:80", 1).successes(),
            0
        );
        assert_eq!(
            c.tcp(From::Pod("client"), "10.96.0.10:80", 1).successes(),
            1
        );
        assert_eq!(
            c.tcp(From::Pod("client"), "10.96.0.11:80", 1).successes(),
            0
        );
        m.0.try_wait().expect("try_wait").is_some()
    });
    let out = stdout_of(&mut m.0);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events.len(), 6, "{out}");
    let forwarded = events
        .iter()
        .find(|e| e["verdict"] == "forwarded")
        .unwrap_or_else(|| panic!("no forwarded event in {out}"));
    assert_eq!(forwarded["service_address"], "10.96.0.10:80");
    assert_eq!(forwarded["service"], "default/web:http");
    assert_eq!(forwarded["backend"], format!("{}:8080", c.pod("a").ip));
    assert_eq!(forwarded["protocol"], "TCP");
    let rejected = events
        .iter()
        .find(|e| e["verdict"] == "rejected")
        .unwrap_or_else(|| panic!("no rejected event in {out}"));
    assert_eq!(rejected["service"], "default/empty:http");
    assert!(rejected["backend"].is_null(), "{rejected}");
    let dropped = events
        .iter()
        .find(|e| e["verdict"] == "dropped")
        .unwrap_or_else(|| panic!("no dropped event in {out}"));
    assert_eq!(dropped["service"], "default/local:http");

    let metric = |service: &str, frontend: &str, result: &str| {
        c.metric(&format!(
            "ferry_service_connections_total{{service=\"default/{service}\",port=\"http\",frontend=\"{frontend}\",result=\"{result}\"}}"
        ))
    };
    let (web, empty) = ("10.96.0.10:80/TCP", "10.96.0.11:80/TCP");
    let counted = |n: Option<f64>| n.is_some_and(|n| n >= 2.0);
    assert!(counted(metric("web", web, "forwarded")), "{}", c.metrics());
    assert!(
        counted(metric("empty", empty, "rejected")),
        "{}",
        c.metrics()
    );
    assert_eq!(metric("web", web, "rejected"), None, "{}", c.metrics());
    let local = "10.96.0.12:80/TCP";
    assert!(
        counted(metric("local", local, "dropped")),
        "{}",
        c.metrics()
    );
    let _ = std::fs::remove_file(&stderr);
}

/// The kernel writes no more events than the monitor's rate allows: at rate 0 every
/// decision is counted as over the rate and none reaches the ring.
#[test]
fn monitor_rate_limit_is_enforced_in_the_kernel() {
    let c = monitored_cluster();
    let stderr = c.pin_dir().with_extension("monitor-rate-err");
    let stderr = std::env::temp_dir().join(stderr.file_name().expect("a name"));
    let mut m = monitor(&c, &["--rate", "0", "--count", "1"], &stderr);
    c.wait_for("the monitor to count events over the rate", WAIT, || {
        assert_eq!(
            c.tcp(From::Pod("client"), "10.96.0.10:80", 1).successes(),
            1
        );
        std::fs::read_to_string(&stderr).is_ok_and(|e| e.contains("over the rate"))
    });
    assert!(
        m.0.try_wait().expect("try_wait").is_none(),
        "the monitor got an event past a zero rate"
    );
    drop(m);
    let _ = std::fs::remove_file(&stderr);
}

/// A finished child's whole stdout.
fn stdout_of(child: &mut Child) -> String {
    use std::io::Read as _;
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    out
}
