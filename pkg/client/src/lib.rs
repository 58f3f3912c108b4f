//! Rust client for barrage WebSockets: connect, join and leave rooms, and
//! receive messages. Used by `barrage sub`, the load tool and the tests.
//!
//! ```no_run
//! # async fn demo() -> Result<(), barrage_client::Error> {
//! let url = barrage_client::connect_url("ws://127.0.0.1:8080/ws", "alice", &["r1"]);
//! let mut client = barrage_client::Client::connect(&url).await?;
//! while let Some(msg) = client.next_message().await? {
//!     println!("{} #{}: {:?}", msg.stream, msg.seq, msg.data);
//! }
//! # Ok(()) }
//! ```

mod fallback;
mod subscriber;

use std::collections::{BTreeMap, VecDeque};

use barrage_protocol::{ClientFrame, MessageFrame, ServerFrame, StreamPos, StreamState, binary};
use futures::{SinkExt, StreamExt};
pub use subscriber::{Event, Subscriber, SubscriberOptions, Transport};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Errors from the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server refused the upgrade with an HTTP status.
    #[error("server refused the connection: HTTP {status}: {body}")]
    Refused {
        /// HTTP status code.
        status: u16,
        /// Response body (the reason).
        body: String,
    },
    /// The server closed the connection with a close frame.
    #[error("closed by server: {code} {reason}")]
    Closed {
        /// WebSocket close code (see `barrage_protocol::CloseCode`).
        code: u16,
        /// Reason text.
        reason: String,
    },
    /// The server answered a request with an `error` frame.
    #[error("server error {code}: {message}")]
    Server {
        /// Machine-readable code.
        code: String,
        /// Reason.
        message: String,
    },
    /// Something that is not a barrage frame arrived.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Transport failure.
    #[error("websocket: {0}")]
    Ws(#[from] tungstenite::Error),
    /// HTTP transport failure (Server-Sent Events, long-polling).
    #[error("http: {0}")]
    Http(String),
}

/// Result type of the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds a `/ws` URL for the insecure development mode (`?user_id=`).
pub fn connect_url(base: &str, user_id: &str, rooms: &[&str]) -> String {
    let mut url = format!("{base}?user_id={}", encode(user_id));
    if !rooms.is_empty() {
        let rooms: Vec<String> = rooms.iter().map(|r| encode(r)).collect();
        url.push_str("&rooms=");
        url.push_str(&rooms.join(","));
    }
    url
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What the server said in its `connected` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Connection id.
    pub conn_id: String,
    /// The authenticated user.
    pub user_id: String,
    /// The connect-node serving the connection.
    pub node_id: String,
    /// Rooms joined at connect time.
    pub rooms: Vec<String>,
    /// Where each stream stood at connect, and whether recovery worked for
    /// the streams a position was given for.
    pub streams: BTreeMap<String, StreamState>,
}

impl Session {
    /// The session a `connected` frame describes.
    pub(crate) fn from_connected(frame: ServerFrame) -> Result<Session> {
        match frame {
            ServerFrame::Connected {
                conn_id,
                user_id,
                node_id,
                rooms,
                streams,
            } => Ok(Session {
                conn_id,
                user_id,
                node_id,
                rooms,
                streams,
            }),
            other => Err(Error::Protocol(format!(
                "expected a connected frame first, got {other:?}"
            ))),
        }
    }
}

/// The frame format a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// JSON text frames (the default).
    #[default]
    Json,
    /// Compact binary frames: subprotocol `barrage.v1.bin`.
    Binary,
}

/// Largest frame body the client accepts (after decompression).
const MAX_FRAME_BODY: usize = 64 << 20;

/// A live connection to a connect-node.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: Session,
    pending: VecDeque<ServerFrame>,
    format: Format,
}

impl Client {
    /// Connects with JSON frames and waits for `connected`: once this
    /// returns, every push issued afterwards reaches this connection.
    pub async fn connect(url: &str) -> Result<Client> {
        Self::connect_with(url, Format::Json).await
    }

    /// Connects asking for `format`. A server that does not offer binary
    /// frames answers in JSON; [`Client::format`] tells which was agreed.
    pub async fn connect_with(url: &str, format: Format) -> Result<Client> {
        use tungstenite::client::IntoClientRequest as _;
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = 8 * 1024;
        config.write_buffer_size = 0;
        let mut request = url.into_client_request()?;
        if format == Format::Binary {
            request.headers_mut().insert(
                http::header::SEC_WEBSOCKET_PROTOCOL,
                http::HeaderValue::from_static(binary::SUBPROTOCOL),
            );
        }
        let (mut ws, response) =
            match tokio_tungstenite::connect_async_with_config(request, Some(config), true).await {
                Ok(ok) => ok,
                Err(tungstenite::Error::Http(resp)) => {
                    let status = resp.status().as_u16();
                    let body = resp
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                        .unwrap_or_default();
                    return Err(Error::Refused { status, body });
                }
                Err(e) => return Err(e.into()),
            };
        let agreed = response
            .headers()
            .get(http::header::SEC_WEBSOCKET_PROTOCOL)
            .is_some_and(|p| p == binary::SUBPROTOCOL);
        let session = Session::from_connected(read_frame(&mut ws).await?)?;
        Ok(Client {
            ws,
            session,
            pending: VecDeque::new(),
            format: if agreed { Format::Binary } else { Format::Json },
        })
    }

    /// The frame format the server agreed to.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The session the server confirmed.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Joins a room and waits for `joined`; frames arriving meanwhile are
    /// kept. Returns the room's position as of the join, when the server
    /// gave one: store it as the room's position (unless a message of the
    /// room already moved past it), so that a reconnect recovers what was
    /// pushed after the join.
    pub async fn join(&mut self, room: &str) -> Result<Option<StreamPos>> {
        self.send(&ClientFrame::Join { room: room.into() }).await?;
        let joined = self
            .await_reply(|f| matches!(f, ServerFrame::Joined { room: r, .. } if r == room))
            .await?;
        Ok(match joined {
            ServerFrame::Joined {
                epoch: Some(epoch),
                seq: Some(seq),
                ..
            } => Some(StreamPos { epoch, seq }),
            _ => None,
        })
    }

    /// Leaves a room and waits for `left`.
    pub async fn leave(&mut self, room: &str) -> Result<()> {
        self.send(&ClientFrame::Leave { room: room.into() }).await?;
        self.await_reply(|f| matches!(f, ServerFrame::Left { room: r } if r == room))
            .await
            .map(drop)
    }

    /// Sends a client frame in the connection's format.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        let msg = match self.format {
            Format::Json => Message::Text(
                serde_json::to_string(frame)
                    .map_err(|e| Error::Protocol(e.to_string()))?
                    .into(),
            ),
            Format::Binary => Message::Binary(binary::encode_client_frame(frame)),
        };
        self.send_raw(msg).await
    }

    /// Sends any WebSocket message as it is (for testing servers).
    pub async fn send_raw(&mut self, msg: Message) -> Result<()> {
        self.ws.send(msg).await?;
        Ok(())
    }

    async fn await_reply(&mut self, want: impl Fn(&ServerFrame) -> bool) -> Result<ServerFrame> {
        let mut held = VecDeque::new();
        let result = loop {
            match read_frame(&mut self.ws).await {
                Ok(f) if want(&f) => break Ok(f),
                Ok(ServerFrame::Error { code, message, .. }) => {
                    break Err(Error::Server { code, message });
                }
                Ok(f) => held.push_back(f),
                Err(e) => break Err(e),
            }
        };
        self.pending.extend(held);
        result
    }

    /// The next frame of any type; `None` when the server closed normally.
    pub async fn next_frame(&mut self) -> Result<Option<ServerFrame>> {
        loop {
            if let Some(f) = self.pending.pop_front() {
                return Ok(Some(f));
            }
            match read_frame(&mut self.ws).await {
                // A batch is its messages, one after the other.
                Ok(ServerFrame::Batch { messages }) => self
                    .pending
                    .extend(messages.into_iter().map(ServerFrame::Message)),
                Ok(f) => return Ok(Some(f)),
                Err(Error::Closed { code: 1000, .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next `message` frame, skipping other frames; `None` at a normal close.
    pub async fn next_message(&mut self) -> Result<Option<MessageFrame>> {
        loop {
            match self.next_frame().await? {
                Some(ServerFrame::Message(m)) => return Ok(Some(m)),
                Some(_) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) -> Result<()> {
        self.ws
            .close(Some(tungstenite::protocol::CloseFrame {
                code: WsCloseCode::Normal,
                reason: "bye".into(),
            }))
            .await?;
        Ok(())
    }
}

async fn read_frame(ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>) -> Result<ServerFrame> {
    loop {
        let msg = match ws.next().await {
            Some(Ok(m)) => m,
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => {
                return Err(Error::Closed {
                    code: 1006,
                    reason: "connection dropped".into(),
                });
            }
            Some(Err(e)) => return Err(e.into()),
        };
        match msg {
            Message::Text(t) => {
                return serde_json::from_str(t.as_str())
                    .map_err(|e| Error::Protocol(format!("bad frame {t:?}: {e}")));
            }
            Message::Close(c) => {
                let (code, reason) = c
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                return Err(Error::Closed { code, reason });
            }
            Message::Binary(b) => {
                return binary::decode_server_frame(&b, MAX_FRAME_BODY)
                    .map_err(|e| Error::Protocol(e.to_string()));
            }
            _ => continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_encoded() {
        assert_eq!(
            connect_url("ws://h/ws", "a b", &["r1", "r&2"]),
            "ws://h/ws?user_id=a%20b&rooms=r1,r%262"
        );
        assert_eq!(connect_url("ws://h/ws", "u", &[]), "ws://h/ws?user_id=u");
    }
}
