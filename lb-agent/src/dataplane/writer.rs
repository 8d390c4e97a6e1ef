//! Executes a plan's ops in order against the maps, mirroring each successful write
//! into `Applied`, so after a failure `Applied` still says exactly what the maps hold
//! and the next plan picks up from there.

use lb_common::{BackendMeta, ServiceMeta};

use crate::plan::{Applied, Op, Plan};

use super::maps::Snapshot;
use super::{Dataplane, DataplaneError};

impl Dataplane {
    /// One map write.
    pub fn execute(&mut self, op: &Op) -> Result<(), DataplaneError> {
        match op {
            Op::SetServiceMeta { id, meta } => self.set_service_meta(*id, meta),
            Op::ClearServiceMeta { id } => self.set_service_meta(*id, &ServiceMeta::default()),
            Op::ResetStats { id } => self.reset_service_stats(*id),
            Op::SetBackend { id, backend } => self.set_backend(*id, *backend),
            Op::RemoveBackend { id } => self.remove_backend(*id),
            Op::SetBackendMeta { id, meta } => self.set_backend_meta(*id, meta),
            Op::ClearBackendMeta { id } => self.set_backend_meta(*id, &BackendMeta::default()),
            Op::SetTable { service_id, table } => self.set_maglev_table(*service_id, table),
            Op::RemoveTable { service_id } => self.remove_maglev_table(*service_id),
            Op::SetFrontend { key, value } => self.set_frontend(*key, *value),
            Op::RemoveFrontend { key } => self.remove_frontend(key),
        }
    }

    /// Runs `plan` in order; stops at the first failing write (later ops may depend
    /// on it) and returns it with the number of writes done.
    pub fn apply(
        &mut self,
        plan: &Plan,
        applied: &mut Applied,
    ) -> Result<usize, (usize, DataplaneError)> {
        for (done, op) in plan.ops.iter().enumerate() {
            if let Err(e) = self.execute(op) {
                applied.conclude(plan, false);
                return Err((done, e));
            }
            applied.record(op);
        }
        applied.conclude(plan, true);
        Ok(plan.ops.len())
    }

    /// What the maps hold, as the planner sees it (after an agent restart).
    pub fn restore(&mut self) -> Result<Applied, DataplaneError> {
        let Snapshot {
            frontends,
            services,
            backends,
            tables,
        } = self.snapshot()?;
        Ok(Applied::from_maps(
            services.into_iter().collect(),
            backends.iter().map(|(id, meta, _)| (*id, *meta)).collect(),
            backends
                .iter()
                .filter_map(|(id, _, slot)| slot.map(|s| (*id, s)))
                .collect(),
            frontends.into_iter().collect(),
            tables.into_iter().collect(),
        ))
    }
}
