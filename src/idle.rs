//! `barrage bench --scenario idle`: how many idle WebSockets a cluster
//! holds and what each costs in server memory; `--scenario storm`: every
//! one of them drops at once, the room moves on, and all reconnect at once
//! with their positions: how long until every client has recovered every
//! missed message.
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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
    /// Reconnect storm: messages pushed to the room while everyone is away
    /// (`None`: idle scenario).
    pub storm: Option<u64>,
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

/// One client of a helper: its socket and where its room stream stood.
struct Held {
    ws: Ws,
    node: SocketAddr,
    source: IpAddr,
    user: usize,
    epoch: u64,
    seq: u64,
}

/// The helper: opens its connections, prints one JSON line with what it
/// got, holds them until stdin closes (or `hold` passes), then exits.
pub async fn hold(plan: HoldPlan) -> anyhow::Result<()> {
    let started = Instant::now();
    let sources: Vec<IpAddr> = (0..plan.sources.max(1))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, plan.source_base, 0, 2 + i)))
        .collect();
    let mut sockets: Vec<Held> = Vec::with_capacity(plan.count);
    let mut errors = 0usize;
    let mut first_error = None;
    let mut opened = stream::iter(0..plan.count)
        .map(|i| {
            let node = plan.nodes[i % plan.nodes.len()];
            let source = sources[i % sources.len()];
            async move {
                open(node, source, plan.first_user + i, None)
                    .await
                    .map(|o| (i, o))
            }
        })
        .buffer_unordered(256);
    while let Some(r) = opened.next().await {
        match r {
            Ok((i, o)) => sockets.push(Held {
                ws: o.ws,
                node: plan.nodes[i % plan.nodes.len()],
                source: sources[i % sources.len()],
                user: plan.first_user + i,
                epoch: o.epoch,
                seq: o.seq,
            }),
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
    // Hold until the parent closes stdin, or asks for a storm: `drop`
    // closes every socket, `reconnect <n>` reconnects them all with their
    // positions and checks that the `n` messages missed meanwhile arrive.
    // The sockets stay idle: the server pings every 25 s and tungstenite
    // answers when it next reads, so each one is read now and then.
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let deadline = tokio::time::Instant::now() + plan.hold;
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(cmd)) if cmd == "drop" => {
                    let n = sockets.len();
                    futures::future::join_all(sockets.iter_mut().map(|h| h.ws.close(None))).await;
                    for h in &mut sockets {
                        // Drain until the server's close arrives.
                        let _ = tokio::time::timeout(Duration::from_secs(5), async {
                            while let Some(Ok(_)) = h.ws.next().await {}
                        }).await;
                    }
                    println!("{}", serde_json::json!({ "dropped": n }));
                }
                Ok(Some(cmd)) if cmd.starts_with("reconnect ") => {
                    let missed: u64 = cmd["reconnect ".len()..].trim().parse().unwrap_or(0);
                    let report = storm(std::mem::take(&mut sockets), missed).await;
                    println!("{report}");
                }
                Ok(Some(_)) => {}
                _ => break,
            },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                for h in &mut sockets {
                    while let Some(Some(_)) = futures::FutureExt::now_or_never(h.ws.next()) {}
                }
            }
        }
    }
    Ok(())
}

/// Reconnects every client at once with its position and waits for the
/// `missed` messages; a JSON report line.
async fn storm(clients: Vec<Held>, missed: u64) -> serde_json::Value {
    let started = Instant::now();
    let total = clients.len();
    let results: Vec<Result<f64, String>> = stream::iter(clients)
        .map(|h| async move {
            let position = Some((h.epoch, h.seq));
            let mut c = open(h.node, h.source, h.user, position)
                .await
                .map_err(|e| format!("{e:#}"))?;
            if !c.recovered {
                return Err("connected with recovered: false".to_owned());
            }
            let mut want = h.seq + 1;
            while want <= h.seq + missed {
                let msg = tokio::time::timeout(Duration::from_secs(60), c.ws.next())
                    .await
                    .map_err(|_| format!("seq {want} did not arrive"))?;
                let Some(Ok(Message::Text(t))) = msg else {
                    return Err(format!("connection ended before seq {want}"));
                };
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                if v["type"] != "message" {
                    continue;
                }
                let seq = v["seq"].as_u64().unwrap_or(0);
                if seq != want {
                    return Err(format!("expected seq {want}, got {seq}"));
                }
                want += 1;
            }
            Ok(started.elapsed().as_secs_f64())
        })
        // Everyone at once: as many handshakes in flight as there are clients.
        .buffer_unordered(total.max(1))
        .collect()
        .await;
    let mut done: Vec<f64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    done.sort_by(f64::total_cmp);
    let first_error = results.iter().find_map(|r| r.as_ref().err().cloned());
    serde_json::json!({
        "recovered": done.len(),
        "failed": total - done.len(),
        "first_error": first_error,
        "all_recovered_secs": done.last().copied().map(round),
        "p50_secs": done.get(done.len() / 2).copied().map(round),
    })
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A client just connected, and whether its position was recovered.
struct Opened {
    ws: Ws,
    recovered: bool,
    epoch: u64,
    seq: u64,
}

/// Opens one session in the `lobby` room, resuming from `position` (epoch,
/// seq of the room stream) when given.
async fn open(
    node: SocketAddr,
    source: IpAddr,
    user: usize,
    position: Option<(u64, u64)>,
) -> anyhow::Result<Opened> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = tokio::time::timeout(Duration::from_secs(30), socket.connect(node))
        .await
        .context("connect timed out")??;
    let mut cfg = WebSocketConfig::default();
    cfg.read_buffer_size = 1024;
    cfg.write_buffer_size = 0;
    let mut url = format!("ws://{node}/ws?user_id=idle-{user}&rooms=lobby");
    if let Some((epoch, seq)) = position {
        url.push_str(&format!("&positions=room:lobby@{epoch}:{seq}"));
    }
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_tungstenite::client_async_with_config(url, tcp, Some(cfg)),
    )
    .await
    .context("handshake timed out")??;
    match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"connected\"") => {
            let v: serde_json::Value = serde_json::from_str(t.as_str())?;
            let room = &v["streams"]["room:lobby"];
            Ok(Opened {
                ws,
                recovered: room["recovered"].as_bool().unwrap_or(false),
                epoch: room["epoch"].as_u64().unwrap_or(0),
                seq: room["seq"].as_u64().unwrap_or(0),
            })
        }
        other => bail!("expected connected, got {other:?}"),
    }
}

type Helper = (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
);

/// Sends `cmd` to every helper and collects one JSON line from each.
async fn ask_all(helpers: &mut [Helper], cmd: &str) -> anyhow::Result<Vec<serde_json::Value>> {
    for (child, _) in helpers.iter_mut() {
        let stdin = child.stdin.as_mut().context("helper stdin")?;
        stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        stdin.flush().await?;
    }
    let mut out = Vec::with_capacity(helpers.len());
    for (i, (_, lines)) in helpers.iter_mut().enumerate() {
        let line = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
            .await
            .with_context(|| format!("helper {i} did not answer {cmd:?} in 300 s"))??
            .with_context(|| format!("helper {i} ended"))?;
        out.push(serde_json::from_str(&line)?);
    }
    Ok(out)
}

/// Every client drops, `missed` messages are pushed to the room, and every
/// client reconnects at once with its position.
async fn reconnect_storm(
    server: &crate::bench::Server,
    helpers: &mut [Helper],
    missed: u64,
    connected: u64,
) -> anyhow::Result<serde_json::Value> {
    let dropped: u64 = ask_all(helpers, "drop")
        .await?
        .iter()
        .filter_map(|r| r["dropped"].as_u64())
        .sum();
    let mut api = barrage_proto::v1::push_manager_client::PushManagerClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.api))?
            .connect()
            .await?,
    );
    for i in 1..=missed {
        api.push_to_room(barrage_proto::v1::PushToRoomRequest {
            room_id: "lobby".into(),
            content: format!("{{\"missed\":{i}}}"),
            ..Default::default()
        })
        .await
        .context("pushing while the clients are away")?;
    }
    let reports = ask_all(helpers, &format!("reconnect {missed}")).await?;
    let sum = |k: &str| reports.iter().filter_map(|r| r[k].as_u64()).sum::<u64>();
    let mut p50s: Vec<f64> = reports
        .iter()
        .filter_map(|r| r["p50_secs"].as_f64())
        .collect();
    p50s.sort_by(f64::total_cmp);
    let median_p50 = p50s.get(p50s.len() / 2).copied();
    let slowest = reports
        .iter()
        .filter_map(|r| r["all_recovered_secs"].as_f64())
        .fold(0.0, f64::max);
    Ok(serde_json::json!({
        "clients": connected,
        "dropped": dropped,
        "missed_messages_each": missed,
        "recovered": sum("recovered"),
        "failed": sum("failed"),
        "first_error": reports.iter().find_map(|r| r["first_error"].as_str().map(str::to_owned)),
        "all_recovered_secs": round(slowest),
        "median_helper_p50_secs": median_p50,
    }))
}

/// Runs the scenario and prints its JSON summary.
pub async fn run(plan: IdlePlan) -> anyhow::Result<()> {
    let server = start_cluster(plan.nodes, &[]).await?;
    let pids = server.pids();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = family_rss_bytes(&pids).unwrap_or(0);
    let exe = std::env::current_exe().context("locating the barrage binary")?;
    let nodes: Vec<String> = server.ws.iter().map(ToString::to_string).collect();
    let started = Instant::now();
    let mut helpers: Vec<Helper> = Vec::new();
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
    let storm = match plan.storm {
        Some(missed) if connected > 0 => {
            Some(reconnect_storm(&server, &mut helpers, missed, connected).await?)
        }
        _ => None,
    };
    // Closing stdin ends a helper; then wait for it.
    for (mut child, _) in helpers {
        drop(child.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    }
    let summary = serde_json::json!({
        "scenario": if plan.storm.is_some() { "storm" } else { "idle" },
        "storm": storm,
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
