//! `ferry explain NAMESPACE/SERVICE`: why this node does what it does with one
//! service. The running agent answers from its model ([`crate::model::explain`]) and
//! its data plane (what is programmed), at `/explain` on the metrics address; this
//! module carries the question to the proxy loop and prints the answer for people.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;

use crate::model::ServiceName;
use crate::model::explain::{EndpointExplanation, PortExplanation, ServiceExplanation, Usage};

/// A question to the proxy loop; the answer goes to `reply` (`None`: no such
/// service in the model).
#[derive(Clone, Debug)]
pub struct Question {
    pub service: ServiceName,
    /// Only the ports with this name or number.
    pub port: Option<String>,
    pub reply: SyncSender<Option<ServiceExplanation>>,
}

/// Parses `NAMESPACE/NAME` (a bare `NAME` is in `default`, as kubectl has it).
pub fn parse_service(text: &str) -> Result<ServiceName, String> {
    let (namespace, name) = text.split_once('/').unwrap_or(("default", text));
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if label(namespace) && label(name) {
        Ok(ServiceName::new(namespace, name))
    } else {
        Err(format!("{text:?} is not NAMESPACE/NAME"))
    }
}

/// Asks the agent at `address` (its `--metrics-bind-address`).
pub fn fetch(
    address: SocketAddr,
    service: &ServiceName,
    port: Option<&str>,
) -> anyhow::Result<ServiceExplanation> {
    let mut path = format!("/explain?service={service}");
    if let Some(port) = port {
        let _ = write!(path, "&port={port}");
    }
    crate::status::get_json(address, &path)
}

/// The explanation for people.
pub fn render(e: &ServiceExplanation) -> String {
    let mut out = String::new();
    let zone = e
        .zone
        .as_deref()
        .map(|z| format!(", zone {z}"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "service {} ({}) on node {}{zone}",
        e.service, e.service_type, e.node
    );
    if let Some(why) = &e.not_proxied {
        let _ = writeln!(out, "not proxied: {why}");
    }
    if e.changes_pending {
        let _ = writeln!(
            out,
            "note: changes are waiting for the next sync; decisions below are the last programmed ones"
        );
    }
    if e.not_proxied.is_none() && e.ports.is_empty() {
        let _ = writeln!(out, "no such port");
    }
    for p in &e.ports {
        render_port(&mut out, p);
    }
    out
}

fn render_port(out: &mut String, p: &PortExplanation) {
    let _ = writeln!(out, "\nport {} {} {}", p.port, p.protocol, p.family);
    let line = |out: &mut String, label: &str, text: &str| {
        let _ = writeln!(out, "  {label:<15}{text}");
    };
    if let Some(why) = &p.not_programmed {
        line(out, "NOT PROGRAMMED", why);
    }
    for f in &p.frontends {
        line(out, "frontend", f);
    }
    for f in &p.lost_frontends {
        line(out, "lost frontend", f);
    }
    if !p.load_balancer_source_ranges.is_empty() {
        line(
            out,
            "source ranges",
            &p.load_balancer_source_ranges.join(", "),
        );
    }
    if let Some(t) = p.affinity_timeout_seconds {
        line(out, "affinity", &format!("ClientIP, {t} s"));
    }
    if p.node_local_dns {
        line(
            out,
            "node DNS",
            "answered by this node's DNS server while it serves, by the endpoints otherwise",
        );
    }
    for (label, v) in [("ClusterIP", &p.internal), ("external", &p.external)] {
        if let Some(v) = v {
            let text = format!(
                "{} ({} policy): {}",
                v.action.to_uppercase(),
                v.policy,
                v.why
            );
            line(out, label, &text);
        }
    }
    line(out, "topology", &p.topology);
    let _ = writeln!(
        out,
        "  endpoints:{}",
        if p.endpoints.is_empty() { " none" } else { "" }
    );
    for ep in &p.endpoints {
        render_endpoint(out, ep);
    }
    for what in &p.programmed {
        line(out, "programmed", what);
    }
}

fn render_endpoint(out: &mut String, ep: &EndpointExplanation) {
    let node = ep
        .node
        .as_deref()
        .map(|n| format!(" on {n}"))
        .unwrap_or_default();
    let zone = ep
        .zone
        .as_deref()
        .map(|z| format!(" ({z})"))
        .unwrap_or_default();
    let _ = writeln!(out, "    {}{node}{zone}: {}", ep.address, ep.conditions);
    let usage = |out: &mut String, set: &str, u: &Option<Usage>| {
        if let Some(u) = u {
            let verdict = if u.used { "used" } else { "NOT used" };
            let _ = writeln!(out, "      {set:<18}{verdict}: {}", u.why);
        }
    };
    usage(out, "cluster-wide set", &ep.cluster);
    usage(out, "this node's set", &ep.local);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::explain::Verdict;

    #[test]
    fn service_names_parse_like_kubectl() {
        assert_eq!(parse_service("ns/web"), Ok(ServiceName::new("ns", "web")));
        assert_eq!(parse_service("web"), Ok(ServiceName::new("default", "web")));
        assert!(parse_service("ns/web&x=1").is_err());
        assert!(parse_service("ns/").is_err());
    }

    #[test]
    fn the_text_names_each_decision() {
        let e = ServiceExplanation {
            service: "ns/web".into(),
            node: "node-a".into(),
            service_type: "ClusterIP".into(),
            ports: vec![PortExplanation {
                port: "ns/web:http".into(),
                protocol: "TCP".into(),
                family: "IPv4".into(),
                frontends: vec!["ClusterIP 10.96.0.10:80/TCP".into()],
                internal: Some(Verdict {
                    policy: "Cluster".into(),
                    action: "reject".into(),
                    why: "no endpoint anywhere can serve".into(),
                }),
                topology: "no topology hints".into(),
                endpoints: vec![EndpointExplanation {
                    address: "10.0.0.4:8080".into(),
                    node: Some("node-b".into()),
                    conditions: "not ready".into(),
                    cluster: Some(Usage {
                        used: false,
                        why: "not ready".into(),
                    }),
                    ..EndpointExplanation::default()
                }],
                programmed: vec!["iptables filter: 1 rule(s)".into()],
                ..PortExplanation::default()
            }],
            ..ServiceExplanation::default()
        };
        let text = render(&e);
        for wanted in [
            "service ns/web (ClusterIP) on node node-a",
            "  ClusterIP      REJECT (Cluster policy): no endpoint anywhere can serve",
            "    10.0.0.4:8080 on node-b: not ready",
            "      cluster-wide set  NOT used: not ready",
            "  programmed     iptables filter: 1 rule(s)",
        ] {
            assert!(text.contains(wanted), "{wanted:?} missing in\n{text}");
        }
    }
}
