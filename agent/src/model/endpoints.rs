//! Every endpoint selection the node makes, in one place: which endpoints of a service
//! port the data plane balances across (kube-proxy's `CategorizeEndpoints`: the
//! ready -> serving+terminating fallback, topology hints, cluster vs local sets), which
//! endpoints DNS publishes for a headless service, and which count for a load
//! balancer's health check. Data planes, DNS and the health servers read these results
//! and never select endpoints themselves.

use std::collections::HashMap;
use std::net::IpAddr;

use super::node::NodeInfo;
use super::service::ServiceInfo;
use super::slice::{EndpointInfo, SliceInfo};
use super::store::ClusterState;
use super::types::{Endpoint, IpFamily, Protocol, ServiceName};

/// One deduplicated endpoint of a service port, with what selection needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub endpoint: Endpoint,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Runs on this node.
    pub local: bool,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl Candidate {
    /// Kube-proxy's preference when two slices list the same address: a
    /// non-terminating copy wins, then a local one.
    fn preferred_over(&self, other: &Candidate) -> bool {
        (other.terminating && !self.terminating)
            || (other.terminating == self.terminating && self.local && !other.local)
    }

    /// Usable when no ready endpoint exists (kube-proxy's terminating fallback).
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// The deduplicated endpoints of one service port in one family, sorted by address:
/// the join of the service port with its slices' ports by name and protocol.
pub fn candidates(
    state: &ClusterState,
    service: &ServiceName,
    family: IpFamily,
    port: (&str, Protocol),
) -> Vec<Candidate> {
    let node = &state.node().name;
    let mut by_endpoint: HashMap<Endpoint, Candidate> = HashMap::new();
    for slice in state.slices_of(service).filter(|s| s.family == family) {
        let Some(number) = slice.port(port.0, port.1) else {
            continue;
        };
        for ep in &slice.endpoints {
            let candidate = Candidate {
                endpoint: Endpoint {
                    ip: ep.address(),
                    port: number,
                },
                ready: ep.ready,
                serving: ep.serving,
                terminating: ep.terminating,
                local: ep.node_name.as_ref() == Some(node),
                zone_hints: ep.zone_hints.clone(),
                node_hints: ep.node_hints.clone(),
            };
            match by_endpoint.get(&candidate.endpoint) {
                Some(existing) if !candidate.preferred_over(existing) => {}
                _ => {
                    by_endpoint.insert(candidate.endpoint, candidate);
                }
            }
        }
    }
    let mut out: Vec<Candidate> = by_endpoint.into_values().collect();
    out.sort_by_key(|c| c.endpoint);
    out
}

/// Endpoints a headless service publishes in DNS: the ready ones, or every one with
/// `publishNotReadyAddresses` (DNS specification 2.4.1).
pub fn dns_published<'a>(
    svc: &'a ServiceInfo,
    slices: &'a [&'a SliceInfo],
) -> impl Iterator<Item = &'a EndpointInfo> + 'a {
    slices
        .iter()
        .flat_map(|slice| &slice.endpoints)
        .filter(|ep| ep.ready || svc.publish_not_ready_addresses)
}

/// Distinct ready endpoint addresses of `service` on this node: what a load
/// balancer's health check counts. Terminating endpoints are not ready, so a node
/// whose pods are going away drains.
pub fn local_ready_addresses(state: &ClusterState, service: &ServiceName) -> usize {
    let node = &state.node().name;
    let mut addresses: Vec<IpAddr> = state
        .slices_of(service)
        .flat_map(|slice| &slice.endpoints)
        .filter(|ep| ep.ready && ep.node_name.as_ref() == Some(node))
        .map(EndpointInfo::address)
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses.len()
}

/// The endpoint sets a service port's traffic policies choose from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// Endpoints for `Cluster` traffic policy (after topology hints).
    pub cluster: Vec<Endpoint>,
    /// Endpoints on this node for `Local` traffic policy.
    pub local: Vec<Endpoint>,
    /// Some endpoint anywhere can serve: telling "drop" (usable elsewhere) from
    /// "reject" (nothing at all).
    pub has_any: bool,
    /// Every endpoint that still serves, ready or terminating, sorted: established
    /// UDP flows to these are kept (kube-proxy's conntrack reconciler).
    pub serving: Vec<Endpoint>,
}

/// Splits endpoints into cluster-wide and node-local sets, as kube-proxy does.
/// `uses_cluster`/`uses_local` say which policies the service needs at all.
pub fn categorize(
    endpoints: &[Candidate],
    node: &NodeInfo,
    uses_cluster: bool,
    uses_local: bool,
) -> Categorized {
    let mut serving = pick(endpoints, |ep| ep.ready || ep.serving_terminating());
    serving.sort();
    serving.dedup();
    let mut out = Categorized {
        serving,
        ..Categorized::default()
    };
    if uses_cluster {
        let mode = topology_mode(endpoints, node);
        out.cluster = endpoints
            .iter()
            .filter(|ep| ep.ready && mode.allows(ep, node))
            .map(|ep| ep.endpoint)
            .collect();
        // No ready endpoint anywhere (topology was already ignored if it would have
        // left none): fall back to endpoints that still serve while terminating.
        if out.cluster.is_empty() {
            out.cluster = endpoints
                .iter()
                .filter(|ep| ep.serving_terminating())
                .map(|ep| ep.endpoint)
                .collect();
        }
        out.has_any = !out.cluster.is_empty();
    }
    if uses_local {
        let mut local_ready = false;
        let mut local_serving_terminating = false;
        for ep in endpoints {
            if ep.ready {
                out.has_any = true;
                local_ready |= ep.local;
            } else if ep.serving_terminating() {
                out.has_any = true;
                local_serving_terminating |= ep.local;
            }
        }
        if local_ready {
            out.local = pick(endpoints, |ep| ep.local && ep.ready);
        } else if local_serving_terminating {
            out.local = pick(endpoints, |ep| ep.local && ep.serving_terminating());
        }
    }
    out
}

fn pick(endpoints: &[Candidate], keep: impl Fn(&Candidate) -> bool) -> Vec<Endpoint> {
    endpoints
        .iter()
        .filter(|ep| keep(ep))
        .map(|ep| ep.endpoint)
        .collect()
}

/// Which hints narrow the cluster-wide set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyMode {
    None,
    Node,
    Zone,
}

impl TopologyMode {
    /// Whether `ep` may be in the cluster-wide set under this mode.
    pub fn allows(self, ep: &Candidate, node: &NodeInfo) -> bool {
        match self {
            Self::None => true,
            Self::Node => ep.node_hints.contains(&node.name),
            Self::Zone => node
                .zone
                .as_ref()
                .is_some_and(|zone| ep.zone_hints.iter().any(|z| z == zone)),
        }
    }
}

/// Hints are used only when every ready endpoint carries them and at least one names
/// this node (or zone); otherwise they are ignored entirely, so hints never leave a
/// node with nothing.
pub fn topology_mode(endpoints: &[Candidate], node: &NodeInfo) -> TopologyMode {
    let mut all_node_hints = true;
    let mut has_for_node = false;
    let mut all_zone_hints = true;
    let mut has_for_zone = false;
    let mut any_ready = false;
    for ep in endpoints.iter().filter(|ep| ep.ready) {
        any_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if ep.node_hints.contains(&node.name) {
            has_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|zone| ep.zone_hints.iter().any(|z| z == zone))
        {
            has_for_zone = true;
        }
    }
    if !any_ready {
        TopologyMode::None
    } else if all_node_hints && has_for_node {
        TopologyMode::Node
    } else if all_zone_hints && has_for_zone {
        TopologyMode::Zone
    } else {
        TopologyMode::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(ip: &str) -> Candidate {
        Candidate {
            endpoint: Endpoint {
                ip: ip.parse().unwrap(),
                port: 80,
            },
            ready: true,
            serving: true,
            terminating: false,
            local: false,
            zone_hints: vec![],
            node_hints: vec![],
        }
    }

    fn terminating(mut c: Candidate, serving: bool) -> Candidate {
        c.ready = false;
        c.serving = serving;
        c.terminating = true;
        c
    }

    fn local(mut c: Candidate) -> Candidate {
        c.local = true;
        c
    }

    fn zone(mut c: Candidate, z: &str) -> Candidate {
        c.zone_hints = vec![z.into()];
        c
    }

    fn ips(backends: &[Endpoint]) -> Vec<String> {
        backends.iter().map(|b| b.ip.to_string()).collect()
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: "node-a".into(),
            zone: Some("z1".into()),
            addresses: vec![],
            leaving: false,
            pod_cidrs: vec![],
        }
    }

    #[test]
    fn cluster_uses_ready_only() {
        let eps = [ep("10.0.0.1"), terminating(ep("10.0.0.2"), true)];
        let c = categorize(&eps, &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert!(c.has_any);
    }

    #[test]
    fn cluster_falls_back_to_serving_terminating() {
        let eps = [
            terminating(ep("10.0.0.1"), true),
            terminating(ep("10.0.0.2"), false),
            {
                let mut e = ep("10.0.0.3");
                e.ready = false;
                e.serving = false;
                e
            },
        ];
        let c = categorize(&eps, &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
        assert!(c.has_any);
    }

    #[test]
    fn nothing_usable_means_no_endpoints_at_all() {
        let eps = [terminating(ep("10.0.0.1"), false)];
        let c = categorize(&eps, &node(), true, true);
        assert!(c.cluster.is_empty() && c.local.is_empty() && !c.has_any);
    }

    #[test]
    fn local_prefers_ready_then_serving_terminating() {
        let eps = [
            local(ep("10.0.0.1")),
            local(terminating(ep("10.0.0.2"), true)),
            ep("10.0.0.3"),
        ];
        let c = categorize(&eps, &node(), false, true);
        assert_eq!(ips(&c.local), ["10.0.0.1"]);
        assert!(c.cluster.is_empty());

        let eps = [local(terminating(ep("10.0.0.2"), true)), ep("10.0.0.3")];
        let c = categorize(&eps, &node(), false, true);
        assert_eq!(ips(&c.local), ["10.0.0.2"]);
    }

    #[test]
    fn local_without_local_endpoints_still_knows_others_exist() {
        let eps = [ep("10.0.0.3")];
        let c = categorize(&eps, &node(), false, true);
        assert!(c.local.is_empty());
        assert!(
            c.has_any,
            "a remote ready endpoint exists: DROP, not REJECT"
        );
    }

    #[test]
    fn zone_hints_narrow_the_cluster_set() {
        let eps = [zone(ep("10.0.0.1"), "z1"), zone(ep("10.0.0.2"), "z2")];
        let c = categorize(&eps, &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
    }

    #[test]
    fn zone_hints_ignored_unless_all_ready_endpoints_have_them() {
        let eps = [zone(ep("10.0.0.1"), "z1"), ep("10.0.0.2")];
        let c = categorize(&eps, &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1", "10.0.0.2"]);
    }

    #[test]
    fn zone_hints_ignored_when_none_is_for_this_zone() {
        let eps = [zone(ep("10.0.0.1"), "z2"), zone(ep("10.0.0.2"), "z3")];
        let c = categorize(&eps, &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1", "10.0.0.2"]);
        let mut no_zone = node();
        no_zone.zone = None;
        let eps = [zone(ep("10.0.0.1"), "z1")];
        assert_eq!(
            ips(&categorize(&eps, &no_zone, true, false).cluster),
            ["10.0.0.1"]
        );
    }

    #[test]
    fn node_hints_win_over_zone_hints() {
        let mut a = zone(ep("10.0.0.1"), "z1");
        a.node_hints = vec!["node-a".into()];
        let mut b = zone(ep("10.0.0.2"), "z1");
        b.node_hints = vec!["node-b".into()];
        let c = categorize(&[a, b], &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
    }

    #[test]
    fn hints_of_unready_endpoints_do_not_count() {
        let mut unready = ep("10.0.0.2");
        unready.ready = false;
        let eps = [zone(ep("10.0.0.1"), "z2"), unready];
        let c = categorize(&eps, &node(), true, false);
        assert_eq!(ips(&c.cluster), ["10.0.0.1"]);
    }
}
