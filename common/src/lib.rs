#![no_std]
#![warn(missing_docs)]
//! The map ABI shared by Ferry's eBPF programs (`ferry-ebpf`) and the agent: key and
//! value layouts, flags, map names, sizes and types ([`maps`]), program names and
//! hooks ([`programs`]). One home for it, so both sides cannot drift; the agent's
//! tests check the compiled object against it.
//!
//! Rules (Cilium's, for the same reasons): `#[repr(C)]` with explicit padding, no
//! `bool`, bitfields or unions; a layout change gets a new map-name suffix (`_v2`),
//! since maps are pinned and outlive agent versions. Sizes and offsets are checked at
//! compile time at the bottom of this file.
//!
//! Addresses and ports are stored exactly as the kernel hands them to `cgroup/*`
//! programs: network byte order, IPv4 in `addr[0]` with the rest zero.

/// `family` value for IPv4 (`AF_INET`).
pub const FAMILY_V4: u8 = 2;
/// `family` value for IPv6 (`AF_INET6`).
pub const FAMILY_V6: u8 = 10;

/// The kernel's `bpf_map_type` of a map (values from `include/uapi/linux/bpf.h`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash = 1,
    /// `BPF_MAP_TYPE_ARRAY`.
    Array = 2,
    /// `BPF_MAP_TYPE_PERCPU_HASH`.
    PerCpuHash = 5,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PerCpuArray = 6,
    /// `BPF_MAP_TYPE_LRU_HASH`.
    LruHash = 9,
    /// `BPF_MAP_TYPE_RINGBUF` (no key or value; max entries is its size in bytes).
    RingBuf = 27,
}

/// One map of the ABI: the eBPF crate declares it from this, the agent loads, sizes
/// and opens it by it, and the agent's tests check the compiled object against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Name in the object, and of the pin under the agent's bpffs directory.
    pub name: &'static str,
    /// Map type.
    pub kind: MapKind,
    /// `size_of` the key type.
    pub key_size: u32,
    /// `size_of` the value type.
    pub value_size: u32,
    /// Default max entries, as compiled into the object (the agent may override it at
    /// load time, see the `--bpf-max-*` flags).
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub map_flags: u32,
}

impl MapSpec {
    const fn new<K, V>(name: &'static str, kind: MapKind, max_entries: u32, flags: u32) -> Self {
        Self {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            max_entries,
            map_flags: flags,
        }
    }

    /// Whether a map declared under `name` with key `K` and value `V` is this one.
    /// The eBPF crate asserts this at compile time for each map it declares, since its
    /// `#[map]` attribute needs the name as a literal.
    pub const fn declared_as<K, V>(&self, name: &str) -> bool {
        size_of::<K>() == self.key_size as usize
            && size_of::<V>() == self.value_size as usize
            && same_str(self.name, name)
    }
}

/// `a == b`, usable in `const` context.
const fn same_str(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Max entries of the backend-list map of size class `class` (index into
/// [`LIST_CAPACITY`]) when the frontends map holds `frontends`: every frontend may use
/// the smallest class, a quarter of them the next, 1/64 the one after; the largest
/// (256 KiB values) stays at 64 entries whatever the frontend count.
pub const fn list_max_entries(class: usize, frontends: u32) -> u32 {
    const FLOOR: u32 = 64;
    let n = match class {
        0 => return frontends,
        1 => frontends / 4,
        2 => frontends / 64,
        _ => return FLOOR,
    };
    if n > FLOOR { n } else { FLOOR }
}

/// The maps, pinned under the agent's bpffs directory by name.
pub mod maps {
    use super::{
        AffinityBackend, AffinityKey, AffinityValue, BackendAddr, BackendList, Frontend,
        FrontendCounters, FrontendKey, LIST_CAPACITY, MapKind, MapSpec, MonitorWindow, ReverseKey,
        ReverseValue, VipKey, list_max_entries, monitor, stats,
    };

    /// The DNS port, in network byte order as the hooks see it: only frontends on it
    /// are looked up in [`NODE_LOCAL_DNS`].
    pub const DNS_PORT_BE: u16 = 53u16.to_be();

    /// `BPF_F_NO_PREALLOC`: elements are allocated per update and freed after an RCU
    /// grace period, so a program reading a value never sees it half-rewritten (with
    /// preallocation the kernel may recycle an element while a reader still uses it).
    pub const NO_PREALLOC: u32 = 1;

    /// Default size of the frontends map, which the ClusterIP set and the list maps
    /// follow.
    const FRONTENDS_MAX: u32 = 65_536;

    /// [`FrontendKey`] -> [`Frontend`].
    pub const FRONTENDS: MapSpec = MapSpec::new::<FrontendKey, Frontend>(
        "ferry_fe_v1",
        MapKind::Hash,
        FRONTENDS_MAX,
        NO_PREALLOC,
    );
    /// `u32` backend id -> [`BackendAddr`].
    pub const BACKENDS: MapSpec =
        MapSpec::new::<u32, BackendAddr>("ferry_be_v1", MapKind::Hash, 262_144, NO_PREALLOC);
    /// `u32` frontend id -> [`BackendList`], one map per size class of
    /// [`LIST_CAPACITY`].
    pub const LISTS: [MapSpec; LIST_CAPACITY.len()] = [
        list::<{ LIST_CAPACITY[0] }>("ferry_ls16_v1", 0),
        list::<{ LIST_CAPACITY[1] }>("ferry_ls256_v1", 1),
        list::<{ LIST_CAPACITY[2] }>("ferry_ls4k_v1", 2),
        list::<{ LIST_CAPACITY[3] }>("ferry_ls64k_v1", 3),
    ];
    /// [`VipKey`] -> `u32` (1): ClusterIPs, to refuse ports no service exposes. At most
    /// one per frontend.
    pub const VIPS: MapSpec =
        MapSpec::new::<VipKey, u32>("ferry_vip_v1", MapKind::Hash, FRONTENDS_MAX, NO_PREALLOC);
    /// [`AffinityKey`] -> [`AffinityValue`] (LRU).
    pub const AFFINITY: MapSpec =
        MapSpec::new::<AffinityKey, AffinityValue>("ferry_aff_v1", MapKind::LruHash, 65_536, 0);
    /// [`AffinityBackend`] -> `u32` (1): the backends of each ClientIP-affinity
    /// frontend, so a sticky entry is checked against its frontend's current backends
    /// in one lookup, and the agent never has to walk [`AFFINITY`] when a backend
    /// goes. Sized like [`BACKENDS`] (`--bpf-max-backends`); only affinity frontends
    /// have entries.
    pub const AFFINITY_BACKENDS: MapSpec =
        MapSpec::new::<AffinityBackend, u32>("ferry_affbe_v1", MapKind::Hash, 262_144, NO_PREALLOC);
    /// [`ReverseKey`] -> [`ReverseValue`] (LRU): what a socket connected to.
    pub const REVERSE: MapSpec =
        MapSpec::new::<ReverseKey, ReverseValue>("ferry_rev_v1", MapKind::LruHash, 262_144, 0);
    /// Per-CPU `u64` counters indexed by [`stats`].
    pub const STATS: MapSpec =
        MapSpec::new::<u32, u64>("ferry_stats_v1", MapKind::PerCpuArray, stats::COUNT, 0);
    /// [`FrontendKey`] -> [`BackendAddr`]: frontends (the kube-dns ClusterIP's port 53)
    /// answered by the node's own DNS listener while [`DNS_ALIVE`] says it serves.
    pub const NODE_LOCAL_DNS: MapSpec =
        MapSpec::new::<FrontendKey, BackendAddr>("ferry_ldns_v1", MapKind::Hash, 64, NO_PREALLOC);
    /// `u32` 0 -> `u64`: `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) until which the node's
    /// DNS listener is known to answer. The agent pushes it forward while its health
    /// probe succeeds; when the agent dies it simply expires, and [`NODE_LOCAL_DNS`]
    /// frontends fall back to their endpoints with no one having to act.
    pub const DNS_ALIVE: MapSpec =
        MapSpec::new::<u32, u64>("ferry_dnsalive_v1", MapKind::Array, 1, 0);

    /// `u32` frontend id -> per-CPU [`FrontendCounters`]: what each frontend's
    /// connections came to, for the per-service counters on `/metrics`. The agent
    /// creates an entry with each frontend and deletes it with it; the programs only
    /// look entries up and count (no map updates on the connect path). Sized like
    /// [`FRONTENDS`].
    pub const FRONTEND_COUNTERS: MapSpec = MapSpec::new::<u32, FrontendCounters>(
        "ferry_fecnt_v1",
        MapKind::PerCpuHash,
        FRONTENDS_MAX,
        0,
    );
    /// `ferry monitor`'s events ([`crate::MonitorEvent`]), written only while a
    /// monitor listens ([`MONITOR`]) and at most at its rate; when the ring is full,
    /// events are lost (counted in [`MONITOR_WINDOW`]), never waited for.
    pub const EVENTS: MapSpec =
        MapSpec::new::<(), ()>("ferry_events_v1", MapKind::RingBuf, 256 * 1024, 0);
    /// `u32` index -> `u64`, the monitor's settings: [`monitor::LISTENING_UNTIL`] and
    /// [`monitor::MAX_PER_SECOND`]. A monitor pushes the deadline forward while it
    /// runs, so a killed one stops the events within seconds, with no one to act.
    pub const MONITOR: MapSpec =
        MapSpec::new::<u32, u64>("ferry_monitor_v1", MapKind::Array, monitor::SETTINGS, 0);
    /// Per-CPU [`MonitorWindow`] (one entry): the rate limit's state and what it and
    /// a full ring cost the monitor.
    pub const MONITOR_WINDOW: MapSpec =
        MapSpec::new::<u32, MonitorWindow>("ferry_monwin_v1", MapKind::PerCpuArray, 1, 0);

    const fn list<const N: usize>(name: &'static str, class: usize) -> MapSpec {
        MapSpec::new::<u32, BackendList<N>>(
            name,
            MapKind::Hash,
            list_max_entries(class, FRONTENDS_MAX),
            NO_PREALLOC,
        )
    }
}

/// The programs: one per cgroup `sock_addr` hook, named as the eBPF crate's entry
/// points. The agent attaches each of them.
pub mod programs {
    /// The cgroup hook a program attaches to; its section is `cgroup/<hook>`.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Hook {
        /// `connect()` of an IPv4 socket.
        Connect4,
        /// `connect()` of an IPv6 socket.
        Connect6,
        /// `sendmsg()`/`sendto()` of an IPv4 UDP socket.
        SendMsg4,
        /// `sendmsg()`/`sendto()` of an IPv6 UDP socket.
        SendMsg6,
        /// `recvmsg()`/`recvfrom()` of an IPv4 UDP socket.
        RecvMsg4,
        /// `recvmsg()`/`recvfrom()` of an IPv6 UDP socket.
        RecvMsg6,
        /// `getpeername()` of an IPv4 socket.
        GetPeerName4,
        /// `getpeername()` of an IPv6 socket.
        GetPeerName6,
    }

    /// One program of the object.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct ProgramSpec {
        /// Function (symbol) name in the eBPF crate.
        pub name: &'static str,
        /// Where it attaches.
        pub hook: Hook,
    }

    /// Every program, in attach order.
    pub const ALL: [ProgramSpec; 8] = [
        spec("ferry_connect4", Hook::Connect4),
        spec("ferry_connect6", Hook::Connect6),
        spec("ferry_sendmsg4", Hook::SendMsg4),
        spec("ferry_sendmsg6", Hook::SendMsg6),
        spec("ferry_recvmsg4", Hook::RecvMsg4),
        spec("ferry_recvmsg6", Hook::RecvMsg6),
        spec("ferry_getpeername4", Hook::GetPeerName4),
        spec("ferry_getpeername6", Hook::GetPeerName6),
    ];

    const fn spec(name: &'static str, hook: Hook) -> ProgramSpec {
        ProgramSpec { name, hook }
    }
}

/// Backend-list size classes: a frontend's list lives in the smallest class that
/// holds it. Lists are whole map values, so replacing one is a single atomic update.
pub const LIST_CAPACITY: [usize; 4] = [16, 256, 4096, 65536];

/// Indexes of the counters in the stats map.
pub mod stats {
    /// Connections/datagrams translated to a backend.
    pub const TRANSLATED: u32 = 0;
    /// Refused: no endpoints at all (ECONNREFUSED).
    pub const REJECTED: u32 = 1;
    /// Refused: endpoints exist but none usable from here (a DROP in kube-proxy).
    pub const DROPPED: u32 = 2;
    /// Refused: a ClusterIP on a port no service exposes.
    pub const NO_PORT: u32 = 3;
    /// Translation state was inconsistent (list or backend missing); passed through.
    pub const MISSING: u32 = 4;
    /// Reverse translations done (recvmsg/getpeername).
    pub const REVERSED: u32 = 5;
    /// Number of counters.
    pub const COUNT: u32 = 6;
}

/// `ferry monitor`: the indexes of [`maps::MONITOR`] and the verdicts of
/// [`MonitorEvent`].
pub mod monitor {
    /// `bpf_ktime_get_ns()` until which a monitor listens (0: none).
    pub const LISTENING_UNTIL: u32 = 0;
    /// Events each CPU may write per second; beyond it they are counted, not written.
    pub const MAX_PER_SECOND: u32 = 1;
    /// Number of settings.
    pub const SETTINGS: u32 = 2;
    /// Sent to a backend (or the node's own DNS listener).
    pub const FORWARDED: u8 = 1;
    /// Refused: no endpoints at all (ECONNREFUSED).
    pub const REJECTED: u8 = 2;
    /// Refused: endpoints exist, none usable from here (EHOSTUNREACH).
    pub const DROPPED: u8 = 3;
    /// Refused: a ClusterIP on a port no service exposes (ECONNREFUSED).
    pub const NO_PORT: u8 = 4;
}

/// Frontend flags.
pub mod flags {
    /// Balance across the frontend's backend list.
    pub const ACTION_FORWARD: u16 = 0;
    /// Refuse: the service has no usable endpoints anywhere.
    pub const ACTION_REJECT: u16 = 1;
    /// Refuse: endpoints exist, none for this node/policy.
    pub const ACTION_DROP: u16 = 2;
    /// ClientIP session affinity is on.
    pub const AFFINITY: u16 = 1 << 8;
    /// The frontend is a ClusterIP (informational: `ferry inspect`, and how the agent
    /// rebuilds the ClusterIP set after a restart).
    pub const CLUSTER_IP: u16 = 1 << 9;
    /// Mask of the action bits.
    pub const ACTION_MASK: u16 = 0xff;
}

/// Lookup key of a frontend: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendKey {
    /// Destination address.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// IANA protocol number (6 TCP, 17 UDP, 132 SCTP).
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}

/// What a frontend does.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontend {
    /// Unique per frontend: key of its backend list and of its affinity entries.
    pub id: u32,
    /// [`flags`]: action and options.
    pub flags: u16,
    /// Size class (index into [`LIST_CAPACITY`]) of the backend list.
    pub list_class: u8,
    /// Explicit padding, zero.
    pub _pad: u8,
    /// ClientIP affinity timeout in seconds (with [`flags::AFFINITY`]).
    pub affinity_timeout: u32,
}

/// A backend's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    /// Backend address.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: u8,
}

/// A frontend's backends: `count` ids, chosen uniformly at random.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackendList<const N: usize> {
    /// How many of `ids` are used.
    pub count: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
    /// Backend ids (keys of the backends map); only the first `count` count.
    pub ids: [u32; N],
}

/// Key of the ClusterIP set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// The ClusterIP.
    pub addr: [u32; 4],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 3],
}

/// ClientIP affinity: a client is its network namespace (a pod, or the node), which
/// is what the client IP identifies in kube-proxy, known before the socket binds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie()` of the client's socket.
    pub netns_cookie: u64,
    /// [`Frontend::id`].
    pub frontend_id: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
}

/// One backend of one ClientIP-affinity frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityBackend {
    /// [`Frontend::id`].
    pub frontend_id: u32,
    /// The backend id.
    pub backend_id: u32,
}

/// The backend a client stuck to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// The backend id.
    pub backend_id: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last use.
    pub last_used_ns: u64,
}

/// A socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// The backend's address, as the socket sees it.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 5],
}

/// The service address that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseValue {
    /// The service address.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: u8,
}

/// One frontend's connections by outcome, on one CPU (connect() and unconnected
/// UDP sendmsg() each count once).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendCounters {
    /// Sent to a backend.
    pub forwarded: u64,
    /// Refused for lack of endpoints.
    pub rejected: u64,
    /// Refused: no endpoint usable from this node.
    pub dropped: u64,
}

/// One connection (or unconnected datagram) the socket programs decided on, as
/// `ferry monitor` receives it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns()` when it happened.
    pub ktime_ns: u64,
    /// `bpf_get_netns_cookie()` of the socket's network namespace (which pod).
    pub netns_cookie: u64,
    /// The service address asked for.
    pub service_addr: [u32; 4],
    /// The backend chosen (zero unless forwarded).
    pub backend_addr: [u32; 4],
    /// Network byte order.
    pub service_port: u16,
    /// Network byte order.
    pub backend_port: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Family of the service address.
    pub family: u8,
    /// Family of the backend address.
    pub backend_family: u8,
    /// One of the verdicts of [`monitor`].
    pub verdict: u8,
}

/// The monitor's rate limit on one CPU, and what it cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorWindow {
    /// Start of the current one-second window (`bpf_ktime_get_ns()`).
    pub window_start_ns: u64,
    /// Events written in that window.
    pub sent: u64,
    /// Events not written because of the rate limit, ever.
    pub suppressed: u64,
    /// Events not written because the ring was full, ever.
    pub lost: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these are `#[repr(C)]`, `Copy`, made of integers with explicit
    // padding fields, so every bit pattern is valid and there is no hidden padding.
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for BackendAddr {}
    unsafe impl<const N: usize> aya::Pod for BackendList<N> {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityBackend {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
    unsafe impl aya::Pod for FrontendCounters {}
    unsafe impl aya::Pod for MonitorEvent {}
    unsafe impl aya::Pod for MonitorWindow {}
}

// Layout checks: both sides compile against these; a mismatch fails the build.
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<FrontendKey>() == 20);
    assert!(offset_of!(FrontendKey, port) == 16);
    assert!(size_of::<Frontend>() == 12);
    assert!(size_of::<BackendAddr>() == 20);
    assert!(size_of::<BackendList<16>>() == 8 + 16 * 4);
    assert!(offset_of!(BackendList<16>, ids) == 8);
    assert!(size_of::<VipKey>() == 20);
    assert!(size_of::<AffinityKey>() == 16);
    assert!(size_of::<AffinityBackend>() == 8);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<ReverseKey>() == 32);
    assert!(offset_of!(ReverseKey, addr) == 8);
    assert!(size_of::<ReverseValue>() == 20);
    assert!(size_of::<FrontendCounters>() == 24);
    assert!(size_of::<MonitorEvent>() == 56);
    assert!(offset_of!(MonitorEvent, service_port) == 48);
    assert!(size_of::<MonitorWindow>() == 32);
    // The list maps' values are the lists of their class.
    let mut class = 0;
    while class < LIST_CAPACITY.len() {
        assert!(maps::LISTS[class].value_size as usize == 8 + LIST_CAPACITY[class] * 4);
        class += 1;
    }
    // The defaults compiled into the object.
    assert!(maps::LISTS[1].max_entries == 16_384);
    assert!(maps::LISTS[2].max_entries == 1_024);
    assert!(maps::LISTS[3].max_entries == 64);
};
