//! Data-plane metrics on `/metrics`: a prometheus-client collector that reads the
//! pinned maps when it is scraped (per-CPU counters summed then), never on the writer's
//! path, and the reconcile-lag histogram the agent loop feeds.
//!
//! Series (all prefixed `xlb_`): per service `service_packets_total`,
//! `service_bytes_total` (`direction` = `to_backend` | `to_client`),
//! `service_new_flows_total`, `service_rejected_flows_total`,
//! `service_source_denied_flows_total`; `frontend_info` (service -> frontend);
//! per backend `backend_new_flows_total`, `backend_up` and `backend_draining`; `xdp_packets_total` and
//! `xdp_bytes_total` by `reason` and `verdict`; `table_entries` and `table_capacity`
//! by `table`; `dataplane_metrics_up`; `metrics_backends_omitted`;
//! `reconcile_lag_seconds`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use lb_common::{BackendMeta, FrontendKey, HEALTH_DOWN, PROTO_TCP, Reason, maps, reason};
use lb_core::plan::{meta_endpoint, service_name};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Unit;

use crate::dataplane::Dataplane;

/// Default cap on per-backend series (`--metrics-max-backends`).
pub const DEFAULT_MAX_BACKENDS: usize = 1000;

/// Where the collector finds the maps, and its open handles.
#[derive(Debug, Default)]
pub struct DataplaneMetrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    dir: Option<PathBuf>,
    max_backends: usize,
    /// Opened at the first scrape after the agent pinned its maps.
    dp: Option<Dataplane>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("dir", &self.dir)
            .field("max_backends", &self.max_backends)
            .field("open", &self.dp.is_some())
            .finish()
    }
}

impl DataplaneMetrics {
    /// Reads the maps pinned under `dir` from now on; at most `max_backends` backends
    /// get their own series.
    pub fn watch(&self, dir: &Path, max_backends: usize) {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.dir = Some(dir.to_path_buf());
        inner.max_backends = max_backends;
        inner.dp = None;
    }

    /// The pin directory, once the agent has a data plane.
    pub fn dir(&self) -> Option<PathBuf> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .dir
            .clone()
    }

    /// Runs `f` with the opened maps (opening them first when needed); `None` when the
    /// agent has no data plane or the maps cannot be opened.
    pub fn with<T>(&self, f: impl FnOnce(&Dataplane) -> T) -> Option<T> {
        let mut inner = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if inner.dp.is_none() {
            let dir = inner.dir.clone()?;
            if !dir.join(maps::FRONTENDS).exists() {
                return None;
            }
            match Dataplane::open_pinned(&dir) {
                Ok(dp) => inner.dp = Some(dp),
                Err(e) => {
                    tracing::warn!("metrics: opening the pinned maps: {e}");
                    return None;
                }
            }
        }
        inner.dp.as_ref().map(f)
    }
}

/// Everything one scrape reads, so the maps are read before anything is encoded.
#[derive(Default)]
struct Scrape {
    services: Vec<ServiceRow>,
    frontends: Vec<(String, String)>,
    backends: Vec<BackendRow>,
    omitted: u64,
    reasons: Vec<(Reason, u64, u64)>,
    tables: Vec<(&'static str, u64, u64)>,
}

struct ServiceRow {
    name: String,
    stats: lb_common::ServiceStats,
}

struct BackendRow {
    service: String,
    backend: String,
    new_flows: u64,
    up: Option<bool>,
    /// Weight 0: new flows go elsewhere, open ones stay (`None` for `other`).
    draining: Option<bool>,
}

fn read(dp: &Dataplane, max_backends: usize) -> Result<Scrape, crate::dataplane::DataplaneError> {
    let mut scrape = Scrape::default();
    let services = dp.services_in_use()?;
    let names: std::collections::HashMap<u32, String> = services
        .iter()
        .map(|(id, meta)| (*id, service_name(meta).to_owned()))
        .collect();
    for (id, _) in &services {
        scrape.services.push(ServiceRow {
            name: names[id].clone(),
            stats: dp.service_stats(*id)?,
        });
    }
    for (key, value) in dp.frontends()? {
        if let Some(name) = names.get(&value.service_id) {
            scrape.frontends.push((name.clone(), frontend_text(&key)));
        }
    }
    // Beyond the cap, a service's remaining backends are summed into one series with
    // `backend="other"`, so per-service sums stay right and the series stay bounded.
    let mut other: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for (i, (id, meta, _)) in dp.backends_in_use()?.iter().enumerate() {
        let Some(service) = names.get(&meta.service_id) else {
            continue;
        };
        let new_flows = dp.backend_new_flows(*id)?;
        if i < max_backends {
            scrape.backends.push(BackendRow {
                service: service.clone(),
                backend: meta_endpoint(meta).to_string(),
                new_flows,
                up: Some(meta.health != HEALTH_DOWN),
                draining: Some(meta.weight == 0),
            });
        } else {
            scrape.omitted += 1;
            *other.entry(service.clone()).or_default() += new_flows;
        }
    }
    scrape
        .backends
        .extend(other.into_iter().map(|(service, new_flows)| BackendRow {
            service,
            backend: "other".into(),
            new_flows,
            up: None,
            draining: None,
        }));
    scrape.reasons = dp
        .reason_stats()?
        .into_iter()
        .map(|(r, s)| (r, s.packets, s.bytes))
        .collect();
    for (table, map) in [
        ("conntrack", maps::FLOWS),
        ("conntrack_pairs", maps::CONNTRACK),
        ("revnat", maps::REVNAT),
        ("affinity", maps::AFFINITY),
        ("snat", maps::SNAT),
    ] {
        let fill = dp.table_fill(map)?;
        scrape.tables.push((table, fill.entries, fill.capacity));
    }
    Ok(scrape)
}

/// `203.0.113.10:80/TCP`, `[2001:db8::10]:53/UDP`.
pub fn frontend_text(key: &FrontendKey) -> String {
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
    // The entries the socket hooks alone read (externalTrafficPolicy: Local from inside).
    let scope = if key.proto & PROTO_F_IN_CLUSTER != 0 {
        " (in-cluster)"
    } else {
        ""
    };
    format!("{endpoint}/{proto}{scope}")
}

/// The verdict label of a reason: `pass`, `drop`, `tx`, `redirect`, `aborted`.
pub fn verdict(reason: Reason) -> &'static str {
    match reason.action() {
        reason::XDP_DROP => "drop",
        reason::XDP_PASS => "pass",
        reason::XDP_TX => "tx",
        reason::XDP_REDIRECT => "redirect",
        _ => "aborted",
    }
}

fn counter<S: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (S, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, value) in rows {
        metric
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None)?;
    }
    Ok(())
}

fn gauge<S: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (S, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        metric.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// A gauge without labels.
fn gauge1(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for DataplaneMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let max_backends = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .max_backends;
        let scrape = match self.with(|dp| read(dp, max_backends)) {
            None => None,
            Some(Ok(scrape)) => Some(scrape),
            Some(Err(e)) => {
                tracing::warn!("metrics: reading the maps: {e}");
                None
            }
        };
        gauge1(
            &mut encoder,
            "dataplane_metrics_up",
            "1 when this scrape read the data plane's maps",
            i64::from(scrape.is_some()),
        )?;
        // Without maps every family is still described (no samples): the set of names
        // `/metrics` offers does not depend on the moment of the scrape.
        let s = scrape.unwrap_or_default();
        encode_services(&mut encoder, &s)?;
        encode_backends(&mut encoder, &s)?;
        encode_kernel(&mut encoder, &s)
    }
}

fn encode_services(encoder: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let svc = |name: &str| [("service", name.to_owned())];
    counter(
        encoder,
        "service_packets",
        "Packets translated per service: to_backend (client -> backend), to_client (replies)",
        None,
        s.services.iter().flat_map(|r| {
            [
                (dir_labels(&r.name, "to_backend"), r.stats.packets),
                (dir_labels(&r.name, "to_client"), r.stats.reply_packets),
            ]
        }),
    )?;
    counter(
        encoder,
        "service",
        "Bytes (whole frames) translated per service and direction",
        Some(&Unit::Bytes),
        s.services.iter().flat_map(|r| {
            [
                (dir_labels(&r.name, "to_backend"), r.stats.bytes),
                (dir_labels(&r.name, "to_client"), r.stats.reply_bytes),
            ]
        }),
    )?;
    counter(
        encoder,
        "service_new_flows",
        "Flows that got a backend (new or re-selected) per service",
        None,
        s.services.iter().map(|r| (svc(&r.name), r.stats.new_flows)),
    )?;
    counter(
        encoder,
        "service_rejected_flows",
        "New flows answered with a TCP reset or ICMP unreachable (no backend, whenEmpty reject)",
        None,
        s.services.iter().map(|r| (svc(&r.name), r.stats.rejected)),
    )?;
    counter(
        encoder,
        "service_source_denied_flows",
        "New flows dropped because the client is outside the service's source ranges",
        None,
        s.services
            .iter()
            .map(|r| (svc(&r.name), r.stats.source_denied)),
    )?;
    gauge(
        encoder,
        "frontend_info",
        "1 per frontend (address:port/protocol) of a service; the kernel counts per service",
        s.frontends.iter().map(|(service, frontend)| {
            (
                [("service", service.clone()), ("frontend", frontend.clone())],
                1,
            )
        }),
    )?;
    Ok(())
}

fn encode_backends(encoder: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    counter(
        encoder,
        "backend_new_flows",
        "Flows that got this backend (new or re-selected); backend=\"other\" sums those beyond --metrics-max-backends",
        None,
        s.backends.iter().map(|b| {
            (
                [
                    ("service", b.service.clone()),
                    ("backend", b.backend.clone()),
                ],
                b.new_flows,
            )
        }),
    )?;
    let flag = |of: fn(&BackendRow) -> Option<bool>| {
        s.backends.iter().filter_map(move |b| {
            of(b).map(|on| {
                (
                    [
                        ("service", b.service.clone()),
                        ("backend", b.backend.clone()),
                    ],
                    i64::from(on),
                )
            })
        })
    };
    gauge(
        encoder,
        "backend_up",
        "1 while the backend passes its health checks (or has none), 0 while it is down",
        flag(|b| b.up),
    )?;
    gauge(
        encoder,
        "backend_draining",
        "1 while the backend gets no new flows but keeps its open ones (weight 0: a not-ready or terminating endpoint, or the weight annotation), else 0",
        flag(|b| b.draining),
    )?;
    gauge1(
        encoder,
        "metrics_backends_omitted",
        "Backends beyond --metrics-max-backends, counted in backend=\"other\" series",
        as_i64(s.omitted),
    )?;
    Ok(())
}

fn encode_kernel(encoder: &mut DescriptorEncoder, s: &Scrape) -> Result<(), std::fmt::Error> {
    let reason_labels = |r: Reason| {
        [
            ("reason", r.name().to_owned()),
            ("verdict", verdict(r).to_owned()),
        ]
    };
    counter(
        encoder,
        "xdp_packets",
        "Packets the XDP program saw, by the reason of its verdict (every exit counts once)",
        None,
        s.reasons.iter().map(|(r, p, _)| (reason_labels(*r), *p)),
    )?;
    counter(
        encoder,
        "xdp",
        "Bytes (whole frames) the XDP program saw, by reason and verdict",
        Some(&Unit::Bytes),
        s.reasons.iter().map(|(r, _, b)| (reason_labels(*r), *b)),
    )?;
    gauge(
        encoder,
        "table_entries",
        "Entries in an LRU table (conntrack: one per flow; conntrack_pairs and revnat: the flows whose client port has another; affinity, snat), counted at scrape time",
        s.tables
            .iter()
            .map(|(t, n, _)| ([("table", (*t).to_owned())], as_i64(*n))),
    )?;
    gauge(
        encoder,
        "table_capacity",
        "Entries an LRU table holds before it evicts the least recently used",
        s.tables
            .iter()
            .map(|(t, _, c)| ([("table", (*t).to_owned())], as_i64(*c))),
    )?;
    Ok(())
}

fn dir_labels(service: &str, direction: &'static str) -> [(&'static str, String); 2] {
    [
        ("service", service.to_owned()),
        ("direction", direction.to_owned()),
    ]
}

/// Time from a change the source saw to the map writes that carry it.
#[derive(Debug)]
pub struct ReconcileLag {
    /// The earliest change not yet in the maps.
    pending: Mutex<Option<Instant>>,
    pub histogram: Histogram,
}

impl Default for ReconcileLag {
    fn default() -> Self {
        ReconcileLag {
            pending: Mutex::new(None),
            // 0.5 ms .. ~16 s.
            histogram: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

impl ReconcileLag {
    /// A source saw a change at `at` that changed the desired state.
    pub fn changed(&self, at: Instant) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *pending = Some(pending.map_or(at, |p| p.min(at)));
    }

    /// The writer takes the pending change with the desired state it plans.
    pub fn take(&self) -> Option<Instant> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// The writes for the change seen at `since` succeeded.
    pub fn applied(&self, since: Option<Instant>) {
        if let Some(since) = since {
            self.histogram.observe(since.elapsed().as_secs_f64());
        }
    }

    /// The writes failed: the change is still pending.
    pub fn failed(&self, since: Option<Instant>) {
        if let Some(since) = since {
            self.changed(since);
        }
    }
}
