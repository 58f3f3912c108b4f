//! Abuse limits of the WebSocket port, each with its documented reaction
//! and metric: connections per node (503) and per user (429), new
//! connections per IP (429), Origin (403), inbound frame rate (`rate_limited`
//! error frames), handshake timeout (socket dropped), slow consumers (4100).
//! Well-behaved clients on the same node keep receiving every message.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use barrage_client::{Client, Error as ClientError, connect_url};
use barrage_proto::v1::PushToRoomRequest;
use barrage_protocol::{ClientFrame, ServerFrame};
use barrage_testkit::cluster::{Server, TestCluster, eventually, within};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const T: Duration = Duration::from_secs(10);

async fn cluster_with(
    tweak: impl FnOnce(&mut barrage_connect_node::Config),
) -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_node_with("n", tweak).await?;
    c.start_manager("m").await?;
    Ok(c)
}

async fn refused(url: &str, origin: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut req = url.into_client_request()?;
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse()?);
    }
    match within(T, "connect", tokio_tungstenite::connect_async(req)).await? {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Ok((
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Ok(_) => anyhow::bail!("{url} was accepted"),
        Err(e) => anyhow::bail!("{url}: {e}"),
    }
}

async fn push(cluster: &TestCluster, room: &str, content: String) -> anyhow::Result<u64> {
    let mut api = cluster.push_client().await?;
    let r = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: room.into(),
            content,
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    Ok(u64::from(r.delivered_count))
}

fn node(cluster: &TestCluster) -> &Server {
    &cluster.nodes[0]
}

/// A cluster whose node pings every second and gives up on a client after
/// `read_timeout`, with room for far more frames per connection than the
/// socket buffers hold.
async fn stalling_cluster(read_timeout: Duration) -> anyhow::Result<TestCluster> {
    cluster_with(|c| {
        c.send_queue = 1024;
        c.ping_interval = Duration::from_secs(1);
        c.read_timeout = read_timeout;
    })
    .await
}

/// A TCP connection to the node's WebSocket port with a small receive
/// window, so that a client that does not read backs the socket up quickly.
async fn small_window(n: &Server) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    Ok(socket
        .connect(n.ws_addr.clone().expect("ws addr").parse()?)
        .await?)
}

/// 120 messages of 60 KB to room `r`: more than the socket buffers on both
/// sides hold, far fewer than a stalling cluster's queue. Returns how many
/// connections each reached.
async fn more_than_buffers_hold(cluster: &TestCluster) -> anyhow::Result<Vec<u64>> {
    let body = "x".repeat(60_000);
    let mut reached = Vec::with_capacity(120);
    for i in 0..120 {
        reached.push(push(cluster, "r", format!("{i}:{body}")).await?);
    }
    Ok(reached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_user_and_origin_limits_refuse_before_upgrade() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| {
        c.max_connections = 2;
        c.max_connections_per_user = 1;
        c.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await?;
    let ws = node(&cluster).ws_url();
    let first = within(
        T,
        "connect",
        Client::connect(&connect_url(&ws, "u1", &["r"])),
    )
    .await??;

    let (status, body) = refused(&connect_url(&ws, "u1", &["r"]), None).await?;
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("user u1 already holds 1 connections"),
        "{body}"
    );

    let second = within(
        T,
        "connect",
        Client::connect(&connect_url(&ws, "u2", &["r"])),
    )
    .await??;
    let (status, body) = refused(
        &connect_url(&ws, "u3", &[]),
        Some("https://app.example.com"),
    )
    .await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("full"), "{body}");

    let (status, body) =
        refused(&connect_url(&ws, "u3", &[]), Some("https://evil.example")).await?;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("origin https://evil.example is not allowed"),
        "{body}"
    );

    // The admitted clients are untouched; a freed slot admits the next one.
    assert_eq!(push(&cluster, "r", "hi".into()).await?, 2);
    second.close().await?;
    let mut third = eventually(T, "a slot frees up", || async {
        Client::connect(&connect_url(&ws, "u3", &["r"])).await.ok()
    })
    .await?;
    assert_eq!(push(&cluster, "r", "again".into()).await?, 2);
    let m = within(T, "message", third.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(serde_json::json!("again")));
    drop(first);

    let n = node(&cluster);
    assert_eq!(
        n.metric(r#"connect_node_rejected_total{reason="user_limit"}"#),
        1.0
    );
    assert!(n.metric(r#"connect_node_rejected_total{reason="node_full"}"#) >= 1.0);
    assert_eq!(
        n.metric(r#"connect_node_rejected_total{reason="origin"}"#),
        1.0
    );
    Ok(())
}

async fn connect_from(source: IpAddr, url: &str) -> anyhow::Result<u16> {
    let addr: SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = within(T, "tcp connect", socket.connect(addr)).await??;
    match within(T, "upgrade", tokio_tungstenite::client_async(url, tcp)).await? {
        Ok(_) => Ok(101),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Ok(resp.status().as_u16()),
        Err(e) => Err(e.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_per_ip_are_rate_limited() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| c.new_connections_per_ip = 1).await?;
    let ws = node(&cluster).ws_url();
    let attempts = (0..6).map(|i| {
        let url = connect_url(&ws, &format!("burst{i}"), &[]);
        async move { connect_from("127.0.0.1".parse()?, &url).await }
    });
    let statuses = futures::future::try_join_all(attempts).await?;
    let limited = statuses.iter().filter(|s| **s == 429).count();
    let admitted = statuses.iter().filter(|s| **s == 101).count();
    assert_eq!(limited + admitted, 6, "{statuses:?}");
    assert!(admitted >= 1 && limited >= 3, "{statuses:?}");
    // Another address has its own allowance.
    let url = connect_url(&ws, "elsewhere", &[]);
    assert_eq!(connect_from("127.0.0.2".parse()?, &url).await?, 101);
    assert_eq!(
        node(&cluster).metric(r#"connect_node_rejected_total{reason="rate_limited"}"#),
        limited as f64
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_limit_forgets_addresses_whose_allowance_refilled() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| c.new_connections_per_ip = 1).await?;
    let ws = node(&cluster).ws_url();
    const ADDRESSES: u8 = 6;
    for i in 1..=ADDRESSES {
        let url = connect_url(&ws, &format!("from{i}"), &[]);
        assert_eq!(connect_from(IpAddr::from([127, 0, 0, i]), &url).await?, 101);
    }
    let remembered = || node(&cluster).metric("connect_node_ip_limiter_addresses");
    assert_eq!(remembered(), f64::from(ADDRESSES));
    // Each allowance refills within a second; the limit then forgets the
    // address (it looks every 5 s), so its memory does not grow with every
    // client address that ever connected.
    eventually(
        Duration::from_secs(15),
        "the addresses to be forgotten",
        || async { (remembered() == 0.0).then_some(()) },
    )
    .await?;
    // A forgotten address starts again with a full allowance.
    let url = connect_url(&ws, "again", &[]);
    assert_eq!(connect_from("127.0.0.1".parse()?, &url).await?, 101);
    assert_eq!(remembered(), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_gets_rate_limited_errors_and_stays() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| c.messages_per_sec = 5).await?;
    let ws = node(&cluster).ws_url();
    let mut flood = within(
        T,
        "connect",
        Client::connect(&connect_url(&ws, "flood", &["r"])),
    )
    .await??;
    let mut calm = within(
        T,
        "connect",
        Client::connect(&connect_url(&ws, "calm", &["r"])),
    )
    .await??;
    for _ in 0..40 {
        flood.send(&ClientFrame::Ping).await?;
    }
    let (mut pongs, mut limited) = (0, 0);
    while pongs + limited < 40 {
        match within(T, "answer", flood.next_frame()).await?? {
            Some(ServerFrame::Pong) => pongs += 1,
            Some(ServerFrame::Error { code, message, .. }) => {
                assert_eq!(code, "rate_limited", "{message}");
                assert!(
                    message.contains("more than 5 frames per second"),
                    "{message}"
                );
                limited += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A burst of twice the rate passes; the rest is refused, not queued.
    assert!(
        pongs >= 10 && limited >= 20,
        "pongs {pongs}, limited {limited}"
    );
    assert_eq!(
        node(&cluster).metric(r#"connect_node_frame_errors_total{code="rate_limited"}"#),
        f64::from(limited)
    );
    // Others are unaffected, and the flooder recovers once it slows down.
    assert_eq!(push(&cluster, "r", "still flowing".into()).await?, 2);
    let m = within(T, "message", calm.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(serde_json::json!("still flowing")));
    let m = within(T, "message", flood.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(serde_json::json!("still flowing")));
    tokio::time::sleep(Duration::from_millis(1200)).await;
    flood.send(&ClientFrame::Ping).await?;
    assert_eq!(
        within(T, "pong", flood.next_frame()).await??,
        Some(ServerFrame::Pong)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_handshakes_are_dropped() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| c.handshake_timeout = Duration::from_secs(1)).await?;
    let n = node(&cluster);
    let addr = n.ws_addr.clone().expect("ws addr");
    let mut silent = tokio::net::TcpStream::connect(&addr).await?;
    let mut partial = tokio::net::TcpStream::connect(&addr).await?;
    partial
        .write_all(b"GET /ws?user_id=slowloris HTTP/1.1\r\nHost: x\r\n")
        .await?;
    for s in [&mut silent, &mut partial] {
        let mut buf = [0u8; 256];
        // The server closes the socket (EOF or reset), possibly after a 408.
        within(T, "the server to drop the socket", async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await?;
    }
    eventually(T, "both counted", || async {
        (n.metric(r#"connect_node_rejected_total{reason="handshake_timeout"}"#) == 2.0)
            .then_some(())
    })
    .await?;
    // A client that completes its handshake in time is served normally.
    let mut ok = within(
        T,
        "connect",
        Client::connect(&connect_url(&n.ws_url(), "prompt", &["r"])),
    )
    .await??;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(push(&cluster, "r", "after the deadline".into()).await?, 1);
    let m = within(T, "message", ok.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(serde_json::json!("after the deadline")));
    Ok(())
}

/// A client that stops reading while its queue is far from full: the
/// node's write to it waits, and is given up after the read timeout with
/// the slow-consumer code, instead of holding the connection for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_client_never_takes_is_given_up_after_the_read_timeout() -> anyhow::Result<()> {
    let cluster = stalling_cluster(Duration::from_secs(2)).await?;
    let n = node(&cluster);
    let url = connect_url(&n.ws_url(), "stuck", &["r"]);
    let tcp = small_window(n).await?;
    let (mut stuck, _) = within(T, "upgrade", tokio_tungstenite::client_async(url, tcp)).await??;
    let first = within(T, "connected", stuck.next())
        .await?
        .expect("frame")?;
    assert!(first.to_text()?.contains("\"connected\""), "{first}");
    for (i, reached) in more_than_buffers_hold(&cluster)
        .await?
        .into_iter()
        .enumerate()
    {
        assert_eq!(reached, 1, "push {i}");
    }
    eventually(T, "the stuck write to be given up", || async {
        (n.metric(r#"connect_node_disconnects_total{code="4100"}"#) == 1.0).then_some(())
    })
    .await?;
    assert_eq!(
        n.metric("connect_node_slow_consumers_total"),
        0.0,
        "the queue never filled"
    );
    assert_eq!(
        n.metric(r#"connect_node_disconnects_total{code="4001"}"#),
        0.0
    );
    assert_eq!(n.metric("connect_node_connections"), 0.0);
    drop(stuck);
    Ok(())
}

/// A client that pauses reading for less than the read timeout keeps its
/// connection, and the server's pings go on once the wait is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pauses_reading_keeps_its_connection_and_its_pings() -> anyhow::Result<()> {
    let cluster = stalling_cluster(Duration::from_secs(6)).await?;
    let n = node(&cluster);
    let url = connect_url(&n.ws_url(), "pausing", &["r"]);
    let tcp = small_window(n).await?;
    let (mut ws, _) = within(T, "upgrade", tokio_tungstenite::client_async(url, tcp)).await??;
    let first = within(T, "connected", ws.next()).await?.expect("frame")?;
    assert!(first.to_text()?.contains("\"connected\""), "{first}");
    let pushed = more_than_buffers_hold(&cluster).await?;
    for (i, reached) in pushed.iter().enumerate() {
        assert_eq!(*reached, 1, "push {i}");
    }
    let n_messages = pushed.len();
    // The node's write waits while this client does not read (and sends
    // nothing: the pings that follow must come from the node's own timer).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut messages, mut pings) = (0, 0);
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut quiet_from = None;
    // Every message, then eight quiet seconds (past the read timeout) in
    // which only pings arrive, each answered by the client library as it
    // reads.
    loop {
        let deadline = quiet_from.map_or(quiet_until, |t: tokio::time::Instant| {
            t + Duration::from_secs(8)
        });
        let next = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) if quiet_from.is_some() => break,
            Err(_) => anyhow::bail!("only {messages} of {n_messages} messages in a minute"),
            Ok(next) => next,
        };
        match next {
            Some(Ok(Message::Text(_))) => {
                messages += 1;
                if messages == n_messages {
                    quiet_from = Some(tokio::time::Instant::now());
                }
            }
            Some(Ok(Message::Ping(_))) if quiet_from.is_some() => pings += 1,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => anyhow::bail!("after {messages} messages: {other:?}"),
        }
    }
    assert_eq!(messages, n_messages);
    assert!(pings >= 5, "{pings} pings in eight quiet seconds");
    assert_eq!(
        n.metric(r#"connect_node_disconnects_total{code="4100"}"#),
        0.0
    );
    assert_eq!(
        n.metric(r#"connect_node_disconnects_total{code="4001"}"#),
        0.0
    );
    Ok(())
}

/// A client that sends nothing of its own but answers pings stays
/// connected while its connection always has frames to write: messages
/// keep coming, in batches that each wait for the batching window, and
/// the node still pings it within the read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_is_still_pinged() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| {
        c.ping_interval = Duration::from_millis(200);
        c.read_timeout = Duration::from_secs(1);
        c.batch_window = Duration::from_millis(300);
    })
    .await?;
    let n = node(&cluster);
    let url = connect_url(&n.ws_url(), "busy", &["hot"]);
    let mut client = within(T, "connect", Client::connect(&url)).await??;
    let pushes = 400;
    let api = cluster.push_client().await?;
    let pusher = tokio::spawn(async move {
        let mut api = api;
        for i in 0..pushes {
            let push = PushToRoomRequest {
                room_id: "hot".into(),
                content: format!("{i}"),
                ..Default::default()
            };
            within(T, "push", api.push_to_room(push)).await??;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::Ok(())
    });
    for i in 0..pushes {
        let m = within(T, "a message", client.next_message())
            .await??
            .ok_or_else(|| anyhow::anyhow!("closed after {i} messages"))?;
        assert_eq!(m.data, Some(serde_json::json!(i)));
    }
    within(T, "the pusher", pusher).await???;
    assert_eq!(
        n.metric(r#"connect_node_disconnects_total{code="4001"}"#),
        0.0
    );
    Ok(())
}

/// The same for an event stream (`/sse`) whose client stopped reading: it
/// is given up after the read timeout, its registration freed and its
/// connection dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_the_client_never_reads_is_given_up() -> anyhow::Result<()> {
    let cluster = stalling_cluster(Duration::from_secs(2)).await?;
    let n = node(&cluster);
    let addr: SocketAddr = n.ws_addr.clone().expect("ws addr").parse()?;
    let mut tcp = small_window(n).await?;
    tcp.write_all(
        format!("GET /sse?user_id=stuck&rooms=r HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    eventually(T, "the event stream to be registered", || async {
        (n.metric("connect_node_connections") == 1.0).then_some(())
    })
    .await?;
    for (i, reached) in more_than_buffers_hold(&cluster)
        .await?
        .into_iter()
        .enumerate()
    {
        assert_eq!(reached, 1, "push {i}");
    }
    eventually(T, "the stuck event stream to be given up", || async {
        (n.metric("connect_node_connections") == 0.0).then_some(())
    })
    .await?;
    // Its HTTP connection is dropped too: read on, the client gets what
    // was already under way and then the end of the connection, where a
    // connection left open would hold the socket for as long as the
    // client likes.
    let mut buf = vec![0u8; 64 * 1024];
    within(T, "the end of the dropped connection", async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await?;
    Ok(())
}

/// The same for what a reconnecting client recovers: a client that takes
/// none of it is dropped after the read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_the_client_never_takes_is_given_up_after_the_read_timeout() -> anyhow::Result<()>
{
    let cluster = stalling_cluster(Duration::from_secs(2)).await?;
    let n = node(&cluster);
    let mut first = within(
        T,
        "connect",
        Client::connect(&connect_url(&n.ws_url(), "stuck", &["r"])),
    )
    .await??;
    assert_eq!(push(&cluster, "r", "seen".into()).await?, 1);
    let seen = within(T, "message", first.next_message())
        .await??
        .expect("message");
    within(T, "close", first.close()).await??;
    more_than_buffers_hold(&cluster).await?;
    let positions = barrage_protocol::format_positions(
        &[(
            "room:r".to_string(),
            barrage_protocol::StreamPos {
                epoch: seen.epoch,
                seq: seen.seq,
            },
        )]
        .into(),
    );
    let url = format!(
        "{}&positions={positions}",
        connect_url(&n.ws_url(), "stuck", &["r"])
    );
    let tcp = small_window(n).await?;
    let (stuck, _) = within(T, "upgrade", tokio_tungstenite::client_async(url, tcp)).await??;
    eventually(T, "the stuck recovery to be given up", || async {
        (n.metric(r#"connect_node_disconnects_total{code="4100"}"#) == 1.0).then_some(())
    })
    .await?;
    assert_eq!(n.metric("connect_node_connections"), 0.0);
    drop(stuck);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_is_closed_as_slow_and_others_get_everything()
-> anyhow::Result<()> {
    let cluster = cluster_with(|c| c.send_queue = 8).await?;
    let n = node(&cluster);
    let url = connect_url(&n.ws_url(), "sloth", &["r"]);
    let tcp = small_window(n).await?;
    let (mut sloth, _) = within(T, "upgrade", tokio_tungstenite::client_async(url, tcp)).await??;
    let first = within(T, "connected", sloth.next())
        .await?
        .expect("frame")?;
    assert!(first.to_text()?.contains("\"connected\""), "{first}");

    let mut calm = within(
        T,
        "connect",
        Client::connect(&connect_url(&n.ws_url(), "calm", &["r"])),
    )
    .await??;
    const N: usize = 200;
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < N {
            match within(T, "message", calm.next_message()).await {
                Ok(Ok(Some(m))) => got.push(m.seq),
                other => anyhow::bail!("calm reader stopped after {}: {other:?}", got.len()),
            }
        }
        Ok(got)
    });
    let body = "x".repeat(16 * 1024);
    for i in 0..N {
        let delivered = push(&cluster, "r", format!("{i}:{body}")).await?;
        assert!(delivered >= 1, "push {i} reached nobody");
    }
    let seqs = within(T, "the calm reader", reader).await???;
    assert_eq!(seqs.len(), N);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or reorder: {seqs:?}"
    );

    eventually(T, "the slow consumer to be closed", || async {
        let slow = n.metric("connect_node_slow_consumers_total");
        let closed = n.metric(r#"connect_node_disconnects_total{code="4100"}"#);
        (slow == 1.0 && closed == 1.0).then_some(())
    })
    .await?;
    // Reading now: what was buffered, then the end of the connection. A
    // close frame, when it got through, carries 4100.
    let end = within(T, "the end of the slow connection", async {
        while let Some(frame) = sloth.next().await {
            match frame {
                Ok(Message::Close(c)) => return c.map(|c| u16::from(c.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await?;
    assert!(matches!(end, None | Some(4100)), "closed with {end:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_see_the_reason_in_the_client_library_too() -> anyhow::Result<()> {
    let cluster = cluster_with(|c| c.max_connections = 1).await?;
    let ws = node(&cluster).ws_url();
    let _held = within(T, "connect", Client::connect(&connect_url(&ws, "a", &[]))).await??;
    match within(T, "connect", Client::connect(&connect_url(&ws, "b", &[]))).await? {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 503);
            assert!(body.contains("connect to another node"), "{body}");
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    Ok(())
}
