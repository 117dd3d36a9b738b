//! Prometheus metrics under kube-proxy's names, so existing dashboards and alerts keep
//! working when Ferry replaces it, plus a few of Ferry's own (`ferry_*`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set of a metric family.
pub type Labels = Vec<(String, String)>;

/// All metrics the agent exports. Cheap to update from any thread.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub sync_full_duration: Histogram,
    pub sync_partial_duration: Histogram,
    pub last_sync_timestamp: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp: Gauge<f64, AtomicU64>,
    pub network_programming: Histogram,
    pub endpoint_changes: Counter,
    pub endpoint_changes_pending: Gauge,
    pub service_changes: Counter,
    pub service_changes_pending: Gauge,
    pub iptables_rules: Family<Labels, Gauge>,
    pub restore_failures: Counter,
    pub no_local_endpoints: Family<Labels, Gauge>,
    pub invalid_objects: Family<Labels, Counter>,
    pub sync_failures: Counter,
    /// eBPF map updates refused by the kernel (map full), by map.
    pub map_full: Family<Labels, Counter>,
    pub ebpf_frontends: Gauge,
    pub ebpf_backends: Gauge,
    /// Updates and deletes done on the eBPF maps.
    pub ebpf_map_writes: Counter,
    /// From a change reaching the agent to DNS answering with it.
    pub dns_programming: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under its exported name.
    pub fn new() -> Self {
        let sync_buckets = || Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        let sync_duration = sync_buckets();
        let sync_full_duration = sync_buckets();
        let sync_partial_duration = sync_buckets();
        let network_programming = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        let m = Self {
            sync_duration,
            sync_full_duration,
            sync_partial_duration,
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            network_programming,
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            iptables_rules: Family::default(),
            restore_failures: Counter::default(),
            no_local_endpoints: Family::default(),
            invalid_objects: Family::default(),
            sync_failures: Counter::default(),
            map_full: Family::default(),
            ebpf_frontends: Gauge::default(),
            ebpf_backends: Gauge::default(),
            ebpf_map_writes: Counter::default(),
            dns_programming: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            registry: Registry::default(),
        };
        let mut registry = Registry::default();
        m.register_kube_proxy(&mut registry);
        m.register_ferry(&mut registry);
        Self { registry, ..m }
    }

    /// kube-proxy's own metrics (`pkg/proxy/metrics`), same names and help texts.
    fn register_kube_proxy(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            m.sync_full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            m.sync_partial_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            m.last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            m.last_queued_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            m.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            m.endpoint_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            m.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            m.service_changes.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            m.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            m.iptables_rules.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            m.restore_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            m.no_local_endpoints.clone(),
        );
    }

    /// Ferry's own metrics (`ferry_*`).
    fn register_ferry(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "ferry_invalid_objects",
            "Objects skipped because they are invalid, by kind",
            m.invalid_objects.clone(),
        );
        registry.register(
            "ferry_sync_failures",
            "Syncs that failed and were retried as full syncs",
            m.sync_failures.clone(),
        );
        registry.register(
            "ferry_ebpf_map_full_errors",
            "eBPF map updates refused because the map is full, by map",
            m.map_full.clone(),
        );
        registry.register(
            "ferry_ebpf_frontends",
            "Service frontends programmed in the eBPF maps",
            m.ebpf_frontends.clone(),
        );
        registry.register(
            "ferry_ebpf_backends",
            "Distinct backends programmed in the eBPF maps",
            m.ebpf_backends.clone(),
        );
        registry.register(
            "ferry_ebpf_map_writes",
            "Updates and deletes done on the eBPF maps",
            m.ebpf_map_writes.clone(),
        );
        registry.register(
            "ferry_dns_programming_duration_seconds",
            "From a Service or EndpointSlice change reaching the agent to DNS answering with it",
            m.dns_programming.clone(),
        );
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
    fn exports_kube_proxy_names() {
        let m = Metrics::new();
        m.sync_duration.observe(0.01);
        m.endpoint_changes.inc();
        m.invalid_object("Service");
        let text = m.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_network_programming_duration_seconds",
            "ferry_invalid_objects_total{kind=\"Service\"} 1",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
