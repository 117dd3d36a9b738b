//! `ferry status`: what the running agent is doing, in one place. The agent keeps an
//! [`AgentStatus`] up to date as it runs (the proxy loop and its report write it) and
//! serves it as JSON at `/status` on the metrics address; `ferry status` fetches and
//! prints it, or passes the JSON on with `--json`.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// One sync, as `ferry status` reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncRecord {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub took_ms: f64,
}

impl SyncRecord {
    /// A sync that just ended after `took`.
    pub fn now(took: Duration) -> Self {
        Self {
            at_unix_ms: unix_ms(SystemTime::now()),
            took_ms: took.as_secs_f64() * 1000.0,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Everything `ferry status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    pub node: String,
    /// The data plane (`ebpf`, `nftables`, `iptables`) and how it was chosen.
    pub mode: String,
    pub mode_reason: String,
    /// What the kernel offers the data planes (see `probe::kernel_features`).
    #[serde(default)]
    pub kernel: Vec<String>,
    /// Where objects come from: the manifest directory or the API server.
    pub source: String,
    /// The source has delivered its first complete view.
    pub source_synced: bool,
    /// API source: whether the last list/watch call worked (`None` for a manifest
    /// directory), the last failure while it does not, and the last resourceVersion
    /// seen.
    #[serde(default)]
    pub source_connected: Option<bool>,
    #[serde(default)]
    pub source_error: Option<String>,
    #[serde(default)]
    pub resource_version: Option<String>,
    /// When the last object event arrived.
    pub last_event_unix_ms: Option<u64>,
    /// eBPF mode: the cgroup the hooks are attached to and the bpffs pin directory.
    pub cgroup: Option<String>,
    pub pin_dir: Option<String>,
    /// Service ports × families programmed.
    pub plans: usize,
    pub last_full_sync: Option<SyncRecord>,
    pub last_partial_sync: Option<SyncRecord>,
    /// Failed syncs in a row (0 when the last one worked), and the last error.
    pub failures_in_a_row: u32,
    pub last_error: Option<String>,
    /// What the data plane holds, e.g. `eBPF maps: 12 frontends, 20 backends`.
    pub programmed: Vec<String>,
    /// Addresses the DNS server listens on (empty: DNS is off).
    pub dns_listen: Vec<String>,
    /// Counts of things that were refused or left out, by what they were.
    pub invalid_objects: u64,
    pub frontend_conflicts: u64,
    /// Service ports the kernel refused, held out of the data plane, with its error.
    #[serde(default)]
    pub quarantined: Vec<String>,
}

/// The agent's status, shared by whoever updates it and the HTTP server.
#[derive(Clone, Debug, Default)]
pub struct StatusBoard(Arc<Mutex<AgentStatus>>);

impl StatusBoard {
    /// A board starting from `initial`.
    pub fn new(initial: AgentStatus) -> Self {
        Self(Arc::new(Mutex::new(initial)))
    }

    /// Changes the status.
    pub fn update(&self, change: impl FnOnce(&mut AgentStatus)) {
        change(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The status now.
    pub fn snapshot(&self) -> AgentStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Fetches the status from an agent's metrics address.
pub fn fetch(address: SocketAddr) -> anyhow::Result<AgentStatus> {
    get_json(address, "/status")
}

/// GETs `path` from an agent's metrics address and decodes its JSON; an answer
/// other than 200 becomes an error carrying the agent's words.
pub fn get_json<T: serde::de::DeserializeOwned>(
    address: SocketAddr,
    path: &str,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&address, timeout)
        .with_context(|| format!("no agent answers on {address} (its --metrics-bind-address)"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.take(16 << 20).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or_default();
        anyhow::bail!("{address}{path}: {status}: {}", body.trim());
    }
    serde_json::from_str(body)
        .with_context(|| format!("the agent's answer to {path} is not what ferry expects"))
}

/// The status for people: one fact per line.
pub fn render(s: &AgentStatus, now: SystemTime) -> String {
    let ago = |ms: u64| {
        let secs = unix_ms(now).saturating_sub(ms) as f64 / 1000.0;
        format!("{secs:.1} s ago")
    };
    let sync = |r: &Option<SyncRecord>| match r {
        Some(r) => format!("{} (took {:.1} ms)", ago(r.at_unix_ms), r.took_ms),
        None => "never".into(),
    };
    let mut out = vec![
        format!("ferry {} on node {}", s.version, s.node),
        format!("mode:            {} ({})", s.mode, s.mode_reason),
        format!("kernel:          {}", s.kernel.join("; ")),
        format!(
            "source:          {} ({})",
            s.source,
            if s.source_synced {
                "synced"
            } else {
                "not synced yet"
            }
        ),
        format!(
            "last event:      {}",
            s.last_event_unix_ms.map_or("none".into(), ago)
        ),
    ];
    if let Some(connected) = s.source_connected {
        let version = s.resource_version.as_deref().unwrap_or("-");
        out.push(match connected {
            true => format!("api server:      connected (resourceVersion {version})"),
            false => format!(
                "WARNING: the API server does not answer ({}); programmed state kept",
                s.source_error.as_deref().unwrap_or("?")
            ),
        });
    }
    if let (Some(cgroup), Some(pins)) = (&s.cgroup, &s.pin_dir) {
        out.push(format!("cgroup:          {cgroup}"));
        out.push(format!("pins:            {pins}"));
    }
    out.push(format!("service ports:   {}", s.plans));
    out.push(format!("last full sync:  {}", sync(&s.last_full_sync)));
    out.push(format!("last change:     {}", sync(&s.last_partial_sync)));
    for p in &s.programmed {
        out.push(format!("programmed:      {p}"));
    }
    out.push(match s.dns_listen.is_empty() {
        true => "dns:             off".into(),
        false => format!("dns:             {}", s.dns_listen.join(", ")),
    });
    if s.failures_in_a_row > 0 {
        out.push(format!(
            "WARNING: the last {} syncs failed: {}",
            s.failures_in_a_row,
            s.last_error.as_deref().unwrap_or("?")
        ));
    }
    if s.invalid_objects > 0 {
        out.push(format!(
            "WARNING: {} invalid objects skipped (see the log)",
            s.invalid_objects
        ));
    }
    if s.frontend_conflicts > 0 {
        out.push(format!(
            "WARNING: {} frontend conflicts between services (see the log)",
            s.frontend_conflicts
        ));
    }
    for q in &s.quarantined {
        out.push(format!("WARNING: quarantined (the kernel refused it): {q}"));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_says_what_matters() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let mut s = AgentStatus {
            version: "0.1.0".into(),
            node: "node-a".into(),
            mode: "ebpf".into(),
            mode_reason: "--mode ebpf".into(),
            kernel: vec!["kernel 6.1.0".into(), "BTF: yes".into()],
            source: "manifests /m".into(),
            source_synced: true,
            last_full_sync: Some(SyncRecord {
                at_unix_ms: 98_000,
                took_ms: 3.25,
            }),
            programmed: vec!["eBPF maps: 2 frontends, 3 backends".into()],
            ..AgentStatus::default()
        };
        let text = render(&s, now);
        assert!(
            text.contains("mode:            ebpf (--mode ebpf)"),
            "{text}"
        );
        assert!(
            text.contains("last full sync:  2.0 s ago (took 3.2 ms)"),
            "{text}"
        );
        assert!(text.contains("dns:             off"), "{text}");
        assert!(
            text.contains("kernel:          kernel 6.1.0; BTF: yes"),
            "{text}"
        );
        assert!(!text.contains("WARNING"), "{text}");
        assert!(!text.contains("api server"), "a manifest source: {text}");
        s.source_connected = Some(true);
        s.resource_version = Some("812".into());
        assert!(render(&s, now).contains("api server:      connected (resourceVersion 812)"));
        s.source_connected = Some(false);
        s.source_error = Some("Service: connection refused".into());
        assert!(render(&s, now).contains(
            "WARNING: the API server does not answer (Service: connection refused); programmed state kept"
        ));
        s.failures_in_a_row = 2;
        s.last_error = Some("nft: boom".into());
        assert!(render(&s, now).contains("WARNING: the last 2 syncs failed: nft: boom"));
        s.quarantined = vec!["ns/web:sctp (IPv4): iptables-restore: no sctp".into()];
        assert!(
            render(&s, now).contains(
                "WARNING: quarantined (the kernel refused it): ns/web:sctp (IPv4): iptables-restore: no sctp"
            )
        );
    }
}
