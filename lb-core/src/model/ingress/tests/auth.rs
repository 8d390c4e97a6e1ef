//! The `auth-*` annotations: ingress-nginx's oauth2-proxy example read into the
//! route's external check; basic authentication's users from the Secret; a bad value
//! or Secret denies only that Ingress's routes (503) with a problem naming the
//! Ingress and the annotation.

use super::*;

fn secret(name: &str, type_: &str, data: &[(&str, &str)]) -> Object {
    Object::Secret(Secret {
        metadata: ObjectMeta {
            namespace: Some("shop".into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        type_: Some(type_.into()),
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    })
}

#[test]
fn the_oauth2_proxy_example_becomes_an_external_check() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            ("auth-url", "https://$host/oauth2/auth"),
            (
                "auth-signin",
                "https://$host/oauth2/start?rd=$escaped_request_uri",
            ),
            (
                "auth-response-headers",
                "X-Auth-Request-User, X-Auth-Request-Email",
            ),
        ],
    );
    let t = run(&objects);
    let ext = route(&t, "shop.example.com", "/")
        .policy
        .external_auth
        .clone()
        .expect("external auth");
    assert_eq!(ext.url, "https://$host/oauth2/auth");
    // The URL sets rd itself, so none is added.
    assert_eq!(
        ext.signin.as_deref(),
        Some("https://$host/oauth2/start?rd=$escaped_request_uri")
    );
    assert_eq!(
        ext.response_headers,
        ["x-auth-request-user", "x-auth-request-email"]
    );
    assert_eq!(ext.method, None);
    assert!(route(&t, "shop.example.com", "/").policy.denied.is_none());
    // Another Ingress's route on the same host is not checked.
    assert!(
        route(&t, "shop.example.com", "/api")
            .policy
            .external_auth
            .is_none()
    );
    assert!(
        !problems(&t).iter().any(|p| p.contains("auth-")),
        "{:#?}",
        problems(&t)
    );
    assert!(
        !t.ignored_annotations
            .iter()
            .any(|(_, a)| a.contains("auth-")),
        "{:?}",
        t.ignored_annotations
    );
}

#[test]
fn a_signin_without_rd_gets_one_and_a_method_is_kept() {
    let mut objects = shop();
    annotate(
        &mut objects,
        "storefront",
        &[
            ("auth-url", "http://auth.shop.svc.cluster.local/check"),
            ("auth-signin", "https://login.example.com/start"),
            ("auth-signin-redirect-param", "next"),
            ("auth-method", "POST"),
        ],
    );
    let t = run(&objects);
    let ext = route(&t, "shop.example.com", "/")
        .policy
        .external_auth
        .clone()
        .unwrap();
    assert_eq!(
        ext.signin.as_deref(),
        Some(
            "https://login.example.com/start?next=$pass_access_scheme://$http_host\
             $escaped_request_uri"
        )
    );
    assert_eq!(ext.method.as_deref(), Some("POST"));
}

#[test]
fn a_bad_auth_annotation_denies_that_ingress_only() {
    for (name, value, reason) in [
        (
            "auth-url",
            "ftp://auth.example",
            "is not an http:// or https:// URL",
        ),
        (
            "auth-url",
            "https://$host/auth?u=$cookie_user",
            "uses $cookie_user",
        ),
        ("auth-method", "FETCH", "is not an HTTP method"),
        (
            "auth-response-headers",
            "X-User, bad header",
            "is not a header name",
        ),
        ("auth-type", "digest", "is not \"basic\""),
    ] {
        let mut objects = shop();
        let mut pairs = vec![(name, value)];
        if name != "auth-url" && name != "auth-type" {
            pairs.push(("auth-url", "https://auth.example/check"));
        }
        annotate(&mut objects, "storefront", &pairs);
        let t = run(&objects);
        assert!(
            route(&t, "shop.example.com", "/").policy.denied.is_some(),
            "{name}: {value}"
        );
        assert!(
            route(&t, "shop.example.com", "/api")
                .policy
                .denied
                .is_none()
        );
        let expected =
            format!("Ingress shop/storefront: metadata.annotations[{DEFAULT_PREFIX}/{name}]: ");
        assert!(
            problems(&t).iter().any(|p| p.starts_with(&expected)
                && p.contains(reason)
                && p.ends_with("answered 503 until this is fixed")),
            "{name}: {:#?}",
            problems(&t)
        );
    }
}

#[test]
fn basic_auth_reads_htpasswd_and_auth_map_secrets() {
    let htpasswd =
        "foo:$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0\nbar:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n";
    let mut objects = shop();
    objects.push(secret("basic-auth", "Opaque", &[("auth", htpasswd)]));
    objects.push(secret(
        "users",
        "Opaque",
        &[(
            "alice",
            "$2y$05$abcdefghijklmnopqrstuuJ6n0YkO5qQbJ5j3m0m8wQk5G1C3sY2",
        )],
    ));
    annotate(
        &mut objects,
        "storefront",
        &[
            ("auth-type", "basic"),
            ("auth-secret", "basic-auth"),
            ("auth-realm", "Authentication Required - foo"),
        ],
    );
    annotate(
        &mut objects,
        "api",
        &[
            ("auth-type", "basic"),
            ("auth-secret", "shop/users"),
            ("auth-secret-type", "auth-map"),
        ],
    );
    let t = run(&objects);
    let basic = route(&t, "shop.example.com", "/")
        .policy
        .basic_auth
        .clone()
        .expect("basic auth");
    assert_eq!(basic.realm, "Authentication Required - foo");
    assert_eq!(basic.users.keys().collect::<Vec<_>>(), ["bar", "foo"]);
    let map = route(&t, "shop.example.com", "/api")
        .policy
        .basic_auth
        .clone()
        .expect("auth-map");
    assert_eq!(map.users.keys().collect::<Vec<_>>(), ["alice"]);
    assert_eq!(map.realm, "");
    assert!(
        !problems(&t).iter().any(|p| p.contains("auth-")),
        "{:#?}",
        problems(&t)
    );
}

#[test]
fn a_missing_or_bad_basic_auth_secret_denies_with_a_problem() {
    for (data, reason) in [
        (None, "Secret shop/basic-auth not found"),
        (Some(("other", "x")), "has no data[auth]"),
        (
            Some(("auth", "foo:$6$salt$hash\n")),
            "user \"foo\": the hash is not bcrypt",
        ),
        (Some(("auth", "just-a-name\n")), "line 1 is not user:hash"),
    ] {
        let mut objects = shop();
        if let Some(pair) = data {
            objects.push(secret("basic-auth", "Opaque", &[pair]));
        }
        annotate(
            &mut objects,
            "storefront",
            &[("auth-type", "basic"), ("auth-secret", "basic-auth")],
        );
        let t = run(&objects);
        assert!(
            route(&t, "shop.example.com", "/").policy.denied.is_some(),
            "{reason}"
        );
        assert!(
            route(&t, "shop.example.com", "/api")
                .policy
                .denied
                .is_none()
        );
        let expected = format!(
            "Ingress shop/storefront: metadata.annotations[{DEFAULT_PREFIX}/auth-secret]: "
        );
        assert!(
            problems(&t)
                .iter()
                .any(|p| p.starts_with(&expected) && p.contains(reason)),
            "{reason}: {:#?}",
            problems(&t)
        );
    }
}
