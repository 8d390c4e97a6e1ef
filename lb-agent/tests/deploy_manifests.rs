//! deploy/ checked against the code it deploys: every manifest parses into k8s-openapi
//! types; the ClusterRole grants exactly the agent's reads (`source::kube::READS`,
//! `L7_READS`) and writes (`kube_writes::WRITES`, `L7_WRITES`); the binding, namespace,
//! service account and ConfigMap references fit together; the DaemonSet's arguments
//! parse with the agent's own clap definitions (`lb_agent::cli`) and its probes, port
//! and bpffs mount agree with them; the container recipe names paths, xtask
//! subcommands and binaries that exist. No cluster and no container engine needed.

mod manifests;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::Parser as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Probe};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_agent::cli::{Cli, Command};
use lb_agent::kube_writes::{L7_WRITES, WRITES};
use lb_agent::source::kube::{L7_READS, READS};
use manifests::{Doc, Object};

fn docs() -> Vec<Doc> {
    manifests::load(&manifests::deploy_dir()).unwrap_or_else(|e| panic!("{e}"))
}

fn workspace() -> PathBuf {
    manifests::deploy_dir()
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn cluster_role(docs: &[Doc]) -> &ClusterRole {
    manifests::one(docs, "ClusterRole", |o| match o {
        Object::ClusterRole(r) => Some(r),
        _ => None,
    })
}

fn binding(docs: &[Doc]) -> &ClusterRoleBinding {
    manifests::one(docs, "ClusterRoleBinding", |o| match o {
        Object::ClusterRoleBinding(b) => Some(b),
        _ => None,
    })
}

fn namespace_name(docs: &[Doc]) -> String {
    let ns = manifests::one(docs, "Namespace", |o| match o {
        Object::Namespace(n) => Some(n),
        _ => None,
    });
    ns.metadata.name.clone().expect("Namespace name")
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("DaemonSet pod spec")
}

/// (API group, resource, verb) triples a set of rules grants; wildcards, resource
/// names and non-resource URLs are refused outright (least privilege means neither).
fn grants(rules: &[PolicyRule]) -> Result<BTreeSet<(String, String, String)>, String> {
    let mut out = BTreeSet::new();
    for (i, rule) in rules.iter().enumerate() {
        if rule.resource_names.as_ref().is_some_and(|r| !r.is_empty()) {
            return Err(format!(
                "rule {i}: resourceNames (the agent watches all objects)"
            ));
        }
        if rule
            .non_resource_urls
            .as_ref()
            .is_some_and(|r| !r.is_empty())
        {
            return Err(format!("rule {i}: nonResourceURLs"));
        }
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        if groups.is_empty() || resources.is_empty() || rule.verbs.is_empty() {
            return Err(format!("rule {i} grants nothing: {rule:?}"));
        }
        for g in &groups {
            for r in &resources {
                for v in &rule.verbs {
                    if [g, r, v].iter().any(|s| s.contains('*')) {
                        return Err(format!("rule {i}: wildcard in {g:?}/{r:?}/{v:?}"));
                    }
                    out.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// What the agent asks for, with the L7 hop (the DaemonSet runs it).
fn required() -> BTreeSet<(String, String, String)> {
    READS
        .iter()
        .chain(L7_READS)
        .chain(WRITES)
        .chain(L7_WRITES)
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_owned(), a.resource.to_owned(), (*v).to_owned()))
        })
        .collect()
}

/// Missing and extra grants, as a message; `None` when they are equal.
fn compare_access(rules: &[PolicyRule]) -> Option<String> {
    let granted = match grants(rules) {
        Ok(g) => g,
        Err(e) => return Some(e),
    };
    let want = required();
    let missing: Vec<_> = want.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&want).collect();
    (!missing.is_empty() || !extra.is_empty()).then(|| {
        format!(
            "the ClusterRole must grant exactly READS and L7_READS \
             (lb-agent/src/source/kube.rs) and WRITES and L7_WRITES \
             (lb-agent/src/kube_writes.rs); \
             missing (group, resource, verb): {missing:?}; not used by the agent: {extra:?}"
        )
    })
}

#[test]
fn every_manifest_is_a_known_kind_with_known_fields() {
    let docs = docs();
    let kinds: BTreeSet<&str> = docs
        .iter()
        .map(|d| match d.object {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
            Object::IngressClass(_) => "IngressClass",
            Object::Service(_) => "Service",
        })
        .collect();
    assert_eq!(kinds.len(), 8, "every kind present: {kinds:?}");
}

#[test]
fn the_loader_refuses_unknown_kinds_and_misspelt_fields() {
    let file = Path::new("test.yaml");
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n";
    let err = manifests::parse(file, deployment).unwrap_err();
    assert!(err.contains("unexpected kind"), "{err}");

    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: y}\ndata: {a: b}\n\
                ---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namspace: y}\n";
    let err = manifests::parse(file, typo).unwrap_err();
    assert!(
        err.contains("document 2") && err.contains(".metadata.namspace"),
        "{err}"
    );

    let wrong_type = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: x}\n\
                      spec: {selector: {}, template: {spec: {hostNetwork: \"yes\", containers: []}}}\n";
    assert!(manifests::parse(file, wrong_type).is_err());
}

#[test]
fn apply_order_creates_the_namespace_before_what_lives_in_it() {
    let docs = docs();
    let first_namespaced = docs
        .iter()
        .position(|d| {
            matches!(
                d.object,
                Object::ServiceAccount(_) | Object::ConfigMap(_) | Object::DaemonSet(_)
            )
        })
        .expect("namespaced objects");
    let namespace = docs
        .iter()
        .position(|d| matches!(d.object, Object::Namespace(_)))
        .expect("a Namespace");
    assert!(
        namespace < first_namespaced,
        "kubectl apply -f deploy/ reads files in name order; the Namespace ({}) must come \
         before {}",
        docs[namespace].file.display(),
        docs[first_namespaced].file.display()
    );
}

#[test]
fn cluster_role_grants_exactly_what_the_agent_uses() {
    let docs = docs();
    let role = cluster_role(&docs);
    assert!(role.aggregation_rule.is_none(), "no aggregation");
    let rules = role.rules.as_deref().unwrap_or_default();
    if let Some(problem) = compare_access(rules) {
        panic!("{problem}");
    }
}

#[test]
fn an_extra_or_missing_grant_is_caught() {
    let docs = docs();
    let rules = cluster_role(&docs).rules.clone().unwrap_or_default();

    let mut extra_verb = rules.clone();
    extra_verb[0].verbs.push("delete".into());
    let problem = compare_access(&extra_verb).expect("an extra verb is refused");
    assert!(problem.contains("delete"), "{problem}");

    let mut wildcard = rules.clone();
    wildcard[0].verbs = vec!["*".into()];
    assert!(
        compare_access(&wildcard)
            .expect("refused")
            .contains("wildcard")
    );

    let mut missing = rules.clone();
    missing.pop();
    assert!(
        compare_access(&missing)
            .expect("refused")
            .contains("missing")
    );

    let mut named = rules;
    named[0].resource_names = Some(vec!["kubernetes".into()]);
    assert!(compare_access(&named).is_some());
}

#[test]
fn binding_gives_the_role_to_the_daemonsets_service_account() {
    let docs = docs();
    let namespace = namespace_name(&docs);
    let role = cluster_role(&docs);
    let binding = binding(&docs);
    let account = manifests::one(&docs, "ServiceAccount", |o| match o {
        Object::ServiceAccount(a) => Some(a),
        _ => None,
    });
    let ds = manifests::daemonset(&docs);

    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());

    let account_name = account.metadata.name.clone().expect("ServiceAccount name");
    assert_eq!(account.metadata.namespace.as_ref(), Some(&namespace));
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "one subject: {subjects:?}");
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(subject.name, account_name);
    assert_eq!(subject.namespace.as_ref(), Some(&namespace));

    assert_eq!(
        pod_spec(ds).service_account_name.as_ref(),
        Some(&account_name)
    );
    assert_ne!(
        pod_spec(ds).automount_service_account_token,
        Some(false),
        "--kube needs the token"
    );
}

#[test]
fn namespaced_objects_live_in_the_namespace() {
    let docs = docs();
    let namespace = namespace_name(&docs);
    for doc in &docs {
        let (meta, namespaced) = match &doc.object {
            Object::Namespace(o) => (&o.metadata, false),
            Object::ClusterRole(o) => (&o.metadata, false),
            Object::ClusterRoleBinding(o) => (&o.metadata, false),
            Object::ServiceAccount(o) => (&o.metadata, true),
            Object::ConfigMap(o) => (&o.metadata, true),
            Object::DaemonSet(o) => (&o.metadata, true),
            Object::IngressClass(o) => (&o.metadata, false),
            Object::Service(o) => (&o.metadata, true),
        };
        let want = namespaced.then_some(&namespace);
        assert_eq!(
            meta.namespace.as_ref(),
            want,
            "{} document {}",
            doc.file.display(),
            doc.index + 1
        );
    }
}

/// The container's environment as Kubernetes builds it: literal values, ConfigMap keys
/// (which must exist) and downward-API fields (as `<fieldPath>`).
fn container_env(
    container: &Container,
    config_maps: &[&ConfigMap],
    namespace: &str,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for var in container.env.as_deref().unwrap_or_default() {
        let value = if let Some(value) = &var.value {
            value.clone()
        } else if let Some(from) = &var.value_from {
            if let Some(key_ref) = &from.config_map_key_ref {
                assert_ne!(key_ref.optional, Some(true), "{}: required", var.name);
                let cm = config_maps
                    .iter()
                    .find(|cm| {
                        cm.metadata.name.as_deref() == Some(key_ref.name.as_str())
                            && cm.metadata.namespace.as_deref() == Some(namespace)
                    })
                    .unwrap_or_else(|| {
                        panic!("{}: no ConfigMap {} in {namespace}", var.name, key_ref.name)
                    });
                cm.data
                    .as_ref()
                    .and_then(|d| d.get(&key_ref.key))
                    .unwrap_or_else(|| {
                        panic!(
                            "{}: ConfigMap {} has no key {}",
                            var.name, key_ref.name, key_ref.key
                        )
                    })
                    .clone()
            } else if let Some(field) = &from.field_ref {
                format!("<{}>", field.field_path)
            } else {
                panic!("{}: unexpected valueFrom {from:?}", var.name);
            }
        } else {
            String::new()
        };
        assert!(
            env.insert(var.name.clone(), value).is_none(),
            "{} set twice",
            var.name
        );
    }
    assert!(container.env_from.is_none(), "env is listed one by one");
    env
}

/// Kubernetes' `$(VAR)` expansion of command and args. An undefined variable stays
/// literally in the argument (a silent misconfiguration), so it is an error here.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find(')')
            .unwrap_or_else(|| panic!("unclosed $( in {arg:?}"))
            + start;
        let name = &rest[start + 2..end];
        let value = env
            .get(name)
            .unwrap_or_else(|| panic!("{arg:?} uses $({name}), which env does not define"));
        out.push_str(value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn config_maps(docs: &[Doc]) -> Vec<&ConfigMap> {
    docs.iter()
        .filter_map(|d| match &d.object {
            Object::ConfigMap(cm) => Some(cm),
            _ => None,
        })
        .collect()
}

/// The agent's command line as the pod runs it, parsed by the agent's CLI.
struct AgentArgs {
    argv: Vec<String>,
    admin: std::net::SocketAddr,
    bpffs: PathBuf,
    interfaces: Vec<String>,
    l7: lb_agent::cli::L7Args,
    socket_lb: bool,
    cgroup: Option<PathBuf>,
    lb_mode: lb_core::mode::LbMode,
    node_addresses: Vec<std::net::IpAddr>,
    snat_ports: (u16, u16),
}

fn agent_args(docs: &[Doc]) -> AgentArgs {
    let ds = manifests::daemonset(docs);
    let container = manifests::agent_container(ds);
    let namespace = namespace_name(docs);
    let env = container_env(container, &config_maps(docs), &namespace);
    let command = container.command.clone().unwrap_or_default();
    assert_eq!(
        command,
        ["lb-agent"],
        "the DaemonSet runs the image's lb-agent"
    );
    let argv: Vec<String> = command
        .iter()
        .chain(container.args.as_deref().unwrap_or_default())
        .map(|a| expand(a, &env))
        .collect();
    let cli = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("the DaemonSet's arguments {argv:?} do not parse:\n{e}"));
    let Command::Run {
        config,
        kube,
        manifests,
        admin,
        interfaces,
        bpffs,
        replace,
        l7,
        socket_lb,
        cgroup,
        lb_mode,
        node_addresses,
        snat_ports,
        ..
    } = cli.command
    else {
        panic!("the DaemonSet must run `lb-agent run`: {argv:?}");
    };
    assert!(
        kube && config.is_none() && manifests.is_none(),
        "--kube: {argv:?}"
    );
    assert!(
        !replace,
        "--replace would drop every tracked connection on each restart"
    );
    assert_eq!(
        env.get("NODE_NAME").map(String::as_str),
        Some("<spec.nodeName>"),
        "--node-name comes from NODE_NAME, the pod's node"
    );
    AgentArgs {
        argv,
        admin,
        bpffs,
        interfaces,
        l7,
        socket_lb,
        cgroup,
        lb_mode,
        node_addresses,
        snat_ports,
    }
}

/// deploy/ sets the mode explicitly (snat, from the ConfigMap, not by the agent's
/// default) and gives no `--node-address`: one list of addresses for every node of a
/// DaemonSet would be right on one node at most, so each agent takes its SNAT source
/// address from its own Node object (`--node-name` = the pod's node; the role reads
/// Nodes). The port range is the ConfigMap's.
#[test]
fn snat_mode_is_explicit_and_each_node_takes_its_own_address() {
    let docs = docs();
    let args = agent_args(&docs);
    assert!(
        args.argv.iter().any(|a| a == "--lb-mode"),
        "--lb-mode is set, not defaulted: {:?}",
        args.argv
    );
    assert_eq!(args.lb_mode, lb_core::mode::LbMode::Snat);
    assert!(
        args.node_addresses.is_empty(),
        "--node-address would give every node the same SNAT address: {:?}",
        args.argv
    );
    assert!(
        required().contains(&(String::new(), "nodes".into(), "watch".into())),
        "the agent watches Nodes"
    );
    let cm = config_maps(&docs)[0];
    let data = cm.data.as_ref().expect("ConfigMap data");
    assert_eq!(data.get("lb-mode").map(String::as_str), Some("snat"));
    let range = data.get("snat-ports").expect("snat-ports");
    assert_eq!(
        format!("{}-{}", args.snat_ports.0, args.snat_ports.1),
        *range
    );
    assert!(
        args.snat_ports.0 > 60_999,
        "above the kernel's ephemeral ports: {range}"
    );
}

#[test]
fn daemonset_arguments_parse_with_the_agents_cli() {
    let docs = docs();
    let args = agent_args(&docs);
    let cm = config_maps(&docs)[0];
    let interface = cm.data.as_ref().and_then(|d| d.get("interface"));
    assert_eq!(
        args.interfaces.iter().collect::<Vec<_>>(),
        [interface.unwrap()]
    );
    // And the check itself rejects what the agent would reject.
    let mut bad = args.argv.clone();
    bad.push("--no-such-flag".into());
    assert!(Cli::try_parse_from(&bad).is_err());
    let mut two_sources = args.argv;
    two_sources.extend(["--config".into(), "x.yaml".into()]);
    assert!(Cli::try_parse_from(&two_sources).is_err());
}

#[test]
fn every_configmap_key_is_read_and_every_read_key_exists() {
    let docs = docs();
    let container = manifests::agent_container(manifests::daemonset(&docs));
    // Existence is checked while building the environment.
    container_env(container, &config_maps(&docs), &namespace_name(&docs));
    let read: BTreeSet<(String, String)> = container
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.value_from.as_ref()?.config_map_key_ref.as_ref())
        .map(|r| (r.name.clone(), r.key.clone()))
        .collect();
    for cm in config_maps(&docs) {
        let name = cm.metadata.name.clone().unwrap_or_default();
        for key in cm.data.as_ref().into_iter().flat_map(|d| d.keys()) {
            assert!(
                read.contains(&(name.clone(), key.clone())),
                "ConfigMap {name} key {key} is not read by the DaemonSet"
            );
        }
    }
}

fn http_probe(probe: Option<&Probe>, what: &str) -> (String, IntOrString) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what}: an HTTP GET probe"));
    assert!(get.host.is_none(), "{what}: probes the pod's own address");
    assert!(
        get.scheme.as_deref().is_none_or(|s| s == "HTTP"),
        "{what}: plain HTTP"
    );
    (get.path.clone().unwrap_or_default(), get.port.clone())
}

fn resolve_port(container: &Container, port: &IntOrString) -> i32 {
    match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            container
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("no container port named {name}"))
                .container_port
        }
    }
}

#[test]
fn probes_and_port_are_the_admin_address_the_arguments_set() {
    let docs = docs();
    let args = agent_args(&docs);
    let container = manifests::agent_container(manifests::daemonset(&docs));
    let admin = i32::from(args.admin.port());
    assert!(
        args.admin.ip().is_unspecified(),
        "the kubelet probes the node's address; --admin {} must listen there",
        args.admin
    );

    let (path, port) = http_probe(container.readiness_probe.as_ref(), "readiness");
    assert_eq!(path, "/readyz");
    assert_eq!(resolve_port(container, &port), admin, "readiness port");
    let (path, port) = http_probe(container.liveness_probe.as_ref(), "liveness");
    assert_eq!(path, "/healthz");
    assert_eq!(resolve_port(container, &port), admin, "liveness port");

    let ports = container.ports.as_deref().unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.container_port == admin && p.host_port.is_none_or(|h| h == admin)),
        "the admin port {admin} is declared: {ports:?}"
    );
}

/// Prometheus finds the metrics where the agent serves them: the pod's scrape
/// annotations name the admin port and `/metrics`.
#[test]
fn scrape_annotations_name_the_admin_port() {
    let docs = docs();
    let args = agent_args(&docs);
    let ds = manifests::daemonset(&docs);
    let annotations = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default();
    let get = |k: &str| annotations.get(k).map(String::as_str);
    assert_eq!(get("prometheus.io/scrape"), Some("true"), "{annotations:?}");
    assert_eq!(
        get("prometheus.io/port"),
        Some(args.admin.port().to_string().as_str()),
        "the scrape port is --admin's"
    );
    assert_eq!(get("prometheus.io/path"), Some("/metrics"));
}

#[test]
fn pins_live_on_the_hosts_bpffs() {
    let docs = docs();
    let args = agent_args(&docs);
    let ds = manifests::daemonset(&docs);
    let container = manifests::agent_container(ds);
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| args.bpffs.starts_with(&m.mount_path))
        .unwrap_or_else(|| {
            panic!(
                "--bpffs {} is under no volume mount: {mounts:?}",
                args.bpffs.display()
            )
        });
    assert_eq!(mount.mount_path, "/sys/fs/bpf");
    assert_ne!(mount.read_only, Some(true), "the agent pins there");
    assert!(
        matches!(
            mount.mount_propagation.as_deref(),
            Some("HostToContainer" | "Bidirectional")
        ),
        "a bpffs the host mounts later must be seen: {mount:?}"
    );
    let volume = pod_spec(ds)
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume");
    let host = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!(
        host.path, "/sys/fs/bpf",
        "the host's bpffs, so pins outlive the pod"
    );
}

/// Socket load balancing (kube-proxy's job for pods and host processes) attaches to the
/// host's cgroup2 root, not to the container's own cgroup, which is all that the
/// container's /sys/fs/cgroup shows with a private cgroup namespace.
#[test]
fn socket_hooks_attach_to_the_hosts_cgroup2_root() {
    let docs = docs();
    let args = agent_args(&docs);
    assert!(args.socket_lb, "--socket-lb: xlb replaces kube-proxy");
    let cgroup = args
        .cgroup
        .expect("--cgroup naming the host's cgroup2 root (the agent's own view is its cgroup)");
    let ds = manifests::daemonset(&docs);
    let container = manifests::agent_container(ds);
    let mounts = container.volume_mounts.as_deref().unwrap_or_default();
    let mount = mounts
        .iter()
        .find(|m| Path::new(&m.mount_path) == cgroup)
        .unwrap_or_else(|| {
            panic!(
                "--cgroup {} is no volume mount: {mounts:?}",
                cgroup.display()
            )
        });
    assert!(
        !mount.mount_path.starts_with("/sys/fs/cgroup"),
        "the runtime mounts the container's own cgroup there"
    );
    assert_ne!(
        mount.mount_path,
        lb_agent::dataplane::sockets::PRIVATE_MOUNT,
        "the agent's own cgroup2 mount point"
    );
    let volume = pod_spec(ds)
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume");
    let host = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!(host.path, "/sys/fs/cgroup", "the host's cgroup2 mount");
    assert_eq!(host.type_.as_deref(), Some("Directory"));
}

#[test]
fn daemonset_runs_on_every_node_and_updates_one_node_at_a_time() {
    let docs = docs();
    let ds = manifests::daemonset(&docs);
    let pod = pod_spec(ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );
    assert!(pod.termination_grace_period_seconds.is_some());

    let strategy = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
    assert!(
        matches!(rolling.max_surge, None | Some(IntOrString::Int(0))),
        "no surge: two agents on a node would both bind the admin port"
    );

    let selector = ds
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.clone())
        .expect("selector labels");
    let labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(
        selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
        "the template carries the selector's labels"
    );

    let resources = manifests::agent_container(ds)
        .resources
        .as_ref()
        .expect("resources");
    for (what, list) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let list = list.as_ref().unwrap_or_else(|| panic!("resources.{what}"));
        assert!(
            list.contains_key("cpu") && list.contains_key("memory"),
            "resources.{what}: cpu and memory"
        );
    }
}

#[test]
fn the_container_gets_exactly_the_capabilities_the_agent_needs() {
    let docs = docs();
    let (container, security) = manifests::agent_security(&docs);
    assert_eq!(
        security.privileged,
        Some(false),
        "capabilities, not privileged"
    );
    assert_eq!(
        security.run_as_user,
        Some(0),
        "added capabilities reach uid 0 only"
    );
    let caps = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<String> = manifests::added_capabilities(container)
        .into_iter()
        .collect();
    // The DaemonSet runs the L7 hop on ports 80 and 443.
    let needed: BTreeSet<String> = lb_agent::capabilities::RUN
        .iter()
        .chain([&lb_agent::capabilities::NET_BIND_SERVICE])
        .map(|c| c.name.to_owned())
        .collect();
    assert_eq!(
        added, needed,
        "capabilities.add must be lb_agent::capabilities::RUN and NET_BIND_SERVICE \
         (tests/capabilities.rs runs the agent with it)"
    );
}

/// The Containerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        if let Some((keyword, rest)) = current.split_once(char::is_whitespace) {
            out.push((keyword.to_uppercase(), rest.trim().to_owned()));
        }
        current.clear();
    }
    out
}

/// Subcommands of `cargo xtask` and their `--flags`, read from xtask's clap enum (a
/// variant `BuildEbpf { release: bool }` is `build-ebpf --release`).
fn xtask_commands(main_rs: &str) -> BTreeMap<String, BTreeSet<String>> {
    let body = main_rs
        .split_once("enum Cmd {")
        .expect("xtask's `enum Cmd`")
        .1;
    let mut commands = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in body.lines() {
        if line.starts_with('}') {
            break;
        }
        let indent = line.len() - line.trim_start().len();
        let word: String = line
            .trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if word.is_empty() || line.trim().starts_with("//") {
            continue;
        }
        if indent == 4 && word.starts_with(|c: char| c.is_ascii_uppercase()) {
            let kebab = word
                .chars()
                .enumerate()
                .fold(String::new(), |mut s, (i, c)| {
                    if c.is_ascii_uppercase() && i > 0 {
                        s.push('-');
                    }
                    s.push(c.to_ascii_lowercase());
                    s
                });
            commands.insert(kebab.clone(), BTreeSet::new());
            current = Some(kebab);
        } else if indent == 8
            && line.trim().contains(':')
            && let Some(cmd) = &current
        {
            commands
                .get_mut(cmd)
                .expect("current command")
                .insert(format!("--{}", word.replace('_', "-")));
        }
    }
    commands
}

fn read(path: &str) -> String {
    let path = workspace().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn recipe() -> Vec<(String, String)> {
    instructions(&read("deploy/Containerfile"))
}

/// lb-agent's binary name, as cargo builds it.
fn agent_bin() -> String {
    Path::new(env!("CARGO_BIN_EXE_lb-agent"))
        .file_name()
        .expect("binary name")
        .to_string_lossy()
        .into_owned()
}

/// The builder stage's RUN commands, split at `&&`, as words (`--mount=` options
/// dropped).
fn builder_commands(steps: &[(String, String)]) -> Vec<Vec<String>> {
    steps
        .iter()
        .skip_while(|(k, _)| k != "FROM")
        .skip(1)
        .take_while(|(k, _)| k != "FROM")
        .filter(|(k, _)| k == "RUN")
        .flat_map(|(_, v)| v.split("&&").map(str::to_owned).collect::<Vec<_>>())
        .map(|part| {
            part.split_whitespace()
                .filter(|w| !w.starts_with("--mount="))
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn container_recipe_builds_with_the_projects_xtask() {
    let xtask_src = read("xtask/src/main.rs");
    let toolchain_src = read("xtask/src/toolchain.rs");
    let xtask = xtask_commands(&xtask_src);
    assert!(
        xtask.get("build").is_some_and(|f| f.contains("--release"))
            && xtask.contains_key("build-ebpf"),
        "reading xtask's commands works: {xtask:?}"
    );
    assert!(
        read(".cargo/config.toml").contains("xtask = "),
        "`cargo xtask` is an alias"
    );
    let steps = recipe();

    // Every variable it sets is one xtask reads.
    for (_, env) in steps.iter().filter(|(k, _)| k == "ENV") {
        let name = env.split('=').next().expect("NAME=value");
        let quoted = format!("\"{name}\"");
        assert!(
            xtask_src.contains(&quoted) || toolchain_src.contains(&quoted),
            "ENV {name}: xtask does not read it"
        );
    }

    // `cargo xtask SUB --flags` names a real subcommand and its flags.
    let mut built_release = false;
    for words in builder_commands(&steps) {
        if let Some(at) = words.windows(2).position(|w| w == ["cargo", "xtask"]) {
            let sub = words[at + 2].as_str();
            let flags = xtask
                .get(sub)
                .unwrap_or_else(|| panic!("`cargo xtask {sub}` does not exist: {xtask:?}"));
            for flag in words[at + 3..].iter().filter(|w| w.starts_with("--")) {
                assert!(flags.contains(flag), "`cargo xtask {sub}` has no {flag}");
            }
            built_release |= sub == "build" && words.iter().any(|w| w == "--release");
        }
    }
    assert!(
        built_release,
        "the builder runs `cargo xtask build --release`"
    );
}

#[test]
fn container_recipe_installs_the_binary_the_daemonset_runs() {
    let steps = recipe();
    let bin = agent_bin();
    // Copied out of the profile `--release` builds into.
    let produced = format!("target/release/{bin} /out/{bin}");
    assert!(
        builder_commands(&steps)
            .iter()
            .any(|words| words.join(" ").contains(&produced)),
        "the builder copies {produced}"
    );
    let copy = steps
        .iter()
        .find(|(k, v)| k == "COPY" && v.starts_with("--from=builder"))
        .map(|(_, v)| v.clone())
        .expect("COPY --from=builder");
    assert_eq!(
        copy,
        format!("--from=builder /out/{bin} /usr/local/bin/{bin}")
    );
    assert!(
        steps
            .iter()
            .any(|(k, v)| k == "ENTRYPOINT" && *v == format!("[\"/usr/local/bin/{bin}\"]"))
    );
    let docs = docs();
    let command = manifests::agent_container(manifests::daemonset(&docs))
        .command
        .clone()
        .unwrap_or_default();
    assert_eq!(command, [bin], "found on the image's PATH (/usr/local/bin)");
    assert!(
        steps
            .iter()
            .any(|(k, v)| k == "RUN" && v.contains("apt-get install") && v.contains("bpftool")),
        "bpftool for operators"
    );
}

#[test]
fn container_stages_share_a_debian_release_and_a_recent_enough_rust() {
    let steps = recipe();
    // The binary needs the builder's glibc.
    let froms: Vec<&String> = steps
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(froms.len(), 2, "builder and runtime: {froms:?}");
    assert!(froms[0].ends_with(" AS builder"), "{}", froms[0]);
    assert!(
        froms.iter().all(|f| f.contains("${DEBIAN_RELEASE}")),
        "both stages on ${{DEBIAN_RELEASE}}: {froms:?}"
    );
    assert!(
        froms[1].contains("debian:${DEBIAN_RELEASE}-slim"),
        "{}",
        froms[1]
    );

    let args: BTreeMap<&str, &str> = steps
        .iter()
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, v)| v.split_once('='))
        .collect();
    let workspace_toml = read("Cargo.toml");
    let rust_version = workspace_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"');
    let version =
        |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().expect("number")).collect() };
    assert!(
        version(args["RUST_VERSION"]) >= version(rust_version),
        "RUST_VERSION {} < the workspace's rust-version {rust_version}",
        args["RUST_VERSION"]
    );
}

#[test]
fn container_context_excludes_build_output() {
    // `COPY . .` takes the repository root.
    assert!(recipe().iter().any(|(k, v)| k == "COPY" && v == ". ."));
    let ignore = read(".dockerignore");
    for dir in ["target/", "lb-ebpf/target/"] {
        assert!(ignore.lines().any(|l| l == dir), ".dockerignore: {dir}");
    }
}

/// The L7 hop as deployed: the agent runs it for IngressClass `xlb`, whose controller
/// is the agent's; the ingress Service selects the agent pods, targets the container
/// ports the L7 listeners use, and is the Service whose address the agent publishes.
#[test]
fn the_l7_hop_is_reached_through_the_ingress_service() {
    use k8s_openapi::api::core::v1::Service;
    use lb_core::model::ingress::CONTROLLER;

    let docs = docs();
    let args = agent_args(&docs);
    assert!(args.l7.l7, "the DaemonSet runs the L7 hop: {:?}", args.argv);
    let classes: Vec<_> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::IngressClass(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(classes.len(), 1);
    assert_eq!(
        classes[0].metadata.name.as_deref(),
        Some(args.l7.l7_ingress_class.as_str())
    );
    assert_eq!(
        classes[0]
            .spec
            .as_ref()
            .and_then(|s| s.controller.as_deref()),
        Some(CONTROLLER)
    );

    let services: Vec<&Service> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        })
        .collect();
    assert_eq!(services.len(), 1);
    let service = services[0];
    let key = format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or_default(),
        service.metadata.name.as_deref().unwrap_or_default()
    );
    assert_eq!(args.l7.l7_publish_service.as_deref(), Some(key.as_str()));

    let ds = manifests::daemonset(&docs);
    let pod_labels = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let spec = service.spec.as_ref().expect("Service spec");
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(
        !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
        "{selector:?} selects the agent pods {pod_labels:?}"
    );
    let container = manifests::agent_container(ds);
    let listeners = [args.l7.l7_http.port(), args.l7.l7_https.port()];
    for port in spec.ports.as_deref().unwrap_or_default() {
        let target = port.target_port.as_ref().expect("targetPort");
        let resolved = resolve_port(container, target);
        assert!(
            listeners.contains(&u16::try_from(resolved).expect("port")),
            "{} targets {resolved}, not an L7 listener {listeners:?}",
            port.port
        );
    }
}
