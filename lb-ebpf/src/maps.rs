//! Every map of the program, in one place. Names are versioned (`_V1`): see
//! `lb_common::maps`. All are BTF maps, so `bpftool map dump` prints typed entries.

use aya_ebpf::{
    btf_maps::{
        Array, ArrayOfMaps, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray,
    },
    macros::btf_map,
};
use lb_common::{
    ADDR_FILTER_SLOTS, Affinity, AffinityKey, Backend, BackendMeta, BackendStats, ClientFlow,
    ClientKey, FlowKey, Frontend, FrontendKey, NextHop, Reason, ReasonStats, RevNat, ServiceMeta,
    ServiceStats, SnatConfig, SnatEntry, SourceRangeKey, TrackedFlow,
    maps::{
        AFFINITY_ENTRIES, BPF_F_MMAPABLE, CONNTRACK_ENTRIES, MAGLEV_INNER_FLAGS,
        MAGLEV_TEMPLATE_ENTRIES, MAX_BACKENDS, MAX_FRONTENDS, MAX_SERVICES, MAX_SOURCE_RANGES,
        MAX_TX_PORTS, MaglevSlot, SLOW_PATH_SLOTS, SNAT_ENTRIES,
    },
};

const fn n(v: u32) -> usize {
    v as usize
}

#[btf_map]
pub static FRONTENDS_V1: HashMap<FrontendKey, Frontend, { n(MAX_FRONTENDS) }> = HashMap::new();

/// Arrays, not hashes: ids are dense and array lookups are inlined by the verifier.
/// Memory-mappable, so a restarted agent reads it whole in milliseconds.
#[btf_map]
pub static BACKENDS_V1: Array<Backend, { n(MAX_BACKENDS) }, { n(BPF_F_MMAPABLE) }> = Array::new();

#[btf_map]
pub static NEXTHOPS_V1: Array<NextHop, { n(MAX_BACKENDS) }> = Array::new();

#[btf_map]
pub static ADDR_FILTER_V1: Array<u8, { n(ADDR_FILTER_SLOTS) }> = Array::new();

/// Outer map indexed by service id; each inner array is one service's Maglev table,
/// twice (see `lb_common::maps::MAGLEV_HEADER_SLOT`).
#[btf_map]
pub static MAGLEV_V2: ArrayOfMaps<
    Array<MaglevSlot, { n(MAGLEV_TEMPLATE_ENTRIES) }, { n(MAGLEV_INNER_FLAGS) }>,
    { n(MAX_SERVICES) },
> = ArrayOfMaps::new();

/// One entry per flow, both directions (see `lb_common::ClientFlow`).
#[btf_map]
pub static FLOWS_V1: LruHashMap<ClientKey, ClientFlow, { n(CONNTRACK_ENTRIES) }> =
    LruHashMap::new();

/// Per-CPU room to build a new `FLOWS_V1` value in.
#[btf_map]
pub static FLOW_SCRATCH_V1: PerCpuArray<ClientFlow, 1> = PerCpuArray::new();

/// Non-zero once the pair tables may hold entries (see `lb_common::maps::FLOW_PAIRS`).
#[btf_map]
pub static FLOW_PAIRS_V1: Array<u32, 1> = Array::new();

/// The flows `FLOWS_V1` cannot hold: a client port already there for another flow.
#[btf_map]
pub static CONNTRACK_V2: LruHashMap<FlowKey, TrackedFlow, { n(CONNTRACK_ENTRIES) }> =
    LruHashMap::new();

/// SNAT reservations and reply translations (see `snat.rs`).
#[btf_map]
pub static SNAT_V1: LruHashMap<FlowKey, SnatEntry, { n(SNAT_ENTRIES) }> = LruHashMap::new();

/// Per-CPU room to build a new `SNAT_V1` value in (the stack has none left).
#[btf_map]
pub static SNAT_SCRATCH_V1: PerCpuArray<SnatEntry, 1> = PerCpuArray::new();

/// Per-CPU room for the `SNAT_V1` key a new flow's port attempts walk through.
#[btf_map]
pub static KEY_SCRATCH_V1: PerCpuArray<FlowKey, 1> = PerCpuArray::new();

/// Per-CPU room to build a new `REVNAT_V1` value in.
#[btf_map]
pub static REVNAT_SCRATCH_V1: PerCpuArray<RevNat, 1> = PerCpuArray::new();

/// The node's SNAT addresses and port range, written by the agent.
#[btf_map]
pub static SNAT_CONFIG_V1: Array<SnatConfig, 1> = Array::new();

#[btf_map]
pub static REVNAT_V1: LruHashMap<FlowKey, RevNat, { n(CONNTRACK_ENTRIES) }> = LruHashMap::new();

#[btf_map]
pub static SVC_STATS_V2: PerCpuArray<ServiceStats, { n(MAX_SERVICES) }> = PerCpuArray::new();

/// Indexed by backend id, as `BACKENDS_V1`.
#[btf_map]
pub static BACKEND_STATS_V1: PerCpuArray<BackendStats, { n(MAX_BACKENDS) }> = PerCpuArray::new();

#[btf_map]
pub static REASON_STATS_V2: PerCpuArray<ReasonStats, { n(Reason::COUNT) }> = PerCpuArray::new();

#[btf_map]
pub static TX_PORTS_V1: DevMapHash<{ n(MAX_TX_PORTS) }> = DevMapHash::new();

#[btf_map]
pub static AFFINITY_V1: LruHashMap<AffinityKey, Affinity, { n(AFFINITY_ENTRIES) }> =
    LruHashMap::new();

/// Service source ranges; the value is unused (the agent writes 1).
#[btf_map]
pub static SRC_RANGES_V1: LpmTrie<SourceRangeKey, u32, { n(MAX_SOURCE_RANGES) }> = LpmTrie::new();

/// Written and read by the agent only; declared here so they are BTF maps that
/// `bpftool map dump` prints typed, pinned beside the others.
/// Memory-mappable, as `BACKENDS_V1`.
#[btf_map]
pub static SVC_META_V1: Array<ServiceMeta, { n(MAX_SERVICES) }, { n(BPF_F_MMAPABLE) }> =
    Array::new();

#[btf_map]
pub static BACKEND_META_V1: Array<BackendMeta, { n(MAX_BACKENDS) }, { n(BPF_F_MMAPABLE) }> =
    Array::new();

/// The entry's rare paths, tail-called (`slow_path`): each program then has the whole
/// stack, and the entry's common path calls no BPF function at all.
#[btf_map]
pub static SLOW_PATHS_V1: ProgramArray<{ n(SLOW_PATH_SLOTS) }> = ProgramArray::new();

/// Per-CPU: the length the frame arrived with, for the slow path's counters (the DSR
/// path has encapsulated it by then).
#[btf_map]
pub static ARRIVED_BYTES_V1: PerCpuArray<u64, 1> = PerCpuArray::new();
