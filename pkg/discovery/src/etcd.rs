//! The etcd backend: leases, keys and prefix watches over `etcd-client`.

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::{Backend, Error, LeaseId, Result, WatchEvent};

/// Deadline of one etcd request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to an etcd cluster.
#[derive(Clone)]
pub struct EtcdBackend {
    client: Client,
}

fn unavailable(e: etcd_client::Error) -> Error {
    Error::Unavailable(e.to_string())
}

impl EtcdBackend {
    /// Connects to `endpoints` and checks that etcd answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let connect = Client::connect(endpoints, Some(options));
        let mut client = tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .map_err(|_| Error::Unavailable("timed out connecting to etcd".into()))?
            .map_err(unavailable)?;
        tokio::time::timeout(REQUEST_TIMEOUT, client.status())
            .await
            .map_err(|_| Error::Unavailable("etcd did not answer a status request".into()))?
            .map_err(unavailable)?;
        Ok(EtcdBackend { client })
    }
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

#[async_trait]
impl Backend for EtcdBackend {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId> {
        let secs = ttl.as_secs().max(1) as i64;
        let resp = self
            .client
            .clone()
            .lease_grant(secs, None)
            .await
            .map_err(unavailable)?;
        Ok(resp.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let lease_err = |e: etcd_client::Error| {
            if is_lease_not_found(&e) {
                Error::LeaseNotFound(lease)
            } else {
                unavailable(e)
            }
        };
        let call = async {
            let (mut keeper, mut stream) = self
                .client
                .clone()
                .lease_keep_alive(lease)
                .await
                .map_err(lease_err)?;
            keeper.keep_alive().await.map_err(lease_err)?;
            match stream.message().await.map_err(lease_err)? {
                Some(resp) if resp.ttl() > 0 => Ok(()),
                _ => Err(Error::LeaseNotFound(lease)),
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, call)
            .await
            .map_err(|_| Error::Unavailable("lease keep-alive timed out".into()))?
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        match self.client.clone().lease_revoke(lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<()> {
        let options = lease.map(|id| PutOptions::new().with_lease(id));
        match self.client.clone().put(key, value, options).await {
            Ok(_) => Ok(()),
            Err(e) if is_lease_not_found(&e) => Err(Error::LeaseNotFound(lease.unwrap_or(0))),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.client
            .clone()
            .delete(key, None)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64)> {
        let resp = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(unavailable)?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let items = resp
            .kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            })
            .collect();
        Ok((items, rev))
    }

    async fn watch(
        &self,
        prefix: &str,
        after: i64,
    ) -> Result<BoxStream<'static, Result<WatchEvent>>> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(after + 1);
        let stream = self
            .client
            .clone()
            .watch(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        let events = futures::stream::unfold(Some(stream), |state| async move {
            let mut stream = state?;
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.canceled() || resp.compact_revision() > 0 {
                        let reason = format!(
                            "watch canceled (compacted at {}): {}",
                            resp.compact_revision(),
                            resp.cancel_reason()
                        );
                        return Some((vec![Err(Error::Unavailable(reason))], None));
                    }
                    let batch = resp
                        .events()
                        .iter()
                        .filter_map(|ev| {
                            let kv = ev.kv()?;
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            Some(Ok(match ev.event_type() {
                                EventType::Put => WatchEvent::Put {
                                    key,
                                    value: kv.value().to_vec(),
                                },
                                EventType::Delete => WatchEvent::Delete { key },
                            }))
                        })
                        .collect::<Vec<_>>();
                    Some((batch, Some(stream)))
                }
                Ok(None) => None,
                Err(e) => Some((vec![Err(unavailable(e))], None)),
            }
        })
        .flat_map(futures::stream::iter);
        Ok(events.boxed())
    }
}
