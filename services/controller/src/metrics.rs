//! Controller metrics, registered on the registry the role is given.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

use crate::state::Membership;

/// The controller's Prometheus metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Keys (rooms and users) with at least one session.
    pub keys: IntGauge,
    /// Connect-nodes known to this controller.
    pub nodes: IntGauge,
    /// Streams with a position.
    pub streams: IntGauge,
    /// Reports by outcome (applied, duplicate, resync).
    pub reports: IntCounterVec,
    /// Full and partial syncs received.
    pub syncs: IntCounterVec,
    /// Resolve calls by target kind (room, user, broadcast).
    pub resolves: IntCounterVec,
    /// Connect-nodes dropped, by reason (deregistered, silent).
    pub nodes_dropped: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            keys: IntGauge::new(
                "controller_keys",
                "Keys (rooms and users) with at least one session",
            )?,
            nodes: IntGauge::new("controller_nodes", "Connect-nodes known to this controller")?,
            streams: IntGauge::new("controller_streams", "Message streams with a position")?,
            reports: IntCounterVec::new(
                Opts::new(
                    "controller_reports_total",
                    "Session reports from connect-nodes by outcome",
                ),
                &["outcome"],
            )?,
            syncs: IntCounterVec::new(
                Opts::new("controller_syncs_total", "State syncs from connect-nodes"),
                &["kind"],
            )?,
            resolves: IntCounterVec::new(
                Opts::new(
                    "controller_resolves_total",
                    "Targets resolved for pushes by kind",
                ),
                &["kind"],
            )?,
            nodes_dropped: IntCounterVec::new(
                Opts::new(
                    "controller_nodes_dropped_total",
                    "Connect-nodes dropped by reason",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(m.keys.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.reports.clone()))?;
        registry.register(Box::new(m.syncs.clone()))?;
        registry.register(Box::new(m.resolves.clone()))?;
        registry.register(Box::new(m.nodes_dropped.clone()))?;
        Ok(m)
    }

    /// Refreshes the gauges from the state.
    pub fn observe(&self, s: &Membership) {
        self.keys.set(s.key_count() as i64);
        self.nodes.set(s.node_count() as i64);
        self.streams.set(s.stream_count() as i64);
    }
}
