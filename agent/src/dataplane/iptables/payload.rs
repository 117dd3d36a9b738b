//! `iptables-restore` payloads, built from typed rules and chain names. Pure: nothing
//! here runs a tool or keeps state, so every payload shape is tested through the
//! golden tests without root.

use std::collections::HashSet;
use std::io::{self, Write};

use super::chains::{self, FILTER_CHAINS, KUBE_PROXY_CANARY, NAT_CHAINS};
use super::exec::SaveSummary;
use super::render::Chain;
use super::rule::Rule;
use super::shared::{BUILTIN_JUMPS, SharedRules};

/// A payload larger than this many chain declarations makes `iptables-restore`
/// (nf_tables flavour, 1.8.x) track every chain name in a sorted list: quadratic. A
/// leading chain-less command (`-Z`) switches it to fetching all chains instead,
/// which is linear; its side effect (zeroed packet counters of the table) is only
/// paid on such large full syncs.
const BULK_CHAINS: usize = 1000;

/// How a rule line changes its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `-A`: at the end.
    Append,
    /// `-I CHAIN 1`: at the top.
    InsertFirst,
    /// `-D`: the rule with exactly this text goes.
    Delete,
}

/// Writes one rule line.
pub fn write_rule(out: &mut dyn Write, op: Op, rule: &Rule) -> io::Result<()> {
    let (chain, spec) = (&rule.chain, rule.spec());
    match op {
        Op::Append => writeln!(out, "-A {chain} {spec}"),
        Op::InsertFirst => writeln!(out, "-I {chain} 1 {spec}"),
        Op::Delete => writeln!(out, "-D {chain} {spec}"),
    }
}

/// Declares (creates, or flushes) chains.
fn declare<'a>(out: &mut dyn Write, chains: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
    chains
        .into_iter()
        .try_for_each(|chain| writeln!(out, ":{chain} - [0:0]"))
}

/// Deletes (declared, hence empty) chains.
fn delete_chains<'a>(
    out: &mut dyn Write,
    chains: impl IntoIterator<Item = &'a str>,
) -> io::Result<()> {
    chains
        .into_iter()
        .try_for_each(|chain| writeln!(out, "-X {chain}"))
}

/// Appends rules.
fn append<'a>(out: &mut dyn Write, rules: impl IntoIterator<Item = &'a Rule>) -> io::Result<()> {
    rules
        .into_iter()
        .try_for_each(|rule| write_rule(out, Op::Append, rule))
}

/// Writes the rules of a plan's own chains.
pub fn write_chains(out: &mut dyn Write, chains: &[Chain]) -> io::Result<()> {
    append(out, chains.iter().flat_map(|(_, rules)| rules))
}

/// Inserts the jumps from built-in chains that `save` does not show yet, so the result
/// has them first, in kube-proxy's order.
fn write_missing_jumps(out: &mut dyn Write, table: &str, save: &SaveSummary) -> io::Result<()> {
    let mut missing = BUILTIN_JUMPS
        .iter()
        .rev()
        .filter(|j| j.table == table)
        .filter(|j| !save.builtin_rules.iter().any(|l| j.matches_save_line(l)));
    missing.try_for_each(|jump| write_rule(out, Op::InsertFirst, &jump.rule()))
}

/// The chain an `-A` rule jumps to.
fn jump_target(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    words.by_ref().find(|w| *w == "-j")?;
    words.next()
}

/// Rules a restore payload appends or inserts, per table (kube-proxy's
/// `sync_proxy_rules_iptables_last`).
pub fn rules_per_table(payload: &str) -> [(&'static str, usize); 2] {
    let mut counts = [("nat", 0), ("filter", 0)];
    let mut table = None;
    for line in payload.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = counts.iter().position(|(t, _)| *t == name);
        } else if (line.starts_with("-A ") || line.starts_with("-I "))
            && let Some(i) = table
        {
            counts[i].1 += 1;
        }
    }
    counts
}

#[cfg(test)]
#[test]
fn kube_proxy_leftovers_include_its_ipvs_chains_but_not_the_kubelets() {
    let save = SaveSummary {
        chains: [
            "KUBE-NODE-PORT",
            "KUBE-FIREWALL",
            "KUBE-SERVICES",
            "KUBE-KUBELET-CANARY",
        ]
        .map(String::from)
        .to_vec(),
        builtin_rules: [
            "-A INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT",
            "-A INPUT -j KUBE-FIREWALL",
        ]
        .map(String::from)
        .to_vec(),
    };
    let cleanup = |leftovers| {
        let mut out = Vec::new();
        write_cleanup(&mut out, "filter", &save, leftovers).unwrap();
        String::from_utf8(out).unwrap()
    };
    let all = cleanup(Leftovers::KubeProxy);
    assert!(
        all.contains(
            "-D INPUT -m comment --comment \"kubernetes health check rules\" -j KUBE-NODE-PORT"
        ),
        "{all}"
    );
    assert!(
        all.contains("-X KUBE-NODE-PORT") && all.contains("-X KUBE-SERVICES"),
        "{all}"
    );
    assert!(
        !all.contains("KUBE-FIREWALL") && !all.contains("KUBE-KUBELET-CANARY"),
        "{all}"
    );
    let ferry = cleanup(Leftovers::Ferry);
    assert!(!ferry.contains("KUBE-NODE-PORT"), "{ferry}");
}

#[cfg(test)]
#[test]
fn rules_are_counted_per_table() {
    let payload = "*filter\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -j DROP\nCOMMIT\n*nat\n-I KUBE-SERVICES 1 -j KUBE-SVC-X\n-A KUBE-SVC-X -j KUBE-SEP-Y\n-X KUBE-SEP-Z\nCOMMIT\n";
    assert_eq!(rules_per_table(payload), [("nat", 2), ("filter", 1)]);
}

/// A full sync: the shared chains rewritten, every service chain declared and
/// written, stale service chains deleted, missing built-in jumps inserted. Written in
/// two halves around the services' own chains, which the caller renders one plan at a
/// time so they never all sit in memory.
pub struct FullSync<'a> {
    /// `iptables-save -t filter` before the sync.
    pub filter_save: &'a SaveSummary,
    /// `iptables-save -t nat` before the sync.
    pub nat_save: &'a SaveSummary,
    /// The service-independent rules.
    pub shared: &'a SharedRules,
    /// Every service's rules in the shared filter chains.
    pub filter_rules: Vec<&'a Rule>,
    /// Every service's rules in the shared nat chains.
    pub nat_rules: Vec<&'a Rule>,
    /// Every service's own chains.
    pub chains: Vec<&'a str>,
    /// Service chains that exist but no service has any more.
    pub stale: Vec<&'a str>,
}

impl<'a> FullSync<'a> {
    /// The service chains in `nat_save` that are not among `chains`.
    pub fn stale_chains(nat_save: &'a SaveSummary, chains: &[&str]) -> Vec<&'a str> {
        let active: HashSet<&str> = chains.iter().copied().collect();
        nat_save
            .chains
            .iter()
            .map(String::as_str)
            .filter(|c| chains::is_service_chain(c) && !active.contains(c))
            .collect()
    }

    /// The filter table and the nat table up to the services' own chains.
    pub fn write_head(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(b"*filter\n")?;
        declare(out, FILTER_CHAINS.into_iter().chain([KUBE_PROXY_CANARY]))?;
        write_missing_jumps(out, "filter", self.filter_save)?;
        append(out, &self.shared.filter)?;
        append(out, self.filter_rules.iter().copied())?;
        out.write_all(b"COMMIT\n*nat\n")?;
        if self.chains.len() + self.stale.len() > BULK_CHAINS {
            out.write_all(b"-Z\n")?;
        }
        declare(out, NAT_CHAINS.into_iter().chain([KUBE_PROXY_CANARY]))?;
        declare(out, self.chains.iter().chain(&self.stale).copied())?;
        write_missing_jumps(out, "nat", self.nat_save)?;
        append(out, &self.shared.nat)?;
        let (services, others): (Vec<&Rule>, Vec<&Rule>) = self
            .nat_rules
            .iter()
            .partition(|r| r.chain == chains::KUBE_SERVICES);
        append(out, services)?;
        // The NodePort jump must stay the last rule of KUBE-SERVICES.
        append(out, &self.shared.nodeports_jump)?;
        append(out, others)
    }

    /// The rest of the nat table, after the services' own chains.
    pub fn write_tail(&self, out: &mut dyn Write) -> io::Result<()> {
        delete_chains(out, self.stale.iter().copied())?;
        out.write_all(b"COMMIT\n")
    }
}

/// The table a shared rule lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// The filter table.
    Filter,
    /// The nat table.
    Nat,
}

/// A partial sync's payload, built up service by service: the changed services'
/// chains rewritten, their rules in the shared chains deleted and inserted one by one,
/// so the cost does not grow with the number of services.
#[derive(Debug, Default)]
pub struct PartialSync {
    filter: Vec<u8>,
    nat: Vec<u8>,
    declare: Vec<String>,
    delete: Vec<String>,
    chain_rules: Vec<u8>,
}

impl PartialSync {
    /// Changes one service's rules in the shared chains of `table` from `old` to
    /// `fresh`: deletes what `fresh` lacks, inserts what `old` lacked. Inserted at the
    /// top: KUBE-SERVICES must keep the NodePort jump last.
    pub fn replace_rules(&mut self, table: Table, old: &[Rule], fresh: &[Rule]) {
        let out = match table {
            Table::Filter => &mut self.filter,
            Table::Nat => &mut self.nat,
        };
        let gone = old.iter().filter(|r| !fresh.contains(r));
        let added = fresh.iter().filter(|r| !old.contains(r));
        let lines = gone
            .map(|r| (Op::Delete, r))
            .chain(added.map(|r| (Op::InsertFirst, r)));
        for (op, rule) in lines {
            // Writing into a Vec cannot fail.
            let _ = write_rule(out, op, rule);
        }
    }

    /// Changes one service's own chains from those named `old` to `fresh`: the fresh
    /// ones are rewritten, the others deleted.
    pub fn replace_chains(&mut self, old: &[String], fresh: &[Chain]) {
        let kept = |name: &String| fresh.iter().any(|(f, _)| f == name);
        self.delete
            .extend(old.iter().filter(|name| !kept(name)).cloned());
        self.declare
            .extend(fresh.iter().map(|(name, _)| name.clone()));
        // Writing into a Vec cannot fail.
        let _ = write_chains(&mut self.chain_rules, fresh);
    }

    /// The payload, or `None` when nothing changed.
    pub fn finish(self) -> Option<String> {
        let chains_untouched = self.declare.is_empty() && self.delete.is_empty();
        if self.nat.is_empty() && self.filter.is_empty() && chains_untouched {
            return None;
        }
        let mut out =
            Vec::with_capacity(self.filter.len() + self.nat.len() + self.chain_rules.len() + 256);
        if !self.filter.is_empty() {
            out.extend_from_slice(b"*filter\n");
            out.extend_from_slice(&self.filter);
            out.extend_from_slice(b"COMMIT\n");
        }
        out.extend_from_slice(b"*nat\n");
        let deleted = || self.delete.iter().map(String::as_str);
        // Writing into a Vec cannot fail.
        let _ = declare(
            &mut out,
            self.declare.iter().map(String::as_str).chain(deleted()),
        );
        out.extend_from_slice(&self.nat);
        out.extend_from_slice(&self.chain_rules);
        let _ = delete_chains(&mut out, deleted());
        out.extend_from_slice(b"COMMIT\n");
        Some(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Whose chains a cleanup removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leftovers {
    /// Ferry's layout (kube-proxy's iptables mode's): its chains and its jumps.
    Ferry,
    /// Also kube-proxy's IPVS-mode chains, and any built-in chain rule jumping to
    /// one of them (kube-proxy's comments differ between versions and modes).
    KubeProxy,
}

/// Writes what removes Ferry's (or kube-proxy's) chains and built-in jumps from one
/// table, as `iptables-save` showed it; nothing when there are none.
pub fn write_cleanup(
    out: &mut dyn Write,
    table: &str,
    save: &SaveSummary,
    leftovers: Leftovers,
) -> io::Result<()> {
    let owned = |c: &str| {
        chains::is_owned_chain(c)
            || (leftovers == Leftovers::KubeProxy && chains::KUBE_PROXY_IPVS_CHAINS.contains(&c))
    };
    let ours: Vec<&str> = save
        .chains
        .iter()
        .map(String::as_str)
        .filter(|c| owned(c))
        .collect();
    let jumps: Vec<&str> = save
        .builtin_rules
        .iter()
        .filter(|l| {
            let ferry_jump = BUILTIN_JUMPS
                .iter()
                .any(|j| j.table == table && j.matches_save_line(l));
            ferry_jump || (leftovers == Leftovers::KubeProxy && jump_target(l).is_some_and(owned))
        })
        .filter_map(|l| l.strip_prefix("-A"))
        .collect();
    if ours.is_empty() && jumps.is_empty() {
        return Ok(());
    }
    writeln!(out, "*{table}")?;
    declare(out, ours.iter().copied())?;
    jumps
        .iter()
        .try_for_each(|jump| writeln!(out, "-D{jump}"))?;
    delete_chains(out, ours.iter().copied())?;
    out.write_all(b"COMMIT\n")
}
