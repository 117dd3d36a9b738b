//! `cargo xtask vm`: the whole test suite inside a virtual machine (KVM, or QEMU's
//! emulation where the host offers no hardware virtualisation).
//!
//! The VM boots Debian bookworm's own kernel (6.1 LTS, older than most development
//! hosts), so the eBPF programs are verified and run on a distribution kernel users
//! really have, and nothing a test does can touch the host's network. The root
//! filesystem is made once with debootstrap and cached; every run copies the freshly
//! built agent, the test executables and the files they read into it under
//! `/ferry-vm` (a fixed path, whatever the checkout's), boots it, and reads the result
//! line `vm-test/init.sh` prints before powering off.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Debian packages the tests (and the demo's hints) run inside the VM, besides the
/// kernel and its initramfs. (ca-certificates: the Kubernetes client reads the system
/// trust store when a kubeconfig names no CA, as the tests' plain-HTTP API server's
/// does.)
const PACKAGES: &str = "linux-image-amd64,initramfs-tools,iproute2,iptables,nftables,\
conntrack,dnsutils,kmod,procps,ca-certificates,curl";
/// Where the root filesystem and disk image are cached unless told otherwise.
pub const DEFAULT_CACHE: &str = "/var/tmp/ferry-vm";
/// The Debian mirror debootstrap downloads from unless told otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Line the VM's init prints with the suite's exit status.
const RESULT_MARKER: &str = "FERRY-VM-RESULT: ";
/// Marks a finished root filesystem and holds its package list; a debootstrap cut off
/// half-way, or made from another list, is redone.
const COMPLETE_MARKER: &str = ".ferry-vm-complete";

/// What `cargo xtask vm` was asked for.
pub struct Options {
    /// Where the root filesystem and disk image are cached.
    pub cache: PathBuf,
    /// Debian mirror debootstrap downloads from.
    pub mirror: String,
    /// The VM is stopped (and the run fails) after this long.
    pub timeout: Duration,
    /// Extra arguments for every test executable (e.g. a test name filter).
    pub test_args: Vec<String>,
    /// Only what proves the eBPF programs on this kernel: the `ebpf` test executable
    /// and every eBPF-mode test of the others (CI's run).
    pub ebpf_only: bool,
}

/// Builds everything, boots the VM and fails unless every test passed in it.
pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    require_host_tools()?;
    let rootfs = ensure_rootfs(&options.cache, &options.mirror)?;
    let tests = build_test_executables()?;
    stage(root, &rootfs, &tests, options)?;
    let console = Console::Watched(options.timeout);
    boot_staged(root, &rootfs, &options.cache, console)
}

/// Adds `init.sh` to the staged build, makes the disk image and boots it.
fn boot_staged(root: &Path, rootfs: &Path, cache: &Path, console: Console) -> anyhow::Result<()> {
    let init = rootfs.join(STAGE).join("init.sh");
    std::fs::copy(root.join("vm-test/init.sh"), init).context("copying vm-test/init.sh")?;
    let image = cache.join("disk.ext4");
    make_image(rootfs, &image)?;
    let (kernel, initrd) = kernel_files(rootfs)?;
    boot(&kernel, &initrd, &image, console, cache)
}

/// What `cargo xtask run --vm` was asked for.
pub struct Demo {
    pub mode: String,
    pub manifests: PathBuf,
    /// Run this instead of a shell, then power off.
    pub command: Option<String>,
}

/// How long a demo command may take, VM boot included.
const DEMO_COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The demo of `cargo xtask run`, inside the VM: `xtask run` starts at boot with the
/// binaries built here; then a shell on the console (or `demo.command`).
pub fn run_demo(root: &Path, demo: &Demo) -> anyhow::Result<()> {
    require_host_tools()?;
    let cache = Path::new(DEFAULT_CACHE);
    let rootfs = ensure_rootfs(cache, DEFAULT_MIRROR)?;
    let staged = stage_build(root, &rootfs, &root.join("target/debug"))?;
    let xtask = std::env::current_exe().context("the xtask executable")?;
    copy(&xtask, &staged.join("bin/xtask"))?;
    copy(&demo.manifests, &staged.join("repo/examples"))?;
    // The demo's hints say `./dev.sh exec ...` and `sudo ...`: both work in the VM.
    write_script(
        &staged.join("repo/dev.sh"),
        "exec /ferry-vm/bin/xtask \"$@\"",
    )?;
    write_script(&staged.join("bin/sudo"), "exec \"$@\"")?;
    std::fs::write(staged.join("demo"), &demo.mode)?;
    if let Some(command) = &demo.command {
        std::fs::write(staged.join("demo-command"), command)?;
    }
    let console = match demo.command {
        Some(_) => Console::Watched(DEMO_COMMAND_TIMEOUT),
        None => {
            println!("ferry-vm: the demo starts in the VM; `exit` (or Ctrl-A X) leaves it");
            Console::Interactive
        }
    };
    boot_staged(root, &rootfs, cache, console)
}

/// An executable shell script.
fn write_script(path: &Path, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// `/ferry-vm` in the root filesystem, emptied of the previous run's files, with what
/// both the tests and the demo use: `bin/` (`ferry`, `ferry-probe` from `bin_dir`:
/// `$FERRY_BIN_DIR`) and `repo/deploy` (in `$FERRY_REPO_ROOT`).
fn stage_build(root: &Path, rootfs: &Path, bin_dir: &Path) -> anyhow::Result<PathBuf> {
    let staged = rootfs.join(STAGE);
    if staged.exists() {
        std::fs::remove_dir_all(&staged)
            .with_context(|| format!("removing {}", staged.display()))?;
    }
    for bin in ["ferry", "ferry-probe"] {
        copy(&bin_dir.join(bin), &staged.join("bin").join(bin))?;
    }
    copy(&root.join("deploy"), &staged.join("repo/deploy"))?;
    Ok(staged)
}

/// QEMU's accelerator and CPU model: KVM when the CPU offers hardware virtualisation,
/// else TCG emulation (correct but several times slower). A `/dev/kvm` alone is not
/// enough: inside some VMs it exists while nested guests hang in early boot.
fn accelerator() -> [&'static str; 4] {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hardware && Path::new("/dev/kvm").exists() {
        ["-accel", "kvm", "-cpu", "host"]
    } else {
        println!("ferry-vm: no hardware virtualisation here; emulating the CPU (slow)");
        ["-accel", "tcg,thread=multi", "-cpu", "max"]
    }
}

fn require_host_tools() -> anyhow::Result<()> {
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("{tool} is missing: `./scripts/install-deps.sh --vm` installs {package}");
        }
    }
    Ok(())
}

/// The cached Debian root filesystem, made with debootstrap on first use.
fn ensure_rootfs(cache: &Path, mirror: &str) -> anyhow::Result<PathBuf> {
    let rootfs = cache.join("rootfs");
    let marker = rootfs.join(COMPLETE_MARKER);
    if std::fs::read_to_string(&marker).is_ok_and(|made_with| made_with == PACKAGES) {
        return Ok(rootfs);
    }
    println!(
        "ferry-vm: creating the Debian root filesystem in {} (once; a few minutes)",
        rootfs.display()
    );
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)
            .with_context(|| format!("removing the partial {}", rootfs.display()))?;
    }
    std::fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
        ])
        .arg(&rootfs)
        .arg(mirror)
        .status()
        .context("running debootstrap")?;
    if !status.success() {
        bail!("debootstrap failed ({status})");
    }
    std::fs::write(rootfs.join("etc/hostname"), "ferry-vm\n")?;
    std::fs::write(marker, PACKAGES)?;
    Ok(rootfs)
}

/// Builds the agent, the test tools and every test executable (without running
/// them); returns the test executables' paths.
fn build_test_executables() -> anyhow::Result<Vec<PathBuf>> {
    crate::build(false)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(&cargo)
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the tests failed");
    }
    let mut executables = Vec::new();
    for line in output.stdout.split(|&b| b == b'\n') {
        let Ok(message) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = message["profile"]["test"].as_bool() == Some(true);
        if let (true, Some(exe)) = (is_test, message["executable"].as_str()) {
            executables.push(PathBuf::from(exe));
        }
    }
    if executables.is_empty() {
        bail!("cargo test --no-run reported no test executables");
    }
    Ok(executables)
}

/// Where the build goes in the VM's filesystem: a fixed path, so the VM works from
/// any checkout (`init.sh` mounts a tmpfs over `/tmp`, where a clone may live).
const STAGE: &str = "ferry-vm";

/// Copies `from` (a file or directory) to `to`, making `to`'s parent.
fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let status = Command::new("cp")
        .args(["-a", "--"])
        .arg(from)
        .arg(to)
        .status()
        .context("running cp")?;
    if !status.success() {
        bail!("copying {} into the VM image failed", from.display());
    }
    Ok(())
}

/// Puts this run's build into the root filesystem under `/ferry-vm`, replacing the
/// previous run's: `bin/` (`ferry`, `ferry-probe`: `$FERRY_BIN_DIR`), `tests/` (the
/// test executables, listed with their arguments in `tests.list`) and `repo/` (the
/// files tests read: `$FERRY_REPO_ROOT`).
fn stage(root: &Path, rootfs: &Path, tests: &[PathBuf], options: &Options) -> anyhow::Result<()> {
    // Test executables live in `<target>/debug/deps`, the binaries in `<target>/debug`.
    let bin_dir = tests[0]
        .parent()
        .and_then(Path::parent)
        .context("test executable directory")?;
    let staged = stage_build(root, rootfs, bin_dir)?;
    let testdata = "agent/src/dataplane/iptables/testdata";
    copy(&root.join(testdata), &staged.join("repo").join(testdata))?;
    let mut list = String::new();
    for test in tests {
        let name = test.file_name().context("test executable name")?;
        let name = name.to_string_lossy();
        let mut args = options.test_args.clone();
        if options.ebpf_only && !name.starts_with("ebpf-") {
            // Every eBPF-mode test lives in a module named `ebpf`.
            args.push("ebpf::".into());
        }
        copy(test, &staged.join("tests").join(&*name))?;
        list += &format!("/{STAGE}/tests/{name} {}\n", args.join(" "));
    }
    std::fs::write(staged.join("tests.list"), list)?;
    Ok(())
}

/// Makes a fresh ext4 disk image holding the root filesystem.
fn make_image(rootfs: &Path, image: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(image);
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "ferry-vm", "-d"])
        .arg(rootfs)
        .arg(image)
        .arg("4G")
        .status()
        .context("running mkfs.ext4")?;
    if !status.success() {
        bail!("mkfs.ext4 failed ({status})");
    }
    Ok(())
}

/// The Debian kernel and initramfs installed in the root filesystem.
fn kernel_files(rootfs: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let boot = rootfs.join("boot");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    kernels.sort();
    let kernel = kernels.pop().context("no kernel in the VM's /boot")?;
    let version = kernel
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("kernel file name")?;
    let initrd = boot.join(format!("initrd.img-{version}"));
    if !initrd.exists() {
        bail!("{} is missing", initrd.display());
    }
    Ok((kernel, initrd))
}

/// How the host talks to the VM's console.
#[derive(Clone, Copy)]
enum Console {
    /// Echoed and watched for the result line; the VM is stopped after this long.
    Watched(Duration),
    /// The user's terminal, until the VM powers off.
    Interactive,
}

/// Boots the VM and, for a watched console, echoes it and returns the verdict.
fn boot(
    kernel: &Path,
    initrd: &Path,
    image: &Path,
    console: Console,
    cache: &Path,
) -> anyhow::Result<()> {
    let log_path = cache.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(accelerator())
        .args(["-m", "4096", "-smp", "2"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", image.display()))
        .args([
            "-append",
            "root=/dev/vda rw console=ttyS0 init=/ferry-vm/init.sh panic=-1 quiet",
        ]);
    let timeout = match console {
        Console::Interactive => {
            let status = qemu.status().context("starting qemu-system-x86_64")?;
            if !status.success() {
                bail!("qemu-system-x86_64 exited with {status}");
            }
            return Ok(());
        }
        Console::Watched(timeout) => timeout,
    };
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let pid = child.id();
    let started = Instant::now();
    // A watchdog stops a VM that hangs; the console reader below then sees EOF.
    std::thread::spawn(move || {
        std::thread::sleep(timeout);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    });
    let mut log = std::fs::File::create(&log_path)?;
    let mut verdict = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap_or_default();
        println!("{line}");
        use std::io::Write as _;
        let _ = writeln!(log, "{line}");
        if let Some(code) = line.trim().strip_prefix(RESULT_MARKER) {
            verdict = Some(code.trim() == "0");
        }
    }
    let _ = child.wait();
    match verdict {
        Some(true) => {
            println!(
                "ferry-vm: the VM's run succeeded ({:.0?}); console log in {}",
                started.elapsed(),
                log_path.display()
            );
            Ok(())
        }
        Some(false) => bail!(
            "the VM's run failed (a test, or the demo command); console log in {}",
            log_path.display()
        ),
        None => bail!(
            "the VM stopped without a result (timeout {:?}?); console log in {}",
            timeout,
            log_path.display()
        ),
    }
}
