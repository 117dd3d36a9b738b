//! Responses per client, bounded (`--dns-rate-limit`): one pod flooding the server,
//! or a spoofed source used for reflection, gets at most N answers a second (with a
//! burst of N); the rest are dropped unanswered. Token buckets per client address,
//! in shards, and a bounded number of clients tracked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 16;
/// Clients tracked per shard; a full shard forgets everyone (they start full again).
const CLIENTS_PER_SHARD: usize = 4096;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The limiter; `None` from [`RateLimit::new`] when off.
pub struct RateLimit {
    per_second: f64,
    shards: Vec<Mutex<HashMap<IpAddr, Bucket>>>,
}

impl RateLimit {
    /// `per_second` answers per client (0: no limit).
    pub fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second: f64::from(per_second),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        })
    }

    /// Whether `client` may have one more answer now.
    pub fn allow(&self, client: IpAddr) -> bool {
        let shard = match client {
            IpAddr::V4(v4) => usize::from(v4.octets()[3]),
            IpAddr::V6(v6) => usize::from(v6.octets()[15]),
        } % SHARDS;
        let Ok(mut clients) = self.shards[shard].lock() else {
            return true;
        };
        if clients.len() >= CLIENTS_PER_SHARD && !clients.contains_key(&client) {
            clients.clear();
        }
        let now = Instant::now();
        let burst = self.per_second;
        let bucket = clients.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_unaffected() {
        let limit = RateLimit::new(3).unwrap();
        let a: IpAddr = "10.244.0.5".parse().unwrap();
        let b: IpAddr = "10.244.0.6".parse().unwrap();
        let allowed = (0..10).filter(|_| limit.allow(a)).count();
        assert_eq!(allowed, 3, "the burst, then nothing until tokens come back");
        assert!(limit.allow(b));
        assert!(RateLimit::new(0).is_none());
    }
}
