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
use barrage_proto::v1::PushToRoomRequest;
use barrage_proto::v1::push_manager_client::PushManagerClient;
use futures::{StreamExt, stream};
use parking_lot::Mutex;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
    /// Print progress to stderr.
    pub verbose: bool,
}

/// Free loopback ports for the server.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()?;
    Ok(listeners
        .iter()
        .filter_map(|l| l.local_addr().ok().map(|a| a.port()))
        .collect())
}

/// The first of three consecutive free loopback ports.
fn free_block3() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let base = free_ports(1)?[0];
        if base > 65_000 {
            continue;
        }
        let held: Result<Vec<_>, _> = (base..base + 3)
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if held.is_ok() {
            return Ok(base);
        }
    }
    bail!("no three consecutive free ports")
}

pub(crate) struct Server {
    child: Child,
    pub(crate) ws: SocketAddr,
    pub(crate) api: SocketAddr,
}

/// Starts `barrage dev` with `env` added, and waits until it is ready.
pub(crate) async fn start_server(env: &[(&str, String)]) -> anyhow::Result<Server> {
    let p = free_ports(4)?;
    // `dev` serves HTTP on METRICS_PORT and the two ports below it.
    let metrics = free_block3()? + 2;
    let exe = std::env::current_exe().context("locating the barrage binary")?;
    let child = Command::new(exe)
        .args(["dev", "--log-format", "text"])
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
    let ready = format!("127.0.0.1:{metrics}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&ready).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("barrage dev did not become ready on {ready}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Server {
        child,
        ws: SocketAddr::from(([127, 0, 0, 1], p[0])),
        api: SocketAddr::from(([127, 0, 0, 1], p[1])),
    })
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

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    latencies_us: Vec<u32>,
    seen: Vec<u8>,
    duplicates: u64,
}

async fn subscriber(
    ws_addr: SocketAddr,
    source: IpAddr,
    user: usize,
    max_pushes: usize,
    stop: tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<Seen>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(ws_addr).await?;
    let _ = tcp.set_nodelay(true);
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 4096;
    cfg.write_buffer_size = 0;
    let url = format!("ws://{ws_addr}/ws?user_id=bench-{user}&rooms=bench");
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(cfg)).await?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().contains("\"connected\"") => {}
        other => bail!("expected connected, got {other:?}"),
    }
    let task = tokio::spawn(async move {
        let mut s = Seen {
            seen: vec![0; max_pushes],
            ..Seen::default()
        };
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                m = ws.next() => m,
            };
            let Some(Ok(Message::Text(t))) = msg else {
                if matches!(msg, Some(Ok(_))) {
                    continue;
                }
                break;
            };
            let now = now_nanos();
            // The payload is {"t":<send nanos>,"i":<push index>,...}.
            #[derive(serde::Deserialize)]
            struct Probe {
                t: u64,
                i: u64,
            }
            #[derive(serde::Deserialize)]
            struct Frame {
                data: Probe,
            }
            let Ok(Frame {
                data: Probe { t: sent, i },
            }) = serde_json::from_str::<Frame>(t.as_str())
            else {
                continue;
            };
            let i = i as usize;
            if i < s.seen.len() {
                if s.seen[i] == 0 {
                    s.seen[i] = 1;
                    s.latencies_us
                        .push((now.saturating_sub(sent) / 1000).min(u64::from(u32::MAX)) as u32);
                } else {
                    s.duplicates += 1;
                }
            }
        }
        s
    });
    Ok(task)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx.min(sorted.len() - 1)]) / 1000.0
}

/// Runs the room fan-out scenario and prints its JSON summary.
pub async fn run(plan: BenchPlan) -> anyhow::Result<()> {
    let server = start_server(&[]).await?;
    let pid = server.child.id().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_idle = rss_bytes(pid).unwrap_or(0);
    let max_pushes = plan.max_pushes as usize;
    let stop = tokio_util::sync::CancellationToken::new();

    let connect_start = Instant::now();
    let sources: Vec<IpAddr> = (0..plan.sources.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect();
    let mut tasks = Vec::with_capacity(plan.subscribers);
    let mut connect_errors = 0usize;
    let mut conns = stream::iter(0..plan.subscribers)
        .map(|i| {
            let (ws, source, stop) = (server.ws, sources[i % sources.len()], stop.clone());
            async move { subscriber(ws, source, i, max_pushes, stop).await }
        })
        .buffer_unordered(256);
    while let Some(r) = conns.next().await {
        match r {
            Ok(task) => tasks.push(task),
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
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss_bytes(pid).unwrap_or(0);

    let api = PushManagerClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.api))?
            .connect()
            .await?,
    );
    let filler = "x".repeat(plan.payload_bytes);
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let push_lat = Arc::new(Mutex::new(Vec::<u32>::new()));
    let me = std::process::id();
    let (server_cpu0, client_cpu0) = (cpu_secs(pid), cpu_secs(me));
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
            let r = api
                .push_to_room(PushToRoomRequest {
                    room_id: "bench".into(),
                    content,
                    ..Default::default()
                })
                .await;
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
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut inflight = tokio::task::JoinSet::new();
        let mut i = 0;
        while Instant::now() < deadline && i < plan.max_pushes {
            tick.tick().await;
            inflight.spawn(one(i));
            i += 1;
        }
        sent.store(i, std::sync::atomic::Ordering::Relaxed);
        while inflight.join_next().await.is_some() {}
    }
    let push_secs = push_start.elapsed().as_secs_f64();
    let server_cpu = cpu_secs(pid) - server_cpu0;
    let client_cpu = cpu_secs(me) - client_cpu0;
    let pushes = sent.load(std::sync::atomic::Ordering::Relaxed);
    let failed = failed.load(std::sync::atomic::Ordering::Relaxed);
    // Let the last frames arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_bytes(pid).unwrap_or(0);
    stop.cancel();

    let mut latencies: Vec<u32> = Vec::new();
    let (mut unique, mut duplicates) = (0u64, 0u64);
    for t in tasks {
        let s = t.await?;
        unique += s.seen.iter().map(|b| u64::from(*b)).sum::<u64>();
        duplicates += s.duplicates;
        latencies.extend(s.latencies_us);
    }
    latencies.sort_unstable();
    let mut push_lat = std::mem::take(&mut *push_lat.lock());
    push_lat.sort_unstable();
    let expected = (pushes - failed) * connected as u64;
    let summary = serde_json::json!({
        "scenario": "room-fanout",
        "subscribers": connected,
        "connect_errors": connect_errors,
        "connect_secs": round(connect_secs),
        "pushes": pushes,
        "push_failures": failed,
        "target_rate": plan.rate,
        "push_secs": round(push_secs),
        "pushes_per_sec": round(pushes as f64 / push_secs),
        "deliveries_expected": expected,
        "deliveries": unique,
        "lost": expected.saturating_sub(unique),
        "duplicated": duplicates,
        "deliveries_per_sec": round(unique as f64 / push_secs),
        "latency_ms": {
            "p50": percentile(&latencies, 0.50),
            "p99": percentile(&latencies, 0.99),
            "p999": percentile(&latencies, 0.999),
            "max": latencies.last().map_or(0.0, |v| f64::from(*v) / 1000.0),
        },
        "push_call_ms": {
            "p50": percentile(&push_lat, 0.50),
            "p99": percentile(&push_lat, 0.99),
        },
        "server_rss_bytes": { "idle": rss_idle, "connected": rss_connected, "after": rss_after },
        "server_rss_per_connection_bytes": if connected > 0 {
            rss_connected.saturating_sub(rss_idle) / connected as u64
        } else { 0 },
        "payload_bytes": plan.payload_bytes,
        "cpu_cores_used": {
            "server": round(server_cpu / push_secs),
            "bench_client": round(client_cpu / push_secs),
            "machine": std::thread::available_parallelism().map_or(0, |n| n.get()),
        },
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    drop(server);
    Ok(())
}

pub(crate) fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}
