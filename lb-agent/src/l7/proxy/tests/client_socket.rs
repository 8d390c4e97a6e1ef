//! Client sockets registered with the poller only once they have to wait
//! (`l7::client_socket`): what a connection answered at once, one that waits to read,
//! and one whose write fills the socket each do, on real sockets in the namespace.

use crate::l7::client_socket::{Acceptor, ClientSocket};
use crate::l7::cork::Cork;

use super::*;

/// A listener as the hop's (`TCP_DEFER_ACCEPT` included), a client connected to it
/// that has sent `first`, and the hop's side of the connection.
async fn accepted(first: &[u8]) -> (TcpStream, ClientSocket) {
    let listener =
        super::super::listen(SocketAddr::new(PROXY_IP.into(), 0), 16, false).expect("listen");
    let acceptor = Acceptor::new(listener).expect("register the listener");
    let mut client = TcpStream::connect(acceptor.local_addr().unwrap())
        .await
        .expect("connect");
    client.write_all(first).await.unwrap();
    let (server, peer) = acceptor.accept().await.expect("accept");
    assert_eq!(peer, client.local_addr().unwrap());
    (client, server)
}

async fn read_to_end(client: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got))
        .await
        .expect("the server's end")
        .expect("read");
    got
}

#[test]
fn a_request_answered_at_once_never_registers_its_socket() {
    in_netns("sock-direct", || async {
        let (mut client, mut server) = accepted(b"GET / HTTP/1.1\r\n\r\n").await;
        let mut request = [0u8; 64];
        let n = server.read(&mut request).await.unwrap();
        assert_eq!(&request[..n], b"GET / HTTP/1.1\r\n\r\n");
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        server.cork();
        server
            .write_all(b"Connection: close\r\n\r\n")
            .await
            .unwrap();
        server.shutdown().await.unwrap();
        // The shutdown, not a close, releases the corked bytes: the socket stays open.
        assert_eq!(
            read_to_end(&mut client).await,
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
        );
        assert!(!server.is_registered(), "registered without ever waiting");
    });
}

#[test]
fn a_read_that_would_block_registers_and_waits_for_the_bytes() {
    in_netns("sock-read", || async {
        let (mut client, mut server) = accepted(b"one").await;
        let mut buf = [0u8; 16];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one");
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b"two").await.unwrap();
            client
        });
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("woken by the late bytes")
            .unwrap();
        assert_eq!(&buf[..n], b"two");
        assert!(server.is_registered());
        let mut client = late.await.unwrap();
        // Registered, corked writes still leave, with the FIN at the shutdown.
        server.cork();
        server.write_all(b"answer").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(read_to_end(&mut client).await, b"answer");
    });
}

#[test]
fn a_write_that_fills_the_socket_registers_and_finishes_once_read() {
    in_netns("sock-write", || async {
        let (mut client, mut server) = accepted(b"GET").await;
        let mut buf = [0u8; 3];
        server.read_exact(&mut buf).await.unwrap();
        // More than the socket and the client's receive buffer hold while the client
        // does not read: a write must wait.
        let big: Vec<u8> = (0..32u32 << 20)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            server.write_all(&big).await.unwrap();
            assert!(server.is_registered(), "never had to wait");
            server.shutdown().await.unwrap();
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!writer.is_finished(), "32 MiB written without a reader");
        let got = read_to_end(&mut client).await;
        writer.await.unwrap();
        assert!(
            got == expected,
            "{} bytes of {} arrived, or others",
            got.len(),
            expected.len()
        );
    });
}

#[test]
fn a_client_whose_bytes_never_run_out_lets_other_tasks_run() {
    in_netns("sock-budget", || async {
        let (_client, mut server) = accepted(&[b'x'; 1000]).await;
        let other_ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = Arc::clone(&other_ran);
        tokio::spawn(async move { other.store(true, Ordering::Relaxed) });
        // A byte at a time, all of them already there: no read ever waits, but the
        // task's budget runs out and it yields to the other task on the way. The
        // runtime is single-threaded, as the hop's workers are: the other task can
        // run only when this one yields.
        let mut seen_at = None;
        for i in 0..1000 {
            let mut byte = [0u8; 1];
            assert_eq!(server.read(&mut byte).await.unwrap(), 1);
            if seen_at.is_none() && other_ran.load(Ordering::Relaxed) {
                seen_at = Some(i);
            }
        }
        assert!(!server.is_registered(), "a read waited");
        assert!(seen_at.is_some(), "1000 reads without a yield");
    });
}
