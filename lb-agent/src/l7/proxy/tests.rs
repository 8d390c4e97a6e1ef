//! The proxy against real sockets in a namespace the test creates: backends are hyper
//! servers on 192.0.2.x, the proxy listens on 203.0.113.1, clients connect from
//! 198.51.100.1 (all on the namespace's loopback).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{HeaderMap, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use super::{Proxy, ProxyConfig};
use crate::l7::backend_tls::SignaturesOnly;
use crate::l7::metrics::Metrics;
use crate::l7::{Certificate, Snapshot, tls};
use lb_core::cluster::ObjectKey;
use lb_core::routes::{
    Access, Affinity, Balance, Canary, Cors, HostPattern, HostRule, Limits, PathKind, PathRegex,
    PathRule, Policy, Redirect, Rewrite, Route, RouteTable, Target, Upstream, UpstreamProtocol,
};
use lb_testbed::{Netns, check_privileges};

mod auth;

const PROXY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const DEADLINE: Duration = Duration::from_secs(20);
/// Routed into a device that drops every packet (a dead endpoint).
const DEAD_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 9);

fn backend_ip(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, i))
}

/// Runs `body` on a current-thread runtime in a fresh namespace holding the test
/// addresses on `lo`; a hang fails the test at [`DEADLINE`].
fn in_netns<F, Fut>(tag: &str, body: F)
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = ()>,
{
    if let Err(e) = check_privileges() {
        panic!("proxy tests run in their own network namespaces: {e:#}");
    }
    let ns = Netns::with_l7_test_addresses(&format!("l7-{tag}")).expect("create netns");
    // DEAD_IP leads into a veth whose peer is down, which drops everything: connects
    // to it time out.
    for args in [
        &[
            "link", "add", "dead0", "type", "veth", "peer", "name", "dead1",
        ][..],
        &["link", "set", "dead0", "up"],
        &["route", "add", "192.0.2.9/32", "dev", "dead0"],
    ] {
        ns.ip(args).expect("set up the dead route");
    }
    ns.block_on(DEADLINE, body).expect("test body in its netns");
}

// ---- backends -------------------------------------------------------------------

/// A hyper backend (HTTP/1.1 and h2c) that answers with its name, the request line
/// and the headers it received; `/stall` never answers, `/hold` answers once
/// `release` turns true, an Upgrade request is accepted and echoed.
struct Backend {
    addr: SocketAddr,
    /// Connections accepted.
    conns: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
    holding: Arc<AtomicUsize>,
}

async fn backend(ip: IpAddr, name: &'static str, release: watch::Receiver<bool>) -> Backend {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(AtomicUsize::new(0));
    let (h, held, accepted) = (Arc::clone(&hits), Arc::clone(&holding), Arc::clone(&conns));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            let (hits, holding, release) = (Arc::clone(&h), Arc::clone(&held), release.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (hits, holding, mut release) =
                        (Arc::clone(&hits), Arc::clone(&holding), release.clone());
                    async move { answer(name, req, &hits, &holding, &mut release).await }
                });
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = server
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend {
        addr,
        conns,
        hits,
        holding,
    }
}

async fn answer(
    name: &str,
    mut req: Request<hyper::body::Incoming>,
    hits: &AtomicUsize,
    holding: &AtomicUsize,
    release: &mut watch::Receiver<bool>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    hits.fetch_add(1, Ordering::Relaxed);
    if req.headers().contains_key("upgrade") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .body(Full::default())
            .unwrap());
    }
    match req.uri().path() {
        "/stall" => std::future::pending::<()>().await,
        "/hold" => {
            holding.fetch_add(1, Ordering::Relaxed);
            let _ = release.wait_for(|r| *r).await;
        }
        _ => {}
    }
    let mut text = format!(
        "name: {name}\nversion: {:?}\nrequest: {} {}\n",
        req.version(),
        req.method(),
        req.uri()
    );
    for (k, v) in req.headers() {
        let _ = writeln!(text, "{k}: {}", v.to_str().unwrap_or("?"));
    }
    let (_, body) = req.into_parts();
    let len = body.collect().await?.to_bytes().len();
    let _ = writeln!(text, "body-length: {len}");
    Ok(Response::builder()
        .header("connection", "x-backend-secret")
        .header("x-backend-secret", "1")
        .header("keep-alive", "timeout=5")
        .header("x-backend-public", "1")
        .body(Full::new(Bytes::from(text)))
        .unwrap())
}

/// The value of `name` in a backend's echo (first occurrence, all joined otherwise).
fn echoed(body: &str, name: &str) -> Option<String> {
    let values: Vec<&str> = body
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect();
    (!values.is_empty()).then(|| values.join(" | "))
}

// ---- snapshots ------------------------------------------------------------------

fn key(name: &str) -> ObjectKey {
    ObjectKey {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn route(name: &str, endpoints: &[SocketAddr]) -> Route {
    route_to(name, Target::Endpoints(endpoints.to_vec()))
}

fn route_to(name: &str, target: Target) -> Route {
    Route {
        upstream: Arc::new(Upstream {
            name: format!("default/{name}:80"),
            target,
            protocol: UpstreamProtocol::Http1,
            tls: None,
        }),
        ingress: key(name),
        ssl_redirect: false,
        balance: Balance::RoundRobin,
        max_body_bytes: None,
        policy: Arc::default(),
    }
}

fn host(host: &str, path: &str, route: Route) -> HostRule {
    let pattern = match host {
        "" => HostPattern::Any,
        h => match h.strip_prefix('*') {
            Some(suffix) => HostPattern::Wildcard(suffix.to_owned()),
            None => HostPattern::Exact(h.to_owned()),
        },
    };
    HostRule {
        host: pattern,
        paths: vec![PathRule {
            path: path.to_owned(),
            kind: PathKind::Prefix,
            route,
        }],
    }
}

fn snapshot(rules: Vec<HostRule>) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        routes: RouteTable::new(rules, None),
        certificates: Vec::new(),
    })
}

// ---- the proxy ------------------------------------------------------------------

struct Running {
    http: SocketAddr,
    https: SocketAddr,
    metrics: Metrics,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

fn test_config() -> ProxyConfig {
    ProxyConfig {
        connect_timeout: Duration::from_secs(2),
        upstream_timeout: Duration::from_secs(5),
        ..ProxyConfig::new(
            Some(SocketAddr::from((PROXY_IP, 0))),
            Some(SocketAddr::from((PROXY_IP, 0))),
        )
    }
}

fn start(config: ProxyConfig, first: Arc<Snapshot>) -> Running {
    let mut registry = Registry::with_prefix("xlb");
    let proxy = Proxy::bind(config, &mut registry).expect("bind proxy");
    let (tx, rx) = watch::channel(first);
    let running = Running {
        http: proxy.http_addr().unwrap(),
        https: proxy.https_addr().unwrap(),
        metrics: proxy.metrics(),
        snapshots: tx,
    };
    tokio::spawn(async move { proxy.run(rx).await });
    running
}

// ---- clients --------------------------------------------------------------------

/// The commonest setup: backend `a` on 192.0.2.1 as the route for every host, behind
/// a proxy with `config`; the sender releases the backend's `/hold`.
async fn proxy_to_a(config: ProxyConfig) -> (Backend, Running, watch::Sender<bool>) {
    let (release, rx) = watch::channel(false);
    let a = backend(backend_ip(1), "a", rx).await;
    let p = start(config, snapshot(vec![host("", "/", route("a", &[a.addr]))]));
    (a, p, release)
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((CLIENT_IP, 0))).unwrap();
    socket.connect(addr).await.expect("connect to proxy")
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let io = TokioIo::new(connect(addr).await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(req).await.expect("response");
    read_answer(response).await
}

async fn read_answer(response: Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(addr: SocketAddr, host: &str, path: &str) -> Answer {
    let req = Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap();
    send(addr, req).await
}

/// Writes `bytes` and reads until the proxy closes (bounded by 3 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = connect(addr).await;
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until a counter reads `want` (at most 5 s): the proxy's workers run on
/// threads of their own, so a counter may move just after the client saw the outcome
/// (a connection is closed, then counted).
async fn settles_at(count: impl Fn() -> u64, want: u64) {
    let mut last = count();
    for _ in 0..500 {
        if last == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        last = count();
    }
    assert_eq!(last, want, "the counter did not settle");
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

// ---- routing and headers ----------------------------------------------------------

#[test]
fn routes_by_host_and_path_and_answers_404() {
    in_netns("route", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx.clone()).await;
        let b = backend(backend_ip(2), "b", rx.clone()).await;
        let c = backend(backend_ip(3), "c", rx.clone()).await;
        let p = start(
            test_config(),
            snapshot(vec![
                host("a.example", "/", route("a", &[a.addr])),
                host("*.wild.example", "/", route("c", &[c.addr])),
                host("b.example", "/api", route("b", &[b.addr])),
            ]),
        );
        let got = get(p.http, "a.example", "/x").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(echoed(&got.body, "name").as_deref(), Some("a"));
        let got = get(p.http, "B.example:8080", "/api/v1?q=1").await;
        assert_eq!(echoed(&got.body, "name").as_deref(), Some("b"));
        assert_eq!(
            echoed(&got.body, "request").as_deref(),
            Some("GET /api/v1?q=1")
        );
        let got = get(p.http, "x.wild.example", "/").await;
        assert_eq!(echoed(&got.body, "name").as_deref(), Some("c"));
        for (h, path) in [
            ("b.example", "/other"),
            ("nothing.example", "/"),
            ("a.b.wild.example", "/"),
        ] {
            let got = get(p.http, h, path).await;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{h}{path}");
            assert_eq!(got.body, "no route for this host and path\n");
        }
        settles_at(|| p.metrics.local_answer_count("no_route"), 3).await;
    });
}

#[test]
fn normalises_the_path_before_routing_and_forwards_it() {
    in_netns("normpath", || async {
        let (_tx, rx) = watch::channel(false);
        let api = backend(backend_ip(1), "api", rx.clone()).await;
        let admin = backend(backend_ip(2), "admin", rx).await;
        let p = start(
            test_config(),
            snapshot(vec![HostRule {
                paths: vec![
                    PathRule {
                        path: "/api".into(),
                        kind: PathKind::Prefix,
                        route: route("api", &[api.addr]),
                    },
                    PathRule {
                        path: "/admin".into(),
                        kind: PathKind::Prefix,
                        route: route("admin", &[admin.addr]),
                    },
                ],
                ..host("a.example", "/", route("unused", &[]))
            }]),
        );
        for (target, forwarded, name) in [
            ("/api/../admin", "/admin", "admin"),
            ("/api/%2e%2e/admin", "/admin", "admin"),
            ("//admin", "/admin", "admin"),
            ("/%61dmin", "/admin", "admin"),
            (
                "/api/./..//admin/x?q=/../%2e",
                "/admin/x?q=/../%2e",
                "admin",
            ),
            ("/api/%2Fadmin", "/api/%2Fadmin", "api"),
        ] {
            let req =
                format!("GET {target} HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n");
            let got = raw(p.http, req.as_bytes()).await;
            assert!(got.starts_with("HTTP/1.1 200"), "{target}: {got}");
            assert_eq!(echoed(&got, "name").as_deref(), Some(name), "{target}");
            assert_eq!(
                echoed(&got, "request"),
                Some(format!("GET {forwarded}")),
                "{target}"
            );
        }
        for target in ["/../admin", "/api/../../admin", "/a%zz"] {
            let req =
                format!("GET {target} HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n");
            let got = raw(p.http, req.as_bytes()).await;
            assert!(got.starts_with("HTTP/1.1 400"), "{target}: {got}");
            assert!(
                got.ends_with("\r\n\r\nbad request path\n"),
                "{target}: {got}"
            );
        }
        settles_at(|| p.metrics.local_answer_count("bad_path"), 3).await;
    });
}

#[test]
fn redirects_plain_http_to_https_with_308() {
    in_netns("redirect", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx).await;
        let mut r = route("a", &[a.addr]);
        r.ssl_redirect = true;
        let p = start(test_config(), snapshot(vec![host("a.example", "/", r)]));
        let got = get(p.http, "a.example:8080", "/p/q?x=1&y=2").await;
        assert_eq!(got.status, StatusCode::PERMANENT_REDIRECT);
        let expected = format!("https://a.example:{}/p/q?x=1&y=2", p.https.port());
        assert_eq!(got.headers["location"], expected.as_str());
        assert_eq!(a.hits.load(Ordering::Relaxed), 0);
        // On the HTTPS listener the same route is served.
        let tls = tls_connect(p.https, "a.example", &[]).await;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/p")
            .header("host", "a.example")
            .body(Full::<Bytes>::default())
            .unwrap();
        let got = read_answer(sender.send_request(req).await.unwrap()).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            echoed(&got.body, "x-forwarded-proto").as_deref(),
            Some("https")
        );
    });
}

#[test]
fn adds_forwarding_headers_and_strips_hop_by_hop() {
    in_netns("headers", || async {
        let (_a, p, _tx) = proxy_to_a(test_config()).await;
        let req = Request::get("/h")
            .header("host", "a.example:8080")
            .header("x-forwarded-for", "203.0.113.9")
            .header("connection", "x-client-secret")
            .header("x-client-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-client-public", "1")
            .body(Full::default())
            .unwrap();
        let got = send(p.http, req).await;
        let b = &got.body;
        assert_eq!(echoed(b, "host").as_deref(), Some("a.example:8080"));
        // ingress-nginx's default: the client's X-Forwarded-For is not believed.
        assert_eq!(
            echoed(b, "x-forwarded-for").as_deref(),
            Some("198.51.100.1")
        );
        assert_eq!(echoed(b, "x-real-ip").as_deref(), Some("198.51.100.1"));
        assert_eq!(echoed(b, "x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            echoed(b, "x-forwarded-host").as_deref(),
            Some("a.example:8080")
        );
        let port = p.http.port().to_string();
        assert_eq!(
            echoed(b, "x-forwarded-port").as_deref(),
            Some(port.as_str())
        );
        let id = echoed(b, "x-request-id").expect("request id");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
        assert_eq!(echoed(b, "x-client-public").as_deref(), Some("1"));
        for gone in ["x-client-secret", "keep-alive", "proxy-connection"] {
            assert_eq!(echoed(b, gone), None, "{gone} reached the backend:\n{b}");
        }
        // The same both ways: the backend's hop-by-hop headers stay with the proxy.
        assert!(got.headers.contains_key("x-backend-public"));
        for gone in ["x-backend-secret", "keep-alive"] {
            assert!(!got.headers.contains_key(gone), "{gone} reached the client");
        }
        // An incoming request id is kept.
        let req = Request::get("/")
            .header("host", "a.example")
            .header("x-request-id", "given-id")
            .body(Full::default())
            .unwrap();
        let got = send(p.http, req).await;
        assert_eq!(
            echoed(&got.body, "x-request-id").as_deref(),
            Some("given-id")
        );
    });
}

#[test]
fn host_rules_follow_rfc_9112_and_9113() {
    in_netns("host", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx.clone()).await;
        let b = backend(backend_ip(2), "b", rx.clone()).await;
        let any = backend(backend_ip(3), "any", rx).await;
        let p = start(
            test_config(),
            snapshot(vec![
                host("a.test", "/", route("a", &[a.addr])),
                host("b.test", "/", route("b", &[b.addr])),
                host("", "/", route("any", &[any.addr])),
            ]),
        );
        for head in [
            "GET / HTTP/1.1\r\n",
            "GET / HTTP/1.1\r\nHost:\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n",
            "GET / HTTP/1.1\r\nHost: user@a.test\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n",
            "GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n",
        ] {
            let got = raw(
                p.http,
                format!("{head}Connection: close\r\n\r\n").as_bytes(),
            )
            .await;
            assert!(got.starts_with("HTTP/1.1 400"), "{head:?}: {got}");
            assert!(
                got.ends_with("\r\n\r\nmissing or invalid Host\n"),
                "{head:?}: {got}"
            );
        }
        settles_at(|| p.metrics.local_answer_count("bad_host"), 6).await;
        // Absolute form: the target's authority replaces Host, for routing and backend.
        let got = raw(
            p.http,
            b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert_eq!(echoed(&got, "name").as_deref(), Some("a"));
        assert_eq!(echoed(&got, "host").as_deref(), Some("a.test"));
        assert_eq!(echoed(&got, "request").as_deref(), Some("GET /x"));
        // HTTP/1.0 may omit Host: the host-less rules serve it.
        let got = raw(p.http, b"GET / HTTP/1.0\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.0 200"), "{got}");
        assert_eq!(echoed(&got, "name").as_deref(), Some("any"));
        // HTTP/2: :authority wins over a Host header.
        let io = TokioIo::new(connect(p.http).await);
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://a.test/h2")
            .header("host", "b.test")
            .body(Full::<Bytes>::default())
            .unwrap();
        let got = read_answer(sender.send_request(req).await.unwrap()).await;
        assert_eq!(echoed(&got.body, "name").as_deref(), Some("a"));
        assert_eq!(echoed(&got.body, "host").as_deref(), Some("a.test"));
    });
}

#[test]
fn a_malformed_chunked_body_is_a_client_error() {
    in_netns("chunked", || async {
        let (_a, p, _tx) = proxy_to_a(test_config()).await;
        let got = raw(
            p.http,
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
        assert!(got.ends_with("\r\n\r\nmalformed request body\n"), "{got}");
        settles_at(|| p.metrics.local_answer_count("bad_body"), 1).await;
        assert_eq!(p.metrics.upstream_error_count("protocol"), 0);
        assert_eq!(p.metrics.local_answer_count("upstream_protocol"), 0);
    });
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    in_netns("pipeline", || async {
        let (_a, p, _tx) = proxy_to_a(test_config()).await;
        let got = raw(
            p.http,
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        let one = got.find("request: GET /one").expect("first answer");
        let two = got.find("request: GET /two").expect("second answer");
        assert!(one < two, "{got}");
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 2, "{got}");
    });
}

/// One connection, pipelined: a plain GET and a POST whose body arrived with it
/// (the hop's own server), then a chunked POST (handed to hyper with what was read),
/// then a GET that hyper serves too. All answered, in order.
#[test]
fn a_connection_handed_to_hyper_mid_stream_keeps_every_request() {
    in_netns("handoff", || async {
        let (_a, p, _tx) = proxy_to_a(test_config()).await;
        let got = raw(
            p.http,
            b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n\
              POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi\
              POST /three HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n\
              GET /four HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        let at = |what: &str| got.find(what).unwrap_or_else(|| panic!("{what}: {got}"));
        let order = [
            at("request: GET /one"),
            at("request: POST /two"),
            at("request: POST /three"),
            at("request: GET /four"),
        ];
        assert!(order.is_sorted(), "{got}");
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 4, "{got}");
    });
}

#[test]
fn reuses_backend_connections() {
    in_netns("pool", || async {
        let (a, p, _tx) = proxy_to_a(test_config()).await;
        for _ in 0..5 {
            assert_eq!(get(p.http, "a", "/").await.status, StatusCode::OK);
            // Lets the finished connection park in the pool (not a timing assertion:
            // the pool returns connections off the request path).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(a.hits.load(Ordering::Relaxed), 5);
        assert_eq!(
            a.conns.load(Ordering::Relaxed),
            1,
            "five requests, one connection"
        );
    });
}

/// A bare HTTP/1.1 backend: answers every request head `200 ok` (keep-alive), and
/// closes the connection right after when `close_after_answer`. Counts the connections
/// it accepted and those its peer closed.
struct RawBackend {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    closed_by_peer: Arc<AtomicUsize>,
}

async fn raw_backend(ip: IpAddr, close_after_answer: bool) -> RawBackend {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let closed_by_peer = Arc::new(AtomicUsize::new(0));
    let (accepted, closed) = (Arc::clone(&conns), Arc::clone(&closed_by_peer));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::Relaxed);
            let closed = Arc::clone(&closed);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() || close_after_answer {
                            return;
                        }
                    }
                }
            });
        }
    });
    RawBackend {
        addr,
        conns,
        closed_by_peer,
    }
}

#[test]
fn a_parked_connection_the_backend_closed_is_not_reused() {
    in_netns("stale", || async {
        let b = raw_backend(backend_ip(1), true).await;
        let p = start(
            test_config(),
            snapshot(vec![host("", "/", route("b", &[b.addr]))]),
        );
        for _ in 0..3 {
            let got = get(p.http, "a", "/").await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(got.body, "ok");
        }
        assert_eq!(
            b.conns.load(Ordering::Relaxed),
            3,
            "a connection per request"
        );
    });
}

#[test]
fn parked_backend_connections_are_closed_after_the_idle_timeout() {
    in_netns("parked", || async {
        let b = raw_backend(backend_ip(1), false).await;
        let config = ProxyConfig {
            upstream_idle_timeout: Duration::from_millis(200),
            ..test_config()
        };
        let p = start(config, snapshot(vec![host("", "/", route("b", &[b.addr]))]));
        assert_eq!(get(p.http, "a", "/").await.status, StatusCode::OK);
        // Nothing checks this endpoint out again: only the pool's sweep closes it.
        wait_until("the parked connection closed", || {
            b.closed_by_peer.load(Ordering::Relaxed) == 1
        })
        .await;
        assert_eq!(b.conns.load(Ordering::Relaxed), 1);
    });
}

// ---- balancing, failures and retries -------------------------------------------------

#[test]
fn round_robin_spreads_requests_evenly() {
    in_netns("rr", || async {
        let (_tx, rx) = watch::channel(false);
        let mut backends = Vec::new();
        for i in 1..=3 {
            backends.push(backend(backend_ip(i), "b", rx.clone()).await);
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
        let p = start(
            test_config(),
            snapshot(vec![host("", "/", route("rr", &addrs))]),
        );
        for _ in 0..9 {
            assert_eq!(get(p.http, "a", "/").await.status, StatusCode::OK);
        }
        for b in &backends {
            assert_eq!(b.hits.load(Ordering::Relaxed), 3);
        }
        // A new snapshot with the same upstream keeps the rotation going.
        p.snapshots
            .send(snapshot(vec![host("", "/", route("rr", &addrs))]))
            .unwrap();
        for _ in 0..3 {
            get(p.http, "a", "/").await;
        }
        for b in &backends {
            assert_eq!(b.hits.load(Ordering::Relaxed), 4);
        }
    });
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    in_netns("leastreq", || async {
        let (release, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx.clone()).await;
        let b = backend(backend_ip(2), "b", rx.clone()).await;
        let mut r = route("lr", &[a.addr, b.addr]);
        r.balance = Balance::LeastRequest;
        let p = start(test_config(), snapshot(vec![host("", "/", r)]));
        let http = p.http;
        let held = tokio::spawn(async move { get(http, "a", "/hold").await });
        wait_until("a held request", || {
            a.holding.load(Ordering::Relaxed) + b.holding.load(Ordering::Relaxed) == 1
        })
        .await;
        let (busy, idle) = if a.holding.load(Ordering::Relaxed) == 1 {
            (&a, &b)
        } else {
            (&b, &a)
        };
        for _ in 0..10 {
            assert_eq!(get(p.http, "a", "/").await.status, StatusCode::OK);
        }
        assert_eq!(
            busy.hits.load(Ordering::Relaxed),
            1,
            "only the held request"
        );
        assert_eq!(idle.hits.load(Ordering::Relaxed), 10);
        release.send(true).unwrap();
        assert_eq!(held.await.unwrap().status, StatusCode::OK);
    });
}

#[test]
fn answers_503_without_endpoints_and_502_when_refused() {
    in_netns("5xx", || async {
        let closed = SocketAddr::from((backend_ip(1), 1));
        let p = start(
            test_config(),
            snapshot(vec![
                host("empty.example", "/", route("empty", &[])),
                host("refused.example", "/", route("refused", &[closed])),
            ]),
        );
        let got = get(p.http, "empty.example", "/").await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got.body, "no ready endpoints for this route\n");
        let got = get(p.http, "refused.example", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        settles_at(|| p.metrics.upstream_error_count("connect"), 1).await;
        assert_eq!(
            p.metrics.retries_count(),
            0,
            "no other endpoint to retry on"
        );
    });
}

#[test]
fn retries_a_connect_failure_on_another_endpoint() {
    in_netns("retry", || async {
        let (_tx, rx) = watch::channel(false);
        let live = backend(backend_ip(2), "live", rx).await;
        let closed = SocketAddr::from((backend_ip(1), 1));
        let p = start(
            test_config(),
            snapshot(vec![host("", "/", route("retry", &[closed, live.addr]))]),
        );
        for _ in 0..4 {
            let got = get(p.http, "a", "/").await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(echoed(&got.body, "name").as_deref(), Some("live"));
        }
        assert_eq!(live.hits.load(Ordering::Relaxed), 4);
        assert!(p.metrics.retries_count() >= 1);
    });
}

#[test]
fn a_dead_endpoint_is_ejected_after_one_connect_timeout() {
    in_netns("eject", || async {
        let (_tx, rx) = watch::channel(false);
        let live = backend(backend_ip(2), "live", rx).await;
        let dead = SocketAddr::from((DEAD_IP, 80));
        let config = ProxyConfig {
            connect_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let p = start(
            config,
            snapshot(vec![host("", "/", route("eject", &[dead, live.addr]))]),
        );
        for _ in 0..6 {
            let got = get(p.http, "a", "/").await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(echoed(&got.body, "name").as_deref(), Some("live"));
        }
        assert_eq!(
            p.metrics.upstream_error_count("connect_timeout"),
            1,
            "the dead endpoint was tried again within its back-off"
        );
        settles_at(|| p.metrics.ejections_count(), 1).await;
        settles_at(|| p.metrics.retries_count(), 1).await;
    });
}

#[test]
fn answers_504_when_the_backend_stalls() {
    in_netns("stall", || async {
        let config = ProxyConfig {
            upstream_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let (_a, p, _tx) = proxy_to_a(config).await;
        let got = get(p.http, "a", "/stall").await;
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
        settles_at(|| p.metrics.upstream_error_count("timeout"), 1).await;
        // The same connection pool still serves.
        assert_eq!(get(p.http, "a", "/").await.status, StatusCode::OK);
    });
}

// ---- limits -------------------------------------------------------------------------

#[test]
fn rejects_large_bodies_with_413() {
    in_netns("413", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx).await;
        let mut r = route("a", &[a.addr]);
        r.max_body_bytes = Some(1000);
        let p = start(test_config(), snapshot(vec![host("", "/", r)]));
        let req = Request::post("/")
            .header("host", "a")
            .body(Full::new(Bytes::from(vec![b'x'; 2000])))
            .unwrap();
        let got = send(p.http, req).await;
        assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(got.body, "request body too large\n");
        assert_eq!(
            a.hits.load(Ordering::Relaxed),
            0,
            "refused on Content-Length"
        );
        // Refused on the announced length alone, before any body byte arrives.
        let got = raw(
            p.http,
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 413"), "{got}");
        assert_eq!(a.hits.load(Ordering::Relaxed), 0);

        // Chunked: counted while streaming.
        let chunked = |n: usize| {
            let chunks =
                (0..n).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'y'; 100]))));
            Request::post("/")
                .header("host", "a")
                .body(StreamBody::new(futures_util::stream::iter(chunks)))
                .unwrap()
        };
        let io = TokioIo::new(connect(p.http).await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let got = read_answer(sender.send_request(chunked(20)).await.unwrap()).await;
        assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
        let io = TokioIo::new(connect(p.http).await);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let got = read_answer(sender.send_request(chunked(5)).await.unwrap()).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(echoed(&got.body, "body-length").as_deref(), Some("500"));
        settles_at(|| p.metrics.local_answer_count("body_too_large"), 3).await;
    });
}

#[test]
fn rejects_oversize_and_too_many_headers_with_431() {
    in_netns("431", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx.clone()).await;
        let p = start(
            test_config(),
            snapshot(vec![host("", "/", route("a", &[a.addr]))]),
        );
        let too_large = "\r\n\r\nrequest headers too large\n";
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "b".repeat(20 * 1024)
        );
        let got = raw(p.http, big.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        assert!(got.ends_with(too_large), "{got}");
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
        for i in 0..150 {
            let _ = write!(many, "X-H{i}: v\r\n");
        }
        many.push_str("\r\n");
        let got = raw(p.http, many.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        assert!(got.ends_with(too_large), "{got}");
        settles_at(|| p.metrics.local_answer_count("headers_too_large"), 2).await;
        // Beyond twice the limit, hyper's parser refuses the head itself and closes.
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
            "b".repeat(40 * 1024)
        );
        let got = raw(p.http, huge.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        settles_at(|| p.metrics.closed_count("headers_too_large"), 1).await;
        // Just under the limits still passes (hyper's 8 KiB floor is not our limit).
        let mut fine = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
        for i in 0..90 {
            let _ = write!(fine, "X-H{i}: v\r\n");
        }
        let _ = write!(fine, "X-Big: {}\r\n\r\n", "b".repeat(12 * 1024));
        let got = raw(p.http, fine.as_bytes()).await;
        assert!(
            got.starts_with("HTTP/1.1 200"),
            "{}",
            &got[..got.len().min(200)]
        );
        assert_eq!(a.hits.load(Ordering::Relaxed), 1);

        // Configured limits, a size below hyper's 8 KiB buffer floor included.
        let a = backend(backend_ip(2), "a", rx).await;
        let config = ProxyConfig {
            max_headers: 20,
            max_header_bytes: 4096,
            ..test_config()
        };
        let p = start(config, snapshot(vec![host("", "/", route("a", &[a.addr]))]));
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n");
        for i in 0..30 {
            let _ = write!(many, "X-H{i}: v\r\n");
        }
        many.push_str("\r\n");
        let got = raw(p.http, many.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        assert!(got.ends_with(too_large), "{got}");
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "b".repeat(6 * 1024)
        );
        let got = raw(p.http, big.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
        assert!(got.ends_with(too_large), "{got}");
        settles_at(|| p.metrics.local_answer_count("headers_too_large"), 2).await;
        assert_eq!(p.metrics.closed_count("headers_too_large"), 0);
        assert_eq!(a.hits.load(Ordering::Relaxed), 0);
    });
}

#[test]
fn every_local_answer_has_a_short_text_body() {
    in_netns("bodies", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx).await;
        let refused = SocketAddr::from((backend_ip(2), 1));
        let mut limited = route("small", &[a.addr]);
        limited.max_body_bytes = Some(10);
        let mut secure = route("secure", &[a.addr]);
        secure.ssl_redirect = true;
        let config = ProxyConfig {
            upstream_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let p = start(
            config,
            snapshot(vec![
                host("a.test", "/", route("a", &[a.addr])),
                host("small.test", "/", limited),
                host("refused.test", "/", route("refused", &[refused])),
                host("empty.test", "/", route("empty", &[])),
                host("secure.test", "/", secure),
            ]),
        );
        let big_head = format!("X-Big: {}\r\n", "b".repeat(20 * 1024));
        for (status, host, extra, path) in [
            (400, "a b", String::new(), "/"),
            (400, "a.test", String::new(), "/../x"),
            (404, "none.test", String::new(), "/"),
            (413, "small.test", "Content-Length: 11\r\n".to_owned(), "/"),
            (431, "a.test", big_head, "/"),
            (502, "refused.test", String::new(), "/"),
            (503, "empty.test", String::new(), "/"),
            (504, "a.test", String::new(), "/stall"),
            (308, "secure.test", String::new(), "/"),
        ] {
            let req =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
            let got = raw(p.http, req.as_bytes()).await;
            assert!(
                got.starts_with(&format!("HTTP/1.1 {status} ")),
                "{status}: {got}"
            );
            let (head, body) = got.split_once("\r\n\r\n").expect("a head");
            assert!(
                head.to_ascii_lowercase()
                    .contains("content-type: text/plain; charset=utf-8"),
                "{status}: {head}"
            );
            assert!(
                !body.trim().is_empty() && body.len() < 80 && body.ends_with('\n'),
                "{status}: body {body:?}"
            );
        }
    });
}

#[test]
fn a_connection_is_accepted_with_its_first_bytes() {
    in_netns("defer", || async {
        let (_a, p, _tx) = proxy_to_a(test_config()).await;
        let accepted = p.metrics.accepted("http");
        let mut client = connect(p.http).await;
        // Connected, but silent: the kernel holds it (TCP_DEFER_ACCEPT), the hop has
        // not accepted it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(accepted.get(), 0, "accepted before its first bytes");
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut got))
            .await
            .expect("answered")
            .unwrap();
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert_eq!(accepted.get(), 1);
    });
}

#[test]
fn listens_with_nginx_backlog() {
    in_netns("backlog", || async {
        let p = start(test_config(), snapshot(Vec::new()));
        let out = std::process::Command::new("ss")
            .args(["-ltnH", "src", "203.0.113.1"])
            .output()
            .expect("run ss");
        let out = String::from_utf8_lossy(&out.stdout);
        for port in [p.http.port(), p.https.port()] {
            let line = out
                .lines()
                .find(|l| l.contains(&format!("203.0.113.1:{port} ")))
                .unwrap_or_else(|| panic!("no listener on {port} in {out}"));
            // State, Recv-Q, Send-Q (the backlog of a listening socket), ...
            let backlog = line.split_whitespace().nth(2);
            assert_eq!(backlog, Some("511"), "{line}");
        }
    });
}

#[test]
fn slow_headers_are_cut_off_while_others_are_served() {
    in_netns("slowloris", || async {
        let config = ProxyConfig {
            header_timeout: Duration::from_millis(500),
            ..test_config()
        };
        let (_a, p, _tx) = proxy_to_a(config).await;
        let mut slow = connect(p.http).await;
        let http = p.http;
        let served = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            get(http, "a", "/").await.status
        });
        // 400 bytes at 20 ms each would take 8 s: far beyond the header timeout.
        let head = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-Slow: {}\r\n\r\n",
            "s".repeat(360)
        );
        let mut cut = false;
        for byte in head.as_bytes() {
            if slow.write_all(&[*byte]).await.is_err() {
                cut = true;
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(20), slow.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    cut = true;
                    break;
                }
                Ok(Ok(_)) => panic!("a slow head got an answer"),
                Err(_) => {}
            }
        }
        assert!(cut, "the slow client was never cut off");
        assert_eq!(served.await.unwrap(), StatusCode::OK);
        settles_at(|| p.metrics.closed_count("header_timeout"), 1).await;
    });
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    in_netns("idle", || async {
        let config = ProxyConfig {
            idle_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let (_a, p, _tx) = proxy_to_a(config).await;
        let mut stream = connect(p.http).await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        // Reads the answer, then waits for the close (bounded by the test deadline).
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
            .await
            .expect("idle connection not closed")
            .unwrap();
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
        settles_at(|| p.metrics.closed_count("idle_timeout"), 1).await;
    });
}

// ---- TLS and HTTP/2 -------------------------------------------------------------------

async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(SignaturesOnly::new(Arc::clone(&provider)));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    connector
        .connect(name, connect(addr).await)
        .await
        .expect("TLS handshake")
}

/// The certificate the proxy serves for `sni`.
async fn served_cert(addr: SocketAddr, sni: &str) -> CertificateDer<'static> {
    let tls = tls_connect(addr, sni, &[]).await;
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn valid_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    let cert = webpki::EndEntityCert::try_from(cert).unwrap();
    cert.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap())
        .is_ok()
}

fn certificate(sans: &[&str], hosts: &[&str]) -> Certificate {
    let names: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    Certificate {
        hosts: hosts.iter().map(|s| (*s).to_owned()).collect(),
        secret: key("tls"),
        key: tls::certified_key(c.cert.der().clone(), &c.signing_key.serialize_der()).unwrap(),
    }
}

fn with_certs(rules: Vec<HostRule>, certificates: Vec<Certificate>) -> Arc<Snapshot> {
    Arc::new(Snapshot {
        routes: RouteTable::new(rules, None),
        certificates,
    })
}

#[test]
fn sni_picks_the_certificate_and_unknown_names_get_the_default() {
    in_netns("sni", || async {
        let certs = vec![
            certificate(&["a.example"], &["a.example"]),
            certificate(&["*.wild.example"], &["*.wild.example"]),
            certificate(&["san.example"], &[]),
        ];
        let p = start(test_config(), with_certs(Vec::new(), certs));
        let a = served_cert(p.https, "a.example").await;
        assert!(valid_for(&a, "a.example"));
        let w = served_cert(p.https, "x.wild.example").await;
        assert!(valid_for(&w, "x.wild.example"));
        let s = served_cert(p.https, "san.example").await;
        assert!(valid_for(&s, "san.example"));
        let unknown = served_cert(p.https, "unknown.example").await;
        for name in [
            "a.example",
            "x.wild.example",
            "san.example",
            "unknown.example",
        ] {
            assert!(!valid_for(&unknown, name));
        }
        let cn = tls::DEFAULT_CERT_CN.as_bytes();
        assert!(
            unknown.windows(cn.len()).any(|w| w == cn),
            "not the default certificate"
        );
    });
}

#[test]
fn a_silent_tls_client_is_cut_off_after_the_header_timeout() {
    in_netns("tlsslow", || async {
        let config = ProxyConfig {
            header_timeout: Duration::from_millis(300),
            ..test_config()
        };
        let p = start(config, with_certs(Vec::new(), Vec::new()));
        let mut silent = connect(p.https).await;
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("a silent TLS client was not cut off");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        settles_at(|| p.metrics.closed_count("tls_handshake_timeout"), 1).await;
        // Meanwhile the listener still completes handshakes.
        served_cert(p.https, "a.example").await;
    });
}

#[test]
fn a_new_snapshot_swaps_the_certificate() {
    in_netns("certswap", || async {
        let old = certificate(&["a.example"], &["a.example"]);
        let p = start(test_config(), with_certs(Vec::new(), vec![old.clone()]));
        let first = served_cert(p.https, "a.example").await;
        assert_eq!(first.as_ref(), old.key.cert[0].as_ref());
        let new = certificate(&["a.example"], &["a.example"]);
        p.snapshots
            .send(with_certs(Vec::new(), vec![new.clone()]))
            .unwrap();
        let second = served_cert(p.https, "a.example").await;
        assert_eq!(second.as_ref(), new.key.cert[0].as_ref());
        assert_ne!(first, second);
    });
}

#[test]
fn serves_h2_over_tls_via_alpn() {
    in_netns("h2alpn", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx).await;
        let p = start(
            test_config(),
            with_certs(
                vec![host("a.example", "/", route("a", &[a.addr]))],
                vec![certificate(&["a.example"], &["a.example"])],
            ),
        );
        let tls = tls_connect(p.https, "a.example", &[b"h2", b"http/1.1"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        for _ in 0..3 {
            let req = Request::get("https://a.example/h2")
                .body(Full::<Bytes>::default())
                .unwrap();
            let response = sender.send_request(req).await.unwrap();
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let got = read_answer(response).await;
            assert_eq!(got.status, StatusCode::OK);
            // The backend speaks HTTP/1.1 and sees the :authority as Host.
            assert_eq!(echoed(&got.body, "version").as_deref(), Some("HTTP/1.1"));
            assert_eq!(echoed(&got.body, "host").as_deref(), Some("a.example"));
            assert_eq!(
                echoed(&got.body, "x-forwarded-proto").as_deref(),
                Some("https")
            );
        }
    });
}

#[test]
fn speaks_h2c_to_backends_that_ask_for_it() {
    in_netns("h2c", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx).await;
        let mut r = route("a", &[a.addr]);
        Arc::make_mut(&mut r.upstream).protocol = UpstreamProtocol::H2c;
        let p = start(test_config(), snapshot(vec![host("", "/", r)]));
        for _ in 0..3 {
            let got = get(p.http, "a.example", "/grpc").await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(echoed(&got.body, "version").as_deref(), Some("HTTP/2.0"));
            assert_eq!(
                echoed(&got.body, "request").as_deref(),
                Some("GET http://a.example/grpc")
            );
        }
    });
}

// ---- upgrades and ExternalName ------------------------------------------------------------

#[test]
fn tunnels_a_websocket_echo() {
    in_netns("ws", || async {
        let (_a, p, _tx) = proxy_to_a(test_config()).await;
        let mut s = connect(p.http).await;
        s.write_all(
            b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: websocket"), "{head}");
        // A masked text frame "hello", echoed byte for byte through the tunnel.
        let frame = [
            0x81,
            0x85,
            1,
            2,
            3,
            4,
            b'h' ^ 1,
            b'e' ^ 2,
            b'l' ^ 3,
            b'l' ^ 4,
            b'o' ^ 1,
        ];
        for _ in 0..3 {
            s.write_all(&frame).await.unwrap();
            let mut echo = [0u8; 11];
            s.read_exact(&mut echo).await.unwrap();
            assert_eq!(echo, frame);
        }
        settles_at(|| p.metrics.upgrades_count(), 1).await;
    });
}

#[test]
fn refuses_h2c_upgrades_and_forwards_plain_http1() {
    in_netns("h2cup", || async {
        let (a, p, _tx) = proxy_to_a(test_config()).await;
        // The test backend switches protocols for any Upgrade it sees.
        let got = raw(
            p.http,
            b"GET /h2c HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n\
              GET /inside HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.contains("request: GET /h2c"), "{got}");
        for gone in ["upgrade", "http2-settings"] {
            assert!(
                !got.to_ascii_lowercase().contains(&format!("\n{gone}:")),
                "{gone} reached the backend:\n{got}"
            );
        }
        // The next request on the connection is routed as a request, not tunnelled.
        assert!(got.contains("request: GET /inside"), "{got}");
        assert_eq!(got.matches("HTTP/1.1 200").count(), 2, "{got}");
        assert_eq!(p.metrics.upgrades_count(), 0);
        assert_eq!(a.hits.load(Ordering::Relaxed), 2);
    });
}

#[test]
fn resolves_external_names_by_dns() {
    in_netns("dns", || async {
        let (_tx, rx) = watch::channel(false);
        let local = backend(IpAddr::V4(Ipv4Addr::LOCALHOST), "local", rx).await;
        let p = start(
            test_config(),
            snapshot(vec![
                host(
                    "ext.example",
                    "/",
                    route_to(
                        "ext",
                        Target::Dns {
                            host: "localhost".into(),
                            port: local.addr.port(),
                        },
                    ),
                ),
                host(
                    "bad.example",
                    "/",
                    route_to(
                        "bad",
                        Target::Dns {
                            host: "no-such-name.invalid".into(),
                            port: 80,
                        },
                    ),
                ),
            ]),
        );
        // `localhost` may also give ::1, where nothing listens: the retry covers it.
        for _ in 0..3 {
            let got = get(p.http, "ext.example", "/").await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(echoed(&got.body, "name").as_deref(), Some("local"));
        }
        let got = get(p.http, "bad.example", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.body, "cannot resolve the backend\n");
        settles_at(|| p.metrics.upstream_error_count("dns"), 1).await;
    });
}

// ---- ingress-nginx annotations ------------------------------------------------------

fn with_policy(mut route: Route, policy: Policy) -> Route {
    route.policy = Arc::new(policy);
    route
}

/// `permanent-redirect` (301 unless `-code`), `temporal-redirect` (302) and
/// `app-root` (302 for `/` only) answer without a backend, before the SSL redirect.
#[test]
fn annotation_redirects_and_app_root() {
    in_netns("redirects", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let mut moved = with_policy(
            route("moved", &[app.addr]),
            Policy {
                redirect: Some(Redirect {
                    code: 301,
                    location: "https://www.example.com".into(),
                }),
                ..Policy::default()
            },
        );
        moved.ssl_redirect = true;
        let temporary = with_policy(
            route("temporary", &[app.addr]),
            Policy {
                redirect: Some(Redirect {
                    code: 307,
                    location: "https://maintenance.example.com/".into(),
                }),
                ..Policy::default()
            },
        );
        let rooted = with_policy(
            route("rooted", &[app.addr]),
            Policy {
                app_root: Some("/app1".into()),
                ..Policy::default()
            },
        );
        let p = start(
            test_config(),
            snapshot(vec![
                host("moved.example", "/", moved),
                host("temporary.example", "/", temporary),
                host("approot.example", "/", rooted),
            ]),
        );
        let got = get(p.http, "moved.example", "/some/page?q=1").await;
        assert_eq!(got.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(got.headers["location"], "https://www.example.com");
        let got = get(p.http, "temporary.example", "/x").await;
        assert_eq!(got.status, StatusCode::TEMPORARY_REDIRECT);
        assert_eq!(got.headers["location"], "https://maintenance.example.com/");
        let got = get(p.http, "approot.example", "/").await;
        assert_eq!(got.status, StatusCode::FOUND);
        assert_eq!(got.headers["location"], "http://approot.example/app1");
        let got = get(p.http, "approot.example", "/app1").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(echoed(&got.body, "request").as_deref(), Some("GET /app1"));
        assert_eq!(app.hits.load(Ordering::Relaxed), 1);
        settles_at(|| p.metrics.local_answer_count("annotation_redirect"), 2).await;
        settles_at(|| p.metrics.local_answer_count("app_root"), 1).await;
    });
}

/// ingress-nginx's rewrite example (`/something(/|$)(.*)`, `rewrite-target: /$2`)
/// with `upstream-vhost` and `x-forwarded-prefix`: the backend sees the rewritten
/// path (query kept), the vhost as `Host`, the client's host as `X-Forwarded-Host`.
#[test]
fn rewrite_target_upstream_vhost_and_forwarded_prefix() {
    in_netns("rewrite", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let path = "/something(/|$)(.*)";
        let rewritten = with_policy(
            route("rewritten", &[app.addr]),
            Policy {
                rewrite: Some(Rewrite {
                    pattern: PathRegex::new(path, false).unwrap(),
                    target: "/$2".into(),
                }),
                upstream_vhost: Some("internal.example".into()),
                forwarded_prefix: Some("/something".into()),
                ..Policy::default()
            },
        );
        let rule = HostRule {
            host: HostPattern::Exact("rewrite.bar.com".into()),
            paths: vec![PathRule {
                path: path.into(),
                kind: PathKind::Regex,
                route: rewritten,
            }],
        };
        let p = start(test_config(), snapshot(vec![rule]));
        for (request, seen) in [
            ("/something", "GET /"),
            ("/something/", "GET /"),
            ("/something/new", "GET /new"),
            ("/Something/new/deeper?q=1", "GET /new/deeper?q=1"),
        ] {
            let got = get(p.http, "rewrite.bar.com", request).await;
            assert_eq!(got.status, StatusCode::OK, "{request}");
            assert_eq!(
                echoed(&got.body, "request").as_deref(),
                Some(seen),
                "{request}"
            );
            assert_eq!(
                echoed(&got.body, "host").as_deref(),
                Some("internal.example")
            );
            assert_eq!(
                echoed(&got.body, "x-forwarded-host").as_deref(),
                Some("rewrite.bar.com")
            );
            assert_eq!(
                echoed(&got.body, "x-forwarded-prefix").as_deref(),
                Some("/something")
            );
        }
        let got = get(p.http, "rewrite.bar.com", "/other").await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
    });
}

/// ingress-nginx's CORS defaults: an allowed origin gets the `Access-Control-*`
/// headers on the answer and a 204 to its preflight; another origin gets none and its
/// OPTIONS goes to the backend.
#[test]
fn cors_for_allowed_origins() {
    in_netns("cors", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let cors = with_policy(
            route("cors", &[app.addr]),
            Policy {
                cors: Some(Cors {
                    allow_origin: vec!["https://*.example.com".into()],
                    allow_methods: "GET, PUT, POST, DELETE, PATCH, OPTIONS".into(),
                    allow_headers: "Content-Type,Authorization".into(),
                    expose_headers: String::new(),
                    allow_credentials: true,
                    max_age: 1_728_000,
                }),
                ..Policy::default()
            },
        );
        let p = start(
            test_config(),
            snapshot(vec![host("api.example", "/", cors)]),
        );
        let request = |method: &str, origin: &str| {
            Request::builder()
                .method(method)
                .uri("/data")
                .header("host", "api.example")
                .header("origin", origin)
                .body(Full::default())
                .unwrap()
        };
        let got = send(p.http, request("OPTIONS", "https://app.example.com")).await;
        assert_eq!(got.status, StatusCode::NO_CONTENT);
        assert_eq!(
            got.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(got.headers["access-control-allow-credentials"], "true");
        assert_eq!(
            got.headers["access-control-allow-methods"],
            "GET, PUT, POST, DELETE, PATCH, OPTIONS"
        );
        assert_eq!(got.headers["access-control-max-age"], "1728000");
        assert!(!got.headers.contains_key("access-control-expose-headers"));
        assert_eq!(app.hits.load(Ordering::Relaxed), 0);
        let got = send(p.http, request("GET", "https://APP.example.com")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(
            got.headers["access-control-allow-origin"],
            "https://APP.example.com"
        );
        for origin in [
            "https://evil.test",
            "https://a.b.example.com",
            "http://app.example.com",
        ] {
            let got = send(p.http, request("OPTIONS", origin)).await;
            assert_eq!(got.status, StatusCode::OK, "{origin}");
            assert!(
                !got.headers.contains_key("access-control-allow-origin"),
                "{origin}"
            );
        }
        assert_eq!(app.hits.load(Ordering::Relaxed), 4);
    });
}

/// Source ranges are checked against the client's socket address, never
/// `X-Forwarded-For`: 198.51.100.1 is outside 192.0.2.0/24 and inside a denylist.
#[test]
fn source_ranges_use_the_real_client_address() {
    in_netns("ranges", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let policy = |allow: &[&str], deny: &[&str]| Policy {
            access: Some(Access {
                allow: allow.iter().map(|n| n.parse().unwrap()).collect(),
                deny: deny.iter().map(|n| n.parse().unwrap()).collect(),
            }),
            ..Policy::default()
        };
        let p = start(
            test_config(),
            snapshot(vec![
                host(
                    "in.example",
                    "/",
                    with_policy(route("in", &[app.addr]), policy(&["198.51.100.0/24"], &[])),
                ),
                host(
                    "out.example",
                    "/",
                    with_policy(route("out", &[app.addr]), policy(&["192.0.2.0/24"], &[])),
                ),
                host(
                    "deny.example",
                    "/",
                    with_policy(
                        route("deny", &[app.addr]),
                        policy(&[], &["198.51.100.1/32"]),
                    ),
                ),
            ]),
        );
        assert_eq!(get(p.http, "in.example", "/").await.status, StatusCode::OK);
        for h in ["out.example", "deny.example"] {
            let req = Request::get("/")
                .header("host", h)
                .header("x-forwarded-for", "192.0.2.7")
                .body(Full::default())
                .unwrap();
            let got = send(p.http, req).await;
            assert_eq!(got.status, StatusCode::FORBIDDEN, "{h}");
            assert_eq!(got.body, "client address not allowed\n");
        }
        assert_eq!(app.hits.load(Ordering::Relaxed), 1);
        settles_at(|| p.metrics.local_answer_count("source_range"), 2).await;
    });
}

fn canary_of(main: Route, canary: Canary) -> Route {
    let policy = Policy {
        canary: Some(Arc::new(canary)),
        ..Policy::default()
    };
    with_policy(main, policy)
}

fn canary(upstream: &Route) -> Canary {
    Canary {
        upstream: Arc::clone(&upstream.upstream),
        ingress: key("canary"),
        by_header: None,
        header_value: None,
        header_pattern: None,
        by_cookie: None,
        weight: 0,
        weight_total: 100,
    }
}

/// The name of the backend that answers a GET / for `host` with `headers`.
async fn backend_name(addr: SocketAddr, host: &str, headers: &[(&str, &str)]) -> String {
    let mut req = Request::get("/").header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let got = send(addr, req.body(Full::default()).unwrap()).await;
    echoed(&got.body, "name").unwrap_or_default()
}

/// Canary by header (`always`/`never`, an exact value, a pattern), by cookie, and by
/// weight (0 and total are exact; a split sends both ways).
#[test]
fn canary_by_header_cookie_and_weight() {
    in_netns("canary", || async {
        let (_tx, rx) = watch::channel(false);
        let main = backend(backend_ip(1), "main", rx.clone()).await;
        let new = backend(backend_ip(2), "new", rx).await;
        let new_route = route("new", &[new.addr]);
        let by_header = Canary {
            by_header: Some("X-Canary".into()),
            by_cookie: Some("canary".into()),
            ..canary(&new_route)
        };
        let by_value = Canary {
            by_header: Some("X-Region".into()),
            header_value: Some("eu-west".into()),
            ..canary(&new_route)
        };
        let by_pattern = Canary {
            by_header: Some("X-Region".into()),
            header_pattern: Some(PathRegex::plain("^eu-.*").unwrap()),
            ..canary(&new_route)
        };
        let all = Canary {
            weight: 5,
            weight_total: 5,
            ..canary(&new_route)
        };
        let half = Canary {
            weight: 50,
            ..canary(&new_route)
        };
        let rules = [
            ("header.example", by_header),
            ("value.example", by_value),
            ("pattern.example", by_pattern),
            ("all.example", all),
            ("half.example", half),
        ]
        .into_iter()
        .map(|(h, c)| host(h, "/", canary_of(route("main", &[main.addr]), c)))
        .collect();
        let p = start(test_config(), snapshot(rules));
        let who = |h: &'static str, headers: &'static [(&'static str, &'static str)]| {
            backend_name(p.http, h, headers)
        };
        assert_eq!(who("header.example", &[]).await, "main");
        assert_eq!(
            who("header.example", &[("x-canary", "always")]).await,
            "new"
        );
        assert_eq!(
            who(
                "header.example",
                &[("x-canary", "never"), ("cookie", "canary=always")]
            )
            .await,
            "main"
        );
        // Another header value goes on to the cookie.
        assert_eq!(
            who(
                "header.example",
                &[("x-canary", "maybe"), ("cookie", "a=1; canary=always")]
            )
            .await,
            "new"
        );
        assert_eq!(
            who("header.example", &[("cookie", "canary=never")]).await,
            "main"
        );
        assert_eq!(
            who("value.example", &[("x-region", "eu-west")]).await,
            "new"
        );
        assert_eq!(
            who("value.example", &[("x-region", "always")]).await,
            "main"
        );
        assert_eq!(
            who("pattern.example", &[("x-region", "eu-north")]).await,
            "new"
        );
        assert_eq!(
            who("pattern.example", &[("x-region", "us-east")]).await,
            "main"
        );
        assert_eq!(who("all.example", &[]).await, "new");
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(who("half.example", &[]).await);
            if seen.len() == 2 {
                break;
            }
        }
        assert_eq!(seen.len(), 2, "a 50% canary sent every request one way");
    });
}

/// `proxy-read-timeout` replaces the request timeout for its route only, and
/// `proxy-connect-timeout` the connect timeout (a dead endpoint).
#[test]
fn per_route_timeouts() {
    in_netns("timeouts", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let timeouts = |read: u64, connect: u64| Policy {
            read_timeout: Some(Duration::from_millis(read)),
            connect_timeout: Some(Duration::from_millis(connect)),
            ..Policy::default()
        };
        let dead = SocketAddr::from((DEAD_IP, 80));
        let p = start(
            ProxyConfig {
                upstream_timeout: Duration::from_secs(15),
                connect_timeout: Duration::from_secs(15),
                ..test_config()
            },
            snapshot(vec![
                host(
                    "short.example",
                    "/",
                    with_policy(route("short", &[app.addr]), timeouts(300, 300)),
                ),
                host(
                    "dead.example",
                    "/",
                    with_policy(route("dead", &[dead]), timeouts(10_000, 300)),
                ),
            ]),
        );
        // Both would hang for 15 s under the proxy's own timeouts (the test's deadline
        // is 20 s, so passing shows the route's shorter ones applied).
        let got = get(p.http, "short.example", "/stall").await;
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
        let got = get(p.http, "dead.example", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.body, "cannot connect to the backend\n");
        let got = get(p.http, "short.example", "/fine").await;
        assert_eq!(got.status, StatusCode::OK);
    });
}

/// Cookie affinity: the first answer sets the cookie (ingress-nginx's attributes),
/// requests carrying it stay on its endpoint under round robin, and a cookie for an
/// endpoint that left is replaced.
#[test]
fn cookie_affinity_keeps_a_client_on_its_endpoint() {
    in_netns("affinity", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx.clone()).await;
        let b = backend(backend_ip(2), "b", rx).await;
        let sticky = |endpoints: &[SocketAddr]| {
            with_policy(
                route("sticky", endpoints),
                Policy {
                    affinity: Some(Affinity {
                        cookie_name: "route".into(),
                        path: "/".into(),
                        max_age: Some(172_800),
                        expires: Some(172_800),
                        samesite: Some("Strict".into()),
                        persistent: false,
                    }),
                    ..Policy::default()
                },
            )
        };
        let p = start(
            test_config(),
            snapshot(vec![host("sticky.example", "/", sticky(&[a.addr, b.addr]))]),
        );
        let first = get(p.http, "sticky.example", "/").await;
        let set = first.headers["set-cookie"].to_str().unwrap().to_owned();
        assert!(set.starts_with("route="), "{set}");
        for attribute in [
            "; Path=/",
            "; Max-Age=172800",
            "; SameSite=Strict",
            "; HttpOnly",
            "; Expires=",
        ] {
            assert!(set.contains(attribute), "{set} lacks {attribute}");
        }
        let cookie = set.split(';').next().unwrap().to_owned();
        let first_name = echoed(&first.body, "name").unwrap();
        let with_cookie = |cookie: String| {
            let http = p.http;
            async move {
                let req = Request::get("/")
                    .header("host", "sticky.example")
                    .header("cookie", format!("other=1; {cookie}"))
                    .body(Full::default())
                    .unwrap();
                send(http, req).await
            }
        };
        for _ in 0..6 {
            let got = with_cookie(cookie.clone()).await;
            assert_eq!(echoed(&got.body, "name").unwrap(), first_name);
            assert!(!got.headers.contains_key("set-cookie"));
        }
        // The cookie's endpoint leaves: the other one answers and a new cookie is set.
        let remaining = if first_name == "a" { b.addr } else { a.addr };
        p.snapshots
            .send(snapshot(vec![host(
                "sticky.example",
                "/",
                sticky(&[remaining]),
            )]))
            .unwrap();
        let got = with_cookie(cookie.clone()).await;
        assert_ne!(echoed(&got.body, "name").unwrap(), first_name);
        let renewed = got.headers["set-cookie"].to_str().unwrap();
        assert!(!renewed.starts_with(&cookie), "{renewed}");
    });
}

// ---- graceful drain ---------------------------------------------------------------

/// Starts a proxy that drains when the returned sender fires; the handle ends when
/// the drain is done.
fn start_drainable(
    config: ProxyConfig,
    first: Arc<Snapshot>,
) -> (
    Running,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut registry = Registry::with_prefix("xlb");
    let proxy = Proxy::bind(config, &mut registry).expect("bind proxy");
    let (tx, rx) = watch::channel(first);
    let running = Running {
        http: proxy.http_addr().unwrap(),
        https: proxy.https_addr().unwrap(),
        metrics: proxy.metrics(),
        snapshots: tx,
    };
    let (drain, drained) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        let drain = async {
            let _ = drained.await;
        };
        proxy.run_until(rx, drain).await.expect("proxy drains");
    });
    (running, drain, done)
}

/// A keep-alive client as a load balancer's health-checked pool uses one: it sends
/// to the current target, reconnects when an answer says `Connection: close` or the
/// connection is gone, and retries a GET once when its connection closed before any
/// answer (RFC 9112 9.3.1). Returns the statuses it got.
async fn keep_alive_stream(
    targets: watch::Receiver<SocketAddr>,
    requests: usize,
    sent: Arc<AtomicUsize>,
) -> Vec<Result<StatusCode, String>> {
    let mut conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let mut out = Vec::with_capacity(requests);
    for _ in 0..requests {
        let mut result = Err("not sent".to_owned());
        for _attempt in 0..2 {
            if conn
                .as_ref()
                .is_none_or(hyper::client::conn::http1::SendRequest::is_closed)
            {
                let target = *targets.borrow();
                let io = TokioIo::new(connect(target).await);
                let (sender, c) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(c);
                conn = Some(sender);
            }
            let Some(sender) = conn.as_mut() else {
                unreachable!("connected above")
            };
            let req = Request::get("/")
                .header("host", "drain.example")
                .body(Full::default())
                .unwrap();
            let sent_ok = match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            };
            match sent_ok {
                Ok(response) => {
                    let close = response
                        .headers()
                        .get("connection")
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
                    let status = response.status();
                    let _ = response.into_body().collect().await;
                    if close {
                        conn = None;
                    }
                    result = Ok(status);
                    break;
                }
                Err(e) => {
                    // The connection was closed under the request: reconnect, retry.
                    conn = None;
                    result = Err(e.to_string());
                }
            }
        }
        sent.fetch_add(1, Ordering::Relaxed);
        out.push(result);
    }
    out
}

/// A rolling restart: four keep-alive clients stream requests through hop A; hop B
/// comes up, the clients' target moves to B, and A drains while they still hold
/// connections to it (with one slow request in flight). No request fails, the slow
/// one is answered, A refuses new connections and ends.
#[test]
fn a_rolling_restart_drains_without_failed_requests() {
    in_netns("drain", || async {
        let (release, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx.clone()).await;
        let other = backend(backend_ip(2), "app2", rx).await;
        let table = || {
            snapshot(vec![host(
                "drain.example",
                "/",
                route("app", &[app.addr, other.addr]),
            )])
        };
        // Two workers each: the drain must end both, and close both listeners.
        let config = || ProxyConfig {
            workers: 2,
            ..test_config()
        };
        let (a, drain_a, a_done) = start_drainable(config(), table());
        let (targets_tx, targets) = watch::channel(a.http);
        let sent = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..4)
            .map(|_| tokio::spawn(keep_alive_stream(targets.clone(), 150, Arc::clone(&sent))))
            .collect();
        // A slow request held open on A across the drain.
        let slow = {
            let addr = a.http;
            tokio::spawn(async move {
                let req = Request::get("/hold")
                    .header("host", "drain.example")
                    .body(Full::default())
                    .unwrap();
                send(addr, req).await
            })
        };
        wait_until("the slow request reaches a backend", || {
            app.holding.load(Ordering::Relaxed) + other.holding.load(Ordering::Relaxed) == 1
        })
        .await;
        wait_until("the clients are streaming", || {
            sent.load(Ordering::Relaxed) >= 100
        })
        .await;
        // The new hop is up; the load balancer moves to it, and A gets SIGTERM.
        let (b, _drain_b, _b_done) = start_drainable(config(), table());
        targets_tx.send_replace(b.http);
        drain_a.send(()).unwrap();
        // A no longer accepts (its listener is closed), while its slow request waits.
        let mut refused = false;
        for _ in 0..200 {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::from((CLIENT_IP, 0))).unwrap();
            if socket.connect(a.http).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "the draining hop still accepts connections");
        assert!(!a_done.is_finished(), "A ended with a request in flight");
        release.send_replace(true);
        let slow = slow.await.unwrap();
        assert_eq!(slow.status, StatusCode::OK);
        assert_eq!(slow.headers["connection"], "close");
        a_done.await.unwrap();
        let mut failed = Vec::new();
        let mut total = 0;
        for client in clients {
            for result in client.await.unwrap() {
                total += 1;
                if result != Ok(StatusCode::OK) {
                    failed.push(result);
                }
            }
        }
        assert_eq!(total, 600);
        assert!(failed.is_empty(), "failed requests: {failed:?}");
    });
}

/// `limit-rpm` (burst = rate x multiplier) and `limit-connections` per client
/// address: over them, 503; a finished request frees its connection slot. (One
/// request a minute refills nothing within the test's deadline, so the count is
/// exact; `limit-rps` is the same bucket, tested with a clock in `l7::rate`.)
#[test]
fn per_client_limits_answer_503() {
    in_netns("limits", || async {
        let (release, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let limited = |limits: Limits| {
            with_policy(
                route("limited", &[app.addr]),
                Policy {
                    limits: Some(limits),
                    ..Policy::default()
                },
            )
        };
        let p = start(
            test_config(),
            snapshot(vec![
                host(
                    "rpm.example",
                    "/",
                    limited(Limits {
                        rps: None,
                        rpm: Some(1),
                        connections: None,
                        burst_multiplier: 3,
                    }),
                ),
                host(
                    "conns.example",
                    "/",
                    limited(Limits {
                        rps: None,
                        rpm: None,
                        connections: Some(1),
                        burst_multiplier: 5,
                    }),
                ),
            ]),
        );
        // A burst of 3 is admitted, the next ones refused.
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(get(p.http, "rpm.example", "/").await.status);
        }
        let ok = StatusCode::OK;
        let refused = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(statuses, [ok, ok, ok, refused, refused, refused]);
        // One request in flight holds the only connection slot.
        let held = {
            let addr = p.http;
            tokio::spawn(async move { get(addr, "conns.example", "/hold").await })
        };
        wait_until("the held request reaches the backend", || {
            app.holding.load(Ordering::Relaxed) == 1
        })
        .await;
        let got = get(p.http, "conns.example", "/").await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got.body, "too many requests from this client\n");
        release.send_replace(true);
        assert_eq!(held.await.unwrap().status, StatusCode::OK);
        assert_eq!(
            get(p.http, "conns.example", "/").await.status,
            StatusCode::OK
        );
    });
}

mod backend_framing;
mod backend_protocol;
mod client_socket;
mod closing;
mod forwarded;
mod passthrough;
mod send_timeout;
mod workers;

/// The listener's `TCP_NODELAY` reaches every accepted connection, which therefore
/// needs no `setsockopt` of its own.
#[test]
fn accepted_connections_have_nodelay_from_the_listener() {
    let listener = super::listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), 16, false).unwrap();
    listener.set_nonblocking(false).unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    assert!(accepted.nodelay().unwrap());
    assert!(
        !client.nodelay().unwrap(),
        "the client side keeps its own setting"
    );
}
