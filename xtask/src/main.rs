//! `cargo xtask`: the project's developer commands.
//!
//! - `run`: the demo. Builds a node out of network namespaces (pods serving the
//!   `examples/` manifests), runs Ferry in it and prints how to reach the services.
//!   `--host` programs the real host instead (explicitly); `--vm` runs the demo
//!   inside the test VM.
//! - `exec POD -- CMD`: runs a command inside a demo pod.
//! - `test`: format check, clippy, unit tests and the netns integration tests.
//! - `bench`: performance against the baselines, written to `bench/results/`.
//! - `vm`: the test suite inside a virtual machine on Debian's 6.1 kernel.
//! - `fuzz`: the cargo-fuzz targets of `fuzz/`, a short run of each (CI) or a long one.
//! - `build`, `lint`.

mod bench;
mod fuzz;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use ferry_tests::cgroup::Cgroup;
use ferry_tests::{Cluster, Mode};

/// Name prefix of the demo's namespaces and cgroup.
const DEMO_ID: &str = "ferry-demo";
/// The demo's pods; their addresses are the ones `examples/` lists (10.244.0.10...).
const DEMO_PODS: [&str; 4] = ["web-0", "web-1", "echo-0", "client"];

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the agent and the test tools.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run Ferry on the example manifests in a demo node made of network namespaces.
    Run {
        /// Data plane: ebpf, nftables or iptables.
        #[arg(long, default_value = "ebpf")]
        mode: String,
        /// Manifest directory to serve.
        #[arg(long, default_value = "examples")]
        manifests: PathBuf,
        /// Program THIS host (its own network namespace) instead of a demo node.
        #[arg(long, conflicts_with = "vm")]
        host: bool,
        /// Run the demo inside the test VM (Debian's 6.1 kernel; see vm-test/) with a
        /// shell on its console, leaving this machine's kernel alone. Needs what
        /// `cargo xtask vm` needs.
        #[arg(long)]
        vm: bool,
        /// With --vm: run this shell command in the VM once the demo is up, print its
        /// output and power off (failing when it fails), instead of a shell.
        #[arg(long, requires = "vm", value_name = "COMMAND")]
        vm_command: Option<String>,
        /// Use the binaries already built (how the demo starts inside the VM).
        #[arg(long, hide = true)]
        prebuilt: bool,
    },
    /// Run a command inside a pod of the running demo, e.g.
    /// `cargo xtask exec client -- curl -s http://10.96.0.10/`.
    Exec {
        pod: String,
        #[arg(trailing_var_arg = true, required = true)]
        command: Vec<String>,
    },
    /// Format check, clippy, unit tests and netns integration tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the test suite inside a virtual machine booting Debian bookworm's kernel
    /// (needs root, qemu-system-x86 and debootstrap; KVM when the CPU offers it).
    Vm {
        /// Where the VM's root filesystem and disk image are cached.
        #[arg(long, default_value = vm::DEFAULT_CACHE)]
        cache: PathBuf,
        /// Debian mirror for the root filesystem.
        #[arg(long, default_value = vm::DEFAULT_MIRROR)]
        mirror: String,
        /// Stop the VM and fail after this many minutes.
        #[arg(long, default_value_t = 45)]
        timeout_minutes: u64,
        /// Only the eBPF tests: the `ebpf` test executable and every eBPF-mode test
        /// (what proves the programs on this kernel; CI runs this).
        #[arg(long)]
        ebpf_only: bool,
        /// Extra arguments for every test executable (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the fuzz targets (`fuzz/`, cargo-fuzz on the nightly toolchain) and run
    /// each from the committed seed corpus; fails when one crashes, naming the input.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Only this target (dns_udp, dns_tcp, manifests, plan_diff); default all.
        target: Option<String>,
    },
    /// Format check and clippy with warnings as errors.
    Lint,
    /// Measure Ferry against its baselines (takes minutes; needs root).
    Bench {
        /// Smoke run: fewer services, shorter measurements.
        #[arg(long)]
        quick: bool,
        /// Name for the results files.
        #[arg(long, default_value = "local")]
        name: String,
        /// Run only one part: `traffic`, `scale` or `dns`.
        #[arg(long)]
        only: Option<String>,
        /// Services in the scale part (default 10,000; 1,000 with --quick).
        #[arg(long)]
        scale_services: Option<usize>,
        /// Ferry modes to measure (comma-separated; default all: ebpf,nftables,iptables).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Build { release } => build(release),
        Task::Run {
            mode,
            manifests,
            host,
            vm,
            vm_command,
            prebuilt,
        } => {
            if !prebuilt {
                build(false)?;
            }
            if vm {
                require_root()?;
                parse_mode(&mode)?;
                let demo = vm::Demo {
                    mode,
                    manifests: root.join(manifests),
                    command: vm_command,
                };
                vm::run_demo(&root, &demo)
            } else if host {
                run_on_host(&mode, &manifests)
            } else {
                run_demo(&mode, &root.join(manifests))
            }
        }
        Task::Exec { pod, command } => exec_in_pod(&pod, &command),
        Task::Test { args } => {
            lint()?;
            build(false)?;
            cargo(&["test"], &args)
        }
        Task::Vm {
            cache,
            mirror,
            timeout_minutes,
            ebpf_only,
            args,
        } => {
            require_root()?;
            let options = vm::Options {
                cache,
                mirror,
                timeout: std::time::Duration::from_secs(timeout_minutes * 60),
                test_args: args,
                ebpf_only,
            };
            vm::run(&root, &options)
        }
        Task::Fuzz { seconds, target } => fuzz::run(&root, &fuzz::Options { seconds, target }),
        Task::Lint => lint(),
        Task::Bench {
            quick,
            name,
            only,
            scale_services,
            modes,
        } => {
            require_root()?;
            let modes = match modes.is_empty() {
                true => vec![Mode::Ebpf, Mode::Nftables, Mode::Iptables],
                false => modes
                    .iter()
                    .map(|m| parse_mode(m))
                    .collect::<anyhow::Result<_>>()?,
            };
            build(true)?;
            let plan = bench::Plan {
                quick,
                only: only.as_deref(),
                scale_services,
                modes: &modes,
            };
            bench::run(&root, &name, &plan).map(|_| ())
        }
    }
}

/// The checkout: `$FERRY_REPO_ROOT` (the copy inside the VM), else the one xtask
/// was built from.
fn workspace_root() -> PathBuf {
    if let Some(root) = std::env::var_os("FERRY_REPO_ROOT") {
        return root.into();
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .args(extra)
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed", args.join(" "));
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec![
        "build",
        "--package",
        "ferry",
        "--package",
        "ferry-tests",
        "--bins",
    ];
    if release {
        args.push("--release");
    }
    cargo(&args, &[])
}

fn lint() -> anyhow::Result<()> {
    cargo(&["fmt", "--all", "--check"], &[])?;
    cargo(&["clippy", "--all-targets", "--", "-D", "warnings"], &[])
}

fn parse_mode(mode: &str) -> anyhow::Result<Mode> {
    match mode {
        "iptables" => Ok(Mode::Iptables),
        "nftables" => Ok(Mode::Nftables),
        "ebpf" => Ok(Mode::Ebpf),
        other => bail!("unknown mode {other:?} (ebpf, nftables or iptables)"),
    }
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "this needs root (network namespaces, iptables, eBPF): run it with sudo, or use ./dev.sh"
        );
    }
    Ok(())
}

fn run_demo(mode: &str, manifests: &Path) -> anyhow::Result<()> {
    require_root()?;
    let mode = parse_mode(mode)?;
    let manifests = manifests
        .canonicalize()
        .with_context(|| format!("manifest directory {}", manifests.display()))?;
    // Block the stop signals before any thread or child starts, then wait for them
    // below, so the demo tears itself down on Ctrl-C.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;

    println!("Building demo node {DEMO_ID} (network namespaces {DEMO_ID}-*)...");
    let mut cluster = Cluster::named(mode, DEMO_ID, &DEMO_PODS);
    cluster.use_manifest_dir(&manifests);
    let dns = format!("{}:53", ferry_tests::cluster::NODE_IP);
    cluster.start_agent_with(&["--dns-listen", &dns]);

    print_demo_hints(&cluster, mode, &manifests);
    let signal = signals.wait()?;
    println!("\n{signal:?}: tearing the demo down.");
    drop(cluster);
    Ok(())
}

/// What a user can try against the running demo.
fn print_demo_hints(cluster: &Cluster, mode: Mode, manifests: &Path) {
    let client = cluster.pod("client");
    println!(
        "\nFerry ({}) is running on the demo node, serving {}.\n",
        mode.flag(),
        manifests.display()
    );
    println!(
        "Pods: {}",
        cluster
            .pods
            .iter()
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("\nTry, in another terminal:");
    println!(
        "  ./dev.sh exec client -- curl -s http://10.96.0.10/         # ClusterIP (web-0 or web-1 answers)"
    );
    println!("  ./dev.sh exec client -- curl -s 'http://[fd00:96::10]/'    # ClusterIP over IPv6");
    println!(
        "  ./dev.sh exec client -- curl -s http://10.96.0.99/         # no endpoints: connection refused"
    );
    println!(
        "  sudo ip netns exec {DEMO_ID}-ext curl -s http://{}:30080/   # NodePort from outside the node",
        ferry_tests::cluster::NODE_IP
    );
    println!(
        "  sudo ip netns exec {DEMO_ID}-ext curl -s http://{}:32080/   # load-balancer health check (healthCheckNodePort)",
        ferry_tests::cluster::NODE_IP
    );
    println!(
        "  ./dev.sh exec client -- dig @{} web.demo.svc.cluster.local   # cluster DNS",
        ferry_tests::cluster::NODE_IP
    );
    match mode {
        Mode::Ebpf => println!(
            "  sudo {} inspect services --bpf-pin-path {}   # what the eBPF maps hold",
            cluster.bin("ferry").display(),
            cluster.pin_dir().display()
        ),
        Mode::Nftables => println!(
            "  sudo ip netns exec {DEMO_ID}-node {} inspect services   # what the nftables maps hold",
            cluster.bin("ferry").display()
        ),
        Mode::Iptables => {}
    }
    match mode {
        Mode::Nftables => println!(
            "  sudo ip netns exec {DEMO_ID}-node nft list table ip ferry   # the nftables table"
        ),
        _ => println!(
            "  sudo ip netns exec {DEMO_ID}-node iptables-save -t nat      # iptables rules (NodePorts; all services in iptables mode)"
        ),
    }
    println!(
        "Edit {}/*.yaml and the data plane and DNS follow within milliseconds.",
        manifests.display()
    );
    println!(
        "Agent health: sudo ip netns exec {DEMO_ID}-node curl -s http://127.0.0.1:10256/healthz"
    );
    println!(
        "(client pod address: {})\n\nCtrl-C stops the demo and removes everything.",
        client.ip
    );
}

fn run_on_host(mode: &str, manifests: &Path) -> anyhow::Result<()> {
    require_root()?;
    parse_mode(mode)?;
    eprintln!(
        "Programming THIS host's network namespace with {}. `ferry cleanup` undoes it.",
        manifests.display()
    );
    let ferry = ferry_tests::cluster::bin_dir().join("ferry");
    let status = Command::new(ferry)
        .args(["run", "--mode", mode, "--manifests"])
        .arg(manifests)
        .status()
        .context("running ferry")?;
    if !status.success() {
        bail!("ferry exited with {status}");
    }
    Ok(())
}

fn exec_in_pod(pod: &str, command: &[String]) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    require_root()?;
    let netns = format!("{DEMO_ID}-{pod}");
    if !Path::new("/run/netns").join(&netns).exists() {
        bail!(
            "no demo pod {pod:?} (is `cargo xtask run` running? pods: {})",
            DEMO_PODS.join(", ")
        );
    }
    let cgroup = Cgroup::path_for(DEMO_ID);
    ferry_tests::netns::enter(&netns, Some(&cgroup)).context("entering the pod")?;
    let (program, args) = command.split_first().context("no command given")?;
    let err = Command::new(program).args(args).exec();
    Err(err).with_context(|| format!("running {program}"))
}
