//! Which services this node must answer load-balancer health checks for, and with how
//! many local endpoints (kube-proxy's service health server semantics).
//!
//! A `LoadBalancer` service with `externalTrafficPolicy: Local` gets a
//! `healthCheckNodePort`; cloud load balancers probe it on every node and send traffic
//! only to nodes that answer 200, i.e. that have a ready endpoint of the service
//! locally. Without it, external traffic to nodes with no local endpoint is dropped.

use super::endpoints;
use super::service::ServiceType;
use super::store::ClusterState;
use super::types::ServiceName;

/// One service's health check on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceHealthCheck {
    /// The `healthCheckNodePort` to listen on.
    pub node_port: u16,
    /// Distinct ready endpoint addresses on this node (terminating ones do not count,
    /// so load balancers drain a node whose pods are going away).
    pub local_ready_endpoints: usize,
}

/// The health check `name` needs on this node, or None when it needs none (not a
/// proxied `LoadBalancer` service with `Local` external policy and a health port).
pub fn service_health_check(
    state: &ClusterState,
    name: &ServiceName,
) -> Option<ServiceHealthCheck> {
    let svc = state.service(name)?;
    if !svc.is_proxied()
        || svc.service_type != ServiceType::LoadBalancer
        || !svc.external_policy_local
    {
        return None;
    }
    Some(ServiceHealthCheck {
        node_port: svc.health_check_node_port?,
        local_ready_endpoints: endpoints::local_ready_addresses(state, name),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::store::test_state;

    const LB_LOCAL: &str = r#"
kind: Service
metadata: {name: web, namespace: ns}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.10
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  ports: [{name: http, port: 80, nodePort: 30080}, {name: https, port: 443, nodePort: 30443}]
"#;

    const SLICES: &str = r#"
kind: EndpointSlice
metadata: {name: web-a, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: https, port: 8443}]
endpoints:
- {addresses: [10.0.0.1], nodeName: node-a}
- {addresses: [10.0.0.2], nodeName: node-a, conditions: {ready: false}}
- {addresses: [10.0.0.3], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.0.0.4], nodeName: node-b}
"#;

    fn check(objects: &[&str]) -> Option<ServiceHealthCheck> {
        service_health_check(&test_state(objects), &ServiceName::new("ns", "web"))
    }

    #[test]
    fn counts_distinct_local_ready_addresses_across_slices_and_ports() {
        let duplicate = r#"
kind: EndpointSlice
metadata: {name: web-b, namespace: ns, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.0.0.1], nodeName: node-a}, {addresses: [10.0.0.5], nodeName: node-a}]
"#;
        assert_eq!(
            check(&[LB_LOCAL, SLICES, duplicate]),
            Some(ServiceHealthCheck {
                node_port: 32000,
                local_ready_endpoints: 2
            })
        );
    }

    #[test]
    fn no_local_ready_endpoint_counts_zero() {
        let remote_only = SLICES.replace("nodeName: node-a", "nodeName: node-c");
        assert_eq!(
            check(&[LB_LOCAL, &remote_only]).map(|c| c.local_ready_endpoints),
            Some(0)
        );
        assert_eq!(check(&[LB_LOCAL]).map(|c| c.local_ready_endpoints), Some(0));
    }

    #[test]
    fn only_load_balancers_with_local_policy_and_a_port_get_one() {
        let cluster_policy = LB_LOCAL.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        );
        assert_eq!(check(&[&cluster_policy, SLICES]), None);
        let node_port = LB_LOCAL.replace("type: LoadBalancer", "type: NodePort");
        assert_eq!(check(&[&node_port, SLICES]), None);
        let no_port = LB_LOCAL.replace("  healthCheckNodePort: 32000\n", "");
        assert_eq!(check(&[&no_port, SLICES]), None);
        let foreign = LB_LOCAL.replace(
            "metadata: {name: web, namespace: ns}",
            "metadata: {name: web, namespace: ns, labels: {service.kubernetes.io/service-proxy-name: other}}",
        );
        assert_eq!(check(&[&foreign, SLICES]), None);
        assert_eq!(check(&[SLICES]), None);
    }
}
