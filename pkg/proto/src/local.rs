//! In-process gRPC between roles that share a process.
//!
//! `barrage dev` runs every role in one process. Its push-manager would
//! otherwise reach the controller and the connect-node (and the
//! connect-node, publishing live comments, the push-manager) over loopback
//! HTTP/2, paying for sockets, framing and the wake-ups of both ends on
//! every push. A role that serves gRPC registers its service in a
//! [`LocalPeers`] table under the address it advertises; a caller sharing
//! that table and dialling that address gets the service itself (a
//! [`PeerChannel`] that hands each request straight to it) instead of a
//! socket. Requests and replies are still encoded and decoded as protobuf,
//! so a service sees exactly what it would over the network, trace
//! context included.
//!
//! Roles in separate processes each have their own, empty table and
//! always dial. A role that stops drops its registration first, so calls
//! after that go to the network like any other departed peer's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tonic::body::Body;
use tower::ServiceExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a [`PeerChannel`] call failed: the transport's error (or the
/// `Status` it stands for) as its source, which is where tonic looks.
#[derive(Debug)]
pub struct PeerError(BoxError);

impl std::fmt::Display for PeerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for PeerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// What gRPC clients of other roles are built on: a network channel, or a
/// service in this process.
pub type PeerChannel =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, PeerError>;

/// A network channel as a [`PeerChannel`].
pub fn network(channel: tonic::transport::Channel) -> PeerChannel {
    PeerChannel::new(channel.map_err(|e| PeerError(e.into())))
}

/// Services of roles in this process, by the gRPC address each advertises.
/// Clones share one table; the default is a table of its own.
#[derive(Clone, Default)]
pub struct LocalPeers {
    services: Arc<RwLock<HashMap<String, PeerChannel>>>,
}

impl std::fmt::Debug for LocalPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let services = self.services.read();
        let mut addrs: Vec<&String> = services.keys().collect();
        addrs.sort();
        f.debug_struct("LocalPeers").field("addrs", &addrs).finish()
    }
}

impl LocalPeers {
    /// Serves `service` to callers in this process that dial `addr`, until
    /// the returned registration is dropped.
    pub fn register<S>(&self, addr: &str, service: S) -> LocalRegistration
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let service = PeerChannel::new(service.map_err(|e| PeerError(e.into())));
        self.services.write().insert(addr.to_owned(), service);
        LocalRegistration {
            peers: self.clone(),
            addr: addr.to_owned(),
        }
    }

    /// The service registered under `addr`, each call bounded by
    /// `timeout` (what a network channel's `grpc-timeout` does), or
    /// `None` when no role in this process serves `addr`.
    pub fn get(&self, addr: &str, timeout: Duration) -> Option<PeerChannel> {
        let service = self.services.read().get(addr).cloned()?;
        let bounded = tower::timeout::Timeout::new(service, timeout).map_err(move |e: BoxError| {
            if e.is::<tower::timeout::error::Elapsed>() {
                PeerError(Box::new(tonic::Status::deadline_exceeded(format!(
                    "no answer within {timeout:?}"
                ))))
            } else {
                match e.downcast::<PeerError>() {
                    Ok(e) => *e,
                    Err(e) => PeerError(e),
                }
            }
        });
        Some(PeerChannel::new(bounded))
    }
}

/// A service's place in a [`LocalPeers`] table; dropping it takes the
/// service out.
#[must_use = "the service leaves the table when this is dropped"]
pub struct LocalRegistration {
    peers: LocalPeers,
    addr: String,
}

impl Drop for LocalRegistration {
    fn drop(&mut self) {
        self.peers.services.write().remove(&self.addr);
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_registered_service_answers_until_its_registration_is_dropped() {
        let peers = LocalPeers::default();
        assert!(peers.get("a:1", T).is_none());
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("svc", tonic_health::ServingStatus::Serving)
            .await;
        let registration = peers.register("a:1", health);
        assert!(
            peers.get("b:1", T).is_none(),
            "only the address it was given"
        );

        let mut client = HealthClient::new(peers.get("a:1", T).expect("registered"));
        let check = client.check(HealthCheckRequest {
            service: "svc".into(),
        });
        let status = tokio::time::timeout(T, check)
            .await
            .expect("answered in time")
            .expect("served")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let unknown = client.check(HealthCheckRequest {
            service: "other".into(),
        });
        let err = tokio::time::timeout(T, unknown)
            .await
            .expect("answered in time")
            .expect_err("the service's own error");
        assert_eq!(err.code(), tonic::Code::NotFound);

        drop(registration);
        assert!(peers.get("a:1", T).is_none());
        assert_eq!(format!("{peers:?}"), "LocalPeers { addrs: [] }");
    }

    #[tokio::test]
    async fn a_call_without_answer_ends_at_the_deadline() {
        let peers = LocalPeers::default();
        let silent = tower::service_fn(|_: http::Request<Body>| {
            std::future::pending::<Result<http::Response<Body>, Infallible>>()
        });
        let _registration = peers.register("silent:1", silent);
        let channel = peers
            .get("silent:1", Duration::from_millis(50))
            .expect("registered");
        let mut client = HealthClient::new(channel);
        let call = client.check(HealthCheckRequest::default());
        let err = tokio::time::timeout(T, call)
            .await
            .expect("the deadline ends the call")
            .expect_err("no answer");
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
    }
}
