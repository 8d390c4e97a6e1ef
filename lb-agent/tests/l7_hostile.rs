//! 10,000 hostile HTTP/1.x requests against the L7 hop, over raw TCP in a namespace the
//! test creates: the known bypass and smuggling cases, then seeded random mutations of
//! valid requests (the corpus, the recording backends and the oracle are
//! `lb_testbed::hostile`, which `xlb-bench chaos` reports from too). No request may reach
//! a backend on a host or path the rules do not route there; the hop must not panic,
//! every client connection must get an answer or a close within a bounded time, and the
//! hop still serves a valid request afterwards.
//!
//! Bounded: a fixed number of requests, a per-connection read timeout, an overall
//! deadline; the namespace is removed on drop. The counts are printed (`--nocapture`).

use lb_testbed::hostile::{self, Outcome, SEND_DEADLINE, TOTAL};
use lb_testbed::{Netns, check_privileges};

#[test]
fn ten_thousand_hostile_requests_reach_only_routed_backends() {
    check_privileges().expect("the test runs in its own network namespace");
    hostile::count_panics();
    let ns = Netns::with_l7_test_addresses("l7-hostile").expect("create netns");
    let report = ns
        .block_on(hostile::DEADLINE, hostile::run)
        .expect("test body in its netns");
    println!("{report}");

    assert_eq!(
        report.sent, TOTAL,
        "the corpus did not finish within {SEND_DEADLINE:?}"
    );
    assert!(
        report.violations.is_empty(),
        "{} requests reached a backend the rules do not route them to",
        report.violations.len()
    );
    assert!(
        report.stalled.is_empty(),
        "stalled cases (index): {:?}",
        report.stalled
    );
    assert!(report.garbage.is_empty(), "answers that are not HTTP");
    assert_eq!(report.connect_failed, 0);
    assert_eq!(report.panics, 0, "panics in the hop");
    assert_eq!(report.hop_ended, None);
    assert_eq!(
        report.after,
        Outcome::Answered(200, 1),
        "the hop after the corpus"
    );
}
