//! Child cgroups (v2) the tests own. eBPF socket hooks are attached to one of these,
//! never to the root, so only the test's own processes are load balanced.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where cgroup v2 is mounted (`/sys/fs/cgroup` or, on hybrid hosts,
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .expect("no cgroup2 mount found")
}

/// A cgroup under `<root>/ferry-tests/`, removed (with everything in it killed) on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Where the cgroup called `name` lives.
    pub fn path_for(name: &str) -> PathBuf {
        cgroup2_root().join("ferry-tests").join(name)
    }

    pub fn create(name: &str) -> Self {
        let path = Self::path_for(name);
        std::fs::create_dir_all(&path).expect("create cgroup");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
