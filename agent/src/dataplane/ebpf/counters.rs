//! The per-frontend connection counters (`ferry_fecnt_v1`): the agent creates a
//! frontend's entry when it programs the frontend and deletes it with it, so the
//! programs only look entries up and count, and the map holds exactly the frontends
//! programmed.

use std::collections::HashSet;
use std::path::Path;

use aya::maps::{MapData, PerCpuHashMap, PerCpuValues};
use ferry_common::{FrontendCounters, maps};

use super::kernel::open;
use super::state::MapError;

/// `BPF_NOEXIST`: keep the counts of a frontend that already has an entry.
const NOEXIST: u64 = 1;

/// The pinned counters map.
pub struct FrontendCounterMap {
    map: PerCpuHashMap<MapData, u32, FrontendCounters>,
    cpus: usize,
}

impl FrontendCounterMap {
    /// Opens the pinned map.
    pub fn open(dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            map: open(dir, &maps::FRONTEND_COUNTERS)?,
            cpus: aya::util::nr_cpus().map_or(1, |n| n.max(1)),
        })
    }

    /// Gives frontend `id` an entry at zero unless it has one. A failure (a full map)
    /// only means its connections are not counted.
    pub fn ensure(&mut self, id: u32) {
        let Ok(zero) = PerCpuValues::try_from(vec![FrontendCounters::default(); self.cpus]) else {
            return;
        };
        let _ = self.map.insert(id, zero, NOEXIST);
    }

    /// Drops frontend `id`'s entry (it is no longer programmed).
    pub fn forget(&mut self, id: u32) {
        let _ = self.map.remove(&id);
    }

    /// Drops the entries of frontends not in `live` (after adopting a previous
    /// agent's maps).
    pub fn retain(&mut self, live: &HashSet<u32>) {
        let stale: Vec<u32> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        for id in stale {
            self.forget(id);
        }
    }
}
