//! `ferry inspect services`: what the socket-LB maps hold right now, read back from
//! the pinned maps (not from the agent's memory), for debugging.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use ferry_common::{Frontend, FrontendKey, flags};
use serde::Serialize;

use super::kernel::KernelMaps;
use super::layout::{backend_of, words_addr};
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

/// One frontend for display, its backend ids resolved through `backends`.
fn frontend_view(
    key: &FrontendKey,
    fe: &Frontend,
    ids: Option<&[u32]>,
    backends: &HashMap<u32, String>,
) -> FrontendView {
    let address = SocketAddr::new(words_addr(key.addr, key.family), u16::from_be(key.port));
    let backend = |id: &u32| {
        backends
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("<missing #{id}>"))
    };
    FrontendView {
        address: address.to_string(),
        protocol: match key.proto {
            6 => "TCP",
            17 => "UDP",
            132 => "SCTP",
            _ => "?",
        },
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
            "{:<44} {:<5} {:<10} {:<8} BACKENDS",
            "FRONTEND", "PROTO", "KIND", "ACTION"
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
                "{:<44} {:<5} {:<10} {:<8} {backends}{affinity}",
                f.address, f.protocol, f.kind, f.action
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
