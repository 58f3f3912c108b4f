//! Long-lived gRPC channels to connect-nodes and controllers, kept in step
//! with discovery. A push never opens a connection: it picks a channel
//! from the pool (tonic channels reconnect on their own). Pushes reach each
//! peer through its [`Coalescer`], which merges pushes queued behind busy
//! calls into one `PushMessageBatch` or `ResolveBatch`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use barrage_discovery::Members;
use barrage_discovery::ring::Ring;
use barrage_proto::PeerChannel;
use barrage_proto::v1::connect_node_client::ConnectNodeClient;
use barrage_proto::v1::controller_client::ControllerClient;
use barrage_proto::v1::{
    BatchMessage, PushMessageBatchRequest, ResolveBatchRequest, ResolveRequest, ResolveResponse,
    resolve_result,
};
use futures::future::join_all;
use parking_lot::RwLock;
use prometheus::IntGauge;
use prost::Message as _;
use tonic::{Code, Request, Status};

use crate::complete::{Completer, LINGER};
use barrage_proto::coalesce::{BatchCall, BatchLimits, Coalescer, SharedBatchCall};

/// How channels are dialled and calls made: deadlines, TLS, batching.
#[derive(Clone)]
pub struct Dialer {
    /// Deadline of establishing a connection.
    pub connect_timeout: Duration,
    /// Deadline of one call.
    pub call_timeout: Duration,
    /// TLS of the calls.
    pub tls: barrage_proto::GrpcTls,
    /// Calls in flight per peer, and the size of merged calls.
    pub batching: BatchLimits,
    /// Items per call, by peer role (`push_manager_peer_call_items`).
    pub call_items: prometheus::HistogramVec,
    /// Roles in this process, called directly instead of over the network.
    pub local: barrage_proto::LocalPeers,
}

/// A request with the call deadline and the current trace context.
pub(crate) fn request<T>(msg: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(msg);
    req.set_timeout(timeout);
    barrage_telemetry::inject(&mut req);
    req
}

/// Deliveries to one connect-node: the connections each message reached.
pub type NodeSender = Coalescer<BatchMessage, u32>;

/// Resolves at one controller: each request's own answer.
pub type Resolver = Coalescer<ResolveRequest, Result<ResolveResponse, Status>>;

/// A sender merging messages for `client` into `PushMessageBatch` calls.
fn node_sender(client: ConnectNodeClient<PeerChannel>, dialer: &Dialer) -> NodeSender {
    let timeout = dialer.call_timeout;
    let items = dialer.call_items.with_label_values(&["connect-node"]);
    Coalescer::new(
        dialer.batching,
        BatchMessage::encoded_len,
        items,
        move |messages| {
            let mut client = client.clone();
            let req = request(PushMessageBatchRequest { messages }, timeout);
            async move {
                match tokio::time::timeout(timeout, client.push_message_batch(req)).await {
                    Ok(Ok(resp)) => Ok(resp
                        .into_inner()
                        .results
                        .iter()
                        .map(|r| r.delivered)
                        .collect()),
                    Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
                    Err(_) => Err(format!("timed out after {timeout:?}")),
                }
            }
        },
    )
}

/// A resolver merging requests to `client` into `ResolveBatch` calls. A lone
/// request goes as a plain `Resolve`, and so does every request of a batch
/// when the controller predates `ResolveBatch`.
fn resolver(client: ControllerClient<PeerChannel>, dialer: &Dialer) -> Resolver {
    let timeout = dialer.call_timeout;
    let items = dialer.call_items.with_label_values(&["controller"]);
    let support = Arc::new(SharedBatchCall::default());
    Coalescer::new(
        dialer.batching,
        ResolveRequest::encoded_len,
        items,
        move |requests| {
            let span = tracing::Span::current();
            let single = client.clone();
            let one = move |r: ResolveRequest| {
                let mut client = single.clone();
                let req = span.in_scope(|| request(r, timeout));
                async move { client.resolve(req).await.map(tonic::Response::into_inner) }
            };
            let said = support.get();
            // Several requests go as one ResolveBatch, unless the
            // controller does not know it; they are copied only until it
            // has served one, to be sent one by one should it not.
            let (batch, kept) = if requests.len() > 1 && said != BatchCall::Unimplemented {
                let kept = (said == BatchCall::Unknown).then(|| requests.clone());
                let mut client = client.clone();
                let req = request(ResolveBatchRequest { requests }, timeout);
                (Some(async move { client.resolve_batch(req).await }), kept)
            } else {
                (None, Some(requests))
            };
            let support = support.clone();
            async move {
                if let Some(batch) = batch {
                    match batch.await {
                        Ok(resp) => {
                            support.set(BatchCall::Served);
                            return Ok(resp
                                .into_inner()
                                .results
                                .into_iter()
                                .map(from_result)
                                .collect());
                        }
                        Err(s) if s.code() == Code::Unimplemented => support.set(match kept {
                            Some(_) => BatchCall::Unimplemented,
                            // It served one before: ask again next time.
                            None => BatchCall::Unknown,
                        }),
                        Err(s) => return Err(s.message().to_owned()),
                    }
                }
                match kept {
                    Some(requests) => Ok(join_all(requests.into_iter().map(one)).await),
                    None => Err(
                        "the controller stopped serving ResolveBatch; nothing was delivered"
                            .to_owned(),
                    ),
                }
            }
        },
    )
}

/// One `ResolveBatch` result as the `Resolve` call would have answered.
fn from_result(r: barrage_proto::v1::ResolveResult) -> Result<ResolveResponse, Status> {
    match r.outcome {
        Some(resolve_result::Outcome::Resolved(r)) => Ok(r),
        Some(resolve_result::Outcome::Error(e)) => Err(Status::new(Code::from(e.code), e.message)),
        None => Err(Status::internal("the controller sent an empty result")),
    }
}

impl Dialer {
    /// The role serving `addr` (`host:port`): the service itself when it
    /// runs in this process, else a lazily connected channel.
    pub fn channel(&self, addr: &str) -> Option<PeerChannel> {
        if let Some(local) = self.local.get(addr, self.call_timeout) {
            return Some(local);
        }
        channel(addr, self).map(barrage_proto::local::network)
    }
}

fn channel(addr: &str, dialer: &Dialer) -> Option<tonic::transport::Channel> {
    let connect_timeout = dialer.connect_timeout;
    match dialer.tls.endpoint(addr) {
        Ok(e) => Some(
            e.connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                .connect_lazy(),
        ),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "bad gRPC address");
            None
        }
    }
}

/// A pooled connect-node: its client, the sender pushes go through, and
/// its metric series.
#[derive(Clone)]
pub struct Node {
    /// For calls other than deliveries.
    pub client: ConnectNodeClient<PeerChannel>,
    /// Deliveries, merged while calls are busy.
    pub sender: Arc<NodeSender>,
    /// Its series, for pushes to observe. A push that ends after the node
    /// left the pool writes to series no longer exported, instead of
    /// bringing them back for a node that is gone.
    pub series: NodeSeries,
}

/// One connect-node's series of [`PerNodeSeries`].
#[derive(Clone)]
pub struct NodeSeries {
    /// `push_manager_node_batch_duration_seconds{node}`.
    pub duration: prometheus::Histogram,
    /// `push_manager_node_batch_errors_total{node}`.
    pub errors: prometheus::IntCounter,
}

struct Entry {
    addr: String,
    node: Node,
    /// For a node learned from a controller's answer, not from discovery:
    /// when a push last asked for it, in seconds of the pool's clock (it is
    /// kept while pushes do, see [`NodePool::forget_unused`]).
    used: Option<AtomicU64>,
}

impl Entry {
    fn new(node_id: &str, addr: &str, pool: &NodePool, learned_at: Option<u64>) -> Option<Entry> {
        let dialer = &pool.dialer;
        let client = ConnectNodeClient::new(dialer.channel(addr)?)
            .max_decoding_message_size(barrage_proto::PEER_MESSAGE_LIMIT);
        Some(Entry {
            addr: addr.to_owned(),
            node: Node {
                sender: Arc::new(node_sender(client.clone(), dialer)),
                client,
                series: pool.series.of(node_id),
            },
            used: learned_at.map(AtomicU64::new),
        })
    }
}

/// Metric series kept per connect-node (labelled `node`): they exist while
/// the node is pooled, from the moment it is (so that its error rate is 0,
/// not absent), and are dropped when it leaves, so that replaced pods leave
/// no series behind.
#[derive(Clone)]
pub struct PerNodeSeries {
    /// `push_manager_node_batch_duration_seconds{node}`.
    pub duration: prometheus::HistogramVec,
    /// `push_manager_node_batch_errors_total{node}`.
    pub errors: prometheus::IntCounterVec,
}

impl PerNodeSeries {
    fn of(&self, node_id: &str) -> NodeSeries {
        NodeSeries {
            duration: self.duration.with_label_values(&[node_id]),
            errors: self.errors.with_label_values(&[node_id]),
        }
    }

    fn forget(&self, node_id: &str) {
        let _ = self.duration.remove_label_values(&[node_id]);
        let _ = self.errors.remove_label_values(&[node_id]);
    }
}

/// Channels to connect-nodes by node id.
pub struct NodePool {
    nodes: RwLock<HashMap<String, Entry>>,
    gauge: IntGauge,
    series: PerNodeSeries,
    dialer: Dialer,
    /// The pool's clock starts here.
    start: tokio::time::Instant,
}

impl NodePool {
    /// An empty pool; its size is exported on `gauge`, and a node's
    /// `series` are dropped when it leaves.
    pub fn new(gauge: IntGauge, series: PerNodeSeries, dialer: Dialer) -> Arc<Self> {
        Arc::new(NodePool {
            nodes: RwLock::new(HashMap::new()),
            gauge,
            series,
            dialer,
            start: tokio::time::Instant::now(),
        })
    }

    fn clock(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// Drops the nodes learned from controllers' answers that no push has
    /// asked for in `idle`: without discovery, nothing else tells that a
    /// node is gone. Returns their ids.
    pub fn forget_unused(&self, idle: Duration) -> Vec<String> {
        let now = self.clock();
        let mut nodes = self.nodes.write();
        let mut gone = Vec::new();
        nodes.retain(|id, e| {
            let keep = e.used.as_ref().is_none_or(|used| {
                now.saturating_sub(used.load(Ordering::Relaxed)) < idle.as_secs()
            });
            if !keep {
                gone.push(id.clone());
            }
            keep
        });
        self.gauge.set(nodes.len() as i64);
        for id in &gone {
            self.series.forget(id);
        }
        gone
    }

    /// The pooled node `node_id`, for calls other than pushes: it does not
    /// count as a use that keeps a learned node pooled.
    pub fn peek(&self, node_id: &str) -> Option<Node> {
        self.nodes.read().get(node_id).map(|e| e.node.clone())
    }

    /// The node `node_id`, for a push. When it is not pooled yet (discovery lags, or
    /// there is no discovery) and the controller told us its address, a
    /// channel is added for it.
    pub fn get(&self, node_id: &str, addr_hint: Option<&str>) -> Option<Node> {
        if let Some(e) = self.nodes.read().get(node_id)
            && addr_hint.is_none_or(|a| a == e.addr)
        {
            if let Some(used) = &e.used {
                used.store(self.clock(), Ordering::Relaxed);
            }
            return Some(e.node.clone());
        }
        let addr = addr_hint?;
        let mut nodes = self.nodes.write();
        // Another push may have added it meanwhile: one sender per node.
        if let Some(e) = nodes.get(node_id)
            && e.addr == addr
        {
            return Some(e.node.clone());
        }
        let entry = Entry::new(node_id, addr, self, Some(self.clock()))?;
        let node = entry.node.clone();
        nodes.insert(node_id.to_owned(), entry);
        self.gauge.set(nodes.len() as i64);
        Some(node)
    }

    /// Makes the pool match discovery: new nodes get a channel, changed
    /// addresses a new one, departed nodes lose theirs.
    pub fn sync(&self, members: &Members) {
        let mut nodes = self.nodes.write();
        nodes.retain(|id, e| {
            let keep = members.get(id).is_some_and(|m| m.grpc_addr == e.addr);
            if !keep && !members.contains_key(id) {
                self.series.forget(id);
            }
            keep
        });
        for (id, m) in members {
            if !nodes.contains_key(id)
                && let Some(e) = Entry::new(id, &m.grpc_addr, self, None)
            {
                nodes.insert(id.clone(), e);
            }
        }
        self.gauge.set(nodes.len() as i64);
    }

    /// Ids of pooled nodes, sorted.
    pub fn node_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.nodes.read().keys().cloned().collect();
        ids.sort();
        ids
    }
}

/// A controller as held on the ring.
#[derive(Clone)]
struct ControllerEntry {
    /// Its gRPC address, to tell a moved controller from one that stays.
    addr: String,
    /// For calls other than pushes.
    client: ControllerClient<PeerChannel>,
    /// Resolves of pushes, merged while calls are busy.
    resolver: Arc<Resolver>,
    /// Where the results of pushes with a `message_id` are recorded.
    completer: Arc<Completer>,
}

/// Channels to controllers, on the consistent-hash ring that assigns keys.
pub struct ControllerRing {
    ring: RwLock<Arc<Ring<ControllerEntry>>>,
    vnodes: usize,
    dialer: Dialer,
}

impl ControllerRing {
    /// An empty ring with `vnodes` points per controller.
    pub fn new(vnodes: usize, dialer: Dialer) -> Arc<Self> {
        Arc::new(ControllerRing {
            ring: RwLock::new(Arc::new(Ring::new(Vec::new(), vnodes))),
            vnodes,
            dialer,
        })
    }

    /// The owner of `key`: its id and client.
    pub fn owner(&self, key: &str) -> Option<(String, ControllerClient<PeerChannel>)> {
        let ring = self.ring.read().clone();
        ring.owner(key)
            .map(|(id, e)| (id.to_owned(), e.client.clone()))
    }

    /// The owner of `key`: its id and the resolver of pushes to it.
    pub fn resolver(&self, key: &str) -> Option<(String, Arc<Resolver>)> {
        let ring = self.ring.read().clone();
        ring.owner(key)
            .map(|(id, e)| (id.to_owned(), e.resolver.clone()))
    }

    /// The owner of `key`: where the results of pushes to it are recorded.
    pub fn completer(&self, key: &str) -> Option<Arc<Completer>> {
        let ring = self.ring.read().clone();
        ring.owner(key).map(|(_, e)| e.completer.clone())
    }

    /// Number of controllers on the ring.
    pub fn len(&self) -> usize {
        self.ring.read().len()
    }

    /// Whether no controller is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sends the push results still queued for each controller, and
    /// stops recording.
    pub async fn flush_records(&self) {
        let ring = self.ring.read().clone();
        join_all(ring.members().map(|(_, e)| e.completer.flush())).await;
    }

    /// Puts `members` on the ring, keeping the channels of controllers that stay.
    pub fn rebuild(&self, members: &Members) {
        let old = self.ring.read().clone();
        let mut entries = Vec::with_capacity(members.len());
        for (id, m) in members {
            let reuse = old
                .members()
                .find(|(oid, e)| *oid == id && e.addr == m.grpc_addr)
                .map(|(_, e)| e.clone());
            let entry = match reuse {
                Some(e) => e,
                None => match self.dialer.channel(&m.grpc_addr) {
                    Some(ch) => {
                        let client = ControllerClient::new(ch)
                            .max_decoding_message_size(barrage_proto::PEER_MESSAGE_LIMIT);
                        ControllerEntry {
                            addr: m.grpc_addr.clone(),
                            resolver: Arc::new(resolver(client.clone(), &self.dialer)),
                            completer: Arc::new(Completer::new(
                                client.clone(),
                                self.dialer.call_timeout,
                                LINGER,
                            )),
                            client,
                        }
                    }
                    None => continue,
                },
            };
            entries.push((id.clone(), entry));
        }
        *self.ring.write() = Arc::new(Ring::new(entries, self.vnodes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series() -> PerNodeSeries {
        PerNodeSeries {
            duration: prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new("duration", "per node"),
                &["node"],
            )
            .expect("histogram"),
            errors: prometheus::IntCounterVec::new(
                prometheus::Opts::new("errors", "per node"),
                &["node"],
            )
            .expect("counter"),
        }
    }

    fn pool() -> Arc<NodePool> {
        pool_with(series())
    }

    fn pool_with(series: PerNodeSeries) -> Arc<NodePool> {
        let dialer = Dialer {
            connect_timeout: Duration::from_secs(1),
            call_timeout: Duration::from_secs(1),
            tls: barrage_proto::GrpcTls::plaintext(),
            batching: BatchLimits {
                max_in_flight: 1,
                max_items: 8,
                max_bytes: 1 << 20,
            },
            call_items: prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new("items", "items per call"),
                &["peer"],
            )
            .expect("histogram"),
            local: barrage_proto::LocalPeers::default(),
        };
        NodePool::new(
            IntGauge::new("nodes", "pooled nodes").expect("gauge"),
            series,
            dialer,
        )
    }

    fn member(id: &str, addr: &str) -> (String, barrage_discovery::Member) {
        (
            id.to_owned(),
            barrage_discovery::Member {
                id: id.into(),
                role: barrage_discovery::Role::ConnectNode,
                grpc_addr: addr.into(),
                http_addr: String::new(),
                ws_addr: None,
            },
        )
    }

    /// A node's series go with it: replaced pods leave none behind, even
    /// when a push to one ends after it left. One that only moved to a new
    /// address keeps them.
    #[tokio::test]
    async fn a_node_that_leaves_takes_its_series_with_it() {
        let s = series();
        let pool = pool_with(s.clone());
        let both: Members = [member("a", "127.0.0.1:1"), member("b", "127.0.0.1:2")]
            .into_iter()
            .collect();
        pool.sync(&both);
        let a = pool.get("a", None).expect("a is pooled");
        for id in ["a", "b"] {
            let node = pool.get(id, None).expect("pooled");
            node.series.duration.observe(0.001);
            node.series.errors.inc();
        }
        let b_moved: Members = [member("b", "127.0.0.1:3")].into_iter().collect();
        pool.sync(&b_moved);
        // A push to `a` that was under way ends now.
        a.series.duration.observe(0.002);
        a.series.errors.inc();
        assert_eq!(pool.node_ids(), vec!["b".to_owned()]);
        assert!(s.duration.get_metric_with_label_values(&["b"]).is_ok());
        let names = |v: &dyn prometheus::core::Collector| {
            v.collect()
                .iter()
                .flat_map(|f| f.get_metric().to_vec())
                .map(|m| m.get_label()[0].value().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&s.errors), vec!["b".to_owned()]);
        assert_eq!(names(&s.duration), vec!["b".to_owned()]);
        assert_eq!(s.errors.with_label_values(&["b"]).get(), 1, "kept");
    }

    /// Without discovery, nodes learned from controllers' answers are
    /// dropped once no push has asked for them in a while; nodes from
    /// discovery stay until discovery drops them.
    #[tokio::test(start_paused = true)]
    async fn learned_nodes_no_push_asks_for_are_forgotten() {
        let pool = pool();
        let listed: Members = [(
            "listed".to_owned(),
            barrage_discovery::Member {
                id: "listed".into(),
                role: barrage_discovery::Role::ConnectNode,
                grpc_addr: "127.0.0.1:1".into(),
                http_addr: String::new(),
                ws_addr: None,
            },
        )]
        .into_iter()
        .collect();
        pool.sync(&listed);
        assert!(pool.get("busy", Some("127.0.0.1:2")).is_some());
        assert!(pool.get("gone", Some("127.0.0.1:3")).is_some());
        let idle = Duration::from_secs(600);
        tokio::time::advance(Duration::from_secs(400)).await;
        assert!(pool.get("busy", None).is_some(), "asked for again");
        assert!(pool.peek("gone").is_some(), "looked at, not used");
        assert!(pool.forget_unused(idle).is_empty());
        tokio::time::advance(Duration::from_secs(300)).await;
        assert_eq!(pool.forget_unused(idle), ["gone"]);
        assert_eq!(pool.node_ids(), ["busy", "listed"]);
        assert_eq!(pool.gauge.get(), 2);
        // A later answer naming it adds it again.
        assert!(pool.get("gone", Some("127.0.0.1:3")).is_some());
        assert_eq!(pool.node_ids(), ["busy", "gone", "listed"]);
    }
}
