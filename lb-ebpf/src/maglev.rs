//! Backend selection from the service's Maglev table: `table[hash % M]` in the live
//! copy (see `lb_common::maps::MAGLEV_HEADER_SLOT`).
//! The table itself is computed by the agent (lb-agent/src/maglev.rs).

use lb_common::{
    Backend, FRONTEND_F_CLIENT_AFFINITY, Frontend, Reason,
    hash::{client_hash, flow_hash},
    maps::{MAGLEV_HEADER_SLOT, maglev_slot},
};

use crate::{maps::MAGLEV_V2, packet::Packet, service};

/// The backend the table assigns to this packet's flow, with its id (never 0).
#[inline(always)]
pub fn select_backend(pkt: &Packet, frontend: &Frontend) -> Result<(u32, Backend), Reason> {
    let id = select_backend_id(pkt, frontend)?;
    let backend = service::backend(id, frontend.service_id).ok_or(Reason::DropNoBackend)?;
    Ok((id, backend))
}

#[inline(always)]
fn select_backend_id(pkt: &Packet, frontend: &Frontend) -> Result<u32, Reason> {
    let hash = if frontend.flags & FRONTEND_F_CLIENT_AFFINITY != 0 {
        client_hash(&pkt.key.src)
    } else {
        flow_hash(&pkt.key)
    };
    backend_id_at(frontend.service_id, hash)
}

/// The backend the service's table holds at `hash` (the socket hooks hash what a
/// socket has instead of a packet's 5-tuple).
#[inline(always)]
pub fn backend_at(service_id: u32, hash: u32) -> Result<(u32, Backend), Reason> {
    let id = backend_id_at(service_id, hash)?;
    let backend = service::backend(id, service_id).ok_or(Reason::DropNoBackend)?;
    Ok((id, backend))
}

#[inline(always)]
fn backend_id_at(service_id: u32, hash: u32) -> Result<u32, Reason> {
    let table = MAGLEV_V2.get(service_id).ok_or(Reason::DropNoBackend)?;
    // Read once: the agent may flip the live copy at any moment.
    let header = table
        .get(MAGLEV_HEADER_SLOT)
        .ok_or(Reason::DropNoBackend)?
        .ids[0];
    let (slot, second) = maglev_slot(header, hash).ok_or(Reason::DropNoBackend)?;
    let ids = table.get(slot).ok_or(Reason::DropNoBackend)?.ids;
    let id = if second { ids[1] } else { ids[0] };
    if id == 0 {
        return Err(Reason::DropNoBackend);
    }
    Ok(id)
}
