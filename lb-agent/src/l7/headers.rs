//! Headers the proxy rewrites between client and backend: hop-by-hop headers removed
//! both ways (RFC 9110 7.6.1), forwarding headers added so backends see the real
//! client, and a request id for tracing a request across hops.

use std::net::{IpAddr, SocketAddr};

use hyper::HeaderMap;
use hyper::header::{self, HeaderName, HeaderValue};

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one connection, never the message (RFC 9110 7.6.1, plus the
/// non-standard `Proxy-Connection` and `Keep-Alive` that clients still send, and
/// `HTTP2-Settings`, connection-specific by RFC 7540 3.2.1).
/// Names, not strings: removing by a string parses it again on every call.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Drops the `h2c` protocol from `Upgrade` (the header goes when nothing else is
/// left), as nginx ignores it: switching a client connection to HTTP/2 behind the
/// proxy's back would tunnel its requests past routing. The request then goes on as
/// plain HTTP/1.1 (`HTTP2-Settings` is hop-by-hop and removed with the others).
pub fn refuse_h2c_upgrade(headers: &mut HeaderMap) {
    let is_h2c = |t: &str| t.trim().eq_ignore_ascii_case("h2c");
    let asks_h2c = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| v.split(',').any(is_h2c)));
    if !asks_h2c {
        return;
    }
    let others: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|t| !is_h2c(t) && !t.trim().is_empty())
        .map(str::trim)
        .collect();
    let rest = (!others.is_empty())
        .then(|| HeaderValue::from_str(&others.join(", ")).ok())
        .flatten();
    match rest {
        Some(value) => headers.insert(header::UPGRADE, value),
        None => headers.remove(header::UPGRADE),
    };
}

/// Whether the comma-separated list in header `name` holds `token` (in any case), as
/// `Connection: close` or `TE: trailers`.
pub fn lists_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| value_lists(v, token))
}

/// The length a `Content-Length` value states (surrounding whitespace allowed), as
/// both sides of the hop read it from answers.
pub fn content_length(value: &HeaderValue) -> Option<u64> {
    value.to_str().ok().and_then(|v| v.trim().parse().ok())
}

/// Whether one comma-separated header value lists `token` (case-insensitive).
pub fn value_lists(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Removes hop-by-hop headers and those named in `Connection`. An upgrade keeps
/// `Connection: upgrade` and `Upgrade` (they are the point of the message), and
/// `TE: trailers` survives because gRPC over h2c requires it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none: one pass over their few names costs less than hashing
    // every hop-by-hop name to look it up. (Without them there is no `Connection`
    // naming others, no `TE`, and no `Upgrade` to keep.)
    if !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let upgrade_value = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    let trailers = lists_token(headers, &header::TE, "trailers");
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(value) = upgrade_value {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, value);
    }
}

/// Whether `host` is a valid `Host` value (RFC 9110 7.2: `uri-host [ ":" port ]`): a
/// bracketed IP literal or a non-empty reg-name / IPv4 address, then an optional port
/// of digits. No user info, no spaces, not empty.
pub fn valid_host(host: &str) -> bool {
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        let Some((literal, after)) = rest.split_once(']') else {
            return false;
        };
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(digits);
        return port_ok
            && !literal.is_empty()
            && literal.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b':' | b'.' | b'%' | b'-' | b'_' | b'~')
            });
    }
    let (name, port) = host.rsplit_once(':').unwrap_or((host, ""));
    !name.is_empty()
        && digits(port)
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

/// Which `X-Forwarded-*` headers from clients are believed: ingress-nginx's ConfigMap
/// keys of the same names, as agent flags. [`Default`]: neither, as in ingress-nginx.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardedTrust {
    /// `use-forwarded-headers` (`--l7-use-forwarded-headers`): the hop sits behind
    /// another proxy, so the client is the first address of `X-Forwarded-For` (for the
    /// source ranges, limits and `X-Real-IP`), and `X-Forwarded-Proto`, `-Host` and
    /// `-Port` pass on as the client sent them. Off: all of them describe this hop.
    pub use_forwarded_headers: bool,
    /// `compute-full-forwarded-for` (`--l7-compute-full-forwarded-for`): the
    /// connection's address is appended to the client's `X-Forwarded-For`; off: the
    /// header is replaced by the client address.
    pub compute_full_forwarded_for: bool,
}

/// The client's address: the connection's, or with `use-forwarded-headers` the
/// `X-Forwarded-For` address nginx's realip module takes when every hop is trusted
/// (`real_ip_recursive on`, `proxy-real-ip-cidr` 0.0.0.0/0): the leftmost of the
/// addresses that parse from the right.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trust: ForwardedTrust) -> IpAddr {
    if !trust.use_forwarded_headers {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for item in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        match item.trim().parse::<IpAddr>() {
            Ok(ip) => client = ip,
            Err(_) => break,
        }
    }
    client
}

/// A connection's forwarding header values, formatted once when it is accepted rather
/// than for each of its requests.
#[derive(Debug, Clone)]
pub struct PeerValues {
    /// The connection's address in canonical form (IPv4-mapped IPv6 as IPv4).
    ip: HeaderValue,
    /// The port of the listener the client reached.
    port: HeaderValue,
}

impl PeerValues {
    pub fn new(peer: IpAddr, port: u16) -> PeerValues {
        let ip = match peer.to_canonical() {
            IpAddr::V4(v4) => {
                let (text, len) = ipv4_text(v4);
                HeaderValue::from_bytes(&text[..len])
            }
            v6 @ IpAddr::V6(_) => {
                HeaderValue::from_maybe_shared(bytes::Bytes::from(v6.to_string()))
            }
        };
        PeerValues {
            ip: ip.expect("an IP address is a valid header value"),
            port: HeaderValue::from(port),
        }
    }
}

/// An IPv4 address in dotted decimal, written digit by digit: `to_string` goes
/// through the formatter four times and grows its string twice, a few hundred
/// nanoseconds of each new connection.
fn ipv4_text(addr: std::net::Ipv4Addr) -> ([u8; 15], usize) {
    let (mut out, mut len) = ([0u8; 15], 0);
    let mut push = |byte: u8| {
        out[len] = byte;
        len += 1;
    };
    for (i, octet) in addr.octets().into_iter().enumerate() {
        if i > 0 {
            push(b'.');
        }
        if octet >= 100 {
            push(b'0' + octet / 100);
        }
        if octet >= 10 {
            push(b'0' + octet / 10 % 10);
        }
        push(b'0' + octet % 10);
    }
    (out, len)
}

/// What the backend learns about the hop in front of it.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// The connection's address.
    pub peer: SocketAddr,
    /// `peer`, and the port of the listener the client reached, as header values.
    pub values: &'a PeerValues,
    /// `http` or `https`.
    pub proto: &'static str,
    /// The Host the client asked for (with its port, as sent).
    pub host: &'a str,
    pub trust: ForwardedTrust,
}

/// Adds `X-Forwarded-*`, `X-Real-IP` and `X-Request-Id` as ingress-nginx does:
/// `X-Forwarded-For` is the client address (appended to what the client sent with
/// `compute-full-forwarded-for`), the others describe this hop unless
/// `use-forwarded-headers` lets the client's through; a request without an
/// `X-Request-Id` gets a new one.
pub fn add_forwarding(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    let client = client_ip(headers, fwd.peer.ip(), fwd.trust);
    let client_value = if client == fwd.peer.ip() {
        Some(fwd.values.ip.clone())
    } else {
        HeaderValue::from_str(&client.to_canonical().to_string()).ok()
    };
    let xff_value = if fwd.trust.compute_full_forwarded_for {
        let peer = fwd.values.ip.to_str().unwrap_or_default().to_owned();
        let previous: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let xff = if previous.is_empty() {
            peer
        } else {
            format!("{}, {peer}", previous.join(", "))
        };
        HeaderValue::from_str(&xff).ok()
    } else {
        // Shared with `X-Real-IP`, not copied.
        client_value.clone()
    };
    if let Some(value) = xff_value {
        headers.insert(X_FORWARDED_FOR, value);
    }
    let keep = |headers: &HeaderMap, name: &HeaderName| {
        fwd.trust.use_forwarded_headers && headers.get(name).is_some_and(|v| !v.is_empty())
    };
    if !keep(headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(fwd.proto));
    }
    if !keep(headers, &X_FORWARDED_HOST) {
        // The client's Host, shared rather than copied, when the host came from it.
        let value = match headers.get(header::HOST) {
            Some(host) if host.as_bytes() == fwd.host.as_bytes() => Ok(host.clone()),
            _ => HeaderValue::from_str(fwd.host),
        };
        if let Ok(value) = value {
            headers.insert(X_FORWARDED_HOST, value);
        }
    }
    if !keep(headers, &X_FORWARDED_PORT) {
        headers.insert(X_FORWARDED_PORT, fwd.values.port.clone());
    }
    if let Some(value) = client_value {
        headers.insert(X_REAL_IP, value);
    }
    // The client's id when it sent one (its first, if several), else a new one.
    let mut ids = headers.get_all(&X_REQUEST_ID).iter();
    let id = match (ids.next(), ids.next()) {
        (Some(id), None) if !id.is_empty() => return,
        (Some(id), _) if !id.is_empty() => id.clone(),
        _ => new_request_id(),
    };
    headers.insert(X_REQUEST_ID, id);
}

/// 32 hex characters (128 random bits), the form ingress-nginx generates.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let mut id = [0u8; 32];
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[usize::try_from((bits >> (124 - 4 * i)) & 0xf).unwrap_or(0)];
    }
    HeaderValue::from_bytes(&id).expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_text_is_the_dotted_decimal_to_string_writes() {
        for octet in 0..=255u8 {
            let addr = std::net::Ipv4Addr::new(octet, 255 - octet, octet / 7, octet % 10);
            let (text, len) = ipv4_text(addr);
            assert_eq!(&text[..len], addr.to_string().as_bytes());
        }
        let mapped = IpAddr::V6(std::net::Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped());
        assert_eq!(PeerValues::new(mapped, 80).ip, "192.0.2.10");
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(PeerValues::new(v6, 443).ip, "2001:db8::1");
        assert_eq!(PeerValues::new(v6, 443).port, "443");
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn validates_hosts() {
        for ok in [
            "a.example",
            "A.example:8080",
            "192.0.2.1",
            "192.0.2.1:80",
            "[2001:db8::1]",
            "[2001:db8::1]:443",
            "a.example:",
            "xn--bcher-kva.example",
        ] {
            assert!(valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a.example:80a",
            "user@a.example",
            ":80",
            "[2001:db8::1",
            "[]",
            "a/b",
            "a.example:80:80",
            "a\tb",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn refuses_h2c_upgrades_and_keeps_others() {
        let settings = HeaderValue::from_static("AAMAAABkAARAAAAAAAIAAAAA");
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert("upgrade", HeaderValue::from_static("H2C"));
        h.insert("http2-settings", settings.clone());
        refuse_h2c_upgrade(&mut h);
        assert!(!h.contains_key("upgrade"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
        // Settings that Connection does not name still go, upgrade or not.
        let mut h = HeaderMap::new();
        h.insert("http2-settings", settings);
        strip_hop_by_hop(&mut h, true);
        assert!(h.is_empty(), "{h:?}");
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("h2c, websocket"));
        refuse_h2c_upgrade(&mut h);
        assert_eq!(h["upgrade"], "websocket");
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        refuse_h2c_upgrade(&mut h);
        assert_eq!(h["upgrade"], "websocket");
    }

    #[test]
    fn keeps_upgrade_and_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["te"], "trailers");
    }

    fn forwarded(trust: ForwardedTrust) -> Forwarded<'static> {
        let peer: SocketAddr = "[::ffff:198.51.100.1]:4000".parse().unwrap();
        let values = Box::leak(Box::new(PeerValues::new(peer.ip(), 8443)));
        Forwarded {
            peer,
            values,
            proto: "https",
            host: "a.example:8443",
            trust,
        }
    }

    fn from_client() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("198.51.100.7, garbage"),
        );
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("198.51.100.8, 198.51.100.9"),
        );
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        h.insert(X_FORWARDED_HOST, HeaderValue::from_static("outer.example"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc"));
        h
    }

    /// ingress-nginx's default: the client's X-Forwarded-* are replaced.
    #[test]
    fn by_default_forwarding_headers_describe_this_hop() {
        let mut h = from_client();
        add_forwarding(&mut h, &forwarded(ForwardedTrust::default()));
        assert_eq!(h[X_REQUEST_ID], "abc");
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.1");
        assert_eq!(h[X_REAL_IP], "198.51.100.1");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "a.example:8443");
        assert_eq!(h[X_FORWARDED_PORT], "8443");
    }

    #[test]
    fn use_forwarded_headers_trusts_the_client_chain() {
        let trust = ForwardedTrust {
            use_forwarded_headers: true,
            compute_full_forwarded_for: false,
        };
        let mut h = from_client();
        // From the right, the first address that does not parse stops the walk.
        let peer = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(&h, peer, trust),
            "198.51.100.8".parse::<IpAddr>().unwrap()
        );
        add_forwarding(&mut h, &forwarded(trust));
        assert_eq!(h[X_FORWARDED_FOR], "198.51.100.8");
        assert_eq!(h[X_REAL_IP], "198.51.100.8");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "outer.example");
        // Not sent by the client: this hop's.
        assert_eq!(h[X_FORWARDED_PORT], "8443");
        // Without the header the connection's address.
        assert_eq!(client_ip(&HeaderMap::new(), peer, trust), peer);
    }

    #[test]
    fn compute_full_forwarded_for_appends_the_connection() {
        for use_forwarded_headers in [false, true] {
            let trust = ForwardedTrust {
                use_forwarded_headers,
                compute_full_forwarded_for: true,
            };
            let mut h = from_client();
            add_forwarding(&mut h, &forwarded(trust));
            assert_eq!(
                h[X_FORWARDED_FOR],
                "198.51.100.7, garbage, 198.51.100.8, 198.51.100.9, 198.51.100.1"
            );
            let real = if use_forwarded_headers {
                "198.51.100.8"
            } else {
                "198.51.100.1"
            };
            assert_eq!(h[X_REAL_IP], real);
        }
    }

    #[test]
    fn generates_request_ids() {
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.to_str().unwrap().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_request_id());
    }
}
