//! Newtypes for the names barrage routes by, and the stream keys built from
//! them (`room:<id>`, `user:<id>`, `broadcast`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest room, user or node id accepted, in bytes.
///
/// Ids are 1 to this many bytes of UTF-8 with no whitespace, control
/// characters or commas: the client protocol joins ids with `,` in its
/// lists (`rooms=a,b`, `positions`, event ids), so a comma in an id would
/// split it in two.
pub const MAX_ID_LEN: usize = 128;

/// Why an id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is the empty string.
    #[error("must not be empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`] bytes.
    #[error("must be at most {MAX_ID_LEN} bytes, got {0}")]
    TooLong(usize),
    /// The id holds whitespace or a control character.
    #[error("must not contain whitespace or control characters")]
    BadChar,
    /// The id holds a comma, which separates the ids of a list
    /// (`rooms=a,b`, positions, event ids).
    #[error("must not contain ',' (it separates ids in lists such as rooms=a,b)")]
    Comma,
    /// A stream key that is not `room:<id>`, `user:<id>` or `broadcast`.
    #[error("unknown stream key {0:?}: expected room:<id>, user:<id> or broadcast")]
    BadKey(String),
}

fn check(s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(s.len()));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(IdError::BadChar);
    }
    if s.contains(',') {
        return Err(IdError::Comma);
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps an id.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                check(&s)?;
                Ok(Self(s))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }
    };
}

id_type!(
    /// A room (channel) that connections join; the target of PushToRoom.
    RoomId
);
id_type!(
    /// A user as named by the business side; one user may hold many connections.
    UserId
);
id_type!(
    /// A process registered in discovery (connect-node, controller, push-manager).
    NodeId
);

/// A message stream: what a push targets and what sequence numbers count.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    /// `room:<id>`: every connection that joined the room.
    Room(RoomId),
    /// `user:<id>`: every connection of the user.
    User(UserId),
    /// `broadcast`: every connection everywhere.
    Broadcast,
}

impl StreamKey {
    /// The text of [`StreamKey::Broadcast`].
    pub const BROADCAST: &'static str = "broadcast";

    /// The key's room, if it is a room key.
    pub fn room(&self) -> Option<&RoomId> {
        match self {
            StreamKey::Room(r) => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamKey::Room(r) => write!(f, "room:{r}"),
            StreamKey::User(u) => write!(f, "user:{u}"),
            StreamKey::Broadcast => f.write_str(Self::BROADCAST),
        }
    }
}

impl FromStr for StreamKey {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s == Self::BROADCAST {
            return Ok(StreamKey::Broadcast);
        }
        match s.split_once(':') {
            Some(("room", id)) => Ok(StreamKey::Room(RoomId::new(id)?)),
            Some(("user", id)) => Ok(StreamKey::User(UserId::new(id)?)),
            _ => Err(IdError::BadKey(s.to_owned())),
        }
    }
}

/// A position in a stream: the stream's `epoch` and a message's `seq` in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct StreamPos {
    /// Changes whenever the stream's history is lost.
    pub epoch: u64,
    /// Strictly increasing within one epoch, starting at 1.
    pub seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert_eq!(RoomId::new(""), Err(IdError::Empty));
        assert_eq!(RoomId::new("a b"), Err(IdError::BadChar));
        assert_eq!(RoomId::new("a,b"), Err(IdError::Comma));
        assert_eq!(UserId::new(","), Err(IdError::Comma));
        assert!(
            IdError::Comma.to_string().contains("','"),
            "the error says what is wrong"
        );
        // A stream key with a comma in its id is refused too, so a list
        // of positions cannot be split inside one.
        assert!("room:a,b".parse::<StreamKey>().is_err());
        assert_eq!(UserId::new("x".repeat(129)), Err(IdError::TooLong(129)));
        assert!(UserId::new("x".repeat(128)).is_ok());
        assert_eq!(RoomId::new("r1").unwrap().as_str(), "r1");
    }

    #[test]
    fn stream_keys_round_trip() {
        for k in ["room:r1", "user:u:with:colons", "broadcast"] {
            let key: StreamKey = k.parse().unwrap();
            assert_eq!(key.to_string(), k);
        }
        assert!("rooms:r1".parse::<StreamKey>().is_err());
        assert!("room:".parse::<StreamKey>().is_err());
    }
}
