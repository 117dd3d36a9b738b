//! Ferry's agent: watches Services and EndpointSlices and programs this node's service
//! load balancing (eBPF or iptables) and cluster DNS.
//!
//! Data flows one way: [`source`] -> [`model`] -> [`dataplane`]. The [`proxy`] loop
//! drives it and [`report`] tells operators about it (and [`status`] what `ferry status` shows); [`health`] and [`metrics`] serve
//! that; [`service_health`] answers load balancers' health checks; [`host`] probes the
//! node's addresses; [`cli`] parses flags, [`kube_proxy_config`] reads kube-proxy's configuration
//! file and [`config`] resolves both; [`node_settings`] applies kube-proxy's process and
//! conntrack settings.

pub mod cli;
pub mod client_slots;
pub mod config;
pub mod dataplane;
pub mod dns;
pub mod explain;
pub mod health;
pub mod host;
pub mod http_server;
pub mod kube_proxy;
pub mod kube_proxy_config;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod node_settings;
pub mod probe;
pub mod proxy;
pub mod report;
pub mod run;
pub mod service_health;
pub mod source;
pub mod status;
