//! `lb-agent run`: the one agent loop, for every source. One direction of flow:
//! source (config file, manifests or cluster; `source::Source`) -> `model::Desired` ->
//! plan -> the writer task, which alone owns the maps. The loop owns the signals
//! (SIGINT/SIGTERM stop, SIGHUP re-reads the file or directory), the admin endpoint's
//! state, the writer, the health checks (probes of the file's backends,
//! healthCheckNodePorts of the cluster's Services) and the L7 hop; what is written to
//! Kubernetes goes through `kube_writes`.
//!
//! Stopping the agent leaves the program attached and the maps pinned (forwarding
//! continues); the next agent adopts them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lb_common::HEALTH_DOWN;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

use crate::admin::{self, AgentState, PART_L7};
use crate::dataplane::Dataplane;
use crate::dataplane::pins::{self, Attachment, ModeChoice};
use crate::health::{HealthEvent, Monitor};
use crate::kube_writes::KubeWrites;
use crate::service_health::ServiceHealth;
use crate::source::{BackendKey, NodeOptions, Origin, Problem, Source, Update};
use l7::L7Hop;
use lb_core::model::Desired;
use lb_core::plan::{self, Applied, meta_endpoint, service_name};

mod l7;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub source: Origin,
    pub node: NodeOptions,
    /// Admin HTTP listener (health, readiness, metrics).
    pub admin: SocketAddr,
    pub interfaces: Vec<String>,
    /// `--decap-interface`: devices that get the tc ingress program alone (DSR packets
    /// arriving over an overlay).
    pub decap_interfaces: Vec<String>,
    pub mode: ModeChoice,
    pub pin_dir: PathBuf,
    /// Start from scratch: detach and unpin what a previous agent left.
    pub replace: bool,
    /// How often the file or directory is checked for changes.
    pub poll: Duration,
    /// The L7 hop, when `--l7`.
    pub l7: Option<L7Options>,
    /// Backends with their own `/metrics` series (`--metrics-max-backends`).
    pub metrics_max_backends: usize,
    /// Socket load balancing (`--socket-lb`, `--cgroup`): the cgroup hooks serve
    /// Services to the node's pods and processes, with or without `--interface`.
    pub socket_lb: Option<crate::dataplane::sockets::SocketLbOptions>,
    /// `--snat-ports`: the SNAT source port range (host order, inclusive).
    pub snat_ports: (u16, u16),
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

/// Runs until SIGINT or SIGTERM. Without an interface this is an L7-only instance: no
/// XDP, no L4 translation.
pub async fn run(opts: RunOptions) -> Result<()> {
    if !opts.dataplane() && opts.l7.is_none() {
        bail!("no --interface given: name every interface that receives VIP traffic");
    }
    // The data plane's maps serve XDP on `--interface` and the socket hooks.
    let l4 = opts.dataplane();
    if l4 {
        ensure_bpffs(&opts.pin_dir)?;
    }
    let (state, proxy) = bind_listeners(&opts)?;
    let _admin = admin::start(opts.admin, Arc::clone(&state)).await?;

    // Validate before touching the kernel: a broken file never changes anything.
    let mut source =
        Source::open(&opts.source, &opts.node, opts.poll, l4, opts.l7.is_some()).await?;
    check_snat_addresses(&source, &opts)?;
    let to_cluster = source.client().map(|client| {
        let node = opts.node.name.as_deref().unwrap_or("unknown-node");
        KubeWrites::start(client.clone(), node, opts.l7.is_some())
    });
    let (desired_tx, desired_rx) = watch::channel(Desired::default());
    let writer = if l4 {
        state
            .dataplane
            .watch(&opts.pin_dir, opts.metrics_max_backends);
        let (dp, applied) = load_dataplane(&opts).await?;
        for backend in restored_down(&applied) {
            source.set_health(backend, false);
        }
        Some(tokio::spawn(writer_task(
            dp,
            applied,
            desired_rx,
            SnatSource::new(&opts),
            Arc::clone(&state),
        )))
    } else {
        None
    };
    let mut l7 = proxy
        .zip(opts.l7.clone())
        .map(|(proxy, options)| L7Hop::start(proxy, options));
    let (health_tx, mut health_rx) = mpsc::unbounded_channel::<HealthEvent<BackendKey>>();
    let mut probes = Monitor::new(health_tx);
    let mut node_ports = ServiceHealth::default();

    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // When the input the loop is taking in arrived (the reconcile lag starts there).
    let mut seen = std::time::Instant::now();
    loop {
        // The maps first: the L7 snapshot is rebuilt whole, and must not delay them.
        let mut update = Update::default();
        desired_tx.send_if_modified(|desired| {
            update = source.update(desired);
            update.changed
        });
        if update.changed {
            state.reconcile.changed(seen);
        }
        report(&update.problems, &state, to_cluster.as_ref());
        if let Some(checks) = update.checks {
            probes.set_targets(checks.probes);
            node_ports.set(&checks.node_ports).await;
        }
        if let (Some(l7), Some(cluster)) = (&mut l7, source.cluster())
            && let Some(rebuilt) = l7.update(cluster)
        {
            let problems: Vec<Problem> =
                rebuilt.problems.into_iter().map(Problem::Object).collect();
            report(&problems, &state, to_cluster.as_ref());
            if let Some(to_cluster) = &to_cluster {
                to_cluster.ingress_status(rebuilt.status);
            }
            state.part_ready(PART_L7);
        }
        tokio::select! {
            next = source.next() => next?,
            _ = hup.recv() => source.reload(),
            Some(event) = health_rx.recv() => source.set_health(event.key, event.up),
            _ = term.recv() => break,
            _ = int.recv() => break,
            stopped = hop_stopped(l7.as_mut()) => return Err(stopped),
        }
        seen = std::time::Instant::now();
    }
    if let Some(l7) = &mut l7 {
        l7.drain().await;
    }
    drop((l7, to_cluster, source));
    drop(desired_tx);
    if let Some(writer) = writer {
        writer.await.context("writer task")?;
        tracing::info!(
            dir = %opts.pin_dir.display(),
            "stopped; XDP stays attached and the maps pinned, so traffic keeps flowing \
             (`lb-agent detach` removes them)"
        );
    }
    Ok(())
}

/// Why the L7 hop stopped serving, when it does before its drain; never without one.
async fn hop_stopped(l7: Option<&mut L7Hop>) -> anyhow::Error {
    match l7 {
        Some(l7) => l7.stopped().await,
        None => std::future::pending().await,
    }
}

/// The agent's state (and its readiness parts) and the L7 listeners, bound before
/// anything is attached: a taken port fails the start, not the first request.
fn bind_listeners(opts: &RunOptions) -> Result<(Arc<AgentState>, Option<crate::l7::proxy::Proxy>)> {
    let mut parts = 0;
    if opts.dataplane() {
        parts |= admin::PART_DATAPLANE;
    }
    if opts.l7.is_some() {
        parts |= PART_L7;
    }
    AgentState::with_parts(parts, |registry| {
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
    })
}

/// Pins need a bpffs under `--bpffs`: mounts one if none is there, before anything is
/// bound, loaded or attached, so a failure leaves nothing behind; says when it did.
fn ensure_bpffs(pin_dir: &std::path::Path) -> Result<()> {
    if let pins::Bpffs::Mounted(target) = pins::ensure_bpffs(pin_dir)? {
        tracing::info!(
            pin_dir = %pin_dir.display(),
            "{} was not on a bpf filesystem: mounted bpffs on {} (mount -t bpf bpf {})",
            pin_dir.display(),
            target.display(),
            target.display()
        );
    }
    Ok(())
}

/// Logs and counts each problem and, with `--kube`, tells the object's owner with a
/// Warning Event (published off the loop, so a slow API server never delays the maps).
fn report(problems: &[Problem], state: &AgentState, writes: Option<&KubeWrites>) {
    for problem in problems {
        match problem {
            Problem::Config(_) | Problem::File(_) => tracing::error!("{problem}"),
            Problem::Manifest(_) => tracing::warn!("{problem}"),
            Problem::Object(object) => {
                tracing::warn!("{problem}");
                if let Some(writes) = writes {
                    writes.warn(object);
                }
            }
        }
    }
    state.rejected_objects.inc_by(problems.len() as u64);
}

/// Backends the maps hold as down: a restarted agent keeps their health.
fn restored_down(applied: &Applied) -> Vec<BackendKey> {
    applied
        .backends
        .values()
        .filter(|m| m.health == HEALTH_DOWN)
        .filter_map(|m| {
            applied
                .services
                .get(&m.service_id)
                .map(|s| (service_name(s).to_owned(), meta_endpoint(m)))
        })
        .collect()
}

/// A config file's services that source-NAT need this node's address of their backends'
/// family: without a `--node-address` or an address on an `--interface` of that family,
/// the agent refuses to start rather than drop every such flow.
fn check_snat_addresses(source: &Source, opts: &RunOptions) -> Result<()> {
    let needed = source.snat_families();
    // Only XDP source-NATs; the socket hooks translate before a packet exists.
    if needed.is_empty() || opts.interfaces.is_empty() {
        return Ok(());
    }
    let cfg =
        crate::dataplane::snat::config(&opts.node.addresses, &opts.interfaces, opts.snat_ports)?;
    for (service, v6) in needed {
        let family = if v6 {
            lb_common::FAMILY_V6
        } else {
            lb_common::FAMILY_V4
        };
        if cfg.addr(family).is_none() {
            let name = if v6 { "IPv6" } else { "IPv4" };
            bail!(
                "--node-address: service {service} source-NATs (lbMode snat, the default) \
                 to {name} backends, and this node has no {name} address for it: give \
                 --node-address with one, put one on an --interface ({}), or set the \
                 service's lbMode to dnat",
                opts.interfaces.join(", ")
            );
        }
    }
    Ok(())
}

/// The node's SNAT settings as the writer keeps them: the addresses the Kubernetes
/// sources know (the Node object's), completed per family by the interfaces'.
struct SnatSource {
    interfaces: Vec<String>,
    ports: (u16, u16),
    /// The addresses last written; `None`: the ones the agent started with.
    applied: Option<Vec<IpAddr>>,
}

impl SnatSource {
    fn new(opts: &RunOptions) -> SnatSource {
        SnatSource {
            interfaces: opts.interfaces.clone(),
            ports: opts.snat_ports,
            applied: None,
        }
    }

    /// Writes the settings for `addresses` when they changed; a failure is logged and
    /// retried with the next change.
    fn apply(&mut self, dp: &mut Dataplane, addresses: Option<&[IpAddr]>) {
        let Some(addresses) = addresses else { return };
        if self.applied.as_deref() == Some(addresses) {
            return;
        }
        let written = crate::dataplane::snat::config(addresses, &self.interfaces, self.ports)
            .and_then(|cfg| dp.set_snat_config(&cfg).map(|()| cfg));
        match written {
            Ok(cfg) => {
                tracing::info!(
                    "SNAT: {} (node addresses {addresses:?}: --node-address, else the Node \
                     object's InternalIP, else its ExternalIP, else the interface's)",
                    crate::dataplane::snat::describe(&cfg)
                );
                self.applied = Some(addresses.to_vec());
            }
            Err(e) => tracing::error!("writing the SNAT settings: {e}"),
        }
    }
}

/// Loads the program and its maps on a blocking thread: meanwhile the Kubernetes
/// source lists the cluster (loading and creating the maps takes a few hundred
/// milliseconds).
async fn load_dataplane(opts: &RunOptions) -> Result<(Dataplane, Applied)> {
    let opts = opts.clone();
    tokio::task::spawn_blocking(move || start_dataplane(&opts))
        .await
        .context("loading the data plane")?
        .map_err(crate::capabilities::explain)
}

/// Loads the program with the pinned maps (adopting them when present), attaches it
/// to every interface, detaches it from pinned interfaces no longer listed, and
/// reads back what the maps hold. Every interface must exist before anything is
/// attached; a start that fails later removes what it created (links and pins that
/// were not there before), and an adopted earlier state stays as it was.
fn start_dataplane(opts: &RunOptions) -> Result<(Dataplane, Applied)> {
    for interface in &opts.interfaces {
        crate::dataplane::loader::ifindex(interface)
            .with_context(|| "every --interface must exist before XDP is attached anywhere")?;
    }
    for interface in &opts.decap_interfaces {
        crate::dataplane::loader::ifindex(interface)
            .with_context(|| "every --decap-interface must exist before anything is attached")?;
    }
    // Taken before the lock, which creates the directory when it is missing.
    let mut before = pins::Snapshot::take(&opts.pin_dir);
    crate::dataplane::lock::hold(&opts.pin_dir)?; // before anything is read or written
    if opts.replace {
        let removed = pins::remove_all(&opts.pin_dir)?;
        before = pins::Snapshot::take(&opts.pin_dir); // nothing: the directory is gone
        crate::dataplane::lock::hold(&opts.pin_dir)?; // the directory is a new one
        if !removed.is_empty() {
            tracing::warn!(dir = %opts.pin_dir.display(), "--replace: removed {}", removed.join(", "));
        }
    }
    start_pinned(opts).inspect_err(|_| {
        // The Dataplane is dropped by now: unpinned links went with it.
        match before.undo(&opts.pin_dir) {
            Ok(removed) if !removed.is_empty() => {
                tracing::warn!(
                    dir = %opts.pin_dir.display(),
                    "start failed: removed what it created: {}",
                    removed.join(", ")
                );
            }
            Ok(_) => {}
            Err(undo) => {
                tracing::error!("start failed, and removing what it created failed: {undo}");
            }
        }
    })
}

fn start_pinned(opts: &RunOptions) -> Result<(Dataplane, Applied)> {
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
    for interface in &opts.decap_interfaces {
        if !opts.interfaces.contains(interface) {
            dp.attach_decap_pinned(interface, &opts.pin_dir)?;
            tracing::info!(interface, "attached the DSR decapsulation (tc ingress)");
        }
    }
    for stale in pins::decap_interfaces(&opts.pin_dir) {
        if !opts.decap_interfaces.contains(&stale) {
            crate::dataplane::egress::detach_tc(&opts.pin_dir, &stale)?;
            tracing::info!(
                interface = stale,
                "detached: no longer in --decap-interface"
            );
        }
    }
    crate::dataplane::sockets::start(&mut dp, &opts.pin_dir, opts.socket_lb.as_ref())?;
    let snat =
        crate::dataplane::snat::config(&opts.node.addresses, &opts.interfaces, opts.snat_ports)?;
    dp.set_snat_config(&snat)?;
    tracing::info!("SNAT: {}", crate::dataplane::snat::describe(&snat));
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

/// The one task that writes maps: plans each new desired state against what the maps
/// hold and applies it. A failed write is retried with the next change or after 1 s.
async fn writer_task(
    mut dp: Dataplane,
    mut applied: Applied,
    mut desired: watch::Receiver<Desired>,
    mut snat: SnatSource,
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
        // Reconcile-lag hook: the change this plan carries, observed after its writes.
        let seen = state.reconcile.take();
        let (plan, services) = {
            let want = desired.borrow_and_update();
            // The source address first: a new SNAT service must not meet the old one.
            snat.apply(&mut dp, want.snat_addresses.as_deref());
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
                state.reconcile.applied(seen);
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
                state.reconcile.failed(seen);
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
