//! The proxy loop: folds source events into the model, and after each batch turns the
//! services that changed into a plan diff for the backend. Runs on its own thread;
//! backends may block (iptables-restore), nothing else waits on them.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tracing::{debug, error, info, warn};

use crate::dataplane::{DataPlane, SyncStats};
use crate::dns::ClusterDns;
use crate::health::Health;
use crate::metrics::{Metrics, unix_now};
use crate::model::{
    Applied, ClusterState, Kind, NodePlan, PlanDiff, ServiceName, ServicePortPlan, Traffic,
    service_health_check,
};
use crate::node::{NodePortAddresses, node_network};
use crate::service_health::ServiceHealthServers;
use crate::source::{Object, SourceEvent};

/// Settings of the loop.
pub struct ProxyConfig {
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub nodeport_addresses: NodePortAddresses,
    /// How often to check for outside tampering (and retry cadence ceiling).
    pub sync_period: Duration,
    /// Full resync at least this often even without tampering.
    pub full_sync_period: Duration,
}

/// The loop's state.
pub struct ProxyLoop {
    config: ProxyConfig,
    state: ClusterState,
    plan: NodePlan,
    data_plane: Box<dyn DataPlane>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// The source delivered a complete view at least once.
    source_synced: bool,
    needs_full_sync: bool,
    /// When the oldest unsynced change arrived (network programming latency).
    pending_since: Option<Instant>,
    retry_at: Option<Instant>,
    /// Cluster DNS, updated as soon as events are folded in (before the data plane).
    dns: Option<ClusterDns>,
    /// Load balancers' health servers for `Local` external-policy services.
    service_health: Option<ServiceHealthServers>,
    dns_synced: bool,
    /// When the oldest change DNS has not seen yet arrived.
    dns_pending_since: Option<Instant>,
    /// Plans with Local internal / external policy and nothing local (a gauge).
    no_local: (i64, i64),
    last_check: Instant,
    last_full: Instant,
}

impl ProxyLoop {
    pub fn new(
        config: ProxyConfig,
        data_plane: Box<dyn DataPlane>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Self {
        Self {
            state: ClusterState::new(config.node_name.clone()),
            config,
            plan: NodePlan::default(),
            data_plane,
            metrics,
            health,
            source_synced: false,
            needs_full_sync: true,
            pending_since: None,
            retry_at: None,
            dns: None,
            service_health: None,
            dns_synced: false,
            dns_pending_since: None,
            no_local: (0, 0),
            last_check: Instant::now(),
            last_full: Instant::now(),
        }
    }

    /// Keeps load balancers' service health servers in line with the model too.
    pub fn with_service_health(mut self, servers: ServiceHealthServers) -> Self {
        self.service_health = Some(servers);
        self
    }

    /// Serves the model to cluster DNS too.
    pub fn with_dns(mut self, dns: ClusterDns) -> Self {
        self.state.track_dns();
        self.dns = Some(dns);
        self
    }

    /// Brings DNS up to date with the events folded in so far.
    fn update_dns(&mut self) {
        let Some(dns) = &self.dns else { return };
        let changed = self.state.take_dns_changes();
        if !changed.is_empty() {
            dns.update(&self.state, &changed);
            if let Some(since) = self.dns_pending_since.take() {
                let latency = since.elapsed();
                self.metrics.dns_programming.observe(latency.as_secs_f64());
                debug!(
                    services = changed.len(),
                    latency_us = latency.as_micros() as u64,
                    "dns updated"
                );
            }
        }
        if self.source_synced && !self.dns_synced {
            dns.set_synced();
            self.dns_synced = true;
        }
    }

    /// Runs until the sources hang up.
    pub fn run(mut self, events: Receiver<SourceEvent>) {
        loop {
            let wait = self.next_wakeup();
            match events.recv_timeout(wait) {
                Ok(event) => {
                    self.handle(event);
                    while let Ok(event) = events.try_recv() {
                        self.handle(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    info!("all sources stopped; proxy loop exits (programmed state stays)");
                    return;
                }
            }
            self.update_dns();
            if !self.source_synced {
                continue;
            }
            if self.last_check.elapsed() >= self.config.sync_period {
                self.last_check = Instant::now();
                if self.data_plane.needs_full_sync() {
                    warn!(
                        data_plane = self.data_plane.name(),
                        "programmed state was changed from outside; resyncing everything"
                    );
                    self.needs_full_sync = true;
                }
            }
            if self.last_full.elapsed() >= self.config.full_sync_period {
                self.needs_full_sync = true;
            }
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            self.sync();
        }
    }

    fn next_wakeup(&self) -> Duration {
        let mut wait = self
            .config
            .sync_period
            .saturating_sub(self.last_check.elapsed());
        if let Some(t) = self.retry_at {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        wait.max(Duration::from_millis(1))
    }

    fn handle(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Apply { object, origin } => {
                let kind = object.object_ref().kind;
                let result = match object {
                    Object::Service(ref svc) => self.state.apply_service(svc),
                    Object::EndpointSlice(ref slice) => self.state.apply_slice(slice),
                    Object::Node(ref node) => self.state.apply_node(node),
                };
                match result {
                    Ok(Applied::Changed) => self.changed(kind),
                    Ok(Applied::Unchanged) => {}
                    Ok(Applied::Ignored(why)) => {
                        debug!(origin, object = %object.object_ref(), why, "ignored");
                    }
                    Err(invalid) => {
                        warn!(origin, object = %invalid.object, reason = invalid.reason, "skipping invalid object; its previous version (if any) stays in effect");
                        self.metrics.invalid_object(invalid.object.kind.as_str());
                    }
                }
            }
            SourceEvent::Delete(r) => {
                let applied = match r.kind {
                    Kind::Service => self
                        .state
                        .delete_service(&ServiceName::new(&r.namespace, &r.name)),
                    Kind::EndpointSlice => self.state.delete_slice(&r.namespace, &r.name),
                    Kind::Node => self.state.delete_node(&r.name),
                };
                if applied == Applied::Changed {
                    self.changed(r.kind);
                }
            }
            SourceEvent::Rejected { kind, .. } => {
                self.metrics
                    .invalid_object(kind.map(Kind::as_str).unwrap_or("Unknown"));
            }
            SourceEvent::Synced => {
                if !self.source_synced {
                    info!("source delivered a complete view; programming starts");
                    self.source_synced = true;
                    self.needs_full_sync = true;
                }
            }
        }
    }

    fn changed(&mut self, kind: Kind) {
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

    fn sync(&mut self) {
        let changes = self.state.take_changes();
        let full = self.needs_full_sync;
        if changes.services.is_empty() && !full {
            return;
        }
        let diff = self.plan.update(&self.state, &changes.services);
        if diff.is_empty() && !full {
            self.update_service_health(&changes.services, None);
            self.finish_pending();
            return;
        }
        let node = node_network(
            self.state.node(),
            &self.config.nodeport_addresses,
            &self.config.cluster_cidrs,
        );
        self.update_service_health(
            &changes.services,
            full.then_some(node.nodeport_ips.as_slice()),
        );
        let started = Instant::now();
        match self.data_plane.sync(&self.plan, &diff, &node, full) {
            Ok(stats) => self.synced(&diff, &stats, full, started.elapsed()),
            Err(err) => {
                error!(data_plane = self.data_plane.name(), error = %err, "sync failed; retrying with a full sync");
                self.metrics.sync_failures.inc();
                if self.data_plane.name().starts_with("iptables") {
                    self.metrics.restore_failures.inc();
                }
                self.needs_full_sync = true;
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
            }
        }
    }

    /// Health servers follow the services that changed; on a full sync (`full_sync_at`:
    /// the NodePort addresses to listen on) every service is checked. A local endpoint
    /// turning terminating changes the answer without changing the plan, so this runs
    /// whether or not the plan changed.
    fn update_service_health(
        &mut self,
        changed: &HashSet<ServiceName>,
        full_sync_at: Option<&[IpAddr]>,
    ) {
        let Some(servers) = &mut self.service_health else {
            return;
        };
        if let Some(addresses) = full_sync_at {
            servers.set_addresses(addresses.to_vec());
            let mut names = servers.services();
            names.extend(self.state.services().map(|svc| svc.name.clone()));
            for name in names {
                servers.update(&name, service_health_check(&self.state, &name));
            }
        } else {
            for name in changed {
                servers.update(name, service_health_check(&self.state, name));
            }
        }
    }

    fn synced(&mut self, diff: &PlanDiff, stats: &SyncStats, full: bool, took: Duration) {
        let secs = took.as_secs_f64();
        self.metrics.sync_duration.observe(secs);
        if full {
            self.metrics.sync_full_duration.observe(secs);
            self.last_full = Instant::now();
            info!(
                data_plane = self.data_plane.name(),
                plans = self.plan.len(),
                took_ms = took.as_millis() as u64,
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
                data_plane = self.data_plane.name(),
                written = stats.plans_written,
                removed = stats.plans_removed,
                writes = stats.writes,
                took_us = took.as_micros() as u64,
                programming_us,
                "sync done"
            );
        }
        for (family, table, total) in &stats.iptables_rules {
            self.metrics
                .iptables_rules
                .get_or_create(&vec![
                    ("table".to_owned(), (*table).to_owned()),
                    ("ip_family".to_owned(), family.to_string()),
                ])
                .set(*total as i64);
        }
        if let Some((frontends, backends)) = stats.ebpf_entries {
            self.metrics.ebpf_frontends.set(frontends as i64);
            self.metrics.ebpf_backends.set(backends as i64);
        }
        self.count_no_local_endpoints(diff, full);
        self.needs_full_sync = false;
        self.retry_at = None;
        self.finish_pending();
    }

    /// Keeps kube-proxy's "services with Local policy and no local endpoints" gauges,
    /// updated from the diff so a sync costs nothing per untouched service.
    fn count_no_local_endpoints(&mut self, diff: &PlanDiff, full: bool) {
        let counts = |p: &ServicePortPlan| {
            (
                i64::from(p.internal_policy_local && p.internal() == Traffic::Drop),
                i64::from(p.external_policy_local && p.external() == Traffic::Drop),
            )
        };
        if full {
            self.no_local = (0, 0);
            for p in self.plan.iter() {
                let (i, e) = counts(p);
                self.no_local.0 += i;
                self.no_local.1 += e;
            }
        } else {
            for old in diff
                .upserted
                .iter()
                .filter_map(|u| u.old.as_deref())
                .chain(diff.removed.iter().map(|p| p.as_ref()))
            {
                let (i, e) = counts(old);
                self.no_local.0 -= i;
                self.no_local.1 -= e;
            }
            for new in diff.upserted.iter().map(|u| u.new.as_ref()) {
                let (i, e) = counts(new);
                self.no_local.0 += i;
                self.no_local.1 += e;
            }
        }
        for (policy, n) in [("internal", self.no_local.0), ("external", self.no_local.1)] {
            self.metrics
                .no_local_endpoints
                .get_or_create(&vec![("traffic_policy".to_owned(), policy.to_owned())])
                .set(n);
        }
    }

    fn finish_pending(&mut self) {
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
