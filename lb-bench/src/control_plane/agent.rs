//! xlb through the real binary: `lb-agent run --kube` in the load-balancer namespace of
//! a one-backend topology, its KUBECONFIG pointing at the test API server (in this
//! process, listening in the same namespace) that holds the synthetic cluster.
//!
//! - Full sync: from spawning the agent to `/readyz` answering 200 (the first complete
//!   desired state is in the maps), polled every 2 ms from inside the namespace; then
//!   the pinned maps are read back and must hold every Service, backend and frontend.
//! - Change to map: an EndpointSlice replaced in the API server (one endpoint swapped,
//!   as when a pod is replaced) until the Service's recorded table digest in the pinned
//!   `SVC_META` changes, polled every 100 us from this process. The agent writes the
//!   digest right after the new table goes live, before it empties the old backend's
//!   slot (which waits for packets in flight).
//! - Peak RSS: the agent's `VmHWM` after the sync and after the changes.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aya::maps::{Array, HashMap, Map, MapData};
use lb_agent::dataplane::Dataplane;
use lb_common::{FAMILY_V4, Frontend, FrontendKey, PROTO_TCP, ServiceMeta, addr_key, maps};
use lb_testbed::{AgentProcess, ApiServer, Netns, Topology, TopologyConfig};

use super::cluster::{NODE, Synthetic};

/// The agent's admin listener (its default), inside the namespace.
const ADMIN: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9190);
const READY_TIMEOUT: Duration = Duration::from_mins(5);
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AgentRun {
    /// Spawn to `/readyz` 200.
    pub ready_s: f64,
    pub services_in_maps: usize,
    pub backends_in_maps: usize,
    pub frontends_in_maps: usize,
    pub rss_after_sync_kib: u64,
    pub peak_rss_kib: u64,
    /// Resident set at the end.
    pub rss_kib: u64,
    pub timeline: Timeline,
    /// Per change, seconds from the API server's update to the map write.
    pub change_s: Vec<f64>,
    /// Changes not seen in the maps within the timeout.
    pub timeouts: usize,
}

pub fn measure(cluster: &Synthetic, changes: usize, gap: Duration) -> Result<AgentRun> {
    let topo = Topology::build(&TopologyConfig::new("cpxlb", 1))?;
    topo.wait_ready()?;
    let api = ApiServer::start(&topo.lb)?;
    api.apply_all(cluster.objects());
    let kubeconfig = api.kubeconfig().display().to_string();
    let binary = lb_testbed::agent::sibling_agent_binary()?;
    let mut run = AgentRun::default();

    let start = Instant::now();
    let agent = AgentProcess::start_with_env(
        &topo.lb,
        &binary,
        &["--kube", "--node-name", NODE],
        &[("KUBECONFIG", &kubeconfig)],
        "cpbench",
        &[],
    )?;
    wait_ready(&topo.lb, &agent, start)?;
    run.ready_s = start.elapsed().as_secs_f64();
    let pid = agent.pid().context("the agent exited")?;
    run.rss_after_sync_kib = vm_kib(pid, "VmHWM")?;

    let mut dp = Dataplane::open_pinned(agent.pin_dir())?;
    let maps_now = dp.restore()?;
    run.services_in_maps = maps_now.services.len();
    run.backends_in_maps = maps_now.backends.len();
    run.frontends_in_maps = maps_now.frontends.len();
    if run.services_in_maps != cluster.services
        || run.backends_in_maps != cluster.services * cluster.endpoints
        || run.frontends_in_maps != cluster.services
    {
        bail!(
            "ready, but the maps hold {} services, {} backends, {} frontends ({}, {}, {} \
             expected); agent log:\n{}",
            run.services_in_maps,
            run.backends_in_maps,
            run.frontends_in_maps,
            cluster.services,
            cluster.services * cluster.endpoints,
            cluster.services,
            tail(&agent.log())
        );
    }
    drop(dp);

    let probe = Probe::open(agent.pin_dir())?;
    let mut swapped = vec![false; cluster.services];
    for k in 0..changes {
        let i = cluster.changed(k);
        let id = probe.service_id(i)?;
        let before = probe.digest(id)?;
        swapped[i] = !swapped[i];
        let slice = cluster.slice(i, swapped[i]);
        let start = Instant::now();
        api.apply(slice);
        loop {
            if probe.digest(id)? != before {
                run.change_s.push(start.elapsed().as_secs_f64());
                break;
            }
            if start.elapsed() > CHANGE_TIMEOUT {
                run.timeouts += 1;
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(gap);
    }
    run.peak_rss_kib = vm_kib(pid, "VmHWM")?;
    run.rss_kib = vm_kib(pid, "VmRSS")?;
    let log = agent.log();
    run.timeline = timeline(&log);
    let kept = std::env::temp_dir().join("xlb-bench-control-plane-agent.log");
    if std::fs::write(&kept, &log).is_ok() {
        eprintln!("agent log kept at {}", kept.display());
    }
    if run.change_s.is_empty() && changes > 0 {
        bail!(
            "no change reached the maps; agent log:\n{}",
            tail(&agent.log())
        );
    }
    Ok(run)
}

/// Polls `/readyz` from inside the namespace until 200, or fails with the agent's log.
fn wait_ready(ns: &Netns, agent: &AgentProcess<'_>, start: Instant) -> Result<()> {
    let ready = ns.run_in(|| {
        while start.elapsed() < READY_TIMEOUT {
            if readyz().unwrap_or(false) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    })?;
    if !ready {
        bail!(
            "the agent was not ready within {READY_TIMEOUT:?}; log:\n{}",
            tail(&agent.log())
        );
    }
    Ok(())
}

/// One `GET /readyz`; true on 200.
fn readyz() -> Result<bool> {
    let mut stream = TcpStream::connect_timeout(&ADMIN, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    Ok(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
}

/// A field of `/proc/PID/status` in KiB (`VmHWM`: peak resident set).
fn vm_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

fn tail(log: &str) -> &str {
    let start = log.len().saturating_sub(4000);
    let start = (start..log.len())
        .find(|&i| log.is_char_boundary(i))
        .unwrap_or(0);
    &log[start..]
}

/// Reads the pinned maps a change shows in: the frontend's service id, and that
/// service's metadata.
struct Probe {
    frontends: HashMap<MapData, FrontendKey, Frontend>,
    metas: Array<MapData, ServiceMeta>,
}

impl Probe {
    fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let data =
                MapData::from_pin(dir.join(name)).with_context(|| format!("pinned map {name}"))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Self {
            frontends: HashMap::try_from(open(maps::FRONTENDS)?)?,
            metas: Array::try_from(open(maps::SERVICE_META)?)?,
        })
    }

    fn service_id(&self, i: usize) -> Result<u32> {
        let vip = Synthetic::vip(i);
        let (addr, family) = addr_key(std::net::IpAddr::V4(*vip.ip()));
        debug_assert_eq!(family, FAMILY_V4);
        let key = FrontendKey {
            addr,
            port: vip.port().to_be(),
            proto: PROTO_TCP,
            family,
        };
        Ok(self
            .frontends
            .get(&key, 0)
            .with_context(|| format!("no frontend for {vip}"))?
            .service_id)
    }

    fn digest(&self, id: u32) -> Result<u64> {
        Ok(self.metas.get(&id, 0)?.table_digest)
    }
}

/// Seconds, from the agent's log.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timeline {
    /// From the log's first line to the initial lists being complete.
    pub lists_complete: Option<f64>,
    /// The first sync's plan and writes.
    pub first_plan: Option<f64>,
    pub first_write: Option<f64>,
}

/// Seconds since midnight of a log line's RFC 3339 timestamp (`...THH:MM:SS.ffffffZ`).
fn log_time(line: &str) -> Option<f64> {
    let (_, time) = line.split_whitespace().next()?.split_once('T')?;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// A `key=value` field of a log line, as a number.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

fn timeline(log: &str) -> Timeline {
    let log = lb_testbed::agent::without_colours(log);
    let first = log.lines().find_map(log_time);
    let lists = log
        .lines()
        .find(|l| l.contains("initial lists complete"))
        .and_then(log_time);
    let update = log.lines().find(|l| l.contains("maps updated"));
    Timeline {
        lists_complete: first.zip(lists).map(|(a, b)| b - a),
        first_plan: update.and_then(|l| field(l, "plan_ms")).map(|ms| ms / 1e3),
        first_write: update.and_then(|l| field(l, "write_ms")).map(|ms| ms / 1e3),
    }
}
