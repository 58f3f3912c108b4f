//! The connections a connect-node holds, indexed by room and user, and the
//! local half of a fan-out: one encoded frame handed to many send queues.
//!
//! The state is sharded by user. Every change to who is connected where is
//! reported to the owning controller *while its shard is write-locked*, and
//! a full state snapshot is taken with every shard read-locked, so it never
//! misses or double-counts a change in flight.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use barrage_proto::v1::{KeyState, session_change::Kind};
use barrage_protocol::binary::{self, Compression, FrameType};
use barrage_protocol::{
    CloseCode, MessageParts, RoomId, ServerFrame, StreamKey, UserId, encode_message,
};
use bytes::Bytes;
use parking_lot::{Mutex, RwLock, RwLockReadGuard};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;

use crate::batch::BatchCache;
use crate::direct::{Data, Sent, Way};
use crate::fanout::{self, Tally};
use crate::metrics::Metrics;
use crate::queue;
use crate::reporter::{Ack, Change, Reporter};
use crate::skip::Skip;

/// How long a connection checks live frames against what recovery sent
/// (or what `connected` started after): long past the time a push in
/// flight at connect can take to arrive (`PUSH_TIMEOUT_MS`, then the
/// sequencer's wait for a predecessor).
pub const SKIP_MEMORY: Duration = Duration::from_secs(30);
/// Id of a connection, unique within one connect-node process.
pub type ConnId = u64;

/// A frame in a connection's send queue: a pointer to the encoded frame,
/// which every recipient of a message shares (one reference count per
/// recipient, and a small queue slot per connection).
#[derive(Debug, Clone)]
pub struct Outbound(Arc<Frame>);

impl std::ops::Deref for Outbound {
    type Target = Frame;
    fn deref(&self) -> &Frame {
        &self.0
    }
}

/// An encoded frame. Message frames carry their stream position so a
/// connection recovering history can drop live copies of messages it
/// already sent.
#[derive(Debug)]
pub struct Frame {
    /// The JSON text frame, shared by every recipient (empty for a control
    /// frame queued to a binary connection).
    pub frame: Utf8Bytes,
    /// The `barrage.v1.bin` frame: encoded once for message frames, for the
    /// connection's format for control frames (empty for JSON connections).
    pub binary: Bytes,
    /// For message frames, the uncompressed protobuf body that binary
    /// batches are assembled from; empty otherwise.
    pub body: Bytes,
    /// `(stream, epoch, seq)` of a message frame; `None` for other frames.
    pub position: Option<(Arc<str>, u64, u64)>,
}

#[cfg(test)]
impl Outbound {
    /// Message `seq` of `stream` in `epoch`, with `content` as its data and
    /// `m<seq>` as its id, for tests.
    pub(crate) fn test_message(stream: &str, epoch: u64, seq: u64, content: &str) -> Outbound {
        Outbound::message(
            &MessageParts {
                stream,
                id: &format!("m{seq}"),
                epoch,
                seq,
                event: "",
                content,
                binary: &[],
                timestamp_ms: 0,
                from: "",
            },
            Compression::OFF,
        )
    }
}

impl Outbound {
    /// The address of the shared frame: the same for every clone of it.
    pub fn identity(&self) -> usize {
        Arc::as_ptr(&self.0) as usize
    }

    /// A reference to this frame that does not keep its contents alive.
    pub fn downgrade(&self) -> std::sync::Weak<Frame> {
        Arc::downgrade(&self.0)
    }

    /// Whether `weak` refers to this very frame (not merely equal content).
    pub fn is(&self, weak: &std::sync::Weak<Frame>) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.0), weak.as_ptr())
    }

    /// A JSON frame that is not a stream message (replies, errors).
    pub fn control(frame: impl Into<Utf8Bytes>) -> Self {
        Outbound(Arc::new(Frame {
            frame: frame.into(),
            binary: Bytes::new(),
            body: Bytes::new(),
            position: None,
        }))
    }

    /// A binary frame that is not a stream message.
    pub fn control_binary(frame: Bytes) -> Self {
        Outbound(Arc::new(Frame {
            frame: Utf8Bytes::default(),
            binary: frame,
            body: Bytes::new(),
            position: None,
        }))
    }

    /// A stream message in both formats, encoded once for every recipient.
    pub fn message(p: &MessageParts<'_>, compression: Compression) -> Self {
        let json = encode_message(p);
        let body = Bytes::from(binary::message_body(p));
        Outbound(Arc::new(Frame {
            // The encoder writes JSON text only: always UTF-8.
            frame: Utf8Bytes::try_from(json).unwrap_or_default(),
            binary: binary::frame(FrameType::Message, &body, compression),
            body,
            position: Some((Arc::from(p.stream), p.epoch, p.seq)),
        }))
    }
}

impl Frame {
    /// Bytes this frame takes on the wire in `wire` format.
    pub fn wire_len(&self, wire: Wire) -> usize {
        match wire {
            Wire::Json => self.frame.len(),
            Wire::Binary(_) => self.binary.len(),
        }
    }
}

/// The frame format of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// JSON text frames (the default).
    Json,
    /// Binary frames (subprotocol `barrage.v1.bin`), control frames
    /// compressed as given.
    Binary(Compression),
}

/// The hub's side of one WebSocket: its identity and bounded send queue.
#[derive(Debug)]
pub struct ConnHandle {
    /// Connection id.
    pub id: ConnId,
    /// The user holding the connection.
    pub user: UserId,
    /// The connection's frame format.
    pub wire: Wire,
    tx: queue::Sender<Outbound>,
    /// The socket itself, for frames written without the task (plain TCP).
    way: Option<Arc<Way>>,
    close: CancellationToken,
    /// Set, before `close` is cancelled, once the connection is asked to close.
    closed: AtomicBool,
    /// Takes no more frames: it may have missed some, and is closed soon
    /// (see [`ConnHandle::mute`]).
    muted: AtomicBool,
    close_code: Mutex<Option<CloseCode>>,
    /// Live frames recovery already sent (see `skip`), dropped when offered,
    /// so that frames written straight to the socket are checked too; the
    /// flag says whether there are any, without the lock.
    skip: Mutex<Option<Box<(Instant, Skip)>>>,
    has_skip: AtomicBool,
}

/// Outcome of queueing a frame on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// The frame is in the connection's send queue.
    Yes,
    /// The frame was written to the socket at once (see `direct`).
    Written,
    /// The queue was full: the connection is being closed as a slow consumer.
    SlowConsumer,
    /// The connection is already closing.
    Closed,
}

impl ConnHandle {
    /// Queues a reply, error or notice in the connection's format.
    pub fn send(&self, frame: &ServerFrame) -> Queued {
        self.queue(match self.wire {
            Wire::Json => Outbound::control(frame.to_json()),
            Wire::Binary(c) => Outbound::control_binary(binary::encode_server_frame(frame, c)),
        })
    }

    /// Sends a frame without waiting: written to the socket at once when
    /// the connection's task has nothing to write (see `direct`), else
    /// queued. A full queue closes the connection with
    /// [`CloseCode::SlowConsumer`] instead of slowing the fan-out.
    pub fn queue(&self, frame: Outbound) -> Queued {
        match &self.way {
            None => self.enqueue(frame),
            Some(_) => self.offer(&frame, true),
        }
    }

    /// Like [`ConnHandle::queue`], sharing `frame` only if it is queued;
    /// never written at once unless `may_write`.
    pub fn offer(&self, frame: &Outbound, may_write: bool) -> Queued {
        // Closing: its task writes nothing more, whatever is queued.
        if self.closed.load(Ordering::Acquire) || self.muted.load(Ordering::Acquire) {
            return Queued::Closed;
        }
        if self.already_sent(frame) {
            // A copy of a frame recovery sent: the client has it.
            return Queued::Yes;
        }
        let Some(way) = &self.way else {
            return self.enqueue(frame.clone());
        };
        if !may_write {
            return way.queue(|| self.enqueue(frame.clone()));
        }
        let (data, payload) = match self.wire {
            Wire::Json => (Data::Text, frame.frame.as_bytes()),
            Wire::Binary(_) => (Data::Binary, &frame.binary[..]),
        };
        match way.send_or_queue(data, payload, || self.enqueue(frame.clone())) {
            Sent::Written => Queued::Written,
            Sent::Partly => {
                self.tx.wake();
                Queued::Written
            }
            Sent::Queued(q) => q,
        }
    }

    /// From now on, drops the live frames `skip` names when they are
    /// offered (recovery sent them already).
    pub(crate) fn skip_recovered(&self, skip: &Skip) {
        if skip.is_empty() {
            return;
        }
        *self.skip.lock() = Some(Box::new((Instant::now(), skip.clone())));
        self.has_skip.store(true, Ordering::Release);
    }

    /// Drops the rules of [`ConnHandle::skip_recovered`] once they are
    /// older than [`SKIP_MEMORY`]: every frame they could name has arrived
    /// by then, and a quiet stream would otherwise keep them for as long
    /// as the connection lives.
    pub(crate) fn forget_old_skip(&self, now: Instant) {
        if !self.has_skip.load(Ordering::Acquire) {
            return;
        }
        let mut slot = self.skip.lock();
        if slot
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.0) >= SKIP_MEMORY)
        {
            *slot = None;
            self.has_skip.store(false, Ordering::Release);
        }
    }

    /// Whether `frame` is a copy of one recovery sent; the rules end as the
    /// streams move past them.
    fn already_sent(&self, frame: &Outbound) -> bool {
        if frame.position.is_none() || !self.has_skip.load(Ordering::Acquire) {
            return false;
        }
        let mut slot = self.skip.lock();
        let Some(skip) = slot.as_mut().map(|s| &mut s.1) else {
            return false;
        };
        let sent = skip.already_sent(frame);
        if skip.is_empty() {
            *slot = None;
            self.has_skip.store(false, Ordering::Release);
        }
        sent
    }

    /// The socket's way, for a plain-TCP connection (see `direct`).
    pub fn way(&self) -> Option<&Way> {
        self.way.as_deref()
    }

    fn enqueue(&self, frame: Outbound) -> Queued {
        match self.tx.try_send(frame) {
            Ok(()) => Queued::Yes,
            Err(queue::TrySendError::Full) => {
                if self.close_with(CloseCode::SlowConsumer) {
                    Queued::SlowConsumer
                } else {
                    Queued::Closed
                }
            }
            Err(queue::TrySendError::Closed) => Queued::Closed,
        }
    }

    /// Asks the connection's writer to close with `code`. Returns false when
    /// it was already closing (the first code wins).
    pub fn close_with(&self, code: CloseCode) -> bool {
        let mut slot = self.close_code.lock();
        if slot.is_some() {
            return false;
        }
        *slot = Some(code);
        self.closed.store(true, Ordering::Release);
        self.close.cancel();
        true
    }

    /// Stops offering frames to the connection, which will be closed: it
    /// may have missed some, and its client is to recover from its last
    /// position. A frame after the gap would move that position past it.
    pub fn mute(&self) {
        self.muted.store(true, Ordering::Release);
    }

    /// Whether [`ConnHandle::mute`] was called.
    pub fn is_muted(&self) -> bool {
        self.muted.load(Ordering::Acquire)
    }

    /// Frames waiting in the connection's send queue.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }

    /// The code the connection is closing with, once asked to close.
    pub fn close_code(&self) -> Option<CloseCode> {
        *self.close_code.lock()
    }

    /// Completes when the connection is asked to close.
    pub async fn closing(&self) {
        self.close.cancelled().await
    }

    /// Like [`ConnHandle::closing`], for a loop that polls it on every
    /// wake-up of its task (the session loop, once per delivered frame):
    /// the token, whose every check takes a lock, is polled only until it
    /// has registered the task for the wake-up; after that a flag answers.
    /// Poll it from one task only: the wake-up goes to the task that first
    /// polled it.
    pub fn close_signal(&self) -> CloseSignal<'_> {
        CloseSignal {
            wait: Box::pin(self.close.cancelled()),
            registered: false,
            closed: &self.closed,
        }
    }
}

/// See [`ConnHandle::close_signal`].
pub struct CloseSignal<'a> {
    wait: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFuture<'a>>>,
    registered: bool,
    closed: &'a AtomicBool,
}

impl std::future::Future for CloseSignal<'_> {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        // `close_with` sets the flag before it cancels the token, and the
        // token wakes the registered task: a close after this load is
        // seen on that wake-up.
        if self.closed.load(Ordering::Acquire) {
            return std::task::Poll::Ready(());
        }
        if self.registered {
            return std::task::Poll::Pending;
        }
        self.registered = true;
        self.wait.as_mut().poll(cx)
    }
}

/// One shard of the hub: every connection of the users that hash to it,
/// with the shard's part of each room.
#[derive(Default)]
struct State {
    conns: HashMap<ConnId, Arc<ConnHandle>>,
    conn_rooms: HashMap<ConnId, HashSet<RoomId>>,
    rooms: HashMap<RoomId, HashMap<ConnId, Arc<ConnHandle>>>,
    users: HashMap<UserId, HashMap<ConnId, Arc<ConnHandle>>>,
}

/// Counts of what a hub holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Open connections.
    pub connections: usize,
    /// Distinct users.
    pub users: usize,
    /// Rooms with at least one member.
    pub rooms: usize,
    /// Frames waiting in send queues, over all connections.
    pub queued_frames: usize,
    /// The longest send queue.
    pub max_queue_depth: usize,
}

/// Result of a local fan-out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Connections the frame was queued to.
    pub delivered: u32,
    /// Connections closed as slow consumers instead.
    pub dropped: u32,
}

/// Fan-outs to at most this many connections (a user's devices) are
/// written directly even under load (see `Hub::has_time_to_write`).
pub const DIRECT_UNDER_LOAD: usize = 8;

/// Messages counted as waiting for delivery (see [`Hub::backlog`]).
pub struct Backlog<'a> {
    hub: &'a Hub,
    left: usize,
}

impl Backlog<'_> {
    /// One of the messages was delivered (or given up on).
    pub fn done_one(&mut self) {
        if self.left > 0 {
            self.left -= 1;
            self.hub.backlog.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Backlog<'_> {
    fn drop(&mut self) {
        self.hub.backlog.fetch_sub(self.left, Ordering::Relaxed);
    }
}

/// Shards of a hub unless told otherwise.
pub const DEFAULT_SHARDS: usize = 32;

/// Every connection of this node, by id, room and user.
///
/// The state is split into shards by user: all connections of a user, and
/// their room memberships, live in one shard, so connecting, joining and
/// leaving lock one shard, a push to a user reads one shard, and a room or
/// broadcast fan-out reads the shards one after another. No lock is held
/// across an `.await`.
pub struct Hub {
    shards: Box<[RwLock<State>]>,
    hasher: RandomState,
    /// Open connections, over all shards.
    connections: AtomicUsize,
    /// For every room: how many shards hold members of it.
    room_shards: Mutex<HashMap<RoomId, u32>>,
    next_id: AtomicU64,
    reporter: Arc<Reporter>,
    metrics: Metrics,
    queue_len: usize,
    compression: Compression,
    batches: BatchCache,
    /// Whether fan-outs write to sockets themselves (see `direct`).
    direct_writes: bool,
    /// Messages handed to this node for delivery and not delivered yet
    /// (see [`Hub::backlog`]).
    backlog: AtomicUsize,
    /// When the last fan-out beyond a user's few connections started, in
    /// nanoseconds since `epoch`.
    large_start: AtomicU64,
    /// What the last such fan-out written directly took per connection
    /// it wrote to, in nanoseconds, and when it ended (since `epoch`).
    direct_ns_per_conn: AtomicU64,
    direct_measured: AtomicU64,
    epoch: std::time::Instant,
    /// Threads sharing large fan-outs.
    fanout: fanout::Pool,
}

impl Hub {
    /// An empty hub reporting through `reporter`; send queues hold `queue_len` frames.
    pub fn new(reporter: Arc<Reporter>, metrics: Metrics, queue_len: usize) -> Self {
        Hub {
            shards: Self::empty_shards(DEFAULT_SHARDS),
            hasher: RandomState::new(),
            connections: AtomicUsize::new(0),
            room_shards: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            reporter,
            metrics,
            queue_len: queue_len.max(1),
            compression: Compression::OFF,
            batches: BatchCache::default(),
            direct_writes: true,
            backlog: AtomicUsize::new(0),
            large_start: AtomicU64::new(0),
            direct_ns_per_conn: AtomicU64::new(0),
            direct_measured: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            fanout: fanout::Pool::for_this_machine(),
        }
    }

    fn empty_shards(n: usize) -> Box<[RwLock<State>]> {
        (0..n.max(1)).map(|_| RwLock::default()).collect()
    }

    /// The same hub split into `n` shards (at least one). Only for a hub
    /// that holds no connection yet.
    pub fn with_shards(mut self, n: usize) -> Self {
        debug_assert_eq!(self.connection_count(), 0);
        self.shards = Self::empty_shards(n);
        self
    }

    /// Whether fan-outs write frames to idle connections' sockets
    /// themselves, large ones over several threads (`direct`, `fanout`);
    /// off, every frame is queued to the connection's task.
    pub fn with_direct_writes(mut self, on: bool) -> Self {
        self.direct_writes = on;
        self
    }

    /// Whether fan-outs write to sockets themselves: plain-TCP connections
    /// are then given a way (`direct`).
    pub fn direct_writes(&self) -> bool {
        self.direct_writes
    }

    /// Fan-outs are split into at most `parts` parts written at once.
    pub fn with_fanout_parts(mut self, parts: usize) -> Self {
        self.fanout = fanout::Pool::new(parts);
        self
    }

    /// Binary frames of at least `c` body bytes are compressed.
    pub fn with_compression(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }

    /// How this node compresses binary frames.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// `batch` frames shared by connections that gathered the same messages.
    pub fn batches(&self) -> &BatchCache {
        &self.batches
    }

    /// The shard holding `user`'s connections.
    fn shard(&self, user: &UserId) -> &RwLock<State> {
        let i = self.hasher.hash_one(user.as_str()) as usize % self.shards.len();
        &self.shards[i]
    }

    /// Encodes a stream message once, in every format, for all recipients.
    pub fn message(&self, p: &MessageParts<'_>) -> Outbound {
        Outbound::message(p, self.compression)
    }

    /// The `message` frame of `body` at `seq` in `epoch` of `stream`.
    pub fn message_of(
        &self,
        stream: &str,
        epoch: u64,
        seq: u64,
        body: &barrage_proto::v1::MessageBody,
    ) -> Outbound {
        self.message(&MessageParts {
            stream,
            id: &body.id,
            epoch,
            seq,
            event: &body.event,
            content: &body.content,
            binary: &body.binary_content,
            timestamp_ms: body.timestamp_ms,
            from: &body.sender,
        })
    }

    /// Adds a connection of `user` in `rooms`. Returns its handle, the
    /// receiving end of its send queue, and an ack that resolves once the
    /// controllers know about it.
    pub fn connect(
        &self,
        user: UserId,
        rooms: &[RoomId],
        wire: Wire,
        way: Option<Arc<Way>>,
    ) -> (Arc<ConnHandle>, queue::Receiver<Outbound>, Ack) {
        let (tx, rx) = queue::channel(self.queue_len);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(ConnHandle {
            id,
            user: user.clone(),
            wire,
            tx,
            way,
            close: CancellationToken::new(),
            closed: AtomicBool::new(false),
            muted: AtomicBool::new(false),
            close_code: Mutex::new(None),
            skip: Mutex::new(None),
            has_skip: AtomicBool::new(false),
        });
        let mut changes = vec![Change {
            kind: Kind::Connect,
            key: StreamKey::User(user.clone()).to_string(),
            user: user.clone(),
        }];
        let mut st = self.shard(&user).write();
        st.conns.insert(id, conn.clone());
        st.users
            .entry(user.clone())
            .or_default()
            .insert(id, conn.clone());
        let joined = st.conn_rooms.entry(id).or_default();
        let mut added = Vec::new();
        for room in rooms {
            if joined.insert(room.clone()) {
                added.push(room);
                changes.push(Change {
                    kind: Kind::Join,
                    key: StreamKey::Room(room.clone()).to_string(),
                    user: user.clone(),
                });
            }
        }
        for room in added {
            self.add_to_room(&mut st, room, &conn);
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        let ack = self.reporter.enqueue(changes);
        self.observe();
        drop(st);
        self.metrics.connects.inc();
        (conn, rx, ack)
    }

    /// Adds a connection to a room. `None` when it was already a member.
    pub fn join(&self, conn: &Arc<ConnHandle>, room: &RoomId) -> Option<Ack> {
        let mut st = self.shard(&conn.user).write();
        let rooms = st.conn_rooms.get_mut(&conn.id)?;
        if !rooms.insert(room.clone()) {
            return None;
        }
        self.add_to_room(&mut st, room, conn);
        let ack = self.reporter.enqueue(vec![Change {
            kind: Kind::Join,
            key: StreamKey::Room(room.clone()).to_string(),
            user: conn.user.clone(),
        }]);
        self.observe();
        Some(ack)
    }

    /// Removes a connection from a room. Returns whether it was a member.
    pub fn leave(&self, conn: &ConnHandle, room: &RoomId) -> bool {
        let mut st = self.shard(&conn.user).write();
        let removed = st
            .conn_rooms
            .get_mut(&conn.id)
            .is_some_and(|r| r.remove(room));
        if removed {
            self.remove_from_room(&mut st, room, conn.id);
            // Nobody waits for a leave: pushes to a room it left are
            // filtered locally anyway.
            drop(self.reporter.enqueue(vec![Change {
                kind: Kind::Leave,
                key: StreamKey::Room(room.clone()).to_string(),
                user: conn.user.clone(),
            }]));
            self.observe();
        }
        removed
    }

    /// Removes every local member from `room`, telling each with a `left`
    /// frame. Returns how many connections were removed.
    pub fn close_room(&self, room: &RoomId) -> usize {
        let members = self.recipients_of(&StreamKey::Room(room.clone()), &HashSet::new());
        let left = ServerFrame::Left {
            room: room.to_string(),
        };
        let mut removed = 0;
        for conn in members {
            if self.leave(&conn, room) {
                removed += 1;
                conn.send(&left);
            }
        }
        removed
    }

    /// The reporter, for history queries to the controllers.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn reporter(&self) -> &Arc<Reporter> {
        &self.reporter
    }

    /// A hub that reports to no controller: for benchmarks and tools that
    /// measure local delivery alone.
    pub fn detached(queue_len: usize, registry: &prometheus::Registry) -> prometheus::Result<Hub> {
        let metrics = Metrics::new(registry)?;
        let reporter = Reporter::new(
            crate::reporter::ReporterConfig {
                node_id: "detached".into(),
                incarnation: "0".into(),
                grpc_addr: String::new(),
                heartbeat: std::time::Duration::from_secs(3600),
                call_timeout: std::time::Duration::from_secs(1),
                history_timeout: std::time::Duration::from_secs(1),
                vnodes: 1,
                tls: barrage_proto::GrpcTls::plaintext(),
                local: barrage_proto::LocalPeers::default(),
            },
            metrics.clone(),
        );
        Ok(Hub::new(reporter, metrics, queue_len))
    }

    /// The id the next connection will get: every connection registered
    /// so far has a lower one.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_id.load(Ordering::SeqCst)
    }

    /// Open connections on this node.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Open connections of one user on this node.
    pub fn user_connection_count(&self, user: &UserId) -> usize {
        self.shard(user)
            .read()
            .users
            .get(user)
            .map_or(0, HashMap::len)
    }

    /// Whether a connection is in `room`.
    pub fn in_room(&self, conn: &ConnHandle, room: &RoomId) -> bool {
        self.shard(&conn.user)
            .read()
            .conn_rooms
            .get(&conn.id)
            .is_some_and(|r| r.contains(room))
    }

    /// Number of rooms a connection is in.
    pub fn room_count(&self, conn: &ConnHandle) -> usize {
        self.shard(&conn.user)
            .read()
            .conn_rooms
            .get(&conn.id)
            .map_or(0, HashSet::len)
    }

    /// Removes a connection and everything it joined.
    pub fn disconnect(&self, conn: &ConnHandle) {
        let mut st = self.shard(&conn.user).write();
        if st.conns.remove(&conn.id).is_none() {
            return;
        }
        self.connections.fetch_sub(1, Ordering::Relaxed);
        let mut changes = vec![Change {
            kind: Kind::Disconnect,
            key: StreamKey::User(conn.user.clone()).to_string(),
            user: conn.user.clone(),
        }];
        if let Some(conns) = st.users.get_mut(&conn.user) {
            conns.remove(&conn.id);
            if conns.is_empty() {
                st.users.remove(&conn.user);
            }
        }
        for room in st.conn_rooms.remove(&conn.id).unwrap_or_default() {
            self.remove_from_room(&mut st, &room, conn.id);
            changes.push(Change {
                kind: Kind::Leave,
                key: StreamKey::Room(room).to_string(),
                user: conn.user.clone(),
            });
        }
        drop(self.reporter.enqueue(changes));
        self.observe();
    }

    /// Puts `conn` in the shard's part of `room`, counting the room when
    /// it is new to the shard.
    fn add_to_room(&self, st: &mut State, room: &RoomId, conn: &Arc<ConnHandle>) {
        match st.rooms.entry(room.clone()) {
            Entry::Occupied(mut e) => {
                e.get_mut().insert(conn.id, conn.clone());
            }
            Entry::Vacant(e) => {
                e.insert(HashMap::from([(conn.id, conn.clone())]));
                *self.room_shards.lock().entry(room.clone()).or_default() += 1;
            }
        }
    }

    fn remove_from_room(&self, st: &mut State, room: &RoomId, id: ConnId) {
        let Some(members) = st.rooms.get_mut(room) else {
            return;
        };
        members.remove(&id);
        if members.is_empty() {
            st.rooms.remove(room);
            let mut rooms = self.room_shards.lock();
            if let Entry::Occupied(mut e) = rooms.entry(room.clone()) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }

    /// Queues one encoded frame to every connection of `stream`, except
    /// users in `exclude`. The frame is shared, never copied per recipient.
    pub fn deliver(
        &self,
        stream: &StreamKey,
        frame: &Outbound,
        exclude: &HashSet<&str>,
    ) -> Delivery {
        let conns = self.recipients_of(stream, exclude);
        let Tally {
            delivery: d,
            bytes,
            direct,
        } = if conns.len() <= DIRECT_UNDER_LOAD {
            fanout::offer_all(&conns, frame, self.direct_writes)
        } else {
            let start = self.epoch.elapsed().as_nanos() as u64;
            if self.direct_writes && self.has_time_to_write(conns.len(), start) {
                let t = self.fanout.offer_all(conns, frame);
                // Per connection written to: queueing to the others (whose
                // tasks were still writing) is cheap, and would make the
                // system calls look cheaper than they are. A fan-out that
                // found no connection idle counts its whole time as the
                // cost of one: every task was still writing, so the node is
                // behind, and the next large fan-outs are queued until that
                // cost has decayed (about ten seconds for a large room).
                // Measured at max rate, that back-off is worth 5-8 % of the
                // deliveries per second.
                let end = self.epoch.elapsed().as_nanos() as u64;
                let per_conn = end.saturating_sub(start) / t.direct.max(1);
                self.direct_ns_per_conn.store(per_conn, Ordering::Relaxed);
                self.direct_measured.store(end, Ordering::Relaxed);
                t
            } else {
                fanout::offer_all(&conns, frame, false)
            }
        };
        self.metrics.frames_delivered.inc_by(u64::from(d.delivered));
        self.metrics.bytes_delivered.inc_by(bytes);
        if direct > 0 {
            self.metrics.frames_written_direct.inc_by(direct);
        }
        if d.dropped > 0 {
            self.metrics.slow_consumers.inc_by(u64::from(d.dropped));
        }
        d
    }

    /// Whether a fan-out to `n` connections (beyond a user's few),
    /// starting `now`, may be written straight to the sockets: nothing
    /// else waits to be delivered, and writing it directly would take,
    /// at the cost per connection the last direct fan-out had, no longer
    /// than the time since the previous such fan-out started. Otherwise
    /// the node is behind or would fall behind, and the fan-out is queued:
    /// each connection's task then writes every frame waiting for it with
    /// one flush, where direct writes would cost a system call per frame
    /// and connection. Direct writes buy latency with spare capacity only.
    ///
    /// The cost measured last counts half for every second since, so a
    /// node that measured it in a busy moment tries again.
    fn has_time_to_write(&self, n: usize, now: u64) -> bool {
        let previous = self.large_start.swap(now, Ordering::Relaxed);
        if self.backlog.load(Ordering::Relaxed) > 1 {
            return false;
        }
        let age_secs =
            now.saturating_sub(self.direct_measured.load(Ordering::Relaxed)) / 1_000_000_000;
        let per_conn = self
            .direct_ns_per_conn
            .load(Ordering::Relaxed)
            .checked_shr(u32::try_from(age_secs).unwrap_or(u32::MAX))
            .unwrap_or(0);
        let predicted = per_conn.saturating_mul(n as u64);
        predicted <= now.saturating_sub(previous)
    }

    /// Counts `n` messages as waiting for delivery until each is marked
    /// done on the returned guard (or the guard is dropped). While more
    /// than one message waits, fan-outs beyond a user's few connections
    /// are queued rather than written directly
    /// (see `Hub::has_time_to_write`).
    pub fn backlog(&self, n: usize) -> Backlog<'_> {
        self.backlog.fetch_add(n, Ordering::Relaxed);
        Backlog { hub: self, left: n }
    }

    /// Connections of `stream` a frame would be queued to now, except users
    /// in `exclude`.
    pub fn recipients(&self, stream: &StreamKey, exclude: &HashSet<&str>) -> u32 {
        self.recipients_of(stream, exclude).len() as u32
    }

    /// Every connection of `stream` except users in `exclude`, collected
    /// one shard at a time: the caller writes to them after the shards'
    /// locks are released (joins, leaves and connects must not wait for
    /// socket writes).
    fn recipients_of(&self, stream: &StreamKey, exclude: &HashSet<&str>) -> Vec<Arc<ConnHandle>> {
        fn collect(
            out: &mut Vec<Arc<ConnHandle>>,
            conns: Option<&HashMap<ConnId, Arc<ConnHandle>>>,
            exclude: &HashSet<&str>,
        ) {
            let Some(m) = conns else { return };
            out.extend(
                m.values()
                    .filter(|c| exclude.is_empty() || !exclude.contains(c.user.as_str()))
                    .cloned(),
            );
        }
        // Each statement that collects drops its shard's guard at its end.
        let mut out = Vec::new();
        match stream {
            StreamKey::Room(r) => {
                for shard in &self.shards {
                    collect(&mut out, shard.read().rooms.get(r), exclude);
                }
            }
            StreamKey::User(u) => collect(&mut out, self.shard(u).read().users.get(u), exclude),
            StreamKey::Broadcast => {
                for shard in &self.shards {
                    collect(&mut out, Some(&shard.read().conns), exclude);
                }
            }
        }
        out
    }

    fn key_states(
        shards: &[RwLockReadGuard<'_, State>],
        owned: &dyn Fn(&str) -> bool,
    ) -> Vec<KeyState> {
        let mut out = Vec::new();
        let mut rooms: HashMap<&RoomId, HashMap<String, u32>> = HashMap::new();
        for st in shards {
            // A user lives in one shard: its entry is whole.
            for (user, conns) in &st.users {
                let key = StreamKey::User(user.clone()).to_string();
                if owned(&key) {
                    out.push(KeyState {
                        key,
                        users: [(user.to_string(), conns.len() as u32)]
                            .into_iter()
                            .collect(),
                    });
                }
            }
            for (room, conns) in &st.rooms {
                let users = rooms.entry(room).or_default();
                for c in conns.values() {
                    *users.entry(c.user.to_string()).or_default() += 1;
                }
            }
        }
        for (room, users) in rooms {
            let key = StreamKey::Room(room.clone()).to_string();
            if owned(&key) {
                out.push(KeyState { key, users });
            }
        }
        out
    }

    /// Runs `f` with a snapshot of the keys `owned` selects while every
    /// shard is read-locked, so no change can slip between the snapshot
    /// and `f` (changes are reported with their shard write-locked).
    pub fn with_snapshot<R>(
        &self,
        owned: &dyn Fn(&str) -> bool,
        f: impl FnOnce(Vec<KeyState>) -> R,
    ) -> R {
        // Always taken in shard order; a writer holds one shard at a time.
        let guards: Vec<_> = self.shards.iter().map(RwLock::read).collect();
        f(Self::key_states(&guards, owned))
    }

    /// Every open connection (for shutdown).
    pub fn connections(&self) -> Vec<Arc<ConnHandle>> {
        self.recipients_of(&StreamKey::Broadcast, &HashSet::new())
    }

    /// Counts of connections, users and rooms.
    pub fn stats(&self) -> HubStats {
        let mut s = HubStats::default();
        for shard in &self.shards {
            let st = shard.read();
            s.connections += st.conns.len();
            s.users += st.users.len();
            for c in st.conns.values() {
                let d = c.queued();
                s.queued_frames += d;
                s.max_queue_depth = s.max_queue_depth.max(d);
            }
        }
        s.rooms = self.room_shards.lock().len();
        s
    }

    fn observe(&self) {
        self.metrics.connections.set(self.connection_count() as i64);
        self.metrics.rooms.set(self.room_shards.lock().len() as i64);
    }
}

/// A session's place in the hub, left when this is dropped: at the end of
/// the session, and also when a panic unwinds the task serving it, so that
/// no connection stays registered (reported to its controllers, counted
/// against its user's limit) with nothing serving it.
pub(crate) struct Registered {
    pub(crate) hub: Arc<Hub>,
    pub(crate) conn: Arc<ConnHandle>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.hub.disconnect(&self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reporter::ReporterConfig;
    use std::time::Duration;

    fn hub(queue_len: usize) -> Hub {
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let reporter = Reporter::new(
            ReporterConfig {
                node_id: "n".into(),
                incarnation: "i".into(),
                grpc_addr: String::new(),
                heartbeat: Duration::from_secs(1),
                call_timeout: Duration::from_secs(1),
                history_timeout: Duration::from_secs(1),
                vnodes: 8,
                tls: barrage_proto::GrpcTls::plaintext(),
                local: barrage_proto::LocalPeers::default(),
            },
            metrics.clone(),
        );
        Hub::new(reporter, metrics, queue_len)
    }

    fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }

    fn room(s: &str) -> RoomId {
        RoomId::new(s).unwrap()
    }

    fn frame(s: &str) -> Outbound {
        Outbound::control(s)
    }

    fn poll_signal(signal: &mut CloseSignal<'_>, waker: &std::task::Waker) -> std::task::Poll<()> {
        std::future::Future::poll(
            std::pin::Pin::new(signal),
            &mut std::task::Context::from_waker(waker),
        )
    }

    #[test]
    fn close_signal_wakes_the_task_that_polled_it() {
        let hub = hub(8);
        let (conn, _rx, _) = hub.connect(user("a"), &[], Wire::Json, None);
        let (wakes, waker) = crate::wakes::Wakes::task();
        let mut signal = conn.close_signal();
        assert!(poll_signal(&mut signal, &waker).is_pending());
        assert!(poll_signal(&mut signal, &waker).is_pending());
        assert_eq!(wakes.count(), 0);
        assert!(conn.close_with(CloseCode::SlowConsumer));
        assert_eq!(wakes.count(), 1, "the close wakes the task");
        assert!(poll_signal(&mut signal, &waker).is_ready());
        // A second close changes nothing: the first code wins.
        assert!(!conn.close_with(CloseCode::Normal));
        assert_eq!(conn.close_code(), Some(CloseCode::SlowConsumer));
    }

    #[test]
    fn close_signal_is_ready_when_the_close_came_first() {
        let hub = hub(8);
        let (conn, _rx, _) = hub.connect(user("a"), &[], Wire::Json, None);
        assert!(conn.close_with(CloseCode::Normal));
        let (_, waker) = crate::wakes::Wakes::task();
        assert!(poll_signal(&mut conn.close_signal(), &waker).is_ready());
    }

    #[test]
    fn room_delivery_skips_excluded_users_and_shares_the_frame() {
        let hub = hub(8);
        let (_a, mut rx_a, _) = hub.connect(user("a"), &[room("r")], Wire::Json, None);
        let (_b, mut rx_b, _) = hub.connect(user("b"), &[room("r")], Wire::Json, None);
        let (_c, mut rx_c, _) = hub.connect(user("c"), &[room("other")], Wire::Json, None);
        let key = StreamKey::Room(room("r"));
        let d = hub.deliver(&key, &frame("f1"), &["b"].into_iter().collect());
        assert_eq!(
            d,
            Delivery {
                delivered: 1,
                dropped: 0
            }
        );
        assert_eq!(rx_a.try_recv().unwrap().frame, "f1");
        assert!(rx_b.try_recv().is_err());
        assert!(rx_c.try_recv().is_err());
        let all = hub.deliver(&StreamKey::Broadcast, &frame("f2"), &HashSet::new());
        assert_eq!(all.delivered, 3);
        assert_eq!(rx_c.try_recv().unwrap().frame, "f2");
    }

    #[test]
    fn a_fan_out_split_over_threads_reaches_everyone_once_in_order() {
        let hub = hub(8).with_fanout_parts(3);
        let n = crate::fanout::MIN_PART * 3 + 7;
        let mut rxs = Vec::new();
        let mut conns = Vec::new();
        for i in 0..n {
            let (conn, rx, _) = hub.connect(user(&format!("u{i}")), &[room("r")], Wire::Json, None);
            rxs.push(rx);
            conns.push(conn);
        }
        // A member whose task is gone is not counted.
        let _gone = hub.connect(user("gone"), &[room("r")], Wire::Json, None).0;
        let key = StreamKey::Room(room("r"));
        for f in ["f1", "f2", "f3"] {
            let d = hub.deliver(&key, &frame(f), &["u0"].into_iter().collect());
            assert_eq!(
                d,
                Delivery {
                    delivered: n as u32 - 1,
                    dropped: 0
                },
                "every member but the excluded and the gone, counted once over the parts"
            );
        }
        assert!(rxs[0].try_recv().is_err(), "excluded");
        for (i, rx) in rxs.iter_mut().enumerate().skip(1) {
            let got: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok())
                .map(|o| o.frame.to_string())
                .collect();
            assert_eq!(got, ["f1", "f2", "f3"], "connection {i}");
        }
        drop(conns);
    }

    #[test]
    fn large_fan_outs_are_written_directly_only_with_time_to_spare() {
        let hub = hub(8);
        let ms = 1_000_000;
        // Nothing measured yet: direct.
        assert!(hub.has_time_to_write(10_000, 100 * ms));
        // 10 µs a connection, measured at 110 ms: 1,000 connections take
        // 10 ms.
        hub.direct_ns_per_conn.store(10_000, Ordering::Relaxed);
        hub.direct_measured.store(110 * ms, Ordering::Relaxed);
        assert!(
            hub.has_time_to_write(1_000, 120 * ms),
            "20 ms since the last"
        );
        assert!(
            !hub.has_time_to_write(1_000, 125 * ms),
            "5 ms since the last: behind"
        );
        assert!(
            hub.has_time_to_write(100, 127 * ms),
            "a smaller one fits in 2 ms"
        );
        // Messages waiting behind this one: queued, however idle.
        let mut waiting = hub.backlog(2);
        assert!(!hub.has_time_to_write(1_000, 1_000 * ms));
        waiting.done_one();
        assert!(
            !hub.has_time_to_write(1_000, 1_005 * ms),
            "5 ms since the last: behind"
        );
        assert!(hub.has_time_to_write(1_000, 1_200 * ms), "only itself left");
        // Measured over a second ago, the cost counts half: 5 ms.
        assert!(
            hub.has_time_to_write(1_000, 1_206 * ms),
            "6 ms since the last"
        );
        assert!(
            !hub.has_time_to_write(1_000, 1_210 * ms),
            "4 ms since the last"
        );
        drop(waiting);
        assert_eq!(hub.backlog.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_fan_out_that_found_no_idle_connection_backs_off() {
        let hub = hub(8).with_direct_writes(true);
        // Connections whose ways are closed (here: none, as TLS ones):
        // every frame is queued.
        let held: Vec<_> = (0..DIRECT_UNDER_LOAD + 4)
            .map(|i| hub.connect(user(&format!("u{i}")), &[room("r")], Wire::Json, None))
            .collect();
        let key = StreamKey::Room(room("r"));
        let d = hub.deliver(&key, &frame("x"), &HashSet::new());
        assert_eq!(d.delivered as usize, held.len());
        // Its whole time is counted as the cost of one connection, so a
        // large room's fan-out a millisecond later is queued.
        let per_conn = hub.direct_ns_per_conn.load(Ordering::Relaxed);
        let now = hub.large_start.load(Ordering::Relaxed) + 1_000_000;
        assert!(
            !hub.has_time_to_write(10_000, now),
            "{per_conn} ns a connection"
        );
    }

    /// A muted connection takes no more frames (it will be closed to
    /// recover: a frame after a gap would move its client past the gap).
    #[test]
    fn a_muted_connection_takes_no_frames() {
        let hub = hub(8);
        let (conn, mut rx, _) = hub.connect(user("u"), &[room("a")], Wire::Json, None);
        conn.mute();
        assert!(conn.is_muted());
        let at = Outbound::test_message("room:a", 1, 1, "x");
        assert_eq!(conn.offer(&at, true), Queued::Closed);
        assert!(rx.try_recv().is_err());
        assert_eq!(conn.close_code(), None, "closed later, by the node");
    }

    /// Rules for a quiet stream (no frame past them ever comes) are
    /// dropped once they are older than `SKIP_MEMORY`.
    #[test]
    fn old_skip_rules_are_forgotten() {
        let hub = hub(8);
        let (conn, mut rx, _) = hub.connect(user("u"), &[room("a")], Wire::Json, None);
        let mut skip = Skip::default();
        skip.insert("broadcast".into(), 1, crate::skip::SkipRule::UpTo(5));
        conn.skip_recovered(&skip);
        let now = Instant::now();
        conn.forget_old_skip(now);
        assert!(conn.has_skip.load(Ordering::Relaxed), "still young");
        conn.forget_old_skip(now + SKIP_MEMORY);
        assert!(!conn.has_skip.load(Ordering::Relaxed));
        assert!(conn.skip.lock().is_none());
        let at = Outbound::test_message("broadcast", 1, 5, "x");
        assert_eq!(conn.offer(&at, true), Queued::Yes);
        assert!(rx.try_recv().is_ok(), "no rule checks it any more");
    }

    #[test]
    fn copies_of_recovered_frames_are_dropped_when_offered() {
        let hub = hub(8);
        let (conn, mut rx, _) = hub.connect(user("u"), &[room("a")], Wire::Json, None);
        let mut skip = Skip::default();
        skip.insert("room:a".into(), 1, crate::skip::SkipRule::UpTo(5));
        conn.skip_recovered(&skip);
        let at = |seq: u64| Outbound::test_message("room:a", 1, seq, "x");
        // A copy is counted as queued (the client has it) but not queued.
        assert_eq!(conn.offer(&at(5), true), Queued::Yes);
        assert!(rx.try_recv().is_err(), "seq 5 was recovered");
        assert_eq!(conn.offer(&at(6), true), Queued::Yes);
        assert_eq!(
            rx.try_recv()
                .ok()
                .and_then(|f| f.position.clone())
                .map(|p| p.2),
            Some(6)
        );
        assert!(
            !conn.has_skip.load(Ordering::Relaxed),
            "past the range: no rule left"
        );
        assert_eq!(conn.offer(&at(4), true), Queued::Yes);
        assert!(rx.try_recv().is_ok(), "no rule checks it any more");
    }

    /// A connection that is closing gets nothing more, and a delivery
    /// does not count it.
    #[test]
    fn a_closing_connection_is_not_counted_as_reached() {
        let hub = hub(8);
        let (open, mut rx1, _) = hub.connect(user("u"), &[], Wire::Json, None);
        let (closing, mut rx2, _) = hub.connect(user("u"), &[], Wire::Json, None);
        closing.close_with(CloseCode::Shutdown);
        let d = hub.deliver(&StreamKey::User(user("u")), &frame("x"), &HashSet::new());
        assert_eq!(d.delivered, 1);
        assert!(rx1.try_recv().is_ok());
        assert!(rx2.try_recv().is_err());
        drop(open);
    }

    #[test]
    fn user_delivery_reaches_every_connection_of_the_user() {
        let hub = hub(8);
        let (_tab1, mut rx1, _) = hub.connect(user("u"), &[], Wire::Json, None);
        let (_tab2, mut rx2, _) = hub.connect(user("u"), &[], Wire::Json, None);
        let d = hub.deliver(&StreamKey::User(user("u")), &frame("x"), &HashSet::new());
        assert_eq!(d.delivered, 2);
        assert!(rx1.try_recv().is_ok() && rx2.try_recv().is_ok());
        assert_eq!(
            hub.stats(),
            HubStats {
                connections: 2,
                users: 1,
                rooms: 0,
                queued_frames: 0,
                max_queue_depth: 0
            }
        );
    }

    #[test]
    fn a_full_queue_closes_that_connection_only() {
        let hub = hub(2);
        let (slow, _rx_slow, _) = hub.connect(user("slow"), &[room("r")], Wire::Json, None);
        let (fast, mut rx_fast, _) = hub.connect(user("fast"), &[room("r")], Wire::Json, None);
        let key = StreamKey::Room(room("r"));
        for i in 0..3 {
            let d = hub.deliver(&key, &frame("m"), &HashSet::new());
            let _ = rx_fast.try_recv();
            if i < 2 {
                assert_eq!(
                    d,
                    Delivery {
                        delivered: 2,
                        dropped: 0
                    }
                );
            } else {
                assert_eq!(
                    d,
                    Delivery {
                        delivered: 1,
                        dropped: 1
                    }
                );
            }
        }
        assert_eq!(slow.close_code(), Some(CloseCode::SlowConsumer));
        assert_eq!(fast.close_code(), None);
        // Once closing, it is skipped rather than counted again.
        let d = hub.deliver(&key, &frame("m"), &HashSet::new());
        assert_eq!(
            d,
            Delivery {
                delivered: 1,
                dropped: 0
            }
        );
    }

    /// Room members, user counts and snapshots are the same whether the
    /// state is in one shard or spread over many.
    #[test]
    fn sharding_changes_nothing_a_caller_sees() {
        let run = |shards: usize| {
            let hub = hub(8).with_shards(shards);
            let mut held = Vec::new();
            for i in 0..64 {
                let rooms = if i % 2 == 0 {
                    vec![room("r"), room("even")]
                } else {
                    vec![room("r")]
                };
                held.push(hub.connect(user(&format!("u{}", i % 40)), &rooms, Wire::Json, None));
            }
            for (conn, _, _) in held.iter().step_by(5) {
                hub.leave(conn, &room("r"));
            }
            for (conn, _, _) in held.iter().skip(1).step_by(7) {
                hub.disconnect(conn);
            }
            let none = HashSet::new();
            let room_d = hub.deliver(&StreamKey::Room(room("r")), &frame("x"), &none);
            let all_d = hub.deliver(&StreamKey::Broadcast, &frame("y"), &none);
            let user_d = hub.deliver(&StreamKey::User(user("u3")), &frame("z"), &none);
            let mut snap: Vec<(String, Vec<(String, u32)>)> =
                hub.with_snapshot(&|_| true, |keys| {
                    keys.into_iter()
                        .map(|k| {
                            let mut users: Vec<_> = k.users.into_iter().collect();
                            users.sort();
                            (k.key, users)
                        })
                        .collect()
                });
            snap.sort();
            let received: usize = held
                .iter_mut()
                .map(|(_, rx, _)| std::iter::from_fn(|| rx.try_recv().ok()).count())
                .sum();
            (room_d, all_d, user_d, hub.stats(), snap, received)
        };
        let one = run(1);
        let many = run(16);
        assert_eq!(one, many);
        let (room_d, all_d, user_d, stats, snap, received) = one;
        // 64 connections; 13 left room r; 9 disconnected, 2 of which had left.
        assert_eq!(stats.connections, 55);
        assert_eq!(all_d.delivered, 55);
        assert_eq!(room_d.delivered, 64 - 13 - 7);
        assert_eq!(stats.rooms, 2);
        assert!(user_d.delivered >= 1);
        assert_eq!(
            received as u32,
            room_d.delivered + all_d.delivered + user_d.delivered
        );
        let r = snap.iter().find(|(k, _)| k == "room:r").unwrap();
        assert_eq!(r.1.iter().map(|(_, n)| n).sum::<u32>(), room_d.delivered);
    }

    #[test]
    fn join_leave_disconnect_keep_the_snapshot_exact() {
        let hub = hub(8);
        let (a1, _r1, _) = hub.connect(user("a"), &[room("r")], Wire::Json, None);
        let (a2, _r2, _) = hub.connect(user("a"), &[], Wire::Json, None);
        assert!(hub.join(&a2, &room("r")).is_some());
        assert!(
            hub.join(&a2, &room("r")).is_none(),
            "second join is a no-op"
        );
        let snap = hub.with_snapshot(&|_| true, |keys| keys);
        let r = snap.iter().find(|k| k.key == "room:r").unwrap();
        assert_eq!(r.users.get("a"), Some(&2));
        let u = snap.iter().find(|k| k.key == "user:a").unwrap();
        assert_eq!(u.users.get("a"), Some(&2));
        assert!(hub.leave(&a2, &room("r")));
        assert!(!hub.leave(&a2, &room("r")));
        hub.disconnect(&a1);
        let snap = hub.with_snapshot(&|k| k.starts_with("room:"), |keys| keys);
        assert!(snap.is_empty(), "{snap:?}");
        assert_eq!(hub.stats().connections, 1);
    }
}
