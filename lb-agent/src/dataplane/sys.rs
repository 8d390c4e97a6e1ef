//! `bpf(2)` commands aya 0.14 lacks (batch lookup, update and delete; delete on a map
//! of maps) and memory-mapped arrays. Thousands of services make one syscall per element too
//! slow: a 10,000-service sync would be millions of them.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use aya::Pod;

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// `union bpf_attr` for the element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for the batch commands (`struct { ... } batch`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid `union bpf_attr` prefix for `cmd` whose pointers (set by
    // the callers) outlive the call; the kernel reads at most `size_of::<T>()` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `BPF_MAP_DELETE_ELEM` of a `u32` key (aya has no typed delete on an array of maps).
pub fn delete_elem(fd: BorrowedFd<'_>, key: u32) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd().cast_unsigned(),
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: 0,
        flags: 0,
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr)
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
) -> Result<(), (usize, io::Error)> {
    batch(BPF_MAP_UPDATE_BATCH, fd, keys, Some(values), count)
}

/// [`update_batch_bytes`] of typed keys and values.
pub fn update_batch<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    update_batch_bytes(fd, bytes(keys), bytes(values), keys.len())
}

/// `BPF_MAP_DELETE_BATCH`; a missing key is an error (`ENOENT`) that stops the batch.
pub fn delete_batch<K: Pod>(fd: BorrowedFd<'_>, keys: &[K]) -> Result<(), (usize, io::Error)> {
    batch(BPF_MAP_DELETE_BATCH, fd, bytes(keys), None, keys.len())
}

fn batch(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: &[u8],
    values: Option<&[u8]>,
    count: usize,
) -> Result<(), (usize, io::Error)> {
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
            return Err((done, io::Error::other("batch made no progress")));
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
) -> io::Result<()> {
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
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = attr.count as usize;
        for (key, value) in keys.iter().zip(&values).take(got) {
            f(*key, value);
        }
        match result {
            Ok(()) if got > 0 => first = false,
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        }
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
