//! Reports this node's sessions to the controllers that own them.
//!
//! Keys map to controllers through the consistent-hash ring built from the
//! live controllers. Each controller has a [`Link`]: a queue of changes and
//! one task that sends them in order as numbered `Report` batches (whatever
//! queued while the previous batch was in flight goes in the next one), an
//! empty report as a heartbeat when idle, and a full `Sync` of the keys the
//! controller owns on first contact, when the controller asks for it (it
//! restarted or saw a gap), and whenever the ring changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use barrage_discovery::MemberWatch;
use barrage_discovery::ring::Ring;
use barrage_proto::PeerChannel;
use barrage_proto::coalesce::{BatchLimits, Coalescer};
use barrage_proto::v1::{
    HistoryQuery, HistoryRequest, HistoryResult, ReportRequest, SessionChange, SyncRequest,
    controller_client::ControllerClient, session_change::Kind,
};
use barrage_protocol::{StreamKey, UserId};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::metrics::Metrics;

/// One session change to report.
#[derive(Debug, Clone)]
pub struct Change {
    /// What happened.
    pub kind: Kind,
    /// `user:<id>` or `room:<id>`.
    pub key: String,
    /// Whose connection it was.
    pub user: UserId,
}

/// Resolves once every controller concerned has applied a batch of changes.
#[derive(Debug)]
pub struct Ack(Vec<oneshot::Receiver<()>>);

impl Ack {
    /// Waits for the controllers; false when a link went away or the wait
    /// exceeded `timeout`.
    pub async fn wait(self, timeout: Duration) -> bool {
        let all = async {
            for rx in self.0 {
                if rx.await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }
}

/// A report sent but not yet acknowledged.
struct Inflight {
    seq: u64,
    changes: Vec<SessionChange>,
    waiters: Vec<oneshot::Sender<()>>,
    /// Every connection whose changes are in the batch has a lower id.
    upto: u64,
}

#[derive(Default)]
struct Queue {
    inflight: Option<Inflight>,
    changes: Vec<SessionChange>,
    waiters: Vec<oneshot::Sender<()>>,
    /// Seq of the last report sent (or the sync the controller holds).
    seq: u64,
    full_sync: bool,
}

/// History queries to one controller: each item is one connecting
/// client's queries, and the queries of clients that queue behind busy
/// calls go together in one `History` call.
type HistoryCalls = Coalescer<Vec<HistoryQuery>, Vec<HistoryResult>>;

/// How history calls to one controller batch: a few calls at once (the
/// controller answers one at a time anyway), each for up to 256 clients.
const HISTORY_BATCHING: BatchLimits = BatchLimits {
    max_in_flight: 4,
    max_items: 256,
    max_bytes: 256 * 1024,
};

/// The path to one controller.
struct Link {
    id: String,
    addr: String,
    /// History queries (one item per connecting session, many at once in a
    /// reconnect storm), on a connection of their own.
    history: Option<HistoryCalls>,
    /// Reports and syncs, on a connection of their own: every connect
    /// waits for a report's answer, which must not queue behind the
    /// history queries' streams.
    reports: Option<ControllerClient<PeerChannel>>,
    queue: Mutex<Queue>,
    notify: Notify,
    stop: CancellationToken,
    /// The controller said it dropped this node's sessions, and has not
    /// accepted a full sync since: it routes nothing here. The connections
    /// open when it said so were told to recover; new ones wait for it too
    /// (see [`Reporter::enqueue`]). Changed under the queue's lock.
    dropped: AtomicBool,
    /// Connections with a lower id may have been confirmed by this
    /// controller; those with a higher one wait for it (see
    /// [`Reporter::recover_connections`]).
    applied_upto: AtomicU64,
}

impl Link {
    /// Queues `changes` (possibly none) for the next report and wakes the
    /// link; the receiver resolves once the controller has applied that
    /// report (or the sync it rides on).
    fn report(&self, changes: Vec<SessionChange>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.queue.lock();
        q.enqueue(changes, tx);
        drop(q);
        self.notify.notify_one();
        rx
    }
}

/// Queued changes beyond which a link sends a full sync instead.
const MAX_QUEUED_CHANGES: usize = 65_536;

impl Queue {
    /// Queues `changes` and a waiter for the report that carries them.
    ///
    /// While the controller cannot be reached, changes pile up with every
    /// connect and disconnect, and would go out as one report as large as
    /// the churn of the whole outage (past what a controller accepts,
    /// after a long one). Beyond [`MAX_QUEUED_CHANGES`] they are dropped
    /// for a full sync, which is as large as what the node holds now. With
    /// a full sync pending, changes are not queued at all: the snapshot
    /// will include them. Waiters whose sessions gave up are dropped too.
    fn enqueue(&mut self, changes: Vec<SessionChange>, waiter: oneshot::Sender<()>) {
        if !self.full_sync {
            self.changes.extend(changes);
            if self.changes.len() > MAX_QUEUED_CHANGES {
                tracing::warn!(
                    changes = self.changes.len(),
                    "controller unreachable for long; a full sync will replace the queued changes"
                );
                self.changes = Vec::new();
                self.full_sync = true;
            }
        }
        if self.waiters.len() >= 1024 && self.waiters.len().is_power_of_two() {
            self.waiters.retain(|w| !w.is_closed());
        }
        self.waiters.push(waiter);
    }
}

/// History queries bound for one controller: its link, the queries'
/// positions in the caller's list, and the queries.
type OwnerQueries<'a> = (&'a Arc<Link>, Vec<usize>, Vec<HistoryQuery>);

/// Settings of the reporter.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// This node's id.
    pub node_id: String,
    /// Random per process start.
    pub incarnation: String,
    /// This node's gRPC address, sent with syncs.
    pub grpc_addr: String,
    /// Idle links send an empty report this often.
    pub heartbeat: Duration,
    /// Deadline of one report or sync call.
    pub call_timeout: Duration,
    /// Deadline of one history call.
    pub history_timeout: Duration,
    /// Virtual nodes per controller on the ring.
    pub vnodes: usize,
    /// TLS of the calls to controllers.
    pub tls: barrage_proto::GrpcTls,
    /// Controllers in this process, called without the network.
    pub local: barrage_proto::LocalPeers,
}

/// Routes session changes to their controllers.
pub struct Reporter {
    cfg: ReporterConfig,
    ring: RwLock<Arc<Ring<Arc<Link>>>>,
    hub: Mutex<Weak<Hub>>,
    metrics: Metrics,
    /// Notified when a controller says it dropped this node's sessions:
    /// the connections open now may have missed pushes.
    missed: Arc<Notify>,
}

impl Reporter {
    /// A reporter with no controllers yet; call [`Reporter::run`] to follow them.
    pub fn new(cfg: ReporterConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Reporter {
            ring: RwLock::new(Arc::new(Ring::new(Vec::new(), cfg.vnodes))),
            cfg,
            hub: Mutex::new(Weak::new()),
            metrics,
            missed: Arc::new(Notify::new()),
        })
    }

    /// Notified (one stored permit) whenever a controller says it had
    /// dropped this node's sessions (see [`Reporter::dropped`]).
    pub fn missed_pushes(&self) -> Arc<Notify> {
        self.missed.clone()
    }

    /// A controller answered that it dropped this node's sessions since
    /// the node's last full sync to it (the node left discovery, or went
    /// silent): it routed no pushes here meanwhile. The first such answer
    /// of an episode returns true; the flag clears when the controller
    /// accepts a full sync again. Called with the link's queue locked.
    fn dropped(&self, link: &Link) -> bool {
        if link.dropped.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.metrics.dropped_by_controller.inc();
        tracing::warn!(
            controller = %link.id,
            "the controller had dropped this node's sessions: clients may have missed pushes"
        );
        true
    }

    /// Mutes the connections `link`'s controller may have confirmed (they
    /// may have missed pushes, and a frame after the gap would move a
    /// client's position past it) and has them closed with 4101, so that
    /// they recover. Connections registered since the last batch that
    /// controller applied wait for it (every new session waits for the
    /// owner of the broadcast stream too, see [`Reporter::enqueue`]), so
    /// they missed nothing. Called before the link's full sync, which
    /// makes the controller route pushes here again.
    fn recover_connections(&self, link: &Link) {
        let upto = link.applied_upto.load(Ordering::SeqCst);
        if let Some(hub) = self.hub.lock().upgrade() {
            for c in hub.connections() {
                if c.id < upto {
                    c.mute();
                }
            }
        }
        self.missed.notify_one();
    }

    /// Every connection registered so far has a lower id (all of them when
    /// there is no hub yet).
    fn conn_ids_now(&self) -> u64 {
        self.hub
            .lock()
            .upgrade()
            .map_or(u64::MAX, |h| h.next_conn_id())
    }

    /// Queues changes on the links of their owners. Called with the hub
    /// lock held. A change no controller owns fails its ack at once.
    pub fn enqueue(&self, changes: Vec<Change>) -> Ack {
        let ring = self.ring.read().clone();
        let mut by_link: BTreeMap<&str, (&Arc<Link>, Vec<SessionChange>)> = BTreeMap::new();
        let mut acks = Vec::new();
        for c in changes {
            match ring.owner(&c.key) {
                Some((id, link)) => by_link
                    .entry(id)
                    .or_insert_with(|| (link, Vec::new()))
                    .1
                    .push(SessionChange {
                        kind: c.kind as i32,
                        key: c.key,
                        user_id: c.user.to_string(),
                        ..Default::default()
                    }),
                None => {
                    // Dropping the sender fails the ack: no controller to tell.
                    let (_tx, rx) = oneshot::channel();
                    acks.push(rx);
                }
            }
        }
        // A new session also waits for the owner of the broadcast stream,
        // which no change names: a controller that dropped this node routes
        // it nothing, broadcasts included, until it takes the node back.
        // And while one has dropped it, every session waits for that one.
        let connects = by_link
            .values()
            .any(|(_, cs)| cs.iter().any(|c| c.kind() == Kind::Connect));
        let broadcast = ring.owner(StreamKey::BROADCAST).map(|(id, _)| id);
        for (id, link) in ring.members() {
            let waits = link.dropped.load(Ordering::SeqCst) || (connects && broadcast == Some(id));
            if waits && !by_link.contains_key(id) {
                acks.push(link.report(Vec::new()));
            }
        }
        for (_, (link, changes)) in by_link {
            acks.push(link.report(changes));
        }
        Ack(acks)
    }

    /// Tells the owner of user stream `key` that a connection of `user`
    /// received its messages up to `seq` in `epoch`, so that the messages
    /// kept for the user while offline are no longer handed out. Rides on
    /// the next report and is not waited for: a receipt that is lost (a
    /// full sync replaced the queued changes) only means that the next
    /// connection without a position gets those messages again.
    pub fn received(&self, key: String, user: &UserId, epoch: u64, seq: u64) {
        let ring = self.ring.read().clone();
        if let Some((_, link)) = ring.owner(&key) {
            drop(link.report(vec![SessionChange {
                kind: Kind::Received as i32,
                key,
                user_id: user.to_string(),
                epoch,
                seq,
            }]));
        }
    }

    /// Resolves once every controller known now has applied this node's
    /// state: a link's first call is its full sync, and the waiter rides
    /// on that sync or on the report after it.
    pub fn confirmed(&self) -> Ack {
        let ring = self.ring.read().clone();
        Ack(ring
            .members()
            .map(|(_, link)| link.report(Vec::new()))
            .collect())
    }

    /// [`Reporter::history`] within `timeout`.
    pub async fn history_within(
        &self,
        queries: Vec<HistoryQuery>,
        timeout: Duration,
    ) -> Result<Vec<HistoryResult>, String> {
        tokio::time::timeout(timeout, self.history(queries))
            .await
            .map_err(|_| "history request timed out".to_owned())?
    }

    /// The answer to one query, within `timeout`.
    pub async fn history_of(
        &self,
        query: HistoryQuery,
        timeout: Duration,
    ) -> Result<HistoryResult, String> {
        self.history_within(vec![query], timeout)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| "no answer from the stream's controller".to_owned())
    }

    /// Asks the owning controllers for stream positions and missed
    /// messages for one connecting client: one item per controller,
    /// concurrently, each sent alone or with other clients' queries (see
    /// [`HistoryCalls`]). Results come back in query order.
    pub async fn history(&self, queries: Vec<HistoryQuery>) -> Result<Vec<HistoryResult>, String> {
        let ring = self.ring.read().clone();
        let asked = queries.len();
        let mut by_owner: BTreeMap<&str, OwnerQueries<'_>> = BTreeMap::new();
        for (i, q) in queries.into_iter().enumerate() {
            let (id, link) = ring
                .owner(&q.key)
                .ok_or_else(|| "no controller available".to_owned())?;
            let e = by_owner
                .entry(id)
                .or_insert_with(|| (link, Vec::new(), Vec::new()));
            e.1.push(i);
            e.2.push(q);
        }
        let calls = by_owner
            .into_iter()
            .map(|(id, (link, idx, queries))| async move {
                let calls = link
                    .history
                    .as_ref()
                    .ok_or_else(|| format!("controller {id} has a bad address"))?;
                calls.call(queries).await.map(|r| (idx, r))
            });
        let answers = futures::future::join_all(calls)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, String>>()?;
        in_query_order(asked, answers)
    }

    /// Follows the live controllers until `stop`: keeps one link per
    /// controller and a full sync to each whenever the ring changes. The
    /// controllers known now are on the ring when this returns, so sessions
    /// opened from then on have owners to report to; the returned task
    /// follows later changes and closes the links at the end.
    pub fn follow(
        self: &Arc<Self>,
        hub: &Arc<Hub>,
        controllers: MemberWatch,
        stop: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        *self.hub.lock() = Arc::downgrade(hub);
        let me = self.clone();
        let follow = controllers.follow(stop, move |m| me.apply_members(m));
        let me = self.clone();
        async move {
            follow.await;
            let ring = me.ring.read().clone();
            for (_, link) in ring.members() {
                link.stop.cancel();
            }
        }
    }

    fn apply_members(self: &Arc<Self>, members: &barrage_discovery::Members) {
        let old = self.ring.read().clone();
        let mut links = Vec::new();
        for (id, m) in members {
            let existing = old
                .members()
                .find(|(oid, l)| *oid == id && l.addr == m.grpc_addr)
                .map(|(_, l)| l.clone());
            let link = existing.unwrap_or_else(|| self.spawn_link(id, &m.grpc_addr));
            links.push((id.clone(), link));
        }
        let new = Arc::new(Ring::new(links, self.cfg.vnodes));
        for (id, link) in old.members() {
            if !new
                .members()
                .any(|(nid, l)| nid == id && Arc::ptr_eq(l, link))
            {
                tracing::info!(controller = %id, "controller gone; closing its report link");
                link.stop.cancel();
            }
        }
        *self.ring.write() = new.clone();
        // Ownership may have moved: every controller gets this node's full
        // state for the keys it owns now.
        for (_, link) in new.members() {
            link.queue.lock().full_sync = true;
            link.notify.notify_one();
        }
        tracing::info!(controllers = new.len(), "controller ring updated");
    }

    fn spawn_link(self: &Arc<Self>, id: &str, addr: &str) -> Arc<Link> {
        // Two channels, so two connections: one for history, one for
        // reports. A controller in this process is called directly.
        let local = self.cfg.local.get(addr, self.cfg.call_timeout);
        let endpoint = match &local {
            Some(_) => None,
            None => match self.cfg.tls.endpoint(addr) {
                Ok(e) => Some(e.connect_timeout(self.cfg.call_timeout).tcp_nodelay(true)),
                Err(e) => {
                    tracing::error!(controller = %id, %addr, error = %e, "bad controller address");
                    None
                }
            },
        };
        let channel = || {
            local
                .clone()
                .or_else(|| {
                    let e = endpoint.as_ref()?;
                    Some(barrage_proto::local::network(e.connect_lazy()))
                })
                .map(|ch| {
                    ControllerClient::new(ch)
                        .max_decoding_message_size(barrage_proto::PEER_MESSAGE_LIMIT)
                })
        };
        let history = channel().map(|client| {
            history_calls(
                client,
                self.cfg.history_timeout,
                self.metrics.history_call_clients.clone(),
            )
        });
        let link = Arc::new(Link {
            id: id.to_owned(),
            addr: addr.to_owned(),
            history,
            reports: channel(),
            queue: Mutex::new(Queue {
                full_sync: true,
                ..Queue::default()
            }),
            notify: Notify::new(),
            stop: CancellationToken::new(),
            dropped: AtomicBool::new(false),
            applied_upto: AtomicU64::new(0),
        });
        tokio::spawn(self.clone().link_task(link.clone()));
        link
    }

    async fn link_task(self: Arc<Self>, link: Arc<Link>) {
        let Some(client) = link.reports.clone() else {
            return;
        };
        let mut backoff = Backoff::new();
        while !link.stop.is_cancelled() {
            let sent = if link.queue.lock().full_sync {
                self.full_sync(&link, &client).await
            } else {
                self.send_report(&link, &client).await
            };
            match sent {
                Ok(more) => {
                    backoff.reset();
                    if more {
                        continue;
                    }
                }
                Err(e) => {
                    self.metrics.report_failures.inc();
                    tracing::warn!(controller = %link.id, error = %e, "report to controller failed; retrying");
                    tokio::select! {
                        _ = link.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next()) => continue,
                    }
                }
            }
            // While the controller counts this node as gone, what queues
            // meanwhile cannot change its answer: ask again at the heartbeat.
            let departed = link.dropped.load(Ordering::SeqCst);
            tokio::select! {
                _ = link.stop.cancelled() => return,
                _ = link.notify.notified(), if !departed => {}
                _ = tokio::time::sleep(self.cfg.heartbeat) => {}
            }
        }
    }

    /// Sends the batch in flight, or what is queued, or a heartbeat.
    /// Ok(true) when there is more to do.
    async fn send_report(
        &self,
        link: &Link,
        client: &ControllerClient<PeerChannel>,
    ) -> Result<bool, tonic::Status> {
        let req = {
            let mut q = link.queue.lock();
            if q.inflight.is_none() {
                let changes = std::mem::take(&mut q.changes);
                let waiters = std::mem::take(&mut q.waiters);
                if !changes.is_empty() {
                    q.seq += 1;
                }
                // An empty batch is a heartbeat: it repeats the last seq.
                q.inflight = Some(Inflight {
                    seq: q.seq,
                    changes,
                    waiters,
                    upto: self.conn_ids_now(),
                });
            }
            let f = q.inflight.as_ref().map(|f| (f.seq, f.changes.clone()));
            let (seq, changes) = f.unwrap_or_default();
            ReportRequest {
                node_id: self.cfg.node_id.clone(),
                incarnation: self.cfg.incarnation.clone(),
                seq,
                changes,
            }
        };
        let mut r = tonic::Request::new(req);
        r.set_timeout(self.cfg.call_timeout);
        // On error the batch stays in flight and is resent as it is, with
        // the same seq, so a controller that did apply it sees a duplicate.
        let started = std::time::Instant::now();
        let resp = client.clone().report(r).await?.into_inner();
        self.metrics
            .report_duration
            .observe(started.elapsed().as_secs_f64());
        let mut q = link.queue.lock();
        if resp.dropped {
            let first = self.dropped(link);
            if resp.resync_required {
                q.full_sync = true;
            }
            drop(q);
            if first {
                self.recover_connections(link);
            }
            // Without a resync the controller applied nothing: the batch
            // stays in flight, and its sessions keep waiting, until the
            // controller takes this node back (asked again at the next
            // heartbeat).
            return Ok(resp.resync_required);
        }
        if resp.resync_required {
            q.full_sync = true;
            return Ok(true);
        }
        if let Some(f) = q.inflight.take() {
            link.applied_upto.fetch_max(f.upto, Ordering::SeqCst);
            for w in f.waiters {
                let _ = w.send(());
            }
        }
        Ok(!q.changes.is_empty() || q.full_sync)
    }

    /// Sends the full state of the keys this link's controller owns.
    async fn full_sync(
        &self,
        link: &Arc<Link>,
        client: &ControllerClient<PeerChannel>,
    ) -> Result<bool, tonic::Status> {
        let Some(hub) = self.hub.lock().upgrade() else {
            return Ok(false);
        };
        let ring = self.ring.read().clone();
        let owned = |key: &str| ring.owner(key).is_some_and(|(id, _)| id == link.id);
        // Snapshot and drain under the hub lock: queued changes are part of
        // the snapshot, later ones follow it as reports.
        let (req, waiters) = hub.with_snapshot(&owned, |keys| {
            let mut q = link.queue.lock();
            q.changes.clear();
            q.full_sync = false;
            let mut waiters = q.inflight.take().map(|f| f.waiters).unwrap_or_default();
            waiters.append(&mut q.waiters);
            let req = SyncRequest {
                node_id: self.cfg.node_id.clone(),
                incarnation: self.cfg.incarnation.clone(),
                seq: q.seq,
                full: true,
                keys,
                grpc_addr: self.cfg.grpc_addr.clone(),
                ring_id: ring.id(),
                handles_dropped: true,
                knows_dropped: link.dropped.load(Ordering::SeqCst),
            };
            (req, waiters)
        });
        // Read after the snapshot: every connection in it has a lower id.
        let upto = hub.next_conn_id();
        let mut r = tonic::Request::new(req);
        r.set_timeout(self.cfg.call_timeout);
        // Ok(true): the controller ignored the sync. It still counts this
        // node as gone from discovery, or it dropped the node's sessions and
        // the node did not know yet (`knows_dropped`).
        let sent = client.clone().sync(r).await.map(|r| r.into_inner().dropped);
        if let Ok(false) = sent {
            tracing::debug!(controller = %link.id, "full sync sent");
            link.applied_upto.fetch_max(upto, Ordering::SeqCst);
            for w in waiters {
                let _ = w.send(());
            }
            let q = link.queue.lock();
            link.dropped.store(false, Ordering::SeqCst);
            return Ok(!q.changes.is_empty());
        }
        let mut q = link.queue.lock();
        let first = matches!(sent, Ok(true)) && self.dropped(link);
        q.full_sync = true;
        let mut w = waiters;
        w.append(&mut q.waiters);
        q.waiters = w;
        drop(q);
        if first {
            // Told now: the next sync says so, at once.
            self.recover_connections(link);
            return Ok(true);
        }
        // Ok(true): ignored while the controller counts this node as gone
        // from discovery; asked again at the next heartbeat.
        sent.map(|_| false)
    }
}

/// History calls to `client`, batched across connecting clients.
fn history_calls(
    client: ControllerClient<PeerChannel>,
    timeout: Duration,
    clients: prometheus::Histogram,
) -> HistoryCalls {
    Coalescer::new(
        HISTORY_BATCHING,
        |queries: &Vec<HistoryQuery>| queries.iter().map(prost::Message::encoded_len).sum(),
        clients,
        move |items| history_rounds(client.clone(), items, timeout),
    )
}

/// Asks for the history of every client in `items` (one list of queries
/// each) in one call, then again for those the controller deferred (it
/// answers at least one client per call), until all are answered.
async fn history_rounds(
    client: ControllerClient<PeerChannel>,
    items: Vec<Vec<HistoryQuery>>,
    timeout: Duration,
) -> Result<Vec<Vec<HistoryResult>>, String> {
    let mut out: Vec<Option<Vec<HistoryResult>>> = vec![None; items.len()];
    let mut pending: Vec<usize> = (0..items.len()).collect();
    while !pending.is_empty() {
        let queries = pending
            .iter()
            .enumerate()
            .flat_map(|(n, &i)| {
                items[i].iter().map(move |q| HistoryQuery {
                    client: n as u32,
                    ..q.clone()
                })
            })
            .collect();
        let mut req = tonic::Request::new(HistoryRequest {
            queries,
            receipts: true,
        });
        req.set_timeout(timeout);
        let mut results = client
            .clone()
            .history(req)
            .await
            .map_err(|s| s.message().to_owned())?
            .into_inner()
            .results
            .into_iter();
        let mut deferred = Vec::new();
        for &i in &pending {
            let mine: Vec<HistoryResult> = results.by_ref().take(items[i].len()).collect();
            if mine.len() != items[i].len() {
                return Err("controller answered fewer results than asked".to_owned());
            }
            if mine.iter().any(|r| r.deferred) {
                deferred.push(i);
            } else {
                out[i] = Some(mine);
            }
        }
        if deferred.len() == pending.len() {
            return Err("controller deferred every query".to_owned());
        }
        pending = deferred;
    }
    Ok(out.into_iter().map(Option::unwrap_or_default).collect())
}

/// Puts the controllers' answers (each with the indexes of the queries it
/// was asked) back in query order. A query left without a result, wherever
/// it was in its controller's list, fails the whole request, as a failed
/// call does: the session cannot be told where its streams stand.
fn in_query_order(
    asked: usize,
    answers: Vec<(Vec<usize>, Vec<HistoryResult>)>,
) -> Result<Vec<HistoryResult>, String> {
    let mut out: Vec<Option<HistoryResult>> = vec![None; asked];
    for (idx, results) in answers {
        if results.len() != idx.len() {
            return Err(format!(
                "controller answered {} result(s) for {} query(ies)",
                results.len(),
                idx.len()
            ));
        }
        for (i, res) in idx.into_iter().zip(results) {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(res);
            }
        }
    }
    out.into_iter()
        .map(|r| r.ok_or_else(|| "controller answered fewer results than asked".to_owned()))
        .collect()
}

/// Capped exponential backoff with jitter.
struct Backoff(u32);

impl Backoff {
    fn new() -> Self {
        Backoff(0)
    }
    fn reset(&mut self) {
        self.0 = 0;
    }
    fn next(&mut self) -> Duration {
        let base = 100u64 << self.0.min(5);
        self.0 += 1;
        Duration::from_millis(base + rand::random::<u64>() % (base / 2 + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use barrage_controller::ownership::Ownership;
    use barrage_controller::state::{ControllerState, Membership};
    use barrage_controller::streams::Streams;
    use barrage_controller::{ControllerService, StreamConfig};
    use barrage_proto::v1::MessageBody;
    use barrage_proto::v1::controller_server::ControllerServer;

    const T: Duration = Duration::from_secs(5);

    fn big(id: &str) -> MessageBody {
        MessageBody {
            id: id.into(),
            content: "x".repeat(1000),
            ..Default::default()
        }
    }

    fn change(i: usize) -> SessionChange {
        SessionChange {
            kind: Kind::Join as i32,
            key: format!("user:u{i}"),
            user_id: format!("u{i}"),
            ..Default::default()
        }
    }

    #[test]
    fn an_outages_backlog_turns_into_one_full_sync() {
        let mut q = Queue::default();
        let mut waiting = Vec::new();
        for i in 0..MAX_QUEUED_CHANGES {
            let (tx, rx) = oneshot::channel();
            q.enqueue(vec![change(i)], tx);
            // Most sessions give up waiting; every tenth still waits.
            if i % 10 == 0 {
                waiting.push(rx);
            }
        }
        assert_eq!((q.changes.len(), q.full_sync), (MAX_QUEUED_CHANGES, false));
        assert!(
            q.waiters.len() < MAX_QUEUED_CHANGES / 5,
            "{}",
            q.waiters.len()
        );
        let (tx, _rx) = oneshot::channel();
        q.enqueue(vec![change(0)], tx);
        assert_eq!((q.changes.len(), q.full_sync), (0, true));
        // With the sync pending, changes are left to its snapshot.
        let (tx, _rx) = oneshot::channel();
        q.enqueue(vec![change(1), change(2)], tx);
        assert!(q.changes.is_empty());
        let open = q.waiters.iter().filter(|w| !w.is_closed()).count();
        assert_eq!(
            open,
            waiting.len() + 2,
            "every session still waiting is answered"
        );
    }

    fn result(key: &str) -> HistoryResult {
        HistoryResult {
            key: key.into(),
            ..Default::default()
        }
    }

    #[test]
    fn answers_are_put_in_query_order_and_missing_ones_fail_the_request() {
        let keys = |r: Vec<HistoryResult>| r.into_iter().map(|r| r.key).collect::<Vec<_>>();
        // Two controllers, each asked for some of four queries.
        let whole = in_query_order(
            4,
            vec![
                (vec![0, 2], vec![result("user:u"), result("room:a")]),
                (vec![1, 3], vec![result("broadcast"), result("room:b")]),
            ],
        );
        assert_eq!(
            keys(whole.expect("every query answered")),
            ["user:u", "broadcast", "room:a", "room:b"]
        );
        // The last queries of the request go unanswered: a failure, not a
        // shorter answer with those streams missing.
        let short = in_query_order(
            4,
            vec![
                (vec![0, 1], vec![result("user:u"), result("broadcast")]),
                (vec![2, 3], vec![result("room:a")]),
            ],
        );
        assert!(short.is_err(), "{short:?}");
        // So does a query no controller was asked about.
        let unasked = in_query_order(3, vec![(vec![0, 1], vec![result("a"), result("b")])]);
        assert!(unasked.is_err(), "{unasked:?}");
    }

    #[tokio::test]
    async fn clients_in_one_call_get_their_own_answers_and_deferred_ones_are_asked_again()
    -> Result<(), Box<dyn std::error::Error>> {
        // A real controller in this process, whose answers hold two of the
        // large messages per client and three in all: of three clients
        // missing two each, the first call answers one.
        let streams = Streams::new(StreamConfig {
            max_history_bytes: 2 * 1100,
            max_answer_bytes: 3 * 1100,
            ..StreamConfig::default()
        });
        let state = Arc::new(Mutex::new(ControllerState {
            members: Membership::new(),
            streams,
            ownership: Ownership::standalone("c"),
        }));
        let now = tokio::time::Instant::now();
        let epoch = {
            let mut s = state.lock();
            let a = s.streams.append("room:big", &big("m1"), false, now);
            s.streams.append("room:big", &big("m2"), false, now);
            a.epoch
        };
        let metrics = barrage_controller::Metrics::new(&prometheus::Registry::new())?;
        let service = ControllerService::new(state.clone(), metrics.clone());
        let peers = barrage_proto::LocalPeers::default();
        let _registered = peers.register("c:1", ControllerServer::new(service));
        let client = ControllerClient::new(peers.get("c:1", T).expect("registered"));

        let items = vec![
            vec![HistoryQuery::new("room:big", Some((epoch, 0)))],
            vec![
                HistoryQuery::new("user:b", None),
                HistoryQuery::new("room:big", Some((epoch, 1))),
            ],
            vec![
                HistoryQuery::new("broadcast", None),
                HistoryQuery::new("room:big", Some((epoch, 0))),
            ],
        ];
        let answers = tokio::time::timeout(T, history_rounds(client, items, T)).await??;
        let got: Vec<Vec<(String, bool, Vec<u64>)>> = answers
            .iter()
            .map(|client| {
                client
                    .iter()
                    .map(|r| {
                        let seqs = r.messages.iter().map(|m| m.seq).collect();
                        (r.key.clone(), r.deferred, seqs)
                    })
                    .collect()
            })
            .collect();
        let big = |seqs: &[u64]| ("room:big".to_string(), false, seqs.to_vec());
        assert_eq!(
            got,
            vec![
                vec![big(&[1, 2])],
                vec![("user:b".into(), false, vec![]), big(&[2])],
                vec![("broadcast".into(), false, vec![]), big(&[1, 2])],
            ]
        );
        let recovered = metrics.recoveries.with_label_values(&["recovered"]).get();
        assert_eq!(recovered, 3, "each answered once, deferrals not counted");
        Ok(())
    }
}
