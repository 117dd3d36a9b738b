//! Stale UDP conntrack entries. A NATed UDP flow keeps going to the backend its
//! conntrack entry names, even after that backend is gone; and a flow that started
//! while the service had no endpoints never gets NATed at all. Like kube-proxy, Ferry
//! deletes those entries after each sync (with the `conntrack` tool).

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::model::{IpFamily, PlanDiff, Protocol, ServicePortPlan};

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

/// What one [`clear`] did in one family: how long it took and how many entries it
/// deleted (kube-proxy's conntrack reconciler metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleared {
    pub family: IpFamily,
    pub took: Duration,
    pub deleted: u64,
}

/// Deletes the given entries. Failures are logged, never fatal: a stale entry only
/// delays a flow until it times out.
pub fn clear(flows: &[StaleFlows]) -> Vec<Cleared> {
    static MISSING_TOOL: AtomicBool = AtomicBool::new(false);
    let mut cleared: Vec<Cleared> = Vec::new();
    if flows.is_empty() || MISSING_TOOL.load(Ordering::Relaxed) {
        return cleared;
    }
    for flow in flows {
        let family = flow.family();
        let started = Instant::now();
        let output = Command::new("conntrack")
            .args(["-D", "-f", conntrack_family(family), "-p", "udp"])
            .args(flow.conntrack_args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let deleted = match output {
            // Exit status 1 means "no entry matched": fine.
            Ok(out) => deleted_count(&String::from_utf8_lossy(&out.stderr)),
            Err(e) => {
                warn!(error = %e, "cannot run conntrack; stale UDP flows will linger until they time out");
                MISSING_TOOL.store(true, Ordering::Relaxed);
                return cleared;
            }
        };
        debug!(?flow, deleted, "cleared stale UDP conntrack entries");
        let entry = match cleared.iter_mut().find(|c| c.family == family) {
            Some(entry) => entry,
            None => {
                cleared.push(Cleared {
                    family,
                    took: Duration::ZERO,
                    deleted: 0,
                });
                cleared.last_mut().expect("just pushed")
            }
        };
        entry.took += started.elapsed();
        entry.deleted += deleted;
    }
    cleared
}

/// The count in conntrack's "N flow entries have been deleted." (0 when absent).
fn deleted_count(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.split_once(" flow entries have been deleted")?
                .0
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// conntrack's `-f` value.
fn conntrack_family(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

impl StaleFlows {
    fn family(&self) -> IpFamily {
        match self {
            Self::ToBackend { backend: ip, .. }
            | Self::NodePortToBackend { backend: ip, .. }
            | Self::All { dst: ip, .. } => IpFamily::of(ip),
        }
    }

    /// The `conntrack -D` filter selecting these flows.
    fn conntrack_args(&self) -> Vec<String> {
        match self {
            Self::ToBackend {
                dst,
                dport,
                backend,
            } => vec![
                format!("--orig-dst={dst}"),
                format!("--dport={dport}"),
                format!("--reply-src={backend}"),
            ],
            Self::NodePortToBackend { node_port, backend } => vec![
                format!("--dport={node_port}"),
                format!("--reply-src={backend}"),
            ],
            Self::All { dst, dport } => {
                vec![format!("--orig-dst={dst}"), format!("--dport={dport}")]
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
    fn deleted_entries_are_read_from_conntracks_message() {
        let msg = "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n";
        assert_eq!(deleted_count(msg), 3);
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n"
            ),
            0
        );
        assert_eq!(deleted_count(""), 0);
    }

    #[test]
    fn removed_udp_backend_is_flushed() {
        let diff = PlanDiff {
            upserted: vec![Upsert {
                old: Some(plan(Protocol::Udp, &["10.0.0.1", "10.0.0.2"])),
                new: plan(Protocol::Udp, &["10.0.0.2"]),
            }],
            removed: vec![],
            skipped: vec![],
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
            skipped: vec![],
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
