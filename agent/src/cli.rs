//! Command line: the flags, and pure parsers of their values. Nothing here touches
//! the system; [`crate::config`] resolves the flags against the host.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnetwork::IpNetwork;

use crate::dataplane::ebpf::loader::MapSizes;
use crate::model::NodePortAddresses;

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
    /// The API server's URL (kube-proxy's `--master`): overrides the kubeconfig's or
    /// the in-cluster address, e.g. so a node reaches the API server before any
    /// ClusterIP is programmed.
    #[arg(long, value_name = "URL", env = "FERRY_MASTER")]
    pub master: Option<String>,
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
    /// Default (also when empty): the nameservers of /etc/resolv.conf (never this
    /// server itself).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "IP[:PORT]",
        env = "FERRY_DNS_UPSTREAM"
    )]
    pub dns_upstream: Vec<String>,
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

/// `--dns-upstream`'s resolvers; empty entries (an empty environment variable, as a
/// ConfigMap writes "use the default") are skipped.
pub fn parse_upstreams(values: &[String]) -> anyhow::Result<Vec<SocketAddr>> {
    values
        .iter()
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            crate::dns::parse_upstream(v.trim()).map_err(|e| anyhow::anyhow!("--dns-upstream: {e}"))
        })
        .collect()
}

/// Which addresses NodePorts answer on, from `--nodeport-addresses` (empty entries
/// are skipped; nothing, or only `primary`, means `primary`).
pub fn parse_nodeport_addresses(values: &[String]) -> anyhow::Result<NodePortAddresses> {
    let values: Vec<&String> = values.iter().filter(|v| !v.trim().is_empty()).collect();
    if values.is_empty() || values.iter().all(|v| *v == "primary") {
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

/// An optional `ADDR:PORT` flag (empty disables what it binds).
pub fn parse_bind(flag: &str, value: &str) -> anyhow::Result<Option<SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| anyhow::anyhow!("{flag}: {value:?} is not ADDR:PORT"))
}
