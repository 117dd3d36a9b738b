//! Process and kernel settings applied once at start, as kube-proxy applies them: the
//! agent's `oom_score_adj`, the locked-memory limit eBPF maps need on kernels before
//! 5.11, the open-files limit (up to its hard limit), and the conntrack table size and timeouts (`/proc/sys/net/netfilter`).
//! A setting the kernel refuses is a warning, never a reason not to start.

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

/// What to apply; zero values leave the kernel's setting alone (kube-proxy's rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSettings {
    pub oom_score_adj: i32,
    /// Raise RLIMIT_MEMLOCK (eBPF mode).
    pub unlimited_memlock: bool,
    pub conntrack: ConntrackSettings,
}

/// kube-proxy's `conntrack` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    pub max_per_core: u32,
    pub min: u32,
    pub tcp_established_timeout: Duration,
    pub tcp_close_wait_timeout: Duration,
    pub tcp_be_liberal: bool,
    pub udp_timeout: Duration,
    pub udp_stream_timeout: Duration,
}

const NETFILTER: &str = "/proc/sys/net/netfilter";
const HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";

impl ConntrackSettings {
    /// `nf_conntrack_max` to set: max_per_core × CPUs, at least `min`; `None` when
    /// max_per_core is 0 (leave the limit alone, and `min` with it).
    pub fn max(&self, cpus: u32) -> Option<u64> {
        if self.max_per_core == 0 {
            return None;
        }
        let scaled = u64::from(self.max_per_core) * u64::from(cpus);
        Some(scaled.max(u64::from(self.min)))
    }

    /// The `net/netfilter` sysctls to write besides the limit, in whole seconds.
    pub fn sysctls(&self) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        let timeouts = [
            (
                "nf_conntrack_tcp_timeout_established",
                self.tcp_established_timeout,
            ),
            (
                "nf_conntrack_tcp_timeout_close_wait",
                self.tcp_close_wait_timeout,
            ),
            ("nf_conntrack_udp_timeout", self.udp_timeout),
            ("nf_conntrack_udp_timeout_stream", self.udp_stream_timeout),
        ];
        for (name, timeout) in timeouts {
            if timeout.as_secs() > 0 {
                out.push((name, timeout.as_secs()));
            }
        }
        if self.tcp_be_liberal {
            out.push(("nf_conntrack_tcp_be_liberal", 1));
        }
        out
    }
}

impl NodeSettings {
    /// Applies everything, logging what the kernel refuses.
    pub fn apply(&self) {
        if let Err(e) = std::fs::write("/proc/self/oom_score_adj", self.oom_score_adj.to_string()) {
            warn!(oom_score_adj = self.oom_score_adj, error = %e, "cannot set the agent's oom_score_adj");
        }
        if self.unlimited_memlock {
            raise_memlock();
        }
        raise_open_files();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let max = self.conntrack.max(cpus);
        let sysctls = self.conntrack.sysctls();
        if max.is_some() || !sysctls.is_empty() {
            ensure_conntrack_loaded();
        }
        if let Some(max) = max {
            set_conntrack_max(max);
        }
        for (name, value) in sysctls {
            set_if_different(&Path::new(NETFILTER).join(name), value);
        }
    }
}

/// The conntrack sysctls exist only once the kernel has conntrack loaded.
fn ensure_conntrack_loaded() {
    if Path::new(NETFILTER).join("nf_conntrack_max").exists() {
        return;
    }
    if let Err(e) = crate::dataplane::conntrack::load_kernel_modules() {
        warn!(error = %e, "cannot have the kernel load conntrack; its settings may not apply");
    }
}

/// The file-descriptor limit up to its hard limit: the soft default (often 1024) is
/// far below what DNS sockets, upstream queries, HTTP connections and netlink use at
/// scale, while the hard limit is what the node allows the agent.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(soft, hard, error = %e, "cannot raise the open-files limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// Maps and programs count against RLIMIT_MEMLOCK before kernel 5.11 (memory cgroup
/// accounting since); an unlimited limit keeps large maps loadable there.
fn raise_memlock() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    if setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return;
    }
    // Without CAP_SYS_RESOURCE, the hard limit is as far as it goes.
    let raised = getrlimit(Resource::RLIMIT_MEMLOCK)
        .and_then(|(_, hard)| setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard));
    info!(
        ?raised,
        "RLIMIT_MEMLOCK stays limited (no CAP_SYS_RESOURCE): large eBPF maps may fail to load on kernels before 5.11"
    );
}

/// The conntrack limit, and the hash table size with it (a quarter of the limit, as
/// kube-proxy sets it) when smaller and /sys is writable.
fn set_conntrack_max(max: u64) {
    set_if_different(&Path::new(NETFILTER).join("nf_conntrack_max"), max);
    let Some(hashsize) = read_number(Path::new(HASHSIZE)) else {
        return;
    };
    if hashsize >= max / 4 {
        return;
    }
    if !sysfs_writable() {
        warn!(
            "/sys is read-only: cannot raise the conntrack hash size; problems may arise later under many connections"
        );
        return;
    }
    set_if_different(Path::new(HASHSIZE), max / 4);
}

/// Whether the first sysfs mount is read-write.
fn sysfs_writable() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|mounts| {
            mounts.lines().find_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                (fields.get(2) == Some(&"sysfs")).then(|| {
                    fields
                        .get(3)
                        .is_some_and(|o| o.split(',').next() == Some("rw"))
                })
            })
        })
        .unwrap_or(false)
}

fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Writes `value` unless it is already there.
fn set_if_different(path: &Path, value: u64) {
    if read_number(path) == Some(value) {
        return;
    }
    match std::fs::write(path, value.to_string()) {
        Ok(()) => info!(setting = %path.display(), value, "set"),
        Err(e) => warn!(setting = %path.display(), value, error = %e, "cannot set"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_goes_up_to_its_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Lowered far enough to show the raise, not so far that the other tests of
        // this process run out of descriptors meanwhile.
        let low = hard.min(4096) / 2;
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        raise_open_files();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
    }

    fn defaults() -> ConntrackSettings {
        ConntrackSettings {
            max_per_core: 32_768,
            min: 131_072,
            tcp_established_timeout: Duration::from_secs(86_400),
            tcp_close_wait_timeout: Duration::from_secs(3_600),
            tcp_be_liberal: false,
            udp_timeout: Duration::ZERO,
            udp_stream_timeout: Duration::ZERO,
        }
    }

    #[test]
    fn conntrack_max_scales_with_cpus_above_the_minimum() {
        let c = defaults();
        assert_eq!(c.max(2), Some(131_072), "the minimum wins on small nodes");
        assert_eq!(c.max(8), Some(262_144));
        let off = ConntrackSettings {
            max_per_core: 0,
            ..defaults()
        };
        assert_eq!(off.max(64), None, "0 per core leaves the limit alone");
    }

    #[test]
    fn only_nonzero_timeouts_are_written() {
        assert_eq!(
            defaults().sysctls(),
            [
                ("nf_conntrack_tcp_timeout_established", 86_400),
                ("nf_conntrack_tcp_timeout_close_wait", 3_600)
            ]
        );
        let c = ConntrackSettings {
            tcp_established_timeout: Duration::ZERO,
            tcp_close_wait_timeout: Duration::ZERO,
            udp_timeout: Duration::from_secs(30),
            tcp_be_liberal: true,
            ..defaults()
        };
        assert_eq!(
            c.sysctls(),
            [
                ("nf_conntrack_udp_timeout", 30),
                ("nf_conntrack_tcp_be_liberal", 1)
            ]
        );
    }
}
