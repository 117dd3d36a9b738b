//! DNS metrics under CoreDNS's names and labels (`coredns_dns_*`, `coredns_cache_*`,
//! `coredns_forward_*`), so dashboards and alerts built for CoreDNS keep working,
//! and the optional query log (CoreDNS's `log` plugin). The UDP workers count
//! through a [`Recorder`] each, which keeps its own handles on the counters: after
//! warm-up a query costs a few atomic additions and no lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use tracing::info;

type Labels = Vec<(String, String)>;

/// CoreDNS's request duration buckets: 0.25 ms doubling, 16 of them.
#[derive(Clone)]
struct DurationBuckets;

impl MetricConstructor<Durations> for DurationBuckets {
    fn new_metric(&self) -> Durations {
        Durations::new(exponential_buckets(0.00025, 2.0, 16).collect())
    }
}

/// A histogram of durations updated with atomic additions only: prometheus-client's
/// `Histogram` takes a mutex per observation, which every UDP worker would contend on.
#[derive(Clone, Debug)]
pub struct Durations(Arc<DurationsInner>);

#[derive(Debug)]
struct DurationsInner {
    /// Upper bounds, ascending; one more bucket (infinity) follows.
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Durations {
    fn new(bounds: Vec<f64>) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self(Arc::new(DurationsInner {
            bounds,
            counts,
            sum_nanos: AtomicU64::new(0),
        }))
    }

    /// Counts one duration.
    pub fn observe(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let bucket = self.0.bounds.partition_point(|b| *b < secs);
        self.0.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts: Vec<u64> = self
            .0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts.iter().copied())
            .collect();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The zone label: Ferry serves one server block, `.` (kubeadm's Corefile's).
const ZONE: &str = ".";

/// Which part of the server answered (CoreDNS's `plugin` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Plugin {
    /// The cluster zone.
    Kubernetes,
    /// The forwarder's cache.
    Cache,
    /// An upstream.
    Forward,
    /// The server itself (malformed or refused questions).
    None,
}

impl Plugin {
    fn label(self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::Cache => "cache",
            Self::Forward => "forward",
            Self::None => "",
        }
    }
}

/// Every DNS metric, shared by the servers and the forwarder.
pub struct DnsMetrics {
    requests: Family<Labels, Counter>,
    responses: Family<Labels, Counter>,
    duration: Family<Labels, Durations, DurationBuckets>,
    cache_entries: Family<Labels, Gauge>,
    cache_hits: Family<Labels, Counter>,
    cache_misses: Family<Labels, Counter>,
    forward_requests: Family<Labels, Counter>,
    forward_responses: Family<Labels, Counter>,
    forward_failures: Family<Labels, Counter>,
    log: AtomicBool,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            responses: Family::default(),
            duration: Family::new_with_constructor(DurationBuckets),
            cache_entries: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            forward_requests: Family::default(),
            forward_responses: Family::default(),
            forward_failures: Family::default(),
            log: AtomicBool::new(false),
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// CoreDNS's `type` label: common types by name, the rest `other`.
pub fn type_label(qtype: u16) -> &'static str {
    match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        43 => "DS",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        50 => "NSEC3",
        65 => "HTTPS",
        251 => "IXFR",
        252 => "AXFR",
        255 => "ANY",
        _ => "other",
    }
}

/// The presentation of a response code, as CoreDNS's `rcode` label has it.
pub fn rcode_label(rcode: u16) -> &'static str {
    match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        16 => "BADVERS",
        _ => "other",
    }
}

/// One answered question, as the metrics and the query log see it.
pub struct Answered<'a> {
    pub client: SocketAddr,
    pub id: u16,
    pub name: &'a dyn std::fmt::Display,
    pub qtype: u16,
    pub rcode: u16,
    pub plugin: Plugin,
    pub size: usize,
    pub started: Instant,
}

impl DnsMetrics {
    /// Registers every metric under its CoreDNS name.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family.",
            self.requests.clone(),
        );
        r.register(
            "coredns_dns_responses",
            "Counter of response status codes.",
            self.responses.clone(),
        );
        r.register(
            "coredns_dns_request_duration_seconds",
            "Histogram of the time (in seconds) each request took per zone.",
            self.duration.clone(),
        );
        r.register(
            "coredns_cache_entries",
            "The number of elements in the cache.",
            self.cache_entries.clone(),
        );
        r.register(
            "coredns_cache_hits",
            "The count of cache hits.",
            self.cache_hits.clone(),
        );
        r.register("coredns_cache_misses", "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.", self.cache_misses.clone());
        r.register(
            "coredns_forward_requests",
            "Counter of requests made per upstream.",
            self.forward_requests.clone(),
        );
        r.register(
            "coredns_forward_responses",
            "Counter of responses received per upstream.",
            self.forward_responses.clone(),
        );
        r.register(
            "coredns_forward_healthcheck_failures",
            "Counter of the number of failed healthchecks.",
            self.forward_failures.clone(),
        );
    }

    /// Turns the query log on (`--dns-log`).
    pub fn set_query_log(&self, on: bool) {
        self.log.store(on, Ordering::Relaxed);
    }

    /// A recorder for one worker serving `listen` over `proto` (`udp`, `tcp`).
    pub fn recorder(self: &Arc<Self>, listen: SocketAddr, proto: &'static str) -> Recorder {
        Recorder {
            metrics: self.clone(),
            server: format!("dns://{listen}"),
            proto,
            requests: Vec::new(),
            responses: Vec::new(),
            durations: Vec::new(),
            cache_hits: [None, None],
            batched: Vec::with_capacity(super::udp_batch::BATCH),
        }
    }

    /// The forwarder's cache holds `success` positive and `denial` negative answers.
    pub fn cache_size(&self, success: usize, denial: usize) {
        for (kind, n) in [("success", success), ("denial", denial)] {
            self.cache_entries
                .get_or_create(&labels(&[("server", "dns://"), ("type", kind)]))
                .set(n as i64);
        }
    }

    /// A forwarder cache lookup (`hit`: a fresh positive or negative answer).
    pub fn cache_lookup(&self, hit: Option<bool>) {
        match hit {
            Some(positive) => {
                let kind = if positive { "success" } else { "denial" };
                self.cache_hits
                    .get_or_create(&labels(&[("server", "dns://"), ("type", kind)]))
                    .inc();
            }
            None => {
                self.cache_misses
                    .get_or_create(&labels(&[("server", "dns://")]))
                    .inc();
            }
        }
    }

    /// A question sent to `upstream`, and its outcome (`None`: no answer).
    pub fn forwarded(&self, upstream: SocketAddr, rcode: Option<u16>) {
        let to = upstream.to_string();
        self.forward_requests
            .get_or_create(&labels(&[("to", &to)]))
            .inc();
        match rcode {
            Some(rcode) => self
                .forward_responses
                .get_or_create(&labels(&[("to", &to), ("rcode", rcode_label(rcode))]))
                .inc(),
            None => self
                .forward_failures
                .get_or_create(&labels(&[("to", &to)]))
                .inc(),
        };
    }
}

/// The handle for `key` in a worker's short list (a handful of keys: a linear scan
/// beats hashing), made by `make` the first time.
fn cached<K: PartialEq + Copy, M>(list: &mut Vec<(K, M)>, key: K, make: impl FnOnce() -> M) -> &M {
    let at = match list.iter().position(|(k, _)| *k == key) {
        Some(at) => at,
        None => {
            list.push((key, make()));
            list.len() - 1
        }
    };
    &list[at].1
}

/// One worker's handles on the request metrics.
pub struct Recorder {
    metrics: Arc<DnsMetrics>,
    server: String,
    proto: &'static str,
    requests: Vec<((u16, u8), Counter)>,
    responses: Vec<((u16, Plugin), Counter)>,
    durations: Vec<(u16, Durations)>,
    cache_hits: [Option<Counter>; 2],
    /// Query types of answers whose duration [`Recorder::finish_batch`] observes.
    batched: Vec<u16>,
}

impl Recorder {
    /// Counts an answer the forwarder's cache gave (served from its encoding).
    pub fn cache_hit(&mut self, positive: bool) {
        let m = &self.metrics;
        self.cache_hits[usize::from(positive)]
            .get_or_insert_with(|| {
                let kind = if positive { "success" } else { "denial" };
                m.cache_hits
                    .get_or_create(&labels(&[("server", "dns://"), ("type", kind)]))
                    .clone()
            })
            .inc();
    }

    /// Counts one answered question (and logs it when the query log is on).
    pub fn record(&mut self, a: &Answered<'_>) {
        self.count(a);
        let took = a.started.elapsed();
        self.observe(a.qtype, took);
        self.log(a, took);
    }

    /// As [`Recorder::record`] for an answer sent with the rest of its batch: its
    /// duration is observed by [`Recorder::finish_batch`], one clock read for the
    /// whole batch (a clock read costs more than the rest of a cached answer's
    /// accounting).
    pub fn record_batched(&mut self, a: &Answered<'_>) {
        if self.metrics.log.load(Ordering::Relaxed) {
            return self.record(a);
        }
        self.count(a);
        self.batched.push(a.qtype);
    }

    /// Observes the durations of the answers of a batch received at `started`,
    /// now that they are sent.
    pub fn finish_batch(&mut self, started: Instant) {
        if self.batched.is_empty() {
            return;
        }
        let took = started.elapsed();
        let batched = std::mem::take(&mut self.batched);
        for &qtype in &batched {
            self.observe(qtype, took);
        }
        self.batched = batched;
        self.batched.clear();
    }

    fn count(&mut self, a: &Answered<'_>) {
        let family = if a.client.is_ipv4() { 1 } else { 2 };
        let (server, proto, m) = (&self.server, self.proto, &self.metrics);
        cached(&mut self.requests, (a.qtype, family), || {
            m.requests
                .get_or_create(&labels(&[
                    ("server", server),
                    ("zone", ZONE),
                    ("view", ""),
                    ("proto", proto),
                    ("family", if family == 1 { "1" } else { "2" }),
                    ("type", type_label(a.qtype)),
                ]))
                .clone()
        })
        .inc();
        cached(&mut self.responses, (a.rcode, a.plugin), || {
            m.responses
                .get_or_create(&labels(&[
                    ("server", server),
                    ("zone", ZONE),
                    ("view", ""),
                    ("rcode", rcode_label(a.rcode)),
                    ("plugin", a.plugin.label()),
                ]))
                .clone()
        })
        .inc();
    }

    fn observe(&mut self, qtype: u16, took: Duration) {
        let (server, m) = (&self.server, &self.metrics);
        cached(&mut self.durations, qtype, || {
            m.duration
                .get_or_create(&labels(&[
                    ("server", server),
                    ("zone", ZONE),
                    ("view", ""),
                    ("type", type_label(qtype)),
                ]))
                .clone()
        })
        .observe(took);
    }

    fn log(&self, a: &Answered<'_>, took: Duration) {
        let (proto, m) = (self.proto, &self.metrics);
        if m.log.load(Ordering::Relaxed) {
            info!(
                target: "ferry::dns::query",
                "{} - {} \"{} IN {} {proto}\" {} {} {:.6}s",
                a.client,
                a.id,
                type_label(a.qtype),
                a.name,
                rcode_label(a.rcode),
                a.size,
                took.as_secs_f64()
            );
        }
    }
}
