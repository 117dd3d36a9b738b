//! Socket-level load balancing: on connect/sendmsg, a destination that is a service
//! frontend is rewritten to one of its backends; on recvmsg/getpeername the backend
//! address is rewritten back, so the application only ever sees the service address.

use aya_ebpf::helpers::generated::{
    bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
};
use aya_ebpf::programs::SockAddrContext;
use ferry_common::{
    AffinityBackend, AffinityKey, AffinityValue, BackendList, FAMILY_V4, FAMILY_V6, Frontend,
    FrontendKey, ReverseKey, ReverseValue, VipKey, flags, monitor, stats,
};

use crate::maps::{
    AFFINITY, AFFINITY_BACKENDS, BACKENDS, DNS_ALIVE, FRONTENDS, LIST4K, LIST16, LIST64K, LIST256,
    NODE_LOCAL_DNS, REVERSE, VIPS, count,
};
use crate::observe::observe;

/// Why a connection is refused; the errno the application gets.
pub enum Refuse {
    /// No endpoints anywhere (kube-proxy REJECT): ECONNREFUSED.
    NoEndpoints,
    /// Endpoints exist, none usable from here (kube-proxy DROP): EHOSTUNREACH.
    NotHere,
    /// A ClusterIP on a port no service exposes: ECONNREFUSED.
    NoPort,
}

const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

impl Refuse {
    /// The errno the failed syscall returns.
    pub fn errno(&self) -> i32 {
        match self {
            Self::NoEndpoints | Self::NoPort => ECONNREFUSED,
            Self::NotHere => EHOSTUNREACH,
        }
    }
}

/// A destination as the hook sees it (network byte order, IPv4 in `addr[0]`).
#[derive(Clone, Copy)]
pub struct Dest {
    /// Address words, network byte order.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`), as a dual-stack socket connects to IPv4.
#[inline(always)]
pub fn v4_mapped(addr: &[u32; 4]) -> Option<u32> {
    // 0xffff in network order is 0xffff0000 when read as a little-endian u32.
    (addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_be(0x0000_ffff)).then_some(addr[3])
}

/// Picks the backend for `dest` if it is a frontend. `Ok(None)`: not a service,
/// leave the socket alone.
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, dest: Dest, proto: u8) -> Result<Option<Dest>, Refuse> {
    let key = FrontendKey {
        addr: dest.addr,
        port: dest.port,
        proto,
        family: dest.family,
    };
    if dest.port == ferry_common::maps::DNS_PORT_BE
        && let Some(local) = node_local_dns(&key)
    {
        count(stats::TRANSLATED);
        observe(ctx, &key, None, monitor::FORWARDED, Some(local));
        return Ok(Some(local));
    }
    // SAFETY: `get` hands out a reference into the map value, which the kernel keeps
    // alive until the program returns (RCU read side; NO_PREALLOC elements are freed
    // only after a grace period). It is copied out at once, so no reference escapes.
    let Some(fe) = (unsafe { FRONTENDS.get(&key) }).copied() else {
        let vip = VipKey {
            addr: dest.addr,
            family: dest.family,
            _pad: [0; 3],
        };
        // SAFETY: as above; only presence is checked, the value is not read.
        if unsafe { VIPS.get(&vip) }.is_some() {
            count(stats::NO_PORT);
            observe(ctx, &key, None, monitor::NO_PORT, None);
            return Err(Refuse::NoPort);
        }
        return Ok(None);
    };
    match fe.flags & flags::ACTION_MASK {
        flags::ACTION_FORWARD => {}
        flags::ACTION_DROP => {
            count(stats::DROPPED);
            observe(ctx, &key, Some(fe.id), monitor::DROPPED, None);
            return Err(Refuse::NotHere);
        }
        _ => {
            count(stats::REJECTED);
            observe(ctx, &key, Some(fe.id), monitor::REJECTED, None);
            return Err(Refuse::NoEndpoints);
        }
    }
    let Some(backend_id) = choose(ctx, &fe) else {
        count(stats::MISSING);
        return Ok(None);
    };
    // SAFETY: as for the frontend: copied out at once, NO_PREALLOC map.
    let Some(backend) = (unsafe { BACKENDS.get(&backend_id) }).copied() else {
        count(stats::MISSING);
        return Ok(None);
    };
    count(stats::TRANSLATED);
    let to = Dest {
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
    };
    observe(ctx, &key, Some(fe.id), monitor::FORWARDED, Some(to));
    Ok(Some(to))
}

/// The node's own DNS listener for a frontend it takes over, while the listener is
/// known to serve (its deadline in `DNS_ALIVE` has not passed); `None` sends the
/// socket to the frontend's endpoints as usual.
#[inline(always)]
fn node_local_dns(key: &FrontendKey) -> Option<Dest> {
    // SAFETY: map value references live until the program returns (RCU read side);
    // both are copied out at once and not kept.
    let target = (unsafe { NODE_LOCAL_DNS.get(key) }).copied()?;
    let alive_until = DNS_ALIVE.get(0).copied()?;
    // SAFETY: no arguments, no memory access.
    let now = unsafe { bpf_ktime_get_ns() };
    (now < alive_until).then_some(Dest {
        addr: target.addr,
        port: target.port,
        family: target.family,
    })
}

/// The reverse-map key of this socket talking to `backend`.
#[inline(always)]
fn reverse_key(ctx: &SockAddrContext, backend: Dest) -> ReverseKey {
    // SAFETY: `bpf_get_socket_cookie` accepts the program's own `bpf_sock_addr`
    // context (the verifier checks the argument type) and only reads its socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    ReverseKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
        _pad: [0; 5],
    }
}

/// Remembers which service address a socket asked for, for the reverse hooks.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, service: Dest, backend: Dest) {
    let key = reverse_key(ctx, backend);
    let value = ReverseValue {
        addr: service.addr,
        port: service.port,
        family: service.family,
        _pad: 0,
    };
    // A socket sending datagram after datagram to one service hits the same entry
    // each time: a lookup is much cheaper than an LRU update, so skip the write when
    // the entry is already right.
    // SAFETY: the value reference lives until the program returns (RCU read side);
    // it is compared at once and not kept.
    if unsafe { REVERSE.get(&key) }.is_some_and(|v| *v == value) {
        return;
    }
    // An LRU map only fails on bad arguments; nothing useful to do about it here.
    let _ = REVERSE.insert(&key, &value, 0);
}

/// The service address a socket asked for, given the backend it talks to.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, backend: Dest) -> Option<Dest> {
    let key = reverse_key(ctx, backend);
    // SAFETY: as in `remember`: copied out at once, no reference kept.
    let value = (unsafe { REVERSE.get(&key) }).copied()?;
    count(stats::REVERSED);
    Some(Dest {
        addr: value.addr,
        port: value.port,
        family: value.family,
    })
}

/// A backend id for this connection: the client's sticky backend when affinity is on
/// and still valid, else one drawn uniformly at random from the frontend's list.
#[inline(always)]
fn choose(ctx: &SockAddrContext, fe: &Frontend) -> Option<u32> {
    if fe.flags & flags::AFFINITY == 0 {
        return random_backend(fe);
    }
    // SAFETY: `bpf_get_netns_cookie` accepts the `bpf_sock_addr` context (the
    // verifier checks the argument type) and only reads its network namespace.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    let key = AffinityKey {
        netns_cookie,
        frontend_id: fe.id,
        _pad: 0,
    };
    // SAFETY: no arguments, no memory access.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(fe.affinity_timeout) * 1_000_000_000;
    // SAFETY: map value references live until the program returns; the affinity
    // entry is copied out at once, the membership only checked for presence.
    let sticky = (unsafe { AFFINITY.get(&key) })
        .copied()
        .filter(|v| now.wrapping_sub(v.last_used_ns) < timeout_ns)
        // Still one of this frontend's backends: entries of removed backends are
        // never deleted one by one, they fail this check and age out of the LRU.
        .filter(|v| is_affinity_backend(fe.id, v.backend_id))
        .map(|v| v.backend_id);
    let id = match sticky {
        Some(id) => id,
        None => random_backend(fe)?,
    };
    let value = AffinityValue {
        backend_id: id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = AFFINITY.insert(&key, &value, 0);
    Some(id)
}

/// Whether `backend_id` is in affinity frontend `frontend_id`'s current backends.
#[inline(always)]
fn is_affinity_backend(frontend_id: u32, backend_id: u32) -> bool {
    let member = AffinityBackend {
        frontend_id,
        backend_id,
    };
    // SAFETY: the value is only checked for presence, no reference is kept.
    unsafe { AFFINITY_BACKENDS.get(&member) }.is_some()
}

/// One backend id drawn uniformly at random from the frontend's list.
#[inline(always)]
fn random_backend(fe: &Frontend) -> Option<u32> {
    // SAFETY: the list reference lives until the program returns (RCU read side) and
    // `pick` only reads `count` and one id from it. The map is NO_PREALLOC, so the
    // agent replacing the list makes a new element: this run sees the old list or the
    // new one whole, never a mix.
    unsafe {
        match fe.list_class {
            0 => pick(LIST16.get(&fe.id)?),
            1 => pick(LIST256.get(&fe.id)?),
            2 => pick(LIST4K.get(&fe.id)?),
            _ => pick(LIST64K.get(&fe.id)?),
        }
    }
}

/// A random id among the first `count` of `list`.
#[inline(always)]
fn pick<const N: usize>(list: &BackendList<N>) -> Option<u32> {
    let count = list.count;
    if count == 0 {
        return None;
    }
    // SAFETY: no arguments, no memory access.
    let index = unsafe { bpf_get_prandom_u32() } % count;
    // `get` bounds-checks against N, which the verifier needs to see.
    list.ids.get(index as usize).copied()
}

/// Reads the destination of an IPv4 hook. The kernel allows only whole 4-byte loads
/// of `user_ip4`/`user_port` (port in network order in the low 16 bits).
#[inline(always)]
pub fn dest4(ctx: &SockAddrContext) -> Dest {
    // SAFETY: `sock_addr` is the kernel's `bpf_sock_addr` for this run; both reads
    // are whole aligned 4-byte loads, the only access the verifier allows to them.
    let (ip, port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
    Dest {
        addr: [ip, 0, 0, 0],
        port: port as u16,
        family: FAMILY_V4,
    }
}

/// Reads the destination of an IPv6 hook (each `user_ip6` word a 4-byte load).
#[inline(always)]
pub fn dest6(ctx: &SockAddrContext) -> Dest {
    // SAFETY: as in `dest4`; each `user_ip6` word is its own 4-byte load.
    let (addr, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
            sa.user_port,
        )
    };
    Dest {
        addr,
        port: port as u16,
        family: FAMILY_V6,
    }
}

/// Writes a new destination into an IPv4 hook (whole 4-byte stores).
#[inline(always)]
pub fn set_dest4(ctx: &SockAddrContext, dest: Dest) {
    // SAFETY: `user_ip4`/`user_port` are writable in the connect4, sendmsg4,
    // recvmsg4 and getpeername4 hooks, as whole 4-byte stores (the verifier's rule).
    unsafe {
        (*ctx.sock_addr).user_ip4 = dest.addr[0];
        (*ctx.sock_addr).user_port = u32::from(dest.port);
    }
}

/// Writes a new destination into an IPv6 hook.
#[inline(always)]
pub fn set_dest6(ctx: &SockAddrContext, dest: Dest) {
    // SAFETY: `user_ip6[*]`/`user_port` are writable in the IPv6 counterparts of
    // those hooks, each as a whole 4-byte store.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6[0] = dest.addr[0];
        sa.user_ip6[1] = dest.addr[1];
        sa.user_ip6[2] = dest.addr[2];
        sa.user_ip6[3] = dest.addr[3];
        sa.user_port = u32::from(dest.port);
    }
}

/// The socket's protocol, if it is one services use.
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: `protocol` is readable in every sock_addr hook, as a 4-byte load.
    let proto = unsafe { (*ctx.sock_addr).protocol };
    matches!(proto, 6 | 17 | 132).then_some(proto as u8)
}
