//! Transports for clients a WebSocket cannot reach, with the WebSocket's
//! guarantees: the same admission (token, limits), the same `message`
//! frames, the same recovery from `(epoch, seq)` positions.
//!
//! * `GET /sse` streams Server-Sent Events. Every event's `id:` is the
//!   connection's positions after it (`room:r1@<epoch>:<seq>,user:…`, the
//!   `positions` format), so the browser's automatic reconnect sends them
//!   back as `Last-Event-ID` and resumes every stream. Comments keep the
//!   stream alive through proxies.
//! * `GET /poll?since=<positions>` answers at once with what was missed, or
//!   holds until a message arrives or the timeout (default 25 s) passes,
//!   then the client polls again with the `positions` it got. Between polls
//!   the messages wait in the streams' history, so none is lost or repeated.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use barrage_protocol::{CloseCode, ServerFrame, StreamPos, format_positions};
use tokio::sync::mpsc;

use crate::hub::{ConnHandle, Outbound, Registered, Wire};
use crate::listener::ConnAbort;
use crate::queue;
use crate::ws::{Admission, ConnectParams, Recovery, WsState, admit, recover};

/// Longest hold of a long-poll request.
pub const MAX_POLL_SECS: u64 = 60;
/// Hold of a long-poll request unless `timeout_secs` says otherwise.
pub const DEFAULT_POLL_SECS: u64 = 25;
/// Interval of SSE keep-alive comments.
pub const SSE_HEARTBEAT: Duration = Duration::from_secs(15);

/// Registers the session, waits until the controllers know it, and fetches
/// what the client missed.
async fn open(
    state: &WsState,
    a: &Admission,
) -> Result<(Registered, queue::Receiver<Outbound>, Recovery), Response> {
    let hub = state.hub.clone();
    let timeout = state.settings.ack_timeout;
    let (conn, rx, ack) = hub.connect(a.user.clone(), &a.rooms, Wire::Json, None);
    let registered = Registered {
        hub: hub.clone(),
        conn,
    };
    let recovery = if ack.wait(timeout).await {
        recover(&hub, &a.user, &a.rooms, &a.positions, timeout).await
    } else {
        Err("no controller confirmed the session".to_owned())
    };
    match recovery {
        Ok(r) => Ok((registered, rx, r)),
        Err(why) => {
            tracing::warn!(user = %a.user, reason = %why, "cannot establish the session");
            Err((
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{why}; retry with backoff\n"),
            )
                .into_response())
        }
    }
}

/// Admission, then [`open`]: everything the two transports do first.
async fn admit_and_open(
    state: &WsState,
    params: ConnectParams,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
) -> Result<(Admission, Registered, queue::Receiver<Outbound>, Recovery), Response> {
    let a = admit(state, params, headers, peer)?;
    let (registered, rx, recovery) = open(state, &a).await?;
    Ok((a, registered, rx, recovery))
}

/// Positions to report before any message: the client's own where the
/// stream resumed, the stream's current one elsewhere.
fn initial_positions(a: &Admission, r: &Recovery) -> BTreeMap<String, StreamPos> {
    r.streams
        .iter()
        .map(|(k, s)| {
            let pos = match (s.recovered, a.positions.get(k)) {
                (Some(true), Some(p)) => *p,
                _ => StreamPos {
                    epoch: s.epoch,
                    seq: s.seq,
                },
            };
            (k.clone(), pos)
        })
        .collect()
}

fn advance(positions: &mut BTreeMap<String, StreamPos>, out: &Outbound) {
    if let Some((stream, epoch, seq)) = &out.position {
        positions.insert(
            stream.to_string(),
            StreamPos {
                epoch: *epoch,
                seq: *seq,
            },
        );
    }
}

fn connected_frame(state: &WsState, a: &Admission, conn: &ConnHandle, r: &Recovery) -> ServerFrame {
    ServerFrame::Connected {
        conn_id: format!("{}-{}", state.settings.node_id, conn.id),
        user_id: a.user.to_string(),
        node_id: state.settings.node_id.clone(),
        rooms: a.rooms.iter().map(ToString::to_string).collect(),
        streams: r.streams.clone(),
    }
}

/// The `type` of an encoded frame (`message`, `left`, …).
fn frame_type(frame: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Typed {
        r#type: String,
    }
    serde_json::from_str::<Typed>(frame).map_or_else(|_| "message".to_owned(), |t| t.r#type)
}

/// The `close` event that ends an event stream with `code`.
fn close_event(code: CloseCode) -> Event {
    let data = serde_json::json!({ "code": code.code(), "reason": code.reason() });
    Event::default().event("close").data(data.to_string())
}

/// `GET /sse?token=<JWT>&rooms=a,b` (positions from `Last-Event-ID` or `positions=`).
pub async fn sse_handler(
    State(state): State<WsState>,
    Query(mut params): Query<ConnectParams>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    abort: Option<Extension<ConnAbort>>,
    headers: HeaderMap,
) -> Response {
    if let Some(last) = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
    {
        params.positions = Some(last.to_owned());
    }
    let (a, registered, mut rx, recovery) =
        match admit_and_open(&state, params, &headers, peer).await {
            Ok(s) => s,
            Err(refused) => return refused,
        };
    let connected = connected_frame(&state, &a, &registered.conn, &recovery);
    let mut positions = initial_positions(&a, &recovery);
    // An event stream cannot be given a new token: it ends when its token
    // expires (4405), and the client reconnects with a fresh one.
    let expires = a
        .claims
        .as_ref()
        .and_then(|c| crate::ws::token_deadline(c, state.settings.token_leeway));
    let (tx, events) = mpsc::channel::<Result<Event, Infallible>>(16);
    let limit = state.settings.read_timeout;
    tokio::spawn(async move {
        let conn = registered.conn.clone();
        // An event the response takes within the read timeout; a client
        // that stopped reading fills the response and is given up then
        // (closed as a slow consumer, its registration freed, its HTTP
        // connection dropped), rather than held for ever.
        let hand_over = |ev: Event| {
            let (tx, conn, abort) = (&tx, &conn, &abort);
            async move {
                match tokio::time::timeout(limit, tx.send(Ok(ev))).await {
                    Ok(sent) => sent.is_ok(),
                    Err(_) => {
                        conn.close_with(CloseCode::SlowConsumer);
                        if let Some(Extension(a)) = abort {
                            a.abort();
                        }
                        false
                    }
                }
            }
        };
        let first = Event::default()
            .event("connected")
            .id(format_positions(&positions))
            .retry(Duration::from_secs(1))
            .data(connected.to_json());
        if !hand_over(first).await {
            return;
        }
        let Recovery {
            missed,
            mut skip,
            receipt,
            ..
        } = recovery;
        for out in missed {
            advance(&mut positions, &out);
            let ev = Event::default()
                .event("message")
                .id(format_positions(&positions))
                .data(out.frame.as_str());
            if !hand_over(ev).await {
                return;
            }
        }
        // An event stream has no way back from the client: messages kept
        // for the user while offline count as received once handed to the
        // response. (A long poll needs no receipt: the next poll's
        // positions say what the client has.)
        if let Some(r) = receipt {
            r.report(&registered.hub, &conn.user);
        }
        let expiry = async move {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expiry);
        loop {
            let out = tokio::select! {
                biased;
                () = &mut expiry => {
                    conn.close_with(CloseCode::TokenExpired);
                    let code = conn.close_code().unwrap_or(CloseCode::TokenExpired);
                    let _ = hand_over(close_event(code)).await;
                    break;
                }
                _ = conn.closing() => {
                    let code = conn.close_code().unwrap_or(CloseCode::Normal);
                    let _ = hand_over(close_event(code)).await;
                    break;
                }
                _ = tx.closed() => break,
                out = rx.recv() => match out {
                    Some(out) => out,
                    None => break,
                },
            };
            if skip.already_sent(&out) {
                continue;
            }
            advance(&mut positions, &out);
            let mut ev = Event::default()
                .event(frame_type(out.frame.as_str()))
                .data(out.frame.as_str());
            if out.position.is_some() {
                ev = ev.id(format_positions(&positions));
            }
            if !hand_over(ev).await {
                break;
            }
        }
        drop(registered);
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(events))
        .keep_alive(KeepAlive::new().interval(SSE_HEARTBEAT).text("heartbeat"))
        .into_response()
}

/// `GET /poll?token=<JWT>&rooms=a,b&since=<positions>&timeout_secs=25`
pub async fn poll_handler(
    State(state): State<WsState>,
    Query(params): Query<ConnectParams>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let hold = params.timeout_secs.unwrap_or(DEFAULT_POLL_SECS);
    if hold > MAX_POLL_SECS {
        return (
            StatusCode::BAD_REQUEST,
            format!("timeout_secs: at most {MAX_POLL_SECS}\n"),
        )
            .into_response();
    }
    let (a, registered, mut rx, recovery) =
        match admit_and_open(&state, params, &headers, peer).await {
            Ok(s) => s,
            Err(refused) => return refused,
        };
    let connected = connected_frame(&state, &a, &registered.conn, &recovery);
    let mut positions = initial_positions(&a, &recovery);
    let recovered = recovery
        .streams
        .values()
        .all(|s| s.recovered != Some(false));
    let Recovery {
        missed, mut skip, ..
    } = recovery;
    let mut frames: Vec<String> = Vec::new();
    for out in missed {
        advance(&mut positions, &out);
        frames.push(out.frame.to_string());
    }
    // A first poll (no positions) answers at once with where to start, and
    // so does one that must be told it cannot resume (`recovered: false`).
    if frames.is_empty() && !a.positions.is_empty() && recovered && hold > 0 {
        let deadline = tokio::time::sleep(Duration::from_secs(hold));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                _ = registered.conn.closing() => break,
                out = rx.recv() => match out {
                    Some(out) if skip.already_sent(&out) => continue,
                    Some(out) => {
                        advance(&mut positions, &out);
                        frames.push(out.frame.to_string());
                        break;
                    }
                    None => break,
                },
            }
        }
        // Whatever arrived together is answered together.
        while let Ok(out) = rx.try_recv() {
            if !skip.already_sent(&out) {
                advance(&mut positions, &out);
                frames.push(out.frame.to_string());
            }
        }
    }
    drop(registered);
    let ServerFrame::Connected {
        user_id,
        node_id,
        rooms,
        streams,
        ..
    } = connected
    else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let head = serde_json::json!({
        "user_id": user_id,
        "node_id": node_id,
        "rooms": rooms,
        "streams": streams,
        "recovered": recovered,
        "positions": format_positions(&positions),
    })
    .to_string();
    // The frames are JSON already: spliced in, not re-encoded.
    let body = format!(
        "{{\"messages\":[{}],{}",
        frames.join(","),
        head.strip_prefix('{').unwrap_or(&head)
    );
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}
