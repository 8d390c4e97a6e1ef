//! Keeps the desired state in step with the cluster one change at a time: a change
//! translates again only the Services it touches, so one EndpointSlice update among
//! 10,000 Services costs one Service's work.
//!
//! It also settles frontends that two Services claim (the same address, port and
//! protocol, e.g. a shared externalIP): the Service whose `namespace/name` sorts first
//! serves it, the other is told by a [`Problem`]. Deterministic, unlike kube-proxy,
//! whose rule order decides.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::Desired;
use super::kubernetes::{
    HealthCheckPort, NodeInfo, Problem, Translation, frontend_text, translate,
};
use crate::cluster::{Cluster, Dirty, Kind, ObjectKey};
use crate::config::FrontendSpec;
use crate::mode::LbMode;

/// What an update produced besides the new desired state.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The desired state changed.
    pub changed: bool,
    /// Problems that appeared with this update (each is reported once while it lasts).
    pub problems: Vec<Problem>,
    pub notes: Vec<String>,
}

#[derive(Debug, Default)]
pub struct Translator {
    node_name: Option<String>,
    node_flags: Vec<IpAddr>,
    node: NodeInfo,
    raw: BTreeMap<ObjectKey, Translation>,
    claims: BTreeMap<FrontendSpec, BTreeSet<ObjectKey>>,
    /// Frontends each Service lost to another, as problems, so each is reported once
    /// while it lasts (and again if it comes back).
    conflicts: BTreeMap<ObjectKey, BTreeSet<Problem>>,
}

impl Translator {
    /// `node_name` selects the Node object and local endpoints; `node_flags`, when not
    /// empty, replace the Node object's addresses for NodePorts.
    pub fn new(node_name: Option<String>, node_flags: Vec<IpAddr>) -> Self {
        Translator {
            node: NodeInfo::resolve(node_name.as_deref(), &node_flags, None),
            node_name,
            node_flags,
            ..Translator::default()
        }
    }

    /// Services without `xlb.dev/lb-mode` get `mode` (`--lb-mode`).
    #[must_use]
    pub fn with_lb_mode(mut self, mode: LbMode) -> Self {
        self.node.lb_mode = mode;
        self
    }

    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Translates the Services `dirty` names (all of them for `Dirty::All`) and
    /// applies the result to `desired`.
    pub fn update(&mut self, cluster: &Cluster, dirty: Dirty, desired: &mut Desired) -> Outcome {
        let mut outcome = Outcome::default();
        let keys: BTreeSet<ObjectKey> = match dirty {
            Dirty::None => return outcome,
            Dirty::Services(keys) => keys,
            Dirty::All => {
                outcome.changed |= self.resolve_node(cluster, desired);
                cluster
                    .services
                    .keys()
                    .chain(self.raw.keys())
                    .cloned()
                    .collect()
            }
        };
        let mut affected = BTreeSet::new();
        // Models the dirty Services had; those they no longer have are removed at the end
        // (removing all first would make an unchanged model look changed).
        let mut stale = BTreeSet::new();
        for key in keys {
            let mut old_problems = Vec::new();
            if let Some(old) = self.raw.remove(&key) {
                stale.extend(old.services.keys().cloned());
                for frontend in frontends(&old) {
                    if let Some(owners) = self.claims.get_mut(&frontend) {
                        owners.remove(&key);
                        affected.extend(owners.iter().cloned());
                        if owners.is_empty() {
                            self.claims.remove(&frontend);
                        }
                    }
                }
                old_problems = old.problems;
            }
            if let Some(svc) = cluster.services.get(&key) {
                let translation = translate(svc, &cluster.slices_of(&key), &self.node);
                for frontend in frontends(&translation) {
                    let owners = self.claims.entry(frontend).or_default();
                    affected.extend(owners.iter().cloned());
                    owners.insert(key.clone());
                }
                outcome.notes.extend(translation.notes.iter().cloned());
                // A problem is reported when it appears, not on every translation.
                for problem in &translation.problems {
                    if !old_problems.contains(problem) {
                        outcome.problems.push(problem.clone());
                    }
                }
                self.raw.insert(key.clone(), translation);
            }
            affected.insert(key);
        }
        for key in affected {
            let mut conflicts = BTreeSet::new();
            for (name, model) in self.raw.get(&key).iter().flat_map(|t| &t.services) {
                stale.remove(name);
                let mut model = model.clone();
                model.frontends.retain(|f| {
                    let owner = self.claims.get(f).and_then(|o| o.first());
                    match owner {
                        Some(owner) if *owner != key => {
                            conflicts.insert(Problem {
                                kind: Kind::Service,
                                object: key.clone(),
                                field: "spec".into(),
                                reason: format!(
                                    "{} is also claimed by Service {owner}, which serves it",
                                    frontend_text(f)
                                ),
                            });
                            false
                        }
                        _ => true,
                    }
                });
                if model.frontends.is_empty() {
                    outcome.changed |= desired.services.remove(name).is_some();
                } else if desired.services.get(name).map(AsRef::as_ref) != Some(&model) {
                    desired.services.insert(name.clone(), Arc::new(model));
                    outcome.changed = true;
                }
            }
            let before = self.conflicts.remove(&key).unwrap_or_default();
            outcome
                .problems
                .extend(conflicts.difference(&before).cloned());
            if !conflicts.is_empty() {
                self.conflicts.insert(key, conflicts);
            }
        }
        for name in stale {
            outcome.changed |= desired.services.remove(&name).is_some();
        }
        outcome
    }

    /// Resolves this node from its Node object (`Dirty::All` comes with every Node
    /// change) and puts its SNAT addresses into `desired`; true when they changed.
    fn resolve_node(&mut self, cluster: &Cluster, desired: &mut Desired) -> bool {
        let node_object = self
            .node_name
            .as_ref()
            .and_then(|name| cluster.nodes.get(name));
        let lb_mode = self.node.lb_mode;
        self.node = NodeInfo::resolve(
            self.node_name.as_deref(),
            &self.node_flags,
            node_object.map(AsRef::as_ref),
        );
        self.node.lb_mode = lb_mode;
        if desired.snat_addresses.as_ref() == Some(&self.node.snat_addresses) {
            return false;
        }
        desired.snat_addresses = Some(self.node.snat_addresses.clone());
        true
    }

    /// healthCheckNodePort listeners to serve: port -> (Service, local endpoints).
    pub fn health_checks(&self) -> BTreeMap<u16, (ObjectKey, usize)> {
        let mut out = BTreeMap::new();
        for (key, t) in &self.raw {
            if let Some(HealthCheckPort {
                port,
                local_endpoints,
            }) = t.health_check
            {
                out.entry(port).or_insert((key.clone(), local_endpoints));
            }
        }
        out
    }

    /// ExternalName Services: `namespace/name` -> DNS name (for the L7 hop).
    pub fn external_names(&self) -> BTreeMap<ObjectKey, String> {
        self.raw
            .iter()
            .filter_map(|(k, t)| t.external_name.clone().map(|n| (k.clone(), n)))
            .collect()
    }
}

fn frontends(t: &Translation) -> BTreeSet<FrontendSpec> {
    t.services
        .values()
        .flat_map(|m| m.frontends.iter().copied())
        .collect()
}

#[cfg(test)]
mod tests;
