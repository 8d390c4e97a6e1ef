//! The writer's fast paths against real maps: Maglev tables flipped in place inside
//! double-buffered inner arrays (read back through the kernel, not the writer's own
//! memory mapping), and runs of plain writes sent as batches, which must leave the maps
//! exactly as one write per op would.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;

use aya::maps::{Array, ArrayOfMaps, Map, MapData};
use lb_agent::dataplane::Dataplane;
use lb_common::maps::{self, MAGLEV_HALF_BIT, MaglevSlot};
use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, Backend, BackendMeta, FAMILY_V4, Frontend, FrontendKey,
    PROTO_TCP, addr_filter_slot,
};
use lb_core::config::{FrontendSpec, Protocol};
use lb_core::model::{BackendModel, Desired, Endpoint, Health, ServiceModel, WhenEmpty};
use lb_core::plan::{self, Applied, Op, Plan};
use lb_testbed as testbed;

/// Removes the test's pin directory, also when the test fails.
struct PinDir(PathBuf);

impl PinDir {
    fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/xlb-test-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load() -> Dataplane {
    testbed::check_privileges().expect("privileges");
    Dataplane::load(None).expect("load (run through `cargo xtask test`)")
}

fn pinned(dir: &PinDir, name: &str) -> Map {
    Map::from_map_data(MapData::from_pin(dir.0.join(name)).expect("pinned map")).unwrap()
}

/// A service's inner array as the kernel returns it (one lookup per element).
fn kernel_table(dir: &PinDir, service_id: u32) -> (u32, Vec<MaglevSlot>) {
    let outer: ArrayOfMaps<MapData, MapData> =
        ArrayOfMaps::try_from(pinned(dir, maps::MAGLEV)).unwrap();
    let inner_data = outer.get(&service_id, 0).expect("inner array");
    let id = inner_data.info().unwrap().id();
    let entries = inner_data.info().unwrap().max_entries();
    let inner: Array<MapData, MaglevSlot> =
        Array::try_from(Map::from_map_data(inner_data).unwrap()).unwrap();
    let slots = (0..entries).map(|i| inner.get(&i, 0).unwrap()).collect();
    (id, slots)
}

fn live(slots: &[MaglevSlot]) -> Vec<u32> {
    let second = slots[0].ids[0] & MAGLEV_HALF_BIT != 0;
    slots[1..]
        .iter()
        .map(|s| s.ids[usize::from(second)])
        .collect()
}

#[test]
fn tables_flip_in_place_and_change_size_by_swapping() {
    let mut dp = load();
    let dir = PinDir::new("flip");
    dp.pin_maps(&dir.0).expect("pin");

    let t1: Vec<u32> = (0..13).map(|i| 1 + i % 3).collect();
    dp.set_maglev_table(5, &t1).unwrap();
    let (first_id, slots) = kernel_table(&dir, 5);
    assert_eq!(slots.len(), 14, "header and 13 slots");
    assert_eq!(slots[0].ids[0], 13, "size, copy 0 live");
    assert_eq!(live(&slots), t1);

    let t2: Vec<u32> = (0..13).map(|i| 1 + i % 2).collect();
    dp.set_maglev_table(5, &t2).unwrap();
    let (id, slots) = kernel_table(&dir, 5);
    assert_eq!(id, first_id, "same inner array: flipped in place");
    assert_eq!(slots[0].ids[0], 0xd | MAGLEV_HALF_BIT, "copy 1 live");
    assert_eq!(live(&slots), t2);
    let old: Vec<u32> = slots[1..].iter().map(|s| s.ids[0]).collect();
    assert_eq!(old, t1, "the old copy untouched until the next flip");

    // A third table right away rewrites copy 0, which packets read a moment ago: the
    // writer waits for them first, then flips back.
    let t3: Vec<u32> = vec![4; 13];
    dp.set_maglev_table(5, &t3).unwrap();
    let (id, slots) = kernel_table(&dir, 5);
    assert_eq!(id, first_id);
    assert_eq!(slots[0].ids[0], 13);
    assert_eq!(live(&slots), t3);
    assert_eq!(dp.maglev_table(5).unwrap(), Some(t3));

    let t4: Vec<u32> = vec![2; 7];
    dp.set_maglev_table(5, &t4).unwrap();
    let (id, slots) = kernel_table(&dir, 5);
    assert_ne!(id, first_id, "a new size needs a new inner array");
    assert_eq!(live(&slots), t4);

    dp.remove_maglev_table(5).unwrap();
    assert_eq!(dp.maglev_table(5).unwrap(), None);
    assert!(dp.maglev_services().unwrap().is_empty());
}

fn model(i: u32, generation: u32) -> ServiceModel {
    let octet = |n: u32| u8::try_from(1 + n % 250).unwrap();
    let frontend = FrontendSpec {
        address: IpAddr::V4(Ipv4Addr::new(203, 0, 113, octet(i / 100))),
        port: 10_000 + u16::try_from(i % 100).unwrap(),
        protocol: Protocol::Tcp,
        in_cluster: false,
    };
    let backends = (0..4)
        .map(|j| {
            let n = i * 4 + j + generation * 7;
            let endpoint = Endpoint {
                addr: IpAddr::V4(Ipv4Addr::new(192, 0, 2, octet(n))),
                port: 20_000 + u16::try_from(n / 250).unwrap(),
            };
            let drained = j == 3 && generation % 2 == 1;
            let weight = u32::from(!drained);
            (
                endpoint,
                BackendModel {
                    weight,
                    health: Health::Unchecked,
                    local: false,
                },
            )
        })
        .collect();
    ServiceModel {
        frontends: BTreeSet::from([frontend]),
        backends,
        affinity_timeout_s: None,
        table_size: 31,
        when_empty: WhenEmpty::Drop,
        source_ranges: Vec::new(),
        snat: false,
        dsr: false,
    }
}

/// Applies `want`, then checks that the maps read back equal what the writer recorded,
/// that every table is the planned one, and that the address filter marks every
/// frontend and backend address.
fn apply_and_compare(dp: &mut Dataplane, applied: &mut Applied, want: &Desired, dir: &PinDir) {
    let plan = plan::plan(want, applied);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    let tables: BTreeMap<u32, Vec<u32>> = plan
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::SetTable { service_id, table } => Some((*service_id, table.clone())),
            _ => None,
        })
        .collect();
    dp.apply(&plan, applied)
        .map_err(|(n, e)| format!("op {n}: {e}"))
        .unwrap();
    let mut recorded = applied.clone();
    recorded.unsettle();
    assert_eq!(
        dp.restore().expect("read back"),
        recorded,
        "maps differ from the record"
    );
    for (id, table) in tables {
        assert_eq!(dp.maglev_table(id).unwrap(), Some(table), "service {id}");
    }
    let filter: Array<MapData, u8> = Array::try_from(pinned(dir, maps::ADDR_FILTER)).unwrap();
    for key in applied.frontends.keys() {
        let bits = filter.get(&addr_filter_slot(&key.addr), 0).unwrap();
        assert_ne!(bits & ADDR_F_FRONTEND, 0, "{key:?}");
    }
    for slot in applied.slots.values() {
        let bits = filter.get(&addr_filter_slot(&slot.addr), 0).unwrap();
        assert_ne!(bits & ADDR_F_BACKEND, 0, "{slot:?}");
    }
}

#[test]
fn batched_writes_leave_the_maps_as_recorded() {
    let mut dp = load();
    let dir = PinDir::new("batch");
    dp.pin_maps(&dir.0).expect("pin");
    let mut applied = Applied::default();
    let mut want = Desired::default();
    for i in 0..300 {
        want.services
            .insert(format!("svc-{i:03}"), Arc::new(model(i, 0)));
    }
    apply_and_compare(&mut dp, &mut applied, &want, &dir);
    // Change some (new endpoints, a drained one: flips and removals), remove some.
    for i in (0..300).step_by(7) {
        want.services
            .insert(format!("svc-{i:03}"), Arc::new(model(i, 1)));
    }
    for i in (5..300).step_by(11) {
        want.services.remove(&format!("svc-{i:03}"));
    }
    apply_and_compare(&mut dp, &mut applied, &want, &dir);
    apply_and_compare(&mut dp, &mut applied, &Desired::default(), &dir);
    assert_eq!(applied, Applied::default());
}

#[test]
fn a_failing_batch_is_retried_op_by_op_and_reports_the_failing_op() {
    let mut dp = load();
    let backend = |port: u16| Backend {
        addr: [192, 0, 2, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: port.to_be(),
        family: FAMILY_V4,
        flags: 0,
        service_id: 1,
    };
    let meta = |port: u16| BackendMeta {
        addr: [192, 0, 2, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: port.to_be(),
        family: FAMILY_V4,
        service_id: 1,
        weight: 1,
        ..BackendMeta::default()
    };
    let fill = |id: u32| {
        let port = u16::try_from(id % 60_000).unwrap();
        [
            Op::SetBackendMeta {
                id,
                meta: meta(port),
            },
            Op::SetBackend {
                id,
                backend: backend(port),
            },
        ]
    };
    let mut applied = Applied::default();
    let plan = Plan {
        ops: [fill(1), fill(2)].concat(),
        ..Plan::default()
    };
    dp.apply(&plan, &mut applied).unwrap();
    // An id past the arrays fails the batch, then op 2 of the retry.
    let plan = Plan {
        ops: [fill(3), fill(maps::MAX_BACKENDS), fill(4)].concat(),
        ..Plan::default()
    };
    let (failed, _) = dp.apply(&plan, &mut applied).unwrap_err();
    assert_eq!(failed, 2);
    assert_eq!(applied.slots.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    let mut recorded = applied.clone();
    recorded.unsettle();
    assert_eq!(
        dp.restore().unwrap(),
        recorded,
        "the maps hold what was recorded"
    );
}

fn slot(dir: &PinDir, id: u32) -> Backend {
    let slots: Array<MapData, Backend> = Array::try_from(pinned(dir, maps::BACKENDS)).unwrap();
    slots.get(&id, 0).unwrap()
}

#[test]
fn the_writer_empties_a_slot_a_flipped_out_table_may_name_after_programs_finish() {
    let mut dp = load();
    let dir = PinDir::new("grace");
    dp.pin_maps(&dir.0).expect("pin");
    let backend = |last: u8| Backend {
        addr: [192, 0, 2, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: 8080u16.to_be(),
        family: FAMILY_V4,
        flags: 0,
        service_id: 5,
    };
    for id in 1..=3 {
        dp.set_backend(id, backend(10 + u8::try_from(id).unwrap()))
            .unwrap();
    }
    dp.set_maglev_table(5, &[1, 2, 3, 1, 2, 3, 1]).unwrap();
    // The flip leaves the old copy, which names 2 and 3, readable by packets in flight.
    dp.set_maglev_table(5, &[1, 3, 1, 3, 1, 3, 1]).unwrap();
    let remove = |id| Plan {
        ops: vec![Op::RemoveBackend { id }],
        ..Plan::default()
    };
    let mut applied = Applied::default();
    dp.apply(&remove(2), &mut applied).unwrap();
    assert!(dp.slots_waiting(), "queued, not emptied at once");
    assert_eq!(slot(&dir, 2).family, FAMILY_V4, "still filled");
    // The grace thread waits; the writer only empties what is ready.
    let mut waited = 0;
    while dp.slots_waiting() && waited < 500 {
        std::thread::sleep(std::time::Duration::from_millis(10));
        dp.empty_ready_slots().unwrap();
        waited += 1;
    }
    assert!(!dp.slots_waiting(), "emptied within 5 s");
    assert_eq!(slot(&dir, 2), Backend::default(), "slot 2 emptied");

    // A slot reused at once: its old backend is emptied first, and the new one stays.
    dp.set_maglev_table(5, &[1; 7]).unwrap();
    dp.apply(&remove(3), &mut applied).unwrap();
    assert!(dp.slots_waiting());
    dp.set_backend(3, backend(99)).unwrap();
    assert!(!dp.slots_waiting(), "settled before the slot was written");
    assert_eq!(
        slot(&dir, 3).addr[3],
        99,
        "the reused slot keeps its new backend"
    );
    assert_eq!(slot(&dir, 1).family, FAMILY_V4);
}

/// A missing key on delete is success: inside a batch (the kernel fails it with ENOENT
/// and the writer retries op by op), and for tables and source ranges.
#[test]
fn deleting_what_is_not_there_is_success() {
    let mut dp = load();
    let key = |last: u8| FrontendKey {
        addr: [203, 0, 113, last, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        port: 80u16.to_be(),
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    dp.set_frontend(
        key(20),
        Frontend {
            service_id: 3,
            ..Frontend::default()
        },
    )
    .unwrap();
    let plan = Plan {
        ops: vec![
            Op::RemoveFrontend { key: key(21) },
            Op::RemoveFrontend { key: key(20) },
            Op::RemoveTable { service_id: 3 },
            Op::RemoveSourceRange {
                service_id: 3,
                range: "198.51.100.0/24".parse().unwrap(),
            },
        ],
        ..Plan::default()
    };
    let mut applied = Applied::default();
    let written = dp
        .apply(&plan, &mut applied)
        .map_err(|(n, e)| format!("op {n}: {e}"))
        .unwrap();
    assert_eq!(written, 4);
    assert!(dp.restore().unwrap().frontends.is_empty());
}
