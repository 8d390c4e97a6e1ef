//! The backends' HTTP server and the check client.
//!
//! The server is a small HTTP/1.1 server on a tokio current-thread runtime, one OS thread
//! per backend namespace (its listening socket is created inside the namespace). It
//! answers every request with `200 OK` and a short body naming the backend, keeps the
//! connection open unless the request asks for `Connection: close` (or is HTTP/1.0 without
//! keep-alive), answers pipelined requests in order, and counts requests. A thread can be
//! pinned to one CPU, and reports the CPU time it used, so the benchmark can tell whether
//! the servers were the bottleneck.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use httparse::Status;
use lb_testbed::Netns;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Largest request head the server buffers; a longer one gets `431` and a close.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed per request.
const MAX_HEADERS: usize = 32;

/// A running server; dropping it stops the runtime (closing every connection) and joins
/// its thread.
pub struct HttpServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    requests: Arc<AtomicU64>,
    /// The server thread's kernel thread id, for its CPU time.
    tid: Arc<AtomicI32>,
    name: String,
}

impl HttpServer {
    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// CPU time the server thread has used, from `/proc/self/task/TID/schedstat`.
    pub fn cpu_time(&self) -> Duration {
        let tid = self.tid.load(Ordering::Relaxed);
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!(server = %self.name, "HTTP server thread panicked");
        }
    }
}

/// The two canned responses: keep-alive and closing.
struct Responses {
    keep_alive: Vec<u8>,
    close: Vec<u8>,
}

impl Responses {
    fn new(body: &str) -> Self {
        let head = |extra: &str| {
            format!(
                "HTTP/1.1 200 OK\r\nServer: xlb-bench\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\n{extra}\r\n{body}",
                body.len()
            )
            .into_bytes()
        };
        Self {
            keep_alive: head(""),
            close: head("Connection: close\r\n"),
        }
    }
}

/// Starts a server in `ns` bound to `bind`, answering with the body `"{name}\n"`, on its
/// own thread (pinned to `cpu` when given).
pub fn spawn_http_server(
    ns: &Netns,
    bind: SocketAddr,
    name: &str,
    cpu: Option<usize>,
) -> Result<HttpServer> {
    let listener = ns
        .run_in(|| std::net::TcpListener::bind(bind))?
        .with_context(|| format!("cannot bind HTTP {bind} in netns {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    let responses = Arc::new(Responses::new(&format!("{name}\n")));
    let requests = Arc::new(AtomicU64::new(0));
    let tid = Arc::new(AtomicI32::new(0));
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("http-{name}"))
        .spawn({
            let (requests, tid) = (Arc::clone(&requests), Arc::clone(&tid));
            move || {
                // SAFETY: gettid has no preconditions.
                tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                let started = cpu
                    .map_or(Ok(()), super::load::pin_current_thread)
                    .and_then(|()| {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_io()
                            .build()
                            .context("tokio runtime")
                    });
                let runtime = match started {
                    Ok(runtime) => {
                        let _ = ready_tx.send(Ok(()));
                        runtime
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(serve(listener, responses, requests, stopped));
            }
        })
        .context("cannot start an HTTP server thread")?;
    let server = HttpServer {
        stop: Some(stop),
        thread: Some(thread),
        requests,
        tid,
        name: name.to_owned(),
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("HTTP server thread did not start")??;
    Ok(server)
}

async fn serve(
    listener: std::net::TcpListener,
    responses: Arc<Responses>,
    requests: Arc<AtomicU64>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the listener");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (responses, requests) = (Arc::clone(&responses), Arc::clone(&requests));
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, &responses, &requests).await {
                            tracing::debug!(error = %e, "connection ended");
                        }
                    });
                }
                // E.g. ECONNABORTED or EMFILE: keep serving after a short pause.
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::task::yield_now().await;
                }
            },
        }
    }
}

/// What to do with a parsed request.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    KeepAlive,
    Close,
}

/// Parses as many complete requests as `buf` holds; returns the bytes consumed and the
/// replies, in order. Stops after a request that closes the connection.
fn parse_requests(buf: &[u8]) -> Result<(usize, Vec<Reply>), u16> {
    let mut consumed = 0;
    let mut replies = Vec::new();
    while consumed < buf.len() {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[consumed..]) {
            Ok(Status::Complete(len)) => {
                consumed += len;
                let has_body = req.headers.iter().any(|h| {
                    (h.name.eq_ignore_ascii_case("content-length") && h.value != b"0")
                        || h.name.eq_ignore_ascii_case("transfer-encoding")
                });
                if has_body {
                    // The benchmark's clients send GETs; a body is not worth supporting.
                    return Err(400);
                }
                let reply = if keeps_alive(req.version, req.headers) {
                    Reply::KeepAlive
                } else {
                    Reply::Close
                };
                let close = reply == Reply::Close;
                replies.push(reply);
                if close {
                    break;
                }
            }
            Ok(Status::Partial) => break,
            Err(_) => return Err(400),
        }
    }
    Ok((consumed, replies))
}

/// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0 closes it unless
/// `Connection: keep-alive`.
fn keeps_alive(version: Option<u8>, headers: &[httparse::Header<'_>]) -> bool {
    let has_token = |token: &str| {
        headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("connection"))
            .flat_map(|h| h.value.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    };
    if version == Some(0) {
        has_token("keep-alive")
    } else {
        !has_token("close")
    }
}

async fn connection(
    mut stream: tokio::net::TcpStream,
    responses: &Responses,
    requests: &AtomicU64,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 4096];
    let mut filled = 0;
    let mut out = Vec::with_capacity(1024);
    loop {
        if filled == buf.len() {
            if buf.len() >= MAX_HEAD {
                stream
                    .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await?;
                return stream.shutdown().await;
            }
            buf.resize(buf.len() * 2, 0);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let (consumed, replies) = match parse_requests(&buf[..filled]) {
            Ok(parsed) => parsed,
            Err(status) => {
                let reply = format!(
                    "HTTP/1.1 {status} Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(reply.as_bytes()).await?;
                return stream.shutdown().await;
            }
        };
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        let mut close = false;
        for reply in &replies {
            match reply {
                Reply::KeepAlive => out.extend_from_slice(&responses.keep_alive),
                Reply::Close => {
                    out.extend_from_slice(&responses.close);
                    close = true;
                }
            }
        }
        requests.fetch_add(replies.len() as u64, Ordering::Relaxed);
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
        }
        if close {
            return stream.shutdown().await;
        }
    }
}

/// From `ns`, one `GET /` with `Connection: close` to `addr`; returns the body (the
/// backend's name) without the newline. The whole exchange must finish within `timeout`.
pub fn get(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    ns.run_in(|| -> Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut reply = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out after {} bytes", reply.len());
            }
            stream.set_read_timeout(Some(left))?;
            let n = stream.read(&mut chunk)?;
            if n == 0 || reply.len() > MAX_HEAD {
                break;
            }
            reply.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&reply);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("no complete response: {text:?}");
        };
        if !head.starts_with("HTTP/1.1 200 ") {
            bail!("status is not 200: {head:?}");
        }
        Ok(body.trim_end().to_owned())
    })?
    .with_context(|| format!("GET http://{addr}/ from netns {}", ns.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_close_and_pipelining() {
        let two = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /";
        let (consumed, replies) = parse_requests(two).unwrap();
        assert_eq!(replies, [Reply::KeepAlive, Reply::Close]);
        assert_eq!(&two[consumed..], b"GET /");

        let partial = b"GET / HTTP/1.1\r\nHost:";
        assert_eq!(parse_requests(partial).unwrap(), (0, vec![]));

        let old = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(parse_requests(old).unwrap().1, [Reply::Close]);
        let old_keep = b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n";
        assert_eq!(parse_requests(old_keep).unwrap().1, [Reply::KeepAlive]);
        let tokens = b"GET / HTTP/1.1\r\nConnection: upgrade, Close\r\n\r\n";
        assert_eq!(parse_requests(tokens).unwrap().1, [Reply::Close]);
    }

    #[test]
    fn bodies_and_garbage_are_refused() {
        assert_eq!(
            parse_requests(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"),
            Err(400)
        );
        assert_eq!(parse_requests(b"\x00\x01 nonsense\r\n\r\n"), Err(400));
    }

    #[test]
    fn responses_are_well_formed() {
        let r = Responses::new("backend-0\n");
        let text = String::from_utf8(r.close.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 10\r\nConnection: close\r\n\r\nbackend-0\n"));
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut resp = httparse::Response::new(&mut headers);
        assert!(resp.parse(&r.keep_alive).unwrap().is_complete());
    }
}
