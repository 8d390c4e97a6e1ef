//! The node's SNAT settings (`SNAT_CONFIG_V1`): the source address per family that
//! source-NATed flows leave with, and the port range. The address is the first of the
//! known addresses of its family (`--node-address`, else the Node object's InternalIP,
//! else its ExternalIP: `lb_core::model::kubernetes::NodeInfo`), else the first
//! address of that family on the `--interface`s (link-local ones skipped), as
//! MASQUERADE takes the address of the interface a packet leaves by. Also what the
//! reservations hold (`usage`), for `status`.

use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::snat::{snat_idle_ns, snat_reusable_when_full};
use lb_common::{FlowKey, SNAT_CFG_F_V4, SNAT_CFG_F_V6, SnatConfig, SnatEntry, addr_key};

use super::DataplaneError;

/// The settings for the `known` addresses (`--node-address`, or the Node object's),
/// the `interfaces` and `ports`.
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

/// The kernel's clock of `SnatEntry::last_seen_ns` (`bpf_ktime_get_coarse_ns` reads
/// `CLOCK_MONOTONIC_COARSE`), so a reservation's age is measured as the program does.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC_COARSE exists on every Linux");
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// A backend as SNAT reservations are keyed: address, port, protocol. Each has the
/// whole port range of each node address to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnatBackend {
    pub addr: IpAddr,
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
}

impl std::fmt::Display for SnatBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.proto == lb_common::PROTO_TCP {
            "TCP"
        } else {
            "UDP"
        };
        write!(
            f,
            "{}/{proto}",
            std::net::SocketAddr::new(self.addr, self.port)
        )
    }
}

/// What the reservations hold at one moment.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Reservations whose flow sent a packet within its timeout: their ports are taken.
    pub held: u64,
    /// Reservations past their timeout (`lb_common::snat::snat_idle_ns`): the next flow
    /// that tries their port takes it.
    pub idle: u64,
    /// Held reservations of connections the backend closed first over 10 s ago, held
    /// only for its `TIME_WAIT` (`snat_reusable_when_full`): a new flow takes one when
    /// none of its attempts is free.
    pub reusable: u64,
    /// Held ports per backend.
    pub per_backend: std::collections::BTreeMap<SnatBackend, BackendUsage>,
}

/// One backend's held ports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BackendUsage {
    pub held: u64,
    /// Of `held`, those a new flow takes when it finds no free port.
    pub reusable: u64,
}

/// Sorts `entries` (the `SNAT_V1` map) into held and idle at `now_ns` (`now_ns()`), by
/// the rule the program applies when it looks for a free port.
pub fn usage(entries: &[(FlowKey, SnatEntry)], now_ns: u64) -> Usage {
    let mut usage = Usage::default();
    for (key, entry) in entries {
        let age = now_ns.saturating_sub(entry.last_seen_ns);
        if age > snat_idle_ns(key.proto, entry.state) {
            usage.idle += 1;
            continue;
        }
        usage.held += 1;
        let reusable = snat_reusable_when_full(key.proto, entry.state, age);
        usage.reusable += u64::from(reusable);
        let addr = if key.family == lb_common::FAMILY_V6 {
            IpAddr::V6(Ipv6Addr::from(key.src))
        } else {
            IpAddr::V4(Ipv4Addr::new(
                key.src[0], key.src[1], key.src[2], key.src[3],
            ))
        };
        let backend = SnatBackend {
            addr,
            port: u16::from_be(key.sport),
            proto: key.proto,
        };
        let held = usage.per_backend.entry(backend).or_default();
        held.held += 1;
        held.reusable += u64::from(reusable);
    }
    usage
}

/// Ports in the range of `cfg`: what each backend can hold per node address.
pub fn range_size(cfg: &SnatConfig) -> u32 {
    (u32::from(cfg.port_max) + 1).saturating_sub(u32::from(cfg.port_min))
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

    fn reservation(
        backend: [u8; 4],
        port: u16,
        proto: u8,
        state: u8,
        last_seen_ns: u64,
    ) -> (FlowKey, SnatEntry) {
        let mut src = [0; 16];
        src[..4].copy_from_slice(&backend);
        (
            FlowKey {
                src,
                dst: [0; 16],
                sport: port.to_be(),
                dport: 61_000u16.to_be(),
                proto,
                family: lb_common::FAMILY_V4,
                _pad: [0; 2],
            },
            SnatEntry {
                state,
                last_seen_ns,
                ..SnatEntry::default()
            },
        )
    }

    #[test]
    fn held_and_idle_follow_the_programs_timeouts_per_backend() {
        use lb_common::snat::{SNAT_TCP_CLOSED_NS, SNAT_TCP_CLOSING_NS, SNAT_UDP_IDLE_NS};
        use lb_common::{
            PROTO_TCP, PROTO_UDP, SNAT_STATE_BACKEND_WAITS, SNAT_STATE_CLOSING,
            SNAT_STATE_FIN_BACKEND, SNAT_STATE_FIN_CLIENT,
        };
        let fins = SNAT_STATE_CLOSING | SNAT_STATE_FIN_CLIENT | SNAT_STATE_FIN_BACKEND;
        let now = 10 * SNAT_TCP_CLOSING_NS;
        let entries = [
            // Open TCP, quiet for longer than a closing one may be: still held.
            reservation(
                [192, 0, 2, 43],
                8080,
                PROTO_TCP,
                0,
                now - 2 * SNAT_TCP_CLOSING_NS,
            ),
            // Closed just now: held for the backend's TIME_WAIT.
            reservation([192, 0, 2, 43], 8080, PROTO_TCP, SNAT_STATE_CLOSING, now),
            // Closed long ago: idle.
            reservation(
                [192, 0, 2, 43],
                8080,
                PROTO_TCP,
                SNAT_STATE_CLOSING,
                now - SNAT_TCP_CLOSING_NS - 1,
            ),
            // Closed by the client first, 10 s ago: the backend keeps nothing; idle.
            reservation(
                [192, 0, 2, 43],
                8080,
                PROTO_TCP,
                fins,
                now - SNAT_TCP_CLOSED_NS - 1,
            ),
            // Closed by the backend first, 10 s ago: held, but reusable.
            reservation(
                [192, 0, 2, 43],
                8080,
                PROTO_TCP,
                fins | SNAT_STATE_BACKEND_WAITS,
                now - SNAT_TCP_CLOSED_NS - 1,
            ),
            // The same pod over UDP is another backend; this one is idle.
            reservation(
                [192, 0, 2, 43],
                8080,
                PROTO_UDP,
                0,
                now - SNAT_UDP_IDLE_NS - 1,
            ),
            reservation([192, 0, 2, 43], 8080, PROTO_UDP, 0, now - SNAT_UDP_IDLE_NS),
        ];
        let u = usage(&entries, now);
        assert_eq!((u.held, u.reusable, u.idle), (4, 1, 3));
        let tcp = SnatBackend {
            addr: "192.0.2.43".parse().unwrap(),
            port: 8080,
            proto: PROTO_TCP,
        };
        assert_eq!(
            u.per_backend[&tcp],
            BackendUsage {
                held: 3,
                reusable: 1
            }
        );
        assert_eq!(
            u.per_backend[&SnatBackend {
                proto: PROTO_UDP,
                ..tcp
            }]
                .held,
            1
        );
        assert_eq!(tcp.to_string(), "192.0.2.43:8080/TCP");
        let cfg = SnatConfig {
            port_min: 61_000,
            port_max: 61_003,
            ..SnatConfig::default()
        };
        assert_eq!(range_size(&cfg), 4);
        assert!(now_ns() > 0);
    }
}
