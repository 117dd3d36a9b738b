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

use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};
use ferry_common::programs::ProgramSpec;
use ferry_common::{MapSpec, list_max_entries, maps, programs};
use tracing::{debug, info, warn};

/// The compiled eBPF object, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry"));

/// Where bpffs is mounted when the pin directory is not on one yet.
const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

/// Failure to set up the eBPF data plane. Each variant names what it was doing to
/// which path or program; the underlying error is its `source()`.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file-system operation on the pin directory or the cgroup failed.
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pin directory is outside any bpffs, and outside /sys/fs/bpf where the
    /// agent would mount one.
    #[error("{} is not on a bpf filesystem", path.display())]
    NotBpffs { path: PathBuf },
    /// Mounting bpffs failed.
    #[error("cannot mount bpffs at {}", path.display())]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The kernel refused the object (map creation, pinning or reuse of a pin).
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    /// A program the agent attaches is not in the object.
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    /// Loading (verifying) or attaching a program failed.
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A program's attachment is not a bpf_link, so it cannot be pinned.
    #[error("program {name}: its attachment cannot be pinned")]
    NotPinnable {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    /// Pinning a program's link failed.
    #[error("pinning the link of program {name} at {}", path.display())]
    PinLink {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    /// A link pinned by an earlier agent could not be opened.
    #[error("opening pinned link {}", path.display())]
    OpenLink {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
}

/// An [`LoadError::Io`] maker for `map_err`.
fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> LoadError {
    let path = path.to_path_buf();
    move |source| LoadError::Io { op, path, source }
}

/// Map sizes (max entries), configurable because a map that fills up refuses new
/// services (counted in `ferry_ebpf_map_full_errors_total`). Defaults are the sizes
/// compiled into the object (`ferry_common::maps`).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Frontends; the ClusterIP set and the backend-list maps follow it.
    pub frontends: u32,
    /// Distinct backend addresses (and, apart, the backends of affinity frontends).
    pub backends: u32,
    /// ClientIP affinity entries (client, frontend).
    pub affinity: u32,
    /// Sockets whose service address is remembered for recvmsg/getpeername.
    pub sockets: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: maps::FRONTENDS.max_entries,
            backends: maps::BACKENDS.max_entries,
            affinity: maps::AFFINITY.max_entries,
            sockets: maps::REVERSE.max_entries,
        }
    }
}

impl MapSizes {
    /// Every map of the object, with the max entries it gets under these sizes.
    fn max_entries(&self) -> [(MapSpec, u32); 17] {
        let list = |class: usize| (maps::LISTS[class], list_max_entries(class, self.frontends));
        [
            (maps::FRONTENDS, self.frontends),
            // At most one ClusterIP per frontend.
            (maps::VIPS, self.frontends),
            (maps::BACKENDS, self.backends),
            list(0),
            list(1),
            list(2),
            list(3),
            (maps::AFFINITY, self.affinity),
            // Affinity frontends' (frontend, backend) pairs: at most one per backend
            // unless services share backends, which is rare with affinity.
            (maps::AFFINITY_BACKENDS, self.backends),
            (maps::REVERSE, self.sockets),
            (maps::STATS, maps::STATS.max_entries),
            (maps::NODE_LOCAL_DNS, maps::NODE_LOCAL_DNS.max_entries),
            (maps::DNS_ALIVE, maps::DNS_ALIVE.max_entries),
            // One entry per frontend.
            (maps::FRONTEND_COUNTERS, self.frontends),
            (maps::EVENTS, maps::EVENTS.max_entries),
            (maps::MONITOR, maps::MONITOR.max_entries),
            (maps::MONITOR_WINDOW, maps::MONITOR_WINDOW.max_entries),
        ]
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
    let default = Path::new(BPFFS_DEFAULT);
    if !pin_dir.starts_with(default) {
        return Err(LoadError::NotBpffs {
            path: pin_dir.to_path_buf(),
        });
    }
    info!("mounting bpffs at {BPFFS_DEFAULT}");
    nix::mount::mount(
        Some("bpf"),
        default,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| LoadError::Mount {
        path: default.to_path_buf(),
        source,
    })
}

/// Loads the programs (reusing maps already pinned in `pin_dir`), attaches them to
/// `cgroup` and retires the links a previous agent left.
pub fn load_and_attach(pin_dir: &Path, cgroup: &Path, sizes: MapSizes) -> Result<(), LoadError> {
    ensure_bpffs(pin_dir)?;
    let links_dir = pin_dir.join("links");
    std::fs::create_dir_all(&links_dir).map_err(io("creating", &links_dir))?;
    let cgroup_file = File::open(cgroup).map_err(io("opening cgroup", cgroup))?;

    drop_resized_pins(pin_dir, sizes);
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir);
    for (spec, max_entries) in sizes.max_entries() {
        loader.map_max_entries(spec.name, max_entries);
    }
    let mut ebpf = loader.load(OBJECT)?;

    let old: Vec<PathBuf> = std::fs::read_dir(&links_dir)
        .map_err(io("listing", &links_dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let fresh = attach_all(&mut ebpf, &cgroup_file, &links_dir)?;
    for path in &old {
        retire(path)?;
    }
    for (from, to) in fresh {
        std::fs::rename(&from, &to).map_err(io("renaming pinned link", &from))?;
    }
    info!(
        cgroup = %cgroup.display(),
        pins = %pin_dir.display(),
        replaced = old.len(),
        "eBPF socket load balancing attached"
    );
    Ok(())
}

/// Makes the `--bpf-max-*` flags apply to maps an earlier agent pinned at other
/// sizes (the loader would reuse a pinned map as it is): such pins are removed, so
/// the load creates the maps at the new sizes. The programs still attached keep
/// their old maps until the new ones replace them; the first full sync fills the new
/// frontends and backends, while ClientIP affinity and the remembered socket
/// translations of resized maps start empty (said in the log).
fn drop_resized_pins(pin_dir: &Path, sizes: MapSizes) {
    for (spec, wanted) in sizes.max_entries() {
        let pin = pin_dir.join(spec.name);
        let Ok(pinned) = aya::maps::MapData::from_pin(&pin) else {
            continue;
        };
        let Ok(have) = pinned.info().map(|i| i.max_entries()) else {
            continue;
        };
        if have == wanted {
            continue;
        }
        match std::fs::remove_file(&pin) {
            Ok(()) => warn!(
                map = spec.name,
                pinned = have,
                wanted,
                "eBPF map resized: recreated at the size the flags ask for"
            ),
            Err(e) => {
                warn!(map = spec.name, error = %e, "cannot remove a pinned map of another size; it keeps its size")
            }
        }
    }
}

/// Attaches every program, pinning each link under a name no earlier run used.
/// Returns (pinned path, final path) pairs for the caller to rename once the old
/// links are gone.
fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &File,
    links_dir: &Path,
) -> Result<Vec<(PathBuf, PathBuf)>, LoadError> {
    // bpffs forbids dots in names, hence a plain number as the suffix.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    programs::ALL
        .iter()
        .map(|program| {
            let temporary = links_dir.join(format!("{}_{run}", program.name));
            attach(ebpf, program, cgroup, &temporary)?;
            Ok((temporary, links_dir.join(program.name)))
        })
        .collect()
}

/// Loads one program, attaches it to `cgroup` and pins its link at `pin`.
fn attach(
    ebpf: &mut Ebpf,
    program: &ProgramSpec,
    cgroup: &File,
    pin: &Path,
) -> Result<(), LoadError> {
    let name = program.name;
    let program_error = |source| LoadError::Program { name, source };
    let prog: &mut CgroupSockAddr = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?
        .try_into()
        .map_err(program_error)?;
    prog.load().map_err(program_error)?;
    // bpf_link attachments (kernel >= 5.7) always coexist with others on the cgroup;
    // the kernel rejects attach flags for them, hence the "default" mode here.
    let id = prog
        .attach(cgroup, CgroupAttachMode::Single)
        .map_err(program_error)?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(program_error)?
        .try_into()
        .map_err(|source| LoadError::NotPinnable { name, source })?;
    link.pin(pin).map_err(|source| LoadError::PinLink {
        name,
        path: pin.to_path_buf(),
        source,
    })?;
    debug!(name, pin = %pin.display(), "attached");
    Ok(())
}

/// Detaches and removes one pinned link.
fn retire(path: &Path) -> Result<(), LoadError> {
    let link = PinnedLink::from_pin(path).map_err(|source| LoadError::OpenLink {
        path: path.to_path_buf(),
        source,
    })?;
    // Removing the pin and dropping the last fd destroys the link (detaches it).
    let fd = link.unpin().map_err(io("unpinning", path))?;
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
        for path in entries(&links_dir)? {
            retire(&path)?;
        }
        std::fs::remove_dir(&links_dir).map_err(io("removing", &links_dir))?;
    }
    for path in entries(pin_dir)? {
        std::fs::remove_file(&path).map_err(io("removing", &path))?;
    }
    std::fs::remove_dir(pin_dir).map_err(io("removing", pin_dir))?;
    Ok(true)
}

/// The paths in a directory.
fn entries(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    std::fs::read_dir(dir)
        .map_err(io("listing", dir))?
        .map(|entry| entry.map(|e| e.path()).map_err(io("listing", dir)))
        .collect()
}

/// The compiled object against the ABI in `ferry-common`, without loading anything
/// into the kernel (no root): a drifted map or program fails here, not at a root load.
#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aya_obj::generated::{bpf_attach_type, bpf_map_type};
    use aya_obj::maps::PinningType;
    use aya_obj::programs::CgroupSockAddrAttachType;
    use aya_obj::{Object, ProgramSection};
    use ferry_common::MapKind;
    use ferry_common::programs::Hook;

    use super::*;

    fn object() -> Object {
        Object::parse(OBJECT).expect("the embedded eBPF object parses")
    }

    fn map_type(kind: MapKind) -> u32 {
        let ty = match kind {
            MapKind::Hash => bpf_map_type::BPF_MAP_TYPE_HASH,
            MapKind::Array => bpf_map_type::BPF_MAP_TYPE_ARRAY,
            MapKind::LruHash => bpf_map_type::BPF_MAP_TYPE_LRU_HASH,
            MapKind::PerCpuArray => bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
            MapKind::PerCpuHash => bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH,
            MapKind::RingBuf => bpf_map_type::BPF_MAP_TYPE_RINGBUF,
        };
        ty as u32
    }

    fn attach_type(hook: Hook) -> bpf_attach_type {
        use CgroupSockAddrAttachType as T;
        match hook {
            Hook::Connect4 => T::Connect4,
            Hook::Connect6 => T::Connect6,
            Hook::SendMsg4 => T::UDPSendMsg4,
            Hook::SendMsg6 => T::UDPSendMsg6,
            Hook::RecvMsg4 => T::UDPRecvMsg4,
            Hook::RecvMsg6 => T::UDPRecvMsg6,
            Hook::GetPeerName4 => T::GetPeerName4,
            Hook::GetPeerName6 => T::GetPeerName6,
        }
        .into()
    }

    #[test]
    fn object_has_exactly_the_maps_the_loader_sizes() {
        let object = object();
        let expected = MapSizes::default().max_entries();
        for (spec, default_size) in expected {
            let name = spec.name;
            let map = object
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("map {name} is missing from the object"));
            assert_eq!(map.map_type(), map_type(spec.kind), "{name}: map type");
            assert_eq!(map.key_size(), spec.key_size, "{name}: key size");
            assert_eq!(map.value_size(), spec.value_size, "{name}: value size");
            assert_eq!(map.max_entries(), spec.max_entries, "{name}: max entries");
            assert_eq!(map.map_flags(), spec.map_flags, "{name}: flags");
            assert_eq!(map.pinning(), PinningType::ByName, "{name}: pinning");
            assert_eq!(
                default_size, spec.max_entries,
                "{name}: MapSizes::default() resizes it"
            );
        }
        let known: BTreeSet<&str> = expected.iter().map(|(spec, _)| spec.name).collect();
        assert_eq!(known.len(), expected.len(), "a map is sized twice");
        // Data sections (.rodata, .bss, .data) count too: aya would create an extra,
        // unpinned map for each at every load.
        let actual: BTreeSet<&str> = object.maps.keys().map(String::as_str).collect();
        assert_eq!(actual, known, "maps in the object vs maps the loader knows");
    }

    #[test]
    fn object_has_exactly_the_programs_the_loader_attaches() {
        let object = object();
        for program in programs::ALL {
            let name = program.name;
            let section = &object
                .programs
                .get(name)
                .unwrap_or_else(|| panic!("program {name} is missing from the object"))
                .section;
            match section {
                ProgramSection::CgroupSockAddr {
                    attach_type: actual,
                } => assert_eq!(
                    bpf_attach_type::from(*actual),
                    attach_type(program.hook),
                    "{name}: attach type"
                ),
                other => panic!("{name}: section {other:?}, expected cgroup sock_addr"),
            }
        }
        let known: BTreeSet<&str> = programs::ALL.iter().map(|p| p.name).collect();
        assert_eq!(
            known.len(),
            programs::ALL.len(),
            "a program is listed twice"
        );
        let actual: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        assert_eq!(
            actual, known,
            "programs in the object vs programs the loader attaches"
        );
    }

    #[test]
    fn sizes_scale_from_the_flags() {
        let sizes = MapSizes {
            frontends: 1024,
            backends: 10,
            affinity: 20,
            sockets: 30,
        };
        let of = |name: &str| {
            sizes
                .max_entries()
                .into_iter()
                .find(|(spec, _)| spec.name == name)
                .map(|(_, n)| n)
        };
        assert_eq!(of(maps::VIPS.name), Some(1024));
        assert_eq!(of(maps::LISTS[1].name), Some(256));
        assert_eq!(of(maps::LISTS[2].name), Some(64), "floor of 64");
        assert_eq!(of(maps::LISTS[3].name), Some(64));
        assert_eq!(of(maps::REVERSE.name), Some(30));
        assert_eq!(of(maps::STATS.name), Some(maps::STATS.max_entries));
    }
}
