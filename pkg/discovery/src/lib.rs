//! Service discovery: every barrage process registers itself under
//! `/barrage/nodes/<role>/<id>` with a lease it keeps alive, and watches the
//! roles it talks to.
//!
//! Two backends sit behind one [`Backend`] trait with etcd's semantics
//! (leases with TTL, keys bound to leases, prefix watches from a revision):
//! [`etcd::EtcdBackend`] for production and [`memory::MemoryBackend`], an
//! in-process registry for `barrage dev` and tests. [`Discovery`] builds
//! registration (with keep-alive and re-registration after lease loss) and
//! membership watches on top of either, so both run the same code.

pub mod etcd;
pub mod memory;
mod registry;
pub mod ring;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

pub use registry::{Discovery, MemberWatch, Registration};

/// The roles of a barrage cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Tracks membership and owns message streams.
    Controller,
    /// The public push API.
    PushManager,
    /// Holds WebSockets.
    ConnectNode,
}

impl Role {
    /// The role's name as used in keys and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::PushManager => "push-manager",
            Role::ConnectNode => "connect-node",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a process publishes about itself: stored as JSON under its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Unique id within the role.
    pub id: String,
    /// The process's role.
    pub role: Role,
    /// `host:port` of its gRPC server.
    pub grpc_addr: String,
    /// `host:port` of its HTTP server (metrics, health).
    #[serde(default)]
    pub http_addr: String,
    /// `host:port` of its WebSocket listener (connect-nodes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws_addr: Option<String>,
}

/// Live members of one role, by id.
pub type Members = BTreeMap<String, Member>;

/// Errors from a discovery backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend could not be reached or answered with an error.
    #[error("discovery backend unavailable: {0}")]
    Unavailable(String),
    /// The lease is gone (expired or revoked).
    #[error("lease {0} not found")]
    LeaseNotFound(i64),
    /// A stored value could not be decoded.
    #[error("bad value under {key}: {reason}")]
    BadValue {
        /// The key holding the value.
        key: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A lease id, as etcd numbers them.
pub type LeaseId = i64;

/// One change seen by a prefix watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or updated.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: Vec<u8>,
    },
    /// A key was deleted (explicitly or by lease expiry).
    Delete {
        /// The key.
        key: String,
    },
}

/// A key-value store with etcd's lease and watch semantics.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Grants a lease that expires `ttl` after its last keep-alive.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId>;
    /// Refreshes a lease; [`Error::LeaseNotFound`] when it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<()>;
    /// Revokes a lease, deleting every key bound to it.
    async fn revoke(&self, lease: LeaseId) -> Result<()>;
    /// Stores `value` under `key`, bound to `lease` (deleted when it ends).
    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()>;
    /// Deletes a key.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Every key under `prefix`, and the store revision the answer is at.
    async fn list(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64)>;
    /// Changes under `prefix` after revision `after`, in order. The stream
    /// ends or yields an error when the watch breaks; callers re-list.
    async fn watch(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<BoxStream<'static, Result<WatchEvent>>>;
}
