//! The proxy loop: folds source events into the model, and after each batch turns the
//! services that changed into a plan diff for the data plane. Runs on its own thread;
//! data planes may block (iptables-restore), nothing else waits on them: a write runs
//! on a thread of its own while the loop keeps folding events and publishing the DNS
//! changes that need no programming. DNS and the
//! load balancers' health servers are fed from the same model; [`Report`] keeps the
//! metrics.

use std::collections::HashSet;
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use self::node_local_dns::NodeLocalDnsSteering;
use self::quarantine::{AfterFailure, Quarantine};
use crate::dataplane::{DataPlane, SyncError, SyncStats, conntrack};
use crate::dns::ClusterDns;
use crate::model::explain::explain;
use crate::model::{
    Applied, ClusterState, Escaped, HostAddresses, IpFamily, Kind, LocalDetection, NodeNetwork,
    NodePlan, NodePortAddresses, ObjectRef, PlanDiff, Protocol, ServiceName, SkipReason,
    last_change_trigger_time, service_health_check,
};
use crate::report::{Report, SyncOutcome, error_chain};
use crate::service_health::ServiceHealthServers;
use crate::source::queue::EventReceiver;
use crate::source::{Object, SourceEvent};

/// After a failed sync, the next attempt (a full sync) waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The longest wait between retries of a sync that keeps failing (the wait doubles
/// from [`RETRY_AFTER`] with each failure in a row).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How long to wait before retrying after `failures` failed syncs in a row.
fn retry_delay(failures: u32) -> Duration {
    RETRY_AFTER
        .saturating_mul(1 << failures.saturating_sub(1).min(5))
        .min(MAX_RETRY_AFTER)
}

/// Settings of the loop.
pub struct ProxyConfig {
    pub node_name: String,
    /// How pod traffic is recognised (`--detect-local-mode`).
    pub local_detection: LocalDetection,
    pub nodeport_addresses: NodePortAddresses,
    /// Masquerade every ClusterIP connection (kube-proxy's `masqueradeAll`).
    pub masquerade_all: bool,
    /// How often to check for outside tampering (and retry cadence ceiling).
    pub sync_period: Duration,
    /// Least time between two syncs (changes meanwhile are batched).
    pub min_sync_period: Duration,
    /// Protocols the kernel cannot carry: their service ports are skipped.
    pub unsupported_protocols: Vec<Protocol>,
    /// `--service-cluster-ip-range`: Services with a ClusterIP outside are invalid.
    pub service_cluster_ip_ranges: Vec<ipnetwork::IpNetwork>,
    /// The IP families the data plane programs (conntrack is reconciled in each).
    pub families: Vec<IpFamily>,
    /// Full resync at least this often even without tampering.
    pub full_sync_period: Duration,
}

/// Cluster DNS as the loop feeds it. DNS and the data plane never disagree: a
/// proxied service's (new) records are published once the sync that programs its
/// frontends is done, and withdrawals (deleted, headless and unproxied services) go
/// out at once, before the frontend is removed, so a pod never resolves a name it
/// cannot connect to.
struct DnsFeed {
    dns: ClusterDns,
    /// `--dns-listen` addresses, put back when they disappear from the host.
    addresses: Vec<std::net::IpAddr>,
    /// The zone was told the model is complete (after the first sync).
    synced: bool,
    /// Services whose records wait for their frontends to be programmed.
    deferred: HashSet<ServiceName>,
    /// Those a data-plane write under way programs, published when it succeeds.
    programming: HashSet<ServiceName>,
}

/// The loop's state.
pub struct ProxyLoop {
    config: ProxyConfig,
    state: ClusterState,
    plan: NodePlan,
    data_plane: Box<dyn DataPlane>,
    report: Report,
    dns: Option<DnsFeed>,
    /// The kube-dns ClusterIP answered by this node's DNS server.
    node_local_dns: Option<NodeLocalDnsSteering>,
    /// Load balancers' health servers for `Local` external-policy services.
    service_health: Option<ServiceHealthServers>,
    /// The host's addresses as last reported (NodePort address selection).
    host: HostAddresses,
    /// The source delivered a complete view at least once.
    source_synced: bool,
    needs_full_sync: bool,
    retry_at: Option<Instant>,
    /// Failed syncs in a row (the retry backs off with them).
    failures: u32,
    /// Service ports the kernel refuses, held out of the data plane.
    quarantine: Quarantine,
    /// Stale UDP conntrack entries, deleted after syncs.
    conntrack: conntrack::Reconciler,
    /// When the last sync (attempt) started, for `min_sync_period`.
    last_sync: Option<Instant>,
    last_check: Instant,
    last_full: Instant,
    /// The sources' events (set by [`Self::run`]): read during data-plane writes too.
    events: Option<EventReceiver>,
}

impl ProxyLoop {
    /// A loop programming `data_plane` for the node of `config`; `host` is the host's
    /// addresses at start (later changes arrive as [`SourceEvent::HostAddresses`]).
    pub fn new(
        config: ProxyConfig,
        data_plane: Box<dyn DataPlane>,
        report: Report,
        host: HostAddresses,
    ) -> Self {
        let mut state = ClusterState::new(config.node_name.clone());
        state.set_unsupported_protocols(config.unsupported_protocols.clone());
        state.set_service_cluster_ip_ranges(config.service_cluster_ip_ranges.clone());
        Self {
            state,
            config,
            plan: NodePlan::default(),
            data_plane,
            report,
            dns: None,
            node_local_dns: None,
            service_health: None,
            host,
            source_synced: false,
            needs_full_sync: true,
            retry_at: None,
            failures: 0,
            quarantine: Quarantine::default(),
            conntrack: conntrack::Reconciler::default(),
            last_sync: None,
            last_check: Instant::now(),
            last_full: Instant::now(),
            events: None,
        }
    }

    /// Keeps load balancers' service health servers in line with the model too.
    pub fn with_service_health(mut self, servers: ServiceHealthServers) -> Self {
        self.service_health = Some(servers);
        self
    }

    /// Serves the model to cluster DNS too; `addresses` are the ones it listens on.
    pub fn with_dns(mut self, dns: ClusterDns, addresses: Vec<std::net::IpAddr>) -> Self {
        self.state.track_dns();
        self.dns = Some(DnsFeed {
            dns,
            addresses,
            synced: false,
            deferred: HashSet::new(),
            programming: HashSet::new(),
        });
        self
    }

    /// Answers the cluster DNS Service (`service`) on this node with `steering`.
    pub fn with_node_local_dns(
        mut self,
        service: ServiceName,
        steering: NodeLocalDnsSteering,
    ) -> Self {
        self.state.set_node_local_dns(Some(service));
        self.node_local_dns = Some(steering);
        self
    }

    /// Runs until the sources hang up.
    pub fn run(mut self, events: EventReceiver) {
        self.events = Some(events);
        loop {
            let next = match &self.events {
                Some(events) => events.recv_timeout(self.next_wakeup()),
                None => return,
            };
            match next {
                Ok(event) => {
                    self.handle(event);
                    while let Some(Ok(event)) = self.events.as_ref().map(EventReceiver::try_recv) {
                        self.handle(event);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    info!("all sources stopped; proxy loop exits (programmed state stays)");
                    return;
                }
            }
            self.after_batch();
        }
    }

    /// What follows a batch of events (or a wake-up): DNS withdrawals first, then,
    /// once the source is complete, the tamper check, a sync unless a retry is
    /// pending, and the DNS records that waited for it.
    fn after_batch(&mut self) {
        self.update_dns();
        if !self.source_synced {
            return;
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
        if self.retry_at.is_none_or(|t| Instant::now() >= t) && self.min_sync_period_passed() {
            self.sync();
        }
        if let Some(steering) = &mut self.node_local_dns {
            steering.apply(self.data_plane.as_mut());
        }
        self.publish_programmed_dns();
    }

    /// When the next sync may start at the earliest (`min_sync_period` after the last).
    fn earliest_sync(&self) -> Option<Instant> {
        self.last_sync.map(|t| t + self.config.min_sync_period)
    }

    fn min_sync_period_passed(&self) -> bool {
        self.earliest_sync().is_none_or(|t| Instant::now() >= t)
    }

    fn next_wakeup(&self) -> Duration {
        let mut wait = self
            .config
            .sync_period
            .saturating_sub(self.last_check.elapsed());
        for t in self.retry_at.iter().chain(&self.quarantine.next_probe()) {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        if (self.state.has_changes() || self.needs_full_sync || self.quarantine.wants_full_sync())
            && let Some(t) = self.earliest_sync()
        {
            wait = wait.min(t.saturating_duration_since(Instant::now()));
        }
        wait.max(Duration::from_millis(1))
    }

    /// Publishes the DNS changes that need no programming (withdrawals, headless and
    /// unproxied services) and defers the others to [`Self::publish_programmed_dns`].
    fn update_dns(&mut self) {
        update_dns(&mut self.state, self.dns.as_mut(), &mut self.report);
    }

    /// Once every change is programmed (or the data plane failed and retries: DNS is
    /// not held hostage by a broken data plane), publishes the deferred records, and
    /// after the first sync tells the zone it is complete.
    fn publish_programmed_dns(&mut self) {
        let programmed = self.source_synced
            && !self.state.has_changes()
            && (!self.needs_full_sync || self.retry_at.is_some());
        let Some(feed) = &mut self.dns else { return };
        if !programmed {
            return;
        }
        if !feed.deferred.is_empty() {
            let names: Vec<ServiceName> = feed.deferred.drain().collect();
            feed.dns.update(&self.state, &names);
            self.report.dns_updated(names.len());
        }
        if !feed.synced {
            feed.dns.set_synced();
            feed.synced = true;
        }
    }

    fn handle(&mut self, event: SourceEvent) {
        let event = match (Fold {
            state: &mut self.state,
            report: &mut self.report,
            needs_full_sync: &mut self.needs_full_sync,
        })
        .event(event)
        {
            Some(other) => other,
            None => return,
        };
        match event {
            SourceEvent::Apply { .. } | SourceEvent::Delete(_) | SourceEvent::Rejected { .. } => {}
            SourceEvent::Synced => {
                if !self.source_synced {
                    info!("source delivered a complete view; programming starts");
                    self.report.source_synced();
                    self.source_synced = true;
                    self.needs_full_sync = true;
                }
            }
            SourceEvent::Question(question) => self.answer(question),
            SourceEvent::HostAddresses(host) => {
                if host != self.host {
                    info!("host addresses changed; reprogramming NodePort addresses");
                    self.host = host;
                    self.needs_full_sync = true;
                    self.ensure_dns_addresses();
                }
            }
        }
    }

    /// Answers `ferry explain` from the model, with what the data plane holds for
    /// each port.
    fn answer(&self, question: crate::explain::Question) {
        let port = question.port.as_deref();
        let mut explanation = explain(&self.state, &self.plan, &question.service, port);
        for p in explanation.iter_mut().flat_map(|e| &mut e.ports) {
            let Some(key) = &p.key else { continue };
            if let Some(error) = self.quarantine.reason(key) {
                p.not_programmed = Some(format!("the kernel refused it (quarantined): {error}"));
            } else if let Some(plan) = self.plan.get(key) {
                p.programmed = self.data_plane.describe(plan);
            }
        }
        // The asker may have given up waiting; nothing to do then.
        let _ = question.reply.try_send(explanation);
    }

    /// Puts back DNS listen addresses someone removed from the host (the sockets
    /// stay bound and answer again as soon as the address is back).
    fn ensure_dns_addresses(&mut self) {
        if let Some(feed) = &self.dns {
            for &ip in &feed.addresses {
                if let Err(e) = crate::dns::addresses::ensure(ip) {
                    warn!(%ip, error = %e, "cannot restore a DNS listen address");
                }
            }
        }
        if let Some(steering) = &mut self.node_local_dns {
            steering.invalidate();
        }
    }

    /// Programs what changed (everything, when a full sync is due).
    fn sync(&mut self) {
        let changes = self.state.take_changes();
        let full = self.needs_full_sync || self.quarantine.wants_full_sync();
        if changes.services.is_empty() && !full {
            return;
        }
        self.last_sync = Some(Instant::now());
        let mut diff = self.plan.update(&self.state, &changes.services);
        if self.quarantine.filter(&mut diff) {
            self.report.quarantined(self.quarantine.held());
        }
        if let Some(steering) = &mut self.node_local_dns {
            steering.track(&diff);
        }
        for skipped in &diff.skipped {
            let (port, protocol) = (&skipped.port, skipped.port.protocol);
            match skipped.reason {
                SkipReason::UnsupportedProtocol => {
                    warn!(service_port = %port, %protocol, "this kernel has no {protocol} support; the port is not programmed")
                }
                SkipReason::ClusterIpIsNodeAddress(ip) => {
                    warn!(service_port = %port, cluster_ip = %ip, "the ClusterIP is one of this node's own addresses; not programmed (it would capture the node's own traffic)")
                }
            }
            self.report.skipped(skipped);
        }
        for c in &diff.conflicts {
            warn!(service_port = %c.loser, frontend = %c.frontend, owner = %c.winner, "frontend claimed by another service port, which gets it (the first by namespace, name and port); not programmed for this one");
            self.report.frontend_conflict();
        }
        let mut node = NodeNetwork::new(
            self.state.node(),
            &self.host,
            &self.config.nodeport_addresses,
            &self.config.local_detection,
            self.config.masquerade_all,
        );
        node.service_cidrs = self.state.service_cidrs();
        self.update_service_health(&changes.services, full.then_some(&node));
        if diff.is_empty() && !full {
            self.report.finish_pending();
            return;
        }
        let excluded = self.quarantine.excluded();
        let without_excluded;
        let plan = match excluded.is_empty() {
            true => &self.plan,
            false => {
                without_excluded = self.plan.without(&excluded);
                &without_excluded
            }
        };
        let started = Instant::now();
        if let Some(feed) = &mut self.dns {
            feed.programming = std::mem::take(&mut feed.deferred);
        }
        let (result, later) = write_while_serving_dns(
            self.data_plane.as_mut(),
            plan,
            (&diff, &node, full),
            self.events.as_ref(),
            Fold {
                state: &mut self.state,
                report: &mut self.report,
                needs_full_sync: &mut self.needs_full_sync,
            },
            self.dns.as_mut(),
        );
        if let Some(feed) = &mut self.dns {
            let programmed = std::mem::take(&mut feed.programming);
            if result.is_ok() {
                // Changed again during the write: wait for the next one.
                let names: Vec<ServiceName> = programmed
                    .into_iter()
                    .filter(|n| !feed.deferred.contains(n))
                    .collect();
                if !names.is_empty() {
                    feed.dns.update(&self.state, &names);
                    self.report.dns_updated(names.len());
                }
            } else {
                feed.deferred.extend(programmed);
            }
        }
        match result {
            Ok(stats) => {
                self.quarantine.succeeded();
                self.report.quarantined(self.quarantine.held());
                if self.data_plane.nats_through_conntrack() {
                    let families = &self.config.families;
                    let cleared = self.conntrack.reconcile(plan, &diff, full, families);
                    self.report.conntrack_cleared(&cleared);
                }
                if full {
                    self.last_full = Instant::now();
                }
                if full && let Some(steering) = &mut self.node_local_dns {
                    steering.invalidate();
                }
                self.needs_full_sync = false;
                self.retry_at = None;
                self.failures = 0;
                self.report.synced(&SyncOutcome {
                    data_plane: self.data_plane.name(),
                    plan,
                    diff: &diff,
                    stats: &stats,
                    full,
                    took: started.elapsed(),
                });
            }
            Err(err) => self.sync_failed(&err, &diff, full),
        }
        // What waited for the write (it may ask the data plane, or change the node).
        for event in later {
            self.handle(event);
        }
    }

    /// After a failed sync: the next step of the quarantine's search at once, or a
    /// full sync retried with backoff.
    fn sync_failed(&mut self, err: &SyncError, diff: &PlanDiff, full: bool) {
        self.report.sync_failed(err);
        self.needs_full_sync = true;
        self.failures = self.failures.saturating_add(1);
        let message = error_chain(err);
        if self.quarantine.failed(&self.plan, diff, full, &message) == AfterFailure::Continue {
            info!(error = %message, "sync failed; the next step follows at once");
            self.retry_at = None;
            self.report.quarantined(self.quarantine.held());
            return;
        }
        let delay = retry_delay(self.failures);
        error!(data_plane = self.data_plane.name(), error = %message, retry_in_s = delay.as_secs(), failures_in_a_row = self.failures, "sync failed; retrying with a full sync");
        self.retry_at = Some(Instant::now() + delay);
    }

    /// Health servers follow the services that changed; on a full sync (`full_sync`:
    /// the node, for the NodePort addresses to listen on) every service is checked. A
    /// local endpoint turning terminating changes the answer without changing the
    /// plan, so this runs whether or not the plan changed.
    fn update_service_health(
        &mut self,
        changed: &HashSet<ServiceName>,
        full_sync: Option<&NodeNetwork>,
    ) {
        let Some(servers) = &mut self.service_health else {
            return;
        };
        let names: Vec<ServiceName> = match full_sync {
            Some(node) => {
                servers.set_addresses(node.nodeport_ips.clone());
                let mut names = servers.services();
                names.extend(self.state.services().map(|svc| svc.name.clone()));
                names
            }
            None => changed.iter().cloned().collect(),
        };
        for name in names {
            servers.update(&name, service_health_check(&self.state, &name));
        }
    }
}

pub mod node_local_dns;
mod quarantine;
/// Publishes the DNS changes that need no programming (withdrawals, headless and
/// unproxied services) and defers the others until their frontends are programmed.
fn update_dns(state: &mut ClusterState, feed: Option<&mut DnsFeed>, report: &mut Report) {
    let Some(feed) = feed else { return };
    let (deferred, now): (Vec<ServiceName>, Vec<ServiceName>) = state
        .take_dns_changes()
        .into_iter()
        .partition(|name| state.service(name).is_some_and(|svc| svc.is_proxied()));
    feed.deferred.extend(deferred);
    if !now.is_empty() {
        feed.dns.update(state, &now);
        report.dns_updated(now.len());
    }
}

/// The write thread's stack: what the loop's own (the main thread's) has, since the
/// data planes were written for it (large map values and restore payloads on the
/// stack in debug builds).
const WRITE_STACK: usize = 8 << 20;
/// How often the loop looks at new events while a data-plane write runs.
const EVENTS_DURING_WRITE: Duration = Duration::from_millis(20);

/// Runs one data-plane write on a thread of its own while this one keeps folding
/// object events into the model and publishing the DNS changes that need no
/// programming, so a slow kernel write (an xtables lock, a big nft transaction) never
/// holds the zone back. Returns the write's result and the events that must wait for
/// it (questions, host address changes, the source's first complete view).
fn write_while_serving_dns(
    data_plane: &mut dyn DataPlane,
    plan: &NodePlan,
    (diff, node, full): (&PlanDiff, &NodeNetwork, bool),
    events: Option<&EventReceiver>,
    mut fold: Fold<'_>,
    mut dns: Option<&mut DnsFeed>,
) -> (Result<SyncStats, SyncError>, Vec<SourceEvent>) {
    let Some(events) = events else {
        return (data_plane.sync(plan, diff, node, full), Vec::new());
    };
    let mut later = Vec::new();
    let result = std::thread::scope(|scope| {
        let write = std::thread::Builder::new()
            .name("data-plane-write".into())
            .stack_size(WRITE_STACK)
            .spawn_scoped(scope, || data_plane.sync(plan, diff, node, full));
        let write = match write {
            Ok(write) => write,
            // Retried with backoff like any failed write.
            Err(e) => return Err(SyncError::WriteThread(e)),
        };
        while !write.is_finished() {
            match events.recv_timeout(EVENTS_DURING_WRITE) {
                Ok(event) => later.extend(fold.event(event)),
                Err(RecvTimeoutError::Timeout) => {}
                // The sources stopped: only the write is left to wait for.
                Err(RecvTimeoutError::Disconnected) => break,
            }
            update_dns(fold.state, dns.as_deref_mut(), fold.report);
        }
        match write.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    });
    (result, later)
}

/// What folding an object event into the model touches.
struct Fold<'a> {
    state: &'a mut ClusterState,
    report: &'a mut Report,
    needs_full_sync: &'a mut bool,
}

impl Fold<'_> {
    /// Folds an object event (add, change, delete, rejection) into the model;
    /// hands any other event back.
    fn event(&mut self, event: SourceEvent) -> Option<SourceEvent> {
        if matches!(event, SourceEvent::Apply { .. } | SourceEvent::Delete(_)) {
            self.report.source_event();
        }
        match event {
            SourceEvent::Apply { object, origin } => self.apply(object, &origin),
            SourceEvent::Delete(r) => self.delete(&r),
            SourceEvent::Rejected { kind, .. } => self.report.invalid(kind),
            other => return Some(other),
        }
        None
    }

    /// Removes one object from the model.
    fn delete(&mut self, r: &ObjectRef) {
        let applied = match r.kind {
            Kind::Service => self
                .state
                .delete_service(&ServiceName::new(&r.namespace, &r.name)),
            Kind::EndpointSlice => self.state.delete_slice(&r.namespace, &r.name),
            Kind::Node => self.state.delete_node(&r.name),
            Kind::ServiceCidr => self.state.delete_service_cidr(&r.name),
        };
        if applied == Applied::Changed {
            *self.needs_full_sync |= r.kind == Kind::ServiceCidr;
            self.report.changed(r.kind);
            if r.kind == Kind::Node {
                self.report.node_leaving(self.state.node().leaving);
            }
        }
    }

    /// Folds one added or changed object into the model.
    fn apply(&mut self, object: Object, origin: &str) {
        let kind = object.object_ref().kind;
        let result = match &object {
            Object::Service(svc) => self.state.apply_service(svc),
            Object::EndpointSlice(slice) => self.state.apply_slice(slice),
            Object::Node(node) => self.state.apply_node(node),
            Object::ServiceCidr(cidr) => self.state.apply_service_cidr(cidr),
        };
        match result {
            Ok(Applied::Changed) => {
                self.report.changed(kind);
                // The data planes' view of the node's network changed, not a service.
                *self.needs_full_sync |= kind == Kind::ServiceCidr;
                if let Object::EndpointSlice(slice) = &object
                    && let Some((family, at)) = last_change_trigger_time(slice)
                {
                    self.report.triggered_at(family, at);
                }
                if let Object::Node(_) = &object {
                    self.report.node_leaving(self.state.node().leaving);
                }
            }
            Ok(Applied::Unchanged) => {}
            Ok(Applied::Ignored(why)) => {
                debug!(origin = %Escaped(origin), object = %object.object_ref(), why, "ignored");
            }
            Err(invalid) => {
                warn!(origin = %Escaped(origin), object = %invalid.object, reason = %Escaped(&invalid.reason.to_string()), "skipping invalid object; its previous version (if any) stays in effect");
                self.report.invalid(Some(invalid.object.kind));
            }
        }
    }
}

#[cfg(test)]
mod tests;
