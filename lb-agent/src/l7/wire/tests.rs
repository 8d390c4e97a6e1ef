//! Packets in, packets out: a request head written and a backend's bytes read over an
//! in-memory pipe, with the framing cases of RFC 9112 6.3. The proxy's tests drive the
//! same path over real sockets, end to end.

use super::*;
use crate::l7::pieces::write_in_pieces;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn pair() -> (Connection, DuplexStream) {
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    (Connection::new(Box::new(ours)), theirs)
}

fn get(path: &str) -> Request<Body> {
    Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, "app.example.com")
        .body(Body::default())
        .unwrap()
}

/// A request whose body the client sends in `pieces`, with no length announced.
fn post_streamed(pieces: &[&'static str]) -> Request<Body> {
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = pieces
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    Request::builder()
        .method(Method::POST)
        .uri("/upload")
        .body(BodyExt::boxed(body))
        .unwrap()
}

/// Reads the request head the backend got (up to its empty line).
async fn request_head(backend: &mut DuplexStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        backend.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// The whole body, frame by frame.
async fn body(conn: &mut Connection, decoder: Decoder) -> Result<String, BoxError> {
    Ok(body_and_trailers(conn, decoder).await?.0)
}

/// The whole body and its trailer fields.
async fn body_and_trailers(
    conn: &mut Connection,
    mut decoder: Decoder,
) -> Result<(String, HeaderMap), BoxError> {
    let (mut out, mut trailers) = (Vec::new(), HeaderMap::new());
    while let Some(frame) = std::future::poll_fn(|cx| decoder.poll_frame(cx, conn)).await {
        match frame?.into_data() {
            Ok(data) => out.extend_from_slice(&data),
            Err(frame) => trailers.extend(frame.into_trailers().unwrap()),
        }
    }
    assert!(decoder.is_end_stream());
    Ok((String::from_utf8_lossy(&out).into_owned(), trailers))
}

#[tokio::test]
async fn a_keep_alive_exchange_leaves_the_connection_reusable_for_the_next() {
    let (mut conn, mut backend) = pair();
    for (path, answer) in [("/a?x=1", "first"), ("/b", "second!")] {
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Backend: one\r\n\r\n{answer}",
            answer.len()
        );
        let req = get(path);
        let (exchanged, head) = tokio::join!(conn.exchange(req), async {
            let head = request_head(&mut backend).await;
            backend.write_all(reply.as_bytes()).await.unwrap();
            head
        });
        assert_eq!(
            head,
            format!("GET {path} HTTP/1.1\r\nhost: app.example.com\r\n\r\n")
        );
        let (parts, decoder) = exchanged.unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-backend"], "one");
        assert_eq!(decoder.size_hint().exact(), Some(answer.len() as u64));
        assert_eq!(body(&mut conn, decoder).await.unwrap(), answer);
        assert!(conn.reusable());
    }
}

#[tokio::test]
async fn a_chunked_body_is_decoded_with_its_extensions_dropped_and_trailers_kept() {
    let (mut conn, mut backend) = pair();
    let reply = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                 5;name=v\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";
    backend.write_all(reply.as_bytes()).await.unwrap();
    let (_, decoder) = conn.exchange(get("/")).await.unwrap();
    let (text, trailers) = body_and_trailers(&mut conn, decoder).await.unwrap();
    assert_eq!(text, "hello, world");
    assert_eq!(trailers["x-trailer"], "t");
    assert!(conn.reusable());
}

#[tokio::test]
async fn a_body_without_length_runs_until_close_and_ends_the_connection() {
    let (mut conn, mut backend) = pair();
    backend
        .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        .await
        .unwrap();
    let (_, decoder) = conn.exchange(get("/")).await.unwrap();
    drop(backend);
    assert_eq!(body(&mut conn, decoder).await.unwrap(), "until the end");
    assert!(!conn.reusable());
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body_whatever_their_length_says() {
    for (method, status) in [(Method::HEAD, 200), (Method::GET, 204), (Method::GET, 304)] {
        let (mut conn, mut backend) = pair();
        let reply = format!("HTTP/1.1 {status} X\r\nContent-Length: 42\r\n\r\n");
        backend.write_all(reply.as_bytes()).await.unwrap();
        let mut req = get("/");
        *req.method_mut() = method.clone();
        let (parts, decoder) = conn.exchange(req).await.unwrap();
        assert_eq!(
            parts.headers[header::CONTENT_LENGTH],
            "42",
            "{method} {status}"
        );
        assert!(decoder.is_end_stream(), "{method} {status}");
        assert_eq!(body(&mut conn, decoder).await.unwrap(), "");
        assert!(conn.reusable(), "{method} {status}");
    }
}

#[tokio::test]
async fn interim_answers_are_skipped_and_an_unasked_101_refused() {
    let (mut conn, mut backend) = pair();
    backend
        .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    let (parts, decoder) = conn.exchange(get("/")).await.unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body(&mut conn, decoder).await.unwrap(), "ok");

    let (mut conn, mut backend) = pair();
    backend
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
        .await
        .unwrap();
    let (e, unsent) = conn.exchange(get("/")).await.unwrap_err();
    assert!(matches!(e, WireError::Malformed(_)), "{e}");
    assert!(unsent.is_none());
}

#[tokio::test]
async fn close_and_http10_answers_leave_the_connection_unusable() {
    for (reply, reusable) in [
        (
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        ("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        (
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            true,
        ),
    ] {
        let (mut conn, mut backend) = pair();
        backend.write_all(reply.as_bytes()).await.unwrap();
        let (_, decoder) = conn.exchange(get("/")).await.unwrap();
        assert_eq!(body(&mut conn, decoder).await.unwrap(), "");
        assert_eq!(conn.reusable(), reusable, "{reply:?}");
    }
}

#[tokio::test]
async fn bad_framing_and_oversized_heads_are_errors() {
    for reply in [
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        "HTTP/1.1 999x\r\n\r\n",
    ] {
        let (mut conn, mut backend) = pair();
        backend.write_all(reply.as_bytes()).await.unwrap();
        let (e, _) = conn.exchange(get("/")).await.unwrap_err();
        assert!(matches!(e, WireError::Malformed(_)), "{reply:?}: {e}");
    }
    let (mut conn, mut backend) = pair();
    let big = format!(
        "HTTP/1.1 200 OK\r\nX: {}\r\n",
        "a".repeat(MAX_HEAD_BYTES + 1)
    );
    let req = get("/");
    let (answer, _) = tokio::join!(conn.exchange(req), backend.write_all(big.as_bytes()));
    assert!(matches!(answer.unwrap_err().0, WireError::HeadTooLarge));
}

#[tokio::test]
async fn a_backend_that_closes_fails_the_exchange_and_the_body() {
    // Closed after reading the request: sent, so not to be sent again.
    let (mut conn, backend) = pair();
    let closing = async move {
        let mut backend = backend;
        request_head(&mut backend).await;
    };
    let req = get("/");
    let (answer, ()) = tokio::join!(conn.exchange(req), closing);
    let (e, unsent) = answer.unwrap_err();
    assert!(matches!(e, WireError::Closed), "{e}");
    assert!(unsent.is_none());

    // Closed before the request: it never left.
    let (mut conn, backend) = pair();
    drop(backend);
    let (_, unsent) = conn.exchange(get("/")).await.unwrap_err();
    assert_eq!(unsent.expect("the request comes back").uri(), "/");

    // Closed mid-body.
    let (mut conn, mut backend) = pair();
    backend
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
        .await
        .unwrap();
    let (_, decoder) = conn.exchange(get("/")).await.unwrap();
    drop(backend);
    assert!(body(&mut conn, decoder).await.is_err());
    assert!(!conn.reusable());
}

#[tokio::test]
async fn an_answer_with_both_lengths_is_read_chunked_and_ends_the_connection() {
    let (mut conn, mut backend) = pair();
    backend
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n\
              2\r\nok\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let (_, decoder) = conn.exchange(get("/")).await.unwrap();
    assert_eq!(body(&mut conn, decoder).await.unwrap(), "ok");
    assert!(!conn.reusable());
}

#[tokio::test]
async fn stray_bytes_after_an_exchange_make_the_connection_unusable() {
    let (mut conn, mut backend) = pair();
    backend
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let (_, decoder) = conn.exchange(get("/")).await.unwrap();
    body(&mut conn, decoder).await.unwrap();
    backend.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
    assert!(!conn.reusable());
}

#[test]
fn a_request_head_says_how_its_body_is_framed() {
    let head = |req: Request<Body>| {
        let mut out = Vec::new();
        encode_head(&mut out, &req, Sending::of(&req));
        String::from_utf8(out).unwrap()
    };
    let mut post = get("/");
    *post.method_mut() = Method::POST;
    assert!(head(post).ends_with("\r\ncontent-length: 0\r\n\r\n"));
    assert!(!head(get("/")).contains("content-length"));
    let full = Request::post("/")
        .body(BodyExt::boxed(
            http_body_util::Full::new(Bytes::from("abc")).map_err(|e| match e {}),
        ))
        .unwrap();
    assert!(head(full).ends_with("\r\ncontent-length: 3\r\n\r\n"));
    assert!(head(post_streamed(&["a"])).ends_with("\r\ntransfer-encoding: chunked\r\n\r\n"));
}

/// Reads from the backend's end until `n` bytes have come.
async fn read_n(backend: &mut DuplexStream, n: usize) -> String {
    let mut got = vec![0u8; n];
    backend.read_exact(&mut got).await.unwrap();
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn a_body_of_unknown_length_goes_chunked_with_its_trailers() {
    let (mut conn, mut backend) = pair();
    let mut req = post_streamed(&["hello", "", ", world"]);
    let frames = ["hello", ", world"]
        .into_iter()
        .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p.as_bytes()))));
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("7"));
    let with_trailers = frames.chain([Ok(Frame::trailers(trailers))]);
    *req.body_mut() = BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
        with_trailers,
    )));
    let expected = "5\r\nhello\r\n7\r\n, world\r\n0\r\nx-sum: 7\r\n\r\n";
    let (answer, sent) = tokio::join!(conn.exchange(req), async {
        let head = request_head(&mut backend).await;
        let body = read_n(&mut backend, expected.len()).await;
        backend
            .write_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        (head, body)
    });
    assert!(
        sent.0.contains("transfer-encoding: chunked\r\n"),
        "{}",
        sent.0
    );
    assert_eq!(sent.1, expected);
    let (parts, decoder) = answer.unwrap();
    assert_eq!(parts.status, StatusCode::CREATED);
    body(&mut conn, decoder).await.unwrap();
    assert!(conn.reusable());
}

#[tokio::test]
async fn a_body_with_its_length_goes_as_it_is() {
    let (mut conn, mut backend) = pair();
    let mut req = post_streamed(&["abc", "defg"]);
    req.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
    let (answer, sent) = tokio::join!(conn.exchange(req), async {
        let head = request_head(&mut backend).await;
        let body = read_n(&mut backend, 7).await;
        backend
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        (head, body)
    });
    assert!(sent.0.ends_with("content-length: 7\r\n\r\n"), "{}", sent.0);
    assert_eq!(sent.1, "abcdefg");
    let (_, decoder) = answer.unwrap();
    assert_eq!(body(&mut conn, decoder).await.unwrap(), "ok");
    assert!(conn.reusable());
}

#[tokio::test]
async fn an_answer_before_the_whole_body_wins_and_ends_the_connection() {
    let (mut conn, mut backend) = pair();
    // A body that never ends: the client stalls after its first piece.
    let frames = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from("part")))])
        .chain(futures_util::stream::pending());
    let req = Request::post("/big")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
        .unwrap();
    let (answer, ()) = tokio::join!(conn.exchange(req), async {
        request_head(&mut backend).await;
        backend
            .write_all(b"HTTP/1.1 413 Too Large\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
    });
    let (parts, decoder) = answer.unwrap();
    assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
    body(&mut conn, decoder).await.unwrap();
    assert!(!conn.reusable(), "the body was not all sent");
}

#[tokio::test]
async fn a_failing_body_fails_the_exchange_as_the_body() {
    let (mut conn, _backend) = pair();
    let frames = futures_util::stream::iter([
        Ok::<_, BoxError>(Frame::data(Bytes::from("part"))),
        Err("client went away".into()),
    ]);
    let req = Request::post("/")
        .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
        .unwrap();
    let (e, unsent) = conn.exchange(req).await.unwrap_err();
    assert!(matches!(e, WireError::Body(_)), "{e}");
    assert!(unsent.is_none());
}

#[tokio::test]
async fn an_asked_for_101_hands_the_connection_and_its_early_bytes_to_the_tunnel() {
    let (mut conn, mut backend) = pair();
    let mut req = get("/ws");
    req.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    backend
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\nearly")
        .await
        .unwrap();
    let (parts, decoder) = conn.exchange(req).await.unwrap();
    assert_eq!(parts.status, StatusCode::SWITCHING_PROTOCOLS);
    assert!(decoder.is_end_stream());
    let (mut io, early) = conn.into_tunnel();
    assert_eq!(early, "early");
    backend.write_all(b"later").await.unwrap();
    let mut later = [0u8; 5];
    io.read_exact(&mut later).await.unwrap();
    assert_eq!(&later, b"later");
}

/// A chunked response and the read after it, cut anywhere: the same body, and the
/// connection ends exactly at the body's end.
fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> (String, HeaderMap, bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut conn, mut backend) = pair();
        let writer = async move {
            write_in_pieces(&mut backend, wire, cuts).await.unwrap();
            backend
        };
        let reader = async {
            let (_, decoder) = conn.exchange(get("/")).await.unwrap();
            body_and_trailers(&mut conn, decoder).await.unwrap()
        };
        let ((text, trailers), _backend) = tokio::join!(reader, writer);
        (text, trailers, conn.reusable())
    })
}

proptest! {
    #[test]
    fn a_chunked_body_survives_any_cut(cuts in proptest::collection::vec(0usize..200, 0..8)) {
        let wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                     3\r\nabc\r\n10;ext=1\r\n0123456789abcdef\r\n1\r\nz\r\n0\r\nT: 1\r\n\r\n";
        let (text, trailers, reusable) = decode_in_pieces(wire, &cuts);
        prop_assert_eq!(text, "abc0123456789abcdefz");
        prop_assert_eq!(&trailers["t"], "1");
        prop_assert!(reusable);
    }
}

/// Whatever a backend sends, then closes: an answer and a body, or an error; never a
/// panic or a hang.
fn exchange_any(reply: &[u8]) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut conn, mut backend) = pair();
        backend.write_all(reply).await.unwrap();
        drop(backend);
        let (_, decoder) = conn
            .exchange(get("/"))
            .await
            .map_err(|(e, _)| e.to_string())?;
        body(&mut conn, decoder).await.map_err(|e| e.to_string())
    })
}

proptest! {
    #[test]
    fn any_bytes_from_a_backend_are_an_answer_or_an_error(
        reply in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let _ = exchange_any(&reply);
    }

    #[test]
    fn any_head_and_body_bytes_after_a_valid_status_line(
        fields in "([A-Za-z-]{1,12}: [ -~]{0,20}\r\n){0,6}",
        rest in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut reply = format!("HTTP/1.1 200 OK\r\n{fields}\r\n").into_bytes();
        reply.extend_from_slice(&rest);
        let _ = exchange_any(&reply);
    }
}
