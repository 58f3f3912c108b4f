//! The Rust subscriber behind a proxy that blocks WebSockets (and then
//! event streams too): it falls back to Server-Sent Events, then to
//! long-polling, and on each transport resumes after a node drains with no
//! message lost, repeated or reordered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use barrage_client::{Event, Subscriber, SubscriberOptions, Transport};
use barrage_proto::v1::PushToRoomRequest;
use barrage_testkit::cluster::{TestCluster, within};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(15);

/// A proxy in front of `upstream` that drops WebSocket upgrades (and, when
/// `block_sse` is set, event-stream requests), like a restrictive network.
async fn blocking_proxy(upstream: String, block_sse: Arc<AtomicBool>) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (upstream, block_sse) = (upstream.clone(), block_sse.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if text.contains("upgrade: websocket")
                    || (block_sse.load(Ordering::SeqCst) && text.starts_with("get /sse"))
                {
                    return; // dropped, as a filtering proxy does
                }
                let Ok(mut server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                if server.write_all(&head).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Ok(addr)
}

type Api = barrage_proto::v1::push_manager_client::PushManagerClient<tonic::transport::Channel>;

async fn push(api: &Api, text: &str) -> anyhow::Result<()> {
    let mut api = api.clone();
    within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "fb".into(),
            content: text.into(),
            ..Default::default()
        }),
    )
    .await??;
    Ok(())
}

async fn next_message(
    sub: &mut Subscriber,
    nodes: &mut Vec<String>,
) -> anyhow::Result<(u64, String)> {
    loop {
        match within(T, "an event", sub.next_event()).await?? {
            Event::Message(m) => {
                return Ok((
                    m.seq,
                    m.data
                        .and_then(|d| d.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                ));
            }
            Event::Connected { session, recovered } => {
                assert!(
                    recovered.values().all(|ok| *ok),
                    "not recovered: {recovered:?}"
                );
                nodes.push(session.node_id);
            }
            Event::Disconnected { .. } => {}
        }
    }
}

async fn scenario(block_sse: bool, want: Transport) -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster.start_node("n1").await?;
    cluster.start_node("n2").await?;
    cluster.start_manager("m").await?;
    let blocked = Arc::new(AtomicBool::new(block_sse));
    let mut urls = Vec::new();
    for n in &cluster.nodes {
        let proxy = blocking_proxy(n.ws_addr.clone().expect("ws addr"), blocked.clone()).await?;
        urls.push(format!("ws://{proxy}/ws"));
    }
    let mut opts = SubscriberOptions::new(&urls[0], "walker", &["fb"]);
    opts.urls = urls;
    opts.min_backoff = Duration::from_millis(20);
    opts.max_backoff = Duration::from_millis(200);
    opts.poll_timeout_secs = 2;
    let mut sub = within(T, "subscribe", Subscriber::connect(opts)).await??;
    assert_eq!(sub.transport(), want);
    let mut nodes = Vec::new();

    let api = cluster.push_client().await?;
    let mut got = Vec::new();
    for i in 1..=3 {
        push(&api, &format!("m{i}")).await?;
    }
    for _ in 1..=3 {
        got.push(next_message(&mut sub, &mut nodes).await?);
    }
    // The node in use drains; pushes keep coming; the subscriber moves to
    // the other node on the same transport and misses nothing.
    let first_node = nodes.first().cloned().expect("connected");
    let serving = cluster
        .nodes
        .iter()
        .position(|n| n.id == first_node)
        .expect("serving node");
    let stop = cluster.nodes[serving].stop();
    let pushes = async {
        for i in 4..=8 {
            push(&api, &format!("m{i}")).await?;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        anyhow::Ok(())
    };
    let (stopped, pushed) = tokio::join!(stop, pushes);
    stopped?;
    pushed?;
    while got.len() < 8 {
        got.push(next_message(&mut sub, &mut nodes).await?);
    }
    assert_eq!(nodes.len(), 2, "reconnected once: {nodes:?}");
    assert_ne!(nodes[0], nodes[1], "to the other node");
    let want_msgs: Vec<(u64, String)> = (1..=8).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(got, want_msgs);
    assert_eq!(sub.transport(), want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_websockets_fall_back_to_server_sent_events() -> anyhow::Result<()> {
    scenario(false, Transport::Sse).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_event_streams_fall_back_to_long_polling() -> anyhow::Result<()> {
    scenario(true, Transport::LongPoll).await
}
