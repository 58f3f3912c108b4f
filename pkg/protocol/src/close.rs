//! WebSocket close codes: part of the protocol. The range tells a client
//! what to do next; `docs/protocol.md` has the table.
//!
//! * `4000..=4099`: transient, reconnect (with backoff).
//! * `4100..=4199`: reconnect **and recover** from the last position (the
//!   server dropped frames for this connection).
//! * `4400..=4499`: do not reconnect with the same credentials.

/// A close code barrage sends, with its documented meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum CloseCode {
    /// 1000: normal closure (the client asked to leave).
    Normal = 1000,
    /// 1006: the connection ended without a close frame (the network
    /// failed, or the client went away). Never sent: only counted.
    Abnormal = 1006,
    /// 1009: a frame exceeded the server's inbound size limit.
    MessageTooBig = 1009,
    /// 4000: the node is shutting down; reconnect, preferably elsewhere.
    Shutdown = 4000,
    /// 4001: no frame from the client within the read timeout.
    ReadTimeout = 4001,
    /// 4002: internal server error; reconnect with backoff.
    InternalError = 4002,
    /// 4100: the connection's send queue overflowed (slow consumer);
    /// reconnect and recover from the last position.
    SlowConsumer = 4100,
    /// 4101: the cluster stopped routing pushes to this node for a while
    /// (it was dropped from discovery, or silent to a controller), so the
    /// connection may have missed messages; reconnect and recover.
    MissedPushes = 4101,
    /// 4400: the client sent something that is not a barrage frame
    /// (e.g. a binary frame on a JSON connection).
    InvalidFrame = 4400,
    /// 4401: authentication failed.
    Unauthorized = 4401,
    /// 4403: not allowed.
    Forbidden = 4403,
    /// 4405: the connection's token expired and was not refreshed.
    TokenExpired = 4405,
    /// 4409: kicked by an operator.
    Kicked = 4409,
}

impl CloseCode {
    /// The numeric code sent on the wire.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// Maps a numeric code back, if it is one barrage defines.
    pub fn from_code(code: u16) -> Option<Self> {
        use CloseCode::*;
        [
            Normal,
            Abnormal,
            MessageTooBig,
            Shutdown,
            ReadTimeout,
            InternalError,
            SlowConsumer,
            MissedPushes,
            InvalidFrame,
            Unauthorized,
            Forbidden,
            TokenExpired,
            Kicked,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// Whether a client should reconnect after this code.
    pub fn should_reconnect(code: u16) -> bool {
        !(4400..=4499).contains(&code) && code != 1000
    }

    /// Whether a client should resume from its last positions after this code.
    pub fn should_recover(code: u16) -> bool {
        (4100..=4199).contains(&code)
    }

    /// Short reason text sent with the close frame.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "bye",
            CloseCode::Abnormal => "connection lost",
            CloseCode::MessageTooBig => "frame too big",
            CloseCode::Shutdown => "server shutting down, reconnect",
            CloseCode::ReadTimeout => "read timeout",
            CloseCode::InternalError => "internal error",
            CloseCode::SlowConsumer => "slow consumer, reconnect and recover",
            CloseCode::MissedPushes => "node was cut off from the cluster, reconnect and recover",
            CloseCode::InvalidFrame => "invalid frame",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Forbidden => "forbidden",
            CloseCode::TokenExpired => "token expired",
            CloseCode::Kicked => "kicked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_say_what_to_do() {
        assert!(CloseCode::should_reconnect(CloseCode::Shutdown.code()));
        assert!(CloseCode::should_reconnect(CloseCode::SlowConsumer.code()));
        assert!(CloseCode::should_recover(CloseCode::SlowConsumer.code()));
        assert!(!CloseCode::should_recover(CloseCode::Shutdown.code()));
        assert!(!CloseCode::should_reconnect(CloseCode::Unauthorized.code()));
        assert!(!CloseCode::should_reconnect(CloseCode::Normal.code()));
        assert_eq!(CloseCode::from_code(4100), Some(CloseCode::SlowConsumer));
        assert_eq!(CloseCode::from_code(4101), Some(CloseCode::MissedPushes));
        assert!(CloseCode::should_recover(CloseCode::MissedPushes.code()));
        assert_eq!(CloseCode::from_code(4999), None);
    }
}
