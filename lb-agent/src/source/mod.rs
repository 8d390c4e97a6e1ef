//! Where services come from: the config file (`file`), a directory of Kubernetes YAML
//! (`manifests`) or the cluster's API server (`kube`), behind one type, [`Source`].
//! The Kubernetes ones feed an index (`lb_core::cluster::Cluster`) that `Translator`
//! turns into the desired state; the file's validated services are turned into it
//! directly, with what their health checks say.
//!
//! Every source delivers the same [`Update`]: its desired state (written into the
//! agent's `Desired`), the problems it found (each naming the object and the field), and
//! what health checking serves. The Kubernetes ones also lend the L7 hop their index.
//! Sources never touch maps and never write to Kubernetes.

pub mod file;
pub mod kube;
pub mod manifests;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Interval;

use crate::health::Target;
use file::{FileSource, Read};
use lb_core::cluster::{Cluster, ClusterEvent, Dirty, ObjectKey};
use lb_core::config::{ServiceError, ServiceSpec};
use lb_core::model::translator::Translator;
use lb_core::model::{self, Desired, Endpoint, Health, kubernetes};
use manifests::{Load, ManifestError, ManifestSource};

/// Events queued between the Kubernetes watchers and the index.
const QUEUE: usize = 4096;

/// Where the services come from (the command line's choice).
#[derive(Debug, Clone)]
pub enum Origin {
    /// An xlb config file.
    Config(PathBuf),
    /// The cluster's API server.
    Kube,
    /// A directory of Kubernetes YAML.
    Manifests(PathBuf),
}

/// This node, for the Kubernetes sources.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Selects the Node object and the endpoints that are local.
    pub name: Option<String>,
    /// NodePort addresses; empty = those of the Node object.
    pub addresses: Vec<IpAddr>,
    /// `--lb-mode`: for Services (and config file services) that do not say.
    pub lb_mode: lb_core::mode::LbMode,
}

/// A backend as health checking knows it: (service name, endpoint).
pub type BackendKey = (String, Endpoint);

/// Something a source rejected; the rest still applies.
#[derive(Debug, Clone)]
pub enum Problem {
    /// A service of the config file (its previous version stays when it had one).
    Config(ServiceError),
    /// A document of the manifests directory.
    Manifest(ManifestError),
    /// A field of a Kubernetes object (the owner is told with an Event under `--kube`).
    Object(kubernetes::Problem),
    /// The config file as a whole (not YAML, not a config): nothing in it changed.
    File(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Config(e) => write!(f, "config: {e}"),
            Problem::Manifest(e) => write!(f, "manifests: {e}"),
            Problem::Object(p) => write!(f, "skipped: {p}"),
            Problem::File(e) => write!(f, "config rejected, nothing changed: {e}"),
        }
    }
}

/// What health checking serves.
#[derive(Debug, Default)]
pub struct Checks {
    /// Backends to probe (config file), each with its state before its first probe.
    pub probes: BTreeMap<BackendKey, Target>,
    /// healthCheckNodePorts to answer (Kubernetes): port -> Service and its local
    /// endpoints.
    pub node_ports: BTreeMap<u16, (ObjectKey, usize)>,
}

/// What one [`Source::update`] delivered besides the desired state.
#[derive(Debug, Default)]
pub struct Update {
    /// The desired state changed (always true for the first complete state).
    pub changed: bool,
    /// Problems found since the last update, each delivered once.
    pub problems: Vec<Problem>,
    /// What health checking serves, when it may have changed.
    pub checks: Option<Checks>,
}

/// One of the three sources, as the agent loop drives it: [`next`](Self::next) waits
/// for input (a poll of the file or directory, or a burst of watch events) and takes it
/// in; [`update`](Self::update) delivers the result.
pub struct Source {
    input: Input,
    /// Problems found by reads since the last update.
    problems: Vec<Problem>,
    /// No complete state delivered yet.
    first: bool,
}

enum Input {
    File {
        /// `None` while a read runs on a blocking thread (`reading`).
        file: Option<FileSource>,
        path: PathBuf,
        /// The read in flight: parsing a big file takes seconds, and the runtime's
        /// thread also answers `/healthz`.
        reading: Option<JoinHandle<(FileSource, Read)>>,
        /// SIGHUP asked for a read of the file, changed or not.
        forced: bool,
        poll: Interval,
        specs: Vec<ServiceSpec>,
        /// Checked backends' health (up: true): restored from the maps, then as the
        /// checks say; a backend not in it is up.
        health: BTreeMap<BackendKey, bool>,
        /// The services or their health changed since the last update.
        stale: bool,
        /// `--lb-mode`, for services without `lbMode`.
        lb_mode: lb_core::mode::LbMode,
    },
    Manifests {
        dir: ManifestSource,
        poll: Interval,
        index: Index,
    },
    Kube {
        client: ::kube::Client,
        events: mpsc::Receiver<ClusterEvent>,
        watchers: JoinHandle<()>,
        index: Index,
    },
}

/// The Kubernetes sources' objects and their translation.
struct Index {
    cluster: Cluster,
    /// `None` on an L7-only instance: no L4 translation.
    translator: Option<Translator>,
    dirty: Dirty,
}

impl Source {
    /// Opens the source: reads and validates the file (a broken one fails here, before
    /// anything is attached), reads the directory, or starts the watchers. `l4`
    /// translates for the data plane, `l7` indexes the L7 hop's kinds too.
    pub async fn open(
        origin: &Origin,
        node: &NodeOptions,
        poll: Duration,
        l4: bool,
        l7: bool,
    ) -> Result<Source> {
        let mut poll = tokio::time::interval(poll);
        // The first tick is immediate: the first read is the one below.
        poll.tick().await;
        let mut problems = Vec::new();
        let input = match origin {
            Origin::Config(path) => {
                let (file, read) = spawn_read(FileSource::new(path), true)
                    .await
                    .context("reading the config file")?;
                let specs = match read {
                    Read::Services { services, rejected } => {
                        problems.extend(rejected.into_iter().map(Problem::Config));
                        services
                    }
                    Read::Invalid(e) => bail!("{e}"),
                    Read::Unchanged => unreachable!("a forced read is never unchanged"),
                };
                tracing::info!(config = %path.display(), "running");
                Input::File {
                    file: Some(file),
                    path: path.clone(),
                    reading: None,
                    forced: false,
                    poll,
                    specs,
                    health: BTreeMap::new(),
                    stale: true,
                    lb_mode: node.lb_mode,
                }
            }
            Origin::Manifests(path) => {
                let mut dir = ManifestSource::new(path);
                // An unreadable directory is fatal before anything is attached.
                let first = dir
                    .read(true)
                    .with_context(|| format!("reading --manifests {}", path.display()))?
                    .context("a forced read always loads")?;
                tracing::info!(dir = %path.display(), "translating the manifests in");
                let mut index = Index::new(node, l4, l7);
                index.load(first, &mut problems);
                Input::Manifests { dir, poll, index }
            }
            Origin::Kube => {
                let client = ::kube::Client::try_default()
                    .await
                    .context("Kubernetes client (in-cluster service account, else KUBECONFIG)")?;
                if l7 {
                    tracing::info!(
                        "watching Services, EndpointSlices, Nodes, Ingresses, IngressClasses \
                         and TLS Secrets"
                    );
                } else {
                    tracing::info!("watching Services, EndpointSlices and Nodes");
                }
                let (tx, events) = mpsc::channel(QUEUE);
                let watching = client.clone();
                let watchers = tokio::spawn(async move {
                    if let Err(e) = kube::run(watching, tx, l7).await {
                        tracing::error!("Kubernetes source stopped: {e:#}");
                    }
                });
                Input::Kube {
                    client,
                    events,
                    watchers,
                    index: Index::new(node, l4, l7),
                }
            }
        };
        if !matches!(origin, Origin::Config(_)) && node.name.is_none() {
            tracing::warn!(
                "no --node-name (or NODE_NAME): no endpoint counts as local, so traffic \
                 policy Local has no endpoints here, and NodePorts use only --node-address"
            );
        }
        Ok(Source {
            input,
            problems,
            first: true,
        })
    }

    /// Waits for the next input and takes it in: the next poll of the file or the
    /// directory, or the next burst of watch events. Cancel-safe (nothing is awaited
    /// after input arrived). Fails when the watchers gave up (they retry API errors
    /// forever, so that is a bug or a lost client): the maps stay pinned and traffic
    /// flows while the kubelet restarts the agent, and the next one adopts them.
    pub async fn next(&mut self) -> Result<()> {
        match &mut self.input {
            Input::File {
                file,
                reading,
                forced,
                poll,
                ..
            } => {
                if reading.is_none() {
                    if !*forced {
                        poll.tick().await;
                    }
                    let source = file.take().context("the file source is being read")?;
                    *reading = Some(spawn_read(source, std::mem::take(forced)));
                }
                // Awaited by reference: a cancelled `next` finds the read still running.
                let in_flight = reading.as_mut().context("a read is in flight")?;
                let (source, read) = in_flight.await.context("reading the config file")?;
                *reading = None;
                *file = Some(source);
                self.take_read(read);
            }
            Input::Manifests { poll, .. } => {
                poll.tick().await;
                self.read(false);
            }
            Input::Kube { events, index, .. } => {
                let Some(event) = events.recv().await else {
                    bail!("the Kubernetes source stopped; exiting so a restart resyncs");
                };
                index.dirty.merge(index.cluster.apply(event));
                while let Ok(event) = events.try_recv() {
                    index.dirty.merge(index.cluster.apply(event));
                }
            }
        }
        Ok(())
    }

    /// Reads the file or the directory again, changed or not (SIGHUP).
    pub fn reload(&mut self) {
        match &mut self.input {
            Input::File { path, forced, .. } => {
                tracing::info!("SIGHUP: reloading {}", path.display());
                // The next read starts at once (or after the one in flight).
                *forced = true;
                return;
            }
            Input::Manifests { .. } => tracing::info!("SIGHUP: reloading the manifests"),
            Input::Kube { .. } => {
                tracing::info!("SIGHUP: nothing to reload, the watches follow the cluster");
            }
        }
        self.read(true);
    }

    /// Takes in what a read of the config file found.
    fn take_read(&mut self, read: Read) {
        let Input::File { specs, stale, .. } = &mut self.input else {
            return;
        };
        match read {
            Read::Unchanged => {}
            Read::Invalid(e) => self.problems.push(Problem::File(e)),
            Read::Services { services, rejected } => {
                tracing::info!(services = services.len(), "config reloaded");
                self.problems
                    .extend(rejected.into_iter().map(Problem::Config));
                *specs = services;
                *stale = true;
            }
        }
    }

    /// Reads the manifests directory (the config file is read in `next`).
    fn read(&mut self, force: bool) {
        match &mut self.input {
            Input::File { .. } | Input::Kube { .. } => {}
            Input::Manifests { dir, index, .. } => match dir.read(force) {
                Ok(Some(load)) => index.load(load, &mut self.problems),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!("manifests directory unreadable, keeping the last state: {e}");
                }
            },
        }
    }

    /// A health check says `backend` is up or down, or (after a restart) the maps do:
    /// a backend restored down stays down until its check passes `rise` times. Only
    /// the config file has health checks.
    pub fn set_health(&mut self, backend: BackendKey, up: bool) {
        if let Input::File { health, stale, .. } = &mut self.input {
            health.insert(backend, up);
            *stale = true;
        }
    }

    /// Brings `desired` to what the source holds now. Nothing changes before the
    /// Kubernetes sources listed every kind once, so a Service seen before its
    /// EndpointSlices never shrinks or flaps.
    pub fn update(&mut self, desired: &mut Desired) -> Update {
        let mut update = Update {
            problems: std::mem::take(&mut self.problems),
            ..Update::default()
        };
        match &mut self.input {
            Input::File {
                specs,
                health,
                stale,
                lb_mode,
                ..
            } => {
                if !std::mem::take(stale) {
                    return update;
                }
                let wanted = model::from_specs(specs, *lb_mode, |service, endpoint| {
                    match health.get(&(service.to_owned(), endpoint)) {
                        Some(false) => Health::Down,
                        _ => Health::Up,
                    }
                });
                update.changed = *desired != wanted;
                if update.changed {
                    *desired = wanted;
                }
                health.retain(|key, _| has_backend(specs, key));
                update.checks = Some(Checks {
                    probes: probes(specs, health),
                    node_ports: BTreeMap::new(),
                });
            }
            Input::Manifests { index, .. } | Input::Kube { index, .. } => {
                if !index.cluster.synced() {
                    return update;
                }
                if self.first {
                    index.dirty = Dirty::All;
                    tracing::info!(
                        services = index.cluster.services.len(),
                        endpointslices = index.cluster.slices.len(),
                        nodes = index.cluster.nodes.len(),
                        "initial lists complete"
                    );
                }
                let dirty = std::mem::replace(&mut index.dirty, Dirty::None);
                let Some(translator) = &mut index.translator else {
                    self.first = false;
                    return update;
                };
                if dirty == Dirty::None {
                    return update;
                }
                let outcome = translator.update(&index.cluster, dirty, desired);
                for note in &outcome.notes {
                    tracing::debug!("{note}");
                }
                update.changed = outcome.changed;
                update
                    .problems
                    .extend(outcome.problems.into_iter().map(Problem::Object));
                update.checks = Some(Checks {
                    probes: BTreeMap::new(),
                    node_ports: translator.health_checks(),
                });
            }
        }
        update.changed |= std::mem::take(&mut self.first);
        update
    }

    /// The Kubernetes objects, once every kind was listed (for the L7 hop).
    pub fn cluster(&self) -> Option<&Cluster> {
        match &self.input {
            Input::Manifests { index, .. } | Input::Kube { index, .. } => {
                Some(&index.cluster).filter(|c| c.synced())
            }
            Input::File { .. } => None,
        }
    }

    /// The config file's services that source-NAT, with each backend family they need
    /// a node address of (`true`: IPv6); empty for the Kubernetes sources, whose
    /// addresses come from the Node object.
    pub fn snat_families(&self) -> Vec<(String, bool)> {
        let Input::File { specs, lb_mode, .. } = &self.input else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for spec in specs {
            if spec.lb_mode.unwrap_or(*lb_mode) != lb_core::mode::LbMode::Snat {
                continue;
            }
            for v6 in [false, true] {
                if spec.backends.iter().any(|b| b.address.is_ipv6() == v6) {
                    out.push((spec.name.clone(), v6));
                }
            }
        }
        out
    }

    /// The API client of `--kube`, for the agent's writes.
    pub fn client(&self) -> Option<&::kube::Client> {
        match &self.input {
            Input::Kube { client, .. } => Some(client),
            _ => None,
        }
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if let Input::Kube { watchers, .. } = &self.input {
            watchers.abort();
        }
    }
}

impl Index {
    fn new(node: &NodeOptions, l4: bool, l7: bool) -> Index {
        Index {
            cluster: Cluster::new(l7),
            translator: l4.then(|| {
                Translator::new(node.name.clone(), node.addresses.clone())
                    .with_lb_mode(node.lb_mode)
            }),
            dirty: Dirty::None,
        }
    }

    fn load(&mut self, Load { events, errors }: Load, problems: &mut Vec<Problem>) {
        problems.extend(errors.into_iter().map(Problem::Manifest));
        for event in events {
            self.dirty.merge(self.cluster.apply(event));
        }
    }
}

/// Reads (and parses and validates) the config file on a blocking thread.
fn spawn_read(mut file: FileSource, force: bool) -> JoinHandle<(FileSource, Read)> {
    tokio::task::spawn_blocking(move || {
        let read = file.read(force);
        (file, read)
    })
}

fn has_backend(specs: &[ServiceSpec], (service, endpoint): &BackendKey) -> bool {
    specs.iter().any(|s| {
        &s.name == service
            && s.backends
                .iter()
                .any(|b| b.address == endpoint.addr && b.port == endpoint.port)
    })
}

/// Every backend that has a health check, with the state it starts in.
fn probes(
    specs: &[ServiceSpec],
    health: &BTreeMap<BackendKey, bool>,
) -> BTreeMap<BackendKey, Target> {
    let mut targets = BTreeMap::new();
    for spec in specs {
        for backend in &spec.backends {
            if let Some(check) = spec.health_for(backend) {
                let endpoint = Endpoint {
                    addr: backend.address,
                    port: backend.port,
                };
                let key = (spec.name.clone(), endpoint);
                let initial_up = health.get(&key).copied().unwrap_or(true);
                targets.insert(
                    key,
                    Target {
                        addr: SocketAddr::new(backend.address, backend.port),
                        check: check.clone(),
                        initial_up,
                    },
                );
            }
        }
    }
    targets
}
