//! Typed reads and writes of the program's maps. Callers speak in lb-common's types;
//! map names, fds and inner-map plumbing stay here.

use aya::maps::{Array, HashMap, MapError, PerCpuArray, PerCpuValues, xdp::DevMapHash};
use std::collections::{HashMap as StdHashMap, HashSet};

use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, Backend, BackendMeta, Flow, FlowKey, Frontend, FrontendKey,
    NextHop, Reason, ReasonStats, SERVICE_META_F_IN_USE, ServiceMeta, ServiceStats,
    addr_filter_slot, maps,
};

use super::{Dataplane, DataplaneError};

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A missing key on delete is success: the state we want is "absent".
fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// What the address pre-filter was built from: how many frontends and backends use
/// each slot, so removing one address never clears a bit another still needs.
#[derive(Default)]
pub struct FilterShadow {
    frontends: HashSet<FrontendKey>,
    backends: StdHashMap<u32, [u8; 16]>,
    counts: StdHashMap<u32, [u32; 2]>,
}

impl FilterShadow {
    /// Adjusts the count of `addr` as a frontend (`which` 0) or backend (1) and returns
    /// the slot and its new bits.
    fn bump(&mut self, addr: &[u8; 16], which: usize, up: bool) -> (u32, u8) {
        let slot = addr_filter_slot(addr);
        let counts = self.counts.entry(slot).or_default();
        if up {
            counts[which] += 1;
        } else {
            counts[which] = counts[which].saturating_sub(1);
        }
        let bits = if counts[0] > 0 { ADDR_F_FRONTEND } else { 0 }
            | if counts[1] > 0 { ADDR_F_BACKEND } else { 0 };
        if bits == 0 {
            self.counts.remove(&slot);
        }
        (slot, bits)
    }

    /// Notes a frontend written; returns the filter write it needs, if any.
    pub(super) fn frontend_set(&mut self, key: &FrontendKey) -> Option<(u32, u8)> {
        self.frontends
            .insert(*key)
            .then(|| self.bump(&key.addr, 0, true))
    }

    pub(super) fn frontend_removed(&mut self, key: &FrontendKey) -> Option<(u32, u8)> {
        self.frontends
            .remove(key)
            .then(|| self.bump(&key.addr, 0, false))
    }

    /// Notes backend slot `id` filled with `addr`; returns the filter writes it needs.
    pub(super) fn backend_set(&mut self, id: u32, addr: [u8; 16]) -> Vec<(u32, u8)> {
        match self.backends.insert(id, addr) {
            Some(old) if old == addr => Vec::new(),
            Some(old) => vec![self.bump(&old, 1, false), self.bump(&addr, 1, true)],
            None => vec![self.bump(&addr, 1, true)],
        }
    }

    pub(super) fn backend_removed(&mut self, id: u32) -> Option<(u32, u8)> {
        let old = self.backends.remove(&id)?;
        Some(self.bump(&old, 1, false))
    }
}

impl Dataplane {
    fn write_filter(&mut self, (slot, bits): (u32, u8)) -> Result<(), DataplaneError> {
        let name = maps::ADDR_FILTER;
        let mut m: Array<_, u8> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(slot, bits, 0).map_err(map_err(name))
    }

    pub(super) fn map_mut(
        &mut self,
        name: &'static str,
    ) -> Result<&mut aya::maps::Map, DataplaneError> {
        self.maps
            .get_mut(name)
            .ok_or(DataplaneError::MissingMap(name))
    }

    pub(super) fn map(&self, name: &'static str) -> Result<&aya::maps::Map, DataplaneError> {
        self.maps.get(name).ok_or(DataplaneError::MissingMap(name))
    }

    pub fn set_frontend(
        &mut self,
        key: FrontendKey,
        value: Frontend,
    ) -> Result<(), DataplaneError> {
        let name = maps::FRONTENDS;
        let mut m: HashMap<_, FrontendKey, Frontend> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.insert(key, value, 0).map_err(map_err(name))?;
        match self.filter.frontend_set(&key) {
            Some(bits) => self.write_filter(bits),
            None => Ok(()),
        }
    }

    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), DataplaneError> {
        let name = maps::FRONTENDS;
        let mut m: HashMap<_, FrontendKey, Frontend> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        absent_ok(m.remove(key)).map_err(map_err(name))?;
        match self.filter.frontend_removed(key) {
            Some(bits) => self.write_filter(bits),
            None => Ok(()),
        }
    }

    /// Writes backend `id` (`1..MAX_BACKENDS`) and forgets its cached next hop.
    pub fn set_backend(&mut self, id: u32, value: Backend) -> Result<(), DataplaneError> {
        if self.grace.is_deferred(id) {
            // The slot's old backend is still queued to be emptied.
            self.settle_slots()?;
        }
        self.write_backend(id, value)?;
        for bits in self.filter.backend_set(id, value.addr) {
            self.write_filter(bits)?;
        }
        Ok(())
    }

    /// Empties backend `id`'s slot: tracked flows to it are re-selected. Waits first
    /// (milliseconds) while a flipped-out table copy that may name it can still be read;
    /// the writer queues such slots instead (see `grace`).
    pub fn remove_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.empty_slot(id)?;
        self.settle_slots()
    }

    pub(super) fn empty_slot_now(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write_backend(id, Backend::default())?;
        match self.filter.backend_removed(id) {
            Some(bits) => self.write_filter(bits),
            None => Ok(()),
        }
    }

    fn write_backend(&mut self, id: u32, value: Backend) -> Result<(), DataplaneError> {
        let name = maps::BACKENDS;
        let mut m: Array<_, Backend> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(id, value, 0).map_err(map_err(name))?;
        let name = maps::NEXTHOPS;
        let mut m: Array<_, NextHop> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(id, NextHop::default(), 0).map_err(map_err(name))
    }

    /// Lets the program redirect to `ifindex` through the devmap.
    pub fn add_tx_port(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        let name = maps::TX_PORTS;
        let mut m = DevMapHash::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataplaneError::Interface {
                name: format!("ifindex {ifindex}"),
                reason: e.to_string(),
            })
    }

    /// The conntrack entry for a client -> frontend flow, if any.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Flow>, DataplaneError> {
        let name = maps::CONNTRACK;
        let m: HashMap<_, FlowKey, Flow> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        optional(m.get(key, 0)).map_err(map_err(name))
    }

    /// A service's counters summed over CPUs.
    pub fn service_stats(&self, service_id: u32) -> Result<ServiceStats, DataplaneError> {
        let name = maps::SERVICE_STATS;
        let m: PerCpuArray<_, ServiceStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let per_cpu = m.get(&service_id, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().fold(ServiceStats::default(), |mut sum, s| {
            sum.packets += s.packets;
            sum.bytes += s.bytes;
            sum.new_flows += s.new_flows;
            sum.reply_packets += s.reply_packets;
            sum.reply_bytes += s.reply_bytes;
            sum.rejected += s.rejected;
            sum.source_denied += s.source_denied;
            sum
        }))
    }

    /// Counters for every reason, summed over CPUs.
    pub fn reason_stats(&self) -> Result<Vec<(Reason, ReasonStats)>, DataplaneError> {
        let name = maps::REASON_STATS;
        let m: PerCpuArray<_, ReasonStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu = m.get(&(reason as u32), 0).map_err(map_err(name))?;
                let sum = per_cpu.iter().fold(ReasonStats::default(), |mut sum, s| {
                    sum.packets += s.packets;
                    sum.bytes += s.bytes;
                    sum
                });
                Ok((reason, sum))
            })
            .collect()
    }

    /// The session-affinity entry of a client for a service, if any.
    pub fn affinity(
        &self,
        key: &lb_common::AffinityKey,
    ) -> Result<Option<lb_common::Affinity>, DataplaneError> {
        let name = maps::AFFINITY;
        let m: HashMap<_, lb_common::AffinityKey, lb_common::Affinity> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        optional(m.get(key, 0)).map_err(map_err(name))
    }
}

/// Everything the agent keeps in the maps, read back after a restart.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub frontends: Vec<(FrontendKey, Frontend)>,
    /// Service id -> metadata, for slots marked in use.
    pub services: Vec<(u32, ServiceMeta)>,
    /// Backend id -> metadata, and the backend slot when it is filled (forwarding).
    pub backends: Vec<(u32, BackendMeta, Option<Backend>)>,
    /// Service ids whose Maglev slot holds a table.
    pub tables: Vec<u32>,
}

impl Dataplane {
    pub fn set_service_meta(&mut self, id: u32, meta: &ServiceMeta) -> Result<(), DataplaneError> {
        let name = maps::SERVICE_META;
        let mut m: Array<_, ServiceMeta> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(id, meta, 0).map_err(map_err(name))
    }

    pub fn set_backend_meta(&mut self, id: u32, meta: &BackendMeta) -> Result<(), DataplaneError> {
        let name = maps::BACKEND_META;
        let mut m: Array<_, BackendMeta> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(id, meta, 0).map_err(map_err(name))
    }

    /// Zeroes a service id's counters, so a recycled id starts from nothing.
    pub fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        let name = maps::SERVICE_STATS;
        let mut m: PerCpuArray<_, ServiceStats> =
            PerCpuArray::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            name,
            source: MapError::IoError(e),
        })?;
        let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(|e| {
            DataplaneError::Map {
                name,
                source: MapError::IoError(e),
            }
        })?;
        m.set(id, zeros, 0).map_err(map_err(name))
    }

    /// Reads back what an agent wrote (after a restart), and rebuilds the address
    /// pre-filter's bookkeeping from it. Arrays are read in batches.
    pub fn snapshot(&mut self) -> Result<Snapshot, DataplaneError> {
        self.settle_slots()?;
        let mut snap = Snapshot::default();
        {
            let name = maps::FRONTENDS;
            let m: HashMap<_, FrontendKey, Frontend> =
                HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
            for entry in &m {
                snap.frontends.push(entry.map_err(map_err(name))?);
            }
            snap.frontends.sort_by_key(|(k, _)| *k);
        }
        {
            // Whole arrays in batches: one syscall per index is ~1 s at these sizes.
            let name = maps::SERVICE_META;
            let metas: Vec<ServiceMeta> =
                super::arrays::array_values(self.map(name)?).map_err(map_err(name))?;
            snap.services = (0..)
                .zip(metas)
                .skip(1)
                .filter(|(_, meta)| meta.flags & SERVICE_META_F_IN_USE != 0)
                .collect();
        }
        {
            let meta_name = maps::BACKEND_META;
            let metas: Vec<BackendMeta> =
                super::arrays::array_values(self.map(meta_name)?).map_err(map_err(meta_name))?;
            let name = maps::BACKENDS;
            let slots: Vec<Backend> =
                super::arrays::array_values(self.map(name)?).map_err(map_err(name))?;
            snap.backends = (0..)
                .zip(metas.into_iter().zip(slots))
                .skip(1)
                .filter(|(_, (meta, _))| meta.family != 0)
                .map(|(id, (meta, slot))| (id, meta, (slot.family != 0).then_some(slot)))
                .collect();
        }
        snap.tables = self.maglev_services()?;
        self.filter = FilterShadow::default();
        for (key, _) in &snap.frontends {
            self.filter.frontend_set(key);
        }
        for (id, _, filled) in &snap.backends {
            if let Some(slot) = filled {
                self.filter.backend_set(*id, slot.addr);
            }
        }
        Ok(snap)
    }
}

fn optional<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}
