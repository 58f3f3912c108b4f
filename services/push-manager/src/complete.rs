//! Recording of push results at the owning controllers.
//!
//! A push that carries a `message_id` is recorded at the controller owning
//! each of its streams once it has been delivered: the connections it
//! reached and the nodes it failed on. A retry with the same id is then
//! answered with that result, and sent again only to those nodes. The
//! record is off the reply path and needs no answer, so a [`Completer`]
//! gathers the records for one controller for up to [`LINGER`] and sends
//! them in one `CompleteBatch` call: at thousands of pushes per second
//! that is one call every few milliseconds instead of one per push.
//!
//! A record that does not arrive leaves its push "under way" at the
//! controller, and a retry made after the push-manager's resend wait sends
//! the message again to every node hosting its targets, including those
//! that have it (clients drop the repeat by its id). So a call that fails
//! is tried once more, records still queued are sent before the process
//! stops ([`Completer::flush`]), and every record lost is logged as a
//! warning or counted (`push_manager_completions_dropped_total`, when the
//! queue is full). A controller that predates `CompleteBatch` is sent one
//! `Complete` per record instead, once it has answered `UNIMPLEMENTED`.

use std::time::Duration;

use barrage_proto::PeerChannel;
use barrage_proto::v1::controller_client::ControllerClient;
use barrage_proto::v1::{CompleteBatchRequest, CompleteRequest};
use futures::future::join_all;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::Code;

use barrage_proto::coalesce::BatchCall;

/// How long the first record of a batch waits for others.
pub const LINGER: Duration = Duration::from_millis(5);

/// Most records in one call.
const MAX_ITEMS: usize = 1024;

/// Records waiting for their call, per controller; more are dropped.
const QUEUE: usize = 64 * 1024;

/// Pause before a failed call is tried again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Sends push results to one controller, gathered into batches.
pub struct Completer {
    tx: mpsc::Sender<CompleteRequest>,
    stop: CancellationToken,
    driver: TaskTracker,
}

impl Completer {
    /// A completer for `client`, each call bounded by `timeout`.
    pub fn new(client: ControllerClient<PeerChannel>, timeout: Duration, linger: Duration) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let driver = TaskTracker::new();
        driver.spawn(drive(client, rx, timeout, linger, stop.clone()));
        driver.close();
        Completer { tx, stop, driver }
    }

    /// Queues `record` for the next call; false when the queue is full and
    /// the record was dropped.
    pub fn record(&self, record: CompleteRequest) -> bool {
        self.tx.try_send(record).is_ok()
    }

    /// Sends what is queued now, without waiting for more, and stops.
    pub async fn flush(&self) {
        self.stop.cancel();
        self.driver.wait().await;
    }
}

async fn drive(
    client: ControllerClient<PeerChannel>,
    mut rx: mpsc::Receiver<CompleteRequest>,
    timeout: Duration,
    linger: Duration,
    stop: CancellationToken,
) {
    let mut batching = BatchCall::Unknown;
    loop {
        // Once stopped, what is queued goes out without lingering, then
        // the driver ends.
        let first = tokio::select! {
            r = rx.recv() => r,
            () = stop.cancelled() => rx.try_recv().ok(),
        };
        let Some(first) = first else {
            return;
        };
        let mut records = vec![first];
        // A full batch already waiting goes at once.
        if rx.len() + 1 < MAX_ITEMS {
            tokio::select! {
                () = tokio::time::sleep(linger) => {}
                () = stop.cancelled() => {}
            }
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

/// One call with `records` (or one per record for an older controller),
/// tried once more if it fails; what the controller said about
/// `CompleteBatch`.
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
    let mut error = String::new();
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(RETRY_AFTER).await;
        }
        let req = crate::pool::request(
            CompleteBatchRequest {
                completions: records.clone(),
            },
            timeout,
        );
        match tokio::time::timeout(timeout, client.clone().complete_batch(req)).await {
            Ok(Ok(_)) => return BatchCall::Served,
            Ok(Err(s)) if s.code() == Code::Unimplemented => {
                if batching == BatchCall::Unknown {
                    one_by_one(client, records, timeout).await;
                    return BatchCall::Unimplemented;
                }
                tracing::warn!(
                    records = n,
                    "controller stopped serving CompleteBatch; these push results were not recorded"
                );
                return BatchCall::Unknown;
            }
            Ok(Err(s)) => error = s.to_string(),
            Err(_) => error = format!("timed out after {timeout:?}"),
        }
    }
    tracing::warn!(
        records = n,
        %error,
        "could not record push results: retries of these pushes will send them again"
    );
    batching
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
                tracing::warn!(error = %e, "could not record a push result: a retry of it will send it again");
            }
        }
    });
    let _ = tokio::time::timeout(timeout, join_all(calls)).await;
}
