//! Polling a backend connection inside the task that waits for it (see
//! [`super::upstream::H1`]). hyper hands everything between a connection and its
//! users over channels, and each hand-over wakes the other side: here that is the
//! task doing the polling, which tokio would then schedule again for nothing (one
//! wasted poll of the whole client connection per hand-over, several per request).
//! [`SameTask`] is the waker the connection and its channels see instead: a wake
//! while the task is polling them only makes that poll go round again; a wake at
//! any other time (the backend's socket became ready, a timer fired) wakes the task.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// No poll under way: a wake goes to the task.
const IDLE: u8 = 0;
/// A poll is under way.
const POLLING: u8 = 1;
/// A poll is under way and something woke it: it goes round again.
const WOKEN: u8 = 2;

/// Rounds of one poll before a wake goes to the task after all (tokio's cooperative
/// budget makes a resource wake its own task to yield; looping on that would spin).
const MAX_ROUNDS: usize = 4;

#[derive(Debug)]
pub struct SameTask {
    shared: Arc<Shared>,
    /// `shared` as a waker, made once.
    waker: Waker,
}

#[derive(Debug, Default)]
struct Shared {
    state: AtomicU8,
    task: AtomicWaker,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) | Err(WOKEN) => {}
            Err(_) => self.task.wake(),
        }
    }
}

impl Default for SameTask {
    fn default() -> Self {
        let shared = Arc::new(Shared::default());
        let waker = Waker::from(Arc::clone(&shared));
        SameTask { shared, waker }
    }
}

impl SameTask {
    /// Runs `poll` (which polls the connection, then what it feeds) with this waker,
    /// again while it is pending and was woken during the round, up to
    /// [`MAX_ROUNDS`]; the task behind `cx` is woken for anything later.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.shared.task.register(cx.waker());
        let mut local = Context::from_waker(&self.waker);
        for _ in 0..MAX_ROUNDS {
            self.shared.state.store(POLLING, Ordering::Release);
            let polled = poll(&mut local);
            let woken = self.shared.state.swap(IDLE, Ordering::AcqRel) == WOKEN;
            if polled.is_ready() || !woken {
                return polled;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Forgets the task: the connection is parked, and a wake must not reach a task
    /// that is done with it.
    pub fn forget(&self) {
        drop(self.shared.task.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_wake_during_the_poll_goes_round_again_and_a_later_one_reaches_the_task() {
        let count = Arc::new(Count::default());
        let task = Waker::from(Arc::clone(&count));
        let same = SameTask::default();
        let mut rounds = 0;
        let mut stored = None;
        let polled = same.poll(&mut Context::from_waker(&task), |cx| {
            rounds += 1;
            stored = Some(cx.waker().clone());
            if rounds == 1 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(rounds)
            }
        });
        assert_eq!(polled, Poll::Ready(2));
        assert_eq!(count.0.load(Ordering::Relaxed), 0, "woken while polling");
        stored.expect("a waker was stored").wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken afterwards");
    }

    #[test]
    fn a_resource_that_always_wakes_itself_hands_the_wake_to_the_task() {
        let count = Arc::new(Count::default());
        let task = Waker::from(Arc::clone(&count));
        let same = SameTask::default();
        let mut rounds = 0;
        let polled: Poll<()> = same.poll(&mut Context::from_waker(&task), |cx| {
            rounds += 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        assert!(polled.is_pending());
        assert_eq!(rounds, MAX_ROUNDS);
        assert_eq!(count.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_forgotten_task_is_not_woken() {
        let count = Arc::new(Count::default());
        let task = Waker::from(Arc::clone(&count));
        let same = SameTask::default();
        let mut stored = None;
        let _: Poll<()> = same.poll(&mut Context::from_waker(&task), |cx| {
            stored = Some(cx.waker().clone());
            Poll::Pending
        });
        same.forget();
        stored.expect("a waker was stored").wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
    }
}
