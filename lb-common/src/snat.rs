//! SNAT port choice and reservation lifetimes, shared by the kernel (which allocates)
//! and the tests (which predict the port a flow gets).
//!
//! A new flow to a remote backend tries up to `SNAT_ATTEMPTS` ports of the node's range,
//! starting at its flow hash and walking on by one: the first whose reservation (the
//! `SNAT_V1` entry of backend -> node address:port) is free, or stale, is taken. A port
//! is unique per backend address and port, as Linux's NAT keeps reply tuples unique, so
//! every backend has the whole range.

use crate::{PROTO_TCP, SNAT_STATE_CLOSING};

/// Ports tried for a new flow before it is dropped as `drop_snat_exhausted`. The
/// verifier walks every attempt as its own copy of the loop body, and load time is what
/// an agent restart waits for: here 32 attempts made the object take 4.3 s to load, 8
/// about 1.9 s, 4 about 2.0 s against 1.1 s without SNAT on a busy machine (`bpftool prog
/// loadall`). With the default range (4,536 ports per backend) 4 probes from a
/// hash-chosen start all hit taken ports only when most of that backend's range is in use.
pub const SNAT_ATTEMPTS: u32 = 4;

const NS_PER_S: u64 = 1_000_000_000;
/// An open TCP flow's reservation survives this long without a packet: kube-proxy's
/// `conntrack.tcpEstablishedTimeout` (24 h).
pub const SNAT_TCP_IDLE_NS: u64 = 86_400 * NS_PER_S;
/// After a FIN or RST: the kernel's `nf_conntrack_tcp_timeout_time_wait` (120 s), so a
/// backend's TIME_WAIT socket is gone before the port is given to another client.
pub const SNAT_TCP_CLOSING_NS: u64 = 120 * NS_PER_S;
/// UDP: the kernel's `nf_conntrack_udp_timeout_stream` (120 s).
pub const SNAT_UDP_IDLE_NS: u64 = 120 * NS_PER_S;

/// The port (host byte order) of attempt `attempt` for a flow of hash `hash`, in
/// `min..=max`.
#[inline(always)]
pub const fn snat_port(hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let size = (max as u32).saturating_sub(min as u32) + 1;
    let offset = hash.wrapping_add(attempt) % size;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "offset < size <= 65536 - min"
    )]
    let port = min + offset as u16;
    port
}

/// How long a reservation of protocol `proto` in `state` may sit idle before its port
/// may be given to another flow.
#[inline(always)]
pub const fn snat_idle_ns(proto: u8, state: u8) -> u64 {
    if proto != PROTO_TCP {
        SNAT_UDP_IDLE_NS
    } else if state & SNAT_STATE_CLOSING != 0 {
        SNAT_TCP_CLOSING_NS
    } else {
        SNAT_TCP_IDLE_NS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_stay_in_range_and_walk_on() {
        assert_eq!(snat_port(0, 0, 61_000, 65_535), 61_000);
        assert_eq!(snat_port(4_535, 0, 61_000, 65_535), 65_535);
        assert_eq!(snat_port(4_535, 1, 61_000, 65_535), 61_000, "wraps");
        assert_eq!(
            snat_port(u32::MAX, 3, 1, 65_535),
            1 + (u32::MAX.wrapping_add(3) % 65_535) as u16
        );
        for attempt in 0..SNAT_ATTEMPTS {
            let p = snat_port(7, attempt, 40_000, 40_001);
            assert!((40_000..=40_001).contains(&p));
        }
        assert_eq!(snat_port(9, 0, 0, 65_535), 9, "the whole port space");
        assert_eq!(snat_port(12, 5, 100, 100), 100, "one port");
    }

    #[test]
    fn closing_tcp_frees_sooner() {
        assert!(snat_idle_ns(PROTO_TCP, SNAT_STATE_CLOSING) < snat_idle_ns(PROTO_TCP, 0));
        assert_eq!(snat_idle_ns(crate::PROTO_UDP, 0), SNAT_UDP_IDLE_NS);
    }
}
