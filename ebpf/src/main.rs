#![no_std]
#![no_main]
//! Ferry's kernel programs: cgroup socket hooks that load-balance services at
//! connect()/sendmsg() time and translate addresses back at recvmsg()/getpeername().
//! Entry points are thin; the logic is in `lb`, what they report in `observe`, the
//! maps in `maps`. The entry points' names and hooks are listed in
//! `ferry_common::programs`, which the agent attaches by (its tests check this object
//! against that list).

mod lb;
mod maps;
mod observe;

use aya_ebpf::helpers::generated::bpf_set_retval;
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;
use ferry_common::FAMILY_V4;

use lb::{
    Dest, dest4, dest6, forward, protocol, remember, reverse, set_dest4, set_dest6, v4_mapped,
};

/// Verdict letting the syscall go on (with the context as the program left it).
const ALLOW: i32 = 1;
/// Verdict failing the syscall (EPERM unless `bpf_set_retval` set another errno).
const REJECT: i32 = 0;

/// Rewrites the destination of an IPv4 socket operation to a backend.
#[inline(always)]
fn forward4(ctx: &SockAddrContext) -> i32 {
    let Some(proto) = protocol(ctx) else {
        return ALLOW;
    };
    let service = dest4(ctx);
    match forward(ctx, service, proto) {
        Ok(Some(backend)) => {
            set_dest4(ctx, backend);
            remember(ctx, service, backend);
            ALLOW
        }
        Ok(None) => ALLOW,
        Err(refuse) => refuse_with(refuse.errno()),
    }
}

/// Rewrites the destination of an IPv6 socket operation, including IPv4-mapped
/// addresses of dual-stack sockets.
#[inline(always)]
fn forward6(ctx: &SockAddrContext) -> i32 {
    let Some(proto) = protocol(ctx) else {
        return ALLOW;
    };
    let raw = dest6(ctx);
    let (service, mapped) = match v4_mapped(&raw.addr) {
        Some(ip4) => (
            Dest {
                addr: [ip4, 0, 0, 0],
                port: raw.port,
                family: FAMILY_V4,
            },
            true,
        ),
        None => (raw, false),
    };
    match forward(ctx, service, proto) {
        Ok(Some(backend)) => {
            let out = if mapped {
                if backend.family != FAMILY_V4 {
                    return ALLOW;
                }
                Dest {
                    addr: [raw.addr[0], raw.addr[1], raw.addr[2], backend.addr[0]],
                    port: backend.port,
                    family: raw.family,
                }
            } else {
                backend
            };
            set_dest6(ctx, out);
            remember(ctx, raw, out);
            ALLOW
        }
        Ok(None) => ALLOW,
        Err(refuse) => refuse_with(refuse.errno()),
    }
}

/// Fails the syscall with `errno` (bpf_set_retval, kernel >= 5.18) instead of the
/// default EPERM, so a client sees "connection refused" like with kube-proxy.
#[inline(always)]
fn refuse_with(errno: i32) -> i32 {
    // SAFETY: takes a plain integer, no memory access; allowed in cgroup hooks.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

/// Rewrites a backend address a socket sees back to the service address.
#[inline(always)]
fn reverse4(ctx: &SockAddrContext) -> i32 {
    if let Some(service) = reverse(ctx, dest4(ctx)) {
        set_dest4(ctx, service);
    }
    ALLOW
}

/// Rewrites a backend address an IPv6 socket sees back to the service address.
#[inline(always)]
fn reverse6(ctx: &SockAddrContext) -> i32 {
    if let Some(service) = reverse(ctx, dest6(ctx)) {
        set_dest6(ctx, service);
    }
    ALLOW
}

/// `connect()` of IPv4 sockets: balance to a backend.
#[cgroup_sock_addr(connect4)]
pub fn ferry_connect4(ctx: SockAddrContext) -> i32 {
    forward4(&ctx)
}

/// `connect()` of IPv6 (and dual-stack) sockets: balance to a backend.
#[cgroup_sock_addr(connect6)]
pub fn ferry_connect6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx)
}

/// Unconnected IPv4 UDP `sendmsg()`: balance each datagram.
#[cgroup_sock_addr(sendmsg4)]
pub fn ferry_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward4(&ctx)
}

/// Unconnected IPv6 UDP `sendmsg()`: balance each datagram.
#[cgroup_sock_addr(sendmsg6)]
pub fn ferry_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx)
}

/// IPv4 UDP `recvmsg()`: show the service as the sender, not the backend.
#[cgroup_sock_addr(recvmsg4)]
pub fn ferry_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx)
}

/// IPv6 UDP `recvmsg()`: show the service as the sender, not the backend.
#[cgroup_sock_addr(recvmsg6)]
pub fn ferry_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

/// IPv4 `getpeername()`: show the service as the peer, not the backend.
#[cgroup_sock_addr(getpeername4)]
pub fn ferry_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse4(&ctx)
}

/// IPv6 `getpeername()`: show the service as the peer, not the backend.
#[cgroup_sock_addr(getpeername6)]
pub fn ferry_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in verified code (no panicking operations are used); the verifier
    // would reject any path that got here.
    loop {}
}
