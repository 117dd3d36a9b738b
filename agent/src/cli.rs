//! Command line. Parsing only checks and converts what the user typed; nothing here
//! touches the system (that is `run`'s job).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

use crate::dataplane::ebpf::EbpfConfig;
use crate::dataplane::ebpf::loader::{MapSizes, cgroup2_root};
use crate::dns::DnsConfig;
use crate::node::NodePortAddresses;
use crate::source::kube::ClusterAccess;

/// Ferry: kube-proxy and cluster DNS for Kubernetes nodes, in one agent.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// More logging (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch services and program this node (the network namespace ferry runs in).
    Run(Box<RunArgs>),
    /// Remove everything ferry programmed on this node.
    Cleanup(BpfArgs),
    /// Show what is programmed, read back from the kernel.
    Inspect {
        #[command(subcommand)]
        what: InspectWhat,
    },
    /// Print the version.
    Version,
}

/// What `ferry inspect` shows.
#[derive(Debug, Subcommand)]
pub enum InspectWhat {
    /// Service frontends and their backends in the eBPF maps.
    Services {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        bpf: BpfArgs,
    },
}

/// Where the eBPF state lives.
#[derive(Debug, Args)]
pub struct BpfArgs {
    /// bpffs directory holding Ferry's pinned maps and links.
    #[arg(
        long,
        default_value = "/sys/fs/bpf/ferry",
        value_name = "DIR",
        env = "FERRY_BPF_PIN_PATH"
    )]
    pub bpf_pin_path: PathBuf,
}

/// Which data plane programs the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Socket-level load balancing with eBPF (default).
    Ebpf,
    /// kube-proxy's iptables rule layout, for hosts without eBPF.
    Iptables,
}

/// Flags of `ferry run`. Names follow kube-proxy's where one exists.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Directory of Kubernetes manifests (Services, EndpointSlices, Nodes) to serve
    /// instead of a cluster; watched for changes.
    #[arg(long, value_name = "DIR", env = "FERRY_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Kubeconfig for watching a real cluster.
    #[arg(long, value_name = "PATH", env = "FERRY_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Data plane.
    #[arg(long, value_enum, default_value = "ebpf", env = "FERRY_MODE")]
    pub mode: Mode,
    /// This node's name (endpoint locality, Node object). Default: the host name.
    #[arg(long, env = "FERRY_NODE_NAME")]
    pub node_name: Option<String>,
    /// Pod CIDRs, comma-separated; traffic to ClusterIPs from outside them is
    /// masqueraded.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CIDR",
        env = "FERRY_CLUSTER_CIDR"
    )]
    pub cluster_cidr: Vec<IpNetwork>,
    /// Where NodePorts answer: `primary` (default: the node's primary addresses) or
    /// CIDRs, comma-separated (127.0.0.0/8 only when listed).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CIDR",
        env = "FERRY_NODEPORT_ADDRESSES"
    )]
    pub nodeport_addresses: Vec<String>,
    /// cgroup v2 the eBPF socket hooks attach to. Default: the cgroup2 mount root.
    #[arg(long, value_name = "PATH", env = "FERRY_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Address to serve cluster DNS on, e.g. 169.254.20.10:53. Default: off.
    #[arg(long, value_name = "ADDR:PORT", env = "FERRY_DNS_LISTEN")]
    pub dns_listen: Option<SocketAddr>,
    /// Cluster DNS domain.
    #[arg(long, default_value = "cluster.local", env = "FERRY_CLUSTER_DOMAIN")]
    pub cluster_domain: String,
    /// Upstream resolvers for names outside the cluster, IP[:PORT] comma-separated.
    /// Default: the nameservers of /etc/resolv.conf (never this server itself).
    #[arg(long, value_delimiter = ',', value_name = "IP[:PORT]", value_parser = crate::dns::parse_upstream, env = "FERRY_DNS_UPSTREAM")]
    pub dns_upstream: Vec<SocketAddr>,
    /// TTL of cluster records, in seconds (CoreDNS's default is 5).
    #[arg(long, default_value_t = 5, env = "FERRY_DNS_TTL")]
    pub dns_ttl: u32,
    /// Answers kept by the forwarding cache.
    #[arg(long, default_value_t = 10_000, env = "FERRY_DNS_CACHE_SIZE")]
    pub dns_cache_size: usize,
    /// Extra client CIDRs allowed to use the forwarder (pods of --cluster-cidr, the
    /// node itself and loopback always are): keeps the node from being an open
    /// resolver.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CIDR",
        env = "FERRY_DNS_FORWARD_ALLOW"
    )]
    pub dns_forward_allow: Vec<IpNetwork>,
    /// Health endpoint (/healthz, /livez). Empty to disable.
    #[arg(
        long,
        default_value = "0.0.0.0:10256",
        value_name = "ADDR:PORT",
        env = "FERRY_HEALTHZ_BIND_ADDRESS"
    )]
    pub healthz_bind_address: String,
    /// Metrics endpoint (/metrics). Empty to disable.
    #[arg(
        long,
        default_value = "127.0.0.1:10249",
        value_name = "ADDR:PORT",
        env = "FERRY_METRICS_BIND_ADDRESS"
    )]
    pub metrics_bind_address: String,
    /// How often to check that programmed state is intact (e.g. 30s, 1m).
    #[arg(long, default_value = "30s", value_parser = parse_duration, env = "FERRY_SYNC_PERIOD")]
    pub sync_period: Duration,
    /// Full resync at least this often.
    #[arg(long, default_value = "1h", value_parser = parse_duration, env = "FERRY_FULL_SYNC_PERIOD")]
    pub full_sync_period: Duration,
    #[command(flatten)]
    pub bpf: BpfArgs,
    /// eBPF map size: service frontends (and ClusterIPs).
    #[arg(long, default_value_t = MapSizes::default().frontends, env = "FERRY_BPF_MAX_FRONTENDS")]
    pub bpf_max_frontends: u32,
    /// eBPF map size: distinct backends.
    #[arg(long, default_value_t = MapSizes::default().backends, env = "FERRY_BPF_MAX_BACKENDS")]
    pub bpf_max_backends: u32,
    /// eBPF map size: ClientIP affinity entries.
    #[arg(long, default_value_t = MapSizes::default().affinity, env = "FERRY_BPF_MAX_AFFINITY")]
    pub bpf_max_affinity: u32,
    /// eBPF map size: sockets whose service address is remembered for
    /// recvmsg/getpeername.
    #[arg(long, default_value_t = MapSizes::default().sockets, env = "FERRY_BPF_MAX_SOCKETS")]
    pub bpf_max_sockets: u32,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("duration {s:?} must be positive"))
}

/// The data plane to run, with its settings.
#[derive(Debug)]
pub enum DataPlaneConfig {
    Ebpf(EbpfConfig),
    Iptables,
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
    pub source: SourceConfig,
    pub data_plane: DataPlaneConfig,
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub nodeport_addresses: NodePortAddresses,
    pub healthz: Option<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    /// Cluster DNS, when `--dns-listen` is given.
    pub dns: Option<DnsConfig>,
    pub sync_period: Duration,
    pub full_sync_period: Duration,
}

impl RunArgs {
    /// Checks the flags and turns them into settings; errors say what to change.
    pub fn into_config(self) -> anyhow::Result<RunConfig> {
        use anyhow::{anyhow, bail};
        let source = match (self.manifests, self.kubeconfig) {
            (Some(_), Some(_)) => {
                bail!("--manifests and --kubeconfig exclude each other: pick one source")
            }
            (Some(dir), None) => SourceConfig::Manifests(dir),
            (None, Some(path)) => SourceConfig::Cluster(ClusterAccess::Kubeconfig(path)),
            (None, None) if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                SourceConfig::Cluster(ClusterAccess::InCluster)
            }
            (None, None) => bail!(
                "no source: pass --manifests DIR or --kubeconfig PATH (or run in a cluster, where the service account is used)"
            ),
        };
        let data_plane = match self.mode {
            Mode::Iptables => {
                if self.cgroup.is_some() {
                    bail!("--cgroup only applies to --mode ebpf");
                }
                DataPlaneConfig::Iptables
            }
            Mode::Ebpf => DataPlaneConfig::Ebpf(EbpfConfig {
                cgroup: match self.cgroup {
                    Some(c) => c,
                    None => cgroup2_root().ok_or_else(|| {
                        anyhow!("no cgroup v2 mount found; pass --cgroup or use --mode iptables")
                    })?,
                },
                pin_dir: self.bpf.bpf_pin_path,
                sizes: MapSizes {
                    frontends: self.bpf_max_frontends,
                    backends: self.bpf_max_backends,
                    affinity: self.bpf_max_affinity,
                    sockets: self.bpf_max_sockets,
                },
            }),
        };
        crate::model::validate::dns1123_subdomain(
            &self
                .cluster_domain
                .trim_end_matches('.')
                .to_ascii_lowercase(),
        )
        .map_err(|e| anyhow!("--cluster-domain: {e}"))?;
        let dns = self.dns_listen.map(|listen| {
            let local: Vec<std::net::IpAddr> = crate::node::local_addresses()
                .into_iter()
                .map(|a| a.ip)
                .collect();
            let mut forward_allowed = self.cluster_cidr.clone();
            forward_allowed.extend(self.dns_forward_allow.iter().copied());
            forward_allowed.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|c| c.parse::<IpNetwork>().ok()),
            );
            forward_allowed.extend(local.iter().map(|ip| IpNetwork::from(*ip)));
            DnsConfig {
                listen,
                domain: self
                    .cluster_domain
                    .trim_end_matches('.')
                    .to_ascii_lowercase(),
                ttl: self.dns_ttl,
                upstreams: crate::dns::upstreams(&self.dns_upstream, listen, &local),
                forward_allowed,
                cache_size: self.dns_cache_size.max(1),
            }
        });
        let node_name = match self.node_name {
            Some(n) => n,
            None => nix::unistd::gethostname()
                .map_err(|e| anyhow!("cannot read the host name for --node-name: {e}"))?
                .to_string_lossy()
                .to_lowercase(),
        };
        let nodeport_addresses = parse_nodeport_addresses(&self.nodeport_addresses)?;
        Ok(RunConfig {
            source,
            data_plane,
            node_name,
            cluster_cidrs: self.cluster_cidr,
            nodeport_addresses,
            dns,
            healthz: parse_bind("--healthz-bind-address", &self.healthz_bind_address)?,
            metrics: parse_bind("--metrics-bind-address", &self.metrics_bind_address)?,
            sync_period: self.sync_period,
            full_sync_period: self.full_sync_period,
        })
    }
}

fn parse_nodeport_addresses(values: &[String]) -> anyhow::Result<NodePortAddresses> {
    if values.is_empty() || values.iter().all(|v| v == "primary") {
        return Ok(NodePortAddresses::Primary);
    }
    let cidrs = values
        .iter()
        .map(|v| {
            v.parse::<IpNetwork>().map_err(|_| {
                anyhow::anyhow!("--nodeport-addresses: {v:?} is not a CIDR or \"primary\"")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(NodePortAddresses::Cidrs(cidrs))
}

fn parse_bind(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("{flag}: {value:?} is not ADDR:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        let mut full = vec!["ferry", "run"];
        full.extend_from_slice(args);
        let cli = Cli::try_parse_from(full).map_err(|e| e.to_string())?;
        match cli.command {
            Command::Run(run) => run.into_config().map_err(|e| e.to_string()),
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
        assert!(parse(&["--manifests", "/m", "--mode", "iptables", "--cgroup", "/x"]).is_err());
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
        assert_eq!(dns.domain, "corp.local");
        assert_eq!(dns.upstreams.len(), 2);
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
            SourceConfig::Cluster(ClusterAccess::Kubeconfig(_))
        ));
        let err = parse(&["--kubeconfig", "/k", "--manifests", "/m"]).unwrap_err();
        assert!(err.contains("exclude"), "{err}");
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            let err = parse(&["--mode", "iptables"]).unwrap_err();
            assert!(err.contains("no source"), "{err}");
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(
            parse(&[
                "--manifests",
                "/m",
                "--mode",
                "iptables",
                "--cluster-cidr",
                "nope"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "--manifests",
                "/m",
                "--mode",
                "iptables",
                "--nodeport-addresses",
                "x"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "--manifests",
                "/m",
                "--mode",
                "iptables",
                "--sync-period",
                "soon"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "--manifests",
                "/m",
                "--mode",
                "iptables",
                "--metrics-bind-address",
                "x"
            ])
            .is_err()
        );
    }
}
