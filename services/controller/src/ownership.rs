//! Which keys this controller owns, and whether it is ready to serve them.
//!
//! Keys map to controllers through the consistent-hash ring of the live
//! controllers. When the ring changes, a controller forgets the keys it no
//! longer owns and, until every live connect-node has re-sent its state on
//! the new ring (or a warm-up deadline passes), it answers pushes with
//! UNAVAILABLE rather than resolving them against incomplete membership:
//! a push is then either delivered or refused, never acknowledged and lost.

use std::collections::HashSet;
use std::time::Duration;

use barrage_discovery::ring::Ring;
use tokio::time::Instant;

/// Ownership and readiness of one controller.
#[derive(Debug)]
pub struct Ownership {
    self_id: String,
    /// `None` without discovery: this controller owns every key.
    ring: Option<Ring<()>>,
    since: Instant,
    synced: HashSet<String>,
    /// The connect-nodes discovery lists as alive; `None` until it has
    /// said (an empty set is "no node", not "not known yet").
    alive: Option<HashSet<String>>,
    warm: bool,
    warmup: Duration,
}

impl Ownership {
    /// A controller that owns every key (no discovery) and is not ready
    /// until a connect-node has sent its state or `warmup` has passed: one
    /// that just (re)started knows no session, and would take every user
    /// for offline and every room for empty. Without discovery it cannot
    /// know how many nodes there are; they re-send their state at their
    /// next report (each heartbeat), when told to.
    pub fn alone(self_id: &str, warmup: Duration) -> Self {
        Ownership {
            warm: false,
            alive: None,
            warmup,
            ..Self::standalone(self_id)
        }
    }

    /// A controller that owns every key (no discovery) and is ready.
    pub fn standalone(self_id: &str) -> Self {
        Ownership {
            self_id: self_id.to_owned(),
            ring: None,
            since: Instant::now(),
            synced: HashSet::new(),
            alive: Some(HashSet::new()),
            warm: true,
            warmup: Duration::ZERO,
        }
    }

    /// A controller on a ring; not ready until nodes sync or `warmup` passes.
    pub fn on_ring(self_id: &str, warmup: Duration) -> Self {
        Ownership {
            self_id: self_id.to_owned(),
            ring: Some(Ring::new([(self_id.to_owned(), ())], 1)),
            since: Instant::now(),
            synced: HashSet::new(),
            alive: None,
            warm: false,
            warmup,
        }
    }

    /// Whether `key` is this controller's.
    pub fn owns(&self, key: &str) -> bool {
        match &self.ring {
            None => true,
            Some(r) => r.owner(key).is_none_or(|(id, _)| id == self.self_id),
        }
    }

    /// The ring id nodes must sync on.
    pub fn ring_id(&self) -> Option<u64> {
        self.ring.as_ref().map(Ring::id)
    }

    /// Installs a new controller membership. Returns true when the ring changed.
    pub fn set_controllers(
        &mut self,
        ids: impl IntoIterator<Item = String>,
        vnodes: usize,
    ) -> bool {
        let Some(old) = &self.ring else {
            return false;
        };
        let ring = Ring::new(ids.into_iter().map(|id| (id, ())), vnodes);
        if ring.id() == old.id() && ring.len() == old.len() {
            return false;
        }
        self.ring = Some(ring);
        self.since = Instant::now();
        self.synced.clear();
        self.warm = false;
        true
    }

    /// The connect-nodes discovery lists.
    pub fn set_alive(&mut self, alive: HashSet<String>) {
        self.alive = Some(alive);
    }

    /// A node sent its full state computed on ring `ring_id`.
    pub fn synced(&mut self, node: &str, ring_id: u64) {
        if self.ring.is_none() || self.ring_id() == Some(ring_id) {
            self.synced.insert(node.to_owned());
        }
    }

    /// Whether `node` should send its full state now: this controller is
    /// not ready and has no state from it on the current ring (its sync
    /// came before the ring changed, or was computed on another ring).
    pub fn awaits_sync(&mut self, node: &str, now: Instant) -> bool {
        !self.is_ready(now) && !self.synced.contains(node)
    }

    /// Whether pushes may be resolved now.
    pub fn is_ready(&mut self, now: Instant) -> bool {
        // Before discovery has listed the live nodes, no node is known to
        // have synced: only the warm-up makes the controller ready.
        if !self.warm
            && (self
                .alive
                .as_ref()
                .is_some_and(|a| a.is_subset(&self.synced))
                || (self.ring.is_none() && !self.synced.is_empty())
                || now.duration_since(self.since) >= self.warmup)
        {
            self.warm = true;
        }
        self.warm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_controller_alone_serves_once_a_node_has_synced() {
        let mut o = Ownership::alone("c1", Duration::from_secs(5));
        assert!(!o.is_ready(Instant::now()));
        // A node that reports is asked for its state.
        assert!(o.awaits_sync("n1", Instant::now()));
        o.synced("n1", 0);
        assert!(o.is_ready(Instant::now()));
        // With no node at all, the warm-up ends the wait.
        let mut empty = Ownership::alone("c1", Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(empty.is_ready(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_whose_sync_the_ring_change_discarded_is_asked_again() {
        let mut o = Ownership::on_ring("c1", Duration::from_secs(5));
        o.set_alive(["n1".to_string()].into());
        let first = o.ring_id().unwrap();
        o.synced("n1", first);
        assert!(o.is_ready(Instant::now()));
        assert!(!o.awaits_sync("n1", Instant::now()));
        // The ring changes after n1 synced: its state is discarded.
        assert!(o.set_controllers(ids(&["c1", "c2"]), 16));
        assert!(o.awaits_sync("n1", Instant::now()));
        // A sync computed on the old ring does not count.
        o.synced("n1", first);
        assert!(o.awaits_sync("n1", Instant::now()));
        o.synced("n1", o.ring_id().unwrap());
        assert!(!o.awaits_sync("n1", Instant::now()));
        assert!(o.is_ready(Instant::now()));
        // Once warm, nobody is asked.
        assert!(o.set_controllers(ids(&["c1"]), 16));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!o.awaits_sync("n2", Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ready_once_every_live_node_synced_on_the_new_ring() {
        let mut o = Ownership::on_ring("c1", Duration::from_secs(5));
        assert!(o.set_controllers(ids(&["c1", "c2"]), 16));
        o.set_alive(["n1".to_string(), "n2".to_string()].into());
        let now = Instant::now();
        assert!(!o.is_ready(now));
        let ring = o.ring_id().unwrap();
        o.synced("n1", ring);
        o.synced("n2", ring ^ 1); // a sync on a stale ring does not count
        assert!(!o.is_ready(now));
        o.synced("n2", ring);
        assert!(o.is_ready(now));
        assert!(
            !o.set_controllers(ids(&["c2", "c1"]), 16),
            "same members, same ring"
        );
        assert!(o.is_ready(now));
    }

    /// A controller that has just started does not take "no live node
    /// listed yet" for "every live node synced".
    #[tokio::test(start_paused = true)]
    async fn not_ready_before_discovery_has_listed_the_live_nodes() {
        let mut o = Ownership::on_ring("c1", Duration::from_secs(5));
        assert!(!o.is_ready(Instant::now()));
        o.set_alive(HashSet::new());
        assert!(
            o.is_ready(Instant::now()),
            "no node alive: nothing to wait for"
        );
        let mut late = Ownership::on_ring("c1", Duration::from_secs(5));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(late.is_ready(Instant::now()), "the warm-up ends the wait");
    }

    #[tokio::test(start_paused = true)]
    async fn ready_after_the_warmup_even_if_a_node_never_syncs() {
        let mut o = Ownership::on_ring("c1", Duration::from_secs(5));
        o.set_controllers(ids(&["c1"]), 16);
        o.set_alive(["stuck".to_string()].into());
        assert!(!o.is_ready(Instant::now()));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(o.is_ready(Instant::now()));
    }

    #[test]
    fn keys_split_between_controllers() {
        let mut a = Ownership::on_ring("a", Duration::ZERO);
        let mut b = Ownership::on_ring("b", Duration::ZERO);
        a.set_controllers(ids(&["a", "b"]), 64);
        b.set_controllers(ids(&["a", "b"]), 64);
        let keys: Vec<String> = (0..200).map(|i| format!("room:{i}")).collect();
        let mine_a = keys.iter().filter(|k| a.owns(k)).count();
        let mine_b = keys.iter().filter(|k| b.owns(k)).count();
        assert_eq!(mine_a + mine_b, 200, "each key has exactly one owner");
        assert!(mine_a > 50 && mine_b > 50);
        assert!(Ownership::standalone("x").owns("room:anything"));
    }
}
