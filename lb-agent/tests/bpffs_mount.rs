//! The agent on a machine where /sys/fs/bpf is not a bpffs (a fresh host, a container
//! without the mount): it mounts one itself before anything is attached, and when it
//! cannot, it fails before attaching anything and says what to run.
//!
//! Every agent here runs in its own private mount namespace (`unshare --mount
//! --propagation private`, started by PID through the testbed), in which an empty tmpfs
//! covers /sys/fs/bpf. The test's own mount namespace is never changed: each test checks
//! that its /sys/fs/bpf mounts are the same afterwards. Killing the agent by PID ends
//! its mount namespace, and with it the bpffs it mounted and everything pinned there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_agent::dataplane::pins;
use lb_testbed::{self as testbed, AgentProcess, ServerHandle, Topology, TopologyConfig};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const SETTLE: Duration = Duration::from_secs(15);
/// The source name of the tmpfs the tests put over /sys/fs/bpf, to recognise it.
const COVER: &str = "xlb-test-no-bpffs";

/// A shell command that makes /sys/fs/bpf an empty tmpfs in the (already private) mount
/// namespace it runs in, then execs its arguments (so the PID stays the agent's).
fn cover_script() -> String {
    format!("mount -t tmpfs {COVER} {} && exec \"$@\"", pins::BPFFS_ROOT)
}

/// `unshare` into a private mount namespace with /sys/fs/bpf covered, then `rest`, then
/// the agent (the testbed appends it and its arguments).
fn launcher(rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &cover_script(),
        "sh",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(rest.iter().map(|s| (*s).to_owned()));
    args
}

/// The mounts at /sys/fs/bpf in a process's mount namespace, bottom to top, as
/// (file system type, source) from `/proc/PID/mountinfo`.
fn bpffs_root_mounts(pid: &str) -> Vec<(String, String)> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    info.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(4) != Some(&pins::BPFFS_ROOT) {
                return None;
            }
            let dash = fields.iter().position(|f| *f == "-")?;
            Some((
                (*fields.get(dash + 1)?).to_owned(),
                (*fields.get(dash + 2)?).to_owned(),
            ))
        })
        .collect()
}

fn vip() -> SocketAddr {
    SocketAddr::new(Topology::vip_v4(0).into(), 80)
}

struct Bed {
    topo: Topology,
    _servers: Vec<ServerHandle>,
    config: PathBuf,
    /// This process's mounts at /sys/fs/bpf when the bed was made.
    mounts_before: Vec<(String, String)>,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        testbed::check_privileges().expect("privileges");
        let mounts_before = bpffs_root_mounts("self");
        let topo = Topology::build(&TopologyConfig::new(tag, 1)).expect("topology");
        topo.wait_ready().expect("topology ready");
        let servers = testbed::spawn_backend_http_servers(&topo, 0, PORT).expect("servers");
        let config = std::env::temp_dir().join(format!("xlb-{tag}-{}.yaml", std::process::id()));
        testbed::write_atomically(
            &config,
            &format!(
                "services:\n  - name: web\n    frontends: [{{ address: {}, port: 80, protocol: TCP }}]\n    backends: [{{ address: {}, port: {PORT} }}]\n",
                Topology::vip_v4(0),
                Topology::backend_v4(0)
            ),
        );
        Bed {
            topo,
            _servers: servers,
            config,
            mounts_before,
        }
    }

    fn agent(&self, tag: &str, launcher: &[String]) -> AgentProcess<'_> {
        let launcher: Vec<&str> = launcher.iter().map(String::as_str).collect();
        AgentProcess::start_with_launcher(
            &self.topo.lb,
            &launcher,
            Path::new(AGENT),
            &self.config,
            tag,
            &["--poll-ms", "100"],
        )
        .expect("start agent")
    }

    /// The test's own mount namespace is as it was.
    fn assert_own_mounts_unchanged(&self) {
        let now = bpffs_root_mounts("self");
        assert_eq!(
            now, self.mounts_before,
            "the test's own mounts at /sys/fs/bpf changed"
        );
        assert!(now.iter().all(|(_, source)| source != COVER));
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

#[test]
fn the_agent_mounts_bpffs_where_there_is_none_and_forwards() {
    let bed = Bed::new("bpffs-mount");
    let agent = bed.agent("bpffs-mount", &launcher(&[]));
    let pid = agent.pid().expect("agent pid").to_string();
    agent.until("a request through the VIP is answered", SETTLE, || {
        testbed::http_get(&bed.topo.client, vip(), Duration::from_secs(2)).is_ok()
    });
    let log = agent.log();
    assert!(
        log.contains("mounted bpffs on /sys/fs/bpf"),
        "the agent says it mounted bpffs:\n{log}"
    );

    // In the agent's mount namespace: our empty tmpfs, and the agent's bpffs on top.
    let mounts = bpffs_root_mounts(&pid);
    assert!(mounts.len() >= 2, "{mounts:?}");
    assert_eq!(
        mounts.iter().map(|(fs, _)| fs.as_str()).collect::<Vec<_>>()[mounts.len() - 2..],
        ["tmpfs", "bpf"],
        "{mounts:?}"
    );
    assert_eq!(mounts[mounts.len() - 2].1, COVER);
    // The pins are there: `lb-agent status` in the agent's mount namespace reads them.
    let status = Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .args(["--", AGENT, "status", "--bpffs"])
        .arg(agent.pin_dir())
        .output()
        .expect("nsenter lb-agent status");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success() && text.contains("web"),
        "status in the agent's namespace: {}\n{text}{}",
        status.status,
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(
        bed.topo.xdp_attached(),
        [Topology::LB_CLIENT_IF, Topology::LB_BACKEND_IF]
    );
    // Nothing of it is in the test's namespace.
    bed.assert_own_mounts_unchanged();
    assert!(
        !agent.pin_dir().exists(),
        "pins leaked into the test's namespace"
    );

    // Killed by PID, the agent takes its mount namespace with it: the bpffs holding the
    // links goes away and XDP is detached.
    drop(agent);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bed.topo.xdp_attached().is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        bed.topo.xdp_attached(),
        Vec::<&str>::new(),
        "XDP left attached"
    );
    bed.assert_own_mounts_unchanged();
}

#[test]
fn without_the_right_to_mount_the_agent_fails_before_attaching() {
    let bed = Bed::new("bpffs-eperm");
    // Root without CAP_SYS_ADMIN (bounding and inheritable sets), which mount(2) needs.
    let mut agent = bed.agent(
        "bpffs-eperm",
        &launcher(&[
            "setpriv",
            "--inh-caps=-sys_admin",
            "--ambient-caps=-sys_admin",
            "--bounding-set=-sys_admin",
            "--",
        ]),
    );
    let status = agent
        .wait_exit(Duration::from_secs(10))
        .expect("agent exits");
    let log = agent.log();
    assert!(!status.success(), "{log}");
    for wanted in [
        agent.pin_dir().display().to_string().as_str(),
        "not on a bpf filesystem (/sys/fs/bpf is tmpfs)",
        "mounting bpffs on /sys/fs/bpf failed: EPERM",
        "mount -t bpf bpf /sys/fs/bpf",
    ] {
        assert!(log.contains(wanted), "no {wanted:?} in the log:\n{log}");
    }
    assert!(!log.contains("attached XDP"), "{log}");
    assert_eq!(bed.topo.xdp_attached(), Vec::<&str>::new());
    bed.assert_own_mounts_unchanged();
}

/// `lb-agent status` and `detach` where nothing is mounted say so.
#[test]
fn status_and_detach_without_bpffs_say_nothing_is_mounted() {
    testbed::check_privileges().expect("privileges");
    let before = bpffs_root_mounts("self");
    let run = |args: &[&str]| {
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(cover_script())
            .args(["sh", AGENT])
            .args(args)
            .output()
            .expect("unshare lb-agent");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(&["status", "--bpffs", "/sys/fs/bpf/xlb"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("nothing pinned under /sys/fs/bpf/xlb")
            && text.contains("not on a bpf filesystem (/sys/fs/bpf is tmpfs)"),
        "{text}"
    );
    let (ok, text) = run(&["detach", "--bpffs", "/sys/fs/bpf/xlb"]);
    assert!(ok, "{text}");
    assert!(text.contains("nothing to detach"), "{text}");
    assert_eq!(bpffs_root_mounts("self"), before);
}
