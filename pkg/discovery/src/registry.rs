//! Registration with keep-alive, and membership watches, on any [`Backend`].
// INTERFACE ONLY: to be implemented.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Backend, Member, Members, Result, Role};

/// Entry point: register this process and watch others.
#[derive(Clone)]
pub struct Discovery {
    backend: Arc<dyn Backend>,
    prefix: String,
}

impl Discovery {
    /// Discovery over `backend`, with keys under `<prefix>/nodes/`.
    pub fn new(backend: Arc<dyn Backend>, prefix: impl Into<String>) -> Self {
        todo!()
    }
    /// A fresh in-process registry (prefix `/barrage`).
    pub fn in_process() -> Self {
        todo!()
    }
    /// Connects to etcd.
    pub async fn etcd(endpoints: &[String], prefix: &str) -> Result<Self> {
        todo!()
    }
    /// `<prefix>/nodes/<role>/<id>`
    pub fn key(&self, role: Role, id: &str) -> String {
        todo!()
    }
    /// Registers `member` under a lease of `ttl`, kept alive in the background.
    pub async fn register(&self, member: Member, ttl: Duration) -> Result<Registration> {
        todo!()
    }
    /// Watches the members of `role`.
    pub async fn watch(&self, role: Role) -> Result<MemberWatch> {
        todo!()
    }
}

/// A live registration.
pub struct Registration {}

impl Registration {
    /// Whether the key is currently registered.
    pub fn is_registered(&self) -> bool {
        todo!()
    }
    /// Leaves discovery now.
    pub async fn deregister(self) {
        todo!()
    }
}

/// The live members of one role.
#[derive(Clone)]
pub struct MemberWatch {
    rx: watch::Receiver<Arc<Members>>,
}

impl MemberWatch {
    /// A watch that never changes.
    pub fn fixed(members: Members) -> Self {
        todo!()
    }
    /// Current members.
    pub fn current(&self) -> Arc<Members> {
        todo!()
    }
    /// Waits for the next change; Err when the watch has ended.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        todo!()
    }
}
