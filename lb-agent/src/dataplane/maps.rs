//! Typed reads and writes of the program's maps. Callers speak in lb-common's types;
//! map names, fds and inner-map plumbing stay here.

use std::os::fd::AsFd as _;

use aya::Pod;
use aya::maps::{Array, HashMap, MapError, PerCpuArray, PerCpuValues, xdp::DevMapHash};
use ipnet::IpNet;

use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, Backend, BackendMeta, ClientFlow, ClientKey, FlowKey,
    Frontend, FrontendKey, NextHop, Reason, ReasonStats, SERVICE_META_F_IN_USE, ServiceMeta,
    ServiceStats, SnatConfig, SnatEntry, TrackedFlow, addr_filter_slot, maps,
};

use super::store::{Batch, MapStore, Snapshot};
use super::sys;
use super::tables::map_data;
use super::{Dataplane, DataplaneError};

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// A missing key on delete is success: the state we want is "absent". aya reports it
/// as the delete syscall's ENOENT.
pub(super) fn absent_ok(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl Dataplane {
    /// Adds `bit` to `addr`'s pre-filter slot, for writes outside a plan (tests and
    /// benchmarks); plans own the filter, and a stale bit only costs a lookup.
    fn raise_filter(&mut self, addr: &[u8; 16], bit: u8) -> Result<(), DataplaneError> {
        let name = maps::ADDR_FILTER;
        let mut m: Array<_, u8> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let slot = addr_filter_slot(addr);
        let bits = m.get(&slot, 0).map_err(map_err(name))?;
        m.set(slot, bits | bit, 0).map_err(map_err(name))
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

    /// Writes a frontend outside a plan.
    pub fn set_frontend(
        &mut self,
        key: FrontendKey,
        value: Frontend,
    ) -> Result<(), DataplaneError> {
        self.set_frontends(&[(key, value)]).map_err(|(_, e)| e)?;
        self.raise_filter(&key.addr, ADDR_F_FRONTEND)
    }

    /// Writes backend `id` (`1..MAX_BACKENDS`) outside a plan and forgets its cached
    /// next hop.
    pub fn set_backend(&mut self, id: u32, value: Backend) -> Result<(), DataplaneError> {
        self.set_backends(&[(id, value)]).map_err(|(_, e)| e)?;
        self.raise_filter(&value.addr, ADDR_F_BACKEND)
    }

    /// Empties backend `id`'s slot: tracked flows to it are re-selected. Waits first
    /// (milliseconds) while a flipped-out table copy that may name it can still be read;
    /// the writer queues such slots instead (see `grace`).
    pub fn remove_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.empty_slot(id)?;
        self.settle_slots()
    }

    pub(super) fn empty_slot_now(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write_backends(&[(id, Backend::default())])
            .map_err(|(_, e)| e)
    }

    /// Writes backend slots, then fresh next hops (the backend may have moved; a hop
    /// resolved in between is for the new backend). A slot counts as written once its
    /// next hop is reset too.
    fn write_backends(&mut self, slots: &[(u32, Backend)]) -> Result<(), Batch> {
        self.write_array(maps::BACKENDS, slots)?;
        let hops: Vec<(u32, NextHop)> = slots
            .iter()
            .map(|(id, _)| (*id, NextHop::default()))
            .collect();
        self.write_array(maps::NEXTHOPS, &hops)
    }

    /// Writes entries of an array: one element command for one, a batch for more.
    fn write_array<V: aya::Pod>(
        &mut self,
        name: &'static str,
        entries: &[(u32, V)],
    ) -> Result<(), Batch> {
        if let [(index, value)] = entries {
            let mut m: Array<_, V> = Array::try_from(self.map_mut(name).map_err(|e| (0, e))?)
                .map_err(|e| (0, map_err(name)(e)))?;
            return m.set(*index, value, 0).map_err(|e| (0, map_err(name)(e)));
        }
        let (keys, values): (Vec<u32>, Vec<V>) = entries.iter().copied().unzip();
        self.batch(name, &keys, &values)
    }

    fn batch<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<(), Batch> {
        if keys.is_empty() {
            return Ok(());
        }
        let data = map_data(self.map(name).map_err(|e| (0, e))?).map_err(|e| (0, e))?;
        sys::update_batch(data.fd().as_fd(), keys, values)
            .map_err(|(done, source)| (done, DataplaneError::Bpf { name, source }))
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

    /// Entry `key` of the hash map `name`, if any.
    pub(super) fn hash_get<K: Pod, V: Pod>(
        &self,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>, DataplaneError> {
        let m: HashMap<_, K, V> = HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        optional(m.get(key, 0)).map_err(map_err(name))
    }

    /// Slot `id` of the array `name`.
    pub(super) fn array_get<V: Pod>(
        &self,
        name: &'static str,
        id: u32,
    ) -> Result<V, DataplaneError> {
        let m: Array<_, V> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        m.get(&id, 0).map_err(map_err(name))
    }

    /// The conntrack entry for a client -> frontend flow, if any: its client's
    /// `FLOWS` entry when that is this flow's, else the `CONNTRACK` one (as the program
    /// looks).
    pub fn flow(&self, key: &FlowKey) -> Result<Option<TrackedFlow>, DataplaneError> {
        let client: Option<ClientFlow> = self.hash_get(maps::FLOWS, &ClientKey::of_forward(key))?;
        if let Some(flow) = client.and_then(|c| c.forward(key)) {
            return Ok(Some(flow));
        }
        self.hash_get(maps::CONNTRACK, key)
    }

    /// The reply translation for a reply flow (backend -> client), if any: its client's
    /// `FLOWS` entry when that names this backend, else the `REVNAT` one.
    pub fn rev_nat(&self, key: &FlowKey) -> Result<Option<lb_common::RevNat>, DataplaneError> {
        let client: Option<ClientFlow> = self.hash_get(maps::FLOWS, &ClientKey::of_reply(key))?;
        if let Some(c) = client.filter(|c| c.is_reply(key)) {
            return Ok(Some(c.reply));
        }
        self.hash_get(maps::REVNAT, key)
    }

    /// The SNAT reservation keyed by a reply flow (backend -> node:port), if any.
    pub fn snat_entry(&self, key: &FlowKey) -> Result<Option<SnatEntry>, DataplaneError> {
        self.hash_get(maps::SNAT, key)
    }

    /// Every SNAT reservation (reply flow backend -> node:port, and its entry), for
    /// `status`: key by key, at most the map's capacity.
    pub fn snat_reservations(&self) -> Result<Vec<(FlowKey, SnatEntry)>, DataplaneError> {
        let name = maps::SNAT;
        let m: HashMap<_, FlowKey, SnatEntry> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        let mut out = Vec::new();
        for item in m.iter().take(maps::SNAT_ENTRIES as usize) {
            match item {
                Ok(pair) => out.push(pair),
                // Evicted while the iteration stood on it: gone, as it should be.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(out)
    }

    /// Writes a SNAT reservation as the program would (tests: a port another flow holds).
    pub fn set_snat_entry(
        &mut self,
        key: &FlowKey,
        entry: &SnatEntry,
    ) -> Result<(), DataplaneError> {
        let name = maps::SNAT;
        let mut m: HashMap<_, FlowKey, SnatEntry> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.insert(key, entry, 0).map_err(map_err(name))
    }

    /// Tells the program that the pair tables may hold entries (`maps::FLOW_PAIRS`).
    pub fn mark_flow_pairs(&mut self) -> Result<(), DataplaneError> {
        let name = maps::FLOW_PAIRS;
        let mut m: Array<_, u32> = Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(0, 1, 0).map_err(map_err(name))
    }

    /// Whether the pair tables may hold entries, as the program sees it.
    pub fn flow_pairs_marked(&self) -> Result<bool, DataplaneError> {
        self.array_get::<u32>(maps::FLOW_PAIRS, 0).map(|v| v != 0)
    }

    /// The node's SNAT addresses and port range.
    pub fn set_snat_config(&mut self, config: &SnatConfig) -> Result<(), DataplaneError> {
        let name = maps::SNAT_CONFIG;
        let mut m: Array<_, SnatConfig> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        m.set(0, config, 0).map_err(map_err(name))
    }

    /// What the program holds as the node's SNAT settings.
    pub fn snat_config(&self) -> Result<SnatConfig, DataplaneError> {
        self.array_get(maps::SNAT_CONFIG, 0)
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
        self.hash_get(maps::AFFINITY, key)
    }
}

impl MapStore for Dataplane {
    fn reset_stats(&mut self, ids: &[u32]) -> Result<(), Batch> {
        let name = maps::SERVICE_STATS;
        let io = |e| {
            (
                0,
                DataplaneError::Map {
                    name,
                    source: MapError::IoError(e),
                },
            )
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| io(e))?;
        if let [id] = ids {
            let mut m: PerCpuArray<_, ServiceStats> =
                PerCpuArray::try_from(self.map_mut(name).map_err(|e| (0, e))?)
                    .map_err(|e| (0, map_err(name)(e)))?;
            let zeros = PerCpuValues::try_from(vec![ServiceStats::default(); cpus]).map_err(io)?;
            return m.set(*id, zeros, 0).map_err(|e| (0, map_err(name)(e)));
        }
        // A batch value is one 8-byte-aligned value per CPU.
        let per_value = size_of::<ServiceStats>().next_multiple_of(8) * cpus;
        let zeros = vec![0u8; per_value * ids.len()];
        let keys: Vec<u8> = ids.iter().flat_map(|id| id.to_ne_bytes()).collect();
        let data = map_data(self.map(name).map_err(|e| (0, e))?).map_err(|e| (0, e))?;
        sys::update_batch_bytes(data.fd().as_fd(), &keys, &zeros, ids.len())
            .map_err(|(done, source)| (done, DataplaneError::Bpf { name, source }))
    }

    fn set_service_metas(&mut self, metas: &[(u32, ServiceMeta)]) -> Result<(), Batch> {
        self.write_array(maps::SERVICE_META, metas)
    }

    fn set_backend_metas(&mut self, metas: &[(u32, BackendMeta)]) -> Result<(), Batch> {
        self.write_array(maps::BACKEND_META, metas)
    }

    fn set_backends(&mut self, slots: &[(u32, Backend)]) -> Result<(), Batch> {
        if slots.iter().any(|(id, _)| self.grace.is_deferred(*id)) {
            // A slot's old backend is still queued to be emptied.
            self.settle_slots().map_err(|e| (0, e))?;
        }
        // Slots a flipped-out copy may name are emptied later (see `grace`).
        let defer = self.grace.uncovered();
        let later = |(_, backend): &(u32, Backend)| defer && *backend == Backend::default();
        let mut done = 0;
        for group in slots.chunk_by(|a, b| later(a) == later(b)) {
            if later(&group[0]) {
                for (i, (id, _)) in group.iter().enumerate() {
                    self.empty_slot(*id).map_err(|e| (done + i, e))?;
                }
            } else {
                self.write_backends(group).map_err(|(n, e)| (done + n, e))?;
            }
            done += group.len();
        }
        Ok(())
    }

    fn set_frontends(&mut self, frontends: &[(FrontendKey, Frontend)]) -> Result<(), Batch> {
        let name = maps::FRONTENDS;
        if let [(key, value)] = frontends {
            let mut m: HashMap<_, FrontendKey, Frontend> =
                HashMap::try_from(self.map_mut(name).map_err(|e| (0, e))?)
                    .map_err(|e| (0, map_err(name)(e)))?;
            return m.insert(key, value, 0).map_err(|e| (0, map_err(name)(e)));
        }
        let (keys, values): (Vec<FrontendKey>, Vec<Frontend>) = frontends.iter().copied().unzip();
        self.batch(name, &keys, &values)
    }

    fn remove_frontends(&mut self, keys: &[FrontendKey]) -> Result<(), Batch> {
        let name = maps::FRONTENDS;
        if let [key] = keys {
            let mut m: HashMap<_, FrontendKey, Frontend> =
                HashMap::try_from(self.map_mut(name).map_err(|e| (0, e))?)
                    .map_err(|e| (0, map_err(name)(e)))?;
            return absent_ok(m.remove(key)).map_err(|e| (0, map_err(name)(e)));
        }
        // A missing key stops the batch (ENOENT); the writer then goes op by op.
        let data = map_data(self.map(name).map_err(|e| (0, e))?).map_err(|e| (0, e))?;
        sys::delete_batch(data.fd().as_fd(), keys)
            .map_err(|(done, source)| (done, DataplaneError::Bpf { name, source }))
    }

    fn set_addr_filter(&mut self, slots: &[(u32, u8)]) -> Result<(), Batch> {
        self.write_array(maps::ADDR_FILTER, slots)
    }

    fn set_tables(
        &mut self,
        tables: &[(u32, &[u32])],
        installed: &dyn Fn(u32) -> bool,
    ) -> Result<(), Batch> {
        self.set_maglev_tables(tables, installed)
    }

    fn remove_table(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        self.remove_maglev_table(service_id)
    }

    fn add_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), DataplaneError> {
        Dataplane::add_source_range(self, service_id, range)
    }

    fn remove_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), DataplaneError> {
        Dataplane::remove_source_range(self, service_id, range)
    }

    fn contents(&mut self) -> Result<Snapshot, DataplaneError> {
        self.snapshot()
    }
}

impl Dataplane {
    /// Reads back what an agent wrote (after a restart). Arrays are read in batches.
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
                .filter(|(_, (meta, slot))| meta.family != 0 || slot.family != 0)
                .map(|(id, (meta, slot))| (id, meta, (slot.family != 0).then_some(slot)))
                .collect();
        }
        snap.tables = self.maglev_services()?;
        snap.source_ranges = self.source_ranges()?;
        {
            let name = maps::ADDR_FILTER;
            let bits: Vec<u8> =
                super::arrays::array_values(self.map(name)?).map_err(map_err(name))?;
            snap.filter = (0..).zip(bits).filter(|(_, b)| *b != 0).collect();
        }
        Ok(snap)
    }
}

/// A missing key as `None`.
pub(super) fn optional<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}
