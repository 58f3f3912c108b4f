//! Message streams: each key's epoch, sequence numbers and bounded
//! history, which is what makes recovery after a reconnect possible.
//!
//! History is bounded per stream (count and age, by stream kind) and
//! overall (a global cap that evicts the oldest messages first, counted).
//! Message ids are remembered as long as their message is retained, so a
//! retried push is recognised and not delivered twice.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;

use barrage_proto::v1::{HistoryQuery, HistoryResult, MessageBody, StoredMessage};
use tokio::time::Instant;

/// How much history one kind of stream keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Messages kept at most.
    pub max_messages: usize,
    /// Age after which a message is dropped.
    pub ttl: Duration,
}

/// Retention settings of a controller.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// `room:<id>` streams (default: last 200 messages, 1 hour).
    pub room: Retention,
    /// `user:<id>` streams (default: last 100 messages, 30 minutes).
    pub user: Retention,
    /// The `broadcast` stream (default: last 200 messages, 1 hour).
    pub broadcast: Retention,
    /// Messages kept over all streams; beyond it the oldest are evicted.
    pub max_total_messages: usize,
    /// Bytes of messages (their encoded bodies) kept over all streams;
    /// beyond it the oldest are evicted, as for `max_total_messages`. The
    /// message count alone does not bound memory when messages are large.
    pub max_total_bytes: usize,
    /// A stream with no message for this long forgets its position too
    /// (its next message starts a new epoch).
    pub idle_ttl: Duration,
    /// Streams kept at most. Beyond it, streams with no message left are
    /// forgotten before `idle_ttl` (as the sweep reaches them), so that
    /// pushes to ever new users or rooms do not grow the controller
    /// without bound. Streams with messages are bounded by
    /// `max_total_messages`.
    pub max_streams: usize,
    /// Bytes of messages one history answer (every stream of one
    /// connecting client) carries at most. A stream whose missed messages
    /// would not fit is answered `recovered: false`; offline messages that
    /// do not fit stay for the user's next connect. Well under
    /// [`barrage_proto::PEER_MESSAGE_LIMIT`], so the answer always reaches
    /// the connect-node.
    pub max_history_bytes: usize,
    /// Bytes of messages one history call (the queries of several
    /// connecting clients) carries at most: a client whose full
    /// `max_history_bytes` might not fit in what is left is deferred, and
    /// the node asks again. Half of [`barrage_proto::PEER_MESSAGE_LIMIT`].
    pub max_answer_bytes: usize,
}

/// [`StreamConfig::max_total_bytes`] by default: 256 MiB.
pub const MAX_TOTAL_BYTES: usize = 256 << 20;

/// [`StreamConfig::max_streams`] by default.
pub const MAX_STREAMS: usize = 1_000_000;

/// [`StreamConfig::max_history_bytes`] by default: 64 MiB.
pub const MAX_HISTORY_BYTES: usize = 64 << 20;

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            room: Retention {
                max_messages: 200,
                ttl: Duration::from_secs(3600),
            },
            user: Retention {
                max_messages: 100,
                ttl: Duration::from_secs(1800),
            },
            broadcast: Retention {
                max_messages: 200,
                ttl: Duration::from_secs(3600),
            },
            max_total_messages: 1_000_000,
            max_total_bytes: MAX_TOTAL_BYTES,
            idle_ttl: Duration::from_secs(24 * 3600),
            max_streams: MAX_STREAMS,
            max_history_bytes: MAX_HISTORY_BYTES,
            max_answer_bytes: barrage_proto::PEER_MESSAGE_LIMIT / 2,
        }
    }
}

/// Bytes a history answer spends on a message besides its encoded body, at
/// most: the body's tag and length (6), the seq (11), and the entry's own
/// tag and length (6).
const ANSWER_OVERHEAD: usize = 23;

impl StreamConfig {
    fn retention(&self, key: &str) -> Retention {
        if key.starts_with("user:") {
            self.user
        } else if key == "broadcast" {
            self.broadcast
        } else {
            self.room
        }
    }
}

#[derive(Debug)]
struct Stored {
    seq: u64,
    /// Place among the messages of every stream, in append order.
    order: u64,
    body: MessageBody,
    /// `body`'s encoded size, counted in [`Totals::bytes`].
    size: usize,
    at: Instant,
    /// Pushed to a user with no connection: handed out to every connect
    /// without a position until a connection has received it.
    offline: bool,
}

impl Stored {
    /// Bytes this message takes in a history answer, at most.
    fn answer_len(&self) -> usize {
        self.size + ANSWER_OVERHEAD
    }
}

/// What a stream remembers of a message id: the attempts to deliver it.
/// The first attempt is the push that appended it; a retry that finds it
/// not arrived somewhere starts another (a resend).
#[derive(Debug)]
struct IdEntry {
    seq: u64,
    /// When the attempt under way began, in milliseconds of the streams'
    /// clock; [`RECORDED`] once its result is recorded.
    since_ms: u64,
    /// The attempt under way or last recorded (0: the first). A record
    /// names the attempt it reports; only the latest one's is taken.
    attempt: u32,
    /// Connections the recorded attempts reached.
    delivered: u32,
    /// The nodes the attempt under way sends to (`None`: every node that
    /// hosts the key), or those the recorded one failed on (`None`: none).
    nodes: Option<Box<[String]>>,
}

/// `IdEntry::since_ms` of an attempt whose result is recorded.
const RECORDED: u64 = u64::MAX;
/// `IdEntry::since_ms` of a first attempt that records no result (a push
/// without the caller's id): a repeat is answered as if it had recorded
/// reaching 0 connections, and a record, should one come, is taken.
const UNTRACKED: u64 = u64::MAX - 1;

/// How a repeated message id is answered ([`Streams::repeat`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Repeat {
    /// The attempt a record of this answer's outcome must name.
    pub attempt: u32,
    /// Connections the recorded attempts reached.
    pub delivered: u32,
    /// The latest attempt has recorded its result.
    pub recorded: bool,
    /// An attempt is under way, begun this long ago, and not yet due to be
    /// sent again.
    pub under_way: Option<Duration>,
    /// Nodes to send the message to again now (this answer begins that
    /// attempt).
    pub resend: Vec<String>,
}

#[derive(Debug)]
struct Stream {
    epoch: u64,
    seq: u64,
    /// Last seq routed to each connect-node, when, and to which process
    /// of the node (`Membership::incarnation_of`), for in-order delivery
    /// there.
    routed: HashMap<String, Routed>,
    history: VecDeque<Stored>,
    ids: HashMap<String, IdEntry>,
    last_push: Instant,
}

/// The last message of a stream routed to one connect-node.
#[derive(Debug)]
struct Routed {
    seq: u64,
    at: Instant,
    incarnation: u64,
}

impl Stream {
    /// Puts the messages kept for the stream's user while offline in
    /// `out`, oldest first, while they fit `budget`; says whether some
    /// were left out (they wait for the next connect). With `receipts`
    /// (the node reports them) they stay kept until received, and `out`
    /// gives as the stream's position the one before the first of them: a
    /// client that stores it and connects again before it has them asks
    /// from there and gets them again. Without, handed out is received.
    fn hand_out_kept(
        &mut self,
        receipts: bool,
        budget: &mut usize,
        out: &mut HistoryResult,
    ) -> bool {
        let mut left_out = false;
        let mut first = None;
        for m in self.history.iter_mut().filter(|m| m.offline) {
            first.get_or_insert(m.seq);
            let size = m.answer_len();
            if size > *budget {
                left_out = true;
                break;
            }
            *budget -= size;
            m.offline = receipts;
            out.messages.push(StoredMessage {
                body: Some(m.body.clone()),
                seq: m.seq,
            });
        }
        if receipts && let Some(first) = first {
            out.seq = first - 1;
            out.awaits_receipt = !out.messages.is_empty();
        }
        left_out
    }

    /// Marks the offline messages up to `seq` received; says whether any
    /// after it are still to be.
    fn received(&mut self, seq: u64) -> bool {
        let mut waiting = false;
        for m in self.history.iter_mut().filter(|m| m.offline) {
            if m.seq <= seq {
                m.offline = false;
            } else {
                waiting = true;
            }
        }
        waiting
    }
}

/// Where a pushed message landed in its stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Stream epoch.
    pub epoch: u64,
    /// The message's sequence number.
    pub seq: u64,
    /// The id was seen before: not appended again (see [`Streams::repeat`]).
    pub duplicate: bool,
}

/// One query's answer from [`Streams::answer`].
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// What the node gets (`deferred` when the client must ask again).
    pub result: HistoryResult,
    /// Messages were left out for want of budget: the stream is answered
    /// not recovered, or a user's remaining offline messages wait for the
    /// next connect.
    pub left_out: bool,
}

/// What every history holds together, for the global caps.
#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    messages: usize,
    bytes: usize,
}

/// Fewest streams one [`Streams::sweep`] visits.
const SWEEP_MIN_STREAMS: usize = 1024;

/// Sweeps that visit every stream once, at the least: a message outlives
/// its age limit in memory by at most this many sweeps (never in what
/// recovery answers, which trims its stream first).
const SWEEP_ROUNDS: usize = 60;

/// Every stream a controller owns.
#[derive(Debug)]
pub struct Streams {
    cfg: StreamConfig,
    /// Indexed, so that a sweep can go on where the last one stopped.
    /// Keys are shared with `fronts`, which names a stream on every
    /// message that leaves its history.
    streams: IndexMap<Arc<str>, Stream>,
    /// Where the next sweep starts.
    sweep_cursor: usize,
    /// The oldest message of each stream that has one, by its place in
    /// append order: the global cap evicts from the first.
    fronts: BTreeMap<u64, Arc<str>>,
    /// Place of the next message appended.
    next_order: u64,
    total: Totals,
    evicted: u64,
    /// Streams forgotten before `idle_ttl` because there were more than
    /// `max_streams`.
    forgotten_over_cap: u64,
    last_epoch: u64,
    /// Where the clock of attempts (`IdEntry::since_ms`) starts.
    origin: Instant,
}

impl Streams {
    /// No streams yet.
    pub fn new(cfg: StreamConfig) -> Self {
        Streams {
            cfg,
            streams: IndexMap::new(),
            sweep_cursor: 0,
            fronts: BTreeMap::new(),
            next_order: 0,
            total: Totals::default(),
            evicted: 0,
            forgotten_over_cap: 0,
            last_epoch: 0,
            origin: Instant::now(),
        }
    }

    /// The settings these streams keep.
    pub fn config(&self) -> &StreamConfig {
        &self.cfg
    }

    /// A new epoch: distinct from every earlier one of this process and
    /// (being time-based) of earlier processes; below 2^53 for JavaScript.
    fn next_epoch(&mut self) -> u64 {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let candidate = (ms << 8) & ((1 << 53) - 1);
        self.last_epoch = candidate.max(self.last_epoch + 1);
        self.last_epoch
    }

    /// Appends `body` to `key`'s stream, or recognises a repeated id.
    /// `offline` marks a user message kept for the user's next connect.
    /// Its push records its result (see [`Streams::append_with`]).
    pub fn append(
        &mut self,
        key: &str,
        body: &MessageBody,
        offline: bool,
        now: Instant,
    ) -> Appended {
        self.append_with(key, body, offline, true, now)
    }

    /// [`Streams::append`], for a push that records its result
    /// (`tracked`: it carries the caller's message id) or not (its id was
    /// made up for it: a repeat of that id comes only after its answer, so
    /// it is never under way, and never sent again).
    pub fn append_with(
        &mut self,
        key: &str,
        body: &MessageBody,
        offline: bool,
        tracked: bool,
        now: Instant,
    ) -> Appended {
        self.trim(key, now);
        if !self.streams.contains_key(key) {
            let epoch = self.next_epoch();
            self.streams.insert(
                Arc::from(key),
                Stream {
                    epoch,
                    seq: 0,
                    routed: HashMap::new(),
                    history: VecDeque::new(),
                    ids: HashMap::new(),
                    last_push: now,
                },
            );
        }
        let retention = self.cfg.retention(key);
        let now_ms = self.clock_ms(now);
        let (_, shared_key, stream) = self.streams.get_full_mut(key).expect("inserted above");
        if !body.id.is_empty()
            && let Some(first) = stream.ids.get(&body.id)
        {
            return Appended {
                epoch: stream.epoch,
                seq: first.seq,
                duplicate: true,
            };
        }
        stream.seq += 1;
        stream.last_push = now;
        let seq = stream.seq;
        if retention.max_messages > 0 {
            stream.ids.insert(
                body.id.clone(),
                IdEntry {
                    seq,
                    since_ms: if tracked { now_ms } else { UNTRACKED },
                    attempt: 0,
                    delivered: 0,
                    nodes: None,
                },
            );
            let order = self.next_order;
            self.next_order += 1;
            let size = prost::Message::encoded_len(body);
            stream.history.push_back(Stored {
                seq,
                order,
                body: body.clone(),
                size,
                at: now,
                offline,
            });
            if stream.history.len() == 1 {
                self.fronts.insert(order, shared_key.clone());
            }
            self.total.messages += 1;
            self.total.bytes += size;
        }
        let epoch = stream.epoch;
        self.trim(key, now);
        self.enforce_global_cap();
        Appended {
            epoch,
            seq,
            duplicate: false,
        }
    }

    /// Milliseconds since these streams began (never [`RECORDED`] or
    /// [`UNTRACKED`]).
    fn clock_ms(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_millis() as u64).min(UNTRACKED - 1)
    }

    /// Answers a repeat of `message_id` in `key`'s stream, whose nodes are
    /// now `hosting`. Where it is due, the message is sent again (a new
    /// attempt): to the nodes the recorded attempt failed on; or, when the
    /// attempt under way has recorded nothing for `resend_after` (its
    /// push-manager stopped, or lost this controller's answer), to the
    /// nodes it was sending to. `None`: the caller never sends again.
    pub fn repeat(
        &mut self,
        key: &str,
        message_id: &str,
        hosting: Vec<String>,
        resend_after: Option<Duration>,
        now: Instant,
    ) -> Repeat {
        let now_ms = self.clock_ms(now);
        let Some(e) = self
            .streams
            .get_mut(key)
            .and_then(|s| s.ids.get_mut(message_id))
        else {
            return Repeat::default();
        };
        let mut r = Repeat {
            attempt: e.attempt,
            delivered: e.delivered,
            recorded: e.since_ms >= UNTRACKED,
            ..Repeat::default()
        };
        let Some(resend_after) = resend_after else {
            return r;
        };
        if !r.recorded {
            let age = Duration::from_millis(now_ms.saturating_sub(e.since_ms));
            if age < resend_after {
                r.under_way = Some(age);
                return r;
            }
        }
        let targets: Vec<String> = match &e.nodes {
            Some(only) => hosting.into_iter().filter(|n| only.contains(n)).collect(),
            None if r.recorded => Vec::new(),
            None => hosting,
        };
        if targets.is_empty() {
            return r;
        }
        e.attempt += 1;
        e.since_ms = now_ms;
        e.nodes = Some(targets.clone().into_boxed_slice());
        r.attempt = e.attempt;
        r.recorded = false;
        r.resend = targets;
        r
    }

    /// Records what attempt `attempt` of the message at `position`
    /// (epoch, seq; `None`: not checked) reached: `delivered` connections,
    /// failing on the nodes in `failed` (a retry sends it there again). A
    /// record of an earlier attempt, a second record of one, or one for
    /// another position (the stream began anew, at another controller) is
    /// ignored.
    pub fn complete(
        &mut self,
        key: &str,
        message_id: &str,
        position: Option<(u64, u64)>,
        attempt: u32,
        delivered: u32,
        failed: Vec<String>,
    ) {
        let Some(stream) = self.streams.get_mut(key) else {
            return;
        };
        let epoch = stream.epoch;
        if let Some(e) = stream.ids.get_mut(message_id)
            && position.is_none_or(|p| p == (epoch, e.seq))
            && e.attempt == attempt
            && e.since_ms != RECORDED
        {
            e.delivered = e.delivered.saturating_add(delivered);
            e.since_ms = RECORDED;
            e.nodes = (!failed.is_empty()).then(|| failed.into_boxed_slice());
        }
    }

    /// Drops the oldest message of `stream` (named `key`), keeping the
    /// totals and `fronts` in step.
    fn drop_front(
        key: &Arc<str>,
        stream: &mut Stream,
        total: &mut Totals,
        fronts: &mut BTreeMap<u64, Arc<str>>,
    ) {
        if let Some(old) = stream.history.pop_front() {
            stream.ids.remove(&old.body.id);
            total.messages -= 1;
            total.bytes -= old.size;
            fronts.remove(&old.order);
            if let Some(next) = stream.history.front() {
                fronts.insert(next.order, key.clone());
            }
        }
    }

    /// Applies the per-stream bounds to `key`.
    fn trim(&mut self, key: &str, now: Instant) {
        if let Some(i) = self.streams.get_index_of(key) {
            self.trim_index(i, now, false);
        }
    }

    /// Applies the per-stream bounds to the stream at `index`; true when
    /// the stream was forgotten (the last stream then takes its index).
    /// `sweeping`: over [`StreamConfig::max_streams`], a stream with no
    /// message left is forgotten once it has been quiet for its retention
    /// and for [`barrage_proto::ORDER_MEMORY`] (its order may still be
    /// named to nodes until then), by the sweep only: never as a push or
    /// a recovery touches it.
    fn trim_index(&mut self, index: usize, now: Instant, sweeping: bool) -> bool {
        let Some((key, stream)) = self.streams.get_index_mut(index) else {
            return false;
        };
        let retention = self.cfg.retention(key);
        while stream.history.len() > retention.max_messages {
            Self::drop_front(key, stream, &mut self.total, &mut self.fronts);
        }
        while stream
            .history
            .front()
            .is_some_and(|m| now.saturating_duration_since(m.at) > retention.ttl)
        {
            Self::drop_front(key, stream, &mut self.total, &mut self.fronts);
        }
        if !stream.history.is_empty() {
            return false;
        }
        let quiet = now.saturating_duration_since(stream.last_push);
        let idle = quiet > self.cfg.idle_ttl;
        let over_cap = sweeping
            && self.streams.len() > self.cfg.max_streams
            && quiet > retention.ttl.max(barrage_proto::ORDER_MEMORY);
        if idle || over_cap {
            self.streams.swap_remove_index(index);
            if !idle {
                self.forgotten_over_cap += 1;
            }
            return true;
        }
        false
    }

    fn enforce_global_cap(&mut self) {
        while self.total.messages > self.cfg.max_total_messages
            || self.total.bytes > self.cfg.max_total_bytes
        {
            let Some((&order, key)) = self.fronts.first_key_value() else {
                break;
            };
            let key = key.clone();
            match self.streams.get_mut(&key) {
                Some(stream) => {
                    Self::drop_front(&key, stream, &mut self.total, &mut self.fronts);
                    self.evicted += 1;
                }
                // Not reached: a forgotten stream leaves `fronts` with it.
                None => {
                    self.fronts.remove(&order);
                }
            }
        }
    }

    /// Applies age limits to quiet streams too: called once a second, with
    /// the state locked, so it does a bounded share of the work each time.
    /// It visits the next `SWEEP_MIN_STREAMS` streams, or a
    /// `SWEEP_ROUNDS`th of them when there are more, going on from where
    /// the last sweep stopped. Its cost follows the streams it visits and
    /// the messages it drops, never the history kept.
    pub fn sweep(&mut self, now: Instant) {
        let budget = (self.streams.len() / SWEEP_ROUNDS)
            .max(SWEEP_MIN_STREAMS)
            .min(self.streams.len());
        for _ in 0..budget {
            if self.sweep_cursor >= self.streams.len() {
                self.sweep_cursor = 0;
            }
            // A forgotten stream's index now holds another, unvisited one.
            if !self.trim_index(self.sweep_cursor, now, true) {
                self.sweep_cursor += 1;
            }
        }
    }

    /// Answers the recovery queries of one history call, which may be of
    /// several connecting clients (`client`), in query order. Each client
    /// has its own [`StreamConfig::max_history_bytes`]; a client is
    /// deferred, untouched, when that much might not fit in what is left of
    /// [`StreamConfig::max_answer_bytes`]. The first client is always
    /// answered. `receipts`: the asking node reports what its clients
    /// received (`HistoryRequest.receipts`), so messages kept for offline
    /// users stay kept until then.
    pub fn answer(
        &mut self,
        queries: &[HistoryQuery],
        receipts: bool,
        now: Instant,
    ) -> Vec<Answer> {
        let each = self.cfg.max_history_bytes;
        let total = self.cfg.max_answer_bytes.max(each);
        let mut clients: Vec<(u32, Vec<usize>)> = Vec::new();
        for (i, q) in queries.iter().enumerate() {
            match clients.iter_mut().find(|(c, _)| *c == q.client) {
                Some((_, idx)) => idx.push(i),
                None => clients.push((q.client, vec![i])),
            }
        }
        let mut out: Vec<Answer> = queries
            .iter()
            .map(|q| Answer {
                result: HistoryResult {
                    key: q.key.clone(),
                    deferred: true,
                    ..Default::default()
                },
                left_out: false,
            })
            .collect();
        let mut used = 0;
        for (_, idx) in clients {
            if used > 0 && used + each > total {
                continue;
            }
            let mut budget = each;
            for i in idx {
                let (result, left_out) =
                    self.history_within(&queries[i], receipts, now, &mut budget);
                out[i] = Answer { result, left_out };
            }
            used += each - budget;
        }
        out
    }

    /// Answers one recovery query with at most `budget` bytes of messages,
    /// taking what it uses from `budget` (one budget serves every query of
    /// an answer). Also says whether messages were left out for want of
    /// budget: the stream is then not recovered, or, for a user's offline
    /// messages, the rest stay offline for the next connect.
    fn history_within(
        &mut self,
        q: &HistoryQuery,
        receipts: bool,
        now: Instant,
        budget: &mut usize,
    ) -> (HistoryResult, bool) {
        self.trim(&q.key, now);
        let mut out = HistoryResult {
            key: q.key.clone(),
            recovered: true,
            ..Default::default()
        };
        let Some(stream) = self.streams.get_mut(q.key.as_str()) else {
            // Nothing was ever pushed here (or it was forgotten): a client
            // with a position has lost whatever that position referred to.
            // Only `0:0`, a stream that had no message when the client
            // looked, refers to nothing; `E:0` is the position before
            // messages kept in epoch E, which went with the stream.
            out.recovered = !q.has_position || (q.epoch == 0 && q.seq == 0);
            return (out, false);
        };
        out.epoch = stream.epoch;
        out.seq = stream.seq;
        let user = q.key.starts_with("user:");
        if !q.has_position {
            let left_out = user && stream.hand_out_kept(receipts, budget, &mut out);
            return (out, left_out);
        }
        // `0:0` is what a client holds for a stream that had no message when
        // it looked: everything since the stream's first message follows,
        // while the history still starts there.
        let from_the_start = q.epoch == 0 && q.seq == 0;
        if q.epoch != stream.epoch && !from_the_start {
            out.recovered = false;
            // What was kept for the user in this epoch still goes out.
            let left_out = user && stream.hand_out_kept(receipts, budget, &mut out);
            return (out, left_out);
        }
        // A client that holds a position has received everything up to it;
        // offline messages after it are handed out again until received.
        // (A node filling a gap holds no client's position.)
        let waiting = user && !q.gap_fill && stream.received(q.seq);
        if q.seq >= stream.seq {
            return (out, false);
        }
        let first = stream.history.front().map_or(stream.seq + 1, |m| m.seq);
        if q.seq + 1 < first {
            out.recovered = false;
            let left_out = user && stream.hand_out_kept(receipts, budget, &mut out);
            return (out, left_out);
        }
        let missed = || stream.history.iter().filter(|m| m.seq > q.seq);
        let size: usize = missed().map(Stored::answer_len).sum();
        if size > *budget {
            // All or nothing: a stream recovered in part would hide a gap.
            // What was kept for the user still goes out, as when the gap is
            // beyond the history, and the position given is before it, so
            // that the next connect does not count it as received.
            out.recovered = false;
            if user {
                stream.hand_out_kept(receipts, budget, &mut out);
            }
            return (out, true);
        }
        *budget -= size;
        out.messages = missed()
            .map(|m| StoredMessage {
                body: Some(m.body.clone()),
                seq: m.seq,
            })
            .collect();
        if waiting && !receipts {
            // A node that reports no receipts: handed out is received.
            stream.received(stream.seq);
        }
        out.awaits_receipt = waiting && receipts;
        (out, false)
    }

    /// A connection received the messages of user stream `key` up to
    /// `seq` in `epoch` (`SessionChange::RECEIVED`): those kept for the
    /// user while offline are no longer handed out.
    pub fn received(&mut self, key: &str, epoch: u64, seq: u64) {
        if let Some(stream) = self.streams.get_mut(key)
            && stream.epoch == epoch
        {
            stream.received(seq);
        }
    }

    /// Records that message `seq` of `key` goes to `nodes` at `now`;
    /// returns, per node, the seq of the previous message routed there (0:
    /// none). A message routed to a node longer ago than half of
    /// `ORDER_MEMORY` is not named: that node may have forgotten the stream
    /// and would hold this message for a predecessor it delivered long ago.
    /// Nor is one routed to an earlier process of the node (`incarnation`
    /// tells each node's process now): a node restarted under the same id
    /// never gets it.
    pub fn route(
        &mut self,
        key: &str,
        seq: u64,
        nodes: &[String],
        incarnation: impl Fn(&str) -> u64,
        now: Instant,
    ) -> Vec<u64> {
        let Some(stream) = self.streams.get_mut(key) else {
            return vec![0; nodes.len()];
        };
        let recent = barrage_proto::ORDER_MEMORY / 2;
        // Nodes routed to long ago (replaced pods among them) are dropped.
        stream
            .routed
            .retain(|_, r| now.saturating_duration_since(r.at) <= recent);
        nodes
            .iter()
            .map(|n| {
                let process = incarnation(n);
                let r = stream.routed.entry(n.clone()).or_insert(Routed {
                    seq: 0,
                    at: now,
                    incarnation: process,
                });
                let prev = if r.incarnation == process { r.seq } else { 0 };
                *r = Routed {
                    seq: prev.max(seq),
                    at: now,
                    incarnation: process,
                };
                prev
            })
            .collect()
    }

    /// Messages retained over all streams.
    pub fn total_messages(&self) -> usize {
        self.total.messages
    }

    /// Bytes of the messages kept over all streams (their encoded bodies).
    pub fn total_bytes(&self) -> usize {
        self.total.bytes
    }

    /// Messages evicted by the global cap so far.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Streams forgotten early because there were more than
    /// [`StreamConfig::max_streams`].
    pub fn forgotten_over_cap(&self) -> u64 {
        self.forgotten_over_cap
    }

    /// Streams with a position.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no stream has a position.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Forgets the streams `keep` rejects (keys this controller no longer owns).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        let total = &mut self.total;
        self.streams.retain(|k, s| {
            let kept = keep(k);
            if !kept {
                total.messages -= s.history.len();
                total.bytes -= s.history.iter().map(|m| m.size).sum::<usize>();
            }
            kept
        });
        let streams = &self.streams;
        self.fronts.retain(|_, k| streams.contains_key(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(id: &str) -> MessageBody {
        MessageBody {
            id: id.into(),
            event: "e".into(),
            content: format!("c-{id}"),
            ..Default::default()
        }
    }

    fn q(key: &str, pos: Option<(u64, u64)>) -> HistoryQuery {
        HistoryQuery::new(key, pos)
    }

    /// `q` answered on its own, as a connect-node asks for one client.
    fn history(s: &mut Streams, q: &HistoryQuery, now: Instant) -> HistoryResult {
        s.answer(std::slice::from_ref(q), true, now)
            .remove(0)
            .result
    }

    fn seqs(r: &HistoryResult) -> Vec<u64> {
        r.messages.iter().map(|m| m.seq).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn seq_increases_and_recovery_returns_what_was_missed() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let a = s.append("room:r", &body("m1"), false, now);
        let b = s.append("room:r", &body("m2"), false, now);
        let c = s.append("room:r", &body("m3"), false, now);
        assert_eq!((a.seq, b.seq, c.seq), (1, 2, 3));
        assert_eq!(a.epoch, c.epoch);
        let other = s.append("room:other", &body("x"), false, now);
        assert_eq!(other.seq, 1);
        assert_ne!(other.epoch, a.epoch, "every stream gets its own epoch");

        let r = history(&mut s, &q("room:r", Some((a.epoch, 1))), now);
        assert!(r.recovered);
        assert_eq!(seqs(&r), vec![2, 3]);
        assert_eq!((r.epoch, r.seq), (a.epoch, 3));
        let up_to_date = history(&mut s, &q("room:r", Some((a.epoch, 3))), now);
        assert!(up_to_date.recovered && up_to_date.messages.is_empty());
        let wrong_epoch = history(&mut s, &q("room:r", Some((a.epoch + 1, 1))), now);
        assert!(!wrong_epoch.recovered && wrong_epoch.messages.is_empty());
        let fresh = history(&mut s, &q("room:r", None), now);
        assert!(fresh.recovered && fresh.messages.is_empty());
        assert_eq!(fresh.seq, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_beyond_retention_is_not_recovered() {
        let mut cfg = StreamConfig::default();
        cfg.room.max_messages = 3;
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let mut epoch = 0;
        for i in 1..=5 {
            epoch = s
                .append("room:r", &body(&format!("m{i}")), false, now)
                .epoch;
        }
        assert_eq!(s.total_messages(), 3);
        assert!(!history(&mut s, &q("room:r", Some((epoch, 1))), now).recovered);
        let r = history(&mut s, &q("room:r", Some((epoch, 2))), now);
        assert!(r.recovered);
        assert_eq!(seqs(&r), vec![3, 4, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_expire_with_their_ttl() {
        let mut s = Streams::new(StreamConfig::default());
        let t0 = Instant::now();
        let a = s.append("user:u", &body("old"), false, t0);
        tokio::time::advance(Duration::from_secs(20 * 60)).await;
        s.append("user:u", &body("new"), false, Instant::now());
        tokio::time::advance(Duration::from_secs(11 * 60)).await;
        // 31 minutes for "old" (user TTL is 30), 11 for "new".
        s.sweep(Instant::now());
        assert_eq!(s.total_messages(), 1);
        let r = history(&mut s, &q("user:u", Some((a.epoch, 1))), Instant::now());
        assert!(r.recovered, "seq 2 is still there");
        assert_eq!(seqs(&r), vec![2]);
        assert!(!history(&mut s, &q("user:u", Some((a.epoch, 0))), Instant::now()).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_visits_a_bounded_share_and_the_next_goes_on() {
        let mut s = Streams::new(StreamConfig::default());
        let streams = 2 * SWEEP_MIN_STREAMS + 100;
        for i in 0..streams {
            s.append(
                &format!("user:u{i}"),
                &body(&format!("m{i}")),
                false,
                Instant::now(),
            );
        }
        // A quiet stream per user, each with one message past its age.
        tokio::time::advance(Duration::from_secs(31 * 60)).await;
        let now = Instant::now();
        s.sweep(now);
        assert_eq!(s.total_messages(), streams - SWEEP_MIN_STREAMS);
        s.sweep(now);
        assert_eq!(s.total_messages(), streams - 2 * SWEEP_MIN_STREAMS);
        s.sweep(now);
        assert_eq!(s.total_messages(), 0, "the third goes round to the rest");
        assert!(
            s.fronts.is_empty(),
            "no stream is left in the eviction order"
        );
        // Positions are kept until the idle TTL, then the streams go.
        assert_eq!(s.len(), streams);
        tokio::time::advance(Duration::from_secs(24 * 3600)).await;
        for _ in 0..3 {
            s.sweep(Instant::now());
        }
        assert_eq!(s.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_stream_cap_streams_with_no_message_left_are_forgotten() {
        let cfg = StreamConfig {
            max_streams: 3,
            user: Retention {
                max_messages: 100,
                ttl: Duration::from_secs(60),
            },
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let start = Instant::now();
        for u in 0..5 {
            s.append(&format!("user:old-{u}"), &body("m"), false, start);
        }
        // Emptied by their age but still within the order memory: kept.
        tokio::time::advance(Duration::from_secs(61)).await;
        s.sweep(Instant::now());
        assert_eq!((s.len(), s.forgotten_over_cap()), (5, 0));
        tokio::time::advance(barrage_proto::ORDER_MEMORY).await;
        let fresh = s.append("user:fresh", &body("f"), false, Instant::now());
        // A push to a stream over the cap forgets no other stream.
        assert_eq!(s.len(), 6);
        // The sweep forgets the quiet empty ones, though far from their 24
        // idle hours, while there are more streams than the cap; the one
        // with a message stays.
        s.sweep(Instant::now());
        assert_eq!(s.len(), 3);
        assert_eq!(s.forgotten_over_cap(), 3);
        let now = Instant::now();
        let r = history(&mut s, &q("user:fresh", Some((fresh.epoch, 0))), now);
        assert!(r.recovered);
        assert_eq!(seqs(&r), vec![1]);
        // Within the cap, an emptied stream keeps its position.
        s.sweep(now);
        assert_eq!((s.len(), s.forgotten_over_cap()), (3, 3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_keeps_the_eviction_order_of_kept_messages() {
        let mut s = Streams::new(StreamConfig::default());
        let t0 = Instant::now();
        s.append("user:old", &body("a"), false, t0);
        tokio::time::advance(Duration::from_secs(20 * 60)).await;
        s.append("user:new", &body("b"), false, Instant::now());
        tokio::time::advance(Duration::from_secs(11 * 60)).await;
        s.sweep(Instant::now());
        assert_eq!(s.total_messages(), 1);
        let fronts: Vec<&str> = s.fronts.values().map(|k| &**k).collect();
        assert_eq!(fronts, vec!["user:new"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_cap_evicts_the_oldest_and_counts_it() {
        let cfg = StreamConfig {
            max_total_messages: 4,
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let ra = s.append("room:a", &body("a1"), false, now);
        s.append("room:b", &body("b1"), false, now);
        s.append("room:a", &body("a2"), false, now);
        s.append("room:b", &body("b2"), false, now);
        s.append("room:c", &body("c1"), false, now);
        assert_eq!(s.total_messages(), 4);
        assert_eq!(s.evicted(), 1);
        // a1 was the oldest: recovering from before it fails, after it works.
        assert!(!history(&mut s, &q("room:a", Some((ra.epoch, 0))), now).recovered);
        assert_eq!(
            seqs(&history(&mut s, &q("room:a", Some((ra.epoch, 1))), now)),
            vec![2]
        );
    }

    fn big(id: &str) -> MessageBody {
        MessageBody {
            id: id.into(),
            content: "x".repeat(1000),
            ..Default::default()
        }
    }

    fn of_client(client: u32, mut q: HistoryQuery) -> HistoryQuery {
        q.client = client;
        q
    }

    #[tokio::test(start_paused = true)]
    async fn each_client_of_a_call_has_its_own_budget() {
        let size = prost::Message::encoded_len(&big("m1")) + ANSWER_OVERHEAD;
        let cfg = StreamConfig {
            max_history_bytes: 3 * size,
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let a = s.append("room:big", &big("m1"), false, now);
        s.append("room:big", &big("m2"), false, now);
        s.append("room:big", &big("m3"), false, now);
        let from_start = |c| of_client(c, q("room:big", Some((a.epoch, 0))));
        let answers = s.answer(&[from_start(0), from_start(1), from_start(0)], true, now);
        // Client 0 asked twice: its second query finds its budget spent.
        let shape: Vec<_> = answers
            .iter()
            .map(|a| (a.result.recovered, a.result.messages.len(), a.left_out))
            .collect();
        assert_eq!(
            shape,
            vec![(true, 3, false), (true, 3, false), (false, 0, true)]
        );
        assert!(answers.iter().all(|a| !a.result.deferred));
    }

    #[tokio::test(start_paused = true)]
    async fn clients_past_the_answer_cap_are_deferred_untouched() {
        let size = prost::Message::encoded_len(&big("m1")) + ANSWER_OVERHEAD;
        let cfg = StreamConfig {
            max_history_bytes: 2 * size,
            max_answer_bytes: 3 * size,
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let a = s.append("room:big", &big("m1"), false, now);
        s.append("room:big", &big("m2"), false, now);
        s.append("user:away", &big("o1"), true, now);
        let queries = [
            of_client(7, q("room:big", Some((a.epoch, 0)))),
            of_client(9, q("user:away", None)),
            of_client(9, q("broadcast", None)),
        ];
        // Client 7 used 2 of the 3: client 9's full budget might not fit.
        let answers = s.answer(&queries, true, now);
        assert_eq!(seqs(&answers[0].result), vec![1, 2]);
        assert!(!answers[0].result.deferred);
        for d in &answers[1..] {
            assert_eq!(
                d.result,
                HistoryResult {
                    key: d.result.key.clone(),
                    deferred: true,
                    ..Default::default()
                }
            );
        }
        assert_eq!(answers[1].result.key, "user:away");
        // Asked again on its own, client 9 gets its offline message.
        let again = s.answer(&queries[1..], true, now);
        assert!(again.iter().all(|a| !a.result.deferred));
        assert_eq!(again[0].result.messages.len(), 1);
        let seq = again[0].result.messages[0].seq;
        s.received("user:away", again[0].result.epoch, seq);
        assert!(
            s.answer(&queries[1..2], true, now)[0]
                .result
                .messages
                .is_empty()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_cap_evicts_the_oldest_across_streams() {
        let size = prost::Message::encoded_len(&big("a1"));
        let cfg = StreamConfig {
            max_total_bytes: 3 * size,
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let ra = s.append("room:a", &big("a1"), false, now);
        s.append("room:b", &big("b1"), false, now);
        s.append("room:a", &big("a2"), false, now);
        assert_eq!((s.total_bytes(), s.evicted()), (3 * size, 0));
        // A fourth would pass the cap: the oldest (a1) goes.
        s.append("room:b", &big("b2"), false, now);
        assert_eq!((s.total_messages(), s.total_bytes()), (3, 3 * size));
        assert_eq!(s.evicted(), 1);
        assert!(!history(&mut s, &q("room:a", Some((ra.epoch, 0))), now).recovered);
        assert_eq!(
            seqs(&history(&mut s, &q("room:a", Some((ra.epoch, 1))), now)),
            vec![2]
        );
        // A small message past the cap evicts the oldest too (b1).
        s.append("room:c", &body("c1"), false, now);
        assert_eq!(s.evicted(), 2);
        assert!(s.total_bytes() <= 3 * size);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_cap_evicts_the_oldest_after_per_stream_trims_too() {
        let cfg = StreamConfig {
            room: Retention {
                max_messages: 2,
                ttl: Duration::from_secs(3600),
            },
            max_total_messages: 4,
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let ra = s.append("room:a", &body("a1"), false, now);
        let rb = s.append("room:b", &body("b1"), false, now);
        s.append("room:b", &body("b2"), false, now);
        s.append("room:b", &body("b3"), false, now); // b1 goes: the stream keeps 2
        s.append("room:c", &body("c1"), false, now);
        assert_eq!((s.total_messages(), s.evicted()), (4, 0));
        s.append("room:c", &body("c2"), false, now);
        // Over the cap: a1 is the oldest message kept.
        assert_eq!((s.total_messages(), s.evicted()), (4, 1));
        assert!(!history(&mut s, &q("room:a", Some((ra.epoch, 0))), now).recovered);
        s.append("room:d", &body("d1"), false, now);
        // Then b2.
        assert_eq!(s.evicted(), 2);
        assert_eq!(
            seqs(&history(&mut s, &q("room:b", Some((rb.epoch, 2))), now)),
            vec![3]
        );
        assert!(!history(&mut s, &q("room:b", Some((rb.epoch, 1))), now).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ids_are_recognised_with_the_first_result() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let first = s.append("room:r", &body("same"), false, now);
        let again = s.append("room:r", &body("same"), false, now);
        assert!(again.duplicate);
        assert_eq!((again.epoch, again.seq), (first.epoch, first.seq));
        assert_eq!(
            s.repeat("room:r", "same", vec![], None, now),
            Repeat::default()
        );
        s.complete("room:r", "same", None, 0, 7, vec![]);
        let r = s.repeat("room:r", "same", vec!["n1".into()], None, now);
        assert_eq!((r.delivered, r.recorded), (7, true));
        assert_eq!(s.append("room:r", &body("other"), false, now).seq, 2);
        assert_eq!(s.total_messages(), 2);
    }

    /// Attempts of one id: a repeat is sent again where the last attempt
    /// failed, or everywhere once the attempt under way has recorded
    /// nothing for the wait; each resend is an attempt of its own, so
    /// concurrent retries do not all send it, and a late record of an
    /// earlier attempt changes nothing.
    #[tokio::test(start_paused = true)]
    async fn repeats_are_sent_again_once_per_attempt() {
        let mut s = Streams::new(StreamConfig::default());
        let wait = Some(Duration::from_secs(2));
        let hosting = || vec!["n1".to_owned(), "n2".to_owned()];
        let t0 = Instant::now();
        s.append("room:r", &body("m"), false, t0);
        // Under way: not sent again, however often asked.
        let r = s.repeat("room:r", "m", hosting(), wait, t0 + Duration::from_secs(1));
        assert_eq!(r.under_way, Some(Duration::from_secs(1)));
        assert!(r.resend.is_empty());
        // Nothing recorded for the wait: sent again to every hosting node,
        // once; the next repeat waits for that attempt.
        let t1 = t0 + Duration::from_secs(2);
        let r = s.repeat("room:r", "m", hosting(), wait, t1);
        assert_eq!((r.attempt, r.resend.clone()), (1, hosting()));
        let r = s.repeat("room:r", "m", hosting(), wait, t1);
        assert!(r.resend.is_empty() && r.under_way.is_some(), "{r:?}");
        // The first attempt's late record is ignored; the resend's counts.
        s.complete("room:r", "m", None, 0, 3, vec![]);
        assert!(!s.repeat("room:r", "m", hosting(), None, t1).recorded);
        s.complete("room:r", "m", None, 1, 2, vec!["n2".into()]);
        s.complete("room:r", "m", None, 1, 9, vec![]);
        let r = s.repeat("room:r", "m", hosting(), None, t1);
        assert_eq!((r.recorded, r.delivered), (true, 2));
        // Failed on n2: sent again there only, once.
        let r = s.repeat("room:r", "m", hosting(), wait, t1);
        assert_eq!((r.attempt, r.resend), (2, vec!["n2".to_owned()]));
        assert!(
            s.repeat("room:r", "m", hosting(), wait, t1)
                .under_way
                .is_some()
        );
        // That resend's push-manager stopped: after the wait, n2 again,
        // not n1, which the first attempt reached.
        let t2 = t1 + Duration::from_secs(2);
        let r = s.repeat("room:r", "m", hosting(), wait, t2);
        assert_eq!((r.attempt, r.resend), (3, vec!["n2".to_owned()]));
        s.complete("room:r", "m", None, 3, 1, vec![]);
        let r = s.repeat("room:r", "m", hosting(), wait, t2);
        assert_eq!((r.recorded, r.delivered, r.resend.len()), (true, 3, 0));
        // A node that no longer hosts the key is not sent to.
        s.append("room:q", &body("m"), false, t2);
        let r = s.repeat("room:q", "m", vec![], wait, t2 + Duration::from_secs(2));
        assert!(r.resend.is_empty() && r.under_way.is_none(), "{r:?}");
    }

    /// A record names the message's position: one for another epoch of
    /// the stream (the push was resolved by its former controller) or
    /// another message is ignored.
    #[tokio::test(start_paused = true)]
    async fn records_for_another_position_are_ignored() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let a = s.append("room:r", &body("m"), false, now);
        s.complete("room:r", "m", Some((a.epoch + 1, a.seq)), 0, 5, vec![]);
        s.complete("room:r", "m", Some((a.epoch, a.seq + 1)), 0, 5, vec![]);
        assert!(!s.repeat("room:r", "m", vec![], None, now).recorded);
        s.complete("room:r", "m", Some((a.epoch, a.seq)), 0, 5, vec![]);
        let r = s.repeat("room:r", "m", vec![], None, now);
        assert_eq!((r.recorded, r.delivered), (true, 5));
    }

    /// A push without the caller's id records no result: a repeat of its
    /// made-up id (taken from its answer) is a plain repeat, never under
    /// way and never sent again.
    #[tokio::test(start_paused = true)]
    async fn repeats_of_untracked_pushes_are_plain_repeats() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        s.append_with("room:r", &body("made-up"), false, false, now);
        let wait = Some(Duration::from_secs(1));
        for later in [Duration::ZERO, Duration::from_secs(60)] {
            let r = s.repeat("room:r", "made-up", vec!["n1".into()], wait, now + later);
            assert_eq!(
                (r.recorded, r.under_way, r.resend.len(), r.delivered),
                (true, None, 0, 0)
            );
        }
        // A record that comes anyway is taken.
        s.complete("room:r", "made-up", None, 0, 4, vec![]);
        assert_eq!(
            s.repeat("room:r", "made-up", vec![], wait, now).delivered,
            4
        );
    }

    /// A stream that keeps no history keeps no ids either: a repeat is a
    /// new message (what README says of a history size of 0).
    #[tokio::test(start_paused = true)]
    async fn without_history_a_repeated_id_is_a_new_message() {
        let mut s = Streams::new(StreamConfig {
            user: Retention {
                max_messages: 0,
                ttl: Duration::from_secs(60),
            },
            ..StreamConfig::default()
        });
        let now = Instant::now();
        let first = s.append("user:u", &body("same"), false, now);
        let again = s.append("user:u", &body("same"), false, now);
        assert!(!again.duplicate);
        assert_eq!(again.seq, first.seq + 1);
        // Rooms keep theirs.
        s.append("room:r", &body("same"), false, now);
        assert!(s.append("room:r", &body("same"), false, now).duplicate);
    }

    #[tokio::test(start_paused = true)]
    async fn offline_user_messages_are_handed_out_until_received() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let first = s.append("user:u", &body("while-away-1"), true, now);
        s.append("user:u", &body("seen"), false, now);
        s.append("user:u", &body("while-away-2"), true, now);
        let r = history(&mut s, &q("user:u", None), now);
        assert_eq!(seqs(&r), vec![1, 3]);
        assert!(r.awaits_receipt);
        // A client that starts from the position given asks for them again.
        assert_eq!((r.epoch, r.seq), (first.epoch, 0));
        // That connection died before it had them: the next one gets them.
        let again = history(&mut s, &q("user:u", None), now);
        assert_eq!(seqs(&again), vec![1, 3]);
        // A receipt of another epoch is not about these messages.
        s.received("user:u", first.epoch + 1, 3);
        assert_eq!(seqs(&history(&mut s, &q("user:u", None), now)), vec![1, 3]);
        // Received up to 1: only 3 is still handed out.
        s.received("user:u", first.epoch, 1);
        let rest = history(&mut s, &q("user:u", None), now);
        assert_eq!(seqs(&rest), vec![3]);
        s.received("user:u", first.epoch, 3);
        let none = history(&mut s, &q("user:u", None), now);
        assert!(none.messages.is_empty());
        assert!(!none.awaits_receipt);
    }

    #[tokio::test(start_paused = true)]
    async fn offline_messages_recovered_with_a_position_wait_for_their_receipt() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let first = s.append("user:u", &body("seen"), false, now);
        s.append("user:u", &body("while-away-1"), true, now);
        s.append("user:u", &body("while-away-2"), true, now);
        // A device that comes back with its position gets both…
        let r = history(&mut s, &q("user:u", Some((first.epoch, first.seq))), now);
        assert_eq!(seqs(&r), vec![2, 3]);
        assert!(r.awaits_receipt);
        // …and until it has received them, so does a new tab without one.
        assert_eq!(seqs(&history(&mut s, &q("user:u", None), now)), vec![2, 3]);
        // A position past a message says it was received.
        let later = history(&mut s, &q("user:u", Some((first.epoch, 2))), now);
        assert_eq!(seqs(&later), vec![3]);
        assert_eq!(seqs(&history(&mut s, &q("user:u", None), now)), vec![3]);
        let head = history(&mut s, &q("user:u", Some((first.epoch, 3))), now);
        assert!(head.messages.is_empty() && !head.awaits_receipt && head.recovered);
        assert!(history(&mut s, &q("user:u", None), now).messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_back_from_beyond_the_retention_still_gets_what_was_kept() {
        let cfg = StreamConfig {
            user: Retention {
                max_messages: 2,
                ..StreamConfig::default().user
            },
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let seen = s.append("user:u", &body("seen"), false, now);
        for text in ["away-1", "away-2", "away-3"] {
            s.append("user:u", &body(text), true, now);
        }
        // Its position is older than the history: not recovered, but the
        // two messages still kept for it come, from before the first.
        let r = history(&mut s, &q("user:u", Some((seen.epoch, seen.seq))), now);
        assert!(!r.recovered);
        assert_eq!(seqs(&r), vec![3, 4]);
        assert_eq!(r.seq, 2);
        assert!(r.awaits_receipt);
        // So does one whose epoch is gone.
        let other = history(&mut s, &q("user:u", Some((seen.epoch + 9, 1))), now);
        assert!(!other.recovered);
        assert_eq!(seqs(&other), vec![3, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_position_before_kept_messages_is_not_recovered_once_the_stream_is_gone() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let kept = s.append("user:u", &body("away"), true, now);
        // `connected` gives the position before the kept message: E:0.
        let r = history(&mut s, &q("user:u", None), now);
        assert_eq!((r.epoch, r.seq), (kept.epoch, 0));
        // The stream's owner restarted without it before the receipt: the
        // kept message is gone, and the client must be told.
        let mut restarted = Streams::new(StreamConfig::default());
        let back = history(&mut restarted, &q("user:u", Some((r.epoch, r.seq))), now);
        assert!(!back.recovered);
        // `0:0` (a stream that had no message) still refers to nothing lost.
        assert!(history(&mut restarted, &q("room:quiet", Some((0, 0))), now).recovered);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_fill_counts_nothing_as_received() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let kept = s.append("user:u", &body("away"), true, now);
        s.append("user:u", &body("live-1"), false, now);
        s.append("user:u", &body("live-2"), false, now);
        // A node fills the gap after live-1: it gets live-2 …
        let mut fill = q("user:u", Some((kept.epoch, 2)));
        fill.gap_fill = true;
        assert_eq!(seqs(&history(&mut s, &fill, now)), vec![3]);
        // … and the message kept for the user is still handed out.
        assert_eq!(seqs(&history(&mut s, &q("user:u", None), now)), vec![1]);
        // A client's position past it says it was received.
        history(&mut s, &q("user:u", Some((kept.epoch, 2))), now);
        assert!(history(&mut s, &q("user:u", None), now).messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_over_the_budget_still_hands_out_what_was_kept() {
        let size = prost::Message::encoded_len(&big("m1")) + ANSWER_OVERHEAD;
        let cfg = StreamConfig {
            max_history_bytes: 2 * size,
            ..StreamConfig::default()
        };
        let mut s = Streams::new(cfg);
        let now = Instant::now();
        let seen = s.append("user:u", &big("s1"), false, now);
        s.append("user:u", &big("l1"), false, now);
        for id in ["a1", "a2", "a3"] {
            s.append("user:u", &big(id), true, now);
        }
        // Four missed messages do not fit in two messages' budget.
        let answer = s
            .answer(&[q("user:u", Some((seen.epoch, seen.seq)))], true, now)
            .remove(0);
        let r = answer.result;
        assert!(!r.recovered && answer.left_out);
        // The kept ones go out as far as the budget goes, after a position
        // before them, so the next connect asks for the rest again.
        assert_eq!(seqs(&r), vec![3, 4]);
        assert_eq!(r.seq, 2);
        assert!(r.awaits_receipt);
        let next = history(&mut s, &q("user:u", Some((r.epoch, 4))), now);
        assert_eq!(seqs(&next), vec![5]);
    }

    #[tokio::test(start_paused = true)]
    async fn for_a_node_without_receipts_handed_out_is_received() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let first = s.append("user:u", &body("seen"), false, now);
        s.append("user:u", &body("away-1"), true, now);
        let old_node = |s: &mut Streams, pos: Option<(u64, u64)>| {
            s.answer(&[q("user:u", pos)], false, now).remove(0).result
        };
        let r = old_node(&mut s, None);
        assert_eq!(seqs(&r), vec![2]);
        assert!(!r.awaits_receipt);
        assert_eq!(r.seq, 2, "the stream's own position");
        assert!(old_node(&mut s, None).messages.is_empty());
        s.append("user:u", &body("away-2"), true, now);
        let r = old_node(&mut s, Some((first.epoch, 2)));
        assert_eq!(seqs(&r), vec![3]);
        assert!(!r.awaits_receipt);
        assert!(history(&mut s, &q("user:u", None), now).messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn room_recoveries_await_no_receipt() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let first = s.append("room:r", &body("1"), false, now);
        s.append("room:r", &body("2"), false, now);
        let r = history(&mut s, &q("room:r", Some((first.epoch, 0))), now);
        assert_eq!(seqs(&r), vec![1, 2]);
        assert!(!r.awaits_receipt);
    }

    #[tokio::test(start_paused = true)]
    async fn a_predecessor_routed_long_ago_is_not_named() {
        let mut s = Streams::new(StreamConfig::default());
        let t0 = Instant::now();
        let nodes = ["n1".to_string(), "n2".to_string()];
        let m1 = s.append("user:u", &body("1"), false, t0);
        assert_eq!(s.route("user:u", m1.seq, &nodes[..1], same, t0), vec![0]);
        let t1 = t0 + Duration::from_secs(60);
        let m2 = s.append("user:u", &body("2"), false, t1);
        assert_eq!(s.route("user:u", m2.seq, &nodes, same, t1), vec![1, 0]);
        // Past half of what a node remembers: n1 may have forgotten the
        // stream, so neither node is told to wait for a predecessor.
        let t2 = t1 + barrage_proto::ORDER_MEMORY / 2 + Duration::from_secs(1);
        let m3 = s.append("user:u", &body("3"), false, t2);
        assert_eq!(s.route("user:u", m3.seq, &nodes, same, t2), vec![0, 0]);
        let m4 = s.append("user:u", &body("4"), false, t2);
        assert_eq!(s.route("user:u", m4.seq, &nodes, same, t2), vec![3, 3]);
    }

    /// Every node runs the process it ran before.
    fn same(_: &str) -> u64 {
        1
    }

    #[tokio::test(start_paused = true)]
    async fn a_predecessor_routed_to_an_earlier_process_of_the_node_is_not_named() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let nodes = ["n1".to_string(), "n2".to_string()];
        let m1 = s.append("room:r", &body("1"), false, now);
        assert_eq!(s.route("room:r", m1.seq, &nodes, same, now), vec![0, 0]);
        // n1 restarted under the same id: its new process never saw m1.
        let restarted = |n: &str| if n == "n1" { 2 } else { 1 };
        let m2 = s.append("room:r", &body("2"), false, now);
        assert_eq!(
            s.route("room:r", m2.seq, &nodes, restarted, now),
            vec![0, 1]
        );
        let m3 = s.append("room:r", &body("3"), false, now);
        assert_eq!(
            s.route("room:r", m3.seq, &nodes, restarted, now),
            vec![2, 2]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retain_forgets_streams_and_their_messages() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        s.append("room:a", &body("1"), false, now);
        s.append("room:b", &body("2"), false, now);
        s.retain(|k| k == "room:b");
        assert_eq!((s.len(), s.total_messages()), (1, 1));
        let r = history(&mut s, &q("room:a", Some((1, 1))), now);
        assert!(!r.recovered);
    }

    #[test]
    fn a_position_taken_before_the_first_message_recovers_from_the_start() {
        let mut s = Streams::new(StreamConfig::default());
        let now = Instant::now();
        let empty = history(&mut s, &q("room:new", Some((0, 0))), now);
        assert!(empty.recovered && empty.messages.is_empty());
        for i in 0..3 {
            s.append("room:new", &body(&format!("m{i}")), false, now);
        }
        let r = history(&mut s, &q("room:new", Some((0, 0))), now);
        assert!(r.recovered);
        assert_eq!(
            r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        // Another epoch than 0 still has to match.
        assert!(!history(&mut s, &q("room:new", Some((r.epoch + 1, 0))), now).recovered);
    }

    proptest::proptest! {
        /// Whatever is appended, the counts, the eviction order and the
        /// bounds agree with the histories, and every eviction takes the
        /// oldest message kept.
        #[test]
        fn bookkeeping_follows_the_histories(
            ops in proptest::collection::vec((0u8..5, proptest::bool::ANY), 1..300),
        ) {
            let cfg = StreamConfig {
                room: Retention { max_messages: 3, ttl: Duration::from_secs(3600) },
                user: Retention { max_messages: 2, ttl: Duration::from_secs(3600) },
                max_total_messages: 7,
                ..StreamConfig::default()
            };
            let mut s = Streams::new(cfg);
            let now = Instant::now();
            for (i, (stream, user)) in ops.into_iter().enumerate() {
                let key = if user { format!("user:{stream}") } else { format!("room:{stream}") };
                let oldest = s.fronts.first_key_value().map(|(o, _)| *o);
                let evicted = s.evicted();
                s.append(&key, &body(&format!("m{i}")), false, now);
                let kept: usize = s.streams.values().map(|st| st.history.len()).sum();
                proptest::prop_assert_eq!(kept, s.total_messages());
                let bytes: usize = s
                    .streams
                    .values()
                    .flat_map(|st| st.history.iter())
                    .map(|m| prost::Message::encoded_len(&m.body))
                    .sum();
                proptest::prop_assert_eq!(bytes, s.total_bytes());
                proptest::prop_assert!(s.total_messages() <= 7);
                let fronts: BTreeMap<u64, Arc<str>> = s
                    .streams
                    .iter()
                    .filter_map(|(k, st)| st.history.front().map(|m| (m.order, k.clone())))
                    .collect();
                proptest::prop_assert_eq!(&fronts, &s.fronts);
                if s.evicted() > evicted {
                    let oldest = oldest.expect("something was kept");
                    let still_there = s
                        .streams
                        .values()
                        .any(|st| st.history.iter().any(|m| m.order == oldest));
                    proptest::prop_assert!(!still_there, "the oldest went first");
                }
            }
        }
    }
}
