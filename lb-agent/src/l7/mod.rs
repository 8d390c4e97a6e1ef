//! The L7 hop: an HTTP(S) proxy that routes by host and path with Kubernetes Ingress
//! semantics. It is fed by the same sources as the L4 data plane: `lb_core::model::ingress`
//! turns Ingresses, IngressClasses, Secrets, Services and EndpointSlices into a route
//! table and parsed certificates; [`tls::load`] makes their signing keys, and the two
//! form one [`Snapshot`], which the proxy swaps in whole; the proxy never reads Kubernetes.

pub mod auth;
pub mod backend_tls;
pub mod balance;
pub mod client_socket;
pub mod cork;
pub mod dns;
pub mod h1_server;
pub mod headers;
pub mod htpasswd;
pub mod limits;
pub mod metrics;
pub mod path;
#[cfg(test)]
mod pieces;
pub mod proxy;
pub mod rate;
pub mod read_ahead;
pub mod send_timeout;
pub mod status;
pub mod tls;
pub mod upstream;
pub mod watchdog;
pub mod wire;

use std::sync::Arc;

use lb_core::cluster::ObjectKey;

pub use lb_core::routes::{self, RouteTable};

/// Everything the proxy serves from, rebuilt as a whole when a relevant object changes.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub routes: RouteTable,
    /// Certificates from the `kubernetes.io/tls` Secrets named in `spec.tls`.
    pub certificates: Vec<Certificate>,
}

/// One `spec.tls` entry's certificate, ready for rustls.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// The hosts `spec.tls[].hosts` lists for it (may hold `*.example.com`); empty means
    /// the certificate's own names decide.
    pub hosts: Vec<String>,
    /// The Secret it came from, for logs.
    pub secret: ObjectKey,
    pub key: Arc<rustls::sign::CertifiedKey>,
}
