//! Which service port owns each frontend when several claim it. The API server keeps
//! ClusterIPs and NodePorts unique, but not externalIPs or load-balancer IPs (and a
//! manifest directory keeps nothing unique): two services may name the same
//! `address:port/protocol`. Every data plane must then send it to one of them, the
//! same one on every node and whatever order the objects arrived in. The winner is
//! the first claimant by namespace, name and port name, which is also the rule
//! kube-proxy's iptables layout ends up applying (its `KUBE-SERVICES` rules are
//! sorted, and the first match wins). The loser is programmed without that frontend
//! (without the whole port when it loses its ClusterIP), and reported.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use super::plan::{PlanKey, ServicePortPlan};
use super::types::{IpFamily, Protocol, ServiceName, ServicePortName};

/// Something traffic is addressed to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Frontend {
    /// A ClusterIP, externalIP or load-balancer IP with a port.
    Address(IpAddr, u16, Protocol),
    /// A NodePort on the node's addresses of one family.
    NodePort(u16, Protocol, IpFamily),
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(ip, port, protocol) => {
                write!(f, "{}/{protocol}", std::net::SocketAddr::new(*ip, *port))
            }
            Self::NodePort(port, protocol, family) => {
                write!(f, "NodePort {port}/{protocol} ({family})")
            }
        }
    }
}

/// A frontend one service port asked for and another one got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConflict {
    pub loser: ServicePortName,
    pub frontend: Frontend,
    pub winner: ServicePortName,
}

/// The frontends of a plan as its service asks for them.
fn frontends_of(plan: &ServicePortPlan) -> Vec<Frontend> {
    let protocol = plan.key.port.protocol;
    let ips = std::iter::once(&plan.cluster_ip)
        .chain(&plan.external_ips)
        .chain(&plan.load_balancer_ips);
    let mut out: Vec<Frontend> = ips
        .map(|ip| Frontend::Address(*ip, plan.port, protocol))
        .collect();
    if let Some(node_port) = plan.node_port {
        out.push(Frontend::NodePort(node_port, protocol, plan.key.family));
    }
    out
}

/// Every claim, kept up to date as services change.
#[derive(Debug, Default)]
pub struct FrontendClaims {
    claims: HashMap<Frontend, BTreeSet<PlanKey>>,
    by_service: HashMap<ServiceName, Vec<(PlanKey, Vec<Frontend>)>>,
}

impl FrontendClaims {
    /// Replaces the claims of `service` by those of its fresh `plans`. Returns the
    /// other services that claim (or claimed) one of the same frontends: whether
    /// they keep them may have changed.
    pub fn replace_service(
        &mut self,
        service: &ServiceName,
        plans: &[ServicePortPlan],
    ) -> Vec<ServiceName> {
        let mut others = Vec::new();
        for (key, frontends) in self.by_service.remove(service).unwrap_or_default() {
            for frontend in frontends {
                if let Some(claimants) = self.claims.get_mut(&frontend) {
                    claimants.remove(&key);
                    others.extend(claimants.iter().map(|k| k.port.service.clone()));
                    if claimants.is_empty() {
                        self.claims.remove(&frontend);
                    }
                }
            }
        }
        let mut now = Vec::with_capacity(plans.len());
        for plan in plans {
            let frontends = frontends_of(plan);
            for frontend in &frontends {
                let claimants = self.claims.entry(frontend.clone()).or_default();
                others.extend(claimants.iter().map(|k| k.port.service.clone()));
                claimants.insert(plan.key.clone());
            }
            now.push((plan.key.clone(), frontends));
        }
        if !now.is_empty() {
            self.by_service.insert(service.clone(), now);
        }
        others.retain(|s| s != service);
        others.sort();
        others.dedup();
        others
    }

    /// `plan` without the frontends another port wins (`None` when that includes
    /// its ClusterIP), with each loss added to `lost`.
    pub fn resolve(
        &self,
        mut plan: ServicePortPlan,
        lost: &mut Vec<FrontendConflict>,
    ) -> Option<ServicePortPlan> {
        let protocol = plan.key.port.protocol;
        let mut keeps = |frontend: Frontend| match self.winner(&frontend) {
            Some(winner) if *winner != plan.key => {
                lost.push(FrontendConflict {
                    loser: plan.key.port.clone(),
                    frontend,
                    winner: winner.port.clone(),
                });
                false
            }
            _ => true,
        };
        if !keeps(Frontend::Address(plan.cluster_ip, plan.port, protocol)) {
            return None;
        }
        let port = plan.port;
        plan.external_ips
            .retain(|ip| keeps(Frontend::Address(*ip, port, protocol)));
        plan.load_balancer_ips
            .retain(|ip| keeps(Frontend::Address(*ip, port, protocol)));
        if let Some(node_port) = plan.node_port
            && !keeps(Frontend::NodePort(node_port, protocol, plan.key.family))
        {
            plan.node_port = None;
        }
        Some(plan)
    }

    /// The frontends the port `key` asked for and another port got (`ferry explain`).
    pub fn losses(&self, key: &PlanKey) -> Vec<FrontendConflict> {
        let asked = self
            .by_service
            .get(&key.port.service)
            .into_iter()
            .flatten()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, frontends)| frontends);
        asked
            .filter_map(|frontend| match self.winner(frontend) {
                Some(winner) if winner != key => Some(FrontendConflict {
                    loser: key.port.clone(),
                    frontend: frontend.clone(),
                    winner: winner.port.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    fn winner(&self, frontend: &Frontend) -> Option<&PlanKey> {
        self.claims.get(frontend).and_then(|c| c.first())
    }
}
