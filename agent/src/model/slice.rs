//! An EndpointSlice, validated once into the endpoints and ports the model joins.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};

use super::service::parse_ip;
use super::types::{IpFamily, Protocol};
use super::validate::{self, At, ValidationError};

/// Label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Annotation the EndpointSlice controller sets to when the change behind a slice
/// happened (a pod turning ready, say): kube-proxy's network programming latency
/// starts there.
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// When the change behind this slice happened, and the slice's family: `None` for a
/// slice without the annotation, with an unparseable one, or of FQDN addresses.
pub fn last_change_trigger_time(slice: &EndpointSlice) -> Option<(IpFamily, jiff::Timestamp)> {
    let family = match slice.address_type.as_str() {
        "IPv4" => IpFamily::V4,
        "IPv6" => IpFamily::V6,
        _ => return None,
    };
    let value = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    Some((family, value.parse().ok()?))
}

/// One entry of a slice's `ports`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// One endpoint with its conditions resolved to booleans as kube-proxy does
/// (nil ready = true, nil serving = true, nil terminating = false).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// The first address: the one the data plane uses, as kube-proxy does.
    address: IpAddr,
    /// Any further addresses (DNS publishes them too).
    more_addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

impl EndpointInfo {
    /// The address traffic goes to (the first one listed; an endpoint always has one).
    pub fn address(&self) -> IpAddr {
        self.address
    }

    /// Every address, the first one first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.address).chain(self.more_addresses.iter().copied())
    }
}

/// The validated facts of one EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: String,
    pub name: String,
    /// The service it belongs to, from the `kubernetes.io/service-name` label.
    pub service: String,
    pub family: IpFamily,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointInfo>,
}

/// Why a slice is not used. `Ignored` slices are legal objects the model has no use for
/// (FQDN slices, slices of no service); `Invalid` ones are broken input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SliceRejection {
    Ignored(String),
    Invalid(ValidationError),
}

impl From<ValidationError> for SliceRejection {
    fn from(err: ValidationError) -> Self {
        Self::Invalid(err)
    }
}

impl SliceInfo {
    /// Validates an EndpointSlice object.
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Self, SliceRejection> {
        let meta = &slice.metadata;
        let name = meta
            .name
            .as_deref()
            .ok_or_else(|| ValidationError::missing("metadata.name"))?;
        validate::dns1123_subdomain(name).at("metadata.name")?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        validate::dns1123_label(namespace).at("metadata.namespace")?;
        let service = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .ok_or_else(|| SliceRejection::Ignored(format!("no {SERVICE_NAME_LABEL} label")))?;
        validate::dns1035_label(service).at(format!("label {SERVICE_NAME_LABEL}"))?;
        let family = match slice.address_type.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            "FQDN" => {
                return Err(SliceRejection::Ignored(
                    "addressType FQDN is not proxied".into(),
                ));
            }
            other => {
                let reason = format!("unknown value {other:?}");
                return Err(ValidationError::invalid("addressType", reason).into());
            }
        };
        let mut ports = Vec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            ports.extend(slice_port(port, &format!("ports[{i}]"))?);
        }
        let endpoints = slice
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, ep)| endpoint_info(ep, family, &format!("endpoints[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service: service.clone(),
            family,
            ports,
            endpoints,
        })
    }

    /// The port number this slice gives the service port `name`/`protocol`: the join
    /// of a Service's ports with its slices' ports (by name and protocol).
    pub fn port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

/// One entry of `ports`; `None` for a port without a number ("all ports" to the
/// API, which kube-proxy ignores).
fn slice_port(port: &EndpointPort, field: &str) -> Result<Option<SlicePort>, ValidationError> {
    let name = port.name.clone().unwrap_or_default();
    if !name.is_empty() {
        validate::port_name(&name).at(format!("{field}.name"))?;
    }
    let protocol = Protocol::from_k8s(port.protocol.as_deref()).at(format!("{field}.protocol"))?;
    let Some(number) = port.port else {
        return Ok(None);
    };
    let number = match u16::try_from(number) {
        Ok(n) if n > 0 => n,
        _ => {
            let reason = format!("{number} is not a valid port");
            return Err(ValidationError::invalid(format!("{field}.port"), reason));
        }
    };
    Ok(Some(SlicePort {
        name,
        protocol,
        port: number,
    }))
}

/// One entry of `endpoints`, whose addresses must all be of the slice's family.
fn endpoint_info(
    ep: &Endpoint,
    family: IpFamily,
    field: &str,
) -> Result<EndpointInfo, ValidationError> {
    let mut addresses = Vec::with_capacity(ep.addresses.len());
    for addr in &ep.addresses {
        let ip = parse_ip(addr).at(field)?;
        if IpFamily::of(&ip) != family {
            let reason = format!("address {addr} is not {family}");
            return Err(ValidationError::invalid(field, reason));
        }
        addresses.push(ip);
    }
    let Some((&address, more)) = addresses.split_first() else {
        return Err(ValidationError::invalid(field, "no addresses"));
    };
    if let Some(hostname) = ep.hostname.as_deref() {
        validate::dns1123_label(hostname).at(format!("{field}.hostname"))?;
    }
    if let Some(node) = ep.node_name.as_deref() {
        validate::dns1123_subdomain(node).at(format!("{field}.nodeName"))?;
    }
    let conditions = ep.conditions.as_ref();
    let hints = ep.hints.as_ref();
    Ok(EndpointInfo {
        address,
        more_addresses: more.to_vec(),
        ready: conditions.and_then(|c| c.ready).unwrap_or(true),
        serving: conditions.and_then(|c| c.serving).unwrap_or(true),
        terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
        hostname: ep.hostname.clone(),
        node_name: ep.node_name.clone(),
        zone: ep.zone.clone(),
        zone_hints: hints
            .and_then(|h| h.for_zones.as_ref())
            .map(|z| z.iter().map(|z| z.name.clone()).collect())
            .unwrap_or_default(),
        node_hints: hints
            .and_then(|h| h.for_nodes.as_ref())
            .map(|n| n.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn trigger_time_comes_from_the_annotation() {
        let with = |annotations: &str, address_type: &str| {
            let yaml = format!(
                "metadata: {{name: a, annotations: {{{annotations}}}}}\naddressType: {address_type}\nendpoints: []"
            );
            let slice: super::EndpointSlice = serde_saphyr::from_str(&yaml).unwrap();
            super::last_change_trigger_time(&slice)
        };
        let key = super::LAST_CHANGE_TRIGGER_TIME;
        let (family, at) = with(&format!("{key}: '2026-12-01T10:00:00.5Z'"), "IPv6").unwrap();
        assert_eq!(family, super::IpFamily::V6);
        assert_eq!(at.to_string(), "2026-12-01T10:00:00.5Z");
        assert_eq!(with(&format!("{key}: yesterday"), "IPv4"), None);
        assert_eq!(with("", "IPv4"), None);
        assert_eq!(
            with(&format!("{key}: '2026-12-01T10:00:00Z'"), "FQDN"),
            None
        );
    }

    use super::*;

    fn slice(yaml: &str) -> EndpointSlice {
        serde_saphyr::from_str(yaml).expect("test yaml")
    }

    #[test]
    fn conditions_default_like_kube_proxy() {
        let info = SliceInfo::from_k8s(&slice(
            r#"
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: all}]
endpoints:
  - addresses: [10.0.0.1]
  - addresses: [10.0.0.2]
    conditions: {ready: false, serving: true, terminating: true}
    nodeName: node-a
    hints: {forZones: [{name: z1}], forNodes: [{name: node-a}]}
"#,
        ))
        .unwrap();
        assert_eq!(info.service, "web");
        assert_eq!(info.ports.len(), 1, "a port without a number is dropped");
        let a = &info.endpoints[0];
        assert!(a.ready && a.serving && !a.terminating);
        let b = &info.endpoints[1];
        assert!(!b.ready && b.serving && b.terminating);
        assert_eq!(b.zone_hints, vec!["z1".to_string()]);
        assert_eq!(b.node_hints, vec!["node-a".to_string()]);
    }

    #[test]
    fn fqdn_and_orphan_slices_are_ignored_not_invalid() {
        let fqdn = slice(
            "metadata: {name: a, labels: {kubernetes.io/service-name: s}}\naddressType: FQDN\nendpoints: []",
        );
        assert!(matches!(
            SliceInfo::from_k8s(&fqdn),
            Err(SliceRejection::Ignored(_))
        ));
        let orphan = slice("metadata: {name: a}\naddressType: IPv4\nendpoints: []");
        assert!(matches!(
            SliceInfo::from_k8s(&orphan),
            Err(SliceRejection::Ignored(_))
        ));
    }

    #[test]
    fn invalid_slices_name_the_problem() {
        let cases = [
            (
                "addressType: IPv4\nendpoints: [{addresses: [fd00::1]}]",
                "is not IPv4",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: [bogus]}]",
                "invalid IP",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: []}]",
                "no addresses",
            ),
            ("addressType: IPv9\nendpoints: []", "addressType"),
            (
                "addressType: IPv4\nports: [{port: 0}]\nendpoints: []",
                "ports[0].port",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1], hostname: \"A B\"}]",
                "hostname",
            ),
        ];
        for (body, expected) in cases {
            let yaml =
                format!("metadata: {{name: a, labels: {{kubernetes.io/service-name: s}}}}\n{body}");
            match SliceInfo::from_k8s(&slice(&yaml)) {
                Err(SliceRejection::Invalid(e)) => {
                    let e = e.to_string();
                    assert!(e.contains(expected), "{e} vs {expected}")
                }
                other => panic!("{yaml}: expected invalid, got {other:?}"),
            }
        }
    }
}
