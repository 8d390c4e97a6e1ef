//! The writer against the fault-injecting fake store, without privileges: the order
//! of the writes the store sees keeps every change hitless, `Applied` mirrors exactly
//! what was written when a write fails, and a new plan from there converges.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use lb_common::{ADDR_F_BACKEND, ADDR_F_FRONTEND, addr_filter_slot, maps};
use lb_core::config::{FrontendSpec, Protocol};
use lb_core::model::{BackendModel, Desired, Endpoint, Health, ServiceModel, WhenEmpty};
use lb_core::plan::{self, Applied, Op, Plan, meta_endpoint, service_name};

use super::{apply, restore};
use crate::dataplane::fake::{FakeMaps, Maps, Write};

fn ep(last: u8, port: u16) -> Endpoint {
    Endpoint {
        addr: IpAddr::from([192, 0, 2, last]),
        port,
    }
}

fn service(frontends: &[(u8, u16)], backends: &[(Endpoint, u32)]) -> ServiceModel {
    ServiceModel {
        frontends: frontends
            .iter()
            .map(|&(last, port)| FrontendSpec {
                address: IpAddr::from([203, 0, 113, last]),
                port,
                protocol: Protocol::Tcp,
                in_cluster: false,
            })
            .collect(),
        backends: backends
            .iter()
            .map(|&(e, weight)| {
                (
                    e,
                    BackendModel {
                        weight,
                        health: Health::Unchecked,
                        local: false,
                    },
                )
            })
            .collect(),
        affinity_timeout_s: None,
        table_size: 13,
        when_empty: WhenEmpty::Drop,
        source_ranges: Vec::new(),
        snat: false,
        dsr: false,
    }
}

fn desired(services: Vec<(&str, ServiceModel)>) -> Desired {
    services.into_iter().collect()
}

/// Three states in a row: services added; changed (new, drained and removed backends,
/// a moved frontend, source ranges), one removed and one added; all removed.
fn states() -> Vec<Desired> {
    let mut ranged = service(&[(12, 443)], &[(ep(21, 8443), 1)]);
    ranged.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
    let first = desired(vec![
        (
            "a",
            service(&[(10, 80)], &[(ep(11, 8080), 1), (ep(12, 8080), 1)]),
        ),
        ("b", service(&[(10, 81)], &[(ep(11, 9090), 2)])),
        ("c", ranged),
    ]);
    let mut ranged = service(&[(12, 443)], &[(ep(21, 8443), 1)]);
    ranged.source_ranges = vec!["198.51.100.0/25".parse().unwrap()];
    let second = desired(vec![
        (
            "a",
            service(
                &[(10, 80), (13, 80)],
                &[(ep(12, 8080), 0), (ep(13, 8080), 1), (ep(14, 8080), 3)],
            ),
        ),
        ("c", ranged),
        ("d", service(&[(10, 81)], &[(ep(11, 9090), 1)])),
    ]);
    vec![first, second, Desired::default()]
}

/// The maps in terms that do not depend on which ids a run handed out.
#[derive(Debug, PartialEq, Eq)]
struct Normal {
    services: BTreeMap<String, (u32, u32, Vec<Endpoint>)>,
    backends: BTreeSet<(String, Endpoint, u8, u32, Option<u8>)>,
    frontends: BTreeMap<lb_common::FrontendKey, (String, u32)>,
    ranges: BTreeSet<(String, IpNet)>,
    filter: BTreeMap<u32, u8>,
}

fn normal(maps: &Maps) -> Normal {
    let name = |id: &u32| {
        maps.services
            .get(id)
            .map_or_else(|| format!("#{id}"), |m| service_name(m).to_owned())
    };
    let endpoint = |id: &u32| meta_endpoint(&maps.backend_metas[id]);
    Normal {
        services: maps
            .services
            .iter()
            .map(|(id, m)| {
                let table = maps
                    .tables
                    .get(id)
                    .map_or_else(Vec::new, |t| t.iter().map(endpoint).collect());
                (name(id), (m.flags, m.table_size, table))
            })
            .collect(),
        backends: maps
            .backend_metas
            .iter()
            .map(|(id, m)| {
                let slot = maps.slots.get(id).map(|b| b.flags);
                (name(&m.service_id), endpoint(id), m.health, m.weight, slot)
            })
            .collect(),
        frontends: maps
            .frontends
            .iter()
            .map(|(k, f)| (*k, (name(&f.service_id), f.flags)))
            .collect(),
        ranges: maps.ranges.iter().map(|(id, r)| (name(id), *r)).collect(),
        filter: maps.filter.clone(),
    }
}

/// Replays `log` from `start` and checks after every write what a packet could meet:
/// every table names filled slots of its service, every frontend names a service in
/// use, and the address filter lets every frontend and backend through.
fn check_hitless(start: &Maps, log: &[Write]) {
    let mut maps = start.clone();
    for write in log {
        maps.write(write);
        for (service_id, table) in &maps.tables {
            for id in table {
                let slot = maps.slots.get(id);
                assert!(
                    slot.is_some_and(|b| b.service_id == *service_id),
                    "after {write:?}: table of {service_id} names {id}, slot {slot:?}"
                );
            }
        }
        let bits = |addr: &[u8; 16]| maps.filter.get(&addr_filter_slot(addr)).copied();
        for (key, frontend) in &maps.frontends {
            assert!(
                maps.services.contains_key(&frontend.service_id),
                "after {write:?}: {key:?} names a service without metadata"
            );
            assert!(
                bits(&key.addr).is_some_and(|b| b & ADDR_F_FRONTEND != 0),
                "after {write:?}: frontend {key:?} filtered out"
            );
        }
        for (id, slot) in &maps.slots {
            assert!(
                bits(&slot.addr).is_some_and(|b| b & ADDR_F_BACKEND != 0),
                "after {write:?}: backend {id} filtered out"
            );
        }
    }
}

/// `Applied` says exactly what the store holds.
fn check_mirror(store: &mut FakeMaps, applied: &Applied, context: &str) {
    let mut recorded = applied.clone();
    recorded.unsettle();
    assert_eq!(restore(store).unwrap(), recorded, "{context}");
}

/// Plans `want` against `applied` and applies it without failures.
fn converge(store: &mut FakeMaps, applied: &mut Applied, want: &Desired) -> Plan {
    let plan = plan::plan(want, applied);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    let start = store.maps.clone();
    let from = store.log.len();
    apply(store, &plan, applied).unwrap();
    check_hitless(&start, &store.log[from..]);
    check_mirror(store, applied, "after a full apply");
    assert_eq!(plan::plan(want, applied).ops, [], "converged");
    plan
}

#[test]
fn the_store_sees_backends_before_tables_before_removals_and_whole_tables() {
    let mut store = FakeMaps::default();
    let mut applied = Applied::default();
    for want in states() {
        let from = store.log.len();
        let plan = converge(&mut store, &mut applied, &want);
        let log = &store.log[from..];
        let position = |f: &dyn Fn(&Write) -> bool| -> Vec<usize> {
            log.iter()
                .enumerate()
                .filter(|(_, w)| f(w))
                .map(|(i, _)| i)
                .collect()
        };
        let tables = position(&|w| matches!(w, Write::Table(_, Some(_))));
        let filled = position(&|w| matches!(w, Write::Backend(_, b) if b.family != 0));
        let emptied = position(&|w| matches!(w, Write::Backend(_, b) if b.family == 0));
        if let (Some(first), Some(last)) = (tables.first(), tables.last()) {
            assert!(
                filled.iter().all(|i| i < first),
                "new backends before tables"
            );
            assert!(emptied.iter().all(|i| i > last), "tables before removals");
        }
        // Each planned table reaches the store whole, in one write, once.
        let planned: Vec<Write> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::SetTable { service_id, table } => {
                    Some(Write::Table(*service_id, Some(table.clone())))
                }
                _ => None,
            })
            .collect();
        let written: Vec<Write> = log
            .iter()
            .filter(|w| matches!(w, Write::Table(_, Some(_))))
            .cloned()
            .collect();
        assert_eq!(written, planned);
    }
    assert_eq!(store.maps, Maps::default(), "nothing left");
}

/// For every write of every plan: that write fails; `Applied` then says exactly what
/// the store holds, and a new plan against it reaches the same maps as a run without
/// failures. Every op of the plan is the failing one for some write.
#[test]
fn a_plan_failing_at_any_write_resumes_to_the_same_maps() {
    let states = states();
    for step in 0..states.len() {
        // The store and record before `step`, and the maps after it without failures.
        let mut base = FakeMaps::default();
        let mut base_applied = Applied::default();
        for want in &states[..step] {
            converge(&mut base, &mut base_applied, want);
        }
        let want = &states[step];
        let mut clean = FakeMaps::holding(base.maps.clone());
        let mut clean_applied = base_applied.clone();
        let plan = plan::plan(want, &clean_applied);
        apply(&mut clean, &plan, &mut clean_applied).unwrap();
        let writes = clean.attempts;
        let expected = normal(&clean.maps);

        let mut failed_ops = BTreeSet::new();
        for n in 0..writes {
            let mut store = FakeMaps::holding(base.maps.clone());
            let mut applied = base_applied.clone();
            store.fail_nth(n);
            let (failed, _) = apply(&mut store, &plan, &mut applied).unwrap_err();
            failed_ops.insert(failed);
            let context = format!("step {step}, write {n} failed (op {failed})");
            check_mirror(&mut store, &applied, &context);
            check_hitless(&base.maps, &store.log);
            store.heal();
            let from = store.log.len();
            let start = store.maps.clone();
            let resume = plan::plan(want, &applied);
            apply(&mut store, &resume, &mut applied).unwrap();
            check_hitless(&start, &store.log[from..]);
            check_mirror(&mut store, &applied, &context);
            assert_eq!(normal(&store.maps), expected, "{context}");
            assert_eq!(plan::plan(want, &applied).ops, [], "{context}");
        }
        let all: BTreeSet<usize> = (0..plan.ops.len()).collect();
        assert_eq!(failed_ops, all, "step {step}: every op failed once");
    }
}

#[test]
fn a_map_that_fails_every_write_stops_the_plan_at_its_first_op() {
    let mut store = FakeMaps::default();
    let mut applied = Applied::default();
    let want = &states()[0];
    let plan = plan::plan(want, &applied);
    store.fail_map(maps::FRONTENDS);
    let (failed, error) = apply(&mut store, &plan, &mut applied).unwrap_err();
    assert!(
        matches!(plan.ops[failed], Op::SetFrontend { .. }),
        "{:?}",
        plan.ops[failed]
    );
    assert!(
        plan.ops[..failed]
            .iter()
            .all(|op| !matches!(op, Op::SetFrontend { .. })),
        "the first frontend op"
    );
    assert!(error.to_string().contains(maps::FRONTENDS), "{error}");
    check_mirror(&mut store, &applied, "after the failure");
    assert!(store.maps.frontends.is_empty());
    store.heal();
    converge(&mut store, &mut applied, want);
}

#[test]
fn a_missing_key_on_delete_is_success() {
    let mut store = FakeMaps::default();
    let mut applied = Applied::default();
    converge(&mut store, &mut applied, &states()[0]);
    // Someone else emptied the maps the record says are full.
    store.maps.frontends.clear();
    store.maps.tables.clear();
    store.maps.ranges.clear();
    let plan = plan::plan(&Desired::default(), &applied);
    for removal in [
        |op: &Op| matches!(op, Op::RemoveFrontend { .. }),
        |op: &Op| matches!(op, Op::RemoveTable { .. }),
        |op: &Op| matches!(op, Op::RemoveSourceRange { .. }),
    ] {
        assert!(plan.ops.iter().any(removal), "{:?}", plan.ops);
    }
    apply(&mut store, &plan, &mut applied).unwrap();
    assert_eq!(store.maps, Maps::default());
    check_mirror(&mut store, &applied, "after deleting what was gone");
}

#[test]
fn the_address_filter_keeps_a_bit_another_user_still_needs() {
    let mut store = FakeMaps::default();
    let mut applied = Applied::default();
    // "a" and "b" share a frontend address and a backend address; "a" goes first.
    converge(&mut store, &mut applied, &states()[0]);
    let frontend = addr_filter_slot(&[203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let backend = addr_filter_slot(&[192, 0, 2, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let only_b = desired(vec![("b", service(&[(10, 81)], &[(ep(11, 9090), 2)]))]);
    let from = store.log.len();
    converge(&mut store, &mut applied, &only_b);
    assert!(
        !store.log[from..]
            .iter()
            .any(|w| matches!(w, Write::Filter(s, _) if *s == frontend || *s == backend)),
        "slots b still uses untouched"
    );
    assert_eq!(store.maps.filter[&frontend], ADDR_F_FRONTEND);
    assert_eq!(store.maps.filter[&backend], ADDR_F_BACKEND);
    converge(&mut store, &mut applied, &Desired::default());
    assert!(store.maps.filter.is_empty());
}
