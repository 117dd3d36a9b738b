//! `ferry run` and `ferry cleanup`: wiring sources, the proxy loop, the data plane and the
//! HTTP endpoints together.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tracing::{info, warn};

use crate::cli::Mode;
use crate::config::{DataPlaneConfig, RunConfig, SourceConfig};
use crate::dataplane::DataPlane;
use crate::dataplane::ebpf::node_local_dns::DnsLease;
use crate::dataplane::ebpf::{EbpfDataPlane, inspect, loader};
use crate::dataplane::iptables::render::Scope;
use crate::dataplane::iptables::{self, IptablesDataPlane};
use crate::dataplane::nftables::{self, NftablesDataPlane};
use crate::dns::listeners::DnsServer;
use crate::dns::{self, ClusterDns, DnsConfig};
use crate::health::{DnsSlot, Health, MetricsState, serve_health, serve_metrics};
use crate::host;
use crate::kube_proxy;
use crate::metrics::Metrics;
use crate::model::IpFamily;
use crate::probe;
use crate::proxy::node_local_dns::NodeLocalDnsSteering;
use crate::proxy::{ProxyConfig, ProxyLoop};
use crate::report::Report;
use crate::report::error_chain;
use crate::service_health::ServiceHealthServers;
use crate::source::queue::EventSender;
use crate::source::{self, manifests};

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
    metrics.status.update(|s| *s = initial_status(&config));
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
    let (tx, rx) = crate::source::queue::queue();
    let dns_slot = DnsSlot::default();
    if let Some(addr) = config.metrics {
        let mode = config.data_plane.mode_name();
        let served = MetricsState {
            metrics: metrics.clone(),
            asker: tx.asker(),
            dns: dns_slot.clone(),
        };
        runtime.spawn(serve_metrics(addr, served, mode, hard_fail));
    }
    let data_plane = start_data_plane(&config.data_plane, &metrics)?;
    let dns = match config.dns.clone() {
        Some(dns_config) => Some(start_dns(
            &runtime,
            dns_config,
            &config.data_plane,
            health.clone(),
            &metrics,
        )?),
        None => None,
    };
    if let Some(dns) = &dns {
        let _ = dns_slot.set(dns.server.answerer().clone());
    }
    let shutdown = Shutdown {
        dns: dns.as_ref().map(|d| (d.server.clone(), d.lease.clone())),
    };
    runtime.spawn(async move {
        exit_on_signal(shutdown).await;
    });
    let host = host::probe_addresses();
    host::watch_addresses(host.clone(), HOST_PROBE_PERIOD, tx.clone());
    let _watcher = start_source(&runtime, &config, tx, metrics.status.clone())?;
    let mut proxy = ProxyLoop::new(
        ProxyConfig {
            node_name: config.node_name,
            local_detection: config.local_detection,
            nodeport_addresses: config.nodeport_addresses,
            masquerade_all: config.masquerade_all,
            sync_period: config.sync_period,
            min_sync_period: config.min_sync_period,
            unsupported_protocols: host::unsupported_protocols(),
            service_cluster_ip_ranges: config.service_cluster_ip_ranges,
            families: families(),
            full_sync_period: config.full_sync_period,
        },
        data_plane,
        Report::new(metrics, health.clone(), families()),
        host,
    )
    .with_service_health(ServiceHealthServers::new(runtime.handle().clone(), health));
    if let Some(dns) = dns {
        let addresses = dns.config.listen.iter().map(|a| a.ip()).collect();
        proxy = proxy.with_dns(dns.cluster, addresses);
        if let Some(service) = dns.config.service.clone() {
            let steering = NodeLocalDnsSteering::new(dns.server.clone(), dns.config.listen.clone());
            proxy = proxy.with_node_local_dns(service, steering);
        }
    }
    proxy.run(rx);
    Ok(())
}

/// What `ferry status` shows before anything happened.
fn initial_status(config: &RunConfig) -> crate::status::AgentStatus {
    let (cgroup, pin_dir) = match &config.data_plane {
        DataPlaneConfig::Ebpf(e) => (
            Some(e.cgroup.display().to_string()),
            Some(e.pin_dir.display().to_string()),
        ),
        _ => (None, None),
    };
    crate::status::AgentStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        node: config.node_name.clone(),
        mode: config.data_plane.mode_name().into(),
        mode_reason: config.mode_reason.clone(),
        kernel: probe::kernel_features(),
        source: match &config.source {
            SourceConfig::Manifests(dir) => format!("manifests in {}", dir.display()),
            SourceConfig::Cluster(_) => "the Kubernetes API server".into(),
        },
        cgroup,
        pin_dir,
        dns_listen: config
            .dns
            .iter()
            .flat_map(|d| d.listen.iter().map(|a| a.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn start_data_plane(
    config: &DataPlaneConfig,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Box<dyn DataPlane>> {
    remove_other_modes_state(config);
    Ok(match config {
        DataPlaneConfig::Iptables => Box::new(IptablesDataPlane::new(&families(), Scope::All)),
        DataPlaneConfig::Nftables => {
            probe::resolve(Mode::Nftables, None)?;
            Box::new(NftablesDataPlane::new(&families()))
        }
        DataPlaneConfig::Ebpf(ebpf) => {
            probe::resolve(Mode::Ebpf, Some(&ebpf.cgroup))?;
            Box::new(
                EbpfDataPlane::start(ebpf, &families(), metrics.clone())
                    .context("starting the eBPF data plane")?,
            )
        }
    })
}

/// A node switched between modes keeps no rules of the previous one (they would
/// still translate traffic): nftables mode removes Ferry's and kube-proxy's iptables
/// service chains, the other modes remove Ferry's nftables tables. Failures are
/// logged; the new mode starts anyway.
fn remove_other_modes_state(config: &DataPlaneConfig) {
    let result = match config {
        DataPlaneConfig::Nftables => {
            IptablesDataPlane::cleanup(&families()).context("removing iptables service rules")
        }
        _ => NftablesDataPlane::cleanup(&families()).context("removing Ferry's nftables tables"),
    };
    if let Err(error) = result {
        warn!(error = %error_chain(error.as_ref()), "cannot remove another mode's rules");
    }
}

/// The running DNS server and what the rest of the agent needs of it.
struct RunningDns {
    config: DnsConfig,
    cluster: ClusterDns,
    server: Arc<DnsServer>,
    /// eBPF mode: the lease the socket hooks check before answering the kube-dns
    /// ClusterIP locally.
    lease: Option<SharedLease>,
}

/// The eBPF lease, renewed by the liveness probe and revoked at shutdown.
type SharedLease = Arc<Mutex<DnsLease>>;

/// Starts DNS: takes the sockets over from a running predecessor once this agent's
/// zone is complete, or binds them now (failing start-up if they cannot be had).
fn start_dns(
    runtime: &tokio::runtime::Runtime,
    config: DnsConfig,
    data_plane: &DataPlaneConfig,
    health: Arc<Health>,
    metrics: &Metrics,
) -> anyhow::Result<RunningDns> {
    let cluster = ClusterDns::new(&config.domain).with_pod_records(config.pod_records);
    let server = dns::server(
        &config,
        cluster.clone(),
        runtime.handle().clone(),
        metrics.dns.clone(),
    );
    if let Some(addr) = config.ready {
        let (cluster, server) = (cluster.clone(), server.clone());
        let ready: Arc<dyn Fn() -> bool + Send + Sync> =
            Arc::new(move || cluster.is_synced() && !server.addresses().is_empty());
        runtime.spawn(crate::health::serve_dns_ready(addr, ready, false));
    }
    let predecessor = config
        .handover
        .as_deref()
        .filter(|path| dns::handover::predecessor(path));
    match predecessor {
        Some(path) => take_over_when_synced(path.to_path_buf(), &config, &cluster, &server),
        None => {
            for &addr in &config.listen {
                listen(&server, addr)?;
            }
            if let Some(path) = &config.handover {
                accept_successors(path.clone(), &server);
            }
        }
    }
    let lease = match data_plane {
        DataPlaneConfig::Ebpf(ebpf) if config.service.is_some() => Some(Arc::new(Mutex::new(
            DnsLease::open(&ebpf.pin_dir).context("opening the DNS lease map")?,
        ))),
        _ => None,
    };
    watch_liveness(runtime, &config, lease.clone(), health);
    Ok(RunningDns {
        config,
        cluster,
        server,
        lease,
    })
}

/// Serves `addr`, adding the address to the host first if it lacks it.
fn listen(server: &DnsServer, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    dns::addresses::ensure(addr.ip())
        .with_context(|| format!("cannot add DNS listen address {}", addr.ip()))?;
    server
        .listen(addr)
        .with_context(|| format!("cannot listen for DNS on {addr}"))
}

/// Lets a successor take the sockets at `path`.
fn accept_successors(path: std::path::PathBuf, server: &Arc<DnsServer>) {
    if let Err(e) = dns::handover::serve(path.clone(), server.clone()) {
        tracing::warn!(path = %path.display(), error = %e, "cannot accept DNS socket handovers; a restart will drop queries");
    }
}

/// Waits (on a thread) for the zone to be complete, then takes the predecessor's
/// sockets; if that fails, binds fresh ones.
fn take_over_when_synced(
    path: std::path::PathBuf,
    config: &DnsConfig,
    cluster: &ClusterDns,
    server: &Arc<DnsServer>,
) {
    info!(path = %path.display(), "a running agent serves DNS; taking its sockets once the zone is complete");
    let (cluster, server, addrs) = (cluster.clone(), server.clone(), config.listen.clone());
    server.set_taking_over(true);
    std::thread::spawn(move || {
        while !cluster.is_synced() {
            std::thread::sleep(Duration::from_millis(20));
        }
        match dns::handover::take(&path) {
            Ok(sockets) => {
                for (addr, s) in sockets {
                    if let Err(e) = server.adopt(addr, s) {
                        tracing::error!(%addr, error = %e, "cannot serve a handed-over DNS socket");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "DNS socket handover failed; binding fresh sockets")
            }
        }
        for addr in addrs {
            if let Err(e) = listen(&server, addr) {
                tracing::error!(%addr, error = %error_chain(e.as_ref()), "cannot serve DNS");
            }
        }
        server.set_taking_over(false);
        accept_successors(path, &server);
    });
}

/// Probes the local server: each good answer renews the eBPF lease (if any) and
/// counts for liveness.
fn watch_liveness(
    runtime: &tokio::runtime::Runtime,
    config: &DnsConfig,
    lease: Option<SharedLease>,
    health: Arc<Health>,
) {
    let Some(target) = config
        .listen
        .first()
        .map(|a| host::loopback_if_unspecified(*a))
    else {
        return;
    };
    let apex = hickory_server::proto::rr::Name::from_ascii(config.domain.apex())
        .unwrap_or_else(|_| hickory_server::proto::rr::Name::root());
    dns::liveness::spawn(runtime.handle(), target, apex, move || {
        if let Some(lease) = &lease {
            lease
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .renew(dns::liveness::VALID_FOR);
        }
        health.dns_answered();
    });
}

/// Starts the configured source feeding `tx`; returns the directory watcher's thread
/// when the source is a manifest directory.
fn start_source(
    runtime: &tokio::runtime::Runtime,
    config: &RunConfig,
    tx: EventSender,
    status: crate::status::StatusBoard,
) -> anyhow::Result<Option<std::thread::JoinHandle<()>>> {
    match &config.source {
        SourceConfig::Manifests(dir) => Ok(Some(manifests::spawn(dir.clone(), tx)?)),
        SourceConfig::Cluster(access) => {
            let (client, server) = runtime.block_on(source::kube::client(access))?;
            let node = config.node_name.clone();
            runtime.spawn(source::kube::run(client, server, node, tx, status));
            Ok(None)
        }
    }
}

/// What a signalled agent finishes before it exits.
struct Shutdown {
    dns: Option<(Arc<DnsServer>, Option<SharedLease>)>,
}

impl Shutdown {
    /// A server that handed its sockets over answers what it still has in flight; one
    /// that did not gives the kube-dns ClusterIP back to its endpoints at once.
    async fn finish(self) {
        let Some((server, lease)) = self.dns else {
            return;
        };
        if server.is_retired() {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while server.in_flight() > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        } else if let Some(lease) = lease {
            lease
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .revoke();
        }
    }
}

/// Exits on SIGTERM or SIGINT. Programmed state is left in place on purpose (as
/// kube-proxy does), so traffic keeps flowing while the agent restarts.
async fn exit_on_signal(shutdown: Shutdown) {
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
    shutdown.finish().await;
    info!("signalled; exiting and leaving the data plane programmed");
    std::process::exit(0);
}

/// Removes everything Ferry programmed in this network namespace, and its pinned
/// eBPF programs and maps; with `kube_proxy`, also what kube-proxy left in any mode.
pub fn cleanup(pin_dir: &std::path::Path, kube_proxy: bool) -> anyhow::Result<()> {
    IptablesDataPlane::cleanup(&families()).context("removing iptables rules")?;
    NftablesDataPlane::cleanup(&families()).context("removing nftables tables")?;
    if kube_proxy {
        kube_proxy::cleanup(&families())?;
    }
    if loader::cleanup(pin_dir).context("removing eBPF programs and maps")? {
        info!(pins = %pin_dir.display(), "removed eBPF programs and maps");
    }
    info!("cleanup done");
    Ok(())
}

/// Prints the programmed frontends (`ferry inspect services`), read back from the
/// kernel: Ferry's nftables tables when they exist, else the eBPF maps when they are
/// pinned (with the NodePorts, which eBPF mode leaves to iptables), else the iptables
/// rules.
pub fn inspect_services(
    pin_dir: &std::path::Path,
    address: std::net::SocketAddr,
    json: bool,
) -> anyhow::Result<()> {
    let view = if nftables::inspect::present() {
        nftables::inspect::inspect().context("reading Ferry's nftables tables")?
    } else if pin_dir.join(ferry_common::maps::FRONTENDS.name).exists() {
        let mut view = inspect::inspect(pin_dir)
            .with_context(|| format!("reading the eBPF maps pinned in {}", pin_dir.display()))?;
        view.name_frontends(&crate::monitor::frontend_names(address));
        if let Ok(rules) = iptables::inspect::inspect() {
            view.add_node_ports(rules);
        }
        view
    } else {
        iptables::inspect::inspect().context(
            "reading the iptables rules (no nftables table or eBPF maps of Ferry's found either)",
        )?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", view.table());
    }
    Ok(())
}
