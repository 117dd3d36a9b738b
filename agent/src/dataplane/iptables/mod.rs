//! The iptables backend: kube-proxy's chain layout, applied with one
//! `iptables-restore --noflush` per family and sync. A full sync rewrites everything;
//! a partial sync touches only the services that changed: their own chains, and their
//! rules in the shared chains (deleted and re-inserted by exact text), so one endpoint
//! change costs the same at 10 services or 10,000.
//!
//! [`render`] and [`shared`] turn plans into typed [`rule::Rule`]s, [`payload`] turns
//! those into restore text, [`exec`] runs the tools; this module keeps what a partial
//! sync must remember and decides what each sync writes.

#![warn(missing_docs)]

pub mod chains;
pub mod exec;
pub mod inspect;
pub mod node_local_dns;
pub mod payload;
pub mod render;
pub mod rule;
pub mod shared;

#[cfg(test)]
mod golden_tests;

use std::collections::{BTreeMap, HashSet};

use tracing::{debug, info, warn};

use self::chains::KUBE_PROXY_CANARY;
use self::exec::{Backend, ExecError, Runner, Tools};
use self::payload::{FullSync, Leftovers, PartialSync, Table};
use self::render::{Chain, NodeContext, Scope, render_service};
use self::rule::Rule;
use self::shared::render_shared;
use super::{DataPlane, NodeLocalDns, NodeNetwork, ProgrammedCount, SyncError, SyncStats};
use crate::model::{IpFamily, NodePlan, PlanDiff, PlanKey, ServicePortPlan};

/// What a partial sync must remember of one plan: its rules in the shared chains
/// (to delete them by exact text) and its chain names (to delete the chains). Its own
/// chains' rules are re-rendered when needed rather than kept, which keeps memory small
/// at 10,000 services.
#[derive(Debug, Default)]
struct Rendered {
    /// Its rules in the shared nat chains (KUBE-SERVICES, KUBE-NODEPORTS).
    nat_shared: Vec<Rule>,
    /// Its rules in the shared filter chains.
    filter_shared: Vec<Rule>,
    /// This plan's own chains.
    chains: Vec<String>,
    nat_rule_count: usize,
}

impl Rendered {
    /// Renders a plan; also returns its own chains with their rules, for writing them
    /// now.
    fn new(plan: &ServicePortPlan, ctx: &NodeContext) -> (Self, Vec<Chain>) {
        let rules = render_service(plan, ctx);
        let nat_shared: Vec<Rule> = rules
            .nat_services
            .into_iter()
            .chain(rules.nat_nodeports)
            .collect();
        let filter_shared = rules
            .filter_services
            .into_iter()
            .chain(rules.filter_external)
            .chain(rules.filter_firewall)
            .collect();
        let own_rules: usize = rules.chains.iter().map(|(_, r)| r.len()).sum();
        let rendered = Self {
            nat_rule_count: nat_shared.len() + own_rules,
            nat_shared,
            filter_shared,
            chains: rules.chains.iter().map(|(name, _)| name.clone()).collect(),
        };
        (rendered, rules.chains)
    }

    /// Where its rules are, for `ferry explain` (`tool`: `iptables` or `ip6tables`).
    fn describe(&self, tool: &str) -> Vec<String> {
        let mut out = Vec::new();
        if !self.nat_shared.is_empty() {
            out.push(format!(
                "{tool} nat: {} rule(s) in KUBE-SERVICES / KUBE-NODEPORTS",
                self.nat_shared.len()
            ));
        }
        if !self.filter_shared.is_empty() {
            out.push(format!(
                "{tool} filter: {} rule(s) in KUBE-SERVICES / KUBE-EXTERNAL-SERVICES / KUBE-PROXY-FIREWALL",
                self.filter_shared.len()
            ));
        }
        if !self.chains.is_empty() {
            out.push(format!("{tool} nat chains: {}", self.chains.join(", ")));
        }
        out
    }

    /// Its rules in the shared chains of `table`.
    fn shared(&self, table: Table) -> &[Rule] {
        match table {
            Table::Filter => &self.filter_shared,
            Table::Nat => &self.nat_shared,
        }
    }
}

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
    /// `route_localnet` was set (or tried), which happens once, when first needed.
    route_localnet: bool,
}

impl IptablesDataPlane {
    /// A backend for the given families. `scope` limits it to traffic entering the node
    /// when another data plane (eBPF) handles ClusterIPs.
    pub fn new(families: &[IpFamily], scope: Scope) -> Self {
        Self::with_runners(families, scope, Tools::for_family)
    }

    /// Removes every chain and jump Ferry (or kube-proxy) installed, in all families.
    pub fn cleanup(families: &[IpFamily]) -> Result<(), ExecError> {
        let tools = families.iter().map(|&f| (f, Tools::for_family(f)));
        cleanup_with(tools, &["filter", "nat"], Leftovers::Ferry)?;
        for &family in families {
            let tools = Tools::for_family(family);
            let text = node_local_dns::cleanup_payload(&tools.save_summary("raw")?);
            if !text.is_empty() {
                tools.restore_with(&|out| out.write_all(text.as_bytes()))?;
            }
        }
        Ok(())
    }

    /// Removes what kube-proxy left in either iptables backend (legacy and nft, which
    /// the kernel both runs), in every mode it has, and its mangle canary. A backend
    /// whose tools are not installed is skipped.
    pub fn cleanup_kube_proxy(families: &[IpFamily]) -> Result<(), ExecError> {
        for backend in [Backend::Legacy, Backend::Nft] {
            let tools = families.iter().map(|&f| (f, Tools::of_backend(f, backend)));
            match cleanup_with(tools, &["filter", "nat", "mangle"], Leftovers::KubeProxy) {
                Err(ExecError::Spawn { tool, source })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    debug!(tool, "not installed; skipping that iptables backend");
                }
                other => other?,
            }
        }
        Ok(())
    }
}

/// [`IptablesDataPlane::cleanup`] with the given tools per family.
fn cleanup_with<R: Runner>(
    families: impl Iterator<Item = (IpFamily, R)>,
    tables: &[&str],
    leftovers: Leftovers,
) -> Result<(), ExecError> {
    for (family, tools) in families {
        let mut payload = Vec::new();
        for table in tables {
            let save = tools.save_summary(table)?;
            // Writing into a Vec cannot fail.
            let _ = payload::write_cleanup(&mut payload, table, &save, leftovers);
        }
        if !payload.is_empty() {
            tools.restore_with(&|out| out.write_all(&payload))?;
            info!(%family, "removed iptables rules");
        }
    }
    Ok(())
}

impl<R: Runner + Send> DataPlane for IptablesDataPlane<R> {
    fn name(&self) -> &'static str {
        match self.scope {
            Scope::All => "iptables",
            Scope::ExternalOnly => "iptables-external",
        }
    }

    fn dns_listens_on_service_ip(&self) -> bool {
        self.scope == Scope::All
    }

    fn steer_node_local_dns(&mut self, frontends: &[NodeLocalDns]) -> Result<(), SyncError> {
        if self.scope != Scope::All {
            return Ok(());
        }
        for state in &self.families {
            let of_family: Vec<NodeLocalDns> = frontends
                .iter()
                .filter(|f| IpFamily::of(&f.frontend.ip()) == state.family)
                .cloned()
                .collect();
            node_local_dns::apply(&state.tools, &of_family).map_err(|source| {
                SyncError::Iptables {
                    family: state.family,
                    partial: true,
                    source,
                }
            })?;
        }
        Ok(())
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

    /// Once rules are installed (in the external-only scope, not before a service
    /// needs them).
    fn nats_through_conntrack(&self) -> bool {
        self.programmed
    }

    fn describe(&self, plan: &ServicePortPlan) -> Vec<String> {
        let tool = match plan.key.family {
            IpFamily::V4 => "iptables",
            IpFamily::V6 => "ip6tables",
        };
        let state = self.families.iter().find(|f| f.family == plan.key.family);
        match state.and_then(|f| f.rendered.get(&plan.key)) {
            Some(rendered) => rendered.describe(tool),
            None if self.scope == Scope::ExternalOnly => Vec::new(),
            None => vec![format!("{tool}: no rules written for it yet")],
        }
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
    /// A backend whose iptables tools come from `runner` (a fake in tests).
    fn with_runners(families: &[IpFamily], scope: Scope, runner: impl Fn(IpFamily) -> R) -> Self {
        Self {
            scope,
            programmed: false,
            route_localnet: false,
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
                plans().any(|p| p.has_external_frontends())
            } else {
                diff.upserted.iter().any(|u| u.new.has_external_frontends())
            }
        };
        let needed =
            || self.programmed || anything_external() || (full && self.leftovers_present());
        if self.scope == Scope::ExternalOnly && !needed() {
            // Nothing enters the node through services: stay out of iptables (no nat
            // table, no conntrack cost) until something does. Leftover chains are
            // looked for on full syncs only: the check runs iptables per family, which
            // cost every eBPF-mode endpoint change ~2 ms per family.
            return Ok(stats);
        }
        self.programmed = true;
        self.prepare(node);
        for family in &mut self.families {
            let ctx = node_context(family.family, node, self.scope);
            let partial = !full && family.ctx.as_ref() == Some(&ctx);
            let result = family.sync(plans(), diff, ctx, full, &mut stats);
            if let Err(source) = result {
                // The kernel no longer matches the cache: rebuild from scratch next time.
                family.rendered.clear();
                family.ctx = None;
                return Err(SyncError::Iptables {
                    family: family.family,
                    partial,
                    source,
                });
            }
        }
        Ok(stats)
    }

    /// Whether service chains are already there (kube-proxy's, or an earlier
    /// Ferry's): then the first full sync takes them over, rewriting or deleting them,
    /// even when nothing needs iptables now.
    fn leftovers_present(&self) -> bool {
        self.families
            .iter()
            .any(|f| f.tools.chain_exists("nat", chains::KUBE_SERVICES))
    }

    /// Host set-up the rules rely on, done once, before the first rules that need it:
    /// NodePorts on 127.0.0.1 need the kernel to route loopback sources (as
    /// kube-proxy sets it); only when the user listed 127.0.0.0/8.
    fn prepare(&mut self, node: &NodeNetwork) {
        let loopback_nodeports = node
            .nodeport_ips
            .iter()
            .any(|ip| ip.is_loopback() && ip.is_ipv4());
        if self.route_localnet || !loopback_nodeports {
            return;
        }
        self.route_localnet = true;
        let v4 = self.families.iter().find(|f| f.family == IpFamily::V4);
        if let Some(Err(error)) = v4.map(|f| f.tools.enable_route_localnet()) {
            warn!(%error, "cannot enable route_localnet; NodePorts on 127.0.0.1 will not work");
        }
    }
}

/// The node facts the rules of one family depend on.
fn node_context(family: IpFamily, node: &NodeNetwork, scope: Scope) -> NodeContext {
    let net = node.of_family(family);
    NodeContext {
        family,
        local_traffic: net.local_traffic,
        masquerade_all: net.masquerade_all,
        nodeport_ips: net.nodeport_ips,
        node_ips: net.node_ips,
        scope,
    }
}

impl<R: Runner> FamilyState<R> {
    fn sync<'a>(
        &mut self,
        plans: impl Iterator<Item = &'a ServicePortPlan>,
        diff: &PlanDiff,
        ctx: NodeContext,
        full: bool,
        stats: &mut SyncStats,
    ) -> Result<(), ExecError> {
        // Rules depend on the node context; if it changed, everything is re-rendered.
        let nat: usize;
        let filter: usize;
        let written = if full || self.ctx.as_ref() != Some(&ctx) {
            self.full_sync(plans, &ctx, stats)?;
            info!(family = %self.family, services = self.rendered.len(), "iptables full sync done");
            nat = self.rendered.values().map(|r| r.nat_rule_count).sum();
            filter = self.rendered.values().map(|r| r.filter_shared.len()).sum();
            [("nat", nat), ("filter", filter)]
        } else {
            let payload = self.partial_payload(diff, &ctx, stats);
            if let Some(payload) = &payload {
                stats.writes += payload.lines().count();
                debug!(family = %self.family, lines = payload.lines().count(), "iptables-restore");
                self.tools.restore(payload)?;
            }
            nat = self.rendered.values().map(|r| r.nat_rule_count).sum();
            filter = self.rendered.values().map(|r| r.filter_shared.len()).sum();
            payload
                .as_deref()
                .map(payload::rules_per_table)
                .unwrap_or([("nat", 0), ("filter", 0)])
        };
        for (table, rules) in written {
            stats
                .programmed
                .push(ProgrammedCount::IptablesRulesWritten {
                    family: self.family,
                    table,
                    rules,
                });
        }
        stats.programmed.push(ProgrammedCount::IptablesRules {
            family: self.family,
            table: "nat",
            rules: nat,
        });
        stats.programmed.push(ProgrammedCount::IptablesRules {
            family: self.family,
            table: "filter",
            rules: filter,
        });
        self.ctx = Some(ctx);
        Ok(())
    }

    /// Everything: see [`FullSync`]. The payload is streamed into iptables-restore,
    /// each plan's own chains rendered (again) as they are written.
    fn full_sync<'a>(
        &mut self,
        plans: impl Iterator<Item = &'a ServicePortPlan>,
        ctx: &NodeContext,
        stats: &mut SyncStats,
    ) -> Result<(), ExecError> {
        let nat_save = self.tools.save_summary("nat")?;
        let filter_save = self.tools.save_summary("filter")?;
        let plans: Vec<&ServicePortPlan> = plans.filter(|p| p.key.family == self.family).collect();
        self.rendered = plans
            .iter()
            .map(|p| (p.key.clone(), Rendered::new(p, ctx).0))
            .collect();
        stats.plans_written += self.rendered.len();
        let mut seen = HashSet::new();
        let chains: Vec<&str> = self
            .rendered
            .values()
            .flat_map(|r| r.chains.iter().map(String::as_str))
            .filter(|c| seen.insert(*c))
            .collect();
        let stale = FullSync::stale_chains(&nat_save, &chains);
        if !stale.is_empty() {
            info!(family = %self.family, stale = stale.len(), "deleting stale service chains");
        }
        let shared = render_shared(ctx);
        let full = FullSync {
            filter_save: &filter_save,
            nat_save: &nat_save,
            shared: &shared,
            filter_rules: self
                .rendered
                .values()
                .flat_map(|r| &r.filter_shared)
                .collect(),
            nat_rules: self.rendered.values().flat_map(|r| &r.nat_shared).collect(),
            chains,
            stale,
        };
        self.tools.restore_with(&|out| {
            full.write_head(out)?;
            for plan in &plans {
                payload::write_chains(out, &render_service(plan, ctx).chains)?;
            }
            full.write_tail(out)
        })
    }

    /// Only what the diff touched: see [`PartialSync`]. Updates the cache as it goes.
    fn partial_payload(
        &mut self,
        diff: &PlanDiff,
        ctx: &NodeContext,
        stats: &mut SyncStats,
    ) -> Option<String> {
        let mut payload = PartialSync::default();
        let none = Rendered::default();
        for removed in diff.removed.iter().filter(|p| p.key.family == self.family) {
            if let Some(old) = self.rendered.remove(&removed.key) {
                write_change(&mut payload, &old, &none, &[]);
                stats.plans_removed += 1;
            }
        }
        let upserted = diff.upserted.iter().map(|u| &u.new);
        for plan in upserted.filter(|p| p.key.family == self.family) {
            let (fresh, chains) = Rendered::new(plan, ctx);
            let old = self.rendered.get(&plan.key).unwrap_or(&none);
            write_change(&mut payload, old, &fresh, &chains);
            self.rendered.insert(plan.key.clone(), fresh);
            stats.plans_written += 1;
        }
        payload.finish()
    }
}

/// Adds to `payload` what turns one plan's rules from `old` into `fresh` (whose own
/// chains are `chains`); an empty [`Rendered`] stands for a plan that is not there.
fn write_change(payload: &mut PartialSync, old: &Rendered, fresh: &Rendered, chains: &[Chain]) {
    for table in [Table::Nat, Table::Filter] {
        payload.replace_rules(table, old.shared(table), fresh.shared(table));
    }
    payload.replace_chains(&old.chains, chains);
}
