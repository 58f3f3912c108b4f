//! End to end: a push travels gRPC → push-manager → controller →
//! connect-node → WebSocket, with real servers on loopback over a real etcd
//! (and the same tests over the in-process registry).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use barrage_client::{Client, connect_url};
use barrage_proto::PeerChannel;
use barrage_proto::v1::controller_client::ControllerClient;
use barrage_proto::v1::{
    BroadcastRequest, GetRoomInfoRequest, GetUserNodeRequest, PushToRoomRequest, PushToUserRequest,
};
use barrage_protocol::MessageFrame;
use barrage_testkit::cluster::{TestCluster, eventually, within};
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(10);

async fn connect(url: &str, user: &str, rooms: &[&str]) -> anyhow::Result<Client> {
    within(
        T,
        "websocket connect",
        Client::connect(&connect_url(url, user, rooms)),
    )
    .await?
    .with_context(|| format!("connect {user}"))
}

async fn next_msg(c: &mut Client) -> anyhow::Result<MessageFrame> {
    within(T, "a message frame", c.next_message())
        .await??
        .context("connection closed before a message arrived")
}

/// A client of the controller at `addr` (`host:port`).
async fn controller_at(addr: &str) -> anyhow::Result<ControllerClient<PeerChannel>> {
    let endpoint = Channel::from_shared(format!("http://{addr}"))?;
    let channel = within(T, "connect to the controller", endpoint.connect()).await??;
    Ok(ControllerClient::new(barrage_proto::local::network(
        channel,
    )))
}

fn room_push(room: &str, content: &str) -> PushToRoomRequest {
    PushToRoomRequest {
        room_id: room.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// Generates one test per registry: real etcd and in-process.
macro_rules! on_both_registries {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() -> anyhow::Result<()> {
                barrage_testkit::init_tracing();
                super::$name(super::TestCluster::with_etcd().await?).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn in_process() -> anyhow::Result<()> {
                barrage_testkit::init_tracing();
                super::$name(super::TestCluster::in_process()).await
            }
        }
    };
}

on_both_registries!(a_node_registers_once_its_controller_holds_its_state);
/// A connect-node appears in discovery only after its controller applied
/// its full sync. A controller that is warming up counts every registered
/// node and refuses pushes until each has synced, so a node registered
/// before its sync landed made the first pushes after start-up fail.
async fn a_node_registers_once_its_controller_holds_its_state(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    // The controller is reached through a proxy that holds every new
    // connection for a while, so the node's first sync lands late.
    let (proxy, upstream) = delaying_proxy(Duration::from_millis(700)).await?;
    cluster
        .start_controller_with("controller-1", |c| c.advertise_addr = proxy.clone())
        .await?;
    let _ = upstream.send(cluster.controllers[0].grpc_addr.clone());
    let controller = cluster.controllers[0].registry.clone();
    let mut nodes = cluster
        .discovery()
        .await?
        .watch(barrage_discovery::Role::ConnectNode)
        .await?;
    // Reads the controller's full syncs at the moment the node appears.
    let at_registration = tokio::spawn(async move {
        while !nodes.current().contains_key("node-1") {
            nodes.changed().await?;
        }
        Ok::<_, anyhow::Error>(barrage_testkit::cluster::metric(
            &controller,
            r#"controller_syncs_total{kind="full"}"#,
        ))
    });
    cluster.start_node("node-1").await?;
    let syncs = within(T, "node-1 to appear in discovery", at_registration).await???;
    ensure!(
        syncs >= 1.0,
        "node-1 registered before controller-1 applied its state ({syncs} full syncs)"
    );
    cluster.start_manager("manager-1").await?;
    let mut api = cluster.push_client().await?;
    let resp = within(
        T,
        "first push",
        api.push_to_user(PushToUserRequest {
            user_id: "early".into(),
            content: "first".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    ensure!(resp.success && resp.stored_count == 1, "{resp:?}");
    Ok(())
}

/// A TCP proxy on loopback that waits `delay` before it forwards each new
/// connection to the address later sent on the returned channel.
async fn delaying_proxy(
    delay: Duration,
) -> anyhow::Result<(String, tokio::sync::watch::Sender<String>)> {
    proxy(delay, false).await
}

/// A TCP proxy on loopback that closes each new connection at once until
/// it is sent an address, then forwards them there.
async fn refusing_proxy() -> anyhow::Result<(String, tokio::sync::watch::Sender<String>)> {
    proxy(Duration::ZERO, true).await
}

async fn proxy(
    delay: Duration,
    refuse_until_set: bool,
) -> anyhow::Result<(String, tokio::sync::watch::Sender<String>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (tx, rx) = tokio::sync::watch::channel(String::new());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if refuse_until_set && rx.borrow().is_empty() {
                continue;
            }
            let mut upstream = rx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let Ok(to) = upstream
                    .wait_for(|a| !a.is_empty())
                    .await
                    .map(|a| a.clone())
                else {
                    return;
                };
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok((addr, tx))
}

on_both_registries!(room_push_reaches_members_on_both_nodes_except_excluded);
async fn room_push_reaches_members_on_both_nodes_except_excluded(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start(2).await?;
    let (n1, n2) = (cluster.nodes[0].ws_url(), cluster.nodes[1].ws_url());
    let mut alice = connect(&n1, "alice", &["r1"]).await?;
    let mut bob = connect(&n2, "bob", &["r1"]).await?;
    let mut carol = connect(&n2, "carol", &["r1"]).await?;
    let mut dave = connect(&n1, "dave", &["r2"]).await?;
    let mut api = cluster.push_client().await?;

    let mut req = room_push("r1", r#"{"text":"hello"}"#);
    req.event = "comment".into();
    req.message_id = "m-1".into();
    req.exclude_user_ids = vec!["carol".into()];
    let resp = within(T, "PushToRoom", api.push_to_room(req))
        .await??
        .into_inner();
    ensure!(resp.success, "push failed: {}", resp.message);
    assert_eq!(resp.delivered_count, 2, "{}", resp.message);
    assert_eq!(resp.message_id, "m-1");

    for c in [&mut alice, &mut bob] {
        let m = next_msg(c).await?;
        assert_eq!(m.stream, "room:r1");
        assert_eq!(m.id, "m-1");
        assert_eq!(m.event, "comment");
        assert_eq!(m.data, Some(serde_json::json!({"text": "hello"})));
        assert_eq!(m.seq, 1);
        assert!(m.timestamp > 0);
    }

    // carol was excluded and dave is elsewhere: the first message each sees
    // is the next one addressed to them.
    let resp = within(T, "PushToRoom", api.push_to_room(room_push("r1", "second")))
        .await??
        .into_inner();
    assert_eq!(resp.delivered_count, 3);
    let m = next_msg(&mut carol).await?;
    assert_eq!((m.data, m.seq), (Some(serde_json::json!("second")), 2));
    let resp = within(
        T,
        "PushToRoom",
        api.push_to_room(room_push("r2", "for dave")),
    )
    .await??
    .into_inner();
    assert_eq!(resp.delivered_count, 1);
    assert_eq!(next_msg(&mut dave).await?.stream, "room:r2");

    let info = within(
        T,
        "GetRoomInfo",
        api.get_room_info(GetRoomInfoRequest {
            room_id: "r1".into(),
        }),
    )
    .await??
    .into_inner();
    assert_eq!((info.member_count, info.connection_count), (3, 3));
    assert_eq!(info.members, vec!["alice", "bob", "carol"]);
    let nodes: Vec<_> = info
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.connection_count))
        .collect();
    assert_eq!(nodes, vec![("node-1", 1), ("node-2", 2)]);
    Ok(())
}

on_both_registries!(push_to_user_reaches_every_connection_on_every_node);
async fn push_to_user_reaches_every_connection_on_every_node(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start(2).await?;
    let (n1, n2) = (cluster.nodes[0].ws_url(), cluster.nodes[1].ws_url());
    let mut tabs = vec![
        connect(&n1, "u1", &[]).await?,
        connect(&n1, "u1", &[]).await?,
        connect(&n2, "u1", &[]).await?,
    ];
    let mut other = connect(&n2, "u2", &[]).await?;
    let mut api = cluster.push_client().await?;

    let resp = within(
        T,
        "PushToUser",
        api.push_to_user(PushToUserRequest {
            user_id: "u1".into(),
            content: "hi u1".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.delivered_count, 3);
    for c in &mut tabs {
        let m = next_msg(c).await?;
        assert_eq!(
            (m.stream.as_str(), m.data),
            ("user:u1", Some(serde_json::json!("hi u1")))
        );
    }

    // Several users at once, one of them offline, duplicates ignored.
    let resp = within(
        T,
        "PushToUser",
        api.push_to_user(PushToUserRequest {
            user_ids: vec!["u1".into(), "u2".into(), "nobody".into(), "u2".into()],
            content: "to many".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.delivered_count, 4);
    assert_eq!(next_msg(&mut other).await?.stream, "user:u2");
    for c in &mut tabs {
        assert_eq!(next_msg(c).await?.data, Some(serde_json::json!("to many")));
    }

    let where_ = within(
        T,
        "GetUserNode",
        api.get_user_node(GetUserNodeRequest {
            user_id: "u1".into(),
        }),
    )
    .await??
    .into_inner();
    assert!(where_.online);
    assert_eq!(where_.connection_count, 3);
    let nodes: Vec<_> = where_
        .nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.connection_count))
        .collect();
    assert_eq!(nodes, vec![("node-1", 2), ("node-2", 1)]);
    Ok(())
}

on_both_registries!(broadcast_reaches_everyone_and_counts_exactly);
async fn broadcast_reaches_everyone_and_counts_exactly(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start(2).await?;
    let mut clients = Vec::new();
    for i in 0..5 {
        let url = cluster.nodes[i % 2].ws_url();
        clients.push(connect(&url, &format!("user{i}"), &["r1"]).await?);
    }
    let mut api = cluster.push_client().await?;
    let resp = within(
        T,
        "Broadcast",
        api.broadcast(BroadcastRequest {
            content: r#"{"notice":"maintenance"}"#.into(),
            event: "notice".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.total_delivered, 5);
    assert_eq!(resp.node_count, 2);
    for c in &mut clients {
        let m = next_msg(c).await?;
        assert_eq!(
            (m.stream.as_str(), m.event.as_str()),
            ("broadcast", "notice")
        );
        assert_eq!(m.id, resp.message_id);
    }
    Ok(())
}

on_both_registries!(stopped_node_leaves_the_pool_and_the_controller);
async fn stopped_node_leaves_the_pool_and_the_controller(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start(2).await?;
    let (n1, n2) = (cluster.nodes[0].ws_url(), cluster.nodes[1].ws_url());
    let mut alice = connect(&n1, "alice", &["r1"]).await?;
    let _bob = connect(&n2, "bob", &["r1"]).await?;
    let manager_metrics = || cluster.managers[0].metrics();
    eventually(T, "two pooled channels", || async {
        manager_metrics()
            .contains("push_manager_node_connections 2")
            .then_some(())
    })
    .await?;

    cluster.node("node-2")?.stop().await?;

    eventually(T, "node-2 to leave the pool", || async {
        cluster.managers[0]
            .metrics()
            .contains("push_manager_node_connections 1")
            .then_some(())
    })
    .await?;
    let mut api = cluster.push_client().await?;
    let info = eventually(T, "node-2 to leave the controller", || {
        let mut api = api.clone();
        async move {
            let info = api
                .get_room_info(GetRoomInfoRequest {
                    room_id: "r1".into(),
                })
                .await
                .ok()?
                .into_inner();
            (info.nodes.len() == 1).then_some(info)
        }
    })
    .await?;
    assert_eq!(info.nodes[0].node_id, "node-1");
    assert_eq!(info.members, vec!["alice"]);

    let resp = within(T, "PushToRoom", api.push_to_room(room_push("r1", "after")))
        .await??
        .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.delivered_count, 1);
    assert_eq!(
        next_msg(&mut alice).await?.data,
        Some(serde_json::json!("after"))
    );
    let resp = within(
        T,
        "Broadcast",
        api.broadcast(BroadcastRequest {
            content: "b".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert_eq!((resp.node_count, resp.total_delivered), (1, 1));
    Ok(())
}

on_both_registries!(a_node_dropped_from_discovery_has_its_clients_recover_what_it_missed);
/// A connect-node whose discovery key went away while it kept running (a
/// lease lost to a long stall or a partition, a key deleted by hand) was
/// routed nothing until it was back. Its connections are then closed with
/// 4101, and they recover what they missed: every message arrives, in
/// order, once.
async fn a_node_dropped_from_discovery_has_its_clients_recover_what_it_missed(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    use barrage_client::{Event, Subscriber, SubscriberOptions};
    use barrage_discovery::Role;
    // A long lease: the key is put back at a keep-alive (every 3 s), long
    // after the controller has seen it go.
    cluster.set_options(barrage_testkit::cluster::ClusterOptions {
        lease_ttl: Duration::from_secs(9),
        ..Default::default()
    });
    cluster.start(1).await?;
    let api = cluster.push_client().await?;
    let mut opts = SubscriberOptions::new(&cluster.nodes[0].ws_url(), "ann", &["news"]);
    opts.min_backoff = Duration::from_millis(20);
    let mut sub = within(T, "subscribe", Subscriber::connect(opts)).await??;
    let mut events = Vec::new();
    let push = |content: String| {
        let mut api = api.clone();
        async move {
            let resp = within(
                T,
                "PushToRoom",
                api.push_to_room(room_push("news", &content)),
            )
            .await??
            .into_inner();
            anyhow::Ok(resp.delivered_count)
        }
    };
    push("m1".into()).await?;

    let d = within(T, "discovery", cluster.discovery()).await??;
    within(
        T,
        "delete node-1's key",
        d.backend().delete(&d.key(Role::ConnectNode, "node-1")),
    )
    .await??;
    eventually(T, "the controller to drop node-1", || async {
        (cluster.controllers[0].metric(r#"controller_nodes_dropped_total{reason="deregistered"}"#)
            >= 1.0)
            .then_some(())
    })
    .await?;
    // The controller routes these to nobody until node-1 is back.
    let mut unrouted = 0;
    for i in 2..=6 {
        if push(format!("m{i}")).await? == 0 {
            unrouted += 1;
        }
    }
    ensure!(unrouted > 0, "no push went to nobody");

    // Back in discovery, the node closes the connection with 4101 and the
    // subscriber reconnects with its positions.
    let recovered = loop {
        match within(T, "an event", sub.next_event()).await?? {
            Event::Connected { recovered, .. } if !recovered.is_empty() => break recovered,
            e => events.push(e),
        }
    };
    assert_eq!(recovered.get("room:news"), Some(&true), "{events:?}");
    ensure!(
        events
            .iter()
            .any(|e| matches!(e, Event::Disconnected { code: 4101, .. })),
        "closed with 4101: {events:?}"
    );
    push("m7".into()).await?;
    let mut got: Vec<(u64, serde_json::Value)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.seq, m.data.clone().unwrap_or_default())),
            _ => None,
        })
        .collect();
    while got.last().is_none_or(|(seq, _)| *seq < 7) {
        if let Event::Message(m) = within(T, "a message", sub.next_event()).await?? {
            got.push((m.seq, m.data.unwrap_or_default()));
        }
    }
    let want: Vec<(u64, serde_json::Value)> =
        (1..=7).map(|i| (i, format!("m{i}").into())).collect();
    assert_eq!(got, want);
    assert!(cluster.nodes[0].metric("connect_node_dropped_by_controller_total") >= 1.0);
    Ok(())
}

on_both_registries!(clients_of_a_node_flapping_in_discovery_lose_nothing);
/// A connect-node drops out of discovery again and again (its key deleted
/// each time it comes back, for a while) as pushes flow and subscribers
/// connect. Every subscriber ends with every message after the position it
/// first connected at, in order, once.
async fn clients_of_a_node_flapping_in_discovery_lose_nothing(
    cluster: TestCluster,
) -> anyhow::Result<()> {
    flapping(cluster, 1).await
}

on_both_registries!(clients_of_a_node_flapping_with_two_controllers_lose_nothing);
/// As above with two controllers: each drops the node on its own and
/// tells it on its own.
async fn clients_of_a_node_flapping_with_two_controllers_lose_nothing(
    cluster: TestCluster,
) -> anyhow::Result<()> {
    flapping(cluster, 2).await
}

async fn flapping(mut cluster: TestCluster, controllers: usize) -> anyhow::Result<()> {
    use barrage_client::{Event, Subscriber, SubscriberOptions};
    use barrage_discovery::Role;
    for i in 1..=controllers {
        cluster.start_controller(&format!("controller-{i}")).await?;
    }
    cluster.start_node("node-1").await?;
    cluster.start_manager("manager-1").await?;
    let api = cluster.push_client().await?;
    let ws = cluster.nodes[0].ws_url();
    let d = within(T, "discovery", cluster.discovery()).await??;
    let key = d.key(Role::ConnectNode, "node-1");
    let flapping = Duration::from_millis(2500);

    /// The streams pushed to: a room, and broadcasts (which no session
    /// change names, and whose owner may be another controller).
    const STREAMS: [&str; 2] = ["room:flap", "broadcast"];

    /// Follows one subscriber until the message "last" on every stream;
    /// returns, per stream, the seq it started after and every seq it got.
    /// Says on `up` when it connected. (Bounded as a whole where it is
    /// awaited.)
    async fn follow(
        ws: String,
        user: String,
        up: tokio::sync::mpsc::UnboundedSender<()>,
    ) -> anyhow::Result<BTreeMap<String, (u64, Vec<u64>)>> {
        let mut opts = SubscriberOptions::new(&ws, &user, &["flap"]);
        opts.min_backoff = Duration::from_millis(20);
        let mut sub = Subscriber::connect(opts).await?;
        let mut got: BTreeMap<String, (u64, Vec<u64>)> = BTreeMap::new();
        let mut done = 0;
        loop {
            match sub.next_event().await? {
                Event::Connected { session, recovered } => {
                    ensure!(
                        recovered.values().all(|ok| *ok),
                        "{user}: not recovered: {recovered:?}"
                    );
                    if got.is_empty() {
                        for s in STREAMS {
                            got.insert(s.to_owned(), (session.streams[s].seq, Vec::new()));
                        }
                        let _ = up.send(());
                    }
                }
                Event::Message(m) => {
                    let stream = got.get_mut(&m.stream).context("a stream pushed to")?;
                    stream.1.push(m.seq);
                    if m.data == Some("last".into()) {
                        done += 1;
                        if done == STREAMS.len() {
                            return Ok(got);
                        }
                    }
                }
                Event::Disconnected { .. } => {}
            }
        }
    }

    let (up, mut connected) = tokio::sync::mpsc::unbounded_channel();
    let mut subscribers = vec![tokio::spawn(follow(ws.clone(), "sub-0".into(), up.clone()))];
    let pushes = {
        let mut api = api.clone();
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + flapping + Duration::from_millis(300);
            let mut unrouted = 0;
            while tokio::time::Instant::now() < end {
                let r = within(T, "PushToRoom", api.push_to_room(room_push("flap", "p")))
                    .await??
                    .into_inner();
                if r.delivered_count == 0 {
                    unrouted += 1;
                }
                let broadcast = BroadcastRequest {
                    content: "p".into(),
                    ..Default::default()
                };
                within(T, "Broadcast", api.broadcast(broadcast)).await??;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            anyhow::Ok(unrouted)
        })
    };
    let mut nodes = within(T, "a discovery watch", d.watch(Role::ConnectNode)).await??;
    let end = tokio::time::Instant::now() + flapping;
    let mut episodes = 0;
    for delay in [0u64, 120, 40, 250, 80].into_iter().cycle() {
        if tokio::time::Instant::now() >= end {
            break;
        }
        // Wait until the node is back, let it stay a little, delete again.
        within(T, "node-1 back in discovery", async {
            while !nodes.current().contains_key("node-1") {
                nodes.changed().await?;
            }
            anyhow::Ok(())
        })
        .await??;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let user = format!("sub-{episodes}-a");
        subscribers.push(tokio::spawn(follow(ws.clone(), user, up.clone())));
        within(T, "delete node-1's key", d.backend().delete(&key)).await??;
        episodes += 1;
        tokio::time::sleep(Duration::from_millis(30)).await;
        let user = format!("sub-{episodes}-b");
        subscribers.push(tokio::spawn(follow(ws.clone(), user, up.clone())));
    }
    let unrouted = within(T, "pushes", pushes).await???;
    tracing::info!(episodes, unrouted, "flapping done");
    ensure!(unrouted > 0, "no push fell into a window out of discovery");
    // Every subscriber has a position before "last" is pushed.
    for _ in 0..subscribers.len() {
        within(T, "a subscriber to connect", connected.recv()).await?;
    }
    let mut api = api.clone();
    within(T, "PushToRoom", api.push_to_room(room_push("flap", "last"))).await??;
    let last = BroadcastRequest {
        content: "last".into(),
        ..Default::default()
    };
    within(T, "Broadcast", api.broadcast(last)).await??;
    for s in subscribers {
        let got = within(Duration::from_secs(30), "a subscriber", s).await???;
        for (stream, (start, seqs)) in got {
            let last = *seqs.last().context("no message")?;
            let want: Vec<u64> = (start + 1..=last).collect();
            assert_eq!(
                seqs, want,
                "{stream}: every message after {start}, in order, once"
            );
        }
    }
    Ok(())
}

on_both_registries!(push_manager_started_after_the_nodes_discovers_them);
async fn push_manager_started_after_the_nodes_discovers_them(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start_controller("controller-1").await?;
    cluster.start_node("node-1").await?;
    cluster.start_node("node-2").await?;
    let mut a = connect(&cluster.nodes[0].ws_url(), "a", &["late"]).await?;
    let mut b = connect(&cluster.nodes[1].ws_url(), "b", &["late"]).await?;
    cluster.start_manager("manager-1").await?;
    eventually(T, "the late push-manager to pool both nodes", || async {
        cluster.managers[0]
            .metrics()
            .contains("push_manager_node_connections 2")
            .then_some(())
    })
    .await?;
    let mut api = cluster.push_client().await?;
    let resp = within(T, "PushToRoom", api.push_to_room(room_push("late", "x")))
        .await??
        .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.delivered_count, 2);
    next_msg(&mut a).await?;
    next_msg(&mut b).await?;
    Ok(())
}

on_both_registries!(join_and_leave_frames_change_what_arrives);
async fn join_and_leave_frames_change_what_arrives(mut cluster: TestCluster) -> anyhow::Result<()> {
    cluster.start(1).await?;
    let mut c = connect(&cluster.nodes[0].ws_url(), "zoe", &[]).await?;
    let mut api = cluster.push_client().await?;
    within(T, "join", c.join("lobby")).await??;
    // `joined` was seen: a push issued now reaches the connection.
    let resp = within(T, "PushToRoom", api.push_to_room(room_push("lobby", "1")))
        .await??
        .into_inner();
    assert_eq!(resp.delivered_count, 1);
    assert_eq!(next_msg(&mut c).await?.data, Some(serde_json::json!(1)));
    within(T, "leave", c.leave("lobby")).await??;
    let resp = within(T, "PushToRoom", api.push_to_room(room_push("lobby", "2")))
        .await??
        .into_inner();
    assert_eq!(resp.delivered_count, 0);
    assert!(
        resp.success,
        "an empty room is not an error: {}",
        resp.message
    );
    // The next message zoe gets is the one addressed to her, not "2".
    let resp = within(
        T,
        "PushToUser",
        api.push_to_user(PushToUserRequest {
            user_id: "zoe".into(),
            content: "3".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert_eq!(resp.delivered_count, 1);
    assert_eq!(next_msg(&mut c).await?.data, Some(serde_json::json!(3)));
    Ok(())
}

/// `(count, sum)` of a histogram series with label `peer`.
fn peer_call_items(registry: &prometheus::Registry, peer: &str) -> (u64, f64) {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "push_manager_peer_call_items")
        .flat_map(|f| f.get_metric())
        .find(|m| m.get_label().iter().any(|l| l.value() == peer))
        .map_or((0, 0.0), |m| {
            let h = m.get_histogram();
            (h.get_sample_count(), h.get_sample_sum())
        })
}

on_both_registries!(concurrent_pushes_share_calls_and_each_gets_its_own_answer);
async fn concurrent_pushes_share_calls_and_each_gets_its_own_answer(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start_controller("controller-1").await?;
    cluster.start_node("node-1").await?;
    cluster.start_node("node-2").await?;
    // One call in flight per peer: pushes arriving meanwhile are merged.
    cluster
        .start_manager_with("manager-1", |c| c.peer_calls_in_flight = 1)
        .await?;
    const USERS: usize = 10;
    const PER_USER: usize = 20;
    let mut clients = Vec::new();
    for u in 0..USERS {
        let url = cluster.nodes[u % 2].ws_url();
        clients.push(connect(&url, &format!("u{u}"), &[]).await?);
    }
    let api = cluster.push_client().await?;
    let pushes = (0..USERS * PER_USER).map(|i| {
        let mut api = api.clone();
        async move {
            api.push_to_user(PushToUserRequest {
                user_id: format!("u{}", i % USERS),
                content: format!("m{i}"),
                ..Default::default()
            })
            .await
        }
    });
    let answers = within(T, "concurrent pushes", futures::future::join_all(pushes)).await?;
    for (i, a) in answers.into_iter().enumerate() {
        let a = a?.into_inner();
        ensure!(a.success, "push {i}: {}", a.message);
        assert_eq!(a.delivered_count, 1, "push {i}: {}", a.message);
    }
    // Every user gets each of its messages once, in stream order.
    for (u, c) in clients.iter_mut().enumerate() {
        let mut got = Vec::new();
        let mut seqs = Vec::new();
        for _ in 0..PER_USER {
            let m = next_msg(c).await?;
            seqs.push(m.seq);
            got.push(m.data.and_then(|d| d.as_str().map(str::to_owned)));
        }
        got.sort();
        let mut want: Vec<_> = (0..PER_USER)
            .map(|k| Some(format!("m{}", u + k * USERS)))
            .collect();
        want.sort();
        assert_eq!(got, want, "user u{u}");
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "u{u}: {seqs:?}");
    }
    // Fewer calls than pushes on both hops, every push carried once.
    let registry = &cluster.managers[0].registry;
    for peer in ["controller", "connect-node"] {
        let (calls, items) = peer_call_items(registry, peer);
        assert_eq!(items, (USERS * PER_USER) as f64, "{peer}");
        assert!(
            calls < (USERS * PER_USER) as u64,
            "{peer}: {calls} calls for {items} pushes"
        );
    }
    Ok(())
}

on_both_registries!(resolve_batch_answers_each_request_on_its_own);
async fn resolve_batch_answers_each_request_on_its_own(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    use barrage_proto::v1::{ResolveBatchRequest, ResolveRequest, ResolveTarget, resolve_result};
    cluster.start(1).await?;
    let _member = connect(&cluster.nodes[0].ws_url(), "u1", &["r1"]).await?;
    let mut controller = controller_at(&cluster.controllers[0].grpc_addr.to_string()).await?;
    let request = |key: &str, id: &str| ResolveRequest {
        targets: vec![ResolveTarget { key: key.into() }],
        message_id: id.into(),
        body: None,
        ..Default::default()
    };
    eventually(T, "u1 known to the controller", || {
        let mut controller = controller.clone();
        let probe = ResolveBatchRequest {
            requests: vec![request("user:u1", "probe")],
        };
        async move {
            let r = controller.resolve_batch(probe).await.ok()?.into_inner();
            match &r.results.first()?.outcome {
                Some(resolve_result::Outcome::Resolved(r)) => {
                    (!r.targets.first()?.node_ids.is_empty()).then_some(())
                }
                _ => None,
            }
        }
    })
    .await?;
    let r = within(
        T,
        "ResolveBatch",
        controller.resolve_batch(ResolveBatchRequest {
            requests: vec![
                request("room:r1", "a"),
                request("not a key", "b"),
                request("user:u1", "c"),
            ],
        }),
    )
    .await??
    .into_inner();
    assert_eq!(r.results.len(), 3);
    let outcomes: Vec<_> = r.results.into_iter().map(|r| r.outcome).collect();
    match &outcomes[0] {
        Some(resolve_result::Outcome::Resolved(r)) => {
            assert_eq!(r.targets[0].key, "room:r1");
            assert_eq!(r.targets[0].node_ids, vec!["node-1".to_owned()]);
        }
        other => panic!("room:r1 not resolved: {other:?}"),
    }
    match &outcomes[1] {
        Some(resolve_result::Outcome::Error(e)) => {
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32);
            assert!(e.message.contains("targets.key"), "{}", e.message);
        }
        other => panic!("a bad key was not refused: {other:?}"),
    }
    match &outcomes[2] {
        Some(resolve_result::Outcome::Resolved(r)) => {
            assert_eq!(r.targets[0].node_ids, vec!["node-1".to_owned()]);
        }
        other => panic!("user:u1 not resolved: {other:?}"),
    }
    Ok(())
}

on_both_registries!(complete_batch_records_each_result);
async fn complete_batch_records_each_result(mut cluster: TestCluster) -> anyhow::Result<()> {
    use barrage_proto::v1::{CompleteBatchRequest, CompleteRequest, ResolveRequest, ResolveTarget};
    cluster.start(1).await?;
    let _member = connect(&cluster.nodes[0].ws_url(), "u1", &["r1", "r2"]).await?;
    let mut controller = controller_at(&cluster.controllers[0].grpc_addr.to_string()).await?;
    let resolve = |key: &str, id: &str| ResolveRequest {
        targets: vec![ResolveTarget { key: key.into() }],
        message_id: id.into(),
        body: None,
        ..Default::default()
    };
    for (key, id) in [("room:r1", "a"), ("user:u1", "b"), ("room:r2", "c")] {
        within(T, "Resolve", controller.resolve(resolve(key, id))).await??;
    }
    let record = |key: &str, id: &str, delivered| CompleteRequest {
        key: key.into(),
        message_id: id.into(),
        delivered,
        ..Default::default()
    };
    within(
        T,
        "CompleteBatch",
        controller.complete_batch(CompleteBatchRequest {
            completions: vec![
                record("room:r1", "a", 3),
                record("user:u1", "b", 7),
                // Unknown ids and keys are ignored, not errors.
                record("room:r1", "never-pushed", 1),
                record("room:nowhere", "x", 1),
            ],
        }),
    )
    .await??;
    // A repeat is answered with what was recorded for it, or 0 without a record.
    for (key, id, want) in [
        ("room:r1", "a", 3),
        ("user:u1", "b", 7),
        ("room:r2", "c", 0),
    ] {
        let again = within(T, "Resolve again", controller.resolve(resolve(key, id)))
            .await??
            .into_inner();
        let t = &again.targets[0];
        assert!(t.duplicate, "{key} {id}: {t:?}");
        assert_eq!(t.first_delivered, want, "{key} {id}");
    }
    Ok(())
}

on_both_registries!(results_of_concurrent_repeatable_pushes_are_all_recorded);
async fn results_of_concurrent_repeatable_pushes_are_all_recorded(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    cluster.start(1).await?;
    const USERS: usize = 30;
    let mut clients = Vec::new();
    for u in 0..USERS {
        clients.push(connect(&cluster.nodes[0].ws_url(), &format!("r{u}"), &[]).await?);
    }
    let api = cluster.push_client().await?;
    let push = |u: usize| {
        let mut api = api.clone();
        async move {
            api.push_to_user(PushToUserRequest {
                user_id: format!("r{u}"),
                content: format!("m{u}"),
                message_id: format!("id-{u}"),
                ..Default::default()
            })
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let first = within(
        T,
        "concurrent pushes",
        futures::future::join_all((0..USERS).map(push)),
    )
    .await?;
    for (u, a) in first.into_iter().enumerate() {
        let a = a?;
        assert_eq!(
            (a.delivered_count, a.duplicate),
            (1, false),
            "r{u}: {}",
            a.message
        );
    }
    for c in &mut clients {
        next_msg(c).await?;
    }
    // Each result is recorded (gathered into few calls): every retry is
    // answered with its first attempt's count and delivers nothing.
    for u in 0..USERS {
        let retry = eventually(T, "the recorded first result", || async move {
            let r = push(u).await.ok()?;
            (r.duplicate && r.delivered_count == 1).then_some(r)
        })
        .await?;
        assert!(retry.success, "r{u}: {}", retry.message);
    }
    let m = cluster.managers[0].metric("push_manager_completions_dropped_total");
    assert_eq!(m, 0.0);
    // The next message each user gets is a fresh one: no retry reached them.
    for (u, c) in clients.iter_mut().enumerate() {
        let mut api = api.clone();
        let req = PushToUserRequest {
            user_id: format!("r{u}"),
            content: "after".into(),
            ..Default::default()
        };
        within(T, "push", api.push_to_user(req)).await??;
        let m = next_msg(c).await?;
        assert_eq!(m.data, Some("after".into()), "r{u} got a repeat first");
    }
    Ok(())
}

/// The real controller service behind a router that does not know one of
/// its calls, as a controller from before that call would answer; it
/// counts the calls it refused.
#[derive(Clone)]
struct Without<S> {
    path: &'static str,
    inner: S,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Without<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Without<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if req.uri().path() == self.path {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let refused =
                tonic::Status::unimplemented(format!("unknown method {}", self.path)).into_http();
            return Box::pin(async move { Ok(refused) });
        }
        Box::pin(self.inner.call(req))
    }
}

/// A standalone controller (the real service) on 127.0.0.1 that refuses
/// `path` as unknown: its address, its count of refusals, and the stop of
/// its server.
async fn controller_without(
    path: &'static str,
) -> anyhow::Result<(
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
)> {
    use barrage_controller::ControllerService;
    use barrage_controller::ownership::Ownership;
    use barrage_controller::state::{ControllerState, Membership};
    use barrage_controller::streams::{StreamConfig, Streams};
    use barrage_proto::v1::controller_server::ControllerServer;

    let state = std::sync::Arc::new(parking_lot::Mutex::new(ControllerState {
        members: Membership::new(),
        streams: Streams::new(StreamConfig::default()),
        ownership: Ownership::standalone("old-controller"),
    }));
    let metrics = barrage_controller::Metrics::new(&prometheus::Registry::new())?;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let service = Without {
        path,
        inner: ControllerServer::new(ControllerService::new(state, metrics)),
        refused: refused.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                stop.cancelled_owned(),
            )
    });
    Ok((addr, refused, stop, server))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_a_controller_without_resolve_batch_one_by_one() -> anyhow::Result<()> {
    use barrage_discovery::{Member, Members, Role};
    use barrage_proto::coalesce::BatchLimits;
    use barrage_proto::v1::{ResolveRequest, ResolveTarget};
    use barrage_push_manager::pool::{ControllerRing, Dialer};

    let (addr, refused, stop, server) =
        controller_without("/barrage.v1.Controller/ResolveBatch").await?;
    // One call in flight: the requests queued behind it go out together.
    let ring = ControllerRing::new(
        16,
        Dialer {
            connect_timeout: T,
            call_timeout: T,
            tls: barrage_proto::GrpcTls::plaintext(),
            batching: BatchLimits {
                max_in_flight: 1,
                max_items: 64,
                max_bytes: 1 << 20,
            },
            call_items: prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new("items", "items per call"),
                &["peer"],
            )?,
            local: barrage_proto::LocalPeers::default(),
        },
    );
    let member = Member {
        id: "old-controller".into(),
        role: Role::Controller,
        grpc_addr: addr.to_string(),
        http_addr: String::new(),
        ws_addr: None,
    };
    ring.rebuild(&Members::from([(member.id.clone(), member)]));
    let (_, resolver) = ring
        .resolver("user:u")
        .context("the controller is on the ring")?;
    for wave in 0..3 {
        let calls = (0..20).map(|i| {
            let resolver = resolver.clone();
            async move {
                resolver
                    .call(ResolveRequest {
                        targets: vec![ResolveTarget {
                            key: format!("user:w{wave}u{i}"),
                        }],
                        message_id: String::new(),
                        body: None,
                        ..Default::default()
                    })
                    .await
            }
        });
        for (i, r) in within(T, "a wave of resolves", futures::future::join_all(calls))
            .await?
            .into_iter()
            .enumerate()
        {
            let resolved = r.map_err(anyhow::Error::msg)??;
            assert_eq!(resolved.targets.len(), 1, "wave {wave} request {i}");
        }
    }
    // Every wave queued requests behind a call, yet the controller was
    // asked for a ResolveBatch once: after its answer they go one by one.
    assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    stop.cancel();
    within(T, "server to stop", server).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_a_controller_without_complete_batch_one_by_one() -> anyhow::Result<()> {
    use barrage_proto::v1::{CompleteRequest, ResolveRequest, ResolveTarget};
    use barrage_push_manager::complete::Completer;

    let (addr, _, stop, server) =
        controller_without("/barrage.v1.Controller/CompleteBatch").await?;
    let mut client = controller_at(&addr.to_string()).await?;
    let resolve = |i: u32| ResolveRequest {
        targets: vec![ResolveTarget {
            key: format!("user:old{i}"),
        }],
        message_id: format!("id-{i}"),
        body: None,
        ..Default::default()
    };
    for i in 0..5 {
        within(T, "Resolve", client.resolve(resolve(i))).await??;
    }
    let completer = Completer::new(client.clone(), T, Duration::from_millis(1));
    for i in 0..5 {
        assert!(completer.record(CompleteRequest {
            key: format!("user:old{i}"),
            message_id: format!("id-{i}"),
            delivered: 10 + i,
            ..Default::default()
        }));
    }
    // Refused as a batch, then sent one by one: every result arrives.
    for i in 0..5 {
        eventually(T, "the result recorded one by one", || {
            let mut client = client.clone();
            async move {
                let again = client.resolve(resolve(i)).await.ok()?.into_inner();
                let t = again.targets.first()?;
                (t.duplicate && t.first_delivered == 10 + i).then_some(())
            }
        })
        .await?;
    }
    drop(completer);
    stop.cancel();
    within(T, "server to stop", server).await???;
    Ok(())
}

/// A push-manager that drains sends the results still queued at once,
/// without waiting out the gathering time: a result that never reaches
/// its controller makes a retry send the message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushing_a_completer_sends_what_is_queued_at_once() -> anyhow::Result<()> {
    use barrage_proto::v1::{CompleteRequest, ResolveRequest, ResolveTarget};
    use barrage_push_manager::complete::Completer;

    let (addr, _, stop, server) = controller_without("/barrage.v1.Controller/None").await?;
    let mut client = controller_at(&addr.to_string()).await?;
    let resolve = |i: u32| ResolveRequest {
        targets: vec![ResolveTarget {
            key: format!("user:q{i}"),
        }],
        message_id: format!("id-{i}"),
        resend_after_ms: 60_000,
        ..Default::default()
    };
    for i in 0..3 {
        within(T, "Resolve", client.resolve(resolve(i))).await??;
    }
    // Records would wait a minute for others to join them.
    let completer = Completer::new(client.clone(), T, Duration::from_secs(60));
    for i in 0..3 {
        assert!(completer.record(CompleteRequest {
            key: format!("user:q{i}"),
            message_id: format!("id-{i}"),
            delivered: 20 + i,
            ..Default::default()
        }));
    }
    within(T, "the flush", completer.flush()).await?;
    for i in 0..3 {
        let again = within(T, "Resolve again", client.resolve(resolve(i)))
            .await??
            .into_inner();
        let t = &again.targets[0];
        assert!(t.duplicate && t.first_completed && !t.under_way, "{t:?}");
        assert_eq!(t.first_delivered, 20 + i);
    }
    stop.cancel();
    within(T, "server to stop", server).await???;
    Ok(())
}

on_both_registries!(roles_sharing_a_process_call_each_other_directly);
/// Roles sharing a `LocalPeers` table (as in `barrage dev`) reach each
/// other's services in-process: here the controller and the node advertise
/// addresses no network call could reach, and every step of a push still
/// works.
async fn roles_sharing_a_process_call_each_other_directly(
    mut cluster: TestCluster,
) -> anyhow::Result<()> {
    let local = barrage_proto::LocalPeers::default();
    // `.invalid` never resolves, so only the table leads to these roles.
    const CONTROLLER: &str = "controller-1.invalid:50052";
    const NODE: &str = "node-1.invalid:50051";
    const MANAGER: &str = "manager-1.invalid:50053";
    cluster
        .start_controller_with("controller-1", |c| {
            c.advertise_addr = CONTROLLER.into();
            c.local_peers = local.clone();
        })
        .await?;
    cluster
        .start_node_with("node-1", |c| {
            c.advertise_addr = NODE.into();
            c.local_peers = local.clone();
            // Comments are published through the push-manager, which
            // starts after this node.
            c.publish = Some(barrage_connect_node::publish::PublishSettings::open(
                MANAGER,
                vec!["r1".into()],
            ));
        })
        .await?;
    cluster
        .start_manager_with("manager-1", |c| {
            c.advertise_addr = MANAGER.into();
            c.local_peers = local.clone();
        })
        .await?;
    let url = cluster.nodes[0].ws_url();
    // The node reports this session to the controller in-process.
    let mut alice = connect(&url, "alice", &["r1"]).await?;
    let mut api = cluster.push_client().await?;

    let resp = within(
        T,
        "PushToUser",
        api.push_to_user(PushToUserRequest {
            user_id: "alice".into(),
            content: "direct".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.delivered_count, 1);
    let m = next_msg(&mut alice).await?;
    assert_eq!(
        (m.stream.as_str(), m.data),
        ("user:alice", Some(serde_json::json!("direct")))
    );

    let resp = within(T, "PushToRoom", api.push_to_room(room_push("r1", "room")))
        .await??
        .into_inner();
    ensure!(resp.success, "{}", resp.message);
    assert_eq!(resp.delivered_count, 1);
    assert_eq!(next_msg(&mut alice).await?.stream, "room:r1");

    let where_ = within(
        T,
        "GetUserNode",
        api.get_user_node(GetUserNodeRequest {
            user_id: "alice".into(),
        }),
    )
    .await??
    .into_inner();
    assert_eq!(where_.connection_count, 1);

    // A comment goes from the node to the push-manager in-process.
    alice
        .send(&barrage_protocol::ClientFrame::Publish {
            room: "r1".into(),
            data: serde_json::json!({"text": "hello"}),
            reference: Some("c1".into()),
        })
        .await?;
    let mut acked = false;
    while !acked {
        match within(T, "publish answer", alice.next_frame()).await?? {
            Some(barrage_protocol::ServerFrame::Ack { room, .. }) => {
                assert_eq!(room, "r1");
                acked = true;
            }
            Some(barrage_protocol::ServerFrame::Rejected { message, .. }) => {
                anyhow::bail!("comment rejected: {message}")
            }
            Some(_) => {}
            None => anyhow::bail!("closed"),
        }
    }

    // A stopped role leaves the table with its gRPC port.
    let timeout = Duration::from_secs(1);
    ensure!(
        local.get(NODE, timeout).is_some(),
        "the node is in the table"
    );
    cluster.node("node-1")?.stop().await?;
    ensure!(
        local.get(NODE, timeout).is_none(),
        "the stopped node left it"
    );
    ensure!(local.get(CONTROLLER, timeout).is_some());
    ensure!(local.get(MANAGER, timeout).is_some());
    cluster.managers[0].stop().await?;
    ensure!(
        local.get(MANAGER, timeout).is_none(),
        "the stopped push-manager left it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_sync_over_grpcs_default_size_limit_is_applied() -> anyhow::Result<()> {
    // A connect-node holding 50,000 users with UUID ids, all in one room:
    // its full sync is about 6 MiB, over the 4 MiB gRPC decodes by default.
    use barrage_proto::v1::{KeyState, ResolveRequest, ResolveTarget, SyncRequest};
    use prost::Message as _;
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster.start_manager("m").await?;
    let users: Vec<String> = (0..50_000u32)
        .map(|i| format!("{i:08x}-0000-4000-8000-{:012x}", u64::from(i) * 7919))
        .collect();
    let mut keys: Vec<KeyState> = users
        .iter()
        .map(|u| KeyState {
            key: format!("user:{u}"),
            users: [(u.clone(), 1)].into(),
        })
        .collect();
    keys.push(KeyState {
        key: "room:crowd".into(),
        users: users.iter().map(|u| (u.clone(), 1)).collect(),
    });
    let sync = SyncRequest {
        node_id: "big-node".into(),
        incarnation: "1".into(),
        seq: 0,
        full: true,
        keys,
        grpc_addr: "127.0.0.1:9".into(),
        ring_id: barrage_discovery::ring::ring_id(["c"]),
        ..Default::default()
    };
    ensure!(sync.encoded_len() > 4 << 20, "{} bytes", sync.encoded_len());
    let mut controller = controller_at(&cluster.controllers[0].grpc_addr.to_string()).await?;
    within(T, "Sync", controller.sync(sync)).await??;

    let resolved = within(
        T,
        "Resolve",
        controller.resolve(ResolveRequest {
            targets: vec![ResolveTarget {
                key: format!("user:{}", users[49_999]),
            }],
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert_eq!(resolved.targets[0].node_ids, vec!["big-node".to_string()]);
    let mut api = cluster.push_client().await?;
    let room = within(
        T,
        "GetRoomInfo",
        api.get_room_info(GetRoomInfoRequest {
            room_id: "crowd".into(),
        }),
    )
    .await??
    .into_inner();
    assert_eq!((room.member_count, room.connection_count), (50_000, 50_000));
    Ok(())
}

/// Pushes from the fan-out itself (`connect_node::direct`) and frames
/// queued to the connection's task, interleaved on one connection: every
/// message arrives once, whole, in stream order, with the connection's
/// replies between them; with `DIRECT_WRITES` off, none is written
/// directly and the same holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_written_by_the_fan_out_and_by_the_task_keep_their_order() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    for direct in [true, false] {
        let mut cluster = TestCluster::in_process();
        cluster.start_controller("controller-1").await?;
        cluster
            .start_node_with("node-1", |c| c.direct_writes = direct)
            .await?;
        cluster.start_manager("manager-1").await?;
        let url = cluster.nodes[0].ws_url();
        let mut reader = connect(&url, "reader", &["small"]).await?;
        let mut api = cluster.push_client().await?;
        const N: usize = 200;
        // Content of up to 20,000 bytes: the larger messages go through
        // the queue (and in fragments), the rest may be written directly.
        let content = |i: usize| format!("{i:06}").repeat(1 + (i * 97) % 3_333);
        for i in 0..N {
            let push = async {
                if i % 2 == 0 {
                    api.push_to_user(PushToUserRequest {
                        user_id: "reader".into(),
                        content: content(i),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().success)
                } else {
                    api.push_to_room(room_push("small", &content(i)))
                        .await
                        .map(|r| r.into_inner().success)
                }
            };
            ensure!(within(T, "push", push).await??, "push {i} failed");
            if i % 50 == 25 {
                // A reply of the connection's own, between the pushes.
                within(T, "join", reader.join(&format!("extra-{i}"))).await??;
            }
        }
        let mut last = std::collections::HashMap::new();
        for i in 0..N {
            let m = next_msg(&mut reader).await?;
            assert_eq!(
                m.data,
                Some(serde_json::json!(content(i))),
                "message {i} (direct writes {direct})"
            );
            let prev = last.insert(m.stream.clone(), m.seq);
            if let Some(prev) = prev {
                assert_eq!(m.seq, prev + 1, "{} in order", m.stream);
            }
        }
        let node = &cluster.nodes[0];
        let written = node.metric("connect_node_frames_written_direct_total");
        let delivered = node.metric("connect_node_frames_delivered_total");
        assert_eq!(delivered, N as f64);
        if direct {
            assert!(written > 0.0, "some frames were written directly");
            assert!(written < delivered, "the large ones were queued");
        } else {
            assert_eq!(written, 0.0);
        }
    }
    Ok(())
}

/// A room large enough for its fan-out to be split over threads
/// (`connect_node::fanout`): every member gets every message once, in
/// order, written straight to its socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_room_written_by_several_threads_gets_every_message_in_order() -> anyhow::Result<()>
{
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("controller-1").await?;
    cluster
        .start_node_with("node-1", |c| c.max_connections_per_user = 1)
        .await?;
    cluster.start_manager("manager-1").await?;
    let url = cluster.nodes[0].ws_url();
    const MEMBERS: usize = barrage_connect_node::fanout::MIN_PART * 3;
    const PUSHES: usize = 20;
    let mut members = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        members.push(connect(&url, &format!("m{i}"), &["big"]).await?);
    }
    let mut api = cluster.push_client().await?;
    for i in 0..PUSHES {
        let resp = within(
            T,
            "PushToRoom",
            api.push_to_room(room_push("big", &format!("n{i}"))),
        )
        .await??
        .into_inner();
        ensure!(resp.success, "{}", resp.message);
        assert_eq!(resp.delivered_count, MEMBERS as u32);
    }
    for (k, m) in members.iter_mut().enumerate() {
        for i in 0..PUSHES {
            let got = next_msg(m).await?;
            assert_eq!(
                got.data,
                Some(serde_json::json!(format!("n{i}"))),
                "member {k}"
            );
            assert_eq!(got.seq, i as u64 + 1, "member {k}");
        }
    }
    let written = cluster.nodes[0].metric("connect_node_frames_written_direct_total");
    assert!(written > 0.0, "frames were written by the fan-out");
    Ok(())
}

/// Users of two controllers in an in-process cluster: `here` belongs to
/// controller-1 and has a connection (`client`); `away` belongs to
/// "ghost", a controller registered with nothing listening at its address,
/// which never answers until it leaves (`ghost.deregister()`).
struct HalfResolved {
    cluster: TestCluster,
    api: barrage_proto::v1::push_manager_client::PushManagerClient<Channel>,
    here: String,
    away: String,
    client: Client,
    ghost: barrage_discovery::Registration,
}

async fn half_resolved() -> anyhow::Result<HalfResolved> {
    use barrage_discovery::ring::{DEFAULT_VNODES, Ring};
    use barrage_discovery::{Member, Role};
    let mut cluster = TestCluster::in_process();
    cluster.start(1).await?;
    let api = cluster.push_client().await?;
    // Users owned by controller-1 and by the silent one, on the ring of both.
    let ring = Ring::new(
        [("controller-1".to_string(), ()), ("ghost".to_string(), ())],
        DEFAULT_VNODES,
    );
    let owned_by = |owner: &str| {
        (0..)
            .map(|i| format!("u{i}"))
            .find(|u| {
                ring.owner(&format!("user:{u}"))
                    .is_some_and(|(id, _)| id == owner)
            })
            .expect("some user")
    };
    let (here, away) = (owned_by("controller-1"), owned_by("ghost"));
    let client = within(
        T,
        "connect",
        Client::connect(&connect_url(&cluster.nodes[0].ws_url(), &here, &[])),
    )
    .await??;
    // A controller that never answers: registered, with nothing listening.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let ghost = cluster
        .discovery()
        .await?
        .register(
            Member {
                id: "ghost".into(),
                role: Role::Controller,
                grpc_addr: silent.to_string(),
                http_addr: String::new(),
                ws_addr: None,
            },
            Duration::from_secs(30),
        )
        .await?;
    Ok(HalfResolved {
        cluster,
        api,
        here,
        away,
        client,
        ghost,
    })
}

/// A push to users of two controllers, one of which does not answer: the
/// users of the controller that answered get it at once, the call fails
/// with UNAVAILABLE saying so, and a retry with the same message_id, once
/// the silent controller has left the ring, reaches the rest without
/// delivering it again to those it reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_resolved_push_reaches_the_answered_half_and_a_retry_the_rest() -> anyhow::Result<()>
{
    barrage_testkit::init_tracing();
    let HalfResolved {
        cluster,
        mut api,
        here,
        away,
        mut client,
        ghost,
    } = half_resolved().await?;
    let push = |content: &str| PushToUserRequest {
        user_ids: vec![here.clone(), away.clone()],
        content: content.into(),
        message_id: "half-1".into(),
        ..Default::default()
    };
    // Once the push-manager and controller-1 know the ghost (and
    // controller-1 has settled), the push is half resolved.
    let failed = eventually(T, "a half-resolved push", || {
        let mut api = api.clone();
        let req = push("half");
        async move {
            match api.push_to_user(req).await {
                Err(s) if s.message().contains("ghost") => Some(s),
                _ => None,
            }
        }
    })
    .await?;
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(
        failed
            .message()
            .contains("retry with the same message_id (\"half-1\")"),
        "{}",
        failed.message()
    );
    assert_eq!(
        failed
            .metadata()
            .get("x-message-id")
            .and_then(|v| v.to_str().ok()),
        Some("half-1"),
        "{failed:?}"
    );
    let m = within(T, "the answered half", client.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(serde_json::json!("half")));
    // The ghost leaves; the retry reaches the user it owned (offline, so
    // stored: a retry failing on another count may have stored it first)
    // and is not delivered again here.
    ghost.deregister().await;
    let retried = eventually(T, "the retry to succeed", || {
        let mut api = api.clone();
        let req = push("half");
        async move { api.push_to_user(req).await.ok() }
    })
    .await?
    .into_inner();
    assert!(retried.success, "{retried:?}");
    let mut offline = within(
        T,
        "connect",
        Client::connect(&connect_url(&cluster.nodes[0].ws_url(), &away, &[])),
    )
    .await??;
    let kept = within(T, "the stored message", offline.next_message())
        .await??
        .expect("message");
    assert_eq!(kept.data, Some(serde_json::json!("half")));
    next_is_marker(&mut api, &mut client, &here).await
}

/// The same half-resolved push without a message_id: the error names the
/// id the push was given, in its message and in `x-message-id`, and says
/// what a retry with it does; a retry with it, once the silent controller
/// has left, reaches the rest and is not delivered again to those the
/// first attempt reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_resolved_push_without_a_message_id_names_the_one_it_was_given() -> anyhow::Result<()>
{
    barrage_testkit::init_tracing();
    let HalfResolved {
        cluster,
        mut api,
        here,
        away,
        mut client,
        ghost,
    } = half_resolved().await?;
    // Every attempt has a fresh id and content of its own; those made
    // before the ghost is known reach `here` in full.
    let attempt = std::sync::atomic::AtomicU32::new(0);
    let failed = eventually(T, "a half-resolved push", || {
        let mut api = api.clone();
        let n = attempt.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = PushToUserRequest {
            user_ids: vec![here.clone(), away.clone()],
            content: format!("attempt-{n}"),
            ..Default::default()
        };
        async move {
            match api.push_to_user(req).await {
                Err(s) if s.message().contains("ghost") => Some((s, n)),
                _ => None,
            }
        }
    })
    .await?;
    let (failed, n) = failed;
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    let id = failed
        .metadata()
        .get("x-message-id")
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("no x-message-id in {failed:?}"))?
        .to_owned();
    assert!(
        failed
            .message()
            .contains(&format!("the push had no message_id and was given {id:?}"))
            && failed
                .message()
                .contains(&format!("a retry with message_id {id:?} reaches")),
        "{}",
        failed.message()
    );
    // The answered half got the message under that id.
    let content = format!("attempt-{n}");
    let reached = loop {
        let m = next_msg(&mut client).await?;
        if m.data == Some(serde_json::json!(content)) {
            break m;
        }
    };
    assert_eq!(reached.id, id);
    ghost.deregister().await;
    let retried = eventually(T, "the retry to succeed", || {
        let mut api = api.clone();
        let req = PushToUserRequest {
            user_ids: vec![here.clone(), away.clone()],
            content: content.clone(),
            message_id: id.clone(),
            ..Default::default()
        };
        async move { api.push_to_user(req).await.ok() }
    })
    .await?
    .into_inner();
    assert!(retried.success, "{retried:?}");
    assert_eq!(retried.message_id, id);
    let mut offline = within(
        T,
        "connect",
        Client::connect(&connect_url(&cluster.nodes[0].ws_url(), &away, &[])),
    )
    .await??;
    let kept = within(T, "the stored message", offline.next_message())
        .await??
        .expect("message");
    assert_eq!((kept.id, kept.data), (id, Some(serde_json::json!(content))));
    next_is_marker(&mut api, &mut client, &here).await
}

/// API calls whose callers stop waiting are counted all the same, with the
/// time they ran: one whose deadline passed as DEADLINE_EXCEEDED, one its
/// caller cancelled as CANCELLED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_their_callers_give_up_on_are_counted() -> anyhow::Result<()> {
    use barrage_discovery::{Member, Role};
    use barrage_testkit::cluster::metric;
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    // The one controller takes connections and never answers: every push
    // waits for it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let _silent = cluster
        .discovery()
        .await?
        .register(
            Member {
                id: "silent".into(),
                role: Role::Controller,
                grpc_addr: silent.local_addr()?.to_string(),
                http_addr: String::new(),
                ws_addr: None,
            },
            Duration::from_secs(30),
        )
        .await?;
    cluster.start_manager("manager-1").await?;
    let registry = cluster.managers[0].registry.clone();
    let mut api = cluster.push_client().await?;
    let counted = |status: &'static str| {
        let registry = registry.clone();
        move || {
            let series =
                format!(r#"push_manager_api_requests_total{{api="PushToRoom",status="{status}"}}"#);
            let n = metric(&registry, &series);
            async move { (n > 0.0).then_some(n) }
        }
    };

    let deadline = Duration::from_millis(300);
    let mut req = tonic::Request::new(room_push("r1", "late"));
    req.set_timeout(deadline);
    let late = within(T, "a push past its deadline", api.push_to_room(req)).await?;
    assert!(late.is_err(), "{late:?}");
    let n = eventually(
        T,
        "the call past its deadline counted",
        counted("DEADLINE_EXCEEDED"),
    )
    .await?;
    assert_eq!(n, 1.0);
    let took = metric(
        &registry,
        r#"push_manager_api_duration_seconds_sum{api="PushToRoom"}"#,
    );
    assert!(took >= 0.25, "the call ran {took} s");

    // The caller gives up with no deadline given: its call is cancelled.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(200),
        api.push_to_room(room_push("r1", "x")),
    )
    .await;
    assert!(gave_up.is_err(), "the push waits for the silent controller");
    let n = eventually(T, "the cancelled call counted", counted("CANCELLED")).await?;
    assert_eq!(n, 1.0);
    let calls = metric(
        &registry,
        r#"push_manager_api_duration_seconds_count{api="PushToRoom"}"#,
    );
    assert_eq!(calls, 2.0);
    let late = r#"push_manager_api_requests_total{api="PushToRoom",status="DEADLINE_EXCEEDED"}"#;
    assert_eq!(metric(&registry, late), 1.0);
    Ok(())
}

/// A connect-node that leaves while a push to it is under way takes its
/// per-node series with it: the push ending afterwards does not bring
/// them back for a node that is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_leaves_during_a_push_leaves_no_series_behind() -> anyhow::Result<()> {
    use barrage_testkit::cluster::metric;
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("controller-1").await?;
    // The push-manager reaches node-1 at an address where connections are
    // held until the test lets them go.
    let held = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = held.local_addr()?.to_string();
    cluster
        .start_node_with("node-1", |c| c.advertise_addr = addr)
        .await?;
    cluster.start_manager("manager-1").await?;
    let registry = cluster.managers[0].registry.clone();
    let _leaver = connect(&cluster.nodes[0].ws_url(), "leaver", &[]).await?;
    let api = cluster.push_client().await?;
    placed(&api, "leaver", "node-1").await?;
    let push = tokio::spawn({
        let mut api = api.clone();
        async move {
            api.push_to_user(PushToUserRequest {
                user_id: "leaver".into(),
                content: "x".into(),
                ..Default::default()
            })
            .await
        }
    });
    let (to_node, _) = within(T, "the push to reach node-1", held.accept()).await??;
    cluster.node("node-1")?.stop().await?;
    eventually(T, "the push-manager to drop node-1", || {
        let pooled = metric(&registry, "push_manager_node_connections");
        async move { (pooled == 0.0).then_some(()) }
    })
    .await?;
    // node-1 is gone: the push's call to it fails.
    drop(to_node);
    drop(held);
    let resp = within(T, "the push", push).await???.into_inner();
    assert!(!resp.success && resp.message.contains("node-1"), "{resp:?}");
    let text = cluster.managers[0].metrics();
    assert!(
        !text.contains(r#"node="node-1""#),
        "series of node-1, which left: {text}"
    );
    Ok(())
}

/// An in-process cluster whose push-managers give up on a node (and a
/// controller) after `timeout`.
fn with_push_timeout(timeout: Duration) -> TestCluster {
    let mut cluster = TestCluster::in_process();
    cluster.set_options(barrage_testkit::cluster::ClusterOptions {
        push_timeout: timeout,
        ..Default::default()
    });
    cluster
}

/// Waits until the controller places `user` on `node`.
async fn placed(
    api: &barrage_proto::v1::push_manager_client::PushManagerClient<Channel>,
    user: &str,
    node: &str,
) -> anyhow::Result<()> {
    eventually(T, "the user known to the controller", || {
        let mut api = api.clone();
        let req = GetUserNodeRequest {
            user_id: user.into(),
        };
        async move {
            let r = api.get_user_node(req).await.ok()?.into_inner();
            r.nodes.iter().any(|n| n.node_id == node).then_some(())
        }
    })
    .await
}

/// Pushes `marker` to `user` and checks that it is the next message
/// `client` gets: nothing else (a second copy) came before it.
async fn next_is_marker(
    api: &mut barrage_proto::v1::push_manager_client::PushManagerClient<Channel>,
    client: &mut Client,
    user: &str,
) -> anyhow::Result<()> {
    let req = PushToUserRequest {
        user_id: user.into(),
        content: "marker".into(),
        ..Default::default()
    };
    within(T, "marker push", api.push_to_user(req)).await??;
    let next = next_msg(client).await?;
    ensure!(
        next.data == Some(serde_json::json!("marker")),
        "a second copy came first: {next:?}"
    );
    Ok(())
}

/// A push whose push-manager stopped (or lost the controller's answer)
/// right after the controller took it: nothing reached the nodes. A retry
/// with the same message_id that comes while that attempt may still be
/// under way is told so; one that comes later sends the message, at the
/// position the first attempt took, and it arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sends_a_push_whose_first_attempt_never_reached_the_nodes() -> anyhow::Result<()> {
    use barrage_proto::v1::{MessageBody, ResolveRequest, ResolveTarget};
    barrage_testkit::init_tracing();
    let mut cluster = with_push_timeout(Duration::from_secs(1));
    cluster.start(1).await?;
    let mut api = cluster.push_client().await?;
    let mut client = connect(&cluster.nodes[0].ws_url(), "o1", &[]).await?;
    placed(&api, "o1", "node-1").await?;
    // The first attempt: taken by the controller, then nothing more.
    let mut controller = controller_at(&cluster.controllers[0].grpc_addr.to_string()).await?;
    let taken = within(
        T,
        "Resolve",
        controller.resolve(ResolveRequest {
            targets: vec![ResolveTarget {
                key: "user:o1".into(),
            }],
            message_id: "orphan-1".into(),
            body: Some(MessageBody {
                id: "orphan-1".into(),
                event: "message".into(),
                content: "orphaned".into(),
                ..Default::default()
            }),
            // As the push-manager asks for a push with the caller's id
            // (3 x the 1 s push timeout + 1 s).
            resend_after_ms: 4000,
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    let first = &taken.targets[0];
    ensure!(first.node_ids == ["node-1"], "{first:?}");
    let push = PushToUserRequest {
        user_id: "o1".into(),
        content: "orphaned".into(),
        message_id: "orphan-1".into(),
        ..Default::default()
    };
    let early = within(T, "an early retry", api.push_to_user(push.clone()))
        .await?
        .expect_err("the first attempt may still be under way");
    assert_eq!(early.code(), tonic::Code::Aborted, "{early:?}");
    assert!(
        early.message().contains("still under way"),
        "{}",
        early.message()
    );
    // After three times the push timeout and the margin for its record:
    // sent again.
    let retried = eventually(T, "the retry to send it again", || {
        let mut api = api.clone();
        let req = push.clone();
        async move { api.push_to_user(req).await.ok() }
    })
    .await?
    .into_inner();
    assert!(retried.success && retried.duplicate, "{retried:?}");
    assert_eq!(retried.delivered_count, 1, "{retried:?}");
    assert!(
        retried.message.contains("sent again"),
        "{}",
        retried.message
    );
    let m = next_msg(&mut client).await?;
    assert_eq!(m.data, Some(serde_json::json!("orphaned")));
    assert_eq!(
        (m.id.as_str(), m.epoch, m.seq),
        ("orphan-1", first.epoch, first.seq)
    );
    // The resend recorded its result: later retries are plain repeats.
    let repeat = eventually(T, "the recorded result", || {
        let mut api = api.clone();
        let req = push.clone();
        async move { api.push_to_user(req).await.ok() }
    })
    .await?
    .into_inner();
    assert!(
        repeat.duplicate && repeat.delivered_count == 1,
        "{repeat:?}"
    );
    assert!(
        repeat.message.contains("not delivered again"),
        "{}",
        repeat.message
    );
    next_is_marker(&mut api, &mut client, "o1").await?;
    let resends = cluster.controllers[0].metric("controller_push_resends_total");
    assert_eq!(resends, 1.0);
    Ok(())
}

/// A push that could not reach the only node hosting its user: the call
/// fails naming the node, and a retry with the same message_id, once the
/// node is reachable again, sends it there, and it arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_sends_a_push_again_to_the_node_it_failed_on() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = with_push_timeout(Duration::from_secs(2));
    // The node's gRPC is reached through a proxy that closes every
    // connection until it is told where to forward them.
    let (proxy, upstream) = refusing_proxy().await?;
    cluster.start_controller("controller-1").await?;
    cluster
        .start_node_with("node-1", |c| c.advertise_addr = proxy.clone())
        .await?;
    cluster.start_manager("manager-1").await?;
    let mut api = cluster.push_client().await?;
    let mut client = connect(&cluster.nodes[0].ws_url(), "f1", &[]).await?;
    placed(&api, "f1", "node-1").await?;
    let push = PushToUserRequest {
        user_id: "f1".into(),
        content: "held".into(),
        message_id: "failed-1".into(),
        ..Default::default()
    };
    let failed = within(T, "the first attempt", api.push_to_user(push.clone()))
        .await??
        .into_inner();
    assert!(!failed.success && !failed.duplicate, "{failed:?}");
    assert!(failed.message.contains("node-1"), "{}", failed.message);
    let _ = upstream.send(cluster.nodes[0].grpc_addr.clone());
    let retried = eventually(T, "the retry to reach the node", || {
        let mut api = api.clone();
        let req = push.clone();
        async move {
            let r = api.push_to_user(req).await.ok()?.into_inner();
            r.success.then_some(r)
        }
    })
    .await?;
    assert!(
        retried.duplicate && retried.delivered_count == 1,
        "{retried:?}"
    );
    assert!(
        retried.message.contains("sent again"),
        "{}",
        retried.message
    );
    let m = next_msg(&mut client).await?;
    assert_eq!(
        (m.id.as_str(), m.data),
        ("failed-1", Some(serde_json::json!("held")))
    );
    next_is_marker(&mut api, &mut client, "f1").await?;
    Ok(())
}

/// A TCP proxy on loopback to the address it is sent, which can be cut
/// (every connection through it closed, new ones refused) and restored.
async fn cuttable_proxy() -> anyhow::Result<(
    String,
    tokio::sync::watch::Sender<String>,
    tokio::sync::watch::Sender<bool>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (to_tx, to_rx) = tokio::sync::watch::channel(String::new());
    let (up_tx, up_rx) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !*up_rx.borrow() {
                continue;
            }
            let (mut to, mut up) = (to_rx.clone(), up_rx.clone());
            tokio::spawn(async move {
                let Ok(target) = to.wait_for(|a| !a.is_empty()).await.map(|a| a.clone()) else {
                    return;
                };
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = up.wait_for(|up| !*up) => {}
                }
            });
        }
    });
    Ok((addr, to_tx, up_tx))
}

/// A room push whose batch never reached a node leaves a gap there: the
/// next push to the room waits for it, and then the node delivers the
/// missing message from the controller's history before it, so the
/// members' positions never pass a message they did not get.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_left_by_a_failed_batch_is_filled_from_the_history() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = with_push_timeout(Duration::from_secs(2));
    let (proxy, upstream, up) = cuttable_proxy().await?;
    cluster.start_controller("controller-1").await?;
    cluster
        .start_node_with("node-1", |c| c.advertise_addr = proxy.clone())
        .await?;
    let _ = upstream.send(cluster.nodes[0].grpc_addr.clone());
    cluster.start_manager("manager-1").await?;
    let mut api = cluster.push_client().await?;
    let mut client = connect(&cluster.nodes[0].ws_url(), "g1", &["gaps"]).await?;
    let first = within(T, "m1", api.push_to_room(room_push("gaps", "m1")))
        .await??
        .into_inner();
    ensure!(first.success, "{first:?}");
    assert_eq!(next_msg(&mut client).await?.data, Some("m1".into()));
    // m2's batch cannot reach the node.
    let _ = up.send(false);
    let lost = within(T, "m2", api.push_to_room(room_push("gaps", "m2")))
        .await??
        .into_inner();
    assert!(!lost.success, "{lost:?}");
    let _ = up.send(true);
    // m3 arrives after the node is reachable again (retried under one id
    // until it is), and waits for m2, which the node takes from the history.
    let mut m3 = room_push("gaps", "m3");
    m3.message_id = "gap-m3".into();
    eventually(T, "m3 to reach the node", || {
        let mut api = api.clone();
        let req = m3.clone();
        async move {
            let r = api.push_to_room(req).await.ok()?.into_inner();
            r.success.then_some(())
        }
    })
    .await?;
    let got: Vec<_> = [next_msg(&mut client).await?, next_msg(&mut client).await?]
        .into_iter()
        .map(|m| (m.seq, m.data))
        .collect();
    assert_eq!(got, vec![(2, Some("m2".into())), (3, Some("m3".into()))]);
    // The same on the user's own stream.
    let user_push = |content: &str, id: &str| PushToUserRequest {
        user_id: "g1".into(),
        content: content.into(),
        message_id: id.into(),
        ..Default::default()
    };
    let _ = up.send(false);
    let lost = within(T, "u1", api.push_to_user(user_push("u1", "")))
        .await??
        .into_inner();
    assert!(!lost.success, "{lost:?}");
    let _ = up.send(true);
    eventually(T, "u2 to reach the node", || {
        let mut api = api.clone();
        let req = user_push("u2", "gap-u2");
        async move {
            let r = api.push_to_user(req).await.ok()?.into_inner();
            r.success.then_some(())
        }
    })
    .await?;
    let got: Vec<_> = [next_msg(&mut client).await?, next_msg(&mut client).await?]
        .into_iter()
        .map(|m| (m.stream, m.data))
        .collect();
    let user = || "user:g1".to_string();
    assert_eq!(
        got,
        vec![(user(), Some("u1".into())), (user(), Some("u2".into()))]
    );
    let node = &cluster.nodes[0];
    let filled = r#"connect_node_order_gaps_total{outcome="filled"}"#;
    assert_eq!(node.metric(filled), 2.0);
    assert_eq!(node.metric("connect_node_gap_filled_messages_total"), 2.0);
    Ok(())
}

/// A retry sent right after its first attempt answered, before that
/// attempt's result is recorded at the controller (records are gathered
/// for 5 ms), waits for the record: it is answered with the first
/// attempt's count, not "still under way", and delivers nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_right_after_the_first_answer_gets_its_result() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start(1).await?;
    let mut api = cluster.push_client().await?;
    let mut client = connect(&cluster.nodes[0].ws_url(), "q1", &[]).await?;
    placed(&api, "q1", "node-1").await?;
    for i in 0..10 {
        let push = PushToUserRequest {
            user_id: "q1".into(),
            content: format!("q{i}"),
            message_id: format!("quick-{i}"),
            ..Default::default()
        };
        let first = within(T, "push", api.push_to_user(push.clone()))
            .await??
            .into_inner();
        let again = within(T, "retry", api.push_to_user(push))
            .await??
            .into_inner();
        assert!(first.success && !first.duplicate, "{first:?}");
        assert!(again.success && again.duplicate, "{again:?}");
        assert_eq!(again.delivered_count, 1, "{again:?}");
        let m = next_msg(&mut client).await?;
        assert_eq!(m.data, Some(serde_json::json!(format!("q{i}"))));
    }
    next_is_marker(&mut api, &mut client, "q1").await
}

/// A push with a message_id whose caller goes away (its deadline passes)
/// while the push-manager waits for the controller still runs to its end:
/// the message is delivered, and a retry is answered with the recorded
/// result at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_message_id_outlives_its_callers_deadline() -> anyhow::Result<()> {
    a_push_outlives_its_callers_deadline("deadline-1").await
}

/// So does a push without one: once the controller has taken it, every
/// node hosting its targets gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_without_a_message_id_outlives_its_callers_deadline() -> anyhow::Result<()> {
    a_push_outlives_its_callers_deadline("").await
}

/// A cluster whose push-manager reaches the controller through a proxy
/// that holds each new connection for `delay` (so its first push waits
/// that long), with user `user` connected and known to the controller.
async fn slow_to_the_controller(
    delay: Duration,
    user: &str,
) -> anyhow::Result<(TestCluster, Client)> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    let (proxy, upstream) = delaying_proxy(delay).await?;
    cluster
        .start_controller_with("controller-1", |c| c.advertise_addr = proxy.clone())
        .await?;
    let _ = upstream.send(cluster.controllers[0].grpc_addr.clone());
    cluster.start_node("node-1").await?;
    cluster.start_manager("manager-1").await?;
    let client = connect(&cluster.nodes[0].ws_url(), user, &[]).await?;
    // Asked directly, so that the push-manager has not connected yet.
    let controller = controller_at(&cluster.controllers[0].grpc_addr.to_string()).await?;
    eventually(T, "the user known to the controller", || {
        let mut controller = controller.clone();
        async move {
            let r = controller
                .get_user_node(GetUserNodeRequest {
                    user_id: user.into(),
                })
                .await
                .ok()?;
            r.into_inner().online.then_some(())
        }
    })
    .await?;
    Ok((cluster, client))
}

/// Sends `push` with a deadline that passes while the push-manager still
/// waits for the controller.
async fn push_and_go_away(
    api: &mut barrage_proto::v1::push_manager_client::PushManagerClient<Channel>,
    push: PushToUserRequest,
) -> anyhow::Result<()> {
    let mut short = tonic::Request::new(push);
    short.set_timeout(Duration::from_millis(200));
    let gone = within(T, "the short call", api.push_to_user(short))
        .await?
        .expect_err("the caller's deadline passes first");
    assert!(
        matches!(
            gone.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{gone:?}"
    );
    Ok(())
}

async fn a_push_outlives_its_callers_deadline(message_id: &str) -> anyhow::Result<()> {
    let (cluster, mut client) = slow_to_the_controller(Duration::from_millis(700), "d1").await?;
    let mut api = cluster.push_client().await?;
    let push = PushToUserRequest {
        user_id: "d1".into(),
        content: "late".into(),
        message_id: message_id.into(),
        ..Default::default()
    };
    push_and_go_away(&mut api, push.clone()).await?;
    let m = next_msg(&mut client).await?;
    assert_eq!(m.data, Some(serde_json::json!("late")));
    if !message_id.is_empty() {
        assert_eq!(m.id, message_id);
        let retried = within(T, "the retry", api.push_to_user(push))
            .await??
            .into_inner();
        assert!(retried.success && retried.duplicate, "{retried:?}");
        assert_eq!(retried.delivered_count, 1, "{retried:?}");
    }
    next_is_marker(&mut api, &mut client, "d1").await
}

/// A push-manager that drains waits for the pushes whose callers went
/// away: it exits only once they have reached the nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_push_manager_finishes_pushes_whose_callers_went_away() -> anyhow::Result<()> {
    let (mut cluster, mut client) = slow_to_the_controller(Duration::from_secs(1), "d2").await?;
    let mut api = cluster.push_client().await?;
    let push = PushToUserRequest {
        user_id: "d2".into(),
        content: "drained".into(),
        ..Default::default()
    };
    push_and_go_away(&mut api, push).await?;
    let batches = "connect_node_push_batches_total";
    assert_eq!(cluster.nodes[0].metric(batches), 0.0, "still at the proxy");
    cluster.managers[0].stop().await?;
    assert_eq!(
        cluster.nodes[0].metric(batches),
        1.0,
        "the push reached the node before the push-manager exited"
    );
    let m = next_msg(&mut client).await?;
    assert_eq!(m.data, Some(serde_json::json!("drained")));
    Ok(())
}

/// A push without a message_id gets one made up, returned in its answer.
/// That push records no result, so a later push with the returned id is a
/// plain repeat at once: not "still under way", and never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_of_a_made_up_message_id_is_a_plain_repeat() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = with_push_timeout(Duration::from_secs(1));
    cluster.start(1).await?;
    let mut api = cluster.push_client().await?;
    let mut client = connect(&cluster.nodes[0].ws_url(), "m1", &[]).await?;
    placed(&api, "m1", "node-1").await?;
    let push = |message_id: String| PushToUserRequest {
        user_id: "m1".into(),
        content: "once".into(),
        message_id,
        ..Default::default()
    };
    let first = within(T, "push", api.push_to_user(push(String::new())))
        .await??
        .into_inner();
    assert!(first.success && !first.message_id.is_empty(), "{first:?}");
    next_msg(&mut client).await?;
    // At once, and after the resend wait (3 x 1 s + 1 s): plain repeats.
    for wait in [Duration::ZERO, Duration::from_millis(4200)] {
        tokio::time::sleep(wait).await;
        let again = within(
            T,
            "repeat",
            api.push_to_user(push(first.message_id.clone())),
        )
        .await??
        .into_inner();
        assert!(again.success && again.duplicate, "{again:?}");
        assert!(
            again.message.contains("not delivered again"),
            "{}",
            again.message
        );
    }
    next_is_marker(&mut api, &mut client, "m1").await
}
