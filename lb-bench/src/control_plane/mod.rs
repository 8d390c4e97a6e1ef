//! `xlb-bench control-plane`: how fast Services reach the data plane, at cluster scale
//! (10,000 ClusterIP Services x 10 endpoints by default), xlb against the two kube-proxy
//! modes, all in one run:
//!
//! - `iptables`: `iptables-restore` of kube-proxy's iptables-mode rules, and one endpoint
//!   change as its partial sync writes it (`--noflush`);
//! - `nftables`: `nft -f` of kube-proxy's nftables-mode table, and one change as its
//!   incremental transaction;
//! - `inprocess`: xlb's translation, plan and map writes in this process against a
//!   loaded data plane (the same step the two tools are: installing a known state);
//! - `agent`: the real `lb-agent run --kube` against the test API server: start to
//!   `/readyz` (the first complete state in the maps), EndpointSlice change to map
//!   write, peak RSS.
//!
//! Targets (issue 4): full sync <= 2 s, change-to-map p99 <= 10 ms, both for the agent.
//! Only ClusterIP frontends, one TCP port per Service (kube-proxy's rules for NodePort,
//! external IPs and load balancers would make its rule sets larger still).

mod agent;
mod cluster;
mod inprocess;
mod netfilter;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use self::cluster::Synthetic;
use self::netfilter::{Baseline, Mode};
use crate::report::{self, mark, percentile, ratio};

const TARGET_SYNC_S: f64 = 2.0;
const TARGET_CHANGE_P99_S: f64 = 0.010;

#[derive(clap::Args)]
pub struct Args {
    /// ClusterIP Services, one TCP port each.
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Ready endpoints per Service (1..=10).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// Endpoint changes measured on the agent and in process (each swaps one endpoint
    /// of a different Service).
    #[arg(long, default_value_t = 200)]
    changes: usize,
    /// Pause between two changes (the next change starts from a quiet agent).
    #[arg(long, default_value_t = 50)]
    change_gap_ms: u64,
    /// Full installs of each kube-proxy rule set (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// One-endpoint changes applied with each kube-proxy mode.
    #[arg(long, default_value_t = 5)]
    baseline_changes: usize,
    /// What to measure, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "iptables,nftables,inprocess,agent"
    )]
    configs: Vec<Config>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Iptables,
    Nftables,
    Inprocess,
    Agent,
}

#[derive(Debug, Default, serde::Serialize)]
struct Results {
    iptables: Option<Baseline>,
    nftables: Option<Baseline>,
    inprocess: Option<inprocess::InProcess>,
    agent: Option<agent::AgentRun>,
}

pub fn run(args: &Args) -> Result<()> {
    let cluster = Synthetic::new(args.services, args.endpoints)?;
    let command = format!(
        "cargo xtask bench control-plane --services {} --endpoints {} --changes {} \
         --change-gap-ms {} --runs {} --baseline-changes {}",
        args.services,
        args.endpoints,
        args.changes,
        args.change_gap_ms,
        args.runs,
        args.baseline_changes
    );
    let load = report::load_line();
    let mut results = Results::default();
    for config in &args.configs {
        eprintln!("measuring {config:?} ...");
        match config {
            Config::Iptables => {
                results.iptables = Some(netfilter::measure(
                    Mode::Iptables,
                    &cluster,
                    args.runs,
                    args.baseline_changes,
                )?);
            }
            Config::Nftables => {
                results.nftables = Some(netfilter::measure(
                    Mode::Nftables,
                    &cluster,
                    args.runs,
                    args.baseline_changes,
                )?);
            }
            Config::Inprocess => {
                results.inprocess = Some(inprocess::measure(&cluster, args.changes)?);
            }
            Config::Agent => {
                results.agent = Some(agent::measure(
                    &cluster,
                    args.changes,
                    Duration::from_millis(args.change_gap_ms),
                )?);
            }
        }
    }
    let summary = print(&cluster, &results, &command, &load);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "benchmark": "control-plane",
            "command": command,
            "machine": load,
            "services": cluster.services,
            "endpoints_per_service": cluster.endpoints,
            "targets": {"full_sync_s": TARGET_SYNC_S, "change_to_map_p99_s": TARGET_CHANGE_P99_S},
            "summary": summary,
            "results": results,
        }),
    )
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        percentile(&v, 50.0)
    }
}

fn p(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        percentile(&v, q)
    }
}

/// Seconds, in the unit that reads best.
fn secs(s: f64) -> String {
    if s.is_nan() {
        "-".into()
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 0.001 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.0} us", s * 1e6)
    }
}

fn times(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.1}x"))
}

/// Prints the table; returns the headline figures for the JSON.
fn print(cluster: &Synthetic, r: &Results, command: &str, load: &str) -> serde_json::Value {
    println!(
        "\nxlb-bench control-plane: {} ClusterIP Services x {} endpoints ({} endpoints), \
         one TCP port each",
        cluster.services,
        cluster.endpoints,
        cluster.services * cluster.endpoints
    );
    println!(
        "  VIPs 203.0.113.1.. x 250 ports each; endpoints 192.0.2.0/24 x {} ports",
        cluster.services.div_ceil(20)
    );
    println!("reproduce: {command}");
    println!("{load}\n");
    print_full(r);
    print_changes(r);
    if let Some(a) = &r.agent {
        println!(
            "\nagent peak RSS (VmHWM): {:.1} MiB after the sync, {:.1} MiB after the changes; \
             resident at the end {:.1} MiB",
            kib_to_mib(a.rss_after_sync_kib),
            kib_to_mib(a.peak_rss_kib),
            kib_to_mib(a.rss_kib)
        );
    }
    println!(
        "\nThe test API server runs in this process and shares the CPUs with the agent. The \
         iptables and nftables times are the tools alone (kube-proxy's own list, watch and \
         rule generation come on top); the agent's sync includes loading the XDP program, \
         listing every object from the API server, translating and writing."
    );
    summary(r)
}

fn inprocess_install(r: &Results) -> f64 {
    r.inprocess
        .as_ref()
        .map_or(f64::NAN, |i| i.translate_s + i.plan_s + i.apply_s)
}

fn print_full(r: &Results) {
    println!("full sync (an empty data plane to every Service)          time      vs xlb install");
    let base = inprocess_install(r);
    for (label, b) in [
        ("iptables-restore, kube-proxy iptables mode", &r.iptables),
        ("nft -f, kube-proxy nftables mode          ", &r.nftables),
    ] {
        if let Some(b) = b {
            let t = median(&b.full_s);
            println!(
                "  {label} ({} rules, median of {})   {:>9}   {}",
                b.rules,
                b.full_s.len(),
                secs(t),
                times(ratio(t, base))
            );
        }
    }
    if let Some(i) = &r.inprocess {
        println!(
            "  xlb install in process: translate {} + plan {} + {} writes {}   {:>9}   1.0x",
            secs(i.translate_s),
            secs(i.plan_s),
            i.writes,
            secs(i.apply_s),
            secs(base)
        );
    }
    if let Some(a) = &r.agent {
        println!(
            "  xlb agent: start to /readyz (load, list, translate, write)   {:>9}   target <= {}: {}",
            secs(a.ready_s),
            secs(TARGET_SYNC_S),
            mark(a.ready_s <= TARGET_SYNC_S)
        );
        println!(
            "    maps then held {} services, {} backends, {} frontends",
            a.services_in_maps, a.backends_in_maps, a.frontends_in_maps
        );
        let t = &a.timeline;
        let opt = |v: Option<f64>| v.map_or_else(|| "?".into(), secs);
        println!(
            "    agent log: first line to lists complete {}, then plan {} and writes {}",
            opt(t.lists_complete),
            opt(t.first_plan),
            opt(t.first_write)
        );
    }
}

fn change_met(a: &agent::AgentRun) -> bool {
    a.timeouts == 0 && p(&a.change_s, 99.0) <= TARGET_CHANGE_P99_S
}

fn print_changes(r: &Results) {
    println!(
        "\none endpoint change                                       p50        p99     vs xlb agent p50"
    );
    let agent_p50 = r.agent.as_ref().map_or(f64::NAN, |a| p(&a.change_s, 50.0));
    for (label, b) in [
        ("iptables-restore --noflush (partial sync)", &r.iptables),
        ("nft -f (incremental transaction)         ", &r.nftables),
    ] {
        if let Some(b) = b {
            println!(
                "  {label}            {:>9}  {:>9}   {}  ({} bytes of input)",
                secs(p(&b.change_s, 50.0)),
                secs(p(&b.change_s, 99.0)),
                times(ratio(p(&b.change_s, 50.0), agent_p50)),
                b.change_bytes
            );
        }
    }
    if let Some(i) = &r.inprocess {
        println!(
            "  xlb in process: index + translate + plan                {:>9}  {:>9}",
            secs(p(&i.change_plan_s, 50.0)),
            secs(p(&i.change_plan_s, 99.0))
        );
        println!(
            "  xlb in process: writes (old slot emptied later, off this path) {:>9}  {:>9}",
            secs(p(&i.change_apply_s, 50.0)),
            secs(p(&i.change_apply_s, 99.0))
        );
    }
    if let Some(a) = &r.agent {
        println!(
            "  xlb agent: API server update to map write ({} changes)   {:>9}  {:>9}   target p99 <= {}: {}{}",
            a.change_s.len(),
            secs(agent_p50),
            secs(p(&a.change_s, 99.0)),
            secs(TARGET_CHANGE_P99_S),
            mark(change_met(a)),
            if a.timeouts > 0 {
                format!(" ({} changes not seen within 10 s)", a.timeouts)
            } else {
                String::new()
            }
        );
    }
}

/// The headline figures, for the JSON.
fn summary(r: &Results) -> serde_json::Value {
    let base = inprocess_install(r);
    let full = |b: &Option<Baseline>| b.as_ref().map(|b| median(&b.full_s));
    let change = |b: &Option<Baseline>| b.as_ref().map(|b| p(&b.change_s, 50.0));
    serde_json::json!({
        "iptables_full_s": full(&r.iptables),
        "nftables_full_s": full(&r.nftables),
        "xlb_inprocess_full_s": r.inprocess.as_ref().map(|_| base),
        "xlb_agent_ready_s": r.agent.as_ref().map(|a| a.ready_s),
        "full_sync_target_met": r.agent.as_ref().map(|a| a.ready_s <= TARGET_SYNC_S),
        "iptables_change_p50_s": change(&r.iptables),
        "nftables_change_p50_s": change(&r.nftables),
        "xlb_agent_change_p50_s": r.agent.as_ref().map(|a| p(&a.change_s, 50.0)),
        "xlb_agent_change_p99_s": r.agent.as_ref().map(|a| p(&a.change_s, 99.0)),
        "change_target_met": r.agent.as_ref().map(change_met),
        "iptables_over_xlb_install": full(&r.iptables).and_then(|t| ratio(t, base)),
        "nftables_over_xlb_install": full(&r.nftables).and_then(|t| ratio(t, base)),
        "agent_peak_rss_kib": r.agent.as_ref().map(|a| a.peak_rss_kib),
    })
}

#[expect(clippy::cast_precision_loss, reason = "memory sizes")]
fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
