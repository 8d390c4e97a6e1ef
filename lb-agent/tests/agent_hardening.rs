//! How the agent behaves on hostile or unlucky input: a config file that takes seconds
//! to parse, an empty one, one rejected as a whole, one rewritten in place, and start-ups
//! that fail. The real `lb-agent run` in the load-balancer namespace of a topology;
//! its admin endpoint (default port 9190) is read from inside that namespace. Every
//! wait is bounded; namespaces, the agent and its pins are removed on drop.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lb_testbed::{self as testbed, AgentProcess, Netns, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
/// How long the agent may take to reach an expected state.
const SETTLE: Duration = Duration::from_secs(30);
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9190);

struct Bed {
    topo: Topology,
    config: PathBuf,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let topo = Topology::for_test(tag, 1);
        let config = std::env::temp_dir().join(format!("xlb-{tag}-{}.yaml", std::process::id()));
        Bed { topo, config }
    }

    fn agent(&self, tag: &str, extra: &[&str]) -> AgentProcess<'_> {
        let mut args = if extra.contains(&"--poll-ms") {
            vec![]
        } else {
            vec!["--poll-ms", "100"]
        };
        args.extend_from_slice(extra);
        AgentProcess::start(&self.topo.lb, Path::new(AGENT), &self.config, tag, &args)
            .expect("start agent")
    }

    /// Writes `config`, starts the agent and waits until `/readyz` says ready.
    fn ready_agent(&self, tag: &str, config: &str) -> AgentProcess<'_> {
        testbed::write_atomically(&self.config, config);
        let agent = self.agent(tag, &[]);
        until(&agent, "/readyz says ready", SETTLE, || {
            self.admin("/readyz", Duration::from_secs(5))
                .is_ok_and(|(status, _)| status == 200)
        });
        agent
    }

    /// GET `path` on the admin endpoint: (status code, body).
    fn admin(&self, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
        admin_get(&self.topo.lb, path, timeout)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

fn admin_get(ns: &Netns, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    ns.run_in(|| -> anyhow::Result<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&ADMIN, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        testbed::status_and_body(&response)
            .ok_or_else(|| anyhow::anyhow!("no status line in {response:?}"))
    })?
}

/// Polls `check` until it holds, within `timeout`; panics naming `what`, with the log.
fn until(agent: &AgentProcess<'_>, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} within {timeout:?}; agent log:\n{}", agent.log());
}

/// The value of a counter or gauge in the metrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// `n` services of one backend each, on 203.0.113.0/24.
fn services(n: usize) -> String {
    let mut yaml = String::from("services:\n");
    for i in 0..n {
        writeln!(
            yaml,
            "  - {{ name: s{i}, frontends: [{{ address: 203.0.113.{}, port: {} }}], backends: [{{ address: 192.0.2.{}, port: 8080 }}] }}",
            i % 250 + 1,
            1000 + i / 250,
            i % 250 + 1
        )
        .expect("write to a String");
    }
    yaml
}

/// A file of 350 KB that takes seconds to parse (4,000 services sharing, through a YAML
/// alias, one list of 40 backends) and is refused as a whole at its last line, after
/// the parse: the agent never gets to load anything.
fn slow_broken_config() -> String {
    let backends: Vec<String> = (1..=40)
        .map(|j| format!("{{ address: 198.51.100.{j}, port: 8080 }}"))
        .collect();
    let mut yaml = String::from("services:\n");
    for i in 0..4000 {
        let list = if i == 0 {
            format!("&backends [{}]", backends.join(", "))
        } else {
            "*backends".to_owned()
        };
        writeln!(
            yaml,
            "  - {{ name: s{i}, frontends: [{{ address: 203.0.113.{}, port: {} }}], backends: {list} }}",
            i % 250 + 1,
            1000 + i / 250
        )
        .expect("write to a String");
    }
    yaml.push_str("notAField: 1\n");
    yaml
}

#[test]
fn healthz_answers_while_a_big_config_file_is_parsed() {
    let bed = Bed::new("slowparse");
    testbed::write_atomically(&bed.config, &slow_broken_config());
    let mut agent = bed.agent("slowparse", &[]);
    // The admin endpoint is bound before the file is read; it answers during the parse,
    // that is before the agent reports the file's error and exits.
    let mut answered = None;
    until(&agent, "/healthz answered", SETTLE, || {
        answered = bed.admin("/healthz", Duration::from_mins(1)).ok();
        answered.is_some() || agent.log().contains("notAField")
    });
    assert_eq!(
        answered.as_ref().map(|(s, _)| *s),
        Some(200),
        "/healthz answered during the parse; agent log:\n{}",
        agent.log()
    );
    assert!(
        !agent.log().contains("notAField"),
        "the parse was still running when /healthz answered:\n{}",
        agent.log()
    );
    let status = agent.wait_exit(SETTLE).expect("the agent exits");
    assert!(!status.success());
    assert!(agent.log().contains("notAField"), "{}", agent.log());
}

#[test]
fn an_empty_service_list_is_ready() {
    let bed = Bed::new("emptyready");
    let _agent = bed.ready_agent("emptyready", "services: []\n");
    let (_, metrics) = bed
        .admin("/metrics", Duration::from_secs(5))
        .expect("metrics");
    assert_eq!(metric(&metrics, "xlb_services"), Some(0.0), "{metrics}");
}

#[test]
fn a_config_file_rejected_as_a_whole_is_counted() {
    let bed = Bed::new("rejectfile");
    let agent = bed.ready_agent("rejectfile", &services(1));
    let rejected = || {
        bed.admin("/metrics", Duration::from_secs(5))
            .ok()
            .and_then(|(_, m)| metric(&m, "xlb_rejected_objects_total"))
    };
    assert_eq!(rejected(), Some(0.0));
    testbed::write_atomically(&bed.config, "services: [ { name: web,\n");
    until(&agent, "the rejected file is counted", SETTLE, || {
        rejected() == Some(1.0)
    });
    // One count per rejection, not per poll.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rejected(), Some(1.0), "{}", agent.log());
}

/// True when `interface` in the load-balancer namespace runs an XDP program.
fn has_xdp(bed: &Bed, interface: &str) -> bool {
    bed.topo
        .lb
        .ip(&["link", "show", "dev", interface])
        .expect("ip link show")
        .contains("xdp")
}

#[test]
fn a_missing_interface_fails_the_start_and_leaves_nothing() {
    let bed = Bed::new("nosuchif");
    testbed::write_atomically(&bed.config, &services(1));
    let mut agent = bed.agent("nosuchif", &["--interface", "nosuch0"]);
    let status = agent.wait_exit(SETTLE).expect("the agent exits");
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("nosuch0") && log.contains("os error 19"),
        "{log}"
    );
    assert!(!has_xdp(&bed, Topology::LB_CLIENT_IF), "{log}");
    assert!(!has_xdp(&bed, Topology::LB_BACKEND_IF), "{log}");
    assert!(!agent.pin_dir().exists(), "no pins left: {log}");
}

#[test]
fn an_interface_held_by_another_program_fails_the_start_and_leaves_nothing() {
    let bed = Bed::new("heldif");
    testbed::write_atomically(&bed.config, &services(1));
    // The agent attaches xc first, then finds xb taken.
    let pass = bed
        .topo
        .lb
        .run_in(|| testbed::xdp::PassProgram::attach(Topology::LB_BACKEND_IF))
        .expect("enter the namespace")
        .expect("attach the pass program");
    let mut agent = bed.agent("heldif", &[]);
    let status = agent.wait_exit(SETTLE).expect("the agent exits");
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("interface xb")
            && (log.contains("EBUSY") || log.contains("EEXIST"))
            && log.contains("another XDP program is attached to xb"),
        "{log}"
    );
    assert!(
        !has_xdp(&bed, Topology::LB_CLIENT_IF),
        "xc detached again: {log}"
    );
    assert!(!agent.pin_dir().exists(), "no pins left: {log}");
    drop(pass);
}

#[test]
fn status_without_privileges_says_what_it_needs() {
    let bed = Bed::new("statususer");
    let agent = bed.ready_agent("statususer", &services(1));
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", AGENT])
        .args(["status", "--bpffs"])
        .arg(agent.pin_dir())
        .output()
        .expect("setpriv lb-agent status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        (stderr.contains("EPERM") || stderr.contains("EACCES")) && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
}

#[test]
fn a_config_file_rewritten_in_place_is_never_applied_half_written() {
    const POLL_MS: u64 = 1000;
    let bed = Bed::new("halfwrite");
    testbed::write_atomically(&bed.config, &services(1));
    let poll = POLL_MS.to_string();
    let agent = bed.agent("halfwrite", &["--poll-ms", &poll]);
    let services_now = || {
        bed.admin("/metrics", Duration::from_secs(5))
            .ok()
            .and_then(|(_, m)| metric(&m, "xlb_services"))
    };
    until(&agent, "the first state", SETTLE, || {
        services_now() == Some(1.0)
    });
    // Each round rewrites the file in place: first its head (itself a valid file with
    // one service fewer), the rest half a poll later. The agent polls at its own pace,
    // so in some rounds a poll falls between the two writes; it must not apply the head.
    let mut seen = Vec::new();
    for round in 0..6_u32 {
        let half = 2 * round + 2;
        let head = services(half as usize);
        let full = services(half as usize + 1);
        let mut file = std::fs::File::create(&bed.config).expect("rewrite in place");
        file.write_all(head.as_bytes()).expect("write the head");
        std::thread::sleep(Duration::from_millis(POLL_MS / 2));
        file.write_all(&full.as_bytes()[head.len()..])
            .expect("write the rest");
        drop(file);
        until(&agent, "the whole file is applied", SETTLE, || {
            let now = services_now();
            seen.push(now);
            now == Some(f64::from(half + 1))
        });
        assert!(
            !seen.contains(&Some(f64::from(half))),
            "round {round}: the head alone ({half} services) was applied: {seen:?}\n{}",
            agent.log()
        );
    }
}

/// A config file whose service source-NATs to IPv6 backends on a node with no IPv6
/// address (none on the interfaces, no `--node-address`): the agent refuses to start,
/// naming the flag, the service and the family, and leaves nothing behind; with
/// `--node-address` it serves.
#[test]
fn snat_without_a_node_address_of_the_family_fails_the_start_naming_the_flag() {
    let bed = Bed::new("nosnataddr");
    for interface in [Topology::LB_CLIENT_IF, Topology::LB_BACKEND_IF] {
        bed.topo
            .lb
            .ip(&["-6", "addr", "flush", "dev", interface, "scope", "global"])
            .expect("remove the IPv6 addresses");
    }
    testbed::write_atomically(
        &bed.config,
        "services:\n  - { name: web6, frontends: [{ address: \"2001:db8:f::10\", port: 80 }], \
         backends: [{ address: \"2001:db8:b::10\", port: 8080 }] }\n",
    );
    let mut agent = bed.agent("nosnataddr", &[]);
    let status = agent.wait_exit(SETTLE).expect("the agent exits");
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains("--node-address")
            && log.contains("service web6")
            && log.contains("no IPv6 address"),
        "{log}"
    );
    assert!(!has_xdp(&bed, Topology::LB_CLIENT_IF), "{log}");
    assert!(!agent.pin_dir().exists(), "no pins left: {log}");

    let agent = bed.agent("snataddr", &["--node-address", "2001:db8:c::1"]);
    let report = agent
        .wait_for(SETTLE, |r| !r.services.is_empty())
        .expect("with --node-address the agent serves");
    let snat = report.snat.expect("a SNAT section");
    assert_eq!(snat.address_v6.as_deref(), Some("2001:db8:c::1"));
}
