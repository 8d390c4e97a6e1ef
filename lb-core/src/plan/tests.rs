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
    /// Runs every op of `plan`, as a writer whose writes all succeed.
    fn run(&mut self, plan: &Plan) {
        self.run_prefix(plan, plan.ops.len());
    }

    /// Runs the first `n` ops of `plan`, as a writer whose write `n` fails when `n` is
    /// short of the whole plan.
    fn run_prefix(&mut self, plan: &Plan, n: usize) {
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
        for op in &plan.ops[..n] {
            self.write(op);
            self.check_hitless(op);
            check_index(&self.applied);
            for (key, need) in &kept {
                let now = Admits::of(&self.applied, key);
                assert!(
                    now.covers(need),
                    "after {op:?}: frontend {key:?} admits {now:?}, but {need:?} is admitted \
                     before and after the plan"
                );
            }
        }
        self.applied.conclude(plan, n == plan.ops.len());
    }

    /// One write, unchecked.
    fn write(&mut self, op: &Op) {
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
        let bits = |addr: &[u8; 16]| self.applied.filter.get(&addr_filter_slot(addr)).copied();
        for key in self.applied.frontends.keys() {
            assert!(
                bits(&key.addr).is_some_and(|b| b & ADDR_F_FRONTEND != 0),
                "after {after:?}: frontend {key:?} filtered out"
            );
        }
        for (id, slot) in &self.slots {
            assert!(
                bits(&slot.addr).is_some_and(|b| b & ADDR_F_BACKEND != 0),
                "after {after:?}: backend {id} filtered out"
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
        in_cluster: false,
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
                        local: false,
                    },
                )
            })
            .collect(),
        affinity_timeout_s: None,
        table_size: 13,
        when_empty: crate::model::WhenEmpty::Drop,
        source_ranges: Vec::new(),
        snat: false,
        dsr: false,
    }
}

fn desired(services: Vec<(&str, ServiceModel)>) -> Desired {
    services.into_iter().collect()
}

/// A service of `want` to change (copied when another state shares it).
fn model_mut<'a>(want: &'a mut Desired, name: &str) -> &'a mut ServiceModel {
    Arc::make_mut(want.services.get_mut(name).expect("service exists"))
}

/// The indexes `record` keeps equal those built from the maps alone.
fn check_index(applied: &Applied) {
    let mut unsettled = applied.clone();
    unsettled.unsettle();
    let rebuilt = Applied::from_maps(
        applied.services.clone(),
        applied.backends.clone(),
        applied.slots.clone(),
        applied.frontends.clone(),
        applied.tables.clone(),
        applied.source_ranges.clone(),
        applied.filter.clone(),
    );
    assert_eq!(unsettled, rebuilt, "indexes drifted from the maps");
}

/// The table `model` should have, as endpoints.
fn expected_table(model: &ServiceModel) -> Vec<Endpoint> {
    let members: Vec<(Endpoint, String, u32)> = model
        .backends
        .iter()
        .filter(|(_, b)| b.selectable())
        .map(|(e, b)| (*e, e.to_string(), b.weight))
        .collect();
    if members.is_empty() {
        return Vec::new();
    }
    let input: Vec<maglev::Backend<'_>> = (1..)
        .zip(&members)
        .map(|(id, (_, identity, weight))| maglev::Backend {
            id,
            identity: identity.as_bytes(),
            weight: *weight,
        })
        .collect();
    maglev::build_table(&input, model.table_size)
        .unwrap()
        .into_iter()
        .map(|id| members[id as usize - 1].0)
        .collect()
}

/// The pre-filter bits `want` needs, computed from nothing but `want`.
fn filter_from_scratch(want: &Desired) -> BTreeMap<u32, u8> {
    let mut filter = BTreeMap::new();
    for model in want.services.values() {
        for spec in &model.frontends {
            *filter
                .entry(addr_filter_slot(&frontend_key(spec).addr))
                .or_default() |= ADDR_F_FRONTEND;
        }
        for (endpoint, _) in model.backends.iter().filter(|(_, b)| b.forwarding()) {
            *filter
                .entry(addr_filter_slot(&addr_key(endpoint.addr).0))
                .or_default() |= ADDR_F_BACKEND;
        }
    }
    filter
}

/// Plans, runs, checks the result and that a second plan is empty, whether it skips
/// settled services or compares every one with the maps.
fn converge(maps: &mut FakeMaps, want: &Desired) -> Plan {
    let plan = plan(want, &maps.applied);
    assert!(plan.errors.is_empty(), "{:?}", plan.errors);
    maps.run(&plan);
    let again = super::plan(want, &maps.applied);
    assert!(again.ops.is_empty(), "not idempotent: {:?}", again.ops);
    let mut unsettled = maps.applied.clone();
    unsettled.unsettle();
    let full = super::plan(want, &unsettled);
    assert!(
        full.ops.is_empty(),
        "a plan over every service finds more to do: {:?}",
        full.ops
    );
    assert_eq!(
        maps.applied.filter,
        filter_from_scratch(want),
        "address filter"
    );
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
        assert_eq!(table, &expected_table(model), "{name}: table");
        let id = maps.applied.index.names[name];
        let want_ranges: BTreeSet<IpNet> = model.source_ranges.iter().map(IpNet::trunc).collect();
        let ranges: BTreeSet<IpNet> = maps.applied.ranges_of(id).collect();
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
            Op::SetAddrFilter { .. } => "filter",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "filter",
            "filter",
            "filter",
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
    model_mut(&mut want, "web")
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap()
        .weight = 3;
    let plan = converge(&mut maps, &want);
    // The metadata is written twice: its digest cleared before the swap, set after.
    assert_eq!(plan.ops.len(), 4, "{:?}", plan.ops);
    assert!(matches!(plan.ops[0], Op::SetBackendMeta { .. }));
    assert!(matches!(&plan.ops[1], Op::SetServiceMeta { meta, .. } if meta.table_digest == 0));
    assert!(matches!(plan.ops[2], Op::SetTable { .. }));
    assert!(matches!(&plan.ops[3], Op::SetServiceMeta { meta, .. } if meta.table_digest != 0));
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
    let b = model_mut(&mut want, "web")
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
    model_mut(&mut want, "web")
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
    model_mut(&mut want, "web")
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
    let restored = Applied::from_maps(
        maps.applied.services.clone(),
        maps.applied.backends.clone(),
        maps.applied.slots.clone(),
        maps.applied.frontends.clone(),
        maps.applied.tables.clone(),
        maps.applied.source_ranges.clone(),
        maps.applied.filter.clone(),
    );
    let again = plan(&want, &restored);
    assert!(again.ops.is_empty(), "{:?}", again.ops);
    assert_eq!(again.settled.len(), 1, "looked at the unsettled service");
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
                    (format!("svc-{n}"), Arc::new(model))
                })
                .collect(),
            snat_addresses: None,
        }
    })
}

proptest! {
    /// Any sequence of desired states converges, hitlessly, with nothing left over, also
    /// when writes fail part way through a plan (the writer retries with a new plan).
    #[test]
    fn interrupted_plans_still_converge(
        steps in proptest::collection::vec((arb_desired(), 0.0f64..1.0), 1..6),
    ) {
        let mut maps = FakeMaps::default();
        for (want, cut) in &steps {
            let plan = plan(want, &maps.applied);
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "a fraction of a short op list"
            )]
            let n = (plan.ops.len() as f64 * cut) as usize;
            maps.run_prefix(&plan, n);
        }
        converge(&mut maps, &steps.last().unwrap().0);
        converge(&mut maps, &Desired::default());
        prop_assert_eq!(&maps.applied, &Applied::default());
        prop_assert!(maps.slots.is_empty() && maps.tables.is_empty());
    }

    /// The id pool hands out the lowest free ids, or those above the used ones first, as
    /// a scan of the used ones would.
    #[test]
    fn id_pool_gives_the_lowest_free_ids(
        steps in proptest::collection::vec((any::<bool>(), 1u32..40), 0..60),
    ) {
        let mut pool = IdPool::default();
        let mut used = BTreeSet::new();
        for (insert, id) in steps {
            if insert {
                pool.insert(id);
                used.insert(id);
            } else {
                pool.remove(id);
                used.remove(&id);
            }
            let mut ids = pool.allocator(50, IdOrder::Lowest);
            let got: Vec<u32> = std::iter::from_fn(|| ids.take()).take(5).collect();
            let want: Vec<u32> = (1..50).filter(|id| !used.contains(id)).take(5).collect();
            prop_assert_eq!(got, want);
            let mut ids = pool.allocator(50, IdOrder::AboveFirst);
            let got: Vec<u32> = std::iter::from_fn(|| ids.take()).collect();
            let above = used.last().map_or(1, |top| top + 1);
            let want: Vec<u32> = (above..50)
                .chain((1..above).filter(|id| !used.contains(id)))
                .collect();
            prop_assert_eq!(got, want);
        }
        for id in used {
            pool.remove(id);
        }
        prop_assert_eq!(pool, IdPool::default());
    }

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
    model_mut(&mut want, "web")
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
    model_mut(&mut want, "web")
        .backends
        .get_mut(&ep(12, 8080))
        .unwrap()
        .weight = 1;
    converge(&mut maps, &want);
    assert_eq!(drained(&maps), 0);
}

/// New ids go to serving backends first: when the pool runs out, the one left
/// without is a draining backend (its open connections move), not one that new
/// connections need.
#[test]
fn serving_backends_take_new_ids_before_draining_ones() {
    let mut maps = FakeMaps::default();
    let want = desired(vec![(
        "web",
        service(
            &[fe(10, 80)],
            &[
                (ep(11, 8080), 0, UP),
                (ep(12, 8080), 1, UP),
                (ep(13, 8080), 0, UP),
            ],
        ),
    )]);
    converge(&mut maps, &want);
    let id_of = |last: u8| {
        let addr = IpAddr::from([192, 0, 2, last]);
        maps.slots
            .iter()
            .find(|(_, b)| b.addr == addr_key(addr).0)
            .map(|(id, _)| *id)
            .expect("has a slot")
    };
    // In address order the draining 192.0.2.11 came first and took the lowest id.
    assert!(id_of(12) < id_of(11), "{:?}", maps.slots);
    assert!(id_of(12) < id_of(13), "{:?}", maps.slots);
}

#[test]
fn one_changed_service_among_many_is_the_only_one_planned() {
    let mut maps = FakeMaps::default();
    let mut want = Desired::default();
    // Enough services that their tables are built in parallel (`PARALLEL_TABLES`);
    // `converge` checks each table against one built alone.
    for i in 0..100u8 {
        let model = service(&[fe(i, 80)], &[(ep(i, 8080), 1, UP), (ep(i, 8081), 1, UP)]);
        want.services.insert(format!("svc-{i:02}"), Arc::new(model));
    }
    converge(&mut maps, &want);
    let id = maps.applied.index.names["svc-07"];
    model_mut(&mut want, "svc-07").backends.insert(
        ep(7, 8082),
        BackendModel {
            weight: 1,
            health: UP,
            local: false,
        },
    );
    let plan = converge(&mut maps, &want);
    assert_eq!(plan.settled.len(), 1, "{:?}", plan.settled);
    assert!(
        plan.ops.iter().all(|op| match op {
            Op::SetTable { service_id, .. } => *service_id == id,
            Op::SetServiceMeta { id: s, .. } => *s == id,
            Op::SetBackend { backend, .. } => backend.service_id == id,
            Op::SetBackendMeta { meta, .. } => meta.service_id == id,
            _ => false,
        }),
        "{:?}",
        plan.ops
    );
    // A source that rebuilt every model (new pointers, same contents) costs no writes.
    let rebuilt = Desired {
        services: want
            .services
            .iter()
            .map(|(n, m)| (n.clone(), Arc::new((**m).clone())))
            .collect(),
        snat_addresses: None,
    };
    let plan = converge(&mut maps, &rebuilt);
    assert!(plan.ops.is_empty());
    assert_eq!(plan.settled.len(), 100, "re-settled on the new pointers");
    assert!(super::plan(&rebuilt, &maps.applied).settled.is_empty());
}

#[test]
fn a_restart_cleans_up_what_a_crash_left() {
    let mut maps = FakeMaps::default();
    let want = desired(vec![
        ("a", service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)])),
        ("b", service(&[fe(11, 80)], &[(ep(12, 8080), 1, UP)])),
    ]);
    converge(&mut maps, &want);
    let a = maps.applied.index.names["a"];
    let b = maps.applied.index.names["b"];
    let mut services = maps.applied.services.clone();
    let mut backends = maps.applied.backends.clone();
    let mut slots = maps.applied.slots.clone();
    // "b" lost its metadata (its frontend and backend still name it), a second "a" was
    // half written, and a slot was filled without metadata.
    services.remove(&b);
    services.insert(9, services[&a]);
    backends.insert(
        20,
        BackendMeta {
            service_id: 9,
            ..backends.values().next().copied().unwrap()
        },
    );
    slots.insert(21, slots.values().next().copied().unwrap());
    let mut tables = maps.applied.tables.clone();
    tables.insert(30);
    maps.applied = Applied::from_maps(
        services,
        backends,
        slots,
        maps.applied.frontends.clone(),
        tables,
        maps.applied.source_ranges.clone(),
        maps.applied.filter.clone(),
    );
    assert_eq!(
        maps.applied.index.strays,
        BTreeSet::from([b, 9, 30]),
        "reachable only by id"
    );
    maps.slots
        .insert(21, maps.slots.values().next().copied().unwrap());
    maps.tables.insert(30, Vec::new());
    // The crash left frontends without metadata: no hitless check for this plan.
    let cleanup = plan(&want, &maps.applied);
    for op in &cleanup.ops {
        maps.write(op);
    }
    maps.applied.conclude(&cleanup, true);
    converge(&mut maps, &want);
    assert!(!maps.applied.tables.contains(&30));
    assert!(maps.applied.index.strays.is_empty());
    assert!(!maps.applied.slots.contains_key(&21));
    assert!(!maps.applied.services.contains_key(&9));
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
    let last = plan
        .ops
        .iter()
        .rfind(|op| !matches!(op, Op::SetAddrFilter { .. }));
    assert!(matches!(last, Some(Op::ClearServiceMeta { .. })));
    assert!(matches!(
        plan.ops.last(),
        Some(Op::SetAddrFilter { bits: 0, .. })
    ));
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
    let restored = Applied::from_maps(
        maps.applied.services.clone(),
        maps.applied.backends.clone(),
        maps.applied.slots.clone(),
        maps.applied.frontends.clone(),
        maps.applied.tables.clone(),
        maps.applied.source_ranges.clone(),
        maps.applied.filter.clone(),
    );
    assert!(plan(&want, &restored).ops.is_empty());

    // A crash left a range of a service whose metadata is gone: its id is not handed
    // out again until the range is removed.
    let leftover = Applied::from_maps(
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeMap::new(),
        BTreeSet::new(),
        BTreeSet::from([(1, range("198.51.100.0/24"))]),
        BTreeMap::new(),
    );
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

#[test]
fn the_address_filter_keeps_a_bit_another_frontend_or_backend_still_needs() {
    let mut maps = FakeMaps::default();
    // Both services use the same frontend address (other ports) and backend address.
    let want = desired(vec![
        ("a", service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)])),
        ("b", service(&[fe(10, 81)], &[(ep(11, 9090), 1, UP)])),
    ]);
    let first = converge(&mut maps, &want);
    let raised: Vec<&Op> = first
        .ops
        .iter()
        .take_while(|op| matches!(op, Op::SetAddrFilter { .. }))
        .collect();
    assert_eq!(raised.len(), 2, "set first: {:?}", first.ops);
    let filter_writes = |plan: &Plan| {
        plan.ops
            .iter()
            .filter(|op| matches!(op, Op::SetAddrFilter { .. }))
            .count()
    };
    assert_eq!(filter_writes(&first), 2, "each slot written once");

    let only_b = desired(vec![(
        "b",
        service(&[fe(10, 81)], &[(ep(11, 9090), 1, UP)]),
    )]);
    let shrink = converge(&mut maps, &only_b);
    assert_eq!(filter_writes(&shrink), 0, "b still needs both bits");

    let gone = converge(&mut maps, &Desired::default());
    let cleared = &gone.ops[gone.ops.len() - 2..];
    assert!(
        cleared
            .iter()
            .all(|op| matches!(op, Op::SetAddrFilter { bits: 0, .. })),
        "cleared last: {:?}",
        gone.ops
    );
    assert!(maps.applied.filter.is_empty());
}

#[test]
fn filter_bits_an_interrupted_plan_raised_are_lowered_by_the_next() {
    let mut maps = FakeMaps::default();
    let want = desired(vec![(
        "a",
        service(&[fe(10, 80)], &[(ep(11, 8080), 1, UP)]),
    )]);
    let plan = plan(&want, &maps.applied);
    // Only the filter bits went in before the failure.
    maps.run_prefix(&plan, 2);
    assert_eq!(maps.applied.filter.len(), 2);
    converge(&mut maps, &Desired::default());
    assert!(maps.applied.filter.is_empty(), "{:?}", maps.applied.filter);
}
