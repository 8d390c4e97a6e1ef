//! `xlb-bench e2e --topology cluster`: HTTP through the three-node cluster of
//! `lb_testbed::cluster` (client -> router, ECMP over the nodes by 5-tuple -> node ->
//! pod, host-gw pod network), with every node programmed one way at a time: kube-proxy's
//! iptables rules, its nftables rules, xlb agents in SNAT mode, xlb agents in DSR mode
//! (when the agent has that mode; otherwise the report says it is not built); and a
//! reference without any load balancer, `direct`: the client connects to the pods' own
//! addresses, which the router spreads over the nodes by the same ECMP as the VIP
//! (the route 192.0.2.0/24 over every node), so a connection takes the same router,
//! node and, for a pod on another node, second node as through the VIP, and the
//! connections rotate over the same six pods.
//!
//! Every configuration gets a cluster of its own, built before and deleted after it, so
//! no rule, program, conntrack entry or `TIME_WAIT` socket of one configuration can
//! touch the next. The Service is the scenarios' `web` (`externalTrafficPolicy:
//! Cluster`, every pod an endpoint, LB IP 203.0.113.100:80), programmed by the same
//! [`NodeProgram`]s the cluster tests run; every pod runs the harness's HTTP server.
//! The configurations run interleaved, in a rotated order each round, so that a slow
//! stretch of the machine does not always hit the same one.
//!
//! Per configuration: a probe (a bounded number of single connections through each node
//! alone, the router's route narrowed to that node) that says which pods each node
//! reaches and which connections failed; then a fixed-rate run ([`super::paced`]: `--rate`
//! new connections per second for `--paced-secs`, below saturation); then, except for
//! `direct`, wrk keep-alive (requests/s) and wrk with `Connection: close` (new
//! connections/s at saturation), each `--secs` long.
//!
//! CPU is counted as the lb topology counts it ([`super::measure`]): the load
//! generator's, the pod servers' and all softirq time on the machine (every namespace's
//! forwarding, NAT, XDP, tc and TCP receive work), over the completed connections; the
//! agents' user-space time and other processes are left out. At saturation that figure
//! mostly follows throughput (the CPUs are busy either way), and most of it is the
//! client's and the servers' work, the same with any load balancer. So the target is
//! judged on the fixed-rate run's CPU per connection less `direct`'s in the same round:
//! the CPU the load balancer adds per connection. For xlb, the kernel's own count of its
//! programs' run time (`bpf_stats`) is printed beside it. Every failed connection is
//! counted: the probe's, the fixed-rate run's, wrk's socket errors (connect, read, write,
//! timeout) and non-2xx answers.

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
    CLUSTER_CIDR_V4, Cluster, ClusterConfig, ClusterService, NodeProgram, PodNetwork, PodSees,
};

use super::bpf_stats::{self, ProgramStat};
use super::figures::{Spread, WrkFigures};
use super::load::{self, Wrk, WrkResult};
use super::paced::{Paced, PacedResult};
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
    /// The fixed-rate run.
    paced: Measured<PacedResult>,
    /// xlb's programs during the fixed-rate run, per node (xlb configurations only).
    programs: Vec<ProgramStat>,
    /// xlb's verdict counters during the fixed-rate run, per node: (node, reason,
    /// packets).
    verdicts: Vec<(String, String, u64)>,
    /// wrk at saturation (not for `direct`).
    keep_alive: Option<Measured<WrkResult>>,
    close: Option<Measured<WrkResult>>,
    /// Pod names in the order of `per_backend`.
    pods: Vec<String>,
    problems: Vec<String>,
}

impl Run {
    /// Every failed connection: the probe's, the fixed-rate run's and wrk's.
    fn failed(&self) -> u64 {
        self.probe_failed()
            + self.paced.result.failed
            + self.wrk().map(|(_, m)| m.result.errors).sum::<u64>()
    }

    fn probe_failed(&self) -> u64 {
        self.probe.iter().map(|p| u64::from(p.failed)).sum()
    }

    fn wrk(&self) -> impl Iterator<Item = (&'static str, &Measured<WrkResult>)> {
        [("keep-alive", &self.keep_alive), ("close", &self.close)]
            .into_iter()
            .filter_map(|(what, m)| Some((what, m.as_ref()?)))
    }

    /// The benchmark's own CPU microseconds per completed connection of the fixed-rate
    /// run.
    fn paced_cpu_us(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "connection counts")]
        let completed = self.paced.result.completed as f64;
        1e6 * self.paced.cpu.own_seconds() / completed
    }

    /// [`Run::paced_cpu_us`] split: (client, servers, softirq).
    fn paced_parts_us(&self) -> [f64; 3] {
        #[expect(clippy::cast_precision_loss, reason = "connection counts")]
        let completed = self.paced.result.completed as f64;
        let c = &self.paced.cpu;
        [c.client, c.servers, c.softirq].map(|x| 1e6 * x * c.wall_s / completed)
    }

    /// xlb's programs' nanoseconds per completed connection of the fixed-rate run, all
    /// nodes together; `None` without program counters.
    fn programs_ns(&self) -> Option<f64> {
        if self.programs.is_empty() {
            return None;
        }
        #[expect(
            clippy::cast_precision_loss,
            reason = "nanosecond and connection counts"
        )]
        Some(
            self.programs.iter().map(|p| p.run_ns).sum::<u64>() as f64
                / self.paced.result.completed.max(1) as f64,
        )
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
        "bpftool",
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
    // xlb's programs' run time, counted by the kernel for the whole benchmark; off again
    // when this is dropped (or the process ends).
    let stats = bpf_stats::enable()?;

    let mut runs = Vec::new();
    let mut not_run = Vec::new();
    for round in 0..args.rounds() {
        // A rotated order each round: no configuration always runs right after another
        // or at the same point of a slow stretch.
        let mut order = args.configs.clone();
        let shift = round as usize % order.len();
        order.rotate_left(shift);
        for config in order {
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
                args.rounds(),
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
    drop(stats);
    let end_load = report::load_line();

    let summary = summarize(args, &runs);
    print_report(args, &runs, &not_run, &summary, &end_load);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "bench": "e2e",
            "topology": "cluster",
            "secs": args.secs,
            "wrk": { "threads": args.threads, "connections": args.connections },
            "paced": { "rate": args.rate, "secs": args.paced_secs },
            "pinned_cpus": cpus,
            "rounds": args.rounds(),
            "machine": load_line,
            "machine_at_end": end_load,
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

/// What programs the nodes for one configuration.
enum Programmed<'c> {
    /// `direct`: nothing; the router spreads the pod CIDR over the nodes.
    Nothing,
    Kernel(Box<dyn NodeProgram<'c> + 'c>),
    Xlb(XlbAgents<'c>),
}

impl<'c> Programmed<'c> {
    fn of(config: Config) -> Result<Self> {
        let agent = || testbed::agent::sibling_agent_binary();
        Ok(match config {
            Config::Direct => Programmed::Nothing,
            Config::Iptables => Programmed::Kernel(Box::new(KubeProxyIptables)),
            Config::Nftables => Programmed::Kernel(Box::new(KubeProxyNftables)),
            Config::XlbSnat => Programmed::Xlb(XlbAgents::new(
                &agent()?,
                "xlb snat",
                &["--lb-mode", "snat"],
                PodSees::Node,
                false,
            )),
            Config::XlbDsr => Programmed::Xlb(XlbAgents::new(
                &agent()?,
                "xlb dsr",
                &["--lb-mode", "dsr"],
                PodSees::Client,
                true,
            )),
            Config::Loopback | Config::Xlb => {
                bail!("{} runs on the lb topology only", config.label())
            }
        })
    }

    fn program(&mut self, cluster: &'c Cluster, services: &[ClusterService]) -> Result<()> {
        match self {
            Programmed::Nothing => {
                let all: Vec<usize> = (0..cluster.nodes.len()).collect();
                cluster.set_route(CLUSTER_CIDR_V4, &all)
            }
            Programmed::Kernel(p) => p.program(cluster, services),
            Programmed::Xlb(p) => p.program(cluster, services),
        }
    }

    /// Per node, xlb's verdict counters (reason, packets); empty for the others.
    fn verdicts(&self, cluster: &Cluster) -> Result<Vec<(String, String, u64)>> {
        let Programmed::Xlb(x) = self else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (agent, node) in x.agents().iter().zip(&cluster.nodes) {
            let report = lb_agent::status::Report::read(agent.pin_dir())
                .with_context(|| format!("the status of the agent on {}", node.name))?;
            for (reason, n) in report.reasons {
                out.push((node.name.clone(), reason, n));
            }
        }
        Ok(out)
    }

    /// xlb's programs' counters on every node; empty for the others.
    fn programs(&self, cluster: &Cluster) -> Result<Vec<ProgramStat>> {
        let Programmed::Xlb(x) = self else {
            return Ok(Vec::new());
        };
        let agents: Vec<(&str, &std::path::Path)> = cluster
            .nodes
            .iter()
            .zip(x.agents())
            .map(|(n, a)| (n.name.as_str(), a.pin_dir()))
            .collect();
        bpf_stats::snapshot(&agents)
    }
}

/// Verdict counters of `after` less those of `before`, nonzero ones only.
fn verdicts_since(
    after: &[(String, String, u64)],
    before: &[(String, String, u64)],
) -> Vec<(String, String, u64)> {
    after
        .iter()
        .filter_map(|(node, reason, n)| {
            let was = before
                .iter()
                .find(|(bn, br, _)| bn == node && br == reason)
                .map_or(0, |b| b.2);
            let d = n.saturating_sub(was);
            (d > 0).then(|| (node.clone(), reason.clone(), d))
        })
        .collect()
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
    switch_without_netfilter(&cluster)?;
    // Room for the connection-rate run's ephemeral ports.
    cluster
        .client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    let mut servers = Vec::new();
    let mut pods = Vec::new();
    let mut pod_addrs = Vec::new();
    for pod in cluster.pods() {
        let bind = SocketAddr::new(IpAddr::V4(pod.v4()), POD_PORT);
        servers.push(testbed::spawn_pinned_http_server(
            &pod.ns,
            bind,
            &pod.name,
            cpus.map(|c| c.1),
        )?);
        pods.push(pod.name.clone());
        pod_addrs.push(bind);
    }
    let services: Vec<ClusterService> = scenarios::standard_services(&cluster)
        .into_iter()
        .filter(|s| s.name == WEB)
        .collect();
    let vip = services
        .first()
        .and_then(|s| s.load_balancer_ip(false))
        .context("the web Service has no IPv4 LB IP")?;
    // `direct` rotates over the pods' own addresses (the pod CIDR routed over every
    // node); the others connect to the VIP.
    let (targets, prefix) = if config == Config::Direct {
        (pod_addrs, CLUSTER_CIDR_V4.to_owned())
    } else {
        (vec![vip], format!("{}/32", vip.ip()))
    };
    let mut program = Programmed::of(config)?;
    program.program(&cluster, &services)?;
    scenarios::announce(&cluster, &services)?;

    let probe = probe(&cluster, &targets, &prefix)?;
    let mut failures = Vec::new();

    // The fixed-rate run first, on a cluster that no saturation run has filled with
    // conntrack entries and TIME_WAIT sockets yet (as `direct`'s, which has none).
    let programs0 = program.programs(&cluster)?;
    let verdicts0 = program.verdicts(&cluster)?;
    let paced = Paced {
        targets: &targets,
        rate: args.rate,
        secs: args.paced_secs,
        cpu: cpus.map(|c| c.0),
    };
    let paced = measure_paced(&servers, &paced, &cluster.client).unwrap_or_else(|e| {
        failures.push(format!("fixed rate: the measurement failed: {e:#}"));
        Measured {
            result: PacedResult::default(),
            per_backend: Vec::new(),
            cpu: super::CpuUse::default(),
        }
    });
    let programs = bpf_stats::since(&program.programs(&cluster)?, &programs0);
    let verdicts = verdicts_since(&program.verdicts(&cluster)?, &verdicts0);

    let (keep_alive, close) = if config == Config::Direct {
        (None, None)
    } else {
        let (k, c) = measure_wrk(args, cpus, &servers, &cluster.client, vip, &mut failures);
        (Some(k), Some(c))
    };
    let mut run = Run {
        config: config.label(),
        round,
        probe,
        paced,
        programs,
        verdicts,
        keep_alive,
        close,
        pods,
        problems: Vec::new(),
    };
    check(&mut run, args);
    run.problems.extend(failures);
    drop(program);
    drop(servers);
    drop(cluster);
    Ok(run)
}

/// The `bridge-nf-call-*` switches of br_netfilter, per namespace.
const BRIDGE_NETFILTER: [&str; 3] = [
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
];

/// Whether br_netfilter is loaded on this machine (something else loaded it: container
/// runtimes do). Then every frame the switch namespace bridges goes through netfilter's
/// IP hooks, by default on in each new namespace.
fn bridge_netfilter_loaded() -> bool {
    std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables").exists()
}

/// The node segment's bridge stands for a physical L2 switch, which filters nothing: with
/// br_netfilter loaded, its frames would each cross netfilter's hooks in the switch
/// namespace (measured: about half of the network samples of a profile ran under
/// `br_nf_*`), a cost of the testbed that grows with the number of times a connection
/// crosses the segment (more for SNAT than for DSR) and that no real cluster has.
fn switch_without_netfilter(cluster: &Cluster) -> Result<()> {
    if bridge_netfilter_loaded() {
        for key in BRIDGE_NETFILTER {
            cluster.switch.sysctl(key, "0")?;
        }
    }
    Ok(())
}

/// wrk keep-alive and `Connection: close` against `vip`, at saturation. A measurement
/// that fails (wrk hanging on connections that never complete) is recorded in
/// `failures`, a problem of this configuration; the others still run.
fn measure_wrk(
    args: &Args,
    cpus: Option<(usize, usize)>,
    servers: &[testbed::ServerHandle],
    client: &testbed::Netns,
    vip: SocketAddr,
    failures: &mut Vec<String>,
) -> (Measured<WrkResult>, Measured<WrkResult>) {
    let url = format!("http://{vip}/");
    let mut measured = |what: &str, close| {
        let wrk = Wrk {
            url: &url,
            threads: args.threads,
            connections: args.connections,
            secs: args.secs,
            close,
            cpu: cpus.map(|c| c.0),
        };
        super::measure(servers, &|| Duration::ZERO, || wrk.run(client)).unwrap_or_else(|e| {
            failures.push(format!("{what}: the measurement failed: {e:#}"));
            Measured {
                result: WrkResult::default(),
                per_backend: Vec::new(),
                cpu: super::CpuUse::default(),
            }
        })
    };
    (measured("keep-alive", false), measured("close", true))
}

/// Runs `paced` from `client` and records what [`super::measure`] records, the
/// generator's CPU counted as the load generator's (it runs on a thread of this process,
/// not as a reaped child).
fn measure_paced(
    servers: &[testbed::ServerHandle],
    paced: &Paced<'_>,
    client: &testbed::Netns,
) -> Result<Measured<PacedResult>> {
    let mut m = super::measure(servers, &|| Duration::ZERO, || paced.run(client))?;
    let generator = m.result.generator_cpu_s / m.cpu.wall_s;
    m.cpu.client += generator;
    m.cpu.other = (m.cpu.other - generator).max(0.0);
    Ok(m)
}

/// Through each node alone (the router's route for `prefix` narrowed to it), up to
/// [`PROBE_PER_NODE`] single connections rotating over `targets`; then the route spreads
/// over every node again. This is also the warm-up: neighbours, routes and the
/// programs' caches are filled before anything is timed.
fn probe(cluster: &Cluster, targets: &[SocketAddr], prefix: &str) -> Result<Vec<NodeProbe>> {
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    let mut out = Vec::new();
    for node in &cluster.nodes {
        check_interrupted()?;
        cluster.set_route(prefix, &[node.index])?;
        let mut p = NodeProbe {
            node: node.name.clone(),
            ..NodeProbe::default()
        };
        for target in targets.iter().cycle().take(PROBE_PER_NODE) {
            if p.failed as usize >= PROBE_MAX_FAILURES {
                p.untried += 1;
                continue;
            }
            match testbed::http_get(&cluster.client, *target, PROBE_TIMEOUT) {
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
    cluster.set_route(prefix, &all)?;
    Ok(out)
}

/// Records what says the configuration did not carry the traffic fully.
fn check(run: &mut Run, args: &Args) {
    let mut problems = Vec::new();
    let probe_failed = run.probe_failed();
    if probe_failed > 0 {
        problems.push(format!("probe: {probe_failed} connections failed"));
    }
    let idle = |per_backend: &[u64]| -> Vec<String> {
        per_backend
            .iter()
            .zip(&run.pods)
            .filter(|(n, _)| **n == 0)
            .map(|(_, pod)| pod.clone())
            .collect()
    };
    let paced = &run.paced.result;
    let offered = u64::from(args.rate) * u64::from(args.paced_secs);
    if paced.failed > 0 {
        problems.push(format!(
            "fixed rate: {} of {offered} connections failed ({})",
            paced.failed,
            paced.errors.join("; ")
        ));
    }
    if paced.completed == 0 {
        problems.push("fixed rate: no connection completed".to_owned());
    }
    if paced.completed + paced.failed < offered {
        problems.push(format!(
            "fixed rate: {} of {offered} connections accounted for",
            paced.completed + paced.failed
        ));
    }
    let paced_idle = idle(&run.paced.per_backend);
    if !paced_idle.is_empty() {
        problems.push(format!(
            "fixed rate: pods that served nothing: {paced_idle:?}"
        ));
    }
    let xlb = [Config::XlbSnat, Config::XlbDsr].map(Config::label);
    if xlb.contains(&run.config) && run.programs.iter().all(|p| p.runs == 0) {
        problems.push(
            "fixed rate: the kernel counted no run of xlb's programs (run-time statistics)"
                .to_owned(),
        );
    }
    for (what, m) in run.wrk() {
        if m.result.errors > 0 {
            problems.push(format!(
                "{what}: {} failed (wrk: {})",
                m.result.errors, m.result.error_detail
            ));
        }
        if m.result.requests == 0 {
            problems.push(format!("{what}: wrk completed no request"));
        }
        let idle = idle(&m.per_backend);
        if !idle.is_empty() {
            problems.push(format!("{what}: pods that served nothing: {idle:?}"));
        }
    }
    run.problems = problems;
}

/// One configuration's figures over rounds.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    /// The fixed-rate run: completed connections/s, p99 latency, the benchmark's own CPU
    /// per connection and its parts (client, servers, softirq).
    paced_connections_per_sec: Spread,
    paced_p99_ms: Spread,
    paced_cpu_us_per_connection: Spread,
    paced_client_us: Spread,
    paced_servers_us: Spread,
    paced_softirq_us: Spread,
    /// Per round, [`Figures::paced_cpu_us_per_connection`] less `direct`'s of the same
    /// round: the CPU the load balancer adds per connection. What the target is judged on.
    lb_cpu_us_per_connection: Spread,
    /// xlb's programs (all nodes) per connection of the fixed-rate run, by the kernel's
    /// count.
    programs_ns_per_connection: Spread,
    /// wrk at saturation (absent for `direct`).
    keep_alive: Option<WrkFigures>,
    close: Option<WrkFigures>,
    /// Summed over rounds.
    failed_connections: u64,
}

fn summarize(args: &Args, runs: &[Run]) -> BTreeMap<&'static str, Figures> {
    let direct = |round: u32| {
        runs.iter()
            .find(|r| r.config == Config::Direct.label() && r.round == round)
            .map(Run::paced_cpu_us)
    };
    let mut out = BTreeMap::new();
    for config in &args.configs {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.config == config.label()).collect();
        if mine.is_empty() {
            continue;
        }
        let over = |f: &dyn Fn(&Run) -> f64| Spread::of(mine.iter().map(|r| f(r)));
        let wrk = |pick: fn(&Run) -> Option<&Measured<WrkResult>>| {
            let ms: Vec<&Measured<WrkResult>> = mine.iter().filter_map(|r| pick(r)).collect();
            (!ms.is_empty()).then(|| WrkFigures::of(ms.iter().copied()))
        };
        out.insert(
            config.label(),
            Figures {
                paced_connections_per_sec: over(&|r| r.paced.result.connections_per_sec),
                paced_p99_ms: over(&|r| r.paced.result.p99_ms),
                paced_cpu_us_per_connection: over(&Run::paced_cpu_us),
                paced_client_us: over(&|r| r.paced_parts_us()[0]),
                paced_servers_us: over(&|r| r.paced_parts_us()[1]),
                paced_softirq_us: over(&|r| r.paced_parts_us()[2]),
                lb_cpu_us_per_connection: over(&|r| {
                    direct(r.round).map_or(f64::NAN, |d| r.paced_cpu_us() - d)
                }),
                programs_ns_per_connection: over(&|r| r.programs_ns().unwrap_or(f64::NAN)),
                keep_alive: wrk(|r| r.keep_alive.as_ref()),
                close: wrk(|r| r.close.as_ref()),
                failed_connections: mine.iter().map(|r| r.failed()).sum(),
            },
        );
    }
    out
}

fn reproduce(args: &Args) -> String {
    let configs: Vec<&str> = args.configs.iter().map(|c| c.label()).collect();
    format!(
        "cargo xtask bench e2e --topology cluster --rate {} --paced-secs {} --secs {} --connections {} --threads {} --rounds {} --configs {}{}",
        args.rate,
        args.paced_secs,
        args.secs,
        args.connections,
        args.threads,
        args.rounds(),
        configs.join(","),
        if args.no_pin { " --no-pin" } else { "" }
    )
}

fn print_header(args: &Args, cpus: Option<(usize, usize)>, load_line: &str) {
    println!(
        "xlb e2e benchmark, cluster topology: client -> router (ECMP over 3 nodes, 5-tuple \
         hash) -> node -> pod (2 pods per node, host-gw); Service web, LB IP \
         203.0.113.100:80 -> HTTP on every pod's :{POD_PORT}; every node programmed the \
         same way, a fresh cluster per configuration; direct = no load balancer, the \
         client rotating over the pods' own addresses, which the router spreads over the \
         nodes by the same ECMP"
    );
    println!("{load_line}");
    match cpus {
        Some((load_cpu, srv)) => println!(
            "pinned: the load generators on CPU {load_cpu}; the pods' HTTP servers on CPU \
             {srv} (forwarding, NAT and the programs run in softirq on whichever CPU)"
        ),
        None => println!("not pinned: everything shares every CPU"),
    }
    println!(
        "per configuration and round: probe ({PROBE_PER_NODE} connections through each node \
         alone), then a fixed rate of {} new connections/s for {} s (one request each, \
         Connection: close), then wrk -t{} -c{} keep-alive and Connection: close, {} s each \
         (not for direct); {} rounds, configurations interleaved in a rotated order",
        args.rate,
        args.paced_secs,
        args.threads,
        args.connections,
        args.secs,
        args.rounds()
    );
    if bridge_netfilter_loaded() {
        println!(
            "br_netfilter is loaded on this machine: the switch namespace's bridge (a \
             physical switch in a real cluster) is set not to pass frames through netfilter \
             (bridge-nf-call-iptables/ip6tables/arptables=0 in that namespace only)"
        );
    }
    println!(
        "BPF run-time statistics (BPF_ENABLE_STATS, what kernel.bpf_stats_enabled=1 does) \
         are on for the whole run: global, every BPF program on the machine pays two clock \
         reads per run meanwhile; off again when the benchmark ends"
    );
    println!();
}

fn print_report(
    args: &Args,
    runs: &[Run],
    not_run: &[NotRun],
    summary: &BTreeMap<&'static str, Figures>,
    end_load: &str,
) {
    print_paced(args, summary);
    println!();
    print_saturation(args, summary);
    for n in not_run {
        println!("{}: not built ({})", n.config, n.why);
    }
    println!();
    print_targets(summary);
    println!();
    print_programs(runs);
    println!();
    print_runs(runs);
    println!();
    println!("{end_load} (at the end)");
    println!("reproduce: {}", reproduce(args));
}

/// The fixed-rate figures, one line per configuration: what the target is judged on.
fn print_paced(args: &Args, summary: &BTreeMap<&'static str, Figures>) {
    println!(
        "Fixed rate, {} new connections/s (medians over rounds, [min..max] across rounds):",
        args.rate
    );
    println!(
        "{:<9} {:>7} {:>8} {:>24} {:>7} {:>7} {:>7} {:>22} {:>7} {:>20}",
        "config",
        "conn/s",
        "p99 ms",
        "CPU us/conn (all)",
        "client",
        "servers",
        "softirq",
        "LB us/conn (-direct)",
        "LB/ipt",
        "xlb programs ns/conn"
    );
    let ipt = summary.get(Config::Iptables.label());
    for config in &args.configs {
        let Some(f) = summary.get(config.label()) else {
            continue;
        };
        let lb_ratio = ipt
            .and_then(|i| {
                ratio(
                    f.lb_cpu_us_per_connection.median,
                    i.lb_cpu_us_per_connection.median,
                )
            })
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
        println!(
            "{:<9} {:>7.0} {:>8.3} {:>24} {:>7.1} {:>7.1} {:>7.1} {:>22} {:>7} {:>20}",
            config.label(),
            f.paced_connections_per_sec.median,
            f.paced_p99_ms.median,
            f.paced_cpu_us_per_connection.cell(1),
            f.paced_client_us.median,
            f.paced_servers_us.median,
            f.paced_softirq_us.median,
            if *config == Config::Direct {
                "(reference)".to_owned()
            } else {
                f.lb_cpu_us_per_connection.cell(1)
            },
            if *config == Config::Direct {
                "-".to_owned()
            } else {
                lb_ratio
            },
            f.programs_ns_per_connection.cell(0),
        );
    }
    println!(
        "(CPU us/conn: the load generator's, the pod servers' and all softirq CPU time on \
         the machine during the run, over the completed connections; client/servers/softirq \
         are its parts. LB us/conn: per round, that less direct's of the same round, i.e. \
         what the load balancer adds; its median over rounds, and LB/ipt its ratio to \
         iptables'. xlb programs: the kernel's count of the run time of xlb's XDP and tc \
         programs on all three nodes, over the connections)"
    );
}

/// wrk at saturation, configurations as columns (the whole-machine figures).
fn print_saturation(args: &Args, summary: &BTreeMap<&'static str, Figures>) {
    let labels: Vec<&str> = args
        .configs
        .iter()
        .filter(|c| **c != Config::Direct)
        .map(|c| c.label())
        .collect();
    println!("At saturation (wrk, medians over rounds):");
    print!("{:<28}", "metric");
    for l in &labels {
        print!(" {l:>10} {:>7}", "/ipt");
    }
    println!();
    let ipt = summary.get(Config::Iptables.label());
    let row = |name: &str, f: &dyn Fn(&Figures) -> Option<f64>, digits: usize| {
        print!("{name:<28}");
        for l in &labels {
            match summary.get(l).and_then(f) {
                Some(v) => {
                    let r = ipt
                        .and_then(f)
                        .and_then(|i| ratio(v, i))
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
                    print!(" {v:>10.digits$} {r:>7}");
                }
                None => print!(" {:>10} {:>7}", "-", "-"),
            }
        }
        println!();
    };
    row(
        "HTTP new connections/s",
        &|f| Some(f.close?.requests_per_sec.median),
        0,
    );
    row(
        "  CPU us per connection",
        &|f| Some(f.close?.cpu_us_per_request.median),
        1,
    );
    row("  p99 latency ms", &|f| Some(f.close?.p99_ms.median), 3);
    row(
        "HTTP keep-alive requests/s",
        &|f| Some(f.keep_alive?.requests_per_sec.median),
        0,
    );
    row(
        "  CPU us per request",
        &|f| Some(f.keep_alive?.cpu_us_per_request.median),
        1,
    );
    #[expect(clippy::cast_precision_loss, reason = "connection counts")]
    row(
        "failed connections (all)",
        &|f| Some(f.failed_connections as f64),
        0,
    );
    println!(
        "(CPU per connection/request as above, at saturation: the CPUs are busy whatever \
         the path costs, so it mostly follows throughput. Failed connections: the probe's, \
         the fixed-rate run's, wrk's socket errors and non-2xx answers, all rounds)"
    );
}

fn print_targets(summary: &BTreeMap<&'static str, Figures>) {
    println!(
        "The target (xlb's CPU per connection at most {TARGET_CPU_PER_CONNECTION:.2}x \
         iptables', no failed connection) is judged on LB us/conn at the fixed rate: the \
         CPU the load balancer itself adds per connection, measured where every \
         configuration does the same work in the same time. The whole-machine figures are \
         dominated by the client's and the pods' work, the same for every configuration, \
         and at saturation they follow throughput; they are shown for reference."
    );
    let ipt = summary.get(Config::Iptables.label());
    for config in [Config::XlbSnat, Config::XlbDsr] {
        let (Some(x), Some(i)) = (summary.get(config.label()), ipt) else {
            continue;
        };
        let judge = |x: f64, i: f64| ratio(x, i);
        let lb = judge(
            x.lb_cpu_us_per_connection.median,
            i.lb_cpu_us_per_connection.median,
        );
        let whole = judge(
            x.paced_cpu_us_per_connection.median,
            i.paced_cpu_us_per_connection.median,
        );
        let saturated = x
            .close
            .zip(i.close)
            .and_then(|(x, i)| judge(x.cpu_us_per_request.median, i.cpu_us_per_request.median));
        let fmt = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}x"));
        let met = lb.is_some_and(|r| r <= TARGET_CPU_PER_CONNECTION) && x.failed_connections == 0;
        println!(
            "target {}: {} (LB us/conn {} of iptables' {}: {}; {} failed connections) | for \
             reference, whole machine at the fixed rate {}, at saturation {}",
            config.label(),
            mark(met),
            x.lb_cpu_us_per_connection.cell(1),
            i.lb_cpu_us_per_connection.cell(1),
            fmt(lb),
            x.failed_connections,
            fmt(whole),
            fmt(saturated),
        );
    }
    if summary.get(Config::Direct.label()).is_none() {
        println!("(direct did not run: the load balancer's own CPU cannot be told apart)");
    }
}

/// xlb's programs during the fixed-rate runs, by program, summed over nodes and rounds.
fn print_programs(runs: &[Run]) {
    let mut any = false;
    for config in [Config::XlbSnat, Config::XlbDsr] {
        let mine: Vec<&Run> = runs
            .iter()
            .filter(|r| r.config == config.label() && !r.programs.is_empty())
            .collect();
        if mine.is_empty() {
            continue;
        }
        if !any {
            println!(
                "xlb's programs during the fixed-rate runs (kernel run-time statistics, all \
                 rounds; per node and program: runs per connection, ns per run, ns per \
                 connection):"
            );
            any = true;
        }
        let connections: u64 = mine.iter().map(|r| r.paced.result.completed).sum();
        let mut by: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for p in mine.iter().flat_map(|r| &r.programs) {
            let e = by.entry((p.node.clone(), p.name.clone())).or_default();
            e.0 += p.runs;
            e.1 += p.run_ns;
        }
        println!("  {} ({connections} connections):", config.label());
        #[expect(clippy::cast_precision_loss, reason = "counts")]
        for ((node, name), (runs, ns)) in &by {
            println!(
                "    {node:<7} {name:<16} {:>6.2} runs/conn {:>7.0} ns/run {:>8.0} ns/conn",
                *runs as f64 / connections.max(1) as f64,
                *ns as f64 / (*runs).max(1) as f64,
                *ns as f64 / connections.max(1) as f64,
            );
        }
        let mut verdicts: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (node, reason, n) in mine.iter().flat_map(|r| &r.verdicts) {
            *verdicts.entry((node.clone(), reason.clone())).or_default() += n;
        }
        let line: Vec<String> = verdicts
            .iter()
            .map(|((node, reason), n)| {
                #[expect(clippy::cast_precision_loss, reason = "counts")]
                let per = *n as f64 / connections.max(1) as f64;
                format!("{node} {reason} {per:.2}")
            })
            .collect();
        println!("    verdicts per connection: {}", line.join(", "));
    }
}

/// Per run: the probe through each node, the fixed-rate run, wrk's figures and failures,
/// CPU, problems.
fn print_runs(runs: &[Run]) {
    println!(
        "Per run: probe through each node alone (answers per pod, failures), fixed rate, wrk \
         figures, CPU (in CPUs):"
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
        let share = |per_backend: &[u64]| {
            per_backend
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/")
        };
        let p = &run.paced;
        println!(
            "    {:<10} {:>9.0} conn/s, {} completed, {} failed, p99 {:.3} ms; per pod {}; CPU: client {:.2} servers {:.2} softirq {:.2} other {:.2}; {:.1} us/conn",
            "fixed rate",
            p.result.connections_per_sec,
            p.result.completed,
            p.result.failed,
            p.result.p99_ms,
            share(&p.per_backend),
            p.cpu.client,
            p.cpu.servers,
            p.cpu.softirq,
            p.cpu.other,
            run.paced_cpu_us(),
        );
        for (what, m) in run.wrk() {
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
                share(&m.per_backend),
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
