//! Large fan-outs written by several threads at once.
//!
//! While a node has time to spare (`Hub::deliver` decides), a frame for a
//! room is written straight to each member's socket by the fan-out (see
//! `direct`): one `writev` per member, with no task to wake. For a large
//! room that is many system calls in a row, so the members are
//! split into parts: the caller writes the first part itself while helper
//! threads write the others, and the fan-out returns once every part is
//! done. Returning only then keeps each connection's frames in order:
//! the next fan-out starts after this one has handed every frame over.
//!
//! The helpers are plain threads, one fewer than the parts (at most
//! [`MAX_PARTS`], and no more than the CPUs the process may use), started
//! with the first fan-out large enough to need them.

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::hub::{ConnHandle, Delivery, Outbound, Queued};

/// Most parts one fan-out is split into.
pub const MAX_PARTS: usize = 4;

/// Fewest connections a part is given: below this, handing a part to a
/// thread costs more than writing it here.
pub const MIN_PART: usize = 128;

/// What writing a frame to some connections did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Connections the frame was written or queued to, and those closed
    /// as slow consumers instead.
    pub delivery: Delivery,
    /// Bytes of the frame handed over, over every connection it reached.
    pub bytes: u64,
    /// Of those connections, the ones written to directly.
    pub direct: u64,
}

impl Tally {
    fn add(&mut self, other: Tally) {
        self.delivery.delivered += other.delivery.delivered;
        self.delivery.dropped += other.delivery.dropped;
        self.bytes += other.bytes;
        self.direct += other.direct;
    }
}

/// Offers `frame` to each of `conns`, in order (see `ConnHandle::offer`).
pub fn offer_all(conns: &[Arc<ConnHandle>], frame: &Outbound, may_write: bool) -> Tally {
    let mut t = Tally::default();
    for c in conns {
        match c.offer(frame, may_write) {
            q @ (Queued::Yes | Queued::Written) => {
                t.delivery.delivered += 1;
                t.direct += u64::from(q == Queued::Written);
                t.bytes += frame.wire_len(c.wire) as u64;
            }
            Queued::SlowConsumer => t.delivery.dropped += 1,
            Queued::Closed => {}
        }
    }
    t
}

type Job = Box<dyn FnOnce() + Send>;

/// The helper threads of large fan-outs.
pub struct Pool {
    parts: usize,
    /// The helpers' job queue, once they are started; `None` if they could
    /// not be (fan-outs then stay on the calling thread, without asking
    /// the system again each time).
    jobs: OnceLock<Option<mpsc::Sender<Job>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("parts", &self.parts)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool splitting fan-outs into at most `parts` parts (one: never).
    pub fn new(parts: usize) -> Self {
        Pool {
            parts: parts.clamp(1, MAX_PARTS),
            jobs: OnceLock::new(),
        }
    }

    /// A pool sized to the CPUs this process may use.
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// How many parts a fan-out to `n` connections is split into.
    pub fn parts_for(&self, n: usize) -> usize {
        (n / MIN_PART).clamp(1, self.parts)
    }

    fn jobs(&self) -> Option<&mpsc::Sender<Job>> {
        self.jobs.get_or_init(|| self.start_helpers()).as_ref()
    }

    /// Starts the helper threads; `None` (logged once) if the system
    /// refuses one.
    fn start_helpers(&self) -> Option<mpsc::Sender<Job>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 1..self.parts {
            let rx = rx.clone();
            let started = std::thread::Builder::new()
                .name(format!("fanout-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for a job.
                        let job = rx.lock().recv();
                        match job {
                            // A part that panics (a bug) loses its tally,
                            // which the caller reports; the helper stays.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = started {
                // The helpers started so far end when `tx` is dropped.
                tracing::warn!(error = %e, "cannot start a fan-out thread; fan-outs stay on one thread");
                return None;
            }
        }
        Some(tx)
    }

    /// Offers `frame` to every one of `conns`, in parts written at once
    /// when there are many; returns when every part is done.
    pub fn offer_all(&self, conns: Vec<Arc<ConnHandle>>, frame: &Outbound) -> Tally {
        let parts = self.parts_for(conns.len());
        let jobs = match parts {
            1 => None,
            _ => self.jobs(),
        };
        let Some(jobs) = jobs else {
            return offer_all(&conns, frame, true);
        };
        let chunk = conns.len().div_ceil(parts);
        let conns = Arc::new(conns);
        let (done_tx, done) = mpsc::channel();
        let mut parts = 0;
        for start in (chunk..conns.len()).step_by(chunk) {
            let (conns, frame, done_tx) = (conns.clone(), frame.clone(), done_tx.clone());
            let job: Job = Box::new(move || {
                let end = (start + chunk).min(conns.len());
                let _ = done_tx.send(offer_all(&conns[start..end], &frame, true));
            });
            parts += 1;
            if let Err(mpsc::SendError(job)) = jobs.send(job) {
                // No helper left: this thread writes that part too.
                job();
            }
        }
        drop(done_tx);
        let mut tally = offer_all(&conns[..chunk.min(conns.len())], frame, true);
        for _ in 0..parts {
            match done.recv() {
                Ok(t) => tally.add(t),
                Err(_) => {
                    tracing::error!("a fan-out thread stopped before its part was written");
                    break;
                }
            }
        }
        tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_grow_with_the_fan_out_up_to_the_pool() {
        let pool = Pool::new(3);
        assert_eq!(pool.parts_for(0), 1);
        assert_eq!(pool.parts_for(MIN_PART * 2 - 1), 1);
        assert_eq!(pool.parts_for(MIN_PART * 2), 2);
        assert_eq!(pool.parts_for(100_000), 3);
        assert_eq!(Pool::new(64).parts_for(100_000), MAX_PARTS);
        assert_eq!(Pool::new(0).parts_for(100_000), 1);
    }

    #[test]
    fn a_helper_outlives_a_part_that_panics() {
        // Two parts: one helper thread, so the second job runs only if the
        // helper survived the first.
        let pool = Pool::new(2);
        let jobs = pool.jobs().expect("helpers start");
        jobs.send(Box::new(|| panic!("a part that panics")))
            .expect("queued");
        let (tx, rx) = mpsc::channel();
        jobs.send(Box::new(move || {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        }))
        .expect("queued");
        let ran_on = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the helper ran the next part");
        assert_eq!(ran_on.as_deref(), Some("fanout-1"));
    }
}
