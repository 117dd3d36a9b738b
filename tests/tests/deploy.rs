//! The deployment manifests parse as the Kubernetes kinds they claim to be, and their
//! settings match what the agent understands. (That the RBAC covers exactly the API
//! requests the agent makes is checked against a live agent in `kube_api.rs`.)

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

fn documents() -> Vec<serde_yaml::Value> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ferry.yaml"))
            .expect("deploy/ferry.yaml");
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(kind: &str) -> T {
    let docs: Vec<serde_yaml::Value> = documents()
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(docs.len(), 1, "exactly one {kind}");
    serde_yaml::from_value(docs[0].clone())
        .unwrap_or_else(|e| panic!("{kind} does not fit the schema: {e}"))
}

#[test]
fn every_document_is_a_known_kind() {
    let kinds: Vec<String> = documents()
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    let _: ServiceAccount = one("ServiceAccount");
    let role: ClusterRole = one("ClusterRole");
    let binding: ClusterRoleBinding = one("ClusterRoleBinding");
    assert_eq!(
        binding.role_ref.name,
        role.metadata.name.clone().unwrap_or_default()
    );
    let verbs: Vec<&String> = role.rules.iter().flatten().flat_map(|r| &r.verbs).collect();
    assert!(
        verbs.iter().all(|v| *v == "list" || *v == "watch"),
        "read-only: {verbs:?}"
    );
}

#[test]
fn daemonset_runs_like_kube_proxy() {
    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("ferry"));
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists"))
    );
    let c = &pod.containers[0];
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|h| h.path.clone().unwrap_or_default())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/livez"));
    assert_eq!(probe_path(&c.startup_probe).as_deref(), Some("/livez"));
    // The forwarder's default upstream is this pod's resolv.conf: the node's own, not
    // the cluster DNS (which Ferry replaces).
    assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/healthz"));
    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/host/cgroup"),
        "{mounts:?}"
    );
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert!(
        caps.contains(&"NET_ADMIN".to_string()) && caps.contains(&"BPF".to_string()),
        "{caps:?}"
    );
}

#[test]
fn configmap_keys_are_flags_the_agent_reads() {
    let cm: ConfigMap = one("ConfigMap");
    let help = std::process::Command::new(ferry_tests::cluster::bin_dir().join("ferry"))
        .args(["run", "--help"])
        .output()
        .expect("ferry run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for key in cm.data.unwrap_or_default().keys() {
        assert!(
            help.contains(&format!("[env: {key}=")),
            "ConfigMap key {key} is not a ferry run flag:\n{help}"
        );
    }
}

/// The ConfigMap's `FERRY_*` values as the agent's environment, with what must differ
/// in a test node remapped: the mode under test, the test's cgroup and bpffs pin
/// directory, and a DNS address the test node has (the DaemonSet's init container
/// creates 169.254.20.10). Every other value is passed exactly as shipped.
fn configmap_env(c: &ferry_tests::Cluster, mode: ferry_tests::Mode) -> Vec<(String, String)> {
    let config: ConfigMap = one("ConfigMap");
    config
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            let value = match key.as_str() {
                "FERRY_MODE" => mode.flag().to_owned(),
                "FERRY_CGROUP" => c.cgroup_path().display().to_string(),
                "FERRY_BPF_PIN_PATH" => c.pin_dir().display().to_string(),
                "FERRY_DNS_LISTEN" => "127.0.0.1:10053".to_owned(),
                _ => value,
            };
            (key, value)
        })
        .collect()
}

/// Every shipped configuration value is accepted in every mode: the agent runs with
/// the ConfigMap's environment until healthy, and serves DNS for the configured
/// cluster domain (an empty upstream means the host's resolvers, a cgroup setting is
/// ignored outside eBPF mode).
#[test]
fn shipped_configmap_starts_the_agent_in_every_mode() {
    use ferry_tests::manifests::{Service, port};
    for mode in [ferry_tests::Mode::Ebpf, ferry_tests::Mode::Iptables] {
        let mut c = ferry_tests::Cluster::new(mode, &[]);
        let env = configmap_env(&c, mode);
        let domain = env
            .iter()
            .find(|(k, _)| k == "FERRY_CLUSTER_DOMAIN")
            .map(|(_, v)| v.clone())
            .expect("the ConfigMap sets the cluster domain");
        c.set_agent_env(env);
        let web = Service::new("web")
            .cluster_ip("10.96.0.10")
            .port(port("http", "TCP", 80));
        c.write_manifest("web.yaml", &web.yaml());
        c.start_agent();
        let name = format!("web.default.svc.{domain}");
        let answer = ferry_tests::dig::run(
            c.node_command("dig"),
            "127.0.0.1",
            &name,
            "A",
            &["-p", "10053"],
        );
        assert_eq!(answer.data("A"), ["10.96.0.10"], "{mode:?}: {answer:?}");
    }
}

/// The init container's script gives the node the DNS listen address on a kernel with
/// the `dummy` driver or without it (then on `lo`), and is safe to run again.
#[test]
fn init_container_creates_the_dns_address_with_or_without_dummy() {
    let ds: DaemonSet = one("DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "dns-address")
        .expect("dns-address init container");
    let command = init.command.clone().expect("command");
    let netns = ferry_tests::netns::Netns::create(&format!("ferry-deploy-{}", std::process::id()));
    netns.ip_batch(&["link set lo up"]);
    for run in 0..2 {
        let status = netns
            .command(&command[0], None)
            .args(&command[1..])
            .status()
            .expect("run the init script");
        assert!(status.success(), "run {run}: {status}");
    }
    let out = netns
        .command("ip", None)
        .args(["-o", "addr", "show"])
        .output()
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(addrs.contains("inet 169.254.20.10/32"), "{addrs}");
}
