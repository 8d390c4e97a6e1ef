//! The Kubernetes agent: `--kube` or `--manifests` -> cluster index -> translator ->
//! desired state -> the writer. Nothing is written before every kind was listed once,
//! so a Service seen before its EndpointSlices never shrinks or flaps. A broken watch
//! keeps the last state (fail-static), and a relist changes only what changed.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use super::l7::L7Hop;
use super::{RunOptions, Source, start_dataplane, stopped, writer_task};
use crate::admin::AgentState;
use crate::l7::proxy::Proxy;
use crate::service_health::ServiceHealth;
use crate::source::kube::EventPublisher;
use crate::source::manifests::{Load, ManifestSource};
use lb_core::cluster::{Cluster, ClusterEvent, Dirty};
use lb_core::model::Desired;
use lb_core::model::kubernetes::Problem;
use lb_core::model::translator::Translator;

/// Events queued between the sources and the translator.
const QUEUE: usize = 4096;

/// Loads the program and its maps on a blocking thread: meanwhile this thread lists
/// the cluster (loading and creating the maps takes a few hundred milliseconds).
async fn load_dataplane(
    opts: &RunOptions,
) -> Result<(crate::dataplane::Dataplane, lb_core::plan::Applied)> {
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || start_dataplane(&opts))
        .await
        .context("loading the data plane")?
        .map_err(crate::capabilities::explain)
}

pub(super) async fn run(
    opts: &RunOptions,
    state: Arc<AgentState>,
    proxy: Option<Proxy>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<ClusterEvent>(QUEUE);
    let Started {
        source,
        events,
        client,
    } = start_source(opts, tx, &state).await?;
    if opts.node.name.is_none() {
        tracing::warn!(
            "no --node-name (or NODE_NAME): no endpoint counts as local, so traffic \
             policy Local has no endpoints here, and NodePorts use only --node-address"
        );
    }

    // Without an interface this is an L7-only instance: no XDP, no L4 translation.
    let (desired_tx, desired_rx) = watch::channel(Desired::default());
    let writer = if opts.dataplane() {
        let (dp, applied) = load_dataplane(opts).await?;
        Some(tokio::spawn(writer_task(
            dp,
            applied,
            desired_rx,
            Arc::clone(&state),
        )))
    } else {
        None
    };
    let mut l7 = match (proxy, &opts.l7) {
        (Some(proxy), Some(options)) => Some(L7Hop::start(proxy, options.clone(), client)),
        _ => None,
    };

    let mut cluster = Cluster::new(opts.l7.is_some());
    let mut translator = Translator::new(opts.node.name.clone(), opts.node.addresses.clone());
    let mut health = ServiceHealth::default();
    let mut synced = false;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    loop {
        let event = tokio::select! {
            event = rx.recv() => event,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let Some(event) = event else {
            // The source gave up (it retries API errors forever, so this is a bug or a
            // lost client). Exit: the maps stay pinned and traffic flows while the
            // kubelet restarts us, and the next agent adopts them.
            anyhow::bail!("the Kubernetes source stopped; exiting so a restart resyncs");
        };
        let mut dirty = cluster.apply(event);
        // One translation per burst of events.
        while let Ok(event) = rx.try_recv() {
            dirty.merge(cluster.apply(event));
        }
        if !cluster.synced() {
            continue;
        }
        let first = !synced;
        if first {
            synced = true;
            dirty = Dirty::All;
            tracing::info!(
                services = cluster.services.len(),
                endpointslices = cluster.slices.len(),
                nodes = cluster.nodes.len(),
                "initial lists complete"
            );
        }
        // The maps first: the L7 snapshot is rebuilt whole, and must not delay them.
        if writer.is_some() {
            let mut problems = Vec::new();
            desired_tx.send_if_modified(|desired| {
                let outcome = translator.update(&cluster, dirty, desired);
                for note in &outcome.notes {
                    tracing::debug!("{note}");
                }
                problems = outcome.problems;
                outcome.changed || first
            });
            report(&problems, &state, events.as_ref());
            health.set(&translator.health_checks()).await;
        }
        if let Some(l7) = &mut l7 {
            l7.update(&cluster, &state, events.as_ref());
        }
    }
    source.abort();
    drop(l7);
    drop(desired_tx);
    if let Some(writer) = writer {
        writer.await.context("writer task")?;
        stopped(opts);
    }
    Ok(())
}

/// The running source and what the agent needs from it.
struct Started {
    source: tokio::task::JoinHandle<()>,
    /// Warning Events about bad objects (`--kube`).
    events: Option<EventPublisher>,
    /// For the Ingress status writer (`--kube`).
    client: Option<kube::Client>,
}

/// Starts `--kube` watchers or the `--manifests` reader, sending to `tx`.
async fn start_source(
    opts: &RunOptions,
    tx: mpsc::Sender<ClusterEvent>,
    state: &Arc<AgentState>,
) -> Result<Started> {
    let mut events = None;
    let mut status_client = None;
    let source = match &opts.source {
        Source::Kube => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client (in-cluster service account, else KUBECONFIG)")?;
            events = Some(EventPublisher::new(
                client.clone(),
                opts.node.name.as_deref().unwrap_or("unknown-node"),
            ));
            status_client = Some(client.clone());
            if opts.l7.is_some() {
                tracing::info!(
                    "watching Services, EndpointSlices, Nodes, Ingresses, IngressClasses \
                     and TLS Secrets"
                );
            } else {
                tracing::info!("watching Services, EndpointSlices and Nodes");
            }
            let l7 = opts.l7.is_some();
            tokio::spawn(async move {
                if let Err(e) = crate::source::kube::run(client, tx, l7).await {
                    tracing::error!("Kubernetes source stopped: {e:#}");
                }
            })
        }
        Source::Manifests(dir) => {
            let mut manifests = ManifestSource::new(dir);
            // An unreadable directory is fatal before anything is attached.
            let first = manifests
                .read(true)
                .with_context(|| format!("reading --manifests {}", dir.display()))?
                .context("a forced read always loads")?;
            tracing::info!(dir = %dir.display(), "translating the manifests in");
            tokio::spawn(watch_manifests(
                manifests,
                first,
                tx,
                opts.poll,
                Arc::clone(state),
            ))
        }
        Source::Config(_) => unreachable!("the config file has its own loop"),
    };
    Ok(Started {
        source,
        events,
        client: status_client,
    })
}

/// Logs each new problem and, with `--kube`, tells the object's owner with a Warning
/// Event (published off the loop, so a slow API server never delays the maps).
pub(super) fn report(problems: &[Problem], state: &AgentState, events: Option<&EventPublisher>) {
    for problem in problems {
        tracing::warn!("skipped: {problem}");
        if let Some(events) = events {
            let events = events.clone();
            let problem = problem.clone();
            tokio::spawn(async move {
                let note = format!("{}: {}", problem.field, problem.reason);
                if let Err(e) = events
                    .warn(problem.kind, &problem.object, "InvalidField", &note)
                    .await
                {
                    tracing::debug!("Event about {} not published: {e}", problem.object);
                }
            });
        }
    }
    state.rejected_objects.inc_by(problems.len() as u64);
}

/// Sends the directory's objects whenever a file changes (polled) or on SIGHUP.
async fn watch_manifests(
    mut source: ManifestSource,
    first: Load,
    tx: mpsc::Sender<ClusterEvent>,
    poll: Duration,
    state: Arc<AgentState>,
) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("no SIGHUP handler; reloading on change only");
        return;
    };
    let mut load = Some(first);
    let mut tick = tokio::time::interval(poll);
    loop {
        if let Some(Load { events, errors }) = load.take() {
            for error in &errors {
                tracing::warn!("manifests: {error}");
            }
            state.rejected_objects.inc_by(errors.len() as u64);
            for event in events {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
        let force = tokio::select! {
            _ = tick.tick() => false,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the manifests");
                true
            }
        };
        match source.read(force) {
            Ok(next) => load = next,
            Err(e) => {
                tracing::error!("manifests directory unreadable, keeping the last state: {e}");
            }
        }
    }
}
