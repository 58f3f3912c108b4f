//! [`TestCluster`]: real barrage servers (controllers, connect-nodes,
//! push-managers) started in this process on `127.0.0.1:0`, over a real
//! etcd or the in-process registry, torn down on drop.
//!
//! Each server gets its own discovery client (its own etcd connection), as
//! separate processes would; with the in-process registry they share one
//! store, as `barrage dev` does.

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use barrage_discovery::{Discovery, Role};
use barrage_proto::v1::push_manager_client::PushManagerClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::EtcdServer;

/// Awaits `fut` for at most `limit`, naming `what` on timeout.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = T>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("timed out after {limit:?} waiting for {what}"))
}

/// Polls `check` until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(Some(v)) = tokio::time::timeout_at(deadline, check()).await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Where the cluster's processes find each other.
enum Registry {
    InProcess(Discovery),
    Etcd(EtcdServer),
}

/// One server started by the cluster.
pub struct Server {
    /// Its id in discovery.
    pub id: String,
    /// Its role.
    pub role: Role,
    /// gRPC address.
    pub grpc_addr: String,
    /// HTTP (metrics, health) address.
    pub http_addr: String,
    /// WebSocket address (connect-nodes).
    pub ws_addr: Option<String>,
    /// The server's metrics.
    pub registry: prometheus::Registry,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    /// `ws://<addr>/ws` of a connect-node.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.ws_addr.as_deref().unwrap_or("?"))
    }

    /// Graceful stop: drain and wait for the server to exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            within(Duration::from_secs(20), "server to stop", task)
                .await??
                .context("server run")?;
        }
        Ok(())
    }

    /// The value of one series, e.g. `connect_node_rejected_total{reason="tls"}`;
    /// 0 when the series is absent.
    pub fn metric(&self, series: &str) -> f64 {
        metric(&self.registry, series)
    }

    /// The server's `/metrics` text.
    pub fn metrics(&self) -> String {
        metrics_text(&self.registry)
    }
}

/// The value of one series in `registry` (a server's, cloned to be read
/// while the cluster is borrowed elsewhere); 0 when the series is absent.
pub fn metric(registry: &prometheus::Registry, series: &str) -> f64 {
    metrics_text(registry)
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

fn metrics_text(registry: &prometheus::Registry) -> String {
    let mut buf = Vec::new();
    let _ = prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &registry.gather(),
        &mut buf,
    );
    String::from_utf8(buf).unwrap_or_default()
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Settings for servers the cluster starts.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Discovery lease TTL.
    pub lease_ttl: Duration,
    /// Per-node push timeout in push-managers.
    pub push_timeout: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            lease_ttl: Duration::from_secs(3),
            push_timeout: Duration::from_secs(3),
        }
    }
}

/// A barrage cluster in this process.
pub struct TestCluster {
    registry: Registry,
    options: ClusterOptions,
    /// Controllers, in start order.
    pub controllers: Vec<Server>,
    /// Connect-nodes, in start order.
    pub nodes: Vec<Server>,
    /// Push-managers, in start order.
    pub managers: Vec<Server>,
}

async fn loopback() -> anyhow::Result<TcpListener> {
    Ok(TcpListener::bind("127.0.0.1:0").await?)
}

impl TestCluster {
    /// An empty cluster on the in-process registry.
    pub fn in_process() -> Self {
        Self::new(Registry::InProcess(Discovery::in_process()))
    }

    /// An empty cluster on a fresh real etcd.
    pub async fn with_etcd() -> anyhow::Result<Self> {
        Ok(Self::new(Registry::Etcd(EtcdServer::start().await?)))
    }

    fn new(registry: Registry) -> Self {
        TestCluster {
            registry,
            options: ClusterOptions::default(),
            controllers: Vec::new(),
            nodes: Vec::new(),
            managers: Vec::new(),
        }
    }

    /// Changes the options for servers started from now on.
    pub fn set_options(&mut self, options: ClusterOptions) {
        self.options = options;
    }

    /// Whether this cluster runs on a real etcd.
    pub fn is_etcd(&self) -> bool {
        matches!(self.registry, Registry::Etcd(_))
    }

    /// A discovery client, as a new process would open.
    pub async fn discovery(&self) -> anyhow::Result<Discovery> {
        match &self.registry {
            Registry::InProcess(d) => Ok(d.clone()),
            Registry::Etcd(etcd) => Ok(Discovery::etcd(&[etcd.endpoint()], "/barrage").await?),
        }
    }

    /// The etcd server, when the cluster runs on one.
    pub fn etcd(&mut self) -> Option<&mut EtcdServer> {
        match &mut self.registry {
            Registry::Etcd(e) => Some(e),
            Registry::InProcess(_) => None,
        }
    }

    /// A standard cluster: one controller, `nodes` connect-nodes, one push-manager.
    pub async fn start(&mut self, nodes: usize) -> anyhow::Result<()> {
        self.start_controller("controller-1").await?;
        for i in 1..=nodes {
            self.start_node(&format!("node-{i}")).await?;
        }
        self.start_manager("manager-1").await?;
        Ok(())
    }

    /// Starts a controller and waits until it is registered.
    pub async fn start_controller(&mut self, id: &str) -> anyhow::Result<&Server> {
        self.start_controller_with(id, |_| {}).await
    }

    /// Starts a controller with settings adjusted by `tweak`.
    pub async fn start_controller_with(
        &mut self,
        id: &str,
        tweak: impl FnOnce(&mut barrage_controller::Config),
    ) -> anyhow::Result<&Server> {
        let (grpc, http) = (loopback().await?, loopback().await?);
        let (grpc_addr, http_addr) = (
            grpc.local_addr()?.to_string(),
            http.local_addr()?.to_string(),
        );
        let discovery = self.discovery().await?;
        let mut cfg = barrage_controller::Config {
            node_id: id.to_owned(),
            lease_ttl: self.options.lease_ttl,
            ..Default::default()
        };
        tweak(&mut cfg);
        let addrs = (grpc_addr, http_addr, None);
        self.launch(
            Role::Controller,
            id,
            addrs,
            |registry, shutdown| async move {
                barrage_controller::run(
                    cfg,
                    barrage_controller::Listeners { grpc, http },
                    Some(discovery),
                    registry,
                    shutdown,
                )
                .await
                .map_err(Into::into)
            },
        )
        .await
    }

    /// Starts a connect-node (insecure `?user_id=` mode) and waits until
    /// it is registered and has synced with the controllers.
    pub async fn start_node(&mut self, id: &str) -> anyhow::Result<&Server> {
        self.start_node_with(id, |_| {}).await
    }

    /// Starts a connect-node with settings adjusted by `tweak`.
    pub async fn start_node_with(
        &mut self,
        id: &str,
        tweak: impl FnOnce(&mut barrage_connect_node::Config),
    ) -> anyhow::Result<&Server> {
        let (ws, grpc, http) = (loopback().await?, loopback().await?, loopback().await?);
        let ws_addr = ws.local_addr()?.to_string();
        let (grpc_addr, http_addr) = (
            grpc.local_addr()?.to_string(),
            http.local_addr()?.to_string(),
        );
        let discovery = self.discovery().await?;
        let controllers = discovery.watch(Role::Controller).await?;
        let mut cfg = barrage_connect_node::Config {
            node_id: id.to_owned(),
            lease_ttl: self.options.lease_ttl,
            insecure_user_id: true,
            heartbeat: Duration::from_millis(200),
            drain_timeout: Duration::from_millis(500),
            ..Default::default()
        };
        tweak(&mut cfg);
        let addrs = (grpc_addr, http_addr, Some(ws_addr));
        self.launch(
            Role::ConnectNode,
            id,
            addrs,
            |registry, shutdown| async move {
                barrage_connect_node::run(
                    cfg,
                    barrage_connect_node::Listeners { ws, grpc, http },
                    controllers,
                    Some(discovery),
                    registry,
                    shutdown,
                )
                .await
                .map_err(Into::into)
            },
        )
        .await
    }

    /// Starts a push-manager and waits until it is registered.
    pub async fn start_manager(&mut self, id: &str) -> anyhow::Result<&Server> {
        self.start_manager_with(id, |_| {}).await
    }

    /// Starts a push-manager with settings adjusted by `tweak`.
    pub async fn start_manager_with(
        &mut self,
        id: &str,
        tweak: impl FnOnce(&mut barrage_push_manager::Config),
    ) -> anyhow::Result<&Server> {
        let (grpc, http) = (loopback().await?, loopback().await?);
        let (grpc_addr, http_addr) = (
            grpc.local_addr()?.to_string(),
            http.local_addr()?.to_string(),
        );
        let discovery = self.discovery().await?;
        let peers = barrage_push_manager::Peers {
            controllers: discovery.watch(Role::Controller).await?,
            nodes: Some(discovery.watch(Role::ConnectNode).await?),
            discovery: Some(discovery),
        };
        let mut cfg = barrage_push_manager::Config {
            node_id: id.to_owned(),
            lease_ttl: self.options.lease_ttl,
            node_timeout: self.options.push_timeout,
            ..Default::default()
        };
        tweak(&mut cfg);
        let addrs = (grpc_addr, http_addr, None);
        self.launch(
            Role::PushManager,
            id,
            addrs,
            |registry, shutdown| async move {
                barrage_push_manager::run(
                    cfg,
                    barrage_push_manager::Listeners { grpc, http },
                    peers,
                    registry,
                    shutdown,
                )
                .await
                .map_err(Into::into)
            },
        )
        .await
    }

    /// Runs a role's server task with its own registry and shutdown token,
    /// keeps it in the cluster, and waits until it is registered.
    async fn launch<F>(
        &mut self,
        role: Role,
        id: &str,
        (grpc_addr, http_addr, ws_addr): (String, String, Option<String>),
        run: impl FnOnce(prometheus::Registry, CancellationToken) -> F,
    ) -> anyhow::Result<&Server>
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let registry = prometheus::Registry::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(registry.clone(), shutdown.clone()));
        self.servers_mut(role).push(Server {
            id: id.to_owned(),
            role,
            grpc_addr,
            http_addr,
            ws_addr,
            registry,
            shutdown,
            task: Some(task),
        });
        self.await_registered(role, id).await?;
        Ok(self.servers_mut(role).last().expect("just pushed"))
    }

    fn servers_mut(&mut self, role: Role) -> &mut Vec<Server> {
        match role {
            Role::Controller => &mut self.controllers,
            Role::ConnectNode => &mut self.nodes,
            Role::PushManager => &mut self.managers,
        }
    }

    async fn await_registered(&self, role: Role, id: &str) -> anyhow::Result<()> {
        let mut watch = self.discovery().await?.watch(role).await?;
        let what = format!("{role} {id} to register");
        within(Duration::from_secs(15), &what, async {
            while !watch.current().contains_key(id) {
                if watch.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
    }

    /// The connect-node with this id.
    pub fn node(&mut self, id: &str) -> anyhow::Result<&mut Server> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| anyhow!("no connect-node {id}"))
    }

    /// A client of the first push-manager's public API.
    pub async fn push_client(&self) -> anyhow::Result<PushManagerClient<Channel>> {
        let m = self
            .managers
            .first()
            .ok_or_else(|| anyhow!("no push-manager started"))?;
        let ch = within(
            Duration::from_secs(10),
            "connect to push-manager",
            Channel::from_shared(format!("http://{}", m.grpc_addr))?.connect(),
        )
        .await??;
        Ok(PushManagerClient::new(ch))
    }
}
