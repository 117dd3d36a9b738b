//! kube-proxy's operator contract, against the real agent in a test node: its
//! configuration file, its health and metrics endpoints, and taking a node over from
//! kube-proxy (refusing to fight a running one, waiting for its ports, taking over
//! and cleaning up the rules it left).

use std::io::{Read as _, Write as _};
use std::time::Duration;

use ferry_tests::cluster::{CLUSTER_CIDRS, NODE_IP, NODE_NAME};
use ferry_tests::manifests::{Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

const WAIT: Duration = Duration::from_secs(20);

/// A ClusterIP service `web` (10.96.0.10:80 -> 8080) backed by `backends`.
fn web(c: &Cluster, backends: &[&str]) -> String {
    let eps: Vec<_> = backends.iter().map(|p| ep(&c.pod(p).ip)).collect();
    docs(&[
        Service::new("web")
            .cluster_ip("10.96.0.10")
            .port(port("http", "TCP", 80))
            .yaml(),
        slice("web-v4", "web", "IPv4", &[port("http", "TCP", 8080)], &eps),
    ])
}

fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// A node's sysctl, read inside its network namespace.
fn node_sysctl(c: &Cluster, name: &str) -> String {
    let out = c
        .node_command("cat")
        .arg(format!("/proc/sys/{}", name.replace('.', "/")))
        .output()
        .expect("cat sysctl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// kube-proxy's own ConfigMap (`config.conf`) configures the agent: mode, node name,
/// cluster CIDR, health and metrics addresses, oom_score_adj and conntrack timeouts
/// all come from the file, and the endpoints answer as kube-proxy's do.
fn kube_proxy_configuration_file_configures_the_agent(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    c.write_manifest("web.yaml", &web(&c, &["a", "b"]));
    let file_mode = match mode {
        Mode::Iptables => "iptables",
        Mode::Nftables => "nftables",
        // Empty: Ferry's default (auto), which is eBPF on the test kernels.
        Mode::Ebpf => "",
    };
    let config = format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: \"{file_mode}\"
hostnameOverride: {NODE_NAME}
clusterCIDR: {CLUSTER_CIDRS}
healthzBindAddress: 127.0.0.1:10266
metricsBindAddress: 127.0.0.1:10259
oomScoreAdj: 555
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 3h25m45s
  tcpCloseWaitTimeout: 1234s
  udpTimeout: 33s
iptables:
  syncPeriod: 30s
  minSyncPeriod: 0s
"
    );
    let path = c.manifest_dir().with_extension("kube-proxy.conf");
    std::fs::write(&path, config).expect("write config");
    let mut args: Vec<String> = ["-v", "run", "--manifests"].map(String::from).to_vec();
    args.push(c.manifest_dir().display().to_string());
    args.extend(["--config".into(), path.display().to_string()]);
    args.extend(c.ebpf_args());
    c.spawn_agent_raw(&args);
    c.wait_for("healthz on the file's address", WAIT, || {
        c.http_get(10266, "/healthz")
            .is_some_and(|(code, _)| code == 200)
    });

    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 30);
    assert_eq!(r.pods(), ["a", "b"], "{r:?}");

    let (_, healthz) = c.http_get(10266, "/healthz").expect("healthz");
    let json: serde_json::Value = serde_json::from_str(body(&healthz)).expect("JSON body");
    assert_eq!(json["nodeEligible"], true, "{healthz}");
    assert_eq!(json["healthy"], true, "{healthz}");
    assert!(json["lastUpdated"].is_string() && json["currentTime"].is_string());
    assert!(
        healthz.to_ascii_lowercase().contains("\r\nserver: ferry/"),
        "{healthz}"
    );
    let (code, livez) = c.http_get(10266, "/livez").expect("livez");
    assert_eq!(code, 200, "{livez}");

    let (code, proxy_mode) = c.http_get(10259, "/proxyMode").expect("proxyMode");
    assert_eq!(
        (code, body(&proxy_mode)),
        (200, mode.flag()),
        "{proxy_mode}"
    );
    let (code, ok) = c.http_get(10259, "/healthz").expect("metrics healthz");
    assert_eq!((code, body(&ok)), (200, "ok"));

    let pid = c.agent_pid().expect("agent pid");
    let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).expect("oom");
    assert_eq!(oom.trim(), "555", "{}", c.agent_log());
    assert_eq!(
        node_sysctl(&c, "net.netfilter.nf_conntrack_tcp_timeout_established"),
        "12345"
    );
    assert_eq!(
        node_sysctl(&c, "net.netfilter.nf_conntrack_tcp_timeout_close_wait"),
        "1234"
    );
    assert_eq!(
        node_sysctl(&c, "net.netfilter.nf_conntrack_udp_timeout"),
        "33"
    );

    let (_, metrics) = c.http_get(10259, "/metrics").expect("metrics");
    let mut expected = vec![
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"}",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} ",
        "kubeproxy_proxy_healthz_total{code=\"200\"}",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "ferry_build_info{version=",
    ];
    match mode {
        Mode::Iptables => expected
            .push("kubeproxy_sync_proxy_rules_iptables_total{table=\"nat\",ip_family=\"IPv4\"}"),
        Mode::Nftables => expected.push("ferry_nftables_chains{ip_family=\"IPv4\"}"),
        Mode::Ebpf => expected.push("ferry_ebpf_datapath_events_total{event=\"translated\"}"),
    }
    for line in expected {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
    if mode == Mode::Ebpf {
        let translated: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("ferry_ebpf_datapath_events_total{event=\"translated\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(
            translated >= 30.0,
            "30 connections were balanced: {translated}"
        );
    }
}

/// An EndpointSlice change carrying the controller's trigger time is measured from
/// there (kube-proxy's network programming latency); one without is not.
fn network_programming_latency_comes_from_the_trigger_time(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b"]);
    c.write_manifest("web.yaml", &web(&c, &["a"]));
    c.start_agent();
    let count = |c: &Cluster| {
        c.metric("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}")
            .unwrap_or(0.0)
    };
    assert_eq!(count(&c), 0.0);
    let trigger = format!(
        "  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\n",
        jiff::Timestamp::now()
    );
    let changed = web(&c, &["a", "b"]).replacen("  labels:\n", &format!("{trigger}  labels:\n"), 1);
    assert!(changed.contains("last-change-trigger-time"), "{changed}");
    c.write_manifest("web.yaml", &changed);
    c.wait_for("a measured network programming latency", WAIT, || {
        count(&c) == 1.0
    });
}

/// A Node with the cluster autoscaler's deletion taint is not eligible for load
/// balancer traffic: /healthz 503 with `nodeEligible: false`, /livez still 200.
fn node_being_deleted_fails_healthz_not_livez(mode: Mode) {
    let mut c = Cluster::new(mode, &[]);
    c.start_agent();
    let node = |taints: &str| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {NODE_NAME}\nspec:\n  taints: {taints}\n"
        )
    };
    c.write_manifest(
        "node.yaml",
        &node("[{key: ToBeDeletedByClusterAutoscaler, value: \"1700000000\", effect: NoSchedule}]"),
    );
    c.wait_for("healthz 503 for a node being deleted", WAIT, || {
        c.healthz() == Some(503)
    });
    let (_, response) = c.http_get(10256, "/healthz").expect("healthz");
    assert!(
        body(&response).contains("\"nodeEligible\":false"),
        "{response}"
    );
    let (code, _) = c.http_get(10256, "/livez").expect("livez");
    assert_eq!(code, 200, "liveness ignores the node");
    let metrics = c.metrics();
    assert!(
        metrics.contains("kubeproxy_proxy_healthz_total{code=\"503\"}"),
        "{metrics}"
    );
    c.write_manifest("node.yaml", &node("[]"));
    c.wait_for("healthz 200 again", WAIT, || c.healthz() == Some(200));
}

/// While something answers kube-proxy's /healthz on the health port, the agent does
/// not start, and says why and what to do.
fn refuses_to_start_while_kube_proxy_runs(mode: Mode) {
    let mut c = Cluster::new(mode, &[]);
    let listener = c.in_node(|| std::net::TcpListener::bind("127.0.0.1:10256").expect("bind"));
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            // The whole request, then the answer, then an orderly close.
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = "{\"lastUpdated\": \"2026-12-01T00:00:00Z\",\"currentTime\": \"2026-12-01T00:00:01Z\"}";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.shutdown(std::net::Shutdown::Write);
        }
    });
    c.spawn_agent(&[]);
    let status = c
        .wait_agent_exit(WAIT)
        .unwrap_or_else(|| panic!("the agent must exit:\n{}", c.agent_log()));
    assert!(!status.success());
    let log = c.agent_log();
    assert!(log.contains("kube-proxy still runs on this node"), "{log}");
    assert!(log.contains("ferry.io/proxy=true"), "{log}");
}

/// A health port held by a process that does not answer like kube-proxy (one that is
/// shutting down, say) is retried until it is free.
fn busy_health_port_is_retried_until_free(mode: Mode) {
    let mut c = Cluster::new(mode, &[]);
    let holder = c.in_node(|| std::net::TcpListener::bind("127.0.0.1:10256").expect("bind"));
    c.spawn_agent(&[]);
    c.wait_for("the bind retry warning", WAIT, || {
        c.agent_log().contains("cannot serve healthz yet")
    });
    assert!(c.agent_alive());
    drop(holder);
    c.wait_healthy();
}

/// Rules kube-proxy left (a service chain DNATing the ClusterIP to a pod that is no
/// longer its endpoint) are taken over: traffic follows Ferry's view and the stale
/// chain is gone after the first sync, in both data planes.
fn leftover_kube_proxy_rules_are_taken_over(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    let stale = format!(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-LEFTOVER0000000 - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-LEFTOVER0000000\n\
         -A KUBE-SVC-LEFTOVER0000000 -p tcp -j DNAT --to-destination {}:8080\nCOMMIT\n",
        c.pod("b").ip
    );
    restore(&c, "iptables-restore", &stale);
    c.write_manifest("web.yaml", &web(&c, &["a"]));
    c.start_agent();
    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 20);
    assert_eq!(r.pods(), ["a"], "{r:?}");
    c.wait_for("the stale chain deleted", WAIT, || {
        !save(&c, "iptables-save", "nat").contains("KUBE-SVC-LEFTOVER")
    });
}

fn restore(c: &Cluster, tool: &str, payload: &str) {
    let mut child = c
        .node_command(tool)
        .arg("--noflush")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn restore");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(payload.as_bytes())
        .expect("write payload");
    assert!(
        child.wait().expect("restore").success(),
        "{tool} rejected:\n{payload}"
    );
}

fn save(c: &Cluster, tool: &str, table: &str) -> String {
    let out = c
        .node_command(tool)
        .args(["-t", table])
        .output()
        .expect("save");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn node_ok(c: &Cluster, program: &str, args: &[&str]) -> bool {
    c.node_command(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `ferry cleanup --kube-proxy` removes what kube-proxy leaves in each of its modes:
/// chains and jumps in both iptables backends (IPVS mode's chains too), the mangle
/// canary, its nftables table, `kube-ipvs0` and its ipsets; the kubelet's chains and
/// anyone else's stay.
#[test]
fn cleanup_kube_proxy_removes_its_leftovers_in_every_backend() {
    let c = Cluster::new(Mode::Iptables, &[]);
    restore(
        &c,
        "iptables-legacy-restore",
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n\
         -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-SERVICES -j KUBE-SVC-AAAAAAAAAAAAAAAA\nCOMMIT\n\
         *filter\n:KUBE-FIREWALL - [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n",
    );
    restore(
        &c,
        "iptables-nft-restore",
        "*filter\n:KUBE-NODE-PORT - [0:0]\n:USER-CHAIN - [0:0]\n\
         -A INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT\n\
         -A INPUT -j USER-CHAIN\nCOMMIT\n*mangle\n:KUBE-PROXY-CANARY - [0:0]\nCOMMIT\n",
    );
    for args in [
        &["nft", "add", "table", "ip", "kube-proxy"][..],
        &["nft", "add", "chain", "ip", "kube-proxy", "services"],
        &["nft", "add", "table", "ip6", "kube-proxy"],
        &[
            "ip",
            "link",
            "add",
            "kube-ipvs0",
            "type",
            "veth",
            "peer",
            "name",
            "kube-ipvs0p",
        ],
        &["ipset", "create", "KUBE-CLUSTER-IP", "hash:ip,port"],
        &[
            "ipset",
            "create",
            "KUBE-6-CLUSTER-IP",
            "hash:ip,port",
            "family",
            "inet6",
        ],
        &["ipset", "create", "USER-SET", "hash:ip"],
    ] {
        assert!(node_ok(&c, args[0], &args[1..]), "{args:?}");
    }
    let pins = c.pin_dir().display().to_string();
    let out = c
        .node_command(ferry_tests::cluster::bin_dir().join("ferry"))
        .args(["cleanup", "--kube-proxy", "--bpf-pin-path", &pins])
        .output()
        .expect("ferry cleanup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let legacy =
        save(&c, "iptables-legacy-save", "nat") + &save(&c, "iptables-legacy-save", "filter");
    assert!(
        !legacy.contains("KUBE-SERVICES") && !legacy.contains("KUBE-SVC-"),
        "{legacy}"
    );
    assert!(
        legacy.contains("-A INPUT -j KUBE-FIREWALL"),
        "the kubelet's chain stays: {legacy}"
    );
    let nft = save(&c, "iptables-nft-save", "filter") + &save(&c, "iptables-nft-save", "mangle");
    assert!(
        !nft.contains("KUBE-NODE-PORT") && !nft.contains("KUBE-PROXY-CANARY"),
        "{nft}"
    );
    assert!(nft.contains("-A INPUT -j USER-CHAIN"), "{nft}");
    assert!(!node_ok(&c, "nft", &["list", "table", "ip", "kube-proxy"]));
    assert!(!node_ok(&c, "nft", &["list", "table", "ip6", "kube-proxy"]));
    assert!(!node_ok(&c, "ip", &["link", "show", "kube-ipvs0"]));
    let sets = c
        .node_command("ipset")
        .args(["list", "-n"])
        .output()
        .expect("ipset");
    let sets = String::from_utf8_lossy(&sets.stdout);
    assert_eq!(sets.trim(), "USER-SET", "{sets}");
}

ferry_tests::scenarios!(
    kube_proxy_configuration_file_configures_the_agent,
    network_programming_latency_comes_from_the_trigger_time,
    node_being_deleted_fails_healthz_not_livez,
    refuses_to_start_while_kube_proxy_runs,
    busy_health_port_is_retried_until_free,
    leftover_kube_proxy_rules_are_taken_over,
);

/// One pod cannot take the health server's slots from the kubelet: past 16 open
/// connections from its address, the server closes its new ones at once, and
/// `/healthz` answers while the pod holds its 16 with unfinished requests.
#[test]
fn one_pod_cannot_hold_every_health_server_slot() {
    let mut c = Cluster::new(Mode::Iptables, &["a"]);
    c.write_manifest("web.yaml", &web(&c, &["a"]));
    // Reachable from pods, as kube-proxy's default 0.0.0.0:10256 is.
    c.start_agent_with(&["--healthz-bind-address", "0.0.0.0:10256"]);
    let addr: std::net::SocketAddr = format!("{NODE_IP}:10256").parse().expect("address");
    let open = c.in_pod("a", move || {
        let slow: Vec<std::net::TcpStream> = (0..80)
            .filter_map(|_| {
                let mut s = std::net::TcpStream::connect(addr).ok()?;
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n").ok()?;
                Some(s)
            })
            .collect();
        // Those past the pod's share are closed as soon as they are accepted; the
        // header timeout (5 s) has not closed the others yet.
        std::thread::sleep(Duration::from_millis(500));
        let still_open = slow
            .iter()
            .filter(|s| {
                let _ = s.set_nonblocking(true);
                let mut s: &std::net::TcpStream = s;
                matches!(s.read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        (slow, still_open)
    });
    let (held, still_open) = open;
    assert_eq!(
        held.len(),
        80,
        "every connection was accepted by the kernel"
    );
    assert_eq!(still_open, 16, "the pod keeps exactly its share");
    assert_eq!(
        c.healthz(),
        Some(200),
        "answered while the pod holds its share"
    );
    drop(held);
}

/// Clients that open connections and never finish their request (slowloris) are
/// dropped by the health server after its header timeout, so they cannot hold it:
/// every one of them sees its connection closed, and `/healthz` still answers. The
/// HTTP servers are the same in every mode.
#[test]
fn slow_clients_cannot_hold_the_health_server() {
    let mut c = Cluster::new(Mode::Ebpf, &["a"]);
    c.write_manifest("web.yaml", &web(&c, &["a"]));
    c.start_agent();
    let (closed, total) = c.in_node(|| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let slow: Vec<std::net::TcpStream> = (0..100)
            .filter_map(|_| {
                let mut s = std::net::TcpStream::connect("127.0.0.1:10256").ok()?;
                s.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n")
                    .ok()?;
                Some(s)
            })
            .collect();
        let total = slow.len();
        let closed = slow
            .into_iter()
            .filter(|mut s| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                let mut buf = [0u8; 512];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return true,
                        Ok(_) => continue,
                        Err(e) => {
                            return !matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            );
                        }
                    }
                }
            })
            .count();
        (closed, total)
    });
    assert_eq!(total, 100, "every connection was accepted by the kernel");
    assert_eq!(closed, total, "the server closed every unfinished request");
    assert_eq!(c.healthz(), Some(200));
}
