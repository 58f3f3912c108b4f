//! Pushes that finish even when their caller goes away.
//!
//! tonic drops a handler's future when its caller cancels or the call's
//! deadline passes. A push dropped after a controller has appended its
//! message would leave that message undelivered to the nodes not yet sent
//! to: their clients would see it only by recovering after a reconnect,
//! and the next message of the stream would wait at each of those nodes
//! for the one that never came. [`FinishOnDrop`] runs the push in the
//! caller's task, at no extra cost while the caller waits; only when it is
//! dropped unfinished does the rest go on as a task of its own, tracked so
//! that a draining push-manager waits for it (at most [`MAX_DETACHED`]
//! at once). A draining push-manager also waits for the pushes still in
//! their callers' tasks: a call's answer can reach its caller (the
//! deadline passed) a moment before the server drops the push, and the
//! rest of it must not start after the drain has looked.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use prometheus::IntCounterVec;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

/// Rests of abandoned pushes running at once at most; beyond, an
/// abandoned push stops where it is (counted as `cut_short`). Each holds
/// its message for at most the push's deadlines, and callers that cancel
/// at once no longer count against the server's limit on calls in flight.
pub const MAX_DETACHED: usize = 4096;

/// Where the rests of pushes whose callers went away run.
#[derive(Clone)]
pub struct Detached {
    tracker: TaskTracker,
    /// Pushes running in their callers' tasks ([`FinishOnDrop`]s alive).
    in_place: TaskTracker,
    limit: usize,
    /// `push_manager_abandoned_pushes_total{outcome}`.
    abandoned: IntCounterVec,
}

impl Detached {
    /// Rests run at most `limit` at once, counted in `abandoned` by
    /// outcome (`finished`: went on; `cut_short`).
    pub fn new(limit: usize, abandoned: IntCounterVec) -> Self {
        Detached {
            tracker: TaskTracker::new(),
            in_place: TaskTracker::new(),
            limit,
            abandoned,
        }
    }

    /// Waits until no push runs, in its caller's task or as a rest of its
    /// own: those in callers' tasks end or hand their rests over first.
    pub async fn wait(&self) {
        self.in_place.close();
        self.tracker.close();
        self.in_place.wait().await;
        self.tracker.wait().await;
    }

    /// Pushes running, in callers' tasks or as rests of their own.
    pub fn running(&self) -> usize {
        self.in_place.len() + self.tracker.len()
    }
}

/// Polls a future in place; if dropped before it is done, spawns the rest
/// of it on `detached` (its output then goes unread).
pub struct FinishOnDrop<'a, F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
    detached: &'a Detached,
    /// Held until after `drop` has handed an unfinished rest over.
    _in_place: TaskTrackerToken,
}

impl<'a, F: Future + Send + 'static> FinishOnDrop<'a, F>
where
    F::Output: Send + 'static,
{
    /// Wraps `fut`; an unfinished rest goes to `detached`.
    pub fn new(fut: F, detached: &'a Detached) -> Self {
        FinishOnDrop {
            fut: Some(Box::pin(fut)),
            detached,
            _in_place: detached.in_place.token(),
        }
    }
}

impl<F: Future + Send + 'static> Future for FinishOnDrop<'_, F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Out while polled: a future that panics is not spawned again
        // when the unwinding drops this.
        let Some(mut fut) = self.fut.take() else {
            return Poll::Pending;
        };
        match fut.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(out),
            Poll::Pending => {
                self.fut = Some(fut);
                Poll::Pending
            }
        }
    }
}

impl<F: Future + Send + 'static> Drop for FinishOnDrop<'_, F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(fut) = self.fut.take() else {
            return;
        };
        let d = self.detached;
        // Outside a runtime (it is shutting down) there is nowhere to go on.
        let runtime = tokio::runtime::Handle::try_current();
        match runtime {
            Ok(runtime) if d.tracker.len() < d.limit => {
                d.abandoned.with_label_values(&["finished"]).inc();
                d.tracker.spawn_on(fut, &runtime);
            }
            _ => d.abandoned.with_label_values(&["cut_short"]).inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    fn detached(limit: usize) -> Detached {
        let abandoned =
            IntCounterVec::new(prometheus::Opts::new("a", "a"), &["outcome"]).expect("counter");
        Detached::new(limit, abandoned)
    }

    /// Sets its flag after `wait`.
    async fn flag_after(wait: Duration, flag: Arc<AtomicBool>) -> u32 {
        tokio::time::sleep(wait).await;
        flag.store(true, Ordering::SeqCst);
        7
    }

    #[tokio::test]
    async fn a_future_that_completes_in_place_leaves_no_task() {
        let d = detached(1);
        let done = Arc::new(AtomicBool::new(false));
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            FinishOnDrop::new(flag_after(Duration::ZERO, done.clone()), &d),
        )
        .await
        .expect("completes");
        assert_eq!(out, 7);
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(d.running(), 0);
        assert_eq!(d.abandoned.with_label_values(&["finished"]).get(), 0);
    }

    #[tokio::test]
    async fn a_future_dropped_unfinished_finishes_as_a_task() {
        let d = detached(1);
        let abandon = |flag: &Arc<AtomicBool>| {
            tokio::time::timeout(
                Duration::from_millis(20),
                FinishOnDrop::new(flag_after(Duration::from_millis(200), flag.clone()), &d),
            )
        };
        let done = Arc::new(AtomicBool::new(false));
        assert!(abandon(&done).await.is_err(), "the caller gives up first");
        assert!(!done.load(Ordering::SeqCst));
        assert_eq!(d.tracker.len(), 1);
        // Over the limit: a second abandoned future stops where it is.
        let other = Arc::new(AtomicBool::new(false));
        assert!(abandon(&other).await.is_err());
        assert_eq!(d.tracker.len(), 1);
        assert_eq!(d.abandoned.with_label_values(&["finished"]).get(), 1);
        assert_eq!(d.abandoned.with_label_values(&["cut_short"]).get(), 1);
        tokio::time::timeout(Duration::from_secs(10), d.wait())
            .await
            .expect("the rest finishes");
        assert!(done.load(Ordering::SeqCst));
        assert!(!other.load(Ordering::SeqCst));
    }

    /// The wait covers a push still in its caller's task: a caller that
    /// goes away after the wait began hands its rest over, and the wait
    /// ends once that is done.
    #[tokio::test]
    async fn the_wait_covers_pushes_still_in_their_callers_tasks() {
        let d = detached(1);
        let done = Arc::new(AtomicBool::new(false));
        let push = FinishOnDrop::new(flag_after(Duration::from_millis(100), done.clone()), &d);
        let wait = d.wait();
        tokio::pin!(wait);
        let early = tokio::time::timeout(Duration::from_millis(20), &mut wait).await;
        assert!(early.is_err(), "a push is still in its caller's task");
        drop(push);
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the rest finishes");
        assert!(done.load(Ordering::SeqCst));
        assert_eq!(d.abandoned.with_label_values(&["finished"]).get(), 1);
    }

    #[tokio::test]
    async fn a_future_that_panics_is_not_spawned_again() {
        let d = detached(1);
        let panics = async {
            panic!("a push that panics");
        };
        let caught = std::panic::AssertUnwindSafe(FinishOnDrop::new(panics, &d));
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            futures::FutureExt::catch_unwind(caught),
        )
        .await
        .expect("polled");
        assert!(out.is_err(), "the panic reaches the caller");
        assert_eq!(d.running(), 0);
        assert_eq!(d.abandoned.with_label_values(&["finished"]).get(), 0);
    }
}
