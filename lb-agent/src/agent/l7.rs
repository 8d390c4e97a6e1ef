//! The L7 hop inside the Kubernetes agent: after every burst of cluster events the
//! Ingress translation runs again and the proxy swaps in the new snapshot; problems
//! are reported once while they last, and (with `--kube`) Ingress status follows.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::L7Options;
use super::kubernetes::report;
use crate::admin::{AgentState, PART_L7};
use crate::l7::proxy::Proxy;
use crate::l7::{Snapshot, status, tls};
use crate::source::kube::EventPublisher;
use lb_core::cluster::{Cluster, ObjectKey};
use lb_core::model::ingress::{self, IngressTranslation};
use lb_core::model::kubernetes::Problem;

/// How long a failed status write waits before it is tried again.
const STATUS_RETRY: Duration = Duration::from_secs(10);

pub(super) struct L7Hop {
    options: L7Options,
    snapshots: watch::Sender<Arc<Snapshot>>,
    status: Option<watch::Sender<status::Updates>>,
    /// Problems reported while they last.
    reported: Vec<Problem>,
    /// Annotations warned about once.
    ignored: BTreeSet<(ObjectKey, String)>,
    /// The cluster's L7 generation the snapshot was built from.
    built: Option<u64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl L7Hop {
    /// Starts serving (an empty table until the first translation: every request is a
    /// 404 meanwhile, and /readyz says not ready).
    pub(super) fn start(proxy: Proxy, options: L7Options, client: Option<kube::Client>) -> L7Hop {
        let (snapshots, rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut tasks = vec![tokio::spawn(async move {
            if let Err(e) = proxy.run(rx).await {
                tracing::error!("L7 hop stopped: {e:#}");
            }
        })];
        let status = client.map(|client| {
            let (tx, rx) = watch::channel(Vec::new());
            tasks.push(tokio::spawn(status::writer(client, rx, STATUS_RETRY)));
            tx
        });
        L7Hop {
            options,
            snapshots,
            status,
            reported: Vec::new(),
            ignored: BTreeSet::new(),
            built: None,
            tasks,
        }
    }

    /// Translates the cluster's Ingresses again, when anything they depend on changed,
    /// and serves the result.
    pub(super) fn update(
        &mut self,
        cluster: &Cluster,
        state: &AgentState,
        events: Option<&EventPublisher>,
    ) {
        if self.built == Some(cluster.l7_generation()) {
            return;
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
        report(&new, state, events);
        self.reported = problems;
        tracing::debug!(
            ingresses = owned.len(),
            certificates = snapshot.certificates.len(),
            "L7 routes rebuilt"
        );
        self.snapshots.send_replace(Arc::new(snapshot));
        state.part_ready(PART_L7);

        if let Some(status) = &self.status {
            let publish = self
                .options
                .publish_service
                .as_ref()
                .and_then(|key| cluster.services.get(key));
            let wanted =
                status::published(&self.options.publish_addresses, publish.map(AsRef::as_ref));
            let served = owned
                .iter()
                .filter_map(|key| cluster.ingresses.get(key).map(|i| (key, i.as_ref())));
            let updates = status::updates(served, &wanted);
            tracing::debug!(?wanted, updates = updates.len(), "Ingress status");
            status.send_if_modified(|pending| {
                let changed = *pending != updates;
                *pending = updates;
                changed
            });
        }
    }
}

impl Drop for L7Hop {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
