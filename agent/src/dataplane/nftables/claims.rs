//! Which plans claim each map or set element. Two services may name the same
//! frontend (a ClusterIP reused as another's externalIP) and many plans share an
//! endpoint address in `hairpin`; nft refuses a second element with the same key, so
//! one duplicate would fail the whole transaction. Here each key has one winner, the
//! first claimant by plan key (deterministic across restarts); when it lets go, the
//! next one is programmed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::render::{Collection, Element, entries};
use crate::model::PlanKey;

/// A key in one collection.
pub type ElementKey = (Collection, String);

/// An element write in a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElementOp {
    /// Remove an element; its value is the one programmed (an endpoint list's
    /// length says which kernel elements it stands for).
    Delete(Element),
    Add(Element),
}

/// The claimants of one key, sorted by plan key, with the value each wants. Almost
/// always one: a Vec of one is one small allocation, where a map would take a node
/// of eleven slots (at 100,000 endpoints that difference is >100 MB).
type Claimants = Vec<(Arc<PlanKey>, Box<str>)>;

/// The claimants of every element key.
#[derive(Debug, Default)]
pub struct Claims {
    by_key: HashMap<ElementKey, Claimants>,
}

impl Claims {
    /// The element programmed for `key`: its first claimant's.
    fn winner(&self, key: &ElementKey) -> Option<&str> {
        self.by_key.get(key)?.first().map(|(_, v)| &**v)
    }

    /// `plan` now claims exactly `new` instead of `old`; appends the element writes
    /// that make the kernel match (deletes before adds).
    pub fn replace(
        &mut self,
        plan: &PlanKey,
        old: &[ElementKey],
        new: &[Element],
        ops: &mut Vec<ElementOp>,
    ) {
        let touched: BTreeSet<ElementKey> = old
            .iter()
            .cloned()
            .chain(new.iter().map(|e| (e.collection, e.key.clone())))
            .collect();
        let before: Vec<Option<String>> = touched
            .iter()
            .map(|k| self.winner(k).map(str::to_owned))
            .collect();
        for key in old {
            if let Some(claimants) = self.by_key.get_mut(key) {
                claimants.retain(|(p, _)| **p != *plan);
                if claimants.is_empty() {
                    self.by_key.remove(key);
                }
            }
        }
        let shared = Arc::new(plan.clone());
        for e in new {
            let claimants = self
                .by_key
                .entry((e.collection, e.key.clone()))
                .or_default();
            let value: Box<str> = e.value.as_str().into();
            match claimants.binary_search_by(|(p, _)| (**p).cmp(plan)) {
                Ok(i) => claimants[i].1 = value,
                Err(i) => claimants.insert(i, (shared.clone(), value)),
            }
        }
        let mut adds = Vec::new();
        for (key, before) in touched.into_iter().zip(before) {
            let after = self.winner(&key).map(str::to_owned);
            if before == after {
                continue;
            }
            let (collection, key) = key;
            if let Some(value) = before {
                let key = key.clone();
                ops.push(ElementOp::Delete(Element {
                    collection,
                    key,
                    value,
                }));
            }
            if let Some(value) = after {
                adds.push(ElementOp::Add(Element {
                    collection,
                    key,
                    value,
                }));
            }
        }
        ops.extend(adds);
    }

    /// Every programmed kernel element, grouped by collection, as written inside
    /// `{ }`.
    pub fn programmed(&self) -> BTreeMap<Collection, Vec<String>> {
        let mut out: BTreeMap<Collection, Vec<String>> = BTreeMap::new();
        for ((collection, key), claimants) in &self.by_key {
            if let Some((_, value)) = claimants.first() {
                let texts = out.entry(*collection).or_default();
                entries(*collection, key, value, |text| texts.push(text));
            }
        }
        for texts in out.values_mut() {
            texts.sort_unstable();
        }
        out
    }

    /// Programmed elements.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether nothing is programmed.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Plans that claim `key` without being programmed for it (for logs).
    pub fn losers(&self, key: &ElementKey) -> Vec<&PlanKey> {
        let claimants = self.by_key.get(key).map(Vec::as_slice).unwrap_or_default();
        claimants.iter().skip(1).map(|(p, _)| &**p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{IpFamily, Protocol, ServiceName, ServicePortName};

    fn plan(name: &str) -> PlanKey {
        PlanKey {
            port: ServicePortName {
                service: ServiceName::new("ns", name),
                port: "p".into(),
                protocol: Protocol::Tcp,
            },
            family: IpFamily::V4,
        }
    }

    fn el(key: &str, value: &str) -> Element {
        Element {
            collection: Collection::ServiceIps,
            key: key.into(),
            value: value.into(),
        }
    }

    fn gone(k: &str, value: &str) -> ElementOp {
        ElementOp::Delete(el(k, value))
    }

    fn key(k: &str) -> ElementKey {
        (Collection::ServiceIps, k.into())
    }

    #[test]
    fn a_duplicate_frontend_waits_for_the_first_claimant() {
        let mut claims = Claims::default();
        let mut ops = Vec::new();
        claims.replace(&plan("b"), &[], &[el("k", "goto b")], &mut ops);
        assert_eq!(ops, [ElementOp::Add(el("k", "goto b"))]);
        ops.clear();
        claims.replace(&plan("a"), &[], &[el("k", "goto a")], &mut ops);
        assert_eq!(
            ops,
            [gone("k", "goto b"), ElementOp::Add(el("k", "goto a"))],
            "the first by plan key wins, whatever the order of arrival"
        );
        assert_eq!(claims.losers(&key("k")), [&plan("b")]);
        ops.clear();
        claims.replace(&plan("b"), &[key("k")], &[], &mut ops);
        assert!(ops.is_empty(), "a loser leaving changes nothing");
        claims.replace(&plan("a"), &[key("k")], &[], &mut ops);
        assert_eq!(ops, [gone("k", "goto a")]);
        assert_eq!(claims.len(), 0);
    }

    #[test]
    fn shared_set_elements_stay_while_anyone_claims_them() {
        let mut claims = Claims::default();
        let mut ops = Vec::new();
        claims.replace(&plan("a"), &[], &[el("ep", "")], &mut ops);
        claims.replace(&plan("b"), &[], &[el("ep", "")], &mut ops);
        assert_eq!(ops.len(), 1, "one add for two claimants");
        ops.clear();
        claims.replace(&plan("a"), &[key("ep")], &[], &mut ops);
        assert!(ops.is_empty());
        claims.replace(&plan("b"), &[key("ep")], &[], &mut ops);
        assert_eq!(ops, [gone("ep", "")]);
    }

    #[test]
    fn an_unchanged_element_is_not_rewritten_and_a_changed_one_is_replaced() {
        let mut claims = Claims::default();
        let mut ops = Vec::new();
        claims.replace(
            &plan("a"),
            &[],
            &[el("k", "goto x"), el("j", "drop")],
            &mut ops,
        );
        ops.clear();
        let old = [key("k"), key("j")];
        claims.replace(
            &plan("a"),
            &old,
            &[el("k", "goto x"), el("j", "goto y")],
            &mut ops,
        );
        assert_eq!(ops, [gone("j", "drop"), ElementOp::Add(el("j", "goto y"))]);
        assert_eq!(
            claims.programmed()[&Collection::ServiceIps],
            ["j : goto y", "k : goto x"]
        );
    }
}
