//! This node's own network facts, read from the network namespace the agent runs in:
//! its addresses, and which of them NodePorts answer on.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::dataplane::NodeNetwork;
use crate::model::store::NodeInfo;

/// An address of a local interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalAddress {
    pub interface: String,
    pub ip: IpAddr,
}

/// Every address configured in this network namespace.
pub fn local_addresses() -> Vec<LocalAddress> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ifa in addrs {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        out.push(LocalAddress {
            interface: ifa.interface_name,
            ip,
        });
    }
    out
}

/// Interfaces that carry a default route (IPv4 or IPv6), read from procfs, which
/// shows the reading process's own network namespace.
fn default_route_interfaces() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(routes) = std::fs::read_to_string("/proc/net/route") {
        // Iface Destination Gateway ...; default route has destination 00000000.
        for line in routes.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
                out.insert(fields[0].to_owned());
            }
        }
    }
    if let Ok(routes) = std::fs::read_to_string("/proc/net/ipv6_route") {
        // dest dest_len src src_len next_hop metric refcnt use flags iface
        for line in routes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() == 10
                && fields[0].bytes().all(|b| b == b'0')
                && fields[1] == "00"
                && fields[9] != "lo"
            {
                out.insert(fields[9].to_owned());
            }
        }
    }
    out
}

fn is_usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// Which addresses NodePorts answer on (`--nodeport-addresses`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// kube-proxy's "primary": the Node object's addresses when known, else the
    /// addresses of the interfaces holding default routes, else every non-loopback
    /// address.
    Primary,
    /// Local addresses inside these CIDRs (127.0.0.0/8 only when listed explicitly).
    Cidrs(Vec<IpNetwork>),
}

impl NodePortAddresses {
    /// Resolves to concrete addresses, given the Node object's view.
    pub fn resolve(&self, node: &NodeInfo, local: &[LocalAddress]) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = match self {
            Self::Cidrs(cidrs) => local
                .iter()
                .map(|a| a.ip)
                .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
                .collect(),
            Self::Primary => {
                let local_ips: Vec<IpAddr> = local.iter().map(|a| a.ip).collect();
                let from_node: Vec<IpAddr> = node
                    .addresses
                    .iter()
                    .copied()
                    .filter(|ip| local_ips.contains(ip))
                    .collect();
                if !from_node.is_empty() {
                    from_node
                } else {
                    let defaults = default_route_interfaces();
                    let on_default: Vec<IpAddr> = local
                        .iter()
                        .filter(|a| defaults.contains(&a.interface) && is_usable(&a.ip))
                        .map(|a| a.ip)
                        .collect();
                    if on_default.is_empty() {
                        local_ips.into_iter().filter(is_usable).collect()
                    } else {
                        on_default
                    }
                }
            }
        };
        out.sort();
        out.dedup();
        out
    }
}

/// Everything backends need to know about the node right now.
pub fn node_network(
    node: &NodeInfo,
    nodeport: &NodePortAddresses,
    cluster_cidrs: &[IpNetwork],
) -> NodeNetwork {
    let local = local_addresses();
    let mut node_ips: Vec<IpAddr> = local.iter().map(|a| a.ip).filter(is_usable).collect();
    node_ips.sort();
    node_ips.dedup();
    NodeNetwork {
        nodeport_ips: nodeport.resolve(node, &local),
        node_ips,
        cluster_cidrs: cluster_cidrs.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(interface: &str, ip: &str) -> LocalAddress {
        LocalAddress {
            interface: interface.into(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn cidrs_select_local_addresses_including_loopback_only_when_asked() {
        let local = [
            addr("lo", "127.0.0.1"),
            addr("eth0", "172.18.0.2"),
            addr("eth1", "10.1.0.2"),
        ];
        let sel = NodePortAddresses::Cidrs(vec!["172.18.0.0/16".parse().unwrap()]);
        assert_eq!(
            sel.resolve(&NodeInfo::default(), &local),
            ["172.18.0.2".parse::<IpAddr>().unwrap()]
        );
        let sel = NodePortAddresses::Cidrs(vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            sel.resolve(&NodeInfo::default(), &local),
            ["127.0.0.1".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn primary_prefers_node_object_addresses() {
        let local = [
            addr("lo", "127.0.0.1"),
            addr("eth0", "172.18.0.2"),
            addr("eth1", "10.1.0.2"),
        ];
        let node = NodeInfo {
            addresses: vec!["10.1.0.2".parse().unwrap(), "192.0.2.99".parse().unwrap()],
            ..NodeInfo::default()
        };
        assert_eq!(
            NodePortAddresses::Primary.resolve(&node, &local),
            ["10.1.0.2".parse::<IpAddr>().unwrap()],
            "only addresses that are really local count"
        );
    }

    #[test]
    fn usable_addresses_exclude_loopback_and_link_local() {
        assert!(!is_usable(&"127.0.0.1".parse().unwrap()));
        assert!(!is_usable(&"169.254.1.1".parse().unwrap()));
        assert!(!is_usable(&"fe80::1".parse().unwrap()));
        assert!(is_usable(&"fd00::1".parse().unwrap()));
    }
}
