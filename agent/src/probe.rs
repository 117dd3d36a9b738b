//! Which data planes this kernel can run, probed at start: `--mode auto` picks eBPF,
//! then nftables, then iptables; an explicit mode the kernel cannot run fails with
//! what is missing and how to fix it.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::bail;
use aya::programs::ProgramType;
use aya::sys::{BpfHelper, is_helper_supported, is_program_supported};
use tracing::info;

use crate::cli::Mode;
use crate::dataplane::command;
use crate::dataplane::ebpf::loader::cgroup2_root;

/// Minimum kernels, as README lists them: eBPF mode needs `bpf_set_retval` in
/// cgroup sock_addr programs.
pub const EBPF_MIN_KERNEL: &str = "5.18";

/// What eBPF mode needs and this kernel lacks, each with its fix (empty: all there).
pub fn ebpf_missing(cgroup: Option<&Path>) -> Vec<String> {
    let mut missing = Vec::new();
    match is_program_supported(ProgramType::CgroupSockAddr) {
        Ok(true) => {
            let helper = BpfHelper::BPF_FUNC_set_retval;
            if !is_helper_supported(ProgramType::CgroupSockAddr, helper).unwrap_or(false) {
                missing.push(format!(
                    "the bpf_set_retval helper in cgroup sock_addr programs (kernel {EBPF_MIN_KERNEL}+; use --mode nftables or iptables)"
                ));
            }
        }
        Ok(false) => missing.push(
            "cgroup sock_addr eBPF programs (kernel 4.17+ with CONFIG_CGROUP_BPF)".to_owned(),
        ),
        Err(e) => missing.push(format!(
            "permission to load eBPF programs ({e}; run as root or with CAP_BPF and CAP_NET_ADMIN)"
        )),
    }
    if cgroup.is_none() && cgroup2_root().is_none() {
        missing.push("a cgroup v2 mount (mount cgroup2, or pass --cgroup)".to_owned());
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("bpf"))
    {
        missing.push("the bpf filesystem (kernel with CONFIG_BPF_SYSCALL)".to_owned());
    }
    missing
}

/// What this kernel offers the data planes, one fact each (`ferry status`): its
/// release, the eBPF program type and helper eBPF mode needs, BTF, the cgroup v2
/// mount, bpffs and nf_tables.
pub fn kernel_features() -> Vec<String> {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let sock_addr = is_program_supported(ProgramType::CgroupSockAddr).unwrap_or(false);
    let set_retval = sock_addr
        && is_helper_supported(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_set_retval)
            .unwrap_or(false);
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let bpffs = filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("bpf"));
    let cgroup2 = cgroup2_root().map_or("none".into(), |p| p.display().to_string());
    vec![
        format!("kernel {}", release.trim()),
        format!("cgroup sock_addr eBPF programs: {}", yes_no(sock_addr)),
        format!("bpf_set_retval: {}", yes_no(set_retval)),
        format!(
            "BTF: {}",
            yes_no(Path::new("/sys/kernel/btf/vmlinux").exists())
        ),
        format!("cgroup v2 mount: {cgroup2}"),
        format!("bpffs: {}", yes_no(bpffs)),
        format!("nf_tables: {}", yes_no(nftables_missing().is_none())),
    ]
}

/// Why nftables mode cannot run here, if it cannot: `nft` must be installed and the
/// kernel must accept a table (checked with `nft -c`, which commits nothing; `nft list
/// tables` would read the whole ruleset first, seconds on a big node).
pub fn nftables_missing() -> Option<String> {
    let mut written = None;
    let output = command::run(
        Command::new("nft")
            .args(["-c", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null()),
        command::SMALL,
        |stdin, _| written = command::feed(stdin, |w| w.write_all(b"add table ip ferry-probe\n")),
    )
    .and_then(|o| written.map_or(Ok(o), Err));
    match output {
        Err(e) => Some(format!(
            "cannot run nft ({e}; install the nftables package)"
        )),
        Ok(o) if !o.status.success() => Some(format!(
            "the kernel refuses an nftables table ({}; it needs nf_tables, CONFIG_NF_TABLES)",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// The mode to run: `requested`, checked, or for `auto` the best this kernel runs.
pub fn resolve(requested: Mode, cgroup: Option<&Path>) -> anyhow::Result<Mode> {
    match requested {
        Mode::Ebpf => {
            let missing = ebpf_missing(cgroup);
            if !missing.is_empty() {
                bail!("--mode ebpf: this kernel lacks {}", missing.join("; "));
            }
            Ok(Mode::Ebpf)
        }
        Mode::Nftables => match nftables_missing() {
            Some(why) => bail!("--mode nftables: {why}"),
            None => Ok(Mode::Nftables),
        },
        Mode::Iptables => Ok(Mode::Iptables),
        Mode::Auto => Ok(auto(cgroup).0),
    }
}

/// eBPF, else nftables, else iptables; logs the choice and why the others lost.
pub fn auto(cgroup: Option<&Path>) -> (Mode, String) {
    let (mode, why) = auto_choice(cgroup);
    let name = format!("{mode:?}").to_lowercase();
    info!(mode = name.as_str(), "--mode auto: {why}");
    (mode, why)
}

/// What `--mode auto` picks here, and why (the reason `ferry status` shows).
fn auto_choice(cgroup: Option<&Path>) -> (Mode, String) {
    let ebpf = ebpf_missing(cgroup);
    if ebpf.is_empty() {
        return (
            Mode::Ebpf,
            "the kernel has everything eBPF mode needs".into(),
        );
    }
    let ebpf = ebpf.join("; ");
    match nftables_missing() {
        None => (
            Mode::Nftables,
            format!("chose nftables: eBPF mode lacks {ebpf}"),
        ),
        Some(nftables) => (
            Mode::Iptables,
            format!("chose iptables: eBPF mode lacks {ebpf}; nftables: {nftables}"),
        ),
    }
}
