//! `ferry inspect services` in iptables mode: the frontends and backends of the
//! KUBE-* chains, read back from `iptables-save` (nat and filter tables, both
//! families), each named after the service its rule comment names (kube-proxy's
//! comments, which Ferry's layout keeps).

use std::collections::{BTreeMap, HashMap};

use super::exec::{ExecError, Tools};
use crate::dataplane::ebpf::inspect::{FrontendView, Inspection};
use crate::model::IpFamily;

/// Chains whose rules lead from a frontend to its backends.
const SERVICE_CHAINS: [&str; 5] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-EXT-",
    "KUBE-FW-",
];
/// How deep a frontend's jumps are followed (KUBE-FW -> EXT -> SVC -> SEP is 4).
const MAX_DEPTH: usize = 6;

/// Reads the rules of both families; a family whose tools fail (no ip6tables) is
/// left out unless both fail.
pub fn inspect() -> Result<Inspection, ExecError> {
    let mut rules = RuleSet::default();
    let mut last_error = None;
    let mut read = 0;
    for family in [IpFamily::V4, IpFamily::V6] {
        let tools = Tools::for_family(family);
        let mut family_rules = RuleSet::default();
        let saved = ["nat", "filter"].iter().try_for_each(|table| {
            tools.save_lines(table, &mut |line| family_rules.add_line(table, &line))
        });
        match saved {
            Ok(()) => {
                rules.merge(family_rules);
                read += 1;
            }
            Err(e) => last_error = Some(e),
        }
    }
    if let (0, Some(e)) = (read, last_error) {
        return Err(e);
    }
    Ok(rules.inspection())
}

/// One `-A` line of `iptables-save`, as far as inspection cares.
#[derive(Debug, Default)]
struct SavedRule {
    dest: Option<String>,
    proto: Option<String>,
    dport: Option<String>,
    comment: String,
    target: String,
    to_destination: Option<String>,
    /// `-m recent --seconds N`: ClientIP affinity.
    seconds: Option<u32>,
}

/// The rules of the chains inspection reads.
#[derive(Debug, Default)]
struct RuleSet {
    /// nat `KUBE-SERVICES` and `KUBE-NODEPORTS`: where frontends start.
    entries: Vec<(String, SavedRule)>,
    /// filter rules refusing a frontend (no endpoints, none local).
    refusals: Vec<(String, SavedRule)>,
    /// Per-service chains by name.
    chains: HashMap<String, Vec<SavedRule>>,
}

impl RuleSet {
    /// Takes in one line of `iptables-save -t TABLE`.
    fn add_line(&mut self, table: &str, line: &str) {
        let Some((chain, rule)) = parse_rule(line) else {
            return;
        };
        match (table, chain.as_str()) {
            ("nat", "KUBE-SERVICES" | "KUBE-NODEPORTS") => self.entries.push((chain, rule)),
            ("nat", c) if SERVICE_CHAINS.iter().any(|p| c.starts_with(p)) => {
                self.chains.entry(chain).or_default().push(rule);
            }
            ("filter", "KUBE-SERVICES" | "KUBE-EXTERNAL-SERVICES" | "KUBE-NODEPORTS")
                if matches!(rule.target.as_str(), "REJECT" | "DROP") =>
            {
                self.refusals.push((chain, rule));
            }
            _ => {}
        }
    }

    /// Adds another family's rules.
    fn merge(&mut self, other: RuleSet) {
        self.entries.extend(other.entries);
        self.refusals.extend(other.refusals);
        self.chains.extend(other.chains);
    }

    /// The frontends the rules implement.
    fn inspection(&self) -> Inspection {
        let mut frontends: BTreeMap<(&'static str, String, &'static str), FrontendView> =
            BTreeMap::new();
        for (chain, rule) in &self.entries {
            if let Some(view) = self.forwarding(chain, rule) {
                frontends.insert((view.kind, view.address.clone(), view.protocol), view);
            }
        }
        for (chain, rule) in &self.refusals {
            if let Some(view) = refusal(chain, rule) {
                frontends
                    .entry((view.kind, view.address.clone(), view.protocol))
                    .or_insert(view);
            }
        }
        let frontends: Vec<FrontendView> = frontends.into_values().collect();
        let mut backends: Vec<&String> = frontends.iter().flat_map(|f| &f.backends).collect();
        backends.sort();
        backends.dedup();
        Inspection {
            backends: backends.len(),
            frontends,
            counters: BTreeMap::new(),
        }
    }

    /// A frontend that jumps to a service chain, with the backends it reaches.
    fn forwarding(&self, chain: &str, rule: &SavedRule) -> Option<FrontendView> {
        if !SERVICE_CHAINS.iter().any(|p| rule.target.starts_with(p)) {
            return None;
        }
        let (kind, service) = if chain == "KUBE-NODEPORTS" {
            ("NodePort", rule.comment.clone())
        } else {
            let (service, kind) = [
                (" cluster IP", "ClusterIP"),
                (" external IP", "External"),
                (" loadbalancer IP", "External"),
            ]
            .iter()
            .find_map(|(suffix, kind)| Some((rule.comment.strip_suffix(suffix)?, *kind)))?;
            (kind, service.to_owned())
        };
        let mut reached = Reached::default();
        self.follow(&rule.target, 0, &mut reached);
        Some(FrontendView {
            address: address(rule)?,
            protocol: protocol(rule)?,
            kind,
            action: "forward",
            service: Some(service),
            affinity_timeout_seconds: reached.affinity,
            backends: reached.backends,
        })
    }

    /// Collects the DNAT targets (and affinity) reachable from `chain`.
    fn follow(&self, chain: &str, depth: usize, reached: &mut Reached) {
        if depth > MAX_DEPTH {
            return;
        }
        for rule in self.chains.get(chain).into_iter().flatten() {
            reached.affinity = reached.affinity.or(rule.seconds);
            if rule.target == "DNAT" {
                if let Some(to) = &rule.to_destination
                    && !reached.backends.contains(to)
                {
                    reached.backends.push(to.clone());
                }
            } else if SERVICE_CHAINS.iter().any(|p| rule.target.starts_with(p)) {
                self.follow(&rule.target, depth + 1, reached);
            }
        }
    }
}

/// What a frontend's chains lead to.
#[derive(Debug, Default)]
struct Reached {
    backends: Vec<String>,
    affinity: Option<u32>,
}

/// A frontend the filter table refuses ("has no endpoints": REJECT, "has no local
/// endpoints": DROP).
fn refusal(chain: &str, rule: &SavedRule) -> Option<FrontendView> {
    let service = rule
        .comment
        .strip_suffix(" has no endpoints")
        .or_else(|| rule.comment.strip_suffix(" has no local endpoints"))?;
    let kind = match (chain, &rule.dest) {
        (_, None) => "NodePort",
        ("KUBE-SERVICES", Some(_)) => "ClusterIP",
        _ => "External",
    };
    Some(FrontendView {
        address: address(rule)?,
        protocol: protocol(rule)?,
        kind,
        action: if rule.target == "REJECT" {
            "reject"
        } else {
            "drop"
        },
        service: Some(service.to_owned()),
        affinity_timeout_seconds: None,
        backends: Vec::new(),
    })
}

/// `ip:port`, `[ip6]:port`, or `*:port` for a NodePort on every node address.
fn address(rule: &SavedRule) -> Option<String> {
    let port = rule.dport.as_deref()?;
    Some(match rule.dest.as_deref() {
        None => format!("*:{port}"),
        Some(ip) if ip.contains(':') => format!("[{ip}]:{port}"),
        Some(ip) => format!("{ip}:{port}"),
    })
}

/// `TCP`, `UDP` or `SCTP` from `-p`.
fn protocol(rule: &SavedRule) -> Option<&'static str> {
    match rule.proto.as_deref()? {
        "tcp" => Some("TCP"),
        "udp" => Some("UDP"),
        "sctp" => Some("SCTP"),
        _ => None,
    }
}

/// Splits an `-A CHAIN ...` line into its chain and the options inspection reads.
fn parse_rule(line: &str) -> Option<(String, SavedRule)> {
    let mut words = split_words(line.strip_prefix("-A ")?).into_iter();
    let chain = words.next()?;
    let mut rule = SavedRule::default();
    while let Some(word) = words.next() {
        let mut value = || words.next();
        match word.as_str() {
            "-d" => {
                rule.dest = value().map(|d| {
                    d.trim_end_matches("/32")
                        .trim_end_matches("/128")
                        .to_owned()
                })
            }
            "-p" => rule.proto = value(),
            "--dport" => rule.dport = value(),
            "--comment" => rule.comment = value().unwrap_or_default(),
            "-j" | "-g" => rule.target = value().unwrap_or_default(),
            "--to-destination" => rule.to_destination = value(),
            "--seconds" => rule.seconds = value().and_then(|s| s.parse().ok()),
            _ => {}
        }
    }
    Some((chain, rule))
}

/// Words as `iptables-save` writes them: blank-separated, a double-quoted word may
/// hold blanks and `\"`.
fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = line.chars();
    let mut word = String::new();
    let mut in_word = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    match q {
                        '\\' => word.extend(chars.next()),
                        '"' => break,
                        other => word.push(other),
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            other => {
                word.push(other);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests;
