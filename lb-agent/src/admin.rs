//! The admin HTTP endpoint: `/healthz` (liveness: the agent's loops are running),
//! `/readyz` (ready once the first complete desired state is in the maps, so a
//! DaemonSet rolling update waits for it), `/metrics` (Prometheus text format; the
//! data plane's counters are read from the maps at scrape time, see `metrics`) and
//! `/trace?proto=tcp&src=ADDR[:PORT]&dst=ADDR:PORT` (what the data plane does with a
//! flow, as JSON; see `trace`). Nothing here changes state: only GET and HEAD are
//! answered, other methods get 405.

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
use prometheus_client::registry::Unit;
use tokio::net::TcpListener;

use crate::metrics::{DataplaneMetrics, ReconcileLag};

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
    /// The data plane's counters and tables, read from the pinned maps when scraped;
    /// also what `/trace` reads.
    pub dataplane: Arc<DataplaneMetrics>,
    /// From a change a source saw to the map writes that carry it.
    pub reconcile: ReconcileLag,
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
        let dataplane = Arc::new(DataplaneMetrics::default());
        registry.register_collector(Box::new(Arc::clone(&dataplane)));
        let reconcile = ReconcileLag::default();
        registry.register_with_unit(
            "reconcile_lag",
            "Time from a change a source saw (file, Kubernetes object, health) to the map \
             writes that carry it",
            Unit::Seconds,
            reconcile.histogram.clone(),
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
            dataplane,
            reconcile,
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

    /// The `/metrics` text (OpenMetrics), as a scrape gets it.
    pub fn metrics(&self) -> String {
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
        move |req: &Request<hyper::body::Incoming>| respond(&state, req.method(), req.uri()),
    )))
}

fn respond(state: &AgentState, method: &hyper::Method, uri: &hyper::Uri) -> Response<Full<Bytes>> {
    // Read-only: nothing on this port changes state.
    if method != hyper::Method::GET && method != hyper::Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: the admin endpoint is read-only (GET, HEAD)\n".into(),
        );
        response.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return response;
    }
    match uri.path() {
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
        "/trace" => trace(state, uri.query().unwrap_or("")),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics, /trace?proto=tcp&src=ADDR:PORT&dst=ADDR:PORT\n"
                .into(),
        ),
    }
}

/// `GET /trace?proto=tcp&src=198.51.100.2:40000&dst=203.0.113.10:80`: the trace as JSON.
fn trace(state: &AgentState, query: &str) -> Response<Full<Bytes>> {
    let mut proto = None;
    let mut src = None;
    let mut dst = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "proto" => proto = Some(v.into_owned()),
            "src" => src = Some(v.into_owned()),
            "dst" => dst = Some(v.into_owned()),
            _ => {}
        }
    }
    let (Some(proto), Some(src), Some(dst)) = (proto, src, dst) else {
        return text(
            StatusCode::BAD_REQUEST,
            "usage: /trace?proto=tcp|udp&src=ADDR[:PORT]&dst=ADDR:PORT\n".into(),
        );
    };
    let q = match crate::trace::Query::parse(&proto, &src, &dst) {
        Ok(q) => q,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("{e}\n")),
    };
    match state.dataplane.with(|dp| crate::trace::trace(dp, &q)) {
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no data plane: this agent has no --interface, or its maps are not pinned yet\n".into(),
        ),
        Some(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Some(Ok(t)) => {
            let mut response = text(
                StatusCode::OK,
                serde_json::to_string_pretty(&t).unwrap_or_default() + "\n",
            );
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
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

    fn call(state: &AgentState, method: &str, uri: &str) -> Response<Full<Bytes>> {
        let method = hyper::Method::from_bytes(method.as_bytes()).unwrap();
        respond(state, &method, &uri.parse().unwrap())
    }

    #[test]
    fn only_get_and_head_are_answered() {
        let state = AgentState::new();
        for path in ["/healthz", "/readyz", "/metrics", "/trace", "/nothing"] {
            for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
                let r = call(&state, method, path);
                assert_eq!(
                    r.status(),
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path}"
                );
                assert_eq!(r.headers()[hyper::header::ALLOW], "GET, HEAD");
            }
            assert_ne!(
                call(&state, "GET", path).status(),
                StatusCode::METHOD_NOT_ALLOWED
            );
        }
        assert_eq!(call(&state, "HEAD", "/healthz").status(), StatusCode::OK);
    }

    #[test]
    fn trace_validates_its_query_and_needs_a_data_plane() {
        let state = AgentState::new();
        assert_eq!(
            call(&state, "GET", "/trace?proto=tcp").status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(
                &state,
                "GET",
                "/trace?proto=sctp&src=198.51.100.2&dst=203.0.113.10:80"
            )
            .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            call(
                &state,
                "GET",
                "/trace?proto=tcp&src=198.51.100.2:40000&dst=203.0.113.10:80"
            )
            .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn metrics_name_the_data_plane_and_the_reconcile_lag() {
        let state = AgentState::new();
        state.reconcile.changed(std::time::Instant::now());
        let seen = state.reconcile.take();
        assert!(seen.is_some());
        assert!(state.reconcile.take().is_none(), "taken once");
        state.reconcile.applied(seen);
        let text = state.metrics();
        assert!(text.contains("xlb_dataplane_metrics_up 0"), "{text}");
        assert!(text.contains("xlb_reconcile_lag_seconds_count 1"), "{text}");
        assert!(text.contains("xlb_map_write_errors_total 0"), "{text}");
    }

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
                move |req: &Request<hyper::body::Incoming>| {
                    respond(&state, req.method(), req.uri())
                },
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
