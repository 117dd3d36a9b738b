//! The agent's HTTP servers (healthz, metrics and status, service health check node
//! ports) with bounds no client can push past: at most [`MAX_CONNECTIONS`] served at
//! once (more wait in the listen backlog), [`MAX_PER_CLIENT`] of them from one
//! address (more are closed at once), request headers within
//! [`HEADER_TIMEOUT`], and no connection older than [`CONNECTION_LIFETIME`]. A slow
//! or idle client (slowloris) is dropped instead of holding the server, so load
//! balancers' and the kubelet's probes keep getting answers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::client_slots::ClientSlots;

/// Connections served at once per server.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one client address may hold, so one pod cannot take every slot.
pub const MAX_PER_CLIENT: usize = 16;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives, keep-alive included.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves `app` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, app: Router) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let clients = ClientSlots::new(MAX_PER_CLIENT);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, slot) = match listener.accept().await {
            Ok((stream, peer)) => match clients.take(peer.ip()) {
                Some(slot) => (stream, slot),
                None => {
                    debug!(%peer, "too many connections from this client; closing this one");
                    continue;
                }
            },
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _held = (permit, slot);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}
