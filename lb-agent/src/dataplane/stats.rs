//! The read side for observation: per-backend counters, how full the LRU tables are,
//! and the single-entry lookups `trace` needs. Nothing here writes a map; `/metrics`,
//! `lb-agent status --stats` and `lb-agent trace` open their own handles to the pinned
//! maps (`Dataplane::open_pinned`), so none of it runs on the writer's path.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::maps::{HashMap, LpmTrie, MapError, PerCpuArray, lpm_trie::Key};
use lb_common::{
    Affinity, AffinityKey, Backend, BackendMeta, BackendStats, FlowKey, Frontend, FrontendKey,
    NextHop, SERVICE_META_F_IN_USE, SOURCE_RANGE_LOOKUP_BITS, ServiceMeta, SourceRangeKey,
    TrackedFlow, maps,
};

use super::maps::{map_err, optional};
use super::tables::map_data;
use super::{Dataplane, DataplaneError};

/// How full an LRU table is: entries counted now, and its capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableFill {
    pub entries: u64,
    pub capacity: u64,
}

impl Dataplane {
    /// Services whose metadata slot is in use, by id (one memory-mapped copy).
    pub fn services_in_use(&self) -> Result<Vec<(u32, ServiceMeta)>, DataplaneError> {
        let name = maps::SERVICE_META;
        let metas: Vec<ServiceMeta> =
            super::arrays::array_values(self.map(name)?).map_err(map_err(name))?;
        Ok((0..)
            .zip(metas)
            .skip(1)
            .filter(|(_, m)| m.flags & SERVICE_META_F_IN_USE != 0)
            .collect())
    }

    /// Backend ids with metadata, and the backend slot when it is filled.
    pub fn backends_in_use(
        &self,
    ) -> Result<Vec<(u32, BackendMeta, Option<Backend>)>, DataplaneError> {
        let meta_name = maps::BACKEND_META;
        let metas: Vec<BackendMeta> =
            super::arrays::array_values(self.map(meta_name)?).map_err(map_err(meta_name))?;
        let name = maps::BACKENDS;
        let slots: Vec<Backend> =
            super::arrays::array_values(self.map(name)?).map_err(map_err(name))?;
        Ok((0..)
            .zip(metas.into_iter().zip(slots))
            .skip(1)
            .filter(|(_, (meta, _))| meta.family != 0)
            .map(|(id, (meta, slot))| (id, meta, (slot.family != 0).then_some(slot)))
            .collect())
    }

    /// Every frontend, in key order.
    pub fn frontends(&self) -> Result<Vec<(FrontendKey, Frontend)>, DataplaneError> {
        let name = maps::FRONTENDS;
        let m: HashMap<_, FrontendKey, Frontend> =
            HashMap::try_from(self.map(name)?).map_err(map_err(name))?;
        let mut all = Vec::new();
        // Bounded by the map's size, even if entries churn while we walk.
        for entry in m.iter().take(maps::MAX_FRONTENDS as usize) {
            all.push(entry.map_err(map_err(name))?);
        }
        all.sort_by_key(|(k, _)| *k);
        Ok(all)
    }

    pub fn frontend(&self, key: &FrontendKey) -> Result<Option<Frontend>, DataplaneError> {
        self.hash_get(maps::FRONTENDS, key)
    }

    /// Backend slot `id` as the program reads it (family 0: empty).
    pub fn backend_slot(&self, id: u32) -> Result<Backend, DataplaneError> {
        self.array_get(maps::BACKENDS, id)
    }

    pub fn backend_meta(&self, id: u32) -> Result<BackendMeta, DataplaneError> {
        self.array_get(maps::BACKEND_META, id)
    }

    pub fn service_meta(&self, id: u32) -> Result<ServiceMeta, DataplaneError> {
        self.array_get(maps::SERVICE_META, id)
    }

    /// The cached next hop towards backend `id` (expired or empty ones included).
    pub fn next_hop(&self, id: u32) -> Result<NextHop, DataplaneError> {
        self.array_get(maps::NEXTHOPS, id)
    }

    /// The conntrack entry of a client flow (`flow` exists in `maps.rs` too; this one
    /// is the read side's).
    pub fn tracked(&self, key: &FlowKey) -> Result<Option<TrackedFlow>, DataplaneError> {
        self.flow(key)
    }

    pub fn affinity_entry(&self, key: &AffinityKey) -> Result<Option<Affinity>, DataplaneError> {
        self.affinity(key)
    }

    /// Whether one of the service's source ranges holds `client` (the program's lookup).
    pub fn source_range_admits(
        &self,
        service_id: u32,
        family: u8,
        client: [u8; 16],
    ) -> Result<bool, DataplaneError> {
        let name = maps::SOURCE_RANGES;
        let m: LpmTrie<_, SourceRangeKey, u32> =
            LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
        let key = Key::new(
            SOURCE_RANGE_LOOKUP_BITS,
            SourceRangeKey::new(service_id, family, client),
        );
        Ok(optional(m.get(&key, 0)).map_err(map_err(name))?.is_some())
    }

    /// New flows backend `id` got, summed over CPUs.
    pub fn backend_new_flows(&self, id: u32) -> Result<u64, DataplaneError> {
        let name = maps::BACKEND_STATS;
        let m: PerCpuArray<_, BackendStats> =
            PerCpuArray::try_from(self.map(name)?).map_err(map_err(name))?;
        let per_cpu = m.get(&id, 0).map_err(map_err(name))?;
        Ok(per_cpu.iter().map(|s| s.new_flows).sum())
    }

    /// Entries in the LRU table `name` (conntrack, reply translations, affinity),
    /// counted now in batches: at most `capacity / 4096 + 2` syscalls.
    pub fn table_fill(&self, name: &'static str) -> Result<TableFill, DataplaneError> {
        let data = map_data(self.map(name)?)?;
        let info = data.info().map_err(map_err(name))?;
        let capacity = info.max_entries();
        let entries = count_entries(
            data.fd().as_fd(),
            info.key_size() as usize,
            info.value_size() as usize,
            capacity,
        )
        .map_err(|e| DataplaneError::Map {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "bpf_map_lookup_batch",
                io_error: e,
            }),
        })?;
        Ok(TableFill {
            entries,
            capacity: u64::from(capacity),
        })
    }
}

use super::sys::{
    BatchAttr, MAP_GET_NEXT_KEY as BPF_MAP_GET_NEXT_KEY,
    MAP_LOOKUP_BATCH_CMD as BPF_MAP_LOOKUP_BATCH,
};
/// The kernel's ENOTSUPP: no batch operations for this map type (or kernel).
const ENOTSUPP: i32 = 524;
const CHUNK: u32 = 4096;

#[repr(C)]
struct NextKeyAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    next_key: u64,
}

fn bpf<A>(cmd: super::sys::Cmd, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd` (the structs above); every
    // pointer in it points at a live buffer as large as the kernel will write.
    // The errno itself (not wrapped), so callers can match ENOENT and ENOTSUPP.
    unsafe { super::sys::command(cmd, attr) }
        .map(drop)
        .map_err(|e| e.errno)
}

/// Counts a hash map's entries, never more than `capacity`: batches of `CHUNK`
/// (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6), else key by key.
fn count_entries(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    capacity: u32,
) -> io::Result<u64> {
    let mut keys = vec![0u8; key_size * CHUNK as usize];
    let mut values = vec![0u8; value_size * CHUNK as usize];
    // Hash maps' batch token is a bucket index (u32).
    let mut token = 0u64;
    let mut total = 0u64;
    for round in 0..=capacity / CHUNK + 1 {
        let mut attr = BatchAttr {
            in_batch: if round == 0 {
                0
            } else {
                std::ptr::from_ref(&token) as u64
            },
            out_batch: std::ptr::from_mut(&mut token) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK,
            map_fd: fd.as_raw_fd().cast_unsigned(),
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        total += u64::from(attr.count);
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) if round == 0 && matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => {
                return count_keys(fd, key_size, capacity);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total.min(u64::from(capacity)))
}

/// Counts entries key by key (kernels without batches); at most `capacity` steps.
fn count_keys(fd: BorrowedFd<'_>, key_size: usize, capacity: u32) -> io::Result<u64> {
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut total = 0u64;
    let mut first = true;
    while total < u64::from(capacity) {
        let mut attr = NextKeyAttr {
            map_fd: fd.as_raw_fd().cast_unsigned(),
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        total += 1;
    }
    Ok(total)
}
