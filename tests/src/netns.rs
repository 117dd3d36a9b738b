//! Network namespaces the tests own: created with `ip netns add`, configured with
//! `ip -batch`, deleted on drop, so nothing ever touches the host's own namespace.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A named network namespace, deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up.
    pub fn create(name: &str) -> Self {
        run(Command::new("ip").args(["netns", "add", name]));
        let ns = Self {
            name: name.to_owned(),
        };
        ns.ip_batch(&["link set lo up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file processes can `setns` into.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip` commands (one per line, without the `ip`) inside the namespace.
    pub fn ip_batch(&self, commands: &[impl AsRef<str>]) {
        let script: String = commands
            .iter()
            .map(|c| format!("{}\n", c.as_ref()))
            .collect();
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write ip batch");
        let out = child.wait_with_output().expect("wait ip");
        assert!(
            out.status.success(),
            "ip -n {} -batch failed: {}\nscript:\n{script}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sets sysctls (`key=value`) inside the namespace.
    pub fn sysctl(&self, settings: &[impl AsRef<str>]) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "sysctl", "-qw"]);
        cmd.args(settings.iter().map(|s| s.as_ref()));
        run(&mut cmd);
    }

    /// A command that runs inside this namespace, and inside `cgroup` when given
    /// (so eBPF socket hooks attached there apply to it).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>, cgroup: Option<&Path>) -> Command {
        let ns = File::open(self.path()).expect("open netns");
        let procs = cgroup.map(|c| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(c.join("cgroup.procs"))
                .expect("open cgroup.procs")
        });
        let mut cmd = Command::new(program);
        // SAFETY: the closure only makes async-signal-safe system calls (write, setns)
        // on descriptors opened before fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    // Writing "0" moves the writing process itself.
                    (&*procs).write_all(b"0")?;
                }
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread that lives in this namespace (sockets it opens stay
    /// there). For quick checks that need no cgroup, such as health endpoints.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs a command, panicking with its stderr if it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes namespaces left by test processes that died without cleaning up. Names
/// carry the creating process id, so live runs are never touched.
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Deletes namespaces called `<id>-*` (leftovers of a named cluster).
pub fn remove_named(id: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    let prefix = format!("{id}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Puts the calling process into namespace `name` (and `cgroup`, when given), for
/// commands that must run "inside a pod" and then exec something else.
pub fn enter(name: &str, cgroup: Option<&Path>) -> std::io::Result<()> {
    if let Some(cgroup) = cgroup {
        std::fs::write(cgroup.join("cgroup.procs"), "0")?;
    }
    let ns = File::open(Path::new("/run/netns").join(name))?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}
