//! The bodies of the fuzz targets, shared by the fuzz crate (`fuzz/`, whose library
//! this is) and the regression test `agent/tests/fuzz_regressions.rs` (which includes
//! this file with `#[path]`), so a crash kept under `fuzz/regressions/<target>/`
//! runs through exactly the code the fuzzer ran.
//!
//! Each body takes the fuzzer's bytes and panics on a broken invariant.

pub mod dns;
pub mod manifests;
pub mod plan_diff;

use ferry::model::{Applied, ClusterState, InvalidObject, Kind, ObjectRef, ServiceName};
use ferry::source::Object;

/// A target's body: the fuzzer's bytes in, a panic on a broken invariant.
pub type Body = fn(&[u8]);

/// Every target: its name (the directory under `fuzz/corpus/` and
/// `fuzz/regressions/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("dns_udp", dns::udp),
    ("dns_tcp", dns::tcp),
    ("manifests", manifests::run),
    ("plan_diff", plan_diff::run),
];

/// The node the model is built for.
pub const NODE: &str = "node-a";

/// Folds an object into the model, as the proxy loop does.
pub fn apply(state: &mut ClusterState, object: &Object) -> Result<Applied, InvalidObject> {
    match object {
        Object::Service(svc) => state.apply_service(svc),
        Object::EndpointSlice(slice) => state.apply_slice(slice),
        Object::Node(node) => state.apply_node(node),
        Object::ServiceCidr(cidr) => state.apply_service_cidr(cidr),
    }
}

/// Removes an object from the model, as the proxy loop does on a delete.
pub fn delete(state: &mut ClusterState, r: &ObjectRef) -> Applied {
    match r.kind {
        Kind::Service => state.delete_service(&ServiceName::new(&r.namespace, &r.name)),
        Kind::EndpointSlice => state.delete_slice(&r.namespace, &r.name),
        Kind::Node => state.delete_node(&r.name),
        Kind::ServiceCidr => state.delete_service_cidr(&r.name),
    }
}
