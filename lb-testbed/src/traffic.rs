//! Small, bounded traffic helpers: name servers in backend namespaces and
//! one-shot clients that ask them who they are.
//!
//! Everything runs in-process (no external binaries). Sockets are created
//! on a thread that has entered the namespace (namespaces are per thread,
//! and a socket keeps the namespace it was created in), then used anywhere.
//! Every wait has a deadline and every loop stops by itself.

use std::io::{self, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::netns::Netns;

/// How often a server notices that its handle was dropped.
pub(super) const STOP_POLL: Duration = Duration::from_millis(50);

/// A server's deadline for writing its reply to one client, so a stuck
/// client cannot stall it.
pub(super) const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes a client reads as a reply.
const MAX_REPLY: usize = 4096;

/// Most connections a TCP server accepts before looking at its stop flag.
pub(super) const ACCEPT_BATCH: usize = 256;

/// A running server; dropping it stops the server and joins its thread
/// (within about 50 ms).
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    state: Arc<ServerState>,
    thread: Option<JoinHandle<()>>,
}

/// What a server thread shares with its handle.
#[derive(Debug, Default)]
pub(super) struct ServerState {
    /// Set when the handle is dropped.
    pub(super) stop: AtomicBool,
    /// Replies sent (see [`ServerHandle::served`]).
    pub(super) served: AtomicU64,
    /// TCP connections taken on (see [`ServerHandle::accepted`]).
    pub(super) accepted: AtomicU64,
    /// The server thread's kernel thread id (see [`ServerHandle::cpu_time`]).
    tid: AtomicI32,
}

impl ServerState {
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

impl ServerHandle {
    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections (TCP), datagrams (UDP) or `GET` requests (HTTP) answered
    /// so far, e.g. to check how a load balancer spread its flows. Counted
    /// before the reply is sent, so a client that has its reply is already
    /// included.
    pub fn served(&self) -> u64 {
        self.state.served.load(Ordering::Relaxed)
    }

    /// TCP connections accepted and served so far (always 0 for UDP). With
    /// HTTP keep-alive this is lower than [`ServerHandle::served`].
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// CPU time the server's thread has used so far (every server serves on
    /// one thread), from `/proc/self/task/TID/schedstat`; zero once it has
    /// ended. Benchmarks use it to tell whether the servers were the
    /// bottleneck.
    pub fn cpu_time(&self) -> Duration {
        let tid = self.state.tid.load(Ordering::Relaxed);
        std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_nanos)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::warn!(addr = %self.local_addr, "server thread panicked");
        }
    }
}

/// Runs a TCP server in `ns`, bound to `bind`, that answers every connection
/// with `name` and a newline (e.g. `"backend-0\n"`) and then closes it. It
/// serves on its own thread until the handle is dropped.
///
/// Binding `[::]:port` accepts IPv4 and IPv6.
pub fn spawn_tcp_name_server(
    ns: &Netns,
    bind: SocketAddr,
    name: &str,
) -> anyhow::Result<ServerHandle> {
    let reply = format!("{name}\n").into_bytes();
    spawn_tcp_server(ns, bind, move |_| reply.clone())
}

/// Like [`spawn_tcp_name_server`], but the answer also names the address the
/// connection came from (`"backend-0 198.51.100.2\n"`), so a test sees whether
/// the client's source address reached the backend.
pub fn spawn_tcp_peer_server(
    ns: &Netns,
    bind: SocketAddr,
    name: &str,
) -> anyhow::Result<ServerHandle> {
    let name = name.to_owned();
    spawn_tcp_server(ns, bind, move |peer| {
        format!("{name} {}\n", peer.ip().to_canonical()).into_bytes()
    })
}

/// A TCP server in `ns` answering each connection with `reply(peer)`, then closing it.
fn spawn_tcp_server(
    ns: &Netns,
    bind: SocketAddr,
    reply: impl Fn(SocketAddr) -> Vec<u8> + Send + 'static,
) -> anyhow::Result<ServerHandle> {
    let listener = ns
        .run_in(|| TcpListener::bind(bind))?
        .with_context(|| format!("cannot bind TCP {bind} in netns {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    spawn_server(local_addr, "tcp", None, move |state| {
        serve_tcp(&listener, reply, state);
    })
}

/// Starts [`spawn_tcp_peer_server`]s answering `backend-<i>` on the IPv4
/// addresses of the topology's first `count` backends at `port`.
pub fn spawn_backend_peer_servers(
    topo: &super::Topology,
    count: usize,
    port: u16,
) -> anyhow::Result<Vec<ServerHandle>> {
    (0..count)
        .map(|i| {
            spawn_tcp_peer_server(
                &topo.backends[i],
                SocketAddr::new(IpAddr::V4(super::Topology::backend_v4(i)), port),
                &format!("backend-{i}"),
            )
        })
        .collect()
}

/// Runs a UDP server in `ns`, bound to `bind`, that answers every datagram
/// with `name` and a newline, sent back to the datagram's source. It serves
/// on its own thread until the handle is dropped.
pub fn spawn_udp_name_server(
    ns: &Netns,
    bind: SocketAddr,
    name: &str,
) -> anyhow::Result<ServerHandle> {
    let socket = ns
        .run_in(|| UdpSocket::bind(bind))?
        .with_context(|| format!("cannot bind UDP {bind} in netns {}", ns.name()))?;
    socket.set_read_timeout(Some(STOP_POLL))?;
    let local_addr = socket.local_addr()?;
    let reply = format!("{name}\n").into_bytes();
    spawn_server(local_addr, "udp", None, move |state| {
        serve_udp(&socket, &reply, state);
    })
}

/// Runs `serve` on a new thread (pinned to `cpu` when given) until it
/// returns; it must return soon after the handle sets `state.stop`.
pub(super) fn spawn_server(
    local_addr: SocketAddr,
    proto: &str,
    cpu: Option<usize>,
    serve: impl FnOnce(&ServerState) + Send + 'static,
) -> anyhow::Result<ServerHandle> {
    let state = Arc::new(ServerState::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("{proto}-name-{}", local_addr.port()))
        .spawn({
            let state = Arc::clone(&state);
            move || {
                // SAFETY: gettid has no preconditions.
                state
                    .tid
                    .store(unsafe { libc::gettid() }, Ordering::Relaxed);
                let pinned = cpu.map_or(Ok(()), pin_current_thread);
                let failed = pinned.is_err();
                // The receiver waits for this message; it cannot be gone yet.
                let _ = ready_tx.send(pinned);
                if !failed {
                    serve(&state);
                }
            }
        })
        .context("cannot start a server thread")?;
    let handle = ServerHandle {
        local_addr,
        state,
        thread: Some(thread),
    };
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the server thread did not start")??;
    Ok(handle)
}

/// Pins the calling thread to one CPU (the servers here, the benchmarks' load
/// generators).
pub fn pin_current_thread(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; CPU_SET writes inside it and
    // sched_setaffinity(0, ...) reads it for the calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc != 0 {
        bail!(
            "cannot pin a thread to CPU {cpu}: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

fn serve_tcp(listener: &TcpListener, reply: impl Fn(SocketAddr) -> Vec<u8>, state: &ServerState) {
    while !state.stopping() {
        if let Err(e) = wait_readable(listener, STOP_POLL) {
            tracing::warn!(error = %e, "poll on name server failed");
            std::thread::sleep(STOP_POLL);
            continue;
        }
        for _ in 0..ACCEPT_BATCH {
            match listener.accept() {
                Ok((stream, peer)) => {
                    state.accepted.fetch_add(1, Ordering::Relaxed);
                    state.served.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = answer_tcp(stream, &reply(peer)) {
                        tracing::debug!(%peer, error = %e, "could not answer");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // E.g. ECONNABORTED: the client gave up; keep serving.
                    tracing::debug!(error = %e, "accept failed");
                    break;
                }
            }
        }
    }
}

fn answer_tcp(mut stream: TcpStream, reply: &[u8]) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
    stream.write_all(reply)?;
    stream.shutdown(Shutdown::Write)
}

/// Waits until `listener` has a connection to accept or `timeout` passes.
pub(super) fn wait_readable(listener: &TcpListener, timeout: Duration) -> io::Result<()> {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is one valid pollfd for the duration of the call and the
    // listener's descriptor stays open while we borrow it.
    let rc = unsafe { libc::poll(&raw mut fd, 1, ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn serve_udp(socket: &UdpSocket, reply: &[u8], state: &ServerState) {
    let mut buf = [0u8; 2048];
    while !state.stopping() {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                state.served.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = socket.send_to(reply, peer) {
                    tracing::debug!(%peer, error = %e, "could not answer");
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                // E.g. a queued ICMP error from an earlier reply.
                tracing::debug!(error = %e, "recv failed");
            }
        }
    }
}

/// From `ns`, connects to `addr`, reads the reply line and returns it
/// without the newline. The whole exchange must finish within `timeout`.
pub fn tcp_ask(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let deadline = deadline_after(timeout)?;
    ns.run_in(|| -> anyhow::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 512];
        while !reply.contains(&b'\n') && reply.len() < MAX_REPLY {
            stream.set_read_timeout(Some(remaining(deadline)?))?;
            let n = stream.read(&mut buf).map_err(timeout_error)?;
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        reply_line(&reply)
    })
    .and_then(|reply| reply)
    .with_context(|| {
        format!(
            "tcp_ask {addr} from netns {} (timeout {timeout:?})",
            ns.name()
        )
    })
}

/// From `ns`, sends one datagram to `addr` (from `local_port`, or an
/// ephemeral port) and returns the first reply line from `addr`, without the
/// newline. Sends exactly once (no retries, so a lost packet is visible as
/// a timeout); replies from other sources are ignored (the socket is
/// connected), so a reply that was not translated back fails the ask.
pub fn udp_ask(
    ns: &Netns,
    local_port: Option<u16>,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = deadline_after(timeout)?;
    let port = local_port.unwrap_or(0);
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, port).into(),
    };
    ns.run_in(|| -> anyhow::Result<String> {
        let socket = UdpSocket::bind(local).with_context(|| format!("cannot bind {local}"))?;
        socket.connect(addr)?;
        socket.send(b"who?\n")?;
        let mut buf = [0u8; MAX_REPLY];
        socket.set_read_timeout(Some(remaining(deadline)?))?;
        let n = socket.recv(&mut buf).map_err(timeout_error)?;
        reply_line(&buf[..n])
    })
    .and_then(|reply| reply)
    .with_context(|| {
        format!(
            "udp_ask {addr} from netns {} (timeout {timeout:?})",
            ns.name()
        )
    })
}

/// How a connection attempt or an exchange ended, as the client's socket saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected (TCP), or the reply's first line (UDP).
    Answered(String),
    /// Refused: a TCP reset, or (UDP) an ICMP port unreachable (`ECONNREFUSED`).
    Refused,
    /// Nothing came back within the timeout.
    TimedOut,
    /// Any other error, as text.
    Failed(String),
}

impl Outcome {
    fn of(e: &io::Error) -> Outcome {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Outcome::Refused,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Outcome::TimedOut,
            _ => Outcome::Failed(e.to_string()),
        }
    }
}

/// Opens (and closes) a TCP connection from `ns` to `addr`, from the local address
/// `from` when given (a second address of the namespace), waiting at most `timeout`.
/// `Err` only when the attempt could not be made at all.
pub fn tcp_connect(
    ns: &Netns,
    from: Option<IpAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    ns.run_in(|| -> anyhow::Result<Outcome> {
        // tokio's socket binds before it connects, which std's cannot.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(ip) = from {
                socket
                    .bind(SocketAddr::new(ip, 0))
                    .with_context(|| format!("cannot bind {ip}"))?;
            }
            Ok(
                match tokio::time::timeout(timeout, socket.connect(addr)).await {
                    Ok(Ok(stream)) => Outcome::Answered(stream.local_addr()?.to_string()),
                    Ok(Err(e)) => Outcome::of(&e),
                    Err(_) => Outcome::TimedOut,
                },
            )
        })
    })
    .and_then(|outcome| outcome)
    .with_context(|| format!("tcp_connect {addr} from netns {}", ns.name()))
}

/// Sends one datagram to `addr` from a connected UDP socket in `ns` (bound to `from`
/// when given) and waits at most `timeout` for the answer: a connected socket reports
/// an ICMP port unreachable as `ECONNREFUSED`.
pub fn udp_exchange(
    ns: &Netns,
    from: Option<IpAddr>,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let local = from.unwrap_or(match addr {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    });
    ns.run_in(|| -> anyhow::Result<Outcome> {
        let socket = UdpSocket::bind(SocketAddr::new(local, 0))
            .with_context(|| format!("cannot bind {local}"))?;
        socket.connect(addr)?;
        socket.send(b"who?\n")?;
        socket.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; MAX_REPLY];
        Ok(match socket.recv(&mut buf) {
            Ok(n) => Outcome::Answered(reply_line(&buf[..n])?),
            Err(e) => Outcome::of(&e),
        })
    })
    .and_then(|outcome| outcome)
    .with_context(|| format!("udp_exchange {addr} from netns {}", ns.name()))
}

pub(super) fn deadline_after(timeout: Duration) -> anyhow::Result<Instant> {
    if timeout.is_zero() {
        bail!("timeout must be positive");
    }
    Ok(Instant::now() + timeout)
}

pub(super) fn remaining(deadline: Instant) -> anyhow::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        bail!("timed out");
    }
    Ok(left)
}

/// Names the socket timeout plainly (Linux reports it as EAGAIN).
pub(super) fn timeout_error(e: io::Error) -> anyhow::Error {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        anyhow::anyhow!("timed out waiting for a reply")
    } else {
        e.into()
    }
}

fn reply_line(reply: &[u8]) -> anyhow::Result<String> {
    let text = String::from_utf8_lossy(reply);
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        bail!("no reply (got {} bytes)", reply.len());
    }
    Ok(line.to_owned())
}
