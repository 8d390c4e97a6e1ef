//! Several workers (`--l7-workers`): each accepts on a listener of its own, on the same
//! address; the kernel spreads new connections over them.

use super::*;

/// Connections from as many client ports: with two workers, a listener no worker
/// accepted on would leave about half of them unanswered.
const CONNECTIONS: usize = 32;

#[test]
fn every_worker_answers_the_connections_it_is_given() {
    in_netns("workers", || async {
        let config = ProxyConfig {
            workers: 3,
            ..test_config()
        };
        let (_a, p, _release) = proxy_to_a(config).await;
        let mut answers = Vec::new();
        for i in 0..CONNECTIONS {
            let request =
                format!("GET /{i} HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n");
            let answer =
                tokio::time::timeout(Duration::from_secs(5), raw(p.http, request.as_bytes()))
                    .await
                    .unwrap_or_else(|_| panic!("connection {i} was not answered"));
            answers.push(answer);
        }
        for (i, answer) in answers.iter().enumerate() {
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{i}: {answer}");
            assert_eq!(echoed(answer, "request"), Some(format!("GET /{i}")));
        }
        // TLS too: the workers share one acceptor.
        for _ in 0..8 {
            served_cert(p.https, "a.example").await;
        }
    });
}
