//! The WebSocket endpoint `GET /ws`: admission, the connection's task, and
//! the client frames `join`, `leave` and `ping`.
//!
//! A connection is announced to the controllers before the client hears
//! `connected` (and each join before `joined`), so any push issued after
//! the client saw that frame reaches it. Outbound frames go through a
//! bounded queue. One task per connection reads client frames, drains the
//! queue (writing whatever is queued, then flushing once) and sends pings;
//! a client frame that waits for a controller (a `join`) is handled
//! alongside, so queued frames keep flowing meanwhile.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use barrage_auth::{AuthError, Claims};
use barrage_proto::v1::HistoryQuery;
use barrage_protocol::{
    ClientFrame, CloseCode, RoomId, ServerFrame, StreamKey, StreamPos, StreamState, UserId, binary,
    parse_client_frame, parse_positions,
};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use crate::direct::Way;
use crate::gate::Gate;
use crate::hub::{ConnHandle, Hub, Outbound, Registered, Wire};
use crate::metrics::Metrics;
use crate::queue;
use crate::skip::{Skip, SkipRule};
use crate::upgrade::{Socket as WebSocket, Upgrade, fragments, header_tokens};

/// Settings of the WebSocket endpoint.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Node id, echoed in `connected`.
    pub node_id: String,
    /// Accept `?user_id=` without a token (development only).
    pub insecure_user_id: bool,
    /// Verifies connection tokens.
    pub auth: barrage_auth::ConnectAuth,
    /// Grace after a token's expiry before the connection is closed (4405).
    pub token_leeway: Duration,
    /// Largest inbound frame in bytes; bigger ones close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms: usize,
    /// Interval of server pings.
    pub ping_interval: Duration,
    /// A connection silent for this long is closed with 4001.
    pub read_timeout: Duration,
    /// tungstenite write buffer size per connection, in bytes.
    pub io_buffer: usize,
    /// tungstenite read buffer size per connection, in bytes: resident for
    /// the connection's life, so small (client frames are small).
    pub read_buffer: usize,
    /// How long a connect or join may wait for the controllers.
    pub ack_timeout: Duration,
    /// Connections this node accepts at most (503 beyond).
    pub max_connections: usize,
    /// Connections one user may hold on this node (429 beyond).
    pub max_connections_per_user: usize,
    /// Frames a client may send per second (burst twice that); excess frames
    /// are answered with a `rate_limited` error and dropped.
    pub messages_per_sec: u32,
    /// Browser origins allowed to connect; empty: any.
    pub allowed_origins: Vec<String>,
    /// Coalesce messages into `batch` frames; `None`: one frame per message.
    pub batching: Option<Batching>,
}

/// What the WebSocket handler needs.
#[derive(Clone)]
pub struct WsState {
    /// The node's connections.
    pub hub: Arc<Hub>,
    /// Endpoint settings.
    pub settings: Arc<WsSettings>,
    /// Metrics of the node.
    pub metrics: Metrics,
    /// Cancelled when the node drains: new upgrades are refused.
    pub draining: CancellationToken,
    /// New connections per second per client IP (429 beyond).
    pub per_ip: Option<Arc<PerIpLimiter>>,
    /// Client publishing (`publish` frames); `None`: refused.
    pub publisher: Option<Arc<crate::publish::Publisher>>,
}

/// The limit of new connections per second per client IP.
pub type PerIpLimiter = governor::DefaultKeyedRateLimiter<std::net::IpAddr>;

/// Query string of `GET /ws`.
#[derive(Debug, Deserialize)]
pub struct ConnectParams {
    token: Option<String>,
    user_id: Option<String>,
    rooms: Option<String>,
    /// Where to resume (`/poll` also takes it as `since`).
    #[serde(alias = "since")]
    pub(crate) positions: Option<String>,
    /// `/poll` only: seconds to hold the request when nothing is pending.
    pub(crate) timeout_secs: Option<u64>,
}

fn reject(state: &WsState, status: StatusCode, reason: &'static str, msg: String) -> Response {
    state.metrics.rejected.with_label_values(&[reason]).inc();
    (status, msg).into_response()
}

/// The token a client presented: `?token=`, `Authorization: Bearer`, or a
/// `bearer.<JWT>` WebSocket subprotocol (what browsers can send).
fn presented_token(params: &ConnectParams, headers: &HeaderMap) -> Option<String> {
    if let Some(t) = params.token.as_deref().filter(|t| !t.is_empty()) {
        return Some(t.to_owned());
    }
    if let Some(h) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
    {
        return Some(t.trim().to_owned());
    }
    header_tokens(headers, header::SEC_WEBSOCKET_PROTOCOL)
        .find_map(|p| p.strip_prefix("bearer.").map(str::to_owned))
}

/// Who is connecting, with what: the outcome of admission.
pub(crate) struct Admission {
    pub(crate) user: UserId,
    pub(crate) rooms: Vec<RoomId>,
    pub(crate) positions: BTreeMap<String, StreamPos>,
    pub(crate) claims: Option<Claims>,
}

/// Checks a connection request (WebSocket, SSE or long-poll): draining,
/// origin, rate and connection limits, token, user, rooms and positions.
/// A refusal is the HTTP answer, already counted.
#[allow(clippy::result_large_err)] // the refusal is the response itself, built once
pub(crate) fn admit(
    state: &WsState,
    params: ConnectParams,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<Admission, Response> {
    let reject = |_: &&WsState,
                  status: StatusCode,
                  reason: &'static str,
                  msg: String|
     -> Result<Admission, Response> { Err(reject(state, status, reason, msg)) };
    if state.draining.is_cancelled() {
        return reject(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is shutting down; connect to another node\n".into(),
        );
    }
    let settings = &state.settings;
    if !settings.allowed_origins.is_empty()
        && let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
        && !settings.allowed_origins.iter().any(|o| o == origin)
    {
        return reject(
            &state,
            StatusCode::FORBIDDEN,
            "origin",
            format!("origin {origin} is not allowed\n"),
        );
    }
    if let Some(limiter) = &state.per_ip
        && limiter.check_key(&peer.ip()).is_err()
    {
        return reject(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many new connections from this address; retry with backoff\n".into(),
        );
    }
    if state.hub.connection_count() >= settings.max_connections {
        return reject(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "node_full",
            "this node is full; connect to another node\n".into(),
        );
    }
    let claims = match presented_token(&params, headers) {
        Some(token) => match state.settings.auth.verify(&token) {
            Ok(c) => Some(c),
            Err(e) => {
                return reject(
                    &state,
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    format!("{e}\n"),
                );
            }
        },
        None if state.settings.insecure_user_id => None,
        None => {
            let hint = if state.settings.auth.is_enabled() {
                AuthError::Missing.to_string()
            } else {
                "this node accepts no logins: configure JWT_HS256_SECRET, JWT_PUBLIC_KEY_FILE or JWT_JWKS_FILE (or INSECURE_USER_ID=true for development)".to_owned()
            };
            return reject(
                &state,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!("{hint}\n"),
            );
        }
    };
    let user_id = match &claims {
        Some(c) => c.sub.clone(),
        None => params.user_id.unwrap_or_default(),
    };
    let user = match UserId::new(user_id) {
        Ok(u) => u,
        Err(e) => {
            return reject(
                &state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("user_id: {e}\n"),
            );
        }
    };
    if state.hub.user_connection_count(&user) >= settings.max_connections_per_user {
        return reject(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "user_limit",
            format!(
                "user {user} already holds {} connections on this node (the limit)\n",
                settings.max_connections_per_user
            ),
        );
    }
    // Refused as soon as the list passes the limit: the query string is
    // the client's, and may hold far more names than a connection may join.
    let mut rooms = Vec::new();
    let mut seen = HashSet::new();
    for r in params
        .rooms
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|r| !r.is_empty())
    {
        if !seen.insert(r) {
            continue;
        }
        if rooms.len() == settings.max_rooms {
            return reject(
                &state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "rooms: at most {} rooms per connection\n",
                    settings.max_rooms
                ),
            );
        }
        match RoomId::new(r) {
            Ok(room) => rooms.push(room),
            Err(e) => {
                return reject(
                    &state,
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("rooms: {r:?}: {e}\n"),
                );
            }
        }
    }
    if let Some(c) = &claims
        && let Some(room) = rooms.iter().find(|r| !c.allows_room(r.as_str()))
    {
        return reject(
            &state,
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("rooms: the token does not allow joining {room}\n"),
        );
    }
    let positions = match parse_positions(params.positions.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => {
            return reject(
                &state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("positions: {e}\n"),
            );
        }
    };
    Ok(Admission {
        user,
        rooms,
        positions,
        claims,
    })
}

/// `GET /ws?token=<JWT>&rooms=a,b` (or `?user_id=` in insecure mode)
pub async fn ws_handler(
    State(state): State<WsState>,
    Query(params): Query<ConnectParams>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    upgrade: Upgrade,
) -> Response {
    let Admission {
        user,
        rooms,
        positions,
        claims,
    } = match admit(&state, params, &headers, peer) {
        Ok(a) => a,
        Err(refused) => return refused,
    };
    let s = &state.settings;
    // Browsers pass the token as a `bearer.<JWT>` subprotocol next to
    // `barrage`; the handshake must then select `barrage`. A client that
    // offers `barrage.v1.bin` gets binary frames.
    let upgrade = upgrade.protocols([binary::SUBPROTOCOL, "barrage"]);
    let wire = match upgrade.selected_protocol() {
        Some(p) if p == binary::SUBPROTOCOL => Wire::Binary(state.hub.compression()),
        _ => Wire::Json,
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(s.read_buffer)
        .write_buffer_size(s.io_buffer)
        // No cap on what one write may buffer: a cap a frame could exceed
        // would fail the write and drop the connection, and the client,
        // recovering from its position, would be sent the same frame
        // again, forever. The node writes large messages in fragments
        // (`upgrade::fragments`), and a write waits until the buffer is
        // drained, so it holds at most `io_buffer` and one fragment.
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(s.max_frame_bytes))
        .max_frame_size(Some(s.max_frame_bytes));
    upgrade.on_upgrade(config, state.hub.direct_writes(), move |socket| {
        serve(state, socket, wire, user, rooms, positions, claims)
    })
}

/// A session that is registered, recovered and told `connected`.
struct Established {
    registered: Registered,
    rx: queue::Receiver<Outbound>,
    socket: WebSocket,
    skip: Skip,
    receipt: Option<Box<Receipt>>,
}

/// Serves one WebSocket for its whole life. Set-up runs in its own boxed
/// future: it awaits controller calls whose futures are large, and this
/// task stays allocated at its largest state for as long as the
/// connection is open (a few KiB per idle connection otherwise).
async fn serve(
    state: WsState,
    socket: WebSocket,
    wire: Wire,
    user: UserId,
    rooms: Vec<RoomId>,
    positions: BTreeMap<String, StreamPos>,
    claims: Option<Claims>,
) {
    let Some(Established {
        registered,
        rx,
        mut socket,
        skip,
        receipt,
    }) = Box::pin(establish(&state, socket, wire, user, rooms, positions)).await
    else {
        return;
    };
    let session = Session {
        claims: Mutex::new(claims),
    };
    let usable = run_session(
        &state,
        &mut socket,
        rx,
        &registered.conn,
        &session,
        skip,
        receipt,
    )
    .await;
    let conn = registered.conn.clone();
    // Out of the hub before the close handshake, which may take a while.
    drop(registered);
    let code = conn.close_code().unwrap_or(CloseCode::Normal);
    if usable {
        close_socket(&mut socket, code, code.reason()).await;
    }
    state.metrics.count_disconnect(code);
    tracing::debug!(conn = conn.id, code = code.code(), "disconnected");
}

/// Registers the connection, recovers what it missed, and sends
/// `connected` and the missed messages. None when the session could not be
/// established (the client was told, or is gone).
async fn establish(
    state: &WsState,
    mut socket: WebSocket,
    wire: Wire,
    user: UserId,
    rooms: Vec<RoomId>,
    positions: BTreeMap<String, StreamPos>,
) -> Option<Established> {
    let hub = &state.hub;
    let settings = &state.settings;
    let way = socket.get_ref().way().cloned();
    let (conn, mut rx, ack) = hub.connect(user.clone(), &rooms, wire, way);
    // Left on every way out of this task, a panic included.
    let registered = Registered {
        hub: hub.clone(),
        conn: conn.clone(),
    };
    // Registered first, then announced, then history fetched: every message
    // is either in the history answer or queued live (or both: deduplicated).
    let recovery = if ack.wait(settings.ack_timeout).await {
        recover(hub, &user, &rooms, &positions, settings.ack_timeout).await
    } else {
        Err("no controller confirmed the session".to_owned())
    };
    let mut recovery = match recovery {
        Ok(r) => {
            // Frames queued until now are checked by this task's copy of
            // the rules; frames offered from now on, also those written to
            // the socket directly, by the connection's.
            conn.skip_recovered(&r.skip);
            r
        }
        Err(why) => {
            tracing::warn!(user = %user, reason = %why, "cannot establish the session; closing");
            drop(registered);
            let code = CloseCode::InternalError;
            close_socket(&mut socket, code, "no controller available, reconnect").await;
            state.metrics.count_disconnect(code);
            return None;
        }
    };
    let connected = ServerFrame::Connected {
        conn_id: format!("{}-{}", settings.node_id, conn.id),
        user_id: user.to_string(),
        node_id: settings.node_id.clone(),
        rooms: rooms.iter().map(ToString::to_string).collect(),
        streams: recovery.streams,
    };
    let connected = match wire {
        Wire::Json => Message::Text(connected.to_json().into()),
        Wire::Binary(c) => Message::Binary(binary::encode_server_frame(&connected, c)),
    };
    // Live frames queued while the session was set up (for as long as its
    // controllers took to confirm it) go right after the missed ones;
    // those recovery sent, or older than where `connected` starts a
    // stream, are dropped. A frame offered as the connection's rules were
    // installed may still be queued after this: the task's copy checks it
    // (and is forgotten with the connection's, see `SKIP_MEMORY`).
    while let Ok(out) = rx.try_recv() {
        if !recovery.skip.already_sent(&out) {
            recovery.missed.push(out);
        }
    }
    // A client that has not taken all of it within the read timeout is
    // dropped and counted as a slow consumer, as in the session loop.
    let sent = tokio::time::timeout(settings.read_timeout, async {
        let mut sent = feed(&mut socket, connected).await;
        for out in recovery.missed {
            sent = sent && feed(&mut socket, to_wire(out, wire)).await;
        }
        if recovery.receipt.is_some() {
            let ping = Message::Ping(bytes::Bytes::from_static(RECEIPT_PING));
            sent = sent && socket.feed(ping).await.is_ok();
        }
        sent && socket.flush().await.is_ok()
    })
    .await;
    if sent != Ok(true) {
        drop(registered);
        // Counted like a session that ends: too slow, or the socket failed
        // (as a read failure is, 1006).
        let code = if sent.is_err() {
            CloseCode::SlowConsumer
        } else {
            CloseCode::Abnormal
        };
        conn.close_with(code);
        state.metrics.count_disconnect(code);
        return None;
    }
    if recovery.recovered_messages > 0 {
        state
            .metrics
            .recovered_messages
            .inc_by(recovery.recovered_messages);
    }
    tracing::debug!(conn = conn.id, user = %user, rooms = rooms.len(), "connected");
    Some(Established {
        registered,
        rx,
        socket,
        skip: recovery.skip,
        receipt: recovery.receipt,
    })
}

/// Feeds one message to the socket, in fragments when it is large
/// (`upgrade::fragments`); false when the socket failed.
async fn feed(sink: &mut WebSocket, message: Message) -> bool {
    for m in fragments(message) {
        if sink.feed(m).await.is_err() {
            return false;
        }
    }
    true
}

/// The WebSocket message for a queued frame in the connection's format.
fn to_wire(out: Outbound, wire: Wire) -> Message {
    match wire {
        Wire::Json => Message::Text(out.frame.clone()),
        Wire::Binary(_) => Message::Binary(out.binary.clone()),
    }
}

/// Sends a close frame with `code`, or, when the client closed first, the
/// answer to its close; a client that takes neither within 2 s is dropped.
async fn close_socket(socket: &mut WebSocket, code: CloseCode, reason: &str) {
    if code == CloseCode::Abnormal {
        // Not a code to send (RFC 6455 §7.4.1): the socket is gone anyway.
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if socket.send(close_message(code, reason)).await.is_err() {
            // The client closed first: the WebSocket library refuses a
            // close of our own and has queued the answer to the client's
            // (its code echoed, RFC 6455 §5.5.1) for the next flush.
            // Without it the client would see 1006.
            let _ = socket.flush().await;
        }
    })
    .await;
}

fn close_message(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.code().into(),
        reason: Utf8Bytes::from(reason),
    }))
}

/// A client frame being handled: it may wait for a controller.
type Handling<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// Runs the connection until it ends: reads client frames, writes queued
/// frames (feeding all that are ready, then one flush), sends pings. The
/// reason is left in the connection's close code. Returns whether the
/// socket can still take a close frame.
async fn run_session(
    state: &WsState,
    socket: &mut WebSocket,
    mut rx: queue::Receiver<Outbound>,
    conn: &Arc<ConnHandle>,
    session: &Session,
    mut skip: Skip,
    mut receipt: Option<Box<Receipt>>,
) -> bool {
    let settings = &state.settings;
    let batching = settings.batching;
    let rate = NonZeroU32::new(settings.messages_per_sec).unwrap_or(NonZeroU32::MIN);
    // On the standard monotonic clock: governor's default clock probes the
    // CPU (CPUID) each time one is made, which a virtual machine traps, and
    // one is made per connection: a sixteenth of a node's CPU in a
    // reconnect storm (BENCHMARKS.md). A client frame is checked at most
    // `messages_per_sec` times a second; reading the clock costs nothing
    // next to that.
    let limiter = governor::RateLimiter::direct_with_clock(
        governor::Quota::per_second(rate)
            .allow_burst(rate.saturating_mul(NonZeroU32::MIN.saturating_add(1))),
        governor::clock::MonotonicClock,
    );
    let mut ping = tokio::time::interval(settings.ping_interval);
    ping.reset();
    // When this task's copy of the skip rules was made (see `SKIP_MEMORY`).
    let skip_since = std::time::Instant::now();
    // A tick a write took while it waited: its ping is sent next.
    let mut ping_owed = false;
    // Timers and the close signal live across iterations: a delivered
    // frame wakes this loop, and must not register new timers each time.
    let mut closing = conn.close_signal();
    let read_timer = tokio::time::sleep(settings.read_timeout);
    tokio::pin!(read_timer);
    let never = || tokio::time::Instant::now() + NEVER;
    let mut exp = session.expiry();
    let expiry = tokio::time::sleep_until(
        session
            .deadline(settings.token_leeway)
            .unwrap_or_else(never),
    );
    tokio::pin!(expiry);
    // One client frame at a time: while one is handled, the next is not
    // read (backpressure), but frames to the client keep going out.
    let mut handling: Option<Handling<'_>> = None;
    // The socket and the timers are polled when they may be ready, not on
    // every wake-up for a queued frame.
    let gate = Gate::new();
    let (mut read_door, mut expiry_door) = (gate.door(), gate.door());
    let (mut read_timer_door, mut ping_door) = (gate.door(), gate.door());
    // The socket's way for frames the fan-out writes itself (`direct`),
    // opened whenever this loop has nothing left to write.
    let way = conn.way();
    loop {
        // Biased: closing first; a waiting read before the read deadline,
        // so a busy connection is never taken for a silent one; reads
        // before writes, so a backlog cannot starve them.
        tokio::select! {
            biased;
            () = &mut closing => return true,
            () = std::future::poll_fn(|cx| expiry_door.poll(cx, |cx| expiry.as_mut().poll(cx))),
                if exp.is_some() => {
                conn.close_with(CloseCode::TokenExpired);
                return true;
            }
            () = async { handling.as_mut().expect("branch enabled only while handling").await },
                if handling.is_some() => {
                handling = None;
                // A `refresh` moves the token's expiry.
                let now_exp = session.expiry();
                if now_exp != exp {
                    exp = now_exp;
                    expiry.as_mut().reset(session.deadline(settings.token_leeway).unwrap_or_else(never));
                    expiry_door.open();
                }
            }
            next = std::future::poll_fn(|cx| read_door.poll(cx, |cx| socket.poll_next_unpin(cx))),
                if handling.is_none() => {
                read_timer.as_mut().reset(tokio::time::Instant::now() + settings.read_timeout);
                read_timer_door.open();
                let msg = match next {
                    None => {
                        conn.close_with(CloseCode::Abnormal);
                        return false;
                    }
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("Space limit exceeded") || text.contains("too long") {
                            conn.close_with(CloseCode::MessageTooBig);
                            return true;
                        }
                        tracing::debug!(conn = conn.id, error = %text, "websocket read failed");
                        conn.close_with(CloseCode::Abnormal);
                        return false;
                    }
                    Some(Ok(m)) => m,
                };
                let frame = match msg {
                    Message::Binary(_) if conn.wire == Wire::Json => {
                        conn.close_with(CloseCode::InvalidFrame);
                        return true;
                    }
                    Message::Text(_) | Message::Binary(_) if limiter.check().is_err() => {
                        send_error(
                            state,
                            conn,
                            "rate_limited",
                            format!(
                                "more than {} frames per second; this frame was dropped",
                                settings.messages_per_sec
                            ),
                        );
                        continue;
                    }
                    Message::Text(text) => parse_client_frame(text.as_str()).map_err(|e| e.to_string()),
                    Message::Binary(b) => binary::decode_client_frame(&b, settings.max_frame_bytes)
                        .map_err(|e| e.to_string()),
                    Message::Close(_) => {
                        conn.close_with(CloseCode::Normal);
                        return true;
                    }
                    Message::Pong(payload) => {
                        if payload.as_ref() == RECEIPT_PING
                            && let Some(r) = receipt.take()
                        {
                            r.report(&state.hub, &conn.user);
                        }
                        continue;
                    }
                    // Reads yield whole messages, never raw frames.
                    Message::Ping(_) | Message::Frame(_) => continue,
                };
                match frame {
                    // Boxed: rare, and larger than the rest of this loop.
                    Ok(f) => handling = Some(Box::pin(handle_frame(state, conn, session, f))),
                    Err(e) => send_error(state, conn, "invalid_frame", e),
                }
            }
            // Not while a frame is handled: reads are paused by us then.
            () = std::future::poll_fn(|cx| read_timer_door.poll(cx, |cx| read_timer.as_mut().poll(cx))),
                if handling.is_none() => {
                conn.close_with(CloseCode::ReadTimeout);
                return true;
            }
            // Before the frames: a connection that always has one to
            // write is pinged too (its client may be silent, and pongs are
            // what keep it from the read timeout).
            _ = std::future::poll_fn(|cx| {
                if ping_owed {
                    return std::task::Poll::Ready(());
                }
                ping_door.poll(cx, |cx| ping.poll_tick(cx)).map(drop)
            }) => {
                ping_owed = false;
                let now = std::time::Instant::now();
                conn.forget_old_skip(now);
                if !skip.is_empty() && now.saturating_duration_since(skip_since) >= crate::hub::SKIP_MEMORY {
                    skip = Skip::default();
                }
                // Like any write, a ping can block on a client that stopped
                // reading; closing must still win.
                let frame = std::pin::pin!(socket.send(Message::Ping(Default::default())));
                let sent = write_within(frame, &mut closing, (&mut ping_door, &mut ping, &mut ping_owed), settings.read_timeout).await;
                if let Some(usable) = after_write(sent.map(|r| r.is_ok()), conn) {
                    return usable;
                }
            }
            out = std::future::poll_fn(|cx| poll_outbound(cx, &mut rx, way)) => {
                let frame = match out {
                    Next::Frame(f) => f,
                    Next::Closed => return true,
                    Next::Rest => {
                        // The end of a frame the fan-out wrote in part:
                        // flushing writes it (`direct::Io`).
                        let flush = std::pin::pin!(socket.flush());
                        let flushed = write_within(flush, &mut closing, (&mut ping_door, &mut ping, &mut ping_owed), settings.read_timeout).await;
                        if let Some(usable) = after_write(flushed.map(|r| r.is_ok()), conn) {
                            return usable;
                        }
                        continue;
                    }
                };
                // A client that stops reading blocks this write; closing
                // (e.g. as a slow consumer) must still win, and a client
                // that takes nothing for the read timeout is given up.
                let write = std::pin::pin!(async {
                    match batching {
                        Some(b) if frame.position.is_some() => {
                            write_batch(socket, &mut rx, &mut skip, frame, b, state, conn.wire).await
                        }
                        _ => write_ready(socket, &mut rx, &mut skip, frame, conn.wire).await,
                    }
                });
                let written = write_within(write, &mut closing, (&mut ping_door, &mut ping, &mut ping_owed), settings.read_timeout).await;
                if let Some(usable) = after_write(written, conn) {
                    return usable;
                }
            }
        }
    }
}

/// What the session loop writes next.
enum Next {
    /// A queued frame.
    Frame(Outbound),
    /// The end of a frame the fan-out wrote only in part.
    Rest,
    /// The queue is drained and its sender gone.
    Closed,
}

/// The next thing to write. With nothing queued, opens the connection's
/// way so that the next frame is written by the fan-out itself (`direct`),
/// without waking this task. Copies of frames recovery sent are dropped
/// before either path (`ConnHandle::offer`).
fn poll_outbound(
    cx: &mut std::task::Context<'_>,
    rx: &mut queue::Receiver<Outbound>,
    way: Option<&Way>,
) -> std::task::Poll<Next> {
    use std::task::Poll;
    match rx.poll_recv(cx) {
        Poll::Ready(Some(f)) => return Poll::Ready(Next::Frame(f)),
        Poll::Ready(None) => return Poll::Ready(Next::Closed),
        Poll::Pending => {}
    }
    match way {
        // The task is registered for the queue's wake-ups (also sent for
        // a partly written frame) before the way is looked at.
        Some(way) if way.open_if(|| rx.is_empty()) => Poll::Ready(Next::Rest),
        _ => Poll::Pending,
    }
}

/// Feeds `first` and every frame already queued behind it, then flushes once.
async fn write_ready(
    sink: &mut WebSocket,
    rx: &mut queue::Receiver<Outbound>,
    skip: &mut Skip,
    first: Outbound,
    wire: Wire,
) -> bool {
    let mut next = Some(first);
    // At most this many per call: a client that takes frames about as
    // fast as they are queued would otherwise keep one write going past
    // the read timeout and be dropped as stalled, and pings would wait.
    let mut left = MAX_FRAMES_PER_WRITE;
    while let Some(frame) = next {
        if !skip.already_sent(&frame) && !feed(sink, to_wire(frame, wire)).await {
            return false;
        }
        left -= 1;
        next = if left == 0 { None } else { rx.try_recv().ok() };
    }
    sink.flush().await.is_ok()
}

/// Frames one write of the session loop takes from the queue at most.
const MAX_FRAMES_PER_WRITE: usize = 64;

/// Coalescing of message frames into `batch` frames.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// How long to wait for more messages after the first.
    pub window: Duration,
    /// Most messages in one batch.
    pub max: usize,
}

/// Gathers message frames for up to the batching window and sends them as
/// one `{"type":"batch","messages":[…]}` frame (one message goes alone).
/// A non-message frame ends the batch and follows it, so order is kept.
async fn write_batch(
    sink: &mut WebSocket,
    rx: &mut queue::Receiver<Outbound>,
    skip: &mut Skip,
    first: Outbound,
    b: Batching,
    state: &WsState,
    wire: Wire,
) -> bool {
    let deadline = tokio::time::Instant::now() + b.window;
    let mut frames = vec![first];
    let mut after = None;
    while frames.len() < b.max {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(f)) if f.position.is_some() => frames.push(f),
            Ok(Some(f)) => {
                after = Some(f);
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    frames.retain(|f| !skip.already_sent(f));
    let ok = match frames.len() {
        0 => true,
        1 => feed(sink, to_wire(frames.swap_remove(0), wire)).await,
        n => {
            let metrics = &state.metrics;
            metrics.batch_frames.inc();
            metrics.batched_messages.inc_by(n as u64);
            let (batch, shared) = state.hub.batches().get(&frames, wire);
            if shared {
                metrics.batch_frames_shared.inc();
            }
            feed(sink, batch).await
        }
    };
    if !ok {
        return false;
    }
    if let Some(f) = after
        && !skip.already_sent(&f)
        && !feed(sink, to_wire(f, wire)).await
    {
        return false;
    }
    sink.flush().await.is_ok()
}

fn send_frame(conn: &ConnHandle, frame: ServerFrame) {
    conn.send(&frame);
}

/// What recovery at connect produced.
pub(crate) struct Recovery {
    pub(crate) streams: BTreeMap<String, StreamState>,
    /// Missed messages, in stream order, to send right after `connected`.
    pub(crate) missed: Vec<Outbound>,
    pub(crate) recovered_messages: u64,
    pub(crate) skip: Skip,
    /// Messages kept for the user while offline are among `missed`: the
    /// controller hands them out until this node reports them received.
    pub(crate) receipt: Option<Box<Receipt>>,
}

/// A position of the user's stream to report received once the client
/// has answered the ping sent after it (`RECEIPT_PING`).
#[derive(Debug)]
pub(crate) struct Receipt {
    key: String,
    epoch: u64,
    seq: u64,
}

impl Receipt {
    /// Tells the stream's controller that the client has these messages.
    pub(crate) fn report(self, hub: &Hub, user: &UserId) {
        hub.reporter()
            .received(self.key, user, self.epoch, self.seq);
    }
}

/// Payload of the ping sent after messages that await a receipt. A client
/// answers pings in order, after reading every frame before them, so its
/// pong says that it has those messages.
const RECEIPT_PING: &[u8] = b"barrage-receipt";

/// Asks the owning controllers where each of the connection's streams
/// stands and, for streams the client gave a position for (and the user's
/// offline store), which messages it missed.
pub(crate) async fn recover(
    hub: &Hub,
    user: &UserId,
    rooms: &[RoomId],
    positions: &BTreeMap<String, StreamPos>,
    timeout: Duration,
) -> Result<Recovery, String> {
    let user_key = StreamKey::User(user.clone()).to_string();
    let mut keys = vec![user_key.clone(), StreamKey::Broadcast.to_string()];
    keys.extend(rooms.iter().map(|r| StreamKey::Room(r.clone()).to_string()));
    let queries: Vec<HistoryQuery> = keys
        .iter()
        .map(|k| HistoryQuery::new(k.clone(), positions.get(k).map(|p| (p.epoch, p.seq))))
        .collect();
    // The whole of the session's set-up deadline: when every client of a
    // node comes back at once, queries wait their turn at the controller,
    // and a client told to reconnect would only queue again.
    let results = hub.reporter().history_within(queries, timeout).await?;
    let mut out = Recovery {
        streams: BTreeMap::new(),
        missed: Vec::new(),
        recovered_messages: 0,
        skip: Skip::default(),
        receipt: None,
    };
    for r in results {
        let asked = positions.contains_key(&r.key);
        out.streams.insert(
            r.key.clone(),
            StreamState {
                epoch: r.epoch,
                seq: r.seq,
                recovered: asked.then_some(r.recovered),
            },
        );
        let mut seqs = HashSet::new();
        for m in &r.messages {
            let Some(body) = &m.body else { continue };
            out.missed
                .push(hub.message_of(&r.key, r.epoch, m.seq, body));
            seqs.insert(m.seq);
        }
        out.recovered_messages += r.messages.len() as u64;
        if r.awaits_receipt
            && let Some(seq) = r.messages.iter().map(|m| m.seq).max()
        {
            out.receipt = Some(Box::new(Receipt {
                key: r.key.clone(),
                epoch: r.epoch,
                seq,
            }));
        }
        if let Some(rule) = skip_rule(&r.key, asked && r.recovered, r.seq, seqs) {
            out.skip.insert(r.key, r.epoch, rule);
        }
    }
    Ok(out)
}

/// Where `room`'s stream stands (epoch, seq), asked of its controller
/// before a join: a client that stores it recovers, at its next connect,
/// what was pushed to the room after the join, even when nothing arrived
/// in between.
async fn room_position(state: &WsState, room: &RoomId) -> Result<(u64, u64), String> {
    let query = HistoryQuery::new(StreamKey::Room(room.clone()).to_string(), None);
    let r = state
        .hub
        .reporter()
        .history_of(query, state.settings.ack_timeout)
        .await?;
    Ok((r.epoch, r.seq))
}

/// Which live frames of stream `key` a new connection drops, given its
/// recovery answer: `recovered` (the client's position was resumed up
/// to `seq`), or the seqs the answer handed out.
fn skip_rule(key: &str, recovered: bool, seq: u64, handed_out: HashSet<u64>) -> Option<SkipRule> {
    if recovered {
        // Everything up to `seq` was sent from the history.
        Some(SkipRule::UpTo(seq))
    } else if !handed_out.is_empty() {
        Some(SkipRule::Seqs(handed_out))
    } else if seq > 0 && !key.starts_with("user:") {
        // Given no position (or one that could not be resumed), the
        // client starts after `seq`: a live frame at or below it was on
        // its way as the history was read, and is older than that. Not
        // for the user's own stream: a message pushed to the user once
        // this connection was registered is not kept for later (the user
        // was online), so this connection is where it goes.
        Some(SkipRule::UpTo(seq))
    } else {
        None
    }
}

/// How a write of the session loop ended.
enum Ended<T> {
    Done(T),
    /// The connection is closing (its close code is set).
    Closing,
    /// The client took nothing for the whole limit.
    TimedOut,
}

impl<T> Ended<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Ended<U> {
        match self {
            Ended::Done(t) => Ended::Done(f(t)),
            Ended::Closing => Ended::Closing,
            Ended::TimedOut => Ended::TimedOut,
        }
    }
}

/// What the end of a write of the session loop (`true`: it succeeded)
/// means for the session: `None` to go on, or that it ends, with whether
/// the socket can still take a close frame.
fn after_write(ended: Ended<bool>, conn: &ConnHandle) -> Option<bool> {
    match ended {
        Ended::Done(true) => None,
        Ended::Done(false) => {
            conn.close_with(CloseCode::Abnormal);
            Some(false)
        }
        Ended::Closing => Some(true),
        Ended::TimedOut => Some(stalled(conn)),
    }
}

/// Drives `write` until it is done, the connection starts closing, or
/// the write has waited for the client for `limit`. The wait is checked
/// at the ticks of the connection's `ping` interval (behind its door) (no ping can be sent
/// while a write waits anyway), so a write that waits costs no timer of
/// its own, and one is given up between `limit` and `limit` plus one ping
/// interval after it started waiting. A tick taken this way sets
/// `ping_owed`: its ping goes out when the write is done, so that a busy
/// connection is pinged too.
fn write_within<'a, 's, F: std::future::Future>(
    mut write: std::pin::Pin<&'a mut F>,
    closing: &'a mut crate::hub::CloseSignal<'s>,
    (ping_door, ping, ping_owed): (
        &'a mut crate::gate::Door,
        &'a mut tokio::time::Interval,
        &'a mut bool,
    ),
    limit: Duration,
) -> impl std::future::Future<Output = Ended<F::Output>> + 'a {
    use std::task::Poll;
    // A plain function returning the future, with `write` pinned where
    // the caller made it: an `async fn` taking the future by value would
    // hold it twice in the session's own future, which every connection
    // keeps for its whole life.
    let mut waiting_since = None;
    std::future::poll_fn(move |cx| {
        if std::pin::Pin::new(&mut *closing).poll(cx).is_ready() {
            return Poll::Ready(Ended::Closing);
        }
        if let Poll::Ready(out) = write.as_mut().poll(cx) {
            return Poll::Ready(Ended::Done(out));
        }
        let since = *waiting_since.get_or_insert_with(tokio::time::Instant::now);
        // Through the door, as the session loop polls it, so the interval
        // keeps waking the task through the gate.
        while ping_door.poll(cx, |cx| ping.poll_tick(cx)).is_ready() {
            // The tick's ping is sent once the write is done.
            *ping_owed = true;
            if since.elapsed() >= limit {
                return Poll::Ready(Ended::TimedOut);
            }
        }
        Poll::Pending
    })
}

/// A client that has not taken a frame for the read timeout is treated as
/// a slow consumer; its socket cannot take a close frame.
fn stalled(conn: &ConnHandle) -> bool {
    tracing::debug!(
        conn = conn.id,
        "the client took nothing for the read timeout"
    );
    conn.close_with(CloseCode::SlowConsumer);
    false
}

fn send_error(state: &WsState, conn: &ConnHandle, code: &str, message: String) {
    state.metrics.frame_errors.with_label_values(&[code]).inc();
    send_frame(conn, ServerFrame::error(code, message));
}

/// Refuses a `join` or `leave` of `room`, naming it, so that the client
/// knows which of its requests failed.
fn send_room_error(state: &WsState, conn: &ConnHandle, code: &str, room: &str, message: String) {
    state.metrics.frame_errors.with_label_values(&[code]).inc();
    send_frame(conn, ServerFrame::room_error(code, room, message));
}

/// A token expiring this far ahead, or further, never closes its
/// connection: a hundred years.
const NEVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What a connection proved about itself.
struct Session {
    claims: Mutex<Option<Claims>>,
}

impl Session {
    /// The token's expiry (seconds since the epoch), when there is a token.
    fn expiry(&self) -> Option<u64> {
        self.claims.lock().as_ref().map(|c| c.exp)
    }

    /// When the connection must close unless its token is refreshed: the
    /// token's expiry plus `leeway`. None without a token, and for an
    /// expiry [`NEVER`] or more ahead (a token may say `exp: 2^64-1`,
    /// further ahead than a clock can count).
    fn deadline(&self, leeway: Duration) -> Option<tokio::time::Instant> {
        token_deadline(self.claims.lock().as_ref()?, leeway)
    }

    fn allows_room(&self, room: &str) -> bool {
        self.claims
            .lock()
            .as_ref()
            .is_none_or(|c| c.allows_room(room))
    }
}

/// When a session admitted with `claims` must end: the token's expiry
/// plus `leeway`; None for an expiry [`NEVER`] or more ahead.
pub(crate) fn token_deadline(claims: &Claims, leeway: Duration) -> Option<tokio::time::Instant> {
    let left = Duration::from_secs(claims.exp.saturating_sub(barrage_auth::now_secs()))
        .checked_add(leeway)
        .filter(|left| *left < NEVER)?;
    Some(tokio::time::Instant::now() + left)
}

async fn handle_frame(
    state: &WsState,
    conn: &Arc<ConnHandle>,
    session: &Session,
    frame: ClientFrame,
) {
    match frame {
        ClientFrame::Ping => send_frame(conn, ServerFrame::Pong),
        ClientFrame::Refresh { token } => match state.settings.auth.verify(&token) {
            Ok(c) if c.sub == conn.user.as_str() => {
                let expires_at = c.exp;
                *session.claims.lock() = Some(c);
                send_frame(conn, ServerFrame::Refreshed { expires_at });
            }
            Ok(c) => send_error(
                state,
                conn,
                "forbidden",
                format!(
                    "the new token is for {}, this connection is {}",
                    c.sub, conn.user
                ),
            ),
            Err(e) => send_error(state, conn, "unauthorized", e.to_string()),
        },
        ClientFrame::Join { room } => {
            let refuse = |code: &str, message: String| {
                send_room_error(state, conn, code, &room, message);
            };
            let id = match RoomId::new(room.as_str()) {
                Ok(r) => r,
                Err(e) => return refuse("invalid_room", format!("room: {e}")),
            };
            if !session.allows_room(id.as_str()) {
                return refuse(
                    "forbidden",
                    format!("the token does not allow joining {id}"),
                );
            }
            if state.hub.room_count(conn) >= state.settings.max_rooms {
                return refuse(
                    "too_many_rooms",
                    format!("at most {} rooms per connection", state.settings.max_rooms),
                );
            }
            // The room's position is read before the join: a push after it
            // and before the join's confirmation may not reach this
            // connection, but the client, resuming from this position,
            // recovers it. Read after the confirmation instead, it could
            // count a push still on its way here, and lose it if the
            // connection dropped first.
            let (epoch, seq) = match room_position(state, &id).await {
                Ok((epoch, seq)) => (Some(epoch), Some(seq)),
                Err(e) => {
                    // Joined all the same: pushes reach the connection, and
                    // its first message gives the client a position.
                    tracing::warn!(room = %id, error = %e, "no position for a joined room");
                    (None, None)
                }
            };
            // `None`: already a member; joining again is harmless.
            if let Some(ack) = state.hub.join(conn, &id)
                && !ack.wait(state.settings.ack_timeout).await
            {
                state.hub.leave(conn, &id);
                return refuse(
                    "unavailable",
                    format!("could not join {id}: no controller confirmed it, try again"),
                );
            }
            send_frame(conn, ServerFrame::Joined { room, epoch, seq });
        }
        ClientFrame::Publish {
            room,
            data,
            reference,
        } => {
            let answer = match &state.publisher {
                Some(p) => {
                    let claims = session.claims.lock().clone();
                    p.publish(
                        &conn.user,
                        claims.as_ref(),
                        |r| state.hub.in_room(conn, r),
                        room,
                        data,
                        reference,
                    )
                    .await
                }
                None => ServerFrame::Rejected {
                    reference,
                    room,
                    reason: "not_allowed".into(),
                    message: "publishing is off on this node (PUBLISH_ROOMS)".into(),
                },
            };
            send_frame(conn, answer);
        }
        ClientFrame::Leave { room } => {
            let id = match RoomId::new(room.as_str()) {
                Ok(r) => r,
                Err(e) => {
                    return send_room_error(
                        state,
                        conn,
                        "invalid_room",
                        &room,
                        format!("room: {e}"),
                    );
                }
            };
            if state.hub.leave(conn, &id) {
                send_frame(conn, ServerFrame::Left { room });
            } else {
                send_room_error(
                    state,
                    conn,
                    "not_joined",
                    &room,
                    format!("not a member of {id}"),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drops(rule: &Option<SkipRule>, seq: u64) -> bool {
        let mut skip = Skip::default();
        if let Some(rule) = rule {
            skip.insert("s".into(), 1, rule.clone());
        }
        skip.already_sent(&Outbound::test_message("s", 1, seq, "x"))
    }

    #[test]
    fn a_fresh_room_drops_frames_from_before_connected_but_the_user_stream_keeps_them() {
        let room = skip_rule("room:r", false, 7, HashSet::new());
        assert!(drops(&room, 7) && !drops(&room, 8));
        // A push to the user that raced the history read is not kept for
        // a later connect: dropping it here would lose it.
        let user = skip_rule("user:u", false, 7, HashSet::new());
        assert!(user.is_none());
        // What recovery sent is dropped on every stream.
        let recovered = skip_rule("user:u", true, 7, HashSet::new());
        assert!(drops(&recovered, 7) && !drops(&recovered, 8));
        let kept = skip_rule("user:u", false, 7, HashSet::from([3, 5]));
        assert!(drops(&kept, 5) && !drops(&kept, 4) && !drops(&kept, 7));
    }
}
