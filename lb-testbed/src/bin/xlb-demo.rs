//! `xlb-demo` (behind `cargo xtask demo`): namespaces for a client, the load-balancer
//! node and three backends; the real agent (`lb-agent run --config examples/xlb.yaml`)
//! in the load-balancer namespace; HTTP requests through both VIPs; who answered, and
//! `lb-agent status`. Part of the test harness, not of the shipped agent.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "xlb-demo",
    about = "Run xlb's demo topology and print what it served"
)]
struct Args {
    /// TCP connections per VIP.
    #[arg(long, default_value_t = 300)]
    requests: u32,
    /// The agent binary (default: `lb-agent` beside this binary, as `cargo xtask demo`
    /// builds both).
    #[arg(long)]
    agent: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xlb-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let agent = match &args.agent {
        Some(path) => path.clone(),
        None => lb_testbed::agent::sibling_agent_binary()?,
    };
    let report = lb_testbed::demo::run(&agent, args.requests)?;
    print!("{report}");
    Ok(())
}
