//! `xlb-bench packet`: per-packet cost by `BPF_PROG_TEST_RUN` with repeat=1 on a fresh
//! copy of the frame for every call (the program rewrites frames, so repeat>1 would time
//! the pass path after the first run), interleaved call by call with a trivial `XDP_PASS`
//! program loaded from its own object (`xlb-pass`).
//!
//! Cases, one per stage of the packet path, each checked call by call for its verdict and
//! afterwards for its exit reason (the reason counter must have grown by the number of
//! calls, so a case cannot silently measure another path):
//! - parse only: a non-IP frame (ARP), which leaves after the Ethertype;
//! - non-VIP: TCP to an address that is not ours, stopped by the address pre-filter;
//! - frontend miss: TCP to a VIP on a port no service uses (pre-filter hit, lookup miss);
//! - established flows (IPv4, IPv6): conntrack hit, DNAT, FIB, redirect; and the IPv4
//!   one again with the CPU's private caches (L1, L2) evicted before every call, as when
//!   packets arrive between other work (no target: it shows the cost of cold code and
//!   maps, which a hot loop of calls never pays);
//! - the backend's reply: reverse translation towards the client;
//! - new flows: a new 5-tuple on every call, first while the conntrack table has room,
//!   then over the whole table: `--flows` calls (more than the table holds), so the table
//!   fills and every later new flow evicts an entry, as under a connection flood;
//! - established flows of that full table, a different one on every call: each lookup
//!   finds its entry out of the CPU's caches, as on a busy node (no target; it shows what
//!   the memory costs, which the single replayed flow above never pays).
//! - new flows again, over a fresh table, to the same service in DSR mode: the flow's
//!   one entry holds no reply translation (the backend's node answers the client and
//!   keeps it), as every flow of Katran's has one entry. No target: it compares like
//!   with like to Katran;
//! - new flows to the same service source-NATed, over a fresh dataplane with room (the
//!   Kubernetes default for `externalTrafficPolicy: Cluster` to a backend on another
//!   node): each also reserves a port of the node's, whose entry is the reply's
//!   translation (two inserts). No target: it shows what the default mode costs.
//!
//! Before the first case, the trivial program runs in batches until its timing is
//! steady (a previous run's maps take the kernel seconds to free), and the wait is printed.
//!
//! Also each program's size as the kernel reports it (`BPF_OBJ_GET_INFO_BY_FD`): the
//! instructions after the verifier's rewrites (xlated), the JIT's machine code, and the
//! instructions the verifier walked, next to the same figures for the pass program.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use aya::programs::ProgramInfo;
use lb_agent::dataplane::Dataplane;
use lb_common::maps;
use lb_common::reason::{XDP_PASS, XDP_REDIRECT};
use lb_common::{FRONTEND_F_DSR, FRONTEND_F_SNAT, PROTO_TCP, Reason, dsr::IPPROTO_IPIP};
use lb_testbed::frames::Frame;
use lb_testbed::node::{
    CLIENT_MAC, LB_CLIENT_MAC, Router, Service, client_v4, client_v6, load_dataplane, node_config,
    node_v4, reply_from, services, vip_v4, vip_v6,
};
use lb_testbed::xdp::{self, PassProgram};

use crate::report;

#[derive(clap::Args)]
pub struct Args {
    /// Calls per case (each case also runs the baseline this many times).
    #[arg(long, default_value_t = 20_000)]
    iterations: u32,
    /// New flows in the table-filling case, each a new 5-tuple; must exceed the conntrack
    /// table's size so that the table fills and later flows evict.
    #[arg(long, default_value_t = 500_000)]
    flows: u32,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The targets of issue 16, as ratios to the pass program in the same run.
const TARGET_ESTABLISHED: f64 = 2.5;
const TARGET_NEW_FLOW_FILLING: f64 = 8.0;
const TARGET_NON_VIP: f64 = 1.3;
/// IPv6 established over IPv4 established.
const TARGET_V6_OVER_V4: f64 = 1.1;
/// The new-flow case before this benchmark timed flows over a filling table (kept).
const TARGET_NEW_FLOW_ROOM: f64 = 5.0;

/// The frontend's port for the frontend-miss case: the VIP serves 80/tcp and 53/udp only.
const UNSERVED_PORT: u16 = 8443;
/// The table-filling flows' sources: 198.51.100.110 to .254, 64,000 ports each.
const FILL_FIRST_HOST: u8 = 110;
/// The DSR case's check flow comes from 198.51.100.100, apart from the filling flows.
const DSR_PROBE_HOST: u8 = 100;
/// The IPv4 header's protocol byte in an Ethernet frame.
const IPV4_PROTOCOL_AT: usize = 14 + 9;
/// Calls of the caches-cold case (each evicts twice, about 0.1 ms).
const COLD_CALLS: u32 = 5_000;
/// What the caches-cold case writes before each call: twice the L2 of the CPUs these
/// machines have (1 MiB), so it leaves nothing of the last run in L1 or L2.
const EVICT_BYTES: usize = 2 << 20;
/// Calls of the full-table established case.
const FULL_TABLE_CALLS: u32 = 20_000;
/// Its step through the flows: a prime, so the calls visit distinct flows (unless the
/// span is a multiple of it).
const FULL_TABLE_STRIDE: u64 = 7_919;
/// Calls of the trivial program per settling batch.
const SETTLE_BATCH: usize = 2_000;
/// Consecutive batches whose medians must agree within [`SETTLE_TOLERANCE`].
const SETTLE_STEADY: u32 = 3;
const SETTLE_TOLERANCE: f64 = 0.05;
/// The longest wait for a steady machine; the cases then run anyway and say so.
const SETTLE_MAX: Duration = Duration::from_secs(15);

#[derive(serde::Serialize)]
struct CaseResult {
    case: &'static str,
    stage: &'static str,
    calls: u32,
    median_ns: u64,
    baseline_median_ns: u64,
    ratio: f64,
    /// Mean of the middle 80% of the calls (10th to 90th percentile), in ns: finer than
    /// the median, which moves in the steps of the kernel's clock (about 10 ns here).
    trimmed_mean_ns: f64,
    baseline_trimmed_mean_ns: f64,
    /// `trimmed_mean_ns / baseline_trimmed_mean_ns`.
    trimmed_ratio: f64,
    target_ratio: Option<f64>,
    met: Option<bool>,
}

#[derive(serde::Serialize)]
struct ProgramSize {
    program: &'static str,
    /// Instructions after the verifier's rewrites (`xlated_prog_len / 8`).
    xlated_insns: Option<u32>,
    /// Bytes of JIT-compiled machine code (`jited_prog_len`).
    jited_bytes: u32,
    /// Instructions the verifier processed (`verified_insns`).
    verified_insns: Option<u32>,
}

#[derive(serde::Serialize)]
struct Filling {
    flows: u32,
    /// Conntrack entries before the case, and the table's capacity.
    entries_before: u64,
    capacity: u64,
    /// Conntrack entries after the last flow.
    entries_after: u64,
}

/// Everything a run measured.
struct Measured {
    results: Vec<CaseResult>,
    filling: Filling,
    dsr: DsrFilling,
    programs: Vec<ProgramSize>,
    settled: Settled,
}

/// The DSR table-filling case's table, and how long its fresh dataplane took to settle.
#[derive(serde::Serialize)]
struct DsrFilling {
    filling: Filling,
    settled: Settled,
}

/// One stage of the packet path: the frames it sends and what the program must do.
struct Case {
    name: &'static str,
    stage: &'static str,
    ingress: u32,
    verdict: u32,
    reason: Reason,
    target: Option<f64>,
    calls: u32,
    frame: Box<dyn Fn(u32) -> Vec<u8>>,
    /// Evict the CPU's private caches before every call (of both programs).
    cold: bool,
}

/// Interleaved timings of one case: the program's and the pass program's, call by call.
struct Timings {
    xlb: Vec<Duration>,
    pass: Vec<Duration>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    // The DSR case fills an empty table: it needs more flows than the table holds.
    if args.flows <= maps::CONNTRACK_ENTRIES {
        bail!(
            "--flows {} must exceed the conntrack table's {} entries",
            args.flows,
            maps::CONNTRACK_ENTRIES
        );
    }
    let router = Router::new("bench");
    let client_if = router.ns.ifindex("cl")?;
    let backend_if = router.ns.ifindex("bk")?;
    let m = router.ns.run_in(|| -> Result<Measured> {
        let mut dp = load_dataplane();
        let mut pass = PassProgram::load()?;
        let mut programs = vec![program_size("xlb_xdp", &dp.program()?.info()?)];
        for (name, program) in dp.slow_path_programs()? {
            programs.push(program_size(name, &program.info()?));
        }
        programs.push(program_size("xlb_pass (baseline)", &pass.info()?));
        let svcs = services();
        for s in &svcs {
            s.install(&mut dp);
        }
        let web = svcs
            .iter()
            .find(|s| s.frontend == (vip_v4(), 80, PROTO_TCP))
            .context("the IPv4 web service is missing from the testbed's services")?;

        let (cases, syn) = stage_cases(&dp, web, args.iterations, client_if, backend_if)?;
        let settled = settle(&mut pass, &arp_frame(), client_if)?;
        let mut results = Vec::new();
        for case in &cases {
            let t = time_case(&dp, &mut pass, case)?;
            results.push(result(case.name, case.stage, &t.xlb, &t.pass, case.target));
        }
        let filling = fill_conntrack(
            &dp,
            &mut pass,
            &syn,
            args.flows,
            client_if,
            FillMode::Nat,
            &mut results,
        )?;
        // One entry per flow: none of these flows needed the pair (a client port with
        // two frontends).
        for pair in [maps::CONNTRACK, maps::REVNAT] {
            let n = dp.table_fill(pair)?.entries;
            if n != 0 {
                bail!("table-filling case: {n} entries in {pair}, expected none");
            }
        }
        let busy = established_in_full_table(&dp, &mut pass, web, &syn, &filling, client_if)?;
        results.push(busy);
        drop(dp);
        let dsr = fill_dsr(&mut pass, &syn, args.flows, client_if, &mut results)?;
        results.push(snat_new_flows(&mut pass, &syn, args.iterations, client_if)?);
        Ok(Measured {
            results,
            filling,
            dsr,
            programs,
            settled,
        })
    })??;

    print_results(args, &m);
    report::write_json(
        args.json.as_deref(),
        &serde_json::json!({
            "bench": "packet",
            "iterations": args.iterations,
            "flows": args.flows,
            "results": m.results,
            "filling": m.filling,
            "dsr_filling": m.dsr,
            "programs": m.programs,
            "settled": m.settled,
            "ipv6_over_ipv4_established": v6_over_v4(&m.results),
            "target_ipv6_over_ipv4": TARGET_V6_OVER_V4,
            "reproduce": reproduce(args),
        }),
    )
}

/// The stage cases, and the SYN the new-flow cases vary; opens the established flows
/// (and so the reply's translation) first.
#[expect(clippy::too_many_lines, reason = "a table: one literal per case")]
fn stage_cases(
    dp: &Dataplane,
    web: &Service,
    iterations: u32,
    client_if: u32,
    backend_if: u32,
) -> Result<(Vec<Case>, Frame)> {
    let to_client = |f: Frame| f.macs(CLIENT_MAC, LB_CLIENT_MAC);
    let established = to_client(Frame::tcp(client_v4(), 40_000, vip_v4(), 80));
    let established_v6 = to_client(Frame::tcp(client_v6(), 40_000, vip_v6(), 80));
    // Open the established flows once.
    for f in [&established, &established_v6] {
        let out = xdp::test_run(dp, &f.build(), Some(client_if))?;
        if out.action != XDP_REDIRECT {
            bail!("set-up: flow not forwarded (verdict {})", out.action);
        }
    }
    let (_, backend, port) = web.expected_backend(&established);
    let n = match backend {
        IpAddr::V4(v4) => v4.octets()[3],
        IpAddr::V6(_) => bail!("the IPv4 web service has an IPv6 backend"),
    };
    let reply = reply_from(&established, backend, port, n);
    let non_vip = to_client(Frame::tcp(
        client_v4(),
        40_000,
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 77)),
        80,
    ));
    let miss = to_client(Frame::tcp(client_v4(), 40_000, vip_v4(), UNSERVED_PORT));
    let syn = to_client(Frame::tcp(client_v4(), 0, vip_v4(), 80).syn());
    let arp = arp_frame();

    let each = |f: Frame| -> Box<dyn Fn(u32) -> Vec<u8>> { Box::new(move |_| f.build()) };
    let cases = vec![
        Case {
            name: "parse only (ARP, not IP)",
            stage: "parse",
            ingress: client_if,
            verdict: XDP_PASS,
            reason: Reason::PassNotIp,
            target: None,
            calls: iterations,
            frame: Box::new(move |_| arp.clone()),
            cold: false,
        },
        Case {
            name: "non-VIP pass",
            stage: "parse + address pre-filter",
            ingress: client_if,
            verdict: XDP_PASS,
            reason: Reason::PassNotFrontend,
            target: Some(TARGET_NON_VIP),
            calls: iterations,
            frame: each(non_vip),
            cold: false,
        },
        Case {
            name: "frontend miss (VIP, other port)",
            stage: "parse + pre-filter + frontend lookup",
            ingress: client_if,
            verdict: XDP_PASS,
            reason: Reason::PassNotFrontend,
            target: None,
            calls: iterations,
            frame: each(miss),
            cold: false,
        },
        Case {
            name: "established flow (IPv4 TCP)",
            stage: "conntrack hit + DNAT + FIB",
            ingress: client_if,
            verdict: XDP_REDIRECT,
            reason: Reason::FwdRedirect,
            target: Some(TARGET_ESTABLISHED),
            calls: iterations,
            frame: each(established.clone()),
            cold: false,
        },
        Case {
            name: "established flow, caches cold",
            stage: "as above, L1/L2 evicted before each call",
            ingress: client_if,
            verdict: XDP_REDIRECT,
            reason: Reason::FwdRedirect,
            target: None,
            calls: iterations.min(COLD_CALLS),
            frame: each(established.clone()),
            cold: true,
        },
        Case {
            name: "established flow (IPv6 TCP)",
            stage: "conntrack hit + DNAT + FIB",
            ingress: client_if,
            verdict: XDP_REDIRECT,
            reason: Reason::FwdRedirect,
            target: Some(TARGET_ESTABLISHED),
            calls: iterations,
            frame: each(established_v6),
            cold: false,
        },
        Case {
            name: "reply (IPv4 TCP, backend -> client)",
            stage: "reverse translation + FIB",
            ingress: backend_if,
            verdict: XDP_REDIRECT,
            reason: Reason::ReplyRedirect,
            target: None,
            calls: iterations,
            frame: each(reply),
            cold: false,
        },
        Case {
            name: "new flow, table with room",
            stage: "Maglev + flow entry insert",
            ingress: client_if,
            verdict: XDP_REDIRECT,
            reason: Reason::FwdRedirect,
            target: Some(TARGET_NEW_FLOW_ROOM),
            calls: iterations,
            // 198.51.100.100 and up, a new source port every call.
            frame: new_flows(&syn, 100),
            cold: false,
        },
    ];
    Ok((cases, syn))
}

/// Frames of new flows: source 198.51.100.`first_host` and up, a new port every call
/// (64,000 ports per address), so every call is a 5-tuple the table has not seen.
fn new_flows(syn: &Frame, first_host: u8) -> Box<dyn Fn(u32) -> Vec<u8>> {
    let syn = syn.clone();
    Box::new(move |i| {
        let mut f = syn.clone();
        let (host, port) = (i / 64_000, i % 64_000);
        let host = u8::try_from(u32::from(first_host) + host).expect("flows fit the /24");
        f.src = IpAddr::V4(Ipv4Addr::new(198, 51, 100, host));
        f.set_ports(1024 + u16::try_from(port).expect("below 64000"), 80);
        f.build()
    })
}

/// An ARP request (who has 198.51.100.1, tell the client): a frame that is not IP.
fn arp_frame() -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, request.
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[198, 51, 100, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[198, 51, 100, 1]);
    f
}

fn program_size(program: &'static str, info: &ProgramInfo) -> ProgramSize {
    ProgramSize {
        program,
        xlated_insns: info.size_translated().map(|bytes| bytes / 8),
        jited_bytes: info.size_jitted(),
        verified_insns: info.verified_instruction_count(),
    }
}

/// Packets counted under `reason` so far.
fn reason_packets(dp: &Dataplane, reason: Reason) -> Result<u64> {
    Ok(dp
        .reason_stats()?
        .into_iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, s)| s.packets))
}

/// Runs `case`: the pass program and the load balancer on the same frame, call by call,
/// checking every verdict, then that every call left by the case's reason.
fn time_case(dp: &Dataplane, pass: &mut PassProgram, case: &Case) -> Result<Timings> {
    let before = reason_packets(dp, case.reason)?;
    let mut t = Timings {
        xlb: Vec::with_capacity(case.calls as usize),
        pass: Vec::with_capacity(case.calls as usize),
    };
    let mut evictor = case.cold.then(|| vec![0u8; EVICT_BYTES]);
    for i in 0..case.calls {
        let frame = (case.frame)(i);
        if let Some(buf) = &mut evictor {
            evict(buf);
        }
        let b = pass.test_run(&frame, Some(case.ingress))?;
        if let Some(buf) = &mut evictor {
            evict(buf);
        }
        let r = xdp::test_run(dp, &frame, Some(case.ingress))?;
        if r.action != case.verdict {
            bail!(
                "{}: call {i}: verdict {} instead of {}",
                case.name,
                r.action,
                case.verdict
            );
        }
        t.pass.push(b.duration);
        t.xlb.push(r.duration);
    }
    let counted = reason_packets(dp, case.reason)? - before;
    if counted != u64::from(case.calls) {
        bail!(
            "{}: {counted} of {} calls counted as {}: the case did not take the path it \
             names",
            case.name,
            case.calls,
            case.reason.name()
        );
    }
    Ok(t)
}

/// How long the machine took to become steady before the cases ran.
#[derive(serde::Serialize)]
struct Settled {
    waited_ms: u128,
    steady: bool,
    /// The trivial program's median in the last batch.
    pass_median_ns: u64,
}

/// Runs the trivial program in batches until [`SETTLE_STEADY`] batch medians in a row
/// agree within [`SETTLE_TOLERANCE`] (at most [`SETTLE_MAX`]). The kernel goes on
/// freeing a previous run's maps (some 100 MB) for seconds after it exits; cases timed
/// meanwhile came out 20-40 % slower, for xlb and the trivial program alike.
fn settle(pass: &mut PassProgram, frame: &[u8], ingress: u32) -> Result<Settled> {
    let start = std::time::Instant::now();
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    let (mut last, mut agreeing) = (0u64, 0u32);
    loop {
        batch.clear();
        for _ in 0..SETTLE_BATCH {
            batch.push(pass.test_run(frame, Some(ingress))?.duration);
        }
        let now = median(&batch);
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds of one call")]
        let close = last > 0 && (now as f64 - last as f64).abs() <= SETTLE_TOLERANCE * last as f64;
        agreeing = if close { agreeing + 1 } else { 0 };
        last = now;
        let steady = agreeing + 1 >= SETTLE_STEADY;
        if steady || start.elapsed() >= SETTLE_MAX {
            return Ok(Settled {
                waited_ms: start.elapsed().as_millis(),
                steady,
                pass_median_ns: now,
            });
        }
    }
}

/// Writes a line of `buf` every 64 bytes: with `buf` twice this CPU's L2, the caches
/// private to the CPU (L1 data and instructions, L2) then hold none of what the last
/// program run left there, as when a packet arrives after the kernel and other tasks ran.
fn evict(buf: &mut [u8]) {
    for line in buf.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    std::hint::black_box(buf);
}

/// New flows until the conntrack table is full and well past it: the median over all of
/// them, while the table had room and once it was full (pushed to `results`), and the
/// table's fill before and after.
fn fill_conntrack(
    dp: &Dataplane,
    pass: &mut PassProgram,
    syn: &Frame,
    flows: u32,
    client_if: u32,
    mode: FillMode,
    results: &mut Vec<CaseResult>,
) -> Result<Filling> {
    const MAX_FLOWS: u32 = (255 - FILL_FIRST_HOST as u32) * 64_000;
    let before = dp.table_fill(maps::FLOWS)?;
    let room = before.capacity.saturating_sub(before.entries);
    if u64::from(flows) <= room || flows > MAX_FLOWS {
        bail!(
            "--flows {flows} must fill the conntrack table ({} entries, {} in use) and be at \
             most {MAX_FLOWS}",
            before.capacity,
            before.entries
        );
    }
    let [all, while_room, full] = mode.names();
    let case = Case {
        name: all,
        stage: mode.stage(),
        ingress: client_if,
        verdict: XDP_REDIRECT,
        reason: Reason::FwdRedirect,
        target: mode.target(),
        calls: flows,
        // None of these 5-tuples was seen before.
        frame: new_flows(syn, FILL_FIRST_HOST),
        cold: false,
    };
    let t = time_case(dp, pass, &case)?;
    let after = dp.table_fill(maps::FLOWS)?;
    let split = usize::try_from(room).unwrap_or(usize::MAX).min(t.xlb.len());
    results.push(result(case.name, case.stage, &t.xlb, &t.pass, case.target));
    for (name, range) in [(while_room, 0..split), (full, split..t.xlb.len())] {
        if !range.is_empty() {
            results.push(result(
                name,
                case.stage,
                &t.xlb[range.clone()],
                &t.pass[range],
                case.target,
            ));
        }
    }
    Ok(Filling {
        flows,
        entries_before: before.entries,
        capacity: before.capacity,
        entries_after: after.entries,
    })
}

/// Which frontend the table-filling flows go to.
#[derive(Clone, Copy)]
enum FillMode {
    /// The default: DNAT to the backend; a new flow writes one entry, which holds its
    /// reply's translation too (one LRU insert).
    Nat,
    /// DSR to a backend on another node: a new flow writes its conntrack entry alone.
    Dsr,
}

impl FillMode {
    /// The case over all flows, while the table had room, once it was full.
    fn names(self) -> [&'static str; 3] {
        match self {
            Self::Nat => [
                "new flow, table filling (all flows)",
                "new flow, table filling (while room)",
                "new flow, table full (evicting)",
            ],
            Self::Dsr => [
                "DSR new flow, table filling (all)",
                "DSR new flow, filling (while room)",
                "DSR new flow, table full (evicting)",
            ],
        }
    }

    fn stage(self) -> &'static str {
        match self {
            Self::Nat => "Maglev + one flow entry insert (+ LRU)",
            Self::Dsr => "Maglev + one flow entry insert + encap.",
        }
    }

    fn target(self) -> Option<f64> {
        match self {
            Self::Nat => Some(TARGET_NEW_FLOW_FILLING),
            Self::Dsr => None,
        }
    }
}

/// The table-filling case again on a fresh dataplane whose services are all DSR (their
/// backends on other nodes), after waiting for the machine to settle (the kernel frees
/// the last dataplane's maps meanwhile).
fn fill_dsr(
    pass: &mut PassProgram,
    syn: &Frame,
    flows: u32,
    client_if: u32,
    results: &mut Vec<CaseResult>,
) -> Result<DsrFilling> {
    let mut dp = load_dataplane();
    // The outer header's source.
    dp.set_snat_config(&node_config(maps::SNAT_PORT_MIN, maps::SNAT_PORT_MAX))?;
    for mut s in services() {
        s.flags |= FRONTEND_F_DSR;
        s.install(&mut dp);
    }
    // The case must time the DSR path: a new flow leaves encapsulated (IPIP)...
    let probe = xdp::test_run(&dp, &new_flows(syn, DSR_PROBE_HOST)(0), Some(client_if))?;
    if probe.frame.get(IPV4_PROTOCOL_AT) != Some(&IPPROTO_IPIP) {
        bail!("DSR case: a new flow did not leave encapsulated (IPIP)");
    }
    let settled = settle(pass, &arp_frame(), client_if)?;
    let filling = fill_conntrack(&dp, pass, syn, flows, client_if, FillMode::Dsr, results)?;
    // ...and writes no reply entry: that is the backend's node's.
    let replies = dp.table_fill(maps::REVNAT)?.entries;
    if replies != 0 {
        bail!("DSR case: {replies} reply entries written, expected none");
    }
    Ok(DsrFilling { filling, settled })
}

/// The first port of the SNAT case's range: wide (as `--snat-ports 1024-65535` makes
/// it), so that its new flows find a free port within few attempts.
const SNAT_BENCH_PORT_MIN: u16 = 1024;
/// Where an IPv4 frame's source address starts.
const IPV4_SOURCE_AT: usize = 14 + 12;
/// The SNAT case's calls at most: spread over the service's two backends, each with
/// 64,512 ports, under 8 % of a range is held, so every flow finds a free port within
/// its `SNAT_ATTEMPTS` draws (one flow in 10^8 would not). The flows are fixed: a
/// refusal would fail every run, not one now and then.
const SNAT_CASE_FLOWS: u32 = 10_000;

/// New flows source-NATed, a new 5-tuple on every call (at most [`SNAT_CASE_FLOWS`]), on
/// a fresh dataplane whose services are all SNAT (their backends on other nodes):
/// checked to leave from the node's address and to reserve one port each.
fn snat_new_flows(
    pass: &mut PassProgram,
    syn: &Frame,
    iterations: u32,
    client_if: u32,
) -> Result<CaseResult> {
    let mut dp = load_dataplane();
    dp.set_snat_config(&node_config(SNAT_BENCH_PORT_MIN, maps::SNAT_PORT_MAX))?;
    for mut s in services() {
        s.flags |= FRONTEND_F_SNAT;
        s.install(&mut dp);
    }
    let probe = xdp::test_run(&dp, &new_flows(syn, DSR_PROBE_HOST)(0), Some(client_if))?;
    let IpAddr::V4(node) = node_v4() else {
        bail!("the testbed's IPv4 node address is not IPv4");
    };
    if probe.frame.get(IPV4_SOURCE_AT..IPV4_SOURCE_AT + 4) != Some(&node.octets()[..]) {
        bail!("SNAT case: a new flow did not leave from the node's address {node}");
    }
    settle(pass, &arp_frame(), client_if)?;
    let case = Case {
        name: "SNAT new flow, table with room",
        stage: "Maglev + flow entry + SNAT port (2 inserts)",
        ingress: client_if,
        verdict: XDP_REDIRECT,
        reason: Reason::FwdRedirect,
        target: None,
        calls: iterations.min(SNAT_CASE_FLOWS),
        frame: new_flows(syn, FILL_FIRST_HOST),
        cold: false,
    };
    let t = time_case(&dp, pass, &case)?;
    let reserved = dp.table_fill(maps::SNAT)?.entries;
    let flows = u64::from(case.calls) + 1;
    if reserved != flows {
        bail!("SNAT case: {reserved} port reservations after {flows} new flows");
    }
    Ok(result(case.name, case.stage, &t.xlb, &t.pass, case.target))
}

/// Established flows of a full table, a different one on every call, in an order that
/// jumps through the table: each call's conntrack entry (and its hash bucket) is likely
/// out of the CPU's caches, as on a busy node, where the single replayed flow of the
/// established case is always in them. No target: it shows what the memory costs.
/// Checked to be conntrack hits: the service counts no new flow.
fn established_in_full_table(
    dp: &Dataplane,
    pass: &mut PassProgram,
    web: &Service,
    syn: &Frame,
    filling: &Filling,
    client_if: u32,
) -> Result<CaseResult> {
    // The newest half of the table's capacity: the LRU evicts the oldest entries.
    let span = u32::try_from(filling.capacity / 2)
        .unwrap_or(u32::MAX)
        .min(filling.flows);
    let first = filling.flows - span;
    // The filling case's flows, past their SYN.
    let flow = syn.clone().established();
    let frames = new_flows(&flow, FILL_FIRST_HOST);
    let case = Case {
        name: "established flow, full table",
        stage: "conntrack hit (cold entry) + DNAT + FIB",
        ingress: client_if,
        verdict: XDP_REDIRECT,
        reason: Reason::FwdRedirect,
        target: None,
        calls: span.min(FULL_TABLE_CALLS),
        // A stride prime to the span: every call a flow inserted far from the last one.
        frame: Box::new(move |i| {
            let step = u64::from(i) * FULL_TABLE_STRIDE % u64::from(span);
            frames(first + u32::try_from(step).expect("below the span"))
        }),
        cold: false,
    };
    let new_before = dp.service_stats(web.id)?.new_flows;
    let t = time_case(dp, pass, &case)?;
    let new_flows = dp.service_stats(web.id)?.new_flows - new_before;
    if new_flows != 0 {
        bail!(
            "{}: {new_flows} of {} calls were new flows, not conntrack hits (entries evicted \
             early?)",
            case.name,
            case.calls
        );
    }
    Ok(result(case.name, case.stage, &t.xlb, &t.pass, case.target))
}

fn median(v: &[Duration]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    u64::try_from(v[v.len() / 2].as_nanos()).unwrap_or(u64::MAX)
}

/// Mean of the 10th to 90th percentile, in ns (the whole set when it is that small).
#[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
fn trimmed_mean(v: &[Duration]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    let cut = v.len() / 10;
    let kept = &v[cut..v.len() - cut];
    kept.iter().map(|d| d.as_nanos() as f64).sum::<f64>() / kept.len().max(1) as f64
}

fn result(
    case: &'static str,
    stage: &'static str,
    xlb: &[Duration],
    pass: &[Duration],
    target: Option<f64>,
) -> CaseResult {
    let (m, mb) = (median(xlb), median(pass));
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
    let ratio = m as f64 / mb.max(1) as f64;
    let (t, tb) = (trimmed_mean(xlb), trimmed_mean(pass));
    CaseResult {
        trimmed_mean_ns: t,
        baseline_trimmed_mean_ns: tb,
        trimmed_ratio: t / tb.max(1.0),
        case,
        stage,
        calls: u32::try_from(xlb.len()).unwrap_or(u32::MAX),
        median_ns: m,
        baseline_median_ns: mb,
        ratio,
        target_ratio: target,
        met: target.map(|t| ratio <= t),
    }
}

/// IPv6 established over IPv4 established (medians).
fn v6_over_v4(results: &[CaseResult]) -> Option<f64> {
    let find = |name: &str| results.iter().find(|r| r.case == name).map(|r| r.median_ns);
    let (v4, v6) = (
        find("established flow (IPv4 TCP)")?,
        find("established flow (IPv6 TCP)")?,
    );
    #[expect(clippy::cast_precision_loss, reason = "nanoseconds")]
    report::ratio(v6 as f64, v4 as f64)
}

fn reproduce(args: &Args) -> String {
    format!(
        "cargo xtask bench packet --iterations {} --flows {}",
        args.iterations, args.flows
    )
}

fn print_results(args: &Args, m: &Measured) {
    let Measured {
        results,
        filling,
        dsr,
        programs,
        settled,
    } = m;
    println!("xlb packet benchmark: BPF_PROG_TEST_RUN, repeat=1, fresh frame per call,");
    println!(
        "interleaved with a trivial XDP_PASS program; {} calls per case, {} new flows in \
         the table-filling case.",
        args.iterations, args.flows
    );
    println!("{}", report::load_line());
    println!(
        "settling: the trivial program's median steady at {} ns after {} ms{}",
        settled.pass_median_ns,
        settled.waited_ms,
        if settled.steady {
            ""
        } else {
            " (NOT steady within the limit: the machine is busy, figures may be high)"
        }
    );
    println!();
    println!(
        "{:<38} {:<42} {:>8} {:>8} {:>7} {:>7}  {:>8} {:>8} {:>7}",
        "case", "stage", "xlb ns", "pass ns", "ratio", "target", "xlb tm", "pass tm", "tm rat"
    );
    let print = |r: &CaseResult| {
        let target = match (r.target_ratio, r.met) {
            (Some(t), Some(met)) => format!("{t:>6.1} {}", if met { "ok" } else { "MISSED" }),
            _ => "-".to_owned(),
        };
        println!(
            "{:<38} {:<42} {:>8} {:>8} {:>7.2} {:>7}  {:>8.1} {:>8.1} {:>7.2}",
            r.case,
            r.stage,
            r.median_ns,
            r.baseline_median_ns,
            r.ratio,
            target,
            r.trimmed_mean_ns,
            r.baseline_trimmed_mean_ns,
            r.trimmed_ratio
        );
    };
    for r in results {
        print(r);
    }
    if let Some(r) = v6_over_v4(results) {
        println!(
            "established IPv6 / IPv4: {r:.2} (target <= {TARGET_V6_OVER_V4:.2}: {})",
            report::mark(r <= TARGET_V6_OVER_V4)
        );
    }
    println!(
        "conntrack: {} of {} entries in use before the table-filling case, {} after {} new \
         flows",
        filling.entries_before, filling.capacity, filling.entries_after, filling.flows
    );
    println!(
        "DSR cases: a fresh table ({} of {} entries in use before, {} after {} new flows), \
         the trivial program steady at {} ns after {} ms{}",
        dsr.filling.entries_before,
        dsr.filling.capacity,
        dsr.filling.entries_after,
        dsr.filling.flows,
        dsr.settled.pass_median_ns,
        dsr.settled.waited_ms,
        if dsr.settled.steady {
            ""
        } else {
            " (NOT steady)"
        }
    );
    println!();
    println!(
        "{:<22} {:>13} {:>12} {:>15}",
        "program", "xlated insns", "jited bytes", "verified insns"
    );
    let opt = |v: Option<u32>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for p in programs {
        println!(
            "{:<22} {:>13} {:>12} {:>15}",
            p.program,
            opt(p.xlated_insns),
            p.jited_bytes,
            opt(p.verified_insns)
        );
    }
    println!("(from BPF_OBJ_GET_INFO_BY_FD: xlated_prog_len / 8, jited_prog_len, verified_insns;");
    println!(" xlb_icmp_error and xlb_too_big are xlb_xdp's rare paths, reached by tail call)");
    println!();
    println!("reproduce: {}", reproduce(args));
}
