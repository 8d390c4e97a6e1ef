//! `xlb-bench packet`: per-packet cost by `BPF_PROG_TEST_RUN` with repeat=1 on a fresh
//! copy of the frame for every call (the program rewrites frames, so repeat>1 would time
//! the pass path after the first run), interleaved call by call with a trivial `XDP_PASS`
//! program loaded from the same object.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use lb_common::reason::{XDP_PASS, XDP_REDIRECT};
use lb_testbed::frames::Frame;
use lb_testbed::node::{
    CLIENT_MAC, LB_CLIENT_MAC, Router, client_v4, client_v6, load_dataplane, services, vip_v4,
    vip_v6,
};
use lb_testbed::xdp;

use crate::report;

#[derive(serde::Serialize)]
struct CaseResult {
    case: &'static str,
    median_ns: u64,
    baseline_median_ns: u64,
    ratio: f64,
    target_ratio: f64,
    met: bool,
}

fn median(mut v: Vec<Duration>) -> u64 {
    v.sort_unstable();
    u64::try_from(v[v.len() / 2].as_nanos()).unwrap_or(u64::MAX)
}

#[expect(
    clippy::too_many_lines,
    reason = "one benchmark run, step by step; 101 lines in the base, left to its owners"
)]
pub fn run(iterations: u32, json: Option<&Path>) -> Result<()> {
    if iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let router = Router::new("bench");
    let client_if = router.ns.ifindex("cl")?;
    let results = router.ns.run_in(|| -> Result<Vec<CaseResult>> {
        let mut dp = load_dataplane();
        let mut pass = xdp::PassProgram::load()?;
        for s in services() {
            s.install(&mut dp);
        }
        let established =
            Frame::tcp(client_v4(), 40_000, vip_v4(), 80).macs(CLIENT_MAC, LB_CLIENT_MAC);
        let established_v6 =
            Frame::tcp(client_v6(), 40_000, vip_v6(), 80).macs(CLIENT_MAC, LB_CLIENT_MAC);
        let non_vip = Frame::tcp(
            client_v4(),
            40_000,
            IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77)),
            80,
        )
        .macs(CLIENT_MAC, LB_CLIENT_MAC);
        // Open the established flows once.
        for f in [&established, &established_v6] {
            let out = xdp::test_run(&dp, &f.build(), Some(client_if))?;
            if out.action != XDP_REDIRECT {
                bail!("set-up: flow not forwarded (verdict {})", out.action);
            }
        }
        let syn = Frame::tcp(client_v4(), 0, vip_v4(), 80)
            .syn()
            .macs(CLIENT_MAC, LB_CLIENT_MAC);

        let mut results = Vec::new();
        let cases: [(&'static str, f64, u32); 4] = [
            ("established flow (IPv4 TCP)", 2.5, XDP_REDIRECT),
            ("new flow (IPv4 TCP SYN)", 5.0, XDP_REDIRECT),
            ("non-VIP pass", 1.5, XDP_PASS),
            ("established flow (IPv6 TCP)", 2.5, XDP_REDIRECT),
        ];
        for (index, (case, target, want)) in cases.into_iter().enumerate() {
            let mut xlb = Vec::with_capacity(iterations as usize);
            let mut base = Vec::with_capacity(iterations as usize);
            for i in 0..iterations {
                // A fresh frame for every call: the program rewrites it.
                let frame = match index {
                    0 => established.build(),
                    1 => {
                        // A new flow every call: distinct source port and address.
                        let mut f = syn.clone();
                        #[expect(clippy::cast_possible_truncation, reason = "wraps on purpose")]
                        let (port, host) = (1024 + (i % 60_000) as u16, (i / 60_000) as u8);
                        f.src = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100 + host));
                        f.set_ports(port, 80);
                        f.build()
                    }
                    2 => non_vip.build(),
                    _ => established_v6.build(),
                };
                let b = pass.test_run(&frame, Some(client_if))?;
                let r = xdp::test_run(&dp, &frame, Some(client_if))?;
                if r.action != want {
                    bail!("{case}: verdict {} instead of {want}", r.action);
                }
                base.push(b.duration);
                xlb.push(r.duration);
            }
            let (m, mb) = (median(xlb), median(base));
            #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
            let ratio = m as f64 / mb.max(1) as f64;
            results.push(CaseResult {
                case,
                median_ns: m,
                baseline_median_ns: mb,
                ratio,
                target_ratio: target,
                met: ratio <= target,
            });
        }
        Ok(results)
    })??;

    println!("xlb packet benchmark: BPF_PROG_TEST_RUN, repeat=1, fresh frame per call,");
    println!("interleaved with a trivial XDP_PASS program; {iterations} calls per case.");
    println!();
    println!(
        "{:<30} {:>10} {:>13} {:>7} {:>8}",
        "case", "xlb ns", "baseline ns", "ratio", "target"
    );
    for r in &results {
        println!(
            "{:<30} {:>10} {:>13} {:>7.2} {:>6.1} {}",
            r.case,
            r.median_ns,
            r.baseline_median_ns,
            r.ratio,
            r.target_ratio,
            if r.met { "ok" } else { "MISSED" }
        );
    }
    println!();
    println!("reproduce: cargo xtask bench packet --iterations {iterations}");
    report::write_json(
        json,
        &serde_json::json!({ "bench": "packet", "iterations": iterations, "results": results }),
    )
}
