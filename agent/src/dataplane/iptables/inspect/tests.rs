use super::*;

/// `iptables-save` of a node with a ClientIP-affinity service (two endpoints, an
/// externalIP, a NodePort with Local policy), one without endpoints, and one whose
/// NodePort has none on this node.
const NAT: &str = r#"*nat
:KUBE-SERVICES - [0:0]
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-AAA
-A KUBE-SERVICES -d 192.0.2.10/32 -p tcp -m comment --comment "default/web:http external IP" -m tcp --dport 80 -j KUBE-EXT-AAA
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ
-A KUBE-SERVICES -d fd00::10/128 -p udp -m comment --comment "kube-system/dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-DNS
-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-AAA
-A KUBE-EXT-AAA -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-AAA -j KUBE-SVC-AAA
-A KUBE-SVC-AAA -m comment --comment "default/web:http -> 10.244.0.10:8080" -m recent --rcheck --seconds 10800 --reap --name KUBE-SEP-ONE --mask 255.255.255.255 --rsource -j KUBE-SEP-ONE
-A KUBE-SVC-AAA -m comment --comment "default/web:http -> 10.244.0.10:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ONE
-A KUBE-SVC-AAA -m comment --comment "default/web:http -> 10.244.0.11:8080" -j KUBE-SEP-TWO
-A KUBE-SEP-ONE -s 10.244.0.10/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-ONE -p tcp -m comment --comment "default/web:http" -m recent --set --name KUBE-SEP-ONE --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.0.10:8080
-A KUBE-SEP-TWO -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.0.11:8080
-A KUBE-SVC-DNS -m comment --comment "kube-system/dns:dns -> [fd00::53]:53" -j KUBE-SEP-SIX
-A KUBE-SEP-SIX -p udp -m comment --comment "kube-system/dns:dns" -m udp -j DNAT --to-destination [fd00::53]:53
COMMIT
"#;

const FILTER: &str = r#"*filter
-A KUBE-SERVICES -d 10.96.0.11/32 -p tcp -m comment --comment "default/empty:http has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
-A KUBE-EXTERNAL-SERVICES -p tcp -m comment --comment "default/local:http has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 30082 -j DROP
-A KUBE-EXTERNAL-SERVICES -d 192.0.2.12/32 -p tcp -m comment --comment "default/\"odd\":http has no endpoints" -m tcp --dport 80 -j REJECT
COMMIT
"#;

fn inspection() -> Inspection {
    let mut rules = RuleSet::default();
    for (table, text) in [("nat", NAT), ("filter", FILTER)] {
        for line in text.lines() {
            rules.add_line(table, line);
        }
    }
    rules.inspection()
}

fn find<'a>(view: &'a Inspection, kind: &str, address: &str) -> &'a FrontendView {
    view.frontends
        .iter()
        .find(|f| f.kind == kind && f.address == address)
        .unwrap_or_else(|| panic!("no {kind} {address} in {view:#?}"))
}

#[test]
fn frontends_backends_and_affinity_are_read_from_the_chains() {
    let view = inspection();
    let web = find(&view, "ClusterIP", "10.96.0.10:80");
    assert_eq!(web.action, "forward");
    assert_eq!(web.protocol, "TCP");
    assert_eq!(web.service.as_deref(), Some("default/web:http"));
    assert_eq!(web.affinity_timeout_seconds, Some(10800));
    assert_eq!(web.backends, ["10.244.0.10:8080", "10.244.0.11:8080"]);
    // The externalIP and the NodePort reach the same backends through KUBE-EXT.
    let external = find(&view, "External", "192.0.2.10:80");
    assert_eq!(external.backends, web.backends);
    let node_port = find(&view, "NodePort", "*:30080");
    assert_eq!(node_port.service.as_deref(), Some("default/web:http"));
    assert_eq!(node_port.backends, web.backends);
    let dns = find(&view, "ClusterIP", "[fd00::10]:53");
    assert_eq!(dns.protocol, "UDP");
    assert_eq!(dns.backends, ["[fd00::53]:53"]);
    assert_eq!(dns.affinity_timeout_seconds, None);
    assert_eq!(view.backends, 3);
    // The masquerade rule with the same comment is not a second frontend.
    assert_eq!(view.frontends.len(), 7, "{view:#?}");
}

#[test]
fn refusals_come_from_the_filter_table() {
    let view = inspection();
    let empty = find(&view, "ClusterIP", "10.96.0.11:80");
    assert_eq!(empty.action, "reject");
    assert!(empty.backends.is_empty());
    assert_eq!(empty.service.as_deref(), Some("default/empty:http"));
    let local = find(&view, "NodePort", "*:30082");
    assert_eq!(local.action, "drop");
    let odd = find(&view, "External", "192.0.2.12:80");
    assert_eq!(odd.service.as_deref(), Some("default/\"odd\":http"));
}

#[test]
fn words_keep_quoted_blanks_and_escapes() {
    assert_eq!(
        split_words(r#"X -m comment --comment "a b \"c\"" -j Y"#),
        ["X", "-m", "comment", "--comment", "a b \"c\"", "-j", "Y"]
    );
    assert_eq!(split_words("  "), Vec::<String>::new());
    assert_eq!(split_words(r#"--comment """#), ["--comment", ""]);
}
