//! The shipped xlb agent: sources (config file, manifests, Kubernetes) feed the pure
//! core (`lb_core`: model, Maglev, plan), one agent loop hands the plan to the data-plane
//! writer (the only code that imports aya), and the optional L7 hop serves HTTP(S).
//! `kube_writes` is the only code that writes to Kubernetes.
pub mod admin;
pub mod agent;
pub mod capabilities;
pub mod cli;
pub mod dataplane;
pub mod health;
pub mod ingress_check;
pub mod kube_writes;
pub mod l7;
pub mod metrics;
pub mod service_health;
pub mod source;
pub mod status;
pub mod trace;
