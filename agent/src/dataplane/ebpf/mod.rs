//! The eBPF backend (default): socket-level load balancing in cgroup hooks for
//! everything that originates on the node or in its pods, so connecting to a
//! ClusterIP costs the same as connecting to a pod. Traffic entering the node from
//! outside (NodePort, externalIPs, load-balancer IPs) goes through kube-proxy-style
//! iptables rules limited to those frontends, so eBPF mode never does less than
//! iptables mode.

mod counters;
pub mod inspect;
mod kernel;
mod layout;
pub mod loader;
pub mod monitor;
pub mod names;
pub mod node_local_dns;
pub mod state;
mod udp_sockets;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use ferry_common::FrontendKey;
use tracing::{error, info};

use self::counters::FrontendCounterMap;
use self::kernel::KernelMaps;
use self::layout::{DesiredFrontend, frontends};
use self::loader::MapSizes;
use self::names::FrontendNames;
use self::node_local_dns::NodeLocalDnsMap;
use self::state::{MapError, MapOps, Programmed};
use self::udp_sockets::UdpSocketReaper;
use super::iptables::IptablesDataPlane;
use super::iptables::render::Scope;
use super::{DataPlane, NodeLocalDns, NodeNetwork, ProgrammedCount, SyncError, SyncStats};
use crate::metrics::Metrics;
use crate::model::{IpFamily, NodePlan, PlanDiff, ServicePortPlan};

/// Settings of the eBPF data plane.
#[derive(Clone, Debug)]
pub struct EbpfConfig {
    /// cgroup v2 the hooks attach to (everything below it is load balanced).
    pub cgroup: PathBuf,
    /// bpffs directory for maps and links.
    pub pin_dir: PathBuf,
    /// Max entries of the maps (the `--bpf-max-*` flags).
    pub sizes: MapSizes,
}

/// One frontend's entry in the maps, for `ferry explain`.
fn describe_frontend(
    key: &ferry_common::FrontendKey,
    entry: Option<(&ferry_common::Frontend, usize)>,
) -> String {
    let address = std::net::SocketAddr::new(
        layout::words_addr(key.addr, key.family),
        u16::from_be(key.port),
    );
    let what = match entry {
        None => "not in the maps (see the map-full errors in the log)".to_string(),
        Some((fe, _))
            if fe.flags & ferry_common::flags::ACTION_MASK
                == ferry_common::flags::ACTION_REJECT =>
        {
            "reject".into()
        }
        Some((fe, n))
            if fe.flags & ferry_common::flags::ACTION_MASK
                == ferry_common::flags::ACTION_FORWARD =>
        {
            format!("forward to {n} backend(s) (list #{})", fe.id)
        }
        Some(_) => "drop".into(),
    };
    format!("eBPF frontend {address} protocol {}: {what}", key.proto)
}

/// Socket-LB maps plus iptables for traffic entering the node.
pub struct EbpfDataPlane {
    maps: KernelMaps,
    node_local_dns: NodeLocalDnsMap,
    /// Mirror of the maps; `None` until adopted (first full sync).
    programmed: Option<Programmed>,
    /// Connected UDP sockets left on backends that stopped serving.
    udp_sockets: UdpSocketReaper,
    external: IptablesDataPlane,
    metrics: Arc<Metrics>,
    /// The service port of each programmed frontend, for the metrics server.
    names: FrontendNames,
    /// The maps' sizes (their fill levels are reported against them).
    sizes: MapSizes,
    /// Per-frontend connection counters, one entry per programmed frontend.
    counters: FrontendCounterMap,
}

impl EbpfDataPlane {
    /// Loads and attaches the programs (taking over from a previous agent's pinned
    /// state without flushing it).
    pub fn start(
        config: &EbpfConfig,
        families: &[IpFamily],
        metrics: Arc<Metrics>,
    ) -> Result<Self, SyncError> {
        loader::load_and_attach(&config.pin_dir, &config.cgroup, config.sizes)?;
        let maps = KernelMaps::open(&config.pin_dir)?;
        let names = FrontendNames::default();
        metrics.export_datapath_counters(config.pin_dir.clone(), names.clone());
        Ok(Self {
            maps,
            node_local_dns: NodeLocalDnsMap::open(&config.pin_dir)?,
            programmed: None,
            udp_sockets: UdpSocketReaper::open(&config.cgroup, &config.pin_dir)?,
            external: IptablesDataPlane::new(families, Scope::ExternalOnly),
            metrics,
            names,
            sizes: config.sizes,
            counters: FrontendCounterMap::open(&config.pin_dir)?,
        })
    }

    /// Applies one desired frontend and records whose it is.
    fn upsert(
        &mut self,
        prog: &mut Programmed,
        plan: &ServicePortPlan,
        desired: &DesiredFrontend,
    ) -> Result<(), MapError> {
        let result = self.upsert_frontend(prog, plan, desired);
        if let Some((fe, _)) = prog.frontend(&desired.key) {
            self.names.set(&desired.key, fe.id, &plan.key.port);
            self.counters.ensure(fe.id);
        }
        result
    }

    /// Removes one frontend from the maps and the names.
    fn remove(&mut self, prog: &mut Programmed, key: &FrontendKey) -> Result<(), MapError> {
        let id = prog.frontend(key).map(|(fe, _)| fe.id);
        prog.remove(&mut self.maps, key)?;
        self.names.remove(key);
        if let Some(id) = id {
            self.counters.forget(id);
        }
        Ok(())
    }

    /// Applies one desired frontend; a full map is logged and counted, not fatal.
    fn upsert_frontend(
        &mut self,
        prog: &mut Programmed,
        plan: &ServicePortPlan,
        desired: &DesiredFrontend,
    ) -> Result<(), MapError> {
        match prog.upsert(&mut self.maps, desired) {
            Err(MapError::Full { map }) => {
                self.metrics
                    .map_full
                    .get_or_create(&vec![("map".to_owned(), map.to_owned())])
                    .inc();
                let new = !prog.keys().any(|k| *k == desired.key);
                if new && map != ferry_common::maps::FRONTENDS.name {
                    // No room for its backends: refuse its connections rather than
                    // let them through untranslated.
                    error!(service = %plan.key.port, map, "eBPF map full: this frontend refuses connections until there is room");
                    return match prog.upsert(&mut self.maps, &refusing(desired)) {
                        Err(MapError::Full { .. }) => Ok(()),
                        other => other,
                    };
                }
                error!(service = %plan.key.port, map, "eBPF map full: this frontend is not programmed");
                Ok(())
            }
            other => other,
        }
    }

    /// Re-reads the maps (adopting what they hold) and reconciles every frontend.
    fn full_sync(&mut self, plan: &NodePlan) -> Result<(), MapError> {
        let mut prog = Programmed::adopt(&mut self.maps as &mut dyn MapOps)?;
        let mut wanted: HashMap<_, (&ServicePortPlan, DesiredFrontend)> = HashMap::new();
        for p in plan.iter() {
            for d in frontends(p) {
                wanted.insert(d.key, (p.as_ref(), d));
            }
        }
        let stale: Vec<_> = prog
            .keys()
            .filter(|k| !wanted.contains_key(k))
            .copied()
            .collect();
        for key in stale {
            self.remove(&mut prog, &key)?;
        }
        self.names.retain(|k| wanted.contains_key(k));
        let live: HashSet<u32> = prog
            .keys()
            .filter_map(|k| prog.frontend(k).map(|(fe, _)| fe.id))
            .collect();
        self.counters.retain(&live);
        for (p, d) in wanted.values() {
            self.upsert(&mut prog, p, d)?;
        }
        let (fe, be) = prog.counts();
        info!(frontends = fe, backends = be, "eBPF maps reconciled");
        self.programmed = Some(prog);
        Ok(())
    }

    /// Applies only what `diff` changed to the mirror and the maps.
    fn partial_sync(&mut self, prog: &mut Programmed, diff: &PlanDiff) -> Result<(), MapError> {
        for old in &diff.removed {
            for d in frontends(old) {
                self.remove(prog, &d.key)?;
            }
        }
        for upsert in &diff.upserted {
            let fresh = frontends(&upsert.new);
            if let Some(old) = &upsert.old {
                let keep: HashSet<_> = fresh.iter().map(|d| d.key).collect();
                for d in frontends(old).iter().filter(|d| !keep.contains(&d.key)) {
                    self.remove(prog, &d.key)?;
                }
            }
            for d in &fresh {
                self.upsert(prog, &upsert.new, d)?;
            }
        }
        Ok(())
    }
}

/// `desired` refusing connections: the same frontend, with no backends.
fn refusing(desired: &DesiredFrontend) -> DesiredFrontend {
    use ferry_common::flags;
    DesiredFrontend {
        key: desired.key,
        flags: flags::ACTION_REJECT | (desired.flags & flags::CLUSTER_IP),
        affinity_timeout: 0,
        backends: Vec::new(),
    }
}

impl DataPlane for EbpfDataPlane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn sync(
        &mut self,
        plan: &NodePlan,
        diff: &PlanDiff,
        node: &NodeNetwork,
        full: bool,
    ) -> Result<SyncStats, SyncError> {
        let writes_before = self.maps.writes;
        let result = match self.programmed.take() {
            Some(mut prog) if !full => {
                let r = self.partial_sync(&mut prog, diff);
                self.programmed = Some(prog);
                r
            }
            _ => self.full_sync(plan),
        };
        if let Err(e) = result {
            // The mirror may be off now; the retry re-reads the maps.
            self.programmed = None;
            return Err(e.into());
        }
        let map_writes = self.maps.writes - writes_before;
        self.metrics.ebpf_map_writes.inc_by(map_writes as u64);
        let terminated = self.udp_sockets.reconcile(plan, diff, full);
        self.metrics.udp_sockets_terminated.inc_by(terminated);
        let mut stats = self.external.sync(plan, diff, node, full)?;
        stats.writes += map_writes;
        if let Some((frontends, backends)) = self.programmed.as_ref().map(Programmed::counts) {
            stats.programmed.push(ProgrammedCount::EbpfEntries {
                frontends,
                backends,
                max_frontends: self.sizes.frontends,
                max_backends: self.sizes.backends,
            });
        }
        Ok(stats)
    }

    fn describe(&self, plan: &ServicePortPlan) -> Vec<String> {
        let Some(prog) = &self.programmed else {
            return vec!["eBPF maps: not adopted yet (no successful sync)".into()];
        };
        let mut out: Vec<String> = frontends(plan)
            .iter()
            .map(|d| describe_frontend(&d.key, prog.frontend(&d.key)))
            .collect();
        out.extend(self.external.describe(plan));
        out
    }

    fn needs_full_sync(&mut self) -> bool {
        self.external.needs_full_sync()
    }

    fn steer_node_local_dns(&mut self, frontends: &[NodeLocalDns]) -> Result<(), SyncError> {
        Ok(self.node_local_dns.set(frontends)?)
    }

    /// Only traffic entering the node goes through (iptables) NAT, once it is programmed.
    fn nats_through_conntrack(&self) -> bool {
        self.external.nats_through_conntrack()
    }
}
