//! `lb-agent`: the xlb agent.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::agent::{self, NodeOptions, RunOptions, Source};
use lb_agent::dataplane::pins::{self, ModeChoice};

#[derive(Parser)]
#[command(name = "lb-agent", about = "xlb: XDP L4 load balancer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpMode {
    /// In the NIC driver (fast); fails if the driver has no XDP support.
    Native,
    /// In the kernel's generic path (any interface, much slower).
    Generic,
    /// Native, else generic with a warning naming the interface.
    Auto,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the XDP program and keep its maps in step with a config file,
    /// the cluster, or a directory of Kubernetes manifests.
    #[command(group(clap::ArgGroup::new("source").required(true)))]
    Run {
        /// The services (YAML; see examples/xlb.yaml). Reloaded on change and on SIGHUP.
        #[arg(long, group = "source")]
        config: Option<PathBuf>,
        /// Watch Services, EndpointSlices and Nodes of the cluster (in-cluster config,
        /// else KUBECONFIG) and serve every Service as kube-proxy would.
        #[arg(long, group = "source")]
        kube: bool,
        /// Translate the Kubernetes YAML in this directory (Service, EndpointSlice,
        /// Node; multi-document files) as `--kube` would; reloaded on change.
        #[arg(long, group = "source", value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// This node's name: selects its Node object (NodePort addresses) and its local
        /// endpoints (traffic policy Local). Kubernetes sources only.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// NodePort addresses of this node, instead of those of its Node object
        /// (repeatable).
        #[arg(long = "node-address")]
        node_addresses: Vec<std::net::IpAddr>,
        /// Admin HTTP address: /healthz (liveness), /readyz (ready once the first
        /// complete state is in the maps), /metrics.
        #[arg(long, default_value = "0.0.0.0:9190")]
        admin: std::net::SocketAddr,
        /// An interface that receives VIP traffic or sends to backends (repeatable).
        #[arg(long = "interface", required = true)]
        interfaces: Vec<String>,
        #[arg(long, value_enum, default_value = "native")]
        xdp_mode: XdpMode,
        /// bpffs directory for the pinned maps and links.
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Start from scratch: detach and unpin what a previous agent left (drops
        /// tracked connections). Without it, a restarted agent adopts them.
        #[arg(long)]
        replace: bool,
        /// How often to check the config file for changes, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        poll_ms: u64,
    },
    /// Print services, backends (health, share of the table) and counters from the
    /// pinned maps; works with or without a running agent.
    Status {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Detach the XDP program from every interface and remove the pinned maps.
    Detach {
        #[arg(long, default_value = pins::DEFAULT_DIR)]
        bpffs: PathBuf,
    },
    /// Build namespaces, run the agent from examples/xlb.yaml, send traffic through the
    /// VIPs, print the result.
    Demo {
        /// TCP connections per VIP.
        #[arg(long, default_value_t = 300)]
        requests: u32,
    },
}

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
            xdp_mode,
            bpffs,
            replace,
            poll_ms,
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
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(agent::run(opts))
        }
        Command::Status { bpffs, json } => {
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
            let removed = pins::remove_all(&bpffs)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", bpffs.display());
            } else {
                println!("removed from {}: {}", bpffs.display(), removed.join(", "));
            }
            Ok(())
        }
        Command::Demo { requests } => {
            let agent = std::env::current_exe().context("locating the lb-agent binary")?;
            let report = lb_agent::demo::run(&agent, requests)?;
            print!("{report}");
            Ok(())
        }
    }
}
