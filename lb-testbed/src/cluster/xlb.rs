//! xlb as the [`NodeProgram`] of the cluster scenarios: one real agent per node, as the
//! DaemonSet runs it, all reading the same manifests (`lb-agent run --manifests DIR
//! --node-name node-<i> --interface eth0`), with XDP on the node's uplink.
//!
//! What a pod sees and whether flows survive a move depend on the agent's mode, so the
//! caller says (see [`XlbAgents::new`]); extra arguments select the mode.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::manifests::ManifestDir;
use super::scenarios::{NodeProgram, PodSees};
use super::{Cluster, ClusterService, TrafficPolicy};
use crate::AgentProcess;

/// How long the agents may take to hold every Service after a change of manifests.
const SETTLE: Duration = Duration::from_secs(20);

/// One agent per node of a cluster, started on the first [`NodeProgram::program`] and
/// killed (pins removed) on drop.
pub struct XlbAgents<'c> {
    binary: PathBuf,
    name: String,
    extra: Vec<String>,
    pod_sees_cluster: PodSees,
    flows_survive_moving: bool,
    manifests: Option<ManifestDir>,
    agents: Vec<AgentProcess<'c>>,
}

impl<'c> XlbAgents<'c> {
    /// Agents run from `binary` with `extra` arguments after the source and interface
    /// (e.g. a mode flag), named `name` in messages. `pod_sees_cluster`: the source a pod
    /// sees for external traffic of an `externalTrafficPolicy: Cluster` Service in this
    /// mode (`Local` always keeps the client's); `flows_survive_moving`: whether an
    /// established flow survives the router moving it to another node.
    pub fn new(
        binary: &Path,
        name: &str,
        extra: &[&str],
        pod_sees_cluster: PodSees,
        flows_survive_moving: bool,
    ) -> XlbAgents<'c> {
        XlbAgents {
            binary: binary.to_owned(),
            name: name.to_owned(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            pod_sees_cluster,
            flows_survive_moving,
            manifests: None,
            agents: Vec::new(),
        }
    }

    /// The running agents, in node order (for status, logs, restarts).
    pub fn agents(&self) -> &[AgentProcess<'c>] {
        &self.agents
    }

    /// The manifests directory, once programmed.
    pub fn manifests(&self) -> Option<&ManifestDir> {
        self.manifests.as_ref()
    }
}

impl<'c> NodeProgram<'c> for XlbAgents<'c> {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn program(&mut self, cluster: &'c Cluster, services: &[ClusterService]) -> anyhow::Result<()> {
        if self.manifests.is_none() {
            self.manifests = Some(ManifestDir::new(cluster.router.name())?);
        }
        let dir = self.manifests.as_ref().context("manifests directory")?;
        dir.write(cluster, services)?;
        if self.agents.is_empty() {
            for node in &cluster.nodes {
                let source = dir.agent_source(&node.name);
                let source: Vec<&str> = source.iter().map(String::as_str).collect();
                let mut extra = vec!["--poll-ms", "100"];
                extra.extend(self.extra.iter().map(String::as_str));
                let agent = AgentProcess::start_on_interfaces(
                    &node.ns,
                    &self.binary,
                    &source,
                    &[Cluster::NODE_IF],
                    node.ns.name(),
                    &extra,
                )
                .with_context(|| format!("starting the agent on {}", node.name))?;
                self.agents.push(agent);
            }
        }
        // Every ClusterIP of every Service with endpoints is in every node's maps.
        let expected: Vec<String> = services
            .iter()
            .filter(|s| !s.endpoints.is_empty())
            .flat_map(|s| {
                [false, true]
                    .into_iter()
                    .filter_map(|v6| s.cluster_ip(v6).map(|a| a.to_string()))
            })
            .collect();
        for (agent, node) in self.agents.iter().zip(&cluster.nodes) {
            agent
                .wait_for(SETTLE, |report| {
                    report.interfaces.iter().any(|i| i == Cluster::NODE_IF)
                        && expected.iter().all(|addr| {
                            report
                                .services
                                .iter()
                                .flat_map(|s| &s.frontends)
                                .any(|f| f.starts_with(&format!("{addr}/")))
                        })
                })
                .with_context(|| format!("the agent on {}", node.name))?;
        }
        Ok(())
    }

    fn pod_sees(&self, policy: TrafficPolicy) -> PodSees {
        match policy {
            TrafficPolicy::Cluster => self.pod_sees_cluster,
            TrafficPolicy::Local => PodSees::Client,
        }
    }

    fn flows_survive_moving(&self) -> bool {
        self.flows_survive_moving
    }
}
