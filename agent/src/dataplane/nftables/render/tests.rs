use super::*;
use crate::model::plan::test_plan;
use crate::model::{Protocol, ServicePortPlan};

fn plan() -> ServicePortPlan {
    test_plan(
        ("ns1", "svc1", "p80"),
        Protocol::Tcp,
        "172.30.0.41",
        80,
        &[
            ("10.180.0.1", 8080),
            ("10.180.0.2", 8080),
            ("10.180.0.3", 8080),
        ],
    )
}

fn ctx() -> FamilyContext {
    FamilyContext {
        family: IpFamily::V4,
        net: NodeNetwork {
            nodeport_ips: vec!["192.168.0.2".parse().unwrap()],
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            local_traffic: LocalTraffic::FromCidrs(vec!["10.0.0.0/8".parse().unwrap()]),
            masquerade_all: false,
            service_cidrs: Vec::new(),
        },
    }
}

fn chain<'a>(out: &'a ServiceObjects, prefix: &str) -> Option<&'a Chain> {
    out.chains.iter().find(|c| c.name.starts_with(prefix))
}

fn elements(out: &ServiceObjects, collection: Collection) -> Vec<String> {
    let of = out.elements.iter().filter(|e| e.collection == collection);
    let mut texts = Vec::new();
    for e in of {
        entries(e.collection, &e.key, &e.value, |t| texts.push(t));
    }
    texts
}

/// The elements the plan puts in the endpoint maps of shared chains of `kind`.
fn endpoint_elements(out: &ServiceObjects, kind: BalancerKind) -> Vec<String> {
    let of_kind = |c: Collection| matches!(c, Collection::Endpoints(b) if b.kind == kind);
    let lists = out.elements.iter().filter(|e| of_kind(e.collection));
    let mut texts = Vec::new();
    for e in lists {
        entries(e.collection, &e.key, &e.value, |t| texts.push(t));
    }
    texts
}

/// The rules of the shared chain of `kind` the plan uses.
fn balancer(out: &ServiceObjects, kind: BalancerKind) -> Chain {
    let b = out.balancers.iter().find(|b| b.kind == kind);
    b.expect("shared chain").chain(Words::of(IpFamily::V4))
}

const SVC: &str = "svc-XPGD46QRK7WJZT7O-ns1/svc1/tcp/p80";

#[test]
fn cluster_ip_goes_to_the_shared_chain_for_its_endpoint_count_and_the_endpoint_map() {
    let out = render_service(&plan(), &ctx());
    assert_eq!(
        elements(&out, Collection::ServiceIps),
        ["172.30.0.41 . tcp . 80 : goto balance-svc-tcp-3"]
    );
    assert_eq!(
        endpoint_elements(&out, BalancerKind::ClusterIp),
        [
            "172.30.0.41 . tcp . 80 . 0 : 10.180.0.1 . 8080",
            "172.30.0.41 . tcp . 80 . 1 : 10.180.0.2 . 8080",
            "172.30.0.41 . tcp . 80 . 2 : 10.180.0.3 . 8080",
        ]
    );
    assert_eq!(elements(&out, Collection::ClusterIps), ["172.30.0.41"]);
    let shared = balancer(&out, BalancerKind::ClusterIp);
    assert_eq!(
        shared.rules,
        [
            "meta l4proto tcp dnat ip to ip daddr . meta l4proto . th dport . numgen random mod 3 map @balance-svc-tcp-3"
        ]
    );
    assert!(out.chains.is_empty(), "no chain of its own");
    assert_eq!(
        elements(&out, Collection::Hairpin),
        [
            "10.180.0.1 . 10.180.0.1",
            "10.180.0.2 . 10.180.0.2",
            "10.180.0.3 . 10.180.0.3"
        ]
    );
}

#[test]
fn no_endpoints_rejects_and_no_local_endpoints_drops() {
    let mut p = plan();
    p.cluster_endpoints.clear();
    p.has_any_endpoints = false;
    p.node_port = Some(30080);
    let out = render_service(&p, &ctx());
    assert_eq!(
        elements(&out, Collection::NoEndpointServices),
        ["172.30.0.41 . tcp . 80 : goto reject-chain"]
    );
    assert_eq!(
        elements(&out, Collection::NoEndpointNodeports),
        ["tcp . 30080 : goto reject-chain"]
    );
    assert!(out.chains.is_empty() && elements(&out, Collection::ServiceIps).is_empty());

    let mut local = plan();
    local.internal_policy_local = true;
    let out = render_service(&local, &ctx());
    assert_eq!(
        elements(&out, Collection::NoEndpointServices),
        ["172.30.0.41 . tcp . 80 : drop"]
    );
}

#[test]
fn node_port_and_external_ips_with_cluster_policy_masquerade_then_balance() {
    let mut p = plan();
    p.node_port = Some(30080);
    p.external_ips = vec!["192.0.2.10".parse().unwrap()];
    p.cluster_endpoints.truncate(1);
    let out = render_service(&p, &ctx());
    assert_eq!(
        elements(&out, Collection::ServiceNodeports),
        ["tcp . 30080 : goto balance-np-tcp-1"]
    );
    assert_eq!(
        endpoint_elements(&out, BalancerKind::NodePort),
        ["tcp . 30080 . 0 : 10.180.0.1 . 8080"]
    );
    assert_eq!(
        balancer(&out, BalancerKind::NodePort).rules,
        [
            "jump mark-for-masquerade",
            "meta l4proto tcp dnat ip to meta l4proto . th dport . numgen random mod 1 map @balance-np-tcp-1"
        ]
    );
    assert_eq!(
        elements(&out, Collection::ServiceIps)[1],
        "192.0.2.10 . tcp . 80 : goto balance-ext-tcp-1"
    );
    assert_eq!(
        balancer(&out, BalancerKind::External).rules[0],
        "jump mark-for-masquerade"
    );
    assert_eq!(out.balancers.len(), 3);
}

#[test]
fn external_local_policy_short_circuits_pods_and_the_node_and_keeps_the_client_address() {
    let mut p = plan();
    p.external_ips = vec!["192.0.2.10".parse().unwrap()];
    p.external_policy_local = true;
    p.local_endpoints = vec![p.cluster_endpoints[0]];
    let out = render_service(&p, &ctx());
    assert!(
        out.balancers.is_empty(),
        "pod traffic is told apart: own chains"
    );
    assert_eq!(
        chain(&out, "svc-").expect("cluster chain").rules,
        [
            "numgen random mod 3 0 meta l4proto tcp dnat to 10.180.0.1:8080",
            "numgen random mod 2 0 meta l4proto tcp dnat to 10.180.0.2:8080",
            "meta l4proto tcp dnat to 10.180.0.3:8080",
        ],
        "rule i of n matches 1/(n-i) of the time: 1/n each"
    );
    let ext = chain(&out, "ext-").expect("external chain");
    let svl = chain(&out, "svl-").expect("local chain");
    assert_eq!(
        ext.rules,
        [
            format!("ip saddr 10.0.0.0/8 goto {SVC}"),
            "fib saddr type local jump mark-for-masquerade".to_owned(),
            format!("fib saddr type local goto {SVC}"),
            format!("goto {}", svl.name),
        ]
    );
    assert_eq!(svl.rules, ["meta l4proto tcp dnat to 10.180.0.1:8080"]);
    assert_eq!(
        elements(&out, Collection::ServiceIps)[1],
        format!("192.0.2.10 . tcp . 80 : goto {}", ext.name)
    );
}

#[test]
fn source_ranges_filter_before_dnat_and_admit_the_node_when_a_range_covers_it() {
    let mut p = plan();
    p.load_balancer_ips = vec!["192.0.2.20".parse().unwrap()];
    p.load_balancer_source_ranges = vec!["192.168.0.0/24".parse().unwrap()];
    let out = render_service(&p, &ctx());
    let fw = chain(&out, "fw-").expect("firewall chain");
    assert_eq!(
        elements(&out, Collection::FirewallIps),
        [format!("192.0.2.20 . tcp . 80 : goto {}", fw.name)]
    );
    assert_eq!(
        fw.rules,
        ["ip saddr { 192.168.0.0/24, 192.0.2.20/32 } return", "drop"]
    );
}

#[test]
fn affinity_remembers_each_client_per_endpoint() {
    let mut p = plan();
    p.cluster_endpoints.truncate(2);
    p.affinity_timeout_seconds = Some(600);
    let out = render_service(&p, &ctx());
    let sets: Vec<&str> = out.affinity_sets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(sets.len(), 2);
    let svc = chain(&out, "svc-").expect("cluster chain");
    let (a, b) = (sets[0], sets[1]);
    assert_eq!(
        svc.rules,
        [
            format!(
                "ip saddr @{a} update @{a} {{ ip saddr }} meta l4proto tcp dnat to 10.180.0.1:8080"
            ),
            format!(
                "ip saddr @{b} update @{b} {{ ip saddr }} meta l4proto tcp dnat to 10.180.0.2:8080"
            ),
            format!(
                "numgen random mod 2 0 update @{a} {{ ip saddr }} meta l4proto tcp dnat to 10.180.0.1:8080"
            ),
            format!("update @{b} {{ ip saddr }} meta l4proto tcp dnat to 10.180.0.2:8080"),
        ]
    );
    assert_eq!(
        out.affinity_sets[0].declaration(Words::of(IpFamily::V4)),
        format!("{a} {{ type ipv4_addr; flags dynamic,timeout; timeout 600s; }}")
    );
}

#[test]
fn ipv6_uses_ip6_words() {
    let mut p = test_plan(
        ("ns1", "svc1", "p80"),
        Protocol::Udp,
        "fd00:30::41",
        53,
        &[("fd00:10::1", 5353)],
    );
    p.key.family = IpFamily::V6;
    let mut c = ctx();
    c.family = IpFamily::V6;
    c.net.local_traffic = LocalTraffic::InInterface("veth+".into());
    let out = render_service(&p, &c);
    assert_eq!(
        endpoint_elements(&out, BalancerKind::ClusterIp),
        ["fd00:30::41 . udp . 53 . 0 : fd00:10::1 . 5353"]
    );
    let shared = out.balancers[0].chain(Words::of(IpFamily::V6));
    assert_eq!(
        shared.rules,
        [
            "meta l4proto udp dnat ip6 to ip6 daddr . meta l4proto . th dport . numgen random mod 1 map @balance-svc-udp-1"
        ]
    );
    let services = services_rules(&c);
    assert_eq!(
        services[0],
        "ip6 daddr @cluster-ips iifname != \"veth*\" jump mark-for-masquerade"
    );
}

#[test]
fn cluster_ip_traffic_from_outside_the_pod_network_is_marked_for_masquerade() {
    assert_eq!(
        services_rules(&ctx()),
        [
            "ip daddr @cluster-ips ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
        ]
    );
    let mut all = ctx();
    all.net.masquerade_all = true;
    assert_eq!(
        services_rules(&all)[0],
        "ip daddr @cluster-ips jump mark-for-masquerade"
    );
    let mut unknown = ctx();
    unknown.net.local_traffic = LocalTraffic::FromCidrs(vec![]);
    assert_eq!(services_rules(&unknown).len(), 2, "cannot tell: no rule");
}

#[test]
fn fixed_part_declares_every_collection_and_guards_loopback_nodeports() {
    let mut c = ctx();
    c.net.nodeport_ips.push("127.0.0.1".parse().unwrap());
    let mut out = String::new();
    let ips = vec!["127.0.0.1".to_owned(), "192.168.0.2".to_owned()];
    write_fixed(&mut out, &c, &[(Collection::NodeportIps, ips)]);
    for collection in Collection::ALL {
        assert!(out.contains(&format!(" {} {{ type", collection.name())));
    }
    assert!(
        out.contains("set nodeport-ips { type ipv4_addr; elements = { 127.0.0.1, 192.168.0.2 }; }")
    );
    assert!(out.contains("ct status & dnat == 0 drop"), "{out}");
    assert!(
        out.contains("set service-cidrs { type ipv4_addr; flags interval; auto-merge; }"),
        "{out}"
    );
    let check = out
        .find("chain cluster-ips-check")
        .expect("cluster-ips-check");
    let (reject, drop) = (
        out[check..].find("@cluster-ips reject").expect("reject"),
        out[check..]
            .find("ip daddr @service-cidrs drop")
            .expect("drop"),
    );
    assert!(
        reject < drop,
        "allocated addresses are rejected, the rest dropped"
    );
    let mut plain = String::new();
    write_fixed(&mut plain, &ctx(), &[]);
    assert!(
        !plain.contains("127.0.0.0/8"),
        "no route_localnet, no guard"
    );
}
