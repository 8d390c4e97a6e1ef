//! A plain client connection's first read, made big enough for a request head.
//! hyper-util's protocol detection (HTTP/1.1, or HTTP/2 with prior knowledge) reads
//! the first 24 bytes alone, and hyper then reads the rest of the head: two
//! `recvfrom`s where one does. With a new connection per request, that is one
//! syscall in a dozen. [`ReadAhead`] answers a first read asking for less than
//! [`AHEAD`] bytes from one read of up to [`AHEAD`], and the next reads from what is
//! left over, before reading from the connection again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The first read's size: most request heads fit.
pub const AHEAD: usize = 4096;

pub struct ReadAhead<S> {
    inner: S,
    /// The first read's bytes, `pending[taken..]` not handed out yet; empty once all
    /// have been (and then never filled again).
    pending: Vec<u8>,
    taken: usize,
    first: bool,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            pending: Vec::new(),
            taken: 0,
            first: true,
        }
    }

    /// Hands out what the first read left over; false when nothing is left.
    fn drain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let left = &self.pending[self.taken..];
        if left.is_empty() {
            return false;
        }
        let n = left.len().min(buf.remaining());
        buf.put_slice(&left[..n]);
        self.taken += n;
        if self.taken == self.pending.len() {
            self.pending = Vec::new();
            self.taken = 0;
        }
        true
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.drain(buf) {
            return Poll::Ready(Ok(()));
        }
        if !this.first || buf.remaining() >= AHEAD {
            this.first = false;
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let mut ahead = vec![0; AHEAD];
        let mut read = ReadBuf::new(&mut ahead);
        let polled = Pin::new(&mut this.inner).poll_read(cx, &mut read);
        if let Poll::Ready(Ok(())) = polled {
            let n = read.filled().len();
            this.first = false;
            ahead.truncate(n);
            this.pending = ahead;
            this.drain(buf);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use tokio::io::AsyncReadExt;

    use super::*;

    /// Hands out its chunks, one per read (a chunk larger than the buffer is split),
    /// and counts the reads.
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        reads: usize,
    }

    impl Chunks {
        fn new(chunks: &[&[u8]]) -> Self {
            Chunks {
                chunks: chunks.iter().map(|c| c.to_vec()).collect(),
                reads: 0,
            }
        }
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            if let Some(mut chunk) = self.chunks.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.chunks.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_first_reads_come_from_one_big_read() {
        let head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Long: 0123456789abcdef\r\n\r\n";
        let mut io = ReadAhead::new(Chunks::new(&[head, b"next"]));
        let mut got = Vec::new();
        let mut small = [0u8; 24];
        while got.len() < head.len() {
            let n = io.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, head);
        assert_eq!(io.inner.reads, 1);
        assert!(io.pending.is_empty());
        // Then from the connection again.
        assert_eq!(io.read(&mut small).await.unwrap(), 4);
        assert_eq!(&small[..4], b"next");
    }

    #[tokio::test]
    async fn large_first_reads_and_later_reads_pass_through() {
        let mut io = ReadAhead::new(Chunks::new(&[b"abc", b"defgh"]));
        let mut large = vec![0u8; AHEAD];
        assert_eq!(io.read(&mut large).await.unwrap(), 3);
        let mut small = [0u8; 2];
        assert_eq!(io.read(&mut small).await.unwrap(), 2);
        assert_eq!(&small, b"de");
        assert_eq!(io.inner.reads, 2);
        assert!(io.pending.is_empty());
    }
}
