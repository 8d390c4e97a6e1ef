//! The difference between the desired state and what the maps hold, as an ordered
//! list of map writes. Pure: the writer executes the ops and mirrors each successful
//! one into `Applied`, so `Applied` always equals the maps.
//!
//! Order makes every change hitless (a packet never meets a half-written service):
//! 0. address pre-filter bits that any frontend or backend will need during the plan;
//! 1. new services' metadata;
//! 2. backends that will be needed (slot and metadata);
//! 3. each changed Maglev table swapped whole, then the new digests recorded;
//! 4. source ranges added;
//! 5. frontends added or changed;
//! 6. frontends removed;
//! 7. source ranges no frontend needs any more;
//! 8. what nothing uses any more: tables of removed services, backend slots (their
//!    tracked flows are re-selected), metadata;
//! 9. address pre-filter bits that nothing needs any more.
//!
//! At every step, every id in an installed table names a filled slot of its service,
//! and a client admitted by a service's source ranges both before and after a change
//! is admitted throughout (new ranges go in before a frontend requires them, old ones
//! leave after).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;
use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend, BackendMeta,
    FRONTEND_F_CLIENT_AFFINITY, FRONTEND_F_DSR, FRONTEND_F_REJECT_EMPTY, FRONTEND_F_SNAT,
    FRONTEND_F_SOURCE_RANGES, Frontend, FrontendKey, HEALTH_DOWN, HEALTH_UNCHECKED, HEALTH_UP,
    PROTO_TCP, PROTO_UDP, SERVICE_META_F_IN_USE, SERVICE_META_F_NO_BACKENDS, SERVICE_NAME_LEN,
    ServiceMeta, addr_filter_slot, addr_key,
    maps::{MAX_BACKENDS, MAX_SERVICES},
};

use crate::config::{FrontendSpec, Protocol};
use crate::maglev;
use crate::model::{BackendModel, Desired, Endpoint, Health, ServiceModel, WhenEmpty};

mod applied;
pub use applied::Applied;
#[cfg(test)]
use applied::IdPool;
use applied::{IdOrder, Ids};

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    SetServiceMeta {
        id: u32,
        /// Boxed: the name makes it the largest value, and a 10,000-service plan holds
        /// 250,000 ops.
        meta: Box<ServiceMeta>,
    },
    /// Zeroes a (recycled) service id's counters.
    ResetStats {
        id: u32,
    },
    /// Fills backend slot `id`: the data plane forwards to it.
    SetBackend {
        id: u32,
        backend: Backend,
    },
    SetBackendMeta {
        id: u32,
        meta: BackendMeta,
    },
    /// Swaps in a service's whole Maglev table.
    SetTable {
        service_id: u32,
        table: Vec<u32>,
    },
    RemoveTable {
        service_id: u32,
    },
    SetFrontend {
        key: FrontendKey,
        value: Frontend,
    },
    RemoveFrontend {
        key: FrontendKey,
    },
    /// Empties backend slot `id`: flows tracked to it are re-selected.
    RemoveBackend {
        id: u32,
    },
    ClearBackendMeta {
        id: u32,
    },
    ClearServiceMeta {
        id: u32,
    },
    /// Admits clients in `range` to new flows of the service (`loadBalancerSourceRanges`).
    AddSourceRange {
        service_id: u32,
        range: IpNet,
    },
    RemoveSourceRange {
        service_id: u32,
        range: IpNet,
    },
    /// Sets address pre-filter slot `slot` (`addr_filter_slot`) to `bits` (`ADDR_F_*`):
    /// the program looks up only addresses whose slot has the bit.
    SetAddrFilter {
        slot: u32,
        bits: u8,
    },
}

/// The name stored in a service's metadata.
pub fn service_name(meta: &ServiceMeta) -> &str {
    let end = meta
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(SERVICE_NAME_LEN);
    std::str::from_utf8(&meta.name[..end]).unwrap_or("<invalid name>")
}

/// The endpoint a backend's metadata describes.
pub fn meta_endpoint(meta: &BackendMeta) -> Endpoint {
    let addr = if meta.family == lb_common::FAMILY_V6 {
        std::net::IpAddr::from(meta.addr)
    } else {
        std::net::IpAddr::from([meta.addr[0], meta.addr[1], meta.addr[2], meta.addr[3]])
    };
    Endpoint {
        addr,
        port: u16::from_be(meta.port),
    }
}

/// What could not be planned; the rest of the plan still applies.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("service {service}: no free service id (at most {max} services)", max = MAX_SERVICES - 1)]
    NoServiceId { service: String },
    #[error("service {service}: no free backend id for {endpoint} (at most {max} backends)", max = MAX_BACKENDS - 1)]
    NoBackendId { service: String, endpoint: Endpoint },
    #[error("service {service}: name longer than {SERVICE_NAME_LEN} bytes")]
    NameTooLong { service: String },
    #[error("service {service}: {source}")]
    Maglev {
        service: String,
        source: maglev::MaglevError,
    },
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub ops: Vec<Op>,
    pub errors: Vec<PlanError>,
    /// The services this plan looked at: `Some(model)` when the ops bring it to that
    /// model without error, `None` when it is removed or had an error. See
    /// [`Applied::conclude`].
    pub settled: Vec<(String, Option<Arc<ServiceModel>>)>,
}

/// The frontend key of a spec.
pub fn frontend_key(spec: &FrontendSpec) -> FrontendKey {
    let (addr, family) = addr_key(spec.address);
    FrontendKey {
        addr,
        port: spec.port.to_be(),
        proto: match spec.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        } | if spec.in_cluster {
            lb_common::sock::PROTO_F_IN_CLUSTER
        } else {
            0
        },
        family,
    }
}

/// An order-sensitive 64-bit FNV-1a digest of a table; never 0 (0 means "no table").
pub fn table_digest(table: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in table.iter().flat_map(|id| id.to_le_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// Ordered phases; concatenated at the end.
#[derive(Default)]
struct Phases {
    new_services: Vec<Op>,
    backends: Vec<Op>,
    /// Digests of tables about to change, cleared.
    forget_digests: Vec<Op>,
    /// Table swaps and removals, consecutive so the writer can batch them.
    tables: Vec<Op>,
    /// Service metadata recording the new digests.
    metas: Vec<Op>,
    add_ranges: Vec<Op>,
    add_frontends: Vec<Op>,
    remove_frontends: Vec<Op>,
    remove_ranges: Vec<Op>,
    cleanup_tables: Vec<Op>,
    cleanup_backends: Vec<Op>,
    cleanup_services: Vec<Op>,
}

impl Phases {
    /// The ops in their hitless order.
    fn into_ops(self) -> Vec<Op> {
        let Phases {
            new_services,
            backends,
            forget_digests,
            tables,
            metas,
            add_ranges,
            add_frontends,
            remove_frontends,
            remove_ranges,
            cleanup_tables,
            cleanup_backends,
            cleanup_services,
        } = self;
        // Down backends leave their slot only after the tables no longer name them.
        let (late, early): (Vec<Op>, Vec<Op>) = backends
            .into_iter()
            .partition(|op| matches!(op, Op::RemoveBackend { .. }));
        let phases = [
            early,
            forget_digests,
            tables,
            metas,
            add_ranges,
            add_frontends,
            remove_frontends,
            remove_ranges,
            late,
            cleanup_tables,
            cleanup_backends,
            cleanup_services,
        ];
        let mut ops = new_services;
        ops.reserve(phases.iter().map(Vec::len).sum());
        for phase in phases {
            ops.extend(phase);
        }
        ops
    }
}

/// The writes that make the maps hold `desired`, given that they hold `applied`.
/// Services settled on the same model (the same `Arc`, or an equal one) are skipped,
/// so a change to one service among thousands plans in microseconds.
pub fn plan(desired: &Desired, applied: &Applied) -> Plan {
    let mut planner = Planner {
        applied,
        phases: Phases::default(),
        errors: Vec::new(),
        settled: Vec::new(),
        service_ids: applied
            .index
            .service_ids
            .allocator(MAX_SERVICES, IdOrder::Lowest),
        backend_ids: applied
            .index
            .backend_ids
            .allocator(MAX_BACKENDS, IdOrder::AboveFirst),
        wanted_frontends: BTreeSet::new(),
        loose_frontends: BTreeSet::new(),
        pending: Vec::new(),
    };
    // Desired, applied names and settled models are all sorted by name: one merge pass.
    let mut names = applied.index.names.iter().peekable();
    let mut settled = applied.index.settled.iter().peekable();
    for (name, service) in &desired.services {
        while let Some((gone, &id)) = names.next_if(|(n, _)| n.as_str() < name.as_str()) {
            planner.remove_service(gone, id);
        }
        let id = names.next_if(|(n, _)| *n == name).map(|(_, &id)| id);
        while settled
            .next_if(|(n, _)| n.as_str() < name.as_str())
            .is_some()
        {}
        let before = settled.next_if(|(n, _)| *n == name).map(|(_, m)| m);
        if let Some(before) = before {
            if Arc::ptr_eq(before, service) {
                continue;
            }
            if **before == **service {
                planner
                    .settled
                    .push((name.clone(), Some(Arc::clone(service))));
                continue;
            }
        }
        planner.service(name, service, id, before.map(AsRef::as_ref));
    }
    for (gone, &id) in names {
        planner.remove_service(gone, id);
    }
    for &id in &applied.index.strays {
        planner.remove_stray(id);
    }
    planner.finish()
}

/// One plan under construction.
struct Planner<'a> {
    applied: &'a Applied,
    phases: Phases,
    errors: Vec<PlanError>,
    settled: Vec<(String, Option<Arc<ServiceModel>>)>,
    service_ids: Ids<'a>,
    backend_ids: Ids<'a>,
    /// Frontends the services looked at want.
    wanted_frontends: BTreeSet<FrontendKey>,
    /// Frontends of the services looked at (and of removed ones): removed unless wanted.
    loose_frontends: BTreeSet<FrontendKey>,
    /// Services whose table and metadata wait for the tables to be built.
    pending: Vec<Pending>,
}

/// A service planned but for its table and the metadata that records its digest.
struct Pending {
    name: String,
    service: Arc<ServiceModel>,
    id: u32,
    old_meta: Option<ServiceMeta>,
    /// The metadata to record, but for the digest.
    meta: ServiceMeta,
    table: TableJob,
    /// No error so far.
    clean: bool,
}

enum TableJob {
    /// This digest (0: no table) without building anything.
    Keep(u64),
    /// A table over these members (backend id, identity, weight) of this size, where
    /// the installed table has digest `installed` (0: none or unknown).
    Build {
        members: Vec<(u32, String, u32)>,
        size: u32,
        installed: u64,
    },
}

/// Below this many tables, one thread builds them.
const PARALLEL_TABLES: usize = 64;

/// The tables of the pending services that need one, in order; across the CPUs when
/// there are many (a 10,000-service sync builds 10,000 tables). Deterministic: the
/// same results in the same order whatever the thread count.
fn build_tables(pending: &[Pending]) -> Vec<Option<Result<Vec<u32>, maglev::MaglevError>>> {
    let build = |p: &Pending| match &p.table {
        TableJob::Keep(_) => None,
        TableJob::Build { members, size, .. } => {
            let input: Vec<maglev::Backend<'_>> = members
                .iter()
                .map(|(id, identity, weight)| maglev::Backend {
                    id: *id,
                    identity: identity.as_bytes(),
                    weight: *weight,
                })
                .collect();
            Some(maglev::build_table(&input, *size))
        }
    };
    let jobs = pending
        .iter()
        .filter(|p| matches!(p.table, TableJob::Build { .. }))
        .count();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if jobs < PARALLEL_TABLES || threads < 2 {
        return pending.iter().map(build).collect();
    }
    let chunk = pending.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let workers: Vec<_> = pending
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(build).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a table build panicked"))
            .collect()
    })
}

impl Planner<'_> {
    /// Plans one service (new, changed, or not known to be settled) against the maps.
    fn service(
        &mut self,
        name: &str,
        service: &Arc<ServiceModel>,
        id: Option<u32>,
        before: Option<&ServiceModel>,
    ) {
        let errors_before = self.errors.len();
        let Ok(name_bytes) = name_field(name) else {
            self.errors.push(PlanError::NameTooLong {
                service: name.to_owned(),
            });
            return;
        };
        let (id, old_meta) = if let Some(id) = id {
            (id, self.applied.services.get(&id).copied())
        } else if let Some(id) = self.service_ids.take() {
            let meta = ServiceMeta {
                name: name_bytes,
                flags: SERVICE_META_F_IN_USE,
                table_size: service.table_size,
                table_digest: 0,
            };
            self.phases.new_services.push(Op::ResetStats { id });
            self.phases.new_services.push(Op::SetServiceMeta {
                id,
                meta: Box::new(meta),
            });
            (id, Some(meta))
        } else {
            self.errors.push(PlanError::NoServiceId {
                service: name.to_owned(),
            });
            return;
        };
        let ids = self.backends(name, id, service);
        self.frontends(id, service);
        // The table and the metadata recording its digest are finished in `finish`,
        // once every table is built (in parallel when there are many).
        let table = self.table_job(id, service, &ids, old_meta, before);
        let meta = ServiceMeta {
            name: name_bytes,
            flags: SERVICE_META_F_IN_USE
                | if service.has_no_backends() {
                    SERVICE_META_F_NO_BACKENDS
                } else {
                    0
                },
            table_size: service.table_size,
            table_digest: 0,
        };
        self.pending.push(Pending {
            name: name.to_owned(),
            service: Arc::clone(service),
            id,
            old_meta,
            meta,
            table,
            clean: self.errors.len() == errors_before,
        });
    }

    /// The service's frontends, and the source ranges they admit (added before a
    /// frontend requires them, removed after).
    fn frontends(&mut self, id: u32, service: &ServiceModel) {
        let wanted: BTreeSet<IpNet> = service.source_ranges.iter().map(IpNet::trunc).collect();
        for range in &wanted {
            if !self.applied.source_ranges.contains(&(id, *range)) {
                self.phases.add_ranges.push(Op::AddSourceRange {
                    service_id: id,
                    range: *range,
                });
            }
        }
        for range in self.applied.ranges_of(id) {
            if !wanted.contains(&range) {
                self.phases.remove_ranges.push(Op::RemoveSourceRange {
                    service_id: id,
                    range,
                });
            }
        }
        for spec in &service.frontends {
            let value = frontend_value(id, service, spec.protocol);
            let key = frontend_key(spec);
            self.wanted_frontends.insert(key);
            if self.applied.frontends.get(&key) != Some(&value) {
                self.phases
                    .add_frontends
                    .push(Op::SetFrontend { key, value });
            }
        }
        self.loose_frontends.extend(self.applied.frontends_of(id));
    }

    /// Everything a service no longer in the desired state holds.
    fn remove_service(&mut self, name: &str, id: u32) {
        self.remove_stray(id);
        self.settled.push((name.to_owned(), None));
    }

    /// Everything held under `id`: frontends, table, backends, metadata.
    fn remove_stray(&mut self, id: u32) {
        self.loose_frontends.extend(self.applied.frontends_of(id));
        for range in self.applied.ranges_of(id) {
            self.phases.remove_ranges.push(Op::RemoveSourceRange {
                service_id: id,
                range,
            });
        }
        if self.applied.tables.contains(&id) {
            self.phases
                .cleanup_tables
                .push(Op::RemoveTable { service_id: id });
        }
        for backend in self.applied.backends_of(id) {
            self.remove_backend(backend);
        }
        if self.applied.services.contains_key(&id) {
            self.phases
                .cleanup_services
                .push(Op::ClearServiceMeta { id });
        }
    }

    fn remove_backend(&mut self, id: u32) {
        if self.applied.slots.contains_key(&id) {
            self.phases.cleanup_backends.push(Op::RemoveBackend { id });
        }
        self.phases
            .cleanup_backends
            .push(Op::ClearBackendMeta { id });
    }

    /// The frontends that nothing wants any more, and slots without metadata.
    fn finish(mut self) -> Plan {
        self.finish_tables();
        for key in &self.loose_frontends {
            if !self.wanted_frontends.contains(key) {
                self.phases
                    .remove_frontends
                    .push(Op::RemoveFrontend { key: *key });
            }
        }
        for &id in &self.applied.index.unowned_slots {
            self.phases.cleanup_backends.push(Op::RemoveBackend { id });
        }
        let ops = self.phases.into_ops();
        let (raise, lower) = filter_ops(self.applied, &ops);
        Plan {
            ops: [raise, ops, lower].concat(),
            errors: self.errors,
            settled: self.settled,
        }
    }

    /// What the service's table needs: the installed one kept (its input is that of
    /// the settled model), none (no backend takes new flows), or one built from these
    /// members.
    fn table_job(
        &self,
        id: u32,
        service: &ServiceModel,
        ids: &BTreeMap<Endpoint, u32>,
        old_meta: Option<ServiceMeta>,
        before: Option<&ServiceModel>,
    ) -> TableJob {
        // The recorded digest describes the table only while one is installed.
        let installed = match old_meta {
            Some(m) if self.applied.tables.contains(&id) => m.table_digest,
            _ => 0,
        };
        if installed != 0 && before.is_some_and(|b| same_table_input(b, service)) {
            return TableJob::Keep(installed);
        }
        let members: Vec<(u32, String, u32)> = service
            .backends
            .iter()
            .filter(|(_, b)| b.selectable())
            .filter_map(|(ep, b)| ids.get(ep).map(|&bid| (bid, ep.to_string(), b.weight)))
            .collect();
        if members.is_empty() {
            TableJob::Keep(0)
        } else {
            TableJob::Build {
                members,
                size: service.table_size,
                installed,
            }
        }
    }

    /// Builds every pending table, then writes each service's table and metadata ops
    /// in the order the services were planned.
    fn finish_tables(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        let mut built = build_tables(&pending).into_iter();
        for p in pending {
            let mut clean = p.clean;
            let installed = match &p.table {
                TableJob::Keep(digest) => *digest,
                TableJob::Build { installed, .. } => *installed,
            };
            let digest = match (&p.table, built.next().flatten()) {
                (TableJob::Keep(digest), _) => *digest,
                (TableJob::Build { .. }, Some(Ok(table))) => {
                    let digest = table_digest(&table);
                    if installed != digest {
                        // Until the new digest is recorded, the metadata must not claim
                        // the old one (a write interrupted in between would keep it).
                        if let Some(old) = p.old_meta.filter(|m| m.table_digest != 0) {
                            let meta = ServiceMeta {
                                table_digest: 0,
                                ..old
                            };
                            self.phases.forget_digests.push(Op::SetServiceMeta {
                                id: p.id,
                                meta: Box::new(meta),
                            });
                        }
                        self.phases.tables.push(Op::SetTable {
                            service_id: p.id,
                            table,
                        });
                    }
                    digest
                }
                (TableJob::Build { .. }, Some(Err(source))) => {
                    clean = false;
                    self.errors.push(PlanError::Maglev {
                        service: p.name.clone(),
                        source,
                    });
                    installed
                }
                (TableJob::Build { .. }, None) => unreachable!("one result per table built"),
            };
            if digest == 0 && self.applied.tables.contains(&p.id) {
                self.phases
                    .tables
                    .push(Op::RemoveTable { service_id: p.id });
            }
            let meta = ServiceMeta {
                table_digest: digest,
                ..p.meta
            };
            // A table swap cleared the recorded digest first.
            let swapped = matches!(self.phases.tables.last(), Some(Op::SetTable { service_id, .. }) if *service_id == p.id);
            if p.old_meta != Some(meta) || swapped {
                self.phases.metas.push(Op::SetServiceMeta {
                    id: p.id,
                    meta: Box::new(meta),
                });
            }
            self.settled.push((p.name, clean.then_some(p.service)));
        }
    }

    /// Plans one service's backends; returns the id of every backend it keeps, and
    /// removes the ones it no longer has.
    fn backends(
        &mut self,
        name: &str,
        service_id: u32,
        service: &ServiceModel,
    ) -> BTreeMap<Endpoint, u32> {
        let applied = self.applied;
        let mut existing: BTreeMap<Endpoint, u32> = applied
            .backends_of(service_id)
            .map(|id| (meta_endpoint(&applied.backends[&id]), id))
            .collect();
        let mut kept = BTreeMap::new();
        // Serving backends take new ids before draining ones (weight 0: not ready, or
        // terminating), so that when the ids run out a draining one, which keeps only
        // open connections, goes without rather than one that new connections need.
        let (serving, draining): (Vec<_>, Vec<_>) =
            service.backends.iter().partition(|(_, b)| b.weight > 0);
        for (endpoint, backend) in serving.into_iter().chain(draining) {
            let Some(id) = existing
                .remove(endpoint)
                .or_else(|| self.backend_ids.take())
            else {
                self.errors.push(PlanError::NoBackendId {
                    service: name.to_owned(),
                    endpoint: *endpoint,
                });
                continue;
            };
            kept.insert(*endpoint, id);
            self.backend(id, service_id, *endpoint, backend);
        }
        for id in existing.into_values() {
            self.remove_backend(id);
        }
        kept
    }

    fn backend(&mut self, id: u32, service_id: u32, endpoint: Endpoint, backend: &BackendModel) {
        let (addr, family) = addr_key(endpoint.addr);
        let meta = BackendMeta {
            addr,
            port: endpoint.port.to_be(),
            family,
            health: match backend.health {
                Health::Unchecked => HEALTH_UNCHECKED,
                Health::Up => HEALTH_UP,
                Health::Down => HEALTH_DOWN,
            },
            service_id,
            weight: backend.weight,
            _pad: 0,
        };
        let filled = self.applied.slots.get(&id);
        let slot = Backend {
            addr,
            port: meta.port,
            family,
            flags: if backend.weight == 0 {
                BACKEND_F_DRAINING
            } else {
                0
            } | if backend.local { BACKEND_F_LOCAL } else { 0 },
            service_id,
        };
        let ops = &mut self.phases.backends;
        if backend.forwarding() && filled != Some(&slot) {
            ops.push(Op::SetBackend { id, backend: slot });
        }
        if self.applied.backends.get(&id) != Some(&meta) {
            ops.push(Op::SetBackendMeta { id, meta });
        }
        if !backend.forwarding() && filled.is_some() {
            ops.push(Op::RemoveBackend { id });
        }
    }
}

/// The address pre-filter writes around `ops`: every bit a frontend or backend needs at
/// any point of `ops` is set before them (a packet may need it as soon as one is
/// written), and bits nothing needs afterwards are cleared after them. Only slots `ops`
/// touch are looked at, and those whose bits disagree with their users (an interrupted
/// plan raised them, or maps left by a crash).
fn filter_ops(applied: &Applied, ops: &[Op]) -> (Vec<Op>, Vec<Op>) {
    // Per slot touched: its users now, and every bit they needed along the way.
    let mut slots: BTreeMap<u32, ([u32; 2], u8)> = BTreeMap::new();
    let touch = |slots: &mut BTreeMap<u32, ([u32; 2], u8)>, slot: u32| {
        let users = applied.filter_users(slot);
        slots.entry(slot).or_insert((users, filter_bits(users)));
    };
    for &slot in applied.stale_filter_slots() {
        touch(&mut slots, slot);
    }
    let mut bump = |addr: &[u8; 16], which: usize, up: bool| {
        let slot = addr_filter_slot(addr);
        touch(&mut slots, slot);
        let (users, needed) = slots.get_mut(&slot).expect("touched");
        if up {
            users[which] += 1;
        } else {
            users[which] = users[which].saturating_sub(1);
        }
        *needed |= filter_bits(*users);
    };
    // What `ops` change of what `applied` holds, as far as the filter cares.
    let mut frontends: BTreeMap<FrontendKey, bool> = BTreeMap::new();
    let mut filled: BTreeMap<u32, Option<[u8; 16]>> = BTreeMap::new();
    for op in ops {
        match op {
            Op::SetFrontend { key, .. } | Op::RemoveFrontend { key } => {
                let set = matches!(op, Op::SetFrontend { .. });
                let was = *frontends
                    .entry(*key)
                    .or_insert_with(|| applied.frontends.contains_key(key));
                if was != set {
                    bump(&key.addr, 0, set);
                    frontends.insert(*key, set);
                }
            }
            Op::SetBackend { id, .. } | Op::RemoveBackend { id } => {
                let new = match op {
                    Op::SetBackend { backend, .. } => Some(backend.addr),
                    _ => None,
                };
                let old = *filled
                    .entry(*id)
                    .or_insert_with(|| applied.slots.get(id).map(|b| b.addr));
                if old != new {
                    if let Some(old) = old {
                        bump(&old, 1, false);
                    }
                    if let Some(new) = new {
                        bump(&new, 1, true);
                    }
                    filled.insert(*id, new);
                }
            }
            _ => {}
        }
    }
    let (mut raise, mut lower) = (Vec::new(), Vec::new());
    for (slot, (users, needed)) in slots {
        let now = applied.filter.get(&slot).copied().unwrap_or(0);
        let during = now | needed;
        if during != now {
            raise.push(Op::SetAddrFilter { slot, bits: during });
        }
        let after = filter_bits(users);
        if after != during {
            lower.push(Op::SetAddrFilter { slot, bits: after });
        }
    }
    (raise, lower)
}

/// The pre-filter bits of a slot used by `users[0]` frontends and `users[1]` backends.
pub fn filter_bits(users: [u32; 2]) -> u8 {
    (if users[0] > 0 { ADDR_F_FRONTEND } else { 0 }) | if users[1] > 0 { ADDR_F_BACKEND } else { 0 }
}

/// The frontend value of a service's frontends of `protocol`.
fn frontend_value(id: u32, service: &ServiceModel, protocol: Protocol) -> Frontend {
    let mut flags = 0;
    if service.affinity_timeout_s.is_some() {
        flags |= FRONTEND_F_CLIENT_AFFINITY;
    }
    if service.when_empty == WhenEmpty::Reject {
        flags |= FRONTEND_F_REJECT_EMPTY;
    }
    if !service.source_ranges.is_empty() {
        flags |= FRONTEND_F_SOURCE_RANGES;
    }
    // Both: hybrid, DSR for TCP and SNAT for UDP.
    let tcp = protocol == Protocol::Tcp;
    if service.dsr && (tcp || !service.snat) {
        flags |= FRONTEND_F_DSR;
    } else if service.snat {
        flags |= FRONTEND_F_SNAT;
    }
    Frontend {
        service_id: id,
        flags,
        affinity_timeout_s: service.affinity_timeout_s.unwrap_or(0),
        _pad: 0,
    }
}

/// The two models give the same Maglev table: the same selectable backends, weights
/// and size.
fn same_table_input(a: &ServiceModel, b: &ServiceModel) -> bool {
    let input = |s: &ServiceModel| {
        s.backends
            .iter()
            .filter(|(_, b)| b.selectable())
            .map(|(ep, b)| (*ep, b.weight))
            .collect::<Vec<_>>()
    };
    a.table_size == b.table_size && input(a) == input(b)
}

fn name_field(name: &str) -> Result<[u8; SERVICE_NAME_LEN], ()> {
    let bytes = name.as_bytes();
    // Keep one NUL so readers find the end.
    if bytes.len() >= SERVICE_NAME_LEN {
        return Err(());
    }
    let mut field = [0u8; SERVICE_NAME_LEN];
    field[..bytes.len()].copy_from_slice(bytes);
    Ok(field)
}

#[cfg(test)]
mod tests;
