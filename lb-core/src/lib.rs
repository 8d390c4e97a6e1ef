//! xlb's pure core: what the agent computes between a source and the maps, with no
//! aya, no Kubernetes client, no sockets and no unsafe code, so all of it is tested
//! without privileges.
//!
//! The flow is one way: [`cluster`] (the objects a Kubernetes source delivered) or
//! [`config`] (the YAML file) -> [`model`] (the desired state) -> [`plan`] (ordered
//! map operations against what the maps hold); [`maglev`] builds the per-service
//! lookup tables and [`routes`] the L7 hop's host and path table.
#![forbid(unsafe_code)]

pub mod address;
pub mod cluster;
pub mod config;
pub mod maglev;
pub mod mode;
pub mod model;
pub mod plan;
pub mod quote;
pub mod routes;
pub mod yaml_limits;
