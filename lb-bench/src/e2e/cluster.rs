//! `xlb-bench e2e --topology cluster`: HTTP through the three-node cluster of
//! `lb_testbed::cluster` (client -> router, ECMP over the nodes by 5-tuple -> node ->
//! pod, host-gw pod network), with every node programmed one way at a time: kube-proxy's
//! iptables rules, its nftables rules, xlb agents in SNAT mode, xlb agents in DSR mode
//! (when the agent has that mode; otherwise the report says it is not built).
//!
//! Every configuration gets a cluster of its own, built before and deleted after it, so
//! no rule, program, conntrack entry or `TIME_WAIT` socket of one configuration can
//! touch the next. The Service is the scenarios' `web` (`externalTrafficPolicy:
//! Cluster`, every pod an endpoint, LB IP 203.0.113.100:80), programmed by the same
//! [`NodeProgram`]s the cluster tests run; every pod runs the harness's HTTP server.
//!
//! Per configuration: a probe (a bounded number of single connections through each node
//! alone, the router's route to the LB IP narrowed to that node) that says which pods
//! each node reaches and which connections failed, then wrk keep-alive (requests/s) and
//! wrk with `Connection: close` (new connections/s), each `--secs` long. CPU is counted
//! as the lb topology counts it ([`super::measure`]): the load generator's, the pod
//! servers' and all softirq time on the machine (every namespace's forwarding, NAT, XDP,
//! tc and TCP receive work), over the requests; the agents' user-space time and other
//! processes are left out. Every failed connection is counted: wrk's socket errors
//! (connect, read, write, timeout) and non-2xx answers, and the probe's failures.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lb_testbed as testbed;
use lb_testbed::cluster::kube_proxy::KubeProxyIptables;
use lb_testbed::cluster::kube_proxy_nft::KubeProxyNftables;
use lb_testbed::cluster::scenarios::{self, POD_PORT, WEB};
use lb_testbed::cluster::xlb::XlbAgents;
use lb_testbed::cluster::{
    Cluster, ClusterConfig, ClusterService, NodeProgram, PodNetwork, PodSees,
};

use super::load::{self, Wrk, WrkResult};
use super::{Args, Config, Measured, check_interrupted, check_tools};
use crate::report::{self, mark, ratio};

/// The target: xlb's CPU per new connection at most this times iptables'.
const TARGET_CPU_PER_CONNECTION: f64 = 0.8;

/// Connections the probe makes through each node alone.
const PROBE_PER_NODE: usize = 24;

/// The probe stops trying a node after this many failures (each may take the timeout).
const PROBE_MAX_FAILURES: usize = 6;

/// Deadline of one probe connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the probe found through one node.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct NodeProbe {
    node: String,
    /// Answers per pod name.
    answered: BTreeMap<String, u32>,
    failed: u32,
    /// Not tried because the node had already failed [`PROBE_MAX_FAILURES`] times.
    untried: u32,
    /// The first failures' errors.
    errors: Vec<String>,
}

/// One configuration's run.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    config: &'static str,
    round: u32,
    probe: Vec<NodeProbe>,
    keep_alive: Measured<WrkResult>,
    close: Measured<WrkResult>,
    /// Pod names in the order of `per_backend`.
    pods: Vec<String>,
    problems: Vec<String>,
}

impl Run {
    /// Every failed connection: the probe's and wrk's (both runs).
    fn failed(&self) -> u64 {
        self.probe_failed() + self.keep_alive.result.errors + self.close.result.errors
    }

    fn probe_failed(&self) -> u64 {
        self.probe.iter().map(|p| u64::from(p.failed)).sum()
    }
}

/// A configuration that could not run at all (the mode is not built).
#[derive(Debug, Clone, serde::Serialize)]
struct NotRun {
    config: &'static str,
    why: String,
}

pub(super) fn run(args: &Args) -> Result<()> {
    testbed::check_privileges()?;
    check_tools(&[
        "wrk",
        "iptables-restore",
        "ip6tables-restore",
        "nft",
        "taskset",
    ])?;
    super::catch_interrupts();
    let load_line = report::load_line();
    let cpus = if args.no_pin {
        None
    } else {
        let allowed = load::allowed_cpus()?;
        (allowed.len() >= 2).then(|| (allowed[0], allowed[1]))
    };
    print_header(args, cpus, &load_line);

    let mut runs = Vec::new();
    let mut not_run = Vec::new();
    for round in 0..args.rounds {
        for &config in &args.configs {
            if let Some(why) = not_built(config) {
                if round == 0 {
                    eprintln!(
                        "xlb-bench e2e cluster: {}: not built: {why}",
                        config.label()
                    );
                    not_run.push(NotRun {
                        config: config.label(),
                        why,
                    });
                }
                continue;
            }
            eprintln!(
                "xlb-bench e2e cluster: round {}/{}: {} ...",
                round + 1,
                args.rounds,
                config.label()
            );
            let run = run_config(args, cpus, config, round)
                .with_context(|| format!("configuration {}", config.label()))?;
            for p in &run.problems {
                eprintln!("xlb-bench e2e cluster: {}: PROBLEM: {p}", config.label());
            }
            runs.push(run);
        }
    }

    let summary = summarize(args, &runs);
    print_report(args, &runs, &not_run, &summary);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "bench": "e2e",
            "topology": "cluster",
            "secs": args.secs,
            "wrk": { "threads": args.threads, "connections": args.connections },
            "pinned_cpus": cpus,
            "rounds": args.rounds,
            "machine": load_line,
            "summary": summary,
            "not_built": not_run,
            "runs": runs,
            "reproduce": reproduce(args),
        }),
    )?;
    report::fail_on_problems(runs.iter().map(|r| r.problems.len()).sum())
}

/// Why `config` cannot run, when the agent does not have its mode: the agent's own
/// parser of `--lb-mode` says.
fn not_built(config: Config) -> Option<String> {
    match config {
        Config::XlbDsr => "dsr".parse::<lb_core::mode::LbMode>().err(),
        _ => None,
    }
}

/// The node program of `config`.
fn program<'c>(config: Config) -> Result<Box<dyn NodeProgram<'c> + 'c>> {
    let agent = || testbed::agent::sibling_agent_binary();
    Ok(match config {
        Config::Iptables => Box::new(KubeProxyIptables),
        Config::Nftables => Box::new(KubeProxyNftables),
        Config::XlbSnat => Box::new(XlbAgents::new(
            &agent()?,
            "xlb snat",
            &["--lb-mode", "snat"],
            PodSees::Node,
            false,
        )),
        Config::XlbDsr => Box::new(XlbAgents::new(
            &agent()?,
            "xlb dsr",
            &["--lb-mode", "dsr"],
            PodSees::Client,
            true,
        )),
        Config::Loopback | Config::Direct | Config::Xlb => {
            bail!("{} runs on the lb topology only", config.label())
        }
    })
}

/// Builds a cluster, programs it for `config`, probes and measures; everything is
/// removed on return (agents killed by PID and unpinned, servers stopped, namespaces
/// deleted), also on error.
fn run_config(
    args: &Args,
    cpus: Option<(usize, usize)>,
    config: Config,
    round: u32,
) -> Result<Run> {
    check_interrupted()?;
    let cluster = Cluster::build(&ClusterConfig::new(
        format!("bench-{}", config.label()),
        PodNetwork::HostGw,
    ))?;
    cluster.wait_ready()?;
    // Room for the connection-rate run's ephemeral ports.
    cluster
        .client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    for pod in cluster.pods() {
        let bind = SocketAddr::new(IpAddr::V4(pod.v4()), POD_PORT);
        servers.push(testbed::spawn_pinned_http_server(
            &pod.ns,
            bind,
            &pod.name,
            cpus.map(|c| c.1),
        )?);
        pods.push(pod.name.clone());
    }
    let services: Vec<ClusterService> = scenarios::standard_services(&cluster)
        .into_iter()
        .filter(|s| s.name == WEB)
        .collect();
    let target = services
        .first()
        .and_then(|s| s.load_balancer_ip(false))
        .context("the web Service has no IPv4 LB IP")?;
    let mut program = program(config)?;
    program.program(&cluster, &services)?;
    scenarios::announce(&cluster, &services)?;

    let probe = probe(&cluster, target)?;
    let url = format!("http://{target}/");
    let wrk = |close| Wrk {
        url: &url,
        threads: args.threads,
        connections: args.connections,
        secs: args.secs,
        close,
        cpu: cpus.map(|c| c.0),
    };
    let none = || Duration::ZERO;
    // A measurement that fails (wrk hanging on connections that never complete) is
    // recorded as a problem of this configuration; the others still run.
    let mut failures = Vec::new();
    let mut measured = |what: &str, close| {
        super::measure(&servers, &none, || wrk(close).run(&cluster.client)).unwrap_or_else(|e| {
            failures.push(format!("{what}: the measurement failed: {e:#}"));
            Measured {
                result: WrkResult::default(),
                per_backend: Vec::new(),
                cpu: super::CpuUse::default(),
            }
        })
    };
    let keep_alive = measured("keep-alive", false);
    let close = measured("close", true);
    let mut run = Run {
        config: config.label(),
        round,
        probe,
        keep_alive,
        close,
        pods,
        problems: Vec::new(),
    };
    check(&mut run);
    run.problems.extend(failures);
    drop(program);
    drop(servers);
    drop(cluster);
    Ok(run)
}

/// Through each node alone (the router's route to `target`'s /32 narrowed to it), up to
/// [`PROBE_PER_NODE`] single connections; then the route spreads over every node again.
/// This is also the warm-up: neighbours, routes and the programs' caches are filled
/// before anything is timed.
fn probe(cluster: &Cluster, target: SocketAddr) -> Result<Vec<NodeProbe>> {
    let prefix = format!("{}/32", target.ip());
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    let mut out = Vec::new();
    for node in &cluster.nodes {
        check_interrupted()?;
        cluster.set_route(&prefix, &[node.index])?;
        let mut p = NodeProbe {
            node: node.name.clone(),
            ..NodeProbe::default()
        };
        for _ in 0..PROBE_PER_NODE {
            if p.failed as usize >= PROBE_MAX_FAILURES {
                p.untried += 1;
                continue;
            }
            match testbed::http_get(&cluster.client, target, PROBE_TIMEOUT) {
                Ok(pod) => *p.answered.entry(pod).or_default() += 1,
                Err(e) => {
                    p.failed += 1;
                    if p.errors.len() < 3 {
                        p.errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        out.push(p);
    }
    cluster.set_route(&prefix, &all)?;
    Ok(out)
}

/// Records what says the configuration did not carry the traffic fully.
fn check(run: &mut Run) {
    let mut problems = Vec::new();
    let probe_failed = run.probe_failed();
    if probe_failed > 0 {
        problems.push(format!("probe: {probe_failed} connections failed"));
    }
    for (what, m) in [("keep-alive", &run.keep_alive), ("close", &run.close)] {
        if m.result.errors > 0 {
            problems.push(format!(
                "{what}: {} failed (wrk: {})",
                m.result.errors, m.result.error_detail
            ));
        }
        if m.result.requests == 0 {
            problems.push(format!("{what}: wrk completed no request"));
        }
        let idle: Vec<&str> = m
            .per_backend
            .iter()
            .zip(&run.pods)
            .filter(|(n, _)| **n == 0)
            .map(|(_, pod)| pod.as_str())
            .collect();
        if !idle.is_empty() {
            problems.push(format!("{what}: pods that served nothing: {idle:?}"));
        }
    }
    run.problems = problems;
}

/// Medians over rounds.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    keep_alive_rps: f64,
    keep_alive_cpu_us_per_request: f64,
    new_connections_per_sec: f64,
    close_cpu_us_per_connection: f64,
    close_p99_ms: f64,
    /// Summed over rounds.
    failed_connections: u64,
}

fn per_request(m: &Measured<WrkResult>) -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "request counts")]
    let requests = m.result.requests as f64;
    1e6 * m.cpu.own_seconds() / requests
}

fn summarize(args: &Args, runs: &[Run]) -> BTreeMap<&'static str, Figures> {
    let mut out = BTreeMap::new();
    for config in &args.configs {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.config == config.label()).collect();
        if mine.is_empty() {
            continue;
        }
        let pick = |f: &dyn Fn(&Run) -> f64| report::median(mine.iter().map(|r| f(r)).collect());
        out.insert(
            config.label(),
            Figures {
                keep_alive_rps: pick(&|r| r.keep_alive.result.requests_per_sec),
                keep_alive_cpu_us_per_request: pick(&|r| per_request(&r.keep_alive)),
                new_connections_per_sec: pick(&|r| r.close.result.requests_per_sec),
                close_cpu_us_per_connection: pick(&|r| per_request(&r.close)),
                close_p99_ms: pick(&|r| r.close.result.p99_ms),
                failed_connections: mine.iter().map(|r| r.failed()).sum(),
            },
        );
    }
    out
}

fn reproduce(args: &Args) -> String {
    let configs: Vec<&str> = args.configs.iter().map(|c| c.label()).collect();
    format!(
        "cargo xtask bench e2e --topology cluster --secs {} --connections {} --threads {} --rounds {} --configs {}{}",
        args.secs,
        args.connections,
        args.threads,
        args.rounds,
        configs.join(","),
        if args.no_pin { " --no-pin" } else { "" }
    )
}

fn print_header(args: &Args, cpus: Option<(usize, usize)>, load_line: &str) {
    println!(
        "xlb e2e benchmark, cluster topology: client -> router (ECMP over 3 nodes, 5-tuple \
         hash) -> node -> pod (2 pods per node, host-gw); Service web, LB IP \
         203.0.113.100:80 -> HTTP on every pod's :{POD_PORT}; every node programmed the \
         same way, a fresh cluster per configuration"
    );
    println!("{load_line}");
    match cpus {
        Some((load_cpu, srv)) => println!(
            "pinned: wrk on CPU {load_cpu}; the pods' HTTP servers on CPU {srv} (forwarding, \
             NAT and the programs run in softirq on whichever CPU)"
        ),
        None => println!("not pinned: everything shares every CPU"),
    }
    println!(
        "{} s per measurement; wrk -t{} -c{}; {} round(s); probe: {PROBE_PER_NODE} \
         connections through each node alone first",
        args.secs, args.threads, args.connections, args.rounds
    );
    println!();
}

fn print_report(
    args: &Args,
    runs: &[Run],
    not_run: &[NotRun],
    summary: &BTreeMap<&'static str, Figures>,
) {
    let labels: Vec<&str> = args.configs.iter().map(|c| c.label()).collect();
    print!("{:<28}", "metric");
    for l in &labels {
        print!(" {l:>10} {:>7}", "/ipt");
    }
    println!();
    let ipt = summary.get(Config::Iptables.label());
    let row = |name: &str, f: &dyn Fn(&Figures) -> f64, digits: usize| {
        print!("{name:<28}");
        for l in &labels {
            match summary.get(l) {
                Some(fig) => {
                    let v = f(fig);
                    let r = ipt
                        .and_then(|i| ratio(v, f(i)))
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
                    print!(" {v:>10.digits$} {r:>7}");
                }
                None => print!(" {:>10} {:>7}", "not built", "-"),
            }
        }
        println!();
    };
    row("HTTP new connections/s", &|f| f.new_connections_per_sec, 0);
    row(
        "  CPU us per connection",
        &|f| f.close_cpu_us_per_connection,
        1,
    );
    row("  p99 latency ms", &|f| f.close_p99_ms, 3);
    row("HTTP keep-alive requests/s", &|f| f.keep_alive_rps, 0);
    row(
        "  CPU us per request",
        &|f| f.keep_alive_cpu_us_per_request,
        1,
    );
    #[expect(clippy::cast_precision_loss, reason = "connection counts")]
    row(
        "failed connections (all)",
        &|f| f.failed_connections as f64,
        0,
    );
    for n in not_run {
        println!("{}: not built ({})", n.config, n.why);
    }
    println!(
        "(medians over rounds; CPU per connection/request: the load generator's, the pod \
         servers' and all softirq CPU time on the machine during the run, over the \
         completed requests; agents' user-space time and other processes left out. Failed \
         connections: the probe's plus wrk's socket errors and non-2xx answers, all rounds)"
    );
    for config in ["xlb-snat", "xlb-dsr"] {
        let (Some(x), Some(i)) = (summary.get(config), ipt) else {
            continue;
        };
        let r = ratio(x.close_cpu_us_per_connection, i.close_cpu_us_per_connection);
        let met = r.is_some_and(|r| r <= TARGET_CPU_PER_CONNECTION) && x.failed_connections == 0;
        println!(
            "target {config}: CPU per connection <= {TARGET_CPU_PER_CONNECTION:.2}x iptables' \
             and no failed connection: {} ({}x, {} failed)",
            mark(met),
            r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
            x.failed_connections
        );
    }
    println!();
    print_runs(runs);
    println!();
    println!("reproduce: {}", reproduce(args));
}

/// Per run: the probe through each node, wrk's figures and failures, CPU, problems.
fn print_runs(runs: &[Run]) {
    println!(
        "Per run: probe through each node alone (answers per pod, failures), wrk figures, CPU:"
    );
    for run in runs {
        println!("  {} r{}:", run.config, run.round + 1);
        for p in &run.probe {
            let answered: Vec<String> = p
                .answered
                .iter()
                .map(|(pod, n)| format!("{pod} {n}"))
                .collect();
            println!(
                "    via {}: {}; failed {}{}",
                p.node,
                if answered.is_empty() {
                    "no answer".to_owned()
                } else {
                    answered.join(", ")
                },
                p.failed,
                if p.untried > 0 {
                    format!(" ({} untried)", p.untried)
                } else {
                    String::new()
                }
            );
            for e in &p.errors {
                println!("      {e}");
            }
        }
        for (what, m) in [("keep-alive", &run.keep_alive), ("close", &run.close)] {
            let share: Vec<String> = m.per_backend.iter().map(ToString::to_string).collect();
            println!(
                "    {what:<10} {:>9.0} req/s, {} requests, {} failed{}; per pod {}; CPU: client {:.2} servers {:.2} softirq {:.2} other {:.2}",
                m.result.requests_per_sec,
                m.result.requests,
                m.result.errors,
                if m.result.error_detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", m.result.error_detail)
                },
                share.join("/"),
                m.cpu.client,
                m.cpu.servers,
                m.cpu.softirq,
                m.cpu.other
            );
        }
        for p in &run.problems {
            println!("    PROBLEM: {p}");
        }
    }
}
