//! Frontend lookup: (destination address, port, protocol) -> service.

use lb_common::{Frontend, FrontendKey};

use crate::{maps::FRONTENDS_V1, packet::Packet};

#[inline(always)]
pub fn lookup_frontend(pkt: &Packet) -> Option<Frontend> {
    let key = FrontendKey {
        addr: pkt.key.dst,
        port: pkt.key.dport,
        proto: pkt.key.proto,
        family: pkt.key.family,
    };
    // SAFETY: the value is copied out before anything else can touch the map entry.
    unsafe { FRONTENDS_V1.get(&key).copied() }
}
