//! Coalescing of concurrent calls to one peer.
//!
//! Every push makes one call to the controller owning its target and one
//! to each connect-node hosting it. Under load most of a push-manager's CPU
//! goes into the gRPC machinery of those calls, not into what they carry,
//! and both peers take many items per call (`ResolveBatch`,
//! `PushMessageBatch`). A [`Coalescer`] sends each item at once while fewer
//! than `max_in_flight` calls to its peer are under way; when all of them
//! are, items queue, and the next free slot takes everything queued (up to
//! `max_batch`) in one call. A lone push is never held back to wait for
//! company: batches form only from pushes that would otherwise wait anyway.
//!
//! A call made while a slot is free and nothing is queued goes out from the
//! caller's own task, with no hand-over. Results come back one per item, in order; a failed call fails every item
//! it carried, with the same error. An item whose caller stopped waiting
//! before it was sent is never sent.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Semaphore, mpsc, oneshot};

/// One queued item: what to send, where its result goes, and the span of
/// the push it belongs to (a batch carries the trace context of its first).
type Queued<T, R> = (T, oneshot::Sender<Result<R, String>>, tracing::Span);

/// How a [`Coalescer`] batches.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Calls to the peer under way at once; items queue behind them.
    pub max_in_flight: usize,
    /// Most items in one call.
    pub max_items: usize,
    /// Most bytes (by the coalescer's `weigh`) in one call; an item larger
    /// than this goes alone.
    pub max_bytes: usize,
}

/// Whether a peer serves a batch call (`ResolveBatch`, `CompleteBatch`),
/// as far as it has said. Until it has served one, a caller keeps a copy
/// of what it sends, to send it item by item should the peer not know the
/// call; once the peer said so, the caller sends item by item at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BatchCall {
    /// Not asked yet (or the peer stopped serving it).
    Unknown = 0,
    /// The peer answered a batch call.
    Served = 1,
    /// The peer answered UNIMPLEMENTED.
    Unimplemented = 2,
}

/// A [`BatchCall`] shared by calls that run at once.
#[derive(Debug, Default)]
pub struct SharedBatchCall(std::sync::atomic::AtomicU8);

impl SharedBatchCall {
    /// What the peer said last.
    pub fn get(&self) -> BatchCall {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => BatchCall::Served,
            2 => BatchCall::Unimplemented,
            _ => BatchCall::Unknown,
        }
    }

    /// Records what the peer said.
    pub fn set(&self, b: BatchCall) {
        self.0.store(b as u8, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A call to the peer with a batch of items.
type CallFn<T, R> =
    dyn Fn(Vec<T>) -> futures::future::BoxFuture<'static, Result<Vec<R>, String>> + Send + Sync;

/// Sends items to one peer, merging those that queue behind busy calls.
pub struct Coalescer<T, R> {
    tx: mpsc::UnboundedSender<Queued<T, R>>,
    slots: Arc<Semaphore>,
    /// Items handed to the driver and not yet sent or dropped.
    pending: Arc<AtomicUsize>,
    call: Arc<CallFn<T, R>>,
    items: prometheus::Histogram,
}

impl<T, R> Coalescer<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// A coalescer making calls with `call` within `limits`, an item's size
    /// given by `weigh`, the number of items of each call observed on
    /// `items`. `call` answers one result per item, in order, or one error
    /// for all. Its driver task ends when the coalescer is dropped and the
    /// queue is empty.
    pub fn new<F, Fut>(
        limits: BatchLimits,
        weigh: fn(&T) -> usize,
        items: prometheus::Histogram,
        call: F,
    ) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<R>, String>> + Send + 'static,
    {
        let call: Arc<CallFn<T, R>> = Arc::new(move |batch| Box::pin(call(batch)));
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued<T, R>>();
        let slots = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
        let pending = Arc::new(AtomicUsize::new(0));
        let driver = {
            let (slots, pending, call, items) =
                (slots.clone(), pending.clone(), call.clone(), items.clone());
            async move {
                // An item that did not fit the last batch opens the next.
                let mut held: Option<Queued<T, R>> = None;
                loop {
                    let first = match held.take() {
                        Some(q) => q,
                        None => match rx.recv().await {
                            Some(q) => q,
                            None => return,
                        },
                    };
                    let Ok(slot) = slots.clone().acquire_owned().await else {
                        return;
                    };
                    // Items whose caller stopped waiting (timed out,
                    // cancelled) are dropped unsent: the push already
                    // reported them failed.
                    if first.1.is_closed() {
                        pending.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    let span = first.2.clone();
                    let mut bytes = weigh(&first.0);
                    let mut payload = vec![first.0];
                    let mut waiters = vec![first.1];
                    while payload.len() < limits.max_items {
                        let Ok(q) = rx.try_recv() else { break };
                        if q.1.is_closed() {
                            pending.fetch_sub(1, Ordering::AcqRel);
                            continue;
                        }
                        let size = weigh(&q.0);
                        if bytes + size > limits.max_bytes {
                            held = Some(q);
                            break;
                        }
                        bytes += size;
                        payload.push(q.0);
                        waiters.push(q.1);
                    }
                    pending.fetch_sub(payload.len(), Ordering::AcqRel);
                    items.observe(payload.len() as f64);
                    let fut = span.in_scope(|| call(payload));
                    tokio::spawn(async move {
                        let result = fut.await;
                        drop(slot);
                        answer(waiters, result);
                    });
                }
            }
        };
        tokio::spawn(driver);
        Coalescer {
            tx,
            slots,
            pending,
            call,
            items,
        }
    }

    /// Sends `item` (alone or with others queued beside it) and waits for
    /// its result. With a free slot and nothing queued, the call is made
    /// right here, with no hand-over to the driver.
    pub async fn call(&self, item: T) -> Result<R, String> {
        if self.pending.load(Ordering::Acquire) == 0
            && let Ok(slot) = self.slots.clone().try_acquire_owned()
        {
            self.items.observe(1.0);
            let result = (self.call)(vec![item]).await;
            drop(slot);
            return per_item(result, 1).and_then(|r| {
                r.into_iter()
                    .next()
                    .ok_or_else(|| "the peer answered no result".to_owned())
            });
        }
        let (tx, rx) = oneshot::channel();
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.tx.send((item, tx, tracing::Span::current())).is_err() {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err("the channel to this peer was closed".to_owned());
        }
        rx.await
            .map_err(|_| "the call carrying this item was dropped".to_owned())?
    }
}

/// The results of a call carrying `items` items, one per item; a peer that
/// answered another number of results failed the whole call.
fn per_item<R>(result: Result<Vec<R>, String>, items: usize) -> Result<Vec<R>, String> {
    match result {
        Ok(results) if results.len() == items => Ok(results),
        Ok(results) => Err(format!(
            "the peer answered {} result(s) for {items} item(s)",
            results.len()
        )),
        Err(e) => Err(e),
    }
}

/// Hands each waiter its result, or the call's error.
fn answer<R>(waiters: Vec<oneshot::Sender<Result<R, String>>>, result: Result<Vec<R>, String>) {
    match per_item(result, waiters.len()) {
        Ok(results) => {
            for (w, r) in waiters.into_iter().zip(results) {
                let _ = w.send(Ok(r));
            }
        }
        Err(e) => {
            for w in waiters {
                let _ = w.send(Err(e.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures::future::join_all;
    use parking_lot::Mutex;

    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn histogram() -> prometheus::Histogram {
        prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("items", "items")).unwrap()
    }

    type Call = tokio::task::JoinHandle<Result<u32, String>>;

    /// `c.call(i)` in a task of its own.
    fn spawn_call(c: &Arc<Coalescer<u32, u32>>, i: u32) -> Call {
        let c = c.clone();
        tokio::spawn(async move { c.call(i).await })
    }

    /// Waits until the peer has been sent `n` calls.
    async fn until_calls(seen: &Mutex<Vec<Vec<u32>>>, n: usize) {
        tokio::time::timeout(WAIT, async {
            while seen.lock().len() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
    }

    /// What the spawned calls answered, in order.
    async fn results_of(calls: Vec<Call>) -> Vec<Result<u32, String>> {
        tokio::time::timeout(WAIT, join_all(calls))
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect()
    }

    /// Opens `gate` every few milliseconds, for every call as it arrives,
    /// until aborted.
    fn keep_opening(gate: Arc<tokio::sync::Notify>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                gate.notify_one();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }

    /// A coalescer over a peer that records the batches it was sent
    /// (`seen`) and answers each item doubled, after `gate` opens.
    struct Doubling {
        c: Arc<Coalescer<u32, u32>>,
        gate: Arc<tokio::sync::Notify>,
        seen: Arc<Mutex<Vec<Vec<u32>>>>,
    }

    fn doubling(max_in_flight: usize, max_batch: usize) -> Doubling {
        let limits = BatchLimits {
            max_in_flight,
            max_items: max_batch,
            max_bytes: 100,
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(tokio::sync::Notify::new());
        // An item weighs its value.
        let c = Coalescer::new(limits, |i| *i as usize, histogram(), {
            let (gate, seen) = (gate.clone(), seen.clone());
            move |items: Vec<u32>| {
                let (gate, seen) = (gate.clone(), seen.clone());
                async move {
                    seen.lock().push(items.clone());
                    gate.notified().await;
                    Ok(items.iter().map(|i| i * 2).collect())
                }
            }
        });
        Doubling {
            c: Arc::new(c),
            gate,
            seen,
        }
    }

    #[tokio::test]
    async fn a_lone_call_goes_out_at_once_and_gets_its_own_result() {
        let Doubling { c, gate, seen } = doubling(2, 64);
        gate.notify_one();
        let r = tokio::time::timeout(WAIT, c.call(21)).await.unwrap();
        assert_eq!(r, Ok(42));
        assert_eq!(*seen.lock(), vec![vec![21]]);
    }

    #[tokio::test]
    async fn calls_queued_behind_busy_slots_go_out_together_in_order() {
        let Doubling { c, gate, seen } = doubling(1, 64);
        // The first call takes the only slot and waits at the gate.
        let first = spawn_call(&c, 1);
        until_calls(&seen, 1).await;
        // These queue behind it.
        let rest: Vec<_> = (2..=6).map(|i| spawn_call(&c, i)).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        gate.notify_one();
        assert_eq!(
            tokio::time::timeout(WAIT, first).await.unwrap().unwrap(),
            Ok(2)
        );
        // The second call carries all five queued items.
        until_calls(&seen, 2).await;
        gate.notify_one();
        let results = results_of(rest).await;
        assert_eq!(results, vec![Ok(4), Ok(6), Ok(8), Ok(10), Ok(12)]);
        assert_eq!(*seen.lock(), vec![vec![1], vec![2, 3, 4, 5, 6]]);
    }

    #[tokio::test]
    async fn batches_are_capped_at_max_batch() {
        let Doubling { c, gate, seen } = doubling(1, 3);
        let calls: Vec<_> = (0..7).map(|i| spawn_call(&c, i)).collect();
        let opener = keep_opening(gate);
        let results = results_of(calls).await;
        opener.abort();
        assert_eq!(results, (0..7).map(|i| Ok(i * 2)).collect::<Vec<_>>());
        let seen = seen.lock();
        assert!(seen.iter().all(|b| b.len() <= 3), "{seen:?}");
        let all: Vec<u32> = seen.iter().flatten().copied().collect();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn batches_are_capped_in_bytes_and_an_oversized_item_goes_alone() {
        let Doubling { c, gate, seen } = doubling(1, 64);
        let first = spawn_call(&c, 1);
        until_calls(&seen, 1).await;
        // Queued behind the first: 60 + 30 fit in 100 bytes, 50 does not
        // fit beside them, 150 is over the cap on its own.
        let rest: Vec<_> = [60, 30, 50, 150, 5]
            .into_iter()
            .map(|i| spawn_call(&c, i))
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let opener = keep_opening(gate);
        assert_eq!(
            tokio::time::timeout(WAIT, first).await.unwrap().unwrap(),
            Ok(2)
        );
        let results = results_of(rest).await;
        opener.abort();
        assert_eq!(results, vec![Ok(120), Ok(60), Ok(100), Ok(300), Ok(10)]);
        assert_eq!(
            *seen.lock(),
            vec![vec![1], vec![60, 30], vec![50], vec![150], vec![5]]
        );
    }

    #[tokio::test]
    async fn an_item_whose_caller_gave_up_is_not_sent() {
        let Doubling { c, gate, seen } = doubling(1, 64);
        let first = spawn_call(&c, 1);
        until_calls(&seen, 1).await;
        // Queued behind the busy slot, then abandoned.
        let gave_up = tokio::time::timeout(Duration::from_millis(20), c.call(7)).await;
        assert!(gave_up.is_err());
        let waiting = spawn_call(&c, 8);
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.notify_one();
        assert_eq!(
            tokio::time::timeout(WAIT, first).await.unwrap().unwrap(),
            Ok(2)
        );
        until_calls(&seen, 2).await;
        gate.notify_one();
        assert_eq!(
            tokio::time::timeout(WAIT, waiting).await.unwrap().unwrap(),
            Ok(16)
        );
        assert_eq!(*seen.lock(), vec![vec![1], vec![8]]);
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_item_it_carried() {
        let calls = Arc::new(AtomicUsize::new(0));
        let limits = BatchLimits {
            max_in_flight: 4,
            max_items: 64,
            max_bytes: 1024,
        };
        let c = Coalescer::new(limits, |_| 1, histogram(), {
            let calls = calls.clone();
            move |items: Vec<u32>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if items.contains(&13) {
                        Err("Unavailable: node gone".to_owned())
                    } else {
                        // Too few results: a peer breaking the contract.
                        Ok(Vec::<u32>::new())
                    }
                }
            }
        });
        let r = tokio::time::timeout(WAIT, c.call(13)).await.unwrap();
        assert_eq!(r, Err("Unavailable: node gone".to_owned()));
        let r = tokio::time::timeout(WAIT, c.call(1)).await.unwrap();
        assert_eq!(
            r,
            Err("the peer answered 0 result(s) for 1 item(s)".to_owned())
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
