//! Connection tracking: an established flow keeps its backend while that backend
//! exists (even when the Maglev table changes); a new flow, or one whose backend is
//! gone, gets one from the table (or from the client's session affinity) and is
//! remembered with its reply translation.

use lb_common::{
    Backend, FRONTEND_F_CLIENT_AFFINITY, FRONTEND_F_SOURCE_RANGES, Flow, Frontend, NextHop, Reason,
    RevNat,
};

use crate::{
    affinity, maglev,
    maps::{CONNTRACK_V1, REVNAT_V1},
    packet::Packet,
    service::backend,
    source_range,
};

/// The backend chosen for a packet.
pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    /// The flow got its backend just now (new or re-selected), from the table or the
    /// client's session affinity.
    pub new_flow: bool,
}

/// The backend for this packet: the tracked one while it exists, else (a client the
/// service's source ranges admit) the client's session-affinity one (frontends with
/// `FRONTEND_F_CLIENT_AFFINITY`) or the table's.
#[inline(always)]
pub fn backend_for(pkt: &Packet, frontend: &Frontend) -> Result<Chosen, Reason> {
    // SAFETY: copied out at once.
    let tracked = unsafe { CONNTRACK_V1.get(&pkt.key).copied() };
    if let Some(flow) = tracked
        && flow.service_id == frontend.service_id
        && let Some(b) = backend(flow.backend_id, flow.service_id)
    {
        return Ok(Chosen {
            id: flow.backend_id,
            backend: b,
            new_flow: false,
        });
    }
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
    let flow = Flow {
        backend_id: id,
        service_id: frontend.service_id,
    };
    let rev = RevNat {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        family: pkt.key.family,
        _pad: 0,
        service_id: frontend.service_id,
        next_hop: NextHop::default(),
    };
    // The reply entry first: a reply can only follow a forwarded packet. A failed
    // insert (LRU full of locked entries, which does not happen in practice) only
    // means the next packet selects again, to the same backend.
    let _ = REVNAT_V1.insert(&pkt.key.reply_after_dnat(&b), &rev, 0);
    let _ = CONNTRACK_V1.insert(&pkt.key, &flow, 0);
    Ok(Chosen {
        id,
        backend: b,
        new_flow: true,
    })
}

/// The translation for a reply from a backend, if this packet is one. A pointer into
/// the LRU entry, so the next-hop cache in it can be refreshed in place.
#[inline(always)]
pub fn reply_nat(pkt: &Packet) -> Option<*mut RevNat> {
    REVNAT_V1.get_ptr_mut(&pkt.key)
}
