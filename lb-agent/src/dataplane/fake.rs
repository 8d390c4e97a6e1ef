//! An in-memory [`MapStore`] that records every element write in order and fails the
//! writes a test asks for (Cilium's fake `LBMaps`): the writer's ordering and resume
//! logic tested without privileges.

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use ipnet::IpNet;
use lb_common::{
    Backend, BackendMeta, Frontend, FrontendKey, SERVICE_META_F_IN_USE, ServiceMeta, maps,
};

use super::DataplaneError;
use super::store::{Batch, MapStore, Snapshot};
use super::sys::BpfError;

/// One element written, in the order the store saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Stats(u32),
    ServiceMeta(u32, ServiceMeta),
    BackendMeta(u32, BackendMeta),
    Backend(u32, Backend),
    /// `None`: removed.
    Frontend(FrontendKey, Option<Frontend>),
    /// A whole table; `None`: removed.
    Table(u32, Option<Vec<u32>>),
    SourceRange(u32, IpNet, bool),
    Filter(u32, u8),
}

impl Write {
    /// The map and key written: a failure sticks to it.
    fn target(&self) -> (&'static str, String) {
        match self {
            Write::Stats(id) => (maps::SERVICE_STATS, id.to_string()),
            Write::ServiceMeta(id, _) => (maps::SERVICE_META, id.to_string()),
            Write::BackendMeta(id, _) => (maps::BACKEND_META, id.to_string()),
            Write::Backend(id, _) => (maps::BACKENDS, id.to_string()),
            Write::Frontend(key, _) => (maps::FRONTENDS, format!("{key:?}")),
            Write::Table(id, _) => (maps::MAGLEV, id.to_string()),
            Write::SourceRange(id, range, _) => (maps::SOURCE_RANGES, format!("{id} {range}")),
            Write::Filter(slot, _) => (maps::ADDR_FILTER, slot.to_string()),
        }
    }
}

/// The maps' contents, as the kernel would hold them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Maps {
    pub services: BTreeMap<u32, ServiceMeta>,
    pub backend_metas: BTreeMap<u32, BackendMeta>,
    /// Filled slots.
    pub slots: BTreeMap<u32, Backend>,
    pub frontends: BTreeMap<FrontendKey, Frontend>,
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub ranges: BTreeSet<(u32, IpNet)>,
    pub filter: BTreeMap<u32, u8>,
}

impl Maps {
    /// Applies one write.
    pub fn write(&mut self, write: &Write) {
        fn put<K: Ord, V: Default + PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) {
            if value == V::default() {
                map.remove(&key);
            } else {
                map.insert(key, value);
            }
        }
        match write.clone() {
            Write::Stats(_) => {}
            Write::ServiceMeta(id, meta) => put(&mut self.services, id, meta),
            Write::BackendMeta(id, meta) => put(&mut self.backend_metas, id, meta),
            Write::Backend(id, backend) => put(&mut self.slots, id, backend),
            Write::Frontend(key, Some(value)) => {
                self.frontends.insert(key, value);
            }
            Write::Frontend(key, None) => {
                self.frontends.remove(&key);
            }
            Write::Table(id, Some(table)) => {
                self.tables.insert(id, table);
            }
            Write::Table(id, None) => {
                self.tables.remove(&id);
            }
            Write::SourceRange(id, range, true) => {
                self.ranges.insert((id, range));
            }
            Write::SourceRange(id, range, false) => {
                self.ranges.remove(&(id, range));
            }
            Write::Filter(slot, bits) => put(&mut self.filter, slot, bits),
        }
    }
}

/// The in-memory store.
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub maps: Maps,
    /// Every element written, in order.
    pub log: Vec<Write>,
    /// Element writes attempted so far (failed ones too).
    pub attempts: usize,
    /// Fail the element write with this attempt number, and every later write to the
    /// same map and key (a full map or a bad index fails again when retried).
    fail_nth: Option<usize>,
    broken: Option<(&'static str, String)>,
    /// Fail every write to these maps.
    failing_maps: BTreeSet<&'static str>,
}

impl FakeMaps {
    /// A store holding `maps`, with no writes seen and no failures set.
    pub fn holding(maps: Maps) -> Self {
        FakeMaps {
            maps,
            ..FakeMaps::default()
        }
    }

    /// Fails the `n`th element write from now (0: the next one), and any retry of it.
    pub fn fail_nth(&mut self, n: usize) {
        self.fail_nth = Some(self.attempts + n);
    }

    /// Fails every write to map `name`.
    pub fn fail_map(&mut self, name: &'static str) {
        self.failing_maps.insert(name);
    }

    /// Writes succeed again.
    pub fn heal(&mut self) {
        self.fail_nth = None;
        self.broken = None;
        self.failing_maps.clear();
    }

    fn write(&mut self, write: Write) -> Result<(), DataplaneError> {
        let target = write.target();
        let attempt = self.attempts;
        self.attempts += 1;
        if self.fail_nth == Some(attempt) {
            self.broken = Some(target.clone());
        }
        if self.broken.as_ref() == Some(&target) || self.failing_maps.contains(target.0) {
            return Err(DataplaneError::Bpf {
                name: target.0,
                source: BpfError {
                    cmd: "BPF_MAP_UPDATE_ELEM",
                    errno: io::Error::from_raw_os_error(libc::ENOSPC),
                },
            });
        }
        self.maps.write(&write);
        self.log.push(write);
        Ok(())
    }

    fn write_all<T: Copy>(&mut self, items: &[T], write: impl Fn(T) -> Write) -> Result<(), Batch> {
        for (i, item) in items.iter().enumerate() {
            self.write(write(*item)).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

impl MapStore for FakeMaps {
    fn reset_stats(&mut self, ids: &[u32]) -> Result<(), Batch> {
        self.write_all(ids, Write::Stats)
    }

    fn set_service_metas(&mut self, metas: &[(u32, ServiceMeta)]) -> Result<(), Batch> {
        self.write_all(metas, |(id, meta)| Write::ServiceMeta(id, meta))
    }

    fn set_backend_metas(&mut self, metas: &[(u32, BackendMeta)]) -> Result<(), Batch> {
        self.write_all(metas, |(id, meta)| Write::BackendMeta(id, meta))
    }

    fn set_backends(&mut self, slots: &[(u32, Backend)]) -> Result<(), Batch> {
        self.write_all(slots, |(id, backend)| Write::Backend(id, backend))
    }

    fn set_frontends(&mut self, frontends: &[(FrontendKey, Frontend)]) -> Result<(), Batch> {
        self.write_all(frontends, |(key, value)| Write::Frontend(key, Some(value)))
    }

    fn remove_frontends(&mut self, keys: &[FrontendKey]) -> Result<(), Batch> {
        self.write_all(keys, |key| Write::Frontend(key, None))
    }

    fn set_addr_filter(&mut self, slots: &[(u32, u8)]) -> Result<(), Batch> {
        self.write_all(slots, |(slot, bits)| Write::Filter(slot, bits))
    }

    fn set_tables(
        &mut self,
        tables: &[(u32, &[u32])],
        _installed: &dyn Fn(u32) -> bool,
    ) -> Result<(), Batch> {
        for (i, (id, table)) in tables.iter().enumerate() {
            self.write(Write::Table(*id, Some(table.to_vec())))
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn remove_table(&mut self, service_id: u32) -> Result<(), DataplaneError> {
        self.write(Write::Table(service_id, None))
    }

    fn add_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), DataplaneError> {
        self.write(Write::SourceRange(service_id, range, true))
    }

    fn remove_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), DataplaneError> {
        self.write(Write::SourceRange(service_id, range, false))
    }

    /// What the kernel side reads back: services marked in use, backends with metadata
    /// or a filled slot.
    fn contents(&mut self) -> Result<Snapshot, DataplaneError> {
        let m = &self.maps;
        let ids: BTreeSet<u32> = m
            .backend_metas
            .keys()
            .chain(m.slots.keys())
            .copied()
            .collect();
        Ok(Snapshot {
            frontends: m.frontends.iter().map(|(k, v)| (*k, *v)).collect(),
            services: m
                .services
                .iter()
                .filter(|(_, meta)| meta.flags & SERVICE_META_F_IN_USE != 0)
                .map(|(id, meta)| (*id, *meta))
                .collect(),
            backends: ids
                .into_iter()
                .map(|id| {
                    let meta = m.backend_metas.get(&id).copied().unwrap_or_default();
                    (id, meta, m.slots.get(&id).copied())
                })
                .collect(),
            tables: m.tables.keys().copied().collect(),
            source_ranges: m.ranges.iter().copied().collect(),
            filter: m.filter.iter().map(|(s, b)| (*s, *b)).collect(),
        })
    }
}
