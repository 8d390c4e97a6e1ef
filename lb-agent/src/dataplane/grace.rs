//! When a packet that read a Maglev table copy before a flip can no longer be running.
//! A flipped-out copy may still be read by a packet in flight, so it is rewritten, and a
//! backend slot that only it named is emptied, only after the kernel has waited for the
//! programs running at the flip to finish (an RCU grace period, milliseconds). The wait:
//! an update of the outer map's reserved slot 0 (no service has id 0), which the kernel
//! returns from only after running programs finished.
//!
//! A helper thread does the waiting, so the writer need not: a slot to empty is queued
//! (the writer records it as empty; no plan can hand its id out again before the queue
//! empties it, see [`Grace::is_deferred`]) and emptied once a wait that began after the
//! last flip is over.

use std::collections::HashMap;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use aya::maps::{Array, IterableMap as _, MapData};
use lb_common::maps::{MAGLEV_INNER_FLAGS, MAGLEV_TEMPLATE_ENTRIES, MaglevSlot};
use tokio::sync::Notify;

use super::sys;

/// Flips, and the waits that cover them.
#[derive(Debug, Default)]
pub struct Grace {
    /// Flips so far; flip `n` is covered once a wait that began after it is over.
    flips: u64,
    /// Service id -> number of its last flip.
    last_flip: HashMap<u32, u64>,
    shared: Arc<Shared>,
    helper: Option<JoinHandle<()>>,
    /// Backend slots to empty, with the flip number that must be covered first.
    deferred: Vec<(u32, u64)>,
}

#[derive(Debug, Default)]
struct Shared {
    /// The highest flip number a finished wait covers.
    covered: AtomicU64,
    /// The highest flip number a wait is wanted for, and whether the helper stops.
    wanted: Mutex<(u64, bool)>,
    wake: Condvar,
    /// Told when a wait finished.
    done: Arc<Notify>,
}

impl Grace {
    /// Notes a flip of `service_id`'s table.
    pub fn flipped(&mut self, service_id: u32) {
        self.flips += 1;
        self.last_flip.insert(service_id, self.flips);
    }

    /// The copy `service_id` flipped away from may still be read.
    pub fn copy_in_use(&self, service_id: u32) -> bool {
        self.last_flip
            .get(&service_id)
            .is_some_and(|&n| n > self.covered())
    }

    /// Some flip is not covered yet.
    pub fn uncovered(&self) -> bool {
        self.flips > self.covered()
    }

    fn covered(&self) -> u64 {
        self.shared.covered.load(Ordering::Acquire)
    }

    /// The number to pass to [`Grace::waited`] after a wait that starts now.
    pub fn now(&self) -> u64 {
        self.flips
    }

    /// A wait that began when [`Grace::now`] returned `upto` is over.
    pub fn waited(&mut self, upto: u64) {
        self.shared.covered.fetch_max(upto, Ordering::AcqRel);
        let covered = self.covered();
        self.last_flip.retain(|_, n| *n > covered);
    }

    /// Queues backend slot `id` to be emptied once the flips so far are covered, and
    /// asks the helper (started on first use, waiting on `outer`) for a wait.
    pub fn defer(&mut self, id: u32, outer: impl FnOnce() -> std::io::Result<OwnedFd>) {
        self.deferred.push((id, self.flips));
        if self.helper.is_none() {
            match outer() {
                Ok(fd) => {
                    let shared = Arc::clone(&self.shared);
                    self.helper = std::thread::Builder::new()
                        .name("xlb-grace".into())
                        .spawn(move || helper(&shared, &fd))
                        .map_err(|e| tracing::warn!("cannot start the grace thread: {e}"))
                        .ok();
                }
                Err(e) => tracing::warn!("cannot start the grace thread: {e}"),
            }
        }
        let mut wanted = lock(&self.shared.wanted);
        wanted.0 = wanted.0.max(self.flips);
        self.shared.wake.notify_one();
    }

    /// A queued slot: emptying it must come before any new write to it.
    pub fn is_deferred(&self, id: u32) -> bool {
        self.deferred.iter().any(|(d, _)| *d == id)
    }

    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Some queued slot still waits for a wait.
    pub fn deferred_uncovered(&self) -> bool {
        let covered = self.covered();
        self.deferred.iter().any(|(_, n)| *n > covered)
    }

    /// The queued slots that can be emptied now, taken off the queue.
    pub fn ready(&mut self) -> Vec<u32> {
        let covered = self.covered();
        let (ready, waiting) = self.deferred.iter().partition(|(_, n)| *n <= covered);
        self.deferred = waiting;
        self.last_flip.retain(|_, n| *n > covered);
        ready.into_iter().map(|(id, _)| id).collect()
    }

    /// Told each time the helper finished a wait.
    pub fn done(&self) -> Arc<Notify> {
        Arc::clone(&self.shared.done)
    }
}

impl Drop for Grace {
    fn drop(&mut self) {
        if let Some(helper) = self.helper.take() {
            lock(&self.shared.wanted).1 = true;
            self.shared.wake.notify_one();
            let _ = helper.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits for running programs once per request, covering what was wanted when it began.
fn helper(shared: &Shared, outer: &OwnedFd) {
    let mut last = 0;
    loop {
        let target = {
            let mut wanted = lock(&shared.wanted);
            while wanted.0 <= last && !wanted.1 {
                wanted = shared
                    .wake
                    .wait(wanted)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if wanted.1 {
                return;
            }
            wanted.0
        };
        match wait_for_readers(outer.as_fd()) {
            Ok(()) => {
                last = target;
                shared.covered.fetch_max(target, Ordering::AcqRel);
                shared.done.notify_one();
            }
            Err(e) => {
                tracing::warn!("waiting for running programs failed: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Returns once every program running at the call has finished: the kernel completes
/// a map-in-map update only then. Slot 0 gets a fresh empty table (no service uses it).
pub fn wait_for_readers(outer: BorrowedFd<'_>) -> std::io::Result<()> {
    let placeholder: Array<MapData, MaglevSlot> =
        Array::create(MAGLEV_TEMPLATE_ENTRIES, MAGLEV_INNER_FLAGS)
            .map_err(std::io::Error::other)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&placeholder.map().fd().as_fd());
    sys::update_batch::<u32, u32>(outer, &[0], &[fd.cast_unsigned()]).map_err(|(_, e)| e.into())
}
