//! Connection tracking: an established flow keeps its backend while that backend
//! exists (even when the Maglev table changes); a new flow, or one whose backend is
//! gone, gets one from the table (or from the client's session affinity) and is
//! remembered with its reply translation.
//!
//! A flow is one `FLOWS_V1` entry keyed by its client's address and port, which both
//! directions know: one insert per new flow (a bare SYN's with `BPF_NOEXIST`, and no
//! lookup before it). A client port whose entry is another flow's (it talks to two
//! frontends at once, to different backends) gets the classic pair instead:
//! `CONNTRACK_V2` by the forward 5-tuple, `REVNAT_V1` by the reply's.

use lb_common::{
    BACKEND_F_DRAINING, BACKEND_F_LOCAL, Backend, ClientFlow, ClientKey,
    FLOW_F_FRONTEND_REMEMBERED, FLOW_REPLY_ELSEWHERE, FRONTEND_F_CLIENT_AFFINITY, FRONTEND_F_DSR,
    FRONTEND_F_SNAT, FRONTEND_F_SOURCE_RANGES, FlowKey, Frontend, NextHop, Reason, RevNat,
    TrackedFlow,
};

use crate::{
    affinity, maglev,
    maps::{CONNTRACK_V2, FLOW_PAIRS_V1, FLOW_SCRATCH_V1, FLOWS_V1, REVNAT_SCRATCH_V1, REVNAT_V1},
    packet::Packet,
    service::backend,
    snat, source_range,
};

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// The backend chosen for a packet.
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    /// The flow got its backend just now (new or re-selected), from the table or the
    /// client's session affinity.
    pub new_flow: bool,
    /// SNAT: the port (network order) the flow leaves with, from the node's address.
    pub snat: Option<u16>,
    /// The frontend flags the flow goes by: those its entry remembers (a kept flow's
    /// SYN, whose frontend was looked up, keeps its mode), else the frontend's.
    pub frontend_flags: u32,
}

/// Where a flow's state is kept.
#[derive(Clone, Copy)]
enum Home {
    /// Its client's `FLOWS_V1` entry. (No pointer to it: a map value pointer kept in
    /// one path's state and not another's keeps the verifier from merging them.)
    Client,
    /// A new `FLOWS_V1` entry, to write (or write over) for this flow.
    NewClient,
    /// A bare SYN's new `FLOWS_V1` entry, written already (`BPF_NOEXIST`).
    Written,
    /// The `CONNTRACK_V2` / `REVNAT_V1` pair.
    Pair,
}

/// A tracked flow of the packet's 5-tuple whose backend still serves the flow's service.
pub struct Kept {
    flow: TrackedFlow,
    backend: Backend,
    home: Home,
}

impl Kept {
    /// The frontend the flow was tracked for, as its entry remembers it: its service and
    /// flags, all an established flow needs of it. `None` for an entry an older build
    /// wrote.
    #[inline(always)]
    pub fn frontend(&self) -> Option<Frontend> {
        let flags = self.flow.remembered_frontend_flags()?;
        Some(Frontend {
            service_id: self.flow.service_id,
            flags,
            // Read only when a new flow gets a backend.
            affinity_timeout_s: 0,
            _pad: 0,
        })
    }
}

/// What conntrack knows of a packet towards a frontend.
pub struct Tracked {
    /// Its flow, while the flow's backend exists.
    pub kept: Option<Kept>,
    /// Its client's `FLOWS_V1` entry when that is another flow's (another frontend).
    other: Option<*mut ClientFlow>,
    /// A bare SYN: not looked up yet.
    unresolved: bool,
}

/// Whether the pair tables may hold entries: until the program writes one (or the agent
/// adopts an older build's), their lookups are skipped.
#[inline(always)]
fn pairs_in_use() -> bool {
    FLOW_PAIRS_V1.get(0).is_some_and(|v| *v != 0)
}

/// Marks the pair tables as in use, before an entry is written there.
#[inline(always)]
fn note_pair() {
    if let Some(v) = FLOW_PAIRS_V1.get_ptr_mut(0) {
        // SAFETY: the map's one slot; written once, when it still reads 0.
        unsafe {
            if *v == 0 {
                *v = 1;
            }
        }
    }
}

/// The packet's tracked flow. A bare TCP SYN (a new connection, but for a retransmitted
/// SYN or a reused port) is left unresolved: its new entry is written unless one is
/// there (`BPF_NOEXIST`), and only then is it looked up (`pick`, which looks it up
/// first for frontends with source ranges or session affinity). The new flow pays one
/// hash walk instead of two.
#[inline(always)]
pub fn tracked(pkt: &Packet, tcp_flags: u8) -> Tracked {
    if bare_syn(tcp_flags) {
        return Tracked {
            kept: None,
            other: None,
            unresolved: true,
        };
    }
    resolve(pkt, tcp_flags)
}

#[inline(always)]
fn bare_syn(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The packet's tracked flow: its client's entry when that is this flow's, else the
/// pair. A bare TCP SYN whose client has no entry is a new connection and skips the
/// pair's lookup; any other packet looks there too, while the pairs are in use (a flow
/// an older build tracked, or a pair's whose client entry the LRU took).
#[inline(always)]
fn resolve(pkt: &Packet, tcp_flags: u8) -> Tracked {
    let entry = FLOWS_V1.get_ptr_mut(&ClientKey::of_forward(&pkt.key));
    if let Some(e) = entry {
        // SAFETY: a valid map value pointer (LRU values are not freed while the program
        // runs); read at once.
        if let Some(flow) = unsafe { (*e).forward(&pkt.key) } {
            return Tracked {
                kept: kept_in(flow, Home::Client),
                other: None,
                unresolved: false,
            };
        }
    } else if bare_syn(tcp_flags) {
        return Tracked {
            kept: None,
            other: None,
            unresolved: false,
        };
    }
    let pair = if pairs_in_use() {
        // SAFETY: copied out at once.
        unsafe { CONNTRACK_V2.get(&pkt.key).copied() }
    } else {
        None
    };
    Tracked {
        kept: pair.and_then(|flow| kept_in(flow, Home::Pair)),
        other: entry,
        unresolved: false,
    }
}

#[inline(always)]
fn kept_in(flow: TrackedFlow, home: Home) -> Option<Kept> {
    let backend = backend(flow.backend_id, flow.service_id)?;
    Some(Kept {
        flow,
        backend,
        home,
    })
}

/// The forward state of the flow `key` (client -> frontend), wherever it is kept.
#[inline(always)]
pub fn forward_state(key: &FlowKey) -> Option<TrackedFlow> {
    if let Some(e) = FLOWS_V1.get_ptr(&ClientKey::of_forward(key)) {
        // SAFETY: as in `tracked`.
        if let Some(flow) = unsafe { (*e).forward(key) } {
            return Some(flow);
        }
    }
    if !pairs_in_use() {
        return None;
    }
    // SAFETY: copied out at once.
    unsafe { CONNTRACK_V2.get(key).copied() }
}

/// The backend for this packet: the tracked one while it serves `frontend`'s service,
/// else (a client the service's source ranges admit) the client's session-affinity one
/// (frontends with `FRONTEND_F_CLIENT_AFFINITY`) or the table's. A new flow of a SNAT
/// frontend to a backend on another node gets a SNAT port; a tracked flow keeps its
/// translation, and its port while the reservation is still its own.
#[inline(always)]
pub fn backend_for(
    pkt: &Packet,
    frontend: &Frontend,
    tracked: Tracked,
    tcp_flags: u8,
) -> Result<Chosen, Reason> {
    let Pick {
        mut flow,
        backend: b,
        new_flow,
        home,
        replies_here,
    } = pick(pkt, frontend, tracked, tcp_flags)?;
    let mut snat = None;
    if flow.nat_port != 0 {
        let owned =
            !new_flow && snat::owned(pkt, &b, frontend.service_id, flow.nat_port, tcp_flags);
        let port = if owned {
            flow.nat_port
        } else {
            snat::allocate(pkt, &b, frontend, tcp_flags)?
        };
        snat = Some(port);
        let moved = !new_flow && port != flow.nat_port;
        flow.nat_port = port;
        if moved {
            // A failed insert (LRU full of locked entries, which does not happen in
            // practice) only means the next packet selects again, to the same backend
            // (and SNAT port, which the reservation still names).
            match home {
                Home::Client => {
                    if let Some(e) = FLOWS_V1.get_ptr_mut(&ClientKey::of_forward(&pkt.key)) {
                        // SAFETY: a valid map value pointer; one field written in place,
                        // while the entry is still this flow's.
                        unsafe {
                            if (*e).forward(&pkt.key).is_some() {
                                (*e).tracked.nat_port = port;
                            }
                        }
                    }
                }
                _ => {
                    let _ = CONNTRACK_V2.insert(&pkt.key, &flow, 0);
                }
            }
        }
    }
    if new_flow {
        match home {
            Home::Pair => {
                if replies_here {
                    record_reply_to(pkt, pkt.key.reply_after_dnat(&b), frontend.service_id, 0);
                }
                note_pair();
                let _ = CONNTRACK_V2.insert(&pkt.key, &flow, 0);
            }
            Home::NewClient => write_client(pkt, &flow, &b, replies_here),
            Home::Client | Home::Written => {}
        }
    }
    Ok(Chosen {
        id: flow.backend_id,
        backend: b,
        new_flow,
        snat,
        frontend_flags: if new_flow {
            frontend.flags
        } else {
            flow.remembered_frontend_flags().unwrap_or(frontend.flags)
        },
    })
}

/// A flow's state, kept or new, before its SNAT port and its entry are written.
struct Pick {
    flow: TrackedFlow,
    backend: Backend,
    new_flow: bool,
    home: Home,
    /// For a new flow: its replies come back through this node, unless source-NATed
    /// (they come to the node's address: `SNAT_V1`) or sent by DSR to another node (they
    /// leave there).
    replies_here: bool,
}

/// The kept flow, or a new one from the affinity or the table.
#[inline(always)]
fn pick(
    pkt: &Packet,
    frontend: &Frontend,
    tracked: Tracked,
    tcp_flags: u8,
) -> Result<Pick, Reason> {
    // A SYN to a frontend whose choice has conditions or side effects (source ranges may
    // refuse the client; session affinity writes its entry) is looked up first, as any
    // packet: a kept flow's retransmitted SYN must meet neither.
    let tracked = if tracked.unresolved
        && frontend.flags & (FRONTEND_F_SOURCE_RANGES | FRONTEND_F_CLIENT_AFFINITY) != 0
    {
        resolve(pkt, tcp_flags)
    } else {
        tracked
    };
    if let Some(k) = kept_of(tracked.kept, frontend, tcp_flags) {
        return Ok(k);
    }
    if frontend.flags & FRONTEND_F_SOURCE_RANGES != 0 {
        source_range::check(pkt, frontend.service_id)?;
    }
    let new = select(pkt, frontend).map(|(id, b)| new_flow_state(frontend, id, b));
    let written = tracked.unresolved
        && new.as_ref().is_ok_and(|(flow, b, replies_here)| {
            flow.nat_port == 0 && write_first(pkt, flow, b, *replies_here)
        });
    let other = if !tracked.unresolved || written {
        tracked.other
    } else {
        // The client has an entry (a retransmitted SYN, a reused port, another
        // frontend's flow), the table has no backend for the flow, or it needs a SNAT
        // port first: looked up as any packet, and a kept flow stays kept.
        let tracked = resolve(pkt, tcp_flags);
        if let Some(k) = kept_of(tracked.kept, frontend, tcp_flags) {
            return Ok(k);
        }
        tracked.other
    };
    let (flow, b, replies_here) = new?;
    Ok(Pick {
        flow,
        home: if written {
            Home::Written
        } else {
            new_home(other, &b, replies_here)
        },
        backend: b,
        new_flow: true,
        replies_here,
    })
}

/// The client's session-affinity backend, or the table's.
#[inline(always)]
fn select(pkt: &Packet, frontend: &Frontend) -> Result<(u32, Backend), Reason> {
    let (id, b) = if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0 {
        affinity::select_backend(pkt, frontend)?
    } else {
        maglev::select_backend(pkt, frontend)?
    };
    if b.family != pkt.key.family {
        return Err(Reason::DropFamilyMismatch);
    }
    Ok((id, b))
}

/// A new flow's state towards backend `id`, and whether its replies come back through
/// this node ([`Pick::replies_here`]).
#[inline(always)]
fn new_flow_state(frontend: &Frontend, id: u32, b: Backend) -> (TrackedFlow, Backend, bool) {
    let snat = frontend.flags & FRONTEND_F_SNAT != 0 && b.flags & BACKEND_F_LOCAL == 0;
    let flow = TrackedFlow {
        backend_id: id,
        service_id: frontend.service_id,
        // Non-zero asks for SNAT; the port is allocated by the caller.
        nat_port: u16::from(snat),
        frontend_flags: frontend.flags as u8 | FLOW_F_FRONTEND_REMEMBERED,
        _pad: [0; 5],
    };
    let replies_here =
        !snat && (frontend.flags & FRONTEND_F_DSR == 0 || b.flags & BACKEND_F_LOCAL != 0);
    (flow, b, replies_here)
}

/// The kept flow, while it is `frontend`'s service's; but a bare SYN whose backend
/// drains (weight 0, or an endpoint no longer ready) is a new connection on a reused
/// client port, or a retry of one that never opened: it goes to the table, as Linux's
/// conntrack gives a closed entry's tuple a new NAT on a new SYN.
#[inline(always)]
fn kept_of(kept: Option<Kept>, frontend: &Frontend, tcp_flags: u8) -> Option<Pick> {
    kept.filter(|k| k.flow.service_id == frontend.service_id)
        .filter(|k| !(bare_syn(tcp_flags) && k.backend.flags & BACKEND_F_DRAINING != 0))
        .map(|k| Pick {
            flow: k.flow,
            backend: k.backend,
            new_flow: false,
            home: k.home,
            replies_here: false,
        })
}

/// Where a new flow goes: its client's entry, unless that is another flow's (a client
/// port talking to two frontends: the pair). Another flow's entry is replaced when
/// the backend sees the two as one connection: the same backend, both translated at
/// the destination only (neither source-NATed nor sent by DSR, which the backend tells
/// apart by their source port or their destination). Its replies belong to the newer
/// flow, as a `REVNAT_V1` entry written over would give them.
#[inline(always)]
fn new_home(other: Option<*mut ClientFlow>, b: &Backend, replies_here: bool) -> Home {
    match other {
        // SAFETY: a valid map value pointer, read at once.
        Some(e) if unsafe { !(replies_here && same_connection(&*e, b)) } => Home::Pair,
        _ => Home::NewClient,
    }
}

/// The entry's flow reaches `b` translated at the destination only, as the client's
/// address and port.
#[inline(always)]
fn same_connection(e: &ClientFlow, b: &Backend) -> bool {
    e.reply.family != FLOW_REPLY_ELSEWHERE
        && e.backend_port == b.port
        && e.backend_addr_words() == b.addr_words()
}

/// Writes the flow's `FLOWS_V1` entry.
#[inline(always)]
fn write_client(pkt: &Packet, flow: &TrackedFlow, b: &Backend, replies_here: bool) {
    let _ = insert_client(pkt, flow, b, replies_here, BPF_ANY);
}

/// Writes a bare SYN's `FLOWS_V1` entry unless its client has one; false if it has.
/// (The kernel takes a free LRU node before it looks for the key: with the table full,
/// that evicts the least recently used entries, as any insert does. If the client's own
/// entry is among them, a retransmitted SYN gets a new one, to the same backend while
/// the table is unchanged.)
#[inline(always)]
fn write_first(pkt: &Packet, flow: &TrackedFlow, b: &Backend, replies_here: bool) -> bool {
    insert_client(pkt, flow, b, replies_here, BPF_NOEXIST)
}

#[inline(always)]
fn insert_client(
    pkt: &Packet,
    flow: &TrackedFlow,
    b: &Backend,
    replies_here: bool,
    map_flags: u64,
) -> bool {
    let family = if replies_here {
        pkt.key.family
    } else {
        FLOW_REPLY_ELSEWHERE
    };
    scratch_flow(pkt, family, 0, *flow, &b.addr, b.port).is_some_and(|e| {
        FLOWS_V1
            .insert(&ClientKey::of_forward(&pkt.key), e, map_flags)
            .is_ok()
    })
}

/// A `FLOWS_V1` value for the packet's frontend (its destination), built in this CPU's
/// scratch slot: the stack has no room for it beside the rest.
#[inline(always)]
fn scratch_flow(
    pkt: &Packet,
    reply_family: u8,
    reply_flags: u8,
    tracked: TrackedFlow,
    backend_addr: &[u8; 16],
    backend_port: u16,
) -> Option<&'static ClientFlow> {
    let e = FLOW_SCRATCH_V1.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by this program run alone.
    unsafe {
        (*e).reply = RevNat {
            addr: pkt.key.dst,
            port: pkt.key.dport,
            family: reply_family,
            flags: reply_flags,
            service_id: tracked.service_id,
            next_hop: NextHop::default(),
        };
        (*e).tracked = tracked;
        (*e).backend_addr = *backend_addr;
        (*e).backend_port = backend_port;
        (*e)._pad = [0; 6];
        Some(&*e)
    }
}

/// The reply translation of a flow that is not source-NATed: `reply` (backend ->
/// client) becomes frontend -> client. Written before the first packet is forwarded: a
/// reply can only follow one.
#[inline(always)]
fn record_reply_to(pkt: &Packet, reply: FlowKey, service_id: u32, flags: u8) {
    let Some(key) = snat::scratch_key(reply) else {
        return;
    };
    write_reply(pkt, key, service_id, flags);
}

/// A DSR-delivered flow's reply translation (flag `REVNAT_F_DSR`), unless it has this
/// one: every packet of the flow comes this way, and the entry is written once. `key`
/// (in the scratch slot) is the reply, backend -> client. It goes in the client's
/// `FLOWS_V1` entry (without forward state) when that is free or names the same
/// backend: an entry for another frontend there is an earlier flow's with the same
/// addresses and ports (the client reused its port towards another frontend of the
/// same pod); left, it would give the replies the old frontend as their source. A
/// client entry of another flow (another backend) leaves the translation to `REVNAT_V1`.
#[inline(always)]
pub fn record_dsr_reply(pkt: &Packet, key: &FlowKey, service_id: u32) {
    let client = ClientKey::of_reply(key);
    if let Some(e) = FLOWS_V1.get_ptr(&client) {
        // SAFETY: a valid map value pointer, read at once.
        let e = unsafe { &*e };
        if !e.is_reply(key) {
            record_dsr_pair(pkt, key, service_id);
            return;
        }
        if e.reply.flags == lb_common::REVNAT_F_DSR
            && e.reply.port == pkt.key.dport
            && e.reply.addr_words() == pkt.key.dst_words()
        {
            return;
        }
    }
    let tracked = TrackedFlow {
        service_id,
        ..TrackedFlow::default()
    };
    let family = pkt.key.family;
    if let Some(e) = scratch_flow(
        pkt,
        family,
        lb_common::REVNAT_F_DSR,
        tracked,
        &key.src,
        key.sport,
    ) {
        let _ = FLOWS_V1.insert(&client, e, 0);
    }
}

/// `record_dsr_reply` for a client whose entry is another flow's.
#[inline(always)]
fn record_dsr_pair(pkt: &Packet, key: &FlowKey, service_id: u32) {
    if let Some(rev) = REVNAT_V1.get_ptr(key) {
        // SAFETY: a valid map value pointer, read at once.
        let rev = unsafe { &*rev };
        if rev.addr == pkt.key.dst
            && rev.port == pkt.key.dport
            && rev.flags == lb_common::REVNAT_F_DSR
        {
            return;
        }
    }
    write_reply(pkt, key, service_id, lb_common::REVNAT_F_DSR);
}

#[inline(always)]
fn write_reply(pkt: &Packet, key: &FlowKey, service_id: u32, flags: u8) {
    let Some(rev) = REVNAT_SCRATCH_V1.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot, used by this program run alone.
    let rev = unsafe {
        (*rev).addr = pkt.key.dst;
        (*rev).port = pkt.key.dport;
        (*rev).family = pkt.key.family;
        (*rev).flags = flags;
        (*rev).service_id = service_id;
        (*rev).next_hop = NextHop::default();
        &*rev
    };
    note_pair();
    let _ = REVNAT_V1.insert(key, rev, 0);
}

/// The translation for a reply from a backend, if this packet is one. A pointer into
/// the LRU entry, so the next-hop cache in it can be refreshed in place.
#[inline(always)]
pub fn reply_nat(pkt: &Packet) -> Option<*mut RevNat> {
    reply_entry(&pkt.key)
}

/// The translation for the reply `key` (backend -> client): its client's entry when it
/// names this backend, else the pair's (while the pairs are in use).
#[inline(always)]
pub fn reply_entry(key: &FlowKey) -> Option<*mut RevNat> {
    if let Some(e) = FLOWS_V1.get_ptr_mut(&ClientKey::of_reply(key)) {
        // SAFETY: a valid map value pointer; the translation stays in place.
        unsafe {
            if (*e).is_reply(key) {
                return Some(&raw mut (*e).reply);
            }
        }
    }
    if !pairs_in_use() {
        return None;
    }
    REVNAT_V1.get_ptr_mut(key)
}
