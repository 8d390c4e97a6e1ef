//! Which documents of a manifests directory deserve a word when they are ignored: those
//! that look meant for xlb but are not a kind and apiVersion it reads (`kind: service`,
//! `kind: Servce`, a Service with `apiVersion: v2`, an EndpointSlice of
//! `discovery.k8s.io/v1beta1`), and documents with no kind at all. Other kinds (a
//! Deployment, a ConfigMap in the same `kubectl get -o yaml` dump) stay silent.

/// The kinds read, with the apiVersion each is read at.
const READ: [(&str, &str); 6] = [
    ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSlice"),
    ("v1", "Node"),
    ("networking.k8s.io/v1", "Ingress"),
    ("networking.k8s.io/v1", "IngressClass"),
    ("v1", "Secret"),
];

/// Why a document is ignored, when it looks like one that was meant to be read; the
/// text is the same for the same kind and apiVersion, so a caller can say it once.
pub(super) fn ignored(value: &serde_yaml::Value) -> Option<String> {
    let api = value.get("apiVersion").and_then(serde_yaml::Value::as_str);
    let Some(kind) = value.get("kind").and_then(serde_yaml::Value::as_str) else {
        return Some(format!(
            "a document with apiVersion {:?} and no kind is not an object xlb reads; ignored",
            api.unwrap_or("")
        ));
    };
    let api = api.unwrap_or("");
    if READ.contains(&(api, kind)) {
        return None;
    }
    let (read_api, meant) = READ.iter().find(|(_, ours)| looks_like(kind, ours))?;
    Some(format!(
        "kind {kind:?} apiVersion {api:?} is not read (did you mean kind {meant:?} \
         apiVersion {read_api:?}?); every such document in this file is ignored"
    ))
}

/// `kind` is `ours` in another case, or a typo of it (a longer name within two edits).
fn looks_like(kind: &str, ours: &str) -> bool {
    let (kind, ours) = (kind.to_ascii_lowercase(), ours.to_ascii_lowercase());
    kind == ours || (ours.len() >= 6 && edit_distance(&kind, &ours) <= 2)
}

/// Levenshtein distance of two short ASCII names (kinds are capped by the caller's
/// comparison: `ours` is at most 13 bytes; a long `kind` is simply far).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 2 {
        return 3;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::ignored;

    fn doc(api: &str, kind: &str) -> serde_yaml::Value {
        serde_yaml::from_str(&format!("apiVersion: {api}\nkind: {kind}\n")).unwrap()
    }

    #[test]
    fn misspelt_or_wrong_version_kinds_are_named() {
        for (api, kind, meant) in [
            ("v1", "service", "Service"),
            ("v2", "Service", "Service"),
            ("v1", "Servce", "Service"),
            ("discovery.k8s.io/v1beta1", "EndpointSlice", "EndpointSlice"),
            ("v1", "Endpointslice", "EndpointSlice"),
            ("networking.k8s.io/v1", "ingress", "Ingress"),
            ("v1", "node", "Node"),
            ("v1", "Secrets", "Secret"),
        ] {
            let reason = ignored(&doc(api, kind)).unwrap_or_else(|| panic!("{api} {kind}"));
            assert!(
                reason.contains(&format!("kind {kind:?} apiVersion {api:?}"))
                    && reason.contains(&format!("did you mean kind {meant:?}")),
                "{reason}"
            );
        }
        assert!(
            ignored(&serde_yaml::from_str("apiVersion: v1\nmetadata: {}\n").unwrap()).is_some()
        );
    }

    #[test]
    fn read_and_unrelated_kinds_are_silent() {
        for (api, kind) in [
            ("v1", "Service"),
            ("discovery.k8s.io/v1", "EndpointSlice"),
            ("v1", "Secret"),
            ("apps/v1", "Deployment"),
            ("v1", "ConfigMap"),
            ("v1", "Endpoints"),
            ("rbac.authorization.k8s.io/v1", "Role"),
            ("v1", "ServiceAccount"),
            ("apps/v1", "DaemonSet"),
        ] {
            assert_eq!(ignored(&doc(api, kind)), None, "{api} {kind}");
        }
    }
}
