//! What this node must program: one [`ServicePortPlan`] per (service port, IP family),
//! and the incremental [`PlanDiff`] between two versions. Backends consume only this;
//! every Kubernetes rule (which endpoints, REJECT vs DROP) is decided here.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::endpoints::{Categorized, candidates, categorize};
use super::frontends::{FrontendClaims, FrontendConflict};
use super::service::{ServiceInfo, ServicePortSpec};
use super::store::ClusterState;
use super::types::{Endpoint, IpFamily, Protocol, ServiceName, ServicePortName};

/// Identity of a frontend set: a service port in one IP family.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PlanKey {
    pub port: ServicePortName,
    pub family: IpFamily,
}

/// Everything needed to program one service port in one IP family.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePortPlan {
    pub key: PlanKey,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    pub load_balancer_source_ranges: Vec<IpNetwork>,
    pub affinity_timeout_seconds: Option<u32>,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// Endpoints for `Cluster` policy, sorted; empty when no policy uses them.
    pub cluster_endpoints: Vec<Endpoint>,
    /// This node's endpoints for `Local` policy, sorted.
    pub local_endpoints: Vec<Endpoint>,
    /// Whether any endpoint anywhere can serve (REJECT when not, DROP when only
    /// another node could).
    pub has_any_endpoints: bool,
    /// Every endpoint that still serves (ready or terminating), sorted: the
    /// conntrack reconciler keeps UDP flows to these and deletes flows to others.
    pub serving_endpoints: Vec<Endpoint>,
    /// The ClusterIP of this port is answered by the node's own DNS server while it
    /// serves, and by the endpoints otherwise (the kube-dns Service's port 53).
    pub node_local_dns: bool,
}

/// What to do with traffic of one kind (internal = ClusterIP, external = NodePort,
/// externalIPs, load-balancer IPs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Traffic<'a> {
    /// Balance across these endpoints.
    Forward(&'a [Endpoint]),
    /// No usable endpoint anywhere: refuse (ICMP unreachable / TCP reset / ECONNREFUSED).
    Reject,
    /// Endpoints exist but none this traffic may use from this node: drop silently.
    Drop,
}

/// Which endpoint set a kind of traffic balances across: kube-proxy's cluster chain
/// (`KUBE-SVC-*`) or local chain (`KUBE-SVL-*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointSet {
    /// [`ServicePortPlan::cluster_endpoints`].
    Cluster,
    /// [`ServicePortPlan::local_endpoints`].
    Local,
}

impl ServicePortPlan {
    /// Handling of traffic to the ClusterIP.
    pub fn internal(&self) -> Traffic<'_> {
        self.traffic(self.internal_policy_local)
    }

    /// Handling of traffic arriving from outside to NodePorts, externalIPs and
    /// load-balancer IPs.
    pub fn external(&self) -> Traffic<'_> {
        self.traffic(self.external_policy_local)
    }

    /// Handling of traffic from pods or the node itself to an external destination
    /// (externalIP, load-balancer IP): kube-proxy short-circuits it to the cluster-wide
    /// set whatever the external policy, as if it went out to the load balancer and
    /// came back.
    pub fn external_from_inside(&self) -> Traffic<'_> {
        self.traffic(false)
    }

    /// Whether loadBalancerSourceRanges restrict who may use the load-balancer IPs:
    /// then every packet's source must be checked, for traffic from pods too
    /// (kube-proxy's firewall chain sees all traffic to those IPs).
    pub fn load_balancer_ips_restricted(&self) -> bool {
        !self.load_balancer_source_ranges.is_empty()
    }

    /// The endpoint set ClusterIP traffic uses.
    pub fn internal_endpoint_set(&self) -> EndpointSet {
        Self::set_of(self.internal_policy_local)
    }

    /// The endpoint set traffic from outside uses.
    pub fn external_endpoint_set(&self) -> EndpointSet {
        Self::set_of(self.external_policy_local)
    }

    /// Whether traffic from outside is masqueraded to the node's address: with
    /// `Cluster` policy the endpoint may be on another node and must reply through this
    /// one; `Local` keeps the client's address.
    pub fn masquerades_external(&self) -> bool {
        !self.external_policy_local
    }

    fn set_of(local_policy: bool) -> EndpointSet {
        if local_policy {
            EndpointSet::Local
        } else {
            EndpointSet::Cluster
        }
    }

    fn traffic(&self, local_policy: bool) -> Traffic<'_> {
        if !self.has_any_endpoints {
            return Traffic::Reject;
        }
        let endpoints = match Self::set_of(local_policy) {
            EndpointSet::Local => &self.local_endpoints,
            EndpointSet::Cluster => &self.cluster_endpoints,
        };
        if endpoints.is_empty() {
            Traffic::Drop
        } else {
            Traffic::Forward(endpoints)
        }
    }

    /// Whether a `Local` policy leaves this node without endpoints although others
    /// exist, for (internal, external) traffic: kube-proxy's "no local endpoints"
    /// gauges count these.
    pub fn lacks_local_endpoints(&self) -> (bool, bool) {
        (
            self.internal_policy_local && self.internal() == Traffic::Drop,
            self.external_policy_local && self.external() == Traffic::Drop,
        )
    }

    /// Whether this port has frontends for traffic from outside on this node (a
    /// NodePort, externalIPs or load-balancer IPs of its family). The service-level
    /// rule that decides whether external policy applies is
    /// [`ServiceInfo::is_externally_accessible`].
    pub fn has_external_frontends(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }

    /// Every endpoint some policy of this plan uses (deduplicated, sorted).
    pub fn reachable_endpoints(&self) -> Vec<Endpoint> {
        let mut all: Vec<Endpoint> = self
            .cluster_endpoints
            .iter()
            .chain(&self.local_endpoints)
            .copied()
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// A plan that was added or replaced.
#[derive(Clone, Debug)]
pub struct Upsert {
    pub old: Option<Arc<ServicePortPlan>>,
    pub new: Arc<ServicePortPlan>,
}

/// What changed between two node plans. Backends apply exactly this.
#[derive(Clone, Debug, Default)]
pub struct PlanDiff {
    pub upserted: Vec<Upsert>,
    pub removed: Vec<Arc<ServicePortPlan>>,
    /// Ports left unprogrammed (never half-programmed), with why, so the caller can
    /// say so.
    pub skipped: Vec<SkippedPort>,
    /// Frontends a recomputed port asked for and another port owns.
    pub conflicts: Vec<FrontendConflict>,
}

impl PlanDiff {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// A service port (or one family of it) the node does not program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedPort {
    pub port: ServicePortName,
    pub reason: SkipReason,
}

/// Why a service port is not programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// This kernel lacks the port's protocol (SCTP).
    UnsupportedProtocol,
    /// The ClusterIP is one of the node's own addresses (from its Node object):
    /// programming it would capture traffic meant for the node itself.
    ClusterIpIsNodeAddress(IpAddr),
}

impl SkipReason {
    /// A short label value for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::ClusterIpIsNodeAddress(_) => "node_address",
        }
    }
}

/// The full desired state of this node.
#[derive(Debug, Default)]
pub struct NodePlan {
    plans: HashMap<PlanKey, Arc<ServicePortPlan>>,
    by_service: HashMap<ServiceName, Vec<PlanKey>>,
    claims: FrontendClaims,
}

impl NodePlan {
    /// Recomputes the given services from `state` and returns what changed. Work is
    /// proportional to the size of those services, not of the cluster (plus the
    /// services sharing a frontend with them, whose claim may have changed).
    pub fn update<'a>(
        &mut self,
        state: &ClusterState,
        services: impl IntoIterator<Item = &'a ServiceName>,
    ) -> PlanDiff {
        let mut diff = PlanDiff::default();
        let mut pending: Vec<ServiceName> = Vec::new();
        let mut seen = HashSet::new();
        for name in services {
            if seen.insert(name.clone()) {
                pending.push(name.clone());
            }
        }
        let changed = pending.len();
        let mut fresh_plans = Vec::with_capacity(pending.len());
        let mut i = 0;
        while let Some(name) = pending.get(i).cloned() {
            i += 1;
            // Services only recomputed for a claim have reported their skipped ports.
            let mut unchanged_skips = Vec::new();
            let skipped = match i <= changed {
                true => &mut diff.skipped,
                false => &mut unchanged_skips,
            };
            let fresh = plan_service(state, &name, skipped);
            for other in self.claims.replace_service(&name, &fresh) {
                if seen.insert(other.clone()) {
                    pending.push(other);
                }
            }
            fresh_plans.push((name, fresh));
        }
        for (name, fresh) in fresh_plans {
            let resolved: Vec<ServicePortPlan> = fresh
                .into_iter()
                .filter_map(|p| self.claims.resolve(p, &mut diff.conflicts))
                .collect();
            self.replace(&name, resolved, &mut diff);
        }
        diff
    }

    /// Puts the plans of one service in place of its old ones, recording the diff.
    fn replace(&mut self, name: &ServiceName, fresh: Vec<ServicePortPlan>, diff: &mut PlanDiff) {
        let old_keys = self.by_service.remove(name).unwrap_or_default();
        let mut new_keys = Vec::with_capacity(fresh.len());
        for plan in fresh {
            new_keys.push(plan.key.clone());
            match self.plans.get(&plan.key) {
                Some(old) if **old == plan => {}
                old => {
                    let new = Arc::new(plan);
                    diff.upserted.push(Upsert {
                        old: old.cloned(),
                        new: new.clone(),
                    });
                    self.plans.insert(new.key.clone(), new);
                }
            }
        }
        for key in old_keys {
            if !new_keys.contains(&key)
                && let Some(old) = self.plans.remove(&key)
            {
                diff.removed.push(old);
            }
        }
        if !new_keys.is_empty() {
            self.by_service.insert(name.clone(), new_keys);
        }
    }

    /// Puts plans in directly (tests of consumers of a plan).
    #[cfg(test)]
    pub(crate) fn insert_for_test(&mut self, plans: Vec<ServicePortPlan>) {
        for plan in plans {
            self.by_service
                .entry(plan.key.port.service.clone())
                .or_default()
                .push(plan.key.clone());
            self.plans.insert(plan.key.clone(), Arc::new(plan));
        }
    }

    /// This plan without the plans of `excluded`: what the data plane programs while
    /// the kernel refuses those (the proxy loop's quarantine). Only the plans are
    /// kept, not the bookkeeping [`Self::update`] needs: data planes read only them.
    pub fn without(&self, excluded: &HashSet<PlanKey>) -> NodePlan {
        NodePlan {
            plans: (self.plans.iter())
                .filter(|(key, _)| !excluded.contains(key))
                .map(|(key, plan)| (key.clone(), plan.clone()))
                .collect(),
            ..NodePlan::default()
        }
    }

    /// Every plan's key, sorted.
    pub fn keys_sorted(&self) -> Vec<PlanKey> {
        let mut keys: Vec<PlanKey> = self.plans.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// One plan.
    pub fn get(&self, key: &PlanKey) -> Option<&Arc<ServicePortPlan>> {
        self.plans.get(key)
    }

    /// Every plan, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ServicePortPlan>> {
        self.plans.values()
    }

    /// The frontends the port `key` asked for and another port got.
    pub fn frontend_losses(&self, key: &PlanKey) -> Vec<FrontendConflict> {
        self.claims.losses(key)
    }

    /// Number of plans.
    pub fn len(&self) -> usize {
        self.plans.len()
    }

    /// No plans at all.
    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

/// Builds the plans of one service from the current state; ports of a protocol the
/// node cannot program, and ClusterIPs that are the node's own, go to `skipped`
/// instead.
fn plan_service(
    state: &ClusterState,
    name: &ServiceName,
    skipped: &mut Vec<SkippedPort>,
) -> Vec<ServicePortPlan> {
    let Some(svc) = state.service(name) else {
        return Vec::new();
    };
    if !svc.is_proxied() {
        return Vec::new();
    }
    let (uses_cluster, uses_local) = (svc.uses_cluster_endpoints(), svc.uses_local_endpoints());
    let mut plans = Vec::with_capacity(svc.cluster_ips.len() * svc.ports.len());
    let skip = |port: &ServicePortSpec, reason| SkippedPort {
        port: ServicePortName {
            service: svc.name.clone(),
            port: port.name.clone(),
            protocol: port.protocol,
        },
        reason,
    };
    let (supported, unsupported): (Vec<_>, Vec<_>) =
        svc.ports.iter().partition(|p| state.supports(p.protocol));
    skipped.extend(
        unsupported
            .into_iter()
            .map(|p| skip(p, SkipReason::UnsupportedProtocol)),
    );
    for &cluster_ip in &svc.cluster_ips {
        if state.is_node_address(cluster_ip) {
            let reason = SkipReason::ClusterIpIsNodeAddress(cluster_ip);
            skipped.extend(supported.iter().map(|p| skip(p, reason)));
            continue;
        }
        let family = IpFamily::of(&cluster_ip);
        for port in supported.iter().copied() {
            let found = candidates(state, name, family, (&port.name, port.protocol));
            let categorized = categorize(&found, state.node(), uses_cluster, uses_local);
            let mut plan = port_plan(svc, port, cluster_ip, categorized);
            plan.node_local_dns = state.is_node_local_dns(name) && is_dns_port(port);
            plans.push(plan);
        }
    }
    plans
}

/// The ports of the cluster DNS Service that the node's DNS server answers: DNS
/// itself (53, UDP and TCP), not e.g. CoreDNS's metrics port.
fn is_dns_port(port: &ServicePortSpec) -> bool {
    port.port == DNS_PORT && matches!(port.protocol, Protocol::Udp | Protocol::Tcp)
}

/// The DNS port.
pub const DNS_PORT: u16 = 53;

/// The plan of one port of `svc` in the family of `cluster_ip`.
fn port_plan(
    svc: &ServiceInfo,
    port: &ServicePortSpec,
    cluster_ip: IpAddr,
    endpoints: Categorized,
) -> ServicePortPlan {
    let family = IpFamily::of(&cluster_ip);
    let of_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
        ips.iter()
            .copied()
            .filter(|ip| IpFamily::of(ip) == family)
            .collect()
    };
    ServicePortPlan {
        key: PlanKey {
            port: ServicePortName {
                service: svc.name.clone(),
                port: port.name.clone(),
                protocol: port.protocol,
            },
            family,
        },
        cluster_ip,
        port: port.port,
        node_port: port.node_port.filter(|_| svc.has_node_ports()),
        external_ips: of_family(&svc.external_ips),
        load_balancer_ips: of_family(&svc.load_balancer_ips),
        load_balancer_source_ranges: svc
            .load_balancer_source_ranges
            .iter()
            .copied()
            .filter(|net| IpFamily::of(&net.ip()) == family)
            .collect(),
        affinity_timeout_seconds: svc.affinity_timeout_seconds,
        internal_policy_local: svc.internal_policy_local,
        external_policy_local: svc.external_policy_local,
        health_check_node_port: svc.health_check_node_port,
        cluster_endpoints: endpoints.cluster,
        local_endpoints: endpoints.local,
        has_any_endpoints: endpoints.has_any,
        serving_endpoints: endpoints.serving,
        node_local_dns: false,
    }
}

/// A plain plan for backend tests: `ns/name:port`, one ClusterIP, these cluster-wide
/// endpoints, everything else off; tests change the fields they care about.
#[cfg(test)]
pub(crate) fn test_plan(
    service: (&str, &str, &str),
    protocol: super::types::Protocol,
    cluster_ip: &str,
    port: u16,
    endpoints: &[(&str, u16)],
) -> ServicePortPlan {
    let (namespace, name, port_name) = service;
    let cluster_endpoints: Vec<Endpoint> = endpoints
        .iter()
        .map(|(ip, port)| Endpoint {
            ip: ip.parse().expect("test address"),
            port: *port,
        })
        .collect();
    ServicePortPlan {
        key: PlanKey {
            port: ServicePortName {
                service: ServiceName::new(namespace, name),
                port: port_name.into(),
                protocol,
            },
            family: IpFamily::V4,
        },
        cluster_ip: cluster_ip.parse().expect("test address"),
        port,
        node_port: None,
        external_ips: vec![],
        load_balancer_ips: vec![],
        load_balancer_source_ranges: vec![],
        affinity_timeout_seconds: None,
        internal_policy_local: false,
        external_policy_local: false,
        health_check_node_port: None,
        has_any_endpoints: !cluster_endpoints.is_empty(),
        serving_endpoints: cluster_endpoints.clone(),
        cluster_endpoints,
        local_endpoints: vec![],
        node_local_dns: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;

    use crate::model::store::test_state as state;

    fn plan_all(state: &mut ClusterState) -> (NodePlan, PlanDiff) {
        let mut plan = NodePlan::default();
        let changes = state.take_changes();
        let diff = plan.update(state, &changes.services);
        (plan, diff)
    }

    fn key(ns: &str, name: &str, port: &str, protocol: Protocol, family: IpFamily) -> PlanKey {
        PlanKey {
            port: ServicePortName {
                service: ServiceName::new(ns, name),
                port: port.into(),
                protocol,
            },
            family,
        }
    }

    fn ips(backends: &[Endpoint]) -> Vec<String> {
        backends.iter().map(|b| b.to_string()).collect()
    }

    const SVC: &str = r#"
kind: Service
metadata: {name: web, namespace: ns}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]
"#;

    #[test]
    fn ports_join_by_name_and_protocol() {
        let mut st = state(&[
            SVC,
            r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: dns, port: 9999, protocol: TCP}]
endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]
"#,
        ]);
        let (plan, diff) = plan_all(&mut st);
        assert_eq!(diff.upserted.len(), 2);
        let http = plan
            .get(&key("ns", "web", "http", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        assert_eq!(
            ips(&http.cluster_endpoints),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert_eq!(http.internal(), Traffic::Forward(&http.cluster_endpoints));
        let dns = plan
            .get(&key("ns", "web", "dns", Protocol::Udp, IpFamily::V4))
            .unwrap();
        assert_eq!(
            ips(&dns.cluster_endpoints),
            ["10.0.0.1:5353", "10.0.0.2:5353"]
        );
    }

    #[test]
    fn no_endpoints_rejects() {
        let mut st = state(&[SVC]);
        let (plan, _) = plan_all(&mut st);
        let http = plan
            .get(&key("ns", "web", "http", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        assert_eq!(http.internal(), Traffic::Reject);
        assert_eq!(http.external(), Traffic::Reject);
    }

    #[test]
    fn duplicate_address_prefers_non_terminating() {
        let mut st = state(&[
            SVC,
            r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}]
"#,
            r#"
kind: EndpointSlice
metadata: {name: web-b, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
        ]);
        let (plan, _) = plan_all(&mut st);
        let http = plan
            .get(&key("ns", "web", "http", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        assert_eq!(ips(&http.cluster_endpoints), ["10.0.0.1:8080"]);
        assert!(http.has_any_endpoints);
    }

    #[test]
    fn dual_stack_uses_each_familys_slices() {
        let mut st = state(&[
            r#"
kind: Service
metadata: {name: web, namespace: ns}
spec:
  clusterIPs: [10.96.0.10, "fd00::10"]
  ports: [{port: 80}]
"#,
            r#"
kind: EndpointSlice
metadata: {name: web-4, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#,
            r#"
kind: EndpointSlice
metadata: {name: web-6, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
"#,
        ]);
        let (plan, _) = plan_all(&mut st);
        let v4 = plan
            .get(&key("ns", "web", "", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        let v6 = plan
            .get(&key("ns", "web", "", Protocol::Tcp, IpFamily::V6))
            .unwrap();
        assert_eq!(ips(&v4.cluster_endpoints), ["10.0.0.1:8080"]);
        assert_eq!(ips(&v6.cluster_endpoints), ["[fd00::1]:8080"]);
    }

    #[test]
    fn local_policies_drop_when_only_remote_endpoints_exist() {
        let mut st = state(&[
            r#"
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  internalTrafficPolicy: Local
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30080}]
"#,
            r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1], nodeName: node-b}]
"#,
        ]);
        let (plan, _) = plan_all(&mut st);
        let p = plan
            .get(&key("ns", "web", "", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        assert_eq!(p.internal(), Traffic::Drop);
        assert_eq!(p.external(), Traffic::Drop);
    }

    #[test]
    fn external_local_internal_cluster() {
        let mut st = state(&[
            r#"
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  ports: [{port: 80, nodePort: 30080}]
"#,
            r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints: [{addresses: [10.0.0.1], nodeName: node-b}, {addresses: [10.0.0.2], nodeName: node-a}]
"#,
        ]);
        let (plan, _) = plan_all(&mut st);
        let p = plan
            .get(&key("ns", "web", "", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        assert_eq!(
            ips(&p.cluster_endpoints),
            ["10.0.0.1:8080", "10.0.0.2:8080"]
        );
        assert_eq!(ips(&p.local_endpoints), ["10.0.0.2:8080"]);
        assert_eq!(p.external(), Traffic::Forward(&p.local_endpoints));
        assert_eq!(p.internal(), Traffic::Forward(&p.cluster_endpoints));
        assert_eq!(p.node_port, Some(30080));
    }

    #[test]
    fn ports_of_an_unsupported_protocol_are_skipped_not_half_programmed() {
        let mut st = state(&[
            "kind: Service\nmetadata: {name: m}\nspec: {clusterIP: 10.0.0.1, ports: [{name: a, port: 1, protocol: SCTP}, {name: b, port: 2}]}",
        ]);
        st.set_unsupported_protocols(vec![Protocol::Sctp]);
        let (plan, diff) = plan_all(&mut st);
        assert_eq!(plan.len(), 1, "only the TCP port");
        assert_eq!(diff.skipped.len(), 1);
        assert_eq!(diff.skipped[0].port.to_string(), "default/m:a");
        assert_eq!(diff.skipped[0].port.protocol, Protocol::Sctp);
        assert_eq!(diff.skipped[0].reason, SkipReason::UnsupportedProtocol);
    }

    #[test]
    fn a_cluster_ip_that_is_the_nodes_own_address_is_not_programmed() {
        let mut st = state(&[
            "kind: Service\nmetadata: {name: hijack}\nspec: {clusterIPs: [10.1.0.5, 'fd00::5'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, ports: [{name: a, port: 22}]}",
            "kind: Service\nmetadata: {name: fine}\nspec: {clusterIP: 10.0.0.2, ports: [{port: 80}]}",
            "kind: Node\nmetadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 10.1.0.5}]}",
        ]);
        let (mut plan, diff) = plan_all(&mut st);
        let keys: Vec<String> = plan
            .keys_sorted()
            .iter()
            .map(|k| format!("{} {}", k.port, k.family))
            .collect();
        assert_eq!(keys, ["default/fine IPv4", "default/hijack:a IPv6"]);
        assert_eq!(diff.skipped.len(), 1);
        assert_eq!(diff.skipped[0].port.to_string(), "default/hijack:a");
        assert_eq!(
            diff.skipped[0].reason,
            SkipReason::ClusterIpIsNodeAddress("10.1.0.5".parse().unwrap())
        );
        // The node's address moves away: the ClusterIP is programmed again.
        let node: Node = serde_saphyr::from_str(
            "metadata: {name: node-a}\nstatus: {addresses: [{type: InternalIP, address: 10.1.0.6}]}",
        )
        .unwrap();
        st.apply_node(&node).unwrap();
        let changes = st.take_changes();
        let diff = plan.update(&st, &changes.services);
        assert!(diff.skipped.is_empty());
        assert_eq!(plan.len(), 3, "both families of hijack:a, and fine");
    }

    #[test]
    fn unproxied_services_have_no_plans() {
        let mut st = state(&[
            "kind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 1}]}",
            "kind: Service\nmetadata: {name: x, labels: {service.kubernetes.io/service-proxy-name: y}}\nspec: {clusterIP: 10.0.0.1, ports: [{port: 1}]}",
            "kind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}",
        ]);
        let (plan, diff) = plan_all(&mut st);
        assert!(plan.is_empty() && diff.is_empty());
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let mut st = state(&[
            SVC,
            "kind: Service\nmetadata: {name: other, namespace: ns}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}",
        ]);
        let (mut plan, diff) = plan_all(&mut st);
        assert_eq!(diff.upserted.len(), 3);

        // An endpoint appears for web's http port only.
        let slice: EndpointSlice = serde_saphyr::from_str(
            "metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}]",
        )
        .unwrap();
        st.apply_slice(&slice).unwrap();
        let changes = st.take_changes();
        let diff = plan.update(&st, &changes.services);
        assert_eq!(diff.upserted.len(), 1, "only web:http changed");
        assert_eq!(diff.upserted[0].new.key.port.port, "http");
        assert!(diff.upserted[0].old.is_some());
        assert!(diff.removed.is_empty());

        // A port goes away; the service is deleted.
        let svc: Service = serde_saphyr::from_str(
            "metadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80}]}",
        )
        .unwrap();
        st.apply_service(&svc).unwrap();
        let changes = st.take_changes();
        let diff = plan.update(&st, &changes.services);
        assert_eq!(diff.removed.len(), 1);
        assert_eq!(diff.removed[0].key.port.port, "dns");
        assert!(diff.upserted.is_empty());

        st.delete_service(&ServiceName::new("ns", "web"));
        let changes = st.take_changes();
        let diff = plan.update(&st, &changes.services);
        assert_eq!(diff.removed.len(), 1);
        assert_eq!(plan.len(), 1);
    }

    #[test]
    fn a_frontend_claimed_twice_goes_to_the_first_service_by_name() {
        let svc = |name: &str, cluster_ip: &str, extra: &str| {
            format!(
                "kind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {cluster_ip}, type: NodePort, ports: [{{port: 80, nodePort: 30080}}]{extra}}}"
            )
        };
        // Arrival order does not matter: b first, then a.
        let mut st = state(&[
            &svc("b", "10.96.0.2", ", externalIPs: [192.0.2.1, 192.0.2.2]"),
            &svc("a", "10.96.0.1", ", externalIPs: [192.0.2.1]"),
            &svc("c", "10.96.0.1", ""),
        ]);
        let (mut plan, diff) = plan_all(&mut st);
        let of = |plan: &NodePlan, name: &str| {
            plan.get(&key("ns", name, "", Protocol::Tcp, IpFamily::V4))
                .map(|p| {
                    (
                        p.external_ips
                            .iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>(),
                        p.node_port,
                    )
                })
        };
        assert_eq!(
            of(&plan, "a"),
            Some((vec!["192.0.2.1".into()], Some(30080)))
        );
        assert_eq!(
            of(&plan, "b"),
            Some((vec!["192.0.2.2".into()], None)),
            "b keeps what a does not claim"
        );
        assert_eq!(of(&plan, "c"), None, "c lost its ClusterIP to a");
        let mut lost: Vec<String> = diff
            .conflicts
            .iter()
            .map(|c| format!("{} {} {}", c.loser, c.frontend, c.winner))
            .collect();
        lost.sort();
        assert_eq!(
            lost,
            [
                "ns/b 192.0.2.1:80/TCP ns/a",
                "ns/b NodePort 30080/TCP (IPv4) ns/a",
                "ns/c 10.96.0.1:80/TCP ns/a",
            ]
        );

        // a goes away: b and c get what they asked for, in the same update.
        st.delete_service(&ServiceName::new("ns", "a"));
        let changes = st.take_changes();
        let diff = plan.update(&st, &changes.services);
        assert_eq!(
            of(&plan, "b"),
            Some((vec!["192.0.2.1".into(), "192.0.2.2".into()], Some(30080)))
        );
        assert!(of(&plan, "c").is_some());
        let mut upserted: Vec<&str> = diff
            .upserted
            .iter()
            .map(|u| u.new.key.port.service.name.as_str())
            .collect();
        upserted.sort();
        assert_eq!(upserted, ["b", "c"], "{diff:?}");
        assert_eq!(diff.removed.len(), 1, "a's plan");
        // c now shares a NodePort with b; b keeps it.
        assert_eq!(diff.conflicts.len(), 1, "{:?}", diff.conflicts);
    }

    #[test]
    fn node_zone_change_recomputes_hints() {
        let mut st = state(&[
            SVC,
            r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.0.0.1], hints: {forZones: [{name: z1}]}}
  - {addresses: [10.0.0.2], hints: {forZones: [{name: z2}]}}
"#,
        ]);
        let (mut plan, _) = plan_all(&mut st);
        let k = key("ns", "web", "http", Protocol::Tcp, IpFamily::V4);
        assert_eq!(
            plan.get(&k).unwrap().cluster_endpoints.len(),
            2,
            "no zone yet: hints ignored"
        );
        let node: Node = serde_saphyr::from_str(
            "metadata: {name: node-a, labels: {topology.kubernetes.io/zone: z2}}",
        )
        .unwrap();
        st.apply_node(&node).unwrap();
        let changes = st.take_changes();
        assert!(changes.node_changed);
        plan.update(&st, &changes.services);
        assert_eq!(
            ips(&plan.get(&k).unwrap().cluster_endpoints),
            ["10.0.0.2:8080"]
        );
    }

    #[test]
    fn slices_for_unknown_services_wait_for_the_service() {
        let slice = r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1]}]
"#;
        let mut st = state(&[slice]);
        let (mut plan, diff) = plan_all(&mut st);
        assert!(diff.is_empty());
        let svc: Service = serde_saphyr::from_str(SVC).unwrap();
        st.apply_service(&svc).unwrap();
        let changes = st.take_changes();
        plan.update(&st, &changes.services);
        let http = plan
            .get(&key("ns", "web", "http", Protocol::Tcp, IpFamily::V4))
            .unwrap();
        assert_eq!(http.cluster_endpoints.len(), 1);
    }

    #[test]
    fn only_the_dns_ports_of_the_cluster_dns_service_are_answered_locally() {
        let kube_dns = r#"
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 10.96.0.10
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
  - {name: metrics, port: 9153, protocol: TCP}
"#;
        let other_dns = "kind: Service\nmetadata: {name: dns, namespace: other}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 53, protocol: UDP}]}";
        let mut st = state(&[kube_dns, other_dns]);
        let local = |plan: &NodePlan, ns: &str, name: &str, port: &str, protocol| {
            plan.get(&key(ns, name, port, protocol, IpFamily::V4))
                .unwrap()
                .node_local_dns
        };
        let (mut plan, _) = plan_all(&mut st);
        assert!(!local(
            &plan,
            "kube-system",
            "kube-dns",
            "dns",
            Protocol::Udp
        ));

        st.set_node_local_dns(Some(ServiceName::new("kube-system", "kube-dns")));
        let changes = st.take_changes();
        let diff = plan.update(&st, &changes.services);
        assert_eq!(
            diff.upserted.len(),
            2,
            "both DNS ports change, nothing else"
        );
        assert!(local(
            &plan,
            "kube-system",
            "kube-dns",
            "dns",
            Protocol::Udp
        ));
        assert!(local(
            &plan,
            "kube-system",
            "kube-dns",
            "dns-tcp",
            Protocol::Tcp
        ));
        assert!(!local(
            &plan,
            "kube-system",
            "kube-dns",
            "metrics",
            Protocol::Tcp
        ));
        assert!(!local(&plan, "other", "dns", "", Protocol::Udp));

        st.set_node_local_dns(None);
        let changes = st.take_changes();
        plan.update(&st, &changes.services);
        assert!(!local(
            &plan,
            "kube-system",
            "kube-dns",
            "dns",
            Protocol::Udp
        ));
    }
}
