//! Executes a plan's ops in order against a [`MapStore`], mirroring each successful
//! write into `Applied`, so after a failure `Applied` still says exactly what the maps
//! hold and the next plan picks up from there.

use lb_common::{Backend, BackendMeta, ServiceMeta};

use lb_core::plan::{Applied, Op, Plan};

use super::batch::{self, Run};
use super::store::{Batch, MapStore, Snapshot};
use super::{Dataplane, DataplaneError};

/// One map write.
pub fn execute(store: &mut impl MapStore, op: &Op) -> Result<(), DataplaneError> {
    let one = |result: Result<(), Batch>| result.map_err(|(_, e)| e);
    match op {
        Op::SetServiceMeta { id, meta } => one(store.set_service_metas(&[(*id, **meta)])),
        Op::ClearServiceMeta { id } => {
            one(store.set_service_metas(&[(*id, ServiceMeta::default())]))
        }
        Op::ResetStats { id } => one(store.reset_stats(&[*id])),
        Op::SetBackend { id, backend } => one(store.set_backends(&[(*id, *backend)])),
        Op::RemoveBackend { id } => one(store.set_backends(&[(*id, Backend::default())])),
        Op::SetBackendMeta { id, meta } => one(store.set_backend_metas(&[(*id, *meta)])),
        Op::ClearBackendMeta { id } => {
            one(store.set_backend_metas(&[(*id, BackendMeta::default())]))
        }
        Op::SetTable { service_id, table } => {
            one(store.set_tables(&[(*service_id, table)], &|_| true))
        }
        Op::RemoveTable { service_id } => store.remove_table(*service_id),
        Op::SetFrontend { key, value } => one(store.set_frontends(&[(*key, *value)])),
        Op::RemoveFrontend { key } => one(store.remove_frontends(&[*key])),
        Op::AddSourceRange { service_id, range } => store.add_source_range(*service_id, *range),
        Op::RemoveSourceRange { service_id, range } => {
            store.remove_source_range(*service_id, *range)
        }
        Op::SetAddrFilter { slot, bits } => one(store.set_addr_filter(&[(*slot, *bits)])),
    }
}

/// Runs `plan` in order; stops at the first failing write (later ops may depend on it)
/// and returns it with the number of writes done. Consecutive plain writes, filter
/// writes and table swaps go to the store in batches (see `batch`).
pub fn apply(
    store: &mut impl MapStore,
    plan: &Plan,
    applied: &mut Applied,
) -> Result<usize, (usize, DataplaneError)> {
    let result = apply_ops(store, &plan.ops, applied);
    applied.conclude(plan, result.is_ok());
    result.map(|()| plan.ops.len())
}

fn apply_ops(
    store: &mut impl MapStore,
    ops: &[Op],
    applied: &mut Applied,
) -> Result<(), (usize, DataplaneError)> {
    let mut done = 0;
    while done < ops.len() {
        let rest = &ops[done..];
        let kind = Run::of(&rest[0]);
        let run = rest.iter().take_while(|op| Run::of(op) == kind).count();
        let run = if kind == Run::Single { 1 } else { run };
        let (written, failure) = match kind {
            Run::Plain | Run::Filter => batch::write_run(store, &rest[..run]),
            Run::Tables => {
                let list: Vec<(u32, &[u32])> = rest[..run]
                    .iter()
                    .filter_map(|op| match op {
                        Op::SetTable { service_id, table } => Some((*service_id, table.as_slice())),
                        _ => None,
                    })
                    .collect();
                let present = &applied.tables;
                match store.set_tables(&list, &|id| present.contains(&id)) {
                    Ok(()) => ((0..run).collect(), None),
                    Err((n, e)) => ((0..n).collect(), Some((n, e))),
                }
            }
            Run::Single => match execute(store, &rest[0]) {
                Ok(()) => (vec![0], None),
                Err(e) => (Vec::new(), Some((0, e))),
            },
        };
        for i in written {
            applied.record(&rest[i]);
        }
        if let Some((n, e)) = failure {
            return Err((done + n, e));
        }
        done += run;
    }
    Ok(())
}

/// What the maps hold, as the planner sees it (after an agent restart).
pub fn restore(store: &mut impl MapStore) -> Result<Applied, DataplaneError> {
    let Snapshot {
        frontends,
        services,
        backends,
        tables,
        source_ranges,
        filter,
    } = store.contents()?;
    Ok(Applied::from_maps(
        services.into_iter().collect(),
        backends
            .iter()
            .filter(|(_, meta, _)| meta.family != 0)
            .map(|(id, meta, _)| (*id, *meta))
            .collect(),
        backends
            .iter()
            .filter_map(|(id, _, slot)| slot.map(|s| (*id, s)))
            .collect(),
        frontends.into_iter().collect(),
        tables.into_iter().collect(),
        source_ranges.into_iter().collect(),
        filter.into_iter().collect(),
    ))
}

impl Dataplane {
    /// [`apply`] against the kernel's maps.
    pub fn apply(
        &mut self,
        plan: &Plan,
        applied: &mut Applied,
    ) -> Result<usize, (usize, DataplaneError)> {
        apply(self, plan, applied)
    }

    /// [`restore`] from the kernel's maps.
    pub fn restore(&mut self) -> Result<Applied, DataplaneError> {
        restore(self)
    }
}

#[cfg(test)]
mod tests;
