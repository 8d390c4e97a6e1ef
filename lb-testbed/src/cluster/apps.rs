//! What runs in the pods and the client of the cluster scenarios: a server in every pod
//! that greets each TCP connection and answers each UDP datagram with its pod name and
//! the peer address it saw (`node-1-pod-0 198.51.100.66`), then echoes the TCP stream
//! back (for long-lived connections and bulk transfers), or closes first when a
//! connection sends it [`BYE`]; and the client's side of those exchanges.
//!
//! Servers run a current-thread tokio runtime on their own thread, on sockets made in
//! the pod's namespace; dropping the handle stops them. Every client call has a deadline.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncWriteExt as _;

use crate::netns::Netns;

/// How long one TCP connection may stay open on a pod server.
const CONNECTION_LIFETIME: Duration = Duration::from_mins(2);

/// A read of exactly these bytes makes the pod close the connection first, so that
/// the pod, not the client, keeps it in `TIME_WAIT`. Send it alone, once every echo
/// has come back: bytes read with it are echoed as data.
pub const BYE: &[u8] = b"bye\n";

/// The pod servers of a cluster: TCP and UDP on `[::]:port` in every pod.
pub struct PodServers {
    servers: Vec<PodServer>,
}

impl PodServers {
    /// Starts one server per pod of `cluster`, answering as the pod's name.
    pub fn start(cluster: &super::Cluster, port: u16) -> anyhow::Result<PodServers> {
        let servers = cluster
            .pods()
            .map(|pod| PodServer::start(&pod.ns, port, &pod.name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(PodServers { servers })
    }

    /// TCP connections plus UDP datagrams served, per pod (in the cluster's pod order).
    pub fn served(&self) -> Vec<(String, u64)> {
        self.servers
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.served.load(std::sync::atomic::Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// One pod's server; dropping it stops it and joins its thread.
pub struct PodServer {
    name: String,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PodServer {
    /// Binds TCP and UDP `[::]:port` (both families) in `ns` and serves as `name`.
    pub fn start(ns: &Netns, port: u16, name: &str) -> anyhow::Result<PodServer> {
        let bind = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let (tcp, udp) = ns
            .run_in(|| -> io::Result<_> {
                Ok((std::net::TcpListener::bind(bind)?, UdpSocket::bind(bind)?))
            })?
            .with_context(|| format!("binding {bind} in {}", ns.name()))?;
        tcp.set_nonblocking(true)?;
        udp.set_nonblocking(true)?;
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("pod-{name}"))
            .spawn({
                let name = name.to_owned();
                let served = served.clone();
                move || match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(serve(tcp, udp, name, served, stop_rx)),
                    Err(e) => tracing::error!("pod server runtime: {e}"),
                }
            })
            .context("starting a pod server thread")?;
        Ok(PodServer {
            name: name.to_owned(),
            served,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn greeting(name: &str, peer: SocketAddr) -> String {
    format!("{name} {}\n", peer.ip().to_canonical())
}

async fn serve(
    tcp: std::net::TcpListener,
    udp: UdpSocket,
    name: String,
    served: std::sync::Arc<std::sync::atomic::AtomicU64>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let (Ok(tcp), Ok(udp)) = (
        tokio::net::TcpListener::from_std(tcp),
        tokio::net::UdpSocket::from_std(udp),
    ) else {
        return;
    };
    let mut connections = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = tcp.accept() => {
                let Ok((mut stream, peer)) = accepted else { continue };
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let hello = greeting(&name, peer);
                connections.spawn(async move {
                    let _ = tokio::time::timeout(CONNECTION_LIFETIME, async {
                        stream.write_all(hello.as_bytes()).await?;
                        echo_until_bye(&mut stream).await
                    })
                    .await;
                });
            }
            received = udp.recv_from(&mut buf) => {
                if let Ok((_, peer)) = received {
                    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = udp.send_to(greeting(&name, peer).as_bytes(), peer).await;
                }
            }
        }
    }
    connections.shutdown().await;
}

/// Echoes `stream` until its end (then closes its side), or until a segment that is
/// [`BYE`] (then closes first, and reads to the client's end).
async fn echo_until_bye(stream: &mut tokio::net::TcpStream) -> io::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = vec![0u8; 16_384];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 || &buf[..n] == BYE {
            stream.shutdown().await?;
            while stream.read(&mut buf).await? != 0 {}
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// Who answered and the address it saw the connection come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub peer: IpAddr,
}

impl Answer {
    fn parse(line: &str) -> anyhow::Result<Answer> {
        let mut words = line.split_whitespace();
        let (Some(pod), Some(peer), None) = (words.next(), words.next(), words.next()) else {
            bail!("not a pod greeting: {line:?}");
        };
        Ok(Answer {
            pod: pod.to_owned(),
            peer: peer.parse().with_context(|| format!("peer in {line:?}"))?,
        })
    }
}

/// One TCP connection from `ns` to `addr`: the greeting, then closed.
pub fn ask_tcp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    Answer::parse(&crate::tcp_ask(ns, addr, timeout)?)
}

/// One TCP connection from `ns` to `addr` that the pod closes first: the greeting,
/// [`BYE`], the pod's FIN, then the client's.
pub fn ask_tcp_pod_closes(
    ns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    let mut conn = LongLived::open(ns, addr, timeout)?;
    conn.stream.write_all(BYE)?;
    let mut rest = Vec::new();
    conn.stream
        .read_to_end(&mut rest)
        .with_context(|| format!("waiting for {addr} to close"))?;
    anyhow::ensure!(rest.is_empty(), "{addr} sent {rest:?} after {BYE:?}");
    Ok(conn.answer)
}

/// One UDP datagram from `ns` to `addr` and its answer (no retry: a lost datagram is a
/// failure; replies from another source are not accepted).
pub fn ask_udp(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<Answer> {
    Answer::parse(&crate::udp_ask(ns, None, addr, timeout)?)
}

/// A TCP connection kept open: greeted once, then echoing what it is sent.
#[derive(Debug)]
pub struct LongLived {
    stream: TcpStream,
    pub answer: Answer,
    /// The client's end, for finding the flow's ECMP path.
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl LongLived {
    /// Connects from `ns` and reads the greeting, within `timeout`.
    pub fn open(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<LongLived> {
        let stream = ns
            .run_in(|| TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connecting to {addr} from {}", ns.name()))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let line = read_line(&stream).with_context(|| format!("greeting from {addr}"))?;
        Ok(LongLived {
            local: stream.local_addr()?,
            remote: addr,
            stream,
            answer: Answer::parse(&line)?,
        })
    }

    /// Sends a line and reads its echo.
    pub fn ping(&mut self) -> anyhow::Result<()> {
        let line = format!("ping from {}\n", self.local);
        self.stream.write_all(line.as_bytes())?;
        let echo = read_line(&self.stream)?;
        anyhow::ensure!(echo == line.trim_end(), "echo {echo:?} for {line:?}");
        Ok(())
    }
}

/// Reads up to and without the first newline (at most 4 KiB).
fn read_line(mut stream: &TcpStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        match stream.read(&mut byte) {
            Ok(0) => bail!("connection closed after {} bytes", line.len()),
            Ok(_) if byte[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading a line"),
        }
    }
    bail!("no newline in 4096 bytes")
}

/// What a bulk transfer saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub answer: Answer,
    /// The path MTU the client's socket knew at the end (`IP_MTU` / `IPV6_MTU`): lower
    /// than its link's when an ICMP error taught it.
    pub path_mtu: u32,
}

/// Sends `bytes` bytes over a new TCP connection from `ns` to `addr` and reads them
/// back (the pod echoes them), within `timeout`.
pub fn transfer(
    ns: &Netns,
    addr: SocketAddr,
    bytes: usize,
    timeout: Duration,
) -> anyhow::Result<Transfer> {
    let started = Instant::now();
    let conn = LongLived::open(ns, addr, timeout)?;
    let data: Vec<u8> = (0..bytes)
        .map(|i| u8::try_from(i % 251).expect("under 251"))
        .collect();
    let mut writer = conn.stream.try_clone()?;
    let sent = data.clone();
    let write = std::thread::spawn(move || -> io::Result<()> {
        writer.write_all(&sent)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut back = Vec::with_capacity(bytes);
    let mut reader = &conn.stream;
    let mut buf = [0u8; 16_384];
    while back.len() < bytes {
        anyhow::ensure!(
            started.elapsed() < timeout,
            "transfer to {addr}: {} of {bytes} bytes back within {timeout:?}",
            back.len()
        );
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => back.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "transfer to {addr}: after {} of {bytes} bytes back",
                        back.len()
                    )
                });
            }
        }
    }
    write
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?
        .with_context(|| format!("transfer to {addr}: sending"))?;
    anyhow::ensure!(
        back == data,
        "transfer to {addr}: {} bytes came back, {} sent, or they differ",
        back.len(),
        data.len()
    );
    let (level, name) = mtu_option(addr);
    let path_mtu = u32::try_from(get_int(&conn.stream, level, name)?).unwrap_or(0);
    Ok(Transfer {
        answer: conn.answer,
        path_mtu,
    })
}

/// The socket option reading a connected socket's path MTU: (level, name).
fn mtu_option(addr: SocketAddr) -> (i32, i32) {
    if addr.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    }
}

/// What a UDP datagram too big for the path brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtuProbe {
    /// The socket reported `EMSGSIZE`: an ICMP "fragmentation needed" / "packet too
    /// big" about the datagram reached it.
    pub icmp_error: bool,
    /// The path MTU the socket knows afterwards (`IP_MTU` / `IPV6_MTU`).
    pub path_mtu: u32,
}

/// Sends one `size`-byte datagram from `ns` to `addr` with "don't fragment" and waits up
/// to `timeout` for what comes back: an ICMP error (reported as `EMSGSIZE` on the
/// connected socket) or an answer.
pub fn udp_mtu_probe(
    ns: &Netns,
    addr: SocketAddr,
    size: usize,
    timeout: Duration,
) -> anyhow::Result<MtuProbe> {
    ns.run_in(|| -> anyhow::Result<MtuProbe> {
        let local: SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local)?;
        socket.connect(addr)?;
        let (level, discover, do_, mtu_opt) = if addr.is_ipv4() {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DO,
                libc::IP_MTU,
            )
        } else {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DO,
                libc::IPV6_MTU,
            )
        };
        set_int(&socket, level, discover, do_)?;
        socket.send(&vec![b'x'; size])?;
        socket.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 2048];
        let icmp_error = match socket.recv(&mut buf) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => true,
            Ok(_) => false,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => return Err(e).context("waiting for the probe's answer"),
        };
        let path_mtu = u32::try_from(get_int(&socket, level, mtu_opt)?).unwrap_or(0);
        Ok(MtuProbe {
            icmp_error,
            path_mtu,
        })
    })?
    .with_context(|| format!("MTU probe of {size} bytes to {addr} from {}", ns.name()))
}

/// The length of a `c_int` socket option.
const INT_LEN: libc::socklen_t = 4;

fn set_int(socket: &impl AsRawFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid socket and a c_int option value of the stated length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            INT_LEN,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get_int(socket: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = INT_LEN;
    // SAFETY: a valid socket, and a c_int buffer whose length is passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_parse() {
        let peer: SocketAddr = "[::ffff:198.51.100.2]:4000".parse().unwrap();
        let line = greeting("node-0-pod-1", peer);
        assert_eq!(line, "node-0-pod-1 198.51.100.2\n");
        let answer = Answer::parse(line.trim_end()).unwrap();
        assert_eq!(answer.peer, "198.51.100.2".parse::<IpAddr>().unwrap());
        assert!(Answer::parse("just-a-name").is_err());
    }
}
