//! Compact binary frames, negotiated with the WebSocket subprotocol
//! [`SUBPROTOCOL`] (`barrage.v1.bin`).
//!
//! A binary frame is a fixed 9-byte header and a protobuf body generated
//! from `proto/barrage/v1/frames.proto`:
//!
//! | offset | size | field                                             |
//! |--------|------|---------------------------------------------------|
//! | 0      | 2    | magic `0xBA 0x7A`                                 |
//! | 2      | 1    | version, `1`                                      |
//! | 3      | 1    | frame type ([`FrameType`])                        |
//! | 4      | 1    | flags: bit 0 = body is raw DEFLATE (RFC 1951)     |
//! | 5      | 4    | body length, big-endian, as sent                  |
//!
//! Frames carry the same fields as the JSON frames of [`crate::frame`] and
//! decode into the same [`ClientFrame`] / [`ServerFrame`] values, so the
//! rest of a client or server does not care which format a connection uses.

use std::collections::BTreeMap;
use std::io::Read as _;

use base64::Engine as _;
use bytes::{BufMut as _, Bytes, BytesMut};
use prost::Message as _;

use crate::frame::{ClientFrame, FrameError, MessageFrame, MessageParts, ServerFrame, StreamState};

/// Generated protobuf bodies of the binary frames (`barrage.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/barrage.v1.rs"));
}

/// The WebSocket subprotocol that selects binary frames.
pub const SUBPROTOCOL: &str = "barrage.v1.bin";
/// First two bytes of every binary frame.
pub const MAGIC: [u8; 2] = [0xBA, 0x7A];
/// Header version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 9;
/// Flag bit: the body is compressed with raw DEFLATE.
pub const FLAG_DEFLATE: u8 = 0x01;

/// The frame type byte of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Client `join` ([`pb::JoinFrame`]).
    Join = 1,
    /// Client `leave` ([`pb::LeaveFrame`]).
    Leave = 2,
    /// Client `ping` ([`pb::PingFrame`]).
    Ping = 3,
    /// Client `refresh` ([`pb::RefreshFrame`]).
    Refresh = 4,
    /// Client `publish` ([`pb::PublishFrame`]).
    Publish = 5,
    /// Server `connected` ([`pb::ConnectedFrame`]).
    Connected = 16,
    /// Server `message` ([`pb::MessageFrame`]).
    Message = 17,
    /// Server `batch` ([`pb::BatchFrame`]).
    Batch = 18,
    /// Server `joined` ([`pb::JoinedFrame`]).
    Joined = 19,
    /// Server `left` ([`pb::LeftFrame`]).
    Left = 20,
    /// Server `error` ([`pb::ErrorFrame`]).
    Error = 21,
    /// Server `pong` ([`pb::PongFrame`]).
    Pong = 22,
    /// Server `ack` ([`pb::AckFrame`]).
    Ack = 23,
    /// Server `rejected` ([`pb::RejectedFrame`]).
    Rejected = 24,
    /// Server `refreshed` ([`pb::RefreshedFrame`]).
    Refreshed = 25,
}

impl FrameType {
    fn from_byte(b: u8) -> Option<Self> {
        use FrameType::*;
        [
            Join, Leave, Ping, Refresh, Publish, Connected, Message, Batch, Joined, Left, Error,
            Pong, Ack, Rejected, Refreshed,
        ]
        .into_iter()
        .find(|t| *t as u8 == b)
    }
}

/// When bodies are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Bodies of at least this many bytes are deflated (and sent compressed
    /// only when that makes them smaller); `None` never compresses.
    pub min_bytes: Option<usize>,
}

impl Compression {
    /// No compression.
    pub const OFF: Compression = Compression { min_bytes: None };

    /// Compress bodies of at least `min_bytes`.
    pub fn above(min_bytes: usize) -> Self {
        Compression {
            min_bytes: Some(min_bytes),
        }
    }
}

/// Wraps a protobuf body in a header, compressing it when `compression`
/// says so and it pays off.
pub fn frame(kind: FrameType, body: &[u8], compression: Compression) -> Bytes {
    if compression.min_bytes.is_some_and(|min| body.len() >= min)
        && let Some(deflated) = deflate(body)
    {
        return with_header(kind, FLAG_DEFLATE, &deflated);
    }
    with_header(kind, 0, body)
}

thread_local! {
    /// One compressor per thread, reset per frame: setting up a DEFLATE
    /// state costs far more than compressing a small frame.
    static DEFLATE: std::cell::RefCell<flate2::Compress> =
        std::cell::RefCell::new(flate2::Compress::new(flate2::Compression::fast(), false));
}

/// Raw DEFLATE of `body`, when that is smaller than `body`.
fn deflate(body: &[u8]) -> Option<Vec<u8>> {
    DEFLATE.with(|z| {
        let mut z = z.borrow_mut();
        z.reset();
        // Room for less than the input only: output that does not fit
        // is output that does not pay off.
        let mut out = Vec::with_capacity(body.len().saturating_sub(1));
        match z.compress_vec(body, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => Some(out),
            _ => None,
        }
    })
}

fn with_header(kind: FrameType, flags: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + body.len());
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind as u8);
    out.put_u8(flags);
    // Bodies are bounded by the frame size limits, far below 4 GiB.
    out.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    out.put_slice(body);
    out.freeze()
}

/// Splits a frame into its type and (decompressed) body. `max_body` bounds
/// the decompressed size, so a small compressed frame cannot expand into
/// a large allocation.
pub fn split(buf: &[u8], max_body: usize) -> Result<(FrameType, Vec<u8>), FrameError> {
    let bad = |why: String| Err(FrameError::new(format!("bad binary frame: {why}")));
    if buf.len() < HEADER_LEN {
        return bad(format!(
            "{} bytes, shorter than the {HEADER_LEN}-byte header",
            buf.len()
        ));
    }
    if buf[..2] != MAGIC {
        return bad(format!(
            "magic {:#04x} {:#04x}, expected 0xba 0x7a",
            buf[0], buf[1]
        ));
    }
    if buf[2] != VERSION {
        return bad(format!("version {}, this server speaks {VERSION}", buf[2]));
    }
    let Some(kind) = FrameType::from_byte(buf[3]) else {
        return bad(format!("unknown frame type {}", buf[3]));
    };
    let flags = buf[4];
    if flags & !FLAG_DEFLATE != 0 {
        return bad(format!("unknown flags {flags:#04x}"));
    }
    let len = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize;
    let body = &buf[HEADER_LEN..];
    if len != body.len() {
        return bad(format!(
            "header says {len} body bytes, frame has {}",
            body.len()
        ));
    }
    if flags & FLAG_DEFLATE == 0 {
        if body.len() > max_body {
            return bad(format!("body of {len} bytes exceeds {max_body}"));
        }
        return Ok((kind, body.to_vec()));
    }
    let mut out = Vec::with_capacity(body.len().saturating_mul(2).min(max_body));
    let limit = u64::try_from(max_body)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    match flate2::read::DeflateDecoder::new(body)
        .take(limit)
        .read_to_end(&mut out)
    {
        Err(e) => bad(format!("compressed body does not inflate: {e}")),
        Ok(n) if n > max_body => bad(format!("body inflates beyond {max_body} bytes")),
        Ok(_) => Ok((kind, out)),
    }
}

fn decode<M: prost::Message + Default>(kind: FrameType, body: &[u8]) -> Result<M, FrameError> {
    M::decode(body).map_err(|e| FrameError::new(format!("bad {kind:?} frame body: {e}")))
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Decodes a binary frame a client sent. `max_body` bounds the body size.
pub fn decode_client_frame(buf: &[u8], max_body: usize) -> Result<ClientFrame, FrameError> {
    let (kind, body) = split(buf, max_body)?;
    Ok(match kind {
        FrameType::Join => ClientFrame::Join {
            room: decode::<pb::JoinFrame>(kind, &body)?.room,
        },
        FrameType::Leave => ClientFrame::Leave {
            room: decode::<pb::LeaveFrame>(kind, &body)?.room,
        },
        FrameType::Ping => {
            decode::<pb::PingFrame>(kind, &body)?;
            ClientFrame::Ping
        }
        FrameType::Refresh => ClientFrame::Refresh {
            token: decode::<pb::RefreshFrame>(kind, &body)?.token,
        },
        FrameType::Publish => {
            let p = decode::<pb::PublishFrame>(kind, &body)?;
            let data = serde_json::from_str(&p.data).map_err(|e| {
                FrameError::new(format!("bad Publish frame: data must be JSON text ({e})"))
            })?;
            ClientFrame::Publish {
                room: p.room,
                data,
                reference: opt(p.r#ref),
            }
        }
        other => {
            return Err(FrameError::new(format!(
                "bad frame type {other:?} ({}): sent by servers, not clients",
                other as u8
            )));
        }
    })
}

/// Encodes a client frame (Rust client side).
pub fn encode_client_frame(f: &ClientFrame) -> Bytes {
    let (kind, body) = match f {
        ClientFrame::Join { room } => (
            FrameType::Join,
            pb::JoinFrame { room: room.clone() }.encode_to_vec(),
        ),
        ClientFrame::Leave { room } => (
            FrameType::Leave,
            pb::LeaveFrame { room: room.clone() }.encode_to_vec(),
        ),
        ClientFrame::Ping => (FrameType::Ping, Vec::new()),
        ClientFrame::Refresh { token } => (
            FrameType::Refresh,
            pb::RefreshFrame {
                token: token.clone(),
            }
            .encode_to_vec(),
        ),
        ClientFrame::Publish {
            room,
            data,
            reference,
        } => (
            FrameType::Publish,
            pb::PublishFrame {
                room: room.clone(),
                data: data.to_string(),
                r#ref: reference.clone().unwrap_or_default(),
            }
            .encode_to_vec(),
        ),
    };
    frame(kind, &body, Compression::OFF)
}

/// The protobuf body of a `message` frame, uncompressed: what batches are
/// assembled from.
pub fn message_body(p: &MessageParts<'_>) -> Vec<u8> {
    pb::MessageFrame {
        stream: p.stream.to_owned(),
        id: p.id.to_owned(),
        epoch: p.epoch,
        seq: p.seq,
        event: p.event.to_owned(),
        from: p.from.to_owned(),
        content: if p.binary.is_empty() {
            p.content.to_owned()
        } else {
            String::new()
        },
        binary: p.binary.to_vec(),
        timestamp: p.timestamp_ms,
    }
    .encode_to_vec()
}

/// A `batch` frame from the bodies of its messages, in order.
pub fn batch_frame<'a>(
    bodies: impl IntoIterator<Item = &'a [u8]>,
    compression: Compression,
) -> Bytes {
    let mut body = Vec::new();
    for m in bodies {
        // Field 1, wire type 2 (length-delimited): the repeated `messages`.
        prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut body);
        prost::encoding::encode_varint(m.len() as u64, &mut body);
        body.extend_from_slice(m);
    }
    frame(FrameType::Batch, &body, compression)
}

fn message_to_pb(m: &MessageFrame) -> pb::MessageFrame {
    let content = match &m.data {
        None => String::new(),
        // A string that is not itself JSON text travels as is; everything
        // else as its JSON text, so decoding gives the same value back.
        Some(serde_json::Value::String(s))
            if serde_json::from_str::<serde::de::IgnoredAny>(s).is_err() =>
        {
            s.clone()
        }
        Some(v) => v.to_string(),
    };
    let binary = m
        .data_b64
        .as_deref()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_default();
    pb::MessageFrame {
        stream: m.stream.clone(),
        id: m.id.clone(),
        epoch: m.epoch,
        seq: m.seq,
        event: m.event.clone(),
        from: m.from.clone().unwrap_or_default(),
        content,
        binary,
        timestamp: m.timestamp,
    }
}

fn message_from_pb(m: pb::MessageFrame) -> MessageFrame {
    let (data, data_b64) = if m.binary.is_empty() {
        let v = serde_json::from_str(&m.content).unwrap_or(serde_json::Value::String(m.content));
        (Some(v), None)
    } else {
        (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&m.binary)),
        )
    };
    MessageFrame {
        stream: m.stream,
        id: m.id,
        epoch: m.epoch,
        seq: m.seq,
        event: m.event,
        from: opt(m.from),
        data,
        data_b64,
        timestamp: m.timestamp,
    }
}

/// Encodes a server frame.
pub fn encode_server_frame(f: &ServerFrame, compression: Compression) -> Bytes {
    let (kind, body) = match f {
        ServerFrame::Connected {
            conn_id,
            user_id,
            node_id,
            rooms,
            streams,
        } => (
            FrameType::Connected,
            pb::ConnectedFrame {
                conn_id: conn_id.clone(),
                user_id: user_id.clone(),
                node_id: node_id.clone(),
                rooms: rooms.clone(),
                streams: streams
                    .iter()
                    .map(|(k, s)| {
                        (
                            k.clone(),
                            pb::StreamStateFrame {
                                epoch: s.epoch,
                                seq: s.seq,
                                recovered: s.recovered,
                            },
                        )
                    })
                    .collect(),
            }
            .encode_to_vec(),
        ),
        ServerFrame::Message(m) => (FrameType::Message, message_to_pb(m).encode_to_vec()),
        ServerFrame::Batch { messages } => (
            FrameType::Batch,
            pb::BatchFrame {
                messages: messages.iter().map(message_to_pb).collect(),
            }
            .encode_to_vec(),
        ),
        ServerFrame::Joined { room, epoch, seq } => (
            FrameType::Joined,
            pb::JoinedFrame {
                room: room.clone(),
                epoch: *epoch,
                seq: *seq,
            }
            .encode_to_vec(),
        ),
        ServerFrame::Left { room } => (
            FrameType::Left,
            pb::LeftFrame { room: room.clone() }.encode_to_vec(),
        ),
        ServerFrame::Error {
            code,
            message,
            room,
        } => (
            FrameType::Error,
            pb::ErrorFrame {
                code: code.clone(),
                message: message.clone(),
                room: room.clone().unwrap_or_default(),
            }
            .encode_to_vec(),
        ),
        ServerFrame::Pong => (FrameType::Pong, Vec::new()),
        ServerFrame::Ack {
            reference,
            room,
            id,
            seq,
        } => (
            FrameType::Ack,
            pb::AckFrame {
                r#ref: reference.clone().unwrap_or_default(),
                room: room.clone(),
                id: id.clone(),
                seq: *seq,
            }
            .encode_to_vec(),
        ),
        ServerFrame::Rejected {
            reference,
            room,
            reason,
            message,
        } => (
            FrameType::Rejected,
            pb::RejectedFrame {
                r#ref: reference.clone().unwrap_or_default(),
                room: room.clone(),
                reason: reason.clone(),
                message: message.clone(),
            }
            .encode_to_vec(),
        ),
        ServerFrame::Refreshed { expires_at } => (
            FrameType::Refreshed,
            pb::RefreshedFrame {
                expires_at: *expires_at,
            }
            .encode_to_vec(),
        ),
    };
    frame(kind, &body, compression)
}

/// Decodes a binary frame a server sent (client side). `max_body` bounds
/// the body size.
pub fn decode_server_frame(buf: &[u8], max_body: usize) -> Result<ServerFrame, FrameError> {
    let (kind, body) = split(buf, max_body)?;
    Ok(match kind {
        FrameType::Connected => {
            let c = decode::<pb::ConnectedFrame>(kind, &body)?;
            ServerFrame::Connected {
                conn_id: c.conn_id,
                user_id: c.user_id,
                node_id: c.node_id,
                rooms: c.rooms,
                streams: c
                    .streams
                    .into_iter()
                    .map(|(k, s)| {
                        (
                            k,
                            StreamState {
                                epoch: s.epoch,
                                seq: s.seq,
                                recovered: s.recovered,
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>(),
            }
        }
        FrameType::Message => {
            ServerFrame::Message(message_from_pb(decode::<pb::MessageFrame>(kind, &body)?))
        }
        FrameType::Batch => ServerFrame::Batch {
            messages: decode::<pb::BatchFrame>(kind, &body)?
                .messages
                .into_iter()
                .map(message_from_pb)
                .collect(),
        },
        FrameType::Joined => {
            let j = decode::<pb::JoinedFrame>(kind, &body)?;
            ServerFrame::Joined {
                room: j.room,
                epoch: j.epoch,
                seq: j.seq,
            }
        }
        FrameType::Left => ServerFrame::Left {
            room: decode::<pb::LeftFrame>(kind, &body)?.room,
        },
        FrameType::Error => {
            let e = decode::<pb::ErrorFrame>(kind, &body)?;
            ServerFrame::Error {
                code: e.code,
                message: e.message,
                room: (!e.room.is_empty()).then_some(e.room),
            }
        }
        FrameType::Pong => {
            decode::<pb::PongFrame>(kind, &body)?;
            ServerFrame::Pong
        }
        FrameType::Ack => {
            let a = decode::<pb::AckFrame>(kind, &body)?;
            ServerFrame::Ack {
                reference: opt(a.r#ref),
                room: a.room,
                id: a.id,
                seq: a.seq,
            }
        }
        FrameType::Rejected => {
            let r = decode::<pb::RejectedFrame>(kind, &body)?;
            ServerFrame::Rejected {
                reference: opt(r.r#ref),
                room: r.room,
                reason: r.reason,
                message: r.message,
            }
        }
        FrameType::Refreshed => ServerFrame::Refreshed {
            expires_at: decode::<pb::RefreshedFrame>(kind, &body)?.expires_at,
        },
        other => {
            return Err(FrameError::new(format!(
                "bad frame type {other:?} ({}): sent by clients, not servers",
                other as u8
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::encode_message;
    use proptest::prelude::*;

    fn parts<'a>(content: &'a str, binary: &'a [u8]) -> MessageParts<'a> {
        MessageParts {
            stream: "room:live-1",
            id: "m-1",
            epoch: 1_838_642_512_266_569,
            seq: 42,
            event: "comment",
            content,
            binary,
            timestamp_ms: 1_764_000_000_000,
            from: "u7",
        }
    }

    fn json_message(p: &MessageParts<'_>) -> MessageFrame {
        match serde_json::from_slice::<ServerFrame>(&encode_message(p)).unwrap() {
            ServerFrame::Message(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_binary_message_decodes_to_what_the_json_frame_says() {
        for (content, binary) in [
            (r#"{"text":"666"}"#, &[][..]),
            ("plain words", &[][..]),
            ("123", &[][..]),
            ("", &[0u8, 255, 7][..]),
        ] {
            let p = parts(content, binary);
            let bin = frame(FrameType::Message, &message_body(&p), Compression::OFF);
            let ServerFrame::Message(m) = decode_server_frame(&bin, 1 << 20).unwrap() else {
                panic!("not a message");
            };
            assert_eq!(m, json_message(&p), "content {content:?}");
        }
    }

    #[test]
    fn the_header_is_magic_version_type_flags_length() {
        let bin = frame(FrameType::Pong, &[], Compression::OFF);
        assert_eq!(&bin[..], &[0xBA, 0x7A, 1, 22, 0, 0, 0, 0, 0]);
        let body = message_body(&parts("x", &[]));
        let bin = frame(FrameType::Message, &body, Compression::OFF);
        assert_eq!(bin[3], 17);
        assert_eq!(
            u32::from_be_bytes([bin[5], bin[6], bin[7], bin[8]]) as usize,
            body.len()
        );
    }

    #[test]
    fn compression_applies_above_the_threshold_and_round_trips() {
        let text = format!(r#"{{"text":"{}"}}"#, "so good ".repeat(40));
        let body = message_body(&parts(&text, &[]));
        let small = frame(
            FrameType::Message,
            &body,
            Compression::above(body.len() + 1),
        );
        assert_eq!(small[4], 0, "below the threshold: not compressed");
        let big = frame(FrameType::Message, &body, Compression::above(64));
        assert_eq!(big[4], FLAG_DEFLATE);
        assert!(
            big.len() < small.len() / 2,
            "{} vs {}",
            big.len(),
            small.len()
        );
        assert_eq!(
            decode_server_frame(&big, 1 << 20).unwrap(),
            decode_server_frame(&small, 1 << 20).unwrap()
        );
        // Incompressible bodies go out as they are.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let raw = frame(
            FrameType::Message,
            &message_body(&parts("", &noise)),
            Compression::above(1),
        );
        assert_eq!(raw[4], 0);
    }

    #[test]
    fn a_compressed_frame_cannot_inflate_past_the_limit() {
        let body = vec![b'a'; 100_000];
        let bomb = frame(FrameType::Publish, &body, Compression::above(1));
        assert!(bomb.len() < 1_000);
        let err = decode_client_frame(&bomb, 64 * 1024)
            .unwrap_err()
            .to_string();
        assert!(err.contains("inflates beyond 65536"), "{err}");
    }

    #[test]
    fn batches_hold_message_bodies_in_order() {
        let a = message_body(&parts(r#"{"n":1}"#, &[]));
        let b = message_body(&parts(r#"{"n":2}"#, &[]));
        let bin = batch_frame([a.as_slice(), b.as_slice()], Compression::OFF);
        let ServerFrame::Batch { messages } = decode_server_frame(&bin, 1 << 20).unwrap() else {
            panic!("not a batch");
        };
        let datas: Vec<_> = messages.iter().map(|m| m.data.clone().unwrap()).collect();
        assert_eq!(
            datas,
            vec![serde_json::json!({"n": 1}), serde_json::json!({"n": 2})]
        );
    }

    #[test]
    fn every_server_frame_round_trips() {
        let mut streams = BTreeMap::new();
        streams.insert(
            "room:r".to_owned(),
            StreamState {
                epoch: 9,
                seq: 3,
                recovered: Some(false),
            },
        );
        streams.insert(
            "broadcast".to_owned(),
            StreamState {
                epoch: 1,
                seq: 0,
                recovered: None,
            },
        );
        let frames = vec![
            ServerFrame::Connected {
                conn_id: "n1-1".into(),
                user_id: "u".into(),
                node_id: "n1".into(),
                rooms: vec!["r".into()],
                streams,
            },
            ServerFrame::Message(json_message(&parts(r#"{"a":[1,2]}"#, &[]))),
            ServerFrame::Message(json_message(&parts("\"1\"", &[]))),
            ServerFrame::Batch {
                messages: vec![json_message(&parts("hi", &[]))],
            },
            ServerFrame::Joined {
                room: "r".into(),
                epoch: None,
                seq: None,
            },
            ServerFrame::Joined {
                room: "r".into(),
                epoch: Some(1_838_642_512_266_569),
                seq: Some(0),
            },
            ServerFrame::Left { room: "r".into() },
            ServerFrame::error("invalid_frame", "why"),
            ServerFrame::room_error("forbidden", "vip", "why"),
            ServerFrame::Pong,
            ServerFrame::Ack {
                reference: Some("c1".into()),
                room: "r".into(),
                id: "m".into(),
                seq: 4,
            },
            ServerFrame::Rejected {
                reference: None,
                room: "r".into(),
                reason: "duplicate".into(),
                message: "again".into(),
            },
            ServerFrame::Refreshed { expires_at: 77 },
        ];
        for f in frames {
            let bin = encode_server_frame(&f, Compression::above(8));
            assert_eq!(decode_server_frame(&bin, 1 << 20).unwrap(), f);
        }
    }

    #[test]
    fn every_client_frame_round_trips_and_wrong_direction_is_refused() {
        for f in [
            ClientFrame::Join { room: "r".into() },
            ClientFrame::Leave { room: "r".into() },
            ClientFrame::Ping,
            ClientFrame::Refresh { token: "t".into() },
            ClientFrame::Publish {
                room: "r".into(),
                data: serde_json::json!({"text": "hi"}),
                reference: Some("1".into()),
            },
        ] {
            let bin = encode_client_frame(&f);
            assert_eq!(decode_client_frame(&bin, 1024).unwrap(), f);
            assert!(decode_server_frame(&bin, 1024).is_err());
        }
        let pong = encode_server_frame(&ServerFrame::Pong, Compression::OFF);
        let err = decode_client_frame(&pong, 1024).unwrap_err().to_string();
        assert!(err.contains("sent by servers"), "{err}");
    }

    #[test]
    fn malformed_frames_are_named() {
        let good = encode_client_frame(&ClientFrame::Join { room: "r".into() });
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xBA, 0x7A, 1], "shorter than the 9-byte header"),
            ([&[0u8, 0][..], &good[2..]].concat(), "magic"),
            ([&good[..2], &[2u8][..], &good[3..]].concat(), "version 2"),
            (
                [&good[..3], &[99u8][..], &good[4..]].concat(),
                "unknown frame type 99",
            ),
            (
                [&good[..4], &[0x80u8][..], &good[5..]].concat(),
                "unknown flags",
            ),
            (good[..good.len() - 1].to_vec(), "header says"),
            (
                [&good[..4], &[1u8][..], &good[5..]].concat(),
                "does not inflate",
            ),
        ];
        for (buf, want) in cases {
            let err = decode_client_frame(&buf, 1024).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
        let bad_json = frame(
            FrameType::Publish,
            &pb::PublishFrame {
                room: "r".into(),
                data: "{nope".into(),
                r#ref: String::new(),
            }
            .encode_to_vec(),
            Compression::OFF,
        );
        assert!(
            decode_client_frame(&bad_json, 1024)
                .unwrap_err()
                .to_string()
                .contains("JSON")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_client_frame(&buf, 4096);
            let _ = decode_server_frame(&buf, 4096);
        }

        #[test]
        fn arbitrary_bodies_behind_a_valid_header_never_panic(
            kind in 0u8..32,
            flags in 0u8..2,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut buf = vec![0xBA, 0x7A, 1, kind, flags];
            buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
            buf.extend_from_slice(&body);
            let _ = decode_client_frame(&buf, 4096);
            let _ = decode_server_frame(&buf, 4096);
        }
    }
}
