//! The L7 hop's listeners and request path: accept, (TLS,) serve HTTP/1.1 (plain
//! requests with [`super::h1_server`], the rest with hyper) or HTTP/2 (hyper), route
//! each request from the latest snapshot, forward it to a backend and stream the
//! answer back. Every failure becomes a small, clear answer and a counter.
//!
//! The path is normalised before routing (see [`super::path`]) and the backend gets
//! the normal form.
//!
//! Answers of our own, each with a one-line text body: 404 no route, 308 to HTTPS
//! (`ssl_redirect` on the plain listener), 300-308 from `permanent-redirect` or
//! `temporal-redirect`, 302 from `app-root` for `/`, 204 to a CORS preflight from an
//! allowed origin, 403 a client outside the source ranges, 503 a client over a
//! `limit-*` annotation, 400 a missing, repeated or invalid Host
//! (RFC 9112 3.2), a path above the root or with a broken escape, a malformed request
//! body, 413 body over the limit (on Content-Length
//! before forwarding, else while streaming when the backend has not answered yet),
//! 431 header count or size, 502 no connection (after one retry on another endpoint),
//! a failed exchange or an ExternalName that never resolved, 503 no endpoints,
//! 504 no response head within `upstream_timeout` or a write to the backend pending
//! past `send_timeout` (see [`super::send_timeout`]). Response bodies are streamed and
//! not timed; an upgraded (101) connection is a plain byte tunnel without an idle
//! timeout, like WebSockets behind ingress-nginx with long proxy timeouts. An `h2c`
//! upgrade is never tunnelled: it is dropped and the request forwarded as HTTP/1.1.

use std::borrow::Cow;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::http::uri::PathAndQuery;
use hyper::server::conn::{http1, http2};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use super::Snapshot;
use super::auth::{self, Checker, Seen, Verdict};
use super::balance::{Balancer, InFlight};
use super::client_socket::{Acceptor, ClientSocket};
use super::cork::Cork;
use super::dns::Resolver;
use super::h1_server::{self, ClientBody};
use super::headers::{
    Forwarded, ForwardedTrust, PeerValues, add_forwarding, client_ip, lists_token,
    refuse_h2c_upgrade, strip_hop_by_hop, valid_host,
};
use super::limits::{BodyState, Limited, head_within};
use super::metrics::Metrics;
use super::path;
use super::rate::{Limiter, OverLimit, Slot};
use super::read_ahead::{Protocol, ReadAhead};
use super::routes::{
    Affinity, Canary, CanaryVerdict, Cors, Policy, Route, Target, Upstream, UpstreamProtocol,
};
use super::send_timeout::is_send_timeout;
use super::tls::{self, CertResolver};
use super::upstream::{Answer, Body, BoxError, H1, Pool, PoolKey, Sender, Source};
use super::watchdog::{ConnState, RequestGuard, Tracked};
use super::wire;

/// Listener addresses, limits and timeouts (from the CLI). [`Default`] holds the
/// production values, with no listeners.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Plain HTTP listener (`--l7-http`).
    pub http: Option<SocketAddr>,
    /// TLS listener (`--l7-https`).
    pub https: Option<SocketAddr>,
    /// TCP connect to a backend (then one retry on another endpoint).
    pub connect_timeout: Duration,
    /// A request head (and a TLS handshake) must arrive within this once started.
    pub header_timeout: Duration,
    /// A client connection with no request in flight and no traffic is closed.
    pub idle_timeout: Duration,
    /// From choosing a backend to its response head, connect and retry included (504).
    pub upstream_timeout: Duration,
    /// A write to a backend pending this long fails the request (504, or the answer
    /// cut if it had started): nginx's `proxy_send_timeout`, between two successive
    /// writes, not over the whole request.
    pub send_timeout: Duration,
    /// Idle backend connections older than this are not reused.
    pub upstream_idle_timeout: Duration,
    /// Request head size (request target plus `name: value\r\n` lines; 431).
    pub max_header_bytes: usize,
    /// Request header count (431).
    pub max_headers: usize,
    /// Request body limit when the route sets none (413).
    pub max_body_bytes: u64,
    /// Pending connections the kernel queues on each listener (nginx's 511).
    pub listen_backlog: i32,
    /// ExternalName targets are re-resolved at most this often.
    pub dns_refresh: Duration,
    /// Served for unknown SNI names; `None`: a self-signed one generated at bind.
    pub default_certificate: Option<Arc<CertifiedKey>>,
    /// After a drain starts, how long in-flight requests have to finish
    /// (`--l7-drain-grace`).
    pub drain_grace: Duration,
    /// Which `X-Forwarded-*` headers from clients are believed.
    pub forwarded: ForwardedTrust,
    /// Honour `ssl-passthrough` (`--l7-enable-ssl-passthrough`): the HTTPS listener
    /// reads each ClientHello's SNI first (see `proxy/passthrough.rs`).
    pub ssl_passthrough: bool,
    /// Worker threads (`--l7-workers`), each with its own listeners (see [`Proxy`]).
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            http: None,
            https: None,
            connect_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_mins(1),
            upstream_timeout: Duration::from_mins(1),
            send_timeout: Duration::from_mins(1),
            upstream_idle_timeout: Duration::from_secs(30),
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_body_bytes: 1024 * 1024,
            listen_backlog: 511,
            dns_refresh: Duration::from_secs(30),
            default_certificate: None,
            drain_grace: Duration::from_secs(25),
            forwarded: ForwardedTrust::default(),
            ssl_passthrough: false,
            workers: 1,
        }
    }
}

impl ProxyConfig {
    /// Production defaults on the given listeners.
    pub fn new(http: Option<SocketAddr>, https: Option<SocketAddr>) -> Self {
        ProxyConfig {
            http,
            https,
            ..ProxyConfig::default()
        }
    }
}

/// Bound listeners: binding happens before the agent reports ready, so an address in
/// use is an error at start, not a silent hop that never serves (with several workers,
/// unless its holder is a process of the same user that set `SO_REUSEPORT` too: see
/// [`listen`]).
///
/// The hop runs as nginx does, in workers: each worker is a thread with a
/// single-threaded runtime and listeners of its own on the same addresses
/// (`SO_REUSEPORT`, so the kernel spreads new connections over them). A connection stays
/// on the worker that accepted it, with that worker's backend connections, so its
/// requests never wait on another thread's wake-up, lock or reactor. With one thread,
/// a multi-threaded runtime spent about 5 % more CPU per request (`xlb-bench l7
/// --scenarios http --rounds 10 --baseline-agent`, the median of the rounds' ratios).
/// The route table, counters, balancer state and rate limits are shared.
pub struct Proxy {
    /// Each worker's listener per address (none when the address is not served).
    http: Vec<std::net::TcpListener>,
    https: Vec<std::net::TcpListener>,
    default_certificate: Arc<CertifiedKey>,
    shared: Arc<Shared>,
}

/// What every connection task shares.
struct Shared {
    config: ProxyConfig,
    /// The bound HTTPS port, for redirects.
    https_port: u16,
    metrics: Metrics,
    balancer: Arc<Balancer>,
    limiter: Arc<Limiter>,
    /// This worker's own: a backend connection is served by the runtime that made it.
    pool: Pool,
    dns: Arc<Resolver>,
    auth: Arc<Checker>,
    /// The servers of each protocol: the proxy tells the protocol itself, from the
    /// connection's first read (see [`super::read_ahead`]).
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

/// The listener a connection came in on.
#[derive(Debug, Clone, Copy)]
struct Listener {
    tls: bool,
    port: u16,
}

impl Listener {
    /// How the hop's own HTTP/1.1 server ends a connection: TLS announces its end
    /// (close_notify), plain TCP's close says it alone.
    fn ending(self) -> h1_server::Ending {
        if self.tls {
            h1_server::Ending::Shutdown
        } else {
            h1_server::Ending::Drop
        }
    }
}

impl Proxy {
    /// Binds the listeners and registers the proxy's counters (`xlb_l7_*`).
    pub fn bind(
        config: ProxyConfig,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Proxy> {
        let workers = config.workers.max(1);
        let bind = |addr: Option<SocketAddr>, what: &str| -> Result<Vec<std::net::TcpListener>> {
            let Some(addr) = addr else {
                return Ok(Vec::new());
            };
            let shared_port = workers > 1;
            let first = listen(addr, config.listen_backlog, shared_port)
                .with_context(|| format!("cannot listen for L7 {what} on {addr}"))?;
            // Port 0 resolved: the other workers listen on the port the first got.
            let addr = first.local_addr()?;
            let mut listeners = vec![first];
            for _ in 1..workers {
                listeners.push(
                    listen(addr, config.listen_backlog, shared_port).with_context(|| {
                        format!("cannot listen for L7 {what} on {addr} (another worker)")
                    })?,
                );
            }
            Ok(listeners)
        };
        let http = bind(config.http, "HTTP")?;
        let https = bind(config.https, "HTTPS")?;
        let https_port = match https.first() {
            Some(l) => l.local_addr()?.port(),
            None => 443,
        };
        let default_certificate = match &config.default_certificate {
            Some(key) => Arc::clone(key),
            None => tls::self_signed_default()?,
        };
        let mut h1_server = http1::Builder::new();
        let mut h2_server = http2::Builder::new(TokioExecutor::new());
        // The parsers' own caps, which bound memory, sit at twice the limits: a head
        // over a limit reaches `head_within`, whose 431 has a body and a counter.
        // Only a head over twice a limit gets the parser's empty 431 (and the
        // connection closed). hyper's buffer floor is 8 KiB.
        let parser_bytes = config.max_header_bytes.saturating_mul(2);
        h1_server
            .keep_alive(true)
            .max_buf_size(parser_bytes.max(8192))
            .max_headers(config.max_headers.saturating_mul(2));
        h2_server.max_header_list_size(u32::try_from(parser_bytes).unwrap_or(u32::MAX));
        let metrics = Metrics::register(registry);
        let shared = Arc::new(Shared {
            https_port,
            metrics: metrics.clone(),
            balancer: Arc::default(),
            limiter: Arc::default(),
            pool: backend_pool(&config, metrics),
            dns: Arc::new(Resolver::new(config.dns_refresh, config.connect_timeout)),
            auth: Arc::new(Checker::new()),
            http1: h1_server,
            http2: h2_server,
            config,
        });
        Ok(Proxy {
            http,
            https,
            default_certificate,
            shared,
        })
    }

    /// The bound HTTP address (port 0 resolved).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.first().and_then(|l| l.local_addr().ok())
    }

    /// The bound HTTPS address (port 0 resolved).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.first().and_then(|l| l.local_addr().ok())
    }

    #[cfg(test)]
    pub(crate) fn metrics(&self) -> Metrics {
        self.shared.metrics.clone()
    }

    /// Serves until the task is dropped, always from the latest snapshot.
    pub async fn run(self, snapshots: watch::Receiver<Arc<Snapshot>>) -> Result<()> {
        self.run_until(snapshots, std::future::pending()).await
    }

    /// Serves until `drain` completes, then drains: the listeners close (new
    /// connections are refused), each connection finishes its request in flight (its
    /// answer says `Connection: close`, HTTP/2 sends GOAWAY) and idle keep-alive
    /// connections are closed; returns once every connection is done, or after
    /// `drain_grace`.
    pub async fn run_until(
        self,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        drain: impl Future<Output = ()>,
    ) -> Result<()> {
        let (draining_tx, draining) = watch::channel(false);
        let grace = self.shared.config.drain_grace;
        let tls = if self.https.is_empty() {
            None
        } else {
            let resolver = CertResolver::new(snapshots.clone(), self.default_certificate);
            Some(TlsAcceptor::from(Arc::new(tls::server_config(resolver)?)))
        };
        let mut http = self.http.into_iter();
        let mut https = self.https.into_iter();
        let mut workers = Vec::new();
        for index in 0..self.shared.config.workers.max(1) {
            let shared = if index == 0 {
                Arc::clone(&self.shared)
            } else {
                Arc::new(self.shared.for_another_worker())
            };
            let listeners = Listeners {
                http: http.next(),
                https: https.next().zip(tls.clone()),
            };
            workers.push(Worker::spawn(
                index,
                listeners,
                shared,
                snapshots.clone(),
                draining.clone(),
            )?);
        }
        // A worker that ends before the drain (its listener failed, it panicked) ends
        // the hop: the others stop with it, and the agent exits with why (see
        // `agent::l7::L7Hop::stopped`).
        let early = {
            let ended =
                futures_util::future::select_all(workers.iter_mut().enumerate().map(
                    |(index, worker)| Box::pin(async move { (index, worker.finished().await) }),
                ));
            tokio::select! {
                () = drain => None,
                ((index, ended), _, _) = ended => Some((index, ended)),
            }
        };
        if let Some((index, ended)) = early {
            let e = ended
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("it stopped serving"));
            return Err(e.context(format!("L7 worker {index} ended before the drain")));
        }
        tracing::info!(grace = ?grace, "L7 hop draining");
        draining_tx.send_replace(true);
        // Every worker drains its own connections within the grace; one that fails
        // does not cut the others short.
        let mut failed: Option<anyhow::Error> = None;
        for (index, worker) in workers.iter_mut().enumerate() {
            if let Err(e) = worker.finished().await {
                let e = e.context(format!("L7 worker {index}"));
                // The first goes to the caller, which logs it; any other is logged here.
                if failed.is_some() {
                    tracing::error!("{e:#}");
                } else {
                    failed = Some(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

impl Shared {
    /// The same configuration, counters and shared state, with a backend pool of its
    /// own.
    fn for_another_worker(&self) -> Shared {
        Shared {
            config: self.config.clone(),
            https_port: self.https_port,
            metrics: self.metrics.clone(),
            balancer: Arc::clone(&self.balancer),
            limiter: Arc::clone(&self.limiter),
            pool: backend_pool(&self.config, self.metrics.clone()),
            dns: Arc::clone(&self.dns),
            auth: Arc::clone(&self.auth),
            http1: self.http1.clone(),
            http2: self.http2.clone(),
        }
    }
}

/// A worker's pool of backend connections.
fn backend_pool(config: &ProxyConfig, metrics: Metrics) -> Pool {
    Pool::new(
        config.connect_timeout,
        config.upstream_idle_timeout,
        metrics,
    )
}

/// One worker's listeners, the HTTPS one with the TLS acceptor all share.
struct Listeners {
    http: Option<std::net::TcpListener>,
    https: Option<(std::net::TcpListener, TlsAcceptor)>,
}

/// A worker thread (see [`Proxy`]).
struct Worker {
    /// Dropped (the proxy's future is): the worker's runtime stops at its next turn,
    /// and its connections and listeners close with it. Nothing waits for the thread
    /// itself, which a blocking DNS lookup in progress may keep a little longer.
    _abort: tokio::sync::oneshot::Sender<()>,
    /// How the worker ended: after the drain, once its connections are done.
    done: tokio::sync::oneshot::Receiver<Result<()>>,
}

impl Worker {
    /// Starts worker `index` on `listeners`; it serves until `draining` turns true,
    /// then drains its own connections within the grace period.
    fn spawn(
        index: usize,
        listeners: Listeners,
        shared: Arc<Shared>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        draining: watch::Receiver<bool>,
    ) -> Result<Worker> {
        let (abort_tx, abort) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        // A thread made here shares this thread's network namespace.
        std::thread::Builder::new()
            .name(format!("xlb-l7-{index}"))
            .spawn(move || {
                let ended = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("L7 worker runtime")
                    .and_then(|runtime| {
                        let ended = runtime.block_on(async move {
                            tokio::select! {
                                served = work(listeners, shared, snapshots, draining) => served,
                                _ = abort => Ok(()),
                            }
                        });
                        // Without waiting for a blocking DNS lookup still running: it
                        // must not stretch the drain past its grace.
                        runtime.shutdown_background();
                        ended
                    });
                let _ = done_tx.send(ended);
            })
            .context("L7 worker thread")?;
        Ok(Worker {
            _abort: abort_tx,
            done,
        })
    }

    /// Waits until the worker has ended: drained, failed or panicked.
    async fn finished(&mut self) -> Result<()> {
        match (&mut self.done).await {
            Ok(ended) => ended,
            Err(_) => Err(anyhow::anyhow!("its thread panicked")),
        }
    }
}

/// A worker's work: accepts on its listeners until the drain, then waits for its
/// connections, at most the grace period.
async fn work(
    listeners: Listeners,
    shared: Arc<Shared>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    draining: watch::Receiver<bool>,
) -> Result<()> {
    // Every connection task holds a clone; `recv` ends once all are dropped.
    let (alive, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
    let grace = shared.config.drain_grace;
    let mut tasks = tokio::task::JoinSet::new();
    let plain = listeners.http.map(|listener| (listener, None));
    let secure = listeners
        .https
        .map(|(listener, acceptor)| (listener, Some(acceptor)));
    for (listener, acceptor) in plain.into_iter().chain(secure) {
        let listener = Acceptor::new(listener)?;
        let port = listener.local_addr()?.port();
        let listener_kind = Listener {
            tls: acceptor.is_some(),
            port,
        };
        tasks.spawn(accept(
            listener,
            listener_kind,
            acceptor,
            Arc::clone(&shared),
            snapshots.clone(),
            (draining.clone(), alive.clone()),
        ));
    }
    drop(alive);
    // The accept loops end when the drain starts.
    while let Some(done) = tasks.join_next().await {
        done.context("L7 listener task")?;
    }
    if tokio::time::timeout(grace, all_done.recv()).await.is_err() {
        tracing::warn!("L7 drain grace over: the remaining connections are cut");
    }
    Ok(())
}

/// A non-blocking listener on `addr` with `backlog`, `SO_REUSEADDR` set as std does,
/// `TCP_NODELAY`, which Linux passes on to every accepted connection (one
/// `setsockopt` per listener instead of one per connection), and `TCP_DEFER_ACCEPT`;
/// `SO_REUSEPORT` when `shared_port` (several workers), which the kernel allows only to
/// sockets of the same user: another process of that user that sets it too (a second
/// agent, nginx with `reuseport`) then shares the port instead of failing to bind.
fn listen(
    addr: SocketAddr,
    backlog: i32,
    shared_port: bool,
) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if shared_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_tcp_nodelay(true)?;
    defer_accept(&socket)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// `TCP_DEFER_ACCEPT` (nginx's `listen ... deferred`): the kernel queues a connection
/// for `accept` once its first bytes arrive, so the hop's first read finds them
/// instead of failing (`EAGAIN`) and waiting for another wake-up, which two in three
/// new connections did under load. Every client of the hop speaks first (an HTTP
/// request, a TLS ClientHello, the HTTP/2 preface). A client that sends nothing is
/// held by the kernel for about a second (one SYN-ACK retransmission), then accepted,
/// and the header timeout runs from there.
fn defer_accept(socket: &socket2::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    let len = libc::socklen_t::try_from(std::mem::size_of_val(&seconds)).expect("4 bytes");
    // SAFETY: a valid socket and a c_int option of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The drain signal and the guard every connection task holds while it lives.
type DrainState = (watch::Receiver<bool>, tokio::sync::mpsc::Sender<()>);

/// Accepts until the drain starts (the listener is then closed).
async fn accept(
    listener: Acceptor,
    kind: Listener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    (draining, alive): DrainState,
) {
    let name = if kind.tls { "https" } else { "http" };
    let accepted_count = shared.metrics.accepted(name);
    loop {
        let mut stop = draining.clone();
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|d| *d) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!("L7 {name} accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        accepted_count.inc();
        let task = Task {
            peer,
            kind,
            shared: Arc::clone(&shared),
            snapshots: snapshots.clone(),
            draining: draining.clone(),
            _alive: alive.clone(),
        };
        // Each kind of connection its own task: a task's future is as large as its
        // largest state, and tokio copies it when spawning and finishing it.
        match &tls {
            None => {
                tokio::spawn(plain(stream, task));
            }
            Some(acceptor) => {
                tokio::spawn(secure(acceptor.clone(), stream, task));
            }
        }
    }
}

/// What a client connection's task owns besides its socket.
struct Task {
    peer: SocketAddr,
    kind: Listener,
    shared: Arc<Shared>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    draining: watch::Receiver<bool>,
    /// Held while the connection lives: the drain waits until every copy is gone.
    _alive: tokio::sync::mpsc::Sender<()>,
}

impl Task {
    /// Serves HTTP on the connection (plain, or after its TLS handshake); the task's
    /// hold on the drain goes when it ends.
    async fn serve<S>(self, stream: S, state: Arc<ConnState>)
    where
        S: AsyncRead + AsyncWrite + Cork + Unpin + Send + 'static,
    {
        let Task {
            peer,
            kind,
            shared,
            snapshots,
            draining,
            _alive,
        } = self;
        serve(stream, peer, kind, state, shared, snapshots, draining).await;
    }
}

/// Serves a plain client connection.
async fn plain(stream: ClientSocket, task: Task) {
    let state = ConnState::new(task.shared.config.header_timeout);
    task.serve(stream, state).await;
}

/// Serves a TLS client connection: handshake (unless passed through), then HTTP.
async fn secure(acceptor: TlsAcceptor, stream: ClientSocket, task: Task) {
    // The header timeout runs from here: the handshake counts against it.
    let state = ConnState::new(task.shared.config.header_timeout);
    let (peer, shared) = (task.peer, &task.shared);
    if shared.config.ssl_passthrough {
        let snapshot = Arc::clone(&task.snapshots.borrow());
        let diverted = passthrough::divert(stream, peer, shared, &snapshot).await;
        drop(snapshot);
        if let passthrough::Diverted::Terminate(stream) = diverted
            && let Some(stream) = handshake(&acceptor, stream, peer, shared).await
        {
            task.serve(stream, state).await;
        }
    } else if let Some(stream) = handshake(&acceptor, stream, peer, shared).await {
        task.serve(stream, state).await;
    }
}

/// The TLS handshake of a client connection, within `header_timeout`.
async fn handshake<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<tokio_rustls::server::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = tokio::time::timeout(shared.config.header_timeout, acceptor.accept(stream));
    match handshake.await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::debug!("TLS handshake with {peer}: {e}");
            shared.metrics.closed("tls_handshake");
            None
        }
        Err(_) => {
            shared.metrics.closed("tls_handshake_timeout");
            None
        }
    }
}

/// Serves one client connection until it ends or its watchdog cuts it; once the drain
/// starts, it ends after the request in flight (hyper's graceful shutdown).
async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    kind: Listener,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    mut draining: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Cork + Unpin + Send + 'static,
{
    let mut io = ReadAhead::new(Tracked::new(stream, Arc::clone(&state)));
    let expired = state.expired(shared.config.idle_timeout);
    tokio::pin!(expired);
    let protocol = tokio::select! {
        detected = io.detect() => detected,
        reason = expired.as_mut() => {
            tracing::debug!("L7 connection from {peer}: {reason}");
            shared.metrics.closed(reason);
            return;
        }
        _ = draining.wait_for(|d| *d) => return,
    };
    let protocol = match protocol {
        Ok(protocol) => protocol,
        Err(e) => {
            tracing::debug!("L7 connection from {peer}: {e}");
            shared.metrics.closed("protocol");
            return;
        }
    };
    let requests = Requests {
        shared: Arc::clone(&shared),
        state: Arc::clone(&state),
        snapshots,
        conn: Arc::new(Conn {
            peer,
            kind,
            values: PeerValues::new(peer.ip(), kind.port),
        }),
    };
    if protocol == Protocol::Http1 {
        // Plain requests first, without hyper; hyper takes the connection from the
        // first request that is not (see `h1_server`).
        let read = io.take_read();
        let fast = h1_server::serve(
            &mut io,
            read,
            h1_server::HeadLimits {
                bytes: shared.config.max_header_bytes,
                fields: shared.config.max_headers.saturating_mul(2),
            },
            kind.ending(),
            &mut draining,
            |req| requests.serve(req),
        );
        let ended = tokio::select! {
            ended = fast => ended,
            reason = expired.as_mut() => h1_server::Ended::Closed(Some(reason)),
        };
        match ended {
            h1_server::Ended::HandOff(read) => io.put_back(read),
            h1_server::Ended::Closed(reason) => {
                if let Some(reason) = reason {
                    tracing::debug!("L7 connection from {peer}: {reason}");
                    shared.metrics.closed(reason);
                }
                return;
            }
        }
    }
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let answer = requests.serve(req.map(ClientBody::Hyper));
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let io = TokioIo::new(io);
    let outcome = match protocol {
        Protocol::Http1 => {
            let conn = shared.http1.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            until_done(conn, expired, draining).await
        }
        Protocol::Http2 => {
            // Boxed: HTTP/2 connections are rare here and their state is large.
            let mut conn = Box::pin(shared.http2.serve_connection(io, service));
            until_done(conn.as_mut(), expired, draining).await
        }
    };
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let reason = if e.is_parse_too_large() {
                // hyper answered 431 itself.
                shared
                    .metrics
                    .answered(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                "headers_too_large"
            } else if e.is_parse() {
                "malformed"
            } else {
                "protocol"
            };
            tracing::debug!("L7 connection from {peer}: {e}");
            shared.metrics.closed(reason);
        }
        Err(reason) => {
            tracing::debug!("L7 connection from {peer}: {reason}");
            shared.metrics.closed(reason);
        }
    }
}

/// A hyper server connection of either protocol, which can be wound down.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

/// Drives `conn` until it ends or the watchdog cuts it (the reason); once the drain
/// starts, it ends after the request in flight.
async fn until_done<C: Graceful>(
    mut conn: Pin<&mut C>,
    mut expired: Pin<&mut impl Future<Output = &'static str>>,
    mut draining: watch::Receiver<bool>,
) -> Result<hyper::Result<()>, &'static str> {
    let mut shutting_down = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => break Ok(served),
            reason = expired.as_mut() => break Err(reason),
            _ = draining.wait_for(|d| *d), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
}

/// What serves each request of one client connection, for either server.
struct Requests {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    conn: Arc<Conn>,
}

impl Requests {
    /// The answer to `req`, from the latest snapshot; the request counts as in flight
    /// (for the watchdog) from here until its answer has been sent. Boxed: unboxed,
    /// the request's future (kilobytes) made every connection's task that large, and
    /// tokio copies a task's future when it spawns it (new connection per request:
    /// user time 10.5 -> 10.1 µs per request, HTTPS 6.6 -> 6.4; keep-alive the same).
    fn serve(
        &self,
        req: Request<ClientBody>,
    ) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> {
        let guard = self.state.request_started();
        let shared = Arc::clone(&self.shared);
        let snapshot = Arc::clone(&self.snapshots.borrow());
        let conn = Arc::clone(&self.conn);
        // `handle` itself, not an `async` block around it: a block would hold the
        // request, and `handle`'s future, once more.
        Box::pin(handle(shared, snapshot, conn, guard, req))
    }
}

/// What every request of a client connection shares.
struct Conn {
    peer: SocketAddr,
    kind: Listener,
    values: PeerValues,
}

async fn handle(
    shared: Arc<Shared>,
    snapshot: Arc<Snapshot>,
    conn: Arc<Conn>,
    guard: RequestGuard,
    req: Request<ClientBody>,
) -> Response<Body> {
    let mut response = match forward(&shared, &snapshot, &conn, req).await {
        Ok(response) => response,
        Err(local) => {
            shared.metrics.local_answer(local.reason);
            local.into_response()
        }
    };
    shared.metrics.answered(response.status());
    let slot = response.extensions_mut().remove::<Slot>();
    // The connection counts as busy, and the request against `limit-connections`,
    // until the answer has been sent.
    response.map(|body| {
        Body::new(Guarded {
            body,
            _guard: guard,
            _slot: slot,
        })
    })
}

/// An answer the proxy makes itself, with the reason it is counted under.
struct Local {
    status: StatusCode,
    reason: &'static str,
    text: &'static str,
    location: Option<HeaderValue>,
}

fn local(status: StatusCode, reason: &'static str, text: &'static str) -> Local {
    Local {
        status,
        reason,
        text,
        location: None,
    }
}

impl Local {
    fn into_response(self) -> Response<Body> {
        let mut response = Response::new(full(format!("{}\n", self.text)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(location) = self.location {
            headers.insert(header::LOCATION, location);
        }
        response
    }
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

/// The request's authority, port included (RFC 9112 3.2, RFC 9113 8.3.1): an
/// absolute-form target's authority or HTTP/2's `:authority` wins over `Host`;
/// otherwise an HTTP/1.1 request needs exactly one valid `Host`. HTTP/1.0 may send
/// none (the host-less rules then apply). Two `Host` headers are always refused.
fn request_host<B>(req: &Request<B>) -> Result<String, Local> {
    let bad = || {
        local(
            StatusCode::BAD_REQUEST,
            "bad_host",
            "missing or invalid Host",
        )
    };
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(bad());
    }
    let host = match (req.uri().authority(), first) {
        (Some(authority), _) => authority.as_str(),
        (None, Some(value)) => value.to_str().map_err(|_| bad())?,
        (None, None) if req.version() < Version::HTTP_11 => return Ok(String::new()),
        (None, None) => return Err(bad()),
    };
    if valid_host(host) {
        Ok(host.to_owned())
    } else {
        Err(bad())
    }
}

/// `host` without its port (`[v6]:port` too).
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.find(']').map_or(host, |end| &host[..end + 2]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn is_upgrade(req: &Request<ClientBody>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && lists_token(req.headers(), &header::CONNECTION, "upgrade")
}

/// 431 when the request line and headers exceed the configured size or count.
fn check_head_size<B>(req: &Request<B>, config: &ProxyConfig) -> Result<(), Local> {
    let target_len = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    if head_within(
        req.headers(),
        target_len,
        config.max_header_bytes,
        config.max_headers,
    ) {
        Ok(())
    } else {
        Err(local(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            "request headers too large",
        ))
    }
}

async fn forward(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: &Conn,
    mut req: Request<ClientBody>,
) -> Result<Response<Body>, Local> {
    let Conn { peer, kind, .. } = *conn;
    let config = &shared.config;
    check_head_size(&req, config)?;
    let host = request_host(&req)?;
    normalize_target(&mut req)?;
    let Some(route) = snapshot.routes.lookup(&host, req.uri().path()) else {
        return Err(local(
            StatusCode::NOT_FOUND,
            "no_route",
            "no route for this host and path",
        ));
    };
    let policy = &route.policy;
    // The client the source ranges and limits judge (X-Forwarded-For when trusted).
    let client = SocketAddr::new(
        client_ip(req.headers(), peer.ip(), config.forwarded),
        peer.port(),
    );
    let cors = match answer_by_policy(shared, route, &host, client, kind, &req)? {
        Before::Answer(response) => return Ok(response),
        Before::Forward(cors) => cors,
    };
    let slot = limit_slot(shared, route, client)?;
    let granted = match authenticate(shared, snapshot, route, &host, client, kind, &req).await {
        Ok(granted) => granted,
        Err(answer) => return Ok(answer),
    };
    let route = canary_or_main(route, &req);
    let route = route.as_ref();
    let limit = route.max_body_bytes.unwrap_or(config.max_body_bytes);
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    refuse_h2c_upgrade(req.headers_mut());
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    if upgrade && route.upstream.protocol == UpstreamProtocol::H2c {
        return Err(local(
            StatusCode::BAD_GATEWAY,
            "upgrade_to_h2c",
            "cannot upgrade a connection to an HTTP/2 backend",
        ));
    }

    let endpoints = endpoints(shared, route).await?;
    let sticky = sticky_endpoint(route, &req, &endpoints);

    let (mut parts, body) = req.into_parts();
    let forwarded = Forwarded {
        peer,
        values: &conn.values,
        proto: if kind.tls { "https" } else { "http" },
        host: &host,
        trust: config.forwarded,
    };
    rewrite_head(&mut parts, &route.upstream, &forwarded, upgrade)?;
    apply_policy(&mut parts, policy)?;
    granted.to_backend(&mut parts.headers);
    let (body, body_state) = Limited::new(body, limit);
    let upstream_req = Request::from_parts(parts, Body::new(body));

    // Boxed: the exchange's future is most of a request's future, which hyper moves
    // into its connection state and each `await` moves into its caller's.
    let attempt = Box::pin(send(
        shared,
        route,
        &endpoints,
        upstream_req,
        &body_state,
        client_upgrade,
        sticky,
    ));
    let timeout = route.policy.read_timeout.unwrap_or(config.upstream_timeout);
    let mut response = tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            shared.metrics.upstream_error("timeout");
            Err(local(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the backend did not answer in time",
            ))
        })?;
    if let Some((cors, origin)) = &cors {
        cors_headers(response.headers_mut(), cors, origin);
    }
    granted.to_client(response.status(), response.headers_mut());
    if let Some(slot) = slot {
        // Held by the response body until it is sent (see `handle`).
        response.extensions_mut().insert(slot);
    }
    Ok(response)
}

/// The session-affinity cookie naming `addr`, with ingress-nginx's attributes
/// (`HttpOnly` always).
fn set_affinity_cookie(
    headers: &mut hyper::HeaderMap,
    affinity: &Affinity,
    upstream: &str,
    addr: SocketAddr,
) {
    let mut cookie = format!(
        "{}={}; Path={}",
        affinity.cookie_name,
        Affinity::token(upstream, addr),
        affinity.path
    );
    if let Some(seconds) = affinity.expires {
        let at = std::time::SystemTime::now() + Duration::from_secs(seconds);
        let _ = write!(cookie, "; Expires={}", httpdate::fmt_http_date(at));
    }
    if let Some(seconds) = affinity.max_age {
        let _ = write!(cookie, "; Max-Age={seconds}");
    }
    if let Some(samesite) = &affinity.samesite {
        let _ = write!(cookie, "; SameSite={samesite}");
    }
    cookie.push_str("; HttpOnly");
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// The route's `limit-*` annotations for this client: 503 over a limit, else the
/// `limit-connections` slot the request holds.
fn limit_slot(shared: &Shared, route: &Route, peer: SocketAddr) -> Result<Option<Slot>, Local> {
    let Some(limits) = &route.policy.limits else {
        return Ok(None);
    };
    shared
        .limiter
        .admit(&route.ingress, peer.ip(), limits)
        .map_err(|OverLimit| {
            local(
                StatusCode::SERVICE_UNAVAILABLE,
                "rate_limited",
                "too many requests from this client",
            )
        })
}

/// The route's authentication ([`auth::check`]), with the route's timeouts: what it
/// grants, or its answer (counted).
async fn authenticate<B>(
    shared: &Shared,
    snapshot: &Snapshot,
    route: &Route,
    host: &str,
    peer: SocketAddr,
    kind: Listener,
    req: &Request<B>,
) -> Result<auth::Granted, Response<Body>> {
    let policy = &route.policy;
    if policy.denied.is_none() && policy.basic_auth.is_none() && policy.external_auth.is_none() {
        return Ok(auth::Granted::default());
    }
    let seen = Seen {
        authority: host,
        scheme: if kind.tls { "https" } else { "http" },
        peer,
        uri: req.uri().path_and_query().map_or("/", PathAndQuery::as_str),
    };
    let timeouts = auth::Timeouts {
        connect: policy
            .connect_timeout
            .unwrap_or(shared.config.connect_timeout),
        read: policy
            .read_timeout
            .unwrap_or(shared.config.upstream_timeout),
    };
    let (checker, dns, routes) = (&shared.auth, &shared.dns, &snapshot.routes);
    // Boxed: an external check is an HTTP exchange of its own, a large future that
    // every request's would otherwise carry and move.
    match Box::pin(auth::check(
        checker, dns, routes, policy, &seen, &timeouts, req,
    ))
    .await
    {
        Verdict::Forward(granted) => Ok(granted),
        Verdict::Answer(reason, answer) => {
            shared.metrics.local_answer(reason);
            Err(answer)
        }
    }
}

/// The route with the canary's upstream when the request goes to the canary.
fn canary_or_main<'r, B>(route: &'r Route, req: &Request<B>) -> Cow<'r, Route> {
    match route.policy.canary.as_deref() {
        Some(canary) if takes_canary(canary, req) => Cow::Owned(Route {
            upstream: Arc::clone(&canary.upstream),
            ..route.clone()
        }),
        _ => Cow::Borrowed(route),
    }
}

/// The endpoint a valid affinity cookie names (an unknown one gets replaced).
fn sticky_endpoint<B>(
    route: &Route,
    req: &Request<B>,
    endpoints: &[SocketAddr],
) -> Option<SocketAddr> {
    let affinity = route.policy.affinity.as_ref()?;
    let token = cookie_value(req.headers(), &affinity.cookie_name)?;
    endpoints
        .iter()
        .copied()
        .find(|e| Affinity::token(&route.upstream.name, *e) == token)
}

/// Whether a request goes to the route's canary: its header, then its cookie, then
/// the weight (a random draw out of the total).
fn takes_canary<B>(canary: &Canary, req: &Request<B>) -> bool {
    let header = canary
        .by_header
        .as_deref()
        .and_then(|name| req.headers().get(name))
        .and_then(|v| v.to_str().ok());
    let cookie = canary
        .by_cookie
        .as_deref()
        .and_then(|name| cookie_value(req.headers(), name));
    match canary.verdict(header, cookie) {
        CanaryVerdict::Canary => true,
        CanaryVerdict::Main => false,
        CanaryVerdict::ByWeight => {
            canary.weight > 0
                && (canary.weight >= canary.weight_total
                    || rand::random_range(0..canary.weight_total) < canary.weight)
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers (RFC 6265 5.4).
fn cookie_value<'h>(headers: &'h hyper::HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// ingress-nginx's CORS headers for an allowed origin.
fn cors_headers(headers: &mut hyper::HeaderMap, cors: &Cors, origin: &HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    if cors.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    let mut set = |name: header::HeaderName, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value)
            && !value.is_empty()
        {
            headers.insert(name, value);
        }
    };
    set(header::ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods);
    set(header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers);
    set(header::ACCESS_CONTROL_EXPOSE_HEADERS, &cors.expose_headers);
    set(header::ACCESS_CONTROL_MAX_AGE, &cors.max_age.to_string());
}

/// What the route's policy says before a backend is chosen.
enum Before<'r> {
    /// Answered here (a CORS preflight).
    Answer(Response<Body>),
    /// Forward; with the CORS headers for an allowed origin.
    Forward(Option<(&'r Cors, HeaderValue)>),
}

/// In nginx's order: the server's app-root, the location's `return`, CORS's
/// preflight (rewrite-phase `if`s), then the SSL redirect (Lua, at the end of the
/// rewrite phase) and the source ranges (access phase).
fn answer_by_policy<'r, B>(
    shared: &Shared,
    route: &'r Route,
    host: &str,
    peer: SocketAddr,
    kind: Listener,
    req: &Request<B>,
) -> Result<Before<'r>, Local> {
    let policy = &route.policy;
    if let Some(root) = &policy.app_root
        && req.uri().path() == "/"
    {
        let scheme = if kind.tls { "https" } else { "http" };
        return Err(redirect_to(
            StatusCode::FOUND,
            "app_root",
            &format!("{scheme}://{host}{root}"),
        ));
    }
    if let Some(to) = &policy.redirect {
        let status = StatusCode::from_u16(to.code).map_err(|_| bad_request())?;
        return Err(redirect_to(status, "annotation_redirect", &to.location));
    }
    let cors = policy.cors.as_ref().and_then(|cors| {
        let origin = req.headers().get(header::ORIGIN)?.to_str().ok()?;
        let allowed = HeaderValue::from_str(cors.allowed_origin(origin)?).ok()?;
        Some((cors, allowed))
    });
    if let Some((cors, origin)) = &cors
        && req.method() == hyper::Method::OPTIONS
    {
        shared.metrics.local_answer("cors_preflight");
        let mut response = Response::new(Body::default());
        *response.status_mut() = StatusCode::NO_CONTENT;
        cors_headers(response.headers_mut(), cors, origin);
        return Ok(Before::Answer(response));
    }
    if route.ssl_redirect && !kind.tls {
        return Err(redirect(host, shared.https_port, req.uri()));
    }
    if let Some(access) = &policy.access
        && !access.permits(peer.ip())
    {
        return Err(local(
            StatusCode::FORBIDDEN,
            "source_range",
            "client address not allowed",
        ));
    }
    Ok(Before::Forward(cors))
}

/// Replaces the request's path by its normal form ([`path::normalize`]), the query
/// untouched, so that routing and the backend see the same path.
fn normalize_target<B>(req: &mut Request<B>) -> Result<(), Local> {
    let normal = match path::normalize(req.uri().path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normal)) => normal,
        Err(e) => {
            tracing::debug!("request path {:?}: {e}", req.uri().path());
            return Err(local(
                StatusCode::BAD_REQUEST,
                "bad_path",
                "bad request path",
            ));
        }
    };
    let target = match req.uri().query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query =
        Some(PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| bad_request())?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| bad_request())?;
    Ok(())
}

/// The route's endpoints: its Service endpoints, or its ExternalName resolved.
async fn endpoints<'r>(shared: &Shared, route: &'r Route) -> Result<Cow<'r, [SocketAddr]>, Local> {
    let endpoints = match &route.upstream.target {
        Target::Endpoints(endpoints) => Cow::Borrowed(endpoints.as_slice()),
        // Boxed: the resolver's future is large and only ExternalNames need it.
        Target::Dns { host, port } => match Box::pin(shared.dns.resolve(host, *port)).await {
            Ok(addrs) => Cow::Owned(addrs.to_vec()),
            Err(e) => {
                tracing::warn!("upstream {}: {e}", route.upstream.name);
                shared.metrics.upstream_error("dns");
                return Err(local(
                    StatusCode::BAD_GATEWAY,
                    "dns",
                    "cannot resolve the backend",
                ));
            }
        },
    };
    if endpoints.is_empty() {
        return Err(local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_endpoints",
            "no ready endpoints for this route",
        ));
    }
    Ok(endpoints)
}

/// Turns the client's request head into the backend's: connection headers dropped,
/// forwarding headers added, the target in the form the backend's protocol wants
/// (origin form and `Host` for HTTP/1.1, absolute with `:authority` for h2c).
fn rewrite_head(
    parts: &mut hyper::http::request::Parts,
    upstream: &Upstream,
    forwarded: &Forwarded<'_>,
    upgrade: bool,
) -> Result<(), Local> {
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_forwarding(&mut parts.headers, forwarded);
    let host = forwarded.host;
    // Already parsed and shared (`Bytes`): reused, not copied and parsed again.
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match upstream.protocol {
        UpstreamProtocol::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = Uri::from(path);
            // The request's authority, which may differ from the client's Host
            // (absolute form, `:authority`); usually it is that Host, kept as it is.
            let same = parts
                .headers
                .get(header::HOST)
                .is_some_and(|v| v.as_bytes() == host.as_bytes());
            if !same {
                let value = HeaderValue::from_str(host).map_err(|_| bad_request())?;
                parts.headers.insert(header::HOST, value);
            }
        }
        UpstreamProtocol::H2c => {
            parts.version = Version::HTTP_2;
            parts.uri = Uri::builder()
                .scheme(if upstream.tls.is_some() {
                    "https"
                } else {
                    "http"
                })
                .authority(host)
                .path_and_query(path)
                .build()
                .map_err(|_| bad_request())?;
            parts.headers.remove(header::HOST);
        }
    }
    Ok(())
}

/// The route's `rewrite-target`, `upstream-vhost` and `x-forwarded-prefix` on the
/// backend's request head (after [`rewrite_head`], so the client's `Host` still fed
/// `X-Forwarded-Host`).
fn apply_policy(parts: &mut hyper::http::request::Parts, policy: &Policy) -> Result<(), Local> {
    if let Some(rewrite) = &policy.rewrite
        && let Some(target) = rewrite.apply(parts.uri.path(), parts.uri.query())
    {
        let path =
            PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| bad_request())?;
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(path);
        parts.uri = Uri::from_parts(uri).map_err(|_| bad_request())?;
    }
    if let Some(vhost) = &policy.upstream_vhost {
        let value = HeaderValue::from_str(vhost).map_err(|_| bad_request())?;
        if parts.version == Version::HTTP_2 {
            let mut uri = std::mem::take(&mut parts.uri).into_parts();
            uri.authority = Some(vhost.parse().map_err(|_| bad_request())?);
            parts.uri = Uri::from_parts(uri).map_err(|_| bad_request())?;
        } else {
            parts.headers.insert(header::HOST, value);
        }
    }
    if let Some(prefix) = &policy.forwarded_prefix {
        let value = HeaderValue::from_str(prefix).map_err(|_| bad_request())?;
        parts.headers.insert("x-forwarded-prefix", value);
    }
    Ok(())
}

/// An annotation's redirect: `status` to `location` as given.
fn redirect_to(status: StatusCode, reason: &'static str, location: &str) -> Local {
    match HeaderValue::from_str(location) {
        Ok(value) => Local {
            location: Some(value),
            ..local(status, reason, "redirected")
        },
        Err(_) => bad_request(),
    }
}

fn too_large() -> Local {
    local(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "request body too large",
    )
}

fn bad_request() -> Local {
    local(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "bad request target or host",
    )
}

/// 308 to the same host and path on the HTTPS listener (its port named unless 443).
fn redirect(host: &str, https_port: u16, uri: &Uri) -> Local {
    let port = if https_port == 443 {
        String::new()
    } else {
        format!(":{https_port}")
    };
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let location = format!("https://{}{port}{path}", strip_port(host));
    match HeaderValue::from_str(&location) {
        Ok(value) => Local {
            location: Some(value),
            ..local(StatusCode::PERMANENT_REDIRECT, "ssl_redirect", "use HTTPS")
        },
        Err(_) => bad_request(),
    }
}

/// Picks an endpoint, connects and sends the request. Once per request, a request that
/// never left the proxy is tried again: after a connect failure on another endpoint
/// (the failed one is also ejected for a while, see [`super::balance`]), after a pooled
/// connection turned out closed on a fresh connection.
async fn send(
    shared: &Shared,
    route: &Route,
    endpoints: &[SocketAddr],
    mut req: Request<Body>,
    body: &BodyState,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    sticky: Option<SocketAddr>,
) -> Result<Response<Body>, Local> {
    let upstream = &route.upstream;
    let cannot_connect = || {
        local(
            StatusCode::BAD_GATEWAY,
            "connect",
            "cannot connect to the backend",
        )
    };
    let mut refused = Vec::new();
    let mut retried = false;
    loop {
        let (addr, in_flight) = shared
            .balancer
            .pick_sticky(&upstream.name, endpoints, route.balance, &refused, sticky)
            .ok_or_else(cannot_connect)?;
        if retried {
            shared.metrics.retried();
        }
        let sender = match shared
            .pool
            .checkout(
                addr,
                upstream,
                route.policy.connect_timeout,
                route
                    .policy
                    .send_timeout
                    .unwrap_or(shared.config.send_timeout),
            )
            .await
        {
            Ok(sender) => {
                in_flight.connected();
                sender
            }
            Err(e) => {
                tracing::warn!("upstream {}: {e}", upstream.name);
                shared.metrics.upstream_error(e.reason());
                if in_flight.connect_failed(endpoints) {
                    shared.metrics.ejected();
                }
                refused.push(addr);
                if retried {
                    return Err(cannot_connect());
                }
                retried = true;
                continue;
            }
        };
        match try_send(sender, req).await {
            Ok((answer, sender)) => {
                let key = PoolKey::new(addr, upstream);
                let mut response = respond(shared, answer, sender, key, in_flight, client_upgrade);
                if let Some(affinity) = &route.policy.affinity
                    && sticky != Some(addr)
                {
                    set_affinity_cookie(response.headers_mut(), affinity, &upstream.name, addr);
                }
                return Ok(response);
            }
            Err((e, Some(unsent))) if !retried => {
                tracing::debug!(
                    "upstream {} at {addr}, request not sent: {e}",
                    upstream.name
                );
                shared.metrics.upstream_error("unsent");
                retried = true;
                req = unsent;
            }
            // The client's body failed the exchange, not the backend.
            Err(_) if body.too_large() => return Err(too_large()),
            Err((e, _)) if body.malformed() => {
                tracing::debug!("request body for {}: {e}", upstream.name);
                return Err(local(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "malformed request body",
                ));
            }
            // Counted as `send_timeout` where it fired (see [`super::send_timeout`]).
            Err((e, _)) if is_send_timeout(e.as_ref()) => {
                tracing::warn!("upstream {} at {addr}: {e}", upstream.name);
                return Err(local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_send_timeout",
                    "the backend stopped reading the request",
                ));
            }
            Err((e, _)) => {
                tracing::warn!("upstream {} at {addr}: {e}", upstream.name);
                shared.metrics.upstream_error("protocol");
                return Err(local(
                    StatusCode::BAD_GATEWAY,
                    "upstream_protocol",
                    "the backend failed the request",
                ));
            }
        }
    }
}

type Sent = (Answer, Option<H1>);

/// Sends on one connection; on failure, the request comes back if it never left.
async fn try_send(
    sender: Sender,
    req: Request<Body>,
) -> Result<Sent, (BoxError, Option<Request<Body>>)> {
    match sender {
        Sender::H1(mut conn) => {
            let answer = conn.send(req).await?;
            Ok((answer, Some(conn)))
        }
        // Boxed: hyper's HTTP/2 client futures would make every HTTP/1.1 request's
        // future as large as theirs.
        Sender::H2(sender) => Box::pin(try_send_h2(sender, req)).await,
    }
}

/// [`try_send`] on a shared HTTP/2 connection.
async fn try_send_h2(
    mut sender: hyper::client::conn::http2::SendRequest<Body>,
    req: Request<Body>,
) -> Result<Sent, (BoxError, Option<Request<Body>>)> {
    if let Err(e) = sender.ready().await {
        return Err((e.into(), Some(req)));
    }
    match sender.try_send_request(req).await {
        Ok(response) => Ok((Answer::Hyper(response), None)),
        Err(mut e) => {
            let unsent = e.take_message();
            Err((e.into_error().into(), unsent))
        }
    }
}

/// The backend's answer on its way to the client: a 101 becomes a tunnel, anything
/// else streams back and returns its connection to the pool when done.
fn respond(
    shared: &Shared,
    answer: Answer,
    sender: Option<H1>,
    key: PoolKey,
    in_flight: InFlight,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response<Body> {
    let (mut parts, body) = match answer {
        Answer::Own(mut parts, decoder) => {
            if parts.status == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client) = client_upgrade
                && let Some(conn) = sender
            {
                shared.metrics.upgraded();
                let (backend, early) = conn.into_tunnel();
                tokio::spawn(tunnel(client, backend, early, key.addr));
                strip_hop_by_hop(&mut parts.headers, true);
                return Response::from_parts(parts, Body::default());
            }
            (parts, Source::Own(decoder))
        }
        Answer::Hyper(response) => {
            let (parts, body) = response.into_parts();
            (parts, Source::Hyper(body))
        }
    };
    strip_hop_by_hop(&mut parts.headers, false);
    let body = shared.pool.response_body(body, key, sender, in_flight);
    Response::from_parts(parts, body.boxed())
}

/// Copies bytes both ways between an upgraded client and backend until either closes;
/// `early` is what the backend sent right after its 101, before the client switched.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    mut backend: Box<dyn wire::Io>,
    early: Bytes,
    addr: SocketAddr,
) {
    let mut client = match client.await {
        Ok(client) => TokioIo::new(client),
        Err(e) => {
            tracing::debug!("upgrade with {addr}: {e}");
            return;
        }
    };
    if let Err(e) = client.write_all(&early).await {
        tracing::debug!("tunnel with {addr}: {e}");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!("tunnel with {addr}: {e}");
    }
}

/// A response body that keeps its request counted on the connection until it is done.
struct Guarded {
    body: Body,
    _guard: RequestGuard,
    _slot: Option<Slot>,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

mod passthrough;

#[cfg(test)]
mod tests;
