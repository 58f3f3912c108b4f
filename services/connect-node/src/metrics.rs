//! Connect-node metrics, registered on the registry the role is given.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The connect-node's Prometheus metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// Rooms with at least one local member.
    pub rooms: IntGauge,
    /// Connections accepted.
    pub connects: IntCounter,
    /// Connections closed, by close code.
    pub disconnects: IntCounterVec,
    /// Upgrade requests refused before the WebSocket opened, by reason.
    pub rejected: IntCounterVec,
    /// Message frames queued to connections.
    pub frames_delivered: IntCounter,
    /// Bytes of message frames queued to connections.
    pub bytes_delivered: IntCounter,
    /// Of `frames_delivered`, those the fan-out wrote to the socket itself.
    pub frames_written_direct: IntCounter,
    /// Connections closed because their send queue was full.
    pub slow_consumers: IntCounter,
    /// PushMessageBatch calls served.
    pub push_batches: IntCounter,
    /// Failed report or sync calls to controllers.
    pub report_failures: IntCounter,
    /// Times a controller said it had dropped this node's sessions, so that
    /// its connections were closed to recover (4101).
    pub dropped_by_controller: IntCounter,
    /// Client frames refused with an `error` frame, by code.
    pub frame_errors: IntCounterVec,
    /// Missed messages sent to reconnecting clients (and offline users).
    pub recovered_messages: IntCounter,
    /// Gaps in a stream's delivery order on this node (a batch that never
    /// came), by whether the history filled them.
    pub order_gaps: IntCounterVec,
    /// Messages delivered from the history to fill such gaps.
    pub gap_filled_messages: IntCounter,
    /// Time for a session report to be applied by its controller (report lag).
    pub report_duration: prometheus::Histogram,
    /// Connecting clients whose history one `History` call asked for.
    pub history_call_clients: prometheus::Histogram,
    /// TLS certificate reloads, by result (`ok`, `error`).
    pub tls_reloads: IntCounterVec,
    /// Client publishes by pipeline stage and outcome.
    pub publish: IntCounterVec,
    /// `batch` frames sent.
    pub batch_frames: IntCounter,
    /// Messages sent inside `batch` frames.
    pub batched_messages: IntCounter,
    /// Batch frames taken from another connection that gathered the same
    /// messages instead of being built again.
    pub batch_frames_shared: IntCounter,
}

impl Metrics {
    /// Counts a connection closed with `code`.
    pub(crate) fn count_disconnect(&self, code: barrage_protocol::CloseCode) {
        self.disconnects
            .with_label_values(&[&code.code().to_string()])
            .inc();
    }

    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            connections: IntGauge::new(
                "connect_node_connections",
                "Open client connections (WebSockets, event streams and long polls held open)",
            )?,
            rooms: IntGauge::new("connect_node_rooms", "Rooms with at least one local member")?,
            connects: IntCounter::new(
                "connect_node_connects_total",
                "Client connections accepted (WebSockets, event streams and long polls)",
            )?,
            disconnects: IntCounterVec::new(
                Opts::new(
                    "connect_node_disconnects_total",
                    "WebSocket connections closed by close code",
                ),
                &["code"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "connect_node_rejected_total",
                    "Upgrade requests refused by reason",
                ),
                &["reason"],
            )?,
            frames_delivered: IntCounter::new(
                "connect_node_frames_delivered_total",
                "Message frames queued to connections",
            )?,
            bytes_delivered: IntCounter::new(
                "connect_node_bytes_delivered_total",
                "Bytes of message frames queued to connections",
            )?,
            frames_written_direct: IntCounter::new(
                "connect_node_frames_written_direct_total",
                "Message frames the fan-out wrote to an idle connection's socket itself, without its task",
            )?,
            slow_consumers: IntCounter::new(
                "connect_node_slow_consumers_total",
                "Connections closed because their send queue was full",
            )?,
            push_batches: IntCounter::new(
                "connect_node_push_batches_total",
                "PushMessageBatch calls served",
            )?,
            report_failures: IntCounter::new(
                "connect_node_report_failures_total",
                "Failed report or sync calls to controllers",
            )?,
            dropped_by_controller: IntCounter::new(
                "connect_node_dropped_by_controller_total",
                "Times a controller had dropped this node's sessions (it left discovery or went silent), once per controller and episode; the connections open then are closed with 4101 to recover",
            )?,
            frame_errors: IntCounterVec::new(
                Opts::new(
                    "connect_node_frame_errors_total",
                    "Client frames refused by error code",
                ),
                &["code"],
            )?,
            recovered_messages: IntCounter::new(
                "connect_node_recovered_messages_total",
                "Missed messages sent to reconnecting clients and offline users",
            )?,
            order_gaps: IntCounterVec::new(
                Opts::new(
                    "connect_node_order_gaps_total",
                    "Messages that waited for a predecessor that never came, by outcome: filled (the missing messages were delivered from the history first) or released (the history no longer held them or did not answer: the clients' positions pass a gap)",
                ),
                &["outcome"],
            )?,
            gap_filled_messages: IntCounter::new(
                "connect_node_gap_filled_messages_total",
                "Messages delivered from the history to fill gaps in a stream's delivery order",
            )?,
            report_duration: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "connect_node_report_duration_seconds",
                    "Time for a session report or sync to be applied by its controller",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
                ]),
            )?,
            history_call_clients: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "connect_node_history_call_clients",
                    "Connecting clients whose history one History call to a controller asked for",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )?,
            tls_reloads: IntCounterVec::new(
                Opts::new(
                    "connect_node_tls_reloads_total",
                    "TLS certificate reloads by result",
                ),
                &["result"],
            )?,
            publish: IntCounterVec::new(
                Opts::new(
                    "connect_node_publish_total",
                    "Client publishes by pipeline stage and outcome",
                ),
                &["stage", "outcome"],
            )?,
            batch_frames: IntCounter::new(
                "connect_node_batch_frames_total",
                "Batch frames sent (several messages in one frame)",
            )?,
            batched_messages: IntCounter::new(
                "connect_node_batched_messages_total",
                "Messages sent inside batch frames",
            )?,
            batch_frames_shared: IntCounter::new(
                "connect_node_batch_frames_shared_total",
                "Batch frames shared with another connection that gathered the same messages (built once)",
            )?,
        };
        registry.register(Box::new(m.publish.clone()))?;
        registry.register(Box::new(m.batch_frames.clone()))?;
        registry.register(Box::new(m.batched_messages.clone()))?;
        registry.register(Box::new(m.batch_frames_shared.clone()))?;
        registry.register(Box::new(m.report_duration.clone()))?;
        registry.register(Box::new(m.history_call_clients.clone()))?;
        registry.register(Box::new(m.tls_reloads.clone()))?;
        for result in ["ok", "error"] {
            m.tls_reloads.with_label_values(&[result]);
        }
        for reason in [
            "draining",
            "unauthorized",
            "forbidden",
            "bad_request",
            "origin",
            "rate_limited",
            "node_full",
            "user_limit",
            "tls",
            "handshake_timeout",
        ] {
            m.rejected.with_label_values(&[reason]);
        }
        for code in [
            "forbidden",
            "invalid_frame",
            "invalid_room",
            "not_joined",
            "rate_limited",
            "too_many_rooms",
            "unauthorized",
            "unavailable",
        ] {
            m.frame_errors.with_label_values(&[code]);
        }
        for code in [
            "1000", "1006", "1009", "4000", "4001", "4002", "4100", "4101", "4400", "4405",
        ] {
            m.disconnects.with_label_values(&[code]);
        }
        for outcome in ["filled", "released"] {
            m.order_gaps.with_label_values(&[outcome]);
        }
        registry.register(Box::new(m.recovered_messages.clone()))?;
        registry.register(Box::new(m.order_gaps.clone()))?;
        registry.register(Box::new(m.gap_filled_messages.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.rooms.clone()))?;
        registry.register(Box::new(m.connects.clone()))?;
        registry.register(Box::new(m.disconnects.clone()))?;
        registry.register(Box::new(m.rejected.clone()))?;
        registry.register(Box::new(m.frames_delivered.clone()))?;
        registry.register(Box::new(m.bytes_delivered.clone()))?;
        registry.register(Box::new(m.frames_written_direct.clone()))?;
        registry.register(Box::new(m.slow_consumers.clone()))?;
        registry.register(Box::new(m.push_batches.clone()))?;
        registry.register(Box::new(m.report_failures.clone()))?;
        registry.register(Box::new(m.dropped_by_controller.clone()))?;
        registry.register(Box::new(m.frame_errors.clone()))?;
        Ok(m)
    }
}

/// `connect_node_ip_limiter_addresses`: the client addresses the per-IP
/// connection limit holds a record for, read from the limit at each scrape.
struct IpLimiterAddresses {
    limiter: std::sync::Arc<crate::ws::PerIpLimiter>,
    gauge: IntGauge,
}

impl prometheus::core::Collector for IpLimiterAddresses {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.gauge.set(self.limiter.len() as i64);
        self.gauge.collect()
    }
}

/// Exports how many client addresses `limiter` remembers
/// (`NEW_CONNECTIONS_PER_IP_PER_SEC`).
pub(crate) fn register_ip_limiter(
    registry: &Registry,
    limiter: std::sync::Arc<crate::ws::PerIpLimiter>,
) -> prometheus::Result<()> {
    let gauge = IntGauge::new(
        "connect_node_ip_limiter_addresses",
        "Client addresses the per-IP new-connection limit remembers; each is forgotten once its allowance has refilled",
    )?;
    registry.register(Box::new(IpLimiterAddresses { limiter, gauge }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The label values a node can count, exported at 0 before any is
    /// counted, so `rate()` and alerts see a series from the start.
    #[test]
    fn known_label_values_start_at_zero() {
        let registry = Registry::new();
        let _m = Metrics::new(&registry).expect("metrics register");
        let families = registry.gather();
        let zeros = |name: &str, label: &str| -> Vec<String> {
            let f = families
                .iter()
                .find(|f| f.name() == name)
                .unwrap_or_else(|| panic!("{name} is not exported"));
            let mut values: Vec<String> = f
                .get_metric()
                .iter()
                .filter(|m| m.get_counter().get_value() == 0.0)
                .flat_map(|m| m.get_label().iter())
                .filter(|l| l.name() == label)
                .map(|l| l.value().to_owned())
                .collect();
            values.sort();
            values
        };
        let rejected = zeros("connect_node_rejected_total", "reason");
        for reason in ["tls", "handshake_timeout", "unauthorized", "user_limit"] {
            assert!(
                rejected.iter().any(|r| r == reason),
                "{reason}: {rejected:?}"
            );
        }
        assert_eq!(
            zeros("connect_node_frame_errors_total", "code"),
            [
                "forbidden",
                "invalid_frame",
                "invalid_room",
                "not_joined",
                "rate_limited",
                "too_many_rooms",
                "unauthorized",
                "unavailable"
            ]
        );
        assert_eq!(
            zeros("connect_node_disconnects_total", "code"),
            [
                "1000", "1006", "1009", "4000", "4001", "4002", "4100", "4101", "4400", "4405"
            ],
            "every close code the node sends"
        );
    }
}
