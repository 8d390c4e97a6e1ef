use std::fs;

use super::*;
use lb_core::cluster::{Cluster, Dirty, ObjectKey};

const SERVICE: &str = r"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: 203.0.113.10
  clusterIPs: [203.0.113.10]
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
";

const SLICE: &str = r"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
endpoints:
- addresses: [192.0.2.11]
  conditions: {ready: true}
ports:
- name: http
  port: 8080
  protocol: TCP
";

fn dir() -> tempdir::Dir {
    tempdir::Dir::new()
}

/// A throwaway directory removed on drop.
mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "xlb-manifests-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn cluster_of(load: Load) -> Cluster {
    let mut cluster = Cluster::default();
    for event in load.events {
        cluster.apply(event);
    }
    cluster
}

#[test]
fn multi_document_file_and_list_give_one_replace_per_kind() {
    let d = dir();
    fs::write(d.0.join("web.yaml"), format!("{SERVICE}\n---\n{SLICE}")).unwrap();
    let list = r"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node-a}
  status:
    addresses:
    - {type: InternalIP, address: 198.51.100.2}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: web, namespace: shop}
";
    fs::write(d.0.join("nodes.yml"), list).unwrap();
    fs::write(d.0.join("notes.txt"), "not a manifest").unwrap();
    let mut source = ManifestSource::new(&d.0);
    let load = source.read(false).unwrap().expect("first read");
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    assert_eq!(load.events.len(), Kind::ALL.len());
    let cluster = cluster_of(load);
    assert!(cluster.synced());
    let key = ObjectKey::new("shop", "web");
    assert!(cluster.services.contains_key(&key));
    assert_eq!(cluster.slices_of(&key).len(), 1);
    assert!(cluster.nodes.contains_key("node-a"));
    assert!(source.read(false).unwrap().is_none(), "unchanged directory");
    assert!(source.read(true).unwrap().is_some(), "forced read");
}

#[test]
fn bad_document_keeps_last_good_version_and_names_field() {
    let d = dir();
    let file = d.0.join("web.yaml");
    fs::write(&file, format!("{SERVICE}\n---\n{SLICE}")).unwrap();
    let mut source = ManifestSource::new(&d.0);
    let mut cluster = cluster_of(source.read(false).unwrap().unwrap());

    // The slice's port becomes a string: that document is bad, the Service edit applies.
    let bad_slice = SLICE.replace("port: 8080", "port: eighty");
    let new_service = SERVICE.replace("port: 80\n", "port: 81\n");
    fs::write(&file, format!("{new_service}\n---\n{bad_slice}")).unwrap();
    let load = source.read(false).unwrap().unwrap();
    assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
    let error = load.errors[0].to_string();
    assert!(
        error.contains("document 2")
            && error.contains("EndpointSlice shop/web-abc12")
            && error.contains("ports[0].port")
            && error.contains("keeping the last good version"),
        "{error}"
    );
    let mut dirty = Dirty::None;
    for event in load.events {
        dirty.merge(cluster.apply(event));
    }
    assert_eq!(
        dirty,
        Dirty::Services([ObjectKey::new("shop", "web")].into()),
        "only the Service changed"
    );
    let key = ObjectKey::new("shop", "web");
    let slices = cluster.slices_of(&key);
    assert_eq!(slices[0].ports.as_ref().unwrap()[0].port, Some(8080));
    let svc = &cluster.services[&key];
    assert_eq!(
        svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port,
        81
    );
}

#[test]
fn file_that_is_not_yaml_changes_nothing() {
    let d = dir();
    let file = d.0.join("web.yaml");
    fs::write(&file, format!("{SERVICE}\n---\n{SLICE}")).unwrap();
    let mut source = ManifestSource::new(&d.0);
    let mut cluster = cluster_of(source.read(false).unwrap().unwrap());
    fs::write(&file, "kind: Service\n  metadata: [unclosed").unwrap();
    let load = source.read(false).unwrap().unwrap();
    assert_eq!(load.errors.len(), 1);
    assert!(
        load.errors[0].to_string().contains("not YAML"),
        "{}",
        load.errors[0]
    );
    let mut dirty = Dirty::None;
    for event in load.events {
        dirty.merge(cluster.apply(event));
    }
    assert_eq!(dirty, Dirty::None);
    assert_eq!(cluster.services.len(), 1);
}

#[test]
fn removed_file_removes_its_objects() {
    let d = dir();
    fs::write(d.0.join("svc.yaml"), SERVICE).unwrap();
    fs::write(d.0.join("slice.yaml"), SLICE).unwrap();
    let mut source = ManifestSource::new(&d.0);
    let mut cluster = cluster_of(source.read(false).unwrap().unwrap());
    fs::remove_file(d.0.join("slice.yaml")).unwrap();
    let load = source.read(false).unwrap().unwrap();
    let mut dirty = Dirty::None;
    for event in load.events {
        dirty.merge(cluster.apply(event));
    }
    assert_eq!(
        dirty,
        Dirty::Services([ObjectKey::new("shop", "web")].into())
    );
    assert!(cluster.slices_of(&ObjectKey::new("shop", "web")).is_empty());
}

#[test]
fn new_object_that_does_not_parse_is_skipped_with_its_name() {
    let d = dir();
    fs::write(
        d.0.join("svc.yaml"),
        SERVICE.replace("port: 80\n", "port: [80]\n"),
    )
    .unwrap();
    let mut source = ManifestSource::new(&d.0);
    let load = source.read(false).unwrap().unwrap();
    assert_eq!(load.errors.len(), 1);
    let error = load.errors[0].to_string();
    assert!(
        error.contains("Service shop/web") && error.contains("skipped"),
        "{error}"
    );
    assert!(cluster_of(load).services.is_empty());
}

/// examples/kubernetes translates without a problem into what its comments promise.
#[test]
fn the_example_manifests_translate_cleanly() {
    use lb_core::model::Desired;
    use lb_core::model::translator::Translator;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let mut source = ManifestSource::new(&dir);
    let load = source.read(true).unwrap().unwrap();
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    let mut cluster = Cluster::default();
    for event in load.events {
        cluster.apply(event);
    }
    let mut translator = Translator::new(Some("node-a".into()), Vec::new());
    let mut desired = Desired::default();
    let outcome = translator.update(&cluster, Dirty::All, &mut desired);
    assert!(outcome.problems.is_empty(), "{:?}", outcome.problems);
    let names: Vec<&str> = desired.services.keys().map(String::as_str).collect();
    assert_eq!(names, ["shop/web:http/tcp", "shop/web:http/tcp/ranges"]);
    let plain = &desired.services["shop/web:http/tcp"];
    let frontends: Vec<String> = plain
        .frontends
        .iter()
        .map(|f| format!("{}:{}", f.address, f.port))
        .collect();
    assert_eq!(frontends, ["198.51.100.1:30080", "203.0.113.20:80"]);
    let weights: Vec<(String, u32)> = plain
        .backends
        .iter()
        .map(|(e, b)| (e.to_string(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("192.0.2.11:8080".to_owned(), 1),
            ("192.0.2.12:8080".to_owned(), 1),
            ("192.0.2.13:8080".to_owned(), 0)
        ]
    );
    assert_eq!(plain.affinity_timeout_s, Some(600));
    let ranged = &desired.services["shop/web:http/tcp/ranges"];
    assert_eq!(ranged.source_ranges, ["198.51.100.0/24".parse().unwrap()]);
    assert_eq!(
        ranged
            .frontends
            .iter()
            .map(|f| f.address.to_string())
            .collect::<Vec<_>>(),
        ["203.0.113.21"]
    );

    // The Ingress routes its host to the ready, undrained endpoints; other hosts 404.
    let class = lb_core::model::ingress::IngressClassConfig::new("xlb");
    let l7 = lb_core::model::ingress::translate(&cluster, &class);
    assert!(l7.problems.is_empty(), "{:?}", l7.problems);
    let route = l7
        .routes
        .lookup("shop.example.com", "/cart")
        .expect("the example's route");
    assert_eq!(
        route.upstream.target,
        lb_core::routes::Target::Endpoints(vec![
            "192.0.2.11:8080".parse().unwrap(),
            "192.0.2.12:8080".parse().unwrap()
        ])
    );
    assert!(l7.routes.lookup("other.example.com", "/").is_none());
}

/// Ingress, IngressClass and Secret documents (data in base64, or stringData as a
/// manifest may carry it) reach the index as `kubectl apply` would store them; the
/// IngressClass is cluster-scoped and Secrets keep only their TLS keys.
#[test]
fn l7_kinds_with_secret_data_and_string_data() {
    let d = dir();
    let l7 = r"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: xlb}
spec: {controller: xlb.dev/ingress-controller}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: shop}
spec:
  ingressClassName: xlb
  tls:
  - hosts: [shop.example.com]
    secretName: encoded
  rules:
  - host: shop.example.com
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service: {name: web, port: {number: 80}}
---
apiVersion: v1
kind: Secret
metadata: {name: encoded, namespace: shop}
type: kubernetes.io/tls
data:
  tls.crt: Y2VydA==
  tls.key: a2V5
  ca.crt: Y2E=
  other.key: b3RoZXI=
---
apiVersion: v1
kind: Secret
metadata: {name: plain, namespace: shop}
type: kubernetes.io/tls
data:
  tls.crt: b2xk
stringData:
  tls.crt: new
  tls.key: key
---
apiVersion: v1
kind: Secret
metadata: {name: opaque, namespace: shop}
type: Opaque
stringData: {password: hunter2}
";
    fs::write(d.0.join("l7.yaml"), l7).unwrap();
    let mut source = ManifestSource::new(&d.0);
    let load = source.read(false).unwrap().expect("first read");
    assert!(load.errors.is_empty(), "{:?}", load.errors);
    let cluster = cluster_of(load);
    assert!(cluster.ingress_classes.contains_key("xlb"));
    assert!(
        cluster
            .ingresses
            .contains_key(&ObjectKey::new("shop", "web"))
    );
    let data = |name: &str| -> Vec<(String, String)> {
        let secret = &cluster.secrets[&ObjectKey::new("shop", name)];
        secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).unwrap()))
            .collect()
    };
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    // ca.crt is kept (`proxy-ssl-secret`), other keys are not.
    assert_eq!(
        data("encoded"),
        [
            pair("ca.crt", "ca"),
            pair("tls.crt", "cert"),
            pair("tls.key", "key")
        ]
    );
    // stringData wins over data for the same key, as on the API server.
    assert_eq!(
        data("plain"),
        [pair("tls.crt", "new"), pair("tls.key", "key")]
    );
    assert!(data("opaque").is_empty(), "an Opaque Secret keeps no data");
}

/// A file over a size or nesting limit is refused before parsing and keeps what it held.
#[test]
fn a_file_over_a_limit_changes_nothing() {
    use lb_core::yaml_limits::{Limit, MAX_BYTES};
    let d = dir();
    let file = d.0.join("web.yaml");
    fs::write(&file, format!("{SERVICE}\n---\n{SLICE}")).unwrap();
    let mut source = ManifestSource::new(&d.0);
    let mut cluster = cluster_of(source.read(false).unwrap().unwrap());
    let deep = format!(
        "{SERVICE}\n---\nkind: ConfigMap\ndata: {}\n",
        "[".repeat(200_000)
    );
    let big = format!("{SERVICE}\n# {}\n", "x".repeat(MAX_BYTES));
    for (hostile, expected) in [
        (deep, Limit::TooDeep { line: 19 }),
        (big, Limit::TooLarge { bytes: 0 }),
    ] {
        let edited = hostile.replace("port: 80\n", "port: 81\n");
        fs::write(&file, &edited).unwrap();
        let load = source.read(false).unwrap().unwrap();
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        let error = load.errors[0].to_string();
        let fragment = match expected {
            Limit::TooDeep { line } => {
                format!("web.yaml: line {line}: nested deeper than the limit of 64 levels")
            }
            Limit::TooLarge { .. } => {
                format!("web.yaml: {} bytes is over the size limit", edited.len())
            }
        };
        assert!(error.contains(&fragment), "{error}\nlacks {fragment}");
        let mut dirty = Dirty::None;
        for event in load.events {
            dirty.merge(cluster.apply(event));
        }
        assert_eq!(dirty, Dirty::None, "the Service edit in a refused file");
        assert_eq!(cluster.slices_of(&ObjectKey::new("shop", "web")).len(), 1);
    }
}

/// A misspelt kind or a wrong apiVersion is named once per pair and file; other kinds
/// stay silent.
#[test]
fn a_misspelt_kind_is_named_once_per_file() {
    let d = dir();
    let lower = SERVICE.replace("kind: Service", "kind: service");
    let v2 = SERVICE.replace("apiVersion: v1", "apiVersion: v2");
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
    fs::write(
        d.0.join("a.yaml"),
        format!("{lower}\n---\n{lower}\n---\n{v2}\n---\n{deployment}\n---\n{SLICE}"),
    )
    .unwrap();
    fs::write(d.0.join("b.yaml"), &lower).unwrap();
    let mut source = ManifestSource::new(&d.0);
    let load = source.read(false).unwrap().unwrap();
    let errors: Vec<String> = load.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(
        errors[0].ends_with(
            "a.yaml document 1: kind \"service\" apiVersion \"v1\" is not read (did you mean \
             kind \"Service\" apiVersion \"v1\"?); every such document in this file is ignored"
        ),
        "{errors:#?}"
    );
    assert!(
        errors[1].contains("a.yaml document 3: kind \"Service\" apiVersion \"v2\""),
        "{errors:#?}"
    );
    assert!(
        errors[2].contains("b.yaml document 1: kind \"service\""),
        "{errors:#?}"
    );
    let cluster = cluster_of(load);
    assert!(cluster.services.is_empty());
    assert_eq!(cluster.slices_of(&ObjectKey::new("shop", "web")).len(), 1);
}
