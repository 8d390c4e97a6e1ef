//! `lb-agent ingress check` as an operator runs it: on the kubectl-shaped fixture of a
//! typical ingress-nginx deployment, exit status 2 (something would be served
//! differently) with the text or JSON report; 0 once only honoured annotations remain.
//! The same fixture served by the test API server (testbed::apiserver) and read with
//! `--kube` gets the same verdicts.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use lb_core::cluster::Object;
use lb_testbed::{self as testbed, ApiServer, Netns};

const AGENT: &str = env!("CARGO_BIN_EXE_lb-agent");
/// Longest one `--kube` check may run (the agent's own listing deadline is a minute).
const KUBE_CHECK_TIMEOUT_SECS: &str = "90";

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
    outcome(&out)
}

/// `lb-agent ingress check --kube` inside `ns` (where the server listens), its
/// KUBECONFIG the server's.
fn check_kube(ns: &Netns, server: &ApiServer, extra: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "timeout",
            KUBE_CHECK_TIMEOUT_SECS,
            "env",
        ])
        .arg(format!("KUBECONFIG={}", server.kubeconfig().display()))
        .args([AGENT, "ingress", "check", "--kube"])
        .args(extra)
        .output()
        .expect("run lb-agent in the netns");
    outcome(&out)
}

fn outcome(out: &Output) -> (Option<i32>, String, String) {
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

/// The fixture's items as the API server stores them (kubectl's List, parsed here
/// by kind rather than by the agent's manifests reader, so `--kube` is checked alone).
fn fixture_objects() -> Vec<Object> {
    let text = std::fs::read_to_string(fixture_dir().join("cluster.yaml")).expect("fixture");
    let list: serde_yaml::Value = serde_yaml::from_str(&text).expect("fixture YAML");
    let items = list["items"].as_sequence().expect("a List's items");
    items
        .iter()
        .map(|item| {
            let kind = item["kind"].as_str().expect("an item's kind");
            let item = item.clone();
            match kind {
                "Service" => Object::Service(serde_yaml::from_value::<Service>(item).unwrap()),
                "EndpointSlice" => {
                    Object::EndpointSlice(serde_yaml::from_value::<EndpointSlice>(item).unwrap())
                }
                "Ingress" => Object::Ingress(serde_yaml::from_value::<Ingress>(item).unwrap()),
                "IngressClass" => {
                    Object::IngressClass(serde_yaml::from_value::<IngressClass>(item).unwrap())
                }
                other => panic!("the fixture has a {other}, which this test does not serve"),
            }
        })
        .collect()
}

/// What the fixture's text report must say, from either source.
fn assert_text_verdicts(code: Option<i32>, out: &str, err: &str) {
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
}

/// What the fixture's JSON report must say, from either source.
fn assert_json_verdicts(code: Option<i32>, out: &str, err: &str) {
    assert_eq!(code, Some(2), "{err}");
    let json: serde_json::Value = serde_json::from_str(out).expect("JSON report");
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
    assert_eq!(auth["verdict"], "honoured");
}

#[test]
fn a_typical_ingress_nginx_deployment_would_differ() {
    let (code, out, err) = check(&fixture_dir(), &[]);
    assert_text_verdicts(code, &out, &err);
    // The whole report, as reviewed: every annotation honoured (the oauth2-proxy
    // external auth included) but the legacy Ingress's snippet.
    let expected = std::fs::read_to_string(fixture_dir().join("check.txt")).expect("check.txt");
    assert_eq!(out, expected);
    let (code, out, err) = check(&fixture_dir(), &["--json"]);
    assert_json_verdicts(code, &out, &err);
}

#[test]
fn the_same_deployment_read_from_the_api_server_would_differ() {
    testbed::check_privileges().expect("privileges");
    let ns = Netns::new("icheck").expect("netns");
    let server = ApiServer::start(&ns).expect("API server");
    server.apply_all(fixture_objects());

    let (code, text, err) = check_kube(&ns, &server, &[]);
    assert_text_verdicts(code, &text, &err);
    let (code, json, err) = check_kube(&ns, &server, &["--json"]);
    assert_json_verdicts(code, &json, &err);

    // The whole report, not only the lines asserted, matches the manifests' one.
    assert_eq!(text, check(&fixture_dir(), &[]).1);
    assert_eq!(json, check(&fixture_dir(), &["--json"]).1);
    // And it came from the server: both runs listed the Ingresses there.
    let ingress_lists = server
        .requests()
        .iter()
        .filter(|r| r.resource == "ingresses" && r.verb == "list")
        .count();
    assert_eq!(ingress_lists, 2, "{:?}", server.requests());
}

#[test]
fn only_honoured_annotations_exit_zero() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("xlb-ingress-check-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    // The fixture without what differs (legacy's snippet); web's external auth and
    // affinity are honoured.
    let text = std::fs::read_to_string(fixture_dir().join("cluster.yaml")).unwrap();
    let kept: Vec<&str> = text
        .split("\n- ")
        .filter(|item| !item.contains("name: legacy\n    namespace"))
        .collect();
    let mut kept: String = kept.join("\n- ");
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
