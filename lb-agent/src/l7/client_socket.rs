//! Accepted client connections, registered with the runtime's poller only when one
//! first has to wait.
//!
//! tokio registers every socket it accepts (`epoll_ctl` ADD) and deregisters it when
//! it is dropped (DEL): two system calls per connection, a fifth of the hop's system
//! calls for a client that sends one request and closes. The listeners set
//! `TCP_DEFER_ACCEPT`, so a connection is accepted with its first bytes already there:
//! a request read at once, answered while the backend's socket is the one awaited,
//! and closed never waits on its own socket. [`ClientSocket`] reads and writes the
//! socket directly until a read or a write would block, and only then hands it to
//! tokio (`TcpStream::from_std`), for good.
//!
//! Its direct reads and writes spend the task's cooperative budget as tokio's own
//! do, so a client whose bytes never run out still lets the worker's other
//! connections run.
//!
//! It also corks without a system call: after [`Cork::cork`], its writes carry
//! `MSG_MORE`, so the last partial segment stays in the socket until the shutdown
//! sends it with the FIN (see `cork`). Unlike `TCP_CORK`, `MSG_MORE` holds the
//! segment only against its own write: when earlier bytes of the answer are still
//! unacknowledged, their acknowledgement sends it (`TCP_NODELAY`), and the FIN follows
//! alone, as without the cork. Nothing waits longer either way; the answers that fit
//! one write, most of them, always leave with their FIN.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use socket2::{SockRef, Socket};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::coop;

use super::cork::Cork;

/// The most slices one `sendmsg` takes (Linux's `UIO_MAXIOV`).
const MAX_SLICES: usize = 1024;

/// A listener whose connections come out as [`ClientSocket`]s, not registered.
#[derive(Debug)]
pub struct Acceptor {
    listener: AsyncFd<std::net::TcpListener>,
}

impl Acceptor {
    /// `listener` must be non-blocking. Registers it with the current runtime.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        // SAFETY: the listener owns its descriptor, which stays open and the same until
        // the `AsyncFd` is dropped (nothing here replaces or closes it).
        let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Acceptor { listener })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.get_ref().local_addr()
    }

    /// The next connection, non-blocking, with its peer's address.
    pub async fn accept(&self) -> io::Result<(ClientSocket, SocketAddr)> {
        loop {
            let mut ready = self.listener.readable().await?;
            let accepted = ready.try_io(|listener| {
                SockRef::from(listener.get_ref()).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
            });
            if let Ok(accepted) = accepted {
                let (socket, peer) = accepted?;
                let peer = peer.as_socket().ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a TCP peer without an IP address",
                    )
                })?;
                return Ok((ClientSocket::new(socket), peer));
            }
        }
    }
}

/// A client connection: its socket alone until it first has to wait, then tokio's.
#[derive(Debug)]
pub struct ClientSocket {
    state: State,
    /// Corked: writes carry `MSG_MORE`.
    more: bool,
}

#[derive(Debug)]
enum State {
    /// Not registered with the poller yet; non-blocking.
    Direct(Socket),
    Registered(TcpStream),
    /// The registration failed, and the socket was closed with it.
    Lost,
}

impl ClientSocket {
    /// `socket` must be a connected, non-blocking TCP socket.
    pub fn new(socket: Socket) -> Self {
        ClientSocket {
            state: State::Direct(socket),
            more: false,
        }
    }

    /// Whether the socket was handed to tokio (it had to wait).
    #[must_use]
    pub fn is_registered(&self) -> bool {
        matches!(self.state, State::Registered(_))
    }

    fn flags(&self) -> libc::c_int {
        // As std's `send`: a peer that is gone is an error, not a SIGPIPE.
        libc::MSG_NOSIGNAL | if self.more { libc::MSG_MORE } else { 0 }
    }

    /// Hands the socket to tokio: from now on it waits for readiness as any other.
    fn register(&mut self) -> io::Result<&mut TcpStream> {
        if matches!(self.state, State::Direct(_))
            && let State::Direct(socket) = std::mem::replace(&mut self.state, State::Lost)
        {
            self.state = State::Registered(TcpStream::from_std(socket.into())?);
        }
        match &mut self.state {
            State::Registered(stream) => Ok(stream),
            State::Direct(_) | State::Lost => Err(lost()),
        }
    }

    /// One write of `send` (a plain or vectored `send` with the connection's flags);
    /// registers the socket the first time it would block, then waits for it.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        send: impl Fn(SockRef<'_>, libc::c_int) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let flags = self.flags();
        if let State::Direct(socket) = &self.state {
            let budget = ready!(coop::poll_proceed(cx));
            match retry_interrupted(|| send(SockRef::from(socket), flags)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => {
                    budget.made_progress();
                    return Poll::Ready(done);
                }
            }
        }
        let stream = self.register()?;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_io(Interest::WRITABLE, || send(SockRef::from(&*stream), flags)) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection was closed when its registration with the poller failed",
    )
}

fn retry_interrupted<T>(mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            done => return done,
        }
    }
}

impl Cork for ClientSocket {
    fn cork(&mut self) {
        self.more = true;
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Direct(socket) = &this.state {
            let budget = ready!(coop::poll_proceed(cx));
            // SAFETY: `recv` writes initialized bytes only, and only `n` of them are
            // marked filled.
            let unfilled: &mut [MaybeUninit<u8>] = unsafe { buf.unfilled_mut() };
            match retry_interrupted(|| socket.recv(unfilled)) {
                Ok(n) => {
                    // SAFETY: `recv` initialized the first `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    budget.made_progress();
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Pin::new(this.register()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let (State::Registered(stream), false) = (&mut this.state, this.more) {
            return Pin::new(stream).poll_write(cx, data);
        }
        this.poll_send(cx, |socket, flags| socket.send_with_flags(data, flags))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let (State::Registered(stream), false) = (&mut this.state, this.more) {
            return Pin::new(stream).poll_write_vectored(cx, bufs);
        }
        // As std's `writev`: at most `UIO_MAXIOV` slices per call, which Linux allows.
        let bufs = &bufs[..bufs.len().min(MAX_SLICES)];
        this.poll_send(cx, |socket, flags| {
            socket.send_vectored_with_flags(bufs, flags)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.state {
            State::Direct(socket) => Poll::Ready(socket.shutdown(std::net::Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Lost => Poll::Ready(Err(lost())),
        }
    }
}
