//! Map names and sizes. The names are the symbols of the `#[btf_map]` statics in lb-ebpf
//! and the file names under the pin directory; the `_V1` suffix is the layout version:
//! a change to a key or value layout gets a new name, so an agent never adopts a pinned
//! map whose bytes it would misread.

/// Frontend (VIP, port, protocol) -> service. `FrontendKey` -> `Frontend`.
pub const FRONTENDS: &str = "FRONTENDS_V1";
/// Backend id -> backend address (array: ids are dense). `u32` -> `Backend`.
pub const BACKENDS: &str = "BACKENDS_V1";
/// Backend id -> cached next hop towards it. `u32` -> `NextHop`.
pub const NEXTHOPS: &str = "NEXTHOPS_V1";
/// Address pre-filter: `addr_filter_slot(addr)` -> `ADDR_F_*` bits.
pub const ADDR_FILTER: &str = "ADDR_FILTER_V1";
/// Service id -> Maglev table (array of maps; inner arrays are swapped whole).
pub const MAGLEV: &str = "MAGLEV_V1";
/// Forward connection state: client flow -> chosen backend. `FlowKey` -> `Flow`.
pub const CONNTRACK: &str = "CONNTRACK_V1";
/// Reply translation: backend-side flow -> frontend to restore. `FlowKey` -> `RevNat`.
pub const REVNAT: &str = "REVNAT_V1";
/// Per-CPU counters per service id. `u32` -> `ServiceStats`.
pub const SERVICE_STATS: &str = "SVC_STATS_V2";
/// Per-CPU counters per `Reason`. `u32` -> `ReasonStats`.
pub const REASON_STATS: &str = "REASON_STATS_V1";
/// Interfaces the program may redirect to (devmap hash keyed by ifindex).
pub const TX_PORTS: &str = "TX_PORTS_V1";
/// Session affinity: (client, service) -> last backend. `AffinityKey` -> `Affinity`.
pub const AFFINITY: &str = "AFFINITY_V1";
/// Agent-only metadata per service id. `u32` -> `ServiceMeta`.
pub const SERVICE_META: &str = "SVC_META_V1";
/// Agent-only metadata per backend id. `u32` -> `BackendMeta`.
pub const BACKEND_META: &str = "BACKEND_META_V1";
/// Source ranges (`loadBalancerSourceRanges`) per service: an LPM trie keyed by
/// `SourceRangeKey` (after the prefix length); the value is unused (1).
pub const SOURCE_RANGES: &str = "SRC_RANGES_V1";

/// All maps, in the order the agent pins and reports them.
pub const ALL: [&str; 14] = [
    FRONTENDS,
    BACKENDS,
    NEXTHOPS,
    ADDR_FILTER,
    MAGLEV,
    CONNTRACK,
    REVNAT,
    SERVICE_STATS,
    REASON_STATS,
    TX_PORTS,
    AFFINITY,
    SERVICE_META,
    BACKEND_META,
    SOURCE_RANGES,
];

/// Service ids are indexes into `MAGLEV` and `SVC_STATS`; 0 is never assigned. Sized for
/// 10,000 Kubernetes Services with room for the extra ids a translation may use per
/// Service (per port, split for traffic policy Local).
pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_FRONTENDS: u32 = 262_144;
/// Backend ids are `1..MAX_BACKENDS` (array indexes); 0 marks an empty Maglev slot
/// (Katran's convention). Backends are per service: 10,000 Services x 10 endpoints, and
/// again for split services.
pub const MAX_BACKENDS: u32 = 262_144;
/// Source ranges over all services (LPM trie, allocated as used).
pub const MAX_SOURCE_RANGES: u32 = 65_536;
/// How long a cached next hop is used before the FIB is asked again.
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;
/// Default LRU sizes; the agent may override them at load time.
pub const CONNTRACK_ENTRIES: u32 = 262_144;
pub const MAX_TX_PORTS: u32 = 256;
pub const AFFINITY_ENTRIES: u32 = 65_536;

/// Layout of one Maglev inner array: slot 0 holds the table size M (prime), slots
/// 1..=M hold backend ids. Keeping M inside the table makes a size change part of the
/// same atomic swap as the new contents.
pub const MAGLEV_SIZE_SLOT: u32 = 0;
/// Inner-array entries the object's template declares; real tables are created by the
/// agent with `M + 1` entries and `BPF_F_INNER_MAP`, which lets sizes differ.
pub const MAGLEV_TEMPLATE_ENTRIES: u32 = 2;
/// `BPF_F_INNER_MAP`: inner maps of one outer map may differ in `max_entries`.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the array can be memory-mapped by userspace (the agent reads the
/// large metadata arrays that way).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
