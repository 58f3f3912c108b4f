//! Who may connect and who may push: connection JWTs (query, header and
//! subprotocol), room grants, expiry and refresh, API tokens with scopes.
//! Every rejection has the documented status or close code, and a
//! well-behaved client on the same node keeps receiving.

use std::time::Duration;

use barrage_auth::{ApiAuth, Claims, ConnectAuth, mint, now_secs};
use barrage_client::{Client, Error as ClientError};
use barrage_proto::v1::{GetRoomInfoRequest, PushToRoomRequest};
use barrage_protocol::{ClientFrame, ServerFrame};
use barrage_testkit::cluster::{TestCluster, within};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::Code;

const T: Duration = Duration::from_secs(10);
const SECRET: &[u8] = b"a-test-secret-of-32-bytes-length";
const API_TOKEN: &str = "service-token-0123456789";
const ADMIN_TOKEN: &str = "admin-token-0123456789ab";

async fn secure_cluster() -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_node_with("secure", |cfg| {
        cfg.insecure_user_id = false;
        cfg.auth = ConnectAuth::new(Duration::ZERO)
            .with_hs256_secret(SECRET)
            .expect("secret");
    })
    .await?;
    c.start_manager_with("m", |cfg| {
        cfg.api_auth = ApiAuth::parse(&format!("{API_TOKEN}=push:room|push:user;{ADMIN_TOKEN}=*"))
            .expect("tokens");
    })
    .await?;
    Ok(c)
}

fn token(user: &str, rooms: Option<Vec<&str>>, ttl: u64) -> String {
    mint(
        SECRET,
        user,
        rooms.map(|r| r.into_iter().map(String::from).collect()),
        Duration::from_secs(ttl),
    )
    .expect("mint")
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    r
}

async fn refused(url: &str) -> (u16, String) {
    match within(T, "connect", Client::connect(url))
        .await
        .expect("in time")
    {
        Err(ClientError::Refused { status, body }) => (status, body),
        other => panic!("expected a refusal for {url}, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_tokens_are_verified_before_upgrade() -> anyhow::Result<()> {
    let cluster = secure_cluster().await?;
    let ws = cluster.nodes[0].ws_url();

    // A valid token: the user comes from `sub`, not from ?user_id=.
    let ok = within(
        T,
        "connect",
        Client::connect(&format!(
            "{ws}?token={}&user_id=mallory&rooms=lobby",
            token("alice", None, 60)
        )),
    )
    .await??;
    assert_eq!(ok.session().user_id, "alice");

    let (status, body) = refused(&format!("{ws}?user_id=alice")).await;
    assert_eq!(status, 401);
    assert!(body.contains("no token"), "{body}");
    let forged = mint(
        b"not-the-right-secret-at-all-123",
        "alice",
        None,
        Duration::from_secs(60),
    )?;
    assert_eq!(refused(&format!("{ws}?token={forged}")).await.0, 401);
    let expired = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: "alice".into(),
            exp: now_secs() - 30,
            rooms: None,
            publish: None,
        },
        &EncodingKey::from_secret(SECRET),
    )?;
    let (status, body) = refused(&format!("{ws}?token={expired}")).await;
    assert_eq!((status, body.trim()), (401, "token expired"));
    let none_alg =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.";
    assert_eq!(refused(&format!("{ws}?token={none_alg}")).await.0, 401);
    assert_eq!(refused(&format!("{ws}?token=garbage")).await.0, 401);
    // The right secret under an algorithm the node was not configured for.
    let wrong_alg = jsonwebtoken::encode(
        &Header::new(Algorithm::HS384),
        &Claims {
            sub: "alice".into(),
            exp: now_secs() + 60,
            rooms: None,
            publish: None,
        },
        &EncodingKey::from_secret(SECRET),
    )?;
    let (status, body) = refused(&format!("{ws}?token={wrong_alg}")).await;
    assert_eq!(status, 401);
    assert!(body.contains("HS384"), "{body}");
    let (status, body) = refused(&format!(
        "{ws}?token={}&rooms=vip",
        token("bob", Some(vec!["lobby", "live:*"]), 60)
    ))
    .await;
    assert_eq!(status, 403);
    assert!(body.contains("vip"), "{body}");

    let metrics = cluster.nodes[0].metrics();
    assert!(
        metrics.contains(r#"connect_node_rejected_total{reason="unauthorized"} 6"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"connect_node_rejected_total{reason="forbidden"} 1"#),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_subprotocol_carry_the_token_too() -> anyhow::Result<()> {
    let cluster = secure_cluster().await?;
    let ws = cluster.nodes[0].ws_url();
    let mut req = ws.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token("hdr", None, 60)).parse()?,
    );
    let (mut conn, _) = within(T, "connect", tokio_tungstenite::connect_async(req)).await??;
    let first = within(T, "frame", futures::StreamExt::next(&mut conn))
        .await?
        .expect("frame")?;
    assert!(first.to_text()?.contains(r#""user_id":"hdr""#), "{first}");

    let mut req = ws.as_str().into_client_request()?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("barrage, bearer.{}", token("browser", None, 60)).parse()?,
    );
    let (mut conn, resp) = within(T, "connect", tokio_tungstenite::connect_async(req)).await??;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap_or("")),
        Some("barrage")
    );
    let first = within(T, "frame", futures::StreamExt::next(&mut conn))
        .await?
        .expect("frame")?;
    assert!(
        first.to_text()?.contains(r#""user_id":"browser""#),
        "{first}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_grants_refresh_and_expiry() -> anyhow::Result<()> {
    let cluster = secure_cluster().await?;
    let ws = cluster.nodes[0].ws_url();
    let mut api = cluster.push_client().await?;
    let mut c = within(
        T,
        "connect",
        Client::connect(&format!(
            "{ws}?token={}",
            token("carol", Some(vec!["live:*"]), 60)
        )),
    )
    .await??;
    within(T, "join", c.join("live:1")).await??;
    match within(T, "join", c.join("backstage")).await? {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, "forbidden");
            assert!(message.contains("backstage"), "{message}");
        }
        other => panic!("expected a forbidden error frame, got {other:?}"),
    }
    // Refresh with a token for someone else: refused; for carol: accepted.
    c.send(&ClientFrame::Refresh {
        token: token("mallory", None, 60),
    })
    .await?;
    assert!(
        matches!(within(T, "frame", c.next_frame()).await??, Some(ServerFrame::Error { code, .. }) if code == "forbidden")
    );
    c.send(&ClientFrame::Refresh {
        token: token("carol", None, 120),
    })
    .await?;
    match within(T, "frame", c.next_frame()).await?? {
        Some(ServerFrame::Refreshed { expires_at }) => assert!(expires_at >= now_secs() + 100),
        other => panic!("expected refreshed, got {other:?}"),
    }
    // The refreshed token allows any room.
    within(T, "join", c.join("backstage")).await??;
    let resp = within(
        T,
        "push",
        api.push_to_room(authed(
            PushToRoomRequest {
                room_id: "backstage".into(),
                content: "x".into(),
                ..Default::default()
            },
            API_TOKEN,
        )),
    )
    .await??
    .into_inner();
    assert_eq!(resp.delivered_count, 1);

    // A token about to expire, never refreshed: closed with 4405.
    let short = token("dave", None, 1);
    let mut d = within(
        T,
        "connect",
        Client::connect(&format!("{ws}?token={short}")),
    )
    .await??;
    loop {
        match within(T, "close", d.next_frame()).await? {
            Err(ClientError::Closed { code, .. }) => {
                assert_eq!(code, 4405);
                break;
            }
            Ok(Some(_)) => continue,
            other => panic!("expected close 4405, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_and_scopes() -> anyhow::Result<()> {
    let cluster = secure_cluster().await?;
    let mut api = cluster.push_client().await?;
    let push = || PushToRoomRequest {
        room_id: "r".into(),
        content: "x".into(),
        ..Default::default()
    };
    let s = within(T, "push", api.push_to_room(push()))
        .await?
        .expect_err("no token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(
        s.message().contains("no API token") && s.message().contains("authorization: Bearer"),
        "{}",
        s.message()
    );
    assert!(!s.message().contains("?token="), "{}", s.message());
    let s = within(
        T,
        "push",
        api.push_to_room(authed(push(), "wrong-token-0123456789")),
    )
    .await?
    .expect_err("bad token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(
        within(T, "push", api.push_to_room(authed(push(), API_TOKEN)))
            .await?
            .is_ok()
    );
    let s = within(
        T,
        "info",
        api.get_room_info(authed(
            GetRoomInfoRequest {
                room_id: "r".into(),
            },
            API_TOKEN,
        )),
    )
    .await?
    .expect_err("no admin scope");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("admin"), "{}", s.message());
    let s = within(
        T,
        "info",
        api.get_room_info(authed(
            GetRoomInfoRequest {
                room_id: "r".into(),
            },
            ADMIN_TOKEN,
        )),
    )
    .await?
    .expect_err("empty room");
    assert_eq!(
        s.code(),
        Code::NotFound,
        "admin may read; the room is just empty"
    );
    let metrics = cluster.managers[0].metrics();
    assert!(
        metrics.contains(
            r#"push_manager_api_requests_total{api="PushToRoom",status="UNAUTHENTICATED"} 2"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"push_manager_api_requests_total{api="GetRoomInfo",status="PERMISSION_DENIED"} 1"#
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_connection_outlives_its_first_token() -> anyhow::Result<()> {
    let cluster = secure_cluster().await?;
    let ws = cluster.nodes[0].ws_url();
    // Expires in 1 s; without the refresh the node (no leeway) would close
    // it about then.
    let mut c = within(
        T,
        "connect",
        Client::connect(&format!("{ws}?token={}", token("erin", None, 1))),
    )
    .await??;
    c.send(&ClientFrame::Refresh {
        token: token("erin", None, 120),
    })
    .await?;
    match within(T, "frame", c.next_frame()).await?? {
        Some(ServerFrame::Refreshed { .. }) => {}
        other => panic!("expected refreshed, got {other:?}"),
    }
    // Past the first token's deadline, the connection still answers.
    tokio::time::sleep(Duration::from_secs(8)).await;
    c.send(&ClientFrame::Ping).await?;
    loop {
        match within(T, "pong", c.next_frame()).await? {
            Ok(Some(ServerFrame::Pong)) => break,
            Ok(Some(_)) => continue,
            other => panic!("expected pong on a refreshed connection, got {other:?}"),
        }
    }
    Ok(())
}

/// A token signed with the test secret carrying `exp`.
fn token_expiring_at(user: &str, exp: u64) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &Claims {
            sub: user.into(),
            exp,
            rooms: None,
            publish: None,
        },
        &EncodingKey::from_secret(SECRET),
    )
    .expect("encode")
}

/// Sends a ping and waits for its pong, past any other frame.
async fn answers_ping(c: &mut Client) -> anyhow::Result<()> {
    c.send(&ClientFrame::Ping).await?;
    loop {
        match within(T, "pong", c.next_frame()).await? {
            Ok(Some(ServerFrame::Pong)) => return Ok(()),
            Ok(Some(_)) => continue,
            other => anyhow::bail!("expected pong, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_never_expires_keeps_its_connection_and_leaves_no_trace() -> anyhow::Result<()>
{
    let cluster = secure_cluster().await?;
    let ws = cluster.nodes[0].ws_url();
    // `exp` at the top of its range: further ahead than any clock counts.
    let forever = token_expiring_at("frank", u64::MAX);
    let mut c = within(
        T,
        "connect",
        Client::connect(&format!("{ws}?token={forever}&rooms=lobby")),
    )
    .await??;
    answers_ping(&mut c).await?;
    // A refresh to such a token is taken as well.
    c.send(&ClientFrame::Refresh {
        token: token_expiring_at("frank", u64::MAX - 1),
    })
    .await?;
    match within(T, "refreshed", c.next_frame()).await?? {
        Some(ServerFrame::Refreshed { expires_at }) => assert_eq!(expires_at, u64::MAX - 1),
        other => panic!("expected refreshed, got {other:?}"),
    }
    answers_ping(&mut c).await?;
    // Once the client goes, the node holds nothing of it.
    within(T, "close", c.close()).await??;
    let node = &cluster.nodes[0];
    barrage_testkit::cluster::eventually(T, "the connection to leave the hub", || async {
        (node.metric("connect_node_connections") == 0.0).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_connection_closes_after_the_configured_leeway() -> anyhow::Result<()> {
    // "secure" allows no clock skew; "lenient" allows 3 s.
    let mut cluster = secure_cluster().await?;
    cluster
        .start_node_with("lenient", |cfg| {
            cfg.insecure_user_id = false;
            cfg.auth = ConnectAuth::new(Duration::from_secs(3))
                .with_hs256_secret(SECRET)
                .expect("secret");
        })
        .await?;
    let expiry = |url: String| async move {
        let start = tokio::time::Instant::now();
        let exp = now_secs() + 1;
        let mut c = within(
            T,
            "connect",
            Client::connect(&format!("{url}?token={}", token_expiring_at("gail", exp))),
        )
        .await??;
        loop {
            match within(T, "close", c.next_frame()).await? {
                Err(ClientError::Closed { code, .. }) => {
                    assert_eq!(code, 4405);
                    return anyhow::Ok(start.elapsed());
                }
                Ok(Some(_)) => continue,
                other => anyhow::bail!("expected close 4405, got {other:?}"),
            }
        }
    };
    let (strict, lenient) = tokio::try_join!(
        expiry(cluster.nodes[0].ws_url()),
        expiry(cluster.nodes[1].ws_url())
    )?;
    // The token runs out within a second of the connect.
    assert!(
        strict < Duration::from_millis(2500),
        "no leeway: {strict:?}"
    );
    assert!(
        lenient >= Duration::from_secs(3) && lenient < Duration::from_millis(5500),
        "3 s leeway: {lenient:?}"
    );
    Ok(())
}

/// An event stream cannot be given a new token: it ends with a `close`
/// event (4405) when its token expires, as a WebSocket is closed, and the
/// node lets the session go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_when_its_token_expires() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = secure_cluster().await?;
    let node = &cluster.nodes[0];
    let addr = node.ws_addr.clone().expect("a WebSocket address");
    let token = token_expiring_at("hana", now_secs() + 1);
    let mut stream = within(T, "connect", tokio::net::TcpStream::connect(&addr)).await??;
    let request = format!(
        "GET /sse?token={token}&rooms=lobby HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let ended = within(T, "the close event", async {
        loop {
            let n = stream.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the stream ended without a close event: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains("event: close") && seen.contains("4405") {
                return anyhow::Ok(());
            }
        }
    })
    .await?;
    ended?;
    assert!(seen.contains("event: connected"), "{seen}");
    barrage_testkit::cluster::eventually(T, "the session to leave the hub", || async {
        (node.metric("connect_node_connections") == 0.0).then_some(())
    })
    .await?;
    Ok(())
}
