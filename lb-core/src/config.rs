//! The standalone config file (YAML): what an operator writes, validated into typed
//! service specs. Parsing is pure; the file source (`source::file`) reads and watches
//! the file and keeps the last accepted version of a service whose new text is invalid.
//!
//! The format, with every field explained, is `examples/xlb.yaml`. Parsing is
//! strict: an unknown field is an error at every level, so a typo never turns
//! into a silently ignored setting. A broken file as a whole (bad YAML, an
//! unknown top-level field) is a [`FileError`]; a broken service is rejected
//! alone (a [`ServiceError`] naming the service, the field and the reason) and
//! every other service is still accepted.
//!
//! Defaults: backend weight 1; health checks every 5s with a 2s timeout (or the
//! interval, when that is shorter), 2 successes to rise and 3 failures to fall,
//! HTTP checks expecting 200-399; session affinity timeout 10800s (Kubernetes'
//! default); Maglev table size [`crate::maglev::DEFAULT_TABLE_SIZE`]; new flows to
//! a service without usable backends dropped (`whenEmpty: drop`); every client
//! admitted (no `sourceRanges`).

mod raw;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

/// Largest backend weight (weights are 0..=100).
///
/// A weight is a backend's relative share of its service's Maglev table: the
/// builder divides the weights by their gcd and gives each backend that many
/// turns per round of the fill. A share is only as fine as the table: a
/// backend gets about `M * w / W` of the `M` slots (`W` the sum of weights),
/// give or take one. The Maglev paper sizes tables at `M > 100 * N` for shares
/// within 1%, and [`crate::maglev::DEFAULT_TABLE_SIZE`] is sized that way for
/// 163 backends; with weights up to 100 the same table still gives a weight-1
/// backend next to weight-100 ones at least one slot per round (163 * 100 <
/// 16381). Ratios beyond 1:100 would need a bigger table to mean anything, and
/// the validation checks that the sum of the reduced weights fits the table
/// (so no backend with a weight is left without a slot).
pub const MAX_WEIGHT: u32 = 100;
/// Weight of a backend that does not set one.
pub const DEFAULT_WEIGHT: u32 = 1;
/// Health check interval when none is set.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Health check timeout when none is set (capped at the interval).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive successes that bring a backend back, when not set.
pub const DEFAULT_RISE: u32 = 2;
/// Consecutive failures that take a backend out, when not set.
pub const DEFAULT_FALL: u32 = 3;
/// Largest `rise` and `fall`.
pub const MAX_COUNT: u32 = 100;
/// Shortest health check interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest health check interval.
pub const MAX_INTERVAL: Duration = Duration::from_hours(1);
/// HTTP statuses that count as healthy when `expect` is not set.
pub const DEFAULT_EXPECT: (u16, u16) = (200, 399);
/// `sessionAffinity.clientIP.timeout` when not set: Kubernetes' default.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_hours(3);
/// Shortest session affinity timeout.
pub const MIN_AFFINITY_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest session affinity timeout (Kubernetes' limit).
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_hours(24);

/// A validated service, ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub frontends: Vec<FrontendSpec>,
    pub backends: Vec<BackendSpec>,
    /// Default health check for every backend that has none of its own.
    pub health: Option<HealthCheck>,
    /// `sessionAffinity.clientIP`: a client address keeps its backend while it is seen
    /// within the timeout.
    pub session_affinity: Option<SessionAffinity>,
    /// Maglev table size M (prime).
    pub maglev_table_size: u32,
    /// `whenEmpty: reject`: while no backend is usable, new connections are refused at
    /// once (TCP reset, ICMP port unreachable) instead of dropped.
    pub reject_when_empty: bool,
    /// `sourceRanges`: only clients inside one of these prefixes open new flows; empty
    /// admits everyone.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// `lbMode`: how new flows are translated; `None` takes the agent's `--lb-mode`.
    pub lb_mode: Option<crate::mode::LbMode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendSpec {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The entry only the socket hooks read, for clients inside the cluster (the
    /// node's pods and processes): `lb_common::sock::PROTO_F_IN_CLUSTER` in its key.
    /// Written by the Kubernetes translation only (kube-proxy's short-circuit of
    /// `externalTrafficPolicy: Local`); config files have none.
    pub in_cluster: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: IpAddr,
    pub port: u16,
    /// Relative Maglev weight; 0 drains the backend (no new flows, existing flows stay).
    pub weight: u32,
    /// Overrides the service's health check for this backend.
    pub health: Option<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy backend back.
    pub rise: u32,
    /// Consecutive failures that take a healthy backend out.
    pub fall: u32,
    /// Port to probe; the backend's own port when absent.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect that completes within the timeout.
    Tcp,
    /// An HTTP/1.1 GET whose status is within `expect` (inclusive).
    Http {
        path: String,
        host: Option<String>,
        expect: (u16, u16),
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionAffinity {
    pub timeout: Duration,
}

impl ServiceSpec {
    /// The health check that applies to `backend`: its own, else the
    /// service's. An override replaces the service's check as a whole.
    pub fn health_for<'a>(&'a self, backend: &'a BackendSpec) -> Option<&'a HealthCheck> {
        backend.health.as_ref().or(self.health.as_ref())
    }
}

/// A position in the config text, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The file as a whole is unusable: over a [`crate::yaml_limits`] limit (size or
/// nesting, checked before parsing), a YAML syntax error, a top level that is
/// not a mapping, an unknown top-level field, `services` that is not a list, or
/// an empty file. Nothing in it is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config: {}{message}", at_prefix(*.position))]
pub struct FileError {
    /// Where the problem is, when the YAML parser knows.
    pub position: Option<Position>,
    /// What is wrong, without the position.
    pub message: String,
    /// The limit the file broke, when that is what is wrong.
    pub exceeded: Option<crate::yaml_limits::Limit>,
}

fn at_prefix(position: Option<Position>) -> String {
    position.map_or_else(String::new, |p| {
        format!("line {} column {}: ", p.line, p.column)
    })
}

/// One rejected service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service {service:?}: {}{reason}", field_prefix(field))]
pub struct ServiceError {
    /// The service's `name`, or `services[i]` (its index in the file) when it
    /// has no valid name.
    pub service: String,
    /// Path of the offending field within the service, such as
    /// `backends[1].weight`, `health.tcp.timeout` or (an unknown field)
    /// `frontends[0].prot`; empty when the service as a whole is wrong (it is
    /// not a mapping).
    pub field: String,
    /// Why, naming the bad value where there is one.
    pub reason: String,
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

/// What a config file yields: the services that passed every check, in file
/// order, and one error per rejected service, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedConfig {
    pub services: Vec<ServiceSpec>,
    pub rejected: Vec<ServiceError>,
}

/// Parses and validates a config file's text.
///
/// Each service is checked on its own, then across services in file order: a
/// service whose name an earlier entry already uses, or that claims a frontend
/// (address, port, protocol) an earlier accepted service has, is rejected and
/// the earlier one keeps working. An earlier entry keeps its name even when it
/// is itself rejected (the file source may still run its last good version),
/// but only accepted services claim frontends. `check_conflicts` on the
/// accepted services therefore accepts all of them again.
pub fn parse(text: &str) -> Result<ParsedConfig, FileError> {
    if let Err(limit) = crate::yaml_limits::check(text) {
        return Err(FileError {
            position: None,
            message: limit.to_string(),
            exceeded: Some(limit),
        });
    }
    // An empty file is much more likely a half-written one than a wish to
    // remove every service.
    let Some(file) = serde_yaml::from_str::<Option<raw::File>>(text).map_err(|e| file_error(&e))?
    else {
        return Err(FileError {
            position: None,
            message: "the file is empty; write `services: []` for no services".to_owned(),
            exceeded: None,
        });
    };

    let mut claims = Claims::default();
    let mut parsed = ParsedConfig {
        services: Vec::new(),
        rejected: Vec::new(),
    };
    for (index, value) in file.services.into_iter().enumerate() {
        let name = usable_name(&value);
        let service = name.clone().unwrap_or_else(|| format!("services[{index}]"));
        let mut result = service_from_value(value).map_err(|e| ServiceError {
            service,
            field: e.field,
            reason: e.reason,
        });
        if let Some(name) = name
            && let Err(e) = claims.name(&name)
        {
            result = Err(e);
        }
        match result.and_then(|spec| claims.frontends(&spec).map(|()| spec)) {
            Ok(spec) => parsed.services.push(spec),
            Err(e) => parsed.rejected.push(e),
        }
    }
    Ok(parsed)
}

/// The cross-service checks of [`parse`] over services that each passed their
/// own checks (for instance accepted services mixed with the last good
/// versions of rejected ones): in order, a service that reuses an earlier
/// service's name or claims one of its frontends is rejected.
pub fn check_conflicts(services: Vec<ServiceSpec>) -> (Vec<ServiceSpec>, Vec<ServiceError>) {
    let mut claims = Claims::default();
    let mut accepted = Vec::with_capacity(services.len());
    let mut rejected = Vec::new();
    for spec in services {
        match claims
            .name(&spec.name)
            .and_then(|()| claims.frontends(&spec))
        {
            Ok(()) => accepted.push(spec),
            Err(e) => rejected.push(e),
        }
    }
    (accepted, rejected)
}

/// Names and frontends taken by earlier services.
#[derive(Default)]
struct Claims {
    names: HashSet<String>,
    frontends: HashMap<FrontendSpec, String>,
}

impl Claims {
    fn name(&mut self, name: &str) -> Result<(), ServiceError> {
        if self.names.insert(name.to_owned()) {
            Ok(())
        } else {
            Err(ServiceError {
                service: name.to_owned(),
                field: "name".to_owned(),
                reason: "another service earlier in the file has this name".to_owned(),
            })
        }
    }

    /// Claims all of `spec`'s frontends, or none when one is taken.
    fn frontends(&mut self, spec: &ServiceSpec) -> Result<(), ServiceError> {
        for (i, f) in spec.frontends.iter().enumerate() {
            if let Some(owner) = self.frontends.get(f) {
                return Err(ServiceError {
                    service: spec.name.clone(),
                    field: format!("frontends[{i}]"),
                    reason: format!(
                        "{} is already a frontend of service {owner:?}",
                        validate::frontend_text(f)
                    ),
                });
            }
        }
        for f in &spec.frontends {
            self.frontends.insert(*f, spec.name.clone());
        }
        Ok(())
    }
}

/// The service's `name` when it is a valid one, read before the service is
/// deserialized so that even a service with a type error is named.
fn usable_name(value: &serde_yaml::Value) -> Option<String> {
    value
        .get("name")
        .and_then(serde_yaml::Value::as_str)
        .filter(|n| validate::is_valid_name(n))
        .map(str::to_owned)
}

fn service_from_value(mut value: serde_yaml::Value) -> Result<ServiceSpec, validate::Invalid> {
    // `<<: *anchor` merge keys, so services can share settings.
    value.apply_merge().map_err(|e| validate::Invalid {
        field: String::new(),
        reason: e.to_string(),
    })?;
    let raw: raw::Service = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        validate::Invalid {
            field: if path == "." { String::new() } else { path },
            reason: e.into_inner().to_string(),
        }
    })?;
    validate::service(raw)
}

/// A whole-file error with the position split out of `serde_yaml`'s message.
fn file_error(error: &serde_yaml::Error) -> FileError {
    let position = error.location().map(|l| Position {
        line: l.line(),
        column: l.column(),
    });
    let mut message = error.to_string();
    if let Some(p) = position {
        message = message.replacen(&format!(" at line {} column {}", p.line, p.column), "", 1);
    }
    FileError {
        position,
        message,
        exceeded: None,
    }
}
