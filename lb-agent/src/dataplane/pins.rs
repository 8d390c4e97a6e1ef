//! The pin directory: every map by its versioned name, and one XDP link per interface
//! (`link_<interface>`). A restarted agent adopts what is there; `detach` removes it.

use std::fmt::Write as _;
use std::io;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use aya::programs::XdpMode;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use lb_common::{
    Affinity, AffinityKey, Backend, BackendMeta, BackendStats, ClientFlow, ClientKey, Flow,
    FlowKey, Frontend, FrontendKey, NextHop, Reason, ReasonStats, RevNat, ServiceMeta,
    ServiceStats, SnatConfig, SnatEntry, SourceRangeKey, TrackedFlow, maps,
    sock::{SockConfig, SockFlowKey, SockRevKey, SockRevNat},
};

use super::loader::{PROGRAM, ifindex};
use super::sys::{self, statfs_magic};
use super::{Dataplane, DataplaneError};

/// The default pin directory.
pub const DEFAULT_DIR: &str = "/sys/fs/bpf/xlb";
const LINK_PREFIX: &str = "link_";

#[expect(
    clippy::needless_pass_by_value,
    reason = "callers pass errors they own"
)]
/// A pin (or mount) error at `path`.
pub(super) fn pin_err(path: &Path, reason: impl ToString) -> DataplaneError {
    DataplaneError::Pin {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// `message` followed by every cause of `error` (errnos by name), and the last errno.
fn with_causes(mut message: String, error: &dyn std::error::Error) -> (String, Option<i32>) {
    let mut errno = None;
    let mut cause = error.source();
    while let Some(c) = cause {
        match c.downcast_ref::<io::Error>() {
            Some(io) => {
                errno = io.raw_os_error();
                let _ = write!(message, ": {}", errno_text(io));
            }
            None => {
                let _ = write!(message, ": {c}");
            }
        }
        cause = c.source();
    }
    (message, errno)
}

/// A bpf(2) call on a pin failed: its message with every cause and the errno, and what
/// EPERM/EACCES there mean.
fn pin_syscall_err(path: &Path, error: &dyn std::error::Error) -> DataplaneError {
    let (mut reason, errno) = with_causes(error.to_string(), error);
    if matches!(errno, Some(libc::EPERM | libc::EACCES)) {
        reason.push_str(
            "; reading or writing pinned BPF objects needs root or CAP_BPF (run it with sudo)",
        );
    }
    pin_err(path, reason)
}

/// Creates `dir` on a bpffs, failing clearly when it is not on one (pins need bpffs).
pub fn create_dir(dir: &Path) -> Result<(), DataplaneError> {
    std::fs::create_dir_all(dir).map_err(|e| pin_err(dir, e))?;
    let magic = statfs_magic(dir).map_err(|e| pin_err(dir, e))?;
    if magic != BPF_FS_MAGIC {
        return Err(pin_err(
            dir,
            format!(
                "not on a bpf filesystem (it is {}): mount one with `mount -t bpf bpf {BPFFS_ROOT}`",
                fs_name(magic)
            ),
        ));
    }
    Ok(())
}

/// Where bpffs is mounted on a standard system (systemd mounts it at boot; many
/// minimal hosts and containers leave an empty directory of sysfs there).
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// `statfs(2)`'s `f_type` of a bpf filesystem (linux/magic.h).
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The file system a pin directory lies on: that of the directory, or of its nearest
/// existing ancestor when it does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsProbe {
    /// The directory itself or its nearest existing ancestor.
    pub existing: PathBuf,
    /// Its `statfs` `f_type`.
    pub magic: i64,
}

impl FsProbe {
    pub fn is_bpffs(&self) -> bool {
        self.magic == BPF_FS_MAGIC
    }

    /// E.g. `/sys/fs/bpf is tmpfs`.
    pub fn describe(&self) -> String {
        format!("{} is {}", self.existing.display(), fs_name(self.magic))
    }
}

/// What the agent does about bpffs before it pins anything under `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BpffsAction {
    /// `dir` lies on a bpffs already.
    Ready,
    /// Mount a bpffs on `target` (created if missing): [`BPFFS_ROOT`] when `dir` is it
    /// or lies under it, as Cilium's agent does; otherwise `dir` itself, so that an
    /// operator's own directory never makes the agent mount over a whole other tree.
    Mount { target: PathBuf },
}

/// The decision of [`ensure_bpffs`], without side effects: `probe` is where `dir` lies.
pub fn bpffs_action(dir: &Path, probe: &FsProbe) -> BpffsAction {
    if probe.is_bpffs() {
        BpffsAction::Ready
    } else if dir.starts_with(BPFFS_ROOT) {
        BpffsAction::Mount {
            target: PathBuf::from(BPFFS_ROOT),
        }
    } else {
        BpffsAction::Mount {
            target: dir.to_path_buf(),
        }
    }
}

/// Finds the file system of `dir` (absolute): `statfs` on it, else on its nearest
/// existing ancestor. `statfs` is the system call, or a fake in tests.
pub fn probe_with(
    dir: &Path,
    mut statfs: impl FnMut(&Path) -> io::Result<i64>,
) -> io::Result<FsProbe> {
    for candidate in dir.ancestors() {
        match statfs(candidate) {
            Ok(magic) => {
                return Ok(FsProbe {
                    existing: candidate.to_path_buf(),
                    magic,
                });
            }
            // Not there yet (or a dangling link): ask its parent.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no ancestor of {} exists", dir.display()),
    ))
}

/// [`probe_with`] the real `statfs(2)`; `dir` is made absolute first.
pub fn probe_fs(dir: &Path) -> Result<FsProbe, DataplaneError> {
    let dir = std::path::absolute(dir).map_err(|e| pin_err(dir, e))?;
    probe_with(&dir, statfs_magic).map_err(|e| pin_err(&dir, format!("statfs: {e}")))
}

/// What [`ensure_bpffs`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bpffs {
    /// The directory was on a bpffs already.
    Present,
    /// The agent mounted one on this directory.
    Mounted(PathBuf),
}

/// Makes sure `dir` lies on a bpffs before anything is loaded or attached: when it does
/// not, mounts one ([`bpffs_action`]: `mount("bpffs", target, "bpf", 0, "")`, as
/// Cilium's agent does). When that fails, the error names the directory, the errno and
/// the command that mounts it, and nothing has been attached.
pub fn ensure_bpffs(dir: &Path) -> Result<Bpffs, DataplaneError> {
    let dir = std::path::absolute(dir).map_err(|e| pin_err(dir, e))?;
    let probe = probe_fs(&dir)?;
    let BpffsAction::Mount { target } = bpffs_action(&dir, &probe) else {
        return Ok(Bpffs::Present);
    };
    let fail = |what: String| {
        pin_err(
            &dir,
            format!(
                "not on a bpf filesystem ({}), and {what}; pinned maps and links need one: \
                 run `mount -t bpf bpf {}` as root (the agent needs CAP_SYS_ADMIN to mount \
                 it itself), then start the agent again",
                probe.describe(),
                target.display()
            ),
        )
    };
    std::fs::create_dir_all(&target).map_err(|e| {
        fail(format!(
            "creating the mount point {} failed: {}",
            target.display(),
            errno_text(&e)
        ))
    })?;
    sys::mount(c"bpffs", &target, c"bpf").map_err(|e| {
        fail(format!(
            "mounting bpffs on {} failed: {}",
            target.display(),
            errno_text(&e)
        ))
    })?;
    let after = probe_fs(&dir)?;
    if !after.is_bpffs() {
        return Err(fail(format!(
            "after mounting bpffs on {} still {}",
            target.display(),
            after.describe()
        )));
    }
    Ok(Bpffs::Mounted(target))
}

/// A file system's name by its magic, for messages.
fn fs_name(magic: i64) -> String {
    let name = match magic {
        BPF_FS_MAGIC => "bpffs",
        0x0102_1994 => "tmpfs",
        0x6265_6572 => "sysfs (nothing mounted there)",
        0x9fa0 => "procfs",
        0xef53 => "ext2/3/4",
        0x5846_5342 => "xfs",
        0x9123_683e => "btrfs",
        0x794c_7630 => "overlayfs",
        _ => return format!("a file system with magic {magic:#x}, not bpffs"),
    };
    name.to_owned()
}

/// `EPERM (Operation not permitted, os error 1)`: the errno's name and the system's text.
fn errno_text(err: &io::Error) -> String {
    let Some(code) = err.raw_os_error() else {
        return err.to_string();
    };
    let name = match code {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOENT => "ENOENT",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EINVAL => "EINVAL",
        libc::EROFS => "EROFS",
        libc::ENOSPC => "ENOSPC",
        _ => return format!("errno {code} ({err})"),
    };
    format!("{name} ({err})")
}

/// Key and value sizes each map must have; `None` skips the value check (devmap
/// values are the kernel's own struct).
fn expected_layout(name: &str) -> (usize, Option<usize>) {
    use std::mem::size_of;
    match name {
        maps::FRONTENDS => (size_of::<FrontendKey>(), Some(size_of::<Frontend>())),
        maps::BACKENDS => (4, Some(size_of::<Backend>())),
        maps::NEXTHOPS => (4, Some(size_of::<NextHop>())),
        maps::ADDR_FILTER => (4, Some(1)),
        maps::MAGLEV | maps::FLOW_PAIRS => (4, Some(4)),
        maps::FLOWS => (size_of::<ClientKey>(), Some(size_of::<ClientFlow>())),
        maps::CONNTRACK => (size_of::<FlowKey>(), Some(size_of::<TrackedFlow>())),
        maps::SNAT => (size_of::<FlowKey>(), Some(size_of::<SnatEntry>())),
        maps::SNAT_CONFIG => (4, Some(size_of::<SnatConfig>())),
        maps::REVNAT => (size_of::<FlowKey>(), Some(size_of::<RevNat>())),
        maps::SERVICE_STATS => (4, Some(size_of::<ServiceStats>())),
        maps::REASON_STATS => (4, Some(size_of::<ReasonStats>())),
        maps::BACKEND_STATS => (4, Some(size_of::<BackendStats>())),
        maps::AFFINITY => (size_of::<AffinityKey>(), Some(size_of::<Affinity>())),
        maps::SERVICE_META => (4, Some(size_of::<ServiceMeta>())),
        maps::BACKEND_META => (4, Some(size_of::<BackendMeta>())),
        // The LPM trie's key: prefix length, then the data.
        maps::SOURCE_RANGES => (4 + size_of::<SourceRangeKey>(), Some(4)),
        maps::SOCK_REVNAT => (size_of::<SockRevKey>(), Some(size_of::<SockRevNat>())),
        maps::SOCK_FLOWS => (size_of::<SockFlowKey>(), Some(size_of::<Flow>())),
        maps::SOCK_CONFIG => (4, Some(size_of::<SockConfig>())),
        _ => (4, None),
    }
}

/// The number of entries each map of fixed size must have: an adopted array sized by an
/// older build would refuse (or silently lack) the ids this one hands out. `None` for
/// the LRU maps, whose sizes may be chosen at load time.
fn expected_entries(name: &str) -> Option<u32> {
    match name {
        maps::FRONTENDS => Some(maps::MAX_FRONTENDS),
        maps::BACKENDS | maps::NEXTHOPS | maps::BACKEND_META | maps::BACKEND_STATS => {
            Some(maps::MAX_BACKENDS)
        }
        maps::ADDR_FILTER => Some(lb_common::ADDR_FILTER_SLOTS),
        maps::MAGLEV | maps::SERVICE_STATS | maps::SERVICE_META => Some(maps::MAX_SERVICES),
        maps::REASON_STATS => Some(Reason::COUNT),
        maps::TX_PORTS => Some(maps::MAX_TX_PORTS),
        maps::SNAT_CONFIG | maps::FLOW_PAIRS => Some(1),
        maps::SOURCE_RANGES => Some(maps::MAX_SOURCE_RANGES),
        _ => None,
    }
}

/// Checks every map already pinned under `dir` against this build's layouts; returns
/// whether any map is pinned (so this start adopts state).
pub fn check_compatible(dir: &Path) -> Result<bool, DataplaneError> {
    let mut any = false;
    for name in maps::ALL.into_iter().chain(maps::SOCKET) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|e| pin_syscall_err(&path, &e))?;
        let (key, value) = expected_layout(name);
        let got_key = info.key_size() as usize;
        let got_value = info.value_size() as usize;
        if got_key != key || value.is_some_and(|v| v != got_value) {
            return Err(DataplaneError::Incompatible {
                path,
                what: format!("key size {got_key} and value size {got_value}"),
                want: format!(
                    "key size {key} and value size {}",
                    value.map_or("any".into(), |v| v.to_string())
                ),
            });
        }
        if let Some(want) = expected_entries(name)
            && info.max_entries() != want
        {
            return Err(DataplaneError::Incompatible {
                path,
                what: format!("{} entries", info.max_entries()),
                want: format!("{want} entries"),
            });
        }
    }
    Ok(any)
}

/// Unpins maps of earlier layouts that this agent replaced (a program still attached
/// keeps its own reference until it is replaced). Returns their names.
pub fn remove_retired(dir: &Path) -> Result<Vec<&'static str>, DataplaneError> {
    let mut removed = Vec::new();
    for name in maps::RETIRED {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Where the link of `interface` is pinned.
pub fn link_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{interface}"))
}

/// Interfaces that have a pinned link under `dir`.
pub fn pinned_interfaces(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(LINK_PREFIX))
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

/// Interfaces with only the tc ingress link pinned (`--decap-interface`), no XDP link.
pub fn decap_interfaces(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(super::egress::INGRESS_PREFIX))
                .map(super::egress::interface_of)
        })
        .filter(|interface| !link_path(dir, interface).exists())
        .collect();
    names.sort();
    names
}

/// How an interface got the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// A pinned link existed: the program in it was replaced atomically, traffic never
    /// stopped.
    Adopted,
    /// Newly attached in this mode and pinned.
    Attached(XdpMode),
}

/// How to attach where no link is pinned yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeChoice {
    Native,
    Generic,
    /// Native, else generic with a warning naming the interface.
    Auto,
}

impl Dataplane {
    /// Makes `interface` run this program through a link pinned under `dir`: an
    /// existing pinned link gets the new program in one `bpf_link_update` (the
    /// interface is never without a program); otherwise the program is attached and
    /// the link pinned. Either way the interface joins the redirect ports.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: ModeChoice,
        dir: &Path,
    ) -> Result<Attachment, DataplaneError> {
        let index = ifindex(interface)?;
        let path = link_path(dir, interface);
        let result = if path.exists() {
            match self.adopt_link(&path) {
                Ok(()) => Ok(Attachment::Adopted),
                Err(e) => {
                    // The pinned link is stale (its interface was deleted and
                    // recreated): drop it and attach afresh.
                    tracing::warn!(interface, "pinned link unusable ({e}); attaching anew");
                    std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                    self.attach_and_pin(interface, mode, &path)
                }
            }
        } else {
            self.attach_and_pin(interface, mode, &path)
        };
        let attachment = result?;
        self.add_tx_port(index)?;
        self.attach_tc_pinned(interface, dir)?;
        Ok(attachment)
    }

    fn adopt_link(&mut self, path: &Path) -> Result<(), DataplaneError> {
        let pinned = PinnedLink::from_pin(path).map_err(|e| pin_err(path, e))?;
        let fd_link: FdLink = pinned.into();
        let link = XdpLink::try_from(fd_link).map_err(|e| pin_err(path, e))?;
        self.xdp_mut(PROGRAM)?
            .attach_to_link(link)
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM,
                source,
            })?;
        Ok(())
    }

    fn attach_and_pin(
        &mut self,
        interface: &str,
        mode: ModeChoice,
        path: &Path,
    ) -> Result<Attachment, DataplaneError> {
        let (link_id, used) = match mode {
            ModeChoice::Native => (
                self.attach_mode(interface, XdpMode::Driver)?,
                XdpMode::Driver,
            ),
            ModeChoice::Generic => (self.attach_mode(interface, XdpMode::Skb)?, XdpMode::Skb),
            ModeChoice::Auto => match self.attach_mode(interface, XdpMode::Driver) {
                Ok(id) => (id, XdpMode::Driver),
                Err(e) => {
                    tracing::warn!(
                        interface,
                        "native XDP attach failed ({e}); using generic (skb) mode, which is \
                         much slower"
                    );
                    (self.attach_mode(interface, XdpMode::Skb)?, XdpMode::Skb)
                }
            },
        };
        let prog = self.xdp_mut(PROGRAM)?;
        let link = prog
            .take_link(link_id)
            .map_err(|source| DataplaneError::Program {
                name: PROGRAM,
                source,
            })?;
        let fd_link = FdLink::try_from(link).map_err(|e| {
            pin_err(
                path,
                format!("the kernel attached XDP without a BPF link ({e}); links need Linux 5.9+"),
            )
        })?;
        fd_link.pin(path).map_err(|e| pin_err(path, e))?;
        Ok(Attachment::Attached(used))
    }

    fn attach_mode(
        &mut self,
        interface: &str,
        mode: XdpMode,
    ) -> Result<aya::programs::xdp::XdpLinkId, DataplaneError> {
        self.xdp_mut(PROGRAM)?
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Interface {
                name: interface.to_owned(),
                reason: attach_failure(interface, mode, &source),
            })
    }
}

/// Why an attach failed, with the errno and, when the interface is taken, by whom.
fn attach_failure(interface: &str, mode: XdpMode, error: &dyn std::error::Error) -> String {
    let (mut reason, errno) = with_causes(format!("XDP attach ({mode:?}) failed: {error}"), error);
    if matches!(errno, Some(libc::EBUSY | libc::EEXIST)) {
        let _ = write!(
            reason,
            "; another XDP program is attached to {interface} (`ip link show dev {interface}`)"
        );
        let holders: Vec<String> = xlb_pins_of(interface)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        if !holders.is_empty() {
            let _ = write!(
                reason,
                "; an xlb agent pinned a link for {interface} under another --bpffs: {} \
                 (`lb-agent detach --bpffs DIR` removes it)",
                holders.join(", ")
            );
        }
    }
    reason
}

/// Links for `interface` pinned by xlb under the bpffs root or a directory in it.
fn xlb_pins_of(interface: &str) -> Vec<PathBuf> {
    let root = Path::new(BPFFS_ROOT);
    let dirs: Vec<PathBuf> = std::fs::read_dir(root).map_or_else(
        |_| Vec::new(),
        |entries| entries.filter_map(Result::ok).map(|e| e.path()).collect(),
    );
    std::iter::once(root.to_path_buf())
        .chain(dirs)
        .map(|dir| link_path(&dir, interface))
        .filter(|path| path.exists())
        .collect()
}

/// Detaches the program from `interface` now (`BPF_LINK_DETACH`, effective even while
/// a running agent holds the link open), then removes the pin. The link is opened
/// through its pin rather than by id, so CAP_SYS_ADMIN is not needed (the DaemonSet
/// runs without it).
pub fn detach_link(dir: &Path, interface: &str) -> Result<(), DataplaneError> {
    super::egress::detach_tc(dir, interface)?;
    let path = link_path(dir, interface);
    let link = sys::obj_get(&path).map_err(|e| pin_err(&path, e))?;
    sys::link_detach(link.as_fd()).map_err(|e| pin_err(&path, e))?;
    std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
    Ok(())
}

/// What was pinned under a directory before a start, so that a failed start can
/// remove what it added and nothing else.
#[derive(Debug)]
pub struct Snapshot {
    /// `None`: the directory did not exist.
    names: Option<Vec<std::ffi::OsString>>,
}

impl Snapshot {
    pub fn take(dir: &Path) -> Snapshot {
        let names = std::fs::read_dir(dir).ok().map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.file_name()))
                .collect()
        });
        Snapshot { names }
    }

    /// Detaches the links and removes the pins that were not there at [`take`](Self::take), and
    /// the directory when it was not there either. Returns what it removed.
    pub fn undo(&self, dir: &Path) -> Result<Vec<String>, DataplaneError> {
        let was = |name: &std::ffi::OsStr| {
            self.names
                .as_ref()
                .is_some_and(|names| names.iter().any(|n| n == name))
        };
        let mut removed = Vec::new();
        // Socket hook links this start pinned (none were there before it).
        let had_socket_links = self.names.as_ref().is_some_and(|names| {
            names
                .iter()
                .any(|n| n.to_string_lossy().starts_with(super::sockets::LINK_PREFIX))
        });
        if !had_socket_links {
            removed.extend(super::sockets::detach_all(dir)?);
        }
        for interface in pinned_interfaces(dir) {
            let path = link_path(dir, &interface);
            if !path.file_name().is_some_and(was) {
                detach_link(dir, &interface)?;
                removed.push(format!("link {interface}"));
            }
        }
        for interface in decap_interfaces(dir) {
            let name = format!(
                "{}{}",
                super::egress::INGRESS_PREFIX,
                super::egress::pin_name(&interface)
            );
            if !was(std::ffi::OsStr::new(&name)) {
                super::egress::detach_tc(dir, &interface)?;
                removed.push(format!("decap link {interface}"));
            }
        }
        for name in maps::ALL.iter().chain(&maps::RETIRED).chain(&maps::SOCKET) {
            let path = dir.join(name);
            if path.exists() && !was(std::ffi::OsStr::new(name)) {
                std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
                removed.push(format!("map {name}"));
            }
        }
        if self.names.is_none() && dir.exists() {
            std::fs::remove_dir(dir).map_err(|e| pin_err(dir, e))?;
        }
        Ok(removed)
    }
}

/// Removes every link and map pinned under `dir`, then `dir` itself. Tracked
/// connections are gone afterwards; traffic to VIPs is no longer translated.
pub fn remove_all(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut removed = super::sockets::detach_all(dir)?;
    for interface in pinned_interfaces(dir) {
        detach_link(dir, &interface)?;
        removed.push(format!("link {interface}"));
    }
    for interface in decap_interfaces(dir) {
        super::egress::detach_tc(dir, &interface)?;
        removed.push(format!("decap link {interface}"));
    }
    for name in maps::ALL.iter().chain(&maps::RETIRED).chain(&maps::SOCKET) {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
            removed.push(format!("map {name}"));
        }
    }
    std::fs::remove_dir(dir).map_err(|e| pin_err(dir, e))?;
    Ok(removed)
}
#[cfg(test)]
mod tests {
    use super::*;

    const TMPFS: i64 = 0x0102_1994;
    const SYSFS: i64 = 0x6265_6572;

    /// A fake `statfs`: the listed directories exist with their magic; anything else
    /// is ENOENT.
    fn fake(existing: &[(&str, i64)]) -> impl FnMut(&Path) -> io::Result<i64> {
        let existing: Vec<(PathBuf, i64)> = existing
            .iter()
            .map(|(p, m)| (PathBuf::from(p), *m))
            .collect();
        move |path| {
            existing
                .iter()
                .find(|(p, _)| p == path)
                .map(|(_, m)| *m)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    fn decide(dir: &str, existing: &[(&str, i64)]) -> (FsProbe, BpffsAction) {
        let probe = probe_with(Path::new(dir), fake(existing)).unwrap();
        let action = bpffs_action(Path::new(dir), &probe);
        (probe, action)
    }

    #[test]
    fn a_pin_dir_on_bpffs_needs_nothing() {
        let (probe, action) = decide(
            "/sys/fs/bpf/xlb",
            &[
                ("/", 0xef53),
                ("/sys", SYSFS),
                ("/sys/fs/bpf", BPF_FS_MAGIC),
            ],
        );
        assert_eq!(probe.existing, Path::new("/sys/fs/bpf"), "nearest ancestor");
        assert_eq!(action, BpffsAction::Ready);
        // The directory itself exists on bpffs.
        let (probe, action) = decide(
            "/sys/fs/bpf/xlb",
            &[
                ("/sys/fs/bpf", BPF_FS_MAGIC),
                ("/sys/fs/bpf/xlb", BPF_FS_MAGIC),
            ],
        );
        assert_eq!(probe.existing, Path::new("/sys/fs/bpf/xlb"));
        assert_eq!(action, BpffsAction::Ready);
    }

    #[test]
    fn an_empty_sys_fs_bpf_or_a_tmpfs_over_it_gets_bpffs_mounted_there() {
        let standard = BpffsAction::Mount {
            target: PathBuf::from(BPFFS_ROOT),
        };
        // A fresh machine: the empty directory of sysfs.
        let (probe, action) = decide(
            "/sys/fs/bpf/xlb-demo-9775",
            &[("/", 0xef53), ("/sys", SYSFS), ("/sys/fs/bpf", SYSFS)],
        );
        assert_eq!(action, standard);
        assert_eq!(
            probe.describe(),
            "/sys/fs/bpf is sysfs (nothing mounted there)"
        );
        // CI's private mount namespace: a tmpfs over it.
        let (_, action) = decide(
            "/sys/fs/bpf/xlb",
            &[("/sys", SYSFS), ("/sys/fs/bpf", TMPFS)],
        );
        assert_eq!(action, standard);
        // The standard directory itself, and one missing below a missing parent.
        assert_eq!(decide("/sys/fs/bpf", &[("/sys/fs/bpf", SYSFS)]).1, standard);
        assert_eq!(decide("/sys/fs/bpf/a/b", &[("/sys", SYSFS)]).1, standard);
    }

    #[test]
    fn a_directory_elsewhere_gets_bpffs_mounted_on_itself() {
        let (probe, action) = decide("/run/xlb/bpf", &[("/", 0xef53), ("/run", TMPFS)]);
        assert_eq!(probe.existing, Path::new("/run"));
        assert_eq!(
            action,
            BpffsAction::Mount {
                target: PathBuf::from("/run/xlb/bpf")
            }
        );
        // A look-alike prefix is not the standard directory.
        assert_eq!(
            decide("/sys/fs/bpfx", &[("/sys", SYSFS)]).1,
            BpffsAction::Mount {
                target: PathBuf::from("/sys/fs/bpfx")
            }
        );
        // Under a bpffs mounted elsewhere: nothing to do.
        assert_eq!(
            decide(
                "/run/bpf/xlb",
                &[("/run", TMPFS), ("/run/bpf", BPF_FS_MAGIC)]
            )
            .1,
            BpffsAction::Ready
        );
    }

    #[test]
    fn statfs_errors_other_than_missing_are_reported() {
        let err = probe_with(Path::new("/sys/fs/bpf/xlb"), |_| {
            Err(io::Error::from_raw_os_error(libc::EACCES))
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EACCES));
        assert!(probe_with(Path::new("/a/b"), fake(&[])).is_err());
    }

    #[test]
    fn errors_name_the_errno() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        let text = errno_text(&eperm);
        assert!(text.starts_with("EPERM ("), "{text}");
        assert!(text.contains("os error 1"), "{text}");
        assert!(errno_text(&io::Error::from_raw_os_error(1000)).starts_with("errno 1000"));
        assert_eq!(fs_name(BPF_FS_MAGIC), "bpffs");
        assert!(fs_name(0x1234).contains("0x1234"));
    }
}
