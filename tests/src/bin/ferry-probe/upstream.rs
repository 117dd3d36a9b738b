//! A tiny upstream DNS server for the forwarding tests: answers the configured names
//! with A records, everything else with NXDOMAIN (with an SOA, so negative answers
//! are cacheable), and logs every question it gets, so a test can count how many
//! queries reached it.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Serves until killed.
pub fn serve(
    listen: SocketAddr,
    answers: &[(String, Ipv4Addr)],
    ttl: u32,
    delay: Duration,
    log: Option<&str>,
) -> std::io::Result<()> {
    let socket = UdpSocket::bind(listen)?;
    let answers: HashMap<String, Ipv4Addr> = answers
        .iter()
        .map(|(n, ip)| {
            (
                format!("{}.", n.trim_end_matches('.').to_ascii_lowercase()),
                *ip,
            )
        })
        .collect();
    let mut log = match log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
        None => None,
    };
    println!("ready");
    let _ = std::io::stdout().flush();
    let mut buf = [0u8; 4096];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(q) = query.queries.first().cloned() else {
            continue;
        };
        let name = q.name().to_lowercase().to_string();
        if let Some(log) = log.as_mut() {
            let _ = writeln!(log, "{name} {}", q.query_type());
        }
        let socket = socket.try_clone()?;
        let found = answers.get(&name).copied();
        // Answer from a thread, so a delay does not hold up other questions.
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
            reply.metadata.message_type = MessageType::Response;
            reply.metadata.recursion_desired = query.metadata.recursion_desired;
            reply.metadata.recursion_available = true;
            reply.add_query(q.clone());
            match found {
                Some(ip) if q.query_type() == RecordType::A => {
                    reply.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(ip))));
                }
                Some(_) => {}
                None => {
                    reply.metadata.response_code = ResponseCode::NXDomain;
                    let zone = Name::from_ascii("test.").unwrap_or_else(|_| Name::root());
                    let soa = SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, 30);
                    reply.add_authority(Record::from_rdata(zone, 30, RData::SOA(soa)));
                }
            }
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, from);
            }
        });
    }
}
