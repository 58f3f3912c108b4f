//! Live frames a connection must drop because recovery already sent them.
//!
//! A client that reconnects with its positions gets what it missed from
//! history, while live frames of the same streams keep arriving; those up
//! to the recovered position (or handed out from the user's offline
//! store) are copies of frames it already has. So are, for a room or the
//! broadcast stream the client gave no position for, live frames at or
//! below where `connected` starts it. A [`Skip`] names them, per stream, until the stream has
//! moved past them.

use std::collections::{HashMap, HashSet};

use crate::hub::Outbound;

/// Live frames the writer must drop because recovery already sent them.
#[derive(Debug, Clone, Default)]
pub(crate) struct Skip(HashMap<String, (u64, SkipRule)>);

#[derive(Debug, Clone)]
pub(crate) enum SkipRule {
    /// Everything up to this seq was recovered.
    UpTo(u64),
    /// These seqs were handed out from the offline store.
    Seqs(HashSet<u64>),
}

impl Skip {
    /// Drops live frames of `stream` in `epoch` that `rule` names.
    pub(crate) fn insert(&mut self, stream: String, epoch: u64, rule: SkipRule) {
        self.0.insert(stream, (epoch, rule));
    }

    /// Whether no live frame needs checking any more.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn already_sent(&mut self, out: &Outbound) -> bool {
        if self.0.is_empty() {
            return false;
        }
        let Some((stream, epoch, seq)) = &out.position else {
            return false;
        };
        match self.0.get(&**stream) {
            Some((e, SkipRule::UpTo(max))) if e == epoch => {
                if seq > max {
                    // Past the recovered range: later frames are all new.
                    self.0.remove(&**stream);
                    false
                } else {
                    true
                }
            }
            Some((e, SkipRule::Seqs(seqs))) if e == epoch => {
                if seqs.contains(seq) {
                    true
                } else {
                    // A stream's live frames come in order: past the
                    // highest seq handed out, none of them can follow.
                    if seqs.iter().all(|s| s < seq) {
                        self.0.remove(&**stream);
                    }
                    false
                }
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(stream: &str, epoch: u64, seq: u64) -> Outbound {
        Outbound::test_message(stream, epoch, seq, "x")
    }

    #[test]
    fn skip_drops_what_recovery_sent_and_empties_once_past_it() {
        let mut skip = Skip::default();
        skip.0.insert("room:a".into(), (1, SkipRule::UpTo(5)));
        skip.0.insert(
            "user:u".into(),
            (1, SkipRule::Seqs([3, 7].into_iter().collect())),
        );
        assert!(skip.already_sent(&live("room:a", 1, 5)));
        assert!(
            !skip.already_sent(&live("room:a", 2, 1)),
            "another epoch is new"
        );
        assert!(skip.already_sent(&live("user:u", 1, 3)));
        assert!(!skip.already_sent(&live("user:u", 1, 4)));
        assert!(skip.already_sent(&live("user:u", 1, 7)));
        assert!(!skip.already_sent(&live("room:a", 1, 6)));
        assert!(
            !skip.is_empty(),
            "user:u may still repeat an offline message"
        );
        assert!(!skip.already_sent(&live("user:u", 1, 8)));
        assert!(
            skip.is_empty(),
            "past every recovered message: nothing left to drop"
        );
        assert!(!skip.already_sent(&live("user:u", 1, 7)));
    }
}
