//! Rules that do not depend on any service: the fixed rules of the shared chains and
//! the jumps from the built-in chains into them, as kube-proxy installs them.

use super::chains::{
    KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_NODEPORTS, KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL, KUBE_SERVICES,
};
use super::render::NodeContext;
use super::rule::{MASQ_MARK, Match, Rule, Target};
use std::net::Ipv4Addr;

use ipnetwork::{IpNetwork, Ipv4Network};

use crate::model::IpFamily;

/// Rules of the shared chains that do not depend on any service.
pub struct SharedRules {
    /// KUBE-POSTROUTING and KUBE-MARK-MASQ.
    pub nat: Vec<Rule>,
    /// KUBE-FORWARD.
    pub filter: Vec<Rule>,
    /// The jump to KUBE-NODEPORTS; must be the last rule of nat KUBE-SERVICES.
    pub nodeports_jump: Vec<Rule>,
}

/// Renders the service-independent rules.
pub fn render_shared(ctx: &NodeContext) -> SharedRules {
    let mark = |negate| Match::Mark {
        mark: MASQ_MARK,
        negate,
    };
    let nat = vec![
        Rule::new(KUBE_POSTROUTING, Target::Return).with(mark(true)),
        Rule::new(KUBE_POSTROUTING, Target::XorMark(MASQ_MARK)),
        Rule::new(KUBE_POSTROUTING, Target::Masquerade)
            .comment("kubernetes service traffic requiring SNAT"),
        Rule::new(KUBE_MARK_MASQ, Target::OrMark(MASQ_MARK)),
    ];
    let mut filter = vec![
        Rule::new(KUBE_FORWARD, Target::Drop).with(Match::CtState("INVALID")),
        Rule::new(KUBE_FORWARD, Target::Accept)
            .comment("kubernetes forwarding rules")
            .with(mark(false)),
        Rule::new(KUBE_FORWARD, Target::Accept)
            .comment("kubernetes forwarding conntrack rule")
            .with(Match::CtState("RELATED,ESTABLISHED")),
    ];
    if ctx.family == IpFamily::V4 && ctx.nodeport_ips.iter().any(|ip| ip.is_loopback()) {
        filter.push(localnet_guard());
    }
    let nodeports_jump = ctx
        .nodeport_ips
        .iter()
        // NodePorts on ::1 never work (IPv6 has no route_localnet); kube-proxy skips them.
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

/// NodePorts on 127.0.0.1 need `route_localnet`, which also lets a neighbour reach
/// whatever listens on the node's loopback (CVE-2020-8558): kube-proxy's (and the
/// kubelet's) guard drops new connections to 127.0.0.0/8 from elsewhere unless a
/// NodePort DNATed them. In KUBE-PROXY-FIREWALL, which INPUT, OUTPUT and FORWARD
/// jump to for new connections.
fn localnet_guard() -> Rule {
    let loopback: IpNetwork = IpNetwork::V4(
        Ipv4Network::new(Ipv4Addr::new(127, 0, 0, 0), 8).expect("a /8 is a valid prefix"),
    );
    Rule::new(KUBE_PROXY_FIREWALL, Target::Drop)
        .comment("block incoming localnet connections")
        .with(Match::DstNet(loopback))
        .with(Match::NotSrc(loopback))
        .with(Match::NotCtState("RELATED,ESTABLISHED,DNAT"))
}

/// A jump from a built-in chain into Ferry's chains, ensured on every full sync.
pub struct BuiltinJump {
    /// `filter` or `nat`.
    pub table: &'static str,
    /// The built-in chain (INPUT, PREROUTING...).
    pub chain: &'static str,
    /// Ferry's chain it jumps to.
    pub target: &'static str,
    /// kube-proxy's comment, which also identifies the jump in `iptables-save`.
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

    /// Whether an `iptables-save` line is this jump.
    pub fn matches_save_line(&self, line: &str) -> bool {
        line.starts_with(&format!("-A {} ", self.chain))
            && line.contains(self.comment)
            && line.ends_with(&format!("-j {}", self.target))
    }
}

const FIREWALL: &str = "kubernetes load balancer firewall";
const HEALTH_CHECKS: &str = "kubernetes health check service ports";
const EXTERNAL: &str = "kubernetes externally-visible service portals";
const FORWARDING: &str = "kubernetes forwarding rules";
const PORTALS: &str = "kubernetes service portals";
const POSTROUTING: &str = "kubernetes postrouting rules";

/// For [`BUILTIN_JUMPS`]: whether the jump is for new connections only.
const NEW: bool = true;
const ALL: bool = false;

const fn filter(
    chain: &'static str,
    target: &'static str,
    comment: &'static str,
    new_only: bool,
) -> BuiltinJump {
    BuiltinJump {
        table: "filter",
        chain,
        target,
        comment,
        new_only,
    }
}

const fn nat(chain: &'static str, target: &'static str, comment: &'static str) -> BuiltinJump {
    BuiltinJump {
        table: "nat",
        chain,
        target,
        comment,
        new_only: false,
    }
}

/// kube-proxy's jumps from the built-in chains, in their order within each chain.
pub const BUILTIN_JUMPS: [BuiltinJump; 12] = [
    filter("INPUT", KUBE_PROXY_FIREWALL, FIREWALL, NEW),
    filter("INPUT", KUBE_NODEPORTS, HEALTH_CHECKS, ALL),
    filter("INPUT", KUBE_EXTERNAL_SERVICES, EXTERNAL, NEW),
    filter("FORWARD", KUBE_PROXY_FIREWALL, FIREWALL, NEW),
    filter("FORWARD", KUBE_FORWARD, FORWARDING, ALL),
    filter("FORWARD", KUBE_SERVICES, PORTALS, NEW),
    filter("FORWARD", KUBE_EXTERNAL_SERVICES, EXTERNAL, NEW),
    filter("OUTPUT", KUBE_PROXY_FIREWALL, FIREWALL, NEW),
    filter("OUTPUT", KUBE_SERVICES, PORTALS, NEW),
    nat("OUTPUT", KUBE_SERVICES, PORTALS),
    nat("PREROUTING", KUBE_SERVICES, PORTALS),
    nat("POSTROUTING", KUBE_POSTROUTING, POSTROUTING),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::iptables::render::Scope;

    fn ctx(nodeport_ips: &[&str]) -> NodeContext {
        NodeContext {
            family: IpFamily::V4,
            local_traffic: crate::model::LocalTraffic::default(),
            masquerade_all: false,
            nodeport_ips: nodeport_ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            node_ips: vec![],
            scope: Scope::All,
        }
    }

    #[test]
    fn localhost_nodeports_bring_kube_proxys_localnet_guard() {
        let guard = |c: &NodeContext| {
            render_shared(c)
                .filter
                .iter()
                .find(|r| r.spec().contains("localnet"))
                .map(|r| (r.chain.clone(), r.spec()))
        };
        assert_eq!(
            guard(&ctx(&["127.0.0.1", "192.168.0.2"])),
            Some((
                "KUBE-PROXY-FIREWALL".to_owned(),
                "-m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".to_owned()
            ))
        );
        let none = guard(&ctx(&["192.168.0.2"]));
        assert_eq!(none, None, "no route_localnet, no guard");
    }
}
