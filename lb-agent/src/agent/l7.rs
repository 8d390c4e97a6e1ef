//! The L7 hop inside the agent loop: after every burst of cluster changes the Ingress
//! translation runs again and the proxy swaps in the new snapshot; problems are
//! delivered once while they last, with the Ingress status the served Ingresses should
//! show (the loop hands both to `kube_writes` under `--kube`).

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;

use super::L7Options;
use crate::l7::proxy::Proxy;
use crate::l7::{Snapshot, status, tls};
use lb_core::cluster::{Cluster, ObjectKey};
use lb_core::model::ingress::{self, IngressTranslation};
use lb_core::model::kubernetes::Problem;

pub(super) struct L7Hop {
    options: L7Options,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// Problems delivered while they last.
    reported: Vec<Problem>,
    /// Annotations warned about once.
    ignored: BTreeSet<(ObjectKey, String)>,
    /// The cluster's L7 generation the snapshot was built from.
    built: Option<u64>,
    /// The proxy's task: it ends before the drain only when the hop failed.
    proxy: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Starts the drain; taken by [`L7Hop::drain`].
    drain: Option<tokio::sync::oneshot::Sender<()>>,
}

/// What a rebuild of the routes found.
pub(super) struct Rebuilt {
    /// Problems that appeared.
    pub problems: Vec<Problem>,
    /// The status writes the served Ingresses need.
    pub status: status::Updates,
}

impl L7Hop {
    /// Starts serving (an empty table until the first translation: every request is a
    /// 404 meanwhile).
    pub(super) fn start(proxy: Proxy, options: L7Options) -> L7Hop {
        let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
        let (drain, drained) = tokio::sync::oneshot::channel::<()>();
        let proxy = tokio::spawn(async move {
            let drain = async {
                let _ = drained.await;
            };
            proxy.run_until(rx, drain).await
        });
        Self::serving(proxy, drain, options, snapshots)
    }

    fn serving(
        proxy: tokio::task::JoinHandle<anyhow::Result<()>>,
        drain: tokio::sync::oneshot::Sender<()>,
        options: L7Options,
        snapshots: watch::Sender<Arc<Snapshot>>,
    ) -> L7Hop {
        L7Hop {
            options,
            snapshots,
            reported: Vec::new(),
            ignored: BTreeSet::new(),
            built: None,
            proxy,
            drain: Some(drain),
        }
    }

    /// Drains the hop (SIGTERM): no new connections, requests in flight answered,
    /// keep-alive connections closed, within the proxy's grace period.
    pub(super) async fn drain(&mut self) {
        if let Some(drain) = self.drain.take() {
            let _ = drain.send(());
            match (&mut self.proxy).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("L7 hop drain: {e:#}"),
                Err(e) => tracing::error!("L7 hop drain: {e}"),
            }
        }
    }

    /// Resolves, with why, if the hop stops serving before its drain: a listener or a
    /// worker failed (or panicked). The agent then exits with that error, so that its
    /// pod restarts with a hop again (the XDP programs and maps stay, and L4 traffic
    /// with them); a hop that is gone while the agent stays up and ready would take
    /// the node's share of the Ingress traffic and refuse it. Once it has resolved,
    /// it is not to be awaited again.
    pub(super) async fn stopped(&mut self) -> anyhow::Error {
        match (&mut self.proxy).await {
            Ok(Ok(())) => anyhow::anyhow!("the L7 hop stopped serving"),
            Ok(Err(e)) => e.context("the L7 hop stopped"),
            Err(e) => anyhow::anyhow!("the L7 hop stopped: {e}"),
        }
    }

    /// Translates the cluster's Ingresses again, when anything they depend on changed,
    /// and serves the result.
    pub(super) fn update(&mut self, cluster: &Cluster) -> Option<Rebuilt> {
        if self.built == Some(cluster.l7_generation()) {
            return None;
        }
        self.built = Some(cluster.l7_generation());
        let IngressTranslation {
            routes,
            certificates,
            mut problems,
            owned,
            ignored_annotations,
        } = ingress::translate(cluster, &self.options.class);
        let (certificates, key_problems) = tls::load(&certificates);
        problems.extend(key_problems);
        let snapshot = Snapshot {
            routes,
            certificates,
        };
        for key in ignored_annotations {
            if !self.ignored.contains(&key) {
                tracing::warn!(
                    ingress = %key.0,
                    annotation = key.1,
                    "annotation not supported by xlb; ignored"
                );
                self.ignored.insert(key);
            }
        }
        // Reported when it appears, not on every rebuild (as the L4 translator does).
        let new: Vec<Problem> = problems
            .iter()
            .filter(|p| !self.reported.contains(p))
            .cloned()
            .collect();
        self.reported = problems;
        tracing::debug!(
            ingresses = owned.len(),
            certificates = snapshot.certificates.len(),
            "L7 routes rebuilt"
        );
        self.snapshots.send_replace(Arc::new(snapshot));

        let publish = self
            .options
            .publish_service
            .as_ref()
            .and_then(|key| cluster.services.get(key));
        let wanted = status::published(&self.options.publish_addresses, publish.map(AsRef::as_ref));
        let served = owned
            .iter()
            .filter_map(|key| cluster.ingresses.get(key).map(|i| (key, i.as_ref())));
        let status = status::updates(served, &wanted);
        tracing::debug!(?wanted, updates = status.len(), "Ingress status");
        Some(Rebuilt {
            problems: new,
            status,
        })
    }
}

impl Drop for L7Hop {
    fn drop(&mut self) {
        self.proxy.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> L7Options {
        L7Options {
            class: ingress::IngressClassConfig::new("xlb"),
            publish_service: None,
            publish_addresses: Vec::new(),
            proxy: crate::l7::proxy::ProxyConfig::default(),
        }
    }

    fn hop(serve: impl Future<Output = anyhow::Result<()>> + Send + 'static) -> L7Hop {
        let (snapshots, _) = watch::channel(Arc::new(Snapshot::default()));
        let (drain, _) = tokio::sync::oneshot::channel();
        L7Hop::serving(tokio::spawn(serve), drain, options(), snapshots)
    }

    #[tokio::test]
    async fn a_hop_that_fails_before_its_drain_says_why() {
        let mut failed = hop(async { Err(anyhow::anyhow!("L7 worker 1 ended: accept")) });
        let e = failed.stopped().await;
        assert_eq!(
            format!("{e:#}"),
            "the L7 hop stopped: L7 worker 1 ended: accept"
        );
        let mut panicked = hop(async { panic!("a worker's bug") });
        let e = panicked.stopped().await;
        assert!(format!("{e:#}").contains("panicked"), "{e:#}");
    }

    #[tokio::test]
    async fn a_serving_hop_has_not_stopped() {
        let mut serving = hop(std::future::pending());
        let stopped = tokio::time::timeout(std::time::Duration::from_millis(50), serving.stopped());
        assert!(
            stopped.await.is_err(),
            "a hop still serving counted as stopped"
        );
    }
}
