//! `--manifests DIR`: Kubernetes YAML from a directory (Service, EndpointSlice, Node,
//! Ingress, IngressClass, Secret; multi-document files and `kind: List` as `kubectl get -o yaml` prints), translated
//! exactly as `--kube` would. A changed directory yields one `Replace` per kind.
//!
//! Bad input loses nothing: a document that does not parse keeps the last good version
//! of its object (found by kind, namespace and name); a file that is not YAML at all
//! keeps every object it held before, and so does a file over a `lb_core::yaml_limits`
//! limit (4 MiB, 64 levels of nesting), refused before parsing. Documents of other kinds
//! are ignored; one that looks meant for xlb (`kind: service`, a Service of
//! `apiVersion: v2`) is named once per file (`kinds`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use serde::de::DeserializeOwned;

use lb_core::cluster::{ClusterEvent, Kind, Object};

/// One problem with one document; the rest of the directory still applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based document number within the file (0: the file as a whole).
    pub document: usize,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for ManifestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.document > 0 {
            write!(f, " document {}", self.document)?;
        }
        if let Some(object) = &self.object {
            write!(f, " ({object})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// A directory read.
pub struct Load {
    /// One `Replace` per kind.
    pub events: Vec<ClusterEvent>,
    pub errors: Vec<ManifestError>,
}

/// Identity of an object across reloads.
type Identity = (Kind, String, String);

pub struct ManifestSource {
    dir: PathBuf,
    /// File contents last read, to skip unchanged directories.
    seen: BTreeMap<PathBuf, Vec<u8>>,
    /// Objects last parsed from each file.
    last_good: BTreeMap<PathBuf, Vec<(Identity, Object)>>,
}

impl ManifestSource {
    pub fn new(dir: &Path) -> Self {
        ManifestSource {
            dir: dir.to_owned(),
            seen: BTreeMap::new(),
            last_good: BTreeMap::new(),
        }
    }

    /// Reads the directory; `None` when no file changed (unless `force`).
    pub fn read(&mut self, force: bool) -> std::io::Result<Option<Load>> {
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let yaml = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
            if yaml && path.is_file() {
                files.insert(path.clone(), std::fs::read(&path)?);
            }
        }
        if !force && files == self.seen {
            return Ok(None);
        }
        let mut errors = Vec::new();
        let previous = std::mem::take(&mut self.last_good);
        let old_by_identity: BTreeMap<&Identity, &Object> = previous
            .values()
            .flatten()
            .map(|(id, object)| (id, object))
            .collect();
        let mut parsed = BTreeMap::new();
        for (path, bytes) in &files {
            let objects = match parse_file(path, bytes, &old_by_identity, &mut errors) {
                Some(objects) => objects,
                // Not YAML at all: keep what the file held before.
                None => previous.get(path).cloned().unwrap_or_default(),
            };
            parsed.insert(path.clone(), objects);
        }
        let mut by_kind: BTreeMap<Kind, BTreeMap<Identity, Object>> = BTreeMap::new();
        for (path, objects) in &parsed {
            for (id, object) in objects {
                let kind = by_kind.entry(id.0).or_default();
                if kind.insert(id.clone(), object.clone()).is_some() {
                    errors.push(ManifestError {
                        file: path.clone(),
                        document: 0,
                        object: Some(describe(id)),
                        reason:
                            "defined more than once in the directory; the file sorting last wins"
                                .into(),
                    });
                }
            }
        }
        let events = Kind::ALL
            .iter()
            .map(|kind| {
                let objects = by_kind
                    .remove(kind)
                    .map(|m| m.into_values().collect())
                    .unwrap_or_default();
                ClusterEvent::Replace(*kind, objects)
            })
            .collect();
        self.seen = files;
        self.last_good = parsed;
        Ok(Some(Load { events, errors }))
    }
}

fn describe((kind, namespace, name): &Identity) -> String {
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

/// Every object of a file; `None` when the file is not YAML.
fn parse_file(
    path: &Path,
    bytes: &[u8],
    old: &BTreeMap<&Identity, &Object>,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<(Identity, Object)>> {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            errors.push(file_error(path, format!("not UTF-8: {e}")));
            return None;
        }
    };
    if let Err(limit) = lb_core::yaml_limits::check(text) {
        errors.push(file_error(path, limit.to_string()));
        return None;
    }
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        match <serde_yaml::Value as serde::Deserialize>::deserialize(document) {
            Ok(value) => documents.push(value),
            Err(e) => {
                errors.push(file_error(
                    path,
                    format!("not YAML, nothing in it changed: {e}"),
                ));
                return None;
            }
        }
    }
    let mut out = Vec::new();
    let mut said = std::collections::BTreeSet::new();
    for (i, value) in documents.into_iter().enumerate() {
        let document = i + 1;
        if value.is_null() {
            continue;
        }
        let items = if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
            value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default()
        } else {
            vec![value]
        };
        for item in items {
            if let Some(reason) = kinds::ignored(&item).filter(|r| said.insert(r.clone())) {
                errors.push(ManifestError {
                    document,
                    ..file_error(path, reason)
                });
            }
            parse_object(path, document, item, old, errors, &mut out);
        }
    }
    Some(out)
}

fn parse_object(
    path: &Path,
    document: usize,
    value: serde_yaml::Value,
    old: &BTreeMap<&Identity, &Object>,
    errors: &mut Vec<ManifestError>,
    out: &mut Vec<(Identity, Object)>,
) {
    let api = value
        .get("apiVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let kind = match (api, value.get("kind").and_then(|v| v.as_str())) {
        ("v1", Some("Service")) => Kind::Service,
        ("discovery.k8s.io/v1", Some("EndpointSlice")) => Kind::EndpointSlice,
        ("v1", Some("Node")) => Kind::Node,
        ("networking.k8s.io/v1", Some("Ingress")) => Kind::Ingress,
        ("networking.k8s.io/v1", Some("IngressClass")) => Kind::IngressClass,
        ("v1", Some("Secret")) => Kind::Secret,
        _ => return, // another kind: not ours
    };
    let meta = value.get("metadata");
    let text = |field: &str| {
        meta.and_then(|m| m.get(field))
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let namespace = if matches!(kind, Kind::Node | Kind::IngressClass) {
        String::new()
    } else {
        let ns = text("namespace");
        if ns.is_empty() { "default".into() } else { ns }
    };
    let id: Identity = (kind, namespace.clone(), text("name"));
    let parsed = match kind {
        Kind::Service => typed::<Service>(value).map(|mut o| {
            o.metadata.namespace = Some(namespace);
            Object::Service(o)
        }),
        Kind::EndpointSlice => typed::<EndpointSlice>(value).map(|mut o| {
            o.metadata.namespace = Some(namespace);
            Object::EndpointSlice(o)
        }),
        Kind::Node => typed::<Node>(value).map(Object::Node),
        Kind::Ingress => typed::<Ingress>(value).map(|mut o| {
            o.metadata.namespace = Some(namespace);
            Object::Ingress(o)
        }),
        Kind::IngressClass => typed::<IngressClass>(value).map(Object::IngressClass),
        Kind::Secret => typed::<Secret>(value).map(|mut o| {
            o.metadata.namespace = Some(namespace);
            merge_string_data(&mut o);
            Object::Secret(o)
        }),
    };
    let error = |reason: String| ManifestError {
        file: path.to_owned(),
        document,
        object: Some(describe(&id)),
        reason,
    };
    if id.2.is_empty() {
        errors.push(error("metadata.name: missing".into()));
        return;
    }
    match parsed {
        Ok(object) => out.push((id, object)),
        Err(reason) => match old.get(&id) {
            Some(previous) => {
                errors.push(error(format!("{reason}; keeping the last good version")));
                out.push((id, (*previous).clone()));
            }
            None => errors.push(error(format!("{reason}; skipped"))),
        },
    }
}

/// Moves `stringData` into `data`, as the API server does on write (a `stringData`
/// key wins over the same `data` key).
fn merge_string_data(secret: &mut Secret) {
    if let Some(strings) = secret.string_data.take() {
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        for (key, value) in strings {
            data.insert(key, ByteString(value.into_bytes()));
        }
    }
}

/// The typed object, or the path of the field that failed and why.
fn typed<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        format!("{path}: {}", e.into_inner())
    })
}

fn file_error(path: &Path, reason: String) -> ManifestError {
    ManifestError {
        file: path.to_owned(),
        document: 0,
        object: None,
        reason,
    }
}

mod kinds;
#[cfg(test)]
mod tests;
