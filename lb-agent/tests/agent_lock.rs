//! One agent per pin directory: a second `lb-agent run` on the same `--bpffs` refuses
//! to start, naming the running agent's PID and the directory, before it attaches or
//! writes anything (also with `--replace`); `status` works beside the running agent and
//! `detach` warns that it runs. The lock dies with its holder: after `kill -9` an agent
//! starts on the same directory. Also: logs written to a pipe carry no ANSI colours.
//!
//! Runs as root in its own namespaces (the testbed topology).

use std::fmt::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lb_testbed::{self as testbed, AgentProcess, Netns, Topology};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
const PORT: u16 = 8080;
const SETTLE: Duration = Duration::from_secs(15);

/// What a bounded run of `lb-agent ARGS` in `ns` printed, and how it ended (`None`:
/// still running at the deadline, then killed).
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: Vec<u8>,
}

fn run_agent(ns: &Netns, args: &[&str], deadline: Duration) -> Ran {
    let dir = std::env::temp_dir();
    let tag = format!("xlb-lock-{}-{}", std::process::id(), args[0]);
    let (out_path, err_path) = (
        dir.join(format!("{tag}.out")),
        dir.join(format!("{tag}.err")),
    );
    let file = |path: &Path| Stdio::from(std::fs::File::create(path).expect("output file"));
    // nsenter keeps the host's mounts (the bpffs); the PID is the agent's own.
    let pid = ns
        .spawn_with_output(AGENT, args, file(&out_path), file(&err_path))
        .expect("spawn lb-agent");
    let end = Instant::now() + deadline;
    let code = loop {
        if let Some(status) = ns.try_wait(pid).expect("wait") {
            break status.code();
        }
        if Instant::now() > end {
            ns.kill(pid).expect("kill the agent that did not exit");
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ran = Ran {
        code,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    };
    let _ = std::fs::remove_file(out_path);
    let _ = std::fs::remove_file(err_path);
    ran
}

fn no_ansi(what: &str, stderr: &[u8]) {
    assert!(
        !stderr.contains(&0x1b),
        "{what}: ANSI escapes in a log written to a pipe:\n{}",
        String::from_utf8_lossy(stderr)
    );
}

#[test]
fn a_second_agent_on_one_pin_directory_refuses_to_start() {
    let topo = Topology::for_test("lock", 1);
    let config = std::env::temp_dir().join(format!("xlb-lock-{}.yaml", std::process::id()));
    let _servers = testbed::spawn_backend_http_servers(&topo, 0, PORT).expect("servers");
    let mut yaml = String::from(
        "services:\n  - name: web\n    frontends: [{ address: 203.0.113.10, port: 80 }]\n    backends:\n",
    );
    writeln!(
        yaml,
        "      - {{ address: {}, port: {PORT} }}",
        Topology::backend_v4(0)
    )
    .unwrap();
    testbed::write_atomically(&config, &yaml);
    let _cleanup = RemoveOnDrop(config.clone());

    let mut first = AgentProcess::start(&topo.lb, Path::new(AGENT), &config, "lock", &[])
        .expect("start the first agent");
    first
        .wait_for(SETTLE, |r| r.services.iter().any(|s| s.name == "web"))
        .expect("the first agent serves web");
    let pid = first.pid().expect("running");
    let dir = first.pin_dir().display().to_string();
    let vip = "203.0.113.10:80".parse().unwrap();
    let before = testbed::http_get(&topo.client, vip, Duration::from_secs(2)).expect("served");

    // Its own admin port, so only the pin directory is shared.
    let admin = format!("{}:9191", Topology::lb_client_v4());
    for extra in [&[][..], &["--replace"][..]] {
        let mut args = vec![
            "run",
            "--config",
            config.to_str().unwrap(),
            "--interface",
            Topology::LB_CLIENT_IF,
            "--bpffs",
            &dir,
            "--admin",
            &admin,
        ];
        args.extend_from_slice(extra);
        let second = run_agent(&topo.lb, &args, SETTLE);
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert_eq!(
            second.code,
            Some(1),
            "{extra:?}: the second agent exits:\n{stderr}"
        );
        assert!(
            stderr.contains(&format!(
                "another agent (PID {pid}) holds the pin directory {dir}"
            )),
            "{extra:?}: {stderr}"
        );
        assert!(
            !stderr.contains("attached XDP") && !stderr.contains("adopted"),
            "{stderr}"
        );
        no_ansi("a refused agent", &second.stderr);
        // Nothing was taken from the first agent: same pins, same traffic.
        first
            .wait_for(SETTLE, |r| r.services.iter().any(|s| s.name == "web"))
            .expect("the first agent's maps are intact");
        assert_eq!(
            testbed::http_get(&topo.client, vip, Duration::from_secs(2)).expect("still served"),
            before
        );
    }

    // status needs no lock.
    let status = run_agent(&topo.lb, &["status", "--bpffs", &dir], SETTLE);
    assert_eq!(
        status.code,
        Some(0),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(status.stdout.contains("web"), "{}", status.stdout);

    // The lock dies with its holder: the same directory is adopted after kill -9.
    first.kill9().expect("kill -9");
    first.restart().expect("restart");
    first
        .wait_for(SETTLE, |r| r.services.iter().any(|s| s.name == "web"))
        .expect("a new agent adopts the directory");
    let new_pid = first.pid().expect("running");

    // detach needs no lock either, and warns that an agent runs on the directory.
    let detach = run_agent(&topo.lb, &["detach", "--bpffs", &dir], SETTLE);
    let stderr = String::from_utf8_lossy(&detach.stderr);
    assert_eq!(detach.code, Some(0), "{stderr}");
    assert!(
        stderr.contains(&format!("agent PID {new_pid} is running on {dir}")),
        "{stderr}"
    );
    assert!(detach.stdout.contains("removed from"), "{}", detach.stdout);
    no_ansi("detach", &detach.stderr);
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
