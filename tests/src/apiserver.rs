//! A fake Kubernetes API server for the source tests (no kube-apiserver binary can be
//! installed here). It implements what Ferry's watchers use, faithfully enough to
//! exercise their failure handling: list with `resourceVersion`, watch as a stream
//! of JSON lines resuming from a resource version, bookmarks, `410 Gone` (as the
//! ERROR watch event the real server sends) once history is compacted, dropped
//! connections, and an outage mode. Objects are the k8s-openapi types.
//!
//! It runs on its own thread, inside the network namespace the caller picks, on
//! plain HTTP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// Kinds served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ServiceCidr,
}

impl Kind {
    fn of(object: &Value) -> Option<Self> {
        match object["kind"].as_str()? {
            "Service" => Some(Self::Service),
            "EndpointSlice" => Some(Self::EndpointSlice),
            "Node" => Some(Self::Node),
            "ServiceCIDR" => Some(Self::ServiceCidr),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Service => "ServiceList",
            Self::EndpointSlice => "EndpointSliceList",
            Self::Node => "NodeList",
            Self::ServiceCidr => "ServiceCIDRList",
        }
    }

    fn group_resource(self) -> (&'static str, &'static str) {
        match self {
            Self::Service => ("", "services"),
            Self::EndpointSlice => ("discovery.k8s.io", "endpointslices"),
            Self::Node => ("", "nodes"),
            Self::ServiceCidr => ("networking.k8s.io", "servicecidrs"),
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::ServiceCidr => "networking.k8s.io/v1",
            _ => "v1",
        }
    }
}

type Key = (Kind, String, String);

/// A change as watchers see it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

struct Store {
    /// (API group, resource, verb) of every request served.
    requests: std::collections::BTreeSet<(String, String, String)>,
    /// `User-Agent` headers seen.
    user_agents: std::collections::BTreeSet<String>,
    rv: u64,
    /// Watches may not resume from before this resource version (410 Gone).
    compacted_to: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Change>,
    down: bool,
}

/// Handle the test uses to change the cluster and break things.
#[derive(Clone)]
pub struct FakeApi {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Change>,
    /// Bumped to cut every open watch connection.
    cut: Arc<watch::Sender<u64>>,
    addr: SocketAddr,
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Params {
    watch: Option<String>,
    resource_version: Option<String>,
    field_selector: Option<String>,
    allow_watch_bookmarks: Option<bool>,
    timeout_seconds: Option<u64>,
}

impl FakeApi {
    /// Serves on `addr` from a new thread (which inherits the caller's network
    /// namespace; use `Cluster::spawn_in_node` to put it in the node's).
    pub fn start(addr: SocketAddr) -> Self {
        let (events, _) = broadcast::channel(4096);
        let (cut, _) = watch::channel(0);
        let api = Self {
            store: Arc::new(Mutex::new(Store {
                requests: std::collections::BTreeSet::new(),
                user_agents: std::collections::BTreeSet::new(),
                rv: 1,
                compacted_to: 0,
                objects: BTreeMap::new(),
                history: Vec::new(),
                down: false,
            })),
            events,
            cut: Arc::new(cut),
            addr,
        };
        let served = api.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let app = Router::new()
                    .route(
                        "/api/v1/services",
                        get(|s, q, h| list_or_watch(s, q, h, Kind::Service)),
                    )
                    .route(
                        "/apis/discovery.k8s.io/v1/endpointslices",
                        get(|s, q, h| list_or_watch(s, q, h, Kind::EndpointSlice)),
                    )
                    .route(
                        "/api/v1/nodes",
                        get(|s, q, h| list_or_watch(s, q, h, Kind::Node)),
                    )
                    .route(
                        "/apis/networking.k8s.io/v1/servicecidrs",
                        get(|s, q, h| list_or_watch(s, q, h, Kind::ServiceCidr)),
                    )
                    .with_state(served.clone());
                let listener = tokio::net::TcpListener::bind(served.addr)
                    .await
                    .expect("bind fake API");
                let _ = ready_tx.send(());
                let _ = axum::serve(listener, app).await;
            });
        });
        ready_rx.recv().expect("fake API started");
        api
    }

    /// A kubeconfig pointing at this server.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
            self.addr
        )
    }

    /// Creates or replaces an object given as YAML (kind, apiVersion, metadata).
    pub fn apply(&self, yaml: &str) {
        let mut object: Value = yaml_to_json(yaml);
        let kind = Kind::of(&object).expect("known kind");
        let mut store = self.store.lock().expect("store");
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let cluster_scoped = matches!(kind, Kind::Node | Kind::ServiceCidr);
        if object["metadata"]["namespace"].is_null() && !cluster_scoped {
            object["metadata"]["namespace"] = json!("default");
        }
        let key = key_of(kind, &object);
        let event = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key, object.clone());
        self.record(
            &mut store,
            Change {
                rv,
                kind,
                kind_of_event: event,
                object,
            },
        );
    }

    /// Deletes an object.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut store = self.store.lock().expect("store");
        let Some(mut object) = store
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        store.rv += 1;
        let rv = store.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut store,
            Change {
                rv,
                kind,
                kind_of_event: "DELETED",
                object,
            },
        );
    }

    fn record(&self, store: &mut Store, change: Change) {
        store.history.push(change.clone());
        let _ = self.events.send(change);
    }

    /// Forgets all history: watches resuming from before now get 410 Gone.
    pub fn compact(&self) {
        let mut store = self.store.lock().expect("store");
        store.compacted_to = store.rv;
        store.history.clear();
    }

    /// Cuts every open watch connection.
    pub fn drop_watches(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// (API group, resource, verb) of every request the server answered so far: what
    /// a client needs RBAC for.
    pub fn requests(&self) -> std::collections::BTreeSet<(String, String, String)> {
        self.store
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }

    /// Every `User-Agent` clients sent so far.
    pub fn user_agents(&self) -> std::collections::BTreeSet<String> {
        self.store
            .lock()
            .map(|s| s.user_agents.clone())
            .unwrap_or_default()
    }

    /// Takes the server down (every request fails) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.store.lock().expect("store").down = down;
        if down {
            self.drop_watches();
        }
    }
}

fn yaml_to_json(yaml: &str) -> Value {
    serde_saphyr::from_str(yaml).expect("test YAML")
}

fn key_of(kind: Kind, object: &Value) -> Key {
    (
        kind,
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn selected(object: &Value, field_selector: Option<&str>) -> bool {
    match field_selector.and_then(|f| f.strip_prefix("metadata.name=")) {
        Some(name) => object["metadata"]["name"] == name,
        None => true,
    }
}

async fn list_or_watch(
    State(api): State<FakeApi>,
    Query(params): Query<Params>,
    headers: axum::http::HeaderMap,
    kind: Kind,
) -> Response {
    if let (Ok(mut store), Some(agent)) = (api.store.lock(), headers.get("user-agent")) {
        store
            .user_agents
            .insert(String::from_utf8_lossy(agent.as_bytes()).into_owned());
    }
    if api.store.lock().map(|s| s.down).unwrap_or(true) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let watching = matches!(params.watch.as_deref(), Some("true" | "1"));
    if let Ok(mut store) = api.store.lock() {
        let (group, resource) = kind.group_resource();
        let verb = if watching { "watch" } else { "list" };
        store
            .requests
            .insert((group.into(), resource.into(), verb.into()));
    }
    if watching {
        return watch_stream(api, params, kind);
    }
    let Ok(store) = api.store.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((k, _, _), o)| *k == kind && selected(o, params.field_selector.as_deref()))
        .map(|(_, o)| o.clone())
        .collect();
    let body = json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": store.rv.to_string()},
        "items": items,
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}

fn line(event: &str, object: &Value) -> Result<String, std::convert::Infallible> {
    Ok(format!("{}\n", json!({"type": event, "object": object})))
}

fn watch_stream(api: FakeApi, params: Params, kind: Kind) -> Response {
    let from: u64 = params
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let selector = params.field_selector.clone();
    let bookmarks = params.allow_watch_bookmarks.unwrap_or(false);
    let timeout = Duration::from_secs(params.timeout_seconds.unwrap_or(300));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::convert::Infallible>>(256);
    // Subscribe and read history under the lock, so nothing falls in between.
    let (backlog, mut live, gone, current) = {
        let Ok(store) = api.store.lock() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        let gone = from < store.compacted_to;
        let backlog: Vec<Change> = store
            .history
            .iter()
            .filter(|c| c.kind == kind && c.rv > from)
            .cloned()
            .collect();
        (backlog, api.events.subscribe(), gone, store.rv)
    };
    let mut cut = api.cut.subscribe();
    tokio::spawn(async move {
        if gone {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410,
            });
            let _ = tx.send(line("ERROR", &status)).await;
            return;
        }
        for c in backlog
            .into_iter()
            .filter(|c| selected(&c.object, selector.as_deref()))
        {
            if tx.send(line(c.kind_of_event, &c.object)).await.is_err() {
                return;
            }
        }
        let mut last_rv = current;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tokio::select! {
                // A cut wins over anything else that is ready: after drop_watches()
                // returns, no change reaches a client through an old connection.
                biased;
                _ = cut.changed() => return,
                change = live.recv() => match change {
                    Ok(c) if c.kind == kind && c.rv > from => {
                        last_rv = c.rv;
                        if selected(&c.object, selector.as_deref())
                            && tx.send(line(c.kind_of_event, &c.object)).await.is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let mark = json!({
                        "kind": match kind { Kind::Service => "Service", Kind::EndpointSlice => "EndpointSlice", Kind::Node => "Node", Kind::ServiceCidr => "ServiceCIDR" },
                        "apiVersion": kind.api_version(),
                        "metadata": {"resourceVersion": last_rv.to_string()},
                    });
                    if tx.send(line("BOOKMARK", &mark)).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
