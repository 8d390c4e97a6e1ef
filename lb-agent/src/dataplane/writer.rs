//! Executes a plan's ops in order against the maps, mirroring each successful write
//! into `Applied`, so after a failure `Applied` still says exactly what the maps hold
//! and the next plan picks up from there.

use lb_common::{BackendMeta, ServiceMeta};

use lb_core::plan::{Applied, Op, Plan};

use super::batch;
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
            Op::RemoveBackend { id } => self.empty_slot(*id),
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
    /// on it) and returns it with the number of writes done. Consecutive plain writes
    /// and consecutive table swaps go to the kernel in batches (see `batch`, `tables`).
    pub fn apply(
        &mut self,
        plan: &Plan,
        applied: &mut Applied,
    ) -> Result<usize, (usize, DataplaneError)> {
        let result = self.apply_ops(&plan.ops, applied);
        applied.conclude(plan, result.is_ok());
        result.map(|()| plan.ops.len())
    }

    fn apply_ops(
        &mut self,
        ops: &[Op],
        applied: &mut Applied,
    ) -> Result<(), (usize, DataplaneError)> {
        let mut done = 0;
        while done < ops.len() {
            let rest = &ops[done..];
            let plain = rest.iter().take_while(|op| batch::is_plain(op)).count();
            let tables = rest
                .iter()
                .take_while(|op| matches!(op, Op::SetTable { .. }))
                .count();
            let (run, result) = if plain > 0 {
                (plain, self.write_run(&rest[..plain]))
            } else if tables > 0 {
                let list: Vec<(u32, &[u32])> = rest[..tables]
                    .iter()
                    .filter_map(|op| match op {
                        Op::SetTable { service_id, table } => Some((*service_id, table.as_slice())),
                        _ => None,
                    })
                    .collect();
                let present = &applied.tables;
                (
                    tables,
                    self.set_maglev_tables(&list, |id| present.contains(&id)),
                )
            } else {
                (1, self.execute(&rest[0]).map_err(|e| (0, e)))
            };
            let written = result.as_ref().map_or_else(|(n, _)| *n, |()| run);
            for op in &rest[..written] {
                applied.record(op);
            }
            result.map_err(|(n, e)| (done + n, e))?;
            done += run;
        }
        Ok(())
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
            self.source_ranges()?.into_iter().collect(),
        ))
    }
}
