use super::*;
use crate::maglev;
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr};

const EXAMPLE: &str = include_str!("../../../examples/xlb.yaml");

fn parse_ok(text: &str) -> ParsedConfig {
    parse(text).unwrap_or_else(|e| panic!("file rejected: {e}\n{text}"))
}

/// A valid service that every single-service case sits next to, to show that
/// a bad service is rejected alone.
const NEIGHBOUR: &str = "\
name: neighbour
frontends: [{ address: 203.0.113.99, port: 80 }]
backends: [{ address: 192.0.2.99, port: 8080 }]
";

/// A file with `NEIGHBOUR`, then `service` (a block mapping at column 0).
fn file_with(service: &str) -> String {
    let mut text = String::from("services:\n");
    for body in [NEIGHBOUR, service] {
        for (i, line) in body.lines().enumerate() {
            text.push_str(if i == 0 { "  - " } else { "    " });
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// Parses `service` next to `NEIGHBOUR`; expects exactly it rejected, and
/// returns its error.
fn reject(service: &str) -> ServiceError {
    let text = file_with(service);
    let parsed = parse_ok(&text);
    let names: Vec<&str> = parsed.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["neighbour"], "accepted services of\n{text}");
    match <[ServiceError; 1]>::try_from(parsed.rejected) {
        Ok([e]) => e,
        Err(rejected) => panic!("expected one rejected service, got {rejected:?}\n{text}"),
    }
}

/// How the rejection of `service` differs from the expected one, if it does.
fn rejection_mismatch(service: &str, name: &str, field: &str, fragment: &str) -> Option<String> {
    let e = reject(service);
    let expected = e.service == name && e.field == field && e.reason.contains(fragment);
    (!expected).then(|| {
        format!("{service}\n  expected {name:?} {field:?} ...{fragment}...\n  got      {e}")
    })
}

/// Parses `service` next to `NEIGHBOUR`, expecting both accepted.
fn accept(service: &str) -> ServiceSpec {
    let text = file_with(service);
    let mut parsed = parse_ok(&text);
    assert!(parsed.rejected.is_empty(), "{:?}\n{text}", parsed.rejected);
    assert_eq!(parsed.services.len(), 2, "{text}");
    parsed.services.pop().expect("two services")
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn v6(text: &str) -> IpAddr {
    text.parse::<Ipv6Addr>().expect("test address").into()
}

fn tcp(address: IpAddr, port: u16) -> FrontendSpec {
    FrontendSpec {
        address,
        port,
        protocol: Protocol::Tcp,
        in_cluster: false,
    }
}

fn backend(address: IpAddr, port: u16, weight: u32) -> BackendSpec {
    BackendSpec {
        address,
        port,
        weight,
        health: None,
    }
}

#[test]
fn example_file_parses_into_the_demo_services() {
    let parsed = parse_ok(EXAMPLE);
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    let web = ServiceSpec {
        name: "web".to_owned(),
        frontends: vec![tcp(v4(203, 0, 113, 10), 80)],
        backends: vec![
            backend(v4(192, 0, 2, 11), 8080, 1),
            backend(v4(192, 0, 2, 12), 8080, 1),
            backend(v4(192, 0, 2, 13), 8080, 2),
        ],
        health: Some(HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            port: None,
        }),
        session_affinity: None,
        maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
        reject_when_empty: false,
        source_ranges: Vec::new(),
        lb_mode: None,
    };
    let web_v6 = ServiceSpec {
        name: "web-v6".to_owned(),
        frontends: vec![tcp(v6("2001:db8:f::10"), 80)],
        backends: ["2001:db8:b::11", "2001:db8:b::12", "2001:db8:b::13"]
            .into_iter()
            .map(|a| backend(v6(a), 8080, 1))
            .collect(),
        health: None,
        session_affinity: None,
        maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
        reject_when_empty: false,
        source_ranges: Vec::new(),
        lb_mode: None,
    };
    assert_eq!(parsed.services, [web, web_v6]);
}

/// The commented-out settings of the example are valid too, once uncommented.
#[test]
fn example_file_commented_settings_parse() {
    let uncommented: String = EXAMPLE
        .lines()
        .map(|line| {
            for snippet in [
                "# - address: 192.0.2.14",
                "#   port: 8080",
                "#   health: { http",
                "# maglev: {",
                "# - { address: \"2001:db8:f::10\", port: 53",
                "#   http: {",
                "# sessionAffinity: {",
                "# whenEmpty: reject",
                "# lbMode: dnat",
                "# sourceRanges: [",
            ] {
                let trimmed = line.trim_start();
                if trimmed.starts_with(snippet) || trimmed == "# health:" {
                    return line.replacen("# ", "", 1) + "\n";
                }
            }
            line.to_owned() + "\n"
        })
        .collect();
    let parsed = parse_ok(&uncommented);
    assert!(
        parsed.rejected.is_empty(),
        "{:?}\n{uncommented}",
        parsed.rejected
    );
    let [web, web_v6] = &parsed.services[..] else {
        panic!("two services expected: {:?}", parsed.services);
    };
    assert_eq!(web.backends.len(), 4, "{uncommented}");
    assert_eq!(web.lb_mode, Some(crate::mode::LbMode::Dnat));
    assert_eq!(web_v6.lb_mode, None, "the agent's --lb-mode");
    let http = HealthCheck {
        probe: Probe::Http {
            path: "/healthz".to_owned(),
            host: None,
            expect: DEFAULT_EXPECT,
        },
        interval: DEFAULT_INTERVAL,
        timeout: DEFAULT_TIMEOUT,
        rise: DEFAULT_RISE,
        fall: DEFAULT_FALL,
        port: None,
    };
    assert_eq!(web.health_for(&web.backends[3]), Some(&http));
    assert_eq!(web.health_for(&web.backends[0]), web.health.as_ref());
    assert_eq!(web.maglev_table_size, 16_381);
    assert_eq!(
        web_v6.frontends[1],
        FrontendSpec {
            address: v6("2001:db8:f::10"),
            port: 53,
            protocol: Protocol::Udp,
            in_cluster: false
        }
    );
    let Some(HealthCheck {
        probe: Probe::Http { host, expect, .. },
        interval,
        ..
    }) = &web_v6.health
    else {
        panic!("http check expected: {:?}", web_v6.health);
    };
    assert_eq!(host.as_deref(), Some("web.example.com"));
    assert_eq!(*expect, (200, 399));
    assert_eq!(
        web_v6.session_affinity,
        Some(SessionAffinity {
            timeout: Duration::from_hours(3)
        })
    );
    assert_eq!(*interval, Duration::from_secs(2));
    assert!(web.reject_when_empty);
    assert_eq!(
        web_v6.source_ranges,
        ["2001:db8:c::/48".parse::<ipnet::IpNet>().unwrap()]
    );
}

#[test]
fn defaults() {
    let spec = accept(
        "\
name: svc
frontends: [{ address: 203.0.113.20, port: 80 }]
backends: [{ address: 192.0.2.21, port: 8080 }]
health: { tcp: {} }
sessionAffinity: { clientIP: {} }
maglev: {}
",
    );
    assert_eq!(spec.frontends[0].protocol, Protocol::Tcp);
    assert_eq!(spec.backends[0].weight, 1);
    assert_eq!(
        spec.health,
        Some(HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            port: None,
        })
    );
    assert_eq!(
        spec.session_affinity,
        Some(SessionAffinity {
            timeout: Duration::from_hours(3)
        })
    );
    assert_eq!(spec.maglev_table_size, maglev::DEFAULT_TABLE_SIZE);

    let bare = accept(
        "\
name: svc
frontends: [{ address: 203.0.113.20, port: 80 }]
backends: []
",
    );
    assert_eq!(
        (bare.health, bare.session_affinity),
        (None, None),
        "nothing optional is switched on by default"
    );
}

#[test]
fn null_probe_and_affinity_mean_all_defaults() {
    let spec = accept(
        "\
name: svc
frontends: [{ address: 203.0.113.20, port: 80 }]
backends: []
health: { tcp: }
sessionAffinity: { clientIP: }
",
    );
    assert_eq!(spec.health.map(|h| h.probe), Some(Probe::Tcp));
    assert_eq!(
        spec.session_affinity.map(|a| a.timeout),
        Some(DEFAULT_AFFINITY_TIMEOUT)
    );
}

#[test]
fn default_timeout_is_capped_at_a_short_interval() {
    let spec = accept(
        "\
name: svc
frontends: [{ address: 203.0.113.20, port: 80 }]
backends: []
health: { tcp: { interval: 500ms } }
",
    );
    let health = spec.health.expect("health");
    assert_eq!(
        (health.interval, health.timeout),
        (Duration::from_millis(500), Duration::from_millis(500))
    );
}

#[test]
fn http_check_settings_and_backend_override() {
    let spec = accept(
        "\
name: svc
frontends:
  - { address: 203.0.113.20, port: 53, protocol: UDP }
  - { address: 203.0.113.20, port: 53, protocol: TCP }
backends:
  - { address: 192.0.2.21, port: 53, weight: 0 }
  - address: 192.0.2.22
    port: 53
    weight: 100
    health: { tcp: { port: 8081, rise: 1, fall: 100, interval: 1h, timeout: 1h } }
health:
  http: { path: /ready?full=1, host: example.com, expect: 204, port: 8081, interval: 100ms, timeout: 1ms }
maglev: { tableSize: 2 }
",
    );
    assert_eq!(spec.backends[0].weight, 0);
    assert_eq!(spec.backends[1].weight, 100);
    let http = HealthCheck {
        probe: Probe::Http {
            path: "/ready?full=1".to_owned(),
            host: Some("example.com".to_owned()),
            expect: (204, 204),
        },
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(1),
        rise: 2,
        fall: 3,
        port: Some(8081),
    };
    let own = HealthCheck {
        probe: Probe::Tcp,
        interval: Duration::from_hours(1),
        timeout: Duration::from_hours(1),
        rise: 1,
        fall: 100,
        port: Some(8081),
    };
    assert_eq!(spec.health_for(&spec.backends[0]), Some(&http));
    assert_eq!(spec.health_for(&spec.backends[1]), Some(&own));
    assert_eq!(spec.maglev_table_size, 2);
}

#[test]
fn unquoted_ipv6_addresses_and_status_ranges() {
    let spec = accept(
        "\
name: svc
frontends: [{ address: 2001:db8:f::20, port: 443 }]
backends:
  - address: 2001:db8:b::21
    port: 8443
health: { http: { path: /, expect: 200-299 } }
",
    );
    assert_eq!(spec.frontends[0].address, v6("2001:db8:f::20"));
    assert_eq!(spec.backends[0].address, v6("2001:db8:b::21"));
    assert!(
        matches!(
            spec.health.map(|h| h.probe),
            Some(Probe::Http {
                expect: (200, 299),
                ..
            })
        ),
        "expect range"
    );
}

#[test]
fn merge_keys_share_settings_between_services() {
    let parsed = parse_ok(
        "\
services:
  - name: a
    frontends: [{ address: 203.0.113.20, port: 80 }]
    backends: []
    health: &check { tcp: &check_tcp { interval: 1s, timeout: 1s } }
  - name: b
    frontends: [{ address: 203.0.113.21, port: 80 }]
    backends: []
    health:
      tcp: { <<: *check_tcp, fall: 5 }
    sessionAffinity: { clientIP: &affinity { timeout: 1m } }
  - name: c
    frontends: [{ address: 203.0.113.22, port: 80 }]
    backends: []
    health: *check
    sessionAffinity: { clientIP: *affinity }
",
    );
    assert!(parsed.rejected.is_empty(), "{:?}", parsed.rejected);
    let checks: Vec<_> = parsed
        .services
        .iter()
        .map(|s| s.health.as_ref().map(|h| (h.interval, h.fall)))
        .collect();
    let one = Duration::from_secs(1);
    assert_eq!(checks, [Some((one, 3)), Some((one, 5)), Some((one, 3))]);
    assert_eq!(
        parsed.services[2].session_affinity,
        Some(SessionAffinity {
            timeout: Duration::from_mins(1)
        })
    );
}

/// One case per rule: the service text, its reported name, field and a
/// fragment of the reason.
const RULES: &[(&str, &str, &str, &str)] = &[
    // name
    (
        "frontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "services[1]",
        "name",
        "required",
    ),
    (
        "name: Web_1\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "services[1]",
        "name",
        "\"Web_1\"",
    ),
    (
        "name: -web\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "services[1]",
        "name",
        "starting and ending",
    ),
    (
        "name: web-\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "services[1]",
        "name",
        "starting and ending",
    ),
    (
        "name: ''\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "services[1]",
        "name",
        "1 to 63",
    ),
    (
        "name: a234567890123456789012345678901234567890123456789012345678901234\n\
         frontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "services[1]",
        "name",
        "1 to 63",
    ),
    // frontends
    (
        "name: svc\nbackends: []",
        "svc",
        "frontends",
        "at least one",
    ),
    (
        "name: svc\nfrontends: []\nbackends: []",
        "svc",
        "frontends",
        "at least one",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.300, port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "not an IPv4 or IPv6 address: \"203.0.113.300\"",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 0 }]\nbackends: []",
        "svc",
        "frontends[0].port",
        "must be 1..=65535, got 0",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 65536 }]\nbackends: []",
        "svc",
        "frontends[0].port",
        "must be 1..=65535, got 65536",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80, protocol: tcp }]\nbackends: []",
        "svc",
        "frontends[0].protocol",
        "unknown variant `tcp`, expected `TCP` or `UDP`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80, protocol: SCTP }]\nbackends: []",
        "svc",
        "frontends[0].protocol",
        "unknown variant `SCTP`",
    ),
    (
        "name: svc\nfrontends: [{ port: 80 }]\nbackends: []",
        "svc",
        "frontends[0]",
        "missing field `address`",
    ),
    (
        "name: svc\n\
         frontends: [{ address: 203.0.113.20, port: 80 }, { address: 203.0.113.20, port: 80, protocol: TCP }]\n\
         backends: []",
        "svc",
        "frontends[1]",
        "duplicate frontend 203.0.113.20:80/TCP",
    ),
    // unicast addresses
    (
        "name: svc\nfrontends: [{ address: 0.0.0.0, port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "unspecified",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 127.0.0.1, port: 80 }]",
        "svc",
        "backends[0].address",
        "loopback",
    ),
    (
        "name: svc\nfrontends: [{ address: 224.0.0.1, port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "multicast",
    ),
    (
        "name: svc\nfrontends: [{ address: 255.255.255.255, port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "broadcast",
    ),
    (
        "name: svc\nfrontends: [{ address: '::', port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "unspecified",
    ),
    (
        "name: svc\nfrontends: [{ address: '2001:db8:f::20', port: 80 }]\n\
         backends: [{ address: '::1', port: 80 }]",
        "svc",
        "backends[0].address",
        "loopback",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.1, port: 80 }, { address: 169.254.169.254, port: 80 }]",
        "svc",
        "backends[1].address",
        "a link-local address 169.254.169.254",
    ),
    (
        "name: svc\nfrontends: [{ address: '2001:db8:f::20', port: 80 }]\n\
         backends: [{ address: 'fe80::1', port: 80 }]",
        "svc",
        "backends[0].address",
        "a link-local address fe80::1",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }, { address: 203.0.113.21, port: 81 }]\n\
         backends: [{ address: 192.0.2.1, port: 80 }, { address: 203.0.113.21, port: 8080 }]",
        "svc",
        "backends[1].address",
        "203.0.113.21 is an address of this service's frontends",
    ),
    (
        "name: svc\nfrontends: [{ address: 'ff02::1', port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "multicast",
    ),
    (
        "name: svc\nfrontends: [{ address: '::ffff:203.0.113.20', port: 80 }]\nbackends: []",
        "svc",
        "frontends[0].address",
        "written as IPv4, not as the IPv4-mapped IPv6 address ::ffff:203.0.113.20",
    ),
    // backends
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]",
        "svc",
        "backends",
        "backends: []",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080 }, { address: 192.0.2.22, port: 8080, weight: 500 }]",
        "svc",
        "backends[1].weight",
        "must be 0..=100, got 500",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080, weight: -1 }]",
        "svc",
        "backends[0].weight",
        "must be 0..=100, got -1",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080, weight: 1.5 }]",
        "svc",
        "backends[0].weight",
        "invalid type: floating point `1.5`, expected an integer",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 70000 }]",
        "svc",
        "backends[0].port",
        "got 70000",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: '8080' }]",
        "svc",
        "backends[0].port",
        "invalid type: string",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080, weight: 1 }, { address: 192.0.2.21, port: 8080, weight: 2 }]",
        "svc",
        "backends[1]",
        "duplicate backend 192.0.2.21:8080",
    ),
    (
        "name: svc\nfrontends: [{ address: '2001:db8:f::20', port: 80 }]\n\
         backends: [{ address: '2001:db8:b::21', port: 8080 }, { address: '2001:db8:b::21', port: 8080 }]",
        "svc",
        "backends[1]",
        "duplicate backend [2001:db8:b::21]:8080",
    ),
    // families
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080 }, { address: '2001:db8:b::21', port: 8080 }]",
        "svc",
        "backends[1].address",
        "IPv6 address 2001:db8:b::21 in a service whose frontends[0] is IPv4",
    ),
    (
        "name: svc\nfrontends: [{ address: '2001:db8:f::20', port: 80 }, { address: 203.0.113.20, port: 80 }]\n\
         backends: []",
        "svc",
        "frontends[1].address",
        "one IP family",
    ),
    // health checks
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\nhealth: {}",
        "svc",
        "health",
        "exactly one of `tcp` or `http`, got neither",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: {}, http: { path: / } }",
        "svc",
        "health",
        "got both",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { interval: 50ms } }",
        "svc",
        "health.tcp.interval",
        "must be 100ms..=1h, got 50ms",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { interval: 2h } }",
        "svc",
        "health.tcp.interval",
        "got 2h",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { interval: 5 } }",
        "svc",
        "health.tcp.interval",
        "expected a duration with a unit",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { interval: 5x } }",
        "svc",
        "health.tcp.interval",
        "not a duration such as \"5s\" or \"500ms\": \"5x\"",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { timeout: 0s } }",
        "svc",
        "health.tcp.timeout",
        "more than 0",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { interval: 1s, timeout: 1001ms } }",
        "svc",
        "health.tcp.timeout",
        "at most the interval (1s), got 1001ms",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { rise: 0 } }",
        "svc",
        "health.tcp.rise",
        "must be 1..=100, got 0",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { fall: 101 } }",
        "svc",
        "health.tcp.fall",
        "must be 1..=100, got 101",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { port: 0 } }",
        "svc",
        "health.tcp.port",
        "must be 1..=65535",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: healthz } }",
        "svc",
        "health.http.path",
        "must start with '/'",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: /a b } }",
        "svc",
        "health.http.path",
        "visible ASCII",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { port: 8081 } }",
        "svc",
        "health.http.path",
        "required",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: }",
        "svc",
        "health.http.path",
        "required",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: /, host: '' } }",
        "svc",
        "health.http.host",
        "host name",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: /, expect: 399-200 } }",
        "svc",
        "health.http.expect",
        "low-high",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: /, expect: 200-600 } }",
        "svc",
        "health.http.expect",
        "within 100..=599, got \"200-600\"",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: /, expect: 99 } }",
        "svc",
        "health.http.expect",
        "got \"99\"",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { http: { path: /, expect: 2xx } }",
        "svc",
        "health.http.expect",
        "\"NNN-NNN\"",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080, health: { tcp: { timeout: 10s } } }]",
        "svc",
        "backends[0].health.tcp.timeout",
        "at most the interval (5s)",
    ),
    // session affinity
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sessionAffinity: { clientIP: { timeout: 0s } }",
        "svc",
        "sessionAffinity.clientIP.timeout",
        "must be 1s..=86400s, got 0s",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sessionAffinity: { clientIP: { timeout: 86401s } }",
        "svc",
        "sessionAffinity.clientIP.timeout",
        "got 86401s",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sessionAffinity: {}",
        "svc",
        "sessionAffinity",
        "`clientIP`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sessionAffinity: ClientIP",
        "svc",
        "sessionAffinity",
        "invalid type: string \"ClientIP\", expected a mapping with `clientIP`",
    ),
    // maglev
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         maglev: { tableSize: 16384 }",
        "svc",
        "maglev.tableSize",
        "must be prime, got 16384",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         maglev: { tableSize: 1 }",
        "svc",
        "maglev.tableSize",
        "must be 2..=131071, got 1",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         maglev: { tableSize: 131101 }",
        "svc",
        "maglev.tableSize",
        "must be 2..=131071, got 131101",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 80, weight: 3 }, { address: 192.0.2.22, port: 80, weight: 6 }, \
         { address: 192.0.2.23, port: 80, weight: 0 }]\n\
         maglev: { tableSize: 2 }",
        "svc",
        "maglev.tableSize",
        "add up to 3 after dividing by their common factor 3",
    ),
    // unknown fields
    (
        "name: svc\nfrontend: [{ address: 203.0.113.20, port: 80 }]\nbackends: []",
        "svc",
        "frontend",
        "unknown field `frontend`, expected one of `name`, `frontends`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80, proto: UDP }]\nbackends: []",
        "svc",
        "frontends[0].proto",
        "unknown field `proto`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080, wieght: 2 }]",
        "svc",
        "backends[0].wieght",
        "unknown field `wieght`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { tcp: { path: /healthz } }",
        "svc",
        "health.tcp.path",
        "unknown field `path`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         health: { grpc: {} }",
        "svc",
        "health.grpc",
        "unknown field `grpc`, expected `tcp` or `http`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sessionAffinity: { clientIp: {} }",
        "svc",
        "sessionAffinity.clientIp",
        "unknown field `clientIp`, expected `clientIP`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         maglev: { size: 7 }",
        "svc",
        "maglev.size",
        "unknown field `size`",
    ),
    // a service that has a type error is still named
    (
        "name: svc\nfrontends: { address: 203.0.113.20, port: 80 }\nbackends: []",
        "svc",
        "frontends",
        "invalid type: map, expected a sequence",
    ),
    (
        "name: svc\nfrontends: [203.0.113.20]\nbackends: []",
        "svc",
        "frontends[0]",
        "expected a frontend mapping, such as { address: 203.0.113.10, port: 80 }",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: [{ address: 192.0.2.21, port: 18446744073709551615 }]",
        "svc",
        "backends[0].port",
        "must be 1..=65535, got 18446744073709551615",
    ), // whenEmpty
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         whenEmpty: refuse",
        "svc",
        "whenEmpty",
        "unknown variant `refuse`, expected `drop` or `reject`",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         whenEmpty: Reject",
        "svc",
        "whenEmpty",
        "unknown variant `Reject`",
    ),
    // sourceRanges
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: 198.51.100.0/24",
        "svc",
        "sourceRanges",
        "invalid type: string \"198.51.100.0/24\", expected a sequence",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: [198.51.100.0/24, 198.51.100.0/33]",
        "svc",
        "sourceRanges[1]",
        "not a CIDR such as 198.51.100.0/24 or 2001:db8::/32: \"198.51.100.0/33\"",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: [198.51.100.7]",
        "svc",
        "sourceRanges[0]",
        "not a CIDR",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: [198.51.100.7/24]",
        "svc",
        "sourceRanges[0]",
        "198.51.100.7/24 has host bits set; write the network, 198.51.100.0/24",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: [\"2001:db8:c::/48\"]",
        "svc",
        "sourceRanges[0]",
        "IPv6 range 2001:db8:c::/48 in a service whose frontends are IPv4: it would admit no client",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: [\"::ffff:198.51.100.0/120\"]",
        "svc",
        "sourceRanges[0]",
        "must be written as IPv4",
    ),
    (
        "name: svc\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         sourceRanges: [198.51.100.0/24, 192.0.2.0/24, 198.51.100.0/24]",
        "svc",
        "sourceRanges[2]",
        "duplicate range 198.51.100.0/24",
    ),
];

#[test]
fn when_empty_and_source_ranges() {
    let web = accept(
        "name: web\nfrontends: [{ address: '2001:db8:f::20', port: 80 }]\nbackends: []\n\
         whenEmpty: reject\nsourceRanges: ['2001:db8:c::/48', '::/0']",
    );
    assert!(web.reject_when_empty);
    assert_eq!(
        web.source_ranges,
        [
            "2001:db8:c::/48".parse::<ipnet::IpNet>().unwrap(),
            "::/0".parse().unwrap()
        ]
    );
    let plain = accept(
        "name: web\nfrontends: [{ address: 203.0.113.20, port: 80 }]\nbackends: []\n\
         whenEmpty: drop\nsourceRanges: []",
    );
    assert!(!plain.reject_when_empty, "drop is the default's spelling");
    assert!(
        plain.source_ranges.is_empty(),
        "an empty list admits everyone"
    );
}

#[test]
fn every_rule_rejects_the_service_alone() {
    let mismatches: Vec<String> = RULES
        .iter()
        .filter_map(|&(service, name, field, fragment)| {
            rejection_mismatch(service, name, field, fragment)
        })
        .collect();
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n\n"));
}

#[test]
fn a_service_that_is_not_a_mapping_is_named_by_index() {
    let text = format!("{}  - just-a-name\n", file_with(""));
    let parsed = parse_ok(&text);
    assert_eq!(parsed.services.len(), 1, "{text}");
    let e = &parsed.rejected[0];
    assert_eq!((e.service.as_str(), e.field.as_str()), ("services[1]", ""));
    assert!(e.reason.contains("invalid type: string"), "{e}");
    assert_eq!(
        e.to_string(),
        format!("service \"services[1]\": {}", e.reason)
    );
}

#[test]
fn service_error_display() {
    let e = reject(
        "name: web\nfrontends: [{ address: 203.0.113.20, port: 80 }]\n\
         backends: [{ address: 192.0.2.21, port: 8080 }, { address: 192.0.2.22, port: 8080, weight: 500 }]",
    );
    assert_eq!(
        e.to_string(),
        "service \"web\": backends[1].weight: must be 0..=100, got 500"
    );
}

#[test]
fn unknown_top_level_field_is_a_file_error_with_its_position() {
    let e = parse("services: []\nservics: []\n").expect_err("unknown field");
    assert_eq!(
        e.to_string(),
        "config: line 2 column 1: unknown field `servics`, expected `services`"
    );
    assert_eq!(e.position, Some(Position { line: 2, column: 1 }));
}

#[test]
fn whole_file_errors() {
    for (text, fragment) in [
        ("- name: web\n", "invalid type: sequence"),
        ("just text\n", "invalid type: string"),
        ("services: {}\n", "invalid type: map, expected a sequence"),
        ("services: web\n", "expected a sequence"),
        (
            "services: []\n---\nservices: []\n",
            "more than one document",
        ),
        ("", "empty"),
        ("# nothing but a comment\n", "empty"),
        ("~\n", "empty"),
        // YAML mapping keys are unique; serde_yaml checks that for the file.
        (
            "services:\n  - name: a\n    name: b\n",
            "services[0]: duplicate entry with key \"name\"",
        ),
        // Beyond what a YAML value holds: serde_yaml fails the whole file.
        (
            "services:\n  - { name: a, backends: [{ port: 18446744073709551616 }] }\n",
            "services[0].backends[0].port: invalid type: integer `18446744073709551616`",
        ),
    ] {
        let e = parse(text).expect_err(text);
        assert!(
            e.message.contains(fragment),
            "{text:?}: {e} lacks {fragment:?}"
        );
        assert!(e.to_string().starts_with("config: "), "{e}");
    }
}

/// Hostile files are refused whole before the YAML parser sees them: a file nested
/// deeper than 64 levels (here about 200 KB of it, in several shapes) and a file over
/// 4 MiB, even one that is otherwise valid.
#[test]
fn files_over_the_size_or_depth_limit_are_refused_before_parsing() {
    use crate::yaml_limits::Limit;
    let head = "services:\n  - name: web\n    frontends: [{ address: 203.0.113.10, port: 80 }]\n";
    let mut block = String::from(head);
    for d in 0..440 {
        block.push_str(&" ".repeat(4 + d));
        block.push_str("x:\n");
    }
    for (shape, text) in [
        (
            "flow",
            format!("{head}    backends: {}\n", "[".repeat(200_000)),
        ),
        (
            "flow mappings",
            format!("{head}    backends: {}\n", "{a: ".repeat(50_000)),
        ),
        (
            "entries",
            format!("{head}    backends:\n{}1\n", "- ".repeat(100_000)),
        ),
        ("block", block),
    ] {
        assert!(text.len() < 300_000, "{shape}: {}", text.len());
        let e = parse(&text).expect_err(shape);
        assert!(
            matches!(e.exceeded, Some(Limit::TooDeep { .. })),
            "{shape}: {e}"
        );
        assert!(
            e.to_string()
                .contains("nested deeper than the limit of 64 levels"),
            "{shape}: {e}"
        );
    }

    let big = format!("{}services: []\n", "# padding\n".repeat(420_000));
    let e = parse(&big).expect_err("over 4 MiB");
    assert_eq!(
        e.exceeded,
        Some(Limit::TooLarge { bytes: big.len() }),
        "{e}"
    );
    assert!(e.to_string().contains("size limit of 4194304 bytes"), "{e}");
}

#[test]
fn yaml_syntax_error_has_a_line_number() {
    let text = "services:\n  - name: web\n    frontends: [{ address: 203.0.113.10, port: 80 }\n    backends: []\n";
    let e = parse(text).expect_err("unclosed flow sequence");
    let position = e.position.unwrap_or_else(|| panic!("no position: {e}"));
    assert!(
        (3..=5).contains(&position.line),
        "line {}: {e}",
        position.line
    );
    let prefix = format!(
        "config: line {} column {}: ",
        position.line, position.column
    );
    assert!(e.to_string().starts_with(&prefix), "{e}");
    assert!(
        !e.message.contains(&format!("at line {}", position.line)),
        "position repeated in the message: {e}"
    );

    let e = parse("services:\n  - name: web\n   bad indent: 1\n").expect_err("bad indent");
    assert!(e.position.is_some(), "{e}");
}

#[test]
fn empty_service_list_is_fine() {
    for text in ["services: []\n", "{}\n"] {
        assert_eq!(
            parse_ok(text),
            ParsedConfig {
                services: vec![],
                rejected: vec![]
            }
        );
    }
}

const CONFLICTS: &str = "\
services:
  - name: web
    frontends: [{ address: 203.0.113.10, port: 80 }]
    backends: []
  - name: web
    frontends: [{ address: 203.0.113.11, port: 80 }]
    backends: []
  - name: api
    frontends:
      - { address: 203.0.113.12, port: 80 }
      - { address: 203.0.113.10, port: 80, protocol: TCP }
    backends: []
  - name: dns
    frontends:
      - { address: 203.0.113.10, port: 80, protocol: UDP }
      - { address: 203.0.113.12, port: 80 }
    backends: []
";

#[test]
fn cross_service_conflicts_reject_the_later_service() {
    let parsed = parse_ok(CONFLICTS);
    let names: Vec<&str> = parsed.services.iter().map(|s| s.name.as_str()).collect();
    // `api` is rejected, so 203.0.113.12:80/TCP stays free for `dns`.
    assert_eq!(names, ["web", "dns"]);
    let errors: Vec<String> = parsed.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        [
            "service \"web\": name: another service earlier in the file has this name",
            "service \"api\": frontends[1]: 203.0.113.10:80/TCP is already a frontend of service \"web\"",
        ]
    );
    assert_eq!(parsed.services[0].frontends[0].address, v4(203, 0, 113, 10));
}

#[test]
fn a_rejected_service_keeps_its_name_but_not_its_frontends() {
    let parsed = parse_ok(
        "\
services:
  - name: web
    frontends: [{ address: 203.0.113.10, port: 80 }]
    backends: [{ address: 192.0.2.11, port: 8080, weight: 500 }]
  - name: web
    frontends: [{ address: 203.0.113.11, port: 80 }]
    backends: []
  - name: api
    frontends: [{ address: 203.0.113.10, port: 80 }]
    backends: []
",
    );
    let names: Vec<&str> = parsed.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api"]);
    let fields: Vec<(&str, &str)> = parsed
        .rejected
        .iter()
        .map(|e| (e.service.as_str(), e.field.as_str()))
        .collect();
    assert_eq!(fields, [("web", "backends[0].weight"), ("web", "name")]);
}

#[test]
fn check_conflicts_matches_parse() {
    let parsed = parse_ok(CONFLICTS);
    // Accepted services pass again unchanged.
    let (accepted, rejected) = check_conflicts(parsed.services.clone());
    assert_eq!((accepted, rejected), (parsed.services.clone(), vec![]));

    // A last good version substituted in front wins over a newer service.
    let mut last_good = parsed.services[1].clone();
    last_good.name = "dns-old".to_owned();
    let mut services = vec![last_good];
    services.extend(parsed.services.iter().cloned());
    let (accepted, rejected) = check_conflicts(services);
    let names: Vec<&str> = accepted.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["dns-old", "web"]);
    assert_eq!(
        rejected
            .iter()
            .map(|e| (e.service.as_str(), e.field.as_str()))
            .collect::<Vec<_>>(),
        [("dns", "frontends[0]")]
    );

    let (accepted, rejected) = check_conflicts(vec![parsed.services[0].clone(); 2]);
    assert_eq!(accepted.len(), 1);
    assert_eq!(rejected[0].field, "name");
}

#[test]
fn names() {
    for ok in ["a", "0", "web-v6", "a-b-c", &"a".repeat(63)] {
        assert!(validate::is_valid_name(ok), "{ok:?}");
    }
    for bad in ["", "-", "a-", "-a", "A", "a_b", "a.b", "ä", &"a".repeat(64)] {
        assert!(!validate::is_valid_name(bad), "{bad:?}");
    }
}

/// A one-service file with one field set to a generated value, the field's
/// path, and whether the value is valid.
fn edited_service() -> impl Strategy<Value = (String, &'static str, bool)> {
    let int = prop_oneof![
        -5i64..=70_000,
        any::<i64>(),
        Just(i64::MAX),
        Just(0),
        Just(100),
        Just(101),
        Just(65_535)
    ];
    let duration = "[0-9]{0,6}(ns|ms|s|m|h|d|x|)( [0-9]{1,3}ms)?";
    prop_oneof![
        int.clone().prop_map(|w| (
            format!("backends: [{{ address: 192.0.2.21, port: 8080, weight: {w} }}]"),
            "backends[0].weight",
            (0..=100).contains(&w)
        )),
        int.clone().prop_map(|p| (
            format!("backends: [{{ address: 192.0.2.21, port: {p} }}]"),
            "backends[0].port",
            (1..=65_535).contains(&p)
        )),
        int.clone().prop_map(|n| (
            format!("backends: []\nhealth: {{ tcp: {{ rise: {n} }} }}"),
            "health.tcp.rise",
            (1..=100).contains(&n)
        )),
        int.prop_map(|n| (
            format!("backends: []\nmaglev: {{ tableSize: {n} }}"),
            "maglev.tableSize",
            u32::try_from(n).is_ok_and(|n| n <= maglev::MAX_TABLE_SIZE && maglev::is_prime(n))
        )),
        duration.prop_map(|d| {
            let valid = humantime::parse_duration(&d)
                .is_ok_and(|d| (MIN_INTERVAL..=MAX_INTERVAL).contains(&d));
            (
                format!("backends: []\nhealth: {{ tcp: {{ interval: '{d}', timeout: 1ns }} }}"),
                "health.tcp.interval",
                valid,
            )
        }),
        "[0-9]{1,3}(-[0-9]{1,3})?".prop_map(|e| {
            let code =
                |s: &str| s.len() == 3 && s.parse().is_ok_and(|c: u16| (100..=599).contains(&c));
            let valid = match e.split_once('-') {
                None => code(&e),
                Some((lo, hi)) => code(lo) && code(hi) && lo <= hi,
            };
            (
                format!("backends: []\nhealth: {{ http: {{ path: /, expect: '{e}' }} }}"),
                "health.http.expect",
                valid,
            )
        }),
    ]
    .prop_map(|(edit, field, valid)| {
        (
            format!("name: svc\nfrontends: [{{ address: 203.0.113.20, port: 80 }}]\n{edit}\n"),
            field,
            valid,
        )
    })
}

proptest! {
    #[test]
    fn edited_fields_are_accepted_or_named((service, field, valid) in edited_service()) {
        let text = file_with(&service);
        let parsed = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        prop_assert_eq!(&parsed.services[0].name, "neighbour");
        if valid {
            prop_assert!(parsed.rejected.is_empty(), "{:?}\n{}", parsed.rejected, text);
        } else {
            prop_assert_eq!(parsed.services.len(), 1, "{}", text);
            prop_assert_eq!(parsed.rejected.len(), 1, "{}", text);
            let e = &parsed.rejected[0];
            prop_assert_eq!((e.service.as_str(), e.field.as_str()), ("svc", field), "{}", e);
            prop_assert!(!e.reason.is_empty());
        }
    }

    /// Arbitrary damage to the example never panics; what parses accounts for
    /// every service, and every rejection names its service.
    #[test]
    fn damaged_example_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), "[ -~\n]{0,3}", 0usize..4), 1..4)
    ) {
        let mut text = EXAMPLE.to_owned();
        for (at, insert, delete) in edits {
            let mut start = at.index(text.len() + 1);
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = (start + delete).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            text.replace_range(start..end, &insert);
        }
        if let Ok(parsed) = parse(&text) {
            for e in &parsed.rejected {
                prop_assert!(!e.service.is_empty(), "{:?}", e);
                prop_assert!(!e.reason.is_empty(), "{:?}", e);
            }
            let (again, conflicts) = check_conflicts(parsed.services.clone());
            prop_assert_eq!(again, parsed.services);
            prop_assert!(conflicts.is_empty());
        }
    }
}

#[test]
fn crlf_line_endings_and_a_byte_order_mark_parse_like_the_example() {
    let crlf = format!("\u{feff}{}", EXAMPLE.replace('\n', "\r\n"));
    assert_eq!(parse_ok(&crlf), parse_ok(EXAMPLE));
}

#[test]
fn lb_mode_is_one_of_the_four_and_a_bad_one_is_named() {
    for (text, mode) in [
        ("dnat", crate::mode::LbMode::Dnat),
        ("dsr", crate::mode::LbMode::Dsr),
        ("hybrid", crate::mode::LbMode::Hybrid),
    ] {
        let service = accept(&format!(
            "name: web\nfrontends: [{{ address: 203.0.113.20, port: 80 }}]\nbackends: []\n\
             lbMode: {text}"
        ));
        assert_eq!(service.lb_mode, Some(mode));
    }
    for (mode, fragment) in [("nat", "\"nat\""), ("DSR", "\"DSR\"")] {
        let service = format!(
            "name: web\nfrontends: [{{ address: 203.0.113.20, port: 80 }}]\nbackends: []\n\
             lbMode: {mode}"
        );
        assert_eq!(
            rejection_mismatch(&service, "web", "lbMode", fragment),
            None
        );
    }
}
