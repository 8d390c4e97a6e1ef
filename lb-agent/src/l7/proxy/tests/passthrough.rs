//! `ssl-passthrough` against real sockets: a client that verifies the backend's own
//! certificate (from a test CA) reaches it through the hop, while other names are
//! terminated by the hop as before.

use std::collections::HashMap;

use super::backend_protocol::{chain, tls_backend};
use super::*;
use lb_testbed::TestCa;

/// A client that trusts only `ca` and sends `sni`.
async fn verified_get(
    proxy: SocketAddr,
    ca: &TestCa,
    sni: &str,
) -> Result<(CertificateDer<'static>, Answer), std::io::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in chain(ca.pem()) {
        roots.add(cert).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(sni.to_owned()).unwrap();
    let tls = connector.connect(name, connect(proxy).await).await?;
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/through")
        .header("host", sni)
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(req).await.expect("response");
    Ok((cert, read_answer(response).await))
}

#[test]
fn passthrough_hosts_reach_their_backend_untouched_and_others_are_terminated() {
    in_netns("passthru", || async {
        let ca = TestCa::new("backend CA").unwrap();
        let issued = ca.issue(&["secure.example"]).unwrap();
        let backend_cert = chain(&issued.cert_pem).remove(0);
        let secure = tls_backend(backend_ip(1), "secure", Some(&issued), &ca).await;
        let (_tx, rx) = watch::channel(false);
        let plain = backend(backend_ip(2), "plain", rx).await;
        let through = route("secure", &[secure]).upstream;
        let table = || {
            RouteTable::new(
                vec![host("a.example", "/", route("plain", &[plain.addr]))],
                None,
            )
            .with_passthrough(HashMap::from([(
                "secure.example".to_owned(),
                Arc::clone(&through),
            )]))
        };
        let hop_cert = certificate(&["a.example"], &["a.example"]);
        let snapshot = Arc::new(Snapshot {
            routes: table(),
            certificates: vec![hop_cert.clone()],
        });
        let on = start(
            ProxyConfig {
                ssl_passthrough: true,
                ..test_config()
            },
            Arc::clone(&snapshot),
        );

        // The client verified the backend's certificate end to end, the backend saw
        // the client's SNI, and the answer is the backend's.
        for _ in 0..2 {
            let (cert, got) = verified_get(on.https, &ca, "SECURE.example")
                .await
                .expect("handshake");
            assert_eq!(cert, backend_cert);
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(echoed(&got.body, "name").as_deref(), Some("secure"));
            assert_eq!(echoed(&got.body, "sni").as_deref(), Some("secure.example"));
            // No forwarding headers: the hop never saw the request.
            assert_eq!(echoed(&got.body, "x-forwarded-for"), None);
        }

        // Another name: the hop's certificate and its routes.
        let tls = tls_connect(on.https, "a.example", &[]).await;
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        assert_eq!(served.as_ref(), hop_cert.key.cert[0].as_ref());
        drop(tls);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(
            tls_connect(on.https, "a.example", &[]).await,
        ))
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/x")
            .header("host", "a.example")
            .body(Full::<Bytes>::default())
            .unwrap();
        let got = read_answer(sender.send_request(req).await.unwrap()).await;
        assert_eq!(echoed(&got.body, "name").as_deref(), Some("plain"));
        assert_eq!(
            echoed(&got.body, "x-forwarded-proto").as_deref(),
            Some("https")
        );

        // Without the flag the annotation does nothing: the hop terminates (its default
        // certificate, which the backend's CA does not sign).
        let off = start(test_config(), snapshot);
        let refused = verified_get(off.https, &ca, "secure.example").await;
        assert!(refused.is_err(), "the hop's own certificate was accepted");
        let default = served_cert(off.https, "secure.example").await;
        assert_ne!(default, backend_cert);

        // A connection that never finishes its ClientHello is cut like a slow handshake.
        let mut silent = connect(on.https).await;
        silent.write_all(&[0x16, 0x03, 0x01, 0x00]).await.unwrap();
        drop(silent);
        wait_until("the half hello counted", || {
            on.metrics.closed_count("tls_handshake") >= 1
        })
        .await;
    });
}
