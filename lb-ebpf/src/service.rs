//! Frontend lookup: (destination address, port, protocol) -> service; and whether a
//! backend id (still) holds a backend of a service.

use lb_common::{
    ADDR_F_BACKEND, ADDR_F_FRONTEND, Backend, Frontend, FrontendKey, addr_filter_slot,
    addr_filter_slot_words,
};

use crate::{
    maps::{ADDR_FILTER_V1, BACKENDS_V1, FRONTENDS_V1},
    packet::Packet,
};

/// Whether `addr` may be one of ours (`ADDR_F_*`); false positives only cost a lookup.
#[inline(always)]
pub fn may_be(addr: &[u8; 16], flag: u8) -> bool {
    ADDR_FILTER_V1
        .get(addr_filter_slot(addr))
        .is_some_and(|bits| bits & flag != 0)
}

/// [`may_be`] of an address as words (`FlowKey::src_words`).
#[inline(always)]
fn words_may_be(words: &[u32; 4], flag: u8) -> bool {
    ADDR_FILTER_V1
        .get(addr_filter_slot_words(words))
        .is_some_and(|bits| bits & flag != 0)
}

/// What the pre-filter says of a packet that may be ours.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ours {
    /// Its destination may be a frontend (a packet to translate). Its source is not
    /// looked at yet: that read is left for the rare packet to a frontend's address that
    /// no frontend takes ([`from_backend`]).
    ToFrontend,
    /// Not to a frontend, but its source may be a backend (a reply to translate).
    FromBackend,
}

/// The pre-filter's word on a packet: `None` when it is neither to a frontend nor from
/// a backend, and so passes.
#[inline(always)]
pub fn ours(pkt: &Packet) -> Option<Ours> {
    if to_frontend(pkt) {
        Some(Ours::ToFrontend)
    } else {
        from_backend(pkt).then_some(Ours::FromBackend)
    }
}

/// Whether the packet's source may be a backend (a reply to translate).
#[inline(always)]
pub fn from_backend(pkt: &Packet) -> bool {
    words_may_be(&pkt.key.src_words(), ADDR_F_BACKEND)
}

/// Whether the packet's destination may be a frontend (a packet to translate).
#[inline(always)]
pub fn to_frontend(pkt: &Packet) -> bool {
    words_may_be(&pkt.key.dst_words(), ADDR_F_FRONTEND)
}

/// The frontend the packet is addressed to, after the pre-filter.
#[inline(always)]
pub fn lookup_frontend(pkt: &Packet) -> Option<Frontend> {
    if !to_frontend(pkt) {
        return None;
    }
    frontend(pkt)
}

/// The frontend the packet is addressed to; callers have passed [`to_frontend`].
#[inline(always)]
pub fn frontend(pkt: &Packet) -> Option<Frontend> {
    let key = FrontendKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.key.family,
    };
    // SAFETY: the value is copied out before anything else can touch the map entry.
    unsafe { FRONTENDS_V1.get(&key).copied() }
}

/// Backend `id`, if its slot holds a backend of `service_id`. Every remembered id
/// (conntrack, session affinity) goes through this: an id deleted, or recycled for
/// another service, never carries a flow of this one.
#[inline(always)]
pub fn backend(id: u32, service_id: u32) -> Option<Backend> {
    let backend = *BACKENDS_V1.get(id)?;
    (backend.family != 0 && backend.service_id == service_id).then_some(backend)
}
