//! SNAT (the default mode for traffic that is not `externalTrafficPolicy: Local`): a
//! new flow to a backend on another node leaves with this node's address and a port
//! from its range, so the backend answers this node, whose XDP program translates the
//! reply back (frontend as the source, client as the destination).
//!
//! The `SNAT_V1` entry keyed by the reply (backend -> node:port) is both the port's
//! reservation and the reply translation; the conntrack entry of the forward direction
//! names the port. Both are LRU entries refreshed by their own direction's packets. The
//! forward path checks on every packet that the reservation is still its own, so a flow
//! whose reservation was evicted, or given away after going stale, takes a new port
//! instead of sending as another client; a reservation whose flow is gone is given away
//! once it is stale (`lb_common::snat::snat_idle_ns`: sooner when the connection closed
//! without leaving the backend in `TIME_WAIT`), or evicted by the LRU.

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    Backend, FAMILY_V4, FlowKey, Frontend, NextHop, Reason, SNAT_CFG_F_V4, SNAT_CFG_F_V6,
    SnatConfig, SnatEntry,
    hash::flow_hash,
    snat::{SNAT_ATTEMPTS, snat_idle_ns, snat_port, snat_reusable_when_full, snat_state_after},
};

use crate::{
    maps::{KEY_SCRATCH_V1, SNAT_CONFIG_V1, SNAT_SCRATCH_V1, SNAT_V1},
    packet::Packet,
};

const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// The node's SNAT address of `family`, in place in the settings map; `None` on a node
/// the agent gave none.
#[inline(always)]
pub fn node_addr(family: u8) -> Option<&'static [u8; 16]> {
    let cfg: &'static SnatConfig = SNAT_CONFIG_V1.get(0)?;
    if family == FAMILY_V4 {
        (cfg.flags & SNAT_CFG_F_V4 != 0).then_some(&cfg.addr_v4)
    } else {
        (cfg.flags & SNAT_CFG_F_V6 != 0).then_some(&cfg.addr_v6)
    }
}

/// [`node_addr`] as words in memory order (`FlowKey::src_words`).
#[inline(always)]
pub fn node_addr_words(family: u8) -> Option<[u32; 4]> {
    let cfg: &'static SnatConfig = SNAT_CONFIG_V1.get(0)?;
    if family == FAMILY_V4 {
        (cfg.flags & SNAT_CFG_F_V4 != 0).then(|| cfg.addr_v4_words())
    } else {
        (cfg.flags & SNAT_CFG_F_V6 != 0).then(|| cfg.addr_v6_words())
    }
}

/// The reply's key: backend -> node:port.
#[inline(always)]
fn reply_key(pkt: &Packet, backend: &Backend, node: &[u8; 16], port: u16) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: *node,
        sport: backend.port,
        dport: port,
        proto: pkt.key.proto,
        family: pkt.key.family,
        _pad: [0; 2],
    }
}

/// `key` in this CPU's scratch slot: keys built on the stack do not fit beside the rest.
#[inline(always)]
pub fn scratch_key(key: FlowKey) -> Option<&'static mut FlowKey> {
    let slot = KEY_SCRATCH_V1.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by one program run at a time, and by one caller
    // at a time within it.
    unsafe {
        *slot = key;
        Some(&mut *slot)
    }
}

/// Whether the reservation belongs to this packet's client flow.
#[inline(always)]
fn owned_by(entry: &SnatEntry, pkt: &Packet, service_id: u32) -> bool {
    entry.client == pkt.key.src
        && entry.client_port == pkt.key.sport
        && entry.frontend_port == pkt.key.dport
        && entry.service_id == service_id
}

/// A port (network order) for a new flow of `pkt` (not yet translated) to `backend`:
/// the first free or stale one of the attempts; when there is none, the one idle
/// longest of those whose connection is over but for the backend's `TIME_WAIT`
/// (`snat_reusable_when_full`), the likeliest to have left it.
#[inline(always)]
pub fn allocate(
    pkt: &Packet,
    backend: &Backend,
    frontend: &Frontend,
    tcp_flags: u8,
) -> Result<u16, Reason> {
    let cfg: &SnatConfig = SNAT_CONFIG_V1.get(0).ok_or(Reason::DropNoSnatAddress)?;
    let node = node_addr(pkt.key.family).ok_or(Reason::DropNoSnatAddress)?;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // Built in the per-CPU scratch slot: the program's 512-byte stack has no room left.
    let entry = SNAT_SCRATCH_V1
        .get_ptr_mut(0)
        .ok_or(Reason::DropNoSnatAddress)?;
    // SAFETY: this CPU's slot, used by this program run alone.
    unsafe {
        (*entry).client = pkt.key.src;
        (*entry).frontend = pkt.key.dst;
        (*entry).client_port = pkt.key.sport;
        (*entry).frontend_port = pkt.key.dport;
        (*entry).family = pkt.key.family;
        (*entry).state = snat_state_after(0, tcp_flags, true);
        (*entry).service_id = frontend.service_id;
        (*entry).last_seen_ns = now;
        (*entry).next_hop = NextHop::default();
    }
    // SAFETY: as above; a reference into the map value for the map update helper.
    let entry = unsafe { &*entry };
    let key = scratch_key(reply_key(pkt, backend, node, 0)).ok_or(Reason::DropNoSnatAddress)?;
    let hash = flow_hash(&pkt.key);
    // Port 0 is never in the range (`--snat-ports` starts at 1).
    let mut closed = 0u16;
    let mut closed_idle = 0u64;
    for attempt in 0..SNAT_ATTEMPTS {
        let port = snat_port(hash, attempt, cfg.port_min, cfg.port_max).to_be();
        key.dport = port;
        if SNAT_V1.insert(&*key, entry, BPF_NOEXIST).is_ok() {
            return Ok(port);
        }
        let (free, reusable, idle) = match SNAT_V1.get_ptr(&*key) {
            // Evicted between the two calls.
            None => (true, false, 0),
            // SAFETY: a valid map value pointer, read in place.
            Some(old) => unsafe {
                let idle = now.saturating_sub((*old).last_seen_ns);
                (
                    owned_by(&*old, pkt, frontend.service_id)
                        || idle > snat_idle_ns(pkt.key.proto, (*old).state),
                    snat_reusable_when_full(pkt.key.proto, (*old).state, idle),
                    idle,
                )
            },
        };
        if free && SNAT_V1.insert(&*key, entry, BPF_ANY).is_ok() {
            return Ok(port);
        }
        if reusable && idle > closed_idle {
            closed = port;
            closed_idle = idle;
        }
    }
    if closed != 0 {
        key.dport = closed;
        if SNAT_V1.insert(&*key, entry, BPF_ANY).is_ok() {
            return Ok(closed);
        }
    }
    Err(Reason::DropSnatExhausted)
}

/// The reservation's state after this packet, stored only when it changes: the two
/// directions of a flow often run on two CPUs, and a plain ACK's store of the state it
/// read could undo the other CPU's FIN or RST.
///
/// # Safety
/// `entry` is a valid map value pointer.
#[inline(always)]
unsafe fn refresh_state(entry: *mut SnatEntry, tcp_flags: u8, from_client: bool) {
    // SAFETY: as the caller promises.
    unsafe {
        let state = snat_state_after((*entry).state, tcp_flags, from_client);
        if state != (*entry).state {
            (*entry).state = state;
        }
    }
}

/// Whether the reservation of `port` (network order) for this packet's flow to
/// `backend` is still the flow's own (refreshed here); not when it was evicted or given
/// away, and the flow needs a new port.
#[inline(always)]
pub fn owned(pkt: &Packet, backend: &Backend, service_id: u32, port: u16, tcp_flags: u8) -> bool {
    let Some(node) = node_addr(pkt.key.family) else {
        return false;
    };
    let Some(key) = scratch_key(reply_key(pkt, backend, node, port)) else {
        return false;
    };
    let Some(entry) = SNAT_V1.get_ptr_mut(&*key) else {
        return false;
    };
    // SAFETY: a valid map value pointer; read, then refreshed in place (racing CPUs
    // store about the same values).
    unsafe {
        if !owned_by(&*entry, pkt, service_id) {
            return false;
        }
        (*entry).last_seen_ns = bpf_ktime_get_coarse_ns();
        refresh_state(entry, tcp_flags, true);
    }
    true
}

/// The SNAT entry of a reply (backend -> node:port), refreshed, if this packet is one.
#[inline(always)]
pub fn reply(pkt: &Packet, tcp_flags: u8) -> Option<*mut SnatEntry> {
    if node_addr_words(pkt.key.family)? != pkt.key.dst_words() {
        return None;
    }
    let entry = SNAT_V1.get_ptr_mut(&pkt.key)?;
    // SAFETY: a valid map value pointer; refreshed in place.
    unsafe {
        (*entry).last_seen_ns = bpf_ktime_get_coarse_ns();
        refresh_state(entry, tcp_flags, false);
    }
    Some(entry)
}
