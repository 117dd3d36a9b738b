//! Pure rendering of kube-proxy's rule layout: one service port plan in, the rules it
//! adds to the shared chains and its own chains out. No I/O, so the whole layout is
//! unit-tested without root.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::chains::{
    self, KUBE_EXTERNAL_SERVICES, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
};
use super::rule::{Match, Rule, Target};
use crate::model::{
    Endpoint, EndpointSet, IpFamily, LocalTraffic, Protocol, ServicePortName, ServicePortPlan,
    Traffic,
};

/// Which frontends the iptables rules cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything (iptables mode).
    All,
    /// Only traffic entering the node (NodePort, externalIPs, LB IPs): eBPF mode, where
    /// socket-level load balancing already handles ClusterIPs.
    ExternalOnly,
}

/// Node facts the rules depend on, for one IP family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeContext {
    /// The family every address here (and every plan rendered with it) belongs to.
    pub family: IpFamily,
    /// Pod traffic of this family (`--detect-local-mode`); traffic from elsewhere
    /// to a ClusterIP is masqueraded. No CIDRs: cannot tell, so no such rule (as
    /// kube-proxy).
    pub local_traffic: LocalTraffic,
    /// Masquerade all ClusterIP traffic, not only from outside `cluster_cidrs`.
    pub masquerade_all: bool,
    /// Addresses NodePorts listen on.
    pub nodeport_ips: Vec<IpAddr>,
    /// This node's own addresses (for loadBalancerSourceRanges that include the node).
    pub node_ips: Vec<IpAddr>,
    /// Which frontends to render.
    pub scope: Scope,
}

impl NodeContext {
    /// The matches selecting pod traffic (`negate`: everything else), one rule each.
    fn local_matches(&self, negate: bool) -> Vec<Match> {
        match &self.local_traffic {
            LocalTraffic::FromCidrs(cidrs) => cidrs
                .iter()
                .map(|c| {
                    if negate {
                        Match::NotSrc(*c)
                    } else {
                        Match::Src(*c)
                    }
                })
                .collect(),
            LocalTraffic::InInterface(iface) if negate => vec![Match::NotInIface(iface.clone())],
            LocalTraffic::InInterface(iface) => vec![Match::InIface(iface.clone())],
        }
    }
}

/// One of a plan's own nat chains with its rules.
pub type Chain = (String, Vec<Rule>);

/// The rules one service port plan contributes, ready to splice into a restore payload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceRules {
    /// Its rules in nat KUBE-SERVICES (ClusterIP, externalIPs, LB IPs).
    pub nat_services: Vec<Rule>,
    /// Its rules in nat KUBE-NODEPORTS.
    pub nat_nodeports: Vec<Rule>,
    /// Its REJECT/DROP rules in filter KUBE-SERVICES (ClusterIP without endpoints).
    pub filter_services: Vec<Rule>,
    /// Its REJECT/DROP rules in filter KUBE-EXTERNAL-SERVICES.
    pub filter_external: Vec<Rule>,
    /// Its DROP rules in filter KUBE-PROXY-FIREWALL (LB IPs with source ranges).
    pub filter_firewall: Vec<Rule>,
    /// This plan's own nat chains, in creation order, with their rules.
    pub chains: Vec<Chain>,
}

/// Renders one plan.
pub fn render_service(plan: &ServicePortPlan, ctx: &NodeContext) -> ServiceRules {
    let facts = Facts::of(plan);
    if ctx.scope == Scope::ExternalOnly && !facts.has_external_frontends {
        // Socket-level LB handles everything this service offers.
        return ServiceRules::default();
    }
    let renderer = Renderer::new(&facts, ctx);
    let mut out = ServiceRules::default();
    renderer.cluster_ip(&mut out);
    let external_ip = Frontend {
        kind: "external IP",
        jump: &renderer.chains.external,
        firewall: false,
    };
    renderer.frontend_ips(&mut out, facts.external_ips, &external_ip);
    let load_balancer = Frontend {
        kind: "loadbalancer IP",
        jump: renderer.load_balancer_chain(),
        firewall: facts.uses_firewall_chain,
    };
    renderer.frontend_ips(&mut out, facts.load_balancer_ips, &load_balancer);
    renderer.node_port(&mut out);
    renderer.external_chain(&mut out);
    renderer.firewall_chain(&mut out);
    renderer.balancing_chains(&mut out);
    renderer.endpoint_chains(&mut out);
    out
}

/// How the rules treat one kind of traffic (internal or external).
enum Handling {
    /// Balanced by the chain of this endpoint set.
    Forward(EndpointSet),
    /// Refused in the filter table with this target and comment.
    Refuse(Target, String),
}

/// Everything the renderer reads from a plan, read here only.
struct Facts<'a> {
    name: &'a ServicePortName,
    /// `ns/svc:port`, the start of every comment.
    label: String,
    cluster_ip: IpAddr,
    port: u16,
    node_port: Option<u16>,
    external_ips: &'a [IpAddr],
    load_balancer_ips: &'a [IpAddr],
    source_ranges: &'a [IpNetwork],
    affinity_timeout_seconds: Option<u32>,
    internal: Handling,
    external: Handling,
    /// External traffic is masqueraded (`Cluster` policy) rather than short-circuited.
    masquerades_external: bool,
    /// Some endpoint anywhere can serve.
    has_endpoints: bool,
    has_external_frontends: bool,
    /// KUBE-EXT-* exists: something can serve external destinations.
    uses_external_chain: bool,
    /// KUBE-FW-* exists: LB IPs restricted by source ranges, and something can serve.
    uses_firewall_chain: bool,
    cluster_endpoints: &'a [Endpoint],
    local_endpoints: &'a [Endpoint],
    reachable_endpoints: Vec<Endpoint>,
}

impl<'a> Facts<'a> {
    fn of(plan: &'a ServicePortPlan) -> Self {
        let label = plan.key.port.to_string();
        let has_endpoints = plan.has_any_endpoints;
        let has_external_frontends = plan.has_external_frontends();
        let restricted_lb =
            !plan.load_balancer_ips.is_empty() && !plan.load_balancer_source_ranges.is_empty();
        Self {
            internal: handling(plan.internal(), plan.internal_endpoint_set(), &label),
            external: handling(plan.external(), plan.external_endpoint_set(), &label),
            name: &plan.key.port,
            label,
            cluster_ip: plan.cluster_ip,
            port: plan.port,
            node_port: plan.node_port,
            external_ips: &plan.external_ips,
            load_balancer_ips: &plan.load_balancer_ips,
            source_ranges: &plan.load_balancer_source_ranges,
            affinity_timeout_seconds: plan.affinity_timeout_seconds,
            masquerades_external: plan.masquerades_external(),
            has_endpoints,
            has_external_frontends,
            uses_external_chain: has_endpoints && has_external_frontends,
            uses_firewall_chain: has_endpoints && restricted_lb,
            cluster_endpoints: &plan.cluster_endpoints,
            local_endpoints: &plan.local_endpoints,
            reachable_endpoints: plan.reachable_endpoints(),
        }
    }

    fn protocol(&self) -> Protocol {
        self.name.protocol
    }
}

/// Forwarded through the chain of `set`, or refused: REJECT when nothing can serve,
/// DROP when only endpoints this traffic may not use exist.
fn handling(traffic: Traffic<'_>, set: EndpointSet, label: &str) -> Handling {
    match traffic {
        Traffic::Forward(_) => Handling::Forward(set),
        Traffic::Reject => Handling::Refuse(Target::Reject, format!("{label} has no endpoints")),
        Traffic::Drop => Handling::Refuse(Target::Drop, format!("{label} has no local endpoints")),
    }
}

/// The names of one service port's chains, computed once per render.
struct ServiceChains {
    /// KUBE-SVC-*: balances across `Cluster`-policy endpoints.
    cluster: String,
    /// KUBE-SVL-*: balances across `Local`-policy endpoints.
    local: String,
    /// KUBE-EXT-*: entry for external destinations.
    external: String,
    /// KUBE-FW-*: enforces loadBalancerSourceRanges.
    firewall: String,
    /// KUBE-SEP-* of every reachable endpoint, sorted by endpoint.
    endpoints: Vec<(Endpoint, String)>,
}

impl ServiceChains {
    fn of(name: &ServicePortName, endpoints: &[Endpoint]) -> Self {
        Self {
            cluster: chains::cluster_chain(name),
            local: chains::local_chain(name),
            external: chains::external_chain(name),
            firewall: chains::firewall_chain(name),
            endpoints: endpoints
                .iter()
                .map(|ep| (*ep, chains::endpoint_chain(name, ep)))
                .collect(),
        }
    }

    /// The chain balancing under a policy.
    fn balancing(&self, set: EndpointSet) -> &str {
        match set {
            EndpointSet::Cluster => &self.cluster,
            EndpointSet::Local => &self.local,
        }
    }

    /// The KUBE-SEP-* chain of an endpoint.
    fn endpoint(&self, name: &ServicePortName, ep: &Endpoint) -> String {
        match self.endpoints.binary_search_by_key(ep, |(e, _)| *e) {
            Ok(i) => self.endpoints[i].1.clone(),
            // Every balanced endpoint is reachable; computing it is the safe fallback.
            Err(_) => chains::endpoint_chain(name, ep),
        }
    }
}

/// An address kind that jumps from KUBE-SERVICES (externalIPs, LB IPs).
struct Frontend<'a> {
    /// Comment suffix.
    kind: &'a str,
    /// Chain the nat rule jumps to.
    jump: &'a str,
    /// Also drop what the firewall chain did not accept (LB IPs with source ranges).
    firewall: bool,
}

/// Renders one plan's rules from its facts and chain names.
struct Renderer<'a> {
    facts: &'a Facts<'a>,
    chains: ServiceChains,
    ctx: &'a NodeContext,
}

impl<'a> Renderer<'a> {
    fn new(facts: &'a Facts<'a>, ctx: &'a NodeContext) -> Self {
        Self {
            chains: ServiceChains::of(facts.name, &facts.reachable_endpoints),
            facts,
            ctx,
        }
    }

    /// Where LB IP traffic goes first: the firewall chain when there is one.
    fn load_balancer_chain(&self) -> &str {
        if self.facts.uses_firewall_chain {
            &self.chains.firewall
        } else {
            &self.chains.external
        }
    }

    /// A rule matching this port's protocol, `ip` and `port`.
    fn frontend(&self, chain: &str, target: Target, comment: &str, ip: IpAddr, port: u16) -> Rule {
        Rule::new(chain, target)
            .comment(comment)
            .with(Match::Protocol(self.facts.protocol()))
            .with(Match::Dst(ip))
            .with(Match::DstPort(port))
    }

    /// The KUBE-EXTERNAL-SERVICES rule refusing traffic to `ip`, if external traffic
    /// is refused.
    fn refuse_external(&self, ip: IpAddr) -> Option<Rule> {
        let chain = KUBE_EXTERNAL_SERVICES;
        match &self.facts.external {
            Handling::Refuse(target, comment) => {
                Some(self.frontend(chain, target.clone(), comment, ip, self.facts.port))
            }
            Handling::Forward(_) => None,
        }
    }

    /// The ClusterIP's jump, or its refusal, in KUBE-SERVICES (Scope::All only).
    fn cluster_ip(&self, out: &mut ServiceRules) {
        let f = self.facts;
        if self.ctx.scope != Scope::All {
            return;
        }
        match &f.internal {
            Handling::Forward(policy) => out.nat_services.push(self.frontend(
                KUBE_SERVICES,
                Target::Jump(self.chains.balancing(*policy).to_owned()),
                &format!("{} cluster IP", f.label),
                f.cluster_ip,
                f.port,
            )),
            Handling::Refuse(target, comment) => out.filter_services.push(self.frontend(
                KUBE_SERVICES,
                target.clone(),
                comment,
                f.cluster_ip,
                f.port,
            )),
        }
    }

    /// The rules of externalIPs or LB IPs: nat jumps while something can serve, the
    /// firewall's DROP, and the filter's refusal when external traffic is refused.
    fn frontend_ips(&self, out: &mut ServiceRules, ips: &[IpAddr], frontend: &Frontend<'_>) {
        let f = self.facts;
        let comment = format!("{} {}", f.label, frontend.kind);
        let dropped = format!(
            "{} traffic not accepted by {}",
            f.label, self.chains.firewall
        );
        for &ip in ips {
            if f.has_endpoints {
                let jump = Target::Jump(frontend.jump.to_owned());
                let rule = self.frontend(KUBE_SERVICES, jump, &comment, ip, f.port);
                out.nat_services.push(rule);
            }
            if frontend.firewall {
                let rule = self.frontend(KUBE_PROXY_FIREWALL, Target::Drop, &dropped, ip, f.port);
                out.filter_firewall.push(rule);
            }
            out.filter_external.extend(self.refuse_external(ip));
        }
    }

    /// The NodePort's jump in KUBE-NODEPORTS, or its refusal for local destinations.
    fn node_port(&self, out: &mut ServiceRules) {
        let f = self.facts;
        let Some(node_port) = f.node_port else {
            return;
        };
        if f.has_endpoints {
            out.nat_nodeports.push(
                Rule::new(KUBE_NODEPORTS, Target::Jump(self.chains.external.clone()))
                    .comment(&f.label)
                    .with(Match::Protocol(f.protocol()))
                    .with(Match::DstPort(node_port)),
            );
        }
        if let Handling::Refuse(target, comment) = &f.external {
            out.filter_external.push(
                Rule::new(KUBE_EXTERNAL_SERVICES, target.clone())
                    .comment(comment)
                    .with(Match::DstTypeLocal)
                    .with(Match::Protocol(f.protocol()))
                    .with(Match::DstPort(node_port)),
            );
        }
    }

    /// KUBE-EXT-*: masquerade (Cluster policy) or short-circuit pod and node traffic
    /// (Local policy), then on to the external policy's chain.
    fn external_chain(&self, out: &mut ServiceRules) {
        if !self.facts.uses_external_chain {
            return;
        }
        let (f, ext) = (self.facts, &self.chains.external);
        let to = |target: &str, comment: String| {
            Rule::new(ext, Target::Jump(target.into())).comment(comment)
        };
        let label = &f.label;
        let mut rules = Vec::new();
        if f.masquerades_external {
            let comment = format!("masquerade traffic for {label} external destinations");
            rules.push(to(KUBE_MARK_MASQ, comment));
        } else {
            let cluster = &self.chains.cluster;
            for local in self.ctx.local_matches(false) {
                let comment = format!("pod traffic for {label} external destinations");
                rules.push(to(cluster, comment).with(local));
            }
            let comment = format!("masquerade LOCAL traffic for {label} external destinations");
            rules.push(to(KUBE_MARK_MASQ, comment).with(Match::SrcTypeLocal));
            let comment = format!("route LOCAL traffic for {label} external destinations");
            rules.push(to(cluster, comment).with(Match::SrcTypeLocal));
        }
        if let Handling::Forward(policy) = f.external {
            let policy_chain = self.chains.balancing(policy).to_owned();
            rules.push(Rule::new(ext, Target::Jump(policy_chain)));
        }
        out.chains.push((ext.clone(), rules));
    }

    /// KUBE-FW-*: accepted source ranges (and the node's LB IPs when a range covers
    /// the node) on to KUBE-EXT-*; the rest is dropped by KUBE-PROXY-FIREWALL.
    fn firewall_chain(&self, out: &mut ServiceRules) {
        if !self.facts.uses_firewall_chain {
            return;
        }
        let (f, fw) = (self.facts, &self.chains.firewall);
        let accept = |source: IpNetwork| {
            Rule::new(fw, Target::Jump(self.chains.external.clone()))
                .comment(format!("{} loadbalancer IP", f.label))
                .with(Match::Src(source))
        };
        let mut rules: Vec<Rule> = f.source_ranges.iter().map(|r| accept(*r)).collect();
        let covers_node =
            |range: &IpNetwork| self.ctx.node_ips.iter().any(|ip| range.contains(*ip));
        if f.source_ranges.iter().any(covers_node) {
            rules.extend(
                f.load_balancer_ips
                    .iter()
                    .map(|ip| accept(IpNetwork::from(*ip))),
            );
        }
        rules.push(Rule::new(fw, Target::CountOnly).comment(format!(
            "other traffic to {} will be dropped by KUBE-PROXY-FIREWALL",
            f.label
        )));
        out.chains.push((fw.clone(), rules));
    }

    /// KUBE-SVC-* and KUBE-SVL-*, where they have endpoints. The internal policy's
    /// chain first masquerades ClusterIP traffic from outside the cluster CIDR (it may
    /// be routed here from off-node).
    fn balancing_chains(&self, out: &mut ServiceRules) {
        let f = self.facts;
        let balanced = [
            (EndpointSet::Cluster, f.cluster_endpoints),
            (EndpointSet::Local, f.local_endpoints),
        ];
        for (policy, endpoints) in balanced {
            if endpoints.is_empty() {
                continue;
            }
            let chain = self.chains.balancing(policy);
            let mut rules = match f.internal {
                Handling::Forward(internal) if internal == policy => {
                    self.internal_masquerade(chain)
                }
                _ => Vec::new(),
            };
            self.balance(&mut rules, chain, endpoints);
            out.chains.push((chain.to_owned(), rules));
        }
    }

    /// Masquerade of ClusterIP traffic from outside each cluster CIDR (of all of it
    /// with `masquerade_all`).
    fn internal_masquerade(&self, chain: &str) -> Vec<Rule> {
        let f = self.facts;
        if self.ctx.scope != Scope::All {
            return Vec::new();
        }
        let comment = format!("{} cluster IP", f.label);
        let masq = || Target::Jump(KUBE_MARK_MASQ.into());
        if self.ctx.masquerade_all {
            return vec![self.frontend(chain, masq(), &comment, f.cluster_ip, f.port)];
        }
        self.ctx
            .local_matches(true)
            .into_iter()
            .map(|not_local| {
                self.frontend(chain, masq(), &comment, f.cluster_ip, f.port)
                    .with(not_local)
            })
            .collect()
    }

    /// Affinity lookups, then equal-probability jumps to each endpoint's chain: rule i
    /// of n matches with probability 1/(n-i), so every endpoint gets 1/n overall.
    fn balance(&self, rules: &mut Vec<Rule>, chain: &str, endpoints: &[Endpoint]) {
        let f = self.facts;
        let to_endpoint = |ep: &Endpoint| {
            let sep = self.chains.endpoint(f.name, ep);
            let rule =
                Rule::new(chain, Target::Jump(sep.clone())).comment(format!("{} -> {ep}", f.label));
            (sep, rule)
        };
        if let Some(seconds) = f.affinity_timeout_seconds {
            for ep in endpoints {
                let (name, rule) = to_endpoint(ep);
                rules.push(rule.with(Match::RecentCheck { name, seconds }));
            }
        }
        let n = endpoints.len();
        for (i, ep) in endpoints.iter().enumerate() {
            let (_, mut rule) = to_endpoint(ep);
            if i + 1 < n {
                rule = rule.with(Match::Probability(1.0 / (n - i) as f64));
            }
            rules.push(rule);
        }
    }

    /// KUBE-SEP-*: masquerade hairpin traffic, then DNAT (recording affinity).
    fn endpoint_chains(&self, out: &mut ServiceRules) {
        let f = self.facts;
        for (ep, chain) in &self.chains.endpoints {
            let mut dnat = Rule::new(chain, Target::Dnat(*ep)).comment(&f.label);
            if f.affinity_timeout_seconds.is_some() {
                dnat = dnat.with(Match::RecentSet {
                    name: chain.clone(),
                });
            }
            let rules = vec![
                Rule::new(chain, Target::Jump(KUBE_MARK_MASQ.into()))
                    .comment(&f.label)
                    .with(Match::Src(IpNetwork::from(ep.ip))),
                dnat.with(Match::Protocol(f.protocol())),
            ];
            out.chains.push((chain.clone(), rules));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::iptables::payload::{Op, write_rule};
    use crate::model::plan::test_plan;

    fn backend(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    fn plan() -> ServicePortPlan {
        test_plan(
            ("ns1", "svc1", "p80"),
            Protocol::Tcp,
            "172.30.0.41",
            80,
            &[("10.180.0.1", 80), ("10.180.0.2", 80)],
        )
    }

    fn ctx() -> NodeContext {
        NodeContext {
            family: IpFamily::V4,
            local_traffic: LocalTraffic::FromCidrs(vec!["10.0.0.0/8".parse().unwrap()]),
            masquerade_all: false,
            nodeport_ips: vec!["192.168.0.2".parse().unwrap()],
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            scope: Scope::All,
        }
    }

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules
            .iter()
            .map(|r| {
                let mut line = Vec::new();
                write_rule(&mut line, Op::Append, r).expect("writing into memory");
                String::from_utf8_lossy(&line).trim_end().to_string()
            })
            .collect()
    }

    fn chain<'a>(out: &'a ServiceRules, prefix: &str) -> Vec<&'a (String, Vec<Rule>)> {
        out.chains
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .collect()
    }

    #[test]
    fn cluster_ip_service_matches_kube_proxy_layout() {
        let out = render_service(&plan(), &ctx());
        assert_eq!(
            lines(&out.nat_services),
            [
                "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O"
            ]
        );
        let svc = chain(&out, "KUBE-SVC-");
        assert_eq!(svc.len(), 1);
        assert_eq!(
            lines(&svc[0].1),
            [
                "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
                "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.1:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-SXIVWICOYRO3J4NJ",
                "-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment \"ns1/svc1:p80 -> 10.180.0.2:80\" -j KUBE-SEP-LXVODXWDISEETFEF",
            ]
        );
        let sep = out
            .chains
            .iter()
            .find(|(n, _)| n == "KUBE-SEP-SXIVWICOYRO3J4NJ")
            .unwrap();
        assert_eq!(
            lines(&sep.1),
            [
                "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment \"ns1/svc1:p80\" -s 10.180.0.1/32 -j KUBE-MARK-MASQ",
                "-A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment \"ns1/svc1:p80\" -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80",
            ]
        );
        assert!(out.filter_services.is_empty());
    }

    #[test]
    fn local_traffic_by_interface_and_masquerade_all() {
        let svc_rules = |ctx: &NodeContext| {
            let mut p = plan();
            p.external_ips = vec!["192.0.2.1".parse().unwrap()];
            p.external_policy_local = true;
            p.local_endpoints = vec![backend("10.180.0.1", 80)];
            let out = render_service(&p, ctx);
            let mut all = Vec::new();
            for (_, rules) in chain(&out, "KUBE-SVC-")
                .into_iter()
                .chain(chain(&out, "KUBE-EXT-"))
            {
                all.extend(lines(rules));
            }
            all
        };
        let by_prefix = NodeContext {
            local_traffic: LocalTraffic::InInterface("veth+".into()),
            ..ctx()
        };
        let rules = svc_rules(&by_prefix);
        assert!(
            rules
                .iter()
                .any(|r| r.ends_with("--dport 80 ! -i veth+ -j KUBE-MARK-MASQ")),
            "{rules:#?}"
        );
        assert!(
            rules.iter().any(|r| r.contains(
                "pod traffic for ns1/svc1:p80 external destinations\" -i veth+ -j KUBE-SVC-"
            )),
            "{rules:#?}"
        );
        let all = NodeContext {
            masquerade_all: true,
            ..ctx()
        };
        let rules = svc_rules(&all);
        assert!(
            rules
                .iter()
                .any(|r| r.ends_with("--dport 80 -j KUBE-MARK-MASQ")),
            "{rules:#?}"
        );
        assert!(
            !rules.iter().any(|r| r.contains("! -s 10.0.0.0/8")),
            "{rules:#?}"
        );
    }

    #[test]
    fn no_endpoints_rejects_in_filter_and_creates_no_chains() {
        let mut p = plan();
        p.cluster_endpoints.clear();
        p.has_any_endpoints = false;
        p.node_port = Some(30080);
        p.external_ips = vec!["192.0.2.1".parse().unwrap()];
        let out = render_service(&p, &ctx());
        assert!(
            out.chains.is_empty() && out.nat_services.is_empty() && out.nat_nodeports.is_empty()
        );
        assert_eq!(
            lines(&out.filter_services),
            [
                "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT"
            ]
        );
        assert_eq!(
            out.filter_external.len(),
            2,
            "externalIP and NodePort are rejected too"
        );
        assert!(
            lines(&out.filter_external)[1]
                .contains("--dst-type LOCAL -m tcp -p tcp --dport 30080 -j REJECT")
        );
    }

    #[test]
    fn local_internal_policy_without_local_endpoints_drops() {
        let mut p = plan();
        p.internal_policy_local = true;
        let out = render_service(&p, &ctx());
        assert_eq!(
            lines(&out.filter_services),
            [
                "-A KUBE-SERVICES -m comment --comment \"ns1/svc1:p80 has no local endpoints\" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP"
            ]
        );
    }

    #[test]
    fn nodeport_with_local_external_policy() {
        let mut p = plan();
        p.node_port = Some(30080);
        p.external_policy_local = true;
        p.local_endpoints = vec![backend("10.180.0.2", 80)];
        let out = render_service(&p, &ctx());
        assert_eq!(
            lines(&out.nat_nodeports),
            [
                "-A KUBE-NODEPORTS -m comment --comment \"ns1/svc1:p80\" -m tcp -p tcp --dport 30080 -j KUBE-EXT-XPGD46QRK7WJZT7O"
            ]
        );
        let ext = chain(&out, "KUBE-EXT-");
        let ext_lines = lines(&ext[0].1);
        assert_eq!(ext_lines.len(), 4);
        assert!(ext_lines[0].contains("-s 10.0.0.0/8 -j KUBE-SVC-XPGD46QRK7WJZT7O"));
        assert!(ext_lines[1].contains("--src-type LOCAL -j KUBE-MARK-MASQ"));
        assert!(ext_lines[2].contains("--src-type LOCAL -j KUBE-SVC-XPGD46QRK7WJZT7O"));
        assert!(ext_lines[3].ends_with("-j KUBE-SVL-XPGD46QRK7WJZT7O"));
        assert_eq!(chain(&out, "KUBE-SVL-").len(), 1);
        assert_eq!(
            chain(&out, "KUBE-SEP-").len(),
            2,
            "both cluster and local endpoints need chains"
        );
    }

    #[test]
    fn nodeport_with_cluster_policy_masquerades() {
        let mut p = plan();
        p.node_port = Some(30080);
        let out = render_service(&p, &ctx());
        let ext = chain(&out, "KUBE-EXT-");
        assert_eq!(
            lines(&ext[0].1),
            [
                "-A KUBE-EXT-XPGD46QRK7WJZT7O -m comment --comment \"masquerade traffic for ns1/svc1:p80 external destinations\" -j KUBE-MARK-MASQ",
                "-A KUBE-EXT-XPGD46QRK7WJZT7O -j KUBE-SVC-XPGD46QRK7WJZT7O",
            ]
        );
    }

    #[test]
    fn affinity_uses_recent_match() {
        let mut p = plan();
        p.affinity_timeout_seconds = Some(10800);
        let out = render_service(&p, &ctx());
        let svc = lines(&chain(&out, "KUBE-SVC-")[0].1);
        assert!(svc[1].contains("-m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --rcheck --seconds 10800 --reap -j KUBE-SEP-SXIVWICOYRO3J4NJ"));
        let sep = out
            .chains
            .iter()
            .find(|(n, _)| n == "KUBE-SEP-SXIVWICOYRO3J4NJ")
            .unwrap();
        assert!(
            lines(&sep.1)[1]
                .contains("-m recent --name KUBE-SEP-SXIVWICOYRO3J4NJ --set -m tcp -p tcp -j DNAT")
        );
    }

    #[test]
    fn load_balancer_source_ranges_use_firewall_chain() {
        let mut p = plan();
        p.load_balancer_ips = vec!["203.0.113.5".parse().unwrap()];
        p.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let out = render_service(&p, &ctx());
        assert!(lines(&out.nat_services)[1].ends_with("-j KUBE-FW-XPGD46QRK7WJZT7O"));
        assert_eq!(
            lines(&out.filter_firewall),
            [
                "-A KUBE-PROXY-FIREWALL -m comment --comment \"ns1/svc1:p80 traffic not accepted by KUBE-FW-XPGD46QRK7WJZT7O\" -m tcp -p tcp -d 203.0.113.5 --dport 80 -j DROP"
            ]
        );
        let fw = lines(&chain(&out, "KUBE-FW-")[0].1);
        assert!(fw[0].contains("-s 198.51.100.0/24 -j KUBE-EXT-XPGD46QRK7WJZT7O"));
        assert!(fw[1].ends_with("will be dropped by KUBE-PROXY-FIREWALL\""));
    }

    #[test]
    fn external_only_scope_leaves_cluster_ips_alone() {
        let mut p = plan();
        p.node_port = Some(30080);
        let mut c = ctx();
        c.scope = Scope::ExternalOnly;
        let out = render_service(&p, &c);
        assert!(out.nat_services.is_empty());
        assert_eq!(out.nat_nodeports.len(), 1);
        let svc = lines(&chain(&out, "KUBE-SVC-")[0].1);
        assert!(svc.iter().all(|l| !l.contains("KUBE-MARK-MASQ")));
    }

    #[test]
    fn external_only_scope_skips_internal_only_services() {
        let mut c = ctx();
        c.scope = Scope::ExternalOnly;
        assert_eq!(render_service(&plan(), &c), ServiceRules::default());
    }

    #[test]
    fn every_jump_target_exists() {
        // Like kube-proxy's assertIPTablesRulesEqual: a jump to a missing chain would
        // make iptables-restore fail.
        let mut p = plan();
        p.node_port = Some(30080);
        p.external_policy_local = true;
        p.internal_policy_local = true;
        p.local_endpoints = vec![backend("10.180.0.2", 80)];
        p.affinity_timeout_seconds = Some(60);
        p.load_balancer_ips = vec!["203.0.113.5".parse().unwrap()];
        p.load_balancer_source_ranges = vec!["192.168.0.0/16".parse().unwrap()];
        let out = render_service(&p, &ctx());
        let defined: Vec<&str> = out.chains.iter().map(|(n, _)| n.as_str()).collect();
        let all_rules = out
            .chains
            .iter()
            .flat_map(|(_, r)| r)
            .chain(&out.nat_services)
            .chain(&out.nat_nodeports);
        for rule in all_rules {
            if let Target::Jump(target) = &rule.target
                && target.starts_with("KUBE-")
                && chains::is_service_chain(target)
            {
                assert!(
                    defined.contains(&target.as_str()),
                    "jump to undefined {target}"
                );
            }
        }
        // The node is inside the source range, so LB IP sources are allowed too.
        let fw = lines(&chain(&out, "KUBE-FW-")[0].1);
        assert!(fw.iter().any(|l| l.contains("-s 203.0.113.5/32")));
    }
}
