//! `cargo xtask bench`: every performance number Ferry claims, measured side by side
//! with its baselines in one run, on network namespaces built for the purpose.
//!
//! Traffic: new-connection, keep-alive and UDP request rates plus p50/p99 latency from
//! a pod to one service, at 1, 1,000 and 10,000 services (the measured service is the
//! last one added), for: direct to the pod (the limit), Ferry eBPF, nftables and
//! iptables (kube-proxy's layout), kube-proxy's own iptables (legacy and nft
//! backends) and nftables layouts ([`baselines`]), and HAProxy as a userspace proxy
//! (what kube-proxy's old userspace mode did).
//!
//! Scale: 10,000 services with 100,000 endpoints per mode: time to first full
//! programming, one endpoint change to programmed (p50/p99 over 100 changes), peak
//! RSS and CPU seconds of the agent.

mod baselines;
mod dns;
mod plot;
mod workload;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferry_tests::cluster::NODE_IP;
use ferry_tests::{Cluster, From, Mode};
use serde::Serialize;

/// One measured data point of the traffic benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct TrafficRow {
    pub scenario: &'static str,
    pub services: usize,
    pub mode: &'static str,
    pub rate: f64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    /// Rate relative to the direct-to-pod rate at the same level.
    pub vs_direct: f64,
}

/// One row of the scale benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRow {
    pub mode: &'static str,
    pub services: usize,
    pub endpoints: usize,
    /// Agent start to healthy (loading manifests + first full sync).
    pub ready_seconds: f64,
    /// The first full sync alone, as the agent measured it.
    pub full_sync_ms: u64,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub changes: usize,
    pub peak_rss_mb: f64,
    pub cpu_seconds: f64,
    /// iptables mode: median time to rewrite one service chain unchanged at this table
    /// size, the floor under any endpoint change in kube-proxy's layout.
    pub restore_floor_ms: Option<f64>,
}

/// Everything one run produced.
#[derive(Debug, Serialize)]
pub struct Results {
    pub name: String,
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub quick: bool,
    pub traffic: Vec<TrafficRow>,
    /// kube-proxy's own layouts: what loading them cost.
    pub kube_proxy_programming: Vec<baselines::ProgrammingRow>,
    pub scale: Vec<ScaleRow>,
    pub dns: Vec<dns::DnsRow>,
    pub dns_freshness: Vec<dns::DnsFreshness>,
    /// Queries through a replacement of the agent under load.
    pub dns_restart: Option<dns::DnsRestart>,
    /// Services (and endpoints) loaded into every DNS server.
    pub dns_services: usize,
}

const SCENARIOS: [(&str, &str); 3] = [("connect", "tcp"), ("keep-alive", "tcp"), ("udp", "udp")];

/// What one `cargo xtask bench` measures.
pub struct Plan<'a> {
    /// Smoke run: fewer services, shorter measurements.
    pub quick: bool,
    /// Only this part (`traffic`, `scale`, `dns`).
    pub only: Option<&'a str>,
    pub scale_services: Option<usize>,
    /// Ferry's modes to measure.
    pub modes: &'a [Mode],
}

/// Runs the benchmarks and writes `bench/results/<date>-<name>.{json,md,png}`.
pub fn run(root: &Path, name: &str, plan: &Plan<'_>) -> anyhow::Result<PathBuf> {
    let (quick, only, scale_services) = (plan.quick, plan.only, plan.scale_services);
    // Measure release builds.
    // SAFETY: xtask has not started any thread yet; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("FERRY_BIN_DIR", root.join("target/release")) };
    let (traffic, kube_proxy_programming) = if matches!(only, None | Some("traffic")) {
        traffic_part(root, quick, plan.modes)?
    } else {
        Default::default()
    };
    let (default_services, per_service, changes) = if quick {
        (1000, 10, 20)
    } else {
        (10_000, 10, 100)
    };
    let scale_services = scale_services.unwrap_or(default_services);
    let mut scale = Vec::new();
    if !matches!(only, Some("traffic" | "dns")) {
        for &mode in plan.modes {
            eprintln!("== scale: {} with {scale_services} services", mode.flag());
            scale.push(measure_scale(mode, scale_services, per_service, changes)?);
        }
    }
    let dns = if matches!(only, None | Some("dns")) {
        eprintln!("== dns with {scale_services} services");
        dns::run(scale_services, per_service, if quick { 2 } else { 5 })?
    } else {
        dns::DnsResults::default()
    };
    let results = Results {
        name: name.to_owned(),
        date: jiff::Zoned::now().strftime("%Y-%m-%d").to_string(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        quick,
        traffic,
        kube_proxy_programming,
        scale,
        dns: dns.rows,
        dns_freshness: dns.freshness,
        dns_restart: dns.restart,
        dns_services: scale_services,
    };
    write_results(root, name, &results)
}

/// Connection rates at each service count: direct, HAProxy, Ferry's modes and
/// kube-proxy's own layouts, with each row's ratio to direct; and what loading
/// kube-proxy's layouts cost.
fn traffic_part(
    root: &Path,
    quick: bool,
    modes: &[Mode],
) -> anyhow::Result<(Vec<TrafficRow>, Vec<baselines::ProgrammingRow>)> {
    let levels: &[usize] = if quick { &[1, 100] } else { &[1, 1000, 10_000] };
    let duration = if quick { 1000 } else { 3000 };
    let mut traffic = Vec::new();
    let mut programming = Vec::new();
    for &services in levels {
        eprintln!("== traffic at {services} services");
        let direct = measure_direct(duration)?;
        let direct_rates: Vec<f64> = direct.iter().map(|r| r.rate).collect();
        let mut rows = direct;
        rows.extend(measure_haproxy(duration)?);
        for &mode in modes {
            rows.extend(measure_ferry(mode, services, duration)?);
        }
        for layout in baselines::Layout::ALL {
            eprintln!("   loading {} at {services} services", layout.name());
            let (measured, cost) = baselines::measure(root, layout, services, duration)?;
            rows.extend(measured);
            programming.push(cost);
        }
        for row in &mut rows {
            row.services = services;
            let i = SCENARIOS
                .iter()
                .position(|(s, _)| *s == row.scenario)
                .unwrap_or(0);
            row.vs_direct = if direct_rates[i] > 0.0 {
                row.rate / direct_rates[i]
            } else {
                0.0
            };
        }
        traffic.extend(rows);
    }
    Ok((traffic, programming))
}

/// Writes the JSON, Markdown table and plot; prints the table.
fn write_results(root: &Path, name: &str, results: &Results) -> anyhow::Result<PathBuf> {
    let dir = root.join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let stem = dir.join(format!("{}-{}", results.date, name));
    std::fs::write(
        stem.with_extension("json"),
        serde_json::to_string_pretty(results)?,
    )?;
    let table = markdown(results);
    std::fs::write(stem.with_extension("md"), &table)?;
    plot::rates(results, &stem.with_extension("png"))?;
    println!("{table}");
    println!("wrote {}.{{json,md,png}}", stem.display());
    Ok(stem)
}

fn load_args(scenario: &str, addr: &str, duration_ms: u64) -> Vec<String> {
    [
        scenario,
        addr,
        "--concurrency",
        "4",
        "--duration-ms",
        &duration_ms.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn row(scenario: &'static str, mode: &'static str, report: &serde_json::Value) -> TrafficRow {
    TrafficRow {
        scenario,
        services: 0,
        mode,
        rate: report["rate"].as_f64().unwrap_or(0.0),
        errors: report["errors"].as_u64().unwrap_or(0),
        p50_us: report["p50_us"].as_u64().unwrap_or(0),
        p99_us: report["p99_us"].as_u64().unwrap_or(0),
        vs_direct: 0.0,
    }
}

/// Runs the three scenarios against a TCP and a UDP address.
fn scenarios(
    c: &Cluster,
    mode: &'static str,
    tcp: &str,
    udp: Option<&str>,
    duration: u64,
) -> Vec<TrafficRow> {
    let mut rows = Vec::new();
    for (scenario, proto) in SCENARIOS {
        let addr = match proto {
            "tcp" => tcp,
            _ => match udp {
                Some(a) => a,
                None => continue,
            },
        };
        // Warm up (ARP, conntrack, caches), then measure.
        c.load(From::Pod("client"), &load_args(scenario, addr, 200));
        let report = c.load(From::Pod("client"), &load_args(scenario, addr, duration));
        let r = row(scenario, mode, &report);
        eprintln!(
            "   {mode:<9} {scenario:<10} {:>9.0}/s p50 {:>5}us p99 {:>6}us errors {}",
            r.rate, r.p50_us, r.p99_us, r.errors
        );
        rows.push(r);
    }
    rows
}

/// A node for traffic measurements: a backend pod, a client pod, and the pod egress
/// masquerade rule every CNI installs, so conntrack is active in every mode as it is
/// on a real node (otherwise "direct" would skip a cost every node pays).
fn traffic_cluster(mode: Mode) -> anyhow::Result<Cluster> {
    let c = Cluster::new(mode, &["be0", "client"]);
    // A load generator opens ~10k connections a second: give the client (and the
    // node, where HAProxy opens its own connections) the whole port range and let
    // them reuse TIME_WAIT ports, or the benchmark measures port exhaustion.
    c.node_sysctl(&[
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    c.pod_sysctl(
        "client",
        &[
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    );
    let status = c
        .node_command("iptables")
        .args([
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.244.0.0/16",
            "!",
            "-d",
            "10.244.0.0/16",
            "-j",
            "MASQUERADE",
        ])
        .status()
        .context("iptables")?;
    if !status.success() {
        bail!("cannot add the CNI masquerade rule");
    }
    Ok(c)
}

fn backend_ip(c: &Cluster) -> Ipv4Addr {
    c.pod("be0").ip.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
}

fn measure_direct(duration: u64) -> anyhow::Result<Vec<TrafficRow>> {
    let c = traffic_cluster(Mode::Iptables)?;
    let ip = backend_ip(&c);
    Ok(scenarios(
        &c,
        "direct",
        &format!("{ip}:8080"),
        Some(&format!("{ip}:5353")),
        duration,
    ))
}

/// HAProxy in TCP mode on the node, one frontend to the pod (userspace proxying).
fn measure_haproxy(duration: u64) -> anyhow::Result<Vec<TrafficRow>> {
    let c = traffic_cluster(Mode::Iptables)?;
    let cfg = std::env::temp_dir().join(format!("ferry-bench-haproxy-{}.cfg", std::process::id()));
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\nfrontend svc\n  bind {NODE_IP}:18080\n  default_backend pods\nbackend pods\n  server be0 {}:8080\n",
            backend_ip(&c)
        ),
    )?;
    let mut haproxy: Child = c
        .node_command("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting haproxy (apt package haproxy)")?;
    let addr = format!("{NODE_IP}:18080");
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.tcp(From::Pod("client"), &addr, 1).successes() == 0 {
        if Instant::now() > deadline {
            let _ = haproxy.kill();
            bail!("haproxy did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let rows = scenarios(&c, "haproxy", &addr, None, duration);
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    let _ = std::fs::remove_file(cfg);
    Ok(rows)
}

fn write_workload(c: &Cluster, services: usize, per_service: usize) {
    for (file, yaml) in workload::manifests(services, per_service, backend_ip(c)) {
        c.write_manifest(&file, &yaml);
    }
}

fn measure_ferry(mode: Mode, services: usize, duration: u64) -> anyhow::Result<Vec<TrafficRow>> {
    let mut c = traffic_cluster(mode)?;
    write_workload(&c, services, 2);
    c.start_agent();
    let vip = workload::cluster_ip(services - 1);
    let check = c.tcp(From::Pod("client"), &format!("{vip}:80"), 3);
    if check.successes() != 3 {
        bail!(
            "{} at {services} services: the measured service does not answer: {check:?}",
            mode.flag()
        );
    }
    Ok(scenarios(
        &c,
        mode.flag(),
        &format!("{vip}:80"),
        Some(&format!("{vip}:53")),
        duration,
    ))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure_scale(
    mode: Mode,
    services: usize,
    per_service: usize,
    changes: usize,
) -> anyhow::Result<ScaleRow> {
    let mut c = Cluster::new(mode, &["be0"]);
    write_workload(&c, services, per_service);
    c.write_manifest("churn.yaml", &workload::churn(per_service, 0));
    let started = Instant::now();
    c.start_agent();
    let ready_seconds = started.elapsed().as_secs_f64();
    let full_sync_ms = c
        .agent_log_values("full sync done", "took_ms")
        .first()
        .copied()
        .unwrap_or(0);
    let mut latencies = Vec::new();
    for step in 1..=changes {
        let before = c.agent_log_values("sync done", "programming_us").len();
        c.write_manifest("churn.yaml", &workload::churn(per_service, step));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let values = c.agent_log_values("sync done", "programming_us");
            if values.len() > before {
                latencies.push(values[values.len() - 1] as f64 / 1000.0);
                break;
            }
            if Instant::now() > deadline {
                let log = c.agent_log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "{}: change {step} was not programmed within 20 s; the agent's last lines:\n{}",
                    mode.flag(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    latencies.sort_by(f64::total_cmp);
    let pid = c.agent_pid().context("agent not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let peak_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" of comm: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<f64> = after
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu_seconds =
        (fields.get(11).copied().unwrap_or(0.0) + fields.get(12).copied().unwrap_or(0.0)) / ticks;
    let restore_floor_ms = (mode == Mode::Iptables).then(|| restore_floor(&c));
    let row = ScaleRow {
        mode: mode.flag(),
        services,
        endpoints: services * per_service,
        ready_seconds,
        full_sync_ms,
        change_p50_ms: percentile(&latencies, 0.5),
        change_p99_ms: percentile(&latencies, 0.99),
        changes: latencies.len(),
        peak_rss_mb: peak_kb / 1024.0,
        cpu_seconds,
        restore_floor_ms,
    };
    eprintln!("   {row:?}");
    Ok(row)
}

/// Median time of an `iptables-restore --noflush` that rewrites the churn service's
/// KUBE-SVC chain with exactly the rules it already has: what any endpoint change
/// costs in kube-proxy's layout, whoever writes it (the kernel re-validates every
/// jump of the table when a reachable chain gains jumps).
fn restore_floor(c: &Cluster) -> f64 {
    use std::io::Write as _;
    let rules_of = |chain: &str| -> Vec<String> {
        c.node_command("iptables")
            .args(["-w", "-t", "nat", "-S", chain])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let Some(chain) = rules_of("KUBE-SERVICES")
        .iter()
        .find(|l| l.contains("bench/churn:http cluster IP"))
        .and_then(|l| l.rsplit(' ').next().map(str::to_owned))
    else {
        return 0.0;
    };
    let mut payload = format!("*nat\n:{chain} - [0:0]\n");
    for rule in rules_of(&chain).iter().filter(|l| l.starts_with("-A ")) {
        payload.push_str(rule);
        payload.push('\n');
    }
    payload.push_str("COMMIT\n");
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let child = c
            .node_command("iptables-restore")
            .args(["-w", "--noflush"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut child) = child {
            if let Some(mut stdin) = child.stdin.take() {
                let _ = stdin.write_all(payload.as_bytes());
            }
            let _ = child.wait();
        }
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The results as markdown tables.
pub fn markdown(r: &Results) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Ferry benchmark {} ({}{})\n\nKernel {}, {} CPUs. All numbers from one run of `cargo xtask bench{}`; ratios are against direct-to-pod at the same service count.\n",
        r.name,
        r.date,
        if r.quick { ", quick" } else { "" },
        r.kernel,
        r.cpus,
        if r.quick { " --quick" } else { "" }
    );
    traffic_table(r, &mut out);
    kube_proxy_table(r, &mut out);
    scale_table(r, &mut out);
    dns_table(r, &mut out);
    let _ = writeln!(
        out,
        "\n\"one change\" is measured by the agent from the moment the change reaches its proxy loop to the moment the kernel is programmed ({} changes); \"ready\" includes reading and parsing all manifests.",
        r.scale.first().map(|s| s.changes).unwrap_or(0)
    );
    out
}

fn traffic_table(r: &Results, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "## Traffic: one client pod, 4 concurrent clients, to the last service added\n"
    );
    let _ = writeln!(
        out,
        "| scenario | services | mode | rate (req/s) | vs direct | p50 (µs) | p99 (µs) | errors |"
    );
    let _ = writeln!(out, "|---|---:|---|---:|---:|---:|---:|---:|");
    for row in &r.traffic {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.2}x | {} | {} | {} |",
            row.scenario,
            row.services,
            row.mode,
            row.rate,
            row.vs_direct,
            row.p50_us,
            row.p99_us,
            row.errors
        );
    }
}

fn kube_proxy_table(r: &Results, out: &mut String) {
    use std::fmt::Write as _;
    if r.kube_proxy_programming.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n## kube-proxy's own layouts: programming (gen_rules.py, 2 endpoints per service)\n"
    );
    let _ = writeln!(
        out,
        "| layout | services | full load (s) | one-service partial sync (ms) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for p in &r.kube_proxy_programming {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} | {:.0} |",
            p.layout, p.services, p.full_load_seconds, p.partial_ms
        );
    }
    let _ = writeln!(
        out,
        "\nAt the 1-service level the layouts hold 2 services (the measured one last): the generator's partial sync changes another service."
    );
}

fn scale_table(r: &Results, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "\n## Scale: agent control plane\n");
    let _ = writeln!(
        out,
        "| mode | services | endpoints | ready (s) | first full sync (ms) | one change p50 (ms) | p99 (ms) | peak RSS (MB) | CPU (s) | rewrite one chain, unchanged (ms) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &r.scale {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.2} | {} | {:.2} | {:.2} | {:.0} | {:.2} | {} |",
            s.mode,
            s.services,
            s.endpoints,
            s.ready_seconds,
            s.full_sync_ms,
            s.change_p50_ms,
            s.change_p99_ms,
            s.peak_rss_mb,
            s.cpu_seconds,
            s.restore_floor_ms
                .map(|f| format!("{f:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    let _ = writeln!(
        out,
        "\n\"Rewrite one chain, unchanged\" is the time iptables-restore takes to rewrite one service's KUBE-SVC chain with the rules it already has, at that table size: the least any endpoint change costs in kube-proxy's rule layout, whoever writes it (nf_tables re-validates every jump of the table when a reachable chain gains jumps). iptables mode cannot go below it; eBPF mode does not pay it."
    );
}

fn dns_table(r: &Results, out: &mut String) {
    use std::fmt::Write as _;
    if !r.dns.is_empty() {
        let _ = writeln!(
            out,
            "\n## DNS: dnsperf (4 clients, 2 threads) on the node's loopback, {} services with {} endpoints loaded\n",
            r.dns_services,
            r.dns_services * 10
        );
        let _ = writeln!(
            out,
            "Each server's threads are pinned to CPU 0 and dnsperf to CPU 1; figures are the median of {} interleaved rounds (min–max in brackets). \"Per CPU-second\" is answers per second of the server's own CPU time (from /proc), the cost to the node; on a 2-CPU machine dnsperf saturates its core, so raw QPS understates the servers.\n",
            dns::ROUNDS
        );
        let _ = writeln!(
            out,
            "| names | server | QPS | vs reference | per CPU-second | vs reference | avg latency (µs) | lost | peak RSS (MB) |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
        for d in &r.dns {
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} ({:.0}–{:.0}) | {:.2}x | {:.0} ({:.0}–{:.0}) | {:.2}x | {:.0} | {} | {:.0} |",
                d.names,
                d.server,
                d.qps.median,
                d.qps.min,
                d.qps.max,
                d.vs_reference,
                d.per_cpu_second.median,
                d.per_cpu_second.min,
                d.per_cpu_second.max,
                d.vs_reference_per_cpu,
                d.avg_latency_us,
                d.lost,
                d.rss_mb
            );
        }
        let _ = writeln!(
            out,
            "\nReference: Knot DNS for cluster names (authoritative), Unbound for outside names (forwarded once, then cached; Knot does not forward). Ferry's RSS and CPU are the whole agent's, data plane included."
        );
    }
    for f in &r.dns_freshness {
        let _ = writeln!(
            out,
            "\nDNS freshness ({}): a changed service is answered {:.0} µs (p50) / {:.0} µs (p99) after the event reaches the agent, its frontend programmed first ({} changes).",
            f.mode, f.p50_us, f.p99_us, f.changes
        );
    }
    if let Some(x) = &r.dns_restart {
        let _ = writeln!(
            out,
            "\nAgent replaced under load (a successor takes the DNS sockets over, the old agent gets SIGTERM): {} queries, {} lost, {} SERVFAIL.",
            x.queries, x.lost, x.servfail
        );
    }
}
