//! Loading the object, attaching to interfaces and pinning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Map, MapData, MapError, ProgramArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::maps;

use super::object::object_bytes;

/// The load balancer's program name in the object.
pub const PROGRAM: &str = "xlb_xdp";

/// The load balancer's rare paths: programs `PROGRAM` tail-calls through
/// `maps::SLOW_PATHS`, with their slots.
pub const SLOW_PATH_PROGRAMS: [(&str, u32); 2] = [
    ("xlb_icmp_error", maps::SLOW_PATH_ICMP_ERROR),
    ("xlb_too_big", maps::SLOW_PATH_TOO_BIG),
];

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
    #[error("map {name}: {source}")]
    Bpf {
        name: &'static str,
        source: super::sys::BpfError,
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

/// The loaded program and its maps. One owner writes the maps.
pub struct Dataplane {
    /// The programs; `None` when only the pinned maps were opened (`lb-agent status`).
    pub(super) ebpf: Option<Ebpf>,
    pub(super) maps: HashMap<&'static str, Map>,
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
        // A build before `FLOWS_V1` left its flows in the pair tables and no flag.
        let older_pairs = !dir.join(maps::FLOW_PAIRS).exists()
            && [maps::CONNTRACK, maps::REVNAT]
                .iter()
                .any(|name| dir.join(name).exists());
        let bytes = object_bytes(object)?;
        let paths: Vec<(&'static str, PathBuf)> = maps::ALL
            .iter()
            .chain(&maps::SOCKET)
            .map(|&name| (name, dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut dp = Self::from_ebpf(loader.load(&bytes)?)?;
        if older_pairs {
            dp.mark_flow_pairs()?;
        }
        Ok((dp, adopted))
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
            grace: super::grace::Grace::default(),
        };
        dp.xdp_mut(PROGRAM)?
            .load()
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM,
                source,
            })?;
        dp.load_slow_paths()?;
        dp.load_tc()?;
        Ok(dp)
    }

    /// Loads the rare paths' programs into their `SLOW_PATHS` slots, where the load
    /// balancer's tail calls find them. The pinned array keeps them while no agent
    /// runs; a restarted agent's programs replace them.
    fn load_slow_paths(&mut self) -> Result<(), DataplaneError> {
        let map = maps::SLOW_PATHS;
        for (name, slot) in SLOW_PATH_PROGRAMS {
            let program: &mut Xdp =
                as_xdp(name, self.ebpf.as_mut().and_then(|e| e.program_mut(name)))?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
            let fd = program
                .fd()
                .map_err(|source| DataplaneError::Program { name, source })?;
            let array = self
                .maps
                .get_mut(map)
                .ok_or(DataplaneError::MissingMap(map))?;
            ProgramArray::try_from(array)
                .and_then(|mut array| array.set(slot, fd, 0))
                .map_err(|source| DataplaneError::Map { name: map, source })?;
        }
        Ok(())
    }

    pub(super) fn xdp_mut(&mut self, name: &'static str) -> Result<&mut Xdp, DataplaneError> {
        as_xdp(
            name,
            self.ebpf.as_mut().and_then(|ebpf| ebpf.program_mut(name)),
        )
    }

    fn xdp(&self, name: &'static str) -> Result<&Xdp, DataplaneError> {
        as_xdp(name, self.ebpf.as_ref().and_then(|ebpf| ebpf.program(name)))
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

    /// The loaded load-balancer program, for read-only inspection (its id and tag) and
    /// for the test harness, which runs it on synthetic frames (`BPF_PROG_TEST_RUN`).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        self.xdp(PROGRAM)
    }

    /// The loaded rare-path programs (`SLOW_PATH_PROGRAMS`), by name, for inspection.
    pub fn slow_path_programs(&self) -> Result<Vec<(&'static str, &Xdp)>, DataplaneError> {
        SLOW_PATH_PROGRAMS
            .iter()
            .map(|&(name, _)| Ok((name, self.xdp(name)?)))
            .collect()
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

/// `program` as an XDP program: an error naming `name` when it is not loaded or
/// not XDP.
fn as_xdp<P, X>(name: &'static str, program: Option<P>) -> Result<X, DataplaneError>
where
    P: TryInto<X, Error = ProgramError>,
{
    program
        .ok_or(DataplaneError::Program {
            name,
            source: ProgramError::NotLoaded,
        })?
        .try_into()
        .map_err(|source| DataplaneError::Program { name, source })
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
