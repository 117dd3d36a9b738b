//! A Service, validated once into the facts the data plane and DNS need.

use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::types::{IpFamily, Protocol, ServiceName};
use super::validate::{self, At, ValidationError};

/// Label that hands a service to another proxy; kube-proxy skips services carrying it.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label that keeps a service away from every proxy (kube-proxy's informers select it
/// out; e2e "should implement service.kubernetes.io/headless"). DNS still serves it.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// Default ClientIP affinity timeout (three hours), as in the Kubernetes API.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10_800;

/// How the service is exposed, from `spec.type`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    /// DNS-only alias to an outside name.
    ExternalName(String),
}

/// One entry of `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortSpec {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// The validated facts of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub name: ServiceName,
    pub service_type: ServiceType,
    /// ClusterIPs, primary first; empty for headless and unallocated services.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`.
    pub headless: bool,
    pub ports: Vec<ServicePortSpec>,
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`, except `ipMode: Proxy` ones (the load
    /// balancer proxies those, so the node must not capture them).
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNetwork>,
    /// ClientIP session affinity timeout, if affinity is on.
    pub affinity_timeout_seconds: Option<u32>,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    pub publish_not_ready_addresses: bool,
    /// Carries the service-proxy-name label (another proxy owns it) or the headless
    /// label (no proxy handles it).
    pub foreign_proxy: bool,
}

impl ServiceInfo {
    /// Validates a Service object. The error names the first problem found.
    pub fn from_k8s(svc: &Service) -> Result<Self, ValidationError> {
        let meta = &svc.metadata;
        let name = meta
            .name
            .as_deref()
            .ok_or_else(|| ValidationError::missing("metadata.name"))?;
        validate::dns1035_label(name).at("metadata.name")?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        validate::dns1123_label(namespace).at("metadata.namespace")?;
        let spec = svc
            .spec
            .as_ref()
            .ok_or_else(|| ValidationError::missing("spec"))?;
        let service_type = service_type(spec)?;
        let (cluster_ips, headless) = parse_cluster_ips(spec)?;
        let external_ips = parse_ips(spec.external_ips.iter().flatten(), "spec.externalIPs")?;
        let load_balancer_ips = if service_type == ServiceType::LoadBalancer {
            load_balancer_ips(svc)?
        } else {
            Vec::new()
        };
        let external_policy_local = policy_is_local(
            spec.external_traffic_policy.as_deref(),
            "spec.externalTrafficPolicy",
        )? && is_externally_accessible(&service_type, &external_ips);
        Ok(Self {
            name: ServiceName::new(namespace, name),
            cluster_ips,
            headless,
            ports: service_ports(spec)?,
            external_ips,
            load_balancer_ips,
            load_balancer_source_ranges: source_ranges(spec)?,
            affinity_timeout_seconds: affinity_timeout(spec)?,
            internal_policy_local: policy_is_local(
                spec.internal_traffic_policy.as_deref(),
                "spec.internalTrafficPolicy",
            )?,
            external_policy_local,
            health_check_node_port: optional_port(
                spec.health_check_node_port,
                "spec.healthCheckNodePort",
            )?,
            publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
            foreign_proxy: meta.labels.as_ref().is_some_and(|labels| {
                labels.contains_key(SERVICE_PROXY_NAME_LABEL) || labels.contains_key(HEADLESS_LABEL)
            }),
            service_type,
        })
    }

    /// Whether this node's data plane handles the service at all: not headless, not
    /// ExternalName, has a ClusterIP, and not owned by another proxy.
    pub fn is_proxied(&self) -> bool {
        !self.headless
            && !self.foreign_proxy
            && !matches!(self.service_type, ServiceType::ExternalName(_))
            && !self.cluster_ips.is_empty()
    }

    /// Whether traffic from outside the cluster can reach the service (NodePorts,
    /// load balancers, externalIPs): only then does `externalTrafficPolicy` apply.
    pub fn is_externally_accessible(&self) -> bool {
        is_externally_accessible(&self.service_type, &self.external_ips)
    }

    /// Whether some traffic of this service balances across the cluster-wide
    /// endpoint set: a `Cluster` internal policy, or any external access (even with a
    /// Local external policy, traffic from pods and the node to an external address
    /// short-circuits to the cluster-wide set).
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_policy_local || self.is_externally_accessible()
    }

    /// Whether some traffic of this service uses only this node's endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_policy_local || self.external_policy_local
    }

    /// The ClusterIP of one family, if the service has one.
    pub fn cluster_ip(&self, family: IpFamily) -> Option<IpAddr> {
        self.cluster_ips
            .iter()
            .copied()
            .find(|ip| IpFamily::of(ip) == family)
    }

    /// Whether NodePorts are opened on nodes for this service.
    pub fn has_node_ports(&self) -> bool {
        matches!(
            self.service_type,
            ServiceType::NodePort | ServiceType::LoadBalancer
        )
    }
}

/// Kubernetes' `ExternallyAccessible`: NodePort and LoadBalancer services, and
/// ClusterIP services with externalIPs. Load-balancer IPs only exist on
/// `LoadBalancer` services, so they need no check of their own.
fn is_externally_accessible(service_type: &ServiceType, external_ips: &[IpAddr]) -> bool {
    match service_type {
        ServiceType::NodePort | ServiceType::LoadBalancer => true,
        ServiceType::ClusterIp => !external_ips.is_empty(),
        ServiceType::ExternalName(_) => false,
    }
}

/// `spec.type` (and `spec.externalName` for ExternalName services).
fn service_type(spec: &ServiceSpec) -> Result<ServiceType, ValidationError> {
    match spec.type_.as_deref() {
        None | Some("ClusterIP") => Ok(ServiceType::ClusterIp),
        Some("NodePort") => Ok(ServiceType::NodePort),
        Some("LoadBalancer") => Ok(ServiceType::LoadBalancer),
        Some("ExternalName") => {
            let target = spec.external_name.as_deref().ok_or_else(|| {
                ValidationError::invalid("spec.externalName", "required for type ExternalName")
            })?;
            validate::external_name(target).at("spec.externalName")?;
            Ok(ServiceType::ExternalName(
                target.trim_end_matches('.').to_ascii_lowercase(),
            ))
        }
        Some(other) => Err(ValidationError::invalid(
            "spec.type",
            format!("unknown service type {other:?}"),
        )),
    }
}

/// `spec.ports`: valid names, protocols and numbers; unique name per protocol; every
/// port named when there are several.
fn service_ports(spec: &ServiceSpec) -> Result<Vec<ServicePortSpec>, ValidationError> {
    let mut ports: Vec<ServicePortSpec> = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = port.name.clone().unwrap_or_default();
        if !name.is_empty() {
            validate::port_name(&name).at(format!("{field}.name"))?;
        }
        let protocol =
            Protocol::from_k8s(port.protocol.as_deref()).at(format!("{field}.protocol"))?;
        let number = port_number(port.port).at(format!("{field}.port"))?;
        let node_port = optional_port(port.node_port, &format!("{field}.nodePort"))?;
        if ports
            .iter()
            .any(|p| p.name == name && p.protocol == protocol)
        {
            let reason = format!("duplicate port name {name:?} for {protocol}");
            return Err(ValidationError::invalid(field, reason));
        }
        if ports
            .iter()
            .any(|p| p.port == number && p.protocol == protocol)
        {
            let reason = format!("duplicate port {number}/{protocol}");
            return Err(ValidationError::invalid(field, reason));
        }
        ports.push(ServicePortSpec {
            name,
            protocol,
            port: number,
            node_port,
        });
    }
    if ports.len() > 1 && ports.iter().any(|p| p.name.is_empty()) {
        return Err(ValidationError::invalid(
            "spec.ports",
            "every port must be named when there are several",
        ));
    }
    Ok(ports)
}

/// `status.loadBalancer.ingress[].ip`, except `ipMode: Proxy` ones (the load balancer
/// proxies those, so the node must not capture them).
fn load_balancer_ips(svc: &Service) -> Result<Vec<IpAddr>, ValidationError> {
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut ips = Vec::new();
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = &ing.ip {
            let field = format!("status.loadBalancer.ingress[{i}].ip");
            ips.push(parse_ip(ip).and_then(non_special).at(field)?);
        }
    }
    Ok(ips)
}

/// `spec.loadBalancerSourceRanges` as CIDRs.
fn source_ranges(spec: &ServiceSpec) -> Result<Vec<IpNetwork>, ValidationError> {
    spec.load_balancer_source_ranges
        .iter()
        .flatten()
        .map(|range| {
            range.trim().parse().map_err(|_| {
                ValidationError::invalid(
                    "spec.loadBalancerSourceRanges",
                    format!("invalid CIDR {range:?}"),
                )
            })
        })
        .collect()
}

/// The ClientIP affinity timeout, if `spec.sessionAffinity` is ClientIP.
fn affinity_timeout(spec: &ServiceSpec) -> Result<Option<u32>, ValidationError> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)),
                Some(t @ 1..=86_400) => Ok(Some(t as u32)),
                Some(t) => Err(ValidationError::invalid(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not in 1..=86400"),
                )),
            }
        }
        Some(other) => Err(ValidationError::invalid(
            "spec.sessionAffinity",
            format!("unknown value {other:?}"),
        )),
    }
}

/// A traffic policy field: `Local` or (default) `Cluster`.
fn policy_is_local(value: Option<&str>, field: &str) -> Result<bool, ValidationError> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(ValidationError::invalid(
            field,
            format!("unknown value {other:?}"),
        )),
    }
}

fn parse_cluster_ips(spec: &ServiceSpec) -> Result<(Vec<IpAddr>, bool), ValidationError> {
    let mut raw: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if raw.is_empty()
        && let Some(ip) = spec.cluster_ip.as_deref()
    {
        raw.push(ip);
    }
    if raw.contains(&"None") {
        return Ok((Vec::new(), true));
    }
    let ips = parse_ips(
        raw.into_iter().filter(|ip| !ip.is_empty()),
        "spec.clusterIPs",
    )?;
    if ips.len() > 2 || (ips.len() == 2 && IpFamily::of(&ips[0]) == IpFamily::of(&ips[1])) {
        return Err(ValidationError::invalid(
            "spec.clusterIPs",
            "at most one address per IP family",
        ));
    }
    Ok((ips, false))
}

fn parse_ips<'a>(
    values: impl IntoIterator<Item = impl AsRef<str> + 'a>,
    field: &str,
) -> Result<Vec<IpAddr>, ValidationError> {
    values
        .into_iter()
        .map(|v| parse_ip(v.as_ref()).and_then(non_special).at(field))
        .collect()
}

/// Refuses the addresses the API server refuses for services (its
/// `ValidateNonSpecialIP`): unspecified, loopback, link-local and multicast ones. As a
/// frontend they would capture the node's own traffic (127.0.0.1, 169.254.169.254...).
fn non_special(ip: IpAddr) -> Result<IpAddr, String> {
    let special = match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    };
    if special {
        Err(format!(
            "{ip} is an unspecified, loopback, link-local or multicast address"
        ))
    } else {
        Ok(ip)
    }
}

/// Parses an IP address as Kubernetes writes it (no zone, no surrounding spaces).
pub fn parse_ip(value: &str) -> Result<IpAddr, String> {
    value
        .parse::<IpAddr>()
        .map_err(|_| format!("invalid IP address {value:?}"))
}

fn port_number(value: i32) -> Result<u16, String> {
    match u16::try_from(value) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{value} is not a valid port number")),
    }
}

/// A port field where 0 or absent means "none allocated".
fn optional_port(value: Option<i32>, field: &str) -> Result<Option<u16>, ValidationError> {
    match value {
        None | Some(0) => Ok(None),
        Some(n) => port_number(n).at(field).map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        serde_saphyr::from_str(yaml).expect("test yaml")
    }

    #[test]
    fn minimal_cluster_ip_service() {
        let info = ServiceInfo::from_k8s(&svc(r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{port: 80}]
"#))
        .unwrap();
        assert_eq!(info.name, ServiceName::new("shop", "web"));
        assert_eq!(
            info.cluster_ips,
            vec!["10.96.0.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.ports.len(), 1);
        assert_eq!(info.ports[0].protocol, Protocol::Tcp);
        assert!(info.is_proxied());
        assert_eq!(info.service_type, ServiceType::ClusterIp);
    }

    #[test]
    fn namespace_defaults_to_default() {
        let info = ServiceInfo::from_k8s(&svc("metadata: {name: a}\nspec: {clusterIP: 10.0.0.1}"))
            .unwrap();
        assert_eq!(info.name.namespace, "default");
    }

    #[test]
    fn headless_external_name_and_labelled_services_are_not_proxied() {
        let headless = ServiceInfo::from_k8s(&svc(
            "metadata: {name: db}\nspec: {clusterIP: None, ports: [{port: 5432}]}",
        ))
        .unwrap();
        assert!(headless.headless && !headless.is_proxied());

        let ext = ServiceInfo::from_k8s(&svc(
            "metadata: {name: ext}\nspec: {type: ExternalName, externalName: Example.COM.}",
        ))
        .unwrap();
        assert_eq!(
            ext.service_type,
            ServiceType::ExternalName("example.com".into())
        );
        assert!(!ext.is_proxied());

        let labelled = ServiceInfo::from_k8s(&svc(
            "metadata: {name: x, labels: {service.kubernetes.io/service-proxy-name: other}}\nspec: {clusterIP: 10.0.0.2}",
        ))
        .unwrap();
        assert!(!labelled.is_proxied());
        let headless_label = ServiceInfo::from_k8s(&svc(
            "metadata: {name: x, labels: {service.kubernetes.io/headless: \"\"}}\nspec: {clusterIP: 10.0.0.3}",
        ))
        .unwrap();
        assert!(!headless_label.is_proxied());

        let unallocated =
            ServiceInfo::from_k8s(&svc("metadata: {name: x}\nspec: {ports: [{port: 1}]}")).unwrap();
        assert!(!unallocated.is_proxied());
    }

    #[test]
    fn dual_stack_and_policies() {
        let info = ServiceInfo::from_k8s(&svc(r#"
metadata: {name: web}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  externalTrafficPolicy: Local
  internalTrafficPolicy: Local
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, nodePort: 30080}, {name: dns, port: 53, protocol: UDP}]
status:
  loadBalancer:
    ingress: [{ip: 192.0.2.10}, {ip: 192.0.2.11, ipMode: Proxy}]
"#))
        .unwrap();
        assert_eq!(
            info.cluster_ip(IpFamily::V6),
            Some("fd00::10".parse().unwrap())
        );
        assert!(info.internal_policy_local && info.external_policy_local);
        assert_eq!(
            info.affinity_timeout_seconds,
            Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
        );
        assert_eq!(
            info.load_balancer_ips,
            vec!["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(info.ports[0].node_port, Some(30080));
        assert_eq!(info.ports[1].protocol, Protocol::Udp);
    }

    #[test]
    fn external_policy_local_only_for_externally_accessible_services() {
        let info = ServiceInfo::from_k8s(&svc(
            "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, externalTrafficPolicy: Local}",
        ))
        .unwrap();
        assert!(!info.external_policy_local);
    }

    #[test]
    fn invalid_services_name_the_problem() {
        let cases = [
            ("metadata: {}\nspec: {}", "metadata.name"),
            (
                "metadata: {name: \"a\\\" -j ACCEPT\"}\nspec: {}",
                "metadata.name",
            ),
            (
                "metadata: {name: a, namespace: \"Bad NS\"}\nspec: {}",
                "metadata.namespace",
            ),
            ("metadata: {name: a}", "spec is missing"),
            (
                "metadata: {name: a}\nspec: {clusterIP: 10.0.0.300}",
                "spec.clusterIPs",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 0}]}",
                "spec.ports[0].port",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 70000}]}",
                "spec.ports[0].port",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 1, protocol: ICMP}]}",
                "protocol",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 1, name: \"x y\"}]}",
                "spec.ports[0].name",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 1, name: a}, {port: 2, name: a}]}",
                "duplicate",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 1}, {port: 2, name: a}]}",
                "every port",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 53, name: a}, {port: 53, name: b}]}",
                "duplicate port 53/TCP",
            ),
            (
                "metadata: {name: a}\nspec: {clusterIP: 127.0.0.1}",
                "loopback",
            ),
            (
                "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, externalIPs: [169.254.169.254]}",
                "spec.externalIPs",
            ),
            (
                "metadata: {name: a}\nspec: {clusterIP: 10.0.0.1, externalIPs: [224.0.0.1]}",
                "multicast",
            ),
            (
                "metadata: {name: a}\nspec: {type: LoadBalancer, clusterIP: 10.0.0.1}\nstatus: {loadBalancer: {ingress: [{ip: 0.0.0.0}]}}",
                "status.loadBalancer.ingress[0].ip",
            ),
            (
                "metadata: {name: a}\nspec: {clusterIPs: [10.0.0.1, \"fe80::1\"]}",
                "link-local",
            ),
            ("metadata: {name: a}\nspec: {type: Weird}", "spec.type"),
            (
                "metadata: {name: a}\nspec: {type: ExternalName}",
                "externalName",
            ),
            (
                "metadata: {name: a}\nspec: {externalIPs: [nope]}",
                "spec.externalIPs",
            ),
            (
                "metadata: {name: a}\nspec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}",
                "timeoutSeconds",
            ),
            (
                "metadata: {name: a}\nspec: {clusterIPs: [10.0.0.1, 10.0.0.2]}",
                "one address per IP family",
            ),
        ];
        for (yaml, expected) in cases {
            let err = ServiceInfo::from_k8s(&svc(yaml))
                .expect_err(yaml)
                .to_string();
            assert!(
                err.contains(expected),
                "{yaml}: {err} should mention {expected}"
            );
        }
    }
}
