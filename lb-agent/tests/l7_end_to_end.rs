//! The L7 hop end to end, both hops real: client -> ingress VIP:80/443 -> XDP on the
//! load-balancer namespace -> the L7 hop (an L7-only agent, `--manifests DIR --l7`, in
//! backend namespace 0, which is the ingress Service's endpoint) -> echo backends
//! chosen by Ingress host and path. Requests are made with curl from the client
//! namespace; TLS certificates are issued by a CA made in the test, which curl trusts,
//! so a verified handshake proves which certificate SNI selected.
//!
//! The ExternalName bridge resolves `api.partner.example` through the L7 agent's own
//! `/etc/hosts`: the agent runs in a private mount namespace where a test file is bound
//! over it (as `ip netns exec` does with /etc/netns), never touching the host's.
//!
//! Every loop is bounded; namespaces, agents, pins and files are removed on drop.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_testbed::{
    self as testbed, AgentProcess, Echo, EchoServer, TestCa, Topology, spawn_echo_server,
};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const APP_PORT: u16 = 8080;
const SETTLE: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_secs(3);
/// Backend namespace indexes.
const L7_NODE: usize = 0;
const WEB: usize = 1;
const API: usize = 2;
const PARTNER: usize = 3;

fn vip() -> IpAddr {
    IpAddr::V4(Topology::vip_v4(40))
}

struct Bed {
    tag: String,
    topo: Topology,
    _servers: Vec<EchoServer>,
    l4_dir: PathBuf,
    l7_dir: PathBuf,
    hosts: PathBuf,
    ca: PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.l4_dir);
        let _ = std::fs::remove_dir_all(&self.l7_dir);
        let _ = std::fs::remove_file(&self.hosts);
        let _ = std::fs::remove_file(&self.ca);
    }
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let topo = Topology::for_test(tag, 4);
        let servers = [(WEB, "web"), (API, "api"), (PARTNER, "partner")]
            .into_iter()
            .map(|(i, name)| {
                spawn_echo_server(
                    &topo.backends[i],
                    SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), APP_PORT),
                    name,
                )
                .expect("echo server")
            })
            .collect();
        let base = std::env::temp_dir().join(format!("xlb-l7-{tag}-{}", std::process::id()));
        let l4_dir = base.with_extension("l4");
        let l7_dir = base.with_extension("l7");
        for dir in [&l4_dir, &l7_dir] {
            std::fs::create_dir_all(dir).expect("manifests dir");
        }
        let hosts = base.with_extension("hosts");
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1 localhost\n{} api.partner.example\n",
                Topology::backend_v4(PARTNER)
            ),
        )
        .expect("hosts file");
        let ca = base.with_extension("ca.pem");
        Bed {
            tag: tag.to_owned(),
            topo,
            _servers: servers,
            l4_dir,
            l7_dir,
            hosts,
            ca,
        }
    }

    fn write(dir: &Path, file: &str, yaml: &str) {
        testbed::write_atomically(&dir.join(file), yaml);
    }

    /// The L4 agent: XDP in the load-balancer namespace, serving the ingress Service.
    fn l4_agent(&self) -> AgentProcess<'_> {
        let dir = self.l4_dir.display().to_string();
        AgentProcess::start_with_source(
            &self.topo.lb,
            Path::new(AGENT),
            &["--manifests", &dir],
            &format!("{}-l4", self.tag),
            &["--poll-ms", "100"],
        )
        .expect("start the L4 agent")
    }

    /// The L7-only agent in backend namespace 0, with its own /etc/hosts.
    fn l7_agent(&self) -> AgentProcess<'_> {
        let dir = self.l7_dir.display().to_string();
        let hosts = self.hosts.display().to_string();
        AgentProcess::start_l7_only(
            &self.topo.backends[L7_NODE],
            &testbed::hosts_file_launcher(&hosts),
            Path::new(AGENT),
            &["--manifests", &dir],
            &format!("{}-l7", self.tag),
            &testbed::agent::L7_ARGS,
        )
        .expect("start the L7 agent")
    }

    /// curl from the client namespace; `host` resolves to the VIP. Returns the status
    /// line's code, the headers and the body.
    fn curl(&self, url: &str, extra: &[&str]) -> anyhow::Result<Response> {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        let port = if url.starts_with("https") { 443 } else { 80 };
        let resolve = format!("{host}:{port}:{}", vip());
        let ca = self.ca.display().to_string();
        let mut args = vec![
            "-sS",
            "--max-time",
            "3",
            "--include",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
        ];
        args.extend_from_slice(extra);
        args.push(url);
        let out = self.topo.client.exec("curl", &args)?;
        anyhow::ensure!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Response::parse(&String::from_utf8_lossy(&out.stdout))
    }

    /// The echo a request reached (`200` expected).
    fn echo(&self, url: &str, extra: &[&str]) -> Echo {
        let response = self.curl(url, extra).expect("request through the VIP");
        assert_eq!(response.code, 200, "{url}: {response:?}");
        serde_json::from_str(&response.body)
            .unwrap_or_else(|e| panic!("{url}: not an echo ({e}): {response:?}"))
    }
}

#[derive(Debug)]
struct Response {
    version: String,
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    /// curl `--include` output; interim 1xx heads are skipped.
    fn parse(text: &str) -> anyhow::Result<Response> {
        let mut rest = text;
        loop {
            let (head, body) = rest
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow::anyhow!("no response head in {text:?}"))?;
            let mut lines = head.lines();
            let status = lines.next().unwrap_or_default();
            let mut words = status.split_whitespace();
            let version = words.next().unwrap_or_default().to_owned();
            let code: u16 = words.next().unwrap_or_default().parse()?;
            if (100..200).contains(&code) {
                rest = body;
                continue;
            }
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                .collect();
            return Ok(Response {
                version,
                code,
                headers,
                body: body.to_owned(),
            });
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The ingress Service (the L7 hop's instances are its endpoints) for the L4 agent.
fn ingress_service() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: xlb-ingress
  namespace: xlb-system
  uid: 0c1d2e3f-0000-4000-8000-000000000001
  resourceVersion: \"900\"
  annotations:
    # The load balancer is the L7 node's gateway here, so destination-only
    # translation works, and the L7 hop sees (and forwards) the client's address; in
    # the default SNAT mode it would see the node's.
    xlb.dev/lb-mode: dnat
spec:
  type: LoadBalancer
  clusterIP: 203.0.113.41
  clusterIPs: [203.0.113.41]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  externalTrafficPolicy: Cluster
  ports:
  - {{ name: http, port: 80, protocol: TCP, targetPort: 80, nodePort: 30880 }}
  - {{ name: https, port: 443, protocol: TCP, targetPort: 443, nodePort: 30443 }}
  selector:
    app.kubernetes.io/name: xlb
status:
  loadBalancer:
    ingress:
    - {{ ip: {vip}, ipMode: VIP }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: xlb-ingress-7k2x9
  namespace: xlb-system
  labels:
    kubernetes.io/service-name: xlb-ingress
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
- addresses: [\"{l7}\"]
  conditions: {{ ready: true, serving: true, terminating: false }}
  nodeName: node-b
ports:
- {{ name: http, port: 80, protocol: TCP }}
- {{ name: https, port: 443, protocol: TCP }}
",
        vip = vip(),
        l7 = Topology::backend_v4(L7_NODE),
    )
}

/// A ClusterIP Service with one ready endpoint on backend `i`.
fn app(name: &str, cluster_ip: &str, i: usize, app_protocol: Option<&str>) -> String {
    let app_protocol = app_protocol.map_or(String::new(), |p| format!(", appProtocol: {p}"));
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: {cluster_ip}
  clusterIPs: [{cluster_ip}]
  ports:
  - {{ name: http, port: 80, protocol: TCP, targetPort: http{app_protocol} }}
  selector:
    app: {name}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-abcde
  namespace: shop
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
endpoints:
- addresses: [\"{addr}\"]
  conditions: {{ ready: true, serving: true, terminating: false }}
ports:
- {{ name: http, port: {APP_PORT}, protocol: TCP }}
",
        addr = Topology::backend_v4(i),
    )
}

/// A kubernetes.io/tls Secret (stringData, as a user writes it).
fn tls_secret(name: &str, cert: &testbed::IssuedCert) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Secret
metadata:
  name: {name}
  namespace: shop
type: kubernetes.io/tls
stringData:
  tls.crt: |
"
    );
    for line in cert.cert_pem.lines() {
        writeln!(yaml, "    {line}").expect("string");
    }
    yaml.push_str("  tls.key: |\n");
    for line in cert.key_pem.lines() {
        writeln!(yaml, "    {line}").expect("string");
    }
    yaml
}

/// The Ingress side: our IngressClass, three apps (one h2c), an ExternalName bridge
/// to a partner, two TLS hosts and a plain one.
fn write_l7_manifests(bed: &Bed) {
    let ca = TestCa::new("xlb e2e CA").expect("CA");
    std::fs::write(&bed.ca, ca.pem()).expect("CA file");
    let shop = ca.issue(&["shop.example.com"]).expect("shop cert");
    let wildcard = ca.issue(&["*.legacy.example.com"]).expect("wildcard cert");
    let mut yaml = String::from(
        "apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata:
  name: xlb
spec:
  controller: xlb.dev/ingress-controller
---
apiVersion: v1
kind: Service
metadata:
  name: partner-bridge
  namespace: shop
spec:
  type: ExternalName
  externalName: api.partner.example
---
",
    );
    yaml.push_str(&app("web", "203.0.113.51", WEB, None));
    yaml.push_str("---\n");
    yaml.push_str(&app("api", "203.0.113.52", API, None));
    yaml.push_str("---\n");
    yaml.push_str(&tls_secret("shop-tls", &shop));
    yaml.push_str("---\n");
    yaml.push_str(&tls_secret("legacy-tls", &wildcard));
    yaml.push_str(
        "---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: shop
  namespace: shop
  creationTimestamp: \"2026-11-01T10:00:00Z\"
spec:
  ingressClassName: xlb
  tls:
  - hosts: [shop.example.com]
    secretName: shop-tls
  rules:
  - host: shop.example.com
    http:
      paths:
      - { path: /, pathType: Prefix, backend: { service: { name: web, port: { name: http } } } }
      - { path: /api, pathType: Prefix, backend: { service: { name: api, port: { number: 80 } } } }
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: plain
  namespace: shop
  creationTimestamp: \"2026-11-01T10:00:00Z\"
spec:
  ingressClassName: xlb
  rules:
  - host: plain.example.com
    http:
      paths:
      - { path: /, pathType: Prefix, backend: { service: { name: web, port: { number: 80 } } } }
      - { path: /ws, pathType: Exact, backend: { service: { name: api, port: { number: 80 } } } }
      - { path: /partner, pathType: Prefix, backend: { service: { name: partner-bridge, port: { number: 8080 } } } }
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: legacy
  namespace: shop
  creationTimestamp: \"2026-11-01T10:00:00Z\"
  annotations:
    nginx.ingress.kubernetes.io/ssl-redirect: \"false\"
spec:
  ingressClassName: xlb
  tls:
  - hosts: [\"*.legacy.example.com\"]
    secretName: legacy-tls
  rules:
  - host: \"*.legacy.example.com\"
    http:
      paths:
      - { path: /, pathType: Prefix, backend: { service: { name: api, port: { number: 80 } } } }
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: other-class
  namespace: shop
spec:
  ingressClassName: nginx
  rules:
  - host: other.example.com
    http:
      paths:
      - { path: /, pathType: Prefix, backend: { service: { name: web, port: { number: 80 } } } }
",
    );
    Bed::write(&bed.l7_dir, "ingress.yaml", &yaml);
}

/// Both agents up and the first route answering through the VIP.
fn start(bed: &Bed) -> (AgentProcess<'_>, AgentProcess<'_>) {
    Bed::write(&bed.l4_dir, "ingress-service.yaml", &ingress_service());
    write_l7_manifests(bed);
    let l4 = bed.l4_agent();
    let l7 = bed.l7_agent();
    l7.until("a route answers through the VIP", SETTLE, || {
        bed.curl("http://plain.example.com/", &[])
            .is_ok_and(|r| r.code == 200)
    });
    (l4, l7)
}

#[test]
fn ingress_routes_by_host_and_path_with_the_client_address_forwarded() {
    let bed = Bed::new("l7route");
    let (_l4, _l7) = start(&bed);

    let root = bed.echo("http://plain.example.com/", &[]);
    assert_eq!(root.name, "web");
    assert_eq!(
        root.header("host"),
        Some("plain.example.com"),
        "Host preserved"
    );
    let client = Topology::client_v4().to_string();
    assert_eq!(root.header("x-forwarded-for"), Some(client.as_str()));
    assert_eq!(root.header("x-real-ip"), Some(client.as_str()));
    assert_eq!(root.header("x-forwarded-proto"), Some("http"));
    assert_eq!(root.header("x-forwarded-host"), Some("plain.example.com"));
    assert_eq!(root.header("x-forwarded-port"), Some("80"));
    let id = root
        .header("x-request-id")
        .expect("a request id is generated");
    assert_eq!(id.len(), 32, "{id}");

    // An address the client claims is not believed (ingress-nginx's default without
    // use-forwarded-headers): X-Forwarded-For is the real one.
    let proxied = bed.echo(
        "http://plain.example.com/x?y=1",
        &[
            "-H",
            "X-Forwarded-For: 198.51.100.200",
            "-H",
            "X-Request-Id: abc",
        ],
    );
    assert_eq!(proxied.header("x-forwarded-for"), Some(client.as_str()));
    assert_eq!(proxied.header("x-request-id"), Some("abc"));
    assert_eq!(proxied.uri, "/x?y=1", "path and query forwarded");

    // Exact /ws and the partner prefix go elsewhere; /wsx is still Prefix `/`.
    assert_eq!(bed.echo("http://plain.example.com/wsx", &[]).name, "web");
    assert_eq!(
        bed.echo("http://PLAIN.example.com:80/partner/v1", &[]).name,
        "partner"
    );

    // Unknown host, and a host of another IngressClass: 404.
    for host in ["nowhere.example.com", "other.example.com"] {
        let response = bed.curl(&format!("http://{host}/"), &[]).expect("request");
        assert_eq!(response.code, 404, "{host}: {response:?}");
    }
}

#[test]
fn tls_by_sni_redirects_and_websocket() {
    let bed = Bed::new("l7tls");
    let (_l4, _l7) = start(&bed);

    // TLS host: plain HTTP is redirected with 308, path and query kept.
    let redirect = bed
        .curl("http://shop.example.com/cart?id=7", &[])
        .expect("request");
    assert_eq!(redirect.code, 308, "{redirect:?}");
    assert_eq!(
        redirect.header("location"),
        Some("https://shop.example.com/cart?id=7")
    );

    // HTTPS, verified against the test CA: the shop certificate for shop.example.com,
    // over HTTP/2 (ALPN) and HTTP/1.1.
    let h2 = bed
        .curl("https://shop.example.com/api/orders", &["--http2"])
        .expect("h2");
    assert_eq!(h2.code, 200, "{h2:?}");
    assert_eq!(h2.version, "HTTP/2");
    let echo: Echo = serde_json::from_str(&h2.body).expect("echo");
    assert_eq!(echo.name, "api", "longest prefix /api");
    assert_eq!(echo.header("x-forwarded-proto"), Some("https"));
    assert_eq!(echo.header("x-forwarded-port"), Some("443"));
    let h1 = bed.echo("https://shop.example.com/", &["--http1.1"]);
    assert_eq!(h1.name, "web");

    // The wildcard certificate for one label under legacy.example.com; that Ingress
    // turned the redirect off.
    assert_eq!(bed.echo("https://a.legacy.example.com/", &[]).name, "api");
    assert_eq!(bed.echo("http://b.legacy.example.com/", &[]).name, "api");

    // An unknown SNI gets the default certificate, which the test CA did not sign.
    let unknown = bed.curl("https://nowhere.example.com/", &[]);
    assert!(
        unknown.is_err(),
        "default certificate must not verify: {unknown:?}"
    );
    let insecure = bed
        .curl("https://nowhere.example.com/", &["--insecure"])
        .expect("insecure request");
    assert_eq!(insecure.code, 404);

    // A WebSocket through both hops.
    let echoes = testbed::websocket_echo(
        &bed.topo.client,
        SocketAddr::new(vip(), 80),
        "plain.example.com",
        "/ws",
        &["hello", "xlb"],
        STEP,
    )
    .expect("WebSocket through the L7 hop");
    assert_eq!(echoes, ["hello", "xlb"]);
}

/// Ingresses with ingress-nginx annotations, over the web and api Services.
fn write_annotated_ingresses(bed: &Bed) {
    let client = Topology::client_v4();
    let ingress = |name: &str, host: &str, service: &str, path: &str, annotations: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: {name}
  namespace: shop
  creationTimestamp: \"2026-11-02T10:00:00Z\"
  annotations:
{annotations}spec:
  ingressClassName: xlb
  rules:
  - host: {host}
    http:
      paths:
      - {{ path: \"{path}\", pathType: ImplementationSpecific, backend: {{ service: {{ name: {service}, port: {{ number: 80 }} }} }} }}
---
"
        )
    };
    let p = "    nginx.ingress.kubernetes.io/";
    let mut yaml = String::new();
    yaml.push_str(&ingress(
        "rewrite",
        "rewrite.example.com",
        "web",
        "/v1(/|$)(.*)",
        &format!("{p}use-regex: \"true\"\n{p}rewrite-target: /$2\n{p}enable-cors: \"true\"\n{p}cors-allow-origin: https://shop.example.com\n"),
    ));
    yaml.push_str(&ingress(
        "main",
        "canary.example.com",
        "web",
        "/",
        &format!("{p}affinity: cookie\n"),
    ));
    yaml.push_str(&ingress(
        "canary",
        "canary.example.com",
        "api",
        "/",
        &format!("{p}canary: \"true\"\n{p}canary-by-header: X-Canary\n"),
    ));
    yaml.push_str(&ingress(
        "allowed",
        "allowed.example.com",
        "web",
        "/",
        &format!("{p}allowlist-source-range: {client}/32\n"),
    ));
    yaml.push_str(&ingress(
        "denied",
        "denied.example.com",
        "web",
        "/",
        &format!("{p}whitelist-source-range: 192.0.2.0/24\n"),
    ));
    yaml.push_str(&ingress(
        "snippet",
        "snippet.example.com",
        "web",
        "/",
        &format!("{p}configuration-snippet: \"return 200;\"\n"),
    ));
    Bed::write(&bed.l7_dir, "annotated.yaml", &yaml);
}

/// ingress-nginx annotations through XDP and the hop: a regex rewrite, a canary by
/// header, CORS, an allowlist on the real client address, cookie affinity, and a
/// refused snippet, as an operator would write them.
#[test]
fn ingress_nginx_annotations_through_xdp_and_the_hop() {
    let bed = Bed::new("l7annot");
    let (_l4, mut l7) = start(&bed);
    write_annotated_ingresses(&bed);
    l7.until("the annotated Ingresses are served", SETTLE, || {
        bed.curl("http://allowed.example.com/", &[])
            .is_ok_and(|r| r.code == 200)
    });

    // rewrite-target with capture groups; CORS for the allowed origin only.
    let origin = ["-H", "Origin: https://shop.example.com"];
    let rewritten = bed
        .curl("http://rewrite.example.com/v1/orders?id=7", &origin)
        .unwrap();
    assert_eq!(rewritten.code, 200, "{rewritten:?}");
    let echo: Echo = serde_json::from_str(&rewritten.body).unwrap();
    assert_eq!(echo.uri, "/orders?id=7");
    assert_eq!(
        rewritten.header("access-control-allow-origin"),
        Some("https://shop.example.com")
    );
    let preflight = bed
        .curl(
            "http://rewrite.example.com/v1/x",
            &["-X", "OPTIONS", origin[0], origin[1]],
        )
        .unwrap();
    assert_eq!(preflight.code, 204, "{preflight:?}");
    let other = bed
        .curl(
            "http://rewrite.example.com/v1/x",
            &["-H", "Origin: https://evil.test"],
        )
        .unwrap();
    assert_eq!(other.header("access-control-allow-origin"), None);

    // Canary by header; affinity cookie on the main route.
    let main = bed.curl("http://canary.example.com/", &[]).unwrap();
    let echo: Echo = serde_json::from_str(&main.body).unwrap();
    assert_eq!(echo.name, "web");
    assert!(
        main.header("set-cookie")
            .is_some_and(|c| c.starts_with("INGRESSCOOKIE=")),
        "{main:?}"
    );
    assert_eq!(
        bed.echo("http://canary.example.com/", &["-H", "X-Canary: always"])
            .name,
        "api"
    );

    // The allowlist sees the real client address through XDP; X-Forwarded-For does
    // not fool it.
    assert_eq!(bed.echo("http://allowed.example.com/", &[]).name, "web");
    let denied = bed
        .curl(
            "http://denied.example.com/",
            &["-H", "X-Forwarded-For: 192.0.2.7"],
        )
        .unwrap();
    assert_eq!(denied.code, 403, "{denied:?}");

    // The snippet's Ingress is not served.
    assert_eq!(
        bed.curl("http://snippet.example.com/", &[]).unwrap().code,
        404
    );

    // SIGTERM: the hop drains (nothing in flight here) and the agent exits cleanly.
    let pid = l7.pid().expect("the L7 agent runs").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let status = l7
        .wait_exit(Duration::from_secs(30))
        .expect("the agent exits");
    assert!(status.success(), "{status:?}\n{}", l7.log());
    assert!(l7.log().contains("L7 hop draining"), "{}", l7.log());
}

// ---- the typical ingress-nginx deployment (tests/fixtures/ingress-nginx) -----------

/// Backend namespaces for the fixture: the hop, then the fixture's endpoints.
const FIXTURE_BACKENDS: [(&str, usize); 6] = [
    ("192.0.2.11", 1), // web
    ("192.0.2.12", 2), // web
    ("192.0.2.13", 3), // web-canary
    ("192.0.2.21", 4), // api
    ("192.0.2.22", 5), // api
    ("192.0.2.31", 6), // oauth2-proxy
];

/// The fixture (a `kubectl get -o yaml` List) with its endpoint addresses moved onto
/// the topology's backends; everything else as the operator's cluster has it.
fn fixture_on_topology() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingress-nginx/cluster.yaml");
    let mut text = std::fs::read_to_string(path).expect("fixture");
    // Through placeholders, so one replacement never feeds the next.
    for (i, (from, _)) in FIXTURE_BACKENDS.iter().enumerate() {
        text = text.replace(&format!("- {from}\n"), &format!("- @{i}@\n"));
    }
    for (i, (_, backend)) in FIXTURE_BACKENDS.iter().enumerate() {
        text = text.replace(
            &format!("- @{i}@\n"),
            &format!("- {}\n", Topology::backend_v4(*backend)),
        );
    }
    text
}

/// oauth2-proxy's `/oauth2/auth` as the auth service (202 with the user headers for
/// the `_oauth2_proxy=valid` cookie, 401 otherwise) and `/oauth2/start` (200), one
/// request per connection; stopped and joined on drop.
struct AuthService {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuthService {
    fn start(ns: &testbed::Netns, addr: SocketAddr) -> AuthService {
        let listener = ns
            .run_in(|| std::net::TcpListener::bind(addr))
            .expect("netns")
            .expect("bind the auth service");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => answer_auth(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        AuthService {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AuthService {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer_auth(mut stream: std::net::TcpStream) {
    use std::io::{Read as _, Write as _};
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(STEP));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let answer = if head.starts_with("get /oauth2/start") {
        "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsign in\n"
    } else if head.contains("_oauth2_proxy=valid") {
        "HTTP/1.1 202 Accepted\r\nx-auth-request-user: alice\r\n\
         x-auth-request-email: alice@example.com\r\ncontent-length: 0\r\n\r\n"
    } else {
        "HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n"
    };
    let _ = stream.write_all(answer.as_bytes());
}

/// The kubectl-shaped fixture of a typical ingress-nginx deployment (the one
/// `ingress_check.rs` reports on), served unchanged but for its endpoint addresses by
/// an agent that takes over ingress-nginx's class, through XDP and the hop: the
/// oauth2-proxy external auth, the canary by header and by weight, the regex rewrite
/// with CORS, cookie affinity, the allowlist, and the refused snippet.
#[test]
fn the_typical_ingress_nginx_deployment_through_xdp_and_the_hop() {
    let tag = "l7fixture";
    let (bed, _auth) = fixture_bed(tag);
    let _l4 = bed.l4_agent();
    let dir = bed.l7_dir.display().to_string();
    let mut args = testbed::agent::L7_ARGS.to_vec();
    args.extend([
        "--l7-ingress-class",
        "nginx",
        "--l7-controller-name",
        "k8s.io/ingress-nginx",
    ]);
    let l7 = AgentProcess::start_l7_only(
        &bed.topo.backends[L7_NODE],
        &[],
        Path::new(AGENT),
        &["--manifests", &dir],
        &format!("{tag}-l7"),
        &args,
    )
    .expect("start the L7 agent");
    l7.until("the fixture is served through the VIP", SETTLE, || {
        bed.curl("http://api.example.com/v1/x", &[])
            .is_ok_and(|r| r.code == 200)
    });

    fixture_auth_and_affinity(&bed);
    fixture_canary(&bed);
    fixture_rewrite_cors_and_snippet(&bed);
    let session = ["-H", "Cookie: _oauth2_proxy=valid"];
    // The allowlist, narrowed to the backends' range, now refuses the client, whatever
    // X-Forwarded-For says; the check still reaches the auth service (the hop routes
    // it to the backend directly).
    let narrowed = fixture_on_topology().replace(
        "allowlist-source-range: \"198.51.100.0/24\"",
        "allowlist-source-range: \"192.0.2.0/24\"",
    );
    Bed::write(&bed.l7_dir, "cluster.yaml", &narrowed);
    l7.until("the narrowed allowlist applies", SETTLE, || {
        bed.curl(
            "http://auth.example.com/oauth2/start",
            &["-H", "X-Forwarded-For: 192.0.2.7"],
        )
        .is_ok_and(|r| r.code == 403)
    });
    assert_eq!(
        bed.curl("http://shop.example.com/", &session).unwrap().code,
        200
    );
}

/// Seven backend namespaces: the hop, the fixture's echo endpoints, the auth service.
fn fixture_bed(tag: &str) -> (Bed, AuthService) {
    let topo = Topology::for_test(tag, 7);
    let names = ["web-a", "web-b", "web-canary", "api-a", "api-b"];
    let servers: Vec<EchoServer> = names
        .iter()
        .enumerate()
        .map(|(n, name)| {
            let i = n + 1;
            spawn_echo_server(
                &topo.backends[i],
                SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), APP_PORT),
                name,
            )
            .expect("echo server")
        })
        .collect();
    let auth = AuthService::start(
        &topo.backends[6],
        SocketAddr::new(IpAddr::V4(Topology::backend_v4(6)), 4180),
    );
    let base = std::env::temp_dir().join(format!("xlb-l7-{tag}-{}", std::process::id()));
    let bed = Bed {
        tag: tag.to_owned(),
        topo,
        _servers: servers,
        l4_dir: base.with_extension("l4"),
        l7_dir: base.with_extension("l7"),
        hosts: base.with_extension("hosts"),
        ca: base.with_extension("ca.pem"),
    };
    for dir in [&bed.l4_dir, &bed.l7_dir] {
        std::fs::create_dir_all(dir).expect("manifests dir");
    }
    std::fs::write(&bed.hosts, "127.0.0.1 localhost\n").expect("hosts");
    std::fs::write(&bed.ca, TestCa::new("unused").expect("CA").pem()).expect("CA file");
    Bed::write(&bed.l4_dir, "ingress-service.yaml", &ingress_service());
    Bed::write(&bed.l7_dir, "cluster.yaml", &fixture_on_topology());
    (bed, auth)
}

/// External auth (sign-in, the user headers) and cookie affinity.
fn fixture_auth_and_affinity(bed: &Bed) {
    // External auth: no session is sent to sign in, with rd; the app is not asked.
    let signin = bed.curl("http://shop.example.com/cart?id=7", &[]).unwrap();
    assert_eq!(signin.code, 302, "{signin:?}");
    assert_eq!(
        signin.header("location"),
        Some("https://auth.example.com/oauth2/start?rd=%2Fcart%3Fid%3D7")
    );
    // The oauth2-proxy Ingress itself is open to the allowlisted client.
    assert_eq!(
        bed.curl("http://auth.example.com/oauth2/start", &[])
            .unwrap()
            .code,
        200
    );
    // A session: forwarded with the auth service's user headers, not the client's.
    // `X-Canary: never` keeps these on the main route: xlb's canary rules do not look
    // at the affinity cookie (ingress-nginx's affinity-canary-behavior, reported as a
    // difference).
    let session = [
        "-H",
        "Cookie: _oauth2_proxy=valid",
        "-H",
        "X-Auth-Request-User: mallory",
        "-H",
        "X-Canary: never",
    ];
    let web = bed.curl("http://shop.example.com/", &session).unwrap();
    assert_eq!(web.code, 200, "{web:?}");
    let echo: Echo = serde_json::from_str(&web.body).unwrap();
    assert!(echo.name.starts_with("web-"), "{echo:?}");
    assert_eq!(echo.header("x-auth-request-user"), Some("alice"));
    assert_eq!(
        echo.header("x-auth-request-email"),
        Some("alice@example.com")
    );

    // Cookie affinity (session-cookie-name route): the cookie keeps the endpoint.
    let cookie = web
        .header("set-cookie")
        .and_then(|c| c.split(';').next())
        .filter(|c| c.starts_with("route="))
        .unwrap_or_else(|| panic!("no affinity cookie: {web:?}"))
        .to_owned();
    assert!(web.header("set-cookie").unwrap().contains("Max-Age=172800"));
    let sticky = format!("Cookie: _oauth2_proxy=valid; {cookie}");
    assert_ne!(echo.name, "web-canary");
    for _ in 0..10 {
        let again = bed.echo(
            "http://shop.example.com/",
            &["-H", &sticky, "-H", "X-Canary: never"],
        );
        assert_eq!(
            again.name, echo.name,
            "the affinity cookie keeps the endpoint"
        );
    }
}

/// The canary by header (always / never) and by weight.
fn fixture_canary(bed: &Bed) {
    let session = ["-H", "Cookie: _oauth2_proxy=valid"];
    // The canary by header (always / never) and by weight (10 of 100).
    let canary = |value: &str| {
        bed.echo(
            "http://shop.example.com/",
            &[
                "-H",
                "Cookie: _oauth2_proxy=valid",
                "-H",
                &format!("X-Canary: {value}"),
            ],
        )
        .name
    };
    assert_eq!(canary("always"), "web-canary");
    assert!(canary("never").starts_with("web-"));
    assert_ne!(canary("never"), "web-canary");
    let mut to_canary = 0;
    for _ in 0..100 {
        if bed.echo("http://shop.example.com/", &session).name == "web-canary" {
            to_canary += 1;
        }
    }
    // Binomial(100, 0.1): outside 1..=35 with probability below 1e-4.
    assert!(
        (1..=35).contains(&to_canary),
        "{to_canary} of 100 to the canary"
    );
}

/// The regex rewrite with CORS, and the refused snippet.
fn fixture_rewrite_cors_and_snippet(bed: &Bed) {
    // The regex rewrite (/v1(/|$)(.*) -> /$2) with CORS for the shop's origin.
    let origin = ["-H", "Origin: https://shop.example.com"];
    let api = bed
        .curl("http://api.example.com/v1/orders?id=7", &origin)
        .unwrap();
    assert_eq!(api.code, 200, "{api:?}");
    let echo: Echo = serde_json::from_str(&api.body).unwrap();
    assert!(echo.name.starts_with("api-"));
    assert_eq!(echo.uri, "/orders?id=7");
    assert_eq!(
        api.header("access-control-allow-origin"),
        Some("https://shop.example.com")
    );
    let preflight = bed
        .curl(
            "http://api.example.com/v1/x",
            &["-X", "OPTIONS", origin[0], origin[1]],
        )
        .unwrap();
    assert_eq!(preflight.code, 204, "{preflight:?}");

    // The snippet's Ingress is refused, so not served.
    assert_eq!(
        bed.curl("http://legacy.example.com/", &[]).unwrap().code,
        404
    );
}
