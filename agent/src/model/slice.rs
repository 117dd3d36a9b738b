//! An EndpointSlice, validated once into the endpoints and ports the model joins.

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::service::parse_ip;
use super::types::{IpFamily, Protocol};
use super::validate;

/// Label that ties a slice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
    /// All addresses; the data plane uses the first one (as kube-proxy does), DNS too.
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub hostname: Option<String>,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
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
    Invalid(String),
}

impl SliceInfo {
    /// Validates an EndpointSlice object.
    pub fn from_k8s(slice: &EndpointSlice) -> Result<Self, SliceRejection> {
        use SliceRejection::{Ignored, Invalid};
        let meta = &slice.metadata;
        let name = meta
            .name
            .as_deref()
            .ok_or_else(|| Invalid("metadata.name is missing".into()))?;
        validate::dns1123_subdomain(name).map_err(|e| Invalid(format!("metadata.name: {e}")))?;
        let namespace = meta.namespace.as_deref().unwrap_or("default");
        validate::dns1123_label(namespace)
            .map_err(|e| Invalid(format!("metadata.namespace: {e}")))?;
        let service = meta
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .ok_or_else(|| Ignored(format!("no {SERVICE_NAME_LABEL} label")))?;
        validate::dns1035_label(service)
            .map_err(|e| Invalid(format!("label {SERVICE_NAME_LABEL}: {e}")))?;
        let family = match slice.address_type.as_str() {
            "IPv4" => IpFamily::V4,
            "IPv6" => IpFamily::V6,
            "FQDN" => return Err(Ignored("addressType FQDN is not proxied".into())),
            other => return Err(Invalid(format!("addressType: unknown value {other:?}"))),
        };

        let mut ports = Vec::new();
        for (i, port) in slice.ports.iter().flatten().enumerate() {
            let port_name = port.name.clone().unwrap_or_default();
            if !port_name.is_empty() {
                validate::port_name(&port_name)
                    .map_err(|e| Invalid(format!("ports[{i}].name: {e}")))?;
            }
            let protocol = Protocol::from_k8s(port.protocol.as_deref())
                .map_err(|e| Invalid(format!("ports[{i}].protocol: {e}")))?;
            // A port without a number means "all ports" to the API; kube-proxy ignores it.
            let Some(number) = port.port else { continue };
            let number = match u16::try_from(number) {
                Ok(n) if n > 0 => n,
                _ => {
                    return Err(Invalid(format!(
                        "ports[{i}].port: {number} is not a valid port"
                    )));
                }
            };
            ports.push(SlicePort {
                name: port_name,
                protocol,
                port: number,
            });
        }

        let mut endpoints = Vec::with_capacity(slice.endpoints.len());
        for (i, ep) in slice.endpoints.iter().enumerate() {
            if ep.addresses.is_empty() {
                return Err(Invalid(format!("endpoints[{i}]: no addresses")));
            }
            let mut addresses = Vec::with_capacity(ep.addresses.len());
            for addr in &ep.addresses {
                let ip = parse_ip(addr).map_err(|e| Invalid(format!("endpoints[{i}]: {e}")))?;
                if IpFamily::of(&ip) != family {
                    return Err(Invalid(format!(
                        "endpoints[{i}]: address {addr} is not {family}"
                    )));
                }
                addresses.push(ip);
            }
            if let Some(hostname) = ep.hostname.as_deref() {
                validate::dns1123_label(hostname)
                    .map_err(|e| Invalid(format!("endpoints[{i}].hostname: {e}")))?;
            }
            if let Some(node) = ep.node_name.as_deref() {
                validate::dns1123_subdomain(node)
                    .map_err(|e| Invalid(format!("endpoints[{i}].nodeName: {e}")))?;
            }
            let conditions = ep.conditions.as_ref();
            let hints = ep.hints.as_ref();
            endpoints.push(EndpointInfo {
                addresses,
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
            });
        }

        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service: service.clone(),
            family,
            ports,
            endpoints,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(yaml: &str) -> EndpointSlice {
        serde_yaml::from_str(yaml).expect("test yaml")
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
                    assert!(e.contains(expected), "{e} vs {expected}")
                }
                other => panic!("{yaml}: expected invalid, got {other:?}"),
            }
        }
    }
}
