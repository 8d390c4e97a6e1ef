//! An echo backend for L7 tests: every request is answered with a JSON description of
//! what arrived (the backend's name, method, URI, headers, body length), so a test can
//! check what a proxy forwarded; a request upgrading to WebSocket gets a WebSocket that
//! echoes every message. A client for that WebSocket is here too.
//!
//! The server runs a current-thread tokio runtime on its own thread, on a listener
//! created inside the namespace; dropping the handle stops it and joins the thread.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::{self, handshake::derive_accept_key, protocol::Role};

use super::netns::Netns;

/// How long one WebSocket connection may stay open on the server.
const WEBSOCKET_LIFETIME: Duration = Duration::from_secs(30);

/// A running echo server; dropping it stops the server.
pub struct EchoServer {
    local_addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the echo server saw, parsed from its answer.
#[derive(Debug, serde::Deserialize)]
pub struct Echo {
    pub name: String,
    pub method: String,
    pub uri: String,
    /// Lower-case header names; repeated headers joined with ", ".
    pub headers: std::collections::BTreeMap<String, String>,
    pub body_bytes: usize,
}

impl Echo {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Runs the echo server named `name` in `ns`, bound to `bind` (HTTP/1.1 and h2c).
pub fn spawn_echo_server(ns: &Netns, bind: SocketAddr, name: &str) -> anyhow::Result<EchoServer> {
    let listener = ns
        .run_in(|| std::net::TcpListener::bind(bind))?
        .with_context(|| format!("binding the echo server {bind} in {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let name = name.to_owned();
    let thread = std::thread::Builder::new()
        .name(format!("echo-{name}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::error!("echo server runtime: {e}");
                    return;
                }
            };
            runtime.block_on(serve(listener, name, stop_rx));
        })
        .context("starting the echo server thread")?;
    Ok(EchoServer {
        local_addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

async fn serve(
    listener: std::net::TcpListener,
    name: String,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
        };
        let name = name.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, name.clone()));
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
    }
    connections.shutdown().await;
}

async fn answer(req: Request<Incoming>, name: String) -> Result<Response<Full<Bytes>>, Infallible> {
    if req
        .headers()
        .get(UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
    {
        return Ok(websocket(req));
    }
    let mut headers = std::collections::BTreeMap::<String, String>::new();
    for (key, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(key.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let method = req.method().to_string();
    let uri = req.uri().to_string();
    let body_bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or_default();
    let body = serde_json::json!({
        "name": name,
        "method": method,
        "uri": uri,
        "headers": headers,
        "body_bytes": body_bytes,
    });
    Ok(Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts"))
}

/// Accepts the upgrade and echoes every text or binary message until the client
/// closes (or the lifetime bound).
fn websocket(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY).cloned() else {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Full::new(Bytes::from_static(b"no Sec-WebSocket-Key\n")))
            .expect("static response parts");
    };
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let _ = tokio::time::timeout(WEBSOCKET_LIFETIME, async {
            while let Some(Ok(message)) = ws.next().await {
                if message.is_text() || message.is_binary() {
                    if ws.send(message).await.is_err() {
                        break;
                    }
                } else if message.is_close() {
                    break;
                }
            }
        })
        .await;
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(CONNECTION, "upgrade")
        .header(UPGRADE, "websocket")
        .header(SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()))
        .body(Full::new(Bytes::new()))
        .expect("static response parts")
}

/// Opens a WebSocket from `ns` to `addr` with `Host: host` and path `path`, sends
/// each message and returns the echoes, within `timeout` per step.
pub fn websocket_echo(
    ns: &Netns,
    addr: SocketAddr,
    host: &str,
    path: &str,
    messages: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    let stream = ns
        .run_in(|| TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("connecting to {addr} from {}", ns.name()))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let url = format!("ws://{host}{path}");
    let (mut socket, response) =
        tungstenite::client(url.as_str(), stream).context("WebSocket handshake")?;
    anyhow::ensure!(
        response.status() == StatusCode::SWITCHING_PROTOCOLS,
        "handshake answered {}",
        response.status()
    );
    let mut echoes = Vec::new();
    for message in messages {
        socket.send(tungstenite::Message::text(*message))?;
        let echo = socket.read().context("reading the echo")?;
        echoes.push(echo.into_text()?.to_string());
    }
    let _ = socket.close(None);
    Ok(echoes)
}
