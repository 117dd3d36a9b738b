//! The iptables backend: kube-proxy's chain layout, applied with one
//! `iptables-restore --noflush` per family and sync. A partial sync rewrites the shared
//! chains (from cached per-service text) and only the chains of services that changed.

pub mod chains;
pub mod exec;
pub mod render;
pub mod rule;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use tracing::{debug, info};

use self::chains::{FILTER_CHAINS, KUBE_PROXY_CANARY, NAT_CHAINS};
use self::exec::{ExecError, Tools, chains_in_save};
use self::render::{BUILTIN_JUMPS, NodeContext, Scope, render_service, render_shared};
use self::rule::Rule;
use super::{Backend, NodeNetwork, SyncError, SyncStats};
use crate::model::{IpFamily, NodePlan, PlanDiff, PlanKey, ServicePortPlan};

/// One plan's rules, rendered once and reused by later partial syncs.
#[derive(Debug, Default)]
struct Rendered {
    nat_services: String,
    nat_nodeports: String,
    filter_services: String,
    filter_external: String,
    filter_firewall: String,
    /// This plan's own chains.
    chains: Vec<String>,
    /// `-A` lines of those chains.
    chain_rules: String,
    nat_rule_count: usize,
    filter_rule_count: usize,
}

impl Rendered {
    fn new(plan: &ServicePortPlan, ctx: &NodeContext) -> Self {
        let rules = render_service(plan, ctx);
        let join = |rules: &[Rule]| {
            let mut s = String::new();
            rules.iter().for_each(|r| r.write_to(&mut s));
            s
        };
        let mut chain_rules = String::new();
        let mut nat_rule_count = rules.nat_services.len() + rules.nat_nodeports.len();
        let filter_rule_count =
            rules.filter_services.len() + rules.filter_external.len() + rules.filter_firewall.len();
        for (_, chain) in &rules.chains {
            nat_rule_count += chain.len();
            chain.iter().for_each(|r| r.write_to(&mut chain_rules));
        }
        Self {
            nat_services: join(&rules.nat_services),
            nat_nodeports: join(&rules.nat_nodeports),
            filter_services: join(&rules.filter_services),
            filter_external: join(&rules.filter_external),
            filter_firewall: join(&rules.filter_firewall),
            chains: rules.chains.into_iter().map(|(name, _)| name).collect(),
            chain_rules,
            nat_rule_count,
            filter_rule_count,
        }
    }
}

/// Programmed state of one IP family.
struct FamilyState {
    family: IpFamily,
    tools: Tools,
    ctx: Option<NodeContext>,
    rendered: BTreeMap<PlanKey, Rendered>,
}

/// kube-proxy-compatible iptables data plane.
pub struct IptablesBackend {
    scope: Scope,
    families: Vec<FamilyState>,
}

impl IptablesBackend {
    /// A backend for the given families. `scope` limits it to traffic entering the node
    /// when another data plane (eBPF) handles ClusterIPs.
    pub fn new(families: &[IpFamily], scope: Scope) -> Self {
        Self {
            scope,
            families: families
                .iter()
                .map(|&family| FamilyState {
                    family,
                    tools: Tools::for_family(family),
                    ctx: None,
                    rendered: BTreeMap::new(),
                })
                .collect(),
        }
    }

    /// Removes every chain and jump Ferry (or kube-proxy) installed, in all families.
    pub fn cleanup(families: &[IpFamily]) -> Result<(), ExecError> {
        for &family in families {
            let tools = Tools::for_family(family);
            let mut payload = String::new();
            for table in ["filter", "nat"] {
                let save = tools.save(table)?;
                let ours: Vec<&str> = chains_in_save(&save)
                    .filter(|c| is_ferry_chain(c))
                    .collect();
                let jumps: Vec<&str> = save
                    .lines()
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
}

/// Chains Ferry owns: the shared ones, the canary and per-service ones.
fn is_ferry_chain(name: &str) -> bool {
    chains::is_service_chain(name)
        || FILTER_CHAINS.contains(&name)
        || NAT_CHAINS.contains(&name)
        || name == KUBE_PROXY_CANARY
}

impl Backend for IptablesBackend {
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
        let mut stats = SyncStats::default();
        for family in &mut self.families {
            let net = node.of_family(family.family);
            let ctx = NodeContext {
                family: family.family,
                cluster_cidrs: net.cluster_cidrs,
                nodeport_ips: net.nodeport_ips,
                node_ips: net.node_ips,
                scope: self.scope,
            };
            let result = family.sync(plan, diff, ctx, full, &mut stats);
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

    fn needs_full_sync(&mut self) -> bool {
        self.families.iter().any(|f| {
            f.ctx.is_some()
                && ["filter", "nat"]
                    .iter()
                    .any(|table| !f.tools.chain_exists(table, KUBE_PROXY_CANARY))
        })
    }
}

impl FamilyState {
    fn sync(
        &mut self,
        plan: &NodePlan,
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
        let mut declare: Vec<String> = Vec::new();
        let mut delete: Vec<String> = Vec::new();
        let mut written: Vec<&PlanKey> = Vec::new();
        let mut existing_save: Option<(String, String)> = None;

        if full {
            let nat = self.tools.save("nat")?;
            let filter = self.tools.save("filter")?;
            self.rendered.clear();
            for p in plan.iter().filter(|p| p.key.family == self.family) {
                self.rendered.insert(p.key.clone(), Rendered::new(p, &ctx));
                written.push(&p.key);
            }
            let active: HashSet<&str> = self
                .rendered
                .values()
                .flat_map(|r| r.chains.iter().map(String::as_str))
                .collect();
            delete.extend(
                chains_in_save(&nat)
                    .filter(|c| chains::is_service_chain(c) && !active.contains(c))
                    .map(str::to_owned),
            );
            stats.plans_written += written.len();
            existing_save = Some((nat, filter));
        } else {
            for removed in diff.removed.iter().filter(|p| p.key.family == self.family) {
                if let Some(old) = self.rendered.remove(&removed.key) {
                    delete.extend(old.chains);
                    stats.plans_removed += 1;
                }
            }
            for upsert in diff
                .upserted
                .iter()
                .filter(|u| u.new.key.family == self.family)
            {
                let fresh = Rendered::new(&upsert.new, &ctx);
                if let Some(old) = self.rendered.get(&upsert.new.key) {
                    delete.extend(
                        old.chains
                            .iter()
                            .filter(|c| !fresh.chains.contains(c))
                            .cloned(),
                    );
                }
                self.rendered.insert(upsert.new.key.clone(), fresh);
                written.push(&upsert.new.key);
                stats.plans_written += 1;
            }
        }
        for key in &written {
            if let Some(r) = self.rendered.get(*key) {
                declare.extend(r.chains.iter().cloned());
            }
        }

        let payload = self.payload(&ctx, &written, &declare, &delete, existing_save.as_ref());
        stats.writes += payload.lines().count();
        debug!(family = %self.family, lines = payload.lines().count(), full, "iptables-restore");
        self.tools.restore(&payload)?;
        if full {
            info!(family = %self.family, services = self.rendered.len(), stale_chains = delete.len(), "iptables full sync done");
        }
        let nat: usize = self.rendered.values().map(|r| r.nat_rule_count).sum();
        let filter: usize = self.rendered.values().map(|r| r.filter_rule_count).sum();
        stats.iptables_rules.push((self.family, "nat", nat));
        stats.iptables_rules.push((self.family, "filter", filter));
        self.ctx = Some(ctx);
        Ok(())
    }

    fn payload(
        &self,
        ctx: &NodeContext,
        written: &[&PlanKey],
        declare: &[String],
        delete: &[String],
        save: Option<&(String, String)>,
    ) -> String {
        let shared = render_shared(ctx);
        let mut out = String::with_capacity(4096 + self.rendered.len() * 256);
        let each = |out: &mut String, pick: fn(&Rendered) -> &str| {
            for r in self.rendered.values() {
                out.push_str(pick(r));
            }
        };

        out.push_str("*filter\n");
        for chain in FILTER_CHAINS {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        let _ = writeln!(out, ":{KUBE_PROXY_CANARY} - [0:0]");
        if let Some((_, filter)) = save {
            insert_missing_jumps(&mut out, "filter", filter);
        }
        shared.filter.iter().for_each(|r| r.write_to(&mut out));
        each(&mut out, |r| &r.filter_services);
        each(&mut out, |r| &r.filter_external);
        each(&mut out, |r| &r.filter_firewall);
        out.push_str("COMMIT\n*nat\n");
        for chain in NAT_CHAINS {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        let _ = writeln!(out, ":{KUBE_PROXY_CANARY} - [0:0]");
        for chain in declare.iter().chain(delete) {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        if let Some((nat, _)) = save {
            insert_missing_jumps(&mut out, "nat", nat);
        }
        shared.nat.iter().for_each(|r| r.write_to(&mut out));
        each(&mut out, |r| &r.nat_services);
        shared
            .nodeports_jump
            .iter()
            .for_each(|r| r.write_to(&mut out));
        each(&mut out, |r| &r.nat_nodeports);
        for key in written {
            if let Some(r) = self.rendered.get(*key) {
                out.push_str(&r.chain_rules);
            }
        }
        for chain in delete {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
        out
    }
}

/// Adds the jumps from built-in chains that `save` does not show yet, so the result has
/// them first, in kube-proxy's order.
fn insert_missing_jumps(out: &mut String, table: &str, save: &str) {
    for jump in BUILTIN_JUMPS.iter().rev().filter(|j| j.table == table) {
        if !save.lines().any(|l| jump.matches_save_line(l)) {
            let _ = writeln!(out, "-I {} 1 {}", jump.chain, jump.rule().spec());
        }
    }
}
