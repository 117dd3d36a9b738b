//! The DNS records of one Service, as the Kubernetes DNS-Based Service Discovery
//! specification (schema 1.1.0) defines them. Pure: service + slices in, records out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::service::ServicePortSpec;
use crate::model::{
    ClusterDomain, IpFamily, Protocol, ServiceInfo, ServiceType, SliceInfo, endpoints,
};

/// An SRV record's data.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// Fully qualified, lower case, trailing dot.
    pub target: String,
}

/// What one name holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameData {
    pub addresses: Vec<IpAddr>,
    pub srv: Vec<Srv>,
    /// ExternalName target, fully qualified.
    pub cname: Option<String>,
}

/// All records a service contributes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRecords {
    /// Owner name (lower case, trailing dot) -> data.
    pub names: BTreeMap<String, NameData>,
    /// Reverse records: address -> name it points to.
    pub ptrs: Vec<(IpAddr, String)>,
}

/// The label a headless endpoint without `hostname` gets: its address with dashes
/// (`10-244-0-5`, `fd00-244--5`), as CoreDNS names them.
pub fn dashed(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn proto_label(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "_tcp",
        Protocol::Udp => "_udp",
        Protocol::Sctp => "_sctp",
    }
}

/// The records of `svc` in `zone`, given its slices.
pub fn service_records(
    svc: &ServiceInfo,
    slices: &[&SliceInfo],
    zone: &ClusterDomain,
) -> ServiceRecords {
    let base = format!("{}.{}.svc.{zone}.", svc.name.name, svc.name.namespace);
    match &svc.service_type {
        ServiceType::ExternalName(target) => {
            let mut out = ServiceRecords::default();
            let cname = Some(format!("{}.", target.trim_end_matches('.')));
            out.names.insert(
                base,
                NameData {
                    cname,
                    ..NameData::default()
                },
            );
            out
        }
        _ if svc.headless => headless_records(svc, slices, base),
        _ => {
            let mut out = cluster_ip_records(svc, base.clone());
            out.ptrs.extend(endpoint_ptrs(svc, slices, &base));
            out
        }
    }
}

/// A ClusterIP service: its addresses, an SRV per named port, PTRs for its IPs.
fn cluster_ip_records(svc: &ServiceInfo, base: String) -> ServiceRecords {
    let mut out = ServiceRecords::default();
    if svc.cluster_ips.is_empty() {
        return out;
    }
    let mut addresses = svc.cluster_ips.clone();
    addresses.sort();
    for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
        let srv = vec![Srv {
            priority: 0,
            weight: 100,
            port: port.port,
            target: base.clone(),
        }];
        out.names
            .insert(srv_name(&port.name, port.protocol, &base), srv_data(srv));
    }
    out.ptrs = svc
        .cluster_ips
        .iter()
        .map(|ip| (*ip, base.clone()))
        .collect();
    out.names.insert(
        base,
        NameData {
            addresses,
            ..NameData::default()
        },
    );
    out
}

/// Reverse records of a ClusterIP service's endpoints: `<hostname or dashed
/// address>.<service>.<ns>.svc.<zone>`, as CoreDNS answers a pod address's PTR.
fn endpoint_ptrs(svc: &ServiceInfo, slices: &[&SliceInfo], base: &str) -> Vec<(IpAddr, String)> {
    let mut out = Vec::new();
    for ep in endpoints::dns_published(svc, slices) {
        for ip in ep.addresses() {
            let label = ep.hostname.clone().unwrap_or_else(|| dashed(&ip));
            if !out.iter().any(|(seen, _)| *seen == ip) {
                out.push((ip, format!("{label}.{base}")));
            }
        }
    }
    out
}

/// A headless service: one record per published endpoint address, a name per
/// endpoint (its hostname or dashed address), SRV per endpoint x named port.
fn headless_records(svc: &ServiceInfo, slices: &[&SliceInfo], base: String) -> ServiceRecords {
    let mut out = ServiceRecords::default();
    let mut endpoints: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for ep in endpoints::dns_published(svc, slices) {
        let label = ep.hostname.clone().unwrap_or_else(|| dashed(&ep.address()));
        let ips = endpoints.entry(label).or_default();
        for ip in ep.addresses() {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
    }
    if endpoints.is_empty() {
        return out;
    }
    let mut all: Vec<IpAddr> = endpoints.values().flatten().copied().collect();
    all.sort();
    all.dedup();
    for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
        let srv = endpoint_srvs(port, slices, &endpoints, &base);
        out.names
            .insert(srv_name(&port.name, port.protocol, &base), srv_data(srv));
    }
    for (label, ips) in endpoints {
        let name = format!("{label}.{base}");
        out.ptrs.extend(ips.iter().map(|ip| (*ip, name.clone())));
        out.names.insert(
            name,
            NameData {
                addresses: ips,
                ..NameData::default()
            },
        );
    }
    out.names.insert(
        base,
        NameData {
            addresses: all,
            ..NameData::default()
        },
    );
    out
}

/// The SRV records of one named port of a headless service: one per endpoint name,
/// with the endpoints' port number for it (from the slices of the endpoint's family).
fn endpoint_srvs(
    port: &ServicePortSpec,
    slices: &[&SliceInfo],
    endpoints: &BTreeMap<String, Vec<IpAddr>>,
    base: &str,
) -> Vec<Srv> {
    let number = |family: IpFamily| {
        slices
            .iter()
            .filter(|s| s.family == family)
            .find_map(|s| s.port(&port.name, port.protocol))
    };
    let weight = (100 / endpoints.len()).max(1) as u16;
    endpoints
        .iter()
        .map(|(label, ips)| Srv {
            priority: 0,
            weight,
            port: ips
                .first()
                .and_then(|ip| number(IpFamily::of(ip)))
                .unwrap_or(port.port),
            target: format!("{label}.{base}"),
        })
        .collect()
}

/// `_port._proto.<base>`.
fn srv_name(port: &str, protocol: Protocol, base: &str) -> String {
    format!("_{port}.{}.{base}", proto_label(protocol))
}

fn srv_data(srv: Vec<Srv>) -> NameData {
    NameData {
        srv,
        ..NameData::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn svc(yaml: &str) -> ServiceInfo {
        ServiceInfo::from_k8s(&serde_saphyr::from_str::<Service>(yaml).unwrap()).unwrap()
    }

    fn slice(yaml: &str) -> SliceInfo {
        SliceInfo::from_k8s(&serde_saphyr::from_str::<EndpointSlice>(yaml).unwrap()).unwrap()
    }

    #[test]
    fn cluster_ip_service() {
        let s = svc(
            "metadata: {name: web, namespace: ns}\nspec: {clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: http, port: 80}, {port: 81, name: h2, protocol: UDP}]}",
        );
        let r = service_records(&s, &[], &ClusterDomain::default());
        let base = "web.ns.svc.cluster.local.";
        assert_eq!(r.names[base].addresses.len(), 2);
        let srv = &r.names["_http._tcp.web.ns.svc.cluster.local."].srv;
        assert_eq!(
            srv,
            &[Srv {
                priority: 0,
                weight: 100,
                port: 80,
                target: base.into()
            }]
        );
        assert!(r.names.contains_key("_h2._udp.web.ns.svc.cluster.local."));
        assert_eq!(r.ptrs.len(), 2);
    }

    #[test]
    fn unnamed_ports_have_no_srv() {
        let s = svc(
            "metadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}",
        );
        let r = service_records(&s, &[], &ClusterDomain::default());
        assert_eq!(r.names.len(), 1);
    }

    #[test]
    fn headless_service_lists_ready_endpoints() {
        let s = svc(
            "metadata: {name: db, namespace: ns}\nspec: {clusterIP: None, ports: [{name: pg, port: 5432}]}",
        );
        let sl = slice(
            r#"
metadata: {name: db-1, namespace: ns, labels: {kubernetes.io/service-name: db}}
addressType: IPv4
ports: [{name: pg, port: 15432}]
endpoints:
  - {addresses: [10.0.0.1], hostname: db-0}
  - {addresses: [10.0.0.2]}
  - {addresses: [10.0.0.3], conditions: {ready: false}}
"#,
        );
        let r = service_records(&s, &[&sl], &ClusterDomain::default());
        let base = "db.ns.svc.cluster.local.";
        assert_eq!(
            r.names[base].addresses,
            [
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "10.0.0.2".parse().unwrap()
            ]
        );
        assert!(r.names.contains_key("db-0.db.ns.svc.cluster.local."));
        assert!(r.names.contains_key("10-0-0-2.db.ns.svc.cluster.local."));
        let srv = &r.names["_pg._tcp.db.ns.svc.cluster.local."].srv;
        assert_eq!(srv.len(), 2);
        assert!(srv.iter().all(|s| s.port == 15432));
        assert_eq!(r.ptrs.len(), 2);

        // publishNotReadyAddresses counts the unready one.
        let s = svc(
            "metadata: {name: db, namespace: ns}\nspec: {clusterIP: None, publishNotReadyAddresses: true}",
        );
        let r = service_records(&s, &[&sl], &ClusterDomain::default());
        assert_eq!(r.names[base].addresses.len(), 3);
    }

    #[test]
    fn headless_without_ready_endpoints_has_no_names() {
        let s = svc("metadata: {name: db, namespace: ns}\nspec: {clusterIP: None}");
        let r = service_records(&s, &[], &ClusterDomain::default());
        assert!(r.names.is_empty());
    }

    #[test]
    fn external_name_is_a_cname() {
        let s = svc(
            "metadata: {name: ext, namespace: ns}\nspec: {type: ExternalName, externalName: Search.Example.com}",
        );
        let r = service_records(&s, &[], &ClusterDomain::default());
        assert_eq!(
            r.names["ext.ns.svc.cluster.local."].cname.as_deref(),
            Some("search.example.com.")
        );
    }

    #[test]
    fn dashed_addresses() {
        assert_eq!(dashed(&"10.244.0.5".parse().unwrap()), "10-244-0-5");
        assert_eq!(dashed(&"fd00:244::5".parse().unwrap()), "fd00-244--5");
    }
}
