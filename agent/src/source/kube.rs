//! The Kubernetes API source: list+watch of Services, EndpointSlices and this node's
//! Node object through kube-rs watchers (bookmarks, resume from the last resource
//! version, relist on 410 Gone, backoff on errors).
//!
//! A relist is buffered until it is complete and then turned into applies and
//! deletes against what was known before, so the data plane is never reprogrammed
//! from half a list; while the API server is unreachable nothing is sent, so the
//! programmed state stays exactly as it was.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tracing::{info, warn};

use super::queue::EventSender;
use super::{Object, SourceEvent};
use crate::model::{Kind, ObjectRef};
use crate::status::StatusBoard;

/// Where the cluster is and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct ClusterAccess {
    pub credentials: Credentials,
    /// `--master`: the API server's URL, overriding the kubeconfig's or the in-cluster
    /// one (the `kubernetes` Service ClusterIP, which nothing programs on a node that
    /// boots without kube-proxy).
    pub master: Option<axum::http::Uri>,
}

/// Where the client's credentials come from.
#[derive(Clone, Debug)]
pub enum Credentials {
    Kubeconfig(PathBuf),
    /// The pod's service account (in-cluster).
    InCluster,
    /// None: only with `--master`, for an API server that needs none (as kube-proxy's
    /// `--master` alone does).
    Anonymous,
}

/// Watchers retry a failed list or watch after a short, jittered, exponential delay
/// capped at [`RETRY_MAX`]: after an API server outage (or the 410 Gone that follows
/// it) changes flow again within about a second of the server being back, as with
/// client-go's relist, instead of after a backoff grown to 30 s during the outage.
/// The price is about three requests a second per node while the server is down.
const RETRY_MIN: Duration = Duration::from_millis(100);
/// See [`RETRY_MIN`].
const RETRY_MAX: Duration = Duration::from_millis(500);

/// While watches keep failing, one warning per kind at most this often (with the
/// number of failures in between), so an outage does not flood the log.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Builds a client for `access`; also returns the API server's URL, for log lines.
pub async fn client(access: &ClusterAccess) -> anyhow::Result<(Client, String)> {
    let mut config = match &access.credentials {
        Credentials::Kubeconfig(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(
                kubeconfig,
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        Credentials::InCluster => {
            kube::Config::incluster().context("reading the in-cluster service account")?
        }
        Credentials::Anonymous => match &access.master {
            Some(master) => kube::Config::new(master.clone()),
            None => anyhow::bail!("no credentials and no --master: nothing to connect to"),
        },
    };
    if let Some(master) = &access.master {
        config.cluster_url = master.clone();
    }
    config.headers.push((
        axum::http::header::USER_AGENT,
        axum::http::HeaderValue::from_static(concat!("ferry/", env!("CARGO_PKG_VERSION"))),
    ));
    // kube-client retries 429/503/504 inside each request, doubling from 5 ms over 15
    // attempts (minutes in total): after an outage the watchers would wait on that
    // instead of on their own short backoff. The watchers retry; requests do not.
    config.default_retry = false;
    let server = config.cluster_url.to_string();
    info!(%server, "using the Kubernetes API");
    let client = Client::try_from(config).context("creating the Kubernetes client")?;
    Ok((client, server))
}

/// The retry policy of every watcher (see [`RETRY_MIN`]).
fn retry_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN)
        .with_max_delay(RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// Rate-limited warnings for one kind's failing watch.
struct FailureLog {
    kind: Kind,
    server: Arc<str>,
    last: Option<Instant>,
    suppressed: u64,
    /// Where `ferry status` learns whether the API answers.
    status: StatusBoard,
}

impl FailureLog {
    fn failed(&mut self, error: &watcher::Error) {
        let kind = self.kind.as_str();
        self.status.update(|s| {
            s.source_connected = Some(false);
            s.source_error = Some(format!("{kind}: {}", crate::report::error_chain(error)));
        });
        if self
            .last
            .is_some_and(|t| t.elapsed() < FAILURE_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            kind = self.kind.as_str(),
            server = %self.server,
            error = %crate::report::error_chain(error),
            failures_since_last_warning = self.suppressed,
            "list/watch failed; retrying, programmed state unchanged"
        );
        self.last = Some(Instant::now());
        self.suppressed = 0;
    }

    fn succeeded(&mut self, resource_version: Option<String>) {
        self.status.update(|s| {
            s.source_connected = Some(true);
            s.source_error = None;
            if resource_version.is_some() {
                s.resource_version = resource_version;
            }
        });
        if self.last.take().is_some() {
            info!(kind = self.kind.as_str(), server = %self.server, "list/watch works again");
        }
        self.suppressed = 0;
    }
}

/// One watched kind's events, as the model sees them.
enum Change {
    Apply(Object),
    Delete(ObjectRef),
    Restart,
    Listed,
}

fn changes<K, F>(
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    server: Arc<str>,
    status: StatusBoard,
    wrap: F,
) -> impl Stream<Item = (Kind, Change)> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(K) -> Object + Send + Sync + 'static,
{
    let mut failures = FailureLog {
        kind,
        server,
        last: None,
        suppressed: 0,
        status,
    };
    watcher::watcher(api, config)
        .backoff(retry_backoff())
        .filter_map(move |event| {
            if let Ok(event) = &event {
                let version = match event {
                    Event::InitApply(obj) | Event::Apply(obj) | Event::Delete(obj) => {
                        obj.meta().resource_version.clone()
                    }
                    _ => None,
                };
                failures.succeeded(version);
            }
            let change = match event {
                Ok(Event::Init) => Some(Change::Restart),
                Ok(Event::InitApply(obj) | Event::Apply(obj)) => Some(Change::Apply(wrap(obj))),
                Ok(Event::InitDone) => Some(Change::Listed),
                Ok(Event::Delete(obj)) => Some(Change::Delete(wrap(obj).object_ref())),
                Err(e) => {
                    failures.failed(&e);
                    None
                }
            };
            std::future::ready(change.map(|c| (kind, c)))
        })
}

/// What the source knows per kind, to turn a relist into deletes.
#[derive(Default)]
struct KindState {
    known: HashSet<ObjectRef>,
    /// Objects of a relist in progress; `Some` between Init and InitDone.
    relist: Option<Vec<Object>>,
    listed_once: bool,
}

/// Watches the cluster until the agent stops; sends [`SourceEvent`]s to `tx`.
pub async fn run(
    client: Client,
    server: String,
    node_name: String,
    tx: EventSender,
    status: StatusBoard,
) {
    let server: Arc<str> = server.into();
    let services = changes(
        Kind::Service,
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        server.clone(),
        status.clone(),
        |s| Object::Service(Box::new(s)),
    );
    let slices = changes(
        Kind::EndpointSlice,
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        server.clone(),
        status.clone(),
        |s| Object::EndpointSlice(Box::new(s)),
    );
    let nodes = changes(
        Kind::Node,
        Api::<Node>::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={node_name}")),
        server.clone(),
        status.clone(),
        |n| Object::Node(Box::new(n)),
    );
    // Not waited for: clusters before 1.33 do not serve it (the watcher retries).
    let service_cidrs = changes(
        Kind::ServiceCidr,
        Api::<ServiceCIDR>::all(client),
        watcher::Config::default(),
        server,
        status,
        |c| Object::ServiceCidr(Box::new(c)),
    );
    let mut all = futures_util::stream::select_all([
        services.boxed(),
        slices.boxed(),
        nodes.boxed(),
        service_cidrs.boxed(),
    ]);
    let mut states: HashMap<Kind, KindState> = HashMap::new();
    let mut synced = false;
    while let Some((kind, change)) = all.next().await {
        let state = states.entry(kind).or_default();
        let mut out: Vec<SourceEvent> = Vec::new();
        match change {
            Change::Restart => state.relist = Some(Vec::new()),
            Change::Apply(object) => match state.relist.as_mut() {
                Some(buffer) => buffer.push(object),
                None => {
                    state.known.insert(object.object_ref());
                    out.push(SourceEvent::Apply {
                        object,
                        origin: "api".into(),
                    });
                }
            },
            Change::Delete(r) => {
                state.known.remove(&r);
                out.push(SourceEvent::Delete(r));
            }
            Change::Listed => {
                let listed = state.relist.take().unwrap_or_default();
                let now: HashSet<ObjectRef> = listed.iter().map(Object::object_ref).collect();
                for gone in state.known.difference(&now) {
                    out.push(SourceEvent::Delete(gone.clone()));
                }
                info!(
                    kind = kind.as_str(),
                    objects = listed.len(),
                    deleted = state.known.difference(&now).count(),
                    "listed"
                );
                out.extend(listed.into_iter().map(|object| SourceEvent::Apply {
                    object,
                    origin: "api".into(),
                }));
                state.known = now;
                state.listed_once = true;
            }
        }
        if !synced
            && [Kind::Service, Kind::EndpointSlice, Kind::Node]
                .iter()
                .all(|k| states.get(k).is_some_and(|s| s.listed_once))
        {
            synced = true;
            out.push(SourceEvent::Synced);
        }
        for event in out {
            if tx.send(event).is_err() {
                return;
            }
        }
    }
}
