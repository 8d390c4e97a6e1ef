//! `--kube`: kube-rs watchers on Services, EndpointSlices and Nodes (with `--l7` also
//! Ingresses, IngressClasses and TLS and basic-auth Secrets), turned into
//! `ClusterEvent`s. This module only reads; what the agent writes to the cluster is in
//! `kube_writes`.
//!
//! Every complete list (the first one, and every relist after a 410 Gone or a
//! reconnect that cannot resume) arrives as one `Replace`, never as deletes and adds,
//! so `Cluster::apply` finds unchanged objects unchanged and nothing is rewritten:
//! forwarding keeps the last known state while the API server is away (fail-static).

use std::fmt::Debug;

use futures_util::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use lb_core::cluster::{ClusterEvent, Kind, Object};

/// One RBAC rule the agent needs: API group ("" = core), resource, verbs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// What the source asks of the API server: the watchers list and watch; `get` is
/// granted as read access conventionally comes (and for `kubectl`-style debugging with
/// the agent's account). With `kube_writes::WRITES` this is exactly what deploy/'s
/// ClusterRole grants (a test checks both directions).
pub const READS: &[Access] = &[
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
];

/// What the L7 hop adds to [`READS`] (with `--l7`): its kinds (and
/// `kube_writes::L7_WRITES` the Ingress status).
pub const L7_READS: &[Access] = &[
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
];

/// The field selector on Secrets: TLS Secrets and the Opaque ones basic authentication
/// reads (`auth-secret`); the Secret types that hold credentials of other kinds
/// (service account and bootstrap tokens, registry logins) and Helm's large release
/// records are never listed. What is listed is stripped on arrival to TLS keys and
/// password hashes ([`lb_core::cluster::Object::strip`]).
pub const SECRET_FIELD_SELECTOR: &str = "type!=kubernetes.io/service-account-token,\
    type!=bootstrap.kubernetes.io/token,type!=kubernetes.io/dockerconfigjson,\
    type!=kubernetes.io/dockercfg,type!=kubernetes.io/basic-auth,\
    type!=kubernetes.io/ssh-auth,type!=helm.sh/release.v1";

/// Watches the cluster and sends every change to `tx` until `tx` closes (then returns
/// `Ok`). API errors never end it: each watcher retries with kube-runtime's default
/// backoff (0.8 s doubling to 30 s, with jitter) forever. With `l7`, the L7 kinds are
/// watched too (Secrets by [`SECRET_FIELD_SELECTOR`]).
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
    fn the_secret_selector_keeps_tls_and_opaque_secrets() {
        let excluded: Vec<&str> = SECRET_FIELD_SELECTOR
            .split(',')
            .map(|term| term.strip_prefix("type!=").expect("only type!= terms"))
            .collect();
        assert!(!excluded.contains(&lb_core::cluster::TLS_SECRET_TYPE));
        assert!(!excluded.contains(&"Opaque"));
        assert!(excluded.contains(&"kubernetes.io/service-account-token"));
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
}
