//! barrage push-manager: the public push API for business services.
//!
//! Stateless. For each push it asks the owning controller(s) for the
//! message's stream position and the connect-nodes hosting the target, then
//! sends one `PushMessageBatch` per node, concurrently, over long-lived
//! pooled channels kept in step with discovery. A room push costs one call
//! per node, never one per user.

pub mod complete;
mod finish;
mod metrics;
pub mod pool;
mod read_limit;
pub mod rest;
mod service;

use std::time::Duration;

use barrage_discovery::{Discovery, Member, MemberWatch, Role};
use barrage_proto::v1::push_manager_server::PushManagerServer;
use barrage_telemetry::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use service::{Batches, Limits, PushService, Sent, assemble_batches, target_users};

/// Default of [`Config::peer_calls_in_flight`].
pub const DEFAULT_PEER_CALLS_IN_FLIGHT: usize = 4;

/// Most messages (or resolve requests) merged into one call.
const MAX_BATCH_ITEMS: usize = 256;

/// Most bytes merged into one call, well under gRPC's 4 MiB message limit.
const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// push-manager settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Id registered in discovery (`MANAGER_ID`).
    pub node_id: String,
    /// gRPC address others use to reach this process; the listener's when empty.
    pub advertise_addr: String,
    /// TTL of the discovery lease.
    pub lease_ttl: Duration,
    /// Deadline of one PushMessageBatch (and of one controller call).
    pub node_timeout: Duration,
    /// Calls in flight to each connect-node and controller; pushes queued
    /// behind them go out merged into one call.
    pub peer_calls_in_flight: usize,
    /// Request limits.
    pub limits: Limits,
    /// Virtual nodes per controller on the hash ring.
    pub ring_vnodes: usize,
    /// API tokens and their scopes (none: the API is open).
    pub api_auth: barrage_auth::ApiAuth,
    /// TLS of the gRPC port and of calls to other roles.
    pub grpc_tls: barrage_proto::GrpcTls,
    /// Roles in this process (`barrage dev`), called without the network;
    /// this push-manager's API is served to them the same way.
    pub local_peers: barrage_proto::LocalPeers,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "push-manager-1".into(),
            advertise_addr: String::new(),
            lease_ttl: Duration::from_secs(10),
            node_timeout: Duration::from_secs(3),
            peer_calls_in_flight: DEFAULT_PEER_CALLS_IN_FLIGHT,
            limits: Limits::default(),
            ring_vnodes: barrage_discovery::ring::DEFAULT_VNODES,
            api_auth: barrage_auth::ApiAuth::default(),
            grpc_tls: barrage_proto::GrpcTls::plaintext(),
            local_peers: barrage_proto::LocalPeers::default(),
        }
    }
}

/// Sockets push-manager serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (`barrage.v1.PushManager`, health, reflection).
    pub grpc: TcpListener,
    /// HTTP (`/metrics`, `/healthz`, `/readyz`).
    pub http: TcpListener,
}

/// What push-manager finds its peers through.
pub struct Peers {
    /// Live controllers (from discovery, or one fixed address).
    pub controllers: MemberWatch,
    /// Live connect-nodes, when discovery is available. Without it,
    /// node addresses come from the controllers' answers.
    pub nodes: Option<MemberWatch>,
    /// Where to register, when discovery is available.
    pub discovery: Option<Discovery>,
}

/// Errors that stop push-manager.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be used.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Registration failed at start-up.
    #[error("discovery: {0}")]
    Discovery(#[from] barrage_discovery::Error),
    /// The gRPC server could not be set up (reflection or TLS).
    #[error("grpc setup: {0}")]
    Setup(#[from] barrage_proto::ServerSetupError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs push-manager until `shutdown`, then drains: readiness goes false,
/// it leaves discovery, and in-flight calls finish.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    peers: Peers,
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
    let readiness = Readiness::new();
    let tasks = CancellationToken::new();

    let dialer = pool::Dialer {
        connect_timeout: Duration::from_secs(2),
        call_timeout: cfg.node_timeout,
        tls: cfg.grpc_tls.clone(),
        batching: barrage_proto::coalesce::BatchLimits {
            max_in_flight: cfg.peer_calls_in_flight,
            max_items: MAX_BATCH_ITEMS,
            max_bytes: MAX_BATCH_BYTES,
        },
        call_items: metrics.peer_call_items.clone(),
        local: cfg.local_peers.clone(),
    };
    // `follow` installs the peers known now before the API serves its
    // first call; the tasks keep them in step afterwards.
    let controllers = pool::ControllerRing::new(cfg.ring_vnodes, dialer.clone());
    tokio::spawn(peers.controllers.follow(tasks.clone(), {
        let ring = controllers.clone();
        move |m| ring.rebuild(m)
    }));
    let nodes = pool::NodePool::new(
        metrics.node_connections.clone(),
        pool::PerNodeSeries {
            duration: metrics.node_batch_duration.clone(),
            errors: metrics.node_batch_errors.clone(),
        },
        dialer,
    );
    if let Some(w) = peers.nodes {
        let pool = nodes.clone();
        tokio::spawn(w.follow(tasks.clone(), move |m| pool.sync(m)));
    } else {
        tokio::spawn(forget_unused_nodes(nodes.clone(), tasks.clone()));
    }
    let stats = {
        let (nodes, controllers, node_id) =
            (nodes.clone(), controllers.clone(), cfg.node_id.clone());
        move || {
            serde_json::json!({
                "role": "push-manager",
                "node_id": node_id,
                "controllers": controllers.len(),
                "pooled_connect_nodes": nodes.node_ids(),
            })
        }
    };
    let service = PushService::new(
        controllers,
        nodes,
        metrics.clone(),
        cfg.limits.clone(),
        cfg.node_timeout,
        cfg.api_auth.clone(),
    );

    let rest = rest::router(service.clone(), cfg.limits.max_content_bytes);
    let request_limit = cfg.limits.grpc_request_bytes();
    let (health, grpc) = barrage_proto::grpc_server(&cfg.grpc_tls)?;
    health.set_serving::<PushManagerServer<PushService>>().await;
    let grpc_stop = CancellationToken::new();
    // Callers in this process (a connect-node's publishing in `barrage
    // dev`) reach the API directly.
    let server = read_limit::ReadLimit::new(
        PushManagerServer::new(service.clone()).max_decoding_message_size(request_limit),
        &cfg.limits,
        &metrics,
    );
    let local = cfg.local_peers.register(&grpc_addr, server.clone());
    let grpc = tokio::spawn(grpc.add_service(server).serve_with_incoming_shutdown(
        barrage_proto::grpc_incoming(listeners.grpc),
        grpc_stop.clone().cancelled_owned(),
    ));
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(barrage_telemetry::serve_http(
        listeners.http,
        barrage_telemetry::ops_router(registry.clone(), readiness.clone())
            .merge(barrage_telemetry::stats_route(stats))
            .merge(rest),
        http_stop.clone().cancelled_owned(),
    ));

    let registration = match &peers.discovery {
        Some(d) => {
            let member = Member {
                id: cfg.node_id.clone(),
                role: Role::PushManager,
                grpc_addr: grpc_addr.clone(),
                http_addr,
                ws_addr: None,
            };
            Some(d.register(member, cfg.lease_ttl).await?)
        }
        None => None,
    };
    if !cfg.api_auth.is_enabled() {
        tracing::warn!("no API_TOKENS configured: anyone who reaches the gRPC port can push");
    }
    readiness.set(true);
    tracing::info!(node_id = %cfg.node_id, %grpc_addr, "push-manager ready");

    shutdown.cancelled().await;
    tracing::info!(node_id = %cfg.node_id, "push-manager draining");
    drop(local);
    readiness.set(false);
    health
        .set_not_serving::<PushManagerServer<PushService>>()
        .await;
    if let Some(r) = registration {
        r.deregister().await;
    }
    grpc_stop.cancel();
    http_stop.cancel();
    let grpc_result = grpc.await;
    let _ = http.await;
    service.drain().await;
    tasks.cancel();
    match grpc_result {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "grpc server task failed"),
    }
    tracing::info!(node_id = %cfg.node_id, "push-manager stopped");
    Ok(())
}

/// Without discovery, a push-manager learns connect-nodes from its
/// controllers' answers. A node no push has asked for in this long is
/// dropped from the pool (it left, or hosts nobody pushed to): a later
/// answer that names it adds it again.
pub const LEARNED_NODE_IDLE: Duration = Duration::from_secs(600);

/// Drops unused learned nodes every minute until `stop`.
async fn forget_unused_nodes(pool: std::sync::Arc<pool::NodePool>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {
                for id in pool.forget_unused(LEARNED_NODE_IDLE) {
                    tracing::info!(
                        node_id = %id,
                        idle_secs = LEARNED_NODE_IDLE.as_secs(),
                        "dropped a connect-node no push has asked for"
                    );
                }
            }
        }
    }
}
