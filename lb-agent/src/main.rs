//! `lb-agent`: the xlb agent.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser as _;
use lb_agent::agent::{self, L7Options, NodeOptions, RunOptions, Source};
use lb_agent::cli::{Cli, Command, L7Args, XdpMode};
use lb_agent::dataplane::pins::{self, ModeChoice};
use lb_agent::l7::proxy::ProxyConfig;
use lb_core::cluster::ObjectKey;
use lb_core::model::ingress::IngressClassConfig;

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
        .init();
    match run(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
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
            admin,
            interfaces,
            socket_lb,
            cgroup,
            socket_lb_host_only,
            xdp_mode,
            bpffs,
            replace,
            poll_ms,
            l7,
        } => {
            let source = match (config, manifests) {
                (Some(path), _) => Source::Config(path),
                (None, Some(dir)) => Source::Manifests(dir),
                (None, None) => {
                    debug_assert!(kube, "clap requires one source");
                    Source::Kube
                }
            };
            let opts = RunOptions {
                source,
                node: NodeOptions {
                    name: node_name,
                    addresses: node_addresses,
                },
                admin,
                interfaces,
                mode: match xdp_mode {
                    XdpMode::Native => ModeChoice::Native,
                    XdpMode::Generic => ModeChoice::Generic,
                    XdpMode::Auto => ModeChoice::Auto,
                },
                pin_dir: bpffs,
                replace,
                poll: Duration::from_millis(poll_ms.max(10)),
                l7: l7_options(&l7)?,
                socket_lb: socket_lb_options(socket_lb, cgroup, socket_lb_host_only),
            };
            // The control loop needs one thread; the L7 hop serves on every CPU.
            let mut runtime = if opts.l7.is_some() {
                tokio::runtime::Builder::new_multi_thread()
            } else {
                tokio::runtime::Builder::new_current_thread()
            };
            runtime
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(agent::run(opts))
        }
        Command::Status { bpffs, json } => {
            let probe = pins::probe_fs(&bpffs)?;
            if !probe.is_bpffs() {
                anyhow::bail!(
                    "nothing pinned under {}: it is not on a bpf filesystem ({}), so no agent \
                     has run with this --bpffs directory; `lb-agent run` mounts bpffs when it \
                     starts (or: mount -t bpf bpf {})",
                    bpffs.display(),
                    probe.describe(),
                    pins::BPFFS_ROOT
                );
            }
            let report = lb_agent::status::Report::read(&bpffs)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                // One write: stdout is line-buffered, and 10,000 services are 100,000 lines.
                let text = report.to_string();
                print!("{text}");
            }
            Ok(())
        }
        Command::Detach { bpffs } => {
            let probe = pins::probe_fs(&bpffs)?;
            if !probe.is_bpffs() {
                println!(
                    "nothing pinned under {}: it is not on a bpf filesystem ({}), so there is \
                     nothing to detach",
                    bpffs.display(),
                    probe.describe()
                );
                return Ok(());
            }
            let removed = pins::remove_all(&bpffs)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", bpffs.display());
            } else {
                println!("removed from {}: {}", bpffs.display(), removed.join(", "));
            }
            Ok(())
        }
    }
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
            max_header_bytes: args.l7_max_header_bytes,
            max_body_bytes: args.l7_max_body,
            dns_refresh: args.l7_dns_refresh,
            ..ProxyConfig::new(Some(args.l7_http), Some(args.l7_https))
        },
        class: IngressClassConfig {
            name: args.l7_ingress_class.clone(),
        },
        publish_service,
        publish_addresses: args.l7_publish_addresses.clone(),
    }))
}
