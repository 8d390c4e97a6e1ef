//! The answer that closes a connection: its last bytes and the FIN leave in one
//! segment (`l7::cork`), over plain TCP and TLS, as the segments on the namespace's
//! `lo` show.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use super::*;

/// One TCP segment seen on `lo`.
#[derive(Debug)]
struct Segment {
    from: SocketAddr,
    to: SocketAddr,
    fin: bool,
    payload: usize,
}

/// A packet socket on the namespace's `lo` (`AF_PACKET`): every frame from its opening.
struct Capture(OwnedFd);

/// `ETH_P_ALL` in network order, as `AF_PACKET` takes it.
fn every_protocol() -> u16 {
    u16::try_from(libc::ETH_P_ALL).unwrap().to_be()
}

fn socklen<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap()
}

impl Capture {
    fn open() -> Capture {
        let all = i32::from(every_protocol());
        // SAFETY: plain socket(2); the descriptor is owned from here on.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                all,
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just opened and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields set below make it `lo`.
        let mut at: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        at.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        at.sll_protocol = every_protocol();
        // SAFETY: a NUL-terminated name.
        at.sll_ifindex = i32::try_from(unsafe { libc::if_nametoindex(c"lo".as_ptr()) }).unwrap();
        assert!(at.sll_ifindex > 0, "no lo in the namespace");
        // SAFETY: `at` is a sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&at).cast(),
                socklen::<libc::sockaddr_ll>(),
            )
        };
        assert_eq!(rc, 0, "bind to lo: {}", std::io::Error::last_os_error());
        Capture(fd)
    }

    /// The TCP segments captured so far, in order. `lo` shows each frame twice (sent,
    /// then received): only the received copy counts.
    fn segments(&self) -> Vec<Segment> {
        let mut segments = Vec::new();
        let mut frame = vec![0u8; 70_000];
        loop {
            // SAFETY: an all-zero sockaddr_ll is valid for recvfrom to fill.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = socklen::<libc::sockaddr_ll>();
            // SAFETY: `frame` and `from` are valid for the sizes given.
            let n = unsafe {
                libc::recvfrom(
                    self.0.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::from_mut(&mut from).cast(),
                    std::ptr::from_mut(&mut len),
                )
            };
            let Ok(n) = usize::try_from(n) else {
                break;
            };
            if i32::from(from.sll_pkttype) == i32::from(libc::PACKET_OUTGOING) {
                continue;
            }
            let Ok(packet) = SlicedPacket::from_ethernet(&frame[..n]) else {
                continue;
            };
            let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                (&packet.net, &packet.transport)
            else {
                continue;
            };
            let header = ip.header();
            segments.push(Segment {
                from: SocketAddr::from((header.source_addr(), tcp.source_port())),
                to: SocketAddr::from((header.destination_addr(), tcp.destination_port())),
                fin: tcp.fin(),
                payload: tcp.payload().len(),
            });
        }
        segments
    }
}

/// Asserts that the proxy's last segment to `client` carries both the FIN and bytes
/// (the end of the answer), and that it sent one FIN.
fn fin_rides_with_the_answer(capture: &Capture, client: SocketAddr, proxy: SocketAddr) {
    let sent: Vec<Segment> = capture
        .segments()
        .into_iter()
        .filter(|s| s.from == proxy && s.to == client)
        .collect();
    let fins = sent.iter().filter(|s| s.fin).count();
    assert_eq!(fins, 1, "one FIN from the proxy: {sent:?}");
    let last = sent.iter().rfind(|s| s.fin || s.payload > 0).unwrap();
    assert!(
        last.fin && last.payload > 0,
        "the FIN left alone, after the answer: {sent:?}"
    );
}

#[test]
fn the_answer_that_closes_leaves_with_the_fin() {
    in_netns("cork", || async {
        let (_a, p, _release) = proxy_to_a(test_config()).await;
        let capture = Capture::open();

        // Plain HTTP: a keep-alive answer first (not corked: it must not wait), then
        // the one that asks to close.
        let mut stream = connect(p.http).await;
        let client = stream.local_addr().unwrap();
        stream
            .write_all(b"GET /one HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK\r\n"));
        stream
            .write_all(b"GET /two HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert_eq!(echoed(&out, "request").as_deref(), Some("GET /two"));
        fin_rides_with_the_answer(&capture, client, p.http);

        // TLS: the last record and the close_notify leave with the FIN.
        let mut tls = tls_connect(p.https, "a.example", &[]).await;
        let client = tls.get_ref().0.local_addr().unwrap();
        tls.write_all(b"GET /three HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tls.read_to_end(&mut out).await.unwrap();
        let out = String::from_utf8_lossy(&out);
        assert_eq!(echoed(&out, "request").as_deref(), Some("GET /three"));
        fin_rides_with_the_answer(&capture, client, p.https);
    });
}

#[test]
fn the_answer_that_closes_survives_client_bytes_left_unread() {
    in_netns("corkrst", || async {
        let (a, p, release) = proxy_to_a(test_config()).await;
        let mut stream = connect(p.http).await;
        stream
            .write_all(b"GET /hold HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        wait_until("the request reaches the backend", || {
            a.holding.load(Ordering::Relaxed) == 1
        })
        .await;
        // A pipelined request while the hop waits for the backend: it is never read (the
        // connection closes after this answer), so the socket's close sends a reset.
        // The answer must have left before it.
        stream
            .write_all(b"GET /next HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .await
            .unwrap();
        release.send_replace(true);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n"),
            "the answer was lost: {out:?}"
        );
        assert_eq!(echoed(&out, "request").as_deref(), Some("GET /hold"));
    });
}
