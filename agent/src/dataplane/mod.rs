//! Data planes: each turns the model's [`PlanDiff`] into kernel state. They never look
//! at Kubernetes objects; every service semantic was decided by the model.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::model::{IpFamily, NodePlan, PlanDiff};

pub mod conntrack;
pub mod ebpf;
pub mod iptables;

/// Node facts a backend needs beyond the plan, recomputed before every sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Addresses NodePorts answer on.
    pub nodeport_ips: Vec<IpAddr>,
    /// All of this node's own addresses.
    pub node_ips: Vec<IpAddr>,
    /// Pod CIDRs (`--cluster-cidr`).
    pub cluster_cidrs: Vec<IpNetwork>,
}

impl NodeNetwork {
    /// The part of it that concerns one IP family.
    pub fn of_family(&self, family: IpFamily) -> NodeNetwork {
        let keep_ip = |ips: &[IpAddr]| {
            ips.iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect()
        };
        NodeNetwork {
            nodeport_ips: keep_ip(&self.nodeport_ips),
            node_ips: keep_ip(&self.node_ips),
            cluster_cidrs: self
                .cluster_cidrs
                .iter()
                .copied()
                .filter(|n| n.is_ipv4() == (family == IpFamily::V4))
                .collect(),
        }
    }
}

/// What one sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Frontend sets (service port x family) written.
    pub plans_written: usize,
    /// Frontend sets removed.
    pub plans_removed: usize,
    /// Backend-specific unit count (iptables rule lines, map entries written).
    pub writes: usize,
    /// iptables rules Ferry owns, by family and table.
    pub iptables_rules: Vec<(IpFamily, &'static str, usize)>,
    /// eBPF frontends and backends programmed.
    pub ebpf_entries: Option<(usize, usize)>,
}

/// A backend failed to program the kernel. The caller retries with a full sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Iptables(#[from] iptables::exec::ExecError),
    #[error(transparent)]
    Ebpf(#[from] ebpf::state::MapError),
    #[error("{0}")]
    Other(String),
}

/// A data plane.
pub trait DataPlane: Send {
    /// Short name for logs.
    fn name(&self) -> &'static str;

    /// Brings the kernel in line with `plan`. `diff` is what changed since the last
    /// successful sync; with `full` the backend reconciles everything (start-up, after
    /// a failure, periodically, after tampering) and may ignore `diff`.
    fn sync(
        &mut self,
        plan: &NodePlan,
        diff: &PlanDiff,
        node: &NodeNetwork,
        full: bool,
    ) -> Result<SyncStats, SyncError>;

    /// Cheap check for outside tampering; `true` means a full sync is due.
    fn needs_full_sync(&mut self) -> bool {
        false
    }
}
