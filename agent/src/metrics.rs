//! Prometheus metrics under kube-proxy's names, types, buckets and labels
//! (`pkg/proxy/metrics`), so existing dashboards and alerts keep working when Ferry
//! replaces it, plus the process metrics every Kubernetes component exports and
//! Ferry's own (`ferry_*`, including the eBPF data-path counters).

mod collectors;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::IpFamily;

/// Label set of a metric family.
pub type Labels = Vec<(String, String)>;

/// A histogram family whose histograms all have the same buckets.
pub type HistogramFamily = Family<Labels, Histogram, Buckets>;

/// A timestamp gauge family (seconds since the epoch).
pub type TimestampFamily = Family<Labels, Gauge<f64, AtomicU64>>;

/// Makes histograms with one bucket layout (a `Family` constructor).
#[derive(Clone)]
pub struct Buckets(fn() -> Vec<f64>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new((self.0)())
    }
}

/// kube-proxy's sync latency buckets: 1 ms to 16.4 s, doubling.
fn sync_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 2.0, 15).collect()
}

/// kube-proxy's network programming latency buckets: 0, 0.25 s, 0.5 s, every second
/// to 59 s, every 5 s to 115 s, every 30 s to 300 s.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    b
}

/// Ferry's DNS programming buckets: 10 µs doubling to about 10 s.
fn dns_buckets() -> Vec<f64> {
    exponential_buckets(0.00001, 2.0, 20).collect()
}

/// The `ip_family` label kube-proxy puts on its per-family metrics.
pub fn ip_family(family: IpFamily) -> Labels {
    vec![("ip_family".to_owned(), family.to_string())]
}

/// All metrics the agent exports. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    /// What `ferry status` shows (served at `/status` beside `/metrics`).
    pub status: crate::status::StatusBoard,
    pub sync_duration: HistogramFamily,
    pub sync_full_duration: HistogramFamily,
    pub sync_partial_duration: HistogramFamily,
    pub last_sync_timestamp: TimestampFamily,
    pub last_queued_timestamp: TimestampFamily,
    pub network_programming: HistogramFamily,
    pub endpoint_changes: Counter,
    pub endpoint_changes_pending: Gauge,
    pub service_changes: Counter,
    pub service_changes_pending: Gauge,
    pub iptables_rules: Family<Labels, Gauge>,
    pub iptables_rules_last: Family<Labels, Gauge>,
    pub restore_failures: Family<Labels, Counter>,
    pub partial_restore_failures: Family<Labels, Counter>,
    pub no_local_endpoints: Family<Labels, Gauge>,
    pub healthz_requests: Family<Labels, Counter>,
    pub livez_requests: Family<Labels, Counter>,
    pub conntrack_cleanup_duration: HistogramFamily,
    pub conntrack_deleted: Family<Labels, Counter>,
    pub invalid_objects: Family<Labels, Counter>,
    /// Service ports not programmed, by protocol and reason.
    pub skipped_ports: Family<Labels, Counter>,
    /// Frontends a service port asked for and another one owns, as found.
    pub frontend_conflicts: Counter,
    pub sync_failures: Counter,
    /// Service ports held out of the kernel because it refused them.
    pub quarantined: Gauge,
    /// eBPF map updates refused by the kernel (map full), by map.
    pub map_full: Family<Labels, Counter>,
    pub ebpf_frontends: Gauge,
    pub ebpf_backends: Gauge,
    /// Service chains in Ferry's nftables tables, by family.
    pub nftables_chains: Family<Labels, Gauge>,
    /// Map and set elements in Ferry's nftables tables, by family.
    pub nftables_elements: Family<Labels, Gauge>,
    /// Updates and deletes done on the eBPF maps.
    pub ebpf_map_writes: Counter,
    /// Connected UDP sockets terminated because their backend stopped serving.
    pub udp_sockets_terminated: Counter,
    /// From a change reaching the agent to its being programmed.
    pub programming: Histogram,
    /// From a change reaching the agent to DNS answering with it.
    pub dns_programming: Histogram,
    /// CoreDNS's metrics, for the DNS server and forwarder.
    pub dns: Arc<crate::dns::metrics::DnsMetrics>,
    /// Where the eBPF maps are pinned, once the eBPF data plane runs: the data-path
    /// counters are read from there at each scrape.
    datapath: Arc<OnceLock<collectors::DatapathExport>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under its exported name.
    pub fn new() -> Self {
        let histograms = |b| HistogramFamily::new_with_constructor(Buckets(b));
        let m = Self {
            sync_duration: histograms(sync_buckets),
            sync_full_duration: histograms(sync_buckets),
            sync_partial_duration: histograms(sync_buckets),
            last_sync_timestamp: Family::default(),
            last_queued_timestamp: Family::default(),
            network_programming: histograms(network_programming_buckets),
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            iptables_rules: Family::default(),
            iptables_rules_last: Family::default(),
            restore_failures: Family::default(),
            partial_restore_failures: Family::default(),
            no_local_endpoints: Family::default(),
            healthz_requests: Family::default(),
            livez_requests: Family::default(),
            conntrack_cleanup_duration: histograms(sync_buckets),
            conntrack_deleted: Family::default(),
            invalid_objects: Family::default(),
            skipped_ports: Family::default(),
            frontend_conflicts: Counter::default(),
            quarantined: Gauge::default(),
            sync_failures: Counter::default(),
            map_full: Family::default(),
            ebpf_frontends: Gauge::default(),
            ebpf_backends: Gauge::default(),
            nftables_chains: Family::default(),
            nftables_elements: Family::default(),
            ebpf_map_writes: Counter::default(),
            udp_sockets_terminated: Counter::default(),
            programming: Histogram::new(network_programming_buckets()),
            dns_programming: Histogram::new(dns_buckets()),
            datapath: Arc::default(),
            dns: Arc::default(),
            registry: Registry::default(),
            status: crate::status::StatusBoard::default(),
        };
        let mut registry = Registry::default();
        m.register_kube_proxy(&mut registry);
        m.register_ferry(&mut registry);
        m.dns.register(&mut registry);
        registry.register_collector(Box::new(collectors::Process));
        registry.register_collector(Box::new(collectors::BuildInfo));
        registry.register_collector(Box::new(collectors::Datapath(m.datapath.clone())));
        Self { registry, ..m }
    }

    /// kube-proxy's own metrics, same names, help texts, buckets and labels.
    fn register_kube_proxy(&self, r: &mut Registry) {
        let m = self;
        let p = "kubeproxy_sync_proxy_rules";
        r.register(
            format!("{p}_duration_seconds"),
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        r.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        r.register(
            format!("{p}_last_timestamp_seconds"),
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        r.register(
            format!("{p}_last_queued_timestamp_seconds"),
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        r.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        r.register(
            format!("{p}_endpoint_changes"),
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes.clone(),
        );
        r.register(
            format!("{p}_endpoint_changes_pending"),
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        r.register(
            format!("{p}_service_changes"),
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        r.register(
            format!("{p}_service_changes_pending"),
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        r.register(
            format!("{p}_iptables_total"),
            "Total number of iptables rules owned by kube-proxy",
            m.iptables_rules.clone(),
        );
        r.register(
            format!("{p}_iptables_last"),
            "Number of iptables rules written by kube-proxy in last sync",
            m.iptables_rules_last.clone(),
        );
        r.register(
            format!("{p}_iptables_restore_failures"),
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        r.register(
            format!("{p}_iptables_partial_restore_failures"),
            "Cumulative proxy iptables partial restore failures",
            m.partial_restore_failures.clone(),
        );
        r.register(
            format!("{p}_no_local_endpoints_total"),
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
        r.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            m.healthz_requests.clone(),
        );
        r.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            m.livez_requests.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            m.conntrack_cleanup_duration.clone(),
        );
        r.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            m.conntrack_deleted.clone(),
        );
    }

    /// Ferry's own metrics (`ferry_*`).
    fn register_ferry(&self, r: &mut Registry) {
        let m = self;
        r.register(
            "ferry_invalid_objects",
            "Objects skipped because they are invalid, by kind",
            m.invalid_objects.clone(),
        );
        r.register(
            "ferry_skipped_service_ports",
            "Service port recomputations left unprogrammed, by protocol and reason (unsupported_protocol: the kernel lacks it; node_address: the ClusterIP is the node's own)",
            m.skipped_ports.clone(),
        );
        r.register(
            "ferry_sync_failures",
            "Syncs that failed and were retried as full syncs",
            m.sync_failures.clone(),
        );
        r.register(
            "ferry_quarantined_service_ports",
            "Service ports (per IP family) the kernel refused, held out of the data plane and retried with backoff",
            m.quarantined.clone(),
        );
        r.register(
            "ferry_ebpf_map_full_errors",
            "eBPF map updates refused because the map is full, by map",
            m.map_full.clone(),
        );
        r.register(
            "ferry_ebpf_frontends",
            "Service frontends programmed in the eBPF maps",
            m.ebpf_frontends.clone(),
        );
        r.register(
            "ferry_ebpf_backends",
            "Distinct backends programmed in the eBPF maps",
            m.ebpf_backends.clone(),
        );
        r.register(
            "ferry_nftables_chains",
            "Service chains in Ferry's nftables tables",
            m.nftables_chains.clone(),
        );
        r.register(
            "ferry_nftables_elements",
            "Map and set elements in Ferry's nftables tables",
            m.nftables_elements.clone(),
        );
        r.register(
            "ferry_frontend_conflicts",
            "Frontends (address, port, protocol) a service port asked for and another port owns, counted each time the loser is planned",
            m.frontend_conflicts.clone(),
        );
        r.register(
            "ferry_ebpf_map_writes",
            "Updates and deletes done on the eBPF maps",
            m.ebpf_map_writes.clone(),
        );
        r.register(
            "ferry_udp_sockets_terminated",
            "Connected UDP sockets terminated in eBPF mode because their backend stopped serving",
            m.udp_sockets_terminated.clone(),
        );
        r.register(
            "ferry_programming_duration_seconds",
            "From a Service or EndpointSlice change reaching the agent to its being programmed",
            m.programming.clone(),
        );
        r.register(
            "ferry_dns_programming_duration_seconds",
            "From a Service or EndpointSlice change reaching the agent to DNS answering with it",
            m.dns_programming.clone(),
        );
    }

    /// Exports the eBPF data path's counters, read from the maps pinned in `dir` at
    /// each scrape, the per-service ones named after `names`.
    pub fn export_datapath_counters(
        &self,
        dir: std::path::PathBuf,
        names: crate::dataplane::ebpf::names::FrontendNames,
    ) {
        let _ = self
            .datapath
            .set(collectors::DatapathExport { pins: dir, names });
    }

    /// The service port of every frontend the eBPF data plane programmed (`/frontends`:
    /// `ferry monitor` and `ferry inspect services` name frontends with it); empty in
    /// other modes.
    pub fn frontend_names(&self) -> Vec<crate::dataplane::ebpf::names::FrontendName> {
        self.datapath
            .get()
            .map(|d| d.names.list())
            .unwrap_or_default()
    }

    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts one invalid object of a kind.
    pub fn invalid_object(&self, kind: &str) {
        self.invalid_objects
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }

    /// Counts one answer of the health server (`livez`: the liveness endpoint).
    pub fn health_answered(&self, livez: bool, code: u16) {
        let family = if livez {
            &self.livez_requests
        } else {
            &self.healthz_requests
        };
        family
            .get_or_create(&vec![("code".to_owned(), code.to_string())])
            .inc();
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_kube_proxy_names_types_and_labels() {
        let m = Metrics::new();
        m.sync_duration
            .get_or_create(&ip_family(IpFamily::V6))
            .observe(0.01);
        m.endpoint_changes.inc();
        m.invalid_object("Service");
        m.health_answered(false, 503);
        let text = m.encode();
        for line in [
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.016\",ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\",ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            "ferry_invalid_objects_total{kind=\"Service\"} 1",
            "# TYPE process_resident_memory_bytes gauge",
            "# TYPE process_cpu_seconds counter",
            "ferry_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn network_programming_buckets_are_kube_proxys() {
        let b = network_programming_buckets();
        assert_eq!(b.len(), 81);
        assert_eq!(&b[..5], [0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(b[61], 59.0);
        assert_eq!(b[62], 60.0);
        assert_eq!(b[73], 115.0);
        assert_eq!(b[74], 120.0);
        assert_eq!(b[80], 300.0);
        assert_eq!(sync_buckets().last(), Some(&16.384));
    }
}
