//! Controller metrics, registered on the registry the role is given.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::state::ControllerState;

/// The controller's Prometheus metrics.
#[derive(Clone)]
pub struct Metrics {
    /// Keys (rooms and users) with at least one session.
    pub keys: IntGauge,
    /// Connect-nodes known to this controller.
    pub nodes: IntGauge,
    /// Streams with a position.
    pub streams: IntGauge,
    /// Messages kept in stream histories.
    pub history_messages: IntGauge,
    /// Bytes of those messages (encoded bodies).
    pub history_bytes: IntGauge,
    /// Messages evicted from history by the global caps.
    pub history_evictions: IntCounter,
    /// Streams with no message left forgotten early, over the stream cap.
    pub streams_over_cap: IntCounter,
    /// Pushes recognised as repeats of an earlier message id.
    pub duplicates: IntCounter,
    /// Repeats answered with nodes to send the message to again.
    pub resends: IntCounter,
    /// Recovery queries by outcome (recovered, not_recovered, too_large,
    /// fresh).
    pub recoveries: IntCounterVec,
    /// Receipts of messages kept for offline users, from connect-nodes.
    pub offline_receipts: IntCounter,
    /// Reports by outcome (applied, duplicate, resync).
    pub reports: IntCounterVec,
    /// Full and partial syncs received.
    pub syncs: IntCounterVec,
    /// Resolve calls by target kind (room, user, broadcast).
    pub resolves: IntCounterVec,
    /// Connect-nodes dropped, by reason (deregistered, silent).
    pub nodes_dropped: IntCounterVec,
    /// Changes of the controller ring seen.
    pub ring_changes: IntCounter,
    /// Pushes refused while the ring was settling or for keys owned elsewhere.
    pub refused: IntCounterVec,
    /// Memberships over all owned keys (refreshed periodically).
    pub members: IntGauge,
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
            members: IntGauge::new(
                "controller_members",
                "Memberships (user in a room or user stream, per node)",
            )?,
            streams: IntGauge::new("controller_streams", "Message streams with a position")?,
            history_messages: IntGauge::new(
                "controller_history_messages",
                "Messages kept in stream histories for recovery",
            )?,
            history_bytes: IntGauge::new(
                "controller_history_bytes",
                "Bytes of the messages kept in stream histories (encoded bodies)",
            )?,
            history_evictions: IntCounter::new(
                "controller_history_evictions_total",
                "Messages evicted from history by the global caps",
            )?,
            streams_over_cap: IntCounter::new(
                "controller_streams_forgotten_over_cap_total",
                "Streams with no message left forgotten before their 24 idle hours because the controller held more than HISTORY_MAX_STREAMS (a client resuming one is told recovered: false)",
            )?,
            duplicates: IntCounter::new(
                "controller_duplicate_pushes_total",
                "Pushes recognised as repeats of an earlier message id",
            )?,
            resends: IntCounter::new(
                "controller_push_resends_total",
                "Repeated pushes answered with nodes to send the message to again (the first attempt did not reach them or recorded no result)",
            )?,
            recoveries: IntCounterVec::new(
                Opts::new("controller_recoveries_total", "Recovery queries by outcome"),
                &["outcome"],
            )?,
            offline_receipts: IntCounter::new(
                "controller_offline_receipts_total",
                "Connections that received the messages kept for their user while offline (until one does, they are handed to every connect without a position)",
            )?,
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
            ring_changes: IntCounter::new(
                "controller_ring_changes_total",
                "Changes of the controller ring seen by this controller",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "controller_refused_total",
                    "Resolve calls refused with UNAVAILABLE, by reason",
                ),
                &["reason"],
            )?,
        };
        for outcome in ["applied", "duplicate", "resync", "dropped", "departed"] {
            m.reports.with_label_values(&[outcome]);
        }
        for kind in ["full", "partial"] {
            m.syncs.with_label_values(&[kind]);
        }
        for kind in ["room", "user", "broadcast"] {
            m.resolves.with_label_values(&[kind]);
        }
        for reason in ["deregistered", "silent"] {
            m.nodes_dropped.with_label_values(&[reason]);
        }
        for reason in ["settling", "not_owner"] {
            m.refused.with_label_values(&[reason]);
        }
        for outcome in ["recovered", "not_recovered", "too_large", "fresh"] {
            m.recoveries.with_label_values(&[outcome]);
        }
        registry.register(Box::new(m.ring_changes.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.keys.clone()))?;
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.history_messages.clone()))?;
        registry.register(Box::new(m.history_bytes.clone()))?;
        registry.register(Box::new(m.history_evictions.clone()))?;
        registry.register(Box::new(m.streams_over_cap.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.resends.clone()))?;
        registry.register(Box::new(m.recoveries.clone()))?;
        registry.register(Box::new(m.offline_receipts.clone()))?;
        registry.register(Box::new(m.reports.clone()))?;
        registry.register(Box::new(m.syncs.clone()))?;
        registry.register(Box::new(m.resolves.clone()))?;
        registry.register(Box::new(m.nodes_dropped.clone()))?;
        registry.register(Box::new(m.members.clone()))?;
        Ok(m)
    }

    /// Refreshes the gauges from the state.
    pub fn observe(&self, s: &ControllerState) {
        self.keys.set(s.members.key_count() as i64);
        self.members.set(s.members.member_count() as i64);
        self.nodes.set(s.members.node_count() as i64);
        self.streams.set(s.streams.len() as i64);
        self.history_messages.set(s.streams.total_messages() as i64);
        self.history_bytes.set(s.streams.total_bytes() as i64);
        let evicted = s.streams.evicted();
        let seen = self.history_evictions.get();
        if evicted > seen {
            self.history_evictions.inc_by(evicted - seen);
        }
        let forgotten = s.streams.forgotten_over_cap();
        let seen = self.streams_over_cap.get();
        if forgotten > seen {
            self.streams_over_cap.inc_by(forgotten - seen);
        }
    }
}
