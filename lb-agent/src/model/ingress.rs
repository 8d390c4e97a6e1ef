//! Ingresses to the L7 hop's [`Snapshot`](crate::l7::Snapshot): pure translation from the
//! cluster index (Ingresses of our class, their Services, EndpointSlices and TLS Secrets).
//!
//! PLACEHOLDER: the signature is the contract; the translation lands with the routing work.

use crate::l7::Snapshot;
use crate::model::kubernetes::Problem;
use crate::source::cluster::{Cluster, ObjectKey};

/// The controller name an IngressClass must carry in `spec.controller` to be ours.
pub const CONTROLLER: &str = "xlb.dev/ingress-controller";

/// Which Ingresses are ours.
#[derive(Debug, Clone)]
pub struct IngressClassConfig {
    /// The IngressClass name (`--l7-ingress-class`, default `xlb`).
    pub name: String,
}

#[derive(Debug, Default)]
pub struct IngressTranslation {
    pub snapshot: Snapshot,
    pub problems: Vec<Problem>,
    /// The Ingresses of our class: the ones whose status the agent keeps.
    pub owned: Vec<ObjectKey>,
}

pub fn translate(_cluster: &Cluster, _class: &IngressClassConfig) -> IngressTranslation {
    IngressTranslation::default()
}
