//! The pinned socket-LB maps, opened from bpffs: the real [`MapOps`], and what
//! `ferry inspect` reads.

use std::path::Path;

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use ferry_common::{
    AffinityBackend, BackendAddr, BackendList, Frontend, FrontendKey, LIST_CAPACITY, MapSpec,
    VipKey, maps, stats,
};

use super::state::{KernelState, MapError, MapOps};

type Hash<K, V> = HashMap<MapData, K, V>;

/// Handles to every map, opened from their pins.
pub struct KernelMaps {
    frontends: Hash<FrontendKey, Frontend>,
    backends: Hash<u32, BackendAddr>,
    list16: Hash<u32, BackendList<16>>,
    list256: Hash<u32, BackendList<256>>,
    list4k: Hash<u32, BackendList<4096>>,
    list64k: Hash<u32, BackendList<65536>>,
    vips: Hash<VipKey, u32>,
    affinity_backends: Hash<AffinityBackend, u32>,
    stats: PerCpuArray<MapData, u64>,
    /// Map updates done (for sync statistics).
    pub writes: usize,
}

/// Opens the map pinned in `dir` under `spec`'s name as a typed map.
pub(super) fn open<T>(dir: &Path, spec: &MapSpec) -> Result<T, MapError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let fail = |source| MapError::Failed {
        map: spec.name,
        op: "open",
        source,
    };
    let data = MapData::from_pin(dir.join(spec.name)).map_err(fail)?;
    let map = Map::from_map_data(data).map_err(fail)?;
    T::try_from(map).map_err(fail)
}

/// Classifies an update error: a full map is expected under load and handled;
/// anything else is a real failure.
fn update_error(map: &'static str, op: &'static str, e: aya::maps::MapError) -> MapError {
    if let aya::maps::MapError::SyscallError(sys) = &e
        && matches!(
            sys.io_error.raw_os_error(),
            Some(libc::E2BIG | libc::ENOMEM | libc::ENOSPC)
        )
    {
        return MapError::Full { map };
    }
    MapError::Failed { map, op, source: e }
}

/// Deleting something already gone is fine (the goal is its absence).
fn delete_result(map: &'static str, r: Result<(), aya::maps::MapError>) -> Result<(), MapError> {
    match r {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound | aya::maps::MapError::ElementNotFound) => {
            Ok(())
        }
        Err(aya::maps::MapError::SyscallError(sys))
            if sys.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(source) => Err(MapError::Failed {
            map,
            op: "delete",
            source,
        }),
    }
}

/// A failed read of `map`.
fn read_err(map: &'static str, source: aya::maps::MapError) -> MapError {
    MapError::Failed {
        map,
        op: "read",
        source,
    }
}

/// The name of the list map of `class` (the largest for anything above).
fn list_map(class: u8) -> &'static str {
    maps::LISTS[usize::from(class).min(LIST_CAPACITY.len() - 1)].name
}

/// Builds a list value on the heap (the largest class is 256 KiB).
fn list_value<const N: usize>(ids: &[u32]) -> Box<BackendList<N>> {
    let mut list = Box::new(BackendList {
        count: ids.len().min(N) as u32,
        _pad: 0,
        ids: [0u32; N],
    });
    let n = ids.len().min(N);
    list.ids[..n].copy_from_slice(&ids[..n]);
    list
}

/// Appends every list of one class map to `out` as (class, frontend id, ids).
fn read_lists<const N: usize>(
    map: &Hash<u32, BackendList<N>>,
    class: u8,
    out: &mut Vec<(u8, u32, Vec<u32>)>,
) -> Result<(), MapError> {
    for item in map.iter() {
        let (id, list) = item.map_err(|e| read_err(list_map(class), e))?;
        let n = (list.count as usize).min(N);
        out.push((class, id, list.ids[..n].to_vec()));
    }
    Ok(())
}

impl KernelMaps {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            frontends: open(dir, &maps::FRONTENDS)?,
            backends: open(dir, &maps::BACKENDS)?,
            list16: open(dir, &maps::LISTS[0])?,
            list256: open(dir, &maps::LISTS[1])?,
            list4k: open(dir, &maps::LISTS[2])?,
            list64k: open(dir, &maps::LISTS[3])?,
            vips: open(dir, &maps::VIPS)?,
            affinity_backends: open(dir, &maps::AFFINITY_BACKENDS)?,
            stats: open(dir, &maps::STATS)?,
            writes: 0,
        })
    }

    /// The data-path counters, summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        const NAMES: [(&str, u32); 6] = [
            ("translated", stats::TRANSLATED),
            ("rejected", stats::REJECTED),
            ("dropped", stats::DROPPED),
            ("no_port", stats::NO_PORT),
            ("missing", stats::MISSING),
            ("reversed", stats::REVERSED),
        ];
        NAMES
            .iter()
            .map(|(name, index)| {
                let sum = self
                    .stats
                    .get(index, 0)
                    .map(|values| values.iter().sum())
                    .unwrap_or(0);
                (*name, sum)
            })
            .collect()
    }
}

impl MapOps for KernelMaps {
    fn put_frontend(&mut self, key: &FrontendKey, value: &Frontend) -> Result<(), MapError> {
        self.writes += 1;
        self.frontends
            .insert(key, value, 0)
            .map_err(|e| update_error(maps::FRONTENDS.name, "insert", e))
    }

    fn del_frontend(&mut self, key: &FrontendKey) -> Result<(), MapError> {
        self.writes += 1;
        delete_result(maps::FRONTENDS.name, self.frontends.remove(key))
    }

    fn put_list(&mut self, class: u8, id: u32, ids: &[u32]) -> Result<(), MapError> {
        self.writes += 1;
        let name = list_map(class);
        let r = match class {
            0 => self.list16.insert(id, list_value::<16>(ids).as_ref(), 0),
            1 => self.list256.insert(id, list_value::<256>(ids).as_ref(), 0),
            2 => self.list4k.insert(id, list_value::<4096>(ids).as_ref(), 0),
            _ => self
                .list64k
                .insert(id, list_value::<65536>(ids).as_ref(), 0),
        };
        r.map_err(|e| update_error(name, "insert", e))
    }

    fn del_list(&mut self, class: u8, id: u32) -> Result<(), MapError> {
        self.writes += 1;
        let name = list_map(class);
        let r = match class {
            0 => self.list16.remove(&id),
            1 => self.list256.remove(&id),
            2 => self.list4k.remove(&id),
            _ => self.list64k.remove(&id),
        };
        delete_result(name, r)
    }

    fn put_backend(&mut self, id: u32, addr: &BackendAddr) -> Result<(), MapError> {
        self.writes += 1;
        self.backends
            .insert(id, addr, 0)
            .map_err(|e| update_error(maps::BACKENDS.name, "insert", e))
    }

    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.writes += 1;
        delete_result(maps::BACKENDS.name, self.backends.remove(&id))
    }

    fn put_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.writes += 1;
        self.vips
            .insert(key, 1, 0)
            .map_err(|e| update_error(maps::VIPS.name, "insert", e))
    }

    fn del_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.writes += 1;
        delete_result(maps::VIPS.name, self.vips.remove(key))
    }

    fn put_affinity_backend(&mut self, id: u32, backend: u32) -> Result<(), MapError> {
        self.writes += 1;
        let key = AffinityBackend {
            frontend_id: id,
            backend_id: backend,
        };
        (self.affinity_backends)
            .insert(key, 1, 0)
            .map_err(|e| update_error(maps::AFFINITY_BACKENDS.name, "insert", e))
    }

    fn del_affinity_backend(&mut self, id: u32, backend: u32) -> Result<(), MapError> {
        self.writes += 1;
        let key = AffinityBackend {
            frontend_id: id,
            backend_id: backend,
        };
        let removed = self.affinity_backends.remove(&key);
        delete_result(maps::AFFINITY_BACKENDS.name, removed)
    }

    fn read_all(&mut self) -> Result<KernelState, MapError> {
        let mut state = KernelState::default();
        for item in self.frontends.iter() {
            state
                .frontends
                .push(item.map_err(|e| read_err(maps::FRONTENDS.name, e))?);
        }
        for item in self.backends.iter() {
            state
                .backends
                .push(item.map_err(|e| read_err(maps::BACKENDS.name, e))?);
        }
        read_lists(&self.list16, 0, &mut state.lists)?;
        read_lists(&self.list256, 1, &mut state.lists)?;
        read_lists(&self.list4k, 2, &mut state.lists)?;
        read_lists(&self.list64k, 3, &mut state.lists)?;
        for item in self.vips.keys() {
            state
                .vips
                .push(item.map_err(|e| read_err(maps::VIPS.name, e))?);
        }
        for item in self.affinity_backends.keys() {
            let pair = item.map_err(|e| read_err(maps::AFFINITY_BACKENDS.name, e))?;
            state
                .affinity_backends
                .push((pair.frontend_id, pair.backend_id));
        }
        Ok(state)
    }
}
