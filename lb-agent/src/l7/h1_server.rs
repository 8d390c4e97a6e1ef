//! The client side's plain HTTP/1.1 requests, served without hyper: the counterpart
//! of `wire.rs` on the backend side. Most requests a hop sees are HTTP/1.1 keep-alive
//! requests with no body or a small one; for them hyper's server was a fifth of the
//! hop's user time (dispatch, its parser with twice `max_headers` slots,
//! per-connection buffers). Here the head is parsed with `httparse` from one read
//! buffer (a body announced by `Content-Length` and already read whole comes from the
//! same buffer), handed to the same request handler, and the answer's head and ready
//! body go to the client in one write.
//!
//! Anything else goes to hyper, at a request boundary and with every byte read so far:
//! heads that do not parse or are over a limit (hyper answers 400 or 431, or
//! `head_within` does), bodies still on their way or chunked, `Expect`, `TE`, upgrades,
//! `CONNECT`, targets other than origin-form, HTTP/1.0. hyper then serves the rest of
//! the connection. Answers are framed as hyper frames them (`Server::encode` in hyper
//! 1.x), so a client sees the same answer whichever server took its request.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Write as _};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::cork::Cork;
use super::headers::{content_length, lists_token, value_lists};
use super::upstream::Body;
use super::wire::{GATHER_BYTES, put_field};

/// Header slots of the parse, at most. A head with more fields than this, or than
/// hyper's parser allows (twice `max_headers`, so that `head_within` answers those
/// over the limit with its 431), goes to hyper, which answers it as before.
const MAX_FIELDS: usize = 100;

/// Fields the proxy adds to a request on its way (`X-Forwarded-*`, `X-Real-IP`,
/// `X-Request-ID`; see `headers::add_forwarding`).
const FORWARDING_FIELDS: usize = 6;

/// The limits a head is parsed within: hyper's parser's, so that a head hyper would
/// refuse is hyper's to refuse.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// Bytes of a head still incomplete before it goes to hyper.
    pub bytes: usize,
    /// Fields.
    pub fields: usize,
}

/// How the server ends a connection it closes without an answer (the client's end,
/// a drain between requests); after an answer that closes, it always shuts down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `shutdown` first: TLS sends its close_notify.
    Shutdown,
    /// The socket's close alone: on plain TCP it sends the FIN, as `shutdown` would,
    /// with one system call fewer.
    Drop,
}

/// A client's request body: hyper's, or one this module read whole (or none).
#[derive(Debug)]
pub enum ClientBody {
    Hyper(Incoming),
    /// `None` once taken.
    Read(Option<Bytes>),
    Empty,
}

impl HttpBody for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Read(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            ClientBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(body) => body.is_end_stream(),
            ClientBody::Read(body) => body.is_none(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(body) => body.size_hint(),
            ClientBody::Read(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
            ClientBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// How a connection left this server.
#[derive(Debug)]
pub enum Ended {
    /// It is over: closed by the client, answered with `close`, drained, or failed
    /// (the reason to count, as `serve` counts hyper's failures).
    Closed(Option<&'static str>),
    /// hyper takes it from here; these bytes were read and not used.
    HandOff(Vec<u8>),
}

/// Serves `io`'s requests while they are plain (see the module doc), starting with
/// the bytes in `read`; each request goes to `handle`. Between requests, a drain
/// ends the connection; during one, it ends after the answer.
pub async fn serve<I, H, F>(
    io: &mut I,
    read: Vec<u8>,
    limits: HeadLimits,
    ending: Ending,
    draining: &mut watch::Receiver<bool>,
    mut handle: H,
) -> Ended
where
    I: AsyncRead + AsyncWrite + Cork + Unpin,
    H: FnMut(Request<ClientBody>) -> F,
    F: Future<Output = Response<Body>>,
{
    // The first read's buffer itself, not a copy of it.
    let mut buf = BytesMut::from(Bytes::from(read));
    let mut out = Vec::new();
    loop {
        match parse(&buf, limits) {
            Parsed::HandOff => return Ended::HandOff(buf.to_vec()),
            Parsed::Request {
                mut req,
                head: head_len,
                body,
                close,
            } => {
                buf.advance(head_len);
                if body > 0 {
                    *req.body_mut() = ClientBody::Read(Some(buf.split_to(body).freeze()));
                }
                let head = req.method() == Method::HEAD;
                let response = handle(req).await;
                // The answer to a request that asked to close, or once the drain has
                // started, says `close` (as hyper's does).
                let closing = close || *draining.borrow();
                let Ok(last) = respond(io, &mut out, response, head, closing).await else {
                    return Ended::Closed(Some("protocol"));
                };
                if last {
                    // Shut down whatever the ending: the corked answer leaves with the
                    // FIN now. A close alone, with client bytes still unread (a
                    // pipelined request), sends a reset instead of the FIN, and the
                    // kernel drops the answer it held.
                    let _ = io.shutdown().await;
                    return Ended::Closed(None);
                }
            }
            Parsed::Partial => {
                if buf.is_empty() && *draining.borrow() {
                    end(io, ending).await;
                    return Ended::Closed(None);
                }
                buf.reserve(4096);
                let n = tokio::select! {
                    n = io.read_buf(&mut buf) => n,
                    _ = draining.wait_for(|d| *d), if buf.is_empty() => Ok(0),
                };
                match n {
                    Ok(0) if buf.is_empty() => {
                        end(io, ending).await;
                        return Ended::Closed(None);
                    }
                    // The client went away in the middle of a head.
                    Ok(0) | Err(_) => return Ended::Closed(Some("protocol")),
                    Ok(_) => {}
                }
            }
        }
    }
}

/// Ends the connection's write side as `ending` says; the caller then drops `io`.
async fn end<I: AsyncWrite + Unpin>(io: &mut I, ending: Ending) {
    if ending == Ending::Shutdown {
        let _ = io.shutdown().await;
    }
}

#[expect(
    clippy::large_enum_variant,
    reason = "one at a time, on the stack: boxing would allocate once per request"
)]
enum Parsed {
    /// A whole plain request: `head` bytes of head, then `body` bytes of body (all
    /// read already); `close` when it asked for it.
    Request {
        req: Request<ClientBody>,
        head: usize,
        body: usize,
        close: bool,
    },
    /// More bytes needed.
    Partial,
    /// Not a request this module serves (or not one at all): hyper's.
    HandOff,
}

fn parse(buf: &[u8], limits: HeadLimits) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let fields = limits.fields.min(MAX_FIELDS);
    let mut parsed = httparse::Request::new(&mut []);
    match parsed.parse_with_uninit_headers(buf, &mut slots[..fields]) {
        Ok(httparse::Status::Complete(head)) => {
            plain_request(&parsed, head, buf.len() - head).unwrap_or(Parsed::HandOff)
        }
        Ok(httparse::Status::Partial) if buf.len() <= limits.bytes => Parsed::Partial,
        // Over the limit, too many fields, or malformed: hyper answers.
        _ => Parsed::HandOff,
    }
}

/// The request, when it is one this module serves: `read` bytes came after its head.
fn plain_request(parsed: &httparse::Request<'_, '_>, head: usize, read: usize) -> Option<Parsed> {
    if parsed.version != Some(1) {
        return None;
    }
    let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    let target = parsed.path?;
    if method == Method::CONNECT || !target.starts_with('/') {
        return None;
    }
    let uri = Uri::from_maybe_shared(Bytes::copy_from_slice(target.as_bytes())).ok()?;
    // Room for the forwarding headers the proxy adds, so that adding them does not
    // grow (and rehash) the map.
    let mut headers = HeaderMap::with_capacity(parsed.headers.len() + FORWARDING_FIELDS);
    let mut body = None;
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        match name {
            // A streamed body, or what hyper does for one (100-continue, trailers,
            // upgrades).
            header::TRANSFER_ENCODING | header::EXPECT | header::TE | header::UPGRADE => {
                return None;
            }
            // One length, of a body read whole already.
            header::CONTENT_LENGTH => {
                if body.is_some() {
                    return None;
                }
                body = Some(buffered_length(field.value, read)?);
            }
            _ => {}
        }
        headers.append(name, HeaderValue::from_bytes(field.value).ok()?);
    }
    if lists_token(&headers, &header::CONNECTION, "upgrade") {
        return None;
    }
    let close = lists_token(&headers, &header::CONNECTION, "close");
    let mut req = Request::new(ClientBody::Empty);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(Parsed::Request {
        req,
        head,
        body: body.unwrap_or(0),
        close,
    })
}

/// The body length a `Content-Length` value announces, when the body is all in the
/// `read` bytes after the head (and within what one write gathers). A body still on
/// its way is streamed, by hyper.
fn buffered_length(value: &[u8], read: usize) -> Option<usize> {
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let length: usize = std::str::from_utf8(value).ok()?.parse().ok()?;
    (length <= read && length <= GATHER_BYTES).then_some(length)
}

/// An answer's body as hyper's server sees it before sending it.
#[derive(Debug, Clone, Copy)]
enum BodyLen {
    /// Already at its end.
    None,
    Known(u64),
    Unknown,
}

impl BodyLen {
    fn of(body: &Body) -> BodyLen {
        if body.is_end_stream() {
            return BodyLen::None;
        }
        body.size_hint()
            .exact()
            .map_or(BodyLen::Unknown, BodyLen::Known)
    }
}

/// How the answer's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes (0: no body at all, as for HEAD, 204 and 304).
    Length(u64),
    Chunked,
}

/// Writes `response` to the client, with `Connection: close` when `closing`;
/// `Ok(true)` when the connection must close after it (it says `close`): then its last
/// write is corked, to leave with the FIN (see `cork`). A body that
/// fails, or that does not match its length, is an error: the client cannot tell
/// where the answer ends, so the connection ends with it, as hyper ends it.
async fn respond<I>(
    io: &mut I,
    out: &mut Vec<u8>,
    response: Response<Body>,
    head: bool,
    closing: bool,
) -> io::Result<bool>
where
    I: AsyncWrite + Cork + Unpin,
{
    let (parts, mut body) = response.into_parts();
    out.clear();
    let (framing, last) = write_head(out, &parts, &body, head, closing)?;
    let mut left = match framing {
        Framing::Length(0) => {
            // No body on the wire; hyper does not poll it either.
            drop(body);
            if last {
                io.cork();
            }
            io.write_all(out).await?;
            io.flush().await?;
            return Ok(last);
        }
        Framing::Length(n) => n,
        Framing::Chunked => u64::MAX,
    };
    loop {
        // What is ready now goes out with the head (or with what is gathered).
        let frame = match ready_frame(&mut body) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !out.is_empty() {
                    io.write_all(out).await?;
                    io.flush().await?;
                    out.clear();
                }
                body.frame().await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: only to a client that asked for them (`TE: trailers`), and
                // such a request is hyper's.
                Err(_) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        if framing == Framing::Chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
        } else {
            let n = data.len() as u64;
            if n > left {
                return Err(io::Error::other("body longer than its content-length"));
            }
            left -= n;
        }
        if out.len() + data.len() <= GATHER_BYTES {
            out.extend_from_slice(&data);
        } else {
            io.write_all(out).await?;
            out.clear();
            io.write_all(&data).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    match framing {
        Framing::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        Framing::Length(_) if left != 0 => {
            return Err(io::Error::other("body shorter than its content-length"));
        }
        Framing::Length(_) => {}
    }
    if last {
        io.cork();
    }
    io.write_all(out).await?;
    io.flush().await?;
    Ok(last)
}

/// The body's next frame if it is there without waiting.
fn ready_frame(body: &mut Body) -> Poll<Option<Result<Frame<Bytes>, super::upstream::BoxError>>> {
    Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop()))
}

/// The status line and fields, with the framing hyper's server gives an answer of
/// this status and body to a request of this method (and `Connection: close` when
/// `closing`); and whether the answer says `close`.
fn write_head(
    out: &mut Vec<u8>,
    parts: &hyper::http::response::Parts,
    body: &Body,
    head: bool,
    closing: bool,
) -> io::Result<(Framing, bool)> {
    let status = parts.status;
    if status.is_informational() {
        // hyper refuses these too (an upgrade's 101 is hyper's alone).
        return Err(io::Error::other("a 1xx answer to a plain request"));
    }
    if status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let bodiless_status = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    let can_have_body = !head && !bodiless_status;
    let body_len = BodyLen::of(body);
    let mut framing = None;
    let mut last = false;
    let mut dated = false;
    let mut te_values: Vec<&HeaderValue> = Vec::new();
    for (name, value) in &parts.headers {
        match *name {
            header::CONTENT_LENGTH if framing == Some(Framing::Chunked) => {
                return Err(io::Error::other("conflicting framing"));
            }
            header::CONTENT_LENGTH => match body_len {
                BodyLen::Known(n) => {
                    if framing.is_some() {
                        continue;
                    }
                    framing = Some(Framing::Length(n));
                }
                BodyLen::Unknown => {
                    let n = content_length(value)
                        .ok_or_else(|| io::Error::other("an invalid content-length"))?;
                    match framing {
                        Some(Framing::Length(m)) if m == n => continue,
                        Some(_) => return Err(io::Error::other("conflicting framing")),
                        None => framing = Some(Framing::Length(n)),
                    }
                }
                // No body: only a HEAD answer keeps the length (of what GET would get).
                BodyLen::None if head => framing = Some(Framing::Length(0)),
                BodyLen::None => continue,
            },
            header::TRANSFER_ENCODING => {
                if !can_have_body {
                    continue;
                }
                if matches!(framing, Some(Framing::Length(_))) {
                    return Err(io::Error::other("conflicting framing"));
                }
                framing = Some(Framing::Chunked);
                te_values.push(value);
                continue;
            }
            header::TRAILER if !can_have_body => continue,
            header::CONNECTION => last |= value_lists(value, "close"),
            header::DATE => dated = true,
            _ => {}
        }
        put_field(out, name, value.as_bytes());
    }
    if !te_values.is_empty() {
        put_transfer_encoding(out, &te_values);
    }
    let framing = match framing {
        Some(framing) => framing,
        None => implicit_framing(out, body_len, can_have_body, bodiless_status),
    };
    let framing = if can_have_body {
        framing
    } else {
        Framing::Length(0)
    };
    if closing && !last {
        out.extend_from_slice(b"connection: close\r\n");
        last = true;
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        http_date(out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok((framing, last))
}

/// The answer's `Transfer-Encoding` values on one line, ending in `chunked` (the
/// framing this server then applies).
fn put_transfer_encoding(out: &mut Vec<u8>, values: &[&HeaderValue]) {
    let mut joined = Vec::new();
    for (i, value) in values.iter().enumerate() {
        if i > 0 {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if !values.last().is_some_and(|v| value_lists(v, "chunked")) {
        joined.extend_from_slice(b", chunked");
    }
    put_field(out, &header::TRANSFER_ENCODING, &joined);
}

/// The framing of an answer whose fields set none, from its body, and the field
/// that says it.
fn implicit_framing(
    out: &mut Vec<u8>,
    body_len: BodyLen,
    can_have_body: bool,
    bodiless_status: bool,
) -> Framing {
    match body_len {
        BodyLen::Unknown if can_have_body => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
        BodyLen::Unknown => Framing::Length(0),
        BodyLen::None | BodyLen::Known(0) => {
            if can_have_body {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            Framing::Length(0)
        }
        BodyLen::Known(n) => {
            if !bodiless_status {
                let _ = write!(out, "content-length: {n}\r\n");
            }
            Framing::Length(n)
        }
    }
}

/// Today's IMF-fixdate, formatted once a second per thread (as hyper caches it).
fn http_date(out: &mut Vec<u8>) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|(at, text)| {
        if *at != secs || text.is_empty() {
            *at = secs;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

#[cfg(test)]
mod tests;
