//! Forwarding of names outside the cluster zone to upstream resolvers, with the
//! NodeLocal DNSCache role: a cache that honours record TTLs and negative TTLs (RFC
//! 2308), and coalescing of identical concurrent questions into one upstream query.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{RData, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::debug;

/// Upstream failure (answered as SERVFAIL).
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("no upstream resolver answered: {0}")]
    Unanswered(String),
}

/// Cache identity of a question.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    name: String,
    qtype: u16,
    qclass: u16,
}

impl Key {
    fn of(query: &Query) -> Self {
        Self {
            name: query.name().to_lowercase().to_string(),
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
}

impl Cached {
    fn from_message(msg: Message) -> Self {
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
            0
        };
        Self {
            rcode,
            answers: msg.answers,
            authorities: msg.authorities,
            additionals: msg
                .additionals
                .into_iter()
                .filter(|r| !matches!(r.data, RData::OPT(_)))
                .collect(),
            stored: Instant::now(),
            ttl: ttl.min(86_400),
        }
    }

    /// When this answer stops being servable.
    pub fn expires(&self) -> Instant {
        self.stored + Duration::from_secs(u64::from(self.ttl))
    }

    /// Seconds this answer has left; zero once expired.
    fn remaining(&self) -> u32 {
        self.ttl
            .saturating_sub(self.stored.elapsed().as_secs().min(u64::from(u32::MAX)) as u32)
    }

    /// The three sections with TTLs reduced by the time spent in cache.
    pub fn sections(&self) -> (Vec<Record>, Vec<Record>, Vec<Record>) {
        let age = self.stored.elapsed().as_secs().min(u64::from(u32::MAX)) as u32;
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

/// The forwarder.
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    max_entries: usize,
    cache: Mutex<HashMap<Key, Arc<Cached>>>,
    inflight: Mutex<HashMap<Key, Waiters>>,
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, max_entries: usize) -> Self {
        Self {
            upstreams,
            timeout: Duration::from_secs(2),
            max_entries,
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The cached answer to `query`, if it is still fresh.
    pub fn cached(&self, query: &Query) -> Option<Arc<Cached>> {
        self.cache_get(&Key::of(query))
    }

    /// The answer to `query`: from cache, from a query already under way, or from
    /// upstream.
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
            let bound = self.timeout * (self.upstreams.len() as u32 + 1);
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
        let result = self
            .exchange(query)
            .await
            .map(|m| Arc::new(Cached::from_message(m)));
        if let Ok(answer) = &result
            && answer.ttl > 0
        {
            self.cache_put(key, answer.clone());
        }
        for waiter in leader.finish() {
            let _ = waiter.send(result.clone());
        }
        result
    }

    fn cache_get(&self, key: &Key) -> Option<Arc<Cached>> {
        let cache = self.cache.lock().ok()?;
        cache.get(key).filter(|c| c.remaining() > 0).cloned()
    }

    fn cache_put(&self, key: Key, answer: Arc<Cached>) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        if cache.len() >= self.max_entries {
            cache.retain(|_, c| c.remaining() > 0);
            if cache.len() >= self.max_entries {
                // Still full of live entries: drop a tenth of them.
                let drop: Vec<Key> = cache
                    .keys()
                    .take(self.max_entries / 10 + 1)
                    .cloned()
                    .collect();
                for k in drop {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(key, answer);
    }

    /// Asks the upstreams in turn, over UDP, and over TCP when the answer is
    /// truncated.
    async fn exchange(&self, query: &Query) -> Result<Message, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
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
        let mut errors = Vec::new();
        for upstream in &self.upstreams {
            let answer = match tokio::time::timeout(
                self.timeout,
                udp_exchange(*upstream, &bytes, id, query),
            )
            .await
            {
                Ok(Ok(answer)) if answer.metadata.truncation => {
                    tokio::time::timeout(self.timeout, tcp_exchange(*upstream, &bytes, id, query))
                        .await
                        .map_err(|_| "timeout over TCP".to_string())
                        .and_then(|r| r)
                }
                Ok(result) => result,
                Err(_) => Err("timeout".to_string()),
            };
            match answer {
                Ok(answer) => return Ok(answer),
                Err(e) => {
                    debug!(%upstream, error = e, "upstream failed");
                    errors.push(format!("{upstream}: {e}"));
                }
            }
        }
        Err(ForwardError::Unanswered(errors.join("; ")))
    }
}

/// Whether `answer` answers our question.
fn matches(answer: &Message, id: u16, query: &Query) -> bool {
    answer.metadata.id == id
        && answer.metadata.message_type == MessageType::Response
        && answer.queries.first().is_some_and(|q| {
            q.name().to_lowercase() == query.name().to_lowercase()
                && q.query_type() == query.query_type()
        })
}

async fn udp_exchange(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, String> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    // A fresh socket (random source port) per query, against spoofed answers.
    let socket = tokio::net::UdpSocket::bind(bind)
        .await
        .map_err(|e| e.to_string())?;
    socket.connect(upstream).await.map_err(|e| e.to_string())?;
    socket.send(bytes).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        if let Ok(answer) = Message::from_vec(&buf[..n])
            && matches(&answer, id, query)
        {
            return Ok(answer);
        }
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
) -> Result<Message, String> {
    let mut stream = tokio::net::TcpStream::connect(upstream)
        .await
        .map_err(|e| e.to_string())?;
    let len = u16::try_from(bytes.len()).map_err(|_| "query too long".to_string())?;
    stream
        .write_all(&len.to_be_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    stream
        .read_exact(&mut len)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    let answer = Message::from_vec(&buf).map_err(|e| e.to_string())?;
    if matches(&answer, id, query) {
        Ok(answer)
    } else {
        Err("mismatched answer".into())
    }
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
        let f = Forwarder::new(vec![silent.local_addr().unwrap()], 10);
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
