//! Socket load balancing: the object's cgroup `sock_addr` programs attached to a cgroup
//! v2 directory (every process in it and below is served: pods and host processes
//! alike), through links pinned under the pin directory (`cgroup_<hook>`), so that a
//! restarted agent swaps its programs into them (`BPF_LINK_UPDATE`) and sockets are
//! never without translation.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use aya::maps::Array;
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use lb_common::maps;
use lb_common::sock::{SOCK_F_HOST_ONLY, SockConfig};

use super::pins::pin_err;
use super::sys::statfs_magic;
use super::{Dataplane, DataplaneError};

/// The programs, by hook, in the order they are attached (reverse translation first,
/// so no socket is ever translated without its way back).
pub const PROGRAMS: [&str; 8] = [
    "xlb_recvmsg4",
    "xlb_recvmsg6",
    "xlb_getpeername4",
    "xlb_getpeername6",
    "xlb_connect4",
    "xlb_connect6",
    "xlb_sendmsg4",
    "xlb_sendmsg6",
];
pub(super) const LINK_PREFIX: &str = "cgroup_";

/// `statfs(2)` `f_type` of cgroup v2 (linux/magic.h `CGROUP2_SUPER_MAGIC`).
const CGROUP2_MAGIC: i64 = 0x6367_7270;
/// Where the agent mounts cgroup2 itself when the host has it mounted nowhere.
pub const PRIVATE_MOUNT: &str = "/run/xlb/cgroup2";

/// What `--cgroup`/`--socket-lb` ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketLbOptions {
    /// The cgroup v2 directory; `None` = the host's cgroup2 root.
    pub cgroup: Option<PathBuf>,
    /// Only sockets of the agent's own (the host's) network namespace.
    pub host_only: bool,
}

/// Where link `program` is pinned.
pub fn link_path(dir: &Path, program: &str) -> PathBuf {
    let hook = program.strip_prefix("xlb_").unwrap_or(program);
    dir.join(format!("{LINK_PREFIX}{hook}"))
}

/// The cgroup2 mount point in `/proc/self/mountinfo` text: `/sys/fs/cgroup` on a
/// unified host, `/sys/fs/cgroup/unified` on a hybrid one; the shortest when several.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mut fields = left.split_whitespace();
            let root = fields.nth(3)?;
            let point = fields.next()?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(point))
        })
        .min_by_key(|p| p.as_os_str().len())
}

/// The directory to attach to: `--cgroup`, checked to be on cgroup2; else the host's
/// cgroup2 mount; else cgroup2 mounted at [`PRIVATE_MOUNT`]. A kernel without cgroup2
/// (v1 only) is an error that names what is missing.
pub fn resolve_cgroup(requested: Option<&Path>) -> Result<PathBuf, DataplaneError> {
    if let Some(dir) = requested {
        let magic = statfs_magic(dir).map_err(|e| pin_err(dir, format!("statfs: {e}")))?;
        if magic != CGROUP2_MAGIC {
            return Err(pin_err(
                dir,
                format!(
                    "not a cgroup v2 directory (statfs f_type {magic:#x}, cgroup2 is \
                     {CGROUP2_MAGIC:#x}); socket load balancing attaches to cgroup v2 only: \
                     name a directory of the cgroup2 mount (e.g. /sys/fs/cgroup or \
                     /sys/fs/cgroup/unified)"
                ),
            ));
        }
        return Ok(dir.to_path_buf());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| pin_err(Path::new("/proc/self/mountinfo"), e))?;
    if let Some(point) = cgroup2_mount(&mountinfo) {
        return Ok(point);
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems
        .lines()
        .any(|l| l.trim_end().ends_with("cgroup2"))
    {
        return Err(pin_err(
            Path::new("/proc/filesystems"),
            "this kernel has no cgroup2 file system (cgroup v1 only); socket load \
             balancing needs cgroup v2 (CONFIG_CGROUPS with the unified hierarchy, \
             Linux 4.10+) and CONFIG_CGROUP_BPF",
        ));
    }
    let target = Path::new(PRIVATE_MOUNT);
    std::fs::create_dir_all(target).map_err(|e| pin_err(target, e))?;
    super::sys::mount(c"none", target, c"cgroup2").map_err(|e| {
        pin_err(
            target,
            format!(
                "no cgroup2 mount on this host, and mounting one failed ({e}): run \
                 `mount -t cgroup2 none /sys/fs/cgroup/unified` or pass --cgroup"
            ),
        )
    })?;
    tracing::info!(
        dir = PRIVATE_MOUNT,
        "no cgroup2 mount found: mounted cgroup2 privately"
    );
    Ok(target.to_path_buf())
}

/// `SO_NETNS_COOKIE` of the calling thread's network namespace (Linux 5.14+).
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie: u64 = 0;
    let mut len: libc::socklen_t = 8;
    // SAFETY: a valid socket and an 8-byte buffer with its length, both outliving the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How the socket programs were put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAttachment {
    pub cgroup: PathBuf,
    /// Hooks whose pinned link got the new program in place.
    pub adopted: usize,
    /// Hooks newly attached (or moved from another cgroup).
    pub attached: usize,
}

impl Dataplane {
    /// Writes the socket programs' settings, loads them and makes `cgroup` run them
    /// through links pinned under `dir`: a pinned link of the same cgroup gets the new
    /// program atomically; one of another cgroup is replaced after the new one is
    /// attached; a missing one is created.
    pub fn attach_sockets(
        &mut self,
        dir: &Path,
        cgroup: &Path,
        host_only: bool,
    ) -> Result<SocketAttachment, DataplaneError> {
        let cookie =
            netns_cookie().map_err(|e| pin_err(cgroup, format!("SO_NETNS_COOKIE: {e}")))?;
        self.write_sock_config(SockConfig {
            host_netns_cookie: cookie,
            flags: if host_only { SOCK_F_HOST_ONLY } else { 0 },
            _pad: 0,
        })?;
        let cgroup_file = std::fs::File::open(cgroup).map_err(|e| pin_err(cgroup, e))?;
        let cgroup_id = std::fs::metadata(cgroup)
            .map_err(|e| pin_err(cgroup, e))?
            .ino();
        let mut done = SocketAttachment {
            cgroup: cgroup.to_path_buf(),
            adopted: 0,
            attached: 0,
        };
        for name in PROGRAMS {
            let prog = self.sock_program(name)?;
            prog.load()
                .map_err(|source| DataplaneError::Program { name, source })?;
            let path = link_path(dir, name);
            let old = if path.exists() {
                Some(bpf_obj_get(&path).map_err(|e| pin_err(&path, format!("BPF_OBJ_GET: {e}")))?)
            } else {
                None
            };
            if let Some(old) = &old
                && link_cgroup(old.as_fd()).ok() == Some(cgroup_id)
            {
                let prog_fd = prog
                    .fd()
                    .map_err(|source| DataplaneError::Program { name, source })?;
                link_update(old.as_fd(), prog_fd.as_fd())
                    .map_err(|e| pin_err(&path, format!("BPF_LINK_UPDATE: {e}")))?;
                done.adopted += 1;
                continue;
            }
            // A BPF link: the kernel refuses attach flags on cgroup links (EINVAL) and
            // always lets several coexist, so `Single` (no flags) it is.
            let id = prog
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|source| DataplaneError::Program { name, source })?;
            let link = prog
                .take_link(id)
                .map_err(|source| DataplaneError::Program { name, source })?;
            let fd_link = FdLink::try_from(link).map_err(|e| {
                pin_err(
                    &path,
                    format!("the kernel attached without a BPF link ({e}); links need Linux 5.7+"),
                )
            })?;
            // Pinned beside, then renamed over the old pin: the hook is never empty.
            // (bpffs refuses names with a dot.)
            let fresh = path.with_file_name(format!(
                "{}_new",
                path.file_name().unwrap_or_default().to_string_lossy()
            ));
            let _ = std::fs::remove_file(&fresh);
            fd_link.pin(&fresh).map_err(|e| pin_err(&fresh, e))?;
            std::fs::rename(&fresh, &path).map_err(|e| pin_err(&path, e))?;
            if let Some(old) = old {
                link_detach(old.as_fd())
                    .map_err(|e| pin_err(&path, format!("BPF_LINK_DETACH: {e}")))?;
            }
            done.attached += 1;
        }
        Ok(done)
    }

    fn sock_program(&mut self, name: &'static str) -> Result<&mut CgroupSockAddr, DataplaneError> {
        self.ebpf
            .as_mut()
            .and_then(|ebpf| ebpf.program_mut(name))
            .ok_or(DataplaneError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    fn write_sock_config(&mut self, config: SockConfig) -> Result<(), DataplaneError> {
        let name = maps::SOCK_CONFIG;
        let map = self
            .ebpf
            .as_mut()
            .and_then(|ebpf| ebpf.map_mut(name))
            .ok_or(DataplaneError::MissingMap(name))?;
        let mut array: Array<_, SockConfig> =
            Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })?;
        array
            .set(0, config, 0)
            .map_err(|source| DataplaneError::Map { name, source })
    }
}

/// The agent's start: attaches the socket programs when asked (logging what it did),
/// else detaches any a previous agent pinned under `dir`, as interfaces no longer
/// listed are detached.
pub fn start(
    dp: &mut Dataplane,
    dir: &Path,
    options: Option<&SocketLbOptions>,
) -> Result<(), DataplaneError> {
    let Some(options) = options else {
        for removed in detach_all(dir)? {
            tracing::info!("detached {removed}: socket load balancing not asked for");
        }
        return Ok(());
    };
    let cgroup = resolve_cgroup(options.cgroup.as_deref())?;
    let done = dp.attach_sockets(dir, &cgroup, options.host_only)?;
    tracing::info!(
        cgroup = %done.cgroup.display(),
        adopted = done.adopted,
        attached = done.attached,
        host_only = options.host_only,
        "socket load balancing: connect/sendmsg/recvmsg/getpeername hooks in place"
    );
    Ok(())
}

/// Hooks with a pinned link under `dir`.
pub fn pinned_links(dir: &Path) -> Vec<PathBuf> {
    PROGRAMS
        .iter()
        .map(|name| link_path(dir, name))
        .filter(|p| p.exists())
        .collect()
}

/// Detaches every socket program pinned under `dir` (effective at once, even while an
/// agent holds the links) and removes the pins. Returns what it removed.
pub fn detach_all(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    let mut removed = Vec::new();
    for path in pinned_links(dir) {
        let link = bpf_obj_get(&path).map_err(|e| pin_err(&path, format!("BPF_OBJ_GET: {e}")))?;
        link_detach(link.as_fd()).map_err(|e| pin_err(&path, format!("BPF_LINK_DETACH: {e}")))?;
        std::fs::remove_file(&path).map_err(|e| pin_err(&path, e))?;
        removed.push(format!(
            "socket link {}",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
    }
    Ok(removed)
}

/// The cgroup id a cgroup link is attached to (`BPF_OBJ_GET_INFO_BY_FD`).
fn link_cgroup(link: BorrowedFd<'_>) -> io::Result<u64> {
    const BPF_OBJ_GET_INFO_BY_FD: super::sys::Cmd = super::sys::OBJ_GET_INFO_BY_FD;
    // struct bpf_link_info: type, id, prog_id, then (8-aligned) the cgroup member:
    // cgroup_id (u64), attach_type.
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u64; 8];
    let mut attr = Attr {
        bpf_fd: link.as_raw_fd().cast_unsigned(),
        info_len: 64,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[2])
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on.
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: super::sys::Cmd = super::sys::LINK_UPDATE;
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd().cast_unsigned(),
        new_prog_fd: prog.as_raw_fd().cast_unsigned(),
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `BPF_LINK_DETACH` (Linux 5.9+), through the one module that makes `bpf(2)` calls.
fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    super::sys::link_detach(link).map_err(|e| e.errno)
}

/// `BPF_OBJ_GET`: opens a pinned object.
fn bpf_obj_get(path: &Path) -> io::Result<OwnedFd> {
    super::sys::obj_get(path).map_err(|e| e.errno)
}

/// `bpf(2)` with `attr` (a prefix of `union bpf_attr`), made by `sys`.
fn bpf<T>(cmd: super::sys::Cmd, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd` (the callers' structs); the
    // pointers inside it point to memory that outlives the call.
    unsafe { super::sys::command(cmd, attr) }.map_err(|e| e.errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_or_unified_host() {
        assert_eq!(
            cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "35 25 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n\
                       99 35 0:30 /kubepods /var/lib/x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        let v1_only = "32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(cgroup2_mount(v1_only), None);
    }

    #[test]
    fn a_cgroup_directory_not_on_cgroup2_is_refused_by_name() {
        let dir = std::env::temp_dir();
        let e = resolve_cgroup(Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("not a cgroup v2 directory"), "{e}");
        assert!(e.contains(&dir.display().to_string()), "{e}");
    }

    #[test]
    fn link_pins_are_named_by_hook() {
        assert_eq!(
            link_path(Path::new("/sys/fs/bpf/xlb"), "xlb_connect4"),
            Path::new("/sys/fs/bpf/xlb/cgroup_connect4")
        );
    }
}
