//! What the maps hold, as the planner sees it: their contents, indexes that let a plan
//! look at one service without scanning the others, and which services are settled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;
use lb_common::{Backend, BackendMeta, Frontend, FrontendKey, ServiceMeta, addr_filter_slot};

use super::{Op, Plan, filter_bits, service_name};
use crate::model::ServiceModel;

/// What the maps hold, as far as the agent wrote it (restored from them on restart).
/// Change it only through [`Applied::record`] and [`Applied::conclude`]: they keep the
/// indexes that let a plan touch only what changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub services: BTreeMap<u32, ServiceMeta>,
    pub backends: BTreeMap<u32, BackendMeta>,
    /// Filled backend slots.
    pub slots: BTreeMap<u32, Backend>,
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    /// Service ids whose Maglev slot holds a table (its digest may not be recorded
    /// yet: a write was interrupted between the two).
    pub tables: BTreeSet<u32>,
    /// Source ranges by service id (host bits cleared).
    pub source_ranges: BTreeSet<(u32, IpNet)>,
    /// Address pre-filter slot -> its bits, for slots with any.
    pub filter: BTreeMap<u32, u8>,
    pub(super) index: Index,
}

/// Derived from `Applied`'s maps (and kept in step by `record`), plus the models whose
/// state the maps are known to hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Index {
    /// Service name -> id.
    pub(super) names: BTreeMap<String, u32>,
    /// Service ids to clean up that no name reaches: a second id with a taken name, or
    /// an id that frontends, backends, a table or source ranges use without metadata
    /// (maps left by a crash).
    pub(super) strays: BTreeSet<u32>,
    /// Ids in use: services and strays.
    pub(super) service_ids: IdPool,
    /// Ids in use: backend metadata and filled slots.
    pub(super) backend_ids: IdPool,
    pub(super) backends_of: BTreeMap<u32, BTreeSet<u32>>,
    pub(super) frontends_of: BTreeMap<u32, BTreeSet<FrontendKey>>,
    /// Filled slots without metadata (a write interrupted by a crash).
    pub(super) unowned_slots: BTreeSet<u32>,
    /// Services whose every write of their current model succeeded: a plan skips them
    /// while their model is the same.
    pub(super) settled: BTreeMap<String, Arc<ServiceModel>>,
    /// Per pre-filter slot: how many frontends and filled backend slots have an
    /// address in it, so removing one never clears a bit another still needs.
    pub(super) filter_users: BTreeMap<u32, [u32; 2]>,
    /// Pre-filter slots whose bits differ from what their users need.
    pub(super) stale_filter: BTreeSet<u32>,
}

/// Ids in use among `1..`, with the free gaps below the highest, so the lowest free id
/// is found without scanning the used ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct IdPool {
    /// Free ids below `end`.
    free: BTreeSet<u32>,
    /// One past the highest id in use; 0 when none is.
    end: u32,
}

impl IdPool {
    pub(super) fn insert(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        let start = self.end.max(1);
        if id >= start {
            self.free.extend(start..id);
            self.end = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    pub(super) fn remove(&mut self, id: u32) {
        if id == 0 || id >= self.end {
            return;
        }
        self.free.insert(id);
        while self.end > 1 && self.free.remove(&(self.end - 1)) {
            self.end -= 1;
        }
        if self.end == 1 {
            self.end = 0;
        }
    }

    /// Hands out free ids, lowest first, for one plan.
    pub(super) fn allocator(&self, max: u32, order: IdOrder) -> Ids<'_> {
        Ids {
            free: self.free.iter(),
            next: self.end.max(1),
            max,
            order,
        }
    }
}

impl Applied {
    /// The planner's view of maps read back after a restart.
    pub fn from_maps(
        services: BTreeMap<u32, ServiceMeta>,
        backends: BTreeMap<u32, BackendMeta>,
        slots: BTreeMap<u32, Backend>,
        frontends: BTreeMap<FrontendKey, Frontend>,
        tables: BTreeSet<u32>,
        source_ranges: BTreeSet<(u32, IpNet)>,
        filter: BTreeMap<u32, u8>,
    ) -> Self {
        let mut applied = Applied::default();
        for (slot, bits) in filter {
            applied.record(&Op::SetAddrFilter { slot, bits });
        }
        for service_id in tables {
            applied.record(&Op::SetTable {
                service_id,
                table: Vec::new(),
            });
        }
        for (id, meta) in services {
            applied.record(&Op::SetServiceMeta {
                id,
                meta: Box::new(meta),
            });
        }
        for (id, meta) in backends {
            applied.record(&Op::SetBackendMeta { id, meta });
        }
        for (id, backend) in slots {
            applied.record(&Op::SetBackend { id, backend });
        }
        for (key, value) in frontends {
            applied.record(&Op::SetFrontend { key, value });
        }
        for (service_id, range) in source_ranges {
            applied.record(&Op::AddSourceRange { service_id, range });
        }
        applied
    }

    /// Mirrors one successful write.
    pub fn record(&mut self, op: &Op) {
        match op {
            Op::SetServiceMeta { id, meta } => self.set_service(*id, **meta),
            Op::ClearServiceMeta { id } => {
                if let Some(old) = self.services.remove(id) {
                    self.unname(&old, *id);
                }
                self.index.strays.remove(id);
                self.settle(*id);
            }
            Op::SetBackend { id, backend } => {
                if let Some(old) = self.slots.insert(*id, *backend) {
                    self.use_filter(&old.addr, 1, false);
                }
                self.use_filter(&backend.addr, 1, true);
                self.index.backend_ids.insert(*id);
                if !self.backends.contains_key(id) {
                    self.index.unowned_slots.insert(*id);
                }
            }
            Op::RemoveBackend { id } => {
                if let Some(old) = self.slots.remove(id) {
                    self.use_filter(&old.addr, 1, false);
                }
                self.index.unowned_slots.remove(id);
                if !self.backends.contains_key(id) {
                    self.index.backend_ids.remove(*id);
                }
            }
            Op::SetBackendMeta { id, meta } => {
                let old = self.backends.insert(*id, *meta).map(|m| m.service_id);
                if old != Some(meta.service_id) {
                    if let Some(old) = old {
                        unlink(&mut self.index.backends_of, old, id);
                        self.settle(old);
                    }
                    link(&mut self.index.backends_of, meta.service_id, *id);
                    self.own(meta.service_id);
                }
                self.index.backend_ids.insert(*id);
                self.index.unowned_slots.remove(id);
            }
            Op::ClearBackendMeta { id } => {
                if let Some(old) = self.backends.remove(id) {
                    unlink(&mut self.index.backends_of, old.service_id, id);
                    self.settle(old.service_id);
                }
                if self.slots.contains_key(id) {
                    self.index.unowned_slots.insert(*id);
                } else {
                    self.index.backend_ids.remove(*id);
                }
            }
            Op::SetFrontend { key, value } => {
                let old = self.frontends.insert(*key, *value).map(|f| f.service_id);
                if old.is_none() {
                    self.use_filter(&key.addr, 0, true);
                }
                if old != Some(value.service_id) {
                    if let Some(old) = old {
                        unlink(&mut self.index.frontends_of, old, key);
                        self.settle(old);
                    }
                    link(&mut self.index.frontends_of, value.service_id, *key);
                    self.own(value.service_id);
                }
            }
            Op::RemoveFrontend { key } => {
                if let Some(old) = self.frontends.remove(key) {
                    self.use_filter(&key.addr, 0, false);
                    unlink(&mut self.index.frontends_of, old.service_id, key);
                    self.settle(old.service_id);
                }
            }
            // The table's contents are recorded by the digest in the service's metadata.
            Op::SetTable { service_id, .. } => {
                self.tables.insert(*service_id);
                self.own(*service_id);
            }
            Op::RemoveTable { service_id } => {
                self.tables.remove(service_id);
                self.settle(*service_id);
            }
            Op::AddSourceRange { service_id, range } => {
                self.source_ranges.insert((*service_id, *range));
                self.own(*service_id);
            }
            Op::RemoveSourceRange { service_id, range } => {
                self.source_ranges.remove(&(*service_id, *range));
                self.settle(*service_id);
            }
            Op::SetAddrFilter { slot, bits } => {
                if *bits == 0 {
                    self.filter.remove(slot);
                } else {
                    self.filter.insert(*slot, *bits);
                }
                self.check_filter(*slot);
            }
            Op::ResetStats { .. } => {}
        }
    }

    /// Counts a frontend (`which` 0) or filled backend slot (1) with `addr` in or out
    /// of its pre-filter slot.
    fn use_filter(&mut self, addr: &[u8; 16], which: usize, up: bool) {
        let slot = addr_filter_slot(addr);
        let users = self.index.filter_users.entry(slot).or_default();
        if up {
            users[which] += 1;
        } else {
            users[which] = users[which].saturating_sub(1);
        }
        if *users == [0, 0] {
            self.index.filter_users.remove(&slot);
        }
        self.check_filter(slot);
    }

    fn check_filter(&mut self, slot: u32) {
        let have = self.filter.get(&slot).copied().unwrap_or(0);
        if have == filter_bits(self.filter_users(slot)) {
            self.index.stale_filter.remove(&slot);
        } else {
            self.index.stale_filter.insert(slot);
        }
    }

    /// How many frontends and filled backend slots have an address in pre-filter `slot`.
    pub(super) fn filter_users(&self, slot: u32) -> [u32; 2] {
        self.index
            .filter_users
            .get(&slot)
            .copied()
            .unwrap_or_default()
    }

    /// Pre-filter slots whose bits differ from what their users need.
    pub(super) fn stale_filter_slots(&self) -> &BTreeSet<u32> {
        &self.index.stale_filter
    }

    /// After a plan ran: when every op succeeded (`complete`), its services are settled
    /// on their models; otherwise the next plan looks at each of them again.
    pub fn conclude(&mut self, plan: &Plan, complete: bool) {
        for (name, model) in &plan.settled {
            match model {
                Some(model) if complete => {
                    self.index.settled.insert(name.clone(), Arc::clone(model));
                }
                _ => {
                    self.index.settled.remove(name);
                }
            }
        }
    }

    /// Forgets which services are settled, so the next plan compares every service with
    /// the maps (as after a restart).
    pub fn unsettle(&mut self) {
        self.index.settled.clear();
    }

    fn set_service(&mut self, id: u32, meta: ServiceMeta) {
        if let Some(old) = self.services.insert(id, meta) {
            if old.name == meta.name {
                return;
            }
            self.unname(&old, id);
        }
        self.index.service_ids.insert(id);
        let name = service_name(&meta);
        match self.index.names.get(name) {
            Some(&owner) if owner != id => {
                self.index.strays.insert(id);
            }
            Some(_) => {}
            None => {
                self.index.names.insert(name.to_owned(), id);
                self.index.strays.remove(&id);
            }
        }
    }

    fn unname(&mut self, old: &ServiceMeta, id: u32) {
        let name = service_name(old);
        if self.index.names.get(name) == Some(&id) {
            self.index.names.remove(name);
        }
    }

    /// `id` is named by a frontend or backend: without metadata it is a stray.
    fn own(&mut self, id: u32) {
        self.index.service_ids.insert(id);
        if !self.services.contains_key(&id) {
            self.index.strays.insert(id);
        }
    }

    /// Releases `id` once nothing holds it.
    fn settle(&mut self, id: u32) {
        if self.services.contains_key(&id) {
            return;
        }
        if self.index.backends_of.contains_key(&id)
            || self.index.frontends_of.contains_key(&id)
            || self.tables.contains(&id)
            || self.ranges_of(id).next().is_some()
        {
            self.index.strays.insert(id);
        } else {
            self.index.strays.remove(&id);
            self.index.service_ids.remove(id);
        }
    }

    /// The backend ids a service's metadata names.
    pub(super) fn backends_of(&self, service_id: u32) -> impl Iterator<Item = u32> + '_ {
        self.index
            .backends_of
            .get(&service_id)
            .into_iter()
            .flatten()
            .copied()
    }

    /// The source ranges recorded for a service id.
    pub(super) fn ranges_of(&self, service_id: u32) -> impl Iterator<Item = IpNet> + '_ {
        self.source_ranges
            .range((service_id, IpNet::V4(ipnet::Ipv4Net::default()))..)
            .take_while(move |(id, _)| *id == service_id)
            .map(|(_, range)| *range)
    }

    pub(super) fn frontends_of(&self, service_id: u32) -> impl Iterator<Item = FrontendKey> + '_ {
        self.index
            .frontends_of
            .get(&service_id)
            .into_iter()
            .flatten()
            .copied()
    }
}

fn link<K: Ord>(index: &mut BTreeMap<u32, BTreeSet<K>>, owner: u32, key: K) {
    index.entry(owner).or_default().insert(key);
}

fn unlink<K: Ord>(index: &mut BTreeMap<u32, BTreeSet<K>>, owner: u32, key: &K) {
    if let Some(keys) = index.get_mut(&owner) {
        keys.remove(key);
        if keys.is_empty() {
            index.remove(&owner);
        }
    }
}

/// Which free ids a plan hands out first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IdOrder {
    /// The lowest: ids stay dense.
    Lowest,
    /// Those above every id in use, then the lowest: an id freed a moment ago is not
    /// handed out again at once. Backend slots use it, because the writer empties a slot
    /// that a flipped-out table may still name only once running programs finished, and
    /// writing a new backend into it must wait for that.
    AboveFirst,
}

/// Free ids of an [`IdPool`], handed out during one plan.
pub(super) struct Ids<'a> {
    free: std::collections::btree_set::Iter<'a, u32>,
    next: u32,
    max: u32,
    order: IdOrder,
}

impl Ids<'_> {
    pub(super) fn take(&mut self) -> Option<u32> {
        let above = |ids: &mut Self| {
            (ids.next < ids.max).then(|| {
                ids.next += 1;
                ids.next - 1
            })
        };
        match self.order {
            IdOrder::Lowest => self.free.next().copied().or_else(|| above(self)),
            IdOrder::AboveFirst => above(self).or_else(|| self.free.next().copied()),
        }
    }
}
