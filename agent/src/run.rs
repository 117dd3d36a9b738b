//! `ferry run` and `ferry cleanup`: wiring sources, the proxy loop, the data plane and the
//! HTTP endpoints together.

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use anyhow::Context as _;
use tracing::info;

use crate::config::{DataPlaneConfig, RunConfig, SourceConfig};
use crate::dataplane::DataPlane;
use crate::dataplane::ebpf::{EbpfDataPlane, inspect, loader};
use crate::dataplane::iptables::IptablesDataPlane;
use crate::dataplane::iptables::render::Scope;
use crate::dns::{self, ClusterDns, DnsConfig};
use crate::health::{Health, serve_health, serve_metrics};
use crate::host;
use crate::kube_proxy;
use crate::metrics::Metrics;
use crate::model::IpFamily;
use crate::proxy::{ProxyConfig, ProxyLoop};
use crate::report::Report;
use crate::service_health::ServiceHealthServers;
use crate::source::{self, SourceEvent, manifests};

/// IP families this network namespace can program.
fn families() -> Vec<IpFamily> {
    let mut families = vec![IpFamily::V4];
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        families.push(IpFamily::V6);
    }
    families
}

/// How often the host's addresses are probed even without an rtnetlink announcement
/// (a safety net; announcements trigger a probe at once).
const HOST_PROBE_PERIOD: Duration = Duration::from_secs(10);

/// Runs the agent until it is signalled.
pub fn run(config: RunConfig) -> anyhow::Result<()> {
    info!(version = env!("CARGO_PKG_VERSION"), node = config.node_name, data_plane = ?config.data_plane, "ferry starting");
    let ports: Vec<_> = config
        .healthz
        .iter()
        .chain(&config.metrics)
        .copied()
        .collect();
    if let Some(what) = kube_proxy::running_on(&ports) {
        anyhow::bail!(kube_proxy::refusal(&what));
    }
    config.node_settings.apply();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(config.sync_period * 2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let hard_fail = config.bind_address_hard_fail;
    if let Some(addr) = config.healthz {
        runtime.spawn(serve_health(
            addr,
            health.clone(),
            metrics.clone(),
            families(),
            hard_fail,
        ));
    }
    if let Some(addr) = config.metrics {
        let mode = config.data_plane.mode_name();
        runtime.spawn(serve_metrics(addr, metrics.clone(), mode, hard_fail));
    }
    runtime.spawn(async {
        exit_on_signal().await;
    });
    let data_plane = start_data_plane(&config.data_plane, &metrics)?;
    let dns = match config.dns.clone() {
        Some(dns_config) => Some(start_dns(&runtime, dns_config)?),
        None => None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let host = host::probe_addresses();
    host::watch_addresses(host.clone(), HOST_PROBE_PERIOD, tx.clone());
    let _watcher = start_source(&runtime, &config, tx)?;
    let mut proxy = ProxyLoop::new(
        ProxyConfig {
            node_name: config.node_name,
            local_detection: config.local_detection,
            nodeport_addresses: config.nodeport_addresses,
            masquerade_all: config.masquerade_all,
            sync_period: config.sync_period,
            min_sync_period: config.min_sync_period,
            unsupported_protocols: host::unsupported_protocols(),
            families: families(),
            full_sync_period: config.full_sync_period,
        },
        data_plane,
        Report::new(metrics, health.clone(), families()),
        host,
    )
    .with_service_health(ServiceHealthServers::new(runtime.handle().clone(), health));
    if let Some(dns) = dns {
        proxy = proxy.with_dns(dns);
    }
    proxy.run(rx);
    Ok(())
}

fn start_data_plane(
    config: &DataPlaneConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Box<dyn DataPlane>> {
    Ok(match config {
        DataPlaneConfig::Iptables => Box::new(IptablesDataPlane::new(&families(), Scope::All)),
        DataPlaneConfig::Ebpf(ebpf) => Box::new(
            EbpfDataPlane::start(ebpf, &families(), metrics.clone())
                .context("starting the eBPF data plane")?,
        ),
    })
}

/// Binds the DNS sockets (failing start-up if they cannot be had) and serves them.
fn start_dns(runtime: &tokio::runtime::Runtime, config: DnsConfig) -> anyhow::Result<ClusterDns> {
    let sockets = runtime
        .block_on(dns::bind(config.listen))
        .with_context(|| format!("cannot listen for DNS on {}", config.listen))?;
    let cluster = ClusterDns::new(&config.domain);
    let served = cluster.clone();
    runtime.spawn(async move {
        let listen = config.listen;
        if let Err(e) = dns::serve(config, sockets, served).await {
            tracing::error!(%listen, error = %e, "cluster DNS stopped");
        }
    });
    Ok(cluster)
}

/// Starts the configured source feeding `tx`; returns the directory watcher's thread
/// when the source is a manifest directory.
fn start_source(
    runtime: &tokio::runtime::Runtime,
    config: &RunConfig,
    tx: Sender<SourceEvent>,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    match &config.source {
        SourceConfig::Manifests(dir) => Ok(Some(manifests::spawn(dir.clone(), tx)?)),
        SourceConfig::Cluster(access) => {
            let (client, server) = runtime.block_on(source::kube::client(access))?;
            let node = config.node_name.clone();
            runtime.spawn(source::kube::run(client, server, node, tx));
            Ok(None)
        }
    }
}

/// Exits on SIGTERM or SIGINT. Programmed state is left in place on purpose (as
/// kube-proxy does), so traffic keeps flowing while the agent restarts.
async fn exit_on_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("signalled; exiting and leaving the data plane programmed");
    std::process::exit(0);
}

/// Removes everything Ferry programmed in this network namespace, and its pinned
/// eBPF programs and maps; with `kube_proxy`, also what kube-proxy left in any mode.
pub fn cleanup(pin_dir: &std::path::Path, kube_proxy: bool) -> anyhow::Result<()> {
    IptablesDataPlane::cleanup(&families()).context("removing iptables rules")?;
    if kube_proxy {
        kube_proxy::cleanup(&families())?;
    }
    if loader::cleanup(pin_dir).context("removing eBPF programs and maps")? {
        info!(pins = %pin_dir.display(), "removed eBPF programs and maps");
    }
    info!("cleanup done");
    Ok(())
}

/// Prints the eBPF frontends (`ferry inspect services`).
pub fn inspect_services(pin_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let view = inspect::inspect(pin_dir).with_context(|| {
        format!(
            "reading the eBPF maps pinned in {} (is ferry running in eBPF mode?)",
            pin_dir.display()
        )
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", view.table());
    }
    Ok(())
}
