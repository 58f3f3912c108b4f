//! Generated protobuf and gRPC bindings for the `barrage.v1` package.
//!
//! The `.proto` files under `proto/` are the contract; this crate is built
//! from them at compile time and never edited by hand. [`FILE_DESCRIPTOR_SET`]
//! feeds server reflection so grpcurl works without proto files.

/// `barrage.v1`: the public push API and the internal services.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("barrage.v1");
}

impl v1::HistoryQuery {
    /// A query for `key`'s stream, from `position` (`(epoch, seq)`) when
    /// the client has one; `client` is set when queries of several clients
    /// go in one call.
    pub fn new(key: impl Into<String>, position: Option<(u64, u64)>) -> Self {
        v1::HistoryQuery {
            key: key.into(),
            has_position: position.is_some(),
            epoch: position.map_or(0, |p| p.0),
            seq: position.map_or(0, |p| p.1),
            client: 0,
            gap_fill: false,
        }
    }
}

/// How long a connect-node remembers a stream's delivery order (the seq
/// of the last message it delivered) without a message. A controller names
/// a message's predecessor on a node (`ResolvedTarget.prev_seqs`) only if
/// it routed that predecessor there within half of this, so a node that
/// has forgotten the stream is never told to wait for a message it will
/// not see again.
pub const ORDER_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);

pub mod coalesce;
pub mod local;
pub mod tls;
pub use local::{LocalPeers, LocalRegistration, PeerChannel, PeerError};
pub use tls::{GrpcTls, GrpcTlsError, GrpcTlsFiles};

/// Encoded `FileDescriptorSet` of every barrage proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/barrage_descriptor.bin"));

/// Server reflection services for every barrage proto: v1 and v1alpha, so
/// both current grpcurl and older tools (which speak only v1alpha) work.
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Calls one HTTP/2 connection may have open at once on a barrage gRPC
/// server; a client with more waits for one to finish. Without a limit, a
/// burst of small requests on one connection (every client of a node
/// reconnecting at once, each asking the controller for its history)
/// outruns the server's reading of them, and the HTTP/2 layer takes the
/// unread small DATA frames for a flood: it ends the whole connection
/// (GOAWAY `ENHANCE_YOUR_CALM`, "too_many_data_frames") and fails every
/// call on it. A thousand unread requests stay well inside that budget
/// (half the connection's flow-control window, 512 KiB).
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Largest message one barrage role decodes from another (gRPC's own
/// default is 4 MiB). Calls between roles carry whole states, not single
/// pushes: a connect-node's full sync lists every user it holds (about
/// 100 bytes per user with UUID ids: 4 MiB is some 40,000 users), and a
/// returning client's missed messages can be hundreds of messages of up
/// to `MAX_CONTENT_BYTES` each (controllers cap one answer at 64 MiB).
/// Only other roles reach these services (mutual TLS in production); the
/// public API keeps its own, smaller limit.
pub const PEER_MESSAGE_LIMIT: usize = 256 << 20;

/// A gRPC server with what every barrage port serves besides its own
/// service: the standard health service and server reflection (v1 and
/// v1alpha), over TLS when `tls` says so. Returns the health reporter to
/// flip serving status with.
pub fn grpc_server(
    tls: &GrpcTls,
) -> Result<
    (
        tonic_health::server::HealthReporter,
        tonic::transport::server::Router,
    ),
    ServerSetupError,
> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let (v1, v1alpha) = reflection_services()?;
    let router = tls
        .server()?
        .add_service(health_service)
        .add_service(v1)
        .add_service(v1alpha);
    Ok((health, router))
}

/// The connections a gRPC server accepts on `listener`, with Nagle's
/// algorithm off: replies are small writes that must not wait for the
/// peer's delayed ACK (tens of milliseconds on every call otherwise).
pub fn grpc_incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Why a gRPC server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServerSetupError {
    /// Reflection descriptors did not load.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The TLS configuration was refused.
    #[error("tls: {0}")]
    Tls(#[from] tonic::transport::Error),
}
