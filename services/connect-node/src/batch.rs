//! `batch` frames, built once and shared by the connections that gathered
//! the same messages.
//!
//! With a batching window, each connection gathers the messages queued to
//! it for the window and sends them as one frame. The members of a room
//! receive the same messages at about the same time, so most of them
//! gather the same sequence: the first to finish builds (and, for binary
//! connections, compresses) the frame, and the others take it from a small
//! cache instead of building it again. A connection whose sequence differs
//! (it joined later, recovery already sent part of it) builds its own, and
//! so does every connection for a batch over 64 KiB, which is not kept.

use std::hash::{BuildHasher, Hasher};
use std::sync::Weak;

use barrage_protocol::binary;
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::hub::{Frame, Outbound, Wire};

/// Slots of the cache: distinct batches that can be shared at once.
const SLOTS: usize = 64;

/// Larger batches are built by each connection: the cache holds at most
/// `SLOTS` of these bytes after the traffic that made them has passed.
const MAX_SHARED_BYTES: usize = 64 * 1024;

/// One built batch and the frames it holds. The weak references keep the
/// frames' allocations (not their contents) from being reused, so a
/// frame's address identifies it for as long as the entry exists.
struct Entry {
    frames: Vec<Weak<Frame>>,
    wire: Wire,
    message: Message,
}

/// A direct-mapped cache of recently built batch frames.
pub struct BatchCache {
    slots: Box<[Mutex<Option<Entry>>]>,
    hasher: std::hash::RandomState,
}

impl Default for BatchCache {
    fn default() -> Self {
        BatchCache {
            slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl std::fmt::Debug for BatchCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchCache")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl BatchCache {
    /// The `batch` frame holding `frames` (message frames, in order) in the
    /// connection's format, and whether it was shared rather than built.
    pub fn get(&self, frames: &[Outbound], wire: Wire) -> (Message, bool) {
        let mut h = self.hasher.build_hasher();
        h.write_u8(u8::from(wire == Wire::Json));
        for f in frames {
            h.write_usize(f.identity());
        }
        let slot = &self.slots[(h.finish() as usize) % self.slots.len()];
        if let Some(e) = &*slot.lock()
            && e.wire == wire
            && e.frames.len() == frames.len()
            && frames.iter().zip(&e.frames).all(|(f, w)| f.is(w))
        {
            return (e.message.clone(), true);
        }
        // Built outside the lock: compression can take a while.
        let message = build(frames, wire);
        let bytes = match &message {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            _ => usize::MAX,
        };
        if bytes <= MAX_SHARED_BYTES {
            *slot.lock() = Some(Entry {
                frames: frames.iter().map(Outbound::downgrade).collect(),
                wire,
                message: message.clone(),
            });
        }
        (message, false)
    }
}

/// One `batch` frame holding `frames` (message frames), in order: what
/// each connection would build (and compress) without the cache.
pub fn build(frames: &[Outbound], wire: Wire) -> Message {
    match wire {
        Wire::Binary(c) => Message::Binary(binary::batch_frame(
            frames.iter().map(|f| f.body.as_ref()),
            c,
        )),
        Wire::Json => {
            let mut text =
                String::with_capacity(32 + frames.iter().map(|f| f.frame.len() + 1).sum::<usize>());
            text.push_str(r#"{"type":"batch","messages":["#);
            for (i, f) in frames.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(f.frame.as_str());
            }
            text.push_str("]}");
            Message::Text(text.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use barrage_protocol::binary::Compression;

    use super::*;

    /// Message `seq` of room `r`, with `content` as its data.
    fn message_with(seq: u64, content: &str) -> Outbound {
        Outbound::test_message("room:r", 1, seq, content)
    }

    fn message(seq: u64) -> Outbound {
        message_with(seq, &format!("{{\"n\":{seq}}}"))
    }

    fn text(m: &Message) -> &str {
        match m {
            Message::Text(t) => t.as_str(),
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn connections_with_the_same_messages_share_one_frame() {
        let cache = BatchCache::default();
        let (a, b) = (message(1), message(2));
        let (first, shared) = cache.get(&[a.clone(), b.clone()], Wire::Json);
        assert!(!shared, "the first connection builds the frame");
        // Another connection's queue holds clones of the same frames.
        let (second, shared) = cache.get(&[a.clone(), b.clone()], Wire::Json);
        assert!(shared);
        let (Message::Text(x), Message::Text(y)) = (&first, &second) else {
            panic!("text frames expected");
        };
        assert_eq!(x.as_str().as_ptr(), y.as_str().as_ptr(), "one allocation");
        let v: serde_json::Value = serde_json::from_str(text(&second)).unwrap();
        assert_eq!(v["type"], "batch");
        assert_eq!(v["messages"][0]["seq"], 1);
        assert_eq!(v["messages"][1]["seq"], 2);
    }

    #[test]
    fn other_messages_order_or_format_get_their_own_frame() {
        let cache = BatchCache::default();
        let (a, b, c) = (message(1), message(2), message(3));
        let (ab, _) = cache.get(&[a.clone(), b.clone()], Wire::Json);
        for (frames, wire) in [
            (vec![a.clone(), c.clone()], Wire::Json),
            (vec![b.clone(), a.clone()], Wire::Json),
            (vec![a.clone(), b.clone(), c.clone()], Wire::Json),
            (vec![a.clone(), b.clone()], Wire::Binary(Compression::OFF)),
        ] {
            let (m, shared) = cache.get(&frames, wire);
            assert!(!shared, "{frames:?} {wire:?}");
            assert_ne!(m, ab);
        }
        // A frame with the same content but encoded apart is another frame:
        // identity, not equality, is what is shared.
        let (_, shared) = cache.get(&[a, message(2)], Wire::Json);
        assert!(!shared);
    }

    #[test]
    fn large_batches_are_not_kept() {
        let cache = BatchCache::default();
        let big = "x".repeat(MAX_SHARED_BYTES / 2);
        let frames: Vec<Outbound> = (1..=3).map(|seq| message_with(seq, &big)).collect();
        let (first, _) = cache.get(&frames, Wire::Json);
        let (second, shared) = cache.get(&frames, Wire::Json);
        assert!(
            !shared,
            "a batch over {MAX_SHARED_BYTES} bytes is built each time"
        );
        assert_eq!(first, second);
    }

    #[test]
    fn a_frame_is_told_apart_from_one_made_after_it_was_dropped() {
        let cache = BatchCache::default();
        let (a, b) = (message(1), message(2));
        let (_, shared) = cache.get(&[a, b], Wire::Json);
        assert!(!shared);
        // The first frames are gone; new ones may be allocated anywhere
        // but where the entry still points.
        for _ in 0..100 {
            let (_, shared) = cache.get(&[message(3), message(4)], Wire::Json);
            assert!(!shared);
        }
    }

    #[test]
    fn binary_batches_carry_every_message() {
        let cache = BatchCache::default();
        let frames = [message(1), message(2), message(3)];
        let (m, _) = cache.get(&frames, Wire::Binary(Compression::OFF));
        let Message::Binary(b) = &m else {
            panic!("binary expected")
        };
        let expected =
            binary::batch_frame(frames.iter().map(|f| f.body.as_ref()), Compression::OFF);
        assert_eq!(b, &expected);
        let (again, shared) = cache.get(&frames, Wire::Binary(Compression::OFF));
        assert!(shared);
        assert_eq!(again, m);
    }
}
