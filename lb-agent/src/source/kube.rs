//! `--kube`: kube-rs watchers on Services, EndpointSlices and Nodes (with `--l7` also
//! Ingresses, IngressClasses and `kubernetes.io/tls` Secrets), turned into
//! `ClusterEvent`s, and the Kubernetes Events the agent publishes about objects it
//! skips.
//!
//! Every complete list (the first one, and every relist after a 410 Gone or a
//! reconnect that cannot resume) arrives as one `Replace`, never as deletes and adds,
//! so `Cluster::apply` finds unchanged objects unchanged and nothing is rewritten:
//! forwarding keeps the last known state while the API server is away (fail-static).

use std::collections::{HashSet, VecDeque};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures_util::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use lb_core::cluster::{ClusterEvent, Kind, Object, ObjectKey};

/// One RBAC rule the agent needs: API group ("" = core), resource, verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the agent asks of the API server. deploy/'s ClusterRole grants exactly
/// this (a test checks both directions). The watchers list and watch; `get` is
/// granted as read access conventionally comes (and for `kubectl`-style debugging with
/// the agent's account); Events are only created, never patched (see
/// [`EventPublisher`]).
pub const REQUIRED_ACCESS: &[Access] = &[
    Access {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch"],
    },
    Access {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["get", "list", "watch"],
    },
    Access {
        group: "",
        resource: "nodes",
        verbs: &["get", "list", "watch"],
    },
    Access {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create"],
    },
];

/// What the L7 hop adds to [`REQUIRED_ACCESS`] (with `--l7`): its kinds read, and the
/// Ingress status written (a merge patch of the status subresource). deploy/'s
/// ClusterRole grants both sets.
pub const L7_ACCESS: &[Access] = &[
    Access {
        group: "networking.k8s.io",
        resource: "ingresses",
        verbs: &["get", "list", "watch"],
    },
    Access {
        group: "networking.k8s.io",
        resource: "ingressclasses",
        verbs: &["get", "list", "watch"],
    },
    Access {
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "watch"],
    },
    Access {
        group: "networking.k8s.io",
        resource: "ingresses/status",
        // The status writer sends merge patches; it never replaces the object.
        verbs: &["patch"],
    },
];

/// The field selector on Secrets: only TLS Secrets are listed, so no other secret ever
/// reaches the agent's memory.
pub const SECRET_FIELD_SELECTOR: &str = "type=kubernetes.io/tls";

/// Watches the cluster and sends every change to `tx` until `tx` closes (then returns
/// `Ok`). API errors never end it: each watcher retries with kube-runtime's default
/// backoff (0.8 s doubling to 30 s, with jitter) forever. With `l7`, the L7 kinds are
/// watched too (Secrets of type `kubernetes.io/tls` only).
///
/// The first events are one `Replace` per kind, in `Kind::ALL` order, each sent once
/// that kind's first complete list is in; changes follow only after all of them.
pub async fn run(
    client: kube::Client,
    tx: mpsc::Sender<ClusterEvent>,
    l7: bool,
) -> anyhow::Result<()> {
    let all = watcher::Config::default();
    let mut streams = vec![
        relay::<Service>(&client, Kind::Service, Object::Service, all.clone()),
        relay::<EndpointSlice>(
            &client,
            Kind::EndpointSlice,
            Object::EndpointSlice,
            all.clone(),
        ),
        relay::<Node>(&client, Kind::Node, Object::Node, all.clone()),
    ];
    if l7 {
        streams.extend([
            relay::<Ingress>(&client, Kind::Ingress, Object::Ingress, all.clone()),
            relay::<IngressClass>(
                &client,
                Kind::IngressClass,
                Object::IngressClass,
                all.clone(),
            ),
            relay::<Secret>(
                &client,
                Kind::Secret,
                Object::Secret,
                all.fields(SECRET_FIELD_SELECTOR),
            ),
        ]);
    }
    // A relay's first event is its first Replace; a kind that finished listing is not
    // polled (its watch not started) until every kind has.
    let firsts = futures_util::future::join_all(streams.iter_mut().map(StreamExt::next)).await;
    for first in firsts {
        let Some(event) = first else {
            anyhow::bail!("a Kubernetes watcher ended");
        };
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
    let mut changes = futures_util::stream::select_all(streams);
    while let Some(event) = changes.next().await {
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
    anyhow::bail!("the Kubernetes watchers ended")
}

/// One kind's watcher (cluster-wide, default pages of 500, bookmarks on) with backoff,
/// as `ClusterEvent`s.
fn relay<K>(
    client: &kube::Client,
    kind: Kind,
    wrap: fn(K) -> Object,
    config: watcher::Config,
) -> BoxStream<'static, ClusterEvent>
where
    K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let mut relay = Relay::new(kind);
    watcher(api, config)
        .default_backoff()
        .filter_map(move |item| {
            let event = relay.step(item.map(|event| map_event(event, wrap)));
            std::future::ready(event)
        })
        .boxed()
}

/// A watcher event with its object wrapped and stripped (before it is buffered, so a
/// relist holds only what the translation reads).
fn map_event<K>(event: watcher::Event<K>, wrap: fn(K) -> Object) -> watcher::Event<Object> {
    let stripped = |k: K| {
        let mut object = wrap(k);
        object.strip();
        object
    };
    match event {
        watcher::Event::Apply(k) => watcher::Event::Apply(stripped(k)),
        watcher::Event::Delete(k) => watcher::Event::Delete(stripped(k)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(k) => watcher::Event::InitApply(stripped(k)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Turns one kind's watcher events into `ClusterEvent`s: a list (`Init`, `InitApply`…,
/// `InitDone`) becomes one `Replace`; errors are logged once per streak.
#[derive(Debug)]
struct Relay {
    kind: Kind,
    /// The list being received, between `Init` and `InitDone`.
    buffer: Option<Vec<Object>>,
    /// Consecutive failures since the last progress.
    failures: u64,
}

impl Relay {
    fn new(kind: Kind) -> Relay {
        Relay {
            kind,
            buffer: None,
            failures: 0,
        }
    }

    fn step(
        &mut self,
        item: Result<watcher::Event<Object>, watcher::Error>,
    ) -> Option<ClusterEvent> {
        let event = match item {
            Ok(event) => event,
            Err(error) => {
                self.failed(&error);
                return None;
            }
        };
        // `Init` is not progress: the watcher emits it before every list attempt.
        if !matches!(event, watcher::Event::Init) {
            self.progressed();
        }
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(object) => {
                self.buffer.get_or_insert_with(Vec::new).push(object);
                None
            }
            watcher::Event::InitDone => Some(ClusterEvent::Replace(
                self.kind,
                self.buffer.take().unwrap_or_default(),
            )),
            watcher::Event::Apply(object) => Some(ClusterEvent::Apply(object)),
            watcher::Event::Delete(object) => Some(ClusterEvent::Delete(object)),
        }
    }

    fn failed(&mut self, error: &watcher::Error) {
        self.failures += 1;
        let kind = self.kind;
        if self.failures > 1 {
            tracing::debug!(%kind, failures = self.failures, error = %error, "watch still failing");
        } else if is_gone(error) {
            tracing::info!(%kind, "watch history expired (410 Gone); relisting");
        } else {
            tracing::warn!(
                %kind,
                error = %error,
                "watch failed; serving the last known state and retrying with backoff"
            );
        }
    }

    fn progressed(&mut self) {
        if self.failures > 0 {
            tracing::info!(kind = %self.kind, failures = self.failures, "watch recovered");
            self.failures = 0;
        }
    }
}

fn is_gone(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status)
        | watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// Who reports the Events (`reportingController`).
pub const REPORTING_CONTROLLER: &str = "xlb/lb-agent";

/// How many published problems are remembered for de-duplication; the oldest are
/// forgotten first (and would be published again if they recur).
const REMEMBERED_PROBLEMS: usize = 10_000;

/// The API's limits on Event fields (bytes).
const MAX_NOTE: usize = 1024;
const MAX_REASON: usize = 128;

/// Publishes a Warning Event (events.k8s.io/v1) about an object the translation had to
/// skip, so `kubectl describe` on the object shows why, once per problem: the same
/// (object, reason, note) is published only once per agent run (the translation
/// meets it again on every change of the Service; the Event says it once).
///
/// Events are created, never patched (no series counting), so the agent needs only
/// `create` on events. Cheap to clone; clones share the de-duplication.
#[derive(Clone)]
pub struct EventPublisher {
    inner: Arc<PublisherInner>,
}

struct PublisherInner {
    client: kube::Client,
    /// `reportingInstance`: `lb-agent-<node>`, so each node's agent is told apart.
    instance: String,
    published: Mutex<Remembered>,
}

type Problem = (Kind, ObjectKey, String, String);

#[derive(Default)]
struct Remembered {
    set: HashSet<Problem>,
    order: VecDeque<Problem>,
}

impl Remembered {
    /// False if already remembered.
    fn insert(&mut self, problem: Problem) -> bool {
        if !self.set.insert(problem.clone()) {
            return false;
        }
        self.order.push_back(problem);
        while self.order.len() > REMEMBERED_PROBLEMS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }

    fn remove(&mut self, problem: &Problem) {
        if self.set.remove(problem) {
            self.order.retain(|p| p != problem);
        }
    }
}

impl EventPublisher {
    pub fn new(client: kube::Client, node_name: &str) -> EventPublisher {
        EventPublisher {
            inner: Arc::new(PublisherInner {
                client,
                instance: truncate(&format!("lb-agent-{node_name}"), 128).to_owned(),
                published: Mutex::default(),
            }),
        }
    }

    /// Publishes a Warning about `object` (for a Node, `object.namespace` is ignored
    /// and the Event goes to "default", as the kubelet's do). Returns `Ok(false)`
    /// without calling the API when this problem was published already. A failed
    /// create is not remembered, so the next report of the problem tries again.
    pub async fn warn(
        &self,
        kind: Kind,
        object: &ObjectKey,
        reason: &str,
        note: &str,
    ) -> Result<bool, kube::Error> {
        let problem = (kind, object.clone(), reason.to_owned(), note.to_owned());
        if !self.remembered().insert(problem.clone()) {
            return Ok(false);
        }
        let event = self.event(kind, object, reason, note);
        let namespace = event.metadata.namespace.clone().unwrap_or_default();
        let api: Api<KubeEvent> = Api::namespaced(self.inner.client.clone(), &namespace);
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => Ok(true),
            Err(e) => {
                self.remembered().remove(&problem);
                Err(e)
            }
        }
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.inner
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn event(&self, kind: Kind, object: &ObjectKey, reason: &str, note: &str) -> KubeEvent {
        let now = k8s_openapi::jiff::Timestamp::now();
        let (api_version, namespace) = match kind {
            Kind::Service | Kind::Secret => ("v1", Some(object.namespace.clone())),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", Some(object.namespace.clone())),
            Kind::Node => ("v1", None),
            Kind::Ingress => ("networking.k8s.io/v1", Some(object.namespace.clone())),
            Kind::IngressClass => ("networking.k8s.io/v1", None),
        };
        let event_namespace = namespace.clone().unwrap_or_else(|| "default".to_owned());
        KubeEvent {
            metadata: ObjectMeta {
                // Unique like kubectl's: the object's name and the time in hex.
                name: Some(format!(
                    "{}.{:x}",
                    truncate(&object.name, 200),
                    now.as_nanosecond()
                )),
                namespace: Some(event_namespace),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some("Warning".to_owned()),
            reason: Some(truncate(reason, MAX_REASON).to_owned()),
            note: Some(truncate(note, MAX_NOTE).to_owned()),
            action: Some("Translate".to_owned()),
            regarding: Some(ObjectReference {
                api_version: Some(api_version.to_owned()),
                kind: Some(kind.to_string()),
                name: Some(object.name.clone()),
                namespace,
                ..ObjectReference::default()
            }),
            reporting_controller: Some(REPORTING_CONTROLLER.to_owned()),
            reporting_instance: Some(self.inner.instance.clone()),
            ..KubeEvent::default()
        }
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;

    fn service(name: &str) -> Object {
        let mut svc = Service::default();
        svc.metadata.name = Some(name.to_owned());
        svc.metadata.namespace = Some("default".to_owned());
        Object::Service(svc)
    }

    #[test]
    fn the_secret_selector_names_the_tls_type() {
        assert_eq!(
            SECRET_FIELD_SELECTOR,
            format!("type={}", lb_core::cluster::TLS_SECRET_TYPE)
        );
    }

    fn name_of(object: &Object) -> String {
        object.meta().name.clone().unwrap_or_default()
    }

    #[test]
    fn a_list_becomes_one_replace_and_changes_pass_through() {
        let mut relay = Relay::new(Kind::Service);
        assert!(relay.step(Ok(watcher::Event::Init)).is_none());
        assert!(
            relay
                .step(Ok(watcher::Event::InitApply(service("a"))))
                .is_none()
        );
        assert!(
            relay
                .step(Ok(watcher::Event::InitApply(service("b"))))
                .is_none()
        );
        match relay.step(Ok(watcher::Event::InitDone)) {
            Some(ClusterEvent::Replace(Kind::Service, objects)) => {
                let names: Vec<String> = objects.iter().map(name_of).collect();
                assert_eq!(names, ["a", "b"]);
            }
            other => panic!("expected a Replace, got {other:?}"),
        }
        assert!(matches!(
            relay.step(Ok(watcher::Event::Apply(service("c")))),
            Some(ClusterEvent::Apply(_))
        ));
        assert!(matches!(
            relay.step(Ok(watcher::Event::Delete(service("c")))),
            Some(ClusterEvent::Delete(_))
        ));
    }

    #[test]
    fn a_failed_list_restarts_the_buffer() {
        let mut relay = Relay::new(Kind::Service);
        relay.step(Ok(watcher::Event::Init));
        relay.step(Ok(watcher::Event::InitApply(service("stale"))));
        // The page request failed; the watcher starts over with Init.
        assert!(relay.step(Err(watcher::Error::NoResourceVersion)).is_none());
        relay.step(Ok(watcher::Event::Init));
        relay.step(Ok(watcher::Event::InitApply(service("fresh"))));
        match relay.step(Ok(watcher::Event::InitDone)) {
            Some(ClusterEvent::Replace(_, objects)) => {
                let names: Vec<String> = objects.iter().map(name_of).collect();
                assert_eq!(names, ["fresh"]);
            }
            other => panic!("expected a Replace, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_list_is_an_empty_replace() {
        let mut relay = Relay::new(Kind::Node);
        relay.step(Ok(watcher::Event::Init));
        assert!(matches!(
            relay.step(Ok(watcher::Event::InitDone)),
            Some(ClusterEvent::Replace(Kind::Node, objects)) if objects.is_empty()
        ));
    }

    #[test]
    fn failures_count_until_progress_but_init_is_not_progress() {
        let mut relay = Relay::new(Kind::EndpointSlice);
        for _ in 0..3 {
            relay.step(Ok(watcher::Event::Init));
            relay.step(Err(watcher::Error::NoResourceVersion));
        }
        assert_eq!(relay.failures, 3);
        relay.step(Ok(watcher::Event::Init));
        relay.step(Ok(watcher::Event::InitDone));
        assert_eq!(relay.failures, 0);
    }

    #[test]
    fn remembered_problems_are_bounded_and_forgettable() {
        let mut remembered = Remembered::default();
        let problem = |i: usize| {
            (
                Kind::Service,
                ObjectKey::new("ns", &format!("s{i}")),
                "R".to_owned(),
                "n".to_owned(),
            )
        };
        assert!(remembered.insert(problem(0)));
        assert!(!remembered.insert(problem(0)));
        remembered.remove(&problem(0));
        assert!(remembered.insert(problem(0)));
        for i in 1..=REMEMBERED_PROBLEMS {
            assert!(remembered.insert(problem(i)));
        }
        assert_eq!(remembered.set.len(), REMEMBERED_PROBLEMS);
        // The oldest was forgotten.
        assert!(remembered.insert(problem(0)));
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }
}
