//! The parsers and renderers run without privileges. The server and client
//! tests build a namespace of their own and need root; they fail (never
//! skip) without it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::*;
use crate::{check_privileges, spawn_tcp_name_server};

const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection must stay open to count as kept alive.
const STAYS_OPEN: Duration = Duration::from_millis(300);
const V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fn require_root() {
    if let Err(e) = check_privileges() {
        panic!("{e:#}");
    }
}

/// A namespace with `192.0.2.1/32` and `2001:db8::1/128` on its loopback.
/// A stop or a failure came at all (not a hang); generous, as this is no benchmark.
fn assert_within(started: Instant, limit: Duration) {
    let took = started.elapsed();
    assert!(took < limit * 5, "took {took:?}, bound {:?}", limit * 5);
}

fn lo_netns(tag: &str) -> Netns {
    let ns = Netns::new(tag).unwrap();
    ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])
        .unwrap();
    ns.ip(&["addr", "add", "2001:db8::1/128", "dev", "lo", "nodad"])
        .unwrap();
    ns
}

/// From `ns`, sends `request` as is on a new connection and reads until the
/// server closes it or `wait` passes. Returns what arrived and whether the
/// server closed the connection.
fn raw_exchange(ns: &Netns, addr: SocketAddr, request: &[u8], wait: Duration) -> (String, bool) {
    let mut stream = ns
        .run_in(|| TcpStream::connect_timeout(&addr, TIMEOUT))
        .unwrap()
        .unwrap();
    stream.write_all(request).unwrap();
    let deadline = Instant::now() + wait;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    let closed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => break true,
            Ok(n) => reply.extend_from_slice(&chunk[..n]),
            Err(e) if is_retry(&e) => {}
            Err(e) => panic!("reading from {addr}: {e}"),
        }
    };
    (String::from_utf8_lossy(&reply).into_owned(), closed)
}

/// Whether `stream` is at EOF within `wait` (without sending anything).
fn sees_eof(stream: &mut TcpStream, wait: Duration) -> bool {
    stream.set_read_timeout(Some(wait)).unwrap();
    matches!(stream.read(&mut [0u8; 64]), Ok(0))
}

/// The connection ends within `wait`: EOF, or a reset (a connection still in the
/// listener's accept queue when the listener closes is reset); else what the read gave.
fn sees_end(stream: &mut TcpStream, wait: Duration) -> Result<(), String> {
    stream.set_read_timeout(Some(wait)).unwrap();
    match stream.read(&mut [0u8; 64]) {
        Ok(0) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

// ---- Without privileges ------------------------------------------------

fn head(request: &str) -> Result<Option<RequestHead>, Status> {
    parse_request(request.as_bytes())
}

#[test]
fn requests_parse_with_http11_defaults() {
    let request = "GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /next";
    assert_eq!(
        head(request),
        Ok(Some(RequestHead {
            len: request.find("GET /next").unwrap(),
            is_get: true,
            body_len: 0,
            http10: false,
            keep_alive: true,
        }))
    );
    assert_eq!(head("GET / HTTP/1.1\r\nHo"), Ok(None));
    assert_eq!(head(""), Ok(None));

    let close = head("GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, CLOSE\r\n\r\n");
    assert_eq!(close.unwrap().unwrap().connection(), Connection::Close);
    let http10 = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
    assert!(http10.http10);
    assert_eq!(http10.connection(), Connection::Close);
    let http10_kept = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    assert_eq!(
        http10_kept.unwrap().unwrap().connection(),
        Connection::KeepAlive
    );

    let post = head("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n");
    let post = post.unwrap().unwrap();
    assert!(!post.is_get);
    assert_eq!(post.body_len, 5);
    assert_eq!(post.connection(), Connection::Persistent);

    // The clients' own request is one the server serves.
    let ours = render_request((V6, 8080).into(), Connection::Close);
    assert!(ours.contains("Host: [2001:db8::1]:8080\r\n"), "{ours}");
    let ours = parse_request(ours.as_bytes()).unwrap().unwrap();
    assert!(ours.is_get && !ours.keep_alive);
    let ours = render_request((V4, 80).into(), Connection::Persistent);
    assert!(parse_request(ours.as_bytes()).unwrap().unwrap().keep_alive);
}

#[test]
fn unservable_requests_map_to_error_statuses() {
    let cases = [
        ("NOT HTTP AT ALL\r\n\r\n", Status::BadRequest),
        ("GET / HTTP/1.1\r\n\r\n", Status::BadRequest),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            Status::BadRequest,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
            Status::BadRequest,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            Status::BadRequest,
        ),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            Status::BadRequest,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 65537\r\n\r\n",
            Status::PayloadTooLarge,
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            Status::NotImplemented,
        ),
    ];
    for (request, status) in cases {
        assert_eq!(head(request), Err(status), "{request:?}");
    }
    // Too long, complete or not, and too many headers.
    let long = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}",
        "a".repeat(MAX_HEAD)
    );
    assert_eq!(head(&long), Err(Status::HeadTooLarge));
    assert_eq!(head(&format!("{long}\r\n\r\n")), Err(Status::HeadTooLarge));
    let many = format!(
        "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
        "X: y\r\n".repeat(MAX_HEADERS)
    );
    assert_eq!(head(&many), Err(Status::HeadTooLarge));
}

#[test]
fn responses_round_trip_through_the_client_parser() {
    let ok = render_response(Status::Ok, "web-0\n", Connection::Persistent);
    assert_eq!(
        ok,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nweb-0\n"
    );
    let head = parse_response(ok.as_bytes()).unwrap().unwrap();
    assert_eq!(
        head,
        ResponseHead {
            len: ok.len() - 6,
            status: 200,
            reason: "OK".to_owned(),
            body_len: Some(6),
            close: false,
        }
    );
    assert_eq!(parse_response(&ok.as_bytes()[..20]).unwrap(), None);

    let closing = render_response(Status::Ok, "x\n", Connection::Close);
    assert!(parse_response(closing.as_bytes()).unwrap().unwrap().close);
    let kept = render_response(Status::Ok, "x\n", Connection::KeepAlive);
    assert!(kept.contains("Connection: keep-alive\r\n"));
    let refused = render_response(Status::MethodNotAllowed, "no\n", Connection::Persistent);
    assert!(refused.contains("Allow: GET\r\n"), "{refused}");
    let head = parse_response(refused.as_bytes()).unwrap().unwrap();
    assert_eq!(
        (head.status, head.reason.as_str()),
        (405, "Method Not Allowed")
    );

    // Bodies delimited by the close, HTTP/1.0 defaults, what is refused.
    let until_close = parse_response(b"HTTP/1.1 200 OK\r\n\r\nbody").unwrap();
    let until_close = until_close.unwrap();
    assert_eq!((until_close.body_len, until_close.close), (None, true));
    let http10 = parse_response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").unwrap();
    assert!(http10.unwrap().close);
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert!(parse_response(chunked).is_err());
    let err = parse_response(b"backend-0\n").unwrap_err();
    assert!(format!("{err:#}").contains("backend-0"), "{err:#}");
}

// ---- In a namespace (root) ---------------------------------------------

#[test]
fn keep_alive_connection_answers_many_gets_on_one_tcp_connection() {
    require_root();
    let ns = lo_netns("http-keepalive");
    let server = spawn_http_server(&ns, (V4, 0).into(), "web-0").unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let mut conn = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();
    assert_eq!(conn.peer_addr(), addr);
    let local = conn.local_addr();
    assert_eq!(local.ip(), V4);
    for i in 1..=5 {
        assert_eq!(conn.get(TIMEOUT).unwrap(), "web-0");
        assert_eq!(server.served(), i);
    }
    assert_eq!(server.accepted(), 1);
    assert_eq!(conn.local_addr(), local);

    // Pipelined requests are answered in order; the connection stays open.
    let two = b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n";
    let (reply, closed) = raw_exchange(&ns, addr, two, STAYS_OPEN);
    assert_eq!(reply.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{reply}");
    assert_eq!(reply.matches("\r\n\r\nweb-0\n").count(), 2, "{reply}");
    assert!(!closed, "closed a keep-alive connection: {reply}");
    assert_eq!((server.accepted(), server.served()), (2, 7));

    // The first connection is still good after all that.
    assert_eq!(conn.get(TIMEOUT).unwrap(), "web-0");
    assert_eq!(server.accepted(), 2);
}

#[test]
fn connection_close_is_honoured() {
    require_root();
    let ns = lo_netns("http-close");
    let server = spawn_http_server(&ns, (V4, 0).into(), "web").unwrap();
    let addr = server.local_addr();

    assert_eq!(http_get(&ns, addr, TIMEOUT).unwrap(), "web");
    assert_eq!((server.accepted(), server.served()), (1, 1));

    let (reply, closed) = raw_exchange(
        &ns,
        addr,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        TIMEOUT,
    );
    assert_eq!(
        reply,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n\
         Connection: close\r\n\r\nweb\n"
    );
    assert!(closed);

    // HTTP/1.0 closes by default and stays open when it asks to.
    let (reply, closed) = raw_exchange(&ns, addr, b"GET / HTTP/1.0\r\n\r\n", TIMEOUT);
    assert!(reply.contains("Connection: close\r\n") && reply.ends_with("web\n"));
    assert!(closed, "{reply}");
    let (reply, closed) = raw_exchange(
        &ns,
        addr,
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        STAYS_OPEN,
    );
    assert!(reply.contains("Connection: keep-alive\r\n"), "{reply}");
    assert!(!closed, "{reply}");
    assert_eq!((server.accepted(), server.served()), (4, 4));
}

#[test]
fn ipv6_and_dual_stack_servers_answer() {
    require_root();
    let ns = lo_netns("http-v6");
    let v6 = spawn_http_server(&ns, (V6, 0).into(), "six").unwrap();
    assert_eq!(http_get(&ns, v6.local_addr(), TIMEOUT).unwrap(), "six");
    let mut conn = HttpConnection::open(&ns, v6.local_addr(), TIMEOUT).unwrap();
    assert_eq!(conn.local_addr().ip(), V6);
    for _ in 0..3 {
        assert_eq!(conn.get(TIMEOUT).unwrap(), "six");
    }
    assert_eq!((v6.accepted(), v6.served()), (2, 4));

    let any = spawn_http_server(&ns, (Ipv6Addr::UNSPECIFIED, 0).into(), "both").unwrap();
    let port = any.local_addr().port();
    for addr in [SocketAddr::from((V4, port)), SocketAddr::from((V6, port))] {
        assert_eq!(http_get(&ns, addr, TIMEOUT).unwrap(), "both", "{addr}");
        let mut conn = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();
        assert_eq!(conn.get(TIMEOUT).unwrap(), "both", "{addr}");
        assert_eq!(conn.get(TIMEOUT).unwrap(), "both", "{addr}");
    }
    assert_eq!((any.accepted(), any.served()), (4, 6));
}

#[test]
fn unservable_requests_get_an_error_status_and_a_close() {
    require_root();
    let ns = lo_netns("http-bad");
    let server = spawn_http_server(&ns, (V4, 0).into(), "web").unwrap();
    let addr = server.local_addr();

    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let cases = [
        ("NOT HTTP AT ALL\r\n\r\n".to_owned(), "400 Bad Request"),
        ("GET / HTTP/1.1\r\n\r\n".to_owned(), "400 Bad Request"),
        (big_head, "431 Request Header Fields Too Large"),
        (
            "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n".to_owned(),
            "413 Payload Too Large",
        ),
        (
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(),
            "501 Not Implemented",
        ),
    ];
    for (request, status) in &cases {
        let (reply, closed) = raw_exchange(&ns, addr, request.as_bytes(), TIMEOUT);
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{status}: {reply}"
        );
        assert!(reply.contains("Connection: close\r\n"), "{reply}");
        assert!(closed, "{status}: not closed");
    }
    assert_eq!(server.served(), 0);

    // Bodies are skipped and other methods refused, on a usable connection.
    let mixed = "POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
                 GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc\
                 GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    let (reply, closed) = raw_exchange(&ns, addr, mixed.as_bytes(), TIMEOUT);
    let statuses: Vec<&str> = reply
        .lines()
        .filter(|l| l.starts_with("HTTP/1.1 "))
        .collect();
    assert_eq!(
        statuses,
        [
            "HTTP/1.1 405 Method Not Allowed",
            "HTTP/1.1 200 OK",
            "HTTP/1.1 200 OK"
        ],
        "{reply}"
    );
    assert!(closed);
    assert_eq!(server.served(), 2);

    // The client reports a status other than 200 and a reply that is not
    // HTTP, naming the address and the namespace.
    let busy = spawn_tcp_name_server(
        &ns,
        (V4, 0).into(),
        "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\n\r\nbusy",
    )
    .unwrap();
    let err = format!(
        "{:#}",
        http_get(&ns, busy.local_addr(), TIMEOUT).unwrap_err()
    );
    assert!(err.contains("503") && err.contains("busy"), "{err}");
    assert!(err.contains(&busy.local_addr().to_string()), "{err}");
    assert!(err.contains(ns.name()), "{err}");
    assert_eq!((busy.accepted(), busy.served()), (1, 1));
    let plain = spawn_tcp_name_server(&ns, (V4, 0).into(), "backend-0").unwrap();
    let err = format!(
        "{:#}",
        http_get(&ns, plain.local_addr(), TIMEOUT).unwrap_err()
    );
    assert!(err.contains("not an HTTP/1.x response"), "{err}");
}

#[test]
fn dropping_the_server_cuts_its_open_connections() {
    require_root();
    let ns = lo_netns("http-drop");
    let server = spawn_http_server(&ns, (V4, 0).into(), "dying").unwrap();
    let addr = server.local_addr();
    let mut conns: Vec<HttpConnection> = (0..3)
        .map(|_| HttpConnection::open(&ns, addr, TIMEOUT).unwrap())
        .collect();
    for conn in &mut conns {
        assert_eq!(conn.get(TIMEOUT).unwrap(), "dying");
    }
    // One more that never sent a request.
    let mut silent = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();

    let t = Instant::now();
    drop(server);
    assert_within(t, Duration::from_secs(1));

    // Clients see EOF without sending anything (the one that never sent a request may
    // not have been accepted yet: then a reset) ...
    assert!(sees_eof(&mut conns[0].stream, TIMEOUT));
    sees_end(&mut silent.stream, TIMEOUT).expect("the silent connection ends");
    // ... and their next request fails quickly, naming the connection.
    for conn in &mut conns {
        let t = Instant::now();
        let err = format!("{:#}", conn.get(TIMEOUT).unwrap_err());
        assert_within(t, TIMEOUT);
        assert!(
            err.contains(&addr.to_string()) && err.contains(ns.name()),
            "{err}"
        );
        let again = format!("{:#}", conn.get(TIMEOUT).unwrap_err());
        assert!(again.contains("unusable"), "{again}");
    }
    // Nothing listens any more.
    assert!(http_get(&ns, addr, TIMEOUT).is_err());
    assert!(HttpConnection::open(&ns, addr, TIMEOUT).is_err());
}

#[test]
fn idle_connections_are_closed() {
    require_root();
    let ns = lo_netns("http-idle");
    let limits = Limits {
        idle_timeout: Duration::from_millis(200),
        ..Limits::DEFAULT
    };
    let server = spawn_with_limits(&ns, (V4, 0).into(), "idle", limits, None).unwrap();
    let mut conn = HttpConnection::open(&ns, server.local_addr(), TIMEOUT).unwrap();
    assert_eq!(conn.get(TIMEOUT).unwrap(), "idle");
    // Closed about 200 ms after the response, well within the wait.
    let t = Instant::now();
    assert!(sees_eof(&mut conn.stream, TIMEOUT));
    assert!(
        t.elapsed() >= Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    assert!(conn.get(TIMEOUT).is_err());
    // A connection that never completes a request is closed as well.
    let (reply, closed) = raw_exchange(&ns, server.local_addr(), b"GET / HT", TIMEOUT);
    assert!(closed && reply.is_empty(), "{reply}");
}

#[test]
fn connections_beyond_the_limit_are_closed() {
    require_root();
    let ns = lo_netns("http-limit");
    let limits = Limits {
        max_connections: 2,
        ..Limits::DEFAULT
    };
    let server = spawn_with_limits(&ns, (V4, 0).into(), "few", limits, None).unwrap();
    let addr = server.local_addr();
    let mut a = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();
    let mut b = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();
    assert_eq!(a.get(TIMEOUT).unwrap(), "few");
    assert_eq!(b.get(TIMEOUT).unwrap(), "few");
    // The kernel completes the handshake; the server then closes it.
    let mut over = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();
    assert!(over.get(TIMEOUT).is_err());
    assert_eq!(server.accepted(), 2);

    // Once one closes, a new connection is served (its thread ends
    // asynchronously: bounded retries).
    drop(a);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut next = HttpConnection::open(&ns, addr, TIMEOUT).unwrap();
        if next.get(TIMEOUT).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed after closing one");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.get(TIMEOUT).unwrap(), "few");
    assert_eq!(server.accepted(), 3);
}

#[test]
fn many_open_connections_are_cut_promptly_on_drop() {
    require_root();
    let ns = lo_netns("http-many");
    let server = spawn_http_server(&ns, (V6, 0).into(), "busy").unwrap();
    let addr = server.local_addr();
    let mut conns: Vec<HttpConnection> = (0..100)
        .map(|_| HttpConnection::open(&ns, addr, TIMEOUT).unwrap())
        .collect();
    for conn in &mut conns {
        assert_eq!(conn.get(TIMEOUT).unwrap(), "busy");
    }
    assert_eq!((server.accepted(), server.served()), (100, 100));
    let t = Instant::now();
    drop(server);
    assert_within(t, Duration::from_secs(1));
    for conn in &mut conns {
        assert!(sees_eof(&mut conn.stream, TIMEOUT), "{}", conn.local_addr());
    }
}
