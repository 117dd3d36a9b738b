//! The maps, pinned by name so they outlive the agent (restart without disruption).
//! Names, types, sizes and flags come from `ferry_common::maps`; the agent may
//! override the sizes at load time (`--bpf-max-*` flags).

use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf};
use ferry_common::{
    AffinityBackend, AffinityKey, AffinityValue, BackendAddr, BackendList, Frontend,
    FrontendCounters, FrontendKey, LIST_CAPACITY, MonitorWindow, ReverseKey, ReverseValue, VipKey,
    maps,
};

/// Declares a pinned map from its `ferry_common::maps` spec. `#[map]` needs the name
/// as a literal, so it is written here again and checked against the spec at compile
/// time, together with the key and value sizes; max entries and flags are the spec's.
macro_rules! pinned_map {
    ($name:literal => $static:ident: $map:ident<$key:ty, $value:ty> = $spec:expr) => {
        #[doc = concat!("The `", $name, "` map.")]
        #[map(name = $name)]
        pub static $static: $map<$key, $value> = $map::pinned($spec.max_entries, $spec.map_flags);
        const _: () = assert!($spec.declared_as::<$key, $value>($name));
    };
    // Arrays: the key is the `u32` index.
    ($name:literal => $static:ident: $map:ident<$value:ty> = $spec:expr) => {
        #[doc = concat!("The `", $name, "` map.")]
        #[map(name = $name)]
        pub static $static: $map<$value> = $map::pinned($spec.max_entries, $spec.map_flags);
        const _: () = assert!($spec.declared_as::<u32, $value>($name));
    };
}

pinned_map!("ferry_fe_v1" => FRONTENDS: HashMap<FrontendKey, Frontend> = maps::FRONTENDS);
pinned_map!("ferry_be_v1" => BACKENDS: HashMap<u32, BackendAddr> = maps::BACKENDS);
pinned_map!("ferry_ls16_v1" =>
    LIST16: HashMap<u32, BackendList<{ LIST_CAPACITY[0] }>> = maps::LISTS[0]);
pinned_map!("ferry_ls256_v1" =>
    LIST256: HashMap<u32, BackendList<{ LIST_CAPACITY[1] }>> = maps::LISTS[1]);
pinned_map!("ferry_ls4k_v1" =>
    LIST4K: HashMap<u32, BackendList<{ LIST_CAPACITY[2] }>> = maps::LISTS[2]);
pinned_map!("ferry_ls64k_v1" =>
    LIST64K: HashMap<u32, BackendList<{ LIST_CAPACITY[3] }>> = maps::LISTS[3]);
pinned_map!("ferry_vip_v1" => VIPS: HashMap<VipKey, u32> = maps::VIPS);
pinned_map!("ferry_aff_v1" => AFFINITY: LruHashMap<AffinityKey, AffinityValue> = maps::AFFINITY);
pinned_map!("ferry_affbe_v1" =>
    AFFINITY_BACKENDS: HashMap<AffinityBackend, u32> = maps::AFFINITY_BACKENDS);
pinned_map!("ferry_rev_v1" => REVERSE: LruHashMap<ReverseKey, ReverseValue> = maps::REVERSE);
pinned_map!("ferry_stats_v1" => STATS: PerCpuArray<u64> = maps::STATS);
pinned_map!("ferry_ldns_v1" => NODE_LOCAL_DNS: HashMap<FrontendKey, BackendAddr> = maps::NODE_LOCAL_DNS);
pinned_map!("ferry_dnsalive_v1" => DNS_ALIVE: Array<u64> = maps::DNS_ALIVE);
pinned_map!("ferry_fecnt_v1" =>
    FRONTEND_COUNTERS: PerCpuHashMap<u32, FrontendCounters> = maps::FRONTEND_COUNTERS);
pinned_map!("ferry_monitor_v1" => MONITOR: Array<u64> = maps::MONITOR);
pinned_map!("ferry_monwin_v1" => MONITOR_WINDOW: PerCpuArray<MonitorWindow> = maps::MONITOR_WINDOW);

/// The `ferry_events_v1` ring buffer (no key or value type, so not `pinned_map!`).
#[map(name = "ferry_events_v1")]
pub static EVENTS: RingBuf = RingBuf::pinned(maps::EVENTS.max_entries, maps::EVENTS.map_flags);
const _: () = assert!(maps::EVENTS.declared_as::<(), ()>("ferry_events_v1"));

/// Adds one to a counter (per CPU, so no atomics needed).
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: `get_ptr_mut` bounds-checked `index` and returned this CPU's slot of
        // the array, which lives as long as the map. Programs run with migration
        // disabled, so the slot stays this CPU's for the whole run; sock_addr hooks run
        // in syscall context, never in interrupts, so at worst a preempted run loses
        // one increment, harmless for a statistic.
        unsafe { *counter += 1 };
    }
}
