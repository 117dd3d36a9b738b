//! kube-proxy's chain names. Kept identical (same prefixes, same SHA-256/base32 hash of
//! the same strings) so existing tooling and runbooks that grep for them keep working.

use data_encoding::BASE32;
use sha2::{Digest, Sha256};

use crate::model::{Endpoint, ServicePortName};

/// Entry of every service frontend (nat: DNAT; filter: REJECT/DROP).
pub const KUBE_SERVICES: &str = "KUBE-SERVICES";
/// Filter refusals of traffic to external frontends (NodePorts, externalIPs, LB IPs).
pub const KUBE_EXTERNAL_SERVICES: &str = "KUBE-EXTERNAL-SERVICES";
/// NodePort frontends.
pub const KUBE_NODEPORTS: &str = "KUBE-NODEPORTS";
/// Masquerades what KUBE-MARK-MASQ marked.
pub const KUBE_POSTROUTING: &str = "KUBE-POSTROUTING";
/// Marks a packet for masquerade.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
/// Accepts forwarded service traffic.
pub const KUBE_FORWARD: &str = "KUBE-FORWARD";
/// Drops LB IP traffic that loadBalancerSourceRanges do not accept.
pub const KUBE_PROXY_FIREWALL: &str = "KUBE-PROXY-FIREWALL";
/// Exists while Ferry's rules are in place; its absence means someone flushed the
/// tables and a full resync is due.
pub const KUBE_PROXY_CANARY: &str = "KUBE-PROXY-CANARY";

/// Top-level chains of the filter table, rewritten on every sync.
pub const FILTER_CHAINS: [&str; 5] = [
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
];

/// Top-level chains of the nat table, rewritten on every sync.
pub const NAT_CHAINS: [&str; 4] = [
    KUBE_SERVICES,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_MARK_MASQ,
];

/// Chains of kube-proxy's IPVS mode that its iptables layout (and Ferry's) lacks:
/// removed by `ferry cleanup --kube-proxy`.
pub const KUBE_PROXY_IPVS_CHAINS: [&str; 5] = [
    "KUBE-NODE-PORT",
    "KUBE-LOAD-BALANCER",
    "KUBE-SOURCE-RANGES-FIREWALL",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
];

/// Prefixes of per-service chains: everything with these names is Ferry's to delete.
const SERVICE_CHAIN_PREFIXES: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-EXT-",
    "KUBE-FW-",
    "KUBE-SEP-",
];

/// Whether a chain is a per-service chain Ferry (or kube-proxy) owns.
pub fn is_service_chain(name: &str) -> bool {
    SERVICE_CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether a chain is Ferry's (or kube-proxy's) to delete on cleanup: the shared
/// chains, the canary and the per-service chains.
pub fn is_owned_chain(name: &str) -> bool {
    is_service_chain(name)
        || FILTER_CHAINS.contains(&name)
        || NAT_CHAINS.contains(&name)
        || name == KUBE_PROXY_CANARY
}

/// kube-proxy's name hash: the first 16 characters of base32(sha256(input)).
pub fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

/// The hash of a service port and its protocol, shared by all its chain names.
pub fn service_port_hash(name: &ServicePortName) -> String {
    hash16(&format!("{name}{}", name.protocol.lower()))
}

/// Chain balancing across `Cluster`-policy endpoints.
pub fn cluster_chain(name: &ServicePortName) -> String {
    format!("KUBE-SVC-{}", service_port_hash(name))
}

/// Chain balancing across `Local`-policy endpoints.
pub fn local_chain(name: &ServicePortName) -> String {
    format!("KUBE-SVL-{}", service_port_hash(name))
}

/// Chain for traffic to external destinations (NodePort, externalIPs, LB IPs).
pub fn external_chain(name: &ServicePortName) -> String {
    format!("KUBE-EXT-{}", service_port_hash(name))
}

/// Chain enforcing `loadBalancerSourceRanges`.
pub fn firewall_chain(name: &ServicePortName) -> String {
    format!("KUBE-FW-{}", service_port_hash(name))
}

/// Per-endpoint DNAT chain.
pub fn endpoint_chain(name: &ServicePortName, backend: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        hash16(&format!("{name}{}{backend}", name.protocol.lower()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Protocol, ServiceName};

    #[test]
    fn names_match_kube_proxy() {
        // Expected values computed with kube-proxy's algorithm:
        // base32(sha256("ns1/svc1:p80" + "tcp"))[:16] and
        // base32(sha256("ns1/svc1:p80" + "tcp" + "10.180.0.1:80"))[:16].
        let name = ServicePortName {
            service: ServiceName::new("ns1", "svc1"),
            port: "p80".into(),
            protocol: Protocol::Tcp,
        };
        assert_eq!(cluster_chain(&name), "KUBE-SVC-XPGD46QRK7WJZT7O");
        let backend = Endpoint {
            ip: "10.180.0.1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(endpoint_chain(&name, &backend), "KUBE-SEP-SXIVWICOYRO3J4NJ");
        assert!(
            cluster_chain(&name).len() <= 28,
            "iptables chain names are at most 28 bytes"
        );
    }

    #[test]
    fn ownership_by_prefix() {
        assert!(is_service_chain("KUBE-SEP-AAAA"));
        assert!(!is_service_chain("KUBE-SERVICES"));
        assert!(!is_service_chain("DOCKER"));
    }
}
