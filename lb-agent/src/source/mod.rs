//! Where services come from. Sources never touch maps: the file source produces
//! validated specs, the Kubernetes sources (`kube`, `manifests`) produce cluster
//! objects; the model turns either into the desired state.

pub mod file;
pub mod kube;
pub mod manifests;
