//! kube-proxy's configuration file (`KubeProxyConfiguration`,
//! `kubeproxy.config.k8s.io/v1alpha1`), so an operator's existing kube-proxy ConfigMap
//! configures Ferry. Its values fill in the `ferry run` flags that were not given on
//! the command line or in the environment; settings Ferry has no use for are named in
//! a warning, never silently dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::cli::{Mode, RunArgs, parse_duration};

/// The `apiVersion` this reader understands.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";

/// Why a configuration file cannot be used.
#[derive(Debug, Error)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML of the expected shape.
    #[error("{path} is not a KubeProxyConfiguration")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    /// A value (or the kind/apiVersion) is not one Ferry can use.
    #[error("{path}: {what}")]
    Value { path: PathBuf, what: String },
}

/// The file's fields Ferry reads, named as kube-proxy's v1alpha1 types name them
/// (`None` when absent or null); the rest land in `unknown` (and are warned about).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct KubeProxyConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub mode: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    pub hostname_override: Option<String>,
    pub node_port_addresses: Option<Vec<String>>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub bind_address_hard_fail: Option<bool>,
    pub oom_score_adj: Option<i32>,
    pub client_connection: Option<ClientConnection>,
    pub iptables: Option<RuleSyncing>,
    pub nftables: Option<RuleSyncing>,
    pub conntrack: Option<Conntrack>,
    pub detect_local_mode: Option<String>,
    pub detect_local: Option<DetectLocal>,
    pub feature_gates: Option<BTreeMap<String, bool>>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `clientConnection`: only the kubeconfig matters (kubeadm's points at the control
/// plane endpoint, which is what a node without a proxy must use).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ClientConnection {
    pub kubeconfig: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `detectLocal`: the interface settings of the interface-based modes.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DetectLocal {
    pub bridge_interface: Option<String>,
    pub interface_name_prefix: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `iptables` / `nftables`: sync periods and masquerading.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RuleSyncing {
    pub sync_period: Option<String>,
    pub min_sync_period: Option<String>,
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<i32>,
    pub localhost_node_ports: Option<bool>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `conntrack`: the kernel's connection tracking limits and timeouts.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Conntrack {
    pub max_per_core: Option<i64>,
    pub min: Option<i64>,
    pub tcp_established_timeout: Option<String>,
    pub tcp_close_wait_timeout: Option<String>,
    pub tcp_be_liberal: Option<bool>,
    pub udp_timeout: Option<String>,
    pub udp_stream_timeout: Option<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// The fields kube-proxy has that change nothing in Ferry (other modes' settings,
/// the informers' tuning, logging): accepted without a warning.
const IGNORED: [&str; 8] = [
    "bindAddress",
    "configSyncPeriod",
    "enableProfiling",
    "ipvs",
    "winkernel",
    "logging",
    "showHiddenMetricsForVersion",
    "portRange",
];

/// kube-proxy's masquerade mark bit, which Ferry's rules use too.
const MASQUERADE_BIT: i32 = 14;

impl KubeProxyConfiguration {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigFileError::Value { what, .. } => ConfigFileError::Value {
                path: path.to_owned(),
                what,
            },
            ConfigFileError::Parse { source, .. } => ConfigFileError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    /// Parses a file's text, checking its kind and version.
    pub fn parse(text: &str) -> Result<Self, ConfigFileError> {
        let config: Self =
            serde_saphyr::from_str(text).map_err(|source| ConfigFileError::Parse {
                path: PathBuf::new(),
                source: Box::new(source),
            })?;
        let value_error = |what: String| ConfigFileError::Value {
            path: PathBuf::new(),
            what,
        };
        if config.kind.as_deref() != Some("KubeProxyConfiguration") {
            return Err(value_error(format!(
                "kind is {:?}, not KubeProxyConfiguration",
                config.kind.as_deref().unwrap_or("")
            )));
        }
        if config.api_version.as_deref() != Some(API_VERSION) {
            return Err(value_error(format!(
                "apiVersion is {:?}; this reader knows {API_VERSION}",
                config.api_version.as_deref().unwrap_or("")
            )));
        }
        Ok(config)
    }

    /// Fills in every flag of `args` that was not given explicitly; returns warnings
    /// for the settings that have no effect in Ferry.
    pub fn apply(self, args: &mut RunArgs) -> Result<Vec<String>, ConfigFileError> {
        let mut warnings = Vec::new();
        let mut filler = Filler {
            args,
            warnings: &mut warnings,
        };
        filler.top_level(&self)?;
        if let Some(c) = &self.client_connection {
            filler.client_connection(c);
        }
        let rules = self.rule_syncing(filler.args.mode);
        if let Some(r) = rules {
            filler.rule_syncing(r)?;
        }
        if let Some(c) = &self.conntrack {
            filler.conntrack(c)?;
        }
        for (gate, enabled) in self.feature_gates.iter().flatten() {
            warnings.push(format!(
                "featureGates.{gate}={enabled} has no effect: Ferry has no feature gates"
            ));
        }
        unknown_fields(&mut warnings, "", &self.unknown, &IGNORED);
        Ok(warnings)
    }

    /// The sync settings of the mode that runs (kube-proxy reads `iptables` in
    /// iptables mode, `nftables` in nftables mode); eBPF and auto follow `iptables`.
    /// Another mode's section is ignored, as kube-proxy does.
    fn rule_syncing(&self, mode: Mode) -> Option<&RuleSyncing> {
        match mode {
            Mode::Nftables => self.nftables.as_ref(),
            Mode::Auto | Mode::Ebpf | Mode::Iptables => self.iptables.as_ref(),
        }
    }
}

/// Applies file values to the flags not given explicitly.
struct Filler<'a> {
    args: &'a mut RunArgs,
    warnings: &'a mut Vec<String>,
}

impl Filler<'_> {
    /// Whether the file may set the flag with this id.
    fn free(&self, id: &str) -> bool {
        !self.args.explicit.contains(id)
    }

    fn top_level(&mut self, c: &KubeProxyConfiguration) -> Result<(), ConfigFileError> {
        if let Some(mode) = c.mode.as_deref()
            && self.free("mode")
        {
            match parse_mode(mode) {
                Ok(Some(m)) => self.args.mode = m,
                Ok(None) => {}
                Err(w) => return Err(value_error(w)),
            }
            if mode == "ipvs" {
                self.warnings.push(
                    "mode \"ipvs\": Ferry has no IPVS mode; using its default (auto: eBPF, else nftables, else iptables)"
                        .to_owned(),
                );
            }
        }
        if let Some(cidrs) = c.cluster_cidr.as_deref()
            && self.free("cluster_cidr")
        {
            self.args.cluster_cidr = cidrs
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse()
                        .map_err(|_| value_error(format!("clusterCIDR: {s:?} is not a CIDR")))
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(name) = c.hostname_override.as_deref().map(str::trim)
            && !name.is_empty()
            && self.free("node_name")
        {
            self.args.node_name = Some(name.to_lowercase());
        }
        if let Some(addresses) = &c.node_port_addresses
            && self.free("nodeport_addresses")
        {
            self.args.nodeport_addresses = addresses.clone();
        }
        if let Some(addr) = c
            .healthz_bind_address
            .as_deref()
            .and_then(|a| bind_address(a, 10256))
            && self.free("healthz_bind_address")
        {
            self.args.healthz_bind_address = addr;
        }
        if let Some(addr) = c
            .metrics_bind_address
            .as_deref()
            .and_then(|a| bind_address(a, 10249))
            && self.free("metrics_bind_address")
        {
            self.args.metrics_bind_address = addr;
        }
        if let Some(hard) = c.bind_address_hard_fail
            && self.free("bind_address_hard_fail")
        {
            self.args.bind_address_hard_fail = hard;
        }
        if let Some(adj) = c.oom_score_adj
            && self.free("oom_score_adj")
        {
            self.args.node_settings.oom_score_adj = adj;
        }
        self.detect_local(c)?;
        Ok(())
    }

    fn detect_local(&mut self, c: &KubeProxyConfiguration) -> Result<(), ConfigFileError> {
        if let Some(mode) = c.detect_local_mode.as_deref().filter(|m| !m.is_empty())
            && self.free("detect_local_mode")
        {
            self.args.detect_local_mode = clap::ValueEnum::from_str(mode, false).map_err(|_| {
                value_error(format!(
                    "detectLocalMode {mode:?} is not one of kube-proxy's"
                ))
            })?;
        }
        let Some(d) = &c.detect_local else {
            return Ok(());
        };
        let nonempty = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        if let Some(bridge) = nonempty(&d.bridge_interface)
            && self.free("pod_bridge_interface")
        {
            self.args.pod_bridge_interface = Some(bridge);
        }
        if let Some(prefix) = nonempty(&d.interface_name_prefix)
            && self.free("pod_interface_name_prefix")
        {
            self.args.pod_interface_name_prefix = Some(prefix);
        }
        unknown_fields(self.warnings, "detectLocal.", &d.unknown, &[]);
        Ok(())
    }

    fn client_connection(&mut self, c: &ClientConnection) {
        if let Some(path) = c.kubeconfig.as_deref().filter(|p| !p.is_empty())
            && self.free("kubeconfig")
            && self.free("manifests")
        {
            self.args.kubeconfig = Some(PathBuf::from(path));
        }
        let ignored = ["acceptContentTypes", "contentType", "qps", "burst"];
        unknown_fields(self.warnings, "clientConnection.", &c.unknown, &ignored);
    }

    fn rule_syncing(&mut self, r: &RuleSyncing) -> Result<(), ConfigFileError> {
        // Zero periods mean "the default" (kube-proxy's defaulting), here Ferry's.
        if let Some(d) = nonzero("syncPeriod", &r.sync_period)?
            && self.free("sync_period")
        {
            self.args.sync_period = d;
        }
        if let Some(d) = nonzero("minSyncPeriod", &r.min_sync_period)?
            && self.free("min_sync_period")
        {
            self.args.min_sync_period = d;
        }
        if let Some(all) = r.masquerade_all
            && self.free("masquerade_all")
        {
            self.args.masquerade_all = all;
        }
        if let Some(bit) = r.masquerade_bit
            && bit != MASQUERADE_BIT
        {
            self.warnings.push(format!(
                "masqueradeBit {bit}: Ferry always marks with bit {MASQUERADE_BIT} (0x4000), kube-proxy's default"
            ));
        }
        if r.localhost_node_ports == Some(false) && self.free("nodeport_addresses") {
            self.warnings.push(
                "localhostNodePorts: false: list nodePortAddresses without 127.0.0.0/8 (or \"primary\") to keep NodePorts off 127.0.0.1"
                    .to_owned(),
            );
        }
        unknown_fields(self.warnings, "iptables.", &r.unknown, &[]);
        Ok(())
    }

    fn conntrack(&mut self, c: &Conntrack) -> Result<(), ConfigFileError> {
        let s = &mut self.args.node_settings;
        let count = |name: &str, v: i64| {
            u32::try_from(v)
                .map_err(|_| value_error(format!("conntrack.{name}: {v} is out of range")))
        };
        let explicit = &self.args.explicit;
        let free = |id: &str| !explicit.contains(id);
        if let Some(v) = c.max_per_core
            && free("conntrack_max_per_core")
        {
            s.conntrack_max_per_core = count("maxPerCore", v)?;
        }
        if let Some(v) = c.min
            && free("conntrack_min")
        {
            s.conntrack_min = count("min", v)?;
        }
        let timeouts = [
            (
                &c.tcp_established_timeout,
                "tcpEstablishedTimeout",
                "conntrack_tcp_timeout_established",
                &mut s.conntrack_tcp_timeout_established,
            ),
            (
                &c.tcp_close_wait_timeout,
                "tcpCloseWaitTimeout",
                "conntrack_tcp_timeout_close_wait",
                &mut s.conntrack_tcp_timeout_close_wait,
            ),
            (
                &c.udp_timeout,
                "udpTimeout",
                "conntrack_udp_timeout",
                &mut s.conntrack_udp_timeout,
            ),
            (
                &c.udp_stream_timeout,
                "udpStreamTimeout",
                "conntrack_udp_timeout_stream",
                &mut s.conntrack_udp_timeout_stream,
            ),
        ];
        for (value, name, id, target) in timeouts {
            if let Some(v) = value
                && free(id)
            {
                *target = duration(name, v)?;
            }
        }
        if let Some(v) = c.tcp_be_liberal
            && free("conntrack_tcp_be_liberal")
        {
            s.conntrack_tcp_be_liberal = v;
        }
        unknown_fields(self.warnings, "conntrack.", &c.unknown, &[]);
        Ok(())
    }
}

/// kube-proxy's mode names: `None` keeps Ferry's default (kube-proxy's empty mode).
fn parse_mode(mode: &str) -> Result<Option<Mode>, String> {
    match mode {
        "" | "ipvs" => Ok(None),
        "iptables" => Ok(Some(Mode::Iptables)),
        "ebpf" => Ok(Some(Mode::Ebpf)),
        "nftables" => Ok(Some(Mode::Nftables)),
        "auto" => Ok(Some(Mode::Auto)),
        other => Err(format!(
            "mode {other:?} is not available in Ferry (use \"ebpf\", \"nftables\", \"iptables\", or \"\" for auto)"
        )),
    }
}

/// kube-proxy's bind address forms: `IP:PORT`, `IP` (the default port) or `:PORT`
/// (all addresses). Empty means the default, so `None`.
fn bind_address(value: &str, default_port: u16) -> Option<String> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    Some(bind_address_of(value, default_port))
}

fn bind_address_of(value: &str, default_port: u16) -> String {
    if let Some(port) = value.strip_prefix(':') {
        return format!("0.0.0.0:{port}");
    }
    match value.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, default_port).to_string(),
        Err(_) => value.to_owned(),
    }
}

/// A duration field that is set and not zero.
fn nonzero(
    name: &str,
    value: &Option<String>,
) -> Result<Option<std::time::Duration>, ConfigFileError> {
    match value {
        Some(v) => Ok(Some(duration(name, v)?).filter(|d| !d.is_zero())),
        None => Ok(None),
    }
}

/// A Go duration (`24h0m0s`, `300ms`) as a flag value.
fn duration(name: &str, value: &str) -> Result<std::time::Duration, ConfigFileError> {
    parse_duration(value).map_err(|e| value_error(format!("{name}: {e}")))
}

fn value_error(what: String) -> ConfigFileError {
    ConfigFileError::Value {
        path: PathBuf::new(),
        what,
    }
}

/// Warns about fields this reader does not know (or knows to have no effect: those in
/// `ignored` are skipped).
fn unknown_fields(
    warnings: &mut Vec<String>,
    prefix: &str,
    unknown: &BTreeMap<String, serde_json::Value>,
    ignored: &[&str],
) {
    for field in unknown.keys().filter(|k| !ignored.contains(&k.as_str())) {
        warnings.push(format!(
            "{prefix}{field} is not a setting Ferry knows; ignored"
        ));
    }
}

#[cfg(test)]
mod tests;
