//! Stale UDP conntrack entries. A NATed UDP flow keeps going to the backend its
//! conntrack entry names, even after that backend is gone; and a flow that started
//! while the service had no endpoints never gets NATed at all. Like kube-proxy, Ferry
//! deletes those entries after each sync (with the `conntrack` tool).

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::{debug, warn};

use crate::model::{PlanDiff, Protocol, ServicePortPlan};

/// A set of conntrack entries to delete.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StaleFlows {
    /// UDP flows to `dst:dport` answered by `backend`.
    ToBackend {
        dst: IpAddr,
        dport: u16,
        backend: IpAddr,
    },
    /// UDP flows to a NodePort answered by `backend`.
    NodePortToBackend { node_port: u16, backend: IpAddr },
    /// Every UDP flow to `dst:dport` (the service had no endpoints).
    All { dst: IpAddr, dport: u16 },
}

fn frontends(plan: &ServicePortPlan) -> impl Iterator<Item = IpAddr> + '_ {
    std::iter::once(plan.cluster_ip)
        .chain(plan.external_ips.iter().copied())
        .chain(plan.load_balancer_ips.iter().copied())
}

/// The UDP flows a diff made stale.
pub fn stale_udp_flows(diff: &PlanDiff) -> Vec<StaleFlows> {
    let mut out = Vec::new();
    for upsert in &diff.upserted {
        if upsert.new.key.port.protocol != Protocol::Udp {
            continue;
        }
        if let Some(old) = &upsert.old {
            removed_backends(old, Some(&upsert.new), &mut out);
        }
        let had_none = upsert
            .old
            .as_ref()
            .is_some_and(|o| o.reachable_endpoints().is_empty());
        if had_none && !upsert.new.reachable_endpoints().is_empty() {
            for dst in frontends(&upsert.new) {
                out.push(StaleFlows::All {
                    dst,
                    dport: upsert.new.port,
                });
            }
        }
    }
    for old in diff
        .removed
        .iter()
        .filter(|p| p.key.port.protocol == Protocol::Udp)
    {
        removed_backends(old, None, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// Flows of `old` whose backend is not in `new` any more.
fn removed_backends(
    old: &ServicePortPlan,
    new: Option<&ServicePortPlan>,
    out: &mut Vec<StaleFlows>,
) {
    let still = new.map(|n| n.reachable_endpoints()).unwrap_or_default();
    for backend in old.reachable_endpoints() {
        if still.iter().any(|b| b.ip == backend.ip) {
            continue;
        }
        for dst in frontends(old) {
            out.push(StaleFlows::ToBackend {
                dst,
                dport: old.port,
                backend: backend.ip,
            });
        }
        if let Some(node_port) = old.node_port {
            out.push(StaleFlows::NodePortToBackend {
                node_port,
                backend: backend.ip,
            });
        }
    }
}

/// Deletes the given entries. Failures are logged, never fatal: a stale entry only
/// delays a flow until it times out.
pub fn clear(flows: &[StaleFlows]) {
    static MISSING_TOOL: AtomicBool = AtomicBool::new(false);
    if flows.is_empty() || MISSING_TOOL.load(Ordering::Relaxed) {
        return;
    }
    for flow in flows {
        let args: Vec<String> = match flow {
            StaleFlows::ToBackend {
                dst,
                dport,
                backend,
            } => vec![
                format!("--orig-dst={dst}"),
                format!("--dport={dport}"),
                format!("--reply-src={backend}"),
            ],
            StaleFlows::NodePortToBackend { node_port, backend } => {
                vec![
                    format!("--dport={node_port}"),
                    format!("--reply-src={backend}"),
                ]
            }
            StaleFlows::All { dst, dport } => {
                vec![format!("--orig-dst={dst}"), format!("--dport={dport}")]
            }
        };
        let family = match flow {
            StaleFlows::ToBackend { backend: ip, .. }
            | StaleFlows::NodePortToBackend { backend: ip, .. }
            | StaleFlows::All { dst: ip, .. } => {
                if ip.is_ipv4() {
                    "ipv4"
                } else {
                    "ipv6"
                }
            }
        };
        let status = Command::new("conntrack")
            .args(["-D", "-f", family, "-p", "udp"])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match status {
            // Exit status 1 means "no entry matched": fine.
            Ok(_) => debug!(?flow, "cleared stale UDP conntrack entries"),
            Err(e) => {
                warn!(error = %e, "cannot run conntrack; stale UDP flows will linger until they time out");
                MISSING_TOOL.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Upsert;
    use crate::model::plan::test_plan;

    fn plan(protocol: Protocol, backends: &[&str]) -> Arc<ServicePortPlan> {
        let endpoints: Vec<(&str, u16)> = backends.iter().map(|ip| (*ip, 5353)).collect();
        let mut plan = test_plan(("ns", "dns", ""), protocol, "10.96.0.10", 53, &endpoints);
        plan.node_port = Some(30053);
        Arc::new(plan)
    }

    #[test]
    fn removed_udp_backend_is_flushed() {
        let diff = PlanDiff {
            upserted: vec![Upsert {
                old: Some(plan(Protocol::Udp, &["10.0.0.1", "10.0.0.2"])),
                new: plan(Protocol::Udp, &["10.0.0.2"]),
            }],
            removed: vec![],
        };
        assert_eq!(
            stale_udp_flows(&diff),
            [
                StaleFlows::ToBackend {
                    dst: "10.96.0.10".parse().unwrap(),
                    dport: 53,
                    backend: "10.0.0.1".parse().unwrap()
                },
                StaleFlows::NodePortToBackend {
                    node_port: 30053,
                    backend: "10.0.0.1".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn first_endpoint_flushes_the_service_and_tcp_is_left_alone() {
        let diff = PlanDiff {
            upserted: vec![
                Upsert {
                    old: Some(plan(Protocol::Udp, &[])),
                    new: plan(Protocol::Udp, &["10.0.0.1"]),
                },
                Upsert {
                    old: Some(plan(Protocol::Tcp, &["10.0.0.1"])),
                    new: plan(Protocol::Tcp, &[]),
                },
            ],
            removed: vec![],
        };
        assert_eq!(
            stale_udp_flows(&diff),
            [StaleFlows::All {
                dst: "10.96.0.10".parse().unwrap(),
                dport: 53
            }]
        );
    }
}
