//! Cluster DNS: `*.svc.<cluster-domain>` answered from the same model that drives the
//! data plane (so DNS and load balancing never disagree), everything else forwarded
//! upstream through a cache. Takes over CoreDNS's and NodeLocal DNSCache's roles.
//!
//! Transport, parsing, EDNS and truncation come from hickory-server; answers come from
//! [`zone::Zone`] and [`forward::Forwarder`].

pub mod addresses;
pub mod external_name;
pub mod forward;
pub mod handover;
pub mod inspect;
pub mod listeners;
pub mod liveness;
pub mod metrics;
pub mod rate_limit;
pub mod records;
mod request;
pub mod stub_domains;
mod tcp;
mod udp;
mod udp_batch;
pub mod wire_cache;
pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::proto::op::{Edns, Query, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnetwork::IpNetwork;
use tracing::{error, info, warn};

use self::forward::Forwarder;
use self::zone::{Outcome, QType, Rec, Zone};
use crate::model::{ClusterDomain, ClusterState, ServiceName};

/// Largest UDP answer Ferry sends, whatever the client offers (the DNS flag day 2020
/// value: avoids IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Settings of the DNS server.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Addresses served from the start (`--dns-listen`).
    pub listen: Vec<SocketAddr>,
    /// The kube-dns Service this node answers for (`--dns-service`).
    pub service: Option<ServiceName>,
    /// Unix socket for handing the sockets to a successor (`--dns-handover-socket`).
    pub handover: Option<std::path::PathBuf>,
    pub domain: ClusterDomain,
    pub ttl: u32,
    /// Where outside names go, and how their answers are cached.
    pub forward: forward::ForwardConfig,
    /// Answers per client and second over UDP (`--dns-rate-limit`; 0: no limit).
    pub rate_limit: u32,
    /// One log line per query (`--dns-log`).
    pub query_log: bool,
    /// CoreDNS-style readiness endpoint (`--dns-ready-bind-address`).
    pub ready: Option<SocketAddr>,
    /// Answer `a-b-c-d.NAMESPACE.pod.ZONE` names (`--dns-pods insecure`).
    pub pod_records: bool,
    /// The kube-dns ConfigMap mounted as a directory (`stubDomains`,
    /// `upstreamNameservers`), re-read while the agent runs.
    pub kube_dns_config: Option<std::path::PathBuf>,
    /// Sources that may use the forwarder (the cluster zone answers everyone).
    pub forward_allowed: Vec<IpNetwork>,
    /// Of those, the ones that may also arrive through an uplink.
    pub forward_allowed_outside: Vec<IpNetwork>,
    /// Interface indexes holding a default route (uplinks).
    pub uplinks: Vec<u32>,
}

/// The cluster zone, shared by the proxy loop (writer) and the DNS server (readers).
#[derive(Clone)]
pub struct ClusterDns {
    zone: Arc<RwLock<Zone>>,
    domain: ClusterDomain,
    /// `cluster.local.`: names outside it (and not reverse names) never touch the
    /// zone's lock.
    apex: String,
    pod_records: bool,
    /// Bumped on every change, so answers encoded earlier know they are stale.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl ClusterDns {
    /// An empty, not yet synced zone for `domain`.
    pub fn new(domain: &ClusterDomain) -> Self {
        Self {
            zone: Arc::new(RwLock::new(Zone::new(domain))),
            domain: domain.clone(),
            apex: domain.apex(),
            pod_records: false,
            generation: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Also answers pod names (`--dns-pods insecure`).
    pub fn with_pod_records(mut self, on: bool) -> Self {
        self.pod_records = on;
        self.zone = Arc::new(RwLock::new(Zone::new(&self.domain).with_pod_records(on)));
        self
    }

    /// Re-reads the given services from the model. The records are built before
    /// the zone is locked, so readers wait only for the index updates.
    pub fn update<'a>(
        &self,
        state: &ClusterState,
        services: impl IntoIterator<Item = &'a ServiceName>,
    ) {
        let fresh: Vec<(&ServiceName, Option<records::ServiceRecords>)> = services
            .into_iter()
            .map(|name| {
                let records = state
                    .service(name)
                    .map(|svc| self.records_of(state, name, svc));
                (name, records)
            })
            .collect();
        let (mut zone, rebuild) = self.write_zone();
        if rebuild {
            for svc in state.services() {
                zone.update(&svc.name, Some(self.records_of(state, &svc.name, svc)));
            }
        }
        for (name, records) in fresh {
            zone.update(name, records);
        }
        drop(zone);
        self.bump();
    }

    fn records_of(
        &self,
        state: &ClusterState,
        name: &ServiceName,
        svc: &crate::model::ServiceInfo,
    ) -> records::ServiceRecords {
        let slices: Vec<&crate::model::SliceInfo> =
            state.slices_of(name).map(|s| s.as_ref()).collect();
        records::service_records(svc, &slices, &self.domain)
    }

    /// The zone for writing, and whether it must be rebuilt from the model: a panic
    /// during an earlier update poisons the lock and may have left the zone half
    /// updated, so it is emptied (keeping its synced state) and refilled rather than
    /// abandoned (which would answer SERVFAIL for every cluster name for good).
    fn write_zone(&self) -> (std::sync::RwLockWriteGuard<'_, Zone>, bool) {
        match self.zone.write() {
            Ok(zone) => (zone, false),
            Err(poisoned) => {
                error!(
                    "cluster DNS zone was left inconsistent by a panic; rebuilding it from the model"
                );
                self.zone.clear_poison();
                let mut zone = poisoned.into_inner();
                let synced = zone.is_synced();
                *zone = Zone::new(&self.domain).with_pod_records(self.pod_records);
                if synced {
                    zone.set_synced();
                }
                (zone, true)
            }
        }
    }

    /// Whether the zone is complete (answered authoritatively).
    pub fn is_synced(&self) -> bool {
        self.zone
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_synced()
    }

    /// The model is complete: start answering authoritatively.
    pub fn set_synced(&self) {
        let (mut zone, _) = self.write_zone();
        zone.set_synced();
        info!(names = zone.len(), "cluster DNS zone ready");
        drop(zone);
        self.bump();
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Changes so far (see [`CacheScope::Zone`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Answers from the zone. A poisoned lock is read through: the writer rebuilds
    /// the zone at its next update, and until then a possibly stale answer beats none.
    pub(crate) fn lookup(&self, qname: &str, qtype: QType) -> Outcome {
        if !Zone::covers(&self.apex, qname) {
            return Outcome::Elsewhere;
        }
        let zone = self
            .zone
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        zone.lookup(qname, qtype)
    }
}

/// How long an encoded answer may be reused for the same question.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheScope {
    /// Until the cluster zone changes (this generation).
    Zone(u64),
    /// Until then, for clients allowed to forward (a cached upstream answer; reused
    /// for at most a second so TTLs keep counting down).
    Forwarded(std::time::Instant),
    /// Never (depends on the client, or a failure).
    No,
}

/// What to send back for one question.
#[derive(Clone, Debug)]
pub struct Records {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub cache: CacheScope,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Records {
    /// An answer with no records, only a response code.
    pub fn error(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            authoritative: false,
            cache: CacheScope::No,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// How a question is answered.
#[derive(Debug)]
pub enum Reply {
    /// Right away.
    Now(Records),
    /// After asking upstream (not cached yet).
    Forward,
}

/// Who asked: the source address, and whether the question came in through an
/// uplink (an interface holding a default route), where sources from inside the
/// node or its pods are spoofed.
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub ip: IpAddr,
    pub via_uplink: bool,
}

/// The answering logic, shared by the UDP workers and the TCP server.
pub struct Answerer {
    cluster: ClusterDns,
    forwarder: Arc<Forwarder>,
    forward_allowed: Vec<IpNetwork>,
    /// Sources that may forward even through an uplink (`--dns-forward-allow`).
    forward_allowed_outside: Vec<IpNetwork>,
    /// Interface indexes of the uplinks.
    uplinks: Vec<u32>,
    ttl: u32,
    soa: Record,
    /// Turns of the address order in multi-address answers (CoreDNS `loadbalance`).
    rotation: std::sync::atomic::AtomicUsize,
}

impl Answerer {
    pub fn new(cluster: ClusterDns, config: &DnsConfig, metrics: Arc<metrics::DnsMetrics>) -> Self {
        let apex = Name::from_ascii(config.domain.apex()).unwrap_or_else(|_| Name::root());
        let label = |prefix: &str| {
            Name::from_ascii(format!("{prefix}.{apex}")).unwrap_or_else(|_| Name::root())
        };
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let soa = Record::from_rdata(
            apex.clone(),
            config.ttl,
            RData::SOA(SOA::new(
                label("ns.dns"),
                label("hostmaster"),
                serial,
                7200,
                1800,
                86_400,
                config.ttl,
            )),
        );
        Self {
            cluster,
            forwarder: Forwarder::new(config.forward.clone(), metrics),
            forward_allowed: config.forward_allowed.clone(),
            forward_allowed_outside: config.forward_allowed_outside.clone(),
            uplinks: config.uplinks.clone(),
            ttl: config.ttl,
            soa,
            rotation: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Answers `query` from `src` without waiting: from the cluster zone, from the
    /// forwarding cache, with REFUSED for clients that may not forward, or
    /// [`Reply::Forward`] when upstream must be asked.
    pub fn answer(&self, query: &Query, src: &Client) -> Reply {
        // Read before the lookup: a change racing with it makes the answer stale, never
        // a stale answer look current.
        let generation = self.cluster.generation();
        let qtype = qtype_of(query.query_type());
        let outcome = if query.query_class() == DNSClass::IN {
            self.cluster.lookup(&lower_name(query), qtype)
        } else {
            Outcome::Elsewhere
        };
        let records = |rcode, answers: &[Rec], additionals: &[Rec], soa: bool| Records {
            rcode,
            authoritative: true,
            cache: CacheScope::Zone(generation),
            answers: self.records(answers, query.name()),
            authorities: if soa {
                vec![self.soa.clone()]
            } else {
                Vec::new()
            },
            additionals: self.records(additionals, query.name()),
        };
        match outcome {
            Outcome::Answer {
                mut answers,
                additionals,
            } => {
                let lookup = |name: &str, t| self.cluster.lookup(name, t);
                let outside = external_name::chase(&mut answers, qtype, lookup);
                if matches!(outside, external_name::Chased::Outside(_)) && self.may_forward(src) {
                    return Reply::Forward;
                }
                if qtype == QType::Any {
                    minimal_any(&mut answers);
                }
                let mut out = records(ResponseCode::NoError, &answers, &additionals, false);
                let turn = self
                    .rotation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rotate_addresses(&mut out.answers, turn);
                Reply::Now(out)
            }
            Outcome::NoData => Reply::Now(records(ResponseCode::NoError, &[], &[], true)),
            Outcome::NxDomain => Reply::Now(records(ResponseCode::NXDomain, &[], &[], true)),
            Outcome::NotSynced => Reply::Now(Records::error(ResponseCode::ServFail)),
            // A loop probe coming back proves a loop whoever relays it.
            Outcome::Elsewhere if self.forwarder.loop_probe_seen(&lower_name(query)) => {
                Reply::Now(Records::error(ResponseCode::Refused))
            }
            Outcome::Elsewhere if !self.may_forward(src) => {
                Reply::Now(Records::error(ResponseCode::Refused))
            }
            Outcome::Elsewhere => match self.forwarder.cached(query) {
                Some(cached) => Reply::Now(Self::forwarded(&cached)),
                None => Reply::Forward,
            },
        }
    }

    fn records(&self, recs: &[Rec], qname: &Name) -> Vec<Record> {
        recs.iter().filter_map(|r| self.record(r, qname)).collect()
    }

    /// An ExternalName answer whose CNAME chain leaves the zone: the chain, then
    /// what upstream says about its last target. `None` when `query` is not one.
    async fn external_name(&self, query: &Query) -> Option<Records> {
        let qtype = qtype_of(query.query_type());
        let Outcome::Answer { mut answers, .. } = self.cluster.lookup(&lower_name(query), qtype)
        else {
            return None;
        };
        let lookup = |name: &str, t| self.cluster.lookup(name, t);
        let external_name::Chased::Outside(target) =
            external_name::chase(&mut answers, qtype, lookup)
        else {
            return None;
        };
        let mut chain = self.records(&answers, query.name());
        let target = Query::query(Name::from_ascii(&target).ok()?, query.query_type());
        let (rcode, upstream) = match self.forwarder.resolve(&target).await {
            Ok(cached) => (cached.rcode, cached.sections().0),
            Err(_) => (ResponseCode::ServFail, Vec::new()),
        };
        chain.extend(upstream);
        Some(Records {
            rcode,
            authoritative: false,
            cache: CacheScope::No,
            answers: chain,
            authorities: Vec::new(),
            additionals: Vec::new(),
        })
    }

    /// The cluster zone's generation (see [`CacheScope::Zone`]).
    pub fn generation(&self) -> u64 {
        self.cluster.generation()
    }

    /// The client of a question from `ip` that arrived on `interface` (if known).
    pub fn client(&self, ip: IpAddr, interface: Option<u32>) -> Client {
        Client {
            ip,
            via_uplink: interface.is_some_and(|i| self.uplinks.contains(&i)),
        }
    }

    /// Whether `src` may use the forwarder: a pod, the node or `--dns-forward-allow`;
    /// through an uplink only the latter (a pod or node source arriving from outside
    /// is spoofed, and the answer would be reflected at it).
    pub fn may_forward(&self, src: &Client) -> bool {
        let allowed = if src.via_uplink {
            &self.forward_allowed_outside
        } else {
            &self.forward_allowed
        };
        allowed.iter().any(|n| n.contains(src.ip))
    }

    /// The forwarder (its routes follow the kube-dns ConfigMap; loop probes).
    pub fn forwarder(&self) -> &Arc<Forwarder> {
        &self.forwarder
    }

    /// Asks upstream (coalescing identical questions) and answers with the result;
    /// for an ExternalName pointing outside, asks for its target.
    pub async fn forward(&self, query: &Query) -> Records {
        if let Some(records) = self.external_name(query).await {
            return records;
        }
        match self.forwarder.resolve(query).await {
            Ok(cached) => Self::forwarded(&cached),
            Err(forward::ForwardError::Overloaded) => Records::error(ResponseCode::Refused),
            Err(e) => {
                warn!(name = %query.name(), error = %e, "forwarding failed");
                Records::error(ResponseCode::ServFail)
            }
        }
    }

    fn forwarded(cached: &forward::Cached) -> Records {
        let (answers, authorities, additionals) = cached.sections();
        let reuse_until = cached
            .expires()
            .min(std::time::Instant::now() + Duration::from_secs(1));
        Records {
            rcode: cached.rcode,
            authoritative: false,
            cache: if cached.rcode == ResponseCode::ServFail {
                CacheScope::No
            } else {
                CacheScope::Forwarded(reuse_until)
            },
            answers,
            authorities,
            additionals,
        }
    }

    fn record(&self, rec: &Rec, qname: &Name) -> Option<Record> {
        let owner = |o: &Option<String>| match o {
            None => Some(qname.clone()),
            Some(name) => Name::from_ascii(name).ok(),
        };
        let name = |s: &str| Name::from_ascii(s).ok();
        let (owner, data) = match rec {
            Rec::Addr { owner: o, ip } => (
                owner(o)?,
                match ip {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                },
            ),
            Rec::Srv { owner: o, srv } => (
                owner(o)?,
                RData::SRV(SRV::new(
                    srv.priority,
                    srv.weight,
                    srv.port,
                    name(&srv.target)?,
                )),
            ),
            Rec::Cname { owner: o, target } => (owner(o)?, RData::CNAME(CNAME(name(target)?))),
            Rec::Ptr { owner: o, target } => (owner(o)?, RData::PTR(PTR(name(target)?))),
            Rec::Txt { owner: o, text } => (owner(o)?, RData::TXT(TXT::new(vec![text.clone()]))),
            Rec::Ns { owner: o, target } => (owner(o)?, RData::NS(NS(name(target)?))),
            Rec::Soa { owner: o } => (owner(o)?, self.soa.data.clone()),
        };
        Some(Record::from_rdata(owner, self.ttl, data))
    }
}

/// Which part answered `records` (the metrics' `plugin`).
fn plugin_of(records: &Records) -> metrics::Plugin {
    match records.cache {
        _ if records.authoritative => metrics::Plugin::Kubernetes,
        CacheScope::Forwarded(_) => metrics::Plugin::Cache,
        _ => metrics::Plugin::None,
    }
}

/// An ANY question gets one RRset (RFC 8482: answering ANY in full only helps
/// amplification): the first record's type, addresses of one family.
fn minimal_any(answers: &mut Vec<Rec>) {
    let kind = |r: &Rec| match r {
        Rec::Addr { ip, .. } => {
            if ip.is_ipv4() {
                0
            } else {
                1
            }
        }
        Rec::Srv { .. } => 2,
        Rec::Cname { .. } => 3,
        Rec::Ptr { .. } => 4,
        Rec::Txt { .. } => 5,
        Rec::Soa { .. } => 6,
        Rec::Ns { .. } => 7,
    };
    if let Some(first) = answers.first().map(kind) {
        answers.retain(|r| kind(r) == first);
    }
}

/// Rotates the A/AAAA records of `answers` among their own positions by `turn`
/// (round robin across queries, as CoreDNS's `loadbalance`; other records keep
/// their place, a CNAME chain stays in front).
pub fn rotate_addresses(answers: &mut [Record], turn: usize) {
    let positions: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.data, RData::A(_) | RData::AAAA(_)))
        .map(|(i, _)| i)
        .collect();
    if positions.len() < 2 {
        return;
    }
    let data: Vec<RData> = positions.iter().map(|&i| answers[i].data.clone()).collect();
    let names: Vec<Name> = positions.iter().map(|&i| answers[i].name.clone()).collect();
    let n = positions.len();
    for (k, &i) in positions.iter().enumerate() {
        let from = (k + turn) % n;
        answers[i].data = data[from].clone();
        answers[i].name = names[from].clone();
    }
}

/// The question's name, lower case, with its trailing dot.
fn lower_name(query: &Query) -> String {
    let mut name = query.name().to_lowercase().to_string();
    if !name.ends_with('.') {
        name.push('.');
    }
    name
}

fn qtype_of(t: RecordType) -> QType {
    match t {
        RecordType::A => QType::A,
        RecordType::AAAA => QType::Aaaa,
        RecordType::SRV => QType::Srv,
        RecordType::CNAME => QType::Cname,
        RecordType::PTR => QType::Ptr,
        RecordType::TXT => QType::Txt,
        RecordType::SOA => QType::Soa,
        RecordType::NS => QType::Ns,
        RecordType::ANY => QType::Any,
        _ => QType::Other,
    }
}

/// Whether the request uses an EDNS version this server does not speak (only 0
/// exists): RFC 6891 wants BADVERS, with an OPT of version 0, and nothing else.
pub fn unsupported_edns_version(request: Option<&Edns>) -> bool {
    request.is_some_and(|e| e.version() != 0)
}

/// The EDNS to answer with: the client's buffer size, capped at [`MAX_UDP_PAYLOAD`].
pub fn response_edns(request: Option<&Edns>) -> Option<Edns> {
    request.map(|e| {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        edns
    })
}

/// Starts a DNS server with no listeners (see [`listeners::DnsServer::listen`] and
/// [`handover`]) answering from `cluster`; follows the kube-dns ConfigMap and
/// probes the upstreams for forwarding loops.
pub fn server(
    config: &DnsConfig,
    cluster: ClusterDns,
    runtime: tokio::runtime::Handle,
    metrics: Arc<metrics::DnsMetrics>,
) -> Arc<listeners::DnsServer> {
    let _entered = runtime.enter();
    metrics.set_query_log(config.query_log);
    let answerer = Arc::new(Answerer::new(cluster, config, metrics.clone()));
    let forwarder = answerer.forwarder().clone();
    let dir = config.kube_dns_config.clone();
    runtime.spawn(async move {
        follow_routes(&forwarder, dir.as_deref()).await;
    });
    info!(listen = ?config.listen, domain = %config.domain, upstreams = ?config.forward.upstreams, stub_domains = ?config.forward.stub_domains, "starting DNS");
    let limit = rate_limit::RateLimit::new(config.rate_limit);
    listeners::DnsServer::new(answerer, runtime, metrics, limit)
}

/// How often the kube-dns ConfigMap directory is read again (kubelet updates a
/// mounted ConfigMap within about a minute anyway).
const ROUTES_PERIOD: Duration = Duration::from_secs(5);

/// Loads the kube-dns ConfigMap's routes, probes for loops once the server has had
/// a moment to start listening, then follows the ConfigMap (probing again after a
/// change).
async fn follow_routes(forwarder: &Forwarder, dir: Option<&std::path::Path>) {
    let read = || {
        dir.map(stub_domains::read_kube_dns_config)
            .unwrap_or_default()
    };
    let mut last = read();
    forwarder.set_kube_dns_config(last.0.clone(), last.1.clone());
    tokio::time::sleep(Duration::from_secs(1)).await;
    forwarder.probe_for_loops().await;
    if dir.is_none() {
        return;
    }
    loop {
        tokio::time::sleep(ROUTES_PERIOD).await;
        let now = read();
        if now != last {
            forwarder.set_kube_dns_config(now.0.clone(), now.1.clone());
            last = now;
            forwarder.probe_for_loops().await;
        }
    }
}

/// Upstreams: the configured ones, else the system resolv.conf's, minus this server
/// itself (never forward to ourselves).
pub fn upstreams(
    configured: &[SocketAddr],
    listen: &[SocketAddr],
    local: &[IpAddr],
) -> Vec<SocketAddr> {
    let candidates = if configured.is_empty() {
        forward::resolv_conf_nameservers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        )
    } else {
        configured.to_vec()
    };
    candidates
        .into_iter()
        .filter(|u| {
            let ours = listen.iter().any(|listen| {
                u.port() == listen.port()
                    && (u.ip() == listen.ip()
                        || (listen.ip().is_unspecified()
                            && (local.contains(&u.ip()) || u.ip().is_loopback())))
            });
            if ours {
                warn!(upstream = %u, "not forwarding to this DNS server itself");
            }
            !ours
        })
        .collect()
}

/// Parses `ip[:port]` (port 53 by default), as `--dns-upstream` takes it.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = SocketAddr::from_str(s) {
        return Ok(addr);
    }
    IpAddr::from_str(s.trim_start_matches('[').trim_end_matches(']'))
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?} is not IP[:PORT]"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zone_poisoned_by_a_panic_is_rebuilt_from_the_model() {
        let mut state = crate::model::store::test_state(&[
            "kind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        ]);
        state.track_dns();
        let dns = ClusterDns::new(&ClusterDomain::default());
        let web = ServiceName::new("ns", "web");
        dns.update(&state, [&web]);
        dns.set_synced();
        let name = "web.ns.svc.cluster.local.";
        assert!(matches!(dns.lookup(name, QType::A), Outcome::Answer { .. }));

        // A writer panics half way through an update, holding the lock.
        let zone = dns.zone.clone();
        let half_done = web.clone();
        let _ = std::thread::spawn(move || {
            let mut guard = zone.write().unwrap();
            guard.update(&half_done, None);
            panic!("simulated bug during a zone update");
        })
        .join();
        assert!(dns.zone.is_poisoned());

        // Readers are still answered from the zone as it was left (not SERVFAIL for
        // good), and the next update rebuilds every service, not only those it names.
        assert!(matches!(dns.lookup(name, QType::A), Outcome::NxDomain));
        dns.update(&state, std::iter::empty::<&ServiceName>());
        assert!(!dns.zone.is_poisoned());
        assert!(matches!(dns.lookup(name, QType::A), Outcome::Answer { .. }));
    }

    #[test]
    fn never_forwards_to_itself() {
        let listen: SocketAddr = "0.0.0.0:53".parse().unwrap();
        let local = ["10.0.0.1".parse().unwrap()];
        let configured: Vec<SocketAddr> = [
            "10.0.0.1:53",
            "127.0.0.1:53",
            "10.0.0.1:5353",
            "192.0.2.1:53",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let kept = upstreams(&configured, &[listen], &local);
        assert_eq!(
            kept,
            [
                "10.0.0.1:5353".parse::<SocketAddr>().unwrap(),
                "192.0.2.1:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn upstream_syntax() {
        assert_eq!(
            parse_upstream("10.0.0.1"),
            Ok("10.0.0.1:53".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("10.0.0.1:5353"),
            Ok("10.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(
            parse_upstream("fd00::1"),
            Ok("[fd00::1]:53".parse().unwrap())
        );
        assert!(parse_upstream("nope").is_err());
    }
}
