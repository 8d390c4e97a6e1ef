//! Plans executed against a fake data plane that checks, after every single write,
//! that no installed table names an empty or foreign backend slot (the hitless
//! property), and that a plan's result is exactly the desired state.

use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;

use super::*;
use crate::model::{BackendModel, Desired, Endpoint, Health, ServiceModel};

/// What a service looks like from outside: frontends, forwarding backends, and
/// the table as endpoints.
type Served = (BTreeSet<FrontendKey>, BTreeSet<Endpoint>, Vec<Endpoint>);

/// The maps, as far as a plan can observe them.
#[derive(Default, Debug)]
struct FakeMaps {
    applied: Applied,
    slots: BTreeMap<u32, Backend>,
    tables: BTreeMap<u32, Vec<u32>>,
    writes: usize,
}

impl FakeMaps {
    fn run(&mut self, plan: &Plan) {
        for op in &plan.ops {
            match op {
                Op::SetBackend { id, backend } => {
                    self.slots.insert(*id, *backend);
                }
                Op::RemoveBackend { id } => {
                    self.slots.remove(id);
                }
                Op::SetTable { service_id, table } => {
                    self.tables.insert(*service_id, table.clone());
                }
                Op::RemoveTable { service_id } => {
                    self.tables.remove(service_id);
                }
                _ => {}
            }
            self.applied.record(op);
            self.writes += 1;
            self.check_hitless(op);
        }
    }

    fn check_hitless(&self, after: &Op) {
        for (service_id, table) in &self.tables {
            for id in table {
                let slot = self.slots.get(id);
                assert!(
                    slot.is_some_and(|b| b.service_id == *service_id),
                    "after {after:?}: table of service {service_id} names backend {id}, \
                     whose slot is {slot:?}"
                );
            }
        }
        for (key, frontend) in &self.applied.frontends {
            assert!(
                self.applied.services.contains_key(&frontend.service_id),
                "after {after:?}: frontend {key:?} points at service {} without metadata",
                frontend.service_id
            );
        }
    }

    /// The state the maps express, in model terms: service -> (frontends, forwarding
    /// endpoints, table as endpoints).
    fn served(&self) -> BTreeMap<String, Served> {
        let mut out = BTreeMap::new();
        for (id, meta) in &self.applied.services {
            let frontends = self
                .applied
                .frontends
                .iter()
                .filter(|(_, f)| f.service_id == *id)
                .map(|(k, _)| *k)
                .collect();
            let forwarding = self
                .slots
                .iter()
                .filter(|(_, b)| b.service_id == *id)
                .map(|(bid, _)| meta_endpoint(&self.applied.backends[bid]))
                .collect();
            let table = self
                .tables
                .get(id)
                .map(|t| {
                    t.iter()
                        .map(|bid| meta_endpoint(&self.applied.backends[bid]))
                        .collect()
                })
                .unwrap_or_default();
            out.insert(
                service_name(meta).to_owned(),
                (frontends, forwarding, table),
            );
        }
        out
    }
}

fn ep(last: u8, port: u16) -> Endpoint {
    Endpoint {
        addr: IpAddr::from([192, 0, 2, last]),
        port,
    }
}

fn fe(last: u8, port: u16) -> FrontendSpec {
    FrontendSpec {
        address: IpAddr::from([203, 0, 113, last]),
        port,
        protocol: Protocol::Tcp,
    }
}

fn service(frontends: &[FrontendSpec], backends: &[(Endpoint, u32, Health)]) -> ServiceModel {
    ServiceModel {
        frontends: frontends.iter().copied().collect(),
        backends: backends
            .iter()
            .map(|(e, weight, health)| {
                (
                    *e,
                    BackendModel {
                        weight: *weight,
                        health: *health,
                    },
                )
            })
            .collect(),
        affinity_timeout_s: None,
        table_size: 13,
        when_empty: crate::model::WhenEmpty::Drop,
        source_ranges: Vec::new(),
    }
}

fn desired(services: Vec<(&str, ServiceModel)>) -> Desired {
    Desired {
        services: services
            .into_iter()
            .map(|(n, s)| (n.to_owned(), s))
            .collect(),
    }
}

/// Plans, runs, checks the result and that a second plan is empty.
fn converge(maps: &mut FakeMaps, want: &Desired) -> Plan {
    let plan = plan(want, &maps.applied);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    maps.run(&plan);
    let again = super::plan(want, &maps.applied);
    assert!(again.ops.is_empty(), "not idempotent: {:?}", again.ops);
    let served = maps.served();
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        want.services.keys().collect::<Vec<_>>()
    );
    for (name, model) in &want.services {
        let (frontends, forwarding, table) = &served[name];
        let want_frontends: BTreeSet<FrontendKey> =
            model.frontends.iter().map(frontend_key).collect();
        assert_eq!(frontends, &want_frontends, "{name}: frontends");
        let want_forwarding: BTreeSet<Endpoint> = model
            .backends
            .iter()
            .filter(|(_, b)| b.forwarding())
            .map(|(e, _)| *e)
            .collect();
        assert_eq!(forwarding, &want_forwarding, "{name}: forwarding backends");
        let in_table: BTreeSet<Endpoint> = table.iter().copied().collect();
        let want_selectable: BTreeSet<Endpoint> = model
            .backends
            .iter()
            .filter(|(_, b)| b.selectable())
            .map(|(e, _)| *e)
            .collect();
        assert_eq!(in_table, want_selectable, "{name}: table members");
    }
    plan
}

const UP: Health = Health::Unchecked;

#[test]
fn a_new_service_writes_backends_then_table_then_frontend() {
    let mut maps = FakeMaps::default();
    let want = desired(vec![(
        "web",
        service(
            &[fe(10, 80)],
            &[(ep(11, 8080), 1, UP), (ep(12, 8080), 2, UP)],
        ),
    )]);
    let plan = converge(&mut maps, &want);
    let kinds: Vec<&str> = plan
        .ops
        .iter()
        .map(|op| match op {
            Op::ResetStats { .. } => "stats",
            Op::SetServiceMeta { .. } => "svc-meta",
            Op::SetBackend { .. } => "backend",
            Op::SetBackendMeta { .. } => "backend-meta",
            Op::SetTable { .. } => "table",
            Op::SetFrontend { .. } => "frontend",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "stats",
            "svc-meta",
            "backend",
            "backend-meta",
            "backend",
            "backend-meta",
            "table",
            "svc-meta",
            "frontend"
        ]
    );
}

#[test]
fn changing_one_weight_rewrites_only_the_table_and_metadata() {
    let mut maps = FakeMaps::default();
    let mut want = desired(vec![(
        "web",
        service(
            &[fe(10, 80)],
            &[(ep(11, 8080), 1, UP), (ep(12, 8080), 1, UP)],
        ),
    )]);
    converge(&mut maps, &want);
    want.services
        .get_mut("web")
        .unwrap()
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap()
        .weight = 3;
    let plan = converge(&mut maps, &want);
    assert_eq!(plan.ops.len(), 3, "{:?}", plan.ops);
    assert!(matches!(plan.ops[0], Op::SetBackendMeta { .. }));
    assert!(matches!(plan.ops[1], Op::SetTable { .. }));
    assert!(matches!(plan.ops[2], Op::SetServiceMeta { .. }));
}

#[test]
fn a_down_backend_leaves_the_table_before_its_slot_and_comes_back() {
    let mut maps = FakeMaps::default();
    let mut want = desired(vec![(
        "web",
        service(
            &[fe(10, 80)],
            &[(ep(11, 8080), 1, Health::Up), (ep(12, 8080), 1, Health::Up)],
        ),
    )]);
    converge(&mut maps, &want);
    let b = want
        .services
        .get_mut("web")
        .unwrap()
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap();
    b.health = Health::Down;
    let plan = converge(&mut maps, &want);
    let table_at = plan
        .ops
        .iter()
        .position(|op| matches!(op, Op::SetTable { .. }));
    let slot_at = plan
        .ops
        .iter()
        .position(|op| matches!(op, Op::RemoveBackend { .. }));
    assert!(table_at < slot_at, "{:?}", plan.ops);
    want.services
        .get_mut("web")
        .unwrap()
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap()
        .health = Health::Up;
    converge(&mut maps, &want);
}

#[test]
fn all_backends_down_removes_the_table_and_flags_the_service() {
    let mut maps = FakeMaps::default();
    let mut want = desired(vec![(
        "web",
        service(&[fe(10, 80)], &[(ep(11, 8080), 1, Health::Up)]),
    )]);
    converge(&mut maps, &want);
    want.services
        .get_mut("web")
        .unwrap()
        .backends
        .get_mut(&ep(11, 8080))
        .unwrap()
        .health = Health::Down;
    let plan = converge(&mut maps, &want);
    assert!(
        plan.ops
            .iter()
            .any(|op| matches!(op, Op::RemoveTable { .. }))
    );
    let meta = maps.applied.services.values().next().unwrap();
    assert_ne!(meta.flags & SERVICE_META_F_NO_BACKENDS, 0);
    assert_eq!(meta.table_digest, 0);
}

#[test]
fn a_frontend_can_move_between_services_without_a_gap() {
    let mut maps = FakeMaps::default();
    converge(
        &mut maps,
        &desired(vec![
            ("a", service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)])),
            ("b", service(&[fe(11, 80)], &[(ep(12, 8080), 1, UP)])),
        ]),
    );
    let plan = converge(
        &mut maps,
        &desired(vec![
            ("a", service(&[], &[(ep(11, 8080), 1, UP)])),
            (
                "b",
                service(&[fe(11, 80), fe(10, 80)], &[(ep(12, 8080), 1, UP)]),
            ),
        ]),
    );
    assert!(
        !plan
            .ops
            .iter()
            .any(|op| matches!(op, Op::RemoveFrontend { .. })),
        "moved, never removed: {:?}",
        plan.ops
    );
}

#[test]
fn removing_a_service_releases_its_ids_for_reuse() {
    let mut maps = FakeMaps::default();
    converge(
        &mut maps,
        &desired(vec![(
            "a",
            service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)]),
        )]),
    );
    converge(&mut maps, &Desired::default());
    assert_eq!(maps.applied, Applied::default(), "everything cleaned up");
    let plan = converge(
        &mut maps,
        &desired(vec![(
            "b",
            service(&[fe(10, 80)], &[(ep(12, 8080), 1, UP)]),
        )]),
    );
    assert!(
        plan.ops.contains(&Op::ResetStats { id: 1 }),
        "id 1 reused with fresh counters"
    );
}

#[test]
fn a_restored_state_needs_no_writes() {
    let mut maps = FakeMaps::default();
    let want = desired(vec![(
        "web",
        service(
            &[fe(10, 80)],
            &[(ep(11, 8080), 1, UP), (ep(12, 8080), 2, UP)],
        ),
    )]);
    converge(&mut maps, &want);
    // A restarted agent only has what the maps hold.
    let restored = maps.applied.clone();
    assert!(plan(&want, &restored).ops.is_empty());
}

#[test]
fn two_agents_build_the_same_table_whatever_their_ids() {
    let backends = [
        (ep(11, 8080), 1, UP),
        (ep(12, 8080), 2, UP),
        (ep(13, 8080), 1, UP),
    ];
    let want = desired(vec![("web", service(&[fe(10, 80)], &backends))]);
    let mut fresh = FakeMaps::default();
    converge(&mut fresh, &want);
    // The other agent's history gave different ids.
    let mut used = FakeMaps::default();
    converge(
        &mut used,
        &desired(vec![(
            "old",
            service(&[fe(20, 80)], &[(ep(99, 1), 1, UP), (ep(98, 1), 1, UP)]),
        )]),
    );
    converge(&mut used, &want);
    assert_eq!(
        fresh.served()["web"].2,
        used.served()["web"].2,
        "same endpoint per slot"
    );
}

#[test]
fn a_name_that_does_not_fit_is_an_error_for_that_service_only() {
    let long = "x".repeat(SERVICE_NAME_LEN);
    let want = desired(vec![
        (long.as_str(), service(&[fe(10, 80)], &[])),
        ("ok", service(&[fe(11, 80)], &[(ep(11, 8080), 1, UP)])),
    ]);
    let plan = plan(&want, &Applied::default());
    assert_eq!(plan.errors.len(), 1);
    assert!(
        plan.ops
            .iter()
            .any(|op| matches!(op, Op::SetFrontend { .. }))
    );
}

fn arb_desired() -> impl Strategy<Value = Desired> {
    let backend = (
        1u8..8,
        0u32..4,
        prop_oneof![
            Just(Health::Unchecked),
            Just(Health::Up),
            Just(Health::Down)
        ],
    );
    let svc = (
        proptest::collection::btree_set(1u8..6, 0..3),
        proptest::collection::vec(backend, 0..5),
        any::<bool>(),
    );
    proptest::collection::btree_map(0u8..5, svc, 0..4).prop_map(|services| {
        let mut taken = BTreeSet::new();
        Desired {
            services: services
                .into_iter()
                .map(|(n, (frontends, backends, affinity))| {
                    // A frontend belongs to one service (config validation ensures it).
                    let frontends: Vec<FrontendSpec> = frontends
                        .into_iter()
                        .filter(|f| taken.insert(*f))
                        .map(|f| fe(f, 80))
                        .collect();
                    let backends: Vec<(Endpoint, u32, Health)> = backends
                        .into_iter()
                        .map(|(b, w, h)| (ep(10 + b, 8080), w, h))
                        .collect();
                    let mut model = service(&frontends, &backends);
                    model.affinity_timeout_s = affinity.then_some(60);
                    (format!("svc-{n}"), model)
                })
                .collect(),
        }
    })
}

proptest! {
    /// Any sequence of desired states converges, hitlessly, with nothing left over.
    #[test]
    fn any_sequence_converges_hitlessly(steps in proptest::collection::vec(arb_desired(), 1..6)) {
        let mut maps = FakeMaps::default();
        for want in &steps {
            converge(&mut maps, want);
        }
        converge(&mut maps, &Desired::default());
        prop_assert_eq!(&maps.applied, &Applied::default());
        prop_assert!(maps.slots.is_empty() && maps.tables.is_empty());
    }
}

#[test]
fn draining_rewrites_the_slot_with_the_draining_flag_and_undraining_clears_it() {
    let mut maps = FakeMaps::default();
    let mut want = desired(vec![(
        "web",
        service(
            &[fe(10, 80)],
            &[(ep(11, 8080), 1, UP), (ep(12, 8080), 1, UP)],
        ),
    )]);
    converge(&mut maps, &want);
    let drained = |maps: &FakeMaps| {
        maps.slots
            .values()
            .filter(|b| b.flags & BACKEND_F_DRAINING != 0)
            .count()
    };
    want.services
        .get_mut("web")
        .unwrap()
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap()
        .weight = 0;
    let plan = converge(&mut maps, &want);
    let table_at = plan
        .ops
        .iter()
        .position(|op| matches!(op, Op::SetTable { .. }));
    assert!(table_at.is_some(), "{:?}", plan.ops);
    assert_eq!(drained(&maps), 1, "still forwarding, flagged");
    want.services
        .get_mut("web")
        .unwrap()
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap()
        .weight = 1;
    converge(&mut maps, &want);
    assert_eq!(drained(&maps), 0);
}
