//! Bad input gets a clear error and loses nothing: gRPC validation, admin
//! lookups of unknown targets, and malformed WebSocket traffic.

use std::time::Duration;

use barrage_client::{Client, Error as ClientError, connect_url};
use barrage_proto::v1::push_manager_client::PushManagerClient;
use barrage_proto::v1::{
    BroadcastRequest, GetRoomInfoRequest, GetUserNodeRequest, PushToRoomRequest, PushToUserRequest,
};
use barrage_protocol::{ClientFrame, ServerFrame};
use barrage_testkit::cluster::{TestCluster, within};
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;
use tonic::transport::Channel;

const T: Duration = Duration::from_secs(10);

async fn cluster() -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start(1).await?;
    Ok(c)
}

fn expect_invalid<T: std::fmt::Debug>(r: Result<T, tonic::Status>, field: &str) {
    let s = r.expect_err("expected INVALID_ARGUMENT");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(
        s.message().starts_with(field),
        "message {:?} should name {field}",
        s.message()
    );
}

#[tokio::test]
async fn invalid_push_requests_name_the_field() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut api = cluster.push_client().await?;
    let room = |room_id: &str, content: &str| PushToRoomRequest {
        room_id: room_id.into(),
        content: content.into(),
        ..Default::default()
    };
    expect_invalid(
        within(T, "push", api.push_to_room(room("", "x"))).await?,
        "room_id",
    );
    expect_invalid(
        within(T, "push", api.push_to_room(room(&"r".repeat(129), "x"))).await?,
        "room_id",
    );
    expect_invalid(
        within(T, "push", api.push_to_room(room("a b", "x"))).await?,
        "room_id",
    );
    expect_invalid(
        within(T, "push", api.push_to_room(room("r1", ""))).await?,
        "content",
    );
    let big = "x".repeat(64 * 1024 + 1);
    let r = within(T, "push", api.push_to_room(room("r1", &big))).await?;
    let s = r.expect_err("oversized content");
    assert!(
        s.message()
            .contains("65537 bytes exceeds the limit of 65536"),
        "{}",
        s.message()
    );
    let mut excl = room("r1", "x");
    excl.exclude_user_ids = vec!["".into()];
    expect_invalid(
        within(T, "push", api.push_to_room(excl)).await?,
        "exclude_user_ids",
    );

    let user = |user_id: &str, user_ids: Vec<String>| PushToUserRequest {
        user_id: user_id.into(),
        user_ids,
        content: "x".into(),
        ..Default::default()
    };
    expect_invalid(
        within(T, "push", api.push_to_user(user("", vec![]))).await?,
        "user_id",
    );
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    expect_invalid(
        within(T, "push", api.push_to_user(user("", many))).await?,
        "user_ids",
    );
    expect_invalid(
        within(
            T,
            "push",
            api.push_to_user(user("", vec!["ok".into(), "".into()])),
        )
        .await?,
        "user_ids",
    );
    expect_invalid(
        within(
            T,
            "push",
            api.broadcast(BroadcastRequest {
                content: "".into(),
                ..Default::default()
            }),
        )
        .await?,
        "content",
    );
    let mut long_event = room("r1", "x");
    long_event.event = "e".repeat(65);
    expect_invalid(
        within(T, "push", api.push_to_room(long_event)).await?,
        "event",
    );
    let mut long_id = room("r1", "x");
    long_id.message_id = "m".repeat(129);
    expect_invalid(
        within(T, "push", api.push_to_room(long_id)).await?,
        "message_id",
    );

    // Nothing above reached the API as a push; the metrics say so.
    let metrics = cluster.managers[0].metrics();
    assert!(
        metrics.contains(
            r#"push_manager_api_requests_total{api="PushToRoom",status="INVALID_ARGUMENT"} 8"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("push_manager_push_failed_total 0"),
        "{metrics}"
    );
    Ok(())
}

/// A push too large for the gRPC port to read at all (over 4 MiB with the
/// default limits) is refused as content over the limit is: with
/// INVALID_ARGUMENT naming `content` and the setting, and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_to_read_is_refused_naming_content() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut api = cluster.push_client().await?;
    let huge = PushToRoomRequest {
        room_id: "r1".into(),
        content: "x".repeat(5 << 20),
        ..Default::default()
    };
    let r = within(T, "push", api.push_to_room(huge)).await?;
    let s = r.as_ref().expect_err("refused");
    assert!(
        s.message()
            .contains("at most 65536 bytes (push-manager --max-content-bytes)"),
        "{s:?}"
    );
    expect_invalid(r, "content");
    let user = PushToUserRequest {
        user_id: "u1".into(),
        binary_content: vec![0; 5 << 20],
        ..Default::default()
    };
    expect_invalid(within(T, "push", api.push_to_user(user)).await?, "content");
    let metrics = cluster.managers[0].metrics();
    for api in ["PushToRoom", "PushToUser"] {
        let series = format!(
            r#"push_manager_api_requests_total{{api="{api}",status="INVALID_ARGUMENT"}} 1"#
        );
        assert!(metrics.contains(&series), "{metrics}");
    }
    // The connection serves pushes as before.
    let ok = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "r1".into(),
            content: "x".into(),
            ..Default::default()
        }),
    )
    .await?;
    assert!(ok.is_ok(), "{ok:?}");
    Ok(())
}

#[tokio::test]
async fn empty_targets_are_success_or_not_found() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut api = cluster.push_client().await?;
    let resp = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "nobody-here".into(),
            content: "x".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert!(resp.success);
    assert_eq!(resp.delivered_count, 0);
    assert!(!resp.message_id.is_empty(), "a message id is generated");

    let s = within(
        T,
        "info",
        api.get_room_info(GetRoomInfoRequest {
            room_id: "nobody-here".into(),
        }),
    )
    .await?
    .expect_err("unknown room");
    assert_eq!(s.code(), Code::NotFound);
    assert!(s.message().contains("nobody-here"), "{}", s.message());
    let s = within(
        T,
        "info",
        api.get_user_node(GetUserNodeRequest {
            user_id: "ghost".into(),
        }),
    )
    .await?
    .expect_err("unknown user");
    assert_eq!(s.code(), Code::NotFound);
    Ok(())
}

async fn connected(cluster: &TestCluster, user: &str) -> anyhow::Result<Client> {
    Ok(within(
        T,
        "connect",
        Client::connect(&connect_url(&cluster.nodes[0].ws_url(), user, &["r1"])),
    )
    .await??)
}

async fn next_frame(c: &mut Client) -> anyhow::Result<ServerFrame> {
    within(T, "frame", c.next_frame())
        .await??
        .ok_or_else(|| anyhow::anyhow!("closed"))
}

#[tokio::test]
async fn malformed_frames_get_error_frames_and_the_connection_stays() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut c = connected(&cluster, "mallory").await?;
    for bad in ["nonsense", "{}", r#"{"type":"fly"}"#, r#"{"type":"join"}"#] {
        c.send_raw(Message::Text(bad.into())).await?;
        match next_frame(&mut c).await? {
            ServerFrame::Error { code, message, .. } => {
                assert_eq!(code, "invalid_frame");
                assert!(message.contains("join | leave | ping"), "{message}");
            }
            other => panic!("expected an error frame for {bad:?}, got {other:?}"),
        }
    }
    c.send(&ClientFrame::Join {
        room: "bad room".into(),
    })
    .await?;
    assert!(
        matches!(next_frame(&mut c).await?, ServerFrame::Error { code, .. } if code == "invalid_room")
    );
    c.send(&ClientFrame::Leave {
        room: "never-joined".into(),
    })
    .await?;
    assert!(
        matches!(next_frame(&mut c).await?, ServerFrame::Error { code, .. } if code == "not_joined")
    );
    c.send(&ClientFrame::Ping).await?;
    assert_eq!(next_frame(&mut c).await?, ServerFrame::Pong);
    Ok(())
}

async fn expect_close(c: &mut Client, code: u16) -> anyhow::Result<()> {
    loop {
        match within(T, "close", c.next_frame()).await? {
            Err(ClientError::Closed { code: got, .. }) => {
                assert_eq!(got, code);
                return Ok(());
            }
            Ok(Some(_)) => continue,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_client_that_closes_gets_its_close_answered() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    for code in [1000u16, 1001, 4321] {
        let mut c = connected(&cluster, "leaving").await?;
        c.send_raw(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: code.into(),
                reason: "bye".into(),
            },
        )))
        .await?;
        // The answer echoes the client's code; a connection dropped without
        // one reads as 1006.
        match within(T, "the answer to a close", c.next_frame()).await? {
            Ok(None) if code == 1000 => {}
            Err(ClientError::Closed { code: got, .. }) if got == code && code != 1000 => {}
            other => panic!("close {code} answered with {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn binary_and_oversized_frames_close_with_documented_codes() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut bin = connected(&cluster, "b1").await?;
    bin.send_raw(Message::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()))
        .await?;
    expect_close(&mut bin, 4400).await?;

    let mut big = connected(&cluster, "b2").await?;
    big.send_raw(Message::Text("x".repeat(64 * 1024 + 10).into()))
        .await?;
    expect_close(&mut big, 1009).await?;

    // Others on the node are unaffected.
    let mut ok = connected(&cluster, "fine").await?;
    let mut api = cluster.push_client().await?;
    let resp = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "r1".into(),
            content: "still here".into(),
            ..Default::default()
        }),
    )
    .await??
    .into_inner();
    assert_eq!(resp.delivered_count, 1);
    let m = within(T, "message", ok.next_message())
        .await??
        .expect("message");
    assert_eq!(m.data, Some(serde_json::json!("still here")));
    Ok(())
}

#[tokio::test]
async fn upgrade_is_refused_with_a_reason() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster
        .start_node_with("secure", |c| c.insecure_user_id = false)
        .await?;
    cluster.start_node("open").await?;
    let secure = cluster.nodes[0].ws_url();
    let open = cluster.nodes[1].ws_url();
    match within(
        T,
        "connect",
        Client::connect(&connect_url(&secure, "u", &[])),
    )
    .await?
    {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 401);
            assert!(body.contains("INSECURE_USER_ID"), "{body}");
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    for (url, field) in [
        (format!("{open}?user_id="), "user_id"),
        (format!("{open}?user_id=a%20b"), "user_id"),
        (format!("{open}?user_id=u&rooms=ok,bad%20room"), "rooms"),
    ] {
        match within(T, "connect", Client::connect(&url)).await? {
            Err(ClientError::Refused { status, body }) => {
                assert_eq!(status, 400, "{url}");
                assert!(body.starts_with(field), "{url}: {body}");
            }
            other => panic!("expected 400 for {url}, got {:?}", other.map(|_| ())),
        }
    }
    let too_many: Vec<String> = (0..65).map(|i| format!("r{i}")).collect();
    let url = format!("{open}?user_id=u&rooms={}", too_many.join(","));
    assert!(matches!(
        within(T, "connect", Client::connect(&url)).await?,
        Err(ClientError::Refused { status: 400, .. })
    ));
    Ok(())
}

#[tokio::test]
async fn a_silent_connection_is_closed_with_4001() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster
        .start_node_with("n", |c| {
            c.insecure_user_id = true;
            c.read_timeout = Duration::from_millis(500);
            c.ping_interval = Duration::from_secs(60);
        })
        .await?;
    let mut quiet = within(
        T,
        "connect",
        Client::connect(&connect_url(&cluster.nodes[0].ws_url(), "quiet", &[])),
    )
    .await??;
    expect_close(&mut quiet, 4001).await?;
    let metrics = cluster.nodes[0].metrics();
    assert!(
        metrics.contains(r#"connect_node_disconnects_total{code="4001"} 1"#),
        "{metrics}"
    );
    Ok(())
}

/// Pushes `content` to `room` and checks that `c` receives it whole.
async fn delivered_whole(
    api: &mut PushManagerClient<Channel>,
    c: &mut Client,
    room: &str,
    content: &str,
) -> anyhow::Result<()> {
    let push = PushToRoomRequest {
        room_id: room.into(),
        content: content.into(),
        ..Default::default()
    };
    within(T, "push", api.push_to_room(push)).await??;
    let m = within(T, "the message", c.next_message())
        .await??
        .expect("a message before the connection ends");
    assert_eq!(m.data.as_ref().and_then(|d| d.as_str()), Some(content));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_content_limit_holds_on_every_hop() -> anyhow::Result<()> {
    // MAX_CONTENT_BYTES above gRPC's default 4 MiB message size: a push
    // that fits the setting reaches the client whole, one over it is
    // refused by the push-manager's own check, naming the field.
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster.start_node("n").await?;
    cluster
        .start_manager_with("m", |m| m.limits.max_content_bytes = 6 << 20)
        .await?;
    let mut api = cluster.push_client().await?;
    let url = connect_url(&cluster.nodes[0].ws_url(), "viewer", &["big"]);
    let mut c = within(T, "connect", Client::connect(&url)).await??;
    delivered_whole(&mut api, &mut c, "big", &"y".repeat(5 << 20)).await?;
    let over = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "big".into(),
            content: "y".repeat((6 << 20) + 1),
            ..Default::default()
        }),
    )
    .await?;
    expect_invalid(over, "content");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_grows_when_escaped_reaches_json_clients() -> anyhow::Result<()> {
    // 64 KiB of control characters, the most the default limit allows,
    // is six times as long as a JSON string (`\u0001`): 384 KiB in one
    // text frame.
    let cluster = cluster().await?;
    let mut api = cluster.push_client().await?;
    let url = connect_url(&cluster.nodes[0].ws_url(), "viewer", &["raw"]);
    let mut c = within(T, "connect", Client::connect(&url)).await??;
    let content = "\u{1}".repeat(64 * 1024);
    for _ in 0..2 {
        delivered_whole(&mut api, &mut c, "raw", &content).await?;
    }
    Ok(())
}

/// A client that says goodbye is counted as 1000; one whose connection
/// just ends (no close frame) as 1006, so that operators can tell the two
/// apart.
#[tokio::test]
async fn a_connection_lost_without_a_close_frame_is_counted_as_1006() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let url = |user: &str| connect_url(&cluster.nodes[0].ws_url(), user, &[]);
    let polite = within(T, "connect", Client::connect(&url("polite"))).await??;
    within(T, "close", polite.close()).await??;
    let gone = within(T, "connect", Client::connect(&url("gone"))).await??;
    drop(gone);
    let counted = |code: &str| {
        cluster.nodes[0].metric(&format!(
            r#"connect_node_disconnects_total{{code="{code}"}}"#
        ))
    };
    barrage_testkit::cluster::eventually(T, "both disconnects counted", || async {
        (counted("1000") + counted("1006") >= 2.0).then_some(())
    })
    .await?;
    assert_eq!((counted("1000"), counted("1006")), (1.0, 1.0));
    Ok(())
}

/// `GET path` on `addr` over HTTP/1.1 (a WebSocket upgrade request for
/// `/ws`): the status and the body of the answer.
async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = within(T, "tcp connect", tokio::net::TcpStream::connect(addr)).await??;
    let upgrade = if path.starts_with("/ws") {
        "connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    } else {
        "connection: close\r\n"
    };
    let request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n{upgrade}\r\n");
    within(T, "request", tcp.write_all(request.as_bytes())).await??;
    // The head, then as much body as it announces.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let (status, body) = loop {
        let n = within(T, "answer", tcp.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "the connection closed before a whole answer");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        if body.len() >= length {
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
            break (status.unwrap_or(0), body[..length].to_owned());
        }
    };
    Ok((status, body))
}

#[tokio::test]
async fn a_rooms_list_is_refused_as_soon_as_it_passes_the_limit() -> anyhow::Result<()> {
    barrage_testkit::init_tracing();
    let mut cluster = TestCluster::in_process();
    cluster.start_controller("c").await?;
    cluster.start_node_with("n", |c| c.max_rooms = 4).await?;
    let node = &cluster.nodes[0];
    let addr = node.ws_addr.clone().expect("ws address");
    // Repeats count once: four rooms.
    let c = within(
        T,
        "connect",
        Client::connect(&format!(
            "{}?user_id=u&rooms=r1,r2,r1,r3,r4,r2,r4",
            node.ws_url()
        )),
    )
    .await??;
    assert_eq!(c.session().rooms, ["r1", "r2", "r3", "r4"]);
    // A fifth room is refused where it stands, before anything after it
    // is looked at (here an id that is not valid), on every transport.
    let bad_id = "x".repeat(200);
    let rooms = format!("r1,r2,r3,r4,r5,{bad_id}");
    for path in ["/ws", "/sse", "/poll"] {
        let (status, body) = http_get(&addr, &format!("{path}?user_id=u&rooms={rooms}")).await?;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body.starts_with("rooms: at most 4 rooms per connection"),
            "{path}: {body}"
        );
    }
    // A list far longer than the limit is answered just the same.
    let long: Vec<String> = (0..5_000).map(|i| format!("r{i}")).collect();
    let (status, body) =
        http_get(&addr, &format!("/ws?user_id=u&rooms={}", long.join(","))).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("at most 4 rooms"), "{body}");
    Ok(())
}

#[tokio::test]
async fn ids_with_commas_are_refused_everywhere() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let mut api = cluster.push_client().await?;
    // The push API names the field.
    let r = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "a,b".into(),
            content: "x".into(),
            ..Default::default()
        }),
    )
    .await?;
    expect_invalid(r, "room_id");
    let r = within(
        T,
        "push",
        api.push_to_room(PushToRoomRequest {
            room_id: "r1".into(),
            content: "x".into(),
            exclude_user_ids: vec!["a,b".into()],
            ..Default::default()
        }),
    )
    .await?;
    expect_invalid(r, "exclude_user_ids");
    for (user_id, user_ids, field) in [
        ("a,b", vec![], "user_id"),
        ("", vec!["ok".to_owned(), "a,b".to_owned()], "user_ids"),
    ] {
        let r = within(
            T,
            "push",
            api.push_to_user(PushToUserRequest {
                user_id: user_id.into(),
                user_ids,
                content: "x".into(),
                ..Default::default()
            }),
        )
        .await?;
        let s = r.expect_err("a user id with a comma");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(
            s.message().starts_with(field) && s.message().contains("','"),
            "{s:?}"
        );
    }
    let r = within(
        T,
        "room info",
        api.get_room_info(GetRoomInfoRequest {
            room_id: "a,b".into(),
        }),
    )
    .await?;
    expect_invalid(r, "room_id");

    // Connecting as such a user. (A room of `rooms=` cannot hold one:
    // the list is split there.)
    let url = format!("{}?user_id=a%2Cb", cluster.nodes[0].ws_url());
    match within(T, "connect", Client::connect(&url)).await? {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 400, "{url}");
            assert!(
                body.starts_with("user_id") && body.contains("','"),
                "{url}: {body}"
            );
        }
        other => panic!("expected 400 for {url}, got {:?}", other.map(|_| ())),
    }
    // Joining: an error frame naming the room.
    let mut c = connected(&cluster, "joiner").await?;
    c.send(&ClientFrame::Join { room: "a,b".into() }).await?;
    match next_frame(&mut c).await? {
        ServerFrame::Error {
            code,
            message,
            room,
        } => {
            assert_eq!(
                (code.as_str(), room.as_deref()),
                ("invalid_room", Some("a,b"))
            );
            assert!(message.contains("','"), "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    Ok(())
}
