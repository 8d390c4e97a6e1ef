//! The file's shape as serde sees it: strict (`deny_unknown_fields` everywhere),
//! loosely typed where validation gives a better message than serde would
//! (numbers are [`Int`] so that `port: 70000` is reported as out of range rather
//! than as "expected u16"; addresses and durations are text).

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use std::fmt;

/// The top level. Services are kept as YAML values so that each one is
/// deserialized on its own and a bad one is rejected alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a mapping with `services`")]
pub(super) struct File {
    #[serde(default)]
    pub services: Vec<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[serde(expecting = "a service mapping with `name`, `frontends` and `backends`")]
pub(super) struct Service {
    pub name: Option<String>,
    #[serde(default)]
    pub frontends: Vec<Frontend>,
    /// Required, so that a service without backends is written on purpose
    /// (`backends: []`).
    pub backends: Option<Vec<Backend>>,
    pub health: Option<Health>,
    pub session_affinity: Option<SessionAffinity>,
    pub maglev: Option<Maglev>,
    pub when_empty: Option<WhenEmpty>,
    /// CIDRs as written; parsed by validation so the message names the bad one.
    pub source_ranges: Option<Vec<String>>,
    /// `snat` or `dnat` as written; parsed by validation (which names dsr/hybrid).
    pub lb_mode: Option<String>,
}

/// What new flows meet while the service has no usable backend.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum WhenEmpty {
    Drop,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a frontend mapping, such as { address: 203.0.113.10, port: 80 }")]
pub(super) struct Frontend {
    pub address: String,
    pub port: Int,
    pub protocol: Option<Protocol>,
}

/// Kubernetes' spelling.
#[derive(Debug, Clone, Copy, Deserialize)]
pub(super) enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a backend mapping, such as { address: 192.0.2.11, port: 8080 }")]
pub(super) struct Backend {
    pub address: String,
    pub port: Int,
    pub weight: Option<Int>,
    pub health: Option<Health>,
}

/// Exactly one of the two must be present. A present key with an empty value
/// (`tcp:` or `tcp: {}`) selects that probe with every setting at its default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a mapping with `tcp` or `http`")]
pub(super) struct Health {
    #[serde(default, deserialize_with = "null_as_default")]
    pub tcp: Option<TcpCheck>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub http: Option<HttpCheck>,
}

/// Settings every probe has.
#[derive(Debug, Default)]
pub(super) struct Timing<'a> {
    pub interval: Option<&'a DurationText>,
    pub timeout: Option<&'a DurationText>,
    pub rise: Option<Int>,
    pub fall: Option<Int>,
    pub port: Option<Int>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a mapping of tcp check settings")]
pub(super) struct TcpCheck {
    pub interval: Option<DurationText>,
    pub timeout: Option<DurationText>,
    pub rise: Option<Int>,
    pub fall: Option<Int>,
    pub port: Option<Int>,
}

impl TcpCheck {
    pub fn timing(&self) -> Timing<'_> {
        Timing {
            interval: self.interval.as_ref(),
            timeout: self.timeout.as_ref(),
            rise: self.rise,
            fall: self.fall,
            port: self.port,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a mapping of http check settings with `path`")]
pub(super) struct HttpCheck {
    /// Required; checked by validation, so that `http:` alone gets the same
    /// message as a mapping without it.
    pub path: Option<String>,
    pub host: Option<String>,
    pub expect: Option<StatusText>,
    pub interval: Option<DurationText>,
    pub timeout: Option<DurationText>,
    pub rise: Option<Int>,
    pub fall: Option<Int>,
    pub port: Option<Int>,
}

impl HttpCheck {
    pub fn timing(&self) -> Timing<'_> {
        Timing {
            interval: self.interval.as_ref(),
            timeout: self.timeout.as_ref(),
            rise: self.rise,
            fall: self.fall,
            port: self.port,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a mapping with `clientIP`")]
pub(super) struct SessionAffinity {
    #[serde(rename = "clientIP", default, deserialize_with = "null_as_default")]
    pub client_ip: Option<ClientIp>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(expecting = "a mapping with an optional `timeout`")]
pub(super) struct ClientIp {
    pub timeout: Option<DurationText>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[serde(expecting = "a mapping with `tableSize`")]
pub(super) struct Maglev {
    pub table_size: Option<Int>,
}

/// For a key that is present, a null value means all defaults; an absent key
/// stays `None` through `#[serde(default)]`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(|v| Some(v.unwrap_or_default()))
}

/// A humantime duration as written (`"5s"`, `"500ms"`); parsed by validation so
/// that the message can name the bad text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration with a unit, such as "5s" or "500ms""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

/// An HTTP status range as written: `"200-399"` or `"200"`, or the plain
/// number `200` (which YAML reads as an integer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StatusText(pub String);

impl<'de> Deserialize<'de> for StatusText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = StatusText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a status code or range, such as "200" or "200-399""#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusText, E> {
                Ok(StatusText(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusText, E> {
                Ok(StatusText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusText, E> {
                Ok(StatusText(v.to_string()))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

/// An integer as written, wide enough for any YAML integer, range-checked by
/// validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Int(pub i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Integer;
        impl Visitor<'_> for Integer {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
        }
        deserializer.deserialize_any(Integer)
    }
}
