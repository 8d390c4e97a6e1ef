//! The demo behind `cargo xtask demo`: a client, the load-balancer node and three
//! backends in network namespaces; the real agent (`lb-agent run`) started in the
//! load-balancer namespace with examples/xlb.yaml; HTTP requests from the client
//! through both VIPs; which backend answered how often, and `lb-agent status`.
//! The end-to-end tests run the same code.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{self as testbed, AgentProcess, Topology, TopologyConfig};
use lb_agent::status::Report as Status;

/// The demo's config; examples/xlb.yaml is the copy operators read.
pub const CONFIG: &str = include_str!("../../examples/xlb.yaml");
/// Backends in the demo topology (examples/xlb.yaml names three per family).
const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
/// The demo gives up after this many failed requests.
const MAX_FAILURES: u64 = 5;

/// What one demo run saw.
pub struct Report {
    /// Per VIP, how many requests each backend answered.
    pub answers: BTreeMap<String, BTreeMap<String, u64>>,
    pub failures: u64,
    pub status: Status,
}

/// Runs the demo: `agent` is the lb-agent binary, `requests` HTTP requests per VIP.
pub fn run(agent: &Path, requests: u32) -> Result<Report> {
    testbed::check_privileges()?;
    // Nothing is mounted here on purpose: on a machine without bpffs at /sys/fs/bpf the
    // agent mounts it itself (CI runs the demo that way, see .ci/run).
    println!("building namespaces: client, load balancer (XDP on xc and xb), {BACKENDS} backends");
    let topo = Topology::build(&TopologyConfig::new("demo", BACKENDS))?;
    topo.wait_ready()?;
    let mut servers = Vec::new();
    for i in 0..BACKENDS {
        servers.extend(testbed::spawn_backend_http_servers(&topo, i, BACKEND_PORT)?);
    }
    let config = std::env::temp_dir().join(format!("xlb-demo-{}.yaml", std::process::id()));
    std::fs::write(&config, CONFIG).with_context(|| format!("writing {}", config.display()))?;
    let _remove_config = RemoveOnDrop(&config);
    println!("starting: lb-agent run --config examples/xlb.yaml --interface xc --interface xb");
    let agent = AgentProcess::start(&topo.lb, agent, &config, "demo", &[])?;
    agent.wait_for(Duration::from_secs(20), |s| {
        s.services.len() == 2 && s.services.iter().all(|svc| !svc.frontends.is_empty())
    })?;

    let vips = [
        IpAddr::V4(Topology::vip_v4(0)),
        IpAddr::V6(Topology::vip_v6(0)),
    ];
    println!("sending {requests} HTTP requests to each VIP");
    let mut answers = BTreeMap::new();
    let mut failures = 0;
    for vip in vips {
        let target = SocketAddr::new(vip, VIP_PORT);
        let per_backend: &mut BTreeMap<String, u64> =
            answers.entry(target.to_string()).or_default();
        for _ in 0..requests {
            match testbed::http_get(&topo.client, target, Duration::from_secs(2)) {
                Ok(name) => *per_backend.entry(name).or_default() += 1,
                Err(e) => {
                    tracing::warn!("request to {target} failed: {e:#}");
                    failures += 1;
                    // Bounded: a broken path fails fast instead of timing out 2N times.
                    if failures >= MAX_FAILURES {
                        bail!(
                            "{failures} requests failed; last: {e:#}\nagent log:\n{}",
                            agent.log()
                        );
                    }
                }
            }
        }
    }
    if answers.values().all(BTreeMap::is_empty) {
        bail!("no request got through the VIPs");
    }
    let status = Status::read(agent.pin_dir())?;
    drop(agent);
    drop(servers);
    Ok(Report {
        answers,
        failures,
        status,
    })
}

struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f)?;
        for (vip, per_backend) in &self.answers {
            let total: u64 = per_backend.values().sum();
            writeln!(f, "VIP {vip}: {total} requests answered")?;
            for (backend, n) in per_backend {
                #[expect(clippy::cast_precision_loss, reason = "a percentage")]
                let share = 100.0 * *n as f64 / total.max(1) as f64;
                writeln!(f, "  {backend:<12} {n:>5}  {share:5.1}%")?;
            }
        }
        writeln!(f, "failed requests: {}", self.failures)?;
        writeln!(f)?;
        writeln!(f, "$ lb-agent status")?;
        write!(f, "{}", self.status)?;
        writeln!(f)?;
        writeln!(f, "agent stopped, pins and namespaces removed; done.")
    }
}
