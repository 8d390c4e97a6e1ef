//! The map writes and reads the writer needs, as a trait (Cilium's `LBMaps`): the
//! kernel's maps implement it (`Dataplane`, in `maps`), and so does an in-memory fake
//! that fails writes on demand, so the writer's ordering and resume logic is tested
//! without privileges. Slices are batches: the kernel side sends a slice of several
//! entries as one batch command and a slice of one as a single-element command. A
//! batch that fails returns how many of its entries were written (in order), so the
//! writer can record exactly those.

use ipnet::IpNet;
use lb_common::{Backend, BackendMeta, Frontend, FrontendKey, ServiceMeta};

use super::DataplaneError;

/// A failed batch: how many entries were written before the error.
pub type Batch = (usize, DataplaneError);

pub trait MapStore {
    /// Zeroes these service ids' counters.
    fn reset_stats(&mut self, ids: &[u32]) -> Result<(), Batch>;
    fn set_service_metas(&mut self, metas: &[(u32, ServiceMeta)]) -> Result<(), Batch>;
    fn set_backend_metas(&mut self, metas: &[(u32, BackendMeta)]) -> Result<(), Batch>;
    /// Fills backend slots (`Backend::default()` empties one) and forgets their next
    /// hops. A slot a flipped-out table copy may still name is emptied once no packet
    /// can read that copy (see `grace`); for the planner it is empty at once.
    fn set_backends(&mut self, slots: &[(u32, Backend)]) -> Result<(), Batch>;
    fn set_frontends(&mut self, frontends: &[(FrontendKey, Frontend)]) -> Result<(), Batch>;
    /// A frontend already gone is success.
    fn remove_frontends(&mut self, keys: &[FrontendKey]) -> Result<(), Batch>;
    /// Address pre-filter slots and their bits.
    fn set_addr_filter(&mut self, slots: &[(u32, u8)]) -> Result<(), Batch>;
    /// Installs each table (service id, backend ids) whole, in one step for packets.
    /// `installed` says which services may already have one (false: do not look). On
    /// error, the index of the table that failed; the ones before it are installed.
    fn set_tables(
        &mut self,
        tables: &[(u32, &[u32])],
        installed: &dyn Fn(u32) -> bool,
    ) -> Result<(), Batch>;
    /// A table already gone is success.
    fn remove_table(&mut self, service_id: u32) -> Result<(), DataplaneError>;
    fn add_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), DataplaneError>;
    /// A range already gone is success.
    fn remove_source_range(&mut self, service_id: u32, range: IpNet) -> Result<(), DataplaneError>;
    /// Everything the writer keeps in the maps, read back (after a restart).
    fn contents(&mut self) -> Result<Snapshot, DataplaneError>;
}

/// Everything the agent keeps in the maps, read back.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub frontends: Vec<(FrontendKey, Frontend)>,
    /// Service id -> metadata, for slots marked in use.
    pub services: Vec<(u32, ServiceMeta)>,
    /// Backend id -> metadata (default when only the slot is filled, a write
    /// interrupted by a crash), and the slot when it is filled (forwarding).
    pub backends: Vec<(u32, BackendMeta, Option<Backend>)>,
    /// Service ids whose Maglev slot holds a table.
    pub tables: Vec<u32>,
    pub source_ranges: Vec<(u32, IpNet)>,
    /// Address pre-filter slots with any bit.
    pub filter: Vec<(u32, u8)>,
}
