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
//! that a draining push-manager waits for it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::task::TaskTracker;

/// Polls a future in place; if dropped before it is done, spawns the rest
/// of it on `tracker` (its output then goes unread).
pub struct FinishOnDrop<'a, F: Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    fut: Option<Pin<Box<F>>>,
    tracker: &'a TaskTracker,
}

impl<'a, F: Future + Send + 'static> FinishOnDrop<'a, F>
where
    F::Output: Send + 'static,
{
    /// Wraps `fut`; tasks for unfinished rests go on `tracker`.
    pub fn new(fut: F, tracker: &'a TaskTracker) -> Self {
        FinishOnDrop {
            fut: Some(Box::pin(fut)),
            tracker,
        }
    }
}

impl<F: Future + Send + 'static> Future for FinishOnDrop<'_, F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let Some(fut) = self.fut.as_mut() else {
            panic!("FinishOnDrop polled after it completed");
        };
        let out = std::task::ready!(fut.as_mut().poll(cx));
        self.fut = None;
        Poll::Ready(out)
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
        // Outside a runtime (it is shutting down) there is nowhere to go on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tracker.spawn_on(fut, &runtime);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;

    /// Sets its flag after `wait`.
    async fn flag_after(wait: Duration, flag: Arc<AtomicBool>) -> u32 {
        tokio::time::sleep(wait).await;
        flag.store(true, Ordering::SeqCst);
        7
    }

    #[tokio::test]
    async fn a_future_that_completes_in_place_leaves_no_task() {
        let tracker = TaskTracker::new();
        let done = Arc::new(AtomicBool::new(false));
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            FinishOnDrop::new(flag_after(Duration::ZERO, done.clone()), &tracker),
        )
        .await
        .expect("completes");
        assert_eq!(out, 7);
        assert!(done.load(Ordering::SeqCst));
        assert!(tracker.is_empty());
    }

    #[tokio::test]
    async fn a_future_dropped_unfinished_finishes_as_a_task() {
        let tracker = TaskTracker::new();
        let done = Arc::new(AtomicBool::new(false));
        let waited = tokio::time::timeout(
            Duration::from_millis(20),
            FinishOnDrop::new(
                flag_after(Duration::from_millis(200), done.clone()),
                &tracker,
            ),
        )
        .await;
        assert!(waited.is_err(), "the caller gives up first");
        assert!(!done.load(Ordering::SeqCst));
        assert_eq!(tracker.len(), 1);
        tracker.close();
        tokio::time::timeout(Duration::from_secs(10), tracker.wait())
            .await
            .expect("the rest finishes");
        assert!(done.load(Ordering::SeqCst));
    }
}
