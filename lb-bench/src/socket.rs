//! `socket`: connect + request + close per second, and CPU per connection, from a pod
//! (the client namespace, in a child cgroup) to a ClusterIP, one configuration at a
//! time in one run:
//! - `direct`: to the backend's own address (the floor, no translation);
//! - `iptables`, `nftables`: kube-proxy's rules in the node (load-balancer) namespace,
//!   which DNAT the pod's packets as they pass through it;
//! - `xlb`: the agent with socket load balancing on the child cgroup (`--cgroup`, no
//!   `--interface`): the destination is rewritten at `connect`.
//!
//! The client is this binary (`xlb-bench socket-client`), started with `nsenter` in the
//! client namespace; it joins the cgroup, then for `--secs` opens a connection, reads the
//! backend's one-line answer until EOF and closes, one after another. CPU is the whole
//! machine's busy time (/proc/stat) over the run, per connection.

use std::io::Read as _;
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_testbed::{self as testbed, AgentProcess, Topology, TopologyConfig};

use crate::kube_proxy::{self, ServicePort};
use crate::report;

const VIP: &str = "203.0.113.10:80";
const BACKEND_PORT: u16 = 8080;

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Interleaved rounds; the figures are medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    #[arg(long)]
    cgroup: PathBuf,
    #[arg(long)]
    addr: SocketAddr,
    /// Source address (each configuration and round uses a fresh one, so no
    /// TIME_WAIT socket or conntrack entry of an earlier run collides with its ports).
    #[arg(long)]
    bind: std::net::IpAddr,
    #[arg(long)]
    secs: u64,
}

const CONFIGS: [&str; 4] = ["direct", "iptables", "nftables", "xlb"];

/// The client process: connections until the deadline; prints `OK ERRORS`.
pub fn client(args: &ClientArgs) -> Result<()> {
    std::fs::write(
        args.cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .context("joining the cgroup")?;
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let (mut ok, mut errors) = (0u64, 0u64);
    let mut answer = Vec::with_capacity(64);
    while Instant::now() < deadline {
        answer.clear();
        let done = connect(args.bind, args.addr).and_then(|mut c| c.read_to_end(&mut answer));
        match done {
            Ok(n) if n > 0 => ok += 1,
            _ => errors += 1,
        }
    }
    println!("{ok} {errors}");
    Ok(())
}

fn connect(bind: std::net::IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(bind, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(1))?;
    Ok(socket.into())
}

struct Measured {
    conns_per_s: f64,
    cpu_us_per_conn: f64,
}

pub fn run(args: &Args) -> Result<()> {
    if args.secs == 0 || args.rounds == 0 || args.rounds > 20 {
        bail!("--secs must be at least 1 and --rounds 1..=20");
    }
    testbed::check_privileges()?;
    let agent = testbed::agent::sibling_agent_binary()?;
    let topo = Topology::build(&TopologyConfig::new("sockb", 1))?;
    topo.wait_ready()?;
    topo.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
    topo.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    let backend = SocketAddrV4::new(Topology::backend_v4(0), BACKEND_PORT);
    let _server =
        testbed::spawn_tcp_name_server(&topo.backends[0], SocketAddr::V4(backend), "backend-0")?;
    let cgroup = Cgroup::new()?;
    let dir = std::env::temp_dir().join(format!("xlb-sockbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config_file = dir.join("xlb.yaml");
    std::fs::write(
        &config_file,
        format!(
            "services:\n  - name: web\n    frontends:\n      - {{ address: 203.0.113.10, port: 80 }}\n    backends:\n      - {{ address: {}, port: {BACKEND_PORT} }}\n",
            backend.ip()
        ),
    )?;
    let services = [ServicePort {
        namespace: "bench".into(),
        service: "web".into(),
        port_name: "http".into(),
        vip: VIP.parse()?,
        endpoints: vec![backend],
    }];
    let mut results: Vec<(&str, Vec<Measured>)> =
        CONFIGS.iter().map(|c| (*c, Vec::new())).collect();
    for round in 0..args.rounds {
        for (k, (config, measured)) in results.iter_mut().enumerate() {
            // 198.51.100.20 + 4 x round + k: rounds are at most 20, so at most .99.
            let host = u8::try_from(20 + 4 * round as usize + k).context("source address")?;
            let source = std::net::Ipv4Addr::new(198, 51, 100, host);
            topo.client.ip(&[
                "addr",
                "add",
                &format!("{source}/24"),
                "dev",
                Topology::CLIENT_IF,
            ])?;
            kube_proxy::clear(&topo.lb)?;
            let mut xlb = None;
            let target = match *config {
                "direct" => SocketAddr::V4(backend),
                "iptables" => {
                    kube_proxy::apply_iptables(&topo.lb, &services)?;
                    VIP.parse()?
                }
                "nftables" => {
                    kube_proxy::apply_nftables(
                        &topo.lb,
                        &services,
                        "203.0.113.0/24",
                        Topology::lb_client_v4(),
                    )?;
                    VIP.parse()?
                }
                _ => {
                    let cg = cgroup.0.display().to_string();
                    let config_path = config_file.display().to_string();
                    let a = AgentProcess::start_socket_lb(
                        &topo.lb,
                        &agent,
                        &["--config", &config_path],
                        "sockbench",
                        &["--cgroup", &cg],
                    )?;
                    a.wait_for(Duration::from_secs(20), |r| {
                        r.services.iter().any(|s| !s.backends.is_empty())
                    })?;
                    xlb = Some(a);
                    VIP.parse()?
                }
            };
            let m = measure(&topo.client, &cgroup.0, target, source, args.secs)?;
            eprintln!(
                "round {} {config:>9}: {:>8.0} conn/s {:>6.1} us CPU/conn",
                round + 1,
                m.conns_per_s,
                m.cpu_us_per_conn
            );
            measured.push(m);
            drop(xlb);
            kube_proxy::clear(&topo.lb)?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    print_report(&results, args)
}

fn measure(
    client: &testbed::Netns,
    cgroup: &Path,
    target: SocketAddr,
    source: std::net::Ipv4Addr,
    secs: u64,
) -> Result<Measured> {
    let exe = std::env::current_exe()?;
    let before = busy_jiffies()?;
    let started = Instant::now();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", client.name()))
        .arg("--")
        .arg(exe)
        .args(["socket-client", "--cgroup"])
        .arg(cgroup)
        .args(["--addr", &target.to_string(), "--secs", &secs.to_string()])
        .args(["--bind", &source.to_string()])
        .stdout(Stdio::piped())
        .output()
        .context("socket-client")?;
    let elapsed = started.elapsed().as_secs_f64();
    let busy = busy_jiffies()? - before;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(ok)), Some(Ok(errors))) = (words.next(), words.next()) else {
        bail!(
            "socket-client printed {text:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if ok == 0 || errors * 100 > ok {
        bail!("{target}: {ok} connections, {errors} errors");
    }
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let m = Measured {
        conns_per_s: ok as f64 / elapsed,
        // USER_HZ is 100: a jiffy is 10 ms.
        cpu_us_per_conn: busy as f64 * 10_000.0 / ok as f64,
    };
    Ok(m)
}

/// Busy jiffies of all CPUs: user, nice, system, irq, softirq, steal.
fn busy_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    Ok(v.get(0..3).map_or(0, |s| s.iter().sum::<u64>())
        + v.get(5..8).map_or(0, |s| s.iter().sum::<u64>()))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn print_report(results: &[(&str, Vec<Measured>)], args: &Args) -> Result<()> {
    let rows: Vec<(&str, f64, f64)> = results
        .iter()
        .map(|(name, m)| {
            let mut rate: Vec<f64> = m.iter().map(|m| m.conns_per_s).collect();
            let mut cpu: Vec<f64> = m.iter().map(|m| m.cpu_us_per_conn).collect();
            (*name, median(&mut rate), median(&mut cpu))
        })
        .collect();
    let direct = rows[0];
    println!(
        "\nsocket: connect + request + close from a pod to a ClusterIP (medians of {} rounds, {} s each)",
        args.rounds, args.secs
    );
    println!("{}", report::load_line());
    println!(
        "{:>9} {:>10} {:>12} {:>14} {:>14}",
        "config", "conn/s", "CPU us/conn", "rate/direct", "CPU/direct"
    );
    for (name, rate, cpu) in &rows {
        println!(
            "{name:>9} {rate:>10.0} {cpu:>12.1} {:>14.2} {:>14.2}",
            rate / direct.1,
            cpu / direct.2
        );
    }
    let xlb = rows[3];
    for base in &rows[1..3] {
        println!(
            "xlb/{}: conn/s {:.2}x, CPU per connection {:.2}x",
            base.0,
            xlb.1 / base.1,
            xlb.2 / base.2
        );
    }
    let target = xlb.2 / direct.2 <= 1.1;
    println!(
        "target: CPU per connection within 1.1x of direct: {:.2}x {}; ahead of both kube-proxy modes: {}",
        xlb.2 / direct.2,
        report::mark(target),
        report::mark(xlb.1 > rows[1].1 && xlb.1 > rows[2].1)
    );
    println!(
        "reproduce: cargo xtask bench socket --secs {} --rounds {}",
        args.secs, args.rounds
    );
    let json =
        serde_json::json!(rows
        .iter()
        .map(|(n, r, c)| serde_json::json!({"config": n, "conns_per_s": r, "cpu_us_per_conn": c}))
        .collect::<Vec<_>>());
    report::write_json(args.json.as_deref(), &json)
}

/// A child cgroup of the host's cgroup2 mount; removed on drop (its processes, our
/// clients, are killed by PID first).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new() -> Result<Cgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = lb_agent::dataplane::sockets::cgroup2_mount(&mountinfo)
            .context("no cgroup2 mount (the socket benchmark needs cgroup v2)")?;
        let path = root.join(format!("xlb-bench-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup(path))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() && std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            for pid in pids {
                // SAFETY: plain system call on our own clients' PIDs.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
