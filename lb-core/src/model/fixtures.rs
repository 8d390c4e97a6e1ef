//! Test support: Kubernetes objects from the YAML fixtures in
//! `lb-core/tests/fixtures/kubernetes/` (the shapes `kubectl get -o yaml` prints), and
//! a compact view of what a Service translates to, so each case reads in a few lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::Index;
use std::path::PathBuf;

use serde::Deserialize;

use super::kubernetes::{NodeInfo, Translation, translate};
use super::{ServiceModel, WhenEmpty};
use crate::cluster::{Cluster, ClusterEvent, Kind, Object, ObjectKey};
use crate::config::Protocol;

pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kubernetes")
}

/// The objects of a YAML text: documents that are objects or `kind: List`s of them.
pub fn parse(yaml: &str) -> Vec<Object> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(document).expect("YAML");
        push(&value, &mut out);
    }
    out
}

fn push(value: &serde_yaml::Value, out: &mut Vec<Object>) {
    match value["kind"].as_str() {
        _ if value.is_null() => {}
        Some("List") => {
            for item in value["items"].as_sequence().into_iter().flatten() {
                push(item, out);
            }
        }
        Some("Service") => out.push(Object::Service(typed(value))),
        Some("EndpointSlice") => out.push(Object::EndpointSlice(typed(value))),
        Some("Node") => out.push(Object::Node(typed(value))),
        Some("Ingress") => out.push(Object::Ingress(typed(value))),
        Some("IngressClass") => out.push(Object::IngressClass(typed(value))),
        Some("Secret") => out.push(Object::Secret(typed(value))),
        kind => panic!("unexpected {kind:?} {:?}", value["metadata"]["name"]),
    }
}

fn typed<T: serde::de::DeserializeOwned>(value: &serde_yaml::Value) -> T {
    T::deserialize(value)
        .unwrap_or_else(|e| panic!("{:?} {:?}: {e}", value["kind"], value["metadata"]["name"]))
}

/// The objects of one fixture file.
pub fn load(name: &str) -> Vec<Object> {
    let path = dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse(&text)
}

/// The events that list each kind of `objects` completely once (as a source does
/// before the agent acts), in the order of [`Kind::ALL`].
pub fn listed(objects: &[Object]) -> impl Iterator<Item = ClusterEvent> + '_ {
    Kind::ALL.into_iter().map(|kind| {
        let of_kind = objects
            .iter()
            .filter(|o| o.kind() == kind)
            .cloned()
            .collect();
        ClusterEvent::Replace(kind, of_kind)
    })
}

/// A cluster holding `objects`, each kind listed completely once (as a source does
/// before the agent acts).
pub fn cluster(objects: &[Object]) -> Cluster {
    let mut cluster = Cluster::default();
    for event in listed(objects) {
        cluster.apply(event);
    }
    assert!(cluster.synced());
    cluster
}

/// This node as named, with NodePort addresses given as flags.
pub fn node(name: &str, addresses: &[&str]) -> NodeInfo {
    NodeInfo {
        name: Some(name.to_owned()),
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        snat_addresses: Vec::new(),
        lb_mode: crate::mode::LbMode::default(),
    }
}

/// Translates the Service `namespace/name` of `cluster` with its EndpointSlices.
pub fn translate_in(cluster: &Cluster, service: &str, node: &NodeInfo) -> View {
    let (namespace, name) = service.split_once('/').expect("namespace/name");
    let key = ObjectKey::new(namespace, name);
    let svc = cluster
        .services
        .get(&key)
        .unwrap_or_else(|| panic!("no Service {service} in the fixture"));
    View::of(&translate(svc, &cluster.slices_of(&key), node))
}

/// Loads a fixture and translates one of its Services.
pub fn translate_fixture(file: &str, service: &str, node: &NodeInfo) -> View {
    translate_in(&cluster(&load(file)), service, node)
}

/// A translation as text, for short assertions.
#[derive(Debug)]
pub struct View {
    pub models: BTreeMap<String, ModelView>,
    /// `Kind namespace/name: field: reason`.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
    /// healthCheckNodePort and the local endpoint count it reports.
    pub health_check: Option<(u16, usize)>,
    pub external_name: Option<String>,
}

/// One `ServiceModel` as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelView {
    /// `tcp 203.0.113.10:80`, sorted.
    pub frontends: Vec<String>,
    /// `192.0.2.11:8080 w1` (address, port, Maglev weight), sorted.
    pub backends: Vec<String>,
    pub when_empty: WhenEmpty,
    pub ranges: Vec<String>,
    pub affinity_s: Option<u32>,
    pub table_size: u32,
}

impl ModelView {
    pub fn of(model: &ServiceModel) -> Self {
        ModelView {
            frontends: model
                .frontends
                .iter()
                .map(|f| {
                    let proto = match f.protocol {
                        Protocol::Tcp => "tcp",
                        Protocol::Udp => "udp",
                    };
                    let scope = if f.in_cluster { " in-cluster" } else { "" };
                    format!(
                        "{proto} {}{scope}",
                        std::net::SocketAddr::new(f.address, f.port)
                    )
                })
                .collect(),
            backends: model
                .backends
                .iter()
                .map(|(e, b)| format!("{e} w{}", b.weight))
                .collect(),
            when_empty: model.when_empty,
            ranges: model
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect(),
            affinity_s: model.affinity_timeout_s,
            table_size: model.table_size,
        }
    }
}

impl View {
    pub fn of(t: &Translation) -> Self {
        View {
            models: t
                .services
                .iter()
                .map(|(name, m)| (name.clone(), ModelView::of(m)))
                .collect(),
            problems: t.problems.iter().map(ToString::to_string).collect(),
            notes: t.notes.clone(),
            health_check: t.health_check.as_ref().map(|h| (h.port, h.local_endpoints)),
            external_name: t.external_name.clone(),
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.models.keys().map(String::as_str).collect()
    }
}

impl Index<&str> for View {
    type Output = ModelView;

    fn index(&self, name: &str) -> &ModelView {
        self.models.get(name).unwrap_or_else(|| {
            let mut known = String::new();
            for n in self.models.keys() {
                let _ = write!(known, "\n  {n}");
            }
            panic!("no model {name}; the translation has:{known}")
        })
    }
}
