//! The L7 hop with `--kube`: an L7-only agent (`--kube --l7`, no XDP) whose KUBECONFIG
//! points at the test API server (API-compatible, in this test's namespace; no
//! kube-apiserver exists on these machines). It routes by the Ingresses it watches,
//! writes the publish Service's addresses into the status of the Ingresses of its
//! class (and only those), follows the publish Service when its address changes, and
//! follows an Ingress change without a restart. Bounded loops; everything is removed on
//! drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::networking::v1::Ingress;
use lb_core::cluster::Object;
use lb_testbed::{self as testbed, AgentProcess, ApiServer, Netns, spawn_echo_server};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const SETTLE: Duration = Duration::from_secs(20);
const BACKEND: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 61);
const L7_HTTP: &str = "127.0.0.1:18080";

fn object(yaml: &str) -> Object {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("YAML");
    match value["kind"].as_str() {
        Some("Service") => Object::Service(serde_yaml::from_value(value).expect("Service")),
        Some("EndpointSlice") => {
            Object::EndpointSlice(serde_yaml::from_value(value).expect("EndpointSlice"))
        }
        Some("Ingress") => Object::Ingress(serde_yaml::from_value(value).expect("Ingress")),
        Some("IngressClass") => {
            Object::IngressClass(serde_yaml::from_value(value).expect("IngressClass"))
        }
        other => panic!("unexpected kind {other:?}"),
    }
}

fn publish_service(ip: &str) -> Object {
    object(&format!(
        "apiVersion: v1
kind: Service
metadata: {{ name: xlb-ingress, namespace: xlb-system }}
spec:
  type: LoadBalancer
  clusterIP: 203.0.113.60
  ports: [{{ name: http, port: 80, protocol: TCP, targetPort: 80 }}]
status:
  loadBalancer:
    ingress: [{{ ip: {ip}, ipMode: VIP }}]
"
    ))
}

fn ingress(name: &str, class: &str, path: &str) -> Object {
    object(&format!(
        "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{ name: {name}, namespace: shop, creationTimestamp: \"2026-11-01T10:00:00Z\" }}
spec:
  ingressClassName: {class}
  rules:
  - host: shop.example.com
    http:
      paths:
      - {{ path: {path}, pathType: Prefix, backend: {{ service: {{ name: web, port: {{ number: 80 }} }} }} }}
"
    ))
}

/// The status addresses of `shop/NAME`, read through the API like kubectl would (from
/// a thread in the server's namespace).
fn status_ips(api: &ApiServer, ns: &Netns, name: &str) -> Vec<String> {
    ns.block_on(SETTLE, || async {
        let client = api.client().await.expect("client");
        let ingresses: kube::Api<Ingress> = kube::Api::namespaced(client, "shop");
        // The test server lists and watches; it has no single-object GET.
        let list = ingresses
            .list(&kube::api::ListParams::default())
            .await
            .expect("list Ingresses");
        list.items
            .into_iter()
            .find(|i| i.metadata.name.as_deref() == Some(name))
            .and_then(|i| i.status)
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.ip)
            .collect()
    })
    .expect("listing Ingresses from the namespace")
}

/// The answer to `GET path` with `Host: shop.example.com` on the L7 port.
fn get(ns: &Netns, path: &str) -> Option<u16> {
    testbed::curl_status(
        ns,
        &format!("http://{L7_HTTP}{path}"),
        &["-H", "Host: shop.example.com"],
    )
}

#[test]
fn kube_l7_routes_and_publishes_ingress_status() {
    testbed::check_privileges().expect("privileges");
    let ns = Netns::new("l7kube").expect("netns");
    ns.ip(&["addr", "add", &format!("{BACKEND}/32"), "dev", "lo"])
        .expect("backend address");
    let _web = spawn_echo_server(&ns, SocketAddr::new(IpAddr::V4(BACKEND), 8080), "web")
        .expect("echo server");
    let api = ApiServer::start(&ns).expect("API server");

    api.apply_all([
        object(
            "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: { name: xlb }
spec: { controller: xlb.dev/ingress-controller }
",
        ),
        publish_service("203.0.113.7"),
        object(
            "apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  type: ClusterIP
  clusterIP: 203.0.113.61
  ports: [{ name: http, port: 80, protocol: TCP, targetPort: 8080 }]
",
        ),
        object(&format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{ kubernetes.io/service-name: web }}
addressType: IPv4
endpoints:
- addresses: [\"{BACKEND}\"]
  conditions: {{ ready: true }}
ports: [{{ name: http, port: 8080, protocol: TCP }}]
"
        )),
        ingress("shop", "xlb", "/shop"),
        ingress("theirs", "nginx", "/theirs"),
    ]);

    let kubeconfig = api.kubeconfig().display().to_string();
    let agent = AgentProcess::start_l7_only(
        &ns,
        &["env", &format!("KUBECONFIG={kubeconfig}")],
        Path::new(AGENT),
        &["--kube"],
        "l7kube",
        &[
            "--l7",
            "--l7-http",
            L7_HTTP,
            "--l7-https",
            "127.0.0.1:18443",
            "--l7-publish-service",
            "xlb-system/xlb-ingress",
            "--admin",
            "127.0.0.1:19190",
        ],
    )
    .expect("start the agent");

    agent.until("the Ingress routes", SETTLE, || {
        get(&ns, "/shop/cart") == Some(200)
    });
    agent.until("our Ingress's status shows the VIP", SETTLE, || {
        status_ips(&api, &ns, "shop") == ["203.0.113.7"]
    });
    assert!(
        status_ips(&api, &ns, "theirs").is_empty(),
        "an Ingress of another class is left alone"
    );
    assert_eq!(
        get(&ns, "/theirs"),
        Some(404),
        "another class's rules are not served"
    );

    // The publish Service moves: the status follows. An Ingress edit is served without
    // a restart.
    api.apply(publish_service("203.0.113.8"));
    agent.until("the status follows the publish Service", SETTLE, || {
        status_ips(&api, &ns, "shop") == ["203.0.113.8"]
    });
    api.apply(ingress("shop", "xlb", "/store"));
    agent.until("the edited path is served", SETTLE, || {
        get(&ns, "/store") == Some(200) && get(&ns, "/shop/cart") == Some(404)
    });
    assert!(
        api.requests()
            .iter()
            .any(|r| r.verb == "patch" && r.path.ends_with("/ingresses/shop/status")),
        "status written through the status subresource"
    );
}
