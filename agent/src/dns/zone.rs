//! The cluster zone, indexed for lookups and updated per service: a change to one
//! service replaces exactly the names it contributes, so DNS follows the model within
//! microseconds of an event, at any cluster size.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::records::{NameData, ServiceRecords, Srv};
use crate::model::{ClusterDomain, ServiceName};

/// Schema version of the Kubernetes DNS specification implemented.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// Record types the zone answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    A,
    Aaaa,
    Srv,
    Cname,
    Ptr,
    Txt,
    Soa,
    Ns,
    Any,
    Other,
}

/// One record of an answer. `owner: None` is the queried name (answers echo the
/// question's spelling); additional records name their owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rec {
    Addr {
        owner: Option<String>,
        ip: IpAddr,
    },
    Srv {
        owner: Option<String>,
        srv: Srv,
    },
    Cname {
        owner: Option<String>,
        target: String,
    },
    Ptr {
        owner: Option<String>,
        target: String,
    },
    Txt {
        owner: Option<String>,
        text: String,
    },
    Soa {
        owner: Option<String>,
    },
    Ns {
        owner: Option<String>,
        target: String,
    },
}

/// How the zone answers a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Answer {
        answers: Vec<Rec>,
        additionals: Vec<Rec>,
    },
    /// The name exists without records of that type.
    NoData,
    NxDomain,
    /// The source has not delivered a complete view yet: no authoritative answers.
    NotSynced,
    /// Not in the cluster zone (or a reverse name the cluster does not know): forward.
    Elsewhere,
}

/// The index.
#[derive(Debug)]
pub struct Zone {
    /// Lower case, trailing dot (`cluster.local.`).
    apex: String,
    synced: bool,
    names: HashMap<String, Arc<NameData>>,
    /// Empty non-terminals (ancestors of names inside the zone) with reference counts.
    ents: HashMap<String, u32>,
    ptrs: HashMap<IpAddr, Vec<(ServiceName, String)>>,
    /// What each service put in, so an update replaces exactly that.
    contributed: HashMap<ServiceName, ServiceRecords>,
    /// Answer `a-b-c-d.NAMESPACE.pod.ZONE` (CoreDNS's `pods insecure`).
    pod_records: bool,
}

impl Zone {
    /// An empty zone for `domain` (e.g. `cluster.local`).
    pub fn new(domain: &ClusterDomain) -> Self {
        Self {
            apex: domain.apex(),
            synced: false,
            names: HashMap::new(),
            ents: HashMap::new(),
            ptrs: HashMap::new(),
            contributed: HashMap::new(),
            pod_records: false,
        }
    }

    /// Answers pod names from the address in them (`--dns-pods insecure`).
    pub fn with_pod_records(mut self, on: bool) -> Self {
        self.pod_records = on;
        self
    }

    /// Whether `qname` (lower case, trailing dot) is this zone's to answer: in the
    /// cluster domain (label by label) or a reverse name.
    pub fn covers(apex: &str, qname: &str) -> bool {
        super::stub_domains::in_zone(qname, apex) || reverse_name(qname).is_some()
    }

    /// The source delivered its first complete view: answer authoritatively.
    pub fn set_synced(&mut self) {
        self.synced = true;
    }

    /// Whether the model was complete once (authoritative answers).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Replaces what `service` contributes (`None`: it is gone).
    pub fn update(&mut self, service: &ServiceName, records: Option<ServiceRecords>) {
        if let Some(old) = self.contributed.remove(service) {
            for name in old.names.keys() {
                self.names.remove(name);
                self.ents_change(name, false);
            }
            for (ip, _) in &old.ptrs {
                if let Some(list) = self.ptrs.get_mut(ip) {
                    list.retain(|(s, _)| s != service);
                    if list.is_empty() {
                        self.ptrs.remove(ip);
                    }
                }
            }
        }
        let Some(records) = records else { return };
        for (name, data) in &records.names {
            self.names.insert(name.clone(), Arc::new(data.clone()));
            self.ents_change(name, true);
        }
        for (ip, target) in &records.ptrs {
            // Kept sorted: an address several services claim (a manifest directory
            // checks no uniqueness) answers with the first by namespace, name and
            // target, whatever order the services arrived in (found by fuzzing).
            let list = self.ptrs.entry(*ip).or_default();
            let entry = (service.clone(), target.clone());
            let at = list.partition_point(|e| *e < entry);
            list.insert(at, entry);
        }
        self.contributed.insert(service.clone(), records);
    }

    fn ents_change(&mut self, name: &str, add: bool) {
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if parent.len() <= self.apex.len() || !parent.ends_with(&self.apex) {
                break;
            }
            if add {
                *self.ents.entry(parent.to_owned()).or_default() += 1;
            } else if let Some(n) = self.ents.get_mut(parent) {
                *n -= 1;
                if *n == 0 {
                    self.ents.remove(parent);
                }
            }
            rest = parent;
        }
    }

    /// Number of names (for logs and metrics).
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the zone holds no names.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Answers `qname` (lower case, trailing dot).
    pub fn lookup(&self, qname: &str, qtype: QType) -> Outcome {
        if let Some(ip) = reverse_name(qname) {
            return self.reverse_lookup(ip, qtype);
        }
        if !super::stub_domains::in_zone(qname, &self.apex) {
            return Outcome::Elsewhere;
        }
        if !self.synced {
            return Outcome::NotSynced;
        }
        if let Some(outcome) = self.fixed_name(qname, qtype) {
            return outcome;
        }
        if let Some(outcome) = self.pod_name(qname, qtype) {
            return outcome;
        }
        match self.names.get(qname) {
            Some(data) => self.answer(data, qtype),
            None => {
                let exists = self.ents.contains_key(qname)
                    || qname == format!("svc.{}", self.apex)
                    || qname == format!("ns.dns.{}", self.apex);
                if exists {
                    Outcome::NoData
                } else {
                    Outcome::NxDomain
                }
            }
        }
    }

    /// A PTR question for `ip`.
    fn reverse_lookup(&self, ip: IpAddr, qtype: QType) -> Outcome {
        match self.ptrs.get(&ip).and_then(|l| l.first()) {
            Some((_, target)) if matches!(qtype, QType::Ptr | QType::Any) => Outcome::Answer {
                answers: vec![Rec::Ptr {
                    owner: None,
                    target: target.clone(),
                }],
                additionals: Vec::new(),
            },
            Some(_) if self.synced => Outcome::NoData,
            Some(_) => Outcome::NotSynced,
            None => Outcome::Elsewhere,
        }
    }

    /// The names every cluster zone has: the apex (SOA, NS) and `dns-version` (TXT).
    fn fixed_name(&self, qname: &str, qtype: QType) -> Option<Outcome> {
        if qname == self.apex {
            return Some(match qtype {
                QType::Soa | QType::Any => single(Rec::Soa { owner: None }),
                QType::Ns => single(Rec::Ns {
                    owner: None,
                    target: format!("ns.dns.{}", self.apex),
                }),
                _ => Outcome::NoData,
            });
        }
        if qname == format!("dns-version.{}", self.apex) {
            return Some(match qtype {
                QType::Txt | QType::Any => single(Rec::Txt {
                    owner: None,
                    text: SCHEMA_VERSION.into(),
                }),
                _ => Outcome::NoData,
            });
        }
        None
    }

    /// `a-b-c-d.NAMESPACE.pod.ZONE` (IPv6: `fd00-244--5`): the address in the name,
    /// unchecked, as CoreDNS's `pods insecure` answers it.
    fn pod_name(&self, qname: &str, qtype: QType) -> Option<Outcome> {
        if !self.pod_records {
            return None;
        }
        let rest = qname.strip_suffix(&format!(".pod.{}", self.apex))?;
        let (label, namespace) = rest.split_once('.')?;
        if namespace.is_empty() || namespace.contains('.') {
            return None;
        }
        let ip = pod_address(label)?;
        let wanted = match ip {
            IpAddr::V4(_) => matches!(qtype, QType::A | QType::Any),
            IpAddr::V6(_) => matches!(qtype, QType::Aaaa | QType::Any),
        };
        Some(if wanted {
            single(Rec::Addr { owner: None, ip })
        } else {
            Outcome::NoData
        })
    }

    /// The records of one name of a service for `qtype`, with the SRV targets'
    /// addresses as additionals.
    fn answer(&self, data: &NameData, qtype: QType) -> Outcome {
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        if let Some(target) = &data.cname {
            // A CNAME answers every type at its name; the client follows it.
            answers.push(Rec::Cname {
                owner: None,
                target: target.clone(),
            });
        }
        let want_v4 = matches!(qtype, QType::A | QType::Any);
        let want_v6 = matches!(qtype, QType::Aaaa | QType::Any);
        let wanted = data
            .addresses
            .iter()
            .filter(|ip| (ip.is_ipv4() && want_v4) || (ip.is_ipv6() && want_v6));
        answers.extend(wanted.map(|ip| Rec::Addr {
            owner: None,
            ip: *ip,
        }));
        if matches!(qtype, QType::Srv | QType::Any) {
            for srv in &data.srv {
                answers.push(Rec::Srv {
                    owner: None,
                    srv: srv.clone(),
                });
                let target = self.names.get(&srv.target).into_iter();
                additionals.extend(target.flat_map(|t| &t.addresses).map(|ip| Rec::Addr {
                    owner: Some(srv.target.clone()),
                    ip: *ip,
                }));
            }
        }
        if answers.is_empty() {
            Outcome::NoData
        } else {
            Outcome::Answer {
                answers,
                additionals,
            }
        }
    }
}

fn single(rec: Rec) -> Outcome {
    Outcome::Answer {
        answers: vec![rec],
        additionals: Vec::new(),
    }
}

/// The address in a pod name's first label: `10-244-0-5`, or IPv6 with dashes for
/// colons (`fd00-244--5`).
fn pod_address(label: &str) -> Option<IpAddr> {
    if label.matches('-').count() == 3
        && let Ok(v4) = label.replace('-', ".").parse::<Ipv4Addr>()
    {
        return Some(IpAddr::V4(v4));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// The address a reverse name (`4.3.2.1.in-addr.arpa.`, full-nibble `ip6.arpa.`)
/// stands for.
pub fn reverse_name(qname: &str) -> Option<IpAddr> {
    if let Some(rest) = qname.strip_suffix(".in-addr.arpa.") {
        let octets: Vec<u8> = rest
            .split('.')
            .map(|o| o.parse().ok())
            .collect::<Option<Vec<u8>>>()?;
        if octets.len() != 4 {
            return None;
        }
        return Some(IpAddr::V4(Ipv4Addr::new(
            octets[3], octets[2], octets[1], octets[0],
        )));
    }
    let rest = qname.strip_suffix(".ip6.arpa.")?;
    let nibbles: Vec<u8> = rest
        .split('.')
        .map(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 1))
        .collect::<Option<Vec<u8>>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles.rchunks(2).enumerate() {
        bytes[i] = (pair[1] << 4) | pair[0];
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

/// The reverse name of an address: the inverse of [`reverse_name`] (tests and the
/// fuzz targets ask PTR questions with it).
pub fn reverse_of(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::new();
            for b in v6.octets().iter().rev() {
                s.push_str(&format!("{:x}.{:x}.", b & 0xf, b >> 4));
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::records::service_records;
    use crate::model::ServiceInfo;

    fn zone_with(yaml: &str) -> Zone {
        let svc: k8s_openapi::api::core::v1::Service = serde_saphyr::from_str(yaml).unwrap();
        let info = ServiceInfo::from_k8s(&svc).unwrap();
        let mut z = Zone::new(&ClusterDomain::default());
        z.update(
            &info.name,
            Some(service_records(&info, &[], &ClusterDomain::default())),
        );
        z.set_synced();
        z
    }

    const WEB: &str = "metadata: {name: web, namespace: ns}\nspec: {clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: http, port: 80}]}";

    #[test]
    fn answers_nodata_nxdomain() {
        let z = zone_with(WEB);
        match z.lookup("web.ns.svc.cluster.local.", QType::A) {
            Outcome::Answer { answers, .. } => assert_eq!(answers.len(), 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            z.lookup("web.ns.svc.cluster.local.", QType::Txt),
            Outcome::NoData
        );
        assert_eq!(
            z.lookup("ns.svc.cluster.local.", QType::A),
            Outcome::NoData,
            "namespace is an empty non-terminal"
        );
        assert_eq!(
            z.lookup("nope.ns.svc.cluster.local.", QType::A),
            Outcome::NxDomain
        );
        assert_eq!(
            z.lookup("other.svc.cluster.local.", QType::A),
            Outcome::NxDomain
        );
        assert_eq!(z.lookup("example.com.", QType::A), Outcome::Elsewhere);
        match z.lookup("_http._tcp.web.ns.svc.cluster.local.", QType::Srv) {
            Outcome::Answer {
                answers,
                additionals,
            } => {
                assert_eq!(answers.len(), 1);
                assert_eq!(additionals.len(), 2, "A and AAAA of the target");
            }
            other => panic!("{other:?}"),
        }
        match z.lookup("dns-version.cluster.local.", QType::Txt) {
            Outcome::Answer { answers, .. } => assert_eq!(
                answers[0],
                Rec::Txt {
                    owner: None,
                    text: "1.1.0".into()
                }
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pod_names_answer_the_address_in_them_when_on() {
        let domain = ClusterDomain::default();
        let mut zone = Zone::new(&domain).with_pod_records(true);
        zone.set_synced();
        let addr = |o: Outcome| match o {
            Outcome::Answer { answers, .. } => answers,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            addr(zone.lookup("10-244-1-5.shop.pod.cluster.local.", QType::A)),
            [Rec::Addr {
                owner: None,
                ip: "10.244.1.5".parse().unwrap()
            }]
        );
        assert_eq!(
            addr(zone.lookup("fd00-244--5.shop.pod.cluster.local.", QType::Aaaa)),
            [Rec::Addr {
                owner: None,
                ip: "fd00:244::5".parse().unwrap()
            }]
        );
        assert_eq!(
            zone.lookup("10-244-1-5.shop.pod.cluster.local.", QType::Aaaa),
            Outcome::NoData
        );
        assert_eq!(
            zone.lookup("10-244-1.shop.pod.cluster.local.", QType::A),
            Outcome::NxDomain
        );
        assert_eq!(
            zone.lookup("10-244-1-5.a.b.pod.cluster.local.", QType::A),
            Outcome::NxDomain
        );
        let mut off = Zone::new(&domain);
        off.set_synced();
        assert_eq!(
            off.lookup("10-244-1-5.shop.pod.cluster.local.", QType::A),
            Outcome::NxDomain
        );
    }

    #[test]
    fn zone_membership_is_decided_on_labels() {
        let mut zone = Zone::new(&ClusterDomain::default());
        zone.set_synced();
        assert_eq!(zone.lookup("xcluster.local.", QType::A), Outcome::Elsewhere);
        assert_eq!(
            zone.lookup("a\\.cluster.local.", QType::A),
            Outcome::Elsewhere,
            "one label a.cluster"
        );
        assert_eq!(zone.lookup("a.cluster.local.", QType::A), Outcome::NxDomain);
        assert!(Zone::covers("cluster.local.", "web.ns.svc.cluster.local."));
        assert!(Zone::covers("cluster.local.", "1.0.0.10.in-addr.arpa."));
        assert!(!Zone::covers("cluster.local.", "example.com."));
    }

    #[test]
    fn reverse_lookups() {
        let z = zone_with(WEB);
        for ip in ["10.96.0.10", "fd00::10"] {
            let ip: IpAddr = ip.parse().unwrap();
            let name = reverse_of(&ip);
            assert_eq!(reverse_name(&name), Some(ip));
            match z.lookup(&name, QType::Ptr) {
                Outcome::Answer { answers, .. } => assert_eq!(
                    answers,
                    [Rec::Ptr {
                        owner: None,
                        target: "web.ns.svc.cluster.local.".into()
                    }]
                ),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            z.lookup("1.0.0.10.in-addr.arpa.", QType::Ptr),
            Outcome::Elsewhere
        );
    }

    #[test]
    fn a_shared_address_answers_the_same_whatever_the_order() {
        let svc = |name: &str| {
            let yaml = format!(
                "metadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}"
            );
            let svc: k8s_openapi::api::core::v1::Service = serde_saphyr::from_str(&yaml).unwrap();
            ServiceInfo::from_k8s(&svc).unwrap()
        };
        let (a, b) = (svc("a"), svc("b"));
        let domain = ClusterDomain::default();
        let ptr = |first: &ServiceInfo, second: &ServiceInfo| {
            let mut z = Zone::new(&domain);
            z.set_synced();
            for s in [first, second] {
                z.update(&s.name, Some(service_records(s, &[], &domain)));
            }
            z.lookup("10.0.96.10.in-addr.arpa.", QType::Ptr)
        };
        assert_eq!(ptr(&a, &b), ptr(&b, &a));
    }

    #[test]
    fn not_synced_is_not_nxdomain() {
        let mut z = Zone::new(&ClusterDomain::default());
        assert_eq!(
            z.lookup("web.ns.svc.cluster.local.", QType::A),
            Outcome::NotSynced
        );
        z.set_synced();
        assert_eq!(
            z.lookup("web.ns.svc.cluster.local.", QType::A),
            Outcome::NxDomain
        );
    }

    #[test]
    fn updates_replace_and_remove() {
        let mut z = zone_with(WEB);
        let name = ServiceName::new("ns", "web");
        z.update(&name, None);
        assert_eq!(
            z.lookup("web.ns.svc.cluster.local.", QType::A),
            Outcome::NxDomain
        );
        assert_eq!(
            z.lookup("ns.svc.cluster.local.", QType::A),
            Outcome::NxDomain,
            "no more names in ns"
        );
        assert!(z.is_empty());
        assert_eq!(
            z.lookup(&reverse_of(&"10.96.0.10".parse().unwrap()), QType::Ptr),
            Outcome::Elsewhere
        );
    }
}
