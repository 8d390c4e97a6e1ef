//! The admin HTTP endpoint: `/healthz` (liveness: the agent's loops are running),
//! `/readyz` (ready once the first complete desired state is in the maps, so a
//! DaemonSet rolling update waits for it) and `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// What the agent's loops report; read by the admin endpoint.
pub struct AgentState {
    ready: Gauge<i64, AtomicI64>,
    /// Parts that must be ready before the agent is: [`PART_DATAPLANE`], [`PART_L7`].
    pending: AtomicU8,
    pub services: Gauge<i64, AtomicI64>,
    pub map_writes: Counter<u64, AtomicU64>,
    pub map_write_errors: Counter<u64, AtomicU64>,
    pub rejected_objects: Counter<u64, AtomicU64>,
    pub applies: Counter<u64, AtomicU64>,
    registry: Registry,
}

/// The maps hold the first complete state.
pub const PART_DATAPLANE: u8 = 1;
/// The L7 hop serves the first complete routing table.
pub const PART_L7: u8 = 2;

impl AgentState {
    /// An agent that is ready once the data plane is.
    pub fn new() -> Arc<Self> {
        Self::with_parts(PART_DATAPLANE, |_| Ok(()))
            .expect("registering nothing cannot fail")
            .0
    }

    /// An agent that is ready once every part in `parts` is; `register` adds the
    /// metrics of other components (the L7 hop) to the same registry.
    pub fn with_parts<T>(
        parts: u8,
        register: impl FnOnce(&mut Registry) -> anyhow::Result<T>,
    ) -> anyhow::Result<(Arc<Self>, T)> {
        let services = Gauge::<i64, AtomicI64>::default();
        let map_writes = Counter::<u64, AtomicU64>::default();
        let map_write_errors = Counter::<u64, AtomicU64>::default();
        let rejected_objects = Counter::<u64, AtomicU64>::default();
        let applies = Counter::<u64, AtomicU64>::default();
        let ready = Gauge::<i64, AtomicI64>::default();
        let mut registry = Registry::with_prefix("xlb");
        registry.register(
            "ready",
            "1 once the first complete state is in the maps",
            ready.clone(),
        );
        registry.register(
            "services",
            "Services (per port, family and traffic policy) in the desired state",
            services.clone(),
        );
        registry.register(
            "map_writes",
            "Map writes the agent performed",
            map_writes.clone(),
        );
        registry.register(
            "map_write_errors",
            "Map writes that failed (retried)",
            map_write_errors.clone(),
        );
        registry.register(
            "rejected_objects",
            "Config entries or Kubernetes object fields rejected as invalid",
            rejected_objects.clone(),
        );
        registry.register(
            "applies",
            "Desired states planned and applied to the maps",
            applies.clone(),
        );
        let extra = register(&mut registry)?;
        let state = Arc::new(AgentState {
            ready,
            pending: AtomicU8::new(parts),
            services,
            map_writes,
            map_write_errors,
            rejected_objects,
            applies,
            registry,
        });
        Ok((state, extra))
    }

    /// The maps hold the first complete state.
    pub fn set_ready(&self) {
        self.part_ready(PART_DATAPLANE);
    }

    /// One part is ready; the agent is when none is pending.
    pub fn part_ready(&self, part: u8) {
        if self.pending.fetch_and(!part, Ordering::AcqRel) & !part == 0 {
            self.ready.set(1);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Binds the admin address (failing at start-up, before anything is attached, when
/// it is taken) and serves it until the task is dropped.
pub async fn start(
    addr: SocketAddr,
    state: Arc<AgentState>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin address {addr} (--admin)"))?;
    Ok(tokio::spawn(serve(
        listener,
        move |req: &Request<hyper::body::Incoming>| respond(&state, req.uri().path()),
    )))
}

fn respond(state: &AgentState, path: &str) -> Response<Full<Bytes>> {
    match path {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if state.is_ready() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for the first complete state to reach the maps\n".into(),
                )
            }
        }
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

pub(crate) fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// How long a client may take to send a request head: a half-sent request does not
/// hold a connection open for longer.
pub(crate) const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A small HTTP/1.1 server: every connection on its own task, answered by `handler`.
pub(crate) async fn serve<F>(listener: TcpListener, handler: F)
where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    serve_with(listener, HEADER_READ_TIMEOUT, handler).await;
}

/// [`serve`], closing connections whose request head takes longer than `header_timeout`.
pub(crate) async fn serve_with<F>(
    listener: TcpListener,
    header_timeout: std::time::Duration,
    handler: F,
) where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let response = handler(&req);
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lb_testbed::{Netns, check_privileges};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[test]
    fn a_half_sent_request_head_is_disconnected() {
        check_privileges().expect("admin tests run in their own network namespace");
        let ns = Netns::new("admin-slowhead").expect("create netns");
        ns.block_on(Duration::from_mins(1), || async {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("address");
            let state = AgentState::new();
            let server = tokio::spawn(serve_with(
                listener,
                Duration::from_millis(200),
                move |req: &Request<hyper::body::Incoming>| respond(&state, req.uri().path()),
            ));
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n")
                .await
                .expect("send half a request head");
            let mut buf = Vec::new();
            // Bounded: without a header timeout the server would wait forever.
            let closed =
                tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
            assert!(closed.is_ok(), "the connection is still open");
            assert!(
                !String::from_utf8_lossy(&buf).contains("200 OK"),
                "{}",
                String::from_utf8_lossy(&buf)
            );
            server.abort();
        })
        .expect("in the namespace");
    }
}
