//! Ferry's agent: watches Services and EndpointSlices and programs this node's service
//! load balancing (eBPF or iptables) and cluster DNS.
//!
//! Data flows one way: [`source`] -> [`model`] -> [`dataplane`]. The [`proxy`] loop
//! drives it and [`report`] tells operators about it; [`health`] and [`metrics`] serve
//! that; [`service_health`] answers load balancers' health checks; [`host`] probes the
//! node's addresses; [`cli`] parses flags and [`config`] resolves them.

pub mod cli;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod health;
pub mod host;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod report;
pub mod run;
pub mod service_health;
pub mod source;
