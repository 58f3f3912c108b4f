//! Property-based fuzzing of everything that parses untrusted input: the
//! client frame decoders (JSON text and binary), the positions parser, connection-token
//! verification, and the push API's request validation (through a real
//! gRPC server) and frame handling (through a real WebSocket). No input may
//! panic; every refusal names what is wrong.
//!
//! Case counts are bounded so the run takes seconds; raise them with
//! `PROPTEST_CASES=100000 cargo test --test fuzz_inputs` for a longer run.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use barrage_auth::{ConnectAuth, mint};
use barrage_client::{Client, Format, connect_url};
use barrage_proto::v1::{PushToRoomRequest, PushToUserRequest};
use barrage_protocol::{
    ClientFrame, ServerFrame, StreamPos, binary, format_positions, parse_client_frame,
    parse_positions,
};
use barrage_testkit::cluster::{TestCluster, within};
use base64::Engine;
use proptest::prelude::*;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &[u8] = b"fuzzing-secret-of-32-bytes-long!";
const T: Duration = Duration::from_secs(10);

/// Strings that look like client frames more often than random text does.
fn frame_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        r#"\{"type":"(join|leave|ping|refresh|pong|)"(,"(room|token)":("[^"]{0,40}"|[0-9]{1,25}|null|\[\]|\{\}))?\}"#,
        r#"\{("type":)?.{0,30}\}"#,
        proptest::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
}

/// Sends `frames`, then a ping: the connection must still be serving and
/// answer it with `pong`.
async fn answers_ping_after(
    c: &mut Client,
    frames: impl Iterator<Item = Message>,
) -> Result<(), TestCaseError> {
    for f in frames {
        c.send_raw(f).await.expect("sent");
    }
    c.send(&ClientFrame::Ping).await.expect("ping sent");
    loop {
        match within(T, "answers", c.next_frame()).await.expect("in time") {
            Ok(Some(ServerFrame::Pong)) => return Ok(()),
            Ok(Some(_)) => continue,
            other => prop_assert!(false, "connection ended: {other:?}"),
        }
    }
}

/// Byte strings that look like binary frames more often than random bytes
/// do: valid frames with bytes flipped, cut or appended, and valid headers
/// in front of random bodies.
fn binary_like() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop_oneof![
        "[a-z0-9]{0,12}".prop_map(|room| binary::encode_client_frame(&ClientFrame::Join { room })),
        "[a-z0-9]{0,12}".prop_map(|room| binary::encode_client_frame(&ClientFrame::Leave { room })),
        Just(binary::encode_client_frame(&ClientFrame::Ping)),
        ("[a-z0-9]{0,12}", ".{0,40}").prop_map(|(room, text)| {
            binary::encode_client_frame(&ClientFrame::Publish {
                room,
                data: serde_json::json!({ "text": text }),
                reference: Some("r".into()),
            })
        }),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (valid.clone(), any::<usize>(), any::<u8>()).prop_map(|(f, at, b)| {
            let mut f = f.to_vec();
            let i = at % f.len();
            f[i] ^= b;
            f
        }),
        (valid, any::<usize>()).prop_map(|(f, cut)| f[..cut % (f.len() + 1)].to_vec()),
        (
            0u8..32,
            0u8..4,
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(kind, flags, body)| {
                let mut f = vec![0xBA, 0x7A, 1, kind, flags];
                f.extend_from_slice(&(body.len() as u32).to_be_bytes());
                f.extend_from_slice(&body);
                f
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn the_binary_frame_decoder_never_panics(buf in binary_like()) {
        match binary::decode_client_frame(&buf, 64 * 1024) {
            Ok(frame) => {
                let again = binary::encode_client_frame(&frame);
                prop_assert_eq!(binary::decode_client_frame(&again, 64 * 1024).expect("round trip"), frame);
            }
            Err(e) => prop_assert!(e.to_string().starts_with("bad"), "{}", e),
        }
    }

    #[test]
    fn the_frame_decoder_never_panics(text in frame_like()) {
        match parse_client_frame(&text) {
            Ok(frame) => {
                // What decodes re-encodes to something that decodes the same.
                let again = serde_json::to_string(&frame).expect("encodes");
                prop_assert_eq!(parse_client_frame(&again).expect("round trip"), frame);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn the_positions_parser_never_panics(text in any::<String>()) {
        if let Ok(p) = parse_positions(&text) {
            prop_assert_eq!(parse_positions(&format_positions(&p)).expect("round trip"), p);
        }
    }

    #[test]
    fn positions_round_trip(
        entries in proptest::collection::btree_map(
            prop_oneof![
                "room:[a-z0-9_-]{1,20}",
                "user:[a-z0-9_-]{1,20}",
                Just("broadcast".to_owned()),
            ],
            (any::<u64>(), any::<u64>()),
            0..8,
        )
    ) {
        let positions: BTreeMap<String, StreamPos> = entries
            .into_iter()
            .map(|(k, (epoch, seq))| (k, StreamPos { epoch, seq }))
            .collect();
        prop_assert_eq!(parse_positions(&format_positions(&positions)).expect("parses"), positions);
    }

    #[test]
    fn token_verification_never_panics_nor_accepts_forgeries(
        text in any::<String>(),
        header in any::<String>(),
        payload in prop_oneof![
            any::<String>(),
            r#"\{"sub":"[a-z]{0,8}","exp":[0-9]{1,20}(,"rooms":\[("[a-z*]{0,5}")?\])?\}"#,
        ],
        alg in prop_oneof![
            Just("none"), Just("HS256"), Just("RS256"), Just("ES256"), Just("HS512"), Just(""),
        ],
        sig in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let auth = ConnectAuth::new(Duration::from_secs(5))
            .with_hs256_secret(SECRET)
            .expect("secret");
        prop_assert!(auth.verify(&text).is_err());
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for head in [header, format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)] {
            let forged = format!(
                "{}.{}.{}",
                b64.encode(head.as_bytes()),
                b64.encode(payload.as_bytes()),
                b64.encode(&sig),
            );
            prop_assert!(auth.verify(&forged).is_err(), "accepted {forged}");
        }
    }

    #[test]
    fn minted_tokens_verify_for_any_user(user in "[A-Za-z0-9_.@-]{1,64}", ttl in 1u64..100_000) {
        let auth = ConnectAuth::new(Duration::ZERO).with_hs256_secret(SECRET).expect("secret");
        let token = mint(SECRET, &user, None, Duration::from_secs(ttl)).expect("mint");
        prop_assert_eq!(auth.verify(&token).expect("verifies").sub, user);
    }
}

/// One runtime and one cluster for all the cases that go over the network.
fn cluster() -> &'static (tokio::runtime::Runtime, TestCluster) {
    static CLUSTER: OnceLock<(tokio::runtime::Runtime, TestCluster)> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cluster = rt.block_on(async {
            barrage_testkit::init_tracing();
            let mut c = TestCluster::in_process();
            c.start_controller("c").await?;
            c.start_node_with("n", |cfg| cfg.messages_per_sec = 100_000)
                .await?;
            c.start_manager("m").await?;
            anyhow::Ok(c)
        });
        (rt, cluster.expect("cluster starts"))
    })
}

fn field_of(status: &tonic::Status) -> Option<&str> {
    status.message().split(':').next()
}

const FIELDS: &[&str] = &[
    "room_id",
    "user_id",
    "user_ids",
    "exclude_user_ids",
    "content",
    "binary_content",
    "event",
    "message_id",
    "sender",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn api_validation_answers_every_request(
        room_id in prop_oneof![any::<String>(), "[a-z0-9]{1,8}"],
        user_ids in proptest::collection::vec(prop_oneof![any::<String>(), "[a-z]{1,6}"], 0..4),
        content in prop_oneof![any::<String>(), Just(String::new()), "x{60000,70000}"],
        event in prop_oneof![any::<String>(), Just(String::new())],
        message_id in prop_oneof![any::<String>(), Just(String::new())],
        binary in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let (rt, cluster) = cluster();
        rt.block_on(async {
            let mut api = cluster.push_client().await.expect("client");
            let room = within(T, "PushToRoom", api.push_to_room(PushToRoomRequest {
                room_id: room_id.clone(),
                content: content.clone(),
                event: event.clone(),
                message_id: message_id.clone(),
                exclude_user_ids: user_ids.clone(),
                binary_content: binary.clone(),
                sender: event.clone(),
            })).await.expect("answered in time");
            let user = within(T, "PushToUser", api.push_to_user(PushToUserRequest {
                user_id: room_id,
                user_ids,
                content,
                event,
                message_id,
                binary_content: binary,
            })).await.expect("answered in time");
            for answer in [room.map(|_| ()), user.map(|_| ())] {
                if let Err(s) = answer {
                    prop_assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}", s.message());
                    let field = field_of(&s).unwrap_or_default();
                    prop_assert!(FIELDS.contains(&field), "names no field: {}", s.message());
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_binary_frame_leaves_a_binary_connection_serving(frames in proptest::collection::vec(binary_like(), 1..8)) {
        let (rt, cluster) = cluster();
        rt.block_on(async {
            let url = connect_url(&cluster.nodes[0].ws_url(), "fuzzer", &[]);
            let mut c = within(T, "connect", Client::connect_with(&url, Format::Binary))
                .await
                .expect("in time")
                .expect("connects");
            prop_assert_eq!(c.format(), Format::Binary);
            // Refresh needs a token-authenticated connection; skip it here.
            let sent = frames
                .iter()
                .filter(|f| !matches!(binary::decode_client_frame(f, 64 * 1024), Ok(ClientFrame::Refresh { .. })))
                .map(|f| Message::Binary(f.clone().into()));
            answers_ping_after(&mut c, sent).await?;
            let _ = c.close().await;
            Ok::<(), TestCaseError>(())
        })?;
    }

    #[test]
    fn any_text_frame_leaves_the_connection_serving(frames in proptest::collection::vec(frame_like(), 1..8)) {
        let (rt, cluster) = cluster();
        rt.block_on(async {
            let url = connect_url(&cluster.nodes[0].ws_url(), "fuzzer", &[]);
            let mut c = within(T, "connect", Client::connect(&url)).await.expect("in time").expect("connects");
            // Refresh needs a token-authenticated connection; skip it here.
            let sent = frames
                .iter()
                .filter(|f| !matches!(parse_client_frame(f), Ok(ClientFrame::Refresh { .. })))
                .map(|f| Message::Text(f.as_str().into()));
            answers_ping_after(&mut c, sent).await?;
            let _ = c.close().await;
            Ok::<(), TestCaseError>(())
        })?;
    }
}
