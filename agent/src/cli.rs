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
    /// kube-proxy's log level flag (`--v=2`): 0-2 info, 3-4 debug, 5+ trace.
    #[arg(long = "v", value_name = "LEVEL", global = true, hide = true)]
    pub klog_level: Option<u8>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch services and program this node (the network namespace ferry runs in).
    Run(Box<RunArgs>),
    /// Remove everything ferry programmed on this node.
    Cleanup(CleanupArgs),
    /// Show what is programmed, read back from the kernel.
    Inspect {
        #[command(subcommand)]
        what: InspectWhat,
    },
    /// What the running agent is doing: mode and why, source, syncs, what is
    /// programmed, DNS, warnings (asked from its metrics address).
    Status {
        /// Print the agent's JSON as it is.
        #[arg(long)]
        json: bool,
        /// The agent's --metrics-bind-address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        address: std::net::SocketAddr,
    },
    /// Why this node does what it does with one service: every endpoint and
    /// whether it is used (and why not), the REJECT/DROP decisions, what is
    /// programmed (asked from the running agent's metrics address).
    Explain {
        /// NAMESPACE/NAME (a bare NAME is in `default`).
        service: String,
        /// Only the port with this name or number.
        #[arg(long)]
        port: Option<String>,
        /// Print the agent's JSON as it is.
        #[arg(long)]
        json: bool,
        /// The agent's --metrics-bind-address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        address: std::net::SocketAddr,
    },
    /// A live stream of the connections the eBPF socket programs forward or refuse
    /// (rate-limited in the kernel; ends with Ctrl-C, or after --count events).
    Monitor {
        /// Events each CPU may report per second; the rest are counted and said.
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// The agent's --metrics-bind-address, asked for service names.
        #[arg(long, default_value = "127.0.0.1:10249")]
        address: std::net::SocketAddr,
        #[command(flatten)]
        bpf: BpfArgs,
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
        /// The agent's --metrics-bind-address, asked for service names (eBPF mode).
        #[arg(long, default_value = "127.0.0.1:10249")]
        address: std::net::SocketAddr,
        #[command(flatten)]
        bpf: BpfArgs,
    },
    /// What the node's DNS server answers for a name, and whether it comes from the
    /// cluster zone or the forwarding cache (asked from the running agent; never
    /// forwarded upstream).
    Dns {
        /// A fully qualified name, e.g. `web.default.svc.cluster.local`.
        name: String,
        /// The record type.
        #[arg(long = "type", default_value = "A")]
        record_type: String,
        /// Print the agent's JSON as it is.
        #[arg(long)]
        json: bool,
        /// The agent's --metrics-bind-address.
        #[arg(long, default_value = "127.0.0.1:10249")]
        address: std::net::SocketAddr,
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

/// Flags of `ferry cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Also remove what kube-proxy leaves behind in any mode: its rules in both
    /// iptables backends (legacy and nft), its nftables tables, and IPVS state
    /// (`kube-ipvs0`, its ipsets, virtual servers).
    #[arg(long)]
    pub kube_proxy: bool,
    #[command(flatten)]
    pub bpf: BpfArgs,
}

/// Which data plane programs the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The best this kernel runs: eBPF, else nftables, else iptables (default).
    Auto,
    /// Socket-level load balancing with eBPF (kernel 5.18+).
    Ebpf,
    /// Verdict maps in one nftables table per family, for hosts without eBPF.
    Nftables,
    /// kube-proxy's iptables rule layout, for hosts without eBPF or nftables.
    Iptables,
}

/// kube-proxy's `--detect-local-mode` values, spelled as kube-proxy spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DetectLocalMode {
    #[value(name = "ClusterCIDR")]
    ClusterCidr,
    #[value(name = "NodeCIDR")]
    NodeCidr,
    #[value(name = "BridgeInterface")]
    BridgeInterface,
    #[value(name = "InterfaceNamePrefix")]
    InterfaceNamePrefix,
}

/// Flags of `ferry run`. Names follow kube-proxy's where one exists.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// A kube-proxy configuration file (`KubeProxyConfiguration`,
    /// kubeproxy.config.k8s.io/v1alpha1), e.g. kubeadm's `kube-proxy` ConfigMap: its
    /// values apply where no flag or environment variable sets them.
    #[arg(long, value_name = "FILE", env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Remove what was programmed and exit (kube-proxy's `--cleanup`; `ferry cleanup
    /// --kube-proxy` with this flag's pin path).
    #[arg(long)]
    pub cleanup: bool,
    /// Apply the node settings (conntrack sysctls) and exit, as kube-proxy's
    /// `--init-only` does for a privileged init container.
    #[arg(long)]
    pub init_only: bool,
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
    /// Data plane (kube-proxy's `--proxy-mode`).
    #[arg(
        long,
        visible_alias = "proxy-mode",
        value_enum,
        default_value = "auto",
        env = "FERRY_MODE"
    )]
    pub mode: Mode,
    /// This node's name (endpoint locality, Node object; kube-proxy's
    /// `--hostname-override`). Default: the host name.
    #[arg(long, visible_alias = "hostname-override", env = "FERRY_NODE_NAME")]
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
    /// The ranges ClusterIPs are allocated from (the API server's
    /// `--service-cluster-ip-range`): a Service whose ClusterIP lies outside is
    /// skipped as invalid, as the API server would refuse it (for manifests no API
    /// server checked). Also serves as a ServiceCIDR for nftables mode.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "CIDR",
        env = "FERRY_SERVICE_CLUSTER_IP_RANGE"
    )]
    pub service_cluster_ip_range: Vec<IpNetwork>,
    /// How pod traffic is recognised (kube-proxy's `--detect-local-mode`): ClusterCIDR
    /// (--cluster-cidr), NodeCIDR (the Node's spec.podCIDRs), BridgeInterface
    /// (--pod-bridge-interface) or InterfaceNamePrefix (--pod-interface-name-prefix).
    #[arg(
        long,
        value_enum,
        default_value = "ClusterCIDR",
        env = "FERRY_DETECT_LOCAL_MODE"
    )]
    pub detect_local_mode: DetectLocalMode,
    /// The bridge pods are attached to, for `--detect-local-mode BridgeInterface`.
    #[arg(long, value_name = "NAME", env = "FERRY_POD_BRIDGE_INTERFACE")]
    pub pod_bridge_interface: Option<String>,
    /// The name prefix of pods' interfaces on the node, for
    /// `--detect-local-mode InterfaceNamePrefix`.
    #[arg(long, value_name = "PREFIX", env = "FERRY_POD_INTERFACE_NAME_PREFIX")]
    pub pod_interface_name_prefix: Option<String>,
    /// Where NodePorts answer: `primary` (the node's primary addresses) or CIDRs,
    /// comma-separated (127.0.0.0/8 only when listed). Default as kube-proxy's per
    /// mode: every local address (127.0.0.1 too) in iptables mode, `primary` in eBPF
    /// mode.
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
    /// Addresses to serve cluster DNS on, e.g. 169.254.20.10:53 (repeat, or separate
    /// with commas). An address the host lacks is added to the `ferry-dns` interface
    /// (`lo` where the kernel has no dummy driver). Default: off.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ADDR:PORT",
        env = "FERRY_DNS_LISTEN"
    )]
    pub dns_listen: Vec<SocketAddr>,
    /// The cluster DNS Service whose ClusterIP:53 pods on this node get answered by
    /// this node's DNS server while it serves (its endpoints otherwise). Empty: off.
    #[arg(
        long,
        default_value = "kube-system/kube-dns",
        value_name = "NAMESPACE/NAME",
        env = "FERRY_DNS_SERVICE"
    )]
    pub dns_service: String,
    /// Unix socket where a starting agent takes the DNS sockets over from the one it
    /// replaces (no query lost in a rolling update). Empty: off.
    #[arg(
        long,
        default_value = "/run/ferry/dns-handover.sock",
        value_name = "PATH",
        env = "FERRY_DNS_HANDOVER_SOCKET"
    )]
    pub dns_handover_socket: String,
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
    /// Answers per client address and second over UDP (with a burst of as many);
    /// more questions are dropped unanswered. 0: no limit.
    #[arg(long, default_value_t = 0, env = "FERRY_DNS_RATE_LIMIT")]
    pub dns_rate_limit: u32,
    /// One log line per DNS query, as CoreDNS's `log` plugin (client, id, type,
    /// name, protocol, rcode, size, duration).
    #[arg(long, env = "FERRY_DNS_LOG")]
    pub dns_log: bool,
    /// `/ready` for DNS readiness probes, as CoreDNS's `ready` plugin on :8181 (200
    /// once the zone is complete and served). Empty: off.
    #[arg(
        long,
        default_value = "",
        value_name = "ADDR:PORT",
        env = "FERRY_DNS_READY_BIND_ADDRESS"
    )]
    pub dns_ready_bind_address: String,
    /// Pod records `a-b-c-d.NAMESPACE.pod.ZONE`: `insecure` answers the address in
    /// the name (CoreDNS's `pods insecure`, kubeadm's default), `disabled` none.
    #[arg(
        long,
        default_value = "insecure",
        value_name = "insecure|disabled",
        env = "FERRY_DNS_PODS"
    )]
    pub dns_pods: String,
    /// A zone forwarded to its own servers, `ZONE=IP[:PORT],...` (repeat for more),
    /// like the kube-dns ConfigMap's `stubDomains`.
    #[arg(
        long,
        value_name = "ZONE=IP[:PORT],...",
        env = "FERRY_DNS_STUB_DOMAIN",
        value_delimiter = ';'
    )]
    pub dns_stub_domain: Vec<String>,
    /// The kube-dns ConfigMap mounted as a directory: its `stubDomains` and
    /// `upstreamNameservers` are followed as NodeLocal DNSCache does. Missing: none.
    #[arg(
        long,
        default_value = "/etc/kube-dns",
        value_name = "DIR",
        env = "FERRY_DNS_KUBE_DNS_CONFIG"
    )]
    pub dns_kube_dns_config: String,
    /// Longest time a forwarded answer is cached and served with (CoreDNS: 3600).
    #[arg(
        long,
        default_value_t = 3600,
        value_name = "SECONDS",
        env = "FERRY_DNS_CACHE_MAX_TTL"
    )]
    pub dns_cache_max_ttl: u32,
    /// Shortest time a forwarded answer is cached and served with.
    #[arg(
        long,
        default_value_t = 0,
        value_name = "SECONDS",
        env = "FERRY_DNS_CACHE_MIN_TTL"
    )]
    pub dns_cache_min_ttl: u32,
    /// How long an upstream failure (SERVFAIL, REFUSED, no answer) is cached
    /// (CoreDNS's cache: 5).
    #[arg(
        long,
        default_value_t = 5,
        value_name = "SECONDS",
        env = "FERRY_DNS_FAILURE_TTL"
    )]
    pub dns_failure_ttl: u32,
    /// How long past expiry an answer is served (with TTL 30) while every upstream
    /// fails; 0: never.
    #[arg(
        long,
        default_value_t = 3600,
        value_name = "SECONDS",
        env = "FERRY_DNS_SERVE_STALE"
    )]
    pub dns_serve_stale: u64,
    /// Questions forwarded upstream at once, at most; more are REFUSED (CoreDNS's
    /// `max_concurrent`), so no client can exhaust the agent's sockets.
    #[arg(long, default_value_t = 1000, env = "FERRY_DNS_MAX_CONCURRENT")]
    pub dns_max_concurrent: usize,
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
    /// Also fail (exit) when the health or metrics address cannot be bound, instead
    /// of retrying the bind in the background.
    #[arg(long, env = "FERRY_BIND_ADDRESS_HARD_FAIL")]
    pub bind_address_hard_fail: bool,
    /// How often to check that programmed state is intact (e.g. 30s, 1m;
    /// kube-proxy's `--iptables-sync-period`).
    #[arg(long, visible_alias = "iptables-sync-period", default_value = "30s", value_parser = parse_duration, env = "FERRY_SYNC_PERIOD")]
    pub sync_period: Duration,
    /// Least time between two syncs: changes arriving meanwhile are batched
    /// (kube-proxy's `--iptables-min-sync-period`; its default is 1s).
    #[arg(long, visible_alias = "iptables-min-sync-period", default_value = "0s", value_parser = parse_duration, env = "FERRY_MIN_SYNC_PERIOD")]
    pub min_sync_period: Duration,
    /// Masquerade all traffic to ClusterIPs, not only traffic from outside
    /// --cluster-cidr (iptables mode; eBPF balances at the socket and NATs nothing).
    #[arg(long, env = "FERRY_MASQUERADE_ALL")]
    pub masquerade_all: bool,
    #[command(flatten)]
    pub node_settings: NodeSettingsArgs,
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
    /// Flags (argument ids) given on the command line or in the environment, which a
    /// `--config` file does not override. Filled by [`parse_from`].
    #[arg(skip)]
    pub explicit: std::collections::BTreeSet<String>,
}

/// Process and kernel settings applied at start, with kube-proxy's flags and defaults.
#[derive(Debug, Args)]
pub struct NodeSettingsArgs {
    /// The agent's oom_score_adj (-1000..1000): like kube-proxy, the kernel's OOM
    /// killer should pick almost anything before it.
    #[arg(long, default_value_t = -999, allow_negative_numbers = true, env = "FERRY_OOM_SCORE_ADJ")]
    pub oom_score_adj: i32,
    /// nf_conntrack_max per CPU (0: leave the limit and the hash size alone).
    #[arg(long, default_value_t = 32_768, env = "FERRY_CONNTRACK_MAX_PER_CORE")]
    pub conntrack_max_per_core: u32,
    /// nf_conntrack_max at least this, whatever the CPU count.
    #[arg(long, default_value_t = 131_072, env = "FERRY_CONNTRACK_MIN")]
    pub conntrack_min: u32,
    /// Idle timeout of established TCP flows (0: leave as is).
    #[arg(long, default_value = "24h", value_parser = parse_duration, env = "FERRY_CONNTRACK_TCP_TIMEOUT_ESTABLISHED")]
    pub conntrack_tcp_timeout_established: Duration,
    /// Timeout of TCP flows in CLOSE_WAIT (0: leave as is).
    #[arg(long, default_value = "1h", value_parser = parse_duration, env = "FERRY_CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT")]
    pub conntrack_tcp_timeout_close_wait: Duration,
    /// Accept out-of-window TCP packets instead of marking them INVALID.
    #[arg(long, env = "FERRY_CONNTRACK_TCP_BE_LIBERAL")]
    pub conntrack_tcp_be_liberal: bool,
    /// Timeout of UDP flows seen in one direction (0: leave as is).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "FERRY_CONNTRACK_UDP_TIMEOUT")]
    pub conntrack_udp_timeout: Duration,
    /// Timeout of UDP flows seen in both directions (0: leave as is).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "FERRY_CONNTRACK_UDP_TIMEOUT_STREAM")]
    pub conntrack_udp_timeout_stream: Duration,
}

/// Parses the command line, noting which `ferry run` flags were given (on the command
/// line or in the environment) so a `--config` file fills in only the others.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::{CommandFactory as _, FromArgMatches as _, parser::ValueSource};
    let matches = Cli::command().try_get_matches_from(args)?;
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let (Command::Run(run), Some(("run", sub))) = (&mut cli.command, matches.subcommand()) {
        run.explicit = sub
            .ids()
            .filter(|id| {
                sub.value_source(id.as_str())
                    .is_some_and(|s| s != ValueSource::DefaultValue)
            })
            .map(|id| id.as_str().to_owned())
            .collect();
    }
    Ok(cli)
}

/// The command line as kube-proxy's is written: when the binary is invoked as
/// `kube-proxy` (the name kube-proxy's DaemonSets run), `ferry run` is meant.
pub fn kube_proxy_compatible_args(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let invoked_as = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned());
    if invoked_as.as_deref() == Some("kube-proxy") {
        args.insert(1, "run".into());
    }
    args
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
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
/// are skipped; only `primary` means `primary`). Nothing means the mode's default, as
/// kube-proxy documents it per mode: every local address in iptables mode, `primary`
/// in nftables mode (and eBPF mode, which follows it).
pub fn parse_nodeport_addresses(
    values: &[String],
    mode: Mode,
) -> anyhow::Result<NodePortAddresses> {
    let values: Vec<&String> = values.iter().filter(|v| !v.trim().is_empty()).collect();
    if values.is_empty() {
        return Ok(match mode {
            Mode::Iptables => NodePortAddresses::All,
            Mode::Auto | Mode::Ebpf | Mode::Nftables => NodePortAddresses::Primary,
        });
    }
    if values.iter().all(|v| *v == "primary") {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoked_as_kube_proxy_means_run() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let kube_proxy = args(&["/usr/local/bin/kube-proxy", "--config=/c", "--v=2"]);
        assert_eq!(
            kube_proxy_compatible_args(kube_proxy),
            args(&["/usr/local/bin/kube-proxy", "run", "--config=/c", "--v=2"])
        );
        let ferry = args(&["ferry", "cleanup"]);
        assert_eq!(kube_proxy_compatible_args(ferry.clone()), ferry);
        let cli = parse_from(args(&[
            "kube-proxy",
            "run",
            "--v=4",
            "--proxy-mode",
            "iptables",
        ]))
        .unwrap();
        assert_eq!(cli.klog_level, Some(4));
        match cli.command {
            Command::Run(run) => {
                assert_eq!(run.mode, Mode::Iptables);
                assert!(run.explicit.contains("mode") && !run.explicit.contains("node_name"));
            }
            other => panic!("{other:?}"),
        }
    }
}
