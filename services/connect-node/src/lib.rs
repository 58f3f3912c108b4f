//! barrage connect-node: holds client WebSockets, reports who is connected
//! where to the controllers, and delivers pushed messages.
//!
//! The hub ([`hub::Hub`]) is the node's source of truth for its sessions;
//! the reporter keeps the owning controllers in step; the `ConnectNode` gRPC
//! service hands each pushed message to the local connections of its target,
//! encoding the frame once.

pub mod batch;
pub mod demo;
pub mod direct;
pub mod fallback;
pub mod fanout;
mod gate;
pub mod hub;
pub mod listener;
mod metrics;
pub mod publish;
pub mod queue;
mod reporter;
pub mod sequencer;
mod service;
mod skip;
pub mod upgrade;
#[cfg(test)]
mod wakes;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use barrage_discovery::{Discovery, Member, MemberWatch, Role};
use barrage_proto::v1::connect_node_server::ConnectNodeServer;
use barrage_protocol::CloseCode;
use barrage_telemetry::Readiness;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
use reporter::{Reporter, ReporterConfig};
pub use service::ConnectNodeService;
use ws::{WsSettings, WsState};

/// Connect-node settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Id registered in discovery and reported to controllers.
    pub node_id: String,
    /// gRPC address others use to reach this node; the listener's when empty.
    pub advertise_addr: String,
    /// TTL of the discovery lease.
    pub lease_ttl: Duration,
    /// Accept `?user_id=` without a token (development only).
    pub insecure_user_id: bool,
    /// Verifies connection tokens (no keys: only insecure logins, if enabled).
    pub auth: barrage_auth::ConnectAuth,
    /// Frames one connection's send queue holds before it is closed as slow.
    pub send_queue: usize,
    /// Largest inbound WebSocket frame, bytes.
    pub max_frame_bytes: usize,
    /// Rooms one connection may be in.
    pub max_rooms: usize,
    /// Server ping interval.
    pub ping_interval: Duration,
    /// Close connections silent for this long.
    pub read_timeout: Duration,
    /// Per-connection WebSocket write buffer, bytes.
    pub io_buffer: usize,
    /// Per-connection WebSocket read buffer, bytes.
    pub read_buffer: usize,
    /// Heartbeat to controllers when idle.
    pub heartbeat: Duration,
    /// Deadline for controllers to confirm a connect or join.
    pub ack_timeout: Duration,
    /// Virtual nodes per controller on the hash ring.
    pub ring_vnodes: usize,
    /// Time given to connections to close on shutdown.
    pub drain_timeout: Duration,
    /// Connections this node accepts at most (503 beyond).
    pub max_connections: usize,
    /// Connections one user may hold on this node (429 beyond).
    pub max_connections_per_user: usize,
    /// New connections per second per client IP; 0: unlimited.
    pub new_connections_per_ip: u32,
    /// Frames a client may send per second (burst twice that).
    pub messages_per_sec: u32,
    /// Browser origins allowed to connect; empty: any.
    pub allowed_origins: Vec<String>,
    /// Time from accept until the upgrade request is read (TLS included).
    pub handshake_timeout: Duration,
    /// Serve WebSockets over TLS with these files.
    pub tls: Option<listener::TlsFiles>,
    /// TLS of the gRPC port and of calls to other roles.
    pub grpc_tls: barrage_proto::GrpcTls,
    /// Where roles in this process (`barrage dev`) find this node's
    /// service, and where this node finds theirs (the controllers, and the
    /// push-manager it publishes through), to call without the network.
    pub local_peers: barrage_proto::LocalPeers,
    /// Serve the demo page (and its publish endpoint) on the WebSocket port.
    pub demo: Option<demo::DemoSettings>,
    /// Let clients publish comments to rooms (`publish` frames).
    pub publish: Option<publish::PublishSettings>,
    /// Wait this long to coalesce messages into `batch` frames; zero: off.
    pub batch_window: Duration,
    /// Most messages in one `batch` frame.
    pub batch_max: usize,
    /// Compression of binary frames (`barrage.v1.bin` connections).
    pub binary_compression: barrage_protocol::binary::Compression,
    /// Let the fan-out write frames to idle plain-TCP sockets itself
    /// (`direct`); ignored while batching, which must see every message.
    pub direct_writes: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "connect-node-1".into(),
            advertise_addr: String::new(),
            lease_ttl: Duration::from_secs(10),
            insecure_user_id: false,
            auth: barrage_auth::ConnectAuth::new(Duration::from_secs(5)),
            send_queue: 256,
            max_frame_bytes: 64 * 1024,
            max_rooms: 64,
            ping_interval: Duration::from_secs(25),
            read_timeout: Duration::from_secs(60),
            io_buffer: 4 * 1024,
            read_buffer: 1024,
            heartbeat: Duration::from_secs(1),
            ack_timeout: Duration::from_secs(10),
            ring_vnodes: barrage_discovery::ring::DEFAULT_VNODES,
            drain_timeout: Duration::from_secs(5),
            max_connections: 100_000,
            max_connections_per_user: 16,
            new_connections_per_ip: 0,
            messages_per_sec: 20,
            allowed_origins: Vec::new(),
            handshake_timeout: Duration::from_secs(10),
            tls: None,
            grpc_tls: barrage_proto::GrpcTls::plaintext(),
            local_peers: barrage_proto::LocalPeers::default(),
            demo: None,
            publish: None,
            batch_window: Duration::ZERO,
            batch_max: 50,
            binary_compression: barrage_protocol::binary::Compression::OFF,
            direct_writes: true,
        }
    }
}

/// Sockets the connect-node serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// WebSockets (`/ws`).
    pub ws: TcpListener,
    /// gRPC (`barrage.v1.ConnectNode`, health, reflection).
    pub grpc: TcpListener,
    /// HTTP (`/metrics`, `/healthz`, `/readyz`).
    pub http: TcpListener,
}

/// Errors that stop a connect-node.
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
    /// The TLS certificate or key did not load.
    #[error("tls: {0}")]
    Tls(#[from] listener::TlsError),
    /// The publish settings did not load (word list, API address).
    #[error("publish: {0}")]
    Publish(#[from] publish::WordsError),
}

/// Runs a connect-node until `shutdown`, then drains: readiness goes false,
/// the node leaves discovery, and connections are closed with 4000
/// ("reconnect") spread over the drain timeout.
///
/// `controllers` is the live controller set (from discovery, or fixed);
/// `discovery`, when given, is where this node registers.
pub async fn run(
    cfg: Config,
    listeners: Listeners,
    controllers: MemberWatch,
    discovery: Option<Discovery>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let grpc_addr = if cfg.advertise_addr.is_empty() {
        listeners.grpc.local_addr()?.to_string()
    } else {
        cfg.advertise_addr.clone()
    };
    let ws_addr = listeners.ws.local_addr()?.to_string();
    let http_addr = listeners.http.local_addr()?.to_string();
    let metrics = Metrics::new(&registry)?;
    let readiness = Readiness::new();
    if !cfg.insecure_user_id && !cfg.auth.is_enabled() {
        tracing::warn!(
            "no JWT key configured and insecure logins are off: every connection will be refused"
        );
    }
    if cfg.insecure_user_id {
        tracing::warn!(
            "INSECURE: clients may connect with ?user_id= and no token; development only"
        );
    }

    let reporter = Reporter::new(
        ReporterConfig {
            node_id: cfg.node_id.clone(),
            incarnation: format!("{:016x}", rand::random::<u64>()),
            grpc_addr: grpc_addr.clone(),
            heartbeat: cfg.heartbeat,
            call_timeout: Duration::from_secs(5),
            // A returning client's history query may take the whole of its
            // session's set-up deadline: in a reconnect storm queries wait
            // their turn, and a client told to reconnect only queues again.
            history_timeout: cfg.ack_timeout,
            vnodes: cfg.ring_vnodes,
            tls: cfg.grpc_tls.clone(),
            local: cfg.local_peers.clone(),
        },
        metrics.clone(),
    );
    let batching = (!cfg.batch_window.is_zero() && cfg.batch_max > 1).then_some(ws::Batching {
        window: cfg.batch_window,
        max: cfg.batch_max,
    });
    let hub = Arc::new(
        hub::Hub::new(reporter.clone(), metrics.clone(), cfg.send_queue)
            .with_compression(cfg.binary_compression)
            .with_direct_writes(cfg.direct_writes && batching.is_none()),
    );
    let tasks = CancellationToken::new();
    tokio::spawn(reporter.follow(&hub, controllers, tasks.clone()));
    tokio::spawn(recover_missed(
        hub.clone(),
        reporter.missed_pushes(),
        cfg.drain_timeout,
        tasks.clone(),
    ));

    let sequencer = Arc::new(sequencer::Sequencer::default());
    tokio::spawn(sequencer.clone().run(hub.clone(), tasks.clone()));
    let (health, grpc_server) = barrage_proto::grpc_server(&cfg.grpc_tls)?;
    health
        .set_serving::<ConnectNodeServer<ConnectNodeService>>()
        .await;
    let grpc_stop = CancellationToken::new();
    let server = ConnectNodeServer::new(ConnectNodeService::new(
        cfg.node_id.clone(),
        hub.clone(),
        metrics.clone(),
        sequencer.clone(),
    ))
    .max_decoding_message_size(barrage_proto::PEER_MESSAGE_LIMIT);
    let local = cfg.local_peers.register(&grpc_addr, server.clone());
    let grpc = tokio::spawn(
        grpc_server
            .add_service(server)
            .serve_with_incoming_shutdown(
                barrage_proto::grpc_incoming(listeners.grpc),
                grpc_stop.clone().cancelled_owned(),
            ),
    );

    let draining = CancellationToken::new();
    let publisher = match &cfg.publish {
        Some(p) => {
            let publisher = publish::Publisher::new(
                p.clone(),
                metrics.publish.clone(),
                cfg.local_peers.clone(),
            )?;
            tokio::spawn(publisher.clone().maintain(tasks.clone()));
            Some(publisher)
        }
        None => None,
    };
    let per_ip = std::num::NonZeroU32::new(cfg.new_connections_per_ip)
        .map(|n| Arc::new(governor::RateLimiter::keyed(governor::Quota::per_second(n))));
    if let Some(limiter) = &per_ip {
        crate::metrics::register_ip_limiter(&registry, limiter.clone())?;
        tokio::spawn(forget_refilled_addresses(limiter.clone(), tasks.clone()));
    }
    let ws_state = WsState {
        hub: hub.clone(),
        settings: Arc::new(WsSettings {
            node_id: cfg.node_id.clone(),
            insecure_user_id: cfg.insecure_user_id,
            auth: cfg.auth.clone(),
            token_leeway: cfg.auth.leeway(),
            max_frame_bytes: cfg.max_frame_bytes,
            max_rooms: cfg.max_rooms,
            ping_interval: cfg.ping_interval,
            read_timeout: cfg.read_timeout,
            io_buffer: cfg.io_buffer,
            read_buffer: cfg.read_buffer,
            ack_timeout: cfg.ack_timeout,
            max_connections: cfg.max_connections,
            max_connections_per_user: cfg.max_connections_per_user,
            messages_per_sec: cfg.messages_per_sec,
            allowed_origins: cfg.allowed_origins.clone(),
            batching,
        }),
        metrics: metrics.clone(),
        draining: draining.clone(),
        publisher,
        per_ip,
    };
    let mut ws_router = Router::new()
        .route("/ws", get(ws::ws_handler))
        .route("/sse", get(fallback::sse_handler))
        .route("/poll", get(fallback::poll_handler))
        .with_state(ws_state);
    if let Some(d) = &cfg.demo {
        ws_router = ws_router.merge(demo::router(d));
        tracing::info!("demo page on / and /demo");
    }
    let ws_stop = CancellationToken::new();
    let tls = match &cfg.tls {
        Some(files) => {
            let store = listener::CertStore::load(files.clone())?;
            tokio::spawn(store.clone().watch(metrics.clone(), ws_stop.clone()));
            Some(store)
        }
        None => None,
    };
    let ws = tokio::spawn(listener::serve(
        listeners.ws,
        ws_router,
        listener::ListenOptions {
            handshake_timeout: cfg.handshake_timeout,
            tls,
        },
        metrics.clone(),
        ws_stop.clone(),
    ));
    let http_stop = CancellationToken::new();
    let stats = {
        let (hub, node_id) = (hub.clone(), cfg.node_id.clone());
        move || {
            let s = hub.stats();
            serde_json::json!({
                "role": "connect-node",
                "node_id": node_id,
                "connections": s.connections,
                "users": s.users,
                "rooms": s.rooms,
                "queued_frames": s.queued_frames,
                "max_queue_depth": s.max_queue_depth,
            })
        }
    };
    let http = tokio::spawn(barrage_telemetry::serve_http(
        listeners.http,
        barrage_telemetry::ops_router(registry.clone(), readiness.clone())
            .merge(barrage_telemetry::stats_route(stats)),
        http_stop.clone().cancelled_owned(),
    ));

    let registration = match &discovery {
        Some(d) => {
            // Registered once the controllers hold this node's state: a
            // controller that is warming up counts every registered node
            // and refuses pushes until each of them has synced.
            if !reporter.confirmed().wait(cfg.ack_timeout).await {
                tracing::warn!(
                    timeout = ?cfg.ack_timeout,
                    "not every controller confirmed this node's state in time; registering anyway"
                );
            }
            let member = Member {
                id: cfg.node_id.clone(),
                role: Role::ConnectNode,
                grpc_addr: grpc_addr.clone(),
                http_addr,
                ws_addr: Some(ws_addr.clone()),
            };
            Some(d.register(member, cfg.lease_ttl).await?)
        }
        None => None,
    };
    readiness.set(true);
    tracing::info!(node_id = %cfg.node_id, %grpc_addr, %ws_addr, "connect-node ready");

    shutdown.cancelled().await;
    tracing::info!(node_id = %cfg.node_id, "connect-node draining");
    readiness.set(false);
    draining.cancel();
    health
        .set_not_serving::<ConnectNodeServer<ConnectNodeService>>()
        .await;
    // Stop reporting first: once this node leaves discovery the controllers
    // drop all of its sessions, and a late report must not bring it back.
    tasks.cancel();
    if let Some(r) = registration {
        r.deregister().await;
    }
    close_spread(hub.connections(), CloseCode::Shutdown, cfg.drain_timeout).await;
    ws_stop.cancel();
    let _ = tokio::time::timeout(cfg.drain_timeout, ws).await;
    drop(local);
    grpc_stop.cancel();
    http_stop.cancel();
    let grpc_result = grpc.await;
    let _ = http.await;
    match grpc_result {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "grpc server task failed"),
    }
    tracing::info!(node_id = %cfg.node_id, "connect-node stopped");
    Ok(())
}

/// Closes `conns` with `code`, spread over `window` (in a few batches
/// every 10 ms) so that their clients do not all reconnect in the same
/// instant.
async fn close_spread(conns: Vec<Arc<hub::ConnHandle>>, code: CloseCode, window: Duration) {
    const TICK: Duration = Duration::from_millis(10);
    let ticks = (window.as_millis() / TICK.as_millis()).max(1) as usize;
    let per_tick = conns.len().div_ceil(ticks).max(1);
    for batch in conns.chunks(per_tick) {
        for c in batch {
            c.close_with(code);
        }
        if batch.len() < conns.len() {
            tokio::time::sleep(TICK).await;
        }
    }
}

/// How often the per-IP connection limit forgets the addresses whose
/// allowance has refilled.
const FORGET_ADDRESSES_EVERY: Duration = Duration::from_secs(5);

/// Forgets, every [`FORGET_ADDRESSES_EVERY`], the client addresses the
/// per-IP limit holds no more than a fresh allowance for, until `stop`: the
/// limit keeps a record per address it has seen, and without this its
/// memory would grow with every client address that ever connected.
async fn forget_refilled_addresses(limiter: Arc<ws::PerIpLimiter>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(FORGET_ADDRESSES_EVERY) => {}
        }
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

/// Whenever a controller says it had dropped this node's sessions (the node
/// left discovery, or went silent to it), pushes meanwhile did not reach
/// the connections open then. The reporter mutes them at once (see
/// [`hub::ConnHandle::mute`]); this closes them with 4101, spread over
/// `window`, so that their clients reconnect and recover what they
/// missed. Connections opened since wait for the controller to take the
/// node back before they are told `connected`, so they missed nothing.
async fn recover_missed(
    hub: Arc<hub::Hub>,
    missed: Arc<tokio::sync::Notify>,
    window: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = missed.notified() => {}
        }
        let conns: Vec<_> = hub
            .connections()
            .into_iter()
            .filter(|c| c.is_muted() && c.close_code().is_none())
            .collect();
        tracing::warn!(
            connections = conns.len(),
            "closing connections with 4101 so that their clients recover the pushes they missed"
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = close_spread(conns, CloseCode::MissedPushes, window) => {}
        }
    }
}
