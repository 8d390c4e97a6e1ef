//! The contender: an L7-only agent (`lb-agent run --manifests DIR --l7 --l7-http ADDR
//! --l7-https ADDR --admin ADDR`, no `--interface`), fed the same routes as Kubernetes
//! objects: our IngressClass, an Ingress for the host with the TLS Secret, and a Service
//! with an EndpointSlice per upstream.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use lb_testbed::{AgentProcess, IssuedCert, Netns};

use super::Route;

/// Namespace of the benchmark's Kubernetes objects.
const NAMESPACE: &str = "bench";
/// The IngressClass the agent serves by default (`--l7-ingress-class`).
const CLASS: &str = "xlb";
const CONTROLLER: &str = "xlb.dev/ingress-controller";
const SECRET: &str = "bench-tls";
/// Service port of every upstream; the endpoints' own port comes from the EndpointSlice.
const SERVICE_PORT: u16 = 80;

/// Where the L7 hop listens.
pub struct Listen {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub admin: SocketAddr,
}

/// The manifests: one multi-document file.
pub fn manifests(host: &str, routes: &[Route], cert: &IssuedCert) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: {CLASS}
spec:
  controller: {CONTROLLER}
---
apiVersion: v1
kind: Secret
metadata:
  name: {SECRET}
  namespace: {NAMESPACE}
type: kubernetes.io/tls
stringData:
"
    );
    for (key, pem) in [("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem)] {
        let _ = writeln!(y, "  {key}: |");
        for line in pem.lines() {
            let _ = writeln!(y, "    {line}");
        }
    }
    for (i, route) in routes.iter().enumerate() {
        let name = &route.upstream;
        // Never configured on an interface: only the L4 hop would serve it.
        let cluster_ip = format!("203.0.113.{}", 200 + i);
        let target = route.endpoints.first().map_or(0, SocketAddr::port);
        let _ = write!(
            y,
            "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {NAMESPACE}
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  clusterIPs: [{cluster_ip}]
  ports:
  - {{ name: http, port: {SERVICE_PORT}, protocol: TCP, targetPort: {target} }}
  selector:
    app: {name}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-bench
  namespace: {NAMESPACE}
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
endpoints:
"
        );
        for endpoint in &route.endpoints {
            let _ = writeln!(
                y,
                "- addresses: [\"{}\"]\n  conditions: {{ ready: true, serving: true, terminating: false }}",
                endpoint.ip()
            );
        }
        let _ = writeln!(
            y,
            "ports:\n- {{ name: http, port: {target}, protocol: TCP }}"
        );
    }
    // Plain HTTP is served, not redirected: the benchmark measures both schemes.
    let _ = write!(
        y,
        "---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: bench
  namespace: {NAMESPACE}
  creationTimestamp: \"2026-01-01T00:00:00Z\"
  annotations:
    nginx.ingress.kubernetes.io/ssl-redirect: \"false\"
spec:
  ingressClassName: {CLASS}
  tls:
  - hosts: [{host}]
    secretName: {SECRET}
  rules:
  - host: {host}
    http:
      paths:
"
    );
    for route in routes {
        let _ = writeln!(
            y,
            "      - {{ path: {}, pathType: Prefix, backend: {{ service: {{ name: {}, port: {{ name: http }} }} }} }}",
            route.path, route.upstream
        );
    }
    annotated(&mut y, routes);
    y
}

/// The annotations scenario's Ingresses (the same as `nginx.rs` renders): the main one
/// with the regex rewrite, CORS and the allowlist on the first route's Service, and a
/// canary by header on the second's.
fn annotated(y: &mut String, routes: &[Route]) {
    let [main, canary] = [0, 1].map(|i| routes.get(i).map_or("none", |r| r.upstream.as_str()));
    let p = "    nginx.ingress.kubernetes.io/";
    let allowed = super::ALLOWED_CLIENTS;
    for (name, service, annotations) in [
        (
            "annotated",
            main,
            format!(
                "{p}use-regex: \"true\"\n{p}rewrite-target: /$2\n{p}enable-cors: \"true\"\n\
                 {p}cors-allow-origin: https://shop.example.com\n\
                 {p}allowlist-source-range: {allowed}\n"
            ),
        ),
        (
            "annotated-canary",
            canary,
            format!("{p}canary: \"true\"\n{p}canary-by-header: X-Canary\n"),
        ),
    ] {
        let _ = write!(
            y,
            "---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {name}
  namespace: {NAMESPACE}
  creationTimestamp: \"2026-01-01T00:00:00Z\"
  annotations:
{annotations}spec:
  ingressClassName: {CLASS}
  rules:
  - host: {host}
    http:
      paths:
      - {{ path: \"/app(/|$)(.*)\", pathType: ImplementationSpecific, backend: {{ service: {{ name: {service}, port: {{ name: http }} }} }} }}
",
            host = super::ANNOTATED_HOST,
        );
    }
}

/// The agent's command-line arguments after `run`.
pub fn arguments(dir: &Path, listen: &Listen) -> Vec<String> {
    [
        "--manifests",
        &dir.display().to_string(),
        "--l7",
        "--l7-http",
        &listen.http.to_string(),
        "--l7-https",
        &listen.https.to_string(),
        "--admin",
        &listen.admin.to_string(),
    ]
    .map(str::to_owned)
    .into()
}

/// Writes the manifests into `dir` and starts `binary` in `ns` through `launcher`
/// (taskset, and `env XLB_L7_WORKERS=N`, which keep the agent's PID); `tag`
/// names its files.
pub fn start<'a>(
    ns: &'a Netns,
    launcher: &[String],
    binary: &Path,
    tag: &str,
    dir: &Path,
    manifests: &str,
    listen: &Listen,
) -> Result<AgentProcess<'a>> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join("bench.yaml");
    std::fs::write(&file, manifests).with_context(|| format!("writing {}", file.display()))?;
    let args = arguments(dir, listen);
    let (source, extra) = args.split_at(2);
    let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let source: Vec<&str> = source.iter().map(String::as_str).collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    AgentProcess::start_l7_only(ns, &launcher, binary, &source, tag, &extra)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Secret, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

    use super::*;

    #[test]
    fn manifests_name_the_routes_endpoints_and_certificate() {
        let routes = [
            Route {
                path: "/".into(),
                upstream: "web".into(),
                endpoints: vec!["192.0.2.11:8080".parse().unwrap()],
            },
            Route {
                path: "/api".into(),
                upstream: "api".into(),
                endpoints: vec!["192.0.2.12:8080".parse().unwrap()],
            },
        ];
        let cert = IssuedCert {
            cert_pem: "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n".into(),
            key_pem: "-----BEGIN PRIVATE KEY-----\nBBB\n-----END PRIVATE KEY-----\n".into(),
        };
        let yaml = manifests("bench.example.com", &routes, &cert);
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "IngressClass",
                "Secret",
                "Service",
                "EndpointSlice",
                "Service",
                "EndpointSlice",
                "Ingress",
                "Ingress",
                "Ingress"
            ]
        );
        // Every document is a valid object of its kind (the agent reads them as these).
        let typed = |i: usize| docs[i].clone();
        let class: IngressClass = serde_yaml::from_value(typed(0)).unwrap();
        assert_eq!(class.spec.unwrap().controller.as_deref(), Some(CONTROLLER));
        let secret: Secret = serde_yaml::from_value(typed(1)).unwrap();
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.string_data.unwrap();
        assert_eq!(data["tls.crt"], cert.cert_pem);
        assert_eq!(data["tls.key"], cert.key_pem);
        let service: Service = serde_yaml::from_value(typed(4)).unwrap();
        let port = &service.spec.unwrap().ports.unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 80));
        let slice: EndpointSlice = serde_yaml::from_value(typed(5)).unwrap();
        assert_eq!(slice.endpoints[0].addresses, ["192.0.2.12"]);
        assert_eq!(slice.ports.unwrap()[0].port, Some(8080));
        assert_eq!(
            slice.metadata.labels.unwrap()["kubernetes.io/service-name"],
            "api"
        );
        let ingress: Ingress = serde_yaml::from_value(typed(6)).unwrap();
        let spec = ingress.spec.unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some(CLASS));
        let tls = &spec.tls.unwrap()[0];
        assert_eq!(tls.secret_name.as_deref(), Some(SECRET));
        assert_eq!(
            tls.hosts.as_deref(),
            Some(&["bench.example.com".to_owned()][..])
        );
        let rule = &spec.rules.unwrap()[0];
        assert_eq!(rule.host.as_deref(), Some("bench.example.com"));
        let paths = &rule.http.as_ref().unwrap().paths;
        let seen: Vec<(&str, &str, &str)> = paths
            .iter()
            .map(|p| {
                let service = p.backend.service.as_ref().unwrap();
                (
                    p.path.as_deref().unwrap(),
                    p.path_type.as_str(),
                    service.name.as_str(),
                )
            })
            .collect();
        assert_eq!(seen, [("/", "Prefix", "web"), ("/api", "Prefix", "api")]);
        assert_eq!(
            ingress.metadata.annotations.unwrap()["nginx.ingress.kubernetes.io/ssl-redirect"],
            "false"
        );

        let listen = Listen {
            http: "203.0.113.11:80".parse().unwrap(),
            https: "203.0.113.11:443".parse().unwrap(),
            admin: "127.0.0.1:19190".parse().unwrap(),
        };
        assert_eq!(
            arguments(Path::new("/m"), &listen).join(" "),
            "--manifests /m --l7 --l7-http 203.0.113.11:80 --l7-https 203.0.113.11:443 --admin 127.0.0.1:19190"
        );
    }

    #[test]
    fn the_annotations_scenario_has_a_main_and_a_canary_ingress() {
        let routes = [
            Route {
                path: "/".into(),
                upstream: "web".into(),
                endpoints: vec!["192.0.2.11:8080".parse().unwrap()],
            },
            Route {
                path: "/api".into(),
                upstream: "api".into(),
                endpoints: vec!["192.0.2.12:8080".parse().unwrap()],
            },
        ];
        let cert = IssuedCert {
            cert_pem: String::new(),
            key_pem: String::new(),
        };
        let yaml = manifests("bench.example.com", &routes, &cert);
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        // The annotations scenario's Ingresses: the main one on the first route's
        // Service, the canary on the second's, one regex path each.
        for (i, service, annotation) in [
            (7, "web", "nginx.ingress.kubernetes.io/rewrite-target"),
            (8, "api", "nginx.ingress.kubernetes.io/canary-by-header"),
        ] {
            let ingress: Ingress = serde_yaml::from_value(docs[i].clone()).unwrap();
            assert!(
                ingress
                    .metadata
                    .annotations
                    .unwrap()
                    .contains_key(annotation)
            );
            let rule = &ingress.spec.unwrap().rules.unwrap()[0];
            assert_eq!(rule.host.as_deref(), Some("annotated.example.com"));
            let path = &rule.http.as_ref().unwrap().paths[0];
            assert_eq!(path.path.as_deref(), Some("/app(/|$)(.*)"));
            assert_eq!(path.backend.service.as_ref().unwrap().name, service);
        }
    }
}
