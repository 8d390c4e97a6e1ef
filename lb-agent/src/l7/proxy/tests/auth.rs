//! Authentication against real sockets: an auth service in the test answering as
//! oauth2-proxy's `/oauth2/auth` does (202 with `X-Auth-Request-*` for a valid
//! session cookie, 401 without one), set up as ingress-nginx's oauth2-proxy example
//! (`auth-url: https://$host/oauth2/auth`, `auth-signin:
//! https://$host/oauth2/start?rd=$escaped_request_uri`), and basic authentication.

use std::collections::BTreeMap;
use std::sync::Mutex;

use lb_core::routes::{BasicAuth, ExternalAuth};

use super::*;

/// What the auth service saw: method, target and headers of each check.
type Seen = Arc<Mutex<Vec<(String, String, HeaderMap)>>>;

/// oauth2-proxy's `/oauth2/auth` by the `_oauth2_proxy` cookie: `valid` 202 with the
/// user headers and a refreshed cookie, `forbidden` 403, `broken` 502, none 401.
async fn auth_service(ip: IpAddr) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind auth service");
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let cookie = req
                                .headers()
                                .get("cookie")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned();
                            log.lock().unwrap().push((
                                req.method().to_string(),
                                req.uri().to_string(),
                                req.headers().clone(),
                            ));
                            let b = Response::builder();
                            let b = if cookie.contains("_oauth2_proxy=valid") {
                                b.status(StatusCode::ACCEPTED)
                                    .header("x-auth-request-user", "alice")
                                    .header("x-auth-request-email", "alice@example.com")
                                    .header("x-not-listed", "1")
                                    .header("set-cookie", "_oauth2_proxy=refreshed; Path=/")
                            } else if cookie.contains("_oauth2_proxy=forbidden") {
                                b.status(StatusCode::FORBIDDEN)
                            } else if cookie.contains("_oauth2_proxy=broken") {
                                b.status(StatusCode::BAD_GATEWAY)
                            } else {
                                b.status(StatusCode::UNAUTHORIZED)
                                    .header("www-authenticate", "Bearer realm=\"test\"")
                                    .header("set-cookie", "_oauth2_proxy_csrf=x; Path=/")
                            };
                            Ok::<_, hyper::Error>(b.body(Full::<Bytes>::default()).unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn external(url: &str, signin: Option<&str>) -> ExternalAuth {
    ExternalAuth {
        url: url.into(),
        method: None,
        signin: signin.map(|s| lb_core::routes::auth::signin_url(s, "rd")),
        response_headers: vec!["x-auth-request-user".into(), "x-auth-request-email".into()],
        request_redirect: None,
        always_set_cookie: false,
    }
}

fn protected(name: &str, app: SocketAddr, auth: ExternalAuth) -> Route {
    with_policy(
        route(name, &[app]),
        Policy {
            external_auth: Some(Arc::new(auth)),
            ..Policy::default()
        },
    )
}

fn request(method: &str, host: &str, path: &str, cookie: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("x-auth-request-user", "mallory")
        .header("x-forwarded-proto", "https");
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    b.body(Full::new(Bytes::from_static(b"payload"))).unwrap()
}

/// ingress-nginx's oauth2-proxy example: the check goes to the hop's own `/oauth2`
/// route with ingress-nginx's headers and no body; 2xx forwards with the listed
/// response headers (replacing the client's) and passes the refreshed cookie on; 401
/// becomes a 302 to the sign-in URL with `rd`; 403 stays 403; another status is 500.
#[test]
fn external_auth_as_the_oauth2_proxy_example() {
    in_netns("auth-ext", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let (auth_addr, seen) = auth_service(backend_ip(3)).await;
        let auth = external(
            "https://$host/oauth2/auth",
            Some("https://$host/oauth2/start?rd=$escaped_request_uri"),
        );
        let rule = HostRule {
            host: HostPattern::Exact("shop.example".into()),
            paths: vec![
                PathRule {
                    path: "/".into(),
                    kind: PathKind::Prefix,
                    route: protected("shop", app.addr, auth),
                },
                PathRule {
                    path: "/oauth2".into(),
                    kind: PathKind::Prefix,
                    route: route("oauth2-proxy", &[auth_addr]),
                },
            ],
        };
        let p = start(test_config(), snapshot(vec![rule]));

        // No session: to sign-in, rd= the escaped request URI; the app is not asked.
        let got = send(
            p.http,
            request("GET", "shop.example", "/cart/items?id=7", None),
        )
        .await;
        assert_eq!(got.status, StatusCode::FOUND);
        assert_eq!(
            got.headers["location"],
            "https://shop.example/oauth2/start?rd=%2Fcart%2Fitems%3Fid%3D7"
        );
        assert_eq!(got.headers["set-cookie"], "_oauth2_proxy_csrf=x; Path=/");
        assert_eq!(app.hits.load(Ordering::Relaxed), 0);

        // A session: forwarded with the user headers; the body goes to the app only.
        let got = send(
            p.http,
            request(
                "POST",
                "shop.example:80",
                "/cart?x=1",
                Some("_oauth2_proxy=valid"),
            ),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert_eq!(
            echoed(&got.body, "x-auth-request-user").as_deref(),
            Some("alice")
        );
        assert_eq!(
            echoed(&got.body, "x-auth-request-email").as_deref(),
            Some("alice@example.com")
        );
        assert_eq!(echoed(&got.body, "x-not-listed"), None);
        assert_eq!(echoed(&got.body, "body-length").as_deref(), Some("7"));
        assert_eq!(got.headers["set-cookie"], "_oauth2_proxy=refreshed; Path=/");
        let (method, target, headers) = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!((method.as_str(), target.as_str()), ("GET", "/oauth2/auth"));
        let h = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(h("host").as_deref(), Some("shop.example"));
        assert_eq!(
            h("x-original-url").as_deref(),
            Some("http://shop.example:80/cart?x=1")
        );
        assert_eq!(h("x-original-method").as_deref(), Some("POST"));
        assert_eq!(h("x-auth-request-redirect").as_deref(), Some("/cart?x=1"));
        assert_eq!(
            h("x-sent-from").as_deref(),
            Some("nginx-ingress-controller")
        );
        assert_eq!(h("x-real-ip").as_deref(), Some("198.51.100.1"));
        assert_eq!(h("x-forwarded-for").as_deref(), Some("198.51.100.1"));
        assert_eq!(h("cookie").as_deref(), Some("_oauth2_proxy=valid"));
        assert!(h("x-request-id").is_some());
        assert_eq!(h("x-forwarded-proto"), None);
        assert_eq!(h("content-length"), None);
        assert_eq!(h("x-original-uri"), None);

        let got = send(
            p.http,
            request("GET", "shop.example", "/", Some("_oauth2_proxy=forbidden")),
        )
        .await;
        assert_eq!(got.status, StatusCode::FORBIDDEN);
        let got = send(
            p.http,
            request("GET", "shop.example", "/", Some("_oauth2_proxy=broken")),
        )
        .await;
        assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(app.hits.load(Ordering::Relaxed), 1);
        settles_at(|| p.metrics.local_answer_count("auth_signin"), 1).await;
        settles_at(|| p.metrics.local_answer_count("auth_forbidden"), 1).await;
        settles_at(|| p.metrics.local_answer_count("auth_error"), 1).await;
    });
}

/// An `auth-url` on a host the hop does not serve goes there directly (an address
/// here); `auth-method` sets the method and adds `X-Original-URI` / `X-Scheme`; a 401
/// without `auth-signin` is passed on with its challenge; an unreachable service and
/// a denied route answer 500 and 503.
#[test]
fn external_auth_method_plain_401_and_failures() {
    in_netns("auth-ext2", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let (auth_addr, seen) = auth_service(backend_ip(3)).await;
        let mut with_method = external(&format!("http://{auth_addr}/verify?app=1"), None);
        with_method.method = Some("POST".into());
        with_method.request_redirect = Some("https://login.example/back".into());
        let unreachable = external("http://192.0.2.9:81/verify", None);
        let denied = with_policy(
            route("denied", &[app.addr]),
            Policy {
                denied: Some("auth-url: bad".into()),
                ..Policy::default()
            },
        );
        let p = start(
            ProxyConfig {
                connect_timeout: Duration::from_millis(300),
                ..test_config()
            },
            snapshot(vec![
                host("api.example", "/", protected("api", app.addr, with_method)),
                host(
                    "dead.example",
                    "/",
                    protected("dead", app.addr, unreachable),
                ),
                host("denied.example", "/", denied),
            ]),
        );
        let got = send(p.http, request("DELETE", "api.example", "/v1/x", None)).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        assert_eq!(got.headers["www-authenticate"], "Bearer realm=\"test\"");
        assert!(!got.headers.contains_key("set-cookie"));
        let (method, target, headers) = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            (method.as_str(), target.as_str()),
            ("POST", "/verify?app=1")
        );
        assert_eq!(headers["host"], auth_addr.to_string().as_str());
        assert_eq!(headers["x-original-method"], "DELETE");
        assert_eq!(headers["x-original-uri"], "/v1/x");
        assert_eq!(headers["x-scheme"], "http");
        assert_eq!(
            headers["x-auth-request-redirect"],
            "https://login.example/back"
        );
        let got = send(
            p.http,
            request("GET", "api.example", "/v1/x", Some("_oauth2_proxy=valid")),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK);
        let got = send(p.http, request("GET", "dead.example", "/", None)).await;
        assert_eq!(got.status, StatusCode::INTERNAL_SERVER_ERROR);
        let got = send(p.http, request("GET", "denied.example", "/", None)).await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(app.hits.load(Ordering::Relaxed), 1);
        settles_at(|| p.metrics.local_answer_count("auth_unauthorized"), 1).await;
        settles_at(|| p.metrics.local_answer_count("auth_denied"), 1).await;
    });
}

/// `auth-type: basic`: 401 with the realm's challenge without or with wrong
/// credentials; a right password (apr1 and {SHA} users) forwards without
/// `Authorization`, as ingress-nginx clears it.
#[test]
fn basic_auth_checks_htpasswd_users() {
    in_netns("auth-basic", || async {
        let (_tx, rx) = watch::channel(false);
        let app = backend(backend_ip(1), "app", rx).await;
        let users = BTreeMap::from([
            (
                "foo".to_owned(),
                "$apr1$xxxxxxxx$dxHfLAsjHkDRmG83UXe8K0".to_owned(),
            ),
            (
                "bar".to_owned(),
                "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=".to_owned(),
            ),
        ]);
        let basic = with_policy(
            route("basic", &[app.addr]),
            Policy {
                basic_auth: Some(Arc::new(BasicAuth {
                    realm: "Authentication Required - foo".into(),
                    users,
                })),
                ..Policy::default()
            },
        );
        let p = start(
            test_config(),
            snapshot(vec![host("staff.example", "/", basic)]),
        );
        let with = |credentials: Option<&str>| {
            use base64::Engine as _;
            let mut b = Request::get("/").header("host", "staff.example");
            if let Some(c) = credentials {
                let encoded = base64::engine::general_purpose::STANDARD.encode(c);
                b = b.header("authorization", format!("Basic {encoded}"));
            }
            b.body(Full::default()).unwrap()
        };
        for credentials in [
            None,
            Some("foo:wrong"),
            Some("nobody:password"),
            Some("foo"),
        ] {
            let got = send(p.http, with(credentials)).await;
            assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{credentials:?}");
            assert_eq!(
                got.headers["www-authenticate"],
                "Basic realm=\"Authentication Required - foo\""
            );
        }
        for credentials in ["foo:password", "bar:password"] {
            let got = send(p.http, with(Some(credentials))).await;
            assert_eq!(got.status, StatusCode::OK, "{credentials}");
            assert_eq!(echoed(&got.body, "authorization"), None);
        }
        assert_eq!(app.hits.load(Ordering::Relaxed), 2);
        settles_at(|| p.metrics.local_answer_count("auth_basic"), 4).await;
    });
}
