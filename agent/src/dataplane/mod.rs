//! Data planes: each turns the model's [`PlanDiff`] into kernel state. They never look
//! at Kubernetes objects; every service semantic was decided by the model.

use std::net::SocketAddr;

pub use crate::model::NodeNetwork;
use crate::model::{IpFamily, NodePlan, PlanDiff, Protocol, ServicePortPlan};

pub mod command;
pub mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod netlink_request;
pub mod nftables;
pub mod udp_frontends;

/// What one sync did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Frontend sets (service port x family) written.
    pub plans_written: usize,
    /// Frontend sets removed.
    pub plans_removed: usize,
    /// Data-plane-specific unit count (iptables rule lines, map entries written).
    pub writes: usize,
    /// How much kernel state the data plane holds after the sync.
    pub programmed: Vec<ProgrammedCount>,
}

/// A count of kernel objects a data plane holds, exported as a gauge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProgrammedCount {
    /// Rules Ferry owns in one iptables table of one family.
    IptablesRules {
        family: IpFamily,
        table: &'static str,
        rules: usize,
    },
    /// Rules written to one iptables table of one family by the last sync.
    IptablesRulesWritten {
        family: IpFamily,
        table: &'static str,
        rules: usize,
    },
    /// Frontends and backends in the eBPF maps, and how many the maps hold at most
    /// (`--bpf-max-frontends`, `--bpf-max-backends`).
    EbpfEntries {
        frontends: usize,
        backends: usize,
        max_frontends: u32,
        max_backends: u32,
    },
    /// Service chains and map/set elements in Ferry's nftables table of one family.
    NftablesObjects {
        family: IpFamily,
        chains: usize,
        elements: usize,
    },
}

/// A data plane failed to program the kernel. The caller retries with a full sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{family} rules ({})", if *.partial { "partial sync" } else { "full sync" })]
    Iptables {
        family: IpFamily,
        /// A partial sync's restore failed (kube-proxy counts those apart).
        partial: bool,
        #[source]
        source: iptables::exec::ExecError,
    },
    #[error("{family} nftables ({})", if *.partial { "partial sync" } else { "full sync" })]
    Nftables {
        family: IpFamily,
        partial: bool,
        #[source]
        source: nftables::exec::NftError,
    },
    #[error(transparent)]
    Ebpf(#[from] ebpf::state::MapError),
    #[error(transparent)]
    Load(#[from] ebpf::loader::LoadError),
    /// No thread could be started for the write (the system is out of them).
    #[error("cannot start the thread that writes to the kernel")]
    WriteThread(#[source] std::io::Error),
}

/// A frontend (the kube-dns ClusterIP's port 53) answered by the node's own DNS
/// server while it serves, and by the Service's endpoints otherwise.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeLocalDns {
    /// The ClusterIP and port.
    pub frontend: SocketAddr,
    pub protocol: Protocol,
    /// Where the node's DNS server listens for it.
    pub listener: SocketAddr,
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

    /// Whether the node's DNS server must listen on the ClusterIP itself for
    /// [`Self::steer_node_local_dns`] (NodeLocal DNSCache's way), rather than on its
    /// own address (a socket hook redirects there).
    fn dns_listens_on_service_ip(&self) -> bool {
        false
    }

    /// Hands exactly these frontends to the node's DNS server (the whole, small, set
    /// each time it changes): from then on the kernel alone decides, per connection,
    /// between the local server (while it serves) and the Service's endpoints.
    fn steer_node_local_dns(&mut self, frontends: &[NodeLocalDns]) -> Result<(), SyncError> {
        let _ = frontends;
        Ok(())
    }

    /// What this data plane holds for `plan`, in its own words (chain names, map
    /// entries), for `ferry explain`: the names an operator greps `iptables-save`,
    /// `nft list` or `ferry inspect` for.
    fn describe(&self, plan: &ServicePortPlan) -> Vec<String>;

    /// Cheap check for outside tampering; `true` means a full sync is due.
    fn needs_full_sync(&mut self) -> bool {
        false
    }

    /// Whether traffic is translated by kernel NAT rules that record flows in
    /// conntrack, so stale UDP entries must be cleared after a sync
    /// ([`conntrack`]). Socket-level load balancing creates no such entries.
    fn nats_through_conntrack(&self) -> bool {
        false
    }
}
