//! The difference between the desired state and what the maps hold, as an ordered
//! list of map writes. Pure: the writer executes the ops and mirrors each successful
//! one into `Applied`, so `Applied` always equals the maps.
//!
//! Order makes every change hitless (a packet never meets a half-written service):
//! 1. new services' metadata;
//! 2. backends that will be needed (slot and metadata);
//! 3. each changed Maglev table swapped whole, then its digest recorded;
//! 4. source ranges added;
//! 5. frontends added or changed;
//! 6. frontends removed;
//! 7. source ranges no frontend needs any more;
//! 8. what nothing uses any more: tables of removed services, backend slots (their
//!    tracked flows are re-selected), metadata.
//!
//! At every step, every id in an installed table names a filled slot of its service,
//! and a client admitted by a service's source ranges both before and after a change
//! is admitted throughout (new ranges go in before a frontend requires them, old ones
//! leave after).

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use lb_common::{
    BACKEND_F_DRAINING, Backend, BackendMeta, FRONTEND_F_CLIENT_AFFINITY, FRONTEND_F_REJECT_EMPTY,
    FRONTEND_F_SOURCE_RANGES, Frontend, FrontendKey, HEALTH_DOWN, HEALTH_UNCHECKED, HEALTH_UP,
    PROTO_TCP, PROTO_UDP, SERVICE_META_F_IN_USE, SERVICE_META_F_NO_BACKENDS, SERVICE_NAME_LEN,
    ServiceMeta, addr_key,
    maps::{MAX_BACKENDS, MAX_SERVICES},
};

use crate::config::{FrontendSpec, Protocol};
use crate::maglev;
use crate::model::{Desired, Endpoint, Health, ServiceModel, WhenEmpty};

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    SetServiceMeta {
        id: u32,
        meta: ServiceMeta,
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
}

/// What the maps hold, as far as the agent wrote it (restored from them on restart).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<u32, ServiceMeta>,
    pub backends: BTreeMap<u32, BackendMeta>,
    /// Filled backend slots.
    pub slots: BTreeMap<u32, Backend>,
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Source ranges by service id (host bits cleared).
    pub source_ranges: BTreeSet<(u32, IpNet)>,
}

impl Applied {
    /// Mirrors one successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::SetServiceMeta { id, meta } => {
                self.services.insert(*id, *meta);
            }
            Op::ClearServiceMeta { id } => {
                self.services.remove(id);
            }
            Op::SetBackend { id, backend } => {
                self.slots.insert(*id, *backend);
            }
            Op::RemoveBackend { id } => {
                self.slots.remove(id);
            }
            Op::SetBackendMeta { id, meta } => {
                self.backends.insert(*id, *meta);
            }
            Op::ClearBackendMeta { id } => {
                self.backends.remove(id);
            }
            Op::SetFrontend { key, value } => {
                self.frontends.insert(*key, *value);
            }
            Op::RemoveFrontend { key } => {
                self.frontends.remove(key);
            }
            Op::AddSourceRange { service_id, range } => {
                self.source_ranges.insert((*service_id, *range));
            }
            Op::RemoveSourceRange { service_id, range } => {
                self.source_ranges.remove(&(*service_id, *range));
            }
            // Recorded by the digest in the service's metadata that follows.
            Op::ResetStats { .. } | Op::SetTable { .. } | Op::RemoveTable { .. } => {}
        }
    }

    fn service_id(&self, name: &str) -> Option<u32> {
        self.services
            .iter()
            .find(|(_, meta)| service_name(meta) == name)
            .map(|(id, _)| *id)
    }
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

/// Lowest ids in `1..max` not in `used`, handed out in order.
struct Ids {
    used: BTreeSet<u32>,
    max: u32,
}

impl Ids {
    fn take(&mut self) -> Option<u32> {
        let id = (1..self.max).find(|id| !self.used.contains(id))?;
        self.used.insert(id);
        Some(id)
    }
}

/// Ordered phases; concatenated at the end.
#[derive(Default)]
struct Phases {
    new_services: Vec<Op>,
    backends: Vec<Op>,
    tables: Vec<Op>,
    add_ranges: Vec<Op>,
    add_frontends: Vec<Op>,
    remove_frontends: Vec<Op>,
    remove_ranges: Vec<Op>,
    cleanup: Vec<Op>,
}

impl Phases {
    /// The ops in their hitless order.
    fn into_ops(self) -> Vec<Op> {
        let Phases {
            new_services,
            backends,
            mut tables,
            add_ranges,
            add_frontends,
            remove_frontends,
            remove_ranges,
            cleanup,
        } = self;
        // Down backends leave their slot only after the tables no longer name them.
        let (late, early): (Vec<Op>, Vec<Op>) = backends
            .into_iter()
            .partition(|op| matches!(op, Op::RemoveBackend { .. }));
        let mut ops = new_services;
        ops.extend(early);
        ops.append(&mut tables);
        ops.extend(add_ranges);
        ops.extend(add_frontends);
        ops.extend(remove_frontends);
        ops.extend(remove_ranges);
        ops.extend(late);
        ops.extend(cleanup);
        ops
    }
}

/// The writes that make the maps hold `desired`, given that they hold `applied`.
pub fn plan(desired: &Desired, applied: &Applied) -> Plan {
    let mut phases = Phases::default();
    let mut errors = Vec::new();
    let mut service_ids = Ids {
        // Ids whose ranges outlived their metadata (an interrupted cleanup) wait until
        // the ranges are gone too.
        used: applied
            .services
            .keys()
            .copied()
            .chain(applied.source_ranges.iter().map(|(id, _)| *id))
            .collect(),
        max: MAX_SERVICES,
    };
    let mut backend_ids = Ids {
        used: applied.backends.keys().copied().collect(),
        max: MAX_BACKENDS,
    };
    let mut kept_services = BTreeSet::new();
    let mut kept_backends = BTreeSet::new();
    let mut wanted_frontends = BTreeSet::new();
    let mut wanted_ranges = BTreeSet::new();

    for (name, service) in &desired.services {
        let Ok(name_bytes) = name_field(name) else {
            errors.push(PlanError::NameTooLong {
                service: name.clone(),
            });
            continue;
        };
        let (id, old_meta) = if let Some(id) = applied.service_id(name) {
            (id, applied.services.get(&id).copied())
        } else if let Some(id) = service_ids.take() {
            let meta = ServiceMeta {
                name: name_bytes,
                flags: SERVICE_META_F_IN_USE,
                table_size: service.table_size,
                table_digest: 0,
            };
            phases.new_services.push(Op::ResetStats { id });
            phases.new_services.push(Op::SetServiceMeta { id, meta });
            (id, Some(meta))
        } else {
            errors.push(PlanError::NoServiceId {
                service: name.clone(),
            });
            continue;
        };
        kept_services.insert(id);
        let ids = plan_backends(
            name,
            id,
            service,
            applied,
            &mut backend_ids,
            &mut phases,
            &mut errors,
        );
        kept_backends.extend(ids.values().copied());

        let digest = plan_table(name, id, service, &ids, old_meta, &mut phases, &mut errors);
        if digest == 0 && old_meta.is_some_and(|m| m.table_digest != 0) {
            phases.tables.push(Op::RemoveTable { service_id: id });
        }
        let meta = ServiceMeta {
            name: name_bytes,
            flags: SERVICE_META_F_IN_USE
                | if service.has_no_backends() {
                    SERVICE_META_F_NO_BACKENDS
                } else {
                    0
                },
            table_size: service.table_size,
            table_digest: digest,
        };
        if old_meta != Some(meta) {
            phases.tables.push(Op::SetServiceMeta { id, meta });
        }

        plan_source_ranges(id, service, applied, &mut wanted_ranges, &mut phases);
        let value = frontend_value(id, service);
        for spec in &service.frontends {
            let key = frontend_key(spec);
            wanted_frontends.insert(key);
            if applied.frontends.get(&key) != Some(&value) {
                phases.add_frontends.push(Op::SetFrontend { key, value });
            }
        }
    }

    plan_removals(
        applied,
        &kept_services,
        &kept_backends,
        &wanted_frontends,
        &mut phases,
    );
    for (service_id, range) in applied.source_ranges.difference(&wanted_ranges) {
        phases.remove_ranges.push(Op::RemoveSourceRange {
            service_id: *service_id,
            range: *range,
        });
    }

    Plan {
        ops: phases.into_ops(),
        errors,
    }
}

/// The frontend value of every frontend of a service.
fn frontend_value(id: u32, service: &ServiceModel) -> Frontend {
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
    Frontend {
        service_id: id,
        flags,
        affinity_timeout_s: service.affinity_timeout_s.unwrap_or(0),
        _pad: 0,
    }
}

/// Adds the service's ranges the maps lack; records every range it wants.
fn plan_source_ranges(
    id: u32,
    service: &ServiceModel,
    applied: &Applied,
    wanted: &mut BTreeSet<(u32, IpNet)>,
    phases: &mut Phases,
) {
    for range in &service.source_ranges {
        let entry = (id, range.trunc());
        if wanted.insert(entry) && !applied.source_ranges.contains(&entry) {
            phases.add_ranges.push(Op::AddSourceRange {
                service_id: entry.0,
                range: entry.1,
            });
        }
    }
}

/// What the desired state no longer uses: frontends, tables, backends, metadata.
fn plan_removals(
    applied: &Applied,
    kept_services: &BTreeSet<u32>,
    kept_backends: &BTreeSet<u32>,
    wanted_frontends: &BTreeSet<FrontendKey>,
    phases: &mut Phases,
) {
    for key in applied.frontends.keys() {
        if !wanted_frontends.contains(key) {
            phases
                .remove_frontends
                .push(Op::RemoveFrontend { key: *key });
        }
    }
    for (&id, meta) in &applied.services {
        if !kept_services.contains(&id) && meta.table_digest != 0 {
            phases.cleanup.push(Op::RemoveTable { service_id: id });
        }
    }
    for &id in applied.backends.keys() {
        if !kept_backends.contains(&id) {
            if applied.slots.contains_key(&id) {
                phases.cleanup.push(Op::RemoveBackend { id });
            }
            phases.cleanup.push(Op::ClearBackendMeta { id });
        }
    }
    // Slots filled without metadata (a write interrupted by a crash).
    for &id in applied.slots.keys() {
        if !applied.backends.contains_key(&id) {
            phases.cleanup.push(Op::RemoveBackend { id });
        }
    }
    for &id in applied.services.keys() {
        if !kept_services.contains(&id) {
            phases.cleanup.push(Op::ClearServiceMeta { id });
        }
    }
}

/// Plans the service's table over the backends that take new flows; returns the
/// digest the service's metadata should record (0: no table).
fn plan_table(
    name: &str,
    id: u32,
    service: &ServiceModel,
    ids: &BTreeMap<Endpoint, u32>,
    old_meta: Option<ServiceMeta>,
    phases: &mut Phases,
    errors: &mut Vec<PlanError>,
) -> u64 {
    let members: Vec<(u32, String, u32)> = service
        .backends
        .iter()
        .filter(|(_, b)| b.selectable())
        .filter_map(|(ep, b)| ids.get(ep).map(|&bid| (bid, ep.to_string(), b.weight)))
        .collect();
    if members.is_empty() {
        0
    } else {
        let input: Vec<maglev::Backend<'_>> = members
            .iter()
            .map(|(bid, identity, weight)| maglev::Backend {
                id: *bid,
                identity: identity.as_bytes(),
                weight: *weight,
            })
            .collect();
        match maglev::build_table(&input, service.table_size) {
            Ok(table) => {
                let digest = table_digest(&table);
                if old_meta.is_none_or(|m| m.table_digest != digest) {
                    phases.tables.push(Op::SetTable {
                        service_id: id,
                        table,
                    });
                }
                digest
            }
            Err(source) => {
                errors.push(PlanError::Maglev {
                    service: name.to_owned(),
                    source,
                });
                old_meta.map_or(0, |m| m.table_digest)
            }
        }
    }
}

/// Plans one service's backends; returns the id of every backend it keeps.
fn plan_backends(
    name: &str,
    service_id: u32,
    service: &ServiceModel,
    applied: &Applied,
    ids: &mut Ids,
    phases: &mut Phases,
    errors: &mut Vec<PlanError>,
) -> BTreeMap<Endpoint, u32> {
    let existing: BTreeMap<Endpoint, u32> = applied
        .backends
        .iter()
        .filter(|(_, m)| m.service_id == service_id)
        .map(|(&id, m)| (meta_endpoint(m), id))
        .collect();
    let mut kept = BTreeMap::new();
    for (endpoint, backend) in &service.backends {
        let Some(id) = existing.get(endpoint).copied().or_else(|| ids.take()) else {
            errors.push(PlanError::NoBackendId {
                service: name.to_owned(),
                endpoint: *endpoint,
            });
            continue;
        };
        kept.insert(*endpoint, id);
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
        let filled = applied.slots.get(&id);
        let slot = Backend {
            addr,
            port: meta.port,
            family,
            flags: if backend.weight == 0 {
                BACKEND_F_DRAINING
            } else {
                0
            },
            service_id,
        };
        if backend.forwarding() && filled != Some(&slot) {
            phases.backends.push(Op::SetBackend { id, backend: slot });
        }
        if applied.backends.get(&id) != Some(&meta) {
            phases.backends.push(Op::SetBackendMeta { id, meta });
        }
        if !backend.forwarding() && filled.is_some() {
            phases.backends.push(Op::RemoveBackend { id });
        }
    }
    kept
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
