//! A run of plain writes (every op but Maglev table and source range ops), sent with one
//! batch per map instead of one write per op: a 10,000-service sync is some 250,000
//! writes. Within a run the order across maps does not matter for packets (the plan
//! puts table swaps and address-filter writes, which do order them, in runs of their
//! own); within a map it is kept.

use lb_common::{Backend, BackendMeta, Frontend, FrontendKey, ServiceMeta};
use lb_core::plan::Op;

use super::DataplaneError;
use super::store::{Batch, MapStore};

/// How the writer groups consecutive ops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Batched with their neighbours of the same kind.
    Plain,
    /// Address-filter writes: batched, but never with the writes they order.
    Filter,
    /// Table swaps: batched (the kernel waits for running programs once per batch).
    Tables,
    /// One at a time: table removals, and source ranges (few, and an LPM trie has no
    /// batch update; their order against frontends matters).
    Single,
}

impl Run {
    pub fn of(op: &Op) -> Run {
        match op {
            Op::SetAddrFilter { .. } => Run::Filter,
            Op::SetTable { .. } => Run::Tables,
            Op::RemoveTable { .. } | Op::AddSourceRange { .. } | Op::RemoveSourceRange { .. } => {
                Run::Single
            }
            Op::SetServiceMeta { .. }
            | Op::ResetStats { .. }
            | Op::SetBackend { .. }
            | Op::SetBackendMeta { .. }
            | Op::SetFrontend { .. }
            | Op::RemoveFrontend { .. }
            | Op::RemoveBackend { .. }
            | Op::ClearBackendMeta { .. }
            | Op::ClearServiceMeta { .. } => Run::Plain,
        }
    }
}

/// The writes of a run, per map, in op order, each with the index of its op.
#[derive(Default)]
struct Writes {
    stats: (Vec<usize>, Vec<u32>),
    service_meta: (Vec<usize>, Vec<(u32, ServiceMeta)>),
    backend_meta: (Vec<usize>, Vec<(u32, BackendMeta)>),
    backends: (Vec<usize>, Vec<(u32, Backend)>),
    set_frontends: (Vec<usize>, Vec<(FrontendKey, Frontend)>),
    removed_frontends: (Vec<usize>, Vec<FrontendKey>),
    filter: (Vec<usize>, Vec<(u32, u8)>),
}

fn push<T>((ops, items): &mut (Vec<usize>, Vec<T>), op: usize, item: T) {
    ops.push(op);
    items.push(item);
}

impl Writes {
    fn gather(ops: &[Op]) -> Self {
        let mut w = Writes::default();
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::ResetStats { id } => push(&mut w.stats, i, *id),
                Op::SetServiceMeta { id, meta } => push(&mut w.service_meta, i, (*id, **meta)),
                Op::ClearServiceMeta { id } => {
                    push(&mut w.service_meta, i, (*id, ServiceMeta::default()));
                }
                Op::SetBackendMeta { id, meta } => push(&mut w.backend_meta, i, (*id, *meta)),
                Op::ClearBackendMeta { id } => {
                    push(&mut w.backend_meta, i, (*id, BackendMeta::default()));
                }
                Op::SetBackend { id, backend } => push(&mut w.backends, i, (*id, *backend)),
                Op::RemoveBackend { id } => push(&mut w.backends, i, (*id, Backend::default())),
                Op::SetFrontend { key, value } => push(&mut w.set_frontends, i, (*key, *value)),
                Op::RemoveFrontend { key } => push(&mut w.removed_frontends, i, *key),
                Op::SetAddrFilter { slot, bits } => push(&mut w.filter, i, (*slot, *bits)),
                Op::SetTable { .. }
                | Op::RemoveTable { .. }
                | Op::AddSourceRange { .. }
                | Op::RemoveSourceRange { .. } => unreachable!("not in a batched run"),
            }
        }
        w
    }

    /// One batch per map, in an order a packet may meet them (metadata before what
    /// names it). On error, pushes the ops written onto `written`.
    fn write(&self, store: &mut impl MapStore, written: &mut Vec<usize>) -> Result<(), ()> {
        fn some<T>(
            (ops, items): &(Vec<usize>, Vec<T>),
            written: &mut Vec<usize>,
            write: impl FnOnce(&[T]) -> Result<(), Batch>,
        ) -> Result<(), ()> {
            let done = match (items.is_empty(), write) {
                (true, _) => 0,
                (false, write) => match write(items) {
                    Ok(()) => items.len(),
                    Err((n, _)) => {
                        written.extend(&ops[..n]);
                        return Err(());
                    }
                },
            };
            written.extend(&ops[..done]);
            Ok(())
        }
        some(&self.stats, written, |ids| store.reset_stats(ids))?;
        some(&self.service_meta, written, |m| store.set_service_metas(m))?;
        some(&self.backend_meta, written, |m| store.set_backend_metas(m))?;
        some(&self.backends, written, |b| store.set_backends(b))?;
        some(&self.set_frontends, written, |f| store.set_frontends(f))?;
        some(&self.removed_frontends, written, |k| {
            store.remove_frontends(k)
        })?;
        some(&self.filter, written, |f| store.set_addr_filter(f))
    }
}

/// Writes a run of plain or filter ops and returns which were written (indexes into
/// `ops`) and the first failure. Batches first; when one fails (a frontend to remove
/// that is already gone, a full map), the ops it did not write again one at a time in
/// op order, up to the first that fails, which is the one reported. The batch may have
/// written ops after that one: they are returned too, so the record stays exact.
pub fn write_run(
    store: &mut impl MapStore,
    ops: &[Op],
) -> (Vec<usize>, Option<(usize, DataplaneError)>) {
    let mut written = Vec::new();
    if ops.len() > 1 {
        if Writes::gather(ops).write(store, &mut written).is_ok() {
            return (written, None);
        }
        written.sort_unstable();
    }
    let batched = written.clone();
    for (i, op) in ops.iter().enumerate() {
        if batched.binary_search(&i).is_ok() {
            continue;
        }
        match super::writer::execute(store, op) {
            Ok(()) => written.push(i),
            Err(e) => {
                written.sort_unstable();
                return (written, Some((i, e)));
            }
        }
    }
    written.sort_unstable();
    (written, None)
}
