//! The live-comments demo page (`/` and `/demo`), the JavaScript client it
//! uses (`/barrage.js`), and a development-only publish endpoint
//! (`POST /demo/publish`) that forwards a comment to the push API.
//!
//! Off unless enabled (`barrage dev` enables it): the publish endpoint lets
//! anyone who reaches the WebSocket port push to any room.

use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use barrage_proto::v1::PushToRoomRequest;
use barrage_proto::v1::push_manager_client::PushManagerClient;
use serde::Deserialize;
use tonic::transport::Channel;

const PAGE: &str = include_str!("../../../clients/demo/index.html");
const CLIENT_JS: &str = include_str!("../../../clients/js/barrage.js");

/// Settings of the demo.
#[derive(Debug, Clone, Default)]
pub struct DemoSettings {
    /// Push API (`host:port` of a push-manager) comments from the page go to;
    /// without it the page only receives.
    pub publish_api: Option<String>,
    /// TLS of the call to the push API.
    pub tls: barrage_proto::GrpcTls,
}

#[derive(Clone)]
struct DemoState {
    api: Option<PushManagerClient<Channel>>,
}

/// A comment sent from the page.
#[derive(Debug, Deserialize)]
struct Comment {
    room: String,
    text: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    color: String,
}

/// The demo routes.
pub fn router(settings: &DemoSettings) -> Router {
    let api = settings
        .publish_api
        .as_deref()
        .and_then(|addr| match settings.tls.endpoint(addr) {
            Ok(e) => Some(PushManagerClient::new(
                e.connect_timeout(Duration::from_secs(2)).connect_lazy(),
            )),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "demo publish API address is not usable");
                None
            }
        });
    Router::new()
        .route("/", get(page))
        .route("/demo", get(page))
        .route("/barrage.js", get(client_js))
        .route("/demo/publish", post(publish))
        .with_state(DemoState { api })
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        CLIENT_JS,
    )
        .into_response()
}

fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    (status, format!("{}\n", why.into())).into_response()
}

async fn publish(
    State(state): State<DemoState>,
    body: Result<Json<Comment>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let c = match body {
        Ok(Json(c)) => c,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    r##"expected JSON {{"room": "...", "text": "...", "user"?: "...", "color"?: "#rrggbb"}}: {}"##,
                    e.body_text()
                ),
            );
        }
    };
    let text = c.text.trim();
    if text.is_empty() || text.chars().count() > 200 {
        return refuse(StatusCode::BAD_REQUEST, "text: 1 to 200 characters");
    }
    let Some(mut api) = state.api.clone() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node has no DEMO_PUBLISH_API; push with grpcurl instead",
        );
    };
    let content = serde_json::json!({ "text": text, "user": c.user, "color": c.color });
    let mut req = tonic::Request::new(PushToRoomRequest {
        room_id: c.room,
        content: content.to_string(),
        event: "comment".into(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(5));
    match api.push_to_room(req).await {
        Ok(r) => {
            let r = r.into_inner();
            Json(serde_json::json!({
                "success": r.success,
                "delivered_count": r.delivered_count,
                "message_id": r.message_id,
            }))
            .into_response()
        }
        Err(s) if s.code() == tonic::Code::InvalidArgument => {
            refuse(StatusCode::BAD_REQUEST, s.message())
        }
        Err(s) => refuse(
            StatusCode::BAD_GATEWAY,
            format!("push API: {}", s.message()),
        ),
    }
}
