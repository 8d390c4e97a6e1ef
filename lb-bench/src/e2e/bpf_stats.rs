//! xlb's own kernel work as the kernel counts it: the run time and run count of each
//! agent's programs (the XDP and tc programs behind the links it pinned), read before and
//! after a measurement.
//!
//! The kernel keeps these counters only while run-time statistics are on. They are turned
//! on with `BPF_ENABLE_STATS` ([`enable`]), which is what `kernel.bpf_stats_enabled=1`
//! does, but held by a file descriptor: the kernel turns them off again when the last
//! holder closes it, so an interrupted benchmark cannot leave them on. Like the sysctl it
//! is global: while the benchmark runs, every BPF program on the machine pays two clock
//! reads per run (tens of nanoseconds), xlb's included.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result};
use aya::programs::links::{FdLink, PinnedLink};

/// How deep [`linked_program_ids`] looks under a pin directory.
const MAX_PIN_DEPTH: usize = 2;

/// Run-time statistics are on while this lives.
pub struct StatsEnabled {
    _fd: OwnedFd,
}

/// Turns on run-time statistics for every BPF program until the result is dropped.
pub fn enable() -> Result<StatsEnabled> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("BPF_ENABLE_STATS (run time) failed")?;
    Ok(StatsEnabled { _fd: fd })
}

/// One program's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProgramStat {
    /// The node whose agent attached it.
    pub node: String,
    pub name: String,
    pub id: u32,
    pub runs: u64,
    pub run_ns: u64,
}

/// The counters of the programs behind every BPF link pinned under each agent's pin
/// directory (node name, directory): its XDP program and its tc programs (TCX links,
/// which Debian's bpftool 7.1 does not list).
pub fn snapshot(agents: &[(&str, &Path)]) -> Result<Vec<ProgramStat>> {
    let mut wanted = BTreeMap::new();
    for (node, dir) in agents {
        for id in linked_program_ids(dir)? {
            wanted.insert(id, (*node).to_owned());
        }
    }
    let mut out = Vec::new();
    for info in aya::programs::loaded_programs() {
        // A program of another process can go away while the list is read.
        let Ok(info) = info else { continue };
        if let Some(node) = wanted.get(&info.id()) {
            out.push(ProgramStat {
                node: node.clone(),
                name: info.name_as_str().unwrap_or("?").to_owned(),
                id: info.id(),
                runs: info.run_count(),
                run_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            });
        }
    }
    out.sort_by(|a, b| (&a.node, &a.name, a.id).cmp(&(&b.node, &b.name, b.id)));
    Ok(out)
}

/// The program ids of the links pinned in `dir` and its subdirectories (maps and other
/// pins are not links and are passed over).
fn linked_program_ids(dir: &Path) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut dirs = vec![(dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if depth < MAX_PIN_DEPTH {
                    dirs.push((path, depth + 1));
                }
                continue;
            }
            let Ok(link) = PinnedLink::from_pin(&path) else {
                continue;
            };
            if let Ok(info) = FdLink::from(link).info() {
                ids.push(info.program_id());
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Each program of `after` less its counters in `before` (programs that were not there
/// before count from zero).
pub fn since(after: &[ProgramStat], before: &[ProgramStat]) -> Vec<ProgramStat> {
    after
        .iter()
        .map(|a| {
            let b = before.iter().find(|b| b.id == a.id);
            ProgramStat {
                runs: a.runs - b.map_or(0, |b| b.runs.min(a.runs)),
                run_ns: a.run_ns - b.map_or(0, |b| b.run_ns.min(a.run_ns)),
                ..a.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas() {
        let p = |id, runs, run_ns| ProgramStat {
            node: "n".into(),
            name: "p".into(),
            id,
            runs,
            run_ns,
        };
        let d = since(&[p(1, 10, 1000), p(2, 5, 50)], &[p(1, 4, 400)]);
        assert_eq!((d[0].runs, d[0].run_ns), (6, 600));
        assert_eq!((d[1].runs, d[1].run_ns), (5, 50));
    }
}
