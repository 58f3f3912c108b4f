//! barrage controller: tracks which connect-nodes host which users and
//! rooms, and owns the message streams of its keys.
//!
//! Connect-nodes report session changes here in batches (`Report`, `Sync`);
//! push-manager asks which nodes host a target and gets the message's stream
//! position in the same call (`Resolve`). The state is soft: it is rebuilt
//! from connect-node reports after a restart, and a node whose discovery
//! registration disappears (or that falls silent) is dropped.

mod metrics;
pub mod ownership;
mod service;
pub mod state;
pub mod streams;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use barrage_discovery::{Discovery, Member, MemberWatch, Role};
use barrage_proto::v1::controller_server::ControllerServer;
use barrage_telemetry::Readiness;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
use ownership::Ownership;
pub use service::ControllerService;
use state::{ControllerState, Membership};
use streams::Streams;
pub use streams::{MAX_STREAMS, MAX_TOTAL_BYTES, Retention, StreamConfig};

/// Controller settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Id registered in discovery.
    pub node_id: String,
    /// gRPC address others use to reach this controller; the gRPC
    /// listener's local address when empty.
    pub advertise_addr: String,
    /// TTL of the discovery lease.
    pub lease_ttl: Duration,
    /// A connect-node not heard from for this long is dropped.
    pub node_timeout: Duration,
    /// History retention.
    pub streams: StreamConfig,
    /// Virtual nodes per controller on the hash ring.
    pub ring_vnodes: usize,
    /// After the controller ring changes, pushes wait at most this long for
    /// connect-nodes to re-send their state (UNAVAILABLE meanwhile).
    pub warmup: Duration,
    /// TLS of the gRPC port and of calls to other roles.
    pub grpc_tls: barrage_proto::GrpcTls,
    /// Where roles in this process (`barrage dev`) find this controller's
    /// service, to call it without the network.
    pub local_peers: barrage_proto::LocalPeers,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "controller-1".into(),
            advertise_addr: String::new(),
            lease_ttl: Duration::from_secs(10),
            node_timeout: Duration::from_secs(10),
            streams: StreamConfig::default(),
            ring_vnodes: barrage_discovery::ring::DEFAULT_VNODES,
            warmup: Duration::from_secs(5),
            grpc_tls: barrage_proto::GrpcTls::plaintext(),
            local_peers: barrage_proto::LocalPeers::default(),
        }
    }
}

/// Sockets the controller serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (`barrage.v1.Controller`, health, reflection).
    pub grpc: TcpListener,
    /// HTTP (`/metrics`, `/healthz`, `/readyz`).
    pub http: TcpListener,
}

/// Errors that stop a controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be used.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Registration or watching failed at start-up.
    #[error("discovery: {0}")]
    Discovery(#[from] barrage_discovery::Error),
    /// The gRPC server could not be set up (reflection or TLS).
    #[error("grpc setup: {0}")]
    Setup(#[from] barrage_proto::ServerSetupError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs a controller until `shutdown` is cancelled, then drains: readiness
/// goes false, the process leaves discovery, in-flight calls finish.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    discovery: Option<Discovery>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let grpc_addr = if cfg.advertise_addr.is_empty() {
        listeners.grpc.local_addr()?.to_string()
    } else {
        cfg.advertise_addr.clone()
    };
    let http_addr = listeners.http.local_addr()?.to_string();
    let metrics = Metrics::new(&registry)?;
    let ownership = match &discovery {
        Some(_) => Ownership::on_ring(&cfg.node_id, cfg.warmup),
        None => Ownership::alone(&cfg.node_id, cfg.warmup),
    };
    let state = Arc::new(Mutex::new(ControllerState {
        members: Membership::new(),
        streams: Streams::new(cfg.streams.clone()),
        ownership,
    }));
    let readiness = Readiness::new();
    tracing::info!(node_id = %cfg.node_id, %grpc_addr, "controller starting");

    let service = ControllerService::new(state.clone(), metrics.clone());
    let (health, grpc) = barrage_proto::grpc_server(&cfg.grpc_tls)?;
    health
        .set_serving::<ControllerServer<ControllerService>>()
        .await;
    let grpc_stop = CancellationToken::new();
    let server =
        ControllerServer::new(service).max_decoding_message_size(barrage_proto::PEER_MESSAGE_LIMIT);
    let local = cfg.local_peers.register(&grpc_addr, server.clone());
    let grpc = grpc.add_service(server).serve_with_incoming_shutdown(
        barrage_proto::grpc_incoming(listeners.grpc),
        grpc_stop.clone().cancelled_owned(),
    );
    let grpc = tokio::spawn(grpc);

    let http_stop = CancellationToken::new();
    let stats = {
        let (state, node_id) = (state.clone(), cfg.node_id.clone());
        move || {
            let mut s = state.lock();
            let ready = s.ownership.is_ready(tokio::time::Instant::now());
            serde_json::json!({
                "role": "controller",
                "node_id": node_id,
                "ready": ready,
                "connect_nodes": s.members.node_count(),
                "keys": s.members.key_count(),
                "streams": s.streams.len(),
                "history_messages": s.streams.total_messages(),
                "history_evictions": s.streams.evicted(),
            })
        }
    };
    let http = tokio::spawn(barrage_telemetry::serve_http(
        listeners.http,
        barrage_telemetry::ops_router(registry.clone(), readiness.clone())
            .merge(barrage_telemetry::stats_route(stats)),
        http_stop.clone().cancelled_owned(),
    ));

    // Drop nodes that fall silent, and (with discovery) nodes whose
    // registration disappears.
    let tasks = CancellationToken::new();
    tokio::spawn(expire_loop(
        state.clone(),
        metrics.clone(),
        cfg.node_timeout,
        tasks.clone(),
    ));
    let registration = match &discovery {
        Some(d) => {
            tokio::spawn(follow_nodes(
                state.clone(),
                metrics.clone(),
                d.watch(Role::ConnectNode).await?,
                tasks.clone(),
            ));
            tokio::spawn(follow_controllers(
                state.clone(),
                metrics.clone(),
                d.watch(Role::Controller).await?,
                cfg.ring_vnodes,
                tasks.clone(),
            ));
            let member = Member {
                id: cfg.node_id.clone(),
                role: Role::Controller,
                grpc_addr: grpc_addr.clone(),
                http_addr,
                ws_addr: None,
            };
            Some(d.register(member, cfg.lease_ttl).await?)
        }
        None => None,
    };
    readiness.set(true);
    tracing::info!(node_id = %cfg.node_id, "controller ready");

    shutdown.cancelled().await;
    tracing::info!(node_id = %cfg.node_id, "controller draining");
    readiness.set(false);
    health
        .set_not_serving::<ControllerServer<ControllerService>>()
        .await;
    if let Some(r) = registration {
        r.deregister().await;
    }
    tasks.cancel();
    drop(local);
    grpc_stop.cancel();
    http_stop.cancel();
    let grpc_result = grpc.await;
    let _ = http.await;
    match grpc_result {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "grpc server task failed"),
    }
    tracing::info!(node_id = %cfg.node_id, "controller stopped");
    Ok(())
}

async fn expire_loop(
    state: Arc<Mutex<ControllerState>>,
    metrics: Metrics,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(timeout / 2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let dead = {
            let mut s = state.lock();
            let dead = s.members.expire(Instant::now(), timeout);
            s.streams.sweep(tokio::time::Instant::now());
            metrics.observe(&s);
            dead
        };
        for id in dead {
            tracing::warn!(node_id = %id, "connect-node silent past its timeout; dropped its sessions");
            metrics.nodes_dropped.with_label_values(&["silent"]).inc();
        }
    }
}

/// Drops connect-nodes whose registration disappears.
fn follow_nodes(
    state: Arc<Mutex<ControllerState>>,
    metrics: Metrics,
    nodes: MemberWatch,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    nodes.follow(stop, move |now| {
        let alive: HashSet<String> = now.keys().cloned().collect();
        let dropped = {
            let mut s = state.lock();
            s.ownership.set_alive(alive.clone());
            s.members.retain_nodes(&alive, std::time::Instant::now())
        };
        for id in dropped {
            tracing::info!(node_id = %id, "connect-node left discovery; dropped its sessions");
            metrics
                .nodes_dropped
                .with_label_values(&["deregistered"])
                .inc();
        }
    })
}

/// Follows the controller ring: forgets keys that moved to another
/// controller and waits for connect-nodes to re-sync before serving pushes.
fn follow_controllers(
    state: Arc<Mutex<ControllerState>>,
    metrics: Metrics,
    controllers: MemberWatch,
    vnodes: usize,
    stop: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    controllers.follow(stop, move |now| {
        let ids: Vec<String> = now.keys().cloned().collect();
        if ids.is_empty() {
            return;
        }
        let mut s = state.lock();
        if s.ownership.set_controllers(ids.clone(), vnodes) {
            let ControllerState {
                members,
                streams,
                ownership,
            } = &mut *s;
            members.retain_keys(|k| ownership.owns(k));
            streams.retain(|k| ownership.owns(k));
            metrics.ring_changes.inc();
            tracing::info!(
                controllers = ids.len(),
                "controller ring changed; waiting for connect-nodes to re-sync"
            );
        }
    })
}
