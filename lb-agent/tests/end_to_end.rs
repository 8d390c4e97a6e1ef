//! Real TCP through the XDP program attached natively to veths: client namespace ->
//! VIP (IPv4 and IPv6) -> load-balancer namespace -> backends, and the replies back
//! through the reverse translation. Same code as `cargo xtask demo`.

#[test]
fn tcp_through_vips_reaches_every_backend() {
    let requests = 60;
    let report = lb_agent::demo::run(3, requests).expect("demo topology");
    assert_eq!(report.failures, 0, "{report}");
    for (vip, per_backend) in &report.answers {
        assert_eq!(
            per_backend.values().sum::<u64>(),
            u64::from(requests),
            "{vip}: {report}"
        );
        // 60 flows over 3 equal backends: each gets some (P(one gets none) ~ 3e-11).
        assert_eq!(per_backend.len(), 3, "{vip} reaches all backends: {report}");
    }
    // Packets the XDP program counted under reasons starting with `prefix`.
    let counted = |prefix: &str| -> u64 {
        report
            .reasons
            .iter()
            .filter(|(r, _)| r.name().starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    };
    let forwarded = counted("fwd_");
    let replies = counted("reply_");
    assert!(forwarded > u64::from(requests), "XDP forwarded: {report}");
    assert!(
        replies > u64::from(requests),
        "XDP translated replies: {report}"
    );
}
