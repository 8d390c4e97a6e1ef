//! Typed reads and writes of the program's maps. Callers speak in lb-common's types;
//! map names, fds and inner-map plumbing stay here.

use aya::maps::{
    Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray, PerCpuValues, xdp::DevMapHash,
};
use std::collections::{HashMap as StdHashMap, HashSet};

use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, Backend, BackendMeta, Flow, FlowKey, Frontend, FrontendKey,
    NextHop, Reason, ReasonStats, RevNat, SERVICE_META_F_IN_USE, ServiceMeta, ServiceStats,
    addr_filter_slot,
    maps::{self, BPF_F_INNER_MAP, MAGLEV_SIZE_SLOT},
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
        if self.filter.frontends.insert(key) {
            let bits = self.filter.bump(&key.addr, 0, true);
            self.write_filter(bits)?;
        }
        Ok(())
    }

    pub fn remove_frontend(&mut self, key: &FrontendKey) -> Result<(), DataplaneError> {
        let name = maps::FRONTENDS;
        let mut m: HashMap<_, FrontendKey, Frontend> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        absent_ok(m.remove(key)).map_err(map_err(name))?;
        if self.filter.frontends.remove(key) {
            let bits = self.filter.bump(&key.addr, 0, false);
            self.write_filter(bits)?;
        }
        Ok(())
    }

    /// Writes backend `id` (`1..MAX_BACKENDS`) and forgets its cached next hop.
    pub fn set_backend(&mut self, id: u32, value: Backend) -> Result<(), DataplaneError> {
        self.write_backend(id, value)?;
        match self.filter.backends.insert(id, value.addr) {
            Some(old) if old == value.addr => Ok(()),
            old => {
                if let Some(old) = old {
                    let bits = self.filter.bump(&old, 1, false);
                    self.write_filter(bits)?;
                }
                let bits = self.filter.bump(&value.addr, 1, true);
                self.write_filter(bits)
            }
        }
    }

    /// Empties backend `id`'s slot: tracked flows to it are re-selected.
    pub fn remove_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.write_backend(id, Backend::default())?;
        if let Some(old) = self.filter.backends.remove(&id) {
            let bits = self.filter.bump(&old, 1, false);
            self.write_filter(bits)?;
        }
        Ok(())
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

    /// Installs `table` (backend ids, length M, prime) as the service's Maglev table in
    /// one atomic step: a fresh inner array is filled first, then swapped into the
    /// outer map, so a packet sees either the whole old table or the whole new one.
    pub fn set_maglev_table(
        &mut self,
        service_id: u32,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        let name = maps::MAGLEV;
        let size = u32::try_from(table.len()).map_err(|_| DataplaneError::Map {
            name,
            source: MapError::OutOfBounds {
                index: u32::MAX,
                max_entries: u32::MAX,
            },
        })?;
        let mut inner: Array<MapData, u32> =
            Array::create(size + 1, BPF_F_INNER_MAP).map_err(map_err(name))?;
        inner
            .set(MAGLEV_SIZE_SLOT, size, 0)
            .map_err(map_err(name))?;
        for (slot, id) in (1..).zip(table) {
            inner.set(slot, id, 0).map_err(map_err(name))?;
        }
        let mut outer: ArrayOfMaps<_, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        outer.set(service_id, &inner, 0).map_err(map_err(name))
    }

    /// Removes the service's table: its frontends then count `drop_no_backend`.
    pub fn remove_maglev_table(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        let name = maps::MAGLEV;
        let map = self.map_mut(name)?;
        let data: &mut MapData = match map {
            aya::maps::Map::ArrayOfMaps(data) => data,
            _ => {
                return Err(DataplaneError::Map {
                    name,
                    source: MapError::InvalidMapType { map_type: 0 },
                });
            }
        };
        let fd = std::os::fd::AsFd::as_fd(data.fd());
        absent_ok(delete_elem(fd, &service_id)).map_err(map_err(name))
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

    /// The reply translation for a backend -> client flow, if any.
    pub fn rev_nat(&self, key: &FlowKey) -> Result<Option<RevNat>, DataplaneError> {
        let name = maps::REVNAT;
        let m: HashMap<_, FlowKey, RevNat> =
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
    /// pre-filter's bookkeeping from it.
    pub fn snapshot(&mut self) -> Result<Snapshot, DataplaneError> {
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
        self.filter = FilterShadow::default();
        for (key, _) in &snap.frontends {
            self.filter.frontends.insert(*key);
            self.filter.bump(&key.addr, 0, true);
        }
        for (id, meta, filled) in &snap.backends {
            if filled.is_some() {
                self.filter.backends.insert(*id, meta.addr);
                self.filter.bump(&meta.addr, 1, true);
            }
        }
        Ok(snap)
    }

    /// A service's Maglev table as installed (backend ids, without the size slot).
    pub fn maglev_table(&self, service_id: u32) -> Result<Option<Vec<u32>>, DataplaneError> {
        let name = maps::MAGLEV;
        let outer: ArrayOfMaps<_, Array<MapData, u32>> =
            ArrayOfMaps::try_from(self.map(name)?).map_err(map_err(name))?;
        let inner = match outer.get(&service_id, 0) {
            Ok(inner) => inner,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_err(name)(e)),
        };
        // Slot 0 holds the size M, slots 1..=M the table.
        let slots: Vec<u32> = super::arrays::data_values(aya::maps::IterableMap::map(&inner))
            .map_err(map_err(name))?;
        let size = slots.get(MAGLEV_SIZE_SLOT as usize).copied().unwrap_or(0) as usize;
        slots
            .get(1..=size)
            .map(|table| Some(table.to_vec()))
            .ok_or(map_err(name)(MapError::OutOfBounds {
                index: u32::try_from(size).unwrap_or(u32::MAX),
                max_entries: u32::try_from(slots.len()).unwrap_or(u32::MAX),
            }))
    }
}

fn optional<V>(result: Result<V, MapError>) -> Result<Option<V>, MapError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `BPF_MAP_DELETE_ELEM` on an array-of-maps slot (aya 0.14 has no typed delete for it).
fn delete_elem(fd: std::os::fd::BorrowedFd<'_>, key: &u32) -> Result<(), MapError> {
    use std::os::fd::AsRawFd as _;
    // union bpf_attr for BPF_MAP_DELETE_ELEM: map_fd (u32), pad, key (u64 pointer).
    #[repr(C)]
    struct DeleteAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = DeleteAttr {
        map_fd: fd.as_raw_fd().cast_unsigned(),
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for this command and outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            &raw const attr,
            size_of::<DeleteAttr>(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let io_error = std::io::Error::last_os_error();
    if io_error.raw_os_error() == Some(libc::ENOENT) {
        return Err(MapError::KeyNotFound);
    }
    Err(MapError::IoError(io_error))
}
