//! The pure core: Kubernetes objects in, what this node must program out.
//!
//! Sources feed objects into [`ClusterState`]; [`NodePlan::update`] turns the services
//! that changed into a [`PlanDiff`]; data planes and DNS consume plans and never look
//! at Kubernetes objects themselves. Every endpoint selection lives in [`endpoints`].
//! Nothing here does I/O.

pub mod domain;
pub mod endpoints;
pub mod explain;
pub mod frontends;
pub mod health_check;
pub mod node;
pub mod plan;
pub mod service;
pub mod slice;
pub mod store;
pub mod types;
pub mod validate;

pub use domain::ClusterDomain;
pub use frontends::{Frontend, FrontendConflict};
pub use health_check::{ServiceHealthCheck, service_health_check};
pub use node::{
    HostAddresses, LocalAddress, LocalDetection, LocalTraffic, NodeInfo, NodeNetwork,
    NodePortAddresses,
};
pub use plan::{
    EndpointSet, NodePlan, PlanDiff, PlanKey, ServicePortPlan, SkipReason, SkippedPort, Traffic,
    Upsert,
};
pub use service::{ServiceInfo, ServiceType};
pub use slice::{EndpointInfo, SliceInfo, last_change_trigger_time};
pub use store::{Applied, ClusterState, Escaped, InvalidObject, Kind, ObjectRef};
pub use types::{Endpoint, IpFamily, Protocol, ServiceName, ServicePortName};
pub use validate::ValidationError;
