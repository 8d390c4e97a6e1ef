//! The real agent with exactly the capabilities deploy/'s DaemonSet gives it, read from
//! the manifest, in the DaemonSet's mode (a Kubernetes source, here `--manifests`, the
//! L7 hop on ports 80 and 443, and socket load balancing, here on a child cgroup the
//! test creates instead of the host's root): it attaches XDP and the socket hooks,
//! forwards a connection through each, serves the L7 port, reads its maps on the admin
//! port (`/metrics`, `/trace`) and adopts its pins and links after a restart (the
//! rolling-update path). Without any one of them it exits and names the missing
//! capability, and nothing stays attached: no XDP, no cgroup program. Together the two
//! tests measure the set the agent needs (enough, and each one required) and show that
//! it is deploy/'s list.
//!
//! The container is modelled with `setpriv`, as the runtime sets it up for a uid 0
//! process with `capabilities: {drop: [ALL], add: [...]}`: bounding, permitted and
//! effective sets are the list; inheritable and ambient sets are empty; and
//! `allowPrivilegeEscalation: false` is `no_new_privs`. The test reads the running
//! agent's `CapEff` to prove the set really applied.

mod manifests;

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_testbed::{self as testbed, AgentProcess, ServerHandle, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(15);

/// What the DaemonSet's container gets: the added capabilities (`NET_ADMIN`) and
/// whether `no_new_privs` is set.
struct ContainerPrivileges {
    capabilities: Vec<String>,
    no_new_privs: bool,
}

/// The DaemonSet runs socket load balancing on the host's cgroup2 root (`--socket-lb
/// --cgroup DIR`); the test runs the same with a child cgroup of its own for DIR.
fn daemonset_runs_socket_lb() {
    let docs = manifests::load(&manifests::deploy_dir()).unwrap_or_else(|e| panic!("{e}"));
    let (container, _) = manifests::agent_security(&docs);
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.iter().any(|a| a == "--socket-lb") && args.iter().any(|a| a == "--cgroup"),
        "the DaemonSet's agent runs --socket-lb --cgroup: {args:?}"
    );
}

fn daemonset_privileges() -> ContainerPrivileges {
    let docs = manifests::load(&manifests::deploy_dir()).unwrap_or_else(|e| panic!("{e}"));
    let (container, security) = manifests::agent_security(&docs);
    assert_eq!(
        security.run_as_user,
        Some(0),
        "the model below is a uid 0 process"
    );
    assert_ne!(security.privileged, Some(true));
    let dropped = security
        .capabilities
        .as_ref()
        .and_then(|c| c.drop.clone())
        .unwrap_or_default();
    assert_eq!(dropped, ["ALL"], "only the added capabilities remain");
    let capabilities = manifests::added_capabilities(container);
    assert!(!capabilities.is_empty());
    ContainerPrivileges {
        capabilities,
        no_new_privs: security.allow_privilege_escalation == Some(false),
    }
}

/// `setpriv` arguments that run the agent as the container runtime would.
fn launcher(capabilities: &[String], no_new_privs: bool) -> Vec<String> {
    let keep = capabilities.iter().fold(String::new(), |mut s, c| {
        write!(s, ",+{}", c.to_lowercase()).expect("write to a String");
        s
    });
    let mut args = vec![
        "setpriv".to_owned(),
        "--inh-caps=-all".to_owned(),
        "--ambient-caps=-all".to_owned(),
        format!("--bounding-set=-all{keep}"),
    ];
    if no_new_privs {
        args.push("--no-new-privs".to_owned());
    }
    args.push("--".to_owned());
    args
}

/// linux/capability.h bit of a capability as Kubernetes names it.
fn bit(name: &str) -> u32 {
    match name {
        "NET_BIND_SERVICE" => 10,
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("add {other}'s bit to this table"),
    }
}

/// A `/proc/PID/status` field: a hex capability mask or a number.
fn proc_status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn mask(hex: &str) -> u64 {
    u64::from_str_radix(hex, 16).expect("hex mask")
}

struct Bed {
    topo: Topology,
    _servers: Vec<ServerHandle>,
    manifests: PathBuf,
    cgroup: ChildCgroup,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let topo = Topology::for_test(tag, 1);
        let servers = testbed::spawn_backend_http_servers(&topo, 0, PORT).expect("servers");
        let manifests = std::env::temp_dir().join(format!("xlb-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&manifests).expect("manifests dir");
        let yaml = format!(
            "apiVersion: v1
kind: Service
metadata: {{ name: web, namespace: shop }}
spec:
  type: ClusterIP
  clusterIP: {vip}
  ports: [{{ name: http, port: 80, protocol: TCP, targetPort: {PORT} }}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{ kubernetes.io/service-name: web }}
addressType: IPv4
endpoints:
- addresses: [\"{backend}\"]
  conditions: {{ ready: true }}
ports: [{{ name: http, port: {PORT}, protocol: TCP }}]
",
            vip = Topology::vip_v4(0),
            backend = Topology::backend_v4(0),
        );
        std::fs::write(manifests.join("web.yaml"), yaml).expect("manifest");
        Bed {
            topo,
            _servers: servers,
            manifests,
            cgroup: ChildCgroup::new(tag),
        }
    }

    /// The agent as the DaemonSet runs it (ports 80 and 443 for the L7 hop, socket
    /// load balancing on the test's child cgroup).
    fn agent(&self, tag: &str, launcher: &[String]) -> AgentProcess<'_> {
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        let dir = self.manifests.display().to_string();
        let cgroup = self.cgroup.path.display().to_string();
        let mut extra: Vec<&str> = testbed::agent::L7_ARGS.to_vec();
        extra.extend(["--socket-lb", "--cgroup", &cgroup]);
        AgentProcess::start_full(
            &self.topo.lb,
            &launcher,
            Path::new(AGENT),
            &["--manifests", &dir],
            tag,
            &extra,
        )
        .expect("start agent")
    }

    /// `curl URL` from the load-balancer ("node") namespace, by a process in the
    /// child cgroup when `in_cgroup`: a host process, whose packets never cross XDP.
    fn node_curl(&self, url: &str, in_cgroup: bool) -> Option<String> {
        let join = if in_cgroup {
            format!("echo $$ > {}/cgroup.procs && ", self.cgroup.path.display())
        } else {
            String::new()
        };
        let script = format!("{join}exec curl -sS --max-time 2 {url}");
        // nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup2 mount.
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.topo.lb.name()))
            .args(["--", "sh", "-c", &script])
            .output()
            .expect("nsenter");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// A child cgroup of the host's cgroup2 mount that the test creates (the hooks never
/// attach to the root); dropping it kills what runs in it, by PID, and removes it.
struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    fn new(tag: &str) -> ChildCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let root = lb_agent::dataplane::sockets::cgroup2_mount(&mountinfo)
            .expect("no cgroup2 mount: this test needs cgroup v2 (e.g. /sys/fs/cgroup/unified)");
        let path = root.join(format!("xlb-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        ChildCgroup { path }
    }

    /// The xlb programs the kernel runs for this cgroup (`bpftool cgroup show`).
    fn xlb_programs(&self) -> usize {
        let path = self.path.display().to_string();
        let out = std::process::Command::new("bpftool")
            .args(["cgroup", "show", &path])
            .output()
            .expect("bpftool");
        assert!(out.status.success(), "bpftool cgroup show {path}: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" xlb_"))
            .count()
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() && std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            for pid in pids {
                // SAFETY: plain system call; these PIDs are the test's curls in its cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove {}", self.path.display());
    }
}

fn web_forwards(report: &lb_agent::status::Report) -> bool {
    report.services.iter().any(|s| {
        s.name.contains("shop/web") && s.backends.iter().any(|b| b.forwarding && b.share > 0.0)
    })
}

#[test]
fn the_daemonsets_capabilities_attach_forward_and_adopt_pins() {
    let privileges = daemonset_privileges();
    daemonset_runs_socket_lb();
    let bed = Bed::new("caps-ok");
    let mut agent = bed.agent(
        "caps-ok",
        &launcher(&privileges.capabilities, privileges.no_new_privs),
    );
    agent
        .wait_for(SETTLE, web_forwards)
        .expect("the agent programs the service");

    // The agent really ran with exactly the DaemonSet's set.
    let pid = agent.pid().expect("running");
    let want = privileges
        .capabilities
        .iter()
        .fold(0u64, |m, c| m | (1 << bit(c)));
    for field in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(
            mask(&proc_status_field(pid, field)),
            want,
            "{field} of the agent: {:?}",
            privileges.capabilities
        );
    }
    assert_eq!(mask(&proc_status_field(pid, "CapInh:")), 0);
    assert_eq!(mask(&proc_status_field(pid, "CapAmb:")), 0);
    if privileges.no_new_privs {
        assert_eq!(proc_status_field(pid, "NoNewPrivs:"), "1");
    }

    assert_eq!(bed.topo.xdp_attached().len(), 2, "XDP on both interfaces");
    let vip = SocketAddr::new(IpAddr::V4(Topology::vip_v4(0)), 80);
    assert_eq!(
        testbed::http_get(&bed.topo.client, vip, TIMEOUT).expect("through the VIP"),
        "backend-0"
    );
    // The socket hooks: all eight attached to the child cgroup, and a node process in
    // it reaches the Service (its connect() is rewritten; no packet crosses XDP),
    // while one outside the cgroup is not translated.
    assert_eq!(bed.cgroup.xlb_programs(), 8, "the socket hooks");
    let url = format!("http://{vip}/");
    assert_eq!(
        bed.node_curl(&url, true).as_deref(),
        Some("backend-0"),
        "a node process in the cgroup reaches the Service through the socket hooks"
    );
    assert_eq!(
        bed.node_curl(&url, false),
        None,
        "outside the cgroup the Service address is not translated"
    );
    // The L7 hop listens on port 80 (no Ingress here: its own 404).
    let l7 = format!("http://{}/", Topology::lb_client_v4());
    assert_eq!(
        testbed::curl_status(&bed.topo.client, &l7, &[]),
        Some(404),
        "the L7 hop on port 80"
    );

    // The admin port reads the maps under the same set: /metrics, and /trace with the
    // Maglev table rebuilt from BACKEND_META (opening the installed one by id needs
    // CAP_SYS_ADMIN, which the DaemonSet does not give).
    let admin = format!("http://{}:9190", Topology::lb_client_v4());
    let admin_get = |path: &str| {
        let out = bed
            .topo
            .client
            .exec(
                "curl",
                &["-sS", "--max-time", "2", &format!("{admin}{path}")],
            )
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let metrics = admin_get("/metrics");
    assert!(metrics.contains("xlb_dataplane_metrics_up 1"), "{metrics}");
    assert!(
        metrics.contains("xlb_table_entries{table=\"conntrack\"}"),
        "{metrics}"
    );
    let trace = admin_get(&format!(
        "/trace?proto=tcp&src={}:42000&dst={vip}",
        Topology::client_v4()
    ));
    assert!(trace.contains("rebuilt from BACKEND_META"), "{trace}");
    assert!(
        trace.contains(&format!(
            "\"backend\": \"{}:{PORT}\"",
            Topology::backend_v4(0)
        )),
        "{trace}"
    );

    // A restarted pod adopts the pinned maps and links with the same set.
    agent.kill9().expect("kill");
    agent.restart().expect("restart");
    agent
        .wait_for(SETTLE, |r| {
            web_forwards(r) && agent_log_has(&agent, "adopted pinned maps")
        })
        .expect("the restarted agent adopts the pins");
    assert!(
        agent_log_has(&agent, "adopted=8"),
        "the socket links adopted: {}",
        agent.log()
    );
    assert_eq!(
        testbed::http_get(&bed.topo.client, vip, TIMEOUT).expect("through the VIP"),
        "backend-0"
    );
    assert_eq!(bed.cgroup.xlb_programs(), 8, "the socket hooks, once each");
    assert_eq!(bed.node_curl(&url, true).as_deref(), Some("backend-0"));
}

fn agent_log_has(agent: &AgentProcess<'_>, text: &str) -> bool {
    agent.log().contains(text)
}

#[test]
fn without_any_one_of_them_the_agent_fails_naming_it() {
    let privileges = daemonset_privileges();
    daemonset_runs_socket_lb();
    let bed = Bed::new("caps-drop");
    for dropped in &privileges.capabilities {
        let rest: Vec<String> = privileges
            .capabilities
            .iter()
            .filter(|c| *c != dropped)
            .cloned()
            .collect();
        let tag = format!("caps-no-{}", dropped.to_lowercase().replace('_', "-"));
        let mut agent = bed.agent(&tag, &launcher(&rest, privileges.no_new_privs));
        let status = agent.wait_exit(SETTLE).expect("the agent exits");
        let log = agent.log();
        assert!(!status.success(), "without CAP_{dropped}: {status}\n{log}");
        let message = format!("missing capability CAP_{dropped} (");
        assert!(
            log.contains(&message),
            "without CAP_{dropped} the error names it; log:\n{log}"
        );
        // The kernel refused (EPERM or EACCES), not something else.
        assert!(
            log.contains("(os error 1)") || log.contains("(os error 13)"),
            "without CAP_{dropped} the kernel refuses; log:\n{log}"
        );
        assert!(
            bed.topo.xdp_attached().is_empty(),
            "nothing attached without CAP_{dropped}"
        );
        assert_eq!(
            bed.cgroup.xlb_programs(),
            0,
            "no socket hook attached without CAP_{dropped}"
        );
        assert!(
            !agent.pin_dir().exists()
                || lb_agent::dataplane::sockets::pinned_links(agent.pin_dir()).is_empty(),
            "no socket link pinned without CAP_{dropped}"
        );
    }
}
