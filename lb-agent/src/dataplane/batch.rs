//! A run of plain writes (every op but Maglev table and source range ops), sent with one
//! batch command per map instead of one syscall per op: a 10,000-service sync is some
//! 250,000 writes. Within a run the order across maps does not matter for packets (the
//! plan puts table swaps, which do order them, between runs); within a map it is kept.

use std::collections::BTreeMap;
use std::os::fd::AsFd as _;

use aya::maps::MapError;
use lb_common::{
    Backend, BackendMeta, Frontend, FrontendKey, NextHop, ServiceMeta, ServiceStats, maps,
};

use super::sys;
use super::tables::map_data;
use super::{Dataplane, DataplaneError};
use lb_core::plan::Op;

/// The writes of a run, per map, in op order.
#[derive(Default)]
struct Writes {
    stats: Vec<u32>,
    service_meta: (Vec<u32>, Vec<ServiceMeta>),
    backend_meta: (Vec<u32>, Vec<BackendMeta>),
    backends: (Vec<u32>, Vec<Backend>),
    set_frontends: (Vec<FrontendKey>, Vec<Frontend>),
    removed_frontends: Vec<FrontendKey>,
}

impl Writes {
    /// The run's writes; with `defer`, slots to empty are left out (queued instead).
    fn gather(ops: &[Op], defer: bool) -> Self {
        let mut w = Writes::default();
        for op in ops {
            match op {
                Op::ResetStats { id } => w.stats.push(*id),
                Op::SetServiceMeta { id, meta } => push(&mut w.service_meta, *id, **meta),
                Op::ClearServiceMeta { id } => {
                    push(&mut w.service_meta, *id, ServiceMeta::default());
                }
                Op::SetBackendMeta { id, meta } => push(&mut w.backend_meta, *id, *meta),
                Op::ClearBackendMeta { id } => {
                    push(&mut w.backend_meta, *id, BackendMeta::default());
                }
                Op::SetBackend { id, backend } => push(&mut w.backends, *id, *backend),
                Op::RemoveBackend { .. } if defer => {}
                Op::RemoveBackend { id } => push(&mut w.backends, *id, Backend::default()),
                Op::SetFrontend { key, value } => push(&mut w.set_frontends, *key, *value),
                Op::RemoveFrontend { key } => w.removed_frontends.push(*key),
                Op::SetTable { .. }
                | Op::RemoveTable { .. }
                | Op::AddSourceRange { .. }
                | Op::RemoveSourceRange { .. } => {
                    unreachable!("not a plain write")
                }
            }
        }
        w
    }
}

fn push<K, V>((keys, values): &mut (Vec<K>, Vec<V>), key: K, value: V) {
    keys.push(key);
    values.push(value);
}

/// Whether `op` can go in a run: not a table op, and not a source range (few, and an
/// LPM trie has no batch update; their order against frontends matters).
pub fn is_plain(op: &Op) -> bool {
    !matches!(
        op,
        Op::SetTable { .. }
            | Op::RemoveTable { .. }
            | Op::AddSourceRange { .. }
            | Op::RemoveSourceRange { .. }
    )
}

impl Dataplane {
    /// Writes a run of plain ops. Batches first; when one fails (a frontend to remove
    /// that is already gone, a full map), the whole run again one op at a time, which
    /// reports exactly which op failed. On error, returns the index of the failed op:
    /// the ones before it are written.
    pub fn write_run(&mut self, ops: &[Op]) -> Result<(), (usize, DataplaneError)> {
        let reused = ops.iter().any(|op| match op {
            Op::SetBackend { id, .. } => self.grace.is_deferred(*id),
            _ => false,
        });
        if reused {
            // A slot's old backend is still queued to be emptied.
            self.settle_slots().map_err(|e| (0, e))?;
        }
        // Slots a flipped-out copy may name are emptied later (see `grace`).
        let defer = self.grace.uncovered();
        if ops.len() > 1 && self.write_batches(&Writes::gather(ops, defer)).is_ok() {
            let mut filter = BTreeMap::new();
            for (i, op) in ops.iter().enumerate() {
                match op {
                    Op::RemoveBackend { id } if defer => {
                        self.empty_slot(*id).map_err(|e| (i, e))?;
                    }
                    _ => self.note_filter(op, &mut filter),
                }
            }
            let (slots, bits): (Vec<u32>, Vec<u8>) = filter.into_iter().unzip();
            return self
                .batch(maps::ADDR_FILTER, &slots, &bits)
                .map_err(|e| (ops.len() - 1, e));
        }
        for (i, op) in ops.iter().enumerate() {
            self.execute(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Updates the address filter's bookkeeping for a written op; `filter` collects the
    /// final bits per slot.
    fn note_filter(&mut self, op: &Op, filter: &mut BTreeMap<u32, u8>) {
        let writes = match op {
            Op::SetFrontend { key, .. } => self.filter.frontend_set(key).into_iter().collect(),
            Op::RemoveFrontend { key } => self.filter.frontend_removed(key).into_iter().collect(),
            Op::SetBackend { id, backend } => self.filter.backend_set(*id, backend.addr),
            Op::RemoveBackend { id } => self.filter.backend_removed(*id).into_iter().collect(),
            _ => Vec::new(),
        };
        filter.extend(writes);
    }

    fn write_batches(&mut self, w: &Writes) -> Result<(), DataplaneError> {
        self.reset_stats_batch(&w.stats)?;
        self.batch(maps::SERVICE_META, &w.service_meta.0, &w.service_meta.1)?;
        self.batch(maps::BACKEND_META, &w.backend_meta.0, &w.backend_meta.1)?;
        self.batch(maps::BACKENDS, &w.backends.0, &w.backends.1)?;
        // A slot written gets a fresh next hop (the backend may have moved).
        let hops = vec![NextHop::default(); w.backends.0.len()];
        self.batch(maps::NEXTHOPS, &w.backends.0, &hops)?;
        self.batch(maps::FRONTENDS, &w.set_frontends.0, &w.set_frontends.1)?;
        let name = maps::FRONTENDS;
        let data = map_data(self.map(name)?)?;
        sys::delete_batch(data.fd().as_fd(), &w.removed_frontends)
            .map_err(|(_, e)| bpf_err(name, e))
    }

    fn batch<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        keys: &[K],
        values: &[V],
    ) -> Result<(), DataplaneError> {
        if keys.is_empty() {
            return Ok(());
        }
        let data = map_data(self.map(name)?)?;
        sys::update_batch(data.fd().as_fd(), keys, values).map_err(|(_, e)| bpf_err(name, e))
    }

    /// Zeroes per-CPU counters: a batch value is one 8-byte-aligned value per CPU.
    fn reset_stats_batch(&self, ids: &[u32]) -> Result<(), DataplaneError> {
        let name = maps::SERVICE_STATS;
        if ids.is_empty() {
            return Ok(());
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| io_err(name, e))?;
        let per_value = size_of::<ServiceStats>().next_multiple_of(8) * cpus;
        let zeros = vec![0u8; per_value * ids.len()];
        let keys: Vec<u8> = ids.iter().flat_map(|id| id.to_ne_bytes()).collect();
        let data = map_data(self.map(name)?)?;
        sys::update_batch_bytes(data.fd().as_fd(), &keys, &zeros, ids.len())
            .map_err(|(_, e)| bpf_err(name, e))
    }
}

fn io_err(name: &'static str, e: std::io::Error) -> DataplaneError {
    DataplaneError::Map {
        name,
        source: MapError::IoError(e),
    }
}

fn bpf_err(name: &'static str, source: sys::BpfError) -> DataplaneError {
    DataplaneError::Bpf { name, source }
}
