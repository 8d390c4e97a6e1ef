//! nginx's `proxy_send_timeout` on backend connections: a write to the backend that
//! stays pending (the backend stopped reading and the socket buffers are full) for
//! longer than the timeout fails the connection. Like nginx, the timer runs between
//! two successive writes, not over the whole request, so a slow backend that keeps
//! reading is never cut, and waiting for the client's next bytes is not timed here.

use std::error::Error;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::metrics::Metrics;

/// One connection's timeout, set by each request that checks the connection out (its
/// route's `proxy-send-timeout`, else the agent's default). An HTTP/1.1 connection
/// carries one request at a time; a shared HTTP/2 one has the latest request's.
#[derive(Debug, Clone)]
pub struct Limit(Arc<AtomicU64>);

impl Limit {
    pub fn new(timeout: Duration) -> Limit {
        Limit(Arc::new(AtomicU64::new(millis(timeout))))
    }

    pub fn set(&self, timeout: Duration) {
        self.0.store(millis(timeout), Ordering::Relaxed);
    }

    fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}

fn millis(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

/// The error a timed-out write fails with (inside an `io::Error` of kind `TimedOut`).
#[derive(Debug, thiserror::Error)]
#[error("the backend read nothing for {0:?} (proxy-send-timeout)")]
pub struct SendTimedOut(Duration);

/// Whether `e` or one of its causes is a [`SendTimedOut`].
pub fn is_send_timeout(e: &(dyn Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(e) = cause {
        if e.is::<SendTimedOut>()
            || e.downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .is_some_and(<dyn Error + Send + Sync>::is::<SendTimedOut>)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A backend connection's IO whose writes time out (see the module doc); reads pass
/// through. A timeout is counted as the upstream error `send_timeout`.
pub struct WriteTimeout<S> {
    io: S,
    limit: Limit,
    /// Armed when a write first returns pending; dropped when one makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
    metrics: Metrics,
}

impl<S> WriteTimeout<S> {
    pub fn new(io: S, limit: Limit, metrics: Metrics) -> WriteTimeout<S> {
        WriteTimeout {
            io,
            limit,
            stalled: None,
            metrics,
        }
    }

    /// Passes a ready write result on (disarming the timer), or arms the timer on a
    /// pending one and fails once it fires.
    fn timed<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let limit = self.limit.get();
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                self.stalled = None;
                self.metrics.upstream_error("send_timeout");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    SendTimedOut(limit),
                )))
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.timed(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.timed(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.timed(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The marker is found through hyper-style wrapping: an error whose source is the
    /// `io::Error` carrying it.
    #[test]
    fn a_wrapped_timeout_is_recognised() {
        #[derive(Debug, thiserror::Error)]
        #[error("body write")]
        struct Outer(#[source] io::Error);
        let timed_out = io::Error::new(
            io::ErrorKind::TimedOut,
            SendTimedOut(Duration::from_secs(1)),
        );
        assert!(is_send_timeout(&Outer(timed_out)));
        let other = io::Error::new(io::ErrorKind::TimedOut, "elsewhere");
        assert!(!is_send_timeout(&Outer(other)));
    }
}
