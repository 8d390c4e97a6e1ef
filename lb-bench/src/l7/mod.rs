//! `xlb-bench l7`: the L7 hop against nginx, in one run, on the same machine, with the
//! same client, the same backends and the same routes.
//!
//! ```text
//!  client ns (wrk, curl)   proxy ns                          backend ns 0, 1
//!  198.51.100.2 ─────────  203.0.113.10 :80/:443  nginx      192.0.2.11:8080  "/"
//!                          203.0.113.11 :80/:443  xlb        192.0.2.12:8080  "/api"
//! ```
//!
//! The proxy namespace is the testbed topology's load-balancer namespace with both
//! proxy addresses on its loopback (no XDP: this measures the L7 hop alone). Both proxies
//! serve host `bench.example.com` with the Prefix routes `/` -> backend 0 and `/api` ->
//! backend 1 over plain HTTP and over TLS (one certificate from a CA made by the run,
//! ECDSA P-256, HTTP/2 offered by ALPN; wrk speaks HTTP/1.1). nginx gets a configuration
//! written here (`nginx.rs`), xlb the equivalent Ingress, Service, EndpointSlice and
//! Secret manifests (`xlb.rs`). The backends are the harness's HTTP servers,
//! as in the e2e benchmark.
//!
//! Pinning (2 CPUs): wrk and both backends on the first allowed CPU, the proxy under test
//! alone on the others; nginx gets `worker_processes N` and xlb `XLB_L7_WORKERS=N` (`--l7-workers`)
//! with N = `--proxy-threads` (default 1). Both proxies run all along; only one has load
//! at a time. Per round, each scenario is measured for nginx and then xlb (the order
//! rotates every round, so each proxy takes each place in turn): wrk `--latency` with a Lua script that alternates the two routes
//! and counts every answer that is not a 200. A measurement with more than 1 % socket
//! errors or non-200 answers, or where one backend got no request, fails the run.
//!
//! `--baseline-agent PATH` adds a third proxy: another `lb-agent` build (say, main's),
//! fed the same manifests on its own address and measured in the same rounds, so that
//! two builds are compared under the same load (the machine's other work shifts the
//! figures from one run to the next far more than most changes do).
//!
//! `--floor` adds the floor proxy (`floor.rs`, run as `xlb-bench l7-floor`): the least
//! an HTTP/1.1 proxy on tokio must do for these requests, in every scenario but
//! annotations. Its CPU per request is mostly the kernel's work under the same socket
//! calls: what no proxy of this design goes below.

pub mod floor;
mod nginx;
mod wrk;
pub(crate) mod xlb;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_testbed::{
    self as testbed, AgentProcess, Netns, ServerHandle, TestCa, Topology, TopologyConfig,
};

use self::nginx::Nginx;
use self::wrk::{Outcome, Wrk};
use crate::e2e::{self, load};
use crate::report::{self, mark, ratio};

/// The host both proxies serve.
const HOST: &str = "bench.example.com";
/// The host of the annotations scenario: a regex rewrite, a canary by header, CORS and
/// an allowlist on one route (see [`nginx::Config::render`] and [`xlb::manifests`]).
const ANNOTATED_HOST: &str = "annotated.example.com";
/// The annotations scenario's allowlist: the client's network.
const ALLOWED_CLIENTS: &str = "198.51.100.0/24";
const BACKEND_PORT: u16 = 8080;
const HTTP_PORT: u16 = 80;
const HTTPS_PORT: u16 = 443;
/// The agents' admin listeners, inside the proxy namespace.
const XLB_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 19190);
const BASELINE_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 19191);
/// How long xlb has to report ready and answer 200 on every route.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Socket errors plus non-200 answers above this share fail a measurement.
const MAX_FAILURE_SHARE: f64 = 0.01;
/// The issue's target: xlb requests/s at least nginx's, p99 no worse.
const TARGET_RPS_RATIO: f64 = 1.0;
const MAX_ROUNDS: u32 = 20;

/// One Ingress path and the upstream that serves it.
#[derive(Debug, Clone)]
pub struct Route {
    /// A Kubernetes `Prefix` path.
    pub path: String,
    /// The upstream (nginx) and Service (xlb) name.
    pub upstream: String,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    secs: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// nginx worker processes and xlb runtime threads (and, pinned, the CPUs they get).
    #[arg(long, default_value_t = 1)]
    proxy_threads: usize,
    /// Measure every scenario this many times, interleaved, and report medians. Every
    /// round rotates the proxies' order, so as many rounds as proxies (two, three with
    /// `--baseline-agent`) give each proxy each place once and cancel an order effect.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Scenarios to run, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "http,https,close,body,annotations"
    )]
    scenarios: Vec<Scenario>,
    /// Do not pin: wrk, backends and proxies share every CPU.
    #[arg(long)]
    no_pin: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Another lb-agent binary to measure beside the one next to xlb-bench, in the same
    /// rounds (an A/B of two builds under the same load).
    #[arg(long)]
    baseline_agent: Option<PathBuf>,
    /// Also measure the floor proxy (`l7/floor.rs`: httparse, a backend pool, nothing
    /// else) in the same rounds, but in the annotations scenario, which it cannot serve.
    #[arg(long)]
    floor: bool,
    /// nginx listens with `deferred` (`TCP_DEFER_ACCEPT`, a connection is accepted with
    /// its first bytes), as xlb's hop does. Off by default: nginx as it comes.
    #[arg(long)]
    nginx_deferred: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    /// Keep-alive HTTP/1.1.
    Http,
    /// Keep-alive HTTP/1.1 over TLS.
    Https,
    /// `Connection: close` over plain HTTP: a new connection per request.
    Close,
    /// Keep-alive HTTP/1.1, each request with a body of [`wrk::BODY_BYTES`] (a GET with
    /// `Content-Length`: the harness's backends answer only GET, and read the body).
    Body,
    /// Keep-alive HTTP/1.1 to the annotated host: every request is rewritten, checked
    /// against the allowlist, routed by the canary header (half each way) and answered
    /// with CORS headers (an answer without them counts as a failure).
    Annotations,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Http => "http",
            Scenario::Https => "https",
            Scenario::Close => "close",
            Scenario::Body => "body",
            Scenario::Annotations => "annotations",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Scenario::Http => "HTTP keep-alive",
            Scenario::Https => "HTTPS keep-alive",
            Scenario::Close => "HTTP new conn/request",
            Scenario::Body => "HTTP 1 KiB request body",
            Scenario::Annotations => "HTTP annotations",
        }
    }

    fn url(self) -> String {
        match self {
            Scenario::Https => format!("https://{HOST}/"),
            Scenario::Http | Scenario::Close | Scenario::Body => format!("http://{HOST}/"),
            Scenario::Annotations => format!("http://{ANNOTATED_HOST}/"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Proxy {
    Nginx,
    Xlb,
    /// The `--baseline-agent` build.
    Baseline,
    /// The `--floor` proxy.
    Floor,
}

impl Proxy {
    const ALL: [Proxy; 4] = [Proxy::Nginx, Proxy::Xlb, Proxy::Baseline, Proxy::Floor];

    /// The proxies this run measures, in the first round's order.
    fn measured(args: &Args) -> Vec<Proxy> {
        let mut proxies = vec![Proxy::Nginx, Proxy::Xlb];
        if args.baseline_agent.is_some() {
            proxies.push(Proxy::Baseline);
        }
        if args.floor {
            proxies.push(Proxy::Floor);
        }
        proxies
    }

    /// Whether it serves `scenario` (the floor proxy has no annotations and takes no
    /// request bodies).
    fn serves(self, scenario: Scenario) -> bool {
        self != Proxy::Floor || !matches!(scenario, Scenario::Annotations | Scenario::Body)
    }

    fn label(self) -> &'static str {
        match self {
            Proxy::Nginx => "nginx",
            Proxy::Xlb => "xlb",
            Proxy::Baseline => "baseline",
            Proxy::Floor => "floor",
        }
    }

    /// Where it listens (on the proxy namespace's loopback).
    fn address(self) -> IpAddr {
        IpAddr::V4(match self {
            Proxy::Nginx => Topology::vip_v4(0),
            Proxy::Xlb => Topology::vip_v4(1),
            Proxy::Baseline => Topology::vip_v4(2),
            Proxy::Floor => Topology::vip_v4(3),
        })
    }
}

/// Which CPUs run what.
#[derive(Debug, Clone, serde::Serialize)]
struct Pinning {
    /// wrk and the backends.
    client: Vec<usize>,
    /// The proxy under test.
    proxy: Vec<usize>,
}

impl Pinning {
    fn list(cpus: &[usize]) -> String {
        cpus.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    round: u32,
    scenario: &'static str,
    proxy: Proxy,
    #[serde(flatten)]
    outcome: Outcome,
    /// Requests each backend answered.
    per_backend: Vec<u64>,
    /// CPUs the proxy's processes kept busy (1.0 = one CPU all the time).
    proxy_cpus_busy: f64,
    /// The proxy's CPU time per completed request, in microseconds.
    proxy_cpu_us_per_request: f64,
    /// The same split into user and kernel time (the kernel's share is mostly the TCP
    /// stack under the proxy's reads and writes, which any proxy of the same syscalls
    /// pays), from the threads' `utime` and `stime` (clock ticks, so coarser).
    proxy_user_us_per_request: f64,
    proxy_kernel_us_per_request: f64,
    problems: Vec<String>,
}

/// Namespaces, backends and files for the whole run. Fields drop in order: backends,
/// namespaces (killing what runs in them), then the files.
struct Bed {
    backends: Vec<ServerHandle>,
    topo: Topology,
    files: Files,
    /// xlb's Kubernetes objects.
    manifests: String,
}

/// The run's directory (certificates, configurations, manifests, hosts files), removed
/// on drop.
struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("xlb-bench-l7-{}", std::process::id()));
        // A leftover of a killed run with the same PID.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Files { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.path(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The hosts file that sends [`HOST`] to `proxy`.
    fn hosts(&self, proxy: Proxy) -> PathBuf {
        self.path(&format!("{}.hosts", proxy.label()))
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The running proxies.
struct Proxies<'a> {
    nginx: Nginx<'a>,
    xlb: AgentProcess<'a>,
    baseline: Option<AgentProcess<'a>>,
    /// The floor proxy's PID and log (the namespace kills it when it goes).
    floor: Option<(u32, PathBuf)>,
}

impl Proxies<'_> {
    fn agent(&self, proxy: Proxy) -> Option<&AgentProcess<'_>> {
        match proxy {
            Proxy::Nginx | Proxy::Floor => None,
            Proxy::Xlb => Some(&self.xlb),
            Proxy::Baseline => self.baseline.as_ref(),
        }
    }

    fn pids(&self, proxy: Proxy) -> Vec<u32> {
        match proxy {
            Proxy::Nginx => self.nginx.pids(),
            Proxy::Floor => self.floor.iter().map(|(pid, _)| *pid).collect(),
            _ => self
                .agent(proxy)
                .and_then(AgentProcess::pid)
                .into_iter()
                .collect(),
        }
    }

    fn log(&self, proxy: Proxy) -> String {
        match proxy {
            Proxy::Nginx => self.nginx.log(),
            Proxy::Floor => self
                .floor
                .as_ref()
                .and_then(|(_, log)| std::fs::read_to_string(log).ok())
                .unwrap_or_default(),
            _ => self.agent(proxy).map(AgentProcess::log).unwrap_or_default(),
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    validate(args)?;
    testbed::check_privileges()?;
    check_tools()?;
    e2e::catch_interrupts();
    let load_line = report::load_line();
    let pinning = pinning(args)?;
    let routes = routes();
    let bed = Bed::start(pinning.as_ref(), &routes)?;
    let proxies = start_proxies(args, &bed, pinning.as_ref(), &routes)?;
    for proxy in Proxy::measured(args) {
        check_routes(&bed, &proxies, proxy, Duration::from_secs(5))?;
    }
    print_header(args, pinning.as_ref(), &load_line);

    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for &scenario in &args.scenarios {
            let order = measurement_order(args, round);
            for proxy in order.into_iter().filter(|p| p.serves(scenario)) {
                e2e::check_interrupted()?;
                eprintln!(
                    "xlb-bench l7: round {}/{}: {} through {} ...",
                    round + 1,
                    args.rounds,
                    scenario.describe(),
                    proxy.label()
                );
                let run = measure(
                    args,
                    &bed,
                    &proxies,
                    pinning.as_ref(),
                    round,
                    scenario,
                    proxy,
                )
                .with_context(|| format!("{} through {}", scenario.describe(), proxy.label()))?;
                for p in &run.problems {
                    eprintln!("xlb-bench l7: {}: PROBLEM: {p}", proxy.label());
                }
                runs.push(run);
            }
        }
    }
    drop(proxies);
    drop(bed);

    let summary = summarize(args, &runs);
    print_report(args, &summary, &runs);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "bench": "l7",
            "host": HOST,
            "secs": args.secs,
            "wrk": { "threads": args.threads, "connections": args.connections },
            "proxy_threads": args.proxy_threads,
            "nginx_deferred": args.nginx_deferred,
            "pinning": pinning,
            "rounds": args.rounds,
            "machine": load_line,
            "target": {
                "requests_per_sec_ratio_at_least": TARGET_RPS_RATIO,
                "p99_ratio_at_most": 1.0,
            },
            "summary": summary,
            "runs": runs,
            "reproduce": reproduce(args),
        }),
    )?;
    report::fail_on_problems(runs.iter().map(|r| r.problems.len()).sum())
}

fn validate(args: &Args) -> Result<()> {
    if args.secs == 0 || args.connections == 0 || args.threads == 0 || args.proxy_threads == 0 {
        bail!("--secs, --connections, --threads and --proxy-threads must be at least 1");
    }
    if args.threads > args.connections {
        bail!("wrk needs at least as many connections as threads");
    }
    if !(1..=MAX_ROUNDS).contains(&args.rounds) {
        bail!("--rounds must be 1..={MAX_ROUNDS}");
    }
    if args.scenarios.is_empty() {
        bail!("--scenarios names none");
    }
    Ok(())
}

/// The external programs this benchmark drives; `cargo xtask bench l7` installs them.
fn check_tools() -> Result<()> {
    let mut missing = report::missing_tools(&["wrk", "curl", "taskset", "unshare", "ss"]);
    if nginx::binary().is_none() {
        missing.push("nginx");
    }
    if !missing.is_empty() {
        bail!(
            "missing {}; run the benchmark through `cargo xtask bench l7`, which installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

/// wrk and backends on the first allowed CPU, the proxy on the last `--proxy-threads`.
fn pinning(args: &Args) -> Result<Option<Pinning>> {
    if args.no_pin {
        return Ok(None);
    }
    let allowed = load::allowed_cpus()?;
    if allowed.len() <= args.proxy_threads {
        bail!(
            "pinning needs a CPU for wrk and the backends plus --proxy-threads {} for the proxy, \
             but only CPUs {allowed:?} are allowed; lower --proxy-threads or pass --no-pin",
            args.proxy_threads
        );
    }
    let split = allowed.len() - args.proxy_threads;
    Ok(Some(Pinning {
        client: allowed[..1].to_vec(),
        proxy: allowed[split..].to_vec(),
    }))
}

/// `/` -> backend 0, `/api` -> backend 1.
fn routes() -> Vec<Route> {
    let backend = |i| {
        vec![SocketAddr::new(
            IpAddr::V4(Topology::backend_v4(i)),
            BACKEND_PORT,
        )]
    };
    vec![
        Route {
            path: "/".into(),
            upstream: "web".into(),
            endpoints: backend(0),
        },
        Route {
            path: "/api".into(),
            upstream: "api".into(),
            endpoints: backend(1),
        },
    ]
}

/// The backend a request path reaches (what the routes say), by its answer's body.
fn expected_backend(path: &str) -> &'static str {
    if path == "/api" || path.starts_with("/api/") {
        "backend-1"
    } else {
        "backend-0"
    }
}

impl Bed {
    fn start(pinning: Option<&Pinning>, routes: &[Route]) -> Result<Self> {
        let files = Files::new()?;
        let topo = Topology::build(&TopologyConfig::new("l7", routes.len()))?;
        topo.wait_ready()?;
        // Room for the new-connection scenario's ephemeral ports.
        topo.client
            .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        for proxy in Proxy::ALL {
            topo.lb.ip(&[
                "addr",
                "add",
                &format!("{}/32", proxy.address()),
                "dev",
                "lo",
            ])?;
            files.write(
                &format!("{}.hosts", proxy.label()),
                &format!(
                    "127.0.0.1 localhost\n{addr} {HOST}\n{addr} {ANNOTATED_HOST}\n",
                    addr = proxy.address()
                ),
            )?;
        }
        let ca = TestCa::new("xlb-bench l7 CA")?;
        files.write("ca.pem", ca.pem())?;
        let cert = ca.issue(&[HOST])?;
        files.write("cert.pem", &cert.cert_pem)?;
        files.write("key.pem", &cert.key_pem)?;
        let manifests = xlb::manifests(HOST, routes, &cert);
        files.write("routes.lua", &wrk::script())?;
        files.write("annotations.lua", &wrk::annotations_script())?;
        files.write("body.lua", &wrk::body_script())?;
        let mut backends = Vec::new();
        for (i, ns) in topo.backends.iter().enumerate() {
            let bind = SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), BACKEND_PORT);
            backends.push(testbed::spawn_pinned_http_server(
                ns,
                bind,
                &format!("backend-{i}"),
                pinning.map(|p| p.client[0]),
            )?);
        }
        Ok(Bed {
            backends,
            topo,
            files,
            manifests,
        })
    }

    fn requests(&self) -> Vec<u64> {
        self.backends.iter().map(ServerHandle::served).collect()
    }
}

/// `taskset -c CPUS` (pinned) or nothing.
fn taskset(pinning: Option<&Pinning>) -> Vec<String> {
    pinning.map_or_else(Vec::new, |p| {
        vec!["taskset".into(), "-c".into(), Pinning::list(&p.proxy)]
    })
}

fn start_proxies<'a>(
    args: &Args,
    bed: &'a Bed,
    pinning: Option<&Pinning>,
    routes: &[Route],
) -> Result<Proxies<'a>> {
    let ns = &bed.topo.lb;
    let listen =
        |proxy: Proxy| [HTTP_PORT, HTTPS_PORT].map(|port| SocketAddr::new(proxy.address(), port));
    let nginx = Nginx::start(
        ns,
        &taskset(pinning),
        &nginx::Config {
            workers: args.proxy_threads,
            address: Proxy::Nginx.address(),
            http_port: HTTP_PORT,
            https_port: HTTPS_PORT,
            host: HOST,
            routes,
            cert: &bed.files.path("cert.pem"),
            key: &bed.files.path("key.pem"),
            prefix: &bed.files.path("nginx"),
            deferred: args.nginx_deferred,
        },
        &listen(Proxy::Nginx),
    )
    .context("starting nginx")?;

    let mut launcher = taskset(pinning);
    launcher.extend([
        "env".to_owned(),
        "NO_COLOR=1".to_owned(),
        // The hop's workers; older builds (a baseline) ran a multi-threaded runtime.
        format!("XLB_L7_WORKERS={}", args.proxy_threads),
        format!("TOKIO_WORKER_THREADS={}", args.proxy_threads),
    ]);
    let agent = |proxy: Proxy, binary: &Path, admin: SocketAddr| {
        let [http, https] = listen(proxy);
        xlb::start(
            ns,
            &launcher,
            binary,
            &format!("bench-l7-{}", proxy.label()),
            &bed.files.path("manifests"),
            &bed.manifests,
            &xlb::Listen { http, https, admin },
        )
        .with_context(|| {
            format!(
                "starting the {} agent ({})",
                proxy.label(),
                binary.display()
            )
        })
    };
    let xlb = agent(
        Proxy::Xlb,
        &lb_testbed::agent::sibling_agent_binary()?,
        XLB_ADMIN,
    )?;
    let baseline = match &args.baseline_agent {
        Some(binary) => Some(agent(Proxy::Baseline, binary, BASELINE_ADMIN)?),
        None => None,
    };
    let floor = if args.floor {
        Some(start_floor(
            ns,
            &launcher,
            bed,
            &listen(Proxy::Floor),
            routes,
        )?)
    } else {
        None
    };
    let proxies = Proxies {
        nginx,
        xlb,
        baseline,
        floor,
    };
    wait_xlb_ready(bed, &proxies, Proxy::Xlb, XLB_ADMIN)?;
    if proxies.baseline.is_some() {
        wait_xlb_ready(bed, &proxies, Proxy::Baseline, BASELINE_ADMIN)?;
    }
    Ok(proxies)
}

/// Starts the floor proxy (`xlb-bench l7-floor`) in `ns` through `launcher`, with the
/// run's certificate and routes; its readiness is the route check's.
fn start_floor(
    ns: &Netns,
    launcher: &[String],
    bed: &Bed,
    [http, https]: &[SocketAddr; 2],
    routes: &[Route],
) -> Result<(u32, PathBuf)> {
    let exe = std::env::current_exe()?.display().to_string();
    // The launcher's program runs the rest: its arguments, then ours.
    let (program, mut argv) = match launcher.split_first() {
        Some((program, rest)) => (program.clone(), [rest, &[exe]].concat()),
        None => (exe, Vec::new()),
    };
    argv.push("l7-floor".into());
    for (flag, value) in [
        ("--http", http.to_string()),
        ("--https", https.to_string()),
        ("--cert", bed.files.path("cert.pem").display().to_string()),
        ("--key", bed.files.path("key.pem").display().to_string()),
    ] {
        argv.extend([flag.into(), value]);
    }
    for route in routes {
        let endpoint = route
            .endpoints
            .first()
            .context("a route without endpoints")?;
        argv.extend(["--route".into(), format!("{}={endpoint}", route.path)]);
    }
    let log = bed.files.path("floor.log");
    let out = std::fs::File::create(&log)?;
    let arguments: Vec<&str> = argv.iter().map(String::as_str).collect();
    let pid = ns
        .spawn_with_output(&program, &arguments, Stdio::null(), Stdio::from(out))
        .context("starting the floor proxy")?;
    Ok((pid, log))
}

/// Waits for an agent's `/readyz`, then for every route to answer 200 from the right
/// backend over HTTP and HTTPS, within [`READY_TIMEOUT`] in all.
fn wait_xlb_ready(bed: &Bed, proxies: &Proxies<'_>, proxy: Proxy, admin: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let readyz = format!("http://{admin}/readyz");
    let last = loop {
        let status = curl(&bed.topo.lb, &["-o", "/dev/null"], &readyz).map(|(code, _)| code);
        match status {
            Ok(200) => break None,
            Ok(code) => {
                if Instant::now() >= deadline {
                    break Some(format!("{readyz} answers {code}"));
                }
            }
            Err(e) => {
                if Instant::now() >= deadline {
                    break Some(format!("{readyz}: {e:#}"));
                }
            }
        }
        let exited = match proxies.agent(proxy).and_then(AgentProcess::pid) {
            Some(pid) => bed.topo.lb.try_wait(pid)?,
            None => None,
        };
        if let Some(status) = exited {
            break Some(format!("the agent exited ({status})"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(last) = last {
        bail!(
            "{}'s L7 hop did not become ready within {READY_TIMEOUT:?} ({last}); agent log:\n{}",
            proxy.label(),
            proxies.log(proxy)
        );
    }
    let left = deadline.saturating_duration_since(Instant::now());
    check_routes(bed, proxies, proxy, left)
}

/// Every route, over HTTP and HTTPS, answers 200 from its backend, within `timeout`
/// (retrying: a translation may still be on its way).
fn check_routes(bed: &Bed, proxies: &Proxies<'_>, proxy: Proxy, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<(u16, &str)> = [HTTP_PORT, HTTPS_PORT]
        .into_iter()
        .flat_map(|port| wrk::PATHS.map(|path| (port, path)))
        .collect();
    while let Some(&(port, path)) = pending.first() {
        let last = match route_answer(bed, proxy, port, path) {
            Ok(()) => {
                pending.remove(0);
                continue;
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{}'s route {path} on port {port} did not answer 200 from {} in time ({:.1} s \
                 left after readiness): {last}\n{} log:\n{}",
                proxy.label(),
                expected_backend(path),
                timeout.as_secs_f64(),
                proxy.label(),
                proxies.log(proxy)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn route_answer(bed: &Bed, proxy: Proxy, port: u16, path: &str) -> Result<()> {
    let scheme = if port == HTTPS_PORT { "https" } else { "http" };
    let url = format!("{scheme}://{HOST}{path}");
    let resolve = format!("{HOST}:{port}:{}", proxy.address());
    let ca = bed.files.path("ca.pem").display().to_string();
    let (code, body) = curl(
        &bed.topo.client,
        &["--resolve", &resolve, "--cacert", &ca],
        &url,
    )?;
    let want = expected_backend(path);
    if code != 200 || body.trim() != want {
        bail!("{url} answered {code} with {body:?}, not 200 from {want}");
    }
    Ok(())
}

/// `curl URL` in `ns` (3 s at most): the status code and the body.
fn curl(ns: &Netns, extra: &[&str], url: &str) -> Result<(u16, String)> {
    let mut args = vec!["-sS", "--max-time", "3", "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = ns.exec("curl", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code
        .trim()
        .parse()
        .with_context(|| format!("curl {url}: no status code in {text:?}"))?;
    Ok((code, body.to_owned()))
}

/// CPU time of every thread of `pids`, from `/proc/PID/task/*/schedstat`.
fn cpu_time(pids: &[u32]) -> Duration {
    pids.iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .sum()
}

/// The proxies in the order `round` measures them: the first round's order rotated by
/// the round (with two proxies, flipped every round). Reversing instead would keep the
/// middle one of three in the middle every round.
fn measurement_order(args: &Args, round: u32) -> Vec<Proxy> {
    let mut order = Proxy::measured(args);
    let turn = usize::try_from(round).unwrap_or(0) % order.len().max(1);
    order.rotate_left(turn);
    order
}

/// User and kernel time of every thread of `pids` (`utime` and `stime` of
/// `/proc/PID/task/TID/stat`, in clock ticks).
fn user_kernel_time(pids: &[u32]) -> (Duration, Duration) {
    // SAFETY: sysconf reads a constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let ticks = |t: u64| Duration::from_nanos(t * 1_000_000_000 / hz);
    let (user, kernel) = pids
        .iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("stat")).ok())
        .filter_map(|stat| stat_times(&stat))
        .fold((0, 0), |(u, k), (tu, tk)| (u + tu, k + tk));
    (ticks(user), ticks(kernel))
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/.../stat` line; the command name
/// (field 2, in parentheses) may hold spaces, so fields are counted after its `)`.
fn stat_times(stat: &str) -> Option<(u64, u64)> {
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    Some((fields.next()?.parse().ok()?, fields.next()?.parse().ok()?))
}

fn measure(
    args: &Args,
    bed: &Bed,
    proxies: &Proxies<'_>,
    pinning: Option<&Pinning>,
    round: u32,
    scenario: Scenario,
    proxy: Proxy,
) -> Result<Run> {
    let url = scenario.url();
    let hosts = bed.files.hosts(proxy);
    let script = bed.files.path(match scenario {
        Scenario::Annotations => "annotations.lua",
        Scenario::Body => "body.lua",
        Scenario::Http | Scenario::Https | Scenario::Close => "routes.lua",
    });
    let client_cpus = pinning.map(|p| Pinning::list(&p.client));
    let wrk = Wrk {
        url: &url,
        hosts: &hosts,
        script: &script,
        threads: args.threads,
        connections: args.connections,
        secs: args.secs,
        close: scenario == Scenario::Close,
        cpus: client_cpus.as_deref(),
    };
    // The main process first: nginx's master, the agent.
    let pids = proxies.pids(proxy);
    anyhow::ensure!(!pids.is_empty(), "{} is not running", proxy.label());
    let (requests0, cpu0, split0, start) = (
        bed.requests(),
        cpu_time(&pids),
        user_kernel_time(&pids),
        Instant::now(),
    );
    let outcome = wrk.run(&bed.topo.client)?;
    let wall = start.elapsed().as_secs_f64().max(1e-9);
    let cpu = cpu_time(&pids).saturating_sub(cpu0).as_secs_f64();
    let split = user_kernel_time(&pids);
    let (user, kernel) = (
        split.0.saturating_sub(split0.0).as_secs_f64(),
        split.1.saturating_sub(split0.1).as_secs_f64(),
    );
    let per_backend: Vec<u64> = bed
        .requests()
        .iter()
        .zip(&requests0)
        .map(|(now, then)| now - then)
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "request counts")]
    let requests = outcome.wrk.requests.max(1) as f64;
    let per_request = 1e6 * cpu / requests;
    let mut run = Run {
        round,
        scenario: scenario.label(),
        proxy,
        outcome,
        per_backend,
        proxy_cpus_busy: cpu / wall,
        proxy_cpu_us_per_request: per_request,
        proxy_user_us_per_request: 1e6 * user / requests,
        proxy_kernel_us_per_request: 1e6 * kernel / requests,
        problems: Vec::new(),
    };
    run.problems = problems(&run);
    // A crashed agent, or an nginx worker that died and was replaced.
    let mut after = proxies.pids(proxy);
    let mut before = pids.clone();
    after.sort_unstable();
    before.sort_unstable();
    let exited = bed.topo.lb.try_wait(pids[0])?;
    if after != before || exited.is_some() {
        run.problems.push(format!(
            "{}'s processes changed during the run ({before:?} before, {after:?} after, \
             main process {}); log:\n{}",
            proxy.label(),
            exited.map_or_else(|| "running".to_owned(), |s| format!("exited: {s}")),
            proxies.log(proxy)
        ));
    }
    Ok(run)
}

/// What makes a measurement untrustworthy.
fn problems(run: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    let o = &run.outcome;
    if o.wrk.requests == 0 {
        problems.push(format!("{}: wrk completed no request", run.scenario));
    }
    let share = o.failure_share();
    if share > MAX_FAILURE_SHARE {
        problems.push(format!(
            "{}: FAILED: {:.2} % of {} requests were errors or not 200 ({} not 200; {})",
            run.scenario,
            100.0 * share,
            o.wrk.requests,
            o.not_200,
            if o.wrk.error_detail.is_empty() {
                "no socket errors"
            } else {
                &o.wrk.error_detail
            }
        ));
    }
    if run.per_backend.contains(&0) {
        problems.push(format!(
            "{}: a backend got no request ({:?}); both routes must carry traffic",
            run.scenario, run.per_backend
        ));
    }
    problems
}

/// Medians over rounds of one proxy in one scenario.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Figures {
    requests_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    proxy_cpus_busy: f64,
    proxy_cpu_us_per_request: f64,
    proxy_user_us_per_request: f64,
    proxy_kernel_us_per_request: f64,
}

/// One scenario: both proxies and the ratios.
#[derive(Debug, Clone, serde::Serialize)]
struct Comparison {
    scenario: &'static str,
    nginx: Figures,
    xlb: Figures,
    /// xlb / nginx.
    requests_per_sec_ratio: Option<f64>,
    p99_ratio: Option<f64>,
    /// Proxy CPU per request, xlb / nginx (lower is better).
    cpu_per_request_ratio: Option<f64>,
    /// The same, round by round.
    cpu_per_request_by_round: Option<RoundRatios>,
    target_met: bool,
    /// The `--baseline-agent` build, and xlb over it.
    #[serde(skip_serializing_if = "Option::is_none")]
    baseline: Option<AgainstBaseline>,
    /// The `--floor` proxy, and xlb over it.
    #[serde(skip_serializing_if = "Option::is_none")]
    floor: Option<AgainstBaseline>,
}

/// xlb against the `--baseline-agent` build in the same run.
#[derive(Debug, Clone, serde::Serialize)]
struct AgainstBaseline {
    figures: Figures,
    /// xlb / baseline.
    requests_per_sec_ratio: Option<f64>,
    p99_ratio: Option<f64>,
    cpu_per_request_ratio: Option<f64>,
    /// The same, round by round.
    cpu_per_request_by_round: Option<RoundRatios>,
}

/// xlb's CPU per request over another proxy's, taken in each round (the two measured
/// within a minute of each other) and then summarised: the spread shows how far one
/// run's ratio of medians can be trusted, which on a shared machine is often less
/// than a change is worth.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct RoundRatios {
    median: f64,
    min: f64,
    max: f64,
}

impl RoundRatios {
    fn of(runs: &[Run], scenario: &str, other: Proxy) -> Option<RoundRatios> {
        let cpu = |proxy: Proxy, round: u32| {
            runs.iter()
                .find(|r| r.scenario == scenario && r.proxy == proxy && r.round == round)
                .map(|r| r.proxy_cpu_us_per_request)
        };
        let ratios: Vec<f64> = runs
            .iter()
            .filter(|r| r.scenario == scenario && r.proxy == Proxy::Xlb)
            .filter_map(|x| ratio(x.proxy_cpu_us_per_request, cpu(other, x.round)?))
            .collect();
        let min = ratios.iter().copied().reduce(f64::min)?;
        let max = ratios.iter().copied().reduce(f64::max)?;
        Some(RoundRatios {
            median: report::median(ratios),
            min,
            max,
        })
    }
}

/// `median (min-max)` of [`RoundRatios`], or `-`.
fn by_round(r: Option<RoundRatios>) -> String {
    r.map_or_else(
        || "-".to_owned(),
        |r| format!("{:.3} ({:.3}-{:.3})", r.median, r.min, r.max),
    )
}

fn summarize(args: &Args, runs: &[Run]) -> Vec<Comparison> {
    args.scenarios
        .iter()
        .map(|scenario| {
            let figures = |proxy: Proxy| {
                let mine: Vec<&Run> = runs
                    .iter()
                    .filter(|r| r.scenario == scenario.label() && r.proxy == proxy)
                    .collect();
                let pick = |f: fn(&Run) -> f64| report::median(mine.iter().map(|r| f(r)).collect());
                Figures {
                    requests_per_sec: pick(|r| r.outcome.wrk.requests_per_sec),
                    p50_ms: pick(|r| r.outcome.wrk.p50_ms),
                    p99_ms: pick(|r| r.outcome.wrk.p99_ms),
                    proxy_cpus_busy: pick(|r| r.proxy_cpus_busy),
                    proxy_cpu_us_per_request: pick(|r| r.proxy_cpu_us_per_request),
                    proxy_user_us_per_request: pick(|r| r.proxy_user_us_per_request),
                    proxy_kernel_us_per_request: pick(|r| r.proxy_kernel_us_per_request),
                }
            };
            let (nginx, xlb) = (figures(Proxy::Nginx), figures(Proxy::Xlb));
            let requests_per_sec_ratio = ratio(xlb.requests_per_sec, nginx.requests_per_sec);
            let p99_ratio = ratio(xlb.p99_ms, nginx.p99_ms);
            let cpu_per_request_ratio =
                ratio(xlb.proxy_cpu_us_per_request, nginx.proxy_cpu_us_per_request);
            let by_round = |other: Proxy| RoundRatios::of(runs, scenario.label(), other);
            let target_met = requests_per_sec_ratio.is_some_and(|r| r >= TARGET_RPS_RATIO)
                && p99_ratio.is_some_and(|r| r <= 1.0);
            let against = |proxy: Proxy| {
                let figures = figures(proxy);
                AgainstBaseline {
                    requests_per_sec_ratio: ratio(xlb.requests_per_sec, figures.requests_per_sec),
                    p99_ratio: ratio(xlb.p99_ms, figures.p99_ms),
                    cpu_per_request_ratio: ratio(
                        xlb.proxy_cpu_us_per_request,
                        figures.proxy_cpu_us_per_request,
                    ),
                    cpu_per_request_by_round: by_round(proxy),
                    figures,
                }
            };
            let baseline = args
                .baseline_agent
                .is_some()
                .then(|| against(Proxy::Baseline));
            let floor =
                (args.floor && Proxy::Floor.serves(*scenario)).then(|| against(Proxy::Floor));
            Comparison {
                scenario: scenario.label(),
                nginx,
                xlb,
                requests_per_sec_ratio,
                p99_ratio,
                cpu_per_request_ratio,
                cpu_per_request_by_round: by_round(Proxy::Nginx),
                target_met,
                baseline,
                floor,
            }
        })
        .collect()
}

fn reproduce(args: &Args) -> String {
    let scenarios: Vec<&str> = args.scenarios.iter().map(|s| s.label()).collect();
    format!(
        "cargo xtask bench l7 --secs {} --connections {} --threads {} --proxy-threads {} \
         --rounds {} --scenarios {}{}{}",
        args.secs,
        args.connections,
        args.threads,
        args.proxy_threads,
        args.rounds,
        scenarios.join(","),
        if args.no_pin { " --no-pin" } else { "" },
        args.baseline_agent
            .as_ref()
            .map(|b| format!(" --baseline-agent {}", b.display()))
            .unwrap_or_default()
            + if args.floor { " --floor" } else { "" }
            + if args.nginx_deferred {
                " --nginx-deferred"
            } else {
                ""
            }
    )
}

fn print_header(args: &Args, pinning: Option<&Pinning>, load_line: &str) {
    println!(
        "xlb l7 benchmark: wrk (client ns) -> proxy ns (nginx on {}, xlb L7 hop on {}) -> \
         2 backend ns; host {HOST}: Prefix / -> backend 0, Prefix /api -> backend 1 \
         (wrk alternates / and /api/items); annotations: host {ANNOTATED_HOST}, regex \
         /app(/|$)(.*) rewritten to /$2, CORS, allowlist, canary by X-Canary (wrk \
         alternates never -> backend 0 and always -> backend 1)",
        Proxy::Nginx.address(),
        Proxy::Xlb.address()
    );
    println!("{load_line}");
    match pinning {
        Some(p) => println!(
            "pinned: wrk and both backends on CPU {}; the proxy under test on CPU {} \
             (nginx worker_processes {n}, xlb --l7-workers {n})",
            Pinning::list(&p.client),
            Pinning::list(&p.proxy),
            n = args.proxy_threads
        ),
        None => println!(
            "not pinned: everything shares every CPU (nginx worker_processes {n}, xlb \
             --l7-workers {n})",
            n = args.proxy_threads
        ),
    }
    println!(
        "{} s per measurement; wrk -t{} -c{} --latency; {} round(s), medians",
        args.secs, args.threads, args.connections, args.rounds
    );
    println!();
}

/// A ratio with `digits` decimals, or `-` when there is none.
fn cell(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn print_report(args: &Args, summary: &[Comparison], runs: &[Run]) {
    println!(
        "{:<22} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}  target (>= {TARGET_RPS_RATIO:.1}x req/s, p99 no worse)",
        "scenario",
        "nginx r/s",
        "xlb r/s",
        "ratio",
        "nginx p50",
        "xlb p50",
        "nginx p99",
        "xlb p99",
        "p99 x"
    );
    for c in summary {
        let scenario = args
            .scenarios
            .iter()
            .find(|s| s.label() == c.scenario)
            .map_or(c.scenario, |s| s.describe());
        println!(
            "{:<22} {:>10} {:>10} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7}  {}",
            scenario,
            cell(Some(c.nginx.requests_per_sec), 0),
            cell(Some(c.xlb.requests_per_sec), 0),
            cell(c.requests_per_sec_ratio, 3),
            cell(Some(c.nginx.p50_ms), 3),
            cell(Some(c.xlb.p50_ms), 3),
            cell(Some(c.nginx.p99_ms), 3),
            cell(Some(c.xlb.p99_ms), 3),
            cell(c.p99_ratio, 3),
            mark(c.target_met),
        );
    }
    println!("(latencies in ms; ratios are xlb/nginx)");
    println!();
    print_cpu(args, summary);
    print_baseline(args, summary);
    print_floor(summary);
    println!();
    println!("Each measurement (requests per backend; socket errors; non-200 answers):");
    for r in runs {
        println!(
            "  r{} {:<11} {:<8} {:>9.0} req/s  p99 {:>8.3} ms  backends {:?}  errors {}  not 200 {}",
            r.round + 1,
            r.scenario,
            r.proxy.label(),
            r.outcome.wrk.requests_per_sec,
            r.outcome.wrk.p99_ms,
            r.per_backend,
            r.outcome.socket_errors,
            r.outcome.not_200,
        );
        for p in &r.problems {
            println!("      PROBLEM: {p}");
        }
    }
    println!();
    let missed: Vec<&str> = summary
        .iter()
        .filter(|c| !c.target_met)
        .map(|c| c.scenario)
        .collect();
    if missed.is_empty() {
        println!(
            "target >= {TARGET_RPS_RATIO:.1}x nginx requests/s with p99 no worse: met in every scenario"
        );
    } else {
        println!(
            "target >= {TARGET_RPS_RATIO:.1}x nginx requests/s with p99 no worse: MISSED in {}",
            missed.join(", ")
        );
    }
    println!("reproduce: {}", reproduce(args));
}

/// xlb against the `--baseline-agent` build, when there is one.
fn print_baseline(args: &Args, summary: &[Comparison]) {
    let Some(binary) = &args.baseline_agent else {
        return;
    };
    println!();
    println!(
        "xlb against the baseline build ({}), same rounds (ratios xlb/baseline):",
        binary.display()
    );
    for c in summary {
        let Some(b) = &c.baseline else { continue };
        println!(
            "  {:<11} baseline {:>7.0} req/s p99 {:>7.3} ms {:>6.1} us/req   xlb {:>7.0} req/s \
             p99 {:>7.3} ms {:>6.1} us/req   ratios r/s {} p99 {} us/req {} (by round {})",
            c.scenario,
            b.figures.requests_per_sec,
            b.figures.p99_ms,
            b.figures.proxy_cpu_us_per_request,
            c.xlb.requests_per_sec,
            c.xlb.p99_ms,
            c.xlb.proxy_cpu_us_per_request,
            cell(b.requests_per_sec_ratio, 3),
            cell(b.p99_ratio, 3),
            cell(b.cpu_per_request_ratio, 3),
            by_round(b.cpu_per_request_by_round),
        );
    }
}

/// The floor proxy's figures, and xlb's and nginx's CPU per request over its.
fn print_floor(summary: &[Comparison]) {
    if summary.iter().all(|c| c.floor.is_none()) {
        return;
    }
    println!();
    println!(
        "The floor proxy (lb-bench/src/l7/floor.rs: httparse, a backend pool, nothing else), \
         same rounds; CPU us/req as user / kernel:"
    );
    for c in summary {
        let Some(f) = &c.floor else { continue };
        println!(
            "  {:<11} floor {:>7.0} req/s p99 {:>7.3} ms {:>6.1} us/req ({:.1} / {:.1})   \
             us/req over the floor's: nginx {} xlb {} (by round {})",
            c.scenario,
            f.figures.requests_per_sec,
            f.figures.p99_ms,
            f.figures.proxy_cpu_us_per_request,
            f.figures.proxy_user_us_per_request,
            f.figures.proxy_kernel_us_per_request,
            cell(
                ratio(
                    c.nginx.proxy_cpu_us_per_request,
                    f.figures.proxy_cpu_us_per_request
                ),
                3
            ),
            cell(f.cpu_per_request_ratio, 3),
            by_round(f.cpu_per_request_by_round),
        );
    }
}

/// What each proxy's CPU did: how busy, and the cost of a request.
fn print_cpu(args: &Args, summary: &[Comparison]) {
    println!("Proxy CPU: CPUs kept busy, and CPU microseconds per request (lower is better):");
    for c in summary {
        println!(
            "  {:<11} nginx {:.2} CPUs {:>7.1} us/req   xlb {:.2} CPUs {:>7.1} us/req   \
             xlb/nginx us/req {}   by round {}",
            c.scenario,
            c.nginx.proxy_cpus_busy,
            c.nginx.proxy_cpu_us_per_request,
            c.xlb.proxy_cpus_busy,
            c.xlb.proxy_cpu_us_per_request,
            cell(c.cpu_per_request_ratio, 3),
            by_round(c.cpu_per_request_by_round),
        );
    }
    println!("  of which user / kernel (utime / stime, us per request):");
    for c in summary {
        println!(
            "  {:<11} nginx {:>5.1} / {:>5.1}           xlb {:>5.1} / {:>5.1}           \
             xlb/nginx user {}",
            c.scenario,
            c.nginx.proxy_user_us_per_request,
            c.nginx.proxy_kernel_us_per_request,
            c.xlb.proxy_user_us_per_request,
            c.xlb.proxy_kernel_us_per_request,
            cell(
                ratio(
                    c.xlb.proxy_user_us_per_request,
                    c.nginx.proxy_user_us_per_request
                ),
                3
            ),
        );
    }
    #[expect(clippy::cast_precision_loss, reason = "a thread count")]
    let capacity = args.proxy_threads as f64;
    let unsaturated: Vec<String> = summary
        .iter()
        .flat_map(|c| [("nginx", c.scenario, &c.nginx), ("xlb", c.scenario, &c.xlb)])
        .filter(|(_, _, f)| f.proxy_cpus_busy < 0.85 * capacity)
        .map(|(proxy, scenario, f)| format!("{proxy} {scenario} {:.2}", f.proxy_cpus_busy))
        .collect();
    if !unsaturated.is_empty() {
        println!(
            "  note: proxies that kept less than 85 % of their {capacity} CPU(s) busy ({}): \
             the client side (wrk, backends, softirq, other processes) limited the rate, so \
             requests/s and latency understate the difference; CPU us/req compares them",
            unsaturated.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::parse_args;

    #[test]
    fn defaults_and_reproduce_line() {
        let args = parse_args::<Args>(&[]);
        validate(&args).unwrap();
        assert_eq!(
            args.scenarios,
            [
                Scenario::Http,
                Scenario::Https,
                Scenario::Close,
                Scenario::Body,
                Scenario::Annotations
            ]
        );
        assert_eq!(
            reproduce(&args),
            "cargo xtask bench l7 --secs 10 --connections 64 --threads 1 --proxy-threads 1 \
             --rounds 2 --scenarios http,https,close,body,annotations"
        );
        let args = parse_args::<Args>(&["--scenarios", "https", "--no-pin"]);
        assert!(reproduce(&args).ends_with("--scenarios https --no-pin"));
        assert!(validate(&parse_args::<Args>(&["--proxy-threads", "0"])).is_err());
        assert!(validate(&parse_args::<Args>(&["--rounds", "0"])).is_err());
    }

    #[test]
    fn routes_and_the_backends_they_reach() {
        let routes = routes();
        assert_eq!(routes[0].path, "/");
        assert_eq!(routes[1].path, "/api");
        assert_eq!(expected_backend(wrk::PATHS[0]), "backend-0");
        assert_eq!(expected_backend(wrk::PATHS[1]), "backend-1");
        assert_eq!(expected_backend("/apix"), "backend-0");
    }

    fn run(proxy: Proxy, rps: f64, p99: f64) -> Run {
        Run {
            round: 0,
            scenario: "http",
            proxy,
            outcome: Outcome {
                wrk: load::WrkResult {
                    requests_per_sec: rps,
                    requests: 1000,
                    p50_ms: 1.0,
                    p99_ms: p99,
                    ..Default::default()
                },
                not_200: 0,
                socket_errors: 0,
            },
            per_backend: vec![500, 500],
            proxy_cpus_busy: 1.0,
            proxy_cpu_us_per_request: 10.0,
            proxy_user_us_per_request: 4.0,
            proxy_kernel_us_per_request: 6.0,
            problems: Vec::new(),
        }
    }

    #[test]
    fn every_proxy_takes_every_place_in_turn() {
        let two = parse_args::<Args>(&["--scenarios", "http"]);
        assert_eq!(measurement_order(&two, 0), [Proxy::Nginx, Proxy::Xlb]);
        assert_eq!(measurement_order(&two, 1), [Proxy::Xlb, Proxy::Nginx]);
        assert_eq!(measurement_order(&two, 2), [Proxy::Nginx, Proxy::Xlb]);
        let three = parse_args::<Args>(&["--scenarios", "http", "--baseline-agent", "/b/lb-agent"]);
        let places: Vec<Vec<Proxy>> = (0..3).map(|r| measurement_order(&three, r)).collect();
        for proxy in [Proxy::Nginx, Proxy::Xlb, Proxy::Baseline] {
            let mut at: Vec<usize> = places
                .iter()
                .map(|order| order.iter().position(|p| *p == proxy).unwrap())
                .collect();
            at.sort_unstable();
            assert_eq!(at, [0, 1, 2], "{proxy:?}");
        }
    }

    #[test]
    fn the_floor_proxy_is_measured_in_every_scenario_it_serves() {
        let args = parse_args::<Args>(&["--scenarios", "http,annotations", "--floor"]);
        assert_eq!(
            Proxy::measured(&args),
            [Proxy::Nginx, Proxy::Xlb, Proxy::Floor]
        );
        assert!(Proxy::Floor.serves(Scenario::Http));
        assert!(!Proxy::Floor.serves(Scenario::Annotations));
        assert!(!Proxy::Floor.serves(Scenario::Body));
        assert!(Proxy::Xlb.serves(Scenario::Annotations));
        assert!(reproduce(&args).ends_with("--scenarios http,annotations --floor"));
        let mut floor = run(Proxy::Floor, 200.0, 1.0);
        floor.proxy_cpu_us_per_request = 5.0;
        let summary = summarize(
            &args,
            &[
                run(Proxy::Nginx, 100.0, 2.0),
                run(Proxy::Xlb, 100.0, 2.0),
                floor,
            ],
        );
        let http = summary[0].floor.as_ref().unwrap();
        assert!((http.cpu_per_request_ratio.unwrap() - 2.0).abs() < 1e-12);
        assert!(summary[1].floor.is_none(), "no floor in annotations");
    }

    #[test]
    fn user_and_kernel_ticks_are_read_after_the_command_name() {
        let stat = "4242 (tokio rt) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 567 0 0 20 0";
        assert_eq!(stat_times(stat), Some((1234, 567)));
        assert_eq!(stat_times("4242 (x) S 1"), None);
    }

    #[test]
    fn target_needs_both_throughput_and_p99() {
        let args = parse_args::<Args>(&["--scenarios", "http"]);
        let met = summarize(
            &args,
            &[run(Proxy::Nginx, 100.0, 2.0), run(Proxy::Xlb, 110.0, 2.0)],
        );
        assert!(met[0].target_met);
        assert!((met[0].requests_per_sec_ratio.unwrap() - 1.1).abs() < 1e-12);
        let slow = summarize(
            &args,
            &[run(Proxy::Nginx, 100.0, 2.0), run(Proxy::Xlb, 99.0, 1.0)],
        );
        assert!(!slow[0].target_met);
        let tail = summarize(
            &args,
            &[run(Proxy::Nginx, 100.0, 2.0), run(Proxy::Xlb, 120.0, 2.1)],
        );
        assert!(!tail[0].target_met);
        let missing = summarize(&args, &[run(Proxy::Nginx, 100.0, 2.0)]);
        assert!(!missing[0].target_met);
    }

    #[test]
    fn a_baseline_build_is_compared_with_xlb() {
        let args = parse_args::<Args>(&["--scenarios", "http"]);
        assert!(
            summarize(&args, &[run(Proxy::Xlb, 100.0, 2.0)])[0]
                .baseline
                .is_none()
        );
        let args = parse_args::<Args>(&["--scenarios", "http", "--baseline-agent", "/b/lb-agent"]);
        assert_eq!(
            Proxy::measured(&args),
            [Proxy::Nginx, Proxy::Xlb, Proxy::Baseline]
        );
        assert!(reproduce(&args).ends_with("--scenarios http --baseline-agent /b/lb-agent"));
        let mut slow = run(Proxy::Baseline, 80.0, 4.0);
        slow.proxy_cpu_us_per_request = 20.0;
        let summary = summarize(&args, &[run(Proxy::Xlb, 100.0, 2.0), slow]);
        let baseline = summary[0].baseline.as_ref().unwrap();
        assert!((baseline.requests_per_sec_ratio.unwrap() - 1.25).abs() < 1e-12);
        assert!((baseline.p99_ratio.unwrap() - 0.5).abs() < 1e-12);
        assert!((baseline.cpu_per_request_ratio.unwrap() - 0.5).abs() < 1e-12);
        // The target stays xlb against nginx.
        assert!(!summary[0].target_met);
    }

    /// Each round's xlb run is paired with the other proxy's of the same round.
    #[test]
    fn cpu_ratios_are_also_taken_round_by_round() {
        let args = parse_args::<Args>(&["--scenarios", "http", "--baseline-agent", "/b/lb-agent"]);
        let at = |proxy, round, cpu| {
            let mut r = run(proxy, 100.0, 2.0);
            r.round = round;
            r.proxy_cpu_us_per_request = cpu;
            r
        };
        let runs = [
            at(Proxy::Nginx, 0, 20.0),
            at(Proxy::Xlb, 0, 10.0),
            at(Proxy::Baseline, 0, 10.0),
            at(Proxy::Nginx, 1, 10.0),
            at(Proxy::Xlb, 1, 8.0),
            at(Proxy::Baseline, 1, 10.0),
            at(Proxy::Nginx, 2, 12.0),
            at(Proxy::Xlb, 2, 12.0),
            at(Proxy::Baseline, 2, 16.0),
        ];
        let summary = summarize(&args, &runs);
        let nginx = summary[0].cpu_per_request_by_round.unwrap();
        assert_eq!((nginx.median, nginx.min, nginx.max), (0.8, 0.5, 1.0));
        let baseline = summary[0].baseline.as_ref().unwrap();
        let rounds = baseline.cpu_per_request_by_round.unwrap();
        assert_eq!((rounds.median, rounds.min, rounds.max), (0.8, 0.75, 1.0));
        // The ratio of the medians (10 / 10) can differ from the rounds' median.
        assert!((baseline.cpu_per_request_ratio.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(super::by_round(Some(rounds)), "0.800 (0.750-1.000)");
        assert_eq!(super::by_round(None), "-");
    }

    #[test]
    fn failures_above_one_percent_and_idle_backends_are_problems() {
        let mut r = run(Proxy::Xlb, 100.0, 1.0);
        assert!(problems(&r).is_empty());
        r.outcome.not_200 = 10;
        assert!(problems(&r).is_empty(), "1 % is tolerated");
        r.outcome.not_200 = 11;
        assert!(problems(&r)[0].contains("FAILED"), "{:?}", problems(&r));
        r.outcome.not_200 = 0;
        r.per_backend = vec![1000, 0];
        assert!(problems(&r)[0].contains("a backend got no request"));
    }
}
