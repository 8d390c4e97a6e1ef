//! DSR encapsulation, shared by the kernel (which builds and strips it) and the tests
//! (which predict it).
//!
//! The receiving node sends the client's packet untranslated (client -> frontend) inside
//! an outer header of the same family: IPIP (protocol 4) for IPv4, IPv6-in-IPv6 (next
//! header 41) for IPv6, from the node's address to the chosen backend's own address, so
//! ordinary routing takes it to the backend's node. That node's program strips the outer
//! header and translates the destination to the backend. The backend's port (Kubernetes'
//! `targetPort`, which the frontend's port does not tell) travels in the outer header:
//! the IPv4 identification (the outer header has DF set, so it identifies no fragments;
//! RFC 6864 4.1) or the low 16 bits of the IPv6 flow label.

/// Bytes the outer header adds: IPv4 and IPv6.
pub const DSR_OVERHEAD_V4: u16 = 20;
pub const DSR_OVERHEAD_V6: u16 = 40;
/// The outer header's protocol / next header.
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
/// TTL / hop limit of the outer header.
pub const DSR_OUTER_TTL: u8 = 64;

/// The outer header's size for `family` (`FAMILY_V4` / `FAMILY_V6`).
#[inline(always)]
pub const fn dsr_overhead(family: u8) -> u16 {
    if family == crate::FAMILY_V4 {
        DSR_OVERHEAD_V4
    } else {
        DSR_OVERHEAD_V6
    }
}

/// The largest TCP MSS a backend may announce so that a full segment from the client,
/// encapsulated, fits a link of `mtu` bytes: the MTU less the outer header, the inner IP
/// header and a TCP header without options.
#[inline(always)]
pub const fn dsr_mss(family: u8, mtu: u16) -> u16 {
    let inner = if family == crate::FAMILY_V4 { 20 } else { 40 };
    mtu.saturating_sub(dsr_overhead(family) + inner + 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6};

    #[test]
    fn overheads_and_mss() {
        assert_eq!(dsr_overhead(FAMILY_V4), 20);
        assert_eq!(dsr_overhead(FAMILY_V6), 40);
        assert_eq!(dsr_mss(FAMILY_V4, 1500), 1440);
        assert_eq!(dsr_mss(FAMILY_V6, 1500), 1400);
        assert_eq!(dsr_mss(FAMILY_V4, 50), 0, "never wraps");
    }
}
