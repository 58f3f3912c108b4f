//! Compact binary frames (subprotocol `barrage.v1.bin`) on a real cluster:
//! a binary client and a JSON client in the same room see the same
//! messages, single and batched, compressed above the threshold; a binary
//! client publishes and is acknowledged; a malformed binary frame gets an
//! `error` frame and the connection keeps serving.

use std::time::Duration;

use barrage_client::{Client, Format, connect_url};
use barrage_connect_node::publish::PublishSettings;
use barrage_protocol::binary::{self, Compression, FLAG_DEFLATE, FrameType, MAGIC};
use barrage_protocol::{ClientFrame, MessageFrame, ServerFrame};
use barrage_testkit::cluster::{TestCluster, within};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const T: Duration = Duration::from_secs(10);

async fn cluster() -> anyhow::Result<TestCluster> {
    barrage_testkit::init_tracing();
    let mut c = TestCluster::in_process();
    c.start_controller("c").await?;
    c.start_manager("m").await?;
    let api = c.managers[0].grpc_addr.clone();
    c.start_node_with("n", move |cfg| {
        cfg.batch_window = Duration::from_millis(100);
        cfg.batch_max = 8;
        cfg.binary_compression = Compression::above(200);
        cfg.publish = Some(PublishSettings {
            user_per_sec: 50,
            user_burst: 50,
            ..PublishSettings::open(api, vec!["live-*".into()])
        });
    })
    .await?;
    Ok(c)
}

async fn messages(c: &mut Client, n: usize) -> anyhow::Result<Vec<MessageFrame>> {
    let mut out: Vec<MessageFrame> = Vec::with_capacity(n);
    while out.len() < n {
        match within(T, "message", c.next_message()).await {
            Ok(m) => out.push(m?.ok_or_else(|| anyhow::anyhow!("closed"))?),
            Err(e) => anyhow::bail!(
                "{e}: {} of {n} arrived, seqs {:?}",
                out.len(),
                out.iter().map(|m| m.seq).collect::<Vec<_>>()
            ),
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_and_json_clients_see_the_same_messages() -> anyhow::Result<()> {
    let c = cluster().await?;
    let ws = c.nodes[0].ws_url();
    let url = |user: &str| connect_url(&ws, user, &["live-1"]);

    // A raw socket that offers the subprotocol sees the frames as sent.
    let mut req = url("raw").into_client_request()?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static(binary::SUBPROTOCOL),
    );
    let (mut raw, resp) = within(T, "raw", tokio_tungstenite::connect_async(req)).await??;
    assert_eq!(
        resp.headers()["sec-websocket-protocol"],
        binary::SUBPROTOCOL,
        "the handshake selects the binary subprotocol"
    );
    let first = within(T, "connected", raw.next()).await?.expect("frame")?;
    let Message::Binary(first) = first else {
        anyhow::bail!("expected a binary connected frame, got {first:?}");
    };
    assert_eq!(&first[..2], &MAGIC);
    assert_eq!(first[3], FrameType::Connected as u8);

    let mut bin = within(
        T,
        "binary",
        Client::connect_with(&url("bin"), Format::Binary),
    )
    .await??;
    assert_eq!(bin.format(), Format::Binary);
    let mut json = within(T, "json", Client::connect(&url("json"))).await??;
    assert_eq!(json.format(), Format::Json);
    assert_eq!(bin.session().rooms, vec!["live-1".to_owned()]);

    // A comment published over binary frames is acknowledged in binary.
    bin.send(&ClientFrame::Publish {
        room: "live-1".into(),
        data: serde_json::json!({"text": "first!"}),
        reference: Some("p1".into()),
    })
    .await?;
    // The comment itself may arrive before its ack.
    let mut early = Vec::new();
    let ack = loop {
        match within(T, "ack", bin.next_frame()).await??.expect("open") {
            f @ (ServerFrame::Ack { .. } | ServerFrame::Rejected { .. }) => break f,
            ServerFrame::Message(m) => early.push(m),
            _ => continue,
        }
    };
    assert!(
        matches!(&ack, ServerFrame::Ack { reference: Some(r), seq: 1, .. } if r == "p1"),
        "{ack:?}"
    );

    // Service pushes: JSON, plain text, long (compressible) and binary.
    let mut api = c.push_client().await?;
    let long = format!(r#"{{"text":"{}"}}"#, "wonderful play ".repeat(20));
    let mut contents = vec![long.clone(), "plain words".to_owned(), "123".to_owned()];
    contents.extend((0..12).map(|i| format!(r##"{{"text":"c{i}","color":"#ffffff"}}"##)));
    contents.push(long);
    for content in &contents {
        within(
            T,
            "push",
            api.push_to_room(barrage_proto::v1::PushToRoomRequest {
                room_id: "live-1".into(),
                content: content.clone(),
                event: "comment".into(),
                ..Default::default()
            }),
        )
        .await??;
    }
    within(
        T,
        "binary push",
        api.push_to_room(barrage_proto::v1::PushToRoomRequest {
            room_id: "live-1".into(),
            binary_content: vec![0, 1, 2, 250],
            ..Default::default()
        }),
    )
    .await??;
    let n = 1 + contents.len() + 1;

    let from_json = messages(&mut json, n).await?;
    let mut from_bin = early;
    from_bin.extend(messages(&mut bin, n - from_bin.len()).await?);
    assert_eq!(
        from_bin, from_json,
        "both formats decode to the same messages"
    );
    assert_eq!(
        from_bin.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=n as u64).collect::<Vec<_>>()
    );
    assert_eq!(from_bin[0].from.as_deref(), Some("bin"));
    assert_eq!(
        from_bin[0].data,
        Some(serde_json::json!({"text": "first!"}))
    );
    assert_eq!(from_bin[2].data, Some(serde_json::json!("plain words")));
    assert_eq!(from_bin[3].data, Some(serde_json::json!(123)));
    assert_eq!(from_bin[n - 1].data_b64.as_deref(), Some("AAEC+g=="));

    // On the wire: binary frames only, some batched, big ones compressed.
    let (mut seqs, mut batches, mut compressed) = (Vec::new(), 0, 0);
    while seqs.len() < n {
        let msg = within(T, "raw frame", raw.next()).await?.expect("frame")?;
        let Message::Binary(b) = msg else {
            anyhow::bail!("a text frame on a binary connection: {msg:?}");
        };
        compressed += usize::from(b[4] & FLAG_DEFLATE != 0);
        match binary::decode_server_frame(&b, 1 << 20)? {
            ServerFrame::Message(m) => seqs.push(m.seq),
            ServerFrame::Batch { messages } => {
                batches += 1;
                seqs.extend(messages.iter().map(|m| m.seq));
            }
            _ => {}
        }
    }
    assert_eq!(
        seqs,
        (1..=n as u64).collect::<Vec<_>>(),
        "order and seq kept"
    );
    assert!(batches >= 1, "nothing was batched");
    assert!(compressed >= 1, "nothing crossed the compression threshold");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_binary_frame_gets_an_error_and_the_connection_serves_on() -> anyhow::Result<()>
{
    let c = cluster().await?;
    let ws = c.nodes[0].ws_url();
    let mut bin = within(
        T,
        "binary",
        Client::connect_with(&connect_url(&ws, "b", &[]), Format::Binary),
    )
    .await??;
    bin.send_raw(Message::Binary(
        vec![0xBA, 0x7A, 9, 1, 0, 0, 0, 0, 0].into(),
    ))
    .await?;
    match within(T, "error", bin.next_frame()).await??.expect("open") {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, "invalid_frame");
            assert!(message.contains("version 9"), "{message}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    within(T, "join", bin.join("live-2")).await??;
    // JSON text still works on a binary connection.
    bin.send_raw(Message::Text(r#"{"type":"ping"}"#.into()))
        .await?;
    assert_eq!(
        within(T, "pong", bin.next_frame()).await??,
        Some(ServerFrame::Pong)
    );

    // A binary frame on a JSON connection is refused with close code 4400.
    let (mut json, _) = within(
        T,
        "json",
        tokio_tungstenite::connect_async(connect_url(&ws, "j", &[])),
    )
    .await??;
    within(T, "connected", json.next()).await?;
    json.send(Message::Binary(binary::encode_client_frame(
        &ClientFrame::Ping,
    )))
    .await?;
    loop {
        match within(T, "close", json.next()).await? {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4400);
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    Ok(())
}
