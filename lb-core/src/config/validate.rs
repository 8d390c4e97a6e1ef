//! Per-service rules: turns one strictly deserialized [`raw::Service`] into a
//! [`ServiceSpec`], or names the first field that breaks a rule.

use super::raw::{self, DurationText, Int, StatusText, Timing};
use super::{
    BackendSpec, DEFAULT_AFFINITY_TIMEOUT, DEFAULT_EXPECT, DEFAULT_FALL, DEFAULT_INTERVAL,
    DEFAULT_RISE, DEFAULT_TIMEOUT, DEFAULT_WEIGHT, FrontendSpec, HealthCheck, MAX_AFFINITY_TIMEOUT,
    MAX_COUNT, MAX_INTERVAL, MAX_WEIGHT, MIN_AFFINITY_TIMEOUT, MIN_INTERVAL, Probe, Protocol,
    ServiceSpec, SessionAffinity,
};
use crate::maglev;
use ipnet::IpNet;
use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

/// The first broken rule of a service: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Invalid {
    pub field: String,
    pub reason: String,
}

fn invalid<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid {
        field: field.into(),
        reason: reason.into(),
    })
}

/// Whether `name` is a DNS label: 1..=63 of `[a-z0-9-]`, starting and ending
/// with a letter or digit.
pub(super) fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| edge(b) || *b == b'-')
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
}

pub(super) fn service(raw: raw::Service) -> Result<ServiceSpec, Invalid> {
    let name = match raw.name {
        None => return invalid("name", "required"),
        Some(name) if !is_valid_name(&name) => {
            return invalid(
                "name",
                format!(
                    "must be 1 to 63 characters of a-z, 0-9 and '-', starting and ending \
                     with a letter or digit, got {name:?}"
                ),
            );
        }
        Some(name) => name,
    };

    if raw.frontends.is_empty() {
        return invalid("frontends", "must list at least one frontend");
    }
    let frontends = raw
        .frontends
        .iter()
        .enumerate()
        .map(|(i, f)| frontend(&format!("frontends[{i}]"), f))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::new();
    for (i, f) in frontends.iter().enumerate() {
        if !seen.insert(f) {
            return invalid(
                format!("frontends[{i}]"),
                format!("duplicate frontend {}", frontend_text(f)),
            );
        }
    }

    let Some(raw_backends) = raw.backends else {
        return invalid(
            "backends",
            "required (write `backends: []` for a service that has none yet)",
        );
    };
    let backends = raw_backends
        .iter()
        .enumerate()
        .map(|(i, b)| backend(&format!("backends[{i}]"), b))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::new();
    for (i, b) in backends.iter().enumerate() {
        if !seen.insert((b.address, b.port)) {
            return invalid(
                format!("backends[{i}]"),
                format!("duplicate backend {}", socket_text(b.address, b.port)),
            );
        }
    }

    one_family(&frontends, &backends)?;
    // A backend on one of the service's own frontend addresses sends its traffic back
    // to the service.
    if let Some((i, b)) = backends
        .iter()
        .enumerate()
        .find(|(_, b)| frontends.iter().any(|f| f.address == b.address))
    {
        return invalid(
            format!("backends[{i}].address"),
            format!("{} is an address of this service's frontends", b.address),
        );
    }

    let health = raw
        .health
        .as_ref()
        .map(|h| health("health", h))
        .transpose()?;
    let session_affinity = raw.session_affinity.as_ref().map(affinity).transpose()?;
    let maglev_table_size = table_size(raw.maglev.as_ref(), &backends)?;
    let source_ranges = raw
        .source_ranges
        .as_deref()
        .map(|ranges| source_ranges(ranges, frontends[0].address))
        .transpose()?
        .unwrap_or_default();

    let lb_mode = raw
        .lb_mode
        .as_deref()
        .map(|text| {
            text.parse::<crate::mode::LbMode>()
                .or_else(|reason| invalid("lbMode", reason))
        })
        .transpose()?;

    Ok(ServiceSpec {
        lb_mode,
        name,
        frontends,
        backends,
        health,
        session_affinity,
        maglev_table_size,
        reject_when_empty: matches!(raw.when_empty, Some(raw::WhenEmpty::Reject)),
        source_ranges,
    })
}

/// Client prefixes in CIDR form, network address as written (host bits zero), of the
/// service's family (one of the other family would admit nobody), each once.
fn source_ranges(texts: &[String], family_of: IpAddr) -> Result<Vec<IpNet>, Invalid> {
    let mut ranges = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let at = format!("sourceRanges[{i}]");
        let Ok(range) = text.parse::<IpNet>() else {
            return invalid(
                at,
                format!("not a CIDR such as 198.51.100.0/24 or 2001:db8::/32: {text:?}"),
            );
        };
        if range.trunc() != range {
            return invalid(
                at,
                format!(
                    "{range} has host bits set; write the network, {}",
                    range.trunc()
                ),
            );
        }
        if let IpNet::V6(v6) = range
            && v6.network().to_ipv4_mapped().is_some()
            && v6.prefix_len() >= 96
        {
            return invalid(
                at,
                format!("must be written as IPv4, not as the IPv4-mapped IPv6 range {range}"),
            );
        }
        if range.addr().is_ipv4() != family_of.is_ipv4() {
            return invalid(
                at,
                format!(
                    "{} range {range} in a service whose frontends are {}: it would admit \
                     no client",
                    family(range.addr()),
                    family(family_of),
                ),
            );
        }
        if ranges.contains(&range) {
            return invalid(at, format!("duplicate range {range}"));
        }
        ranges.push(range);
    }
    Ok(ranges)
}

fn frontend(at: &str, raw: &raw::Frontend) -> Result<FrontendSpec, Invalid> {
    Ok(FrontendSpec {
        address: address(&format!("{at}.address"), &raw.address)?,
        port: port(&format!("{at}.port"), raw.port)?,
        protocol: match raw.protocol {
            None | Some(raw::Protocol::Tcp) => Protocol::Tcp,
            Some(raw::Protocol::Udp) => Protocol::Udp,
        },
        in_cluster: false,
    })
}

fn backend(at: &str, raw: &raw::Backend) -> Result<BackendSpec, Invalid> {
    let address = address(&format!("{at}.address"), &raw.address)?;
    // Beyond what no frontend may be: link-local (the node's own neighbourhood, such as
    // a metadata service at 169.254.169.254), the rule every source's backends follow.
    if let Some(kind) = crate::address::backend_refusal(address) {
        return invalid(
            format!("{at}.address"),
            format!("must be a unicast address of another host, got {kind} {address}"),
        );
    }
    let port = port(&format!("{at}.port"), raw.port)?;
    let weight = match raw.weight {
        None => DEFAULT_WEIGHT,
        Some(w) => in_range(&format!("{at}.weight"), w, 0, MAX_WEIGHT)?,
    };
    let health = raw
        .health
        .as_ref()
        .map(|h| health(&format!("{at}.health"), h))
        .transpose()?;
    Ok(BackendSpec {
        address,
        port,
        weight,
        health,
    })
}

/// A unicast address the data plane can translate to and from.
fn address(at: &str, text: &str) -> Result<IpAddr, Invalid> {
    let Ok(address) = text.parse::<IpAddr>() else {
        return invalid(at, format!("not an IPv4 or IPv6 address: {text:?}"));
    };
    let kind = match address {
        IpAddr::V4(a) if a.is_unspecified() => "the unspecified address",
        IpAddr::V4(a) if a.is_loopback() => "a loopback address",
        IpAddr::V4(a) if a.is_multicast() => "a multicast address",
        IpAddr::V4(a) if a.is_broadcast() => "the broadcast address",
        IpAddr::V6(a) if a.is_unspecified() => "the unspecified address",
        IpAddr::V6(a) if a.is_loopback() => "a loopback address",
        IpAddr::V6(a) if a.is_multicast() => "a multicast address",
        // The data plane would look it up as IPv6 and never match.
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            return invalid(
                at,
                format!("must be written as IPv4, not as the IPv4-mapped IPv6 address {address}"),
            );
        }
        _ => return Ok(address),
    };
    invalid(
        at,
        format!("must be a unicast address, got {kind} {address}"),
    )
}

fn port(at: &str, value: Int) -> Result<u16, Invalid> {
    in_range(at, value, 1, u16::MAX)
}

/// `value` as a `T` within `min..=max`, else a "must be" message.
fn in_range<T>(at: &str, value: Int, min: T, max: T) -> Result<T, Invalid>
where
    T: TryFrom<i128> + PartialOrd + std::fmt::Display + Copy,
{
    match T::try_from(value.0) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        _ => invalid(at, format!("must be {min}..={max}, got {}", value.0)),
    }
}

pub(super) fn frontend_text(f: &FrontendSpec) -> String {
    let protocol = match f.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    };
    format!("{}/{protocol}", socket_text(f.address, f.port))
}

fn socket_text(address: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(address, port).to_string()
}

fn family(address: IpAddr) -> &'static str {
    match address {
        IpAddr::V4(_) => "IPv4",
        IpAddr::V6(_) => "IPv6",
    }
}

/// The data plane translates addresses but not families (no NAT46/64), so a
/// service's frontends and backends are all IPv4 or all IPv6. The first
/// frontend sets the family; the first address of the other family is named.
fn one_family(frontends: &[FrontendSpec], backends: &[BackendSpec]) -> Result<(), Invalid> {
    let first = frontends[0].address;
    let others = frontends
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("frontends[{i}].address"), f.address))
        .chain(
            backends
                .iter()
                .enumerate()
                .map(|(i, b)| (format!("backends[{i}].address"), b.address)),
        );
    for (at, address) in others {
        if address.is_ipv4() != first.is_ipv4() {
            return invalid(
                at,
                format!(
                    "{} address {address} in a service whose frontends[0] is {} ({first}); \
                     a service's frontends and backends must all be one IP family",
                    family(address),
                    family(first),
                ),
            );
        }
    }
    Ok(())
}

fn health(at: &str, raw: &raw::Health) -> Result<HealthCheck, Invalid> {
    match (&raw.tcp, &raw.http) {
        (Some(tcp), None) => check(&format!("{at}.tcp"), Probe::Tcp, &tcp.timing()),
        (None, Some(http)) => {
            let at = format!("{at}.http");
            let Some(path) = &http.path else {
                return invalid(format!("{at}.path"), "required");
            };
            let probe = Probe::Http {
                path: http_path(&format!("{at}.path"), path)?,
                host: http
                    .host
                    .as_deref()
                    .map(|h| http_host(&format!("{at}.host"), h))
                    .transpose()?,
                expect: http
                    .expect
                    .as_ref()
                    .map_or(Ok(DEFAULT_EXPECT), |e| expect(&format!("{at}.expect"), e))?,
            };
            check(&at, probe, &http.timing())
        }
        (None, None) => invalid(at, "must set exactly one of `tcp` or `http`, got neither"),
        (Some(_), Some(_)) => invalid(at, "must set exactly one of `tcp` or `http`, got both"),
    }
}

fn check(at: &str, probe: Probe, raw: &Timing<'_>) -> Result<HealthCheck, Invalid> {
    let interval = match raw.interval {
        None => DEFAULT_INTERVAL,
        Some(text) => {
            let field = format!("{at}.interval");
            let interval = duration(&field, text)?;
            if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
                return invalid(
                    field,
                    format!(
                        "must be {}..={}, got {}",
                        humantime::format_duration(MIN_INTERVAL),
                        humantime::format_duration(MAX_INTERVAL),
                        text.0
                    ),
                );
            }
            interval
        }
    };
    let timeout = match raw.timeout {
        // The default never exceeds an interval chosen shorter than it.
        None => DEFAULT_TIMEOUT.min(interval),
        Some(text) => {
            let field = format!("{at}.timeout");
            let timeout = duration(&field, text)?;
            if timeout.is_zero() {
                return invalid(field, format!("must be more than 0, got {}", text.0));
            }
            if timeout > interval {
                return invalid(
                    field,
                    format!(
                        "must be at most the interval ({}), got {}",
                        humantime::format_duration(interval),
                        text.0
                    ),
                );
            }
            timeout
        }
    };
    let count = |name: &str, value: Option<Int>, default: u32| match value {
        None => Ok(default),
        Some(v) => in_range(&format!("{at}.{name}"), v, 1, MAX_COUNT),
    };
    Ok(HealthCheck {
        probe,
        interval,
        timeout,
        rise: count("rise", raw.rise, DEFAULT_RISE)?,
        fall: count("fall", raw.fall, DEFAULT_FALL)?,
        port: raw
            .port
            .map(|p| port(&format!("{at}.port"), p))
            .transpose()?,
    })
}

fn duration(at: &str, text: &DurationText) -> Result<Duration, Invalid> {
    humantime::parse_duration(&text.0).or_else(|e| {
        invalid(
            at,
            format!(
                r#"not a duration such as "5s" or "500ms": {:?} ({e})"#,
                text.0
            ),
        )
    })
}

/// Visible ASCII only: the text goes into the request line or a header as is.
fn is_visible_ascii(text: &str) -> bool {
    text.bytes().all(|b| b.is_ascii_graphic())
}

fn http_path(at: &str, path: &str) -> Result<String, Invalid> {
    if !path.starts_with('/') {
        return invalid(at, format!("must start with '/', got {path:?}"));
    }
    if !is_visible_ascii(path) {
        return invalid(
            at,
            format!("must be visible ASCII without spaces (percent-encode the rest), got {path:?}"),
        );
    }
    Ok(path.to_owned())
}

fn http_host(at: &str, host: &str) -> Result<String, Invalid> {
    if host.is_empty() || !is_visible_ascii(host) || host.contains('/') {
        return invalid(
            at,
            format!("must be a host name (visible ASCII, no spaces or '/'), got {host:?}"),
        );
    }
    Ok(host.to_owned())
}

/// `"NNN"` or `"NNN-NNN"`, within 100..=599, low end first.
fn expect(at: &str, text: &StatusText) -> Result<(u16, u16), Invalid> {
    let status = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|c| s.len() == 3 && (100..=599).contains(c))
    };
    let text = text.0.as_str();
    let range = match text.split_once('-') {
        None => status(text).map(|c| (c, c)),
        Some((lo, hi)) => status(lo).zip(status(hi)),
    };
    match range {
        Some((lo, hi)) if lo <= hi => Ok((lo, hi)),
        Some(_) => invalid(at, format!("range must be low-high, got {text:?}")),
        None => invalid(
            at,
            format!(
                r#"must be a status "NNN" or a range "NNN-NNN" within 100..=599, got {text:?}"#
            ),
        ),
    }
}

fn affinity(raw: &raw::SessionAffinity) -> Result<SessionAffinity, Invalid> {
    let Some(client_ip) = &raw.client_ip else {
        return invalid(
            "sessionAffinity",
            "must set `clientIP` (the only affinity), or leave sessionAffinity out",
        );
    };
    let timeout = match &client_ip.timeout {
        None => DEFAULT_AFFINITY_TIMEOUT,
        Some(text) => {
            let field = "sessionAffinity.clientIP.timeout";
            let timeout = duration(field, text)?;
            if !(MIN_AFFINITY_TIMEOUT..=MAX_AFFINITY_TIMEOUT).contains(&timeout) {
                return invalid(
                    field,
                    format!(
                        "must be {}s..={}s, got {}",
                        MIN_AFFINITY_TIMEOUT.as_secs(),
                        MAX_AFFINITY_TIMEOUT.as_secs(),
                        text.0
                    ),
                );
            }
            timeout
        }
    };
    Ok(SessionAffinity { timeout })
}

/// A prime Maglev can build, and big enough that every backend with a weight
/// gets at least one slot: the builder gives each backend `weight / gcd` turns
/// per round, so the first round needs that many free slots.
fn table_size(raw: Option<&raw::Maglev>, backends: &[BackendSpec]) -> Result<u32, Invalid> {
    const FIELD: &str = "maglev.tableSize";
    let size = match raw.and_then(|m| m.table_size) {
        None => maglev::DEFAULT_TABLE_SIZE,
        Some(size) => {
            let size = in_range(FIELD, size, 2, maglev::MAX_TABLE_SIZE)?;
            if !maglev::is_prime(size) {
                return invalid(FIELD, format!("must be prime, got {size}"));
            }
            size
        }
    };
    let gcd = backends
        .iter()
        .map(|b| b.weight)
        .filter(|&w| w > 0)
        .fold(0, gcd);
    let turns: u64 = backends
        .iter()
        .filter(|b| b.weight > 0)
        .map(|b| u64::from(b.weight / gcd))
        .sum();
    if turns > u64::from(size) {
        return invalid(
            FIELD,
            format!(
                "{size} slots are too few for the weights, which add up to {turns} after \
                 dividing by their common factor {gcd}: some backends would get no slot; \
                 set a larger prime tableSize (at most {}) or use smaller weights",
                maglev::MAX_TABLE_SIZE
            ),
        );
    }
    Ok(size)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}
