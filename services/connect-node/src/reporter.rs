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
use std::sync::{Arc, Weak};
use std::time::Duration;

use barrage_discovery::MemberWatch;
use barrage_discovery::ring::Ring;
use barrage_proto::PeerChannel;
use barrage_proto::v1::{
    HistoryQuery, HistoryRequest, HistoryResult, ReportRequest, SessionChange, SyncRequest,
    controller_client::ControllerClient, session_change::Kind,
};
use barrage_protocol::UserId;
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

/// The path to one controller.
struct Link {
    id: String,
    addr: String,
    /// History queries (one per connecting session, many at once in a
    /// reconnect storm).
    client: Option<ControllerClient<PeerChannel>>,
    /// Reports and syncs, on a connection of their own: every connect
    /// waits for a report's answer, which must not queue behind the
    /// history queries' streams.
    reports: Option<ControllerClient<PeerChannel>>,
    queue: Mutex<Queue>,
    notify: Notify,
    stop: CancellationToken,
}

impl Link {
    /// Queues `changes` (possibly none) for the next report and wakes the
    /// link; the receiver resolves once the controller has applied that
    /// report (or the sync it rides on).
    fn report(&self, changes: Vec<SessionChange>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut q = self.queue.lock();
        q.changes.extend(changes);
        q.waiters.push(tx);
        drop(q);
        self.notify.notify_one();
        rx
    }
}

/// History queries bound for one controller: its client, the queries'
/// positions in the caller's list, and the queries.
type OwnerQueries = (ControllerClient<PeerChannel>, Vec<usize>, Vec<HistoryQuery>);

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
}

impl Reporter {
    /// A reporter with no controllers yet; call [`Reporter::run`] to follow them.
    pub fn new(cfg: ReporterConfig, metrics: Metrics) -> Arc<Self> {
        Arc::new(Reporter {
            ring: RwLock::new(Arc::new(Ring::new(Vec::new(), cfg.vnodes))),
            cfg,
            hub: Mutex::new(Weak::new()),
            metrics,
        })
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
                    }),
                None => {
                    // Dropping the sender fails the ack: no controller to tell.
                    let (_tx, rx) = oneshot::channel();
                    acks.push(rx);
                }
            }
        }
        for (_, (link, changes)) in by_link {
            acks.push(link.report(changes));
        }
        Ack(acks)
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

    /// Asks the owning controllers for stream positions and missed
    /// messages, one call per controller, concurrently, each with
    /// `deadline`. Results come back in query order.
    pub async fn history(
        &self,
        queries: Vec<HistoryQuery>,
        deadline: Duration,
    ) -> Result<Vec<HistoryResult>, tonic::Status> {
        let ring = self.ring.read().clone();
        let mut by_owner: BTreeMap<&str, OwnerQueries> = BTreeMap::new();
        for (i, q) in queries.into_iter().enumerate() {
            let (id, link) = ring
                .owner(&q.key)
                .ok_or_else(|| tonic::Status::unavailable("no controller available"))?;
            let client = link.client.clone().ok_or_else(|| {
                tonic::Status::unavailable(format!("controller {id} has a bad address"))
            })?;
            let e = by_owner
                .entry(id)
                .or_insert_with(|| (client, Vec::new(), Vec::new()));
            e.1.push(i);
            e.2.push(q);
        }
        let calls = by_owner.into_values().map(|(mut client, idx, queries)| {
            let mut req = tonic::Request::new(HistoryRequest { queries });
            req.set_timeout(deadline);
            async move {
                client
                    .history(req)
                    .await
                    .map(|r| (idx, r.into_inner().results))
            }
        });
        let mut out: Vec<Option<HistoryResult>> = Vec::new();
        for r in futures::future::join_all(calls).await {
            let (idx, results) = r?;
            for (i, res) in idx.into_iter().zip(results) {
                if out.len() <= i {
                    out.resize(i + 1, None);
                }
                out[i] = Some(res);
            }
        }
        out.into_iter()
            .map(|r| {
                r.ok_or_else(|| {
                    tonic::Status::internal("controller answered fewer results than asked")
                })
            })
            .collect()
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
        let link = Arc::new(Link {
            id: id.to_owned(),
            addr: addr.to_owned(),
            client: channel(),
            reports: channel(),
            queue: Mutex::new(Queue {
                full_sync: true,
                ..Queue::default()
            }),
            notify: Notify::new(),
            stop: CancellationToken::new(),
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
            tokio::select! {
                _ = link.stop.cancelled() => return,
                _ = link.notify.notified() => {}
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
        if resp.resync_required {
            q.full_sync = true;
            return Ok(true);
        }
        if let Some(f) = q.inflight.take() {
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
            };
            (req, waiters)
        });
        let mut r = tonic::Request::new(req);
        r.set_timeout(self.cfg.call_timeout);
        match client.clone().sync(r).await {
            Ok(_) => {
                tracing::debug!(controller = %link.id, "full sync sent");
                for w in waiters {
                    let _ = w.send(());
                }
                Ok(!link.queue.lock().changes.is_empty())
            }
            Err(e) => {
                let mut q = link.queue.lock();
                q.full_sync = true;
                let mut w = waiters;
                w.append(&mut q.waiters);
                q.waiters = w;
                Err(e)
            }
        }
    }
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
