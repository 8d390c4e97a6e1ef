//! The node's SNAT settings (`SNAT_CONFIG_V1`): the source address per family that
//! source-NATed flows leave with, and the port range. The address is the first
//! `--node-address` of its family, else the first address of that family on the
//! `--interface`s (link-local ones skipped), as MASQUERADE takes the address of the
//! interface a packet leaves by.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{SNAT_CFG_F_V4, SNAT_CFG_F_V6, SnatConfig, addr_key};

use super::DataplaneError;

/// The settings for `flags` (`--node-address`), the `interfaces` and `ports`.
pub fn config(
    flags: &[IpAddr],
    interfaces: &[String],
    ports: (u16, u16),
) -> Result<SnatConfig, DataplaneError> {
    let found = interface_addresses(interfaces)?;
    let pick = |v6: bool| {
        flags
            .iter()
            .chain(&found)
            .copied()
            .find(|a| a.is_ipv6() == v6)
    };
    let mut cfg = SnatConfig {
        port_min: ports.0,
        port_max: ports.1,
        ..SnatConfig::default()
    };
    if let Some(v4) = pick(false) {
        cfg.addr_v4 = addr_key(v4).0;
        cfg.flags |= SNAT_CFG_F_V4;
    }
    if let Some(v6) = pick(true) {
        cfg.addr_v6 = addr_key(v6).0;
        cfg.flags |= SNAT_CFG_F_V6;
    }
    Ok(cfg)
}

/// `192.0.2.1, 2001:db8::1, ports 61000-65535` for the log and `status`.
pub fn describe(cfg: &SnatConfig) -> String {
    let mut parts = Vec::new();
    if cfg.flags & SNAT_CFG_F_V4 != 0 {
        let a = cfg.addr_v4;
        parts.push(Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string());
    } else {
        parts.push("no IPv4 address (IPv4 flows to SNAT are dropped)".into());
    }
    if cfg.flags & SNAT_CFG_F_V6 != 0 {
        parts.push(Ipv6Addr::from(cfg.addr_v6).to_string());
    } else {
        parts.push("no IPv6 address (IPv6 flows to SNAT are dropped)".into());
    }
    parts.push(format!("ports {}-{}", cfg.port_min, cfg.port_max));
    parts.join(", ")
}

/// Every usable address of `interfaces`, in the order listed.
fn interface_addresses(interfaces: &[String]) -> Result<Vec<IpAddr>, DataplaneError> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(DataplaneError::Interface {
            name: interfaces.join(","),
            reason: format!("getifaddrs: {}", std::io::Error::last_os_error()),
        });
    }
    let mut by_interface: Vec<(String, IpAddr)> = Vec::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name of the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points at a sockaddr of the family it names.
        let addr = unsafe {
            match i32::from((*entry.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = entry.ifa_addr.cast::<libc::sockaddr_in>().read_unaligned();
                    Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))))
                }
                libc::AF_INET6 => {
                    let sin6 = entry.ifa_addr.cast::<libc::sockaddr_in6>().read_unaligned();
                    Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                _ => None,
            }
        };
        if let Some(addr) = addr.filter(usable) {
            by_interface.push((name, addr));
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(interfaces
        .iter()
        .flat_map(|want| {
            by_interface
                .iter()
                .filter(move |(name, _)| name == want)
                .map(|(_, a)| *a)
        })
        .collect())
}

/// Not link-local, loopback or unspecified: an address a backend can answer.
fn usable(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => !a.is_link_local() && !a.is_loopback() && !a.is_unspecified(),
        IpAddr::V6(a) => !a.is_unicast_link_local() && !a.is_loopback() && !a.is_unspecified(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_per_family_and_the_range_is_kept() {
        let flags: Vec<IpAddr> = vec!["198.51.100.11".parse().unwrap()];
        let cfg = config(&flags, &[], (61_000, 61_001)).expect("config");
        assert_eq!(cfg.flags, SNAT_CFG_F_V4);
        assert_eq!(&cfg.addr_v4[..4], &[198, 51, 100, 11]);
        assert_eq!((cfg.port_min, cfg.port_max), (61_000, 61_001));
        assert!(
            describe(&cfg).contains("no IPv6 address"),
            "{}",
            describe(&cfg)
        );
        let lo = config(&[], &["lo".to_owned()], (1, 2)).expect("config");
        assert_eq!(lo.flags, 0, "loopback addresses are not SNAT addresses");
    }
}
