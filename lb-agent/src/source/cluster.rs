//! The Kubernetes objects the agent translates, as both Kubernetes sources (`--kube`
//! and `--manifests`) deliver them, and the index that tells which Services a change
//! touches. Objects are stored stripped of what the translation never reads.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One object of a kind the agent reads.
// Moved once from a source to the index; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        })
    }
}

/// What a source reports. A source sends `Replace` for every kind once its first
/// complete list is in (and again after every relist: a 410 Gone, a reconnect, a
/// reloaded manifests directory); the agent acts only after all kinds were replaced once.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// Added or modified.
    Apply(Object),
    Delete(Object),
    /// The complete current list of one kind: every object of that kind not in it is gone.
    Replace(Kind, Vec<Object>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Node(_) => Kind::Node,
        }
    }

    fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
        }
    }

    /// Drops what the translation never reads (managed fields, the last-applied
    /// annotation, a Node's images and conditions), so memory tracks what matters.
    pub fn strip(&mut self) {
        let meta = self.meta_mut();
        meta.managed_fields = None;
        if let Some(annotations) = meta.annotations.as_mut() {
            annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        if let Object::Node(node) = self {
            node.spec = None;
            if let Some(status) = node.status.as_mut() {
                let addresses = status.addresses.take();
                *status = k8s_openapi::api::core::v1::NodeStatus {
                    addresses,
                    ..Default::default()
                };
            }
        }
    }
}

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The key of an object's metadata (namespace `default` when unset, as for a
    /// manifest without one).
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjectKey {
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| "default".to_owned()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which Services need translating again after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dirty {
    None,
    Services(BTreeSet<ObjectKey>),
    /// A Node changed: NodePort addresses and locality may change for every Service.
    All,
}

impl Dirty {
    fn add(&mut self, key: ObjectKey) {
        match self {
            Dirty::None => *self = Dirty::Services(BTreeSet::from([key])),
            Dirty::Services(keys) => {
                keys.insert(key);
            }
            Dirty::All => {}
        }
    }

    pub fn merge(&mut self, other: Dirty) {
        match other {
            Dirty::None => {}
            Dirty::All => *self = Dirty::All,
            Dirty::Services(keys) => {
                for key in keys {
                    self.add(key);
                }
            }
        }
    }
}

/// Every object the sources delivered, indexed by what the translation looks up.
#[derive(Debug, Default)]
pub struct Cluster {
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    /// EndpointSlices by their own key.
    pub slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    /// Slice keys by the Service they name (label `kubernetes.io/service-name`).
    by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    replaced: BTreeSet<Kind>,
}

impl Cluster {
    /// True once every kind was listed completely at least once.
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.replaced.contains(k))
    }

    /// The slices that belong to a Service.
    pub fn slices_of(&self, service: &ObjectKey) -> Vec<&EndpointSlice> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.slices.get(key).map(AsRef::as_ref))
            .collect()
    }

    /// Applies one event; returns the Services whose translation may have changed.
    /// An object that is unchanged (same content) dirties nothing, so a relist after a
    /// reconnect rewrites nothing.
    pub fn apply(&mut self, event: ClusterEvent) -> Dirty {
        match event {
            ClusterEvent::Apply(mut object) => {
                object.strip();
                self.upsert(object)
            }
            ClusterEvent::Delete(object) => self.remove(&object),
            ClusterEvent::Replace(kind, objects) => {
                self.replaced.insert(kind);
                let mut dirty = Dirty::None;
                let mut seen = BTreeSet::new();
                let mut seen_nodes = BTreeSet::new();
                for mut object in objects {
                    if object.kind() != kind {
                        continue;
                    }
                    object.strip();
                    match &object {
                        Object::Service(o) => {
                            seen.insert(ObjectKey::of(&o.metadata));
                        }
                        Object::EndpointSlice(o) => {
                            seen.insert(ObjectKey::of(&o.metadata));
                        }
                        Object::Node(o) => {
                            seen_nodes.insert(o.metadata.name.clone().unwrap_or_default());
                        }
                    }
                    dirty.merge(self.upsert(object));
                }
                match kind {
                    Kind::Service => {
                        let gone: Vec<_> = self
                            .services
                            .keys()
                            .filter(|k| !seen.contains(*k))
                            .cloned()
                            .collect();
                        for key in gone {
                            self.services.remove(&key);
                            dirty.add(key);
                        }
                    }
                    Kind::EndpointSlice => {
                        let gone: Vec<_> = self
                            .slices
                            .keys()
                            .filter(|k| !seen.contains(*k))
                            .cloned()
                            .collect();
                        for key in gone {
                            if let Some(owner) = self.remove_slice(&key) {
                                dirty.add(owner);
                            }
                        }
                    }
                    Kind::Node => {
                        let before = self.nodes.len();
                        self.nodes.retain(|name, _| seen_nodes.contains(name));
                        if self.nodes.len() != before {
                            dirty = Dirty::All;
                        }
                    }
                }
                dirty
            }
        }
    }

    fn upsert(&mut self, object: Object) -> Dirty {
        match object {
            Object::Service(mut svc) => {
                let key = ObjectKey::of(&svc.metadata);
                if self
                    .services
                    .get(&key)
                    .is_some_and(|old| same(old.as_ref(), &mut svc))
                {
                    return Dirty::None;
                }
                self.services.insert(key.clone(), Arc::new(svc));
                Dirty::Services(BTreeSet::from([key]))
            }
            Object::EndpointSlice(mut slice) => {
                let key = ObjectKey::of(&slice.metadata);
                if self
                    .slices
                    .get(&key)
                    .is_some_and(|old| same(old.as_ref(), &mut slice))
                {
                    return Dirty::None;
                }
                let mut dirty = Dirty::None;
                // The service label may change: the old owner loses the slice.
                if let Some(old_owner) = self.remove_slice(&key) {
                    dirty.add(old_owner);
                }
                if let Some(owner) = owner_of(&slice) {
                    self.by_service
                        .entry(owner.clone())
                        .or_default()
                        .insert(key.clone());
                    dirty.add(owner);
                }
                self.slices.insert(key, Arc::new(slice));
                dirty
            }
            Object::Node(mut node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                if self
                    .nodes
                    .get(&name)
                    .is_some_and(|old| same(old.as_ref(), &mut node))
                {
                    return Dirty::None;
                }
                self.nodes.insert(name, Arc::new(node));
                Dirty::All
            }
        }
    }

    fn remove(&mut self, object: &Object) -> Dirty {
        match object {
            Object::Service(svc) => {
                let key = ObjectKey::of(&svc.metadata);
                if self.services.remove(&key).is_some() {
                    Dirty::Services(BTreeSet::from([key]))
                } else {
                    Dirty::None
                }
            }
            Object::EndpointSlice(slice) => {
                let key = ObjectKey::of(&slice.metadata);
                match self.remove_slice(&key) {
                    Some(owner) => Dirty::Services(BTreeSet::from([owner])),
                    None => Dirty::None,
                }
            }
            Object::Node(node) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                if self.nodes.remove(&name).is_some() {
                    Dirty::All
                } else {
                    Dirty::None
                }
            }
        }
    }

    /// Removes a slice; returns the Service it belonged to.
    fn remove_slice(&mut self, key: &ObjectKey) -> Option<ObjectKey> {
        let old = self.slices.remove(key)?;
        let owner = owner_of(&old)?;
        if let Some(set) = self.by_service.get_mut(&owner) {
            set.remove(key);
            if set.is_empty() {
                self.by_service.remove(&owner);
            }
        }
        Some(owner)
    }
}

/// The Service an EndpointSlice belongs to, from its label.
pub fn owner_of(slice: &EndpointSlice) -> Option<ObjectKey> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
    Some(ObjectKey::new(namespace, name))
}

/// Same content, ignoring `resourceVersion` (which changes on every write, even when a
/// relist returns an object nothing changed in). Compares in place: `new` borrows the
/// old version for the comparison and gets its own back.
fn same<T>(old: &T, new: &mut T) -> bool
where
    T: PartialEq + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    let own = std::mem::replace(
        &mut new.metadata_mut().resource_version,
        old.metadata().resource_version.clone(),
    );
    let equal = old == new;
    new.metadata_mut().resource_version = own;
    equal
}
