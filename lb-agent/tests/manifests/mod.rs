//! deploy/'s YAML as k8s-openapi types, shared by the manifest and capability tests.
//! Loading fails on a kind we do not expect and on any field k8s-openapi does not know
//! (a misspelt field would otherwise be dropped silently, as the API server's
//! non-strict decoding would drop it).

#![allow(dead_code, reason = "each test binary uses a different part")]

use std::path::{Path, PathBuf};

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, SecurityContext, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize as _;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every kind deploy/ may contain.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
    IngressClass(IngressClass),
    Service(Box<Service>),
}

/// One YAML document and where it came from.
#[derive(Debug, Clone)]
pub struct Doc {
    pub file: PathBuf,
    pub index: usize,
    pub object: Object,
}

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("lb-agent lives in the workspace")
        .join("deploy")
}

/// The files `kubectl apply -f deploy/` reads (it takes .yaml, .yml and .json), in the
/// order it applies them.
pub fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    files
}

/// Every document of every manifest file in `dir`.
pub fn load(dir: &Path) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for file in manifest_files(dir) {
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        docs.extend(parse(&file, &text)?);
    }
    Ok(docs)
}

/// The documents of one multi-document YAML text.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (index, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let at = format!("{} document {}", file.display(), index + 1);
        let value = serde_yaml::Value::deserialize(de).map_err(|e| format!("{at}: {e}"))?;
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        let object = typed(&value).map_err(|e| format!("{at}: {e}"))?;
        docs.push(Doc {
            file: file.to_path_buf(),
            index,
            object,
        });
    }
    Ok(docs)
}

fn typed(value: &serde_yaml::Value) -> Result<Object, String> {
    let field = |name: &str| value.get(name).and_then(serde_yaml::Value::as_str);
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    let is = |v: &str, k: &str| api_version == Some(v) && kind == Some(k);
    if is(Namespace::API_VERSION, Namespace::KIND) {
        strict(value).map(Object::Namespace)
    } else if is(ServiceAccount::API_VERSION, ServiceAccount::KIND) {
        strict(value).map(Object::ServiceAccount)
    } else if is(ClusterRole::API_VERSION, ClusterRole::KIND) {
        strict(value).map(Object::ClusterRole)
    } else if is(ClusterRoleBinding::API_VERSION, ClusterRoleBinding::KIND) {
        strict(value).map(Object::ClusterRoleBinding)
    } else if is(ConfigMap::API_VERSION, ConfigMap::KIND) {
        strict(value).map(Object::ConfigMap)
    } else if is(DaemonSet::API_VERSION, DaemonSet::KIND) {
        strict(value).map(|d| Object::DaemonSet(Box::new(d)))
    } else if is(IngressClass::API_VERSION, IngressClass::KIND) {
        strict(value).map(Object::IngressClass)
    } else if is(Service::API_VERSION, Service::KIND) {
        strict(value).map(|s| Object::Service(Box::new(s)))
    } else {
        Err(format!(
            "unexpected kind {kind:?} (apiVersion {api_version:?}); deploy/ holds only \
             Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, DaemonSet, \
             IngressClass and Service"
        ))
    }
}

/// Deserializes, then serializes again and compares: a field k8s-openapi ignored
/// (unknown or misspelt) shows up as a difference.
fn strict<T: DeserializeOwned + Serialize>(value: &serde_yaml::Value) -> Result<T, String> {
    let typed: T = serde_yaml::from_value(value.clone()).map_err(|e| e.to_string())?;
    let original = serde_json::to_value(value).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(&original, &again, "") {
        None => Ok(typed),
        Some(path) => Err(format!(
            "field {path} is not what Kubernetes reads (unknown, misspelt, or of the wrong type)"
        )),
    }
}

/// The path of the first place where `a` (as written) differs from `b` (as read).
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| match b.get(k) {
                Some(w) => first_difference(v, w, &format!("{path}.{k}")),
                None => Some(format!("{path}.{k}")),
            })
            .or_else(|| {
                b.keys()
                    .find(|k| !a.contains_key(*k))
                    .map(|k| format!("{path}.{k}"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(if path.is_empty() {
            ".".into()
        } else {
            path.into()
        }),
    }
}

/// The one object `pick` selects; panics unless there is exactly one.
pub fn one<'d, T>(
    docs: &'d [Doc],
    what: &str,
    pick: impl Fn(&'d Object) -> Option<&'d T>,
) -> &'d T {
    let found: Vec<&T> = docs.iter().filter_map(|d| pick(&d.object)).collect();
    assert_eq!(found.len(), 1, "deploy/ must hold exactly one {what}");
    found[0]
}

pub fn daemonset(docs: &[Doc]) -> &DaemonSet {
    one(docs, "DaemonSet", |o| match o {
        Object::DaemonSet(d) => Some(d),
        _ => None,
    })
}

/// The DaemonSet's one container (the agent).
pub fn agent_container(ds: &DaemonSet) -> &Container {
    let spec = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet pod spec");
    assert_eq!(
        spec.containers.len(),
        1,
        "the DaemonSet runs one container, the agent"
    );
    &spec.containers[0]
}

/// The agent container of the DaemonSet in `docs` and its security context.
pub fn agent_security(docs: &[Doc]) -> (&Container, &SecurityContext) {
    let container = agent_container(daemonset(docs));
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    (container, security)
}

/// The capabilities the agent container adds (Kubernetes spelling: `NET_ADMIN`).
pub fn added_capabilities(container: &Container) -> Vec<String> {
    container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
}
