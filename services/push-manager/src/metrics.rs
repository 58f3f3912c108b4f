//! push-manager metrics, with the names operators alert on.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The push-manager's Prometheus metrics.
#[derive(Clone)]
pub struct Metrics {
    /// API calls by method and gRPC status.
    pub api_requests: IntCounterVec,
    /// API call latency by method.
    pub api_duration: HistogramVec,
    /// Pooled gRPC channels to connect-nodes.
    pub node_connections: IntGauge,
    /// Pushes every hosting node accepted.
    pub push_success: IntCounter,
    /// Pushes that failed on at least one node, or entirely.
    pub push_failed: IntCounter,
    /// PushMessageBatch latency per node.
    pub node_batch_duration: HistogramVec,
    /// PushMessageBatch failures per node.
    pub node_batch_errors: IntCounterVec,
    /// Nodes one push fanned out to.
    pub fanout_nodes: Histogram,
    /// Push results not recorded at their controller because its queue was
    /// full (a retry of such a push reports 0 connections reached).
    pub completions_dropped: IntCounter,
    /// Pushes whose callers went away before they ended, by what became
    /// of them (`finished` as a task of its own, or `cut_short` with too
    /// many such tasks running).
    pub abandoned: IntCounterVec,
    /// Pushes carried by one call to a peer (`connect-node`: messages in a
    /// PushMessageBatch; `controller`: requests in a ResolveBatch).
    pub peer_call_items: HistogramVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            api_requests: IntCounterVec::new(
                Opts::new(
                    "push_manager_api_requests_total",
                    "API calls by method and status",
                ),
                &["api", "status"],
            )?,
            api_duration: HistogramVec::new(
                HistogramOpts::new("push_manager_api_duration_seconds", "API call latency")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["api"],
            )?,
            node_connections: IntGauge::new(
                "push_manager_node_connections",
                "Pooled gRPC channels to connect-nodes",
            )?,
            push_success: IntCounter::new(
                "push_manager_push_success_total",
                "Pushes accepted by every hosting connect-node",
            )?,
            push_failed: IntCounter::new(
                "push_manager_push_failed_total",
                "Pushes that failed on at least one connect-node, or entirely",
            )?,
            node_batch_duration: HistogramVec::new(
                HistogramOpts::new(
                    "push_manager_node_batch_duration_seconds",
                    "Time for one push's delivery to a connect-node, queueing behind busy calls included",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["node"],
            )?,
            node_batch_errors: IntCounterVec::new(
                Opts::new(
                    "push_manager_node_batch_errors_total",
                    "PushMessageBatch failures per connect-node",
                ),
                &["node"],
            )?,
            fanout_nodes: Histogram::with_opts(
                HistogramOpts::new(
                    "push_manager_fanout_nodes",
                    "Connect-nodes one push fanned out to",
                )
                .buckets(vec![0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            )?,
            completions_dropped: IntCounter::new(
                "push_manager_completions_dropped_total",
                "Push results not recorded at their controller because its queue was full",
            )?,
            abandoned: IntCounterVec::new(
                Opts::new(
                    "push_manager_abandoned_pushes_total",
                    "Pushes whose callers went away before they ended, by outcome (finished: went on as a task of its own; cut_short: too many such tasks running)",
                ),
                &["outcome"],
            )?,
            peer_call_items: HistogramVec::new(
                HistogramOpts::new(
                    "push_manager_peer_call_items",
                    "Pushes carried by one call to a connect-node or controller",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                &["peer"],
            )?,
        };
        registry.register(Box::new(m.api_requests.clone()))?;
        registry.register(Box::new(m.api_duration.clone()))?;
        registry.register(Box::new(m.node_connections.clone()))?;
        registry.register(Box::new(m.push_success.clone()))?;
        registry.register(Box::new(m.push_failed.clone()))?;
        registry.register(Box::new(m.node_batch_duration.clone()))?;
        registry.register(Box::new(m.node_batch_errors.clone()))?;
        registry.register(Box::new(m.fanout_nodes.clone()))?;
        registry.register(Box::new(m.completions_dropped.clone()))?;
        registry.register(Box::new(m.abandoned.clone()))?;
        for outcome in ["finished", "cut_short"] {
            m.abandoned.with_label_values(&[outcome]);
        }
        registry.register(Box::new(m.peer_call_items.clone()))?;
        Ok(m)
    }
}
