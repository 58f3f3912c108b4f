//! Registration with keep-alive, and membership watches, on any [`Backend`].
//!
//! A [`Registration`] keeps its lease alive in the background; when the
//! lease is lost (etcd restarted, the process stalled past its TTL) or its
//! key was deleted behind its back, it registers again, and while the backend is unreachable it keeps trying
//! without stopping the process. A [`MemberWatch`] lists a role once, then
//! follows changes; when the watch breaks it re-lists, keeping the last
//! known members meanwhile.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::etcd::EtcdBackend;
use crate::memory::MemoryBackend;
use crate::{Backend, Error, Member, Members, Result, Role, WatchEvent};

/// Entry point: register this process and watch others.
#[derive(Clone)]
pub struct Discovery {
    backend: Arc<dyn Backend>,
    prefix: String,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl Discovery {
    /// Discovery over `backend`, with keys under `<prefix>/nodes/`.
    pub fn new(backend: Arc<dyn Backend>, prefix: impl Into<String>) -> Self {
        Discovery {
            backend,
            prefix: prefix.into(),
        }
    }

    /// A fresh in-process registry (prefix `/barrage`).
    pub fn in_process() -> Self {
        Self::new(MemoryBackend::new(), "/barrage")
    }

    /// Connects to etcd; fails when it does not answer.
    pub async fn etcd(endpoints: &[String], prefix: &str) -> Result<Self> {
        Ok(Self::new(
            Arc::new(EtcdBackend::connect(endpoints).await?),
            prefix,
        ))
    }

    /// The backend, for tests that act behind a registration's back.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// `<prefix>/nodes/<role>/<id>`
    pub fn key(&self, role: Role, id: &str) -> String {
        format!("{}/nodes/{}/{}", self.prefix, role, id)
    }

    fn role_prefix(&self, role: Role) -> String {
        format!("{}/nodes/{}/", self.prefix, role)
    }

    /// Registers `member` under a lease of `ttl`, kept alive in the
    /// background. Fails when the first attempt fails.
    pub async fn register(&self, member: Member, ttl: Duration) -> Result<Registration> {
        let key = self.key(member.role, &member.id);
        let value = serde_json::to_vec(&member).map_err(|e| Error::BadValue {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let lease = put_with_lease(&*self.backend, &key, &value, ttl).await?;
        let lease = Arc::new(AtomicI64::new(lease));
        let (tx, rx) = watch::channel(true);
        let stop = CancellationToken::new();
        let task = tokio::spawn(keep_alive(
            self.backend.clone(),
            key.clone(),
            value,
            ttl,
            lease.clone(),
            tx,
            stop.clone(),
        ));
        tracing::info!(%key, ttl_secs = ttl.as_secs(), "registered in discovery");
        Ok(Registration {
            backend: self.backend.clone(),
            key,
            lease,
            registered: rx,
            stop,
            task: Some(task),
        })
    }

    /// Watches the members of `role`. Fails when the first listing fails.
    pub async fn watch(&self, role: Role) -> Result<MemberWatch> {
        let prefix = self.role_prefix(role);
        let (items, rev) = self.backend.list(&prefix).await?;
        let (tx, rx) = watch::channel(Arc::new(decode_all(&prefix, items)));
        tokio::spawn(follow(self.backend.clone(), prefix, rev, tx));
        Ok(MemberWatch { rx, _fixed: None })
    }
}

async fn put_with_lease(
    backend: &dyn Backend,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<i64> {
    let lease = backend.grant(ttl).await?;
    backend.put(key, value.to_vec(), Some(lease)).await?;
    Ok(lease)
}

/// Puts `key` back under `lease` when it went away while the lease
/// lives (deleted by hand, or by a tool): without it the member would stay
/// out of discovery for as long as it runs.
async fn ensure_present(backend: &dyn Backend, key: &str, value: &[u8], lease: i64) -> Result<()> {
    // The lease is alive: a failed check waits for the next keep-alive.
    let (items, _) = match backend.list(key).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::debug!(%key, error = %e, "could not check the discovery key");
            return Ok(());
        }
    };
    if items.iter().any(|(k, _)| k == key) {
        return Ok(());
    }
    tracing::warn!(%key, "discovery key removed while its lease lives; registering again");
    backend.put(key, value.to_vec(), Some(lease)).await
}

async fn keep_alive(
    backend: Arc<dyn Backend>,
    key: String,
    value: Vec<u8>,
    ttl: Duration,
    lease: Arc<AtomicI64>,
    registered: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let mut last_ok = tokio::time::Instant::now();
    let mut delay = period;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        let id = lease.load(Ordering::SeqCst);
        let result = match backend.keep_alive(id).await {
            Err(Error::LeaseNotFound(_)) => {
                tracing::warn!(%key, "discovery lease lost; registering again");
                registered.send_replace(false);
                match put_with_lease(&*backend, &key, &value, ttl).await {
                    Ok(new) => {
                        lease.store(new, Ordering::SeqCst);
                        tracing::info!(%key, "registered in discovery again");
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(()) => ensure_present(&*backend, &key, &value, id).await,
            other => other,
        };
        match result {
            Ok(()) => {
                last_ok = tokio::time::Instant::now();
                registered.send_replace(true);
                delay = period;
            }
            Err(e) => {
                if last_ok.elapsed() >= ttl {
                    registered.send_replace(false);
                }
                tracing::warn!(%key, error = %e, "discovery keep-alive failed; retrying");
                // Retry sooner than the lease would expire.
                delay = (period / 3).max(Duration::from_millis(100));
            }
        }
    }
}

fn id_of<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|id| !id.is_empty())
}

fn decode(prefix: &str, key: &str, value: &[u8]) -> Option<Member> {
    id_of(prefix, key)?;
    match serde_json::from_slice::<Member>(value) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring an undecodable discovery entry");
            None
        }
    }
}

fn decode_all(prefix: &str, items: Vec<(String, Vec<u8>)>) -> Members {
    let mut members = Members::new();
    for (key, value) in items {
        if let (Some(id), Some(m)) = (id_of(prefix, &key), decode(prefix, &key, &value)) {
            members.insert(id.to_owned(), m);
        }
    }
    members
}

async fn follow(
    backend: Arc<dyn Backend>,
    prefix: String,
    mut rev: i64,
    tx: watch::Sender<Arc<Members>>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match backend.watch(&prefix, rev).await {
            Ok(mut events) => loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    e = events.next() => e,
                };
                let Some(Ok(event)) = event else {
                    if let Some(Err(e)) = event {
                        tracing::warn!(%prefix, error = %e, "discovery watch broke; re-listing");
                    }
                    break;
                };
                backoff = Duration::from_millis(100);
                let mut members = (**tx.borrow()).clone();
                let changed = match event {
                    WatchEvent::Put { key, value } => {
                        match (id_of(&prefix, &key), decode(&prefix, &key, &value)) {
                            (Some(id), Some(m)) => {
                                members.insert(id.to_owned(), m.clone()) != Some(m)
                            }
                            (Some(id), None) => members.remove(id).is_some(),
                            _ => false,
                        }
                    }
                    WatchEvent::Delete { key } => {
                        id_of(&prefix, &key).is_some_and(|id| members.remove(id).is_some())
                    }
                };
                if changed {
                    tx.send_replace(Arc::new(members));
                }
            },
            Err(e) => tracing::warn!(%prefix, error = %e, "discovery watch failed; retrying"),
        }
        // Re-list, keeping the last known members until it works.
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            match backend.list(&prefix).await {
                Ok((items, r)) => {
                    rev = r;
                    let members = decode_all(&prefix, items);
                    if **tx.borrow() != members {
                        tx.send_replace(Arc::new(members));
                    }
                    break;
                }
                Err(e) => tracing::debug!(%prefix, error = %e, "discovery re-list failed"),
            }
        }
    }
}

/// A live registration. Dropping it stops the keep-alive (the key then
/// expires with its lease); [`Registration::deregister`] leaves at once.
pub struct Registration {
    backend: Arc<dyn Backend>,
    key: String,
    lease: Arc<AtomicI64>,
    registered: watch::Receiver<bool>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// Whether the key is believed present in the registry right now.
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// Follows [`Registration::is_registered`] as it changes.
    pub fn watch_registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// The lease currently holding the key.
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::SeqCst)
    }

    /// Leaves discovery now: stops the keep-alive and revokes the lease
    /// (bounded by a short timeout; the lease expires anyway).
    pub async fn deregister(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let lease = self.lease();
        let revoke = async {
            self.backend.revoke(lease).await?;
            self.backend.delete(&self.key).await
        };
        match tokio::time::timeout(Duration::from_secs(2), revoke).await {
            Ok(Ok(())) => tracing::info!(key = %self.key, "left discovery"),
            Ok(Err(e)) => {
                tracing::warn!(key = %self.key, error = %e, "could not leave discovery; the lease will expire")
            }
            Err(_) => {
                tracing::warn!(key = %self.key, "leaving discovery timed out; the lease will expire")
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The live members of one role.
#[derive(Clone)]
pub struct MemberWatch {
    rx: watch::Receiver<Arc<Members>>,
    /// Keeps a fixed watch's sender alive so `changed` waits forever.
    _fixed: Option<Arc<watch::Sender<Arc<Members>>>>,
}

impl MemberWatch {
    /// A watch that never changes (static configuration, no etcd).
    pub fn fixed(members: Members) -> Self {
        let (tx, rx) = watch::channel(Arc::new(members));
        MemberWatch {
            rx,
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// Current members.
    pub fn current(&self) -> Arc<Members> {
        self.rx.borrow().clone()
    }

    /// Keeps `apply` in step with the members: applies the members known
    /// now before returning (so a role that installs its peers this way
    /// has them before it serves), then returns the task that applies
    /// every later change until `stop` fires or the watch ends.
    pub fn follow(
        mut self,
        stop: CancellationToken,
        mut apply: impl FnMut(&Members) + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        apply(&self.seen());
        // The task owns the whole watch (methods, not fields): a fixed
        // watch's sender must live as long as the task, or `changed` ends.
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = self.changed() => if r.is_err() { return },
                }
                apply(&self.seen());
            }
        }
    }

    /// Current members, marked as seen.
    fn seen(&mut self) -> Arc<Members> {
        self.rx.borrow_and_update().clone()
    }

    /// Waits for the next change; Err when the watch has ended.
    pub async fn changed(&mut self) -> Result<(), watch::error::RecvError> {
        self.rx.changed().await
    }

    /// Waits until `pred` holds for the members, for at most `timeout`.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Members) -> bool,
    ) -> Result<Arc<Members>, &'static str> {
        let wait = async {
            loop {
                let cur = self.rx.borrow_and_update().clone();
                if pred(&cur) {
                    return Ok(cur);
                }
                if self.rx.changed().await.is_err() {
                    return Err("watch ended");
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err("timed out"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> Member {
        Member {
            id: id.into(),
            role: Role::Controller,
            grpc_addr: format!("{id}:1"),
            http_addr: String::new(),
            ws_addr: None,
        }
    }

    #[tokio::test]
    async fn follow_applies_the_current_members_at_once_then_every_change() {
        let d = Discovery::in_process();
        let _a = d
            .register(member("a"), Duration::from_secs(10))
            .await
            .unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::<Vec<String>>::new()));
        let stop = CancellationToken::new();
        let follow = d
            .watch(Role::Controller)
            .await
            .unwrap()
            .follow(stop.clone(), {
                let seen = seen.clone();
                move |m| seen.lock().push(m.keys().cloned().collect())
            });
        // Applied before the task ever runs.
        assert_eq!(*seen.lock(), vec![vec!["a".to_owned()]]);
        let task = tokio::spawn(follow);
        let _b = d
            .register(member("b"), Duration::from_secs(10))
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while seen.lock().last().map(Vec::len) != Some(2) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the change is applied");
        assert_eq!(seen.lock()[0], vec!["a".to_owned()], "the first state once");
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .unwrap();
    }

    #[tokio::test]
    async fn following_a_fixed_watch_lasts_until_stopped() {
        let mut members = Members::new();
        members.insert("c".into(), member("c"));
        let applied = Arc::new(AtomicI64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(MemberWatch::fixed(members).follow(stop.clone(), {
            let applied = applied.clone();
            move |m| {
                applied.fetch_add(m.len() as i64, Ordering::SeqCst);
            }
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!task.is_finished(), "a fixed watch never ends by itself");
        assert_eq!(
            applied.load(Ordering::SeqCst),
            1,
            "applied once, at the start"
        );
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops")
            .unwrap();
    }
}
