//! Ferry's agent: watches Services and EndpointSlices and programs this node's service
//! load balancing (eBPF or iptables) and cluster DNS.
//!
//! Data flows one way: [`source`] -> [`model`] -> [`backend`]. The [`proxy`] loop
//! drives it; [`health`] and [`metrics`] report on it; [`service_health`] answers
//! load balancers' health checks.

pub mod cli;
pub mod dataplane;
pub mod dns;
pub mod health;
pub mod metrics;
pub mod model;
pub mod node;
pub mod proxy;
pub mod run;
pub mod service_health;
pub mod source;
