//! Forwarding of names outside the cluster zone to upstream resolvers, with the
//! NodeLocal DNSCache role and CoreDNS's `forward` + `cache` behaviour: a cache that
//! honours record TTLs and negative TTLs (RFC 2308) within configurable caps, caches
//! failures briefly, serves stale answers while every upstream fails (RFC 8767),
//! refreshes popular names before they expire, coalesces identical concurrent
//! questions, bounds the questions in flight, routes stub domains to their own
//! servers, and detects forwarding loops.

mod upstreams;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::BinEncodable as _;
use tokio::sync::oneshot;
use tracing::{debug, error, info};

use self::upstreams::{UpstreamHealth, exchange_one};
use super::metrics::DnsMetrics;
use super::stub_domains::{Routes, StubDomain};

/// Upstream failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("no upstream resolver answered: {0}")]
    Unanswered(String),
    /// More questions in flight than `--dns-max-concurrent` (answered REFUSED, as
    /// CoreDNS's `max_concurrent`).
    #[error("too many questions in flight upstream")]
    Overloaded,
}

/// Settings of the forwarder (the `--dns-*` flags).
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Default upstreams (`--dns-upstream`, else resolv.conf).
    pub upstreams: Vec<SocketAddr>,
    /// `--dns-stub-domain`s.
    pub stub_domains: Vec<StubDomain>,
    /// Answers kept.
    pub cache_size: usize,
    /// Caps on how long an answer is cached (and the TTL it is served with).
    pub min_ttl: u32,
    pub max_ttl: u32,
    /// How long a failure (SERVFAIL, REFUSED, no answer) is cached.
    pub failure_ttl: u32,
    /// How long past expiry an answer may be served while every upstream fails;
    /// zero: never.
    pub serve_stale: Duration,
    /// Questions upstream at once, at most.
    pub max_concurrent: usize,
    /// How long one upstream gets to answer.
    pub upstream_timeout: Duration,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            stub_domains: Vec::new(),
            cache_size: 10_000,
            min_ttl: 0,
            max_ttl: 3600,
            failure_ttl: 5,
            serve_stale: Duration::from_secs(3600),
            max_concurrent: 1000,
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// TTL of answers served stale (RFC 8767's recommendation).
const STALE_TTL: u32 = 30;
/// A cached answer asked this often is refreshed before it expires...
const PREFETCH_HITS: u32 = 10;
/// ...once this share of its TTL (in percent) is left, if its TTL is at least
/// [`PREFETCH_MIN_TTL`] (CoreDNS's `prefetch` defaults).
const PREFETCH_PERCENT: u32 = 10;
const PREFETCH_MIN_TTL: u32 = 10;
/// The label under which loop probes are asked.
const LOOP_PROBE_ZONE: &str = "ferry-loop-check.";

/// Cache identity of a question: the name in wire form, lower-cased label by label
/// (so an escaped dot or an IDN cannot collide with another name), type and class.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    name: Vec<u8>,
    qtype: u16,
    qclass: u16,
}

impl Key {
    fn of(query: &Query) -> Self {
        Self {
            name: query.name().to_lowercase().to_bytes().unwrap_or_default(),
            qtype: u16::from(query.query_type()),
            qclass: u16::from(query.query_class()),
        }
    }
}

/// An upstream answer as cached.
#[derive(Debug)]
pub struct Cached {
    pub rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    stored: Instant,
    /// How long the whole answer may be served from cache.
    ttl: u32,
    /// Cache hits (for prefetching).
    hits: AtomicU32,
    /// A refresh is under way.
    prefetching: AtomicBool,
}

impl Cached {
    fn from_message(msg: Message, config: &ForwardConfig) -> Self {
        let rcode = msg.metadata.response_code;
        let positive = rcode == ResponseCode::NoError && !msg.answers.is_empty();
        let ttl = if positive {
            msg.answers.iter().map(|r| r.ttl).min().unwrap_or(0)
        } else if matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            // Negative answers live as long as the SOA says (RFC 2308 section 5);
            // without an SOA they are not cached.
            msg.authorities
                .iter()
                .find_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
                .unwrap_or(0)
        } else {
            config.failure_ttl
        };
        let ttl = if ttl == 0 && (positive || rcode == ResponseCode::NXDomain) {
            0
        } else {
            ttl.clamp(config.min_ttl, config.max_ttl.max(config.min_ttl))
        };
        let capped = |records: Vec<Record>| -> Vec<Record> {
            records
                .into_iter()
                .map(|mut r| {
                    r.ttl = r
                        .ttl
                        .clamp(config.min_ttl, config.max_ttl.max(config.min_ttl));
                    r
                })
                .collect()
        };
        Self::new(
            rcode,
            capped(msg.answers),
            capped(msg.authorities),
            capped(
                msg.additionals
                    .into_iter()
                    .filter(|r| !matches!(r.data, RData::OPT(_)))
                    .collect(),
            ),
            ttl,
        )
    }

    fn new(
        rcode: ResponseCode,
        answers: Vec<Record>,
        authorities: Vec<Record>,
        additionals: Vec<Record>,
        ttl: u32,
    ) -> Self {
        Self {
            rcode,
            answers,
            authorities,
            additionals,
            stored: Instant::now(),
            ttl,
            hits: AtomicU32::new(0),
            prefetching: AtomicBool::new(false),
        }
    }

    /// A failure answer, cached for `ttl`.
    fn failure(rcode: ResponseCode, ttl: u32) -> Self {
        Self::new(rcode, Vec::new(), Vec::new(), Vec::new(), ttl)
    }

    /// This expired answer, served while the upstreams fail: records with
    /// [`STALE_TTL`], not cached again.
    fn stale_copy(&self) -> Self {
        let stale = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = STALE_TTL;
                    r
                })
                .collect()
        };
        Self::new(
            self.rcode,
            stale(&self.answers),
            stale(&self.authorities),
            stale(&self.additionals),
            0,
        )
    }

    /// When this answer stops being servable.
    pub fn expires(&self) -> Instant {
        self.stored + Duration::from_secs(u64::from(self.ttl))
    }

    fn age(&self) -> u32 {
        self.stored.elapsed().as_secs().min(u64::from(u32::MAX)) as u32
    }

    /// Seconds this answer has left; zero once expired.
    fn remaining(&self) -> u32 {
        self.ttl.saturating_sub(self.age())
    }

    /// Whether it may still be served stale.
    fn within_stale(&self, serve_stale: Duration) -> bool {
        !serve_stale.is_zero() && self.expires() + serve_stale > Instant::now()
    }

    /// The three sections with TTLs reduced by the time spent in cache.
    pub fn sections(&self) -> (Vec<Record>, Vec<Record>, Vec<Record>) {
        let age = self.age();
        let aged = |records: &[Record]| {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = r.ttl.saturating_sub(age);
                    r
                })
                .collect()
        };
        (
            aged(&self.answers),
            aged(&self.authorities),
            aged(&self.additionals),
        )
    }

    /// Counts a hit; whether it is time to refresh this answer in the background.
    fn hit_wants_prefetch(&self) -> bool {
        let hits = self.hits.fetch_add(1, Ordering::Relaxed) + 1;
        hits >= PREFETCH_HITS
            && self.ttl >= PREFETCH_MIN_TTL
            && self.remaining() * 100 <= self.ttl * PREFETCH_PERCENT
            && !self.prefetching.swap(true, Ordering::AcqRel)
    }
}

type Waiters = Vec<oneshot::Sender<Result<Arc<Cached>, ForwardError>>>;

/// The in-flight entry of the query this task leads.
struct Leader<'a> {
    inflight: &'a Mutex<HashMap<Key, Waiters>>,
    key: Option<Key>,
}

impl Leader<'_> {
    /// Removes the entry; its waiters, to be answered.
    fn finish(mut self) -> Waiters {
        self.remove()
    }

    fn remove(&mut self) -> Waiters {
        let Some(key) = self.key.take() else {
            return Vec::new();
        };
        self.inflight
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&key))
            .unwrap_or_default()
    }
}

impl Drop for Leader<'_> {
    /// A leader dropped mid-exchange drops its waiters' senders: they wake with an
    /// error at once instead of hanging.
    fn drop(&mut self) {
        self.remove();
    }
}

/// A question upstream, counted against `max_concurrent` while it lives.
struct Slot<'a>(&'a AtomicUsize);

impl<'a> Slot<'a> {
    fn take(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        let taken = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then_some(Self(counter))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The forwarder.
pub struct Forwarder {
    me: Weak<Forwarder>,
    config: ForwardConfig,
    /// Stub domains and upstream override, from the flags and the kube-dns
    /// ConfigMap ([`Self::set_kube_dns_config`]).
    routes: RwLock<Arc<Routes>>,
    health: UpstreamHealth,
    timeout: Duration,
    cache: Mutex<HashMap<Key, Arc<Cached>>>,
    inflight: Mutex<HashMap<Key, Waiters>>,
    upstream_questions: AtomicUsize,
    /// Loop probes sent, by name: the upstream each went to.
    loop_probes: Mutex<HashMap<String, SocketAddr>>,
    /// Where prefetches run.
    runtime: Option<tokio::runtime::Handle>,
    metrics: Arc<DnsMetrics>,
    /// Positive and negative answers in the cache (for `coredns_cache_entries`).
    cache_counts: Mutex<(usize, usize)>,
}

impl Forwarder {
    /// A forwarder; prefetches run on the current runtime, if any.
    pub fn new(config: ForwardConfig, metrics: Arc<DnsMetrics>) -> Arc<Self> {
        let routes = Routes::new(config.stub_domains.clone(), None);
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            routes: RwLock::new(Arc::new(routes)),
            timeout: config.upstream_timeout,
            config,
            health: UpstreamHealth::default(),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            upstream_questions: AtomicUsize::new(0),
            loop_probes: Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::try_current().ok(),
            metrics,
            cache_counts: Mutex::new((0, 0)),
        })
    }

    /// Takes the kube-dns ConfigMap's stub domains and upstreams (the flags' stub
    /// domains win for the same zone).
    pub fn set_kube_dns_config(&self, stubs: Vec<StubDomain>, upstreams: Option<Vec<SocketAddr>>) {
        let mut all = stubs;
        all.extend(self.config.stub_domains.iter().cloned());
        let routes = Routes::new(all, upstreams);
        if let Ok(mut r) = self.routes.write()
            && **r != routes
        {
            info!(routes = ?routes, "DNS forwarding routes changed");
            *r = Arc::new(routes);
        }
    }

    /// The servers a name goes to.
    fn servers_for(&self, name: &Name) -> Vec<SocketAddr> {
        let routes = self.routes.read().map(|r| r.clone()).unwrap_or_default();
        let candidates = match routes.stub_for(&name.to_ascii()) {
            Some(stub) => stub.to_vec(),
            None => routes
                .upstreams
                .clone()
                .unwrap_or_else(|| self.config.upstreams.clone()),
        };
        self.health.order(&candidates)
    }

    /// The cached answer to `query`, if it is still fresh (a popular one about to
    /// expire is refreshed in the background).
    pub fn cached(&self, query: &Query) -> Option<Arc<Cached>> {
        let Some(hit) = self.cache_get(&Key::of(query)) else {
            self.metrics.cache_lookup(None);
            return None;
        };
        self.metrics.cache_lookup(Some(!hit.answers.is_empty()));
        if hit.hit_wants_prefetch() {
            self.prefetch(query.clone());
        }
        Some(hit)
    }

    fn prefetch(&self, query: Query) {
        let (Some(runtime), Some(me)) = (&self.runtime, self.me.upgrade()) else {
            return;
        };
        runtime.spawn(async move {
            let key = Key::of(&query);
            if let Ok(answer) = me.fetch(&query).await {
                debug!(name = %query.name(), "prefetched");
                me.cache_put(key, answer);
            }
        });
    }

    /// The answer to `query`: from cache, from a query already under way, or from
    /// upstream; an expired answer while every upstream fails.
    pub async fn resolve(&self, query: &Query) -> Result<Arc<Cached>, ForwardError> {
        let key = Key::of(query);
        if let Some(hit) = self.cache_get(&key) {
            return Ok(hit);
        }
        let waiting = {
            let Ok(mut inflight) = self.inflight.lock() else {
                return Err(ForwardError::Unanswered("internal lock poisoned".into()));
            };
            match inflight.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    inflight.insert(key.clone(), Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiting {
            // Bounded: the leader's exchange itself gives up after every upstream's
            // timeout.
            let bound = self.timeout * (self.config.upstreams.len().max(1) as u32 + 1);
            return match tokio::time::timeout(bound, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(ForwardError::Unanswered("coalesced query dropped".into())),
                Err(_) => Err(ForwardError::Unanswered("coalesced query timed out".into())),
            };
        }
        // However this future ends (answered, or dropped because its client went
        // away), the entry goes: waiters are answered or woken, and the next identical
        // question leads a new exchange.
        let leader = Leader {
            inflight: &self.inflight,
            key: Some(key.clone()),
        };
        let result = match self.fetch(query).await {
            Ok(answer) => {
                self.cache_put(key, answer.clone());
                Ok(answer)
            }
            Err(ForwardError::Overloaded) => Err(ForwardError::Overloaded),
            Err(e) => Ok(self.after_failure(&key, query, &e)),
        };
        for waiter in leader.finish() {
            let _ = waiter.send(result.clone());
        }
        result
    }

    /// Every upstream failed: the stale answer if there is one, else a SERVFAIL
    /// that is cached briefly (so a dead upstream is not asked per question).
    fn after_failure(&self, key: &Key, query: &Query, e: &ForwardError) -> Arc<Cached> {
        let stale = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(key).cloned())
            .filter(|c| {
                matches!(c.rcode, ResponseCode::NoError | ResponseCode::NXDomain)
                    && c.within_stale(self.config.serve_stale)
            });
        if let Some(stale) = stale {
            debug!(name = %query.name(), error = %e, "upstreams failing; serving a stale answer");
            return Arc::new(stale.stale_copy());
        }
        debug!(name = %query.name(), error = %e, "forwarding failed");
        let failure = Arc::new(Cached::failure(
            ResponseCode::ServFail,
            self.config.failure_ttl,
        ));
        self.cache_put(key.clone(), failure.clone());
        failure
    }

    /// One answer from upstream, within the bound on questions in flight.
    async fn fetch(&self, query: &Query) -> Result<Arc<Cached>, ForwardError> {
        let Some(_slot) = Slot::take(&self.upstream_questions, self.config.max_concurrent) else {
            return Err(ForwardError::Overloaded);
        };
        let message = self.exchange(query).await?;
        Ok(Arc::new(Cached::from_message(message, &self.config)))
    }

    fn cache_get(&self, key: &Key) -> Option<Arc<Cached>> {
        let cache = self.cache.lock().ok()?;
        cache.get(key).filter(|c| c.remaining() > 0).cloned()
    }

    fn cache_put(&self, key: Key, answer: Arc<Cached>) {
        if answer.ttl == 0 {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let evicted = cache.len() >= self.config.cache_size;
        if evicted {
            let stale = self.config.serve_stale;
            cache.retain(|_, c| c.remaining() > 0 || c.within_stale(stale));
            if cache.len() >= self.config.cache_size {
                // Still full: drop a tenth (expired ones first would need an order;
                // any tenth keeps this O(n) and rare).
                let drop: Vec<Key> = cache
                    .keys()
                    .take(self.config.cache_size / 10 + 1)
                    .cloned()
                    .collect();
                for k in drop {
                    cache.remove(&k);
                }
            }
        }
        let positive = |c: &Cached| !c.answers.is_empty();
        let added = positive(&answer);
        let replaced = cache.insert(key, answer);
        let (mut pos, mut neg) = *self
            .cache_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if evicted {
            pos = cache.values().filter(|c| positive(c)).count();
            neg = cache.len() - pos;
        } else {
            match replaced.as_deref().map(positive) {
                Some(true) => pos = pos.saturating_sub(1),
                Some(false) => neg = neg.saturating_sub(1),
                None => {}
            }
            if added {
                pos += 1;
            } else {
                neg += 1;
            }
        }
        *self
            .cache_counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (pos, neg);
        self.metrics.cache_size(pos, neg);
    }

    /// Asks the upstreams for `query` in [`UpstreamHealth::order`], each once.
    async fn exchange(&self, query: &Query) -> Result<Message, ForwardError> {
        let servers = self.servers_for(query.name());
        if servers.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let (id, bytes) = encode(query)?;
        let mut errors = Vec::new();
        for upstream in servers {
            match exchange_one(upstream, &bytes, id, query, self.timeout).await {
                Ok(answer) => {
                    self.metrics
                        .forwarded(upstream, Some(u16::from(answer.metadata.response_code)));
                    self.health.succeeded(upstream);
                    return Ok(answer);
                }
                Err(e) => {
                    debug!(%upstream, error = e, "upstream failed");
                    self.metrics.forwarded(upstream, None);
                    self.health.failed(upstream);
                    errors.push(format!("{upstream}: {e}"));
                }
            }
        }
        Err(ForwardError::Unanswered(errors.join("; ")))
    }

    /// Sends each upstream (default and stub servers) a question for a random name
    /// under [`LOOP_PROBE_ZONE`], as CoreDNS's `loop` plugin does: if one of them
    /// reaches this server again ([`Self::loop_probe_seen`]), that upstream forwards
    /// back to us and is dropped.
    pub async fn probe_for_loops(&self) {
        let routes = self.routes.read().map(|r| r.clone()).unwrap_or_default();
        let mut servers: Vec<SocketAddr> = routes
            .upstreams
            .clone()
            .unwrap_or_else(|| self.config.upstreams.clone());
        servers.extend(routes.stub_servers());
        servers.sort();
        servers.dedup();
        for upstream in servers {
            let name = format!(
                "{}.{}.{LOOP_PROBE_ZONE}",
                rand::random::<u64>(),
                rand::random::<u32>()
            );
            let Ok(qname) = Name::from_ascii(&name) else {
                continue;
            };
            if let Ok(mut probes) = self.loop_probes.lock() {
                probes.insert(name, upstream);
            }
            let query = Query::query(qname, RecordType::HINFO);
            if let Ok((id, bytes)) = encode(&query) {
                let _ = exchange_one(upstream, &bytes, id, &query, self.timeout).await;
            }
        }
    }

    /// Whether `qname` (lower-case presentation form) is one of this server's loop
    /// probes coming back; if so its upstream is dropped.
    pub fn loop_probe_seen(&self, qname: &str) -> bool {
        if !qname.ends_with(LOOP_PROBE_ZONE) {
            return false;
        }
        let upstream = self
            .loop_probes
            .lock()
            .ok()
            .and_then(|p| p.get(qname).copied());
        if let Some(upstream) = upstream
            && !self.health.is_looping(upstream)
        {
            error!(%upstream, "forwarding loop: this upstream sends queries back to this server; it is no longer used");
            self.health.looping(upstream);
        }
        true
    }
}

/// A query for upstream: a random id, recursion desired, EDNS with our buffer size.
fn encode(query: &Query) -> Result<(u16, Vec<u8>), ForwardError> {
    let id: u16 = rand::random();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    msg.set_edns(edns);
    let bytes = msg
        .to_vec()
        .map_err(|e| ForwardError::Unanswered(format!("cannot encode query: {e}")))?;
    Ok((id, bytes))
}

/// Name servers listed in a resolv.conf.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            rest.trim()
                .split('%')
                .next()?
                .parse::<std::net::IpAddr>()
                .ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_leader_does_not_leave_its_question_hanging() {
        use hickory_server::proto::rr::{Name, RecordType};
        // An upstream that never answers.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let f = Forwarder::new(
            ForwardConfig {
                upstreams: vec![silent.local_addr().unwrap()],
                ..ForwardConfig::default()
            },
            Arc::default(),
        );
        let q = Query::query(Name::from_ascii("x.test.").unwrap(), RecordType::A);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut leader = Box::pin(f.resolve(&q));
            let pending = tokio::time::timeout(Duration::from_millis(50), &mut leader).await;
            assert!(pending.is_err(), "still waiting for the silent upstream");
            let waiter = tokio::spawn({
                let rx = {
                    let mut inflight = f.inflight.lock().unwrap();
                    let (tx, rx) = oneshot::channel();
                    inflight.get_mut(&Key::of(&q)).expect("in flight").push(tx);
                    rx
                };
                async move { rx.await.is_err() }
            });
            drop(leader);
            assert!(
                f.inflight.lock().unwrap().is_empty(),
                "the entry went with the leader"
            );
            assert!(waiter.await.unwrap(), "the waiter woke with an error");
        });
    }

    /// An upstream on loopback answering every A question with 192.0.2.1 and `ttl`,
    /// while `answering`; counts the questions it gets.
    struct FakeUpstream {
        addr: SocketAddr,
        questions: Arc<AtomicUsize>,
        answering: Arc<AtomicBool>,
    }

    impl FakeUpstream {
        fn start(ttl: u32) -> Self {
            use hickory_server::proto::rr::rdata::A;
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = socket.local_addr().unwrap();
            let questions = Arc::new(AtomicUsize::new(0));
            let answering = Arc::new(AtomicBool::new(true));
            let (q, a) = (questions.clone(), answering.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = socket.recv_from(&mut buf) {
                    q.fetch_add(1, Ordering::SeqCst);
                    let Ok(query) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    if !a.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut reply =
                        Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
                    for question in &query.queries {
                        reply.add_query(question.clone());
                        reply.add_answer(Record::from_rdata(
                            question.name().clone(),
                            ttl,
                            RData::A(A::new(192, 0, 2, 1)),
                        ));
                    }
                    let _ = socket.send_to(&reply.to_vec().unwrap(), from);
                }
            });
            Self {
                addr,
                questions,
                answering,
            }
        }

        fn questions(&self) -> usize {
            self.questions.load(Ordering::SeqCst)
        }
    }

    fn config(upstream: &FakeUpstream) -> ForwardConfig {
        ForwardConfig {
            upstreams: vec![upstream.addr],
            upstream_timeout: Duration::from_millis(300),
            ..ForwardConfig::default()
        }
    }

    fn question(name: &str) -> Query {
        use hickory_server::proto::rr::{Name, RecordType};
        Query::query(Name::from_ascii(name).unwrap(), RecordType::A)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn ttls_are_capped_and_failures_cached_briefly() {
        let up = FakeUpstream::start(86_400);
        let rt = runtime();
        let f = rt.block_on(async {
            Forwarder::new(
                ForwardConfig {
                    max_ttl: 60,
                    ..config(&up)
                },
                Arc::default(),
            )
        });
        let answer = rt.block_on(f.resolve(&question("a.test."))).unwrap();
        assert_eq!(answer.ttl, 60);
        assert!(answer.sections().0.iter().all(|r| r.ttl <= 60));
        up.answering.store(false, Ordering::SeqCst);
        let failed = rt.block_on(f.resolve(&question("b.test."))).unwrap();
        assert_eq!(failed.rcode, ResponseCode::ServFail);
        let asked = up.questions();
        let again = rt.block_on(f.resolve(&question("b.test."))).unwrap();
        assert_eq!(again.rcode, ResponseCode::ServFail);
        assert_eq!(up.questions(), asked, "the failure came from the cache");
    }

    #[test]
    fn expired_answers_are_served_stale_while_upstreams_fail() {
        let up = FakeUpstream::start(1);
        let rt = runtime();
        let f = rt.block_on(async { Forwarder::new(config(&up), Arc::default()) });
        let q = question("a.test.");
        rt.block_on(f.resolve(&q)).unwrap();
        up.answering.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(f.cached(&q).is_none(), "expired");
        let stale = rt.block_on(f.resolve(&q)).unwrap();
        assert_eq!(stale.rcode, ResponseCode::NoError);
        let (answers, _, _) = stale.sections();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].ttl, STALE_TTL);
    }

    #[test]
    fn popular_answers_are_refreshed_before_they_expire() {
        let up = FakeUpstream::start(100);
        let rt = runtime();
        let f = rt.block_on(async { Forwarder::new(config(&up), Arc::default()) });
        let q = question("popular.test.");
        rt.block_on(f.resolve(&q)).unwrap();
        assert_eq!(up.questions(), 1);
        // Age the entry to 95 of its 100 seconds.
        if let Some(entry) = f.cache.lock().unwrap().get_mut(&Key::of(&q)) {
            let mut aged = Cached::new(
                entry.rcode,
                entry.answers.clone(),
                vec![],
                vec![],
                entry.ttl,
            );
            aged.stored = Instant::now() - Duration::from_secs(95);
            *entry = Arc::new(aged);
        }
        for _ in 0..PREFETCH_HITS {
            assert!(f.cached(&q).is_some());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while up.questions() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(up.questions(), 2, "refreshed once in the background");
        let deadline = Instant::now() + Duration::from_secs(5);
        while f.cached(&q).is_some_and(|c| c.remaining() < 50) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            f.cached(&q).is_some_and(|c| c.remaining() > 50),
            "the fresh answer replaced it"
        );
    }

    #[test]
    fn questions_beyond_the_concurrency_bound_are_refused() {
        let up = FakeUpstream::start(60);
        up.answering.store(false, Ordering::SeqCst);
        let rt = runtime();
        let f = rt.block_on(async {
            Forwarder::new(
                ForwardConfig {
                    max_concurrent: 1,
                    upstream_timeout: Duration::from_secs(2),
                    ..config(&up)
                },
                Arc::default(),
            )
        });
        rt.block_on(async {
            let first = tokio::spawn({
                let f = f.clone();
                async move { f.resolve(&question("one.test.")).await.map(|c| c.rcode) }
            });
            while up.questions() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(matches!(
                f.resolve(&question("two.test.")).await,
                Err(ForwardError::Overloaded)
            ));
            assert_eq!(first.await.unwrap().unwrap(), ResponseCode::ServFail);
        });
    }

    #[test]
    fn cache_keys_are_wire_names() {
        let plain = Key::of(&question("a.b.test."));
        let escaped = Key::of(&question("a\\.b.test."));
        assert_ne!(plain, escaped, "one label a.b is not two labels");
        assert_eq!(Key::of(&question("A.B.Test.")), plain);
    }

    #[test]
    fn parses_resolv_conf() {
        let text = "# comment\nsearch x\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            [
                "10.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
