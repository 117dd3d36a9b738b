//! Replacing kube-proxy on a node: noticing one that still runs (Ferry must not
//! fight it over the same chains and ports), and removing what one left behind in
//! any of its modes (`ferry cleanup --kube-proxy`).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::dataplane::command;
use crate::dataplane::iptables::IptablesDataPlane;
use crate::health::SERVER;
use crate::model::IpFamily;

/// How long a probe of a port may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// kube-proxy's IPVS-mode ipsets (IPv6 ones carry `KUBE-6-` instead of `KUBE-`).
const IPVS_SETS: [&str; 17] = [
    "LOOP-BACK",
    "CLUSTER-IP",
    "EXTERNAL-IP",
    "EXTERNAL-IP-LOCAL",
    "LOAD-BALANCER",
    "LOAD-BALANCER-FW",
    "LOAD-BALANCER-LOCAL",
    "LOAD-BALANCER-SOURCE-IP",
    "LOAD-BALANCER-SOURCE-CIDR",
    "NODE-PORT-TCP",
    "NODE-PORT-LOCAL-TCP",
    "NODE-PORT-UDP",
    "NODE-PORT-LOCAL-UDP",
    "NODE-PORT-SCTP-HASH",
    "NODE-PORT-LOCAL-SCTP-HASH",
    "HEALTH-CHECK-NODE-PORT",
    "IPVS-IPS",
];

/// The dummy device kube-proxy's IPVS mode binds service addresses to.
const IPVS_DEVICE: &str = "kube-ipvs0";

/// A kube-proxy answering on one of the addresses Ferry is to serve: its description
/// for the refusal message, or `None` when nothing (or Ferry) answers there.
pub fn running_on(addresses: &[SocketAddr]) -> Option<String> {
    addresses.iter().find_map(|addr| {
        let target = crate::host::loopback_if_unspecified(*addr);
        let response = http_get(target, "/healthz")?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let ours = head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("server: ferry/"));
        let kube_proxy_like = body.contains("lastUpdated") || body.trim() == "ok";
        (!ours && kube_proxy_like)
            .then(|| format!("something answers kube-proxy's /healthz on {target}"))
    })
}

/// A bounded HTTP/1.0 GET; `None` when nothing answers in time.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nUser-Agent: {SERVER}\r\n\r\n"
    )
    .ok()?;
    let mut response = Vec::new();
    // A read error after some bytes (timeout, reset) still leaves what arrived.
    let _ = stream.take(64 * 1024).read_to_end(&mut response);
    (!response.is_empty()).then(|| String::from_utf8_lossy(&response).into_owned())
}

/// The refusal when kube-proxy still runs here, saying what to do.
pub fn refusal(what: &str) -> String {
    format!(
        "kube-proxy still runs on this node ({what}); Ferry will not fight it over the same rules. \
         Move kube-proxy off this node first (label it ferry.io/proxy=true after patching kube-proxy's DaemonSet with deploy/migration/kube-proxy-exclude-nodes.yaml), \
         or stop it; Ferry then takes over the rules it left"
    )
}

/// Removes kube-proxy's leftovers of every mode: iptables chains in both backends,
/// its nftables tables, and IPVS state. Errors of one part do not stop the others.
pub fn cleanup(families: &[IpFamily]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    if let Err(e) = IptablesDataPlane::cleanup_kube_proxy(families) {
        failures.push(format!("iptables: {e}"));
    }
    for family in families {
        if let Err(e) = delete_nft_table(*family) {
            failures.push(e);
        }
    }
    failures.extend(cleanup_ipvs());
    if failures.is_empty() {
        info!("kube-proxy's leftovers removed");
        Ok(())
    } else {
        anyhow::bail!(
            "some of kube-proxy's leftovers remain: {}",
            failures.join("; ")
        )
    }
}

/// `delete table ip|ip6 kube-proxy`, when it exists.
fn delete_nft_table(family: IpFamily) -> Result<(), String> {
    let nft_family = match family {
        IpFamily::V4 => "ip",
        IpFamily::V6 => "ip6",
    };
    let exists = command::run(
        Command::new("nft")
            .args(["list", "table", nft_family, "kube-proxy"])
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        command::WHOLE_TABLE,
        |_, _| {},
    );
    match exists {
        Ok(f) if f.status.success() => {}
        Ok(_) => return Ok(()),
        Err(e) => {
            debug!(error = %e, "nft not installed; no nftables leftovers to remove");
            return Ok(());
        }
    }
    run("nft", &["delete", "table", nft_family, "kube-proxy"])?;
    info!(family = nft_family, "removed kube-proxy's nftables table");
    Ok(())
}

/// IPVS mode's state: virtual servers, the `kube-ipvs0` device and the ipsets.
fn cleanup_ipvs() -> Vec<String> {
    let mut failures = Vec::new();
    let services = std::fs::read_to_string("/proc/net/ip_vs")
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("TCP") || l.starts_with("UDP") || l.starts_with("SCTP"))
                .count()
        })
        .unwrap_or(0);
    if services > 0
        && let Err(e) = run("ipvsadm", &["--clear"])
    {
        failures.push(format!(
            "{services} IPVS virtual servers remain ({e}); run ipvsadm --clear"
        ));
    }
    // /sys/class/net may show another namespace's devices; the ioctl asks this one.
    if let Ok(index) = nix::net::if_::if_nametoindex(IPVS_DEVICE) {
        match delete_link(index) {
            Ok(()) => info!(device = IPVS_DEVICE, "removed kube-proxy's IPVS device"),
            Err(e) => failures.push(format!("cannot delete {IPVS_DEVICE}: {e}")),
        }
    }
    failures.extend(destroy_ipsets());
    failures
}

/// Destroys kube-proxy's ipsets that exist (nothing when `ipset` is not installed).
fn destroy_ipsets() -> Vec<String> {
    let Ok(listed) = Command::new("ipset")
        .args(["list", "-n"])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let existing = String::from_utf8_lossy(&listed.stdout).into_owned();
    let ours = |name: &str| {
        IPVS_SETS
            .iter()
            .any(|s| name == format!("KUBE-{s}") || name == format!("KUBE-6-{s}"))
    };
    let mut failures = Vec::new();
    for name in existing.lines().map(str::trim).filter(|n| ours(n)) {
        match run("ipset", &["destroy", name]) {
            Ok(()) => info!(ipset = name, "removed kube-proxy's ipset"),
            Err(e) => failures.push(e),
        }
    }
    failures
}

/// Deletes a network device (RTM_DELLINK) and waits for the kernel's answer.
fn delete_link(index: u32) -> std::io::Result<()> {
    use netlink_packet_route::RouteNetlinkMessage;
    use netlink_packet_route::link::LinkMessage;
    let mut link = LinkMessage::default();
    link.header.index = index;
    crate::host::rtnetlink_request(RouteNetlinkMessage::DelLink(link), 0)
}

fn run(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = command::run(
        Command::new(tool)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        command::WHOLE_TABLE,
        |_, _| {},
    )
    .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    warn!(tool, ?args, stderr, "failed");
    Err(format!("{tool} {} failed: {stderr}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_probed_on_loopback() {
        let probe = crate::host::loopback_if_unspecified("0.0.0.0:10256".parse().unwrap());
        assert_eq!(probe, "127.0.0.1:10256".parse().unwrap());
        let probe = crate::host::loopback_if_unspecified("[::]:10256".parse().unwrap());
        assert_eq!(probe, "[::1]:10256".parse().unwrap());
        let probe = crate::host::loopback_if_unspecified("10.0.0.1:10256".parse().unwrap());
        assert_eq!(probe, "10.0.0.1:10256".parse().unwrap());
    }

    #[test]
    fn nothing_listening_is_not_kube_proxy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert_eq!(running_on(&[addr]), None);
    }
}
