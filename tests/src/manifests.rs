//! Builders for the Service and EndpointSlice manifests tests write into the agent's
//! manifest directory, producing the same YAML `kubectl get -o yaml` would.

use std::fmt::Write as _;

/// A service port: name (may be empty), protocol, port, optional nodePort.
#[derive(Clone, Debug)]
pub struct Port {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A named port.
pub fn port(name: &str, protocol: &str, port: u16) -> Port {
    Port {
        name: name.into(),
        protocol: protocol.into(),
        port,
        node_port: None,
    }
}

impl Port {
    pub fn node_port(mut self, n: u16) -> Self {
        self.node_port = Some(n);
        self
    }
}

/// A Service manifest.
#[derive(Clone, Debug)]
pub struct Service {
    name: String,
    namespace: String,
    cluster_ips: Vec<String>,
    ports: Vec<Port>,
    spec_extra: Vec<String>,
    status_extra: Vec<String>,
    labels: Vec<(String, String)>,
}

impl Service {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            cluster_ips: Vec::new(),
            ports: Vec::new(),
            spec_extra: Vec::new(),
            status_extra: Vec::new(),
            labels: Vec::new(),
        }
    }

    pub fn namespace(mut self, ns: &str) -> Self {
        self.namespace = ns.into();
        self
    }

    /// ClusterIP(s), primary first; `None` makes it headless.
    pub fn cluster_ip(mut self, ip: &str) -> Self {
        self.cluster_ips.push(ip.into());
        self
    }

    pub fn port(mut self, p: Port) -> Self {
        self.ports.push(p);
        self
    }

    /// A raw `spec` field, e.g. `type: NodePort`.
    pub fn spec(mut self, line: &str) -> Self {
        self.spec_extra.push(line.into());
        self
    }

    /// A raw `status` field, e.g. `loadBalancer: {ingress: [{ip: 203.0.113.20}]}`.
    pub fn status(mut self, line: &str) -> Self {
        self.status_extra.push(line.into());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.into(), value.into()));
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        let _ = writeln!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {}\n  namespace: {}",
            self.name, self.namespace
        );
        if !self.labels.is_empty() {
            y.push_str("  labels:\n");
            for (k, v) in &self.labels {
                let _ = writeln!(y, "    {k}: {v:?}");
            }
        }
        y.push_str("spec:\n");
        if let Some(first) = self.cluster_ips.first() {
            let _ = writeln!(y, "  clusterIP: {first:?}");
            let _ = writeln!(
                y,
                "  clusterIPs: [{}]",
                self.cluster_ips
                    .iter()
                    .map(|ip| format!("{ip:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        for line in &self.spec_extra {
            let _ = writeln!(y, "  {line}");
        }
        if !self.ports.is_empty() {
            y.push_str("  ports:\n");
            for p in &self.ports {
                let _ = write!(y, "  - port: {}\n    protocol: {}\n", p.port, p.protocol);
                if !p.name.is_empty() {
                    let _ = writeln!(y, "    name: {}", p.name);
                }
                if let Some(n) = p.node_port {
                    let _ = writeln!(y, "    nodePort: {n}");
                }
            }
        }
        if !self.status_extra.is_empty() {
            y.push_str("status:\n");
            for line in &self.status_extra {
                let _ = writeln!(y, "  {line}");
            }
        }
        y
    }
}

/// One endpoint of a slice.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub ip: String,
    pub node: String,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub hostname: Option<String>,
    /// The zone of its node, as the EndpointSlice controller records it.
    pub zone: Option<String>,
    /// Topology hints: `hints.forZones` and `hints.forNodes` names.
    pub zone_hints: Vec<String>,
    pub node_hints: Vec<String>,
}

/// A ready endpoint on the test node.
pub fn ep(ip: &str) -> Endpoint {
    Endpoint {
        ip: ip.into(),
        node: crate::cluster::NODE_NAME.into(),
        ready: None,
        serving: None,
        terminating: None,
        hostname: None,
        zone: None,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    }
}

impl Endpoint {
    pub fn on_node(mut self, node: &str) -> Self {
        self.node = node.into();
        self
    }

    pub fn in_zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// `hints.forZones`: the zones whose nodes should use this endpoint (Topology
    /// Aware Routing, `trafficDistribution: PreferClose`).
    pub fn for_zones(mut self, zones: &[&str]) -> Self {
        self.zone_hints = zones.iter().map(|z| z.to_string()).collect();
        self
    }

    /// `hints.forNodes`: the nodes that should use this endpoint
    /// (`trafficDistribution: PreferSameNode`).
    pub fn for_nodes(mut self, nodes: &[&str]) -> Self {
        self.node_hints = nodes.iter().map(|n| n.to_string()).collect();
        self
    }

    pub fn conditions(mut self, ready: bool, serving: bool, terminating: bool) -> Self {
        self.ready = Some(ready);
        self.serving = Some(serving);
        self.terminating = Some(terminating);
        self
    }
}

/// An EndpointSlice manifest for `service` in namespace `default`.
pub fn slice(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[Port],
    endpoints: &[Endpoint],
) -> String {
    slice_in("default", name, service, address_type, ports, endpoints)
}

/// An EndpointSlice manifest for `service` in `namespace`.
pub fn slice_in(
    namespace: &str,
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[Port],
    endpoints: &[Endpoint],
) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: {address_type}"
    );
    y.push_str("ports:\n");
    for p in ports {
        let _ = writeln!(
            y,
            "- port: {}\n  protocol: {}\n  name: {:?}",
            p.port, p.protocol, p.name
        );
    }
    if endpoints.is_empty() {
        y.push_str("endpoints: []\n");
    } else {
        y.push_str("endpoints:\n");
    }
    for e in endpoints {
        let _ = writeln!(y, "- addresses: [{:?}]\n  nodeName: {}", e.ip, e.node);
        if e.ready.is_some() {
            let _ = writeln!(
                y,
                "  conditions: {{ready: {}, serving: {}, terminating: {}}}",
                e.ready.unwrap_or(true),
                e.serving.unwrap_or(true),
                e.terminating.unwrap_or(false)
            );
        }
        if let Some(h) = &e.hostname {
            let _ = writeln!(y, "  hostname: {h}");
        }
        if let Some(z) = &e.zone {
            let _ = writeln!(y, "  zone: {z}");
        }
        if !e.zone_hints.is_empty() || !e.node_hints.is_empty() {
            let names = |names: &[String]| {
                names
                    .iter()
                    .map(|n| format!("{{name: {n}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let mut hints = Vec::new();
            if !e.zone_hints.is_empty() {
                hints.push(format!("forZones: [{}]", names(&e.zone_hints)));
            }
            if !e.node_hints.is_empty() {
                hints.push(format!("forNodes: [{}]", names(&e.node_hints)));
            }
            let _ = writeln!(y, "  hints: {{{}}}", hints.join(", "));
        }
    }
    y
}

/// A Node manifest: its name (also the `kubernetes.io/hostname` label), the
/// `topology.kubernetes.io/zone` label, pod CIDRs, and InternalIP addresses.
pub fn node(name: &str, zone: &str, pod_cidrs: &[&str], internal_ips: &[&str]) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\n    topology.kubernetes.io/zone: {zone}\nspec:"
    );
    if let Some(first) = pod_cidrs.first() {
        let _ = writeln!(y, "  podCIDR: {first:?}");
        let _ = writeln!(
            y,
            "  podCIDRs: [{}]",
            pod_cidrs
                .iter()
                .map(|c| format!("{c:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    y.push_str("status:\n  addresses:\n");
    for ip in internal_ips {
        let _ = writeln!(y, "  - type: InternalIP\n    address: {ip:?}");
    }
    let _ = writeln!(y, "  - type: Hostname\n    address: {name}");
    y
}

/// Joins documents into one multi-document file.
pub fn docs(parts: &[String]) -> String {
    parts.join("---\n")
}
