//! xlb agent library: turns desired services into BPF map contents.
pub mod admin;
pub mod agent;
pub mod capabilities;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod demo;
pub mod frames;
pub mod health;
pub mod l7;
pub mod maglev;
pub mod model;
pub mod plan;
pub mod service_health;
pub mod source;
pub mod status;
pub mod testbed;
