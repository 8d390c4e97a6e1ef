//! `lb-agent`: the xlb agent. Today it runs the demo; the config-file and Kubernetes
//! modes come with the agent issues.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lb-agent", about = "xlb: XDP L4 load balancer agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build namespaces, attach XDP, send traffic through VIPs, print the result.
    Demo {
        /// Backends behind each VIP.
        #[arg(long, default_value_t = 3)]
        backends: usize,
        /// TCP connections per VIP.
        #[arg(long, default_value_t = 300)]
        requests: u32,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo { backends, requests } => {
            println!(
                "xlb demo: client -> VIPs 203.0.113.10 and 2001:db8:f::10 (port 80) -> XDP on the \
                 load-balancer node -> {backends} backends, {requests} TCP connections per VIP"
            );
            let report = lb_agent::demo::run(backends, requests)?;
            print!("{report}");
            println!("namespaces removed; done.");
        }
    }
    Ok(())
}
