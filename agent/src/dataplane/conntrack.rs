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

use std::time::{Duration, Instant};

use tracing::{debug, warn};

use self::netlink::{Ctnetlink, UdpFlow};
use super::udp_frontends::UdpFrontends;
use crate::model::{Endpoint, IpFamily, NodePlan, PlanDiff};

/// What one reconcile did in one family: how long it took and how many entries it
/// deleted (kube-proxy's conntrack reconciler metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleared {
    pub family: IpFamily,
    pub took: Duration,
    pub deleted: u64,
}

/// Whether kube-proxy's rule deletes this flow.
fn is_stale(frontends: &UdpFrontends, flow: &UdpFlow) -> bool {
    if flow.dnat() {
        let backend = Endpoint {
            ip: flow.reply_src,
            port: flow.reply_sport,
        };
        return frontends.is_stale_translation(flow.orig_dst, flow.orig_dport, &backend);
    }
    // Sent while the service had no endpoints: it would never be NATed.
    frontends
        .address(flow.orig_dst, flow.orig_dport)
        .is_some_and(|f| !f.gone && !f.plan.serving_endpoints.is_empty())
}

/// Has the kernel load conntrack (nf_conntrack_netlink, and nf_conntrack with it) when
/// nothing has yet: the first ctnetlink request does, through the kernel's own module
/// autoloading, which also works from a container without `/lib/modules`. Until then
/// the conntrack sysctls do not exist, e.g. in eBPF mode before any NAT rule.
pub fn load_kernel_modules() -> std::io::Result<()> {
    Ctnetlink::open()?.udp_flows(IpFamily::V4).map(drop)
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
        let frontends = UdpFrontends::of(plan, diff, full);
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
            for flow in flows.iter().filter(|f| is_stale(&frontends, f)) {
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
    use super::*;
    use crate::dataplane::udp_frontends::test_support::{all, dns_removed, node_plan, plan};
    use crate::model::Protocol;

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

    #[test]
    fn flows_to_endpoints_that_stopped_serving_are_stale() {
        let node = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2", "10.0.0.3"])]);
        let f = all(&node);
        let stale = |flow| is_stale(&f, &flow);
        assert!(
            stale(flow("10.96.0.10", 53, "10.0.0.1", 5353)),
            "gone backend"
        );
        assert!(
            !stale(flow("10.96.0.10", 53, "10.0.0.2", 5353)),
            "still serving"
        );
        assert!(
            stale(flow("172.18.0.2", 30053, "10.0.0.1", 5353)),
            "NodePort, gone"
        );
        assert!(
            !stale(flow("172.18.0.2", 30053, "10.0.0.3", 5353)),
            "NodePort, serving"
        );
        assert!(!stale(flow("8.8.8.8", 53, "8.8.8.8", 53)), "not a service");
    }

    #[test]
    fn unnated_flows_are_stale_once_the_service_has_endpoints() {
        let with = node_plan(vec![plan(Protocol::Udp, &["10.0.0.2"])]);
        let blackholed = flow("10.96.0.10", 53, "10.96.0.10", 53);
        assert!(is_stale(&all(&with), &blackholed));
        let without = node_plan(vec![plan(Protocol::Udp, &[])]);
        assert!(
            !is_stale(&all(&without), &blackholed),
            "nothing to move to yet"
        );
    }

    #[test]
    fn flows_of_a_removed_service_are_stale() {
        let gone = dns_removed();
        let empty = NodePlan::default();
        let f = UdpFrontends::of(&empty, &gone, false);
        assert!(is_stale(&f, &flow("10.96.0.10", 53, "10.0.0.2", 5353)));
        assert!(
            !is_stale(&f, &flow("10.96.0.10", 53, "10.96.0.10", 53)),
            "never NATed"
        );
    }
}
