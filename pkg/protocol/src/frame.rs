//! JSON text frames exchanged over a barrage WebSocket.
//!
//! Every frame is an object with a `type`. Clients send `join`, `leave` and
//! `ping`; the server sends `connected`, `message`, `joined`, `left`,
//! `error` and `pong`. A `message` frame for a fan-out is encoded once by
//! [`encode_message`] and the same bytes go to every recipient.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;

use crate::{StreamKey, StreamPos};
use serde::{Deserialize, Serialize};

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Join a room; answered with `joined` (or `error`).
    Join {
        /// The room to join.
        room: String,
    },
    /// Leave a room; answered with `left` (or `error`).
    Leave {
        /// The room to leave.
        room: String,
    },
    /// Application-level ping; answered with `pong`.
    Ping,
    /// Replace the connection's token before it expires; answered with
    /// `refreshed` (or `error`). The new token must name the same user.
    Refresh {
        /// The new JWT.
        token: String,
    },
    /// Publish to a room the connection is in (live comments); answered
    /// with `ack` or `rejected`.
    Publish {
        /// The room.
        room: String,
        /// The comment, usually `{"text": "..."}`.
        data: serde_json::Value,
        /// Echoed in the answer so the client can match it.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
}

/// A `message` frame as a client decodes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageFrame {
    /// The stream the message belongs to: `room:<id>`, `user:<id>` or `broadcast`.
    pub stream: String,
    /// Message id (the caller's idempotency key or a generated one).
    pub id: String,
    /// Stream epoch at the time of the push.
    pub epoch: u64,
    /// Position of the message in its stream.
    pub seq: u64,
    /// Application event name.
    pub event: String,
    /// The user who published it (client publish); absent for service pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The content: parsed JSON when the pushed content was JSON, a string otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Base64 of a binary payload, present instead of `data` for binary pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_b64: Option<String>,
    /// Unix time in milliseconds when the push was accepted.
    pub timestamp: i64,
}

/// A stream's position as the server reports it at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// Current epoch of the stream.
    pub epoch: u64,
    /// Last sequence number in the stream.
    pub seq: u64,
    /// Present when the client asked to recover this stream: `true` when
    /// every message after its position follows (in order, before any new
    /// one), `false` when they cannot be (epoch changed or the gap is
    /// beyond retention) and the app should refetch its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
}

/// Parses the `positions` query parameter: comma-separated
/// `<stream>@<epoch>:<seq>`, e.g. `room:r1@1838642512266569:42,user:alice@77:3`.
pub fn parse_positions(s: &str) -> Result<BTreeMap<String, StreamPos>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(',').filter(|i| !i.is_empty()) {
        let bad = || format!("{item:?}: expected <stream>@<epoch>:<seq>");
        let (stream, pos) = item.rsplit_once('@').ok_or_else(bad)?;
        let (epoch, seq) = pos.split_once(':').ok_or_else(bad)?;
        let key: StreamKey = stream.parse().map_err(|e| format!("{item:?}: {e}"))?;
        let pos = StreamPos {
            epoch: epoch.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        };
        out.insert(key.to_string(), pos);
    }
    Ok(out)
}

/// Formats positions for the `positions` query parameter.
pub fn format_positions(positions: &BTreeMap<String, StreamPos>) -> String {
    positions
        .iter()
        .map(|(k, p)| format!("{k}@{}:{}", p.epoch, p.seq))
        .collect::<Vec<_>>()
        .join(",")
}

/// A frame the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The session is established and known to the controller: pushes issued
    /// from now on reach this connection.
    Connected {
        /// Id of this connection, unique on its node.
        conn_id: String,
        /// The authenticated user.
        user_id: String,
        /// The connect-node holding the connection.
        node_id: String,
        /// Rooms joined at connect time.
        rooms: Vec<String>,
        /// Position of every stream the connection receives (`user:<id>`,
        /// `broadcast`, each `room:<id>`), and for streams the client gave a
        /// position for, whether every message after it follows.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        streams: BTreeMap<String, StreamState>,
    },
    /// A pushed message.
    Message(MessageFrame),
    /// Several messages in one frame (hot rooms, when the node batches), in
    /// stream order; handle each as if it had come alone.
    Batch {
        /// The messages.
        messages: Vec<MessageFrame>,
    },
    /// A `join` succeeded; pushes to the room issued from now on arrive.
    Joined {
        /// The room joined.
        room: String,
        /// The room's epoch as of the join (with `seq`; absent when its
        /// controller did not say in time).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        epoch: Option<u64>,
        /// The room's seq as of the join: a client stores `epoch:seq` as
        /// the room's position, so a reconnect recovers what followed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// The connection left a room.
    Left {
        /// The room left.
        room: String,
    },
    /// A request was refused; the connection stays open.
    Error {
        /// Machine-readable code, e.g. `invalid_frame`, `invalid_room`.
        code: String,
        /// Human-readable reason.
        message: String,
        /// The room of a refused `join` or `leave`, as the client named it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        room: Option<String>,
    },
    /// Answer to a client `ping`.
    Pong,
    /// A `publish` was accepted and pushed to the room.
    Ack {
        /// The client's `ref`.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// The room.
        room: String,
        /// Message id.
        id: String,
        /// Position of the message in the room's stream.
        seq: u64,
    },
    /// A `publish` was refused; nothing was sent to the room.
    Rejected {
        /// The client's `ref`.
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        /// The room.
        room: String,
        /// Machine-readable reason: `not_allowed`, `not_joined`, `invalid`,
        /// `too_long`, `sensitive`, `duplicate`, `rate_limited`,
        /// `room_rate_limited`, `unavailable`.
        reason: String,
        /// Human-readable detail.
        message: String,
    },
    /// The connection's token was replaced.
    Refreshed {
        /// When the new token expires, seconds since the Unix epoch.
        expires_at: u64,
    },
}

impl ServerFrame {
    /// Serializes the frame as JSON text.
    pub fn to_json(&self) -> String {
        // Serializing these plain structs cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Builds an `error` frame.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code: code.to_owned(),
            message: message.into(),
            room: None,
        }
    }

    /// Builds the `error` frame refusing a `join` or `leave` of `room`.
    pub fn room_error(code: &str, room: impl Into<String>, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code: code.to_owned(),
            message: message.into(),
            room: Some(room.into()),
        }
    }
}

/// Why a client frame was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(String);

impl FrameError {
    pub(crate) fn new(why: impl Into<String>) -> Self {
        FrameError(why.into())
    }
}

/// Parses a client text frame, with an error message fit for an `error` frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    serde_json::from_str(text).map_err(|e| {
        FrameError(format!(
            "expected a JSON object with \"type\": join | leave | ping | refresh | publish ({e})"
        ))
    })
}

/// Everything a `message` frame carries.
#[derive(Debug, Clone, Copy)]
pub struct MessageParts<'a> {
    /// `room:<id>`, `user:<id>` or `broadcast`.
    pub stream: &'a str,
    /// Message id.
    pub id: &'a str,
    /// Stream epoch.
    pub epoch: u64,
    /// Position in the stream.
    pub seq: u64,
    /// Event name.
    pub event: &'a str,
    /// Text content (embedded as JSON when it is JSON).
    pub content: &'a str,
    /// Binary content; sent as `data_b64` when non-empty.
    pub binary: &'a [u8],
    /// Acceptance time, ms since the Unix epoch.
    pub timestamp_ms: i64,
    /// Publishing user for client-published messages; empty otherwise.
    pub from: &'a str,
}

/// Encodes a `message` frame once, to be shared by every recipient.
///
/// `content` is embedded as JSON when it parses as JSON, as a JSON string
/// otherwise; a non-empty `binary` payload is sent base64-encoded as
/// `data_b64` instead.
pub fn encode_message(p: &MessageParts<'_>) -> Bytes {
    let MessageParts {
        stream,
        id,
        epoch,
        seq,
        event,
        content,
        binary,
        timestamp_ms,
        from,
    } = *p;
    let mut out = Vec::with_capacity(96 + stream.len() + id.len() + content.len());
    out.extend_from_slice(br#"{"type":"message","stream":"#);
    push_json_str(&mut out, stream);
    out.extend_from_slice(br#","id":"#);
    push_json_str(&mut out, id);
    out.extend_from_slice(format!(r#","epoch":{epoch},"seq":{seq},"event":"#).as_bytes());
    push_json_str(&mut out, event);
    if !from.is_empty() {
        out.extend_from_slice(br#","from":"#);
        push_json_str(&mut out, from);
    }
    if binary.is_empty() {
        out.extend_from_slice(br#","data":"#);
        if serde_json::from_str::<serde::de::IgnoredAny>(content).is_ok() {
            out.extend_from_slice(content.trim().as_bytes());
        } else {
            push_json_str(&mut out, content);
        }
    } else {
        out.extend_from_slice(br#","data_b64":""#);
        out.extend_from_slice(
            base64::engine::general_purpose::STANDARD
                .encode(binary)
                .as_bytes(),
        );
        out.push(b'"');
    }
    out.extend_from_slice(format!(r#","timestamp":{timestamp_ms}}}"#).as_bytes());
    Bytes::from(out)
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's string escaping; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn encode_message_frame(
        stream: &str,
        id: &str,
        epoch: u64,
        seq: u64,
        event: &str,
        content: &str,
        binary: &[u8],
        timestamp_ms: i64,
    ) -> Bytes {
        encode_message(&MessageParts {
            stream,
            id,
            epoch,
            seq,
            event,
            content,
            binary,
            timestamp_ms,
            from: "",
        })
    }

    fn decode(b: &Bytes) -> MessageFrame {
        match serde_json::from_slice::<ServerFrame>(b).unwrap() {
            ServerFrame::Message(m) => m,
            other => panic!("not a message frame: {other:?}"),
        }
    }

    #[test]
    fn json_content_is_embedded_as_json() {
        let b = encode_message_frame("room:r1", "m1", 7, 3, "comment", r#"{"t":"hi"}"#, &[], 5);
        let m = decode(&b);
        assert_eq!(m.stream, "room:r1");
        assert_eq!((m.epoch, m.seq), (7, 3));
        assert_eq!(m.data, Some(serde_json::json!({"t": "hi"})));
        assert_eq!(m.timestamp, 5);
    }

    #[test]
    fn text_content_becomes_a_string_and_is_escaped() {
        let b = encode_message_frame("user:u\"1", "m\n", 1, 1, "e", "hello \"world\"", &[], 0);
        let m = decode(&b);
        assert_eq!(m.stream, "user:u\"1");
        assert_eq!(m.id, "m\n");
        assert_eq!(m.data, Some(serde_json::json!("hello \"world\"")));
    }

    #[test]
    fn binary_content_is_base64() {
        let b = encode_message_frame("broadcast", "m", 1, 1, "e", "", &[0, 255], 0);
        let m = decode(&b);
        assert_eq!(m.data, None);
        assert_eq!(m.data_b64.as_deref(), Some("AP8="));
    }

    #[test]
    fn positions_round_trip_and_errors_name_the_item() {
        let p = parse_positions("room:r1@18:42,user:a@b@7:3,broadcast@1:0").unwrap();
        assert_eq!(p["room:r1"], StreamPos { epoch: 18, seq: 42 });
        assert_eq!(p["user:a@b"], StreamPos { epoch: 7, seq: 3 });
        assert_eq!(parse_positions(&format_positions(&p)).unwrap(), p);
        assert!(
            parse_positions("room:r1@x:1")
                .unwrap_err()
                .contains("room:r1@x:1")
        );
        assert!(parse_positions("rooms:r1@1:1").is_err());
        assert!(parse_positions("room:r1").is_err());
        assert!(parse_positions("").unwrap().is_empty());
    }

    #[test]
    fn client_frames_parse_and_errors_explain() {
        assert_eq!(
            parse_client_frame(r#"{"type":"join","room":"r"}"#).unwrap(),
            ClientFrame::Join { room: "r".into() }
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        );
        let err = parse_client_frame("nope").unwrap_err().to_string();
        assert!(err.contains("join | leave | ping"), "{err}");
        assert!(parse_client_frame(r#"{"type":"join"}"#).is_err());
    }

    #[test]
    fn error_frames_name_the_room_of_a_refused_join() {
        assert_eq!(
            ServerFrame::room_error("forbidden", "vip", "no").to_json(),
            r#"{"type":"error","code":"forbidden","message":"no","room":"vip"}"#
        );
        assert_eq!(
            ServerFrame::error("rate_limited", "slow down").to_json(),
            r#"{"type":"error","code":"rate_limited","message":"slow down"}"#
        );
    }
}
