//! XDP programs in tests and benchmarks: the load balancer run on synthetic frames
//! (`BPF_PROG_TEST_RUN`) and the trivial `XDP_PASS` program, which lives in an object of
//! its own (`xlb-pass`, built beside the agent's by `cargo xtask build-ebpf`) so that the
//! shipped agent carries neither.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb_agent::dataplane::Dataplane;

/// The agent's object, as `cargo xtask` names it for the tests and benchmarks.
const OBJECT_ENV: &str = "XLB_EBPF_OBJECT";
/// The pass program's object, built beside the agent's.
const PASS_OBJECT: &str = "xlb-pass";
const PASS_PROGRAM: &str = "xlb_pass";

/// Verdict and output frame of one `BPF_PROG_TEST_RUN` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    pub action: u32,
    pub frame: Vec<u8>,
    /// Kernel-measured run time (average over `repeat`).
    pub duration: Duration,
}

/// Runs the load balancer loaded in `dp` once on `frame`. `ingress_ifindex` sets the
/// context's receiving interface (the FIB lookup and `XDP_TX` decision use it); `None`
/// leaves the kernel's default (loopback of the caller's network namespace).
pub fn test_run(
    dp: &Dataplane,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<TestRunOutput> {
    run(dp.program()?, frame, ingress_ifindex)
}

/// Runs the tc egress program loaded in `dp` once on `frame` (a socket buffer built
/// from it, as the kernel's `BPF_PROG_TEST_RUN` for tc does). The verdict is the tc
/// action (`TC_ACT_OK` = 0 lets it go on).
pub fn test_run_egress(dp: &Dataplane, frame: &[u8]) -> Result<TestRunOutput> {
    run_tc(dp.egress_program()?, frame, "tc egress")
}

/// Runs the tc ingress program loaded in `dp` once on `frame`, as `test_run_egress`.
pub fn test_run_ingress(dp: &Dataplane, frame: &[u8]) -> Result<TestRunOutput> {
    run_tc(dp.ingress_program()?, frame, "tc ingress")
}

fn run_tc(
    prog: &aya::programs::SchedClassifier,
    frame: &[u8],
    what: &str,
) -> Result<TestRunOutput> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.repeat = 1;
    let result = prog
        .test_run(opts)
        .with_context(|| format!("BPF_PROG_TEST_RUN ({what})"))?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        action: result.return_value,
        frame: out,
        duration: result.duration,
    })
}

/// The pass program's object: `xlb-pass` beside the object `XLB_EBPF_OBJECT` names.
pub fn pass_object() -> Result<PathBuf> {
    let main = std::env::var_os(OBJECT_ENV).with_context(|| {
        format!("{OBJECT_ENV} is not set: run through `cargo xtask test` or `cargo xtask bench`")
    })?;
    let path = PathBuf::from(main).with_file_name(PASS_OBJECT);
    if !path.is_file() {
        bail!(
            "{} is missing: `cargo xtask build-ebpf` builds it beside the agent's object",
            path.display()
        );
    }
    Ok(path)
}

/// The trivial `XDP_PASS` program, loaded (and attached where asked; detached when
/// dropped). A veth hands frames that its own XDP program sends back (`XDP_TX`) or
/// that are redirected into it to its peer at once only when the peer runs an XDP
/// program too (the kernel's `veth_xdp_flush`); real NICs need nothing of the kind.
pub struct PassProgram {
    ebpf: Ebpf,
}

impl PassProgram {
    /// Loads `xlb_pass` from its object.
    pub fn load() -> Result<Self> {
        let path = pass_object()?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut ebpf = EbpfLoader::new()
            .load(&bytes)
            .with_context(|| format!("loading {}", path.display()))?;
        program(&mut ebpf)?.load().context("loading xlb_pass")?;
        Ok(PassProgram { ebpf })
    }

    /// Loads it and attaches it (native mode) to `interface` in the caller's network
    /// namespace.
    pub fn attach(interface: &str) -> Result<Self> {
        let mut pass = Self::load()?;
        program(&mut pass.ebpf)?
            .attach(interface, XdpMode::Driver)
            .with_context(|| format!("attaching xlb_pass to {interface}"))?;
        Ok(pass)
    }

    /// The loaded program's kernel-side facts (instruction counts, JIT size), for the
    /// benchmark's baseline figures.
    pub fn info(&mut self) -> Result<aya::programs::ProgramInfo> {
        Ok(program(&mut self.ebpf)?.info()?)
    }

    /// Runs it once on `frame`, with the same context as [`test_run`] (the benchmark
    /// baseline).
    pub fn test_run(
        &mut self,
        frame: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<TestRunOutput> {
        run(program(&mut self.ebpf)?, frame, ingress_ifindex)
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PASS_PROGRAM)
        .context("xlb_pass is missing from its object")?
        .try_into()?)
}

fn run(prog: &Xdp, frame: &[u8], ingress_ifindex: Option<u32>) -> Result<TestRunOutput> {
    // Room for the frame plus any growth (a reject's ICMP error outgrows a short
    // datagram by the headers it adds).
    let mut out = vec![0u8; frame.len() + 256];
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex }: the kernel wants data_end == frame length when a context is given.
    let ctx: Option<[u8; 24]> = ingress_ifindex.map(|ifindex| {
        let mut md = [0u8; 24];
        let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        md[4..8].copy_from_slice(&len.to_ne_bytes());
        md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        md
    });
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx.as_ref().map(<[u8; 24]>::as_slice);
    opts.repeat = 1;
    let result = prog.test_run(opts).context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        action: result.return_value,
        frame: out,
        duration: result.duration,
    })
}
