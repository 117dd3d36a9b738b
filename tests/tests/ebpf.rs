//! What `ferry inspect` reads back from the kernel (eBPF maps, nftables tables), and
//! eBPF-only behaviour: dual-stack sockets reaching IPv4 services through
//! IPv4-mapped addresses.

use ferry_tests::manifests::{Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

/// `ferry inspect services` in the modes that keep services in lookup tables.
mod inspect_services_reads_the_kernel {
    #[test]
    fn ebpf() {
        super::inspect_services_reads_the_kernel(ferry_tests::Mode::Ebpf);
    }

    #[test]
    fn nftables() {
        super::inspect_services_reads_the_kernel(ferry_tests::Mode::Nftables);
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
                .spec("externalIPs: [192.0.2.10]")
                .spec("sessionAffinity: ClientIP")
                .port(port("http", "TCP", 80))
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
    assert_eq!(find("192.0.2.10:80")["kind"], "External");
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
