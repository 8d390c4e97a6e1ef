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
    proxy: tokio::task::JoinHandle<()>,
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
            if let Err(e) = proxy.run_until(rx, drain).await {
                tracing::error!("L7 hop stopped: {e:#}");
            }
        });
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
            let _ = (&mut self.proxy).await;
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
