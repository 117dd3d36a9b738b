//! Steering the kube-dns ClusterIP to this node's DNS server: the model marks the
//! frontends ([`ServicePortPlan::node_local_dns`]); this keeps the data plane's set
//! of them, and the server's listeners on them where the data plane needs those
//! (iptables mode listens on the ClusterIP itself). Tracked from every plan diff, so
//! the work per sync is proportional to the change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tracing::{info, warn};

use crate::dataplane::{DataPlane, NodeLocalDns};
use crate::dns::addresses;
use crate::dns::listeners::DnsServer;
use crate::model::{PlanDiff, PlanKey, Protocol, ServicePortPlan};
use crate::report::error_chain;

/// The frontends answered locally and what holds them.
pub struct NodeLocalDnsSteering {
    server: Arc<DnsServer>,
    /// `--dns-listen`, where a socket hook can send the frontends.
    listen: Vec<SocketAddr>,
    wanted: BTreeMap<PlanKey, (SocketAddr, Protocol)>,
    /// What the data plane holds; `None` when it must be written again.
    programmed: Option<Vec<NodeLocalDns>>,
    /// Listeners opened on ClusterIPs (iptables mode), closed when no longer wanted.
    on_service_ips: BTreeSet<SocketAddr>,
}

impl NodeLocalDnsSteering {
    /// Steering for `server`, which listens on `listen`.
    pub fn new(server: Arc<DnsServer>, listen: Vec<SocketAddr>) -> Self {
        Self {
            server,
            listen,
            wanted: BTreeMap::new(),
            programmed: None,
            on_service_ips: BTreeSet::new(),
        }
    }

    /// Follows a plan diff.
    pub fn track(&mut self, diff: &PlanDiff) {
        for old in &diff.removed {
            self.wanted.remove(&old.key);
        }
        for upsert in &diff.upserted {
            let plan: &ServicePortPlan = &upsert.new;
            if plan.node_local_dns {
                let frontend = SocketAddr::new(plan.cluster_ip, plan.port);
                self.wanted
                    .insert(plan.key.clone(), (frontend, plan.key.port.protocol));
            } else {
                self.wanted.remove(&plan.key);
            }
        }
    }

    /// Writes everything again at the next [`Self::apply`] (after a full sync).
    pub fn invalidate(&mut self) {
        self.programmed = None;
    }

    /// Brings the data plane (and the listeners it needs) in line, if anything changed.
    pub fn apply(&mut self, data_plane: &mut dyn DataPlane) {
        let on_service_ip = data_plane.dns_listens_on_service_ip();
        let wanted: Vec<NodeLocalDns> = self
            .wanted
            .values()
            .filter_map(|&(frontend, protocol)| {
                let listener = if on_service_ip {
                    frontend
                } else {
                    self.redirect_target(frontend.ip())?
                };
                Some(NodeLocalDns {
                    frontend,
                    protocol,
                    listener,
                })
            })
            .collect();
        // Until this agent holds the DNS sockets (or once it gave them away), the steering
        // stays as the agent holding them made it.
        if self.programmed.as_ref() == Some(&wanted) || self.server.is_settled_elsewhere() {
            return;
        }
        let serving: Vec<NodeLocalDns> = if on_service_ip {
            self.listen_on_service_ips(&wanted)
        } else {
            wanted.clone()
        };
        match data_plane.steer_node_local_dns(&serving) {
            Ok(()) => {
                info!(frontends = ?serving.iter().map(|f| f.frontend).collect::<BTreeSet<_>>(), "cluster DNS Service answered on this node");
                self.close_unused(&serving);
                self.programmed = (serving.len() == wanted.len()).then_some(wanted);
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "cannot steer the cluster DNS Service to this node; retrying at the next sync");
                self.programmed = None;
            }
        }
    }

    /// A `--dns-listen` address of `ip`'s family that pods can reach.
    fn redirect_target(&self, ip: IpAddr) -> Option<SocketAddr> {
        let target = self.listen.iter().copied().find(|l| {
            l.is_ipv4() == ip.is_ipv4() && !l.ip().is_unspecified() && !l.ip().is_loopback()
        });
        if target.is_none() {
            warn!(frontend = %ip, "no --dns-listen address of this family that pods can reach; the cluster DNS Service is not answered on this node");
        }
        target
    }

    /// Listens on each frontend's ClusterIP; returns those that are served.
    fn listen_on_service_ips(&mut self, wanted: &[NodeLocalDns]) -> Vec<NodeLocalDns> {
        let mut serving = Vec::with_capacity(wanted.len());
        for f in wanted {
            let opened =
                addresses::ensure(f.listener.ip()).and_then(|_| self.server.listen(f.listener));
            match opened {
                Ok(()) => {
                    self.on_service_ips.insert(f.listener);
                    serving.push(f.clone());
                }
                Err(e) => {
                    warn!(listen = %f.listener, error = %e, "cannot listen on the cluster DNS Service's address");
                }
            }
        }
        serving
    }

    /// Closes ClusterIP listeners no frontend uses any more.
    fn close_unused(&mut self, serving: &[NodeLocalDns]) {
        let unused: Vec<SocketAddr> = self
            .on_service_ips
            .iter()
            .filter(|addr| !serving.iter().any(|f| f.listener == **addr))
            .copied()
            .collect();
        for addr in unused {
            self.server.close(addr);
            self.on_service_ips.remove(&addr);
        }
    }
}
