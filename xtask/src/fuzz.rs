//! `cargo xtask fuzz`: builds the cargo-fuzz targets of `fuzz/` and runs each for a
//! while from the committed seed corpus (and the kept regressions), failing when one
//! crashes and saying where the crashing input is.
//!
//! The committed corpus is copied into a scratch corpus under `fuzz/target/` (kept
//! between runs, never committed), so the inputs a run discovers do not land in the
//! repository. libFuzzer writes crashing inputs to `fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

/// The toolchain cargo-fuzz builds with: sanitizers and the coverage instrumentation
/// need nightly rustc flags.
const TOOLCHAIN: &str = "nightly";
/// What `cargo fuzz build` and `cargo fuzz run` both get, so `run` reuses the build:
/// optimised with debug assertions (overflow checks), address sanitizer (the
/// default), 16 codegen units (a cold build in minutes, not tens of minutes).
const BUILD_FLAGS: [&str; 4] = ["-O", "-a", "--codegen-units", "16"];
/// Longest one input may take before libFuzzer calls it a hang (seconds).
const INPUT_TIMEOUT: u32 = 10;

/// What `cargo xtask fuzz` was asked for.
pub struct Options {
    /// How long each target runs.
    pub seconds: u64,
    /// Only this target (else every one).
    pub target: Option<String>,
}

/// Builds the targets and runs each in turn; fails listing every crash found.
pub fn run(root: &Path, options: &Options) -> anyhow::Result<()> {
    check_tools()?;
    let all = targets(root)?;
    let targets = match &options.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?} (targets: {})", all.join(", ")),
        None => all,
    };
    let started = Instant::now();
    let mut build = cargo_fuzz(root);
    build.arg("build").args(BUILD_FLAGS);
    if let Some(t) = &options.target {
        build.arg(t);
    }
    status(&mut build, "cargo fuzz build")?;
    println!("fuzz: built in {:.0?}", started.elapsed());

    let mut crashes = Vec::new();
    for target in &targets {
        crashes.extend(run_target(root, target, options.seconds)?);
    }
    if crashes.is_empty() {
        println!(
            "fuzz: no crash in {} target(s), {}s each ({:.0?} in all)",
            targets.len(),
            options.seconds,
            started.elapsed()
        );
        return Ok(());
    }
    for (target, input) in &crashes {
        eprintln!("fuzz: {target} crashed on {}", input.display());
        eprintln!(
            "      reproduce: cargo +{TOOLCHAIN} fuzz run {} {target} {}",
            BUILD_FLAGS.join(" "),
            input.display()
        );
        eprintln!(
            "      once fixed, keep it: cp {} fuzz/regressions/{target}/<what-it-was>",
            input.display()
        );
    }
    bail!("{} fuzz crash(es)", crashes.len())
}

/// Runs one target for `seconds` from a scratch copy of its seeds; returns the
/// crashing inputs it wrote.
fn run_target(root: &Path, target: &str, seconds: u64) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let fuzz = root.join("fuzz");
    let scratch = fuzz.join("target/corpus").join(target);
    std::fs::create_dir_all(&scratch).with_context(|| format!("{}", scratch.display()))?;
    let mut seeds = 0;
    for kind in ["corpus", "regressions"] {
        seeds += copy_files(&fuzz.join(kind).join(target), &scratch)?;
    }
    let artifacts = fuzz.join("artifacts").join(target);
    let before = files(&artifacts)?;
    println!("fuzz: {target} for {seconds}s ({seeds} seeds)");
    let mut run = cargo_fuzz(root);
    run.arg("run")
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&scratch)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT}"))
        .arg("-print_final_stats=1");
    let ok = run
        .status()
        .with_context(|| format!("running cargo fuzz run {target}"))?
        .success();
    let new: Vec<(String, PathBuf)> = files(&artifacts)?
        .into_iter()
        .filter(|f| !before.contains(f))
        .map(|f| (target.to_owned(), f))
        .collect();
    if !ok && new.is_empty() {
        bail!("cargo fuzz run {target} failed without writing a crashing input");
    }
    Ok(new)
}

/// `cargo +nightly fuzz` in the checkout. The rustup proxy picks the toolchain, so
/// this is `cargo` from PATH, not `$CARGO` (stable's own binary).
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{TOOLCHAIN}"))
        .arg("fuzz")
        .current_dir(root);
    cmd
}

/// Fails with what to install when cargo-fuzz or the nightly toolchain is missing.
fn check_tools() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !nightly {
        bail!(
            "fuzzing needs rustup's {TOOLCHAIN} toolchain (cargo-fuzz builds with nightly flags)"
        );
    }
    let fuzz = Command::new("cargo")
        .args([&format!("+{TOOLCHAIN}"), "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz {
        bail!("cargo-fuzz is not installed: scripts/install-deps.sh installs it");
    }
    Ok(())
}

/// The targets `fuzz/Cargo.toml` declares.
fn targets(root: &Path) -> anyhow::Result<Vec<String>> {
    let out = cargo_fuzz(root)
        .arg("list")
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Copies the files of `from` (if it exists) into `to`; returns how many.
fn copy_files(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for file in files(from)? {
        let name = file.file_name().context("a file name")?;
        std::fs::copy(&file, to.join(name)).with_context(|| format!("{}", file.display()))?;
        n += 1;
    }
    Ok(n)
}

/// The files directly in `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("{}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.is_file() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    if !cmd
        .status()
        .with_context(|| format!("running {what}"))?
        .success()
    {
        bail!("{what} failed");
    }
    Ok(())
}
