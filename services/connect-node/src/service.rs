//! The `barrage.v1.ConnectNode` gRPC service: local delivery of pushed
//! messages and node statistics.

use std::sync::Arc;

use barrage_proto::v1::{
    CloseRoomRequest, CloseRoomResponse, MessageResult, PushMessageBatchRequest,
    PushMessageBatchResponse, StatsRequest, StatsResponse, connect_node_server::ConnectNode,
};
use barrage_protocol::StreamKey;
use tonic::{Request, Response, Status};

use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::sequencer::{Ready, Sequencer};

/// gRPC front of the hub.
#[derive(Clone)]
pub struct ConnectNodeService {
    node_id: String,
    hub: Arc<Hub>,
    metrics: Metrics,
    sequencer: Arc<Sequencer>,
}

impl ConnectNodeService {
    /// Serves deliveries into `hub`.
    pub fn new(
        node_id: String,
        hub: Arc<Hub>,
        metrics: Metrics,
        sequencer: Arc<Sequencer>,
    ) -> Self {
        ConnectNodeService {
            node_id,
            hub,
            metrics,
            sequencer,
        }
    }
}

#[tonic::async_trait]
impl ConnectNode for ConnectNodeService {
    async fn push_message_batch(
        &self,
        req: Request<PushMessageBatchRequest>,
    ) -> Result<Response<PushMessageBatchResponse>, Status> {
        let span = barrage_telemetry::server_span("PushMessageBatch", req.metadata());
        let _entered = span.enter();
        let req = req.into_inner();
        self.metrics.push_batches.inc();
        // Validate the whole batch before delivering any of it.
        let mut plans = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            let body = m.body.as_ref().ok_or_else(|| {
                Status::invalid_argument(format!("messages[{i}].body is required"))
            })?;
            let mut targets = Vec::with_capacity(m.targets.len());
            for (j, t) in m.targets.iter().enumerate() {
                let key: StreamKey = t.stream.parse().map_err(|e| {
                    Status::invalid_argument(format!("messages[{i}].targets[{j}].stream: {e}"))
                })?;
                targets.push((key, t));
            }
            plans.push((body, targets));
        }
        let mut results = Vec::with_capacity(plans.len());
        let mut backlog = self
            .hub
            .backlog(plans.iter().map(|(_, targets)| targets.len()).sum());
        for (body, targets) in plans {
            let mut result = MessageResult {
                message_id: body.id.clone(),
                ..MessageResult::default()
            };
            for (key, t) in targets {
                // Encoded once per target stream; every recipient shares it.
                let frame = self.hub.message_of(&t.stream, t.epoch, t.seq, body);
                let ready = Ready {
                    key,
                    seq: t.seq,
                    frame,
                    exclude: t.exclude_user_ids.clone(),
                };
                // In stream order: a message whose predecessor has not
                // arrived yet waits for it (briefly).
                result.delivered += self
                    .sequencer
                    .deliver_in_order(&self.hub, &t.stream, t.epoch, t.prev_seq, ready);
                backlog.done_one();
            }
            results.push(result);
        }
        Ok(Response::new(PushMessageBatchResponse { results }))
    }

    async fn close_room(
        &self,
        req: Request<CloseRoomRequest>,
    ) -> Result<Response<CloseRoomResponse>, Status> {
        let r = req.into_inner();
        let room = barrage_protocol::RoomId::new(r.room_id.as_str())
            .map_err(|e| Status::invalid_argument(format!("room_id: {e}")))?;
        let removed = self.hub.close_room(&room);
        Ok(Response::new(CloseRoomResponse {
            room_id: r.room_id,
            removed_connections: removed as u32,
            node_count: u32::from(removed > 0),
            message: String::new(),
        }))
    }

    async fn stats(&self, _req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let s = self.hub.stats();
        Ok(Response::new(StatsResponse {
            node_id: self.node_id.clone(),
            connections: s.connections as u32,
            users: s.users as u32,
            rooms: s.rooms as u32,
        }))
    }
}
