//! Every raw `bpf(2)` call the agent makes, behind safe wrappers: the commands aya 0.14
//! lacks (batch lookup, update and delete; delete on a map of maps; opening a pinned
//! link; detaching a link) and single lookups for kernels without batches; plus
//! memory-mapped arrays. Thousands of services make one syscall per element too slow: a
//! 10,000-service sync would be millions of them. Errors name the command and carry the
//! errno.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::Pod;

/// A `bpf(2)` command: its number and its name for errors.
#[derive(Clone, Copy)]
pub(super) struct Cmd(libc::c_long, &'static str);

const MAP_LOOKUP_ELEM: Cmd = Cmd(1, "BPF_MAP_LOOKUP_ELEM");
const MAP_DELETE_ELEM: Cmd = Cmd(3, "BPF_MAP_DELETE_ELEM");
const OBJ_GET: Cmd = Cmd(7, "BPF_OBJ_GET");
const MAP_LOOKUP_BATCH: Cmd = Cmd(24, "BPF_MAP_LOOKUP_BATCH");
const MAP_UPDATE_BATCH: Cmd = Cmd(26, "BPF_MAP_UPDATE_BATCH");
const MAP_DELETE_BATCH: Cmd = Cmd(27, "BPF_MAP_DELETE_BATCH");
const LINK_DETACH: Cmd = Cmd(34, "BPF_LINK_DETACH");
/// Commands whose attributes their one caller builds (see [`command`]).
pub(super) const MAP_GET_NEXT_KEY: Cmd = Cmd(4, "BPF_MAP_GET_NEXT_KEY");
pub(super) const OBJ_GET_INFO_BY_FD: Cmd = Cmd(15, "BPF_OBJ_GET_INFO_BY_FD");
pub(super) const LINK_UPDATE: Cmd = Cmd(29, "BPF_LINK_UPDATE");
pub(super) const MAP_LOOKUP_BATCH_CMD: Cmd = MAP_LOOKUP_BATCH;

/// `mount(source, target, fstype, 0, "")`: a pseudo file system (bpffs, cgroup2)
/// with no flags and no options.
pub(super) fn mount(source: &CStr, target: &Path, fstype: &CStr) -> io::Result<()> {
    let cpath = path_cstring(target)?;
    // SAFETY: NUL-terminated strings that outlive the call; empty data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            cpath.as_ptr(),
            fstype.as_ptr(),
            0,
            c"".as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `statfs(2)`'s `f_type` of `path`.
pub(super) fn statfs_magic(path: &Path) -> io::Result<i64> {
    let cpath = path_cstring(path)?;
    // SAFETY: a zeroed statfs is a valid value for the kernel to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a struct that both outlive the call.
    if unsafe { libc::statfs(cpath.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(
        clippy::useless_conversion,
        reason = "f_type's width differs by libc target"
    )]
    Ok(i64::from(st.f_type))
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// The kernel's ENOTSUPP (not in libc): the map type has no batch operations.
pub const ENOTSUPP: i32 = 524;

/// A failed `bpf(2)` command.
#[derive(Debug, thiserror::Error)]
#[error("{cmd}: {errno}")]
pub struct BpfError {
    pub cmd: &'static str,
    pub errno: io::Error,
}

impl BpfError {
    pub fn raw_os_error(&self) -> Option<i32> {
        self.errno.raw_os_error()
    }

    fn other(cmd: Cmd, message: String) -> Self {
        BpfError {
            cmd: cmd.1,
            errno: io::Error::other(message),
        }
    }
}

impl From<BpfError> for io::Error {
    fn from(e: BpfError) -> Self {
        io::Error::new(e.errno.kind(), e)
    }
}

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands (`struct { ... } batch`); also the stats
/// reader's `BPF_MAP_LOOKUP_BATCH` through [`command`].
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub(super) in_batch: u64,
    pub(super) out_batch: u64,
    pub(super) keys: u64,
    pub(super) values: u64,
    pub(super) count: u32,
    pub(super) map_fd: u32,
    pub(super) elem_flags: u64,
    pub(super) flags: u64,
}

/// `union bpf_attr`, the `BPF_OBJ_*` prefix.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr`, the `link_detach` member.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// The one `bpf(2)` call site; returns the syscall's non-negative result.
/// `bpf(2)` with an attribute block a caller outside this module builds (the stats
/// reader's iteration, the socket hooks' link commands), so that the system call itself
/// stays here.
///
/// # Safety
/// `attr` must be a valid `union bpf_attr` prefix for `cmd`, and every pointer in it
/// must point at a live buffer as large as the kernel reads or writes for `cmd`.
pub(super) unsafe fn command<T>(cmd: Cmd, attr: &mut T) -> Result<libc::c_long, BpfError> {
    bpf(cmd, attr)
}

fn bpf<T>(cmd: Cmd, attr: &mut T) -> Result<libc::c_long, BpfError> {
    // SAFETY: every caller passes a valid `union bpf_attr` prefix for `cmd` whose
    // pointers outlive the call and point at buffers of the sizes the kernel reads or
    // writes for it; the kernel reads at most `size_of::<T>()` bytes of `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd.0,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(BpfError {
            cmd: cmd.1,
            errno: io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

/// `BPF_MAP_DELETE_ELEM` of a `u32` key (aya has no typed delete on an array of maps).
pub fn delete_elem(fd: BorrowedFd<'_>, key: u32) -> Result<(), BpfError> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd().cast_unsigned(),
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: 0,
        flags: 0,
    };
    bpf(MAP_DELETE_ELEM, &mut attr).map(drop)
}

/// `BPF_MAP_LOOKUP_ELEM` of index `key` of an array (not per-CPU) of `V`.
pub fn lookup_elem<V: Pod>(fd: BorrowedFd<'_>, key: u32) -> Result<V, BpfError> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd().cast_unsigned(),
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    bpf(MAP_LOOKUP_ELEM, &mut attr)?;
    // SAFETY: the kernel wrote the whole value; `V` is plain bytes.
    Ok(unsafe { value.assume_init() })
}

/// `BPF_OBJ_GET`: opens a pinned object (aya 0.14 keeps a pinned link's fd private).
pub fn obj_get(path: &Path) -> Result<OwnedFd, BpfError> {
    let cpath = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| BpfError {
        cmd: OBJ_GET.1,
        errno: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    let mut attr = ObjAttr {
        pathname: cpath.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let rc = bpf(OBJ_GET, &mut attr)?;
    let fd = i32::try_from(rc).map_err(|e| BpfError::other(OBJ_GET, e.to_string()))?;
    // SAFETY: the kernel just returned this new fd; we own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_DETACH` (Linux 5.9+); aya 0.14 does not have it.
pub fn link_detach(link: BorrowedFd<'_>) -> Result<(), BpfError> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd().cast_unsigned(),
    };
    bpf(LINK_DETACH, &mut attr).map(drop)
}

/// The bytes of plain values.
fn bytes<T: Pod>(values: &[T]) -> &[u8] {
    // SAFETY: `Pod` values are plain bytes without padding holes the kernel could not
    // read; the slice covers exactly their memory.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), size_of_val(values)) }
}

/// `BPF_MAP_UPDATE_BATCH`: `keys` and `values` hold `count` elements of the map's key and
/// value size. For an array of maps (values are inner map fds), the kernel waits for
/// running programs once per call, not once per element. On error, returns how many
/// elements were written.
pub fn update_batch_bytes(
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: &[u8],
    count: usize,
) -> Result<(), (usize, BpfError)> {
    batch(MAP_UPDATE_BATCH, fd, keys, Some(values), count)
}

/// [`update_batch_bytes`] of typed keys and values.
pub fn update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, BpfError)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    update_batch_bytes(fd, bytes(keys), bytes(values), keys.len())
}

/// `BPF_MAP_DELETE_BATCH`; a missing key is an error (`ENOENT`) that stops the batch.
pub fn delete_batch<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, BpfError)> {
    batch(MAP_DELETE_BATCH, fd, bytes(keys), None, keys.len())
}

fn batch(
    cmd: Cmd,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> Result<(), (usize, BpfError)> {
    if count == 0 {
        return Ok(());
    }
    let (key_size, value_size) = (keys.len() / count, values.map_or(0, |v| v.len() / count));
    let mut done = 0;
    while done < count {
        let mut attr = BatchAttr {
            keys: keys[done * key_size..].as_ptr() as u64,
            values: values.map_or(0, |v| v[done * value_size..].as_ptr() as u64),
            count: u32::try_from(count - done).unwrap_or(u32::MAX),
            map_fd: fd.as_raw_fd().cast_unsigned(),
            ..BatchAttr::default()
        };
        let result = bpf(cmd, &mut attr);
        done += attr.count as usize;
        if let Err(e) = result {
            return Err((done, e));
        }
        if attr.count == 0 {
            return Err((done, BpfError::other(cmd, "batch made no progress".into())));
        }
    }
    Ok(())
}

/// Every present entry of a map with `u32` keys, `chunk` at a time through
/// `BPF_MAP_LOOKUP_BATCH` (an array of maps skips empty slots; its values are map ids).
pub fn for_each<V: Pod + Default + Clone>(
    fd: BorrowedFd<'_>,
    chunk: usize,
    mut f: impl FnMut(u32, &V),
) -> Result<(), BpfError> {
    let mut keys = vec![0u32; chunk];
    let mut values = vec![V::default(); chunk];
    let mut next = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&next) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: u32::try_from(chunk).unwrap_or(u32::MAX),
            map_fd: fd.as_raw_fd().cast_unsigned(),
            ..BatchAttr::default()
        };
        // `in_batch` and `out_batch` may alias: the kernel reads the first before it
        // writes the second.
        let result = bpf(MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        for (key, value) in keys.iter().zip(&values).take(got) {
            f(*key, value);
        }
        match result {
            Ok(_) if got > 0 => first = false,
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// Every value of an array of `len` values (not per-CPU), by index, through
/// `BPF_MAP_LOOKUP_BATCH` (Linux 5.6), `chunk` at a time.
pub fn array_values_batched<V: Pod>(
    fd: BorrowedFd<'_>,
    len: usize,
    chunk: u32,
) -> Result<Vec<V>, BpfError> {
    let mut values: Vec<V> = Vec::with_capacity(len);
    let mut keys = vec![0u32; chunk as usize];
    let mut buf: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(chunk as usize);
    let (mut in_batch, mut out_batch) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_ref(&in_batch) as u64
            },
            out_batch: std::ptr::from_mut(&mut out_batch) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: buf.as_mut_ptr() as u64,
            count: chunk,
            map_fd: fd.as_raw_fd().cast_unsigned(),
            elem_flags: 0,
            flags: 0,
        };
        // ENOENT: the last batch (possibly with entries).
        let done = match bpf(MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = attr.count.min(chunk) as usize;
        for (i, key) in keys[..n].iter().enumerate() {
            if *key as usize != values.len() {
                return Err(BpfError::other(
                    MAP_LOOKUP_BATCH,
                    format!("returned index {key} where {} was due", values.len()),
                ));
            }
            // SAFETY: the kernel filled the first `n` values; `V` is plain bytes.
            values.push(unsafe { buf.as_ptr().add(i).cast::<V>().read() });
        }
        if done || values.len() >= len {
            return Ok(values);
        }
        in_batch = out_batch;
        first = false;
    }
}

/// A shared, writable mapping of a `BPF_F_MMAPABLE` array, seen as 32-bit words
/// (an element of value size `v` takes `round_up(v, 8)` bytes), unmapped on drop. The
/// program may read any word at any time: every access is atomic.
pub struct MappedArray {
    ptr: std::ptr::NonNull<u32>,
    words: usize,
    bytes: usize,
}

impl MappedArray {
    /// Maps the first `bytes` of the array's values.
    pub fn new(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let words = bytes / 4;
        let bytes = bytes.div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's pages; the kernel checks that
        // `bytes` does not exceed the array and that the map is mmapable.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<u32>())
            .ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Self { ptr, words, bytes })
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < self.words, "word {i} of {}", self.words);
        // SAFETY: in bounds of the live mapping and 4-byte aligned (page-aligned base);
        // the program only reads it, with aligned loads.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(i)) }
    }

    pub fn load(&self, i: usize) -> u32 {
        self.word(i).load(Ordering::Acquire)
    }

    /// Stores word `i` with no ordering: for words no reader uses yet.
    pub fn store_relaxed(&self, i: usize, value: u32) {
        self.word(i).store(value, Ordering::Relaxed);
    }

    /// Stores word `i`; a reader that sees it also sees every store before it.
    pub fn publish(&self, i: usize, value: u32) {
        self.word(i).store(value, Ordering::Release);
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` created.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.bytes);
        }
    }
}
