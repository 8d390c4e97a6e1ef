//! `lb-agent trace` against real flows: the real agent in the load-balancer namespace
//! of the testbed topology (client -> XDP -> three HTTP backends), and HTTP requests
//! from fixed client ports whose answers name the backend that served them. For each
//! flow, `trace` is asked before the flow exists (a new flow: the Maglev slot of the
//! kernel's flow hash must name the backend the request then reaches) and after (the
//! conntrack entry must name it); the second time through the admin endpoint, from
//! the client's namespace, as `trace --nodes` does. The same agent's `/metrics` is
//! scraped (per-backend new flows, table fill, every data-plane name the Grafana
//! dashboard queries), `status --stats` read, and a POST to the admin port refused.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lb_agent::trace::Trace;
use lb_testbed::{self as testbed, AgentProcess, ServerHandle, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const BACKENDS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(15);
/// Client ports of the flows (one flow each; 10 are enough to reach every backend
/// with high probability, and the test only needs the ones it sends to agree).
const FIRST_PORT: u16 = 41_000;
const FLOWS: u16 = 12;
/// The agent's admin port (its default), reached at the LB's client-side address.
const ADMIN: u16 = 9190;

struct Bed {
    topo: Topology,
    _servers: Vec<ServerHandle>,
    config: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Topology::vip_v4(0)), 80)
}

fn admin() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Topology::lb_client_v4()), ADMIN)
}

/// `backend-<i>` -> `192.0.2.x:8080`.
fn endpoint_of_name(name: &str) -> String {
    let i: usize = name
        .strip_prefix("backend-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a backend's answer: {name:?}"));
    format!("{}:{PORT}", Topology::backend_v4(i))
}

/// One `GET /` from the client namespace, from `sport`; returns the answer's first
/// body line (the backend's name).
fn get_from(bed: &Bed, sport: u16) -> String {
    let src = SocketAddr::new(IpAddr::V4(Topology::client_v4()), sport);
    bed.topo
        .client
        .block_on(Duration::from_secs(5), || async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(src)?;
            let mut stream = socket.connect(vip()).await?;
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
                .await?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await?;
            let text = String::from_utf8_lossy(&raw).into_owned();
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            Ok::<_, std::io::Error>(body.lines().next().unwrap_or("").trim().to_owned())
        })
        .expect("the request's deadline")
        .unwrap_or_else(|e| panic!("GET from {src} to {}: {e}", vip()))
}

/// A plain HTTP/1.0 request to the admin port from the client namespace: (status, body).
fn admin_request(bed: &Bed, method: &str, target: &str) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let addr = admin();
    let request = format!("{method} {target} HTTP/1.0\r\nHost: lb\r\nContent-Length: 0\r\n\r\n");
    let text = bed
        .topo
        .client
        .run_in(|| -> std::io::Result<String> {
            let mut stream = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.write_all(request.as_bytes())?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("into the client namespace")
        .unwrap_or_else(|e| panic!("{method} {target} on the admin port: {e}"));
    testbed::status_and_body(&text).unwrap_or_else(|| panic!("no status line: {text:?}"))
}

/// `lb-agent ARGS` from the test's own process (it reads only the pinned maps).
fn agent_cli(args: &[&str]) -> String {
    let out = testbed::run_stdout(
        Command::new(AGENT).args(args),
        &format!("lb-agent {args:?}"),
    );
    String::from_utf8(out).expect("UTF-8")
}

fn trace_cli(pins: &Path, sport: u16) -> Trace {
    let src = format!("{}:{sport}", Topology::client_v4());
    let dst = vip().to_string();
    let pins = pins.display().to_string();
    let json = agent_cli(&["trace", "tcp", &src, &dst, "--json", "--bpffs", &pins]);
    serde_json::from_str(&json).unwrap_or_else(|e| panic!("trace --json: {e}: {json}"))
}

fn step<'t>(t: &'t Trace, stage: &str) -> &'t str {
    t.steps
        .iter()
        .find(|s| s.stage == stage)
        .map_or("", |s| s.result.as_str())
}

#[test]
fn trace_names_the_backend_each_flow_reaches() {
    let topo = Topology::for_test("trace", BACKENDS);
    let servers = (0..BACKENDS)
        .flat_map(|i| testbed::spawn_backend_http_servers(&topo, i, PORT).expect("servers"))
        .collect();
    let bed = Bed {
        topo,
        _servers: servers,
        config: std::env::temp_dir().join(format!("xlb-trace-{}.yaml", std::process::id())),
    };
    let mut yaml = String::from(
        "services:\n  - name: web\n    frontends: [{ address: 203.0.113.10, port: 80, protocol: TCP }]\n    backends:\n",
    );
    for i in 0..BACKENDS {
        writeln!(
            yaml,
            "      - {{ address: {}, port: {PORT} }}",
            Topology::backend_v4(i)
        )
        .expect("write to a String");
    }
    testbed::write_atomically(&bed.config, &yaml);
    let agent = AgentProcess::start(
        &bed.topo.lb,
        Path::new(AGENT),
        &bed.config,
        "trace",
        &["--poll-ms", "100"],
    )
    .expect("start agent");
    agent
        .wait_for(SETTLE, |r| {
            r.services.iter().any(|s| {
                s.name == "web" && s.backends.iter().filter(|b| b.forwarding).count() == BACKENDS
            })
        })
        .unwrap_or_else(|e| panic!("the agent programs web: {e}\n{}", agent.log()));
    agent.until("the admin endpoint answers", SETTLE, || {
        bed.topo
            .client
            .run_in(|| std::net::TcpStream::connect_timeout(&admin(), TIMEOUT).is_ok())
            .unwrap_or(false)
    });
    let pins = agent.pin_dir().to_path_buf();
    rebuilt_table_is_installed(&pins);
    let reached = flows(&bed, &pins);
    nodes_and_a_missing_frontend(&bed, &pins);
    scrape(&bed, &reached);
    // A config change reaches the maps: the reconcile lag is observed once.
    testbed::write_atomically(
        &bed.config,
        &yaml.replacen("port: 8080 }", "port: 8080, weight: 2 }", 1),
    );
    agent.until("the change's reconcile lag is observed", SETTLE, || {
        admin_request(&bed, "GET", "/metrics")
            .1
            .contains("xlb_reconcile_lag_seconds_count 1")
    });

    // Nothing on the admin port changes state.
    for method in ["POST", "PUT", "DELETE"] {
        let (status, _) = admin_request(&bed, method, "/metrics");
        assert_eq!(status, 405, "{method}");
    }

    // status --stats: per service and backend, over an interval.
    let json = agent_cli(&[
        "status",
        "--stats",
        "--interval",
        "0.2",
        "--json",
        "--bpffs",
        &pins.display().to_string(),
    ]);
    let rates: serde_json::Value = serde_json::from_str(&json).expect("rates");
    println!(
        "{}",
        agent_cli(&[
            "status",
            "--stats",
            "--interval",
            "0.2",
            "--bpffs",
            &pins.display().to_string()
        ])
    );
    let web = &rates["services"][0];
    assert_eq!(web["name"], "web", "{json}");
    assert!(
        web["conns"].as_u64().unwrap_or(0) >= u64::from(FLOWS),
        "{json}"
    );
    assert_eq!(
        web["backends"].as_array().map(Vec::len),
        Some(BACKENDS),
        "{json}"
    );
}

/// Where the agent cannot open the table by id (no CAP_SYS_ADMIN), trace rebuilds it
/// from BACKEND_META: that must be the installed table, slot for slot.
fn rebuilt_table_is_installed(pins: &Path) {
    let dp = lb_agent::dataplane::Dataplane::open_pinned(pins).expect("open pins");
    let (sid, meta) = dp
        .services_in_use()
        .expect("services")
        .into_iter()
        .next()
        .expect("web");
    let live = dp.maglev_table(sid).expect("table").expect("installed");
    let rebuilt = lb_agent::trace::rebuilt_table(&dp, sid, &meta).expect("read");
    assert_eq!(
        rebuilt.as_ref(),
        Some(&live),
        "the rebuilt table is the installed one"
    );
}

/// Each flow: trace before (Maglev), the request, /trace after (conntrack). Returns the
/// backends the flows reached.
fn flows(bed: &Bed, pins: &Path) -> BTreeSet<String> {
    let mut reached = BTreeSet::new();
    for sport in FIRST_PORT..FIRST_PORT + FLOWS {
        // Before the flow exists: Maglev decides, as the kernel will.
        let before = trace_cli(pins, sport);
        assert_eq!(before.verdict, "forward", "{before}");
        assert!(
            step(&before, "conntrack").starts_with("no entry"),
            "a new flow: {before}"
        );
        assert!(step(&before, "maglev").contains("slot"), "{before}");
        let predicted = before.backend.clone().expect("a backend");

        let answered = endpoint_of_name(&get_from(bed, sport));
        assert_eq!(
            predicted, answered,
            "client port {sport}: trace said {predicted}, the request reached {answered}\n{before}"
        );
        reached.insert(answered.clone());
        if sport == FIRST_PORT {
            println!("before the flow:\n{before}");
        }

        // After: conntrack holds the flow; asked through the admin endpoint.
        let target = format!(
            "/trace?proto=tcp&src={}:{sport}&dst={}",
            Topology::client_v4(),
            vip()
        );
        let (status, body) = admin_request(bed, "GET", &target);
        assert_eq!(status, 200, "{body}");
        let after: Trace = serde_json::from_str(&body).expect("a trace");
        assert_eq!(after.backend.as_deref(), Some(answered.as_str()), "{after}");
        assert!(
            step(&after, "conntrack").starts_with("established flow"),
            "{after}"
        );
        assert!(step(&after, "translation").contains(&answered), "{after}");
        if sport == FIRST_PORT {
            println!("after the flow (GET /trace):\n{after}");
        }
    }
    assert!(reached.len() >= 2, "the flows spread: {reached:?}");

    reached
}

fn nodes_and_a_missing_frontend(bed: &Bed, pins: &Path) {
    // `trace --nodes`: every listed node's admin endpoint answers for itself.
    let node = format!("http://{}", admin());
    let src = format!("{}:{FIRST_PORT}", Topology::client_v4());
    let dst = vip().to_string();
    let out = bed
        .topo
        .client
        .exec(
            AGENT,
            &["trace", "tcp", &src, &dst, "--json", "--nodes", &node],
        )
        .expect("trace --nodes");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let per_node: Vec<Trace> = serde_json::from_slice(&out.stdout).expect("traces");
    assert_eq!(per_node.len(), 1);
    assert_eq!(per_node[0].node.as_deref(), Some(node.as_str()));
    assert_eq!(per_node[0].verdict, "forward", "{}", per_node[0]);

    // No frontend: the trace says why.
    let miss = agent_cli(&[
        "trace",
        "tcp",
        &src,
        "203.0.113.10:81",
        "--bpffs",
        &pins.display().to_string(),
    ]);
    assert!(miss.contains("no frontend on port 81"), "{miss}");
    println!("{miss}");
}

/// The real /metrics scrape: the data plane's series, from the maps at scrape time.
fn scrape(bed: &Bed, reached: &BTreeSet<String>) {
    // /metrics: the data plane's series, from the maps at scrape time.
    let (status, metrics) = admin_request(bed, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("xlb_dataplane_metrics_up 1"), "{metrics}");
    println!("/metrics:\n{metrics}");
    let flows_of = |backend: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("xlb_backend_new_flows_total{")
                    && l.contains(&format!("backend=\"{backend}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let total: u64 = reached.iter().map(|b| flows_of(b)).sum();
    assert!(
        total >= u64::from(FLOWS),
        "per-backend new flows {total}: {metrics}"
    );
    let conntrack = metrics
        .lines()
        .find(|l| l.starts_with("xlb_table_entries{table=\"conntrack\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .expect("conntrack fill");
    assert!(conntrack >= u64::from(FLOWS), "{conntrack}");
    assert!(
        metrics.contains("xlb_xdp_packets_total{reason=\"fwd_"),
        "{metrics}"
    );
    assert!(
        metrics.contains("xlb_reconcile_lag_seconds_count"),
        "{metrics}"
    );
    // Every data-plane name the dashboard queries is in this real scrape.
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/xlb-dashboard.json"),
    )
    .expect("dashboard");
    for name in dashboard_names(&dashboard) {
        if name.starts_with("xlb_l7_") {
            continue; // the L7 hop's, not running here (see tests/dashboard.rs)
        }
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the dashboard queries {name}, not in the scrape:\n{metrics}"
        );
    }
}

/// `xlb_` names in the dashboard's expressions.
fn dashboard_names(json: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = json;
    while let Some(at) = rest.find("xlb_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // Not the dashboard's uid and tags ("xlb-overview", "xlb").
        if name.len() > 4 {
            names.insert(name.to_owned());
        }
        rest = &tail[end..];
    }
    names
}
