//! Sequences of Service, EndpointSlice and Node changes applied to the model
//! (agent/src/model/store.rs), with the incremental plan diff (model/plan.rs) and
//! DNS zone (dns/zone.rs) computed after each batch, as the proxy loop does. The
//! input is structured with `arbitrary`; names, addresses and ports come from small
//! pools so that services collide (shared frontends, slices changing owner).
//!
//! Invariants: applying every diff to a copy gives the plan (what backends rely
//! on: they apply exactly the diffs); each upsert's `old` is what the copy held; the
//! incremental plan and zone equal ones computed from scratch; deleting everything
//! leaves no plan.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use ferry::dns::records::service_records;
use ferry::dns::zone::{Outcome, QType, Rec, Zone};
use ferry::model::{
    ClusterDomain, ClusterState, NodePlan, PlanDiff, PlanKey, Protocol, ServiceName,
    ServicePortPlan,
};
use serde_json::{Value, json};

const NAMESPACES: [&str; 2] = ["default", "shop"];
const SERVICES: [&str; 4] = ["web", "db", "dns", "api"];
const V4: [&str; 5] = [
    "10.96.0.10",
    "10.96.0.11",
    "10.96.0.12",
    "10.97.0.1",
    "192.0.2.10",
];
const V6: [&str; 3] = ["fd00:96::10", "fd00:96::11", "2001:db8::10"];
const EXTERNAL: [&str; 4] = ["192.0.2.1", "192.0.2.2", "2001:db8::1", "10.96.0.10"];
const ENDPOINTS_V4: [&str; 4] = ["10.244.0.1", "10.244.0.2", "10.244.1.1", "10.96.0.11"];
const ENDPOINTS_V6: [&str; 3] = ["fd00:244::1", "fd00:244::2", "fd00:244:1::1"];
const PORT_NAMES: [&str; 3] = ["", "http", "dns"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const PORTS: [i32; 4] = [53, 80, 443, 8080];
const NODES: [&str; 2] = [super::NODE, "node-b"];
const ZONES: [&str; 2] = ["zone-a", "zone-b"];
/// Slice names per namespace.
const SLICES: usize = 6;
/// Most operations one input applies.
const MAX_OPS: usize = 64;

fn pick<T: Copy>(pool: &[T], i: u8) -> T {
    pool[usize::from(i) % pool.len()]
}

/// A whole scenario: node settings, then changes.
#[derive(Arbitrary, Debug)]
pub struct Scenario {
    /// The kernel lacks SCTP.
    sctp_unsupported: bool,
    /// `--service-cluster-ip-range` (10.96.0.0/16, fd00:96::/112).
    cluster_ip_range: bool,
    /// The Service whose DNS port this node answers itself.
    node_local_dns: Option<u8>,
    ops: Vec<Op>,
}

/// One change, or a sync (the proxy loop's batch boundary).
#[derive(Arbitrary, Debug)]
pub enum Op {
    Service(Svc),
    DeleteService(u8),
    Slice(Slice),
    DeleteSlice { namespace: u8, id: u8 },
    Node(NodeSpec),
    DeleteNode,
    Sync,
}

/// A Service from the pools.
#[derive(Arbitrary, Debug)]
pub struct Svc {
    id: u8,
    /// ClusterIP, NodePort, LoadBalancer, ExternalName, headless.
    kind: u8,
    v4: Option<u8>,
    v6: Option<u8>,
    v6_first: bool,
    ports: Vec<Port>,
    external_ips: Vec<u8>,
    load_balancer_ips: Vec<u8>,
    source_range: bool,
    internal_local: bool,
    external_local: bool,
    affinity: Option<u8>,
    publish_not_ready: bool,
    foreign_proxy: bool,
    health_check_node_port: bool,
}

/// A port of a Service or slice.
#[derive(Arbitrary, Debug)]
pub struct Port {
    name: u8,
    protocol: u8,
    port: u8,
    node_port: Option<u8>,
}

/// An EndpointSlice from the pools.
#[derive(Arbitrary, Debug)]
pub struct Slice {
    namespace: u8,
    id: u8,
    service: u8,
    v6: bool,
    ports: Vec<Port>,
    endpoints: Vec<Ep>,
}

/// One endpoint of a slice.
#[derive(Arbitrary, Debug)]
pub struct Ep {
    address: u8,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    node: Option<u8>,
    zone: Option<u8>,
    hint_zone: Option<u8>,
    hint_node: Option<u8>,
    hostname: bool,
}

/// This node's Node object.
#[derive(Arbitrary, Debug)]
pub struct NodeSpec {
    zone: Option<u8>,
    address: Option<u8>,
    leaving: bool,
}

fn service_name(id: u8) -> ServiceName {
    ServiceName::new(
        pick(&NAMESPACES, id / 4),
        SERVICES[usize::from(id) % SERVICES.len()],
    )
}

fn ports_json(ports: &[Port], service: bool) -> Value {
    ports
        .iter()
        .take(3)
        .map(|p| {
            let mut port = json!({
                "name": pick(&PORT_NAMES, p.name),
                "protocol": pick(&PROTOCOLS, p.protocol),
                "port": pick(&PORTS, p.port),
            });
            if service && let Some(n) = p.node_port {
                port["nodePort"] = json!(30000 + i32::from(n % 4));
            }
            port
        })
        .collect()
}

impl Svc {
    fn object(&self) -> k8s_openapi::api::core::v1::Service {
        let name = service_name(self.id);
        let kind = [
            "ClusterIP",
            "NodePort",
            "LoadBalancer",
            "ExternalName",
            "ClusterIP",
        ][usize::from(self.kind) % 5];
        let mut ips: Vec<&str> = self.v4.map(|i| pick(&V4, i)).into_iter().collect();
        if let Some(i) = self.v6 {
            ips.insert(usize::from(!self.v6_first).min(ips.len()), pick(&V6, i));
        }
        if self.kind % 5 == 4 {
            ips = vec!["None"];
        }
        let mut labels = serde_json::Map::new();
        if self.foreign_proxy {
            labels.insert(
                "service.kubernetes.io/service-proxy-name".into(),
                json!("other"),
            );
        }
        let mut spec = json!({
            "type": kind,
            "clusterIPs": ips,
            "ports": ports_json(&self.ports, true),
            "externalIPs": self.external_ips.iter().take(2).map(|&i| pick(&EXTERNAL, i)).collect::<Vec<_>>(),
            "internalTrafficPolicy": if self.internal_local { "Local" } else { "Cluster" },
            "externalTrafficPolicy": if self.external_local { "Local" } else { "Cluster" },
            "publishNotReadyAddresses": self.publish_not_ready,
        });
        if kind == "ExternalName" {
            spec["externalName"] = json!("example.com");
        }
        if self.source_range {
            spec["loadBalancerSourceRanges"] = json!(["192.0.2.0/24", "2001:db8::/64"]);
        }
        if let Some(t) = self.affinity {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] =
                json!({"clientIP": {"timeoutSeconds": 1 + i32::from(t)}});
        }
        if self.health_check_node_port {
            spec["healthCheckNodePort"] = json!(32000);
        }
        let ingress: Vec<Value> = (self.load_balancer_ips.iter().take(2))
            .map(|&i| json!({"ip": pick(&EXTERNAL, i)}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name.name, "namespace": name.namespace, "labels": labels},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": ingress}},
        }))
        .expect("a Service object")
    }
}

fn slice_name(id: u8) -> String {
    format!("slice-{}", usize::from(id) % SLICES)
}

impl Slice {
    fn object(&self) -> k8s_openapi::api::discovery::v1::EndpointSlice {
        let namespace = pick(&NAMESPACES, self.namespace);
        let service = SERVICES[usize::from(self.service) % SERVICES.len()];
        let endpoints: Vec<Value> = (self.endpoints.iter().take(4))
            .map(|ep| {
                let address = if self.v6 {
                    pick(&ENDPOINTS_V6, ep.address)
                } else {
                    pick(&ENDPOINTS_V4, ep.address)
                };
                let mut e = json!({
                    "addresses": [address],
                    "conditions": {"ready": ep.ready, "serving": ep.serving, "terminating": ep.terminating},
                });
                if let Some(n) = ep.node {
                    e["nodeName"] = json!(pick(&NODES, n));
                }
                if let Some(z) = ep.zone {
                    e["zone"] = json!(pick(&ZONES, z));
                }
                if ep.hint_zone.is_some() || ep.hint_node.is_some() {
                    let zones: Vec<Value> = ep.hint_zone.map(|z| json!({"name": pick(&ZONES, z)})).into_iter().collect();
                    let nodes: Vec<Value> = ep.hint_node.map(|n| json!({"name": pick(&NODES, n)})).into_iter().collect();
                    e["hints"] = json!({"forZones": zones, "forNodes": nodes});
                }
                if ep.hostname {
                    e["hostname"] = json!(format!("pod-{}", ep.address % 4));
                }
                e
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": slice_name(self.id),
                "namespace": namespace,
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": if self.v6 { "IPv6" } else { "IPv4" },
            "ports": ports_json(&self.ports, false),
            "endpoints": endpoints,
        }))
        .expect("an EndpointSlice object")
    }
}

impl NodeSpec {
    fn object(&self) -> k8s_openapi::api::core::v1::Node {
        let labels: serde_json::Map<String, Value> = (self.zone)
            .map(|z| {
                (
                    "topology.kubernetes.io/zone".to_owned(),
                    json!(pick(&ZONES, z)),
                )
            })
            .into_iter()
            .collect();
        let addresses: Vec<Value> = (self.address)
            .map(|a| json!({"type": "InternalIP", "address": pick(&["10.0.0.1", "10.96.0.12"], a)}))
            .into_iter()
            .collect();
        let taints: Vec<Value> = match self.leaving {
            true => vec![json!({"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"})],
            false => Vec::new(),
        };
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": super::NODE, "labels": labels},
            "spec": {"podCIDRs": ["10.244.0.0/24"], "taints": taints},
            "status": {"addresses": addresses},
        }))
        .expect("a Node object")
    }
}

/// The model, its incremental plan and zone, and what a backend built from the diffs.
struct Run {
    state: ClusterState,
    plan: NodePlan,
    zone: Zone,
    backend: BTreeMap<PlanKey, Arc<ServicePortPlan>>,
    domain: ClusterDomain,
}

/// Decodes a [`Scenario`] from the fuzzer's bytes and plays it.
pub fn run(data: &[u8]) {
    let Ok(scenario) = Scenario::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    play(&scenario);
}

/// Plays a scenario, checking the invariants after every sync.
pub fn play(scenario: &Scenario) {
    let domain = ClusterDomain::default();
    let mut state = ClusterState::new(super::NODE);
    state.track_dns();
    if scenario.sctp_unsupported {
        state.set_unsupported_protocols(vec![Protocol::Sctp]);
    }
    if scenario.cluster_ip_range {
        state.set_service_cluster_ip_ranges(vec![
            "10.96.0.0/16".parse().expect("a CIDR"),
            "fd00:96::/112".parse().expect("a CIDR"),
        ]);
    }
    state.set_node_local_dns(scenario.node_local_dns.map(service_name));
    let mut zone = Zone::new(&domain);
    zone.set_synced();
    let mut run = Run {
        state,
        plan: NodePlan::default(),
        zone,
        backend: BTreeMap::new(),
        domain,
    };
    for op in scenario.ops.iter().take(MAX_OPS) {
        match op {
            Op::Service(svc) => {
                let _ = run.state.apply_service(&svc.object());
            }
            Op::DeleteService(id) => {
                run.state.delete_service(&service_name(*id));
            }
            Op::Slice(slice) => {
                let _ = run.state.apply_slice(&slice.object());
            }
            Op::DeleteSlice { namespace, id } => {
                run.state
                    .delete_slice(pick(&NAMESPACES, *namespace), &slice_name(*id));
            }
            Op::Node(node) => {
                let _ = run.state.apply_node(&node.object());
            }
            Op::DeleteNode => {
                run.state.delete_node(super::NODE);
            }
            Op::Sync => run.sync(),
        }
    }
    run.sync();

    // Everything deleted: nothing left to program.
    for id in 0..(NAMESPACES.len() * SERVICES.len()) as u8 {
        run.state.delete_service(&service_name(id));
    }
    for namespace in NAMESPACES {
        for id in 0..SLICES as u8 {
            run.state.delete_slice(namespace, &slice_name(id));
        }
    }
    run.sync();
    assert!(run.plan.is_empty(), "plans left after deleting everything");
    assert!(run.backend.is_empty(), "the diffs left plans behind");
    assert!(run.zone.is_empty(), "names left after deleting everything");
}

impl Run {
    /// The proxy loop's sync: the plans and DNS records of what changed, checked.
    fn sync(&mut self) {
        let changes = self.state.take_changes();
        let diff = self.plan.update(&self.state, &changes.services);
        self.apply_to_backend(&diff);
        let keys = self.plan.keys_sorted();
        assert!(
            keys.iter().eq(self.backend.keys()),
            "the diffs do not add up to the plan: {keys:?} vs {:?}",
            self.backend.keys().collect::<Vec<_>>()
        );
        for key in &keys {
            assert_eq!(
                self.plan.get(key).map(|p| &**p),
                self.backend.get(key).map(|p| &**p),
                "{key:?}"
            );
        }

        // The same plan computed from scratch.
        let all: Vec<ServiceName> = self.state.services().map(|s| s.name.clone()).collect();
        let mut fresh = NodePlan::default();
        fresh.update(&self.state, &all);
        assert_eq!(
            fresh.keys_sorted(),
            keys,
            "incremental and full plans differ"
        );
        for key in &keys {
            assert_eq!(fresh.get(key), self.plan.get(key), "{key:?}");
        }

        // DNS: the zone follows the services whose records changed.
        for name in self.state.take_dns_changes() {
            let records = self.state.service(&name).map(|svc| {
                let slices: Vec<_> = self.state.slices_of(&name).map(|s| s.as_ref()).collect();
                service_records(svc, &slices, &self.domain)
            });
            self.zone.update(&name, records);
        }
        let mut scratch = Zone::new(&self.domain);
        scratch.set_synced();
        for svc in self.state.services() {
            let slices: Vec<_> = self
                .state
                .slices_of(&svc.name)
                .map(|s| s.as_ref())
                .collect();
            scratch.update(&svc.name, Some(service_records(svc, &slices, &self.domain)));
        }
        assert_eq!(
            scratch.len(),
            self.zone.len(),
            "incremental and full zones differ"
        );
        for (qname, qtype) in questions() {
            let (a, b) = (
                self.zone.lookup(&qname, qtype),
                scratch.lookup(&qname, qtype),
            );
            assert!(
                same_outcome(&a, &b),
                "{qname} {qtype:?}: incremental {a:?}, full {b:?}"
            );
        }
    }

    /// What a backend does with a diff: remove, then put in place.
    fn apply_to_backend(&mut self, diff: &PlanDiff) {
        for removed in &diff.removed {
            let had = self.backend.remove(&removed.key);
            assert_eq!(
                had.as_deref(),
                Some(&**removed),
                "a removal of what the backend does not hold"
            );
        }
        for up in &diff.upserted {
            assert!(
                !diff.removed.iter().any(|r| r.key == up.new.key),
                "{:?} both removed and upserted",
                up.new.key
            );
            let had = self.backend.insert(up.new.key.clone(), up.new.clone());
            assert_eq!(
                had.as_deref(),
                up.old.as_deref(),
                "an upsert whose old plan is not what the backend holds"
            );
            assert_ne!(
                up.old.as_deref(),
                Some(&*up.new),
                "an upsert that changes nothing"
            );
        }
    }
}

/// Names the zone may hold, with the types asked of them.
fn questions() -> Vec<(String, QType)> {
    let mut out = Vec::new();
    for namespace in NAMESPACES {
        for service in SERVICES {
            let base = format!("{service}.{namespace}.svc.cluster.local.");
            for qtype in [QType::A, QType::Aaaa, QType::Srv, QType::Any] {
                out.push((base.clone(), qtype));
            }
            for host in ["pod-0", "pod-1", "pod-2", "pod-3", "10-244-0-1"] {
                out.push((format!("{host}.{base}"), QType::A));
            }
            for port in ["http", "dns"] {
                for proto in ["_tcp", "_udp", "_sctp"] {
                    out.push((format!("_{port}.{proto}.{base}"), QType::Srv));
                }
            }
        }
        out.push((format!("{namespace}.svc.cluster.local."), QType::A));
    }
    let reverse = |ip: IpAddr| ferry::dns::zone::reverse_of(&ip);
    for ip in V4
        .iter()
        .chain(&V6)
        .chain(&ENDPOINTS_V4)
        .chain(&ENDPOINTS_V6)
    {
        out.push((reverse(ip.parse().expect("an address")), QType::Ptr));
    }
    out
}

/// The same outcome, records in any order.
fn same_outcome(a: &Outcome, b: &Outcome) -> bool {
    let same = |x: &[Rec], y: &[Rec]| {
        x.len() == y.len()
            && x.iter().all(|r| {
                x.iter().filter(|o| *o == r).count() == y.iter().filter(|o| *o == r).count()
            })
    };
    match (a, b) {
        (
            Outcome::Answer {
                answers: a1,
                additionals: a2,
            },
            Outcome::Answer {
                answers: b1,
                additionals: b2,
            },
        ) => same(a1, b1) && same(a2, b2),
        _ => a == b,
    }
}
