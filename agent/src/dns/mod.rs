//! Cluster DNS: `*.svc.<cluster-domain>` answered from the same model that drives the
//! data plane (so DNS and load balancing never disagree), everything else forwarded
//! upstream through a cache. Takes over CoreDNS's and NodeLocal DNSCache's roles.
//!
//! Transport, parsing, EDNS and truncation come from hickory-server; answers come from
//! [`zone::Zone`] and [`forward::Forwarder`].

pub mod forward;
pub mod records;
pub mod zone;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr as _;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use ipnetwork::IpNetwork;
use tracing::{info, warn};

use self::forward::Forwarder;
use self::zone::{Outcome, QType, Rec, Zone};
use crate::model::{ClusterState, ServiceName};

/// Largest UDP answer Ferry sends, whatever the client offers (the DNS flag day 2020
/// value: avoids IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

/// Settings of the DNS server.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    pub domain: String,
    pub ttl: u32,
    pub upstreams: Vec<SocketAddr>,
    /// Sources that may use the forwarder (the cluster zone answers everyone).
    pub forward_allowed: Vec<IpNetwork>,
    pub cache_size: usize,
}

/// The cluster zone, shared by the proxy loop (writer) and the DNS server (readers).
#[derive(Clone)]
pub struct ClusterDns {
    zone: Arc<RwLock<Zone>>,
    domain: String,
}

impl ClusterDns {
    pub fn new(domain: &str) -> Self {
        Self {
            zone: Arc::new(RwLock::new(Zone::new(domain))),
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
        }
    }

    /// Re-reads the given services from the model.
    pub fn update<'a>(
        &self,
        state: &ClusterState,
        services: impl IntoIterator<Item = &'a ServiceName>,
    ) {
        let Ok(mut zone) = self.zone.write() else {
            return;
        };
        for name in services {
            let records = state.service(name).map(|svc| {
                let slices: Vec<&crate::model::SliceInfo> =
                    state.slices_of(name).map(|s| s.as_ref()).collect();
                records::service_records(svc, &slices, &self.domain)
            });
            zone.update(name, records);
        }
    }

    /// The model is complete: start answering authoritatively.
    pub fn set_synced(&self) {
        if let Ok(mut zone) = self.zone.write() {
            zone.set_synced();
            info!(names = zone.len(), "cluster DNS zone ready");
        }
    }

    fn lookup(&self, qname: &str, qtype: QType) -> Outcome {
        match self.zone.read() {
            Ok(zone) => zone.lookup(qname, qtype),
            Err(_) => Outcome::NotSynced,
        }
    }
}

/// Answers DNS requests.
pub struct DnsHandler {
    cluster: ClusterDns,
    forwarder: Forwarder,
    forward_allowed: Vec<IpNetwork>,
    ttl: u32,
    soa: Record,
}

impl DnsHandler {
    pub fn new(cluster: ClusterDns, config: &DnsConfig) -> Self {
        let apex = Name::from_ascii(format!("{}.", config.domain.trim_end_matches('.')))
            .unwrap_or_else(|_| Name::root());
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
            forwarder: Forwarder::new(config.upstreams.clone(), config.cache_size),
            forward_allowed: config.forward_allowed.clone(),
            ttl: config.ttl,
            soa,
        }
    }

    fn may_forward(&self, src: IpAddr) -> bool {
        self.forward_allowed.iter().any(|n| n.contains(src))
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

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let mut edns_out = Edns::new();
        let edns = request.edns.as_ref().map(|e| {
            edns_out.set_max_payload(e.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            &edns_out
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = edns {
            builder.edns(edns);
        }
        let fail = |code: ResponseCode| {
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = code;
            metadata
        };
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            let r = builder.build_no_records(fail(ResponseCode::NotImp));
            return send(&mut response, r, request).await;
        }
        let Ok(info) = request.request_info() else {
            let r = builder.build_no_records(fail(ResponseCode::FormErr));
            return send(&mut response, r, request).await;
        };
        let query = info.query.original();
        let mut qname = info.query.name().to_string();
        if !qname.ends_with('.') {
            qname.push('.');
        }
        let outcome = if info.query.query_class() == DNSClass::IN {
            self.cluster
                .lookup(&qname, qtype_of(info.query.query_type()))
        } else {
            Outcome::Elsewhere
        };
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.recursion_available = true;
        match outcome {
            Outcome::Answer {
                answers,
                additionals,
            } => {
                metadata.authoritative = true;
                let answers: Vec<Record> = answers
                    .iter()
                    .filter_map(|r| self.record(r, query.name()))
                    .collect();
                let additionals: Vec<Record> = additionals
                    .iter()
                    .filter_map(|r| self.record(r, query.name()))
                    .collect();
                let r = builder.build(
                    metadata,
                    answers.iter(),
                    None::<&Record>,
                    None::<&Record>,
                    additionals.iter(),
                );
                send(&mut response, r, request).await
            }
            Outcome::NoData | Outcome::NxDomain => {
                metadata.authoritative = true;
                if outcome == Outcome::NxDomain {
                    metadata.response_code = ResponseCode::NXDomain;
                }
                let soa = [self.soa.clone()];
                let r = builder.build(
                    metadata,
                    None::<&Record>,
                    None::<&Record>,
                    soa.iter(),
                    None::<&Record>,
                );
                send(&mut response, r, request).await
            }
            Outcome::NotSynced => {
                let r = builder.build_no_records(fail(ResponseCode::ServFail));
                send(&mut response, r, request).await
            }
            Outcome::Elsewhere => {
                if !self.may_forward(request.src().ip()) {
                    let r = builder.build_no_records(fail(ResponseCode::Refused));
                    return send(&mut response, r, request).await;
                }
                match self.forwarder.resolve(query).await {
                    Ok(cached) => {
                        metadata.response_code = cached.rcode;
                        let (answers, authorities, additionals) = cached.sections();
                        let r = builder.build(
                            metadata,
                            answers.iter(),
                            authorities.iter(),
                            None::<&Record>,
                            additionals.iter(),
                        );
                        send(&mut response, r, request).await
                    }
                    Err(e) => {
                        warn!(name = %qname, error = %e, "forwarding failed");
                        let r = builder.build_no_records(fail(ResponseCode::ServFail));
                        send(&mut response, r, request).await
                    }
                }
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, src = %request.src(), "cannot send DNS response");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(hickory_server::proto::op::Header {
                metadata,
                counts: Default::default(),
            })
        }
    }
}

/// Sockets the DNS server answers on, bound before anything else starts so a busy
/// or missing address fails the agent at once.
pub struct DnsSockets {
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
}

/// Binds UDP and TCP on `listen`.
pub async fn bind(listen: SocketAddr) -> std::io::Result<DnsSockets> {
    Ok(DnsSockets {
        udp: tokio::net::UdpSocket::bind(listen).await?,
        tcp: tokio::net::TcpListener::bind(listen).await?,
    })
}

/// Serves DNS on the bound sockets until the process ends.
pub async fn serve(
    config: DnsConfig,
    sockets: DnsSockets,
    cluster: ClusterDns,
) -> std::io::Result<()> {
    info!(listen = %config.listen, domain = config.domain, upstreams = ?config.upstreams, "serving DNS");
    let mut server = hickory_server::Server::new(DnsHandler::new(cluster, &config));
    server.register_socket(sockets.udp);
    server.register_listener(sockets.tcp, Duration::from_secs(10), 64);
    server
        .block_until_done()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// Upstreams: the configured ones, else the system resolv.conf's, minus this server
/// itself (never forward to ourselves).
pub fn upstreams(
    configured: &[SocketAddr],
    listen: SocketAddr,
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
            let ours = u.port() == listen.port()
                && (u.ip() == listen.ip()
                    || (listen.ip().is_unspecified()
                        && (local.contains(&u.ip()) || u.ip().is_loopback())));
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
        let kept = upstreams(&configured, listen, &local);
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
