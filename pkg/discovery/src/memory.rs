//! An in-process registry with etcd's semantics, for `barrage dev` and tests.
//!
//! Every mutation bumps a revision; leases expire `ttl` after their last
//! keep-alive (measured with `tokio::time`, so tests can pause time) and
//! take their keys with them; prefix watches replay from a revision out of a
//! bounded event log and then follow live changes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::{Backend, Error, LeaseId, Result, WatchEvent};

/// Events kept for watches that start from an older revision.
const EVENT_LOG: usize = 4096;

struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<String>,
}

struct Watcher {
    prefix: String,
    tx: mpsc::UnboundedSender<Result<WatchEvent>>,
}

#[derive(Default)]
struct Inner {
    rev: i64,
    kv: BTreeMap<String, (Vec<u8>, Option<LeaseId>)>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    log: VecDeque<(i64, WatchEvent)>,
    watchers: Vec<Watcher>,
    sweeper: bool,
}

impl Inner {
    fn emit(&mut self, event: WatchEvent) {
        self.rev += 1;
        let key = match &event {
            WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key.clone(),
        };
        self.watchers
            .retain(|w| !key.starts_with(&w.prefix) || w.tx.send(Ok(event.clone())).is_ok());
        self.log.push_back((self.rev, event));
        if self.log.len() > EVENT_LOG {
            self.log.pop_front();
        }
    }

    fn delete_key(&mut self, key: &str) {
        if let Some((_, lease)) = self.kv.remove(key) {
            if let Some(l) = lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
            self.emit(WatchEvent::Delete {
                key: key.to_owned(),
            });
        }
    }

    fn drop_lease(&mut self, id: LeaseId) {
        if let Some(lease) = self.leases.remove(&id) {
            let mut keys: Vec<String> = lease.keys.into_iter().collect();
            keys.sort();
            for k in keys {
                if self.kv.remove(&k).is_some() {
                    self.emit(WatchEvent::Delete { key: k });
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) -> Option<Instant> {
        let dead: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.drop_lease(id);
        }
        self.leases.values().map(|l| l.deadline).min()
    }
}

/// The in-process store. Cheap to share: wrap it in an `Arc`.
#[derive(Default)]
pub struct MemoryBackend {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryBackend {
    /// A new, empty store.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Current revision (number of mutations so far).
    pub fn revision(&self) -> i64 {
        self.inner.lock().rev
    }

    /// Expires leases whose deadline passed, without waiting for the sweeper.
    pub fn expire_now(&self) {
        self.inner.lock().expire(Instant::now());
    }

    fn ensure_sweeper(&self) {
        let mut inner = self.inner.lock();
        if inner.sweeper {
            return;
        }
        inner.sweeper = true;
        let weak: Weak<Mutex<Inner>> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                let next = {
                    let Some(inner) = weak.upgrade() else { return };
                    let mut guard = inner.lock();
                    guard.expire(Instant::now())
                };
                // Wake at the next deadline, or check back now and then.
                let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_millis(250));
                tokio::time::sleep_until(wake.min(Instant::now() + Duration::from_millis(250)))
                    .await;
            }
        });
    }
}

#[async_trait]
impl Backend for MemoryBackend {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        self.ensure_sweeper();
        let mut inner = self.inner.lock();
        inner.next_lease += 1;
        let id = inner.next_lease;
        inner.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: HashSet::new(),
            },
        );
        Ok(id)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        inner.expire(now);
        match inner.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            None => Err(Error::LeaseNotFound(lease)),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.inner.lock().drop_lease(lease);
        Ok(())
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        let mut inner = self.inner.lock();
        inner.expire(Instant::now());
        if let Some(id) = lease {
            match inner.leases.get_mut(&id) {
                Some(l) => {
                    l.keys.insert(key.to_owned());
                }
                None => return Err(Error::LeaseNotFound(id)),
            }
        }
        let old = inner.kv.get(key).and_then(|(_, l)| *l);
        if let Some(old) = old
            && Some(old) != lease
            && let Some(l) = inner.leases.get_mut(&old)
        {
            l.keys.remove(key);
        }
        inner.kv.insert(key.to_owned(), (value.clone(), lease));
        inner.emit(WatchEvent::Put {
            key: key.to_owned(),
            value,
        });
        Ok(())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.lock().delete_key(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64)> {
        let mut inner = self.inner.lock();
        inner.expire(Instant::now());
        let items = inner
            .kv
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect();
        Ok((items, inner.rev))
    }

    async fn watch(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<BoxStream<'static, Result<WatchEvent>>> {
        self.ensure_sweeper();
        let mut inner = self.inner.lock();
        let oldest = inner.log.front().map_or(inner.rev + 1, |(r, _)| *r);
        if after + 1 < oldest && after < inner.rev {
            return Err(Error::Unavailable(format!(
                "revision {after} is compacted (oldest kept {oldest}); re-list"
            )));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for (rev, ev) in &inner.log {
            let key = match ev {
                WatchEvent::Put { key, .. } | WatchEvent::Delete { key } => key,
            };
            if *rev > after && key.starts_with(prefix) {
                let _ = tx.send(Ok(ev.clone()));
            }
        }
        inner.watchers.push(Watcher {
            prefix: prefix.to_owned(),
            tx,
        });
        Ok(UnboundedReceiverStream::new(rx).boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn next(s: &mut BoxStream<'static, Result<WatchEvent>>) -> WatchEvent {
        tokio::time::timeout(Duration::from_secs(5), s.next())
            .await
            .expect("watch event in time")
            .expect("stream open")
            .expect("no error")
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_and_take_their_keys() {
        let b = MemoryBackend::new();
        let lease = b.grant(Duration::from_secs(10)).await.unwrap();
        b.put("/a/1", b"x".to_vec(), Some(lease)).await.unwrap();
        b.put("/a/2", b"y".to_vec(), None).await.unwrap();
        let (_, rev) = b.list("/a/").await.unwrap();
        let mut w = b.watch("/a/", rev).await.unwrap();

        tokio::time::sleep(Duration::from_secs(6)).await;
        b.keep_alive(lease).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(b.list("/a/").await.unwrap().0.len(), 2, "kept alive");

        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(
            next(&mut w).await,
            WatchEvent::Delete { key: "/a/1".into() }
        );
        let (items, _) = b.list("/a/").await.unwrap();
        assert_eq!(items, vec![("/a/2".to_string(), b"y".to_vec())]);
        assert!(matches!(
            b.keep_alive(lease).await,
            Err(Error::LeaseNotFound(id)) if id == lease
        ));
        assert!(matches!(
            b.put("/a/3", vec![], Some(lease)).await,
            Err(Error::LeaseNotFound(_))
        ));
    }

    #[tokio::test]
    async fn watch_replays_from_a_revision_then_follows() {
        let b = MemoryBackend::new();
        b.put("/p/a", b"1".to_vec(), None).await.unwrap();
        let rev = b.revision();
        b.put("/p/b", b"2".to_vec(), None).await.unwrap();
        b.put("/other", b"3".to_vec(), None).await.unwrap();
        let mut w = b.watch("/p/", rev).await.unwrap();
        assert_eq!(
            next(&mut w).await,
            WatchEvent::Put {
                key: "/p/b".into(),
                value: b"2".to_vec()
            }
        );
        b.delete("/p/a").await.unwrap();
        assert_eq!(
            next(&mut w).await,
            WatchEvent::Delete { key: "/p/a".into() }
        );
        let lease = b.grant(Duration::from_secs(60)).await.unwrap();
        b.put("/p/c", vec![], Some(lease)).await.unwrap();
        b.revoke(lease).await.unwrap();
        assert!(matches!(next(&mut w).await, WatchEvent::Put { .. }));
        assert_eq!(
            next(&mut w).await,
            WatchEvent::Delete { key: "/p/c".into() }
        );
    }

    #[tokio::test]
    async fn a_compacted_revision_asks_for_a_relist() {
        let b = MemoryBackend::new();
        for i in 0..(EVENT_LOG + 10) {
            b.put(&format!("/k/{i}"), vec![], None).await.unwrap();
        }
        assert!(b.watch("/k/", 1).await.is_err());
        assert!(b.watch("/k/", b.revision()).await.is_ok());
    }
}
