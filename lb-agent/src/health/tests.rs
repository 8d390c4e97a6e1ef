//! Health check tests: the rise/fall state machine (pure), and probes and the
//! monitor against real sockets in network namespaces the tests create (they
//! need root and fail, never skip, without it).

mod threshold {
    use super::super::Threshold;
    use proptest::prelude::*;

    /// Feeds `obs` ('+' ok, '-' failed) and returns the transitions, as
    /// (index, new state).
    fn run(t: &mut Threshold, obs: &str) -> Vec<(usize, bool)> {
        obs.bytes()
            .enumerate()
            .filter_map(|(i, b)| {
                let ok = match b {
                    b'+' => true,
                    b'-' => false,
                    _ => panic!("bad observation {b}"),
                };
                t.observe(ok).map(|up| (i, up))
            })
            .collect()
    }

    #[test]
    fn up_goes_down_after_fall_consecutive_failures() {
        let mut t = Threshold::new(true, 2, 3);
        assert_eq!(run(&mut t, "--"), []);
        assert!(t.is_up());
        assert_eq!(run(&mut t, "-"), [(0, false)]);
        assert!(!t.is_up());
        // Further failures while down report nothing.
        assert_eq!(run(&mut t, "-----"), []);
        assert!(!t.is_up());
    }

    #[test]
    fn down_comes_up_after_rise_consecutive_successes() {
        let mut t = Threshold::new(false, 2, 3);
        assert_eq!(run(&mut t, "+"), []);
        assert!(!t.is_up());
        assert_eq!(run(&mut t, "+"), [(0, true)]);
        assert!(t.is_up());
        assert_eq!(run(&mut t, "+++++"), []);
    }

    #[test]
    fn a_success_while_up_resets_the_failure_count() {
        let mut t = Threshold::new(true, 2, 3);
        assert_eq!(run(&mut t, "--+--+--+"), []);
        assert!(t.is_up());
        assert_eq!(run(&mut t, "---"), [(2, false)]);
    }

    #[test]
    fn a_failure_while_down_resets_the_success_count() {
        let mut t = Threshold::new(false, 3, 1);
        assert_eq!(run(&mut t, "++-++-++-"), []);
        assert!(!t.is_up());
        assert_eq!(run(&mut t, "+++"), [(2, true)]);
    }

    #[test]
    fn counts_restart_after_a_transition() {
        let mut t = Threshold::new(true, 2, 2);
        // Down after 2 failures; the first success afterwards starts a fresh
        // count (the failures before the transition do not carry over).
        assert_eq!(run(&mut t, "--+-++--"), [(1, false), (5, true), (7, false)]);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_change() {
        let mut t = Threshold::new(true, 1, 1);
        assert_eq!(
            run(&mut t, "-+-++--"),
            [(0, false), (1, true), (2, false), (3, true), (5, false)]
        );
    }

    #[test]
    fn zero_rise_and_fall_act_as_one() {
        let mut t = Threshold::new(true, 0, 0);
        assert_eq!(t, Threshold::new(true, 1, 1));
        assert_eq!(run(&mut t, "+-+"), [(1, false), (2, true)]);
    }

    #[test]
    fn agreeing_observations_never_transition() {
        let mut up = Threshold::new(true, 1, 1);
        let mut down = Threshold::new(false, 1, 1);
        for _ in 0..100 {
            assert_eq!(up.observe(true), None);
            assert_eq!(down.observe(false), None);
        }
        assert!(up.is_up());
        assert!(!down.is_up());
    }

    #[test]
    fn large_thresholds_do_not_overflow() {
        let mut t = Threshold::new(true, u32::MAX, u32::MAX);
        for _ in 0..10_000 {
            assert_eq!(t.observe(false), None);
        }
        assert!(t.is_up());
    }

    /// Reference model, written differently: keep every observation since the
    /// last transition and flip when the trailing run of contradicting
    /// observations is long enough.
    struct Model {
        up: bool,
        rise: usize,
        fall: usize,
        since: Vec<bool>,
    }

    impl Model {
        fn observe(&mut self, ok: bool) -> Option<bool> {
            self.since.push(ok);
            let contradicting = self.since.iter().rev().take_while(|&&o| o != self.up);
            let needed = if self.up { self.fall } else { self.rise };
            if contradicting.count() >= needed.max(1) {
                self.up = !self.up;
                self.since.clear();
                Some(self.up)
            } else {
                None
            }
        }
    }

    proptest! {
        #[test]
        fn prop_matches_reference_model(
            up in any::<bool>(),
            rise in 0u32..6,
            fall in 0u32..6,
            obs in prop::collection::vec(any::<bool>(), 0..200),
        ) {
            let mut t = Threshold::new(up, rise, fall);
            let mut model = Model {
                up,
                rise: rise as usize,
                fall: fall as usize,
                since: Vec::new(),
            };
            let mut last = up;
            for ok in obs {
                let got = t.observe(ok);
                prop_assert_eq!(got, model.observe(ok));
                prop_assert_eq!(t.is_up(), model.up);
                // Some(..) only on a change, and always to the other state.
                if let Some(new) = got {
                    prop_assert_ne!(new, last);
                }
                last = t.is_up();
            }
        }
    }
}

/// Request building, response parsing and failure texts, without sockets.
mod pure {
    use std::io;
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::super::{MAX_RESPONSE_HEAD, ProbeFailure, http_request, parse_status};

    #[test]
    fn request_has_the_documented_shape() {
        let addr: SocketAddr = "192.0.2.1:8080".parse().unwrap();
        assert_eq!(
            http_request(addr, "/healthz?full=1", None).unwrap(),
            "GET /healthz?full=1 HTTP/1.1\r\nHost: 192.0.2.1:8080\r\n\
             User-Agent: xlb-health/1\r\nConnection: close\r\n\r\n"
        );
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert!(
            http_request(v6, "/", None)
                .unwrap()
                .contains("\r\nHost: [2001:db8::1]:80\r\n")
        );
        assert!(
            http_request(v6, "/", Some("api.example.com"))
                .unwrap()
                .contains("\r\nHost: api.example.com\r\n")
        );
    }

    #[test]
    fn request_refuses_paths_and_hosts_that_would_break_it() {
        let addr: SocketAddr = "192.0.2.1:80".parse().unwrap();
        for path in ["", "healthz", "/a b", "/a\r\nX: y", "/\t", "/\x7f"] {
            let err = http_request(addr, path, None).unwrap_err();
            assert!(
                matches!(err, ProbeFailure::InvalidRequest(_)),
                "{path:?}: {err}"
            );
        }
        for host in ["", "a b", "a\r\nX: y"] {
            let err = http_request(addr, "/", Some(host)).unwrap_err();
            assert!(
                matches!(err, ProbeFailure::InvalidRequest(_)),
                "{host:?}: {err}"
            );
        }
    }

    #[test]
    fn status_is_read_once_the_head_is_complete() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n\r\n").unwrap(), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\n\r\nbody")
                .unwrap(),
            Some(503)
        );
        // Bare LF line endings are accepted, as by most clients.
        assert_eq!(
            parse_status(b"HTTP/1.1 204 No Content\n\n").unwrap(),
            Some(204)
        );
        for partial in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
        ] {
            assert_eq!(parse_status(partial).unwrap(), None, "{partial:?}");
        }
    }

    #[test]
    fn garbage_is_malformed() {
        for garbage in [
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(parse_status(garbage), Err(ProbeFailure::Malformed)),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn many_headers_within_the_size_limit_still_parse() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        while head.len() < MAX_RESPONSE_HEAD - 10 {
            head.extend_from_slice(b"a:\r\n");
        }
        head.extend_from_slice(b"\r\n");
        assert!(head.len() <= MAX_RESPONSE_HEAD);
        assert_eq!(parse_status(&head).unwrap(), Some(200));
    }

    #[test]
    fn failures_read_concisely() {
        let cases = [
            (
                ProbeFailure::Connect(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
                "connect: connection refused",
            ),
            (
                ProbeFailure::Timeout(Duration::from_millis(500)),
                "timed out after 500ms",
            ),
            (
                ProbeFailure::Timeout(Duration::from_millis(1500)),
                "timed out after 1s 500ms",
            ),
            (
                ProbeFailure::Status {
                    status: 503,
                    expect: (200, 399),
                },
                "HTTP status 503 not in 200-399",
            ),
            (ProbeFailure::Malformed, "malformed HTTP response"),
            (
                ProbeFailure::Receive(io::Error::other("Boom")),
                "receive: boom",
            ),
        ];
        for (failure, text) in cases {
            assert_eq!(failure.to_string(), text);
        }
    }
}

/// Namespaces and servers for the socket tests.
mod support {
    use std::future::Future;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use lb_core::config::{HealthCheck, Probe};
    use lb_testbed::{Netns, check_privileges};

    /// Backend addresses, on the namespace's loopback.
    pub const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    pub const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

    /// Upper bound of one test body; a hang fails the test instead.
    const DEADLINE: Duration = Duration::from_secs(8);

    /// Runs `body` on a current-thread tokio runtime, on a thread inside a
    /// new namespace that has [`V4`] and [`V6`] on `lo`, so every socket the
    /// test opens lives there. Panics (never skips) without root.
    pub fn in_netns<F, Fut>(tag: &str, body: F)
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = ()>,
    {
        if let Err(e) = check_privileges() {
            panic!("health socket tests run in their own network namespaces: {e:#}");
        }
        let ns = Netns::new(&format!("health-{tag}")).expect("create netns");
        ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"])
            .expect("add IPv4 address");
        ns.ip(&["addr", "add", "2001:db8::1/128", "dev", "lo", "nodad"])
            .expect("add IPv6 address");
        ns.block_on(DEADLINE, body).expect("test body in its netns");
    }

    pub fn tcp_check(timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(timeout_ms),
            rise: 2,
            fall: 3,
            port: None,
        }
    }

    pub fn http_check(path: &str, timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            probe: Probe::Http {
                path: path.to_owned(),
                host: None,
                expect: (200, 399),
            },
            ..tcp_check(timeout_ms)
        }
    }

    pub async fn listen(ip: IpAddr) -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind((ip, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("local_addr");
        (listener, addr)
    }

    /// An address nothing listens on (bound once, then closed).
    pub async fn closed_port(ip: IpAddr) -> SocketAddr {
        listen(ip).await.1
    }

    /// Accepts connections and closes them at once, counting them. Stops
    /// (closing the listener) when the handle is aborted or dropped.
    pub struct Acceptor {
        pub accepted: Arc<AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Acceptor {
        pub fn spawn(listener: TcpListener) -> Acceptor {
            let accepted = Arc::new(AtomicUsize::new(0));
            let count = accepted.clone();
            let task = tokio::spawn(async move {
                while listener.accept().await.is_ok() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
            Acceptor { accepted, task }
        }

        pub fn count(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    impl Drop for Acceptor {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// What the test HTTP server does after reading a request head.
    pub enum Reply {
        /// Writes the chunks with a short pause between them, then closes.
        Chunks(Vec<Vec<u8>>),
        /// Keeps the connection open and never answers.
        Silent,
        /// Closes without answering.
        Close,
    }

    impl Reply {
        pub fn bytes(b: impl Into<Vec<u8>>) -> Reply {
            Reply::Chunks(vec![b.into()])
        }

        pub fn status(code: u16) -> Reply {
            Reply::bytes(format!(
                "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\n\r\n"
            ))
        }
    }

    /// A scripted HTTP server: records each request head and answers it
    /// with `reply(head)`.
    pub struct HttpServer {
        pub requests: Arc<Mutex<Vec<String>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl HttpServer {
        pub fn spawn(
            listener: TcpListener,
            reply: impl Fn(&str) -> Reply + Send + Sync + 'static,
        ) -> HttpServer {
            let requests = Arc::new(Mutex::new(Vec::new()));
            let log = requests.clone();
            let reply = Arc::new(reply);
            let task = tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let log = log.clone();
                    let reply = reply.clone();
                    tokio::spawn(async move {
                        // Bounded: the whole test runs under a deadline.
                        let _ = serve(stream, &log, &*reply).await;
                    });
                }
            });
            HttpServer { requests, task }
        }

        pub fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }

        /// The request lines ("GET /x HTTP/1.1") seen so far.
        pub fn request_lines(&self) -> Vec<String> {
            self.requests()
                .iter()
                .map(|r| r.lines().next().unwrap_or_default().to_owned())
                .collect()
        }
    }

    impl Drop for HttpServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn serve(
        mut stream: TcpStream,
        log: &Mutex<Vec<String>>,
        reply: &(dyn Fn(&str) -> Reply + Send + Sync),
    ) -> std::io::Result<()> {
        let mut head = Vec::new();
        let mut buf = [0; 1024];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let action = reply(&head);
        log.lock().unwrap().push(head);
        match action {
            Reply::Chunks(chunks) => {
                for (i, chunk) in chunks.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                    }
                    stream.write_all(chunk).await?;
                }
            }
            Reply::Silent => {
                // Until the prober gives up and closes.
                while stream.read(&mut buf).await? > 0 {}
            }
            Reply::Close => {}
        }
        Ok(())
    }
}

/// One probe at a time against real sockets.
mod probes {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use tokio::net::{TcpSocket, TcpStream};

    use super::super::probe;
    use super::support::{
        Acceptor, HttpServer, Reply, V4, V6, closed_port, http_check, in_netns, listen, tcp_check,
    };
    use lb_core::config::Probe;

    async fn failure(target: SocketAddr, check: &lb_core::config::HealthCheck) -> String {
        probe(target, check)
            .await
            .expect_err("the probe should fail")
            .to_string()
    }

    #[test]
    fn tcp_probe_succeeds_against_a_listener_v4_and_v6() {
        in_netns("tcp-ok", || async {
            for ip in [V4, V6] {
                let (listener, addr) = listen(ip).await;
                let acceptor = Acceptor::spawn(listener);
                probe(addr, &tcp_check(5000)).await.expect("probe");
                // The server saw the connection.
                let deadline = Instant::now() + Duration::from_secs(1);
                while acceptor.count() == 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                assert_eq!(acceptor.count(), 1, "{addr}");
            }
        });
    }

    #[test]
    fn tcp_probe_to_a_closed_port_is_refused() {
        in_netns("tcp-refused", || async {
            for ip in [V4, V6] {
                let addr = closed_port(ip).await;
                assert_eq!(
                    failure(addr, &tcp_check(500)).await,
                    "connect: connection refused"
                );
            }
        });
    }

    #[test]
    fn tcp_probe_uses_the_check_port_when_set() {
        in_netns("tcp-port", || async {
            let (listener, open) = listen(V4).await;
            let _acceptor = Acceptor::spawn(listener);
            let closed = closed_port(V4).await;
            let mut check = tcp_check(500);
            check.port = Some(open.port());
            probe(closed, &check).await.expect("probe the check port");
            check.port = Some(closed.port());
            assert_eq!(failure(open, &check).await, "connect: connection refused");
        });
    }

    /// A listener whose accept queue is full drops new SYNs (Linux drops
    /// them whatever the SYN-cookie setting), so a connect hangs until the
    /// probe's timeout: the "overloaded backend" case.
    #[test]
    fn tcp_probe_times_out_when_syns_are_dropped() {
        in_netns("tcp-timeout", || async {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(V4, 0)).unwrap();
            let addr = socket.local_addr().unwrap();
            let _listener = socket.listen(0).unwrap();
            // Fill the accept queue (never accepted) until a connect hangs.
            let mut held = Vec::new();
            let mut full = false;
            for _ in 0..8 {
                let connect = TcpStream::connect(addr);
                let Ok(stream) = tokio::time::timeout(Duration::from_millis(200), connect).await
                else {
                    full = true;
                    break;
                };
                held.push(stream.expect("connect while filling the queue"));
            }
            assert!(full, "the accept queue never filled up");
            let start = Instant::now();
            assert_eq!(
                failure(addr, &tcp_check(300)).await,
                "timed out after 300ms"
            );
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(5),
                "{took:?}"
            );
        });
    }

    /// Answers `GET /status/NNN` with status NNN.
    fn status_server(head: &str) -> Reply {
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.strip_prefix("/status/"))
            .and_then(|c| c.parse().ok())
            .unwrap_or(404);
        Reply::status(code)
    }

    #[test]
    fn http_probe_sends_the_documented_request_and_accepts_200() {
        in_netns("http-ok", || async {
            for ip in [V4, V6] {
                let (listener, addr) = listen(ip).await;
                let server = HttpServer::spawn(listener, |_| {
                    Reply::bytes("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                });
                probe(addr, &http_check("/healthz", 5000))
                    .await
                    .expect("probe");
                assert_eq!(
                    server.requests(),
                    [format!(
                        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\
                         User-Agent: xlb-health/1\r\nConnection: close\r\n\r\n"
                    )]
                );
            }
        });
    }

    #[test]
    fn http_probe_sends_the_configured_host_to_the_check_port() {
        in_netns("http-host", || async {
            let (listener, addr) = listen(V4).await;
            let server = HttpServer::spawn(listener, |_| Reply::status(200));
            let target = closed_port(V4).await;
            let mut check = http_check("/", 500);
            check.port = Some(addr.port());
            if let Probe::Http { host, .. } = &mut check.probe {
                *host = Some("app.example.com".to_owned());
            }
            probe(target, &check).await.expect("probe");
            let requests = server.requests();
            assert_eq!(requests.len(), 1);
            assert!(
                requests[0].contains("\r\nHost: app.example.com\r\n"),
                "{requests:?}"
            );
        });
    }

    #[test]
    fn http_probe_accepts_exactly_the_expected_status_range() {
        in_netns("http-status", || async {
            let (listener, addr) = listen(V4).await;
            let _server = HttpServer::spawn(listener, status_server);
            for code in [200, 204, 301, 399] {
                probe(addr, &http_check(&format!("/status/{code}"), 5000))
                    .await
                    .unwrap_or_else(|e| panic!("{code}: {e}"));
            }
            for code in [100, 199, 400, 404, 503] {
                assert_eq!(
                    failure(addr, &http_check(&format!("/status/{code}"), 500)).await,
                    format!("HTTP status {code} not in 200-399")
                );
            }
            let mut exact = http_check("/status/204", 500);
            if let Probe::Http { expect, .. } = &mut exact.probe {
                *expect = (204, 204);
            }
            probe(addr, &exact).await.expect("204 in 204-204");
            let mut exact = http_check("/status/200", 500);
            if let Probe::Http { expect, .. } = &mut exact.probe {
                *expect = (204, 204);
            }
            assert_eq!(
                failure(addr, &exact).await,
                "HTTP status 200 not in 204-204"
            );
        });
    }

    #[test]
    fn http_probe_reads_a_head_split_across_segments() {
        in_netns("http-split", || async {
            let (listener, addr) = listen(V4).await;
            let _server = HttpServer::spawn(listener, |_| {
                Reply::Chunks(vec![
                    b"HTTP/1.1 2".to_vec(),
                    b"00 OK\r\nContent-Le".to_vec(),
                    b"ngth: 0\r\n".to_vec(),
                    b"\r\n".to_vec(),
                ])
            });
            probe(addr, &http_check("/", 1000)).await.expect("probe");
        });
    }

    #[test]
    fn http_probe_fails_on_a_malformed_response() {
        in_netns("http-garbage", || async {
            let (listener, addr) = listen(V4).await;
            let _server =
                HttpServer::spawn(listener, |_| Reply::bytes("SSH-2.0-OpenSSH_9.6\r\n\r\n"));
            assert_eq!(
                failure(addr, &http_check("/", 500)).await,
                "malformed HTTP response"
            );
        });
    }

    #[test]
    fn http_probe_fails_when_the_server_closes_without_answering() {
        in_netns("http-close", || async {
            let (listener, addr) = listen(V4).await;
            let _server = HttpServer::spawn(listener, |_| Reply::Close);
            assert_eq!(
                failure(addr, &http_check("/", 500)).await,
                "connection closed before a complete HTTP response head"
            );
            // Also when part of the head came first.
            let (listener, addr) = listen(V4).await;
            let _server = HttpServer::spawn(listener, |_| Reply::bytes("HTTP/1.1 200 OK\r\n"));
            assert_eq!(
                failure(addr, &http_check("/", 500)).await,
                "connection closed before a complete HTTP response head"
            );
        });
    }

    #[test]
    fn http_probe_gives_up_on_an_oversized_head() {
        in_netns("http-large", || async {
            let (listener, addr) = listen(V4).await;
            let _server = HttpServer::spawn(listener, |_| {
                let mut head = b"HTTP/1.1 200 OK\r\nX-Filler: ".to_vec();
                head.resize(3 * 8192, b'a');
                Reply::bytes(head)
            });
            assert_eq!(
                failure(addr, &http_check("/", 1000)).await,
                "HTTP response head larger than 8192 bytes"
            );
        });
    }

    #[test]
    fn http_probe_times_out_when_the_server_never_answers() {
        in_netns("http-slow", || async {
            let (listener, addr) = listen(V4).await;
            let server = HttpServer::spawn(listener, |_| Reply::Silent);
            let start = Instant::now();
            assert_eq!(
                failure(addr, &http_check("/", 300)).await,
                "timed out after 300ms"
            );
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(300) && took < Duration::from_secs(5),
                "{took:?}"
            );
            // The request was sent; only the answer was missing.
            assert_eq!(server.request_lines(), ["GET / HTTP/1.1"]);
        });
    }

    /// The timeout covers the whole exchange, not each read: a server that
    /// trickles its head slower than the timeout still fails.
    #[test]
    fn http_probe_timeout_covers_a_trickling_head() {
        in_netns("http-trickle", || async {
            let (listener, addr) = listen(V4).await;
            let _server = HttpServer::spawn(listener, |_| {
                // 12 chunks, 30 ms apart: each read is quick, the whole is not.
                Reply::Chunks(
                    "HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
                        .as_bytes()
                        .chunks(2)
                        .map(<[u8]>::to_vec)
                        .collect(),
                )
            });
            assert_eq!(
                failure(addr, &http_check("/", 200)).await,
                "timed out after 200ms"
            );
        });
    }
}

/// The monitor: tasks, thresholds and events against real servers.
mod monitor {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{self, UnboundedReceiver, error::TryRecvError};

    use super::super::{HealthEvent, Monitor, Target};
    use super::support::{
        Acceptor, HttpServer, Reply, V4, closed_port, http_check, in_netns, listen, tcp_check,
    };
    use lb_core::config::HealthCheck;

    type Key = &'static str;

    /// Generous bound for an expected event (thresholds here take a few
    /// 50 ms intervals).
    const EVENT_WITHIN: Duration = Duration::from_secs(2);

    fn monitor() -> (Monitor<Key>, UnboundedReceiver<HealthEvent<Key>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Monitor::new(tx), rx)
    }

    fn targets<const N: usize>(
        list: [(Key, SocketAddr, &HealthCheck, bool); N],
    ) -> BTreeMap<Key, Target> {
        list.into_iter()
            .map(|(key, addr, check, initial_up)| {
                (
                    key,
                    Target {
                        addr,
                        check: check.clone(),
                        initial_up,
                    },
                )
            })
            .collect()
    }

    async fn next_event(rx: &mut UnboundedReceiver<HealthEvent<Key>>) -> HealthEvent<Key> {
        tokio::time::timeout(EVENT_WITHIN, rx.recv())
            .await
            .expect("no health event in time")
            .expect("event channel closed")
    }

    /// Asserts that no event arrives for `quiet`.
    async fn assert_quiet(rx: &mut UnboundedReceiver<HealthEvent<Key>>, quiet: Duration) {
        if let Ok(event) = tokio::time::timeout(quiet, rx.recv()).await {
            panic!("unexpected event {event:?}");
        }
    }

    /// Waits (bounded) until `cond` holds.
    async fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + EVENT_WITHIN;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn event(key: Key, up: bool, detail: &str) -> HealthEvent<Key> {
        HealthEvent {
            key,
            up,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn a_stopped_server_goes_down_once_after_fall_and_up_once_after_rise() {
        in_netns("mon-flap", || async {
            let check = tcp_check(200); // 50 ms interval, rise 2, fall 3
            let (listener, addr) = listen(V4).await;
            let server = Acceptor::spawn(listener);
            let (mut monitor, mut rx) = monitor();
            monitor.set_targets(targets([("web", addr, &check, true)]));
            wait_until("two probes passed", || server.count() >= 2).await;
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
            assert_eq!(monitor.is_up(&"web"), Some(true));

            drop(server);
            assert_eq!(
                next_event(&mut rx).await,
                event("web", false, "connect: connection refused")
            );
            // `fall` is counted in probes, not time (timing belongs in benchmarks):
            // the down event needed three refused connects.
            assert_eq!(monitor.is_up(&"web"), Some(false));
            assert_quiet(&mut rx, 4 * check.interval).await;

            let server = Acceptor::spawn(TcpListener::bind(addr).await.expect("rebind"));
            assert_eq!(next_event(&mut rx).await, event("web", true, "ok"));
            assert!(server.count() >= 2, "rise 2 needs two probes");
            assert_eq!(monitor.is_up(&"web"), Some(true));
            assert_quiet(&mut rx, 4 * check.interval).await;
        });
    }

    #[test]
    fn the_initial_state_is_not_reported_only_transitions() {
        in_netns("mon-initial", || async {
            let check = tcp_check(200);
            let (listener, healthy) = listen(V4).await;
            let _server = Acceptor::spawn(listener);
            let dead = closed_port(V4).await;
            let (mut monitor, mut rx) = monitor();
            monitor.set_targets(targets([
                ("up-healthy", healthy, &check, true),
                ("down-healthy", healthy, &check, false),
                ("down-dead", dead, &check, false),
            ]));
            assert_eq!(next_event(&mut rx).await, event("down-healthy", true, "ok"));
            assert_quiet(&mut rx, 6 * check.interval).await;
            assert_eq!(monitor.is_up(&"up-healthy"), Some(true));
            assert_eq!(monitor.is_up(&"down-healthy"), Some(true));
            assert_eq!(monitor.is_up(&"down-dead"), Some(false));
            assert_eq!(monitor.is_up(&"unknown"), None);
        });
    }

    #[test]
    fn removing_a_key_stops_its_probes() {
        in_netns("mon-remove", || async {
            let check = tcp_check(200);
            let (listener, addr_a) = listen(V4).await;
            let server_a = Acceptor::spawn(listener);
            let (listener, addr_b) = listen(V4).await;
            let server_b = Acceptor::spawn(listener);
            let (mut monitor, mut rx) = monitor();
            monitor.set_targets(targets([
                ("a", addr_a, &check, true),
                ("b", addr_b, &check, true),
            ]));
            wait_until("both servers were probed twice", || {
                server_a.count() >= 2 && server_b.count() >= 2
            })
            .await;

            monitor.set_targets(targets([("b", addr_b, &check, true)]));
            assert_eq!(monitor.is_up(&"a"), None);
            assert_eq!(monitor.is_up(&"b"), Some(true));
            // Let a connection already under way land, then count.
            tokio::time::sleep(check.interval).await;
            let (a, b) = (server_a.count(), server_b.count());
            tokio::time::sleep(6 * check.interval).await;
            assert_eq!(server_a.count(), a, "a removed key was still probed");
            assert!(server_b.count() >= b + 3, "the other key kept being probed");
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        });
    }

    #[test]
    fn dropping_the_monitor_stops_every_task() {
        in_netns("mon-drop", || async {
            let check = tcp_check(200);
            let (listener, addr) = listen(V4).await;
            let server = Acceptor::spawn(listener);
            let (mut monitor, mut rx) = monitor();
            monitor.set_targets(targets([
                ("a", addr, &check, true),
                ("b", addr, &check, true),
            ]));
            wait_until("probes ran", || server.count() >= 4).await;

            drop(monitor);
            // Every task holds a sender: the channel closes once all ended.
            let closed = tokio::time::timeout(EVENT_WITHIN, rx.recv()).await;
            assert_eq!(closed, Ok(None), "tasks outlived the monitor");
            tokio::time::sleep(check.interval).await;
            let count = server.count();
            tokio::time::sleep(6 * check.interval).await;
            assert_eq!(server.count(), count);
        });
    }

    #[test]
    fn unchanged_targets_are_not_restarted() {
        in_netns("mon-same", || async {
            let mut check = tcp_check(200);
            check.interval = Duration::from_secs(2);
            let (listener, addr) = listen(V4).await;
            let server = Acceptor::spawn(listener);
            let (mut monitor, mut rx) = monitor();
            // A restart would probe at once, so each call would add a
            // connection. `initial_up` is ignored for a known key.
            for i in 0..10 {
                monitor.set_targets(targets([("a", addr, &check, i % 2 == 0)]));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            wait_until("the first probe", || server.count() >= 1).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(server.count(), 1);
            assert_eq!(monitor.is_up(&"a"), Some(true));
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        });
    }

    /// Answers `GET /status/NNN` with status NNN.
    fn status_reply(head: &str) -> Reply {
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.strip_prefix("/status/"))
            .and_then(|c| c.parse().ok())
            .unwrap_or(404);
        Reply::status(code)
    }

    #[test]
    fn a_changed_check_or_address_restarts_the_task_with_its_state() {
        in_netns("mon-change", || async {
            let (listener, addr) = listen(V4).await;
            let server = HttpServer::spawn(listener, status_reply);
            let mut failing = http_check("/status/503", 200);
            (failing.rise, failing.fall) = (1, 1);
            let (mut monitor, mut rx) = monitor();
            monitor.set_targets(targets([("k", addr, &failing, true)]));
            assert_eq!(
                next_event(&mut rx).await,
                event("k", false, "HTTP status 503 not in 200-399")
            );

            // New check: the task restarts in the state it had (down), so the
            // first passing probe is a transition although `initial_up` says
            // up.
            let mut passing = http_check("/status/200", 200);
            (passing.rise, passing.fall) = (1, 1);
            monitor.set_targets(targets([("k", addr, &passing, true)]));
            assert_eq!(next_event(&mut rx).await, event("k", true, "ok"));
            let seen = server.request_lines().len();
            tokio::time::sleep(4 * passing.interval).await;
            let after: Vec<String> = server.request_lines().split_off(seen);
            assert!(after.len() >= 2, "{after:?}");
            assert!(
                after.iter().all(|l| l == "GET /status/200 HTTP/1.1"),
                "the old check still ran: {after:?}"
            );

            // New address: probes move to the other server; the state (up)
            // carries over, so no event.
            let (listener, moved) = listen(V4).await;
            let new_server = HttpServer::spawn(listener, status_reply);
            monitor.set_targets(targets([("k", moved, &passing, false)]));
            tokio::time::sleep(passing.interval).await;
            let old_count = server.request_lines().len();
            wait_until("the new address was probed twice", || {
                new_server.request_lines().len() >= 2
            })
            .await;
            tokio::time::sleep(2 * passing.interval).await;
            assert_eq!(server.request_lines().len(), old_count);
            assert_eq!(monitor.is_up(&"k"), Some(true));
            assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        });
    }
}
