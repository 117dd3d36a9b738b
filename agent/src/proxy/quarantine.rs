//! Quarantine of service ports the kernel refuses. One plan the kernel rejects (a
//! match module it lacks, a limit it enforces) must not stop every other service from
//! being programmed. When the retry of a failed sync fails too, the loop searches for
//! the plan to blame, with full syncs that leave suspects out and add them back half by half on top of
//! what programs cleanly; the culprit is held out (logged, counted, shown by `ferry
//! status` and `ferry explain`) and everything else is programmed. Held plans are
//! tried again with a backoff and released when the kernel takes them, or when their
//! service port goes away.
//!
//! The search needs a failure to depend on what is programmed, not on when: a
//! transient failure clears on the plain retry that comes before any search. While a
//! search runs, the suspects it has not cleared are not programmed; the first
//! suspects are the ports the failed change touched, and only when excluding them
//! does not help are all ports suspected (starting from an empty plan).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::model::{NodePlan, PlanDiff, PlanKey};

/// The first retry of held plans waits this long; each failed retry doubles it.
const PROBE_AFTER: Duration = Duration::from_secs(30);
/// The longest wait between retries of held plans.
const MAX_PROBE_AFTER: Duration = Duration::from_secs(15 * 60);

/// What the loop does after a failed sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    /// The next step of a search (or the recovery after a failed retry of held
    /// plans): a full sync at once.
    Continue,
    /// An ordinary retry with the loop's backoff.
    Backoff,
}

/// A search for the plan the kernel refuses. Everything outside `suspects` (and the
/// held plans) programs cleanly once `verified`; each step includes the first
/// `included` suspects on top of that.
#[derive(Debug)]
struct Search {
    suspects: Vec<PlanKey>,
    /// The first `window` suspects hold a culprit (a step including them failed).
    window: Option<usize>,
    /// A step without any suspect succeeded.
    verified: bool,
    /// The suspects are the keys of the change that failed, not every key.
    from_change: bool,
    /// How many leading suspects the current step includes.
    included: usize,
    /// The last failure's message (the reason given for a held plan).
    last_error: String,
}

impl Search {
    fn new(suspects: Vec<PlanKey>, from_change: bool, error: &str) -> Self {
        Self {
            suspects,
            window: None,
            verified: false,
            from_change,
            included: 0,
            last_error: error.to_owned(),
        }
    }

    /// Picks how many suspects the next step includes; a window of one is a culprit,
    /// returned to be held (the step is picked again after that).
    fn next(&mut self) -> Option<PlanKey> {
        self.included = match (self.verified, self.window) {
            (false, _) => 0,
            (true, None) => self.suspects.len().div_ceil(2),
            (true, Some(1)) => {
                self.window = None;
                return Some(self.suspects.remove(0));
            }
            (true, Some(w)) => w / 2,
        };
        None
    }

    /// The step worked: what it included programs cleanly.
    fn succeeded(&mut self) {
        if !self.verified {
            // The failed full sync that started the search included every suspect.
            self.verified = true;
            self.window = Some(self.suspects.len());
            return;
        }
        self.suspects.drain(..self.included);
        self.window = self.window.map(|w| w - self.included);
    }

    /// The step failed: a culprit is among what it included. `false` when the step
    /// included no suspect at all (the suspects are not the cause).
    fn failed(&mut self, error: &str) -> bool {
        self.last_error = error.to_owned();
        if !self.verified {
            return false;
        }
        self.window = Some(self.included);
        true
    }

    /// A suspect's service port went away.
    fn forget(&mut self, key: &PlanKey) {
        if let Some(i) = self.suspects.iter().position(|k| k == key) {
            self.suspects.remove(i);
            self.window = match self.window {
                Some(w) if i < w => Some(w - 1).filter(|&w| w > 0),
                w => w,
            };
        }
    }

    fn excluded(&self) -> impl Iterator<Item = &PlanKey> {
        self.suspects.iter().skip(self.included)
    }
}

/// Plans held out of the kernel, and the search that finds them.
#[derive(Debug)]
pub struct Quarantine {
    /// Held plans and the error the kernel gave for them.
    held: BTreeMap<PlanKey, String>,
    search: Option<Search>,
    /// The ports the last failed partial sync wrote: the first suspects.
    last_change: Vec<PlanKey>,
    /// A search found no culprit (the failure does not depend on the plan): no new
    /// search until a sync works again.
    gave_up: bool,
    /// A sync failed since the last one that worked: the next failure of a full sync
    /// is not transient and starts a search.
    retried: bool,
    /// The current step retries every held plan.
    probing: bool,
    /// A full sync must follow (a search ended, a plan was held or released).
    resync: bool,
    probe_at: Option<Instant>,
    probe_after: Duration,
}

impl Default for Quarantine {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            search: None,
            last_change: Vec::new(),
            gave_up: false,
            retried: false,
            probing: false,
            resync: false,
            probe_at: None,
            probe_after: PROBE_AFTER,
        }
    }
}

impl Quarantine {
    /// The next sync must be a full one (a search or a retry of held plans is under
    /// way, or the programmed set of plans changed).
    pub fn wants_full_sync(&self) -> bool {
        self.search.is_some() || self.resync || self.probe_due()
    }

    /// When held plans are to be tried again.
    pub fn next_probe(&self) -> Option<Instant> {
        self.probe_at.filter(|_| !self.held.is_empty())
    }

    fn probe_due(&self) -> bool {
        self.next_probe().is_some_and(|t| Instant::now() >= t) && self.search.is_none()
    }

    /// Makes the retry of held plans due now.
    #[cfg(test)]
    pub fn probe_now(&mut self) {
        self.probe_at = Some(Instant::now());
    }

    /// Held plans, sorted, with the kernel's error.
    pub fn held(&self) -> impl Iterator<Item = (&PlanKey, &str)> {
        self.held.iter().map(|(k, e)| (k, e.as_str()))
    }

    /// Why `key` is not programmed, if it is held.
    pub fn reason(&self, key: &PlanKey) -> Option<&str> {
        self.held.get(key).map(String::as_str)
    }

    /// Takes out of `diff` what the kernel does not hold: removals of held plans
    /// (which releases them) and changes of held ones. Suspects of a search that go
    /// away are forgotten; changed ones stay excluded (every step is a full sync).
    /// Returns whether a held plan was released.
    pub fn filter(&mut self, diff: &mut PlanDiff) -> bool {
        if self.held.is_empty() && self.search.is_none() {
            return false;
        }
        let held = self.held.len();
        diff.removed.retain(|plan| {
            if let Some(search) = &mut self.search {
                search.forget(&plan.key);
            }
            self.held.remove(&plan.key).is_none()
        });
        diff.upserted
            .retain(|upsert| !self.held.contains_key(&upsert.new.key));
        self.held.len() != held
    }

    /// The plans to leave out of the next sync (this also picks the next step of a
    /// search and holds what it isolated). Empty: program everything.
    pub fn excluded(&mut self) -> HashSet<PlanKey> {
        self.probing = self.probe_due();
        if self.probing {
            info!(
                held = self.held.len(),
                "trying the quarantined service ports again"
            );
            return HashSet::new();
        }
        while let Some(search) = &mut self.search {
            match search.next() {
                Some(culprit) => self.hold(culprit),
                None if search.suspects.is_empty() => self.end_search(),
                None => break,
            }
        }
        let mut excluded: HashSet<PlanKey> = self.held.keys().cloned().collect();
        if let Some(search) = &self.search {
            excluded.extend(search.excluded().cloned());
        }
        excluded
    }

    /// The sync with [`Self::excluded`] left out worked.
    pub fn succeeded(&mut self) {
        self.gave_up = false;
        self.retried = false;
        self.last_change.clear();
        self.resync = false;
        if std::mem::take(&mut self.probing) {
            let released: Vec<String> = self.held.keys().map(|k| k.port.to_string()).collect();
            info!(service_ports = ?released, "the kernel took the quarantined service ports; they are programmed again");
            self.held.clear();
            self.probe_after = PROBE_AFTER;
        }
        if let Some(search) = &mut self.search {
            search.succeeded();
            if search.suspects.is_empty() {
                // This step programmed everything but the held plans.
                self.search = None;
                self.log_search_done();
            } else {
                self.resync = true;
            }
        }
    }

    /// The sync failed with `error`; `diff` is what it was to write (`full`: all of
    /// `plan`). Decides between the next search step and a plain retry.
    pub fn failed(
        &mut self,
        plan: &NodePlan,
        diff: &PlanDiff,
        full: bool,
        error: &str,
    ) -> AfterFailure {
        if std::mem::take(&mut self.probing) {
            self.probe_after = (self.probe_after * 2).min(MAX_PROBE_AFTER);
            self.probe_at = Some(Instant::now() + self.probe_after);
            warn!(
                retry_in_s = self.probe_after.as_secs(),
                error, "the kernel still refuses the quarantined service ports"
            );
            self.resync = true;
            return AfterFailure::Continue;
        }
        if let Some(search) = &mut self.search {
            if search.failed(error) {
                return AfterFailure::Continue;
            }
            if std::mem::take(&mut search.from_change) {
                search.suspects = unheld(plan, &self.held);
                info!(
                    suspects = search.suspects.len(),
                    "the changed service ports are not the cause; suspecting every port"
                );
                return AfterFailure::Continue;
            }
            warn!(
                error,
                "syncs fail even without any service port; no port is quarantined (plain retries)"
            );
            self.search = None;
            self.gave_up = true;
            return AfterFailure::Backoff;
        }
        if !full {
            self.last_change = diff.upserted.iter().map(|u| u.new.key.clone()).collect();
        }
        if !std::mem::replace(&mut self.retried, true) || self.gave_up || plan.is_empty() {
            return AfterFailure::Backoff;
        }
        self.start_search(plan, error);
        AfterFailure::Continue
    }

    fn start_search(&mut self, plan: &NodePlan, error: &str) {
        let mut changed = std::mem::take(&mut self.last_change);
        changed.retain(|k| plan.get(k).is_some() && !self.held.contains_key(k));
        changed.sort();
        changed.dedup();
        let from_change = !changed.is_empty();
        let suspects = match from_change {
            true => changed,
            false => unheld(plan, &self.held),
        };
        warn!(
            suspects = suspects.len(),
            from_change,
            error,
            "the kernel refuses the plan; searching for the service port to blame (suspects are not programmed meanwhile)"
        );
        self.search = Some(Search::new(suspects, from_change, error));
    }

    fn hold(&mut self, key: PlanKey) {
        let error = self
            .search
            .as_ref()
            .map(|s| s.last_error.clone())
            .unwrap_or_default();
        warn!(service_port = %key.port, family = %key.family, error, "the kernel refuses this service port: quarantined (not programmed; retried later)");
        if self.held.is_empty() {
            self.probe_at = Some(Instant::now() + self.probe_after);
        }
        self.held.insert(key, error);
        self.resync = true;
    }

    fn end_search(&mut self) {
        self.search = None;
        self.resync = true;
        self.log_search_done();
    }

    fn log_search_done(&self) {
        info!(
            quarantined = self.held.len(),
            "search done; programming everything but the quarantined service ports"
        );
    }
}

/// Every key of `plan` not in `held`, sorted.
fn unheld(plan: &NodePlan, held: &BTreeMap<PlanKey, String>) -> Vec<PlanKey> {
    let mut keys = plan.keys_sorted();
    keys.retain(|k| !held.contains_key(k));
    keys
}
