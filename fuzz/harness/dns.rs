//! DNS message handling without sockets: a datagram as a UDP worker handles it
//! (agent/src/dns/udp.rs `handle`: the wire-cache fast path, else the general parse,
//! the answer from a small cluster zone, the encoding and the stored answer), and a
//! byte stream as a TCP connection reads it (agent/src/dns/tcp.rs: length-prefixed
//! messages, each parsed, answered and encoded without a size limit).
//!
//! Invariants: every reply decodes as a response to the request; a UDP reply fits the
//! client's buffer; a reused answer is byte for byte the answer it was cut from, and
//! for the same question in other letter case it says what a fresh answer says.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};

use ferry::dns::forward::ForwardConfig;
use ferry::dns::metrics::DnsMetrics;
use ferry::dns::wire_cache::{self, Parsed, Stored, WireCache, encode_answer, parse_request};
use ferry::dns::{Answerer, Client, ClusterDns, DnsConfig, MAX_UDP_PAYLOAD, Records, Reply};
use ferry::model::{ClusterDomain, ClusterState, ServiceName};
use hickory_server::proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_server::proto::rr::{RData, Record};

/// The cluster the answers come from: a dual-stack ClusterIP service with named
/// ports, a headless one with enough endpoints to rotate, ExternalNames inside and
/// outside the zone.
const ZONE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  type: NodePort
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: data
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 5432}]
endpoints:
- {addresses: [10.244.0.5], hostname: db-0, nodeName: node-a}
- {addresses: [10.244.0.6], hostname: db-1, nodeName: node-b}
- {addresses: [10.244.0.7], nodeName: node-b}
- {addresses: [10.244.0.8], conditions: {ready: false}}
- {addresses: [10.244.0.9]}
- {addresses: [10.244.0.10]}
---
apiVersion: v1
kind: Service
metadata: {name: out, namespace: default}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: default}
spec: {type: ExternalName, externalName: web.default.svc.cluster.local}
"#;

/// The answering logic over [`ZONE`], built once (answers do not change it).
fn answerer() -> &'static Answerer {
    static ANSWERER: OnceLock<Answerer> = OnceLock::new();
    ANSWERER.get_or_init(|| {
        let domain = ClusterDomain::default();
        let mut state = ClusterState::new(super::NODE);
        state.track_dns();
        for doc in ferry::source::manifests::parse_manifests("zone.yaml", ZONE) {
            match doc {
                ferry::source::manifests::Document::Object { object, .. } => {
                    super::apply(&mut state, &object).expect("the fuzz zone is valid");
                }
                other => panic!("the fuzz zone is valid: {other:?}"),
            }
        }
        let names: Vec<ServiceName> = state.take_dns_changes();
        let cluster = ClusterDns::new(&domain).with_pod_records(true);
        cluster.update(&state, &names);
        cluster.set_synced();
        let config = DnsConfig {
            listen: Vec::new(),
            service: None,
            handover: None,
            domain,
            ttl: 5,
            forward: ForwardConfig::default(),
            rate_limit: 0,
            query_log: false,
            ready: None,
            pod_records: true,
            kube_dns_config: None,
            forward_allowed: vec!["10.0.0.0/8".parse().expect("a CIDR")],
            forward_allowed_outside: Vec::new(),
            uplinks: Vec::new(),
        };
        Answerer::new(cluster, &config, Arc::new(DnsMetrics::default()))
    })
}

/// The client: a pod (may forward) or an outside address (may not), decided by the
/// input's length so that the same question in other letter case has the same one.
fn client(answerer: &Answerer, input: &[u8]) -> Client {
    let ip = if input.len().is_multiple_of(2) {
        Ipv4Addr::new(10, 0, 0, 1)
    } else {
        Ipv4Addr::new(192, 0, 2, 1)
    };
    answerer.client(IpAddr::V4(ip), None)
}

/// The UDP fast path and general path on one datagram: handled twice (the second
/// time from the answer the first one stored, when it was stored), then the same
/// question in other letter case (the same stored answer must fit it).
pub fn udp(packet: &[u8]) {
    let answerer = answerer();
    let client = client(answerer, packet);
    let cache = WireCache::new(64);
    let first = handle(answerer, &cache, &client, packet);
    let second = handle(answerer, &cache, &client, packet);
    if let (Some(first), Some(second)) = (&first, &second)
        && second.from_cache
    {
        assert_eq!(
            first.bytes, second.bytes,
            "a reused answer is the answer it was cut from"
        );
    }
    let Some(q) = wire_cache::question(packet) else {
        return;
    };
    let name_end = 12 + q.raw.len() - 4;
    let mut other = packet.to_vec();
    let mut changed = false;
    for b in &mut other[12..name_end] {
        if b.is_ascii_alphabetic() {
            *b ^= 0x20;
            changed = true;
        }
    }
    if !changed {
        return;
    }
    let reused = handle(answerer, &cache, &client, &other);
    let fresh = handle(answerer, &WireCache::new(1), &client, &other);
    if let (Some(reused), Some(fresh)) = (reused, fresh)
        && reused.from_cache
    {
        same_answer(&reused.bytes, &fresh.bytes);
    }
}

/// A reply as a worker sends it.
struct Sent {
    bytes: Vec<u8>,
    /// From the wire cache (else freshly encoded).
    from_cache: bool,
}

/// What udp.rs `handle` does with a datagram, returning what it sends (`None`:
/// nothing, or a question forwarded upstream, which is not followed here).
fn handle(answerer: &Answerer, cache: &WireCache, client: &Client, packet: &[u8]) -> Option<Sent> {
    let mut key = Vec::new();
    let fast = wire_cache::question(packet);
    if let Some(q) = &fast {
        assert!(
            packet[12..].starts_with(q.raw) && q.raw.len() >= 5,
            "the question is the packet's"
        );
        let _ = wire_cache::WireName(q.raw).to_string();
        let max = q
            .edns_payload
            .map_or(512, |p| p.clamp(512, MAX_UDP_PAYLOAD));
        wire_cache::key(q, max, &mut key);
        if let Some(stored) = cache.get(&key)
            && stored.usable(answerer.generation(), || answerer.may_forward(client))
        {
            let mut out = Vec::new();
            stored.write(packet, q, &mut out);
            let reply = check_reply(packet, &out);
            assert!(
                reply.queries.len() == 1,
                "a reused answer echoes the question"
            );
            return Some(Sent {
                bytes: out,
                from_cache: true,
            });
        }
    }
    let mut out = Vec::new();
    let (message, edns) = match parse_request(packet, &mut out) {
        Parsed::Query { message, edns } => (message, edns),
        Parsed::Refused => {
            check_reply(packet, &out);
            return Some(Sent {
                bytes: out,
                from_cache: false,
            });
        }
        Parsed::Ignored => return None,
    };
    let query = message.queries.first().cloned()?;
    // A question for upstream is not followed here; the reply checked instead is the
    // REFUSED a worker sends when too many are in flight (never stored).
    let (records, reusable) = match answerer.answer(&query, client) {
        Reply::Now(records) => (records, true),
        Reply::Forward => (Records::error(ResponseCode::Refused), false),
    };
    let max = edns
        .as_ref()
        .map(Edns::max_payload)
        .unwrap_or(512)
        .min(MAX_UDP_PAYLOAD);
    if !encode_answer(
        &message.metadata,
        &query,
        edns.as_ref(),
        &records,
        max,
        &mut out,
    ) {
        return None;
    }
    assert!(
        out.len() <= usize::from(max),
        "{} bytes over UDP to a client taking {max}",
        out.len()
    );
    let reply = check_reply(packet, &out);
    assert_eq!(reply.queries.len(), 1, "an answer echoes the question");
    if let Some(q) = fast.as_ref().filter(|_| reusable) {
        // What `Sent::remember` stores: the tail after the question, cut at the raw
        // question's length, so the encoded question must be the raw one.
        let question_len = q.raw.len();
        assert_eq!(
            out.get(12..12 + question_len),
            Some(q.raw),
            "the answer's question is encoded as it was asked"
        );
        if let Some(mut stored) = Stored::from_answer(&out, question_len, records.cache) {
            let addresses = records
                .answers
                .iter()
                .filter(|r| matches!(r.data, RData::A(_) | RData::AAAA(_)))
                .count();
            let mut turned = Vec::new();
            for turn in 1..addresses.min(wire_cache::MAX_TURNS) {
                let mut other = records.clone();
                ferry::dns::rotate_addresses(&mut other.answers, turn);
                if encode_answer(
                    &message.metadata,
                    &query,
                    edns.as_ref(),
                    &other,
                    max,
                    &mut turned,
                ) {
                    stored.add_turn(&turned, question_len);
                }
            }
            cache.put(key, stored);
        }
    }
    Some(Sent {
        bytes: out,
        from_cache: false,
    })
}

/// Most messages one TCP input is read as (a connection takes any number).
const MAX_TCP_MESSAGES: usize = 64;

/// A TCP connection's byte stream: two-byte length, message, and again, as
/// tcp.rs `connection` reads it, until the stream ends short or a message is
/// dropped (the connection closes).
pub fn tcp(stream: &[u8]) {
    let answerer = answerer();
    // An accepted connection is never spoofed, whatever its interface.
    let client = client(answerer, stream);
    let mut rest = stream;
    let mut out = Vec::new();
    for _ in 0..MAX_TCP_MESSAGES {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            return;
        };
        let Some(packet) = tail.get(..usize::from(u16::from_be_bytes(*len))) else {
            return;
        };
        rest = &tail[packet.len()..];
        match parse_request(packet, &mut out) {
            Parsed::Ignored => return,
            Parsed::Refused => {
                check_reply(packet, &out);
            }
            Parsed::Query { message, edns } => {
                let Some(query) = message.queries.first() else {
                    return;
                };
                let records = match answerer.answer(query, &client) {
                    Reply::Now(records) => records,
                    // Upstream is not asked here: answered as when it fails.
                    Reply::Forward => Records::error(ResponseCode::ServFail),
                };
                if !encode_answer(
                    &message.metadata,
                    query,
                    edns.as_ref(),
                    &records,
                    u16::MAX,
                    &mut out,
                ) {
                    return;
                }
                assert!(
                    u16::try_from(out.len()).is_ok(),
                    "a TCP answer fits its length prefix"
                );
                let reply = check_reply(packet, &out);
                assert!(
                    !reply.metadata.truncation,
                    "a TCP answer is never truncated"
                );
            }
        }
    }
}

/// `reply` decodes as a response to `request` (same id), which it returns.
fn check_reply(request: &[u8], reply: &[u8]) -> Message {
    let message = Message::from_vec(reply)
        .unwrap_or_else(|e| panic!("a reply that does not decode ({e}): {reply:02x?}"));
    assert_eq!(message.metadata.message_type, MessageType::Response);
    assert_eq!(
        message.metadata.id,
        u16::from_be_bytes([request[0], request[1]]),
        "the reply carries the request's id"
    );
    message
}

/// Two encodings of one answer say the same: header, question and the same records
/// in each section (address order may differ: it rotates between answers). Names
/// compare case-insensitively, as DNS names do.
fn same_answer(reused: &[u8], fresh: &[u8]) {
    let (a, b) = (
        Message::from_vec(reused).expect("decodes"),
        Message::from_vec(fresh).expect("decodes"),
    );
    assert_eq!(a.metadata, b.metadata, "the same header");
    assert_eq!(a.queries, b.queries, "the same question");
    let same_records = |x: &[Record], y: &[Record], section: &str| {
        assert_eq!(x.len(), y.len(), "{section}: {x:?} vs {y:?}");
        for r in x {
            assert!(
                y.iter().filter(|o| *o == r).count() == x.iter().filter(|o| *o == r).count(),
                "{section}: {r} only in one answer ({x:?} vs {y:?})"
            );
        }
    };
    same_records(&a.answers, &b.answers, "answers");
    same_records(&a.authorities, &b.authorities, "authorities");
    same_records(&a.additionals, &b.additionals, "additionals");
    assert_eq!(a.edns, b.edns, "the same EDNS");
}
