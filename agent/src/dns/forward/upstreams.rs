//! The upstream side of the forwarder: which servers a question may go to, in
//! which order (healthy ones first, in random order, as CoreDNS's `forward` does by
//! default; failing ones last, after a backoff; ones caught in a forwarding loop
//! never), and one exchange with one server (UDP, TCP when the answer is truncated).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_server::proto::op::{Message, MessageType, Query};
use rand::seq::SliceRandom as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The longest an upstream that keeps failing is moved to the back of the line.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

/// What the forwarder knows about each upstream address.
#[derive(Debug, Default)]
pub struct UpstreamHealth {
    health: Mutex<HashMap<SocketAddr, Health>>,
    looping: Mutex<HashSet<SocketAddr>>,
}

impl UpstreamHealth {
    /// The order to try `candidates` in: healthy ones shuffled, then those in
    /// backoff (soonest back first); looping ones left out.
    pub fn order(&self, candidates: &[SocketAddr]) -> Vec<SocketAddr> {
        let looping = self.looping.lock().map(|l| l.clone()).unwrap_or_default();
        let now = Instant::now();
        let health = self.health.lock();
        let down_until = |a: &SocketAddr| {
            health
                .as_ref()
                .ok()
                .and_then(|h| h.get(a).and_then(|h| h.down_until))
                .filter(|t| *t > now)
        };
        let mut healthy: Vec<SocketAddr> = Vec::with_capacity(candidates.len());
        let mut down: Vec<(Instant, SocketAddr)> = Vec::new();
        for a in candidates.iter().filter(|a| !looping.contains(a)) {
            match down_until(a) {
                Some(t) => down.push((t, *a)),
                None => healthy.push(*a),
            }
        }
        healthy.shuffle(&mut rand::rng());
        down.sort();
        healthy.extend(down.into_iter().map(|(_, a)| a));
        healthy
    }

    /// `upstream` answered.
    pub fn succeeded(&self, upstream: SocketAddr) {
        if let Ok(mut h) = self.health.lock() {
            h.remove(&upstream);
        }
    }

    /// `upstream` failed: it goes to the back of the line for a while (1 s,
    /// doubling with each failure in a row, at most [`MAX_BACKOFF`]).
    pub fn failed(&self, upstream: SocketAddr) {
        if let Ok(mut h) = self.health.lock() {
            let entry = h.entry(upstream).or_default();
            entry.failures = entry.failures.saturating_add(1);
            let backoff = Duration::from_secs(1 << entry.failures.min(5)).min(MAX_BACKOFF);
            entry.down_until = Some(Instant::now() + backoff);
        }
    }

    /// `upstream` sends our own questions back to us: never use it again.
    pub fn looping(&self, upstream: SocketAddr) {
        if let Ok(mut l) = self.looping.lock() {
            l.insert(upstream);
        }
    }

    /// Whether `upstream` was found looping.
    pub fn is_looping(&self, upstream: SocketAddr) -> bool {
        self.looping.lock().is_ok_and(|l| l.contains(&upstream))
    }
}

/// One exchange with `upstream`: UDP, then TCP if the answer is truncated.
pub async fn exchange_one(
    upstream: SocketAddr,
    bytes: &[u8],
    id: u16,
    query: &Query,
    timeout: Duration,
) -> Result<Message, String> {
    match tokio::time::timeout(timeout, udp_exchange(upstream, bytes, id, query)).await {
        Ok(Ok(answer)) if answer.metadata.truncation => {
            tokio::time::timeout(timeout, tcp_exchange(upstream, bytes, id, query))
                .await
                .map_err(|_| "timeout over TCP".to_string())
                .and_then(|r| r)
        }
        Ok(result) => result,
        Err(_) => Err("timeout".to_string()),
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

pub async fn udp_exchange(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_upstreams_go_last_and_looping_ones_never() {
        let h = UpstreamHealth::default();
        let a: SocketAddr = "10.0.0.1:53".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:53".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:53".parse().unwrap();
        h.failed(a);
        for _ in 0..20 {
            let order = h.order(&[a, b, c]);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], a, "{order:?}");
        }
        h.succeeded(a);
        let firsts: HashSet<SocketAddr> = (0..100).map(|_| h.order(&[a, b, c])[0]).collect();
        assert_eq!(firsts.len(), 3, "healthy ones in random order");
        h.looping(b);
        assert!(!h.order(&[a, b, c]).contains(&b));
    }
}
