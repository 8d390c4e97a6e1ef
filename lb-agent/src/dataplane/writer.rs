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
            Op::AddSourceRange { service_id, range } => self.add_source_range(*service_id, *range),
            Op::RemoveSourceRange { service_id, range } => {
                self.remove_source_range(*service_id, *range)
            }
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
            self.execute(op).map_err(|e| (done, e))?;
            applied.record(op);
        }
        Ok(plan.ops.len())
    }

    /// What the maps hold, as the planner sees it (after an agent restart).
    pub fn restore(&mut self) -> Result<Applied, DataplaneError> {
        let Snapshot {
            frontends,
            services,
            backends,
        } = self.snapshot()?;
        Ok(Applied {
            services: services.into_iter().collect(),
            slots: backends
                .iter()
                .filter_map(|(id, _, slot)| slot.map(|s| (*id, s)))
                .collect(),
            backends: backends
                .into_iter()
                .map(|(id, meta, _)| (id, meta))
                .collect(),
            frontends: frontends.into_iter().collect(),
            source_ranges: self.source_ranges()?.into_iter().collect(),
        })
    }
}
