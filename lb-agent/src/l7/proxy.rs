//! The L7 hop's listeners and request path.
//!
//! PLACEHOLDER: the signatures are the contract the agent wires; the proxy lands with
//! the proxy work.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::watch;

use super::Snapshot;

/// Listener addresses, limits and timeouts (from the CLI).
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Plain HTTP listener (`--l7-http`).
    pub http: Option<SocketAddr>,
    /// TLS listener (`--l7-https`).
    pub https: Option<SocketAddr>,
}

/// Bound listeners: binding happens before the agent reports ready, so an address in
/// use is an error at start, not a silent hop that never serves.
pub struct Proxy {
    _config: ProxyConfig,
}

impl Proxy {
    /// Binds the listeners and registers the proxy's counters (`xlb_l7_*`).
    pub fn bind(
        config: ProxyConfig,
        _registry: &mut prometheus_client::registry::Registry,
    ) -> Result<Proxy> {
        Ok(Proxy { _config: config })
    }

    /// Serves until the task is dropped, always from the latest snapshot.
    pub async fn run(self, _snapshots: watch::Receiver<Arc<Snapshot>>) -> Result<()> {
        std::future::pending().await
    }
}
