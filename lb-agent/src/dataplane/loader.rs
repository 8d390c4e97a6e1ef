//! Loading the object, attaching to interfaces, pinning, and running the program on
//! synthetic frames (`BPF_PROG_TEST_RUN`) for tests and benchmarks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Map, MapData, MapError},
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::maps;

use super::object::object_bytes;

/// Program names in the object.
pub const PROGRAM: &str = "xlb_xdp";
pub const BASELINE_PROGRAM: &str = "xlb_pass";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "no eBPF object: build it with `cargo xtask build-ebpf` and set XLB_EBPF_OBJECT, \
         or use a binary built by `cargo xtask build` (which embeds it)"
    )]
    NoObject,
    #[error("cannot read eBPF object {path}: {source}")]
    Object {
        path: String,
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error("pinning {path}: {reason}")]
    Pin { path: PathBuf, reason: String },
    #[error(
        "pinned map {path} has {what}, this agent needs {want}: it was pinned by an \
         incompatible version; `lb-agent run --replace` starts from scratch (drops tracked \
         connections), `lb-agent detach` removes everything"
    )]
    Incompatible {
        path: PathBuf,
        what: String,
        want: String,
    },
}

/// Verdict and output frame of one `BPF_PROG_TEST_RUN` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    pub action: u32,
    pub frame: Vec<u8>,
    /// Kernel-measured run time (average over `repeat`).
    pub duration: std::time::Duration,
}

/// The loaded program and its maps. One owner writes the maps.
pub struct Dataplane {
    /// The programs; `None` when only the pinned maps were opened (`lb-agent status`).
    pub(super) ebpf: Option<Ebpf>,
    pub(super) maps: HashMap<&'static str, Map>,
    pub(super) filter: super::maps::FilterShadow,
    pub(super) grace: super::grace::Grace,
}

impl Dataplane {
    /// Loads the object (see `object::object_bytes`) and both programs; the verifier
    /// runs here, so a successful load means the kernel accepted the program. The maps
    /// are fresh and unpinned (tests, benchmarks).
    pub fn load(object: Option<&PathBuf>) -> Result<Self, DataplaneError> {
        let bytes = object_bytes(object)?;
        Self::from_ebpf(EbpfLoader::new().load(&bytes)?)
    }

    /// Loads the object with every map pinned under `dir`: maps already pinned there
    /// are reused with their contents (an agent restart), missing ones are created and
    /// pinned. Returns whether any map was adopted. A pinned map whose layout differs
    /// from this build's is an error that names it: adopting it would misread its bytes.
    pub fn load_pinned(
        object: Option<&PathBuf>,
        dir: &Path,
    ) -> Result<(Self, bool), DataplaneError> {
        super::pins::create_dir(dir)?;
        let adopted = super::pins::check_compatible(dir)?;
        let bytes = object_bytes(object)?;
        let paths: Vec<(&'static str, PathBuf)> = maps::ALL
            .iter()
            .map(|&name| (name, dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        Ok((Self::from_ebpf(loader.load(&bytes)?)?, adopted))
    }

    /// Opens the maps pinned under `dir` without loading any program, for reading
    /// (`lb-agent status`) or writing while another agent runs.
    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        super::pins::check_compatible(dir)?;
        let mut maps = HashMap::new();
        for name in maps::ALL {
            let path = dir.join(name);
            let data =
                MapData::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })?;
            maps.insert(
                name,
                Map::from_map_data(data).map_err(|source| DataplaneError::Map { name, source })?,
            );
        }
        Ok(Dataplane {
            ebpf: None,
            maps,
            filter: super::maps::FilterShadow::default(),
            grace: super::grace::Grace::default(),
        })
    }

    fn from_ebpf(mut ebpf: Ebpf) -> Result<Self, DataplaneError> {
        let mut maps = HashMap::new();
        for name in maps::ALL {
            let map = ebpf
                .take_map(name)
                .ok_or(DataplaneError::MissingMap(name))?;
            maps.insert(name, map);
        }
        let mut dp = Dataplane {
            ebpf: Some(ebpf),
            maps,
            filter: super::maps::FilterShadow::default(),
            grace: super::grace::Grace::default(),
        };
        for name in [PROGRAM, BASELINE_PROGRAM] {
            dp.xdp_mut(name)?
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(dp)
    }

    pub(super) fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        self.ebpf
            .as_mut()
            .and_then(|ebpf| ebpf.program_mut(name))
            .ok_or(DataplaneError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        self.ebpf
            .as_ref()
            .and_then(|ebpf| ebpf.program(name))
            .ok_or(DataplaneError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Attaches the load balancer to `interface` and lets it redirect there.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<XdpLinkId, DataplaneError> {
        let ifindex = ifindex(interface)?;
        let link = self
            .xdp_mut(PROGRAM)?
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM,
                source,
            })?;
        self.add_tx_port(ifindex)?;
        Ok(link)
    }

    /// Runs the load balancer once on `frame`. `ingress_ifindex` sets the context's
    /// receiving interface (the FIB lookup and `XDP_TX` decision use it); `None` leaves
    /// the kernel's default (loopback of the caller's network namespace).
    pub fn test_run(
        &self,
        frame: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<TestRunOutput, DataplaneError> {
        run(self.xdp(PROGRAM)?, PROGRAM, frame, ingress_ifindex, 1)
    }

    /// Runs the trivial `XDP_PASS` program once on `frame` (the benchmark baseline),
    /// with the same context as `test_run`.
    pub fn test_run_baseline(
        &self,
        frame: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<TestRunOutput, DataplaneError> {
        run(
            self.xdp(BASELINE_PROGRAM)?,
            BASELINE_PROGRAM,
            frame,
            ingress_ifindex,
            1,
        )
    }

    /// Pins every map under `dir` (created if missing) by its versioned name.
    pub fn pin_maps(&self, dir: &Path) -> Result<(), DataplaneError> {
        std::fs::create_dir_all(dir).map_err(|e| DataplaneError::Pin {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        for name in maps::ALL {
            let path = dir.join(name);
            let map = self
                .maps
                .get(name)
                .ok_or(DataplaneError::MissingMap(name))?;
            map.pin(&path).map_err(|e| DataplaneError::Pin {
                path,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// The trivial `XDP_PASS` program on an interface of a test topology, detached when
/// dropped. A veth hands frames that its own XDP program sends back (`XDP_TX`) to its
/// peer at once only when the peer runs an XDP program too (the kernel's
/// `veth_xdp_flush`); otherwise they wait for the peer's next receive. Real NICs
/// transmit at once and need nothing of the kind.
pub struct PassProgram {
    _ebpf: Ebpf,
}

impl PassProgram {
    /// Attaches `xlb_pass` (native mode) to `interface` in the caller's network
    /// namespace. Its maps, which it never uses, are created with one entry each.
    pub fn attach(object: Option<&PathBuf>, interface: &str) -> Result<Self, DataplaneError> {
        let bytes = object_bytes(object)?;
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_max_entries(name, 1);
        }
        let mut ebpf = loader.load(&bytes)?;
        let name = BASELINE_PROGRAM;
        let prog: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Program {
                name,
                source: ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })?;
        prog.load()
            .map_err(|source| DataplaneError::Program { name, source })?;
        prog.attach(interface, XdpMode::Driver)
            .map_err(|source| DataplaneError::Interface {
                name: interface.to_owned(),
                reason: format!("XDP attach failed: {source}"),
            })?;
        Ok(PassProgram { _ebpf: ebpf })
    }
}

fn run(
    prog: &Xdp,
    name: &'static str,
    frame: &[u8],
    ingress_ifindex: Option<u32>,
    repeat: u32,
) -> Result<TestRunOutput, DataplaneError> {
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
    opts.repeat = repeat;
    let result = prog
        .test_run(opts)
        .map_err(|source| DataplaneError::Program { name, source })?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        action: result.return_value,
        frame: out,
        duration: result.duration,
    })
}

/// The interface's index in the caller's network namespace.
pub fn ifindex(interface: &str) -> Result<u32, DataplaneError> {
    let name = std::ffi::CString::new(interface).map_err(|_| DataplaneError::Interface {
        name: interface.to_owned(),
        reason: "contains a NUL byte".into(),
    })?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DataplaneError::Interface {
            name: interface.to_owned(),
            reason: std::io::Error::last_os_error().to_string(),
        });
    }
    Ok(index)
}
