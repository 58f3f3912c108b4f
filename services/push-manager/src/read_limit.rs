//! Requests too large for the API's gRPC port to read.
//!
//! The port reads requests of up to [`Limits::grpc_request_bytes`]: every
//! field at its limit, with room to spare, so that a push over a limit is
//! read and refused by the API's own checks, naming the field. tonic
//! refuses a larger request before reading it, with `OUT_OF_RANGE`; such a
//! request is over the API's limits too, and [`ReadLimit`] answers it as
//! those are answered: `INVALID_ARGUMENT` naming `content` and its limit,
//! counted in the API metrics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Code, Status};

use crate::{Limits, Metrics};

/// The API's gRPC service, answering requests too large to read with
/// `INVALID_ARGUMENT` rather than tonic's `OUT_OF_RANGE`.
#[derive(Clone)]
pub struct ReadLimit<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    /// The largest request the port reads, in bytes.
    request_bytes: usize,
    /// The largest `content` (or `binary_content`), in bytes.
    content_bytes: usize,
    metrics: Metrics,
}

impl<S> ReadLimit<S> {
    /// Wraps `inner`, a `PushManagerServer` reading requests of up to
    /// `limits.grpc_request_bytes()`.
    pub fn new(inner: S, limits: &Limits, metrics: &Metrics) -> Self {
        ReadLimit {
            inner,
            shared: Arc::new(Shared {
                request_bytes: limits.grpc_request_bytes(),
                content_bytes: limits.max_content_bytes,
                metrics: metrics.clone(),
            }),
        }
    }
}

impl<S: NamedService> NamedService for ReadLimit<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for ReadLimit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Unpin,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let api = api_of(req.uri().path());
        Answer {
            start: Instant::now(),
            inner: self.inner.call(req),
            api,
            shared: self.shared.clone(),
        }
    }
}

/// The answer of one call, a refusal to read it replaced.
pub struct Answer<F> {
    inner: F,
    api: Option<&'static str>,
    start: Instant,
    shared: Arc<Shared>,
}

impl<F, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let r = ready!(Pin::new(&mut this.inner).poll(cx));
        Poll::Ready(r.map(|resp| this.shared.answer(resp, this.api, this.start)))
    }
}

impl Shared {
    /// `resp`, unless it refuses a request too large to read: tonic answers
    /// those with `OUT_OF_RANGE`, a status the API's own handlers never
    /// answer.
    fn answer(
        &self,
        resp: http::Response<Body>,
        api: Option<&'static str>,
        start: Instant,
    ) -> http::Response<Body> {
        let Some(refused) = resp
            .extensions()
            .get::<Status>()
            .filter(|s| s.code() == Code::OutOfRange)
        else {
            return resp;
        };
        let size = request_size(refused.message())
            .map(|n| format!(" of {n} bytes"))
            .unwrap_or_default();
        let limit = self.request_bytes;
        let message = match api {
            Some("PushToRoom" | "PushToUser" | "Broadcast") | None => format!(
                "content: the request{size} is larger than the {limit} bytes a push may take; \
                 content and binary_content may be at most {} bytes (push-manager \
                 --max-content-bytes)",
                self.content_bytes
            ),
            Some(_) => {
                format!("request: the request{size} is larger than the {limit} bytes read")
            }
        };
        if let Some(api) = api {
            crate::service::record_call(&self.metrics, api, Code::InvalidArgument, start.elapsed());
        }
        Status::invalid_argument(message).into_http()
    }
}

/// The API method a request path names (`/barrage.v1.PushManager/<method>`).
fn api_of(path: &str) -> Option<&'static str> {
    const METHODS: [&str; 7] = [
        "PushToRoom",
        "PushToUser",
        "Broadcast",
        "GetRoomInfo",
        "GetUserNode",
        "CloseRoom",
        "GetStatus",
    ];
    let method = path.rsplit('/').next()?;
    METHODS.into_iter().find(|m| *m == method)
}

/// The size tonic found in a request it refused to read ("…found N
/// bytes…"), if its message says.
fn request_size(message: &str) -> Option<u64> {
    let (_, rest) = message.split_once("found ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_method_and_the_size_when_given() {
        assert_eq!(
            api_of("/barrage.v1.PushManager/PushToUser"),
            Some("PushToUser")
        );
        assert_eq!(api_of("/barrage.v1.PushManager/Other"), None);
        assert_eq!(api_of(""), None);
        assert_eq!(
            request_size(
                "Error, decoded message length too large: found 5242891 bytes, the limit is: 4194304 bytes"
            ),
            Some(5_242_891)
        );
        assert_eq!(request_size("found no bytes"), None);
        assert_eq!(request_size(""), None);
    }
}
