//! Plans executed against a fake data plane that checks, after every single write,
//! that no installed table names an empty or foreign backend slot and that no client
//! admitted by a frontend's source ranges before and after the plan is refused in
//! between (the hitless properties), and that a plan's result is exactly the desired
//! state.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use proptest::prelude::*;

use super::*;
use crate::model::{BackendModel, Desired, Endpoint, Health, ServiceModel, WhenEmpty};

/// Which clients a frontend takes new flows from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Admits {
    /// No such frontend.
    Nobody,
    Everyone,
    /// Clients in one of these ranges.
    Ranges(BTreeSet<IpNet>),
}

impl Admits {
    fn of(applied: &Applied, key: &FrontendKey) -> Admits {
        match applied.frontends.get(key) {
            None => Admits::Nobody,
            Some(f) if f.flags & FRONTEND_F_SOURCE_RANGES == 0 => Admits::Everyone,
            Some(f) => Admits::Ranges(
                applied
                    .source_ranges
                    .iter()
                    .filter(|(id, _)| *id == f.service_id)
                    .map(|(_, r)| *r)
                    .collect(),
            ),
        }
    }

    /// The clients both admit (as sets of ranges).
    fn and(&self, other: &Admits) -> Admits {
        match (self, other) {
            (Admits::Nobody, _) | (_, Admits::Nobody) => Admits::Nobody,
            (Admits::Everyone, x) | (x, Admits::Everyone) => x.clone(),
            (Admits::Ranges(a), Admits::Ranges(b)) => {
                Admits::Ranges(a.intersection(b).copied().collect())
            }
        }
    }

    /// Whether every client `need` admits is admitted here.
    fn covers(&self, need: &Admits) -> bool {
        match (self, need) {
            (_, Admits::Nobody) | (Admits::Everyone, _) => true,
            (Admits::Nobody, _) | (Admits::Ranges(_), Admits::Everyone) => false,
            (Admits::Ranges(have), Admits::Ranges(need)) => need.is_subset(have),
        }
    }
}

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
        let mut end = self.applied.clone();
        for op in &plan.ops {
            end.record(op);
        }
        // Per frontend, the clients admitted before and after the whole plan.
        let kept: BTreeMap<FrontendKey, Admits> = self
            .applied
            .frontends
            .keys()
            .chain(end.frontends.keys())
            .map(|k| (*k, Admits::of(&self.applied, k).and(&Admits::of(&end, k))))
            .collect();
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
            for (key, need) in &kept {
                let now = Admits::of(&self.applied, key);
                assert!(
                    now.covers(need),
                    "after {op:?}: frontend {key:?} admits {now:?}, but {need:?} is admitted \
                     before and after the plan"
                );
            }
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
        let id = maps.applied.service_id(name).expect("service id");
        let want_ranges: BTreeSet<(u32, IpNet)> = model
            .source_ranges
            .iter()
            .map(|r| (id, r.trunc()))
            .collect();
        let ranges: BTreeSet<(u32, IpNet)> = maps
            .applied
            .source_ranges
            .iter()
            .filter(|(sid, _)| *sid == id)
            .copied()
            .collect();
        assert_eq!(ranges, want_ranges, "{name}: source ranges");
        for key in frontends {
            let flags = maps.applied.frontends[key].flags;
            assert_eq!(
                flags & FRONTEND_F_REJECT_EMPTY != 0,
                model.when_empty == WhenEmpty::Reject,
                "{name}: reject flag"
            );
            assert_eq!(
                flags & FRONTEND_F_SOURCE_RANGES != 0,
                !model.source_ranges.is_empty(),
                "{name}: source range flag"
            );
        }
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

/// Source ranges the generated services draw from: nested, disjoint, both families, and
/// one written with host bits.
const RANGES: [&str; 5] = [
    "198.51.100.0/24",
    "198.51.100.128/25",
    "192.0.2.7/24",
    "2001:db8:c::/48",
    "0.0.0.0/0",
];

fn range(text: &str) -> IpNet {
    text.parse().expect("test range")
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
        proptest::collection::btree_set(0..RANGES.len(), 0..3),
        any::<bool>(),
    );
    proptest::collection::btree_map(0u8..5, svc, 0..4).prop_map(|services| {
        let mut taken = BTreeSet::new();
        Desired {
            services: services
                .into_iter()
                .map(|(n, (frontends, backends, affinity, ranges, reject))| {
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
                    model.source_ranges = ranges.into_iter().map(|i| range(RANGES[i])).collect();
                    if reject {
                        model.when_empty = WhenEmpty::Reject;
                    }
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

/// The ops of a plan that touch source ranges or frontends, in order, as short names.
fn range_and_frontend_ops(plan: &Plan) -> Vec<String> {
    plan.ops
        .iter()
        .filter_map(|op| match op {
            Op::AddSourceRange { range, .. } => Some(format!("+{range}")),
            Op::RemoveSourceRange { range, .. } => Some(format!("-{range}")),
            Op::SetFrontend { value, .. } => Some(format!(
                "frontend{}",
                if value.flags & FRONTEND_F_SOURCE_RANGES == 0 {
                    ""
                } else {
                    " (ranges)"
                }
            )),
            Op::RemoveFrontend { .. } => Some("-frontend".to_owned()),
            _ => None,
        })
        .collect()
}

#[test]
fn source_ranges_go_in_before_a_frontend_requires_them_and_leave_after() {
    let mut maps = FakeMaps::default();
    let mut web = service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)]);
    converge(&mut maps, &desired(vec![("web", web.clone())]));

    web.source_ranges = vec![range("198.51.100.0/24")];
    let plan = converge(&mut maps, &desired(vec![("web", web.clone())]));
    assert_eq!(
        range_and_frontend_ops(&plan),
        ["+198.51.100.0/24", "frontend (ranges)"]
    );

    // A change of ranges: the new one first, the old one after (the flag stays).
    web.source_ranges = vec![range("2001:db8:c::/48")];
    let plan = converge(&mut maps, &desired(vec![("web", web.clone())]));
    assert_eq!(
        range_and_frontend_ops(&plan),
        ["+2001:db8:c::/48", "-198.51.100.0/24"]
    );

    web.source_ranges.clear();
    let plan = converge(&mut maps, &desired(vec![("web", web.clone())]));
    assert_eq!(
        range_and_frontend_ops(&plan),
        ["frontend", "-2001:db8:c::/48"]
    );

    // A removed service loses its frontends first, its ranges after, its id last.
    web.source_ranges = vec![range("198.51.100.0/24")];
    converge(&mut maps, &desired(vec![("web", web)]));
    let plan = converge(&mut maps, &Desired::default());
    assert_eq!(
        range_and_frontend_ops(&plan),
        ["-frontend", "-198.51.100.0/24"]
    );
    assert!(matches!(plan.ops.last(), Some(Op::ClearServiceMeta { .. })));
}

#[test]
fn ranges_with_host_bits_are_stored_as_their_network() {
    let mut maps = FakeMaps::default();
    let mut web = service(&[fe(10, 80)], &[]);
    web.source_ranges = vec![range("198.51.100.77/24"), range("198.51.100.0/24")];
    let plan = converge(&mut maps, &desired(vec![("web", web)]));
    assert_eq!(
        range_and_frontend_ops(&plan),
        ["+198.51.100.0/24", "frontend (ranges)"],
        "one range, host bits cleared"
    );
}

#[test]
fn restored_ranges_need_no_writes_and_leftovers_keep_their_id() {
    let mut maps = FakeMaps::default();
    let mut web = service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)]);
    web.source_ranges = vec![range("198.51.100.0/24")];
    web.when_empty = WhenEmpty::Reject;
    let want = desired(vec![("web", web)]);
    converge(&mut maps, &want);
    let restored = maps.applied.clone();
    assert!(plan(&want, &restored).ops.is_empty());

    // A crash left a range of a service whose metadata is gone: its id is not handed
    // out again until the range is removed.
    let mut leftover = Applied::default();
    leftover.source_ranges.insert((1, range("198.51.100.0/24")));
    let plan = plan(
        &desired(vec![(
            "other",
            service(&[fe(20, 80)], &[(ep(21, 8080), 1, UP)]),
        )]),
        &leftover,
    );
    assert!(
        !plan.ops.contains(&Op::ResetStats { id: 1 }),
        "{:?}",
        plan.ops
    );
    assert!(plan.ops.contains(&Op::RemoveSourceRange {
        service_id: 1,
        range: range("198.51.100.0/24")
    }));
}

#[test]
fn the_reject_flag_follows_when_empty_without_other_writes() {
    let mut maps = FakeMaps::default();
    let mut web = service(&[fe(10, 80), fe(10, 443)], &[]);
    converge(&mut maps, &desired(vec![("web", web.clone())]));
    web.when_empty = WhenEmpty::Reject;
    let plan = converge(&mut maps, &desired(vec![("web", web.clone())]));
    assert_eq!(
        plan.ops.len(),
        2,
        "both frontends, nothing else: {:?}",
        plan.ops
    );
    assert!(plan.ops.iter().all(|op| matches!(
        op,
        Op::SetFrontend { value, .. } if value.flags & FRONTEND_F_REJECT_EMPTY != 0
    )));
    // Backends coming and going do not touch the flag: the data path rejects only
    // while the table is empty.
    web.backends = service(&[], &[(ep(11, 8080), 1, UP)]).backends;
    let plan = converge(&mut maps, &desired(vec![("web", web)]));
    assert!(
        !plan
            .ops
            .iter()
            .any(|op| matches!(op, Op::SetFrontend { .. })),
        "{:?}",
        plan.ops
    );
}
