//! The Kubernetes objects the agent translates, as both Kubernetes sources (`--kube`
//! and `--manifests`) deliver them, and the index that tells which Services a change
//! touches. Objects are stored stripped of what the translation never reads.
//!
//! The L7 kinds (Ingress, IngressClass, Secret) are watched only with `--l7`; an index
//! made with [`Cluster::new`]`(true)` waits for them too before it counts as synced.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The only Secret type the L7 hop reads; the kube source watches no other.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// One object of a kind the agent reads.
// Moved once from a source to the index; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
    Ingress(Ingress),
    IngressClass(IngressClass),
    Secret(Secret),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    Ingress,
    IngressClass,
    Secret,
}

impl Kind {
    /// What the L4 translation reads: every agent watches these.
    pub const L4: [Kind; 3] = [Kind::Service, Kind::EndpointSlice, Kind::Node];
    /// What only the L7 hop reads (with Services and EndpointSlices).
    pub const L7: [Kind; 3] = [Kind::Ingress, Kind::IngressClass, Kind::Secret];
    pub const ALL: [Kind; 6] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::Ingress,
        Kind::IngressClass,
        Kind::Secret,
    ];

    /// The kinds whose changes make the L7 snapshot stale.
    pub fn feeds_l7(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::Ingress => "Ingress",
            Kind::IngressClass => "IngressClass",
            Kind::Secret => "Secret",
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
            Object::Ingress(_) => Kind::Ingress,
            Object::IngressClass(_) => Kind::IngressClass,
            Object::Secret(_) => Kind::Secret,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
            Object::Ingress(o) => &o.metadata,
            Object::IngressClass(o) => &o.metadata,
            Object::Secret(o) => &o.metadata,
        }
    }

    pub fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Service(o) => &mut o.metadata,
            Object::EndpointSlice(o) => &mut o.metadata,
            Object::Node(o) => &mut o.metadata,
            Object::Ingress(o) => &mut o.metadata,
            Object::IngressClass(o) => &mut o.metadata,
            Object::Secret(o) => &mut o.metadata,
        }
    }

    /// The index key: `namespace/name`, or `/name` (empty namespace) for the
    /// cluster-scoped Node and IngressClass.
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Node(_) | Object::IngressClass(_) => {
                ObjectKey::new("", self.meta().name.as_deref().unwrap_or_default())
            }
            _ => ObjectKey::of(self.meta()),
        }
    }

    /// Drops what the translation never reads (managed fields, the last-applied
    /// annotation, a Node's images and conditions, a TLS Secret's keys other than
    /// `tls.crt`/`tls.key`/`ca.crt`, other Secrets' data but basic authentication's
    /// users), so memory tracks what matters and no unrelated secret is kept.
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
        if let Object::Secret(secret) = self {
            strip_secret(secret);
        }
    }
}

fn strip_secret(secret: &mut Secret) {
    // The API server never returns stringData; a manifest may carry it (merged into
    // data by the manifests source). Keep neither here.
    secret.string_data = None;
    if secret.type_.as_deref() != Some(TLS_SECRET_TYPE) {
        // Basic authentication's users: the `auth` key (an htpasswd file) and, for
        // `auth-secret-type: auth-map`, values shaped like password hashes. Nothing
        // else of another Secret is kept.
        if let Some(data) = secret.data.as_mut() {
            data.retain(|k, v| {
                k == BASIC_AUTH_KEY
                    || std::str::from_utf8(&v.0)
                        .is_ok_and(|v| crate::routes::auth::hash_kind(v).is_some())
            });
        }
        if secret.data.as_ref().is_some_and(BTreeMap::is_empty) {
            secret.data = None;
        }
        return;
    }
    if let Some(data) = secret.data.as_mut() {
        data.retain(|k, _| k == TLS_CERT_KEY || k == TLS_PRIVATE_KEY_KEY || k == CA_CERT_KEY);
    }
}

/// The data key of an `auth-secret` holding an htpasswd file (ingress-nginx's).
pub const BASIC_AUTH_KEY: &str = "auth";

/// The data keys of a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";
/// The trusted CA certificates (as cert-manager writes them), read for
/// `proxy-ssl-secret`.
pub const CA_CERT_KEY: &str = "ca.crt";

/// A TLS Secret's data value, if present.
pub fn secret_data<'a>(secret: &'a Secret, key: &str) -> Option<&'a ByteString> {
    secret.data.as_ref()?.get(key)
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
    pub ingresses: BTreeMap<ObjectKey, Arc<Ingress>>,
    /// IngressClasses by name (cluster-scoped).
    pub ingress_classes: BTreeMap<String, Arc<IngressClass>>,
    /// Secrets, stripped to `tls.crt`/`tls.key`/`ca.crt` of `kubernetes.io/tls` ones and
    /// to the users of other ones (basic authentication).
    pub secrets: BTreeMap<ObjectKey, Arc<Secret>>,
    /// Whether the L7 kinds must be listed before [`synced`](Self::synced).
    l7: bool,
    replaced: BTreeSet<Kind>,
    l7_generation: u64,
}

impl Cluster {
    /// An index that waits for the L4 kinds, and for the L7 kinds too when `l7`.
    /// `Cluster::default()` is `Cluster::new(false)`.
    pub fn new(l7: bool) -> Self {
        Cluster {
            l7,
            ..Cluster::default()
        }
    }

    /// The kinds a source must list before the index is synced.
    pub fn required_kinds(&self) -> &'static [Kind] {
        if self.l7 { &Kind::ALL } else { &Kind::L4 }
    }

    /// True once every required kind was listed completely at least once.
    pub fn synced(&self) -> bool {
        self.required_kinds()
            .iter()
            .all(|k| self.replaced.contains(k))
    }

    /// Bumped by every change the L7 snapshot depends on (Ingresses, IngressClasses,
    /// Secrets, Services, EndpointSlices; not Nodes): rebuild the snapshot when it
    /// differs from the value the last build saw. L4 [`Dirty`] is unaffected by L7
    /// kinds.
    pub fn l7_generation(&self) -> u64 {
        self.l7_generation
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
        let kind = match &event {
            ClusterEvent::Apply(o) | ClusterEvent::Delete(o) => o.kind(),
            ClusterEvent::Replace(kind, _) => *kind,
        };
        let mut changed = false;
        let dirty = match event {
            ClusterEvent::Apply(mut object) => {
                object.strip();
                self.upsert(object, &mut changed)
            }
            ClusterEvent::Delete(object) => self.remove(kind, &object.key(), &mut changed),
            ClusterEvent::Replace(kind, objects) => {
                // The first list of a kind completes the state the snapshot is built on.
                changed |= self.replaced.insert(kind);
                let mut dirty = Dirty::None;
                let mut seen = BTreeSet::new();
                for mut object in objects {
                    if object.kind() != kind {
                        continue;
                    }
                    object.strip();
                    seen.insert(object.key());
                    dirty.merge(self.upsert(object, &mut changed));
                }
                for key in self.keys(kind) {
                    if !seen.contains(&key) {
                        dirty.merge(self.remove(kind, &key, &mut changed));
                    }
                }
                dirty
            }
        };
        if changed && kind.feeds_l7() {
            self.l7_generation += 1;
        }
        dirty
    }

    fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        fn named<V>(map: &BTreeMap<String, V>) -> Vec<ObjectKey> {
            map.keys().map(|name| ObjectKey::new("", name)).collect()
        }
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
            Kind::Node => named(&self.nodes),
            Kind::Ingress => self.ingresses.keys().cloned().collect(),
            Kind::IngressClass => named(&self.ingress_classes),
            Kind::Secret => self.secrets.keys().cloned().collect(),
        }
    }

    fn upsert(&mut self, object: Object, changed: &mut bool) -> Dirty {
        let key = object.key();
        match object {
            Object::Service(svc) => {
                if !replace(&mut self.services, key.clone(), svc) {
                    return Dirty::None;
                }
                *changed = true;
                Dirty::Services(BTreeSet::from([key]))
            }
            Object::EndpointSlice(mut slice) => {
                if self
                    .slices
                    .get(&key)
                    .is_some_and(|old| same(old.as_ref(), &mut slice))
                {
                    return Dirty::None;
                }
                *changed = true;
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
            Object::Node(node) => {
                if !replace(&mut self.nodes, key.name, node) {
                    return Dirty::None;
                }
                *changed = true;
                Dirty::All
            }
            Object::Ingress(ingress) => {
                *changed |= replace(&mut self.ingresses, key, ingress);
                Dirty::None
            }
            Object::IngressClass(class) => {
                *changed |= replace(&mut self.ingress_classes, key.name, class);
                Dirty::None
            }
            Object::Secret(secret) => {
                *changed |= replace(&mut self.secrets, key, secret);
                Dirty::None
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey, changed: &mut bool) -> Dirty {
        let dirty = match kind {
            Kind::Service => match self.services.remove(key) {
                Some(_) => Dirty::Services(BTreeSet::from([key.clone()])),
                None => return Dirty::None,
            },
            Kind::EndpointSlice => {
                let had = self.slices.contains_key(key);
                match self.remove_slice(key) {
                    Some(owner) => Dirty::Services(BTreeSet::from([owner])),
                    None if had => Dirty::None,
                    None => return Dirty::None,
                }
            }
            Kind::Node => match self.nodes.remove(&key.name) {
                Some(_) => Dirty::All,
                None => return Dirty::None,
            },
            Kind::Ingress => match self.ingresses.remove(key) {
                Some(_) => Dirty::None,
                None => return Dirty::None,
            },
            Kind::IngressClass => match self.ingress_classes.remove(&key.name) {
                Some(_) => Dirty::None,
                None => return Dirty::None,
            },
            Kind::Secret => match self.secrets.remove(key) {
                Some(_) => Dirty::None,
                None => return Dirty::None,
            },
        };
        *changed = true;
        dirty
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

/// Stores `new` under `key` unless the stored version has the same content; true when
/// it stored.
fn replace<K: Ord, T>(map: &mut BTreeMap<K, Arc<T>>, key: K, mut new: T) -> bool
where
    T: PartialEq + k8s_openapi::Metadata<Ty = ObjectMeta>,
{
    if map
        .get(&key)
        .is_some_and(|old| same(old.as_ref(), &mut new))
    {
        return false;
    }
    map.insert(key, Arc::new(new));
    true
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

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::IngressSpec;

    fn meta(namespace: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            ..ObjectMeta::default()
        }
    }

    fn ingress(name: &str, class: &str) -> Object {
        Object::Ingress(Ingress {
            metadata: meta("shop", name),
            spec: Some(IngressSpec {
                ingress_class_name: Some(class.to_owned()),
                ..IngressSpec::default()
            }),
            ..Ingress::default()
        })
    }

    fn secret(type_: &str) -> Secret {
        Secret {
            metadata: meta("shop", "tls"),
            type_: Some(type_.to_owned()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_owned(), ByteString(b"c".to_vec())),
                ("tls.key".to_owned(), ByteString(b"k".to_vec())),
                ("ca.crt".to_owned(), ByteString(b"a".to_vec())),
                ("other".to_owned(), ByteString(b"o".to_vec())),
            ])),
            ..Secret::default()
        }
    }

    #[test]
    fn l4_only_index_syncs_without_the_l7_kinds() {
        let mut l4 = Cluster::default();
        let mut l7 = Cluster::new(true);
        for kind in Kind::L4 {
            l4.apply(ClusterEvent::Replace(kind, Vec::new()));
            l7.apply(ClusterEvent::Replace(kind, Vec::new()));
        }
        assert!(l4.synced());
        assert!(!l7.synced());
        for kind in Kind::L7 {
            l7.apply(ClusterEvent::Replace(kind, Vec::new()));
        }
        assert!(l7.synced());
    }

    #[test]
    fn l7_kinds_bump_the_generation_but_dirty_no_service() {
        let mut cluster = Cluster::new(true);
        let g0 = cluster.l7_generation();
        assert_eq!(
            cluster.apply(ClusterEvent::Apply(ingress("web", "xlb"))),
            Dirty::None
        );
        let g1 = cluster.l7_generation();
        assert!(g1 > g0);
        // Same content again: nothing changed.
        cluster.apply(ClusterEvent::Apply(ingress("web", "xlb")));
        assert_eq!(cluster.l7_generation(), g1);
        cluster.apply(ClusterEvent::Apply(ingress("web", "other")));
        let g2 = cluster.l7_generation();
        assert!(g2 > g1);
        // A relist without it deletes it.
        assert_eq!(
            cluster.apply(ClusterEvent::Replace(Kind::Ingress, Vec::new())),
            Dirty::None
        );
        assert!(cluster.ingresses.is_empty());
        let g3 = cluster.l7_generation();
        assert!(g3 > g2);
        // A Node change is L4 only.
        let node = Object::Node(Node {
            metadata: ObjectMeta {
                name: Some("n".into()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        });
        assert_eq!(cluster.apply(ClusterEvent::Apply(node)), Dirty::All);
        assert_eq!(cluster.l7_generation(), g3);
        // A Service change is both.
        let svc = Object::Service(Service {
            metadata: meta("shop", "web"),
            ..Service::default()
        });
        assert!(matches!(
            cluster.apply(ClusterEvent::Apply(svc.clone())),
            Dirty::Services(_)
        ));
        assert!(cluster.l7_generation() > g3);
        let g4 = cluster.l7_generation();
        cluster.apply(ClusterEvent::Delete(svc));
        assert!(cluster.l7_generation() > g4);
    }

    #[test]
    fn secrets_keep_only_tls_keys_of_tls_secrets() {
        let mut cluster = Cluster::new(true);
        cluster.apply(ClusterEvent::Apply(Object::Secret(secret(TLS_SECRET_TYPE))));
        let stored = &cluster.secrets[&ObjectKey::new("shop", "tls")];
        let keys: Vec<&String> = stored.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["ca.crt", "tls.crt", "tls.key"]);
        cluster.apply(ClusterEvent::Apply(Object::Secret(secret("Opaque"))));
        assert!(
            cluster.secrets[&ObjectKey::new("shop", "tls")]
                .data
                .is_none()
        );
        // Basic authentication's users survive, other values do not.
        let mut users = secret("Opaque");
        users.data.as_mut().unwrap().extend([
            ("auth".to_owned(), ByteString(b"foo:{SHA}x".to_vec())),
            ("bar".to_owned(), ByteString(b"$apr1$salt$hash".to_vec())),
            ("password".to_owned(), ByteString(b"hunter2".to_vec())),
        ]);
        cluster.apply(ClusterEvent::Apply(Object::Secret(users)));
        let stored = &cluster.secrets[&ObjectKey::new("shop", "tls")];
        let keys: Vec<&String> = stored.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["auth", "bar"]);
    }
}
