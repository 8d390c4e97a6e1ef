//! A client connection's first read, made big enough for a request head, and the
//! protocol told from it. hyper-util's auto builder read the first 24 bytes alone to
//! tell HTTP/2 with prior knowledge from HTTP/1.x, and hyper then read the rest of the
//! head into a buffer it had to grow (an 8 KiB copy) and parsed twice (the first time
//! on 24 bytes). [`ReadAhead::detect`] makes one read of up to [`AHEAD`] bytes, tells
//! the protocol from it as hyper-util does, and the reads after it get those bytes
//! first, so the first parse sees the whole head. The hop's own HTTP/1.1 server takes
//! them out of the stream ([`ReadAhead::take_read`]) and puts back what it hands to
//! hyper ([`ReadAhead::put_back`]); the same stream puts back the ClientHello that
//! `ssl-passthrough` read ([`ReadAhead::with_read`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::cork::Cork;

/// The first read's size: most request heads fit.
pub const AHEAD: usize = 4096;

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (over TLS too, whatever ALPN said, as hyper-util's
    /// auto builder serves it).
    Http2,
}

/// A stream whose first bytes were read ahead: its reads get them again first.
pub struct ReadAhead<S> {
    inner: S,
    /// What was read ahead, `pending[taken..]` not handed out yet; empty once all have
    /// been.
    pending: Vec<u8>,
    taken: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self::with_read(inner, Vec::new())
    }

    /// `inner`, from which `read` was already read.
    pub fn with_read(inner: S, read: Vec<u8>) -> Self {
        ReadAhead {
            inner,
            pending: read,
            taken: 0,
        }
    }

    /// What was read ahead and not handed out yet, taken out of the stream (for a
    /// reader with a buffer of its own, `super::h1_server`).
    pub fn take_read(&mut self) -> Vec<u8> {
        let mut read = std::mem::take(&mut self.pending);
        read.drain(..self.taken);
        self.taken = 0;
        read
    }

    /// Puts `read` back in front of the stream's next bytes (what a reader took and
    /// did not use); whatever is still pending stays behind it.
    pub fn put_back(&mut self, mut read: Vec<u8>) {
        read.extend_from_slice(&self.pending[self.taken..]);
        self.pending = read;
        self.taken = 0;
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

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    /// Reads until the first bytes tell the protocol: one read of up to [`AHEAD`]
    /// bytes unless they are a strict prefix of the HTTP/2 preface. The end of the
    /// stream, or anything else than the preface, is HTTP/1.x (hyper then answers or
    /// closes). Call it before any read, on a stream made with [`ReadAhead::new`].
    pub async fn detect(&mut self) -> io::Result<Protocol> {
        self.pending.reserve_exact(AHEAD);
        loop {
            let n = self.pending.len().min(H2_PREFACE.len());
            if self.pending[..n] != H2_PREFACE[..n] {
                return Ok(Protocol::Http1);
            }
            if n == H2_PREFACE.len() {
                return Ok(Protocol::Http2);
            }
            // `read_buf` reads into the spare capacity, never zeroed.
            if self.inner.read_buf(&mut self.pending).await? == 0 {
                return Ok(Protocol::Http1);
            }
        }
    }
}

impl<S: Cork> Cork for ReadAhead<S> {
    fn cork(&mut self) {
        self.inner.cork();
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
        Pin::new(&mut this.inner).poll_read(cx, buf)
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
    async fn an_http1_head_comes_from_one_read_and_is_read_again() {
        let head = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Long: 0123456789abcdef\r\n\r\n";
        let mut io = ReadAhead::new(Chunks::new(&[head, b"next"]));
        assert_eq!(io.detect().await.unwrap(), Protocol::Http1);
        assert_eq!(io.inner.reads, 1);
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
        assert_eq!(io.inner.reads, 2);
    }

    #[tokio::test]
    async fn the_h2_preface_is_http2_even_when_it_trickles_in() {
        let mut io = ReadAhead::new(Chunks::new(&[
            &H2_PREFACE[..3],
            &H2_PREFACE[3..],
            b"SETTINGS",
        ]));
        assert_eq!(io.detect().await.unwrap(), Protocol::Http2);
        assert_eq!(io.inner.reads, 2);
        let mut got = vec![0u8; AHEAD];
        let n = io.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], H2_PREFACE);
    }

    #[tokio::test]
    async fn a_partial_preface_then_anything_else_or_the_end_is_http1() {
        let mut io = ReadAhead::new(Chunks::new(&[b"PRI", b" / HTTP/1.1\r\n"]));
        assert_eq!(io.detect().await.unwrap(), Protocol::Http1);
        let mut got = vec![0u8; AHEAD];
        let n = io.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"PRI / HTTP/1.1\r\n");

        let mut io = ReadAhead::new(Chunks::new(&[b"PRI * HT"]));
        assert_eq!(io.detect().await.unwrap(), Protocol::Http1);
        let mut io = ReadAhead::new(Chunks::new(&[]));
        assert_eq!(io.detect().await.unwrap(), Protocol::Http1);
        assert_eq!(io.read(&mut got).await.unwrap(), 0);
    }
}
