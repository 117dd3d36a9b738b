//! A manifest file into the model, as the manifest-directory source and the proxy
//! loop take it (agent/src/source/manifests.rs, model/): YAML or JSON documents
//! parsed and decoded into objects, the file's events applied to the model (which
//! validates every object), the plans and DNS records of what it holds.
//!
//! Invariants: reading the same file again changes no plan; deleting the file
//! deletes everything it defined, leaving no plan.

use std::path::Path;

use ferry::dns::records::service_records;
use ferry::model::{ClusterDomain, ClusterState, NodePlan};
use ferry::source::SourceEvent;
use ferry::source::manifests::{ManifestState, parse_manifests};

/// Where the fuzzed file is said to be.
const FILE: &str = "/manifests/fuzz.yaml";

/// One file's text (invalid UTF-8 replaced, as no file reader would pass it on but
/// the parser must not care) through the source and the model.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let path = Path::new(FILE);
    let mut source = ManifestState::default();
    let mut state = ClusterState::new(super::NODE);
    state.track_dns();
    let mut plan = NodePlan::default();
    let domain = ClusterDomain::default();

    let events = source.apply_documents(path, parse_manifests("fuzz.yaml", &text));
    apply(&mut state, &events);
    sync(&mut state, &mut plan, &domain);

    // The same file again: the model may see the objects again, the plans stay.
    let again = source.apply_documents(path, parse_manifests("fuzz.yaml", &text));
    apply(&mut state, &again);
    let diff = sync(&mut state, &mut plan, &domain);
    assert!(
        diff.is_empty(),
        "reading an unchanged file changed plans: {diff:?}"
    );

    // The file deleted: everything it defined goes.
    let gone = source.apply_documents(path, Vec::new());
    assert!(
        gone.iter().all(|e| matches!(e, SourceEvent::Delete(_))),
        "a deleted file only deletes: {gone:?}"
    );
    apply(&mut state, &gone);
    sync(&mut state, &mut plan, &domain);
    assert!(plan.is_empty(), "plans left after the file was deleted");
    assert_eq!(
        state.services().count(),
        0,
        "services left after the file was deleted"
    );
}

/// Folds a source's events into the model (invalid objects are refused there and
/// leave it as it was).
fn apply(state: &mut ClusterState, events: &[SourceEvent]) {
    for event in events {
        match event {
            SourceEvent::Apply { object, .. } => {
                assert_eq!(
                    object.object_ref().kind,
                    match object {
                        ferry::source::Object::Service(_) => ferry::model::Kind::Service,
                        ferry::source::Object::EndpointSlice(_) =>
                            ferry::model::Kind::EndpointSlice,
                        ferry::source::Object::Node(_) => ferry::model::Kind::Node,
                        ferry::source::Object::ServiceCidr(_) => ferry::model::Kind::ServiceCidr,
                    }
                );
                let _ = super::apply(state, object);
            }
            SourceEvent::Delete(r) => {
                super::delete(state, r);
            }
            _ => {}
        }
    }
}

/// What the proxy loop does after a batch: the plans of the services that changed,
/// and their DNS records.
fn sync(
    state: &mut ClusterState,
    plan: &mut NodePlan,
    domain: &ClusterDomain,
) -> ferry::model::PlanDiff {
    let changes = state.take_changes();
    let diff = plan.update(state, &changes.services);
    for name in state.take_dns_changes() {
        if let Some(svc) = state.service(&name) {
            let slices: Vec<_> = state.slices_of(&name).map(|s| s.as_ref()).collect();
            let _ = service_records(svc, &slices, domain);
        }
    }
    diff
}
