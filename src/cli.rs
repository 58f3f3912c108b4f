//! Command line and environment: every setting has a flag and an
//! environment variable, parsed here into a validated [`Plan`]. Invalid
//! values stop start-up with the setting's name (exit code 64).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use barrage_protocol::NodeId;
use barrage_telemetry::LogFormat;
use clap::{Args, Parser, Subcommand};

/// barrage: real-time push. Business services call gRPC; clients hold WebSockets.
#[derive(Debug, Parser)]
#[command(name = "barrage", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Async runtime: multi-thread (one worker per CPU, TOKIO_WORKER_THREADS
    /// sets how many) or current-thread (everything on one thread: less CPU
    /// per request, at most one core; scale out with more processes).
    #[arg(
        long,
        global = true,
        env = "RUNTIME_FLAVOR",
        value_enum,
        default_value_t = RuntimeFlavor::MultiThread
    )]
    runtime_flavor: RuntimeFlavor,
    /// Worker threads of the multi-thread runtime. Default: one per CPU the
    /// process may use, which is the host's count when the container has
    /// no CPU limit; set it to the CPUs the process is meant to use.
    /// Ignored by the current-thread runtime.
    #[arg(
        long,
        global = true,
        env = "TOKIO_WORKER_THREADS",
        value_name = "TOKIO_WORKER_THREADS"
    )]
    worker_threads: Option<std::num::NonZeroUsize>,
    /// Transparent huge pages for this process: off (the default: the heap
    /// grows in 4 KiB pages, so growing it never stalls a push for the
    /// milliseconds that zeroing a fresh 2 MiB page can take) or system
    /// (whatever the kernel's setting and the allocator ask for).
    #[arg(
        long,
        global = true,
        env = "TRANSPARENT_HUGE_PAGES",
        value_enum,
        default_value_t = HugePages::Off
    )]
    transparent_huge_pages: HugePages,
}

/// Whether the process may use transparent huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HugePages {
    /// Never: `prctl(PR_SET_THP_DISABLE)` at start-up.
    Off,
    /// As the kernel's `transparent_hugepage` setting says.
    System,
}

/// Which Tokio scheduler runs the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RuntimeFlavor {
    /// Work-stealing workers, one per CPU unless TOKIO_WORKER_THREADS says.
    MultiThread,
    /// One thread runs every task and the I/O driver.
    CurrentThread,
}

// One value per process, parsed once: the size difference is irrelevant.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a controller: membership and message streams.
    Controller(ControllerArgs),
    /// Run a push-manager: the public gRPC push API.
    PushManager(PushManagerArgs),
    /// Run a connect-node: holds client WebSockets.
    ConnectNode(ConnectNodeArgs),
    /// Run all three roles in one process on an in-process registry (no etcd).
    Dev(DevArgs),
    /// Subscribe from the terminal and print messages as they arrive.
    Sub(SubArgs),
    /// Mint a connection token (HS256) for development and tests.
    Token(TokenArgs),
    /// Load test on this machine: start `barrage dev`, open many WebSockets
    /// over loopback, push through the gRPC API, print a JSON summary.
    Bench(BenchArgs),
    /// Helper of `bench --scenario idle`: opens and holds connections.
    #[command(hide = true)]
    BenchHold(HoldArgs),
    /// Helper of `bench --compare grpc-floor`: a PushManager on 127.0.0.1
    /// that answers every PushToUser at once and does nothing else.
    #[command(hide = true)]
    BenchFloor(FloorArgs),
}

#[derive(Debug, Args)]
struct FloorArgs {
    #[arg(long, env = "GRPC_PORT")]
    grpc_port: u16,
}

#[derive(Debug, Args)]
struct HoldArgs {
    #[arg(long, value_delimiter = ',')]
    nodes: Vec<std::net::SocketAddr>,
    #[arg(long)]
    count: usize,
    #[arg(long, default_value_t = 0)]
    first_user: usize,
    #[arg(long, default_value_t = 10)]
    source_base: u8,
    #[arg(long, default_value_t = 4)]
    sources: u8,
    #[arg(long, default_value_t = 600)]
    hold_secs: u64,
}

/// What `barrage bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// One room, many subscribers: deliveries/s, end-to-end latency, loss.
    Room,
    /// PushToUser: every subscriber its own user, pushes spread over them.
    User,
    /// Broadcast to every connection on several connect-node processes.
    Broadcast,
    /// Bytes per delivered comment: JSON vs binary frames, compression, batching.
    Bandwidth,
    /// Idle connections (--subscribers, up to 200000) held by --nodes
    /// connect-nodes, opened by helper processes: server memory per connection.
    Idle,
    /// Reconnect storm: --subscribers clients drop at once, --storm-missed
    /// messages are pushed, all reconnect at once with their positions.
    Storm,
}

/// A push server to compare barrage with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// Nchan (nginx module): HTTP publish, WebSocket subscribers (room scenario).
    Nchan,
    /// A gRPC server on barrage's server stack that answers every
    /// PushToUser at once and does nothing else (user scenario): what the
    /// call itself costs a server core.
    GrpcFloor,
}

/// `barrage bench`: bounded in count and time, loopback only.
#[derive(Debug, Args)]
struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Room)]
    scenario: Scenario,
    /// WebSocket subscribers in the room (1–100000; mind the open-file limit).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Pushes per second, default 20; 0 pushes as fast as --in-flight
    /// allows (bandwidth: comments per second, default 1000).
    #[arg(long)]
    rate: Option<u32>,
    /// Pushes in flight at once when --rate is 0.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Seconds to push (1–300).
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Most pushes in one run (1–1000000).
    #[arg(long, default_value_t = 10_000)]
    max_pushes: u64,
    /// Loopback source addresses (127.0.0.2…) to spread connections over (1–200).
    #[arg(long, default_value_t = 8)]
    sources: u8,
    /// Filler bytes in each payload.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Give every push its own message_id, as callers that retry do: the
    /// push-manager then also records each push's result at the controller.
    #[arg(long)]
    message_ids: bool,
    /// Bandwidth: comments pushed per server configuration (1–100000).
    #[arg(long, default_value_t = 3000)]
    comments: u64,
    /// Bandwidth: batching window of the batched configurations, ms.
    #[arg(long, default_value_t = 10)]
    batch_window_ms: u64,
    /// Bandwidth: compression threshold of the compressed configurations, bytes.
    #[arg(long, default_value_t = 128)]
    compress_bytes: usize,
    /// Connect-node processes (1–20) in a multi-process cluster (a
    /// controller, a push-manager, N nodes; subscribers spread over the
    /// nodes). Default: `barrage dev` in one process; broadcast: 10.
    #[arg(long)]
    nodes: Option<usize>,
    /// Storm: messages pushed to the room while every client is away (1–1000).
    #[arg(long, default_value_t = 20)]
    storm_missed: u64,
    /// Run the scenario against this peer too, in the same run, and print
    /// barrage/peer ratios: nchan with the room and user scenarios
    /// (nginx-light + libnginx-mod-nchan; a user is a channel of its own),
    /// grpc-floor with the user scenario.
    #[arg(long, value_enum)]
    compare: Option<Peer>,
    /// With `--compare nchan --rate 0`: the fan-out goal in one run. Nchan
    /// runs first at max rate; barrage then runs paced at FACTOR times the
    /// deliveries/s Nchan reached (1–100), and `goal.met` says whether it
    /// delivered that many with no loss and a p99 no worse than Nchan's.
    #[arg(long, value_name = "FACTOR")]
    over_nchan: Option<f64>,
    /// Niceness (0–19) of the bench threads that read the subscribers'
    /// sockets. At 19 they get a core mostly when the servers leave one,
    /// as subscribers on other machines would: for latency at fixed rates
    /// below saturation (arrival_latency_ms is taken by the kernel, so
    /// their own delay is not counted). Not at max rate: readers that fall
    /// behind make the servers' send queues overflow, and the run reports
    /// the loss.
    #[arg(long, default_value_t = 0)]
    client_nice: u8,
    /// An environment variable for one role's processes of a cluster
    /// (`--nodes`), as ROLE:NAME=VALUE with ROLE controller, push-manager
    /// or connect-node; repeatable. Example: `--role-env
    /// push-manager:RUNTIME_FLAVOR=current-thread`, the push-manager as the
    /// Helm chart runs it.
    #[arg(long, value_name = "ROLE:NAME=VALUE")]
    role_env: Vec<String>,
    /// Progress on stderr.
    #[arg(long)]
    verbose: bool,
}

/// Parses `--role-env` values: ROLE:NAME=VALUE.
fn role_envs(values: &[String]) -> Result<Vec<crate::bench::RoleEnv>, ConfigError> {
    values
        .iter()
        .map(|v| {
            let bad_value = || {
                bad(
                    "--role-env",
                    format!(
                        "{v:?} is not ROLE:NAME=VALUE with ROLE controller, push-manager or connect-node"
                    ),
                )
            };
            let (role, assignment) = v.split_once(':').ok_or_else(bad_value)?;
            let role = ["controller", "push-manager", "connect-node"]
                .into_iter()
                .find(|r| *r == role)
                .ok_or_else(bad_value)?;
            let (name, value) = assignment.split_once('=').ok_or_else(bad_value)?;
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(bad_value());
            }
            Ok(crate::bench::RoleEnv {
                role,
                name: name.to_owned(),
                value: value.to_owned(),
            })
        })
        .collect()
}

#[derive(Debug, Args)]
struct TokenArgs {
    /// Shared secret the connect-nodes verify with.
    #[arg(long, env = "JWT_HS256_SECRET", hide_env_values = true)]
    secret: String,
    /// The user the token is for (its `sub`).
    #[arg(long)]
    user: String,
    /// Rooms the token allows (repeat or comma-separate; `prefix*` for a
    /// prefix). None: any room.
    #[arg(long = "room", value_delimiter = ',')]
    rooms: Vec<String>,
    /// Lifetime, seconds.
    #[arg(long, default_value_t = 3600)]
    ttl_secs: u64,
}

/// How connections authenticate.
#[derive(Debug, Args)]
struct JwtArgs {
    /// HS256 shared secret for connection tokens (at least 16 bytes).
    #[arg(long, env = "JWT_HS256_SECRET", hide_env_values = true)]
    jwt_hs256_secret: Option<String>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256) for connection tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    jwt_public_key_file: Option<std::path::PathBuf>,
    /// JWKS file with RS256/ES256 public keys for connection tokens.
    #[arg(long, env = "JWT_JWKS_FILE")]
    jwt_jwks_file: Option<std::path::PathBuf>,
    /// Clock skew allowed on `exp` and `nbf`, seconds (at most 3600).
    #[arg(long, env = "JWT_LEEWAY_SECS", default_value_t = 5)]
    jwt_leeway_secs: u64,
}

/// Most clock skew `JWT_LEEWAY_SECS` may allow: an hour.
const MAX_JWT_LEEWAY_SECS: u64 = 3600;

impl JwtArgs {
    fn auth(&self) -> Result<barrage_auth::ConnectAuth, ConfigError> {
        if self.jwt_leeway_secs > MAX_JWT_LEEWAY_SECS {
            return Err(bad(
                "JWT_LEEWAY_SECS (--jwt-leeway-secs)",
                format!("must be at most {MAX_JWT_LEEWAY_SECS} (seconds of clock skew)"),
            ));
        }
        let mut auth = barrage_auth::ConnectAuth::new(Duration::from_secs(self.jwt_leeway_secs));
        if let Some(s) = self.jwt_hs256_secret.as_deref().filter(|s| !s.is_empty()) {
            auth = auth
                .with_hs256_secret(s.as_bytes())
                .map_err(|e| bad("JWT_HS256_SECRET (--jwt-hs256-secret)", e.to_string()))?;
        }
        if let Some(p) = &self.jwt_public_key_file {
            let setting = "JWT_PUBLIC_KEY_FILE (--jwt-public-key-file)";
            let pem =
                std::fs::read(p).map_err(|e| bad(setting, format!("{}: {e}", p.display())))?;
            auth = auth
                .with_public_key_pem(&pem)
                .map_err(|e| bad(setting, format!("{}: {e}", p.display())))?;
        }
        if let Some(p) = &self.jwt_jwks_file {
            let setting = "JWT_JWKS_FILE (--jwt-jwks-file)";
            let json = std::fs::read_to_string(p)
                .map_err(|e| bad(setting, format!("{}: {e}", p.display())))?;
            auth = auth
                .with_jwks(&json)
                .map_err(|e| bad(setting, format!("{}: {e}", p.display())))?;
        }
        Ok(auth)
    }
}

/// Settings every server role shares.
#[derive(Debug, Args)]
struct Common {
    /// etcd endpoints, comma-separated (e.g. http://etcd:2379). Empty: no etcd.
    #[arg(long, env = "ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// Key prefix in etcd; processes register under <prefix>/nodes/<role>/<id>.
    #[arg(long, env = "ETCD_PREFIX", default_value = "/barrage")]
    etcd_prefix: String,
    /// Controller gRPC address (host:port), used when ETCD_ENDPOINTS is empty.
    #[arg(long, env = "CONTROLLER_ADDRESS")]
    controller_address: Option<String>,
    /// Address to bind listeners on.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0")]
    bind_addr: IpAddr,
    /// Host or IP other processes use to reach this one (published in
    /// discovery). Default: BIND_ADDR when specific, else 127.0.0.1.
    #[arg(long, env = "ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// TTL of the discovery lease, seconds; a dead process disappears after it.
    #[arg(long, env = "LEASE_TTL_SECS", default_value_t = 10)]
    lease_ttl_secs: u64,
    /// Log format: text or json. Verbosity comes from RUST_LOG.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    /// PEM certificate served on this process's gRPC port and presented as
    /// its client certificate to other roles; with GRPC_TLS_KEY_FILE.
    #[arg(long, env = "GRPC_TLS_CERT_FILE")]
    grpc_tls_cert_file: Option<PathBuf>,
    /// PEM private key of GRPC_TLS_CERT_FILE.
    #[arg(long, env = "GRPC_TLS_KEY_FILE")]
    grpc_tls_key_file: Option<PathBuf>,
    /// PEM CA bundle. Set: calls to other roles use TLS verified against it,
    /// and this gRPC port requires client certificates it signed (mutual TLS).
    #[arg(long, env = "GRPC_TLS_CA_FILE")]
    grpc_tls_ca_file: Option<PathBuf>,
    /// DNS name other roles' certificates must carry (internal hops dial IPs).
    #[arg(long, env = "GRPC_TLS_SERVER_NAME", default_value = barrage_proto::tls::DEFAULT_SERVER_NAME)]
    grpc_tls_server_name: String,
}

#[derive(Debug, Args)]
struct ControllerArgs {
    #[command(flatten)]
    common: Common,
    /// Unique id of this controller. Default: controller-<hostname>.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// gRPC port.
    #[arg(long, env = "GRPC_PORT", default_value_t = 50051)]
    grpc_port: u16,
    /// HTTP port for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_PORT", default_value_t = 9091)]
    metrics_port: u16,
    /// Drop a connect-node not heard from for this many seconds.
    #[arg(long, env = "NODE_TIMEOUT_SECS", default_value_t = 10)]
    node_timeout_secs: u64,
    /// After the controller ring changes, or a controller without etcd
    /// starts, refuse pushes (UNAVAILABLE) for at most this many seconds
    /// while connect-nodes re-send their sessions.
    #[arg(long, env = "WARMUP_SECS", default_value_t = 5)]
    warmup_secs: u64,
    #[command(flatten)]
    history: HistoryArgs,
}

/// Stream history kept for recovery.
#[derive(Debug, Args)]
struct HistoryArgs {
    /// Messages kept per room (and for broadcast) for recovery.
    #[arg(long, env = "ROOM_HISTORY_SIZE", default_value_t = 200)]
    room_history_size: usize,
    /// Seconds a room message stays recoverable.
    #[arg(long, env = "ROOM_HISTORY_TTL_SECS", default_value_t = 3600)]
    room_history_ttl_secs: u64,
    /// Messages kept per user (also what an offline user gets on connect).
    #[arg(long, env = "USER_HISTORY_SIZE", default_value_t = 100)]
    user_history_size: usize,
    /// Seconds a user message stays recoverable.
    #[arg(long, env = "USER_HISTORY_TTL_SECS", default_value_t = 1800)]
    user_history_ttl_secs: u64,
    /// Messages kept over all streams of one controller; the oldest are
    /// evicted beyond it (controller_history_evictions_total).
    #[arg(long, env = "HISTORY_MAX_MESSAGES", default_value_t = 1_000_000)]
    history_max_messages: usize,
    /// Bytes of messages (encoded bodies) kept over all streams of one
    /// controller; the oldest are evicted beyond it, as for
    /// HISTORY_MAX_MESSAGES (default 256 MiB).
    #[arg(long, env = "HISTORY_MAX_BYTES", default_value_t = barrage_controller::MAX_TOTAL_BYTES)]
    history_max_bytes: usize,
    /// Streams (positions) kept over all of one controller's keys; beyond
    /// it, streams with no message left are forgotten before their 24
    /// idle hours (controller_streams_forgotten_over_cap_total).
    #[arg(long, env = "HISTORY_MAX_STREAMS", default_value_t = barrage_controller::MAX_STREAMS)]
    history_max_streams: usize,
}

impl HistoryArgs {
    fn config(&self) -> Result<barrage_controller::StreamConfig, ConfigError> {
        use barrage_controller::Retention;
        if self.history_max_messages == 0 {
            return Err(bad(
                "HISTORY_MAX_MESSAGES (--history-max-messages)",
                "must be at least 1",
            ));
        }
        if self.history_max_bytes == 0 {
            return Err(bad(
                "HISTORY_MAX_BYTES (--history-max-bytes)",
                "must be at least 1",
            ));
        }
        if self.history_max_streams == 0 {
            return Err(bad(
                "HISTORY_MAX_STREAMS (--history-max-streams)",
                "must be at least 1",
            ));
        }
        let room = Retention {
            max_messages: self.room_history_size,
            ttl: secs(
                "ROOM_HISTORY_TTL_SECS (--room-history-ttl-secs)",
                self.room_history_ttl_secs,
            )?,
        };
        Ok(barrage_controller::StreamConfig {
            room,
            broadcast: room,
            user: Retention {
                max_messages: self.user_history_size,
                ttl: secs(
                    "USER_HISTORY_TTL_SECS (--user-history-ttl-secs)",
                    self.user_history_ttl_secs,
                )?,
            },
            max_total_messages: self.history_max_messages,
            max_total_bytes: self.history_max_bytes,
            max_streams: self.history_max_streams,
            ..Default::default()
        })
    }
}

#[derive(Debug, Args)]
struct PushManagerArgs {
    #[command(flatten)]
    common: Common,
    /// Unique id of this push-manager. Default: push-manager-<hostname>.
    #[arg(long, env = "MANAGER_ID")]
    manager_id: Option<String>,
    /// gRPC port of the public API.
    #[arg(long, env = "GRPC_PORT", default_value_t = 50053)]
    grpc_port: u16,
    /// HTTP port for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_PORT", default_value_t = 9093)]
    metrics_port: u16,
    #[command(flatten)]
    push: PushLimits,
}

/// Settings of the push API.
#[derive(Debug, Args)]
struct PushLimits {
    /// Deadline of one PushMessageBatch to a connect-node, and of one call
    /// to a controller, milliseconds. A retry of a push with a message_id
    /// that recorded no result sends it again 3 x this + 1 s after it
    /// began: give every push-manager the same value.
    #[arg(long, env = "PUSH_TIMEOUT_MS", default_value_t = 3000)]
    push_timeout_ms: u64,
    /// Calls in flight to each connect-node and each controller; pushes
    /// that queue behind them go out merged into one call.
    #[arg(long, env = "PEER_CALLS_IN_FLIGHT", default_value_t = barrage_push_manager::DEFAULT_PEER_CALLS_IN_FLIGHT)]
    peer_calls_in_flight: usize,
    /// Largest message content accepted, bytes.
    #[arg(long, env = "MAX_CONTENT_BYTES", default_value_t = 64 * 1024)]
    max_content_bytes: usize,
    /// Most user_ids in one PushToUser.
    #[arg(long, env = "MAX_USER_IDS", default_value_t = 1000)]
    max_user_ids: usize,
    /// API tokens and scopes: `token=push:room|push:user;token2=*` (scopes:
    /// push:room, push:user, broadcast, admin, * for all). Empty: open API.
    #[arg(long, env = "API_TOKENS", default_value = "", hide_env_values = true)]
    api_tokens: String,
}

#[derive(Debug, Args)]
struct ConnectNodeArgs {
    #[command(flatten)]
    common: Common,
    /// Unique id of this connect-node. Default: connect-node-<hostname>.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// gRPC port (PushMessageBatch, Stats).
    #[arg(long, env = "GRPC_PORT", default_value_t = 50052)]
    grpc_port: u16,
    /// HTTP port for /metrics, /healthz, /readyz.
    #[arg(long, env = "METRICS_PORT", default_value_t = 9092)]
    metrics_port: u16,
    /// WebSocket port (GET /ws).
    #[arg(long, env = "WS_PORT", default_value_t = 8080)]
    ws_port: u16,
    #[command(flatten)]
    ws: WsArgs,
    #[command(flatten)]
    jwt: JwtArgs,
}

/// WebSocket settings.
#[derive(Debug, Args)]
struct WsArgs {
    /// Accept ?user_id= with no token. Development only: anyone can claim any user.
    #[arg(long, env = "INSECURE_USER_ID", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    insecure_user_id: bool,
    /// Frames a connection's send queue holds; a full queue closes it (4100).
    #[arg(long, env = "SEND_QUEUE", default_value_t = 256)]
    send_queue: usize,
    /// Largest inbound frame, bytes; bigger ones close the connection (1009).
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    max_frame_bytes: usize,
    /// Rooms one connection may be in at once.
    #[arg(long, env = "MAX_ROOMS_PER_CONN", default_value_t = 64)]
    max_rooms_per_conn: usize,
    /// Seconds between server pings.
    #[arg(long, env = "PING_INTERVAL_SECS", default_value_t = 25)]
    ping_interval_secs: u64,
    /// Close a connection silent for this many seconds (4001), and drop
    /// one whose pending write has waited as long, checked at each ping
    /// (counted as 4100).
    #[arg(long, env = "READ_TIMEOUT_SECS", default_value_t = 60)]
    read_timeout_secs: u64,
    /// Per-connection WebSocket write buffer, bytes.
    #[arg(long, env = "WS_BUFFER_BYTES", default_value_t = 4096)]
    ws_buffer_bytes: usize,
    /// Per-connection WebSocket read buffer, bytes (client frames are small;
    /// a larger frame grows it while it is read).
    #[arg(long, env = "WS_READ_BUFFER_BYTES", default_value_t = 1024)]
    ws_read_buffer_bytes: usize,
    /// Connections this node accepts; beyond it upgrades get 503.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: usize,
    /// Connections one user may hold on one node; beyond it upgrades get 429.
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 16)]
    max_connections_per_user: usize,
    /// New connections per second from one client IP (429 beyond); 0: unlimited.
    #[arg(long, env = "NEW_CONNECTIONS_PER_IP_PER_SEC", default_value_t = 0)]
    new_connections_per_ip_per_sec: u32,
    /// Frames a client may send per second (bursts of twice that); excess
    /// frames get a `rate_limited` error frame and are dropped.
    #[arg(long, env = "CLIENT_MESSAGES_PER_SEC", default_value_t = 20)]
    client_messages_per_sec: u32,
    /// Browser origins allowed to open WebSockets (comma-separated, e.g.
    /// https://app.example.com); empty: any. Requests without Origin pass.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Vec<String>,
    /// Seconds a client has from TCP accept until its upgrade request is
    /// read, TLS handshake included; slower clients are dropped.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_SECS", default_value_t = 10)]
    handshake_timeout_secs: u64,
    /// PEM certificate chain for WebSockets over TLS (wss://); with TLS_KEY_FILE.
    /// Re-read on SIGHUP and when the file changes.
    #[arg(long, env = "TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// Serve the live-comments demo page on / and /demo of the WebSocket port.
    #[arg(long, env = "DEMO_PAGE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    demo_page: bool,
    /// Push API (host:port of a push-manager) the demo page's comment box
    /// sends through. Development only: anyone reaching the page can push.
    #[arg(long, env = "DEMO_PUBLISH_API")]
    demo_publish_api: Option<String>,
    /// Rooms where members may publish comments (`publish` frames), comma-
    /// separated names or `prefix*`; empty: publishing is off.
    #[arg(long, env = "PUBLISH_ROOMS", value_delimiter = ',')]
    publish_rooms: Vec<String>,
    /// Of those, rooms where the token's `publish` claim must allow it too.
    #[arg(long, env = "PUBLISH_CLAIM_ROOMS", value_delimiter = ',')]
    publish_claim_rooms: Vec<String>,
    /// Push API (host:port of a push-manager) published comments go through.
    #[arg(long, env = "PUBLISH_API")]
    publish_api: Option<String>,
    /// API token published comments are pushed with, when the push API
    /// requires tokens (its API_TOKENS): one with the push:room scope.
    #[arg(long, env = "PUBLISH_API_TOKEN", hide_env_values = true)]
    publish_api_token: Option<String>,
    /// Longest comment, characters.
    #[arg(long, env = "PUBLISH_MAX_CHARS", default_value_t = 200)]
    publish_max_chars: usize,
    /// Comments per second per user.
    #[arg(long, env = "PUBLISH_USER_PER_SEC", default_value_t = 10)]
    publish_user_per_sec: u32,
    /// Burst of the per-user comment rate.
    #[arg(long, env = "PUBLISH_USER_BURST", default_value_t = 20)]
    publish_user_burst: u32,
    /// Comments per second per room over all publishers; 0: no limit.
    #[arg(long, env = "PUBLISH_ROOM_PER_SEC", default_value_t = 0)]
    publish_room_per_sec: u32,
    /// The same comment from the same user within this many seconds is dropped.
    #[arg(long, env = "PUBLISH_DEDUP_SECS", default_value_t = 5)]
    publish_dedup_secs: u64,
    /// Sensitive words, one per line (`#` comments); re-read when it changes.
    #[arg(long, env = "SENSITIVE_WORDS_FILE")]
    sensitive_words_file: Option<PathBuf>,
    /// What a sensitive word does: reject the comment, or mask it with `*`.
    #[arg(long, env = "SENSITIVE_WORDS_MODE", default_value = "reject")]
    sensitive_words_mode: String,
    /// Users who may not publish, one id per line; re-read when it changes.
    #[arg(long, env = "PUBLISH_BLOCKLIST_FILE")]
    publish_blocklist_file: Option<PathBuf>,
    /// Per-room mutes, lines `<room> <user> <until unix seconds>`; re-read
    /// when it changes.
    #[arg(long, env = "PUBLISH_MUTES_FILE")]
    publish_mutes_file: Option<PathBuf>,
    /// A barrage.v1.Moderation service (host:port) that approves, denies or
    /// rewrites each comment.
    #[arg(long, env = "MODERATION_HOOK")]
    moderation_hook: Option<String>,
    /// Deadline of one moderation review, milliseconds.
    #[arg(long, env = "MODERATION_TIMEOUT_MS", default_value_t = 200)]
    moderation_timeout_ms: u64,
    /// Publish anyway when moderation fails or is late (fail-open); false refuses.
    #[arg(long, env = "MODERATION_FAIL_OPEN", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    moderation_fail_open: bool,
    #[command(flatten)]
    frames: FrameArgs,
}

/// How a connect-node writes frames: batching and binary compression
/// (shared by `connect-node` and `dev`).
#[derive(Debug, Args)]
struct FrameArgs {
    /// Milliseconds a connection waits to coalesce messages into one `batch`
    /// frame (hot rooms); 0: every message in its own frame.
    #[arg(long, env = "BATCH_WINDOW_MS", default_value_t = 0)]
    batch_window_ms: u64,
    /// Most messages in one `batch` frame.
    #[arg(long, env = "BATCH_MAX_MESSAGES", default_value_t = 50)]
    batch_max_messages: usize,
    /// Binary frames (`barrage.v1.bin`) whose body is at least this many
    /// bytes are sent DEFLATE-compressed; 0: never.
    #[arg(long, env = "BINARY_COMPRESS_BYTES", default_value_t = 0)]
    binary_compress_bytes: usize,
    /// Let the fan-out write a frame straight to an idle plain-TCP
    /// connection's socket instead of waking its task (off while batching).
    #[arg(long, env = "DIRECT_WRITES", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    direct_writes: bool,
}

impl FrameArgs {
    fn apply(&self, cfg: &mut barrage_connect_node::Config) -> Result<(), ConfigError> {
        if self.batch_window_ms > 1000 {
            return Err(bad(
                "BATCH_WINDOW_MS (--batch-window-ms)",
                "at most 1000: a longer wait delays every message",
            ));
        }
        if self.batch_max_messages < 2 {
            return Err(bad(
                "BATCH_MAX_MESSAGES (--batch-max-messages)",
                "must be at least 2",
            ));
        }
        cfg.batch_window = Duration::from_millis(self.batch_window_ms);
        cfg.batch_max = self.batch_max_messages;
        cfg.direct_writes = self.direct_writes;
        if self.binary_compress_bytes > 0 && self.binary_compress_bytes < 64 {
            return Err(bad(
                "BINARY_COMPRESS_BYTES (--binary-compress-bytes)",
                "0 (off) or at least 64: smaller bodies do not shrink",
            ));
        }
        cfg.binary_compression = match self.binary_compress_bytes {
            0 => barrage_protocol::binary::Compression::OFF,
            n => barrage_protocol::binary::Compression::above(n),
        };
        Ok(())
    }
}

#[derive(Debug, Args)]
struct DevArgs {
    /// Address to bind every listener on.
    #[arg(long, env = "BIND_ADDR", default_value = "127.0.0.1")]
    bind_addr: IpAddr,
    /// WebSocket port.
    #[arg(long, env = "WS_PORT", default_value_t = 8080)]
    ws_port: u16,
    /// Public gRPC API (push-manager) port.
    #[arg(long, env = "GRPC_PORT", default_value_t = 50053)]
    grpc_port: u16,
    /// Controller gRPC port.
    #[arg(long, env = "CONTROLLER_GRPC_PORT", default_value_t = 50051)]
    controller_grpc_port: u16,
    /// Connect-node gRPC port.
    #[arg(long, env = "NODE_GRPC_PORT", default_value_t = 50052)]
    node_grpc_port: u16,
    /// push-manager metrics port; the controller uses METRICS_PORT-2 and the
    /// connect-node METRICS_PORT-1.
    #[arg(long, env = "METRICS_PORT", default_value_t = 9093)]
    metrics_port: u16,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
    #[command(flatten)]
    push: PushLimits,
    #[command(flatten)]
    jwt: JwtArgs,
    #[command(flatten)]
    frames: FrameArgs,
}

#[derive(Debug, Args)]
struct SubArgs {
    /// WebSocket URL of a connect-node.
    #[arg(long, env = "BARRAGE_WS_URL", default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// User id to connect as (insecure development mode).
    #[arg(long, default_value = "cli")]
    user: String,
    /// Rooms to join (repeat or comma-separate).
    #[arg(long = "room", value_delimiter = ',')]
    rooms: Vec<String>,
    /// Print each frame as raw JSON instead of a summary line.
    #[arg(long)]
    json: bool,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
}

/// A configuration error: names the setting and says what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {reason}")]
pub struct ConfigError {
    setting: &'static str,
    reason: String,
}

fn bad(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

/// Where a process finds the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// etcd: register and watch.
    Etcd {
        /// Endpoints as URLs.
        endpoints: Vec<String>,
        /// Key prefix.
        prefix: String,
    },
    /// No etcd: one controller at a fixed address.
    Static {
        /// The controller's gRPC address.
        controller: Option<String>,
    },
}

/// Validated settings shared by the roles.
#[derive(Debug, Clone)]
pub struct Base {
    pub cluster: Cluster,
    pub bind: IpAddr,
    pub advertise_host: String,
    pub lease_ttl: Duration,
    pub log_format: LogFormat,
    pub grpc_tls: barrage_proto::GrpcTls,
}

/// What to run, fully validated.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Plan {
    Controller {
        base: Base,
        cfg: barrage_controller::Config,
        grpc_port: u16,
        metrics_port: u16,
    },
    PushManager {
        base: Base,
        cfg: barrage_push_manager::Config,
        grpc_port: u16,
        metrics_port: u16,
    },
    ConnectNode {
        base: Base,
        cfg: barrage_connect_node::Config,
        grpc_port: u16,
        metrics_port: u16,
        ws_port: u16,
    },
    Dev(DevPlan),
    Sub(crate::sub::SubPlan),
    Bench(crate::bench::BenchPlan),
    Bandwidth(crate::bandwidth::BandwidthPlan),
    Idle(crate::idle::IdlePlan),
    Hold(crate::idle::HoldPlan),
    /// `bench-floor`: serve the gRPC floor on this port.
    Floor(u16),
    /// Print a token.
    Token(String),
}

/// `barrage dev` settings.
#[derive(Debug)]
pub struct DevPlan {
    pub bind: IpAddr,
    pub ws_port: u16,
    pub grpc_port: u16,
    pub controller_grpc_port: u16,
    pub node_grpc_port: u16,
    pub metrics_port: u16,
    pub log_format: LogFormat,
    pub push: barrage_push_manager::Config,
    pub auth: barrage_auth::ConnectAuth,
    /// Batching and binary compression of the connect-node.
    pub node: barrage_connect_node::Config,
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("pid{}", std::process::id()))
}

fn node_id(
    setting: &'static str,
    given: Option<String>,
    role: &str,
) -> Result<String, ConfigError> {
    let id = given.unwrap_or_else(|| format!("{role}-{}", hostname()));
    NodeId::new(id.as_str()).map_err(|e| bad(setting, e.to_string()))?;
    Ok(id)
}

fn host_port(setting: &'static str, s: &str) -> Result<String, ConfigError> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .unwrap_or(s);
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(s.to_owned()),
        _ => Err(bad(setting, format!("{s:?} is not host:port"))),
    }
}

fn secs(setting: &'static str, v: u64) -> Result<Duration, ConfigError> {
    if v == 0 {
        return Err(bad(setting, "must be at least 1"));
    }
    Ok(Duration::from_secs(v))
}

impl Common {
    fn base(self, needs_controller: bool) -> Result<Base, ConfigError> {
        let endpoints: Vec<String> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(|e| host_port("ETCD_ENDPOINTS (--etcd-endpoints)", e))
            .collect::<Result<_, _>>()?;
        let cluster = if endpoints.is_empty() {
            let controller = match self.controller_address {
                Some(a) if !a.trim().is_empty() => Some(
                    host_port("CONTROLLER_ADDRESS (--controller-address)", a.trim())?
                        .trim_start_matches("http://")
                        .to_owned(),
                ),
                _ => None,
            };
            if needs_controller && controller.is_none() {
                return Err(bad(
                    "ETCD_ENDPOINTS (--etcd-endpoints)",
                    "no cluster configured: set ETCD_ENDPOINTS, or CONTROLLER_ADDRESS to run without etcd",
                ));
            }
            Cluster::Static { controller }
        } else {
            if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
                return Err(bad(
                    "ETCD_PREFIX (--etcd-prefix)",
                    format!(
                        "{:?} must start with '/' and not end with '/'",
                        self.etcd_prefix
                    ),
                ));
            }
            Cluster::Etcd {
                endpoints,
                prefix: self.etcd_prefix,
            }
        };
        let advertise_host = match self.advertise_host {
            Some(h) if !h.trim().is_empty() => h.trim().to_owned(),
            _ if !self.bind_addr.is_unspecified() => self.bind_addr.to_string(),
            _ => "127.0.0.1".to_owned(),
        };
        let grpc_tls = barrage_proto::GrpcTls::load(&barrage_proto::GrpcTlsFiles {
            cert: self.grpc_tls_cert_file,
            key: self.grpc_tls_key_file,
            ca: self.grpc_tls_ca_file,
            server_name: self.grpc_tls_server_name,
        })
        .map_err(|e| {
            let setting = match e.which {
                "cert" => "GRPC_TLS_CERT_FILE (--grpc-tls-cert-file)",
                "key" => "GRPC_TLS_KEY_FILE (--grpc-tls-key-file)",
                _ => "GRPC_TLS_CA_FILE (--grpc-tls-ca-file)",
            };
            bad(setting, e.to_string())
        })?;
        Ok(Base {
            grpc_tls,
            cluster,
            bind: self.bind_addr,
            advertise_host,
            lease_ttl: secs("LEASE_TTL_SECS (--lease-ttl-secs)", self.lease_ttl_secs)?,
            log_format: self.log_format,
        })
    }
}

impl PushLimits {
    fn config(&self, node_id: String) -> Result<barrage_push_manager::Config, ConfigError> {
        if self.push_timeout_ms == 0 {
            return Err(bad(
                "PUSH_TIMEOUT_MS (--push-timeout-ms)",
                "must be at least 1",
            ));
        }
        if self.max_content_bytes == 0 {
            return Err(bad(
                "MAX_CONTENT_BYTES (--max-content-bytes)",
                "must be at least 1",
            ));
        }
        if self.max_user_ids == 0 {
            return Err(bad("MAX_USER_IDS (--max-user-ids)", "must be at least 1"));
        }
        if !(1..=1024).contains(&self.peer_calls_in_flight) {
            return Err(bad(
                "PEER_CALLS_IN_FLIGHT (--peer-calls-in-flight)",
                "must be 1 to 1024",
            ));
        }
        let mut cfg = barrage_push_manager::Config {
            node_id,
            node_timeout: Duration::from_millis(self.push_timeout_ms),
            peer_calls_in_flight: self.peer_calls_in_flight,
            ..Default::default()
        };
        cfg.api_auth = barrage_auth::ApiAuth::parse(&self.api_tokens)
            .map_err(|e| bad("API_TOKENS (--api-tokens)", e.to_string()))?;
        cfg.limits.max_content_bytes = self.max_content_bytes;
        cfg.limits.max_user_ids = self.max_user_ids;
        Ok(cfg)
    }
}

impl WsArgs {
    fn publish_settings(
        &self,
        tls: &barrage_proto::GrpcTls,
    ) -> Result<Option<barrage_connect_node::publish::PublishSettings>, ConfigError> {
        use barrage_connect_node::publish::{PublishSettings, WordsMode, check_words_file};
        let rooms: Vec<String> = self
            .publish_rooms
            .iter()
            .map(|r| r.trim().to_owned())
            .filter(|r| !r.is_empty())
            .collect();
        if rooms.is_empty() {
            return Ok(None);
        }
        let api = match self.publish_api.as_deref().map(str::trim) {
            Some(a) if !a.is_empty() => host_port("PUBLISH_API (--publish-api)", a)?
                .trim_start_matches("http://")
                .trim_start_matches("https://")
                .to_owned(),
            _ => {
                return Err(bad(
                    "PUBLISH_API (--publish-api)",
                    "is required with PUBLISH_ROOMS: the push-manager comments go through",
                ));
            }
        };
        let api_token = match self.publish_api_token.as_deref() {
            None | Some("") => None,
            Some(t) => {
                let setting = "PUBLISH_API_TOKEN (--publish-api-token)";
                barrage_connect_node::publish::check_api_token(t)
                    .map_err(|why| bad(setting, why))?;
                if t.len() < 16 {
                    return Err(bad(
                        setting,
                        "is shorter than 16 characters, which API_TOKENS never accepts",
                    ));
                }
                Some(t.to_owned())
            }
        };
        if self.publish_max_chars == 0 {
            return Err(bad(
                "PUBLISH_MAX_CHARS (--publish-max-chars)",
                "must be at least 1",
            ));
        }
        if self.publish_user_per_sec == 0 {
            return Err(bad(
                "PUBLISH_USER_PER_SEC (--publish-user-per-sec)",
                "must be at least 1",
            ));
        }
        if self.publish_user_burst < self.publish_user_per_sec {
            return Err(bad(
                "PUBLISH_USER_BURST (--publish-user-burst)",
                "must be at least PUBLISH_USER_PER_SEC",
            ));
        }
        let words_mode = match self.sensitive_words_mode.as_str() {
            "reject" => WordsMode::Reject,
            "mask" => WordsMode::Mask,
            other => {
                return Err(bad(
                    "SENSITIVE_WORDS_MODE (--sensitive-words-mode)",
                    format!("{other:?}: expected reject or mask"),
                ));
            }
        };
        if let Some(f) = &self.sensitive_words_file {
            check_words_file(f).map_err(|e| {
                bad(
                    "SENSITIVE_WORDS_FILE (--sensitive-words-file)",
                    e.to_string(),
                )
            })?;
        }
        barrage_connect_node::publish::check_list_files(
            self.publish_blocklist_file.as_ref(),
            self.publish_mutes_file.as_ref(),
        )
        .map_err(|e| bad("PUBLISH_BLOCKLIST_FILE / PUBLISH_MUTES_FILE", e.to_string()))?;
        let moderation = match self.moderation_hook.as_deref().map(str::trim) {
            Some(a) if !a.is_empty() => {
                if self.moderation_timeout_ms == 0 {
                    return Err(bad(
                        "MODERATION_TIMEOUT_MS (--moderation-timeout-ms)",
                        "must be at least 1",
                    ));
                }
                Some(barrage_connect_node::publish::ModerationHook {
                    addr: host_port("MODERATION_HOOK (--moderation-hook)", a)?
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .to_owned(),
                    timeout: Duration::from_millis(self.moderation_timeout_ms),
                    fail_open: self.moderation_fail_open,
                })
            }
            _ => None,
        };
        Ok(Some(PublishSettings {
            blocklist_file: self.publish_blocklist_file.clone(),
            mutes_file: self.publish_mutes_file.clone(),
            moderation,
            api,
            api_token,
            tls: tls.clone(),
            rooms,
            claim_rooms: self.publish_claim_rooms.clone(),
            max_chars: self.publish_max_chars,
            user_per_sec: self.publish_user_per_sec,
            user_burst: self.publish_user_burst,
            room_per_sec: self.publish_room_per_sec,
            dedup_window: Duration::from_secs(self.publish_dedup_secs),
            words_file: self.sensitive_words_file.clone(),
            words_mode,
        }))
    }

    fn apply(&self, cfg: &mut barrage_connect_node::Config) -> Result<(), ConfigError> {
        if self.send_queue == 0 {
            return Err(bad("SEND_QUEUE (--send-queue)", "must be at least 1"));
        }
        if self.max_frame_bytes < 256 {
            return Err(bad(
                "MAX_FRAME_BYTES (--max-frame-bytes)",
                "must be at least 256",
            ));
        }
        if self.max_rooms_per_conn == 0 {
            return Err(bad(
                "MAX_ROOMS_PER_CONN (--max-rooms-per-conn)",
                "must be at least 1",
            ));
        }
        if self.ws_buffer_bytes < 512 {
            return Err(bad(
                "WS_BUFFER_BYTES (--ws-buffer-bytes)",
                "must be at least 512",
            ));
        }
        if self.ws_read_buffer_bytes < 256 {
            return Err(bad(
                "WS_READ_BUFFER_BYTES (--ws-read-buffer-bytes)",
                "must be at least 256",
            ));
        }
        let ping = secs(
            "PING_INTERVAL_SECS (--ping-interval-secs)",
            self.ping_interval_secs,
        )?;
        let read = secs(
            "READ_TIMEOUT_SECS (--read-timeout-secs)",
            self.read_timeout_secs,
        )?;
        if read <= ping {
            return Err(bad(
                "READ_TIMEOUT_SECS (--read-timeout-secs)",
                format!(
                    "must be longer than PING_INTERVAL_SECS ({}s), or healthy clients are cut off",
                    ping.as_secs()
                ),
            ));
        }
        cfg.insecure_user_id = self.insecure_user_id;
        cfg.send_queue = self.send_queue;
        cfg.max_frame_bytes = self.max_frame_bytes;
        cfg.max_rooms = self.max_rooms_per_conn;
        cfg.ping_interval = ping;
        cfg.read_timeout = read;
        cfg.io_buffer = self.ws_buffer_bytes;
        cfg.read_buffer = self.ws_read_buffer_bytes;
        if self.max_connections == 0 {
            return Err(bad(
                "MAX_CONNECTIONS (--max-connections)",
                "must be at least 1",
            ));
        }
        if self.max_connections_per_user == 0 {
            return Err(bad(
                "MAX_CONNECTIONS_PER_USER (--max-connections-per-user)",
                "must be at least 1",
            ));
        }
        if self.client_messages_per_sec == 0 {
            return Err(bad(
                "CLIENT_MESSAGES_PER_SEC (--client-messages-per-sec)",
                "must be at least 1",
            ));
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://"))
                || origin.ends_with('/')
            {
                return Err(bad(
                    "ALLOWED_ORIGINS (--allowed-origins)",
                    format!("{origin:?} is not an origin like https://app.example.com"),
                ));
            }
        }
        cfg.max_connections = self.max_connections;
        cfg.max_connections_per_user = self.max_connections_per_user;
        cfg.new_connections_per_ip = self.new_connections_per_ip_per_sec;
        cfg.messages_per_sec = self.client_messages_per_sec;
        cfg.allowed_origins = self.allowed_origins.clone();
        if self.demo_publish_api.is_some() && !self.demo_page {
            return Err(bad(
                "DEMO_PUBLISH_API (--demo-publish-api)",
                "needs DEMO_PAGE=true",
            ));
        }
        if self.demo_page {
            let publish_api = match self.demo_publish_api.as_deref().map(str::trim) {
                Some(a) if !a.is_empty() => Some(
                    host_port("DEMO_PUBLISH_API (--demo-publish-api)", a)?
                        .trim_start_matches("http://")
                        .trim_start_matches("https://")
                        .to_owned(),
                ),
                _ => None,
            };
            cfg.demo = Some(barrage_connect_node::demo::DemoSettings {
                publish_api,
                tls: cfg.grpc_tls.clone(),
            });
        }
        cfg.publish = self.publish_settings(&cfg.grpc_tls)?;
        self.frames.apply(cfg)?;
        cfg.handshake_timeout = secs(
            "HANDSHAKE_TIMEOUT_SECS (--handshake-timeout-secs)",
            self.handshake_timeout_secs,
        )?;
        cfg.tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let files = barrage_connect_node::listener::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                };
                match barrage_connect_node::listener::CertStore::load(files.clone()) {
                    Ok(_) => Some(files),
                    Err(e @ barrage_connect_node::listener::TlsError::Cert { .. }) => {
                        return Err(bad("TLS_CERT_FILE (--tls-cert-file)", e.to_string()));
                    }
                    Err(e) => return Err(bad("TLS_KEY_FILE (--tls-key-file)", e.to_string())),
                }
            }
            (Some(_), None) => {
                return Err(bad(
                    "TLS_KEY_FILE (--tls-key-file)",
                    "is required with TLS_CERT_FILE",
                ));
            }
            (None, Some(_)) => {
                return Err(bad(
                    "TLS_CERT_FILE (--tls-cert-file)",
                    "is required with TLS_KEY_FILE",
                ));
            }
        };
        Ok(())
    }
}

impl Cli {
    /// The scheduler to build the runtime with.
    pub fn runtime_flavor(&self) -> RuntimeFlavor {
        self.runtime_flavor
    }

    /// Worker threads asked for, if any (multi-thread runtime only).
    pub fn worker_threads(&self) -> Option<usize> {
        self.worker_threads.map(std::num::NonZeroUsize::get)
    }

    /// Whether the process may use transparent huge pages.
    pub fn huge_pages(&self) -> HugePages {
        self.transparent_huge_pages
    }

    /// Validates everything and says what to run.
    pub fn into_plan(self) -> Result<Plan, ConfigError> {
        Ok(match self.command {
            Command::Controller(a) => {
                let base = a.common.base(false)?;
                let cfg = barrage_controller::Config {
                    node_id: node_id("NODE_ID (--node-id)", a.node_id, "controller")?,
                    advertise_addr: format!("{}:{}", base.advertise_host, a.grpc_port),
                    lease_ttl: base.lease_ttl,
                    node_timeout: secs(
                        "NODE_TIMEOUT_SECS (--node-timeout-secs)",
                        a.node_timeout_secs,
                    )?,
                    streams: a.history.config()?,
                    warmup: Duration::from_secs(a.warmup_secs),
                    grpc_tls: base.grpc_tls.clone(),
                    ..Default::default()
                };
                Plan::Controller {
                    base,
                    cfg,
                    grpc_port: a.grpc_port,
                    metrics_port: a.metrics_port,
                }
            }
            Command::PushManager(a) => {
                let base = a.common.base(true)?;
                let mut cfg = a.push.config(node_id(
                    "MANAGER_ID (--manager-id)",
                    a.manager_id,
                    "push-manager",
                )?)?;
                cfg.advertise_addr = format!("{}:{}", base.advertise_host, a.grpc_port);
                cfg.lease_ttl = base.lease_ttl;
                cfg.grpc_tls = base.grpc_tls.clone();
                Plan::PushManager {
                    base,
                    cfg,
                    grpc_port: a.grpc_port,
                    metrics_port: a.metrics_port,
                }
            }
            Command::ConnectNode(a) => {
                let base = a.common.base(true)?;
                let mut cfg = barrage_connect_node::Config {
                    node_id: node_id("NODE_ID (--node-id)", a.node_id, "connect-node")?,
                    advertise_addr: format!("{}:{}", base.advertise_host, a.grpc_port),
                    lease_ttl: base.lease_ttl,
                    grpc_tls: base.grpc_tls.clone(),
                    ..Default::default()
                };
                a.ws.apply(&mut cfg)?;
                cfg.auth = a.jwt.auth()?;
                Plan::ConnectNode {
                    base,
                    cfg,
                    grpc_port: a.grpc_port,
                    metrics_port: a.metrics_port,
                    ws_port: a.ws_port,
                }
            }
            Command::Dev(a) => {
                if a.metrics_port < 2 {
                    return Err(bad("METRICS_PORT (--metrics-port)", "must be at least 2"));
                }
                Plan::Dev(DevPlan {
                    bind: a.bind_addr,
                    ws_port: a.ws_port,
                    grpc_port: a.grpc_port,
                    controller_grpc_port: a.controller_grpc_port,
                    node_grpc_port: a.node_grpc_port,
                    metrics_port: a.metrics_port,
                    log_format: a.log_format,
                    push: a.push.config("push-manager-dev".into())?,
                    auth: a.jwt.auth()?,
                    node: {
                        let mut cfg = barrage_connect_node::Config::default();
                        a.frames.apply(&mut cfg)?;
                        cfg
                    },
                })
            }
            Command::Token(a) => {
                let rooms: Vec<String> = a.rooms.into_iter().filter(|r| !r.is_empty()).collect();
                let token = barrage_auth::mint(
                    a.secret.as_bytes(),
                    &a.user,
                    (!rooms.is_empty()).then_some(rooms),
                    Duration::from_secs(a.ttl_secs),
                )
                .map_err(|e| bad("JWT_HS256_SECRET (--secret)", e.to_string()))?;
                if a.secret.len() < 16 {
                    return Err(bad(
                        "JWT_HS256_SECRET (--secret)",
                        "must be at least 16 bytes",
                    ));
                }
                if barrage_protocol::UserId::new(a.user.as_str()).is_err() {
                    return Err(bad(
                        "--user",
                        "must be 1-128 bytes without whitespace, control characters or commas",
                    ));
                }
                Plan::Token(token)
            }
            Command::BenchFloor(a) => Plan::Floor(a.grpc_port),
            Command::BenchHold(a) => {
                if a.nodes.is_empty() || a.count == 0 || a.count > crate::idle::PER_HELPER {
                    return Err(bad(
                        "--count",
                        "1 to 15000 connections to at least one node",
                    ));
                }
                Plan::Hold(crate::idle::HoldPlan {
                    nodes: a.nodes,
                    count: a.count,
                    first_user: a.first_user,
                    source_base: a.source_base,
                    sources: a.sources,
                    hold: Duration::from_secs(a.hold_secs),
                })
            }
            Command::Bench(a) if matches!(a.scenario, Scenario::Idle | Scenario::Storm) => {
                if !(1..=200_000).contains(&a.subscribers) {
                    return Err(bad("--subscribers", "idle: must be 1 to 200000"));
                }
                // One node process holds at most ~18,000 (20,000 open files).
                let least = a.subscribers.div_ceil(16_000);
                let nodes = a.nodes.unwrap_or(least.max(1));
                if nodes < least || nodes > 20 {
                    return Err(bad(
                        "--nodes",
                        format!(
                            "idle: {least} to 20 for {} connections (16,000 per node at most)",
                            a.subscribers
                        ),
                    ));
                }
                if !(1..=200).contains(&a.sources) {
                    return Err(bad("--sources", "must be 1 to 200"));
                }
                if !(1..=1000).contains(&a.storm_missed) {
                    return Err(bad("--storm-missed", "must be 1 to 1000"));
                }
                Plan::Idle(crate::idle::IdlePlan {
                    connections: a.subscribers,
                    nodes,
                    sources: a.sources,
                    verbose: a.verbose,
                    storm: (a.scenario == Scenario::Storm).then_some(a.storm_missed),
                })
            }
            Command::Bench(a) if a.scenario == Scenario::Bandwidth => {
                if !(1..=100_000).contains(&a.comments) {
                    return Err(bad("--comments", "must be 1 to 100000"));
                }
                let rate = a.rate.unwrap_or(1000);
                if !(1..=20_000).contains(&rate) {
                    return Err(bad(
                        "--rate",
                        "bandwidth: must be 1 to 20000 comments per second",
                    ));
                }
                if !(1..=1000).contains(&a.batch_window_ms) {
                    return Err(bad("--batch-window-ms", "must be 1 to 1000"));
                }
                if a.compress_bytes < 64 {
                    return Err(bad("--compress-bytes", "must be at least 64"));
                }
                Plan::Bandwidth(crate::bandwidth::BandwidthPlan {
                    comments: a.comments,
                    rate,
                    batch_window_ms: a.batch_window_ms,
                    compress_bytes: a.compress_bytes,
                })
            }
            Command::Bench(a) => {
                match (a.compare, a.scenario) {
                    (None, _) | (Some(Peer::Nchan), Scenario::Room | Scenario::User) => {}
                    (Some(Peer::GrpcFloor), Scenario::User) => {}
                    (Some(Peer::Nchan), _) => {
                        return Err(bad(
                            "--compare",
                            "nchan runs the room and user scenarios only",
                        ));
                    }
                    (Some(Peer::GrpcFloor), _) => {
                        return Err(bad("--compare", "grpc-floor runs the user scenario only"));
                    }
                }
                if !(1..=100_000).contains(&a.subscribers) {
                    return Err(bad("--subscribers", "must be 1 to 100000"));
                }
                // Broadcast spans several nodes by default; the others run
                // on `barrage dev` unless --nodes asks for a cluster.
                let nodes = match (a.nodes, a.scenario) {
                    (Some(n), _) if !(1..=20).contains(&n) => {
                        return Err(bad("--nodes", "must be 1 to 20"));
                    }
                    (Some(_), _) if a.compare == Some(Peer::Nchan) => {
                        return Err(bad("--nodes", "the peer comparison runs on one node"));
                    }
                    (Some(n), _) => n,
                    (None, Scenario::Broadcast) => 10,
                    (None, _) => 0,
                };
                if !(1..=300).contains(&a.duration_secs) {
                    return Err(bad("--duration-secs", "must be 1 to 300"));
                }
                if !(1..=1_000_000).contains(&a.max_pushes) {
                    return Err(bad("--max-pushes", "must be 1 to 1000000"));
                }
                if !(1..=200).contains(&a.sources) {
                    return Err(bad("--sources", "must be 1 to 200"));
                }
                if a.in_flight == 0 || a.in_flight > 10_000 {
                    return Err(bad("--in-flight", "must be 1 to 10000"));
                }
                if a.payload_bytes > 60_000 {
                    return Err(bad("--payload-bytes", "must be at most 60000"));
                }
                if a.client_nice > 19 {
                    return Err(bad("--client-nice", "must be 0 to 19"));
                }
                if let Some(f) = a.over_nchan {
                    if !(1.0..=100.0).contains(&f) {
                        return Err(bad("--over-nchan", "must be 1 to 100"));
                    }
                    if a.compare != Some(Peer::Nchan) || a.rate != Some(0) {
                        return Err(bad(
                            "--over-nchan",
                            "needs --compare nchan and --rate 0 (Nchan runs at max rate)",
                        ));
                    }
                }
                let role_env = role_envs(&a.role_env)?;
                if !role_env.is_empty() && nodes == 0 {
                    return Err(bad(
                        "--role-env",
                        "sets a role's environment in a cluster: give --nodes too",
                    ));
                }
                Plan::Bench(crate::bench::BenchPlan {
                    subscribers: a.subscribers,
                    rate: a.rate.unwrap_or(20),
                    in_flight: a.in_flight,
                    duration: Duration::from_secs(a.duration_secs),
                    max_pushes: a.max_pushes,
                    sources: a.sources,
                    payload_bytes: a.payload_bytes,
                    message_ids: a.message_ids,
                    verbose: a.verbose,
                    compare: a.compare,
                    mode: match a.scenario {
                        Scenario::User => crate::bench::Mode::User,
                        Scenario::Broadcast => crate::bench::Mode::Broadcast,
                        _ => crate::bench::Mode::Room,
                    },
                    nodes,
                    client_nice: a.client_nice,
                    over_nchan: a.over_nchan,
                    role_env,
                })
            }
            Command::Sub(a) => Plan::Sub(crate::sub::SubPlan {
                url: a.url,
                user: a.user,
                rooms: a.rooms.into_iter().filter(|r| !r.is_empty()).collect(),
                json: a.json,
                count: a.count,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, String> {
        let mut full = vec!["barrage"];
        full.extend_from_slice(args);
        Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .into_plan()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn controller_defaults() {
        let Ok(Plan::Controller {
            cfg,
            grpc_port,
            metrics_port,
            base,
        }) = plan(&["controller", "--node-id", "c1"])
        else {
            panic!("not a controller plan")
        };
        assert_eq!((grpc_port, metrics_port), (50051, 9091));
        assert_eq!(cfg.node_id, "c1");
        assert_eq!(cfg.advertise_addr, "127.0.0.1:50051");
        assert_eq!(base.cluster, Cluster::Static { controller: None });
        assert_eq!(
            (cfg.streams.max_total_messages, cfg.streams.max_total_bytes),
            (1_000_000, 256 << 20)
        );
        let Ok(Plan::Controller { cfg, .. }) =
            plan(&["controller", "--history-max-bytes", "1048576"])
        else {
            panic!("not a controller plan")
        };
        assert_eq!(cfg.streams.max_total_bytes, 1 << 20);
    }

    #[test]
    fn push_manager_needs_a_cluster() {
        let err = plan(&["push-manager"]).unwrap_err();
        assert!(err.contains("ETCD_ENDPOINTS"), "{err}");
        assert!(err.contains("CONTROLLER_ADDRESS"), "{err}");
        let ok = plan(&["push-manager", "--controller-address", "10.0.0.1:50051"]);
        assert!(matches!(ok, Ok(Plan::PushManager { .. })));
    }

    #[test]
    fn etcd_endpoints_are_checked() {
        let err = plan(&["connect-node", "--etcd-endpoints", "http://a:2379,nope"]).unwrap_err();
        assert!(
            err.contains("ETCD_ENDPOINTS") && err.contains("nope"),
            "{err}"
        );
        let Ok(Plan::ConnectNode { base, .. }) =
            plan(&["connect-node", "--etcd-endpoints", "http://a:2379,b:2379"])
        else {
            panic!("not a connect-node plan")
        };
        assert_eq!(
            base.cluster,
            Cluster::Etcd {
                endpoints: vec!["http://a:2379".into(), "b:2379".into()],
                prefix: "/barrage".into()
            }
        );
    }

    #[test]
    fn over_nchan_needs_nchan_at_max_rate() {
        let nchan_max = |factor: &str| -> Vec<String> {
            [
                "bench",
                "--compare",
                "nchan",
                "--rate",
                "0",
                "--over-nchan",
                factor,
            ]
            .map(String::from)
            .to_vec()
        };
        let run = |args: &[String]| plan(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let Ok(Plan::Bench(b)) = run(&nchan_max("1.5")) else {
            panic!("not a bench plan")
        };
        assert_eq!((b.over_nchan, b.rate), (Some(1.5), 0));
        let no_peer = ["bench", "--rate", "0", "--over-nchan", "1.5"].map(String::from);
        let paced = ["bench", "--compare", "nchan", "--over-nchan", "1.5"].map(String::from);
        for args in [
            no_peer.to_vec(),
            paced.to_vec(),
            nchan_max("0.9"),
            nchan_max("NaN"),
        ] {
            let err = run(&args).unwrap_err();
            assert!(err.contains("--over-nchan"), "{args:?}: {err}");
        }
    }

    #[test]
    fn role_env_goes_to_one_role_of_a_cluster() {
        let Ok(Plan::Bench(b)) = plan(&[
            "bench",
            "--nodes",
            "1",
            "--role-env",
            "push-manager:RUNTIME_FLAVOR=current-thread",
            "--role-env",
            "connect-node:DIRECT_WRITES=false",
            "--role-env",
            "controller:EMPTY=",
        ]) else {
            panic!("not a bench plan")
        };
        let got: Vec<_> = b
            .role_env
            .iter()
            .map(|e| (e.role, e.name.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("push-manager", "RUNTIME_FLAVOR", "current-thread"),
                ("connect-node", "DIRECT_WRITES", "false"),
                ("controller", "EMPTY", ""),
            ]
        );
        for bad in [
            "RUNTIME_FLAVOR=current-thread",
            "pushmanager:RUNTIME_FLAVOR=x",
            "push-manager:RUNTIME_FLAVOR",
            "push-manager:=x",
            "push-manager:A B=x",
        ] {
            let err = plan(&["bench", "--nodes", "1", "--role-env", bad]).unwrap_err();
            assert!(
                err.contains("--role-env") && err.contains(bad),
                "{bad}: {err}"
            );
        }
        let err = plan(&["bench", "--role-env", "controller:A=1"]).unwrap_err();
        assert!(
            err.contains("--role-env") && err.contains("--nodes"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let err = plan(&["controller", "--grpc-port", "99999"]).unwrap_err();
        assert!(err.contains("--grpc-port"), "{err}");
        let err = plan(&["controller", "--lease-ttl-secs", "0"]).unwrap_err();
        assert!(err.contains("LEASE_TTL_SECS"), "{err}");
        let err = plan(&["controller", "--node-id", "has space"]).unwrap_err();
        assert!(err.contains("NODE_ID"), "{err}");
        let err = plan(&["controller", "--history-max-bytes", "0"]).unwrap_err();
        assert!(err.contains("HISTORY_MAX_BYTES"), "{err}");
        let err = plan(&["controller", "--history-max-streams", "0"]).unwrap_err();
        assert!(err.contains("HISTORY_MAX_STREAMS"), "{err}");
        let err = plan(&[
            "connect-node",
            "--controller-address",
            "c:1",
            "--read-timeout-secs",
            "5",
            "--ping-interval-secs",
            "10",
        ])
        .unwrap_err();
        assert!(err.contains("READ_TIMEOUT_SECS"), "{err}");
        let err = plan(&[
            "push-manager",
            "--controller-address",
            "c:1",
            "--max-content-bytes",
            "0",
        ])
        .unwrap_err();
        assert!(err.contains("MAX_CONTENT_BYTES"), "{err}");
    }

    #[test]
    fn limit_and_tls_settings_are_checked() {
        let node = |extra: &[&str]| {
            let mut args = vec!["connect-node", "--controller-address", "c:1"];
            args.extend_from_slice(extra);
            plan(&args)
        };
        for (args, setting) in [
            (&["--max-connections", "0"][..], "MAX_CONNECTIONS"),
            (
                &["--max-connections-per-user", "0"][..],
                "MAX_CONNECTIONS_PER_USER",
            ),
            (
                &["--client-messages-per-sec", "0"][..],
                "CLIENT_MESSAGES_PER_SEC",
            ),
            (
                &["--allowed-origins", "app.example.com"][..],
                "ALLOWED_ORIGINS",
            ),
            (
                &["--allowed-origins", "https://a.example/"][..],
                "ALLOWED_ORIGINS",
            ),
            (
                &["--handshake-timeout-secs", "0"][..],
                "HANDSHAKE_TIMEOUT_SECS",
            ),
            (&["--jwt-leeway-secs", "3601"][..], "JWT_LEEWAY_SECS"),
            (
                &["--tls-cert-file", "/nonexistent/cert.pem"][..],
                "TLS_KEY_FILE",
            ),
            (
                &["--tls-key-file", "/nonexistent/key.pem"][..],
                "TLS_CERT_FILE",
            ),
            (
                &[
                    "--tls-cert-file",
                    "/nonexistent/cert.pem",
                    "--tls-key-file",
                    "/nonexistent/key.pem",
                ][..],
                "TLS_CERT_FILE",
            ),
        ] {
            let err = node(args).unwrap_err();
            assert!(err.contains(setting), "{args:?}: {err}");
        }
        assert!(
            node(&[
                "--allowed-origins",
                "https://a.example,http://localhost:3000"
            ])
            .is_ok()
        );
    }

    #[test]
    fn the_publish_api_token_is_checked_and_kept() {
        let node = |extra: &[&str]| {
            let mut args = vec![
                "connect-node",
                "--controller-address",
                "c:1",
                "--publish-rooms",
                "live-*",
                "--publish-api",
                "pm:50053",
            ];
            args.extend_from_slice(extra);
            plan(&args)
        };
        let Ok(Plan::ConnectNode { cfg, .. }) =
            node(&["--publish-api-token", "node-publisher-0123456789"])
        else {
            panic!("not a connect-node plan")
        };
        let publish = cfg.publish.expect("publishing on");
        assert_eq!(
            publish.api_token.as_deref(),
            Some("node-publisher-0123456789")
        );
        let Ok(Plan::ConnectNode { cfg, .. }) = node(&[]) else {
            panic!("not a connect-node plan")
        };
        assert_eq!(cfg.publish.expect("publishing on").api_token, None);
        for bad in [
            "tiny-tok",
            "has a space in it 0123",
            "tab\tinside-0123456789",
        ] {
            let err = node(&["--publish-api-token", bad]).unwrap_err();
            assert!(err.contains("PUBLISH_API_TOKEN"), "{bad:?}: {err}");
            assert!(!err.contains(bad), "the token is not printed: {err}");
        }
    }

    #[test]
    fn the_jwt_leeway_reaches_the_connect_node() {
        let Ok(Plan::ConnectNode { cfg, .. }) = plan(&[
            "connect-node",
            "--controller-address",
            "c:1",
            "--jwt-leeway-secs",
            "30",
        ]) else {
            panic!("not a connect-node plan")
        };
        assert_eq!(cfg.auth.leeway(), Duration::from_secs(30));
    }

    #[test]
    fn insecure_flag_forms() {
        for args in [
            vec![
                "connect-node",
                "--controller-address",
                "c:1",
                "--insecure-user-id",
            ],
            vec![
                "connect-node",
                "--controller-address",
                "c:1",
                "--insecure-user-id",
                "true",
            ],
        ] {
            let Ok(Plan::ConnectNode { cfg, .. }) = plan(&args) else {
                panic!("not a connect-node plan")
            };
            assert!(cfg.insecure_user_id);
        }
    }

    #[test]
    fn dev_defaults_match_the_readme() {
        let Ok(Plan::Dev(d)) = plan(&["dev"]) else {
            panic!("not a dev plan")
        };
        assert_eq!((d.ws_port, d.grpc_port), (8080, 50053));
        assert_eq!(d.bind.to_string(), "127.0.0.1");
    }
}
