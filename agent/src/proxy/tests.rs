//! The loop against a fake data plane: what reaches the data plane, and when.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::*;
use crate::dataplane::{SyncError, SyncStats};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::model::{LocalAddress, PlanDiff, PlanKey, ServicePortPlan};

/// One call of [`DataPlane::sync`], as the fake saw it.
#[derive(Clone, Debug)]
struct Call {
    full: bool,
    plans: usize,
    /// The services in the plan, sorted.
    services: Vec<String>,
    upserted: Vec<PlanKey>,
    removed: Vec<PlanKey>,
    nodeport_ips: Vec<std::net::IpAddr>,
    /// Whether the watched name resolved while this sync ran.
    name_resolved: Option<bool>,
}

/// Records every sync; fails the next `fail` of them, and every one whose plan holds
/// a service named in `refuse` (as a kernel refuses a rule it cannot load).
#[derive(Clone, Default)]
struct FakeDataPlane {
    calls: Arc<Mutex<Vec<Call>>>,
    fail: Arc<Mutex<usize>>,
    refuse: Arc<Mutex<std::collections::HashSet<String>>>,
    /// A name to look up in cluster DNS at each sync.
    watched_name: Arc<Mutex<Option<(crate::dns::ClusterDns, String)>>>,
    /// When set, the next sync waits for a message on it (a kernel write that hangs).
    hold: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>>,
}

impl DataPlane for FakeDataPlane {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn describe(&self, plan: &ServicePortPlan) -> Vec<String> {
        vec![format!("fake entry for {}", plan.key.port)]
    }

    fn sync(
        &mut self,
        plan: &NodePlan,
        diff: &PlanDiff,
        node: &NodeNetwork,
        full: bool,
    ) -> Result<SyncStats, SyncError> {
        let keys = |plans: &mut dyn Iterator<Item = &ServicePortPlan>| -> Vec<PlanKey> {
            plans.map(|p| p.key.clone()).collect()
        };
        let mut services: Vec<String> = plan
            .iter()
            .map(|p| p.key.port.service.to_string())
            .collect();
        services.sort();
        services.dedup();
        let refused = services
            .iter()
            .any(|s| self.refuse.lock().unwrap().contains(s));
        self.calls.lock().unwrap().push(Call {
            full,
            plans: plan.len(),
            services,
            upserted: keys(&mut diff.upserted.iter().map(|u| u.new.as_ref())),
            removed: keys(&mut diff.removed.iter().map(|p| p.as_ref())),
            nodeport_ips: node.nodeport_ips.clone(),
            name_resolved: self
                .watched_name
                .lock()
                .unwrap()
                .as_ref()
                .map(|(dns, name)| {
                    matches!(
                        dns.lookup(name, crate::dns::zone::QType::A),
                        crate::dns::zone::Outcome::Answer { .. }
                    )
                }),
        });
        let hold = self.hold.lock().unwrap().take();
        if let Some(release) = hold {
            let _ = release.recv();
        }
        let mut fail = self.fail.lock().unwrap();
        if *fail > 0 || refused {
            *fail = fail.saturating_sub(1);
            return Err(SyncError::Iptables {
                family: crate::model::IpFamily::V4,
                partial: !full,
                source: crate::dataplane::iptables::exec::ExecError::Spawn {
                    tool: "iptables-restore",
                    source: std::io::Error::other("fake failure"),
                },
            });
        }
        Ok(SyncStats::default())
    }
}

struct Harness {
    proxy: ProxyLoop,
    fake: FakeDataPlane,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

fn harness() -> Harness {
    harness_with_dns(None)
}

/// A harness whose loop also feeds `dns`.
fn harness_with_dns(dns: Option<crate::dns::ClusterDns>) -> Harness {
    let fake = FakeDataPlane::default();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    let config = ProxyConfig {
        node_name: "node-a".into(),
        local_detection: crate::model::LocalDetection::ClusterCidr(vec![]),
        nodeport_addresses: NodePortAddresses::Primary,
        masquerade_all: false,
        min_sync_period: Duration::ZERO,
        unsupported_protocols: vec![],
        service_cluster_ip_ranges: vec![],
        families: vec![crate::model::IpFamily::V4],
        sync_period: Duration::from_secs(3600),
        full_sync_period: Duration::from_secs(3600),
    };
    let host = host_with("172.18.0.2");
    let proxy = ProxyLoop::new(
        config,
        Box::new(fake.clone()),
        Report::new(
            metrics.clone(),
            health.clone(),
            vec![crate::model::IpFamily::V4],
        ),
        host,
    );
    let proxy = match dns {
        Some(dns) => proxy.with_dns(dns, Vec::new()),
        None => proxy,
    };
    Harness {
        proxy,
        fake,
        metrics,
        health,
    }
}

fn host_with(ip: &str) -> HostAddresses {
    HostAddresses {
        addresses: vec![LocalAddress {
            interface: "eth0".into(),
            ip: ip.parse().unwrap(),
        }],
        default_route_interfaces: ["eth0".to_owned()].into(),
    }
}

fn service(yaml: &str) -> SourceEvent {
    let svc: Service = serde_saphyr::from_str(yaml).unwrap();
    SourceEvent::Apply {
        object: Object::Service(Box::new(svc)),
        origin: "test".into(),
    }
}

fn slice(yaml: &str) -> SourceEvent {
    let slice: EndpointSlice = serde_saphyr::from_str(yaml).unwrap();
    SourceEvent::Apply {
        object: Object::EndpointSlice(Box::new(slice)),
        origin: "test".into(),
    }
}

const WEB: &str = "metadata: {name: web, namespace: ns}\nspec: {type: NodePort, clusterIP: 10.96.0.10, ports: [{port: 80, nodePort: 30080}]}";
const API: &str =
    "metadata: {name: api, namespace: ns}\nspec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}";
const WEB_SLICE: &str = "metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.244.0.10]}]";

impl Harness {
    fn feed(&mut self, events: impl IntoIterator<Item = SourceEvent>) {
        for event in events {
            self.proxy.handle(event);
        }
        self.proxy.after_batch();
    }

    fn calls(&self) -> Vec<Call> {
        self.fake.calls.lock().unwrap().clone()
    }
}

#[test]
fn nothing_is_programmed_until_the_source_is_complete() {
    let mut h = harness();
    h.feed([service(WEB), service(API)]);
    assert!(h.calls().is_empty(), "no sync before Synced");
    h.feed([SourceEvent::Synced]);
    let calls = h.calls();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].full);
    assert_eq!(calls[0].plans, 2);
}

#[test]
fn an_endpoint_change_is_a_partial_sync_of_its_plan_only() {
    let mut h = harness();
    h.feed([service(WEB), service(API), SourceEvent::Synced]);
    h.feed([slice(WEB_SLICE)]);
    let calls = h.calls();
    assert_eq!(calls.len(), 2);
    let partial = &calls[1];
    assert!(!partial.full);
    assert_eq!(partial.upserted.len(), 1);
    assert_eq!(partial.upserted[0].port.service.name, "web");
    assert!(partial.removed.is_empty());
    // The same change again is no change: nothing reaches the data plane.
    h.feed([slice(WEB_SLICE)]);
    assert_eq!(h.calls().len(), 2);
}

#[test]
fn an_invalid_object_is_counted_and_the_rest_programmed() {
    let mut h = harness();
    let bad = "metadata: {name: Bad_Name, namespace: ns}\nspec: {clusterIP: 10.96.0.12}";
    h.feed([service(bad), service(WEB), SourceEvent::Synced]);
    assert_eq!(h.calls()[0].plans, 1);
    let text = h.metrics.encode();
    assert!(
        text.contains("ferry_invalid_objects_total{kind=\"Service\"} 1"),
        "{text}"
    );
}

#[test]
fn a_failed_sync_is_retried_as_a_full_sync() {
    let mut h = harness();
    *h.fake.fail.lock().unwrap() = 1;
    h.feed([service(WEB), SourceEvent::Synced]);
    h.feed([slice(WEB_SLICE)]);
    assert_eq!(h.calls().len(), 1, "no new attempt before the retry time");
    h.proxy.retry_at = Some(Instant::now());
    h.feed([]);
    let calls = h.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].full, "the retry reprograms everything");
    assert!(h.metrics.encode().contains(
        "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1"
    ));
}

#[test]
fn retries_of_a_sync_that_keeps_failing_back_off() {
    let delays: Vec<u64> = (1..=8).map(|n| super::retry_delay(n).as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30, 30]);
    let mut h = harness();
    *h.fake.fail.lock().unwrap() = 3;
    h.feed([service(WEB), SourceEvent::Synced]);
    for _ in 0..2 {
        h.proxy.retry_at = Some(Instant::now());
        h.feed([]);
    }
    assert_eq!(h.calls().len(), 3);
    let wait = h.proxy.retry_at.expect("retry planned") - Instant::now();
    assert!(
        wait > Duration::from_secs(3),
        "the third failure waits ~4 s: {wait:?}"
    );
    h.proxy.retry_at = Some(Instant::now());
    h.feed([]);
    assert_eq!(h.proxy.failures, 0, "a success resets the back-off");
}

#[test]
fn a_host_address_change_reprograms_nodeport_addresses() {
    let mut h = harness();
    h.feed([service(WEB), SourceEvent::Synced]);
    assert_eq!(
        h.calls()[0].nodeport_ips,
        ["172.18.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    h.feed([SourceEvent::HostAddresses(host_with("172.18.0.3"))]);
    let calls = h.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls[1].full);
    assert_eq!(
        calls[1].nodeport_ips,
        ["172.18.0.3".parse::<std::net::IpAddr>().unwrap()]
    );
    // The same addresses again change nothing.
    h.feed([SourceEvent::HostAddresses(host_with("172.18.0.3"))]);
    assert_eq!(h.calls().len(), 2);
}

#[test]
fn changes_within_the_min_sync_period_wait_for_one_sync() {
    let mut h = harness();
    h.proxy.config.min_sync_period = Duration::from_secs(3600);
    h.feed([service(WEB), SourceEvent::Synced]);
    h.feed([slice(WEB_SLICE)]);
    h.feed([service(API)]);
    assert_eq!(h.calls().len(), 1, "batched until the period passes");
    assert!(h.proxy.next_wakeup() > Duration::from_secs(3000));
    h.proxy.last_sync = Some(Instant::now() - Duration::from_secs(3600));
    h.feed([]);
    let calls = h.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].upserted.len(), 2, "both changes in one sync");
}

#[test]
fn network_programming_latency_starts_at_the_slices_trigger_time() {
    let mut h = harness();
    h.feed([service(WEB), SourceEvent::Synced]);
    let triggered = jiff::Timestamp::now() + jiff::SignedDuration::from_millis(1);
    let with_trigger = WEB_SLICE.replacen(
        "labels:",
        &format!("annotations: {{endpoints.kubernetes.io/last-change-trigger-time: '{triggered}'}}, labels:"),
        1,
    );
    std::thread::sleep(Duration::from_millis(2));
    h.feed([slice(&with_trigger)]);
    let text = h.metrics.encode();
    assert!(
        text.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1"),
        "{text}"
    );
    // A slice without the annotation is not measured there.
    h.feed([slice(&WEB_SLICE.replace("10.244.0.10", "10.244.0.11"))]);
    let text = h.metrics.encode();
    assert!(
        text.contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1"),
        "{text}"
    );
}

#[test]
fn a_node_being_deleted_is_not_eligible_for_load_balancer_traffic() {
    let mut h = harness();
    let health = h.health.clone();
    h.feed([service(WEB), SourceEvent::Synced]);
    assert!(health.status().eligible);
    let node = |extra: &str| {
        let node: k8s_openapi::api::core::v1::Node =
            serde_saphyr::from_str(&format!("metadata: {{name: node-a}}\n{extra}")).unwrap();
        SourceEvent::Apply {
            object: Object::Node(Box::new(node)),
            origin: "test".into(),
        }
    };
    h.feed([node(
        "spec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}",
    )]);
    assert!(!health.status().eligible);
    h.feed([node("spec: {}")]);
    assert!(health.status().eligible);
    let deleted: k8s_openapi::api::core::v1::Node = serde_saphyr::from_str(
        "metadata: {name: node-a, deletionTimestamp: '2026-12-01T00:00:00Z'}",
    )
    .unwrap();
    h.feed([SourceEvent::Apply {
        object: Object::Node(Box::new(deleted)),
        origin: "test".into(),
    }]);
    assert!(
        !health.status().eligible,
        "a deletionTimestamp means leaving"
    );
}

#[test]
fn dns_publishes_a_service_once_programmed_and_withdraws_it_before_removal() {
    let domain = crate::model::ClusterDomain::new("cluster.local").unwrap();
    let dns = crate::dns::ClusterDns::new(&domain);
    let mut h = harness_with_dns(Some(dns.clone()));
    let name = "web.ns.svc.cluster.local.";
    *h.fake.watched_name.lock().unwrap() = Some((dns.clone(), name.to_owned()));
    let resolves = || {
        matches!(
            dns.lookup(name, crate::dns::zone::QType::A),
            crate::dns::zone::Outcome::Answer { .. }
        )
    };
    h.feed([service(WEB), SourceEvent::Synced]);
    assert!(
        resolves(),
        "published after the sync: {:?}",
        dns.lookup(name, crate::dns::zone::QType::A)
    );
    h.feed([SourceEvent::Delete(crate::model::ObjectRef {
        kind: Kind::Service,
        namespace: "ns".into(),
        name: "web".into(),
    })]);
    assert!(!resolves());
    let seen: Vec<Option<bool>> = h.calls().iter().map(|c| c.name_resolved).collect();
    assert_eq!(
        seen,
        [Some(false), Some(false)],
        "not resolvable while its frontend is being programmed, nor while it is being removed"
    );
}

/// A data-plane write that hangs holds back no DNS change that needs no programming
/// (a headless service's records appear while it hangs), and the records that do
/// wait for it (a new ClusterIP's name appears once the write is done).
#[test]
fn dns_is_served_while_a_data_plane_write_hangs() {
    let domain = crate::model::ClusterDomain::new("cluster.local").unwrap();
    let dns = crate::dns::ClusterDns::new(&domain);
    let mut h = harness_with_dns(Some(dns.clone()));
    h.feed([service(WEB), SourceEvent::Synced]);
    let resolves = |name: &str| {
        matches!(
            dns.lookup(name, crate::dns::zone::QType::A),
            crate::dns::zone::Outcome::Answer { .. }
        )
    };
    let (tx, rx) = crate::source::queue::queue();
    h.proxy.events = Some(rx);
    let (release, hold) = std::sync::mpsc::channel();
    *h.fake.hold.lock().unwrap() = Some(hold);
    let mut proxy = h.proxy;
    let looping = std::thread::spawn(move || {
        proxy.handle(service(API));
        proxy.after_batch();
        proxy
    });
    // The write for `api` now hangs; a headless service arrives meanwhile.
    let headless =
        "metadata: {name: db, namespace: ns}\nspec: {clusterIP: None, ports: [{port: 5432}]}";
    let db_slice = "metadata: {name: db-a, namespace: ns, labels: {kubernetes.io/service-name: db}}\naddressType: IPv4\nports: [{port: 5432}]\nendpoints: [{addresses: [10.244.0.20]}]";
    assert!(tx.send(service(headless)).is_ok());
    assert!(tx.send(slice(db_slice)).is_ok());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !resolves("db.ns.svc.cluster.local.") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        resolves("db.ns.svc.cluster.local."),
        "the headless service waited for the hanging write"
    );
    assert!(
        !resolves("api.ns.svc.cluster.local."),
        "published before its frontend was programmed"
    );
    assert!(!looping.is_finished(), "the write is still hanging");
    release.send(()).unwrap();
    let _proxy = looping.join().unwrap();
    assert!(
        resolves("api.ns.svc.cluster.local."),
        "published once programmed"
    );
    assert!(resolves("web.ns.svc.cluster.local."));
}

const BAD: &str =
    "metadata: {name: bad, namespace: ns}\nspec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}";
const WORSE: &str =
    "metadata: {name: worse, namespace: ns}\nspec: {clusterIP: 10.96.0.13, ports: [{port: 80}]}";

impl Harness {
    /// The kernel refuses any plan holding these services.
    fn refuse(&self, services: &[&str]) {
        let mut refuse = self.fake.refuse.lock().unwrap();
        refuse.clear();
        refuse.extend(services.iter().map(|s| s.to_string()));
    }

    /// Runs the loop, retries without their wait, until no sync is due; returns how
    /// many syncs that took.
    fn settle(&mut self) -> usize {
        let before = self.calls().len();
        for _ in 0..64 {
            if !self.proxy.needs_full_sync && !self.proxy.quarantine.wants_full_sync() {
                break;
            }
            if self.proxy.retry_at.is_some() {
                self.proxy.retry_at = Some(Instant::now());
            }
            self.feed([]);
        }
        self.calls().len() - before
    }

    fn quarantined(&self) -> Vec<String> {
        self.metrics.status.snapshot().quarantined
    }
}

#[test]
fn a_refused_service_port_at_start_is_quarantined_and_the_rest_programmed() {
    let mut h = harness();
    h.refuse(&["ns/bad"]);
    h.feed([
        service(WEB),
        service(BAD),
        service(API),
        SourceEvent::Synced,
    ]);
    let steps = h.settle();
    assert!(steps <= 6, "a bisection, not one sync per port: {steps}");
    let last = h.calls().last().cloned().unwrap();
    assert_eq!(last.services, ["ns/api", "ns/web"]);
    assert!(h.proxy.retry_at.is_none(), "nothing left to retry");
    assert_eq!(h.quarantined().len(), 1);
    assert!(
        h.quarantined()[0].starts_with("ns/bad (IPv4): "),
        "{:?}",
        h.quarantined()
    );
    assert!(h.quarantined()[0].contains("fake failure"));
    assert!(
        h.metrics
            .encode()
            .contains("ferry_quarantined_service_ports 1"),
    );
    // `ferry explain` says why it is not programmed.
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    h.feed([SourceEvent::Question(crate::explain::Question {
        service: ServiceName::new("ns", "bad"),
        port: None,
        reply,
    })]);
    let explained = answer.try_recv().unwrap().expect("the service is known");
    let why = explained.ports[0]
        .not_programmed
        .clone()
        .unwrap_or_default();
    assert!(
        why.starts_with("the kernel refused it (quarantined): IPv4 rules"),
        "{why}"
    );
    assert!(explained.ports[0].programmed.is_empty());
    // A change elsewhere is a partial sync again, which leaves the held port out.
    h.feed([slice(WEB_SLICE)]);
    let last = h.calls().last().cloned().unwrap();
    assert!(!last.full);
    assert_eq!(last.services, ["ns/api", "ns/web"]);
    assert_eq!(last.upserted.len(), 1);
}

#[test]
fn a_refused_change_is_found_among_the_changed_ports_first() {
    let mut h = harness();
    h.feed([service(WEB), service(API), SourceEvent::Synced]);
    h.refuse(&["ns/bad"]);
    h.feed([service(BAD)]);
    assert!(
        h.proxy.retry_at.is_some(),
        "a failed partial sync is retried"
    );
    h.settle();
    let calls = h.calls();
    assert_eq!(
        calls.len(),
        5,
        "initial, partial, retry, without the change, the rest: {calls:#?}"
    );
    assert!(
        calls
            .iter()
            .all(|c| c.services.contains(&"ns/web".to_owned())),
        "the other services stay programmed throughout"
    );
    assert_eq!(calls.last().unwrap().services, ["ns/api", "ns/web"]);
    assert_eq!(h.quarantined().len(), 1);
}

#[test]
fn two_refused_ports_are_both_quarantined() {
    let mut h = harness();
    h.refuse(&["ns/bad", "ns/worse"]);
    let events = [WEB, BAD, API, WORSE].map(service);
    h.feed(events.into_iter().chain([SourceEvent::Synced]));
    h.settle();
    assert_eq!(h.calls().last().unwrap().services, ["ns/api", "ns/web"]);
    let held = h.quarantined();
    assert_eq!(held.len(), 2, "{held:?}");
    assert!(held[0].starts_with("ns/bad ") && held[1].starts_with("ns/worse "));
}

#[test]
fn a_quarantined_port_is_retried_later_and_released_when_its_service_goes() {
    let mut h = harness();
    h.refuse(&["ns/bad", "ns/worse"]);
    let events = [WEB, BAD, WORSE].map(service);
    h.feed(events.into_iter().chain([SourceEvent::Synced]));
    h.settle();
    assert_eq!(h.quarantined().len(), 2);
    // Deleting the service releases its port.
    h.feed([SourceEvent::Delete(crate::model::ObjectRef {
        kind: Kind::Service,
        namespace: "ns".into(),
        name: "worse".into(),
    })]);
    h.settle();
    assert_eq!(h.quarantined().len(), 1);
    // The retry while the kernel still refuses: held still, the rest put back at once.
    let probe = h.proxy.quarantine.next_probe().expect("a retry is planned");
    assert!(probe > Instant::now() + Duration::from_secs(10));
    h.proxy.quarantine.probe_now();
    h.feed([]);
    h.settle();
    let calls = h.calls();
    let (probe, after) = (&calls[calls.len() - 2], &calls[calls.len() - 1]);
    assert_eq!(probe.services, ["ns/bad", "ns/web"]);
    assert_eq!(after.services, ["ns/web"]);
    assert_eq!(h.quarantined().len(), 1);
    // Once the kernel takes it, the retry programs it.
    h.refuse(&[]);
    h.proxy.quarantine.probe_now();
    h.feed([]);
    h.settle();
    assert_eq!(h.calls().last().unwrap().services, ["ns/bad", "ns/web"]);
    assert!(h.quarantined().is_empty());
    assert!(
        h.metrics
            .encode()
            .contains("ferry_quarantined_service_ports 0")
    );
}

#[test]
fn a_failure_no_port_explains_quarantines_nothing_and_backs_off() {
    let mut h = harness();
    *h.fake.fail.lock().unwrap() = usize::MAX;
    h.feed([service(WEB), service(API), SourceEvent::Synced]);
    for _ in 0..2 {
        h.proxy.retry_at = Some(Instant::now());
        h.feed([]);
    }
    let calls = h.calls();
    assert_eq!(
        calls.len(),
        3,
        "the first sync, its retry, the one without any port"
    );
    assert!(calls[2].services.is_empty());
    assert!(h.quarantined().is_empty());
    assert!(h.proxy.retry_at.is_some(), "plain retries with backoff");
    let tries = calls.len();
    // Retries do not start another search.
    h.proxy.retry_at = Some(Instant::now());
    h.feed([]);
    assert_eq!(h.calls().len(), tries + 1);
    assert!(h.proxy.retry_at.is_some());
}
