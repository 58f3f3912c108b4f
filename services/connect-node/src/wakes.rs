//! A task that only counts its wake-ups, for tests of what wakes whom.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Waker;

use futures::task::ArcWake;

/// Counts the wake-ups of a task.
pub(crate) struct Wakes(AtomicUsize);

impl ArcWake for Wakes {
    fn wake_by_ref(w: &Arc<Self>) {
        w.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Wakes {
    /// A counter at 0, and a waker that counts on it.
    pub(crate) fn task() -> (Arc<Wakes>, Waker) {
        let w = Arc::new(Wakes(AtomicUsize::new(0)));
        (w.clone(), futures::task::waker(w))
    }

    /// Wake-ups so far.
    pub(crate) fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
