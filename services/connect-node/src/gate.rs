//! Polls a connection's socket and timers only when they may be ready.
//!
//! A connection's task wakes once for every frame queued to it, and its
//! loop polls every source it waits on each time. Polling an idle source
//! is not free: for the socket, tungstenite prepares its read buffer, asks
//! the socket, finds nothing and registers the task again; for a timer,
//! tokio checks the deadline and registers the task again. And it happens
//! twice per delivered frame (the wake-up, then the poll that parks the
//! task).
//!
//! A [`Gate`] is a waker of the connection's own, handed to those sources
//! instead of the task's: when one of them fires, the gate counts it and
//! wakes the task. Each source sits behind a [`Door`], which polls it only
//! if the gate fired since the source's last poll, or that poll returned
//! `Ready` (a stream may have more buffered); otherwise it answers
//! `Pending` at once. A source changed from outside (a timer reset) is
//! let through once with [`Door::open`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::task::{ArcWake, AtomicWaker, waker_ref};

/// The waker a connection's sources get. Poll its doors from one task.
#[derive(Debug)]
pub(crate) struct Gate {
    /// How many times a source fired.
    fired: AtomicU64,
    /// The task to wake when one does.
    task: AtomicWaker,
}

impl ArcWake for Gate {
    fn wake_by_ref(gate: &Arc<Self>) {
        gate.fired.fetch_add(1, Ordering::AcqRel);
        gate.task.wake();
    }
}

impl Gate {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Gate {
            fired: AtomicU64::new(0),
            task: AtomicWaker::new(),
        })
    }

    /// A door for one source, open for its first poll.
    pub(crate) fn door(self: &Arc<Self>) -> Door {
        Door {
            gate: self.clone(),
            seen: 0,
            open: true,
        }
    }
}

/// One source behind a [`Gate`].
#[derive(Debug)]
pub(crate) struct Door {
    gate: Arc<Gate>,
    /// `fired` at this source's last poll.
    seen: u64,
    /// The next poll goes through whatever the gate says.
    open: bool,
}

impl Door {
    /// `poll(cx)`, with the gate's waker in `cx`, when the source may be
    /// ready.
    pub(crate) fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Registered before the count is read: a source firing from here
        // on wakes this task.
        self.gate.task.register(cx.waker());
        let fired = self.gate.fired.load(Ordering::Acquire);
        if fired == self.seen && !self.open {
            return Poll::Pending;
        }
        // Read before the poll: a source firing during it changes the
        // count, so the next poll goes through too.
        self.seen = fired;
        let waker = waker_ref(&self.gate);
        let polled = poll(&mut Context::from_waker(&waker));
        self.open = polled.is_ready();
        polled
    }

    /// Lets the next poll through (the source was changed, e.g. a timer
    /// reset to a new deadline).
    pub(crate) fn open(&mut self) {
        self.open = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::atomic::AtomicUsize;

    /// Counts the polls that reach a stream.
    struct Counted<S> {
        inner: S,
        polls: Arc<AtomicUsize>,
    }

    impl<S: futures::Stream + Unpin> futures::Stream for Counted<S> {
        type Item = S::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<S::Item>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.inner.poll_next_unpin(cx)
        }
    }

    #[test]
    fn polls_a_source_only_after_the_gate_fired_or_it_gave_an_item() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut stream = Counted {
            inner: tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            polls: polls.clone(),
        };
        let (task, waker) = crate::wakes::Wakes::task();
        let mut cx = Context::from_waker(&waker);
        let gate = Gate::new();
        let mut door = gate.door();
        let mut next = |cx: &mut Context<'_>| door.poll(cx, |cx| stream.poll_next_unpin(cx));

        // The first poll reaches the stream, which is empty.
        assert!(next(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Woken for something else (a queued frame): the stream is left alone.
        for _ in 0..3 {
            assert!(next(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // An item wakes the stream's waker, which wakes the task.
        tx.send(7).unwrap();
        tx.send(8).unwrap();
        assert_eq!(task.count(), 1, "the task was woken");
        assert_eq!(next(&mut cx), Poll::Ready(Some(7)));
        // After an item the stream is polled again without a wake-up.
        assert_eq!(next(&mut cx), Poll::Ready(Some(8)));
        assert!(next(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 4);
        assert!(next(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 4);

        // The end of the stream comes through the same way.
        drop(tx);
        assert_eq!(task.count(), 2);
        assert_eq!(next(&mut cx), Poll::Ready(None));
    }

    #[tokio::test]
    async fn a_timer_behind_a_door_fires_and_a_reset_one_is_polled_again() {
        use std::time::Duration;
        let gate = Gate::new();
        let (mut socket, mut timer) = (gate.door(), gate.door());
        let sleep = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(sleep);
        let started = tokio::time::Instant::now();
        let quiet = std::future::poll_fn(|cx| socket.poll(cx, |_| Poll::<()>::Pending));
        let fired = async {
            tokio::select! {
                () = quiet => unreachable!("the socket stays quiet"),
                () = std::future::poll_fn(|cx| timer.poll(cx, |cx| sleep.as_mut().poll(cx))) => {}
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fired)
            .await
            .expect("the timer fired");
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "not before its deadline"
        );

        // A timer far off, polled once (its door then closed), reset to a
        // near deadline: it fires at the new one.
        let far = tokio::time::sleep(Duration::from_secs(600));
        tokio::pin!(far);
        let mut door = gate.door();
        let first =
            std::future::poll_fn(|cx| Poll::Ready(door.poll(cx, |cx| far.as_mut().poll(cx))));
        assert!(first.await.is_pending());
        let reset_at = tokio::time::Instant::now();
        far.as_mut().reset(reset_at + Duration::from_millis(30));
        door.open();
        let again = std::future::poll_fn(|cx| door.poll(cx, |cx| far.as_mut().poll(cx)));
        tokio::time::timeout(Duration::from_secs(10), again)
            .await
            .expect("the reset timer fired at its new deadline");
        assert!(
            reset_at.elapsed() >= Duration::from_millis(30),
            "not before its new deadline"
        );
    }
}
