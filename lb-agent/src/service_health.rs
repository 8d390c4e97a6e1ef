//! kube-proxy's per-Service health check servers: for a LoadBalancer Service with
//! `externalTrafficPolicy: Local`, the node answers on `healthCheckNodePort` with 200
//! and the number of local endpoints, or 503 when it has none, so the load balancer
//! in front sends that Service's traffic only to nodes that can serve it locally.
//! The body is kube-proxy's JSON, so existing cloud health checks keep working.

use std::collections::BTreeMap;
use std::net::{Ipv6Addr, SocketAddr};

use hyper::StatusCode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{serve, text};
use lb_core::cluster::ObjectKey;

struct Server {
    state: watch::Sender<(ObjectKey, usize)>,
    task: JoinHandle<()>,
}

/// One listener per healthCheckNodePort, on every address of the node.
#[derive(Default)]
pub struct ServiceHealth {
    servers: BTreeMap<u16, Server>,
}

impl ServiceHealth {
    /// Makes the listeners match `wanted` (port -> Service and its local endpoints).
    pub async fn set(&mut self, wanted: &BTreeMap<u16, (ObjectKey, usize)>) {
        self.servers.retain(|port, server| {
            let keep = wanted.contains_key(port);
            if !keep {
                server.task.abort();
                tracing::info!(port, "healthCheckNodePort closed");
            }
            keep
        });
        for (port, state) in wanted {
            if let Some(server) = self.servers.get(port) {
                server.state.send_if_modified(|current| {
                    let changed = current != state;
                    if changed {
                        current.clone_from(state);
                    }
                    changed
                });
                continue;
            }
            // [::] takes IPv4 too (bindv6only is off by default).
            let listener =
                match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, *port))).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(
                            port,
                            service = %state.0,
                            "healthCheckNodePort: cannot listen: {e}"
                        );
                        continue;
                    }
                };
            let (tx, rx) = watch::channel(state.clone());
            let task = tokio::spawn(serve(listener, move |_req| {
                let (service, local) = rx.borrow().clone();
                response(&service, local)
            }));
            tracing::info!(port, service = %state.0, "healthCheckNodePort serving");
            self.servers.insert(*port, Server { state: tx, task });
        }
    }
}

impl Drop for ServiceHealth {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.task.abort();
        }
    }
}

/// kube-proxy's answer (pkg/proxy/healthcheck): the same fields and status codes.
fn response(
    service: &ObjectKey,
    local_endpoints: usize,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let body = serde_json::json!({
        "service": {"namespace": service.namespace, "name": service.name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = text(status, format!("{body}\n"));
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        hyper::header::HeaderValue::from(local_endpoints),
    );
    response
}
