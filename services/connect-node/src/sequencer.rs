//! In-order delivery per stream on this node. Pushes to one stream can be
//! in flight at once (several push-managers, concurrent calls), so their
//! batches may arrive here in any order. The controller tells, with each
//! message, the seq of the previous message of the stream it routed to this
//! node; a message whose predecessor has not been delivered yet waits for
//! it, at most [`MAX_WAIT`] (a predecessor whose batch failed never comes).
//!
//! When a stream's message has waited that long, the node asks the
//! stream's controller for what it is missing and
//! delivers it first, from the history, so that its clients' positions
//! never move past a message they did not get. Only what the history no
//! longer holds (or a controller that does not answer) leaves a gap, and
//! `connect_node_order_gaps_total{outcome="released"}` counts it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use barrage_protocol::StreamKey;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use barrage_proto::v1::HistoryQuery;

use crate::hub::{Hub, Outbound};

/// Longest a message waits for its predecessor.
pub const MAX_WAIT: Duration = Duration::from_secs(2);
/// Streams idle this long are forgotten (controllers know it, see
/// `ORDER_MEMORY`).
const IDLE: Duration = barrage_proto::ORDER_MEMORY;
/// Longest the node waits for the history that fills a gap.
const FILL_TIMEOUT: Duration = Duration::from_secs(2);

/// A message ready to go to the stream's local connections.
pub struct Ready {
    /// The stream.
    pub key: StreamKey,
    /// Position in it.
    pub seq: u64,
    /// The encoded frame.
    pub frame: Outbound,
    /// Users not to deliver to.
    pub exclude: Vec<String>,
}

struct Waiting {
    ready: Ready,
    since: Instant,
}

#[derive(Default)]
struct Order {
    epoch: u64,
    last: u64,
    seen: bool,
    /// Messages waiting, by the seq they follow.
    waiting: BTreeMap<u64, Waiting>,
    touched: Option<Instant>,
    /// The history that fills a gap has been asked for: the fill
    /// releases what waits once it has its answer.
    filling: bool,
}

/// Messages missing from a stream on this node: those after `from` up to
/// and including `to`, in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Gap {
    key: StreamKey,
    epoch: u64,
    from: u64,
    to: u64,
}

impl Order {
    /// Delivers everything now in order behind `last`.
    fn drain(&mut self, out: &mut Vec<Ready>) {
        while let Some(w) = self.waiting.remove(&self.last) {
            self.last = self.last.max(w.ready.seq);
            out.push(w.ready);
        }
    }

    /// Delivers `w`, taken from `waiting` without its predecessor (or
    /// after it came another way), then what follows it in order.
    fn pass(&mut self, w: Waiting, out: &mut Vec<Ready>) {
        self.seen = true;
        self.last = self.last.max(w.ready.seq);
        out.push(w.ready);
        self.drain(out);
    }
}

/// Per-stream delivery order of this node. A stream's admission and its
/// delivery to the hub happen under the stream's own lock, so two batches
/// of one stream cannot overtake each other between the two.
#[derive(Default)]
pub struct Sequencer {
    streams: Mutex<HashMap<String, Arc<Mutex<Order>>>>,
}

impl Sequencer {
    fn order(&self, stream: &str) -> Arc<Mutex<Order>> {
        self.streams
            .lock()
            .entry(stream.to_owned())
            .or_default()
            .clone()
    }

    /// Admits message `ready` (at `epoch`, after `prev`) and delivers what
    /// is now in order. Returns the connections `ready` itself was queued
    /// to; when it waits for its predecessor, the connections it would be
    /// queued to now (messages it releases count for their own pushes).
    pub fn deliver_in_order(
        &self,
        hub: &Hub,
        stream: &str,
        epoch: u64,
        prev: u64,
        ready: Ready,
    ) -> u32 {
        let order = self.order(stream);
        let mut o = order.lock();
        let (out, own) = Self::admit_locked(&mut o, epoch, prev, ready);
        let mut mine = None;
        for (i, r) in out.iter().enumerate() {
            let n = deliver(hub, r);
            if own == Some(i) {
                mine = Some(n);
            }
        }
        match mine {
            Some(n) => n,
            None => o.waiting.get(&prev).map_or(0, |w| {
                let exclude: HashSet<&str> = w.ready.exclude.iter().map(String::as_str).collect();
                hub.recipients(&w.ready.key, &exclude)
            }),
        }
    }

    /// Takes message `ready` (at `epoch`, after `prev`) and returns what can
    /// be delivered now, in order: nothing when it must wait for `prev`.
    pub fn admit(&self, stream: &str, epoch: u64, prev: u64, ready: Ready) -> Vec<Ready> {
        let order = self.order(stream);
        let mut o = order.lock();
        Self::admit_locked(&mut o, epoch, prev, ready).0
    }

    /// What can be delivered now, in order, and where `ready` is among it
    /// (`None`: it waits).
    fn admit_locked(
        o: &mut Order,
        epoch: u64,
        prev: u64,
        ready: Ready,
    ) -> (Vec<Ready>, Option<usize>) {
        o.touched = Some(Instant::now());
        if o.seen && o.epoch != epoch {
            // A new epoch: what waited belongs to the old one.
            let mut out: Vec<Ready> = std::mem::take(&mut o.waiting)
                .into_values()
                .map(|w| w.ready)
                .collect();
            o.epoch = epoch;
            o.last = 0;
            o.seen = prev == 0;
            if prev != 0 {
                o.waiting.insert(
                    prev,
                    Waiting {
                        ready,
                        since: Instant::now(),
                    },
                );
                return (out, None);
            }
            o.last = ready.seq;
            let own = out.len();
            out.push(ready);
            o.drain(&mut out);
            return (out, Some(own));
        }
        let seq = ready.seq;
        let in_order = prev == 0 || (o.seen && (o.last == prev || seq <= o.last));
        if !in_order {
            o.epoch = epoch;
            o.waiting.insert(
                prev,
                Waiting {
                    ready,
                    since: Instant::now(),
                },
            );
            return (Vec::new(), None);
        }
        o.epoch = epoch;
        o.seen = true;
        o.last = o.last.max(seq);
        let mut out = vec![ready];
        o.drain(&mut out);
        (out, Some(0))
    }

    fn all(&self) -> Vec<Arc<Mutex<Order>>> {
        self.streams.lock().values().cloned().collect()
    }

    fn forget_idle(&self, now: Instant) {
        self.streams.lock().retain(|_, o| {
            // A stream whose lock is held is busy delivering (a large
            // fan-out can take a while): not idle, and waiting for it
            // here would hold every other stream's delivery up.
            let Some(o) = o.try_lock() else {
                return true;
            };
            !o.waiting.is_empty() || o.touched.is_some_and(|t| now.duration_since(t) < IDLE)
        });
    }

    /// Delivers, in order, waiting messages whose predecessor has been
    /// delivered meanwhile (by a fill, or a release past it).
    fn behind_locked(o: &mut Order) -> Vec<Ready> {
        let mut out = Vec::new();
        while o.seen
            && o.waiting
                .first_key_value()
                .is_some_and(|(&prev, _)| prev <= o.last)
            && let Some((_, w)) = o.waiting.pop_first()
        {
            o.pass(w, &mut out);
        }
        out
    }

    /// Releases the first waiting message past its gap, and what follows
    /// it in order; later gaps stay for the next fill.
    fn release_first_locked(o: &mut Order) -> Vec<Ready> {
        let mut out = Vec::new();
        if let Some((_, w)) = o.waiting.pop_first() {
            o.pass(w, &mut out);
        }
        out
    }

    /// The gap to fill before messages that waited too long are released:
    /// the messages between the last delivered and the first waiting (of
    /// a stream this node has delivered nothing of in this epoch, from the
    /// epoch's start: the connections' skip rules and the clients' repeat
    /// checks drop what they already have).
    fn gap_locked(o: &Order, now: Instant) -> Option<Gap> {
        if o.filling {
            return None;
        }
        let (&prev, first) = o.waiting.first_key_value()?;
        let expired = o
            .waiting
            .values()
            .any(|w| now.duration_since(w.since) >= MAX_WAIT);
        if !expired || prev == 0 || (o.seen && prev <= o.last) {
            return None;
        }
        Some(Gap {
            key: first.ready.key.clone(),
            epoch: o.epoch,
            from: if o.seen { o.last } else { 0 },
            to: prev,
        })
    }

    /// Asks the controller for the messages of `gap`, delivers those it
    /// still has in order, then releases what waited for them.
    async fn fill(order: Arc<Mutex<Order>>, hub: Arc<Hub>, gap: Gap) {
        let key = gap.key.to_string();
        let mut query = HistoryQuery::new(key.clone(), Some((gap.epoch, gap.from)));
        query.gap_fill = true;
        let history = match hub.reporter().history_of(query, FILL_TIMEOUT).await {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(stream = %key, error = %e, "cannot fill a gap from the history");
                None
            }
        };
        let mut o = order.lock();
        o.filling = false;
        if o.epoch != gap.epoch {
            // A new epoch came meanwhile: what waited in the old one went
            // out with it, and the next round looks at the new one.
            return;
        }
        let mut out = Vec::new();
        if let Some(h) = history
            && h.recovered
            && h.epoch == gap.epoch
        {
            for m in &h.messages {
                let Some(body) = &m.body else { continue };
                if m.seq <= gap.from.max(o.last) || m.seq > gap.to {
                    continue;
                }
                let frame = hub.message_of(&key, gap.epoch, m.seq, body);
                o.seen = true;
                o.last = m.seq;
                out.push(Ready {
                    key: gap.key.clone(),
                    seq: m.seq,
                    frame,
                    exclude: Vec::new(),
                });
            }
        }
        let filled = out.len() as u64;
        let outcome = if o.seen && o.last >= gap.to {
            "filled"
        } else {
            "released"
        };
        hub.metrics().order_gaps.with_label_values(&[outcome]).inc();
        if filled > 0 {
            hub.metrics().gap_filled_messages.inc_by(filled);
        }
        o.drain(&mut out);
        out.extend(Self::behind_locked(&mut o));
        if outcome == "released" {
            // Past this gap only: a later one is filled in its turn.
            out.extend(Self::release_first_locked(&mut o));
        }
        for r in &out {
            deliver(&hub, r);
        }
    }

    /// Delivers released messages until `stop`.
    pub async fn run(self: Arc<Self>, hub: Arc<Hub>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            let now = Instant::now();
            for order in self.all() {
                let mut o = order.lock();
                if o.filling {
                    continue;
                }
                let behind = Self::behind_locked(&mut o);
                if let Some(gap) = Self::gap_locked(&o, now) {
                    o.filling = true;
                    tokio::spawn(Self::fill(order.clone(), hub.clone(), gap));
                }
                for r in &behind {
                    deliver(&hub, r);
                }
            }
            self.forget_idle(now);
        }
    }
}

/// Queues a ready message to its local connections; returns how many.
pub fn deliver(hub: &Hub, r: &Ready) -> u32 {
    let exclude: HashSet<&str> = r.exclude.iter().map(String::as_str).collect();
    hub.deliver(&r.key, &r.frame, &exclude).delivered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready(seq: u64) -> Ready {
        Ready {
            key: StreamKey::Broadcast,
            seq,
            frame: Outbound::control(format!("{seq}")),
            exclude: Vec::new(),
        }
    }

    fn seqs(v: &[Ready]) -> Vec<u64> {
        v.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn each_message_counts_its_own_recipients_whatever_the_arrival_order() {
        let hub = Hub::detached(8, &prometheus::Registry::new()).unwrap();
        let user = barrage_protocol::UserId::new("u").unwrap();
        let mut conns: Vec<_> = (0..3)
            .map(|_| hub.connect(user.clone(), &[], crate::hub::Wire::Json, None))
            .collect();
        let s = Sequencer::default();
        let msg = |seq: u64, exclude: &[&str]| Ready {
            key: StreamKey::User(user.clone()),
            seq,
            frame: Outbound::control(format!("{seq}")),
            exclude: exclude.iter().map(|u| (*u).to_owned()).collect(),
        };
        let mut received = || -> usize {
            conns
                .iter_mut()
                .map(|(_, rx, _)| std::iter::from_fn(|| rx.try_recv().ok()).count())
                .sum()
        };
        // 2 arrives before 1: it waits, and counts the 3 connections it
        // will be queued to.
        assert_eq!(s.deliver_in_order(&hub, "user:u", 1, 1, msg(2, &[])), 3);
        assert_eq!(received(), 0);
        // 1 releases 2, but counts only its own 3.
        assert_eq!(s.deliver_in_order(&hub, "user:u", 1, 0, msg(1, &[])), 3);
        assert_eq!(received(), 6);
        // A waiting message that excludes the user reaches nobody.
        assert_eq!(s.deliver_in_order(&hub, "user:u", 1, 3, msg(4, &["u"])), 0);
        assert_eq!(s.deliver_in_order(&hub, "user:u", 1, 2, msg(3, &[])), 3);
        assert_eq!(received(), 3);
    }

    #[test]
    fn out_of_order_arrivals_leave_in_order() {
        let s = Sequencer::default();
        assert_eq!(seqs(&s.admit("room:r", 7, 0, ready(1))), vec![1]);
        assert!(s.admit("room:r", 7, 3, ready(4)).is_empty());
        assert!(s.admit("room:r", 7, 2, ready(3)).is_empty());
        assert_eq!(seqs(&s.admit("room:r", 7, 1, ready(2))), vec![2, 3, 4]);
        // A replay of an old one goes through (clients drop it by id).
        assert_eq!(seqs(&s.admit("room:r", 7, 1, ready(2))), vec![2]);
        // A new epoch starts over.
        assert_eq!(seqs(&s.admit("room:r", 9, 0, ready(1))), vec![1]);
    }

    #[test]
    fn the_first_message_of_a_stream_can_arrive_second() {
        let s = Sequencer::default();
        assert!(s.admit("room:r", 7, 1, ready(2)).is_empty());
        assert_eq!(seqs(&s.admit("room:r", 7, 0, ready(1))), vec![1, 2]);
    }

    #[test]
    fn a_missing_predecessor_is_waited_for_then_each_gap_is_asked_for_in_turn() {
        let s = Sequencer::default();
        assert_eq!(seqs(&s.admit("room:r", 7, 0, ready(1))), vec![1]);
        // 2 and 4 never come.
        assert!(s.admit("room:r", 7, 2, ready(3)).is_empty());
        assert!(s.admit("room:r", 7, 4, ready(5)).is_empty());
        let order = s.order("room:r");
        let mut o = order.lock();
        assert_eq!(Sequencer::gap_locked(&o, Instant::now()), None);
        let later = Instant::now() + MAX_WAIT + Duration::from_millis(1);
        let gap = |from, to| Gap {
            key: StreamKey::Broadcast,
            epoch: 7,
            from,
            to,
        };
        assert_eq!(Sequencer::gap_locked(&o, later), Some(gap(1, 2)));
        // The history did not have 2: only 3 goes past that gap, and the
        // next gap is asked for in its turn, not passed.
        assert_eq!(seqs(&Sequencer::release_first_locked(&mut o)), vec![3]);
        assert_eq!(Sequencer::gap_locked(&o, later), Some(gap(3, 4)));
        // While a fill is under way, nothing else is asked.
        o.filling = true;
        assert_eq!(Sequencer::gap_locked(&o, later), None);
    }

    #[test]
    fn what_waited_behind_a_filled_gap_follows_it() {
        let s = Sequencer::default();
        assert_eq!(seqs(&s.admit("room:r", 7, 0, ready(1))), vec![1]);
        assert!(s.admit("room:r", 7, 3, ready(4)).is_empty());
        let order = s.order("room:r");
        let mut o = order.lock();
        assert!(Sequencer::behind_locked(&mut o).is_empty());
        // A fill delivered 2 and 3.
        o.last = 3;
        assert_eq!(seqs(&Sequencer::behind_locked(&mut o)), vec![4]);
        assert!(o.waiting.is_empty());
    }

    #[test]
    fn a_stream_new_here_is_filled_from_its_epochs_start() {
        let s = Sequencer::default();
        assert!(s.admit("room:r", 7, 2, ready(3)).is_empty());
        let later = Instant::now() + MAX_WAIT + Duration::from_millis(1);
        let o = s.order("room:r");
        let gap = Sequencer::gap_locked(&o.lock(), later).expect("a gap");
        assert_eq!((gap.epoch, gap.from, gap.to), (7, 0, 2));
    }
}
