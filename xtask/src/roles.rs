//! Checks that the crates keep their roles (the workspace's layout is the architecture):
//! the pure core links no kernel, Kubernetes-client, socket or HTTP crate, and the shipped
//! agent links none of the test harness's.

#[cfg(test)]
mod tests {
    use crate::workspace_root;

    /// The names under `[dependencies]` of a crate's Cargo.toml (not dev or build ones).
    fn normal_dependencies(krate: &str) -> Vec<String> {
        let path = workspace_root().join(krate).join("Cargo.toml");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut in_deps = false;
        let mut deps = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                in_deps = line == "[dependencies]";
            } else if in_deps && let Some((name, _)) = line.split_once('=') {
                let name = name.trim();
                if !name.is_empty() && !name.starts_with('#') {
                    deps.push(name.split('.').next().unwrap_or(name).to_owned());
                }
            }
        }
        assert!(
            !deps.is_empty(),
            "{} lists no [dependencies]",
            path.display()
        );
        deps
    }

    #[test]
    fn the_core_links_no_kernel_client_socket_or_http_crate() {
        let deps = normal_dependencies("lb-core");
        for banned in [
            "aya",
            "kube",
            "tokio",
            "hyper",
            "hyper-util",
            "rustls",
            "libc",
        ] {
            assert!(
                !deps.iter().any(|d| d == banned),
                "lb-core depends on {banned}: the pure core must not ({deps:?})"
            );
        }
    }

    #[test]
    fn the_agent_ships_no_test_harness() {
        let deps = normal_dependencies("lb-agent");
        for banned in ["lb-testbed", "etherparse", "tokio-tungstenite", "proptest"] {
            assert!(
                !deps.iter().any(|d| d == banned),
                "lb-agent depends on {banned}: test support belongs in lb-testbed ({deps:?})"
            );
        }
    }
}
