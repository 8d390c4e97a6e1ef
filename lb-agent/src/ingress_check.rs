//! `lb-agent ingress check`: the migration report. For every Ingress of the class, each
//! of its annotations and what the L7 hop does with it (honoured, ignored with the same
//! result, ignored with a different one, or refused), and the problems the translation
//! finds in it; the exit status says whether anything would be served differently
//! than by ingress-nginx. The verdicts come from the catalogue the translation itself
//! reads, and the problems from the translation itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result};
use lb_core::cluster::{Cluster, ObjectKey};
use lb_core::model::ingress::annotations;
use lb_core::model::ingress::catalogue::{self, Support};
use lb_core::model::ingress::{self, INGRESS_CLASS, IngressClassConfig, LOAD_BALANCE};
use serde::Serialize;

use crate::source::manifests::ManifestSource;

/// What the hop does with one annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Honoured,
    /// Not read; requests are served as ingress-nginx serves them.
    Same,
    /// Not read; requests are served differently.
    Differs,
    /// The Ingress is not served while it carries this annotation.
    Refused,
}

#[derive(Debug, Clone, Serialize)]
pub struct AnnotationReport {
    pub name: String,
    pub verdict: Verdict,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IngressReport {
    /// `namespace/name`.
    pub ingress: String,
    /// Whether the hop would serve it at all (a refused annotation stops it).
    pub served: bool,
    pub annotations: Vec<AnnotationReport>,
    /// The translation's problems for this Ingress (bad values, conflicts, missing
    /// Services or Secrets).
    pub problems: Vec<String>,
}

impl IngressReport {
    /// Whether requests for this Ingress would be served differently.
    pub fn differs(&self) -> bool {
        !self.problems.is_empty()
            || self
                .annotations
                .iter()
                .any(|a| matches!(a.verdict, Verdict::Differs | Verdict::Refused))
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub class: String,
    pub ingresses: Vec<IngressReport>,
    /// Whether anything would be served differently (the exit status).
    pub differs: bool,
}

/// The report for the Ingresses of `class` in `cluster`.
pub fn report(cluster: &Cluster, class: &IngressClassConfig) -> Report {
    let keys = ingress::of_class(cluster, class);
    let translation = ingress::translate(cluster, class);
    let mut problems: BTreeMap<&ObjectKey, Vec<String>> = BTreeMap::new();
    for p in &translation.problems {
        if p.kind == lb_core::cluster::Kind::Ingress {
            problems
                .entry(&p.object)
                .or_default()
                .push(format!("{}: {}", p.field, p.reason));
        }
    }
    let under = format!("{}/", class.annotations_prefix);
    let ingresses: Vec<IngressReport> = keys
        .iter()
        .filter_map(|key| Some((key, cluster.ingresses.get(key)?)))
        .map(|(key, object)| {
            // Values can refuse too (`backend-protocol: FCGI`): the translation's
            // reading of this Ingress says which.
            let read = annotations::read(
                object.metadata.annotations.as_ref(),
                &class.annotations_prefix,
                &class.defaults,
            );
            let annotations = object
                .metadata
                .annotations
                .iter()
                .flatten()
                .map(
                    |(name, _)| match read.refused.iter().find(|(r, _)| r == name) {
                        Some((_, why)) => AnnotationReport {
                            name: name.clone(),
                            verdict: Verdict::Refused,
                            why: Some((*why).to_owned()),
                        },
                        None => annotation(name, &under),
                    },
                )
                .collect();
            // A refused annotation's problem repeats its verdict.
            let annotations: Vec<AnnotationReport> = annotations;
            let refused: Vec<String> = annotations
                .iter()
                .filter(|a| a.verdict == Verdict::Refused)
                .map(|a| format!("metadata.annotations[{}]:", a.name))
                .collect();
            let mut own = problems.remove(key).unwrap_or_default();
            own.retain(|p| !refused.iter().any(|r| p.starts_with(r.as_str())));
            IngressReport {
                ingress: key.to_string(),
                served: translation.owned.contains(key),
                annotations,
                problems: own,
            }
        })
        .collect();
    Report {
        class: class.name.clone(),
        differs: ingresses.iter().any(IngressReport::differs),
        ingresses,
    }
}

fn annotation(name: &str, under: &str) -> AnnotationReport {
    let report = |verdict, why: Option<&str>| AnnotationReport {
        name: name.to_owned(),
        verdict,
        why: why.map(str::to_owned),
    };
    if let Some(short) = name.strip_prefix(under) {
        return match catalogue::support(short) {
            Support::Honoured => report(Verdict::Honoured, None),
            Support::Same(why) => report(Verdict::Same, Some(why)),
            Support::Differs(why) => report(Verdict::Differs, Some(why)),
            Support::Refused(why) => report(Verdict::Refused, Some(why)),
        };
    }
    match name {
        INGRESS_CLASS => report(Verdict::Honoured, Some("selects the class")),
        LOAD_BALANCE => report(Verdict::Honoured, Some("xlb's own")),
        _ => report(
            Verdict::Same,
            Some("not an ingress controller annotation: neither controller reads it"),
        ),
    }
}

impl Report {
    /// The human-readable form.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for i in &self.ingresses {
            let state = if i.served { "served" } else { "NOT SERVED" };
            let _ = writeln!(out, "Ingress {} ({state})", i.ingress);
            for a in &i.annotations {
                let verdict = match a.verdict {
                    Verdict::Honoured => "honoured",
                    Verdict::Same => "ignored (same result)",
                    Verdict::Differs => "IGNORED (differs)",
                    Verdict::Refused => "REFUSED",
                };
                let _ = write!(out, "  {verdict:<22} {}", a.name);
                if let Some(why) = &a.why {
                    let _ = write!(out, ": {why}");
                }
                out.push('\n');
            }
            for p in &i.problems {
                let _ = writeln!(out, "  {:<22} {p}", "PROBLEM");
            }
        }
        let count = |v: Verdict| {
            self.ingresses
                .iter()
                .flat_map(|i| &i.annotations)
                .filter(|a| a.verdict == v)
                .count()
        };
        let problems: usize = self.ingresses.iter().map(|i| i.problems.len()).sum();
        let _ = writeln!(
            out,
            "{} Ingresses of class {}: {} annotations honoured, {} ignored with the same \
             result, {} ignored with a different result, {} refused; {problems} problems",
            self.ingresses.len(),
            self.class,
            count(Verdict::Honoured),
            count(Verdict::Same),
            count(Verdict::Differs),
            count(Verdict::Refused),
        );
        out.push_str(if self.differs {
            "Some requests would be served differently by xlb.\n"
        } else {
            "xlb would serve these Ingresses as ingress-nginx does.\n"
        });
        out
    }
}

/// The cluster in a manifests directory (as `run --manifests` reads it); a file that
/// cannot be read is an error.
pub fn cluster_from_manifests(dir: &Path) -> Result<Cluster> {
    let load = ManifestSource::new(dir)
        .read(true)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .context("no manifests read")?;
    if let Some(e) = load.errors.first() {
        anyhow::bail!("{e}");
    }
    let mut cluster = Cluster::default();
    for event in load.events {
        cluster.apply(event);
    }
    Ok(cluster)
}

/// The cluster as the API server lists it now (the kinds the L7 hop reads), within
/// `timeout`.
pub async fn cluster_from_kube(timeout: Duration) -> Result<Cluster> {
    let client = ::kube::Client::try_default()
        .await
        .context("no Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(crate::source::kube::run(client, tx, true));
    let mut cluster = Cluster::default();
    let listed = async {
        // One Replace per kind comes first, every kind's before any change.
        let mut kinds = std::collections::BTreeSet::new();
        while let Some(event) = rx.recv().await {
            if let lb_core::cluster::ClusterEvent::Replace(kind, _) = &event {
                kinds.insert(*kind);
            }
            cluster.apply(event);
            if kinds.len() == lb_core::cluster::Kind::ALL.len() {
                return true;
            }
        }
        false
    };
    let done = tokio::time::timeout(timeout, listed).await;
    task.abort();
    match done {
        Ok(true) => Ok(cluster),
        Ok(false) => anyhow::bail!("the Kubernetes watchers ended before listing everything"),
        Err(_) => anyhow::bail!("the cluster was not listed within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests;
