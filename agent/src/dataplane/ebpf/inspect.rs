//! `ferry inspect services`: what the socket-LB maps hold right now, read back from
//! the pinned maps (not from the agent's memory), for debugging.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use aya::maps::{MapData, PerCpuHashMap};
use ferry_common::{Frontend, FrontendCounters, FrontendKey, flags};
use serde::Serialize;

use super::kernel::{KernelMaps, open};
use super::layout::{backend_of, frontend_address, protocol_name};
use super::names::FrontendName;
use super::state::{MapError, MapOps};

/// One frontend as programmed.
#[derive(Debug, Serialize)]
pub struct FrontendView {
    /// `ip:port`.
    pub address: String,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: &'static str,
    /// `ClusterIP` or `External` (externalIP / load-balancer IP).
    pub kind: &'static str,
    /// `forward`, `reject` (no endpoints) or `drop` (none usable here).
    pub action: &'static str,
    /// `namespace/name:port` of the service, when the running agent named it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// ClientIP affinity timeout, when affinity is on.
    pub affinity_timeout_seconds: Option<u32>,
    /// `ip:port` of each backend, in list order.
    pub backends: Vec<String>,
}

/// Everything `ferry inspect services` shows.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub frontends: Vec<FrontendView>,
    /// Distinct backend addresses.
    pub backends: usize,
    /// Data-path counters since the maps were created.
    pub counters: BTreeMap<&'static str, u64>,
}

impl Inspection {
    /// Adds the NodePort frontends of `rules` (what eBPF mode programs in iptables).
    pub fn add_node_ports(&mut self, rules: Inspection) {
        self.frontends
            .extend(rules.frontends.into_iter().filter(|f| f.kind == "NodePort"));
    }

    /// Names each frontend after the service port `names` (the agent's `/frontends`)
    /// gives for its address.
    pub fn name_frontends(&mut self, names: &[FrontendName]) {
        let by_frontend: HashMap<&str, &FrontendName> =
            names.iter().map(|n| (n.frontend.as_str(), n)).collect();
        for f in &mut self.frontends {
            let frontend = format!("{}/{}", f.address, f.protocol);
            f.service = by_frontend.get(frontend.as_str()).map(|n| n.service_port());
        }
    }
}

/// Reads the maps pinned in `pin_dir`.
pub fn inspect(pin_dir: &Path) -> Result<Inspection, MapError> {
    let mut maps = KernelMaps::open(pin_dir)?;
    let state = maps.read_all()?;
    let backends: HashMap<u32, String> = state
        .backends
        .iter()
        .map(|(id, b)| (*id, backend_of(b).to_string()))
        .collect();
    let lists: HashMap<(u8, u32), &Vec<u32>> = state
        .lists
        .iter()
        .map(|(class, id, ids)| ((*class, *id), ids))
        .collect();
    let mut frontends: Vec<FrontendView> = state
        .frontends
        .iter()
        .map(|(key, fe)| {
            let ids = lists.get(&(fe.list_class, fe.id)).copied();
            frontend_view(key, fe, ids.map(Vec::as_slice), &backends)
        })
        .collect();
    frontends
        .sort_by(|a, b| (a.kind, &a.address, a.protocol).cmp(&(b.kind, &b.address, b.protocol)));
    Ok(Inspection {
        frontends,
        backends: backends.len(),
        counters: maps.counters().into_iter().collect(),
    })
}

/// The data path's event counters (summed over CPUs) from the maps pinned in
/// `pin_dir`, for the metrics endpoint.
pub fn counters(pin_dir: &Path) -> Result<Vec<(&'static str, u64)>, MapError> {
    Ok(KernelMaps::open(pin_dir)?.counters())
}

/// Each frontend's connections by outcome, summed over CPUs, from the counters map
/// pinned in `pin_dir` (only frontends used since they were programmed have one).
pub fn frontend_counters(pin_dir: &Path) -> Result<Vec<(u32, FrontendCounters)>, MapError> {
    let spec = &ferry_common::maps::FRONTEND_COUNTERS;
    let map: PerCpuHashMap<MapData, u32, FrontendCounters> = open(pin_dir, spec)?;
    let mut out = Vec::new();
    for item in map.iter() {
        let (id, per_cpu) = item.map_err(|source| MapError::Failed {
            map: spec.name,
            op: "read",
            source,
        })?;
        let sum = per_cpu
            .iter()
            .fold(FrontendCounters::default(), |a, c| FrontendCounters {
                forwarded: a.forwarded + c.forwarded,
                rejected: a.rejected + c.rejected,
                dropped: a.dropped + c.dropped,
            });
        out.push((id, sum));
    }
    Ok(out)
}

/// One frontend for display, its backend ids resolved through `backends`.
fn frontend_view(
    key: &FrontendKey,
    fe: &Frontend,
    ids: Option<&[u32]>,
    backends: &HashMap<u32, String>,
) -> FrontendView {
    let address = frontend_address(key);
    let backend = |id: &u32| {
        backends
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("<missing #{id}>"))
    };
    FrontendView {
        address: address.to_string(),
        protocol: protocol_name(key.proto),
        kind: if fe.flags & flags::CLUSTER_IP != 0 {
            "ClusterIP"
        } else {
            "External"
        },
        action: match fe.flags & flags::ACTION_MASK {
            flags::ACTION_FORWARD => "forward",
            flags::ACTION_REJECT => "reject",
            _ => "drop",
        },
        service: None,
        affinity_timeout_seconds: (fe.flags & flags::AFFINITY != 0).then_some(fe.affinity_timeout),
        backends: ids.unwrap_or_default().iter().map(backend).collect(),
    }
}

impl Inspection {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<44} {:<5} {:<10} {:<8} {:<32} BACKENDS",
            "FRONTEND", "PROTO", "KIND", "ACTION", "SERVICE"
        );
        for f in &self.frontends {
            let backends = if f.backends.is_empty() {
                "-".to_string()
            } else {
                f.backends.join(", ")
            };
            let affinity = f
                .affinity_timeout_seconds
                .map(|t| format!(" (ClientIP affinity {t}s)"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<44} {:<5} {:<10} {:<8} {:<32} {backends}{affinity}",
                f.address,
                f.protocol,
                f.kind,
                f.action,
                f.service.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            out,
            "\n{} frontends, {} backends",
            self.frontends.len(),
            self.backends
        );
        let counters: Vec<String> = self
            .counters
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(out, "counters: {}", counters.join(" "));
        out
    }
}
