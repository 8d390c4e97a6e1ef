//! `lb-agent status`: what the data plane is doing, read from the pinned maps alone,
//! so it works while an agent runs, after it stopped, and after it crashed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use lb_common::{
    Backend, BackendMeta, FRONTEND_F_REJECT_EMPTY, FRONTEND_F_SOURCE_RANGES, Frontend, FrontendKey,
    HEALTH_DOWN, HEALTH_UP, Reason, SERVICE_META_F_NO_BACKENDS, ServiceStats,
};
use serde::Serialize;

use crate::dataplane::{Dataplane, DataplaneError, pins, snat};
use lb_core::plan::{meta_endpoint, service_name};

#[derive(Debug, Serialize)]
pub struct Report {
    pub pin_dir: PathBuf,
    /// Interfaces with a pinned XDP link.
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Verdict counters over all services: (reason, packets).
    pub reasons: Vec<(String, u64)>,
    /// The node's source NAT: addresses, port range, ports held, exhaustion. `None`
    /// before an agent wrote its settings.
    pub snat: Option<SnatStatus>,
}

/// Source NAT on this node. Reservations are keyed by backend (address, port,
/// protocol) and node address: each backend has the whole range, so a full backend
/// drops only new source-NATed flows to itself from this node (`drop_snat_exhausted`).
#[derive(Debug, Serialize)]
pub struct SnatStatus {
    /// The source addresses source-NATed flows leave with; `None`: that family's
    /// flows to be source-NATed are dropped (`drop_no_snat_address`).
    pub address_v4: Option<String>,
    pub address_v6: Option<String>,
    /// `--snat-ports`, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    /// Ports each backend can hold at once per node address.
    pub ports_per_backend: u32,
    /// Reservations whose flow is live (or closed within the backend's `TIME_WAIT`).
    pub held: u64,
    /// Of `held`, connections the backend closed first over 10 s ago, held only for
    /// its `TIME_WAIT`: a new flow takes one of their ports when it finds no free one.
    pub reusable: u64,
    /// Reservations past their timeout, free for the next flow that tries the port.
    pub idle: u64,
    /// New flows dropped for no free port since the maps were created.
    pub exhausted: u64,
    /// Backends with held ports, fullest first.
    pub backends: Vec<SnatBackendStatus>,
}

#[derive(Debug, Serialize)]
pub struct SnatBackendStatus {
    /// `192.0.2.43:8080/TCP`.
    pub backend: String,
    pub held: u64,
    /// Of `held`, given to a new flow that finds no free port.
    pub reusable: u64,
    /// Every port of the range is held, none reusable: new source-NATed flows to it
    /// are dropped.
    pub full: bool,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub id: u32,
    pub name: String,
    pub frontends: Vec<String>,
    pub table_size: u32,
    /// No backend takes new connections: they are dropped or rejected (and counted).
    pub no_backends: bool,
    /// What new connections meet while there is no backend: `drop` or `reject`.
    pub when_empty: &'static str,
    /// Client prefixes admitted to new connections; empty admits everyone.
    pub source_ranges: Vec<String>,
    pub backends: Vec<BackendStatus>,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub reply_packets: u64,
    /// New connections answered with a reset or ICMP unreachable.
    pub rejected: u64,
    /// New connections dropped for a client outside the source ranges.
    pub source_denied: u64,
}

#[derive(Debug, Serialize)]
pub struct BackendStatus {
    pub id: u32,
    pub endpoint: String,
    pub weight: u32,
    /// `up`, `down` or `unchecked`.
    pub health: &'static str,
    /// In the backend array: established flows reach it.
    pub forwarding: bool,
    /// Fraction of the Maglev table (of new flows) it receives.
    pub share: f64,
}

impl Report {
    /// Reads the maps pinned under `dir`.
    pub fn read(dir: &Path) -> Result<Report, DataplaneError> {
        if !dir.join(lb_common::maps::FRONTENDS).exists() {
            return Err(DataplaneError::Pin {
                path: dir.to_path_buf(),
                reason: "nothing pinned here: no agent has run with this --bpffs directory \
                         (or it was detached)"
                    .into(),
            });
        }
        let mut dp = Dataplane::open_pinned(dir)?;
        let snapshot = dp.snapshot()?;
        // Grouped by service once: 10,000 services must not each scan every entry.
        let mut frontends: BTreeMap<u32, Vec<(FrontendKey, Frontend)>> = BTreeMap::new();
        for (key, value) in &snapshot.frontends {
            frontends
                .entry(value.service_id)
                .or_default()
                .push((*key, *value));
        }
        let mut backends: BTreeMap<u32, Vec<&BackendEntry>> = BTreeMap::new();
        for entry in &snapshot.backends {
            backends.entry(entry.1.service_id).or_default().push(entry);
        }
        let mut ranges: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (id, range) in dp.source_ranges()? {
            ranges.entry(id).or_default().push(range.to_string());
        }
        let mut services = Vec::new();
        for (id, meta) in &snapshot.services {
            let table = dp.maglev_table(*id)?.unwrap_or_default();
            let own = frontends.remove(id).unwrap_or_default();
            let flagged = |flag: u32| own.iter().any(|(_, f)| f.flags & flag != 0);
            let ServiceStats {
                packets,
                bytes,
                new_flows,
                reply_packets,
                rejected,
                source_denied,
                ..
            } = dp.service_stats(*id)?;
            services.push(ServiceStatus {
                id: *id,
                name: service_name(meta).to_owned(),
                frontends: own.iter().map(|(k, _)| frontend_text(k)).collect(),
                table_size: meta.table_size,
                no_backends: meta.flags & SERVICE_META_F_NO_BACKENDS != 0,
                when_empty: if flagged(FRONTEND_F_REJECT_EMPTY) {
                    "reject"
                } else {
                    "drop"
                },
                // Ranges no frontend asks for (being added or removed) admit nobody
                // extra: show what is enforced.
                source_ranges: if flagged(FRONTEND_F_SOURCE_RANGES) {
                    ranges.remove(id).unwrap_or_default()
                } else {
                    Vec::new()
                },
                backends: backend_statuses(backends.get(id).map_or(&[], Vec::as_slice), &table),
                packets,
                bytes,
                new_flows,
                reply_packets,
                rejected,
                source_denied,
            });
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let reasons: Vec<(String, u64)> = dp
            .reason_stats()?
            .into_iter()
            .filter(|(_, s)| s.packets > 0)
            .map(|(r, s)| (r.name().to_owned(), s.packets))
            .collect();
        let exhausted = reasons
            .iter()
            .find(|(r, _)| r == Reason::DropSnatExhausted.name())
            .map_or(0, |(_, n)| *n);
        Ok(Report {
            pin_dir: dir.to_path_buf(),
            interfaces: pins::pinned_interfaces(dir),
            services,
            reasons,
            snat: snat_status(&dp, exhausted)?,
        })
    }
}

/// The SNAT section, from the settings and reservation maps; `None` while no agent has
/// written the settings (an empty range).
fn snat_status(dp: &Dataplane, exhausted: u64) -> Result<Option<SnatStatus>, DataplaneError> {
    let cfg = dp.snat_config()?;
    if cfg == lb_common::SnatConfig::default() {
        return Ok(None);
    }
    let per_backend = snat::range_size(&cfg);
    let usage = snat::usage(&dp.snat_reservations()?, snat::now_ns());
    let mut backends: Vec<SnatBackendStatus> = usage
        .per_backend
        .iter()
        .map(|(backend, held)| SnatBackendStatus {
            backend: backend.to_string(),
            held: held.held,
            reusable: held.reusable,
            full: held.held - held.reusable >= u64::from(per_backend),
        })
        .collect();
    backends.sort_by(|a, b| b.held.cmp(&a.held).then_with(|| a.backend.cmp(&b.backend)));
    Ok(Some(SnatStatus {
        address_v4: cfg
            .addr(lb_common::FAMILY_V4)
            .map(|a| std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()),
        address_v6: cfg
            .addr(lb_common::FAMILY_V6)
            .map(|a| std::net::Ipv6Addr::from(a).to_string()),
        port_min: cfg.port_min,
        port_max: cfg.port_max,
        ports_per_backend: per_backend,
        held: usage.held,
        reusable: usage.reusable,
        idle: usage.idle,
        exhausted,
        backends,
    }))
}

use crate::metrics::frontend_text;

/// A backend as the snapshot has it: id, metadata, filled slot.
type BackendEntry = (u32, BackendMeta, Option<Backend>);

/// A service's backends with their share of its Maglev table.
fn backend_statuses(backends: &[&BackendEntry], table: &[u32]) -> Vec<BackendStatus> {
    let mut slots: BTreeMap<u32, usize> = BTreeMap::new();
    for backend_id in table {
        *slots.entry(*backend_id).or_default() += 1;
    }
    backends
        .iter()
        .map(|(bid, m, filled)| BackendStatus {
            id: *bid,
            endpoint: meta_endpoint(m).to_string(),
            weight: m.weight,
            health: match m.health {
                HEALTH_UP => "up",
                HEALTH_DOWN => "down",
                _ => "unchecked",
            },
            forwarding: filled.is_some(),
            #[expect(clippy::cast_precision_loss, reason = "a fraction for display")]
            share: slots.get(bid).copied().unwrap_or(0) as f64 / table.len().max(1) as f64,
        })
        .collect()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let interfaces = if self.interfaces.is_empty() {
            "none (not attached)".to_owned()
        } else {
            self.interfaces.join(", ")
        };
        writeln!(
            f,
            "xlb status ({}): XDP on {interfaces}",
            self.pin_dir.display()
        )?;
        if self.services.is_empty() {
            writeln!(f, "no services")?;
        }
        for s in &self.services {
            writeln!(f)?;
            writeln!(
                f,
                "service {} (id {}): {}  table {}{}",
                s.name,
                s.id,
                s.frontends.join(", "),
                s.table_size,
                match (s.no_backends, s.when_empty) {
                    (false, _) => "",
                    (true, "reject") => "  NO BACKENDS: new connections are rejected",
                    (true, _) => "  NO BACKENDS: new connections are dropped",
                }
            )?;
            if !s.source_ranges.is_empty() {
                writeln!(f, "  source ranges {}", s.source_ranges.join(", "))?;
            }
            write!(
                f,
                "  packets {}  bytes {}  new flows {}  reply packets {}",
                s.packets, s.bytes, s.new_flows, s.reply_packets
            )?;
            if s.when_empty == "reject" {
                write!(f, "  rejected {}", s.rejected)?;
            }
            if !s.source_ranges.is_empty() {
                write!(f, "  outside source ranges {}", s.source_denied)?;
            }
            writeln!(f)?;
            writeln!(
                f,
                "  {:<28} {:>6} {:<10} {:<10} {:>7}",
                "BACKEND", "WEIGHT", "HEALTH", "FORWARDING", "SHARE"
            )?;
            for b in &s.backends {
                writeln!(
                    f,
                    "  {:<28} {:>6} {:<10} {:<10} {:>6.1}%",
                    b.endpoint,
                    b.weight,
                    b.health,
                    if b.forwarding { "yes" } else { "no" },
                    b.share * 100.0
                )?;
            }
        }
        if let Some(snat) = &self.snat {
            writeln!(f)?;
            write!(f, "{snat}")?;
        }
        if !self.reasons.is_empty() {
            writeln!(f)?;
            writeln!(f, "verdicts (packets):")?;
            for (reason, n) in &self.reasons {
                writeln!(f, "  {reason:<24} {n}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for SnatStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = |addr: &Option<String>, name: &str| {
            addr.clone()
                .unwrap_or_else(|| format!("no {name} address (drop_no_snat_address)"))
        };
        writeln!(
            f,
            "SNAT from {}, {}; ports {}-{} ({} per backend address, port and protocol)",
            family(&self.address_v4, "IPv4"),
            family(&self.address_v6, "IPv6"),
            self.port_min,
            self.port_max,
            self.ports_per_backend
        )?;
        writeln!(
            f,
            "  ports held {} (reusable when none is free {})  idle past their timeout {}  new \
             flows dropped for no free port (drop_snat_exhausted) {}",
            self.held, self.reusable, self.idle, self.exhausted
        )?;
        if !self.backends.is_empty() {
            writeln!(f, "  {:<40} {:>13}", "BACKEND", "PORTS HELD")?;
            for b in &self.backends {
                writeln!(
                    f,
                    "  {:<40} {:>6} of {:<5}{}",
                    b.backend,
                    b.held,
                    self.ports_per_backend,
                    if b.full {
                        "  FULL: new flows to it from this node are dropped"
                    } else {
                        ""
                    }
                )?;
            }
        }
        Ok(())
    }
}

/// `lb-agent status --stats`: rates over an interval, per service (its frontends share
/// its counters: the kernel counts per service) and per backend, like
/// `ipvsadm --list --stats --rate`.
#[derive(Debug, Serialize)]
pub struct Rates {
    pub interval_s: f64,
    pub services: Vec<ServiceRates>,
}

#[derive(Debug, Serialize)]
pub struct ServiceRates {
    pub name: String,
    pub frontends: Vec<String>,
    /// New flows (connections) per second.
    pub conns_per_s: f64,
    /// Client -> backend packets and bytes per second.
    pub in_packets_per_s: f64,
    pub in_bytes_per_s: f64,
    /// Backend -> client (replies) packets and bytes per second.
    pub out_packets_per_s: f64,
    pub out_bytes_per_s: f64,
    /// Totals at the end of the interval.
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub backends: Vec<BackendRates>,
}

#[derive(Debug, Serialize)]
pub struct BackendRates {
    pub endpoint: String,
    pub conns_per_s: f64,
    pub conns: u64,
}

impl Rates {
    /// Reads the counters under `dir` twice, `interval` apart.
    pub fn measure(dir: &Path, interval: std::time::Duration) -> Result<Rates, DataplaneError> {
        if !dir.join(lb_common::maps::FRONTENDS).exists() {
            return Err(DataplaneError::Pin {
                path: dir.to_path_buf(),
                reason: "nothing pinned here: no agent has run with this --bpffs directory".into(),
            });
        }
        let dp = Dataplane::open_pinned(dir)?;
        let read = |dp: &Dataplane| -> Result<_, DataplaneError> {
            let services = dp.services_in_use()?;
            let mut stats = BTreeMap::new();
            for (id, _) in &services {
                stats.insert(*id, dp.service_stats(*id)?);
            }
            let mut backends = BTreeMap::new();
            for (id, meta, _) in dp.backends_in_use()? {
                if stats.contains_key(&meta.service_id) {
                    backends.insert(id, (meta, dp.backend_new_flows(id)?));
                }
            }
            Ok((services, stats, backends, std::time::Instant::now()))
        };
        let (_, before, backends_before, t0) = read(&dp)?;
        std::thread::sleep(interval);
        let (services, after, backends_after, t1) = read(&dp)?;
        let secs = t1.duration_since(t0).as_secs_f64().max(1e-3);
        #[expect(clippy::cast_precision_loss, reason = "rates for display")]
        let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let mut frontends: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (key, value) in dp.frontends()? {
            frontends
                .entry(value.service_id)
                .or_default()
                .push(frontend_text(&key));
        }
        let mut out = Vec::new();
        for (id, meta) in &services {
            let now = after.get(id).copied().unwrap_or_default();
            // A service that appeared meanwhile starts from zero.
            let was = before.get(id).copied().unwrap_or_default();
            let backends = backends_after
                .iter()
                .filter(|(_, (m, _))| m.service_id == *id)
                .map(|(bid, (m, n))| {
                    let old = backends_before
                        .get(bid)
                        .filter(|(om, _)| om == m)
                        .map_or(0, |(_, n)| *n);
                    BackendRates {
                        endpoint: meta_endpoint(m).to_string(),
                        conns_per_s: rate(old, *n),
                        conns: *n,
                    }
                })
                .collect();
            out.push(ServiceRates {
                name: service_name(meta).to_owned(),
                frontends: frontends.remove(id).unwrap_or_default(),
                conns_per_s: rate(was.new_flows, now.new_flows),
                in_packets_per_s: rate(was.packets, now.packets),
                in_bytes_per_s: rate(was.bytes, now.bytes),
                out_packets_per_s: rate(was.reply_packets, now.reply_packets),
                out_bytes_per_s: rate(was.reply_bytes, now.reply_bytes),
                conns: now.new_flows,
                in_packets: now.packets,
                out_packets: now.reply_packets,
                backends,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Rates {
            interval_s: secs,
            services: out,
        })
    }
}

impl fmt::Display for Rates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "rates over {:.1}s (new flows = connections)",
            self.interval_s
        )?;
        writeln!(
            f,
            "{:<36} {:>9} {:>10} {:>12} {:>10} {:>12} {:>10}",
            "SERVICE / FRONTENDS",
            "CONNS/S",
            "INPKTS/S",
            "INBYTES/S",
            "OUTPKTS/S",
            "OUTBYTES/S",
            "CONNS"
        )?;
        if self.services.is_empty() {
            writeln!(f, "no services")?;
        }
        for s in &self.services {
            writeln!(
                f,
                "{:<36} {:>9.1} {:>10.1} {:>12.1} {:>10.1} {:>12.1} {:>10}",
                s.name,
                s.conns_per_s,
                s.in_packets_per_s,
                s.in_bytes_per_s,
                s.out_packets_per_s,
                s.out_bytes_per_s,
                s.conns
            )?;
            for fe in &s.frontends {
                writeln!(f, "  {fe}")?;
            }
            for b in &s.backends {
                writeln!(
                    f,
                    "  -> {:<31} {:>9.1} {:>10} {:>12} {:>10} {:>12} {:>10}",
                    b.endpoint, b.conns_per_s, "", "", "", "", b.conns
                )?;
            }
        }
        Ok(())
    }
}
