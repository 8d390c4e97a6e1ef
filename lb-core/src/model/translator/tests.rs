//! The incremental translator against translating everything from scratch, and its
//! bookkeeping: relists, Node changes, contested frontends, problems reported once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service, ServicePort,
    ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint as SliceEndpoint, EndpointConditions, EndpointPort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use proptest::prelude::*;

use super::*;
use crate::cluster::{ClusterEvent, Object, SERVICE_NAME_LABEL};
use crate::model::fixtures::{self, ModelView, load};

/// A translator and cluster fed event by event, as the agent runs them.
struct Running {
    cluster: Cluster,
    translator: Translator,
    desired: Desired,
}

impl Running {
    /// Lists every kind once (the first complete state), then translates.
    fn start(objects: &[Object], node_name: &str, flags: &[&str]) -> (Self, Outcome) {
        let mut running = Running {
            cluster: Cluster::default(),
            translator: Translator::new(
                Some(node_name.to_owned()),
                flags.iter().map(|a| a.parse().unwrap()).collect(),
            ),
            desired: Desired::default(),
        };
        for event in fixtures::listed(objects) {
            running.cluster.apply(event);
        }
        // As the agent's source does: the first complete state is translated whole
        // (the node's addresses included).
        let outcome = running.update_with(Dirty::All);
        (running, outcome)
    }

    fn apply(&mut self, event: ClusterEvent) -> Outcome {
        let dirty = self.cluster.apply(event);
        self.update_with(dirty)
    }

    fn update_with(&mut self, dirty: Dirty) -> Outcome {
        let before = self.desired.clone();
        let outcome = self
            .translator
            .update(&self.cluster, dirty, &mut self.desired);
        assert_eq!(
            outcome.changed,
            before != self.desired,
            "Outcome.changed must say exactly whether the desired state changed"
        );
        outcome
    }

    fn model(&self, name: &str) -> ModelView {
        ModelView::of(
            self.desired
                .services
                .get(name)
                .unwrap_or_else(|| panic!("no {name} in {:?}", self.desired.services.keys())),
        )
    }
}

fn service_of(objects: &[Object], name: &str) -> Service {
    objects
        .iter()
        .find_map(|o| match o {
            Object::Service(s) if s.metadata.name.as_deref() == Some(name) => Some(s.clone()),
            _ => None,
        })
        .unwrap()
}

fn slice_of(objects: &[Object], name: &str) -> EndpointSlice {
    objects
        .iter()
        .find_map(|o| match o {
            Object::EndpointSlice(s) if s.metadata.name.as_deref() == Some(name) => Some(s.clone()),
            _ => None,
        })
        .unwrap()
}

fn problems(outcome: &Outcome) -> Vec<String> {
    outcome.problems.iter().map(ToString::to_string).collect()
}

// --- Cases from the fixtures ----------------------------------------------------------

/// A relist (after a reconnect or a 410 Gone) returns the same objects with new
/// resourceVersions: nothing is translated again, nothing changes, nothing is reported.
#[test]
fn relist_of_unchanged_objects_changes_nothing() {
    let mut objects = Vec::new();
    for file in [
        "kube-dns.yaml",
        "traffic-policy.yaml",
        "nodeport.yaml",
        "bad-objects.yaml",
    ] {
        objects.extend(load(file));
    }
    let (mut running, first) = Running::start(&objects, "node-a", &[]);
    assert!(first.changed);
    assert!(!first.problems.is_empty());
    let before = running.desired.clone();
    for object in &mut objects {
        let meta = object.meta_mut();
        meta.resource_version = Some("999999".into());
    }
    for (kind, event) in Kind::ALL.into_iter().zip(fixtures::listed(&objects)) {
        let outcome = running.apply(event);
        assert!(!outcome.changed, "{kind}");
        assert!(
            outcome.problems.is_empty(),
            "{kind}: {:?}",
            outcome.problems
        );
    }
    assert_eq!(running.desired, before);
}

/// A change the translation does not read (a Pod's zone, a Service's status
/// conditions, a Node's heartbeat) changes nothing downstream.
#[test]
fn irrelevant_changes_change_nothing() {
    let objects = load("nodeport.yaml");
    let (mut running, _) = Running::start(&objects, "node-a", &[]);
    let mut slice = slice_of(&objects, "web-np-5lq2x");
    slice.endpoints[0].zone = Some("zone-z".into());
    assert!(
        !running
            .apply(ClusterEvent::Apply(Object::EndpointSlice(slice)))
            .changed
    );
    let mut svc = service_of(&objects, "web-np");
    svc.metadata.labels = Some([("team".to_owned(), "web".to_owned())].into());
    assert!(
        !running
            .apply(ClusterEvent::Apply(Object::Service(svc)))
            .changed
    );
    let Object::Node(mut node) = objects[0].clone() else {
        panic!()
    };
    node.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_heartbeat_time = None;
    assert!(
        !running
            .apply(ClusterEvent::Apply(Object::Node(node)))
            .changed
    );
}

/// The Node object's addresses feed NodePort frontends: a changed InternalIP moves them
/// (every Service is translated again); `--node-address` flags pin them.
/// https://kubernetes.io/docs/reference/node/node-status/#addresses
#[test]
fn node_change_re_resolves_node_port_addresses() {
    let objects = load("nodeport.yaml");
    let (mut running, _) = Running::start(&objects, "node-a", &[]);
    assert_eq!(
        running.model("shop/web-np:http/tcp").frontends,
        [
            "tcp 203.0.113.22:80",
            "tcp 203.0.113.201:30080",
            "tcp 203.0.113.221:30080"
        ]
    );
    let Object::Node(mut node) = objects[0].clone() else {
        panic!()
    };
    assert_eq!(node.metadata.name.as_deref(), Some("node-a"));
    node.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = "203.0.113.205".into();
    let outcome = running.apply(ClusterEvent::Apply(Object::Node(node.clone())));
    assert!(outcome.changed);
    assert_eq!(
        running.model("shop/web-np:http/tcp").frontends,
        [
            "tcp 203.0.113.22:80",
            "tcp 203.0.113.205:30080",
            "tcp 203.0.113.221:30080"
        ]
    );
    // Another node's change moves nothing here.
    let Object::Node(mut other) = objects[1].clone() else {
        panic!()
    };
    other.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = "203.0.113.209".into();
    assert!(
        !running
            .apply(ClusterEvent::Apply(Object::Node(other)))
            .changed
    );
    // Our Node deleted: no NodePort address left.
    let outcome = running.apply(ClusterEvent::Delete(Object::Node(node.clone())));
    assert!(outcome.changed);
    assert_eq!(
        running.model("shop/web-np:http/tcp").frontends,
        ["tcp 203.0.113.22:80"]
    );

    let (mut pinned, _) = Running::start(&objects, "node-a", &["203.0.113.250"]);
    let outcome = pinned.apply(ClusterEvent::Apply(Object::Node(node)));
    assert!(!outcome.changed);
    assert_eq!(
        pinned.model("shop/web-np:http/tcp").frontends,
        ["tcp 203.0.113.22:80", "tcp 203.0.113.250:30080"]
    );
}

/// Two Services claim 203.0.113.180:80/TCP: `shop/a-web` sorts first and serves it;
/// `shop/b-web` keeps its other frontends and gets one problem, reported once while the
/// conflict lasts; when `a-web` goes, `b-web` takes over; when it comes back, `b-web`
/// yields again and is told again.
#[test]
fn contested_frontend_goes_to_the_service_sorting_first() {
    let objects = load("conflict.yaml");
    let (mut running, first) = Running::start(&objects, "node-a", &[]);
    let conflict = "Service shop/b-web: spec: TCP 203.0.113.180:80 is also claimed by Service \
                    shop/a-web, which serves it";
    assert_eq!(problems(&first), [conflict]);
    assert_eq!(
        running.model("shop/a-web:http/tcp").frontends,
        ["tcp 203.0.113.84:80", "tcp 203.0.113.180:80"]
    );
    assert_eq!(
        running.model("shop/b-web:http/tcp").frontends,
        ["tcp 203.0.113.85:80", "tcp 203.0.113.181:80"]
    );

    // b-web's endpoints change: translated again, but the conflict is not news.
    let mut slice = slice_of(&objects, "b-web-m6n8b");
    slice.endpoints[0].addresses[0] = "192.0.2.83".into();
    let outcome = running.apply(ClusterEvent::Apply(Object::EndpointSlice(slice)));
    assert!(outcome.changed);
    assert_eq!(problems(&outcome), Vec::<String>::new());
    assert_eq!(
        running.model("shop/b-web:http/tcp").backends,
        ["192.0.2.83:8080 w1"]
    );

    let a_web = service_of(&objects, "a-web");
    let outcome = running.apply(ClusterEvent::Delete(Object::Service(a_web.clone())));
    assert!(outcome.changed);
    assert_eq!(problems(&outcome), Vec::<String>::new());
    assert!(!running.desired.services.contains_key("shop/a-web:http/tcp"));
    assert_eq!(
        running.model("shop/b-web:http/tcp").frontends,
        [
            "tcp 203.0.113.85:80",
            "tcp 203.0.113.180:80",
            "tcp 203.0.113.181:80"
        ]
    );

    let outcome = running.apply(ClusterEvent::Apply(Object::Service(a_web)));
    assert_eq!(problems(&outcome), [conflict]);
    assert_eq!(
        running.model("shop/b-web:http/tcp").frontends,
        ["tcp 203.0.113.85:80", "tcp 203.0.113.181:80"]
    );
}

/// A bad field is reported when it appears, not again on every later translation of
/// its object, and again if it comes back after being fixed.
#[test]
fn problems_are_reported_once_while_they_last() {
    let objects = load("bad-objects.yaml");
    let (mut running, first) = Running::start(&objects, "node-a", &[]);
    let external_ip = "Service shop/messy: spec.externalIPs[1]: 2001:db8:e::196 is IPv6, but the \
                       Service has no IPv6 cluster IP";
    assert!(
        problems(&first).contains(&external_ip.to_owned()),
        "{first:?}"
    );
    assert_eq!(first.problems.len(), 13, "{:#?}", first.problems);

    // An endpoint change translates shop/messy again: nothing new to report.
    let mut slice = slice_of(&objects, "messy-a");
    slice.endpoints[0].addresses[0] = "192.0.2.249".into();
    let outcome = running.apply(ClusterEvent::Apply(Object::EndpointSlice(slice)));
    assert!(outcome.changed);
    assert_eq!(problems(&outcome), Vec::<String>::new());

    // Fixed, then broken again.
    let messy = service_of(&objects, "messy");
    let mut fixed = messy.clone();
    fixed.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.196".into()]);
    assert_eq!(
        problems(&running.apply(ClusterEvent::Apply(Object::Service(fixed)))),
        Vec::<String>::new()
    );
    assert_eq!(
        problems(&running.apply(ClusterEvent::Apply(Object::Service(messy)))),
        [external_ip]
    );
}

/// ExternalName targets and healthCheckNodePorts are kept for the L7 hop and the health
/// listener.
#[test]
fn external_names_and_health_checks() {
    let mut objects = load("headless-externalname.yaml");
    objects.extend(load("traffic-policy.yaml"));
    let (running, _) = Running::start(&objects, "node-a", &[]);
    assert_eq!(
        running.translator.external_names(),
        BTreeMap::from([(
            ObjectKey::new("shop", "payments"),
            "payments.example.com".into()
        )])
    );
    assert_eq!(
        running.translator.health_checks(),
        BTreeMap::from([(32000, (ObjectKey::new("shop", "ingress"), 2))])
    );
}

// --- Incremental = from scratch -------------------------------------------------------

const SERVICES: [&str; 3] = ["a", "b", "c"];
const SLICES: [&str; 4] = ["e0", "e1", "e2", "e3"];
const NODES: [&str; 2] = ["node-a", "node-b"];

fn meta(name: &str, namespaced: bool) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: namespaced.then(|| "p".to_owned()),
        resource_version: Some("1".to_owned()),
        ..ObjectMeta::default()
    }
}

fn subset<T: Clone + std::fmt::Debug>(items: &'static [T]) -> impl Strategy<Value = Vec<T>> {
    proptest::sample::subsequence(items, 0..=items.len())
}

/// Services from a small pool of addresses and ports, so they collide: shared cluster
/// IPs, external IPs, load-balancer IPs and NodePorts.
fn service() -> impl Strategy<Value = Object> {
    (
        0..SERVICES.len(),
        prop_oneof![
            4 => Just("ClusterIP"),
            2 => Just("NodePort"),
            3 => Just("LoadBalancer"),
            1 => Just("ExternalName"),
            1 => Just("headless"),
        ],
        subset(&["203.0.113.1", "203.0.113.2", "2001:db8:c::1"]),
        subset(&[
            ("http", "TCP", 80, 30080),
            ("dns", "UDP", 53, 30053),
            ("alt", "TCP", 80, 30081),
        ]),
        subset(&["203.0.113.180", "203.0.113.181", "2001:db8:e::180"]),
        subset(&["203.0.113.110", "203.0.113.111"]),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                i,
                type_,
                cluster_ips,
                ports,
                external_ips,
                ingress,
                (etp, itp, affinity, ranges, table),
            )| {
                let headless = type_ == "headless";
                let type_ = if headless { "ClusterIP" } else { type_ };
                let mut m = meta(SERVICES[i], true);
                if table {
                    m.annotations = Some([(TABLE_SIZE.to_owned(), "4093".to_owned())].into());
                }
                let spec = ServiceSpec {
                    type_: Some(type_.to_owned()),
                    cluster_ips: Some(if headless {
                        vec!["None".to_owned()]
                    } else {
                        cluster_ips.iter().map(|s| (*s).to_owned()).collect()
                    }),
                    external_name: (type_ == "ExternalName").then(|| "db.example.com".to_owned()),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(name, proto, port, node_port)| ServicePort {
                                name: Some((*name).to_owned()),
                                protocol: Some((*proto).to_owned()),
                                port: *port,
                                node_port: (type_ != "ClusterIP").then_some(*node_port),
                                ..ServicePort::default()
                            })
                            .collect(),
                    ),
                    external_ips: Some(external_ips.iter().map(|s| (*s).to_owned()).collect()),
                    external_traffic_policy: Some(if etp { "Local" } else { "Cluster" }.to_owned()),
                    internal_traffic_policy: Some(if itp { "Local" } else { "Cluster" }.to_owned()),
                    health_check_node_port: (type_ == "LoadBalancer" && etp)
                        .then_some(32000 + i32::try_from(i).unwrap()),
                    session_affinity: Some(if affinity { "ClientIP" } else { "None" }.to_owned()),
                    load_balancer_source_ranges: ranges.then(|| vec!["198.51.100.0/24".to_owned()]),
                    ..ServiceSpec::default()
                };
                let status = ServiceStatus {
                    load_balancer: Some(LoadBalancerStatus {
                        ingress: Some(
                            ingress
                                .iter()
                                .map(|ip| LoadBalancerIngress {
                                    ip: Some((*ip).to_owned()),
                                    ..LoadBalancerIngress::default()
                                })
                                .collect(),
                        ),
                    }),
                    ..ServiceStatus::default()
                };
                Object::Service(Service {
                    metadata: m,
                    spec: Some(spec),
                    status: Some(status),
                })
            },
        )
}

const TABLE_SIZE: &str = crate::model::kubernetes::TABLE_SIZE_ANNOTATION;

/// EndpointSlices whose owner label moves between Services (or disappears).
fn slice() -> impl Strategy<Value = Object> {
    let endpoint = (0..3usize, 0..8u8, 0..3usize);
    (
        0..SLICES.len(),
        0..=SERVICES.len(),
        any::<bool>(),
        subset(&[
            ("http", "TCP", 8080),
            ("dns", "UDP", 5353),
            ("alt", "TCP", 8081),
        ]),
        proptest::collection::vec(endpoint, 0..4),
        proptest::option::of(0..3u32),
    )
        .prop_map(|(i, owner, v6, ports, endpoints, weight)| {
            let mut m = meta(SLICES[i], true);
            if let Some(service) = SERVICES.get(owner) {
                m.labels = Some([(SERVICE_NAME_LABEL.to_owned(), (*service).to_owned())].into());
            }
            if let Some(w) = weight {
                m.annotations = Some(
                    [(
                        crate::model::kubernetes::WEIGHT_ANNOTATION.to_owned(),
                        w.to_string(),
                    )]
                    .into(),
                );
            }
            Object::EndpointSlice(EndpointSlice {
                address_type: if v6 { "IPv6" } else { "IPv4" }.to_owned(),
                endpoints: endpoints
                    .iter()
                    .map(|(host, conditions, node)| SliceEndpoint {
                        addresses: vec![if v6 {
                            format!("2001:db8:b::{}", host + 1)
                        } else {
                            format!("192.0.2.{}", host + 1)
                        }],
                        conditions: Some(EndpointConditions {
                            ready: Some(conditions & 1 != 0),
                            serving: Some(conditions & 2 != 0),
                            terminating: Some(conditions & 4 != 0),
                        }),
                        node_name: NODES.get(*node).map(|n| (*n).to_owned()),
                        ..SliceEndpoint::default()
                    })
                    .collect(),
                metadata: m,
                ports: Some(
                    ports
                        .iter()
                        .map(|(name, proto, port)| EndpointPort {
                            name: Some((*name).to_owned()),
                            protocol: Some((*proto).to_owned()),
                            port: Some(*port),
                            ..EndpointPort::default()
                        })
                        .collect(),
                ),
            })
        })
}

fn node_object() -> impl Strategy<Value = Object> {
    (
        0..NODES.len(),
        subset(&[
            ("InternalIP", "203.0.113.201"),
            ("InternalIP", "203.0.113.202"),
            ("ExternalIP", "203.0.113.221"),
            ("InternalIP", "2001:db8:d::1"),
        ]),
    )
        .prop_map(|(i, addresses)| {
            Object::Node(Node {
                metadata: meta(NODES[i], false),
                spec: None,
                status: Some(NodeStatus {
                    addresses: Some(
                        addresses
                            .iter()
                            .map(|(type_, address)| NodeAddress {
                                type_: (*type_).to_owned(),
                                address: (*address).to_owned(),
                            })
                            .collect(),
                    ),
                    ..NodeStatus::default()
                }),
            })
        })
}

fn object() -> impl Strategy<Value = Object> {
    prop_oneof![4 => service(), 5 => slice(), 1 => node_object()]
}

fn of_kind(kind: Kind) -> BoxedStrategy<Object> {
    match kind {
        Kind::Service => service().boxed(),
        Kind::EndpointSlice => slice().boxed(),
        Kind::Node => node_object().boxed(),
        other => unreachable!("no L7 objects here: {other}"),
    }
}

fn event() -> impl Strategy<Value = ClusterEvent> {
    let kind = prop_oneof![
        Just(Kind::Service),
        Just(Kind::EndpointSlice),
        Just(Kind::Node)
    ];
    prop_oneof![
        6 => object().prop_map(ClusterEvent::Apply),
        3 => object().prop_map(ClusterEvent::Delete),
        1 => kind.prop_flat_map(|k| {
            proptest::collection::vec(of_kind(k), 0..5)
                .prop_map(move |objects| ClusterEvent::Replace(k, objects))
        }),
    ]
}

type Truth = BTreeMap<(Kind, String), Object>;

fn key_of(object: &Object) -> (Kind, String) {
    let meta = object.meta();
    (object.kind(), meta.name.clone().unwrap_or_default())
}

/// What the cluster holds after `event`, kept without the index under test.
fn follow(truth: &mut Truth, event: &ClusterEvent) {
    match event {
        ClusterEvent::Apply(o) => {
            truth.insert(key_of(o), o.clone());
        }
        ClusterEvent::Delete(o) => {
            truth.remove(&key_of(o));
        }
        ClusterEvent::Replace(kind, objects) => {
            truth.retain(|(k, _), _| k != kind);
            for o in objects {
                truth.insert(key_of(o), o.clone());
            }
        }
    }
}

/// Everything translated at once by a new translator from a new cluster.
fn from_scratch(truth: &Truth, flags: &[IpAddr]) -> (Desired, Translator) {
    let cluster = fixtures::cluster(&truth.values().cloned().collect::<Vec<_>>());
    let mut translator = Translator::new(Some("node-a".into()), flags.to_vec());
    let mut desired = Desired::default();
    translator.update(&cluster, Dirty::All, &mut desired);
    (desired, translator)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    /// After any sequence of changes, the incrementally kept state is exactly what
    /// translating everything from scratch gives, `changed` says exactly whether it
    /// changed, and every model's frontends belong to it alone.
    #[test]
    fn incremental_equals_from_scratch(
        initial in proptest::collection::vec(object(), 0..8),
        events in proptest::collection::vec(event(), 1..24),
        pinned in any::<bool>(),
    ) {
        let flags: Vec<IpAddr> = if pinned { vec!["203.0.113.250".parse().unwrap()] } else { Vec::new() };
        let flag_text: Vec<String> = flags.iter().map(ToString::to_string).collect();
        let flag_refs: Vec<&str> = flag_text.iter().map(String::as_str).collect();
        let mut truth = Truth::new();
        for o in &initial {
            truth.insert(key_of(o), o.clone());
        }
        let (mut running, _) = Running::start(&truth.values().cloned().collect::<Vec<_>>(), "node-a", &flag_refs);
        for event in events {
            follow(&mut truth, &event);
            running.apply(event); // also checks `changed`
            let (fresh, fresh_translator) = from_scratch(&truth, &flags);
            prop_assert_eq!(&running.desired, &fresh);
            prop_assert_eq!(running.translator.health_checks(), fresh_translator.health_checks());
            prop_assert_eq!(running.translator.external_names(), fresh_translator.external_names());
            let mut seen = BTreeSet::new();
            for model in running.desired.services.values() {
                for f in &model.frontends {
                    prop_assert!(seen.insert(*f), "frontend {:?} in two models", f);
                }
                prop_assert!(!model.frontends.is_empty());
            }
        }
    }
}
