//! `barrage bench --scenario idle`: how many idle WebSockets a cluster
//! holds and what each costs in server memory.
//!
//! One process may hold at most 20,000 open files here, so both sides are
//! spread: `--nodes` connect-node processes share the connections, and
//! helper processes (`barrage bench-hold`, hidden) open at most
//! [`PER_HELPER`] each, over their own loopback source addresses. The
//! parent measures every server process's RSS before and after, then
//! closes the helpers' stdin, which ends them. Bounded in count and time;
//! loopback only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt, stream};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::bench::{family_rss_bytes, round, start_cluster};

/// Most connections one helper process opens (its open-file limit is 20,000).
pub const PER_HELPER: usize = 15_000;

/// An idle run, validated.
#[derive(Debug, Clone)]
pub struct IdlePlan {
    /// Connections to open in all.
    pub connections: usize,
    /// Connect-node processes sharing them.
    pub nodes: usize,
    /// Loopback source addresses per helper.
    pub sources: u8,
    /// Print progress to stderr.
    pub verbose: bool,
}

/// What one helper was asked to do (`barrage bench-hold`).
#[derive(Debug, Clone)]
pub struct HoldPlan {
    /// WebSocket addresses of the connect-nodes, connections round-robin.
    pub nodes: Vec<SocketAddr>,
    /// Connections to open.
    pub count: usize,
    /// User number of the first connection (`idle-<n>`).
    pub first_user: usize,
    /// Source addresses: 127.<base>.0.2 and up (one /16 per helper).
    pub source_base: u8,
    /// How many source addresses.
    pub sources: u8,
    /// Longest time to hold the connections.
    pub hold: Duration,
}

/// The helper: opens its connections, prints one JSON line with what it
/// got, holds them until stdin closes (or `hold` passes), then exits.
pub async fn hold(plan: HoldPlan) -> anyhow::Result<()> {
    let started = Instant::now();
    let sources: Vec<IpAddr> = (0..plan.sources.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, plan.source_base, 0, 2 + i)))
        .collect();
    let mut sockets = Vec::with_capacity(plan.count);
    let mut errors = 0usize;
    let mut first_error = None;
    let mut opened = stream::iter(0..plan.count)
        .map(|i| {
            let node = plan.nodes[i % plan.nodes.len()];
            let source = sources[i % sources.len()];
            open(node, source, plan.first_user + i)
        })
        .buffer_unordered(256);
    while let Some(r) = opened.next().await {
        match r {
            Ok(ws) => sockets.push(ws),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    drop(opened);
    println!(
        "{}",
        serde_json::json!({
            "connected": sockets.len(),
            "errors": errors,
            "first_error": first_error,
            "connect_secs": round(started.elapsed().as_secs_f64()),
        })
    );
    // Hold until the parent closes stdin. The sockets stay idle: the
    // server pings every 25 s and tungstenite answers when it next reads,
    // so each one is read now and then.
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    let deadline = tokio::time::Instant::now() + plan.hold;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf) => if n.map_or(true, |n| n == 0) { break },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                for ws in &mut sockets {
                    while let Some(Some(_)) = futures::FutureExt::now_or_never(ws.next()) {}
                }
            }
        }
    }
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn open(node: SocketAddr, source: IpAddr, user: usize) -> anyhow::Result<Ws> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = tokio::time::timeout(Duration::from_secs(30), socket.connect(node))
        .await
        .context("connect timed out")??;
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 1024;
    cfg.write_buffer_size = 0;
    let url = format!("ws://{node}/ws?user_id=idle-{user}&rooms=lobby");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::client_async_with_config(url, tcp, Some(cfg)),
    )
    .await
    .context("handshake timed out")??;
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"connected\"") => Ok(ws),
        other => bail!("expected connected, got {other:?}"),
    }
}

/// Runs the scenario and prints its JSON summary.
pub async fn run(plan: IdlePlan) -> anyhow::Result<()> {
    let server = start_cluster(plan.nodes).await?;
    let pids = server.pids();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = family_rss_bytes(&pids).unwrap_or(0);
    let exe = std::env::current_exe().context("locating the barrage binary")?;
    let nodes: Vec<String> = server.ws.iter().map(ToString::to_string).collect();
    let started = Instant::now();
    let mut helpers = Vec::new();
    let mut user = 0;
    while user < plan.connections {
        let count = PER_HELPER.min(plan.connections - user);
        let n = helpers.len();
        let mut child = Command::new(&exe)
            .arg("bench-hold")
            .args(["--nodes", &nodes.join(",")])
            .args(["--count", &count.to_string()])
            .args(["--first-user", &user.to_string()])
            .args(["--source-base", &(10 + n).to_string()])
            .args(["--sources", &plan.sources.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a bench-hold helper")?;
        let stdout = child.stdout.take().context("helper stdout")?;
        helpers.push((child, BufReader::new(stdout).lines()));
        user += count;
    }
    let (mut connected, mut errors, mut first_error) = (0u64, 0u64, None);
    for (i, (_, lines)) in helpers.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .context("a helper did not report in 300 s")??
            .with_context(|| format!("helper {i} ended without a report"))?;
        let r: serde_json::Value = serde_json::from_str(&line)?;
        connected += r["connected"].as_u64().unwrap_or(0);
        errors += r["errors"].as_u64().unwrap_or(0);
        if first_error.is_none() && !r["first_error"].is_null() {
            first_error = Some(r["first_error"].clone());
        }
        if plan.verbose {
            eprintln!("helper {i}: {line}");
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_connected = family_rss_bytes(&pids).unwrap_or(0);
    let per_node: Vec<u64> = pids
        .iter()
        .filter_map(|p| family_rss_bytes(&[*p]))
        .collect();
    // Closing stdin ends a helper; then wait for it.
    for (mut child, _) in helpers {
        drop(child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    let summary = serde_json::json!({
        "scenario": "idle",
        "connect_nodes": plan.nodes,
        "connections_asked": plan.connections,
        "connections": connected,
        "connect_errors": errors,
        "first_error": first_error,
        "connect_secs": round(connect_secs),
        "server_rss_bytes": {
            "idle": rss_idle,
            "connected": rss_connected,
            "per_process": per_node,
        },
        "server_rss_per_connection_bytes":
            rss_connected.saturating_sub(rss_idle).checked_div(connected).unwrap_or(0),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
