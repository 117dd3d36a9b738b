//! Stale UDP conntrack entries, reconciled as kube-proxy's conntrack reconciler does
//! (`pkg/proxy/conntrack/cleanup.go`). A NATed UDP flow keeps going to the backend
//! its entry names even after that backend stops serving; a flow that started while
//! the service had no endpoints is never NATed at all. After a sync that touched UDP
//! services (and after every full sync, the first one after a restart included),
//! Ferry reads the UDP entries over ctnetlink and deletes those two kinds, and the
//! NATed entries of services that went away; a partial sync looks only at the
//! frontends it changed. Flows to endpoints that still serve, terminating ones
//! included, are kept.

mod netlink;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use self::netlink::{Ctnetlink, UdpFlow};
use crate::model::{Endpoint, IpFamily, NodePlan, PlanDiff, Protocol, ServicePortPlan, Upsert};

/// What one reconcile did in one family: how long it took and how many entries it
/// deleted (kube-proxy's conntrack reconciler metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleared {
    pub family: IpFamily,
    pub took: Duration,
    pub deleted: u64,
}

/// UDP frontends to reconcile: service addresses and NodePorts, each with its plan
/// and whether that plan is gone (then no endpoint serves it any more).
#[derive(Default)]
struct Frontends<'a> {
    addresses: HashMap<(IpAddr, u16), (&'a ServicePortPlan, bool)>,
    node_ports: HashMap<u16, (&'a ServicePortPlan, bool)>,
}

impl<'a> Frontends<'a> {
    /// Every frontend of the plan (a full sync), or only those of the diff's
    /// changes that can leave stale flows, removed ones included, so a partial sync
    /// costs what it changed (and a change that only adds endpoints costs no dump
    /// of the conntrack table).
    fn of(plan: &'a NodePlan, diff: &'a PlanDiff, full: bool) -> Self {
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
    fn has_family(&self, family: IpFamily) -> bool {
        let addresses = self.addresses.keys().map(|(ip, _)| IpFamily::of(ip));
        let plans = self.node_ports.values().map(|(p, _)| p.key.family);
        addresses.chain(plans).any(|f| f == family)
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

    fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.node_ports.is_empty()
    }

    /// Whether kube-proxy's rule deletes this flow.
    fn is_stale(&self, flow: &UdpFlow) -> bool {
        let serving = |(p, gone): &(&ServicePortPlan, bool)| {
            let backend = Endpoint {
                ip: flow.reply_src,
                port: flow.reply_sport,
            };
            !gone && p.serving_endpoints.binary_search(&backend).is_ok()
        };
        if let Some(entry) = self.addresses.get(&(flow.orig_dst, flow.orig_dport)) {
            return if flow.dnat() {
                !serving(entry)
            } else {
                // Sent while the service had no endpoints: it would never be NATed.
                !entry.1 && !entry.0.serving_endpoints.is_empty()
            };
        }
        match self.node_ports.get(&flow.orig_dport) {
            Some(entry) => flow.dnat() && !serving(entry),
            None => false,
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

/// Keeps the ctnetlink socket between syncs.
#[derive(Default)]
pub struct Reconciler {
    client: Option<Ctnetlink>,
    /// When opening the socket last failed (warned about once a minute).
    last_failure: Option<Instant>,
}

impl Reconciler {
    /// Deletes the stale UDP entries of `families` after a sync of `diff` (all of
    /// `plan` when `full`). Failures are logged, never fatal: a stale entry only
    /// delays a flow until it times out.
    pub fn reconcile(
        &mut self,
        plan: &NodePlan,
        diff: &PlanDiff,
        full: bool,
        families: &[IpFamily],
    ) -> Vec<Cleared> {
        let frontends = Frontends::of(plan, diff, full);
        if frontends.is_empty() {
            return Vec::new();
        }
        let Some(client) = self.client() else {
            return Vec::new();
        };
        let mut cleared = Vec::new();
        for &family in families.iter().filter(|f| frontends.has_family(**f)) {
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

    /// Every frontend of a plan, as a full sync reconciles them.
    fn all(node: &NodePlan) -> Frontends<'_> {
        static NO_DIFF: std::sync::LazyLock<PlanDiff> = std::sync::LazyLock::new(PlanDiff::default);
        Frontends::of(node, &NO_DIFF, true)
    }

    #[test]
    fn flows_to_endpoints_that_stopped_serving_are_stale() {
        let node = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2", "10.0.0.3"])]);
        let f = all(&node);
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
        assert!(all(&with).is_stale(&blackholed));
        let without = node_plan(vec![plan(Protocol::Udp, &[])]);
        assert!(
            !all(&without).is_stale(&blackholed),
            "nothing to move to yet"
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
            removed: vec![],
            skipped: vec![],
        };
        let empty = NodePlan::default();
        let udp = diff(Protocol::Udp);
        assert!(!Frontends::of(&empty, &udp, false).is_empty());
        let tcp_diff = diff(Protocol::Tcp);
        assert!(Frontends::of(&empty, &tcp_diff, false).is_empty());
    }

    #[test]
    fn only_changes_that_can_leave_stale_flows_are_reconciled() {
        let change = |old: &[&str], new: &[&str]| {
            let diff = PlanDiff {
                upserted: vec![Upsert {
                    old: Some(Arc::new(plan(Protocol::Udp, old))),
                    new: Arc::new(plan(Protocol::Udp, new)),
                }],
                removed: vec![],
                skipped: vec![],
            };
            let empty = NodePlan::default();
            let f = Frontends::of(&empty, &diff, false);
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
    fn flows_of_a_removed_service_are_stale() {
        let gone = PlanDiff {
            upserted: vec![],
            removed: vec![Arc::new(plan(Protocol::Udp, &["10.0.0.2"]))],
            skipped: vec![],
        };
        let empty = NodePlan::default();
        let f = Frontends::of(&empty, &gone, false);
        assert!(f.is_stale(&flow("10.96.0.10", 53, "10.0.0.2", 5353)));
        assert!(
            !f.is_stale(&flow("10.96.0.10", 53, "10.96.0.10", 53)),
            "never NATed"
        );
    }
}
