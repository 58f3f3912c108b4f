//! A connection's send queue: bounded, filled by any fan-out, drained by
//! the connection's task.
//!
//! A connect-node holds one per connection, so what one costs counts
//! twice: in memory, for every idle connection, and in CPU, once per
//! delivered frame. A tokio bounded channel allocates its first block of
//! 32 slots and its cache-padded cursors up front (about 1 KiB per
//! connection, whether or not a frame ever waits), and takes a permit from
//! a semaphore and publishes a slot per frame. This queue is a
//! `VecDeque` behind a lock that is never contended for long (a push or a
//! pop), empty until a frame waits, and the task is woken only when the
//! queue goes from empty to not empty: the task drains it before it
//! parks again.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use parking_lot::Mutex;

/// A queue that grew past this many slots gives them back once empty.
const KEEP_SLOTS: usize = 32;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// The receiving task, woken when the queue stops being empty or a
    /// side goes away.
    task: AtomicWaker,
    capacity: usize,
}

struct State<T> {
    items: VecDeque<T>,
    sender_gone: bool,
    receiver_gone: bool,
}

/// Creates a queue holding at most `capacity` items (at least one).
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            sender_gone: false,
            receiver_gone: false,
        }),
        task: AtomicWaker::new(),
        capacity: capacity.max(1),
    });
    (Sender(shared.clone()), Receiver(shared))
}

/// Why [`Sender::try_send`] did not queue its item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError {
    /// The queue holds `capacity` items.
    #[error("the queue is full")]
    Full,
    /// The receiver is gone.
    #[error("the receiver is gone")]
    Closed,
}

/// Why [`Receiver::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    /// Nothing is queued now.
    #[error("the queue is empty")]
    Empty,
    /// Nothing is queued and the sender is gone.
    #[error("the sender is gone")]
    Disconnected,
}

/// The filling side. Dropping it ends the queue once it is drained.
pub struct Sender<T>(Arc<Shared<T>>);

impl<T> Sender<T> {
    /// Queues `item` without waiting.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError> {
        let mut st = self.0.state.lock();
        if st.receiver_gone {
            return Err(TrySendError::Closed);
        }
        if st.items.len() >= self.0.capacity {
            return Err(TrySendError::Full);
        }
        let was_empty = st.items.is_empty();
        st.items.push_back(item);
        drop(st);
        if was_empty {
            self.0.task.wake();
        }
        Ok(())
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.0.state.lock().items.len()
    }

    /// Wakes the receiving task without queueing anything (it has other
    /// work: see `direct::Way`).
    pub fn wake(&self) {
        self.0.task.wake();
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most items the queue holds.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.state.lock().sender_gone = true;
        self.0.task.wake();
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

/// The draining side, for one task.
pub struct Receiver<T>(Arc<Shared<T>>);

impl<T> Receiver<T> {
    /// The next item, if one is queued now.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut st = self.0.state.lock();
        match st.items.pop_front() {
            Some(item) => {
                if st.items.is_empty() && st.items.capacity() > KEEP_SLOTS {
                    st.items = VecDeque::new();
                }
                Ok(item)
            }
            None if st.sender_gone => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next item; `Ready(None)` once the queue is drained and the
    /// sender is gone.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        // Registered before the queue is looked at: an item queued after
        // the look wakes this task.
        self.0.task.register(cx.waker());
        match self.try_recv() {
            Ok(item) => Poll::Ready(Some(item)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        }
    }

    /// Whether nothing is queued now.
    pub fn is_empty(&self) -> bool {
        self.0.state.lock().items.is_empty()
    }

    /// The next item, waiting for one; `None` once the queue is drained and
    /// the sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock();
        st.receiver_gone = true;
        // Frames nobody will write are freed now, not with the last sender.
        st.items = VecDeque::new();
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_refuses_past_capacity() {
        let (tx, mut rx) = channel(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert_eq!(tx.try_send(3), Err(TrySendError::Full));
        assert_eq!((tx.len(), tx.capacity()), (3, 3));
        assert_eq!(rx.try_recv(), Ok(0));
        tx.try_send(3).unwrap();
        let got: Vec<i32> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        assert!(tx.is_empty());
    }

    #[test]
    fn wakes_the_task_when_the_queue_stops_being_empty() {
        let (tx, mut rx) = channel(8);
        let (wakes, waker) = crate::wakes::Wakes::task();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        tx.try_send(1).unwrap();
        assert_eq!(wakes.count(), 1);
        // Not empty: the task, already woken, will drain it.
        tx.try_send(2).unwrap();
        assert_eq!(wakes.count(), 1);
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(1)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some(2)));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        tx.try_send(3).unwrap();
        assert_eq!(wakes.count(), 2);
    }

    #[test]
    fn a_gone_sender_ends_the_queue_after_what_it_queued() {
        let (tx, mut rx) = channel(8);
        let (wakes, waker) = crate::wakes::Wakes::task();
        let mut cx = Context::from_waker(&waker);
        tx.try_send("last").unwrap();
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(Some("last")));
        assert_eq!(rx.poll_recv(&mut cx), Poll::Pending);
        drop(tx);
        assert_eq!(wakes.count(), 1, "the drop wakes the task");
        assert_eq!(rx.poll_recv(&mut cx), Poll::Ready(None));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn a_gone_receiver_refuses_and_frees_what_was_queued() {
        let (tx, rx) = channel(8);
        let item = Arc::new(());
        tx.try_send(item.clone()).unwrap();
        assert_eq!(Arc::strong_count(&item), 2);
        drop(rx);
        assert_eq!(
            Arc::strong_count(&item),
            1,
            "queued items freed with the receiver"
        );
        assert_eq!(tx.try_send(item.clone()), Err(TrySendError::Closed));
    }

    #[test]
    fn gives_back_the_slots_of_a_burst_once_drained() {
        let (tx, mut rx) = channel(1_000);
        for i in 0..500 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.0.state.lock().items.capacity(), 0);
        // A small steady backlog keeps its slots.
        for i in 0..4 {
            tx.try_send(i).unwrap();
        }
        while rx.try_recv().is_ok() {}
        assert!(rx.0.state.lock().items.capacity() >= 4);
    }

    #[tokio::test]
    async fn recv_waits_for_an_item_from_another_task() {
        let (tx, mut rx) = channel(4);
        let sender = tokio::spawn(async move {
            tokio::task::yield_now().await;
            tx.try_send(7).unwrap();
            tx
        });
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await;
        assert_eq!(got.expect("an item within 10 s"), Some(7));
        drop(sender.await.unwrap());
        let end = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await;
        assert_eq!(end.expect("the end within 10 s"), None);
    }
}
