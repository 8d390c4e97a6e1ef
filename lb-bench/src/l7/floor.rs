//! The floor of `xlb-bench l7 --floor`: the least an HTTP/1.1 reverse proxy on tokio must
//! do for the benchmark's requests, run as its own process (`xlb-bench l7-floor`) beside
//! nginx and xlb. It parses each request head (httparse), picks the route by path prefix,
//! writes the head to a pooled backend connection with `Connection` dropped and
//! `X-Forwarded-For` added, reads the response head and its `Content-Length` body, and
//! writes them back (with `Connection: close` when the client asked to close, corked so
//! that the FIN leaves with them, as xlb's hop does). TLS by rustls, as xlb's. Workers,
//! and client sockets registered with the poller only once they have to wait
//! (`ClientSocket`), as xlb's hop runs them.
//!
//! Nothing else: no request bodies (the benchmark's requests are GETs), limits,
//! timeouts, retries (but the one every pool needs: a request whose pooled backend
//! connection turns out closed goes once more on a new one), logs, metrics, chunked
//! responses or HTTP/2, so it is no proxy to
//! deploy. It shows how much of xlb's and nginx's CPU per request
//! is the kernel's work under the same socket calls, which no proxy of this design
//! avoids, and how little a lean user-space path adds to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context as _, Result, bail};
use lb_agent::l7::client_socket::Acceptor;
use lb_agent::l7::cork::Cork;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Headers a request or response head may have here (the benchmark's have a few).
const MAX_HEADERS: usize = 64;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    http: SocketAddr,
    #[arg(long)]
    https: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// `PREFIX=ADDR`: requests whose path has this prefix (a Kubernetes `Prefix` path) go
    /// to ADDR; the longest prefix wins.
    #[arg(long = "route", value_parser = parse_route, required = true)]
    routes: Vec<(String, SocketAddr)>,
    /// Worker threads.
    #[arg(long, env = "XLB_L7_WORKERS", default_value_t = 1)]
    workers: usize,
}

fn parse_route(s: &str) -> Result<(String, SocketAddr), String> {
    let (prefix, addr) = s.split_once('=').ok_or("PREFIX=ADDR")?;
    let addr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    Ok((prefix.to_owned(), addr))
}

/// Idle backend connections, one list per route (each worker its own).
type Pool = Arc<Vec<Mutex<Vec<TcpStream>>>>;

/// `xlb-bench l7-floor`: serves until killed, in `--workers` threads (as many as xlb's
/// hop gets: the benchmark sets `XLB_L7_WORKERS` for both), each a single-threaded
/// runtime with listeners of its own (`SO_REUSEPORT`), as xlb's hop runs.
pub fn serve(args: &Args) -> Result<()> {
    let certs = CertificateDer::pem_file_iter(&args.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading {}", args.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&args.key)
        .with_context(|| format!("reading {}", args.key.display()))?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let routes: Arc<Vec<(String, SocketAddr)>> = Arc::new(args.routes.clone());
    let workers = args.workers.max(1);
    let mut threads = Vec::new();
    for index in 0..workers {
        let plain = listen(args.http, workers > 1)?;
        let secure = listen(args.https, workers > 1)?;
        let (routes, acceptor) = (Arc::clone(&routes), acceptor.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("floor-{index}"))
                .spawn(move || work(plain, secure, &routes, &acceptor))?,
        );
    }
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a floor worker panicked"))??;
    }
    Ok(())
}

/// A non-blocking listener on `addr`, sharing its port with the other workers'.
fn listen(addr: SocketAddr, shared_port: bool) -> Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// One worker: accepts on its listeners and serves their connections.
fn work(
    plain: std::net::TcpListener,
    secure: std::net::TcpListener,
    routes: &Arc<Vec<(String, SocketAddr)>>,
    acceptor: &tokio_rustls::TlsAcceptor,
) -> Result<()> {
    let pool: Pool = Arc::new(routes.iter().map(|_| Mutex::default()).collect());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let plain = Acceptor::new(plain)?;
            let secure = Acceptor::new(secure)?;
            let (routes2, pool2) = (Arc::clone(routes), Arc::clone(&pool));
            tokio::spawn(async move {
                while let Ok((stream, peer)) = plain.accept().await {
                    tokio::spawn(proxy(
                        stream,
                        peer,
                        Arc::clone(&routes2),
                        Arc::clone(&pool2),
                    ));
                }
            });
            loop {
                let (stream, peer) = secure.accept().await?;
                let (acceptor, routes, pool) =
                    (acceptor.clone(), Arc::clone(routes), Arc::clone(&pool));
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        proxy(stream, peer, routes, pool).await;
                    }
                });
            }
        })
}

/// The route of `path`: the longest prefix that is the whole path, or is followed in it
/// by a `/` (or ends in one).
fn route(routes: &[(String, SocketAddr)], path: &str) -> Option<usize> {
    routes
        .iter()
        .enumerate()
        .filter(|(_, (prefix, _))| {
            path.strip_prefix(prefix.as_str()).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/')
            })
        })
        .max_by_key(|(_, (prefix, _))| prefix.len())
        .map(|(i, _)| i)
}

/// The request head for the backend, written into `out`: request line and headers as
/// they came but `Connection`, then `X-Forwarded-For: <xff>`. Returns the route and
/// whether the client asked to close, or `None` for a path no route takes.
fn upstream_head(
    req: &httparse::Request<'_, '_>,
    routes: &[(String, SocketAddr)],
    xff: &[u8],
    out: &mut Vec<u8>,
) -> Option<(usize, bool)> {
    let path = req.path?;
    let backend = route(routes, path)?;
    out.clear();
    out.extend_from_slice(req.method?.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut close = false;
    for h in &*req.headers {
        if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
            continue;
        }
        out.extend_from_slice(h.name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"X-Forwarded-For: ");
    out.extend_from_slice(xff);
    out.extend_from_slice(b"\r\n\r\n");
    Some((backend, close))
}

/// The response's head length and whole length (head + `Content-Length`), once the head
/// is in `buf`; `Err` for a response without a length this proxy can relay.
fn response_length(buf: &[u8]) -> Result<Option<(usize, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(buf)? else {
        return Ok(None);
    };
    let Some(length) = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    else {
        bail!("a response without Content-Length");
    };
    let length: usize = std::str::from_utf8(length.value)?.trim().parse()?;
    Ok(Some((head, head + length)))
}

/// One client connection: request after request until it closes or asks to.
async fn proxy<S: AsyncRead + AsyncWrite + Cork + Unpin>(
    mut client: S,
    peer: SocketAddr,
    routes: Arc<Vec<(String, SocketAddr)>>,
    pool: Pool,
) {
    let xff = peer.ip().to_string();
    let (mut request, mut out, mut response) = (
        Vec::with_capacity(8192),
        Vec::with_capacity(8192),
        Vec::with_capacity(8192),
    );
    loop {
        let (head, backend, close) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&request) {
                Ok(httparse::Status::Complete(head)) => {
                    let Some((backend, close)) =
                        upstream_head(&req, &routes, xff.as_bytes(), &mut out)
                    else {
                        return;
                    };
                    break (head, backend, close);
                }
                Ok(httparse::Status::Partial) => {
                    if !matches!(client.read_buf(&mut request).await, Ok(n) if n > 0) {
                        return;
                    }
                }
                Err(_) => return,
            }
        };
        request.drain(..head);
        let idle = pool[backend]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let reused = idle.is_some();
        let mut upstream = match idle {
            Some(stream) => stream,
            None => match connect(routes[backend].1).await {
                Some(stream) => stream,
                None => return,
            },
        };
        let mut answered = exchange(&mut upstream, &out, &mut response).await;
        if answered.is_none() && reused && response.is_empty() {
            // The backend closed it while it sat in the pool: once more, on a new one.
            let Some(fresh) = connect(routes[backend].1).await else {
                return;
            };
            upstream = fresh;
            answered = exchange(&mut upstream, &out, &mut response).await;
        }
        let Some((head, total)) = answered else {
            return;
        };
        let written = if close {
            // The head but its last CRLF, the close, the body.
            out.clear();
            out.extend_from_slice(&response[..head - 2]);
            out.extend_from_slice(b"Connection: close\r\n\r\n");
            out.extend_from_slice(&response[head..total]);
            client.cork();
            client.write_all(&out).await
        } else {
            client.write_all(&response[..total]).await
        };
        if written.is_err() {
            return;
        }
        pool[backend]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(upstream);
        if close {
            let _ = client.shutdown().await;
            return;
        }
    }
}

async fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let stream = TcpStream::connect(addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    Some(stream)
}

/// Writes the request head in `out` and reads the whole response into `response`:
/// its head's and its end's offsets, or `None` if the connection failed or the
/// response is not one this proxy reads.
async fn exchange(
    upstream: &mut TcpStream,
    out: &[u8],
    response: &mut Vec<u8>,
) -> Option<(usize, usize)> {
    response.clear();
    upstream.write_all(out).await.ok()?;
    let (head, total) = loop {
        if !matches!(upstream.read_buf(response).await, Ok(n) if n > 0) {
            return None;
        }
        match response_length(response) {
            Ok(Some(lengths)) => break lengths,
            Ok(None) => {}
            Err(_) => return None,
        }
    };
    while response.len() < total {
        if !matches!(upstream.read_buf(response).await, Ok(n) if n > 0) {
            return None;
        }
    }
    Some((head, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> Vec<(String, SocketAddr)> {
        ["/=192.0.2.11:8080", "/api=192.0.2.12:8080"]
            .map(|r| parse_route(r).unwrap())
            .into()
    }

    #[test]
    fn the_longest_prefix_routes_on_path_segments() {
        let r = routes();
        assert_eq!(route(&r, "/"), Some(0));
        assert_eq!(route(&r, "/api"), Some(1));
        assert_eq!(route(&r, "/api/items"), Some(1));
        assert_eq!(route(&r, "/apis"), Some(0));
        assert_eq!(route(&r[1..], "/other"), None);
    }

    #[test]
    fn the_head_loses_connection_and_gains_x_forwarded_for() {
        let raw =
            b"GET /api/items HTTP/1.1\r\nHost: bench.example.com\r\nConnection: close\r\n\r\n";
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(raw).unwrap().is_complete());
        let mut out = Vec::new();
        let (backend, close) = upstream_head(&req, &routes(), b"198.51.100.2", &mut out).unwrap();
        assert_eq!((backend, close), (1, true));
        assert_eq!(
            out,
            b"GET /api/items HTTP/1.1\r\nHost: bench.example.com\r\n\
              X-Forwarded-For: 198.51.100.2\r\n\r\n"
        );
    }

    #[test]
    fn a_response_is_relayed_by_its_content_length_only() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel";
        assert_eq!(response_length(ok).unwrap(), Some((38, 43)));
        assert_eq!(
            response_length(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(),
            None
        );
        assert!(response_length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }
}
