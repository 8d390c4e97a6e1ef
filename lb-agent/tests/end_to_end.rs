//! The agent end to end: the real `lb-agent run` in the load-balancer namespace of a
//! namespace topology (client -> XDP on veths -> backends), configured by a YAML file
//! the test edits, with real HTTP, TCP and UDP sockets. Every request loop is bounded
//! in count and time; namespaces, the agent process and its pins are removed on drop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_agent::status::Report;
use lb_testbed::{self as testbed, AgentProcess, HttpConnection, ServerHandle, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agent may take to reflect a config or health change.
const SETTLE: Duration = Duration::from_secs(15);

/// A topology with HTTP servers on every backend (IPv4 and IPv6, port 8080).
struct Bed {
    topo: Topology,
    /// Behind a lock so servers can stop and start while an agent borrows the bed.
    servers: std::sync::Mutex<BTreeMap<usize, Vec<ServerHandle>>>,
    config: PathBuf,
}

impl Bed {
    fn new(tag: &str, backends: usize) -> Bed {
        let topo = Topology::for_test(tag, backends);
        let bed = Bed {
            topo,
            servers: std::sync::Mutex::default(),
            config: std::env::temp_dir().join(format!("xlb-{tag}-{}.yaml", std::process::id())),
        };
        for i in 0..backends {
            bed.start_server(i);
        }
        bed
    }

    fn start_server(&self, i: usize) {
        let handles = testbed::spawn_backend_http_servers(&self.topo, i, PORT).expect("servers");
        self.servers.lock().expect("servers").insert(i, handles);
    }

    fn stop_server(&self, i: usize) {
        let stopped = self.servers.lock().expect("servers").remove(&i);
        drop(stopped);
    }

    fn write_config(&self, yaml: &str) {
        testbed::write_atomically(&self.config, yaml);
    }

    fn agent(&self, tag: &str) -> AgentProcess<'_> {
        AgentProcess::start(
            &self.topo.lb,
            Path::new(AGENT),
            &self.config,
            tag,
            &["--poll-ms", "100"],
        )
        .expect("start agent")
    }

    fn get(&self, vip: SocketAddr) -> String {
        testbed::http_get(&self.topo.client, vip, TIMEOUT).expect("request through the VIP")
    }

    /// `n` requests on new connections; answers per backend.
    fn spread(&self, vip: SocketAddr, n: u32) -> BTreeMap<String, u32> {
        let mut seen = BTreeMap::new();
        for _ in 0..n {
            *seen.entry(self.get(vip)).or_default() += 1;
        }
        seen
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

fn vip4() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Topology::vip_v4(0)), 80)
}

fn backend(i: usize) -> String {
    format!("{}", Topology::backend_v4(i))
}

/// A one-service config: `web` on 203.0.113.10:80 over the given (backend, weight).
fn web(backends: &[(usize, u32)], extra: &str) -> String {
    let mut yaml = String::from(
        "services:\n  - name: web\n    frontends: [{ address: 203.0.113.10, port: 80, protocol: TCP }]\n    backends:\n",
    );
    for (i, weight) in backends {
        writeln!(
            yaml,
            "      - {{ address: {}, port: {PORT}, weight: {weight} }}",
            backend(*i)
        )
        .expect("write to a String");
    }
    yaml.push_str(extra);
    yaml
}

fn service<'r>(report: &'r Report, name: &str) -> Option<&'r lb_agent::status::ServiceStatus> {
    report.services.iter().find(|s| s.name == name)
}

/// True when `web` has exactly these backends forwarding.
fn web_has(report: &Report, forwarding: &[usize]) -> bool {
    let Some(web) = service(report, "web") else {
        return false;
    };
    let mut got: Vec<String> = web
        .backends
        .iter()
        .filter(|b| b.forwarding && b.share > 0.0)
        .map(|b| b.endpoint.clone())
        .collect();
    got.sort();
    let mut want: Vec<String> = forwarding
        .iter()
        .map(|i| format!("{}:{PORT}", backend(*i)))
        .collect();
    want.sort();
    !web.frontends.is_empty() && got == want
}

#[test]
fn demo_serves_both_vips_from_the_example_config() {
    let requests = 120;
    let report = testbed::demo::run(Path::new(AGENT), requests).expect("demo");
    assert_eq!(report.failures, 0, "{report}");
    assert_eq!(report.answers.len(), 2, "IPv4 and IPv6 VIPs: {report}");
    for (vip, per_backend) in &report.answers {
        assert_eq!(
            per_backend.values().sum::<u64>(),
            u64::from(requests),
            "{vip}: {report}"
        );
        assert_eq!(
            per_backend.len(),
            3,
            "{vip} reaches all three backends: {report}"
        );
    }
    assert!(
        report
            .status
            .reasons
            .iter()
            .any(|(r, n)| r.starts_with("fwd_") && *n > 0),
        "XDP forwarded: {report}"
    );
}

#[test]
fn weights_set_each_backends_share_of_new_connections() {
    let bed = Bed::new("weights", 3);
    bed.write_config(&web(&[(0, 1), (1, 2), (2, 3)], ""));
    let agent = bed.agent("weights");
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 1, 2]))
        .expect("agent ready");
    // 600 connections; shares 1/6, 2/6, 3/6. Tolerance 0.08 absolute is over 4
    // standard deviations of the binomial count for every backend.
    let n = 600;
    let seen = bed.spread(vip4(), n);
    for (i, weight) in [(0, 1.0), (1, 2.0), (2, 3.0)] {
        let got = f64::from(*seen.get(&format!("backend-{i}")).unwrap_or(&0)) / f64::from(n);
        let want = weight / 6.0;
        assert!(
            (got - want).abs() < 0.08,
            "backend-{i}: share {got:.3}, weight share {want:.3}; all: {seen:?}"
        );
    }
}

#[test]
fn udp_and_ipv6_services_spread_over_their_backends() {
    let bed = Bed::new("udp6", 2);
    let udp: Vec<ServerHandle> = (0..2)
        .map(|i| {
            testbed::spawn_udp_name_server(
                &bed.topo.backends[i],
                SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), 5353),
                &format!("backend-{i}"),
            )
            .expect("udp server")
        })
        .collect();
    let v6 = |i: usize| Topology::backend_v6(i);
    bed.write_config(&format!(
        "services:
  - name: dns
    frontends: [{{ address: 203.0.113.10, port: 53, protocol: UDP }}]
    backends: [{{ address: {}, port: 5353 }}, {{ address: {}, port: 5353 }}]
  - name: web6
    frontends: [{{ address: '2001:db8:f::10', port: 80, protocol: TCP }}]
    backends: [{{ address: '{}', port: {PORT} }}, {{ address: '{}', port: {PORT} }}]
",
        backend(0),
        backend(1),
        v6(0),
        v6(1)
    ));
    let agent = bed.agent("udp6");
    agent
        .wait_for(SETTLE, |r| {
            r.services.len() == 2 && r.services.iter().all(|s| !s.frontends.is_empty())
        })
        .expect("agent ready");
    let mut udp_seen = BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        let name = testbed::udp_ask(
            &bed.topo.client,
            None,
            SocketAddr::new(IpAddr::V4(Topology::vip_v4(0)), 53),
            TIMEOUT,
        )
        .expect("UDP through the VIP");
        *udp_seen.entry(name).or_default() += 1;
    }
    assert_eq!(udp_seen.len(), 2, "UDP reaches both backends: {udp_seen:?}");
    let vip6 = SocketAddr::new(IpAddr::V6(Topology::vip_v6(0)), 80);
    let seen6 = bed.spread(vip6, 100);
    assert_eq!(seen6.len(), 2, "IPv6 reaches both backends: {seen6:?}");
    drop(udp);
}

#[test]
fn a_long_connection_survives_backend_changes_and_an_agent_kill() {
    let bed = Bed::new("survive", 4);
    bed.write_config(&web(&[(0, 1), (1, 1), (2, 1)], ""));
    let mut agent = bed.agent("survive");
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 1, 2]))
        .expect("agent ready");
    let mut conn =
        HttpConnection::open(&bed.topo.client, vip4(), TIMEOUT).expect("long-lived connection");
    let first = conn.get(TIMEOUT).expect("first request");
    let mine: usize = first
        .strip_prefix("backend-")
        .and_then(|n| n.parse().ok())
        .expect("backend name");
    let other = (0..3).find(|i| *i != mine).expect("another backend");

    // (a) a backend is added.
    bed.write_config(&web(&[(0, 1), (1, 1), (2, 1), (3, 1)], ""));
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 1, 2, 3]))
        .expect("backend added");
    assert_eq!(conn.get(TIMEOUT).expect("after adding a backend"), first);

    // (b) a different backend is removed.
    let remaining: Vec<(usize, u32)> = (0..4).filter(|i| *i != other).map(|i| (i, 1)).collect();
    bed.write_config(&web(&remaining, ""));
    let ids: Vec<usize> = remaining.iter().map(|(i, _)| *i).collect();
    agent
        .wait_for(SETTLE, |r| web_has(r, &ids))
        .expect("backend removed");
    assert_eq!(
        conn.get(TIMEOUT).expect("after removing another backend"),
        first
    );

    // (c) kill -9 and restart, with new connections running across it.
    let client = &bed.topo.client;
    let failures = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut failures = Vec::new();
            for _ in 0..150 {
                if let Err(e) = testbed::http_get(client, vip4(), TIMEOUT) {
                    failures.push(format!("{e:#}"));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            failures
        });
        std::thread::sleep(Duration::from_millis(300));
        agent.kill9().expect("kill -9");
        // The program stays attached: status still reads the pins with no agent.
        let status = Report::read(agent.pin_dir()).expect("status without an agent");
        assert!(web_has(&status, &ids), "{status}");
        std::thread::sleep(Duration::from_millis(300));
        agent.restart().expect("restart");
        load.join().expect("load thread")
    });
    assert!(
        failures.is_empty(),
        "requests failed across the restart: {failures:?}\n{}",
        agent.log()
    );
    agent
        .wait_for(SETTLE, |r| web_has(r, &ids))
        .expect("restarted agent");
    // The pins answer status at once; the restarted agent logs the adoption once the
    // verifier has accepted its programs.
    agent.until("the restarted agent adopted the pins", SETTLE, || {
        agent.log().contains("adopted pinned maps")
    });
    assert_eq!(conn.get(TIMEOUT).expect("after kill -9 and restart"), first);
    bed.stop_server(3);
}

#[test]
fn health_checks_take_a_stopped_backend_out_and_bring_it_back() {
    let bed = Bed::new("health", 3);
    let check = "    health: { tcp: { interval: 200ms, timeout: 100ms, rise: 1, fall: 2 } }\n";
    bed.write_config(&web(&[(0, 1), (1, 1), (2, 1)], check));
    let agent = bed.agent("health");
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 1, 2]))
        .expect("agent ready");

    bed.stop_server(1);
    // The status reads maps the agent is writing: wait for the whole change.
    let b1_down = |r: &Report| {
        service(r, "web").is_some_and(|s| {
            s.backends
                .iter()
                .any(|b| b.endpoint.starts_with(&backend(1)) && b.health == "down" && !b.forwarding)
        })
    };
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 2]) && b1_down(r))
        .expect("backend-1 taken out: health down, out of the table and the backend array");
    let seen = bed.spread(vip4(), 60);
    assert!(
        !seen.contains_key("backend-1"),
        "no new flow to the stopped backend: {seen:?}"
    );
    assert_eq!(seen.values().sum::<u32>(), 60);

    bed.start_server(1);
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 1, 2]))
        .expect("backend-1 back");
    let seen = bed.spread(vip4(), 60);
    assert!(
        seen.contains_key("backend-1"),
        "recovered backend serves again: {seen:?}"
    );

    // All down: the service says so and new connections are dropped (counted).
    for i in 0..3 {
        bed.stop_server(i);
    }
    let status = agent
        .wait_for(SETTLE, |r| service(r, "web").is_some_and(|s| s.no_backends))
        .expect("no backends");
    assert!(status.to_string().contains("NO BACKENDS"), "{status}");
    assert!(testbed::http_get(&bed.topo.client, vip4(), Duration::from_millis(500)).is_err());
    let status = Report::read(agent.pin_dir()).expect("status");
    assert!(
        status
            .reasons
            .iter()
            .any(|(r, n)| r == "drop_no_backend" && *n > 0),
        "{status}"
    );
}

#[test]
fn a_bad_config_edit_is_rejected_and_traffic_keeps_flowing() {
    let bed = Bed::new("badcfg", 2);
    let good = web(&[(0, 1), (1, 1)], "");
    bed.write_config(&good);
    let agent = bed.agent("badcfg");
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0, 1]))
        .expect("agent ready");

    // One bad field in `web` (and a new valid service beside it): web keeps its
    // previous version, the other service is added.
    let bad = format!(
        "{}\n  - name: other\n    frontends: [{{ address: 203.0.113.11, port: 80 }}]\n    backends: [{{ address: {}, port: {PORT} }}]\n",
        web(&[(0, 1), (1, 1)], "    weigth: 3\n").trim_end(),
        backend(0)
    );
    bed.write_config(&bad);
    agent
        .wait_for(SETTLE, |r| service(r, "other").is_some())
        .expect("the valid service is added");
    let log = agent.log();
    assert!(
        log.contains("web") && log.contains("weigth"),
        "error names service and field:\n{log}"
    );
    let status = Report::read(agent.pin_dir()).expect("status");
    assert!(web_has(&status, &[0, 1]), "web unchanged: {status}");
    assert_eq!(bed.spread(vip4(), 20).values().sum::<u32>(), 20);

    // A file that is not YAML at all changes nothing.
    bed.write_config("services: [ { name: web,\n");
    std::thread::sleep(Duration::from_millis(500));
    let status = Report::read(agent.pin_dir()).expect("status");
    assert!(
        web_has(&status, &[0, 1]) && service(&status, "other").is_some(),
        "{status}"
    );
    assert_eq!(bed.spread(vip4(), 20).values().sum::<u32>(), 20);
}

#[test]
fn detach_removes_the_program_and_the_pins() {
    let bed = Bed::new("detach", 1);
    bed.write_config(&web(&[(0, 1)], ""));
    let mut agent = bed.agent("detach");
    agent
        .wait_for(SETTLE, |r| web_has(r, &[0]))
        .expect("agent ready");
    assert!(
        bed.topo
            .lb
            .ip(&["link", "show", "xc"])
            .expect("ip")
            .contains("xdp")
    );
    agent.kill9().expect("stop");
    let _ = lb_testbed::run_stdout(
        std::process::Command::new(AGENT)
            .args(["detach", "--bpffs"])
            .arg(agent.pin_dir()),
        "lb-agent detach",
    );
    assert!(!agent.pin_dir().exists(), "pins removed");
    let link = bed.topo.lb.ip(&["link", "show", "xc"]).expect("ip");
    assert!(!link.contains("xdp"), "XDP detached: {link}");
}

/// `whenEmpty: reject` and `sourceRanges` through the real agent and real sockets.
const REJECT_AND_RANGES: &str = "services:
  - name: empty-tcp
    frontends: [{ address: 203.0.113.10, port: 80 }]
    backends: []
    whenEmpty: reject
  - name: empty-tcp6
    frontends: [{ address: '2001:db8:f::10', port: 80 }]
    backends: []
    whenEmpty: reject
  - name: empty-udp
    frontends: [{ address: 203.0.113.10, port: 53, protocol: UDP }]
    backends: []
    whenEmpty: reject
  - name: empty-udp6
    frontends: [{ address: '2001:db8:f::10', port: 53, protocol: UDP }]
    backends: []
    whenEmpty: reject
  - name: empty-drop
    frontends: [{ address: 203.0.113.12, port: 80 }]
    backends: []
  - name: ranged
    frontends: [{ address: 203.0.113.11, port: 80 }]
    backends: [{ address: 192.0.2.11, port: 8080 }]
    sourceRanges: [RANGE]
";

fn reject_and_ranges(range: &str) -> String {
    REJECT_AND_RANGES.replace("RANGE", range)
}

#[test]
fn rejecting_services_refuse_at_once_and_source_ranges_admit_only_their_clients() {
    use testbed::Outcome;
    let bed = Bed::new("reject", 1);
    let client = &bed.topo.client;
    // Resets and ICMP errors leave the load balancer's `xc` by a devmap redirect, which
    // the client's veth takes without an XDP program of its own (an `XDP_TX` frame would
    // wait in the ring until other traffic flushed it).
    let inside = IpAddr::V4(Topology::client_v4());
    let outside = IpAddr::V4(Topology::client2_v4());
    bed.write_config(&reject_and_ranges(&format!("{inside}/32")));
    let agent = bed.agent("reject");
    let ranged_has = |r: &Report, range: &str| {
        r.services.len() == 6
            && r.services.iter().all(|s| !s.frontends.is_empty())
            && service(r, "ranged").is_some_and(|s| s.source_ranges == [range])
    };
    agent
        .wait_for(SETTLE, |r| ranged_has(r, &format!("{inside}/32")))
        .expect("agent ready");

    // TCP: a reset, so the connect fails with "connection refused" (a drop would only
    // time out). The bound is below TCP's first SYN retransmission (1 s): the reset
    // answers the first SYN.
    let refused_within = Duration::from_millis(900);
    let vip6 = IpAddr::V6(Topology::vip_v6(0));
    for vip in [IpAddr::V4(Topology::vip_v4(0)), vip6] {
        let outcome = testbed::tcp_connect(client, None, SocketAddr::new(vip, 80), refused_within)
            .expect("connect attempt");
        assert_eq!(outcome, Outcome::Refused, "TCP to {vip}");
    }
    // UDP: ICMP (ICMPv6) port unreachable, which a connected socket reports as
    // ECONNREFUSED.
    for vip in [IpAddr::V4(Topology::vip_v4(0)), vip6] {
        let outcome = testbed::udp_exchange(client, None, SocketAddr::new(vip, 53), refused_within)
            .expect("exchange");
        assert_eq!(outcome, Outcome::Refused, "UDP to {vip}");
    }
    // The same without `whenEmpty: reject`: dropped, the client waits.
    let dropped = SocketAddr::new(IpAddr::V4(Topology::vip_v4(2)), 80);
    let outcome = testbed::tcp_connect(client, None, dropped, Duration::from_millis(500))
        .expect("connect attempt");
    assert_eq!(outcome, Outcome::TimedOut, "drop mode");

    // Source ranges: the client inside connects and gets an answer, the other address
    // of the same client is ignored.
    let ranged = SocketAddr::new(IpAddr::V4(Topology::vip_v4(1)), 80);
    assert_eq!(bed.get(ranged), "backend-0");
    let short = Duration::from_millis(700);
    let outcome = testbed::tcp_connect(client, Some(outside), ranged, short).expect("attempt");
    assert_eq!(outcome, Outcome::TimedOut, "outside the ranges");
    let outcome = testbed::tcp_connect(client, Some(inside), ranged, TIMEOUT).expect("attempt");
    assert!(matches!(outcome, Outcome::Answered(_)), "{outcome:?}");

    let status = Report::read(agent.pin_dir()).expect("status");
    for reason in [
        "reject_tcp_reset",
        "reject_icmp_unreachable",
        "drop_source_range",
    ] {
        assert!(
            status.reasons.iter().any(|(r, n)| r == reason && *n > 0),
            "{reason} counted: {status}"
        );
    }
    let empty_tcp = service(&status, "empty-tcp").expect("empty-tcp");
    assert_eq!(empty_tcp.when_empty, "reject");
    assert!(empty_tcp.rejected >= 1, "{status}");
    assert!(service(&status, "ranged").expect("ranged").source_denied >= 1);
    let text = status.to_string();
    assert!(
        text.contains("new connections are rejected")
            && text.contains(&format!("source ranges {inside}/32")),
        "{text}"
    );

    // The ranges change under an open connection: it keeps going (only new flows are
    // checked), new connections follow the new ranges.
    let mut conn = HttpConnection::open(client, ranged, TIMEOUT).expect("connection");
    assert_eq!(conn.get(TIMEOUT).expect("before the change"), "backend-0");
    bed.write_config(&reject_and_ranges(&format!("{outside}/32")));
    agent
        .wait_for(SETTLE, |r| ranged_has(r, &format!("{outside}/32")))
        .expect("ranges changed");
    assert_eq!(conn.get(TIMEOUT).expect("after the change"), "backend-0");
    let outcome = testbed::tcp_connect(client, Some(inside), ranged, short).expect("attempt");
    assert_eq!(outcome, Outcome::TimedOut, "no longer inside");
    let outcome = testbed::tcp_connect(client, Some(outside), ranged, TIMEOUT).expect("attempt");
    assert!(matches!(outcome, Outcome::Answered(_)), "{outcome:?}");
}
