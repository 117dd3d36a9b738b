//! The maps, pinned by name so they outlive the agent (restart without disruption).
//! Layouts and names come from `ferry-common`; default sizes here are overridden by
//! the agent at load time (`--bpf-map-*` flags).

use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use ferry_common::{
    AffinityKey, AffinityValue, BackendAddr, BackendList, Frontend, FrontendKey, ReverseKey,
    ReverseValue, VipKey, stats,
};

/// `BPF_F_NO_PREALLOC`: elements are allocated per update and freed after an RCU
/// grace period, so a program reading a value never sees it half-rewritten (with
/// preallocation the kernel may recycle an element while a reader still uses it).
const NO_PREALLOC: u32 = 1;

#[map(name = "ferry_fe_v1")]
pub static FRONTENDS: HashMap<FrontendKey, Frontend> = HashMap::pinned(65_536, NO_PREALLOC);

#[map(name = "ferry_be_v1")]
pub static BACKENDS: HashMap<u32, BackendAddr> = HashMap::pinned(262_144, NO_PREALLOC);

#[map(name = "ferry_ls16_v1")]
pub static LIST16: HashMap<u32, BackendList<16>> = HashMap::pinned(65_536, NO_PREALLOC);

#[map(name = "ferry_ls256_v1")]
pub static LIST256: HashMap<u32, BackendList<256>> = HashMap::pinned(16_384, NO_PREALLOC);

#[map(name = "ferry_ls4k_v1")]
pub static LIST4K: HashMap<u32, BackendList<4096>> = HashMap::pinned(1_024, NO_PREALLOC);

#[map(name = "ferry_ls64k_v1")]
pub static LIST64K: HashMap<u32, BackendList<65536>> = HashMap::pinned(64, NO_PREALLOC);

#[map(name = "ferry_vip_v1")]
pub static VIPS: HashMap<VipKey, u32> = HashMap::pinned(65_536, NO_PREALLOC);

#[map(name = "ferry_aff_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(65_536, 0);

#[map(name = "ferry_rev_v1")]
pub static REVERSE: LruHashMap<ReverseKey, ReverseValue> = LruHashMap::pinned(262_144, 0);

#[map(name = "ferry_stats_v1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

/// Adds one to a counter (per CPU, so no atomics needed).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of a live map value; programs on this CPU run one at a
        // time (cgroup sock_addr programs are not preempted mid-run).
        unsafe { *counter += 1 };
    }
}
