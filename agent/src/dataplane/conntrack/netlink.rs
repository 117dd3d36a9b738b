//! A small ctnetlink client over rust-netlink's crates: dumps the UDP entries of the
//! conntrack table and deletes entries by their original tuple, as `conntrack -L`
//! and `conntrack -D` do, without a process per entry.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol as CtProtocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::dataplane::netlink_request::RequestSocket;
use crate::model::IpFamily;

/// One UDP conntrack entry: its original direction and where replies come from
/// (the backend, when the flow was DNATed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpFlow {
    pub orig_src: IpAddr,
    pub orig_sport: u16,
    pub orig_dst: IpAddr,
    pub orig_dport: u16,
    pub reply_src: IpAddr,
    pub reply_sport: u16,
}

impl UdpFlow {
    /// Whether the flow was DNATed (its replies come from elsewhere).
    pub fn dnat(&self) -> bool {
        self.reply_src != self.orig_dst || self.reply_sport != self.orig_dport
    }
}

/// A connected NETLINK_NETFILTER socket.
pub struct Ctnetlink {
    socket: RequestSocket,
}

impl Ctnetlink {
    /// Opens and connects the socket (needs CAP_NET_ADMIN and nf_conntrack_netlink).
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            socket: RequestSocket::open(NETLINK_NETFILTER)?,
        })
    }

    /// Every UDP entry of one family.
    pub fn udp_flows(&mut self, family: IpFamily) -> io::Result<Vec<UdpFlow>> {
        let request = ConntrackMessage::Get(Vec::new());
        self.send(family, request, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut flows = Vec::new();
        self.socket.receive(|message: NetfilterMessage| {
            if let NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)) =
                &message.inner
                && let Some(flow) = udp_flow(attributes)
            {
                flows.push(flow);
            }
        })?;
        Ok(flows)
    }

    /// Deletes the entry with this original tuple; one already gone is no error.
    pub fn delete(&mut self, flow: &UdpFlow) -> io::Result<()> {
        let tuple = vec![
            Tuple::Ip(vec![
                IPTuple::SourceAddress(flow.orig_src),
                IPTuple::DestinationAddress(flow.orig_dst),
            ]),
            Tuple::Proto(vec![
                ProtoTuple::Protocol(CtProtocol::Udp),
                ProtoTuple::SourcePort(flow.orig_sport),
                ProtoTuple::DestinationPort(flow.orig_dport),
            ]),
        ];
        let request = ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(tuple)]);
        self.send(
            IpFamily::of(&flow.orig_dst),
            request,
            NLM_F_REQUEST | NLM_F_ACK,
        )?;
        match self.socket.receive(|_: NetfilterMessage| {}) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    fn send(&mut self, family: IpFamily, request: ConntrackMessage, flags: u16) -> io::Result<()> {
        let family = match family {
            IpFamily::V4 => NetfilterProtoFamily::IPv4,
            IpFamily::V6 => NetfilterProtoFamily::IPv6,
        };
        let inner = NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), request);
        self.socket.send(flags, inner)
    }
}

/// The flow an entry describes, when it is a UDP entry with both tuples.
fn udp_flow(attributes: &[ConntrackAttribute]) -> Option<UdpFlow> {
    let mut orig = None;
    let mut reply = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => orig = Some(endpoints(t)?),
            ConntrackAttribute::CtaTupleReply(t) => reply = Some(endpoints(t)?),
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    (orig.protocol == CtProtocol::Udp).then_some(UdpFlow {
        orig_src: orig.src,
        orig_sport: orig.sport,
        orig_dst: orig.dst,
        orig_dport: orig.dport,
        reply_src: reply.src,
        reply_sport: reply.sport,
    })
}

/// One direction of an entry.
struct Direction {
    protocol: CtProtocol,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
}

fn endpoints(tuples: &[Tuple]) -> Option<Direction> {
    let (mut src, mut dst, mut sport, mut dport, mut protocol) = (None, None, None, None, None);
    for tuple in tuples {
        match tuple {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(parts) => {
                for part in parts {
                    match part {
                        ProtoTuple::Protocol(p) => protocol = Some(*p),
                        ProtoTuple::SourcePort(p) => sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(Direction {
        protocol: protocol?,
        src: src?,
        dst: dst?,
        sport: sport.unwrap_or(0),
        dport: dport.unwrap_or(0),
    })
}
