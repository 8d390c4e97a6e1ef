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
/// Service id -> Maglev table (array of maps; each inner array holds two copies of the
/// table, see `MAGLEV_HEADER_SLOT`).
pub const MAGLEV: &str = "MAGLEV_V2";
/// Connection state, one entry per flow for both directions: client address and port
/// -> frontend, backend, SNAT port, reply translation. `ClientKey` -> `ClientFlow`, LRU.
pub const FLOWS: &str = "FLOWS_V1";
/// Forward connection state of a flow whose client port already has a `FLOWS` entry
/// for another frontend (and of entries older builds wrote): client flow -> chosen
/// backend and SNAT port. `FlowKey` -> `TrackedFlow`.
pub const CONNTRACK: &str = "CONNTRACK_V2";
/// Whether the pair tables (`CONNTRACK`, `REVNAT`) may hold entries: slot 0 is non-zero
/// once the program wrote one, or the agent adopted them from a build before `FLOWS`.
/// Until then a packet without a `FLOWS` entry skips their lookups. `u32` -> `u32`.
pub const FLOW_PAIRS: &str = "FLOW_PAIRS_V1";
/// Reply translation of the flows in `CONNTRACK`, and of DSR-delivered flows whose
/// client port has a `FLOWS` entry for another flow: backend-side flow -> frontend to
/// restore. `FlowKey` -> `RevNat`.
pub const REVNAT: &str = "REVNAT_V1";
/// SNAT port reservations and reply translations: reply flow (backend -> node address
/// and allocated port) -> client and frontend. `FlowKey` -> `SnatEntry`, LRU.
pub const SNAT: &str = "SNAT_V1";
/// The node's SNAT addresses and port range, one element. `u32` -> `SnatConfig`.
pub const SNAT_CONFIG: &str = "SNAT_CONFIG_V1";
/// Per-CPU counters per service id. `u32` -> `ServiceStats`.
pub const SERVICE_STATS: &str = "SVC_STATS_V2";
/// Per-CPU counters per backend id (new flows). `u32` -> `BackendStats`.
pub const BACKEND_STATS: &str = "BACKEND_STATS_V1";
/// Per-CPU counters per `Reason`. `u32` -> `ReasonStats`.
pub const REASON_STATS: &str = "REASON_STATS_V2";
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
/// The XDP entry's rare paths, each a program of its own reached by tail call (program
/// array): `SLOW_PATH_ICMP_ERROR`, `SLOW_PATH_TOO_BIG`. The agent fills it at load.
pub const SLOW_PATHS: &str = "SLOW_PATHS_V1";
/// `SLOW_PATHS` slot of the program that translates ICMP errors about translated flows.
pub const SLOW_PATH_ICMP_ERROR: u32 = 0;
/// `SLOW_PATHS` slot of the program that answers DSR packets too big for their next hop.
pub const SLOW_PATH_TOO_BIG: u32 = 1;
pub const SLOW_PATH_SLOTS: u32 = 2;

/// Socket load balancing: (socket cookie, backend) -> the Service address the socket
/// asked for (`recvmsg`, `getpeername`). `SockRevKey` -> `SockRevNat`, LRU.
pub const SOCK_REVNAT: &str = "SOCK_REVNAT_V1";
/// Socket load balancing: (socket cookie, frontend) -> the backend of an unconnected UDP
/// socket's datagrams. `SockFlowKey` -> `Flow`, LRU.
pub const SOCK_FLOWS: &str = "SOCK_FLOWS_V1";
/// Socket load balancing settings, one element. `u32` -> `SockConfig`.
pub const SOCK_CONFIG: &str = "SOCK_CONFIG_V1";
/// The socket programs' own maps: pinned beside `ALL` (so a restarted agent's programs
/// keep translating the sockets the previous one translated), and removed with them.
pub const SOCKET: [&str; 3] = [SOCK_REVNAT, SOCK_FLOWS, SOCK_CONFIG];
pub const SOCK_REVNAT_ENTRIES: u32 = 131_072;
pub const SOCK_FLOWS_ENTRIES: u32 = 65_536;

/// All maps, in the order the agent pins and reports them.
pub const ALL: [&str; 20] = [
    FRONTENDS,
    BACKENDS,
    NEXTHOPS,
    ADDR_FILTER,
    MAGLEV,
    FLOWS,
    FLOW_PAIRS,
    CONNTRACK,
    REVNAT,
    SERVICE_STATS,
    REASON_STATS,
    TX_PORTS,
    AFFINITY,
    SERVICE_META,
    BACKEND_META,
    SOURCE_RANGES,
    BACKEND_STATS,
    SNAT,
    SNAT_CONFIG,
    SLOW_PATHS,
];

/// Maps of earlier layouts, removed with the others (`lb-agent detach`, `--replace`) and
/// unpinned when an agent of this layout starts.
pub const RETIRED: [&str; 3] = ["MAGLEV_V1", "CONNTRACK_V1", "REASON_STATS_V1"];

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
/// How long a cached next hop is used before the FIB is asked again, in kernel ticks
/// (jiffies): 1 s at `HZ=250` (Debian's and Ubuntu's kernels), 0.25 s at 1000, 2.5 s at
/// 100. `lb-agent trace` converts it with the tick length of `CLOCK_MONOTONIC_COARSE`.
pub const NEXTHOP_TTL_JIFFIES: u32 = 250;
/// Default LRU sizes; the agent may override them at load time.
pub const CONNTRACK_ENTRIES: u32 = 262_144;
/// SNAT reservations: one per source-NATed flow, as conntrack has one per flow.
pub const SNAT_ENTRIES: u32 = CONNTRACK_ENTRIES;
/// The default SNAT port range: above the kernel's ephemeral range (32768-60999) and the
/// NodePort range (30000-32767), so a reply to a SNAT port never meets a local socket
/// or a NodePort.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
pub const MAX_TX_PORTS: u32 = 256;
pub const AFFINITY_ENTRIES: u32 = 65_536;

/// Layout of one Maglev inner array (`M + 1` elements of [`MaglevSlot`]): element 0 is
/// the header, `ids[0]` = the table size M (prime) with `MAGLEV_HALF_BIT` set when copy
/// 1 is live; elements `1..=M` hold slot `i - 1` of two copies of the table (backend
/// ids). The agent writes the copy not in use through a memory mapping, then flips the
/// header in one 32-bit store: a table change is atomic for packets without a
/// map-in-map update (each costs the writer an RCU grace period, milliseconds). A size
/// change swaps a new inner array in. Array elements are 8-byte aligned anyway, so the
/// second copy costs no memory.
pub const MAGLEV_HEADER_SLOT: u32 = 0;
/// Set in the header when copy 1 is live.
pub const MAGLEV_HALF_BIT: u32 = 1 << 31;

/// One element of a Maglev inner array: the same slot in both copies.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MaglevSlot {
    pub ids: [u32; 2],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), two u32, no padding.
unsafe impl aya::Pod for MaglevSlot {}

/// The element and copy that `hash` selects, given the header; `None` for an empty
/// table.
#[inline(always)]
pub const fn maglev_slot(header: u32, hash: u32) -> Option<(u32, bool)> {
    let size = header & !MAGLEV_HALF_BIT;
    if size == 0 {
        return None;
    }
    Some((1 + hash % size, header & MAGLEV_HALF_BIT != 0))
}

/// Inner-array entries the object's template declares; real tables are created by the
/// agent with `M + 1` entries and `MAGLEV_INNER_FLAGS` (`BPF_F_INNER_MAP` lets sizes
/// differ; the flags themselves must equal the template's).
pub const MAGLEV_TEMPLATE_ENTRIES: u32 = 2;
/// `BPF_F_INNER_MAP`: inner maps of one outer map may differ in `max_entries`.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: the array can be memory-mapped by userspace (the agent writes
/// Maglev tables and reads the large metadata arrays that way).
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of the Maglev template and of every inner table.
pub const MAGLEV_INNER_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_picks_the_live_copy() {
        assert_eq!(maglev_slot(0, 5), None);
        assert_eq!(
            maglev_slot(MAGLEV_HALF_BIT, 5),
            None,
            "no size, whichever copy"
        );
        assert_eq!(maglev_slot(13, 27), Some((2, false)));
        assert_eq!(maglev_slot(0xd | MAGLEV_HALF_BIT, 27), Some((2, true)));
        assert_eq!(maglev_slot(13, 12), Some((13, false)), "the last slot");
    }
}
