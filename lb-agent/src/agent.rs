//! `lb-agent run`: the standalone agent. One direction of flow:
//! config file + health events -> `model::Desired` -> plan -> the writer task, which
//! alone owns the maps. Stopping the agent leaves the program attached and the maps
//! pinned (forwarding continues); the next agent adopts them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lb_common::HEALTH_DOWN;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AgentState};
use crate::dataplane::Dataplane;
use crate::dataplane::pins::{self, Attachment, ModeChoice};
use crate::health::{HealthEvent, Monitor, Target};
use crate::source::file::{FileSource, Update};
use lb_core::config::ServiceSpec;
use lb_core::model::{self, Desired, Endpoint, Health};
use lb_core::plan::{self, Applied, meta_endpoint, service_name};

/// A backend as health checking knows it: (service name, endpoint).
pub type BackendKey = (String, Endpoint);

mod kubernetes;
mod l7;

/// Where the services come from.
#[derive(Debug, Clone)]
pub enum Source {
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
    pub addresses: Vec<std::net::IpAddr>,
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub source: Source,
    pub node: NodeOptions,
    /// Admin HTTP listener (health, readiness, metrics).
    pub admin: SocketAddr,
    pub interfaces: Vec<String>,
    pub mode: ModeChoice,
    pub pin_dir: PathBuf,
    /// Start from scratch: detach and unpin what a previous agent left.
    pub replace: bool,
    /// How often the file is checked for changes.
    pub poll: Duration,
    /// The L7 hop, when `--l7`.
    pub l7: Option<L7Options>,
    /// Socket load balancing (`--socket-lb`, `--cgroup`): the cgroup hooks serve
    /// Services to the node's pods and processes, with or without `--interface`.
    pub socket_lb: Option<crate::dataplane::sockets::SocketLbOptions>,
}

impl RunOptions {
    /// Whether this agent loads the data plane and writes its maps: for XDP on an
    /// interface, for socket load balancing, or both.
    pub fn dataplane(&self) -> bool {
        !self.interfaces.is_empty() || self.socket_lb.is_some()
    }
}

/// The L7 hop's settings.
#[derive(Debug, Clone)]
pub struct L7Options {
    pub proxy: crate::l7::proxy::ProxyConfig,
    pub class: lb_core::model::ingress::IngressClassConfig,
    /// The L4 Service whose addresses go into the served Ingresses' status.
    pub publish_service: Option<lb_core::cluster::ObjectKey>,
    /// Addresses for the status instead of the publish Service's.
    pub publish_addresses: Vec<std::net::IpAddr>,
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(opts: RunOptions) -> Result<()> {
    if !opts.dataplane() && opts.l7.is_none() {
        bail!("no --interface given: name every interface that receives VIP traffic");
    }
    // Pins need a bpffs under --bpffs; mount one if none is there, before anything is
    // bound, loaded or attached, so a failure leaves nothing behind.
    if opts.dataplane() {
        log_bpffs(&opts.pin_dir, pins::ensure_bpffs(&opts.pin_dir)?);
    }
    let mut parts = 0;
    if opts.dataplane() {
        parts |= admin::PART_DATAPLANE;
    }
    if opts.l7.is_some() {
        parts |= admin::PART_L7;
    }
    // The L7 listeners are bound before anything is attached: a taken port fails the
    // start, not the first request.
    let (state, proxy) = AgentState::with_parts(parts, |registry| {
        opts.l7
            .as_ref()
            .map(|l7| {
                let listener_ports: Vec<u16> = [l7.proxy.http, l7.proxy.https]
                    .into_iter()
                    .flatten()
                    .map(|a| a.port())
                    .collect();
                crate::l7::proxy::Proxy::bind(l7.proxy.clone(), registry)
                    .map_err(|e| crate::capabilities::explain_bind(e, &listener_ports))
            })
            .transpose()
    })?;
    let _admin = admin::start(opts.admin, Arc::clone(&state)).await?;
    match &opts.source {
        Source::Config(path) => run_config(&opts, path.clone(), state).await,
        Source::Kube | Source::Manifests(_) => kubernetes::run(&opts, state, proxy).await,
    }
}

/// Says when the agent had to mount bpffs itself.
fn log_bpffs(pin_dir: &std::path::Path, bpffs: pins::Bpffs) {
    if let pins::Bpffs::Mounted(target) = bpffs {
        tracing::info!(
            pin_dir = %pin_dir.display(),
            "{} was not on a bpf filesystem: mounted bpffs on {} (mount -t bpf bpf {})",
            pin_dir.display(),
            target.display(),
            target.display()
        );
    }
}

/// The config-file agent.
async fn run_config(opts: &RunOptions, config: PathBuf, state: Arc<AgentState>) -> Result<()> {
    // Validate before touching the kernel: a broken file never changes anything.
    let mut source = FileSource::new(&config);
    let specs = match source.read(true) {
        Update::Services { services, rejected } => {
            report_rejected(&rejected);
            state.rejected_objects.inc_by(rejected.len() as u64);
            services
        }
        Update::Invalid(e) => bail!("{e}"),
        Update::Unchanged => unreachable!("a forced read is never unchanged"),
    };

    let (dp, applied) = start_dataplane(opts).map_err(crate::capabilities::explain)?;
    let restored_down: BTreeMap<BackendKey, bool> = applied
        .backends
        .values()
        .filter(|m| m.health == HEALTH_DOWN)
        .filter_map(|m| {
            applied
                .services
                .get(&m.service_id)
                .map(|s| ((service_name(s).to_owned(), meta_endpoint(m)), false))
        })
        .collect();

    let (desired_tx, desired_rx) = watch::channel(Desired::default());
    let writer = tokio::spawn(writer_task(dp, applied, desired_rx, Arc::clone(&state)));

    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<HealthEvent<BackendKey>>();
    let mut monitor = Monitor::new(health_tx);
    let mut health: BTreeMap<BackendKey, bool> = restored_down;
    let mut specs = specs;
    monitor.set_targets(health_targets(&specs, &health));
    publish(&desired_tx, &specs, &health);
    tracing::info!(config = %config.display(), "running");

    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut poll = tokio::time::interval(opts.poll);
    loop {
        let update = tokio::select! {
            _ = poll.tick() => Some(source.read(false)),
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading {}", config.display());
                Some(source.read(true))
            }
            Some(event) = health_rx.recv() => {
                health.insert(event.key, event.up);
                None
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        match update {
            Some(Update::Unchanged) => continue,
            Some(Update::Invalid(e)) => {
                tracing::error!("config rejected, nothing changed: {e}");
                continue;
            }
            Some(Update::Services { services, rejected }) => {
                report_rejected(&rejected);
                state.rejected_objects.inc_by(rejected.len() as u64);
                tracing::info!(services = services.len(), "config reloaded");
                specs = services;
                health.retain(|key, _| has_backend(&specs, key));
                monitor.set_targets(health_targets(&specs, &health));
            }
            None => {}
        }
        publish(&desired_tx, &specs, &health);
    }
    drop(desired_tx);
    writer.await.context("writer task")?;
    stopped(opts);
    Ok(())
}

fn stopped(opts: &RunOptions) {
    tracing::info!(
        dir = %opts.pin_dir.display(),
        "stopped; XDP stays attached and the maps pinned, so traffic keeps flowing \
         (`lb-agent detach` removes them)"
    );
}

/// Loads the program with the pinned maps (adopting them when present), attaches it
/// to every interface, detaches it from pinned interfaces no longer listed, and
/// reads back what the maps hold.
fn start_dataplane(opts: &RunOptions) -> Result<(Dataplane, Applied)> {
    if opts.replace {
        let removed = pins::remove_all(&opts.pin_dir)?;
        if !removed.is_empty() {
            tracing::warn!(dir = %opts.pin_dir.display(), "--replace: removed {}", removed.join(", "));
        }
    }
    let (mut dp, adopted) = Dataplane::load_pinned(None, &opts.pin_dir)?;
    for interface in &opts.interfaces {
        match dp.attach_pinned(interface, opts.mode, &opts.pin_dir)? {
            Attachment::Adopted => {
                tracing::info!(
                    interface,
                    "adopted the pinned XDP link; program replaced in place"
                );
            }
            Attachment::Attached(mode) => {
                tracing::info!(interface, ?mode, "attached XDP");
            }
        }
    }
    for stale in pins::pinned_interfaces(&opts.pin_dir) {
        if !opts.interfaces.contains(&stale) {
            pins::detach_link(&opts.pin_dir, &stale)?;
            tracing::info!(interface = stale, "detached: no longer in --interface");
        }
    }
    crate::dataplane::sockets::start(&mut dp, &opts.pin_dir, opts.socket_lb.as_ref())?;
    for retired in pins::remove_retired(&opts.pin_dir)? {
        tracing::info!(map = retired, "unpinned a map of an earlier layout");
    }
    // Fresh maps hold nothing: reading 600,000 empty entries back would only cost time.
    let applied = if adopted {
        dp.restore()?
    } else {
        Applied::default()
    };
    if adopted {
        tracing::info!(
            services = applied.services.len(),
            backends = applied.backends.len(),
            frontends = applied.frontends.len(),
            "adopted pinned maps; connection tracking kept"
        );
    }
    Ok((dp, applied))
}

fn report_rejected(rejected: &[lb_core::config::ServiceError]) {
    for error in rejected {
        tracing::error!("config: {error}");
    }
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
fn health_targets(
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

fn publish(
    tx: &watch::Sender<Desired>,
    specs: &[ServiceSpec],
    health: &BTreeMap<BackendKey, bool>,
) {
    let desired = model::from_specs(specs, |service, endpoint| {
        match health.get(&(service.to_owned(), endpoint)) {
            Some(false) => Health::Down,
            _ => Health::Up,
        }
    });
    tx.send_if_modified(|current| {
        if *current == desired {
            false
        } else {
            *current = desired;
            true
        }
    });
}

/// The one task that writes maps: plans each new desired state against what the maps
/// hold and applies it. A failed write is retried with the next change or after 1 s.
async fn writer_task(
    mut dp: Dataplane,
    mut applied: Applied,
    mut desired: watch::Receiver<Desired>,
    state: Arc<AgentState>,
) {
    let mut retry = false;
    let slots_ready = dp.slots_ready();
    loop {
        let next = async {
            if retry {
                tokio::time::timeout(Duration::from_secs(1), desired.changed())
                    .await
                    .unwrap_or(Ok(()))
            } else {
                desired.changed().await
            }
        };
        // Backend slots that a flipped-out table may still name are emptied once the
        // kernel has waited for running programs; meanwhile the writer goes on.
        let changed = tokio::select! {
            changed = next => changed,
            () = slots_ready.notified(), if dp.slots_waiting() => {
                if let Err(e) = dp.empty_ready_slots() {
                    tracing::error!("emptying backend slots: {e}");
                }
                continue;
            }
        };
        if changed.is_err() {
            if let Err(e) = dp.settle_slots() {
                tracing::error!("emptying backend slots: {e}");
            }
            return;
        }
        // Planned under the borrow: no copy of the desired state, and the sender waits
        // at most one plan (microseconds when one service changed).
        let started = std::time::Instant::now();
        let (plan, services) = {
            let want = desired.borrow_and_update();
            (plan::plan(&want, &applied), want.services.len())
        };
        let planned = started.elapsed();
        for error in &plan.errors {
            tracing::error!("{error}");
        }
        state.applies.inc();
        state
            .services
            .set(i64::try_from(services).unwrap_or(i64::MAX));
        if plan.ops.is_empty() {
            retry = false;
            state.set_ready();
            continue;
        }
        match dp.apply(&plan, &mut applied) {
            Ok(n) => {
                retry = false;
                state.map_writes.inc_by(n as u64);
                state.set_ready();
                tracing::info!(
                    writes = n,
                    services,
                    plan_ms = planned.as_secs_f64() * 1e3,
                    write_ms = (started.elapsed().saturating_sub(planned)).as_secs_f64() * 1e3,
                    "maps updated"
                );
            }
            Err((done, e)) => {
                retry = true;
                state.map_writes.inc_by(done as u64);
                state.map_write_errors.inc();
                tracing::error!(
                    "map write {} of {} failed: {e}; retrying",
                    done + 1,
                    plan.ops.len()
                );
            }
        }
    }
}
