//! The barrage client protocol: identifiers, stream keys, WebSocket frames
//! and close codes.
//!
//! Everything a client and a server must agree on lives here, so the
//! connect-node, the Rust client and the tests share one definition. The
//! JSON text frames are the default; [`binary`] has the compact binary
//! frames of the `barrage.v1.bin` subprotocol. The
//! wire format is documented for other languages in `docs/protocol.md`.

pub mod binary;
mod close;
mod frame;
mod ids;

pub use close::CloseCode;
pub use frame::{
    ClientFrame, FrameError, MessageFrame, MessageParts, ServerFrame, StreamState, encode_message,
    format_positions, parse_client_frame, parse_positions,
};
pub use ids::{IdError, MAX_ID_LEN, NodeId, RoomId, StreamKey, StreamPos, UserId};
