//! `backend-protocol` against real sockets: HTTPS backends with a test CA (verification
//! off and on, SNI, client certificates), and gRPC-shaped exchanges over h2c and h2 in
//! TLS with their trailers.

use super::*;

use lb_core::model::ingress::KeyPair;
use lb_core::routes::UpstreamTls;
use lb_testbed::{IssuedCert, TestCa};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject as _;

pub(super) fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

fn key_pair(issued: &IssuedCert) -> KeyPair {
    KeyPair {
        chain: chain(&issued.cert_pem),
        key: PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("PEM key"),
    }
}

/// A backend that speaks TLS with `cert` (client certificates from `client_ca` are
/// asked for, not required), HTTP/1.1 or HTTP/2, or cleartext when `cert` is `None`.
/// It echoes what it saw: SNI, client certificate, version, URI, `te`; a gRPC call
/// (`content-type: application/grpc`) gets a gRPC answer with trailers.
pub(super) async fn tls_backend(
    ip: IpAddr,
    name: &'static str,
    cert: Option<&IssuedCert>,
    client_ca: &TestCa,
) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind backend");
    let addr = listener.local_addr().unwrap();
    let acceptor = cert.map(|cert| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in chain(client_ca.pem()) {
            roots.add(ca).unwrap();
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .unwrap();
        let pair = key_pair(cert);
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(pair.chain, pair.key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let Some(acceptor) = acceptor else {
                    let service = hyper::service::service_fn(move |req| {
                        echo_or_grpc(name, String::new(), String::new(), req)
                    });
                    let _ = server.serve_connection(TokioIo::new(stream), service).await;
                    return;
                };
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().unwrap_or("none").to_owned();
                let client = match conn.peer_certificates() {
                    Some(certs) => format!("{} bytes", certs[0].len()),
                    None => "none".to_owned(),
                };
                let service = hyper::service::service_fn(move |req| {
                    echo_or_grpc(name, sni.clone(), client.clone(), req)
                });
                let _ = server.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    addr
}

type Answered = Response<http_body_util::combinators::BoxBody<Bytes, hyper::Error>>;

async fn echo_or_grpc(
    name: &'static str,
    sni: String,
    client: String,
    req: Request<hyper::body::Incoming>,
) -> Result<Answered, hyper::Error> {
    let mut seen = format!(
        "name: {name}\nversion: {:?}\nrequest: {} {}\nsni: {sni}\nclient-cert: {client}\n",
        req.version(),
        req.method(),
        req.uri()
    );
    for (k, v) in req.headers() {
        let _ = writeln!(seen, "{k}: {}", v.to_str().unwrap_or("?"));
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let body = req.into_body().collect().await?.to_bytes();
    if !grpc {
        return Ok(Response::new(
            Full::new(Bytes::from(seen)).map_err(|n| match n {}).boxed(),
        ));
    }
    // One length-prefixed message in, one out, then the status in trailers.
    let asked = String::from_utf8_lossy(body.get(5..).unwrap_or_default()).into_owned();
    let frames = vec![
        Ok::<_, hyper::Error>(Frame::data(grpc_message(&format!(
            "hello {asked} from {name}"
        )))),
        Ok(Frame::trailers({
            let mut t = HeaderMap::new();
            t.insert("grpc-status", "0".parse().unwrap());
            t.insert("grpc-message", format!("served by {name}").parse().unwrap());
            t
        })),
    ];
    let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    let headers = response.headers_mut();
    headers.insert("content-type", "application/grpc".parse().unwrap());
    // What the backend saw, for the test (a gRPC server's own metadata).
    headers.insert("x-seen", seen.replace('\n', "; ").parse().unwrap());
    Ok(response)
}

/// A gRPC message: uncompressed flag, big-endian length, payload.
fn grpc_message(payload: &str) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    out.extend_from_slice(payload.as_bytes());
    Bytes::from(out)
}

fn tls_route(
    name: &str,
    addr: SocketAddr,
    protocol: UpstreamProtocol,
    tls: Option<UpstreamTls>,
) -> Route {
    let mut r = route(name, &[addr]);
    let upstream = Arc::make_mut(&mut r.upstream);
    upstream.protocol = protocol;
    upstream.tls = tls.map(Arc::new);
    r
}

fn settings(verify: bool, ca: &TestCa, name: &str) -> UpstreamTls {
    UpstreamTls {
        verify,
        ca: chain(ca.pem()),
        client: None,
        name: name.to_owned(),
        sni: false,
    }
}

#[test]
fn https_backends_are_verified_as_asked_with_sni_and_client_certificates() {
    in_netns("bktls", || async {
        let ca = TestCa::new("backend CA").unwrap();
        let other_ca = TestCa::new("someone else").unwrap();
        let client_ca = TestCa::new("client CA").unwrap();
        let served = ca.issue(&["api.internal.example"]).unwrap();
        let b = tls_backend(backend_ip(1), "tls", Some(&served), &client_ca).await;
        let client = client_ca.issue(&["xlb client"]).unwrap();
        let full = UpstreamTls {
            sni: true,
            client: Some(Arc::new(key_pair(&client))),
            ..settings(true, &ca, "api.internal.example")
        };
        let routes = vec![
            // ingress-nginx's defaults: no verification, no SNI, no client certificate.
            host(
                "off.example",
                "/",
                tls_route(
                    "off",
                    b,
                    UpstreamProtocol::Http1,
                    Some(settings(false, &other_ca, "api.shop.svc")),
                ),
            ),
            host(
                "on.example",
                "/",
                tls_route("on", b, UpstreamProtocol::Http1, Some(full)),
            ),
            host(
                "name.example",
                "/",
                tls_route(
                    "name",
                    b,
                    UpstreamProtocol::Http1,
                    Some(settings(true, &ca, "other.example")),
                ),
            ),
            host(
                "ca.example",
                "/",
                tls_route(
                    "ca",
                    b,
                    UpstreamProtocol::Http1,
                    Some(settings(true, &other_ca, "api.internal.example")),
                ),
            ),
            host("plain.example", "/", route("plain", &[b])),
        ];
        let p = start(test_config(), snapshot(routes));

        let off = get(p.http, "off.example", "/x").await;
        assert_eq!(off.status, StatusCode::OK, "{}", off.body);
        assert_eq!(echoed(&off.body, "version").as_deref(), Some("HTTP/1.1"));
        assert_eq!(echoed(&off.body, "sni").as_deref(), Some("none"));
        assert_eq!(echoed(&off.body, "client-cert").as_deref(), Some("none"));
        assert_eq!(echoed(&off.body, "host").as_deref(), Some("off.example"));

        for _ in 0..2 {
            let on = get(p.http, "on.example", "/y").await;
            assert_eq!(on.status, StatusCode::OK, "{}", on.body);
            assert_eq!(
                echoed(&on.body, "sni").as_deref(),
                Some("api.internal.example")
            );
            let sent = key_pair(&client).chain[0].len();
            assert_eq!(
                echoed(&on.body, "client-cert"),
                Some(format!("{sent} bytes"))
            );
        }
        assert_eq!(p.metrics.upstream_error_count("tls_handshake"), 0);

        for failing in ["name.example", "ca.example"] {
            let got = get(p.http, failing, "/").await;
            assert_eq!(
                got.status,
                StatusCode::BAD_GATEWAY,
                "{failing}: {}",
                got.body
            );
        }
        // One failed handshake per attempt (the retry finds no other endpoint).
        settles_at(|| p.metrics.upstream_error_count("tls_handshake"), 2).await;
        // Cleartext to a TLS port fails the exchange, not silently.
        let plain = get(p.http, "plain.example", "/").await;
        assert_eq!(plain.status, StatusCode::BAD_GATEWAY, "{}", plain.body);
    });
}

/// A gRPC unary call over h2 in TLS to the proxy: the message, then `grpc-status` and
/// `grpc-message` from the trailers.
async fn grpc_call(
    proxy: SocketAddr,
    authority: &str,
    payload: &str,
) -> (Response<()>, String, HeaderMap) {
    let tls = tls_connect(proxy, authority, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post(format!("https://{authority}/greet.Greeter/SayHello"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_message(payload)))
        .unwrap();
    let response = sender.send_request(req).await.expect("gRPC response");
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("gRPC body");
        match frame.into_data() {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => trailers = frame.into_trailers().expect("trailers"),
        }
    }
    let message = String::from_utf8_lossy(data.get(5..).unwrap_or_default()).into_owned();
    (Response::from_parts(parts, ()), message, trailers)
}

#[test]
fn grpc_over_h2c_and_grpcs_end_to_end_keep_trailers() {
    in_netns("grpc", || async {
        let ca = TestCa::new("backend CA").unwrap();
        let served = ca.issue(&["greeter.shop.svc"]).unwrap();
        let grpcs = tls_backend(backend_ip(1), "grpcs", Some(&served), &ca).await;
        let grpc = tls_backend(backend_ip(2), "grpc", None, &ca).await;
        let routes = vec![
            host(
                "grpcs.example",
                "/",
                tls_route(
                    "grpcs",
                    grpcs,
                    UpstreamProtocol::H2c,
                    Some(settings(true, &ca, "greeter.shop.svc")),
                ),
            ),
            host(
                "grpc.example",
                "/",
                tls_route("grpc", grpc, UpstreamProtocol::H2c, None),
            ),
        ];
        let p = start(test_config(), snapshot(routes));
        for (authority, name, scheme) in [
            ("grpcs.example", "grpcs", "https"),
            ("grpc.example", "grpc", "http"),
        ] {
            let (head, message, trailers) = grpc_call(p.https, authority, "xlb").await;
            assert_eq!(head.status(), StatusCode::OK);
            assert_eq!(head.version(), hyper::Version::HTTP_2);
            assert_eq!(message, format!("hello xlb from {name}"));
            assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{authority}");
            assert_eq!(
                trailers.get("grpc-message").unwrap().to_str().unwrap(),
                format!("served by {name}")
            );
            let seen = head
                .headers()
                .get("x-seen")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            assert!(seen.contains("version: HTTP/2.0"), "{seen}");
            assert!(seen.contains("te: trailers"), "{seen}");
            assert!(
                seen.contains(&format!(
                    "request: POST {scheme}://{authority}/greet.Greeter/SayHello"
                )),
                "{seen}"
            );
        }
    });
}
