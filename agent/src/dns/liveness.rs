//! Whether this node's DNS server answers, checked as a client would: a query for the
//! zone's SOA to a listen address, every [`PERIOD`]. Each good answer renews a lease
//! ([`VALID_FOR`]) that the eBPF programs check before sending the kube-dns ClusterIP
//! to the local listener, so a server that is killed, stuck or not yet synced loses
//! that traffic to the Service's endpoints within a second, with nobody acting.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_server::proto::rr::{Name, RecordType};
use tracing::{info, warn};

/// How often the server is asked.
pub const PERIOD: Duration = Duration::from_millis(200);
/// How long one good answer counts.
pub const VALID_FOR: Duration = Duration::from_millis(900);
/// How long one probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// Probes `target` for `apex` forever, calling `renew` after each good answer.
pub fn spawn(
    runtime: &tokio::runtime::Handle,
    target: SocketAddr,
    apex: Name,
    renew: impl Fn() + Send + 'static,
) {
    runtime.spawn(async move {
        let mut alive = false;
        let mut ticks = tokio::time::interval(PERIOD);
        loop {
            ticks.tick().await;
            let ok = probe(target, &apex).await;
            if ok {
                renew();
            }
            if ok != alive {
                alive = ok;
                if ok {
                    info!(%target, "DNS server answers; the kube-dns ClusterIP is served on this node");
                } else {
                    warn!(%target, "DNS server does not answer; the kube-dns ClusterIP goes to its endpoints");
                }
            }
        }
    });
}

/// One SOA query; `true` for an authoritative NOERROR answer with the same id.
async fn probe(target: SocketAddr, apex: &Name) -> bool {
    let local = match target.ip() {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(local).await else {
        return false;
    };
    let id: u16 = rand::random();
    let mut query = Message::query();
    query.metadata.id = id;
    query.metadata.op_code = OpCode::Query;
    query.add_query(Query::query(apex.clone(), RecordType::SOA));
    let Ok(bytes) = query.to_vec() else {
        return false;
    };
    if socket.send_to(&bytes, target).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 1500];
    let Ok(Ok((n, _))) = tokio::time::timeout(PROBE_TIMEOUT, socket.recv_from(&mut buf)).await
    else {
        return false;
    };
    Message::from_vec(&buf[..n]).is_ok_and(|m| {
        m.metadata.id == id
            && m.metadata.message_type == MessageType::Response
            && m.metadata.response_code == ResponseCode::NoError
            && m.metadata.authoritative
    })
}
