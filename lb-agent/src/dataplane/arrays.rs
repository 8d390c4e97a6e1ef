//! Whole arrays read at once: restoring after a restart and `lb-agent status` read arrays
//! of up to 262,144 entries, where one syscall per index costs about a microsecond each
//! (a quarter of a second per array). Arrays created with `BPF_F_MMAPABLE` are copied
//! out of a read-only memory mapping (milliseconds); others are read in batches
//! (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6, hardly faster per entry), or one by one where
//! the kernel has no batches.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::Pod;
use aya::maps::{MapData, MapError};

/// Entries asked for per syscall (the buffer is this many values).
const CHUNK: u32 = 8192;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// The kernel's ENOTSUPP (not in libc): the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr` for the batch commands.
#[repr(C)]
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

/// `union bpf_attr` for `BPF_MAP_LOOKUP_ELEM`.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix for `cmd`, and every pointer in it
    // points at a live buffer of the size the kernel will write.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<A>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn syscall_err(call: &'static str) -> impl Fn(io::Error) -> MapError {
    move |io_error| MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

/// Every value of an array map (plain, not per-CPU), by index.
pub fn array_values<V: Pod>(map: &aya::maps::Map) -> Result<Vec<V>, MapError> {
    match map {
        aya::maps::Map::Array(data) => data_values(data),
        _ => Err(MapError::InvalidMapType { map_type: 0 }),
    }
}

/// Every value of the array whose `MapData` this is, by index.
pub fn data_values<V: Pod>(map: &MapData) -> Result<Vec<V>, MapError> {
    let info = map.info()?;
    let len = info.max_entries() as usize;
    if info.value_size() as usize != size_of::<V>() {
        return Err(MapError::InvalidValueSize {
            size: info.value_size() as usize,
            expected: size_of::<V>(),
        });
    }
    let fd = map.fd().as_fd();
    if info.map_flags() & lb_common::maps::BPF_F_MMAPABLE != 0 {
        return mapped(fd, len).map_err(syscall_err("mmap"));
    }
    match batched(fd, len) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | ENOTSUPP)) => one_by_one(fd, len),
        other => other.map_err(syscall_err("bpf_map_lookup_batch")),
    }
}

/// Copies the values out of a read-only shared mapping of the array (elements are 8-byte
/// aligned there, as in the kernel).
fn mapped<V: Pod>(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<V>> {
    let stride = size_of::<V>().next_multiple_of(8);
    let bytes = stride * len;
    if bytes == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a fresh read-only mapping of the map's fd, of the array's size; unmapped
    // below before the memory is given back.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let values = (0..len)
        // SAFETY: inside the mapping; `V` is plain bytes, read unaligned.
        .map(|i| unsafe {
            base.cast::<u8>()
                .add(i * stride)
                .cast::<V>()
                .read_unaligned()
        })
        .collect();
    // SAFETY: the mapping made above, no longer referenced.
    unsafe { libc::munmap(base, bytes) };
    Ok(values)
}

fn batched<V: Pod>(fd: BorrowedFd<'_>, len: usize) -> io::Result<Vec<V>> {
    let mut values: Vec<V> = Vec::with_capacity(len);
    let mut keys = vec![0u32; CHUNK as usize];
    let mut buf: Vec<std::mem::MaybeUninit<V>> = Vec::with_capacity(CHUNK as usize);
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
            count: CHUNK,
            map_fd: fd.as_raw_fd().cast_unsigned(),
            elem_flags: 0,
            flags: 0,
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        // ENOENT: the last batch (possibly with entries).
        let done = match result {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        let n = attr.count.min(CHUNK) as usize;
        for (i, key) in keys[..n].iter().enumerate() {
            if *key as usize != values.len() {
                return Err(io::Error::other(format!(
                    "batch lookup returned index {key} where {} was due",
                    values.len()
                )));
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

fn one_by_one<V: Pod>(fd: BorrowedFd<'_>, len: usize) -> Result<Vec<V>, MapError> {
    (0..u32::try_from(len).unwrap_or(u32::MAX))
        .map(|index| {
            let mut value = std::mem::MaybeUninit::<V>::uninit();
            let mut attr = ElemAttr {
                map_fd: fd.as_raw_fd().cast_unsigned(),
                _pad: 0,
                key: std::ptr::from_ref(&index) as u64,
                value: value.as_mut_ptr() as u64,
                flags: 0,
            };
            bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map_err(syscall_err("bpf_map_lookup_elem"))?;
            // SAFETY: the kernel wrote the whole value.
            Ok(unsafe { value.assume_init() })
        })
        .collect()
}
