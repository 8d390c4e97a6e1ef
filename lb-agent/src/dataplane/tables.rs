//! Maglev tables in the data plane. Each service's inner array holds its table twice
//! (`lb_common::maps::MAGLEV_HEADER_SLOT`): a change writes the copy packets are not
//! reading through a memory mapping and flips the header: microseconds, and no syscall
//! per slot. Only a new service or a new table size swaps an inner array into the outer
//! map; those swaps are batched, because the kernel makes every map-in-map update wait
//! for running programs (an RCU grace period, milliseconds).
//!
//! Grace periods (see `grace`) keep flips hitless.

use std::os::fd::AsFd as _;

use aya::maps::{Array, ArrayOfMaps, IterableMap as _, MapData, MapError};
use lb_common::maps::{self, MAGLEV_HALF_BIT, MAGLEV_HEADER_SLOT, MAGLEV_INNER_FLAGS, MaglevSlot};

use super::grace;
use super::sys::{self, MappedArray};
use super::{Dataplane, DataplaneError};

const NAME: &str = maps::MAGLEV;

fn map_err(source: MapError) -> DataplaneError {
    DataplaneError::Map { name: NAME, source }
}

fn io_err(e: std::io::Error) -> DataplaneError {
    map_err(MapError::IoError(e))
}

fn bpf_err(source: sys::BpfError) -> DataplaneError {
    DataplaneError::Bpf { name: NAME, source }
}

/// Elements of an inner array for a table of `size` slots: the header, then one per
/// slot (holding both copies).
fn entries(size: u32) -> Result<u32, DataplaneError> {
    size.checked_add(1)
        .filter(|_| size & MAGLEV_HALF_BIT == 0)
        .ok_or(map_err(MapError::OutOfBounds {
            index: size,
            max_entries: MAGLEV_HALF_BIT - 1,
        }))
}

/// The word of a mapped inner array that holds slot `element` of copy `second`.
fn word(element: u32, second: bool) -> usize {
    2 * element as usize + usize::from(second)
}

/// Maps an inner array of `entries` elements.
fn mapped(fd: std::os::fd::BorrowedFd<'_>, entries: u32) -> Result<MappedArray, DataplaneError> {
    MappedArray::new(fd, entries as usize * size_of::<MaglevSlot>()).map_err(io_err)
}

/// Writes `table` into one copy, which no packet may be reading.
fn write_copy(mapped: &MappedArray, second: bool, table: &[u32]) {
    for (element, id) in (1..).zip(table) {
        mapped.store_relaxed(word(element, second), *id);
    }
}

fn table_size(table: &[u32]) -> Result<u32, DataplaneError> {
    u32::try_from(table.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or(map_err(MapError::OutOfBounds {
            index: u32::MAX,
            max_entries: MAGLEV_HALF_BIT - 1,
        }))
}

/// Inner arrays swapped into the outer map per `BPF_MAP_UPDATE_BATCH`: each is an open
/// fd until then, so stay well inside the process's descriptor limit.
fn swap_chunk() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    };
    (soft.saturating_sub(256) / 2).clamp(64, 8192)
}

impl Dataplane {
    fn outer(&self) -> Result<ArrayOfMaps<&MapData, MapData>, DataplaneError> {
        ArrayOfMaps::try_from(self.map(NAME)?).map_err(map_err)
    }

    /// The service's inner array, if it has one.
    fn inner(&self, service_id: u32) -> Result<Option<MapData>, DataplaneError> {
        match self.outer()?.get(&service_id, 0) {
            Ok(inner) => Ok(Some(inner)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Installs `table` (backend ids, length M, prime) as the service's Maglev table in
    /// one atomic step for packets.
    pub fn set_maglev_table(
        &mut self,
        service_id: u32,
        table: &[u32],
    ) -> Result<(), DataplaneError> {
        self.set_maglev_tables(&[(service_id, table)], |_| true)
            .map_err(|(_, e)| e)
    }

    /// Installs several tables: flips in place where the service has an inner array of
    /// the right size, and swaps new inner arrays in for the others, a batch at a time
    /// (built on every CPU when there are many). `installed` says which services may
    /// have an inner array (false: do not look). On error, returns the index of the
    /// table that failed; the ones before it are installed.
    pub fn set_maglev_tables(
        &mut self,
        tables: &[(u32, &[u32])],
        installed: impl Fn(u32) -> bool,
    ) -> Result<(), (usize, DataplaneError)> {
        let mut fresh = Vec::new();
        for (i, (service_id, table)) in tables.iter().enumerate() {
            let flipped = if installed(*service_id) {
                self.flip(*service_id, table)
            } else {
                Ok(false)
            };
            match flipped {
                Ok(true) => {}
                Ok(false) => fresh.push(i),
                Err(e) => {
                    self.swap_fresh(tables, &fresh)?;
                    return Err((i, e));
                }
            }
        }
        self.swap_fresh(tables, &fresh)
    }

    /// New inner arrays for `tables[i]`, `i` in `fresh`, swapped in a batch at a time.
    fn swap_fresh(
        &mut self,
        tables: &[(u32, &[u32])],
        fresh: &[usize],
    ) -> Result<(), (usize, DataplaneError)> {
        for part in fresh.chunks(swap_chunk()) {
            let mut built = Vec::with_capacity(part.len());
            let mut failed = None;
            for (&i, inner) in part.iter().zip(new_inners(tables, part)) {
                match inner {
                    Ok(inner) => built.push((i, tables[i].0, inner)),
                    Err(e) => {
                        failed = Some((i, e));
                        break;
                    }
                }
            }
            self.swap_in(&built)?;
            if let Some(failure) = failed {
                return Err(failure);
            }
        }
        Ok(())
    }

    /// One batched outer-map update for `fresh` (index in the caller's list, service
    /// id, inner array).
    fn swap_in(
        &mut self,
        fresh: &[(usize, u32, Array<MapData, MaglevSlot>)],
    ) -> Result<(), (usize, DataplaneError)> {
        if fresh.is_empty() {
            return Ok(());
        }
        let keys: Vec<u32> = fresh.iter().map(|(_, id, _)| *id).collect();
        let fds: Vec<u32> = fresh
            .iter()
            .map(|(_, _, inner)| {
                use std::os::fd::AsRawFd as _;
                inner.map().fd().as_fd().as_raw_fd().cast_unsigned()
            })
            .collect();
        let map = self.map(NAME).map_err(|e| (fresh[0].0, e))?;
        let data = map_data(map).map_err(|e| (fresh[0].0, e))?;
        let upto = self.grace.now();
        let result = sys::update_batch::<u32, u32>(data.fd().as_fd(), &keys, &fds);
        match result {
            Ok(()) => {
                // The kernel waited for running programs after the update.
                self.grace.waited(upto);
                Ok(())
            }
            Err((done, e)) => Err((fresh[done.min(fresh.len() - 1)].0, bpf_err(e))),
        }
    }

    /// Writes `table` into the copy of the service's inner array that packets are not
    /// reading and makes it live. `false` when the service has no inner array of this
    /// table's size.
    fn flip(&mut self, service_id: u32, table: &[u32]) -> Result<bool, DataplaneError> {
        let size = table_size(table)?;
        let want = entries(size)?;
        let Some(inner) = self.inner(service_id)? else {
            return Ok(false);
        };
        let info = inner.info().map_err(map_err)?;
        if info.max_entries() != want || info.map_flags() != MAGLEV_INNER_FLAGS {
            return Ok(false);
        }
        let mapped = mapped(inner.fd().as_fd(), want)?;
        if self.grace.copy_in_use(service_id) {
            // The copy about to be written was live a moment ago.
            self.wait_for_readers()?;
        }
        let header = word(MAGLEV_HEADER_SLOT, false);
        let second = mapped.load(header) & MAGLEV_HALF_BIT == 0;
        write_copy(&mapped, second, table);
        mapped.publish(header, if second { size | MAGLEV_HALF_BIT } else { size });
        self.grace.flipped(service_id);
        Ok(true)
    }

    /// Returns once no packet can be reading a table copy that was live before the
    /// call (milliseconds), and empties the backend slots that waited for it.
    pub fn wait_for_readers(&mut self) -> Result<(), DataplaneError> {
        let upto = self.grace.now();
        let data = map_data(self.map(NAME)?)?;
        grace::wait_for_readers(data.fd().as_fd()).map_err(io_err)?;
        self.grace.waited(upto);
        self.empty_ready_slots()
    }

    /// Empties backend `id`'s slot now, or once no flipped-out table copy that may name
    /// it can be read any more.
    pub(super) fn empty_slot(&mut self, id: u32) -> Result<(), DataplaneError> {
        if !self.grace.uncovered() {
            return self.empty_slot_now(id);
        }
        let outer = || {
            let data = map_data(self.maps.get(NAME).ok_or(std::io::ErrorKind::NotFound)?)
                .map_err(std::io::Error::other)?;
            data.fd().as_fd().try_clone_to_owned()
        };
        let outer = outer();
        self.grace.defer(id, move || outer);
        Ok(())
    }

    /// Empties the queued slots whose wait is over.
    pub fn empty_ready_slots(&mut self) -> Result<(), DataplaneError> {
        for id in self.grace.ready() {
            self.empty_slot_now(id)?;
        }
        Ok(())
    }

    /// Empties every queued slot, waiting for readers first if one must.
    pub fn settle_slots(&mut self) -> Result<(), DataplaneError> {
        if self.grace.deferred_uncovered() {
            self.wait_for_readers()
        } else {
            self.empty_ready_slots()
        }
    }

    /// Backend slots wait to be emptied (see [`Dataplane::slots_ready`]).
    pub fn slots_waiting(&self) -> bool {
        self.grace.has_deferred()
    }

    /// Told when waiting slots may have become ready to empty.
    pub fn slots_ready(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.grace.done()
    }

    /// Removes the service's table: its frontends then count `drop_no_backend`.
    pub fn remove_maglev_table(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        let map = self.map(NAME)?;
        let data = map_data(map)?;
        let upto = self.grace.now();
        match sys::delete_elem(data.fd().as_fd(), service_id) {
            Ok(()) => {
                self.grace.waited(upto);
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(bpf_err(e)),
        }
    }

    /// A service's Maglev table as installed (backend ids of the live copy).
    pub fn maglev_table(&self, service_id: u32) -> Result<Option<Vec<u32>>, DataplaneError> {
        let Some(inner) = self.inner(service_id)? else {
            return Ok(None);
        };
        let info = inner.info().map_err(map_err)?;
        let mapped = mapped(inner.fd().as_fd(), info.max_entries())?;
        let header = mapped.load(word(MAGLEV_HEADER_SLOT, false));
        let size = header & !MAGLEV_HALF_BIT;
        if size >= info.max_entries() {
            return Err(map_err(MapError::OutOfBounds {
                index: header,
                max_entries: info.max_entries(),
            }));
        }
        let second = header & MAGLEV_HALF_BIT != 0;
        Ok(Some(
            (1..=size).map(|e| mapped.load(word(e, second))).collect(),
        ))
    }

    /// Service ids whose slot holds a table.
    pub fn maglev_services(&self) -> Result<Vec<u32>, DataplaneError> {
        let data = map_data(self.map(NAME)?)?;
        let mut ids = Vec::new();
        sys::for_each::<u32>(data.fd().as_fd(), 4096, |id, _| {
            if id != 0 {
                ids.push(id);
            }
        })
        .map_err(bpf_err)?;
        Ok(ids)
    }
}

/// Below this many new inner arrays, one thread creates them.
const PARALLEL_INNERS: usize = 64;

/// New inner arrays for `tables[i]`, `i` in `which`, in order; created on every CPU
/// when there are many (the kernel's allocation and zeroing dominate).
fn new_inners(
    tables: &[(u32, &[u32])],
    which: &[usize],
) -> Vec<Result<Array<MapData, MaglevSlot>, DataplaneError>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if which.len() < PARALLEL_INNERS || threads < 2 {
        return which.iter().map(|&i| new_inner(tables[i].1)).collect();
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = which
            .chunks(which.len().div_ceil(threads))
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&i| new_inner(tables[i].1))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("creating inner arrays panicked"))
            .collect()
    })
}

/// A new inner array holding `table` in its first copy, live.
fn new_inner(table: &[u32]) -> Result<Array<MapData, MaglevSlot>, DataplaneError> {
    let size = table_size(table)?;
    let entries = entries(size)?;
    let inner: Array<MapData, MaglevSlot> =
        Array::create(entries, MAGLEV_INNER_FLAGS).map_err(map_err)?;
    let mapped = mapped(inner.map().fd().as_fd(), entries)?;
    write_copy(&mapped, false, table);
    mapped.publish(word(MAGLEV_HEADER_SLOT, false), size);
    Ok(inner)
}

/// The map behind any of the kinds the program declares.
pub(super) fn map_data(map: &aya::maps::Map) -> Result<&MapData, DataplaneError> {
    use aya::maps::Map;
    match map {
        Map::Array(d)
        | Map::ArrayOfMaps(d)
        | Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuArray(d)
        | Map::DevMapHash(d) => Ok(d),
        _ => Err(DataplaneError::Map {
            name: "?",
            source: MapError::InvalidMapType { map_type: 0 },
        }),
    }
}
