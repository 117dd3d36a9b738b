//! What the proxy loop tells operators: kube-proxy's sync metrics (durations, pending
//! changes, network programming latency, "no local endpoints" gauges), the data
//! planes' kernel object counts, and the health state `/healthz` serves. The loop
//! calls it at each step; nothing here decides what to program.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::dataplane::conntrack::Cleared;
use crate::dataplane::{ProgrammedCount, SyncError, SyncStats};
use crate::health::Health;
use crate::metrics::{Metrics, ip_family, unix_now};
use crate::model::{IpFamily, Kind, NodePlan, PlanDiff, PlanKey, ServicePortPlan, SkippedPort};

/// Trigger times kept for the next sync at most (a bound on memory when a sync is
/// slow and every endpoint churns); later ones are not measured.
const MAX_PENDING_TRIGGERS: usize = 100_000;

/// The loop's reporting state.
pub struct Report {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The families the data plane programs (kube-proxy has one proxier each).
    families: Vec<IpFamily>,
    /// When reporting started: trigger times before it are not measured (upstream
    /// skips changes older than the proxy).
    started: jiff::Timestamp,
    /// When the oldest change not programmed yet arrived.
    pending_since: Option<Instant>,
    /// EndpointSlice trigger times waiting for the next successful sync.
    pending_triggers: Vec<(IpFamily, jiff::Timestamp)>,
    /// When the oldest change DNS has not seen yet arrived.
    dns_pending_since: Option<Instant>,
    /// Plans with Local internal / external policy and nothing local.
    no_local: NoLocalEndpoints,
}

impl Report {
    /// Reports into these metrics and health state, for a data plane programming
    /// `families`.
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>, families: Vec<IpFamily>) -> Self {
        Self {
            metrics,
            health,
            families,
            started: jiff::Timestamp::now(),
            pending_since: None,
            pending_triggers: Vec::new(),
            dns_pending_since: None,
            no_local: NoLocalEndpoints::default(),
        }
    }

    /// An object change reached the model.
    pub fn changed(&mut self, kind: Kind) {
        match kind {
            Kind::EndpointSlice => {
                self.metrics.endpoint_changes.inc();
                self.metrics.endpoint_changes_pending.inc();
            }
            Kind::Service | Kind::Node | Kind::ServiceCidr => {
                self.metrics.service_changes.inc();
                self.metrics.service_changes_pending.inc();
            }
        }
        for family in &self.families {
            let queued = self
                .metrics
                .last_queued_timestamp
                .get_or_create(&ip_family(*family));
            queued.set(unix_now());
        }
        self.pending_since.get_or_insert_with(Instant::now);
        self.dns_pending_since.get_or_insert_with(Instant::now);
        self.health.queued();
    }

    /// A changed EndpointSlice carried the time its change was triggered
    /// (`endpoints.kubernetes.io/last-change-trigger-time`): network programming
    /// latency is measured from there to the next successful sync.
    pub fn triggered_at(&mut self, family: IpFamily, at: jiff::Timestamp) {
        if at > self.started && self.pending_triggers.len() < MAX_PENDING_TRIGGERS {
            self.pending_triggers.push((family, at));
        }
    }

    /// This node's object says whether it is going away (`/healthz` turns 503 then).
    pub fn node_leaving(&self, leaving: bool) {
        self.health.node_eligible(!leaving);
    }

    /// A service port was not programmed (the kernel lacks its protocol, or its
    /// ClusterIP is the node's own address).
    pub fn skipped(&self, skipped: &SkippedPort) {
        let labels = vec![
            ("protocol".to_owned(), skipped.port.protocol.to_string()),
            ("reason".to_owned(), skipped.reason.label().to_owned()),
        ];
        self.metrics.skipped_ports.get_or_create(&labels).inc();
    }

    /// An object event arrived from the source.
    pub fn source_event(&self) {
        let now = crate::status::unix_ms(std::time::SystemTime::now());
        self.metrics
            .status
            .update(|s| s.last_event_unix_ms = Some(now));
    }

    /// The source delivered its first complete view.
    pub fn source_synced(&self) {
        self.metrics.status.update(|s| s.source_synced = true);
    }

    /// A service port did not get a frontend another port owns.
    pub fn frontend_conflict(&self) {
        self.metrics.frontend_conflicts.inc();
        self.metrics.status.update(|s| s.frontend_conflicts += 1);
    }

    /// An object was refused (`kind` as the source knew it).
    pub fn invalid(&self, kind: Option<Kind>) {
        self.metrics
            .invalid_object(kind.map(Kind::as_str).unwrap_or("Unknown"));
        self.metrics.status.update(|s| s.invalid_objects += 1);
    }

    /// DNS now answers for `services` changed services.
    pub fn dns_updated(&mut self, services: usize) {
        if let Some(since) = self.dns_pending_since.take() {
            let latency = since.elapsed();
            self.metrics.dns_programming.observe(latency.as_secs_f64());
            debug!(
                services,
                latency_us = latency.as_micros() as u64,
                "dns updated"
            );
        }
    }

    /// A sync programmed `diff` (everything in `plan` when `full`).
    pub fn synced(&mut self, sync: &SyncOutcome<'_>) {
        let secs = sync.took.as_secs_f64();
        // One sync programs every family; each family's series gets it, as each of a
        // dual-stack kube-proxy's proxiers reports its own.
        for family in &self.families {
            let labels = ip_family(*family);
            self.metrics
                .sync_duration
                .get_or_create(&labels)
                .observe(secs);
            let kind = if sync.full {
                &self.metrics.sync_full_duration
            } else {
                &self.metrics.sync_partial_duration
            };
            kind.get_or_create(&labels).observe(secs);
        }
        if sync.full {
            info!(
                data_plane = sync.data_plane,
                plans = sync.plan.len(),
                took_ms = sync.took.as_millis() as u64,
                "full sync done"
            );
        } else {
            // From the first change of this batch reaching the loop to programmed.
            let programming_us = self
                .pending_since
                .map(|t| t.elapsed().as_micros() as u64)
                .unwrap_or_default();
            debug!(
                data_plane = sync.data_plane,
                written = sync.stats.plans_written,
                removed = sync.stats.plans_removed,
                writes = sync.stats.writes,
                took_us = sync.took.as_micros() as u64,
                programming_us,
                "sync done"
            );
        }
        self.programmed(&sync.stats.programmed);
        let record = crate::status::SyncRecord::now(sync.took);
        let programmed: Vec<String> = sync.stats.programmed.iter().filter_map(describe).collect();
        let (plans, full) = (sync.plan.len(), sync.full);
        self.metrics.status.update(|s| {
            s.plans = plans;
            s.failures_in_a_row = 0;
            s.last_error = None;
            s.programmed = programmed;
            if full {
                s.last_full_sync = Some(record);
            } else {
                s.last_partial_sync = Some(record);
            }
        });
        self.no_local.update(sync.plan, sync.diff, sync.full);
        self.no_local.export(&self.metrics);
        self.observe_triggers();
        self.finish_pending();
    }

    /// Network programming latency of the trigger times this sync programmed.
    fn observe_triggers(&mut self) {
        let now = jiff::Timestamp::now();
        for (family, at) in self.pending_triggers.drain(..) {
            let latency = now.duration_since(at).as_secs_f64().max(0.0);
            self.metrics
                .network_programming
                .get_or_create(&ip_family(family))
                .observe(latency);
        }
    }

    /// Kernel object counts, under their metric names.
    fn programmed(&self, programmed: &[ProgrammedCount]) {
        let table_family = |table: &str, family: &IpFamily| {
            vec![
                ("table".to_owned(), table.to_owned()),
                ("ip_family".to_owned(), family.to_string()),
            ]
        };
        for entry in programmed {
            match entry {
                ProgrammedCount::IptablesRules {
                    family,
                    table,
                    rules,
                } => {
                    let gauge = self
                        .metrics
                        .iptables_rules
                        .get_or_create(&table_family(table, family));
                    gauge.set(*rules as i64);
                }
                ProgrammedCount::IptablesRulesWritten {
                    family,
                    table,
                    rules,
                } => {
                    let labels = table_family(table, family);
                    self.metrics
                        .iptables_rules_last
                        .get_or_create(&labels)
                        .set(*rules as i64);
                }
                ProgrammedCount::EbpfEntries {
                    frontends,
                    backends,
                    ..
                } => {
                    self.metrics.ebpf_frontends.set(*frontends as i64);
                    self.metrics.ebpf_backends.set(*backends as i64);
                }
                ProgrammedCount::NftablesObjects {
                    family,
                    chains,
                    elements,
                } => {
                    let labels = ip_family(*family);
                    let m = &self.metrics;
                    m.nftables_chains.get_or_create(&labels).set(*chains as i64);
                    m.nftables_elements
                        .get_or_create(&labels)
                        .set(*elements as i64);
                }
            }
        }
    }

    /// A sync failed; the loop retries with a full sync. The trigger times stay
    /// pending: the retry is what programs them.
    pub fn sync_failed(&self, err: &SyncError) {
        self.metrics.sync_failures.inc();
        let message = error_chain(err);
        self.metrics.status.update(|s| {
            s.failures_in_a_row += 1;
            s.last_error = Some(message);
        });
        if let SyncError::Iptables {
            family, partial, ..
        } = err
        {
            let labels = ip_family(*family);
            self.metrics.restore_failures.get_or_create(&labels).inc();
            if *partial {
                self.metrics
                    .partial_restore_failures
                    .get_or_create(&labels)
                    .inc();
            }
        }
    }

    /// The service ports held out of the kernel because it refused them, with its
    /// error (gauge and `ferry status`).
    pub fn quarantined<'a>(&self, held: impl Iterator<Item = (&'a PlanKey, &'a str)>) {
        let held: Vec<String> = held
            .map(|(key, error)| format!("{} ({}): {error}", key.port, key.family))
            .collect();
        self.metrics.quarantined.set(held.len() as i64);
        self.metrics.status.update(|s| s.quarantined = held);
    }

    /// Stale conntrack entries were deleted after a sync.
    pub fn conntrack_cleared(&self, cleared: &[Cleared]) {
        for c in cleared {
            let labels = ip_family(c.family);
            let duration = self
                .metrics
                .conntrack_cleanup_duration
                .get_or_create(&labels);
            duration.observe(c.took.as_secs_f64());
            self.metrics
                .conntrack_deleted
                .get_or_create(&labels)
                .inc_by(c.deleted);
        }
    }

    /// Everything queued so far is programmed (or needed no programming).
    pub fn finish_pending(&mut self) {
        if let Some(since) = self.pending_since.take() {
            let latency = since.elapsed().as_secs_f64();
            self.metrics.programming.observe(latency);
        }
        self.pending_triggers.clear();
        self.metrics.endpoint_changes_pending.set(0);
        self.metrics.service_changes_pending.set(0);
        for family in &self.families {
            let last = self
                .metrics
                .last_sync_timestamp
                .get_or_create(&ip_family(*family));
            last.set(unix_now());
        }
        self.health.updated();
    }
}

/// An error with all its causes, for a log line (`Display` of an error shows only its
/// own context; the causes are its `source()` chain, e.g. the errno of a map write).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

/// One successful sync, as [`Report::synced`] reports it.
pub struct SyncOutcome<'a> {
    pub data_plane: &'static str,
    pub plan: &'a NodePlan,
    pub diff: &'a PlanDiff,
    pub stats: &'a SyncStats,
    pub full: bool,
    pub took: Duration,
}

/// kube-proxy's `sync_proxy_rules_no_local_endpoints_total` gauges (internal and
/// external traffic policy, per family), kept from diffs so a sync costs nothing per
/// untouched service.
#[derive(Debug, Default, PartialEq, Eq)]
struct NoLocalEndpoints {
    /// (policy, family) -> services.
    counts: BTreeMap<(&'static str, IpFamily), i64>,
}

impl NoLocalEndpoints {
    fn update(&mut self, plan: &NodePlan, diff: &PlanDiff, full: bool) {
        if full {
            self.counts.values_mut().for_each(|n| *n = 0);
            plan.iter().for_each(|p| self.add(p, 1));
            return;
        }
        let old = diff
            .upserted
            .iter()
            .filter_map(|u| u.old.as_deref())
            .chain(diff.removed.iter().map(|p| p.as_ref()));
        old.for_each(|p| self.add(p, -1));
        diff.upserted.iter().for_each(|u| self.add(&u.new, 1));
    }

    fn add(&mut self, plan: &ServicePortPlan, sign: i64) {
        let (internal, external) = plan.lacks_local_endpoints();
        let family = plan.key.family;
        for (policy, lacks) in [("internal", internal), ("external", external)] {
            *self.counts.entry((policy, family)).or_default() += sign * i64::from(lacks);
        }
    }

    #[cfg(test)]
    fn get(&self, policy: &'static str, family: IpFamily) -> i64 {
        self.counts.get(&(policy, family)).copied().unwrap_or(0)
    }

    fn export(&self, metrics: &Metrics) {
        for ((policy, family), n) in &self.counts {
            let labels = vec![
                ("traffic_policy".to_owned(), (*policy).to_owned()),
                ("ip_family".to_owned(), family.to_string()),
            ];
            metrics.no_local_endpoints.get_or_create(&labels).set(*n);
        }
    }
}

/// `n` as a percentage of `max`.
fn percent(n: usize, max: u32) -> f64 {
    n as f64 * 100.0 / f64::from(max.max(1))
}

/// One line of what a data plane holds, for `ferry status`.
fn describe(p: &ProgrammedCount) -> Option<String> {
    Some(match p {
        ProgrammedCount::IptablesRules {
            family,
            table,
            rules,
        } => format!("iptables {family} {table}: {rules} rules"),
        ProgrammedCount::IptablesRulesWritten { .. } => return None,
        ProgrammedCount::EbpfEntries {
            frontends,
            backends,
            max_frontends,
            max_backends,
        } => format!(
            "eBPF maps: {frontends} of {max_frontends} frontends ({:.1}% full), {backends} of {max_backends} backends ({:.1}% full)",
            percent(*frontends, *max_frontends),
            percent(*backends, *max_backends)
        ),
        ProgrammedCount::NftablesObjects {
            family,
            chains,
            elements,
        } => format!("nftables {family}: {chains} chains, {elements} elements"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::store::test_state;

    fn plan_of(docs: &[&str]) -> (NodePlan, PlanDiff) {
        let mut state = test_state(docs);
        let mut plan = NodePlan::default();
        let changes = state.take_changes();
        let diff = plan.update(&state, &changes.services);
        (plan, diff)
    }

    #[test]
    fn no_local_endpoints_counted_per_policy_and_kept_from_diffs() {
        let svc = "kind: Service\nmetadata: {name: web, namespace: ns}\nspec: {type: NodePort, clusterIP: 10.96.0.10, internalTrafficPolicy: Local, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}";
        let remote = "kind: EndpointSlice\nmetadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.0.0.1], nodeName: node-b}]";
        let (plan, diff) = plan_of(&[svc, remote]);
        let mut counts = NoLocalEndpoints::default();
        counts.update(&plan, &diff, true);
        assert_eq!(counts.get("internal", IpFamily::V4), 1);
        assert_eq!(counts.get("external", IpFamily::V4), 1);
        assert_eq!(counts.get("external", IpFamily::V6), 0);
        // The same plan removed, applied as a partial diff, brings both back to zero.
        let removed = PlanDiff {
            removed: plan.iter().cloned().collect(),
            ..PlanDiff::default()
        };
        counts.update(&NodePlan::default(), &removed, false);
        assert_eq!(counts.get("internal", IpFamily::V4), 0);
        assert_eq!(counts.get("external", IpFamily::V4), 0);
    }
}
