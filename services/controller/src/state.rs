//! The controller's soft state: which connect-nodes host which keys (here),
//! and the message streams of the keys it owns ([`crate::streams`]).
//!
//! Nothing here is persisted. Connect-nodes are the source of truth for
//! sessions and report them in batches ([`Membership::report`]) numbered per
//! node incarnation; a gap, an unknown node or a new incarnation asks the
//! node for a full [`Membership::sync`] instead of guessing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use barrage_proto::v1::{KeyState, SessionChange, session_change::Kind};

/// Everything a controller holds, behind one lock.
#[derive(Debug)]
pub struct ControllerState {
    /// Who is connected where.
    pub members: Membership,
    /// Stream positions and history.
    pub streams: crate::streams::Streams,
    /// Which keys are ours, and whether we may serve pushes.
    pub ownership: crate::ownership::Ownership,
}

/// Users (with their connection counts) of one key on one node.
type NodeUsers = HashMap<String, u32>;

#[derive(Debug)]
struct NodeEntry {
    incarnation: String,
    /// `incarnation`, hashed once (see [`Membership::incarnation_of`]).
    process: u64,
    seq: u64,
    grpc_addr: String,
    keys: HashSet<String>,
    last_seen: Instant,
}

/// What happened to a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// The changes were applied.
    Applied,
    /// Already applied before (a retried report); nothing changed.
    Duplicate,
    /// The controller cannot apply it; the node must send a full sync.
    ResyncRequired,
    /// As `ResyncRequired`, and this controller dropped the node's
    /// sessions since its last full sync (it left discovery and came back,
    /// or went silent past the node timeout): pushes in between did not
    /// reach it, so its clients must recover.
    Dropped,
    /// The node left discovery; its reports are ignored until discovery
    /// lists it again.
    Departed,
}

/// A node incarnation whose sessions this controller dropped, and which
/// has not sent a full sync since.
#[derive(Debug)]
struct DroppedNode {
    incarnation: String,
    since: Instant,
    /// Still absent from discovery: its reports and syncs are ignored.
    departed: bool,
}

/// Per-node breakdown of a key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyInfo {
    /// node id → (distinct users, connections).
    pub nodes: BTreeMap<String, (u32, u32)>,
    /// Distinct users over all nodes, sorted.
    pub users: Vec<String>,
    /// Connections over all nodes.
    pub connections: u32,
}

/// Membership of the keys one controller owns.
#[derive(Debug, Default)]
pub struct Membership {
    keys: HashMap<String, HashMap<String, NodeUsers>>,
    /// (key, node, user) entries in `keys`, kept in step with it.
    members: usize,
    nodes: HashMap<String, NodeEntry>,
    /// Incarnations whose sessions were dropped (the node left discovery
    /// or went silent), until they send a full sync or for
    /// [`DEPARTED_MEMORY`] (ids of replaced pods never come back). Their
    /// next report is told so ([`ReportOutcome::Dropped`]), and while the
    /// node is absent from discovery its reports and syncs are ignored.
    dropped: HashMap<String, DroppedNode>,
    /// Discovery's latest view of the connect-nodes. A node absent from a
    /// view is dropped, so one still known was in the last view, unless it
    /// synced since: a node syncs before it registers, and one never
    /// listed that is absent from discovery is still starting, not gone.
    alive: HashSet<String>,
}

/// How long a dropped node's incarnation is remembered. A node that is
/// still running hears of it within a heartbeat of coming back (it
/// re-registers once it reaches discovery again), so an hour only bounds
/// the map.
pub const DEPARTED_MEMORY: Duration = Duration::from_secs(3600);

impl Membership {
    /// Empty state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether this incarnation's sessions were dropped since its last
    /// full sync; `Some(true)` while it is also absent from discovery.
    fn dropped(&self, node_id: &str, incarnation: &str) -> Option<bool> {
        self.dropped
            .get(node_id)
            .filter(|d| d.incarnation == incarnation)
            .map(|d| d.departed)
    }

    fn has_departed(&self, node_id: &str, incarnation: &str) -> bool {
        self.dropped(node_id, incarnation) == Some(true)
    }

    /// Whether this incarnation's sessions were dropped since its last
    /// full sync (it is to be told before its state is taken back).
    pub fn was_dropped(&self, node_id: &str, incarnation: &str) -> bool {
        self.dropped(node_id, incarnation).is_some()
    }

    /// Forgets a node's sessions and remembers that its incarnation has to
    /// be told ([`ReportOutcome::Dropped`]).
    fn drop_incarnation(&mut self, node_id: &str, departed: bool, now: Instant) {
        if let Some(n) = self.nodes.get(node_id) {
            self.dropped.insert(
                node_id.to_owned(),
                DroppedNode {
                    incarnation: n.incarnation.clone(),
                    since: now,
                    departed,
                },
            );
        }
        self.drop_node(node_id);
    }

    /// Applies a batch of session changes from a node.
    pub fn report(
        &mut self,
        node_id: &str,
        incarnation: &str,
        seq: u64,
        changes: &[SessionChange],
        now: Instant,
    ) -> ReportOutcome {
        match self.dropped(node_id, incarnation) {
            Some(true) => return ReportOutcome::Departed,
            Some(false) => return ReportOutcome::Dropped,
            None => {}
        }
        let Some(node) = self.nodes.get_mut(node_id) else {
            return ReportOutcome::ResyncRequired;
        };
        if node.incarnation != incarnation {
            return ReportOutcome::ResyncRequired;
        }
        node.last_seen = now;
        if seq <= node.seq {
            return ReportOutcome::Duplicate;
        }
        if seq != node.seq + 1 {
            return ReportOutcome::ResyncRequired;
        }
        node.seq = seq;
        for change in changes {
            let delta: i64 = match change.kind() {
                Kind::Connect | Kind::Join => 1,
                Kind::Disconnect | Kind::Leave => -1,
                // Not about membership: the service applies receipts to
                // the streams.
                Kind::Received | Kind::Unspecified => continue,
            };
            self.apply(node_id, &change.key, &change.user_id, delta);
        }
        ReportOutcome::Applied
    }

    /// Replaces a node's state for the given keys (all of its keys when
    /// `full`), continuing its report numbering from `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn sync(
        &mut self,
        node_id: &str,
        incarnation: &str,
        grpc_addr: &str,
        seq: u64,
        full: bool,
        keys: &[KeyState],
        now: Instant,
    ) -> bool {
        if self.has_departed(node_id, incarnation) {
            return false;
        }
        if full && self.dropped(node_id, incarnation).is_some() {
            self.dropped.remove(node_id);
        }
        let fresh = self
            .nodes
            .get(node_id)
            .is_none_or(|n| n.incarnation != incarnation);
        if full || fresh {
            self.drop_node(node_id);
        }
        let node = self
            .nodes
            .entry(node_id.to_owned())
            .or_insert_with(|| NodeEntry {
                incarnation: incarnation.to_owned(),
                process: std::hash::BuildHasher::hash_one(
                    &std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default(),
                    incarnation,
                ),
                seq,
                grpc_addr: grpc_addr.to_owned(),
                keys: HashSet::new(),
                last_seen: now,
            });
        node.seq = seq;
        node.last_seen = now;
        if !grpc_addr.is_empty() {
            node.grpc_addr = grpc_addr.to_owned();
        }
        for ks in keys {
            self.remove_key_on_node(node_id, &ks.key);
            for (user, n) in &ks.users {
                if *n > 0 {
                    self.apply(node_id, &ks.key, user, i64::from(*n));
                }
            }
        }
        true
    }

    fn apply(&mut self, node_id: &str, key: &str, user: &str, delta: i64) {
        let nodes = self.keys.entry(key.to_owned()).or_default();
        let users = nodes.entry(node_id.to_owned()).or_default();
        let count = users.entry(user.to_owned()).or_default();
        let before = *count;
        let next = (i64::from(*count) + delta).max(0);
        *count = u32::try_from(next).unwrap_or(u32::MAX);
        match (before, *count) {
            (0, 0) => {}
            (0, _) => self.members += 1,
            (_, 0) => self.members -= 1,
            _ => {}
        }
        if *count == 0 {
            users.remove(user);
        }
        let node_empty = users.is_empty();
        if node_empty {
            nodes.remove(node_id);
        }
        if nodes.is_empty() {
            self.keys.remove(key);
        }
        if let Some(n) = self.nodes.get_mut(node_id) {
            if node_empty {
                n.keys.remove(key);
            } else {
                n.keys.insert(key.to_owned());
            }
        }
    }

    fn remove_key_on_node(&mut self, node_id: &str, key: &str) {
        if let Some(nodes) = self.keys.get_mut(key) {
            if let Some(users) = nodes.remove(node_id) {
                self.members -= users.len();
            }
            if nodes.is_empty() {
                self.keys.remove(key);
            }
        }
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.keys.remove(key);
        }
    }

    /// Forgets everything about a node (its registration went away).
    /// Returns whether the node was known.
    pub fn drop_node(&mut self, node_id: &str) -> bool {
        let Some(node) = self.nodes.remove(node_id) else {
            return false;
        };
        for key in node.keys {
            if let Some(nodes) = self.keys.get_mut(&key) {
                if let Some(users) = nodes.remove(node_id) {
                    self.members -= users.len();
                }
                if nodes.is_empty() {
                    self.keys.remove(&key);
                }
            }
        }
        true
    }

    /// Drops nodes not heard from within `timeout`; returns their ids.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<String> {
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| now.saturating_duration_since(n.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            self.drop_incarnation(id, false, now);
        }
        self.dropped
            .retain(|_, d| now.saturating_duration_since(d.since) < DEPARTED_MEMORY);
        dead
    }

    /// Drops every node not in `alive` (discovery's view) and ignores their
    /// current incarnation until discovery lists them again (for
    /// [`DEPARTED_MEMORY`] at most); returns their ids.
    pub fn retain_nodes(&mut self, alive: &HashSet<String>, now: Instant) -> Vec<String> {
        self.dropped.retain(|id, d| {
            d.departed = !alive.contains(id);
            now.saturating_duration_since(d.since) < DEPARTED_MEMORY
        });
        let mut dead: Vec<(String, bool)> = self
            .nodes
            .keys()
            .filter(|id| !alive.contains(*id))
            .map(|id| (id.clone(), self.alive.contains(id)))
            .collect();
        dead.sort();
        self.alive.clone_from(alive);
        let mut dropped = Vec::new();
        for (id, listed) in dead {
            if listed {
                self.drop_incarnation(&id, true, now);
                dropped.push(id);
            } else if self.nodes.get(&id).is_some_and(|n| !n.keys.is_empty()) {
                // Synced but not registered yet (it is starting), with
                // clients already: they may miss pushes until it syncs
                // again, so it is told, but not refused.
                self.drop_incarnation(&id, false, now);
                dropped.push(id);
            } else {
                // Starting, with nobody to miss anything: it syncs again
                // when asked.
                self.drop_node(&id);
            }
        }
        dropped
    }

    /// The nodes hosting `key` (every known node for `broadcast`), sorted.
    pub fn nodes_for(&self, key: &str) -> Vec<String> {
        let mut node_ids: Vec<String> = if key == barrage_protocol::StreamKey::BROADCAST {
            self.nodes.keys().cloned().collect()
        } else {
            self.keys
                .get(key)
                .map(|n| n.keys().cloned().collect())
                .unwrap_or_default()
        };
        node_ids.sort();
        node_ids
    }

    /// Forgets every key `keep` rejects (keys another controller owns now).
    pub fn retain_keys(&mut self, keep: impl Fn(&str) -> bool) {
        let members = &mut self.members;
        self.keys.retain(|k, nodes| {
            let kept = keep(k);
            if !kept {
                *members -= nodes.values().map(HashMap::len).sum::<usize>();
            }
            kept
        });
        for n in self.nodes.values_mut() {
            n.keys.retain(|k| keep(k));
        }
    }

    /// A number for the process a node runs now (from its incarnation),
    /// different after each restart; 0 for a node not known.
    pub fn incarnation_of(&self, node_id: &str) -> u64 {
        self.nodes.get(node_id).map_or(0, |n| n.process)
    }

    /// gRPC address a node reported, if known.
    pub fn node_addr(&self, node_id: &str) -> Option<&str> {
        self.nodes
            .get(node_id)
            .map(|n| n.grpc_addr.as_str())
            .filter(|a| !a.is_empty())
    }

    /// Who holds `key`, per node.
    pub fn info(&self, key: &str) -> KeyInfo {
        let mut info = KeyInfo::default();
        let mut users = HashSet::new();
        if let Some(nodes) = self.keys.get(key) {
            for (node, members) in nodes {
                let conns: u32 = members.values().sum();
                info.nodes
                    .insert(node.clone(), (members.len() as u32, conns));
                info.connections += conns;
                users.extend(members.keys().cloned());
            }
        }
        info.users = users.into_iter().collect();
        info.users.sort();
        info
    }

    /// Number of keys with at least one session.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Memberships: (key, user) pairs summed over the nodes holding them.
    /// Counted as they change: reading it costs nothing under the lock.
    pub fn member_count(&self) -> usize {
        self.members
    }

    /// Number of known connect-nodes.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(kind: Kind, key: &str, user: &str) -> SessionChange {
        SessionChange {
            kind: kind as i32,
            key: key.into(),
            user_id: user.into(),
            ..Default::default()
        }
    }

    fn synced(m: &mut Membership, node: &str) {
        m.sync(node, "inc", "127.0.0.1:1", 0, true, &[], Instant::now());
    }

    #[test]
    fn a_nodes_process_number_changes_with_its_incarnation_only() {
        let mut m = Membership::new();
        assert_eq!(m.incarnation_of("n1"), 0);
        synced(&mut m, "n1");
        let first = m.incarnation_of("n1");
        assert_ne!(first, 0);
        // A full sync of the same process (a ring change, a gap) keeps it.
        synced(&mut m, "n1");
        assert_eq!(m.incarnation_of("n1"), first);
        m.sync(
            "n1",
            "restarted",
            "127.0.0.1:1",
            0,
            true,
            &[],
            Instant::now(),
        );
        assert_ne!(m.incarnation_of("n1"), first);
    }

    #[test]
    fn unknown_node_must_sync_first() {
        let mut m = Membership::new();
        let out = m.report(
            "n1",
            "inc",
            1,
            &[change(Kind::Connect, "user:u", "u")],
            Instant::now(),
        );
        assert_eq!(out, ReportOutcome::ResyncRequired);
        assert!(m.nodes_for("user:u").is_empty());
    }

    #[test]
    fn reports_apply_in_order_and_gaps_ask_for_resync() {
        let mut m = Membership::new();
        let now = Instant::now();
        synced(&mut m, "n1");
        let joins = [
            change(Kind::Join, "room:r", "a"),
            change(Kind::Join, "room:r", "b"),
        ];
        assert_eq!(
            m.report("n1", "inc", 1, &joins, now),
            ReportOutcome::Applied
        );
        assert_eq!(
            m.report("n1", "inc", 1, &joins, now),
            ReportOutcome::Duplicate
        );
        assert_eq!(m.info("room:r").users, vec!["a", "b"]);
        assert_eq!(
            m.report("n1", "inc", 3, &[], now),
            ReportOutcome::ResyncRequired
        );
        assert_eq!(
            m.report("n1", "other", 2, &[], now),
            ReportOutcome::ResyncRequired
        );
        let leave = [change(Kind::Leave, "room:r", "a")];
        assert_eq!(
            m.report("n1", "inc", 2, &leave, now),
            ReportOutcome::Applied
        );
        assert_eq!(m.info("room:r").users, vec!["b"]);
    }

    #[test]
    fn hosting_nodes_are_listed() {
        let mut m = Membership::new();
        let now = Instant::now();
        for n in ["n1", "n2", "n3"] {
            synced(&mut m, n);
        }
        m.report("n1", "inc", 1, &[change(Kind::Join, "room:r", "a")], now);
        m.report("n2", "inc", 1, &[change(Kind::Join, "room:r", "b")], now);
        assert_eq!(m.nodes_for("room:r"), vec!["n1", "n2"]);
        assert_eq!(m.nodes_for("room:empty"), Vec::<String>::new());
        assert_eq!(m.nodes_for("broadcast"), vec!["n1", "n2", "n3"]);
        // a in r on n1, b in r on n2; a second connection of a adds nothing.
        assert_eq!(m.member_count(), 2);
        m.report("n1", "inc", 2, &[change(Kind::Join, "room:r", "a")], now);
        m.report("n1", "inc", 3, &[change(Kind::Join, "room:s", "a")], now);
        assert_eq!(m.member_count(), 3);
    }

    #[test]
    fn several_connections_of_one_user_are_counted() {
        let mut m = Membership::new();
        let now = Instant::now();
        synced(&mut m, "n1");
        let c = change(Kind::Connect, "user:u", "u");
        m.report("n1", "inc", 1, &[c.clone(), c.clone()], now);
        let info = m.info("user:u");
        assert_eq!(info.connections, 2);
        m.report(
            "n1",
            "inc",
            2,
            &[change(Kind::Disconnect, "user:u", "u")],
            now,
        );
        assert_eq!(m.info("user:u").connections, 1);
        m.report(
            "n1",
            "inc",
            3,
            &[change(Kind::Disconnect, "user:u", "u")],
            now,
        );
        assert!(m.info("user:u").nodes.is_empty());
        assert_eq!(m.key_count(), 0);
    }

    #[test]
    fn full_sync_replaces_and_drop_forgets() {
        let mut m = Membership::new();
        let now = Instant::now();
        synced(&mut m, "n1");
        m.report("n1", "inc", 1, &[change(Kind::Join, "room:old", "a")], now);
        let ks = KeyState {
            key: "room:new".into(),
            users: [("a".to_string(), 2)].into_iter().collect(),
        };
        m.sync("n1", "inc2", "127.0.0.1:2", 7, true, &[ks], now);
        assert!(m.info("room:old").nodes.is_empty());
        assert_eq!(m.info("room:new").connections, 2);
        assert_eq!(m.report("n1", "inc2", 8, &[], now), ReportOutcome::Applied);
        assert_eq!(m.node_addr("n1"), Some("127.0.0.1:2"));
        assert!(m.drop_node("n1"));
        assert!(m.info("room:new").nodes.is_empty());
        assert!(m.nodes_for("broadcast").is_empty());
    }

    #[test]
    fn silent_nodes_expire() {
        let mut m = Membership::new();
        let t0 = Instant::now();
        m.sync("n1", "i", "", 0, true, &[], t0);
        m.sync("n2", "i", "", 0, true, &[], t0 + Duration::from_secs(5));
        let dead = m.expire(t0 + Duration::from_secs(11), Duration::from_secs(10));
        assert_eq!(dead, vec!["n1"]);
        assert_eq!(m.node_count(), 1);
        let alive: HashSet<String> = ["n2".to_string()].into_iter().collect();
        m.retain_nodes(&alive, Instant::now());
        assert_eq!(m.retain_nodes(&HashSet::new(), Instant::now()), vec!["n2"]);
        assert_eq!(m.node_count(), 0);
    }

    #[test]
    fn a_departed_incarnation_cannot_come_back_until_discovery_lists_it() {
        let mut m = Membership::new();
        let now = Instant::now();
        m.sync("n1", "i1", "a", 0, true, &[], now);
        m.retain_nodes(&["n1".to_string()].into_iter().collect(), now);
        m.retain_nodes(&HashSet::new(), now);
        assert_eq!(m.report("n1", "i1", 1, &[], now), ReportOutcome::Departed);
        assert!(!m.sync("n1", "i1", "a", 0, true, &[], now));
        assert_eq!(m.node_count(), 0);
        // A restarted process (new incarnation) is welcome at once.
        assert!(m.sync("n1", "i2", "a", 0, true, &[], now));
        m.drop_node("n1");
        // Listed again (e.g. re-registered after an etcd outage): welcome.
        m.retain_nodes(&["n1".to_string()].into_iter().collect(), now);
        assert!(m.sync("n1", "i1", "a", 0, true, &[], now));
    }

    /// A node dropped while it kept running missed the pushes in between:
    /// every report of that incarnation says so until its full sync.
    #[test]
    fn a_node_back_from_departure_is_told_it_was_dropped_until_it_syncs() {
        let mut m = Membership::new();
        let now = Instant::now();
        m.retain_nodes(&["n1".to_string()].into_iter().collect(), now);
        m.sync("n1", "i1", "a", 0, true, &[], now);
        assert_eq!(
            m.report("n1", "i1", 1, &[change(Kind::Join, "room:r", "u")], now),
            ReportOutcome::Applied
        );
        m.retain_nodes(&HashSet::new(), now);
        assert_eq!(m.report("n1", "i1", 2, &[], now), ReportOutcome::Departed);
        m.retain_nodes(&["n1".to_string()].into_iter().collect(), now);
        // Asked again (the first answer may have been lost): same answer.
        for _ in 0..2 {
            assert_eq!(m.report("n1", "i1", 2, &[], now), ReportOutcome::Dropped);
        }
        assert!(m.nodes_for("room:r").is_empty());
        // A partial sync is not the whole state: still dropped.
        assert!(m.sync("n1", "i1", "a", 1, false, &[], now));
        assert_eq!(m.report("n1", "i1", 2, &[], now), ReportOutcome::Dropped);
        let ks = KeyState {
            key: "room:r".into(),
            users: [("u".to_string(), 1)].into_iter().collect(),
        };
        assert!(m.sync("n1", "i1", "a", 1, true, &[ks], now));
        assert_eq!(m.report("n1", "i1", 2, &[], now), ReportOutcome::Applied);
        assert_eq!(m.nodes_for("room:r"), vec!["n1"]);
    }

    /// A node syncs before it registers: dropped while discovery has not
    /// listed it yet, it is not told that pushes went missing (it had no
    /// clients), and is not refused either.
    #[test]
    fn a_node_not_yet_listed_is_not_counted_as_departed() {
        let mut m = Membership::new();
        let now = Instant::now();
        m.sync("n1", "i1", "a", 0, true, &[], now);
        assert!(m.retain_nodes(&HashSet::new(), now).is_empty());
        assert_eq!(m.node_count(), 0);
        assert_eq!(
            m.report("n1", "i1", 1, &[], now),
            ReportOutcome::ResyncRequired
        );
        assert!(m.sync("n1", "i1", "a", 0, true, &[], now));
        m.retain_nodes(&["n1".to_string()].into_iter().collect(), now);
        m.retain_nodes(&HashSet::new(), now);
        assert_eq!(m.report("n1", "i1", 1, &[], now), ReportOutcome::Departed);
    }

    /// A node not listed yet that already has clients (it serves before it
    /// registers) is told when it is dropped, but not refused.
    #[test]
    fn a_node_not_yet_listed_with_clients_is_told_it_was_dropped() {
        let mut m = Membership::new();
        let now = Instant::now();
        let ks = KeyState {
            key: "room:r".into(),
            users: [("u".to_string(), 1)].into_iter().collect(),
        };
        m.sync("n1", "i1", "a", 0, true, &[ks], now);
        assert_eq!(m.retain_nodes(&HashSet::new(), now), vec!["n1"]);
        assert_eq!(m.report("n1", "i1", 1, &[], now), ReportOutcome::Dropped);
        assert!(m.was_dropped("n1", "i1"));
        assert!(m.sync("n1", "i1", "a", 0, true, &[], now));
        assert!(!m.was_dropped("n1", "i1"));
    }

    /// A node silent past the timeout (a stall, a partition) is dropped
    /// while discovery still lists it: its next report is told so.
    #[test]
    fn a_silent_node_that_speaks_again_is_told_it_was_dropped() {
        let mut m = Membership::new();
        let t0 = Instant::now();
        m.sync("n1", "i1", "a", 0, true, &[], t0);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(m.expire(later, Duration::from_secs(10)), vec!["n1"]);
        assert_eq!(m.report("n1", "i1", 1, &[], later), ReportOutcome::Dropped);
        // Another incarnation's full sync does not clear it.
        assert!(m.sync("n1", "i2", "a", 0, true, &[], later));
        assert_eq!(m.report("n1", "i1", 1, &[], later), ReportOutcome::Dropped);
        assert!(m.sync("n1", "i1", "a", 0, true, &[], later));
        assert_eq!(m.report("n1", "i1", 1, &[], later), ReportOutcome::Applied);
    }

    /// Ids of departed nodes that never come back (replaced pods) are
    /// forgotten after `DEPARTED_MEMORY`, so the map does not only grow.
    #[test]
    fn departed_incarnations_are_forgotten_after_a_while() {
        let mut m = Membership::new();
        let now = Instant::now();
        let pods: HashSet<String> = (0..3).map(|i| format!("pod-{i}")).collect();
        m.retain_nodes(&pods, now);
        for pod in &pods {
            m.sync(pod, "i1", "a", 0, true, &[], now);
        }
        m.retain_nodes(&HashSet::new(), now);
        assert_eq!(m.dropped.len(), 3);
        let later = now + DEPARTED_MEMORY / 2;
        m.retain_nodes(&HashSet::new(), later);
        assert_eq!(
            m.report("pod-0", "i1", 1, &[], later),
            ReportOutcome::Departed
        );
        m.retain_nodes(&HashSet::new(), now + DEPARTED_MEMORY);
        assert!(m.dropped.is_empty());
    }

    proptest::proptest! {
        /// The membership count kept as changes arrive equals a walk of
        /// every key, whatever the mix of reports, syncs and departures.
        #[test]
        fn member_count_follows_the_keys(
            ops in proptest::collection::vec((0u8..6, 0u8..3, 0u8..4, 0u8..3), 1..200),
        ) {
            let mut m = Membership::new();
            let now = Instant::now();
            let mut seqs = [0u64; 3];
            for (op, node, key, user) in ops {
                let node_id = format!("n{node}");
                let key = format!("room:k{key}");
                let user = format!("u{user}");
                let n = usize::from(node);
                match op {
                    0..=2 => {
                        let kind = match op {
                            0 => Kind::Join,
                            1 => Kind::Connect,
                            _ => Kind::Leave,
                        };
                        seqs[n] += 1;
                        if m.report(&node_id, "inc", seqs[n], &[change(kind, &key, &user)], now)
                            == ReportOutcome::ResyncRequired
                        {
                            seqs[n] = 0;
                            synced(&mut m, &node_id);
                        }
                    }
                    3 => {
                        let ks = KeyState {
                            key: key.clone(),
                            users: [(user.clone(), 2)].into_iter().collect(),
                        };
                        m.sync(&node_id, "inc", "127.0.0.1:1", seqs[n], false, &[ks], now);
                    }
                    4 => {
                        m.drop_node(&node_id);
                        seqs[n] = 0;
                    }
                    _ => m.retain_keys(|k| k != key),
                }
                let walked: usize = m.keys.values().flat_map(HashMap::values).map(HashMap::len).sum();
                proptest::prop_assert_eq!(m.member_count(), walked);
            }
        }
    }
}
