//! Recording of push results at the owning controllers.
//!
//! A push that carries a `message_id` is recorded at the controller owning
//! each of its streams once it has been delivered, so that a retry with the
//! same id is answered with the first attempt's result. The record is off
//! the reply path and needs no answer, so a [`Completer`] gathers the
//! records for one controller for up to [`LINGER`] and sends them in one
//! `CompleteBatch` call: at thousands of pushes per second that is one
//! call every few milliseconds instead of one per push.
//!
//! Recording is best effort, as it was with one call per push: a record
//! dropped because the queue is full is counted
//! (`push_manager_completions_dropped_total`), one the controller did not
//! take is logged, and the only effect is that a retry of that push
//! reports 0 connections reached instead of the first attempt's count. It
//! is never delivered twice: the controller knows the id from `Resolve`.
//! A controller that predates `CompleteBatch` is sent one `Complete` per
//! record instead, once it has answered `UNIMPLEMENTED`.

use std::time::Duration;

use barrage_proto::PeerChannel;
use barrage_proto::v1::controller_client::ControllerClient;
use barrage_proto::v1::{CompleteBatchRequest, CompleteRequest};
use futures::future::join_all;
use tokio::sync::mpsc;
use tonic::Code;

use barrage_proto::coalesce::BatchCall;

/// How long the first record of a batch waits for others.
pub const LINGER: Duration = Duration::from_millis(5);

/// Most records in one call.
const MAX_ITEMS: usize = 1024;

/// Records waiting for their call, per controller; more are dropped.
const QUEUE: usize = 64 * 1024;

/// Sends push results to one controller, gathered into batches.
pub struct Completer {
    tx: mpsc::Sender<CompleteRequest>,
}

impl Completer {
    /// A completer for `client`, each call bounded by `timeout`. Its task
    /// sends what is still queued and ends when the completer is dropped.
    pub fn new(client: ControllerClient<PeerChannel>, timeout: Duration, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drive(client, rx, timeout, linger));
        Completer { tx }
    }

    /// Queues `record` for the next call; false when the queue is full and
    /// the record was dropped.
    pub fn record(&self, record: CompleteRequest) -> bool {
        self.tx.try_send(record).is_ok()
    }
}

async fn drive(
    client: ControllerClient<PeerChannel>,
    mut rx: mpsc::Receiver<CompleteRequest>,
    timeout: Duration,
    linger: Duration,
) {
    let mut batching = BatchCall::Unknown;
    while let Some(first) = rx.recv().await {
        let mut records = vec![first];
        // A full batch already waiting goes at once.
        if rx.len() + 1 < MAX_ITEMS {
            tokio::time::sleep(linger).await;
        }
        while records.len() < MAX_ITEMS {
            match rx.try_recv() {
                Ok(r) => records.push(r),
                Err(_) => break,
            }
        }
        batching = send(&client, records, timeout, batching).await;
    }
}

/// One call with `records` (or one per record for an older controller);
/// what the controller said about `CompleteBatch`.
async fn send(
    client: &ControllerClient<PeerChannel>,
    records: Vec<CompleteRequest>,
    timeout: Duration,
    batching: BatchCall,
) -> BatchCall {
    let n = records.len();
    if batching == BatchCall::Unimplemented {
        one_by_one(client, records, timeout).await;
        return batching;
    }
    // Until the controller has served a batch, keep the records to send
    // them one by one should it not know the call.
    let kept = (batching == BatchCall::Unknown).then(|| records.clone());
    let req = crate::pool::request(
        CompleteBatchRequest {
            completions: records,
        },
        timeout,
    );
    let answer = tokio::time::timeout(timeout, client.clone().complete_batch(req)).await;
    match answer {
        Ok(Ok(_)) => BatchCall::Served,
        Ok(Err(s)) if s.code() == Code::Unimplemented => match kept {
            Some(records) => {
                one_by_one(client, records, timeout).await;
                BatchCall::Unimplemented
            }
            None => {
                tracing::warn!(
                    records = n,
                    "controller stopped serving CompleteBatch; these push results were not recorded"
                );
                BatchCall::Unknown
            }
        },
        Ok(Err(s)) => {
            tracing::debug!(records = n, error = %s, "could not record push results");
            batching
        }
        Err(_) => {
            tracing::debug!(records = n, "recording push results timed out");
            batching
        }
    }
}

async fn one_by_one(
    client: &ControllerClient<PeerChannel>,
    records: Vec<CompleteRequest>,
    timeout: Duration,
) {
    let calls = records.into_iter().map(|r| {
        let mut client = client.clone();
        let req = crate::pool::request(r, timeout);
        async move {
            if let Err(e) = client.complete(req).await {
                tracing::debug!(error = %e, "could not record a push result");
            }
        }
    });
    let _ = tokio::time::timeout(timeout, join_all(calls)).await;
}
