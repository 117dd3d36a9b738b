//! Which service port each programmed frontend belongs to: the maps hold only
//! addresses and ids, so the per-service counters on `/metrics`, `ferry monitor` and
//! `ferry inspect services` get the names from here (the agent's `/frontends`).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_common::FrontendKey;
use serde::{Deserialize, Serialize};

use super::layout::{frontend_address, protocol_name};
use crate::model::ServicePortName;

/// One frontend's owner, as `/frontends` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendName {
    /// The frontend's id in the maps (key of its counters).
    pub id: u32,
    /// `ip:port/PROTOCOL`.
    pub frontend: String,
    /// `namespace/name`.
    pub service: String,
    /// The port's name (empty for a single unnamed port).
    pub port: String,
}

impl FrontendName {
    /// `namespace/name:port` (or `namespace/name` for an unnamed port), as kube-proxy
    /// writes a service port.
    pub fn service_port(&self) -> String {
        match self.port.as_str() {
            "" => self.service.clone(),
            port => format!("{}:{port}", self.service),
        }
    }
}

/// The names of the frontends the eBPF data plane programmed; shared with the
/// metrics server, written only by the data plane.
#[derive(Clone, Debug, Default)]
pub struct FrontendNames(Arc<RwLock<HashMap<FrontendKey, FrontendName>>>);

impl FrontendNames {
    /// `key`, programmed as frontend `id`, belongs to `owner`.
    pub fn set(&self, key: &FrontendKey, id: u32, owner: &ServicePortName) {
        let name = FrontendName {
            id,
            frontend: format!("{}/{}", frontend_address(key), protocol_name(key.proto)),
            service: owner.service.to_string(),
            port: owner.port.clone(),
        };
        if let Ok(mut names) = self.0.write() {
            names.insert(*key, name);
        }
    }

    /// `key` is no longer programmed.
    pub fn remove(&self, key: &FrontendKey) {
        if let Ok(mut names) = self.0.write() {
            names.remove(key);
        }
    }

    /// Keeps only the frontends `keep` says are programmed (after a full sync).
    pub fn retain(&self, keep: impl Fn(&FrontendKey) -> bool) {
        if let Ok(mut names) = self.0.write() {
            names.retain(|k, _| keep(k));
        }
    }

    /// Every name, by frontend id.
    pub fn by_id(&self) -> HashMap<u32, FrontendName> {
        let Ok(names) = self.0.read() else {
            return HashMap::new();
        };
        names.values().map(|n| (n.id, n.clone())).collect()
    }

    /// Every name, sorted by frontend.
    pub fn list(&self) -> Vec<FrontendName> {
        let mut out: Vec<FrontendName> = self.by_id().into_values().collect();
        out.sort_by(|a, b| a.frontend.cmp(&b.frontend));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ebpf::layout::frontend_key;
    use crate::model::{Protocol, ServiceName};

    #[test]
    fn names_follow_what_is_programmed() {
        let names = FrontendNames::default();
        let owner = ServicePortName {
            service: ServiceName::new("default", "web"),
            port: "http".into(),
            protocol: Protocol::Tcp,
        };
        let a = frontend_key("10.96.0.10".parse().unwrap(), 80, 6);
        let b = frontend_key("fd00::10".parse().unwrap(), 53, 17);
        names.set(&a, 7, &owner);
        names.set(&b, 9, &owner);
        assert_eq!(names.by_id()[&7].frontend, "10.96.0.10:80/TCP");
        assert_eq!(names.by_id()[&9].frontend, "[fd00::10]:53/UDP");
        assert_eq!(names.by_id()[&7].service, "default/web");
        names.retain(|k| *k == b);
        assert_eq!(names.list().len(), 1);
        names.remove(&b);
        assert!(names.list().is_empty());
    }
}
