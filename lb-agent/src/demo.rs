//! The demo behind `cargo xtask demo`: client, load-balancer node and backends in
//! network namespaces, the XDP program attached natively to the node's interfaces,
//! one IPv4 and one IPv6 service written into its maps, and real TCP connections
//! through the VIPs. Returns which backend answered how often; the end-to-end test
//! runs the same code.
//!
//! Until the config-file agent lands (issue 3) the services are built in here.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::programs::XdpMode;
use lb_common::{Backend, Frontend, FrontendKey, PROTO_TCP, Reason};

use crate::dataplane::Dataplane;
use crate::maglev;
use crate::testbed::node::{addr16, family};
use crate::testbed::{self, Topology, TopologyConfig};

/// Backend port of the demo's TCP servers.
const BACKEND_PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
/// The demo gives up after this many failed connections.
const MAX_FAILURES: u64 = 5;

/// What one demo run saw.
pub struct Report {
    /// Per VIP, how many connections each backend answered.
    pub answers: BTreeMap<String, BTreeMap<String, u64>>,
    pub failures: u64,
    pub reasons: Vec<(Reason, u64)>,
}

/// Writes one TCP service into the maps: `frontend` -> `backends`, with a Maglev table
/// of the default size over equal weights. Backend ids are `service_id * 100 + 1 ..`.
/// The demo and `xlb-bench e2e` program their services with it until the config-file
/// agent does.
pub fn install_service(
    dp: &mut Dataplane,
    service_id: u32,
    frontend: SocketAddr,
    backends: &[SocketAddr],
) -> Result<()> {
    let identities: Vec<String> = backends.iter().map(|b| format!("{b}/TCP")).collect();
    let mut input = Vec::new();
    for (i, (addr, identity)) in backends.iter().zip(&identities).enumerate() {
        let id = service_id * 100 + u32::try_from(i).context("backend index")? + 1;
        dp.set_backend(
            id,
            Backend {
                addr: addr16(addr.ip()),
                port: addr.port().to_be(),
                family: family(addr.ip()),
                _pad: 0,
                service_id,
            },
        )?;
        input.push(maglev::Backend {
            id,
            identity: identity.as_bytes(),
            weight: 1,
        });
    }
    let table = maglev::build_table(&input, maglev::DEFAULT_TABLE_SIZE)?;
    dp.set_maglev_table(service_id, &table)?;
    dp.set_frontend(
        FrontendKey {
            addr: addr16(frontend.ip()),
            port: frontend.port().to_be(),
            proto: PROTO_TCP,
            family: family(frontend.ip()),
        },
        Frontend {
            service_id,
            ..Frontend::default()
        },
    )?;
    Ok(())
}

/// Runs the demo with `backends` backends and `requests` connections per VIP.
pub fn run(backends: usize, requests: u32) -> Result<Report> {
    testbed::check_privileges()?;
    let topo = Topology::build(&TopologyConfig::new("demo", backends))?;
    topo.wait_ready()?;
    let mut servers = Vec::new();
    for (i, ns) in topo.backends.iter().enumerate() {
        let name = format!("backend-{i}");
        for ip in [
            IpAddr::V4(Topology::backend_v4(i)),
            IpAddr::V6(Topology::backend_v6(i)),
        ] {
            servers.push(testbed::spawn_tcp_name_server(
                ns,
                SocketAddr::new(ip, BACKEND_PORT),
                &name,
            )?);
        }
    }
    let vips = [
        IpAddr::V4(Topology::vip_v4(0)),
        IpAddr::V6(Topology::vip_v6(0)),
    ];
    let dp = topo.lb.run_in(|| -> Result<Dataplane> {
        let mut dp = Dataplane::load(None)?;
        for iface in [Topology::LB_CLIENT_IF, Topology::LB_BACKEND_IF] {
            dp.attach(iface, XdpMode::Driver)
                .with_context(|| format!("attach XDP (native) to {iface}"))?;
        }
        let v4: Vec<SocketAddr> = (0..backends)
            .map(|i| SocketAddr::new(IpAddr::V4(Topology::backend_v4(i)), BACKEND_PORT))
            .collect();
        let v6: Vec<SocketAddr> = (0..backends)
            .map(|i| SocketAddr::new(IpAddr::V6(Topology::backend_v6(i)), BACKEND_PORT))
            .collect();
        install_service(&mut dp, 1, SocketAddr::new(vips[0], VIP_PORT), &v4)?;
        install_service(&mut dp, 2, SocketAddr::new(vips[1], VIP_PORT), &v6)?;
        Ok(dp)
    })??;

    let mut answers = BTreeMap::new();
    let mut failures = 0;
    for vip in vips {
        let per_backend: &mut BTreeMap<String, u64> =
            answers.entry(format!("{vip}:{VIP_PORT}")).or_default();
        for _ in 0..requests {
            match testbed::tcp_ask(
                &topo.client,
                SocketAddr::new(vip, VIP_PORT),
                Duration::from_secs(2),
            ) {
                Ok(name) => *per_backend.entry(name).or_default() += 1,
                Err(e) => {
                    tracing::warn!("request to {vip} failed: {e:#}");
                    failures += 1;
                    // Bounded: a broken path fails fast instead of timing out 2N times.
                    if failures >= MAX_FAILURES {
                        bail!("{failures} connections failed; last: {e:#}");
                    }
                }
            }
        }
    }
    let reasons = dp
        .reason_stats()?
        .into_iter()
        .filter(|(_, s)| s.packets > 0)
        .map(|(r, s)| (r, s.packets))
        .collect();
    if answers.values().all(BTreeMap::is_empty) {
        bail!("no request got through the VIPs");
    }
    drop(dp);
    drop(servers);
    Ok(Report {
        answers,
        failures,
        reasons,
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (vip, per_backend) in &self.answers {
            let total: u64 = per_backend.values().sum();
            writeln!(f, "VIP {vip}: {total} connections answered")?;
            for (backend, n) in per_backend {
                #[expect(clippy::cast_precision_loss, reason = "a percentage")]
                let share = 100.0 * *n as f64 / total.max(1) as f64;
                writeln!(f, "  {backend:<12} {n:>5}  {share:5.1}%")?;
            }
        }
        writeln!(f, "failed connections: {}", self.failures)?;
        writeln!(f, "XDP verdict counters (packets):")?;
        for (reason, n) in &self.reasons {
            writeln!(f, "  {:<20} {n}", reason.name())?;
        }
        Ok(())
    }
}
