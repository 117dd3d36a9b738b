//! `ferry explain`: for one service, what this node does with each of its ports and
//! why, in words an operator can act on. It reads the decisions the model already
//! made (the [`NodePlan`] and its frontend claims) next to the facts they were made
//! from (endpoint conditions, nodes, hints); it decides nothing itself, so it cannot
//! disagree with what is programmed.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::endpoints::{Candidate, TopologyMode, candidates, topology_mode};
use super::node::NodeInfo;
use super::plan::{NodePlan, PlanKey, ServicePortPlan, Traffic};
use super::service::{ServiceInfo, ServicePortSpec, ServiceType};
use super::store::ClusterState;
use super::types::{Endpoint, IpFamily, ServiceName, ServicePortName};

/// Everything `ferry explain` says about one service on this node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceExplanation {
    /// `namespace/name`.
    pub service: String,
    pub node: String,
    pub zone: Option<String>,
    pub service_type: String,
    /// Why the node programs nothing for the service, when it does not.
    pub not_proxied: Option<String>,
    /// Changes that arrived after the last sync are not programmed yet: the
    /// endpoint facts may be newer than the decisions.
    pub changes_pending: bool,
    pub ports: Vec<PortExplanation>,
}

/// One service port in one IP family.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortExplanation {
    /// The plan this explains (to ask the data plane what it programmed for it).
    #[serde(skip)]
    pub key: Option<PlanKey>,
    /// `namespace/name:port`, as kube-proxy names a service port.
    pub port: String,
    pub protocol: String,
    pub family: String,
    /// Addresses traffic reaches this port on, e.g. `ClusterIP 10.96.0.10:80`.
    pub frontends: Vec<String>,
    /// Frontends it asked for that another service port owns.
    pub lost_frontends: Vec<String>,
    /// Why nothing is programmed for the port, when nothing is.
    pub not_programmed: Option<String>,
    pub load_balancer_source_ranges: Vec<String>,
    pub affinity_timeout_seconds: Option<u32>,
    /// The kube-dns port answered by this node's DNS server.
    pub node_local_dns: bool,
    /// ClusterIP traffic.
    pub internal: Option<Verdict>,
    /// Traffic from outside (NodePort, externalIPs, load-balancer IPs).
    pub external: Option<Verdict>,
    /// Whether and how topology hints narrow the cluster-wide set.
    pub topology: String,
    pub endpoints: Vec<EndpointExplanation>,
    /// What the data plane holds for the port (its own words, e.g. chain names).
    pub programmed: Vec<String>,
}

/// What happens to one kind of traffic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// `Cluster` or `Local`.
    pub policy: String,
    /// `forward`, `reject` or `drop`.
    pub action: String,
    pub why: String,
}

/// One endpoint, and whether each endpoint set of the port uses it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointExplanation {
    /// `ip:port`.
    pub address: String,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `ready`, `serving, terminating`, `not ready` ...
    pub conditions: String,
    /// The cluster-wide set, when some traffic of the service uses it.
    pub cluster: Option<Usage>,
    /// This node's set, when a `Local` policy uses it.
    pub local: Option<Usage>,
}

/// Whether an endpoint set uses an endpoint, and why (not).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub used: bool,
    pub why: String,
}

/// Explains `name` (only its ports named or numbered `port`, when given); `None`
/// when the model has no such service.
pub fn explain(
    state: &ClusterState,
    plan: &NodePlan,
    name: &ServiceName,
    port: Option<&str>,
) -> Option<ServiceExplanation> {
    let svc = state.service(name)?;
    let node = state.node();
    let mut out = ServiceExplanation {
        service: name.to_string(),
        node: node.name.clone(),
        zone: node.zone.clone(),
        service_type: type_name(&svc.service_type).into(),
        not_proxied: not_proxied(svc),
        changes_pending: state.has_changes(),
        ports: Vec::new(),
    };
    if out.not_proxied.is_some() {
        return Some(out);
    }
    let wanted = |p: &&ServicePortSpec| port.is_none_or(|w| p.name == w || p.port.to_string() == w);
    for &cluster_ip in &svc.cluster_ips {
        for spec in svc.ports.iter().filter(wanted) {
            out.ports
                .push(explain_port(state, plan, svc, spec, cluster_ip));
        }
    }
    Some(out)
}

fn type_name(t: &ServiceType) -> &'static str {
    match t {
        ServiceType::ClusterIp => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
        ServiceType::ExternalName(_) => "ExternalName",
    }
}

/// Why a service is not proxied at all ([`ServiceInfo::is_proxied`]'s cases).
fn not_proxied(svc: &ServiceInfo) -> Option<String> {
    if let ServiceType::ExternalName(target) = &svc.service_type {
        return Some(format!(
            "type ExternalName: DNS answers a CNAME to {target}; nothing is proxied"
        ));
    }
    if svc.headless {
        return Some(
            "headless (clusterIP: None): DNS returns the endpoints; nothing is proxied".into(),
        );
    }
    if svc.foreign_proxy {
        return Some("labelled service.kubernetes.io/service-proxy-name or service.kubernetes.io/headless: not this proxy's service".into());
    }
    if svc.cluster_ips.is_empty() {
        return Some("no ClusterIP allocated yet".into());
    }
    None
}

fn explain_port(
    state: &ClusterState,
    plan: &NodePlan,
    svc: &ServiceInfo,
    spec: &ServicePortSpec,
    cluster_ip: IpAddr,
) -> PortExplanation {
    let family = IpFamily::of(&cluster_ip);
    let key = PlanKey {
        port: ServicePortName {
            service: svc.name.clone(),
            port: spec.name.clone(),
            protocol: spec.protocol,
        },
        family,
    };
    let found = candidates(state, &svc.name, family, (&spec.name, spec.protocol));
    let programmed = plan.get(&key).map(AsRef::as_ref);
    let at = PortContext {
        svc,
        plan: programmed,
        node: state.node(),
        mode: topology_mode(&found, state.node()),
        placement: placement(state, &svc.name, family),
    };
    let mut out = PortExplanation {
        port: key.port.to_string(),
        protocol: spec.protocol.to_string(),
        family: family.to_string(),
        topology: topology(&found, state.node()),
        lost_frontends: plan
            .frontend_losses(&key)
            .iter()
            .map(|c| format!("{}: owned by {}", c.frontend, c.winner))
            .collect(),
        ..PortExplanation::default()
    };
    out.endpoints = found.iter().map(|c| explain_endpoint(c, &at)).collect();
    match programmed {
        Some(p) => describe_plan(&mut out, svc, p),
        None if state.is_node_address(cluster_ip) => {
            out.not_programmed = Some(format!(
                "its ClusterIP {cluster_ip} is one of this node's own addresses: not programmed, it would capture the node's own traffic"
            ));
        }
        None if !state.supports(spec.protocol) => {
            out.not_programmed = Some(format!(
                "this kernel cannot carry {}: the port is skipped",
                spec.protocol
            ));
        }
        None => {
            out.not_programmed =
                Some("its ClusterIP belongs to another service port (see lost frontends)".into());
        }
    }
    out.key = Some(key);
    out
}

/// The frontends and verdicts of a programmed plan.
fn describe_plan(out: &mut PortExplanation, svc: &ServiceInfo, p: &ServicePortPlan) {
    let protocol = p.key.port.protocol;
    let at = |ip: &IpAddr| format!("{}/{protocol}", std::net::SocketAddr::new(*ip, p.port));
    out.frontends
        .push(format!("ClusterIP {}", at(&p.cluster_ip)));
    if let Some(node_port) = p.node_port {
        out.frontends.push(format!(
            "NodePort {node_port}/{protocol} on the node's NodePort addresses"
        ));
    }
    out.frontends.extend(
        p.external_ips
            .iter()
            .map(|ip| format!("externalIP {}", at(ip))),
    );
    out.frontends.extend(
        p.load_balancer_ips
            .iter()
            .map(|ip| format!("LoadBalancer {}", at(ip))),
    );
    if let Some(port) = p.health_check_node_port.filter(|_| p.external_policy_local) {
        out.frontends.push(format!(
            "healthCheckNodePort {port}/TCP (load balancers' health check)"
        ));
    }
    out.load_balancer_source_ranges = p
        .load_balancer_source_ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    out.affinity_timeout_seconds = p.affinity_timeout_seconds;
    out.node_local_dns = p.node_local_dns;
    out.internal = Some(verdict(p.internal(), p.internal_policy_local));
    if svc.is_externally_accessible() && p.has_external_frontends() {
        out.external = Some(verdict(p.external(), p.external_policy_local));
    }
}

fn verdict(traffic: Traffic<'_>, local_policy: bool) -> Verdict {
    let (policy, set) = match local_policy {
        true => ("Local", "this node's"),
        false => ("Cluster", "the cluster-wide"),
    };
    let (action, why) = match traffic {
        Traffic::Forward(eps) => ("forward", format!("balanced across {} endpoint(s) of {set} set", eps.len())),
        Traffic::Reject => ("reject", "no endpoint anywhere can serve: connections are refused".into()),
        Traffic::Drop => ("drop", "endpoints exist only on other nodes, which the Local policy does not use: packets are dropped".into()),
    };
    Verdict {
        policy: policy.into(),
        action: action.into(),
        why,
    }
}

/// Node and zone of each endpoint address of the service in `family`.
fn placement(
    state: &ClusterState,
    name: &ServiceName,
    family: IpFamily,
) -> HashMap<IpAddr, (Option<String>, Option<String>)> {
    state
        .slices_of(name)
        .filter(|s| s.family == family)
        .flat_map(|s| &s.endpoints)
        .map(|ep| (ep.address(), (ep.node_name.clone(), ep.zone.clone())))
        .collect()
}

/// What an endpoint's explanation is judged against.
struct PortContext<'a> {
    svc: &'a ServiceInfo,
    plan: Option<&'a ServicePortPlan>,
    node: &'a NodeInfo,
    mode: TopologyMode,
    placement: HashMap<IpAddr, (Option<String>, Option<String>)>,
}

fn explain_endpoint(c: &Candidate, at: &PortContext<'_>) -> EndpointExplanation {
    let (svc, plan) = (at.svc, at.plan);
    let (on_node, zone) = at
        .placement
        .get(&c.endpoint.ip)
        .cloned()
        .unwrap_or_default();
    let in_set = |set: fn(&ServicePortPlan) -> &[Endpoint]| {
        plan.is_some_and(|p| set(p).contains(&c.endpoint))
    };
    let cluster_used = in_set(|p| &p.cluster_endpoints);
    let local_used = in_set(|p| &p.local_endpoints);
    EndpointExplanation {
        address: c.endpoint.to_string(),
        conditions: conditions(c).into(),
        cluster: svc
            .uses_cluster_endpoints()
            .then(|| cluster_usage(c, cluster_used, at.mode, at.node)),
        local: svc
            .uses_local_endpoints()
            .then(|| local_usage(c, local_used, on_node.as_deref())),
        node: on_node,
        zone,
    }
}

fn conditions(c: &Candidate) -> &'static str {
    match (c.ready, c.serving, c.terminating) {
        (true, _, _) => "ready",
        (false, true, true) => "serving, terminating",
        (false, false, true) => "terminating, not serving",
        (false, _, false) => "not ready",
    }
}

/// Why the cluster-wide set does (not) use `c` (the rules of
/// [`super::endpoints::categorize`], in words).
fn cluster_usage(c: &Candidate, used: bool, mode: TopologyMode, node: &NodeInfo) -> Usage {
    let why = match (used, c.ready) {
        (true, true) => "ready".to_string(),
        (true, false) => "serving while terminating: used because no endpoint is ready".into(),
        (false, true) => hinted_elsewhere(c, mode, node),
        (false, false) => not_ready(c, "no endpoint is ready"),
    };
    Usage { used, why }
}

/// Why this node's set does (not) use `c`.
fn local_usage(c: &Candidate, used: bool, on_node: Option<&str>) -> Usage {
    let why = match (used, c.local, c.ready) {
        (_, false, _) => format!(
            "on {}: a Local policy uses only this node's endpoints",
            on_node.map_or("no node".into(), |n| format!("node {n}"))
        ),
        (true, true, true) => "ready, on this node".into(),
        (true, true, false) => {
            "serving while terminating: used because no endpoint on this node is ready".into()
        }
        (false, true, true) => "not in the programmed set (a change is pending)".into(),
        (false, true, false) => not_ready(c, "no endpoint on this node is ready"),
    };
    Usage { used, why }
}

/// Why a ready endpoint is left out of the cluster-wide set: the hints of `mode`.
fn hinted_elsewhere(c: &Candidate, mode: TopologyMode, node: &NodeInfo) -> String {
    match mode {
        TopologyMode::Node => format!(
            "topology hints: hinted for node(s) {}, not this one",
            c.node_hints.join(", ")
        ),
        TopologyMode::Zone => format!(
            "topology hints: hinted for zone(s) {}, this node is in {}",
            c.zone_hints.join(", "),
            node.zone.as_deref().unwrap_or("no zone")
        ),
        TopologyMode::None => "not in the programmed set (a change is pending)".into(),
    }
}

fn not_ready(c: &Candidate, fallback_condition: &str) -> String {
    if c.serving && c.terminating {
        format!("terminating: used only when {fallback_condition}")
    } else if c.terminating {
        "terminating and no longer serving".into()
    } else {
        "not ready".into()
    }
}

/// Whether hints narrow the cluster-wide set, in words.
fn topology(found: &[Candidate], node: &NodeInfo) -> String {
    let any_hints = found
        .iter()
        .any(|c| !c.zone_hints.is_empty() || !c.node_hints.is_empty());
    match topology_mode(found, node) {
        TopologyMode::Node => format!("node hints: only endpoints hinted for node {}", node.name),
        TopologyMode::Zone => format!(
            "zone hints: only endpoints hinted for zone {}",
            node.zone.as_deref().unwrap_or_default()
        ),
        TopologyMode::None if any_hints => "hints ignored: they apply only when every ready endpoint has them and one is for this node (or its zone)".into(),
        TopologyMode::None => "no topology hints".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::store::test_state;

    fn explained(objects: &[&str], port: Option<&str>) -> ServiceExplanation {
        let mut state = test_state(objects);
        let mut plan = NodePlan::default();
        let changes = state.take_changes();
        plan.update(&state, &changes.services);
        explain(&state, &plan, &ServiceName::new("ns", "web"), port).expect("service known")
    }

    fn endpoint<'a>(port: &'a PortExplanation, address: &str) -> &'a EndpointExplanation {
        port.endpoints
            .iter()
            .find(|e| e.address == address)
            .unwrap_or_else(|| panic!("{address} not in {port:#?}"))
    }

    const NODE: &str = r#"
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}
"#;

    const LOCAL_NODEPORT: &str = r#"
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30080}, {name: admin, port: 9000, nodePort: 30090}]
"#;

    #[test]
    fn every_endpoint_says_whether_each_set_uses_it_and_why() {
        let slice = r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.0.0.1], nodeName: node-a}
  - {addresses: [10.0.0.2], nodeName: node-b}
  - {addresses: [10.0.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
  - {addresses: [10.0.0.4], nodeName: node-b, conditions: {ready: false}}
"#;
        let e = explained(&[NODE, LOCAL_NODEPORT, slice], Some("http"));
        assert_eq!(e.ports.len(), 1, "--port keeps only the named port");
        let p = &e.ports[0];
        assert_eq!(p.port, "ns/web:http");
        assert!(
            p.frontends
                .iter()
                .any(|f| f == "ClusterIP 10.96.0.10:80/TCP"),
            "{p:#?}"
        );
        assert!(
            p.frontends
                .iter()
                .any(|f| f.starts_with("NodePort 30080/TCP")),
            "{p:#?}"
        );
        assert!(
            p.frontends
                .iter()
                .any(|f| f.starts_with("healthCheckNodePort 32000"))
        );
        let internal = p.internal.as_ref().unwrap();
        assert_eq!(
            (internal.policy.as_str(), internal.action.as_str()),
            ("Cluster", "forward")
        );
        let external = p.external.as_ref().unwrap();
        assert_eq!(
            (external.policy.as_str(), external.action.as_str()),
            ("Local", "forward")
        );

        let local_ready = endpoint(p, "10.0.0.1:8080");
        assert!(local_ready.cluster.as_ref().unwrap().used);
        assert_eq!(
            local_ready.local.as_ref().unwrap().why,
            "ready, on this node"
        );
        let remote = endpoint(p, "10.0.0.2:8080");
        assert!(remote.cluster.as_ref().unwrap().used);
        let remote_local = remote.local.as_ref().unwrap();
        assert!(!remote_local.used);
        assert!(remote_local.why.contains("node node-b"), "{remote_local:?}");
        let terminating = endpoint(p, "10.0.0.3:8080");
        assert_eq!(terminating.conditions, "serving, terminating");
        assert!(!terminating.cluster.as_ref().unwrap().used);
        assert!(
            terminating
                .cluster
                .as_ref()
                .unwrap()
                .why
                .starts_with("terminating: used only when")
        );
        let not_ready = endpoint(p, "10.0.0.4:8080");
        assert_eq!(not_ready.cluster.as_ref().unwrap().why, "not ready");
        assert_eq!(p.topology, "no topology hints");
    }

    #[test]
    fn a_node_without_local_endpoints_drops_and_a_port_without_any_rejects() {
        let slice = r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.2], nodeName: node-b}]
"#;
        let e = explained(&[NODE, LOCAL_NODEPORT, slice], None);
        let http = e.ports.iter().find(|p| p.port == "ns/web:http").unwrap();
        assert_eq!(http.external.as_ref().unwrap().action, "drop");
        let admin = e.ports.iter().find(|p| p.port == "ns/web:admin").unwrap();
        assert_eq!(admin.internal.as_ref().unwrap().action, "reject");
        assert_eq!(admin.external.as_ref().unwrap().action, "reject");
        assert!(admin.endpoints.is_empty(), "the slice has no admin port");
    }

    #[test]
    fn the_terminating_fallback_and_topology_hints_are_named() {
        let svc = r#"
kind: Service
metadata: {name: web, namespace: ns}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
"#;
        let hinted = r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - {addresses: [10.0.0.1], zone: z1, hints: {forZones: [{name: z1}]}}
  - {addresses: [10.0.0.2], zone: z2, hints: {forZones: [{name: z2}]}}
"#;
        let e = explained(&[NODE, svc, hinted], None);
        let p = &e.ports[0];
        assert_eq!(p.topology, "zone hints: only endpoints hinted for zone z1");
        let other_zone = endpoint(p, "10.0.0.2:8080");
        assert_eq!(other_zone.zone.as_deref(), Some("z2"));
        let usage = other_zone.cluster.as_ref().unwrap();
        assert!(!usage.used);
        assert_eq!(
            usage.why,
            "topology hints: hinted for zone(s) z2, this node is in z1"
        );
        assert!(
            p.endpoints.iter().all(|e| e.local.is_none()),
            "no Local policy"
        );

        let draining = r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.3], conditions: {ready: false, serving: true, terminating: true}}]
"#;
        let e = explained(&[NODE, svc, draining], None);
        let usage = e.ports[0].endpoints[0].cluster.clone().unwrap();
        assert!(usage.used);
        assert!(usage.why.contains("no endpoint is ready"), "{usage:?}");
    }

    #[test]
    fn unproxied_services_and_lost_frontends_say_why() {
        let headless = r#"
kind: Service
metadata: {name: web, namespace: ns}
spec: {clusterIP: None, ports: [{port: 80}]}
"#;
        let e = explained(&[headless], None);
        assert!(e.not_proxied.unwrap().starts_with("headless"));
        assert!(e.ports.is_empty());

        let owner = r#"
kind: Service
metadata: {name: aaa, namespace: ns}
spec: {clusterIP: 10.96.0.9, externalIPs: [192.0.2.7], ports: [{port: 80}]}
"#;
        let web = r#"
kind: Service
metadata: {name: web, namespace: ns}
spec: {clusterIP: 10.96.0.10, externalIPs: [192.0.2.7, 192.0.2.8], ports: [{port: 80}]}
"#;
        let e = explained(&[owner, web], None);
        let p = &e.ports[0];
        assert_eq!(p.lost_frontends, ["192.0.2.7:80/TCP: owned by ns/aaa"]);
        assert!(
            p.frontends
                .iter()
                .any(|f| f == "externalIP 192.0.2.8:80/TCP"),
            "{p:#?}"
        );
        assert!(
            !p.frontends.iter().any(|f| f.contains("192.0.2.7")),
            "{p:#?}"
        );
    }
}
