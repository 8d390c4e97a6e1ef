use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use super::annotations::*;
use super::*;
use crate::cluster::{CA_CERT_KEY, Object};
use crate::model::fixtures;
use crate::routes::{Balance, Redirect};

mod auth;

fn xlb() -> IngressClassConfig {
    IngressClassConfig::new("xlb")
}

fn shop() -> Vec<Object> {
    fixtures::load("ingress-shop.yaml")
}

fn run(objects: &[Object]) -> IngressTranslation {
    translate(&fixtures::cluster(objects), &xlb())
}

/// `upstream <- ingress` for a request, `None` for a 404.
fn to(t: &IngressTranslation, host: &str, path: &str) -> Option<String> {
    t.routes
        .lookup(host, path)
        .map(|r| format!("{} <- {}", r.upstream.name, r.ingress.name))
}

fn route<'a>(t: &'a IngressTranslation, host: &str, path: &str) -> &'a Route {
    t.routes
        .lookup(host, path)
        .unwrap_or_else(|| panic!("no route for {host}{path}"))
}

fn problems(t: &IngressTranslation) -> Vec<String> {
    t.problems.iter().map(ToString::to_string).collect()
}

fn ingress_mut<'a>(objects: &'a mut [Object], name: &str) -> &'a mut Ingress {
    objects
        .iter_mut()
        .find_map(|o| match o {
            Object::Ingress(i) if i.metadata.name.as_deref() == Some(name) => Some(i),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no Ingress {name} in the fixture"))
}

fn annotate(objects: &mut [Object], ingress: &str, pairs: &[(&str, &str)]) {
    let annotations = ingress_mut(objects, ingress)
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    for (k, v) in pairs {
        annotations.insert(full_name(k), (*v).to_owned());
    }
}

/// An annotation's full name: names without a `/` are under ingress-nginx's prefix.
fn full_name(name: &str) -> String {
    if name.contains('/') {
        name.to_owned()
    } else {
        format!("{DEFAULT_PREFIX}/{name}")
    }
}

fn created(objects: &mut [Object], ingress: &str, at: &str) {
    ingress_mut(objects, ingress).metadata.creation_timestamp = Some(Time(at.parse().unwrap()));
}

fn keys(keys: &[ObjectKey]) -> Vec<String> {
    keys.iter().map(ToString::to_string).collect()
}

#[test]
fn class_by_name_annotation_and_default_class() {
    let t = run(&shop());
    // other (ingressClassName nginx) and other-legacy (annotation nginx) are not ours;
    // payments has no class and is ours because xlb is the default class.
    assert_eq!(
        keys(&t.owned),
        [
            "shop/api",
            "shop/catchall",
            "shop/late-default",
            "shop/legacy",
            "shop/payments",
            "shop/storefront"
        ]
    );
    // The older nginx Ingress for shop.example.com / does not take the route.
    assert_eq!(
        to(&t, "shop.example.com", "/").as_deref(),
        Some("shop/web:80 <- storefront")
    );
}

#[test]
fn without_the_default_annotation_classless_ingresses_are_not_ours() {
    let mut objects = shop();
    for object in &mut objects {
        if let Object::IngressClass(c) = object {
            c.metadata.annotations = None;
        }
    }
    let t = run(&objects);
    assert!(!keys(&t.owned).contains(&"shop/payments".to_owned()));
    assert!(keys(&t.owned).contains(&"shop/legacy".to_owned()));
    // pay.example.com now meets the wildcard rule instead of payments' ExternalName.
    assert_eq!(
        to(&t, "pay.example.com", "/").as_deref(),
        Some("shop/web:80 <- api")
    );
}

#[test]
fn a_default_class_of_another_controller_is_not_ours() {
    let mut objects = shop();
    for object in &mut objects {
        if let Object::IngressClass(c) = object
            && c.metadata.name.as_deref() == Some("xlb")
        {
            c.spec.as_mut().unwrap().controller = Some("k8s.io/ingress-nginx".into());
        }
    }
    let t = run(&objects);
    assert!(!keys(&t.owned).contains(&"shop/payments".to_owned()));
    assert!(
        problems(&t).contains(
            &"IngressClass /xlb: spec.controller: \"k8s.io/ingress-nginx\" is not \
              xlb.dev/ingress-controller: not taken as the default class"
                .to_owned()
        ),
        "{:#?}",
        problems(&t)
    );
}

#[test]
fn hosts_exact_wildcard_and_hostless() {
    let t = run(&shop());
    // Exact host, any case, with a port.
    assert_eq!(
        to(&t, "SHOP.example.COM:8443", "/cart").as_deref(),
        Some("shop/web:80 <- storefront")
    );
    // The wildcard covers one label only.
    assert_eq!(
        to(&t, "blog.example.com", "/").as_deref(),
        Some("shop/web:80 <- api")
    );
    assert_eq!(
        to(&t, "example.com", "/static/a.css").as_deref(),
        Some("shop/static:80 <- catchall")
    );
    assert_eq!(
        to(&t, "a.blog.example.com", "/static/a.css").as_deref(),
        Some("shop/static:80 <- catchall")
    );
    // Exact beats the wildcard that also covers it.
    assert_eq!(
        to(&t, "shop.example.com", "/api/v1").as_deref(),
        Some("shop/api:9000 <- api")
    );
}

#[test]
fn a_known_host_does_not_fall_through_to_hostless_rules() {
    let t = run(&shop());
    // legacy.example.com routes only /legacy; /static exists only host-less, and a
    // request for a host with its own rules gets the default backend instead.
    assert_eq!(
        to(&t, "legacy.example.com", "/legacy/x").as_deref(),
        Some("shop/web:80 <- legacy")
    );
    assert_eq!(
        to(&t, "legacy.example.com", "/static/a.css").as_deref(),
        Some("shop/web:80 <- catchall")
    );
    assert_eq!(
        to(&t, "unknown.test", "/static/a.css").as_deref(),
        Some("shop/static:80 <- catchall")
    );
}

#[test]
fn no_match_and_no_default_backend_is_a_404() {
    let mut objects = shop();
    objects.retain(|o| !matches!(o.meta().name.as_deref(), Some("catchall" | "late-default")));
    let t = run(&objects);
    assert_eq!(t.routes.default_route(), None);
    assert_eq!(to(&t, "legacy.example.com", "/elsewhere"), None);
    assert_eq!(to(&t, "unknown.test", "/"), None);
    assert_eq!(
        to(&t, "legacy.example.com", "/legacy").as_deref(),
        Some("shop/web:80 <- legacy")
    );
}

#[test]
fn ingresses_for_one_host_merge_and_the_oldest_wins_a_conflict() {
    let t = run(&shop());
    // storefront (older) owns shop.example.com Prefix /; api adds /api.
    assert_eq!(
        to(&t, "shop.example.com", "/").as_deref(),
        Some("shop/web:80 <- storefront")
    );
    assert_eq!(
        to(&t, "shop.example.com", "/api").as_deref(),
        Some("shop/api:9000 <- api")
    );
    assert!(
        problems(&t).contains(
            &"Ingress shop/api: spec.rules[0].http.paths[1]: Prefix path \"/\" of \
              shop.example.com is already routed by Ingress shop/storefront (older) \
              spec.rules[0].http.paths[0]"
                .to_owned()
        ),
        "{:#?}",
        problems(&t)
    );

    // Make api the older one: it takes / and storefront is told.
    let mut objects = shop();
    created(&mut objects, "api", "2025-05-31T09:00:00Z");
    let t = run(&objects);
    assert_eq!(
        to(&t, "shop.example.com", "/").as_deref(),
        Some("shop/api:9000 <- api")
    );
    assert_eq!(
        to(&t, "shop.example.com", "/healthz").as_deref(),
        Some("shop/web:80 <- storefront")
    );
    assert!(problems(&t).iter().any(|p| {
        p.starts_with("Ingress shop/storefront: spec.rules[0].http.paths[0]: Prefix path \"/\"")
    }));
}

#[test]
fn same_age_conflicts_go_to_namespace_then_name() {
    let mut objects = shop();
    created(&mut objects, "api", "2025-06-01T09:00:00Z");
    let t = run(&objects);
    // Same creationTimestamp: shop/api sorts before shop/storefront.
    assert_eq!(
        to(&t, "shop.example.com", "/").as_deref(),
        Some("shop/api:9000 <- api")
    );
}

#[test]
fn exact_and_prefix_of_one_path_do_not_conflict() {
    let mut objects = shop();
    let api = ingress_mut(&mut objects, "api");
    let paths = &mut api.spec.as_mut().unwrap().rules.as_mut().unwrap()[0]
        .http
        .as_mut()
        .unwrap()
        .paths;
    paths[1].path = Some("/healthz".into());
    paths[1].path_type = "Prefix".into();
    let t = run(&objects);
    assert_eq!(
        to(&t, "shop.example.com", "/healthz").as_deref(),
        Some("shop/web:80 <- storefront")
    );
    assert_eq!(
        to(&t, "shop.example.com", "/healthz/deep").as_deref(),
        Some("shop/api:9000 <- api")
    );
    assert!(
        !problems(&t).iter().any(|p| p.contains("already routed")),
        "{:#?}",
        problems(&t)
    );
}

#[test]
fn the_oldest_default_backend_wins() {
    let t = run(&shop());
    let default = t.routes.default_route().expect("a default backend");
    assert_eq!(default.upstream.name, "shop/web:80");
    assert_eq!(default.ingress, ObjectKey::new("shop", "catchall"));
    assert!(
        problems(&t).contains(
            &"Ingress shop/late-default: spec.defaultBackend: Ingress shop/catchall (older) \
          already sets the default backend"
                .to_owned()
        )
    );
}

#[test]
fn ports_by_number_and_name_share_one_upstream_of_ready_endpoints() {
    let t = run(&shop());
    let by_number = route(&t, "shop.example.com", "/");
    let by_name = route(&t, "shop.example.com", "/healthz");
    assert!(Arc::ptr_eq(&by_number.upstream, &by_name.upstream));
    // 192.0.2.22 is not ready; 192.0.2.23 is serving but terminating and a ready one exists.
    let ready: Vec<SocketAddr> = vec!["192.0.2.21:8080".parse().unwrap()];
    assert_eq!(by_number.upstream.target, Target::Endpoints(ready));
    assert_eq!(by_number.upstream.protocol, UpstreamProtocol::Http1);
    // The wildcard route and the default backend use it too.
    assert!(Arc::ptr_eq(
        &by_number.upstream,
        &route(&t, "x.example.com", "/").upstream
    ));
}

/// The L7 hop uses the same rule as L4: an endpoint on the node itself, on no host or
/// on the Service's own addresses never becomes an upstream endpoint (the hop would
/// otherwise connect to the node's loopback), and each is a problem.
#[test]
fn the_hop_never_gets_an_unusable_endpoint() {
    let t = run(&fixtures::load("unusable-endpoints.yaml"));
    let good: Vec<SocketAddr> = [
        "192.0.2.40:8080",
        "192.0.2.41:8080",
        "[2001:db8:b::40]:8080",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    assert_eq!(
        route(&t, "trap.example.com", "/").upstream.target,
        Target::Endpoints(good)
    );
    let problems = problems(&t);
    assert_eq!(problems.len(), 14, "{problems:#?}");
    assert!(
        problems.contains(
            &"EndpointSlice shop/trap-v4: endpoints[1].addresses[0]: 127.0.0.1 is a loopback \
              address"
                .to_owned()
        ),
        "{problems:#?}"
    );
}

#[test]
fn a_drained_endpoint_gets_no_requests() {
    let mut objects = shop();
    for object in &mut objects {
        if let Object::EndpointSlice(slice) = object
            && slice.metadata.name.as_deref() == Some("web-x7k2p")
        {
            slice
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(
                    crate::model::kubernetes::ENDPOINT_WEIGHTS_ANNOTATION.to_owned(),
                    "192.0.2.21=0".to_owned(),
                );
        }
    }
    let t = run(&objects);
    // 192.0.2.21, the only ready endpoint, is drained: none is left for new requests
    // (the L4 table drops it the same way).
    assert_eq!(
        route(&t, "shop.example.com", "/").upstream.target,
        Target::Endpoints(Vec::new())
    );
}

#[test]
fn serving_terminating_endpoints_are_used_when_none_is_ready() {
    let mut objects = shop();
    for object in &mut objects {
        if let Object::EndpointSlice(slice) = object
            && slice.metadata.name.as_deref() == Some("web-x7k2p")
        {
            slice.endpoints[0].conditions.as_mut().unwrap().ready = Some(false);
        }
    }
    let t = run(&objects);
    let ready: Vec<SocketAddr> = vec!["192.0.2.23:8080".parse().unwrap()];
    assert_eq!(
        route(&t, "shop.example.com", "/").upstream.target,
        Target::Endpoints(ready)
    );
}

#[test]
fn h2c_app_protocol() {
    let t = run(&shop());
    let api = route(&t, "shop.example.com", "/api");
    assert_eq!(api.upstream.protocol, UpstreamProtocol::H2c);
    assert_eq!(
        api.upstream.target,
        Target::Endpoints(vec!["192.0.2.31:9000".parse().unwrap()])
    );
}

#[test]
fn external_name_is_a_dns_target_on_the_ingress_port() {
    let t = run(&shop());
    let pay = route(&t, "pay.example.com", "/");
    assert_eq!(pay.upstream.name, "shop/payments:443");
    assert_eq!(
        pay.upstream.target,
        Target::Dns {
            host: "payments.billing.svc.cluster.local".into(),
            port: 443
        }
    );
    // By port name: kept (503) with a problem.
    let by_name = route(&t, "pay.example.com", "/by-name");
    assert_eq!(by_name.upstream.target, Target::Endpoints(Vec::new()));
    assert!(
        problems(&t).contains(
            &"Ingress shop/payments: spec.rules[0].http.paths[1].backend.service.port: Service \
          shop/payments is ExternalName: name the port by number; routes answer 503"
                .to_owned()
        )
    );
}

#[test]
fn a_missing_service_or_port_keeps_the_route_without_endpoints() {
    let t = run(&shop());
    let statics = route(&t, "unknown.test", "/static");
    assert_eq!(statics.upstream.name, "shop/static:80");
    assert_eq!(statics.upstream.target, Target::Endpoints(Vec::new()));
    assert!(
        problems(&t).contains(
            &"Ingress shop/catchall: spec.rules[0].http.paths[0].backend.service.name: Service \
          shop/static not found: its routes answer 503"
                .to_owned()
        )
    );

    let mut objects = shop();
    let web = ingress_mut(&mut objects, "storefront");
    let paths = &mut web.spec.as_mut().unwrap().rules.as_mut().unwrap()[0]
        .http
        .as_mut()
        .unwrap()
        .paths;
    paths[1]
        .backend
        .service
        .as_mut()
        .unwrap()
        .port
        .as_mut()
        .unwrap()
        .name = Some("admin".into());
    let t = run(&objects);
    assert_eq!(
        route(&t, "shop.example.com", "/healthz").upstream.target,
        Target::Endpoints(Vec::new())
    );
    assert!(
        problems(&t).contains(
            &"Ingress shop/storefront: spec.rules[0].http.paths[1].backend.service.port: \
          Service shop/web has no TCP port admin: routes answer 503"
                .to_owned()
        )
    );
}

#[test]
fn resource_backends_are_reported_and_not_routed() {
    let t = run(&shop());
    assert!(
        problems(&t).contains(
            &"Ingress shop/catchall: spec.rules[0].http.paths[1].backend.resource: resource \
          backends are not supported"
                .to_owned()
        )
    );
    // /assets falls to the default backend.
    assert_eq!(
        to(&t, "unknown.test", "/assets/x").as_deref(),
        Some("shop/web:80 <- catchall")
    );
}

#[test]
fn honoured_annotations_shape_the_routes() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            (PROXY_BODY_SIZE, "8m"),
            (LOAD_BALANCE, "least-request"),
            (
                "nginx.ingress.kubernetes.io/mirror-target",
                "https://mirror.test",
            ),
            (PROXY_SEND_TIMEOUT, "30"),
            (PROXY_READ_TIMEOUT, "120"),
            (PROXY_CONNECT_TIMEOUT, "2s"),
            ("client-body-buffer-size", "1m"),
        ],
    );
    annotate(
        &mut objects,
        "api",
        &[
            (PROXY_BODY_SIZE, "0"),
            (LOAD_BALANCE, "random"),
            (PROXY_READ_TIMEOUT, "0"),
        ],
    );
    let t = run(&objects);
    let front = route(&t, "shop.example.com", "/");
    assert_eq!(front.max_body_bytes, Some(8 << 20));
    assert_eq!(front.balance, Balance::LeastRequest);
    assert_eq!(front.policy.read_timeout, Some(Duration::from_mins(2)));
    assert_eq!(front.policy.connect_timeout, Some(Duration::from_secs(2)));
    assert_eq!(front.policy.send_timeout, Some(Duration::from_secs(30)));
    assert_eq!(
        route(&t, "shop.example.com", "/api").policy.read_timeout,
        None
    );
    assert!(problems(&t).contains(
        &"Ingress shop/api: metadata.annotations[nginx.ingress.kubernetes.io/proxy-read-timeout]: \
          \"0\" is not a whole number of seconds above 0: the agent's default applies"
            .to_owned()
    ));
    let api = route(&t, "shop.example.com", "/api");
    assert_eq!(api.max_body_bytes, Some(u64::MAX));
    assert_eq!(api.balance, Balance::RoundRobin);
    let legacy = route(&t, "legacy.example.com", "/legacy");
    assert_eq!(legacy.max_body_bytes, None);
    assert_eq!(
        t.ignored_annotations,
        [(
            ObjectKey::new("shop", "storefront"),
            "nginx.ingress.kubernetes.io/mirror-target".to_owned()
        )]
    );
    assert!(
        problems(&t).contains(
            &"Ingress shop/api: metadata.annotations[xlb.dev/load-balance]: \"random\" is neither \
          \"round-robin\" nor \"least-request\""
                .to_owned()
        )
    );
}

/// A huge bad annotation value is quoted short in the problem.
#[test]
fn a_huge_bad_annotation_is_quoted_short() {
    let mut objects = shop();
    let huge = "x".repeat(4 << 20);
    annotate(
        &mut objects,
        "storefront",
        &[(annotations::LOAD_BALANCE, &huge)],
    );
    let problems = problems(&run(&objects));
    let problem = problems
        .iter()
        .find(|p| p.contains(annotations::LOAD_BALANCE))
        .unwrap_or_else(|| panic!("{problems:#?}"));
    assert!(problem.len() < 400, "{} bytes", problem.len());
    assert!(
        problem.contains(&format!(
            "\"{}…\" (4194304 bytes) is neither",
            "x".repeat(200)
        )),
        "{problem}"
    );
}

#[test]
fn body_sizes_in_nginx_syntax() {
    assert_eq!(body_size("1024"), Ok(1024));
    assert_eq!(body_size("1k"), Ok(1024));
    assert_eq!(body_size("8M"), Ok(8 << 20));
    assert_eq!(body_size("2g"), Ok(2 << 30));
    assert_eq!(body_size("0"), Ok(u64::MAX));
    assert!(body_size("8mb").is_err());
    assert!(body_size("-1").is_err());
    assert!(body_size("").is_err());
    assert!(body_size("99999999999999999g").is_err());
}

// --- TLS ---------------------------------------------------------------------------

struct Issued {
    cert_pem: String,
    key_pem: String,
}

fn issue(hosts: &[&str]) -> Issued {
    let hosts: Vec<String> = hosts.iter().map(|h| (*h).to_owned()).collect();
    let certified = rcgen::generate_simple_self_signed(hosts).expect("rcgen");
    Issued {
        cert_pem: certified.cert.pem(),
        key_pem: certified.signing_key.serialize_pem(),
    }
}

fn tls_secret(name: &str, crt: &str, key: &str) -> Object {
    Object::Secret(Secret {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(crt.as_bytes().to_vec())),
            ("tls.key".to_owned(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    })
}

/// `storefront` gets `spec.tls` for shop.example.com (Secret shop-tls) and `api` for
/// `*.example.com` (Secret wild-tls).
fn with_tls(objects: &mut Vec<Object>) {
    let tls = |hosts: &[&str], secret: &str| k8s_openapi::api::networking::v1::IngressTLS {
        hosts: Some(hosts.iter().map(|h| (*h).to_owned()).collect()),
        secret_name: Some(secret.to_owned()),
    };
    ingress_mut(objects, "storefront")
        .spec
        .as_mut()
        .unwrap()
        .tls = Some(vec![tls(&["Shop.example.com"], "shop-tls")]);
    ingress_mut(objects, "api").spec.as_mut().unwrap().tls =
        Some(vec![tls(&["*.example.com"], "wild-tls")]);
    let shop = issue(&["shop.example.com"]);
    let wild = issue(&["*.example.com"]);
    objects.push(tls_secret("shop-tls", &shop.cert_pem, &shop.key_pem));
    objects.push(tls_secret("wild-tls", &wild.cert_pem, &wild.key_pem));
}

#[test]
fn tls_secrets_become_certificates_for_their_hosts() {
    let mut objects = shop();
    with_tls(&mut objects);
    let t = run(&objects);
    assert!(
        problems(&t).iter().all(|p| !p.contains("tls")),
        "{:#?}",
        problems(&t)
    );
    let certs: Vec<(Vec<String>, String)> = t
        .certificates
        .iter()
        .map(|c| (c.hosts.clone(), c.secret.to_string()))
        .collect();
    // Oldest Ingress first: storefront, then api.
    assert_eq!(
        certs,
        [
            (
                vec!["shop.example.com".to_owned()],
                "shop/shop-tls".to_owned()
            ),
            (vec!["*.example.com".to_owned()], "shop/wild-tls".to_owned()),
        ]
    );
    assert_eq!(t.certificates[0].pair.chain.len(), 1);
}

#[test]
fn tls_hosts_redirect_unless_the_ingress_says_no() {
    let mut objects = shop();
    with_tls(&mut objects);
    annotate(&mut objects, "api", &[(SSL_REDIRECT, "false")]);
    let t = run(&objects);
    // shop.example.com has TLS: storefront's routes redirect, api's opted out.
    assert!(route(&t, "shop.example.com", "/").ssl_redirect);
    assert!(!route(&t, "shop.example.com", "/api").ssl_redirect);
    // The wildcard host has TLS, but its Ingress (api) opted out.
    assert!(!route(&t, "blog.example.com", "/").ssl_redirect);
    // Host-less rules and the default backend have no TLS host.
    assert!(!route(&t, "unknown.test", "/static").ssl_redirect);
    assert!(!t.routes.default_route().unwrap().ssl_redirect);
}

#[test]
fn without_tls_only_force_ssl_redirect_redirects() {
    let mut objects = shop();
    annotate(&mut objects, "legacy", &[(FORCE_SSL_REDIRECT, "true")]);
    annotate(&mut objects, "catchall", &[(FORCE_SSL_REDIRECT, "true")]);
    let t = run(&objects);
    assert!(!route(&t, "pay.example.com", "/").ssl_redirect);
    assert!(!route(&t, "shop.example.com", "/").ssl_redirect);
    assert!(route(&t, "legacy.example.com", "/legacy").ssl_redirect);
    assert!(route(&t, "unknown.test", "/static").ssl_redirect);
    assert!(t.routes.default_route().unwrap().ssl_redirect);
}

#[test]
fn a_wildcard_tls_host_covers_exact_rule_hosts() {
    let mut objects = shop();
    with_tls(&mut objects);
    // pay.example.com is covered by api's *.example.com certificate.
    let t = run(&objects);
    assert!(route(&t, "pay.example.com", "/").ssl_redirect);
}

/// A Secret whose key is not PEM is a problem on the Secret, naming the Ingress that
/// uses it; a missing one is a problem on the Ingress; the rest applies. (Whether a
/// well-formed key belongs to its certificate is checked where the signing key is made,
/// in the agent's `l7::tls`.)
#[test]
fn a_bad_or_missing_secret_is_a_problem_and_the_rest_applies() {
    let mut objects = shop();
    with_tls(&mut objects);
    objects.retain(|o| o.meta().name.as_deref() != Some("shop-tls"));
    // shop-tls: a key that is no PEM at all; wild-tls removed.
    let shop_cert = issue(&["shop.example.com"]);
    objects.push(tls_secret("shop-tls", &shop_cert.cert_pem, "not a key"));
    objects.retain(|o| o.meta().name.as_deref() != Some("wild-tls"));
    let t = run(&objects);
    assert!(t.certificates.is_empty());
    let p = problems(&t);
    assert!(
        p.iter().any(|p| p
            .starts_with("Secret shop/shop-tls: data[tls.key]: not a PEM private key")
            && p.ends_with("(named by Ingress shop/storefront spec.tls[0].secretName)")),
        "{p:#?}"
    );
    assert!(p.contains(
        &"Ingress shop/api: spec.tls[0].secretName: Secret shop/wild-tls not found".to_owned()
    ));
    // Routes are unaffected, and the TLS hosts still redirect (default certificate).
    assert!(route(&t, "shop.example.com", "/").ssl_redirect);
}

#[test]
fn broken_pem_is_a_problem_naming_the_field() {
    let good = issue(&["shop.example.com"]);
    let cases = [
        (good.cert_pem.as_str(), "not a key", "data[tls.key]"),
        ("garbage", good.key_pem.as_str(), "data[tls.crt]"),
        (
            "-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n",
            good.key_pem.as_str(),
            "data[tls.crt]",
        ),
    ];
    for (crt, key, field) in cases {
        let Object::Secret(secret) = tls_secret("s", crt, key) else {
            unreachable!()
        };
        let e = tls::key_pair(&secret).expect_err(field);
        assert_eq!(e.field, field, "{}", e.reason);
    }
    let Object::Secret(mut opaque) = tls_secret("s", &good.cert_pem, &good.key_pem) else {
        unreachable!()
    };
    assert!(tls::key_pair(&opaque).is_ok());
    opaque.type_ = Some("Opaque".into());
    assert_eq!(tls::key_pair(&opaque).unwrap_err().field, "type");
}

#[test]
fn a_chain_keeps_its_order() {
    let leaf = issue(&["shop.example.com"]);
    let extra = issue(&["ca.example.com"]);
    let chain = format!("{}{}", leaf.cert_pem, extra.cert_pem);
    let Object::Secret(secret) = tls_secret("s", &chain, &leaf.key_pem) else {
        unreachable!()
    };
    let pair = tls::key_pair(&secret).unwrap();
    assert_eq!(pair.chain.len(), 2);
}

#[test]
fn hosts_that_are_not_names_are_reported() {
    assert_eq!(host_pattern(None), Ok(HostPattern::Any));
    assert_eq!(host_pattern(Some("")), Ok(HostPattern::Any));
    assert_eq!(
        host_pattern(Some("A.Example.com")),
        Ok(HostPattern::Exact("a.example.com".into()))
    );
    assert_eq!(
        host_pattern(Some("*.Example.com")),
        Ok(HostPattern::Wildcard(".example.com".into()))
    );
    for bad in ["*", "*.", "a.*.com", "*example.com", "a.com:80"] {
        assert!(host_pattern(Some(bad)).is_err(), "{bad}");
    }
}

/// SEC1 and PKCS#1 keys (as openssl writes them by default or with -traditional) parse
/// like PKCS#8 ones (the agent's `l7::tls` tests make signing keys of the same fixture).
#[test]
fn sec1_and_pkcs1_keys_parse() {
    for object in fixtures::load("tls-secrets.yaml") {
        let Object::Secret(secret) = object else {
            panic!("not a Secret: {:?}", object.kind());
        };
        let pair = tls::key_pair(&secret)
            .unwrap_or_else(|e| panic!("{:?}: {}: {}", secret.metadata.name, e.field, e.reason));
        assert_eq!(pair.chain.len(), 1);
    }
}

/// `--l7-ingress-class nginx --l7-controller-name k8s.io/ingress-nginx` takes over
/// ingress-nginx's Ingresses unedited: by class name, by the legacy annotation, and
/// classless ones when the nginx class is the default.
#[test]
fn the_ingress_nginx_class_is_served_when_asked() {
    let mut objects = shop();
    for object in &mut objects {
        if let Object::IngressClass(c) = object {
            let default = c.metadata.name.as_deref() == Some("nginx");
            c.metadata.annotations = Some(BTreeMap::from([(
                IS_DEFAULT_CLASS.to_owned(),
                default.to_string(),
            )]));
        }
    }
    let class = IngressClassConfig {
        controller: INGRESS_NGINX_CONTROLLER.to_owned(),
        ..IngressClassConfig::new("nginx")
    };
    let t = translate(&fixtures::cluster(&objects), &class);
    assert_eq!(
        keys(&t.owned),
        ["shop/other", "shop/other-legacy", "shop/payments"]
    );
    assert_eq!(
        to(&t, "shop.example.com", "/").as_deref(),
        Some("shop/api:9000 <- other")
    );
    assert!(problems(&t).iter().all(|p| !p.contains("IngressClass")));
    // Asked for the class name alone, the nginx class is not taken as our default.
    let t = translate(
        &fixtures::cluster(&objects),
        &IngressClassConfig::new("nginx"),
    );
    assert_eq!(keys(&t.owned), ["shop/other", "shop/other-legacy"]);
    assert!(
        problems(&t).contains(
            &"IngressClass /nginx: spec.controller: \"k8s.io/ingress-nginx\" is not \
              xlb.dev/ingress-controller: not taken as the default class"
                .to_owned()
        ),
        "{:#?}",
        problems(&t)
    );
}

/// Annotations are read under the configured prefix only; ingress-nginx's own
/// prefix then means nothing (as for ingress-nginx with `--annotations-prefix`).
#[test]
fn annotations_are_read_under_the_configured_prefix() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            ("ingress.example.com/proxy-body-size", "8m"),
            ("ingress.example.com/mirror-target", "https://mirror.test"),
            (PROXY_BODY_SIZE, "2m"),
        ],
    );
    let class = IngressClassConfig {
        annotations_prefix: "ingress.example.com".to_owned(),
        ..xlb()
    };
    let t = translate(&fixtures::cluster(&objects), &class);
    let front = route(&t, "shop.example.com", "/");
    assert_eq!(front.max_body_bytes, Some(8 << 20));
    assert_eq!(
        t.ignored_annotations,
        [(
            ObjectKey::new("shop", "storefront"),
            "ingress.example.com/mirror-target".to_owned()
        )]
    );
    // A bad value names the Ingress and the annotation under its own prefix.
    annotate(
        &mut objects,
        "storefront",
        &[("ingress.example.com/ssl-redirect", "yes")],
    );
    let t = translate(&fixtures::cluster(&objects), &class);
    assert!(
        problems(&t).contains(
            &"Ingress shop/storefront: metadata.annotations[ingress.example.com/ssl-redirect]: \
              \"yes\" is neither \"true\" nor \"false\""
                .to_owned()
        ),
        "{:#?}",
        problems(&t)
    );
}

/// Raw nginx snippets are refused: the Ingress is not served (its routes fall to the
/// next rule or 404), and the problem says why.
#[test]
fn snippet_annotations_refuse_the_ingress() {
    for snippet in [
        "server-snippet",
        "configuration-snippet",
        "stream-snippet",
        "auth-snippet",
        "modsecurity-snippet",
    ] {
        let mut objects = shop();
        annotate(&mut objects, "storefront", &[(snippet, "return 200;")]);
        let t = run(&objects);
        assert!(!keys(&t.owned).contains(&"shop/storefront".to_owned()));
        assert_ne!(
            to(&t, "shop.example.com", "/").as_deref(),
            Some("shop/web:80 <- storefront")
        );
        let expected = format!(
            "Ingress shop/storefront: metadata.annotations[{DEFAULT_PREFIX}/{snippet}]: raw nginx \
             configuration written by Ingress authors"
        );
        assert!(
            problems(&t).iter().any(|p| p.starts_with(&expected)),
            "{snippet}: {:#?}",
            problems(&t)
        );
    }
}

#[test]
fn the_catalogue_knows_every_honoured_annotation_once() {
    use super::catalogue::{Support, honoured, support};
    let names: Vec<&str> = honoured().collect();
    for name in [SSL_REDIRECT, FORCE_SSL_REDIRECT, PROXY_BODY_SIZE] {
        assert!(names.contains(&name), "{name}");
    }
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len());
    assert!(matches!(support("server-snippet"), Support::Refused(_)));
    assert!(matches!(
        support("client-body-buffer-size"),
        Support::Same(_)
    ));
    assert!(matches!(support("no-such-annotation"), Support::Differs(_)));
}

/// Two Prefix paths differing only by a trailing slash, in two Ingresses, are two
/// routes (no "already routed" problem); `/x//` is still the same route as `/x/`.
#[test]
fn a_trailing_slash_makes_a_second_prefix_route() {
    let mut objects = shop();
    let set_path = |objects: &mut Vec<Object>, ingress: &str, index: usize, path: &str| {
        let paths = &mut ingress_mut(objects, ingress)
            .spec
            .as_mut()
            .unwrap()
            .rules
            .as_mut()
            .unwrap()[0]
            .http
            .as_mut()
            .unwrap()
            .paths;
        paths[index].path = Some(path.into());
        paths[index].path_type = "Prefix".into();
    };
    set_path(&mut objects, "storefront", 0, "/shop");
    set_path(&mut objects, "api", 0, "/shop/");
    let t = run(&objects);
    assert_eq!(
        to(&t, "shop.example.com", "/shop").as_deref(),
        Some("shop/web:80 <- storefront")
    );
    assert_eq!(
        to(&t, "shop.example.com", "/shop/cart").as_deref(),
        Some("shop/api:9000 <- api")
    );
    assert!(
        !problems(&t).iter().any(|p| p.contains("already routed")),
        "{:#?}",
        problems(&t)
    );
    set_path(&mut objects, "storefront", 0, "/shop//");
    let t = run(&objects);
    assert!(
        problems(&t).iter().any(|p| p
            .contains("Prefix path \"/shop/\" of shop.example.com is already routed")
            || p.contains("Prefix path \"/shop//\" of shop.example.com is already routed")),
        "{:#?}",
        problems(&t)
    );
}

/// Replace an Ingress's rules by one host with `paths` (path, pathType), all to its
/// first backend.
fn set_paths(objects: &mut [Object], ingress: &str, host: &str, paths: &[(&str, &str)]) {
    let spec = ingress_mut(objects, ingress).spec.as_mut().unwrap();
    let rule = &mut spec.rules.as_mut().unwrap()[0];
    rule.host = Some(host.to_owned());
    let http = rule.http.as_mut().unwrap();
    let template = http.paths[0].clone();
    http.paths = paths
        .iter()
        .map(|(p, kind)| {
            let mut path = template.clone();
            path.path = Some((*p).to_owned());
            path.path_type = (*kind).to_owned();
            path
        })
        .collect();
}

/// ingress-nginx's rewrite example (`/something(/|$)(.*)`, `rewrite-target: /$2`):
/// the rewrite makes every path of the host a regex, also another Ingress's.
#[test]
fn rewrite_target_makes_the_host_regex() {
    let mut objects = shop();
    set_paths(
        &mut objects,
        "storefront",
        "rewrite.bar.com",
        &[("/something(/|$)(.*)", "ImplementationSpecific")],
    );
    annotate(&mut objects, "storefront", &[(REWRITE_TARGET, "/$2")]);
    set_paths(
        &mut objects,
        "api",
        "rewrite.bar.com",
        &[("/api", "Prefix"), ("/exact", "Exact")],
    );
    let t = run(&objects);
    let r = route(&t, "rewrite.bar.com", "/something/new");
    let rewrite = r.policy.rewrite.as_ref().expect("a rewrite");
    assert_eq!(
        rewrite.apply("/something/new", None).as_deref(),
        Some("/new")
    );
    // api's paths are regexes now: anchored at the start, case-insensitive, and an
    // Exact path matches longer paths, as in ingress-nginx.
    assert_eq!(
        to(&t, "rewrite.bar.com", "/APIv2").as_deref(),
        Some("shop/api:9000 <- api")
    );
    assert_eq!(
        to(&t, "rewrite.bar.com", "/exact/more").as_deref(),
        Some("shop/api:9000 <- api")
    );
    assert!(
        route(&t, "rewrite.bar.com", "/api")
            .policy
            .rewrite
            .is_none()
    );
    // A path that is no regular expression in a regex host is dropped with a problem.
    set_paths(&mut objects, "api", "rewrite.bar.com", &[("/a(", "Prefix")]);
    let t = run(&objects);
    assert!(
        problems(&t).iter().any(|p| p.starts_with(
            "Ingress shop/api: spec.rules[].http.paths[].path: \"/a(\" is not a regular expression"
        )),
        "{:#?}",
        problems(&t)
    );
    set_paths(
        &mut objects,
        "storefront",
        "rewrite.bar.com",
        &[("/b(", "Prefix")],
    );
    let t = run(&objects);
    assert!(
        problems(&t).iter().any(|p| p.starts_with(
            "Ingress shop/storefront: spec.rules[0].http.paths[0].path: \"/b(\" is not a regular expression"
        )),
        "{:#?}",
        problems(&t)
    );
}

/// Redirects, app-root, upstream-vhost and x-forwarded-prefix reach the routes with
/// ingress-nginx's defaults; bad values name the Ingress and annotation.
#[test]
fn redirect_and_header_annotations() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            (PERMANENT_REDIRECT, "https://www.example.com"),
            (APP_ROOT, "/app1"),
            (UPSTREAM_VHOST, "internal.example.com"),
            (X_FORWARDED_PREFIX, "/shop"),
        ],
    );
    annotate(
        &mut objects,
        "api",
        &[
            (PERMANENT_REDIRECT, "https://permanent.example.com"),
            (TEMPORAL_REDIRECT, "https://temporal.example.com"),
            (TEMPORAL_REDIRECT_CODE, "307"),
        ],
    );
    let t = run(&objects);
    let front = &route(&t, "shop.example.com", "/").policy;
    assert_eq!(
        front.redirect,
        Some(Redirect {
            code: 301,
            location: "https://www.example.com".into()
        })
    );
    assert_eq!(front.app_root.as_deref(), Some("/app1"));
    assert_eq!(
        front.upstream_vhost.as_deref(),
        Some("internal.example.com")
    );
    assert_eq!(front.forwarded_prefix.as_deref(), Some("/shop"));
    let api = &route(&t, "shop.example.com", "/api").policy;
    assert_eq!(
        api.redirect,
        Some(Redirect {
            code: 307,
            location: "https://temporal.example.com".into()
        })
    );
    annotate(
        &mut objects,
        "storefront",
        &[
            (PERMANENT_REDIRECT_CODE, "200"),
            (APP_ROOT, "app1"),
            (TEMPORAL_REDIRECT, "ftp://x"),
        ],
    );
    let t = run(&objects);
    let front = &route(&t, "shop.example.com", "/").policy;
    assert_eq!(front.redirect.as_ref().map(|r| r.code), Some(301));
    assert_eq!(front.app_root, None);
    let p = problems(&t);
    for expected in [
        "Ingress shop/storefront: metadata.annotations[nginx.ingress.kubernetes.io/permanent-redirect-code]: \"200\" is not a redirect status (300 to 308): 301 applies",
        "Ingress shop/storefront: metadata.annotations[nginx.ingress.kubernetes.io/app-root]: \"app1\" is not a path starting with /",
        "Ingress shop/storefront: metadata.annotations[nginx.ingress.kubernetes.io/temporal-redirect]: \"ftp://x\" is not an http:// or https:// URL",
    ] {
        assert!(p.contains(&expected.to_owned()), "{expected}\n{p:#?}");
    }
}

/// ingress-nginx's CORS defaults, the documented example values, and a bad origin
/// left out with a problem.
#[test]
fn cors_annotations_with_ingress_nginx_defaults() {
    let mut objects = shop();
    annotate(&mut objects, "storefront", &[(ENABLE_CORS, "true")]);
    annotate(
        &mut objects,
        "api",
        &[
            (ENABLE_CORS, "true"),
            (
                CORS_ALLOW_ORIGIN,
                "https://origin-site.com:4443, http://origin-site.com, https://*.example.org, ftp://x",
            ),
            (CORS_ALLOW_METHODS, "PUT, GET, POST, OPTIONS"),
            (CORS_ALLOW_HEADERS, "X-Forwarded-For, X-app123-XPTO"),
            (CORS_EXPOSE_HEADERS, "*, X-CustomResponseHeader"),
            (CORS_ALLOW_CREDENTIALS, "false"),
            (CORS_MAX_AGE, "600"),
        ],
    );
    let t = run(&objects);
    let front = route(&t, "shop.example.com", "/")
        .policy
        .cors
        .clone()
        .unwrap();
    assert_eq!(front.allow_origin, ["*"]);
    assert_eq!(
        front.allow_methods,
        "GET, PUT, POST, DELETE, PATCH, OPTIONS"
    );
    assert!(front.allow_headers.starts_with("DNT,Keep-Alive,User-Agent"));
    assert!(front.allow_credentials);
    assert_eq!(front.max_age, 1_728_000);
    assert_eq!(front.allowed_origin("https://anything.test"), Some("*"));
    let api = route(&t, "shop.example.com", "/api")
        .policy
        .cors
        .clone()
        .unwrap();
    assert_eq!(
        api.allow_origin,
        [
            "https://origin-site.com:4443",
            "http://origin-site.com",
            "https://*.example.org"
        ]
    );
    assert_eq!(api.allow_methods, "PUT, GET, POST, OPTIONS");
    assert_eq!(api.expose_headers, "*, X-CustomResponseHeader");
    assert!(!api.allow_credentials);
    assert_eq!(api.max_age, 600);
    assert_eq!(
        api.allowed_origin("https://a.example.org"),
        Some("https://a.example.org")
    );
    assert_eq!(api.allowed_origin("https://origin-site.com"), None);
    assert!(problems(&t).iter().any(|p| p.starts_with(
        "Ingress shop/api: metadata.annotations[nginx.ingress.kubernetes.io/cors-allow-origin]: \"ftp://x\" is not *"
    )));
}

/// Source ranges: the newer allowlist name wins over whitelist; a bad range refuses
/// everyone (fail closed) with a problem.
#[test]
fn source_range_annotations() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            (WHITELIST_SOURCE_RANGE, "192.0.2.0/24"),
            (ALLOWLIST_SOURCE_RANGE, "198.51.100.0/24, 2001:db8::/32"),
            (DENYLIST_SOURCE_RANGE, "198.51.100.7"),
        ],
    );
    annotate(
        &mut objects,
        "api",
        &[(WHITELIST_SOURCE_RANGE, "192.0.2.0/24,nonsense")],
    );
    let t = run(&objects);
    let front = route(&t, "shop.example.com", "/")
        .policy
        .access
        .clone()
        .unwrap();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert!(front.permits(ip("198.51.100.1")));
    assert!(front.permits(ip("::ffff:198.51.100.1")));
    assert!(front.permits(ip("2001:db8::1")));
    assert!(!front.permits(ip("198.51.100.7")));
    assert!(!front.permits(ip("192.0.2.1")));
    let api = route(&t, "shop.example.com", "/api")
        .policy
        .access
        .clone()
        .unwrap();
    assert!(!api.permits(ip("192.0.2.1")));
    assert!(!api.permits(ip("2001:db8::1")));
    assert!(problems(&t).contains(
        &"Ingress shop/api: metadata.annotations[nginx.ingress.kubernetes.io/whitelist-source-range]: \
          \"nonsense\" is not an address or CIDR range: every client is refused (403) until this is fixed"
            .to_owned()
    ), "{:#?}", problems(&t));
    assert_eq!(
        route(&t, "legacy.example.com", "/legacy").policy.access,
        None
    );
}

/// A canary Ingress joins the main route of the same host and path (it claims no
/// route of its own); one without a main route is not served.
#[test]
fn canary_ingresses_join_the_main_route() {
    let mut objects = shop();
    // api (newer) becomes the canary of storefront's shop.example.com `/`.
    set_paths(
        &mut objects,
        "api",
        "shop.example.com",
        &[("/", "Prefix"), ("/nowhere", "Prefix")],
    );
    annotate(
        &mut objects,
        "api",
        &[
            (CANARY, "true"),
            (CANARY_BY_HEADER, "X-Canary"),
            (CANARY_BY_HEADER_PATTERN, "^eu-"),
            (CANARY_WEIGHT, "10"),
            (CANARY_WEIGHT_TOTAL, "1000"),
        ],
    );
    let t = run(&objects);
    let main = route(&t, "shop.example.com", "/");
    assert_eq!(main.ingress.name, "storefront");
    let canary = main.policy.canary.as_ref().expect("a canary");
    assert_eq!(canary.upstream.name, "shop/api:9000");
    assert_eq!(canary.by_header.as_deref(), Some("X-Canary"));
    assert_eq!((canary.weight, canary.weight_total), (10, 1000));
    assert_eq!(
        canary.verdict(Some("eu-west"), None),
        crate::routes::CanaryVerdict::Canary
    );
    assert_eq!(
        canary.verdict(Some("us"), None),
        crate::routes::CanaryVerdict::ByWeight
    );
    assert!(
        problems(&t).contains(
            &"Ingress shop/api: spec.rules[0].http.paths[1]: canary: no other Ingress routes \
              Prefix path \"/nowhere\": not served"
                .to_owned()
        ),
        "{:#?}",
        problems(&t)
    );
    assert_eq!(
        to(&t, "shop.example.com", "/nowhere").as_deref(),
        Some("shop/web:80 <- storefront")
    );
}

/// ingress-nginx's documented affinity example values, and its defaults.
#[test]
fn cookie_affinity_annotations() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            (AFFINITY, "cookie"),
            (SESSION_COOKIE_NAME, "route"),
            (SESSION_COOKIE_EXPIRES, "172800"),
            (SESSION_COOKIE_MAX_AGE, "172800"),
            (SESSION_COOKIE_SAMESITE, "Lax"),
            (AFFINITY_MODE, "persistent"),
        ],
    );
    annotate(
        &mut objects,
        "api",
        &[(AFFINITY, "cookie"), (SESSION_COOKIE_SAMESITE, "Sometimes")],
    );
    annotate(&mut objects, "legacy", &[(AFFINITY, "ip")]);
    let t = run(&objects);
    let front = route(&t, "shop.example.com", "/")
        .policy
        .affinity
        .clone()
        .unwrap();
    assert_eq!(front.cookie_name, "route");
    assert_eq!(
        (front.max_age, front.expires),
        (Some(172_800), Some(172_800))
    );
    assert_eq!(front.samesite.as_deref(), Some("Lax"));
    assert!(front.persistent);
    assert_eq!(front.path, "/");
    let api = route(&t, "shop.example.com", "/api")
        .policy
        .affinity
        .clone()
        .unwrap();
    assert_eq!(api.cookie_name, "INGRESSCOOKIE");
    assert_eq!(api.path, "/api");
    assert_eq!(api.samesite, None);
    assert!(!api.persistent);
    assert_eq!(
        route(&t, "legacy.example.com", "/legacy").policy.affinity,
        None
    );
    let p = problems(&t);
    assert!(p.iter().any(|p| p.starts_with("Ingress shop/legacy: metadata.annotations[nginx.ingress.kubernetes.io/affinity]: \"ip\" is not \"cookie\"")), "{p:#?}");
    assert!(p.iter().any(|p| p.starts_with("Ingress shop/api: metadata.annotations[nginx.ingress.kubernetes.io/session-cookie-samesite]")), "{p:#?}");
}

#[test]
fn limit_annotations() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            (LIMIT_RPS, "5"),
            (LIMIT_CONNECTIONS, "10"),
            (LIMIT_BURST_MULTIPLIER, "2"),
        ],
    );
    annotate(
        &mut objects,
        "api",
        &[(LIMIT_RPM, "300"), (LIMIT_RPS, "-1")],
    );
    let t = run(&objects);
    assert_eq!(
        route(&t, "shop.example.com", "/").policy.limits,
        Some(crate::routes::Limits {
            rps: Some(5),
            rpm: None,
            connections: Some(10),
            burst_multiplier: 2
        })
    );
    assert_eq!(
        route(&t, "shop.example.com", "/api").policy.limits,
        Some(crate::routes::Limits {
            rps: None,
            rpm: Some(300),
            connections: None,
            burst_multiplier: 5
        })
    );
    assert!(problems(&t).contains(
        &"Ingress shop/api: metadata.annotations[nginx.ingress.kubernetes.io/limit-rps]: \"-1\" \
          is not a whole number above 0: no such limit"
            .to_owned()
    ));
}

// --- backend-protocol and proxy-ssl-* ------------------------------------------------

fn no_endpoints(route: &Route) -> bool {
    matches!(&route.upstream.target, Target::Endpoints(e) if e.is_empty())
}

fn with_ca(mut secret: Object, ca_pem: &str) -> Object {
    if let Object::Secret(s) = &mut secret {
        s.data.get_or_insert_with(BTreeMap::new).insert(
            CA_CERT_KEY.to_owned(),
            ByteString(ca_pem.as_bytes().to_vec()),
        );
    }
    secret
}

#[test]
fn backend_protocol_sets_version_and_tls_and_overrides_the_app_protocol() {
    let cases = [
        ("HTTP", UpstreamProtocol::Http1, false),
        ("https", UpstreamProtocol::Http1, true),
        ("GRPC", UpstreamProtocol::H2c, false),
        (" grpcs ", UpstreamProtocol::H2c, true),
        ("H2C", UpstreamProtocol::H2c, false),
    ];
    for (value, protocol, tls) in cases {
        let mut objects = shop();
        // `api` is on a port with `appProtocol: kubernetes.io/h2c`.
        annotate(&mut objects, "api", &[("backend-protocol", value)]);
        let t = run(&objects);
        let api = route(&t, "shop.example.com", "/api");
        assert_eq!(api.upstream.protocol, protocol, "{value}");
        assert_eq!(api.upstream.tls.is_some(), tls, "{value}");
        assert_eq!(api.upstream.name, "shop/api:9000");
        assert_eq!(problems(&t), problems(&run(&shop())), "{value}");
        // Another Ingress on the same Service keeps the Service's protocol.
        if value == "HTTP" {
            let storefront = route(&t, "shop.example.com", "/");
            assert_eq!(storefront.upstream.protocol, UpstreamProtocol::Http1);
        }
    }
    // Without the annotation the Service port decides.
    let t = run(&shop());
    assert_eq!(
        route(&t, "shop.example.com", "/api").upstream.protocol,
        UpstreamProtocol::H2c
    );
}

#[test]
fn backend_tls_defaults_are_ingress_nginx_ones_and_the_name_is_the_service() {
    let mut objects = shop();
    annotate(&mut objects, "api", &[("backend-protocol", "HTTPS")]);
    let t = run(&objects);
    let tls = route(&t, "shop.example.com", "/api")
        .upstream
        .tls
        .clone()
        .expect("TLS");
    assert!(!tls.verify, "proxy-ssl-verify is off by default");
    assert!(!tls.sni, "proxy-ssl-server-name is off by default");
    assert_eq!(tls.name, "api.shop.svc");
    assert!(tls.ca.is_empty() && tls.client.is_none());
    // An ExternalName's host is its name.
    let mut objects = shop();
    annotate(&mut objects, "payments", &[("backend-protocol", "HTTPS")]);
    let t = run(&objects);
    let pay = route(&t, "pay.example.com", "/")
        .upstream
        .tls
        .clone()
        .unwrap();
    assert_eq!(pay.name, "payments.billing.svc.cluster.local");
}

#[test]
fn proxy_ssl_secret_gives_the_ca_and_client_certificate() {
    let mut objects = shop();
    let client = issue(&["client.example"]);
    let ca = issue(&["ca.example"]);
    objects.push(with_ca(
        tls_secret("backend-tls", &client.cert_pem, &client.key_pem),
        &ca.cert_pem,
    ));
    annotate(
        &mut objects,
        "api",
        &[
            ("backend-protocol", "GRPCS"),
            ("proxy-ssl-secret", "shop/backend-tls"),
            ("proxy-ssl-verify", "on"),
            ("proxy-ssl-name", "api.internal.example"),
            ("proxy-ssl-server-name", "on"),
        ],
    );
    let t = run(&objects);
    assert_eq!(problems(&t), problems(&run(&shop())));
    let tls = route(&t, "shop.example.com", "/api")
        .upstream
        .tls
        .clone()
        .unwrap();
    assert!(tls.verify && tls.sni);
    assert_eq!(tls.name, "api.internal.example");
    assert_eq!(tls.ca.len(), 1);
    assert_eq!(tls.client.as_ref().unwrap().chain.len(), 1);
    assert!(!no_endpoints(route(&t, "shop.example.com", "/api")));
}

#[test]
fn unusable_backend_tls_settings_answer_503_with_a_problem() {
    let p = "metadata.annotations[nginx.ingress.kubernetes.io";
    let cases: [(&[(&str, &str)], String); 4] = [
        (
            &[("proxy-ssl-secret", "backend-tls")],
            format!("{p}/proxy-ssl-secret]: \"backend-tls\" is not NAMESPACE/NAME"),
        ),
        (
            &[("proxy-ssl-secret", "other/backend-tls")],
            format!("{p}/proxy-ssl-secret]: Secret other/backend-tls is in another namespace"),
        ),
        (
            &[("proxy-ssl-secret", "shop/missing")],
            format!("{p}/proxy-ssl-secret]: Secret shop/missing not found"),
        ),
        (
            &[("proxy-ssl-verify", "on")],
            format!("{p}/proxy-ssl-verify]: is on, but no proxy-ssl-secret with ca.crt"),
        ),
    ];
    for (pairs, expected) in cases {
        let mut objects = shop();
        let mut all = vec![("backend-protocol", "HTTPS")];
        all.extend_from_slice(pairs);
        annotate(&mut objects, "api", &all);
        let t = run(&objects);
        let api = route(&t, "shop.example.com", "/api");
        assert!(no_endpoints(api), "{expected}");
        let problems = problems(&t);
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(&format!("Ingress shop/api: {expected}"))
                    && p.ends_with("its routes answer 503")),
            "{expected}: {problems:#?}"
        );
    }
}

#[test]
fn backend_protocol_values_xlb_cannot_speak() {
    // Refused: the Ingress is not served.
    for value in ["FCGI", "ajp", "AUTO_HTTP"] {
        let mut objects = shop();
        annotate(&mut objects, "api", &[("backend-protocol", value)]);
        let t = run(&objects);
        assert_eq!(
            to(&t, "shop.example.com", "/api"),
            Some("shop/web:80 <- storefront".to_owned()),
            "{value}"
        );
        assert!(
            problems(&t).iter().any(|p| p.starts_with(
                "Ingress shop/api: metadata.annotations[nginx.ingress.kubernetes.io/backend-protocol]: \
                 xlb speaks HTTP, HTTPS, GRPC, GRPCS or H2C"
            )),
            "{value}: {:#?}",
            problems(&t)
        );
    }
    // Unknown: HTTP, as ingress-nginx, with a problem; bad switches stay off.
    let mut objects = shop();
    annotate(
        &mut objects,
        "api",
        &[
            ("backend-protocol", "SPDY"),
            ("proxy-ssl-verify", "true"),
            ("proxy-ssl-name", "not a name"),
        ],
    );
    let t = run(&objects);
    assert_eq!(
        route(&t, "shop.example.com", "/api").upstream.protocol,
        UpstreamProtocol::Http1
    );
    let problems = problems(&t);
    for expected in [
        "backend-protocol]: \"SPDY\" is not HTTP, HTTPS, GRPC, GRPCS or H2C: HTTP applies",
        "proxy-ssl-verify]: \"true\" is neither \"on\" nor \"off\": off applies",
        "proxy-ssl-name]: \"not a name\" is not a DNS name or IP address",
    ] {
        assert!(
            problems.iter().any(|p| p.ends_with(expected)),
            "{expected}: {problems:#?}"
        );
    }
}

// --- ssl-passthrough -------------------------------------------------------------------

#[test]
fn ssl_passthrough_sends_a_hosts_tls_to_its_root_path_backend() {
    let mut objects = shop();
    annotate(&mut objects, "payments", &[("ssl-passthrough", "true")]);
    // `storefront`'s host has `/` too, but from an Ingress without the annotation.
    let t = run(&objects);
    let pay = t
        .routes
        .passthrough("Pay.Example.com")
        .expect("passed through");
    assert_eq!(pay.name, "shop/payments:443");
    assert!(t.routes.passthrough("shop.example.com").is_none());
    assert_eq!(problems(&t), problems(&run(&shop())));
    // HTTP routes stay (ingress-nginx still serves plain HTTP for the host).
    assert_eq!(
        to(&t, "pay.example.com", "/by-name"),
        Some("shop/payments:https <- payments".to_owned())
    );
    // Off, or set to false: nothing passes.
    annotate(&mut objects, "payments", &[("ssl-passthrough", "false")]);
    assert!(
        run(&objects)
            .routes
            .passthrough("pay.example.com")
            .is_none()
    );
    assert!(run(&shop()).routes.passthrough("pay.example.com").is_none());
}

#[test]
fn ssl_passthrough_needs_an_exact_host_with_a_root_path() {
    let mut objects = shop();
    // `api`: shop.example.com /api (no `/` of its own: storefront, older, has it) and a
    // `*.example.com` rule.
    annotate(&mut objects, "api", &[("ssl-passthrough", "true")]);
    let t = run(&objects);
    assert!(t.routes.passthrough("shop.example.com").is_none());
    let problems = problems(&t);
    assert!(
        problems.iter().any(|p| p.starts_with(
            "Ingress shop/api: spec.rules[0].http.paths: ssl-passthrough: shop.example.com \
             has no path /"
        )),
        "{problems:#?}"
    );
    assert!(
        problems.contains(
            &"Ingress shop/api: spec.rules[1].host: ssl-passthrough needs an exact host (TLS is \
              routed by SNI): not passed through"
                .to_owned()
        ),
        "{problems:#?}"
    );
}

// --- the agent's defaults (ingress-nginx's ConfigMap) -----------------------------------

#[test]
fn the_ssl_redirect_default_applies_where_no_annotation_says_otherwise() {
    let mut objects = shop();
    with_tls(&mut objects);
    let off = IngressClassConfig {
        defaults: Defaults {
            ssl_redirect: false,
        },
        ..xlb()
    };
    // Default on (ingress-nginx's): a TLS host redirects.
    let t = translate(&fixtures::cluster(&objects), &xlb());
    assert!(route(&t, "shop.example.com", "/").ssl_redirect);
    // Off by the agent: no redirect, unless the Ingress asks.
    let t = translate(&fixtures::cluster(&objects), &off);
    assert!(!route(&t, "shop.example.com", "/").ssl_redirect);
    annotate(&mut objects, "storefront", &[(SSL_REDIRECT, "true")]);
    let t = translate(&fixtures::cluster(&objects), &off);
    assert!(route(&t, "shop.example.com", "/").ssl_redirect);
    // An annotation turning it off beats the default on.
    annotate(&mut objects, "storefront", &[(SSL_REDIRECT, "false")]);
    let t = translate(&fixtures::cluster(&objects), &xlb());
    assert!(!route(&t, "shop.example.com", "/").ssl_redirect);
}
