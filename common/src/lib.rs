#![no_std]
//! The map ABI shared by Ferry's eBPF programs (`ferry-ebpf`) and the agent: key and
//! value layouts, flags, map names. One home for it, so both sides cannot drift.
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

/// Map names (pinned under the agent's bpffs directory).
pub mod maps {
    /// [`super::FrontendKey`] -> [`super::Frontend`].
    pub const FRONTENDS: &str = "ferry_fe_v1";
    /// `u32` backend id -> [`super::BackendAddr`].
    pub const BACKENDS: &str = "ferry_be_v1";
    /// `u32` frontend id -> [`super::BackendList`] of each size class.
    pub const LISTS: [&str; 4] = [
        "ferry_ls16_v1",
        "ferry_ls256_v1",
        "ferry_ls4k_v1",
        "ferry_ls64k_v1",
    ];
    /// [`super::VipKey`] -> `u32` (1): ClusterIPs, to refuse ports no service exposes.
    pub const VIPS: &str = "ferry_vip_v1";
    /// [`super::AffinityKey`] -> [`super::AffinityValue`] (LRU).
    pub const AFFINITY: &str = "ferry_aff_v1";
    /// [`super::ReverseKey`] -> [`super::ReverseValue`] (LRU): what a socket connected to.
    pub const REVERSE: &str = "ferry_rev_v1";
    /// Per-CPU `u64` counters indexed by [`super::stats`].
    pub const STATS: &str = "ferry_stats_v1";
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
    pub _pad: u8,
    /// ClientIP affinity timeout in seconds (with [`flags::AFFINITY`]).
    pub affinity_timeout: u32,
}

/// A backend's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// A frontend's backends: `count` ids, chosen uniformly at random.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackendList<const N: usize> {
    pub count: u32,
    pub _pad: u32,
    pub ids: [u32; N],
}

/// Key of the ClusterIP set.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// ClientIP affinity: a client is its network namespace (a pod, or the node), which
/// is what the client IP identifies in kube-proxy, known before the socket binds.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub frontend_id: u32,
    pub _pad: u32,
}

/// The backend a client stuck to, and when it last used it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last use.
    pub last_used_ns: u64,
}

/// A socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// The service address that socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseValue {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
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
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for ReverseKey {}
    unsafe impl aya::Pod for ReverseValue {}
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
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<ReverseKey>() == 32);
    assert!(offset_of!(ReverseKey, addr) == 8);
    assert!(size_of::<ReverseValue>() == 20);
};
