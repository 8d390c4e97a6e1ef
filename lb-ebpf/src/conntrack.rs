//! Connection tracking: an established flow keeps its backend while that backend
//! exists (even when the Maglev table changes); a new flow, or one whose backend is
//! gone, gets one from the table (or from the client's session affinity) and is
//! remembered with its reply translation.

use lb_common::{
    BACKEND_F_LOCAL, Backend, FLOW_F_FRONTEND_REMEMBERED, FRONTEND_F_CLIENT_AFFINITY,
    FRONTEND_F_DSR, FRONTEND_F_SNAT, FRONTEND_F_SOURCE_RANGES, FlowKey, Frontend, NextHop, Reason,
    RevNat, TrackedFlow,
};

use crate::{
    affinity, maglev,
    maps::{CONNTRACK_V2, REVNAT_SCRATCH_V1, REVNAT_V1},
    packet::Packet,
    service::backend,
    snat, source_range,
};

/// The backend chosen for a packet.
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    /// The flow got its backend just now (new or re-selected), from the table or the
    /// client's session affinity.
    pub new_flow: bool,
    /// SNAT: the port (network order) the flow leaves with, from the node's address.
    pub snat: Option<u16>,
}

/// A tracked flow of the packet's 5-tuple whose backend still serves the flow's service.
pub struct Kept {
    flow: TrackedFlow,
    backend: Backend,
}

impl Kept {
    /// The frontend the flow was tracked for, as its entry remembers it: its service and
    /// flags, all an established flow needs of it. `None` for an entry an older build
    /// wrote.
    #[inline(always)]
    pub fn frontend(&self) -> Option<Frontend> {
        let flags = self.flow.frontend_flags;
        (flags & FLOW_F_FRONTEND_REMEMBERED != 0).then_some(Frontend {
            service_id: self.flow.service_id,
            flags: u32::from(flags & !FLOW_F_FRONTEND_REMEMBERED),
            // Read only when a new flow gets a backend.
            affinity_timeout_s: 0,
            _pad: 0,
        })
    }
}

/// The packet's tracked flow, while its backend exists and still serves its service.
#[inline(always)]
pub fn kept(pkt: &Packet) -> Option<Kept> {
    // SAFETY: copied out at once.
    let flow = unsafe { CONNTRACK_V2.get(&pkt.key).copied() }?;
    let backend = backend(flow.backend_id, flow.service_id)?;
    Some(Kept { flow, backend })
}

/// The backend for this packet: the tracked one (`kept`) while it serves `frontend`'s
/// service, else (a client the service's source ranges admit) the client's
/// session-affinity one (frontends with `FRONTEND_F_CLIENT_AFFINITY`) or the table's. A
/// new flow of a SNAT frontend to a backend on another node gets a SNAT port; a tracked
/// flow keeps its translation, and its port while the reservation is still its own.
#[inline(always)]
pub fn backend_for(
    pkt: &Packet,
    frontend: &Frontend,
    kept: Option<Kept>,
    tcp_flags: u8,
) -> Result<Chosen, Reason> {
    let kept = kept.filter(|k| k.flow.service_id == frontend.service_id);
    let (flow, b, new_flow) = if let Some(Kept { flow, backend }) = kept {
        (flow, backend, false)
    } else {
        if frontend.flags & FRONTEND_F_SOURCE_RANGES != 0 {
            source_range::check(pkt, frontend.service_id)?;
        }
        let (id, b) = if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0 {
            affinity::select_backend(pkt, frontend)?
        } else {
            maglev::select_backend(pkt, frontend)?
        };
        if b.family != pkt.key.family {
            return Err(Reason::DropFamilyMismatch);
        }
        let snat = frontend.flags & FRONTEND_F_SNAT != 0 && b.flags & BACKEND_F_LOCAL == 0;
        let flow = TrackedFlow {
            backend_id: id,
            service_id: frontend.service_id,
            // Non-zero asks for SNAT; the port is allocated below.
            nat_port: u16::from(snat),
            frontend_flags: frontend.flags as u8 | FLOW_F_FRONTEND_REMEMBERED,
            _pad: [0; 5],
        };
        (flow, b, true)
    };
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
        if new_flow || port != flow.nat_port {
            let moved = TrackedFlow {
                nat_port: port,
                ..flow
            };
            // A failed insert (LRU full of locked entries, which does not happen in
            // practice) only means the next packet selects again, to the same backend
            // (and SNAT port, which the reservation still names).
            let _ = CONNTRACK_V2.insert(&pkt.key, &moved, 0);
        }
    } else if new_flow {
        // DSR to another node: the reply leaves that node, which remembers it.
        if frontend.flags & FRONTEND_F_DSR == 0 || b.flags & BACKEND_F_LOCAL != 0 {
            record_reply_to(pkt, pkt.key.reply_after_dnat(&b), frontend.service_id, 0);
        }
        let _ = CONNTRACK_V2.insert(&pkt.key, &flow, 0);
    }
    Ok(Chosen {
        id: flow.backend_id,
        backend: b,
        new_flow,
        snat,
    })
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
/// one: every packet of the flow comes this way, and the entry is written once. An
/// entry for another frontend is an earlier flow's with the same addresses and ports
/// (the client reused its port towards another frontend of the same pod): left, it
/// would give the replies the old frontend as their source, so it is replaced. `key`
/// (in the scratch slot) is the reply, backend -> client.
#[inline(always)]
pub fn record_dsr_reply(pkt: &Packet, key: &FlowKey, service_id: u32) {
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
    let _ = REVNAT_V1.insert(key, rev, 0);
}

/// The translation for a reply from a backend, if this packet is one. A pointer into
/// the LRU entry, so the next-hop cache in it can be refreshed in place.
#[inline(always)]
pub fn reply_nat(pkt: &Packet) -> Option<*mut RevNat> {
    REVNAT_V1.get_ptr_mut(&pkt.key)
}
