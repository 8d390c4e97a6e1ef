//! Connection tracking: an established flow keeps its backend while that backend
//! exists (even when the Maglev table changes); a new flow, or one whose backend is
//! gone, gets one from the table and is remembered with its reply translation.

use lb_common::{Backend, Flow, Frontend, Reason, RevNat};

use crate::{
    maglev,
    maps::{BACKENDS_V1, CONNTRACK_V1, REVNAT_V1},
    packet::Packet,
};

#[inline(always)]
fn backend(id: u32, service_id: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    let backend = unsafe { BACKENDS_V1.get(&id).copied() }?;
    (backend.service_id == service_id).then_some(backend)
}

/// The backend for this packet and whether its flow was (re)selected now.
#[inline(always)]
pub fn backend_for(pkt: &Packet, frontend: &Frontend) -> Result<(Backend, bool), Reason> {
    // SAFETY: copied out at once.
    let tracked = unsafe { CONNTRACK_V1.get(&pkt.key).copied() };
    if let Some(flow) = tracked {
        if flow.service_id == frontend.service_id {
            if let Some(b) = backend(flow.backend_id, flow.service_id) {
                return Ok((b, false));
            }
        }
    }
    let id = maglev::select_backend_id(pkt, frontend)?;
    let b = backend(id, frontend.service_id).ok_or(Reason::DropNoBackend)?;
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
    };
    // The reply entry first: a reply can only follow a forwarded packet. A failed
    // insert (LRU full of locked entries, which does not happen in practice) only
    // means the next packet selects again, to the same backend.
    let _ = REVNAT_V1.insert(&pkt.key.reply_after_dnat(&b), &rev, 0);
    let _ = CONNTRACK_V1.insert(&pkt.key, &flow, 0);
    Ok((b, true))
}

/// The translation for a reply from a backend, if this packet is one.
#[inline(always)]
pub fn reply_nat(pkt: &Packet) -> Option<RevNat> {
    // SAFETY: copied out at once.
    unsafe { REVNAT_V1.get(&pkt.key).copied() }
}
