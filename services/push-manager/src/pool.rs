//! Long-lived gRPC channels to connect-nodes and controllers, kept in step
//! with discovery. A push never opens a connection: it picks a channel
//! from the pool (tonic channels reconnect on their own).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use barrage_discovery::Members;
use barrage_discovery::ring::Ring;
use barrage_proto::v1::connect_node_client::ConnectNodeClient;
use barrage_proto::v1::controller_client::ControllerClient;
use parking_lot::RwLock;
use prometheus::IntGauge;
use tonic::transport::Channel;

/// How channels are dialled: deadline and TLS.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// Deadline of establishing a connection.
    pub connect_timeout: Duration,
    /// TLS of the calls.
    pub tls: barrage_proto::GrpcTls,
}

impl Dialer {
    /// A lazily connected channel to `addr` (`host:port`).
    pub fn channel(&self, addr: &str) -> Option<Channel> {
        channel(addr, self)
    }
}

fn channel(addr: &str, dialer: &Dialer) -> Option<Channel> {
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

#[derive(Clone)]
struct Entry {
    addr: String,
    client: ConnectNodeClient<Channel>,
}

/// Channels to connect-nodes by node id.
pub struct NodePool {
    nodes: RwLock<HashMap<String, Entry>>,
    gauge: IntGauge,
    dialer: Dialer,
}

impl NodePool {
    /// An empty pool; its size is exported on `gauge`.
    pub fn new(gauge: IntGauge, dialer: Dialer) -> Arc<Self> {
        Arc::new(NodePool {
            nodes: RwLock::new(HashMap::new()),
            gauge,
            dialer,
        })
    }

    /// The client for `node_id`. When the node is not pooled yet (discovery
    /// lags, or there is no discovery) and the controller told us its
    /// address, a channel is added for it.
    pub fn get(
        &self,
        node_id: &str,
        addr_hint: Option<&str>,
    ) -> Option<ConnectNodeClient<Channel>> {
        if let Some(e) = self.nodes.read().get(node_id)
            && addr_hint.is_none_or(|a| a == e.addr)
        {
            return Some(e.client.clone());
        }
        let addr = addr_hint?;
        let client = ConnectNodeClient::new(self.dialer.channel(addr)?);
        let mut nodes = self.nodes.write();
        nodes.insert(
            node_id.to_owned(),
            Entry {
                addr: addr.to_owned(),
                client: client.clone(),
            },
        );
        self.gauge.set(nodes.len() as i64);
        Some(client)
    }

    /// Makes the pool match discovery: new nodes get a channel, changed
    /// addresses a new one, departed nodes lose theirs.
    pub fn sync(&self, members: &Members) {
        let mut nodes = self.nodes.write();
        nodes.retain(|id, e| members.get(id).is_some_and(|m| m.grpc_addr == e.addr));
        for (id, m) in members {
            if !nodes.contains_key(id)
                && let Some(ch) = self.dialer.channel(&m.grpc_addr)
            {
                nodes.insert(
                    id.clone(),
                    Entry {
                        addr: m.grpc_addr.clone(),
                        client: ConnectNodeClient::new(ch),
                    },
                );
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

/// A controller's address and client, as held on the ring.
type ControllerEntry = (String, ControllerClient<Channel>);

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
    pub fn owner(&self, key: &str) -> Option<(String, ControllerClient<Channel>)> {
        let ring = self.ring.read().clone();
        ring.owner(key)
            .map(|(id, (_, c))| (id.to_owned(), c.clone()))
    }

    /// Number of controllers on the ring.
    pub fn len(&self) -> usize {
        self.ring.read().len()
    }

    /// Whether no controller is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts `members` on the ring, keeping the channels of controllers that stay.
    pub fn rebuild(&self, members: &Members) {
        let old = self.ring.read().clone();
        let mut entries = Vec::with_capacity(members.len());
        for (id, m) in members {
            let reuse = old
                .members()
                .find(|(oid, (addr, _))| *oid == id && *addr == m.grpc_addr)
                .map(|(_, e)| e.clone());
            let entry = match reuse {
                Some(e) => e,
                None => match self.dialer.channel(&m.grpc_addr) {
                    Some(ch) => (m.grpc_addr.clone(), ControllerClient::new(ch)),
                    None => continue,
                },
            };
            entries.push((id.clone(), entry));
        }
        *self.ring.write() = Arc::new(Ring::new(entries, self.vnodes));
    }
}
