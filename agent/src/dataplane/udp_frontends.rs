//! Which UDP frontends a sync may have left stale flows on, and whether a backend
//! still serves one of them. A UDP flow has no end, so a client keeps sending to the
//! backend it was given until something moves it: kube-proxy deletes the conntrack
//! entry ([`super::conntrack`]); eBPF mode, which translates at `connect()`,
//! terminates the connected socket (`super::ebpf::udp_sockets`). Both decide here,
//! with kube-proxy's rule (`pkg/proxy/conntrack/cleanup.go`): a flow is stale when
//! its backend no longer serves the frontend it was sent to; flows to serving
//! endpoints, terminating ones included, are kept.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::model::{Endpoint, IpFamily, NodePlan, PlanDiff, Protocol, ServicePortPlan, Upsert};

/// UDP frontends to reconcile: service addresses and NodePorts, each with its plan
/// and whether that plan is gone (then no endpoint serves it any more).
#[derive(Default)]
pub struct UdpFrontends<'a> {
    addresses: HashMap<(IpAddr, u16), (&'a ServicePortPlan, bool)>,
    node_ports: HashMap<u16, (&'a ServicePortPlan, bool)>,
}

/// What a reconcile knows of one frontend.
#[derive(Clone, Copy)]
pub struct Reconciled<'a> {
    pub plan: &'a ServicePortPlan,
    /// The plan was removed: nothing serves it.
    pub gone: bool,
}

impl Reconciled<'_> {
    /// Whether `backend` still serves this frontend.
    pub fn serves(&self, backend: &Endpoint) -> bool {
        !self.gone && self.plan.serving_endpoints.binary_search(backend).is_ok()
    }
}

impl<'a> UdpFrontends<'a> {
    /// Every frontend of the plan (a full sync), or only those of the diff's
    /// changes that can leave stale flows, removed ones included, so a partial sync
    /// costs what it changed (and a change that only adds endpoints costs no look at
    /// the flows at all).
    pub fn of(plan: &'a NodePlan, diff: &'a PlanDiff, full: bool) -> Self {
        let mut f = Self::default();
        if full {
            plan.iter().for_each(|p| f.add(p, false));
        } else {
            let upserted = diff.upserted.iter().filter(|u| may_leave_stale_flows(u));
            upserted.for_each(|u| f.add(&u.new, false));
            diff.removed.iter().for_each(|p| f.add(p, true));
        }
        f
    }

    /// Whether a frontend of `family` is to be reconciled.
    pub fn has_family(&self, family: IpFamily) -> bool {
        let addresses = self.addresses.keys().map(|(ip, _)| IpFamily::of(ip));
        let plans = self.node_ports.values().map(|(p, _)| p.key.family);
        addresses.chain(plans).any(|f| f == family)
    }

    /// Whether nothing is to be reconciled.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.node_ports.is_empty()
    }

    /// The service address `ip:port` (a ClusterIP, external or load-balancer IP).
    pub fn address(&self, ip: IpAddr, port: u16) -> Option<Reconciled<'a>> {
        self.addresses
            .get(&(ip, port))
            .map(|&(plan, gone)| Reconciled { plan, gone })
    }

    /// The NodePort `port`, on whichever node address.
    pub fn node_port(&self, port: u16) -> Option<Reconciled<'a>> {
        self.node_ports
            .get(&port)
            .map(|&(plan, gone)| Reconciled { plan, gone })
    }

    /// Whether a flow sent to `ip:port` and translated to `backend` is stale.
    pub fn is_stale_translation(&self, ip: IpAddr, port: u16, backend: &Endpoint) -> bool {
        self.address(ip, port)
            .or_else(|| self.node_port(port))
            .is_some_and(|f| !f.serves(backend))
    }

    fn add(&mut self, p: &'a ServicePortPlan, gone: bool) {
        if p.key.port.protocol != Protocol::Udp {
            return;
        }
        let ips = std::iter::once(&p.cluster_ip)
            .chain(&p.external_ips)
            .chain(&p.load_balancer_ips);
        for ip in ips {
            self.addresses.insert((*ip, p.port), (p, gone));
        }
        if let Some(node_port) = p.node_port {
            self.node_ports.insert(node_port, (p, gone));
        }
    }
}

/// Whether an update can leave a stale flow: a serving endpoint stopped serving, the
/// service got its first serving endpoints (flows sent before were never NATed), or
/// its frontends changed.
fn may_leave_stale_flows(u: &Upsert) -> bool {
    let new = &u.new;
    let Some(old) = &u.old else {
        return !new.serving_endpoints.is_empty();
    };
    let stopped = old
        .serving_endpoints
        .iter()
        .any(|e| new.serving_endpoints.binary_search(e).is_err());
    let first = old.serving_endpoints.is_empty() && !new.serving_endpoints.is_empty();
    let moved = (old.cluster_ip, old.port, old.node_port)
        != (new.cluster_ip, new.port, new.node_port)
        || old.external_ips != new.external_ips
        || old.load_balancer_ips != new.load_balancer_ips;
    stopped || first || moved
}

/// Builders shared by the tests of both reconcilers.
#[cfg(test)]
pub mod test_support {
    use super::*;
    use crate::model::plan::test_plan;

    /// `ns/dns` port 53 (NodePort 30053) with these serving endpoints on 5353.
    pub fn plan(protocol: Protocol, serving: &[&str]) -> ServicePortPlan {
        let endpoints: Vec<(&str, u16)> = serving.iter().map(|ip| (*ip, 5353)).collect();
        let mut plan = test_plan(("ns", "dns", ""), protocol, "10.96.0.10", 53, &endpoints);
        plan.node_port = Some(30053);
        plan.serving_endpoints.sort();
        plan
    }

    pub fn node_plan(plans: Vec<ServicePortPlan>) -> NodePlan {
        let mut node = NodePlan::default();
        node.insert_for_test(plans);
        node
    }

    /// The diff that removes the UDP `dns` service (served by 10.0.0.2).
    pub fn dns_removed() -> PlanDiff {
        PlanDiff {
            removed: vec![std::sync::Arc::new(plan(Protocol::Udp, &["10.0.0.2"]))],
            ..PlanDiff::default()
        }
    }

    /// Every frontend of a plan, as a full sync reconciles them.
    pub fn all(node: &NodePlan) -> UdpFrontends<'_> {
        static NO_DIFF: std::sync::LazyLock<PlanDiff> = std::sync::LazyLock::new(PlanDiff::default);
        UdpFrontends::of(node, &NO_DIFF, true)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::test_support::*;
    use super::*;

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn translations_to_endpoints_that_stopped_serving_are_stale() {
        let node = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2", "10.0.0.3"])]);
        let f = all(&node);
        let cluster_ip = "10.96.0.10".parse().unwrap();
        let node_ip = "172.18.0.2".parse().unwrap();
        assert!(f.is_stale_translation(cluster_ip, 53, &ep("10.0.0.1", 5353)));
        assert!(!f.is_stale_translation(cluster_ip, 53, &ep("10.0.0.2", 5353)));
        assert!(
            f.is_stale_translation(cluster_ip, 53, &ep("10.0.0.2", 9999)),
            "old target port"
        );
        assert!(
            f.is_stale_translation(node_ip, 30053, &ep("10.0.0.1", 5353)),
            "NodePort"
        );
        assert!(!f.is_stale_translation(node_ip, 30053, &ep("10.0.0.3", 5353)));
        let outside = "8.8.8.8".parse().unwrap();
        assert!(
            !f.is_stale_translation(outside, 53, &ep("8.8.8.8", 53)),
            "not a service"
        );
    }

    #[test]
    fn tcp_services_and_unrelated_syncs_need_no_reconcile() {
        let tcp = node_plan(vec![plan(Protocol::Tcp, &["10.0.0.2"])]);
        assert!(all(&tcp).is_empty());
        let diff = |p: Protocol| PlanDiff {
            upserted: vec![Upsert {
                old: None,
                new: Arc::new(plan(p, &["10.0.0.2"])),
            }],
            ..PlanDiff::default()
        };
        let empty = NodePlan::default();
        let udp = diff(Protocol::Udp);
        assert!(!UdpFrontends::of(&empty, &udp, false).is_empty());
        let tcp_diff = diff(Protocol::Tcp);
        assert!(UdpFrontends::of(&empty, &tcp_diff, false).is_empty());
    }

    #[test]
    fn only_changes_that_can_leave_stale_flows_are_reconciled() {
        let change = |old: &[&str], new: &[&str]| {
            let diff = PlanDiff {
                upserted: vec![Upsert {
                    old: Some(Arc::new(plan(Protocol::Udp, old))),
                    new: Arc::new(plan(Protocol::Udp, new)),
                }],
                ..PlanDiff::default()
            };
            let empty = NodePlan::default();
            let f = UdpFrontends::of(&empty, &diff, false);
            (
                !f.is_empty(),
                f.has_family(IpFamily::V4),
                f.has_family(IpFamily::V6),
            )
        };
        let (a, b, c) = ("10.0.0.1", "10.0.0.2", "10.0.0.3");
        assert_eq!(
            change(&[a, b], &[a, b, c]),
            (false, false, false),
            "only added"
        );
        assert_eq!(
            change(&[a, b], &[a]),
            (true, true, false),
            "b stopped serving"
        );
        assert_eq!(change(&[], &[a]), (true, true, false), "first endpoint");
    }

    #[test]
    fn nothing_serves_a_removed_service() {
        let gone = dns_removed();
        let empty = NodePlan::default();
        let f = UdpFrontends::of(&empty, &gone, false);
        let cluster_ip = "10.96.0.10".parse().unwrap();
        assert!(f.is_stale_translation(cluster_ip, 53, &ep("10.0.0.2", 5353)));
    }
}
