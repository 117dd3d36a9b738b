//! Choosing the data plane: `--mode auto` probes the kernel and names its choice, and
//! a node switched between modes keeps nothing of the previous one.

use ferry_tests::manifests::{Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

fn web(c: &mut Cluster) {
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "web.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.10")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("web-1", "web", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
}

/// The harness's agent arguments with `--mode` set to `mode`.
fn args_with_mode(c: &Cluster, mode: &str) -> Vec<String> {
    let mut args = c.agent_args();
    if let Some(i) = args.iter().position(|a| a == "--mode") {
        args[i + 1] = mode.to_owned();
    }
    args
}

/// This kernel (6.x, cgroup v2, bpffs) has everything eBPF mode needs, so `auto`
/// picks it, says so in one line, and balances at the socket: no NAT rule anywhere.
#[test]
fn auto_mode_picks_ebpf_where_the_kernel_has_it() {
    let mut c = Cluster::new(Mode::Ebpf, &["a", "client"]);
    web(&mut c);
    let args = args_with_mode(&c, "auto");
    c.spawn_agent_raw(&args);
    c.wait_healthy();
    let log = c.agent_log();
    let chosen: Vec<&str> = log.lines().filter(|l| l.contains("--mode auto")).collect();
    assert_eq!(chosen.len(), 1, "{log}");
    assert!(chosen[0].contains("mode=\"ebpf\""), "{log}");
    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 5);
    assert_eq!(r.pods(), ["a"], "{r:?}");
    let rules = c.node_rules();
    assert!(
        !rules.contains("10.96.0.10") && !rules.contains("table ip ferry"),
        "{rules}"
    );
}

/// Rolling a node from nftables mode to iptables mode and back: each start removes
/// what the other mode programmed (which would otherwise keep translating traffic).
#[test]
fn switching_modes_removes_the_previous_modes_rules() {
    let mut c = Cluster::new(Mode::Nftables, &["a", "client"]);
    web(&mut c);
    c.start_agent();
    assert!(c.node_rules().contains("table ip ferry"));
    c.kill_agent();

    let args = args_with_mode(&c, "iptables");
    c.spawn_agent_raw(&args);
    c.wait_healthy();
    let rules = c.node_rules();
    assert!(!rules.contains("table ip ferry"), "{rules}");
    assert!(rules.contains("KUBE-SVC-"), "{rules}");
    assert_eq!(c.tcp(From::Pod("client"), "10.96.0.10:80", 5).pods(), ["a"]);
    c.kill_agent();

    let args = args_with_mode(&c, "nftables");
    c.spawn_agent_raw(&args);
    c.wait_healthy();
    let rules = c.node_rules();
    assert!(!rules.contains("KUBE-SVC-"), "{rules}");
    assert!(rules.contains("table ip ferry"), "{rules}");
    assert_eq!(c.tcp(From::Pod("client"), "10.96.0.10:80", 5).pods(), ["a"]);
}
