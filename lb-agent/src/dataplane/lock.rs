//! One agent per pin directory. Two agents on one `--bpffs` would each swap their
//! program into the pinned links and write the same maps from different ideas of the
//! state (ids, tables, health), so an agent takes an exclusive `flock` on the directory
//! itself before it loads, attaches, removes or writes anything, and holds it until it
//! exits (the kernel releases it then, also after `kill -9`: no stale lock file).
//!
//! bpffs holds only pinned objects and directories, so no lock file can be written
//! there; the holder's PID comes from `/proc/locks`, which lists every `flock` with its
//! owner's PID and the locked inode. `status` and `detach` take no lock; `detach` asks
//! [`holder`] to warn that a live agent is using the directory.

use std::fs::File;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::pins;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another agent ({}) holds the pin directory {dir}: two agents on one --bpffs would \
         overwrite each other's maps; stop it, or give this one another --bpffs",
        holder_text(*pid)
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("locking the pin directory {dir}: {reason}")]
    Io { dir: PathBuf, reason: String },
}

fn holder_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "PID unknown".to_owned(), |pid| format!("PID {pid}"))
}

/// The directories this process holds, open for as long as it runs.
static HELD: Mutex<Vec<Held>> = Mutex::new(Vec::new());

struct Held {
    path: PathBuf,
    inode: (u64, u64),
    _file: File,
}

/// Creates `dir` on bpffs when needed and locks it for the rest of this process's life;
/// fails with the other agent's PID when another process holds it. Calling it again for
/// a directory this process holds does nothing; for one that was removed and created
/// again (`--replace`), it locks the new one.
pub fn hold(dir: &Path) -> Result<(), LockError> {
    let io = |reason: String| LockError::Io {
        dir: dir.to_owned(),
        reason,
    };
    pins::create_dir(dir).map_err(|e| io(e.to_string()))?;
    let file = File::open(dir).map_err(|e| io(e.to_string()))?;
    let meta = file.metadata().map_err(|e| io(e.to_string()))?;
    let inode = (meta.dev(), meta.ino());
    let mut held = HELD
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if held.iter().any(|h| h.inode == inode) {
        return Ok(());
    }
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(LockError::Held {
                dir: dir.to_owned(),
                pid: holder_of(inode),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io(format!("flock: {e}"))),
    }
    held.retain(|h| h.path != dir);
    held.push(Held {
        path: dir.to_owned(),
        inode,
        _file: file,
    });
    Ok(())
}

/// The PID of the process that holds `dir`'s lock, when one does (and `/proc/locks`
/// shows it in this PID namespace). Takes no lock.
pub fn holder(dir: &Path) -> Option<u32> {
    let meta = std::fs::metadata(dir).ok()?;
    holder_of((meta.dev(), meta.ino()))
}

fn holder_of((dev, ino): (u64, u64)) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    find_holder(&locks, dev, ino)
}

/// The owner of an active `FLOCK` on `dev`/`ino` in `/proc/locks` text, whose lines read
/// `1: FLOCK  ADVISORY  WRITE 27978 00:28:452512 0 EOF` (blocked waiters have a `->`).
fn find_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    // Linux's dev_t encoding (glibc's gnu_dev_major/minor).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, "FLOCK", _, _, pid, inode, ..] = fields.as_slice() else {
            return None;
        };
        let mut parts = inode.split(':');
        let same = u64::from_str_radix(parts.next()?, 16).ok()? == major
            && u64::from_str_radix(parts.next()?, 16).ok()? == minor
            && parts.next()?.parse::<u64>().ok()? == ino;
        same.then(|| pid.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::find_holder;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 100 00:28:452512 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 27978 00:28:452512 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 31000 00:28:452512 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 555 fd:01:452512 0 EOF\n";
        assert_eq!(find_holder(locks, 0x28, 452_512), Some(27_978));
        assert_eq!(find_holder(locks, 0xfd01, 452_512), Some(555));
        assert_eq!(find_holder(locks, 0x28, 1), None);
    }
}
