//! `ferry monitor`: the socket programs' decisions, live, from the pinned ring
//! buffer. The monitor holds a lease (`ferry_monitor_v1`) the programs check before
//! writing an event, and sets how many events each CPU may write per second, so a
//! node pays nothing while no one watches and a bounded cost while someone does; a
//! killed monitor's lease runs out by itself.
//!
//! The ring has one reader: two monitors at once share the events between them.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use ferry_common::{MonitorEvent, MonitorWindow, maps, monitor};
use serde::Serialize;

use super::kernel::open;
use super::layout::{protocol_name, words_addr};
use super::names::FrontendName;
use super::node_local_dns::monotonic_ns;
use super::state::MapError;

/// How long a lease lasts; renewed every [`RENEW`], so a monitor that stops
/// renewing (killed) ends the events this long after.
const LEASE: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(1);

/// One decision, for display.
#[derive(Debug, Serialize)]
pub struct EventView {
    /// `forwarded`, `rejected`, `dropped` or `no_port`.
    pub verdict: &'static str,
    pub protocol: &'static str,
    /// The address the application asked for.
    pub service_address: String,
    /// `namespace/name:port` when the agent named the frontend.
    pub service: Option<String>,
    /// The backend chosen (forwarded only).
    pub backend: Option<String>,
    /// The socket's network namespace (`bpf_get_netns_cookie`).
    pub netns_cookie: u64,
}

impl EventView {
    /// Decodes a ring entry, naming its frontend from `names` (the agent's
    /// `/frontends`).
    pub fn of(event: &MonitorEvent, names: &[FrontendName]) -> Self {
        let address = SocketAddr::new(
            words_addr(event.service_addr, event.family),
            u16::from_be(event.service_port),
        );
        let protocol = protocol_name(event.proto);
        let frontend = format!("{address}/{protocol}");
        let service = names
            .iter()
            .find(|n| n.frontend == frontend)
            .map(FrontendName::service_port);
        let backend = (event.verdict == monitor::FORWARDED).then(|| {
            SocketAddr::new(
                words_addr(event.backend_addr, event.backend_family),
                u16::from_be(event.backend_port),
            )
            .to_string()
        });
        Self {
            verdict: match event.verdict {
                monitor::FORWARDED => "forwarded",
                monitor::REJECTED => "rejected",
                monitor::DROPPED => "dropped",
                _ => "no_port",
            },
            protocol,
            service_address: address.to_string(),
            service,
            backend,
            netns_cookie: event.netns_cookie,
        }
    }

    /// One line for people.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{:<9} {:<4} {}",
            self.verdict, self.protocol, self.service_address
        );
        if let Some(service) = &self.service {
            line.push_str(&format!(" ({service})"));
        }
        if let Some(backend) = &self.backend {
            line.push_str(&format!(" -> {backend}"));
        }
        line.push_str(&format!(" netns {}", self.netns_cookie));
        line
    }
}

/// The monitor's handles on the pinned maps.
pub struct Monitor {
    events: RingBuf<MapData>,
    settings: Array<MapData, u64>,
    windows: PerCpuArray<MapData, MonitorWindow>,
    renewed: Option<Instant>,
}

impl Monitor {
    /// Opens the maps an eBPF-mode agent pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapError> {
        Ok(Self {
            events: open(dir, &maps::EVENTS)?,
            settings: open(dir, &maps::MONITOR)?,
            windows: open(dir, &maps::MONITOR_WINDOW)?,
            renewed: None,
        })
    }

    /// Asks the programs for at most `per_cpu_per_second` events per CPU per second
    /// and renews the lease when it is due.
    pub fn listen(&mut self, per_cpu_per_second: u64) -> Result<(), MapError> {
        if self.renewed.is_some_and(|at| at.elapsed() < RENEW) {
            return Ok(());
        }
        let set = |settings: &mut Array<MapData, u64>, index, value| {
            settings
                .set(index, value, 0)
                .map_err(|source| MapError::Failed {
                    map: maps::MONITOR.name,
                    op: "update",
                    source,
                })
        };
        set(
            &mut self.settings,
            monitor::MAX_PER_SECOND,
            per_cpu_per_second,
        )?;
        let until = monotonic_ns().saturating_add(LEASE.as_nanos() as u64);
        set(&mut self.settings, monitor::LISTENING_UNTIL, until)?;
        self.renewed = Some(Instant::now());
        Ok(())
    }

    /// Ends the lease: the programs stop writing events at once.
    pub fn stop(&mut self) {
        let _ = self.settings.set(monitor::LISTENING_UNTIL, 0, 0);
    }

    /// Waits `interval`, then hands each event in the ring to `each`. The programs
    /// write without waking the reader (see `ebpf/src/observe.rs`), so the ring is
    /// drained on this timer rather than on readiness.
    pub fn read(&mut self, interval: Duration, mut each: impl FnMut(&MonitorEvent)) {
        std::thread::sleep(interval);
        while let Some(item) = self.events.next() {
            if item.len() < size_of::<MonitorEvent>() {
                continue;
            }
            // SAFETY: the programs write whole `MonitorEvent`s (checked length);
            // `read_unaligned` copes with the ring's 8-byte alignment either way.
            let event = unsafe { item.as_ptr().cast::<MonitorEvent>().read_unaligned() };
            each(&event);
        }
    }

    /// Events not written so far: (over the rate, ring full), summed over CPUs.
    pub fn losses(&self) -> (u64, u64) {
        self.windows
            .get(&0, 0)
            .map(|w| {
                w.iter()
                    .fold((0, 0), |(s, l), w| (s + w.suppressed, l + w.lost))
            })
            .unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ebpf::layout::frontend_key;

    #[test]
    fn an_event_reads_as_the_connection_it_was() {
        let key = frontend_key("10.96.0.10".parse().unwrap(), 80, 6);
        let backend = frontend_key("10.0.1.5".parse().unwrap(), 8080, 6);
        let event = MonitorEvent {
            ktime_ns: 1,
            netns_cookie: 4096,
            service_addr: key.addr,
            backend_addr: backend.addr,
            service_port: key.port,
            backend_port: backend.port,
            proto: 6,
            family: key.family,
            backend_family: backend.family,
            verdict: monitor::FORWARDED,
        };
        let names = [FrontendName {
            id: 1,
            frontend: "10.96.0.10:80/TCP".into(),
            service: "default/web".into(),
            port: "http".into(),
        }];
        let view = EventView::of(&event, &names);
        assert_eq!(
            view.line(),
            "forwarded TCP  10.96.0.10:80 (default/web:http) -> 10.0.1.5:8080 netns 4096"
        );
        let refused = MonitorEvent {
            verdict: monitor::REJECTED,
            ..event
        };
        let view = EventView::of(&refused, &[]);
        assert_eq!(view.backend, None);
        assert_eq!(view.line(), "rejected  TCP  10.96.0.10:80 netns 4096");
    }
}
