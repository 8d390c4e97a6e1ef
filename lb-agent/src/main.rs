//! `lb-agent`: the xlb agent.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser as _;
use lb_agent::agent::{self, L7Options, RunOptions};
use lb_agent::cli::{Cli, Command, IngressCommand, L7Args, XdpMode};
use lb_agent::dataplane::pins::{self, ModeChoice};
use lb_agent::l7::headers::ForwardedTrust;
use lb_agent::l7::proxy::ProxyConfig;
use lb_agent::source::{NodeOptions, Origin};
use lb_core::cluster::ObjectKey;
use lb_core::model::ingress::IngressClassConfig;
use lb_core::model::ingress::annotations::Defaults;

/// The L7 hop allocates per request (headers, bodies, futures); mimalloc's per-thread
/// free lists cost less than glibc's arenas there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let command = Cli::parse().command;
    let outcome = match command {
        Command::Ingress(IngressCommand::Check {
            kube,
            manifests,
            l7_ingress_class,
            l7_controller_name,
            annotations_prefix,
            json,
        }) => {
            let class = IngressClassConfig {
                name: l7_ingress_class,
                controller: l7_controller_name,
                annotations_prefix,
                defaults: Defaults::default(),
            };
            // Exit status 2: something would be served differently.
            ingress_check(kube, manifests.as_deref(), &class, json).map(|differs| {
                if differs {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                }
            })
        }
        other => run(other).map(|()| ExitCode::SUCCESS),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lb-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
fn run(command: Command) -> Result<()> {
    match command {
        Command::Run {
            config,
            kube,
            manifests,
            node_name,
            node_addresses,
            lb_mode,
            snat_ports,
            admin,
            interfaces,
            decap_interfaces,
            socket_lb,
            cgroup,
            socket_lb_host_only,
            xdp_mode,
            bpffs,
            replace,
            poll_ms,
            l7,
            metrics_max_backends,
        } => {
            let source = match (config, manifests) {
                (Some(path), _) => Origin::Config(path),
                (None, Some(dir)) => Origin::Manifests(dir),
                (None, None) => {
                    debug_assert!(kube, "clap requires one source");
                    Origin::Kube
                }
            };
            let opts = RunOptions {
                source,
                node: NodeOptions {
                    name: node_name,
                    addresses: node_addresses,
                    lb_mode,
                },
                snat_ports,
                admin,
                interfaces,
                decap_interfaces,
                mode: match xdp_mode {
                    XdpMode::Native => ModeChoice::Native,
                    XdpMode::Generic => ModeChoice::Generic,
                    XdpMode::Auto => ModeChoice::Auto,
                },
                pin_dir: bpffs,
                replace,
                poll: Duration::from_millis(poll_ms.max(10)),
                l7: l7_options(&l7)?,
                metrics_max_backends,
                socket_lb: socket_lb_options(socket_lb, cgroup, socket_lb_host_only),
            };
            // The control loop needs one thread. With the L7 hop (which runs its own
            // workers), two: a rebuild of a large route table must not hold up the
            // admin server's probes.
            let mut runtime = if opts.l7.is_some() {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(2);
                builder
            } else {
                tokio::runtime::Builder::new_current_thread()
            };
            runtime
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(agent::run(opts))
        }
        Command::Status {
            bpffs,
            json,
            stats: per_second,
            interval,
        } => status(&bpffs, json, per_second.then_some(interval)),
        Command::Trace {
            proto,
            src,
            dst,
            json,
            bpffs,
            nodes,
        } => trace(&proto, &src, &dst, json, &bpffs, &nodes),
        Command::Detach { bpffs } => detach(&bpffs),
        Command::Ingress(IngressCommand::Check { .. }) => {
            anyhow::bail!("`ingress check` sets its own exit status")
        }
    }
}

/// `lb-agent ingress check`: prints the report; `true` when something would be
/// served differently.
fn ingress_check(
    kube: bool,
    manifests: Option<&Path>,
    class: &IngressClassConfig,
    json: bool,
) -> Result<bool> {
    let cluster = match manifests {
        Some(dir) => lb_agent::ingress_check::cluster_from_manifests(dir)?,
        None if kube => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(lb_agent::ingress_check::cluster_from_kube(
                std::time::Duration::from_mins(1),
            ))?,
        None => anyhow::bail!("name --kube or --manifests DIR"),
    };
    let report = lb_agent::ingress_check::report(&cluster, class);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(report.differs)
}

/// `lb-agent status [--stats --interval SECS]`.
fn status(bpffs: &Path, json: bool, stats_interval: Option<f64>) -> Result<()> {
    let probe = pins::probe_fs(bpffs)?;
    if !probe.is_bpffs() {
        anyhow::bail!(
            "nothing pinned under {}: it is not on a bpf filesystem ({}), so no agent has run \
             with this --bpffs directory; `lb-agent run` mounts bpffs when it starts (or: \
             mount -t bpf bpf {})",
            bpffs.display(),
            probe.describe(),
            pins::BPFFS_ROOT
        );
    }
    if let Some(interval) = stats_interval {
        return stats(bpffs, json, interval);
    }
    let report = lb_agent::status::Report::read(bpffs)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        // One write: stdout is line-buffered, and 10,000 services are 100,000 lines.
        let text = report.to_string();
        print!("{text}");
    }
    Ok(())
}

/// `lb-agent detach`.
fn detach(bpffs: &Path) -> Result<()> {
    let probe = pins::probe_fs(bpffs)?;
    if !probe.is_bpffs() {
        println!(
            "nothing pinned under {}: it is not on a bpf filesystem ({}), so there is nothing \
             to detach",
            bpffs.display(),
            probe.describe()
        );
        return Ok(());
    }
    if let Some(pid) = lb_agent::dataplane::lock::holder(bpffs) {
        tracing::warn!(
            "agent PID {pid} is running on {}: detaching under it stops its traffic",
            bpffs.display()
        );
    }
    let removed = pins::remove_all(bpffs)?;
    if removed.is_empty() {
        println!("nothing pinned under {}", bpffs.display());
    } else {
        println!("removed from {}: {}", bpffs.display(), removed.join(", "));
    }
    Ok(())
}

/// `lb-agent status --stats`.
fn stats(bpffs: &Path, json: bool, interval: f64) -> Result<()> {
    if !(interval.is_finite() && interval > 0.0 && interval <= 3600.0) {
        anyhow::bail!("--interval {interval}: expected seconds in (0, 3600]");
    }
    let rates = lb_agent::status::Rates::measure(bpffs, Duration::from_secs_f64(interval))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rates)?);
    } else {
        print!("{rates}");
    }
    Ok(())
}

/// `lb-agent trace`: from the local maps, or from every `--nodes` admin endpoint.
fn trace(
    proto: &str,
    src: &str,
    dst: &str,
    json: bool,
    bpffs: &Path,
    nodes: &[String],
) -> Result<()> {
    let query = lb_agent::trace::Query::parse(proto, src, dst)?;
    if nodes.is_empty() {
        let dp = lb_agent::dataplane::Dataplane::open_pinned(bpffs)
            .with_context(|| format!("opening the maps pinned under {}", bpffs.display()))?;
        let t = lb_agent::trace::trace(&dp, &query)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&t)?);
        } else {
            print!("{t}");
        }
        return Ok(());
    }
    let traces = lb_agent::trace::ask_nodes(nodes, proto, src, dst)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&traces)?);
    } else {
        for t in &traces {
            print!("{t}");
        }
    }
    Ok(())
}

/// `--socket-lb`, `--cgroup DIR` and `--socket-lb-host-only` each turn it on.
fn socket_lb_options(
    on: bool,
    cgroup: Option<std::path::PathBuf>,
    host_only: bool,
) -> Option<lb_agent::dataplane::sockets::SocketLbOptions> {
    (on || cgroup.is_some() || host_only)
        .then_some(lb_agent::dataplane::sockets::SocketLbOptions { cgroup, host_only })
}

fn l7_options(args: &L7Args) -> Result<Option<L7Options>> {
    if !args.l7 {
        return Ok(None);
    }
    let publish_service = args
        .l7_publish_service
        .as_deref()
        .map(|text| {
            let (namespace, name) = text
                .split_once('/')
                .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
                .with_context(|| {
                    format!("--l7-publish-service {text:?}: expected NAMESPACE/NAME")
                })?;
            Ok::<_, anyhow::Error>(ObjectKey::new(namespace, name))
        })
        .transpose()?;
    Ok(Some(L7Options {
        proxy: ProxyConfig {
            connect_timeout: args.l7_connect_timeout,
            header_timeout: args.l7_header_timeout,
            idle_timeout: args.l7_idle_timeout,
            upstream_timeout: args.l7_request_timeout,
            send_timeout: args.l7_send_timeout,
            max_header_bytes: args.l7_max_header_bytes,
            max_body_bytes: args.l7_max_body,
            dns_refresh: args.l7_dns_refresh,
            drain_grace: args.l7_drain_grace,
            ssl_passthrough: args.l7_enable_ssl_passthrough,
            workers: args.l7_workers.map_or_else(
                || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
                std::num::NonZeroUsize::get,
            ),
            forwarded: ForwardedTrust {
                use_forwarded_headers: args.l7_use_forwarded_headers,
                compute_full_forwarded_for: args.l7_compute_full_forwarded_for,
            },
            ..ProxyConfig::new(Some(args.l7_http), Some(args.l7_https))
        },
        class: IngressClassConfig {
            name: args.l7_ingress_class.clone(),
            controller: args.l7_controller_name.clone(),
            annotations_prefix: args.annotations_prefix.clone(),
            defaults: Defaults {
                ssl_redirect: args.l7_ssl_redirect,
            },
        },
        publish_service,
        publish_addresses: args.l7_publish_addresses.clone(),
    }))
}
