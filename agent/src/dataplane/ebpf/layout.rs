//! What the socket-LB maps must hold for a plan: pure translation from the model's
//! [`ServicePortPlan`] to frontend entries in the map ABI of `ferry-common`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferry_common::{BackendAddr, FAMILY_V4, FAMILY_V6, FrontendKey, flags};

use crate::model::{Endpoint, ServicePortPlan, Traffic};

/// An address in the maps' representation (network byte order words).
pub(super) fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

/// The inverse of [`addr_words`].
pub fn words_addr(addr: [u32; 4], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(o))
    }
}

/// `ip:port` of a frontend key.
pub fn frontend_address(key: &FrontendKey) -> std::net::SocketAddr {
    std::net::SocketAddr::new(words_addr(key.addr, key.family), u16::from_be(key.port))
}

/// The name of an IANA protocol number services use.
pub fn protocol_name(number: u8) -> &'static str {
    match number {
        6 => "TCP",
        17 => "UDP",
        132 => "SCTP",
        _ => "?",
    }
}

/// A frontend key for `ip:port/protocol`.
pub fn frontend_key(ip: IpAddr, port: u16, protocol: u8) -> FrontendKey {
    let (addr, family) = addr_words(ip);
    FrontendKey {
        addr,
        port: port.to_be(),
        proto: protocol,
        family,
    }
}

/// A backend in map form.
pub fn backend_addr(b: &Endpoint) -> BackendAddr {
    let (addr, family) = addr_words(b.ip);
    BackendAddr {
        addr,
        port: b.port.to_be(),
        family,
        _pad: 0,
    }
}

/// The model form of a map backend.
pub fn backend_of(b: &BackendAddr) -> Endpoint {
    Endpoint {
        ip: words_addr(b.addr, b.family),
        port: u16::from_be(b.port),
    }
}

/// One frontend entry as it should be programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub key: FrontendKey,
    /// Action bits and options (see `ferry_common::flags`).
    pub flags: u16,
    pub affinity_timeout: u32,
    /// Backends to balance across (empty unless the action is forward).
    pub backends: Vec<Endpoint>,
}

fn action(traffic: Traffic<'_>) -> (u16, Vec<Endpoint>) {
    match traffic {
        Traffic::Forward(backends) => (flags::ACTION_FORWARD, backends.to_vec()),
        Traffic::Reject => (flags::ACTION_REJECT, Vec::new()),
        Traffic::Drop => (flags::ACTION_DROP, Vec::new()),
    }
}

/// The frontends of one plan, as seen by processes on the node and in its pods:
/// the ClusterIP follows the internal traffic policy; externalIPs and load-balancer
/// IPs use the cluster-wide endpoints (kube-proxy's short-circuit for traffic that
/// originates inside the cluster), or refuse when there are none.
pub fn frontends(plan: &ServicePortPlan) -> Vec<DesiredFrontend> {
    let protocol = plan.key.port.protocol.number();
    let (affinity_flag, affinity_timeout) = match plan.affinity_timeout_seconds {
        Some(t) => (flags::AFFINITY, t),
        None => (0, 0),
    };
    let mut out = Vec::with_capacity(1 + plan.external_ips.len() + plan.load_balancer_ips.len());
    let (internal, internal_backends) = action(plan.internal());
    out.push(DesiredFrontend {
        key: frontend_key(plan.cluster_ip, plan.port, protocol),
        flags: internal | affinity_flag | flags::CLUSTER_IP,
        affinity_timeout,
        backends: internal_backends,
    });
    let (external, external_backends) = action(plan.external_from_inside());
    // A socket hook cannot see the source address a connection will use, so
    // load-balancer IPs with source ranges are left to the external rules, which
    // check every packet's source (pods' packets reach them as they leave the pod).
    let load_balancer_ips: &[IpAddr] = if plan.load_balancer_ips_restricted() {
        &[]
    } else {
        &plan.load_balancer_ips
    };
    for &ip in plan.external_ips.iter().chain(load_balancer_ips) {
        out.push(DesiredFrontend {
            key: frontend_key(ip, plan.port, protocol),
            flags: external | affinity_flag,
            affinity_timeout,
            backends: external_backends.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::model::plan::test_plan;

    fn plan() -> ServicePortPlan {
        let mut plan = test_plan(
            ("ns", "web", "http"),
            Protocol::Tcp,
            "10.96.0.10",
            80,
            &[("10.244.0.5", 8080)],
        );
        plan.node_port = Some(30080);
        plan.external_ips = vec!["192.0.2.7".parse().unwrap()];
        plan.affinity_timeout_seconds = Some(30);
        plan.internal_policy_local = true;
        plan
    }

    #[test]
    fn load_balancer_ips_with_source_ranges_are_left_to_the_external_rules() {
        let mut p = plan();
        p.load_balancer_ips = vec!["203.0.113.1".parse().unwrap()];
        let lb_key = frontend_key("203.0.113.1".parse().unwrap(), 80, 6);
        assert!(frontends(&p).iter().any(|f| f.key == lb_key));
        p.load_balancer_source_ranges = vec!["10.0.0.0/8".parse().unwrap()];
        let restricted = frontends(&p);
        assert!(!restricted.iter().any(|f| f.key == lb_key));
        assert_eq!(restricted.len(), 2, "ClusterIP and externalIP stay");
    }

    #[test]
    fn addresses_round_trip_in_network_order() {
        for ip in ["10.96.0.10", "fd00:96::10", "::ffff:10.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let (words, family) = addr_words(ip);
            assert_eq!(words_addr(words, family), ip);
        }
        let (words, _) = addr_words("10.96.0.10".parse().unwrap());
        assert_eq!(
            words[0].to_ne_bytes(),
            [10, 96, 0, 10],
            "memory order = wire order"
        );
        assert_eq!(
            frontend_key("10.0.0.1".parse().unwrap(), 80, 6)
                .port
                .to_ne_bytes(),
            [0, 80]
        );
    }

    #[test]
    fn cluster_ip_follows_internal_policy_external_ips_short_circuit() {
        let f = frontends(&plan());
        assert_eq!(f.len(), 2);
        // Internal policy Local with no local endpoints: DROP, with affinity flag kept.
        assert_eq!(f[0].flags & flags::ACTION_MASK, flags::ACTION_DROP);
        assert!(f[0].flags & flags::CLUSTER_IP != 0 && f[0].backends.is_empty());
        assert_eq!(f[0].flags & flags::AFFINITY, flags::AFFINITY);
        // externalIP from inside the cluster: cluster-wide endpoints.
        assert_eq!(f[1].flags & flags::ACTION_MASK, flags::ACTION_FORWARD);
        assert_eq!(f[1].backends.len(), 1);
        assert_eq!(f[1].flags & flags::CLUSTER_IP, 0);
    }

    #[test]
    fn no_endpoints_rejects_everywhere() {
        let mut p = plan();
        p.cluster_endpoints.clear();
        p.has_any_endpoints = false;
        p.internal_policy_local = false;
        for f in frontends(&p) {
            assert_eq!(f.flags & flags::ACTION_MASK, flags::ACTION_REJECT);
        }
    }
}
