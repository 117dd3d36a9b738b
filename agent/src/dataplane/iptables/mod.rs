//! The iptables backend: kube-proxy's chain layout, applied with one
//! `iptables-restore --noflush` per family and sync. A full sync rewrites everything;
//! a partial sync touches only the services that changed: their own chains, and their
//! rules in the shared chains (deleted and re-inserted by exact text), so one endpoint
//! change costs the same at 10 services or 10,000.

pub mod chains;
pub mod exec;
pub mod render;
pub mod rule;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write;

use tracing::{debug, info};

use self::chains::{FILTER_CHAINS, KUBE_PROXY_CANARY, NAT_CHAINS};
use self::exec::{ExecError, Runner, SaveSummary, Tools};
use self::render::{
    BUILTIN_JUMPS, NodeContext, Scope, ServiceRules, render_service, render_shared,
};
use self::rule::Rule;
use super::{DataPlane, NodeNetwork, SyncError, SyncStats};
use crate::model::{IpFamily, NodePlan, PlanDiff, PlanKey, ServicePortPlan};

#[cfg(test)]
mod golden_tests;

/// A rule in one of the shared chains (KUBE-SERVICES...): chain and arguments, kept
/// so a later partial sync can delete exactly this rule.
#[derive(Debug, Clone, PartialEq)]
struct SharedRule {
    chain: String,
    spec: String,
}

impl SharedRule {
    fn of(rule: &Rule) -> Self {
        Self {
            chain: rule.chain.clone(),
            spec: rule.spec(),
        }
    }
}

/// What a partial sync must remember of one plan: its rules in the shared chains
/// (to delete them by exact text) and its chain names (to delete the chains). Its own
/// chains' rules are re-rendered when needed rather than kept, which keeps memory small
/// at 10,000 services.
#[derive(Debug, Default)]
struct Rendered {
    /// Its rules in the shared nat chains (KUBE-SERVICES, KUBE-NODEPORTS).
    nat_shared: Vec<SharedRule>,
    /// Its rules in the shared filter chains.
    filter_shared: Vec<SharedRule>,
    /// This plan's own chains.
    chains: Vec<String>,
    nat_rule_count: usize,
}

impl Rendered {
    /// Renders a plan; also returns the full rules, for writing its chains now.
    fn new(plan: &ServicePortPlan, ctx: &NodeContext) -> (Self, ServiceRules) {
        let rules = render_service(plan, ctx);
        let nat_rule_count = rules.nat_services.len()
            + rules.nat_nodeports.len()
            + rules.chains.iter().map(|(_, r)| r.len()).sum::<usize>();
        let rendered = Self {
            nat_shared: rules
                .nat_services
                .iter()
                .chain(&rules.nat_nodeports)
                .map(SharedRule::of)
                .collect(),
            filter_shared: rules
                .filter_services
                .iter()
                .chain(&rules.filter_external)
                .chain(&rules.filter_firewall)
                .map(SharedRule::of)
                .collect(),
            chains: rules.chains.iter().map(|(name, _)| name.clone()).collect(),
            nat_rule_count,
        };
        (rendered, rules)
    }
}

/// Writes the rules of a plan's own chains.
fn write_chain_rules(out: &mut dyn Write, rules: &ServiceRules) -> std::io::Result<()> {
    for (_, chain) in &rules.chains {
        for rule in chain {
            writeln!(out, "-A {} {}", rule.chain, rule.spec())?;
        }
    }
    Ok(())
}

/// A payload larger than this many chain declarations makes `iptables-restore`
/// (nf_tables flavour, 1.8.x) track every chain name in a sorted list: quadratic. A
/// leading chain-less command (`-Z`) switches it to fetching all chains instead,
/// which is linear; its side effect (zeroed packet counters of the table) is only
/// paid on such large full syncs.
const BULK_CHAINS: usize = 1000;

/// Programmed state of one IP family.
struct FamilyState<R> {
    family: IpFamily,
    tools: R,
    ctx: Option<NodeContext>,
    rendered: BTreeMap<PlanKey, Rendered>,
}

/// kube-proxy-compatible iptables data plane.
pub struct IptablesDataPlane<R = Tools> {
    scope: Scope,
    families: Vec<FamilyState<R>>,
    /// Rules were written at least once (so later syncs must keep them right).
    programmed: bool,
}

impl IptablesDataPlane {
    /// A backend for the given families. `scope` limits it to traffic entering the node
    /// when another data plane (eBPF) handles ClusterIPs.
    pub fn new(families: &[IpFamily], scope: Scope) -> Self {
        Self::with_runners(families, scope, Tools::for_family)
    }

    /// Removes every chain and jump Ferry (or kube-proxy) installed, in all families.
    pub fn cleanup(families: &[IpFamily]) -> Result<(), ExecError> {
        cleanup_with(families.iter().map(|&f| (f, Tools::for_family(f))))
    }
}

impl<R: Runner> IptablesDataPlane<R> {
    /// A backend whose iptables tools come from `runner` (a fake in tests).
    fn with_runners(families: &[IpFamily], scope: Scope, runner: impl Fn(IpFamily) -> R) -> Self {
        Self {
            scope,
            programmed: false,
            families: families
                .iter()
                .map(|&family| FamilyState {
                    family,
                    tools: runner(family),
                    ctx: None,
                    rendered: BTreeMap::new(),
                })
                .collect(),
        }
    }
}

/// [`IptablesDataPlane::cleanup`] with the given tools per family.
fn cleanup_with<R: Runner>(families: impl Iterator<Item = (IpFamily, R)>) -> Result<(), ExecError> {
    for (family, tools) in families {
        let mut payload = String::new();
        for table in ["filter", "nat"] {
            let save = tools.save_summary(table)?;
            let ours: Vec<&str> = save
                .chains
                .iter()
                .map(String::as_str)
                .filter(|c| is_ferry_chain(c))
                .collect();
            let jumps: Vec<&str> = save
                .builtin_rules
                .iter()
                .map(String::as_str)
                .filter(|l| {
                    BUILTIN_JUMPS
                        .iter()
                        .any(|j| j.table == table && j.matches_save_line(l))
                })
                .collect();
            if ours.is_empty() && jumps.is_empty() {
                continue;
            }
            let _ = writeln!(payload, "*{table}");
            for chain in &ours {
                let _ = writeln!(payload, ":{chain} - [0:0]");
            }
            for jump in &jumps {
                let _ = writeln!(payload, "-D{}", &jump[2..]);
            }
            for chain in &ours {
                let _ = writeln!(payload, "-X {chain}");
            }
            payload.push_str("COMMIT\n");
        }
        if !payload.is_empty() {
            tools.restore(&payload)?;
            info!(%family, "removed iptables rules");
        }
    }
    Ok(())
}

/// Chains Ferry owns: the shared ones, the canary and per-service ones.
fn is_ferry_chain(name: &str) -> bool {
    chains::is_service_chain(name)
        || FILTER_CHAINS.contains(&name)
        || NAT_CHAINS.contains(&name)
        || name == KUBE_PROXY_CANARY
}

impl<R: Runner + Send> DataPlane for IptablesDataPlane<R> {
    fn name(&self) -> &'static str {
        match self.scope {
            Scope::All => "iptables",
            Scope::ExternalOnly => "iptables-external",
        }
    }

    fn sync(
        &mut self,
        plan: &NodePlan,
        diff: &PlanDiff,
        node: &NodeNetwork,
        full: bool,
    ) -> Result<SyncStats, SyncError> {
        self.sync_plans(|| plan.iter().map(|p| p.as_ref()), diff, node, full)
    }

    fn needs_full_sync(&mut self) -> bool {
        self.families.iter().any(|f| {
            f.ctx.is_some()
                && ["filter", "nat"]
                    .iter()
                    .any(|table| !f.tools.chain_exists(table, KUBE_PROXY_CANARY))
        })
    }
}

impl<R: Runner> IptablesDataPlane<R> {
    /// [`DataPlane::sync`] over the plans `plans` yields (each time it is called).
    fn sync_plans<'a, I: Iterator<Item = &'a ServicePortPlan>>(
        &mut self,
        plans: impl Fn() -> I,
        diff: &PlanDiff,
        node: &NodeNetwork,
        full: bool,
    ) -> Result<SyncStats, SyncError> {
        let mut stats = SyncStats::default();
        let anything_external = || {
            if full {
                plans().any(|p| p.is_externally_accessible())
            } else {
                diff.upserted
                    .iter()
                    .any(|u| u.new.is_externally_accessible())
            }
        };
        if self.scope == Scope::ExternalOnly && !self.programmed && !anything_external() {
            // Nothing enters the node through services: stay out of iptables (no nat
            // table, no conntrack cost) until something does.
            return Ok(stats);
        }
        self.programmed = true;
        for family in &mut self.families {
            let net = node.of_family(family.family);
            let ctx = NodeContext {
                family: family.family,
                cluster_cidrs: net.cluster_cidrs,
                nodeport_ips: net.nodeport_ips,
                node_ips: net.node_ips,
                scope: self.scope,
            };
            let result = family.sync(plans(), diff, ctx, full, &mut stats);
            if let Err(err) = result {
                // The kernel no longer matches the cache: rebuild from scratch next time.
                family.rendered.clear();
                family.ctx = None;
                return Err(err.into());
            }
        }
        super::conntrack::clear(&super::conntrack::stale_udp_flows(diff));
        Ok(stats)
    }
}

impl<R: Runner> FamilyState<R> {
    fn sync<'a>(
        &mut self,
        plan: impl Iterator<Item = &'a ServicePortPlan>,
        diff: &PlanDiff,
        ctx: NodeContext,
        full: bool,
        stats: &mut SyncStats,
    ) -> Result<(), ExecError> {
        // Rules depend on the node context; if it changed, everything is re-rendered.
        let full = full || self.ctx.as_ref() != Some(&ctx);
        if full
            && ctx
                .nodeport_ips
                .iter()
                .any(|ip| ip.is_loopback() && ip.is_ipv4())
        {
            // NodePorts on 127.0.0.1 need the kernel to route loopback sources (as
            // kube-proxy sets it); only when the user listed 127.0.0.0/8.
            if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1") {
                tracing::warn!(error = %e, "cannot enable route_localnet; NodePorts on 127.0.0.1 will not work");
            }
        }
        if full {
            self.full_sync(plan, &ctx, stats)?;
            info!(family = %self.family, services = self.rendered.len(), "iptables full sync done");
        } else if let Some(payload) = self.partial_payload(diff, &ctx, stats) {
            stats.writes += payload.lines().count();
            debug!(family = %self.family, lines = payload.lines().count(), "iptables-restore");
            self.tools.restore(&payload)?;
        }
        let nat: usize = self.rendered.values().map(|r| r.nat_rule_count).sum();
        let filter: usize = self.rendered.values().map(|r| r.filter_shared.len()).sum();
        stats.iptables_rules.push((self.family, "nat", nat));
        stats.iptables_rules.push((self.family, "filter", filter));
        self.ctx = Some(ctx);
        Ok(())
    }

    /// Everything: shared chains rewritten, every service chain written, stale
    /// service chains (found with iptables-save) deleted, built-in jumps ensured. The
    /// payload is streamed into iptables-restore.
    fn full_sync<'a>(
        &mut self,
        plan: impl Iterator<Item = &'a ServicePortPlan>,
        ctx: &NodeContext,
        stats: &mut SyncStats,
    ) -> Result<(), ExecError> {
        let nat_save = self.tools.save_summary("nat")?;
        let filter_save = self.tools.save_summary("filter")?;
        self.rendered.clear();
        let plans: Vec<&ServicePortPlan> = plan.filter(|p| p.key.family == self.family).collect();
        for p in &plans {
            self.rendered.insert(p.key.clone(), Rendered::new(p, ctx).0);
        }
        stats.plans_written += self.rendered.len();
        let active: HashSet<&str> = self
            .rendered
            .values()
            .flat_map(|r| r.chains.iter().map(String::as_str))
            .collect();
        let stale: Vec<&str> = nat_save
            .chains
            .iter()
            .map(String::as_str)
            .filter(|c| chains::is_service_chain(c) && !active.contains(c))
            .collect();
        if !stale.is_empty() {
            info!(family = %self.family, stale = stale.len(), "deleting stale service chains");
        }
        let bulk = active.len() + stale.len() > BULK_CHAINS;
        let shared = render_shared(ctx);
        let rendered = &self.rendered;
        let write = |out: &mut dyn Write| -> std::io::Result<()> {
            out.write_all(b"*filter\n")?;
            for chain in FILTER_CHAINS.iter().chain([&KUBE_PROXY_CANARY]) {
                writeln!(out, ":{chain} - [0:0]")?;
            }
            write_missing_jumps(out, "filter", &filter_save)?;
            for r in &shared.filter {
                writeln!(out, "-A {} {}", r.chain, r.spec())?;
            }
            for rule in rendered.values().flat_map(|r| &r.filter_shared) {
                writeln!(out, "-A {} {}", rule.chain, rule.spec)?;
            }
            out.write_all(b"COMMIT\n*nat\n")?;
            if bulk {
                out.write_all(b"-Z\n")?;
            }
            for chain in NAT_CHAINS.iter().chain([&KUBE_PROXY_CANARY]) {
                writeln!(out, ":{chain} - [0:0]")?;
            }
            for chain in active.iter().chain(&stale) {
                writeln!(out, ":{chain} - [0:0]")?;
            }
            write_missing_jumps(out, "nat", &nat_save)?;
            for r in &shared.nat {
                writeln!(out, "-A {} {}", r.chain, r.spec())?;
            }
            let shared_rules = || rendered.values().flat_map(|r| &r.nat_shared);
            for rule in shared_rules().filter(|r| r.chain == chains::KUBE_SERVICES) {
                writeln!(out, "-A {} {}", rule.chain, rule.spec)?;
            }
            for r in &shared.nodeports_jump {
                writeln!(out, "-A {} {}", r.chain, r.spec())?;
            }
            for rule in shared_rules().filter(|r| r.chain != chains::KUBE_SERVICES) {
                writeln!(out, "-A {} {}", rule.chain, rule.spec)?;
            }
            for p in &plans {
                write_chain_rules(out, &render_service(p, ctx))?;
            }
            for chain in &stale {
                writeln!(out, "-X {chain}")?;
            }
            out.write_all(b"COMMIT\n")
        };
        self.tools.restore_with(&write)
    }

    /// Only what the diff touched: the changed services' chains are rewritten and
    /// their rules in the shared chains are deleted and re-inserted one by one, so the
    /// cost does not grow with the number of services.
    fn partial_payload(
        &mut self,
        diff: &PlanDiff,
        ctx: &NodeContext,
        stats: &mut SyncStats,
    ) -> Option<String> {
        let mut nat = String::new();
        let mut filter = String::new();
        let mut declare: Vec<String> = Vec::new();
        let mut delete: Vec<String> = Vec::new();
        let mut chain_rules: Vec<u8> = Vec::new();
        // Shared-chain rules of `old` that `keep` does not have any more.
        let retire =
            |old: &Rendered, keep: Option<&Rendered>, nat: &mut String, filter: &mut String| {
                let kept = |r: &SharedRule, pick: fn(&Rendered) -> &Vec<SharedRule>| {
                    keep.is_some_and(|k| pick(k).contains(r))
                };
                for rule in old
                    .nat_shared
                    .iter()
                    .filter(|r| !kept(r, |k| &k.nat_shared))
                {
                    let _ = writeln!(nat, "-D {} {}", rule.chain, rule.spec);
                }
                for rule in old
                    .filter_shared
                    .iter()
                    .filter(|r| !kept(r, |k| &k.filter_shared))
                {
                    let _ = writeln!(filter, "-D {} {}", rule.chain, rule.spec);
                }
            };
        for removed in diff.removed.iter().filter(|p| p.key.family == self.family) {
            if let Some(old) = self.rendered.remove(&removed.key) {
                retire(&old, None, &mut nat, &mut filter);
                delete.extend(old.chains);
                stats.plans_removed += 1;
            }
        }
        for upsert in diff
            .upserted
            .iter()
            .filter(|u| u.new.key.family == self.family)
        {
            let (fresh, rules) = Rendered::new(&upsert.new, ctx);
            let old = self.rendered.get(&upsert.new.key);
            if let Some(old) = old {
                retire(old, Some(&fresh), &mut nat, &mut filter);
                delete.extend(
                    old.chains
                        .iter()
                        .filter(|c| !fresh.chains.contains(c))
                        .cloned(),
                );
            }
            let is_new = |r: &SharedRule, pick: fn(&Rendered) -> &Vec<SharedRule>| {
                !old.is_some_and(|o| pick(o).contains(r))
            };
            // Inserted at the top: KUBE-SERVICES must keep the NodePort jump last.
            for rule in fresh
                .nat_shared
                .iter()
                .filter(|r| is_new(r, |o| &o.nat_shared))
            {
                let _ = writeln!(nat, "-I {} 1 {}", rule.chain, rule.spec);
            }
            for rule in fresh
                .filter_shared
                .iter()
                .filter(|r| is_new(r, |o| &o.filter_shared))
            {
                let _ = writeln!(filter, "-I {} 1 {}", rule.chain, rule.spec);
            }
            declare.extend(fresh.chains.iter().cloned());
            // Writing into a Vec cannot fail.
            let _ = write_chain_rules(&mut chain_rules, &rules);
            self.rendered.insert(upsert.new.key.clone(), fresh);
            stats.plans_written += 1;
        }
        if nat.is_empty() && filter.is_empty() && declare.is_empty() && delete.is_empty() {
            return None;
        }
        let chain_rules = String::from_utf8_lossy(&chain_rules);
        let mut out = String::with_capacity(nat.len() + filter.len() + chain_rules.len() + 256);
        if !filter.is_empty() {
            out.push_str("*filter\n");
            out.push_str(&filter);
            out.push_str("COMMIT\n");
        }
        out.push_str("*nat\n");
        for chain in declare.iter().chain(&delete) {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        out.push_str(&nat);
        out.push_str(&chain_rules);
        for chain in &delete {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
        Some(out)
    }
}

/// Writes the jumps from built-in chains that `save` does not show yet, so the result
/// has them first, in kube-proxy's order.
fn write_missing_jumps(
    out: &mut dyn Write,
    table: &str,
    save: &SaveSummary,
) -> std::io::Result<()> {
    for jump in BUILTIN_JUMPS.iter().rev().filter(|j| j.table == table) {
        if !save.builtin_rules.iter().any(|l| jump.matches_save_line(l)) {
            writeln!(out, "-I {} 1 {}", jump.chain, jump.rule().spec())?;
        }
    }
    Ok(())
}
