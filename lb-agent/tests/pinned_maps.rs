//! Maps pin under one bpffs directory by their versioned names, and `bpftool map dump`
//! prints their keys and values field by field (BTF), as operators will read them.

use std::path::PathBuf;
use std::process::Command;

use lb_agent::dataplane::Dataplane;
use lb_common::{Backend, FAMILY_V4, Frontend, FrontendKey, PROTO_TCP, maps};
use lb_testbed as testbed;

/// Removes the test's pin directory, also when the test fails.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn pinned_maps_dump_typed_entries_with_bpftool() {
    testbed::check_privileges().expect("privileges");
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xlb-test-pins-{}",
        std::process::id()
    )));
    let mut dp = Dataplane::load(None).expect("load (run through `cargo xtask test`)");
    let key = FrontendKey {
        addr: [203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    dp.set_frontend(
        key,
        Frontend {
            service_id: 7,
            ..Frontend::default()
        },
    )
    .expect("frontend");
    dp.set_backend(
        42,
        Backend {
            addr: [192, 0, 2, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            port: 8080u16.to_be(),
            family: FAMILY_V4,
            flags: 0,
            service_id: 7,
        },
    )
    .expect("backend");
    dp.set_maglev_table(7, &[42; 7]).expect("table");
    dp.add_source_range(7, "198.51.100.0/24".parse().expect("range"))
        .expect("source range");
    dp.pin_maps(&dir.0).expect("pin");

    for name in maps::ALL {
        assert!(dir.0.join(name).exists(), "{name} pinned");
    }
    let dump = |name: &str| -> serde_json::Value {
        let out = testbed::run_stdout(
            Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(dir.0.join(name)),
            &format!("bpftool map dump {name} (installed by `cargo xtask test`)"),
        );
        serde_json::from_slice(&out).expect("bpftool JSON")
    };
    let frontends = dump(maps::FRONTENDS);
    let entry = &frontends[0]["formatted"];
    assert_eq!(entry["value"]["service_id"], 7, "typed value: {frontends}");
    assert_eq!(entry["key"]["proto"], 6, "typed key: {frontends}");
    assert_eq!(entry["key"]["family"], 4, "typed key: {frontends}");
    // Both rare paths of the XDP program are in their tail-call slots.
    let slow = dump(maps::SLOW_PATHS);
    assert_eq!(
        slow.as_array().map(Vec::len),
        Some(maps::SLOW_PATH_SLOTS as usize),
        "program array: {slow}"
    );
    let ranges = dump(maps::SOURCE_RANGES);
    let entry = &ranges[0]["formatted"];
    assert_eq!(entry["key"]["prefix_len"], 64 + 24, "typed key: {ranges}");
    assert_eq!(
        entry["key"]["data"]["service_id"],
        serde_json::json!([0, 0, 0, 7]),
        "big-endian service id: {ranges}"
    );
    // One entry looked up: a dump of all 262,144 slots takes bpftool seconds.
    let out = testbed::run_stdout(
        Command::new("bpftool")
            .args(["-j", "map", "lookup", "pinned"])
            .arg(dir.0.join(maps::BACKENDS))
            .args(["key", "42", "0", "0", "0"]),
        "bpftool map lookup",
    );
    let entry: serde_json::Value = serde_json::from_slice(&out).expect("bpftool JSON");
    assert_eq!(entry["formatted"]["key"], 42, "typed key: {entry}");
    assert_eq!(
        entry["formatted"]["value"]["service_id"], 7,
        "typed value: {entry}"
    );
}

/// What a restarted agent reads back (`restore`) is exactly what the writer mirrored,
/// source ranges and frontend flags included, so planning the same state again writes
/// nothing.
#[test]
fn restore_reads_back_what_was_applied() {
    testbed::check_privileges().expect("privileges");
    let config = lb_core::config::parse(
        "services:
  - name: ranged
    frontends: [{ address: 203.0.113.10, port: 80 }]
    backends: [{ address: 192.0.2.11, port: 8080 }, { address: 192.0.2.12, port: 8080 }]
    maglev: { tableSize: 13 }
    sourceRanges: [198.51.100.0/24, 198.51.100.128/25]
  - name: empty6
    frontends: [{ address: '2001:db8:f::10', port: 53, protocol: UDP }]
    backends: []
    whenEmpty: reject
    sourceRanges: ['2001:db8:c::/48']
",
    )
    .expect("config");
    assert!(config.rejected.is_empty(), "{:?}", config.rejected);
    let desired =
        lb_core::model::from_specs(&config.services, lb_core::mode::LbMode::Snat, |_, _| {
            lb_core::model::Health::Unchecked
        });
    let mut dp = Dataplane::load(None).expect("load (run through `cargo xtask test`)");
    let mut applied = lb_core::plan::Applied::default();
    let plan = lb_core::plan::plan(&desired, &applied);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    dp.apply(&plan, &mut applied).expect("apply");
    assert_eq!(applied.source_ranges.len(), 3, "{applied:?}");
    let restored = dp.restore().expect("restore");
    // Which services are settled is the writer's cache of what it compared last; a
    // restarted agent starts without it.
    applied.unsettle();
    assert_eq!(restored, applied);
    assert_eq!(lb_core::plan::plan(&desired, &restored).ops, []);
}

/// The pair tables' flag (`FLOW_PAIRS_V1`): clear on a fresh start and on a restart of
/// this build, set when the pins are an older build's (its flows are in `CONNTRACK_V2`
/// and `REVNAT_V1`, and it pinned no flag), so the program looks there.
#[test]
fn the_pair_flag_is_set_for_an_older_builds_tables() {
    testbed::check_privileges().expect("privileges");
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xlb-test-pairs-{}",
        std::process::id()
    )));
    let load = || {
        Dataplane::load_pinned(None, &dir.0)
            .expect("load (run through `cargo xtask test`)")
            .0
    };
    assert!(!load().flow_pairs_marked().expect("flag"), "a fresh start");
    assert!(!load().flow_pairs_marked().expect("flag"), "a restart");
    std::fs::remove_file(dir.0.join(maps::FLOW_PAIRS)).expect("unpin the flag");
    assert!(
        load().flow_pairs_marked().expect("flag"),
        "an older build's pins: no flag, pair tables"
    );
    assert!(load().flow_pairs_marked().expect("flag"), "and it stays");
}
