//! Stale UDP conntrack entries, reconciled as kube-proxy's conntrack reconciler does
//! (`pkg/proxy/conntrack/cleanup.go`). A NATed UDP flow keeps going to the backend
//! its entry names even after that backend stops serving; a flow that started while
//! the service had no endpoints is never NATed at all. After a sync that touched UDP
//! services (and after every full sync, the first one after a restart included),
//! Ferry reads the UDP entries over ctnetlink and deletes those two kinds. Flows to
//! endpoints that still serve, terminating ones included, are kept.

mod netlink;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use self::netlink::{Ctnetlink, UdpFlow};
use crate::model::{Endpoint, IpFamily, NodePlan, PlanDiff, Protocol, ServicePortPlan};

/// What one reconcile did in one family: how long it took and how many entries it
/// deleted (kube-proxy's conntrack reconciler metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleared {
    pub family: IpFamily,
    pub took: Duration,
    pub deleted: u64,
}

/// Whether a sync needs a reconcile: a full one, or one that changed a UDP plan.
pub fn needed(diff: &PlanDiff, full: bool) -> bool {
    let udp = |p: &ServicePortPlan| p.key.port.protocol == Protocol::Udp;
    full || diff.upserted.iter().any(|u| udp(&u.new)) || diff.removed.iter().any(|p| udp(p))
}

/// The UDP frontends of the plan: service addresses and NodePorts.
#[derive(Default)]
struct Frontends<'a> {
    addresses: HashMap<(IpAddr, u16), &'a ServicePortPlan>,
    node_ports: HashMap<u16, &'a ServicePortPlan>,
}

impl<'a> Frontends<'a> {
    fn of(plan: &'a NodePlan) -> Self {
        let mut f = Self::default();
        for p in plan.iter().filter(|p| p.key.port.protocol == Protocol::Udp) {
            let ips = std::iter::once(&p.cluster_ip)
                .chain(&p.external_ips)
                .chain(&p.load_balancer_ips);
            for ip in ips {
                f.addresses.insert((*ip, p.port), p);
            }
            if let Some(node_port) = p.node_port {
                f.node_ports.insert(node_port, p);
            }
        }
        f
    }

    /// Whether kube-proxy's rule deletes this flow.
    fn is_stale(&self, flow: &UdpFlow) -> bool {
        let serving = |p: &ServicePortPlan| {
            let backend = Endpoint {
                ip: flow.reply_src,
                port: flow.reply_sport,
            };
            p.serving_endpoints.binary_search(&backend).is_ok()
        };
        if let Some(p) = self.addresses.get(&(flow.orig_dst, flow.orig_dport)) {
            return if flow.dnat() {
                !serving(p)
            } else {
                // Sent while the service had no endpoints: it would never be NATed.
                !p.serving_endpoints.is_empty()
            };
        }
        match self.node_ports.get(&flow.orig_dport) {
            Some(p) => flow.dnat() && !serving(p),
            None => false,
        }
    }
}

/// Keeps the ctnetlink socket between syncs.
#[derive(Default)]
pub struct Reconciler {
    client: Option<Ctnetlink>,
    /// When opening the socket last failed (warned about once a minute).
    last_failure: Option<Instant>,
}

impl Reconciler {
    /// Deletes the stale UDP entries of `families` for this plan. Failures are
    /// logged, never fatal: a stale entry only delays a flow until it times out.
    pub fn reconcile(&mut self, plan: &NodePlan, families: &[IpFamily]) -> Vec<Cleared> {
        let Some(client) = self.client() else {
            return Vec::new();
        };
        let frontends = Frontends::of(plan);
        let mut cleared = Vec::new();
        for &family in families {
            let started = Instant::now();
            let flows = match client.udp_flows(family) {
                Ok(flows) => flows,
                Err(e) => {
                    warn!(%family, error = %e, "cannot read conntrack entries; stale UDP flows linger until they time out");
                    self.client = None;
                    return cleared;
                }
            };
            let mut deleted = 0;
            for flow in flows.iter().filter(|f| frontends.is_stale(f)) {
                match client.delete(flow) {
                    Ok(()) => deleted += 1,
                    Err(e) => warn!(?flow, error = %e, "cannot delete a stale conntrack entry"),
                }
            }
            debug!(%family, entries = flows.len(), deleted, "conntrack reconciled");
            cleared.push(Cleared {
                family,
                took: started.elapsed(),
                deleted,
            });
        }
        cleared
    }

    fn client(&mut self) -> Option<&mut Ctnetlink> {
        if self.client.is_none() {
            match Ctnetlink::open() {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    if self
                        .last_failure
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                    {
                        warn!(error = %e, "cannot open ctnetlink; stale UDP flows linger until they time out");
                        self.last_failure = Some(Instant::now());
                    }
                    return None;
                }
            }
        }
        self.client.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Upsert;
    use crate::model::plan::test_plan;

    fn plan(protocol: Protocol, serving: &[&str]) -> ServicePortPlan {
        let endpoints: Vec<(&str, u16)> = serving.iter().map(|ip| (*ip, 5353)).collect();
        let mut plan = test_plan(("ns", "dns", ""), protocol, "10.96.0.10", 53, &endpoints);
        plan.node_port = Some(30053);
        plan.serving_endpoints.sort();
        plan
    }

    fn flow(dst: &str, dport: u16, reply_src: &str, reply_sport: u16) -> UdpFlow {
        UdpFlow {
            orig_src: "10.244.0.5".parse().unwrap(),
            orig_sport: 40000,
            orig_dst: dst.parse().unwrap(),
            orig_dport: dport,
            reply_src: reply_src.parse().unwrap(),
            reply_sport,
        }
    }

    fn node_plan(plans: Vec<ServicePortPlan>) -> NodePlan {
        let mut node = NodePlan::default();
        node.insert_for_test(plans);
        node
    }

    #[test]
    fn flows_to_endpoints_that_stopped_serving_are_stale() {
        let node = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2", "10.0.0.3"])]);
        let f = Frontends::of(&node);
        assert!(
            f.is_stale(&flow("10.96.0.10", 53, "10.0.0.1", 5353)),
            "gone backend"
        );
        assert!(
            !f.is_stale(&flow("10.96.0.10", 53, "10.0.0.2", 5353)),
            "still serving"
        );
        assert!(
            f.is_stale(&flow("10.96.0.10", 53, "10.0.0.2", 9999)),
            "old target port"
        );
        assert!(
            f.is_stale(&flow("172.18.0.2", 30053, "10.0.0.1", 5353)),
            "NodePort, gone"
        );
        assert!(
            !f.is_stale(&flow("172.18.0.2", 30053, "10.0.0.3", 5353)),
            "NodePort, serving"
        );
        assert!(
            !f.is_stale(&flow("8.8.8.8", 53, "8.8.8.8", 53)),
            "not a service"
        );
    }

    #[test]
    fn unnated_flows_are_stale_once_the_service_has_endpoints() {
        let with = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2"])]);
        let blackholed = flow("10.96.0.10", 53, "10.96.0.10", 53);
        assert!(Frontends::of(&with).is_stale(&blackholed));
        let without = node_plan(vec![plan(Protocol::Udp, &[])]);
        assert!(
            !Frontends::of(&without).is_stale(&blackholed),
            "nothing to move to yet"
        );
    }

    #[test]
    fn tcp_services_and_unrelated_syncs_need_no_reconcile() {
        let tcp = node_plan(vec![plan(Protocol::Tcp, &["10.0.0.2"])]);
        assert!(!Frontends::of(&tcp).is_stale(&flow("10.96.0.10", 53, "10.0.0.1", 5353)));
        let diff = |p: Protocol| PlanDiff {
            upserted: vec![Upsert {
                old: None,
                new: Arc::new(plan(p, &["10.0.0.2"])),
            }],
            removed: vec![],
            skipped: vec![],
        };
        assert!(needed(&diff(Protocol::Udp), false));
        assert!(!needed(&diff(Protocol::Tcp), false));
        assert!(needed(&PlanDiff::default(), true), "every full sync");
    }
}
