//! The `barrage.v1.Controller` gRPC service over the shared [`Membership`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use barrage_proto::v1::{
    self as pb, CompleteBatchRequest, CompleteRequest, CompleteResponse, GetRoomInfoRequest,
    GetRoomInfoResponse, GetUserNodeRequest, GetUserNodeResponse, HistoryRequest, HistoryResponse,
    MessageBody, ReportRequest, ReportResponse, ResolveBatchRequest, ResolveBatchResponse,
    ResolveRequest, ResolveResponse, SyncRequest, SyncResponse, controller_server::Controller,
    session_change::Kind,
};
use barrage_protocol::{RoomId, StreamKey, UserId};
use parking_lot::Mutex;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::state::{ControllerState, ReportOutcome};

/// Members listed by GetRoomInfo at most.
const MAX_LISTED_MEMBERS: usize = 1000;

/// gRPC front of the controller state.
#[derive(Clone)]
pub struct ControllerService {
    state: Arc<Mutex<ControllerState>>,
    metrics: Metrics,
}

impl ControllerService {
    /// Serves `state`, counting into `metrics`.
    pub fn new(state: Arc<Mutex<ControllerState>>, metrics: Metrics) -> Self {
        ControllerService { state, metrics }
    }

    /// UNAVAILABLE (and counted) unless this controller's membership is
    /// settled and it owns every one of `keys`: until then what it knows of
    /// them may be incomplete. `outcome` tells the caller what became of
    /// its request, before "retry shortly".
    fn check_serving(
        &self,
        s: &mut ControllerState,
        keys: impl IntoIterator<Item = String>,
        now: tokio::time::Instant,
        outcome: &str,
    ) -> Result<(), Status> {
        if !s.ownership.is_ready(now) {
            self.metrics.refused.with_label_values(&["settling"]).inc();
            return Err(Status::unavailable(format!(
                "controller membership is changing and connect-nodes are re-syncing; {outcome}retry shortly"
            )));
        }
        if let Some(key) = keys.into_iter().find(|k| !s.ownership.owns(k)) {
            self.metrics.refused.with_label_values(&["not_owner"]).inc();
            return Err(Status::unavailable(format!(
                "{key} is owned by another controller (membership changing); {outcome}retry shortly"
            )));
        }
        Ok(())
    }

    /// Who holds `key`, if this controller may answer for it (see
    /// `check_serving`): an empty answer otherwise would say a room or
    /// user has no connection when it may have some.
    fn owned_info(&self, key: &str) -> Result<crate::state::KeyInfo, Status> {
        let mut s = self.state.lock();
        self.check_serving(&mut s, [key.to_owned()], tokio::time::Instant::now(), "")?;
        Ok(s.members.info(key))
    }

    /// Appends one message to each target's stream and says which nodes
    /// host the targets.
    fn resolve_one(&self, r: ResolveRequest) -> Result<ResolveResponse, Status> {
        let mut keys = Vec::with_capacity(r.targets.len());
        for t in &r.targets {
            let key: StreamKey = t.key.parse().map_err(|e| invalid("targets.key", e))?;
            keys.push(key);
        }
        // A push that records its result (it carries the caller's id) may
        // be sent again; one with a made-up id is never repeated while
        // under way.
        let resend_after =
            (r.resend_after_ms > 0).then(|| Duration::from_millis(r.resend_after_ms));
        let tracked = resend_after.is_some();
        let body = r.body.unwrap_or_else(|| MessageBody {
            id: r.message_id.clone(),
            ..Default::default()
        });
        let mut out = ResolveResponse::default();
        let now = tokio::time::Instant::now();
        let mut s = self.state.lock();
        self.check_serving(
            &mut s,
            keys.iter().map(ToString::to_string),
            now,
            "nothing was delivered, ",
        )?;
        for key in keys {
            let kind = match key {
                StreamKey::Room(_) => "room",
                StreamKey::User(_) => "user",
                StreamKey::Broadcast => "broadcast",
            };
            self.metrics.resolves.with_label_values(&[kind]).inc();
            let key = key.to_string();
            let node_ids = s.members.nodes_for(&key);
            // A user with no connection keeps the message for the next
            // connect, if user streams keep any history.
            let stored =
                kind == "user" && node_ids.is_empty() && s.streams.config().user.max_messages > 0;
            let appended = s.streams.append_with(&key, &body, stored, tracked, now);
            let mut target = pb::ResolvedTarget {
                epoch: appended.epoch,
                seq: appended.seq,
                duplicate: appended.duplicate,
                ..Default::default()
            };
            if appended.duplicate {
                if !r.again {
                    self.metrics.duplicates.inc();
                }
                let repeat = s
                    .streams
                    .repeat(&key, &body.id, node_ids, resend_after, now);
                target.attempt = repeat.attempt;
                target.first_delivered = repeat.delivered;
                target.first_completed = repeat.recorded;
                target.under_way = repeat.under_way.is_some();
                target.first_age_ms = repeat.under_way.map_or(0, |a| a.as_millis() as u64);
                target.resend = !repeat.resend.is_empty();
                target.node_ids = repeat.resend;
                if target.resend {
                    self.metrics.resends.inc();
                }
            } else {
                let st = &mut *s;
                target.prev_seqs = st.streams.route(
                    &key,
                    appended.seq,
                    &node_ids,
                    |n| st.members.incarnation_of(n),
                    now,
                );
                target.node_ids = node_ids;
                target.stored = stored;
            }
            for n in &target.node_ids {
                if let Some(addr) = s.members.node_addr(n) {
                    out.node_addrs.insert(n.clone(), addr.to_owned());
                }
            }
            target.key = key;
            out.targets.push(target);
        }
        self.metrics.observe(&s);
        Ok(out)
    }
}

/// The position a record names, if it names one (older push-managers do
/// not).
fn position(r: &CompleteRequest) -> Option<(u64, u64)> {
    (r.epoch != 0).then_some((r.epoch, r.seq))
}

fn invalid(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn report(
        &self,
        req: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let r = req.into_inner();
        let (outcome, awaits_sync) = {
            let mut s = self.state.lock();
            let o = s.members.report(
                &r.node_id,
                &r.incarnation,
                r.seq,
                &r.changes,
                Instant::now(),
            );
            // Receipts are facts about streams, not membership: they hold
            // whatever became of the report's numbering, also from a node
            // that is leaving.
            for c in r.changes.iter().filter(|c| c.kind() == Kind::Received) {
                s.streams.received(&c.key, c.epoch, c.seq);
                self.metrics.offline_receipts.inc();
            }
            // A node whose full state this controller is still waiting for
            // (its sync was discarded by a ring change) is asked for it now,
            // instead of pushes being refused until the warm-up ends.
            let awaits = s
                .ownership
                .awaits_sync(&r.node_id, tokio::time::Instant::now());
            self.metrics.observe(&s);
            (o, awaits)
        };
        let label = match outcome {
            ReportOutcome::Applied => "applied",
            ReportOutcome::Duplicate => "duplicate",
            ReportOutcome::ResyncRequired => "resync",
            ReportOutcome::Dropped => "dropped",
            ReportOutcome::Departed => "departed",
        };
        self.metrics.reports.with_label_values(&[label]).inc();
        let dropped = matches!(outcome, ReportOutcome::Dropped | ReportOutcome::Departed);
        let resync_required = matches!(
            outcome,
            ReportOutcome::ResyncRequired | ReportOutcome::Dropped
        ) || (awaits_sync && outcome != ReportOutcome::Departed);
        match outcome {
            ReportOutcome::ResyncRequired => {
                tracing::debug!(node_id = %r.node_id, seq = r.seq, "asking connect-node for a full sync");
            }
            ReportOutcome::Dropped => {
                tracing::info!(node_id = %r.node_id, "connect-node is back after its sessions were dropped; telling it to resync and have its clients recover");
            }
            _ => {}
        }
        Ok(Response::new(ReportResponse {
            resync_required,
            dropped,
        }))
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        let r = req.into_inner();
        let accepted = {
            let mut s = self.state.lock();
            // A node that has not been told that its sessions were dropped
            // is told first (its clients must recover): a full sync would
            // otherwise take it back silently.
            let untold = r.handles_dropped
                && !r.knows_dropped
                && s.members.was_dropped(&r.node_id, &r.incarnation);
            let accepted = !untold
                && s.members.sync(
                    &r.node_id,
                    &r.incarnation,
                    &r.grpc_addr,
                    r.seq,
                    r.full,
                    &r.keys,
                    Instant::now(),
                );
            if accepted && r.full {
                s.ownership.synced(&r.node_id, r.ring_id);
            }
            self.metrics.observe(&s);
            accepted
        };
        if !accepted {
            tracing::debug!(node_id = %r.node_id, "ignored a sync from a node that left discovery or was not told it was dropped");
            return Ok(Response::new(SyncResponse { dropped: true }));
        }
        let kind = if r.full { "full" } else { "partial" };
        self.metrics.syncs.with_label_values(&[kind]).inc();
        tracing::debug!(node_id = %r.node_id, keys = r.keys.len(), kind, "sync applied");
        Ok(Response::new(SyncResponse { dropped: false }))
    }

    async fn resolve(
        &self,
        req: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let span = barrage_telemetry::server_span("Resolve", req.metadata());
        let _entered = span.enter();
        self.resolve_one(req.into_inner()).map(Response::new)
    }

    async fn resolve_batch(
        &self,
        req: Request<ResolveBatchRequest>,
    ) -> Result<Response<ResolveBatchResponse>, Status> {
        let span = barrage_telemetry::server_span("ResolveBatch", req.metadata());
        let _entered = span.enter();
        let results = req
            .into_inner()
            .requests
            .into_iter()
            .map(|r| pb::ResolveResult {
                outcome: Some(match self.resolve_one(r) {
                    Ok(resolved) => pb::resolve_result::Outcome::Resolved(resolved),
                    Err(s) => pb::resolve_result::Outcome::Error(pb::CallError {
                        code: s.code() as i32,
                        message: s.message().to_owned(),
                    }),
                }),
            })
            .collect();
        Ok(Response::new(ResolveBatchResponse { results }))
    }

    async fn complete(
        &self,
        req: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let r = req.into_inner();
        self.state.lock().streams.complete(
            &r.key,
            &r.message_id,
            position(&r),
            r.attempt,
            r.delivered,
            r.failed_node_ids,
        );
        Ok(Response::new(CompleteResponse {}))
    }

    async fn complete_batch(
        &self,
        req: Request<CompleteBatchRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let r = req.into_inner();
        let mut state = self.state.lock();
        for c in r.completions {
            state.streams.complete(
                &c.key,
                &c.message_id,
                position(&c),
                c.attempt,
                c.delivered,
                c.failed_node_ids,
            );
        }
        Ok(Response::new(CompleteResponse {}))
    }

    async fn history(
        &self,
        req: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let span = barrage_telemetry::server_span("History", req.metadata());
        let _entered = span.enter();
        let r = req.into_inner();
        for q in &r.queries {
            q.key
                .parse::<StreamKey>()
                .map_err(|e| invalid("queries.key", e))?;
        }
        let now = tokio::time::Instant::now();
        let answers = self
            .state
            .lock()
            .streams
            .answer(&r.queries, r.receipts, now);
        let mut results = Vec::with_capacity(answers.len());
        for (q, a) in r.queries.iter().zip(answers) {
            if a.left_out {
                tracing::warn!(
                    key = %q.key,
                    "missed messages exceed what one history answer carries; {}",
                    if q.has_position {
                        "the stream is answered not recovered"
                    } else {
                        "the rest of the offline messages wait for the next connect"
                    }
                );
            }
            let outcome = match (q.has_position, a.result.recovered) {
                _ if a.result.deferred => None,
                (false, _) => Some("fresh"),
                (true, _) if a.left_out => Some("too_large"),
                (true, true) => Some("recovered"),
                (true, false) => Some("not_recovered"),
            };
            if let Some(outcome) = outcome {
                self.metrics.recoveries.with_label_values(&[outcome]).inc();
            }
            results.push(a.result);
        }
        Ok(Response::new(HistoryResponse { results }))
    }

    async fn get_room_info(
        &self,
        req: Request<GetRoomInfoRequest>,
    ) -> Result<Response<GetRoomInfoResponse>, Status> {
        let room = RoomId::new(req.into_inner().room_id).map_err(|e| invalid("room_id", e))?;
        let info = self.owned_info(&StreamKey::Room(room.clone()).to_string())?;
        if info.connections == 0 {
            return Err(Status::not_found(format!("room {room} has no members")));
        }
        Ok(Response::new(GetRoomInfoResponse {
            room_id: room.to_string(),
            member_count: info.users.len() as u32,
            connection_count: info.connections,
            nodes: info
                .nodes
                .into_iter()
                .map(|(node_id, (members, conns))| pb::NodeMembers {
                    node_id,
                    member_count: members,
                    connection_count: conns,
                })
                .collect(),
            members: info.users.into_iter().take(MAX_LISTED_MEMBERS).collect(),
        }))
    }

    async fn get_user_node(
        &self,
        req: Request<GetUserNodeRequest>,
    ) -> Result<Response<GetUserNodeResponse>, Status> {
        let user = UserId::new(req.into_inner().user_id).map_err(|e| invalid("user_id", e))?;
        let info = self.owned_info(&StreamKey::User(user.clone()).to_string())?;
        if info.connections == 0 {
            return Err(Status::not_found(format!("user {user} has no connection")));
        }
        Ok(Response::new(GetUserNodeResponse {
            user_id: user.to_string(),
            online: info.connections > 0,
            connection_count: info.connections,
            nodes: info
                .nodes
                .into_iter()
                .map(|(node_id, (_, conns))| pb::UserConnections {
                    node_id,
                    connection_count: conns,
                })
                .collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::Ownership;
    use crate::state::Membership;
    use crate::streams::{StreamConfig, Streams};

    fn service(ownership: Ownership) -> ControllerService {
        service_with(ownership, StreamConfig::default())
    }

    fn service_with(ownership: Ownership, streams: StreamConfig) -> ControllerService {
        let state = ControllerState {
            members: Membership::new(),
            streams: Streams::new(streams),
            ownership,
        };
        let metrics = Metrics::new(&prometheus::Registry::new()).expect("metrics");
        ControllerService::new(Arc::new(Mutex::new(state)), metrics)
    }

    /// A node dropped while it ran whose first call afterwards is a full
    /// sync (its ring changed meanwhile) is told before its state is taken
    /// back, so that its clients recover; older nodes, which cannot act on
    /// it, are answered as before.
    #[tokio::test(start_paused = true)]
    async fn a_full_sync_from_a_node_not_told_it_was_dropped_is_refused_once() {
        let svc = service(Ownership::standalone("c1"));
        let sync = |knows: bool, handles: bool| {
            Request::new(SyncRequest {
                node_id: "n1".into(),
                incarnation: "i1".into(),
                full: true,
                handles_dropped: handles,
                knows_dropped: knows,
                keys: vec![pb::KeyState {
                    key: "room:r".into(),
                    users: [("u".to_string(), 1)].into(),
                }],
                ..Default::default()
            })
        };
        let answer = |knows, handles| {
            let r = sync(knows, handles);
            let svc = &svc;
            async move { svc.sync(r).await.expect("answered").into_inner().dropped }
        };
        assert!(!answer(false, true).await, "first contact");
        let later = Instant::now() + std::time::Duration::from_secs(60);
        svc.state
            .lock()
            .members
            .expire(later, std::time::Duration::from_secs(10));
        assert!(answer(false, true).await, "not told yet: refused");
        assert!(svc.state.lock().members.nodes_for("room:r").is_empty());
        assert!(!answer(true, true).await, "told: taken back");
        assert_eq!(svc.state.lock().members.nodes_for("room:r"), vec!["n1"]);
        // An older node never says it knows: answered as before.
        svc.state.lock().members.expire(
            later + std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(10),
        );
        assert!(!answer(false, false).await);
        assert_eq!(svc.state.lock().members.nodes_for("room:r"), vec!["n1"]);
    }

    /// With no user history kept, a push to an offline user is not
    /// reported as stored: nothing would deliver it on the next connect.
    #[tokio::test(start_paused = true)]
    async fn offline_users_are_stored_only_where_user_history_is_kept() {
        for (kept, stored) in [(100, true), (0, false)] {
            let svc = service_with(
                Ownership::standalone("c1"),
                StreamConfig {
                    user: crate::streams::Retention {
                        max_messages: kept,
                        ttl: std::time::Duration::from_secs(60),
                    },
                    ..StreamConfig::default()
                },
            );
            let r = svc
                .resolve(Request::new(ResolveRequest {
                    targets: vec![pb::ResolveTarget {
                        key: "user:away".into(),
                    }],
                    message_id: "m1".into(),
                    body: None,
                    ..Default::default()
                }))
                .await
                .expect("resolved")
                .into_inner();
            assert_eq!(r.targets[0].stored, stored, "USER_HISTORY_SIZE={kept}");
        }
    }

    /// While its membership is settling a controller cannot say that a room
    /// or a user has no connection: it says UNAVAILABLE, as for pushes, not
    /// NOT_FOUND (which a push-manager's CloseRoom reads as "nobody there").
    #[tokio::test(start_paused = true)]
    async fn admin_lookups_are_unavailable_while_membership_settles() {
        // A live connect-node that has not re-sent its state yet.
        let mut ownership = Ownership::on_ring("c1", std::time::Duration::from_secs(60));
        ownership.set_alive(["n1".to_owned()].into());
        let settling = service(ownership);
        let room = settling
            .get_room_info(Request::new(GetRoomInfoRequest {
                room_id: "r".into(),
            }))
            .await
            .expect_err("settling");
        assert_eq!(room.code(), tonic::Code::Unavailable, "{room:?}");
        let user = settling
            .get_user_node(Request::new(GetUserNodeRequest {
                user_id: "u".into(),
            }))
            .await
            .expect_err("settling");
        assert_eq!(user.code(), tonic::Code::Unavailable, "{user:?}");
        // Settled, an empty room is NOT_FOUND.
        let ready = service(Ownership::standalone("c1"));
        let room = ready
            .get_room_info(Request::new(GetRoomInfoRequest {
                room_id: "r".into(),
            }))
            .await
            .expect_err("no members");
        assert_eq!(room.code(), tonic::Code::NotFound, "{room:?}");
    }

    /// A repeated message id is sent again where its first attempt is not
    /// known to have arrived: to the nodes it failed on, or to every node
    /// hosting the key once it has recorded no result for
    /// `resend_after_ms`; a completed attempt is never sent again.
    #[tokio::test(start_paused = true)]
    async fn repeats_are_sent_again_where_the_first_attempt_did_not_arrive() {
        let svc = service(Ownership::standalone("c1"));
        {
            let mut s = svc.state.lock();
            for node in ["n1", "n2"] {
                let keys = [pb::KeyState {
                    key: "room:r".into(),
                    users: [("u".to_owned(), 1)].into(),
                }];
                s.members.sync(
                    node,
                    "i1",
                    &format!("{node}:1"),
                    0,
                    true,
                    &keys,
                    Instant::now(),
                );
            }
        }
        let resolve = |id: &str, resend_after_ms: u64| {
            let svc = svc.clone();
            let id = id.to_owned();
            async move {
                let r = svc
                    .resolve(Request::new(ResolveRequest {
                        targets: vec![pb::ResolveTarget {
                            key: "room:r".into(),
                        }],
                        message_id: id,
                        body: None,
                        resend_after_ms,
                        again: false,
                    }))
                    .await
                    .expect("resolved")
                    .into_inner();
                r.targets.into_iter().next().expect("one target")
            }
        };
        let first = resolve("lost", 1000).await;
        assert!(!first.duplicate && first.node_ids.len() == 2, "{first:?}");
        // No result recorded: under way, not sent again yet.
        tokio::time::advance(Duration::from_millis(400)).await;
        let early = resolve("lost", 1000).await;
        assert!(
            early.duplicate && early.under_way && !early.resend,
            "{early:?}"
        );
        assert!(
            early.node_ids.is_empty() && !early.first_completed,
            "{early:?}"
        );
        assert_eq!((early.first_age_ms, early.attempt), (400, 0));
        // A caller that never sends again is answered as before.
        tokio::time::advance(Duration::from_millis(700)).await;
        assert!(!resolve("lost", 0).await.resend);
        // Long enough: sent again to every hosting node, at the first
        // attempt's position; the resend is now the attempt awaited.
        let due = resolve("lost", 1000).await;
        assert!(due.duplicate && due.resend && !due.under_way, "{due:?}");
        assert_eq!(due.attempt, 1);
        assert_eq!(due.node_ids, ["n1", "n2"]);
        assert_eq!((due.epoch, due.seq), (first.epoch, first.seq));
        assert!(due.prev_seqs.is_empty(), "{due:?}");
        assert!(resolve("lost", 1000).await.under_way, "awaiting the resend");
        // The resend recorded, with a failed node: sent again there only.
        svc.complete_batch(Request::new(CompleteBatchRequest {
            completions: vec![CompleteRequest {
                key: "room:r".into(),
                message_id: "lost".into(),
                delivered: 1,
                failed_node_ids: vec!["n2".into()],
                attempt: 1,
                epoch: first.epoch,
                seq: first.seq,
            }],
        }))
        .await
        .expect("recorded");
        let partial = resolve("lost", 1000).await;
        assert!(partial.resend && partial.attempt == 2, "{partial:?}");
        assert_eq!(
            (partial.node_ids, partial.first_delivered),
            (vec!["n2".to_owned()], 1)
        );
        // Recorded in full: a plain repeat.
        svc.complete(Request::new(CompleteRequest {
            key: "room:r".into(),
            message_id: "lost".into(),
            delivered: 2,
            failed_node_ids: Vec::new(),
            attempt: 2,
            ..Default::default()
        }))
        .await
        .expect("recorded");
        tokio::time::advance(Duration::from_secs(5)).await;
        let done = resolve("lost", 1000).await;
        assert!(
            done.duplicate && !done.resend && done.node_ids.is_empty(),
            "{done:?}"
        );
        assert!(done.first_completed && !done.under_way, "{done:?}");
        assert_eq!(done.first_delivered, 3);
        assert_eq!(svc.metrics.resends.get(), 2);
    }
}
