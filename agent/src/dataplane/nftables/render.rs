//! Pure rendering of Ferry's nftables layout: one service port plan in, its own
//! chains, affinity sets and map elements out, as `nft` syntax. No I/O, so the layout
//! is unit-tested without root.
//!
//! Lookups go through verdict maps keyed by `daddr . l4proto . dport` (ClusterIPs,
//! externalIPs, LB IPs) or `l4proto . dport` (NodePorts): their cost does not grow
//! with the number of services. Almost every frontend then goes to a shared
//! [`Balancer`] chain (`balance-svc-tcp-3`: "3 endpoints") whose one DNAT looks up
//! `frontend . numgen random mod 3` in an endpoint map, so a service is map elements
//! only, not chains. Plans whose choice depends on the client (ClientIP affinity,
//! loadBalancerSourceRanges, `Local` external policy) keep chains of their own,
//! picking an endpoint with cascading rules (`numgen random mod (n-i) 0 ... dnat`),
//! not kube-proxy's per-service anonymous vmap: every set costs the kernel a set
//! object, and 10,000 of them made kube-proxy's full load ~70 s here (see `mod.rs`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::super::iptables::chains::{hash16, service_port_hash};
use crate::model::{
    Endpoint, EndpointSet, IpFamily, LocalTraffic, NodeNetwork, Protocol, ServicePortName,
    ServicePortPlan, Traffic,
};

/// Name of Ferry's table in each family (`ip ferry`, `ip6 ferry`).
pub const TABLE: &str = "ferry";
/// Marks a packet for masquerade in `nat-postrouting` (kube-proxy's mark).
pub const MASQ_MARK: u32 = 0x4000;
/// Chain that refuses a connection (ICMP port unreachable).
const REJECT_CHAIN: &str = "reject-chain";
/// Hook priorities, numeric: nft before 1.0.7 accepts the names (`dstnat`) only
/// at some hooks.
const RAW: i32 = -300;
const DSTNAT: i32 = -100;
const FILTER: i32 = 0;
const SRCNAT: i32 = 100;
/// Chain that marks for masquerade.
const MARK_MASQ: &str = "mark-for-masquerade";

/// nft's words for one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Words {
    /// Table family and address expression prefix: `ip` or `ip6`.
    pub af: &'static str,
    /// Address type in set declarations.
    pub addr_type: &'static str,
}

impl Words {
    /// The words of `family`.
    pub fn of(family: IpFamily) -> Self {
        match family {
            IpFamily::V4 => Self {
                af: "ip",
                addr_type: "ipv4_addr",
            },
            IpFamily::V6 => Self {
                af: "ip6",
                addr_type: "ipv6_addr",
            },
        }
    }
}

/// The named maps and sets of the table, each with one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Collection {
    /// ClusterIPs, externalIPs and LB IPs that forward: `goto` the service's chain.
    ServiceIps,
    /// NodePorts that forward (on the NodePort addresses): `goto` the external chain.
    ServiceNodeports,
    /// ClusterIPs refused (checked in forward and output).
    NoEndpointServices,
    /// externalIPs / LB IPs refused (checked in input and forward).
    NoEndpointExternal,
    /// NodePorts refused on local destinations (input and forward).
    NoEndpointNodeports,
    /// LB IPs with loadBalancerSourceRanges: `goto` the service's firewall chain.
    FirewallIps,
    /// Every ClusterIP: connections to a port no service offers are refused.
    ClusterIps,
    /// `endpoint . endpoint`: a pod reaching itself through a service is masqueraded.
    Hairpin,
    /// The addresses NodePorts answer on.
    NodeportIps,
    /// Frontends answered by the node's own DNS server while it serves.
    NodeLocalDns,
    /// The ServiceCIDRs' ranges: traffic to an address in them that no service
    /// holds is dropped (kube-proxy's "unallocated ClusterIP").
    ServiceCidrs,
    /// `frontend . index : endpoint` of the frontends one [`Balancer`] chain serves
    /// (its own map, named like it: a rule binding a map makes the kernel walk all
    /// its elements, so a new chain must bind a new, empty map).
    Endpoints(Balancer),
}

impl Collection {
    /// Every collection of the table's fixed part, in declaration order.
    pub const ALL: [Collection; 11] = [
        Self::ServiceIps,
        Self::ServiceNodeports,
        Self::NoEndpointServices,
        Self::NoEndpointExternal,
        Self::NoEndpointNodeports,
        Self::FirewallIps,
        Self::ClusterIps,
        Self::Hairpin,
        Self::NodeportIps,
        Self::NodeLocalDns,
        Self::ServiceCidrs,
    ];

    /// Its name in the table.
    pub fn name(self) -> Cow<'static, str> {
        let name = match self {
            Self::ServiceIps => "service-ips",
            Self::ServiceNodeports => "service-nodeports",
            Self::NoEndpointServices => "no-endpoint-services",
            Self::NoEndpointExternal => "no-endpoint-external",
            Self::NoEndpointNodeports => "no-endpoint-nodeports",
            Self::FirewallIps => "firewall-ips",
            Self::ClusterIps => "cluster-ips",
            Self::Hairpin => "hairpin",
            Self::NodeportIps => "nodeport-ips",
            Self::NodeLocalDns => "node-local-dns",
            Self::ServiceCidrs => "service-cidrs",
            Self::Endpoints(balancer) => return Cow::Owned(balancer.name()),
        };
        Cow::Borrowed(name)
    }

    /// Whether one claimed element stands for a list of kernel elements (one per
    /// endpoint index), so claims stay one per frontend.
    pub fn is_endpoint_list(self) -> bool {
        matches!(self, Self::Endpoints(_))
    }

    /// `map NAME` or `set NAME`, with its type.
    fn declaration(self, w: Words) -> String {
        let addr = w.addr_type;
        let frontend = format!("{addr} . inet_proto . inet_service");
        let (kind, ty) = match self {
            Self::ServiceIps
            | Self::NoEndpointServices
            | Self::NoEndpointExternal
            | Self::FirewallIps => ("map", format!("{frontend} : verdict")),
            Self::ServiceNodeports | Self::NoEndpointNodeports => {
                ("map", "inet_proto . inet_service : verdict".to_owned())
            }
            Self::ClusterIps | Self::NodeportIps => ("set", addr.to_owned()),
            Self::Hairpin => ("set", format!("{addr} . {addr}")),
            Self::NodeLocalDns => ("set", frontend),
            // Two ServiceCIDRs may overlap (one replacing another): merged.
            Self::ServiceCidrs => ("set", format!("{addr}; flags interval; auto-merge")),
            Self::Endpoints(balancer) => return balancer.map_declaration(w),
        };
        format!("{kind} {} {{ type {ty}; }}", self.name())
    }
}

/// One element of a map or set: `key` or `key : value`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Element {
    pub collection: Collection,
    pub key: String,
    /// The verdict of a map element; empty for a set element.
    pub value: String,
}

/// Calls `f` with each kernel element `key`/`value` stands for, as written inside
/// `{ }`: `key : value`, `key` for a set, or `key . i : endpoint i` for an endpoint
/// list (`value` is its endpoints joined by `,`).
pub fn entries(collection: Collection, key: &str, value: &str, mut f: impl FnMut(String)) {
    if collection.is_endpoint_list() {
        for (i, ep) in value.split(',').enumerate() {
            f(format!("{key} . {i} : {ep}"));
        }
    } else if value.is_empty() {
        f(key.to_owned());
    } else {
        f(format!("{key} : {value}"));
    }
}

/// The keys of the kernel elements `key`/`value` stands for (what a delete names).
pub fn entry_keys(collection: Collection, key: &str, value: &str, mut f: impl FnMut(String)) {
    if collection.is_endpoint_list() {
        for i in 0..value.split(',').count() {
            f(format!("{key} . {i}"));
        }
    } else {
        f(key.to_owned());
    }
}

/// The start of every [`Balancer`] chain's and map's name.
pub const BALANCER_PREFIX: &str = "balance-";

/// What a `balance-*` chain's frontends are, which decides its masquerade and the
/// map its DNAT looks up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BalancerKind {
    /// ClusterIPs (their masquerade is decided in `services`).
    ClusterIp,
    /// externalIPs and LB IPs of services with `Cluster` external policy.
    External,
    /// NodePorts of services with `Cluster` external policy.
    NodePort,
}

/// A chain shared by every frontend of one kind and protocol with `endpoints`
/// endpoints: one DNAT through the endpoint map, keyed by the frontend and a random
/// index. Plans without affinity, source ranges or `Local` external policy (almost
/// all) need no chain of their own, so a change of their endpoints is element
/// writes only and the table holds a few chains instead of one per service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Balancer {
    pub kind: BalancerKind,
    pub protocol: Protocol,
    pub endpoints: usize,
}

impl Balancer {
    /// Its chain's and its endpoint map's name, e.g. `balance-svc-tcp-3`.
    pub fn name(&self) -> String {
        let kind = match self.kind {
            BalancerKind::ClusterIp => "svc",
            BalancerKind::External => "ext",
            BalancerKind::NodePort => "np",
        };
        let proto = self.protocol.lower();
        format!("{BALANCER_PREFIX}{kind}-{proto}-{}", self.endpoints)
    }

    /// Its chain (the DNAT names its protocol, as nft requires for a port).
    pub fn chain(&self, w: Words) -> Chain {
        let (af, proto, n) = (w.af, self.protocol.lower(), self.endpoints);
        let key = format!(
            "{}meta l4proto . th dport . numgen random mod {n}",
            self.daddr(w)
        );
        let dnat = format!(
            "meta l4proto {proto} dnat {af} to {key} map @{}",
            self.name()
        );
        let mut rules = Vec::new();
        if self.kind != BalancerKind::ClusterIp {
            rules.push(format!("jump {MARK_MASQ}"));
        }
        rules.push(dnat);
        Chain {
            name: self.name(),
            rules,
        }
    }

    /// `ip daddr . ` where the frontend key has an address (not for NodePorts).
    fn daddr(&self, w: Words) -> String {
        match self.kind {
            BalancerKind::NodePort => String::new(),
            _ => format!("{} daddr . ", w.af),
        }
    }

    /// Its endpoint map's declaration. `typeof`: the key ends in a numgen value (a
    /// 32-bit integer). The value's port names the protocol: nft refuses `th dport`
    /// there once the map is read back from the kernel.
    pub fn map_declaration(&self, w: Words) -> String {
        format!("map {}", self.map_body(w))
    }

    /// The map's name and type, as `add map FAMILY TABLE` takes them.
    pub fn map_body(&self, w: Words) -> String {
        let key = format!(
            "{}meta l4proto . th dport . numgen random mod 1",
            self.daddr(w)
        );
        let value = format!("{} daddr . {} dport", w.af, self.protocol.lower());
        format!("{} {{ typeof {key} : {value}; }}", self.name())
    }
}

/// One of a plan's own chains with its rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

/// A dynamic set remembering which clients an endpoint serves (ClientIP affinity).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AffinitySet {
    pub name: String,
    pub timeout_seconds: u32,
}

impl AffinitySet {
    /// Its declaration (inside a table block, or after `add set FAMILY TABLE`).
    pub fn declaration(&self, w: Words) -> String {
        format!(
            "{} {{ type {}; flags dynamic,timeout; timeout {}s; }}",
            self.name, w.addr_type, self.timeout_seconds
        )
    }
}

/// Everything one plan adds to the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceObjects {
    /// Its own chains, each created before any rule jumps to it.
    pub chains: Vec<Chain>,
    pub affinity_sets: Vec<AffinitySet>,
    pub elements: Vec<Element>,
    /// The shared `balance-*` chains its map elements point to.
    pub balancers: Vec<Balancer>,
}

/// The node facts the layout of one family depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyContext {
    pub family: IpFamily,
    /// The node's network, reduced to this family.
    pub net: NodeNetwork,
}

impl FamilyContext {
    fn words(&self) -> Words {
        Words::of(self.family)
    }

    /// Matches selecting pod traffic (`negate`: everything else), one rule each.
    fn local_matches(&self, negate: bool) -> Vec<String> {
        let (af, op) = (self.words().af, if negate { "!= " } else { "" });
        match &self.net.local_traffic {
            LocalTraffic::FromCidrs(cidrs) => cidrs
                .iter()
                .map(|c| format!("{af} saddr {op}{c}"))
                .collect(),
            // iptables spells an interface prefix `veth+`, nft `veth*`.
            LocalTraffic::InInterface(iface) => {
                let pattern = match iface.strip_suffix('+') {
                    Some(prefix) => format!("{prefix}*"),
                    None => iface.clone(),
                };
                vec![format!("iifname {op}\"{pattern}\"")]
            }
        }
    }

    /// The addresses NodePorts answer on (never ::1: IPv6 cannot route loopback).
    pub fn nodeport_ips(&self) -> Vec<IpAddr> {
        let v6_loopback = |ip: &IpAddr| ip.is_ipv6() && ip.is_loopback();
        let ips = self.net.nodeport_ips.iter().copied();
        ips.filter(|ip| !v6_loopback(ip)).collect()
    }

    /// Whether NodePorts answer on 127.0.0.1 (which needs `route_localnet`).
    pub fn loopback_nodeports(&self) -> bool {
        self.family == IpFamily::V4 && self.net.nodeport_ips.iter().any(IpAddr::is_loopback)
    }
}

/// The names of one plan's chains.
struct Names {
    cluster: String,
    local: String,
    external: String,
    firewall: String,
}

impl Names {
    fn of(name: &ServicePortName) -> Self {
        let svc = &name.service;
        let readable = format!(
            "{}-{}/{}/{}/{}",
            service_port_hash(name),
            svc.namespace,
            svc.name,
            name.protocol.lower(),
            name.port
        );
        Self {
            cluster: format!("svc-{readable}"),
            local: format!("svl-{readable}"),
            external: format!("ext-{readable}"),
            firewall: format!("fw-{readable}"),
        }
    }

    fn balancing(&self, set: EndpointSet) -> &str {
        match set {
            EndpointSet::Cluster => &self.cluster,
            EndpointSet::Local => &self.local,
        }
    }
}

/// The affinity set of one endpoint of a service port (its timeout in the name, so a
/// changed timeout is a new set).
fn affinity_set_name(name: &ServicePortName, ep: &Endpoint, seconds: u32) -> String {
    let proto = name.protocol.lower();
    format!(
        "affinity-{}",
        hash16(&format!("{name}{proto}{ep}{seconds}"))
    )
}

/// Renders one plan of `ctx`'s family.
pub fn render_service(plan: &ServicePortPlan, ctx: &FamilyContext) -> ServiceObjects {
    let renderer = Renderer {
        plan,
        ctx,
        names: Names::of(&plan.key.port),
        w: ctx.words(),
    };
    let mut out = ServiceObjects::default();
    let shared = renderer.balances_in_shared_chains();
    renderer.cluster_ip(&mut out, shared);
    renderer.external_ips(&mut out, shared);
    renderer.node_port(&mut out, shared);
    renderer.hairpin(&mut out);
    if !shared {
        renderer.balancing_chains(&mut out);
        renderer.external_chain(&mut out);
        renderer.firewall_chain(&mut out);
    }
    out
}

/// Renders one plan from its facts and chain names.
struct Renderer<'a> {
    plan: &'a ServicePortPlan,
    ctx: &'a FamilyContext,
    names: Names,
    w: Words,
}

impl Renderer<'_> {
    fn proto(&self) -> &'static str {
        self.plan.key.port.protocol.lower()
    }

    /// `ip . proto . port`, the key of the frontend maps.
    fn frontend_key(&self, ip: IpAddr, port: u16) -> String {
        format!("{ip} . {} . {port}", self.proto())
    }

    fn element(&self, collection: Collection, key: String, value: String) -> Element {
        Element {
            collection,
            key,
            value,
        }
    }

    /// The verdict refusing traffic handled as `traffic`, if it is refused: reject when
    /// nothing can serve, drop when only endpoints this traffic may not use exist.
    fn refusal(traffic: Traffic<'_>) -> Option<String> {
        match traffic {
            Traffic::Forward(_) => None,
            Traffic::Reject => Some(format!("goto {REJECT_CHAIN}")),
            Traffic::Drop => Some("drop".to_owned()),
        }
    }

    /// Whether this plan balances in the shared `balance-*` chains: nothing in it
    /// depends on the client (affinity, source ranges, `Local` external policy's
    /// short-circuit of pod traffic), so the frontend and a random index pick the
    /// endpoint.
    fn balances_in_shared_chains(&self) -> bool {
        let plan = self.plan;
        plan.affinity_timeout_seconds.is_none()
            && !self.uses_firewall_chain()
            && (!plan.has_external_frontends() || plan.masquerades_external())
    }

    /// Forwards frontend `key` of map `collection` to `endpoints` through the shared
    /// chain of `kind` (the endpoint list element is keyed like the frontend).
    fn forward_shared(
        &self,
        out: &mut ServiceObjects,
        (collection, key): (Collection, String),
        kind: BalancerKind,
        endpoints: &[Endpoint],
    ) {
        let balancer = Balancer {
            kind,
            protocol: self.plan.key.port.protocol,
            endpoints: endpoints.len(),
        };
        let list = Collection::Endpoints(balancer);
        let targets: Vec<String> = endpoints
            .iter()
            .map(|ep| format!("{} . {}", ep.ip, ep.port))
            .collect();
        let to = format!("goto {}", balancer.name());
        out.elements
            .push(self.element(list, key.clone(), targets.join(",")));
        out.elements.push(self.element(collection, key, to));
        if !out.balancers.contains(&balancer) {
            out.balancers.push(balancer);
        }
    }

    /// The ClusterIP's jump or refusal, and its entry in the ClusterIP set.
    fn cluster_ip(&self, out: &mut ServiceObjects, shared: bool) {
        let (plan, key) = (
            self.plan,
            self.frontend_key(self.plan.cluster_ip, self.plan.port),
        );
        let ip = plan.cluster_ip.to_string();
        out.elements
            .push(self.element(Collection::ClusterIps, ip, String::new()));
        match plan.internal() {
            Traffic::Forward(endpoints) if shared => {
                let frontend = (Collection::ServiceIps, key);
                self.forward_shared(out, frontend, BalancerKind::ClusterIp, endpoints);
            }
            Traffic::Forward(_) => {
                let chain = self.names.balancing(plan.internal_endpoint_set());
                let to = format!("goto {chain}");
                out.elements
                    .push(self.element(Collection::ServiceIps, key, to));
            }
            refused => {
                if let Some(verdict) = Self::refusal(refused) {
                    out.elements
                        .push(self.element(Collection::NoEndpointServices, key, verdict));
                }
            }
        }
    }

    /// externalIPs and LB IPs: to the firewall chain (restricted LB IPs) or the
    /// external chain while something can serve; refused when external traffic is.
    fn external_ips(&self, out: &mut ServiceObjects, shared: bool) {
        let plan = self.plan;
        let firewalled = self.uses_firewall_chain();
        let ips = plan.external_ips.iter().map(|ip| (*ip, false));
        let lb = plan.load_balancer_ips.iter().map(|ip| (*ip, firewalled));
        for (ip, firewall) in ips.chain(lb) {
            let key = self.frontend_key(ip, plan.port);
            if shared {
                if let Traffic::Forward(endpoints) = plan.external() {
                    let frontend = (Collection::ServiceIps, key.clone());
                    self.forward_shared(out, frontend, BalancerKind::External, endpoints);
                }
            } else if plan.has_any_endpoints {
                let to = format!("goto {}", self.names.external);
                out.elements
                    .push(self.element(Collection::ServiceIps, key.clone(), to));
            }
            if firewall {
                let to = format!("goto {}", self.names.firewall);
                out.elements
                    .push(self.element(Collection::FirewallIps, key.clone(), to));
            }
            if let Some(verdict) = Self::refusal(plan.external()) {
                out.elements
                    .push(self.element(Collection::NoEndpointExternal, key, verdict));
            }
        }
    }

    /// The NodePort's jump, or its refusal.
    fn node_port(&self, out: &mut ServiceObjects, shared: bool) {
        let Some(node_port) = self.plan.node_port else {
            return;
        };
        let key = format!("{} . {node_port}", self.proto());
        if shared {
            if let Traffic::Forward(endpoints) = self.plan.external() {
                let frontend = (Collection::ServiceNodeports, key.clone());
                self.forward_shared(out, frontend, BalancerKind::NodePort, endpoints);
            }
        } else if self.plan.has_any_endpoints {
            let to = format!("goto {}", self.names.external);
            out.elements
                .push(self.element(Collection::ServiceNodeports, key.clone(), to));
        }
        if let Some(verdict) = Self::refusal(self.plan.external()) {
            out.elements
                .push(self.element(Collection::NoEndpointNodeports, key, verdict));
        }
    }

    /// A pod reaching itself through the service is masqueraded (else the reply
    /// would skip the reverse NAT).
    fn hairpin(&self, out: &mut ServiceObjects) {
        for ep in self.plan.reachable_endpoints() {
            let key = format!("{} . {}", ep.ip, ep.ip);
            out.elements
                .push(self.element(Collection::Hairpin, key, String::new()));
        }
    }

    /// Restricted LB IPs with something to serve them.
    fn uses_firewall_chain(&self) -> bool {
        let plan = self.plan;
        plan.has_any_endpoints
            && !plan.load_balancer_ips.is_empty()
            && plan.load_balancer_ips_restricted()
    }

    /// `svc-*` and `svl-*`, where they have endpoints. (ClusterIP traffic from
    /// outside the pod network was marked for masquerade in `services`, by one rule
    /// for all ClusterIPs rather than one per service.)
    fn balancing_chains(&self, out: &mut ServiceObjects) {
        let plan = self.plan;
        let sets = [
            (EndpointSet::Cluster, &plan.cluster_endpoints),
            (EndpointSet::Local, &plan.local_endpoints),
        ];
        for (set, endpoints) in sets {
            if endpoints.is_empty() {
                continue;
            }
            let mut rules = Vec::new();
            self.balance(&mut rules, endpoints, out);
            let name = self.names.balancing(set).to_owned();
            out.chains.push(Chain { name, rules });
        }
    }

    /// Affinity lookups, then endpoint choice: rule i of n matches with probability
    /// 1/(n-i), so every endpoint gets 1/n overall.
    fn balance(&self, rules: &mut Vec<String>, endpoints: &[Endpoint], out: &mut ServiceObjects) {
        let (plan, af, proto) = (self.plan, self.w.af, self.proto());
        let dnat = |ep: &Endpoint| match ep.ip {
            IpAddr::V4(ip) => format!("meta l4proto {proto} dnat to {ip}:{}", ep.port),
            IpAddr::V6(ip) => format!("meta l4proto {proto} dnat to [{ip}]:{}", ep.port),
        };
        let remember = |ep: &Endpoint| match plan.affinity_timeout_seconds {
            Some(seconds) => {
                let set = affinity_set_name(&plan.key.port, ep, seconds);
                format!("update @{set} {{ {af} saddr }} ")
            }
            None => String::new(),
        };
        if let Some(seconds) = plan.affinity_timeout_seconds {
            for ep in endpoints {
                let name = affinity_set_name(&plan.key.port, ep, seconds);
                let (remember, dnat) = (remember(ep), dnat(ep));
                rules.push(format!("{af} saddr @{name} {remember}{dnat}"));
                out.affinity_sets.push(AffinitySet {
                    name,
                    timeout_seconds: seconds,
                });
            }
        }
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let choose = if i + 1 < n {
                format!("numgen random mod {} 0 ", n - i)
            } else {
                String::new()
            };
            rules.push(format!("{choose}{}{}", remember(ep), dnat(ep)));
        }
    }

    /// `ext-*`: masquerade (Cluster policy) or short-circuit pod and node traffic
    /// (Local policy), then on to the external policy's chain.
    fn external_chain(&self, out: &mut ServiceObjects) {
        let plan = self.plan;
        if !(plan.has_any_endpoints && plan.has_external_frontends()) {
            return;
        }
        let cluster = &self.names.cluster;
        let has_cluster_chain = !plan.cluster_endpoints.is_empty();
        let mut rules = Vec::new();
        if plan.masquerades_external() {
            rules.push(format!("jump {MARK_MASQ}"));
        } else if has_cluster_chain {
            for local in self.ctx.local_matches(false) {
                rules.push(format!("{local} goto {cluster}"));
            }
            rules.push(format!("fib saddr type local jump {MARK_MASQ}"));
            rules.push(format!("fib saddr type local goto {cluster}"));
        }
        if let Traffic::Forward(_) = plan.external() {
            let chain = self.names.balancing(plan.external_endpoint_set());
            rules.push(format!("goto {chain}"));
        }
        let name = self.names.external.clone();
        out.chains.push(Chain { name, rules });
    }

    /// `fw-*` (filter): sources in the accepted ranges (and the LB IPs themselves
    /// when a range covers the node) return, one set lookup; the rest is dropped
    /// before any DNAT.
    fn firewall_chain(&self, out: &mut ServiceObjects) {
        if !self.uses_firewall_chain() {
            return;
        }
        let (plan, af) = (self.plan, self.w.af);
        let mut sources: Vec<String> = plan
            .load_balancer_source_ranges
            .iter()
            .map(ToString::to_string)
            .collect();
        let node_ips = &self.ctx.net.node_ips;
        let covers_node = |range: &IpNetwork| node_ips.iter().any(|ip| range.contains(*ip));
        if plan.load_balancer_source_ranges.iter().any(covers_node) {
            let lb = plan.load_balancer_ips.iter();
            sources.extend(lb.map(|ip| IpNetwork::from(*ip).to_string()));
        }
        // An anonymous set: nft merges overlapping ranges in it.
        let accepted = format!("{af} saddr {{ {} }} return", sources.join(", "));
        let rules = vec![accepted, "drop".to_owned()];
        let name = self.names.firewall.clone();
        out.chains.push(Chain { name, rules });
    }
}

/// The table's fixed part: maps and sets (with `elements`), the shared chains and
/// the base chains at the hooks kube-proxy's nftables mode uses.
pub fn write_fixed(out: &mut String, ctx: &FamilyContext, elements: &[(Collection, Vec<String>)]) {
    let w = ctx.words();
    for collection in Collection::ALL {
        let items = elements
            .iter()
            .find(|(c, _)| *c == collection)
            .map(|(_, e)| e.as_slice())
            .unwrap_or(&[]);
        write_collection(out, &collection.declaration(w), items);
    }
    for (name, rules) in fixed_chains(ctx) {
        write_chain(out, &name, &rules);
    }
}

/// A shared balancing chain and its endpoint map with `elements` (the map first:
/// the chain's rule binds it).
pub fn write_balancer(out: &mut String, balancer: &Balancer, w: Words, elements: &[String]) {
    write_collection(out, &balancer.map_declaration(w), elements);
    let chain = balancer.chain(w);
    write_chain(out, &chain.name, &chain.rules);
}

/// One set or map declaration (`decl`) with its elements.
fn write_collection(out: &mut String, decl: &str, items: &[String]) {
    if items.is_empty() {
        let _ = writeln!(out, "  {decl}");
    } else {
        // `... }` becomes `... elements = { a, b }; }`, written in place: at 100,000
        // endpoints a joined copy would be tens of megabytes more at the peak.
        let head = decl.trim_end_matches('}');
        let _ = write!(out, "  {head}elements = {{ ");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            out.push_str(item);
        }
        out.push_str(" }; }\n");
    }
}

/// The `services` chain: ClusterIP traffic from outside the pod network (all of it
/// with `masquerade_all`) is marked for masquerade, as kube-proxy's per-service rule
/// does (traffic to a ClusterIP that is not forwarded is refused before postrouting,
/// so one rule serves every service); then the frontend lookups.
fn services_rules(ctx: &FamilyContext) -> Vec<String> {
    let af = ctx.words().af;
    let to_cluster_ip = format!("{af} daddr @cluster-ips");
    let mut rules: Vec<String> = if ctx.net.masquerade_all {
        vec![format!("{to_cluster_ip} jump {MARK_MASQ}")]
    } else {
        let not_local = ctx.local_matches(true).into_iter();
        not_local
            .map(|m| format!("{to_cluster_ip} {m} jump {MARK_MASQ}"))
            .collect()
    };
    rules.push(format!(
        "{af} daddr . meta l4proto . th dport vmap @service-ips"
    ));
    rules.push(format!(
        "{af} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    ));
    rules
}

/// Writes one chain block.
pub fn write_chain(out: &mut String, name: &str, rules: &[String]) {
    let _ = writeln!(out, "  chain {name} {{");
    for rule in rules {
        let _ = writeln!(out, "    {rule}");
    }
    let _ = writeln!(out, "  }}");
}

/// The shared chains and base chains, each with its rules (a base chain's first
/// "rule" is its hook declaration).
fn fixed_chains(ctx: &FamilyContext) -> Vec<(String, Vec<String>)> {
    let af = ctx.words().af;
    let frontend = format!("{af} daddr . meta l4proto . th dport");
    let base = |hook: &str, prio: i32, kind: &str| {
        format!("type {kind} hook {hook} priority {prio}; policy accept;")
    };
    let new = "ct state new";
    let mut input = vec![
        base("input", FILTER - 10, "filter"),
        format!("{new} jump nodeport-endpoints-check"),
        format!("{new} jump external-endpoints-check"),
    ];
    if ctx.loopback_nodeports() {
        // NodePorts on 127.0.0.1 need route_localnet, which would also let a neighbour
        // reach the node's loopback services (CVE-2020-8558): kube-proxy's guard.
        input.push(format!(
            "{new} ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct status & dnat == 0 drop"
        ));
    }
    let c = |name: &str, rules: Vec<String>| (name.to_owned(), rules);
    vec![
        c(REJECT_CHAIN, vec!["reject".into()]),
        c(
            MARK_MASQ,
            vec![format!("meta mark set meta mark | {MASQ_MARK:#x}")],
        ),
        c(
            "masquerading",
            vec![
                format!("ct status dnat {af} saddr . {af} daddr @hairpin masquerade fully-random"),
                format!("meta mark & {MASQ_MARK:#x} == 0 return"),
                format!("meta mark set meta mark ^ {MASQ_MARK:#x}"),
                "masquerade fully-random".into(),
            ],
        ),
        c("services", services_rules(ctx)),
        c(
            "firewall-check",
            vec![format!("{frontend} vmap @firewall-ips")],
        ),
        c(
            "service-endpoints-check",
            vec![format!("{frontend} vmap @no-endpoint-services")],
        ),
        c(
            "external-endpoints-check",
            vec![format!("{frontend} vmap @no-endpoint-external")],
        ),
        c(
            "nodeport-endpoints-check",
            vec!["fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports".into()],
        ),
        c(
            "cluster-ips-check",
            vec![
                format!(
                    "{af} daddr @cluster-ips reject comment \"no such port on this ClusterIP\""
                ),
                format!("{af} daddr @service-cidrs drop comment \"unallocated ClusterIP\""),
            ],
        ),
        c(
            "filter-prerouting",
            vec![
                base("prerouting", DSTNAT - 10, "filter"),
                format!("{new} jump firewall-check"),
            ],
        ),
        c("filter-input", input),
        c(
            "filter-forward",
            vec![
                base("forward", FILTER - 10, "filter"),
                "ct state invalid drop".into(),
                format!("{new} jump service-endpoints-check"),
                format!("{new} jump external-endpoints-check"),
                format!("{new} jump nodeport-endpoints-check"),
                format!("{new} jump cluster-ips-check"),
            ],
        ),
        c(
            "filter-output",
            vec![
                base("output", DSTNAT - 10, "filter"),
                format!("{new} jump service-endpoints-check"),
                format!("{new} jump firewall-check"),
            ],
        ),
        c(
            "filter-output-post-dnat",
            vec![
                base("output", DSTNAT + 10, "filter"),
                format!("{new} jump cluster-ips-check"),
            ],
        ),
        c(
            "nat-prerouting",
            vec![
                base("prerouting", DSTNAT, "nat"),
                format!("{frontend} @node-local-dns socket wildcard 0 return"),
                "jump services".into(),
            ],
        ),
        c(
            "nat-output",
            vec![base("output", DSTNAT, "nat"), "jump services".into()],
        ),
        c(
            "nat-postrouting",
            vec![
                base("postrouting", SRCNAT, "nat"),
                "jump masquerading".into(),
            ],
        ),
        // The kube-dns ClusterIP answered on the node (NodeLocal DNSCache's way):
        // pods' queries skip conntrack, hence DNAT, only while a socket is bound to
        // the ClusterIP itself, so a stopped agent hands them back to the endpoints.
        // UDP only: nft's socket match gives up on the half-open TCP socket that
        // answers a handshake's last ACK, so TCP skips DNAT in `nat-prerouting`.
        c(
            "dns-prerouting",
            vec![
                base("prerouting", RAW, "filter"),
                format!("meta l4proto udp {frontend} @node-local-dns socket wildcard 0 notrack"),
            ],
        ),
        c(
            "dns-output",
            vec![
                base("output", RAW, "filter"),
                format!(
                    "meta l4proto udp {af} saddr . meta l4proto . th sport @node-local-dns notrack"
                ),
            ],
        ),
    ]
}

#[cfg(test)]
mod tests;
