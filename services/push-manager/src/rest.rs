//! The HTTP/JSON API, served on the push-manager's HTTP port next to
//! `/metrics`. Every endpoint calls the gRPC service in process, so
//! validation, API-token auth, metrics and traces are the gRPC ones.
//!
//! Errors are JSON: `{"error": {"code", "field"?, "message", "message_id"?}}`
//! with 400 (invalid argument, naming the field), 401/403 (API token), 404
//! (unknown room or user in admin reads), 409 (a push still under way),
//! 413 (body too large), 503 (cluster not reachable). `message_id` names
//! the message of a push that reached only some of its targets, to retry
//! with.

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use barrage_proto::v1::push_manager_server::PushManager;
use barrage_proto::v1::{
    BroadcastRequest, CloseRoomRequest, GetRoomInfoRequest, GetRoomInfoResponse, GetStatusRequest,
    GetUserNodeRequest, PushToRoomRequest, PushToUserRequest,
};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tonic::{Code, Status};

use crate::PushService;

/// The OpenAPI 3 description of this API (also checked in at
/// `services/push-manager/openapi.json`).
pub const OPENAPI: &str = include_str!("../openapi.json");

/// The routes, with request bodies capped so that a `content` at the
/// configured limit still fits (JSON escaping included).
pub fn router(service: PushService, max_content_bytes: usize) -> Router {
    let body_limit = max_content_bytes
        .saturating_mul(6)
        .saturating_add(16 * 1024);
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/push/room/{room_id}", post(push_room))
        .route("/api/v1/push/user/{user_id}", post(push_user))
        .route("/api/v1/push/broadcast", post(broadcast))
        .route("/api/v1/status", get(status))
        .route("/api/v1/rooms/{room_id}", get(room).delete(close_room))
        .route("/api/v1/users/{user_id}", get(user))
        // The endpoints of the Java server barrage replaces.
        .route("/api/push/status", get(status))
        .route("/api/push/broadcast/{room_id}", post(push_room))
        .route("/api/push/check/{room_id}", get(check_room))
        .route("/api/push/room/{room_id}", get(room).delete(close_room))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(service)
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

fn error(status: StatusCode, code: &str, field: Option<&str>, message: &str) -> Response {
    error_reply(status, error_body(code, field, message))
}

/// The `error` object of an error answer.
fn error_body(code: &str, field: Option<&str>, message: &str) -> Value {
    let mut e = json!({ "code": code, "message": message });
    if let Some(f) = field {
        e["field"] = json!(f);
    }
    e
}

fn error_reply(status: StatusCode, error: Value) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

/// A gRPC status as the HTTP answer a caller can act on.
fn from_status(s: &Status) -> Response {
    let (http, code) = match s.code() {
        Code::InvalidArgument => (StatusCode::BAD_REQUEST, "INVALID_ARGUMENT"),
        Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
        Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        Code::NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "RESOURCE_EXHAUSTED"),
        Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "DEADLINE_EXCEEDED"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Code::Aborted => (StatusCode::CONFLICT, "ABORTED"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
    };
    // Validation messages start with the field: "room_id: must not be empty".
    let field = (s.code() == Code::InvalidArgument)
        .then(|| s.message().split_once(':').map(|(f, _)| f.trim()))
        .flatten()
        .or_else(|| {
            // "room r1 has no members", "user u1 ...": the path parameter.
            (s.code() == Code::NotFound)
                .then(|| match s.message().split_whitespace().next() {
                    Some("room") => Some("room_id"),
                    Some("user") => Some("user_id"),
                    _ => None,
                })
                .flatten()
        })
        .filter(|f| !f.is_empty() && f.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    let mut e = error_body(code, field, s.message());
    // A push that reached only some of its targets names its message id,
    // to retry with.
    if let Some(id) = crate::service::message_id_of(s) {
        e["message_id"] = json!(id);
    }
    error_reply(http, e)
}

fn bad_body(rejection: &JsonRejection) -> Response {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            None,
            "request body too large (see MAX_CONTENT_BYTES)",
        );
    }
    let text = rejection.body_text();
    // serde names the offending field: "unknown field `contnet`", "missing field `content`".
    let field = text
        .split('`')
        .nth(1)
        .filter(|f| f.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
    error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", field, &text)
}

/// A JSON request body; a body that does not parse is answered by
/// [`bad_body`] before the handler runs.
struct JsonBody<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(t)| JsonBody(t))
            .map_err(|e| bad_body(&e))
    }
}

/// The caller's headers a gRPC request carries: its API token and its W3C
/// trace context, so that the push joins the caller's trace.
const FORWARDED: [&str; 3] = ["authorization", "traceparent", "tracestate"];

/// A gRPC request carrying the caller's [`FORWARDED`] headers.
fn request<T>(headers: &HeaderMap, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    for name in FORWARDED {
        if let Some(v) = headers.get(name)
            && let Ok(v) = v.to_str()
            && let Ok(v) = v.parse()
        {
            req.metadata_mut().insert(name, v);
        }
    }
    req
}

/// The JSON answer of a call: `ok` shapes a success, a status maps to its
/// HTTP error.
fn reply<T>(r: Result<tonic::Response<T>, Status>, ok: impl FnOnce(T) -> Value) -> Response {
    match r {
        Ok(r) => axum::Json(ok(r.into_inner())).into_response(),
        Err(s) => from_status(&s),
    }
}

/// `content` may be a string (sent as is) or any other JSON value, sent as
/// its JSON text exactly as the caller wrote it: key order, number
/// precision and all. Absent or `null`: empty (refused as such).
fn content_text(v: Option<Box<RawValue>>) -> Result<String, serde_json::Error> {
    match v {
        None => Ok(String::new()),
        Some(raw) if raw.get().starts_with('"') => serde_json::from_str(raw.get()),
        Some(raw) => Ok(raw.get().to_owned()),
    }
}

/// A `content` string that is JSON but not text (a lone surrogate escape).
fn bad_content(e: &serde_json::Error) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "INVALID_ARGUMENT",
        Some("content"),
        &format!("content: {e}"),
    )
}

// In the bodies below, optional fields take `null` as absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomPush {
    content: Option<Box<RawValue>>,
    event: Option<String>,
    message_id: Option<String>,
    exclude_user_ids: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserPush {
    content: Option<Box<RawValue>>,
    event: Option<String>,
    message_id: Option<String>,
    /// More users besides the one in the path.
    user_ids: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastPush {
    content: Option<Box<RawValue>>,
    event: Option<String>,
    message_id: Option<String>,
}

async fn push_room(
    State(svc): State<PushService>,
    Path(room_id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<RoomPush>,
) -> Response {
    let content = match content_text(b.content) {
        Ok(c) => c,
        Err(e) => return bad_content(&e),
    };
    let req = request(
        &headers,
        PushToRoomRequest {
            room_id,
            content,
            event: b.event.unwrap_or_default(),
            message_id: b.message_id.unwrap_or_default(),
            exclude_user_ids: b.exclude_user_ids.unwrap_or_default(),
            binary_content: Vec::new(),
            sender: String::new(),
        },
    );
    reply(svc.push_to_room(req).await, |r| {
        json!({
            "success": r.success,
            "delivered_count": r.delivered_count,
            "message_id": r.message_id,
            "message": r.message,
            "duplicate": r.duplicate,
        })
    })
}

async fn push_user(
    State(svc): State<PushService>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<UserPush>,
) -> Response {
    let content = match content_text(b.content) {
        Ok(c) => c,
        Err(e) => return bad_content(&e),
    };
    let req = request(
        &headers,
        PushToUserRequest {
            user_id,
            content,
            event: b.event.unwrap_or_default(),
            message_id: b.message_id.unwrap_or_default(),
            user_ids: b.user_ids.unwrap_or_default(),
            binary_content: Vec::new(),
        },
    );
    reply(svc.push_to_user(req).await, |r| {
        json!({
            "success": r.success,
            "delivered_count": r.delivered_count,
            "stored_count": r.stored_count,
            "message_id": r.message_id,
            "message": r.message,
            "duplicate": r.duplicate,
        })
    })
}

async fn broadcast(
    State(svc): State<PushService>,
    headers: HeaderMap,
    JsonBody(b): JsonBody<BroadcastPush>,
) -> Response {
    let content = match content_text(b.content) {
        Ok(c) => c,
        Err(e) => return bad_content(&e),
    };
    let req = request(
        &headers,
        BroadcastRequest {
            content,
            event: b.event.unwrap_or_default(),
            message_id: b.message_id.unwrap_or_default(),
            binary_content: Vec::new(),
        },
    );
    reply(svc.broadcast(req).await, |r| {
        json!({
            "success": r.success,
            "total_delivered": r.total_delivered,
            "node_count": r.node_count,
            "message_id": r.message_id,
            "message": r.message,
            "duplicate": r.duplicate,
        })
    })
}

async fn status(State(svc): State<PushService>, headers: HeaderMap) -> Response {
    let r = svc.get_status(request(&headers, GetStatusRequest {})).await;
    reply(r, |r| {
        let nodes: Vec<Value> = r
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "node_id": n.node_id,
                    "reachable": n.reachable,
                    "connections": n.connections,
                    "users": n.users,
                    "rooms": n.rooms,
                })
            })
            .collect();
        json!({
            "controllers": r.controllers,
            "connections": r.connections,
            "nodes": nodes,
        })
    })
}

async fn room_info(
    svc: &PushService,
    headers: &HeaderMap,
    room_id: String,
) -> Result<GetRoomInfoResponse, Response> {
    svc.get_room_info(request(headers, GetRoomInfoRequest { room_id }))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| from_status(&s))
}

async fn room(
    State(svc): State<PushService>,
    Path(room_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = match room_info(&svc, &headers, room_id.clone()).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    if r.member_count == 0 && r.connection_count == 0 {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            Some("room_id"),
            &format!("room {room_id} has no members"),
        );
    }
    let nodes: Vec<Value> = r
        .nodes
        .iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "member_count": n.member_count,
                "connection_count": n.connection_count,
            })
        })
        .collect();
    axum::Json(json!({
        "room_id": r.room_id,
        "member_count": r.member_count,
        "connection_count": r.connection_count,
        "members": r.members,
        "nodes": nodes,
    }))
    .into_response()
}

async fn check_room(
    State(svc): State<PushService>,
    Path(room_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = match svc
        .get_room_info(request(
            &headers,
            GetRoomInfoRequest {
                room_id: room_id.clone(),
            },
        ))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) if s.code() == Code::NotFound => GetRoomInfoResponse {
            room_id,
            ..Default::default()
        },
        Err(s) => return from_status(&s),
    };
    axum::Json(json!({
        "room_id": r.room_id,
        "exists": r.member_count > 0 || r.connection_count > 0,
        "member_count": r.member_count,
        "connection_count": r.connection_count,
    }))
    .into_response()
}

async fn close_room(
    State(svc): State<PushService>,
    Path(room_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = svc
        .close_room(request(&headers, CloseRoomRequest { room_id }))
        .await;
    reply(r, |r| {
        json!({
            "room_id": r.room_id,
            "removed_connections": r.removed_connections,
            "node_count": r.node_count,
            "message": r.message,
        })
    })
}

async fn user(
    State(svc): State<PushService>,
    Path(user_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let r = match svc
        .get_user_node(request(
            &headers,
            GetUserNodeRequest {
                user_id: user_id.clone(),
            },
        ))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => return from_status(&s),
    };
    if !r.online {
        return error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            Some("user_id"),
            &format!("user {user_id} has no connection"),
        );
    }
    let nodes: Vec<Value> = r
        .nodes
        .iter()
        .map(|n| json!({ "node_id": n.node_id, "connection_count": n.connection_count }))
        .collect();
    axum::Json(json!({
        "user_id": r.user_id,
        "online": r.online,
        "connection_count": r.connection_count,
        "nodes": nodes,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(r: Response) -> Value {
        let bytes = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            axum::body::to_bytes(r.into_body(), 1 << 20),
        )
        .await
        .expect("body within the deadline")
        .expect("body");
        serde_json::from_slice(&bytes).expect("JSON")
    }

    /// A push that reached only some of its targets names its message id
    /// in the HTTP error too, printable or not.
    #[tokio::test]
    async fn a_partial_failure_names_the_message_id() {
        for id in ["0190f6c1-0000-7000-8000-000000000000", "commentaire-é"] {
            let s = crate::service::with_message_id(Status::unavailable("partly"), id);
            let r = from_status(&s);
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
            let b = body(r).await;
            assert_eq!(b["error"]["message_id"], json!(id), "{b}");
        }
        let plain = body(from_status(&Status::unavailable("down"))).await;
        assert!(plain["error"].get("message_id").is_none(), "{plain}");
    }
}
