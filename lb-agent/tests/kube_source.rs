//! The `--kube` source against the test API server (testbed::apiserver), inside a
//! network namespace of its own: initial lists, changes, a 410 Gone relist, a dropped
//! watch, bookmarks, and what the source asks of the server. The events it produces
//! are fed into a `Cluster`, as the agent does, to check convergence and that a relist
//! of unchanged objects dirties nothing.
//!
//! Every wait is bounded; the namespace and the server are removed on drop.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, ListParams, Patch, PatchParams};
use lb_agent::kube_writes::{EventPublisher, WRITES};
use lb_agent::source::kube::{self as kube_source, L7_READS, READS, SECRET_FIELD_SELECTOR};
use lb_core::cluster::{Cluster, ClusterEvent, Dirty, Kind, Object, ObjectKey};
use lb_testbed::{self as testbed, ApiServer, Netns};
use tokio::sync::mpsc;

/// Longest wait for one event from the source (its backoff starts at 0.8 s and
/// doubles; a test that needs this long is broken anyway).
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a whole test may take.
const TEST_TIMEOUT: Duration = Duration::from_mins(2);
/// How often a wait on the server's request log looks again.
const POLL: Duration = Duration::from_millis(20);

/// Runs `test` on a single-threaded runtime whose thread entered a fresh namespace in
/// which the API server listens, so every connection the client makes stays inside.
fn with_server(tag: &str, test: impl AsyncFnOnce(&ApiServer) + Send) {
    testbed::check_privileges().expect("privileges");
    let ns = Netns::new(tag).expect("netns");
    let server = ApiServer::start(&ns).expect("API server");
    ns.block_on(TEST_TIMEOUT, || test(&server))
        .expect("the test in its netns");
}

fn service(name: &str, port: u16) -> Object {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n\
         spec:\n  type: ClusterIP\n  clusterIP: 203.0.113.10\n  ports:\n  \
         - name: http\n    port: {port}\n    protocol: TCP\n    targetPort: 8080\n"
    );
    Object::Service(serde_yaml::from_str::<Service>(&yaml).expect("service YAML"))
}

fn slice(name: &str, service: &str, addresses: &[&str]) -> Object {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\n\
         addressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n"
    );
    for address in addresses {
        let _ = write!(
            yaml,
            "- addresses: [\"{address}\"]\n  conditions:\n    ready: true\n"
        );
    }
    Object::EndpointSlice(serde_yaml::from_str::<EndpointSlice>(&yaml).expect("slice YAML"))
}

fn node(name: &str, address: &str) -> Object {
    let yaml = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses:\n  \
         - type: InternalIP\n    address: {address}\n"
    );
    Object::Node(serde_yaml::from_str::<Node>(&yaml).expect("node YAML"))
}

/// `count` Services, each with one slice of two endpoints, and two Nodes.
fn populate(server: &ApiServer, count: usize) {
    let mut objects = vec![
        node("node-a", "198.51.100.2"),
        node("node-b", "198.51.100.3"),
    ];
    for i in 0..count {
        let name = format!("web-{i}");
        objects.push(service(&name, 80));
        objects.push(slice(
            &format!("{name}-x1"),
            &name,
            &["192.0.2.10", "192.0.2.11"],
        ));
    }
    server.apply_all(objects);
}

fn kind_and_name(event: &ClusterEvent) -> String {
    let object_name = |o: &Object| o.meta().name.clone().unwrap_or_default();
    match event {
        ClusterEvent::Apply(o) => format!("Apply {} {}", o.kind(), object_name(o)),
        ClusterEvent::Delete(o) => format!("Delete {} {}", o.kind(), object_name(o)),
        ClusterEvent::Replace(kind, objects) => format!("Replace {kind} ({})", objects.len()),
    }
}

/// The source running against the server, and the cluster index its events feed.
struct Source {
    /// The kinds it watches.
    kinds: &'static [Kind],
    rx: mpsc::Receiver<ClusterEvent>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    cluster: Cluster,
    client: kube::Client,
}

impl Source {
    /// The L4 source (what every agent watches).
    async fn start(server: &ApiServer) -> Source {
        Source::start_with(server, false).await
    }

    /// With `l7`, the L7 kinds too.
    async fn start_with(server: &ApiServer, l7: bool) -> Source {
        let client = server.client().await.expect("client from the kubeconfig");
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(kube_source::run(client.clone(), tx, l7));
        let cluster = Cluster::new(l7);
        Source {
            kinds: cluster.required_kinds(),
            rx,
            task,
            cluster,
            client,
        }
    }

    /// The next event (also applied to the cluster) and the Services it dirtied.
    async fn next(&mut self) -> (ClusterEvent, Dirty) {
        let event = tokio::time::timeout(EVENT_TIMEOUT, self.rx.recv())
            .await
            .expect("no event from the source in time")
            .expect("the source ended");
        let dirty = self.cluster.apply(event.clone());
        (event, dirty)
    }

    /// Reads events until one Replace per watched kind arrived (as after a relist of
    /// all); returns them in order and the union of what they dirtied.
    async fn next_replaces(&mut self) -> (Vec<String>, Dirty) {
        let mut seen = Vec::new();
        let mut kinds = BTreeSet::new();
        let mut dirty = Dirty::None;
        while kinds.len() < self.kinds.len() {
            let (event, d) = self.next().await;
            if let ClusterEvent::Replace(kind, _) = &event {
                kinds.insert(*kind);
            }
            seen.push(kind_and_name(&event));
            dirty.merge(d);
        }
        (seen, dirty)
    }

    /// Every object the server holds, by kind and key, with its resourceVersion.
    async fn server_state(&self) -> BTreeMap<(Kind, String), String> {
        let lp = ListParams::default();
        let mut state = BTreeMap::new();
        let rv = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.resource_version.clone().unwrap_or_default()
        };
        let key = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            format!(
                "{}/{}",
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default()
            )
        };
        for s in Api::<Service>::all(self.client.clone())
            .list(&lp)
            .await
            .expect("list")
        {
            state.insert((Kind::Service, key(&s.metadata)), rv(&s.metadata));
        }
        for s in Api::<EndpointSlice>::all(self.client.clone())
            .list(&lp)
            .await
            .expect("list")
        {
            state.insert((Kind::EndpointSlice, key(&s.metadata)), rv(&s.metadata));
        }
        for n in Api::<Node>::all(self.client.clone())
            .list(&lp)
            .await
            .expect("list")
        {
            state.insert((Kind::Node, key(&n.metadata)), rv(&n.metadata));
        }
        state
    }

    /// The cluster index in the same shape as [`Source::server_state`].
    fn cluster_state(&self) -> BTreeMap<(Kind, String), String> {
        let rv = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.resource_version.clone().unwrap_or_default()
        };
        let mut state = BTreeMap::new();
        for (key, s) in &self.cluster.services {
            state.insert((Kind::Service, key.to_string()), rv(&s.metadata));
        }
        for (key, s) in &self.cluster.slices {
            state.insert((Kind::EndpointSlice, key.to_string()), rv(&s.metadata));
        }
        for (name, n) in &self.cluster.nodes {
            state.insert((Kind::Node, format!("/{name}")), rv(&n.metadata));
        }
        state
    }

    async fn assert_converged(&self) {
        assert_eq!(self.cluster_state(), self.server_state().await);
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until the server's request log satisfies `done`.
async fn wait_for_requests(
    server: &ApiServer,
    what: &str,
    done: impl Fn(&[testbed::apiserver::RequestRecord]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if done(&server.requests()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; requests: {:#?}",
            server.requests()
        );
        tokio::time::sleep(POLL).await;
    }
}

fn is_list(r: &testbed::apiserver::RequestRecord, resource: &str) -> bool {
    r.resource == resource && r.verb == "list"
}

/// A list the source made (the test's own lists in `server_state` are unpaged).
fn is_source_list(r: &testbed::apiserver::RequestRecord, resource: &str) -> bool {
    is_list(r, resource) && r.param("limit").as_deref() == Some("500")
}

fn is_watch(r: &testbed::apiserver::RequestRecord, resource: &str) -> bool {
    r.resource == resource && r.verb == "watch"
}

fn services(keys: &[&str]) -> Dirty {
    Dirty::Services(
        keys.iter()
            .map(|name| ObjectKey::new("default", name))
            .collect(),
    )
}

/// The initial lists arrive first, one Replace per kind in Kind::ALL order, even when
/// one kind's list is held up and another kind changes meanwhile; lists are read in
/// pages of 500 with continue tokens.
#[test]
fn initial_lists_come_first_as_one_replace_per_kind() {
    with_server("kube-initial", async |server| {
        populate(server, 1200);
        server.forbid(Kind::Node, true);
        let mut source = Source::start(server).await;
        // Services and slices listed, nodes refused (and retried).
        wait_for_requests(server, "the first lists", |log| {
            log.iter().filter(|r| is_list(r, "services")).count() >= 3
                && log.iter().filter(|r| is_list(r, "endpointslices")).count() >= 3
                && log.iter().any(|r| is_list(r, "nodes"))
        })
        .await;
        server.apply(service("web-0", 8081));
        // The change must wait for the node list: give the source two node retries'
        // time to (wrongly) pass it on.
        let refused = server
            .requests()
            .iter()
            .filter(|r| is_list(r, "nodes"))
            .count();
        wait_for_requests(server, "two more node lists", |log| {
            log.iter().filter(|r| is_list(r, "nodes")).count() >= refused + 2
        })
        .await;
        server.forbid(Kind::Node, false);

        let mut order = Vec::new();
        for _ in 0..4 {
            order.push(kind_and_name(&source.next().await.0));
        }
        assert_eq!(
            order[..3],
            [
                "Replace Service (1200)",
                "Replace EndpointSlice (1200)",
                "Replace Node (2)"
            ]
        );
        // The Service list was taken before the change, so the change follows.
        assert_eq!(order[3], "Apply Service web-0");
        assert!(source.cluster.synced());
        source.assert_converged().await;

        // Pages of 500: three list requests, the later ones with a continue token.
        let service_lists: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| is_source_list(r, "services"))
            .collect();
        assert_eq!(service_lists.len(), 3, "{service_lists:#?}");
        assert!(
            service_lists
                .iter()
                .all(|r| r.param("limit").as_deref() == Some("500"))
        );
        assert!(service_lists[0].param("continue").is_none());
        assert!(
            service_lists[1..]
                .iter()
                .all(|r| r.param("continue").is_some())
        );
    });
}

/// Adds, changes and deletes of each kind arrive as Apply and Delete, dirty the right
/// Services, and the cluster index converges to the server.
#[test]
fn applies_and_deletes_propagate() {
    with_server("kube-changes", async |server| {
        populate(server, 3);
        let mut source = Source::start(server).await;
        source.next_replaces().await;

        server.apply(service("new", 80));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply Service new");
        assert_eq!(dirty, services(&["new"]));

        server.apply(slice("web-1-x1", "web-1", &["192.0.2.10"]));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply EndpointSlice web-1-x1");
        assert_eq!(dirty, services(&["web-1"]));

        assert!(server.delete(Kind::EndpointSlice, "default", "web-2-x1"));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Delete EndpointSlice web-2-x1");
        assert_eq!(dirty, services(&["web-2"]));

        assert!(server.delete(Kind::Service, "default", "web-0"));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Delete Service web-0");
        assert_eq!(dirty, services(&["web-0"]));

        server.apply(node("node-c", "198.51.100.4"));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply Node node-c");
        assert_eq!(dirty, Dirty::All);

        assert!(server.delete(Kind::Node, "", "node-a"));
        let (event, _) = source.next().await;
        assert_eq!(kind_and_name(&event), "Delete Node node-a");

        source.assert_converged().await;
    });
}

/// A 410 Gone (history compacted while the watches were down) forces a relist of every
/// kind; the relist is one Replace per kind, so only the Services that really changed
/// meanwhile are dirty: no delete-then-add of the unchanged ones.
#[test]
fn gone_relists_and_dirties_only_what_changed() {
    with_server("kube-gone", async |server| {
        populate(server, 50);
        let mut source = Source::start(server).await;
        source.next_replaces().await;
        // A watch logged but not yet open would miss the drop, and would get the 410
        // itself when the history goes: its kind would relist without a resumed watch
        // in the log below.
        wait_for_requests(server, "three watches", |_| server.open_watches() == 3).await;
        let requests_before = server.requests().len();

        server.set_available(false);
        server.drop_watches();
        server.apply(slice("web-7-x1", "web-7", &["192.0.2.20"]));
        assert!(server.delete(Kind::Service, "default", "web-9"));
        server.expire_history();
        let compacted = server.resource_version();
        server.set_available(true);

        let (events, dirty) = source.next_replaces().await;
        let mut sorted = events.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "Replace EndpointSlice (50)",
                "Replace Node (2)",
                "Replace Service (49)"
            ],
            "only the three relists, nothing else: {events:?}"
        );
        assert_eq!(dirty, services(&["web-7", "web-9"]));
        source.assert_converged().await;

        // Each kind tried to resume from its old version, got 410, and relisted.
        let log = &server.requests()[requests_before..];
        for resource in ["services", "endpointslices", "nodes"] {
            let resumed = log
                .iter()
                .position(|r| {
                    is_watch(r, resource)
                        && r.param("resourceVersion")
                            .and_then(|v| v.parse::<u64>().ok())
                            .is_some_and(|v| v < compacted)
                })
                .unwrap_or_else(|| panic!("no resumed {resource} watch: {log:#?}"));
            assert!(
                log[resumed..].iter().any(|r| is_source_list(r, resource)),
                "no {resource} relist after the 410: {log:#?}"
            );
        }
    });
}

/// A watch cut while the server is away resumes from its last resourceVersion when the
/// server is back: the change made meanwhile arrives, without a relist.
#[test]
fn dropped_watch_resumes_without_loss_or_relist() {
    with_server("kube-drop", async |server| {
        populate(server, 5);
        let mut source = Source::start(server).await;
        source.next_replaces().await;
        wait_for_requests(server, "three watches", |_| server.open_watches() == 3).await;
        let requests_before = server.requests().len();

        server.set_available(false);
        server.drop_watches();
        server.apply(slice("web-3-x1", "web-3", &["192.0.2.30"]));
        server.set_available(true);

        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply EndpointSlice web-3-x1");
        assert_eq!(dirty, services(&["web-3"]));
        source.assert_converged().await;

        wait_for_requests(server, "three watches again", |_| {
            server.open_watches() == 3
        })
        .await;
        let after = &server.requests()[requests_before..];
        // (`assert_converged` listed through its own client; the source did not list.)
        let source_lists = after
            .iter()
            .filter(|r| r.verb == "list" && r.param("limit").as_deref() == Some("500"))
            .count();
        assert_eq!(source_lists, 0, "the source relisted: {after:#?}");
        assert!(after.iter().any(|r| is_watch(r, "endpointslices")));
    });
}

/// Bookmarks change nothing the agent sees, and a watch resumes from the bookmark's
/// version (so quiet kinds do not fall behind the history and relist).
#[test]
fn bookmarks_are_harmless_and_advance_the_resume_point() {
    with_server("kube-bookmark", async |server| {
        populate(server, 2);
        let mut source = Source::start(server).await;
        source.next_replaces().await;
        let mut resumed_from_bookmark = false;
        // The bookmark must be read before the watch is cut; a few rounds make that
        // certain without relying on timing.
        for round in 0..5 {
            wait_for_requests(server, "three watches", |_| server.open_watches() == 3).await;
            // Move the revision on through another kind only.
            server.apply(node("node-a", &format!("198.51.100.{}", 10 + round)));
            let (event, _) = source.next().await;
            assert_eq!(kind_and_name(&event), "Apply Node node-a");
            let bookmark_rv = server.resource_version();
            server.send_bookmark();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let before = server.requests().len();
            server.drop_watches();
            wait_for_requests(server, "the services watch again", |log| {
                log[before..].iter().any(|r| is_watch(r, "services"))
            })
            .await;
            let rewatch = server.requests()[before..]
                .iter()
                .find(|r| is_watch(r, "services"))
                .cloned()
                .expect("a services watch");
            assert_eq!(
                rewatch.param("allowWatchBookmarks").as_deref(),
                Some("true")
            );
            if rewatch.param("resourceVersion") == Some(bookmark_rv.to_string()) {
                resumed_from_bookmark = true;
                break;
            }
        }
        assert!(resumed_from_bookmark, "no watch resumed from a bookmark");
        server.apply(service("web-1", 8081));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply Service web-1");
        assert_eq!(dirty, services(&["web-1"]));
        let lists = server
            .requests()
            .iter()
            .filter(|r| is_source_list(r, "services"))
            .count();
        assert_eq!(lists, 1, "the bookmarks caused a relist");
        source.assert_converged().await;
    });
}

/// Everything the source and the Event publisher ask of the server is in READS and
/// WRITES (and RBAC built from them would therefore suffice); Events are
/// published once per problem, as Warnings about the object.
#[test]
fn requests_stay_within_required_access_and_events_are_deduplicated() {
    with_server("kube-access", async |server| {
        populate(server, 2);
        let mut source = Source::start(server).await;
        source.next_replaces().await;
        server.apply(service("web-0", 8081));
        source.next().await;

        let publisher = EventPublisher::new(source.client.clone(), "node-a");
        let web0 = ObjectKey::new("default", "web-0");
        let note = "spec.ports[0].targetPort: named port \"metrics\" matches no endpoint port";
        assert!(
            publisher
                .warn(Kind::Service, &web0, "PortUnresolved", note)
                .await
                .expect("publish")
        );
        assert!(
            !publisher
                .warn(Kind::Service, &web0, "PortUnresolved", note)
                .await
                .expect("publish again"),
            "the same problem was published twice"
        );
        assert!(
            publisher
                .warn(Kind::Node, &ObjectKey::new("", "node-b"), "BadAddress", "x")
                .await
                .expect("publish about a node")
        );
        let events = server.events();
        assert_eq!(events.len(), 2, "{events:#?}");
        let event = &events[0];
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("PortUnresolved"));
        assert_eq!(event.note.as_deref(), Some(note));
        assert_eq!(event.metadata.namespace.as_deref(), Some("default"));
        let regarding = event.regarding.as_ref().expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("Service"));
        assert_eq!(regarding.name.as_deref(), Some("web-0"));
        assert_eq!(regarding.namespace.as_deref(), Some("default"));
        assert_eq!(event.reporting_instance.as_deref(), Some("lb-agent-node-a"));
        let node_event = &events[1];
        let regarding = node_event.regarding.as_ref().expect("regarding");
        assert_eq!(regarding.kind.as_deref(), Some("Node"));
        assert_eq!(regarding.namespace, None);

        // Leave out the test's own lists (through `server_state`): none were made.
        let mut used = BTreeSet::new();
        for r in server.requests() {
            let allowed = READS.iter().chain(WRITES).any(|a| {
                a.group == r.group && a.resource == r.resource && a.verbs.contains(&r.verb.as_str())
            });
            assert!(allowed, "request outside READS and WRITES: {r:?}");
            used.insert((r.group, r.resource, r.verb));
        }
        for (group, resource) in [
            ("", "services"),
            ("discovery.k8s.io", "endpointslices"),
            ("", "nodes"),
        ] {
            for verb in ["list", "watch"] {
                assert!(
                    used.contains(&(group.to_owned(), resource.to_owned(), verb.to_owned())),
                    "{verb} {resource} was not used: {used:?}"
                );
            }
        }
        assert!(used.contains(&(
            "events.k8s.io".to_owned(),
            "events".to_owned(),
            "create".to_owned()
        )));
    });
}

fn ingress(name: &str) -> Object {
    let yaml = format!(
        r"apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {name}
  namespace: default
spec:
  ingressClassName: xlb
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: web-0
            port:
              number: 80
"
    );
    Object::Ingress(serde_yaml::from_str::<Ingress>(&yaml).expect("ingress YAML"))
}

fn ingress_class() -> Object {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: xlb\n\
                spec:\n  controller: xlb.dev/ingress-controller\n";
    Object::IngressClass(serde_yaml::from_str::<IngressClass>(yaml).expect("class YAML"))
}

fn secret(name: &str, type_: &str) -> Object {
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: default\n\
         type: {type_}\ndata:\n  tls.crt: Y2VydA==\n  tls.key: a2V5\n  password: aHVudGVyMg==\n"
    );
    Object::Secret(serde_yaml::from_str::<Secret>(&yaml).expect("secret YAML"))
}

/// With `l7`, Ingresses, IngressClasses and Secrets are listed and watched too: TLS
/// and Opaque Secrets (by field selector; an Opaque one keeps only password hashes,
/// here none), never token or registry Secrets; without it none of them is asked for
/// (see `requests_stay_within_required_access...`).
#[test]
fn l7_kinds_are_watched_and_only_tls_and_opaque_secrets_arrive() {
    with_server("kube-l7", async |server| {
        populate(server, 1);
        server.apply_all([
            ingress("shop"),
            ingress_class(),
            secret("shop-tls", "kubernetes.io/tls"),
            secret("db-password", "Opaque"),
            secret("sa-token", "kubernetes.io/service-account-token"),
        ]);
        let mut source = Source::start_with(server, true).await;
        let (replaces, _) = source.next_replaces().await;
        let firsts: Vec<&str> = replaces
            .iter()
            .filter(|r| r.starts_with("Replace"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            firsts,
            [
                "Replace Service (1)",
                "Replace EndpointSlice (1)",
                "Replace Node (2)",
                "Replace Ingress (1)",
                "Replace IngressClass (1)",
                "Replace Secret (2)",
            ]
        );
        assert!(source.cluster.synced());
        let tls = ObjectKey::new("default", "shop-tls");
        let opaque = ObjectKey::new("default", "db-password");
        let keys: Vec<&ObjectKey> = source.cluster.secrets.keys().collect();
        assert_eq!(keys, [&opaque, &tls]);
        assert!(source.cluster.secrets[&opaque].data.is_none());
        let data: Vec<&String> = source.cluster.secrets[&tls]
            .data
            .as_ref()
            .expect("data")
            .keys()
            .collect();
        assert_eq!(data, ["tls.crt", "tls.key"]);

        // Changes: a token Secret never arrives, the TLS one does.
        server.apply(secret("api-token", "kubernetes.io/service-account-token"));
        server.apply(secret("api-tls", "kubernetes.io/tls"));
        let (event, dirty) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply Secret api-tls");
        assert_eq!(dirty, Dirty::None, "an L7 change dirties no Service");

        let secret_requests: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.resource == "secrets")
            .collect();
        assert!(secret_requests.iter().any(|r| r.verb == "watch"));
        for r in &secret_requests {
            assert_eq!(
                r.param("fieldSelector").as_deref(),
                Some(SECRET_FIELD_SELECTOR),
                "{r:?}"
            );
        }
        for r in server.requests() {
            let allowed = READS.iter().chain(L7_READS).any(|a| {
                a.group == r.group && a.resource == r.resource && a.verbs.contains(&r.verb.as_str())
            });
            assert!(allowed, "request outside READS and L7_READS: {r:?}");
        }
    });
}

/// The Ingress status writer's request: a merge patch of the status subresource is
/// stored (only `status`), moves the resourceVersion on and reaches watchers as a
/// change, and the index keeps `status.loadBalancer`.
#[test]
fn ingress_status_patch_is_stored_and_watched() {
    with_server("kube-status", async |server| {
        populate(server, 1);
        server.apply_all([ingress("shop"), ingress_class()]);
        let mut source = Source::start_with(server, true).await;
        source.next_replaces().await;
        let before = server.resource_version();

        let api: Api<Ingress> = Api::namespaced(source.client.clone(), "default");
        let patch = serde_json::json!({
            "spec": { "ingressClassName": "ignored-by-the-status-subresource" },
            "status": { "loadBalancer": { "ingress": [ { "ip": "203.0.113.80" } ] } },
        });
        let patched = api
            .patch_status("shop", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("status patch");
        let rv: u64 = patched
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok())
            .expect("resourceVersion");
        assert!(rv > before);
        let ips = |i: &Ingress| -> Vec<String> {
            i.status
                .iter()
                .flat_map(|s| s.load_balancer.iter())
                .flat_map(|lb| lb.ingress.iter().flatten())
                .filter_map(|i| i.ip.clone())
                .collect()
        };
        assert_eq!(ips(&patched), ["203.0.113.80"]);
        assert_eq!(
            patched
                .spec
                .as_ref()
                .and_then(|s| s.ingress_class_name.as_deref()),
            Some("xlb")
        );

        let (event, _) = source.next().await;
        assert_eq!(kind_and_name(&event), "Apply Ingress shop");
        let stored = &source.cluster.ingresses[&ObjectKey::new("default", "shop")];
        assert_eq!(ips(stored), ["203.0.113.80"]);

        // The same patch again changes nothing; a missing Ingress is 404.
        let again = api
            .patch_status("shop", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("same patch");
        assert_eq!(
            again.metadata.resource_version,
            patched.metadata.resource_version
        );
        let missing = api
            .patch_status("nope", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect_err("no such Ingress");
        assert!(
            matches!(missing, kube::Error::Api(ref s) if s.code == 404),
            "{missing:?}"
        );
        let patch_requests: Vec<_> = server
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .collect();
        assert_eq!(patch_requests.len(), 3);
        assert!(
            patch_requests
                .iter()
                .all(|r| r.resource == "ingresses/status" && r.verb == "patch"),
            "{patch_requests:#?}"
        );
    });
}
