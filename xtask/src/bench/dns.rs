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

/// One server x query-set measurement: the median of [`ROUNDS`] interleaved runs,
/// with their spread.
#[derive(Clone, Debug, Serialize)]
pub struct DnsRow {
    pub server: &'static str,
    /// `cluster` (names of services) or `outside` (names forwarded, then cached).
    pub names: &'static str,
    pub qps: Spread,
    /// Answers per CPU-second of the server process (all its threads, pinned to one
    /// core; the load generator runs on another): what a server costs the node.
    pub per_cpu_second: Spread,
    pub avg_latency_us: f64,
    pub lost: u64,
    /// Peak RSS of the server process after the runs.
    pub rss_mb: f64,
    /// Median QPS relative to Knot DNS on cluster names / Unbound on outside names.
    pub vs_reference: f64,
    /// The same for answers per CPU-second.
    pub vs_reference_per_cpu: f64,
}

/// Median and range of one figure over the rounds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |i: usize| values.get(i).copied().unwrap_or(0.0);
        Self {
            median: at(values.len() / 2),
            min: at(0),
            max: at(values.len().saturating_sub(1)),
        }
    }
}

/// How quickly a change is answered by Ferry's DNS, per data plane: from the event
/// reaching the agent to the name being answered, which waits for the sync that
/// makes it connectable.
#[derive(Clone, Debug, Serialize)]
pub struct DnsFreshness {
    pub mode: &'static str,
    pub changes: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A replacement of the agent under load (the DaemonSet's rolling update): a new
/// agent takes the sockets over, the old one gets SIGTERM.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsRestart {
    pub queries: u64,
    pub lost: u64,
    pub servfail: u64,
}

/// Interleaved rounds per measurement.
pub const ROUNDS: usize = 3;
/// The core the servers are pinned to; the load generator gets the other.
const SERVER_CPU: &str = "0";
const CLIENT_CPU: &str = "1";

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

/// What one dnsperf run reported.
#[derive(Clone, Copy, Debug, Default)]
struct Run {
    qps: f64,
    latency_us: f64,
    completed: u64,
    lost: u64,
    servfail: u64,
}

/// Runs dnsperf (pinned to the client core) for `seconds`.
fn dnsperf(c: &Cluster, port: u16, queries: &Path, seconds: u64) -> anyhow::Result<Run> {
    let out = c
        .node_command("taskset")
        .args(["-c", CLIENT_CPU, "dnsperf"])
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
    let rcode = |code: &str| -> u64 {
        text.lines()
            .find(|l| l.trim_start().starts_with("Response codes"))
            .and_then(|l| {
                let rest = l.split(':').nth(1)?;
                let mut words = rest.split_whitespace();
                while let Some(w) = words.next() {
                    if w == code {
                        return words.next()?.parse().ok();
                    }
                }
                None
            })
            .unwrap_or(0)
    };
    Ok(Run {
        qps: field("Queries per second").context("no QPS in dnsperf output")?,
        latency_us: field("Average Latency (s)").unwrap_or(0.0) * 1e6,
        completed: field("Queries completed").unwrap_or(0.0) as u64,
        lost: field("Queries lost").unwrap_or(0.0) as u64,
        servfail: rcode("SERVFAIL"),
    })
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `) `.
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / per_second
}

/// Pins every thread of `pid` to the server core.
fn pin_server(c: &Cluster, pid: u32) -> anyhow::Result<()> {
    let status = c
        .node_command("taskset")
        .args(["-a", "-p", "-c", SERVER_CPU, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    if !status.success() {
        bail!("taskset could not pin process {pid}");
    }
    Ok(())
}

/// Runs the DNS benchmark with `services` services of `per_service` endpoints.
pub fn run(services: usize, per_service: usize, seconds: u64) -> anyhow::Result<DnsResults> {
    let mut results = run_in(Mode::Ebpf, services, per_service, seconds, true)?;
    let iptables = run_in(Mode::Iptables, services, per_service, seconds, false)?;
    results.freshness.extend(iptables.freshness);
    Ok(results)
}

/// What the DNS benchmark found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsResults {
    pub rows: Vec<DnsRow>,
    pub freshness: Vec<DnsFreshness>,
    pub restart: Option<DnsRestart>,
}

/// One node in `mode` with the workload: with `servers`, every server's query rates
/// and a restart under load; always the agent's freshness.
fn run_in(
    mode: Mode,
    services: usize,
    per_service: usize,
    seconds: u64,
    servers: bool,
) -> anyhow::Result<DnsResults> {
    let mut c = Cluster::new(mode, &["be0"]);
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
    let mut children = Children(vec![start_upstream(&c)?]);
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
    let result = if servers {
        let knot = start_knot(&c, &dir, &records)?;
        children.0.push(knot);
        let unbound = start_unbound(&c, &dir, &records)?;
        children.0.push(unbound);
        let dnsmasq = start_dnsmasq(&c, &dir, &records)?;
        children.0.push(dnsmasq);
        let pid = |i: usize| children.0.get(i).map(Child::id);
        let servers: [(&'static str, u16, Option<u32>); 4] = [
            ("ferry", PORT_FERRY, c.agent_pid()),
            ("knot", PORT_KNOT, pid(1)),
            ("unbound", PORT_UNBOUND, pid(2)),
            ("dnsmasq", PORT_DNSMASQ, pid(3)),
        ];
        measure_all(&mut c, &servers, services, per_service, &dir, seconds)
    } else {
        Ok(DnsResults {
            freshness: vec![freshness(&mut c, per_service)],
            ..DnsResults::default()
        })
    };
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Server processes, stopped when the benchmark is done (or fails).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Once every server answers: query rates, the agent's DNS freshness, then a
/// restart under load (last: it replaces the agent).
fn measure_all(
    c: &mut Cluster,
    servers: &[(&'static str, u16, Option<u32>)],
    services: usize,
    per_service: usize,
    dir: &Path,
    seconds: u64,
) -> anyhow::Result<DnsResults> {
    let last = service_name(services - 1, services);
    for (name, port, pid) in servers {
        wait_answering(c, *port, &last).with_context(|| format!("{name} is not answering"))?;
        if let Some(pid) = pid {
            pin_server(c, *pid)?;
        }
    }
    let queries = write_queries(dir, services)?;
    let rows = measure(c, servers, &queries, seconds)?;
    let freshness = vec![freshness(c, per_service)];
    let restart = restart_under_load(c, &queries[0].1)?;
    Ok(DnsResults {
        rows,
        freshness,
        restart: Some(restart),
    })
}

/// dnsperf against the agent while a successor takes its sockets over and the old
/// agent is stopped with SIGTERM.
fn restart_under_load(c: &mut Cluster, queries: &Path) -> anyhow::Result<DnsRestart> {
    let seconds = 6;
    let load = {
        let c: &Cluster = c;
        std::thread::scope(|scope| -> anyhow::Result<Run> {
            let perf = scope.spawn(|| dnsperf(c, PORT_FERRY, queries, seconds));
            std::thread::sleep(Duration::from_secs(1));
            let mut args = c.agent_args();
            args.extend(
                [
                    "--dns-listen",
                    &format!("127.0.0.1:{PORT_FERRY}"),
                    "--dns-upstream",
                    &format!("127.0.0.1:{PORT_UPSTREAM}"),
                ]
                .map(String::from),
            );
            let mut successor = spawn(
                c.node_command(c.bin("ferry")).args(&args),
                "the successor agent",
            )?;
            let handed = ferry_tests::cluster::poll(Duration::from_secs(60), || {
                c.agent_log().contains("handed the DNS sockets")
            });
            if let Some(pid) = c.agent_pid() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let run = perf
                .join()
                .map_err(|_| anyhow::anyhow!("dnsperf thread panicked"))?;
            let _ = successor.kill();
            let _ = successor.wait();
            if !handed {
                bail!("the agent did not hand its DNS sockets over");
            }
            run
        })?
    };
    let _ = c.wait_agent_exit(Duration::from_secs(10));
    eprintln!(
        "   restart under load: {} queries, {} lost, {} SERVFAIL",
        load.completed + load.lost,
        load.lost,
        load.servfail
    );
    Ok(DnsRestart {
        queries: load.completed + load.lost,
        lost: load.lost,
        servfail: load.servfail,
    })
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

/// Query rate and answers per CPU-second of every server for each name set: the
/// servers take turns, round after round, so drift hits them alike; ratios against
/// the reference (Knot for cluster names, Unbound for outside names).
fn measure(
    c: &Cluster,
    servers: &[(&'static str, u16, Option<u32>)],
    queries: &[(&'static str, PathBuf)],
    seconds: u64,
) -> anyhow::Result<Vec<DnsRow>> {
    let mut rows = Vec::new();
    for (names, queries) in queries {
        // Knot is authoritative only: no forwarding.
        let measured: Vec<_> = servers
            .iter()
            .filter(|(server, _, _)| !(*names == "outside" && *server == "knot"))
            .collect();
        let mut samples: Vec<Vec<(Run, f64)>> = vec![Vec::new(); measured.len()];
        for (server, port, _) in &measured {
            // Warm caches (outside names) and code paths.
            dnsperf(c, *port, queries, 1).with_context(|| format!("warming {server}"))?;
        }
        for _round in 0..ROUNDS {
            for (i, (_, port, pid)) in measured.iter().enumerate() {
                let before = pid.map(cpu_seconds).unwrap_or(0.0);
                let run = dnsperf(c, *port, queries, seconds)?;
                let cpu = pid.map(cpu_seconds).unwrap_or(0.0) - before;
                samples[i].push((run, cpu));
            }
        }
        for ((server, _, pid), runs) in measured.iter().zip(samples) {
            let row = row(server, names, &runs, pid.map(peak_rss_mb).unwrap_or(0.0));
            eprintln!(
                "   {server:<8} {names:<8} {:>9.0} qps ({:.0}-{:.0}) {:>9.0}/cpu-s avg {:>6.0}us lost {}",
                row.qps.median,
                row.qps.min,
                row.qps.max,
                row.per_cpu_second.median,
                row.avg_latency_us,
                row.lost
            );
            rows.push(row);
        }
    }
    for (names, reference) in [("cluster", "knot"), ("outside", "unbound")] {
        let base = rows
            .iter()
            .find(|r| r.names == names && r.server == reference)
            .map(|r| (r.qps.median, r.per_cpu_second.median))
            .unwrap_or_default();
        let ratio = |v: f64, b: f64| if b > 0.0 { v / b } else { 0.0 };
        for r in rows.iter_mut().filter(|r| r.names == names) {
            r.vs_reference = ratio(r.qps.median, base.0);
            r.vs_reference_per_cpu = ratio(r.per_cpu_second.median, base.1);
        }
    }
    Ok(rows)
}

/// One row from the rounds of one server.
fn row(server: &'static str, names: &'static str, runs: &[(Run, f64)], rss_mb: f64) -> DnsRow {
    let per_cpu = runs
        .iter()
        .map(|(r, cpu)| {
            if *cpu > 0.0 {
                r.completed as f64 / cpu
            } else {
                0.0
            }
        })
        .collect();
    let mut latencies: Vec<f64> = runs.iter().map(|(r, _)| r.latency_us).collect();
    latencies.sort_by(f64::total_cmp);
    DnsRow {
        server,
        names,
        qps: Spread::of(runs.iter().map(|(r, _)| r.qps).collect()),
        per_cpu_second: Spread::of(per_cpu),
        avg_latency_us: latencies.get(latencies.len() / 2).copied().unwrap_or(0.0),
        lost: runs.iter().map(|(r, _)| r.lost).sum(),
        rss_mb,
        vs_reference: 0.0,
        vs_reference_per_cpu: 0.0,
    }
}

/// Freshness: the agent logs how long each change took to reach the zone.
fn freshness(c: &mut Cluster, per_service: usize) -> DnsFreshness {
    let before = c.agent_log_values("dns updated", "latency_us").len();
    for step in 1..=50 {
        c.write_manifest("churn.yaml", &workload::churn(per_service, step));
        std::thread::sleep(Duration::from_millis(30));
    }
    // Syncs batch changes that arrive while one runs (a slow iptables sync at scale
    // takes several), so wait until the count stops growing.
    let mut seen = 0;
    let settled = |c: &Cluster, seen: &mut usize| {
        let now = c.agent_log_values("dns updated", "latency_us").len();
        let done = now > before && now == *seen;
        *seen = now;
        done
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !settled(c, &mut seen) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
    }
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
        mode: c.mode().flag(),
        changes: latencies.len(),
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    }
}
