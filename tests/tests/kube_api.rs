//! The Kubernetes API source against a fake API server running on the node: initial
//! list, changes flowing to the data plane, dropped watches, 410 Gone, outages.

use std::time::Duration;

use ferry_tests::apiserver::{FakeApi, Kind};
use ferry_tests::manifests::{Service, ep, port, slice};
use ferry_tests::{Cluster, From, Mode};

const WAIT: Duration = Duration::from_secs(15);
const API: &str = "127.0.0.1:6443";

fn web_service() -> String {
    Service::new("web")
        .cluster_ip("10.96.0.10")
        .port(port("http", "TCP", 80))
        .yaml()
}

fn web_slice(c: &Cluster, pods: &[&str]) -> String {
    let eps: Vec<_> = pods.iter().map(|p| ep(&c.pod(p).ip)).collect();
    slice("web-1", "web", "IPv4", &[port("http", "TCP", 8080)], &eps)
}

/// A node whose agent watches the fake API server (already holding `web` on pod a).
fn api_node() -> (Cluster, FakeApi) {
    let mut c = Cluster::new(Mode::Iptables, &["a", "b", "client"]);
    let api = c.in_node(|| FakeApi::start(API.parse().expect("addr")));
    api.apply(&web_service());
    api.apply(&web_slice(&c, &["a"]));
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: z1}}\n");
    api.apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n");
    c.use_kubeconfig(&api.kubeconfig());
    c.start_agent();
    (c, api)
}

fn reaches(c: &Cluster, pods: &[&str]) -> bool {
    c.tcp(From::Pod("client"), "10.96.0.10:80", 20).pods() == pods
}

#[test]
fn initial_list_then_changes_flow_to_the_data_plane() {
    let (c, api) = api_node();
    assert!(reaches(&c, &["a"]));
    api.apply(&web_slice(&c, &["a", "b"]));
    c.wait_for("endpoint b via watch", WAIT, || reaches(&c, &["a", "b"]));
    api.delete(Kind::Service, "default", "web");
    c.wait_for("service deleted via watch", WAIT, || {
        c.tcp_with(From::Pod("client"), "10.96.0.10:80", 1, 300, 0)
            .successes()
            == 0
    });
}

#[test]
fn dropped_watch_resumes_without_losing_changes() {
    let (c, api) = api_node();
    api.drop_watches();
    // Changes made while the watchers reconnect are delivered from history.
    api.apply(&web_slice(&c, &["b"]));
    c.wait_for("change made during the reconnect", WAIT, || {
        reaches(&c, &["b"])
    });
    assert!(
        // One initial list per kind: Services, EndpointSlices, Nodes, ServiceCIDRs.
        c.agent_log().matches("listed").count() <= 4,
        "a resume must not relist:\n{}",
        c.agent_log()
    );
}

#[test]
fn gone_history_leads_to_a_relist_including_deletions() {
    let (c, api) = api_node();
    api.apply(
        &Service::new("old")
            .cluster_ip("10.96.0.11")
            .port(port("http", "TCP", 80))
            .yaml(),
    );
    api.apply(&slice(
        "old-1",
        "old",
        "IPv4",
        &[port("http", "TCP", 8080)],
        &[ep(&c.pod("a").ip)],
    ));
    c.wait_for("old service programmed", WAIT, || {
        c.tcp(From::Pod("client"), "10.96.0.11:80", 1).successes() == 1
    });
    // While the watchers are away, things change and history is compacted: resuming
    // gets 410 Gone and the source must relist, noticing the deletion.
    api.set_down(true);
    api.delete(Kind::Service, "default", "old");
    api.apply(&web_slice(&c, &["b"]));
    api.compact();
    api.set_down(false);
    c.wait_for("relist after 410", WAIT, || reaches(&c, &["b"]));
    c.wait_for("deletion found by the relist", WAIT, || {
        c.tcp_with(From::Pod("client"), "10.96.0.11:80", 1, 300, 0)
            .successes()
            == 0
    });
    let log = c.agent_log();
    assert!(
        log.matches(" listed").count() > 3,
        "410 Gone must lead to a relist:\n{log}"
    );
}

#[test]
fn api_outage_keeps_the_last_state_serving() {
    let (mut c, api) = api_node();
    let connected = status(&c)["source_connected"].clone();
    assert_eq!(connected, true, "{}", status(&c));
    assert!(status(&c)["resource_version"].is_string(), "{}", status(&c));
    api.set_down(true);
    // `ferry status` says so (the watch fails on its next call).
    c.wait_for("ferry status to report the outage", WAIT, || {
        status(&c)["source_connected"] == false
    });
    assert!(status(&c)["source_error"].is_string(), "{}", status(&c));
    assert!(
        reaches(&c, &["a"]),
        "the programmed state is untouched while the API is down"
    );
    assert!(c.agent_alive());
    api.set_down(false);
    api.apply(&web_slice(&c, &["a", "b"]));
    c.wait_for("changes after the outage", WAIT, || {
        reaches(&c, &["a", "b"])
    });
    assert_eq!(status(&c)["source_connected"], true, "{}", status(&c));
}

/// `ferry status --json` of the node's agent.
fn status(c: &Cluster) -> serde_json::Value {
    let out = c
        .node_command(c.bin("ferry"))
        .args(["status", "--json"])
        .output()
        .expect("ferry status");
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// After a long outage followed by 410 Gone, changes flow again promptly (client-go
/// relists about a second after a 410), not after a backoff that grew during the
/// outage; and the outage is not logged once per retry.
#[test]
fn changes_flow_soon_after_a_long_outage_and_410() {
    let (c, api) = api_node();
    api.set_down(true);
    // Long enough for kube-rs' default backoff (0.8 s doubling, jittered) to have its
    // next retry more than 5 s after the server is back.
    std::thread::sleep(Duration::from_secs(16));
    api.apply(&web_slice(&c, &["b"]));
    api.compact();
    api.set_down(false);
    c.wait_for(
        "the change after the outage",
        Duration::from_secs(5),
        || reaches(&c, &["b"]),
    );
    let log = c.agent_log();
    let warnings = log.matches("list/watch failed").count();
    assert!(
        (1..=6).contains(&warnings),
        "one warning per kind and interval, not per retry ({warnings}):\n{log}"
    );
}

/// `--master` (kube-proxy's flag) overrides the kubeconfig's server, as a node that
/// boots without kube-proxy needs (its kubeconfig or in-cluster address may be a
/// ClusterIP nothing programs yet).
#[test]
fn master_overrides_the_kubeconfig_server() {
    let mut c = Cluster::new(Mode::Iptables, &["a", "b", "client"]);
    let api = c.in_node(|| FakeApi::start(API.parse().expect("addr")));
    api.apply(&web_service());
    api.apply(&web_slice(&c, &["a"]));
    // The kubeconfig names an address where nothing listens.
    let unreachable = api.kubeconfig().replace(API, "127.0.0.1:1");
    assert_ne!(unreachable, api.kubeconfig());
    c.use_kubeconfig(&unreachable);
    c.start_agent_with(&["--master", &format!("http://{API}")]);
    assert!(reaches(&c, &["a"]));
}

/// kube-proxy's informers select out services carrying either label; so does Ferry.
#[test]
fn service_proxy_name_and_headless_labels_are_honoured() {
    let (c, api) = api_node();
    for (label, value) in [
        ("service.kubernetes.io/service-proxy-name", "other-proxy"),
        ("service.kubernetes.io/headless", ""),
    ] {
        api.apply(
            &Service::new("web")
                .cluster_ip("10.96.0.10")
                .label(label, value)
                .port(port("http", "TCP", 80))
                .yaml(),
        );
        c.wait_for(&format!("{label}: no longer proxied"), WAIT, || {
            c.tcp_with(From::Pod("client"), "10.96.0.10:80", 1, 300, 0)
                .successes()
                == 0
        });
        api.apply(&web_service());
        c.wait_for("label removed: proxied again", WAIT, || reaches(&c, &["a"]));
    }
}

#[test]
fn unhealthy_until_the_first_complete_view() {
    let mut c = Cluster::new(Mode::Iptables, &["a", "client"]);
    let api = c.in_node(|| FakeApi::start(API.parse().expect("addr")));
    api.apply(&web_service());
    api.apply(&web_slice(&c, &["a"]));
    api.set_down(true);
    c.use_kubeconfig(&api.kubeconfig());
    let dns = format!("{}:53", ferry_tests::cluster::NODE_IP);
    c.spawn_agent(&["--dns-listen", &dns, "--dns-upstream", "172.18.0.100:53"]);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(c.healthz(), Some(503), "no complete view yet: not ready");
    let dig = |c: &Cluster, name: &str| {
        ferry_tests::dig::run(
            c.pod_command("client", "dig"),
            ferry_tests::cluster::NODE_IP,
            name,
            "A",
            &[],
        )
    };
    let early = dig(&c, "web.default.svc.cluster.local");
    assert_eq!(
        early.status, "SERVFAIL",
        "no NXDOMAIN before the first complete view: {}",
        early.raw
    );
    assert_eq!(
        c.tcp_with(From::Pod("client"), "10.96.0.10:80", 1, 300, 0)
            .successes(),
        0,
        "nothing programmed from a partial view"
    );
    api.set_down(false);
    c.wait_healthy();
    assert!(reaches(&c, &["a"]));
    assert_eq!(
        dig(&c, "web.default.svc.cluster.local").data("A"),
        ["10.96.0.10"]
    );
}

/// The RBAC in deploy/base/rbac.yaml grants exactly what the agent asks the API for.
#[test]
fn rbac_in_deploy_matches_the_requests_made() {
    let (c, api) = api_node();
    api.apply(&web_slice(&c, &["a", "b"]));
    c.wait_for("watching", WAIT, || reaches(&c, &["a", "b"]));
    let made = api.requests();
    // Operators tell Ferry's requests apart by their User-Agent.
    let agents = api.user_agents();
    let ours = format!("ferry/{}", env!("CARGO_PKG_VERSION"));
    assert!(agents.iter().all(|a| *a == ours), "{agents:?}");
    assert!(!agents.is_empty());
    let text = std::fs::read_to_string(ferry_tests::repo_root().join("deploy/base/rbac.yaml"))
        .expect("deploy/base/rbac.yaml");
    let mut granted = std::collections::BTreeSet::new();
    for value in ferry_tests::yaml_documents(&text) {
        if value["kind"].as_str() != Some("ClusterRole") {
            continue;
        }
        for rule in value["rules"].as_array().expect("rules") {
            for group in rule["apiGroups"].as_array().expect("groups") {
                for resource in rule["resources"].as_array().expect("resources") {
                    for verb in rule["verbs"].as_array().expect("verbs") {
                        granted.insert((
                            group.as_str().unwrap_or_default().to_owned(),
                            resource.as_str().unwrap_or_default().to_owned(),
                            verb.as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                }
            }
        }
    }
    assert_eq!(made, granted, "requests made vs. RBAC granted");
}

/// Through the API: a Node being deleted turns /healthz 503 (`nodeEligible: false`),
/// and an EndpointSlice's trigger-time annotation is where network programming latency
/// starts.
#[test]
fn node_deletion_and_trigger_times_from_the_api() {
    let (c, api) = api_node();
    let programmed = || {
        c.metric("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"}")
            .unwrap_or(0.0)
    };
    assert_eq!(programmed(), 0.0);
    let annotated = web_slice(&c, &["a", "b"]).replacen(
        "  labels:\n",
        &format!(
            "  annotations:\n    endpoints.kubernetes.io/last-change-trigger-time: \"{}\"\n  labels:\n",
            jiff::Timestamp::now()
        ),
        1,
    );
    api.apply(&annotated);
    c.wait_for("network programming measured", WAIT, || programmed() == 1.0);
    assert!(reaches(&c, &["a", "b"]));
    api.apply(
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, deletionTimestamp: '2026-12-01T00:00:00Z', finalizers: [x]}\n",
    );
    c.wait_for("healthz 503 while the node is deleted", WAIT, || {
        c.healthz() == Some(503)
    });
    let (_, response) = c.http_get(10256, "/healthz").expect("healthz");
    assert!(response.contains("\"nodeEligible\":false"), "{response}");
    assert!(
        reaches(&c, &["a", "b"]),
        "traffic still flows while draining"
    );
}
