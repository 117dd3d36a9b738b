//! Where objects come from. Every source (manifest directory, Kubernetes API) emits the
//! same [`SourceEvent`]s, so nothing downstream knows or cares which one is running.

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;

use crate::model::{HostAddresses, Kind, ObjectRef};

pub mod kube;
pub mod manifests;
pub mod queue;

/// An object the model consumes.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
    ServiceCidr(Box<ServiceCIDR>),
}

impl Object {
    /// The object's identity (namespace defaults to "default" for namespaced kinds).
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, meta) = match self {
            Self::Service(o) => (Kind::Service, &o.metadata),
            Self::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
            Self::Node(o) => (Kind::Node, &o.metadata),
            Self::ServiceCidr(o) => (Kind::ServiceCidr, &o.metadata),
        };
        let namespace = match kind {
            Kind::Node | Kind::ServiceCidr => String::new(),
            _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        ObjectRef {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// A change reported by a source.
#[derive(Clone, Debug)]
pub enum SourceEvent {
    /// An object was added or changed. `origin` says where it came from, for logs
    /// (e.g. `examples/web.yaml#2`).
    Apply { object: Object, origin: String },
    /// An object is gone.
    Delete(ObjectRef),
    /// The source has delivered a complete view; programming may start. Sent once,
    /// when every kind has been listed (or the directory read) for the first time.
    Synced,
    /// Input that could not become an object at all (unparseable document). Already
    /// logged by the source; counted by the agent.
    Rejected { kind: Option<Kind>, origin: String },
    /// The host's addresses changed (from [`crate::host::watch_addresses`], not a
    /// Kubernetes source): NodePort addresses may have to follow.
    HostAddresses(HostAddresses),
    /// Not a change: an operator's question (`ferry explain`), answered from the
    /// model between batches. Never coalesced with another.
    Question(crate::explain::Question),
}
