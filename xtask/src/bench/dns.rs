//! The DNS benchmark: queries per second and latency with `dnsperf`, for cluster names
//! and for cached outside names, against Ferry and the same records served by Knot
//! DNS, Unbound and dnsmasq (all started here, on the node's loopback, with generated
//! data), plus how fast a change shows up in Ferry's answers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_tests::{Cluster, Mode};
use serde::Serialize;

use super::workload;

/// One server x query-set measurement.
#[derive(Clone, Debug, Serialize)]
pub struct DnsRow {
    pub server: &'static str,
    /// `cluster` (names of services) or `outside` (names forwarded, then cached).
    pub names: &'static str,
    pub qps: f64,
    pub avg_latency_us: f64,
    pub lost: u64,
    /// Peak RSS of the server process after the runs.
    pub rss_mb: f64,
    /// QPS relative to Knot DNS on cluster names / Unbound on outside names.
    pub vs_reference: f64,
}

/// How quickly a change is answered by Ferry's DNS.
#[derive(Clone, Debug, Serialize)]
pub struct DnsFreshness {
    pub changes: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

const PORT_FERRY: u16 = 5301;
const PORT_KNOT: u16 = 5302;
const PORT_UNBOUND: u16 = 5303;
const PORT_DNSMASQ: u16 = 5304;
const PORT_UPSTREAM: u16 = 5399;
const OUTSIDE: usize = 100;

fn outside_name(i: usize) -> String {
    format!("site-{i}.outside.test")
}

fn service_name(i: usize, services: usize) -> String {
    if i + 1 == services {
        format!("{}.bench.svc.cluster.local", workload::MEASURED)
    } else {
        format!("svc-{i:05}.bench.svc.cluster.local")
    }
}

fn spawn(cmd: &mut Command, what: &str) -> anyhow::Result<Child> {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what}"))
}

fn peak_rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Waits until `dig` gets an answer from the server on `port`.
fn wait_answering(c: &Cluster, port: u16, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = c
            .node_command("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+time=1",
                "+tries=1",
                "+short",
                name,
                "A",
            ])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("DNS server on port {port} does not answer {name}")
}

/// Runs dnsperf; returns (qps, average latency in us, lost queries).
fn dnsperf(
    c: &Cluster,
    port: u16,
    queries: &Path,
    seconds: u64,
) -> anyhow::Result<(f64, f64, u64)> {
    let out = c
        .node_command("dnsperf")
        .args([
            "-s",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-c",
            "4",
            "-T",
            "2",
            "-q",
            "200",
            "-l",
            &seconds.to_string(),
            "-d",
        ])
        .arg(queries)
        .output()
        .context("running dnsperf (apt package dnsperf)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
        line.split(':')
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let qps = field("Queries per second").context("no QPS in dnsperf output")?;
    let latency = field("Average Latency (s)").unwrap_or(0.0) * 1e6;
    let lost = text
        .lines()
        .find(|l| l.trim_start().starts_with("Queries lost"))
        .and_then(|l| l.split(':').nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok((qps, latency, lost))
}

/// Runs the DNS benchmark with `services` services of `per_service` endpoints.
pub fn run(
    services: usize,
    per_service: usize,
    seconds: u64,
) -> anyhow::Result<(Vec<DnsRow>, DnsFreshness)> {
    let mut c = Cluster::new(Mode::Ebpf, &["be0"]);
    let dir: PathBuf = std::env::temp_dir().join(format!("ferry-bench-dns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let real: std::net::Ipv4Addr = c
        .pod("be0")
        .ip
        .parse()
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
    for (file, yaml) in workload::manifests(services, per_service, real) {
        c.write_manifest(&file, &yaml);
    }
    c.write_manifest("churn.yaml", &workload::churn(per_service, 0));
    let mut children = vec![start_upstream(&c)?];
    c.start_agent_with(&[
        "--dns-listen",
        &format!("127.0.0.1:{PORT_FERRY}"),
        "--dns-upstream",
        &format!("127.0.0.1:{PORT_UPSTREAM}"),
    ]);
    // The same A records for the others.
    let records: Vec<(String, std::net::Ipv4Addr)> = (0..services)
        .map(|i| (service_name(i, services), workload::cluster_ip(i)))
        .collect();
    let knot = start_knot(&c, &dir, &records)?;
    let unbound = start_unbound(&c, &dir, &records)?;
    let dnsmasq = start_dnsmasq(&c, &dir, &records)?;
    let servers: [(&'static str, u16, Option<u32>); 4] = [
        ("ferry", PORT_FERRY, c.agent_pid()),
        ("knot", PORT_KNOT, Some(knot.id())),
        ("unbound", PORT_UNBOUND, Some(unbound.id())),
        ("dnsmasq", PORT_DNSMASQ, Some(dnsmasq.id())),
    ];
    children.extend([knot, unbound, dnsmasq]);
    let result = measure_all(&mut c, &servers, services, per_service, &dir, seconds);
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Once every server answers: query rates, then the agent's DNS freshness.
fn measure_all(
    c: &mut Cluster,
    servers: &[(&'static str, u16, Option<u32>)],
    services: usize,
    per_service: usize,
    dir: &Path,
    seconds: u64,
) -> anyhow::Result<(Vec<DnsRow>, DnsFreshness)> {
    let last = service_name(services - 1, services);
    for (name, port, _) in servers {
        wait_answering(c, *port, &last).with_context(|| format!("{name} is not answering"))?;
    }
    let queries = write_queries(dir, services)?;
    let rows = measure(c, servers, &queries, seconds)?;
    Ok((rows, freshness(c, per_service)))
}

/// The upstream for outside names (answers every site-N.outside.test).
fn start_upstream(c: &Cluster) -> anyhow::Result<Child> {
    let answers: Vec<String> = (0..OUTSIDE)
        .map(|i| format!("{}=192.0.2.{}", outside_name(i), 1 + i % 250))
        .collect();
    spawn(
        c.node_command(c.bin("ferry-probe")).args([
            "dns-upstream",
            "--listen",
            &format!("127.0.0.1:{PORT_UPSTREAM}"),
            "--ttl",
            "3600",
            "--answer",
            &answers.join(","),
        ]),
        "test upstream",
    )
}

/// Knot DNS serving the records as an authoritative zone.
fn start_knot(
    c: &Cluster,
    dir: &Path,
    records: &[(String, std::net::Ipv4Addr)],
) -> anyhow::Result<Child> {
    let zone = dir.join("cluster.local.zone");
    let mut text = String::from(
        "$ORIGIN cluster.local.\n$TTL 5\n@ SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ NS ns.dns.cluster.local.\nns.dns A 127.0.0.1\n",
    );
    for (name, ip) in records {
        text.push_str(&format!("{name}. A {ip}\n"));
    }
    std::fs::write(&zone, text)?;
    std::fs::write(
        dir.join("knot.conf"),
        format!(
            "server:\n  listen: 127.0.0.1@{PORT_KNOT}\n  rundir: {d}\ndatabase:\n  storage: {d}\nlog:\n  - target: stderr\n    any: error\nzone:\n  - domain: cluster.local\n    file: {z}\n    storage: {d}\n",
            d = dir.display(),
            z = zone.display()
        ),
    )?;
    spawn(
        c.node_command("knotd").arg("-c").arg(dir.join("knot.conf")),
        "knotd (apt package knot)",
    )
}

/// Unbound with the records as local data, forwarding `test.` to the upstream.
fn start_unbound(
    c: &Cluster,
    dir: &Path,
    records: &[(String, std::net::Ipv4Addr)],
) -> anyhow::Result<Child> {
    let mut conf = format!(
        "server:\n  interface: 127.0.0.1@{PORT_UNBOUND}\n  port: {PORT_UNBOUND}\n  do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  num-threads: 2\n  module-config: \"iterator\"\n  local-zone: \"cluster.local.\" static\n",
        d = dir.display()
    );
    for (name, ip) in records {
        conf.push_str(&format!("  local-data: \"{name}. 5 IN A {ip}\"\n"));
    }
    conf.push_str(&format!("remote-control:\n  control-enable: no\nforward-zone:\n  name: \"test.\"\n  forward-addr: 127.0.0.1@{PORT_UPSTREAM}\n"));
    std::fs::write(dir.join("unbound.conf"), conf)?;
    spawn(
        c.node_command("unbound")
            .arg("-d")
            .arg("-c")
            .arg(dir.join("unbound.conf")),
        "unbound",
    )
}

/// dnsmasq with the records as a hosts file, forwarding `test` to the upstream.
fn start_dnsmasq(
    c: &Cluster,
    dir: &Path,
    records: &[(String, std::net::Ipv4Addr)],
) -> anyhow::Result<Child> {
    let hosts: String = records
        .iter()
        .map(|(name, ip)| format!("{ip} {name}\n"))
        .collect();
    std::fs::write(dir.join("hosts"), hosts)?;
    spawn(
        c.node_command("dnsmasq").args([
            "-k",
            "--conf-file=/dev/null",
            &format!("--port={PORT_DNSMASQ}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--pid-file=",
            "--local=/cluster.local/",
            "--local-ttl=5",
            "--cache-size=10000",
            &format!("--server=/test/127.0.0.1#{PORT_UPSTREAM}"),
            &format!("--addn-hosts={}", dir.join("hosts").display()),
        ]),
        "dnsmasq",
    )
}

/// Query files: every service once, shuffled by a fixed stride ("cluster"), and the
/// outside names ("outside").
fn write_queries(dir: &Path, services: usize) -> anyhow::Result<[(&'static str, PathBuf); 2]> {
    let cluster_q = dir.join("cluster.queries");
    let stride = 7919 % services.max(1);
    let cluster_lines: String = (0..services)
        .map(|i| {
            format!(
                "{} A\n",
                service_name((i * stride.max(1)) % services, services)
            )
        })
        .collect();
    std::fs::write(&cluster_q, cluster_lines)?;
    let outside_q = dir.join("outside.queries");
    std::fs::write(
        &outside_q,
        (0..OUTSIDE)
            .map(|i| format!("{} A\n", outside_name(i)))
            .collect::<String>(),
    )?;
    Ok([("cluster", cluster_q), ("outside", outside_q)])
}

/// Query rate of every server for each name set, with ratios against the reference
/// (Knot for cluster names, Unbound for outside names).
fn measure(
    c: &Cluster,
    servers: &[(&'static str, u16, Option<u32>)],
    queries: &[(&'static str, PathBuf)],
    seconds: u64,
) -> anyhow::Result<Vec<DnsRow>> {
    let mut rows = Vec::new();
    for (names, queries) in queries {
        for (server, port, pid) in servers {
            if *names == "outside" && *server == "knot" {
                continue; // authoritative only: no forwarding
            }
            // Warm caches (outside names) and code paths, then measure.
            dnsperf(c, *port, queries, 1)?;
            let (qps, latency, lost) = dnsperf(c, *port, queries, seconds)?;
            eprintln!("   {server:<8} {names:<8} {qps:>9.0} qps avg {latency:>6.0}us lost {lost}");
            rows.push(DnsRow {
                server,
                names,
                qps,
                avg_latency_us: latency,
                lost,
                rss_mb: pid.map(peak_rss_mb).unwrap_or(0.0),
                vs_reference: 0.0,
            });
        }
    }
    for (names, reference) in [("cluster", "knot"), ("outside", "unbound")] {
        let base = rows
            .iter()
            .find(|r| r.names == names && r.server == reference)
            .map(|r| r.qps)
            .unwrap_or(0.0);
        for r in rows.iter_mut().filter(|r| r.names == names) {
            r.vs_reference = if base > 0.0 { r.qps / base } else { 0.0 };
        }
    }
    Ok(rows)
}

/// Freshness: the agent logs how long each change took to reach the zone.
fn freshness(c: &mut Cluster, per_service: usize) -> DnsFreshness {
    let before = c.agent_log_values("dns updated", "latency_us").len();
    for step in 1..=50 {
        c.write_manifest("churn.yaml", &workload::churn(per_service, step));
        std::thread::sleep(Duration::from_millis(30));
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut latencies: Vec<f64> = c
        .agent_log_values("dns updated", "latency_us")
        .into_iter()
        .skip(before)
        .map(|v| v as f64)
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    DnsFreshness {
        changes: latencies.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}
