//! Whole arrays read at once: restoring after a restart and `lb-agent status` read arrays
//! of up to 262,144 entries, where one syscall per index costs about a microsecond each
//! (a quarter of a second per array). Arrays created with `BPF_F_MMAPABLE` are copied
//! out of a read-only memory mapping (milliseconds); others are read in batches
//! (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6, hardly faster per entry), or one by one where
//! the kernel has no batches (both in `sys`).

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use aya::Pod;
use aya::maps::{MapData, MapError};

use super::sys;

/// Entries asked for per syscall (the buffer is this many values).
const CHUNK: u32 = 8192;

fn syscall_err(call: &'static str) -> impl Fn(io::Error) -> MapError {
    move |io_error| MapError::SyscallError(aya::sys::SyscallError { call, io_error })
}

fn bpf_err(e: sys::BpfError) -> MapError {
    MapError::SyscallError(aya::sys::SyscallError {
        call: e.cmd,
        io_error: e.errno,
    })
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
    match sys::array_values_batched(fd, len, CHUNK) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | sys::ENOTSUPP)) => (0
            ..u32::try_from(len).unwrap_or(u32::MAX))
            .map(|index| sys::lookup_elem(fd, index).map_err(bpf_err))
            .collect(),
        other => other.map_err(bpf_err),
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
