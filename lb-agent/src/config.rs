//! The standalone config file (YAML): what an operator writes, validated into typed
//! service specs. Parsing is pure; the file source (`source::file`) reads and watches
//! the file and keeps the last accepted version of a service whose new text is invalid.
//!
//! SKELETON: types only; parsing and validation are being written.

use std::net::IpAddr;
use std::time::Duration;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendSpec {
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
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
    /// The health check that applies to `backend`: its own, else the service's.
    pub fn health_for<'a>(&'a self, backend: &'a BackendSpec) -> Option<&'a HealthCheck> {
        backend.health.as_ref().or(self.health.as_ref())
    }
}

// STUB until the parser lands (branch wip-config).
#[derive(Debug, thiserror::Error)]
#[error("config: {0}")]
pub struct FileError(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service \"{service}\": {field}: {reason}")]
pub struct ServiceError {
    pub service: String,
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct ParsedConfig {
    pub services: Vec<ServiceSpec>,
    pub rejected: Vec<ServiceError>,
}

pub fn parse(_text: &str) -> Result<ParsedConfig, FileError> {
    Err(FileError("parser not merged yet".into()))
}

pub fn check_conflicts(services: Vec<ServiceSpec>) -> (Vec<ServiceSpec>, Vec<ServiceError>) {
    (services, Vec::new())
}
