//! SNAT port choice and reservation lifetimes, shared by the kernel (which allocates)
//! and the tests (which predict the port a flow gets).
//!
//! A new flow to a remote backend tries up to `SNAT_ATTEMPTS` ports of the node's range,
//! starting at its flow hash and stepping an eighth of the range at a time (by one in a
//! range no larger than the attempts, so that every port is tried): the first whose
//! reservation (the `SNAT_V1` entry of backend -> node address:port) is free, or stale,
//! is taken. Attempts spread over the range do not fall into one run of held ports the
//! way consecutive ones do, so a flow is refused only when most of the range is held. A port
//! is unique per backend address and port, as Linux's NAT keeps reply tuples unique, so
//! every backend has the whole range.

use crate::{PROTO_TCP, SNAT_STATE_CLOSING};

/// Ports tried for a new flow before it is dropped as `drop_snat_exhausted`. The
/// verifier walks every attempt as its own copy of the loop body, and load time is what
/// an agent restart waits for: here 32 attempts made the object take 4.3 s to load, 8
/// about 1.9 s, 4 about 2.0 s against 1.1 s without SNAT on a busy machine (`bpftool prog
/// loadall`). Four consecutive ports from the flow hash refused about one new flow in
/// a thousand with under a tenth of a backend's range held (`xlb-bench e2e --topology
/// cluster`, 800 new connections/s): runs of held ports grow where linear probes land.
pub const SNAT_ATTEMPTS: u32 = 8;

const NS_PER_S: u64 = 1_000_000_000;
/// An open TCP flow's reservation survives this long without a packet: kube-proxy's
/// `conntrack.tcpEstablishedTimeout` (24 h).
pub const SNAT_TCP_IDLE_NS: u64 = 86_400 * NS_PER_S;
/// After a FIN or RST: the kernel's `nf_conntrack_tcp_timeout_time_wait` (120 s), so a
/// backend's TIME_WAIT socket is gone before the port is given to another client.
pub const SNAT_TCP_CLOSING_NS: u64 = 120 * NS_PER_S;
/// UDP: the kernel's `nf_conntrack_udp_timeout_stream` (120 s).
pub const SNAT_UDP_IDLE_NS: u64 = 120 * NS_PER_S;

/// The port (host byte order) of attempt `attempt` (below `SNAT_ATTEMPTS`) for a flow of
/// hash `hash`, in `min..=max`: distinct for every attempt, and every port of a range no
/// larger than the attempts.
#[inline(always)]
pub const fn snat_port(hash: u32, attempt: u32, min: u16, max: u16) -> u16 {
    let size = (max as u32).saturating_sub(min as u32) + 1;
    let stride = if size <= SNAT_ATTEMPTS {
        1
    } else {
        size / SNAT_ATTEMPTS
    };
    // attempt * stride < size, and hash % size < size: no overflow below 2^17.
    let offset = (hash % size + attempt * stride) % size;
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
    fn ports_stay_in_range_and_spread_over_it() {
        assert_eq!(snat_port(0, 0, 61_000, 65_535), 61_000);
        assert_eq!(snat_port(4_535, 0, 61_000, 65_535), 65_535);
        assert_eq!(snat_port(0, 1, 61_000, 65_535), 61_567, "an eighth on");
        assert_eq!(snat_port(4_535, 1, 61_000, 65_535), 61_566, "wraps");
        // 1,000,003 % 65,535 = 16,978; + 7 * 8,191 wraps to 8,780.
        assert_eq!(snat_port(1_000_003, 7, 1, 65_535), 8_781);
        assert_eq!(snat_port(9, 0, 0, 65_535), 9, "the whole port space");
        assert_eq!(snat_port(12, 5, 100, 100), 100, "one port");
    }

    #[test]
    fn attempts_are_distinct_and_cover_a_small_range() {
        for (min, max) in [
            (40_000, 40_001),
            (61_000, 61_007),
            (61_000, 61_008),
            (1, 65_535),
        ] {
            for hash in [0, 1, 7, 4_535, u32::MAX] {
                let mut ports = [0u16; SNAT_ATTEMPTS as usize];
                for (attempt, port) in (0..SNAT_ATTEMPTS).zip(ports.iter_mut()) {
                    *port = snat_port(hash, attempt, min, max);
                }
                assert!(ports.iter().all(|p| (min..=max).contains(p)));
                ports.sort_unstable();
                let distinct = 1 + ports.windows(2).filter(|w| w[0] != w[1]).count();
                let size = usize::from(max - min) + 1;
                assert_eq!(distinct, size.min(ports.len()), "{min}-{max} {hash}");
            }
        }
    }

    #[test]
    fn closing_tcp_frees_sooner() {
        assert!(snat_idle_ns(PROTO_TCP, SNAT_STATE_CLOSING) < snat_idle_ns(PROTO_TCP, 0));
        assert_eq!(snat_idle_ns(crate::PROTO_UDP, 0), SNAT_UDP_IDLE_NS);
    }
}
