//! `ssl-passthrough` (with `--l7-enable-ssl-passthrough`, as ingress-nginx's
//! `--enable-ssl-passthrough`): on the HTTPS listener the ClientHello is read (not
//! answered) and its SNI looked up; TLS for a passthrough host is spliced to an endpoint
//! of the host's `/` backend byte for byte, so the backend terminates it and the hop
//! never holds its key. Anything else (other names, no SNI, not TLS) continues to the
//! hop's own TLS termination with the bytes already read put back in front.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::Shared;
use crate::l7::Snapshot;
use crate::l7::client_socket::ClientSocket;
use crate::l7::read_ahead::ReadAhead;
use crate::l7::routes::{Balance, Target, Upstream};

/// A ClientHello larger than this is not looked into (it goes on to termination).
const MAX_HELLO: usize = 64 * 1024;

/// What became of a connection on the HTTPS listener.
pub enum Diverted {
    /// Passed through (or dropped): nothing more to do.
    Done,
    /// Not a passthrough name: terminate TLS here, from the bytes already read.
    Terminate(ReadAhead<ClientSocket>),
}

/// Reads the ClientHello within `header_timeout` and passes the connection through
/// when its SNI names a passthrough host.
pub async fn divert(
    mut stream: ClientSocket,
    peer: SocketAddr,
    shared: &Shared,
    snapshot: &Snapshot,
) -> Diverted {
    let hello = tokio::time::timeout(shared.config.header_timeout, read_hello(&mut stream));
    let (read, sni) = match hello.await {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            tracing::debug!("TLS ClientHello from {peer}: {e}");
            shared.metrics.closed("tls_handshake");
            return Diverted::Done;
        }
        Err(_) => {
            shared.metrics.closed("tls_handshake_timeout");
            return Diverted::Done;
        }
    };
    let upstream = sni
        .as_deref()
        .and_then(|sni| snapshot.routes.passthrough(sni));
    match upstream {
        Some(upstream) => {
            splice(stream, read, peer, upstream, shared).await;
            Diverted::Done
        }
        None => Diverted::Terminate(ReadAhead::with_read(stream, read)),
    }
}

/// The bytes read until rustls has a whole ClientHello (or gives up on it), and the
/// SNI name if there is one; EOF before that is an error.
async fn read_hello(stream: &mut ClientSocket) -> io::Result<(Vec<u8>, Option<String>)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut read = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before the ClientHello",
            ));
        }
        read.extend_from_slice(&chunk[..n]);
        let mut fresh = &chunk[..n];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let sni = accepted.client_hello().server_name().map(str::to_owned);
                return Ok((read, sni));
            }
            Ok(None) if read.len() < MAX_HELLO => {}
            // Not TLS, or a hello we do not read: termination answers it.
            Ok(None) | Err(_) => return Ok((read, None)),
        }
    }
}

/// Connects to an endpoint of `upstream` (one retry on another after a connect
/// failure, as for HTTP) and copies bytes both ways until either side closes.
async fn splice(
    client: ClientSocket,
    hello: Vec<u8>,
    peer: SocketAddr,
    upstream: &Upstream,
    shared: &Shared,
) {
    let endpoints = match &upstream.target {
        Target::Endpoints(endpoints) => endpoints.clone(),
        Target::Dns { host, port } => match shared.dns.resolve(host, *port).await {
            Ok(addrs) => addrs.to_vec(),
            Err(e) => {
                tracing::warn!("passthrough upstream {}: {e}", upstream.name);
                shared.metrics.upstream_error("dns");
                return;
            }
        },
    };
    let mut refused = Vec::new();
    let backend = loop {
        let Some((addr, in_flight)) =
            shared
                .balancer
                .pick(&upstream.name, &endpoints, Balance::RoundRobin, &refused)
        else {
            tracing::debug!("passthrough for {peer}: no endpoint of {}", upstream.name);
            return;
        };
        let connect = TcpStream::connect(addr);
        match tokio::time::timeout(shared.config.connect_timeout, connect).await {
            Ok(Ok(stream)) => {
                in_flight.connected();
                break (stream, in_flight);
            }
            outcome => {
                let reason = if outcome.is_err() {
                    "connect_timeout"
                } else {
                    "connect"
                };
                shared.metrics.upstream_error(reason);
                if in_flight.connect_failed(&endpoints) {
                    shared.metrics.ejected();
                }
                refused.push(addr);
                if refused.len() > 1 {
                    return;
                }
            }
        }
    };
    let (mut backend, _in_flight) = backend;
    let _ = backend.set_nodelay(true);
    let mut client = client;
    if let Err(e) = backend.write_all(&hello).await {
        tracing::debug!("passthrough for {peer}: {e}");
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!("passthrough for {peer}: {e}");
    }
}
