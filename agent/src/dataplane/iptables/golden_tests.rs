//! Golden tests: the data plane's full and partial syncs run against a fake
//! [`Runner`] that records every restore payload; the transcripts are compared with
//! `testdata/*.txt`, so any change to the text Ferry hands iptables-restore shows up
//! as a diff. Regenerate after an intended change with `FERRY_UPDATE_GOLDEN=1`.

use std::os::unix::process::ExitStatusExt as _;
use std::sync::{Arc, Mutex};

use super::exec::{ExecError, Runner, SaveSummary};
use super::render::Scope;
use super::{IptablesDataPlane, cleanup_with};
use crate::dataplane::{DataPlane as _, NodeNetwork, ProgrammedCount, SyncStats};
use crate::model::plan::test_plan;
use crate::model::{
    Endpoint, IpFamily, LocalTraffic, PlanDiff, PlanKey, Protocol, ServicePortPlan, Upsert,
};

/// What the fake tools of every family share: the transcript and the answers.
#[derive(Default)]
struct FakeState {
    /// Every payload restored, in order, under a `-- restore <family>` header.
    log: String,
    /// `iptables-save -t <table>` output per family and table.
    saves: Vec<(IpFamily, &'static str, String)>,
    /// The next restore fails (as iptables-restore rejecting the payload).
    fail_next_restore: bool,
    /// Chains `chain_exists` denies.
    missing: Vec<&'static str>,
    /// How often `chain_exists` ran (each is an iptables process on a real node).
    chain_checks: usize,
}

/// The fake tools of one family.
struct Fake {
    family: IpFamily,
    state: Arc<Mutex<FakeState>>,
}

impl Runner for Fake {
    fn restore_with(
        &self,
        write: &dyn Fn(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), ExecError> {
        let mut payload = Vec::new();
        write(&mut payload).expect("writing into memory");
        let mut state = self.state.lock().expect("fake state");
        state.log.push_str(&format!("-- restore {}\n", self.family));
        state
            .log
            .push_str(&String::from_utf8(payload).expect("UTF-8 payload"));
        if std::mem::take(&mut state.fail_next_restore) {
            return Err(ExecError::Failed {
                tool: "iptables-restore",
                status: std::process::ExitStatus::from_raw(1 << 8),
                stderr: "iptables-restore: line 2 failed".into(),
                context: String::new(),
            });
        }
        Ok(())
    }

    fn save_summary(&self, table: &str) -> Result<SaveSummary, ExecError> {
        let state = self.state.lock().expect("fake state");
        let mut summary = SaveSummary::default();
        for (_, _, text) in state
            .saves
            .iter()
            .filter(|(f, t, _)| *f == self.family && *t == table)
        {
            for line in text.lines() {
                summary.add_line(line.to_owned());
            }
        }
        Ok(summary)
    }

    /// A chain exists once a restore wrote this family's rules, or when a canned
    /// `iptables-save` declares it, unless the test removed it.
    fn chain_exists(&self, table: &str, chain: &str) -> bool {
        let mut state = self.state.lock().expect("fake state");
        state.chain_checks += 1;
        let declared = state.saves.iter().any(|(f, t, text)| {
            *f == self.family && *t == table && text.contains(&format!(":{chain} "))
        });
        let restored = state.log.contains(&format!("-- restore {}", self.family));
        !state.missing.contains(&chain) && (declared || restored)
    }

    fn enable_route_localnet(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("fake state");
        state
            .log
            .push_str(&format!("-- sysctl route_localnet=1 ({})\n", self.family));
        Ok(())
    }
}

/// A data plane on fake tools, the plans it was last given, and the transcript.
struct Harness {
    dp: IptablesDataPlane<Fake>,
    state: Arc<Mutex<FakeState>>,
    node: NodeNetwork,
    plans: Vec<ServicePortPlan>,
}

impl Harness {
    fn new(families: &[IpFamily], scope: Scope, node: NodeNetwork) -> Self {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let dp = IptablesDataPlane::with_runners(families, scope, |family| Fake {
            family,
            state: state.clone(),
        });
        Self {
            dp,
            state,
            node,
            plans: Vec::new(),
        }
    }

    fn note(&self, text: &str) {
        let mut state = self.state.lock().expect("fake state");
        state.log.push_str(&format!("== {text}\n"));
    }

    fn run(&mut self, diff: &PlanDiff, full: bool) {
        let result = self
            .dp
            .sync_plans(|| self.plans.iter(), diff, &self.node, full);
        let line = match result {
            Ok(stats) => stats_line(&stats),
            Err(err) => format!("-- error: {}\n", crate::report::error_chain(&err)),
        };
        self.state.lock().expect("fake state").log.push_str(&line);
    }

    /// A full sync of `plans`.
    fn full(&mut self, title: &str, plans: Vec<ServicePortPlan>) {
        self.note(&format!("full sync: {title}"));
        self.plans = plans;
        self.run(&PlanDiff::default(), true);
    }

    /// A partial sync: `upserts` replace (or join) the plans with their keys, the
    /// plans with the `removed` keys go.
    fn partial(&mut self, title: &str, upserts: Vec<ServicePortPlan>, removed: &[PlanKey]) {
        self.note(&format!("partial sync: {title}"));
        let mut diff = PlanDiff::default();
        for new in upserts {
            let old = self.plans.iter().position(|p| p.key == new.key);
            let old = old.map(|i| std::mem::replace(&mut self.plans[i], new.clone()));
            if old.is_none() {
                self.plans.push(new.clone());
            }
            diff.upserted.push(Upsert {
                old: old.map(Arc::new),
                new: Arc::new(new),
            });
        }
        for key in removed {
            let i = self
                .plans
                .iter()
                .position(|p| &p.key == key)
                .expect("removed plan exists");
            diff.removed.push(Arc::new(self.plans.remove(i)));
        }
        self.run(&diff, false);
    }

    /// The plan with this service name, for changing it.
    fn plan(&self, name: &str, family: IpFamily) -> ServicePortPlan {
        self.plans
            .iter()
            .find(|p| p.key.port.service.name == name && p.key.family == family)
            .expect("plan exists")
            .clone()
    }

    fn transcript(&self) -> String {
        self.state.lock().expect("fake state").log.clone()
    }
}

fn stats_line(stats: &SyncStats) -> String {
    let rules: Vec<String> = stats
        .programmed
        .iter()
        .filter_map(|count| match count {
            ProgrammedCount::IptablesRules {
                family,
                table,
                rules,
            } => Some(format!("{family} {table} {rules}")),
            _ => None,
        })
        .collect();
    format!(
        "-- stats: written {} removed {} writes {} rules [{}]\n",
        stats.plans_written,
        stats.plans_removed,
        stats.writes,
        rules.join(", ")
    )
}

/// Chain declarations of a full sync came from a hash set, in no stable order (and
/// their order means nothing to iptables-restore): compare them sorted.
fn canonical(text: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.starts_with(':') {
            run.push(line);
            continue;
        }
        run.sort_unstable();
        out.append(&mut run);
        out.push(line);
    }
    run.sort_unstable();
    out.append(&mut run);
    out.join("\n")
}

/// Compares a transcript with `testdata/<name>.txt` (or rewrites that file when
/// `FERRY_UPDATE_GOLDEN` is set).
fn check_golden(name: &str, actual: &str) {
    // `$FERRY_REPO_ROOT`: the checkout copy inside the VM of `cargo xtask vm`.
    let agent = std::env::var("FERRY_REPO_ROOT").map_or_else(
        |_| env!("CARGO_MANIFEST_DIR").to_owned(),
        |root| format!("{root}/agent"),
    );
    let path = format!("{agent}/src/dataplane/iptables/testdata/{name}.txt");
    if std::env::var_os("FERRY_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).expect("writing golden file");
        return;
    }
    let expected = std::fs::read_to_string(&path).expect("golden file exists");
    let (expected, actual) = (canonical(&expected), canonical(actual));
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(e, a)| e != a)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{name}: payloads differ from {path} at line {}:\nexpected: {:?}\nactual:   {:?}",
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

fn ep(ip: &str, port: u16) -> Endpoint {
    Endpoint {
        ip: ip.parse().expect("test address"),
        port,
    }
}

/// `ns1/<name>:http`, TCP, port 80, with these cluster-wide endpoints on port 8080.
fn svc(name: &str, cluster_ip: &str, endpoints: &[&str]) -> ServicePortPlan {
    let endpoints: Vec<(&str, u16)> = endpoints.iter().map(|ip| (*ip, 8080)).collect();
    let mut plan = test_plan(
        ("ns1", name, "http"),
        Protocol::Tcp,
        cluster_ip,
        80,
        &endpoints,
    );
    if plan.cluster_ip.is_ipv6() {
        plan.key.family = IpFamily::V6;
    }
    plan
}

fn eps(ips: &[&str]) -> Vec<Endpoint> {
    ips.iter().map(|ip| ep(ip, 8080)).collect()
}

fn ips<T: std::str::FromStr>(list: &[&str]) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    list.iter()
        .map(|s| s.parse().expect("test address"))
        .collect()
}

fn node_v4() -> NodeNetwork {
    NodeNetwork {
        nodeport_ips: ips(&["192.168.0.2"]),
        node_ips: ips(&["192.168.0.2"]),
        local_traffic: LocalTraffic::FromCidrs(ips(&["10.0.0.0/8"])),
        masquerade_all: false,
        service_cidrs: Vec::new(),
    }
}

fn node_dual() -> NodeNetwork {
    NodeNetwork {
        nodeport_ips: ips(&["192.168.0.2", "192.168.1.2", "fd00::2", "::1"]),
        node_ips: ips(&["192.168.0.2", "192.168.1.2", "fd00::2"]),
        local_traffic: LocalTraffic::FromCidrs(ips(&["10.0.0.0/8", "fd00:10::/64"])),
        masquerade_all: false,
        service_cidrs: Vec::new(),
    }
}

fn cluster_ip_plans() -> Vec<ServicePortPlan> {
    let web = svc("web", "172.30.0.10", &["10.180.0.1", "10.180.0.2"]);
    let empty = svc("empty", "172.30.0.11", &[]);
    let mut local = svc("local", "172.30.0.12", &[]);
    local.internal_policy_local = true;
    local.local_endpoints = eps(&["10.180.0.3"]);
    local.has_any_endpoints = true;
    let mut nolocal = svc("nolocal", "172.30.0.13", &[]);
    nolocal.internal_policy_local = true;
    nolocal.has_any_endpoints = true;
    let mut sticky = svc(
        "sticky",
        "172.30.0.14",
        &["10.180.0.4", "10.180.0.5", "10.180.0.6"],
    );
    sticky.affinity_timeout_seconds = Some(10800);
    let mut dns = test_plan(
        ("kube-system", "dns", "dns"),
        Protocol::Udp,
        "172.30.0.53",
        53,
        &[("10.180.0.7", 53)],
    );
    dns.key.port.port = "dns".into();
    // Deliberately not in key order: chain rules are written in plan order.
    vec![web, empty, local, nolocal, sticky, dns]
}

#[test]
fn cluster_ip_services() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::All, node_v4());
    h.full("ClusterIP services", cluster_ip_plans());

    let mut web = h.plan("web", IpFamily::V4);
    web.cluster_endpoints = eps(&["10.180.0.1", "10.180.0.2", "10.180.0.9"]);
    h.partial("an endpoint added to web", vec![web], &[]);

    let empty = h.plan("empty", IpFamily::V4).key;
    h.partial("empty removed", vec![], &[empty]);

    h.partial("nothing changed", vec![], &[]);

    let mut sticky = h.plan("sticky", IpFamily::V4);
    sticky.cluster_endpoints = eps(&["10.180.0.5"]);
    h.partial("sticky scaled down to one endpoint", vec![sticky], &[]);

    let mut nolocal = h.plan("nolocal", IpFamily::V4);
    nolocal.local_endpoints = eps(&["10.180.0.8"]);
    h.partial("nolocal gains a local endpoint", vec![nolocal], &[]);

    let mut web = h.plan("web", IpFamily::V4);
    web.cluster_endpoints.clear();
    web.has_any_endpoints = false;
    h.partial("web loses every endpoint", vec![web], &[]);

    h.full("periodic", h.plans.clone());
    check_golden("cluster_ip_services", &h.transcript());
}

fn external_plans() -> Vec<ServicePortPlan> {
    let mut np = svc("np", "172.30.1.1", &["10.180.1.1", "10.180.1.2"]);
    np.node_port = Some(30080);
    let mut nplocal = svc("nplocal", "172.30.1.2", &["10.180.1.1", "10.180.1.2"]);
    nplocal.node_port = Some(30081);
    nplocal.external_policy_local = true;
    nplocal.local_endpoints = eps(&["10.180.1.1"]);
    nplocal.health_check_node_port = Some(31000);
    let mut nplocal_none = svc("nplocal-none", "172.30.1.3", &["10.180.1.2"]);
    nplocal_none.node_port = Some(30082);
    nplocal_none.external_policy_local = true;
    let mut extip = svc("extip", "172.30.1.4", &["10.180.1.3"]);
    extip.external_ips = ips(&["192.0.2.10", "192.0.2.11"]);
    let mut extip_none = svc("extip-none", "172.30.1.5", &[]);
    extip_none.external_ips = ips(&["192.0.2.12"]);
    extip_none.node_port = Some(30083);
    let mut lb = svc("lb", "172.30.1.6", &["10.180.1.4", "10.180.1.5"]);
    lb.node_port = Some(30084);
    lb.load_balancer_ips = ips(&["203.0.113.5", "203.0.113.6"]);
    lb.load_balancer_source_ranges = ips(&["198.51.100.0/24", "192.168.0.0/16"]);
    let mut lb_local = svc("lb-local", "172.30.1.7", &["10.180.1.6", "10.180.1.7"]);
    lb_local.load_balancer_ips = ips(&["203.0.113.7"]);
    lb_local.external_policy_local = true;
    lb_local.local_endpoints = eps(&["10.180.1.7"]);
    let mut lb_none = svc("lb-none", "172.30.1.8", &[]);
    lb_none.load_balancer_ips = ips(&["203.0.113.8"]);
    lb_none.load_balancer_source_ranges = ips(&["198.51.100.0/24"]);
    let mut lb_ranges = svc("lb-ranges", "172.30.1.9", &["10.180.1.8"]);
    lb_ranges.load_balancer_ips = ips(&["203.0.113.9"]);
    lb_ranges.load_balancer_source_ranges = ips(&["198.51.100.0/24"]);
    lb_ranges.external_ips = ips(&["192.0.2.13"]);
    vec![
        np,
        nplocal,
        nplocal_none,
        extip,
        extip_none,
        lb,
        lb_local,
        lb_none,
        lb_ranges,
    ]
}

#[test]
fn external_services() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::All, node_v4());
    h.full(
        "NodePort, externalIP and LoadBalancer services",
        external_plans(),
    );

    let mut lb = h.plan("lb", IpFamily::V4);
    lb.load_balancer_source_ranges.clear();
    h.partial("lb drops its source ranges", vec![lb], &[]);

    let mut extip = h.plan("extip", IpFamily::V4);
    extip.load_balancer_ips = ips(&["203.0.113.10"]);
    h.partial("extip gets a load-balancer IP", vec![extip], &[]);

    let mut np = h.plan("np", IpFamily::V4);
    np.external_policy_local = true;
    np.local_endpoints = eps(&["10.180.1.2"]);
    h.partial("np switches to a Local external policy", vec![np], &[]);

    let nplocal = h.plan("nplocal", IpFamily::V4).key;
    h.partial("nplocal removed", vec![], &[nplocal]);

    let mut extip_none = h.plan("extip-none", IpFamily::V4);
    extip_none.cluster_endpoints = eps(&["10.180.1.9"]);
    extip_none.has_any_endpoints = true;
    h.partial("extip-none gains an endpoint", vec![extip_none], &[]);

    let mut lb_ranges = h.plan("lb-ranges", IpFamily::V4);
    lb_ranges.load_balancer_source_ranges = ips(&["198.51.100.0/24", "192.168.0.0/24"]);
    let mut lb_none = h.plan("lb-none", IpFamily::V4);
    lb_none.cluster_endpoints = eps(&["10.180.1.10"]);
    lb_none.has_any_endpoints = true;
    h.partial(
        "lb-ranges admits the node, lb-none gains an endpoint",
        vec![lb_ranges, lb_none],
        &[],
    );

    h.full("periodic", h.plans.clone());
    check_golden("external_services", &h.transcript());
}

#[test]
fn dual_stack() {
    let mut h = Harness::new(&[IpFamily::V4, IpFamily::V6], Scope::All, node_dual());
    let mut web4 = svc("web", "172.30.0.10", &["10.180.0.1"]);
    web4.node_port = Some(30080);
    let mut web6 = svc("web", "fd00:30::10", &["fd00:10::1", "fd00:10::2"]);
    web6.node_port = Some(30080);
    web6.external_ips = ips(&["2001:db8::10"]);
    let mut lb6 = svc("lb", "fd00:30::11", &["fd00:10::3"]);
    lb6.load_balancer_ips = ips(&["2001:db8::11"]);
    lb6.load_balancer_source_ranges = ips(&["2001:db8:1::/48", "fd00::/64"]);
    lb6.affinity_timeout_seconds = Some(60);
    h.full("both families", vec![web4, web6, lb6]);

    let mut web6 = h.plan("web", IpFamily::V6);
    web6.cluster_endpoints = eps(&["fd00:10::1", "fd00:10::2", "fd00:10::4"]);
    h.partial("an IPv6 endpoint added", vec![web6], &[]);

    let web4 = h.plan("web", IpFamily::V4).key;
    h.partial("the IPv4 plan removed", vec![], &[web4]);
    check_golden("dual_stack", &h.transcript());
}

#[test]
fn external_only_scope() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::ExternalOnly, node_v4());
    h.full(
        "internal services only: iptables untouched",
        vec![svc("web", "172.30.0.10", &["10.180.0.1"])],
    );

    let mut web = h.plan("web", IpFamily::V4);
    web.cluster_endpoints = eps(&["10.180.0.1", "10.180.0.2"]);
    h.partial("still internal only", vec![web], &[]);

    let mut np = svc("np", "172.30.1.1", &["10.180.1.1", "10.180.1.2"]);
    np.node_port = Some(30080);
    let mut lb = svc("lb", "172.30.1.2", &["10.180.1.3"]);
    lb.load_balancer_ips = ips(&["203.0.113.5"]);
    lb.load_balancer_source_ranges = ips(&["198.51.100.0/24"]);
    lb.external_ips = ips(&["192.0.2.10"]);
    h.partial("a NodePort and a LoadBalancer service", vec![np, lb], &[]);

    let mut web = h.plan("web", IpFamily::V4);
    web.cluster_endpoints = eps(&["10.180.0.2"]);
    h.partial("internal service changes", vec![web], &[]);

    let mut np = h.plan("np", IpFamily::V4);
    np.cluster_endpoints = eps(&["10.180.1.2"]);
    h.partial("np loses an endpoint", vec![np], &[]);

    let lb = h.plan("lb", IpFamily::V4).key;
    h.partial("lb removed", vec![], &[lb]);

    h.full("periodic", h.plans.clone());
    check_golden("external_only_scope", &h.transcript());
}

#[test]
fn external_only_scope_runs_no_iptables_for_internal_changes() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::ExternalOnly, node_v4());
    h.full(
        "internal only",
        vec![svc("web", "172.30.0.10", &["10.180.0.1"])],
    );
    let checks = h.state.lock().unwrap().chain_checks;
    assert!(checks > 0, "a full sync looks for leftover chains");
    let mut web = h.plan("web", IpFamily::V4);
    web.cluster_endpoints = eps(&["10.180.0.1", "10.180.0.2"]);
    h.partial("an endpoint added", vec![web], &[]);
    assert_eq!(
        h.state.lock().unwrap().chain_checks,
        checks,
        "an internal change costs no iptables process"
    );
}

/// Saved state with kube-proxy leftovers, a foreign chain and some of the jumps.
const NAT_SAVE: &str = "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-STALEAAAAAAAAAAAA - [0:0]
:KUBE-SEP-STALEBBBBBBBBBBBB - [0:0]
:KUBE-FW-STALECCCCCCCCCCCC - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING
-A PREROUTING -j DOCKER
-A KUBE-SVC-STALEAAAAAAAAAAAA -j KUBE-SEP-STALEBBBBBBBBBBBB
COMMIT
";

const FILTER_SAVE: &str = "*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-FORWARD - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
COMMIT
";

#[test]
fn full_sync_reconciles_saved_state() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::All, node_v4());
    {
        let mut state = h.state.lock().expect("fake state");
        state.saves.push((IpFamily::V4, "nat", NAT_SAVE.into()));
        state
            .saves
            .push((IpFamily::V4, "filter", FILTER_SAVE.into()));
    }
    h.full(
        "stale chains deleted, missing jumps inserted",
        vec![svc("web", "172.30.0.10", &["10.180.0.1"])],
    );
    check_golden("full_sync_reconciles_saved_state", &h.transcript());
}

#[test]
fn failures_and_node_changes_force_full_syncs() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::All, node_v4());
    assert!(!h.dp.needs_full_sync(), "nothing programmed yet");
    h.full("start", vec![svc("web", "172.30.0.10", &["10.180.0.1"])]);
    assert!(!h.dp.needs_full_sync());
    h.state
        .lock()
        .expect("fake state")
        .missing
        .push("KUBE-PROXY-CANARY");
    assert!(h.dp.needs_full_sync(), "canary gone");
    h.state.lock().expect("fake state").missing.clear();

    h.state.lock().expect("fake state").fail_next_restore = true;
    let mut web = h.plan("web", IpFamily::V4);
    web.cluster_endpoints = eps(&["10.180.0.1", "10.180.0.2"]);
    h.partial("restore fails", vec![web], &[]);
    assert!(!h.dp.needs_full_sync(), "cache dropped: nothing to check");

    let api = svc("api", "172.30.0.11", &["10.180.0.3"]);
    h.partial("after a failure a partial sync is full", vec![api], &[]);

    h.node.nodeport_ips = ips(&["192.168.0.2", "192.168.0.3"]);
    let mut api = h.plan("api", IpFamily::V4);
    api.node_port = Some(30080);
    h.partial("node addresses changed: full", vec![api], &[]);
    check_golden("failures_and_node_changes", &h.transcript());
}

#[test]
fn large_full_sync_zeroes_counters_first() {
    let plans = |n: usize| -> Vec<ServicePortPlan> {
        (0..n)
            .map(|i| {
                let ip = format!("172.30.{}.{}", i / 250, i % 250 + 1);
                svc(&format!("s{i}"), &ip, &["10.180.0.1", "10.180.0.2"])
            })
            .collect()
    };
    for (n, bulk) in [(10, false), (400, true)] {
        let mut h = Harness::new(&[IpFamily::V4], Scope::All, node_v4());
        h.full("many", plans(n));
        let log = h.transcript();
        assert_eq!(log.contains("COMMIT\n*nat\n-Z\n"), bulk, "{n} services");
        assert_eq!(
            log.lines().filter(|l| *l == "-Z").count(),
            usize::from(bulk)
        );
    }
}

#[test]
fn cleanup_removes_only_ferry_state() {
    let state = Arc::new(Mutex::new(FakeState::default()));
    {
        let mut s = state.lock().expect("fake state");
        s.saves.push((IpFamily::V4, "nat", NAT_SAVE.into()));
        s.saves.push((IpFamily::V4, "filter", FILTER_SAVE.into()));
        s.saves.push((
            IpFamily::V6,
            "nat",
            "*nat\n:PREROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\nCOMMIT\n".into(),
        ));
    }
    let fakes = [IpFamily::V4, IpFamily::V6].map(|family| {
        (
            family,
            Fake {
                family,
                state: state.clone(),
            },
        )
    });
    cleanup_with(
        fakes.into_iter(),
        &["filter", "nat"],
        super::Leftovers::Ferry,
    )
    .expect("cleanup");
    let log = state.lock().expect("fake state").log.clone();
    check_golden("cleanup", &log);
}

#[test]
fn route_localnet_is_set_once_before_loopback_nodeports() {
    let mut node = node_dual();
    node.nodeport_ips
        .push("127.0.0.1".parse().expect("test address"));
    let mut h = Harness::new(&[IpFamily::V4, IpFamily::V6], Scope::All, node);
    let mut web = svc("web", "172.30.0.10", &["10.180.0.1"]);
    web.node_port = Some(30080);
    h.full("first", vec![web]);
    h.full("second", h.plans.clone());
    let log = h.transcript();
    assert_eq!(log.matches("-- sysctl").count(), 1, "{log}");
    let sysctl = log
        .find("-- sysctl route_localnet=1 (IPv4)")
        .expect("sysctl set");
    let first_restore = log.find("-- restore").expect("restored");
    assert!(sysctl < first_restore, "set before the rules that need it");
    assert!(log.contains("-d 127.0.0.1 -j KUBE-NODEPORTS"));
    assert!(!log.contains("-d ::1"), "no NodePorts on IPv6 loopback");
}

#[test]
fn route_localnet_is_left_alone_without_loopback_nodeports() {
    let mut h = Harness::new(&[IpFamily::V4], Scope::All, node_v4());
    let mut web = svc("web", "172.30.0.10", &["10.180.0.1"]);
    web.node_port = Some(30080);
    h.full("no loopback", vec![web]);
    assert!(!h.transcript().contains("-- sysctl"));
}
