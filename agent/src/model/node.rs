//! This node as the model sees it: the Node object's facts ([`NodeInfo`]), the
//! addresses the host reported ([`HostAddresses`], probed elsewhere), and what the data
//! planes derive from both ([`NodeNetwork`]), including kube-proxy's
//! `--nodeport-addresses` rule. Pure: probing the host is `crate::host`'s job.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::types::IpFamily;

/// Taint the cluster autoscaler puts on a node it is about to delete.
pub const AUTOSCALER_DELETION_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Label carrying a node's topology zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Facts about this node that programming depends on, from its Node object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// `--node-name`: endpoint locality and `forNodes` hints are decided against it.
    pub name: String,
    /// `topology.kubernetes.io/zone`, for `forZones` hints.
    pub zone: Option<String>,
    /// Addresses from the Node object's status (InternalIP first, then ExternalIP).
    pub addresses: Vec<IpAddr>,
    /// The node is going away: its object has a deletionTimestamp or the cluster
    /// autoscaler's `ToBeDeletedByClusterAutoscaler` taint. kube-proxy then reports
    /// `nodeEligible: false` (503) on /healthz so load balancers drain it first.
    pub leaving: bool,
    /// `spec.podCIDRs` (or `spec.podCIDR`): this node's pods, for
    /// `--detect-local-mode NodeCIDR`.
    pub pod_cidrs: Vec<IpNetwork>,
}

impl NodeInfo {
    /// A node known only by name (no Node object seen yet).
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }
}

/// An address of a local interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LocalAddress {
    pub interface: String,
    pub ip: IpAddr,
}

/// What the host's network namespace holds, as last probed: the input for
/// NodePort address selection. Changes reach the proxy loop as events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddresses {
    /// Every address configured on an interface.
    pub addresses: Vec<LocalAddress>,
    /// Interfaces that carry a default route (IPv4 or IPv6).
    pub default_route_interfaces: BTreeSet<String>,
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
    /// Every local address, 127.0.0.1 included but not IPv6 loopback or link-local:
    /// kube-proxy's iptables mode when `--nodeport-addresses` is unset (its
    /// `localhostNodePorts` defaults to true).
    All,
}

impl NodePortAddresses {
    /// Resolves to concrete addresses, given the Node object's view and the host's.
    pub fn resolve(&self, node: &NodeInfo, host: &HostAddresses) -> Vec<IpAddr> {
        let local_ips = || host.addresses.iter().map(|a| a.ip);
        let mut out: Vec<IpAddr> = match self {
            Self::Cidrs(cidrs) => local_ips()
                .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
                .collect(),
            Self::All => local_ips()
                .filter(|ip| match ip {
                    IpAddr::V4(_) => true,
                    IpAddr::V6(_) => is_usable(ip),
                })
                .collect(),
            Self::Primary => {
                let from_node: Vec<IpAddr> = node
                    .addresses
                    .iter()
                    .copied()
                    .filter(|ip| local_ips().any(|local| local == *ip))
                    .collect();
                let on_default: Vec<IpAddr> = host
                    .addresses
                    .iter()
                    .filter(|a| host.default_route_interfaces.contains(&a.interface))
                    .map(|a| a.ip)
                    .filter(is_usable)
                    .collect();
                if !from_node.is_empty() {
                    from_node
                } else if !on_default.is_empty() {
                    on_default
                } else {
                    local_ips().filter(is_usable).collect()
                }
            }
        };
        out.sort();
        out.dedup();
        out
    }
}

/// Whether an address can identify the node to others (not loopback, link-local or
/// unspecified).
fn is_usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// How traffic from pods is told apart from other traffic (kube-proxy's
/// `--detect-local-mode`): ClusterIP traffic from elsewhere is masqueraded, and pod
/// traffic to a service's external addresses is short-circuited to its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalDetection {
    /// From the cluster's pod CIDRs (`--cluster-cidr`).
    ClusterCidr(Vec<IpNetwork>),
    /// From this node's pod CIDRs (the Node's `spec.podCIDRs`).
    NodeCidr,
    /// In through this bridge (`--pod-bridge-interface`).
    BridgeInterface(String),
    /// In through interfaces named with this prefix (`--pod-interface-name-prefix`).
    InterfaceNamePrefix(String),
}

/// Pod traffic as the data planes match it, [`LocalDetection`] resolved for the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalTraffic {
    /// From these CIDRs; none: cannot tell (no rules depend on it, as kube-proxy).
    FromCidrs(Vec<IpNetwork>),
    /// In through interfaces matching this iptables pattern (`cni0`, `veth+`).
    InInterface(String),
}

impl Default for LocalTraffic {
    fn default() -> Self {
        Self::FromCidrs(Vec::new())
    }
}

impl LocalDetection {
    /// Resolves against the node's object.
    pub fn resolve(&self, node: &NodeInfo) -> LocalTraffic {
        match self {
            Self::ClusterCidr(cidrs) => LocalTraffic::FromCidrs(cidrs.clone()),
            Self::NodeCidr => LocalTraffic::FromCidrs(node.pod_cidrs.clone()),
            Self::BridgeInterface(bridge) => LocalTraffic::InInterface(bridge.clone()),
            Self::InterfaceNamePrefix(prefix) => LocalTraffic::InInterface(format!("{prefix}+")),
        }
    }
}

/// Node facts a data plane needs beyond the plan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Addresses NodePorts answer on.
    pub nodeport_ips: Vec<IpAddr>,
    /// All of this node's own usable addresses.
    pub node_ips: Vec<IpAddr>,
    /// How pod traffic is recognised (`--detect-local-mode`).
    pub local_traffic: LocalTraffic,
    /// Masquerade every ClusterIP connection, whatever its source (kube-proxy's
    /// `masqueradeAll`), instead of only those from outside the cluster CIDRs.
    pub masquerade_all: bool,
    /// The ServiceCIDRs' ranges: where an address no service holds is dropped
    /// (nftables mode).
    pub service_cidrs: Vec<IpNetwork>,
}

impl NodeNetwork {
    /// Everything the data planes need to know about the node right now.
    pub fn new(
        node: &NodeInfo,
        host: &HostAddresses,
        nodeport: &NodePortAddresses,
        local: &LocalDetection,
        masquerade_all: bool,
    ) -> Self {
        let mut node_ips: Vec<IpAddr> = host
            .addresses
            .iter()
            .map(|a| a.ip)
            .filter(is_usable)
            .collect();
        node_ips.sort();
        node_ips.dedup();
        Self {
            nodeport_ips: nodeport.resolve(node, host),
            node_ips,
            local_traffic: local.resolve(node),
            masquerade_all,
            service_cidrs: Vec::new(),
        }
    }

    /// The part of it that concerns one IP family.
    pub fn of_family(&self, family: IpFamily) -> NodeNetwork {
        let keep_ip = |ips: &[IpAddr]| {
            ips.iter()
                .copied()
                .filter(|ip| IpFamily::of(ip) == family)
                .collect()
        };
        NodeNetwork {
            nodeport_ips: keep_ip(&self.nodeport_ips),
            node_ips: keep_ip(&self.node_ips),
            local_traffic: match &self.local_traffic {
                LocalTraffic::FromCidrs(cidrs) => LocalTraffic::FromCidrs(
                    cidrs
                        .iter()
                        .copied()
                        .filter(|n| IpFamily::of(&n.ip()) == family)
                        .collect(),
                ),
                other => other.clone(),
            },
            masquerade_all: self.masquerade_all,
            service_cidrs: self
                .service_cidrs
                .iter()
                .copied()
                .filter(|n| IpFamily::of(&n.ip()) == family)
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(addresses: &[(&str, &str)], defaults: &[&str]) -> HostAddresses {
        HostAddresses {
            addresses: addresses
                .iter()
                .map(|(interface, ip)| LocalAddress {
                    interface: (*interface).into(),
                    ip: ip.parse().unwrap(),
                })
                .collect(),
            default_route_interfaces: defaults.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn ips(values: &[&str]) -> Vec<IpAddr> {
        values.iter().map(|v| v.parse().unwrap()).collect()
    }

    const LOCAL: [(&str, &str); 3] = [
        ("lo", "127.0.0.1"),
        ("eth0", "172.18.0.2"),
        ("eth1", "10.1.0.2"),
    ];

    #[test]
    fn cidrs_select_local_addresses_including_loopback_only_when_asked() {
        let local = host(&LOCAL, &[]);
        let sel = NodePortAddresses::Cidrs(vec!["172.18.0.0/16".parse().unwrap()]);
        assert_eq!(
            sel.resolve(&NodeInfo::default(), &local),
            ips(&["172.18.0.2"])
        );
        let sel = NodePortAddresses::Cidrs(vec!["127.0.0.0/8".parse().unwrap()]);
        assert_eq!(
            sel.resolve(&NodeInfo::default(), &local),
            ips(&["127.0.0.1"])
        );
    }

    #[test]
    fn primary_prefers_node_object_addresses() {
        let node = NodeInfo {
            addresses: ips(&["10.1.0.2", "192.0.2.99"]),
            ..NodeInfo::default()
        };
        assert_eq!(
            NodePortAddresses::Primary.resolve(&node, &host(&LOCAL, &["eth0"])),
            ips(&["10.1.0.2"]),
            "only addresses that are really local count"
        );
    }

    #[test]
    fn primary_without_node_addresses_uses_default_route_interfaces_then_all() {
        let none = NodeInfo::default();
        assert_eq!(
            NodePortAddresses::Primary.resolve(&none, &host(&LOCAL, &["eth1"])),
            ips(&["10.1.0.2"])
        );
        assert_eq!(
            NodePortAddresses::Primary.resolve(&none, &host(&LOCAL, &[])),
            ips(&["10.1.0.2", "172.18.0.2"])
        );
    }

    #[test]
    fn usable_addresses_exclude_loopback_and_link_local() {
        assert!(!is_usable(&"127.0.0.1".parse().unwrap()));
        assert!(!is_usable(&"169.254.1.1".parse().unwrap()));
        assert!(!is_usable(&"fe80::1".parse().unwrap()));
        assert!(is_usable(&"fd00::1".parse().unwrap()));
    }

    #[test]
    fn node_network_splits_by_family() {
        let h = host(&[("eth0", "172.18.0.2"), ("eth0", "fd00::2")], &["eth0"]);
        let cidrs: Vec<IpNetwork> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd00:244::/64".parse().unwrap(),
        ];
        let net = NodeNetwork::new(
            &NodeInfo::default(),
            &h,
            &NodePortAddresses::Primary,
            &LocalDetection::ClusterCidr(cidrs.clone()),
            true,
        );
        let v6 = net.of_family(IpFamily::V6);
        assert!(v6.masquerade_all);
        assert_eq!(v6.nodeport_ips, ips(&["fd00::2"]));
        assert_eq!(v6.local_traffic, LocalTraffic::FromCidrs(vec![cidrs[1]]));
    }

    #[test]
    fn all_local_addresses_include_ipv4_loopback_not_ipv6_loopback_or_link_local() {
        let h = host(
            &[
                ("lo", "127.0.0.1"),
                ("lo", "::1"),
                ("eth0", "172.18.0.2"),
                ("eth0", "fe80::1"),
                ("eth0", "fd00::2"),
            ],
            &["eth0"],
        );
        assert_eq!(
            NodePortAddresses::All.resolve(&NodeInfo::default(), &h),
            ips(&["127.0.0.1", "172.18.0.2", "fd00::2"])
        );
    }

    #[test]
    fn local_detection_modes_resolve_like_kube_proxys() {
        let node = NodeInfo {
            pod_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
            ..NodeInfo::named("n")
        };
        let cidr = |s: &str| vec![s.parse::<IpNetwork>().unwrap()];
        assert_eq!(
            LocalDetection::ClusterCidr(cidr("10.244.0.0/16")).resolve(&node),
            LocalTraffic::FromCidrs(cidr("10.244.0.0/16"))
        );
        assert_eq!(
            LocalDetection::NodeCidr.resolve(&node),
            LocalTraffic::FromCidrs(cidr("10.244.3.0/24"))
        );
        assert_eq!(
            LocalDetection::NodeCidr.resolve(&NodeInfo::named("n")),
            LocalTraffic::FromCidrs(vec![]),
            "unknown until the Node has podCIDRs"
        );
        assert_eq!(
            LocalDetection::BridgeInterface("cni0".into()).resolve(&node),
            LocalTraffic::InInterface("cni0".into())
        );
        assert_eq!(
            LocalDetection::InterfaceNamePrefix("veth".into()).resolve(&node),
            LocalTraffic::InInterface("veth+".into())
        );
    }
}
