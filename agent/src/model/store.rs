//! The node's view of the cluster: validated Services, EndpointSlices and this node,
//! kept incrementally, with the set of services whose programming may have changed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use super::node::{AUTOSCALER_DELETION_TAINT, NodeInfo, ZONE_LABEL};
use super::service::{ServiceInfo, parse_ip};
use super::slice::{SliceInfo, SliceRejection};
use super::types::{Protocol, ServiceName};
use super::validate::{At, ValidationError};

/// Kinds of objects the model consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    /// The ranges ClusterIPs are allocated from (networking.k8s.io/v1).
    ServiceCidr,
}

impl Kind {
    /// The Kubernetes `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
            Self::ServiceCidr => "ServiceCIDR",
        }
    }
}

/// Identity of an object: what deletes and logs refer to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: Kind,
    /// Empty for cluster-scoped objects (Nodes).
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectRef {
    /// `Kind namespace/name`, control characters escaped: names from a manifest
    /// directory are not validated yet when they are logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (namespace, name) = (Escaped(&self.namespace), Escaped(&self.name));
        if self.namespace.is_empty() {
            write!(f, "{} {name}", self.kind.as_str())
        } else {
            write!(f, "{} {namespace}/{name}", self.kind.as_str())
        }
    }
}

/// Text from input shown in a log line with its control characters escaped (`\n`,
/// `\u{1b}`), so a hostile name cannot start a forged line or drive a terminal.
pub struct Escaped<'a>(pub &'a str);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// An object the model refused. The previous valid version, if any, stays in effect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {object}: {reason}")]
pub struct InvalidObject {
    pub object: ObjectRef,
    pub reason: ValidationError,
}

/// What applying an object did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The model changed.
    Changed,
    /// Identical to what the model had.
    Unchanged,
    /// A legal object the model has no use for (FQDN slice, another node), with why.
    Ignored(String),
}

/// Services and slices as this node knows them.
#[derive(Debug, Default)]
pub struct ClusterState {
    services: HashMap<ServiceName, Arc<ServiceInfo>>,
    /// Slices grouped by the service they belong to, keyed by slice name, so a
    /// service's endpoints are found without scanning every slice.
    slices: HashMap<ServiceName, BTreeMap<String, Arc<SliceInfo>>>,
    /// Which service each (namespace, slice name) currently belongs to.
    slice_owner: HashMap<(String, String), ServiceName>,
    node: NodeInfo,
    /// Services whose programming must be recomputed.
    dirty: HashSet<ServiceName>,
    /// Node facts changed: every service must be recomputed.
    node_changed: bool,
    /// Each ServiceCIDR's ranges, by name.
    service_cidrs: BTreeMap<String, Vec<ipnetwork::IpNetwork>>,
    /// `--service-cluster-ip-range` (see [`Self::set_service_cluster_ip_ranges`]).
    service_cluster_ip_ranges: Vec<ipnetwork::IpNetwork>,
    /// Services whose DNS records may have changed (tracked only when DNS is on).
    dns_dirty: HashSet<ServiceName>,
    track_dns: bool,
    /// Protocols whose ports are not programmed (see [`Self::set_unsupported_protocols`]).
    unsupported_protocols: Vec<Protocol>,
    /// The cluster DNS Service whose port 53 this node answers itself
    /// (see [`Self::set_node_local_dns`]).
    node_local_dns: Option<ServiceName>,
}

impl ClusterState {
    /// An empty view for the node called `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node: NodeInfo::named(node_name),
            ..Self::default()
        }
    }

    /// Adds or replaces a Service. An invalid one leaves the previous version in place.
    pub fn apply_service(
        &mut self,
        svc: &k8s_openapi::api::core::v1::Service,
    ) -> Result<Applied, InvalidObject> {
        let info = ServiceInfo::from_k8s(svc).map_err(|reason| InvalidObject {
            object: ObjectRef {
                kind: Kind::Service,
                namespace: svc
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                name: svc.metadata.name.clone().unwrap_or_default(),
            },
            reason,
        })?;
        self.check_cluster_ips(&info)?;
        if self
            .services
            .get(&info.name)
            .is_some_and(|old| **old == info)
        {
            return Ok(Applied::Unchanged);
        }
        self.mark(info.name.clone());
        self.services.insert(info.name.clone(), Arc::new(info));
        Ok(Applied::Changed)
    }

    /// Removes a Service (its slices stay, waiting for it to come back or be deleted).
    pub fn delete_service(&mut self, name: &ServiceName) -> Applied {
        if self.services.remove(name).is_some() {
            self.mark(name.clone());
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }

    /// Adds or replaces an EndpointSlice. An invalid one leaves the previous version in
    /// place; an ignored one (FQDN, no service label) removes any previous version,
    /// since the object now legitimately says "nothing to proxy".
    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<Applied, InvalidObject> {
        let namespace = slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = slice.metadata.name.clone().unwrap_or_default();
        let info = match SliceInfo::from_k8s(slice) {
            Ok(info) => info,
            Err(SliceRejection::Ignored(why)) => {
                self.delete_slice(&namespace, &name);
                return Ok(Applied::Ignored(why));
            }
            Err(SliceRejection::Invalid(reason)) => {
                return Err(InvalidObject {
                    object: ObjectRef {
                        kind: Kind::EndpointSlice,
                        namespace,
                        name,
                    },
                    reason,
                });
            }
        };
        let owner = ServiceName::new(&info.namespace, &info.service);
        let key = (info.namespace.clone(), info.name.clone());
        if let Some(previous_owner) = self.slice_owner.get(&key) {
            if *previous_owner == owner
                && self
                    .slices
                    .get(&owner)
                    .and_then(|s| s.get(&info.name))
                    .is_some_and(|old| **old == info)
            {
                return Ok(Applied::Unchanged);
            }
            if *previous_owner != owner {
                // The slice moved to another service (its label changed).
                self.delete_slice(&info.namespace, &info.name);
            }
        }
        self.mark(owner.clone());
        self.slice_owner.insert(key, owner.clone());
        self.slices
            .entry(owner)
            .or_default()
            .insert(info.name.clone(), Arc::new(info));
        Ok(Applied::Changed)
    }

    /// Removes an EndpointSlice.
    pub fn delete_slice(&mut self, namespace: &str, name: &str) -> Applied {
        let Some(owner) = self
            .slice_owner
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return Applied::Unchanged;
        };
        if let Some(slices) = self.slices.get_mut(&owner) {
            slices.remove(name);
            if slices.is_empty() {
                self.slices.remove(&owner);
            }
        }
        self.mark(owner);
        Applied::Changed
    }

    /// Takes in a Node; only this node's object matters (zone label, addresses).
    pub fn apply_node(&mut self, node: &Node) -> Result<Applied, InvalidObject> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if name != self.node.name {
            return Ok(Applied::Ignored(format!(
                "not this node ({})",
                self.node.name
            )));
        }
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .cloned();
        let mut addresses = Vec::new();
        let status_addresses = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .map(Vec::as_slice)
            .unwrap_or_default();
        for wanted in ["InternalIP", "ExternalIP"] {
            for addr in status_addresses.iter().filter(|a| a.type_ == wanted) {
                let ip = parse_ip(&addr.address)
                    .at("status.addresses")
                    .map_err(|reason| InvalidObject {
                        object: ObjectRef {
                            kind: Kind::Node,
                            namespace: String::new(),
                            name: name.clone(),
                        },
                        reason,
                    })?;
                if !addresses.contains(&ip) {
                    addresses.push(ip);
                }
            }
        }
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_DELETION_TAINT));
        let info = NodeInfo {
            name: name.clone(),
            zone,
            addresses,
            leaving: node.metadata.deletion_timestamp.is_some() || tainted,
            pod_cidrs: pod_cidrs(node).map_err(|reason| InvalidObject {
                object: ObjectRef {
                    kind: Kind::Node,
                    namespace: String::new(),
                    name: name.clone(),
                },
                reason,
            })?,
        };
        if info == self.node {
            return Ok(Applied::Unchanged);
        }
        self.node = info;
        self.node_changed = true;
        Ok(Applied::Changed)
    }

    /// Forgets this node's object (back to name only).
    pub fn delete_node(&mut self, name: &str) -> Applied {
        if name != self.node.name {
            return Applied::Unchanged;
        }
        let fresh = NodeInfo::named(name);
        if fresh == self.node {
            return Applied::Unchanged;
        }
        self.node = fresh;
        self.node_changed = true;
        Applied::Changed
    }

    /// Takes in a ServiceCIDR: the ranges ClusterIPs come from, so that traffic to an
    /// address in them that no service holds can be dropped (nftables mode, as
    /// kube-proxy's). Changes no service.
    pub fn apply_service_cidr(&mut self, cidr: &ServiceCIDR) -> Result<Applied, InvalidObject> {
        let name = cidr.metadata.name.clone().unwrap_or_default();
        let listed = cidr.spec.as_ref().and_then(|s| s.cidrs.clone());
        let ranges = parse_cidrs(listed.unwrap_or_default(), "spec.cidrs").map_err(|reason| {
            InvalidObject {
                object: ObjectRef {
                    kind: Kind::ServiceCidr,
                    namespace: String::new(),
                    name: name.clone(),
                },
                reason,
            }
        })?;
        if self.service_cidrs.get(&name) == Some(&ranges) {
            return Ok(Applied::Unchanged);
        }
        self.service_cidrs.insert(name, ranges);
        Ok(Applied::Changed)
    }

    /// Forgets a ServiceCIDR.
    pub fn delete_service_cidr(&mut self, name: &str) -> Applied {
        match self.service_cidrs.remove(name) {
            Some(_) => Applied::Changed,
            None => Applied::Unchanged,
        }
    }

    /// Checks ClusterIPs against `--service-cluster-ip-range` (as the API server does
    /// at admission) from now on; the ranges also count as a ServiceCIDR.
    pub fn set_service_cluster_ip_ranges(&mut self, ranges: Vec<ipnetwork::IpNetwork>) {
        if !ranges.is_empty() {
            let name = "--service-cluster-ip-range".to_owned();
            self.service_cidrs.insert(name, ranges.clone());
        }
        self.service_cluster_ip_ranges = ranges;
    }

    /// A ClusterIP outside `--service-cluster-ip-range` (when given) makes the
    /// Service invalid.
    fn check_cluster_ips(&self, info: &ServiceInfo) -> Result<(), InvalidObject> {
        let ranges = &self.service_cluster_ip_ranges;
        let outside = (info.cluster_ips.iter())
            .find(|ip| !ranges.is_empty() && !ranges.iter().any(|r| r.contains(**ip)));
        match outside {
            None => Ok(()),
            Some(ip) => Err(InvalidObject {
                object: ObjectRef {
                    kind: Kind::Service,
                    namespace: info.name.namespace.clone(),
                    name: info.name.name.clone(),
                },
                reason: ValidationError::invalid(
                    "spec.clusterIPs",
                    format!(
                        "{ip} is not in --service-cluster-ip-range ({})",
                        ranges
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ),
            }),
        }
    }

    /// Every ServiceCIDR's ranges, sorted, without duplicates.
    pub fn service_cidrs(&self) -> Vec<ipnetwork::IpNetwork> {
        let mut all: Vec<_> = self.service_cidrs.values().flatten().copied().collect();
        all.sort();
        all.dedup();
        all
    }

    /// Records that a service's programming (and DNS) may have changed.
    fn mark(&mut self, name: ServiceName) {
        if self.track_dns {
            self.dns_dirty.insert(name.clone());
        }
        self.dirty.insert(name);
    }

    /// Starts tracking which services' DNS records change (see
    /// [`ClusterState::take_dns_changes`]).
    pub fn track_dns(&mut self) {
        self.track_dns = true;
    }

    /// Services whose DNS records may have changed since the last call.
    pub fn take_dns_changes(&mut self) -> Vec<ServiceName> {
        self.dns_dirty.drain().collect()
    }

    /// Protocols this node's kernel cannot program (SCTP without its module): their
    /// service ports are skipped by the plans.
    pub fn set_unsupported_protocols(&mut self, protocols: Vec<Protocol>) {
        self.unsupported_protocols = protocols;
    }

    /// The cluster DNS Service (`--dns-service`, kube-dns) whose DNS ports this node's
    /// own DNS server answers, the way NodeLocal DNSCache takes over the kube-dns
    /// ClusterIP; `None` when the agent serves no DNS.
    pub fn set_node_local_dns(&mut self, service: Option<ServiceName>) {
        if let Some(name) = service.as_ref().or(self.node_local_dns.as_ref()) {
            self.dirty.insert(name.clone());
        }
        self.node_local_dns = service;
    }

    /// Whether `name` is the Service answered by this node's DNS server.
    pub fn is_node_local_dns(&self, name: &ServiceName) -> bool {
        self.node_local_dns.as_ref() == Some(name)
    }

    /// Whether `ip` is one of this node's own addresses (its Node object's): a
    /// ClusterIP there is not programmed, as it would capture the node's own traffic.
    pub fn is_node_address(&self, ip: IpAddr) -> bool {
        self.node.addresses.contains(&ip)
    }

    /// Whether service ports of this protocol can be programmed here.
    pub fn supports(&self, protocol: Protocol) -> bool {
        !self.unsupported_protocols.contains(&protocol)
    }

    /// Whether anything changed since the last [`Self::take_changes`].
    pub fn has_changes(&self) -> bool {
        self.node_changed || !self.dirty.is_empty()
    }

    /// Hands out what changed since the last call: the services to recompute (all of
    /// them after a node change) and whether the node itself changed.
    pub fn take_changes(&mut self) -> Changes {
        let node_changed = std::mem::take(&mut self.node_changed);
        let mut services = std::mem::take(&mut self.dirty);
        if node_changed {
            services.extend(self.services.keys().cloned());
        }
        Changes {
            services,
            node_changed,
        }
    }

    /// A service by name.
    pub fn service(&self, name: &ServiceName) -> Option<&Arc<ServiceInfo>> {
        self.services.get(name)
    }

    /// Every service.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceInfo>> {
        self.services.values()
    }

    /// The slices of one service, in name order.
    pub fn slices_of(&self, name: &ServiceName) -> impl Iterator<Item = &Arc<SliceInfo>> {
        self.slices.get(name).into_iter().flat_map(|s| s.values())
    }

    /// This node's facts.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Number of services and slices held, for metrics and logs.
    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slice_owner.len())
    }
}

/// Services to recompute after a batch of object changes.
#[derive(Debug, Default)]
pub struct Changes {
    pub services: HashSet<ServiceName>,
    pub node_changed: bool,
}

/// A state built from YAML manifests (Service, EndpointSlice, Node), for model tests.
/// `spec.podCIDRs`, else `spec.podCIDR`.
fn pod_cidrs(node: &Node) -> Result<Vec<ipnetwork::IpNetwork>, ValidationError> {
    let spec = node.spec.as_ref();
    let listed = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let single = spec.and_then(|s| s.pod_cidr.clone());
    let values = if listed.is_empty() {
        single.into_iter().collect()
    } else {
        listed
    };
    parse_cidrs(values, "spec.podCIDRs")
}

/// CIDRs of a list field, each in network form (`10.96.0.0/16`, not `10.96.0.1/16`).
fn parse_cidrs(
    values: Vec<String>,
    field: &str,
) -> Result<Vec<ipnetwork::IpNetwork>, ValidationError> {
    values
        .iter()
        .map(|v| {
            let net: ipnetwork::IpNetwork = v
                .parse()
                .map_err(|_| ValidationError::invalid(field, format!("{v:?} is not a CIDR")))?;
            ipnetwork::IpNetwork::new(net.network(), net.prefix())
                .map_err(|e| ValidationError::invalid(field, e.to_string()))
        })
        .collect()
}

#[cfg(test)]
pub(crate) fn test_state(objects: &[&str]) -> ClusterState {
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let mut state = ClusterState::new("node-a");
    for yaml in objects {
        let value = crate::source::manifests::parse_yaml(yaml).expect("test YAML");
        match value["kind"].as_str() {
            Some("Service") => {
                let svc: Service = serde_json::from_value(value).expect("test Service");
                state.apply_service(&svc).expect("valid test Service");
            }
            Some("EndpointSlice") => {
                let slice: EndpointSlice = serde_json::from_value(value).expect("test slice");
                state.apply_slice(&slice).expect("valid test slice");
            }
            Some("Node") => {
                let node: Node = serde_json::from_value(value).expect("test Node");
                state.apply_node(&node).expect("valid test Node");
            }
            other => panic!("unexpected kind {other:?}"),
        }
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> k8s_openapi::api::core::v1::Service {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn slice(yaml: &str) -> EndpointSlice {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn object_names_in_logs_cannot_start_a_line_or_drive_a_terminal() {
        let object = ObjectRef {
            kind: Kind::Service,
            namespace: "ns".into(),
            name: "x\"\n-A INPUT -j DROP\u{1b}[2J".into(),
        };
        assert_eq!(
            object.to_string(),
            "Service ns/x\"\\n-A INPUT -j DROP\\u{1b}[2J"
        );
        assert_eq!(Escaped("ok-name.1").to_string(), "ok-name.1");
    }

    const WEB: &str =
        "metadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}";
    const SLICE: &str = "metadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]";

    #[test]
    fn service_cidrs_are_merged_normalised_and_validated() {
        let mut state = ClusterState::new("n1");
        let cidr = |name: &str, cidrs: &str| -> ServiceCIDR {
            serde_saphyr::from_str(&format!(
                "metadata: {{name: {name}}}\nspec: {{cidrs: {cidrs}}}"
            ))
            .unwrap()
        };
        let primary = cidr("kubernetes", "[10.96.0.1/16, \"fd00:96::/108\"]");
        assert_eq!(state.apply_service_cidr(&primary), Ok(Applied::Changed));
        assert_eq!(state.apply_service_cidr(&primary), Ok(Applied::Unchanged));
        let extra = cidr("extra", "[10.100.0.0/24]");
        assert_eq!(state.apply_service_cidr(&extra), Ok(Applied::Changed));
        let ranges: Vec<String> = state
            .service_cidrs()
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(ranges, ["10.96.0.0/16", "10.100.0.0/24", "fd00:96::/108"]);
        assert!(
            state.take_changes().services.is_empty(),
            "no service changes"
        );
        let bad = state
            .apply_service_cidr(&cidr("kubernetes", "[nope]"))
            .unwrap_err();
        assert_eq!(bad.object.to_string(), "ServiceCIDR kubernetes");
        assert_eq!(state.service_cidrs().len(), 3, "the previous version stays");
        assert_eq!(state.delete_service_cidr("extra"), Applied::Changed);
        assert_eq!(state.delete_service_cidr("extra"), Applied::Unchanged);
        assert_eq!(state.service_cidrs().len(), 2);
    }

    #[test]
    fn cluster_ips_outside_the_service_cluster_ip_range_are_invalid() {
        let mut state = ClusterState::new("n1");
        let svc = |ip: &str| {
            service(&format!(
                "metadata: {{name: web, namespace: ns}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}"
            ))
        };
        // Without the flag, any (non-special) address is taken.
        assert_eq!(
            state.apply_service(&svc("192.168.7.7")),
            Ok(Applied::Changed)
        );
        let mut state = ClusterState::new("n1");
        state.set_service_cluster_ip_ranges(vec!["10.96.0.0/16".parse().unwrap()]);
        assert_eq!(
            state.apply_service(&svc("10.96.0.10")),
            Ok(Applied::Changed)
        );
        let bad = state.apply_service(&svc("192.168.7.7")).unwrap_err();
        assert_eq!(bad.object.to_string(), "Service ns/web");
        assert_eq!(
            bad.reason.to_string(),
            "spec.clusterIPs: 192.168.7.7 is not in --service-cluster-ip-range (10.96.0.0/16)"
        );
        let kept = state.service(&ServiceName::new("ns", "web")).unwrap();
        assert_eq!(
            kept.cluster_ips[0].to_string(),
            "10.96.0.10",
            "the last good version stays"
        );
        assert_eq!(
            state.service_cidrs().len(),
            1,
            "the range is a ServiceCIDR too"
        );
    }

    #[test]
    fn applying_twice_is_unchanged_and_not_dirty() {
        let mut state = ClusterState::new("n1");
        assert_eq!(state.apply_service(&service(WEB)), Ok(Applied::Changed));
        assert_eq!(state.take_changes().services.len(), 1);
        assert_eq!(state.apply_service(&service(WEB)), Ok(Applied::Unchanged));
        assert!(state.take_changes().services.is_empty());
    }

    #[test]
    fn invalid_update_keeps_previous_version() {
        let mut state = ClusterState::new("n1");
        state.apply_service(&service(WEB)).unwrap();
        state.take_changes();
        let bad = service("metadata: {name: web, namespace: ns}\nspec: {clusterIP: nope}");
        let err = state.apply_service(&bad).unwrap_err();
        assert_eq!(err.object.to_string(), "Service ns/web");
        let name = ServiceName::new("ns", "web");
        assert_eq!(state.service(&name).unwrap().cluster_ips.len(), 1);
        assert!(state.take_changes().services.is_empty());
    }

    #[test]
    fn slices_mark_their_service_dirty_and_can_move() {
        let mut state = ClusterState::new("n1");
        state.apply_slice(&slice(SLICE)).unwrap();
        let changes = state.take_changes();
        assert!(changes.services.contains(&ServiceName::new("ns", "web")));
        assert_eq!(state.slices_of(&ServiceName::new("ns", "web")).count(), 1);

        let moved = SLICE.replace("service-name: web", "service-name: api");
        state.apply_slice(&slice(&moved)).unwrap();
        let changes = state.take_changes();
        assert!(changes.services.contains(&ServiceName::new("ns", "web")));
        assert!(changes.services.contains(&ServiceName::new("ns", "api")));
        assert_eq!(state.slices_of(&ServiceName::new("ns", "web")).count(), 0);
        assert_eq!(state.slices_of(&ServiceName::new("ns", "api")).count(), 1);

        assert_eq!(state.delete_slice("ns", "web-1"), Applied::Changed);
        assert_eq!(state.delete_slice("ns", "web-1"), Applied::Unchanged);
        assert_eq!(state.counts(), (0, 0));
    }

    #[test]
    fn slice_turning_fqdn_is_removed() {
        let mut state = ClusterState::new("n1");
        state.apply_slice(&slice(SLICE)).unwrap();
        let fqdn = SLICE.replace("IPv4", "FQDN");
        assert!(matches!(
            state.apply_slice(&slice(&fqdn)),
            Ok(Applied::Ignored(_))
        ));
        assert_eq!(state.counts(), (0, 0));
    }

    #[test]
    fn node_change_dirties_every_service() {
        let mut state = ClusterState::new("n1");
        state.apply_service(&service(WEB)).unwrap();
        state.take_changes();
        let other: Node = serde_saphyr::from_str("metadata: {name: n2}").unwrap();
        assert!(matches!(state.apply_node(&other), Ok(Applied::Ignored(_))));
        let me: Node = serde_saphyr::from_str(
            "metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}\nstatus: {addresses: [{type: Hostname, address: n1}, {type: InternalIP, address: 172.18.0.2}]}",
        )
        .unwrap();
        assert_eq!(state.apply_node(&me), Ok(Applied::Changed));
        assert_eq!(state.node().zone.as_deref(), Some("z1"));
        assert_eq!(
            state.node().addresses,
            vec!["172.18.0.2".parse::<std::net::IpAddr>().unwrap()]
        );
        let changes = state.take_changes();
        assert!(changes.node_changed);
        assert_eq!(changes.services.len(), 1);
    }
}
