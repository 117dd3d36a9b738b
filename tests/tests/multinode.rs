//! Services across nodes: several nodes in network namespaces, each with its own
//! agent, pods on a routed CNI, and an external client on the underlay (see
//! `ferry_tests::multinode`). Each scenario is named after the kube-proxy behaviour
//! it mirrors and runs against each data plane; it asserts what a client sees: which
//! backend answered, and the source address that backend saw.

use std::time::Duration;

use ferry_tests::manifests::{Service, docs, port, slice};
use ferry_tests::multinode::{EXT_IP, EXT_IP6, From, MultiNode, addr, node_ip, node_ip6};
use ferry_tests::{Mode, Report};

/// Connect timeout for attempts that must not get through: long enough that a slow
/// answer is not taken for a drop.
const DROP_TIMEOUT_MS: u64 = 1500;

/// How long an agent may take to apply a manifest change.
const SETTLE: Duration = Duration::from_secs(30);

/// `count` TCP connections from `from` to `to`, repeated until exactly the pods
/// `want` answered every one (or [`SETTLE`] passes); the last report.
fn tcp_until_pods(c: &MultiNode, from: From<'_>, to: &str, count: u32, want: &[&str]) -> Report {
    c.settle(
        SETTLE,
        || c.tcp(from, to, count),
        |r| r.successes() == count && r.pods() == want,
    )
}

/// Attempts from `from` to `to` until none gets through and every one fails with
/// `error` (`timeout` for a drop, `refused` for a reject); the last report.
fn tcp_until_error(c: &MultiNode, from: From<'_>, to: &str, error: &str) -> Report {
    c.settle(
        SETTLE,
        || c.tcp_with(from, to, 2, DROP_TIMEOUT_MS),
        |r| r.successes() == 0 && r.error(error) == 2,
    )
}

/// A pod on node-0 reaches a backend on node-1 through the ClusterIP, over the
/// underlay; pod-to-pod traffic is not masqueraded (the source is in the cluster
/// CIDR), so the backend sees the client pod's own address, and replies come from
/// the ClusterIP.
fn clusterip_to_an_endpoint_on_another_node(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["client"], &["b"]]);
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
            slice("web-v4", "web", "IPv4", &ports, &[c.ep("b")]),
            slice("web-v6", "web", "IPv6", &ports, &[c.ep6("b")]),
        ]),
    );
    c.start_agents();
    let client = c.pod("client");

    let r = c.tcp(From::Pod("client"), "10.96.0.10:80", 20);
    assert_eq!(r.successes(), 20, "{r:?}");
    assert_eq!(r.single(), "b 8080", "{r:?}");
    assert_eq!(r.sources(), [client.ip.as_str()], "no SNAT: {r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        ["10.96.0.10:80"],
        "{r:?}"
    );

    let r = c.udp(From::Pod("client"), "10.96.0.10:53", 10);
    assert_eq!(r.successes(), 10, "{r:?}");
    assert_eq!(r.single(), "b 5353", "{r:?}");
    assert_eq!(r.sources(), [client.ip.as_str()], "no SNAT: {r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        ["10.96.0.10:53"],
        "{r:?}"
    );

    let r = c.tcp(From::Pod("client"), "[fd00:96::10]:80", 10);
    assert_eq!(r.successes(), 10, "{r:?}");
    assert_eq!(r.single(), "b 8080", "{r:?}");
    assert_eq!(r.sources(), [client.ip6.as_str()], "no SNAT: {r:?}");
}

/// A NodePort Service with externalTrafficPolicy Cluster answers on every node and
/// balances over the endpoints of all nodes; the forwarding node masquerades, so
/// every backend sees that node's address, and the replies find their way back.
fn nodeport_cluster_policy_via_any_node(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"]]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "np.yaml",
        &docs(&[
            Service::new("np")
                .cluster_ip("10.96.0.20")
                .spec("type: NodePort")
                .port(port("http", "TCP", 80).node_port(30080))
                .yaml(),
            slice("np-1", "np", "IPv4", &ports, &[c.ep("a"), c.ep("b")]),
        ]),
    );
    c.start_agents();
    for n in 0..2 {
        let via = node_ip(n);
        let r = c.tcp(From::External, &addr(&via, 30080), 40);
        assert_eq!(r.successes(), 40, "via node-{n}: {r:?}");
        assert_eq!(
            r.pods(),
            ["a", "b"],
            "via node-{n}: endpoints on both nodes: {r:?}"
        );
        assert_eq!(
            r.sources(),
            [via.as_str()],
            "via node-{n}: SNAT to the forwarding node: {r:?}"
        );
        assert_eq!(
            r.peers.keys().cloned().collect::<Vec<_>>(),
            [addr(&via, 30080)],
            "{r:?}"
        );
    }
}

/// externalTrafficPolicy Local: a node only sends external traffic to its own
/// endpoints, without SNAT (the backend sees the client); a node without one drops
/// it (a timeout, not a refusal, so the load balancer's retry goes elsewhere), and
/// the healthCheckNodePort tells load balancers which nodes have local endpoints.
fn nodeport_local_policy_keeps_the_client_ip(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"], &[]]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "lb.yaml",
        &docs(&[
            Service::new("lb")
                .cluster_ip("10.96.0.30")
                .spec("type: LoadBalancer")
                .spec("externalTrafficPolicy: Local")
                .spec("healthCheckNodePort: 32030")
                .port(port("http", "TCP", 80).node_port(30030))
                .yaml(),
            slice("lb-1", "lb", "IPv4", &ports, &[c.ep("a"), c.ep("b")]),
        ]),
    );
    c.start_agents();
    for (n, local) in [(0, "a 8080"), (1, "b 8080")] {
        let r = c.tcp(From::External, &addr(&node_ip(n), 30030), 20);
        assert_eq!(r.successes(), 20, "via node-{n}: {r:?}");
        assert_eq!(
            r.single(),
            local,
            "via node-{n}: only the local endpoint: {r:?}"
        );
        assert_eq!(
            r.sources(),
            [EXT_IP],
            "via node-{n}: the client's own IP: {r:?}"
        );
    }
    let r = c.tcp_with(
        From::External,
        &addr(&node_ip(2), 30030),
        2,
        DROP_TIMEOUT_MS,
    );
    assert_eq!(r.successes(), 0, "via node-2 (no local endpoint): {r:?}");
    assert_eq!(
        r.error("timeout"),
        2,
        "via node-2: dropped (timed out), not refused: {r:?}"
    );

    for (n, want_code, want_local) in [(0, 200, 1), (1, 200, 1), (2, 503, 0)] {
        let probe = addr(&node_ip(n), 32030).parse().expect("address");
        let (code, response) = c
            .http_get_external(probe, "/healthz")
            .unwrap_or_else(|| panic!("node-{n}: the health check must answer"));
        assert_eq!(code, want_code, "node-{n}: {response}");
        assert!(
            response.contains(&format!("\"localEndpoints\":{want_local}")),
            "node-{n}: {response}"
        );
    }
}

/// A Service's externalIPs and its load balancer's ingress IPs
/// (`status.loadBalancer.ingress`) answer on the service port at whichever node the
/// network routes them to (here ext routes each IP to one node, as a router or a
/// cloud load balancer would); with externalTrafficPolicy Cluster they balance over
/// the endpoints of all nodes, masqueraded to the node that took the packet.
fn external_and_load_balancer_ips_from_outside(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"]]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "lb.yaml",
        &docs(&[
            Service::new("lb")
                .cluster_ip("10.96.0.40")
                .spec("type: LoadBalancer")
                .spec("externalIPs: [203.0.113.10]")
                .port(port("http", "TCP", 80).node_port(30040))
                .status("loadBalancer: {ingress: [{ip: 203.0.113.20}]}")
                .yaml(),
            slice("lb-1", "lb", "IPv4", &ports, &[c.ep("a"), c.ep("b")]),
        ]),
    );
    c.ext_ip_batch(&[
        format!("route add 203.0.113.10/32 via {}", node_ip(0)),
        format!("route add 203.0.113.20/32 via {}", node_ip(1)),
    ]);
    c.start_agents();
    for (ip, via) in [("203.0.113.10", node_ip(0)), ("203.0.113.20", node_ip(1))] {
        let r = c.tcp(From::External, &addr(ip, 80), 40);
        assert_eq!(r.successes(), 40, "{ip}: {r:?}");
        assert_eq!(r.pods(), ["a", "b"], "{ip}: endpoints on both nodes: {r:?}");
        assert_eq!(
            r.sources(),
            [via.as_str()],
            "{ip}: SNAT to the node it reached: {r:?}"
        );
        assert_eq!(
            r.peers.keys().cloned().collect::<Vec<_>>(),
            [addr(ip, 80)],
            "{ip}: replies come from the IP the client dialled: {r:?}"
        );
    }
}

/// loadBalancerSourceRanges: traffic to the load balancer IP is accepted only from
/// the listed client CIDRs and dropped from anywhere else.
fn load_balancer_source_ranges_allow_and_deny(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"]]);
    let ports = [port("http", "TCP", 8080)];
    let lb = |name: &str, cluster_ip: &str, lb_ip: &str, node_port: u16, range: &str| {
        docs(&[
            Service::new(name)
                .cluster_ip(cluster_ip)
                .spec("type: LoadBalancer")
                .spec(&format!("loadBalancerSourceRanges: [{range}]"))
                .port(port("http", "TCP", 80).node_port(node_port))
                .status(&format!("loadBalancer: {{ingress: [{{ip: {lb_ip}}}]}}"))
                .yaml(),
            slice(
                &format!("{name}-1"),
                name,
                "IPv4",
                &ports,
                &[c.ep("a"), c.ep("b")],
            ),
        ])
    };
    c.write_manifest(
        "allowed.yaml",
        &lb(
            "allowed",
            "10.96.0.51",
            "203.0.113.51",
            30051,
            &format!("{EXT_IP}/32"),
        ),
    );
    c.write_manifest(
        "denied.yaml",
        &lb(
            "denied",
            "10.96.0.52",
            "203.0.113.52",
            30052,
            "192.0.2.0/24",
        ),
    );
    c.ext_ip_batch(&[
        format!("route add 203.0.113.51/32 via {}", node_ip(0)),
        format!("route add 203.0.113.52/32 via {}", node_ip(0)),
    ]);
    c.start_agents();
    let r = c.tcp(From::External, "203.0.113.51:80", 20);
    assert_eq!(
        r.successes(),
        20,
        "the client is in the allowed range: {r:?}"
    );
    assert_eq!(r.pods(), ["a", "b"], "{r:?}");
    let r = c.tcp_with(From::External, "203.0.113.52:80", 2, DROP_TIMEOUT_MS);
    assert_eq!(
        r.successes(),
        0,
        "the client is outside the allowed range: {r:?}"
    );
    assert_eq!(r.error("timeout"), 2, "dropped, not refused: {r:?}");
}

/// internalTrafficPolicy Local: a pod only reaches the endpoints on its own node;
/// on a node without one, the connection is dropped (not refused: endpoints exist,
/// just not here).
fn internal_traffic_policy_local_stays_on_the_node(mode: Mode) {
    let mut c = MultiNode::new(
        mode,
        &[&["a", "client-0"], &["b", "client-1"], &["client-2"]],
    );
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "loc.yaml",
        &docs(&[
            Service::new("loc")
                .cluster_ip("10.96.0.60")
                .spec("internalTrafficPolicy: Local")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice("loc-1", "loc", "IPv4", &ports, &[c.ep("a"), c.ep("b")]),
        ]),
    );
    c.start_agents();
    for (client, local) in [("client-0", "a 8080"), ("client-1", "b 8080")] {
        let r = c.tcp(From::Pod(client), "10.96.0.60:80", 20);
        assert_eq!(r.successes(), 20, "{client}: {r:?}");
        assert_eq!(
            r.single(),
            local,
            "{client}: only its node's endpoint: {r:?}"
        );
        assert_eq!(r.sources(), [c.pod(client).ip.as_str()], "{client}: {r:?}");
    }
    let r = c.tcp_with(From::Pod("client-2"), "10.96.0.60:80", 2, DROP_TIMEOUT_MS);
    assert_eq!(r.successes(), 0, "client-2 (no local endpoint): {r:?}");
    assert_eq!(r.error("refused"), 0, "dropped, not refused: {r:?}");
}

/// A pod dialling the load balancer IP of an externalTrafficPolicy Local Service is
/// not external traffic: kube-proxy short-circuits it to all the Service's
/// endpoints, so it works from a node with no local endpoint, where the same
/// Service's NodePort drops external clients.
fn load_balancer_ip_from_a_pod_uses_every_endpoint(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"], &["client"]]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "lb.yaml",
        &docs(&[
            Service::new("lb")
                .cluster_ip("10.96.0.70")
                .spec("type: LoadBalancer")
                .spec("externalTrafficPolicy: Local")
                .spec("healthCheckNodePort: 32070")
                .port(port("http", "TCP", 80).node_port(30070))
                .status("loadBalancer: {ingress: [{ip: 203.0.113.70}]}")
                .yaml(),
            slice("lb-1", "lb", "IPv4", &ports, &[c.ep("a"), c.ep("b")]),
        ]),
    );
    c.ext_ip_batch(&[format!("route add 203.0.113.70/32 via {}", node_ip(0))]);
    c.start_agents();
    let r = c.tcp(From::Pod("client"), "203.0.113.70:80", 30);
    assert_eq!(r.successes(), 30, "{r:?}");
    assert_eq!(
        r.pods(),
        ["a", "b"],
        "every endpoint, though none is local: {r:?}"
    );
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        ["203.0.113.70:80"],
        "{r:?}"
    );
    // From outside, the node the load balancer IP is routed to answers with its
    // local endpoint only, and keeps the client's address.
    let r = c.tcp(From::External, "203.0.113.70:80", 10);
    assert_eq!(r.single(), "a 8080", "{r:?}");
    assert_eq!(r.sources(), [EXT_IP], "{r:?}");
}

/// Topology Aware Routing: kube-proxy narrows a Service's cluster-wide endpoints to
/// those whose `hints.forZones` name the node's zone, and with PreferSameNode
/// (`hints.forNodes`) to those hinted for the node itself; hints are used only when
/// every ready endpoint has them and at least one names this node (or zone),
/// otherwise they are ignored entirely (upstream `pkg/proxy/topology.go`,
/// `topologyModeFromHints`). Nodes 0 and 1 share zone-a, node 2 is in zone-b.
fn topology_hints_for_zones_and_nodes(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a0", "c0"], &["a1", "c1"], &["b2", "c2"]]);
    c.set_zones(&["zone-a", "zone-a", "zone-b"]);
    let ports = [port("http", "TCP", 8080)];
    let write = |c: &MultiNode, eps: &[ferry_tests::manifests::Endpoint]| {
        c.write_manifest(
            "topo.yaml",
            &docs(&[
                Service::new("topo")
                    .cluster_ip("10.96.0.80")
                    .spec("trafficDistribution: PreferClose")
                    .port(port("http", "TCP", 80))
                    .yaml(),
                slice("topo-1", "topo", "IPv4", &ports, eps),
            ]),
        );
    };
    let vip = "10.96.0.80:80";
    let check = |c: &MultiNode, phase: &str, want: [(&str, &[&str]); 3]| {
        for (client, pods) in want {
            let r = tcp_until_pods(c, From::Pod(client), vip, 30, pods);
            assert_eq!(r.successes(), 30, "{phase}: {client}: {r:?}");
            assert_eq!(r.pods(), pods, "{phase}: {client}: {r:?}");
            assert_eq!(
                r.sources(),
                [c.pod(client).ip.as_str()],
                "{phase}: {client}: {r:?}"
            );
        }
    };

    // Zone hints as the EndpointSlice controller allocates them: each zone gets
    // the endpoints hinted for it, wherever they run.
    write(
        &c,
        &[
            c.ep("a0").for_zones(&["zone-a"]),
            c.ep("a1").for_zones(&["zone-a"]),
            c.ep("b2").for_zones(&["zone-b"]),
        ],
    );
    c.start_agents();
    check(
        &c,
        "zone hints",
        [
            ("c0", &["a0", "a1"]),
            ("c1", &["a0", "a1"]),
            ("c2", &["b2"]),
        ],
    );

    // One ready endpoint without hints: every node ignores hints.
    write(
        &c,
        &[
            c.ep("a0").for_zones(&["zone-a"]),
            c.ep("a1").for_zones(&["zone-a"]),
            c.ep("b2"),
        ],
    );
    let all: &[&str] = &["a0", "a1", "b2"];
    check(
        &c,
        "one endpoint without hints",
        [("c0", all), ("c1", all), ("c2", all)],
    );

    // Every endpoint hinted, none for zone-b: zone-b's node ignores hints, zone-a's
    // nodes still use them.
    write(
        &c,
        &[
            c.ep("a0").for_zones(&["zone-a"]),
            c.ep("a1").for_zones(&["zone-a"]),
            c.ep("b2").for_zones(&["zone-c"]),
        ],
    );
    check(
        &c,
        "no endpoint hinted for zone-b",
        [("c0", &["a0", "a1"]), ("c1", &["a0", "a1"]), ("c2", all)],
    );

    // PreferSameNode: node hints (with zone hints beside them, as the controller
    // writes both) win over zone hints.
    write(
        &c,
        &[
            c.ep("a0").for_zones(&["zone-a"]).for_nodes(&["node-0"]),
            c.ep("a1").for_zones(&["zone-a"]).for_nodes(&["node-1"]),
            c.ep("b2").for_zones(&["zone-b"]).for_nodes(&["node-2"]),
        ],
    );
    check(
        &c,
        "node hints",
        [("c0", &["a0"]), ("c1", &["a1"]), ("c2", &["b2"])],
    );

    // No endpoint hinted for node-1: that node falls back to the zone hints (not to
    // every endpoint: b2 is hinted for zone-b only).
    write(
        &c,
        &[
            c.ep("a0").for_zones(&["zone-a"]).for_nodes(&["node-0"]),
            c.ep("a1").for_zones(&["zone-a"]).for_nodes(&["node-0"]),
            c.ep("b2").for_zones(&["zone-b"]).for_nodes(&["node-2"]),
        ],
    );
    check(
        &c,
        "no endpoint hinted for node-1",
        [
            ("c0", &["a0", "a1"]),
            ("c1", &["a0", "a1"]),
            ("c2", &["b2"]),
        ],
    );
}

/// ProxyTerminatingEndpoints (KEP-1669): endpoints that are terminating but still
/// serving (`ready: false, serving: true, terminating: true`) get no traffic while a
/// ready endpoint exists, and get it when only they remain, for Cluster policy and,
/// per node, for externalTrafficPolicy Local (upstream `CategorizeEndpoints` in
/// `pkg/proxy/topology.go`). A terminating endpoint that no longer serves never gets
/// traffic: a Service with nothing else rejects connections, and a Local NodePort on
/// a node without a usable endpoint drops them while other nodes have one.
///
/// node-0 runs the ready endpoint `r` and the client, node-1 the serving-terminating
/// `t`, node-2 the terminating, not serving `n`.
fn terminating_endpoints_are_used_only_as_a_fallback(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["r", "client"], &["t"], &["n"]]);
    let ports = [port("http", "TCP", 8080)];
    let write = |c: &MultiNode, eps: &[ferry_tests::manifests::Endpoint]| {
        c.write_manifest(
            "term.yaml",
            &docs(&[
                Service::new("term")
                    .cluster_ip("10.96.0.81")
                    .spec("type: NodePort")
                    .spec("externalTrafficPolicy: Local")
                    .port(port("http", "TCP", 80).node_port(30081))
                    .yaml(),
                slice("term-1", "term", "IPv4", &ports, eps),
            ]),
        );
    };
    let vip = "10.96.0.81:80";
    let via = |n: usize| addr(&node_ip(n), 30081);
    let t = c.ep("t").conditions(false, true, true);
    let n = c.ep("n").conditions(false, false, true);

    write(&c, &[c.ep("r"), t.clone(), n.clone()]);
    c.start_agents();
    let r = tcp_until_pods(&c, From::Pod("client"), vip, 20, &["r"]);
    assert_eq!(r.pods(), ["r"], "a ready endpoint exists: only it: {r:?}");
    assert_eq!(r.successes(), 20, "{r:?}");
    // Local policy falls back per node: node-1 has no ready local endpoint but a
    // serving-terminating one, so it uses it although `r` is ready elsewhere.
    let r = tcp_until_pods(&c, From::External, &via(1), 10, &["t"]);
    assert_eq!(
        r.pods(),
        ["t"],
        "via node-1: its serving-terminating endpoint: {r:?}"
    );
    assert_eq!(r.sources(), [EXT_IP], "via node-1: no SNAT (Local): {r:?}");
    let r = tcp_until_pods(&c, From::External, &via(0), 10, &["r"]);
    assert_eq!(r.pods(), ["r"], "via node-0: its ready endpoint: {r:?}");
    let r = tcp_until_error(&c, From::External, &via(2), "timeout");
    assert_eq!(r.successes(), 0, "via node-2: `n` does not serve: {r:?}");
    assert_eq!(
        r.error("timeout"),
        2,
        "via node-2: dropped, not refused: {r:?}"
    );

    // Only terminating endpoints left: the serving one takes the traffic.
    write(&c, &[t.clone(), n.clone()]);
    let r = tcp_until_pods(&c, From::Pod("client"), vip, 20, &["t"]);
    assert_eq!(r.pods(), ["t"], "Cluster policy falls back to `t`: {r:?}");
    assert_eq!(r.successes(), 20, "{r:?}");
    assert_eq!(r.sources(), [c.pod("client").ip.as_str()], "{r:?}");
    let r = tcp_until_pods(&c, From::External, &via(1), 10, &["t"]);
    assert_eq!(r.pods(), ["t"], "via node-1: {r:?}");
    assert_eq!(r.sources(), [EXT_IP], "via node-1: {r:?}");
    for n in [0, 2] {
        let r = tcp_until_error(&c, From::External, &via(n), "timeout");
        assert_eq!(
            r.successes(),
            0,
            "via node-{n}: no usable local endpoint: {r:?}"
        );
        assert_eq!(r.error("timeout"), 2, "via node-{n}: dropped: {r:?}");
    }

    // Only the endpoint that no longer serves: the Service has no usable endpoint
    // anywhere, so it rejects, from a pod and at every node's NodePort.
    write(&c, &[n]);
    let r = tcp_until_error(&c, From::Pod("client"), vip, "refused");
    assert_eq!(r.successes(), 0, "`n` does not serve: {r:?}");
    assert_eq!(r.error("refused"), 2, "no endpoints: refused: {r:?}");
    for n in 0..3 {
        let r = tcp_until_error(&c, From::External, &via(n), "refused");
        assert_eq!(r.successes(), 0, "via node-{n}: {r:?}");
        assert_eq!(
            r.error("refused"),
            2,
            "via node-{n}: no endpoints: refused: {r:?}"
        );
    }
}

/// An endpoint moves from node-0 to node-1 (its pod on node-0 replaced by one on
/// node-1): with externalTrafficPolicy Local, external traffic follows it. node-1
/// starts answering with its new local endpoint (keeping the client's address), and
/// node-0 drops while the old pod is still up and reachable, so no stale rule is
/// left; the health check moves with it.
fn endpoint_moving_between_nodes(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"]]);
    let ports = [port("http", "TCP", 8080)];
    let write = |c: &MultiNode, ep: ferry_tests::manifests::Endpoint| {
        c.write_manifest(
            "mv.yaml",
            &docs(&[
                Service::new("mv")
                    .cluster_ip("10.96.0.82")
                    .spec("type: LoadBalancer")
                    .spec("externalTrafficPolicy: Local")
                    .spec("healthCheckNodePort: 32082")
                    .port(port("http", "TCP", 80).node_port(30082))
                    .yaml(),
                slice("mv-1", "mv", "IPv4", &ports, &[ep]),
            ]),
        );
    };
    let via = |n: usize| addr(&node_ip(n), 30082);
    let health = |c: &MultiNode, n: usize| {
        let probe = addr(&node_ip(n), 32082).parse().expect("address");
        c.http_get_external(probe, "/healthz").map(|(code, _)| code)
    };

    write(&c, c.ep("a"));
    c.start_agents();
    let r = tcp_until_pods(&c, From::External, &via(0), 10, &["a"]);
    assert_eq!(r.pods(), ["a"], "before the move, via node-0: {r:?}");
    assert_eq!(r.sources(), [EXT_IP], "{r:?}");
    let r = tcp_until_error(&c, From::External, &via(1), "timeout");
    assert_eq!(r.error("timeout"), 2, "before the move, via node-1: {r:?}");

    write(&c, c.ep("b"));
    let r = tcp_until_pods(&c, From::External, &via(1), 10, &["b"]);
    assert_eq!(r.successes(), 10, "after the move, via node-1: {r:?}");
    assert_eq!(r.pods(), ["b"], "after the move, via node-1: {r:?}");
    assert_eq!(r.sources(), [EXT_IP], "after the move, via node-1: {r:?}");
    let r = tcp_until_error(&c, From::External, &via(0), "timeout");
    assert_eq!(r.successes(), 0, "after the move, via node-0: {r:?}");
    assert_eq!(
        r.error("timeout"),
        2,
        "after the move, via node-0: dropped: {r:?}"
    );
    c.wait_for("the health check to follow", SETTLE, || {
        health(&c, 0) == Some(503) && health(&c, 1) == Some(200)
    });
}

/// One Service port number over two protocols with different target ports
/// (53/TCP -> 5353, 53/UDP -> 5354, as a DNS server's Service often has): each
/// protocol reaches its own target, from a pod on another node. The backend also
/// serves UDP on 5353, so a UDP packet sent to the TCP port's target would be
/// answered and seen.
fn same_port_over_tcp_and_udp_with_different_targets(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["client"], &["b"]]);
    c.serve_in_pod("b", &[5353], &[5354]);
    c.write_manifest(
        "dns.yaml",
        &docs(&[
            Service::new("dns")
                .cluster_ip("10.96.0.83")
                .port(port("dns-tcp", "TCP", 53))
                .port(port("dns", "UDP", 53))
                .yaml(),
            slice(
                "dns-1",
                "dns",
                "IPv4",
                &[port("dns-tcp", "TCP", 5353), port("dns", "UDP", 5354)],
                &[c.ep("b")],
            ),
        ]),
    );
    c.start_agents();
    let client = c.pod("client").ip.clone();
    let r = c.tcp(From::Pod("client"), "10.96.0.83:53", 10);
    assert_eq!(r.successes(), 10, "TCP: {r:?}");
    assert_eq!(r.single(), "b 5353", "TCP goes to 5353: {r:?}");
    assert_eq!(r.sources(), [client.as_str()], "{r:?}");
    let r = c.udp(From::Pod("client"), "10.96.0.83:53", 10);
    assert_eq!(r.successes(), 10, "UDP: {r:?}");
    assert_eq!(r.single(), "b 5354", "UDP goes to 5354: {r:?}");
    assert_eq!(r.sources(), [client.as_str()], "{r:?}");
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        ["10.96.0.83:53"],
        "{r:?}"
    );
}

/// An IPv6 Service answers external clients as an IPv4 one does: on its NodePort
/// at every node's IPv6 address, and on its externalIPs and load balancer ingress
/// IPs where the network routes them; with externalTrafficPolicy Cluster it
/// balances over the endpoints of all nodes, masqueraded to the IPv6 address of the
/// node that took the packet.
fn ipv6_nodeport_external_ips_and_load_balancer_ips(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"]]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "lb6.yaml",
        &docs(&[
            Service::new("lb6")
                .cluster_ip("fd00:96::84")
                .spec("type: LoadBalancer")
                .spec("ipFamilies: [IPv6]")
                .spec("ipFamilyPolicy: SingleStack")
                .spec("externalIPs: [\"2001:db8::10\"]")
                .port(port("http", "TCP", 80).node_port(30084))
                .status("loadBalancer: {ingress: [{ip: \"2001:db8::20\"}]}")
                .yaml(),
            slice("lb6-1", "lb6", "IPv6", &ports, &[c.ep6("a"), c.ep6("b")]),
        ]),
    );
    c.ext_ip_batch(&[
        format!("route add 2001:db8::10/128 via {}", node_ip6(0)),
        format!("route add 2001:db8::20/128 via {}", node_ip6(1)),
    ]);
    c.start_agents();
    let targets = [
        (addr(&node_ip6(0), 30084), node_ip6(0)),
        (addr(&node_ip6(1), 30084), node_ip6(1)),
        (addr("2001:db8::10", 80), node_ip6(0)),
        (addr("2001:db8::20", 80), node_ip6(1)),
    ];
    for (to, node) in targets {
        let r = tcp_until_pods(&c, From::External, &to, 40, &["a", "b"]);
        assert_eq!(r.successes(), 40, "{to}: {r:?}");
        assert_eq!(r.pods(), ["a", "b"], "{to}: endpoints on both nodes: {r:?}");
        assert_eq!(r.sources(), [node.as_str()], "{to}: SNAT to {node}: {r:?}");
        assert_eq!(
            r.peers.keys().map(String::as_str).collect::<Vec<_>>(),
            [to.as_str()],
            "{to}: replies come from the address dialled: {r:?}"
        );
        assert_ne!(r.sources(), [EXT_IP6], "{to}: {r:?}");
    }
}

/// Hairpin: a pod that is its Service's only endpoint reaches itself through the
/// ClusterIP and through the NodePort on its own node, and gets its answer.
/// kube-proxy's iptables mode masquerades hairpin traffic (KUBE-SEP's
/// `-s <endpoint> -j KUBE-MARK-MASQ`, and NodePort traffic with Cluster policy is
/// masqueraded anyway), so the pod sees the connection come from its node and the
/// reply returns through the node's conntrack. The eBPF data plane legitimately
/// differs for the ClusterIP: its socket hook connects the pod straight to its own
/// address, so the pod sees itself as the source.
fn hairpin_through_cluster_ip_and_node_port(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["h"], &["other"]]);
    let ports = [port("http", "TCP", 8080), port("dns", "UDP", 5353)];
    c.write_manifest(
        "hp.yaml",
        &docs(&[
            Service::new("hp")
                .cluster_ip("10.96.0.85")
                .spec("type: NodePort")
                .port(port("http", "TCP", 80).node_port(30085))
                .port(port("dns", "UDP", 53).node_port(30085))
                .yaml(),
            slice("hp-1", "hp", "IPv4", &ports, &[c.ep("h")]),
        ]),
    );
    c.start_agents();
    let own = c.pod("h").ip.clone();
    let node = node_ip(0);
    let r = c.tcp(From::Pod("h"), "10.96.0.85:80", 10);
    assert_eq!(r.successes(), 10, "ClusterIP: {r:?}");
    assert_eq!(r.single(), "h 8080", "{r:?}");
    let want = match mode {
        Mode::Iptables | Mode::Nftables => &node,
        Mode::Ebpf => &own,
    };
    assert_eq!(r.sources(), [want.as_str()], "ClusterIP: {r:?}");
    let r = c.udp(From::Pod("h"), "10.96.0.85:53", 10);
    assert_eq!(r.successes(), 10, "ClusterIP UDP: {r:?}");
    assert_eq!(r.single(), "h 5353", "{r:?}");
    assert_eq!(r.sources(), [want.as_str()], "ClusterIP UDP: {r:?}");

    let r = c.tcp(From::Pod("h"), &addr(&node, 30085), 10);
    assert_eq!(r.successes(), 10, "NodePort: {r:?}");
    assert_eq!(r.single(), "h 8080", "{r:?}");
    assert_ne!(r.sources(), [own.as_str()], "NodePort: masqueraded: {r:?}");
}

/// Load balancer ingress IPs with `ipMode: Proxy` (kube-proxy 1.30+,
/// LoadBalancerIPMode): the load balancer proxies to the nodes itself, so kube-proxy
/// does not program that IP and traffic to it goes to the load balancer, even from
/// a pod; an ingress IP with the default `ipMode: VIP` is programmed as usual
/// (upstream `pkg/proxy/serviceport.go`, `newBaseServiceInfo`). Here ext is the load
/// balancer and owns the Proxy IP.
fn load_balancer_ip_mode_proxy_is_left_to_the_load_balancer(mode: Mode) {
    let mut c = MultiNode::new(mode, &[&["a"], &["b"], &["client"]]);
    let ports = [port("http", "TCP", 8080)];
    c.write_manifest(
        "lb.yaml",
        &docs(&[
            Service::new("lb")
                .cluster_ip("10.96.0.86")
                .spec("type: LoadBalancer")
                .port(port("http", "TCP", 80).node_port(30086))
                .status(
                    "loadBalancer: {ingress: [{ip: 203.0.113.86, ipMode: VIP}, \
                     {ip: 203.0.113.87, ipMode: Proxy}]}",
                )
                .yaml(),
            slice("lb-1", "lb", "IPv4", &ports, &[c.ep("a"), c.ep("b")]),
        ]),
    );
    c.ext_ip_batch(&[
        "addr add 203.0.113.87/32 dev br0".to_string(),
        format!("route add 203.0.113.86/32 via {}", node_ip(0)),
        format!("route add 10.244.2.0/24 via {}", node_ip(2)),
    ]);
    c.serve_external("load-balancer", &[80], &[]);
    c.start_agents();
    let r = c.tcp(From::Pod("client"), "203.0.113.86:80", 30);
    assert_eq!(r.successes(), 30, "VIP: {r:?}");
    assert_eq!(r.pods(), ["a", "b"], "VIP: programmed: {r:?}");
    let r = c.tcp(From::Pod("client"), "203.0.113.87:80", 10);
    assert_eq!(r.successes(), 10, "Proxy: {r:?}");
    assert_eq!(
        r.single(),
        "load-balancer 80",
        "Proxy: the connection goes to the load balancer: {r:?}"
    );
    assert_eq!(r.sources(), [c.pod("client").ip.as_str()], "{r:?}");
}

ferry_tests::scenarios!(
    clusterip_to_an_endpoint_on_another_node,
    nodeport_cluster_policy_via_any_node,
    nodeport_local_policy_keeps_the_client_ip,
    external_and_load_balancer_ips_from_outside,
    load_balancer_source_ranges_allow_and_deny,
    internal_traffic_policy_local_stays_on_the_node,
    load_balancer_ip_from_a_pod_uses_every_endpoint,
    topology_hints_for_zones_and_nodes,
    terminating_endpoints_are_used_only_as_a_fallback,
    endpoint_moving_between_nodes,
    same_port_over_tcp_and_udp_with_different_targets,
    ipv6_nodeport_external_ips_and_load_balancer_ips,
    hairpin_through_cluster_ip_and_node_port,
    load_balancer_ip_mode_proxy_is_left_to_the_load_balancer,
);
