//! The one module that writes to Kubernetes (with `--kube`); sources only read, and the
//! writer of the maps never talks to the API server.
//!
//! - Warning Events about objects the translation had to skip ([`EventPublisher`]), so
//!   `kubectl describe` on the object shows why;
//! - the status of the Ingresses the L7 hop serves: the addresses it is reached on
//!   (computed by the pure `l7::status` helpers, written by a task of its own).
//!
//! Both run off the agent loop, so a slow API server never delays the maps. [`WRITES`]
//! and [`L7_WRITES`] are everything this module asks of the API server; with the
//! source's reads they are exactly what deploy/'s ClusterRole grants (a test checks both
//! directions).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::l7::status::Updates;
use crate::source::kube::Access;
use lb_core::cluster::{Kind, ObjectKey};
use lb_core::model::kubernetes::Problem;

/// What the agent writes: Events are only created, never patched (see
/// [`EventPublisher`]).
pub const WRITES: &[Access] = &[Access {
    group: "events.k8s.io",
    resource: "events",
    verbs: &["create"],
}];

/// What the L7 hop adds to [`WRITES`] (with `--l7`): the Ingress status, as a merge
/// patch of the status subresource; the object is never replaced.
pub const L7_WRITES: &[Access] = &[Access {
    group: "networking.k8s.io",
    resource: "ingresses/status",
    verbs: &["patch"],
}];

/// How long a failed status write waits before it is tried again.
const STATUS_RETRY: Duration = Duration::from_secs(10);

/// The agent's writes to its cluster: Events always, Ingress status with the L7 hop.
/// Dropping it stops the status writer.
pub struct KubeWrites {
    events: EventPublisher,
    status: Option<(watch::Sender<Updates>, JoinHandle<()>)>,
}

impl KubeWrites {
    /// Events are reported by `lb-agent-<node_name>`; with `ingress_status`, a task
    /// writes the status of the served Ingresses.
    pub fn start(client: kube::Client, node_name: &str, ingress_status: bool) -> KubeWrites {
        let status = ingress_status.then(|| {
            let (tx, rx) = watch::channel(Vec::new());
            let task = tokio::spawn(status_writer(client.clone(), rx, STATUS_RETRY));
            (tx, task)
        });
        KubeWrites {
            events: EventPublisher::new(client, node_name),
            status,
        }
    }

    /// Tells the object's owner about `problem` with a Warning Event, published on a
    /// task of its own.
    pub fn warn(&self, problem: &Problem) {
        let events = self.events.clone();
        let problem = problem.clone();
        tokio::spawn(async move {
            let note = format!("{}: {}", problem.field, problem.reason);
            if let Err(e) = events
                .warn(problem.kind, &problem.object, "InvalidField", &note)
                .await
            {
                tracing::debug!("Event about {} not published: {e}", problem.object);
            }
        });
    }

    /// The Ingress status writes wanted now (replacing those not yet done).
    pub fn ingress_status(&self, updates: Updates) {
        if let Some((status, _)) = &self.status {
            status.send_if_modified(|pending| {
                let changed = *pending != updates;
                *pending = updates;
                changed
            });
        }
    }
}

impl Drop for KubeWrites {
    fn drop(&mut self) {
        if let Some((_, task)) = &self.status {
            task.abort();
        }
    }
}

/// Writes the latest wanted Ingress status, one merge patch of the status subresource
/// per Ingress. A failure is logged and retried after `retry` while it is still wanted.
async fn status_writer(
    client: kube::Client,
    mut wanted: watch::Receiver<Updates>,
    retry: Duration,
) {
    loop {
        let batch = wanted.borrow_and_update().clone();
        let mut failed = false;
        for (key, addresses) in &batch {
            let api: Api<Ingress> = Api::namespaced(client.clone(), &key.namespace);
            let ingress: Vec<_> = addresses
                .iter()
                .map(|ip| serde_json::json!({ "ip": ip }))
                .collect();
            let patch = serde_json::json!({ "status": { "loadBalancer": { "ingress": ingress } } });
            match api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => tracing::info!(ingress = %key, ?addresses, "Ingress status updated"),
                Err(e) => {
                    failed = true;
                    tracing::warn!(ingress = %key, "Ingress status not updated: {e}");
                }
            }
        }
        let next = if failed {
            tokio::time::timeout(retry, wanted.changed()).await.ok()
        } else {
            Some(wanted.changed().await)
        };
        if matches!(next, Some(Err(_))) {
            return;
        }
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

type Published = (Kind, ObjectKey, String, String);

#[derive(Default)]
struct Remembered {
    set: HashSet<Published>,
    order: VecDeque<Published>,
}

impl Remembered {
    /// False if already remembered.
    fn insert(&mut self, problem: Published) -> bool {
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

    fn remove(&mut self, problem: &Published) {
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
