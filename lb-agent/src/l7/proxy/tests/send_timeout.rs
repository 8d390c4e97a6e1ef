//! `proxy-send-timeout` (and `--l7-send-timeout`, its default) against real sockets: a
//! backend that accepts and stops reading gets the request cut and the client a 504;
//! one that reads slowly but steadily is never cut, however long the whole body takes.

use super::*;

/// The request body: far more than the socket buffers between the proxy and a backend
/// hold, so a backend that does not read stalls the proxy's writes.
const BODY: usize = 16 << 20;
/// The backends' receive buffer (the kernel doubles it): small, so it fills soon.
const BACKEND_RCVBUF: u32 = 64 << 10;
/// The steady backend reads this much, then pauses for [`PAUSE`].
const STEP: usize = 1 << 20;
/// Well under the 1 s send timeout, while the pauses add up to well over it.
const PAUSE: Duration = Duration::from_millis(200);

/// A raw TCP backend on port 80 of `ip`. `steady` false: it accepts and never reads
/// (the connections stay open); true: it reads each request's [`BODY`] in [`STEP`]s
/// with a [`PAUSE`] after each, then answers 200.
fn raw_backend(ip: IpAddr, steady: bool) -> SocketAddr {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(BACKEND_RCVBUF).unwrap();
    socket.bind(SocketAddr::new(ip, 80)).unwrap();
    let listener = socket.listen(16).unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            if steady {
                tokio::spawn(read_steadily(stream));
            } else {
                held.push(stream);
            }
        }
    });
    addr
}

async fn read_steadily(mut stream: TcpStream) {
    let mut buf = vec![0; 64 << 10];
    let mut seen = Vec::new();
    let body_start = loop {
        let Ok(n @ 1..) = stream.read(&mut buf).await else {
            return;
        };
        seen.extend_from_slice(&buf[..n]);
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let mut body = seen.len() - body_start;
    let mut next_pause = STEP;
    while body < BODY {
        let Ok(n @ 1..) = stream.read(&mut buf).await else {
            return;
        };
        body += n;
        if body >= next_pause {
            next_pause += STEP;
            tokio::time::sleep(PAUSE).await;
        }
    }
    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
    let _ = stream.write_all(answer).await;
    let _ = stream.flush().await;
    // Held until the proxy closes, so the answer is not cut by our close.
    let _ = stream.read(&mut buf).await;
}

/// POSTs a [`BODY`] to `host` (written by a separate task, which stops when the proxy
/// stops reading) and returns the answer's head, or what arrived before the close.
async fn post_large(addr: SocketAddr, host: &str) -> String {
    let (mut rd, mut wr) = connect(addr).await.into_split();
    let head = format!("POST /upload HTTP/1.1\r\nhost: {host}\r\ncontent-length: {BODY}\r\n\r\n");
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 64 << 10];
        for _ in 0..BODY / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut out = Vec::new();
    let mut buf = [0; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match rd.read(&mut buf).await {
            Ok(n @ 1..) => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    writer.abort();
    String::from_utf8_lossy(&out).into_owned()
}

fn send_timeout(seconds: u64) -> Policy {
    Policy {
        send_timeout: Some(Duration::from_secs(seconds)),
        ..Policy::default()
    }
}

#[test]
fn a_backend_that_stops_reading_is_cut_after_the_send_timeout() {
    in_netns("sendto", || async {
        let stalled = raw_backend(backend_ip(1), false);
        let steady = raw_backend(backend_ip(2), true);
        // The proxy's own send and request timeouts are 15 s: the test's deadline is
        // 20 s, so a 504 here shows the route's 1 s applied.
        let config = ProxyConfig {
            send_timeout: Duration::from_secs(15),
            upstream_timeout: Duration::from_secs(15),
            max_body_bytes: 2 * BODY as u64,
            ..test_config()
        };
        let p = start(
            config.clone(),
            snapshot(vec![
                host(
                    "stalled.example",
                    "/",
                    with_policy(route("stalled", &[stalled]), send_timeout(1)),
                ),
                host(
                    "steady.example",
                    "/",
                    with_policy(route("steady", &[steady]), send_timeout(1)),
                ),
            ]),
        );
        let got = post_large(p.http, "stalled.example").await;
        assert!(got.starts_with("HTTP/1.1 504"), "{got}");
        settles_at(|| p.metrics.upstream_error_count("send_timeout"), 1).await;
        settles_at(|| p.metrics.local_answer_count("upstream_send_timeout"), 1).await;

        // Each pause is under the timeout, their sum over it: the timer runs between
        // writes, not over the whole request.
        let got = post_large(p.http, "steady.example").await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        settles_at(|| p.metrics.upstream_error_count("send_timeout"), 1).await;

        // Without the annotation, the agent's default (`--l7-send-timeout`) applies.
        let p = start(
            ProxyConfig {
                send_timeout: Duration::from_secs(1),
                ..config
            },
            snapshot(vec![host(
                "stalled.example",
                "/",
                route("stalled", &[stalled]),
            )]),
        );
        let got = post_large(p.http, "stalled.example").await;
        assert!(got.starts_with("HTTP/1.1 504"), "{got}");
        settles_at(|| p.metrics.upstream_error_count("send_timeout"), 1).await;
    });
}
