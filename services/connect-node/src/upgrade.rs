//! The WebSocket opening handshake (RFC 6455, HTTP/1.1), and the socket
//! it yields: a tungstenite `WebSocketStream` this node writes frames to
//! itself.
//!
//! axum's `WebSocketUpgrade` does the same handshake, but its socket only
//! sends whole messages. tungstenite copies a frame whole into the
//! connection's write buffer, and that buffer keeps its largest size for as
//! long as the connection lives: one large message to a room left every
//! member's connection holding a buffer its size (60 KB messages to 2,000
//! connections cost 122 KB more memory per connection). Here the node
//! sends a large message as fragments (see [`fragments`]), so a write
//! buffer never grows past one fragment and the I/O buffer.

use std::future::Future;

use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::direct::Io;

/// An accepted WebSocket.
pub type Socket = WebSocketStream<Io>;

/// Payload of one fragment of a large message. A message up to this size
/// goes as one frame.
pub const FRAGMENT: usize = 16 * 1024;

/// A request to open a WebSocket, checked as RFC 6455 requires.
pub struct Upgrade {
    key: HeaderValue,
    on_upgrade: OnUpgrade,
    /// Subprotocols the client offered, in its order.
    offered: Vec<String>,
    selected: Option<HeaderValue>,
}

/// Why a request cannot be upgraded: the status and a reason for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused(StatusCode, &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn header_is(headers: &HeaderMap, name: header::HeaderName, value: &str) -> bool {
    headers
        .get(name)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(value.as_bytes()))
}

/// The comma-separated tokens of every `name` header, trimmed.
pub(crate) fn header_tokens(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Refused> {
        if parts.method != Method::GET {
            return Err(Refused(
                StatusCode::METHOD_NOT_ALLOWED,
                "a WebSocket opens with GET",
            ));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(Refused(
                StatusCode::BAD_REQUEST,
                "the Connection header must include 'upgrade'",
            ));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(Refused(
                StatusCode::BAD_REQUEST,
                "the Upgrade header must be 'websocket'",
            ));
        }
        if !header_is(&parts.headers, header::SEC_WEBSOCKET_VERSION, "13") {
            return Err(Refused(
                StatusCode::BAD_REQUEST,
                "Sec-WebSocket-Version must be 13",
            ));
        }
        let key = parts
            .headers
            .get(header::SEC_WEBSOCKET_KEY)
            .cloned()
            .ok_or(Refused(
                StatusCode::BAD_REQUEST,
                "the Sec-WebSocket-Key header is missing",
            ))?;
        let on_upgrade = parts.extensions.remove::<OnUpgrade>().ok_or(Refused(
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        ))?;
        let offered = header_tokens(&parts.headers, header::SEC_WEBSOCKET_PROTOCOL)
            .map(str::to_owned)
            .collect();
        Ok(Upgrade {
            key,
            on_upgrade,
            offered,
            selected: None,
        })
    }
}

impl Upgrade {
    /// Selects the first of `ours` that the client offered.
    pub fn protocols(mut self, ours: impl IntoIterator<Item = &'static str>) -> Self {
        self.selected = ours
            .into_iter()
            .find(|p| self.offered.iter().any(|o| o == p))
            .map(HeaderValue::from_static);
        self
    }

    /// The subprotocol selected, if any.
    pub fn selected_protocol(&self) -> Option<&HeaderValue> {
        self.selected.as_ref()
    }

    /// Answers 101 Switching Protocols and runs `serve` with the socket
    /// once the client has it. With `direct`, a plain TCP socket can be
    /// written by the fan-out itself (see `direct`).
    pub fn on_upgrade<F, Fut>(self, config: WebSocketConfig, direct: bool, serve: F) -> Response
    where
        F: FnOnce(Socket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let (io, read_ahead) = Io::new(upgraded, direct);
            let socket =
                WebSocketStream::from_partially_read(io, read_ahead, Role::Server, Some(config))
                    .await;
            serve(socket).await;
        });
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(v) = HeaderValue::from_str(&accept) {
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
        }
        if let Some(p) = self.selected {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        response
    }
}

/// The frames that carry one data message: the message itself when it is
/// at most [`FRAGMENT`] bytes, else its payload in fragments of that size
/// (a first frame of the message's type, then continuations, the last one
/// final). Clients see one message either way; what changes is that the
/// connection's write buffer holds one fragment at a time.
pub fn fragments(message: Message) -> impl Iterator<Item = Message> {
    let split = match &message {
        Message::Text(t) if t.len() > FRAGMENT => Some((Bytes::from(t.clone()), Data::Text)),
        Message::Binary(b) if b.len() > FRAGMENT => Some((b.clone(), Data::Binary)),
        _ => None,
    };
    let (whole, payload, data) = match split {
        None => (Some(message), Bytes::new(), Data::Binary),
        Some((payload, data)) => (None, payload, data),
    };
    let pieces = payload.len().div_ceil(FRAGMENT);
    whole.into_iter().chain((0..pieces).map(move |i| {
        let end = ((i + 1) * FRAGMENT).min(payload.len());
        let opcode = OpCode::Data(if i == 0 { data } else { Data::Continue });
        Message::Frame(Frame::message(
            payload.slice(i * FRAGMENT..end),
            opcode,
            i + 1 == pieces,
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(m: Message) -> Vec<(bool, OpCode, Bytes)> {
        fragments(m)
            .map(|m| match m {
                Message::Frame(f) => (f.header().is_final, f.header().opcode, f.into_payload()),
                other => panic!("expected a frame, got {other:?}"),
            })
            .collect()
    }

    #[test]
    fn small_messages_go_whole() {
        let text = Message::Text("x".repeat(FRAGMENT).into());
        assert_eq!(fragments(text.clone()).collect::<Vec<_>>(), vec![text]);
        let ping = Message::Ping(Bytes::from_static(b"p"));
        assert_eq!(fragments(ping.clone()).collect::<Vec<_>>(), vec![ping]);
    }

    #[test]
    fn large_messages_go_in_fragments_that_add_up_to_them() {
        let text: String = (0..FRAGMENT * 2 + 10)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let got = frames(Message::Text(text.clone().into()));
        let shape: Vec<_> = got
            .iter()
            .map(|(fin, op, p)| (*fin, *op, p.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (false, OpCode::Data(Data::Text), FRAGMENT),
                (false, OpCode::Data(Data::Continue), FRAGMENT),
                (true, OpCode::Data(Data::Continue), 10),
            ]
        );
        let joined: Vec<u8> = got.iter().flat_map(|(_, _, p)| p.to_vec()).collect();
        assert_eq!(joined, text.as_bytes());

        let binary = Bytes::from(vec![7u8; FRAGMENT + 1]);
        let got = frames(Message::Binary(binary));
        let shape: Vec<_> = got
            .iter()
            .map(|(fin, op, p)| (*fin, *op, p.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (false, OpCode::Data(Data::Binary), FRAGMENT),
                (true, OpCode::Data(Data::Continue), 1),
            ]
        );
    }
}
