//! Per-connection timeouts that hyper does not give us in the shape we need, for
//! HTTP/1.1, HTTP/2 and TLS alike:
//! - header timeout (slowloris): once a byte arrives while no request is in flight,
//!   the request head must be complete within the timeout, however slowly it trickles;
//! - idle timeout: a connection with no request in flight and no traffic is closed.
//!
//! (hyper's own `header_read_timeout` also runs while a keep-alive connection waits
//! for its next request, which would make the idle timeout equal the header timeout.)

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::cork::Cork;

/// What the connection's I/O and its requests tell the watchdog.
#[derive(Debug)]
pub struct ConnState {
    base: Instant,
    header_timeout: Duration,
    /// Milliseconds since `base`.
    last_activity: AtomicU64,
    /// Milliseconds since `base` by which the pending head must be complete; 0: none.
    header_deadline: AtomicU64,
    in_flight: AtomicUsize,
}

impl ConnState {
    pub fn new(header_timeout: Duration) -> Arc<ConnState> {
        Arc::new(ConnState {
            base: Instant::now(),
            header_timeout,
            last_activity: AtomicU64::new(0),
            header_deadline: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_activity.store(self.now_ms(), Ordering::Relaxed);
    }

    fn bytes_read(&self) {
        let now = self.now_ms();
        self.last_activity.store(now, Ordering::Relaxed);
        if self.in_flight.load(Ordering::Relaxed) == 0 {
            let deadline =
                now + u64::try_from(self.header_timeout.as_millis()).unwrap_or(u64::MAX / 2);
            let _ = self.header_deadline.compare_exchange(
                0,
                deadline.max(1),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// A request head has been parsed: the header clock stops until the connection is
    /// idle again. The guard marks the request in flight until its response is done.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.header_deadline.store(0, Ordering::Relaxed);
        RequestGuard(Arc::clone(self))
    }

    /// Resolves when the connection should be cut, with the reason.
    pub async fn expired(&self, idle_timeout: Duration) -> &'static str {
        let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX / 2);
        loop {
            let now = self.now_ms();
            let deadline = self.header_deadline.load(Ordering::Relaxed);
            let wake = if deadline != 0 {
                if now >= deadline {
                    return "header_timeout";
                }
                deadline
            } else if self.in_flight.load(Ordering::Relaxed) == 0 {
                let idle_at = self.last_activity.load(Ordering::Relaxed) + idle_ms;
                if now >= idle_at {
                    return "idle_timeout";
                }
                idle_at
            } else {
                now + idle_ms
            };
            // A request starting meanwhile only moves deadlines later, and bytes that
            // start a header clock are seen at the next wake-up, at most one header
            // timeout late; the cap keeps that lag small.
            let cap = (self.header_timeout / 4).max(Duration::from_millis(10));
            let sleep = Duration::from_millis(wake - now).min(cap);
            tokio::time::sleep(sleep).await;
        }
    }
}

#[derive(Debug)]
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client stream that reports its traffic to a [`ConnState`].
pub struct Tracked<S> {
    inner: S,
    state: Arc<ConnState>,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, state: Arc<ConnState>) -> Self {
        Tracked { inner, state }
    }
}

impl<S: Cork> Cork for Tracked<S> {
    fn cork(&mut self) {
        self.inner.cork();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.state.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
