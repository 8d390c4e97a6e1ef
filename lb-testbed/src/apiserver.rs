//! A stand-in for kube-apiserver, for the `--kube` source's tests and the control-plane
//! benchmark (no kube-apiserver can be installed on these machines). It speaks the
//! parts of the Kubernetes API the agent uses, the way the real server does:
//!
//! - Services (core/v1), EndpointSlices (discovery.k8s.io/v1), Nodes, Ingresses and
//!   IngressClasses (networking.k8s.io/v1) and Secrets: `get`, and `list` with
//!   `limit`/`continue` pages served from one snapshot (so a paged list is consistent,
//!   as etcd makes it), cluster-wide or per namespace.
//! - `fieldSelector=type=...` / `type!=...` terms on Secrets (lists and watches), as the L7 hop asks for
//!   TLS Secrets only.
//! - `patch` of an Ingress's status subresource with a JSON merge patch
//!   (`application/merge-patch+json`): only `status` changes, the resourceVersion moves
//!   on and watches see `MODIFIED`.
//! - `watch` from a resourceVersion: JSON lines `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK`;
//!   a resourceVersion older than the retained history gets an `ERROR` event with a
//!   410 Gone Status (the client must relist); `timeoutSeconds` ends the watch cleanly.
//! - `create` of events.k8s.io/v1 Events, which are recorded for tests to read.
//! - One global resourceVersion counter across kinds, as etcd's revision; an `apply`
//!   that changes nothing is a no-op (no new version, no event), as on a real server.
//! - Bearer-token authentication with the token in the kubeconfig it writes.
//!
//! Test controls: [`ApiServer::apply`], [`ApiServer::delete`],
//! [`ApiServer::expire_history`], [`ApiServer::drop_watches`],
//! [`ApiServer::send_bookmark`], [`ApiServer::set_available`], [`ApiServer::forbid`],
//! and the request log
//! [`ApiServer::requests`], in which each request carries the RBAC verb and resource
//! the real server's authorizer would check.
//!
//! Label selectors, other field selectors, `resourceVersionMatch=Exact` and streaming
//! lists are refused with 400, so nothing silently relies on them.
//!
//! The listener is created on a thread inside the test's network namespace (never the
//! root namespace); its own runtime then serves from any thread. Clients must connect
//! from inside that namespace too (see [`ApiServer::client`]).

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use tokio::sync::{mpsc, oneshot, watch};

use super::netns::Netns;
use lb_core::cluster::{Kind, Object};

/// Most changes kept per kind for watches to resume from; older ones are compacted
/// away (a watch from before them gets 410 Gone), as etcd compacts its history.
const MAX_HISTORY: usize = 200_000;

/// Most paged-list snapshots kept for `continue` tokens; older tokens get 410 Expired.
const MAX_SNAPSHOTS: usize = 64;

/// A watch without `timeoutSeconds` ends after this (the real server picks 30-60 min).
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);

/// Largest chunk of watch lines written at once.
const WATCH_CHUNK: usize = 256 * 1024;

/// Largest request body accepted (an Event is a few hundred bytes).
const MAX_REQUEST_BODY: usize = 1024 * 1024;

/// How long dropping the server waits for its connections to close.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// The bearer token the written kubeconfig carries and the server requires.
const TOKEN: &str = "xlb-test-token";

/// One request as the server saw it, with the authorizer's view of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string ("" when there is none).
    pub query: String,
    /// API group ("" = core), as an RBAC rule names it; empty for unknown paths.
    pub group: String,
    /// Resource (plural), e.g. "services"; empty for unknown paths.
    pub resource: String,
    /// RBAC verb: get, list, watch, create, update, patch, delete; empty for unknown.
    pub verb: String,
}

impl RequestRecord {
    fn new(
        method: &Method,
        path: &str,
        query: String,
        target: Option<&Target>,
        watch: bool,
    ) -> Self {
        let (group, resource) = match target {
            Some(Target::Collection { resource, .. } | Target::Object { resource, .. }) => {
                (resource.group, resource.plural.to_owned())
            }
            Some(Target::Status { resource, .. }) => {
                (resource.group, format!("{}/status", resource.plural))
            }
            Some(Target::Events { .. }) => ("events.k8s.io", "events".to_owned()),
            None => ("", String::new()),
        };
        RequestRecord {
            method: method.to_string(),
            path: path.to_owned(),
            query,
            group: group.to_owned(),
            resource,
            verb: if target.is_some() {
                verb(method, target, watch)
            } else {
                ""
            }
            .to_owned(),
        }
    }

    /// The value of one query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// A running API server; dropping it stops it, closes every connection and removes
/// its kubeconfig file.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    kubeconfig: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiServer {
    /// Starts a server listening on 127.0.0.1 (an ephemeral port) inside `ns`, and
    /// writes a kubeconfig for it (plain `http://`, a bearer token) under the
    /// temporary directory.
    pub fn start(ns: &Netns) -> anyhow::Result<ApiServer> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let listener = ns
            .run_in(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?
            .with_context(|| format!("cannot bind the API server in netns {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;

        let kubeconfig = std::env::temp_dir().join(format!(
            "xlb-apiserver-{}-{}.kubeconfig",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr))
            .with_context(|| format!("cannot write {}", kubeconfig.display()))?;

        let shared = Arc::new(Shared::new());
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("xlb-apiserver")
            .enable_all()
            .build()
            .context("cannot build the API server's runtime")?;
        let serving = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("xlb-apiserver".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    accept_loop(listener, serving, stopped).await;
                    io::Result::Ok(())
                });
                if let Err(e) = result {
                    tracing::warn!(error = %e, "API server failed");
                }
                runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
            })
            .context("cannot start the API server thread")?;
        Ok(ApiServer {
            shared,
            addr,
            kubeconfig,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Where it listens (inside its namespace).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file pointing at the server (for `KUBECONFIG`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube client configured from [`ApiServer::kubeconfig`], as the agent builds
    /// one. It connects lazily, from whichever thread polls it: poll it only on
    /// threads inside the server's namespace (e.g. a runtime built in
    /// [`Netns::run_in`]).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates or replaces an object (namespace "default" when unset) and returns its
    /// resourceVersion. Content equal to the stored object changes nothing.
    pub fn apply(&self, object: Object) -> u64 {
        self.apply_all([object])
    }

    /// [`ApiServer::apply`] for many objects at once (one lock, one wake-up of the
    /// watches); returns the resourceVersion after the last one.
    pub fn apply_all(&self, objects: impl IntoIterator<Item = Object>) -> u64 {
        let rv = {
            let mut store = self.shared.store();
            for object in objects {
                store.apply(object);
            }
            store.rv
        };
        self.shared.signals.send_modify(|s| s.rv = rv);
        rv
    }

    /// Deletes an object (`namespace` is ignored for Nodes); false if it did not exist.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        let (deleted, rv) = {
            let mut store = self.shared.store();
            let deleted = store.delete(kind, namespace, name);
            (deleted, store.rv)
        };
        self.shared.signals.send_modify(|s| s.rv = rv);
        deleted
    }

    /// The current resourceVersion (etcd's revision).
    pub fn resource_version(&self) -> u64 {
        self.shared.store().rv
    }

    /// Compacts all history, as etcd does after a while: the revision moves on and
    /// every watch *started* from an earlier resourceVersion gets a 410 Gone `ERROR`
    /// event, and every `continue` token a 410 Expired, forcing a relist. Open
    /// watches continue (combine with [`ApiServer::drop_watches`] to force a
    /// reconnect).
    pub fn expire_history(&self) {
        let rv = {
            let mut store = self.shared.store();
            store.rv += 1;
            let rv = store.rv;
            for kind in &mut store.kinds {
                kind.history.clear();
                kind.compacted = rv;
            }
            store.snapshots.clear();
            rv
        };
        self.shared.signals.send_modify(|s| s.rv = rv);
    }

    /// Cuts every open watch connection abruptly (no final chunk, as when the server
    /// or a load balancer in front of it dies). Clients resume from their last
    /// resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.signals.send_modify(|s| s.drops += 1);
    }

    /// Sends a `BOOKMARK` with the current resourceVersion on every open watch that
    /// asked for bookmarks.
    pub fn send_bookmark(&self) {
        self.shared.signals.send_modify(|s| s.bookmarks += 1);
    }

    /// While unavailable, new connections are closed as soon as they are accepted and
    /// requests on open connections are cut without a response (as while the server
    /// restarts). Open watches are not affected; see [`ApiServer::drop_watches`].
    pub fn set_available(&self, available: bool) {
        self.shared.available.store(available, Ordering::Relaxed);
    }

    /// While forbidden, every request on `kind` gets 403 Forbidden, as when the
    /// agent's RBAC lacks it (the request is still logged).
    pub fn forbid(&self, kind: Kind, forbidden: bool) {
        self.shared.forbidden[kind_index(kind)].store(forbidden, Ordering::Relaxed);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.shared.requests).clone()
    }

    /// Watches being served right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Relaxed)
    }

    /// The Events created so far, as stored (with name, uid, resourceVersion).
    pub fn events(&self) -> Vec<KubeEvent> {
        self.shared.store().events.clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!("the API server thread panicked");
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: xlb-test\n  cluster:\n    server: http://{addr}\n\
         users:\n\
         - name: xlb-test\n  user:\n    token: {TOKEN}\n\
         contexts:\n\
         - name: xlb-test\n  context:\n    cluster: xlb-test\n    user: xlb-test\n    namespace: default\n\
         current-context: xlb-test\n"
    )
}

/// What the server's tasks and its handle share.
struct Shared {
    store: Mutex<Store>,
    /// Wakes watches: new changes, drops, bookmarks.
    signals: watch::Sender<Signals>,
    available: AtomicBool,
    /// Indexed like [`RESOURCES`].
    forbidden: [AtomicBool; 6],
    requests: Mutex<Vec<RequestRecord>>,
    open_watches: AtomicUsize,
}

/// Counters the watches compare against what they saw when they started.
#[derive(Debug, Clone, Copy, Default)]
struct Signals {
    rv: u64,
    drops: u64,
    bookmarks: u64,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            store: Mutex::new(Store::default()),
            signals: watch::Sender::new(Signals::default()),
            available: AtomicBool::new(true),
            forbidden: Default::default(),
            requests: Mutex::default(),
            open_watches: AtomicUsize::new(0),
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.store)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How a kind appears in the API.
struct ResourceInfo {
    kind: Kind,
    group: &'static str,
    api_version: &'static str,
    plural: &'static str,
    list_kind: &'static str,
    namespaced: bool,
}

const RESOURCES: [ResourceInfo; 6] = [
    ResourceInfo {
        kind: Kind::Service,
        group: "",
        api_version: "v1",
        plural: "services",
        list_kind: "ServiceList",
        namespaced: true,
    },
    ResourceInfo {
        kind: Kind::EndpointSlice,
        group: "discovery.k8s.io",
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        list_kind: "EndpointSliceList",
        namespaced: true,
    },
    ResourceInfo {
        kind: Kind::Node,
        group: "",
        api_version: "v1",
        plural: "nodes",
        list_kind: "NodeList",
        namespaced: false,
    },
    ResourceInfo {
        kind: Kind::Ingress,
        group: "networking.k8s.io",
        api_version: "networking.k8s.io/v1",
        plural: "ingresses",
        list_kind: "IngressList",
        namespaced: true,
    },
    ResourceInfo {
        kind: Kind::IngressClass,
        group: "networking.k8s.io",
        api_version: "networking.k8s.io/v1",
        plural: "ingressclasses",
        list_kind: "IngressClassList",
        namespaced: false,
    },
    ResourceInfo {
        kind: Kind::Secret,
        group: "",
        api_version: "v1",
        plural: "secrets",
        list_kind: "SecretList",
        namespaced: true,
    },
];

fn info(kind: Kind) -> &'static ResourceInfo {
    &RESOURCES[kind_index(kind)]
}

/// The objects, their history and the open list snapshots.
#[derive(Default)]
struct Store {
    /// The last resourceVersion handed out.
    rv: u64,
    /// Indexed like [`RESOURCES`].
    kinds: [KindStore; 6],
    snapshots: BTreeMap<u64, Snapshot>,
    next_snapshot: u64,
    next_uid: u64,
    events: Vec<KubeEvent>,
}

#[derive(Default)]
struct KindStore {
    /// JSON of each object (with its resourceVersion) by (namespace, name); namespace
    /// is "" for Nodes.
    objects: BTreeMap<(String, String), Bytes>,
    /// Changes after `compacted`, oldest first.
    history: VecDeque<Change>,
    /// A watch from a resourceVersion below this would miss changes: 410 Gone.
    compacted: u64,
}

/// One change, pre-rendered as the watch line every watcher sends.
struct Change {
    rv: u64,
    namespace: String,
    line: Bytes,
}

/// The items of one paged list, fixed at its first page.
struct Snapshot {
    rv: u64,
    items: Arc<Vec<Bytes>>,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Service => 0,
        Kind::EndpointSlice => 1,
        Kind::Node => 2,
        Kind::Ingress => 3,
        Kind::IngressClass => 4,
        Kind::Secret => 5,
    }
}

impl Store {
    fn kind(&mut self, kind: Kind) -> &mut KindStore {
        &mut self.kinds[kind_index(kind)]
    }

    fn apply(&mut self, mut object: Object) {
        let kind = object.kind();
        let namespaced = info(kind).namespaced;
        let meta = meta_mut(&mut object);
        let namespace = if namespaced {
            meta.namespace
                .get_or_insert_with(|| "default".to_owned())
                .clone()
        } else {
            meta.namespace = None;
            String::new()
        };
        let key = (namespace.clone(), meta.name.clone().unwrap_or_default());
        let previous = self.kinds[kind_index(kind)].objects.get(&key).cloned();
        if meta.uid.is_none() {
            meta.uid = Some(if let Some(json) = &previous {
                uid_of(json).unwrap_or_default()
            } else {
                self.next_uid += 1;
                format!("00000000-0000-4000-8000-{:012x}", self.next_uid)
            });
        }
        if let Some(old) = &previous {
            // Unchanged content keeps its version and emits nothing.
            meta.resource_version = rv_of(old);
            if to_json(&object) == *old {
                return;
            }
        }
        self.rv += 1;
        let rv = self.rv;
        meta_mut(&mut object).resource_version = Some(rv.to_string());
        let json = to_json(&object);
        let kind_store = self.kind(kind);
        kind_store.objects.insert(key, json.clone());
        let event = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        kind_store.record(rv, namespace, watch_line(event, &json));
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> bool {
        let namespace = if info(kind).namespaced { namespace } else { "" };
        let key = (namespace.to_owned(), name.to_owned());
        let Some(old) = self.kind(kind).objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        let rv = self.rv;
        // The DELETED event carries the last state with the deletion's version.
        let mut value: serde_json::Value =
            serde_json::from_slice(&old).expect("stored objects are JSON");
        value["metadata"]["resourceVersion"] = rv.to_string().into();
        let json = Bytes::from(serde_json::to_vec(&value).expect("JSON serializes"));
        self.kind(kind)
            .record(rv, key.0, watch_line("DELETED", &json));
        true
    }
}

impl KindStore {
    fn record(&mut self, rv: u64, namespace: String, line: Bytes) {
        self.history.push_back(Change {
            rv,
            namespace,
            line,
        });
        while self.history.len() > MAX_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// The objects in one namespace, or in all (`None`).
    fn items(&self, namespace: Option<&str>) -> Vec<Bytes> {
        match namespace {
            None => self.objects.values().cloned().collect(),
            Some(ns) => self
                .objects
                .range((ns.to_owned(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v.clone())
                .collect(),
        }
    }
}

fn meta_mut(
    object: &mut Object,
) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    object.meta_mut()
}

fn to_json(object: &Object) -> Bytes {
    let json = match object {
        Object::Service(o) => serde_json::to_vec(o),
        Object::EndpointSlice(o) => serde_json::to_vec(o),
        Object::Node(o) => serde_json::to_vec(o),
        Object::Ingress(o) => serde_json::to_vec(o),
        Object::IngressClass(o) => serde_json::to_vec(o),
        Object::Secret(o) => serde_json::to_vec(o),
    };
    Bytes::from(json.expect("Kubernetes objects serialize"))
}

fn metadata_field(json: &[u8], field: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    value["metadata"][field].as_str().map(str::to_owned)
}

fn rv_of(json: &[u8]) -> Option<String> {
    metadata_field(json, "resourceVersion")
}

fn uid_of(json: &[u8]) -> Option<String> {
    metadata_field(json, "uid")
}

fn watch_line(event: &str, object: &[u8]) -> Bytes {
    let mut line = BytesMut::with_capacity(object.len() + 32);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(event.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
    line.freeze()
}

type Body = BoxBody<Bytes, io::Error>;

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "API server accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if !shared.available.load(Ordering::Relaxed) {
            drop(stream);
            continue;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { handle(&shared, req).await }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "API server connection ended");
            }
        });
    }
}

/// What a request asks for, once its path is understood.
enum Target {
    Collection {
        resource: &'static ResourceInfo,
        namespace: Option<String>,
    },
    Object {
        resource: &'static ResourceInfo,
        namespace: Option<String>,
        name: String,
    },
    /// An object's status subresource (Ingresses only).
    Status {
        resource: &'static ResourceInfo,
        namespace: String,
        name: String,
    },
    Events {
        namespace: String,
    },
}

impl Target {
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, rest) = match segments.as_slice() {
            ["api", "v1", rest @ ..] => ("", rest),
            ["apis", group, "v1", rest @ ..] => (*group, rest),
            _ => return None,
        };
        if group == "events.k8s.io" {
            return match rest {
                ["namespaces", ns, "events"] => Some(Target::Events {
                    namespace: (*ns).to_owned(),
                }),
                _ => None,
            };
        }
        let find = |plural: &str| {
            RESOURCES
                .iter()
                .find(|r| r.group == group && r.plural == plural)
        };
        match rest {
            [plural] => Some(Target::Collection {
                resource: find(plural)?,
                namespace: None,
            }),
            ["namespaces", ns, plural] => {
                let resource = find(plural).filter(|r| r.namespaced)?;
                Some(Target::Collection {
                    resource,
                    namespace: Some((*ns).to_owned()),
                })
            }
            ["namespaces", ns, plural, name] => {
                let resource = find(plural).filter(|r| r.namespaced)?;
                Some(Target::Object {
                    resource,
                    namespace: Some((*ns).to_owned()),
                    name: (*name).to_owned(),
                })
            }
            ["namespaces", ns, plural, name, "status"] => {
                let resource = find(plural).filter(|r| r.kind == Kind::Ingress)?;
                Some(Target::Status {
                    resource,
                    namespace: (*ns).to_owned(),
                    name: (*name).to_owned(),
                })
            }
            [plural, name] => {
                let resource = find(plural).filter(|r| !r.namespaced)?;
                Some(Target::Object {
                    resource,
                    namespace: None,
                    name: (*name).to_owned(),
                })
            }
            _ => None,
        }
    }
}

/// The RBAC verb a request needs, as kube-apiserver's request-info resolver names it.
fn verb(method: &Method, target: Option<&Target>, watch: bool) -> &'static str {
    let collection = matches!(
        target,
        Some(Target::Collection { .. } | Target::Events { .. })
    );
    match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if collection => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if collection => "deletecollection",
        Method::DELETE => "delete",
        _ => "",
    }
}

/// Query parameters, decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Query {
        Query(
            form_urlencoded::parse(raw.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, name: &str) -> bool {
        matches!(self.get(name), Some("true" | "1"))
    }
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> io::Result<Response<Body>> {
    if !shared.available.load(Ordering::Relaxed) {
        // Cut the connection without an answer, as a restarting server does.
        return Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "API server unavailable",
        ));
    }
    let path = req.uri().path().to_owned();
    let raw_query = req.uri().query().unwrap_or("").to_owned();
    let query = Query::parse(&raw_query);
    let target = Target::parse(&path);
    let watch = query.flag("watch");
    let record = RequestRecord::new(req.method(), &path, raw_query, target.as_ref(), watch);
    lock(&shared.requests).push(record);

    if let Some(refusal) = refuse(shared, &req, &query, target.as_ref()) {
        return Ok(refusal);
    }
    let selector = secret_type_selector(&query);
    let method = req.method().clone();
    match (target, method) {
        (None, _) => Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the server could not find the requested resource ({path})"),
        )),
        (
            Some(Target::Collection {
                resource,
                namespace,
            }),
            Method::GET,
        ) if watch => Ok(start_watch(shared, resource, namespace, selector, &query)),
        (
            Some(Target::Collection {
                resource,
                namespace,
            }),
            Method::GET,
        ) => Ok(list(
            shared,
            resource,
            namespace.as_deref(),
            selector.as_deref(),
            &query,
        )),
        (
            Some(Target::Object {
                resource,
                namespace,
                name,
            }),
            Method::GET,
        ) => Ok(get(shared, resource, namespace.as_deref(), &name)),
        (Some(Target::Events { namespace }), Method::POST) => {
            Ok(create_event(shared, &namespace, req).await)
        }
        (
            Some(Target::Status {
                namespace, name, ..
            }),
            Method::PATCH,
        ) => Ok(patch_ingress_status(shared, &namespace, &name, req).await),
        _ => Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the test API server does not allow this method on this resource",
        )),
    }
}

/// The answer to a request the server will not serve: unauthenticated, with options it
/// does not implement, or on a forbidden resource.
fn refuse(
    shared: &Shared,
    req: &Request<Incoming>,
    query: &Query,
    target: Option<&Target>,
) -> Option<Response<Body>> {
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    if !authorized {
        return Some(status(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Unauthorized",
        ));
    }
    for unsupported in ["labelSelector", "sendInitialEvents"] {
        if query.get(unsupported).is_some_and(|v| !v.is_empty()) {
            return Some(bad_request(&format!(
                "the test API server does not support {unsupported}"
            )));
        }
    }
    if let Some(fields) = query.get("fieldSelector").filter(|v| !v.is_empty()) {
        let on_secrets = matches!(
            target,
            Some(Target::Collection { resource, .. }) if resource.kind == Kind::Secret
        );
        if !on_secrets || secret_type_selector(query).is_none() {
            return Some(bad_request(&format!(
                "the test API server supports only fieldSelector=type(!)=... on secrets, not {fields:?}"
            )));
        }
    }
    if query.get("resourceVersionMatch") == Some("Exact") {
        return Some(bad_request(
            "the test API server does not support resourceVersionMatch=Exact",
        ));
    }

    if let Some(
        Target::Collection { resource, .. }
        | Target::Object { resource, .. }
        | Target::Status { resource, .. },
    ) = target
        && shared.forbidden[kind_index(resource.kind)].load(Ordering::Relaxed)
    {
        return Some(status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "{} is forbidden: the test forbids this resource",
                resource.plural
            ),
        ));
    }
    None
}

fn get(
    shared: &Shared,
    resource: &ResourceInfo,
    namespace: Option<&str>,
    name: &str,
) -> Response<Body> {
    let key = (namespace.unwrap_or("").to_owned(), name.to_owned());
    let found = shared.store().kinds[kind_index(resource.kind)]
        .objects
        .get(&key)
        .cloned();
    match found {
        Some(json) => json_response(StatusCode::OK, json),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{} \"{name}\" not found", resource.plural),
        ),
    }
}

fn list(
    shared: &Shared,
    resource: &ResourceInfo,
    namespace: Option<&str>,
    selector: Option<&str>,
    query: &Query,
) -> Response<Body> {
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_request("limit must be a non-negative integer"),
    };
    let (rv, items, offset, snapshot_id) = {
        let store = shared.store();
        if let Some(token) = query.get("continue").filter(|c| !c.is_empty()) {
            let parsed = token
                .split_once('-')
                .and_then(|(id, off)| Some((id.parse::<u64>().ok()?, off.parse().ok()?)));
            let Some((id, offset)) = parsed else {
                return bad_request("malformed continue token");
            };
            let Some(snapshot) = store.snapshots.get(&id) else {
                return status(
                    StatusCode::GONE,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent \
                     list result. You can start a new list without the continue parameter.",
                );
            };
            (snapshot.rv, Arc::clone(&snapshot.items), offset, Some(id))
        } else {
            if let Some(min) = query.get("resourceVersion").filter(|v| !v.is_empty()) {
                match min.parse::<u64>() {
                    Ok(min) if min <= store.rv => {}
                    Ok(_) => {
                        return status(
                            StatusCode::GATEWAY_TIMEOUT,
                            "Timeout",
                            "Too large resource version",
                        );
                    }
                    Err(_) => return bad_request("resourceVersion must be an integer"),
                }
            }
            let rv = store.rv;
            let mut items = store.kinds[kind_index(resource.kind)].items(namespace);
            items.retain(|json| selected(json, selector));
            let items = Arc::new(items);
            (rv, items, 0, None)
        }
    };
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let start = offset.min(end);
    let continue_token = if end < items.len() {
        let mut store = shared.store();
        let id = if let Some(id) = snapshot_id {
            id
        } else {
            store.next_snapshot += 1;
            let id = store.next_snapshot;
            store.snapshots.insert(
                id,
                Snapshot {
                    rv,
                    items: Arc::clone(&items),
                },
            );
            while store.snapshots.len() > MAX_SNAPSHOTS {
                store.snapshots.pop_first();
            }
            id
        };
        Some(format!("{id}-{end}"))
    } else {
        if let Some(id) = snapshot_id {
            shared.store().snapshots.remove(&id);
        }
        None
    };

    let page = &items[start..end];
    let mut body = BytesMut::with_capacity(page.iter().map(|i| i.len() + 1).sum::<usize>() + 256);
    let mut head = format!(
        "{{\"kind\":\"{}\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{rv}\"",
        resource.list_kind, resource.api_version
    );
    if let Some(token) = &continue_token {
        let remaining = items.len() - end;
        let _ = write!(
            head,
            ",\"continue\":\"{token}\",\"remainingItemCount\":{remaining}"
        );
    }
    head.push_str("},\"items\":[");
    body.extend_from_slice(head.as_bytes());
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.extend_from_slice(b",");
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    json_response(StatusCode::OK, body.freeze())
}

fn start_watch(
    shared: &Arc<Shared>,
    resource: &'static ResourceInfo,
    namespace: Option<String>,
    selector: Option<String>,
    query: &Query,
) -> Response<Body> {
    let from = match query.get("resourceVersion").filter(|v| !v.is_empty()) {
        None | Some("0") => None,
        Some(v) => match v.parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => return bad_request("resourceVersion must be an integer"),
        },
    };
    let timeout = match query.get("timeoutSeconds").map(str::parse::<u64>) {
        None => DEFAULT_WATCH_TIMEOUT,
        Some(Ok(s)) => Duration::from_secs(s),
        Some(Err(_)) => return bad_request("timeoutSeconds must be an integer"),
    };
    let watch = Watch {
        shared: Arc::clone(shared),
        resource,
        namespace,
        selector,
        bookmarks: query.flag("allowWatchBookmarks"),
        deadline: tokio::time::Instant::now() + timeout,
    };
    let (tx, rx) = mpsc::channel::<io::Result<Frame<Bytes>>>(8);
    tokio::spawn(watch.run(from, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("static response parts are valid")
}

/// One open watch.
struct Watch {
    shared: Arc<Shared>,
    resource: &'static ResourceInfo,
    namespace: Option<String>,
    /// `fieldSelector=type=...` on Secrets: only objects of that type.
    selector: Option<String>,
    bookmarks: bool,
    deadline: tokio::time::Instant,
}

/// Why a watch stopped writing.
enum End {
    /// Finish the response normally.
    Clean,
    /// Cut the connection.
    Abort,
    /// The client went away.
    Gone,
}

impl Watch {
    async fn run(self, from: Option<u64>, tx: mpsc::Sender<io::Result<Frame<Bytes>>>) {
        self.shared.open_watches.fetch_add(1, Ordering::Relaxed);
        let end = self.serve(from, &tx).await;
        self.shared.open_watches.fetch_sub(1, Ordering::Relaxed);
        if matches!(end, End::Abort) {
            let _ = tx
                .send(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "watch dropped by the test",
                )))
                .await;
        }
    }

    async fn serve(&self, from: Option<u64>, tx: &mpsc::Sender<io::Result<Frame<Bytes>>>) -> End {
        let mut signals = self.shared.signals.subscribe();
        let start = *signals.borrow_and_update();
        let mut cursor = if let Some(rv) = from {
            rv
        } else {
            // No version: the current objects as ADDED, then changes.
            let (rv, items) = {
                let store = self.shared.store();
                let items =
                    store.kinds[kind_index(self.resource.kind)].items(self.namespace.as_deref());
                (store.rv, items)
            };
            let lines: Vec<Bytes> = items
                .iter()
                .filter(|json| selected(json, self.selector.as_deref()))
                .map(|json| watch_line("ADDED", json))
                .collect();
            if send_lines(tx, lines).await.is_err() {
                return End::Gone;
            }
            rv
        };
        let mut seen = start;
        loop {
            let now = *signals.borrow_and_update();
            if now.drops != seen.drops {
                return End::Abort;
            }
            let pending = {
                let store = self.shared.store();
                let kind = &store.kinds[kind_index(self.resource.kind)];
                if cursor < kind.compacted {
                    Err(format!(
                        "too old resource version: {cursor} ({})",
                        kind.compacted
                    ))
                } else {
                    let first = kind.history.partition_point(|c| c.rv <= cursor);
                    let lines: Vec<Bytes> = kind
                        .history
                        .range(first..)
                        .filter(|c| self.namespace.as_deref().is_none_or(|ns| ns == c.namespace))
                        .filter(|c| {
                            self.selector.is_none()
                                || line_selected(&c.line, self.selector.as_deref())
                        })
                        .map(|c| c.line.clone())
                        .collect();
                    cursor = cursor.max(store.rv);
                    Ok(lines)
                }
            };
            let lines = match pending {
                Ok(lines) => lines,
                Err(message) => {
                    let line = error_line(StatusCode::GONE, "Expired", &message);
                    let _ = send_lines(tx, [line]).await;
                    return End::Clean;
                }
            };
            if send_lines(tx, lines).await.is_err() {
                return End::Gone;
            }
            if now.bookmarks != seen.bookmarks
                && self.bookmarks
                && send_lines(tx, [self.bookmark_line(cursor)]).await.is_err()
            {
                return End::Gone;
            }
            seen = now;
            tokio::select! {
                changed = signals.changed() => if changed.is_err() { return End::Clean },
                () = tokio::time::sleep_until(self.deadline) => return End::Clean,
                () = tx.closed() => return End::Gone,
            }
        }
    }

    fn bookmark_line(&self, rv: u64) -> Bytes {
        let kind = self.resource.kind.to_string();
        Bytes::from(format!(
            "{{\"type\":\"BOOKMARK\",\"object\":{{\"kind\":\"{kind}\",\"apiVersion\":\"{}\",\
             \"metadata\":{{\"resourceVersion\":\"{rv}\"}}}}}}\n",
            self.resource.api_version
        ))
    }
}

/// Writes lines in chunks of up to [`WATCH_CHUNK`] bytes; Err when the client is gone.
async fn send_lines(
    tx: &mpsc::Sender<io::Result<Frame<Bytes>>>,
    lines: impl IntoIterator<Item = Bytes>,
) -> Result<(), ()> {
    let mut chunk = BytesMut::new();
    for line in lines {
        chunk.extend_from_slice(&line);
        if chunk.len() >= WATCH_CHUNK {
            let frame = Frame::data(chunk.split().freeze());
            tx.send(Ok(frame)).await.map_err(|_| ())?;
        }
    }
    if !chunk.is_empty() {
        tx.send(Ok(Frame::data(chunk.freeze())))
            .await
            .map_err(|_| ())?;
    }
    Ok(())
}

/// A `fieldSelector` on Secrets made only of `type=X`, `type==X` and `type!=X` terms
/// (comma-separated, all must hold), kept as written.
fn secret_type_selector(query: &Query) -> Option<String> {
    let fields = query.get("fieldSelector").filter(|v| !v.is_empty())?;
    fields
        .split(',')
        .all(|term| type_term(term).is_some())
        .then(|| fields.to_owned())
}

/// One term: (wanted equal?, the type).
fn type_term(term: &str) -> Option<(bool, &str)> {
    let (equal, value) = if let Some(v) = term.strip_prefix("type!=") {
        (false, v)
    } else if let Some(v) = term.strip_prefix("type==") {
        (true, v)
    } else {
        (true, term.strip_prefix("type=")?)
    };
    (!value.is_empty()).then_some((equal, value))
}

/// Whether a Secret of `actual` type passes every term of `selector`.
fn type_matches(selector: &str, actual: &str) -> bool {
    selector
        .split(',')
        .filter_map(type_term)
        .all(|(equal, value)| (actual == value) == equal)
}

/// Whether a stored object (JSON) has the selected `type`; everything without a selector.
fn selected(json: &[u8], secret_type: Option<&str>) -> bool {
    let Some(want) = secret_type else {
        return true;
    };
    serde_json::from_slice::<serde_json::Value>(json)
        .is_ok_and(|v| type_matches(want, v["type"].as_str().unwrap_or("Opaque")))
}

/// [`selected`] for a rendered watch line (`{"type":EVENT,"object":{...}}`).
fn line_selected(line: &[u8], secret_type: Option<&str>) -> bool {
    let Some(want) = secret_type else {
        return true;
    };
    serde_json::from_slice::<serde_json::Value>(line)
        .is_ok_and(|v| type_matches(want, v["object"]["type"].as_str().unwrap_or("Opaque")))
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else
/// replaces.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    let serde_json::Value::Object(object) = target else {
        unreachable!("made an object above")
    };
    for (key, value) in patch {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(
                object.entry(key.clone()).or_insert(serde_json::Value::Null),
                value,
            );
        }
    }
}

/// `PATCH .../ingresses/NAME/status` with a merge patch: the status subresource, so only
/// the patch's `status` is applied (the real server ignores the rest).
async fn patch_ingress_status(
    shared: &Shared,
    namespace: &str,
    name: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let content_type = req
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if !content_type.starts_with("application/merge-patch+json") {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the test API server takes only merge patches, not {content_type:?}"),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => return bad_request(&format!("cannot read the request body: {e}")),
    };
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(patch) => patch,
        Err(e) => return bad_request(&format!("the patch is not JSON: {e}")),
    };
    let key = (namespace.to_owned(), name.to_owned());
    let mut store = shared.store();
    let Some(stored) = store.kind(Kind::Ingress).objects.get(&key).cloned() else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("ingresses.networking.k8s.io \"{name}\" not found"),
        );
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(&stored).expect("stored objects are JSON");
    if let Some(new_status) = patch.get("status") {
        merge_patch(
            value
                .as_object_mut()
                .expect("stored objects are JSON objects")
                .entry("status")
                .or_insert(serde_json::Value::Null),
            new_status,
        );
    }
    let ingress: k8s_openapi::api::networking::v1::Ingress = match serde_json::from_value(value) {
        Ok(ingress) => ingress,
        Err(e) => {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                &format!("the patched Ingress is invalid: {e}"),
            );
        }
    };
    store.apply(Object::Ingress(ingress));
    let rv = store.rv;
    let json = store
        .kind(Kind::Ingress)
        .objects
        .get(&key)
        .cloned()
        .expect("just stored");
    drop(store);
    shared.signals.send_modify(|s| s.rv = rv);
    json_response(StatusCode::OK, json)
}

async fn create_event(shared: &Shared, namespace: &str, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) => return bad_request(&format!("cannot read the request body: {e}")),
    };
    let mut event: KubeEvent = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(e) => return bad_request(&format!("the body is not an events.k8s.io/v1 Event: {e}")),
    };
    if event
        .metadata
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != namespace)
    {
        return bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        );
    }
    let Some(name) = event.metadata.name.clone().filter(|n| !n.is_empty()) else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name: Required value",
        );
    };
    let mut store = shared.store();
    if store.events.iter().any(|e| {
        e.metadata.name.as_deref() == Some(name.as_str())
            && e.metadata.namespace.as_deref() == Some(namespace)
    }) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("events.events.k8s.io \"{name}\" already exists"),
        );
    }
    store.rv += 1;
    store.next_uid += 1;
    event.metadata.namespace = Some(namespace.to_owned());
    event.metadata.resource_version = Some(store.rv.to_string());
    event.metadata.uid = Some(format!("00000000-0000-4000-8000-{:012x}", store.next_uid));
    store.events.push(event.clone());
    drop(store);
    let json = serde_json::to_vec(&event).expect("Events serialize");
    json_response(StatusCode::CREATED, Bytes::from(json))
}

fn json_response(code: StatusCode, body: Bytes) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body).map_err(|e: Infallible| match e {}).boxed())
        .expect("static response parts are valid")
}

fn status_json(code: StatusCode, reason: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

/// A Status response, as the real server sends with every error.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let json = serde_json::to_vec(&status_json(code, reason, message)).expect("JSON serializes");
    json_response(code, Bytes::from(json))
}

fn bad_request(message: &str) -> Response<Body> {
    status(StatusCode::BAD_REQUEST, "BadRequest", message)
}

/// An `ERROR` watch event carrying a Status.
fn error_line(code: StatusCode, reason: &str, message: &str) -> Bytes {
    let status = serde_json::to_vec(&status_json(code, reason, message)).expect("JSON serializes");
    watch_line("ERROR", &status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_type_terms_all_hold() {
        let selector = "type!=kubernetes.io/service-account-token,type!=helm.sh/release.v1";
        assert!(type_matches(selector, "Opaque"));
        assert!(type_matches(selector, "kubernetes.io/tls"));
        assert!(!type_matches(selector, "helm.sh/release.v1"));
        assert!(type_matches("type=kubernetes.io/tls", "kubernetes.io/tls"));
        assert!(!type_matches("type==kubernetes.io/tls", "Opaque"));
        assert_eq!(type_term("name=x"), None);
        assert_eq!(type_term("type!="), None);
    }

    #[test]
    fn paths_resolve_to_resources_and_verbs() {
        let cases = [
            ("GET", "/api/v1/services", false, "", "services", "list"),
            ("GET", "/api/v1/services", true, "", "services", "watch"),
            (
                "GET",
                "/api/v1/namespaces/a/services/b",
                false,
                "",
                "services",
                "get",
            ),
            (
                "GET",
                "/apis/discovery.k8s.io/v1/endpointslices",
                true,
                "discovery.k8s.io",
                "endpointslices",
                "watch",
            ),
            ("GET", "/api/v1/nodes/n1", false, "", "nodes", "get"),
            (
                "GET",
                "/apis/networking.k8s.io/v1/ingresses",
                true,
                "networking.k8s.io",
                "ingresses",
                "watch",
            ),
            (
                "GET",
                "/apis/networking.k8s.io/v1/ingressclasses",
                false,
                "networking.k8s.io",
                "ingressclasses",
                "list",
            ),
            ("GET", "/api/v1/secrets", true, "", "secrets", "watch"),
            (
                "PATCH",
                "/apis/networking.k8s.io/v1/namespaces/a/ingresses/b/status",
                false,
                "networking.k8s.io",
                "ingresses/status",
                "patch",
            ),
            (
                "POST",
                "/apis/events.k8s.io/v1/namespaces/a/events",
                false,
                "events.k8s.io",
                "events",
                "create",
            ),
        ];
        for (method, path, watch, group, resource, want) in cases {
            let target = Target::parse(path).expect(path);
            let method: Method = method.parse().expect("method");
            let record = RequestRecord::new(&method, path, String::new(), Some(&target), watch);
            assert_eq!(
                (record.group.as_str(), record.resource.as_str()),
                (group, resource),
                "{path}"
            );
            assert_eq!(record.verb, want, "{path}");
        }
        for path in [
            "/api/v1/nodes/a/b",
            "/api/v1/namespaces/a/nodes",
            "/api/v2/services",
            "/apis/discovery.k8s.io/v1/services",
            "/api/v1/namespaces/a/services/b/status",
            "/healthz",
        ] {
            assert!(Target::parse(path).is_none(), "{path}");
        }
    }

    #[test]
    fn merge_patches_merge_objects_and_remove_nulls() {
        let mut target = serde_json::json!({"a": {"b": 1, "c": 2}, "d": [1], "e": "x"});
        merge_patch(
            &mut target,
            &serde_json::json!({"a": {"b": null, "f": 3}, "d": [2], "g": {"h": 1}}),
        );
        assert_eq!(
            target,
            serde_json::json!({"a": {"c": 2, "f": 3}, "d": [2], "e": "x", "g": {"h": 1}})
        );
    }
}
