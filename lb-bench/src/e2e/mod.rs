//! `xlb-bench e2e`: real HTTP and TCP traffic from a client namespace through a
//! load-balancer namespace to backend namespaces, with the load balancer programmed three
//! ways, one after another, in one topology and one run:
//!
//! 1. `iptables`: kube-proxy's iptables-mode rules (`iptables-restore` in the LB namespace),
//! 2. `nftables`: kube-proxy's nftables-mode rules (`nft -f`),
//! 3. `xlb`: the XDP program attached natively to the LB's `xc` and `xb`,
//!
//! plus two references that are not competitors: `loopback`, the load generators run in
//! backend 0's own namespace against its servers (no veth, no forwarding: what the servers
//! and load generators can do at all, i.e. the check that the servers are not the
//! bottleneck), and `direct`, the client talking to backend 0's own address through the LB
//! namespace's plain routing (no NAT: the ceiling of the path).
//!
//! Every configuration serves the same VIP, 203.0.113.10: port 80 -> every backend's
//! HTTP server on 8080 (the harness's, pinned), and port 5201 -> backend 0's iperf3
//! server (iperf3 opens a control and a data connection that must reach the same server,
//! which neither random choice nor per-connection hashing guarantees across several
//! backends). Measurements, each bounded by `--secs`: wrk keep-alive (requests/s, p99),
//! wrk with `Connection: close` (one request per connection: new connections/s, p99),
//! iperf3 (client -> VIP TCP throughput).
//!
//! Only one configuration is active at a time: before each, the LB namespace must have no
//! iptables or nftables rule and no XDP program; after it, its rules are flushed or xlb
//! detached, and that is checked again. Each configuration proves it carried the traffic:
//! the DNAT rules' counters (iptables, nftables) or xlb's per-service and verdict counters,
//! and every backend's request count. Each configuration's client traffic comes from a
//! fresh client address, so `TIME_WAIT` sockets and conntrack entries left by the previous
//! configuration cannot collide with its connections.

mod bpf_stats;
mod cluster;
mod figures;
pub mod load;
mod paced;
mod xlb;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_testbed::{self as testbed, Netns, ServerHandle, Topology, TopologyConfig};

use self::figures::{Spread, WrkFigures};
use self::load::{CpuTimes, Iperf, IperfResult, Wrk, WrkResult};
use crate::kube_proxy::{self, ServicePort};
use crate::report::{self, mark, ratio};

const VIP_HTTP_PORT: u16 = 80;
const BACKEND_HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;
/// The range the benchmark's VIPs come from (kube-proxy's service CIDR).
const SERVICE_CIDR: &str = "203.0.113.0/24";
/// The targets, xlb over iptables.
const TARGET_KEEP_ALIVE: f64 = 1.2;
const TARGET_NEW_CONNECTIONS: f64 = 1.5;
/// Client addresses used per configuration: 198.51.100.(20 + k).
const FIRST_CLIENT_HOST: u8 = 20;
const MAX_RUNS: usize = 200;
/// Most connections of one fixed-rate run (the client's port range has 64511 ports).
const MAX_PACED_CONNECTIONS: u64 = 50_000;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// `lb`: client -> one load-balancer namespace -> backends. `cluster`: client ->
    /// router (ECMP) -> three nodes, each programmed the same way -> pods (see
    /// `e2e/cluster.rs`).
    #[arg(long, value_enum, default_value = "lb")]
    topology: TopologyKind,
    /// Backend namespaces behind the VIP (1..=40; the `lb` topology).
    #[arg(long, default_value_t = 4)]
    backends: usize,
    /// Seconds per measurement; each configuration runs three per round.
    #[arg(long, default_value_t = 4)]
    secs: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Do not pin the load generators to one CPU and the servers to another.
    #[arg(long)]
    no_pin: bool,
    /// Run every configuration this many times, interleaved (config by config, round by
    /// round), and report medians: a round disturbed by other processes on the machine
    /// does not decide the result. The loopback reference runs in the first round only.
    /// Default: 3 for `lb`, 5 for `cluster` (whose target is judged on a difference of
    /// two CPU figures, which needs more rounds to be steady).
    #[arg(long)]
    rounds: Option<u32>,
    /// Configurations to run, in this order. Default for `lb`:
    /// loopback,direct,iptables,nftables,xlb; for `cluster`:
    /// direct,iptables,nftables,xlb-snat,xlb-dsr.
    #[arg(long, value_delimiter = ',')]
    configs: Vec<Config>,
    /// `cluster`: new connections per second of the fixed-rate run, which the CPU per
    /// connection that the target is judged on comes from (below every configuration's
    /// saturation, so that every configuration does the same work in the same time).
    #[arg(long, default_value_t = 800)]
    rate: u32,
    /// `cluster`: seconds of the fixed-rate run.
    #[arg(long, default_value_t = 8)]
    paced_secs: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyKind {
    Lb,
    Cluster,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Loopback,
    Direct,
    Iptables,
    Nftables,
    /// The `lb` topology's xlb (one agent, XDP on both sides of the LB namespace).
    Xlb,
    /// The `cluster` topology's xlb: an agent per node, `--lb-mode snat`.
    XlbSnat,
    /// The `cluster` topology's xlb: an agent per node, `--lb-mode dsr`.
    XlbDsr,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Loopback => "loopback",
            Config::Direct => "direct",
            Config::Iptables => "iptables",
            Config::Nftables => "nftables",
            Config::Xlb => "xlb",
            Config::XlbSnat => "xlb-snat",
            Config::XlbDsr => "xlb-dsr",
        }
    }

    /// The configurations a topology can run, in their default order.
    fn of(topology: TopologyKind) -> &'static [Config] {
        match topology {
            TopologyKind::Lb => &[
                Config::Loopback,
                Config::Direct,
                Config::Iptables,
                Config::Nftables,
                Config::Xlb,
            ],
            TopologyKind::Cluster => &[
                Config::Direct,
                Config::Iptables,
                Config::Nftables,
                Config::XlbSnat,
                Config::XlbDsr,
            ],
        }
    }
}

impl Args {
    /// The arguments with the topology's default configurations when none were given.
    fn resolved(&self) -> Args {
        let mut args = self.clone();
        if args.configs.is_empty() {
            args.configs = Config::of(args.topology).to_vec();
        }
        if args.rounds.is_none() {
            args.rounds = Some(match args.topology {
                TopologyKind::Lb => 3,
                TopologyKind::Cluster => 5,
            });
        }
        args
    }

    /// Rounds, once [`Args::resolved`].
    fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(1)
    }
}

/// CPU use during one measurement, in CPUs (1.0 = one CPU busy for the whole time).
#[derive(Debug, Clone, Default, serde::Serialize)]
struct CpuUse {
    wall_s: f64,
    /// Per CPU: busy %, softirq % (packet processing, the LB's work among it).
    per_cpu: Vec<(f64, f64)>,
    /// The load generator (wrk or the iperf3 client).
    client: f64,
    /// The HTTP servers' threads and the iperf3 server.
    servers: f64,
    /// Softirq on all CPUs: forwarding, NAT, XDP, the TCP stacks' receive work.
    softirq: f64,
    /// Busy time that is none of the above: other processes on the machine.
    other: f64,
}

impl CpuUse {
    /// CPU-seconds the benchmark's own work took: load generator, servers, softirq.
    fn own_seconds(&self) -> f64 {
        (self.client + self.servers + self.softirq) * self.wall_s
    }
}

/// A measurement and what happened around it.
#[derive(Debug, Clone, serde::Serialize)]
struct Measured<T> {
    result: T,
    /// HTTP requests each backend answered during the measurement.
    per_backend: Vec<u64>,
    cpu: CpuUse,
}

/// The three measurements of a configuration.
struct Measurements {
    keep_alive: Measured<WrkResult>,
    close: Measured<WrkResult>,
    throughput: Measured<IperfResult>,
}

/// One configuration's run.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    config: &'static str,
    round: u32,
    client_address: Ipv4Addr,
    keep_alive: Measured<WrkResult>,
    close: Measured<WrkResult>,
    throughput: Measured<IperfResult>,
    /// Counters that show the configuration carried the traffic.
    counters: serde_json::Value,
    /// What the checks found wrong; empty when the run is valid.
    problems: Vec<String>,
}

/// Everything that lives for the whole benchmark; dropping it stops the servers and
/// deletes the namespaces (also on error).
struct Bench<'a> {
    args: &'a Args,
    services: Vec<ServicePort>,
    /// (load generators, servers) CPUs when pinning.
    cpus: Option<(usize, usize)>,
    servers: Vec<ServerHandle>,
    /// The iperf3 server's PID (in backend 0's namespace).
    iperf_server: u32,
    topo: Topology,
}

/// Set by SIGINT or SIGTERM: the benchmark stops after the running measurement, and the
/// namespaces and processes are removed on the way out.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; the namespaces and their processes are being removed");
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    let args = &args.resolved();
    validate(args)?;
    if args.topology == TopologyKind::Cluster {
        return cluster::run(args);
    }
    testbed::check_privileges()?;
    check_tools(&[
        "wrk",
        "iperf3",
        "iptables-restore",
        "iptables-save",
        "nft",
        "taskset",
        "ss",
    ])?;
    catch_interrupts();
    let load_line = report::load_line();
    let cpus = if args.no_pin {
        None
    } else {
        let allowed = load::allowed_cpus()?;
        (allowed.len() >= 2).then(|| (allowed[0], allowed[1]))
    };
    let bench = Bench::start(args, cpus)?;
    print_header(args, cpus, &load_line);

    let mut runs = Vec::new();
    for round in 0..args.rounds() {
        for (i, &config) in args.configs.iter().enumerate() {
            // The loopback reference checks capacity; once is enough.
            if config == Config::Loopback && round > 0 {
                continue;
            }
            let k = round as usize * args.configs.len() + i;
            eprintln!(
                "xlb-bench e2e: round {}/{}: {} ...",
                round + 1,
                args.rounds(),
                config.label()
            );
            let run = bench
                .run_config(config, round, k)
                .with_context(|| format!("configuration {}", config.label()))?;
            for p in &run.problems {
                eprintln!("xlb-bench e2e: {}: PROBLEM: {p}", config.label());
            }
            runs.push(run);
        }
    }
    drop(bench);

    let summary = summarize(args, &runs);
    print_report(args, &runs, &summary);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "bench": "e2e",
            "backends": args.backends,
            "secs": args.secs,
            "wrk": { "threads": args.threads, "connections": args.connections },
            "pinned_cpus": cpus,
            "rounds": args.rounds(),
            "machine": load_line,
            "summary": summary,
            "targets": targets(&summary),
            "runs": runs,
            "reproduce": reproduce(args),
        }),
    )?;
    report::fail_on_problems(runs.iter().map(|r| r.problems.len()).sum())
}

fn validate(args: &Args) -> Result<()> {
    if !(1..=testbed::MAX_BACKENDS).contains(&args.backends) {
        bail!("--backends must be 1..={}", testbed::MAX_BACKENDS);
    }
    if args.secs == 0 || args.connections == 0 || args.threads == 0 || args.rounds() == 0 {
        bail!("--secs, --connections, --threads and --rounds must be at least 1");
    }
    if args.threads > args.connections {
        bail!("wrk needs at least as many connections as threads");
    }
    if args.configs.is_empty() || args.configs.len() * args.rounds() as usize > MAX_RUNS {
        bail!("between 1 and {MAX_RUNS} configuration runs (configs x rounds)");
    }
    if args.topology == TopologyKind::Cluster {
        let connections = u64::from(args.rate) * u64::from(args.paced_secs);
        if connections == 0 || connections > MAX_PACED_CONNECTIONS {
            bail!(
                "--rate x --paced-secs must be 1..={MAX_PACED_CONNECTIONS} connections (the \
                 client's port range), got {connections}"
            );
        }
    }
    let allowed = Config::of(args.topology);
    if let Some(bad) = args.configs.iter().find(|c| !allowed.contains(c)) {
        let names: Vec<&str> = allowed.iter().map(|c| c.label()).collect();
        bail!(
            "--configs: {} is not a configuration of the {:?} topology (it has {})",
            bad.label(),
            args.topology,
            names.join(", ")
        );
    }
    Ok(())
}

/// The external programs this benchmark drives; `cargo xtask bench e2e` installs them.
fn check_tools(tools: &[&'static str]) -> Result<()> {
    let missing = report::missing_tools(tools);
    if !missing.is_empty() {
        bail!(
            "missing {}; run the benchmark through `cargo xtask bench e2e`, which installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

impl<'a> Bench<'a> {
    fn start(args: &'a Args, cpus: Option<(usize, usize)>) -> Result<Self> {
        let topo = Topology::build(&TopologyConfig::new("e2e", args.backends))?;
        topo.wait_ready()?;
        // Room for the connection-rate run's ephemeral ports (the client's own namespace).
        topo.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let mut servers = Vec::new();
        for (i, ns) in topo.backends.iter().enumerate() {
            let bind = SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), BACKEND_HTTP_PORT);
            servers.push(testbed::spawn_pinned_http_server(
                ns,
                bind,
                &format!("backend-{i}"),
                cpus.map(|c| c.1),
            )?);
        }
        let mut iperf = load::pinned(cpus.map(|c| c.1), "iperf3");
        iperf.extend(["-s".to_owned(), "-p".to_owned(), IPERF_PORT.to_string()]);
        let rest: Vec<&str> = iperf[1..].iter().map(String::as_str).collect();
        let iperf_server = topo.backends[0].spawn(&iperf[0], &rest)?;
        wait_listening(&topo.backends[0], IPERF_PORT)?;

        let vip = Topology::vip_v4(0);
        let backend = |i: usize, port| SocketAddrV4::new(Topology::backend_v4(i), port);
        let services = vec![
            ServicePort {
                namespace: "bench".into(),
                service: "web".into(),
                port_name: "http".into(),
                vip: SocketAddrV4::new(vip, VIP_HTTP_PORT),
                endpoints: (0..args.backends)
                    .map(|i| backend(i, BACKEND_HTTP_PORT))
                    .collect(),
            },
            ServicePort {
                namespace: "bench".into(),
                service: "web".into(),
                port_name: "iperf".into(),
                vip: SocketAddrV4::new(vip, IPERF_PORT),
                endpoints: vec![backend(0, IPERF_PORT)],
            },
        ];
        Ok(Self {
            args,
            services,
            cpus,
            servers,
            iperf_server,
            topo,
        })
    }

    fn lb(&self) -> &Netns {
        &self.topo.lb
    }

    /// Makes 198.51.100.(20 + k) the client's source address for new connections.
    fn use_client_address(&self, k: usize) -> Result<Ipv4Addr> {
        let host = u8::try_from(k)
            .ok()
            .and_then(|k| FIRST_CLIENT_HOST.checked_add(k))
            .filter(|&h| h < 255)
            .context("out of client addresses")?;
        let addr = Ipv4Addr::new(198, 51, 100, host);
        let client = &self.topo.client;
        client.ip(&[
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            Topology::CLIENT_IF,
        ])?;
        client.ip(&[
            "route",
            "replace",
            "default",
            "via",
            &Topology::lb_client_v4().to_string(),
            "src",
            &addr.to_string(),
        ])?;
        Ok(addr)
    }

    /// Fails unless the LB namespace has no netfilter rule and no XDP program.
    fn ensure_clean(&self, when: &str) -> Result<()> {
        let (iptables, nft) = kube_proxy::rules_present(self.lb())?;
        let xdp = xlb::xdp_attached(self.lb())?;
        if iptables > 0 || nft > 0 || !xdp.is_empty() {
            bail!(
                "{when}: the LB namespace is not clean ({iptables} iptables rules, {nft} nft \
                 ruleset lines, XDP on {xdp:?}); refusing to measure two configurations at once"
            );
        }
        Ok(())
    }

    fn run_config(&self, config: Config, round: u32, k: usize) -> Result<Run> {
        check_interrupted()?;
        let client_address = self.use_client_address(k)?;
        self.ensure_clean("before")?;
        let active = self.activate(config)?;
        let measured = self.measure_all(config, &active);
        let counters = active.counters(self.lb());
        self.deactivate(active)?;
        self.ensure_clean("after")?;
        let Measurements {
            keep_alive,
            close,
            throughput,
        } = measured?;
        let counters = counters?;
        let mut run = Run {
            config: config.label(),
            round,
            client_address,
            keep_alive,
            close,
            throughput,
            counters: serde_json::Value::Null,
            problems: Vec::new(),
        };
        self.check(config, &counters, &mut run);
        run.counters = counters.to_json();
        Ok(run)
    }

    fn activate(&self, config: Config) -> Result<Active<'_>> {
        let lb = self.lb();
        Ok(match config {
            Config::Loopback | Config::Direct => Active::Direct,
            Config::Iptables => {
                kube_proxy::apply_iptables(lb, &self.services)?;
                Active::Iptables
            }
            Config::Nftables => {
                kube_proxy::apply_nftables(
                    lb,
                    &self.services,
                    SERVICE_CIDR,
                    Topology::lb_client_v4(),
                )?;
                Active::Nftables
            }
            Config::Xlb => {
                let started = xlb::start_xlb(lb, &self.services)?;
                let attached = xlb::xdp_attached(lb)?;
                if !attached.contains(&Topology::LB_CLIENT_IF.to_owned())
                    || !attached.contains(&Topology::LB_BACKEND_IF.to_owned())
                {
                    bail!("xlb started but XDP is attached only to {attached:?}");
                }
                Active::Xlb(Box::new(started))
            }
            Config::XlbSnat | Config::XlbDsr => {
                bail!("{} runs on the cluster topology only", config.label())
            }
        })
    }

    fn deactivate(&self, active: Active<'_>) -> Result<()> {
        match active {
            Active::Direct => Ok(()),
            Active::Iptables | Active::Nftables => kube_proxy::clear(self.lb()),
            Active::Xlb(x) => {
                xlb::stop_xlb(*x);
                Ok(())
            }
        }
    }

    /// The HTTP and iperf3 targets: the VIP, or backend 0 itself for `direct`.
    fn targets(&self, config: Config) -> (SocketAddr, SocketAddr) {
        if matches!(config, Config::Loopback | Config::Direct) {
            let b0 = IpAddr::V4(Topology::backend_v4(0));
            (
                SocketAddr::new(b0, BACKEND_HTTP_PORT),
                SocketAddr::new(b0, IPERF_PORT),
            )
        } else {
            (
                SocketAddr::V4(self.services[0].vip),
                SocketAddr::V4(self.services[1].vip),
            )
        }
    }

    fn measure_all(&self, config: Config, active: &Active<'_>) -> Result<Measurements> {
        let (http, iperf) = self.targets(config);
        let client = if config == Config::Loopback {
            &self.topo.backends[0]
        } else {
            &self.topo.client
        };
        // The path works (and ARP, conntrack and xlb's next-hop cache are warm) before
        // anything is timed.
        let mut seen = BTreeMap::<String, u32>::new();
        for _ in 0..8 * self.args.backends {
            let name = testbed::http_get(client, http, Duration::from_secs(2))?;
            *seen.entry(name).or_default() += 1;
        }
        tracing::info!(config = config.label(), ?seen, "path check");
        if matches!(active, Active::Xlb(_)) && seen.is_empty() {
            bail!("no answer through xlb");
        }

        let url = format!("http://{http}/");
        let cpu = self.cpus.map(|c| c.0);
        let wrk = |close| Wrk {
            url: &url,
            threads: self.args.threads,
            connections: self.args.connections,
            secs: self.args.secs,
            close,
            cpu,
        };
        let keep_alive = self.measure(|| wrk(false).run(client))?;
        let close = self.measure(|| wrk(true).run(client))?;
        let host = iperf.ip().to_string();
        let throughput = self.measure(|| {
            Iperf {
                host: &host,
                port: iperf.port(),
                secs: self.args.secs,
                cpu,
            }
            .run(client)
        })?;
        Ok(Measurements {
            keep_alive,
            close,
            throughput,
        })
    }

    /// Runs `f` (one load generator run) and records per-backend requests and CPU use.
    fn measure<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<Measured<T>> {
        measure(
            &self.servers,
            &|| load::process_cpu_time(self.iperf_server),
            f,
        )
    }

    /// Records in `run.problems` whatever says the configuration did not carry the
    /// traffic as intended.
    fn check(&self, config: Config, counters: &Counters, run: &mut Run) {
        let mut problems = Vec::new();
        let expected_backends = if matches!(config, Config::Loopback | Config::Direct) {
            1
        } else {
            self.args.backends
        };
        for (what, m) in [("keep-alive", &run.keep_alive), ("close", &run.close)] {
            let served = m.per_backend.iter().filter(|&&n| n > 0).count();
            if served != expected_backends {
                problems.push(format!(
                    "{what}: {served} of {expected_backends} backends served requests ({:?})",
                    m.per_backend
                ));
            }
            if m.result.requests == 0 {
                problems.push(format!("{what}: wrk completed no request"));
            }
        }
        let new_connections = run.close.result.requests;
        let http_endpoints: Vec<String> = self.services[0]
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect();
        match counters {
            Counters::None => {}
            Counters::Dnat(counts) => {
                for e in &http_endpoints {
                    if counts.get(e).copied().unwrap_or(0) == 0 {
                        problems.push(format!("the DNAT rule for {e} counted no connection"));
                    }
                }
                let total: u64 = http_endpoints.iter().filter_map(|e| counts.get(e)).sum();
                if total < new_connections {
                    problems.push(format!(
                        "the DNAT rules counted {total} connections, fewer than the {new_connections} requests of the Connection: close run"
                    ));
                }
            }
            Counters::Xlb(c) => {
                // New flows are not one per request: a reused client port finds its
                // conntrack entry and keeps its backend. What must hold: xlb picked
                // backends, and redirected (nearly) every packet of its services itself.
                let (flows, _, _) = c.services.first().copied().unwrap_or_default();
                if flows == 0 {
                    problems.push("xlb selected no backend".to_owned());
                }
                let carried: u64 = c.services.iter().map(|(_, p, r)| p + r).sum();
                let count = |name: &str| {
                    c.reasons
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0, |(_, v)| *v)
                };
                let redirected = count("fwd_redirect") + count("reply_redirect");
                #[expect(clippy::cast_precision_loss, reason = "packet counts")]
                let share = redirected as f64 / carried.max(1) as f64;
                if count("fwd_redirect") == 0 || count("reply_redirect") == 0 || share < 0.99 {
                    problems.push(format!(
                        "xlb redirected {redirected} of its services' {carried} packets itself: {:?}",
                        c.reasons
                    ));
                }
            }
        }
        run.problems = problems;
    }
}

/// The configuration that is programmed right now.
enum Active<'a> {
    Direct,
    Iptables,
    Nftables,
    Xlb(Box<xlb::Xlb<'a>>),
}

/// Counters read from the active configuration.
enum Counters {
    None,
    /// Connections per endpoint that a DNAT rule translated.
    Dnat(BTreeMap<String, u64>),
    Xlb(xlb::XlbCounters),
}

impl Counters {
    fn to_json(&self) -> serde_json::Value {
        match self {
            Counters::None => serde_json::Value::Null,
            Counters::Dnat(c) => serde_json::json!({ "dnat_connections": c }),
            Counters::Xlb(c) => serde_json::json!({
                "services_new_flows_packets_replies": c.services,
                "reasons": c.reasons,
            }),
        }
    }

    /// One line for the report.
    fn summary(value: &serde_json::Value) -> String {
        if let Some(c) = value.get("dnat_connections").and_then(|c| c.as_object()) {
            let parts: Vec<String> = c.iter().map(|(e, n)| format!("{e} {n}")).collect();
            format!("DNAT rule counters (connections): {}", parts.join(", "))
        } else if let Some(s) = value.get("services_new_flows_packets_replies") {
            format!(
                "xlb per service [new flows, packets, replies]: {s}; verdicts: {}",
                value["reasons"]
            )
        } else {
            "no load balancer (plain routing)".to_owned()
        }
    }
}

impl Active<'_> {
    fn counters(&self, lb: &Netns) -> Result<Counters> {
        Ok(match self {
            Active::Direct => Counters::None,
            Active::Iptables => Counters::Dnat(kube_proxy::iptables_dnat_counts(lb)?),
            Active::Nftables => Counters::Dnat(kube_proxy::nft_dnat_counts(lb)?),
            Active::Xlb(x) => Counters::Xlb(x.counters()?),
        })
    }
}

/// Runs `f` (one load generator run) and records the requests each of `servers` answered
/// and where the CPU time went: the load generator (this process's reaped children), the
/// servers (their threads, plus `extra_server_cpu`), softirq on every CPU (`/proc/stat`),
/// and the rest of the machine's busy time.
fn measure<T>(
    servers: &[ServerHandle],
    extra_server_cpu: &dyn Fn() -> Duration,
    f: impl FnOnce() -> Result<T>,
) -> Result<Measured<T>> {
    check_interrupted()?;
    let server_cpu =
        || servers.iter().map(ServerHandle::cpu_time).sum::<Duration>() + extra_server_cpu();
    let requests = || servers.iter().map(ServerHandle::served).collect::<Vec<_>>();
    let (req0, srv0, child0) = (requests(), server_cpu(), load::children_cpu_time());
    let cpu0 = CpuTimes::read()?;
    let start = Instant::now();
    let result = f()?;
    let wall_s = start.elapsed().as_secs_f64().max(1e-9);
    let cpu1 = CpuTimes::read()?;
    let per_backend = requests()
        .iter()
        .zip(&req0)
        .map(|(now, then)| now - then)
        .collect();
    let per_cpu = cpu1.since(&cpu0);
    let busy: f64 = per_cpu.iter().map(|(b, _)| b / 100.0).sum();
    let softirq: f64 = per_cpu.iter().map(|(_, s)| s / 100.0).sum();
    let client = load::children_cpu_time()
        .saturating_sub(child0)
        .as_secs_f64()
        / wall_s;
    let servers = server_cpu().saturating_sub(srv0).as_secs_f64() / wall_s;
    let cpu = CpuUse {
        wall_s,
        per_cpu,
        client,
        servers,
        softirq,
        other: (busy - client - servers - softirq).max(0.0),
    };
    Ok(Measured {
        result,
        per_backend,
        cpu,
    })
}

/// Waits (at most 5 s) until something listens on TCP `port` in `ns`.
fn wait_listening(ns: &Netns, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    loop {
        let out = ns.exec("ss", &["-Hltn", &filter])?;
        if !out.stdout.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("nothing listens on port {port} in {} after 5 s", ns.name());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The figures printed per configuration: medians over rounds.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    keep_alive_rps: f64,
    keep_alive_p99_ms: f64,
    new_connections_per_sec: f64,
    close_p99_ms: f64,
    throughput_gbit: f64,
    /// The benchmark's own CPU time (load generator, servers, softirq) per unit of work:
    /// what the work cost, whatever else ran on the machine.
    keep_alive_cpu_us_per_request: f64,
    close_cpu_us_per_connection: f64,
    throughput_cpu_ms_per_gbit: f64,
}

fn summarize(args: &Args, runs: &[Run]) -> BTreeMap<&'static str, Figures> {
    let mut out = BTreeMap::new();
    for config in &args.configs {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.config == config.label()).collect();
        let keep_alive = WrkFigures::of(mine.iter().map(|r| &r.keep_alive));
        let close = WrkFigures::of(mine.iter().map(|r| &r.close));
        out.insert(
            config.label(),
            Figures {
                keep_alive_rps: keep_alive.requests_per_sec.median,
                keep_alive_p99_ms: keep_alive.p99_ms.median,
                new_connections_per_sec: close.requests_per_sec.median,
                close_p99_ms: close.p99_ms.median,
                throughput_gbit: Spread::of(mine.iter().map(|r| r.throughput.result.gbit_per_sec))
                    .median,
                keep_alive_cpu_us_per_request: keep_alive.cpu_us_per_request.median,
                close_cpu_us_per_connection: close.cpu_us_per_request.median,
                throughput_cpu_ms_per_gbit: Spread::of(mine.iter().map(|r| {
                    let gbit = r.throughput.result.gbit_per_sec * f64::from(args.secs);
                    1e3 * r.throughput.cpu.own_seconds() / gbit
                }))
                .median,
            },
        );
    }
    out
}

fn reproduce(args: &Args) -> String {
    let configs: Vec<&str> = args.configs.iter().map(|c| c.label()).collect();
    format!(
        "cargo xtask bench e2e --backends {} --secs {} --connections {} --threads {} --rounds {} --configs {}{}",
        args.backends,
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
        "xlb e2e benchmark: client ns -> LB ns -> {} backend ns (veth pairs, a bridge), \
         VIP 203.0.113.10: port 80 -> HTTP on every backend, port 5201 -> iperf3 on backend 0",
        args.backends
    );
    println!("{load_line}");
    match cpus {
        Some((load_cpu, srv)) => println!(
            "pinned: wrk and the iperf3 client on CPU {load_cpu}; the HTTP servers and the iperf3 \
             server on CPU {srv} (packet forwarding, the LB included, runs in softirq on the \
             CPU that sent the packet)"
        ),
        None => println!("not pinned: everything shares every CPU"),
    }
    println!(
        "{} s per measurement; wrk -t{} -c{}; {} round(s)",
        args.secs,
        args.threads,
        args.connections,
        args.rounds()
    );
    println!();
}

/// The targets against what was measured (xlb over iptables).
fn targets(summary: &BTreeMap<&'static str, Figures>) -> serde_json::Value {
    let (Some(x), Some(ipt)) = (summary.get("xlb"), summary.get("iptables")) else {
        return serde_json::Value::Null;
    };
    let entry = |target: f64, x: f64, ipt: f64| {
        let r = ratio(x, ipt);
        serde_json::json!({
            "target_ratio": target,
            "ratio": r,
            "met": r.is_some_and(|r| r >= target),
        })
    };
    serde_json::json!({
        "keep_alive_requests_per_sec": entry(TARGET_KEEP_ALIVE, x.keep_alive_rps, ipt.keep_alive_rps),
        "new_connections_per_sec": entry(
            TARGET_NEW_CONNECTIONS,
            x.new_connections_per_sec,
            ipt.new_connections_per_sec
        ),
    })
}

/// A row of the main table: a figure per configuration, and the target when the issue
/// sets one.
struct Row {
    name: &'static str,
    figure: fn(&Figures) -> f64,
    digits: usize,
    target: Option<f64>,
}

const ROWS: [Row; 8] = [
    Row {
        name: "HTTP keep-alive requests/s",
        figure: |f| f.keep_alive_rps,
        digits: 0,
        target: Some(TARGET_KEEP_ALIVE),
    },
    Row {
        name: "  p99 latency ms",
        figure: |f| f.keep_alive_p99_ms,
        digits: 3,
        target: None,
    },
    Row {
        name: "  CPU us per request",
        figure: |f| f.keep_alive_cpu_us_per_request,
        digits: 1,
        target: None,
    },
    Row {
        name: "HTTP new connections/s",
        figure: |f| f.new_connections_per_sec,
        digits: 0,
        target: Some(TARGET_NEW_CONNECTIONS),
    },
    Row {
        name: "  p99 latency ms",
        figure: |f| f.close_p99_ms,
        digits: 3,
        target: None,
    },
    Row {
        name: "  CPU us per connection",
        figure: |f| f.close_cpu_us_per_connection,
        digits: 1,
        target: None,
    },
    Row {
        name: "TCP throughput Gbit/s",
        figure: |f| f.throughput_gbit,
        digits: 2,
        target: None,
    },
    Row {
        name: "  CPU ms per Gbit",
        figure: |f| f.throughput_cpu_ms_per_gbit,
        digits: 1,
        target: None,
    },
];

fn print_report(args: &Args, runs: &[Run], summary: &BTreeMap<&'static str, Figures>) {
    print_figures(summary);
    println!();
    print_cpu(runs);
    println!();
    print_checks(runs);
    println!();
    println!("reproduce: {}", reproduce(args));
}

fn print_figures(summary: &BTreeMap<&'static str, Figures>) {
    let cell = |v: Option<f64>, digits: usize| {
        v.filter(|v| v.is_finite())
            .map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
    };
    println!(
        "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}  target (xlb/iptables)",
        "metric", "loopback", "direct", "iptables", "nftables", "xlb", "xlb/ipt", "xlb/nft"
    );
    for row in &ROWS {
        let [loopback, direct, ipt, nft, x] = [
            Config::Loopback,
            Config::Direct,
            Config::Iptables,
            Config::Nftables,
            Config::Xlb,
        ]
        .map(|c| summary.get(c.label()).map(row.figure));
        let r_ipt = x.zip(ipt).and_then(|(x, i)| ratio(x, i));
        let r_nft = x.zip(nft).and_then(|(x, n)| ratio(x, n));
        let target = match (row.target, r_ipt) {
            (Some(t), Some(r)) => format!(">= {t:.2}x: {}", mark(r >= t)),
            (Some(t), None) => format!(">= {t:.2}x: not measured"),
            (None, _) if row.name.starts_with("  ") => "(lower is better)".to_owned(),
            (None, _) => String::new(),
        };
        println!(
            "{:<26} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}  {target}",
            row.name,
            cell(loopback, row.digits),
            cell(direct, row.digits),
            cell(ipt, row.digits),
            cell(nft, row.digits),
            cell(x, row.digits),
            cell(r_ipt, 3),
            cell(r_nft, 3),
        );
    }
    println!(
        "(references, not competitors: loopback = wrk/iperf3 inside backend 0's namespace \
         against its own servers, what servers and load generators manage without any \
         network path; direct = client -> backend 0's address through the LB namespace's \
         plain routing, no NAT. Medians over rounds. CPU per request: the load generator's, \
         the servers' and all softirq CPU time over the requests, which leaves out other \
         processes on the machine)"
    );
}

fn print_cpu(runs: &[Run]) {
    println!(
        "Each measurement: its figure; busy/softirq % per CPU; CPU used (in CPUs) by the load \
         generator, the servers, softirq, and other processes on the machine:"
    );
    for run in runs {
        for (what, value, cpu) in [
            (
                "keep-alive",
                format!("{:.0} req/s", run.keep_alive.result.requests_per_sec),
                &run.keep_alive.cpu,
            ),
            (
                "close",
                format!("{:.0} conn/s", run.close.result.requests_per_sec),
                &run.close.cpu,
            ),
            (
                "iperf3",
                format!("{:.2} Gbit/s", run.throughput.result.gbit_per_sec),
                &run.throughput.cpu,
            ),
        ] {
            let per_cpu: Vec<String> = cpu
                .per_cpu
                .iter()
                .map(|(busy, soft)| format!("{busy:>3.0}/{soft:>3.0}"))
                .collect();
            println!(
                "  {:<9} r{} {:<10} {:>14}  {}  client {:.2}  servers {:.2}  softirq {:.2}  other {:.2}",
                run.config,
                run.round + 1,
                what,
                value,
                per_cpu.join("  "),
                cpu.client,
                cpu.servers,
                cpu.softirq,
                cpu.other
            );
        }
    }
}

fn print_checks(runs: &[Run]) {
    println!("Path checks (each configuration carried the traffic):");
    for run in runs {
        let share = |m: &Measured<WrkResult>| {
            m.per_backend
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("/")
        };
        println!(
            "  {:<9} r{} client {}: requests per backend keep-alive {}, close {}; errors: \
             keep-alive {}, close {}; iperf3 retransmits {}",
            run.config,
            run.round + 1,
            run.client_address,
            share(&run.keep_alive),
            share(&run.close),
            run.keep_alive.result.errors,
            run.close.result.errors,
            run.throughput.result.retransmits,
        );
        println!("            {}", Counters::summary(&run.counters));
        for p in &run.problems {
            println!("            PROBLEM: {p}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::parse_args;

    #[test]
    fn defaults_and_reproduce_line() {
        let args = parse_args::<Args>(&[]).resolved();
        assert_eq!(
            args.configs,
            [
                Config::Loopback,
                Config::Direct,
                Config::Iptables,
                Config::Nftables,
                Config::Xlb
            ]
        );
        validate(&args).unwrap();
        assert_eq!(
            reproduce(&args),
            "cargo xtask bench e2e --backends 4 --secs 4 --connections 32 --threads 1 --rounds 3 --configs loopback,direct,iptables,nftables,xlb"
        );
        let args = parse_args::<Args>(&["--configs", "xlb,iptables", "--no-pin"]).resolved();
        assert_eq!(args.configs, [Config::Xlb, Config::Iptables]);
        assert!(reproduce(&args).ends_with("--configs xlb,iptables --no-pin"));
        assert!(validate(&parse_args::<Args>(&["--backends", "0"]).resolved()).is_err());
        // Each topology runs only its own configurations.
        let cluster = parse_args::<Args>(&["--topology", "cluster"]).resolved();
        assert_eq!(
            cluster.configs,
            [
                Config::Direct,
                Config::Iptables,
                Config::Nftables,
                Config::XlbSnat,
                Config::XlbDsr
            ]
        );
        assert_eq!(cluster.rounds(), 5);
        validate(&cluster).unwrap();
        let too_many = parse_args::<Args>(&[
            "--topology",
            "cluster",
            "--rate",
            "10000",
            "--paced-secs",
            "6",
        ])
        .resolved();
        assert!(validate(&too_many).is_err());
        let mixed = parse_args::<Args>(&["--topology", "cluster", "--configs", "xlb"]).resolved();
        assert!(validate(&mixed).is_err());
        let mixed = parse_args::<Args>(&["--configs", "xlb-snat"]).resolved();
        assert!(validate(&mixed).is_err());
    }
}
