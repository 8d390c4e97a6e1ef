//! Socket load balancing end to end: the real `lb-agent run --manifests DIR --cgroup
//! CHILD` (no `--interface`: socket hooks only) in the load-balancer ("node") namespace
//! of a testbed topology, and client processes in the client ("pod") namespace that
//! join a child cgroup the test creates (never the root) before they open a socket.
//!
//! This file has its own `main` (`harness = false`): the same binary is the client
//! (`socket_lb client --cgroup DIR OP ADDR COUNT`), started through `nsenter` in a
//! namespace, so that each client is a process of its own (cgroup v2 moves processes,
//! not threads). The cgroup guard kills its processes by PID and removes the cgroup on
//! drop, also when a case panics. Every loop is bounded in count and time.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lb_agent::dataplane::sockets;
use lb_testbed::{self as testbed, AgentProcess, Netns, ServerHandle, Topology, TopologyConfig};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const TIMEOUT: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(20);
const BACKENDS: usize = 4;

/// One case, run against the shared bed.
type Case = fn(&Run<'_>);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        client_main(&args[2..]);
        return;
    }
    let filter: Vec<&String> = args[1..].iter().filter(|a| !a.starts_with('-')).collect();
    let selected =
        |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    testbed::check_privileges().expect("privileges");
    let mut failed = Vec::new();
    let mut ran = 0;
    {
        let bed = Bed::new();
        let bed = Run::start(&bed);
        let cases: [(&str, Case); 10] = [
            ("tcp_to_cluster_ip_node_port_and_lb_ip", tcp_frontends),
            ("udp_connected_unconnected_and_dns_style", udp_frontends),
            (
                "outside_the_cgroup_nothing_is_translated",
                outside_the_cgroup,
            ),
            ("session_affinity_per_pod", affinity),
            ("traffic_policies_local", local_policies),
            ("no_endpoints_refuses", no_endpoints),
            ("open_connections_keep_their_backend", backend_change),
            ("agent_kill_9_and_restart_no_failure", kill_and_restart),
            ("host_namespace_only", host_only),
            ("detach_removes_the_hooks", detach),
        ];
        for (name, case) in cases {
            if !selected(name) {
                continue;
            }
            ran += 1;
            eprintln!("test {name} ...");
            let started = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&bed)));
            if result.is_ok() {
                eprintln!("test {name} ... ok ({:.1?})", started.elapsed());
            } else {
                eprintln!("test {name} ... FAILED");
                failed.push(name);
            }
        }
    }
    // libtest's summary line on stdout, which `cargo xtask test` counts.
    println!(
        "test result: {}. {} passed; {} failed; 0 ignored; 0 measured; {} filtered out",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len(),
        10 - ran
    );
    if !failed.is_empty() {
        eprintln!("socket_lb: failed: {failed:?}");
    }
    if !failed.is_empty() {
        std::process::exit(1);
    }
}

// --- The bed: topology, backends, manifests, cgroup, agent ---------------------------

struct Bed {
    topo: Topology,
    _servers: Vec<ServerHandle>,
    _lines: Vec<LineServer>,
    dir: PathBuf,
    cgroup: CgroupGuard,
}

impl Bed {
    fn new() -> Bed {
        let topo = Topology::build(&TopologyConfig::new("sock", BACKENDS)).expect("topology");
        topo.wait_ready().expect("topology ready");
        let mut servers = Vec::new();
        let mut lines = Vec::new();
        for (i, ns) in topo.backends.iter().enumerate() {
            let name = format!("backend-{i}");
            let any: SocketAddr = "[::]:8080".parse().expect("addr");
            servers.push(testbed::spawn_tcp_name_server(ns, any, &name).expect("tcp server"));
            let dns: SocketAddr = "[::]:5353".parse().expect("addr");
            servers.push(testbed::spawn_udp_name_server(ns, dns, &name).expect("udp server"));
            lines.push(LineServer::start(ns, &name));
        }
        let dir = std::env::temp_dir().join(format!("xlb-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("manifest dir");
        Bed {
            topo,
            _servers: servers,
            _lines: lines,
            dir,
            cgroup: CgroupGuard::new(),
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bed with its agent (restarted by some cases).
struct Run<'a> {
    bed: &'a Bed,
    agent: std::sync::Mutex<Option<AgentProcess<'a>>>,
}

impl std::ops::Deref for Run<'_> {
    type Target = Bed;
    fn deref(&self) -> &Bed {
        self.bed
    }
}

impl<'a> Run<'a> {
    fn start(bed: &'a Bed) -> Run<'a> {
        let run = Run {
            bed,
            agent: std::sync::Mutex::new(None),
        };
        run.write_manifests(&[0, 1, 2]);
        run.start_agent(false);
        run
    }

    fn start_agent(&self, host_only: bool) {
        let mut slot = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drop(slot.take());
        let dir = self.dir.display().to_string();
        let cgroup = self.cgroup.path.display().to_string();
        let mut extra = vec![
            "--node-name",
            "node-a",
            "--node-address",
            "198.51.100.1",
            "--node-address",
            "2001:db8:c::1",
            "--cgroup",
            &cgroup,
            "--poll-ms",
            "100",
        ];
        if host_only {
            extra.push("--socket-lb-host-only");
        }
        let agent = AgentProcess::start_socket_lb(
            &self.bed.topo.lb,
            Path::new(AGENT),
            &["--manifests", &dir],
            "sock",
            &extra,
        )
        .expect("start agent");
        wait_ready(&agent, &[0, 1, 2]);
        *slot = Some(agent);
    }

    fn with_agent<T>(&self, f: impl FnOnce(&mut AgentProcess<'a>) -> T) -> T {
        let mut slot = self
            .agent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(slot.as_mut().expect("an agent runs"))
    }

    fn write_manifests(&self, web_backends: &[usize]) {
        testbed::write_atomically(&self.dir.join("cluster.yaml"), &manifests(web_backends));
    }

    /// Runs a client in the pod namespace, in the cgroup, and returns its lines.
    fn client(&self, op: &str, addr: &str, count: u32) -> Vec<String> {
        self.cgroup.run(&self.topo.client, op, addr, count)
    }
}

/// Waits until the agent wrote every model (web's backends as given).
fn wait_ready(agent: &AgentProcess<'_>, web: &[usize]) {
    let want: BTreeSet<String> = web
        .iter()
        .map(|&i| format!("{}:8081", Topology::backend_v4(i)))
        .collect();
    agent
        .wait_for(SETTLE, |r| {
            let line = r.services.iter().find(|s| s.name == "shop/web:line/tcp");
            r.services.len() >= 12
                && line.is_some_and(|s| {
                    s.backends
                        .iter()
                        .map(|b| b.endpoint.clone())
                        .collect::<BTreeSet<_>>()
                        == want
                })
        })
        .expect("agent ready");
}

// --- Cases ------------------------------------------------------------------------------

fn tcp_frontends(bed: &Run<'_>) {
    for (addr, service) in [
        ("203.0.113.10:80", "203.0.113.10:80"),
        ("[2001:db8:f::10]:80", "[2001:db8:f::10]:80"),
        ("198.51.100.1:30080", "198.51.100.1:30080"),
        ("[2001:db8:c::1]:30080", "[2001:db8:c::1]:30080"),
        ("203.0.113.20:80", "203.0.113.20:80"),
        ("[2001:db8:f::20]:80", "[2001:db8:f::20]:80"),
    ] {
        let lines = bed.client("tcp", addr, 24);
        let names = answers(&lines, addr);
        for line in &lines {
            assert!(
                line.ends_with(&format!("peer={service}")),
                "getpeername gives the Service address: {line}"
            );
        }
        let distinct: BTreeSet<&String> = names.iter().collect();
        assert!(
            distinct.len() >= 2,
            "{addr}: 24 connections spread over the backends, got {distinct:?}"
        );
        assert!(
            distinct
                .iter()
                .all(|n| ["backend-0", "backend-1", "backend-2"].contains(&n.as_str())),
            "{addr}: {distinct:?}"
        );
    }
}

fn udp_frontends(bed: &Run<'_>) {
    for addr in [
        "203.0.113.10:53",
        "[2001:db8:f::10]:53",
        "198.51.100.1:30053",
        "203.0.113.20:53",
    ] {
        // Unconnected (a DNS stub: sendto, recvfrom), connected (connect, send, recv),
        // and one unconnected socket asking repeatedly.
        for op in ["udp", "udp-conn", "udp-one"] {
            let lines = bed.client(op, addr, 8);
            answers(&lines, addr);
            for line in &lines {
                assert!(
                    line.contains(&format!("from={addr}")),
                    "{op} {addr}: the reply comes from the Service address: {line}"
                );
                if op == "udp-conn" {
                    assert!(line.contains(&format!("peer={addr}")), "{line}");
                }
            }
            if op == "udp-one" {
                let distinct: BTreeSet<String> = answers(&lines, addr).into_iter().collect();
                assert_eq!(
                    distinct.len(),
                    1,
                    "one unconnected socket keeps its backend: {lines:?}"
                );
            }
        }
    }
}

fn outside_the_cgroup(bed: &Run<'_>) {
    let lines = CgroupGuard::run_outside(&bed.topo.client, "tcp", "203.0.113.10:80", 1);
    assert!(
        lines.iter().all(|l| l.starts_with("err")),
        "a process outside the cgroup is not translated: {lines:?}"
    );
}

fn affinity(bed: &Run<'_>) {
    let lines = bed.client("tcp", "203.0.113.13:80", 20);
    let distinct: BTreeSet<String> = answers(&lines, "sticky").into_iter().collect();
    assert_eq!(
        distinct.len(),
        1,
        "ClientIP affinity: one backend per pod: {lines:?}"
    );
    // A second process of the same pod (network namespace) gets the same backend.
    let again: BTreeSet<String> = answers(&bed.client("tcp", "203.0.113.13:80", 5), "sticky")
        .into_iter()
        .collect();
    assert_eq!(distinct, again);
}

fn local_policies(bed: &Run<'_>) {
    // externalTrafficPolicy Local, reached from inside: every ready endpoint, not only
    // node-a's (backend-0).
    for addr in ["203.0.113.21:80", "198.51.100.1:30082"] {
        let seen: BTreeSet<String> = answers(&bed.client("tcp", addr, 40), addr)
            .into_iter()
            .collect();
        assert!(
            seen.len() >= 2 && seen.iter().any(|n| n != "backend-0"),
            "{addr}: in-cluster traffic to an ETP Local address uses all endpoints: {seen:?}"
        );
    }
    // internalTrafficPolicy Local: this node's endpoint only.
    let seen: BTreeSet<String> = answers(&bed.client("tcp", "203.0.113.12:80", 20), "itp")
        .into_iter()
        .collect();
    assert_eq!(seen, BTreeSet::from(["backend-0".to_owned()]));
}

fn no_endpoints(bed: &Run<'_>) {
    for (op, addr) in [
        ("tcp", "203.0.113.14:80"),
        ("udp", "203.0.113.14:53"),
        ("udp-conn", "203.0.113.14:53"),
    ] {
        let lines = bed.client(op, addr, 1);
        assert_eq!(
            lines,
            ["err ECONNREFUSED"],
            "{op} {addr}: a Service without endpoints refuses at once"
        );
    }
}

fn backend_change(bed: &Run<'_>) {
    // 40 connections over three backends: the chance that none lands on backend-2 is
    // (2/3)^40, about 1e-7 (with 12 it was 0.8 %, and CI met it once).
    let mut held = bed.cgroup.hold(&bed.topo.client, "203.0.113.10:81", 40);
    let before = held.ask();
    assert_eq!(before.len(), 40, "{before:?}");
    assert!(before.iter().any(|n| n == "backend-2"), "{before:?}");
    // backend-2 leaves, backend-3 joins.
    bed.write_manifests(&[0, 1, 3]);
    bed.with_agent(|agent| wait_ready(agent, &[0, 1, 3]));
    let after = held.ask();
    assert_eq!(before, after, "open connections keep their backend");
    drop(held);
    let fresh: BTreeSet<String> = bed
        .cgroup
        .hold(&bed.topo.client, "203.0.113.10:81", 30)
        .ask()
        .into_iter()
        .collect();
    assert!(
        !fresh.contains("backend-2"),
        "new connections avoid the removed one: {fresh:?}"
    );
    bed.write_manifests(&[0, 1, 2]);
    bed.with_agent(|agent| wait_ready(agent, &[0, 1, 2]));
}

fn kill_and_restart(bed: &Run<'_>) {
    // A bounded stream of new connections (300, 10 ms apart) while the agent is killed
    // and started again.
    let stream = bed
        .cgroup
        .spawn(&bed.topo.client, "tcp-paced", "203.0.113.10:80", 300);
    std::thread::sleep(Duration::from_millis(300));
    bed.with_agent(|agent| {
        agent.kill9().expect("kill -9");
        std::thread::sleep(Duration::from_millis(500));
        agent.restart().expect("restart");
        agent.until(
            "the restarted agent adopts the socket links",
            SETTLE,
            || testbed::agent::without_colours(&agent.log()).contains("adopted=8 attached=0"),
        );
    });
    let lines = stream.finish();
    assert_eq!(lines.len(), 300, "{lines:?}");
    let failures: Vec<&String> = lines.iter().filter(|l| !l.starts_with("ok")).collect();
    assert!(failures.is_empty(), "no connection failed: {failures:?}");
}

fn host_only(bed: &Run<'_>) {
    bed.start_agent(true);
    let pod = bed.client("tcp", "203.0.113.10:80", 1);
    assert!(pod[0].starts_with("err"), "pods are left alone: {pod:?}");
    let host = bed.cgroup.run(&bed.topo.lb, "tcp", "203.0.113.10:80", 5);
    answers(&host, "host namespace");
    bed.start_agent(false);
    answers(&bed.client("tcp", "203.0.113.10:80", 3), "after host-only");
}

fn detach(bed: &Run<'_>) {
    let pin_dir = bed.with_agent(|agent| {
        agent.kill9().expect("kill -9");
        agent.pin_dir().to_path_buf()
    });
    assert_eq!(sockets::pinned_links(&pin_dir).len(), 8);
    // Still translated with no agent running.
    answers(&bed.client("tcp", "203.0.113.10:80", 3), "no agent");
    let out = Command::new(AGENT)
        .args(["detach", "--bpffs"])
        .arg(&pin_dir)
        .output()
        .expect("lb-agent detach");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("socket link cgroup_connect4"), "{text}");
    assert!(!pin_dir.exists());
    let lines = bed.client("tcp", "203.0.113.10:80", 1);
    assert!(
        lines[0].starts_with("err"),
        "no hooks after detach: {lines:?}"
    );
    bed.start_agent(false);
}

/// The backend names of `ok` lines; panics on any other line.
fn answers(lines: &[String], what: &str) -> Vec<String> {
    assert!(!lines.is_empty(), "{what}: no answer");
    lines
        .iter()
        .map(|l| {
            let mut words = l.split_whitespace();
            assert_eq!(words.next(), Some("ok"), "{what}: {l}");
            words.next().unwrap_or_default().to_owned()
        })
        .collect()
}

// --- The child cgroup -------------------------------------------------------------------

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A child cgroup of the host's cgroup2 mount, `xlb-test-<pid>-<n>`. Dropping it kills
/// every process in it by PID and removes it.
struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    fn new() -> CgroupGuard {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = sockets::cgroup2_mount(&mountinfo)
            .expect("no cgroup2 mount: these tests need cgroup v2 (e.g. /sys/fs/cgroup/unified)");
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("xlb-test-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        CgroupGuard { path }
    }

    fn command(ns: &Netns, cgroup: &str, op: &str, addr: &str, count: u32) -> Command {
        let exe = std::env::current_exe().expect("own binary");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns.name()))
            .arg("--")
            .arg(exe)
            .args(["client", "--cgroup", cgroup, op, addr, &count.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        cmd
    }

    fn spawn(&self, ns: &Netns, op: &str, addr: &str, count: u32) -> Client {
        let cgroup = self.path.display().to_string();
        Client::new(
            Self::command(ns, &cgroup, op, addr, count)
                .spawn()
                .expect("client"),
        )
    }

    fn run(&self, ns: &Netns, op: &str, addr: &str, count: u32) -> Vec<String> {
        self.spawn(ns, op, addr, count).finish()
    }

    fn run_outside(ns: &Netns, op: &str, addr: &str, count: u32) -> Vec<String> {
        Client::new(
            Self::command(ns, "none", op, addr, count)
                .spawn()
                .expect("client"),
        )
        .finish()
    }

    /// `count` TCP connections held open; `ask` sends a line on each.
    fn hold(&self, ns: &Netns, addr: &str, count: u32) -> Client {
        self.spawn(ns, "hold", addr, count)
    }

    fn procs(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = self.procs();
            if procs.is_empty() && std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            for pid in procs {
                // SAFETY: plain system call; these PIDs are our clients in our cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

/// A client process; killed by PID when dropped unfinished.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn new(mut child: Child) -> Client {
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Client {
            child,
            stdin,
            stdout,
        }
    }

    /// One line per connection held: the name each backend answers.
    fn ask(&mut self) -> Vec<String> {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"ask\n").expect("ask");
        stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("answer");
        line.split_whitespace().skip(1).map(str::to_owned).collect()
    }

    /// Closes stdin and collects the output (bounded: the client's own timeouts end it,
    /// and it is killed after 60 s).
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_mins(1);
        let mut out = String::new();
        let mut stdout = std::mem::replace(&mut self.stdout, BufReader::new(empty_stdout()));
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !reader.is_finished() {
            let _ = self.child.kill();
        }
        out.push_str(&reader.join().unwrap_or_default());
        let _ = self.child.wait();
        out.lines().map(str::to_owned).collect()
    }
}

/// A finished child's stdout, as a placeholder after `finish` took the real one.
fn empty_stdout() -> ChildStdout {
    let mut child = Command::new("true")
        .stdout(Stdio::piped())
        .spawn()
        .expect("true");
    let out = child.stdout.take().expect("stdout");
    let _ = child.wait();
    out
}

impl Drop for Client {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// --- A backend that answers every line with its name, keeping the connection --------

struct LineServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LineServer {
    fn start(ns: &Netns, name: &str) -> LineServer {
        let listener = ns
            .run_in(|| TcpListener::bind("[::]:8081"))
            .expect("netns")
            .expect("bind 8081");
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let name = format!("{name}\n");
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let name = name.clone();
                            let stop = Arc::clone(&stop);
                            std::thread::spawn(move || serve_lines(conn, &name, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        });
        LineServer {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve_lines(conn: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer.write_all(name.as_bytes()).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// --- Manifests ----------------------------------------------------------------------

fn manifests(web: &[usize]) -> String {
    let all = [0, 1, 2];
    let mut y = String::new();
    y += &service(
        "web",
        "LoadBalancer",
        &["203.0.113.10", "2001:db8:f::10"],
        &[
            ("http", "TCP", 80, 8080, 30080),
            ("dns", "UDP", 53, 5353, 30053),
            ("line", "TCP", 81, 8081, 30081),
        ],
        "",
        &["203.0.113.20", "2001:db8:f::20"],
    );
    y += &slice(
        "web",
        false,
        web,
        &[
            ("http", "TCP", 8080),
            ("dns", "UDP", 5353),
            ("line", "TCP", 8081),
        ],
    );
    y += &slice(
        "web",
        true,
        web,
        &[
            ("http", "TCP", 8080),
            ("dns", "UDP", 5353),
            ("line", "TCP", 8081),
        ],
    );
    y += &service(
        "ext-local",
        "LoadBalancer",
        &["203.0.113.11"],
        &[("http", "TCP", 80, 8080, 30082)],
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n",
        &["203.0.113.21"],
    );
    y += &slice("ext-local", false, &all, &[("http", "TCP", 8080)]);
    y += &service(
        "int-local",
        "ClusterIP",
        &["203.0.113.12"],
        &[("http", "TCP", 80, 8080, 0)],
        "  internalTrafficPolicy: Local\n",
        &[],
    );
    y += &slice("int-local", false, &all, &[("http", "TCP", 8080)]);
    y += &service(
        "sticky",
        "ClusterIP",
        &["203.0.113.13"],
        &[("http", "TCP", 80, 8080, 0)],
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 600\n",
        &[],
    );
    y += &slice("sticky", false, &all, &[("http", "TCP", 8080)]);
    y += &service(
        "empty",
        "ClusterIP",
        &["203.0.113.14"],
        &[("http", "TCP", 80, 8080, 0), ("dns", "UDP", 53, 5353, 0)],
        "",
        &[],
    );
    y
}

/// A Service; ports are (name, protocol, port, targetPort, nodePort or 0).
fn service(
    name: &str,
    type_: &str,
    cluster_ips: &[&str],
    ports: &[(&str, &str, u16, u16, u16)],
    extra_spec: &str,
    lb_ips: &[&str],
) -> String {
    let families: Vec<&str> = cluster_ips
        .iter()
        .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
        .collect();
    let mut y = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n  \
         uid: 00000000-0000-4000-8000-{:012}\n  resourceVersion: \"1\"\nspec:\n  type: {type_}\n  \
         clusterIP: {}\n  clusterIPs:\n",
        name.len(),
        cluster_ips[0]
    );
    for ip in cluster_ips {
        writeln!(y, "  - {ip}").expect("write");
    }
    y += "  ipFamilies:\n";
    for f in &families {
        writeln!(y, "  - {f}").expect("write");
    }
    let policy = if cluster_ips.len() > 1 {
        "RequireDualStack"
    } else {
        "SingleStack"
    };
    writeln!(
        y,
        "  ipFamilyPolicy: {policy}\n  selector:\n    app: {name}\n  ports:"
    )
    .expect("write");
    for (port_name, proto, port, target, node_port) in ports {
        write!(
            y,
            "  - name: {port_name}\n    protocol: {proto}\n    port: {port}\n    targetPort: {target}\n"
        )
        .expect("write");
        if *node_port != 0 {
            writeln!(y, "    nodePort: {node_port}").expect("write");
        }
    }
    y += extra_spec;
    y += "status:\n  loadBalancer:\n";
    if lb_ips.is_empty() {
        y += "    {}\n";
    } else {
        y += "    ingress:\n";
        for ip in lb_ips {
            writeln!(y, "    - ip: {ip}").expect("write");
        }
    }
    y
}

/// An EndpointSlice of `service` with backends `endpoints` (backend 0 on node-a, the
/// others on node-b).
fn slice(service: &str, v6: bool, endpoints: &[usize], ports: &[(&str, &str, u16)]) -> String {
    let family = if v6 { "IPv6" } else { "IPv4" };
    let mut y = format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: \
         {service}-{}\n  namespace: shop\n  resourceVersion: \"1\"\n  labels:\n    \
         kubernetes.io/service-name: {service}\naddressType: {family}\nports:\n",
        family.to_lowercase()
    );
    for (name, proto, port) in ports {
        writeln!(y, "- name: {name}\n  protocol: {proto}\n  port: {port}").expect("write");
    }
    y += "endpoints:\n";
    for &i in endpoints {
        let addr = if v6 {
            Topology::backend_v6(i).to_string()
        } else {
            Topology::backend_v4(i).to_string()
        };
        let node = if i == 0 { "node-a" } else { "node-b" };
        writeln!(
            y,
            "- addresses:\n  - {addr}\n  conditions:\n    ready: true\n  nodeName: {node}"
        )
        .expect("write");
    }
    y
}

// --- The client process -----------------------------------------------------------------

/// `client --cgroup DIR|none OP ADDR COUNT`: joins the cgroup, then runs OP COUNT times,
/// printing one line each: `ok NAME [peer=ADDR] [from=ADDR]` or `err ERRNO`.
fn client_main(args: &[String]) {
    let [flag, cgroup, op, addr, count] = args else {
        panic!("usage: client --cgroup DIR OP ADDR COUNT, got {args:?}");
    };
    assert_eq!(flag, "--cgroup");
    if cgroup != "none" {
        std::fs::write(
            Path::new(cgroup).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .expect("join the cgroup");
    }
    let addr: SocketAddr = addr.parse().expect("address");
    let count: u32 = count.parse().expect("count");
    let mut out = std::io::stdout().lock();
    match op.as_str() {
        "hold" => hold(addr, count),
        "udp-one" => {
            let socket = udp_socket(addr);
            for _ in 0..count {
                let line = udp_unconnected(&socket, addr);
                writeln!(out, "{line}").expect("stdout");
            }
        }
        _ => {
            for _ in 0..count {
                let line = match op.as_str() {
                    "tcp" => tcp_once(addr),
                    "tcp-paced" => {
                        std::thread::sleep(Duration::from_millis(10));
                        tcp_once(addr)
                    }
                    "udp" => udp_unconnected(&udp_socket(addr), addr),
                    "udp-conn" => udp_connected(addr),
                    other => panic!("unknown op {other}"),
                };
                writeln!(out, "{line}").expect("stdout");
                out.flush().expect("stdout");
            }
        }
    }
}

fn errno(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "err ECONNREFUSED".into(),
        Some(libc::EPERM) => "err EPERM".into(),
        _ => format!("err {}", e.kind()),
    }
}

fn tcp_once(addr: SocketAddr) -> String {
    let mut conn = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(c) => c,
        Err(e) => return errno(&e),
    };
    let _ = conn.set_read_timeout(Some(TIMEOUT));
    let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
    let mut answer = String::new();
    if let Err(e) = conn.read_to_string(&mut answer) {
        return errno(&e);
    }
    format!("ok {} peer={peer}", answer.trim())
}

fn udp_socket(addr: SocketAddr) -> UdpSocket {
    let bind = if addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    };
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    socket
}

fn udp_unconnected(socket: &UdpSocket, addr: SocketAddr) -> String {
    if let Err(e) = socket.send_to(b"?", addr) {
        return errno(&e);
    }
    let mut buf = [0u8; 256];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => format!(
            "ok {} from={from}",
            String::from_utf8_lossy(&buf[..n]).trim()
        ),
        Err(e) => errno(&e),
    }
}

fn udp_connected(addr: SocketAddr) -> String {
    let socket = udp_socket(addr);
    if let Err(e) = socket.connect(addr) {
        return errno(&e);
    }
    let peer = socket
        .peer_addr()
        .map(|p| p.to_string())
        .unwrap_or_default();
    if let Err(e) = socket.send(b"?") {
        return errno(&e);
    }
    let mut buf = [0u8; 256];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => format!(
            "ok {} peer={peer} from={from}",
            String::from_utf8_lossy(&buf[..n]).trim()
        ),
        Err(e) => errno(&e),
    }
}

/// Holds `count` connections; on each `ask` line from stdin, asks each and prints
/// `ok NAME NAME ...`; ends at EOF.
fn hold(addr: SocketAddr, count: u32) {
    let mut conns: Vec<BufReader<TcpStream>> = (0..count)
        .map(|_| {
            let c = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
            c.set_read_timeout(Some(TIMEOUT)).expect("timeout");
            BufReader::new(c)
        })
        .collect();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines().take(100) {
        if line.is_err() {
            break;
        }
        let mut names = String::from("ok");
        for conn in &mut conns {
            conn.get_mut().write_all(b"?\n").expect("ask");
            let mut answer = String::new();
            conn.read_line(&mut answer).expect("answer");
            let _ = write!(names, " {}", answer.trim());
        }
        writeln!(out, "{names}").expect("stdout");
        out.flush().expect("stdout");
    }
}
