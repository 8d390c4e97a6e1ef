//! Backend selection from the service's Maglev table: `table[hash % M]`.
//! The table itself is computed by the agent (lb-agent/src/maglev.rs).

use lb_common::{
    Backend, FRONTEND_F_CLIENT_AFFINITY, Frontend, Reason,
    hash::{client_hash, flow_hash},
    maps::MAGLEV_SIZE_SLOT,
};

use crate::{maps::MAGLEV_V1, packet::Packet, service};

/// The backend the table assigns to this packet's flow, with its id (never 0).
#[inline(always)]
pub fn select_backend(pkt: &Packet, frontend: &Frontend) -> Result<(u32, Backend), Reason> {
    let id = select_backend_id(pkt, frontend)?;
    let backend = service::backend(id, frontend.service_id).ok_or(Reason::DropNoBackend)?;
    Ok((id, backend))
}

#[inline(always)]
fn select_backend_id(pkt: &Packet, frontend: &Frontend) -> Result<u32, Reason> {
    let table = MAGLEV_V1
        .get(frontend.service_id)
        .ok_or(Reason::DropNoBackend)?;
    let size = *table.get(MAGLEV_SIZE_SLOT).ok_or(Reason::DropNoBackend)?;
    if size == 0 {
        return Err(Reason::DropNoBackend);
    }
    let hash = if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0 {
        client_hash(&pkt.key.src)
    } else {
        flow_hash(&pkt.key)
    };
    let id = *table.get(1 + hash % size).ok_or(Reason::DropNoBackend)?;
    if id == 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok(id)
}
