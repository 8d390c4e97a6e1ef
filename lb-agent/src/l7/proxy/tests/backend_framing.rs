//! Backend exchanges by [`crate::l7::wire`] over real sockets: every framing a
//! backend may use streams through whole, and one backend connection carries
//! requests with and without a body, one after the other.

use super::*;

/// One chunk of a chunked answer, written on its own.
const CHUNK: usize = 1000;
const CHUNKS: usize = 20;
/// The body of a close-delimited answer.
const UNTIL_CLOSE: usize = 5000;

/// A backend that answers by path: `/chunked` in [`CHUNKS`] separate writes with a
/// trailer, `/close` without a length (closing after it), anything else with a
/// `Content-Length`. Counts the connections it accepted.
async fn framing_backend(ip: IpAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let line = String::from_utf8_lossy(&head[..end]).into_owned();
                    head.drain(..end + 4);
                    let path = line.split(' ').nth(1).unwrap_or("/").to_owned();
                    if answer_framed(&mut stream, &path).await.is_err() || path == "/close" {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// The letter chunk `i` is made of.
fn letter(i: usize) -> u8 {
    b"abcdefghijklmnopqrstuvwxyz"[i % 26]
}

async fn answer_framed(stream: &mut TcpStream, path: &str) -> std::io::Result<()> {
    match path {
        "/chunked" => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await?;
            for i in 0..CHUNKS {
                let data = [letter(i); CHUNK];
                stream
                    .write_all(format!("{CHUNK:x}\r\n").as_bytes())
                    .await?;
                stream.write_all(&data).await?;
                stream.write_all(b"\r\n").await?;
                tokio::task::yield_now().await;
            }
            stream.write_all(b"0\r\nx-checksum: 1\r\n\r\n").await
        }
        "/close" => {
            stream.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await?;
            stream.write_all(&[b'c'; UNTIL_CLOSE]).await?;
            stream.shutdown().await
        }
        _ => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfixed")
                .await
        }
    }
}

#[test]
fn chunked_and_close_delimited_answers_stream_through_whole() {
    in_netns("framing", || async {
        let (addr, conns) = framing_backend(backend_ip(1)).await;
        let p = start(
            test_config(),
            snapshot(vec![host("", "/", route("b", &[addr]))]),
        );
        let expected_chunked: String = (0..CHUNKS)
            .map(|i| char::from(letter(i)).to_string().repeat(CHUNK))
            .collect();
        for (path, expected) in [
            ("/chunked", expected_chunked.clone()),
            ("/fixed", "fixed".to_owned()),
            ("/chunked", expected_chunked.clone()),
            ("/close", "c".repeat(UNTIL_CLOSE)),
            ("/chunked", expected_chunked),
        ] {
            let got = get(p.http, "a", path).await;
            assert_eq!(got.status, StatusCode::OK, "{path}");
            assert!(got.body == expected, "{path}: {} bytes", got.body.len());
            // Lets the finished connection park (see `reuses_backend_connections`).
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            conns.load(Ordering::Relaxed),
            2,
            "one connection until the close-delimited answer, a new one after it"
        );
    });
}

#[test]
fn one_backend_connection_carries_requests_with_and_without_a_body() {
    in_netns("bodies", || async {
        let (a, p, _tx) = proxy_to_a(test_config()).await;
        let io = TokioIo::new(connect(p.http).await);
        let (mut client, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let requests = [
            ("GET", "/one", ""),
            ("POST", "/two", "hello"),
            ("GET", "/three", ""),
            ("HEAD", "/four", ""),
            ("POST", "/five", ""),
        ];
        for (method, path, body) in requests {
            let req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", "a.example")
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let got = read_answer(client.send_request(req).await.expect("response")).await;
            assert_eq!(got.status, StatusCode::OK, "{method} {path}");
            if method == "HEAD" {
                assert_eq!(got.body, "", "HEAD {path}");
                assert!(got.headers.contains_key("content-length"));
            } else {
                let line = format!("request: {method} {path}");
                assert_eq!(echoed(&got.body, "request").as_deref(), Some(&line[9..]));
                let length = body.len().to_string();
                assert_eq!(
                    echoed(&got.body, "body-length"),
                    Some(length),
                    "{method} {path}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(a.hits.load(Ordering::Relaxed), requests.len());
        assert_eq!(a.conns.load(Ordering::Relaxed), 1, "one backend connection");
    });
}
