//! The public `barrage.v1.PushManager` API: validate, resolve targets through
//! their owning controllers, fan out one `PushMessageBatch` per node,
//! concurrently, and report exactly what happened.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use barrage_auth::{AuthError, Scope};
use barrage_proto::PeerChannel;
use barrage_proto::v1::{
    self as pb, BatchMessage, BroadcastRequest, BroadcastResponse, CompleteRequest, DeliveryTarget,
    GetRoomInfoRequest, GetRoomInfoResponse, GetUserNodeRequest, GetUserNodeResponse, MessageBody,
    PushToRoomRequest, PushToRoomResponse, PushToUserRequest, PushToUserResponse, ResolveRequest,
    ResolveTarget, controller_client::ControllerClient, push_manager_server::PushManager,
};
use barrage_protocol::{RoomId, StreamKey, UserId};
use futures::future::join_all;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use crate::finish::{Detached, FinishOnDrop, MAX_DETACHED};
use crate::metrics::Metrics;
use crate::pool::{ControllerRing, NodePool};

/// Limits applied to API requests.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `content` (or `binary_content`) in bytes.
    pub max_content_bytes: usize,
    /// Most `user_ids` in one PushToUser.
    pub max_user_ids: usize,
    /// Longest `event` name in bytes.
    pub max_event_bytes: usize,
    /// Longest `message_id` in bytes.
    pub max_message_id_bytes: usize,
    /// Most `exclude_user_ids` in one PushToRoom.
    pub max_exclude_user_ids: usize,
}

impl Limits {
    /// The largest API request these limits accept must decode, so the
    /// gRPC server's size limit follows them: both contents at their
    /// largest and a full list of user ids, plus 1 MiB for the rest, and
    /// never under gRPC's default of 4 MiB. A larger request is refused
    /// before it is read, with INVALID_ARGUMENT naming `content` and its
    /// limit (see `read_limit`).
    pub fn grpc_request_bytes(&self) -> usize {
        let ids = self
            .max_user_ids
            .saturating_mul(barrage_protocol::MAX_ID_LEN + 3);
        self.max_content_bytes
            .saturating_mul(2)
            .saturating_add(ids)
            .saturating_add(1 << 20)
            .max(4 << 20)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_content_bytes: 64 * 1024,
            max_user_ids: 1000,
            max_event_bytes: 64,
            max_message_id_bytes: 128,
            max_exclude_user_ids: 1000,
        }
    }
}

/// The push-manager gRPC service.
#[derive(Clone)]
pub struct PushService {
    inner: Arc<Inner>,
}

struct Inner {
    api_auth: barrage_auth::ApiAuth,
    controllers: Arc<ControllerRing>,
    nodes: Arc<NodePool>,
    metrics: Metrics,
    limits: Limits,
    node_timeout: Duration,
    controller_timeout: Duration,
    /// A repeat whose attempt under way has recorded no result for this
    /// long is sent again (see [`RECORD_MARGIN`]).
    resend_after: Duration,
    /// The rests of pushes whose callers went away, waited for on drain.
    detached: Detached,
}

/// How long past its deadlines a push's result may take to be recorded at
/// its controllers. A push spends at most the controller deadline on
/// resolving (the controller takes the message during that time), the
/// node deadline on delivering, and the record's call is bounded by that
/// deadline too; a retry of a push that has recorded nothing that long
/// after the controller took it sends the message again: its push-manager
/// stopped, or lost the controller's answer.
const RECORD_MARGIN: Duration = Duration::from_secs(1);

/// How long a plain repeat waits for the result of the attempt under way
/// to be recorded, asking again after [`FIRST_RESULT_POLL`], then after
/// twice as long each time, before it answers "still under way".
const FIRST_RESULT_WAIT: Duration = Duration::from_millis(250);
const FIRST_RESULT_POLL: Duration = Duration::from_millis(10);

/// Resolved targets grouped into one batch per connect-node.
#[derive(Debug, Default)]
pub struct Batches {
    /// Delivery targets per node id.
    pub per_node: BTreeMap<String, Vec<DeliveryTarget>>,
    /// For repeated message ids: the connections the first attempt reached.
    pub first_delivered: u32,
    /// Targets that were repeats of an earlier push.
    pub duplicates: u32,
    /// Repeats sent again, to nodes an earlier attempt did not reach.
    pub resent: u32,
    /// Repeats whose earlier attempt is still under way: the shortest time
    /// since one began.
    pub under_way_ms: Option<u64>,
    /// User targets with no connection whose stream kept the message.
    pub stored: u32,
    /// Keys this push goes out to (for the first time, or sent again).
    pub sent: Vec<Sent>,
}

/// A key a push goes out to, as its result is recorded.
#[derive(Debug, PartialEq, Eq)]
pub struct Sent {
    /// The stream key.
    pub key: String,
    /// The nodes it goes to.
    pub nodes: Vec<String>,
    /// Which attempt of the message this is (0: the first).
    pub attempt: u32,
    /// The message's position in the key's stream (epoch, seq).
    pub position: (u64, u64),
}

/// Groups resolved targets by the connect-nodes hosting them. Repeats of
/// an earlier push are left out, except where the controller says to send
/// them again: then at once, without waiting for a predecessor.
pub fn assemble_batches(targets: Vec<pb::ResolvedTarget>, exclude: &[String]) -> Batches {
    let mut b = Batches::default();
    for t in targets {
        if t.duplicate {
            b.duplicates += 1;
            b.first_delivered = b.first_delivered.max(t.first_delivered);
            if !t.resend {
                // Not due to be sent again: left out.
                if t.under_way {
                    let age = b.under_way_ms.get_or_insert(t.first_age_ms);
                    *age = (*age).min(t.first_age_ms);
                }
                continue;
            }
            b.resent += 1;
        } else if t.stored {
            b.stored += 1;
        }
        for (i, node) in t.node_ids.iter().enumerate() {
            b.per_node
                .entry(node.clone())
                .or_default()
                .push(DeliveryTarget {
                    stream: t.key.clone(),
                    epoch: t.epoch,
                    seq: t.seq,
                    exclude_user_ids: exclude.to_vec(),
                    prev_seq: t.prev_seqs.get(i).copied().unwrap_or(0),
                });
        }
        b.sent.push(Sent {
            key: t.key,
            nodes: t.node_ids,
            attempt: t.attempt,
            position: (t.epoch, t.seq),
        });
    }
    b
}

/// The users a `PushToUser` names: `user_id`, then `user_ids`, each once,
/// in the order first given. Repeats are found by a scan of the few ids
/// seen so far, or for longer lists by a set: a full batch of `max` ids
/// costs one hash per id rather than a scan of those before it.
pub fn target_users(
    user_id: String,
    user_ids: Vec<String>,
    max: usize,
) -> Result<Vec<UserId>, Status> {
    /// Up to this many ids a scan beats hashing (`push_to_user_targets`).
    const SCAN_UP_TO: usize = 16;
    if user_ids.len() > max {
        return Err(invalid(
            "user_ids",
            format!("at most {max} users per push, got {}", user_ids.len()),
        ));
    }
    let mut users = Vec::with_capacity(user_ids.len() + 1);
    let mut seen: Option<HashSet<&str>> =
        (user_ids.len() > SCAN_UP_TO).then(|| HashSet::with_capacity(user_ids.len() + 1));
    if !user_id.is_empty() {
        let id = match &mut seen {
            Some(seen) => {
                seen.insert(user_id.as_str());
                UserId::new(user_id.as_str())
            }
            None => UserId::new(user_id),
        };
        users.push(id.map_err(|e| invalid("user_id", e))?);
    }
    for u in &user_ids {
        let id = UserId::new(u.as_str()).map_err(|e| invalid("user_ids", format!("{u:?}: {e}")))?;
        let fresh = match &mut seen {
            Some(seen) => seen.insert(u.as_str()),
            None => !users.contains(&id),
        };
        if fresh {
            users.push(id);
        }
    }
    if users.is_empty() {
        return Err(invalid(
            "user_id",
            "must not be empty (give user_id or user_ids)",
        ));
    }
    Ok(users)
}

/// How one push went.
/// What the owning controllers answered for one push.
struct Resolved {
    targets: Vec<pb::ResolvedTarget>,
    addrs: HashMap<String, String>,
    /// Why the first controller that did not answer failed, if one did not.
    unanswered: Option<String>,
}

struct Outcome {
    delivered: u32,
    nodes: usize,
    failed: Vec<(String, String)>,
    /// Targets (users) with no connection whose stream kept the message.
    stored: u32,
    /// Every target had seen this message id before.
    duplicate: bool,
    /// Connections this call reached (`delivered` adds, for a duplicate,
    /// those of the attempts before).
    reached: u32,
    /// Targets that were repeats sent again where they had not arrived.
    resent: u32,
    /// Position of the message in the first target's stream.
    position: (u64, u64),
}

impl Outcome {
    fn success(&self) -> bool {
        self.failed.is_empty()
    }

    fn message(&self) -> String {
        let failures = if self.failed.is_empty() {
            String::new()
        } else {
            let names: Vec<String> = self
                .failed
                .iter()
                .map(|(n, e)| format!("{n} ({e})"))
                .collect();
            format!(
                "; failed on {} of {} node(s): {}",
                self.failed.len(),
                self.nodes,
                names.join(", ")
            )
        };
        if self.duplicate {
            let again = if self.resent > 0 {
                format!(
                    "sent again where its first attempt had not arrived: {} connection(s) on {} node(s)",
                    self.reached, self.nodes
                )
            } else {
                "not delivered again".to_owned()
            };
            return format!(
                "duplicate: message_id was pushed before (delivered to {} connection(s)); {again}{failures}",
                self.delivered
            );
        }
        let mut notes = if self.stored > 0 {
            format!(
                "; stored for {} offline user(s), delivered on their next connect",
                self.stored
            )
        } else {
            String::new()
        };
        if self.resent > 0 {
            notes.push_str(&format!(
                "; {} target(s) had this message_id before and were sent it again where it had not arrived",
                self.resent
            ));
        }
        if self.failed.is_empty() {
            format!(
                "delivered to {} connection(s) on {} node(s){notes}",
                self.delivered, self.nodes
            )
        } else {
            format!(
                "partial failure: delivered to {} connection(s){failures}{notes}",
                self.delivered
            )
        }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// No controller to ask: discovery lists none.
fn no_controller() -> Status {
    Status::unavailable("no controller available: none is registered in discovery")
}

/// A controller's answer passed on: its verdicts (not found, invalid) as
/// they are, anything else as UNAVAILABLE naming the controller.
fn controller_error(id: &str, s: Status) -> Status {
    match s.code() {
        Code::NotFound | Code::InvalidArgument => s,
        _ => Status::unavailable(format!("controller {id} unavailable: {}", s.message())),
    }
}

fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::Unavailable => "UNAVAILABLE",
        Code::Aborted => "ABORTED",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Internal => "INTERNAL",
        _ => "OTHER",
    }
}

/// A call dropped this close to its deadline, or later, counts as
/// `DEADLINE_EXCEEDED`: the deadline is measured from when the handler
/// began, a little after the server's timer (and the caller's) started.
const DEADLINE_SLACK: Duration = Duration::from_millis(10);

/// One API call's entry in the metrics: its duration and status, recorded
/// once, when it answers or, if it never does, when it is dropped.
struct CallRecord<'a> {
    metrics: &'a Metrics,
    api: &'static str,
    start: Instant,
    /// When the caller's deadline passes, if it gave one.
    deadline: Option<Instant>,
    recorded: bool,
}

impl<'a> CallRecord<'a> {
    fn new(metrics: &'a Metrics, api: &'static str, timeout: Option<Duration>) -> Self {
        let start = Instant::now();
        CallRecord {
            metrics,
            api,
            start,
            deadline: timeout.and_then(|t| start.checked_add(t)),
            recorded: false,
        }
    }

    fn record(&mut self, code: Code) {
        self.recorded = true;
        record_call(self.metrics, self.api, code, self.start.elapsed());
    }
}

/// Counts one call of `api` that answered `code` after `took` in the API
/// metrics.
pub(crate) fn record_call(metrics: &Metrics, api: &str, code: Code, took: Duration) {
    metrics
        .api_duration
        .with_label_values(&[api])
        .observe(took.as_secs_f64());
    metrics
        .api_requests
        .with_label_values(&[api, code_label(code)])
        .inc();
}

impl Drop for CallRecord<'_> {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        let code = if std::thread::panicking() {
            Code::Internal
        } else if self
            .deadline
            .is_some_and(|d| Instant::now() + DEADLINE_SLACK >= d)
        {
            Code::DeadlineExceeded
        } else {
            Code::Cancelled
        };
        self.record(code);
    }
}

/// The deadline a gRPC caller gave its call (`grpc-timeout`: at most 8
/// digits and a unit), if it gave a valid one.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = v.len().checked_sub(1).filter(|&n| (1..=8).contains(&n))?;
    let (digits, unit) = v.split_at(split);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl PushService {
    /// A service resolving through `controllers` and delivering through `nodes`.
    pub fn new(
        controllers: Arc<ControllerRing>,
        nodes: Arc<NodePool>,
        metrics: Metrics,
        limits: Limits,
        node_timeout: Duration,
        api_auth: barrage_auth::ApiAuth,
    ) -> Self {
        let detached = Detached::new(MAX_DETACHED, metrics.abandoned.clone());
        PushService {
            inner: Arc::new(Inner {
                api_auth,
                controllers,
                nodes,
                metrics,
                limits,
                node_timeout,
                controller_timeout: node_timeout,
                resend_after: node_timeout * 3 + RECORD_MARGIN,
                detached,
            }),
        }
    }

    /// Waits for the pushes still running as tasks of their own (their
    /// callers went away) to end, then sends the push results still
    /// queued: a result that never reaches its controller makes a retry
    /// send the message again. Each step is given as long as a push may
    /// take to deliver and record its result (the resend wait).
    pub async fn drain(&self) {
        let inner = &self.inner;
        let limit = inner.resend_after;
        let pushes = &inner.detached;
        if tokio::time::timeout(limit, pushes.wait()).await.is_err() {
            tracing::warn!(
                pushes = pushes.running(),
                "pushes still running after the drain limit; their results are not recorded"
            );
        }
        if tokio::time::timeout(limit, inner.controllers.flush_records())
            .await
            .is_err()
        {
            tracing::warn!("push results still unsent after the drain limit");
        }
    }

    /// Runs the call `f` of `api`, recording its duration and status. A
    /// call that tonic or axum drops unanswered (its caller cancelled, or
    /// `timeout`, its deadline, passed) is recorded too, as `CANCELLED` or
    /// `DEADLINE_EXCEEDED`, with the time it ran.
    async fn observed<T>(
        &self,
        api: &'static str,
        timeout: Option<Duration>,
        f: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let mut call = CallRecord::new(&self.inner.metrics, api, timeout);
        let r = f.await;
        let code = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        call.record(code);
        if let Err(s) = &r
            && s.code() != Code::InvalidArgument
        {
            tracing::warn!(api, code = ?s.code(), message = s.message(), "push failed");
        }
        r.map(Response::new)
    }

    fn body(
        &self,
        content: String,
        binary: Vec<u8>,
        event: String,
        message_id: String,
    ) -> Result<MessageBody, Status> {
        let l = &self.inner.limits;
        if content.is_empty() && binary.is_empty() {
            return Err(invalid("content", "must not be empty"));
        }
        let size = content.len().max(binary.len());
        if size > l.max_content_bytes {
            return Err(invalid(
                if binary.len() > content.len() {
                    "binary_content"
                } else {
                    "content"
                },
                format!(
                    "{size} bytes exceeds the limit of {} bytes (push-manager --max-content-bytes)",
                    l.max_content_bytes
                ),
            ));
        }
        if event.len() > l.max_event_bytes {
            return Err(invalid(
                "event",
                format!("must be at most {} bytes", l.max_event_bytes),
            ));
        }
        if event.chars().any(char::is_control) {
            return Err(invalid("event", "must not contain control characters"));
        }
        if message_id.len() > l.max_message_id_bytes {
            return Err(invalid(
                "message_id",
                format!("must be at most {} bytes", l.max_message_id_bytes),
            ));
        }
        if message_id.chars().any(char::is_control) {
            return Err(invalid("message_id", "must not contain control characters"));
        }
        Ok(MessageBody {
            id: if message_id.is_empty() {
                uuid::Uuid::now_v7().to_string()
            } else {
                message_id
            },
            event: if event.is_empty() {
                "message".into()
            } else {
                event
            },
            content,
            binary_content: binary,
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            sender: String::new(),
        })
    }

    /// Checks the caller's API token for `scope`.
    fn authorize<T>(&self, req: &Request<T>, scope: Scope) -> Result<(), Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.inner
            .api_auth
            .check(header, scope)
            .map_err(|e| match e {
                AuthError::Forbidden(_) => Status::permission_denied(e.to_string()),
                // The shared text names the ways to present a connection
                // token; an API caller has one way.
                AuthError::Missing => Status::unauthenticated(
                    "no API token: send 'authorization: Bearer <API token>'",
                ),
                _ => Status::unauthenticated(format!(
                    "{e} (send 'authorization: Bearer <API token>')"
                )),
            })
    }

    /// The controller owning `key`, by id, with its client.
    fn owner(&self, key: &str) -> Result<(String, ControllerClient<PeerChannel>), Status> {
        self.inner.controllers.owner(key).ok_or_else(no_controller)
    }

    /// A request to a controller, with the controller deadline.
    fn controller_request<T>(&self, msg: T) -> Request<T> {
        crate::pool::request(msg, self.inner.controller_timeout)
    }

    /// Asks each key's owning controller for its stream position and nodes,
    /// concurrently per controller. A controller that does not answer does
    /// not void the others' answers: their controllers have already taken
    /// the message into their streams, so it must still go out to their
    /// targets (`Resolved::unanswered` says who did not answer).
    async fn resolve(
        &self,
        keys: &[StreamKey],
        body: &MessageBody,
        idempotent: bool,
        again: bool,
    ) -> Result<Resolved, Status> {
        let mut by_owner: BTreeMap<String, (_, Vec<ResolveTarget>)> = BTreeMap::new();
        for key in keys {
            let key = key.to_string();
            let (id, resolver) = self
                .inner
                .controllers
                .resolver(&key)
                .ok_or_else(no_controller)?;
            by_owner
                .entry(id)
                .or_insert_with(|| (resolver, Vec::new()))
                .1
                .push(ResolveTarget { key });
        }
        let calls = by_owner.into_iter().map(|(id, (resolver, targets))| {
            let req = ResolveRequest {
                targets,
                message_id: body.id.clone(),
                body: Some(body.clone()),
                // Only a push that records its result can be sent again.
                resend_after_ms: if idempotent {
                    self.inner.resend_after.as_millis() as u64
                } else {
                    0
                },
                again,
            };
            let timeout = self.inner.controller_timeout;
            // The call may have reached the controller: the message may be
            // in its stream without having been sent anywhere. Only a push
            // with the caller's own id can be retried safely.
            let stored = if idempotent {
                "it may have stored the message: a retry with the same message_id delivers it once"
            } else {
                "it may have stored the message, which reconnecting clients then recover; \
                 give pushes a message_id to retry them safely"
            };
            async move {
                // Bounds the wait behind busy calls too, so that a push is
                // resolved within the controller deadline or not at all.
                match tokio::time::timeout(timeout, resolver.call(req)).await {
                    Ok(Ok(Ok(r))) => Ok(r),
                    Ok(Ok(Err(s))) => Err(format!("controller {id} unavailable: {}", s.message())),
                    Ok(Err(e)) => Err(format!("controller {id} unavailable: {e}")),
                    Err(_) => Err(format!(
                        "controller {id} unavailable: timed out after {timeout:?} ({stored})"
                    )),
                }
            }
        });
        let mut out = Resolved {
            targets: Vec::with_capacity(keys.len()),
            addrs: HashMap::new(),
            unanswered: None,
        };
        for r in join_all(calls).await {
            match r {
                Ok(r) => {
                    out.targets.extend(r.targets);
                    out.addrs.extend(r.node_addrs);
                }
                Err(e) => {
                    out.unanswered.get_or_insert(e);
                }
            }
        }
        if out.targets.is_empty()
            && let Some(first) = &out.unanswered
        {
            return Err(Status::unavailable(format!(
                "{first}; nothing was delivered"
            )));
        }
        Ok(out)
    }

    /// Resolves a push; a plain repeat of a push whose result is not
    /// recorded yet is asked again for a short while. Such a repeat is
    /// usually a caller's retry right after the first attempt answered,
    /// whose record is still on its way (see [`crate::complete`]); the
    /// wait answers it with the first attempt's result instead of "still
    /// under way". Repeats of several targets of which some are new are
    /// not asked again: that would find the new ones repeated too.
    async fn resolve_awaiting_first_result(
        &self,
        keys: &[StreamKey],
        body: &MessageBody,
        idempotent: bool,
    ) -> Result<Resolved, Status> {
        let until = Instant::now() + FIRST_RESULT_WAIT;
        let mut pause = FIRST_RESULT_POLL;
        let mut again = false;
        loop {
            let r = self.resolve(keys, body, idempotent, again).await?;
            let awaits_record = r.unanswered.is_none()
                && r.targets.iter().all(|t| t.duplicate && !t.resend)
                && r.targets.iter().any(|t| t.under_way);
            let left = until.saturating_duration_since(Instant::now());
            if !awaits_record || left.is_zero() {
                return Ok(r);
            }
            tokio::time::sleep(pause.min(left)).await;
            pause *= 2;
            again = true;
        }
    }

    /// Tells the owning controllers how this attempt went (`delivered`:
    /// the connections it reached), so a retry with the same id is
    /// answered with the result and sent again only to the nodes it failed
    /// on. Off the reply path: the records are gathered and sent a few at
    /// a time.
    fn record_completion(
        &self,
        sent: Vec<Sent>,
        message_id: &str,
        delivered: u32,
        failed: &[(String, String)],
    ) {
        for Sent {
            key,
            nodes,
            attempt,
            position: (epoch, seq),
        } in sent
        {
            let Some(completer) = self.inner.controllers.completer(&key) else {
                continue;
            };
            let failed_node_ids = if failed.is_empty() {
                Vec::new()
            } else {
                nodes
                    .into_iter()
                    .filter(|n| failed.iter().any(|(f, _)| f == n))
                    .collect()
            };
            let recorded = completer.record(CompleteRequest {
                key,
                message_id: message_id.to_owned(),
                delivered,
                failed_node_ids,
                attempt,
                epoch,
                seq,
            });
            if !recorded {
                self.inner.metrics.completions_dropped.inc();
            }
        }
    }

    /// Pushes `body` to `keys`, to its end even when the caller goes away
    /// (cancels, or its deadline passes): once a controller has taken the
    /// message, it is sent to every node hosting its targets and, for a
    /// push with a caller's `message_id` (`idempotent`), its result is
    /// recorded, so that a retry is answered with that result at once.
    /// The push runs in the caller's task; only the rest of one whose
    /// caller went away runs as a task of its own (`FinishOnDrop`).
    async fn push(
        &self,
        keys: Vec<StreamKey>,
        body: MessageBody,
        exclude: Vec<String>,
        idempotent: bool,
    ) -> Result<Outcome, Status> {
        let this = self.clone();
        let push = async move { this.push_now(keys, body, exclude, idempotent).await };
        FinishOnDrop::new(push.in_current_span(), &self.inner.detached).await
    }

    /// Resolves, then sends one batch per node concurrently.
    async fn push_now(
        &self,
        keys: Vec<StreamKey>,
        body: MessageBody,
        exclude: Vec<String>,
        idempotent: bool,
    ) -> Result<Outcome, Status> {
        let inner = &self.inner;
        let Resolved {
            targets,
            addrs,
            unanswered,
        } = match self
            .resolve_awaiting_first_result(&keys, &body, idempotent)
            .await
        {
            Ok(r) => r,
            Err(s) => {
                inner.metrics.push_failed.inc();
                return Err(s);
            }
        };
        let position = targets.first().map_or((0, 0), |t| (t.epoch, t.seq));
        let Batches {
            per_node,
            first_delivered,
            duplicates,
            resent,
            under_way_ms,
            stored,
            sent,
        } = assemble_batches(targets, &exclude);
        let fresh = sent.len() as u32 - resent;
        // A repeat of a push still under way: what it will deliver is not
        // known yet, and sending it too might deliver it twice.
        let under_way = under_way_ms.map(|ms| {
            format!(
                "a push with message_id {:?} is still under way (began {ms} ms ago) and has \
                 not recorded its result (a retry {} ms after it began, without one, sends \
                 the message again)",
                body.id,
                inner.resend_after.as_millis()
            )
        });
        inner.metrics.fanout_nodes.observe(per_node.len() as f64);
        let nodes = per_node.len();
        let calls = per_node.into_iter().map(|(node, targets)| {
            let pooled = inner.nodes.get(&node, addrs.get(&node).map(String::as_str));
            let message = BatchMessage {
                body: Some(body.clone()),
                targets,
            };
            let timeout = inner.node_timeout;
            async move {
                let Some(pooled) = pooled else {
                    return (node, Err("no address known".to_owned()));
                };
                let start = Instant::now();
                // Bounds the wait behind busy calls too; a message whose
                // push gave up is not sent later.
                let r = tokio::time::timeout(timeout, pooled.sender.call(message))
                    .await
                    .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}")));
                // Through the pool entry's series: a node dropped from the
                // pool meanwhile does not get them back.
                let series = &pooled.series;
                series.duration.observe(start.elapsed().as_secs_f64());
                if r.is_err() {
                    series.errors.inc();
                }
                (node, r)
            }
        });
        let duplicate = fresh == 0 && duplicates > 0;
        let mut outcome = Outcome {
            delivered: 0,
            nodes,
            failed: Vec::new(),
            stored,
            duplicate,
            reached: 0,
            resent,
            position,
        };
        if sent.is_empty() && unanswered.is_none() {
            if let Some(under_way) = under_way {
                inner.metrics.push_failed.inc();
                return Err(Status::aborted(format!(
                    "{under_way}; retry with the same message_id to learn its result"
                )));
            }
            outcome.delivered = first_delivered;
            return Ok(outcome);
        }
        for (node, r) in join_all(calls).await {
            match r {
                Ok(n) => outcome.delivered += n,
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, message_id = %body.id, "batch to connect-node failed");
                    outcome.failed.push((node, e));
                }
            }
        }
        // What this attempt reached, as recorded.
        let reached = outcome.delivered;
        outcome.reached = reached;
        if duplicate {
            outcome.delivered += first_delivered;
        }
        if outcome.success() && unanswered.is_none() && under_way.is_none() {
            inner.metrics.push_success.inc();
        } else {
            inner.metrics.push_failed.inc();
        }
        if idempotent {
            self.record_completion(sent, &body.id, reached, &outcome.failed);
        }
        if let Some(first) = unanswered.as_ref().or(under_way.as_ref()) {
            // The targets of the controllers that answered have it; the
            // others do not. A retry with the same message_id reaches
            // those and is not delivered again to these.
            let code = if unanswered.is_some() {
                Code::Unavailable
            } else {
                Code::Aborted
            };
            let retry = retry_advice(&body.id, idempotent);
            let status = Status::new(
                code,
                format!(
                    "{first}; delivered only to the other targets ({reached} connection(s)); {retry}"
                ),
            );
            return Err(with_message_id(status, &body.id));
        }
        Ok(outcome)
    }
}

/// What a retry of a push that reached only some of its targets does,
/// naming the message id to retry with. A push without the caller's
/// `message_id` had one made up, which the caller learns only here; it
/// recorded no result, so a retry with that id is a plain repeat for the
/// targets whose controllers took the message.
fn retry_advice(id: &str, idempotent: bool) -> String {
    if idempotent {
        format!(
            "retry with the same message_id ({id:?}) to reach the rest (targets already \
             reached are not delivered again)"
        )
    } else {
        format!(
            "the push had no message_id and was given {id:?} (also in the {MESSAGE_ID_KEY} \
             metadata): a retry with message_id {id:?} reaches the targets whose controller \
             had not taken the message and is not delivered again to the targets already \
             reached; having no message_id, this push recorded no result, so the retry does \
             not send it again to the nodes it failed on"
        )
    }
}

/// The metadata entry of a failed push's message id.
pub(crate) const MESSAGE_ID_KEY: &str = "x-message-id";

/// `status` with the push's message id in its metadata ([`MESSAGE_ID_KEY`],
/// or `x-message-id-bin` for an id that is not printable ASCII), for the
/// caller to retry with.
pub(crate) fn with_message_id(mut status: Status, id: &str) -> Status {
    let metadata = status.metadata_mut();
    // Header values may carry other bytes too, but only ASCII reads back.
    match MetadataValue::try_from(id) {
        Ok(v) if id.is_ascii() => {
            metadata.insert(MESSAGE_ID_KEY, v);
        }
        _ => {
            metadata.insert_bin("x-message-id-bin", MetadataValue::from_bytes(id.as_bytes()));
        }
    }
    status
}

/// The message id a failed push's status carries ([`with_message_id`]).
pub(crate) fn message_id_of(status: &Status) -> Option<String> {
    let metadata = status.metadata();
    if let Some(v) = metadata.get(MESSAGE_ID_KEY) {
        return v.to_str().ok().map(str::to_owned);
    }
    let bytes = metadata.get_bin("x-message-id-bin")?.to_bytes().ok()?;
    String::from_utf8(bytes.to_vec()).ok()
}

#[tonic::async_trait]
impl PushManager for PushService {
    async fn push_to_room(
        &self,
        req: Request<PushToRoomRequest>,
    ) -> Result<Response<PushToRoomResponse>, Status> {
        let span = barrage_telemetry::server_span("PushToRoom", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::PushRoom);
        let r = req.into_inner();
        self.observed("PushToRoom", timeout, async {
            allowed?;
            let room = RoomId::new(r.room_id).map_err(|e| invalid("room_id", e))?;
            if r.exclude_user_ids.len() > self.inner.limits.max_exclude_user_ids {
                return Err(invalid(
                    "exclude_user_ids",
                    format!("at most {} users", self.inner.limits.max_exclude_user_ids),
                ));
            }
            for u in &r.exclude_user_ids {
                UserId::new(u.as_str())
                    .map_err(|e| invalid("exclude_user_ids", format!("{u:?}: {e}")))?;
            }
            let idempotent = !r.message_id.is_empty();
            let mut body = self.body(r.content, r.binary_content, r.event, r.message_id)?;
            if !r.sender.is_empty() {
                body.sender = UserId::new(r.sender.as_str())
                    .map_err(|e| invalid("sender", e))?
                    .to_string();
            }
            let id = body.id.clone();
            tracing::Span::current().record("message_id", id.as_str());
            let o = self
                .push(
                    vec![StreamKey::Room(room)],
                    body,
                    r.exclude_user_ids,
                    idempotent,
                )
                .await?;
            Ok(PushToRoomResponse {
                success: o.success(),
                delivered_count: o.delivered,
                message: o.message(),
                message_id: id,
                duplicate: o.duplicate,
                epoch: o.position.0,
                seq: o.position.1,
            })
        })
        .instrument(span)
        .await
    }

    async fn push_to_user(
        &self,
        req: Request<PushToUserRequest>,
    ) -> Result<Response<PushToUserResponse>, Status> {
        let span = barrage_telemetry::server_span("PushToUser", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::PushUser);
        let r = req.into_inner();
        self.observed("PushToUser", timeout, async {
            allowed?;
            let users = target_users(r.user_id, r.user_ids, self.inner.limits.max_user_ids)?;
            let idempotent = !r.message_id.is_empty();
            let body = self.body(r.content, r.binary_content, r.event, r.message_id)?;
            let id = body.id.clone();
            tracing::Span::current().record("message_id", id.as_str());
            let keys = users.into_iter().map(StreamKey::User).collect();
            let o = self.push(keys, body, Vec::new(), idempotent).await?;
            Ok(PushToUserResponse {
                success: o.success(),
                delivered_count: o.delivered,
                message: o.message(),
                message_id: id,
                stored_count: o.stored,
                duplicate: o.duplicate,
            })
        })
        .instrument(span)
        .await
    }

    async fn broadcast(
        &self,
        req: Request<BroadcastRequest>,
    ) -> Result<Response<BroadcastResponse>, Status> {
        let span = barrage_telemetry::server_span("Broadcast", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::Broadcast);
        let r = req.into_inner();
        self.observed("Broadcast", timeout, async {
            allowed?;
            let idempotent = !r.message_id.is_empty();
            let body = self.body(r.content, r.binary_content, r.event, r.message_id)?;
            let id = body.id.clone();
            tracing::Span::current().record("message_id", id.as_str());
            let o = self
                .push(vec![StreamKey::Broadcast], body, Vec::new(), idempotent)
                .await?;
            Ok(BroadcastResponse {
                success: o.success(),
                total_delivered: o.delivered,
                message: o.message(),
                message_id: id,
                node_count: o.nodes as u32,
                duplicate: o.duplicate,
            })
        })
        .instrument(span)
        .await
    }

    async fn get_room_info(
        &self,
        req: Request<GetRoomInfoRequest>,
    ) -> Result<Response<GetRoomInfoResponse>, Status> {
        let span = barrage_telemetry::server_span("GetRoomInfo", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::Admin);
        let r = req.into_inner();
        self.observed("GetRoomInfo", timeout, async {
            allowed?;
            let room = RoomId::new(r.room_id.as_str()).map_err(|e| invalid("room_id", e))?;
            let (id, mut client) = self.owner(&StreamKey::Room(room).to_string())?;
            client
                .get_room_info(self.controller_request(r))
                .await
                .map(Response::into_inner)
                .map_err(|s| controller_error(&id, s))
        })
        .instrument(span)
        .await
    }

    async fn get_user_node(
        &self,
        req: Request<GetUserNodeRequest>,
    ) -> Result<Response<GetUserNodeResponse>, Status> {
        let span = barrage_telemetry::server_span("GetUserNode", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::Admin);
        let r = req.into_inner();
        self.observed("GetUserNode", timeout, async {
            allowed?;
            let user = UserId::new(r.user_id.as_str()).map_err(|e| invalid("user_id", e))?;
            let (id, mut client) = self.owner(&StreamKey::User(user).to_string())?;
            client
                .get_user_node(self.controller_request(r))
                .await
                .map(Response::into_inner)
                .map_err(|s| controller_error(&id, s))
        })
        .instrument(span)
        .await
    }

    async fn close_room(
        &self,
        req: Request<pb::CloseRoomRequest>,
    ) -> Result<Response<pb::CloseRoomResponse>, Status> {
        let span = barrage_telemetry::server_span("CloseRoom", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::Admin);
        let r = req.into_inner();
        self.observed("CloseRoom", timeout, async {
            allowed?;
            let room = RoomId::new(r.room_id.as_str()).map_err(|e| invalid("room_id", e))?;
            let (id, mut controller) = self.owner(&StreamKey::Room(room).to_string())?;
            let info = match controller
                .get_room_info(self.controller_request(GetRoomInfoRequest {
                    room_id: r.room_id.clone(),
                }))
                .await
            {
                Ok(info) => info.into_inner(),
                // Nobody in it: closing is already done.
                Err(s) if s.code() == Code::NotFound => GetRoomInfoResponse::default(),
                Err(s) => return Err(controller_error(&id, s)),
            };
            let calls = info.nodes.iter().map(|n| {
                let client = self.inner.nodes.peek(&n.node_id).map(|n| n.client);
                let mut req = Request::new(pb::CloseRoomRequest {
                    room_id: r.room_id.clone(),
                });
                req.set_timeout(self.inner.node_timeout);
                let node = n.node_id.clone();
                async move {
                    match client {
                        Some(mut c) => c
                            .close_room(req)
                            .await
                            .map(|r| r.into_inner().removed_connections)
                            .map_err(|s| (node, s.message().to_owned())),
                        None => Err((node, "no channel to this node".to_owned())),
                    }
                }
            });
            let (mut removed, mut nodes, mut failed) = (0, 0, Vec::new());
            for r in join_all(calls).await {
                match r {
                    Ok(n) => {
                        removed += n;
                        nodes += u32::from(n > 0);
                    }
                    Err(f) => failed.push(f),
                }
            }
            let message = if failed.is_empty() {
                format!("{removed} connections left the room")
            } else {
                let list: Vec<String> = failed.iter().map(|(n, e)| format!("{n}: {e}")).collect();
                format!(
                    "{removed} connections left the room; nodes not reached: {}",
                    list.join("; ")
                )
            };
            Ok(pb::CloseRoomResponse {
                room_id: r.room_id,
                removed_connections: removed,
                node_count: nodes,
                message,
            })
        })
        .instrument(span)
        .await
    }

    async fn get_status(
        &self,
        req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let span = barrage_telemetry::server_span("GetStatus", req.metadata());
        let timeout = grpc_timeout(req.metadata());
        let allowed = self.authorize(&req, Scope::Admin);
        self.observed("GetStatus", timeout, async {
            allowed?;
            let ids = self.inner.nodes.node_ids();
            let calls = ids.into_iter().map(|node_id| {
                let client = self.inner.nodes.peek(&node_id).map(|n| n.client);
                let mut req = Request::new(pb::StatsRequest {});
                req.set_timeout(self.inner.node_timeout);
                async move {
                    let stats = match client {
                        Some(mut c) => c.stats(req).await.ok().map(Response::into_inner),
                        None => None,
                    };
                    match stats {
                        Some(s) => pb::NodeStatus {
                            node_id,
                            connections: s.connections,
                            users: s.users,
                            rooms: s.rooms,
                            reachable: true,
                        },
                        None => pb::NodeStatus {
                            node_id,
                            reachable: false,
                            ..Default::default()
                        },
                    }
                }
            });
            let nodes = join_all(calls).await;
            Ok(pb::GetStatusResponse {
                controllers: self.inner.controllers.len() as u32,
                connections: nodes.iter().map(|n| u64::from(n.connections)).sum(),
                nodes,
            })
        })
        .instrument(span)
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn grpc_timeout_reads_valid_deadlines_and_ignores_the_rest() {
        let read = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().expect("ascii"));
            grpc_timeout(&m)
        };
        assert_eq!(read("300m"), Some(Duration::from_millis(300)));
        assert_eq!(read("2S"), Some(Duration::from_secs(2)));
        assert_eq!(
            read("99999999H"),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
        assert_eq!(read("7u"), Some(Duration::from_micros(7)));
        for bad in ["", "S", "m5", "123456789S", "5x", "+5S", "-1S", " 5S"] {
            assert_eq!(read(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), None);
    }

    #[test]
    fn target_users_keeps_first_order_without_repeats() {
        let users = target_users("b".into(), ids(&["a", "b", "c", "a", "c", "d"]), 10).unwrap();
        let names: Vec<&str> = users.iter().map(UserId::as_str).collect();
        assert_eq!(names, ["b", "a", "c", "d"]);
    }

    #[test]
    fn target_users_refuses_empty_oversized_and_invalid() {
        let e = target_users(String::new(), Vec::new(), 10).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message().starts_with("user_id: must not be empty"),
            "{}",
            e.message()
        );

        let e = target_users(String::new(), ids(&["a", "b", "c"]), 2).unwrap_err();
        assert_eq!(e.message(), "user_ids: at most 2 users per push, got 3");

        let e = target_users(String::new(), ids(&["ok", ""]), 10).unwrap_err();
        assert!(
            e.message().starts_with("user_ids: \"\": "),
            "{}",
            e.message()
        );
    }

    #[test]
    fn target_users_drops_repeats_in_long_lists_too() {
        let mut long: Vec<String> = (0..40).map(|i| format!("u{}", i % 25)).collect();
        long.push("first".into());
        let users = target_users("first".into(), long, 1000).unwrap();
        let names: Vec<&str> = users.iter().map(UserId::as_str).collect();
        let want: Vec<String> = std::iter::once("first".to_owned())
            .chain((0..25).map(|i| format!("u{i}")))
            .collect();
        assert_eq!(names, want);
    }

    #[test]
    fn target_users_handles_a_full_batch_of_distinct_ids() {
        let many: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let users = target_users(String::new(), many.clone(), 1000).unwrap();
        assert_eq!(users.len(), 1000);
        assert!(users.iter().zip(&many).all(|(u, m)| u.as_str() == m));
    }

    /// Repeats stay out of the batches unless the controller says to send
    /// them again; then they go at once (no predecessor) to the nodes it
    /// names, and count as sent for the result record.
    #[test]
    fn repeats_are_batched_only_where_they_are_sent_again() {
        let target = |key: &str, nodes: &[&str]| pb::ResolvedTarget {
            key: key.into(),
            epoch: 9,
            seq: 4,
            node_ids: nodes.iter().map(|n| n.to_string()).collect(),
            prev_seqs: vec![3; nodes.len()],
            ..Default::default()
        };
        let fresh = target("user:a", &["n1"]);
        let plain = pb::ResolvedTarget {
            duplicate: true,
            first_completed: true,
            first_delivered: 5,
            ..target("user:b", &[])
        };
        let under_way = pb::ResolvedTarget {
            duplicate: true,
            under_way: true,
            first_age_ms: 120,
            ..target("user:c", &[])
        };
        let again = pb::ResolvedTarget {
            duplicate: true,
            resend: true,
            attempt: 2,
            prev_seqs: Vec::new(),
            ..target("user:d", &["n2"])
        };
        let b = assemble_batches(vec![fresh, plain, under_way, again], &[]);
        assert_eq!((b.duplicates, b.resent, b.first_delivered), (3, 1, 5));
        assert_eq!(b.under_way_ms, Some(120));
        assert_eq!(
            b.sent,
            [
                Sent {
                    key: "user:a".into(),
                    nodes: vec!["n1".into()],
                    attempt: 0,
                    position: (9, 4)
                },
                Sent {
                    key: "user:d".into(),
                    nodes: vec!["n2".into()],
                    attempt: 2,
                    position: (9, 4)
                }
            ]
        );
        let nodes: Vec<_> = b.per_node.keys().cloned().collect();
        assert_eq!(nodes, ["n1", "n2"]);
        assert_eq!(b.per_node["n1"][0].prev_seq, 3);
        let resent = &b.per_node["n2"][0];
        assert_eq!(
            (
                resent.stream.as_str(),
                resent.epoch,
                resent.seq,
                resent.prev_seq
            ),
            ("user:d", 9, 4, 0)
        );
    }
}
