//! HTTP/1.1 test traffic: a keep-alive name server for backend namespaces,
//! a one-shot client and a long-lived keep-alive client connection.
//!
//! Same rules as the other traffic helpers: sockets created on a thread that
//! entered the namespace and then used anywhere, a deadline on every wait
//! and a bound on every loop. The clients use std sockets; the server serves
//! all its connections on one thread (a current-thread tokio runtime), which
//! can be pinned to a CPU, so the benchmarks' backends are these servers too.
//! Requests and responses are parsed with `httparse`.
//!
//! The server speaks just enough HTTP/1.1 for load-balancer tests:
//! - `GET` (any path) gets `200 OK`, `Content-Type: text/plain` and the body
//!   `"{name}\n"`; any other method gets `405 Method Not Allowed` and the
//!   connection stays usable (a `Content-Length` body is read and skipped).
//! - Connections are persistent as HTTP/1.1 says (HTTP/1.0: only with
//!   `Connection: keep-alive`); `Connection: close` closes after the
//!   response; pipelined requests are answered in order.
//! - Requests it will not serve get a response and then a close: `400` for
//!   one that does not parse or lacks `Host` (HTTP/1.1), `431` for a head
//!   over 8 KiB or 64 headers, `413` for a body over 64 KiB, `501` for
//!   `Transfer-Encoding` (chunked bodies).
//! - A connection idle for 10 s is closed; at most 256 are served at once,
//!   and further ones are closed as soon as they are accepted.
//! - Dropping its [`ServerHandle`] behaves like a dying backend: the
//!   listener is closed, every open connection is shut down both ways (its
//!   client sees EOF at once), and the server's thread is joined.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::netns::Netns;
use super::traffic::{
    REPLY_TIMEOUT, STOP_POLL, ServerHandle, ServerState, deadline_after, remaining, spawn_server,
    timeout_error,
};

#[cfg(test)]
mod tests;

/// Longest request or response head (request line or status line, and
/// headers) either side accepts.
const MAX_HEAD: usize = 8 * 1024;

/// Most headers in one head.
const MAX_HEADERS: usize = 64;

/// Longest body either side reads (the server skips request bodies).
const MAX_BODY: usize = 64 * 1024;

/// A server closes a connection that has not completed a request for this
/// long since the previous response (or since it was accepted).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections a server serves at once.
const MAX_CONNECTIONS: usize = 256;

/// How long a server keeps reading (and discarding) after closing its side,
/// so a client still sending does not get a reset before it has read the
/// response; and how much it reads meanwhile.
const LINGER: Duration = Duration::from_secs(1);
const MAX_LINGER_BYTES: usize = 64 * 1024;

/// Bytes read per `read` call.
const READ_CHUNK: usize = 4096;

/// Runs an HTTP/1.1 server in `ns`, bound to `bind`, that answers every
/// `GET` with `name` and a newline (e.g. `"backend-0\n"`), keeping
/// connections alive (see the module documentation for the details). It
/// serves until the handle is dropped, which also cuts its open connections
/// as a dying backend would.
///
/// [`ServerHandle::served`] counts `GET`s answered and
/// [`ServerHandle::accepted`] the connections served. Binding `[::]:port`
/// accepts IPv4 and IPv6.
pub fn spawn_http_server(ns: &Netns, bind: SocketAddr, name: &str) -> anyhow::Result<ServerHandle> {
    spawn_with_limits(ns, bind, name, Limits::DEFAULT, None)
}

/// [`spawn_http_server`] with its thread (it serves every connection on one
/// thread) pinned to `cpu` when given: the benchmarks' backends, whose CPU
/// use [`ServerHandle::cpu_time`] tells.
pub fn spawn_pinned_http_server(
    ns: &Netns,
    bind: SocketAddr,
    name: &str,
    cpu: Option<usize>,
) -> anyhow::Result<ServerHandle> {
    spawn_with_limits(ns, bind, name, Limits::DEFAULT, cpu)
}

/// Server limits; fixed for users, smaller in tests.
#[derive(Debug, Clone, Copy)]
struct Limits {
    idle_timeout: Duration,
    max_connections: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        idle_timeout: IDLE_TIMEOUT,
        max_connections: MAX_CONNECTIONS,
    };
}

fn spawn_with_limits(
    ns: &Netns,
    bind: SocketAddr,
    name: &str,
    limits: Limits,
    cpu: Option<usize>,
) -> anyhow::Result<ServerHandle> {
    let listener = ns
        .run_in(|| TcpListener::bind(bind))?
        .with_context(|| format!("cannot bind HTTP {bind} in netns {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let body = format!("{name}\n");
    spawn_server(local_addr, "http", cpu, move |state| {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::error!(error = %e, "cannot start the HTTP server's runtime");
                return;
            }
        };
        let server = HttpServer {
            body: &body,
            limits,
            state,
            open: RefCell::default(),
        };
        runtime.block_on(server.run(listener));
    })
}

/// What an HTTP server's connections share. Everything runs on the server's
/// one thread: connections are futures polled by the accept loop.
struct HttpServer<'a> {
    body: &'a str,
    limits: Limits,
    state: &'a ServerState,
    /// The open connections' sockets by connection number, so that
    /// stopping can cut them; a connection removes its own before its
    /// socket is closed.
    open: RefCell<HashMap<u64, RawFd>>,
}

/// Removes a connection from [`HttpServer::open`] when it ends (declared
/// after the socket, so dropped before it is closed).
struct Registered<'s, 'a> {
    server: &'s HttpServer<'a>,
    id: u64,
}

impl Drop for Registered<'_, '_> {
    fn drop(&mut self) {
        self.server.open.borrow_mut().remove(&self.id);
    }
}

impl HttpServer<'_> {
    /// Accepts connections and serves them until the handle is dropped,
    /// then cuts the open ones.
    async fn run(&self, listener: TcpListener) {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "cannot register the HTTP listener");
                return;
            }
        };
        let mut connections = FuturesUnordered::new();
        let mut poll = tokio::time::interval(STOP_POLL);
        let mut last_id = 0_u64;
        // Each turn accepts one connection, ends one, or ticks; the stop flag
        // ends the loop within STOP_POLL.
        while !self.state.stopping() {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        last_id += 1;
                        if let Some(connection) = self.take_on(last_id, stream, peer) {
                            connections.push(connection);
                        }
                    }
                    Err(e) => {
                        // E.g. ECONNABORTED (the client gave up) or EMFILE:
                        // keep serving after a short pause.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::task::yield_now().await;
                    }
                },
                Some(()) = connections.next() => {}
                _ = poll.tick() => {}
            }
        }
        // As a dying backend: refuse new connections, then cut the open
        // ones both ways so their clients see EOF now (and a reset if they
        // send more), not at some later timeout. Dropping the connections
        // closes their sockets.
        drop(listener);
        for &fd in self.open.borrow().values() {
            // SAFETY: `fd` belongs to a connection that is still open (it
            // leaves `open` before its socket is closed); shutdown does not
            // close the descriptor. It fails only if the peer already closed.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        drop(connections);
    }

    /// The future serving `stream`, or `None` (closing it) when
    /// [`Limits::max_connections`] are open already.
    fn take_on(
        &self,
        id: u64,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<impl Future<Output = ()>> {
        let mut open = self.open.borrow_mut();
        if open.len() >= self.limits.max_connections {
            tracing::debug!(%peer, "too many open HTTP connections; closing a new one");
            return None;
        }
        open.insert(id, stream.as_raw_fd());
        drop(open);
        // Counted before anything is answered, like `served`.
        self.state.accepted.fetch_add(1, Ordering::Relaxed);
        Some(async move {
            let mut stream = stream;
            let _registered = Registered { server: self, id };
            if let Err(e) = self.serve_connection(&mut stream).await {
                tracing::debug!(%peer, error = %e, "HTTP connection failed");
            }
        })
    }

    /// Answers the requests on one connection until it is closed, idle,
    /// asks to close, or sends something unservable (a stopping server cuts
    /// it).
    async fn serve_connection(&self, stream: &mut tokio::net::TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut buf = Vec::with_capacity(READ_CHUNK);
        let mut idle_since = Instant::now();
        // Each turn reads more or answers one request; reads end at the idle
        // timeout or EOF.
        loop {
            let head = match parse_request(&buf) {
                Ok(Some(head)) => head,
                Ok(None) => {
                    if !self.read_more(stream, &mut buf, idle_since).await? {
                        return Ok(());
                    }
                    continue;
                }
                Err(status) => {
                    let body = format!("{}\n", status.reason());
                    write_response(stream, status, &body, Connection::Close).await?;
                    return linger_close(stream).await;
                }
            };
            buf.drain(..head.len);
            while buf.len() < head.body_len {
                if !self.read_more(stream, &mut buf, idle_since).await? {
                    return Ok(());
                }
            }
            buf.drain(..head.body_len);
            let connection = head.connection();
            if head.is_get {
                self.state.served.fetch_add(1, Ordering::Relaxed);
                write_response(stream, Status::Ok, self.body, connection).await?;
            } else {
                let body = format!("{}\n", Status::MethodNotAllowed.reason());
                write_response(stream, Status::MethodNotAllowed, &body, connection).await?;
            }
            if connection == Connection::Close {
                return linger_close(stream).await;
            }
            idle_since = Instant::now();
        }
    }

    /// Appends what the client sends next to `buf`. `Ok(false)` means stop
    /// serving: the client closed its side (or the server cut it), or the
    /// connection has been idle for the idle timeout.
    async fn read_more(
        &self,
        stream: &mut tokio::net::TcpStream,
        buf: &mut Vec<u8>,
        idle_since: Instant,
    ) -> io::Result<bool> {
        let idle_deadline = idle_since + self.limits.idle_timeout;
        let mut chunk = [0u8; READ_CHUNK];
        match tokio::time::timeout_at(idle_deadline.into(), stream.read(&mut chunk)).await {
            // Idle for the idle timeout, or EOF.
            Err(_) | Ok(Ok(0)) => Ok(false),
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Ok(Err(e)) => Err(e),
        }
    }
}

/// A read timeout (Linux reports EAGAIN) or a signal: try again.
#[cfg(test)]
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Closes the server's side after its last response, then reads and drops
/// what the client still sends (bounded in time and bytes) so that closing
/// does not reset the connection before the client has read the response.
async fn linger_close(stream: &mut tokio::net::TcpStream) -> io::Result<()> {
    stream.shutdown().await?;
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut chunk = [0u8; READ_CHUNK];
    let mut discarded = 0;
    while discarded < MAX_LINGER_BYTES {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            // Lingered long enough, or EOF.
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => discarded += n,
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

/// The responses the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    MethodNotAllowed,
    PayloadTooLarge,
    HeadTooLarge,
    NotImplemented,
}

impl Status {
    fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::MethodNotAllowed => 405,
            Status::PayloadTooLarge => 413,
            Status::HeadTooLarge => 431,
            Status::NotImplemented => 501,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
        }
    }
}

/// What a response says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    /// HTTP/1.1's default: no header.
    Persistent,
    /// `Connection: keep-alive`, for an HTTP/1.0 client that asked for it.
    KeepAlive,
    /// `Connection: close`; the server closes after the response.
    Close,
}

impl Connection {
    /// The header line that says so (empty for [`Connection::Persistent`]).
    fn header(self) -> &'static str {
        match self {
            Connection::Persistent => "",
            Connection::KeepAlive => "Connection: keep-alive\r\n",
            Connection::Close => "Connection: close\r\n",
        }
    }
}

/// Sends one response within [`REPLY_TIMEOUT`], so a stuck client cannot
/// hold the connection.
async fn write_response(
    stream: &mut tokio::net::TcpStream,
    status: Status,
    body: &str,
    connection: Connection,
) -> io::Result<()> {
    let response = render_response(status, body, connection);
    tokio::time::timeout(REPLY_TIMEOUT, stream.write_all(response.as_bytes()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "writing the response timed out"))?
}

fn render_response(status: Status, body: &str, connection: Connection) -> String {
    let code = status.code();
    let reason = status.reason();
    let len = body.len();
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET\r\n"
    } else {
        ""
    };
    let connection = connection.header();
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\
         {allow}{connection}\r\n{body}"
    )
}

/// The clients' request: `GET /` naming `host` (the address connected to).
fn render_request(host: SocketAddr, connection: Connection) -> String {
    let connection = connection.header();
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-testbed\r\n{connection}\r\n")
}

/// The parts of a request head the server acts on.
#[derive(Debug, PartialEq, Eq)]
struct RequestHead {
    /// Bytes of the head, up to and including the blank line.
    len: usize,
    is_get: bool,
    /// From `Content-Length` (0 without one).
    body_len: usize,
    http10: bool,
    keep_alive: bool,
}

impl RequestHead {
    fn connection(&self) -> Connection {
        match (self.keep_alive, self.http10) {
            (false, _) => Connection::Close,
            (true, true) => Connection::KeepAlive,
            (true, false) => Connection::Persistent,
        }
    }
}

/// Parses the request head at the start of `buf`: `Ok(None)` while it is
/// incomplete, `Err` with the status to answer (and then close) when the
/// request cannot be served.
fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, Status> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(Status::HeadTooLarge),
        Err(_) => return Err(Status::BadRequest),
    };
    let http10 = req.version == Some(0);
    if !http10 && headers_named(req.headers, "host").count() != 1 {
        return Err(Status::BadRequest);
    }
    if headers_named(req.headers, "transfer-encoding")
        .next()
        .is_some()
    {
        return Err(Status::NotImplemented);
    }
    let body_len = content_length(req.headers)
        .map_err(|_| Status::BadRequest)?
        .unwrap_or(0);
    if body_len > MAX_BODY {
        return Err(Status::PayloadTooLarge);
    }
    let keep_alive = if has_token(req.headers, "connection", "close") {
        false
    } else if http10 {
        has_token(req.headers, "connection", "keep-alive")
    } else {
        true
    };
    Ok(Some(RequestHead {
        len,
        is_get: req.method == Some("GET"),
        body_len,
        http10,
        keep_alive,
    }))
}

/// The values of the headers called `name` (case-insensitive).
fn headers_named<'h>(
    headers: &'h [httparse::Header<'_>],
    name: &'h str,
) -> impl Iterator<Item = &'h [u8]> {
    headers
        .iter()
        .filter(move |h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Whether a comma-separated header such as `Connection` lists `token`.
fn has_token(headers: &[httparse::Header<'_>], name: &str, token: &str) -> bool {
    headers_named(headers, name)
        .flat_map(|value| value.split(|&b| b == b','))
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The `Content-Length`, if any. Several headers must agree; the value must
/// be plain digits.
fn content_length(headers: &[httparse::Header<'_>]) -> anyhow::Result<Option<usize>> {
    let mut found = None;
    for value in headers_named(headers, "content-length") {
        let text = std::str::from_utf8(value.trim_ascii()).unwrap_or("");
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            bail!(
                "invalid Content-Length {:?}",
                String::from_utf8_lossy(value)
            );
        }
        let len: usize = text
            .parse()
            .with_context(|| format!("Content-Length {text} out of range"))?;
        if found.is_some_and(|earlier| earlier != len) {
            bail!("conflicting Content-Length headers");
        }
        found = Some(len);
    }
    Ok(found)
}

/// The status code and the body of a whole HTTP/1 response as read from a
/// socket to its end; `None` when it has no status line. The body is empty
/// when the response has no end of head.
#[must_use]
pub fn status_and_body(response: &str) -> Option<(u16, String)> {
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// From `ns`, sends one `GET /` with `Connection: close` to `addr` on a new
/// connection and returns the first line of the body (the backend's name),
/// trimmed. A status other than `200` is an error; the whole exchange must
/// finish within `timeout`.
pub fn http_get(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let get = || -> anyhow::Result<String> {
        let deadline = deadline_after(timeout)?;
        let mut stream = connect(ns, addr, timeout)?;
        let mut buf = Vec::new();
        let (name, _) = exchange(&mut stream, &mut buf, addr, Connection::Close, deadline)?;
        Ok(name)
    };
    get().with_context(|| {
        format!(
            "http_get {addr} from netns {} (timeout {timeout:?})",
            ns.name()
        )
    })
}

/// A long-lived HTTP/1.1 client connection from inside a namespace: every
/// [`HttpConnection::get`] sends a keep-alive `GET /` on the same TCP
/// connection. Tests use it to prove that an established connection
/// survives agent restarts and backend changes.
///
/// Once a request fails (or the server announced `Connection: close`) the
/// connection is not reused: later calls fail and say why.
#[derive(Debug)]
pub struct HttpConnection {
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    netns: String,
    /// Bytes received beyond the last response (none from a sound server).
    buf: Vec<u8>,
    /// Requests attempted so far, for error messages.
    requests: u64,
    /// Why no further request can be sent, once that is known.
    unusable: Option<String>,
}

impl HttpConnection {
    /// From `ns`, opens a TCP connection to `addr` within `timeout`.
    pub fn open(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let open = || -> anyhow::Result<Self> {
            deadline_after(timeout)?;
            let stream = connect(ns, addr, timeout)?;
            let local = stream.local_addr()?;
            Ok(HttpConnection {
                stream,
                peer: addr,
                local,
                netns: ns.name().to_owned(),
                buf: Vec::new(),
                requests: 0,
                unusable: None,
            })
        };
        open().with_context(|| {
            format!(
                "HttpConnection::open {addr} from netns {} (timeout {timeout:?})",
                ns.name()
            )
        })
    }

    /// Sends a keep-alive `GET /` on this connection and returns the first
    /// line of the body (the backend's name), trimmed, within `timeout`. A
    /// status other than `200` is an error.
    pub fn get(&mut self, timeout: Duration) -> anyhow::Result<String> {
        self.requests += 1;
        self.try_get(timeout).with_context(|| {
            format!(
                "GET #{} on {} -> {} from netns {} (timeout {timeout:?})",
                self.requests, self.local, self.peer, self.netns
            )
        })
    }

    fn try_get(&mut self, timeout: Duration) -> anyhow::Result<String> {
        if let Some(why) = &self.unusable {
            bail!("the connection is unusable: {why}");
        }
        let deadline = deadline_after(timeout)?;
        let exchanged = exchange(
            &mut self.stream,
            &mut self.buf,
            self.peer,
            Connection::Persistent,
            deadline,
        );
        match exchanged {
            Ok((name, closing)) => {
                if closing {
                    self.unusable = Some(format!(
                        "the server closed it after request #{}",
                        self.requests
                    ));
                }
                Ok(name)
            }
            Err(e) => {
                self.unusable = Some(format!("request #{} failed", self.requests));
                Err(e)
            }
        }
    }

    /// The client's address and port of this connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address it was opened to.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }
}

/// Connects from `ns` (the socket is created on a thread inside it).
fn connect(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<TcpStream> {
    let stream = ns
        .run_in(|| TcpStream::connect_timeout(&addr, timeout))?
        .context("cannot connect")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `GET /` to `host` and reads the response; returns the body's first
/// line and whether the server closes the connection after it.
fn exchange(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    host: SocketAddr,
    connection: Connection,
    deadline: Instant,
) -> anyhow::Result<(String, bool)> {
    let request = render_request(host, connection);
    stream.set_write_timeout(Some(remaining(deadline)?))?;
    stream
        .write_all(request.as_bytes())
        .context("cannot send the request")?;
    let response = read_response(stream, buf, deadline)?;
    let first_line = String::from_utf8_lossy(&response.body)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    if response.status != 200 {
        bail!(
            "HTTP {} {}: {first_line:?}",
            response.status,
            response.reason
        );
    }
    if first_line.is_empty() {
        bail!("200 OK with an empty first line");
    }
    Ok((first_line, response.close))
}

/// A response as the clients see it.
#[derive(Debug)]
struct Response {
    status: u16,
    reason: String,
    body: Vec<u8>,
    /// The server closes the connection after it.
    close: bool,
}

/// The parts of a response head the clients act on.
#[derive(Debug, PartialEq, Eq)]
struct ResponseHead {
    len: usize,
    status: u16,
    reason: String,
    /// `None`: the body ends when the server closes the connection.
    body_len: Option<usize>,
    close: bool,
}

/// Parses the response head at the start of `buf`; `Ok(None)` while it is
/// incomplete.
fn parse_response(buf: &[u8]) -> anyhow::Result<Option<ResponseHead>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(None),
        Ok(_) => bail!("response head over {MAX_HEAD} bytes"),
        Err(e) => bail!(
            "not an HTTP/1.x response ({e}): starts with {:?}",
            String::from_utf8_lossy(&buf[..buf.len().min(40)])
        ),
    };
    if headers_named(resp.headers, "transfer-encoding")
        .next()
        .is_some()
    {
        bail!("Transfer-Encoding in the response is not supported");
    }
    let body_len = content_length(resp.headers)?;
    let http10 = resp.version == Some(0);
    let close = has_token(resp.headers, "connection", "close")
        || (http10 && !has_token(resp.headers, "connection", "keep-alive"))
        || body_len.is_none();
    Ok(Some(ResponseHead {
        len,
        status: resp.code.unwrap_or(0),
        reason: resp.reason.unwrap_or("").to_owned(),
        body_len,
        close,
    }))
}

/// Reads one response (head and body) from `stream`, starting with what
/// `buf` holds already; leaves any bytes after it in `buf`.
fn read_response(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> anyhow::Result<Response> {
    // Each turn reads more bytes; heads are bounded, reads have a deadline.
    let head = loop {
        if let Some(head) = parse_response(buf)? {
            break head;
        }
        if read_some(stream, buf, deadline)? == 0 {
            bail!(
                "the server closed the connection before a complete response ({} bytes)",
                buf.len()
            );
        }
    };
    buf.drain(..head.len);
    let body = if let Some(len) = head.body_len {
        if len > MAX_BODY {
            bail!("response body of {len} bytes is over {MAX_BODY}");
        }
        while buf.len() < len {
            if read_some(stream, buf, deadline)? == 0 {
                bail!(
                    "the server closed the connection after {} of {len} body bytes",
                    buf.len()
                );
            }
        }
        buf.drain(..len).collect()
    } else {
        while read_some(stream, buf, deadline)? > 0 {
            if buf.len() > MAX_BODY {
                bail!("response body over {MAX_BODY} bytes");
            }
        }
        std::mem::take(buf)
    };
    Ok(Response {
        status: head.status,
        reason: head.reason,
        body,
        close: head.close,
    })
}

/// One read into `buf` before `deadline`; returns the bytes read (0 at EOF).
fn read_some(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> anyhow::Result<usize> {
    let mut chunk = [0u8; READ_CHUNK];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(timeout_error(e)),
        }
    }
}

/// Starts HTTP servers answering `backend-<i>` on backend `i`'s IPv4 and IPv6
/// addresses at `port` (the demo's and the end-to-end tests' backends).
pub fn spawn_backend_http_servers(
    topo: &super::Topology,
    i: usize,
    port: u16,
) -> anyhow::Result<Vec<ServerHandle>> {
    let name = format!("backend-{i}");
    [
        std::net::IpAddr::V4(super::Topology::backend_v4(i)),
        std::net::IpAddr::V6(super::Topology::backend_v6(i)),
    ]
    .into_iter()
    .map(|ip| spawn_http_server(&topo.backends[i], SocketAddr::new(ip, port), &name))
    .collect()
}

/// The status code curl gets for `GET url` from `ns` (extra curl arguments, e.g.
/// `-H "Host: ..."`), within 2 s; `None` when no answer came.
pub fn curl_status(ns: &Netns, url: &str, extra: &[&str]) -> Option<u16> {
    let mut args = vec![
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "2",
    ];
    args.extend_from_slice(extra);
    args.push(url);
    let out = ns.exec("curl", &args).ok()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|code| *code != 0)
}
