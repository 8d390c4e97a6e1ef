//! The agent with a Kubernetes source end to end: `lb-agent run --manifests DIR
//! --node-name node-a` in the load-balancer namespace of a namespace topology, fed
//! Service, EndpointSlice and Node YAML in the shapes `kubectl get -o yaml` prints, with
//! real TCP connections from the client namespace through ClusterIP, NodePort and
//! LoadBalancer frontends. Every loop is bounded; namespaces, the agent and its pins
//! are removed on drop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_testbed::{self as testbed, AgentProcess, ServerHandle, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(15);
const NODE_PORT: u16 = 30_080;
const LOCAL_NODE_PORT: u16 = 30_081;
const HEALTH_NODE_PORT: u16 = 30_500;

struct Bed {
    topo: Topology,
    _servers: Vec<ServerHandle>,
    dir: PathBuf,
}

impl Bed {
    fn new(tag: &str, backends: usize) -> Bed {
        let topo = Topology::for_test(tag, backends);
        let servers =
            testbed::spawn_backend_peer_servers(&topo, backends, PORT).expect("peer servers");
        let dir = std::env::temp_dir().join(format!("xlb-k8s-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("manifests dir");
        Bed {
            topo,
            _servers: servers,
            dir,
        }
    }

    fn write(&self, file: &str, yaml: &str) {
        testbed::write_atomically(&self.dir.join(file), yaml);
    }

    fn agent(&self, tag: &str) -> AgentProcess<'_> {
        let dir = self.dir.display().to_string();
        AgentProcess::start_with_source(
            &self.topo.lb,
            Path::new(AGENT),
            &["--manifests", &dir, "--node-name", "node-a"],
            tag,
            &["--poll-ms", "100"],
        )
        .expect("start agent")
    }

    /// One connection: the backend's name and the client address it saw.
    fn ask(&self, addr: SocketAddr) -> anyhow::Result<(String, String)> {
        let answer = testbed::tcp_ask(&self.topo.client, addr, TIMEOUT)?;
        let mut words = answer.split_whitespace();
        Ok((
            words.next().unwrap_or_default().to_owned(),
            words.next().unwrap_or_default().to_owned(),
        ))
    }

    fn spread(&self, addr: SocketAddr, n: u32) -> BTreeMap<String, u32> {
        self.try_spread(addr, n)
            .expect("connection through the frontend")
    }

    /// As [`Bed::spread`], but the first failed connection ends it with the error, for
    /// waits across a change: there one connection can fail (one did in a CI run of
    /// 2026-12-07, connected but unanswered within 2 s while backend-2's slot was being
    /// emptied; the cause is not confirmed), and only the checks after the wait must
    /// see none.
    fn try_spread(&self, addr: SocketAddr, n: u32) -> anyhow::Result<BTreeMap<String, u32>> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            let (backend, client) = self.ask(addr)?;
            // backend-0 runs on this node (nodeName node-a): only its destination is
            // rewritten, so it sees the client. The others run on node-b: in SNAT mode
            // (the default, as kube-proxy masquerades) they see this node's address, the
            // first of its --interface xc.
            let expected = if backend == "backend-0" {
                Topology::client_v4()
            } else {
                Topology::lb_client_v4()
            };
            assert_eq!(client, expected.to_string(), "the address {backend} sees");
            *seen.entry(backend).or_default() += 1;
        }
        Ok(seen)
    }
}

/// Waits until `check` holds, within `SETTLE`.
fn until(agent: &AgentProcess<'_>, what: &str, check: impl Fn() -> bool) {
    agent.until(what, SETTLE, check);
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// This node, as `kubectl get node node-a -o yaml` prints it (abridged): its
/// InternalIP is the load balancer's address on the client side.
fn node() -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: node-a
  uid: 6a1c1d2e-0000-4000-8000-000000000001
  resourceVersion: \"401\"
  creationTimestamp: \"2026-11-01T10:00:00Z\"
  labels:
    kubernetes.io/hostname: node-a
status:
  addresses:
  - address: {}
    type: InternalIP
  - address: node-a
    type: Hostname
",
        Topology::lb_client_v4()
    )
}

/// A Service as `kubectl get svc -o yaml` prints it.
fn service(name: &str, cluster_ip: &str, type_: &str, extra_spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: shop
  uid: 6a1c1d2e-0000-4000-8000-0000000000{n:02}
  resourceVersion: \"1000\"
  creationTimestamp: \"2026-11-01T10:00:00Z\"
spec:
  type: {type_}
  clusterIP: {cluster_ip}
  clusterIPs:
  - {cluster_ip}
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  internalTrafficPolicy: Cluster
  sessionAffinity: None
  selector:
    app: {name}
{extra_spec}status:
{status}",
        n = name.len()
    )
}

/// An EndpointSlice for `service` with (backend index, node, ready).
fn slice(service: &str, endpoints: &[(usize, &str, bool)]) -> String {
    slice_on(service, PORT, endpoints)
}

/// As [`slice`], with the endpoints serving on `port`.
fn slice_on(service: &str, port: u16, endpoints: &[(usize, &str, bool)]) -> String {
    let mut yaml = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-x7k2p
  namespace: shop
  generateName: {service}-
  resourceVersion: \"1001\"
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: {service}
  ownerReferences:
  - apiVersion: v1
    kind: Service
    name: {service}
    uid: 6a1c1d2e-0000-4000-8000-000000000099
    blockOwnerDeletion: true
    controller: true
addressType: IPv4
ports:
- name: http
  port: {port}
  protocol: TCP
endpoints:
"
    );
    for (i, node, ready) in endpoints {
        write!(
            yaml,
            "- addresses:
  - {}
  conditions:
    ready: {ready}
    serving: {ready}
    terminating: false
  nodeName: {node}
  targetRef:
    kind: Pod
    name: {service}-{i}
    namespace: shop
",
            Topology::backend_v4(*i)
        )
        .expect("write to a String");
    }
    yaml
}

fn web() -> String {
    service(
        "web",
        "203.0.113.10",
        "NodePort",
        &format!(
            "  externalTrafficPolicy: Cluster
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
    nodePort: {NODE_PORT}
"
        ),
        "  loadBalancer: {}\n",
    )
}

fn local() -> String {
    service(
        "local",
        "203.0.113.11",
        "LoadBalancer",
        &format!(
            "  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_NODE_PORT}
  allocateLoadBalancerNodePorts: true
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
    nodePort: {LOCAL_NODE_PORT}
"
        ),
        "  loadBalancer:
    ingress:
    - ip: 203.0.113.12
      ipMode: VIP
",
    )
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("address"), port)
}

/// GET on the healthCheckNodePort from the client: (status code, body).
fn health_check(bed: &Bed) -> anyhow::Result<(u16, String)> {
    http_get(bed, HEALTH_NODE_PORT, "/healthz")
}

/// A GET from the client to the node's address: (status code, body).
fn http_get(bed: &Bed, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let target = SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), port);
    let response = bed.topo.client.run_in(|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&target, TIMEOUT)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: node-a\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok(text)
    })??;
    testbed::status_and_body(&response)
        .ok_or_else(|| anyhow::anyhow!("no status line in {response:?}"))
}

/// The web Service and its slice in one multi-document file, as `kubectl get -o yaml`
/// piped into a file would be; backend 2 ready or not.
fn web_file(backend_2_ready: bool) -> String {
    let endpoints = [
        (0, "node-a", true),
        (1, "node-b", true),
        (2, "node-b", backend_2_ready),
    ];
    format!("{}---\n{}", web(), slice("web", &endpoints))
}

#[test]
fn cluster_ip_and_node_port_spread_over_every_ready_endpoint() {
    let bed = Bed::new("k8sweb", 3);
    bed.write("node.yaml", &node());
    bed.write("web.yaml", &web_file(true));
    let agent = bed.agent("k8sweb");
    let cluster_ip = addr("203.0.113.10", 80);
    let node_port = SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), NODE_PORT);
    until(&agent, "the ClusterIP answers", || {
        bed.ask(cluster_ip).is_ok()
    });

    for frontend in [cluster_ip, node_port] {
        let seen = bed.spread(frontend, 90);
        assert_eq!(seen.len(), 3, "{frontend}: every ready endpoint: {seen:?}");
    }
    // The admin endpoint (default 0.0.0.0:9190) says the state is in the maps.
    let (status, body) = http_get(&bed, 9190, "/readyz").expect("readyz");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (_, metrics) = http_get(&bed, 9190, "/metrics").expect("metrics");
    assert!(metrics.contains("xlb_ready 1"), "{metrics}");
    assert!(
        metrics.contains("xlb_services 1"),
        "one Service port: {metrics}"
    );

    // Backend 2 stops being ready: it gets no new connections.
    bed.write("web.yaml", &web_file(false));
    // Settled once 30 connections in a row reach the others only; a failed one means
    // not yet (see `try_spread`).
    until(&agent, "backend-2 leaves", || {
        bed.try_spread(cluster_ip, 30)
            .is_ok_and(|seen| !seen.contains_key("backend-2"))
    });
    let seen = bed.spread(node_port, 60);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["backend-0", "backend-1"],
        "{seen:?}"
    );
}

/// `api` (ClusterIP 203.0.113.12:80) on the keep-alive HTTP servers at `API_PORT`,
/// backend 2 ready or not.
fn api_file(backend_2_ready: bool) -> String {
    let svc = service(
        "api",
        "203.0.113.12",
        "ClusterIP",
        "  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: http
",
        "  loadBalancer: {}\n",
    );
    let endpoints = [
        (0, "node-a", true),
        (1, "node-b", true),
        (2, "node-b", backend_2_ready),
    ];
    format!("{svc}---\n{}", slice_on("api", API_PORT, &endpoints))
}

const API_PORT: u16 = 8081;

/// An endpoint that stops being ready (a Pod failing its readiness probe, or one a
/// rolling update is replacing) gets no new connections, but a TCP connection already
/// open to it keeps it, as kube-proxy's conntrack entry keeps it: a keep-alive HTTP
/// connection to backend 2 (on node-b, so source-NATed) is answered by backend 2 on
/// every request before, during and after the change, while new connections go to
/// the others.
#[test]
fn an_endpoint_that_stops_being_ready_keeps_its_open_connections() {
    let bed = Bed::new("k8sdrain", 3);
    let _http: Vec<ServerHandle> = (0..3)
        .map(|i| {
            let bind = SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), API_PORT);
            testbed::spawn_http_server(&bed.topo.backends[i], bind, &format!("backend-{i}"))
                .expect("HTTP server")
        })
        .collect();
    bed.write("node.yaml", &node());
    bed.write("api.yaml", &api_file(true));
    let agent = bed.agent("k8sdrain");
    let api = addr("203.0.113.12", 80);
    let get_new = || -> anyhow::Result<String> {
        testbed::HttpConnection::open(&bed.topo.client, api, TIMEOUT)?.get(TIMEOUT)
    };
    until(&agent, "the ClusterIP answers", || get_new().is_ok());

    // A keep-alive connection that backend 2 answers (Maglev spreads new connections
    // over the three: one in three lands there).
    let kept = (0..60)
        .find_map(|_| {
            let mut conn = testbed::HttpConnection::open(&bed.topo.client, api, TIMEOUT).ok()?;
            (conn.get(TIMEOUT).ok()? == "backend-2").then_some(conn)
        })
        .expect("a connection to backend-2 in 60");
    // `until` takes a plain `Fn`.
    let kept = std::cell::RefCell::new(kept);

    bed.write("api.yaml", &api_file(false));
    until(&agent, "new connections avoid backend-2", || {
        let again = kept
            .borrow_mut()
            .get(TIMEOUT)
            .expect("the open connection, during the change");
        assert_eq!(again, "backend-2", "the open connection moved");
        (0..12).all(|_| get_new().is_ok_and(|b| b != "backend-2"))
    });
    for n in 0..5 {
        let again = kept
            .borrow_mut()
            .get(TIMEOUT)
            .unwrap_or_else(|e| panic!("request {n} on the open connection after: {e:#}"));
        assert_eq!(again, "backend-2", "the open connection moved");
    }
    // An operator sees which backend drains.
    let (_, metrics) = http_get(&bed, 9190, "/metrics").expect("metrics");
    let draining: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("xlb_backend_draining{"))
        .collect();
    let drained = format!("backend=\"{}:{API_PORT}\"", Topology::backend_v4(2));
    assert_eq!(draining.len(), 3, "{metrics}");
    for line in draining {
        let want = if line.contains(&drained) { " 1" } else { " 0" };
        assert!(line.ends_with(want), "{line}");
    }
}

#[test]
fn traffic_policy_local_keeps_the_client_address_and_uses_local_endpoints_only() {
    let bed = Bed::new("k8sloc", 2);
    bed.write("node.yaml", &node());
    bed.write("local-svc.yaml", &local());
    bed.write(
        "local-slice.yaml",
        &slice("local", &[(0, "node-a", true), (1, "node-b", true)]),
    );
    let agent = bed.agent("k8sloc");
    let lb_ip = addr("203.0.113.12", 80);
    let local_node_port = SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), LOCAL_NODE_PORT);
    let cluster_ip = addr("203.0.113.11", 80);
    until(&agent, "the LoadBalancer IP answers", || {
        bed.ask(lb_ip).is_ok()
    });

    // External frontends: only this node's endpoint; the backend sees the client.
    for frontend in [lb_ip, local_node_port] {
        let seen = bed.spread(frontend, 40);
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            ["backend-0"],
            "{frontend}: {seen:?}"
        );
    }
    // The ClusterIP is internal traffic (policy Cluster): both endpoints.
    assert_eq!(bed.spread(cluster_ip, 60).len(), 2);

    // kube-proxy's health check: 200 with the local endpoint count.
    until(&agent, "healthCheckNodePort answers", || {
        health_check(&bed).is_ok()
    });
    let (status, body) = health_check(&bed).expect("health check");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(json["localEndpoints"], 1, "{body}");
    assert_eq!(json["service"]["namespace"], "shop", "{body}");
    assert_eq!(json["service"]["name"], "local", "{body}");

    // The local endpoint stops being ready: 503, and external traffic is dropped on
    // this node (the load balancer in front sends it elsewhere), while the ClusterIP
    // still reaches the other node's endpoint.
    bed.write(
        "local-slice.yaml",
        &slice("local", &[(0, "node-a", false), (1, "node-b", true)]),
    );
    until(&agent, "health check turns 503", || {
        health_check(&bed).is_ok_and(|(status, _)| status == 503)
    });
    assert!(
        bed.ask(lb_ip).is_err(),
        "no local endpoint: external traffic gets no backend"
    );
    let seen = bed.spread(cluster_ip, 20);
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["backend-1"], "{seen:?}");
}
