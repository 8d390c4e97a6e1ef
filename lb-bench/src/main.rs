//! Benchmarks (run through `cargo xtask bench <name>`). Every figure is printed next to a
//! baseline measured in the same run, as a ratio, with the command that reproduces it;
//! `--json FILE` writes the results.
//!
//! - `packet`: per-packet cost of the XDP program, stage by stage, against a trivial
//!   `XDP_PASS` program; new flows over a filling conntrack table; instruction counts.
//! - `maglev`: Maglev table build time against the paper's plain fill, plus balance and
//!   disruption.
//! - `e2e`: HTTP and TCP through a load-balancer namespace, xlb against kube-proxy's
//!   iptables and nftables rules; `--topology cluster`: HTTP through a three-node
//!   cluster behind an ECMP router, every node programmed by xlb agents or kube-proxy.
//! - `control-plane`: full sync and change-to-map latency at 10,000 Services, the agent
//!   against iptables-restore and nft installing kube-proxy's rules.
//! - `l7`: the L7 hop against nginx serving the same Ingress routes: requests/s and
//!   latency for keep-alive HTTP, HTTPS and a new connection per request.
//! - `chaos`: an endpoint killed, the agent killed and restarted, a broken config and
//!   10,000 hostile HTTP requests, under a stream of new L4 connections and keep-alive
//!   L7 requests through the demo topology: failures, p99 and the hop's counts.
//! - `socket`: connect + request + close from a pod to a ClusterIP, xlb's socket hooks
//!   against kube-proxy's iptables and nftables rules and a direct connection.

mod chaos;
mod control_plane;
mod e2e;
mod kube_proxy;
mod l7;
mod maglev;
mod packet;
mod report;
mod socket;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "xlb benchmarks; each prints ratios against a baseline from the same run")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Per-packet cost of the XDP program, stage by stage, against a trivial `XDP_PASS`
    /// program, new flows over a conntrack table that fills, and the programs' sizes.
    Packet(packet::Args),
    /// Maglev table build time (M = 65537, N = 1000) against the paper's plain fill, and
    /// the table's balance and disruption.
    Maglev(maglev::Args),
    /// HTTP requests/s, latency, new connections/s and TCP throughput through a
    /// load-balancer namespace: kube-proxy's iptables rules, its nftables rules, and xlb.
    E2e(e2e::Args),
    /// 10,000 Services x 10 endpoints: full sync and endpoint-change latency of the agent
    /// (`--kube` against the test API server), against iptables-restore and nft installing
    /// kube-proxy's rules.
    ControlPlane(control_plane::Args),
    /// The L7 hop against nginx (same routes, backends, client and run): wrk requests/s,
    /// p50 and p99 for keep-alive HTTP, HTTPS and a new connection per request.
    L7(l7::Args),
    /// Connect + request + close per second and CPU per connection from a pod to a
    /// ClusterIP: xlb's socket hooks against kube-proxy's iptables and nftables rules
    /// and a direct connection.
    Socket(socket::Args),
    /// Failures and p99 under traffic when an endpoint dies, the agent is killed and
    /// restarted, or the config is replaced by a broken one; the hostile-HTTP counts.
    Chaos(chaos::Args),
    /// The socket benchmark's client process (started by `socket`).
    #[command(hide = true)]
    SocketClient(socket::ClientArgs),
    /// The L7 benchmark's floor proxy (started by `l7 --floor`).
    #[command(hide = true)]
    L7Floor(l7::floor::Args),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().bench {
        Bench::Packet(args) => packet::run(&args),
        Bench::Maglev(args) => maglev::run(&args),
        Bench::E2e(args) => e2e::run(&args),
        Bench::ControlPlane(args) => control_plane::run(&args),
        Bench::L7(args) => l7::run(&args),
        Bench::Socket(args) => socket::run(&args),
        Bench::Chaos(args) => chaos::run(&args),
        Bench::SocketClient(args) => socket::client(&args),
        Bench::L7Floor(args) => l7::floor::serve(&args),
    }
}
