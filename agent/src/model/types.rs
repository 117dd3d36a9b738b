//! Small value types the whole model speaks in: names, protocols, IP families.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// Transport protocol of a service port, as Kubernetes spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the Kubernetes spelling; a missing protocol means TCP (API default).
    pub fn from_k8s(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("TCP") => Ok(Self::Tcp),
            Some("UDP") => Ok(Self::Udp),
            Some("SCTP") => Ok(Self::Sctp),
            Some(other) => Err(format!("unknown protocol {other:?}")),
        }
    }

    /// Lower-case name as iptables and kube-proxy's chain hashes use it.
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }

    /// IANA protocol number, as the kernel sees it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// IP family; kube-proxy programs each family independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// Family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Namespace and name of a Service: the identity everything else hangs off.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of one service, kube-proxy's `ServicePortName`: what a frontend balances.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ServicePortName {
    pub service: ServiceName,
    /// The port's name; empty for the single unnamed port a service may have.
    pub port: String,
    pub protocol: Protocol,
}

impl fmt::Display for ServicePortName {
    /// `ns/name:port`, or `ns/name` for an unnamed port, exactly as kube-proxy prints it
    /// (its chain-name hashes are computed over this string).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.service)
        } else {
            write!(f, "{}:{}", self.service, self.port)
        }
    }
}

/// One address:port a frontend forwards to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    /// `ip:port` or `[ip6]:port` (Go's `net.JoinHostPort`, which kube-proxy hashes).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_port_name_prints_like_kube_proxy() {
        let svc = ServiceName::new("default", "web");
        let named = ServicePortName {
            service: svc.clone(),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let unnamed = ServicePortName {
            service: svc,
            port: String::new(),
            protocol: Protocol::Udp,
        };
        assert_eq!(named.to_string(), "default/web:http");
        assert_eq!(unnamed.to_string(), "default/web");
    }

    #[test]
    fn endpoint_prints_v6_in_brackets() {
        let v4 = Endpoint {
            ip: "10.0.0.1".parse().unwrap(),
            port: 80,
        };
        let v6 = Endpoint {
            ip: "fd00::1".parse().unwrap(),
            port: 80,
        };
        assert_eq!(v4.to_string(), "10.0.0.1:80");
        assert_eq!(v6.to_string(), "[fd00::1]:80");
    }

    #[test]
    fn protocol_defaults_to_tcp_and_rejects_unknown() {
        assert_eq!(Protocol::from_k8s(None), Ok(Protocol::Tcp));
        assert_eq!(Protocol::from_k8s(Some("UDP")), Ok(Protocol::Udp));
        assert!(Protocol::from_k8s(Some("tcp")).is_err());
    }
}
