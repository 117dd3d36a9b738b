//! Pure rendering of kube-proxy's rule layout: one service port plan in, the rules it
//! adds to the shared chains and its own chains out. No I/O, so the whole layout is
//! unit-tested without root.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::chains::{
    self, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use super::rule::{MASQ_MARK, Match, Rule, Target};
use crate::model::{Endpoint, IpFamily, ServicePortPlan, Traffic};

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
    pub family: IpFamily,
    /// Pod CIDRs of this family (`--cluster-cidr`); traffic from elsewhere to a
    /// ClusterIP is masqueraded. Empty: cannot tell, so no such rule (as kube-proxy).
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Addresses NodePorts listen on.
    pub nodeport_ips: Vec<IpAddr>,
    /// This node's own addresses (for loadBalancerSourceRanges that include the node).
    pub node_ips: Vec<IpAddr>,
    pub scope: Scope,
}

/// The rules one service port plan contributes, ready to splice into a restore payload.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceRules {
    pub nat_services: Vec<Rule>,
    pub nat_nodeports: Vec<Rule>,
    pub filter_services: Vec<Rule>,
    pub filter_external: Vec<Rule>,
    pub filter_firewall: Vec<Rule>,
    /// This plan's own nat chains, in creation order, with their rules.
    pub chains: Vec<(String, Vec<Rule>)>,
}

/// Renders one plan.
pub fn render_service(plan: &ServicePortPlan, ctx: &NodeContext) -> ServiceRules {
    let mut out = ServiceRules::default();
    if ctx.scope == Scope::ExternalOnly && !plan.is_externally_accessible() {
        // Socket-level LB handles everything this service offers.
        return out;
    }
    let name = &plan.key.port;
    let label = name.to_string();
    let protocol = name.protocol;

    let cluster_chain = chains::cluster_chain(name);
    let local_chain = chains::local_chain(name);
    let ext_chain = chains::external_chain(name);
    let fw_chain = chains::firewall_chain(name);

    let has_endpoints = plan.has_any_endpoints;
    let uses_cluster_chain = !plan.cluster_endpoints.is_empty();
    let uses_local_chain = !plan.local_endpoints.is_empty();
    let policy_chain = |local: bool| {
        if local {
            local_chain.clone()
        } else {
            cluster_chain.clone()
        }
    };
    let internal_chain = policy_chain(plan.internal_policy_local);
    let external_policy_chain = policy_chain(plan.external_policy_local);
    let (has_internal, internal_filter) = filter_target(plan.internal(), &label);
    let (has_external, external_filter) = filter_target(plan.external(), &label);
    let uses_ext_chain = has_endpoints && plan.is_externally_accessible();
    let uses_fw_chain = has_endpoints
        && !plan.load_balancer_ips.is_empty()
        && !plan.load_balancer_source_ranges.is_empty();
    let lb_chain = if uses_fw_chain { &fw_chain } else { &ext_chain };

    let frontend = |chain: &str, target: Target, comment: &str, ip: IpAddr, port: u16| {
        Rule::new(chain, target)
            .comment(comment)
            .with(Match::Protocol(protocol))
            .with(Match::Dst(ip))
            .with(Match::DstPort(port))
    };

    // ClusterIP.
    if ctx.scope == Scope::All {
        if has_internal {
            out.nat_services.push(frontend(
                KUBE_SERVICES,
                Target::Jump(internal_chain.clone()),
                &format!("{label} cluster IP"),
                plan.cluster_ip,
                plan.port,
            ));
        } else if let Some((target, comment)) = &internal_filter {
            out.filter_services.push(frontend(
                KUBE_SERVICES,
                target.clone(),
                comment,
                plan.cluster_ip,
                plan.port,
            ));
        }
    }

    // externalIPs.
    for &ip in &plan.external_ips {
        if has_endpoints {
            out.nat_services.push(frontend(
                KUBE_SERVICES,
                Target::Jump(ext_chain.clone()),
                &format!("{label} external IP"),
                ip,
                plan.port,
            ));
        }
        if let Some((target, comment)) = external_filter.as_ref().filter(|_| !has_external) {
            out.filter_external.push(frontend(
                KUBE_EXTERNAL_SERVICES,
                target.clone(),
                comment,
                ip,
                plan.port,
            ));
        }
    }

    // Load-balancer IPs.
    for &ip in &plan.load_balancer_ips {
        if has_endpoints {
            out.nat_services.push(frontend(
                KUBE_SERVICES,
                Target::Jump(lb_chain.clone()),
                &format!("{label} loadbalancer IP"),
                ip,
                plan.port,
            ));
        }
        if uses_fw_chain {
            out.filter_firewall.push(frontend(
                KUBE_PROXY_FIREWALL,
                Target::Drop,
                &format!("{label} traffic not accepted by {fw_chain}"),
                ip,
                plan.port,
            ));
        }
        if let Some((target, comment)) = external_filter.as_ref().filter(|_| !has_external) {
            out.filter_external.push(frontend(
                KUBE_EXTERNAL_SERVICES,
                target.clone(),
                comment,
                ip,
                plan.port,
            ));
        }
    }

    // NodePort.
    if let Some(node_port) = plan.node_port {
        if has_endpoints {
            out.nat_nodeports.push(
                Rule::new(KUBE_NODEPORTS, Target::Jump(ext_chain.clone()))
                    .comment(&label)
                    .with(Match::Protocol(protocol))
                    .with(Match::DstPort(node_port)),
            );
        }
        if let Some((target, comment)) = external_filter.as_ref().filter(|_| !has_external) {
            out.filter_external.push(
                Rule::new(KUBE_EXTERNAL_SERVICES, target.clone())
                    .comment(comment)
                    .with(Match::DstTypeLocal)
                    .with(Match::Protocol(protocol))
                    .with(Match::DstPort(node_port)),
            );
        }
    }

    // Per-service chains. The internal chain first masquerades ClusterIP traffic that
    // comes from outside the cluster CIDR (it may be routed here from off-node).
    let mut internal_masq = Vec::new();
    if has_internal && ctx.scope == Scope::All {
        for cidr in &ctx.cluster_cidrs {
            internal_masq.push(
                frontend(
                    &internal_chain,
                    Target::Jump(KUBE_MARK_MASQ.into()),
                    &format!("{label} cluster IP"),
                    plan.cluster_ip,
                    plan.port,
                )
                .with(Match::NotSrc(*cidr)),
            );
        }
    }

    if uses_ext_chain {
        let mut rules = Vec::new();
        if !plan.external_policy_local {
            rules.push(
                Rule::new(&ext_chain, Target::Jump(KUBE_MARK_MASQ.into())).comment(format!(
                    "masquerade traffic for {label} external destinations"
                )),
            );
        } else {
            for cidr in &ctx.cluster_cidrs {
                rules.push(
                    Rule::new(&ext_chain, Target::Jump(cluster_chain.clone()))
                        .comment(format!("pod traffic for {label} external destinations"))
                        .with(Match::Src(*cidr)),
                );
            }
            rules.push(
                Rule::new(&ext_chain, Target::Jump(KUBE_MARK_MASQ.into()))
                    .comment(format!(
                        "masquerade LOCAL traffic for {label} external destinations"
                    ))
                    .with(Match::SrcTypeLocal),
            );
            rules.push(
                Rule::new(&ext_chain, Target::Jump(cluster_chain.clone()))
                    .comment(format!(
                        "route LOCAL traffic for {label} external destinations"
                    ))
                    .with(Match::SrcTypeLocal),
            );
        }
        if has_external {
            rules.push(Rule::new(
                &ext_chain,
                Target::Jump(external_policy_chain.clone()),
            ));
        }
        out.chains.push((ext_chain.clone(), rules));
    }

    if uses_fw_chain {
        let mut rules = Vec::new();
        let mut allow_from_node = false;
        for range in &plan.load_balancer_source_ranges {
            rules.push(
                Rule::new(&fw_chain, Target::Jump(ext_chain.clone()))
                    .comment(format!("{label} loadbalancer IP"))
                    .with(Match::Src(*range)),
            );
            allow_from_node |= ctx.node_ips.iter().any(|ip| range.contains(*ip));
        }
        if allow_from_node {
            for &ip in &plan.load_balancer_ips {
                rules.push(
                    Rule::new(&fw_chain, Target::Jump(ext_chain.clone()))
                        .comment(format!("{label} loadbalancer IP"))
                        .with(Match::Src(IpNetwork::from(ip))),
                );
            }
        }
        rules.push(Rule::new(&fw_chain, Target::CountOnly).comment(format!(
            "other traffic to {label} will be dropped by KUBE-PROXY-FIREWALL"
        )));
        out.chains.push((fw_chain.clone(), rules));
    }

    if uses_cluster_chain {
        let mut rules = if internal_chain == cluster_chain {
            std::mem::take(&mut internal_masq)
        } else {
            Vec::new()
        };
        balance(
            &mut rules,
            &cluster_chain,
            plan,
            &plan.cluster_endpoints,
            &label,
        );
        out.chains.push((cluster_chain.clone(), rules));
    }
    if uses_local_chain {
        let mut rules = if internal_chain == local_chain {
            std::mem::take(&mut internal_masq)
        } else {
            Vec::new()
        };
        balance(
            &mut rules,
            &local_chain,
            plan,
            &plan.local_endpoints,
            &label,
        );
        out.chains.push((local_chain.clone(), rules));
    }

    for backend in plan.reachable_endpoints() {
        let chain = chains::endpoint_chain(name, &backend);
        let mut dnat = Rule::new(&chain, Target::Dnat(backend)).comment(&label);
        if plan.affinity_timeout_seconds.is_some() {
            dnat = dnat.with(Match::RecentSet {
                name: chain.clone(),
            });
        }
        let rules = vec![
            Rule::new(&chain, Target::Jump(KUBE_MARK_MASQ.into()))
                .comment(&label)
                .with(Match::Src(IpNetwork::from(backend.ip))),
            dnat.with(Match::Protocol(protocol)),
        ];
        out.chains.push((chain, rules));
    }
    out
}

/// For traffic that is not forwarded: whether it is, and the filter target + comment.
fn filter_target(traffic: Traffic<'_>, label: &str) -> (bool, Option<(Target, String)>) {
    match traffic {
        Traffic::Forward(_) => (true, None),
        Traffic::Reject => (
            false,
            Some((Target::Reject, format!("{label} has no endpoints"))),
        ),
        Traffic::Drop => (
            false,
            Some((Target::Drop, format!("{label} has no local endpoints"))),
        ),
    }
}

/// Affinity lookups, then equal-probability jumps to each endpoint's chain: rule i of n
/// matches with probability 1/(n-i), so every endpoint gets 1/n overall.
fn balance(
    rules: &mut Vec<Rule>,
    chain: &str,
    plan: &ServicePortPlan,
    endpoints: &[Endpoint],
    label: &str,
) {
    let name = &plan.key.port;
    if let Some(seconds) = plan.affinity_timeout_seconds {
        for backend in endpoints {
            let sep = chains::endpoint_chain(name, backend);
            rules.push(
                Rule::new(chain, Target::Jump(sep.clone()))
                    .comment(format!("{label} -> {backend}"))
                    .with(Match::RecentCheck { name: sep, seconds }),
            );
        }
    }
    let n = endpoints.len();
    for (i, backend) in endpoints.iter().enumerate() {
        let mut rule = Rule::new(chain, Target::Jump(chains::endpoint_chain(name, backend)))
            .comment(format!("{label} -> {backend}"));
        if i + 1 < n {
            rule = rule.with(Match::Probability(1.0 / (n - i) as f64));
        }
        rules.push(rule);
    }
}

/// Rules of the shared chains that do not depend on any service.
pub struct SharedRules {
    pub nat: Vec<Rule>,
    pub filter: Vec<Rule>,
    /// The jump to KUBE-NODEPORTS; must be the last rule of nat KUBE-SERVICES.
    pub nodeports_jump: Vec<Rule>,
}

/// Renders the service-independent rules.
pub fn render_shared(ctx: &NodeContext) -> SharedRules {
    let nat = vec![
        Rule::new(KUBE_POSTROUTING, Target::Return).with(Match::Mark {
            mark: MASQ_MARK,
            negate: true,
        }),
        Rule::new(KUBE_POSTROUTING, Target::XorMark(MASQ_MARK)),
        Rule::new(KUBE_POSTROUTING, Target::Masquerade)
            .comment("kubernetes service traffic requiring SNAT"),
        Rule::new(KUBE_MARK_MASQ, Target::OrMark(MASQ_MARK)),
    ];
    let filter = vec![
        Rule::new(KUBE_FORWARD, Target::Drop).with(Match::CtState("INVALID")),
        Rule::new(KUBE_FORWARD, Target::Accept)
            .comment("kubernetes forwarding rules")
            .with(Match::Mark {
                mark: MASQ_MARK,
                negate: false,
            }),
        Rule::new(KUBE_FORWARD, Target::Accept)
            .comment("kubernetes forwarding conntrack rule")
            .with(Match::CtState("RELATED,ESTABLISHED")),
    ];
    let nodeports_jump = ctx
        .nodeport_ips
        .iter()
        .filter(|ip| !(ctx.family == IpFamily::V6 && ip.is_loopback()))
        .map(|&ip| {
            Rule::new(KUBE_SERVICES, Target::Jump(KUBE_NODEPORTS.into()))
                .comment(
                    "kubernetes service nodeports; NOTE: this must be the last rule in this chain",
                )
                .with(Match::Dst(ip))
        })
        .collect();
    SharedRules {
        nat,
        filter,
        nodeports_jump,
    }
}

/// A jump from a built-in chain into Ferry's chains, ensured on every full sync.
pub struct BuiltinJump {
    pub table: &'static str,
    pub chain: &'static str,
    pub target: &'static str,
    pub comment: &'static str,
    /// Only for new connections (`--ctstate NEW`).
    pub new_only: bool,
}

impl BuiltinJump {
    /// The rule, as inserted into the built-in chain.
    pub fn rule(&self) -> Rule {
        let mut rule = Rule::new(self.chain, Target::Jump(self.target.into()));
        if self.new_only {
            rule = rule.with(Match::CtState("NEW"));
        }
        rule.comment(self.comment)
    }
}

/// kube-proxy's jumps from the built-in chains, in their order within each chain.
pub const BUILTIN_JUMPS: [BuiltinJump; 12] = {
    const fn jump(
        table: &'static str,
        chain: &'static str,
        target: &'static str,
        comment: &'static str,
        new_only: bool,
    ) -> BuiltinJump {
        BuiltinJump {
            table,
            chain,
            target,
            comment,
            new_only,
        }
    }
    [
        jump(
            "filter",
            "INPUT",
            KUBE_PROXY_FIREWALL,
            "kubernetes load balancer firewall",
            true,
        ),
        jump(
            "filter",
            "INPUT",
            KUBE_NODEPORTS,
            "kubernetes health check service ports",
            false,
        ),
        jump(
            "filter",
            "INPUT",
            KUBE_EXTERNAL_SERVICES,
            "kubernetes externally-visible service portals",
            true,
        ),
        jump(
            "filter",
            "FORWARD",
            KUBE_PROXY_FIREWALL,
            "kubernetes load balancer firewall",
            true,
        ),
        jump(
            "filter",
            "FORWARD",
            KUBE_FORWARD,
            "kubernetes forwarding rules",
            false,
        ),
        jump(
            "filter",
            "FORWARD",
            KUBE_SERVICES,
            "kubernetes service portals",
            true,
        ),
        jump(
            "filter",
            "FORWARD",
            KUBE_EXTERNAL_SERVICES,
            "kubernetes externally-visible service portals",
            true,
        ),
        jump(
            "filter",
            "OUTPUT",
            KUBE_PROXY_FIREWALL,
            "kubernetes load balancer firewall",
            true,
        ),
        jump(
            "filter",
            "OUTPUT",
            KUBE_SERVICES,
            "kubernetes service portals",
            true,
        ),
        jump(
            "nat",
            "OUTPUT",
            KUBE_SERVICES,
            "kubernetes service portals",
            false,
        ),
        jump(
            "nat",
            "PREROUTING",
            KUBE_SERVICES,
            "kubernetes service portals",
            false,
        ),
        jump(
            "nat",
            "POSTROUTING",
            KUBE_POSTROUTING,
            "kubernetes postrouting rules",
            false,
        ),
    ]
};

impl BuiltinJump {
    /// Whether an `iptables-save` line is this jump.
    pub fn matches_save_line(&self, line: &str) -> bool {
        line.starts_with(&format!("-A {} ", self.chain))
            && line.contains(self.comment)
            && line.ends_with(&format!("-j {}", self.target))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
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
            cluster_cidrs: vec!["10.0.0.0/8".parse().unwrap()],
            nodeport_ips: vec!["192.168.0.2".parse().unwrap()],
            node_ips: vec!["192.168.0.2".parse().unwrap()],
            scope: Scope::All,
        }
    }

    fn lines(rules: &[Rule]) -> Vec<String> {
        rules
            .iter()
            .map(|r| {
                let mut s = String::new();
                r.write_to(&mut s);
                s.trim_end().to_string()
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
