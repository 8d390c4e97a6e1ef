//! The desired state: services as the data plane should serve them, whatever source
//! they came from (config file today, Kubernetes later). Pure data; `plan` turns the
//! difference between this and what the maps hold into writes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::config::{FrontendSpec, ServiceSpec};
use crate::mode::LbMode;

#[cfg(test)]
pub(crate) mod fixtures;
pub mod ingress;
pub mod kubernetes;
pub mod translator;

/// A backend's identity within a service: its address and port. Its text form
/// (`192.0.2.11:8080`, `[2001:db8::11]:8080`) is the Maglev identity, so every agent
/// that sees the same backends builds the same table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.addr, self.port).fmt(f)
    }
}

/// What health checking says about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No health check configured: always used.
    Unchecked,
    Up,
    /// Out of the table and of the backend array: its flows are re-selected.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendModel {
    /// Maglev weight; 0 = drained (kept for established flows, no new ones).
    pub weight: u32,
    pub health: Health,
    /// Runs on this node (its EndpointSlice endpoint's `nodeName`): never source-NATed, its
    /// replies translated back on their way out of the node.
    pub local: bool,
}

impl BackendModel {
    /// Established flows may keep using it.
    pub fn forwarding(&self) -> bool {
        self.health != Health::Down
    }

    /// New flows may be given to it.
    pub fn selectable(&self) -> bool {
        self.forwarding() && self.weight > 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceModel {
    pub frontends: BTreeSet<FrontendSpec>,
    pub backends: BTreeMap<Endpoint, BackendModel>,
    /// Session affinity by client address, in seconds.
    pub affinity_timeout_s: Option<u32>,
    pub table_size: u32,
    /// What a new flow meets when no backend is selectable.
    pub when_empty: WhenEmpty,
    /// Client prefixes allowed to open flows (Kubernetes `loadBalancerSourceRanges`);
    /// empty allows every client. Others are dropped and counted.
    pub source_ranges: Vec<ipnet::IpNet>,
    /// New flows to backends on other nodes leave with this node's address and a port
    /// it allocates (SNAT mode); otherwise only the destination is rewritten.
    pub snat: bool,
    /// New flows to backends on other nodes go there untranslated, encapsulated (DSR
    /// mode). With `snat` too (a config file service in hybrid mode with TCP and UDP
    /// frontends): DSR for its TCP frontends, SNAT for its UDP ones.
    pub dsr: bool,
}

/// A service's answer to new flows while it has no selectable backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WhenEmpty {
    /// Drop silently (the client retries until its timeout).
    #[default]
    Drop,
    /// Refuse at once, as kube-proxy's REJECT: TCP RST for TCP, ICMP port unreachable
    /// for UDP.
    Reject,
}

impl ServiceModel {
    /// True when no backend can take a new flow (none configured, all down or drained).
    pub fn has_no_backends(&self) -> bool {
        !self.backends.values().any(BackendModel::selectable)
    }
}

/// Every service by name. Models are shared (`Arc`): a source that changes one service
/// keeps the others' pointers, which lets the planner skip them without comparing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<String, Arc<ServiceModel>>,
    /// The node's SNAT source addresses as the Kubernetes sources know them (at most
    /// one per family: `--node-address`, else the Node object's InternalIP, else its
    /// ExternalIP); `None` when the source has no say (a config file: the agent keeps
    /// the flags and the interfaces' addresses it started with).
    pub snat_addresses: Option<Vec<std::net::IpAddr>>,
}

/// Services by name, each model in its own `Arc`; a later name replaces an earlier one.
impl<'a> FromIterator<(&'a str, ServiceModel)> for Desired {
    fn from_iter<I: IntoIterator<Item = (&'a str, ServiceModel)>>(services: I) -> Self {
        Desired {
            services: services
                .into_iter()
                .map(|(name, model)| (name.to_owned(), Arc::new(model)))
                .collect(),
            snat_addresses: None,
        }
    }
}

/// Builds the desired state from validated specs. `health` answers for backends that
/// have a health check (service name, endpoint); the others are `Unchecked`. A spec
/// without `lbMode` gets `default_mode` (`--lb-mode`).
pub fn from_specs(
    specs: &[ServiceSpec],
    default_mode: LbMode,
    health: impl Fn(&str, Endpoint) -> Health,
) -> Desired {
    let services = specs
        .iter()
        .map(|spec| {
            let backends = spec
                .backends
                .iter()
                .map(|b| {
                    let endpoint = Endpoint {
                        addr: b.address,
                        port: b.port,
                    };
                    let state = if spec.health_for(b).is_some() {
                        health(&spec.name, endpoint)
                    } else {
                        Health::Unchecked
                    };
                    (
                        endpoint,
                        BackendModel {
                            weight: b.weight,
                            health: state,
                            local: false,
                        },
                    )
                })
                .collect();
            let model = ServiceModel {
                frontends: spec.frontends.iter().copied().collect(),
                backends,
                affinity_timeout_s: spec
                    .session_affinity
                    .map(|a| u32::try_from(a.timeout.as_secs()).unwrap_or(u32::MAX)),
                table_size: spec.maglev_table_size,
                when_empty: if spec.reject_when_empty {
                    WhenEmpty::Reject
                } else {
                    WhenEmpty::Drop
                },
                source_ranges: spec.source_ranges.clone(),
                snat: matches!(
                    spec.lb_mode.unwrap_or(default_mode),
                    LbMode::Snat | LbMode::Hybrid
                ),
                dsr: matches!(
                    spec.lb_mode.unwrap_or(default_mode),
                    LbMode::Dsr | LbMode::Hybrid
                ),
            };
            (spec.name.clone(), Arc::new(model))
        })
        .collect();
    Desired {
        services,
        snat_addresses: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendSpec, HealthCheck, Probe, Protocol, SessionAffinity};
    use std::time::Duration;

    fn spec() -> ServiceSpec {
        let check = HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 2,
            port: None,
        };
        ServiceSpec {
            name: "web".into(),
            frontends: vec![FrontendSpec {
                address: "203.0.113.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                in_cluster: false,
            }],
            backends: vec![
                BackendSpec {
                    address: "192.0.2.11".parse().unwrap(),
                    port: 8080,
                    weight: 1,
                    health: None,
                },
                BackendSpec {
                    address: "192.0.2.12".parse().unwrap(),
                    port: 8080,
                    weight: 2,
                    health: Some(check),
                },
            ],
            health: None,
            session_affinity: Some(SessionAffinity {
                timeout: Duration::from_hours(3),
            }),
            maglev_table_size: 251,
            reject_when_empty: true,
            source_ranges: vec!["198.51.100.0/24".parse().unwrap()],
            lb_mode: None,
        }
    }

    #[test]
    fn health_applies_only_to_checked_backends() {
        let desired = from_specs(&[spec()], LbMode::Snat, |_, _| Health::Down);
        let web = &desired.services["web"];
        let states: Vec<Health> = web.backends.values().map(|b| b.health).collect();
        assert_eq!(states, [Health::Unchecked, Health::Down]);
        assert_eq!(web.affinity_timeout_s, Some(10_800));
        assert_eq!(web.when_empty, WhenEmpty::Reject);
        assert_eq!(web.source_ranges, ["198.51.100.0/24".parse().unwrap()]);
        assert!(!web.has_no_backends(), "the unchecked backend still serves");
    }

    #[test]
    fn all_down_or_drained_means_no_backends() {
        let mut s = spec();
        s.backends[0].weight = 0;
        let desired = from_specs(&[s], LbMode::Snat, |_, _| Health::Down);
        assert!(desired.services["web"].has_no_backends());
    }

    #[test]
    fn endpoint_text_is_the_socket_address() {
        let v6 = Endpoint {
            addr: "2001:db8:b::11".parse().unwrap(),
            port: 8080,
        };
        assert_eq!(v6.to_string(), "[2001:db8:b::11]:8080");
    }
}
