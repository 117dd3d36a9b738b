//! The agent's mirror of what the socket-LB maps hold, and the reconciler that moves
//! them to a desired state with as few writes as possible, in an order where a
//! concurrent connect() never sees a half-written service:
//!
//! 1. new backend addresses are written first (nothing references them yet);
//! 2. a frontend's backend list is replaced by one map update (atomic: the list maps
//!    are `BPF_F_NO_PREALLOC`, so readers see the old or the new value, never a mix);
//! 3. the frontend entry is written only if its action/class/affinity changed;
//! 4. backends nobody references any more are deleted last.
//!
//! One endpoint change therefore costs one list write plus one backend write or
//! delete. The kernel is reached through [`MapOps`], so all of this is unit-tested
//! against a recording fake.

use std::collections::{HashMap, HashSet};

use ferry_common::{BackendAddr, Frontend, FrontendKey, LIST_CAPACITY, VipKey, flags};
use tracing::warn;

use super::layout::{DesiredFrontend, backend_addr};

/// A map operation failed. The proxy loop retries with a full sync either way.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The map has no room (max entries reached). Not fatal: the frontend is skipped.
    #[error("eBPF map {map} is full (raise its size with the --bpf-max-* flags)")]
    Full { map: &'static str },
    /// Opening, reading or writing a map failed for another reason; `source` has the
    /// syscall and errno.
    #[error("eBPF map {map}: {op} failed")]
    Failed {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Everything the maps hold, as read back from the kernel.
#[derive(Clone, Debug, Default)]
pub struct KernelState {
    /// Frontends map entries.
    pub frontends: Vec<(FrontendKey, Frontend)>,
    /// (class, frontend id, backend ids).
    pub lists: Vec<(u8, u32, Vec<u32>)>,
    /// Backends map entries (id, address).
    pub backends: Vec<(u32, BackendAddr)>,
    /// The ClusterIP set.
    pub vips: Vec<VipKey>,
    /// (frontend id, backend id) pairs of affinity frontends.
    pub affinity_backends: Vec<(u32, u32)>,
}

/// The map operations the reconciler needs: the kernel maps in production
/// (`KernelMaps`), a recording fake in tests. Deleting an absent entry succeeds.
pub trait MapOps {
    /// Inserts or replaces a frontend.
    fn put_frontend(&mut self, key: &FrontendKey, value: &Frontend) -> Result<(), MapError>;
    /// Deletes a frontend.
    fn del_frontend(&mut self, key: &FrontendKey) -> Result<(), MapError>;
    /// Writes frontend `id`'s backend list into the map of size class `class`.
    fn put_list(&mut self, class: u8, id: u32, ids: &[u32]) -> Result<(), MapError>;
    /// Deletes frontend `id`'s list from the map of `class`.
    fn del_list(&mut self, class: u8, id: u32) -> Result<(), MapError>;
    /// Inserts or replaces backend `id`.
    fn put_backend(&mut self, id: u32, addr: &BackendAddr) -> Result<(), MapError>;
    /// Deletes backend `id`.
    fn del_backend(&mut self, id: u32) -> Result<(), MapError>;
    /// Adds a ClusterIP to the set.
    fn put_vip(&mut self, key: &VipKey) -> Result<(), MapError>;
    /// Removes a ClusterIP from the set.
    fn del_vip(&mut self, key: &VipKey) -> Result<(), MapError>;
    /// Records that backend `backend` serves affinity frontend `id` (sticky entries
    /// to it stay valid).
    fn put_affinity_backend(&mut self, id: u32, backend: u32) -> Result<(), MapError>;
    /// Removes that record: clients stuck to `backend` through `id` choose again.
    fn del_affinity_backend(&mut self, id: u32, backend: u32) -> Result<(), MapError>;
    /// Reads the maps back.
    fn read_all(&mut self) -> Result<KernelState, MapError>;
}

/// The smallest list class that holds `n` backends.
fn list_class(n: usize) -> u8 {
    LIST_CAPACITY
        .iter()
        .position(|&cap| n <= cap)
        .unwrap_or(LIST_CAPACITY.len() - 1) as u8
}

#[derive(Clone, Debug)]
struct Entry {
    value: Frontend,
    /// Backend ids in list order; empty when the frontend has no list.
    backends: Vec<u32>,
    has_list: bool,
}

#[derive(Clone, Debug)]
struct BackendSlot {
    addr: BackendAddr,
    refs: u32,
}

/// Mirror of the kernel maps.
#[derive(Debug, Default)]
pub struct Programmed {
    frontends: HashMap<FrontendKey, Entry>,
    /// Ids of the frontends above.
    frontend_ids: HashSet<u32>,
    backends: HashMap<u32, BackendSlot>,
    backend_ids: HashMap<BackendAddr, u32>,
    /// ClusterIP -> number of ClusterIP frontends on it.
    vips: HashMap<VipKey, u32>,
    next_frontend_id: u32,
    next_backend_id: u32,
}

/// The ClusterIP set key of a frontend.
fn vip_of(key: &FrontendKey) -> VipKey {
    VipKey {
        addr: key.addr,
        family: key.family,
        _pad: [0; 3],
    }
}

/// Whether a frontend is a ClusterIP (counted in the ClusterIP set).
fn is_cluster_ip(value: &Frontend) -> bool {
    value.flags & flags::CLUSTER_IP != 0
}

/// The backends a frontend's sticky entries may use: its list, when it has ClientIP
/// affinity (nothing otherwise).
fn affinity_backends<'a>(value: &Frontend, has_list: bool, backends: &'a [u32]) -> &'a [u32] {
    match has_list && value.flags & flags::AFFINITY != 0 {
        true => backends,
        false => &[],
    }
}

/// Whether frontend flags say "balance across the list".
fn forwards(flags_: u16) -> bool {
    flags_ & flags::ACTION_MASK == flags::ACTION_FORWARD
}

/// The backend addresses of `desired`, cut to what the largest list holds.
fn wanted_backends(desired: &DesiredFrontend) -> Vec<BackendAddr> {
    let mut wanted: Vec<BackendAddr> = desired.backends.iter().map(backend_addr).collect();
    let max = LIST_CAPACITY[LIST_CAPACITY.len() - 1];
    if wanted.len() > max {
        warn!(
            backends = wanted.len(),
            max, "service has more backends than one eBPF list holds; using the first {max}"
        );
        wanted.truncate(max);
    }
    wanted
}

/// Before step 2 of an upsert: records the backends of affinity frontend `id` that
/// were not yet its (`old`), so sticky entries to them hold. Returns those added,
/// all or none.
fn put_affinity_backends(
    ops: &mut dyn MapOps,
    id: u32,
    old: &[u32],
    new: &[u32],
) -> Result<Vec<u32>, MapError> {
    let old: HashSet<u32> = old.iter().copied().collect();
    let mut added = Vec::new();
    for &backend in new.iter().filter(|b| !old.contains(b)) {
        if let Err(e) = ops.put_affinity_backend(id, backend) {
            for &b in &added {
                ops.del_affinity_backend(id, b)?;
            }
            return Err(e);
        }
        added.push(backend);
    }
    Ok(added)
}

/// Steps 2 and 3 of an upsert: the list in one update, then the frontend if it
/// changed. If the frontend write fails, a list it alone would have used is deleted.
fn write_entry(
    ops: &mut dyn MapOps,
    key: &FrontendKey,
    value: &Frontend,
    existing: Option<&Entry>,
    ids: &[u32],
    needs_list: bool,
) -> Result<(), MapError> {
    if needs_list {
        ops.put_list(value.list_class, value.id, ids)?;
    }
    if existing.is_none_or(|e| e.value != *value)
        && let Err(e) = ops.put_frontend(key, value)
    {
        if needs_list
            && existing.is_none_or(|e| !e.has_list || e.value.list_class != value.list_class)
        {
            ops.del_list(value.list_class, value.id)?;
        }
        return Err(e);
    }
    Ok(())
}

impl Programmed {
    /// Adopts what the maps already hold (after a restart, or to catch outside
    /// changes on a full sync), deleting whatever is inconsistent: lists without a
    /// frontend, unreferenced backends, ClusterIP entries without a frontend.
    pub fn adopt(ops: &mut dyn MapOps) -> Result<Self, MapError> {
        let state = ops.read_all()?;
        let mut me = Self {
            next_frontend_id: 1,
            next_backend_id: 1,
            ..Self::default()
        };
        me.adopt_backends(&state.backends);
        let mut lists: HashMap<(u8, u32), Vec<u32>> = state
            .lists
            .into_iter()
            .map(|(class, id, ids)| ((class, id), ids))
            .collect();
        for (key, value) in state.frontends {
            let list = lists.remove(&(value.list_class, value.id));
            me.adopt_frontend(ops, key, value, list)?;
        }
        for ((class, id), _) in lists {
            ops.del_list(class, id)?;
        }
        me.release_unused(ops)?;
        me.reconcile_vips(ops, &state.vips)?;
        me.reconcile_affinity_backends(ops, &state.affinity_backends)?;
        Ok(me)
    }

    /// Takes the backends read back, unreferenced until frontends claim them.
    fn adopt_backends(&mut self, backends: &[(u32, BackendAddr)]) {
        for (id, addr) in backends {
            self.backends.insert(
                *id,
                BackendSlot {
                    addr: *addr,
                    refs: 0,
                },
            );
            self.backend_ids.insert(*addr, *id);
            self.next_backend_id = self.next_backend_id.max(id.wrapping_add(1));
        }
    }

    /// Takes one frontend read back with its list, or deletes both when the list
    /// points at unknown backends (the reconcile that follows rewrites it).
    fn adopt_frontend(
        &mut self,
        ops: &mut dyn MapOps,
        key: FrontendKey,
        value: Frontend,
        list: Option<Vec<u32>>,
    ) -> Result<(), MapError> {
        self.next_frontend_id = self.next_frontend_id.max(value.id.wrapping_add(1));
        let has_list = list.is_some();
        let ids = list.unwrap_or_default();
        if forwards(value.flags) && ids.iter().any(|id| !self.backends.contains_key(id)) {
            ops.del_frontend(&key)?;
            return ops.del_list(value.list_class, value.id);
        }
        for id in &ids {
            if let Some(slot) = self.backends.get_mut(id) {
                slot.refs += 1;
            }
        }
        if is_cluster_ip(&value) {
            *self.vips.entry(vip_of(&key)).or_default() += 1;
        }
        self.frontend_ids.insert(value.id);
        self.frontends.insert(
            key,
            Entry {
                value,
                backends: ids,
                has_list,
            },
        );
        Ok(())
    }

    /// Deletes the backends no frontend references.
    fn release_unused(&mut self, ops: &mut dyn MapOps) -> Result<(), MapError> {
        let unused: Vec<u32> = self
            .backends
            .iter()
            .filter(|(_, s)| s.refs == 0)
            .map(|(id, _)| *id)
            .collect();
        for id in unused {
            self.release_slot(ops, id)?;
        }
        Ok(())
    }

    /// Makes the ClusterIP set (`found` in the map) match the ClusterIP frontends.
    fn reconcile_vips(&self, ops: &mut dyn MapOps, found: &[VipKey]) -> Result<(), MapError> {
        let wanted: HashSet<VipKey> = self.vips.keys().copied().collect();
        for vip in found.iter().filter(|v| !wanted.contains(v)) {
            ops.del_vip(vip)?;
        }
        for vip in wanted.iter().filter(|v| !found.contains(v)) {
            ops.put_vip(vip)?;
        }
        Ok(())
    }

    /// Makes the affinity backends (`found` in the map) match the affinity frontends'
    /// lists.
    fn reconcile_affinity_backends(
        &self,
        ops: &mut dyn MapOps,
        found: &[(u32, u32)],
    ) -> Result<(), MapError> {
        let wanted: HashSet<(u32, u32)> = (self.frontends.values())
            .flat_map(|e| {
                let ids = affinity_backends(&e.value, e.has_list, &e.backends);
                ids.iter().map(|&b| (e.value.id, b))
            })
            .collect();
        let found_set: HashSet<(u32, u32)> = found.iter().copied().collect();
        for &(id, backend) in found_set.difference(&wanted) {
            ops.del_affinity_backend(id, backend)?;
        }
        for &(id, backend) in wanted.difference(&found_set) {
            ops.put_affinity_backend(id, backend)?;
        }
        Ok(())
    }

    /// Frontend keys currently programmed.
    pub fn keys(&self) -> impl Iterator<Item = &FrontendKey> {
        self.frontends.keys()
    }

    /// The programmed value of one frontend and how many backends its list holds.
    pub fn frontend(&self, key: &FrontendKey) -> Option<(&Frontend, usize)> {
        self.frontends
            .get(key)
            .map(|e| (&e.value, e.backends.len()))
    }

    /// Number of frontends and backends programmed.
    pub fn counts(&self) -> (usize, usize) {
        (self.frontends.len(), self.backends.len())
    }

    /// Brings one frontend to its desired state, in the order of the module docs.
    pub fn upsert(
        &mut self,
        ops: &mut dyn MapOps,
        desired: &DesiredFrontend,
    ) -> Result<(), MapError> {
        let wanted = wanted_backends(desired);
        let existing = self.frontends.get(&desired.key).cloned();
        let needs_list = forwards(desired.flags) && !wanted.is_empty();
        if let Some(entry) = &existing
            && self.unchanged(entry, desired, &wanted, needs_list)
        {
            return Ok(());
        }
        // 1. Backends first.
        let ids = self.acquire_all(ops, &wanted)?;
        let id = existing
            .as_ref()
            .map(|e| e.value.id)
            .unwrap_or_else(|| self.alloc_frontend_id());
        let list_class = if needs_list {
            list_class(ids.len())
        } else {
            existing.as_ref().map(|e| e.value.list_class).unwrap_or(0)
        };
        let value = Frontend {
            id,
            flags: desired.flags,
            list_class,
            _pad: 0,
            affinity_timeout: desired.affinity_timeout,
        };
        let old_sticky = existing.as_ref().map_or(&[][..], |e| {
            affinity_backends(&e.value, e.has_list, &e.backends)
        });
        let added = match put_affinity_backends(
            ops,
            id,
            old_sticky,
            affinity_backends(&value, needs_list, &ids),
        ) {
            Ok(added) => added,
            Err(e) => {
                self.abandon(ops, existing.is_none().then_some(id), &ids)?;
                return Err(e);
            }
        };
        // 2. and 3.
        if let Err(e) = write_entry(
            ops,
            &desired.key,
            &value,
            existing.as_ref(),
            &ids,
            needs_list,
        ) {
            for backend in added {
                ops.del_affinity_backend(id, backend)?;
            }
            self.abandon(ops, existing.is_none().then_some(id), &ids)?;
            return Err(e);
        }
        if is_cluster_ip(&value) && existing.as_ref().is_none_or(|e| !is_cluster_ip(&e.value)) {
            self.vip_ref(ops, &desired.key)?;
        }
        // 4. Clean up what the old version used.
        if let Some(old) = existing {
            self.clean_up_old(ops, &desired.key, &old, &value, &ids, needs_list)?;
        }
        self.frontends.insert(
            desired.key,
            Entry {
                value,
                backends: if needs_list { ids } else { Vec::new() },
                has_list: needs_list,
            },
        );
        Ok(())
    }

    /// Whether `entry` already is `desired` (compared by address, so nothing is
    /// acquired for a no-op).
    fn unchanged(
        &self,
        entry: &Entry,
        desired: &DesiredFrontend,
        wanted: &[BackendAddr],
        needs_list: bool,
    ) -> bool {
        let same_backends = entry.backends.len() == wanted.len()
            && entry
                .backends
                .iter()
                .zip(wanted)
                .all(|(id, addr)| self.backends.get(id).is_some_and(|s| s.addr == *addr));
        same_backends
            && entry.has_list == needs_list
            && entry.value.flags == desired.flags
            && entry.value.affinity_timeout == desired.affinity_timeout
            && (!needs_list || entry.value.list_class == list_class(wanted.len()))
    }

    /// Takes a reference on (writing if new) each backend, all or none.
    fn acquire_all(
        &mut self,
        ops: &mut dyn MapOps,
        wanted: &[BackendAddr],
    ) -> Result<Vec<u32>, MapError> {
        let mut ids = Vec::with_capacity(wanted.len());
        for addr in wanted {
            match self.acquire(ops, addr) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    self.release_all(ops, &ids)?;
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    /// Step 4 of an upsert that replaced `old` by `new`: its list if `new` moved
    /// away from it, affinity to backends it dropped, its ClusterIP, its backends.
    fn clean_up_old(
        &mut self,
        ops: &mut dyn MapOps,
        key: &FrontendKey,
        old: &Entry,
        new: &Frontend,
        ids: &[u32],
        needs_list: bool,
    ) -> Result<(), MapError> {
        if old.has_list && (!needs_list || old.value.list_class != new.list_class) {
            ops.del_list(old.value.list_class, new.id)?;
        }
        let kept: HashSet<u32> = affinity_backends(new, needs_list, ids)
            .iter()
            .copied()
            .collect();
        for &gone in affinity_backends(&old.value, old.has_list, &old.backends) {
            if !kept.contains(&gone) {
                ops.del_affinity_backend(new.id, gone)?;
            }
        }
        if is_cluster_ip(&old.value) && !is_cluster_ip(new) {
            self.vip_unref(ops, key)?;
        }
        self.release_all(ops, &old.backends)
    }

    /// Removes one frontend (and whatever only it used).
    pub fn remove(&mut self, ops: &mut dyn MapOps, key: &FrontendKey) -> Result<(), MapError> {
        let Some(entry) = self.frontends.get(key).cloned() else {
            return Ok(());
        };
        ops.del_frontend(key)?;
        self.frontends.remove(key);
        self.frontend_ids.remove(&entry.value.id);
        if entry.has_list {
            ops.del_list(entry.value.list_class, entry.value.id)?;
        }
        for &backend in affinity_backends(&entry.value, entry.has_list, &entry.backends) {
            ops.del_affinity_backend(entry.value.id, backend)?;
        }
        if is_cluster_ip(&entry.value) {
            self.vip_unref(ops, key)?;
        }
        self.release_all(ops, &entry.backends)
    }

    fn alloc_frontend_id(&mut self) -> u32 {
        loop {
            let id = self.next_frontend_id.max(1);
            self.next_frontend_id = id.checked_add(1).unwrap_or(1);
            if !self.frontend_ids.contains(&id) {
                self.frontend_ids.insert(id);
                return id;
            }
        }
    }

    /// Undoes a failed upsert's allocations.
    fn abandon(
        &mut self,
        ops: &mut dyn MapOps,
        new_id: Option<u32>,
        ids: &[u32],
    ) -> Result<(), MapError> {
        if let Some(id) = new_id {
            self.frontend_ids.remove(&id);
        }
        self.release_all(ops, ids)
    }

    fn acquire(&mut self, ops: &mut dyn MapOps, addr: &BackendAddr) -> Result<u32, MapError> {
        if let Some(&id) = self.backend_ids.get(addr) {
            if let Some(slot) = self.backends.get_mut(&id) {
                slot.refs += 1;
            }
            return Ok(id);
        }
        // Ids count up and wrap; an id is reused only when free, and only after the
        // whole space went round, so a reader holding an old list never meets a
        // recycled id in practice.
        let mut id = self.next_backend_id.max(1);
        while self.backends.contains_key(&id) {
            id = id.checked_add(1).unwrap_or(1);
        }
        self.next_backend_id = id.checked_add(1).unwrap_or(1);
        ops.put_backend(id, addr)?;
        self.backends.insert(
            id,
            BackendSlot {
                addr: *addr,
                refs: 1,
            },
        );
        self.backend_ids.insert(*addr, id);
        Ok(id)
    }

    fn release_all(&mut self, ops: &mut dyn MapOps, ids: &[u32]) -> Result<(), MapError> {
        for &id in ids {
            let free = match self.backends.get_mut(&id) {
                Some(slot) => {
                    slot.refs = slot.refs.saturating_sub(1);
                    slot.refs == 0
                }
                None => false,
            };
            if free {
                self.release_slot(ops, id)?;
            }
        }
        Ok(())
    }

    fn release_slot(&mut self, ops: &mut dyn MapOps, id: u32) -> Result<(), MapError> {
        ops.del_backend(id)?;
        if let Some(slot) = self.backends.remove(&id) {
            self.backend_ids.remove(&slot.addr);
        }
        Ok(())
    }

    fn vip_ref(&mut self, ops: &mut dyn MapOps, key: &FrontendKey) -> Result<(), MapError> {
        let vip = vip_of(key);
        let refs = self.vips.entry(vip).or_default();
        *refs += 1;
        if *refs == 1 {
            ops.put_vip(&vip)?;
        }
        Ok(())
    }

    fn vip_unref(&mut self, ops: &mut dyn MapOps, key: &FrontendKey) -> Result<(), MapError> {
        let vip = vip_of(key);
        if let Some(refs) = self.vips.get_mut(&vip) {
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.vips.remove(&vip);
                ops.del_vip(&vip)?;
            }
        }
        Ok(())
    }
}

/// An in-memory [`MapOps`] that records every write: the reconciler's tests, and a
/// reference for what the kernel maps must contain.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub state: KernelState,
    pub writes: Vec<String>,
    /// Maps that reject inserts as full.
    pub full: HashSet<&'static str>,
}

#[cfg(test)]
impl FakeMaps {
    fn log(&mut self, op: impl Into<String>) {
        self.writes.push(op.into());
    }
}

#[cfg(test)]
impl MapOps for FakeMaps {
    fn put_frontend(&mut self, key: &FrontendKey, value: &Frontend) -> Result<(), MapError> {
        if self.full.contains("frontends") {
            return Err(MapError::Full { map: "frontends" });
        }
        self.state.frontends.retain(|(k, _)| k != key);
        self.state.frontends.push((*key, *value));
        self.log(format!("put_frontend {}", value.id));
        Ok(())
    }
    fn del_frontend(&mut self, key: &FrontendKey) -> Result<(), MapError> {
        self.state.frontends.retain(|(k, _)| k != key);
        self.log("del_frontend");
        Ok(())
    }
    fn put_list(&mut self, class: u8, id: u32, ids: &[u32]) -> Result<(), MapError> {
        self.state
            .lists
            .retain(|(c, i, _)| !(*c == class && *i == id));
        self.state.lists.push((class, id, ids.to_vec()));
        self.log(format!("put_list {class} {id} {ids:?}"));
        Ok(())
    }
    fn del_list(&mut self, class: u8, id: u32) -> Result<(), MapError> {
        self.state
            .lists
            .retain(|(c, i, _)| !(*c == class && *i == id));
        self.log(format!("del_list {class} {id}"));
        Ok(())
    }
    fn put_backend(&mut self, id: u32, addr: &BackendAddr) -> Result<(), MapError> {
        if self.full.contains("backends") {
            return Err(MapError::Full { map: "backends" });
        }
        self.state.backends.retain(|(i, _)| *i != id);
        self.state.backends.push((id, *addr));
        self.log(format!("put_backend {id}"));
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.state.backends.retain(|(i, _)| *i != id);
        self.log(format!("del_backend {id}"));
        Ok(())
    }
    fn put_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.state.vips.retain(|v| v != key);
        self.state.vips.push(*key);
        self.log("put_vip");
        Ok(())
    }
    fn del_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.state.vips.retain(|v| v != key);
        self.log("del_vip");
        Ok(())
    }
    fn put_affinity_backend(&mut self, id: u32, backend: u32) -> Result<(), MapError> {
        if self.full.contains("affinity_backends") {
            return Err(MapError::Full {
                map: "affinity_backends",
            });
        }
        self.state.affinity_backends.retain(|p| *p != (id, backend));
        self.state.affinity_backends.push((id, backend));
        self.log(format!("put_affinity_backend {id} {backend}"));
        Ok(())
    }
    fn del_affinity_backend(&mut self, id: u32, backend: u32) -> Result<(), MapError> {
        self.state.affinity_backends.retain(|p| *p != (id, backend));
        self.log(format!("del_affinity_backend {id} {backend}"));
        Ok(())
    }
    fn read_all(&mut self) -> Result<KernelState, MapError> {
        Ok(self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ebpf::layout::{frontend_key, words_addr};
    use crate::model::Endpoint;

    fn be(i: u8) -> Endpoint {
        Endpoint {
            ip: format!("10.244.0.{i}").parse().unwrap(),
            port: 8080,
        }
    }

    /// The id the maps gave backend `be(i)`.
    fn backend_id(maps: &FakeMaps, i: u8) -> u32 {
        let addr = backend_addr(&be(i));
        maps.state
            .backends
            .iter()
            .find(|(_, a)| *a == addr)
            .unwrap()
            .0
    }

    fn desired(ip: &str, backends: &[Endpoint], extra_flags: u16) -> DesiredFrontend {
        DesiredFrontend {
            key: frontend_key(ip.parse().unwrap(), 80, 6),
            flags: flags::ACTION_FORWARD | flags::CLUSTER_IP | extra_flags,
            affinity_timeout: 0,
            backends: backends.to_vec(),
        }
    }

    /// Resolves what a connect() to `key` would choose from, via the fake maps only.
    fn resolve(maps: &FakeMaps, key: &FrontendKey) -> Option<Vec<String>> {
        let (_, fe) = maps.state.frontends.iter().find(|(k, _)| k == key)?;
        let (_, _, ids) = maps
            .state
            .lists
            .iter()
            .find(|(c, i, _)| *c == fe.list_class && *i == fe.id)?;
        ids.iter()
            .map(|id| {
                let (_, addr) = maps.state.backends.iter().find(|(i, _)| i == id)?;
                Some(words_addr(addr.addr, addr.family).to_string())
            })
            .collect()
    }

    #[test]
    fn one_endpoint_change_is_a_handful_of_writes() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        let backends: Vec<Endpoint> = (1..=50).map(be).collect();
        prog.upsert(&mut maps, &desired("10.96.0.10", &backends, 0))
            .unwrap();
        let key = frontend_key("10.96.0.10".parse().unwrap(), 80, 6);
        assert_eq!(resolve(&maps, &key).unwrap().len(), 50);

        // Add one endpoint: one backend write + one list write.
        maps.writes.clear();
        let mut more = backends.clone();
        more.push(be(51));
        prog.upsert(&mut maps, &desired("10.96.0.10", &more, 0))
            .unwrap();
        assert_eq!(maps.writes.len(), 2, "{:?}", maps.writes);
        assert!(maps.writes[0].starts_with("put_backend"));
        assert!(maps.writes[1].starts_with("put_list"));

        // Remove one: list write, then the backend goes.
        maps.writes.clear();
        prog.upsert(&mut maps, &desired("10.96.0.10", &backends[1..], 0))
            .unwrap();
        assert_eq!(maps.writes.len(), 3, "{:?}", maps.writes);
        assert!(maps.writes[0].starts_with("put_list"));
        assert!(
            maps.writes
                .iter()
                .filter(|w| w.starts_with("del_backend"))
                .count()
                == 2
        );
        assert_eq!(resolve(&maps, &key).unwrap().len(), 49);

        // No change: no writes.
        maps.writes.clear();
        prog.upsert(&mut maps, &desired("10.96.0.10", &backends[1..], 0))
            .unwrap();
        assert!(maps.writes.is_empty(), "{:?}", maps.writes);
    }

    #[test]
    fn growing_past_a_class_switches_lists_safely() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        let key = frontend_key("10.96.0.10".parse().unwrap(), 80, 6);
        prog.upsert(&mut maps, &desired("10.96.0.10", &[be(1)], 0))
            .unwrap();
        maps.writes.clear();
        let many: Vec<Endpoint> = (1..=20).map(be).collect();
        prog.upsert(&mut maps, &desired("10.96.0.10", &many, 0))
            .unwrap();
        // The new list is written before the frontend switches to it, and the old
        // list is deleted only after.
        let list = maps
            .writes
            .iter()
            .position(|w| w.starts_with("put_list 1"))
            .unwrap();
        let fe = maps
            .writes
            .iter()
            .position(|w| w.starts_with("put_frontend"))
            .unwrap();
        let del = maps
            .writes
            .iter()
            .position(|w| w.starts_with("del_list 0"))
            .unwrap();
        assert!(list < fe && fe < del, "{:?}", maps.writes);
        assert_eq!(resolve(&maps, &key).unwrap().len(), 20);
    }

    #[test]
    fn shared_backends_are_refcounted_and_vips_tracked() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        prog.upsert(&mut maps, &desired("10.96.0.10", &[be(1), be(2)], 0))
            .unwrap();
        prog.upsert(&mut maps, &desired("10.96.0.11", &[be(2)], 0))
            .unwrap();
        assert_eq!(maps.state.backends.len(), 2);
        assert_eq!(maps.state.vips.len(), 2);
        prog.remove(
            &mut maps,
            &frontend_key("10.96.0.10".parse().unwrap(), 80, 6),
        )
        .unwrap();
        assert_eq!(maps.state.backends.len(), 1, "backend 2 is still used");
        assert_eq!(maps.state.vips.len(), 1);
        assert_eq!(maps.state.lists.len(), 1);
    }

    #[test]
    fn reject_needs_no_list_and_affinity_follows_the_backends() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        let sticky = |maps: &FakeMaps| {
            let mut pairs = maps.state.affinity_backends.clone();
            pairs.sort();
            pairs
        };
        prog.upsert(
            &mut maps,
            &desired("10.96.0.10", &[be(1), be(2)], flags::AFFINITY),
        )
        .unwrap();
        let (fe, b1, b2) = (
            maps.state.frontends[0].1.id,
            backend_id(&maps, 1),
            backend_id(&maps, 2),
        );
        let mut both = vec![(fe, b1), (fe, b2)];
        both.sort();
        assert_eq!(sticky(&maps), both);
        maps.writes.clear();
        prog.upsert(&mut maps, &desired("10.96.0.10", &[be(2)], flags::AFFINITY))
            .unwrap();
        assert_eq!(sticky(&maps), [(fe, b2)]);
        assert!(
            maps.writes
                .contains(&format!("del_affinity_backend {fe} {b1}")),
            "only the gone backend is touched: {:?}",
            maps.writes
        );
        // A restart adopts the pairs; an orphan pair is dropped, a missing one put back.
        maps.state.affinity_backends = vec![(fe, b1), (99, b2)];
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        assert_eq!(sticky(&maps), [(fe, b2)]);

        let mut reject = desired("10.96.0.10", &[], 0);
        reject.flags = flags::ACTION_REJECT | flags::CLUSTER_IP;
        prog.upsert(&mut maps, &reject).unwrap();
        assert!(maps.state.lists.is_empty() && maps.state.backends.is_empty());
        assert!(maps.state.affinity_backends.is_empty(), "affinity is off");
        assert_eq!(maps.state.frontends.len(), 1);
    }

    #[test]
    fn removing_an_affinity_frontend_removes_its_backends_and_a_full_map_undoes_the_upsert() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        prog.upsert(&mut maps, &desired("10.96.0.10", &[be(1)], flags::AFFINITY))
            .unwrap();
        prog.remove(
            &mut maps,
            &frontend_key("10.96.0.10".parse().unwrap(), 80, 6),
        )
        .unwrap();
        assert!(maps.state.affinity_backends.is_empty());

        maps.full.insert("affinity_backends");
        let err = prog.upsert(&mut maps, &desired("10.96.0.11", &[be(1)], flags::AFFINITY));
        assert!(matches!(err, Err(MapError::Full { .. })));
        assert!(maps.state.frontends.is_empty() && maps.state.backends.is_empty());
    }

    #[test]
    fn adoption_keeps_good_state_and_drops_orphans() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        prog.upsert(&mut maps, &desired("10.96.0.10", &[be(1), be(2)], 0))
            .unwrap();
        // Orphans a crash could leave: a list without frontend, an unused backend.
        maps.state.lists.push((0, 999, vec![1]));
        maps.state.backends.push((777, backend_addr(&be(9))));
        maps.writes.clear();
        let mut adopted = Programmed::adopt(&mut maps).unwrap();
        assert_eq!(adopted.counts(), (1, 2));
        assert!(maps.writes.contains(&"del_list 0 999".to_string()));
        assert!(maps.writes.contains(&"del_backend 777".to_string()));
        // Reconciling the same desired state after adoption writes nothing.
        maps.writes.clear();
        adopted
            .upsert(&mut maps, &desired("10.96.0.10", &[be(1), be(2)], 0))
            .unwrap();
        assert!(maps.writes.is_empty(), "{:?}", maps.writes);
        // And new ids do not collide with adopted ones.
        adopted
            .upsert(&mut maps, &desired("10.96.0.12", &[be(3)], 0))
            .unwrap();
        let ids: HashSet<u32> = maps.state.frontends.iter().map(|(_, f)| f.id).collect();
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn full_map_leaves_state_consistent() {
        let mut maps = FakeMaps::default();
        let mut prog = Programmed::adopt(&mut maps).unwrap();
        prog.upsert(&mut maps, &desired("10.96.0.10", &[be(1)], 0))
            .unwrap();
        maps.full.insert("frontends");
        let err = prog
            .upsert(&mut maps, &desired("10.96.0.11", &[be(1), be(2)], 0))
            .unwrap_err();
        assert!(matches!(err, MapError::Full { map: "frontends" }));
        // Nothing leaked: only the first frontend's backend and list remain.
        assert_eq!(maps.state.backends.len(), 1);
        assert_eq!(maps.state.lists.len(), 1);
        maps.full.clear();
        prog.upsert(&mut maps, &desired("10.96.0.11", &[be(1), be(2)], 0))
            .unwrap();
        assert_eq!(maps.state.backends.len(), 2);
    }

    #[test]
    fn classes() {
        assert_eq!(list_class(1), 0);
        assert_eq!(list_class(16), 0);
        assert_eq!(list_class(17), 1);
        assert_eq!(list_class(4097), 3);
    }
}
