//! `barrage bench --scenario bandwidth`: bytes on the wire per delivered
//! live comment, for JSON and binary frames, with and without compression
//! and batching.
//!
//! Starts `barrage dev` four times (batching off/on × binary compression
//! off/on), connects a JSON and a binary (`barrage.v1.bin`) subscriber to a
//! hot room on each, pushes the same seeded comment mix at a fixed rate
//! through the gRPC API, and counts what each subscriber received: WebSocket
//! payload plus frame header bytes, frames, and comments. Bounded in count
//! and time; loopback only.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use barrage_proto::v1::PushToRoomRequest;
use barrage_proto::v1::push_manager_client::PushManagerClient;
use barrage_protocol::ServerFrame;
use barrage_protocol::binary;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

use crate::bench::{round, start_server};

/// A bandwidth run, validated.
#[derive(Debug, Clone)]
pub struct BandwidthPlan {
    /// Comments pushed per server configuration.
    pub comments: u64,
    /// Comments per second (a hot room).
    pub rate: u32,
    /// Batching window of the batched configurations.
    pub batch_window_ms: u64,
    /// Compression threshold of the compressed configurations.
    pub compress_bytes: usize,
}

/// Phrases viewers type: short, repetitive, mixed scripts and emoji.
const PHRASES: &[&str] = &[
    "666",
    "666666",
    "哈哈哈哈哈",
    "哈哈哈哈哈哈哈哈",
    "前方高能",
    "主播加油",
    "awsl",
    "2333333",
    "这波操作可以",
    "太强了吧",
    "gg",
    "GG WP",
    "LOL",
    "lmao",
    "nice shot!",
    "what a play",
    "first time here, love the stream",
    "who else is watching at 3am",
    "🔥🔥🔥",
    "😂😂😂",
    "👏👏",
    "F",
    "W",
    "clip it!",
    "is this live?",
    "greetings from Brazil 🇧🇷",
    "草",
    "wwwwww",
    "すごい",
    "ㅋㅋㅋㅋㅋ",
    "no way",
    "let's gooooo",
    "pog",
    "that was close",
    "弹幕护体",
    "泪目",
    "下次一定",
    "爷青回",
    "名场面",
    "this song is so good",
];

const COLORS: &[&str] = &[
    "#ffffff", "#ffffff", "#ffffff", "#fe0302", "#ffff00", "#00cd00",
];

/// A deterministic comment mix: the same comments in every run.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// `(sender, content)` of the next comment.
    fn comment(&mut self) -> (String, String) {
        let text = PHRASES[(self.next() % PHRASES.len() as u64) as usize];
        let color = COLORS[(self.next() % COLORS.len() as u64) as usize];
        // Mostly scrolling comments; one in twenty pinned to the top.
        let mode = if self.next().is_multiple_of(20) { 5 } else { 1 };
        let sender = format!("u{}", 10_000_000 + self.next() % 90_000_000);
        let content = serde_json::json!({"text": text, "color": color, "mode": mode, "size": 25});
        (sender, content.to_string())
    }
}

/// What one subscriber received.
#[derive(Debug, Default, Clone, Copy)]
struct Received {
    bytes: u64,
    frames: u64,
    comments: u64,
}

/// Bytes a server-to-client WebSocket frame header takes (RFC 6455, unmasked).
fn ws_header_len(payload: usize) -> u64 {
    match payload {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    }
}

async fn subscriber(
    ws: std::net::SocketAddr,
    user: &str,
    binary_frames: bool,
    expect: u64,
    deadline: Instant,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Received>>> {
    let mut req = format!("ws://{ws}/ws?user_id={user}&rooms=hot").into_client_request()?;
    if binary_frames {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            tokio_tungstenite::tungstenite::http::HeaderValue::from_static(binary::SUBPROTOCOL),
        );
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(req)
        .await
        .with_context(|| format!("connecting {user}"))?;
    // The `connected` frame is not part of the traffic measured.
    match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
        Ok(Some(Ok(Message::Text(_) | Message::Binary(_)))) => {}
        other => bail!("{user}: expected connected, got {other:?}"),
    }
    Ok(tokio::spawn(async move {
        let mut r = Received::default();
        while r.comments < expect {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = match tokio::time::timeout(left, socket.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => break,
            };
            let (len, comments) = match &msg {
                Message::Text(t) => {
                    let n = match serde_json::from_str::<ServerFrame>(t.as_str()) {
                        Ok(ServerFrame::Message(_)) => 1,
                        Ok(ServerFrame::Batch { messages }) => messages.len() as u64,
                        _ => 0,
                    };
                    (t.len(), n)
                }
                Message::Binary(b) => {
                    let n = match binary::decode_server_frame(b, 1 << 24) {
                        Ok(ServerFrame::Message(_)) => 1,
                        Ok(ServerFrame::Batch { messages }) => messages.len() as u64,
                        _ => 0,
                    };
                    (b.len(), n)
                }
                _ => continue,
            };
            r.bytes += len as u64 + ws_header_len(len);
            r.frames += 1;
            r.comments += comments;
        }
        Ok(r)
    }))
}

/// One server configuration: its subscribers' results.
async fn run_config(
    plan: &BandwidthPlan,
    batched: bool,
    compressed: bool,
) -> anyhow::Result<Vec<(bool, Received)>> {
    let mut env = vec![(
        "BATCH_WINDOW_MS",
        if batched {
            plan.batch_window_ms.to_string()
        } else {
            "0".into()
        },
    )];
    if compressed {
        env.push(("BINARY_COMPRESS_BYTES", plan.compress_bytes.to_string()));
    }
    let server = start_server(&env).await?;
    let push_time = Duration::from_secs_f64(plan.comments as f64 / f64::from(plan.rate.max(1)));
    let deadline = Instant::now() + push_time + Duration::from_secs(15);
    // The JSON subscriber only where its frames differ between runs.
    let formats: &[bool] = if compressed { &[true] } else { &[false, true] };
    let mut subs = Vec::new();
    for &bin in formats {
        let user = if bin { "bin" } else { "json" };
        subs.push((
            bin,
            subscriber(server.ws[0], user, bin, plan.comments, deadline).await?,
        ));
    }
    let api = PushManagerClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.api))?
            .connect()
            .await?,
    );
    let mut mix = Mix(0x2545_F491_4F6C_DD1D);
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(plan.rate.max(1))));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut inflight = tokio::task::JoinSet::new();
    for _ in 0..plan.comments {
        tick.tick().await;
        let (sender, content) = mix.comment();
        let mut api = api.clone();
        inflight.spawn(async move {
            api.push_to_room(PushToRoomRequest {
                room_id: "hot".into(),
                content,
                event: "comment".into(),
                sender,
                ..Default::default()
            })
            .await
        });
    }
    while let Some(r) = inflight.join_next().await {
        r?.context("push failed")?;
    }
    let mut out = Vec::new();
    for (bin, task) in subs {
        out.push((bin, task.await??));
    }
    drop(server);
    Ok(out)
}

/// Runs the scenario and prints its JSON summary.
pub async fn run(plan: BandwidthPlan) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut json_bytes = None;
    for (batched, compressed) in [(false, false), (false, true), (true, false), (true, true)] {
        for (bin, r) in run_config(&plan, batched, compressed).await? {
            let per_comment = r.bytes as f64 / r.comments.max(1) as f64;
            if !bin && !batched {
                json_bytes = Some(per_comment);
            }
            rows.push((bin, batched, compressed, r, per_comment));
        }
    }
    let base = json_bytes.unwrap_or(f64::NAN);
    let results: Vec<_> = rows
        .into_iter()
        .map(|(bin, batched, compressed, r, per_comment)| {
            serde_json::json!({
                "format": if bin { "binary" } else { "json" },
                "batching": batched,
                "compression": compressed,
                "comments_received": r.comments,
                "frames": r.frames,
                "bytes": r.bytes,
                "bytes_per_comment": round(per_comment),
                "comments_per_frame": round(r.comments as f64 / r.frames.max(1) as f64),
                "saving_vs_json": round(1.0 - per_comment / base),
            })
        })
        .collect();
    let lost = results
        .iter()
        .any(|r| r["comments_received"].as_u64() != Some(plan.comments));
    let summary = serde_json::json!({
        "scenario": "bandwidth",
        "comments": plan.comments,
        "rate": plan.rate,
        "batch_window_ms": plan.batch_window_ms,
        "compress_bytes": plan.compress_bytes,
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    if lost {
        bail!("a subscriber did not receive every comment");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_the_same_every_run_and_varied() {
        let a: Vec<_> = {
            let mut m = Mix(7);
            (0..50).map(|_| m.comment()).collect()
        };
        let b: Vec<_> = {
            let mut m = Mix(7);
            (0..50).map(|_| m.comment()).collect()
        };
        assert_eq!(a, b);
        let texts: std::collections::HashSet<_> = a.iter().map(|(_, c)| c.clone()).collect();
        assert!(texts.len() > 20, "{} distinct comments", texts.len());
        assert!(
            a.iter()
                .all(|(_, c)| serde_json::from_str::<serde_json::Value>(c).is_ok())
        );
    }

    #[test]
    fn header_sizes_follow_rfc_6455() {
        assert_eq!(ws_header_len(125), 2);
        assert_eq!(ws_header_len(126), 4);
        assert_eq!(ws_header_len(70_000), 10);
    }
}
