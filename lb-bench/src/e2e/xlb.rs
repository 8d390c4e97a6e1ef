//! The xlb configuration of the load-balancer namespace: the real agent
//! (`lb-agent run --config FILE --interface xc --interface xb --bpffs DIR`, native XDP)
//! with the benchmark's services in its config file, as an operator runs it. Stopping
//! kills the agent by PID and removes its pins (which detaches the program).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use lb_agent::status::Report;
use lb_testbed::{AgentProcess, Netns};

use crate::kube_proxy::ServicePort;

/// A running xlb configuration.
pub struct Xlb<'a> {
    agent: AgentProcess<'a>,
    names: Vec<String>,
    config: PathBuf,
}

/// What xlb's counters say about a run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct XlbCounters {
    /// Per service (in the order given to [`start_xlb`]): flows that got a backend from the
    /// Maglev table, client -> backend packets, backend -> client packets.
    pub services: Vec<(u64, u64, u64)>,
    /// Every reason with a nonzero packet count, e.g. `redirect`, `pass_no_neigh`.
    pub reasons: Vec<(String, u64)>,
}

/// Starts the agent on the load balancer's `xc` and `xb` with `services`, and waits
/// until the pinned maps hold every frontend.
pub fn start_xlb<'a>(lb: &'a Netns, services: &[ServicePort]) -> Result<Xlb<'a>> {
    let mut yaml = String::from("services:\n");
    let mut names = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let name = format!("bench-{i}");
        writeln!(yaml, "  - name: {name}")?;
        writeln!(
            yaml,
            "    frontends: [{{ address: {}, port: {}, protocol: TCP }}]",
            svc.vip.ip(),
            svc.vip.port()
        )?;
        writeln!(yaml, "    backends:")?;
        for ep in &svc.endpoints {
            writeln!(
                yaml,
                "      - {{ address: {}, port: {} }}",
                ep.ip(),
                ep.port()
            )?;
        }
        names.push(name);
    }
    let config = std::env::temp_dir().join(format!("xlb-bench-{}.yaml", std::process::id()));
    std::fs::write(&config, yaml).with_context(|| format!("writing {}", config.display()))?;
    let agent = AgentProcess::start(
        lb,
        &lb_testbed::agent::sibling_agent_binary()?,
        &config,
        "bench",
        &[],
    )?;
    let want = names.len();
    agent.wait_for(Duration::from_secs(30), |r| {
        r.services.len() == want && r.services.iter().all(|s| !s.frontends.is_empty())
    })?;
    Ok(Xlb {
        agent,
        names,
        config,
    })
}

impl Xlb<'_> {
    pub fn counters(&self) -> Result<XlbCounters> {
        let report = Report::read(self.agent.pin_dir())?;
        let mut counters = XlbCounters::default();
        for name in &self.names {
            let s = report
                .services
                .iter()
                .find(|s| &s.name == name)
                .with_context(|| format!("service {name} missing from the status"))?;
            counters
                .services
                .push((s.new_flows, s.packets, s.reply_packets));
        }
        counters.reasons = report.reasons;
        Ok(counters)
    }
}

/// Stops xlb: kills the agent (by PID) and removes its pins, which detaches the
/// program from both interfaces. The caller checks that no XDP program is left.
pub fn stop_xlb(xlb: Xlb<'_>) {
    let Xlb { agent, config, .. } = xlb;
    drop(agent);
    let _ = std::fs::remove_file(config);
}

/// Interfaces of `lb` that have an XDP program attached, from `ip -j link`.
pub fn xdp_attached(lb: &Netns) -> Result<Vec<String>> {
    let json = lb.ip(&["-j", "link", "show"])?;
    let links: serde_json::Value =
        serde_json::from_str(&json).with_context(|| format!("`ip -j link` output {json:?}"))?;
    Ok(links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l.get("xdp").is_some())
        .filter_map(|l| l.get("ifname")?.as_str().map(str::to_owned))
        .collect())
}
