//! Builds the eBPF programs (crate `ferry-ebpf`) with Debian's rustc, which ships a
//! prebuilt `core` for bpfel-unknown-none; see docs/ebpf-toolchain.md.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("eBPF crate path is not UTF-8")?
        .to_owned();
    // aya-build relays every line the nested cargo prints as a `cargo:warning`, which
    // floods a first build with "Compiling ..." lines; a quiet nested cargo prints only
    // what matters (compiler errors and warnings still come through, and a failure
    // still fails this build).
    // SAFETY: the build script is single-threaded here; nothing reads the environment
    // concurrently.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ferry-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("debian-web"),
    )
}
