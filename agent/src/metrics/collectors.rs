//! Metrics read at scrape time: the process metrics every Kubernetes component
//! exports (`process_*`), Ferry's build info, and the eBPF data path's counters.

use std::fmt::Error;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::dataplane::ebpf::inspect;
use crate::dataplane::ebpf::names::FrontendNames;

/// `process_*` from /proc/self, as Prometheus client libraries define them.
#[derive(Debug)]
pub struct Process;

/// What /proc/self/stat and friends say about this process.
#[derive(Debug, Default, PartialEq)]
struct ProcessStat {
    cpu_seconds: f64,
    start_time_seconds: f64,
    virtual_bytes: f64,
    resident_bytes: f64,
}

impl ProcessStat {
    /// Parses /proc/self/stat (fields after the parenthesised command name, which
    /// may contain spaces), given the clock tick, page size and boot time.
    fn parse(stat: &str, ticks: f64, page: f64, boot_time: f64) -> Option<Self> {
        let after_comm = stat.get(stat.rfind(')')? + 2..)?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        // Field numbers of proc(5), minus the 3 before this slice (pid, comm, state
        // is fields[0]).
        let at = |n: usize| fields.get(n - 3)?.parse::<f64>().ok();
        Some(Self {
            cpu_seconds: (at(14)? + at(15)?) / ticks,
            start_time_seconds: boot_time + at(22)? / ticks,
            virtual_bytes: at(23)?,
            resident_bytes: at(24)? * page,
        })
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        // SAFETY: sysconf only reads configuration values.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        Self::parse(&stat, ticks as f64, page as f64, boot_time)
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64) -> Result<(), Error> {
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        if let Some(stat) = ProcessStat::read() {
            let cpu = ConstCounter::new(stat.cpu_seconds);
            let help = "Total user and system CPU time spent in seconds";
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                help,
                None,
                cpu.metric_type(),
            )?)?;
            let e = &mut encoder;
            gauge(
                e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                stat.resident_bytes,
            )?;
            gauge(
                e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                stat.virtual_bytes,
            )?;
            let help = "Start time of the process since unix epoch in seconds";
            gauge(
                e,
                "process_start_time_seconds",
                help,
                stat.start_time_seconds,
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            gauge(
                &mut encoder,
                "process_open_fds",
                "Number of open file descriptors",
                fds.count() as f64,
            )?;
        }
        if let Ok((soft, _)) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        {
            let help = "Maximum number of open file descriptors";
            gauge(&mut encoder, "process_max_fds", help, soft as f64)?;
        }
        Ok(())
    }
}

/// `ferry_build_info{version}` 1, as `kubernetes_build_info` tells which build runs.
#[derive(Debug)]
pub struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let g = ConstGauge::new(1i64);
        let help = "The Ferry build running: always 1, its version as a label";
        let mut family =
            encoder.encode_descriptor("ferry_build_info", help, None, g.metric_type())?;
        g.encode(family.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)
    }
}

/// Where the eBPF data plane's counters are, once it runs.
#[derive(Debug)]
pub struct DatapathExport {
    /// The bpffs directory of the pinned maps.
    pub pins: PathBuf,
    /// The service port of each frontend id.
    pub names: FrontendNames,
}

/// `ferry_ebpf_datapath_events_total{event}`: what the socket programs did, summed
/// over CPUs from the pinned stats map, and `ferry_service_connections_total`: the
/// same per service frontend (both absent until the eBPF data plane runs).
#[derive(Debug)]
pub struct Datapath(pub Arc<OnceLock<DatapathExport>>);

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let Some(export) = self.0.get() else {
            return Ok(());
        };
        per_service(&mut encoder, export)?;
        let Ok(counters) = inspect::counters(&export.pins) else {
            return Ok(());
        };
        let help = "Events of the eBPF socket programs (translated, rejected, dropped, no_port, missing, reversed)";
        let mut family = encoder.encode_descriptor(
            "ferry_ebpf_datapath_events",
            help,
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (event, count) in counters {
            ConstCounter::new(count).encode(family.encode_family(&[("event", event)])?)?;
        }
        Ok(())
    }
}

/// `ferry_service_connections_total{service,port,frontend,result}`: connect() and
/// unconnected sendmsg() calls to each programmed frontend, by outcome (only
/// outcomes that happened, of frontends used since they were programmed).
fn per_service(encoder: &mut DescriptorEncoder, export: &DatapathExport) -> Result<(), Error> {
    let Ok(counters) = inspect::frontend_counters(&export.pins) else {
        return Ok(());
    };
    let names = export.names.by_id();
    let help = "Connections (connect, unconnected UDP sendmsg) to a service frontend, by result (forwarded, rejected, dropped)";
    let mut family = encoder.encode_descriptor(
        "ferry_service_connections",
        help,
        None,
        ConstCounter::new(0u64).metric_type(),
    )?;
    for (id, c) in counters {
        let Some(name) = names.get(&id) else {
            continue;
        };
        for (result, n) in [
            ("forwarded", c.forwarded),
            ("rejected", c.rejected),
            ("dropped", c.dropped),
        ] {
            if n == 0 {
                continue;
            }
            let labels = [
                ("service", name.service.as_str()),
                ("port", name.port.as_str()),
                ("frontend", name.frontend.as_str()),
                ("result", result),
            ];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_is_parsed_past_a_command_name_with_spaces() {
        // pid (comm) state ppid ... utime(14)=300 stime(15)=100 ... starttime(22)=500
        // vsize(23)=4096000 rss(24)=10
        let stat = "42 (ferry agent) S 1 42 42 0 -1 4194560 100 0 0 0 300 100 0 0 20 0 3 0 500 4096000 10 18446744073709551615";
        let s = ProcessStat::parse(stat, 100.0, 4096.0, 1_000.0).unwrap();
        assert_eq!(
            s,
            ProcessStat {
                cpu_seconds: 4.0,
                start_time_seconds: 1_005.0,
                virtual_bytes: 4_096_000.0,
                resident_bytes: 40_960.0,
            }
        );
        assert_eq!(ProcessStat::parse("garbage", 100.0, 4096.0, 0.0), None);
    }
}
