//! The kube-dns ClusterIP answered on the node in eBPF mode: `ferry_ldns_v1` maps
//! each such frontend to the local DNS listener, and `ferry_dnsalive_v1` holds the
//! lease ([`DnsLease`]) until which the programs may use it. The connect/sendmsg
//! hooks check both before the usual backend choice, so when the agent dies the
//! lease runs out and the frontend goes back to its endpoints by itself.

use std::path::Path;
use std::time::Duration;

use aya::maps::{Array, HashMap, Map, MapData};
use ferry_common::{BackendAddr, FrontendKey, maps};

use super::layout::{backend_addr, frontend_key};
use super::state::MapError;
use crate::dataplane::NodeLocalDns;
use crate::model::Endpoint;

/// Opens the map pinned in `dir` under `name` as a typed map.
fn open<T>(dir: &Path, name: &'static str) -> Result<T, MapError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let fail = |source| MapError::Failed {
        map: name,
        op: "open",
        source,
    };
    let data = MapData::from_pin(dir.join(name)).map_err(fail)?;
    T::try_from(Map::from_map_data(data).map_err(fail)?).map_err(fail)
}

/// The frontends the local DNS server answers.
pub struct NodeLocalDnsMap {
    map: HashMap<MapData, FrontendKey, BackendAddr>,
}

impl NodeLocalDnsMap {
    /// Opens the pinned map.
    pub fn open(dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            map: open(dir, maps::NODE_LOCAL_DNS.name)?,
        })
    }

    /// Makes the map hold exactly `frontends` (a handful: read back whole).
    pub fn set(&mut self, frontends: &[NodeLocalDns]) -> Result<(), MapError> {
        let name = maps::NODE_LOCAL_DNS.name;
        let wanted: Vec<(FrontendKey, BackendAddr)> = frontends
            .iter()
            .map(|f| {
                let key = frontend_key(f.frontend.ip(), f.frontend.port(), f.protocol.number());
                let target = backend_addr(&Endpoint {
                    ip: f.listener.ip(),
                    port: f.listener.port(),
                });
                (key, target)
            })
            .collect();
        let present: Vec<FrontendKey> = self.map.keys().filter_map(Result::ok).collect();
        for key in present
            .iter()
            .filter(|k| !wanted.iter().any(|(w, _)| w == *k))
        {
            self.map.remove(key).map_err(|source| MapError::Failed {
                map: name,
                op: "delete",
                source,
            })?;
        }
        for (key, target) in &wanted {
            self.map
                .insert(key, target, 0)
                .map_err(|source| MapError::Failed {
                    map: name,
                    op: "update",
                    source,
                })?;
        }
        Ok(())
    }
}

/// The lease of the local DNS server on its frontends.
pub struct DnsLease {
    array: Array<MapData, u64>,
}

impl DnsLease {
    /// Opens the pinned lease.
    pub fn open(dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            array: open(dir, maps::DNS_ALIVE.name)?,
        })
    }

    /// The server answered: the programs may use it for `valid_for` from now.
    pub fn renew(&mut self, valid_for: Duration) {
        let until = monotonic_ns().saturating_add(valid_for.as_nanos() as u64);
        let _ = self.array.set(0, until, 0);
    }

    /// The server stops (a clean shutdown): hand its frontends back at once.
    pub fn revoke(&mut self) {
        let _ = self.array.set(0, 0, 0);
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| (t.tv_sec() as u64) * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
