//! `ferry monitor`: prints the eBPF socket programs' decisions as they happen (from
//! the pinned ring buffer, see [`crate::dataplane::ebpf::monitor`]), named after the
//! running agent's frontends, and says what the kernel's rate limit left out.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::dataplane::ebpf::monitor::{EventView, Monitor};
use crate::dataplane::ebpf::names::FrontendName;

/// How often the names are asked again when an event's frontend has none.
const RENAME_EVERY: Duration = Duration::from_secs(2);

/// What `ferry monitor` was asked for.
pub struct MonitorOptions {
    /// Events per CPU per second.
    pub rate: u64,
    /// Stop after this many.
    pub count: Option<u64>,
    /// JSON lines.
    pub json: bool,
    /// The agent's metrics address (for names).
    pub address: SocketAddr,
}

/// The names of the agent's frontends (`/frontends`), or none when no agent answers:
/// the kernel's state is shown either way.
pub fn frontend_names(address: SocketAddr) -> Vec<FrontendName> {
    crate::status::get_json(address, "/frontends").unwrap_or_default()
}

/// Prints events until Ctrl-C or `count` of them; a killed monitor's lease runs out
/// by itself, so the programs stop writing events seconds later.
pub fn run(pin_dir: &Path, options: &MonitorOptions) -> anyhow::Result<()> {
    let mut monitor = Monitor::open(pin_dir).with_context(|| {
        format!(
            "opening the monitor's maps in {} (is ferry running in eBPF mode?)",
            pin_dir.display()
        )
    })?;
    let mut names = frontend_names(options.address);
    let mut named_at = Instant::now();
    let mut losses = monitor.losses();
    let mut left = options.count.unwrap_or(u64::MAX);
    let mut out = std::io::stdout().lock();
    eprintln!(
        "monitor: at most {} events per CPU per second",
        options.rate
    );
    while left > 0 {
        monitor
            .listen(options.rate)
            .context("renewing the monitor's lease")?;
        let mut events = Vec::new();
        monitor.read(Duration::from_millis(100), |e| events.push(*e));
        for event in &events {
            let mut view = EventView::of(event, &names);
            if view.service.is_none() && named_at.elapsed() >= RENAME_EVERY {
                names = frontend_names(options.address);
                named_at = Instant::now();
                view = EventView::of(event, &names);
            }
            let line = match options.json {
                true => serde_json::to_string(&view)?,
                false => view.line(),
            };
            writeln!(out, "{line}")?;
            left -= 1;
            if left == 0 {
                break;
            }
        }
        out.flush()?;
        let now = monitor.losses();
        if now != losses {
            eprintln!(
                "monitor: so far {} event(s) over the rate, {} lost to a full ring",
                now.0, now.1
            );
            losses = now;
        }
    }
    monitor.stop();
    Ok(())
}
