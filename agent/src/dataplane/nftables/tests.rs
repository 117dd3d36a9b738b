//! The sync logic against a fake `nft` that records transactions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::model::plan::test_plan;
use crate::model::{LocalTraffic, Protocol, Upsert};

#[derive(Default)]
struct FakeNft {
    scripts: Mutex<Vec<String>>,
    fail_next: AtomicBool,
    /// What `nft -j list set` prints.
    listed_set: Mutex<String>,
}

impl Runner for &FakeNft {
    fn apply(&self, script: &str) -> Result<(), NftError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(NftError::Output("refused".into()));
        }
        self.scripts.lock().unwrap().push(script.to_owned());
        Ok(())
    }

    fn read(&self, args: &[&str]) -> Result<String, NftError> {
        match args {
            ["list", "set", _, "ferry", "nodeport-ips"] => Ok(String::new()),
            ["-j", "list", "set", ..] => Ok(self.listed_set.lock().unwrap().clone()),
            _ => Err(NftError::Output("unexpected".into())),
        }
    }
}

fn node() -> NodeNetwork {
    NodeNetwork {
        nodeport_ips: vec!["192.168.0.2".parse().unwrap()],
        node_ips: vec!["192.168.0.2".parse().unwrap()],
        local_traffic: LocalTraffic::FromCidrs(vec!["10.244.0.0/16".parse().unwrap()]),
        masquerade_all: false,
        service_cidrs: Vec::new(),
    }
}

fn svc(name: &str, ip: &str, endpoints: &[&str]) -> ServicePortPlan {
    let eps: Vec<(&str, u16)> = endpoints.iter().map(|e| (*e, 8080)).collect();
    test_plan(("ns", name, "http"), Protocol::Tcp, ip, 80, &eps)
}

struct Harness<'a> {
    nft: &'a FakeNft,
    plane: NftablesDataPlane<&'a FakeNft>,
    plans: Vec<ServicePortPlan>,
}

impl<'a> Harness<'a> {
    fn new(nft: &'a FakeNft, plans: Vec<ServicePortPlan>) -> Self {
        let mut h = Self {
            nft,
            plane: NftablesDataPlane::with_runner(&[IpFamily::V4], nft),
            plans,
        };
        h.sync(&PlanDiff::default(), true).expect("full sync");
        h
    }

    fn sync(&mut self, diff: &PlanDiff, full: bool) -> Result<SyncStats, SyncError> {
        let plans = self.plans.clone();
        self.plane.sync_plans(|| plans.iter(), diff, &node(), full)
    }

    /// Replaces a plan and syncs the change alone; the transaction written.
    fn change(&mut self, plan: ServicePortPlan) -> String {
        let old = self.plans.iter().position(|p| p.key == plan.key);
        let old = old.map(|i| Arc::new(self.plans.remove(i)));
        self.plans.push(plan.clone());
        let diff = PlanDiff {
            upserted: vec![Upsert {
                old,
                new: Arc::new(plan),
            }],
            ..PlanDiff::default()
        };
        self.sync(&diff, false).expect("partial sync");
        self.last()
    }

    fn remove(&mut self, name: &str) -> String {
        let i = self
            .plans
            .iter()
            .position(|p| p.key.port.service.name == name);
        let gone = self.plans.remove(i.expect("plan exists"));
        let diff = PlanDiff {
            removed: vec![Arc::new(gone)],
            ..PlanDiff::default()
        };
        self.sync(&diff, false).expect("partial sync");
        self.last()
    }

    fn last(&self) -> String {
        self.nft
            .scripts
            .lock()
            .unwrap()
            .last()
            .cloned()
            .unwrap_or_default()
    }
}

fn line_of(script: &str, needle: &str) -> usize {
    let found = script.lines().position(|l| l.contains(needle));
    found.unwrap_or_else(|| panic!("no {needle:?} in\n{script}"))
}

#[test]
fn a_full_sync_replaces_the_whole_table_in_one_transaction() {
    let nft = FakeNft::default();
    let h = Harness::new(&nft, vec![svc("a", "10.96.0.1", &["10.244.1.1"])]);
    let script = h.last();
    assert!(
        script.starts_with("add table ip ferry\ndelete table ip ferry\ntable ip ferry {\n"),
        "{script}"
    );
    assert!(
        script.contains("10.96.0.1 . tcp . 80 : goto balance-svc-tcp-1"),
        "{script}"
    );
    assert!(script.contains("elements = { 10.96.0.1 . tcp . 80 . 0 : 10.244.1.1 . 8080 }"));
    assert!(script.contains("set nodeport-ips { type ipv4_addr; elements = { 192.168.0.2 }; }"));
    assert!(script.contains("chain balance-svc-tcp-1 {"));
    assert_eq!(nft.scripts.lock().unwrap().len(), 1);
}

#[test]
fn one_endpoint_change_writes_only_that_services_elements() {
    let nft = FakeNft::default();
    let mut h = Harness::new(
        &nft,
        vec![
            svc("a", "10.96.0.1", &["10.244.1.1"]),
            svc("b", "10.96.0.2", &["10.244.1.2"]),
        ],
    );
    let script = h.change(svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.3"]));
    assert!(
        !script.contains("10.96.0.2"),
        "service b untouched:\n{script}"
    );
    assert!(!script.contains("table ip ferry {"), "no full rewrite");
    let map = line_of(
        &script,
        "add map ip ferry balance-svc-tcp-2 { typeof ip daddr",
    );
    let chain = line_of(&script, "add chain ip ferry balance-svc-tcp-2");
    assert!(map < chain, "the chain's rule binds its map");
    let goto = line_of(
        &script,
        "add element ip ferry service-ips { 10.96.0.1 . tcp . 80 : goto balance-svc-tcp-2 }",
    );
    assert!(
        chain < goto,
        "the first two-endpoint service creates its chain"
    );
    let old = line_of(
        &script,
        "delete element ip ferry balance-svc-tcp-1 { 10.96.0.1 . tcp . 80 . 0 }",
    );
    let new = line_of(
        &script,
        "add element ip ferry balance-svc-tcp-2 { 10.96.0.1 . tcp . 80 . 0 : 10.244.1.1 . 8080, 10.96.0.1 . tcp . 80 . 1 : 10.244.1.3 . 8080 }",
    );
    assert!(old < new, "{script}");
    assert!(script.contains("add element ip ferry hairpin { 10.244.1.3 . 10.244.1.3 }"));
    assert!(
        !script.contains("delete chain"),
        "b still uses the 1-endpoint chain"
    );

    let script = h.change(svc("a", "10.96.0.1", &["10.244.1.1", "10.244.1.4"]));
    assert!(
        !script.contains("chain"),
        "same endpoint count: elements only\n{script}"
    );
    assert!(!script.contains("service-ips"), "the frontend is unchanged");
}

#[test]
fn a_removed_service_loses_its_elements_before_its_chains() {
    let nft = FakeNft::default();
    let mut sticky = svc("s", "10.96.0.9", &["10.244.1.9"]);
    sticky.affinity_timeout_seconds = Some(60);
    let plans = vec![svc("a", "10.96.0.1", &["10.244.1.1"]), sticky];
    let mut h = Harness::new(&nft, plans);
    let script = h.remove("a");
    let element = line_of(
        &script,
        "delete element ip ferry service-ips { 10.96.0.1 . tcp . 80 }",
    );
    let chain = line_of(&script, "delete chain ip ferry balance-svc-tcp-1");
    assert!(
        element < chain,
        "the last user of a shared chain deletes it\n{script}"
    );
    assert!(line_of(&script, "flush chain ip ferry balance-svc-tcp-1") < chain);

    let script = h.remove("s");
    let element = line_of(
        &script,
        "delete element ip ferry service-ips { 10.96.0.9 . tcp . 80 }",
    );
    let chain = line_of(&script, "delete chain ip ferry svc-");
    assert!(element < chain, "{script}");
    assert!(line_of(&script, "flush chain ip ferry svc-") < chain);
}

#[test]
fn losing_every_endpoint_swaps_the_forward_for_a_reject() {
    let nft = FakeNft::default();
    let mut h = Harness::new(&nft, vec![svc("a", "10.96.0.1", &["10.244.1.1"])]);
    let mut empty = svc("a", "10.96.0.1", &[]);
    empty.has_any_endpoints = false;
    let script = h.change(empty);
    assert!(script.contains("delete element ip ferry service-ips { 10.96.0.1 . tcp . 80 }"));
    assert!(script.contains(
        "add element ip ferry no-endpoint-services { 10.96.0.1 . tcp . 80 : goto reject-chain }"
    ));
    assert!(
        script.contains("delete chain ip ferry balance-svc-tcp-1"),
        "{script}"
    );
    assert!(
        line_of(&script, "delete chain ip ferry balance-svc-tcp-1")
            < line_of(&script, "delete set ip ferry balance-svc-tcp-1"),
        "its map goes after the chain that binds it"
    );
}

#[test]
fn a_duplicate_frontend_never_fails_the_transaction_and_takes_over_when_freed() {
    let nft = FakeNft::default();
    let mut h = Harness::new(&nft, vec![svc("a", "10.96.0.1", &["10.244.1.1"])]);
    let script = h.change(svc("b", "10.96.0.1", &["10.244.1.2", "10.244.1.3"]));
    assert!(
        !script.contains("element ip ferry service-"),
        "b waits for a's frontend:\n{script}"
    );
    assert!(
        script.contains("10.96.0.1 . tcp . 80 . 1 : 10.244.1.3 . 8080"),
        "b's endpoints wait in the map of its own endpoint count, unreferenced"
    );
    let script = h.remove("a");
    let delete = line_of(
        &script,
        "delete element ip ferry service-ips { 10.96.0.1 . tcp . 80 }",
    );
    let add = line_of(
        &script,
        "add element ip ferry service-ips { 10.96.0.1 . tcp . 80 : goto balance-svc-tcp-2 }",
    );
    assert!(delete < add, "{script}");
}

#[test]
fn a_failed_transaction_makes_the_next_sync_full() {
    let nft = FakeNft::default();
    let mut h = Harness::new(&nft, vec![svc("a", "10.96.0.1", &["10.244.1.1"])]);
    nft.fail_next.store(true, Ordering::SeqCst);
    let plan = svc("a", "10.96.0.1", &["10.244.1.2"]);
    let diff = PlanDiff {
        upserted: vec![Upsert {
            old: None,
            new: Arc::new(plan.clone()),
        }],
        ..PlanDiff::default()
    };
    h.plans = vec![plan];
    let err = h.sync(&diff, false).expect_err("refused");
    assert!(
        matches!(err, SyncError::Nftables { partial: true, .. }),
        "{err}"
    );
    h.sync(&PlanDiff::default(), false).expect("retry");
    assert!(
        h.last().starts_with("add table ip ferry\ndelete table"),
        "{}",
        h.last()
    );
}

#[test]
fn a_changed_node_address_rewrites_the_table() {
    let nft = FakeNft::default();
    let mut h = Harness::new(&nft, vec![svc("a", "10.96.0.1", &["10.244.1.1"])]);
    let mut moved = node();
    moved.nodeport_ips = vec!["192.168.0.9".parse().unwrap()];
    let plans = h.plans.clone();
    h.plane
        .sync_plans(|| plans.iter(), &PlanDiff::default(), &moved, false)
        .expect("sync");
    assert!(
        h.last().contains("elements = { 192.168.0.9 }"),
        "{}",
        h.last()
    );
}

#[test]
fn a_starting_agent_keeps_the_dns_steering_it_found_until_it_decides() {
    let nft = FakeNft::default();
    *nft.listed_set.lock().unwrap() = r#"{"nftables": [{"set": {"name": "node-local-dns",
        "elem": [{"concat": ["10.96.0.10", "udp", 53]}]}}]}"#
        .to_owned();
    let mut h = Harness::new(&nft, vec![]);
    assert!(
        h.last().contains("elements = { 10.96.0.10 . udp . 53 }"),
        "{}",
        h.last()
    );
    let dns = NodeLocalDns {
        frontend: "10.96.0.10:53".parse().unwrap(),
        protocol: Protocol::Tcp,
        listener: "10.96.0.10:53".parse().unwrap(),
    };
    h.plane.steer_node_local_dns(&[dns]).expect("steer");
    assert_eq!(
        h.last(),
        "flush set ip ferry node-local-dns\nadd element ip ferry node-local-dns { 10.96.0.10 . tcp . 53 }\n"
    );
    h.sync(&PlanDiff::default(), true).expect("full sync");
    assert!(
        h.last().contains("elements = { 10.96.0.10 . tcp . 53 }"),
        "{}",
        h.last()
    );
}

#[test]
fn affinity_sets_are_created_with_the_chain_and_deleted_after_it() {
    let nft = FakeNft::default();
    let mut sticky = svc("a", "10.96.0.1", &["10.244.1.1"]);
    sticky.affinity_timeout_seconds = Some(60);
    let mut h = Harness::new(&nft, vec![svc("a", "10.96.0.1", &["10.244.1.1"])]);
    let script = h.change(sticky);
    let set = line_of(&script, "add set ip ferry affinity-");
    let rule = line_of(&script, "update @affinity-");
    assert!(set < rule, "{script}");
    let script = h.change(svc("a", "10.96.0.1", &["10.244.1.1"]));
    assert!(line_of(&script, "add rule") < line_of(&script, "delete set ip ferry affinity-"));
}
