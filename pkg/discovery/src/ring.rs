//! Consistent-hash ring mapping stream keys (`room:<id>`, `user:<id>`,
//! `broadcast`) to the live controllers that own them.
//!
//! Every process builds the same ring from the same membership, so a
//! connect-node reports a key to the same controller that push-manager asks
//! about it. Each controller gets [`DEFAULT_VNODES`] points on the ring;
//! adding or removing one controller moves only the keys next to its points.

use std::collections::BTreeMap;

/// Virtual nodes per controller unless configured otherwise.
pub const DEFAULT_VNODES: usize = 128;

/// A ring over member ids, each with a payload `T` (e.g. an address).
#[derive(Debug, Clone)]
pub struct Ring<T> {
    points: Vec<(u64, usize)>,
    members: Vec<(String, T)>,
}

impl<T> Ring<T> {
    /// Builds a ring with `vnodes` points per member. Member order does not
    /// matter: the same set always yields the same ring.
    pub fn new(members: impl IntoIterator<Item = (String, T)>, vnodes: usize) -> Self {
        let sorted: BTreeMap<String, T> = members.into_iter().collect();
        let members: Vec<(String, T)> = sorted.into_iter().collect();
        let mut points = Vec::with_capacity(members.len() * vnodes);
        for (idx, (id, _)) in members.iter().enumerate() {
            for v in 0..vnodes.max(1) {
                points.push((hash(format!("{id}#{v}").as_bytes()), idx));
            }
        }
        points.sort_unstable();
        Ring { points, members }
    }

    /// The owner of `key`, or `None` when the ring is empty.
    pub fn owner(&self, key: &str) -> Option<(&str, &T)> {
        if self.points.is_empty() {
            return None;
        }
        let h = hash(key.as_bytes());
        let i = self.points.partition_point(|(p, _)| *p < h);
        let (_, idx) = self.points[i % self.points.len()];
        let (id, t) = &self.members[idx];
        Some((id.as_str(), t))
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the ring has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Identity of the membership this ring was built from: equal on every
    /// process that sees the same controllers.
    pub fn id(&self) -> u64 {
        ring_id(self.members.iter().map(|(id, _)| id.as_str()))
    }

    /// Member ids with their payloads, sorted by id.
    pub fn members(&self) -> impl Iterator<Item = (&str, &T)> {
        self.members.iter().map(|(id, t)| (id.as_str(), t))
    }
}

/// Identity of a set of member ids (order does not matter).
pub fn ring_id<'a>(ids: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    hash(ids.join("\n").as_bytes())
}

/// FNV-1a followed by a SplitMix64 finalizer: stable across processes and
/// releases (unlike `std`'s hasher) and well spread.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ring(ids: &[&str]) -> Ring<()> {
        Ring::new(ids.iter().map(|s| (s.to_string(), ())), DEFAULT_VNODES)
    }

    fn owners(r: &Ring<()>, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| r.owner(&format!("room:{i}")).unwrap().0.to_owned())
            .collect()
    }

    #[test]
    fn ring_ids_depend_on_members_only() {
        assert_eq!(ring(&["a", "b"]).id(), ring(&["b", "a"]).id());
        assert_ne!(ring(&["a", "b"]).id(), ring(&["a", "b", "c"]).id());
        assert_eq!(ring(&["a", "b"]).id(), ring_id(["b", "a"]));
    }

    #[test]
    fn empty_ring_owns_nothing() {
        assert!(ring(&[]).owner("room:a").is_none());
    }

    #[test]
    fn same_members_same_ring_whatever_the_order() {
        let a = owners(&ring(&["c1", "c2", "c3"]), 1000);
        let b = owners(&ring(&["c3", "c1", "c2"]), 1000);
        assert_eq!(a, b);
    }

    #[test]
    fn keys_spread_evenly() {
        let r = ring(&["c1", "c2", "c3", "c4"]);
        let mut count: HashMap<String, usize> = HashMap::new();
        for o in owners(&r, 40_000) {
            *count.entry(o).or_default() += 1;
        }
        for (id, n) in &count {
            // 10,000 expected each; 128 vnodes keeps every share within ±25%.
            assert!((7_500..=12_500).contains(n), "{id} owns {n} of 40000");
        }
        assert_eq!(count.len(), 4);
    }

    #[test]
    fn adding_a_member_moves_only_its_share() {
        let before = owners(&ring(&["c1", "c2", "c3"]), 30_000);
        let after = owners(&ring(&["c1", "c2", "c3", "c4"]), 30_000);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(a, "c4", "a key moved between old members");
                moved += 1;
            }
        }
        // c4 should take about a quarter of the keys.
        assert!((5_000..=10_000).contains(&moved), "moved {moved}");
    }

    #[test]
    fn removing_a_member_moves_only_its_keys() {
        let before = owners(&ring(&["c1", "c2", "c3"]), 30_000);
        let after = owners(&ring(&["c1", "c3"]), 30_000);
        for (b, a) in before.iter().zip(&after) {
            if b != "c2" {
                assert_eq!(a, b);
            }
        }
    }
}
