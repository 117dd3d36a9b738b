//! Service load balancing end to end: real agent, real kernel, real traffic, in
//! network namespaces. Every scenario runs against each data plane (see the macro at
//! the bottom); a scenario asserts what a client sees.

use std::time::Duration;

use ferry_tests::manifests::{Endpoint, Service, docs, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

const WAIT: Duration = Duration::from_secs(10);

/// A ClusterIP service `web` (10.96.0.10, ports http 80 -> 8080 TCP and dns 53 ->
/// 5353 UDP), backed by pods a and b, plus a client pod.
fn web_cluster(mode: Mode) -> Cluster {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    let ports = [port("http", "TCP", 8080), port("dns", "UDP", 5353)];
    c.write_manifest(
        "web.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.10")
                .cluster_ip("fd00:96::10")
                .spec("ipFamilyPolicy: PreferDualStack")
                .port(port("http", "TCP", 80))
                .port(port("dns", "UDP", 53))
                .yaml(),
            slice(
                "web-v4",
                "web",
                "IPv4",
                &ports,
                &[ep(&c.pod("a").ip), ep(&c.pod("b").ip)],
            ),
            slice(
                "web-v6",
                "web",
                "IPv6",
                &ports,
                &[ep(&c.pod("a").ip6), ep(&c.pod("b").ip6)],
            ),
        ]),
    );
    c.start_agent();
    c
}

fn clusterip_tcp_from_pod_and_node(mode: Mode) {
    let c = web_cluster(mode);
    for from in [From::Pod("client"), From::Node] {
        let r = c.tcp(from, "10.96.0.10:80", 40);
        assert_eq!(r.successes(), 40, "{from:?}: {r:?}");
        assert_eq!(
            r.pods(),
            ["a", "b"],
            "{from:?}: both backends must be used: {r:?}"
        );
        assert!(r.ok.keys().all(|k| k.ends_with(" 8080")), "{r:?}");
    }
}

fn clusterip_ipv6(mode: Mode) {
    let c = web_cluster(mode);
    let r = c.tcp(From::Pod("client"), "[fd00:96::10]:80", 30);
    assert_eq!(r.successes(), 30, "{r:?}");
    assert_eq!(r.pods(), ["a", "b"], "{r:?}");
    let r = c.udp(From::Pod("client"), "[fd00:96::10]:53", 5);
    assert_eq!(r.successes(), 5, "{r:?}");
}

fn clusterip_udp_replies_come_from_the_service(mode: Mode) {
    let c = web_cluster(mode);
    for from in [From::Pod("client"), From::Node] {
        let r = c.udp(from, "10.96.0.10:53", 30);
        assert_eq!(r.successes(), 30, "{from:?}: {r:?}");
        assert_eq!(r.pods(), ["a", "b"], "{from:?}: {r:?}");
        // A DNS client drops answers from an unexpected source: the reply must
        // appear to come from the ClusterIP.
        assert_eq!(
            r.peers.keys().collect::<Vec<_>>(),
            ["10.96.0.10:53"],
            "{r:?}"
        );
        let r = c.udp_connected(from, "10.96.0.10:53", 10);
        assert_eq!(r.successes(), 10, "{from:?} connected: {r:?}");
        assert_eq!(
            r.peers.keys().collect::<Vec<_>>(),
            ["10.96.0.10:53"],
            "{r:?}"
        );
    }
}

/// A UDP service `dns` (`cluster_ip`:53 -> 5353) backed by pod a, the agent
/// running, and a resolver-like flow from the client pod under way: one socket
/// (`connected` or not), `count` requests 50 ms apart. Returns once the flow has
/// reached a.
fn udp_flow_on_a(
    mode: Mode,
    cluster_ip: &str,
    count: u32,
    connected: bool,
) -> (Cluster, ferry_tests::cluster::RunningProbe) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    c.write_manifest(
        "svc.yaml",
        &Service::new("dns")
            .cluster_ip(cluster_ip)
            .port(port("dns", "UDP", 53))
            .yaml(),
    );
    move_dns_endpoint(&c, "a");
    c.start_agent();
    let flow = spawn_udp_flow(&c, &format!("{cluster_ip}:53"), count, connected);
    std::thread::sleep(Duration::from_millis(700));
    (c, flow)
}

/// A resolver-like flow from the client pod to `target`: one socket on one source
/// port (`connected` or not), `count` requests 50 ms apart.
fn spawn_udp_flow(
    c: &Cluster,
    target: &str,
    count: u32,
    connected: bool,
) -> ferry_tests::cluster::RunningProbe {
    let count = count.to_string();
    let mut args = vec!["udp", target, "--count", &count, "--same-socket"];
    if connected {
        args.push("--connected");
    }
    args.extend(["--interval-ms", "50", "--timeout-ms", "500"]);
    c.spawn_probe(
        From::Pod("client"),
        &args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    )
}

/// Makes pod `to` the only endpoint of the `dns` service.
fn move_dns_endpoint(c: &Cluster, to: &str) {
    c.write_manifest(
        "eps.yaml",
        &slice(
            "dns-1",
            "dns",
            "IPv4",
            &[port("dns", "UDP", 5353)],
            &[ep(&c.pod(to).ip)],
        ),
    );
}

/// The flow reached a first and then b at least `min_b` times.
fn assert_moved_to_b(r: &ferry_tests::Report, min_b: u32, what: &str) {
    assert!(r.ok.contains_key("a 5353"), "{r:?}");
    assert!(
        r.ok.get("b 5353").copied().unwrap_or(0) >= min_b,
        "{what}: {r:?}"
    );
}

fn long_lived_udp_flow_follows_endpoint_removal(mode: Mode) {
    let (c, flow) = udp_flow_on_a(mode, "10.96.0.53", 60, false);
    move_dns_endpoint(&c, "b");
    let what = "the flow must move to the new endpoint once the old one is removed";
    assert_moved_to_b(&flow.wait(), 30, what);
}

/// kube-proxy reconciles conntrack after every sync, the first one after a restart
/// included: a UDP flow whose backend went away while the agent was down moves on
/// once the agent is back.
fn udp_flow_moves_after_a_restart_that_missed_the_change(mode: Mode) {
    let (mut c, flow) = udp_flow_on_a(mode, "10.96.0.53", 100, false);
    c.kill_agent();
    move_dns_endpoint(&c, "b");
    c.start_agent();
    let what = "the flow must move to the new endpoint after the restart";
    assert_moved_to_b(&flow.wait(), 20, what);
}

/// NodePorts answer on an address the node gains while the agent runs (kube-proxy
/// follows its node's addresses): the agent hears of it from rtnetlink.
fn nodeport_follows_a_new_node_address(mode: Mode) {
    let mut c = Cluster::new(mode, &["a"]);
    c.write_manifest(
        "np.yaml",
        &docs(&[
            Service::new("np")
                .cluster_ip("10.96.0.21")
                .spec("type: NodePort")
                .port(port("http", "TCP", 80).node_port(30081))
                .yaml(),
            slice(
                "np-1",
                "np",
                "IPv4",
                &[port("http", "TCP", 8080)],
                &[ep(&c.pod("a").ip)],
            ),
        ]),
    );
    c.start_agent_with(&["--nodeport-addresses", "172.18.0.0/24"]);
    let r = c.tcp_with(From::External, "172.18.0.77:30081", 1, 300, 0);
    assert_eq!(r.successes(), 0, "no such address yet: {r:?}");
    let status = c
        .node_command("ip")
        .args(["addr", "add", "172.18.0.77/24", "dev", "eth0"])
        .status()
        .expect("ip addr add");
    assert!(status.success());
    c.wait_for("the NodePort on the new address", WAIT, || {
        c.tcp_with(From::External, "172.18.0.77:30081", 1, 300, 0)
            .successes()
            == 1
    });
}

/// kube-proxy's `--detect-local-mode InterfaceNamePrefix`: pod traffic is recognised
/// by the interface it enters through (the test node's pod veths are `v0`, `v1`...),
/// so a ClusterIP connection from a pod keeps its source even though `--cluster-cidr`
/// does not cover the pods; with `ClusterCIDR` detection the same connection is
/// masqueraded in iptables mode, as with `--masquerade-all` (eBPF balances at the
/// socket and never NATs it).
fn detect_local_by_interface_prefix_keeps_pod_sources(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "client"]);
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.30")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "web-1",
                "web",
                "IPv4",
                &[port("http", "TCP", 8080)],
                &[ep(&c.pod("a").ip)],
            ),
        ]),
    );
    let client = c.pod("client").ip.clone();
    let mut run = |detect: &[&str]| {
        let mut args = c.agent_args();
        let at = args
            .iter()
            .position(|a| a == "--cluster-cidr")
            .expect("cluster cidr flag");
        args[at + 1] = "10.99.0.0/16".into();
        args.extend(detect.iter().map(|s| s.to_string()));
        c.spawn_agent_raw(&args);
        c.wait_healthy();
        let r = c.tcp(From::Pod("client"), "10.96.0.30:80", 5);
        c.kill_agent();
        r
    };
    let by_interface = run(&[
        "--detect-local-mode",
        "InterfaceNamePrefix",
        "--pod-interface-name-prefix",
        "v",
    ]);
    assert_eq!(
        by_interface.sources(),
        std::slice::from_ref(&client),
        "{by_interface:?}"
    );
    let by_cidr = run(&[]);
    let expected = match mode {
        Mode::Iptables | Mode::Nftables => ferry_tests::cluster::NODE_IP.to_owned(),
        Mode::Ebpf => client,
    };
    assert_eq!(
        by_cidr.sources(),
        std::slice::from_ref(&expected),
        "{by_cidr:?}"
    );
    // --masquerade-all masquerades pod traffic whatever the detection says.
    let all = run(&[
        "--detect-local-mode",
        "InterfaceNamePrefix",
        "--pod-interface-name-prefix",
        "v",
        "--masquerade-all",
    ]);
    assert_eq!(all.sources(), [expected], "{all:?}");
}

/// loadBalancerSourceRanges apply to pods too (kube-proxy's firewall chain sees all
/// traffic to the load balancer IP): a pod inside the ranges reaches the service, a
/// pod outside them does not, in every mode.
fn load_balancer_source_ranges_apply_to_pods(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "inside", "outside"]);
    let inside = c.pod("inside").ip.clone();
    c.write_manifest(
        "lb.yaml",
        &docs(&[
            Service::new("lb")
                .cluster_ip("10.96.0.60")
                .spec("type: LoadBalancer")
                .spec(&format!("loadBalancerSourceRanges: [{inside}/32]"))
                .port(port("http", "TCP", 80).node_port(30060))
                .status("loadBalancer: {ingress: [{ip: 203.0.113.60}]}")
                .yaml(),
            slice(
                "lb-1",
                "lb",
                "IPv4",
                &[port("http", "TCP", 8080)],
                &[ep(&c.pod("a").ip)],
            ),
        ]),
    );
    c.start_agent();
    let r = c.tcp(From::Pod("inside"), "203.0.113.60:80", 5);
    assert_eq!(r.pods(), ["a"], "inside the ranges: {r:?}");
    let r = c.tcp_with(From::Pod("outside"), "203.0.113.60:80", 2, 500, 0);
    assert_eq!(r.successes(), 0, "outside the ranges: {r:?}");
    // The ClusterIP is not subject to the ranges.
    let r = c.tcp(From::Pod("outside"), "10.96.0.60:80", 2);
    assert_eq!(r.pods(), ["a"], "{r:?}");
}

/// A resolver's connected UDP socket on a fixed source port moves to a live backend
/// once its backend is removed (kube-proxy deletes the flow's conntrack entry).
/// A connected UDP socket on a fixed source port follows its backend's removal: in
/// iptables and nftables mode the conntrack entry is deleted; in eBPF mode, which
/// translated the socket at connect(), the socket is terminated and the client's
/// reconnect reaches the new endpoint. A socket connected to the pod IP itself is
/// left alone.
fn connected_udp_flow_follows_endpoint_removal(mode: Mode) {
    let (c, flow) = udp_flow_on_a(mode, "10.96.0.54", 60, true);
    let direct = spawn_udp_flow(&c, &format!("{}:5353", c.pod("a").ip), 40, true);
    move_dns_endpoint(&c, "b");
    assert_moved_to_b(
        &flow.wait(),
        30,
        "the connected flow must move to the new endpoint",
    );
    let direct = direct.wait();
    assert_eq!(direct.successes(), 40, "not a service flow: {direct:?}");
    assert_eq!(direct.pods(), ["a"], "{direct:?}");
    if mode == Mode::Ebpf {
        let terminated = c.metric("ferry_udp_sockets_terminated_total");
        assert_eq!(terminated, Some(1.0), "only the service's socket");
    }
}

/// As [`udp_flow_moves_after_a_restart_that_missed_the_change`], for a connected
/// socket.
fn connected_udp_flow_moves_after_a_restart_that_missed_the_change(mode: Mode) {
    let (mut c, flow) = udp_flow_on_a(mode, "10.96.0.55", 100, true);
    c.kill_agent();
    move_dns_endpoint(&c, "b");
    c.start_agent();
    let what = "the connected flow must move to the new endpoint after the restart";
    assert_moved_to_b(&flow.wait(), 20, what);
}

fn tcp_peer_is_the_cluster_ip(mode: Mode) {
    let c = web_cluster(mode);
    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 5);
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        ["10.96.0.10:80"],
        "{r:?}"
    );
}

fn nodeport_from_external_client(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b"]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "np.yaml",
        &docs(&[
            Service::new("np")
                .cluster_ip("10.96.0.20")
                .spec("type: NodePort")
                .port(port("http", "TCP", 80).node_port(30080))
                .yaml(),
            slice(
                "np-1",
                "np",
                "IPv4",
                &ports,
                &[ep(&c.pod("a").ip), ep(&c.pod("b").ip)],
            ),
        ]),
    );
    c.start_agent();
    let addr = format!("{}:30080", ferry_tests::cluster::NODE_IP);
    let r = c.tcp(From::External, &addr, 30);
    assert_eq!(r.successes(), 30, "{r:?}");
    assert_eq!(r.pods(), ["a", "b"], "{r:?}");
}

fn no_endpoints_refuses_immediately(mode: Mode) {
    let mut c = Cluster::new(mode, &["client"]);
    c.write_manifest(
        "empty.yaml",
        &Service::new("empty")
            .cluster_ip("10.96.0.30")
            .port(port("http", "TCP", 80))
            .port(port("dns", "UDP", 53))
            .yaml(),
    );
    c.start_agent();
    for from in [From::Pod("client"), From::Node] {
        let r = c.tcp_with(from, "10.96.0.30:80", 3, 3000, 0);
        assert_eq!(
            r.error("refused"),
            3,
            "{from:?}: connection refused, not a timeout: {r:?}"
        );
        // UDP: the ICMP error reaches a connected socket as ECONNREFUSED; the node's
        // own packets are refused before they leave (the send fails with EPERM).
        let r = c.udp_connected(from, "10.96.0.30:53", 2);
        assert_eq!(r.error("refused") + r.error("eperm"), 2, "{from:?}: {r:?}");
    }
}

fn endpoint_and_port_changes_take_effect(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    let svc = |ports: &[ferry_tests::manifests::Port]| {
        let mut s = Service::new("web").cluster_ip("10.96.0.40");
        for p in ports {
            s = s.port(p.clone());
        }
        s.yaml()
    };
    let http = port("http", "TCP", 80);
    let alt = port("alt", "TCP", 81);
    let sports = [port("http", "TCP", 8080), port("alt", "TCP", 8081)];
    c.write_manifest("svc.yaml", &svc(std::slice::from_ref(&http)));
    c.write_manifest(
        "eps.yaml",
        &slice("web-1", "web", "IPv4", &sports, &[ep(&c.pod("a").ip)]),
    );
    c.start_agent();
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.40:80", 10).pods(),
        ["a"]
    );

    // Add an endpoint.
    c.write_manifest(
        "eps.yaml",
        &slice(
            "web-1",
            "web",
            "IPv4",
            &sports,
            &[ep(&c.pod("a").ip), ep(&c.pod("b").ip)],
        ),
    );
    c.wait_for("endpoint b added", WAIT, || {
        c.tcp(From::Pod("client"), "10.96.0.40:80", 20).pods() == ["a", "b"]
    });

    // Remove one.
    c.write_manifest(
        "eps.yaml",
        &slice("web-1", "web", "IPv4", &sports, &[ep(&c.pod("b").ip)]),
    );
    c.wait_for("endpoint a removed", WAIT, || {
        c.tcp(From::Pod("client"), "10.96.0.40:80", 20).pods() == ["b"]
    });

    // Add a port.
    c.write_manifest("svc.yaml", &svc(&[http.clone(), alt.clone()]));
    c.wait_for("port alt added", WAIT, || {
        c.tcp(From::Pod("client"), "10.96.0.40:81", 1)
            .ok
            .contains_key("b 8081")
    });

    // Remove it again: the port no longer reaches a backend.
    c.write_manifest("svc.yaml", &svc(&[http]));
    c.wait_for("port alt removed", WAIT, || {
        c.tcp_with(From::Pod("client"), "10.96.0.40:81", 1, 300, 0)
            .successes()
            == 0
    });
    assert_eq!(c.tcp(From::Pod("client"), "10.96.0.40:80", 5).pods(), ["b"]);

    // Remove all endpoints: refused.
    c.remove_manifest("eps.yaml");
    c.wait_for("no endpoints", WAIT, || {
        c.tcp(From::Pod("client"), "10.96.0.40:80", 1)
            .error("refused")
            == 1
    });
}

fn deleting_a_service_stops_it(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "gone.yaml",
        &docs(&[
            Service::new("gone")
                .cluster_ip("10.96.0.50")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("gone-1", "gone", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
    c.write_manifest(
        "stays.yaml",
        &docs(&[
            Service::new("stays")
                .cluster_ip("10.96.0.51")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("stays-1", "stays", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
    c.start_agent();
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.50:80", 3).successes(),
        3
    );
    c.remove_manifest("gone.yaml");
    c.wait_for("service deleted", WAIT, || {
        c.tcp_with(From::Pod("client"), "10.96.0.50:80", 1, 300, 0)
            .successes()
            == 0
    });
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.51:80", 3).successes(),
        3,
        "other services untouched"
    );
}

fn invalid_manifests_next_to_valid_ones(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    let a = c.pod("a").ip.clone();
    let good = || {
        docs(&[
            Service::new("good")
                .cluster_ip("10.96.0.60")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("good-1", "good", "IPv4", &p, &[ep(&a)]),
        ])
    };
    c.write_manifest("good.yaml", &good());
    c.write_manifest("garbage.yaml", "kind: [this is not yaml\n");
    c.write_manifest(
        "mixed.yaml",
        &docs(&[
            Service::new("badip").cluster_ip("10.96.0.999").port(port("http", "TCP", 80)).yaml(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: typo}\nspec: {ports: [{port: eighty}]}\n".into(),
            Service::new("fine").cluster_ip("10.96.0.61").port(port("http", "TCP", 80)).yaml(),
            slice("fine-1", "fine", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
    c.start_agent();
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.60:80", 3).successes(),
        3
    );
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.61:80", 3).successes(),
        3
    );
    let metrics = c.metrics();
    assert!(metrics.contains("ferry_invalid_objects_total"), "{metrics}");

    // The good service turns invalid: it keeps its last good programming.
    c.write_manifest("good.yaml", &good().replace("10.96.0.60", "not-an-ip"));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.60:80", 3).successes(),
        3
    );
    // And an unparseable file keeps it too.
    c.write_manifest("good.yaml", "{{{{");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.60:80", 3).successes(),
        3
    );
    let mut c = c;
    assert!(c.agent_alive(), "bad input must not take the agent down");
    let log = c.agent_log();
    assert!(
        log.contains("garbage.yaml#1"),
        "the log names file and document:\n{log}"
    );
    assert!(log.contains("mixed.yaml#2"), "{log}");
}

/// kube-proxy's informers select out services labelled
/// `service.kubernetes.io/service-proxy-name` (another proxy's) or
/// `service.kubernetes.io/headless`; e2e "should implement service.kubernetes.io/headless".
fn service_proxy_name_and_headless_labels_are_not_proxied(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("other")
                .cluster_ip("10.96.0.70")
                .label("service.kubernetes.io/service-proxy-name", "someone-else")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("other-1", "other", "IPv4", &p, &[ep(&c.pod("a").ip)]),
            Service::new("headless-label")
                .cluster_ip("10.96.0.72")
                .label("service.kubernetes.io/headless", "")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "headless-label-1",
                "headless-label",
                "IPv4",
                &p,
                &[ep(&c.pod("a").ip)],
            ),
            Service::new("mine")
                .cluster_ip("10.96.0.71")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("mine-1", "mine", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
    c.start_agent();
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.71:80", 3).successes(),
        3
    );
    for labelled in ["10.96.0.70:80", "10.96.0.72:80"] {
        let r = c.tcp_with(From::Pod("client"), labelled, 2, 300, 0);
        assert_eq!(
            r.successes(),
            0,
            "{labelled}: a labelled service must not be proxied: {r:?}"
        );
    }
}

/// NodePorts on 127.0.0.1 need `route_localnet`, which would let a neighbour reach
/// anything listening on the node's loopback (CVE-2020-8558). With localhost NodePorts
/// on, kube-proxy's guard must keep the neighbour's datagrams to a loopback-bound
/// socket out; before the agent runs (route_localnet on, no guard) the same datagram
/// arrives, which shows the path is open and the guard is what closes it.
fn localhost_nodeports_do_not_expose_the_node_loopback(mode: Mode) {
    let mut c = Cluster::new(mode, &["a"]);
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.90")
                .spec("type: NodePort")
                .port(port("http", "TCP", 80).node_port(30090))
                .yaml(),
            slice(
                "web-1",
                "web",
                "IPv4",
                &[port("http", "TCP", 8080)],
                &[ep(&c.pod("a").ip)],
            ),
        ]),
    );
    // Something on the node that only its own processes should reach.
    let listener = c.in_node(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:9999").expect("bind");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        s
    });
    // The neighbour sends to 127.0.0.0/8 through the node, as an attacker on the link can.
    let ext = |args: &[&str]| {
        let status = c
            .ext_command(args[0])
            .args(&args[1..])
            .status()
            .expect("ext command");
        assert!(status.success(), "{args:?}");
    };
    ext(&[
        "sysctl",
        "-qw",
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv4.conf.eth0.route_localnet=1",
    ]);
    ext(&[
        "ip",
        "route",
        "del",
        "local",
        "127.0.0.1",
        "dev",
        "lo",
        "table",
        "local",
    ]);
    ext(&[
        "ip",
        "route",
        "del",
        "local",
        "127.0.0.0/8",
        "dev",
        "lo",
        "table",
        "local",
    ]);
    ext(&[
        "ip",
        "route",
        "add",
        "127.0.0.0/8",
        "via",
        ferry_tests::cluster::NODE_IP,
    ]);
    let arrives = |c: &Cluster, listener: &std::net::UdpSocket| {
        let mut buf = [0u8; 64];
        (0..10).any(|_| {
            c.in_ext(|| {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
                let _ = s.send_to(b"knock", "127.0.0.1:9999");
            });
            listener
                .recv_from(&mut buf)
                .is_ok_and(|(n, _)| &buf[..n] == b"knock")
        })
    };
    c.node_sysctl(&["net.ipv4.conf.all.route_localnet=1"]);
    assert!(
        arrives(&c, &listener),
        "without the guard the neighbour gets in"
    );
    c.start_agent_with(&["--nodeport-addresses", "127.0.0.0/8,172.18.0.0/24"]);
    let r = c.tcp(From::Node, "127.0.0.1:30090", 3);
    assert_eq!(
        r.pods(),
        ["a"],
        "the node reaches its localhost NodePort: {r:?}"
    );
    while listener.recv_from(&mut [0u8; 64]).is_ok() {}
    assert!(
        !arrives(&c, &listener),
        "the node's loopback must stay private"
    );
}

/// Whether this kernel can open SCTP sockets (the test machines' cannot).
fn kernel_has_sctp() -> bool {
    // SAFETY: socket(2) with constant arguments; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: fd was just opened by this function.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

/// A service with an SCTP port next to a TCP one. On a kernel without SCTP (the test
/// machines') the SCTP port is skipped with a log line and a metric; either way the
/// TCP port works and nothing is half-programmed (no sync fails).
fn sctp_port_without_kernel_support_is_skipped(mode: Mode) {
    let has_sctp = kernel_has_sctp();
    let mut c = Cluster::new(mode, &["a", "client"]);
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("mixed")
                .cluster_ip("10.96.0.80")
                .port(port("sig", "SCTP", 3868))
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "mixed-1",
                "mixed",
                "IPv4",
                &[port("sig", "SCTP", 3868), port("http", "TCP", 8080)],
                &[ep(&c.pod("a").ip)],
            ),
        ]),
    );
    c.start_agent();
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.80:80", 3).successes(),
        3
    );
    let skipped = c.metric(
        "ferry_skipped_service_ports_total{protocol=\"SCTP\",reason=\"unsupported_protocol\"}",
    );
    assert_eq!(
        c.metric("ferry_sync_failures_total"),
        Some(0.0),
        "{}",
        c.agent_log()
    );
    let log = c.agent_log();
    if has_sctp {
        // A kernel with SCTP programs the port like any other.
        assert_eq!(skipped, None, "{}", c.metrics());
        return;
    }
    assert!(skipped.is_some_and(|n| n >= 1.0), "{}", c.metrics());
    assert!(
        log.contains("default/mixed:sig") && log.contains("no SCTP support"),
        "{log}"
    );
}

fn hostile_names_cannot_inject(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    let hostile = r#"apiVersion: v1
kind: Service
metadata:
  name: "x\" -j ACCEPT\n-A INPUT -j DROP"
  namespace: default
spec:
  clusterIP: 10.96.0.80
  ports: [{name: "a\"b", port: 80}]
"#;
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            hostile.into(),
            Service::new("ok")
                .cluster_ip("10.96.0.81")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("ok-1", "ok", "IPv4", &p, &[ep(&c.pod("a").ip)]),
        ]),
    );
    c.start_agent();
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.81:80", 3).successes(),
        3
    );
    let save = c.node_rules();
    assert!(!save.contains("-A INPUT -j DROP"), "{save}");
    // The name is logged (an invalid object), escaped: no forged line.
    let log = c.agent_log();
    assert!(log.contains("-A INPUT -j DROP"), "{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("-A INPUT")),
        "a name started a log line:\n{log}"
    );
    assert!(
        !save.contains("10.96.0.80"),
        "the hostile service must be rejected:\n{save}"
    );
}

fn session_affinity_sticks(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("sticky")
                .cluster_ip("10.96.0.90")
                .spec("sessionAffinity: ClientIP")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "sticky-1",
                "sticky",
                "IPv4",
                &p,
                &[ep(&c.pod("a").ip), ep(&c.pod("b").ip)],
            ),
        ]),
    );
    c.start_agent();
    let r = c.tcp(From::Pod("client"), "10.96.0.90:80", 30);
    assert_eq!(r.successes(), 30);
    assert_eq!(
        r.pods().len(),
        1,
        "all connections from one client go to one backend: {r:?}"
    );
}

fn load_balancer_health_check_follows_local_endpoints(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b"]);
    let p = [port("http", "TCP", 8080)];
    let lb = |endpoints: &[Endpoint]| {
        docs(&[
            Service::new("lb")
                .cluster_ip("10.96.0.70")
                .spec("type: LoadBalancer")
                .spec("externalTrafficPolicy: Local")
                .spec("healthCheckNodePort: 32070")
                .port(port("http", "TCP", 80).node_port(30070))
                .yaml(),
            slice("lb-1", "lb", "IPv4", &p, endpoints),
        ])
    };
    let (a, b) = (c.pod("a").ip.clone(), c.pod("b").ip.clone());
    c.write_manifest("lb.yaml", &lb(&[ep(&a), ep(&b).on_node("node-b")]));
    c.start_agent();
    let probe: std::net::SocketAddr = format!("{}:32070", ferry_tests::cluster::NODE_IP)
        .parse()
        .expect("address");
    let (code, response) = c
        .http_get_external(probe, "/healthz")
        .expect("health check answers");
    assert_eq!(code, 200, "{response}");
    assert!(response.contains("\"localEndpoints\":1"), "{response}");
    assert!(
        response.contains("\"serviceProxyHealthy\":true"),
        "{response}"
    );
    assert!(response.contains("\"name\":\"lb\""), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("x-load-balancing-endpoint-weight: 1"),
        "{response}"
    );

    // The local pod starts terminating: the load balancer must drain this node.
    c.write_manifest(
        "lb.yaml",
        &lb(&[
            ep(&a).conditions(false, true, true),
            ep(&b).on_node("node-b"),
        ]),
    );
    c.wait_for("health check turns 503", Duration::from_secs(5), || {
        c.http_get_external(probe, "/")
            .is_some_and(|(code, r)| code == 503 && r.contains("\"localEndpoints\":0"))
    });

    c.remove_manifest("lb.yaml");
    c.wait_for("health check server stops", Duration::from_secs(5), || {
        c.http_get_external(probe, "/").is_none()
    });
}

fn local_internal_policy_without_local_endpoints_drops(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "client"]);
    let p = [port("http", "TCP", 8080)];
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("loc")
                .cluster_ip("10.96.0.95")
                .spec("internalTrafficPolicy: Local")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "loc-1",
                "loc",
                "IPv4",
                &p,
                &[ep(&c.pod("a").ip).on_node("node-b")],
            ),
        ]),
    );
    c.start_agent();
    let r = c.tcp_with(From::Pod("client"), "10.96.0.95:80", 1, 500, 0);
    assert_eq!(r.successes(), 0, "{r:?}");
    assert_eq!(
        r.error("refused"),
        0,
        "endpoints exist elsewhere: dropped, not refused: {r:?}"
    );
}

/// A client stuck to a backend that leaves the service goes to one that remains, even
/// while that backend still serves another service (so it is still a backend of the
/// node), and then sticks there.
fn session_affinity_moves_off_a_removed_backend(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    let p = [port("http", "TCP", 8080)];
    let both = [ep(&c.pod("a").ip), ep(&c.pod("b").ip)];
    let sticky = |c: &Cluster, pods: &[&str]| {
        let eps: Vec<_> = pods.iter().map(|n| ep(&c.pod(n).ip)).collect();
        docs(&[
            Service::new("sticky")
                .cluster_ip("10.96.0.92")
                .spec("sessionAffinity: ClientIP")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("sticky-1", "sticky", "IPv4", &p, &eps),
        ])
    };
    c.write_manifest(
        "shared.yaml",
        &docs(&[
            Service::new("plain")
                .cluster_ip("10.96.0.93")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("plain-1", "plain", "IPv4", &p, &both),
        ]),
    );
    c.write_manifest("sticky.yaml", &sticky(&c, &["a", "b"]));
    c.start_agent();
    let r = c.tcp(From::Pod("client"), "10.96.0.92:80", 10);
    assert_eq!(r.pods().len(), 1, "sticks: {r:?}");
    let stuck = r.pods()[0].clone();
    let other = if stuck == "a" { "b" } else { "a" };
    c.write_manifest("sticky.yaml", &sticky(&c, &[other]));
    c.wait_for("the client leaves the removed backend", WAIT, || {
        c.tcp(From::Pod("client"), "10.96.0.92:80", 5).pods() == [other]
    });
    let r = c.tcp(From::Pod("client"), "10.96.0.93:80", 20);
    assert_eq!(
        r.pods().len(),
        2,
        "the other service still uses both: {r:?}"
    );
    c.write_manifest("sticky.yaml", &sticky(&c, &["a", "b"]));
    let back = format!("{}:8080", c.pod(&stuck).ip);
    c.wait_for("both backends back", WAIT, || {
        let out = (c.node_command(c.bin("ferry")))
            .args(["explain", "default/sticky"])
            .output()
            .expect("ferry explain");
        String::from_utf8_lossy(&out.stdout).contains(&back)
    });
    let r = c.tcp(From::Pod("client"), "10.96.0.92:80", 10);
    assert_eq!(r.pods(), [other], "sticks to where it moved: {r:?}");
}

fn session_affinity_expires(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "c", "d", "client"]);
    let p = [port("http", "TCP", 8080)];
    let eps: Vec<_> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| ep(&c.pod(n).ip))
        .collect();
    c.write_manifest(
        "svc.yaml",
        &docs(&[
            Service::new("sticky")
                .cluster_ip("10.96.0.91")
                .spec("sessionAffinity: ClientIP")
                .spec("sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("sticky-1", "sticky", "IPv4", &p, &eps),
        ]),
    );
    c.start_agent();
    // Within the timeout a client sticks; after it, it is balanced afresh. Eight
    // expiries that all land on the same one of four backends would happen by chance
    // once in 16,384 runs.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let r = c.tcp(From::Pod("client"), "10.96.0.91:80", 5);
        assert_eq!(r.pods().len(), 1, "sticks within the timeout: {r:?}");
        seen.extend(r.pods());
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(seen.len() > 1, "affinity must expire: always {seen:?}");
}

fn killed_agent_keeps_serving_and_restarts_without_disruption(mode: Mode) {
    let mut c = web_cluster(mode);
    // An established connection held across the kill, and a stream of new ones.
    let held = c.spawn_probe(
        From::Pod("client"),
        &["tcp", "10.96.0.10:80", "--count", "1", "--hold-ms", "2500"].map(String::from),
    );
    std::thread::sleep(Duration::from_millis(300));
    c.kill_agent();
    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 20);
    assert_eq!(
        r.successes(),
        20,
        "new connections while the agent is down: {r:?}"
    );
    assert_eq!(r.pods(), ["a", "b"], "{r:?}");
    let during_restart = c.spawn_probe(
        From::Pod("client"),
        &[
            "udp",
            "10.96.0.10:53",
            "--count",
            "40",
            "--interval-ms",
            "25",
        ]
        .map(String::from),
    );
    c.start_agent();
    let r = during_restart.wait();
    assert_eq!(
        r.successes(),
        40,
        "no failure while the agent restarts: {r:?}"
    );
    let held = held.wait();
    let answer = held.held.clone().unwrap_or_default();
    assert!(
        answer == "a 8080" || answer == "b 8080",
        "the established connection must survive the kill: {held:?}"
    );
    if mode == Mode::Ebpf {
        // The restarted agent adopted the pinned maps: nothing needed rewriting.
        assert_eq!(
            c.metric("ferry_ebpf_map_writes_total"),
            Some(0.0),
            "{}",
            c.metrics()
        );
    }
    assert_eq!(
        c.tcp(From::Pod("client"), "10.96.0.10:80", 10).successes(),
        10
    );
}

fn unexposed_port_is_not_delivered(mode: Mode) {
    let c = web_cluster(mode);
    let r = c.tcp_with(From::Pod("client"), "10.96.0.10:8080", 1, 500, 0);
    assert_eq!(r.successes(), 0, "{r:?}");
    if mode != Mode::Iptables {
        // Socket LB refuses at connect(); nftables rejects unknown ClusterIP ports.
        assert_eq!(r.error("refused"), 1, "{r:?}");
    }
}

fn cleanup_removes_everything(mode: Mode) {
    let mut c = web_cluster(mode);
    c.kill_agent();
    let status = c
        .node_command(c.bin("ferry"))
        .args(["cleanup", "--bpf-pin-path"])
        .arg(c.pin_dir())
        .status()
        .expect("ferry cleanup");
    assert!(status.success());
    let r = c.tcp_with(From::Pod("client"), "10.96.0.10:80", 1, 300, 0);
    assert_eq!(
        r.successes(),
        0,
        "nothing may still balance after cleanup: {r:?}"
    );
    let save = c.node_rules();
    assert!(!save.contains("KUBE-"), "{save}");
    assert!(!save.contains("table ip ferry"), "{save}");
    assert!(!c.pin_dir().exists());
}

fn health_and_metrics_endpoints(mode: Mode) {
    let c = web_cluster(mode);
    assert_eq!(c.healthz(), Some(200));
    let m = c.metrics();
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        // Without trigger-time annotations (manifests have none) kube-proxy's network
        // programming histogram stays empty; Ferry's own measure is always there.
        "ferry_programming_duration_seconds",
    ] {
        assert!(m.contains(name), "missing {name}:\n{m}");
    }
}

/// Two services naming the same externalIP and port: every mode sends it to the
/// first by namespace and name (whatever order they arrived in), the other keeps its
/// ClusterIP, and gets the externalIP once the first is gone.
fn an_external_ip_claimed_twice_goes_to_one_service(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "client"]);
    let p = [port("http", "TCP", 8080)];
    let claim = |name: &str, cluster_ip: &str, pod: &str| {
        docs(&[
            Service::new(name)
                .cluster_ip(cluster_ip)
                .spec("externalIPs: [203.0.113.70]")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                &format!("{name}-1"),
                name,
                "IPv4",
                &p,
                &[ep(&c.pod(pod).ip)],
            ),
        ])
    };
    let (a, b) = (
        claim("a-claim", "10.96.0.90", "a"),
        claim("b-claim", "10.96.0.91", "b"),
    );
    c.write_manifest("a.yaml", &a);
    c.start_agent();
    // b-claim arrives last: a data plane that let the latest write win would give
    // it the externalIP.
    c.write_manifest("b.yaml", &b);
    assert!(
        ferry_tests::cluster::poll(WAIT, || {
            c.tcp(From::Pod("client"), "10.96.0.91:80", 3).pods() == ["b"]
        }),
        "b-claim is programmed, with its ClusterIP"
    );
    let r = c.tcp(From::Pod("client"), "203.0.113.70:80", 10);
    assert_eq!(
        r.pods(),
        ["a"],
        "a-claim sorts first and keeps the externalIP: {r:?}"
    );
    assert!(c.metric("ferry_frontend_conflicts_total").unwrap_or(0.0) >= 1.0);
    c.remove_manifest("a.yaml");
    assert!(
        ferry_tests::cluster::poll(WAIT, || {
            c.tcp(From::Pod("client"), "203.0.113.70:80", 10).pods() == ["b"]
        }),
        "b-claim gets it once a-claim is gone"
    );
}

/// `ferry status` tells what the agent does, read from the running agent: its mode
/// and why, its source, the syncs, what the data plane holds, warnings.
fn status_reports_the_running_agent(mode: Mode) {
    let c = web_cluster(mode);
    c.write_manifest("broken.yaml", "kind: [not yaml\n");
    let status = |args: &[&str]| {
        let out = c
            .node_command(c.bin("ferry"))
            .arg("status")
            .args(args)
            .output()
            .expect("ferry status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let invalid = || -> u64 {
        let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).expect("JSON");
        json["invalid_objects"].as_u64().unwrap_or(0)
    };
    assert!(
        ferry_tests::cluster::poll(WAIT, || invalid() >= 1),
        "the broken file is counted"
    );
    let json: serde_json::Value = serde_json::from_str(&status(&["--json"])).expect("JSON");
    assert_eq!(json["mode"], mode.flag(), "{json}");
    assert_eq!(
        json["mode_reason"],
        format!("--mode {}", mode.flag()),
        "{json}"
    );
    assert_eq!(json["source_synced"], true, "{json}");
    // web: http and dns, in two families.
    assert_eq!(json["plans"], 4, "{json}");
    assert!(
        json["last_full_sync"]["took_ms"].as_f64().is_some(),
        "{json}"
    );
    assert_eq!(json["failures_in_a_row"], 0, "{json}");
    let text = status(&[]);
    assert!(
        text.contains(&format!("mode:            {}", mode.flag())),
        "{text}"
    );
    assert!(text.contains("(synced)"), "{text}");
    assert!(text.contains("programmed:"), "{text}");
    assert!(text.contains("invalid objects skipped"), "{text}");
    // This machine's kernel runs every mode.
    assert!(
        text.contains("cgroup sock_addr eBPF programs: yes") && text.contains("nf_tables: yes"),
        "{text}"
    );
    if mode == Mode::Ebpf {
        // Fill levels against the maps' sizes (the defaults here).
        assert!(text.contains(" of 65536 frontends ("), "{text}");
        assert!(text.contains(" of 262144 backends ("), "{text}");
    }
}

/// `ferry explain` tells, from the running agent, which endpoints a port uses and
/// why the others are left out, and what the data plane holds for it; the traffic
/// agrees with it.
fn explain_names_each_endpoints_fate(mode: Mode) {
    let mut c = Cluster::new(mode, &["a", "b", "c", "client"]);
    let p = [port("http", "TCP", 8080)];
    let not_ready = ep(&c.pod("b").ip).conditions(false, false, false);
    let draining = ep(&c.pod("c").ip).conditions(false, true, true);
    c.write_manifest(
        "web.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.30")
                .port(port("http", "TCP", 80))
                .port(port("admin", "TCP", 9000))
                .yaml(),
            slice(
                "web-1",
                "web",
                "IPv4",
                &p,
                &[ep(&c.pod("a").ip), not_ready, draining],
            ),
        ]),
    );
    c.start_agent();
    let r = c.tcp(From::Pod("client"), "10.96.0.30:80", 10);
    assert_eq!(r.pods(), ["a"], "only the ready endpoint serves: {r:?}");
    let explain = |args: &[&str]| {
        c.node_command(c.bin("ferry"))
            .arg("explain")
            .args(args)
            .output()
            .expect("ferry explain")
    };
    let out = explain(&["default/web", "--port", "http"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let b = format!("{}:8080 on node-a: not ready", c.pod("b").ip);
    let c_ep = format!("{}:8080 on node-a: serving, terminating", c.pod("c").ip);
    for wanted in [
        "port default/web:http TCP IPv4",
        "frontend       ClusterIP 10.96.0.30:80/TCP",
        "ClusterIP      FORWARD (Cluster policy): balanced across 1 endpoint(s)",
        &b,
        &c_ep,
        "NOT used: terminating: used only when no endpoint is ready",
    ] {
        assert!(text.contains(wanted), "{wanted:?} missing in\n{text}");
    }
    assert!(
        !text.contains("default/web:admin"),
        "--port keeps one port:\n{text}"
    );
    let programmed = match mode {
        Mode::Ebpf => {
            "programmed     eBPF frontend 10.96.0.30:80 protocol 6: forward to 1 backend(s)"
        }
        Mode::Iptables => "programmed     iptables nat chains: KUBE-SVC-",
        Mode::Nftables => "programmed     ip ferry map service-ips: 10.96.0.30 . tcp . 80",
    };
    assert!(
        text.contains(programmed),
        "{programmed:?} missing in\n{text}"
    );

    let out = explain(&["default/web", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let admin = &json["ports"][1];
    assert_eq!(admin["port"], "default/web:admin", "{json}");
    assert_eq!(
        admin["internal"]["action"], "reject",
        "no endpoint has the admin port: {json}"
    );
    let r = c.tcp_with(From::Pod("client"), "10.96.0.30:9000", 1, 1000, 0);
    assert_eq!(r.error("refused"), 1, "and the kernel refuses it: {r:?}");

    let out = explain(&["default/nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no service default/nope"), "{err}");
}

ferry_tests::scenarios!(
    clusterip_tcp_from_pod_and_node,
    clusterip_ipv6,
    clusterip_udp_replies_come_from_the_service,
    tcp_peer_is_the_cluster_ip,
    long_lived_udp_flow_follows_endpoint_removal,
    connected_udp_flow_follows_endpoint_removal,
    connected_udp_flow_moves_after_a_restart_that_missed_the_change,
    udp_flow_moves_after_a_restart_that_missed_the_change,
    nodeport_from_external_client,
    nodeport_follows_a_new_node_address,
    detect_local_by_interface_prefix_keeps_pod_sources,
    load_balancer_source_ranges_apply_to_pods,
    no_endpoints_refuses_immediately,
    endpoint_and_port_changes_take_effect,
    deleting_a_service_stops_it,
    invalid_manifests_next_to_valid_ones,
    service_proxy_name_and_headless_labels_are_not_proxied,
    sctp_port_without_kernel_support_is_skipped,
    localhost_nodeports_do_not_expose_the_node_loopback,
    hostile_names_cannot_inject,
    session_affinity_sticks,
    local_internal_policy_without_local_endpoints_drops,
    load_balancer_health_check_follows_local_endpoints,
    health_and_metrics_endpoints,
    session_affinity_expires,
    session_affinity_moves_off_a_removed_backend,
    killed_agent_keeps_serving_and_restarts_without_disruption,
    unexposed_port_is_not_delivered,
    cleanup_removes_everything,
    an_external_ip_claimed_twice_goes_to_one_service,
    status_reports_the_running_agent,
    explain_names_each_endpoints_fate,
);

/// kube-proxy's nftables mode drops traffic to an address of a ServiceCIDR that no
/// service holds (and rejects unknown ports of allocated ones); so does Ferry's.
#[test]
fn nftables_drops_traffic_to_unallocated_cluster_ips() {
    let c = web_cluster(Mode::Nftables);
    // Past the node, the router holds the address with nothing listening: a
    // connection Ferry lets through is reset at once, one it drops times out.
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", "10.96.7.7/32", "dev", "lo"],
    ] {
        let status = c.ext_command("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?}");
    }
    let unallocated = "10.96.7.7:80";
    let before = c.tcp_with(From::Pod("client"), unallocated, 1, 500, 0);
    c.write_manifest(
        "service-cidr.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: ServiceCIDR\nmetadata:\n  name: kubernetes\nspec:\n  cidrs: [10.96.0.0/16, \"fd00:96::/108\"]\n",
    );
    c.wait_for(
        "the ServiceCIDR programmed",
        Duration::from_secs(10),
        || c.node_rules().contains("10.96.0.0/16"),
    );
    let after = c.tcp_with(From::Pod("client"), unallocated, 1, 500, 0);
    assert_eq!(after.error("timeout"), 1, "dropped: {after:?}");
    assert_ne!(before.error("timeout"), 1, "not dropped before: {before:?}");
    let port = c.tcp_with(From::Pod("client"), "10.96.0.10:8080", 1, 500, 0);
    assert_eq!(
        port.error("refused"),
        1,
        "an allocated ClusterIP still rejects: {port:?}"
    );
    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 10);
    assert_eq!(r.successes(), 10, "services are untouched: {r:?}");
}
