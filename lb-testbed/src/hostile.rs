//! The hostile HTTP corpus for the L7 hop, shared by `lb-agent/tests/l7_hostile.rs`
//! (which asserts on it) and `xlb-bench chaos` (which reports it): 10,000 HTTP/1.x
//! requests over raw TCP (the known bypass and smuggling cases, then seeded random
//! mutations of valid requests) against an in-process hop with three recording
//! backends. The invariant is checked from the backends' side: every request a backend
//! received carries one valid Host and a normalised origin-form path that the route
//! table sends to THAT backend; no h2c upgrade and no ambiguous framing reach it. Every
//! client connection must get an answer or a close within a bounded time, and the hop
//! must still serve a valid request afterwards.
//!
//! Bounded: a fixed number of requests, a per-connection read timeout, a deadline for
//! sending. [`run`] runs inside a namespace made by [`Netns::with_l7_test_addresses`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lb_agent::l7::path::normalize;
use lb_agent::l7::proxy::{Proxy, ProxyConfig};
use lb_agent::l7::{RouteTable, Snapshot};
use lb_core::cluster::ObjectKey;
use lb_core::routes::{
    Balance, HostPattern, HostRule, PathKind, PathRule, Route, Target, Upstream, UpstreamProtocol,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

#[cfg(doc)]
use crate::Netns;

const PROXY_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Requests in the corpus.
pub const TOTAL: usize = 10_000;
/// The mutations' seed.
pub const SEED: u64 = 0x786c_625f_6c37;
const PARALLEL: usize = 64;
/// No byte and no close from the hop within this: a stall.
pub const READ_TIMEOUT: Duration = Duration::from_secs(6);
/// Once an answer started, the connection is left after this much quiet.
const QUIET: Duration = Duration::from_millis(250);
/// The corpus stops being sent after this (and the test fails if it did not finish).
pub const SEND_DEADLINE: Duration = Duration::from_mins(4);
/// What [`run`] needs at most, sending included (for the caller's `block_on`).
pub const DEADLINE: Duration = Duration::from_mins(5);

/// Panics anywhere in the process (the hop's connection tasks included), counted once
/// [`count_panics`] installed its hook.
static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic of the process from now on (the previous hook still runs).
pub fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            previous(info);
        }));
    });
}

// ---- the route table and its independent oracle ------------------------------------

const BACKENDS: [&str; 3] = ["A", "B", "C"];

fn route(name: &str, addr: SocketAddr) -> Route {
    Route {
        upstream: Arc::new(Upstream {
            name: format!("default/{name}:80"),
            target: Target::Endpoints(vec![addr]),
            protocol: UpstreamProtocol::Http1,
            tls: None,
        }),
        ingress: ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        },
        ssl_redirect: false,
        balance: Balance::RoundRobin,
        max_body_bytes: None,
        policy: std::sync::Arc::default(),
    }
}

/// `a.test`: `/api` Prefix -> A, `/admin` Exact -> B; `b.test`: `/` Prefix -> C; no
/// default backend.
fn table(addrs: &[SocketAddr; 3]) -> RouteTable {
    let path = |path: &str, kind, i: usize| PathRule {
        path: path.into(),
        kind,
        route: route(BACKENDS[i], addrs[i]),
    };
    RouteTable::new(
        vec![
            HostRule {
                host: HostPattern::Exact("a.test".into()),
                paths: vec![
                    path("/api", PathKind::Prefix, 0),
                    path("/admin", PathKind::Exact, 1),
                ],
            },
            HostRule {
                host: HostPattern::Exact("b.test".into()),
                paths: vec![path("/", PathKind::Prefix, 2)],
            },
        ],
        None,
    )
}

/// The backend the rules send `(host, path)` to, written out by hand from the table
/// above (RFC 9112 host: case-insensitive, port and one trailing dot ignored).
fn oracle(host: &str, path: &str) -> Option<&'static str> {
    let name = host.rsplit_once(':').map_or(host, |(n, _)| n);
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match name.as_str() {
        "a.test" if path == "/admin" => Some("B"),
        "a.test" if path == "/api" || path.starts_with("/api/") => Some("A"),
        "b.test" if path.starts_with('/') => Some("C"),
        _ => None,
    }
}

// ---- recording backends ------------------------------------------------------------

/// What a backend received.
#[derive(Debug, Clone)]
struct Seen {
    backend: &'static str,
    method: String,
    target: String,
    hosts: Vec<String>,
    upgrade: Option<String>,
    http2_settings: bool,
    te_and_cl: bool,
}

type Log = Arc<Mutex<Vec<Seen>>>;

async fn backend(
    ip: Ipv4Addr,
    name: &'static str,
    log: Log,
    errors: Arc<AtomicUsize>,
) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (log, errors) = (Arc::clone(&log), Arc::clone(&errors));
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let h = req.headers();
                            let text = |v: &hyper::header::HeaderValue| {
                                String::from_utf8_lossy(v.as_bytes()).into_owned()
                            };
                            let seen = Seen {
                                backend: name,
                                method: req.method().to_string(),
                                target: req.uri().to_string(),
                                hosts: h.get_all("host").iter().map(text).collect(),
                                upgrade: h.get("upgrade").map(text),
                                http2_settings: h.contains_key("http2-settings"),
                                te_and_cl: h.contains_key("transfer-encoding")
                                    && h.contains_key("content-length"),
                            };
                            log.lock().unwrap().push(seen);
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                                "backend {name}\n"
                            )))))
                        }
                    });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    println!("  backend {name} connection: {e}");
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    addr
}

/// Why a request a backend received breaks the rules; `None`: it is one they route there.
fn violation(seen: &Seen, table: &RouteTable) -> Option<String> {
    let [host] = seen.hosts.as_slice() else {
        return Some(format!("{} Host headers", seen.hosts.len()));
    };
    if !seen.target.starts_with('/') {
        return Some("not origin form".into());
    }
    let path = seen
        .target
        .split_once('?')
        .map_or(seen.target.as_str(), |(p, _)| p);
    if normalize(path).ok().as_deref() != Some(path) {
        return Some("path not in normal form".into());
    }
    let expected = oracle(host, path);
    let by_table = table.lookup(host, path).map(|r| r.ingress.name.as_str());
    if by_table != expected {
        return Some(format!(
            "oracle {expected:?} and table {by_table:?} disagree"
        ));
    }
    if expected != Some(seen.backend) {
        return Some(format!("routed to {expected:?}"));
    }
    if seen
        .upgrade
        .as_deref()
        .is_some_and(|u| u.to_ascii_lowercase().contains("h2c"))
        || seen.http2_settings
    {
        return Some("h2c upgrade forwarded".into());
    }
    if seen.te_and_cl {
        return Some("Transfer-Encoding and Content-Length forwarded".into());
    }
    None
}

// ---- the corpus -----------------------------------------------------------------

/// The known cases: bypasses, Host confusion, smuggling, framing and parser edges.
/// Smuggled requests aim at `a.test/internal`, which no rule routes anywhere.
#[expect(clippy::too_many_lines, reason = "a flat list of cases")]
pub fn known_cases() -> Vec<Vec<u8>> {
    let mut cases: Vec<Vec<u8>> = Vec::new();
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
    };
    for target in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/%2E%2E/internal",
        "/api/..%2f..%2finternal",
        "/api/%2e%2e%2finternal",
        "//admin",
        "///admin",
        "/%61dmin",
        "/adm%69n",
        "/%2561dmin",
        "/%2Fadmin",
        "/admin%2F",
        "/api%2F..%2Fadmin",
        "/api/%2Fadmin",
        "/./admin",
        "/api/./../admin",
        "/api/..;/admin",
        "/api/../../admin",
        "/../admin",
        "/%2e%2e/admin",
        "/admin/",
        "/admin/.",
        "/admin/..",
        "/ADMIN",
        "/admin?x=/../internal",
        "/admin#frag",
        "/api\\..\\internal",
        "/api/%",
        "/api/%zz",
        "/api/%c0%ae%c0%ae/internal",
        "/internal",
        "api/x",
        "*",
        "/api/\u{e9}",
        "http://b.test/admin",
        "http://a.test/admin",
        "http://a.test:80/api/x",
        "https://a.test/admin",
        "http://evil.test/api/x",
        "http://a.test@b.test/admin",
        "http://b.test@a.test/admin",
        "http:/a.test/admin",
        "//b.test/admin",
        "http://[::1]/admin",
        "http://a.test/../internal",
    ] {
        cases.push(get(target, "a.test"));
        cases.push(get(target, "b.test"));
    }
    for host in [
        "",
        " ",
        "a.test:80",
        "a.test.",
        "A.TEST",
        "a.test:",
        "a.test:abc",
        "a.test b.test",
        "a.test,b.test",
        "a.test/admin",
        "a.test@b.test",
        "a.test\tb.test",
        "[::1]",
        "[::1]:80",
        "evil.test",
        "a.test..",
        ".a.test",
        "a.test\x7f",
        "a.test%00",
    ] {
        cases.push(get("/admin", host));
    }
    let raw: &[&[u8]] = &[
        // Host missing, repeated, split.
        b"GET /admin HTTP/1.1\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: b.test\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nhost: b.test\r\nHOST: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost : a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\n Host: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: a.test\x00b\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nX-Forwarded-Host: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        // obs-fold continuations.
        b"GET /admin HTTP/1.1\r\nHost: b.test\r\n a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: a.test\r\nX-A: 1\r\n Host: b.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nX-A: 1\r\n\tHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        // h2c upgrades and HTTP/2 prior knowledge.
        b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nConnection: upgrade\r\nUpgrade: H2C\r\nConnection: close\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: websocket, h2c\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        // CL.TE, TE.CL, TE.TE and friends.
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 45\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n29\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: identity, chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\nContent-Length: 44\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 44, 0\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: +4\r\n\r\nabcd",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: -1\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 41\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        // Malformed chunked bodies.
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=\"a\r\nb\"\r\nhello\r\n0\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nHost: b.test\r\n\r\n",
        b"POST /api/x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n\r\n",
        // Control bytes in the request line.
        b"GET /admin\x00/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api/\x01 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api\t/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api/x\rGET /internal HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api/x HTTP/1.1\nHost: a.test\nConnection: close\n\n",
        b"GET /internal HTTP/1.1\rHost: a.test\r\n\r\n",
        b"GET  /admin  HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1 extra\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"\r\n\r\nGET /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        // Versions, methods.
        b"GET /api/x HTTP/1.0\r\n\r\n",
        b"GET /admin HTTP/1.0\r\nHost: a.test\r\n\r\n",
        b"GET /admin HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\nGET /internal HTTP/1.0\r\nHost: a.test\r\n\r\n",
        b"GET /admin\r\n\r\n",
        b"GET /admin HTTP/0.9\r\nHost: a.test\r\n\r\n",
        b"GET /admin HTTP/1.2\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/2.0\r\nHost: a.test\r\n\r\n",
        b"GET /admin HTTP/9.9\r\nHost: a.test\r\n\r\n",
        b"GET /admin http/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"get /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GeT /internal HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"G\x00T /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"CONNECT a.test:80 HTTP/1.1\r\nHost: a.test:80\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"CONNECT b.test:443 HTTP/1.1\r\nHost: b.test:443\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"CONNECT /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        b"TRACE /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"HEAD /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"DELETE /api/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"FOO /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        // Pipelines mixing valid and invalid requests.
        b"GET /api/1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\nGET /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /api/1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /admin HTTP/1.1\r\n\r\nGET /admin HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        b"GET /api/1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /../internal HTTP/1.1\r\nHost: a.test\r\n\r\nGET /api/2 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: a.test\r\n\r\nGARBAGE\r\n\r\nGET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET /admin HTTP/1.1\r\nHost: a.test\r\n\r\nGET http://a.test/internal HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    ];
    cases.extend(raw.iter().map(|c| c.to_vec()));
    // Overlong heads: a long target, a long header, many headers.
    let long = "a".repeat(40 * 1024);
    cases.push(get(&format!("/api/{long}"), "a.test"));
    cases.push(get(&format!("/admin?{long}"), "a.test"));
    cases.push(get("/admin", &long));
    let mut many = b"GET /admin HTTP/1.1\r\nHost: a.test\r\n".to_vec();
    for i in 0..300 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"Connection: close\r\n\r\n");
    cases.push(many);
    let mut wide = b"GET /admin HTTP/1.1\r\nHost: a.test\r\nX-Big: ".to_vec();
    wide.resize(wide.len() + 20 * 1024, b'x');
    wide.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    cases.push(wide);
    cases
}

/// Valid requests the mutations start from.
const SEEDS: &[&[u8]] = &[
    b"GET /api/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    b"GET /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    b"GET /anything?q=1 HTTP/1.1\r\nHost: B.TEST:80\r\nConnection: close\r\n\r\n",
    b"GET http://a.test/api/v1 HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    b"GET /internal HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    b"POST /api/upload HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: b.test\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /admin HTTP/1.0\r\nHost: a.test\r\n\r\n",
    b"GET /api/1 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
];

const TARGETS: &[&str] = &[
    "/admin",
    "/admin/",
    "/admin/x",
    "/internal",
    "/api/../admin",
    "/api/../internal",
    "/api/%2e%2e/internal",
    "//admin",
    "/%61dmin",
    "/%2561dmin",
    "/api%2F..%2Finternal",
    "/api/..%2Finternal",
    "/./internal",
    "/../admin",
    "*",
    "http://a.test/admin",
    "http://b.test/internal",
    "http://evil.test/",
    "a.test:80",
    "/api/\x00",
];

const HOSTS: &[&str] = &[
    "a.test",
    "b.test",
    "A.Test.",
    "a.test:8080",
    "evil.test",
    "",
    "a.test b.test",
    "a.test,b.test",
    "[::1]",
    "a.test@b.test",
    "a.test/admin",
];

const HEADERS: &[&str] = &[
    "Transfer-Encoding: chunked",
    "Content-Length: 10",
    "Content-Length: 0",
    "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA",
    "Upgrade: websocket\r\nConnection: Upgrade",
    "Host: b.test",
    "Host: a.test",
    " Host: b.test",
    "\tobs-fold",
    "X-Forwarded-Host: b.test",
    "Transfer-Encoding: xchunked",
    "Expect: 100-continue",
    "Connection: keep-alive",
];

const SMUGGLED: &[u8] = b"GET /internal HTTP/1.1\r\nHost: a.test\r\n\r\n";

/// splitmix64: a fixed-seed generator with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap()).unwrap()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The end of the first head's request line and of its head (`\r\n\r\n` excluded).
fn head_bounds(req: &[u8]) -> (usize, usize) {
    let line = req
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(req.len());
    let head = req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(req.len());
    (line, head.max(line))
}

fn mutate(rng: &mut Rng, req: &mut Vec<u8>) {
    let (line, head) = head_bounds(req);
    match rng.below(10) {
        0 if !req.is_empty() => {
            let i = rng.below(req.len());
            req[i] ^= 1 << rng.below(8);
        }
        1 => {
            let byte = *rng.pick(b"/.%\r\n :\0\t;?#@\\A\x7f\xff");
            let i = rng.below(req.len() + 1);
            req.insert(i, byte);
        }
        2 if !req.is_empty() => {
            let i = rng.below(req.len());
            req.remove(i);
        }
        3 if head > line => {
            // Duplicate one header line.
            let lines: Vec<(usize, usize)> = header_lines(req, line, head);
            let &(s, e) = rng.pick(&lines);
            let copy = req[s..e].to_vec();
            req.splice(e..e, copy);
        }
        4 if head > 0 => {
            let i = rng.below(head);
            if rng.below(2) == 0 {
                req[i] = req[i].to_ascii_uppercase();
            } else {
                req[i] ^= if req[i].is_ascii_alphabetic() {
                    0x20
                } else {
                    0
                };
            }
        }
        5 => {
            // Splice the request target.
            let start = req.iter().position(|b| *b == b' ').map_or(0, |p| p + 1);
            let end = req[start..line.max(start)]
                .iter()
                .position(|b| *b == b' ')
                .map_or(line.max(start), |p| start + p);
            req.splice(start..end, rng.pick(TARGETS).bytes());
        }
        6 => {
            // Replace the Host value.
            let text = String::from_utf8_lossy(&req[..head]).to_ascii_lowercase();
            if let Some(at) = text.find("\r\nhost:") {
                let s = at + 7;
                let e = text[s..].find("\r\n").map_or(head, |p| s + p);
                let value = format!(" {}", rng.pick(HOSTS));
                req.splice(s..e, value.bytes());
            }
        }
        7 => {
            let insert = format!("\r\n{}", rng.pick(HEADERS));
            req.splice(line..line, insert.bytes());
        }
        8 => req.extend_from_slice(SMUGGLED),
        _ => {
            let keep = rng.below(req.len() + 1);
            req.truncate(keep.max(1));
        }
    }
}

/// `(start, end)` of each header line (with its `\r\n`) between the request line and
/// the end of the head.
fn header_lines(req: &[u8], line: usize, head: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut s = line + 2;
    while s < head {
        let e = req[s..head]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(head, |p| s + p);
        out.push((s, (e + 2).min(req.len())));
        s = e + 2;
    }
    if out.is_empty() {
        out.push((line, line));
    }
    out
}

/// Case `i` of the corpus.
pub fn corpus_case(i: usize) -> Vec<u8> {
    corpus().swap_remove(i)
}

/// The whole corpus: the known cases, then mutations up to [`TOTAL`].
pub fn corpus() -> Vec<Vec<u8>> {
    let mut cases = known_cases();
    let mut rng = Rng(SEED);
    while cases.len() < TOTAL {
        let mut req = rng.pick(SEEDS).to_vec();
        for _ in 0..=rng.below(4) {
            mutate(&mut rng, &mut req);
        }
        cases.push(req);
    }
    cases.truncate(TOTAL);
    cases
}

// ---- the client -------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The first status code, and how many status lines came back.
    Answered(u16, usize),
    ClosedWithoutAnswer,
    /// HTTP/2 frames (the hop speaks HTTP/2 to a client that starts with its preface).
    Http2,
    /// Bytes that are neither an HTTP/1 status line nor HTTP/2 frames (their first 8).
    Garbage([u8; 8]),
    /// Neither a byte nor a close within [`READ_TIMEOUT`].
    Stalled,
    ConnectFailed,
}

/// Sends one raw request on a new connection and reads what comes back.
pub async fn exchange(proxy: SocketAddr, req: Vec<u8>) -> Outcome {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((CLIENT_IP, 0))).unwrap();
    let Ok(Ok(mut stream)) = tokio::time::timeout(READ_TIMEOUT, socket.connect(proxy)).await else {
        return Outcome::ConnectFailed;
    };
    let _ = stream.write_all(&req).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let wait = if got.is_empty() { READ_TIMEOUT } else { QUIET };
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Err(_) if got.is_empty() => return Outcome::Stalled,
            // A close, a reset, or quiet after an answer.
            Ok(_) | Err(_) => break,
        }
        if got.len() > 1 << 20 {
            break;
        }
    }
    if got.is_empty() {
        return Outcome::ClosedWithoutAnswer;
    }
    let status = |at: &[u8]| -> Option<u16> {
        let rest = at.strip_prefix(b"HTTP/1.")?.get(2..5)?;
        std::str::from_utf8(rest).ok()?.parse().ok()
    };
    // A SETTINGS frame (type 4) on stream 0: the server side of an HTTP/2 connection.
    if got.len() >= 9 && got[3] == 4 && got[5..9] == [0; 4] {
        return Outcome::Http2;
    }
    let Some(first) = status(&got) else {
        let mut start = [0u8; 8];
        let n = got.len().min(8);
        start[..n].copy_from_slice(&got[..n]);
        return Outcome::Garbage(start);
    };
    let lines = (0..got.len())
        .filter(|&i| (i == 0 || got[i - 1] == b'\n') && status(&got[i..]).is_some())
        .count();
    Outcome::Answered(first, lines)
}

// ---- one run ------------------------------------------------------------------------

/// What one run of the corpus did.
#[derive(Debug, Clone)]
pub struct Report {
    /// Known cases at the start of the corpus; the rest are mutations.
    pub known: usize,
    /// Requests sent (one connection each); [`TOTAL`] unless [`SEND_DEADLINE`] passed.
    pub sent: usize,
    pub elapsed: Duration,
    /// Answered with an HTTP/1 status line, by class (`2xx`) and by code.
    pub classes: BTreeMap<String, usize>,
    pub statuses: BTreeMap<u16, usize>,
    /// Status lines read in all (pipelines get several).
    pub status_lines: usize,
    /// Answered over HTTP/2 (prior knowledge).
    pub http2: usize,
    pub closed_without_answer: usize,
    /// Answers that are no HTTP: (case, first bytes).
    pub garbage: Vec<(usize, [u8; 8])>,
    pub connect_failed: usize,
    /// Cases with neither a byte nor a close within [`READ_TIMEOUT`].
    pub stalled: Vec<usize>,
    /// Requests each backend received, and by method.
    pub reached: BTreeMap<&'static str, usize>,
    pub methods: BTreeMap<String, usize>,
    pub backend_requests: usize,
    pub backend_errors: usize,
    /// Requests that reached a backend the rules do not route them to, and why.
    pub violations: Vec<String>,
    pub panics: usize,
    /// The hop's task ended during the corpus (a crash): how.
    pub hop_ended: Option<String>,
    /// A valid request after the corpus (`Answered(200, 1)` when the hop is well).
    pub after: Outcome,
}

impl Report {
    /// Cases answered with an HTTP/1 status line.
    pub fn answered(&self) -> usize {
        self.classes.values().sum()
    }
}

/// Runs the corpus against a fresh in-process hop and its three recording backends.
/// Call [`count_panics`] first for [`Report::panics`] to count.
pub async fn run() -> Report {
    let log: Log = Arc::default();
    let backend_errors = Arc::new(AtomicUsize::new(0));
    let mut addrs = [SocketAddr::from(([0, 0, 0, 0], 0)); 3];
    for (i, name) in BACKENDS.iter().enumerate() {
        let ip = Ipv4Addr::new(192, 0, 2, u8::try_from(i + 1).unwrap());
        addrs[i] = backend(ip, name, Arc::clone(&log), Arc::clone(&backend_errors)).await;
    }
    let config = ProxyConfig {
        connect_timeout: Duration::from_secs(1),
        header_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        upstream_timeout: Duration::from_secs(2),
        ..ProxyConfig::new(Some(SocketAddr::from((PROXY_IP, 0))), None)
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = Proxy::bind(config, &mut registry).expect("bind the hop");
    let http = proxy.http_addr().unwrap();
    let snapshot = Arc::new(Snapshot {
        routes: table(&addrs),
        certificates: Vec::new(),
    });
    let (_snapshots, rx) = watch::channel(snapshot);
    let hop = tokio::spawn(proxy.run(rx));
    let check_table = table(&addrs);

    let cases = corpus();
    let known = known_cases().len();
    let started = Instant::now();
    let outcomes: Vec<(usize, Outcome)> = futures_util::stream::iter(cases.into_iter().enumerate())
        .take_while(|_| std::future::ready(started.elapsed() < SEND_DEADLINE))
        .map(|(i, req)| async move { (i, exchange(http, req).await) })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let elapsed = started.elapsed();

    // The hop is alive and still routes a valid request.
    let hop_ended = if hop.is_finished() {
        Some(format!("{:?}", hop.await))
    } else {
        None
    };
    let after = exchange(
        http,
        b"GET /admin HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;

    let mut report = Report {
        known,
        sent: outcomes.len(),
        elapsed,
        classes: BTreeMap::new(),
        statuses: BTreeMap::new(),
        status_lines: 0,
        http2: 0,
        closed_without_answer: 0,
        garbage: Vec::new(),
        connect_failed: 0,
        stalled: Vec::new(),
        reached: BTreeMap::new(),
        methods: BTreeMap::new(),
        backend_requests: 0,
        backend_errors: 0,
        violations: Vec::new(),
        panics: 0,
        hop_ended,
        after,
    };
    for &(i, outcome) in &outcomes {
        match outcome {
            Outcome::Answered(status, lines) => {
                *report
                    .classes
                    .entry(format!("{}xx", status / 100))
                    .or_default() += 1;
                *report.statuses.entry(status).or_default() += 1;
                report.status_lines += lines;
            }
            Outcome::ClosedWithoutAnswer => report.closed_without_answer += 1,
            Outcome::Http2 => report.http2 += 1,
            Outcome::Garbage(start) => report.garbage.push((i, start)),
            Outcome::Stalled => report.stalled.push(i),
            Outcome::ConnectFailed => report.connect_failed += 1,
        }
    }
    let seen = log.lock().unwrap().clone();
    report.backend_requests = seen.len();
    for s in &seen {
        *report.reached.entry(s.backend).or_default() += 1;
        *report.methods.entry(s.method.clone()).or_default() += 1;
        if let Some(why) = violation(s, &check_table) {
            report.violations.push(format!("{why}: {s:?}"));
        }
    }
    report.backend_errors = backend_errors.load(Ordering::Relaxed);
    report.panics = PANICS.load(Ordering::Relaxed);
    report
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "l7 hostile corpus: seed {SEED:#x}, {} known cases + {} mutations",
            self.known,
            TOTAL - self.known
        )?;
        writeln!(
            f,
            "  requests sent (connections): {} of {TOTAL} in {:.1?}",
            self.sent, self.elapsed
        )?;
        writeln!(f, "  answered: {} {:?}", self.answered(), self.classes)?;
        writeln!(
            f,
            "  status codes: {:?}; status lines read in all: {}",
            self.statuses, self.status_lines
        )?;
        writeln!(
            f,
            "  answered over HTTP/2 (prior knowledge): {}",
            self.http2
        )?;
        writeln!(
            f,
            "  closed without answer: {}; garbage answers: {}; connect failed: {}",
            self.closed_without_answer,
            self.garbage.len(),
            self.connect_failed
        )?;
        for (i, start) in &self.garbage {
            writeln!(
                f,
                "    case {i} answered {start:?}: {:?}",
                String::from_utf8_lossy(&corpus_case(*i))
            )?;
        }
        writeln!(
            f,
            "  stalled (no byte, no close in {READ_TIMEOUT:?}): {}",
            self.stalled.len()
        )?;
        writeln!(
            f,
            "  reached backends: {:?} ({} requests; methods {:?})",
            self.reached, self.backend_requests, self.methods
        )?;
        writeln!(f, "  backend connection errors: {}", self.backend_errors)?;
        writeln!(
            f,
            "  panics: {}; hop task ended: {}; after the corpus: {:?}",
            self.panics,
            self.hop_ended.as_deref().unwrap_or("no"),
            self.after
        )?;
        writeln!(f, "  violations: {}", self.violations.len())?;
        for v in self.violations.iter().take(20) {
            writeln!(f, "    {v}")?;
        }
        Ok(())
    }
}
