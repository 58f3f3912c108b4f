//! Delivery guarantees: a client that reconnects with its positions gets
//! every message it missed, in order, exactly once, or is told
//! `recovered: false`; offline users get their messages on connect, until a
//! connection has received them; a
//! repeated message id is not delivered twice.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use barrage_client::{Client, Event, Subscriber, SubscriberOptions, connect_url};
use barrage_proto::v1::{PushToRoomRequest, PushToUserRequest};
use barrage_protocol::{MessageFrame, StreamPos, format_positions};
use barrage_testkit::cluster::{TestCluster, eventually, within};

const T: Duration = Duration::from_secs(10);

async fn connect(url: &str) -> anyhow::Result<Client> {
    within(T, "websocket connect", Client::connect(url))
        .await?
        .context("connect")
}

async fn next_msg(c: &mut Client) -> anyhow::Result<MessageFrame> {
    within(T, "a message frame", c.next_message())
        .await??
        .context("connection closed before a message arrived")
}

fn room_push(room: &str, content: &str) -> PushToRoomRequest {
    PushToRoomRequest {
        room_id: room.into(),
        content: content.into(),
        ..Default::default()
    }
}

fn with_positions(url: &str, positions: &BTreeMap<String, StreamPos>) -> String {
    format!("{url}&positions={}", format_positions(positions))
}

async fn cluster(nodes: usize) -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start(nodes).await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_positions_recovers_what_was_missed_in_order() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let mut api = cluster.push_client().await?;
    let n1 = connect_url(&cluster.nodes[0].ws_url(), "ann", &["news"]);
    let mut ann = connect(&n1).await?;
    let first_seen = ann.session().streams["room:news"];
    assert_eq!(first_seen.seq, 0, "a fresh room starts at 0");
    assert_eq!(first_seen.recovered, None, "no position was given");

    within(T, "push", api.push_to_room(room_push("news", "m1"))).await??;
    let m1 = next_msg(&mut ann).await?;
    assert_eq!(m1.seq, 1);
    within(T, "close", ann.close()).await??;

    for i in 2..=4 {
        within(
            T,
            "push",
            api.push_to_room(room_push("news", &format!("m{i}"))),
        )
        .await??;
    }
    // Reconnect to the *other* node with the last position.
    let positions: BTreeMap<_, _> = [(
        "room:news".to_string(),
        StreamPos {
            epoch: m1.epoch,
            seq: m1.seq,
        },
    )]
    .into();
    let n2 = connect_url(&cluster.nodes[1].ws_url(), "ann", &["news"]);
    let mut ann = connect(&with_positions(&n2, &positions)).await?;
    let st = ann.session().streams["room:news"];
    assert_eq!(st.recovered, Some(true));
    assert_eq!((st.epoch, st.seq), (m1.epoch, 4));
    within(T, "push", api.push_to_room(room_push("news", "m5"))).await??;
    let got: Vec<(u64, serde_json::Value)> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            let m = next_msg(&mut ann).await?;
            v.push((m.seq, m.data.unwrap_or_default()));
        }
        v
    };
    assert_eq!(
        got,
        vec![
            (2, "m2".into()),
            (3, "m3".into()),
            (4, "m4".into()),
            (5, "m5".into())
        ]
    );
    let metrics = cluster.nodes[1].metrics();
    assert!(
        metrics.contains("connect_node_recovered_messages_total 3"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_joined_live_is_recovered_from_the_join_even_with_nothing_received()
-> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let mut api = cluster.push_client().await?;
    for i in 1..=2 {
        let before = room_push("stage", &format!("before-{i}"));
        within(T, "push", api.push_to_room(before)).await??;
    }
    let url = connect_url(&cluster.nodes[0].ws_url(), "bea", &[]);
    let mut bea = connect(&url).await?;
    // `joined` says where the room stood: after the two messages before.
    let at_join = within(T, "join", bea.join("stage"))
        .await??
        .context("joined gave no position")?;
    assert_eq!(at_join.seq, 2);
    // The connection drops before anything else arrives, and the room
    // moves on meanwhile.
    within(T, "close", bea.close()).await??;
    for i in 1..=3 {
        let after = room_push("stage", &format!("after-{i}"));
        within(T, "push", api.push_to_room(after)).await??;
    }
    let positions: BTreeMap<_, _> = [("room:stage".to_string(), at_join)].into();
    let url = connect_url(&cluster.nodes[0].ws_url(), "bea", &["stage"]);
    let mut bea = connect(&with_positions(&url, &positions)).await?;
    let st = bea.session().streams["room:stage"];
    assert_eq!(st.recovered, Some(true));
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = next_msg(&mut bea).await?;
        got.push((m.seq, m.data.unwrap_or_default()));
    }
    assert_eq!(
        got,
        vec![
            (3, "after-1".into()),
            (4, "after-2".into()),
            (5, "after-3".into())
        ]
    );
    // A room nothing was pushed to yet starts at 0:0, which recovers from
    // its first message.
    let quiet = within(T, "join", bea.join("quiet"))
        .await??
        .context("joined gave no position")?;
    assert_eq!((quiet.epoch, quiet.seq), (0, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_epochs_and_gaps_beyond_retention_are_not_recovered() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster
        .start_controller_with("c", |c| c.streams.room.max_messages = 3)
        .await?;
    cluster.start_node("n").await?;
    cluster.start_manager("m").await?;
    let mut api = cluster.push_client().await?;
    let url = connect_url(&cluster.nodes[0].ws_url(), "bo", &["small"]);
    let mut epoch = 0;
    for i in 1..=6 {
        let c = connect(&url).await?;
        epoch = c.session().streams["room:small"].epoch.max(epoch);
        drop(c);
        within(
            T,
            "push",
            api.push_to_room(room_push("small", &format!("{i}"))),
        )
        .await??;
    }
    let probe = connect(&url).await?;
    let epoch = probe.session().streams["room:small"].epoch;
    drop(probe);

    let at = |seq| BTreeMap::from([("room:small".to_string(), StreamPos { epoch, seq })]);
    // Retained: 4, 5, 6. From 3 on is recoverable, from 2 is not.
    let mut ok = connect(&with_positions(&url, &at(3))).await?;
    assert_eq!(ok.session().streams["room:small"].recovered, Some(true));
    assert_eq!(next_msg(&mut ok).await?.seq, 4);
    let gap = connect(&with_positions(&url, &at(2))).await?;
    assert_eq!(gap.session().streams["room:small"].recovered, Some(false));
    let other_epoch = BTreeMap::from([(
        "room:small".to_string(),
        StreamPos {
            epoch: epoch + 1,
            seq: 6,
        },
    )]);
    let moved = connect(&with_positions(&url, &other_epoch)).await?;
    let st = moved.session().streams["room:small"];
    assert_eq!((st.recovered, st.epoch, st.seq), (Some(false), epoch, 6));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_during_a_stream_of_pushes_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let api = cluster.push_client().await?;
    let urls = [cluster.nodes[0].ws_url(), cluster.nodes[1].ws_url()];
    const TOTAL: u64 = 150;
    // Subscribed before the first push, so every message is owed to it.
    let mut c = connect(&connect_url(&urls[0], "hopper", &["live"])).await?;
    let producer = tokio::spawn(async move {
        let mut api = api;
        for i in 1..=TOTAL {
            let r = within(
                T,
                "push",
                api.push_to_room(room_push("live", &i.to_string())),
            )
            .await??;
            ensure!(r.into_inner().success);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        anyhow::Ok(())
    });
    // The client hops between the two nodes every 20 messages, resuming
    // from its last position each time.
    let mut seen = Vec::new();
    let mut positions = BTreeMap::new();
    let mut hop = 0;
    loop {
        for _ in 0..20 {
            if seen.len() as u64 == TOTAL {
                break;
            }
            let m = next_msg(&mut c)
                .await
                .with_context(|| format!("after {seen:?}, hop {hop}"))?;
            seen.push(m.seq);
            positions.insert(
                m.stream.clone(),
                StreamPos {
                    epoch: m.epoch,
                    seq: m.seq,
                },
            );
        }
        if seen.len() as u64 == TOTAL {
            break;
        }
        hop += 1;
        drop(c);
        let base = connect_url(&urls[hop % 2], "hopper", &["live"]);
        c = connect(&with_positions(&base, &positions)).await?;
        assert_eq!(
            c.session().streams["room:live"].recovered,
            Some(true),
            "recovery must succeed within retention"
        );
    }
    within(Duration::from_secs(30), "producer", producer).await???;
    let expected: Vec<u64> = (1..=TOTAL).collect();
    assert_eq!(
        seen, expected,
        "every message once, in order, across {hop} reconnects"
    );
    Ok(())
}

const RECEIPTS: &str = "controller_offline_receipts_total";

/// Reads on for a moment, so that the client answers the ping the node
/// sent after the messages kept for it (the client library answers pings
/// as it reads), and waits until the controller has `receipts` in all.
async fn answer_the_ping(
    c: &mut Client,
    cluster: &TestCluster,
    receipts: f64,
) -> anyhow::Result<()> {
    let read = tokio::time::timeout(Duration::from_millis(200), c.next_frame()).await;
    ensure!(read.is_err(), "no frame expected, got {read:?}");
    eventually(T, "the receipt at the controller", || async {
        (cluster.controllers[0].metric(RECEIPTS) >= receipts).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_an_offline_user_arrive_on_connect() -> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let mut api = cluster.push_client().await?;
    let resp = within(
        T,
        "push",
        api.push_to_user(PushToUserRequest {
            user_id: "sleeper".into(),
            content: "while you were away".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert!(resp.success);
    assert_eq!((resp.delivered_count, resp.stored_count), (0, 1));
    assert!(
        resp.message.contains("stored for 1 offline user"),
        "{}",
        resp.message
    );

    let url = connect_url(&cluster.nodes[0].ws_url(), "sleeper", &[]);
    // A connection that goes away before it has read the message (so it
    // never answers the ping sent after it) has not received it…
    let gone = connect(&url).await?;
    drop(gone);
    // …so the next one gets it too.
    let mut c = connect(&url).await?;
    let m = next_msg(&mut c).await?;
    assert_eq!(
        (m.stream.as_str(), m.data),
        ("user:sleeper", Some("while you were away".into()))
    );
    assert_eq!(cluster.controllers[0].metric(RECEIPTS), 0.0);
    answer_the_ping(&mut c, &cluster, 1.0).await?;
    // Received: a second device connecting later does not get it again.
    let mut second = connect(&url).await?;
    let resp = within(
        T,
        "push",
        api.push_to_user(PushToUserRequest {
            user_id: "sleeper".into(),
            content: "now".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert_eq!((resp.delivered_count, resp.stored_count), (2, 0));
    assert_eq!(next_msg(&mut second).await?.data, Some("now".into()));
    assert_eq!(next_msg(&mut c).await?.data, Some("now".into()));
    Ok(())
}

/// The positions a client library stores from `connected`.
fn positions_of(c: &Client) -> BTreeMap<String, StreamPos> {
    c.session()
        .streams
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                StreamPos {
                    epoch: s.epoch,
                    seq: s.seq,
                },
            )
        })
        .collect()
}

/// A client that stores the positions `connected` gives (as the client
/// libraries do) and goes away before it has read the messages kept for
/// it asks from there when it comes back, and gets them then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_back_from_its_first_positions_still_gets_the_kept_messages() -> anyhow::Result<()>
{
    let cluster = cluster(1).await?;
    let mut api = cluster.push_client().await?;
    for text in ["kept-1", "kept-2"] {
        let push = PushToUserRequest {
            user_id: "keeper".into(),
            content: text.into(),
            ..Default::default()
        };
        let stored = within(T, "push", api.push_to_user(push)).await??;
        assert_eq!(stored.into_inner().stored_count, 1);
    }
    let url = connect_url(&cluster.nodes[0].ws_url(), "keeper", &[]);
    let first = connect(&url).await?;
    let at = positions_of(&first);
    assert_eq!(at["user:keeper"].seq, 0, "from before the kept messages");
    drop(first);
    let mut again = connect(&with_positions(&url, &at)).await?;
    assert_eq!(again.session().streams["user:keeper"].recovered, Some(true));
    for text in ["kept-1", "kept-2"] {
        assert_eq!(next_msg(&mut again).await?.data, Some(text.into()));
    }
    answer_the_ping(&mut again, &cluster, 1.0).await?;
    // Received: a new device is not given them.
    let mut fresh = connect(&url).await?;
    assert_eq!(fresh.session().streams["user:keeper"].seq, 2);
    let push = PushToUserRequest {
        user_id: "keeper".into(),
        content: "live".into(),
        ..Default::default()
    };
    within(T, "push", api.push_to_user(push)).await??;
    assert_eq!(next_msg(&mut fresh).await?.data, Some("live".into()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_message_id_is_not_delivered_twice() -> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let mut api = cluster.push_client().await?;
    let mut c = connect(&connect_url(&cluster.nodes[0].ws_url(), "u", &["dedup"])).await?;
    let mut req = room_push("dedup", "once");
    req.message_id = "order-42".into();
    let first = within(T, "push", api.push_to_room(req.clone()))
        .await??
        .into_inner();
    assert_eq!((first.delivered_count, first.duplicate), (1, false));
    assert_eq!(next_msg(&mut c).await?.id, "order-42");
    // The first attempt's result is recorded asynchronously; a retry gets it.
    let retry = barrage_testkit::cluster::eventually(T, "the recorded first result", || {
        let (mut api, req) = (api.clone(), req.clone());
        async move {
            let r = api.push_to_room(req).await.ok()?.into_inner();
            (r.delivered_count == 1).then_some(r)
        }
    })
    .await?;
    assert!(retry.duplicate && retry.success, "{retry:?}");
    assert_eq!(retry.message_id, "order-42");
    assert!(
        retry.message.contains("not delivered again"),
        "{}",
        retry.message
    );
    within(T, "push", api.push_to_room(room_push("dedup", "next"))).await??;
    let m = next_msg(&mut c).await?;
    assert_eq!(
        (m.seq, m.data),
        (2, Some("next".into())),
        "the repeat was not delivered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_fails_over_to_another_node_and_recovers() -> anyhow::Result<()> {
    let mut cluster = cluster(2).await?;
    let mut api = cluster.push_client().await?;
    let mut opts = SubscriberOptions::new(&cluster.nodes[0].ws_url(), "sam", &["ops"]);
    opts.urls.push(cluster.nodes[1].ws_url());
    opts.min_backoff = Duration::from_millis(20);
    let mut sub = within(T, "subscribe", Subscriber::connect(opts)).await??;
    assert!(matches!(
        within(T, "event", sub.next_event()).await??,
        Event::Connected { .. }
    ));
    within(T, "push", api.push_to_room(room_push("ops", "before"))).await??;
    assert!(
        matches!(within(T, "event", sub.next_event()).await??, Event::Message(m) if m.seq == 1)
    );

    // node-1 drains (close 4000): the subscriber moves to node-2.
    cluster.node("node-1")?.stop().await?;
    within(T, "push", api.push_to_room(room_push("ops", "during"))).await??;
    let mut events = Vec::new();
    while !events.iter().any(|e| matches!(e, Event::Message(_))) {
        events.push(within(T, "event", sub.next_event()).await??);
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { code: 4000, .. })),
        "{events:?}"
    );
    let recovered = events.iter().find_map(|e| match e {
        Event::Connected { session, recovered } => {
            Some((session.node_id.clone(), recovered.clone()))
        }
        _ => None,
    });
    let (node, recovered) = recovered.context("reconnected")?;
    assert_eq!(node, "node-2");
    assert_eq!(recovered.get("room:ops"), Some(&true));
    match events.last() {
        Some(Event::Message(m)) => assert_eq!((m.seq, m.data.clone()), (2, Some("during".into()))),
        other => panic!("expected the missed message, got {other:?}"),
    }
    Ok(())
}

/// A message of 60 KiB: under the default `MAX_CONTENT_BYTES` (64 KiB).
fn large(i: usize) -> String {
    format!("{i:04}{}", "x".repeat(60 * 1024))
}

/// The numbers `large` put at the front of each message, in arrival order.
async fn large_ones(c: &mut Client, n: usize) -> anyhow::Result<Vec<usize>> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = next_msg(c).await?;
        let text = m.data.as_ref().and_then(|d| d.as_str()).unwrap_or("");
        ensure!(
            text.len() > 60 * 1024,
            "a whole message, got {} bytes",
            text.len()
        );
        got.push(text[..4].parse()?);
    }
    Ok(got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_messages_over_grpcs_default_size_limit_are_recovered() -> anyhow::Result<()> {
    // 100 messages of 60 KiB: about 6 MiB in one history answer, over the
    // 4 MiB a gRPC peer decodes by default.
    let cluster = cluster(1).await?;
    let mut api = cluster.push_client().await?;
    let url = connect_url(&cluster.nodes[0].ws_url(), "reader", &["big"]);
    let mut c = connect(&url).await?;
    within(T, "push", api.push_to_room(room_push("big", "first"))).await??;
    let first = next_msg(&mut c).await?;
    within(T, "close", c.close()).await??;
    for i in 0..100 {
        within(T, "push", api.push_to_room(room_push("big", &large(i)))).await??;
    }
    let at = BTreeMap::from([(
        "room:big".to_string(),
        StreamPos {
            epoch: first.epoch,
            seq: first.seq,
        },
    )]);
    let mut c = connect(&with_positions(&url, &at)).await?;
    let st = c.session().streams["room:big"];
    assert_eq!((st.recovered, st.seq), (Some(true), first.seq + 100));
    assert_eq!(large_ones(&mut c, 100).await?, (0..100).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_messages_over_grpcs_default_size_limit_all_arrive() -> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let mut api = cluster.push_client().await?;
    for i in 0..80 {
        let resp = within(
            T,
            "push",
            api.push_to_user(PushToUserRequest {
                user_id: "away".into(),
                content: large(i),
                ..Default::default()
            }),
        )
        .await??
        .into_inner();
        assert_eq!(resp.stored_count, 1);
    }
    let url = connect_url(&cluster.nodes[0].ws_url(), "away", &[]);
    let mut c = connect(&url).await?;
    assert_eq!(large_ones(&mut c, 80).await?, (0..80).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_controllers_cap_is_not_recovered_and_keeps_offline_messages()
-> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    // Room for three of the large messages per answer.
    cluster
        .start_controller_with("c", |c| c.streams.max_history_bytes = 3 * 62 * 1024)
        .await?;
    cluster.start_node("n").await?;
    cluster.start_manager("m").await?;
    let mut api = cluster.push_client().await?;
    let ws = cluster.nodes[0].ws_url();

    // A room with four large missed messages and one with a small one.
    let url = connect_url(&ws, "reader", &["big", "small"]);
    let c = connect(&url).await?;
    let at: BTreeMap<_, _> = c
        .session()
        .streams
        .iter()
        .filter(|(k, _)| k.starts_with("room:"))
        .map(|(k, s)| {
            (
                k.clone(),
                StreamPos {
                    epoch: s.epoch,
                    seq: s.seq,
                },
            )
        })
        .collect();
    drop(c);
    for i in 0..4 {
        within(T, "push", api.push_to_room(room_push("big", &large(i)))).await??;
    }
    within(T, "push", api.push_to_room(room_push("small", "hi"))).await??;
    let mut c = connect(&with_positions(&url, &at)).await?;
    let streams = &c.session().streams;
    assert_eq!(
        streams["room:big"].recovered,
        Some(false),
        "too large: refetch"
    );
    assert_eq!(streams["room:small"].recovered, Some(true));
    let m = next_msg(&mut c).await?;
    assert_eq!(
        (m.stream.as_str(), m.data),
        ("room:small", Some("hi".into()))
    );
    let too_large =
        cluster.controllers[0].metric(r#"controller_recoveries_total{outcome="too_large"}"#);
    assert_eq!(too_large, 1.0);

    // Five offline messages: three arrive on this connect, the other two
    // on the next, none twice.
    for i in 0..5 {
        within(
            T,
            "push",
            api.push_to_user(PushToUserRequest {
                user_id: "away".into(),
                content: large(i),
                ..Default::default()
            }),
        )
        .await??;
    }
    let away = connect_url(&ws, "away", &[]);
    let mut first = connect(&away).await?;
    assert_eq!(large_ones(&mut first, 3).await?, vec![0, 1, 2]);
    answer_the_ping(&mut first, &cluster, 1.0).await?;
    within(T, "close", first.close()).await??;
    let mut second = connect(&away).await?;
    assert_eq!(large_ones(&mut second, 2).await?, vec![3, 4]);
    Ok(())
}

/// A client that recovered its streams gets later frames written straight
/// to its socket, even while one of its recovered streams (here the quiet
/// broadcast stream) still has a rule to drop copies of what recovery sent:
/// the node checks those rules wherever a frame is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_client_gets_direct_writes_while_a_quiet_stream_is_still_checked()
-> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let n = &cluster.nodes[0];
    let mut api = cluster.push_client().await?;
    let url = connect_url(&n.ws_url(), "rita", &["live"]);
    let mut rita = connect(&url).await?;
    let broadcast = rita.session().streams["broadcast"];
    within(T, "push", api.push_to_room(room_push("live", "m1"))).await??;
    let m1 = next_msg(&mut rita).await?;
    within(T, "close", rita.close()).await??;
    for m in ["m2", "m3"] {
        within(T, "push", api.push_to_room(room_push("live", m))).await??;
    }
    let positions: BTreeMap<_, _> = [
        (
            "room:live".to_string(),
            StreamPos {
                epoch: m1.epoch,
                seq: m1.seq,
            },
        ),
        (
            "broadcast".to_string(),
            StreamPos {
                epoch: broadcast.epoch,
                seq: broadcast.seq,
            },
        ),
    ]
    .into();
    let mut rita = connect(&with_positions(&url, &positions)).await?;
    assert_eq!(rita.session().streams["broadcast"].recovered, Some(true));
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(next_msg(&mut rita).await?.data.unwrap_or_default());
    }
    let direct_before = n.metric("connect_node_frames_written_direct_total");
    for m in ["m4", "m5"] {
        within(T, "push", api.push_to_room(room_push("live", m))).await??;
        got.push(next_msg(&mut rita).await?.data.unwrap_or_default());
    }
    assert_eq!(got, ["m2", "m3", "m4", "m5"].map(|m| serde_json::json!(m)));
    assert_eq!(
        n.metric("connect_node_frames_written_direct_total") - direct_before,
        2.0,
        "m4 and m5 written by the fan-out itself"
    );
    // A broadcast now: past the recovered position, delivered once.
    within(
        T,
        "broadcast",
        api.broadcast(barrage_proto::v1::BroadcastRequest {
            content: "b1".into(),
            ..Default::default()
        }),
    )
    .await??;
    let b1 = next_msg(&mut rita).await?;
    assert_eq!(b1.data, Some(serde_json::json!("b1")));
    assert_eq!(b1.seq, broadcast.seq + 1);
    Ok(())
}
