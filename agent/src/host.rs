//! Probing the host: what the network namespace the agent runs in holds right now.
//! The only place the agent reads interface addresses and routes; the proxy loop gets
//! the results as events ([`watch_addresses`]) and never probes during a sync.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use tracing::debug;

use crate::model::{HostAddresses, LocalAddress};
use crate::source::SourceEvent;
use crate::source::queue::EventSender;

/// Every address configured in this network namespace.
pub fn local_addresses() -> Vec<LocalAddress> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<LocalAddress> = addrs
        .filter_map(|ifa| {
            let addr = ifa.address?;
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(addr.as_sockaddr_in6()?.ip())
            };
            Some(LocalAddress {
                interface: ifa.interface_name,
                ip,
            })
        })
        .collect();
    out.sort();
    out
}

/// Interfaces that carry a default route (IPv4 or IPv6), read from procfs, which
/// shows the reading process's own network namespace.
pub fn default_route_interfaces() -> BTreeSet<String> {
    let v4 = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    default_v4_interfaces(&v4)
        .chain(default_v6_interfaces(&v6))
        .map(str::to_owned)
        .collect()
}

/// `/proc/net/route`: `Iface Destination Gateway Flags RefCnt Use Metric Mask ...`;
/// a default route has destination and mask 00000000.
fn default_v4_interfaces(table: &str) -> impl Iterator<Item = &str> {
    table.lines().skip(1).filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000")
            .then_some(fields[0])
    })
}

/// `/proc/net/ipv6_route`: `dest dest_len src src_len next_hop metric refcnt use flags
/// iface`; a default route has an all-zero destination of length 0.
fn default_v6_interfaces(table: &str) -> impl Iterator<Item = &str> {
    table.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.len() == 10
            && fields[0].bytes().all(|b| b == b'0')
            && fields[1] == "00"
            && fields[9] != "lo")
            .then_some(fields[9])
    })
}

/// Sends one rtnetlink request (with `NLM_F_REQUEST | NLM_F_ACK` and `extra_flags`,
/// e.g. `NLM_F_CREATE`) and waits for the kernel's acknowledgement: the agent's only
/// way of changing links and addresses.
pub fn rtnetlink_request(
    request: netlink_packet_route::RouteNetlinkMessage,
    extra_flags: u16,
) -> std::io::Result<()> {
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = NetlinkMessage::from(request);
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | extra_flags;
    message.header.sequence_number = 1;
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    let mut answer = Vec::with_capacity(8192);
    socket.recv(&mut answer, 0)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(std::io::Error::from_raw_os_error(-code.get())),
        },
        _ => Ok(()),
    }
}

/// Where to reach a server bound to `addr` from this host: loopback for the
/// unspecified address.
pub fn loopback_if_unspecified(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        }
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
            std::net::SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// The host's addresses and default-route interfaces, now.
pub fn probe_addresses() -> HostAddresses {
    HostAddresses {
        addresses: local_addresses(),
        default_route_interfaces: default_route_interfaces(),
    }
}

/// Watches the host on a thread of its own and sends [`SourceEvent::HostAddresses`]
/// whenever a probe differs from `initial`, so NodePorts follow address changes
/// without the proxy loop probing during syncs. It probes at once when the kernel
/// announces an address, link or route change (rtnetlink multicast groups), and
/// every `period` anyway in case an announcement was lost (a full socket buffer).
/// The thread ends when the loop hangs up.
pub fn watch_addresses(initial: HostAddresses, period: Duration, events: EventSender) {
    let spawned = std::thread::Builder::new()
        .name("ferry-host".into())
        .spawn(move || {
            let mut changes = RouteChanges::open(period)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot watch rtnetlink; host addresses are probed every {period:?} instead"))
                .ok();
            let mut last = initial;
            loop {
                match &mut changes {
                    Some(c) => c.wait(),
                    None => std::thread::sleep(period),
                }
                let now = probe_addresses();
                if now != last {
                    debug!(addresses = now.addresses.len(), "host addresses changed");
                    last = now.clone();
                    if events.send(SourceEvent::HostAddresses(now)).is_err() {
                        return;
                    }
                }
            }
        });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "cannot start the host address watcher; NodePort addresses stay as probed at start");
    }
}

/// A NETLINK_ROUTE socket subscribed to link, address and route changes.
struct RouteChanges {
    socket: netlink_sys::Socket,
    buffer: Vec<u8>,
}

impl RouteChanges {
    fn open(period: Duration) -> std::io::Result<Self> {
        use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
        let groups = libc::RTMGRP_LINK
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV6_ROUTE;
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, groups as u32))?;
        let timeout =
            nix::sys::time::TimeVal::new(period.as_secs() as i64, period.subsec_micros() as i64);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &timeout)
            .map_err(std::io::Error::from)?;
        Ok(Self {
            socket,
            buffer: Vec::with_capacity(64 * 1024),
        })
    }

    /// Returns after an announcement (the rest of a burst is drained) or the period.
    fn wait(&mut self) {
        self.buffer.clear();
        if self.socket.recv(&mut self.buffer, 0).is_ok() {
            loop {
                self.buffer.clear();
                if self
                    .socket
                    .recv(&mut self.buffer, libc::MSG_DONTWAIT)
                    .is_err()
                {
                    break;
                }
            }
        }
    }
}

/// Protocols this kernel cannot carry (no SCTP module), found by opening a socket of
/// each, which also loads a module the kernel has but had not loaded yet.
pub fn unsupported_protocols() -> Vec<crate::model::Protocol> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    let sctp = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Sctp,
    );
    match sctp {
        Ok(_) => Vec::new(),
        Err(e) => {
            debug!(error = %e, "no SCTP in this kernel");
            vec![crate::model::Protocol::Sctp]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_from_procfs_tables() {
        let v4 = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth1\t0000F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_v4_interfaces(v4).collect::<Vec<_>>(), ["eth0"]);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000001 00000000 00000003 eth2\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                  fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth2\n";
        assert_eq!(default_v6_interfaces(v6).collect::<Vec<_>>(), ["eth2"]);
    }
}
