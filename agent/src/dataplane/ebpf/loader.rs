//! Loading the socket-LB programs, attaching them to a cgroup, and keeping them
//! attached across agent restarts.
//!
//! Everything lives under one bpffs directory: the maps (pinned by name) and
//! `links/`, the pinned cgroup links. A pinned link stays attached when the agent
//! exits or is killed, so new connections keep being balanced while it is down. A
//! starting agent attaches fresh programs next to the old ones (both may run: once
//! the first has rewritten a service address to a backend, the second finds nothing
//! to do), then detaches the old links, so there is no moment without a hook.

use std::fs::File;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use ferry_common::maps;
use tracing::{debug, info};

/// The programs, by the names `ferry-ebpf` exports.
pub const PROGRAMS: [&str; 8] = [
    "ferry_connect4",
    "ferry_connect6",
    "ferry_sendmsg4",
    "ferry_sendmsg6",
    "ferry_recvmsg4",
    "ferry_recvmsg6",
    "ferry_getpeername4",
    "ferry_getpeername6",
];

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry"));

/// Failure to set up the eBPF data plane.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning: {0}")]
    Pin(String),
    #[error("{0}")]
    Setup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadError {
    let what = what.into();
    move |source| LoadError::Io { what, source }
}

/// Map sizes (max entries), configurable because a map that fills up refuses new
/// services (counted in `ferry_ebpf_map_full_errors_total`).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub frontends: u32,
    pub backends: u32,
    pub affinity: u32,
    /// Sockets whose service address is remembered for recvmsg/getpeername.
    pub sockets: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: 65_536,
            backends: 262_144,
            affinity: 65_536,
            sockets: 262_144,
        }
    }
}

/// Mount points of a type, from /proc/mounts.
fn mounts_of(fstype: &str) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == fstype).then(|| PathBuf::from(path))
        })
        .collect()
}

/// The cgroup v2 root (the default attach point).
pub fn cgroup2_root() -> Option<PathBuf> {
    mounts_of("cgroup2").into_iter().next()
}

/// Makes sure `pin_dir` is on a bpffs, mounting one at /sys/fs/bpf if needed.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoadError> {
    if mounts_of("bpf").iter().any(|m| pin_dir.starts_with(m)) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(default) {
        return Err(LoadError::Setup(format!(
            "{} is not on a bpf filesystem",
            pin_dir.display()
        )));
    }
    info!("mounting bpffs at /sys/fs/bpf");
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| LoadError::Setup(format!("cannot mount bpffs at /sys/fs/bpf: {e}")))
}

/// Loads the programs (reusing maps already pinned in `pin_dir`), attaches them to
/// `cgroup` and retires the links a previous agent left.
pub fn load_and_attach(pin_dir: &Path, cgroup: &Path, sizes: MapSizes) -> Result<(), LoadError> {
    ensure_bpffs(pin_dir)?;
    let links_dir = pin_dir.join("links");
    std::fs::create_dir_all(&links_dir).map_err(io(format!("creating {}", links_dir.display())))?;
    let cgroup_file =
        File::open(cgroup).map_err(io(format!("opening cgroup {}", cgroup.display())))?;

    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    loader.map_max_entries(maps::FRONTENDS, sizes.frontends);
    loader.map_max_entries(maps::VIPS, sizes.frontends);
    loader.map_max_entries(maps::BACKENDS, sizes.backends);
    loader.map_max_entries(maps::LISTS[0], sizes.frontends);
    loader.map_max_entries(maps::LISTS[1], (sizes.frontends / 4).max(64));
    loader.map_max_entries(maps::LISTS[2], (sizes.frontends / 64).max(64));
    loader.map_max_entries(maps::AFFINITY, sizes.affinity);
    loader.map_max_entries(maps::REVERSE, sizes.sockets);
    let mut ebpf = loader.load(OBJECT)?;

    let old: Vec<PathBuf> = std::fs::read_dir(&links_dir)
        .map_err(io(format!("listing {}", links_dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    // A suffix no earlier run used, so fresh pins never collide with old ones (bpffs
    // forbids dots in names).
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut fresh = Vec::new();
    for name in PROGRAMS {
        let pin = attach(
            &mut ebpf,
            name,
            &cgroup_file,
            &links_dir.join(format!("{name}_{run}")),
        )?;
        fresh.push((pin, links_dir.join(name)));
    }
    for path in &old {
        retire(path)?;
    }
    for (from, to) in fresh {
        std::fs::rename(&from, &to).map_err(io(format!("renaming pin {}", from.display())))?;
    }
    info!(
        cgroup = %cgroup.display(),
        pins = %pin_dir.display(),
        replaced = old.len(),
        "eBPF socket load balancing attached"
    );
    Ok(())
}

fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin: &Path,
) -> Result<PathBuf, LoadError> {
    let program_error = |source| LoadError::Program { name, source };
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or_else(|| LoadError::Setup(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(program_error)?;
    prog.load().map_err(program_error)?;
    // bpf_link attachments (kernel >= 5.7) always coexist with others on the cgroup;
    // the kernel rejects attach flags for them, hence the "default" mode here.
    let id = prog
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_error)?;
    let link = prog.take_link(id).map_err(program_error)?;
    let link: FdLink = link
        .try_into()
        .map_err(|e| LoadError::Pin(format!("{name}: {e}")))?;
    link.pin(pin).map_err(|e| {
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        LoadError::Pin(format!("{name} at {}: {e}{cause}", pin.display()))
    })?;
    debug!(name, pin = %pin.display(), "attached");
    Ok(pin.to_path_buf())
}

/// Detaches and removes one pinned link.
fn retire(path: &Path) -> Result<(), LoadError> {
    let link = PinnedLink::from_pin(path)
        .map_err(|e| LoadError::Pin(format!("opening {}: {e}", path.display())))?;
    // Removing the pin and dropping the last fd destroys the link (detaches it).
    let fd = link
        .unpin()
        .map_err(io(format!("unpinning {}", path.display())))?;
    drop(fd);
    Ok(())
}

/// Detaches every program and removes every map pinned in `pin_dir`.
pub fn cleanup(pin_dir: &Path) -> Result<bool, LoadError> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let links_dir = pin_dir.join("links");
    if links_dir.exists() {
        for entry in std::fs::read_dir(&links_dir).map_err(io("listing links"))? {
            let path = entry.map_err(io("listing links"))?.path();
            retire(&path)?;
        }
        std::fs::remove_dir(&links_dir).map_err(io("removing links directory"))?;
    }
    for entry in std::fs::read_dir(pin_dir).map_err(io("listing pins"))? {
        let path = entry.map_err(io("listing pins"))?.path();
        std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
    }
    std::fs::remove_dir(pin_dir).map_err(io(format!("removing {}", pin_dir.display())))?;
    Ok(true)
}
