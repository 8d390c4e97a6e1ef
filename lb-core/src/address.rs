//! Which addresses may be a backend, for every source: the config file's backends,
//! EndpointSlice endpoints for L4, and the L7 hop's endpoints (which come from the
//! same `model::kubernetes::usable_endpoints`), so one rule covers all of them.
//!
//! Refused: the unspecified address (`0.0.0.0`, `::`), loopback (`127.0.0.0/8`,
//! `::1`), link-local (`169.254.0.0/16`, `fe80::/10`), multicast (`224.0.0.0/4`,
//! `ff00::/8`) and the limited broadcast address `255.255.255.255`, also when written as
//! an IPv4-mapped IPv6 address (`::ffff:127.0.0.1`, which a dual-stack socket connects
//! to as IPv4). Each of them either reaches the node itself (a way for whoever writes an
//! EndpointSlice into the node's loopback services) or is nothing a connection can be
//! translated to. A Service's own addresses are refused by the callers, which know them.

use std::net::IpAddr;

/// Why `addr` can never be a backend, as "a loopback address" or "the unspecified
/// address"; `None` for a usable unicast address.
pub fn backend_refusal(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V4(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V4(a) if a.is_link_local() => Some("a link-local address"),
        IpAddr::V4(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(_) => None,
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        IpAddr::V6(a) if a.is_loopback() => Some("a loopback address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => Some("a link-local address"),
        IpAddr::V6(a) if a.is_multicast() => Some("a multicast address"),
        IpAddr::V6(a) => a.to_ipv4_mapped().and_then(|v4| {
            backend_refusal(IpAddr::V4(v4))
                .map(|_| "an IPv4-mapped address of the node itself or of no host")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::backend_refusal;

    #[test]
    fn refuses_what_reaches_the_node_or_no_host() {
        for (text, kind) in [
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("169.254.169.254", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.1.2.3", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "IPv4-mapped"),
            ("::ffff:169.254.1.1", "IPv4-mapped"),
        ] {
            let reason = backend_refusal(text.parse().unwrap());
            assert!(
                reason.is_some_and(|r| r.contains(kind)),
                "{text}: {reason:?}, expected {kind}"
            );
        }
    }

    #[test]
    fn accepts_unicast() {
        for text in [
            "192.0.2.11",
            "198.51.100.7",
            "203.0.113.255",
            "2001:db8::11",
            "fec0::1",
            "::ffff:192.0.2.11",
        ] {
            assert_eq!(backend_refusal(text.parse().unwrap()), None, "{text}");
        }
    }
}
