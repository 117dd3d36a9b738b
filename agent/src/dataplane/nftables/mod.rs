//! The nftables backend: one `ferry` table per IP family, verdict maps for every
//! frontend kind, shared balancing chains and endpoint maps ([`render`]).
//!
//! Every write is one nft transaction ([`exec`], in process through [`libnftables`]
//! where the host has it) built in memory. A full sync
//! replaces the table atomically (`add table; delete table; table { ... }`, which also
//! adopts a table a killed agent left); a partial sync writes only the map elements
//! of the plans that changed (and the chains of the few plans that have their own),
//! so one endpoint change costs the same at 10 services or 10,000.
//!
//! Why `nft` and not netlink from a crate: the layout needs `numgen`, `fib`, `socket`
//! and dynamic-set (`update @set`) expressions, which neither `rustables` (0.9) nor
//! `nftnl` (0.9, libnftnl) can express. Why shared chains and endpoint maps: `nft`
//! reads every chain of the table before each transaction, so with a chain per
//! service port (20,000 at 10,000 services) even a one-element change took ~70 ms and
//! the agent's change p50 was 253 ms, and 200,000 DNAT rules took `nft` 7.9 s to
//! load; the same endpoints as map elements load in a fraction of that (measured
//! numbers in README's Performance section). Also measured here: one endpoint map
//! referenced from a rule per service took 180 s (the kernel walks the whole map per
//! binding; the shared chains bind it a few dozen times), a named map per service
//! 12 s, kube-proxy's per-service anonymous vmaps ~70 s.
//!
//! Limits: ClientIP affinity sets are rebuilt (emptied) by a full sync (at start and
//! every `--full-sync-period`); unallocated ClusterIPs are dropped only where
//! ServiceCIDR objects say which ranges ClusterIPs come from.

pub mod claims;
pub mod exec;
pub mod inspect;
pub mod libnftables;
pub mod render;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use tracing::{debug, info, warn};

use self::claims::{Claims, ElementKey, ElementOp};
use self::exec::{Nft, NftError, Runner, Session, table_exists};
use self::render::{
    Balancer, Chain, Collection, FamilyContext, ServiceObjects, TABLE, Words, entries, entry_keys,
    render_service, write_balancer, write_chain, write_fixed,
};
use super::{DataPlane, NodeLocalDns, NodeNetwork, ProgrammedCount, SyncError, SyncStats};
use crate::model::{IpFamily, NodePlan, PlanDiff, PlanKey, ServicePortPlan};

/// The keys of the elements `objects` claims.
fn element_keys(objects: &ServiceObjects) -> Vec<ElementKey> {
    let keys = objects
        .elements
        .iter()
        .map(|e| (e.collection, e.key.clone()));
    keys.collect()
}

/// How many plans use each shared `balance-*` chain: a chain exists while one does.
#[derive(Debug, Default)]
struct Balancers {
    users: HashMap<Balancer, usize>,
}

impl Balancers {
    /// `old` is no longer used and `new` is (by one plan).
    fn replace(&mut self, old: &[Balancer], new: &[Balancer]) {
        for b in new {
            *self.users.entry(*b).or_default() += 1;
        }
        for b in old {
            if let Some(n) = self.users.get_mut(b) {
                *n -= 1;
                if *n == 0 {
                    self.users.remove(b);
                }
            }
        }
    }

    /// Records, on first sight in this sync, whether each of `balancers` exists.
    fn touch(&self, balancers: &[Balancer], existed: &mut BTreeMap<Balancer, bool>) {
        for b in balancers {
            existed.entry(*b).or_insert_with(|| self.contains(b));
        }
    }

    fn contains(&self, b: &Balancer) -> bool {
        self.users.contains_key(b)
    }

    fn len(&self) -> usize {
        self.users.len()
    }
}

/// Programmed state of one IP family.
struct FamilyState {
    family: IpFamily,
    /// The context the table was written for; `None`: not written (or unknown).
    ctx: Option<FamilyContext>,
    /// Chains of plans' own (not shared), for the programmed-objects metric. What a
    /// plan owns is not kept: a partial sync renders the diff's old plan again.
    own_chains: usize,
    claims: Claims,
    balancers: Balancers,
}

/// Ferry's nftables data plane.
pub struct NftablesDataPlane<R = Session> {
    runner: R,
    families: Vec<FamilyState>,
    /// Frontends answered by the node's DNS server (rewritten by full syncs too);
    /// `None` until this agent decides (a successor starting beside the agent that
    /// holds the DNS sockets keeps that agent's steering).
    node_local_dns: Option<Vec<NodeLocalDns>>,
    /// `route_localnet` was set (or tried), once, when first needed.
    route_localnet: bool,
}

impl NftablesDataPlane {
    /// A backend for the given families.
    pub fn new(families: &[IpFamily]) -> Self {
        Self::with_runner(families, Session::open())
    }

    /// Removes Ferry's tables, in all families (nothing to do without `nft`).
    pub fn cleanup(families: &[IpFamily]) -> Result<(), NftError> {
        for &family in families {
            let af = Words::of(family).af;
            let exists = match table_exists(&Nft, af) {
                Err(NftError::Spawn(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    debug!("nft not installed; no nftables tables to remove");
                    return Ok(());
                }
                other => other?,
            };
            if exists {
                Nft.apply(&format!("delete table {af} {TABLE}\n"))?;
                info!(family = af, "removed Ferry's nftables table");
            }
        }
        Ok(())
    }
}

impl<R: Runner> NftablesDataPlane<R> {
    fn with_runner(families: &[IpFamily], runner: R) -> Self {
        Self {
            runner,
            route_localnet: false,
            node_local_dns: None,
            families: families
                .iter()
                .map(|&family| FamilyState {
                    family,
                    ctx: None,
                    own_chains: 0,
                    claims: Claims::default(),
                    balancers: Balancers::default(),
                })
                .collect(),
        }
    }

    /// NodePorts on 127.0.0.1 need the kernel to route loopback sources (as
    /// kube-proxy sets it); set once, when first needed.
    fn prepare(&mut self, node: &NodeNetwork) {
        let loopback = node
            .nodeport_ips
            .iter()
            .any(|ip| ip.is_loopback() && ip.is_ipv4());
        if self.route_localnet || !loopback {
            return;
        }
        self.route_localnet = true;
        if let Err(error) = std::fs::write(super::iptables::exec::ROUTE_LOCALNET, "1") {
            warn!(%error, "cannot enable route_localnet; NodePorts on 127.0.0.1 will not work");
        }
    }

    /// The node-local DNS frontends of `family`, as set elements; until this agent
    /// decided, what the kernel has.
    fn dns_elements(&self, family: IpFamily) -> Vec<String> {
        let Some(frontends) = &self.node_local_dns else {
            let af = Words::of(family).af;
            let set = Collection::NodeLocalDns.name();
            let listed = self.runner.read(&["-j", "list", "set", af, TABLE, &set]);
            // No table yet: nothing to keep.
            return listed
                .and_then(|json| inspect::set_elements(&json))
                .unwrap_or_default();
        };
        let mut out: Vec<String> = frontends
            .iter()
            .filter(|f| IpFamily::of(&f.frontend.ip()) == family)
            .map(|f| {
                let (ip, port) = (f.frontend.ip(), f.frontend.port());
                format!("{ip} . {} . {port}", f.protocol.lower())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// [`DataPlane::sync`] over the plans `plans` yields (each time it is called).
    fn sync_plans<'a, I: Iterator<Item = &'a ServicePortPlan>>(
        &mut self,
        plans: impl Fn() -> I,
        diff: &PlanDiff,
        node: &NodeNetwork,
        full: bool,
    ) -> Result<SyncStats, SyncError> {
        self.prepare(node);
        let mut stats = SyncStats::default();
        for i in 0..self.families.len() {
            let family = self.families[i].family;
            let ctx = FamilyContext {
                family,
                net: node.of_family(family),
            };
            let partial = !full && self.families[i].ctx.as_ref() == Some(&ctx);
            let result = if partial {
                self.families[i].partial_sync(&self.runner, diff, &ctx, &mut stats)
            } else {
                let dns = self.dns_elements(family);
                let state = &mut self.families[i];
                state.full_sync(&self.runner, plans(), ctx, &dns, &mut stats)
            };
            let state = &mut self.families[i];
            if let Err(source) = result {
                // The kernel no longer matches the cache: rebuild from scratch next time.
                state.ctx = None;
                return Err(SyncError::Nftables {
                    family,
                    partial,
                    source,
                });
            }
            stats.programmed.push(ProgrammedCount::NftablesObjects {
                family,
                chains: state.own_chains + state.balancers.len(),
                elements: state.claims.len(),
            });
        }
        Ok(stats)
    }
}

impl<R: Runner + Send> DataPlane for NftablesDataPlane<R> {
    fn name(&self) -> &'static str {
        "nftables"
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

    fn dns_listens_on_service_ip(&self) -> bool {
        true
    }

    fn steer_node_local_dns(&mut self, frontends: &[NodeLocalDns]) -> Result<(), SyncError> {
        let mut frontends = frontends.to_vec();
        frontends.sort();
        if self.node_local_dns.as_ref() == Some(&frontends) {
            return Ok(());
        }
        self.node_local_dns = Some(frontends);
        for state in &self.families {
            if state.ctx.is_none() {
                // The next full sync writes them with the table.
                continue;
            }
            let af = Words::of(state.family).af;
            let set = Collection::NodeLocalDns.name();
            let mut script = format!("flush set {af} {TABLE} {set}\n");
            let elements = self.dns_elements(state.family);
            if !elements.is_empty() {
                let _ = writeln!(
                    script,
                    "add element {af} {TABLE} {set} {{ {} }}",
                    elements.join(", ")
                );
            }
            self.runner
                .apply(&script)
                .map_err(|source| SyncError::Nftables {
                    family: state.family,
                    partial: true,
                    source,
                })?;
        }
        Ok(())
    }

    /// Cheap check: a table that was written is gone (someone deleted it).
    fn needs_full_sync(&mut self) -> bool {
        if self.families.iter().all(|f| f.ctx.is_none()) {
            return false;
        }
        let written = self.families.iter().filter(|f| f.ctx.is_some());
        written.into_iter().any(
            |f| match table_exists(&self.runner, Words::of(f.family).af) {
                Ok(exists) => !exists,
                Err(error) => {
                    warn!(%error, "cannot check Ferry's nftables table");
                    false
                }
            },
        )
    }

    fn nats_through_conntrack(&self) -> bool {
        true
    }

    fn describe(&self, plan: &ServicePortPlan) -> Vec<String> {
        let state = self.families.iter().find(|f| f.family == plan.key.family);
        let Some(ctx) = state.and_then(|f| f.ctx.as_ref()) else {
            return vec!["nftables: the table is not written yet".into()];
        };
        let objects = render_service(plan, ctx);
        let af = Words::of(plan.key.family).af;
        let mut out: Vec<String> = objects
            .elements
            .iter()
            .map(|e| match e.value.is_empty() {
                true => format!("{af} {TABLE} set {}: {}", e.collection.name(), e.key),
                false => format!(
                    "{af} {TABLE} map {}: {} : {}",
                    e.collection.name(),
                    e.key,
                    e.value
                ),
            })
            .collect();
        out.extend(
            objects
                .chains
                .iter()
                .map(|c| format!("{af} {TABLE} chain {}: {} rule(s)", c.name, c.rules.len())),
        );
        out.extend(objects.balancers.iter().map(|b| {
            format!(
                "{af} {TABLE} shared chain {} (endpoints in its map)",
                b.name()
            )
        }));
        out
    }
}

impl FamilyState {
    /// Replaces the whole table in one transaction.
    fn full_sync<'a, R: Runner>(
        &mut self,
        runner: &R,
        plans: impl Iterator<Item = &'a ServicePortPlan>,
        ctx: FamilyContext,
        dns: &[String],
        stats: &mut SyncStats,
    ) -> Result<(), NftError> {
        let af = Words::of(self.family).af;
        let started = std::time::Instant::now();
        let (body, services) = self.render_all(plans, &ctx);
        let mut elements: BTreeMap<Collection, Vec<String>> = self.claims.programmed();
        let w = Words::of(self.family);
        let mut balancers = Vec::new();
        for b in self.balancers.users.keys() {
            let list = elements
                .remove(&Collection::Endpoints(*b))
                .unwrap_or_default();
            balancers.push((*b, list));
        }
        let nodeport_ips = ctx.nodeport_ips().iter().map(ToString::to_string).collect();
        elements.insert(Collection::NodeportIps, nodeport_ips);
        elements.insert(Collection::NodeLocalDns, dns.to_vec());
        let service_cidrs = ctx.net.service_cidrs.iter().map(ToString::to_string);
        elements.insert(Collection::ServiceCidrs, service_cidrs.collect());
        let mut script =
            format!("add table {af} {TABLE}\ndelete table {af} {TABLE}\ntable {af} {TABLE} {{\n");
        let elements: Vec<(Collection, Vec<String>)> = elements.into_iter().collect();
        write_fixed(&mut script, &ctx, &elements);
        drop(elements);
        script.push_str(&body);
        drop(body);
        // Straight into the script (vmap elements may name chains defined later).
        for (b, list) in balancers {
            write_balancer(&mut script, &b, w, &list);
        }
        script.push_str("}\n");
        stats.plans_written += services;
        stats.writes += script.lines().count();
        let render_ms = started.elapsed().as_millis();
        runner.replace(&script)?;
        let nft_ms = started.elapsed().as_millis() - render_ms;
        info!(
            family = af,
            services, render_ms, nft_ms, "nftables full sync done"
        );
        self.ctx = Some(ctx);
        Ok(())
    }

    /// Forgets what was programmed and renders every plan of this family afresh: the
    /// plans' own chains and affinity sets as table-block text; their elements and
    /// shared chains go to the claims and the balancer counts. Returns the text and
    /// the number of plans.
    fn render_all<'a>(
        &mut self,
        plans: impl Iterator<Item = &'a ServicePortPlan>,
        ctx: &FamilyContext,
    ) -> (String, usize) {
        let mut count = 0;
        self.own_chains = 0;
        self.claims = Claims::default();
        self.balancers = Balancers::default();
        let w = Words::of(self.family);
        let (mut body, mut sets, mut ignored) = (String::new(), HashSet::new(), Vec::new());
        for plan in plans.filter(|p| p.key.family == self.family) {
            let objects = render_service(plan, ctx);
            for chain in &objects.chains {
                write_chain(&mut body, &chain.name, &chain.rules);
            }
            for set in &objects.affinity_sets {
                if sets.insert(set.name.clone()) {
                    let _ = writeln!(body, "  set {}", set.declaration(w));
                }
            }
            self.balancers.replace(&[], &objects.balancers);
            self.claims
                .replace(&plan.key, &[], &objects.elements, &mut ignored);
            self.own_chains += objects.chains.len();
            count += 1;
            ignored.clear();
        }
        (body, count)
    }

    /// Rewrites what the diff touched: the changed plans' chains, sets and elements.
    fn partial_sync<R: Runner>(
        &mut self,
        runner: &R,
        diff: &PlanDiff,
        ctx: &FamilyContext,
        stats: &mut SyncStats,
    ) -> Result<(), NftError> {
        let mut tx = Transaction::new(Words::of(self.family));
        // Each touched shared chain, with whether it existed before this sync.
        let mut existed: BTreeMap<Balancer, bool> = BTreeMap::new();
        let (gone, family) = (ServiceObjects::default(), self.family);
        for removed in diff.removed.iter().filter(|p| p.key.family == family) {
            let old = render_service(removed, ctx);
            self.swap(&removed.key, &old, &gone, &mut tx, &mut existed);
            stats.plans_removed += 1;
        }
        for upsert in diff.upserted.iter().filter(|u| u.new.key.family == family) {
            let plan = &upsert.new;
            let objects = render_service(plan, ctx);
            // What the last sync wrote for it: the table was written for this same
            // context (else this sync would be full).
            let old = upsert.old.as_ref().map(|p| render_service(p, ctx));
            self.swap(
                &plan.key,
                &old.unwrap_or_default(),
                &objects,
                &mut tx,
                &mut existed,
            );
            self.report_duplicates(plan, &objects);
            stats.plans_written += 1;
        }
        tx.balancers(existed, &self.balancers);
        let Some(script) = tx.finish() else {
            return Ok(());
        };
        stats.writes += script.lines().count();
        let started = std::time::Instant::now();
        let applied = runner.apply(&script);
        let (lines, nft_us) = (script.lines().count(), started.elapsed().as_micros());
        debug!(family = %self.family, lines, nft_us, "nft transaction");
        applied
    }

    /// Puts into `tx` what replaces plan `key`'s `old` objects by `new` ones (empty
    /// for a removed plan), and keeps the claims and counts in step; `existed`
    /// collects the shared chains it touches.
    fn swap(
        &mut self,
        key: &PlanKey,
        old: &ServiceObjects,
        new: &ServiceObjects,
        tx: &mut Transaction,
        existed: &mut BTreeMap<Balancer, bool>,
    ) {
        let keys = element_keys(old);
        self.claims
            .replace(key, &keys, &new.elements, &mut tx.elements);
        tx.remove(old, new);
        tx.write(new);
        self.balancers.touch(&old.balancers, existed);
        self.balancers.touch(&new.balancers, existed);
        self.balancers.replace(&old.balancers, &new.balancers);
        self.own_chains = self.own_chains.saturating_sub(old.chains.len()) + new.chains.len();
    }

    /// Logs the frontends another plan holds (two services claiming one address).
    fn report_duplicates(&self, plan: &ServicePortPlan, objects: &ServiceObjects) {
        for e in &objects.elements {
            if e.collection == Collection::Hairpin || e.collection == Collection::ClusterIps {
                continue;
            }
            let key = (e.collection, e.key.clone());
            if self.claims.losers(&key).contains(&&plan.key) {
                warn!(service = %plan.key.port, frontend = %e.key, map = %e.collection.name(),
                    "frontend already used by another service; not programmed for this one");
            }
        }
    }
}

/// One partial-sync transaction, written in the order nft needs: chains and sets
/// exist before rules and elements name them, and elements are gone before the
/// chains they point to are deleted.
struct Transaction {
    w: Words,
    /// Chains to create or empty, and affinity sets to create.
    prepare: Vec<String>,
    /// Rules of the rewritten chains.
    rules: Vec<String>,
    elements: Vec<ElementOp>,
    /// Chains and sets no longer used: emptied first, deleted last.
    stale_chains: Vec<String>,
    stale_sets: Vec<String>,
}

impl Transaction {
    fn new(w: Words) -> Self {
        Self {
            w,
            prepare: Vec::new(),
            rules: Vec::new(),
            elements: Vec::new(),
            stale_chains: Vec::new(),
            stale_sets: Vec::new(),
        }
    }

    /// What `old` owned that `fresh` does not.
    fn remove(&mut self, old: &ServiceObjects, fresh: &ServiceObjects) {
        let keeps_chain = |name: &String| fresh.chains.iter().any(|c| &c.name == name);
        let keeps_set = |name: &String| fresh.affinity_sets.iter().any(|s| &s.name == name);
        let chains = old
            .chains
            .iter()
            .map(|c| &c.name)
            .filter(|c| !keeps_chain(c));
        self.stale_chains.extend(chains.cloned());
        let sets = old
            .affinity_sets
            .iter()
            .map(|s| &s.name)
            .filter(|s| !keeps_set(s));
        self.stale_sets.extend(sets.cloned());
    }

    /// `fresh`'s chains (created or emptied, then filled) and sets.
    fn write(&mut self, fresh: &ServiceObjects) {
        let (af, t) = (self.w.af, TABLE);
        for chain in &fresh.chains {
            self.write_chain(chain);
        }
        for set in &fresh.affinity_sets {
            self.prepare
                .push(format!("add set {af} {t} {}", set.declaration(self.w)));
        }
    }

    /// Creates the shared chains (each after its empty map: the chain's rule binds
    /// it) that gained their first user and retires those that lost their last;
    /// `existed` says which existed before this sync.
    fn balancers(&mut self, existed: BTreeMap<Balancer, bool>, now: &Balancers) {
        for (b, before) in existed {
            match (before, now.contains(&b)) {
                (false, true) => {
                    let (af, map) = (self.w.af, b.map_body(self.w));
                    self.prepare.push(format!("add map {af} {TABLE} {map}"));
                    self.write_chain(&b.chain(self.w));
                }
                (true, false) => {
                    self.stale_chains.push(b.name());
                    self.stale_sets.push(b.name());
                }
                _ => {}
            }
        }
    }

    /// `chain`, created or emptied, then filled.
    fn write_chain(&mut self, chain: &Chain) {
        let (af, t, name) = (self.w.af, TABLE, &chain.name);
        self.prepare.push(format!("add chain {af} {t} {name}"));
        self.prepare.push(format!("flush chain {af} {t} {name}"));
        for rule in &chain.rules {
            self.rules.push(format!("add rule {af} {t} {name} {rule}"));
        }
    }

    /// The script, or `None` when there is nothing to write.
    fn finish(self) -> Option<String> {
        let (af, t) = (self.w.af, TABLE);
        let mut lines = self.prepare;
        for chain in &self.stale_chains {
            lines.push(format!("flush chain {af} {t} {chain}"));
        }
        lines.extend(self.rules);
        for op in &self.elements {
            let (verb, e) = match op {
                ElementOp::Delete(e) => ("delete", e),
                ElementOp::Add(e) => ("add", e),
            };
            let mut items = Vec::new();
            let (c, key, value) = (e.collection, &e.key, &e.value);
            match op {
                ElementOp::Delete(_) => entry_keys(c, key, value, |k| items.push(k)),
                ElementOp::Add(_) => entries(c, key, value, |k| items.push(k)),
            }
            let (set, items) = (c.name(), items.join(", "));
            lines.push(format!("{verb} element {af} {t} {set} {{ {items} }}"));
        }
        for chain in &self.stale_chains {
            lines.push(format!("delete chain {af} {t} {chain}"));
        }
        for set in &self.stale_sets {
            lines.push(format!("delete set {af} {t} {set}"));
        }
        if lines.is_empty() {
            return None;
        }
        let mut script = lines.join("\n");
        script.push('\n');
        Some(script)
    }
}

#[cfg(test)]
mod tests;
