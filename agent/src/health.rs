//! kube-proxy's operational endpoints: `/healthz` and `/livez` on the healthz address
//! (default :10256) and `/metrics` on the metrics address (default :10249).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Sync freshness, shared between the proxy loop (writer) and the HTTP server.
pub struct Health {
    inner: Mutex<HealthInner>,
    /// How long a queued change may stay unsynced before the node reports unhealthy.
    timeout: Duration,
}

#[derive(Default)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<Instant>,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Mutex::new(HealthInner::default()),
            timeout,
        }
    }

    /// A change arrived that is not programmed yet.
    pub fn queued(&self) {
        if let Ok(mut h) = self.inner.lock() {
            h.oldest_pending.get_or_insert_with(Instant::now);
        }
    }

    /// Everything queued so far is programmed.
    pub fn updated(&self) {
        if let Ok(mut h) = self.inner.lock() {
            h.last_updated = Some(SystemTime::now());
            h.oldest_pending = None;
        }
    }

    /// Healthy once the first full sync is done and no change waits longer than the
    /// timeout; also returns the time of the last successful sync.
    pub fn status(&self) -> (bool, Option<SystemTime>) {
        let Ok(h) = self.inner.lock() else {
            return (false, None);
        };
        let stale = h.oldest_pending.is_some_and(|t| t.elapsed() > self.timeout);
        (h.last_updated.is_some() && !stale, h.last_updated)
    }
}

fn rfc3339(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| serde_json::Value::from(t.to_string()))
        .unwrap_or(serde_json::Value::Null)
}

async fn healthz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let (healthy, last) = health.status();
    let body = serde_json::json!({
        "lastUpdated": rfc3339(last),
        "currentTime": rfc3339(Some(SystemTime::now())),
        "nodeEligible": true,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

async fn metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

/// Serves `/healthz` and `/livez` (same semantics as kube-proxy: unhealthy until the
/// first sync and while changes wait too long).
pub async fn serve_health(addr: SocketAddr, health: Arc<Health>) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .with_state(health);
    serve(addr, app, "healthz").await;
}

/// Serves `/metrics`.
pub async fn serve_metrics(addr: SocketAddr, metrics: Arc<Metrics>) {
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .with_state(metrics);
    serve(addr, app, "metrics").await;
}

async fn serve(addr: SocketAddr, app: Router, what: &str) {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve {what}; continuing without it");
            return;
        }
    };
    info!(%addr, "serving {what}");
    if let Err(e) = axum::serve(listener, app).await {
        warn!(%addr, error = %e, "{what} server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(
            rfc3339(Some(SystemTime::UNIX_EPOCH)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(rfc3339(None), serde_json::Value::Null);
    }

    #[test]
    fn health_turns_on_after_first_sync_and_off_when_stale() {
        let h = Health::new(Duration::from_millis(10));
        assert!(!h.status().0);
        h.updated();
        assert!(h.status().0);
        h.queued();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!h.status().0);
        h.updated();
        assert!(h.status().0);
    }
}
