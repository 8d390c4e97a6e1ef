//! xlb's own kernel work as the kernel counts it: the run time and run count of every BPF
//! program attached in a namespace (XDP and tc on any of its links), read before and
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

use anyhow::{Context, Result};
use lb_testbed::Netns;

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
    /// The namespace it is attached in (the node's name as given).
    pub node: String,
    pub name: String,
    pub id: u32,
    pub runs: u64,
    pub run_ns: u64,
}

/// The counters of every program attached in each of `namespaces` (name, namespace).
pub fn snapshot(namespaces: &[(&str, &Netns)]) -> Result<Vec<ProgramStat>> {
    let mut wanted = BTreeMap::new();
    for (node, ns) in namespaces {
        for id in attached_ids(ns)? {
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

/// Program ids attached to the links of `ns`, from `bpftool -j net show`.
fn attached_ids(ns: &Netns) -> Result<Vec<u32>> {
    let out = ns.exec("bpftool", &["-j", "net", "show"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_net_show(&text).with_context(|| format!("`bpftool -j net show` in {}", ns.name()))
}

/// The ids in bpftool's `net show` JSON: `id` of each XDP entry, `prog_id` (TCX) or `id`
/// (a classic tc filter) of each tc entry.
fn parse_net_show(text: &str) -> Result<Vec<u32>> {
    let json: serde_json::Value = serde_json::from_str(text).context("not JSON")?;
    let mut ids = Vec::new();
    for section in json.as_array().into_iter().flatten() {
        for (hook, keys) in [("xdp", &["id"][..]), ("tc", &["prog_id", "id"][..])] {
            for entry in section
                .get(hook)
                .and_then(|v| v.as_array())
                .into_iter()
                .flatten()
            {
                if let Some(id) = keys
                    .iter()
                    .find_map(|k| entry.get(*k).and_then(serde_json::Value::as_u64))
                {
                    ids.push(u32::try_from(id).context("program id")?);
                }
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_show_ids() {
        let text = r#"[{"xdp":[{"devname":"eth0","ifindex":2,"mode":"driver","id":41}],
            "tc":[{"devname":"eth0","ifindex":2,"kind":"tcx/ingress","name":"xlb_tc_ingress","prog_id":42,"link_id":7},
                  {"devname":"eth0","ifindex":2,"kind":"clsact/egress","name":"x","id":43}],
            "flow_dissector":[],"netfilter":[]}]"#;
        assert_eq!(parse_net_show(text).unwrap(), [41, 42, 43]);
        assert_eq!(parse_net_show("[{}]").unwrap(), Vec::<u32>::new());
        assert!(parse_net_show("no").is_err());
    }

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
