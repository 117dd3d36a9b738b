//! The DNS records of one Service, as the Kubernetes DNS-Based Service Discovery
//! specification (schema 1.1.0) defines them. Pure: service + slices in, records out.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::{IpFamily, Protocol, ServiceInfo, ServiceType, SliceInfo};

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

/// The records of `svc` in `zone` (e.g. `cluster.local`), given its slices.
pub fn service_records(svc: &ServiceInfo, slices: &[&SliceInfo], zone: &str) -> ServiceRecords {
    let mut out = ServiceRecords::default();
    let base = format!("{}.{}.svc.{zone}.", svc.name.name, svc.name.namespace);

    if let ServiceType::ExternalName(target) = &svc.service_type {
        out.names.insert(
            base,
            NameData {
                cname: Some(format!("{}.", target.trim_end_matches('.'))),
                ..NameData::default()
            },
        );
        return out;
    }

    if !svc.headless {
        if svc.cluster_ips.is_empty() {
            return out;
        }
        let mut data = NameData {
            addresses: svc.cluster_ips.clone(),
            ..NameData::default()
        };
        data.addresses.sort();
        out.names.insert(base.clone(), data);
        for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            out.names.insert(
                format!("_{}.{}.{base}", port.name, proto_label(port.protocol)),
                NameData {
                    srv: vec![Srv {
                        priority: 0,
                        weight: 100,
                        port: port.port,
                        target: base.clone(),
                    }],
                    ..NameData::default()
                },
            );
        }
        for ip in &svc.cluster_ips {
            out.ptrs.push((*ip, base.clone()));
        }
        return out;
    }

    // Headless: one record per ready endpoint address (or every endpoint with
    // publishNotReadyAddresses), a name per endpoint, SRV per endpoint x named port.
    let mut endpoints: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for slice in slices {
        for ep in &slice.endpoints {
            if !(ep.ready || svc.publish_not_ready_addresses) {
                continue;
            }
            let label = ep
                .hostname
                .clone()
                .unwrap_or_else(|| dashed(&ep.addresses[0]));
            let ips = endpoints.entry(label).or_default();
            for ip in &ep.addresses {
                if !ips.contains(ip) {
                    ips.push(*ip);
                }
            }
        }
    }
    if endpoints.is_empty() {
        return out;
    }
    let mut all: Vec<IpAddr> = endpoints.values().flatten().copied().collect();
    all.sort();
    all.dedup();
    out.names.insert(
        base.clone(),
        NameData {
            addresses: all,
            ..NameData::default()
        },
    );
    for (label, ips) in &endpoints {
        let name = format!("{label}.{base}");
        for ip in ips {
            out.ptrs.push((*ip, name.clone()));
        }
        out.names.insert(
            name,
            NameData {
                addresses: ips.clone(),
                ..NameData::default()
            },
        );
    }
    for port in svc.ports.iter().filter(|p| !p.name.is_empty()) {
        // The endpoints' port number for this port (from the slices), per family.
        let number = |family: IpFamily| {
            slices
                .iter()
                .filter(|s| s.family == family)
                .flat_map(|s| &s.ports)
                .find(|p| p.name == port.name && p.protocol == port.protocol)
                .map(|p| p.port)
        };
        let weight = (100 / endpoints.len()).max(1) as u16;
        let srv = endpoints
            .iter()
            .map(|(label, ips)| Srv {
                priority: 0,
                weight,
                port: number(IpFamily::of(&ips[0])).unwrap_or(port.port),
                target: format!("{label}.{base}"),
            })
            .collect();
        out.names.insert(
            format!("_{}.{}.{base}", port.name, proto_label(port.protocol)),
            NameData {
                srv,
                ..NameData::default()
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    fn svc(yaml: &str) -> ServiceInfo {
        ServiceInfo::from_k8s(&serde_yaml::from_str::<Service>(yaml).unwrap()).unwrap()
    }

    fn slice(yaml: &str) -> SliceInfo {
        SliceInfo::from_k8s(&serde_yaml::from_str::<EndpointSlice>(yaml).unwrap()).unwrap()
    }

    #[test]
    fn cluster_ip_service() {
        let s = svc(
            "metadata: {name: web, namespace: ns}\nspec: {clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: http, port: 80}, {port: 81, name: h2, protocol: UDP}]}",
        );
        let r = service_records(&s, &[], "cluster.local");
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
        let r = service_records(&s, &[], "cluster.local");
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
        let r = service_records(&s, &[&sl], "cluster.local");
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
        let r = service_records(&s, &[&sl], "cluster.local");
        assert_eq!(r.names[base].addresses.len(), 3);
    }

    #[test]
    fn headless_without_ready_endpoints_has_no_names() {
        let s = svc("metadata: {name: db, namespace: ns}\nspec: {clusterIP: None}");
        let r = service_records(&s, &[], "cluster.local");
        assert!(r.names.is_empty());
    }

    #[test]
    fn external_name_is_a_cname() {
        let s = svc(
            "metadata: {name: ext, namespace: ns}\nspec: {type: ExternalName, externalName: Search.Example.com}",
        );
        let r = service_records(&s, &[], "cluster.local");
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
