//! Connections to backends: a pool per endpoint and TLS setting (idle HTTP/1.1
//! connections reused, one multiplexed HTTP/2 connection for h2c or h2 over TLS),
//! connected (and TLS handshaken, see [`super::backend_tls`]) with a timeout. Our own pool rather
//! than hyper-util's `Client` because a connect failure must leave the request unsent and
//! in our hands, so it can be retried on another endpoint.
//!
//! An HTTP/1.1 connection carries one exchange at a time, so it is driven by the task
//! of the request using it ([`H1`]): while the response head is awaited and while its
//! body streams, then it is parked in the pool, undriven, until the next checkout
//! (a connection task per backend connection cost a wake-up and a task switch per
//! request). The exchange itself is [`super::wire`]'s. An idle connection the backend
//! closed is noticed at checkout or by the pool's sweep; one closed in between fails
//! its request unsent, which is retried.

use foldhash::fast::RandomState;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper::http::response::Parts;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::backend_tls::{self, Connectors};
use super::balance::InFlight;
use super::metrics::Metrics;
use super::routes::{Upstream, UpstreamProtocol};
use super::send_timeout::{Limit, WriteTimeout};
use super::wire;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type Body = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    #[error("HTTP/2 handshake with {0}: {1}")]
    Handshake(SocketAddr, hyper::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(SocketAddr, std::io::Error),
    #[error("TLS settings for {0}: {1}")]
    TlsConfig(SocketAddr, rustls::Error),
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Io(..) => "connect",
            ConnectError::Timeout(_) => "connect_timeout",
            ConnectError::Handshake(..) => "handshake",
            ConnectError::Tls(..) | ConnectError::TlsConfig(..) => "tls_handshake",
        }
    }
}

/// Which pooled connections a request may use: the endpoint, and the digest of the
/// upstream's TLS settings (0: cleartext).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    tls: u64,
}

impl PoolKey {
    pub fn new(addr: SocketAddr, upstream: &Upstream) -> PoolKey {
        PoolKey {
            addr,
            tls: upstream.tls.as_ref().map_or(0, |t| t.digest()),
        }
    }
}

/// An HTTP/1.1 backend connection, which the task of the request using it drives (see
/// the module doc).
#[derive(Debug)]
pub struct H1 {
    conn: wire::Connection,
    limit: Limit,
}

/// A backend's answer: its head, and how to read its body.
pub enum Answer {
    /// From an HTTP/1.1 connection: read off it by [`wire::Decoder`].
    Own(Parts, wire::Decoder),
    /// From hyper's HTTP/2 client.
    Hyper(Response<Incoming>),
}

impl H1 {
    fn new(io: Box<dyn wire::Io>, limit: Limit) -> H1 {
        H1 {
            conn: wire::Connection::new(io),
            limit,
        }
    }

    /// Sends `req` and reads the response head; on failure the request comes back if
    /// it never left. The request goes into the exchange before the first `await`, so
    /// that the future holds it once (see [`wire::Exchange`]).
    pub fn send(
        &mut self,
        req: Request<Body>,
    ) -> impl Future<Output = Result<Answer, (BoxError, Option<Request<Body>>)>> + Send + '_ {
        let mut exchange = self.conn.exchange(req);
        async move {
            // The other ready connections run first: writes to backends then come in
            // batches, and a backend woken once finds several requests. Measured:
            // without it the hop took 2-4 % more CPU per request (`cargo xtask bench l7`).
            tokio::task::yield_now().await;
            match (&mut exchange).await {
                Ok((parts, decoder)) => Ok(Answer::Own(parts, decoder)),
                Err((e, unsent)) => Err((e.into(), unsent)),
            }
        }
    }

    /// After a 101: the connection's IO for the tunnel, and what the backend already
    /// sent on it.
    pub fn into_tunnel(self) -> (Box<dyn wire::Io>, Bytes) {
        self.conn.into_tunnel()
    }
}

pub enum Sender {
    H1(H1),
    H2(http2::SendRequest<Body>),
}

#[derive(Debug)]
pub struct Pool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connect_timeout: Duration,
    idle_timeout: Duration,
    h1: Mutex<HashMap<PoolKey, Vec<IdleH1>, RandomState>>,
    /// Whether the sweep of idle connections runs (see [`sweep`]).
    sweeping: std::sync::atomic::AtomicBool,
    h2: Mutex<HashMap<PoolKey, (http2::SendRequest<Body>, Limit), RandomState>>,
    tls: Connectors,
    /// Counts send timeouts (see [`WriteTimeout`]).
    metrics: Metrics,
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, metrics: Metrics) -> Pool {
        Pool {
            inner: Arc::new(Inner {
                connect_timeout,
                idle_timeout,
                h1: Mutex::new(HashMap::default()),
                sweeping: std::sync::atomic::AtomicBool::new(false),
                h2: Mutex::new(HashMap::default()),
                tls: Connectors::default(),
                metrics,
            }),
        }
    }

    /// An idle or new connection to `addr` for `upstream` (its HTTP version and TLS
    /// settings); a new one must connect, and finish its TLS handshake, each within
    /// `connect_timeout` (the route's `proxy-connect-timeout`), else the pool's. Its
    /// writes then time out after `send_timeout` (the route's `proxy-send-timeout`,
    /// else the agent's).
    pub async fn checkout(
        &self,
        addr: SocketAddr,
        upstream: &Upstream,
        connect_timeout: Option<Duration>,
        send_timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        let key = PoolKey::new(addr, upstream);
        let protocol = upstream.protocol;
        match protocol {
            UpstreamProtocol::Http1 => {
                if let Some(conn) = self.idle_h1(key) {
                    conn.limit.set(send_timeout);
                    return Ok(Sender::H1(conn));
                }
            }
            UpstreamProtocol::H2c => {
                let existing = {
                    let h2 = self.inner.h2.lock().unwrap_or_else(PoisonError::into_inner);
                    h2.get(&key).filter(|(s, _)| !s.is_closed()).cloned()
                };
                if let Some((sender, limit)) = existing {
                    limit.set(send_timeout);
                    return Ok(Sender::H2(sender));
                }
            }
        }
        // Boxed: connecting, TLS and the handshakes make a future of kilobytes, which
        // every request's future would otherwise carry and move (see `proxy::send`).
        Box::pin(self.open(key, upstream, connect_timeout, send_timeout)).await
    }

    /// A new connection for `upstream` to `key.addr` (see [`Pool::checkout`]).
    async fn open(
        &self,
        key: PoolKey,
        upstream: &Upstream,
        connect_timeout: Option<Duration>,
        send_timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        let (addr, protocol) = (key.addr, upstream.protocol);
        let limit = Limit::new(send_timeout);
        let tcp = self.connect(addr, connect_timeout, &limit).await?;
        let Some(tls) = &upstream.tls else {
            return self.handshake(key, protocol, tcp, limit).await;
        };
        let config = self
            .inner
            .tls
            .config(tls, protocol)
            .map_err(|e| ConnectError::TlsConfig(addr, e))?;
        let name = backend_tls::server_name(tls).map_err(|e| ConnectError::TlsConfig(addr, e))?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let timeout = connect_timeout.unwrap_or(self.inner.connect_timeout);
        let stream = tokio::time::timeout(timeout, connector.connect(name, tcp.into_inner()))
            .await
            .map_err(|_| ConnectError::Timeout(addr))?
            .map_err(|e| ConnectError::Tls(addr, e))?;
        self.handshake(key, protocol, TokioIo::new(stream), limit)
            .await
    }

    /// HTTP/1.1 or HTTP/2 on a fresh connection; an HTTP/2 one is shared from now on.
    async fn handshake<I>(
        &self,
        key: PoolKey,
        protocol: UpstreamProtocol,
        io: TokioIo<I>,
        limit: Limit,
    ) -> Result<Sender, ConnectError>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let addr = key.addr;
        match protocol {
            UpstreamProtocol::Http1 => Ok(Sender::H1(H1::new(Box::new(io.into_inner()), limit))),
            UpstreamProtocol::H2c => {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| ConnectError::Handshake(addr, e))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("backend HTTP/2 connection {addr}: {e}");
                    }
                });
                self.inner
                    .h2
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key, (sender.clone(), limit));
                Ok(Sender::H2(sender))
            }
        }
    }

    fn idle_h1(&self, key: PoolKey) -> Option<H1> {
        let mut h1 = self.inner.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = h1.get_mut(&key)?;
        while let Some((mut conn, since)) = idle.pop() {
            if since.elapsed() < self.inner.idle_timeout && conn.conn.reusable() {
                return Some(conn);
            }
        }
        None
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        timeout: Option<Duration>,
        limit: &Limit,
    ) -> Result<TokioIo<WriteTimeout<TcpStream>>, ConnectError> {
        let timeout = timeout.unwrap_or(self.inner.connect_timeout);
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout(addr))?
            .map_err(|e| ConnectError::Io(addr, e))?;
        let _ = stream.set_nodelay(true);
        let metrics = self.inner.metrics.clone();
        Ok(TokioIo::new(WriteTimeout::new(
            stream,
            limit.clone(),
            metrics,
        )))
    }

    /// Wraps a backend response body so that its connection returns to the pool once
    /// the body has been read to its end (and not before: HTTP/1.1 cannot interleave),
    /// and the endpoint's in-flight count drops when the body is done or abandoned.
    pub fn response_body(
        &self,
        body: Source,
        key: PoolKey,
        sender: Option<H1>,
        in_flight: InFlight,
    ) -> PooledBody {
        PooledBody {
            body,
            ended: false,
            give_back: sender.map(|s| (Arc::clone(&self.inner), key, s)),
            _in_flight: in_flight,
        }
    }
}

/// Where a response body comes from.
pub enum Source {
    Own(wire::Decoder),
    Hyper(Incoming),
}

impl Source {
    fn is_end_stream(&self) -> bool {
        match self {
            Source::Own(decoder) => decoder.is_end_stream(),
            Source::Hyper(body) => body.is_end_stream(),
        }
    }
}
/// A parked HTTP/1.1 connection and when it was parked.
type IdleH1 = (H1, Instant);

type GiveBack = (Arc<Inner>, PoolKey, H1);

/// A backend's response body, which drives its HTTP/1.1 connection while it streams.
pub struct PooledBody {
    body: Source,
    ended: bool,
    give_back: Option<GiveBack>,
    _in_flight: InFlight,
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let conn = this.give_back.as_mut().map(|(_, _, h1)| &mut h1.conn);
        let polled = match (&mut this.body, conn) {
            (Source::Own(decoder), Some(conn)) => decoder.poll_frame(cx, conn),
            (Source::Own(_), None) => {
                Poll::Ready(Some(Err("backend connection lost mid-body".into())))
            }
            (Source::Hyper(body), _) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        };
        match &polled {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Source::Own(decoder) => decoder.size_hint(),
            Source::Hyper(body) => body.size_hint(),
        }
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let done = self.ended || self.body.is_end_stream();
        if let (true, Some((inner, key, conn))) = (done, self.give_back.take()) {
            park(&inner, key, conn);
        }
    }
}

/// Parks a connection whose exchange is over, if it can carry another, and starts the
/// sweep if it is not running.
fn park(inner: &Arc<Inner>, key: PoolKey, mut conn: H1) {
    if !conn.conn.reusable() {
        return;
    }
    {
        let mut h1 = inner.h1.lock().unwrap_or_else(PoisonError::into_inner);
        let idle = h1.entry(key).or_default();
        if idle.len() >= MAX_IDLE_PER_ENDPOINT {
            return;
        }
        idle.push((conn, Instant::now()));
    }
    if !inner
        .sweeping
        .swap(true, std::sync::atomic::Ordering::Relaxed)
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        runtime.spawn(sweep(Arc::downgrade(inner)));
    }
}

/// Closes parked connections that are past the idle timeout or that the backend
/// closed, every idle timeout, for as long as the pool lives: nothing else looks at
/// an endpoint's connections once it gets no requests.
async fn sweep(inner: Weak<Inner>) {
    let Some(period) = inner.upgrade().map(|i| i.idle_timeout) else {
        return;
    };
    let period = period.max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        let mut h1 = inner.h1.lock().unwrap_or_else(PoisonError::into_inner);
        h1.retain(|_, idle| {
            idle.retain_mut(|(conn, since)| since.elapsed() < period && conn.conn.reusable());
            !idle.is_empty()
        });
    }
}
