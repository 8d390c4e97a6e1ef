//! Requests in, bytes out, over an in-memory pipe: what the client sees of each
//! answer, and which requests are handed to hyper with every byte read.

use std::time::Duration;

use http_body_util::{Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::l7::pieces::write_in_pieces;

const LIMITS: HeadLimits = HeadLimits {
    bytes: 8192,
    fields: 2 * MAX_FIELDS,
};

/// What one `serve` run did: the bytes the client got and how it ended.
struct Run {
    sent: String,
    ended: Ended,
    seen: Vec<String>,
}

/// Serves `input` (written by the client, which then closes its side) with
/// `answer` for every request; `draining` set from the start when asked.
async fn exchange(
    input: &[u8],
    draining: bool,
    answer: fn(&Request<ClientBody>) -> Response<Body>,
) -> Run {
    let (mut client, mut server) = tokio::io::duplex(1 << 20);
    client.write_all(input).await.unwrap();
    client.shutdown().await.unwrap();
    let (_tx, mut rx) = watch::channel(draining);
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(
        Duration::from_secs(5),
        serve(
            &mut server,
            Vec::new(),
            LIMITS,
            Ending::Shutdown,
            &mut rx,
            |req| {
                seen.push(format!("{} {}", req.method(), req.uri()));
                let response = answer(&req);
                async move { response }
            },
        ),
    )
    .await
    .expect("serve ends by itself");
    drop(server);
    Run {
        sent: read_all(&mut client).await,
        ended,
        seen,
    }
}

/// The in-memory pipe has no segments to hold back.
impl Cork for DuplexStream {
    fn cork(&mut self) {}
}

async fn read_all(client: &mut DuplexStream) -> String {
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

fn full(text: &'static str) -> Body {
    Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed()
}

/// A body of unknown length, in these pieces.
fn streamed(pieces: &'static [&'static str]) -> Body {
    let frames = pieces
        .iter()
        .map(|p| Ok::<_, BoxError>(Frame::data(Bytes::from_static(p.as_bytes()))));
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

use super::super::upstream::BoxError;

fn ok(_: &Request<ClientBody>) -> Response<Body> {
    Response::new(full("hello"))
}

/// The answer without its `date` line (which changes every second).
fn undated(sent: &str) -> String {
    sent.split_inclusive("\r\n")
        .filter(|l| !l.starts_with("date: "))
        .collect()
}

#[tokio::test]
async fn keep_alive_requests_are_answered_in_order_on_one_connection() {
    let run = exchange(
        b"GET /a HTTP/1.1\r\nHost: x.example\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n\
          HEAD /b?q=1 HTTP/1.1\r\nHost: x.example\r\n\r\n",
        false,
        ok,
    )
    .await;
    assert_eq!(run.seen, ["GET /a", "HEAD /b?q=1"]);
    assert_eq!(
        undated(&run.sent),
        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello\
         HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    );
    assert_eq!(run.sent.matches("date: ").count(), 2);
    assert!(matches!(run.ended, Ended::Closed(None)), "{:?}", run.ended);
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked() {
    let run = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false, |_| {
        Response::new(streamed(&["ab", "", "cde"]))
    })
    .await;
    assert_eq!(
        undated(&run.sent),
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    );
}

#[tokio::test]
async fn bodiless_answers_are_framed_as_hyper_frames_them() {
    // 204 and 304 get no length; an empty 200 gets `content-length: 0`; a HEAD answer
    // keeps the length GET would get.
    let run = exchange(
        b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\nGET /304 HTTP/1.1\r\nHost: x\r\n\r\n\
          GET /empty HTTP/1.1\r\nHost: x\r\n\r\nHEAD /len HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
        |req| {
            let (status, length) = match req.uri().path() {
                "/204" => (StatusCode::NO_CONTENT, Some("0")),
                "/304" => (StatusCode::NOT_MODIFIED, Some("12")),
                "/empty" => (StatusCode::OK, Some("0")),
                _ => (StatusCode::OK, Some("42")),
            };
            let mut response = Response::new(full(""));
            *response.status_mut() = status;
            if let Some(length) = length {
                response
                    .headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from_static(length));
            }
            response
        },
    )
    .await;
    assert_eq!(
        undated(&run.sent),
        "HTTP/1.1 204 No Content\r\n\r\n\
         HTTP/1.1 304 Not Modified\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 42\r\n\r\n"
    );
}

#[tokio::test]
async fn connection_close_and_the_drain_end_the_connection_after_the_answer() {
    let run = exchange(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
        ok,
    )
    .await;
    assert_eq!(run.seen, ["GET /"]);
    assert!(
        undated(&run.sent).ends_with("connection: close\r\n\r\nhello"),
        "{}",
        run.sent
    );
    assert!(matches!(run.ended, Ended::Closed(None)));

    // The drain starts while the first request is in flight; the next one, already
    // read, is not served.
    let (mut client, mut server) = tokio::io::duplex(1 << 16);
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (drain, mut draining) = watch::channel(false);
    let mut requests = 0;
    let ended = serve(
        &mut server,
        Vec::new(),
        LIMITS,
        Ending::Shutdown,
        &mut draining,
        |_| {
            requests += 1;
            drain.send_replace(true);
            async { Response::new(full("hello")) }
        },
    )
    .await;
    drop(server);
    assert_eq!(requests, 1);
    assert!(matches!(ended, Ended::Closed(None)));
    let sent = read_all(&mut client).await;
    assert!(
        undated(&sent).ends_with("connection: close\r\n\r\nhello"),
        "{sent}"
    );

    // A drain that started before anything was read ends the connection at once.
    let run = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true, ok).await;
    assert!(run.seen.is_empty() && run.sent.is_empty());
    assert!(matches!(run.ended, Ended::Closed(None)));
}

#[tokio::test]
async fn an_answer_that_closes_is_shut_down_and_a_quiet_end_follows_the_ending() {
    // After an answer that closes, the server shuts down whatever the ending, so that
    // the answer's corked last bytes leave with the FIN before a close could reset.
    for ending in [Ending::Drop, Ending::Shutdown] {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let (_tx, mut draining) = watch::channel(false);
        let ended = serve(
            &mut server,
            Vec::new(),
            LIMITS,
            ending,
            &mut draining,
            |_| async { Response::new(full("hello")) },
        )
        .await;
        assert!(matches!(ended, Ended::Closed(None)), "{ending:?}");
        let mut sent = Vec::new();
        let read = tokio::time::timeout(Duration::from_millis(500), client.read_to_end(&mut sent));
        assert!(matches!(read.await, Ok(Ok(_))), "{ending:?}: no shutdown");
        assert!(sent.ends_with(b"hello"), "{ending:?}: the answer was cut");
    }
    // A drain between requests: plain TCP leaves the FIN to the socket's close (one
    // system call fewer); TLS shuts down (close_notify) first.
    for ending in [Ending::Drop, Ending::Shutdown] {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let (_tx, mut draining) = watch::channel(true);
        let ended = serve(
            &mut server,
            Vec::new(),
            LIMITS,
            ending,
            &mut draining,
            |_| async { Response::new(full("hello")) },
        )
        .await;
        assert!(matches!(ended, Ended::Closed(None)), "{ending:?}");
        let mut buf = [0u8; 16];
        let after = tokio::time::timeout(Duration::from_millis(50), client.read(&mut buf)).await;
        match ending {
            // Still open until the socket goes: nothing shut it down.
            Ending::Drop => assert!(after.is_err(), "{after:?}"),
            Ending::Shutdown => assert!(matches!(after, Ok(Ok(0))), "{after:?}"),
        }
        drop(server);
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "{ending:?}");
    }
}

#[tokio::test]
async fn requests_this_server_does_not_serve_go_to_hyper_with_every_byte() {
    for request in [
        &b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"[..],
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let run = exchange(request, false, ok).await;
        let what = String::from_utf8_lossy(request);
        assert!(run.seen.is_empty(), "{what}");
        assert!(run.sent.is_empty(), "{what}");
        match run.ended {
            Ended::HandOff(read) => assert_eq!(read, request, "{what}"),
            Ended::Closed(r) => panic!("{what}: closed ({r:?}), not handed off"),
        }
    }
}

#[tokio::test]
async fn a_body_read_whole_with_its_head_is_served_from_the_buffer() {
    let run = exchange(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc\
          GET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        false,
        |req| {
            let body = match req.body() {
                ClientBody::Read(Some(body)) => format!("read {body:?}"),
                ClientBody::Empty => "none".to_owned(),
                other => format!("{other:?}"),
            };
            Response::new(
                Full::new(Bytes::from(body))
                    .map_err(|never| match never {})
                    .boxed(),
            )
        },
    )
    .await;
    assert_eq!(run.seen, ["POST /a", "GET /b"]);
    assert!(
        run.sent.contains("\r\n\r\nread b\"abc\"HTTP/1.1 200 OK"),
        "{}",
        run.sent
    );
    assert!(run.sent.ends_with("\r\n\r\nnone"), "{}", run.sent);
    assert!(matches!(run.ended, Ended::Closed(None)));
}

#[tokio::test]
async fn a_hand_off_after_served_requests_keeps_the_rest() {
    let rest =
        b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    let mut input = b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec();
    input.extend_from_slice(rest);
    let run = exchange(&input, false, ok).await;
    assert_eq!(run.seen, ["GET /a"]);
    assert!(run.sent.ends_with("hello"));
    match run.ended {
        Ended::HandOff(read) => assert_eq!(read, rest),
        Ended::Closed(r) => panic!("closed ({r:?})"),
    }
}

#[tokio::test]
async fn too_many_fields_or_too_long_a_head_go_to_hyper() {
    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..MAX_FIELDS {
        many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let run = exchange(&many, false, ok).await;
    assert!(matches!(run.ended, Ended::HandOff(ref read) if *read == many));

    // Fewer slots when hyper's parser allows fewer (a low `max_headers`).
    let head = |fields: usize| {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..fields {
            head.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        head
    };
    let low = HeadLimits {
        bytes: 8192,
        fields: 10,
    };
    assert!(matches!(parse(&head(10), low), Parsed::Request { .. }));
    assert!(matches!(parse(&head(11), low), Parsed::HandOff));

    // Over the limit (8 KiB here) before the head ends.
    let mut long = b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ".to_vec();
    long.resize(9000, b'a');
    let run = exchange(&long, false, ok).await;
    assert!(matches!(run.ended, Ended::HandOff(ref read) if *read == long));
}

#[tokio::test]
async fn a_client_gone_mid_head_or_a_failing_body_is_a_protocol_close() {
    let run = exchange(b"GET / HTTP/1.1\r\nHost:", false, ok).await;
    assert!(matches!(run.ended, Ended::Closed(Some("protocol"))));

    let run = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false, |_| {
        let failing = futures_util::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"part"))),
            Err::<Frame<Bytes>, BoxError>("backend reset".into()),
        ]);
        Response::new(StreamBody::new(failing).boxed())
    })
    .await;
    assert!(matches!(run.ended, Ended::Closed(Some("protocol"))));
    // The chunked answer never ends: the client sees it cut.
    assert!(!run.sent.ends_with("0\r\n\r\n"));
}

#[tokio::test]
async fn a_body_that_breaks_its_content_length_cuts_the_connection() {
    let run = exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false, |_| {
        let mut response = Response::new(streamed(&["abc"]));
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        response
    })
    .await;
    assert!(matches!(run.ended, Ended::Closed(Some("protocol"))));
    // Nothing the client could take for a whole answer.
    assert!(!run.sent.contains("abc"), "{}", run.sent);
}

/// The requests of `wire`, written by the client in pieces cut at `cuts`, then the
/// client's side closed: the requests this server saw, and the bytes hyper would get
/// (those handed to it, then the rest of the stream), if it did.
fn serve_in_pieces(wire: &[u8], cuts: &[usize]) -> (Vec<String>, Option<Vec<u8>>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let writer = async move {
            // A write fails once the server has closed the connection.
            let _ = write_in_pieces(&mut client, wire, cuts).await;
            let _ = client.shutdown().await;
            // Keeps reading the answers, so that the server's writes never block.
            read_all(&mut client).await
        };
        let (_drain, mut draining) = watch::channel(false);
        let server = async move {
            let mut seen = Vec::new();
            let mut ended = serve(
                &mut server,
                Vec::new(),
                LIMITS,
                Ending::Shutdown,
                &mut draining,
                |req| {
                    seen.push(format!("{} {}", req.method(), req.uri()));
                    async { Response::new(full("ok")) }
                },
            )
            .await;
            // hyper would read on from here.
            if let Ended::HandOff(read) = &mut ended {
                server.read_to_end(read).await.unwrap();
            }
            drop(server);
            (ended, seen)
        };
        let ((ended, seen), _answers) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(server, writer)
        })
        .await
        .expect("serve ends by itself");
        let handed = match ended {
            Ended::HandOff(read) => Some(read),
            Ended::Closed(_) => None,
        };
        (seen, handed)
    })
}

proptest::proptest! {
    /// However the client's bytes are cut, no byte is lost: the requests served here
    /// are the first ones, in order, and whatever follows them is handed to hyper
    /// whole (a body not yet all read when its head was parsed goes to hyper too).
    #[test]
    fn no_byte_is_lost_however_the_requests_are_cut(
        cuts in proptest::collection::vec(0usize..400, 0..8),
    ) {
        let requests: [(&str, &[u8]); 4] = [
            ("GET /a", b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("POST /b", b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"),
            ("HEAD /c", b"HEAD /c HTTP/1.1\r\nHost: x\r\n\r\n"),
            ("PUT /d", b"PUT /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ];
        let wire: Vec<u8> = requests.iter().flat_map(|(_, bytes)| bytes.iter().copied()).collect();
        let (seen, handed) = serve_in_pieces(&wire, &cuts);
        // The chunked PUT is always hyper's.
        proptest::prop_assert!(seen.len() < requests.len());
        for (seen, (expected, _)) in seen.iter().zip(&requests) {
            proptest::prop_assert_eq!(seen, expected);
        }
        let rest: Vec<u8> = requests[seen.len()..]
            .iter()
            .flat_map(|(_, bytes)| bytes.iter().copied())
            .collect();
        proptest::prop_assert_eq!(handed, Some(rest));
    }

    /// Whatever a client sends: requests served, or bytes handed to hyper, or the
    /// connection closed; never a panic or a hang.
    #[test]
    fn any_bytes_end_in_an_answer_a_hand_off_or_a_close(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        cuts in proptest::collection::vec(0usize..600, 0..4),
    ) {
        let (_, handed) = serve_in_pieces(&bytes, &cuts);
        if let Some(handed) = handed {
            proptest::prop_assert!(bytes.ends_with(&handed));
        }
    }
}

/// A pipe that notes how many bytes it had taken each time it was corked.
struct Watched {
    pipe: DuplexStream,
    written: usize,
    corked_at: RefCell<Vec<usize>>,
}

impl Cork for Watched {
    fn cork(&mut self) {
        self.corked_at.borrow_mut().push(self.written);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_read(cx, buf)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.pipe).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }
}

/// Serves `input` (the client then closes its side) on a [`Watched`] pipe, each
/// request answered by `answer`: what the client got, and where the pipe was corked.
async fn corked(
    input: &[u8],
    answer: impl FnMut(Request<ClientBody>) -> Response<Body>,
) -> (String, Vec<usize>) {
    let (mut client, pipe) = tokio::io::duplex(1 << 20);
    client.write_all(input).await.unwrap();
    client.shutdown().await.unwrap();
    let mut server = Watched {
        pipe,
        written: 0,
        corked_at: RefCell::new(Vec::new()),
    };
    let (_tx, mut draining) = watch::channel(false);
    let mut answer = answer;
    let serving = serve(
        &mut server,
        Vec::new(),
        LIMITS,
        Ending::Drop,
        &mut draining,
        |req| std::future::ready(answer(req)),
    );
    tokio::time::timeout(Duration::from_secs(5), serving)
        .await
        .expect("serve ends by itself");
    let corked_at = server.corked_at.take();
    drop(server);
    (read_all(&mut client).await, corked_at)
}

#[tokio::test]
async fn only_the_last_write_of_the_answer_that_closes_is_corked() {
    // Keep-alive answers are never corked: the next one would wait for the kernel's
    // 200 ms ceiling.
    let (sent, at) = corked(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", |_| {
        Response::new(full("hello"))
    })
    .await;
    assert!(sent.ends_with("hello"), "{sent}");
    assert!(at.is_empty(), "{at:?}");

    // The answer that says `close` (the client asked) is corked once, before it.
    let (sent, at) = corked(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        |_| Response::new(full("hello")),
    )
    .await;
    let second = sent.rfind("HTTP/1.1 200").unwrap();
    assert_eq!(at, [second], "{sent}");
    assert!(sent[second..].contains("connection: close\r\n"), "{sent}");

    // So is one a backend closes (`Connection: close` in its answer).
    let (sent, at) = corked(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", |_| {
        let mut response = Response::new(full("bye"));
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    })
    .await;
    assert_eq!(at, [0], "{sent}");

    // A streamed answer: what was written while its body waited went out uncorked;
    // only the end is held for the FIN.
    let (sent, at) = corked(
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        |_| {
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                let _ = tx.send(Bytes::from_static(b"ab")).await;
            });
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                let data = rx.recv().await?;
                Some((Ok::<_, BoxError>(Frame::data(data)), rx))
            });
            Response::new(StreamBody::new(frames).boxed())
        },
    )
    .await;
    let head = sent.find("\r\n\r\n").unwrap() + 4;
    assert_eq!(at.len(), 1, "{at:?}");
    assert!(
        at[0] >= head,
        "corked at {at:?} before the head ({head} bytes) went: {sent}"
    );
    assert!(sent.ends_with("2\r\nab\r\n0\r\n\r\n"), "{sent}");
}
