use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::cli::{Command, parse_from};

/// What kubeadm writes into the `kube-proxy` ConfigMap's `config.conf` (v1.31),
/// zero values and all: every field is known, so nothing is warned about.
const KUBEADM: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

fn run_args(flags: &[&str]) -> RunArgs {
    let mut full = vec!["ferry", "run"];
    full.extend_from_slice(flags);
    match parse_from(full).expect("flags parse").command {
        Command::Run(args) => *args,
        other => panic!("{other:?}"),
    }
}

fn applied(text: &str, flags: &[&str]) -> (RunArgs, Vec<String>) {
    let mut args = run_args(flags);
    let warnings = KubeProxyConfiguration::parse(text)
        .expect("parses")
        .apply(&mut args)
        .expect("applies");
    (args, warnings)
}

#[test]
fn kubeadms_file_applies_without_warnings_and_keeps_ferrys_defaults() {
    let (args, warnings) = applied(KUBEADM, &[]);
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(args.mode, Mode::Auto, "an empty mode is Ferry's default");
    assert_eq!(args.cluster_cidr, ["10.244.0.0/16".parse().unwrap()]);
    assert_eq!(
        args.kubeconfig,
        Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(
        args.healthz_bind_address, "0.0.0.0:10256",
        "empty means the default"
    );
    assert_eq!(
        args.sync_period,
        Duration::from_secs(30),
        "0s means the default"
    );
    assert_eq!(args.node_name, None);
    let ct = &args.node_settings;
    assert_eq!(ct.conntrack_max_per_core, 32_768, "null means the default");
    assert_eq!(
        ct.conntrack_tcp_timeout_established,
        Duration::from_secs(86_400)
    );
    assert_eq!(ct.oom_score_adj, -999);
}

#[test]
fn values_fill_in_flags_not_given_explicitly() {
    let file = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
hostnameOverride: " Node-1 "
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: [192.168.0.0/16]
healthzBindAddress: 127.0.0.1
metricsBindAddress: ":10250"
bindAddressHardFail: true
detectLocalMode: InterfaceNamePrefix
detectLocal: {interfaceNamePrefix: veth}
oomScoreAdj: -500
iptables: {masqueradeAll: true, syncPeriod: 1m0s, minSyncPeriod: 1.5s, masqueradeBit: 14}
conntrack: {maxPerCore: 0, min: 1000, tcpEstablishedTimeout: 2h0m0s, tcpCloseWaitTimeout: 0s, tcpBeLiberal: true, udpTimeout: 30s, udpStreamTimeout: 2m0s}
"#;
    let (args, warnings) = applied(file, &[]);
    assert_eq!(warnings, Vec::<String>::new());
    assert_eq!(args.mode, Mode::Iptables);
    assert_eq!(args.node_name.as_deref(), Some("node-1"));
    assert_eq!(args.cluster_cidr.len(), 2);
    assert_eq!(args.nodeport_addresses, ["192.168.0.0/16"]);
    assert_eq!(args.healthz_bind_address, "127.0.0.1:10256");
    assert_eq!(args.metrics_bind_address, "0.0.0.0:10250");
    assert!(args.bind_address_hard_fail && args.masquerade_all);
    assert_eq!(
        args.detect_local_mode,
        crate::cli::DetectLocalMode::InterfaceNamePrefix
    );
    assert_eq!(args.pod_interface_name_prefix.as_deref(), Some("veth"));
    assert_eq!(args.sync_period, Duration::from_secs(60));
    assert_eq!(args.min_sync_period, Duration::from_millis(1500));
    let s = &args.node_settings;
    assert_eq!(s.oom_score_adj, -500);
    assert_eq!((s.conntrack_max_per_core, s.conntrack_min), (0, 1000));
    assert_eq!(
        s.conntrack_tcp_timeout_established,
        Duration::from_secs(7200)
    );
    assert_eq!(
        s.conntrack_tcp_timeout_close_wait,
        Duration::ZERO,
        "0s: leave alone"
    );
    assert!(s.conntrack_tcp_be_liberal);
    assert_eq!(s.conntrack_udp_timeout_stream, Duration::from_secs(120));

    // Flags given on the command line win over the file.
    let (args, _) = applied(
        file,
        &[
            "--mode",
            "ebpf",
            "--hostname-override",
            "other",
            "--iptables-sync-period",
            "5s",
        ],
    );
    assert_eq!(args.mode, Mode::Ebpf);
    assert_eq!(args.node_name.as_deref(), Some("other"));
    assert_eq!(args.sync_period, Duration::from_secs(5));
    assert_eq!(args.min_sync_period, Duration::from_millis(1500));
}

#[test]
fn settings_without_effect_and_unknown_fields_are_warned_about() {
    let file = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: ipvs
featureGates: {SomeGate: true}
iptables: {masqueradeBit: 15, localhostNodePorts: false}
conntrack: {maxPerCore: 1, surprise: 1}
noSuchField: 1
"#;
    let (args, warnings) = applied(file, &[]);
    assert_eq!(args.mode, Mode::Auto, "ipvs falls back to Ferry's default");
    let all = warnings.join("\n");
    for expected in [
        "mode \"ipvs\"",
        "featureGates.SomeGate",
        "masqueradeBit 15",
        "localhostNodePorts",
        "conntrack.surprise",
        "noSuchField",
    ] {
        assert!(
            all.contains(expected),
            "no warning about {expected}:\n{all}"
        );
    }
}

#[test]
fn wrong_files_are_refused_with_the_reason() {
    let refused = |text: &str| {
        KubeProxyConfiguration::parse(text)
            .and_then(|c| c.apply(&mut run_args(&[])))
            .expect_err("refused")
            .to_string()
    };
    assert!(
        refused("kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1")
            .contains("kind")
    );
    assert!(
        refused("kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1beta9")
            .contains("apiVersion")
    );
    let head = "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n";
    assert!(refused(&format!("{head}mode: kernelspace")).contains("kernelspace"));
    assert!(refused(&format!("{head}detectLocalMode: Guess")).contains("detectLocalMode"));
    assert!(refused(&format!("{head}clusterCIDR: nope")).contains("clusterCIDR"));
    assert!(refused(&format!("{head}iptables: {{syncPeriod: soon}}")).contains("syncPeriod"));
    assert!(refused(&format!("{head}conntrack: {{min: -1}}")).contains("conntrack.min"));
    assert!(refused(&format!("{head}[not, a, map]")).contains("not a KubeProxyConfiguration"));
}
