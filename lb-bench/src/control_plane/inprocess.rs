//! xlb's install step alone, in this process, for the comparison with
//! `iptables-restore` and `nft -f` (which are only the install step of kube-proxy too):
//! the agent's own translation, plan and writer against a freshly loaded data plane
//! (maps only; nothing attached), then one-endpoint changes through the same three.

use std::time::Instant;

use anyhow::{Result, bail};
use lb_agent::dataplane::Dataplane;
use lb_core::cluster::{Cluster, ClusterEvent, Dirty, Kind, Object};
use lb_core::model::Desired;
use lb_core::model::translator::Translator;
use lb_core::plan::{self, Applied};

use super::cluster::{NODE, Synthetic};

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct InProcess {
    /// Cluster index and translation of every object.
    pub translate_s: f64,
    pub plan_s: f64,
    pub apply_s: f64,
    pub writes: usize,
    /// Per change: index + translation + plan, then the writes (the old backend's slot
    /// is emptied later, once packets in flight are done; see `dataplane::grace`).
    pub change_plan_s: Vec<f64>,
    pub change_apply_s: Vec<f64>,
}

pub fn measure(cluster: &Synthetic, changes: usize) -> Result<InProcess> {
    let mut dp = Dataplane::load(None)?;
    let mut nodes = Vec::new();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for object in cluster.objects() {
        match object {
            Object::Node(_) => nodes.push(object),
            Object::Service(_) => services.push(object),
            Object::EndpointSlice(_) => slices.push(object),
            Object::Ingress(_) | Object::IngressClass(_) | Object::Secret(_) => {}
        }
    }
    let mut out = InProcess::default();
    let start = Instant::now();
    let mut index = Cluster::default();
    index.apply(ClusterEvent::Replace(Kind::Node, nodes));
    index.apply(ClusterEvent::Replace(Kind::Service, services));
    index.apply(ClusterEvent::Replace(Kind::EndpointSlice, slices));
    let mut translator = Translator::new(Some(NODE.into()), Vec::new());
    let mut desired = Desired::default();
    // The first translation covers everything, as the agent's first sync does.
    translator.update(&index, Dirty::All, &mut desired);
    out.translate_s = start.elapsed().as_secs_f64();

    let mut applied = Applied::default();
    let start = Instant::now();
    let first = plan::plan(&desired, &applied);
    out.plan_s = start.elapsed().as_secs_f64();
    if !first.errors.is_empty() {
        bail!(
            "plan errors: {:?}",
            &first.errors[..first.errors.len().min(3)]
        );
    }
    let start = Instant::now();
    out.writes = dp
        .apply(&first, &mut applied)
        .map_err(|(n, e)| anyhow::anyhow!("write {n}: {e}"))?;
    out.apply_s = start.elapsed().as_secs_f64();
    if applied.services.len() != cluster.services
        || applied.backends.len() != cluster.services * cluster.endpoints
    {
        bail!(
            "in-process sync wrote {} services and {} backends, {} and {} expected",
            applied.services.len(),
            applied.backends.len(),
            cluster.services,
            cluster.services * cluster.endpoints
        );
    }

    let mut swapped = vec![false; cluster.services];
    for k in 0..changes {
        let i = cluster.changed(k);
        swapped[i] = !swapped[i];
        let slice = cluster.slice(i, swapped[i]);
        let start = Instant::now();
        let dirty = index.apply(ClusterEvent::Apply(slice));
        translator.update(&index, dirty, &mut desired);
        let plan = plan::plan(&desired, &applied);
        let planned = start.elapsed();
        dp.apply(&plan, &mut applied)
            .map_err(|(n, e)| anyhow::anyhow!("change {k}, write {n}: {e}"))?;
        out.change_plan_s.push(planned.as_secs_f64());
        out.change_apply_s
            .push(start.elapsed().saturating_sub(planned).as_secs_f64());
        if plan.ops.is_empty() {
            bail!("change {k} of Service {i} planned no write");
        }
    }
    Ok(out)
}
