//! What the socket programs tell userspace about each decision: the per-frontend
//! counters (`/metrics`) and, while `ferry monitor` listens, one ring-buffer event
//! per decision, at most `MAX_PER_SECOND` per CPU so a busy node pays a bounded cost.

use aya_ebpf::helpers::generated::{bpf_get_netns_cookie, bpf_ktime_get_ns};
use aya_ebpf::programs::SockAddrContext;
use ferry_common::{FrontendKey, MonitorEvent, monitor};

use crate::lb::Dest;
use crate::maps::{EVENTS, FRONTEND_COUNTERS, MONITOR, MONITOR_WINDOW};

const SECOND_NS: u64 = 1_000_000_000;
/// `BPF_RB_NO_WAKEUP`: no irq_work to wake the reader at each event; `ferry monitor`
/// drains the ring on a short timer instead, so the connect path never raises an
/// interrupt for it.
const NO_WAKEUP: u64 = 1;

/// Counts a decision on frontend `id` (if it has one) and reports it to a monitor.
#[inline(always)]
pub fn observe(
    ctx: &SockAddrContext,
    service: &FrontendKey,
    id: Option<u32>,
    verdict: u8,
    backend: Option<Dest>,
) {
    if let Some(id) = id {
        count_frontend(id, verdict);
    }
    emit(ctx, service, verdict, backend);
}

/// Adds one to frontend `id`'s counter of `verdict` on this CPU (the agent created
/// the entry with the frontend; none, and nothing is counted). A function of its own
/// (a BPF-to-BPF call): inlined, LLVM merges its early return with the callers' exits
/// through a register the verifier sees unset on one path (`R9 !read_ok`).
#[inline(never)]
fn count_frontend(id: u32, verdict: u8) {
    let Some(counters) = FRONTEND_COUNTERS.get_ptr_mut(id) else {
        return;
    };
    // SAFETY: `get_ptr_mut` returned this CPU's value of a per-CPU map, valid until
    // the program returns (RCU read side). Programs run with migration disabled and
    // sock_addr hooks in syscall context, so no other run writes this CPU's slot at
    // the same time (a preempted run may lose one increment: a statistic).
    unsafe {
        match verdict {
            monitor::FORWARDED => (*counters).forwarded += 1,
            monitor::REJECTED => (*counters).rejected += 1,
            _ => (*counters).dropped += 1,
        }
    }
}

/// Writes the event into the ring buffer if a monitor listens and this CPU is
/// within the rate. A BPF-to-BPF call, like `count_frontend`: inlined into the hooks,
/// 6.1's verifier loses track of a stack slot LLVM reuses across its paths.
#[inline(never)]
fn emit(ctx: &SockAddrContext, service: &FrontendKey, verdict: u8, backend: Option<Dest>) {
    let Some(until) = MONITOR.get(monitor::LISTENING_UNTIL).copied() else {
        return;
    };
    // SAFETY: no arguments, no memory access.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= until {
        return;
    }
    let limit = MONITOR.get(monitor::MAX_PER_SECOND).copied().unwrap_or(0);
    let Some(window) = MONITOR_WINDOW.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array, as in `count_frontend`.
    unsafe {
        if now.wrapping_sub((*window).window_start_ns) >= SECOND_NS {
            (*window).window_start_ns = now;
            (*window).sent = 0;
        }
        if (*window).sent >= limit {
            (*window).suppressed += 1;
            return;
        }
        (*window).sent += 1;
    }
    let Some(mut entry) = EVENTS.reserve::<MonitorEvent>(0) else {
        // SAFETY: as above.
        unsafe { (*window).lost += 1 };
        return;
    };
    let to = backend.unwrap_or(Dest {
        addr: [0; 4],
        port: 0,
        family: 0,
    });
    entry.write(MonitorEvent {
        ktime_ns: now,
        // SAFETY: accepts the program's own `bpf_sock_addr` context (the verifier
        // checks the argument type) and only reads its network namespace.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        service_addr: service.addr,
        backend_addr: to.addr,
        service_port: service.port,
        backend_port: to.port,
        proto: service.proto,
        family: service.family,
        backend_family: to.family,
        verdict,
    });
    entry.submit(NO_WAKEUP);
}
