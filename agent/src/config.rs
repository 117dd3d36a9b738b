//! Resolving `ferry run`'s flags into the settings the agent runs with. Unlike
//! [`crate::cli`], this looks at the host: the cgroup2 mount, the host name, local
//! addresses and `/etc/resolv.conf` (for DNS defaults).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use ipnetwork::IpNetwork;
use tracing::warn;

use crate::cli::{
    DetectLocalMode, Mode, RunArgs, parse_bind, parse_nodeport_addresses, parse_upstreams,
};
use crate::dataplane::ebpf::EbpfConfig;
use crate::dataplane::ebpf::loader::{MapSizes, cgroup2_root};
use crate::dns::DnsConfig;
use crate::kube_proxy_config::KubeProxyConfiguration;
use crate::model::{ClusterDomain, LocalDetection, NodePortAddresses, ServiceName};
use crate::node_settings::{ConntrackSettings, NodeSettings};
use crate::source::kube::{ClusterAccess, Credentials};

/// The data plane to run, with its settings.
#[derive(Debug)]
pub enum DataPlaneConfig {
    Ebpf(EbpfConfig),
    Nftables,
    Iptables,
}

impl DataPlaneConfig {
    /// The mode's name, as `/proxyMode` answers it.
    pub fn mode_name(&self) -> &'static str {
        match self {
            Self::Ebpf(_) => "ebpf",
            Self::Nftables => "nftables",
            Self::Iptables => "iptables",
        }
    }
}

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests.
    Manifests(PathBuf),
    /// A Kubernetes API server.
    Cluster(ClusterAccess),
}

/// Validated settings of `ferry run`.
#[derive(Debug)]
pub struct RunConfig {
    /// How the data plane was chosen (`ferry status` shows it).
    pub mode_reason: String,
    pub source: SourceConfig,
    pub data_plane: DataPlaneConfig,
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNetwork>,
    /// `--service-cluster-ip-range`: ClusterIPs outside are invalid.
    pub service_cluster_ip_ranges: Vec<IpNetwork>,
    /// How pod traffic is recognised.
    pub local_detection: LocalDetection,
    pub nodeport_addresses: NodePortAddresses,
    pub healthz: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// Cluster DNS, when `--dns-listen` is given.
    pub dns: Option<DnsConfig>,
    pub sync_period: Duration,
    pub min_sync_period: Duration,
    pub full_sync_period: Duration,
    /// Masquerade all ClusterIP traffic (iptables mode).
    pub masquerade_all: bool,
    /// Exit when the health or metrics address cannot be bound.
    pub bind_address_hard_fail: bool,
    /// Applied at start.
    pub node_settings: NodeSettings,
}

impl RunConfig {
    /// Checks the flags (filled in from `--config` where not given) and resolves
    /// them on this host; errors say what to change.
    pub fn resolve(mut args: RunArgs) -> anyhow::Result<Self> {
        if let Some(path) = args.config.clone() {
            let file = KubeProxyConfiguration::load(&path)?;
            for warning in file.apply(&mut args)? {
                warn!(config = %path.display(), "{warning}");
            }
        }
        let mode_reason = if args.mode == Mode::Auto {
            let (mode, why) = crate::probe::auto(args.cgroup.as_deref());
            args.mode = mode;
            format!("--mode auto: {why}")
        } else {
            format!("--mode {:?}", args.mode).to_lowercase()
        };
        if args.masquerade_all && args.mode == Mode::Ebpf {
            warn!(
                "--masquerade-all has no effect in eBPF mode: connections are balanced at the socket and nothing is NATed"
            );
        }
        let domain = ClusterDomain::new(&args.cluster_domain)
            .map_err(|e| anyhow!("--cluster-domain: {e}"))?;
        Ok(RunConfig {
            mode_reason,
            source: source(&args)?,
            dns: match args.dns_listen.is_empty() {
                false => Some(dns(&args, domain)?),
                true => None,
            },
            node_name: node_name(args.node_name.clone())?,
            nodeport_addresses: parse_nodeport_addresses(&args.nodeport_addresses, args.mode)?,
            healthz: parse_bind("--healthz-bind-address", &args.healthz_bind_address)?,
            metrics: parse_bind("--metrics-bind-address", &args.metrics_bind_address)?,
            sync_period: args.sync_period,
            min_sync_period: args.min_sync_period,
            full_sync_period: args.full_sync_period,
            masquerade_all: args.masquerade_all,
            bind_address_hard_fail: args.bind_address_hard_fail,
            node_settings: node_settings(&args),
            cluster_cidrs: args.cluster_cidr.clone(),
            service_cluster_ip_ranges: args.service_cluster_ip_range.clone(),
            local_detection: local_detection(&args)?,
            data_plane: data_plane(args)?,
        })
    }
}

fn source(args: &RunArgs) -> anyhow::Result<SourceConfig> {
    let master = match args.master.as_deref().filter(|m| !m.trim().is_empty()) {
        Some(url) => Some(
            url.trim()
                .parse::<axum::http::Uri>()
                .ok()
                .filter(|u| u.scheme().is_some() && u.host().is_some())
                .ok_or_else(|| {
                    anyhow!("--master: {url:?} is not a URL such as https://10.0.0.1:6443")
                })?,
        ),
        None => None,
    };
    if let Some(dir) = &args.manifests {
        if args.kubeconfig.is_some() || master.is_some() {
            bail!("--manifests and --kubeconfig/--master exclude each other: pick one source");
        }
        return Ok(SourceConfig::Manifests(dir.clone()));
    }
    let credentials = match &args.kubeconfig {
        Some(path) => Credentials::Kubeconfig(path.clone()),
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Credentials::InCluster,
        None if master.is_some() => Credentials::Anonymous,
        None => bail!(
            "no source: pass --manifests DIR, --kubeconfig PATH or --master URL (or run in a cluster, where the service account is used)"
        ),
    };
    Ok(SourceConfig::Cluster(ClusterAccess {
        credentials,
        master,
    }))
}

fn data_plane(args: RunArgs) -> anyhow::Result<DataPlaneConfig> {
    Ok(match args.mode {
        Mode::Iptables | Mode::Nftables | Mode::Auto => {
            // kube-proxy ignores other modes' settings, so one ConfigMap serves every
            // mode.
            if let Some(cgroup) = &args.cgroup {
                warn!(cgroup = %cgroup.display(), "--cgroup only applies to --mode ebpf; ignored");
            }
            match args.mode {
                Mode::Nftables => DataPlaneConfig::Nftables,
                // `auto` was resolved by now; iptables is the mode every host runs.
                _ => DataPlaneConfig::Iptables,
            }
        }
        Mode::Ebpf => DataPlaneConfig::Ebpf(EbpfConfig {
            cgroup: match args.cgroup {
                Some(c) => c,
                None => cgroup2_root().ok_or_else(|| {
                    anyhow!("no cgroup v2 mount found; pass --cgroup or use --mode iptables")
                })?,
            },
            pin_dir: args.bpf.bpf_pin_path,
            sizes: MapSizes {
                frontends: args.bpf_max_frontends,
                backends: args.bpf_max_backends,
                affinity: args.bpf_max_affinity,
                sockets: args.bpf_max_sockets,
            },
        }),
    })
}

/// DNS settings: the forwarder serves the pods, `--dns-forward-allow`, loopback and
/// the node's own addresses; upstreams default to resolv.conf, never this server.
fn dns(args: &RunArgs, domain: ClusterDomain) -> anyhow::Result<DnsConfig> {
    let listen = args.dns_listen.clone();
    let local: Vec<IpAddr> = crate::host::local_addresses()
        .into_iter()
        .map(|a| a.ip)
        .collect();
    let mut forward_allowed = args.cluster_cidr.clone();
    forward_allowed.extend(args.dns_forward_allow.iter().copied());
    forward_allowed.extend(
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|c| c.parse::<IpNetwork>().ok()),
    );
    forward_allowed.extend(local.iter().map(|ip| IpNetwork::from(*ip)));
    let configured = parse_upstreams(&args.dns_upstream)?;
    let stub_domains = args
        .dns_stub_domain
        .iter()
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            crate::dns::stub_domains::parse_flag(v).map_err(|e| anyhow!("--dns-stub-domain: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let forward = crate::dns::forward::ForwardConfig {
        upstreams: crate::dns::upstreams(&configured, &listen, &local),
        stub_domains,
        cache_size: args.dns_cache_size.max(1),
        min_ttl: args.dns_cache_min_ttl,
        max_ttl: args.dns_cache_max_ttl,
        failure_ttl: args.dns_failure_ttl,
        serve_stale: Duration::from_secs(args.dns_serve_stale),
        max_concurrent: args.dns_max_concurrent.max(1),
        ..crate::dns::forward::ForwardConfig::default()
    };
    let pod_records = match args.dns_pods.as_str() {
        "insecure" => true,
        "disabled" => false,
        other => bail!("--dns-pods: {other:?} is neither insecure nor disabled"),
    };
    let ready = match args.dns_ready_bind_address.trim() {
        "" => None,
        addr => Some(
            addr.parse()
                .map_err(|_| anyhow!("--dns-ready-bind-address: {addr:?} is not ADDR:PORT"))?,
        ),
    };
    Ok(DnsConfig {
        forward,
        pod_records,
        query_log: args.dns_log,
        rate_limit: args.dns_rate_limit,
        ready,
        kube_dns_config: (!args.dns_kube_dns_config.is_empty())
            .then(|| PathBuf::from(&args.dns_kube_dns_config)),
        listen,
        service: dns_service(&args.dns_service)?,
        handover: (!args.dns_handover_socket.is_empty())
            .then(|| std::path::PathBuf::from(&args.dns_handover_socket)),
        domain,
        ttl: args.dns_ttl,
        forward_allowed,
        forward_allowed_outside: args.dns_forward_allow.clone(),
        uplinks: crate::host::default_route_interfaces()
            .iter()
            .filter_map(|name| nix::net::if_::if_nametoindex(name.as_str()).ok())
            .collect(),
    })
}

/// `--dns-service`: `NAMESPACE/NAME`, or empty for none.
fn dns_service(value: &str) -> anyhow::Result<Option<ServiceName>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Some(ServiceName::new(ns, name)))
        }
        _ => Err(anyhow!("--dns-service: {value:?} is not NAMESPACE/NAME")),
    }
}

/// `--detect-local-mode` with the flag its mode needs.
fn local_detection(args: &RunArgs) -> anyhow::Result<LocalDetection> {
    let named = |value: &Option<String>, flag: &str, mode: &str| {
        value
            .clone()
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| anyhow!("--detect-local-mode {mode} needs {flag}"))
    };
    Ok(match args.detect_local_mode {
        DetectLocalMode::ClusterCidr => LocalDetection::ClusterCidr(args.cluster_cidr.clone()),
        DetectLocalMode::NodeCidr => LocalDetection::NodeCidr,
        DetectLocalMode::BridgeInterface => LocalDetection::BridgeInterface(named(
            &args.pod_bridge_interface,
            "--pod-bridge-interface",
            "BridgeInterface",
        )?),
        DetectLocalMode::InterfaceNamePrefix => LocalDetection::InterfaceNamePrefix(named(
            &args.pod_interface_name_prefix,
            "--pod-interface-name-prefix",
            "InterfaceNamePrefix",
        )?),
    })
}

fn node_settings(args: &RunArgs) -> NodeSettings {
    let s = &args.node_settings;
    NodeSettings {
        oom_score_adj: s.oom_score_adj.clamp(-1000, 1000),
        unlimited_memlock: args.mode == Mode::Ebpf,
        conntrack: ConntrackSettings {
            max_per_core: s.conntrack_max_per_core,
            min: s.conntrack_min,
            tcp_established_timeout: s.conntrack_tcp_timeout_established,
            tcp_close_wait_timeout: s.conntrack_tcp_timeout_close_wait,
            tcp_be_liberal: s.conntrack_tcp_be_liberal,
            udp_timeout: s.conntrack_udp_timeout,
            udp_stream_timeout: s.conntrack_udp_timeout_stream,
        },
    }
}

fn node_name(flag: Option<String>) -> anyhow::Result<String> {
    match flag {
        Some(n) if n.trim().is_empty() => bail!("--node-name (--hostname-override) is empty"),
        Some(n) => Ok(n.trim().to_lowercase()),
        None => Ok(nix::unistd::gethostname()
            .map_err(|e| anyhow!("cannot read the host name for --node-name: {e}"))?
            .to_string_lossy()
            .to_lowercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let mut full = vec!["ferry", "run"];
        full.extend_from_slice(args);
        let cli = crate::cli::parse_from(full).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(run) => RunConfig::resolve(*run).map_err(|e| e.to_string()),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn iptables_mode_with_all_flags() {
        let c = parse(&[
            "--manifests",
            "/tmp/m",
            "--mode",
            "iptables",
            "--node-name",
            "n1",
            "--cluster-cidr",
            "10.244.0.0/16,fd00::/64",
            "--nodeport-addresses",
            "172.18.0.0/16",
            "--healthz-bind-address",
            "",
            "--sync-period",
            "5s",
        ])
        .unwrap();
        assert_eq!(c.node_name, "n1");
        assert_eq!(c.cluster_cidrs.len(), 2);
        assert!(matches!(c.nodeport_addresses, NodePortAddresses::Cidrs(ref v) if v.len() == 1));
        assert_eq!(c.healthz, None);
        assert_eq!(c.metrics, Some("127.0.0.1:10249".parse().unwrap()));
        assert_eq!(c.sync_period, Duration::from_secs(5));
    }

    #[test]
    fn ebpf_mode_defaults() {
        let c = parse(&[
            "--manifests",
            "/m",
            "--cgroup",
            "/sys/fs/cgroup/x",
            "--bpf-max-backends",
            "10",
        ])
        .unwrap();
        match c.data_plane {
            DataPlaneConfig::Ebpf(e) => {
                assert_eq!(e.pin_dir, PathBuf::from("/sys/fs/bpf/ferry"));
                assert_eq!(e.sizes.backends, 10);
            }
            other => panic!("{other:?}"),
        }
        // Another mode's setting is ignored (with a warning), as kube-proxy does.
        let c = parse(&["--manifests", "/m", "--mode", "iptables", "--cgroup", "/x"]).unwrap();
        assert!(matches!(c.data_plane, DataPlaneConfig::Iptables));
    }

    #[test]
    fn dns_flags() {
        let c = parse(&[
            "--manifests",
            "/m",
            "--mode",
            "iptables",
            "--dns-listen",
            "127.0.0.1:5353",
            "--dns-upstream",
            "10.0.0.53,10.0.0.54:5300",
            "--cluster-domain",
            "Corp.Local.",
            "--cluster-cidr",
            "10.244.0.0/16",
        ])
        .unwrap();
        let dns = c.dns.unwrap();
        assert_eq!(dns.domain.as_str(), "corp.local");
        let with_upstream = |value: &str| {
            let args = ["--manifests", "/m", "--mode", "iptables"];
            let mut args = args.to_vec();
            args.extend(["--dns-listen", "127.0.0.1:5353", "--dns-upstream", value]);
            parse(&args)
        };
        assert!(with_upstream("nope").is_err());
        // An empty value (a ConfigMap's "use the default") is the default.
        assert!(with_upstream("").is_ok());
        assert!(
            crate::cli::parse_upstreams(&[String::new()])
                .unwrap()
                .is_empty()
        );
        assert_eq!(dns.forward.upstreams.len(), 2);
        assert!(
            dns.forward_allowed
                .iter()
                .any(|n| n.contains("10.244.1.1".parse().unwrap()))
        );
        assert!(
            !dns.forward_allowed
                .iter()
                .any(|n| n.contains("192.0.2.1".parse().unwrap()))
        );
        assert!(
            parse(&[
                "--manifests",
                "/m",
                "--mode",
                "iptables",
                "--cluster-domain",
                "bad domain"
            ])
            .is_err()
        );
    }

    #[test]
    fn sources() {
        let c = parse(&["--kubeconfig", "/k", "--mode", "iptables"]).unwrap();
        assert!(matches!(
            c.source,
            SourceConfig::Cluster(ClusterAccess {
                credentials: Credentials::Kubeconfig(_),
                master: None,
            })
        ));
        let err = parse(&["--kubeconfig", "/k", "--manifests", "/m"]).unwrap_err();
        assert!(err.contains("exclude"), "{err}");
        let c = parse(&["--kubeconfig", "/k", "--master", "https://10.0.0.1:6443"]).unwrap();
        assert!(matches!(
            c.source,
            SourceConfig::Cluster(ClusterAccess { master: Some(ref m), .. }) if m.port_u16() == Some(6443)
        ));
        let c = parse(&["--master", "http://127.0.0.1:8080", "--mode", "iptables"]).unwrap();
        assert!(matches!(
            c.source,
            SourceConfig::Cluster(ClusterAccess {
                credentials: Credentials::Anonymous | Credentials::InCluster,
                ..
            })
        ));
        assert!(parse(&["--master", "not a url", "--mode", "iptables"]).is_err());
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            let err = parse(&["--mode", "iptables"]).unwrap_err();
            assert!(err.contains("no source"), "{err}");
        }
    }

    #[test]
    fn nodeport_addresses_default_per_mode_as_kube_proxy() {
        let of = |mode: &str| {
            parse(&["--manifests", "/m", "--mode", mode, "--cgroup", "/x"])
                .map(|c| c.nodeport_addresses)
        };
        assert_eq!(of("iptables").unwrap(), NodePortAddresses::All);
        assert_eq!(of("ebpf").unwrap(), NodePortAddresses::Primary);
        let primary = parse(&[
            "--manifests",
            "/m",
            "--mode",
            "iptables",
            "--nodeport-addresses",
            "primary",
        ])
        .unwrap();
        assert_eq!(primary.nodeport_addresses, NodePortAddresses::Primary);
    }

    #[test]
    fn detect_local_modes() {
        let base = [
            "--manifests",
            "/m",
            "--mode",
            "iptables",
            "--cluster-cidr",
            "10.244.0.0/16",
        ];
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args).map(|c| c.local_detection)
        };
        assert_eq!(
            with(&[]).unwrap(),
            LocalDetection::ClusterCidr(vec!["10.244.0.0/16".parse().unwrap()])
        );
        assert_eq!(
            with(&["--detect-local-mode", "NodeCIDR"]).unwrap(),
            LocalDetection::NodeCidr
        );
        assert_eq!(
            with(&[
                "--detect-local-mode",
                "InterfaceNamePrefix",
                "--pod-interface-name-prefix",
                "veth"
            ])
            .unwrap(),
            LocalDetection::InterfaceNamePrefix("veth".into())
        );
        let err = with(&["--detect-local-mode", "BridgeInterface"]).unwrap_err();
        assert!(err.contains("--pod-bridge-interface"), "{err}");
        assert!(
            with(&["--detect-local-mode", "clustercidr"]).is_err(),
            "kube-proxy's spelling"
        );
    }

    #[test]
    fn bad_values_are_rejected() {
        let bad = [
            ["--cluster-cidr", "nope"],
            ["--nodeport-addresses", "x"],
            ["--sync-period", "soon"],
            ["--metrics-bind-address", "x"],
            ["--cluster-domain", "bad domain"],
        ];
        for [flag, value] in bad {
            let args = ["--manifests", "/m", "--mode", "iptables", flag, value];
            assert!(parse(&args).is_err(), "{flag} {value} must be refused");
        }
    }
}
