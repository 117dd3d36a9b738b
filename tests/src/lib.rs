//! Test harness for Ferry: builds a Kubernetes node out of network namespaces, runs
//! the real agent in it and drives real TCP/UDP traffic through it.
//!
//! Used by the integration tests in `tests/`, and by `cargo xtask run` (the demo) and
//! `cargo xtask bench`. Needs root.

pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod dig;
pub mod manifests;
pub mod multinode;
pub mod netns;

pub use cluster::{Cluster, From, Mode, Report};
pub use multinode::MultiNode;

/// Generates one `#[test]` per scenario and data plane, `iptables::name`,
/// `nftables::name` and `ebpf::name`, each calling `name(mode)` of the test file.
#[macro_export]
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod iptables {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Mode::Iptables);
                }
            )*
        }
        mod nftables {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Mode::Nftables);
                }
            )*
        }
        mod ebpf {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::Mode::Ebpf);
                }
            )*
        }
    };
}

/// The documents of a multi-document YAML text as JSON values, with YAML 1.2's core
/// schema (`y` and `on` stay strings), as the agent and the API server read them.
pub fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    serde_saphyr::from_multiple_with_options(text, options).expect("valid YAML")
}

/// The repository checkout the tests read files from (`deploy/`): `$FERRY_REPO_ROOT`
/// (the VM of `cargo xtask vm` puts a copy at a fixed path), else the checkout these
/// tests were built from.
pub fn repo_root() -> std::path::PathBuf {
    match std::env::var_os("FERRY_REPO_ROOT") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}
