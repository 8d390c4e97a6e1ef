//! `chaos`: what failures and mistakes cost under traffic, through the demo topology
//! (client, load-balancer node, three backends in namespaces). Two agents run in the
//! load-balancer namespace as an operator runs them: the L4 agent from a config file
//! (XDP on both interfaces, a TCP health check per backend) and an L7-only agent from
//! manifests (an Ingress for one host over the same three backends). A bounded stream
//! runs from the client during each scenario ([`load`]): new connections to the VIP at
//! `--rate` per second and `--keepalive` keep-alive connections to the L7 hop. Each
//! scenario's window before its action is the baseline of the window after it.
//!
//! 1. **Endpoint killed**: backend 2's server stops (its listener and connections close,
//!    as when its process dies). L4: new connections fail until the health check takes
//!    it out of the Maglev table; counted, with the time of the last failure and of the
//!    health check's verdict. L7: failed requests and p99 in the 10 s after the kill
//!    (passive ejection, no EndpointSlice change). The backend is restarted after.
//!    **Endpoint unreachable**: the same with backend 2's replies blackholed, so that
//!    connects time out instead of being refused (a dead host, a partition).
//! 2. **Agent kill -9 and restart**: new connections keep flowing through the pinned
//!    maps; connections opened before the kill are used after the restart.
//! 3. **Config replaced by a broken one**: first one whose service is invalid, then one
//!    that is no YAML, each renamed into place; the previous version must stay.
//! 4. **Hostile HTTP**: the 10,000-request corpus of `lb_testbed::hostile` against the
//!    hop, with the counts the issue asks for.
//!
//! Bounded: every window has a fixed length, every request a timeout; the namespaces,
//! agents (by PID), pins and files are removed on the way out, also on error.

mod load;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_agent::status::Report;
use lb_testbed::{
    self as testbed, AgentProcess, HttpConnection, Netns, ServerHandle, TestCa, Topology,
    TopologyConfig, hostile,
};

use self::load::{Kind, Plan, Sample};
use crate::l7::{Route, xlb as l7_agent};
use crate::report;

const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
/// The backend the endpoint scenarios fail.
const KILLED: usize = 2;
const HOST: &str = "chaos.example.com";
const HOP_PORT: u16 = 8081;
/// Connections opened before the agent is killed and used after its restart.
const HELD: usize = 20;
const SETTLE: Duration = Duration::from_secs(30);
/// The health check of every backend (the L4 agent's config).
const HEALTH: &str = "{ tcp: { interval: 500ms, timeout: 250ms, rise: 2, fall: 2 } }";
/// The L7 window the issue asks for.
const L7_WINDOW: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct Args {
    /// Seconds of traffic before each action (the baseline).
    #[arg(long, default_value_t = 5)]
    before: u64,
    /// Seconds of traffic after each action.
    #[arg(long, default_value_t = 10)]
    after: u64,
    /// New L4 connections per second.
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Keep-alive connections to the L7 hop (each sends a request every 10 ms).
    #[arg(long, default_value_t = 4)]
    keepalive: usize,
    /// Leave out the 10,000 hostile requests.
    #[arg(long)]
    no_hostile: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Requests of one kind in one window.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct Stats {
    sent: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    /// The last failure's start, after the window's start.
    last_failure_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn stats(samples: &[Sample], kind: Kind, from: Duration, to: Duration) -> Stats {
    let window: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.kind == kind && s.at >= from && s.at < to)
        .collect();
    let mut latencies: Vec<Duration> = window.iter().map(|s| s.latency).collect();
    latencies.sort_unstable();
    let pct = |p| {
        if latencies.is_empty() {
            f64::NAN
        } else {
            ms(report::percentile(&latencies, p))
        }
    };
    Stats {
        sent: window.len(),
        failed: window.iter().filter(|s| !s.ok()).count(),
        p50_ms: pct(50.0),
        p99_ms: pct(99.0),
        last_failure_ms: window
            .iter()
            .filter(|s| !s.ok())
            .map(|s| ms(s.at.saturating_sub(from)))
            .reduce(f64::max),
    }
}

/// One scenario's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Outcome {
    name: &'static str,
    l4_before: Stats,
    l4_after: Stats,
    l7_before: Stats,
    l7_after: Stats,
    /// What the action itself measured (e.g. the health check's verdict).
    notes: Vec<String>,
}

struct Bed {
    topo: Topology,
    /// Per backend, its servers (IPv4 and IPv6); emptied to kill it.
    servers: Mutex<Vec<Vec<ServerHandle>>>,
    dir: PathBuf,
}

impl Bed {
    fn new() -> Result<Bed> {
        let topo = Topology::build(&TopologyConfig::new("chaos", BACKENDS))?;
        topo.wait_ready()?;
        let mut servers = Vec::new();
        for i in 0..BACKENDS {
            servers.push(testbed::spawn_backend_http_servers(&topo, i, BACKEND_PORT)?);
        }
        let dir = std::env::temp_dir().join(format!("xlb-chaos-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("manifests"))?;
        Ok(Bed {
            topo,
            servers: Mutex::new(servers),
            dir,
        })
    }

    fn config(&self) -> PathBuf {
        self.dir.join("xlb.yaml")
    }

    /// Replaces the config file atomically (write beside, rename), as the README asks.
    fn write_config(&self, text: &str) -> Result<()> {
        let fresh = self.dir.join("xlb.yaml.new");
        std::fs::write(&fresh, text)?;
        std::fs::rename(&fresh, self.config())?;
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Topology::vip_v4(0)), VIP_PORT)
}

fn backend(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), BACKEND_PORT)
}

fn good_config() -> String {
    let mut y = format!(
        "services:\n  - name: web\n    frontends: [{{ address: {}, port: {VIP_PORT}, protocol: TCP }}]\n    health: {HEALTH}\n    backends:\n",
        vip().ip()
    );
    for i in 0..BACKENDS {
        let b = backend(i);
        let _ = writeln!(y, "      - {{ address: {}, port: {} }}", b.ip(), b.port());
    }
    y
}

/// Every backend up and in the table.
fn all_up(r: &Report) -> bool {
    r.services.iter().any(|s| {
        s.backends.len() == BACKENDS
            && s.backends
                .iter()
                .all(|b| b.health == "up" && b.forwarding && b.share > 0.0)
    })
}

fn killed_out(r: &Report) -> bool {
    let endpoint = backend(KILLED).to_string();
    r.services.iter().any(|s| {
        s.backends
            .iter()
            .any(|b| b.endpoint == endpoint && b.health == "down" && !b.forwarding)
    })
}

/// Runs the stream from the client for `before`, then `action` (timed from the
/// epoch), then the stream for `after` more; returns the samples and when the action
/// started.
fn with_traffic<T>(
    bed: &Bed,
    args: &Args,
    action: impl FnOnce() -> Result<T>,
) -> Result<(Vec<Sample>, Duration, T)> {
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let plan = Plan {
        vip: vip(),
        hop: SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), HOP_PORT),
        host: HOST,
        rate: args.rate,
        keepalive: args.keepalive,
        epoch,
        stop: Arc::clone(&stop),
    };
    let limit = Duration::from_secs(args.before + args.after) + SETTLE + SETTLE;
    let client = &bed.topo.client;
    std::thread::scope(|scope| {
        let traffic = scope.spawn(move || client.block_on(limit, move || load::run(plan)));
        std::thread::sleep(Duration::from_secs(args.before));
        let at = epoch.elapsed();
        let result = action();
        let end = at + Duration::from_secs(args.after);
        if result.is_ok() {
            std::thread::sleep(end.saturating_sub(epoch.elapsed()));
        }
        stop.store(true, Ordering::Relaxed);
        let samples = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))??;
        Ok((samples, at, result?))
    })
}

fn outcome(
    name: &'static str,
    args: &Args,
    samples: &[Sample],
    at: Duration,
    notes: Vec<String>,
) -> Outcome {
    let before = at.saturating_sub(Duration::from_secs(args.before));
    let end = at + Duration::from_secs(args.after);
    Outcome {
        name,
        l4_before: stats(samples, Kind::L4, before, at),
        l4_after: stats(samples, Kind::L4, at, end),
        l7_before: stats(samples, Kind::L7, before, at),
        l7_after: stats(
            samples,
            Kind::L7,
            at,
            at + L7_WINDOW.min(end.saturating_sub(at)),
        ),
        notes,
    }
}

pub fn run(args: &Args) -> Result<()> {
    if args.rate == 0 || args.rate > 2_000 || args.keepalive > 64 || args.after < 1 {
        bail!("--rate must be 1-2000, --keepalive at most 64, --after at least 1");
    }
    testbed::check_privileges()?;
    println!("{}", report::load_line());
    let bed = Bed::new()?;
    bed.write_config(&good_config())?;
    let binary = testbed::agent::sibling_agent_binary()?;
    let mut l4 = AgentProcess::start(
        &bed.topo.lb,
        &binary,
        &bed.config(),
        "chaos",
        &["--poll-ms", "100"],
    )?;
    l4.wait_for(SETTLE, all_up)?;

    let ca = TestCa::new("xlb-bench chaos CA")?;
    let cert = ca.issue(&[HOST])?;
    let routes = [Route {
        path: "/".into(),
        upstream: "web".into(),
        endpoints: (0..BACKENDS).map(backend).collect(),
    }];
    let listen = l7_agent::Listen {
        http: SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), HOP_PORT),
        https: SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), HOP_PORT + 1),
        admin: "127.0.0.1:19191".parse()?,
    };
    let l7 = l7_agent::start(
        &bed.topo.lb,
        &[],
        &lb_testbed::agent::sibling_agent_binary()?,
        "bench-l7",
        &bed.dir.join("manifests"),
        &l7_agent::manifests(HOST, &routes, &cert),
        &listen,
    )?;
    wait_hop(&bed.topo.client, listen.http, &l7)?;

    let outcomes = vec![
        endpoint_fails(&bed, args, &l4, Failure::Killed)?,
        endpoint_fails(&bed, args, &l4, Failure::Unreachable)?,
        agent_killed(&bed, args, &mut l4)?,
        broken_config(&bed, args, &l4)?,
    ];
    drop(l7);
    drop(l4);
    let hostile = if args.no_hostile {
        None
    } else {
        Some(hostile_corpus()?)
    };
    print_table(args, &outcomes, hostile.as_ref());
    let json = serde_json::json!({
        "args": {"before": args.before, "after": args.after, "rate": args.rate, "keepalive": args.keepalive},
        "scenarios": outcomes,
        "hostile": hostile.as_ref().map(|h| serde_json::json!({
            "sent": h.sent,
            "answered": h.answered(),
            "closed_without_answer": h.closed_without_answer,
            "backend_requests": h.backend_requests,
            "violations": h.violations.len(),
            "stalled": h.stalled.len(),
            "panics": h.panics,
            "hop_ended": h.hop_ended,
        })),
    });
    report::write_json(args.json.as_deref(), &json)?;
    Ok(())
}

/// Waits until the hop answers a request for the host.
fn wait_hop(client: &Netns, hop: SocketAddr, agent: &AgentProcess<'_>) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    let mut last = String::new();
    while Instant::now() < deadline {
        match client.block_on(SETTLE, || load::l7_once(hop, HOST))? {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "the L7 hop at {hop} did not route {HOST} within {SETTLE:?} ({last}); log:\n{}",
        agent.log()
    )
}

/// How an endpoint fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Its server stops: connections are refused (a dead process).
    Killed,
    /// Its replies are blackholed: connects time out (a dead host or a partition).
    Unreachable,
}

/// The routes in backend [`KILLED`]'s namespace that blackhole its replies to the
/// load balancer's and the client's addresses.
fn blackhole(bed: &Bed, add: bool) -> Result<()> {
    let ns = &bed.topo.backends[KILLED];
    for addr in [
        Topology::lb_backend_v4(),
        Topology::lb_client_v4(),
        Topology::client_v4(),
    ] {
        let prefix = format!("{addr}/32");
        ns.ip(&[
            "route",
            if add { "add" } else { "del" },
            "blackhole",
            &prefix,
        ])?;
    }
    Ok(())
}

fn endpoint_fails(
    bed: &Bed,
    args: &Args,
    l4: &AgentProcess<'_>,
    failure: Failure,
) -> Result<Outcome> {
    let (name, what) = match failure {
        Failure::Killed => ("endpoint killed", "killed (connections refused)"),
        Failure::Unreachable => ("endpoint unreachable", "unreachable (connects time out)"),
    };
    println!("scenario: backend {KILLED} {what} under traffic");
    let servers = |f: &mut dyn FnMut(&mut Vec<Vec<ServerHandle>>)| {
        f(&mut bed
            .servers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
    };
    let (samples, at, verdict) = with_traffic(bed, args, || {
        let failed = Instant::now();
        match failure {
            Failure::Killed => servers(&mut |s| s[KILLED].clear()),
            Failure::Unreachable => blackhole(bed, true)?,
        }
        l4.wait_for(SETTLE, killed_out)?;
        Ok(failed.elapsed())
    })?;
    let mut notes = vec![format!(
        "health check took backend {KILLED} out of the table {:.0} ms after the failure",
        ms(verdict)
    )];
    let after = samples
        .iter()
        .filter(|s| s.kind == Kind::L4 && s.at >= at + verdict && s.ok())
        .fold([0usize; BACKENDS], |mut n, s| {
            if let Some(b) = s.backend {
                n[usize::from(b)] += 1;
            }
            n
        });
    notes.push(format!(
        "L4 connections started after that verdict, answered per backend: {after:?}"
    ));
    // Bring the backend back and wait until it is in the table again.
    match failure {
        Failure::Killed => {
            let mut respawned = Ok(());
            servers(&mut |s| match testbed::spawn_backend_http_servers(
                &bed.topo,
                KILLED,
                BACKEND_PORT,
            ) {
                Ok(handles) => s[KILLED] = handles,
                Err(e) => respawned = Err(e),
            });
            respawned?;
        }
        Failure::Unreachable => blackhole(bed, false)?,
    }
    let back = Instant::now();
    l4.wait_for(SETTLE, all_up)?;
    notes.push(format!(
        "back: in the table again {:.0} ms after it recovered",
        ms(back.elapsed())
    ));
    Ok(outcome(name, args, &samples, at, notes))
}

fn agent_killed(bed: &Bed, args: &Args, l4: &mut AgentProcess<'_>) -> Result<Outcome> {
    println!("scenario: agent kill -9 and restart under traffic");
    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut conn = HttpConnection::open(&bed.topo.client, vip(), load::REQUEST_TIMEOUT)?;
        conn.get(load::REQUEST_TIMEOUT)
            .context("a held connection before the kill")?;
        held.push(conn);
    }
    let (samples, at, (adopted, held_failed)) = with_traffic(bed, args, || {
        // Each held connection is used just before the kill too (the backends close
        // connections idle for 10 s).
        let failed_before = held
            .iter_mut()
            .map(|c| c.get(load::REQUEST_TIMEOUT).is_err())
            .filter(|failed| *failed)
            .count();
        if failed_before > 0 {
            bail!("{failed_before} held connections failed before the kill");
        }
        let killed = Instant::now();
        l4.kill9()?;
        l4.restart()?;
        l4.wait_for(SETTLE, |r| {
            all_up(r) && l4.log().contains("adopted pinned maps")
        })?;
        let adopted = killed.elapsed();
        let failed = held
            .iter_mut()
            .map(|c| c.get(load::REQUEST_TIMEOUT).is_err())
            .filter(|failed| *failed)
            .count();
        Ok((adopted, failed))
    })?;
    let notes = vec![
        format!(
            "restarted agent adopted the pinned maps {:.0} ms after the kill",
            ms(adopted)
        ),
        format!(
            "connections opened before the kill, one request each after the restart: {held_failed} of {HELD} failed"
        ),
    ];
    Ok(outcome(
        "agent kill -9 + restart",
        args,
        &samples,
        at,
        notes,
    ))
}

fn broken_config(bed: &Bed, args: &Args, l4: &AgentProcess<'_>) -> Result<Outcome> {
    println!("scenario: config replaced by broken ones under traffic");
    let log_before = l4.log().len();
    let invalid_service = good_config().replace(&backend(0).ip().to_string(), "192.0.2.300");
    let (samples, at, ()) = with_traffic(bed, args, || {
        bed.write_config(&invalid_service)?;
        std::thread::sleep(Duration::from_secs(args.after / 2));
        bed.write_config("services:\n  - name: web\n    frontends: [ { address: \n")?;
        Ok(())
    })?;
    let log = l4.log();
    let rejections = log
        .get(log_before..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("ERROR"))
        .count();
    let report = Report::read(l4.pin_dir())?;
    let notes = vec![
        format!("error lines the agent logged for the two files: {rejections}"),
        format!(
            "still served afterwards: {}",
            if all_up(&report) {
                "all 3 backends"
            } else {
                "NOT all backends"
            }
        ),
    ];
    bed.write_config(&good_config())?;
    Ok(outcome(
        "config replaced by broken",
        args,
        &samples,
        at,
        notes,
    ))
}

fn hostile_corpus() -> Result<hostile::Report> {
    println!(
        "scenario: {} hostile HTTP requests against the hop",
        hostile::TOTAL
    );
    hostile::count_panics();
    let ns = Netns::with_l7_test_addresses("chaos-hostile")?;
    ns.block_on(hostile::DEADLINE, hostile::run)
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0} ms"))
}

#[expect(clippy::cast_precision_loss, reason = "a percentage of request counts")]
fn rate(s: &Stats) -> f64 {
    100.0 * s.failed as f64 / s.sent.max(1) as f64
}

fn print_table(args: &Args, outcomes: &[Outcome], hostile: Option<&hostile::Report>) {
    println!();
    println!(
        "xlb chaos: {} new L4 connections/s to the VIP, {} keep-alive connections to the L7 hop (a request each per 10 ms); {} s before each action (baseline), {} s after (L7: the first {} s)",
        args.rate,
        args.keepalive,
        args.before,
        args.after,
        L7_WINDOW.as_secs().min(args.after)
    );
    println!(
        "{:<26} {:>14} {:>14} {:>13} {:>14} {:>14} {:>9} {:>9} {:>7}",
        "scenario",
        "L4 failed/sent",
        "(baseline)",
        "last failure",
        "L7 failed/sent",
        "(baseline)",
        "L7 p99",
        "baseline",
        "ratio"
    );
    for o in outcomes {
        let ratio = report::ratio(o.l7_after.p99_ms, o.l7_before.p99_ms)
            .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x"));
        let count = |s: &Stats| format!("{}/{}", s.failed, s.sent);
        let (l4, l4_base) = (count(&o.l4_after), count(&o.l4_before));
        let (l7, l7_base) = (count(&o.l7_after), count(&o.l7_before));
        let last = opt_ms(o.l4_after.last_failure_ms);
        println!(
            "{:<26} {l4:>14} {l4_base:>14} {last:>13} {l7:>14} {l7_base:>14} {:>6.1} ms {:>6.1} ms {ratio:>7}",
            o.name, o.l7_after.p99_ms, o.l7_before.p99_ms,
        );
        println!(
            "  L4 failure rate {:.2}% (baseline {:.2}%); L4 p99 {:.1} ms (baseline {:.1} ms)",
            rate(&o.l4_after),
            rate(&o.l4_before),
            o.l4_after.p99_ms,
            o.l4_before.p99_ms
        );
        for note in &o.notes {
            println!("  {note}");
        }
    }
    if let Some(h) = hostile {
        println!();
        print!("{h}");
        println!(
            "  => sent {}, reached a backend on an unrouted host/path: {}, hop crashes: {} (panics {}), stalls: {}",
            h.sent,
            h.violations.len(),
            usize::from(h.hop_ended.is_some()),
            h.panics,
            h.stalled.len()
        );
    }
    println!();
    println!(
        "reproduce: cargo xtask bench chaos --before {} --after {} --rate {} --keepalive {}{}",
        args.before,
        args.after,
        args.rate,
        args.keepalive,
        if hostile.is_none() {
            " --no-hostile"
        } else {
            ""
        }
    );
}
