//! Request limits: header bytes and count (431), body size (413). HTTP/1.1 heads are
//! also bounded inside hyper while parsing (its read buffer and header count), so an
//! oversize head never reaches memory; these checks give HTTP/2 the same limits and
//! count the body as it streams, since chunked bodies announce no length.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::upstream::BoxError;

/// Whether a request head is within `max_bytes` (names, values and the request line
/// as `name: value\r\n`) and `max_count` headers.
pub fn head_within(
    headers: &HeaderMap,
    target_len: usize,
    max_bytes: usize,
    max_count: usize,
) -> bool {
    if headers.len() > max_count {
        return false;
    }
    let bytes: usize = target_len
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    bytes <= max_bytes
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// How the client's body went, for the answer when forwarding it failed: the fault
/// was the client's (413 or 400), not the backend's.
#[derive(Debug, Default)]
pub struct BodyState {
    too_large: AtomicBool,
    malformed: AtomicBool,
}

impl BodyState {
    /// The body went over its limit.
    pub fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }

    /// Reading the body from the client failed (a broken chunked encoding, a body cut
    /// short).
    pub fn malformed(&self) -> bool {
        self.malformed.load(Ordering::Relaxed)
    }
}

/// Passes a body through until it exceeds `limit`, then fails it (which aborts the
/// request to the backend) and marks the state so the proxy answers 413. An error
/// reading the client's body is marked too, so the proxy answers 400.
pub struct Limited<B> {
    inner: B,
    seen: u64,
    limit: u64,
    state: Arc<BodyState>,
}

impl<B> Limited<B> {
    pub fn new(inner: B, limit: u64) -> (Limited<B>, Arc<BodyState>) {
        let state = Arc::new(BodyState::default());
        let body = Limited {
            inner,
            seen: 0,
            limit,
            state: Arc::clone(&state),
        };
        (body, state)
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.state.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyTooLarge(this.limit).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.malformed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn body_over_the_limit_fails_and_trips() {
        let (body, state) = Limited::new(Full::new(Bytes::from(vec![0u8; 11])), 10);
        assert!(body.collect().await.is_err());
        assert!(state.too_large() && !state.malformed());
        let (body, state) = Limited::new(Full::new(Bytes::from(vec![0u8; 10])), 10);
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 10);
        assert!(!state.too_large() && !state.malformed());
    }

    #[test]
    fn head_limits_count_and_bytes() {
        let mut h = HeaderMap::new();
        h.insert("a", "12345".parse().unwrap());
        assert!(head_within(&h, 1, 11, 1));
        assert!(!head_within(&h, 2, 11, 1));
        h.insert("b", "1".parse().unwrap());
        assert!(!head_within(&h, 1, 100, 1));
    }
}
