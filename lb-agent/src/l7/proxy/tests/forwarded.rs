//! `--l7-use-forwarded-headers` and `--l7-compute-full-forwarded-for` (ingress-nginx's
//! ConfigMap keys) against real sockets: who the source ranges judge and what the
//! backend is told.

use super::*;
use crate::l7::headers::ForwardedTrust;

/// A request from 198.51.100.1 that claims to forward for 198.51.100.50.
async fn claimed(addr: SocketAddr) -> Answer {
    let req = Request::get("/f")
        .header("host", "a.example")
        .header("x-forwarded-for", "198.51.100.50")
        .header("x-forwarded-proto", "https")
        .body(Full::default())
        .unwrap();
    send(addr, req).await
}

#[test]
fn forwarded_headers_are_believed_only_when_configured() {
    in_netns("fwd", || async {
        let (_tx, rx) = watch::channel(false);
        let a = backend(backend_ip(1), "a", rx).await;
        // Only the forwarded-for client is allowed.
        let allow_claimed = with_policy(
            route("a", &[a.addr]),
            Policy {
                access: Some(Access {
                    allow: vec!["198.51.100.50/32".parse().unwrap()],
                    deny: Vec::new(),
                }),
                ..Policy::default()
            },
        );
        let table = || snapshot(vec![host("a.example", "/", allow_claimed.clone())]);
        let config = |use_forwarded_headers, compute_full_forwarded_for| ProxyConfig {
            forwarded: ForwardedTrust {
                use_forwarded_headers,
                compute_full_forwarded_for,
            },
            ..test_config()
        };

        // Default: the connection's address is judged, and told.
        let p = start(config(false, false), table());
        assert_eq!(claimed(p.http).await.status, StatusCode::FORBIDDEN);

        // use-forwarded-headers: the claimed client is judged and passed on.
        let p = start(config(true, false), table());
        let got = claimed(p.http).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert_eq!(
            echoed(&got.body, "x-forwarded-for").as_deref(),
            Some("198.51.100.50")
        );
        assert_eq!(
            echoed(&got.body, "x-real-ip").as_deref(),
            Some("198.51.100.50")
        );
        assert_eq!(
            echoed(&got.body, "x-forwarded-proto").as_deref(),
            Some("https")
        );

        // compute-full-forwarded-for: the chain grows by the connection's address.
        let p = start(config(true, true), table());
        let got = claimed(p.http).await;
        assert_eq!(got.status, StatusCode::OK, "{}", got.body);
        assert_eq!(
            echoed(&got.body, "x-forwarded-for").as_deref(),
            Some("198.51.100.50, 198.51.100.1")
        );

        // A client that claims nothing is judged by its own address either way.
        let p = start(config(true, false), table());
        assert_eq!(
            get(p.http, "a.example", "/").await.status,
            StatusCode::FORBIDDEN
        );
    });
}
