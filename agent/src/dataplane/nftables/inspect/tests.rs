use super::*;

/// `nft -j list table ip ferry` of a small table with own chains (nft 1.0.6).
const LISTING: &str = include_str!("../testdata/list-table.json");

fn find<'a>(views: &'a [FrontendView], address: &str) -> &'a FrontendView {
    let found = views.iter().find(|v| v.address == address);
    found.unwrap_or_else(|| panic!("{address} not in {views:?}"))
}

#[test]
fn frontends_follow_the_maps_to_their_chains_dnat_targets() {
    let views = frontends_of(LISTING).expect("parses");
    let web = find(&views, "10.96.0.10:80");
    assert_eq!(
        (web.kind, web.action, web.protocol),
        ("ClusterIP", "forward", "TCP")
    );
    assert_eq!(web.backends, ["10.244.0.10:8080", "10.244.0.11:8080"]);
    assert_eq!(web.affinity_timeout_seconds, Some(600));
    let external = find(&views, "192.0.2.10:80");
    assert_eq!(external.kind, "External");
    assert_eq!(external.backends, web.backends, "through ext-* to svc-*");
    let node_port = find(&views, "*:30080");
    assert_eq!((node_port.kind, node_port.action), ("NodePort", "forward"));
    assert_eq!(node_port.backends, web.backends);
}

#[test]
fn refused_frontends_say_how() {
    let views = frontends_of(LISTING).expect("parses");
    let reject = find(&views, "10.96.0.11:53");
    assert_eq!((reject.action, reject.protocol), ("reject", "UDP"));
    assert!(reject.backends.is_empty());
    assert_eq!(find(&views, "10.96.0.12:80").action, "drop");
    assert_eq!(views.len(), 5);
}

#[test]
fn set_elements_read_back_as_written() {
    let json = r#"{"nftables": [{"metainfo": {}}, {"set": {"name": "node-local-dns",
        "elem": [{"concat": ["10.96.0.10", "tcp", 53]}, {"concat": ["10.96.0.10", "udp", 53]}]}}]}"#;
    assert_eq!(
        set_elements(json).expect("parses"),
        ["10.96.0.10 . tcp . 53", "10.96.0.10 . udp . 53"]
    );
    let plain = r#"{"nftables": [{"set": {"elem": ["10.0.0.1"]}}]}"#;
    assert_eq!(set_elements(plain).expect("parses"), ["10.0.0.1"]);
    assert!(set_elements("not json").is_err());
}

#[test]
fn shared_chain_frontends_read_their_endpoints_from_the_endpoint_maps() {
    let json = include_str!("../testdata/list-table-shared.json");
    let views = frontends_of(json).expect("parses");
    let web = find(&views, "10.96.0.20:80");
    assert_eq!((web.kind, web.action), ("ClusterIP", "forward"));
    assert_eq!(web.backends, ["10.244.0.20:8080", "10.244.0.21:8080"]);
    assert_eq!(find(&views, "192.0.2.20:80").kind, "External");
    let node_port = find(&views, "*:30090");
    assert_eq!(node_port.kind, "NodePort");
    assert_eq!(
        node_port.backends,
        ["10.244.0.21:8080", "10.244.0.20:8080"],
        "in index order"
    );
}
