//! HTTP/1.1 exchanges on a backend connection, written and parsed here instead of by
//! hyper's client: the request head goes from the request's task straight to the socket
//! (one write), its body follows as the client sends it (watching for an early
//! answer), the response head is parsed with `httparse` from one read buffer, and the
//! response body is read from the same buffer as the client's side asks for it; after
//! a 101 the connection becomes the tunnel. hyper's client hands each request, response
//! and body chunk through channels to the connection's state machine: with it, the
//! backend side was 30 % of the hop's user time in a profile of `cargo xtask bench l7`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::response::Parts;
use hyper::{Method, Request, Response, StatusCode, Version};
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::headers::{content_length, lists_token};
use super::upstream::{Body, BoxError};

/// Response header fields accepted, as hyper's client.
const MAX_HEADERS: usize = 100;
/// The most a response head may take, as hyper's client (its read buffer's limit).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// How much room each read asks for.
const READ_CHUNK: usize = 16 * 1024;
/// How much of a request body is gathered before it is written.
pub(super) const GATHER_BYTES: usize = 64 * 1024;

/// A backend connection's IO (plain TCP or TLS, with the send timeout below either).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("backend connection: {0}")]
    Io(#[source] io::Error),
    #[error("the backend closed the connection before a complete response")]
    Closed,
    #[error("the backend's response head is over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("malformed response from the backend: {0}")]
    Malformed(&'static str),
    /// The client's body failed (too large, malformed, cut): the proxy tells which.
    #[error("request body: {0}")]
    Body(#[source] BoxError),
}

impl From<httparse::Error> for WireError {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => WireError::HeadTooLarge,
            _ => WireError::Malformed("response head"),
        }
    }
}

/// An HTTP/1.1 connection to a backend, between exchanges or in one.
pub struct Connection {
    /// In a wrapper because response bodies must be `Sync`, and the IO is only ever
    /// used through `&mut`.
    io: SyncWrapper<Box<dyn Io>>,
    /// What was read and not yet consumed.
    read: BytesMut,
    /// The request head being written, its allocation kept for the next request.
    head: Vec<u8>,
    /// False once the connection must not carry another exchange.
    reusable: bool,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("reusable", &self.reusable)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub fn new(io: Box<dyn Io>) -> Connection {
        Connection {
            io: SyncWrapper::new(io),
            read: BytesMut::new(),
            head: Vec::new(),
            reusable: true,
        }
    }

    /// After a 101, the IO for the tunnel and what the backend already sent on it.
    pub fn into_tunnel(self) -> (Box<dyn Io>, Bytes) {
        (self.io.into_inner(), self.read.freeze())
    }

    /// Whether the connection can carry a new exchange: the last one ended cleanly and
    /// the backend has neither closed it nor sent anything since (checked without
    /// waiting).
    pub fn reusable(&mut self) -> bool {
        if !self.reusable || !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        let mut cx = Context::from_waker(Waker::noop());
        // Pending: open and quiet. Anything else (the end, an error, stray bytes) ends it.
        self.reusable = Pin::new(self.io.get_mut())
            .poll_read(&mut cx, &mut buf)
            .is_pending();
        self.reusable
    }

    /// Writes `req` (its head in one write, then its body as the client sends it) and
    /// reads the response head, which may come before the body is all sent (an early
    /// 413, say; the connection is then not reused). On failure, the request if it never
    /// reached the backend (so it can be sent elsewhere). The head is encoded now; the
    /// returned future, which owns only what the exchange needs, does the rest.
    pub fn exchange(&mut self, req: Request<Body>) -> Exchange<'_> {
        self.reusable = false;
        let sending = Sending::of(&req);
        let head_only = req.method() == Method::HEAD;
        let upgrade = req.headers().contains_key(header::UPGRADE);
        let mut head = std::mem::take(&mut self.head);
        encode_head(&mut head, &req, sending);
        let (parts, body) = req.into_parts();
        // A request without a body keeps it, to come back whole if it is never sent.
        let (kept, body) = match sending {
            Sending::Nothing => (Some(body), None),
            _ => (None, Some(body)),
        };
        Exchange {
            conn: self,
            out: Outgoing {
                body,
                chunked: sending == Sending::Chunked,
                buf: head,
                pos: 0,
                wrote: false,
                trailers: None,
                done: false,
            },
            unsent: kept.map(|body| (parts, body)),
            head_only,
            upgrade,
        }
    }

    /// Reads until a final response head (a 1xx other than an asked-for 101 is
    /// skipped), and decides how its body is framed (RFC 9112 6.3).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_only: bool,
        upgrade: bool,
    ) -> Poll<Result<(Parts, Decoder), WireError>> {
        loop {
            if let Some((parts, len)) = parse_head(&self.read)? {
                self.read.advance(len);
                let decoder = |framing| Decoder {
                    framing,
                    trailers: HeaderMap::new(),
                };
                if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    if !upgrade {
                        return Poll::Ready(Err(WireError::Malformed(
                            "101 to a request without Upgrade",
                        )));
                    }
                    // The connection is the tunnel's from here.
                    return Poll::Ready(Ok((parts, decoder(Framing::Empty))));
                }
                if parts.status.is_informational() {
                    continue;
                }
                let framing = framing(&parts, head_only)?;
                // Kept open only if the response is framed, neither side said close, and
                // it did not carry both lengths (RFC 9112 6.3: a possible smuggling try).
                let both = parts.headers.contains_key(header::TRANSFER_ENCODING)
                    && parts.headers.contains_key(header::CONTENT_LENGTH);
                self.reusable = framing != Framing::UntilClose && keeps_alive(&parts) && !both;
                return Poll::Ready(Ok((parts, decoder(framing))));
            }
            if self.read.len() > MAX_HEAD_BYTES {
                return Poll::Ready(Err(WireError::HeadTooLarge));
            }
            if ready!(self.poll_fill(cx)).map_err(WireError::Io)? == 0 {
                return Poll::Ready(Err(WireError::Closed));
            }
        }
    }

    /// Reads what the socket has into the buffer: the count, 0 at the end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.read.reserve(READ_CHUNK);
        tokio_util::io::poll_read_buf(Pin::new(self.io.get_mut()), cx, &mut self.read)
    }
}

/// One exchange on a [`Connection`] (see [`Connection::exchange`]): a future of its
/// own, not an `async fn`, so that it holds the request's parts once. As an `async fn`
/// it was 976 bytes, and every layer above it carried the request again; each is
/// copied when a request's future is built.
pub struct Exchange<'c> {
    conn: &'c mut Connection,
    out: Outgoing,
    /// A request without a body, to give back if none of it was written.
    unsent: Option<(hyper::http::request::Parts, Body)>,
    head_only: bool,
    upgrade: bool,
}

impl Future for Exchange<'_> {
    type Output = Result<(Parts, Decoder), (WireError, Option<Request<Body>>)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let (conn, out) = (&mut *this.conn, &mut this.out);
        let sent = if out.done {
            Poll::Ready(Ok(()))
        } else {
            out.poll_send(cx, conn.io.get_mut())
        };
        // An answer wins over the rest of the body, and over a write that failed
        // because the backend answered early and closed.
        let answer = match conn.poll_head(cx, this.head_only, this.upgrade) {
            Poll::Ready(answer) => {
                if !out.all_written() {
                    conn.reusable = false;
                }
                answer
            }
            Poll::Pending => match sent {
                Poll::Ready(Err(e)) => Err(e),
                _ => return Poll::Pending,
            },
        };
        // The buffer's allocation serves the next request's head.
        conn.head = std::mem::take(&mut out.buf);
        Poll::Ready(answer.map_err(|e| {
            let unsent = this
                .unsent
                .take()
                .filter(|_| !out.wrote)
                .map(|(parts, body)| Request::from_parts(parts, body));
            (e, unsent)
        }))
    }
}

/// How a request's body goes to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    Nothing,
    /// By the client's `Content-Length`, or this length (added).
    Length(Option<u64>),
    /// Chunked: its length is not known in advance.
    Chunked,
}

impl Sending {
    fn of(req: &Request<Body>) -> Sending {
        let body = req.body();
        if body.is_end_stream() {
            Sending::Nothing
        } else if req.headers().contains_key(header::CONTENT_LENGTH) {
            Sending::Length(None)
        } else if let Some(n) = body.size_hint().exact() {
            Sending::Length(Some(n))
        } else {
            Sending::Chunked
        }
    }
}

/// The request line and fields, in origin form (the proxy rewrote the target), with
/// the framing of its body.
fn encode_head(out: &mut Vec<u8>, req: &Request<impl Sized>, sending: Sending) {
    out.clear();
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_fields(out, req.headers());
    let has_length = req.headers().contains_key(header::CONTENT_LENGTH);
    match sending {
        // A request that usually has a body says it has none (RFC 9110 8.6).
        Sending::Nothing
            if !has_length
                && matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) =>
        {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Sending::Length(Some(n)) => {
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        Sending::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields as `name: value` lines (a head's or a trailer's), the counterpart of
/// [`append_fields`].
fn put_fields(out: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        put_field(out, name, value.as_bytes());
    }
}

/// One `name: value` line.
pub(super) fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request body on its way to the backend.
struct Outgoing {
    /// `None` once it has all been taken.
    body: Option<Body>,
    chunked: bool,
    /// Bytes to write (the head's rest, then each piece of the body, framed).
    buf: Vec<u8>,
    /// How much of `buf` is written.
    pos: usize,
    /// Whether any byte has been written (else the request never left).
    wrote: bool,
    /// The client's trailer fields, sent after the last chunk.
    trailers: Option<HeaderMap>,
    /// All written and flushed.
    done: bool,
}

impl Outgoing {
    fn all_written(&self) -> bool {
        self.pos >= self.buf.len() && self.body.is_none()
    }

    /// Writes what there is; ready once the whole body is written and flushed.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut Box<dyn Io>,
    ) -> Poll<Result<(), WireError>> {
        loop {
            // What the client has sent already goes out in one write with what waits
            // (the head, first): a write per piece cost a packet and a wake-up each.
            let mut body_pending = false;
            while let Some(body) = self.body.as_mut()
                && self.buf.len() - self.pos < GATHER_BYTES
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => {
                        body_pending = true;
                        break;
                    }
                    Poll::Ready(frame) => self.frame(frame)?,
                }
            }
            if self.pos < self.buf.len() {
                let n = ready!(Pin::new(&mut *io).poll_write(cx, &self.buf[self.pos..]))
                    .map_err(WireError::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(WireError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.wrote = true;
                self.pos += n;
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                }
                continue;
            }
            // All written so far reaches the backend, also while the client is slow (a
            // TLS stream holds it until flushed).
            ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(WireError::Io)?;
            if self.body.is_none() {
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                return Poll::Pending;
            }
        }
    }

    /// Frames a piece of the client's body (or its end) into the buffer.
    fn frame(&mut self, frame: Option<Result<Frame<Bytes>, BoxError>>) -> Result<(), WireError> {
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if self.chunked && data.is_empty() => {}
                Ok(data) if self.chunked => {
                    self.buf
                        .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    self.buf.extend_from_slice(&data);
                    self.buf.extend_from_slice(b"\r\n");
                }
                Ok(data) => self.buf.extend_from_slice(&data),
                Err(frame) => self.trailers = frame.into_trailers().ok(),
            },
            Some(Err(e)) => return Err(WireError::Body(e)),
            None => {
                self.body = None;
                if self.chunked {
                    self.buf.extend_from_slice(b"0\r\n");
                    if let Some(trailers) = self.trailers.take() {
                        put_fields(&mut self.buf, &trailers);
                    }
                    self.buf.extend_from_slice(b"\r\n");
                }
            }
        }
        Ok(())
    }
}

/// The response head at the start of `buf` and its length, once it is all there.
fn parse_head(buf: &[u8]) -> Result<Option<(Parts, usize)>, WireError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(len) = parsed.parse(buf)? else {
        return Ok(None);
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(WireError::Malformed("status code"))?;
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    append_fields(response.headers_mut(), parsed.headers)?;
    Ok(Some((response.into_parts().0, len)))
}

/// Parsed fields (a head's or a trailer's) into `headers`.
fn append_fields(
    headers: &mut HeaderMap,
    fields: &[httparse::Header<'_>],
) -> Result<(), WireError> {
    headers.reserve(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| WireError::Malformed("field name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| WireError::Malformed("field value"))?;
        headers.append(name, value);
    }
    Ok(())
}

/// How a response body ends (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: a HEAD request's answer, 204, 304.
    Empty,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    Chunked(Chunked),
    /// Neither: the body runs until the backend closes.
    UntilClose,
}

/// Where a chunked body's decoding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

fn framing(parts: &Parts, head_only: bool) -> Result<Framing, WireError> {
    if head_only
        || matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        )
    {
        return Ok(Framing::Empty);
    }
    if let Some(last) = parts
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        let chunked = last
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
        return Ok(if chunked {
            Framing::Chunked(Chunked::Size)
        } else {
            Framing::UntilClose
        });
    }
    let mut length = None;
    for value in parts.headers.get_all(header::CONTENT_LENGTH) {
        let n = content_length(value).ok_or(WireError::Malformed("Content-Length"))?;
        if length.is_some_and(|l| l != n) {
            return Err(WireError::Malformed("Content-Length"));
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

fn keeps_alive(parts: &Parts) -> bool {
    let says = |token| lists_token(&parts.headers, &header::CONNECTION, token);
    if parts.version == Version::HTTP_10 {
        says("keep-alive") && !says("close")
    } else {
        !says("close")
    }
}

/// Reads a response body off its connection, frame by frame.
#[derive(Debug)]
pub struct Decoder {
    framing: Framing,
    /// A chunked body's trailer fields, passed on as the last frame.
    trailers: HeaderMap,
}

impl Decoder {
    pub fn is_end_stream(&self) -> bool {
        match self.framing {
            Framing::Empty | Framing::Length(0) => true,
            Framing::Chunked(Chunked::Done) => self.trailers.is_empty(),
            _ => false,
        }
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Empty => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The next piece of the body; `None` at its end (the connection is then ready for
    /// another exchange, if it may carry one).
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        conn: &mut Connection,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let step = match &mut self.framing {
                Framing::Chunked(Chunked::Done) if !self.trailers.is_empty() => {
                    let trailers = std::mem::take(&mut self.trailers);
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Framing::Empty | Framing::Length(0) | Framing::Chunked(Chunked::Done) => {
                    return Poll::Ready(None);
                }
                Framing::Length(left) => take(&mut conn.read, left),
                Framing::UntilClose => {
                    let n = conn.read.len() as u64;
                    (n > 0).then(|| conn.read.split().freeze())
                }
                Framing::Chunked(state) => {
                    match chunk_step(state, &mut conn.read, &mut self.trailers) {
                        Ok(Some(data)) => Some(data),
                        Ok(None) if *state == Chunked::Done => continue,
                        Ok(None) => None,
                        Err(e) => {
                            conn.reusable = false;
                            return Poll::Ready(Some(Err(e.into())));
                        }
                    }
                }
            };
            if let Some(data) = step {
                if data.is_empty() {
                    continue;
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if self.framing == Framing::UntilClose => {
                    self.framing = Framing::Empty;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    conn.reusable = false;
                    return Poll::Ready(Some(Err(WireError::Closed.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    conn.reusable = false;
                    return Poll::Ready(Some(Err(WireError::Io(e).into())));
                }
            }
        }
    }
}

/// Up to `left` bytes of what was read (`None`: nothing read yet).
fn take(read: &mut BytesMut, left: &mut u64) -> Option<Bytes> {
    if read.is_empty() {
        return None;
    }
    let n = usize::try_from(*left).map_or(read.len(), |left| left.min(read.len()));
    *left -= n as u64;
    Some(read.split_to(n).freeze())
}

/// Advances a chunked body over what was read: data when some is there, `None` when
/// more must be read (or the body is done, its trailer fields in `trailers`). Chunk
/// extensions are dropped.
fn chunk_step(
    state: &mut Chunked,
    read: &mut BytesMut,
    trailers: &mut HeaderMap,
) -> Result<Option<Bytes>, WireError> {
    loop {
        match state {
            Chunked::Done => return Ok(None),
            Chunked::Data(left) => {
                let data = take(read, left);
                if *left == 0 {
                    *state = Chunked::DataEnd;
                }
                return Ok(data);
            }
            Chunked::Size => match httparse::parse_chunk_size(read) {
                Ok(httparse::Status::Complete((len, size))) => {
                    read.advance(len);
                    *state = if size == 0 {
                        Chunked::Trailers
                    } else {
                        Chunked::Data(size)
                    };
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(WireError::Malformed("chunk size")),
            },
            Chunked::DataEnd => {
                if read.len() < 2 {
                    return Ok(None);
                }
                if &read[..2] != b"\r\n" {
                    return Err(WireError::Malformed("chunk end"));
                }
                read.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match httparse::parse_headers(read, &mut fields)? {
                    httparse::Status::Complete((len, fields)) => {
                        append_fields(trailers, fields)?;
                        read.advance(len);
                        *state = Chunked::Done;
                    }
                    httparse::Status::Partial if read.len() > MAX_HEAD_BYTES => {
                        return Err(WireError::HeadTooLarge);
                    }
                    httparse::Status::Partial => return Ok(None),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
