//! The xlb configuration of the load-balancer namespace: the XDP program attached natively
//! to `xc` and `xb`, programmed with the benchmark's services.
//!
//! SWITCH TO THE AGENT HERE. Until `lb-agent run` lands, [`start_xlb`] loads the program
//! and writes the maps with the library, as the demo does (`Dataplane::load`, `attach`,
//! `demo::install_service`: `set_backend`, `set_maglev_table`, `set_frontend`). With the
//! agent, [`start_xlb`] becomes: write the services to a config file, `lb.spawn("lb-agent",
//! ["run", "--config", FILE, "--interface", "xc", "--interface", "xb", "--bpffs", DIR])`,
//! wait until its readiness endpoint (or the pinned `FRONTENDS_V1`) shows the frontends;
//! [`Xlb::counters`] reads the pinned `REASON_STATS_V1`/`SVC_STATS_V1` (or the agent's
//! metrics); and [`stop_xlb`] kills the agent by its PID (`lb.kill(pid)`) and runs
//! `lb-agent detach --bpffs DIR`. Nothing else in the benchmark needs to change.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use aya::programs::XdpMode;
use lb_agent::dataplane::Dataplane;
use lb_agent::demo::install_service;
use lb_agent::testbed::{Netns, Topology};

use super::ServicePort;

/// A running xlb configuration.
pub struct Xlb {
    dp: Dataplane,
    services: usize,
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

/// Attaches xlb to the load balancer's `xc` and `xb` (native XDP) and programs
/// `services` (service ids 1, 2, ... in order).
pub fn start_xlb(lb: &Netns, services: &[ServicePort]) -> Result<Xlb> {
    let dp = lb.run_in(|| -> Result<Dataplane> {
        let mut dp = Dataplane::load(None)?;
        for iface in [Topology::LB_CLIENT_IF, Topology::LB_BACKEND_IF] {
            dp.attach(iface, XdpMode::Driver)
                .with_context(|| format!("attach XDP (native) to {iface}"))?;
        }
        for (i, svc) in services.iter().enumerate() {
            let backends: Vec<SocketAddr> =
                svc.endpoints.iter().copied().map(SocketAddr::V4).collect();
            install_service(
                &mut dp,
                u32::try_from(i + 1)?,
                SocketAddr::V4(svc.vip),
                &backends,
            )
            .with_context(|| format!("program service {}", svc.name()))?;
        }
        Ok(dp)
    })??;
    Ok(Xlb {
        dp,
        services: services.len(),
    })
}

impl Xlb {
    pub fn counters(&self) -> Result<XlbCounters> {
        let mut counters = XlbCounters::default();
        for id in 1..=self.services {
            let s = self.dp.service_stats(u32::try_from(id)?)?;
            counters
                .services
                .push((s.new_flows, s.packets, s.reply_packets));
        }
        counters.reasons = self
            .dp
            .reason_stats()?
            .into_iter()
            .filter(|(_, s)| s.packets > 0)
            .map(|(r, s)| (r.name().to_owned(), s.packets))
            .collect();
        Ok(counters)
    }
}

/// Detaches xlb: dropping the program's links takes it off both interfaces, and its maps
/// go with it. The caller checks that no XDP program is left.
pub fn stop_xlb(xlb: Xlb) {
    drop(xlb.dp);
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
