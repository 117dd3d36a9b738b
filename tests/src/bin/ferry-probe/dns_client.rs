//! A DNS client that counts: asks one name again and again (a fresh socket and id
//! per question, as resolvers do) until a stop file appears, and reports how many
//! questions got the expected address, another answer, an error code or nothing.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::Serialize;

/// The tally.
#[derive(Debug, Default, Serialize)]
pub struct Tally {
    pub asked: u32,
    /// Answered with the expected address.
    pub expected: u32,
    /// Answered NOERROR with other addresses (e.g. another server's).
    pub other: u32,
    /// Answered with an error code (SERVFAIL...).
    pub errors: u32,
    /// No answer within the timeout.
    pub lost: u32,
}

/// Asks `name` (A) at `server` every `interval` until `stop` exists (or `max`
/// questions were asked).
pub fn run(
    server: SocketAddr,
    name: &str,
    expect: std::net::Ipv4Addr,
    interval: Duration,
    timeout: Duration,
    stop: &Path,
    max: u32,
) -> Tally {
    let mut tally = Tally::default();
    let Ok(qname) = Name::from_ascii(name) else {
        return tally;
    };
    while !stop.exists() && tally.asked < max {
        tally.asked += 1;
        match ask(server, &qname, timeout) {
            None => tally.lost += 1,
            Some(reply) if reply.metadata.response_code != ResponseCode::NoError => {
                tally.errors += 1
            }
            Some(reply) => {
                let hit = reply
                    .answers
                    .iter()
                    .any(|r| matches!(r.data, RData::A(a) if a.0 == expect));
                if hit {
                    tally.expected += 1;
                } else {
                    tally.other += 1;
                }
            }
        }
        std::thread::sleep(interval);
    }
    tally
}

fn ask(server: SocketAddr, name: &Name, timeout: Duration) -> Option<Message> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(timeout)).ok()?;
    let id = next_id();
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name.clone(), RecordType::A));
    socket.send_to(&query.to_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        if let Ok(reply) = Message::from_vec(&buf[..n])
            && reply.metadata.id == id
        {
            return Some(reply);
        }
    }
}

/// A query id that differs from the last ones (a counter mixed with the clock).
fn next_id() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u16)
        .unwrap_or(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) ^ clock
}
