//! `barrage bench`: a load client for the real system. It starts a server
//! (`barrage dev` in a child process, so server and clients each have their
//! own open-file limit), opens many WebSockets spread over loopback source
//! addresses (127.0.0.2…), pushes through the real gRPC API with the send
//! time in each payload, and measures end-to-end latency, deliveries per
//! second, lost and duplicated messages, and the server's memory per
//! connection. Every run is bounded in count and time, targets loopback
//! only, and prints one JSON summary.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use barrage_proto::v1::push_manager_client::PushManagerClient;
use barrage_proto::v1::push_manager_server::{PushManager, PushManagerServer};
use barrage_proto::v1::{
    BroadcastRequest, BroadcastResponse, CloseRoomRequest, CloseRoomResponse, GetRoomInfoRequest,
    GetRoomInfoResponse, GetStatusRequest, GetStatusResponse, GetUserNodeRequest,
    GetUserNodeResponse, PushToRoomRequest, PushToRoomResponse, PushToUserRequest,
    PushToUserResponse,
};
use futures::{StreamExt, stream};
use parking_lot::Mutex;
use tokio::process::{Child, Command};

use crate::cli::Peer;
use crate::reader::{self, Came, OnText, Open, Readers};

/// A bench run, validated.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    /// WebSocket subscribers in the room.
    pub subscribers: usize,
    /// Pushes per second; 0: as fast as `in_flight` allows.
    pub rate: u32,
    /// Pushes in flight at once at max rate.
    pub in_flight: usize,
    /// How long to push.
    pub duration: Duration,
    /// Upper bound on pushes, whatever the rate.
    pub max_pushes: u64,
    /// Loopback source addresses to spread connections over.
    pub sources: u8,
    /// Bytes of filler in each payload.
    pub payload_bytes: usize,
    /// Give push `i` the message_id `bench-<i>`.
    pub message_ids: bool,
    /// Print progress to stderr.
    pub verbose: bool,
    /// Run the same scenario against a peer too and print the ratios.
    pub compare: Option<Peer>,
    /// What each push targets.
    pub mode: Mode,
    /// Connect-node processes: 0 runs `barrage dev` (all roles in one
    /// process); N runs a controller, a push-manager and N connect-nodes,
    /// each its own process, with the subscribers spread over the nodes.
    pub nodes: usize,
    /// Niceness of the threads reading the subscribers' sockets (0–19).
    pub client_nice: u8,
    /// The fan-out goal checked in one run: Nchan first at max rate, then
    /// barrage paced at this many times Nchan's deliveries/s (with
    /// `compare` Nchan and `rate` 0 only).
    pub over_nchan: Option<f64>,
    /// Environment variables for one role's processes of a cluster.
    pub role_env: Vec<RoleEnv>,
}

/// An environment variable set for every process of one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleEnv {
    /// `controller`, `push-manager` or `connect-node`.
    pub role: &'static str,
    pub name: String,
    pub value: String,
}

/// What each push targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `PushToRoom` to the one room every subscriber is in.
    Room,
    /// `PushToUser`: push `i` goes to subscriber `i % subscribers`, each
    /// subscriber its own user.
    User,
    /// `Broadcast`: every connection on every node.
    Broadcast,
}

/// Where the bench takes its servers' ports: below the kernel's ephemeral
/// range (`ip_local_port_range`), so that no outgoing connection (the
/// bench's own, or a role dialling another) can take a port between the
/// check here and the server binding it.
fn port_range() -> std::ops::Range<u16> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    10_000..ephemeral.max(11_000)
}

/// `n` free ports on 127.0.0.1 for the bench's servers, consecutive if
/// asked. The process walks the range from a place of its own and never
/// hands out a port twice until it has gone all the way round.
fn free_ports(n: usize, consecutive: bool) -> anyhow::Result<Vec<u16>> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let range = port_range();
    let span = u32::from(range.end - range.start);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (now_nanos() % u64::from(span)) as u32,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let mut held: Vec<std::net::TcpListener> = Vec::with_capacity(n);
    for _ in 0..span {
        let port = range.start + (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if consecutive && port == range.start {
            held.clear();
        }
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => held.push(l),
            Err(_) if consecutive => held.clear(),
            Err(_) => {}
        }
        if held.len() == n {
            return Ok(held
                .iter()
                .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
                .collect());
        }
    }
    bail!(
        "fewer than {n} free ports on 127.0.0.1 between {} and {}",
        range.start,
        range.end
    )
}

pub struct Server {
    /// Every server process, with the role it runs (`dev` for all of them).
    children: Vec<(&'static str, Child)>,
    /// WebSocket address of every connect-node.
    pub(crate) ws: Vec<SocketAddr>,
    pub(crate) api: SocketAddr,
}

impl Server {
    /// Every server process.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|(_, c)| c.id()).collect()
    }

    /// The processes of each role, roles in start order.
    pub(crate) fn pids_by_role(&self) -> Vec<(&'static str, Vec<u32>)> {
        let mut roles: Vec<(&'static str, Vec<u32>)> = Vec::new();
        for (role, c) in &self.children {
            let Some(pid) = c.id() else { continue };
            match roles.iter_mut().find(|(r, _)| r == role) {
                Some((_, pids)) => pids.push(pid),
                None => roles.push((role, vec![pid])),
            }
        }
        roles
    }
}

/// Waits until `GET path` on `addr` answers 200 (at most 30 s).
async fn wait_ready(addr: SocketAddr, path: &str, what: &str) -> anyhow::Result<()> {
    wait_until(addr, what, || http_ok(addr, path)).await
}

/// Waits until `ready` says yes, asking every 100 ms (at most 30 s).
async fn wait_until<F: Future<Output = bool>>(
    addr: SocketAddr,
    what: &str,
    ready: impl Fn() -> F,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready().await {
        if Instant::now() > deadline {
            bail!("{what} did not become ready on {addr}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Waits until every address in `ready` answers `/readyz`, failing at once
/// if one of `children` exits first (a setting it refused, a port taken).
async fn children_ready(
    children: &mut [(&'static str, Child)],
    ready: &[SocketAddr],
) -> anyhow::Result<()> {
    for &addr in ready {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_ok(addr, "/readyz").await {
            for (role, child) in children.iter_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "barrage {role} exited ({status}) before it was ready: \
                         run it by hand with the same settings to see why"
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("a barrage process did not become ready on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Starts one `barrage <role>` process with `env`, then the variables of
/// `role_env` meant for its role.
fn spawn_role(
    role: &'static str,
    env: &[(&str, String)],
    role_env: &[RoleEnv],
) -> anyhow::Result<(&'static str, Child)> {
    let exe = std::env::current_exe().context("locating the barrage binary")?;
    let child = Command::new(exe)
        .arg(role)
        .env_remove("ETCD_ENDPOINTS")
        .env("RUST_LOG", "warn")
        .env("LOG_FORMAT", "text")
        .env("BIND_ADDR", "127.0.0.1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .envs(
            role_env
                .iter()
                .filter(|e| e.role == role)
                .map(|e| (&e.name, &e.value)),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting barrage {role}"))?;
    Ok((role, child))
}

/// Starts a controller, a push-manager and `nodes` connect-nodes, each its
/// own process (no etcd: the push-manager learns the nodes from the
/// controller), and waits until all are ready. `role_env` adds variables
/// to one role's processes.
pub(crate) async fn start_cluster(nodes: usize, role_env: &[RoleEnv]) -> anyhow::Result<Server> {
    let p = free_ports(4 + 3 * nodes, false)?;
    let localhost = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let controller = format!("127.0.0.1:{}", p[0]);
    let mut children = vec![spawn_role(
        "controller",
        &[
            ("GRPC_PORT", p[0].to_string()),
            ("METRICS_PORT", p[1].to_string()),
        ],
        role_env,
    )?];
    children_ready(&mut children, &[localhost(p[1])]).await?;
    children.push(spawn_role(
        "push-manager",
        &[
            ("GRPC_PORT", p[2].to_string()),
            ("METRICS_PORT", p[3].to_string()),
            ("CONTROLLER_ADDRESS", controller.clone()),
        ],
        role_env,
    )?);
    let mut ws = Vec::with_capacity(nodes);
    let mut ready = vec![localhost(p[3])];
    for n in 0..nodes {
        let (grpc, metrics, wsp) = (p[4 + 3 * n], p[5 + 3 * n], p[6 + 3 * n]);
        children.push(spawn_role(
            "connect-node",
            &[
                ("GRPC_PORT", grpc.to_string()),
                ("METRICS_PORT", metrics.to_string()),
                ("WS_PORT", wsp.to_string()),
                ("CONTROLLER_ADDRESS", controller.clone()),
                ("NODE_ID", format!("bench-node-{n}")),
                ("INSECURE_USER_ID", "true".into()),
            ],
            role_env,
        )?);
        ws.push(localhost(wsp));
        ready.push(localhost(metrics));
    }
    children_ready(&mut children, &ready).await?;
    Ok(Server {
        children,
        ws,
        api: localhost(p[2]),
    })
}

/// Starts `barrage dev` with `env` added, and waits until it is ready.
pub(crate) async fn start_server(env: &[(&str, String)]) -> anyhow::Result<Server> {
    let p = free_ports(4, false)?;
    // `dev` serves HTTP on METRICS_PORT and the two ports below it.
    let metrics = free_ports(3, true)?[2];
    let exe = std::env::current_exe().context("locating the barrage binary")?;
    let child = Command::new(exe)
        .args(["dev", "--log-format", "text"])
        .env_remove("ETCD_ENDPOINTS")
        .args([
            "--ws-port",
            &p[0].to_string(),
            "--grpc-port",
            &p[1].to_string(),
        ])
        .args(["--controller-grpc-port", &p[2].to_string()])
        .args(["--node-grpc-port", &p[3].to_string()])
        .args(["--metrics-port", &metrics.to_string()])
        .env("RUST_LOG", "warn")
        .env("MAX_CONNECTIONS_PER_USER", "1000000")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting barrage dev")?;
    wait_ready(
        SocketAddr::from(([127, 0, 0, 1], metrics)),
        "/readyz",
        "barrage dev",
    )
    .await?;
    Ok(Server {
        children: vec![("dev", child)],
        ws: vec![SocketAddr::from(([127, 0, 0, 1], p[0]))],
        api: SocketAddr::from(([127, 0, 0, 1], p[1])),
    })
}

/// Starts `barrage bench-floor` and waits until it answers (at most 30 s).
async fn start_floor() -> anyhow::Result<Server> {
    let port = free_ports(1, false)?[0];
    let children = vec![spawn_role(
        "bench-floor",
        &[("GRPC_PORT", port.to_string())],
        &[],
    )?];
    let api = SocketAddr::from(([127, 0, 0, 1], port));
    let endpoint = barrage_proto::tls::GrpcTls::default().endpoint(&api.to_string())?;
    wait_until(api, "the gRPC floor", || async {
        endpoint.connect().await.is_ok()
    })
    .await?;
    Ok(Server {
        children,
        ws: Vec::new(),
        api,
    })
}

/// A PushManager that answers every `PushToUser` at once and does nothing
/// else, served like the push-manager's API (same server stack: health,
/// reflection, no Nagle). Pushed at with the bench's client and load, it
/// shows what the gRPC call itself costs a server core.
struct Floor;

const FLOOR_ONLY: &str = "the gRPC floor answers PushToUser only";

#[tonic::async_trait]
impl PushManager for Floor {
    async fn push_to_user(
        &self,
        req: tonic::Request<PushToUserRequest>,
    ) -> Result<tonic::Response<PushToUserResponse>, tonic::Status> {
        let req = req.into_inner();
        Ok(tonic::Response::new(PushToUserResponse {
            message_id: req.message_id,
            ..Default::default()
        }))
    }
    async fn push_to_room(
        &self,
        _: tonic::Request<PushToRoomRequest>,
    ) -> Result<tonic::Response<PushToRoomResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(FLOOR_ONLY))
    }
    async fn broadcast(
        &self,
        _: tonic::Request<BroadcastRequest>,
    ) -> Result<tonic::Response<BroadcastResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(FLOOR_ONLY))
    }
    async fn get_room_info(
        &self,
        _: tonic::Request<GetRoomInfoRequest>,
    ) -> Result<tonic::Response<GetRoomInfoResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(FLOOR_ONLY))
    }
    async fn get_user_node(
        &self,
        _: tonic::Request<GetUserNodeRequest>,
    ) -> Result<tonic::Response<GetUserNodeResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(FLOOR_ONLY))
    }
    async fn close_room(
        &self,
        _: tonic::Request<CloseRoomRequest>,
    ) -> Result<tonic::Response<CloseRoomResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(FLOOR_ONLY))
    }
    async fn get_status(
        &self,
        _: tonic::Request<GetStatusRequest>,
    ) -> Result<tonic::Response<GetStatusResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented(FLOOR_ONLY))
    }
}

/// `barrage bench-floor`: serves [`Floor`] on 127.0.0.1:`port` until killed.
pub async fn serve_floor(port: u16) -> anyhow::Result<()> {
    // Bound as barrage's own ports are (the same accept backlog).
    let listener = crate::launch::bind([127, 0, 0, 1].into(), port, "GRPC_PORT")?;
    let (_health, router) = barrage_proto::grpc_server(&barrage_proto::tls::GrpcTls::default())?;
    router
        .add_service(PushManagerServer::new(Floor))
        .serve_with_incoming(barrage_proto::grpc_incoming(listener))
        .await?;
    Ok(())
}

/// A process and its children (nginx's workers), Linux.
fn family(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// CPU seconds of processes and their children.
fn family_cpu_secs(pids: &[u32]) -> f64 {
    pids.iter().flat_map(|p| family(*p)).map(cpu_secs).sum()
}

/// Resident memory of processes and their children, bytes.
pub(crate) fn family_rss_bytes(pids: &[u32]) -> Option<u64> {
    let rss: Vec<u64> = pids
        .iter()
        .flat_map(|p| family(*p))
        .filter_map(rss_bytes)
        .collect();
    (!rss.is_empty()).then(|| rss.iter().sum())
}

/// CPU seconds (user + system) a process has used so far (Linux).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces): utime is
    // the 12th and stime the 13th of them, in clock ticks (USER_HZ = 100).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

/// Resident memory of a process, bytes (Linux).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Threads reading the subscribers' sockets: one per core, at most four.
/// On two cores, one thread instead of two gave a broadcast to 1,000
/// subscribers a p99 about a quarter higher (BENCHMARKS.md).
fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(4))
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    /// Push to read by the client.
    latencies_us: Vec<u32>,
    /// Push to arrival at the subscriber's socket.
    arrivals_us: Vec<u32>,
    seen: Vec<u8>,
    duplicates: u64,
    /// Push `i` is this subscriber's `i / stride`-th.
    stride: usize,
}

impl OnText for Seen {
    fn text(&mut self, text: &str, came: Came) {
        let micros =
            |at: u64, sent: u64| (at.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32;
        probe(text, |sent, i| {
            let i = i as usize / self.stride;
            if i < self.seen.len() {
                if self.seen[i] == 0 {
                    self.seen[i] = 1;
                    self.latencies_us.push(micros(came.read, sent));
                    self.arrivals_us.push(micros(came.arrived, sent));
                } else {
                    self.duplicates += 1;
                }
            }
        });
    }
}

/// Opens subscriber `user`'s WebSocket from `source`; a barrage one once
/// its `connected` frame has come. The bench's reader threads read it
/// from then on.
async fn subscriber(
    target: &Target,
    source: IpAddr,
    user: usize,
    max_pushes: usize,
    stride: usize,
    mode: Mode,
) -> anyhow::Result<(Open, Seen)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(target.ws_addr(user)).await?;
    let _ = tcp.set_nodelay(true);
    let barrage = matches!(target, Target::Barrage(_));
    let (open, first) = reader::open(tcp, &target.subscribe_url(user, mode), barrage).await?;
    if barrage
        && !first
            .as_deref()
            .is_some_and(|t| t.contains("\"connected\""))
    {
        bail!("expected connected, got {first:?}");
    }
    let seen = Seen {
        seen: vec![0; max_pushes / stride + 1],
        stride,
        ..Seen::default()
    };
    Ok((open, seen))
}

/// Calls `each` with the send time and push index of every payload
/// `{"t":<send nanos>,"i":<push index>,...}` in a received frame: the
/// `data` of a barrage message frame or of each message of a `batch` frame
/// (`BATCH_WINDOW_MS` on the server), the whole of an Nchan one.
///
/// The payloads are the bench's own, so it looks for their exact opening
/// rather than parsing the frame as JSON: one scan and no parse, on a
/// client that shares the cores with the servers. The
/// opening cannot occur elsewhere in a frame: no envelope field is named
/// `t`, and inside a JSON string its quotes would be escaped.
fn probe(text: &str, mut each: impl FnMut(u64, u64)) {
    const OPEN: &str = "{\"t\":";
    const INDEX: &str = ",\"i\":";
    /// The digits at the start of `s` as a number, and what follows them.
    fn number(s: &str) -> Option<(u64, &str)> {
        let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        Some((s[..end].parse().ok()?, &s[end..]))
    }
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        rest = &rest[at + OPEN.len()..];
        let Some((t, after)) = number(rest) else {
            continue;
        };
        let Some(after) = after.strip_prefix(INDEX) else {
            continue;
        };
        let Some((i, after)) = number(after) else {
            continue;
        };
        if after.starts_with([',', '}']) {
            each(t, i);
        }
        rest = after;
    }
}

/// Releases push indices `0..max` at evenly spaced instants from `start`
/// until `deadline` (so a run pushes exactly rate × duration, or `max`),
/// from a thread of its own. tokio's timers fire on a 1 ms
/// grid, so a tokio interval at 5k/s lets pushes out five at a time, and
/// the bursts, not the server, set the tail; a sleeping thread wakes within
/// tens of microseconds. A push released late (the thread was not
/// scheduled) goes at once, and those behind it keep their own due times.
/// The thread returns how late each push was released, in microseconds.
fn pace(
    rate: u32,
    start: Instant,
    deadline: Instant,
    max: u64,
) -> anyhow::Result<(
    tokio::sync::mpsc::UnboundedReceiver<u64>,
    std::thread::JoinHandle<Vec<u32>>,
)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || {
            let mut lag_us = Vec::new();
            for i in 0..max {
                let due = start + period.mul_f64(i as f64);
                if due >= deadline {
                    break;
                }
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                if tx.send(i).is_err() {
                    break;
                }
                let late = Instant::now().saturating_duration_since(due).as_micros();
                lag_us.push(late.min(u128::from(u32::MAX)) as u32);
            }
            lag_us
        })
        .context("cannot start the bench pacer thread")?;
    Ok((rx, pacer))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

/// p50, p99, p999 and max of sorted microseconds, in milliseconds.
fn spread(sorted: &[u32]) -> serde_json::Value {
    serde_json::json!({
        "p50": percentile(sorted, 0.50),
        "p99": percentile(sorted, 0.99),
        "p999": percentile(sorted, 0.999),
        "max": sorted.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
    })
}

/// Runs a push scenario against barrage, and against a peer when asked
/// (Nchan for rooms and users, the gRPC floor for users), and prints its
/// JSON summary.
pub async fn run(plan: BenchPlan) -> anyhow::Result<()> {
    if let Some(factor) = plan.over_nchan {
        let summary = run_over_nchan(&plan, factor).await?;
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }
    let barrage = run_barrage(&plan).await?;
    let summary = match plan.compare {
        None => barrage,
        Some(Peer::GrpcFloor) => {
            let floor = run_target(&plan, &Target::Floor(start_floor().await?)).await?;
            // The push-manager's share when it runs alone, else every role's.
            let per_core = match barrage["pushes_per_push_manager_core"].as_f64() {
                Some(v) => v,
                None => field(&barrage, &["pushes_per_server_core"]),
            };
            let ratio = |path: &[&str]| round(field(&barrage, path) / field(&floor, path));
            serde_json::json!({
                "scenario": "push-to-user",
                "barrage_over_grpc_floor": {
                    "pushes_per_core": round(per_core / field(&floor, &["pushes_per_server_core"])),
                    "push_call_p50": ratio(&["push_call_ms", "p50"]),
                    "push_call_p99": ratio(&["push_call_ms", "p99"]),
                },
                "barrage": barrage,
                "grpc_floor": floor,
            })
        }
        Some(Peer::Nchan) => {
            let nchan = run_nchan(&plan).await?;
            side_by_side(barrage, nchan)
        }
    };
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Runs the plan against barrage: `barrage dev`, or a cluster of
/// `plan.nodes` connect-nodes.
async fn run_barrage(plan: &BenchPlan) -> anyhow::Result<serde_json::Value> {
    let server = if plan.nodes == 0 {
        start_server(&[]).await?
    } else {
        start_cluster(plan.nodes, &plan.role_env).await?
    };
    run_target(plan, &Target::Barrage(server)).await
}

async fn run_nchan(plan: &BenchPlan) -> anyhow::Result<serde_json::Value> {
    run_target(plan, &Target::Nchan(Box::new(start_nchan().await?))).await
}

/// Both summaries and the barrage/Nchan ratios.
fn side_by_side(barrage: serde_json::Value, nchan: serde_json::Value) -> serde_json::Value {
    let ratio = |path: &[&str]| round(field(&barrage, path) / field(&nchan, path));
    serde_json::json!({
        "scenario": barrage["scenario"],
        "barrage_over_nchan": {
            "deliveries_per_sec": ratio(&["deliveries_per_sec"]),
            "latency_p50": ratio(&["latency_ms", "p50"]),
            "latency_p99": ratio(&["latency_ms", "p99"]),
            "arrival_latency_p50": ratio(&["arrival_latency_ms", "p50"]),
            "arrival_latency_p99": ratio(&["arrival_latency_ms", "p99"]),
            "server_cpu_cores": ratio(&["cpu_cores_used", "server"]),
            "server_rss_per_connection": ratio(&["server_rss_per_connection_bytes"]),
        },
        "barrage": barrage,
        "nchan": nchan,
    })
}

/// The room fan-out goal of BENCHMARKS.md in one run: Nchan at max rate, then
/// barrage paced at `factor` times the deliveries/s Nchan reached. Met
/// when barrage delivered at least that many per second, lost nothing, and
/// its p99 was no worse than Nchan's, read and at the socket.
async fn run_over_nchan(plan: &BenchPlan, factor: f64) -> anyhow::Result<serde_json::Value> {
    let nchan = run_nchan(plan).await?;
    let nchan_rate = field(&nchan, &["deliveries_per_sec"]);
    let rate = paced_rate(
        plan.mode,
        plan.subscribers,
        nchan_rate,
        factor * PACE_HEADROOM,
    )?;
    let barrage = run_barrage(&BenchPlan {
        rate,
        ..plan.clone()
    })
    .await?;
    let deliveries = field(&barrage, &["deliveries_per_sec"]);
    let no_worse = |path: &[&str]| field(&barrage, path) <= field(&nchan, path);
    let met = deliveries >= factor * nchan_rate
        && field(&barrage, &["lost"]) == 0.0
        && no_worse(&["latency_ms", "p99"])
        && no_worse(&["arrival_latency_ms", "p99"]);
    let mut summary = side_by_side(barrage, nchan);
    summary["goal"] = serde_json::json!({
        "factor": factor,
        "nchan_deliveries_per_sec": nchan_rate,
        "barrage_pushes_per_sec": rate,
        "met": met,
    });
    Ok(summary)
}

/// How much above the goal's factor `--over-nchan` paces barrage. A run's
/// deliveries per second come out a little under its push rate times the
/// subscribers (the first and last pushes' deliveries are spread over the
/// run's edges), so pacing at exactly the factor would leave the check a
/// coin toss at the boundary; barrage is offered 2 % more and must deliver
/// the factor.
const PACE_HEADROOM: f64 = 1.02;

/// Pushes per second that deliver `factor` times `deliveries_per_sec`:
/// every subscriber gets a room push, one subscriber a user push.
fn paced_rate(
    mode: Mode,
    subscribers: usize,
    deliveries_per_sec: f64,
    factor: f64,
) -> anyhow::Result<u32> {
    let per_push = match mode {
        Mode::User => 1.0,
        Mode::Room | Mode::Broadcast => subscribers as f64,
    };
    let rate = (factor * deliveries_per_sec / per_push).ceil();
    if !(1.0..=f64::from(u32::MAX)).contains(&rate) {
        bail!("Nchan delivered {deliveries_per_sec} messages/s: no push rate to pace barrage at");
    }
    Ok(rate as u32)
}

/// The number at `path` in a summary (NaN when absent).
fn field(v: &serde_json::Value, path: &[&str]) -> f64 {
    path.iter()
        .fold(v, |v, k| &v[*k])
        .as_f64()
        .unwrap_or(f64::NAN)
}

/// Where the pushes go and the subscribers listen.
enum Target {
    Barrage(Server),
    Nchan(Box<Nginx>),
    /// The gRPC floor: pushes only, no subscribers.
    Floor(Server),
}

impl Target {
    fn pids(&self) -> Vec<u32> {
        match self {
            Target::Barrage(s) | Target::Floor(s) => s.pids(),
            Target::Nchan(n) => n.child.id().into_iter().collect(),
        }
    }

    /// The server processes of each role.
    fn pids_by_role(&self) -> Vec<(&'static str, Vec<u32>)> {
        match self {
            Target::Barrage(s) | Target::Floor(s) => s.pids_by_role(),
            Target::Nchan(_) => vec![("nginx", self.pids())],
        }
    }

    /// Subscribers it takes: none for the floor, which delivers nothing.
    fn subscribers(&self, plan: &BenchPlan) -> usize {
        match self {
            Target::Floor(_) => 0,
            _ => plan.subscribers,
        }
    }

    /// The node subscriber `user` connects to (spread round-robin).
    fn ws_addr(&self, user: usize) -> SocketAddr {
        match self {
            Target::Barrage(s) | Target::Floor(s) => s.ws[user % s.ws.len()],
            Target::Nchan(n) => n.addr,
        }
    }

    /// Where subscriber `user` subscribes. On Nchan a user is a channel
    /// of its own (`u<user>`), the room the channel `bench`.
    fn subscribe_url(&self, user: usize, mode: Mode) -> String {
        match self {
            Target::Barrage(_) | Target::Floor(_) => format!(
                "ws://{}/ws?user_id=bench-{user}&rooms=bench",
                self.ws_addr(user)
            ),
            Target::Nchan(n) => format!("ws://{}/sub/{}", n.addr, nchan_channel(mode, user)),
        }
    }

    /// Pushes as `mode` says; push `i` of `Mode::User` goes to user `i % users`.
    async fn pusher(&self, mode: Mode, users: usize, ids: bool) -> anyhow::Result<Pusher> {
        Ok(match self {
            Target::Barrage(s) | Target::Floor(s) => Pusher::Grpc {
                api: PushManagerClient::new(
                    tonic::transport::Endpoint::from_shared(format!("http://{}", s.api))?
                        .connect()
                        .await?,
                ),
                mode,
                users,
                ids,
            },
            Target::Nchan(n) => Pusher::Http {
                client: hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build_http(),
                uris: match mode {
                    Mode::User => (0..users.max(1)).collect(),
                    _ => vec![0],
                }
                .into_iter()
                .map(|u| format!("http://{}/pub/{}", n.addr, nchan_channel(mode, u)).parse())
                .collect::<Result<Vec<hyper::Uri>, _>>()?
                .into(),
            },
        })
    }
}

/// Publishes one payload to the bench room. One per run, cloned per push.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)]
enum Pusher {
    Grpc {
        api: PushManagerClient<tonic::transport::Channel>,
        mode: Mode,
        users: usize,
        /// Push `i` carries the message_id `bench-<i>`.
        ids: bool,
    },
    Http {
        client: hyper_util::client::legacy::Client<
            hyper_util::client::legacy::connect::HttpConnector,
            http_body_util::Full<bytes::Bytes>,
        >,
        /// Push `i` goes to `uris[i % uris.len()]`.
        uris: Arc<[hyper::Uri]>,
    },
}

/// The Nchan channel standing for barrage's room, or for user `user`.
fn nchan_channel(mode: Mode, user: usize) -> String {
    match mode {
        Mode::User => format!("u{user}"),
        Mode::Room | Mode::Broadcast => "bench".to_owned(),
    }
}

impl Pusher {
    async fn push(&mut self, i: u64, content: String) -> anyhow::Result<()> {
        let message_id = match self {
            Pusher::Grpc { ids: true, .. } => format!("bench-{i}"),
            _ => String::new(),
        };
        match self {
            Pusher::Grpc {
                api,
                mode: Mode::User,
                users,
                ..
            } => {
                api.push_to_user(PushToUserRequest {
                    user_id: format!("bench-{}", i % (*users).max(1) as u64),
                    content,
                    message_id,
                    ..Default::default()
                })
                .await?;
            }
            Pusher::Grpc {
                api,
                mode: Mode::Broadcast,
                ..
            } => {
                api.broadcast(BroadcastRequest {
                    content,
                    message_id,
                    ..Default::default()
                })
                .await?;
            }
            Pusher::Grpc {
                api,
                mode: Mode::Room,
                ..
            } => {
                api.push_to_room(PushToRoomRequest {
                    room_id: "bench".into(),
                    content,
                    message_id,
                    ..Default::default()
                })
                .await?;
            }
            Pusher::Http { client, uris } => {
                let uri = &uris[(i % uris.len() as u64) as usize];
                let req = hyper::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(content)))?;
                let status = client.request(req).await?.status();
                if !status.is_success() {
                    bail!("nchan publish answered {status}");
                }
            }
        }
        Ok(())
    }
}

/// An nginx with the Nchan module, configured from bench/nchan/nginx.conf.
struct Nginx {
    child: Child,
    addr: SocketAddr,
    /// The binary and the configuration it runs, to stop it.
    bin: &'static str,
    conf: std::path::PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    /// Stops nginx the way it is meant to be stopped (`nginx -s stop`:
    /// the master stops its workers, then exits). Killing the master
    /// outright would leave its workers running, each holding its port and
    /// its share of the run's memory.
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.bin)
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Still running: the master goes when `child` is dropped.
    }
}

async fn start_nchan() -> anyhow::Result<Nginx> {
    const CONF: &str = include_str!("../bench/nchan/nginx.conf");
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context(
            "nginx not found: bench/nchan/run.sh installs nginx-light and libnginx-mod-nchan",
        )?;
    if !std::path::Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so").exists() {
        bail!("the Nchan module is missing: apt-get install libnginx-mod-nchan");
    }
    let dir = tempfile::tempdir()?;
    let port = free_ports(1, false)?[0];
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let conf = CONF
        .replace("@PREFIX@", &dir.path().display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@WORKERS@", &workers.to_string());
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir.path())
        .arg("-c")
        .arg(&conf_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting nginx")?;
    let server = Nginx {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        bin: nginx,
        conf: conf_path,
        dir,
    };
    // On failure `server` is dropped, which stops nginx and its workers.
    if let Err(e) = wait_ready(server.addr, "/healthz", "nginx").await {
        bail!(
            "{e}: {}",
            std::fs::read_to_string(server.dir.path().join("error.log")).unwrap_or_default()
        );
    }
    Ok(server)
}

/// Whether `GET path` on `addr` answers 200.
async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// The room fan-out scenario against one target; its JSON summary.
async fn run_target(plan: &BenchPlan, target: &Target) -> anyhow::Result<serde_json::Value> {
    let pid = target.pids();
    let pid = pid.as_slice();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = family_rss_bytes(pid).unwrap_or(0);
    let max_pushes = plan.max_pushes as usize;
    let stride = if plan.mode == Mode::User {
        plan.subscribers
    } else {
        1
    };
    let connect_start = Instant::now();
    let sources: Vec<IpAddr> = (0..plan.sources.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect();
    let mut tasks = Vec::with_capacity(plan.subscribers);
    let mut connect_errors = 0usize;
    let mut conns = stream::iter(0..target.subscribers(plan))
        .map(|i| {
            let source = sources[i % sources.len()];
            async move { subscriber(target, source, i, max_pushes, stride, plan.mode).await }
        })
        .buffer_unordered(256);
    while let Some(r) = conns.next().await {
        match r {
            Ok(conn) => tasks.push(conn),
            Err(e) => {
                connect_errors += 1;
                if plan.verbose && connect_errors <= 5 {
                    eprintln!("connect failed: {e:#}");
                }
            }
        }
        if plan.verbose && tasks.len() % 2000 == 0 && !tasks.is_empty() {
            eprintln!("{} connected", tasks.len());
        }
    }
    drop(conns);
    let connect_secs = connect_start.elapsed().as_secs_f64();
    let connected = tasks.len();
    let readers = Readers::start(tasks, reader_threads(), plan.client_nice, now_nanos)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = family_rss_bytes(pid).unwrap_or(0);

    let api = target
        .pusher(plan.mode, plan.subscribers, plan.message_ids)
        .await?;
    let filler = "x".repeat(plan.payload_bytes);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let push_lat = Arc::new(Mutex::new(Vec::<u32>::new()));
    let me = std::process::id();
    let (server_cpu0, client_cpu0) = (family_cpu_secs(pid), cpu_secs(me));
    let roles = target.pids_by_role();
    let role_cpu0: Vec<f64> = roles.iter().map(|(_, p)| family_cpu_secs(p)).collect();
    let push_start = Instant::now();
    let one = |i: u64| {
        let (mut api, filler, failed, push_lat) = (
            api.clone(),
            filler.clone(),
            failed.clone(),
            push_lat.clone(),
        );
        async move {
            let t = now_nanos();
            let content = format!("{{\"t\":{t},\"i\":{i},\"f\":\"{filler}\"}}");
            let r = api.push(i, content).await;
            match r {
                Ok(_) => push_lat
                    .lock()
                    .push(((now_nanos() - t) / 1000).min(u64::from(u32::MAX)) as u32),
                Err(_) => {
                    failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    };
    let deadline = push_start + plan.duration;
    // How late each push was released after its due time (fixed rates).
    let mut release_lag_us: Vec<u32> = Vec::new();
    if plan.rate == 0 {
        let counter = sent.clone();
        stream::iter(0..plan.max_pushes)
            .take_while(|_| futures::future::ready(Instant::now() < deadline))
            .for_each_concurrent(plan.in_flight, |i| {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                one(i)
            })
            .await;
    } else {
        let (mut due, pacer) = pace(plan.rate, push_start, deadline, plan.max_pushes)?;
        let mut inflight = tokio::task::JoinSet::new();
        let mut i = 0;
        while let Some(next) = due.recv().await {
            inflight.spawn(one(next));
            i += 1;
        }
        sent.store(i, std::sync::atomic::Ordering::Relaxed);
        while inflight.join_next().await.is_some() {}
        release_lag_us = pacer
            .join()
            .map_err(|_| anyhow::anyhow!("the bench pacer thread panicked"))?;
        release_lag_us.sort_unstable();
    }
    let push_secs = push_start.elapsed().as_secs_f64();
    let server_cpu = family_cpu_secs(pid) - server_cpu0;
    let client_cpu = cpu_secs(me) - client_cpu0;
    let by_role: serde_json::Map<String, serde_json::Value> = roles
        .iter()
        .zip(role_cpu0)
        .map(|((role, p), cpu0)| {
            let cores = (family_cpu_secs(p) - cpu0) / push_secs;
            (role.replace('-', "_"), round(cores).into())
        })
        .collect();
    let pushes = sent.load(std::sync::atomic::Ordering::Relaxed);
    let failed = failed.load(std::sync::atomic::Ordering::Relaxed);
    // Let the last frames arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = family_rss_bytes(pid).unwrap_or(0);

    let (mut latencies, mut arrivals): (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    let (mut unique, mut duplicates) = (0u64, 0u64);
    for s in readers.stop()? {
        unique += s.seen.iter().map(|b| u64::from(*b)).sum::<u64>();
        duplicates += s.duplicates;
        latencies.extend(s.latencies_us);
        arrivals.extend(s.arrivals_us);
    }
    latencies.sort_unstable();
    arrivals.sort_unstable();
    let mut push_lat = std::mem::take(&mut *push_lat.lock());
    push_lat.sort_unstable();
    // A push to a user reaches that user's one connection.
    let expected = if plan.mode == Mode::User {
        (pushes - failed) * connected as u64 / plan.subscribers.max(1) as u64
    } else {
        (pushes - failed) * connected as u64
    };
    Ok(serde_json::json!({
        "scenario": match plan.mode {
            Mode::Room => "room-fanout",
            Mode::User => "push-to-user",
            Mode::Broadcast => "broadcast",
        },
        "connect_nodes": match target {
            Target::Barrage(s) | Target::Floor(s) => s.ws.len(),
            Target::Nchan(_) => 1,
        },
        "server": match target {
            Target::Barrage(_) => "barrage",
            Target::Nchan(_) => "nchan",
            Target::Floor(_) => "grpc-floor",
        },
        "subscribers": connected,
        "connect_errors": connect_errors,
        "connect_secs": round(connect_secs),
        "pushes": pushes,
        "push_failures": failed,
        "target_rate": plan.rate,
        "push_secs": round(push_secs),
        "pushes_per_sec": round(pushes as f64 / push_secs),
        // Every server process together.
        "pushes_per_server_core": (server_cpu > 0.0)
            .then(|| round(pushes as f64 / server_cpu)),
        // The push-manager's own throughput, when it is a process of its own.
        "pushes_per_push_manager_core": by_role
            .get("push_manager")
            .and_then(serde_json::Value::as_f64)
            .filter(|c| *c > 0.0)
            .map(|c| round(pushes as f64 / push_secs / c)),
        "deliveries_expected": expected,
        "deliveries": unique,
        "lost": expected.saturating_sub(unique),
        "duplicated": duplicates,
        "deliveries_per_sec": round(unique as f64 / push_secs),
        // From the push call to the frame read by the bench client.
        "latency_ms": spread(&latencies),
        // From the push call to the frame at the subscriber's socket (the
        // kernel's receive timestamp): without the client's own delay.
        "arrival_latency_ms": spread(&arrivals),
        "push_call_ms": {
            "p50": percentile(&push_lat, 0.50),
            "p99": percentile(&push_lat, 0.99),
        },
        // At a fixed rate: how late pushes left after their evenly spaced
        // due times (null at max rate).
        "release_lag_ms": (!release_lag_us.is_empty()).then(|| serde_json::json!({
            "p50": percentile(&release_lag_us, 0.50),
            "p99": percentile(&release_lag_us, 0.99),
        })),
        "server_rss_bytes": { "idle": rss_idle, "connected": rss_connected, "after": rss_after },
        "server_rss_per_connection_bytes": if connected > 0 {
            rss_connected.saturating_sub(rss_idle) / connected as u64
        } else { 0 },
        "payload_bytes": plan.payload_bytes,
        "message_ids": plan.message_ids,
        "client_nice": plan.client_nice,
        "role_env": plan.role_env.iter()
            .map(|e| format!("{}:{}={}", e.role, e.name, e.value))
            .collect::<Vec<_>>(),
        "cpu_cores_used": {
            "server": round(server_cpu / push_secs),
            "bench_client": round(client_cpu / push_secs),
            "server_by_role": by_role,
            "machine": std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
    }))
}

pub(crate) fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{Mode, free_ports, pace, paced_rate, port_range, probe};

    #[test]
    fn paced_rate_delivers_the_factor_or_a_little_more() {
        // 144,150 deliveries/s × 1.5 over a room of 10,000: 21.6 pushes/s.
        assert_eq!(paced_rate(Mode::Room, 10_000, 144_150.0, 1.5).unwrap(), 22);
        assert_eq!(
            paced_rate(Mode::User, 10_000, 20_000.0, 1.5).unwrap(),
            30_000
        );
        assert_eq!(paced_rate(Mode::Room, 100, 100.0, 1.0).unwrap(), 1);
        assert!(paced_rate(Mode::Room, 10_000, 0.0, 1.5).is_err());
        assert!(paced_rate(Mode::Room, 10_000, f64::NAN, 1.5).is_err());
    }

    /// Receives what the pacer releases; bounded in time like every wait
    /// in a test.
    fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<u64>) -> Vec<u64> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut got = Vec::new();
            while let Some(i) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("the pacer stopped releasing without closing")
            {
                got.push(i);
            }
            got
        })
    }

    #[test]
    fn pacer_releases_every_push_in_order_then_closes() {
        let now = Instant::now();
        let (rx, pacer) = pace(2_000, now, now + Duration::from_secs(60), 50).unwrap();
        assert_eq!(drain(rx), (0..50).collect::<Vec<_>>());
        assert_eq!(pacer.join().unwrap().len(), 50, "one lag per release");
    }

    #[test]
    fn pacer_stops_at_the_deadline() {
        // 10 per second for 0.25 s: pushes due at 0, 100 and 200 ms.
        let now = Instant::now();
        let (rx, pacer) = pace(10, now, now + Duration::from_millis(250), 1_000).unwrap();
        assert_eq!(drain(rx), vec![0, 1, 2]);
        pacer.join().unwrap();
    }

    #[test]
    fn pacer_stops_when_nobody_takes_its_pushes() {
        let now = Instant::now();
        let (rx, pacer) = pace(1_000, now, now + Duration::from_secs(60), 1_000_000).unwrap();
        drop(rx);
        // Without the stop this thread would run for 60 s.
        let lags = pacer.join().unwrap();
        assert!(lags.is_empty(), "{} pushes sent to nobody", lags.len());
    }

    #[test]
    fn free_ports_are_distinct_bindable_below_the_ephemeral_range_and_consecutive_when_asked() {
        let range = port_range();
        let mut all = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let block = free_ports(3, true).unwrap();
            assert_eq!(block.len(), 3);
            assert_eq!(
                [block[1], block[2]],
                [block[0] + 1, block[0] + 2],
                "{block:?}"
            );
            for p in free_ports(5, false).unwrap().into_iter().chain(block) {
                assert!(range.contains(&p), "{p} not in {range:?}");
                assert!(all.insert(p), "{p} handed out twice");
                std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
            }
        }
    }

    fn probed(text: &str) -> Vec<(u64, u64)> {
        let mut got = Vec::new();
        probe(text, |t, i| got.push((t, i)));
        got
    }

    #[test]
    fn probe_reads_barrage_and_nchan_payloads() {
        let barrage = r#"{"type":"message","room":"bench","epoch":3,"seq":7,"id":"m","event":"","data":{"t":1700000000123,"i":42,"f":"xx"},"ts":1}"#;
        assert_eq!(probed(barrage), [(1_700_000_000_123, 42)]);
        let nchan = r#"{"t":5,"i":6,"f":"xxxx"}"#;
        assert_eq!(probed(nchan), [(5, 6)]);
    }

    #[test]
    fn probe_reads_every_message_of_a_batch() {
        let batch = r#"{"type":"batch","messages":[{"type":"message","seq":1,"data":{"t":10,"i":1,"f":"x"}},{"type":"message","seq":2,"data":{"t":30,"i":3}}]}"#;
        assert_eq!(probed(batch), [(10, 1), (30, 3)]);
    }

    #[test]
    fn probe_skips_other_frames() {
        for text in [
            r#"{"type":"connected","conn_id":"c"}"#,
            r#"{"type":"message","data":"plain text"}"#,
            r#"{"type":"message","data":{"t":1}}"#,
            r#"{"type":"message","data":{"t":1,"i":}}"#,
            r#"{"type":"message","data":{"t":1,"i":2x}}"#,
            r#"{"type":"message","data":"{\"t\":1,\"i\":2}"}"#,
            r#"{"type":"message","data":{"t":"1","i":2}}"#,
            "not json",
        ] {
            assert_eq!(probed(text), [], "{text}");
        }
    }
}
