//! kube-proxy's service health servers: one HTTP server per `healthCheckNodePort`
//! (see [`crate::model::health_check`]) on the node's NodePort addresses. Any path
//! answers 200 while the node has a ready local endpoint and the proxy is healthy, 503
//! otherwise, with kube-proxy's JSON body and headers, so cloud load balancers keep
//! working unchanged when Ferry replaces kube-proxy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::IntoResponse;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::health::Health;
use crate::model::{ServiceHealthCheck, ServiceName};

/// What one service's server answers from; the proxy loop updates the count.
struct Served {
    service: ServiceName,
    local_ready_endpoints: AtomicUsize,
    proxy: Arc<Health>,
}

/// A running server: its port and one accept task per listening address.
struct Server {
    node_port: u16,
    served: Arc<Served>,
    listeners: HashMap<IpAddr, JoinHandle<()>>,
}

impl Server {
    /// Starts listening on `ip` (a port taken by someone else is logged and skipped).
    fn listen(&mut self, runtime: &tokio::runtime::Handle, ip: IpAddr) {
        let addr = SocketAddr::new(ip, self.node_port);
        let _runtime = runtime.enter();
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .and_then(tokio::net::TcpListener::from_std);
        match listener {
            Ok(listener) => {
                let app = Router::new()
                    .fallback(answer)
                    .with_state(self.served.clone());
                let task = runtime.spawn(crate::http_server::serve(listener, app));
                self.listeners.insert(ip, task);
            }
            Err(e) => {
                warn!(service = %self.served.service, %addr, error = %e, "cannot listen for service health checks");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// The set of running health servers, kept equal to what the model asks for.
pub struct ServiceHealthServers {
    runtime: tokio::runtime::Handle,
    proxy: Arc<Health>,
    addresses: Vec<IpAddr>,
    servers: HashMap<ServiceName, Server>,
}

impl ServiceHealthServers {
    /// No servers yet; they are spawned on `runtime` as services ask for them.
    pub fn new(runtime: tokio::runtime::Handle, proxy: Arc<Health>) -> Self {
        Self {
            runtime,
            proxy,
            addresses: Vec::new(),
            servers: HashMap::new(),
        }
    }

    /// Listens on these addresses from now on (the NodePort addresses): servers stop
    /// listening on addresses that went away and start on new ones; listeners on
    /// addresses that stay are left alone.
    pub fn set_addresses(&mut self, mut addresses: Vec<IpAddr>) {
        addresses.sort();
        addresses.dedup();
        if addresses == self.addresses {
            return;
        }
        if addresses.is_empty() {
            warn!("no NodePort addresses on this node: service health checks are not served");
        }
        for server in self.servers.values_mut() {
            server.listeners.retain(|ip, task| {
                let keep = addresses.contains(ip);
                if !keep {
                    task.abort();
                }
                keep
            });
            for &ip in &addresses {
                if !server.listeners.contains_key(&ip) {
                    server.listen(&self.runtime, ip);
                }
            }
        }
        self.addresses = addresses;
    }

    /// Brings `name`'s server in line with its health check (None: stop it).
    pub fn update(&mut self, name: &ServiceName, check: Option<ServiceHealthCheck>) {
        let Some(check) = check else {
            if self.servers.remove(name).is_some() {
                info!(service = %name, "stopped service health server");
            }
            return;
        };
        if let Some(server) = self.servers.get(name)
            && server.node_port == check.node_port
        {
            server
                .served
                .local_ready_endpoints
                .store(check.local_ready_endpoints, Ordering::Relaxed);
            return;
        }
        self.servers.remove(name);
        let mut server = Server {
            node_port: check.node_port,
            served: Arc::new(Served {
                service: name.clone(),
                local_ready_endpoints: AtomicUsize::new(check.local_ready_endpoints),
                proxy: self.proxy.clone(),
            }),
            listeners: HashMap::new(),
        };
        for &ip in &self.addresses {
            server.listen(&self.runtime, ip);
        }
        info!(service = %name, port = check.node_port, listeners = server.listeners.len(), "serving service health checks");
        self.servers.insert(name.clone(), server);
    }

    /// Services with a running server.
    pub fn services(&self) -> Vec<ServiceName> {
        self.servers.keys().cloned().collect()
    }
}

async fn answer(State(served): State<Arc<Served>>) -> impl IntoResponse {
    let count = served.local_ready_endpoints.load(Ordering::Relaxed);
    let proxy_healthy = served.proxy.status().healthy;
    let body = serde_json::json!({
        "service": {
            "namespace": served.service.namespace,
            "name": served.service.name,
        },
        "localEndpoints": count,
        "serviceProxyHealthy": proxy_healthy,
    });
    let code = if count > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json".to_owned()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (
                HeaderName::from_static("x-load-balancing-endpoint-weight"),
                count.to_string(),
            ),
        ],
        body.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::to_bytes;

    use super::*;

    async fn probe(local: usize, proxy_synced: bool) -> (StatusCode, String) {
        let proxy = Arc::new(Health::new(Duration::from_secs(60)));
        if proxy_synced {
            proxy.updated();
        }
        let served = Arc::new(Served {
            service: ServiceName::new("ns", "web"),
            local_ready_endpoints: AtomicUsize::new(local),
            proxy,
        });
        let response = answer(State(served)).await.into_response();
        let code = response.status();
        let body = to_bytes(response.into_body(), 4096).await.expect("body");
        (code, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn healthy_only_with_local_endpoints_and_a_healthy_proxy() {
        let (code, body) = probe(2, true).await;
        assert_eq!(code, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
        assert_eq!(json["service"]["namespace"], "ns");
        assert_eq!(json["service"]["name"], "web");
        assert_eq!(json["localEndpoints"], 2);
        assert_eq!(json["serviceProxyHealthy"], true);

        assert_eq!(probe(0, true).await.0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, body) = probe(2, false).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("\"serviceProxyHealthy\":false"), "{body}");
    }
}
