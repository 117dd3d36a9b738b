//! DNS over UDP on plain threads, one SO_REUSEPORT socket each: receive, answer from
//! memory, send, with no allocation of async tasks on the common path. Only questions
//! that must go upstream are handed to the async runtime.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use hickory_server::proto::op::{Edns, Message, Metadata, Query};
use hickory_server::proto::rr::RData;
use tracing::warn;

use super::metrics::{Answered, DnsMetrics, Plugin, Recorder};
use super::rate_limit::RateLimit;
use super::request::{self, Parsed};
use super::udp_batch::{Batch, Received};
use super::wire_cache::{self, Stored, WireCache};
use super::{Answerer, MAX_UDP_PAYLOAD, Records, Reply};

/// Encoded answers kept for reuse.
const WIRE_CACHE_ENTRIES: usize = 100_000;

/// A UDP socket bound with SO_REUSEPORT.
pub fn reuseport_socket(listen: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(listen),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    socket.set_reuse_port(true)?;
    force_receive_buffer(&socket);
    socket.bind(&listen.into())?;
    Ok(socket.into())
}

/// Receive buffer of each DNS socket: bursts (and a socket handover) queue instead
/// of overflowing. The default (`net.core.rmem_default`, ~200 KiB) holds a few
/// hundred datagrams, a millisecond or two at full rate.
const RECEIVE_BUFFER: usize = 4 << 20;

/// Sets [`RECEIVE_BUFFER`] past `net.core.rmem_max` (SO_RCVBUFFORCE, which the
/// agent's CAP_NET_ADMIN allows), else as far as the limit lets.
fn force_receive_buffer(socket: &socket2::Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    }
}

/// Asks the kernel for each datagram's arrival interface (IP_PKTINFO /
/// IPV6_RECVPKTINFO), which [`receive`] reports.
fn want_arrival_interface(socket: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(socket, sockopt::Ipv4PacketInfo, &true);
    let _ = setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true);
}

/// How often a worker blocked on an idle socket looks at its stop flag.
/// Questions handed to the runtime at once (forwarded, or waiting for the same name
/// in flight). Beyond it a question is answered REFUSED at once, as CoreDNS does past
/// `max_concurrent`: a flood of uncached names cannot grow the agent's tasks and
/// memory without bound (each task holds about a kilobyte).
const MAX_FORWARDING: usize = 16_384;

const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What the answering threads of one listener share.
#[derive(Clone)]
pub struct Workers {
    pub answerer: Arc<Answerer>,
    pub cache: Arc<WireCache>,
    pub runtime: tokio::runtime::Handle,
    /// Set to make the threads stop reading (socket handover, closing a listener).
    pub stop: Arc<AtomicBool>,
    /// Questions read and handed to the runtime but not answered yet.
    pub in_flight: Arc<AtomicUsize>,
    pub metrics: Arc<DnsMetrics>,
    /// The address served (the `server` label).
    pub listen: SocketAddr,
    /// Answers per client, bounded (`--dns-rate-limit`).
    pub rate_limit: Option<Arc<RateLimit>>,
}

/// The shared cache of encoded answers, for [`Workers::cache`].
pub fn wire_cache() -> Arc<WireCache> {
    Arc::new(WireCache::new(WIRE_CACHE_ENTRIES))
}

/// Starts one answering thread per socket; they run until [`Workers::stop`] is set.
pub fn spawn_workers(
    sockets: &[Arc<UdpSocket>],
    workers: &Workers,
) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(sockets.len());
    for (i, socket) in sockets.iter().enumerate() {
        socket.set_read_timeout(Some(STOP_POLL))?;
        want_arrival_interface(socket);
        let socket = socket.clone();
        let w = workers.clone();
        let name = format!("dns-udp-{i}");
        threads.push(
            std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || restarting(&name, || worker(socket.clone(), &w)))?,
        );
    }
    Ok(threads)
}

/// Runs `work` again whenever it panics, with a log line saying so: a bug in
/// answering one query must not take a worker (and its share of the traffic) away.
fn restarting(name: &str, work: impl Fn()) {
    loop {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&work)) {
            Ok(()) => return,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                tracing::error!(
                    worker = name,
                    panic = what,
                    "DNS worker panicked; restarting it"
                );
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

fn worker(socket: Arc<UdpSocket>, w: &Workers) {
    let mut state = WorkerState {
        recorder: w.metrics.recorder(w.listen, "udp"),
        out: Vec::with_capacity(1500),
        key: Vec::with_capacity(300),
    };
    let mut batch = Batch::new();
    // The flag is checked before each read, never between a read and its answer: a
    // question read is always answered by this process.
    while !w.stop.load(Ordering::Acquire) {
        match batch.receive(&socket) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => {
                warn!(error = %e, "DNS UDP receive failed");
                continue;
            }
        }
        // One clock read for the batch: its questions all arrived by now.
        let started = Instant::now();
        let received = std::mem::take(&mut batch.received);
        let buffers = std::mem::take(&mut batch.buffers);
        for (r, buffer) in received.iter().zip(&buffers) {
            let packet = &buffer[..r.len.min(buffer.len())];
            handle(&socket, w, &mut state, &mut batch, packet, r, started);
        }
        batch.buffers = buffers;
        batch.received = received;
        batch.send(&socket);
        state.recorder.finish_batch(started);
    }
}

/// What a worker keeps between questions.
struct WorkerState {
    recorder: Recorder,
    out: Vec<u8>,
    key: Vec<u8>,
}

/// Answers one datagram of a batch received at `started`: from the encoded-answer
/// cache into `batch` (sent with the others), else answered and sent at once, or
/// handed to the runtime to forward.
fn handle(
    socket: &Arc<UdpSocket>,
    w: &Workers,
    state: &mut WorkerState,
    batch: &mut Batch,
    packet: &[u8],
    r: &Received,
    started: Instant,
) {
    let (answerer, src) = (&w.answerer, r.src);
    if let Some(limit) = &w.rate_limit
        && !limit.allow(src.ip())
    {
        return;
    }
    let client = answerer.client(src.ip(), r.interface);
    let fast = wire_cache::question(packet);
    if let Some(q) = &fast {
        let max = q
            .edns_payload
            .map_or(512, |p| p.clamp(512, MAX_UDP_PAYLOAD));
        wire_cache::key(q, max, &mut state.key);
        if let Some(stored) = w.cache.get(&state.key)
            && stored.usable(answerer.generation(), || answerer.may_forward(&client))
        {
            let direct = batch.is_full();
            let out = match batch.queue(src) {
                Some(queued) => queued,
                None => &mut state.out,
            };
            stored.write(packet, q, out);
            let plugin = if stored.from_zone() {
                Plugin::Kubernetes
            } else {
                let answers = out
                    .get(6..8)
                    .map_or(0, |c| u16::from_be_bytes([c[0], c[1]]));
                state.recorder.cache_hit(answers > 0);
                Plugin::Cache
            };
            let name = wire_cache::WireName(q.raw);
            let a = answered_wire(src, packet, &name, out, plugin, started);
            if direct {
                let _ = socket.send_to(&state.out, src);
                state.recorder.record(&a);
            } else {
                state.recorder.record_batched(&a);
            }
            return;
        }
    }
    let question_len = fast.as_ref().map(|q| q.raw.len());
    let Some((request, edns)) = parse(packet, src, socket, &mut state.out) else {
        return;
    };
    let Some(query) = request.queries.first().cloned() else {
        return;
    };
    let reuse = question_len.map(|len| (state.key.clone(), len));
    match answerer.answer(&query, &client) {
        Reply::Now(records) => {
            let sent = Sent {
                socket,
                dst: src,
                request: &request.metadata,
                query: &query,
                edns: edns.as_ref(),
            };
            sent.reply(&records, &w.cache, reuse, &mut state.out);
            state.recorder.record(&answered(
                src,
                &request.metadata,
                &query,
                &records,
                state.out.len(),
                started,
            ));
        }
        Reply::Forward => forward_later(socket, w, request, edns, query, src, reuse, started),
    }
}

/// Hands a question that must go upstream to the runtime.
#[allow(clippy::too_many_arguments)]
fn forward_later(
    socket: &Arc<UdpSocket>,
    w: &Workers,
    request: Message,
    edns: Option<Edns>,
    query: Query,
    src: SocketAddr,
    reuse: Option<(Vec<u8>, usize)>,
    started: Instant,
) {
    let Some(in_flight) = InFlight::start(&w.in_flight, MAX_FORWARDING) else {
        refuse_now(socket, w, &request, edns.as_ref(), &query, src, started);
        return;
    };
    let answerer = w.answerer.clone();
    let socket = socket.clone();
    let cache = w.cache.clone();
    let mut recorder = w.metrics.recorder(w.listen, "udp");
    w.runtime.spawn(async move {
        let _in_flight = in_flight;
        let records = answerer.forward(&query).await;
        let sent = Sent {
            socket: &socket,
            dst: src,
            request: &request.metadata,
            query: &query,
            edns: edns.as_ref(),
        };
        let mut out = Vec::with_capacity(1500);
        sent.reply(&records, &cache, reuse, &mut out);
        let mut a = answered(src, &request.metadata, &query, &records, out.len(), started);
        a.plugin = Plugin::Forward;
        recorder.record(&a);
    });
}

/// What the metrics see of an answer built from records.
fn answered<'a>(
    client: SocketAddr,
    request: &Metadata,
    query: &'a Query,
    records: &Records,
    size: usize,
    started: Instant,
) -> Answered<'a> {
    Answered {
        client,
        id: request.id,
        name: query.name(),
        qtype: u16::from(query.query_type()),
        rcode: u16::from(records.rcode),
        plugin: super::plugin_of(records),
        size,
        started,
    }
}

/// What the metrics see of an answer sent from the wire cache.
fn answered_wire<'a>(
    client: SocketAddr,
    packet: &[u8],
    name: &'a wire_cache::WireName<'a>,
    out: &[u8],
    plugin: Plugin,
    started: Instant,
) -> Answered<'a> {
    let question = name.0;
    let qtype = question
        .len()
        .checked_sub(4)
        .map_or(0, |i| u16::from_be_bytes([question[i], question[i + 1]]));
    Answered {
        client,
        id: u16::from_be_bytes([packet[0], packet[1]]),
        name,
        qtype,
        rcode: u16::from(out.get(3).copied().unwrap_or(0) & 0x0f),
        plugin,
        size: out.len(),
        started,
    }
}

/// One question handed to the runtime, counted in [`Workers::in_flight`] until its
/// answer is sent (or the task is dropped).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more question, unless `max` are already in flight.
    fn start(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(counter.clone()))
    }
}

/// Answers REFUSED at once (too many questions in flight), never cached.
fn refuse_now(
    socket: &UdpSocket,
    w: &Workers,
    request: &Message,
    edns: Option<&Edns>,
    query: &Query,
    src: SocketAddr,
    started: Instant,
) {
    let records = Records::error(hickory_server::proto::op::ResponseCode::Refused);
    let sent = Sent {
        socket,
        dst: src,
        request: &request.metadata,
        query,
        edns,
    };
    let mut out = Vec::with_capacity(512);
    sent.reply(&records, &w.cache, None, &mut out);
    let a = answered(src, &request.metadata, query, &records, out.len(), started);
    w.metrics.recorder(w.listen, "udp").record(&a);
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where and to what an answer goes.
struct Sent<'a> {
    socket: &'a UdpSocket,
    dst: SocketAddr,
    request: &'a Metadata,
    query: &'a Query,
    edns: Option<&'a Edns>,
}

impl Sent<'_> {
    /// Sends the answer and keeps it for reuse when it may be reused.
    fn reply(
        &self,
        records: &Records,
        cache: &WireCache,
        reuse: Option<(Vec<u8>, usize)>,
        out: &mut Vec<u8>,
    ) {
        if respond(
            self.socket,
            self.dst,
            self.request,
            self.query,
            self.edns,
            records,
            out,
        ) {
            self.remember(cache, reuse, out, records);
        }
    }

    /// Keeps an encoded answer for the next identical question, if it may be
    /// reused; with a few other turns of its addresses, so reuse keeps rotating them.
    fn remember(
        &self,
        cache: &WireCache,
        reuse: Option<(Vec<u8>, usize)>,
        encoded: &[u8],
        records: &Records,
    ) {
        let Some((key, question_len)) = reuse else {
            return;
        };
        let Some(mut stored) = Stored::from_answer(encoded, question_len, records.cache) else {
            return;
        };
        let addresses = records
            .answers
            .iter()
            .filter(|r| matches!(r.data, RData::A(_) | RData::AAAA(_)))
            .count();
        let mut turned = Vec::with_capacity(encoded.len());
        for turn in 1..addresses.min(wire_cache::MAX_TURNS) {
            let mut other = records.clone();
            super::rotate_addresses(&mut other.answers, turn);
            if encode(self.request, self.query, self.edns, &other, &mut turned) {
                stored.add_turn(&turned, question_len);
            }
        }
        cache.put(key, stored);
    }
}

/// Decodes a request; answers malformed or unsupported ones (FORMERR, NOTIMP,
/// BADVERS) itself and returns `None` for them (and drops what is not even a DNS
/// header).
fn parse(
    packet: &[u8],
    src: SocketAddr,
    socket: &UdpSocket,
    out: &mut Vec<u8>,
) -> Option<(Message, Option<Edns>)> {
    match request::parse(packet, out) {
        Parsed::Query { message, edns } => Some((message, edns)),
        Parsed::Refused => {
            let _ = socket.send_to(out, src);
            None
        }
        Parsed::Ignored => None,
    }
}

/// Encodes and sends an answer, truncated (TC) to the client's buffer size; `false`
/// if it could not be encoded.
fn respond(
    socket: &UdpSocket,
    dst: SocketAddr,
    request: &Metadata,
    query: &Query,
    edns: Option<&Edns>,
    records: &Records,
    out: &mut Vec<u8>,
) -> bool {
    let encoded = encode(request, query, edns, records, out);
    if encoded {
        let _ = socket.send_to(out, dst);
    }
    encoded
}

/// Encodes an answer into `out`, truncated (TC) to the client's buffer size.
fn encode(
    request: &Metadata,
    query: &Query,
    edns: Option<&Edns>,
    records: &Records,
    out: &mut Vec<u8>,
) -> bool {
    let max = edns
        .map(Edns::max_payload)
        .unwrap_or(512)
        .min(MAX_UDP_PAYLOAD);
    request::encode(request, query, edns, records, max, out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn questions_in_flight_are_bounded() {
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let first = super::InFlight::start(&counter, 2).expect("room");
        let second = super::InFlight::start(&counter, 2).expect("room");
        assert!(super::InFlight::start(&counter, 2).is_none(), "full");
        drop(first);
        let third = super::InFlight::start(&counter, 2);
        assert!(third.is_some(), "a finished question frees its place");
        drop((second, third));
        assert_eq!(counter.load(std::sync::atomic::Ordering::Acquire), 0);
    }

    use super::*;

    #[test]
    fn a_panicking_worker_is_restarted() {
        let runs = std::sync::atomic::AtomicU32::new(0);
        restarting("test", || {
            if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                panic!("boom");
            }
        });
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn header_counts_are_checked_before_parsing() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let src = client.local_addr().unwrap();
        let mut out = Vec::new();
        // 12 bytes claiming 65535 questions.
        let bomb = [0x12, 0x34, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
        assert!(parse(&bomb, src, &server, &mut out).is_none());
        let mut reply = [0u8; 512];
        let n = client.recv(&mut reply).unwrap();
        assert_eq!(&reply[..2], &[0x12, 0x34]);
        assert_eq!(reply[3] & 0x0f, 1, "FORMERR: {:?}", &reply[..n]);
        // A plain query still parses.
        let mut query = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        query.extend_from_slice(&[3, b'w', b'e', b'b', 0, 0, 1, 0, 1]);
        assert!(parse(&query, src, &server, &mut out).is_some());
        // EDNS version 1: BADVERS (extended rcode 16: 1 in the OPT's high bits).
        let mut v1 = query.clone();
        v1[11] = 1;
        v1.extend_from_slice(&[0, 0, 41, 0x04, 0xd0, 0, 1, 0, 0, 0, 0]);
        assert!(parse(&v1, src, &server, &mut out).is_none());
        let n = client.recv(&mut reply).unwrap();
        let r = &reply[..n];
        assert_eq!(r[3] & 0x0f, 0, "low rcode bits of 16: {r:?}");
        let opt = &r[r.len() - 11..];
        assert_eq!(
            u16::from_be_bytes([opt[1], opt[2]]),
            41,
            "an OPT record: {r:?}"
        );
        assert_eq!(
            (opt[5], opt[6]),
            (1, 0),
            "BADVERS high bits, version 0: {r:?}"
        );
    }
}
