//! Map keys and values. Addresses are 16 bytes in network order; an IPv4 address uses
//! the first 4 bytes and leaves the rest zero. Ports are kept in network byte order, as
//! they appear on the wire, so the data path never swaps bytes.

/// Address family tags used in keys (not the kernel's `AF_*` numbers).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// An IP address as keys hold it: 16 bytes (IPv4 in the first 4) and its family tag.
pub const fn addr_key(ip: core::net::IpAddr) -> ([u8; 16], u8) {
    match ip {
        core::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            (
                [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                FAMILY_V4,
            )
        }
        core::net::IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// Frontend flag: choose the backend by client address only (sessionAffinity `ClientIP`).
pub const FRONTEND_F_CLIENT_AFFINITY: u32 = 1;
/// Frontend flag: while the service has no backend, answer new flows with a TCP reset
/// or ICMP port unreachable (kube-proxy's REJECT) instead of dropping them.
pub const FRONTEND_F_REJECT_EMPTY: u32 = 2;
/// Frontend flag: new flows only from clients inside one of the service's source ranges
/// (`SRC_RANGES_V1`); the others are dropped.
pub const FRONTEND_F_SOURCE_RANGES: u32 = 4;
/// Frontend flag: a new flow to a backend on another node (no `BACKEND_F_LOCAL`) also gets
/// its source rewritten to this node's address and a port from `SNAT_CONFIG_V1` (SNAT
/// mode), so the backend's replies come back through this node.
pub const FRONTEND_F_SNAT: u32 = 8;
/// Frontend flag: a flow to a backend on another node (no `BACKEND_F_LOCAL`) is sent there
/// untranslated, encapsulated (IPIP / IPv6-in-IPv6) to the backend's address (DSR mode);
/// that node's program decapsulates, translates and delivers, and its replies go to
/// the client directly (see `lb_common::dsr`).
pub const FRONTEND_F_DSR: u32 = 16;

/// Aligned to 4 (size unchanged) for the same reason as [`FlowKey`].
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frontend {
    pub service_id: u32,
    pub flags: u32,
    /// With `FRONTEND_F_CLIENT_AFFINITY`: how long a client keeps its backend after
    /// its last new connection (kube-proxy's `sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// Session affinity: which backend a client address last got for a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: [u8; 16],
    pub service_id: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Affinity {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns` of the client's last new connection.
    pub last_seen_ns: u64,
}

/// The data of a `SRC_RANGES_V1` key (an LPM trie; the prefix length in bits comes first,
/// in host order, as the kernel's `bpf_lpm_trie_key` has it). The trie matches bits in
/// this order, so a range of a service is the prefix `SOURCE_RANGE_FIXED_BITS + range
/// length`, and one lookup with the client's whole address (`SOURCE_RANGE_LOOKUP_BITS`)
/// answers whether any range of that service holds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// Big-endian, so the trie compares it first and whole.
    pub service_id: [u8; 4],
    pub family: u8,
    pub _pad: [u8; 3],
    /// The range's address (IPv4 in the first 4 bytes), host bits zero.
    pub addr: [u8; 16],
}

/// Key bits before the address: service id, family and padding.
pub const SOURCE_RANGE_FIXED_BITS: u32 = 64;
/// The prefix length of a lookup: everything, the whole 16-byte address included.
pub const SOURCE_RANGE_LOOKUP_BITS: u32 = SOURCE_RANGE_FIXED_BITS + 128;

impl SourceRangeKey {
    /// The key of `client` (or of a range's address) for `service_id`.
    #[inline(always)]
    pub const fn new(service_id: u32, family: u8, addr: [u8; 16]) -> SourceRangeKey {
        SourceRangeKey {
            service_id: service_id.to_be_bytes(),
            family,
            _pad: [0; 3],
            addr,
        }
    }
}

/// Longest service name the metadata map holds (bytes, NUL-padded).
pub const SERVICE_NAME_LEN: usize = 128;
/// `ServiceMeta::flags`: the slot holds a service.
pub const SERVICE_META_F_IN_USE: u32 = 1;
/// `ServiceMeta::flags`: every backend is unhealthy or drained, so new flows are dropped.
pub const SERVICE_META_F_NO_BACKENDS: u32 = 2;

/// What the agent wrote for a service id. The program never reads it: it lets a
/// restarted agent restore its ids and `lb-agent status` name services from the pins alone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceMeta {
    pub name: [u8; SERVICE_NAME_LEN],
    pub flags: u32,
    /// Maglev table size M.
    pub table_size: u32,
    /// Digest of the installed Maglev table; 0 when the service has none. A restarted
    /// agent compares it with the table it computes and rewrites only on a difference.
    pub table_digest: u64,
}

impl Default for ServiceMeta {
    fn default() -> Self {
        ServiceMeta {
            name: [0; SERVICE_NAME_LEN],
            flags: 0,
            table_size: 0,
            table_digest: 0,
        }
    }
}

/// `BackendMeta::health`.
pub const HEALTH_UNCHECKED: u8 = 0;
pub const HEALTH_UP: u8 = 1;
pub const HEALTH_DOWN: u8 = 2;

/// What the agent wrote for a backend id, also while the backend is out of `BACKENDS`
/// (unhealthy): the address, weight and health that status and a restarted agent read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendMeta {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// 0 marks an unused id.
    pub family: u8,
    pub health: u8,
    pub service_id: u32,
    pub weight: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// 0 marks an empty slot of the backend array.
    pub family: u8,
    /// `BACKEND_F_*`.
    pub flags: u8,
    /// The service this backend serves; conntrack reuses a backend only for this service,
    /// so a recycled id can never carry another service's flow.
    pub service_id: u32,
}

/// `Backend::flags`: drained (weight 0). Tracked flows keep using it; session affinity
/// does not send new flows to it (the Maglev table already has none of its slots).
pub const BACKEND_F_DRAINING: u8 = 1;
/// `Backend::flags`: the backend runs on this node (a pod behind a local device). Never
/// source-NATed; its replies leave through the node's uplink, where the tc egress program
/// translates them back.
pub const BACKEND_F_LOCAL: u8 = 2;

/// A 5-tuple as seen on the wire (source first). Aligned to 8 (its size already is a
/// multiple of 8, so the map layout is the same): the BPF backend assumes nothing about
/// the alignment of a byte array and would read, copy and hash the addresses a byte at
/// a time.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The source address as four 32-bit words in memory order (each holds its four
    /// bytes as on the wire): one load each, where a byte array is read a byte at a
    /// time by the BPF backend.
    #[inline(always)]
    #[must_use]
    pub const fn src_words(&self) -> [u32; 4] {
        // SAFETY: `FlowKey` is aligned to 8 and `src` lies at offset 0.
        unsafe { addr_words(&self.src) }
    }

    /// The destination address as words (see [`FlowKey::src_words`]).
    #[inline(always)]
    #[must_use]
    pub const fn dst_words(&self) -> [u32; 4] {
        // SAFETY: `FlowKey` is aligned to 8 and `dst` lies at offset 16.
        unsafe { addr_words(&self.dst) }
    }

    /// Sets both addresses from words in memory order, in word stores.
    #[inline(always)]
    pub fn set_addr_words(&mut self, src: [u32; 4], dst: [u32; 4]) {
        self.set_src_words(src);
        self.set_dst_words(dst);
    }

    /// Sets the source address from words in memory order.
    #[inline(always)]
    #[expect(clippy::cast_ptr_alignment, reason = "FlowKey is aligned to 8")]
    pub fn set_src_words(&mut self, src: [u32; 4]) {
        // SAFETY: as in `src_words`; the field is plain bytes.
        unsafe { (&raw mut self.src).cast::<[u32; 4]>().write(src) };
    }

    /// Sets the destination address from words in memory order.
    #[inline(always)]
    #[expect(clippy::cast_ptr_alignment, reason = "FlowKey is aligned to 8")]
    pub fn set_dst_words(&mut self, dst: [u32; 4]) {
        // SAFETY: as in `dst_words`; the field is plain bytes.
        unsafe { (&raw mut self.dst).cast::<[u32; 4]>().write(dst) };
    }

    /// The key of the reply direction after DNAT to `backend`: backend -> client.
    #[must_use]
    pub const fn reply_after_dnat(&self, backend: &Backend) -> FlowKey {
        FlowKey {
            src: backend.addr,
            dst: self.src,
            sport: backend.port,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Conntrack value for the client -> frontend direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    pub backend_id: u32,
    pub service_id: u32,
}

/// Conntrack value (`CONNTRACK_V2`) for the client -> frontend direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedFlow {
    pub backend_id: u32,
    pub service_id: u32,
    /// The source port this node gave the flow (network byte order); 0: not source-NATed.
    /// The `SNAT_V1` entry keyed by the reply (backend -> node address, this port) is the
    /// port's reservation; a flow whose reservation is gone or taken gets a new port.
    pub nat_port: u16,
    /// The frontend's `FRONTEND_F_*` flags when the flow was tracked, with
    /// [`FLOW_F_FRONTEND_REMEMBERED`]: an established flow's packets then need no
    /// frontend lookup. 0 in an entry an older build wrote (the frontend is looked up).
    pub frontend_flags: u8,
    pub _pad: [u8; 5],
}

/// `TrackedFlow::frontend_flags`: the entry remembers its frontend's flags (the other
/// bits). Every `FRONTEND_F_*` flag fits below it.
pub const FLOW_F_FRONTEND_REMEMBERED: u8 = 0x80;

impl TrackedFlow {
    /// The frontend flags the entry remembers (without the marker); `None` in an entry
    /// an older build wrote.
    #[inline(always)]
    #[must_use]
    pub const fn remembered_frontend_flags(&self) -> Option<u32> {
        if self.frontend_flags & FLOW_F_FRONTEND_REMEMBERED == 0 {
            return None;
        }
        Some((self.frontend_flags & !FLOW_F_FRONTEND_REMEMBERED) as u32)
    }
}

/// The node's SNAT settings (`SNAT_CONFIG_V1`, one element), written by the agent.
/// Aligned to 4 (size unchanged) so its addresses are read as words ([`addr_words`]).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatConfig {
    /// The node's IPv4 address (first 4 bytes), when `SNAT_CFG_F_V4`.
    pub addr_v4: [u8; 16],
    /// The node's IPv6 address, when `SNAT_CFG_F_V6`.
    pub addr_v6: [u8; 16],
    /// The port range, host byte order, `port_min <= port_max`.
    pub port_min: u16,
    pub port_max: u16,
    /// `SNAT_CFG_F_*`.
    pub flags: u8,
    pub _pad: [u8; 3],
}

/// `SnatConfig::flags`: `addr_v4` is set.
pub const SNAT_CFG_F_V4: u8 = 1;
/// `SnatConfig::flags`: `addr_v6` is set.
pub const SNAT_CFG_F_V6: u8 = 2;

impl SnatConfig {
    /// The node address of `family`, if the agent gave one.
    #[inline(always)]
    pub const fn addr(&self, family: u8) -> Option<[u8; 16]> {
        if family == FAMILY_V4 && self.flags & SNAT_CFG_F_V4 != 0 {
            Some(self.addr_v4)
        } else if family == FAMILY_V6 && self.flags & SNAT_CFG_F_V6 != 0 {
            Some(self.addr_v6)
        } else {
            None
        }
    }
}

/// A SNAT port reservation and the reply translation (`SNAT_V1`), keyed by the reply's
/// `FlowKey`: backend -> node address and allocated port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnatEntry {
    /// The client's address and port (network byte order): the reply's destination.
    pub client: [u8; 16],
    /// The frontend the client used: the reply's source.
    pub frontend: [u8; 16],
    pub client_port: u16,
    pub frontend_port: u16,
    pub family: u8,
    /// `SNAT_STATE_*`.
    pub state: u8,
    pub _pad: [u8; 2],
    pub service_id: u32,
    pub _pad2: u32,
    /// `bpf_ktime_get_coarse_ns` of the flow's last packet, either direction.
    pub last_seen_ns: u64,
    /// Next hop towards the client.
    pub next_hop: NextHop,
}

/// `SnatEntry::state`: a TCP FIN or RST was seen; the port is free again sooner.
pub const SNAT_STATE_CLOSING: u8 = 1;
/// `SnatEntry::state`: the client's FIN went to the backend.
pub const SNAT_STATE_FIN_CLIENT: u8 = 2;
/// `SnatEntry::state`: the backend's FIN came back.
pub const SNAT_STATE_FIN_BACKEND: u8 = 4;
/// `SnatEntry::state`: the backend's FIN came before the client's, so the backend
/// closed first and holds the connection in `TIME_WAIT` (60 s on Linux).
pub const SNAT_STATE_BACKEND_WAITS: u8 = 8;
/// `SnatEntry::state`: the last packet carried an RST, which ends the connection at
/// both ends (no `TIME_WAIT`).
pub const SNAT_STATE_RESET: u8 = 16;

/// A cached `bpf_fib_lookup` result, so established traffic skips the FIB (its most
/// expensive step). Refreshed when it expires or when a packet is longer than any the
/// path has carried (so the FIB still checks the MTU for it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_ktime_get_coarse_ns` when the FIB gave this next hop; 0 = empty. For
    /// operators (`lb-agent trace`): the data path checks `expires_jiffies`.
    pub refreshed_ns: u64,
    pub ifindex: u32,
    /// Longest IP packet the FIB accepted for this path.
    pub max_len: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 2],
    /// Until when (`bpf_jiffies64`, low 32 bits, compared wrapping) the next hop is
    /// used: [`maps::NEXTHOP_TTL_JIFFIES`](crate::maps::NEXTHOP_TTL_JIFFIES) after
    /// `refreshed_ns`. Jiffies are one load for the program, the nanosecond clock a
    /// helper call (about 40 ns per packet). 0 = expired (so is an entry an older
    /// build wrote).
    pub expires_jiffies: u32,
}

/// `RevNat::flags`: the flow reached this node encapsulated (DSR); the backend's SYN-ACK
/// gets its MSS clamped for the encapsulation overhead (`lb_common::dsr`).
pub const REVNAT_F_DSR: u8 = 1;

/// What a reply from a backend is translated back to (the frontend the client used).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub family: u8,
    /// `REVNAT_F_*`.
    pub flags: u8,
    pub service_id: u32,
    /// Next hop towards the client.
    pub next_hop: NextHop,
}

/// `FLOWS_V1` key: a client's address, port and protocol. Both directions of a flow
/// know it (the forward packet's source, the reply's destination), so one entry serves
/// both; the frontend and the backend in the value tell which flow it is.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

impl ClientKey {
    /// The client of a packet towards a frontend (its source).
    #[inline(always)]
    #[must_use]
    pub const fn of_forward(key: &FlowKey) -> Self {
        Self {
            addr: key.src,
            port: key.sport,
            proto: key.proto,
            family: key.family,
        }
    }

    /// The client of a reply from a backend (its destination).
    #[inline(always)]
    #[must_use]
    pub const fn of_reply(key: &FlowKey) -> Self {
        Self {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            family: key.family,
        }
    }
}

/// `ClientFlow::reply.family` when the entry translates no reply on this node: a
/// source-NATed flow (its replies come to the node's address, `SNAT_V1`) or one sent to
/// another node by DSR (its replies leave from there).
pub const FLOW_REPLY_ELSEWHERE: u8 = 0;

/// One flow, both directions (`FLOWS_V1`, keyed by its client): the forward packets'
/// conntrack entry (`tracked`, when they go to `reply.addr`:`reply.port`, the frontend)
/// and the replies' translation (`reply`, when they come from
/// `backend_addr`:`backend_port`). One insert per new flow, where a pair of entries
/// (`CONNTRACK_V2` and `REVNAT_V1`) costs two; the pair remains for a client port that
/// talks to two frontends at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientFlow {
    /// The frontend the client used and the next hop back to it. `reply.family` is
    /// [`FLOW_REPLY_ELSEWHERE`] when this node translates no reply of the flow.
    pub reply: RevNat,
    /// The forward state: backend, service, SNAT port. `frontend_flags` lacks
    /// [`FLOW_F_FRONTEND_REMEMBERED`] in an entry written for a DSR-delivered flow (on
    /// the backend's node), which has no forward state.
    pub tracked: TrackedFlow,
    /// The backend's address and port (network order) as the client's packets leave
    /// with them.
    pub backend_addr: [u8; 16],
    pub backend_port: u16,
    pub _pad: [u8; 6],
}

impl ClientFlow {
    /// The flow's forward state, when `key` (client -> frontend) is this flow's.
    #[inline(always)]
    #[must_use]
    pub fn forward(&self, key: &FlowKey) -> Option<TrackedFlow> {
        (self.tracked.frontend_flags & FLOW_F_FRONTEND_REMEMBERED != 0
            && self.reply.port == key.dport
            && self.reply.addr_words() == key.dst_words())
        .then_some(self.tracked)
    }

    /// Whether `key` (backend -> client) is a reply of this flow that this node
    /// translates.
    #[inline(always)]
    #[must_use]
    pub fn is_reply(&self, key: &FlowKey) -> bool {
        self.reply.family == key.family
            && self.backend_port == key.sport
            && self.backend_addr_words() == key.src_words()
    }

    /// `backend_addr` as words (`ClientFlow` is aligned to 8; the field at offset 72).
    #[inline(always)]
    #[must_use]
    pub const fn backend_addr_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.backend_addr) }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Client -> backend packets and bytes (whole frames).
    pub packets: u64,
    pub bytes: u64,
    /// Flows that got a backend just now (new, or re-selected): from the Maglev table,
    /// or from the client's session affinity.
    pub new_flows: u64,
    /// Backend -> client packets and bytes translated back.
    pub reply_packets: u64,
    pub reply_bytes: u64,
    /// New flows answered with a TCP reset or ICMP unreachable (no backend, rejecting).
    pub rejected: u64,
    /// New flows dropped because the client is outside the service's source ranges.
    pub source_denied: u64,
}

/// Per-CPU counters per backend id (`BACKEND_STATS_V1`). Only new flows are counted:
/// the increment is on the new-flow path alone, so established packets pay nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Flows that got this backend just now (new, or re-selected).
    pub new_flows: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReasonStats {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, and has no implicit padding (checked by
    // the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::FrontendKey {}
    unsafe impl aya::Pod for super::Frontend {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::ServiceMeta {}
    unsafe impl aya::Pod for super::BackendMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::TrackedFlow {}
    unsafe impl aya::Pod for super::SnatConfig {}
    unsafe impl aya::Pod for super::SnatEntry {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::ClientFlow {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::ReasonStats {}
}

/// An address field of a key or value as words in memory order (see
/// [`FlowKey::src_words`]).
///
/// # Safety
/// `addr` is aligned to 4: a field at a multiple of 4 in a struct aligned to 4 or more.
#[inline(always)]
#[expect(clippy::cast_ptr_alignment, reason = "the caller's guarantee")]
const unsafe fn addr_words(addr: &[u8; 16]) -> [u32; 4] {
    // SAFETY: the caller's alignment; any bytes are a valid `u32`.
    unsafe { *core::ptr::from_ref(addr).cast::<[u32; 4]>() }
}

impl Backend {
    /// `addr` as words (`Backend` is aligned to 4; `addr` at offset 0).
    #[inline(always)]
    #[must_use]
    pub const fn addr_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.addr) }
    }
}

impl SnatEntry {
    /// `client` as words (`SnatEntry` is aligned to 8; `client` at offset 0).
    #[inline(always)]
    #[must_use]
    pub const fn client_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.client) }
    }

    /// `frontend` as words (offset 16).
    #[inline(always)]
    #[must_use]
    pub const fn frontend_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.frontend) }
    }
}

impl RevNat {
    /// `addr` as words (`RevNat` is aligned to 8; `addr` at offset 0).
    #[inline(always)]
    #[must_use]
    pub const fn addr_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.addr) }
    }
}

impl SnatConfig {
    /// `addr_v4` as words (`SnatConfig` is aligned to 4; `addr_v4` at offset 0).
    #[inline(always)]
    #[must_use]
    pub const fn addr_v4_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.addr_v4) }
    }

    /// `addr_v6` as words (offset 16).
    #[inline(always)]
    #[must_use]
    pub const fn addr_v6_words(&self) -> [u32; 4] {
        // SAFETY: see above.
        unsafe { addr_words(&self.addr_v6) }
    }
}

// No implicit padding anywhere: the sums of the field sizes.
const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<FrontendKey>() == 16 + 2 + 1 + 1);
    assert!(size_of::<Frontend>() == 16);
    assert!(size_of::<AffinityKey>() == 16 + 4 + 1 + 3);
    assert!(size_of::<Affinity>() == 16);
    assert!(size_of::<ServiceMeta>() == SERVICE_NAME_LEN + 16);
    assert!(size_of::<BackendMeta>() == 16 + 2 + 1 + 1 + 12);
    assert!(size_of::<Backend>() == 16 + 2 + 1 + 1 + 4);
    assert!(size_of::<FlowKey>() == 16 + 16 + 2 + 2 + 1 + 1 + 2);
    // Aligned for word access (see `FlowKey`); the sizes above are unchanged by it.
    assert!(align_of::<FlowKey>() == 8);
    assert!(align_of::<FrontendKey>() == 4);
    // The address accessors' alignment (`addr_words`).
    assert!(align_of::<Backend>() >= 4);
    assert!(align_of::<SnatEntry>() >= 4);
    assert!(align_of::<RevNat>() >= 4);
    assert!(align_of::<SnatConfig>() >= 4);
    assert!(
        (FRONTEND_F_CLIENT_AFFINITY
            | FRONTEND_F_REJECT_EMPTY
            | FRONTEND_F_SOURCE_RANGES
            | FRONTEND_F_SNAT
            | FRONTEND_F_DSR)
            < FLOW_F_FRONTEND_REMEMBERED as u32
    );
    assert!(size_of::<Flow>() == 8);
    assert!(size_of::<TrackedFlow>() == 4 + 4 + 2 + 1 + 5);
    assert!(size_of::<SnatConfig>() == 16 + 16 + 2 + 2 + 1 + 3);
    assert!(size_of::<SnatEntry>() == 16 + 16 + 2 + 2 + 1 + 1 + 2 + 4 + 4 + 8 + 32);
    assert!(size_of::<NextHop>() == 8 + 4 + 2 + 6 + 6 + 2 + 4);
    assert!(size_of::<RevNat>() == 16 + 2 + 1 + 1 + 4 + size_of::<NextHop>());
    assert!(size_of::<ClientKey>() == 16 + 2 + 1 + 1);
    assert!(size_of::<ClientFlow>() == size_of::<RevNat>() + size_of::<TrackedFlow>() + 16 + 2 + 6);
    assert!(core::mem::offset_of!(ClientFlow, backend_addr) % 4 == 0);
    assert!(size_of::<ServiceStats>() == 7 * 8);
    assert!(size_of::<BackendStats>() == 8);
    assert!(size_of::<SourceRangeKey>() == 4 + 1 + 3 + 16);
    assert!(SOURCE_RANGE_FIXED_BITS as usize == 8 * (4 + 1 + 3));
    assert!(size_of::<ReasonStats>() == 2 * 8);
};

/// Address pre-filter bits (`ADDR_FILTER_V1[addr_filter_slot(addr)]`): the program
/// looks up frontends only for destinations, and reply translations only for sources,
/// whose slot has the bit; everything else passes after two array reads.
pub const ADDR_F_FRONTEND: u8 = 1;
pub const ADDR_F_BACKEND: u8 = 2;
/// Slots in the address pre-filter.
pub const ADDR_FILTER_SLOTS: u32 = 1 << 16;

/// The pre-filter slot of an address: its four words folded to 16 bits.
#[inline(always)]
pub const fn addr_filter_slot(addr: &[u8; 16]) -> u32 {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        let b = 4 * i;
        words[i] = u32::from_ne_bytes([addr[b], addr[b + 1], addr[b + 2], addr[b + 3]]);
        i += 1;
    }
    addr_filter_slot_words(&words)
}

/// [`addr_filter_slot`] of an address given as words in memory order (as
/// [`FlowKey::src_words`] reads them): the same slot on any host.
#[inline(always)]
pub const fn addr_filter_slot_words(words: &[u32; 4]) -> u32 {
    let x = u32::from_le(words[0])
        ^ u32::from_le(words[1])
        ^ u32::from_le(words[2])
        ^ u32::from_le(words[3]);
    (x ^ (x >> 16)) & (ADDR_FILTER_SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_words_are_the_bytes_in_memory_order() {
        let src = [198, 51, 100, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [32, 1, 13, 184, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16];
        let key = FlowKey {
            src,
            dst,
            ..FlowKey::default()
        };
        let bytes = |w: [u32; 4]| w.map(u32::to_ne_bytes).concat();
        assert_eq!(bytes(key.src_words()), src);
        assert_eq!(bytes(key.dst_words()), dst);
        let mut written = FlowKey::default();
        written.set_addr_words(key.src_words(), key.dst_words());
        assert_eq!(written, key);
        assert_eq!(
            addr_filter_slot_words(&key.src_words()),
            addr_filter_slot(&src)
        );
        let backend = Backend {
            addr: dst,
            ..Backend::default()
        };
        assert_eq!(backend.addr_words(), key.dst_words());
    }
}
