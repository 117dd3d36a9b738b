//! What the proxy loop tells operators: kube-proxy's sync metrics (durations, pending
//! changes, network programming latency, "no local endpoints" gauges), the data
//! planes' kernel object counts, and the health state `/healthz` serves. The loop
//! calls it at each step; nothing here decides what to program.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::dataplane::{ProgrammedCount, SyncError, SyncStats};
use crate::health::Health;
use crate::metrics::{Metrics, unix_now};
use crate::model::{Kind, NodePlan, PlanDiff, ServicePortPlan};

/// The loop's reporting state.
pub struct Report {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// When the oldest change not programmed yet arrived (network programming latency).
    pending_since: Option<Instant>,
    /// When the oldest change DNS has not seen yet arrived.
    dns_pending_since: Option<Instant>,
    /// Plans with Local internal / external policy and nothing local.
    no_local: NoLocalEndpoints,
}

impl Report {
    /// Reports into these metrics and health state.
    pub fn new(metrics: Arc<Metrics>, health: Arc<Health>) -> Self {
        Self {
            metrics,
            health,
            pending_since: None,
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
            Kind::Service | Kind::Node => {
                self.metrics.service_changes.inc();
                self.metrics.service_changes_pending.inc();
            }
        }
        self.metrics.last_queued_timestamp.set(unix_now());
        self.pending_since.get_or_insert_with(Instant::now);
        self.dns_pending_since.get_or_insert_with(Instant::now);
        self.health.queued();
    }

    /// An object was refused (`kind` as the source knew it).
    pub fn invalid(&self, kind: Option<Kind>) {
        self.metrics
            .invalid_object(kind.map(Kind::as_str).unwrap_or("Unknown"));
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
        self.metrics.sync_duration.observe(secs);
        if sync.full {
            self.metrics.sync_full_duration.observe(secs);
            info!(
                data_plane = sync.data_plane,
                plans = sync.plan.len(),
                took_ms = sync.took.as_millis() as u64,
                "full sync done"
            );
        } else {
            self.metrics.sync_partial_duration.observe(secs);
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
        self.no_local.update(sync.plan, sync.diff, sync.full);
        self.no_local.export(&self.metrics);
        self.finish_pending();
    }

    /// Kernel object counts, under their metric names.
    fn programmed(&self, programmed: &[ProgrammedCount]) {
        for entry in programmed {
            match entry {
                ProgrammedCount::IptablesRules {
                    family,
                    table,
                    rules,
                } => {
                    let labels = vec![
                        ("table".to_owned(), (*table).to_owned()),
                        ("ip_family".to_owned(), family.to_string()),
                    ];
                    self.metrics
                        .iptables_rules
                        .get_or_create(&labels)
                        .set(*rules as i64);
                }
                ProgrammedCount::EbpfEntries {
                    frontends,
                    backends,
                } => {
                    self.metrics.ebpf_frontends.set(*frontends as i64);
                    self.metrics.ebpf_backends.set(*backends as i64);
                }
            }
        }
    }

    /// A sync failed; the loop retries with a full sync.
    pub fn sync_failed(&self, err: &SyncError) {
        self.metrics.sync_failures.inc();
        if matches!(err, SyncError::Iptables(_)) {
            self.metrics.restore_failures.inc();
        }
    }

    /// Everything queued so far is programmed (or needed no programming).
    pub fn finish_pending(&mut self) {
        if let Some(since) = self.pending_since.take() {
            self.metrics
                .network_programming
                .observe(since.elapsed().as_secs_f64());
        }
        self.metrics.endpoint_changes_pending.set(0);
        self.metrics.service_changes_pending.set(0);
        self.metrics.last_sync_timestamp.set(unix_now());
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
/// external traffic policy), kept from diffs so a sync costs nothing per untouched
/// service.
#[derive(Debug, Default, PartialEq, Eq)]
struct NoLocalEndpoints {
    internal: i64,
    external: i64,
}

impl NoLocalEndpoints {
    fn update(&mut self, plan: &NodePlan, diff: &PlanDiff, full: bool) {
        if full {
            *self = Self::default();
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
        self.internal += sign * i64::from(internal);
        self.external += sign * i64::from(external);
    }

    fn export(&self, metrics: &Metrics) {
        for (policy, n) in [("internal", self.internal), ("external", self.external)] {
            metrics
                .no_local_endpoints
                .get_or_create(&vec![("traffic_policy".to_owned(), policy.to_owned())])
                .set(n);
        }
    }
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
        assert_eq!(
            counts,
            NoLocalEndpoints {
                internal: 1,
                external: 1
            }
        );
        // The same plan removed, applied as a partial diff, brings both back to zero.
        let removed = PlanDiff {
            upserted: vec![],
            removed: plan.iter().cloned().collect(),
        };
        counts.update(&NodePlan::default(), &removed, false);
        assert_eq!(counts, NoLocalEndpoints::default());
    }
}
