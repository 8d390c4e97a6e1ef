//! `lb-agent ingress check` as an operator runs it: on the kubectl-shaped fixture of a
//! typical ingress-nginx deployment, exit status 2 (something would be served
//! differently) with the text or JSON report; 0 once only honoured annotations remain.

use std::path::{Path, PathBuf};
use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingress-nginx")
}

fn check(dir: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(AGENT)
        .args(["ingress", "check", "--manifests"])
        .arg(dir)
        .args(extra)
        .output()
        .expect("run lb-agent");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory removed on drop (also when the test fails).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_typical_ingress_nginx_deployment_would_differ() {
    let (code, out, err) = check(&fixture_dir(), &[]);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(out.contains("Ingress shop/legacy (NOT SERVED)"), "{out}");
    assert!(
        out.contains("REFUSED                nginx.ingress.kubernetes.io/configuration-snippet"),
        "{out}"
    );
    assert!(
        out.contains("honoured               nginx.ingress.kubernetes.io/canary-weight"),
        "{out}"
    );
    assert!(
        out.contains("Some requests would be served differently by xlb."),
        "{out}"
    );

    let (code, out, err) = check(&fixture_dir(), &["--json"]);
    assert_eq!(code, Some(2), "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert_eq!(json["class"], "nginx");
    assert_eq!(json["differs"], true);
    let web = json["ingresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["ingress"] == "shop/web")
        .expect("shop/web");
    let auth = web["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "nginx.ingress.kubernetes.io/auth-url")
        .expect("auth-url");
    assert_eq!(auth["verdict"], "differs");
    assert_eq!(auth["why"], "not supported by xlb");
}

#[test]
fn only_honoured_annotations_exit_zero() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("xlb-ingress-check-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    // The fixture without what differs (legacy's snippet, web's external auth).
    let text = std::fs::read_to_string(fixture_dir().join("cluster.yaml")).unwrap();
    let kept: Vec<&str> = text
        .split("\n- ")
        .filter(|item| !item.contains("name: legacy\n    namespace"))
        .collect();
    let mut kept: String = kept
        .join("\n- ")
        .lines()
        .filter(|line| !line.contains("nginx.ingress.kubernetes.io/auth-"))
        .flat_map(|line| [line, "\n"])
        .collect();
    if !kept.contains("\nkind: List") {
        // legacy was the last item, and the List's own tail went with it.
        kept.push_str("\nkind: List\n");
    }
    std::fs::write(dir.0.join("cluster.yaml"), kept).unwrap();
    let (code, out, err) = check(&dir.0, &[]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("xlb would serve these Ingresses as ingress-nginx does."),
        "{out}"
    );
    // A bad directory is an error (1), not a verdict.
    let (code, _, err) = check(&dir.0.join("missing"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot read"), "{err}");
}
