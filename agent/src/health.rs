//! kube-proxy's operational endpoints: `/healthz` and `/livez` on the healthz address
//! (default :10256); `/metrics`, `/healthz` and `/proxyMode` on the metrics address
//! (default 127.0.0.1:10249). Binds that fail (a port still held by a departing
//! kube-proxy, say) are retried in the background unless `--bind-address-hard-fail`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::model::IpFamily;
use crate::source::queue::Asker;

/// The `Server` header of every answer, so an operator (or Ferry itself, before
/// taking a port over) can tell Ferry's endpoints from kube-proxy's.
pub const SERVER: &str = concat!("ferry/", env!("CARGO_PKG_VERSION"));

/// Sync freshness and node eligibility, shared between the proxy loop (writer) and
/// the HTTP servers.
pub struct Health {
    inner: Mutex<HealthInner>,
    /// How long a queued change may stay unsynced before the node reports unhealthy
    /// (kube-proxy: twice the sync period).
    timeout: Duration,
}

#[derive(Default)]
struct HealthInner {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<Instant>,
    /// The Node object says the node is going away.
    leaving: bool,
    /// When the node's DNS server last answered its liveness probe.
    dns_answered: Option<Instant>,
}

/// How long the DNS server, once it answered, may stay silent before the agent
/// reports itself not live (its container is then restarted).
pub const DNS_SILENCE_LIMIT: Duration = Duration::from_secs(30);

/// What `/healthz` and `/livez` answer from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthStatus {
    /// The first full sync is done and no change waits longer than the timeout.
    pub healthy: bool,
    /// No change waits longer than the timeout after the first sync (a long first
    /// sync is not a reason to restart the agent).
    pub live: bool,
    /// The node is not being deleted (kube-proxy's `nodeEligible`).
    pub eligible: bool,
    pub last_updated: Option<SystemTime>,
}

impl Health {
    /// Health that turns stale when a change waits longer than `timeout`.
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

    /// Whether load balancers may send this node traffic (its Node object is not
    /// being deleted).
    pub fn node_eligible(&self, eligible: bool) {
        if let Ok(mut h) = self.inner.lock() {
            h.leaving = !eligible;
        }
    }

    /// The node's DNS server answered its liveness probe (see `dns::liveness`).
    pub fn dns_answered(&self) {
        if let Ok(mut h) = self.inner.lock() {
            h.dns_answered = Some(Instant::now());
        }
    }

    /// The current status.
    pub fn status(&self) -> HealthStatus {
        let Ok(h) = self.inner.lock() else {
            return HealthStatus {
                healthy: false,
                live: false,
                eligible: false,
                last_updated: None,
            };
        };
        let stale = h.oldest_pending.is_some_and(|t| t.elapsed() > self.timeout);
        let synced = h.last_updated.is_some();
        // DNS that worked and stopped (a dead worker, a stuck runtime) makes the agent
        // not live; DNS does not decide readiness, which is the node's for load
        // balancers.
        let dns_dead = h
            .dns_answered
            .is_some_and(|t| t.elapsed() > DNS_SILENCE_LIMIT);
        HealthStatus {
            healthy: synced && !stale,
            live: (!synced || !stale) && !dns_dead,
            eligible: !h.leaving,
            last_updated: h.last_updated,
        }
    }
}

fn rfc3339(t: Option<SystemTime>) -> serde_json::Value {
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| serde_json::Value::from(t.to_string()))
        .unwrap_or(serde_json::Value::Null)
}

/// What the health endpoints need.
#[derive(Clone)]
struct HealthState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    families: Vec<IpFamily>,
}

/// kube-proxy's body: `lastUpdated` (now, when healthy, as upstream does for
/// compatibility), `currentTime`, `nodeEligible` (only on /healthz), `healthy` and
/// the per-family `status`.
fn health_body(
    status: &HealthStatus,
    healthy: bool,
    with_node: bool,
    families: &[IpFamily],
) -> String {
    let now = SystemTime::now();
    let last = if healthy {
        Some(now)
    } else {
        status.last_updated
    };
    let per_family: serde_json::Map<String, serde_json::Value> = families
        .iter()
        .map(|f| {
            let entry = serde_json::json!({
                "lastUpdated": rfc3339(status.last_updated),
                "healthy": status.healthy,
            });
            (f.to_string(), entry)
        })
        .collect();
    let mut body = serde_json::json!({
        "lastUpdated": rfc3339(last),
        "currentTime": rfc3339(Some(now)),
    });
    if with_node {
        body["nodeEligible"] = status.eligible.into();
    }
    body["healthy"] = status.healthy.into();
    body["status"] = per_family.into();
    body.to_string()
}

fn answer(state: &HealthState, livez: bool) -> Response {
    let status = state.health.status();
    let ok = if livez {
        status.live
    } else {
        status.healthy && status.eligible
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    state.metrics.health_answered(livez, code.as_u16());
    let body = health_body(&status, ok, !livez, &state.families);
    (
        code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn healthz(State(state): State<HealthState>) -> Response {
    answer(&state, false)
}

async fn livez(State(state): State<HealthState>) -> Response {
    answer(&state, true)
}

/// Serves `/healthz` (503 until the first sync, while a change waits too long, and
/// while the node is being deleted) and `/livez` (only the wait, and only after the
/// first sync).
pub async fn serve_health(
    addr: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    families: Vec<IpFamily>,
    hard_fail: bool,
) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(HealthState {
            health,
            metrics,
            families,
        });
    serve(addr, app, "healthz", hard_fail).await;
}

/// The DNS server, once it runs, for `/dns` (the metrics server starts first).
pub type DnsSlot = Arc<std::sync::OnceLock<Arc<crate::dns::Answerer>>>;

/// What the metrics server reads: the metrics (and status), the way to ask the
/// proxy loop (`/explain`) and the DNS server (`/dns`).
#[derive(Clone)]
pub struct MetricsState {
    pub metrics: Arc<Metrics>,
    pub asker: Asker,
    pub dns: DnsSlot,
}

/// Serves `/metrics`, `/healthz` ("ok": the metrics server is up), `/proxyMode`
/// (the data plane's name, as kube-proxy's e2e tests read it), `/status`,
/// `/explain`, `/dns` and `/frontends` (`ferry status`, `ferry explain`, `ferry
/// inspect dns`, the names `ferry monitor` and `ferry inspect services` show).
pub async fn serve_metrics(
    addr: SocketAddr,
    state: MetricsState,
    mode: &'static str,
    hard_fail: bool,
) {
    let text = |body: &'static str| {
        (
            [
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
    };
    let app = Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(move || async move { text("ok") }))
        .route("/proxyMode", get(move || async move { text(mode) }))
        .route("/status", get(status))
        .route("/explain", get(explain))
        .route("/dns", get(dns))
        .route("/frontends", get(frontends))
        .with_state(state);
    serve(addr, app, "metrics", hard_fail).await;
}

/// The service port of every eBPF frontend (`ferry monitor`, `ferry inspect
/// services`).
async fn frontends(State(state): State<MetricsState>) -> impl IntoResponse {
    axum::Json(state.metrics.frontend_names())
}

/// `ferry status`'s JSON.
async fn status(State(state): State<MetricsState>) -> impl IntoResponse {
    axum::Json(state.metrics.status.snapshot())
}

/// `/explain?service=NAMESPACE/NAME[&port=P]`.
#[derive(serde::Deserialize)]
struct ExplainQuery {
    service: String,
    port: Option<String>,
}

/// How long `/explain` waits for the proxy loop (busy while a sync runs).
const EXPLAIN_WAIT: Duration = Duration::from_secs(8);

/// `ferry explain`'s JSON, answered by the proxy loop between batches.
async fn explain(
    State(state): State<MetricsState>,
    axum::extract::Query(q): axum::extract::Query<ExplainQuery>,
) -> Response {
    let service = match crate::explain::parse_service(&q.service) {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let question = crate::explain::Question {
        service: service.clone(),
        port: q.port,
        reply,
    };
    if state.asker.ask(question).is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy loop has stopped",
        )
            .into_response();
    }
    let waited = tokio::task::spawn_blocking(move || answer.recv_timeout(EXPLAIN_WAIT)).await;
    match waited {
        Ok(Ok(Some(explanation))) => axum::Json(explanation).into_response(),
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            format!("no service {service} in this agent's model"),
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy loop did not answer in time (a long sync is running); try again",
        )
            .into_response(),
    }
}

/// `/dns?name=NAME[&type=TYPE]`.
#[derive(serde::Deserialize)]
struct DnsQuery {
    name: String,
    #[serde(rename = "type")]
    record_type: Option<String>,
}

/// `ferry inspect dns`'s JSON: the DNS server's answer and its source.
async fn dns(
    State(state): State<MetricsState>,
    axum::extract::Query(q): axum::extract::Query<DnsQuery>,
) -> Response {
    let Some(answerer) = state.dns.get() else {
        return (
            StatusCode::NOT_FOUND,
            "DNS is off on this agent (no --dns-listen)",
        )
            .into_response();
    };
    match answerer.inspect(&q.name, q.record_type.as_deref().unwrap_or("A")) {
        Ok(inspection) => axum::Json(inspection).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
    }
}

async fn metrics(State(state): State<MetricsState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Serves `/ready` as CoreDNS's `ready` plugin does (200 "OK" once `ready()` holds,
/// 503 before), for DNS readiness probes.
pub async fn serve_dns_ready(
    addr: SocketAddr,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    hard_fail: bool,
) {
    let app = Router::new().route(
        "/ready",
        get(move || {
            let ready = ready.clone();
            async move {
                if ready() {
                    (axum::http::StatusCode::OK, "OK")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }
        }),
    );
    serve(addr, app, "DNS readiness", hard_fail).await;
}

/// First and largest wait between bind attempts.
const BIND_RETRY: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

async fn serve(addr: SocketAddr, app: Router, what: &str, hard_fail: bool) {
    let app = app.layer(axum::middleware::map_response(
        |mut response: Response| async move {
            response
                .headers_mut()
                .insert(header::SERVER, HeaderValue::from_static(SERVER));
            response
        },
    ));
    let listener = match bind(addr, what, hard_fail).await {
        Some(l) => l,
        None => return,
    };
    info!(%addr, "serving {what}");
    crate::http_server::serve(listener, app).await;
}

/// Binds, retrying with a growing wait (one warning, then one every minute) until it
/// succeeds; with `hard_fail` the agent exits instead, as kube-proxy's
/// `--bind-address-hard-fail` does.
async fn bind(addr: SocketAddr, what: &str, hard_fail: bool) -> Option<tokio::net::TcpListener> {
    let mut wait = BIND_RETRY.0;
    let mut last_warning: Option<Instant> = None;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                if last_warning.is_some() {
                    info!(%addr, "bound {what} address after retrying");
                }
                return Some(l);
            }
            Err(e) if hard_fail => {
                tracing::error!(%addr, error = %e, "cannot serve {what}; exiting (--bind-address-hard-fail)");
                std::process::exit(1);
            }
            Err(e) => {
                if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    warn!(%addr, error = %e, "cannot serve {what} yet; retrying in the background");
                    last_warning = Some(Instant::now());
                }
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(BIND_RETRY.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_that_stopped_answering_makes_the_agent_not_live_but_keeps_it_ready() {
        let health = Health::new(Duration::from_secs(60));
        health.updated();
        assert!(health.status().live, "no DNS probe yet: nothing to judge");
        health.dns_answered();
        assert!(health.status().live);
        if let Ok(mut h) = health.inner.lock() {
            h.dns_answered = Instant::now().checked_sub(DNS_SILENCE_LIMIT * 2);
        }
        let status = health.status();
        assert!(!status.live, "silent for longer than the limit");
        assert!(status.healthy, "readiness is the data plane's");
    }

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
        let s = h.status();
        assert!(!s.healthy && s.live, "a first sync in progress is alive");
        h.queued();
        std::thread::sleep(Duration::from_millis(20));
        assert!(h.status().live, "even a long first sync");
        h.updated();
        assert!(h.status().healthy);
        h.queued();
        std::thread::sleep(Duration::from_millis(20));
        let s = h.status();
        assert!(!s.healthy && !s.live);
        h.updated();
        assert!(h.status().healthy);
    }

    #[test]
    fn body_has_kube_proxys_fields() {
        let h = Health::new(Duration::from_secs(60));
        h.updated();
        h.node_eligible(false);
        let status = h.status();
        let body: serde_json::Value = serde_json::from_str(&health_body(
            &status,
            false,
            true,
            &[IpFamily::V4, IpFamily::V6],
        ))
        .unwrap();
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(body["healthy"], true);
        assert_eq!(body["status"]["IPv6"]["healthy"], true);
        assert!(body["lastUpdated"].is_string() && body["currentTime"].is_string());
        let livez: serde_json::Value =
            serde_json::from_str(&health_body(&status, true, false, &[IpFamily::V4])).unwrap();
        assert!(livez.get("nodeEligible").is_none());
    }
}
