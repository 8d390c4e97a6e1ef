//! The migration report on a kubectl-shaped fixture of a typical ingress-nginx
//! deployment (oauth2-proxy external auth, a canary by weight and header, a regex
//! rewrite, cookie affinity, CORS, an allowlist, a legacy snippet).

use std::path::Path;

use super::Verdict::{Honoured, Refused, Same};
use super::*;

fn fixture() -> Cluster {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ingress-nginx");
    cluster_from_manifests(&dir).expect("the fixture loads")
}

fn nginx() -> IngressClassConfig {
    IngressClassConfig {
        controller: ingress::INGRESS_NGINX_CONTROLLER.to_owned(),
        ..IngressClassConfig::new("nginx")
    }
}

fn verdicts(report: &Report, ingress: &str) -> Vec<(String, Verdict)> {
    report
        .ingresses
        .iter()
        .find(|i| i.ingress == ingress)
        .unwrap_or_else(|| panic!("no {ingress} in the report"))
        .annotations
        .iter()
        .map(|a| {
            (
                a.name
                    .trim_start_matches("nginx.ingress.kubernetes.io/")
                    .to_owned(),
                a.verdict,
            )
        })
        .collect()
}

#[test]
fn reports_every_annotation_of_a_typical_deployment() {
    let report = report(&fixture(), &nginx());
    let names: Vec<&str> = report
        .ingresses
        .iter()
        .map(|i| i.ingress.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "shop/api",
            "shop/legacy",
            "shop/oauth2-proxy",
            "shop/web",
            "shop/web-canary"
        ]
    );
    let owned = |v: &[(&str, Verdict)]| -> Vec<(String, Verdict)> {
        v.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
    };
    assert_eq!(
        verdicts(&report, "shop/web"),
        owned(&[
            ("cert-manager.io/cluster-issuer", Same),
            ("affinity", Honoured),
            ("auth-response-headers", Honoured),
            ("auth-signin", Honoured),
            ("auth-url", Honoured),
            ("proxy-buffer-size", Same),
            ("session-cookie-max-age", Honoured),
            ("session-cookie-name", Honoured),
        ])
    );
    assert_eq!(
        verdicts(&report, "shop/api"),
        owned(&[
            ("cors-allow-origin", Honoured),
            ("enable-cors", Honoured),
            ("proxy-read-timeout", Honoured),
            ("proxy-send-timeout", Honoured),
            ("rewrite-target", Honoured),
            ("use-regex", Honoured),
        ])
    );
    assert_eq!(
        verdicts(&report, "shop/legacy"),
        owned(&[
            ("kubernetes.io/ingress.class", Honoured),
            ("configuration-snippet", Refused),
        ])
    );
    let by_name = |n: &str| report.ingresses.iter().find(|i| i.ingress == n).unwrap();
    assert!(!by_name("shop/legacy").served);
    assert!(by_name("shop/legacy").differs());
    for fine in [
        "shop/api",
        "shop/oauth2-proxy",
        "shop/web",
        "shop/web-canary",
    ] {
        assert!(!by_name(fine).differs(), "{fine}: {:#?}", by_name(fine));
        assert!(by_name(fine).served);
    }
    assert!(report.differs);
    let text = report.text();
    assert!(text.contains("Ingress shop/legacy (NOT SERVED)"), "{text}");
    assert!(
        text.contains("  honoured               nginx.ingress.kubernetes.io/auth-url\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "5 Ingresses of class nginx: 17 annotations honoured, 2 ignored with the same result, \
         0 ignored with a different result, 1 refused; 0 problems"
        ),
        "{text}"
    );
    let json: serde_json::Value = serde_json::to_value(&report).unwrap();
    assert_eq!(json["differs"], true);
    assert_eq!(json["ingresses"][1]["annotations"][1]["verdict"], "refused");
}

/// The routes the report describes are the ones the hop would serve: the canary joins
/// web's route, the regex rewrite applies, the refused Ingress routes nothing.
#[test]
fn the_fixture_translates_as_the_report_says() {
    let t = ingress::translate(&fixture(), &nginx());
    let web = t.routes.lookup("shop.example.com", "/cart").expect("web");
    assert_eq!(web.policy.canary.as_ref().unwrap().weight, 10);
    assert_eq!(web.policy.affinity.as_ref().unwrap().cookie_name, "route");
    let api = t
        .routes
        .lookup("api.example.com", "/v1/orders")
        .expect("api");
    let rewrite = api.policy.rewrite.as_ref().unwrap();
    assert_eq!(
        rewrite.apply("/v1/orders", None).as_deref(),
        Some("/orders")
    );
    assert!(api.policy.cors.is_some());
    let auth = t
        .routes
        .lookup("auth.example.com", "/oauth2/start")
        .expect("auth");
    assert!(auth.policy.access.is_some());
    assert!(t.routes.lookup("legacy.example.com", "/").is_none());
}

/// `backend-protocol` is honoured by name, but a value xlb cannot speak refuses the
/// Ingress, and the report says so on the annotation itself.
#[test]
fn a_backend_protocol_xlb_cannot_speak_is_refused_by_value() {
    let with = |value: &str| {
        let mut cluster = fixture();
        let key = ObjectKey::new("shop", "api");
        let mut api = (*cluster.ingresses[&key]).clone();
        api.metadata.annotations.get_or_insert_default().insert(
            "nginx.ingress.kubernetes.io/backend-protocol".to_owned(),
            value.to_owned(),
        );
        cluster.ingresses.insert(key, std::sync::Arc::new(api));
        report(&cluster, &nginx())
    };
    let verdict = |report: &Report| {
        verdicts(report, "shop/api")
            .into_iter()
            .find(|(n, _)| n == "backend-protocol")
            .unwrap()
            .1
    };
    let api = |report: &Report| {
        report
            .ingresses
            .iter()
            .find(|i| i.ingress == "shop/api")
            .unwrap()
            .clone()
    };
    let grpcs = with("GRPCS");
    assert_eq!(verdict(&grpcs), Honoured);
    assert!(api(&grpcs).served && !api(&grpcs).differs());
    let fcgi = with("FCGI");
    assert_eq!(verdict(&fcgi), Refused);
    assert!(!api(&fcgi).served && api(&fcgi).differs());
    // The refusal is the annotation's verdict, not repeated as a problem.
    assert!(api(&fcgi).problems.is_empty(), "{:#?}", api(&fcgi).problems);
    assert!(
        fcgi.text()
            .contains("backend-protocol: xlb speaks HTTP, HTTPS"),
        "{}",
        fcgi.text()
    );
}
