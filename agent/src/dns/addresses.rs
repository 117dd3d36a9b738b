//! The addresses the DNS server listens on, made present on the host: a
//! `--dns-listen` address such as 169.254.20.10, and in iptables mode the kube-dns
//! ClusterIP itself (NodeLocal DNSCache's way). They go on Ferry's own `ferry-dns`
//! interface (a dummy device) or, on kernels without the dummy driver, on `lo`.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use tracing::{info, warn};

use crate::host::{local_addresses, rtnetlink_request};

/// The interface Ferry keeps its DNS addresses on, where the kernel has `dummy`.
pub const INTERFACE: &str = "ferry-dns";

/// Makes `ip` a local address of this network namespace unless it is one already
/// (or is the unspecified address); returns where it was put.
pub fn ensure(ip: IpAddr) -> std::io::Result<Option<String>> {
    if ip.is_unspecified() || local_addresses().iter().any(|a| a.ip == ip) {
        return Ok(None);
    }
    let (index, interface) = interface()?;
    match rtnetlink_request(
        RouteNetlinkMessage::NewAddress(address_message(ip, index)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => {
            info!(%ip, interface, "added DNS listen address");
            Ok(Some(interface))
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(Some(interface)),
        Err(e) => Err(e),
    }
}

/// `ferry-dns` (created and set up if missing), or `lo` when the kernel cannot make
/// a dummy device.
fn interface() -> std::io::Result<(u32, String)> {
    if let Ok(index) = nix::net::if_::if_nametoindex(INTERFACE) {
        return Ok((index, INTERFACE.to_owned()));
    }
    match create_dummy() {
        Ok(()) => {
            let index = nix::net::if_::if_nametoindex(INTERFACE).map_err(std::io::Error::from)?;
            Ok((index, INTERFACE.to_owned()))
        }
        Err(e) => {
            warn!(error = %e, "cannot create the {INTERFACE} dummy interface; DNS addresses go on lo");
            let index = nix::net::if_::if_nametoindex("lo").map_err(std::io::Error::from)?;
            Ok((index, "lo".to_owned()))
        }
    }
}

fn create_dummy() -> std::io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    link.attributes
        .push(LinkAttribute::IfName(INTERFACE.to_owned()));
    link.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Dummy,
        )]));
    rtnetlink_request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// A host-scope /32 (/128) of `ip` on interface `index`.
fn address_message(ip: IpAddr, index: u32) -> AddressMessage {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.scope = AddressScope::Universe;
    match ip {
        IpAddr::V4(_) => {
            message.header.family = AddressFamily::Inet;
            message.header.prefix_len = 32;
            message.attributes.push(AddressAttribute::Local(ip));
        }
        IpAddr::V6(_) => {
            message.header.family = AddressFamily::Inet6;
            message.header.prefix_len = 128;
            // Usable at once: a tentative address (duplicate detection) cannot be bound.
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    message.attributes.push(AddressAttribute::Address(ip));
    message
}
