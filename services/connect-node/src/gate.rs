//! Reads a connection's socket only when it may have something to read.
//!
//! A connection's task wakes once for every frame queued to it, and its
//! loop polls every source it waits on each time: the socket's read side
//! too. Polling an idle WebSocket is not free: tungstenite prepares its
//! read buffer, asks the socket, finds nothing and registers the task
//! again, twice per delivered frame (the wake-up, then the poll that
//! parks the task). The gate hands the socket a waker of its own and polls
//! the socket only after that waker fired (the socket became readable or
//! writable) or after the last poll returned a frame (more may be
//! buffered); otherwise it answers `Pending` at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::task::{ArcWake, AtomicWaker, waker_ref};
use futures::{Stream, StreamExt};

/// The read gate of one connection. Poll it from one task.
#[derive(Debug)]
pub(crate) struct ReadGate {
    /// The socket's waker fired, or the last poll returned an item.
    woken: AtomicBool,
    /// The task to wake when the socket's waker fires.
    task: AtomicWaker,
}

impl ArcWake for ReadGate {
    fn wake_by_ref(gate: &Arc<Self>) {
        gate.woken.store(true, Ordering::Release);
        gate.task.wake();
    }
}

impl ReadGate {
    /// A gate that lets the first poll through.
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(ReadGate {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        })
    }

    /// `stream.poll_next`, when the stream may have an item.
    pub(crate) fn poll_next<S: Stream + Unpin>(
        self: &Arc<Self>,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Option<S::Item>> {
        // Registered before the flag is read: a wake-up from here on
        // reaches this task.
        self.task.register(cx.waker());
        if !self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = waker_ref(self);
        let polled = stream.poll_next_unpin(&mut Context::from_waker(&waker));
        if polled.is_ready() {
            self.woken.store(true, Ordering::Release);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the polls that reach the stream.
    struct Counted<S> {
        inner: S,
        polls: Arc<AtomicUsize>,
    }

    impl<S: Stream + Unpin> Stream for Counted<S> {
        type Item = S::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<S::Item>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.inner.poll_next_unpin(cx)
        }
    }

    struct Wakes(AtomicUsize);
    impl ArcWake for Wakes {
        fn wake_by_ref(w: &Arc<Self>) {
            w.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polls_the_stream_only_after_its_waker_fired_or_it_gave_an_item() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut stream = Counted {
            inner: tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            polls: polls.clone(),
        };
        let task = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = futures::task::waker(task.clone());
        let mut cx = Context::from_waker(&waker);
        let gate = ReadGate::new();

        // The first poll reaches the stream, which is empty.
        assert!(gate.poll_next(&mut stream, &mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Woken for something else (a queued frame): the stream is left alone.
        for _ in 0..3 {
            assert!(gate.poll_next(&mut stream, &mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // An item wakes the stream's waker, which wakes the task.
        tx.send(7).unwrap();
        tx.send(8).unwrap();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert_eq!(gate.poll_next(&mut stream, &mut cx), Poll::Ready(Some(7)));
        // After an item the stream is polled again without a wake-up.
        assert_eq!(gate.poll_next(&mut stream, &mut cx), Poll::Ready(Some(8)));
        assert!(gate.poll_next(&mut stream, &mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 4);
        assert!(gate.poll_next(&mut stream, &mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 4);

        // The end of the stream comes through the same way.
        drop(tx);
        assert_eq!(task.0.load(Ordering::SeqCst), 2);
        assert_eq!(gate.poll_next(&mut stream, &mut cx), Poll::Ready(None));
    }
}
