//! The deployment manifests, as `kubectl kustomize` renders each overlay, parse as the
//! Kubernetes kinds they claim to be, and their settings match what the agent
//! understands; the scripts they and the image run work in a namespace of their own.
//! (That the RBAC covers exactly the API requests the agent makes is checked against
//! a live agent in `kube_api.rs`.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use ferry_tests::netns::Netns;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, NodeSelectorTerm, PodSpec, ServiceAccount, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};

/// The overlays users apply with `kubectl apply -k deploy/overlays/<name>`.
const OVERLAYS: [&str; 4] = ["ebpf", "nftables", "iptables", "kube-proxy-config"];

fn deploy_dir() -> PathBuf {
    ferry_tests::repo_root().join("deploy")
}

/// The documents `kubectl kustomize` renders for an overlay.
fn render(overlay: &str) -> Vec<serde_json::Value> {
    let dir = deploy_dir().join("overlays").join(overlay);
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .expect("run kubectl (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("kubectl prints UTF-8");
    ferry_tests::yaml_documents(&text)
}

fn one<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let found: Vec<&serde_json::Value> = docs
        .iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "exactly one {kind}");
    serde_json::from_value(found[0].clone())
        .unwrap_or_else(|e| panic!("{kind} does not fit the schema: {e}"))
}

fn pod_spec(docs: &[serde_json::Value]) -> PodSpec {
    let ds: DaemonSet = one(docs, "DaemonSet");
    ds.spec.expect("spec").template.spec.expect("pod spec")
}

fn container<'a>(containers: &'a [Container], name: &str) -> &'a Container {
    containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

fn mount<'a>(c: &'a Container, path: &str) -> &'a VolumeMount {
    c.volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c.name))
}

/// `ferry run --help`, which lists every flag with its environment variable.
fn run_help() -> String {
    let out = Command::new(ferry_tests::cluster::bin_dir().join("ferry"))
        .args(["run", "--help"])
        .output()
        .expect("ferry run --help");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_document_is_a_known_kind() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let mut kinds: Vec<&str> = docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or_default())
            .collect();
        kinds.sort_unstable();
        assert_eq!(
            kinds,
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "ConfigMap",
                "DaemonSet",
                "ServiceAccount"
            ],
            "{overlay}"
        );
        let _: ServiceAccount = one(&docs, "ServiceAccount");
        let role: ClusterRole = one(&docs, "ClusterRole");
        let binding: ClusterRoleBinding = one(&docs, "ClusterRoleBinding");
        assert_eq!(
            binding.role_ref.name,
            role.metadata.name.clone().unwrap_or_default()
        );
        let verbs: Vec<&String> = role.rules.iter().flatten().flat_map(|r| &r.verbs).collect();
        assert!(
            verbs.iter().all(|v| *v == "list" || *v == "watch"),
            "{overlay}: read-only: {verbs:?}"
        );
    }
}

#[test]
fn daemonset_runs_like_kube_proxy() {
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let ds: DaemonSet = one(&docs, "DaemonSet");
        let spec = ds.spec.expect("spec");
        let rolling = spec
            .update_strategy
            .and_then(|s| s.rolling_update)
            .expect("a rolling update");
        assert!(
            rolling.max_surge.is_some(),
            "{overlay}: the new pod starts next to the old one (DNS socket handover)"
        );
        let annotations = spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .unwrap_or_default();
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.service_account_name.as_deref(), Some("ferry"));
        assert!(
            pod.tolerations
                .iter()
                .flatten()
                .any(|t| t.operator.as_deref() == Some("Exists"))
        );
        // The forwarder's default upstream is this pod's resolv.conf: the node's own,
        // not the cluster DNS (which Ferry replaces).
        assert_eq!(pod.dns_policy.as_deref(), Some("Default"));
        assert_eq!(
            pod.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        assert!(pod.termination_grace_period_seconds.is_some());
        // Only the nodes migrated to Ferry (the label kube-proxy is patched to avoid).
        let selector = pod.node_selector.clone().unwrap_or_default();
        assert_eq!(
            selector.get("ferry.io/proxy").map(String::as_str),
            Some("true")
        );
        assert_eq!(
            selector.get("kubernetes.io/os").map(String::as_str),
            Some("linux")
        );
        let security = pod.security_context.clone().unwrap_or_default();
        assert_eq!(
            security.se_linux_options.and_then(|o| o.type_).as_deref(),
            Some("spc_t")
        );
        assert_eq!(
            security.app_armor_profile.map(|p| p.type_).as_deref(),
            Some("Unconfined")
        );

        let c = container(&pod.containers, "ferry");
        assert_eq!(
            annotations
                .get("container.apparmor.security.beta.kubernetes.io/ferry")
                .map(String::as_str),
            Some("unconfined"),
            "{overlay}: the AppArmor annotation for Kubernetes < 1.30"
        );
        let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .map(|h| h.path.clone().unwrap_or_default())
        };
        assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/livez"));
        assert_eq!(probe_path(&c.startup_probe).as_deref(), Some("/livez"));
        assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/healthz"));
        let requests = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.clone())
            .unwrap_or_default();
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{overlay}: {requests:?}"
        );
        assert_eq!(mount(c, "/host/cgroup").read_only, Some(true));
        // The handover socket's directory (`--dns-handover-socket`'s default) is the
        // host's, shared by the old and the new pod; no host ports keep the new pod
        // off the node while the old one runs.
        assert!(run_help().contains("/run/ferry/dns-handover.sock"));
        mount(c, "/run/ferry");
        assert!(
            c.ports.as_deref().unwrap_or_default().is_empty(),
            "{overlay}: ports of a host-network pod are host ports"
        );
        let agent_security = c.security_context.clone().unwrap_or_default();
        let caps = agent_security
            .capabilities
            .and_then(|c| c.add)
            .unwrap_or_default();
        assert!(
            ["NET_ADMIN", "BPF", "SYS_PTRACE"]
                .iter()
                .all(|cap| caps.iter().any(|c| c == cap)),
            "{overlay}: {caps:?}"
        );
        // Pods' network namespaces are found through the host's process IDs.
        assert_eq!(pod.host_pid, Some(true), "{overlay}");

        // bpffs: the host's, so pins outlive the agent's container. Mounting it there
        // takes Bidirectional propagation, which Kubernetes allows only in privileged
        // containers: a privileged init container does it, the agent only sees it.
        let bpffs = container(pod.init_containers.as_deref().unwrap_or_default(), "bpffs");
        let init_mount = mount(bpffs, "/sys/fs/bpf");
        assert_eq!(
            init_mount.mount_propagation.as_deref(),
            Some("Bidirectional")
        );
        assert_eq!(
            bpffs.security_context.as_ref().and_then(|s| s.privileged),
            Some(true)
        );
        let agent_mount = mount(c, "/sys/fs/bpf");
        assert_eq!(agent_mount.name, init_mount.name);
        assert_eq!(
            agent_mount.mount_propagation.as_deref(),
            Some("HostToContainer")
        );
        assert_ne!(agent_security.privileged, Some(true));
        let host_path = |name: &str| {
            pod.volumes
                .iter()
                .flatten()
                .find(|v| v.name == name)
                .and_then(|v| v.host_path.as_ref())
                .map(|h| h.path.clone())
        };
        assert_eq!(
            host_path(agent_mount.name.as_str()).as_deref(),
            Some("/sys/fs/bpf")
        );
        assert_eq!(
            host_path(mount(c, "/host/cgroup").name.as_str()).as_deref(),
            Some("/sys/fs/cgroup")
        );
    }
}

#[test]
fn configmap_keys_are_flags_the_agent_reads() {
    let help = run_help();
    for overlay in OVERLAYS {
        let docs = render(overlay);
        let cm: ConfigMap = one(&docs, "ConfigMap");
        let pod = pod_spec(&docs);
        let env: Vec<String> = container(&pod.containers, "ferry")
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .filter(|name| name.starts_with("FERRY_"))
            .collect();
        for key in cm.data.unwrap_or_default().into_keys().chain(env) {
            assert!(
                help.contains(&format!("[env: {key}=")),
                "{overlay}: {key} is not a ferry run flag:\n{help}"
            );
        }
    }
}

/// The kube-proxy-config overlay runs the agent as kubeadm runs kube-proxy: with the
/// configuration file from kubeadm's `kube-proxy` ConfigMap, mounted where kube-proxy
/// has it, and the node's name, both flags `ferry run` accepts. The settings that
/// file holds are left to it.
#[test]
fn kube_proxy_config_overlay_reads_kubeadms_configuration() {
    let docs = render("kube-proxy-config");
    let pod = pod_spec(&docs);
    let c = container(&pod.containers, "ferry");
    let command = c.command.clone().expect("command");
    assert_eq!(
        command,
        [
            "ferry",
            "run",
            "--config",
            "/var/lib/kube-proxy/config.conf",
            "--hostname-override=$(NODE_NAME)"
        ]
    );
    // The kubelet expands $(NODE_NAME) from the container's environment.
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_name.as_deref(), Some("spec.nodeName"));
    // clap stops at --help only after accepting every flag before it.
    let out = Command::new(ferry_tests::cluster::bin_dir().join(&command[0]))
        .args(
            command[1..]
                .iter()
                .map(|a| a.replace("$(NODE_NAME)", "node-1")),
        )
        .arg("--help")
        .output()
        .expect("run ferry");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = mount(c, "/var/lib/kube-proxy");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == config.name)
        .expect("the kube-proxy volume");
    assert_eq!(
        volume.config_map.as_ref().map(|m| m.name.as_str()),
        Some("kube-proxy")
    );
    let data = one::<ConfigMap>(&docs, "ConfigMap")
        .data
        .unwrap_or_default();
    for key in [
        "FERRY_MODE",
        "FERRY_CLUSTER_CIDR",
        "FERRY_NODEPORT_ADDRESSES",
    ] {
        assert!(!data.contains_key(key), "{key} would override config.conf");
    }
    assert!(data.contains_key("FERRY_DNS_LISTEN"), "{data:?}");
}

/// The ConfigMap's `FERRY_*` values as the agent's environment, with what must differ
/// in a test node remapped: the test's cgroup and bpffs pin directory, and a DNS
/// address the test node has (the DaemonSet's init container creates 169.254.20.10).
/// Every other value, the mode among them, is passed exactly as shipped.
fn configmap_env(config: ConfigMap, c: &ferry_tests::Cluster) -> Vec<(String, String)> {
    config
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| {
            let value = match key.as_str() {
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
/// the environment of the mode's overlay until healthy, and serves DNS for the
/// configured cluster domain (an empty upstream means the host's resolvers, a cgroup
/// setting is ignored outside eBPF mode).
#[test]
fn shipped_configmap_starts_the_agent_in_every_mode() {
    use ferry_tests::manifests::{Service, port};
    for (overlay, mode) in [
        ("ebpf", ferry_tests::Mode::Ebpf),
        ("nftables", ferry_tests::Mode::Nftables),
        ("iptables", ferry_tests::Mode::Iptables),
    ] {
        let config: ConfigMap = one(&render(overlay), "ConfigMap");
        let mut c = ferry_tests::Cluster::new(mode, &[]);
        let env = configmap_env(config, &c);
        let value = |key: &str| {
            env.iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{overlay}: the ConfigMap sets {key}"))
        };
        assert_eq!(value("FERRY_MODE"), mode.flag(), "{overlay}");
        let domain = value("FERRY_CLUSTER_DOMAIN");
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

/// The bpffs init container's script mounts bpffs at /sys/fs/bpf where there is none,
/// and leaves an existing one alone. Run in a private mount namespace, with any bpffs
/// of the host unmounted there only.
#[test]
fn bpffs_init_container_mounts_bpffs_once() {
    let pod = pod_spec(&render("ebpf"));
    let init = container(pod.init_containers.as_deref().unwrap_or_default(), "bpffs");
    let command = init.command.clone().expect("command");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(concat!(
            "while umount /sys/fs/bpf 2>/dev/null; do :; done; ",
            "\"$@\" && \"$@\" && grep -c ' /sys/fs/bpf bpf ' /proc/self/mounts"
        ))
        .arg("sh")
        .args(&command)
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
}

/// Whether node selector terms (any of them; all of a term's expressions) select a
/// node with these labels.
fn selects(terms: &[NodeSelectorTerm], labels: &BTreeMap<String, String>) -> bool {
    terms.iter().any(|t| {
        t.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other} is not evaluated here"),
            }
        })
    })
}

/// The migration patch for kubeadm's kube-proxy DaemonSet and Ferry's node selector
/// split the nodes: each runs kube-proxy or Ferry, never both, never neither.
#[test]
fn migration_patch_keeps_kube_proxy_off_ferry_nodes() {
    let path = deploy_dir().join("migration/kube-proxy-exclude-nodes.yaml");
    let text = std::fs::read_to_string(&path).expect("the migration patch");
    let patch: DaemonSet = serde_saphyr::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a DaemonSet patch: {e}", path.display()));
    assert_eq!(patch.metadata.name.as_deref(), Some("kube-proxy"));
    assert_eq!(patch.metadata.namespace.as_deref(), Some("kube-system"));
    let terms = patch
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|p| p.affinity)
        .and_then(|a| a.node_affinity)
        .and_then(|n| n.required_during_scheduling_ignored_during_execution)
        .expect("a required node affinity")
        .node_selector_terms;

    let ferry_selector = pod_spec(&render("ebpf")).node_selector.unwrap_or_default();
    let node = |proxy: Option<&str>| {
        let mut labels = BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]);
        if let Some(value) = proxy {
            labels.insert("ferry.io/proxy".to_owned(), value.to_owned());
        }
        labels
    };
    for (labels, ferry) in [
        (node(None), false),
        (node(Some("false")), false),
        (node(Some("true")), true),
    ] {
        let runs_ferry = ferry_selector.iter().all(|(k, v)| labels.get(k) == Some(v));
        assert_eq!(runs_ferry, ferry, "Ferry on {labels:?}");
        assert_eq!(selects(&terms, &labels), !ferry, "kube-proxy on {labels:?}");
    }
}

/// `deploy/iptables-wrapper --detect` names the iptables backend holding the
/// kubelet's rules, each case in a fresh network namespace: nft when nothing tells,
/// else the backend with KUBE- rules, with the kubelet's mangle chains as hints
/// that outrank rule counts. It only reads: the rules are the same afterwards.
#[test]
fn iptables_wrapper_detects_the_backend_in_use() {
    let script = deploy_dir().join("iptables-wrapper");
    let kube_rules = |tool: &str| {
        vec![
            format!("{tool} -w -t nat -N KUBE-SERVICES"),
            format!("{tool} -w -t nat -A KUBE-SERVICES -j RETURN"),
        ]
    };
    let cases = [
        ("no rules", vec![], "nft"),
        (
            "KUBE- rules in legacy",
            kube_rules("iptables-legacy"),
            "legacy",
        ),
        (
            "IPv6 KUBE- rules in legacy",
            kube_rules("ip6tables-legacy"),
            "legacy",
        ),
        ("KUBE- rules in nft", kube_rules("iptables-nft"), "nft"),
        (
            "KUBE- rules in nft, more other rules in legacy",
            [
                kube_rules("iptables-nft"),
                vec!["iptables-legacy -w -A INPUT -j ACCEPT".to_owned(); 3],
            ]
            .concat(),
            "nft",
        ),
        (
            "the kubelet's canary in nft, KUBE- rules in legacy",
            [
                kube_rules("iptables-legacy"),
                vec!["iptables-nft -w -t mangle -N KUBE-KUBELET-CANARY".to_owned()],
            ]
            .concat(),
            "nft",
        ),
        (
            "the kubelet's hint in legacy, KUBE- rules in nft",
            [
                kube_rules("iptables-nft"),
                vec!["iptables-legacy -w -t mangle -N KUBE-IPTABLES-HINT".to_owned()],
            ]
            .concat(),
            "legacy",
        ),
    ];
    for (i, (case, commands, expected)) in cases.into_iter().enumerate() {
        let netns = Netns::create(&format!("ferry-deploy-{}-wrapper{i}", std::process::id()));
        for command in &commands {
            let words: Vec<&str> = command.split_whitespace().collect();
            let status = netns
                .command(words[0], None)
                .args(&words[1..])
                .status()
                .expect("run iptables");
            assert!(status.success(), "{case}: {command}: {status}");
        }
        let rules = || {
            let mut saved = String::new();
            for save in [
                "iptables-legacy-save",
                "ip6tables-legacy-save",
                "iptables-nft-save",
                "ip6tables-nft-save",
            ] {
                let out = netns.command(save, None).output().expect("save the rules");
                let text = String::from_utf8_lossy(&out.stdout);
                saved.extend(
                    text.lines()
                        .filter(|l| !l.starts_with('#'))
                        .map(|l| format!("{l}\n")),
                );
            }
            saved
        };
        let before = rules();
        let out = netns
            .command("sh", None)
            .arg(&script)
            .arg("--detect")
            .output()
            .expect("run iptables-wrapper");
        assert!(
            out.status.success(),
            "{case}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "{case}"
        );
        assert_eq!(rules(), before, "{case}: --detect changed the rules");
    }
}

/// kubeadm's `config.conf` as kubeadm writes it (zero values relying on defaulting).
const KUBEADM_CONFIG: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection: {kubeconfig: /var/lib/kube-proxy/kubeconfig.conf, qps: 0, burst: 0, contentType: \"\", acceptContentTypes: \"\"}
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack: {maxPerCore: null, min: null, tcpBeLiberal: false, tcpCloseWaitTimeout: null, tcpEstablishedTimeout: null, udpStreamTimeout: 0s, udpTimeout: 0s}
detectLocal: {bridgeInterface: \"\", interfaceNamePrefix: \"\"}
detectLocalMode: \"\"
enableProfiling: false
healthzBindAddress: \"\"
hostnameOverride: \"\"
iptables: {localhostNodePorts: null, masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
ipvs: {excludeCIDRs: null, minSyncPeriod: 0s, scheduler: \"\", strictARP: false, syncPeriod: 0s, tcpFinTimeout: 0s, tcpTimeout: 0s, udpTimeout: 0s}
metricsBindAddress: \"\"
mode: \"\"
nftables: {masqueradeAll: false, masqueradeBit: null, minSyncPeriod: 0s, syncPeriod: 0s}
nodePortAddresses: null
oomScoreAdj: null
portRange: \"\"
showHiddenMetricsForVersion: \"\"
";

/// The kube-proxy-config overlay's command runs the real agent with kubeadm's file
/// and the overlay's ConfigMap until it is healthy and balances a ClusterIP, warning
/// about nothing in the file. Remapped for the test node: the file's path, the node
/// name, a manifest directory instead of the API server, the cgroup and pins, and the
/// conntrack limit (global to the kernel, so a test leaves it alone).
#[test]
fn kube_proxy_config_overlay_runs_with_kubeadms_file() {
    use ferry_tests::manifests::{Service, docs, ep, port, slice};
    let rendered = render("kube-proxy-config");
    let pod = pod_spec(&rendered);
    let command = container(&pod.containers, "ferry")
        .command
        .clone()
        .expect("command");
    let mut c = ferry_tests::Cluster::new(ferry_tests::Mode::Ebpf, &["a", "client"]);
    let file = c.manifest_dir().with_extension("config.conf");
    std::fs::write(&file, KUBEADM_CONFIG).expect("write config.conf");
    let mut args: Vec<String> = vec!["-v".into()];
    args.extend(command[1..].iter().map(|a| {
        a.replace(
            "/var/lib/kube-proxy/config.conf",
            &file.display().to_string(),
        )
        .replace("$(NODE_NAME)", ferry_tests::cluster::NODE_NAME)
    }));
    args.extend(["--manifests".into(), c.manifest_dir().display().to_string()]);
    args.extend(["--conntrack-max-per-core".into(), "0".into()]);
    c.set_agent_env(configmap_env(one(&rendered, "ConfigMap"), &c));
    c.write_manifest(
        "web.yaml",
        &docs(&[
            Service::new("web")
                .cluster_ip("10.96.0.10")
                .port(port("http", "TCP", 80))
                .yaml(),
            slice(
                "web-v4",
                "web",
                "IPv4",
                &[port("http", "TCP", 8080)],
                &[ep(&c.pod("a").ip)],
            ),
        ]),
    );
    c.spawn_agent_raw(&args);
    c.wait_healthy();
    let r = c.tcp(ferry_tests::From::Pod("client"), "10.96.0.10:80", 10);
    assert_eq!(r.pods(), ["a"], "{r:?}");
    let log = c.agent_log();
    assert!(
        !log.contains("ferry::config"),
        "kubeadm's file warns about nothing:\n{log}"
    );
}
