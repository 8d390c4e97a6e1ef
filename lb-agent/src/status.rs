//! `lb-agent status`: what the data plane is doing, read from the pinned maps alone,
//! so it works while an agent runs, after it stopped, and after it crashed.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use lb_common::{
    Backend, BackendMeta, FRONTEND_F_REJECT_EMPTY, FRONTEND_F_SOURCE_RANGES, Frontend, FrontendKey,
    HEALTH_DOWN, HEALTH_UP, PROTO_TCP, SERVICE_META_F_NO_BACKENDS, ServiceStats,
};
use serde::Serialize;

use crate::dataplane::{Dataplane, DataplaneError, pins};
use lb_core::plan::{meta_endpoint, service_name};

#[derive(Debug, Serialize)]
pub struct Report {
    pub pin_dir: PathBuf,
    /// Interfaces with a pinned XDP link.
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Verdict counters over all services: (reason, packets).
    pub reasons: Vec<(String, u64)>,
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
        let reasons = dp
            .reason_stats()?
            .into_iter()
            .filter(|(_, s)| s.packets > 0)
            .map(|(r, s)| (r.name().to_owned(), s.packets))
            .collect();
        Ok(Report {
            pin_dir: dir.to_path_buf(),
            interfaces: pins::pinned_interfaces(dir),
            services,
            reasons,
        })
    }
}

/// `203.0.113.10:80/TCP`, `[2001:db8:f::10]:53/UDP`.
fn frontend_text(key: &FrontendKey) -> String {
    use lb_common::sock::PROTO_F_IN_CLUSTER;
    let endpoint = meta_endpoint(&BackendMeta {
        addr: key.addr,
        port: key.port,
        family: key.family,
        ..Default::default()
    });
    let proto = if key.proto & !PROTO_F_IN_CLUSTER == PROTO_TCP {
        "TCP"
    } else {
        "UDP"
    };
    let scope = if key.proto & PROTO_F_IN_CLUSTER != 0 {
        " (in-cluster)"
    } else {
        ""
    };
    format!("{endpoint}/{proto}{scope}")
}

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
