//! Client publish (live comments) through the filter pipeline, on a real
//! cluster: accepted comments reach every member tagged with `from` and are
//! acknowledged with their seq; each refusal names its reason and is
//! counted per stage.

use std::time::Duration;

use barrage_client::{Client, connect_url};
use barrage_connect_node::publish::{PublishSettings, WordsMode};
use barrage_protocol::{ClientFrame, ServerFrame};
use barrage_testkit::cluster::{TestCluster, within};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

async fn cluster(words: &std::path::Path) -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_manager("m").await?;
    let api = c.managers[0].grpc_addr.clone();
    let words = words.to_path_buf();
    c.start_node_with("n", move |cfg| {
        cfg.publish = Some(PublishSettings {
            claim_rooms: vec!["vip-*".into()],
            max_chars: 20,
            user_per_sec: 3,
            user_burst: 3,
            words_file: Some(words),
            words_mode: WordsMode::Mask,
            ..PublishSettings::open(api, vec!["live-*".into(), "vip-*".into()])
        });
    })
    .await?;
    Ok(c)
}

async fn publish(
    c: &mut Client,
    room: &str,
    data: serde_json::Value,
    r: &str,
) -> anyhow::Result<ServerFrame> {
    c.send(&ClientFrame::Publish {
        room: room.into(),
        data,
        reference: Some(r.into()),
    })
    .await?;
    loop {
        match within(T, "publish answer", c.next_frame()).await?? {
            Some(f @ (ServerFrame::Ack { .. } | ServerFrame::Rejected { .. })) => return Ok(f),
            Some(_) => continue,
            None => anyhow::bail!("closed"),
        }
    }
}

fn rejected(f: &ServerFrame) -> (&str, &str) {
    match f {
        ServerFrame::Rejected {
            reason, reference, ..
        } => (reason.as_str(), reference.as_deref().unwrap_or("")),
        other => panic!("expected rejected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_are_filtered_published_and_acknowledged() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let words = dir.path().join("words.txt");
    std::fs::write(&words, "# blocked words\nbadword\n")?;
    let cluster = cluster(&words).await?;
    let ws = cluster.nodes[0].ws_url();
    let mut alice = within(
        T,
        "alice",
        Client::connect(&connect_url(&ws, "alice", &["live-1", "vip-1", "other"])),
    )
    .await??;
    let mut bob = within(
        T,
        "bob",
        Client::connect(&connect_url(&ws, "bob", &["live-1"])),
    )
    .await??;

    // Accepted: acknowledged with its seq; every member gets it with `from`.
    let ack = publish(
        &mut alice,
        "live-1",
        json!({"text": "hello", "color": "#ff0000"}),
        "a1",
    )
    .await?;
    let ServerFrame::Ack {
        reference,
        room,
        id,
        seq,
    } = ack
    else {
        panic!("expected ack, got {ack:?}");
    };
    assert_eq!(
        (reference.as_deref(), room.as_str(), seq),
        (Some("a1"), "live-1", 1)
    );
    let m = within(T, "bob's message", bob.next_message())
        .await??
        .expect("message");
    assert_eq!(
        (m.id.as_str(), m.seq, m.event.as_str()),
        (id.as_str(), 1, "comment")
    );
    assert_eq!(m.from.as_deref(), Some("alice"));
    assert_eq!(m.data, Some(json!({"text": "hello", "color": "#ff0000"})));

    // Sensitive words are masked.
    let ack = publish(
        &mut alice,
        "live-1",
        json!({"text": "a BadWord here"}),
        "a2",
    )
    .await?;
    assert!(matches!(ack, ServerFrame::Ack { seq: 2, .. }), "{ack:?}");
    let m = within(T, "masked", bob.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(json!({"text": "a ******* here"})));

    // Refusals, each with its reason; nothing reaches bob.
    let cases = [
        ("live-2", json!({"text": "not a member"}), "not_joined"),
        (
            "other",
            json!({"text": "not a publish room"}),
            "not_allowed",
        ),
        ("vip-1", json!({"text": "needs the claim"}), "not_allowed"),
        ("live-1", json!({"text": "x".repeat(21)}), "too_long"),
        ("live-1", json!({"nothing": 1}), "invalid"),
        // Fields besides text: small, and filtered like it.
        (
            "live-1",
            json!({"text": "hi", "note": "x".repeat(600)}),
            "too_long",
        ),
        ("live-1", json!({"text": "hi", "note": "a\u{7}"}), "invalid"),
        (
            "live-1",
            json!({"text": "hi", "style": {"label": "badword"}}),
            "sensitive",
        ),
        (
            "live-1",
            json!({"text": "hello", "color": "#ff0000"}),
            "duplicate",
        ),
    ];
    for (i, (room, data, reason)) in cases.into_iter().enumerate() {
        let r = format!("bad{i}");
        let f = publish(&mut alice, room, data, &r).await?;
        assert_eq!(rejected(&f), (reason, r.as_str()), "{f:?}");
    }

    // Per-user rate: 3/s with a burst of 3 (two were used above, and the
    // duplicate used one): the next distinct comments are refused for a while.
    let mut limited = 0;
    for i in 0..4 {
        if let ServerFrame::Rejected { reason, .. } = publish(
            &mut alice,
            "live-1",
            json!({"text": format!("fast {i}")}),
            "f",
        )
        .await?
        {
            assert_eq!(reason, "rate_limited");
            limited += 1;
        }
    }
    assert!(limited >= 2, "limited {limited}");
    let n = &cluster.nodes[0];
    assert_eq!(
        n.metric(r#"connect_node_publish_total{outcome="duplicate",stage="duplicate"}"#),
        1.0
    );
    assert_eq!(
        n.metric(r#"connect_node_publish_total{outcome="masked",stage="words"}"#),
        1.0
    );
    assert!(
        n.metric(r#"connect_node_publish_total{outcome="rate_limited",stage="user_rate"}"#) >= 2.0
    );

    // The word list is re-read when it changes.
    std::fs::write(&words, "badword\nnewword\n")?;
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let ack = publish(&mut alice, "live-1", json!({"text": "a newword"}), "a3").await?;
    assert!(matches!(ack, ServerFrame::Ack { .. }), "{ack:?}");
    loop {
        let m = within(T, "bob's messages", bob.next_message())
            .await??
            .expect("message");
        if m.data == Some(json!({"text": "a *******"})) {
            break;
        }
        assert!(
            m.data
                .as_ref()
                .and_then(|d| d["text"].as_str())
                .is_some_and(|t| t.starts_with("fast")),
            "{m:?}"
        );
    }
    Ok(())
}

/// A cluster whose node batches messages for `window`, at most `max` a frame.
async fn batching_cluster(window: Duration, max: usize) -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_node_with("n", |cfg| {
        cfg.batch_window = window;
        cfg.batch_max = max;
    })
    .await?;
    c.start_manager("m").await?;
    Ok(c)
}

/// Pushes `c1`…`c<n>` to room "hot", one call each, in order.
async fn push_hot(
    api: &mut barrage_proto::v1::push_manager_client::PushManagerClient<tonic::transport::Channel>,
    n: u64,
) -> anyhow::Result<()> {
    for i in 1..=n {
        within(
            T,
            "push",
            api.push_to_room(barrage_proto::v1::PushToRoomRequest {
                room_id: "hot".into(),
                content: format!("c{i}"),
                ..Default::default()
            }),
        )
        .await??;
    }
    Ok(())
}

type RawSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A plain WebSocket of `user` in room "hot", past its `connected` frame:
/// it sees frames exactly as the node sends them.
async fn raw_socket(ws: &str, user: &str) -> anyhow::Result<RawSocket> {
    let (mut raw, _) = within(
        T,
        "raw",
        tokio_tungstenite::connect_async(connect_url(ws, user, &["hot"])),
    )
    .await??;
    let first = within(T, "connected", futures::StreamExt::next(&mut raw))
        .await?
        .expect("frame")?;
    assert!(first.to_text()?.contains("connected"));
    Ok(raw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_rooms_are_batched_in_order_and_clients_see_plain_messages() -> anyhow::Result<()> {
    let c = batching_cluster(Duration::from_millis(100), 8).await?;
    let ws = c.nodes[0].ws_url();
    // A raw socket sees the frames as sent; the client library sees messages.
    let mut raw = raw_socket(&ws, "raw").await?;
    let mut viewer = within(
        T,
        "viewer",
        Client::connect(&connect_url(&ws, "viewer", &["hot"])),
    )
    .await??;
    let mut api = c.push_client().await?;
    const N: u64 = 20;
    push_hot(&mut api, N).await?;
    let mut seqs = Vec::new();
    while seqs.len() < N as usize {
        let m = within(T, "message", viewer.next_message())
            .await??
            .expect("message");
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (1..=N).collect::<Vec<_>>());
    let (mut frames, mut raw_seqs) = (0, Vec::new());
    while raw_seqs.len() < N as usize {
        let msg = within(T, "raw frame", futures::StreamExt::next(&mut raw))
            .await?
            .expect("frame")?;
        let Ok(text) = msg.to_text() else { continue };
        let v: serde_json::Value = serde_json::from_str(text)?;
        frames += 1;
        match v["type"].as_str() {
            Some("batch") => {
                let ms = v["messages"].as_array().expect("messages");
                assert!(ms.len() <= 8, "batch of {}", ms.len());
                raw_seqs.extend(ms.iter().map(|m| m["seq"].as_u64().unwrap_or(0)));
            }
            Some("message") => raw_seqs.push(v["seq"].as_u64().unwrap_or(0)),
            _ => {}
        }
    }
    assert_eq!(raw_seqs, (1..=N).collect::<Vec<_>>(), "order and seq kept");
    assert!(
        frames < N,
        "{frames} frames for {N} messages: nothing was batched"
    );
    assert!(c.nodes[0].metric("connect_node_batch_frames_total") >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_gather_the_same_messages_share_one_batch_frame() -> anyhow::Result<()> {
    // Batches close at 4 messages, well inside the window.
    let c = batching_cluster(Duration::from_secs(2), 4).await?;
    let ws = c.nodes[0].ws_url();
    let mut raws = vec![raw_socket(&ws, "a").await?, raw_socket(&ws, "b").await?];
    let mut api = c.push_client().await?;
    push_hot(&mut api, 8).await?;
    let mut seen = Vec::new();
    for raw in &mut raws {
        let mut batches = Vec::new();
        for _ in 0..2 {
            let msg = within(T, "batch frame", futures::StreamExt::next(raw))
                .await?
                .expect("frame")?;
            let v: serde_json::Value = serde_json::from_str(msg.to_text()?)?;
            assert_eq!(v["type"], "batch", "{v}");
            batches.push(v);
        }
        seen.push(batches);
    }
    assert_eq!(seen[0], seen[1], "both connections got the same batches");
    let seqs: Vec<u64> = seen[0]
        .iter()
        .flat_map(|b| b["messages"].as_array().expect("messages").clone())
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    let node = &c.nodes[0];
    assert_eq!(node.metric("connect_node_batch_frames_total"), 4.0);
    // Each batch is built by one connection and taken by the other (one
    // may be built twice should another batch take its cache slot first).
    let shared = node.metric("connect_node_batch_frames_shared_total");
    assert!(
        (1.0..=2.0).contains(&shared),
        "{shared} batch frames shared"
    );
    Ok(())
}

/// A moderation service: denies "spam", rewrites "shout" to upper case,
/// and takes too long on "slow".
struct Moderator;

#[tonic::async_trait]
impl barrage_proto::v1::moderation_server::Moderation for Moderator {
    async fn review(
        &self,
        req: tonic::Request<barrage_proto::v1::ReviewRequest>,
    ) -> Result<tonic::Response<barrage_proto::v1::ReviewResponse>, tonic::Status> {
        use barrage_proto::v1::review_response::Verdict;
        let text = req.into_inner().text;
        let mut r = barrage_proto::v1::ReviewResponse {
            verdict: Verdict::Approve as i32,
            ..Default::default()
        };
        if text.contains("spam") {
            r.verdict = Verdict::Deny as i32;
            r.reason = "no advertising".into();
        } else if text.contains("shout") {
            r.verdict = Verdict::Rewrite as i32;
            r.text = text.to_uppercase();
        } else if text.contains("slow") {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(tonic::Response::new(r))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocklist_mutes_and_a_moderation_service() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = listener.local_addr()?.to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(barrage_proto::v1::moderation_server::ModerationServer::new(
                Moderator,
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir()?;
    let (blocked, mutes) = (dir.path().join("blocked.txt"), dir.path().join("mutes.txt"));
    std::fs::write(&blocked, "troll\n")?;
    let until = barrage_auth::now_secs() + 3600;
    std::fs::write(&mutes, format!("live-1 loud {until}\nlive-1 past 1\n"))?;
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_manager("m").await?;
    let api = c.managers[0].grpc_addr.clone();
    let (b, m) = (blocked.clone(), mutes.clone());
    c.start_node_with("n", move |cfg| {
        cfg.publish = Some(PublishSettings {
            user_per_sec: 50,
            user_burst: 50,
            blocklist_file: Some(b),
            mutes_file: Some(m),
            moderation: Some(barrage_connect_node::publish::ModerationHook {
                addr: hook,
                timeout: Duration::from_millis(150),
                fail_open: false,
            }),
            ..PublishSettings::open(api, vec!["live-*".into()])
        });
    })
    .await?;
    let ws = c.nodes[0].ws_url();
    let mut watcher = within(
        T,
        "watcher",
        Client::connect(&connect_url(&ws, "watcher", &["live-1"])),
    )
    .await??;
    let say = |user: &'static str| {
        let ws = ws.clone();
        async move {
            anyhow::Ok(
                within(
                    T,
                    user,
                    Client::connect(&connect_url(&ws, user, &["live-1"])),
                )
                .await??,
            )
        }
    };
    let mut troll = say("troll").await?;
    let mut loud = say("loud").await?;
    let mut past = say("past").await?;
    let mut fan = say("fan").await?;
    let f = publish(&mut troll, "live-1", json!("hi"), "t").await?;
    assert_eq!(rejected(&f).0, "blocked");
    let f = publish(&mut loud, "live-1", json!("hi"), "l").await?;
    assert_eq!(rejected(&f).0, "muted");
    // An expired mute no longer applies.
    assert!(matches!(
        publish(&mut past, "live-1", json!("back"), "p").await?,
        ServerFrame::Ack { .. }
    ));
    let f = publish(&mut fan, "live-1", json!("buy spam now"), "s").await?;
    assert_eq!(rejected(&f).0, "denied");
    assert!(matches!(f, ServerFrame::Rejected { ref message, .. } if message == "no advertising"));
    assert!(matches!(
        publish(&mut fan, "live-1", json!("shout it"), "r").await?,
        ServerFrame::Ack { .. }
    ));
    // Late verdict, fail-closed: refused, nothing published.
    let f = publish(&mut fan, "live-1", json!("slow one"), "w").await?;
    assert_eq!(rejected(&f).0, "unavailable");
    let mut texts = Vec::new();
    for _ in 0..2 {
        let m = within(T, "watched", watcher.next_message())
            .await??
            .expect("message");
        texts.push(m.data.unwrap_or_default());
    }
    assert_eq!(
        texts,
        vec![json!({"text": "back"}), json!({"text": "SHOUT IT"})]
    );

    // Lifting the block takes effect without a restart.
    std::fs::write(&blocked, "")?;
    tokio::time::sleep(Duration::from_millis(6500)).await;
    assert!(matches!(
        publish(&mut troll, "live-1", json!("sorry"), "t2").await?,
        ServerFrame::Ack { .. }
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_where_a_few_publish_and_everyone_sees_the_same_comments_once() -> anyhow::Result<()>
{
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_manager("m").await?;
    let api = c.managers[0].grpc_addr.clone();
    for node in ["n1", "n2"] {
        let api = api.clone();
        c.start_node_with(node, move |cfg| {
            cfg.publish = Some(PublishSettings {
                user_per_sec: 100,
                user_burst: 100,
                ..PublishSettings::open(api, vec!["arena".into()])
            });
        })
        .await?;
    }
    const MEMBERS: usize = 24;
    const PUBLISHERS: usize = 4;
    const EACH: usize = 10;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let ws = c.nodes[i % 2].ws_url();
        members.push(
            within(
                T,
                "member",
                Client::connect(&connect_url(&ws, &format!("m{i}"), &["arena"])),
            )
            .await??,
        );
    }
    let publishers: Vec<Client> = members.drain(..PUBLISHERS).collect();
    let sends = publishers
        .into_iter()
        .enumerate()
        .map(|(p, mut client)| async move {
            let mut acks = 0;
            for k in 0..EACH {
                if let ServerFrame::Ack { .. } =
                    publish(&mut client, "arena", json!(format!("p{p} #{k}")), "x").await?
                {
                    acks += 1;
                }
            }
            anyhow::Ok(acks)
        });
    let acks = futures::future::try_join_all(sends).await?;
    assert!(
        acks.iter().all(|a| *a == EACH),
        "every comment accepted: {acks:?}"
    );
    let total = PUBLISHERS * EACH;
    // (The publishers' own copies were read past while waiting for acks.)
    let mut orders = Vec::new();
    for (i, mut m) in members.into_iter().enumerate() {
        let mut seen = Vec::new();
        while seen.len() < total {
            let msg = match within(T, "comment", m.next_message()).await {
                Ok(r) => r?.expect("message"),
                Err(e) => anyhow::bail!("member {i} got {} of {total}: {seen:?}: {e}", seen.len()),
            };
            seen.push(msg.seq);
        }
        assert_eq!(
            seen,
            (1..=total as u64).collect::<Vec<_>>(),
            "member {i}: once each, in seq order"
        );
        orders.push(seen);
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "every member saw the same order"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_through_a_push_api_that_requires_tokens() -> anyhow::Result<()> {
    const PUBLISHER: &str = "node-publisher-0123456789";
    const USERS_ONLY: &str = "users-only-token-0123456789";
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_manager_with("m", |cfg| {
        cfg.api_auth =
            barrage_auth::ApiAuth::parse(&format!("{PUBLISHER}=push:room;{USERS_ONLY}=push:user"))
                .expect("tokens");
    })
    .await?;
    let api = c.managers[0].grpc_addr.clone();
    // One node per token: the right one, none, and one without push:room.
    for (node, token) in [
        ("with-token", Some(PUBLISHER)),
        ("no-token", None),
        ("wrong-scope", Some(USERS_ONLY)),
    ] {
        let api = api.clone();
        c.start_node_with(node, move |cfg| {
            cfg.publish = Some(PublishSettings {
                api_token: token.map(str::to_owned),
                ..PublishSettings::open(api, vec!["live-*".into()])
            });
        })
        .await?;
    }
    let mut clients = Vec::new();
    for (i, node) in c.nodes.iter().enumerate() {
        clients.push(
            within(
                T,
                "connect",
                Client::connect(&connect_url(
                    &node.ws_url(),
                    &format!("fan{i}"),
                    &["live-1"],
                )),
            )
            .await??,
        );
    }
    let ack = publish(&mut clients[0], "live-1", json!("hello"), "ok").await?;
    assert!(matches!(ack, ServerFrame::Ack { seq: 1, .. }), "{ack:?}");
    // The others in the room, on the other nodes, get it (the publisher's
    // own copy was read past while waiting for the ack).
    for client in &mut clients[1..] {
        let m = within(T, "the comment", client.next_message())
            .await??
            .expect("message");
        assert_eq!((m.seq, m.from.as_deref()), (1, Some("fan0")));
    }
    // Without a token, or with one lacking push:room: refused, and the
    // message tells the operator what to set.
    let f = publish(&mut clients[1], "live-1", json!("hi"), "none").await?;
    let ServerFrame::Rejected {
        reason, message, ..
    } = &f
    else {
        panic!("expected rejected, got {f:?}");
    };
    assert_eq!(reason, "unavailable");
    assert!(
        message.contains("PUBLISH_API_TOKEN") && message.contains("push:room"),
        "{message}"
    );
    let f = publish(&mut clients[2], "live-1", json!("hi"), "scope").await?;
    let ServerFrame::Rejected {
        reason, message, ..
    } = &f
    else {
        panic!("expected rejected, got {f:?}");
    };
    assert_eq!(reason, "unavailable");
    assert!(
        message.contains("PUBLISH_API_TOKEN") && message.contains("lacks the push:room scope"),
        "{message}"
    );
    Ok(())
}

/// A moderation service that answers a text late the first time it sees
/// it, and approves it at once afterwards.
#[derive(Default)]
struct LateOnce(parking_lot::Mutex<std::collections::HashSet<String>>);

#[tonic::async_trait]
impl barrage_proto::v1::moderation_server::Moderation for LateOnce {
    async fn review(
        &self,
        req: tonic::Request<barrage_proto::v1::ReviewRequest>,
    ) -> Result<tonic::Response<barrage_proto::v1::ReviewResponse>, tonic::Status> {
        let text = req.into_inner().text;
        let first = self.0.lock().insert(text.clone());
        if first || text.contains("hold") {
            tokio::time::sleep(Duration::from_millis(if first { 800 } else { 300 })).await;
        }
        Ok(tonic::Response::new(barrage_proto::v1::ReviewResponse {
            verdict: barrage_proto::v1::review_response::Verdict::Approve as i32,
            ..Default::default()
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comment_that_was_not_published_can_be_sent_again_at_once() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hook = listener.local_addr()?.to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(barrage_proto::v1::moderation_server::ModerationServer::new(
                LateOnce::default(),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // Nothing listens here: every push through it fails.
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?
        .to_string();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_manager("m").await?;
    let api = c.managers[0].grpc_addr.clone();
    c.start_node_with("n", move |cfg| {
        cfg.publish = Some(PublishSettings {
            dedup_window: Duration::from_secs(60),
            moderation: Some(barrage_connect_node::publish::ModerationHook {
                addr: hook,
                timeout: Duration::from_millis(500),
                fail_open: false,
            }),
            ..PublishSettings::open(api, vec!["live-*".into()])
        });
    })
    .await?;
    c.start_node_with("unreachable-api", move |cfg| {
        cfg.publish = Some(PublishSettings {
            dedup_window: Duration::from_secs(60),
            ..PublishSettings::open(nowhere, vec!["live-*".into()])
        });
    })
    .await?;
    let connect = |ws: String, user: &'static str| async move {
        anyhow::Ok(
            within(
                T,
                user,
                Client::connect(&connect_url(&ws, user, &["live-1"])),
            )
            .await??,
        )
    };
    let ws = c.nodes[0].ws_url();

    // Moderation answered late: not published, and the same comment may
    // be sent again at once (and then goes through).
    let mut ann = connect(ws.clone(), "ann").await?;
    let f = publish(&mut ann, "live-1", json!("hello"), "1").await?;
    assert_eq!(rejected(&f).0, "unavailable");
    let f = publish(&mut ann, "live-1", json!("hello"), "2").await?;
    assert!(matches!(f, ServerFrame::Ack { .. }), "{f:?}");
    // Once published, it is a duplicate.
    let f = publish(&mut ann, "live-1", json!("hello"), "3").await?;
    assert_eq!(rejected(&f).0, "duplicate");

    // The push itself failed: the retry is tried again, not a duplicate.
    let mut bob = connect(c.nodes[1].ws_url(), "bob").await?;
    for r in ["4", "5"] {
        let f = publish(&mut bob, "live-1", json!("anyone there?"), r).await?;
        assert_eq!(rejected(&f).0, "unavailable", "{f:?}");
    }

    // The same comment sent from two connections of a user at once: one
    // is published, the other is a duplicate.
    let (mut a1, mut a2) = (
        connect(ws.clone(), "cat").await?,
        connect(ws.clone(), "cat").await?,
    );
    // Seen once by moderation, so both are held 300 ms, not timed out.
    let f = publish(&mut a1, "live-1", json!("hold on"), "6").await?;
    assert_eq!(rejected(&f).0, "unavailable");
    let (f1, f2) = tokio::try_join!(
        publish(&mut a1, "live-1", json!("hold on"), "7"),
        publish(&mut a2, "live-1", json!("hold on"), "8"),
    )?;
    let acks = [&f1, &f2]
        .iter()
        .filter(|f| matches!(f, ServerFrame::Ack { .. }))
        .count();
    let duplicates = [&f1, &f2]
        .iter()
        .filter(|f| matches!(f, ServerFrame::Rejected { reason, .. } if reason == "duplicate"))
        .count();
    assert_eq!((acks, duplicates), (1, 1), "{f1:?} {f2:?}");
    Ok(())
}
