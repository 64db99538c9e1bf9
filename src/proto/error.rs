//! Errors of decoding (and, rarely, encoding) protocol frames.

use std::fmt;

/// What went wrong with a frame. Produced for any byte sequence that is not a
/// valid frame stream; decoding never panics.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProtoError {
    /// The frame does not start with the protocol magic: the peer does not
    /// speak this protocol, or the stream lost its framing.
    BadMagic {
        /// The four bytes found where the magic should be.
        found: [u8; 4],
    },
    /// The frame's protocol version is not one this build accepts.
    UnsupportedVersion {
        /// The version in the frame header.
        found: u16,
        /// The oldest version accepted.
        min: u16,
        /// The newest version accepted.
        max: u16,
    },
    /// The frame type is not known to this build.
    UnknownFrameType(u16),
    /// The payload length exceeds [`super::MAX_FRAME_PAYLOAD`].
    TooLarge {
        /// The announced payload length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    Truncated {
        /// Bytes the frame needed.
        expected: usize,
        /// Bytes that were there.
        got: usize,
    },
    /// A frame's payload is not valid for its type (bad JSON, invalid UTF-8,
    /// missing fields, bytes where none are allowed, a value out of range).
    InvalidPayload {
        /// The frame type.
        frame: super::FrameType,
        /// Why it is invalid.
        reason: String,
    },
    /// A well-formed frame arrived where the protocol does not allow it.
    UnexpectedFrame {
        /// The frame type received.
        got: super::FrameType,
        /// What the receiver was waiting for.
        expected: &'static str,
    },
    /// The underlying stream failed.
    Io(std::io::Error),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic { found } => write!(
                f,
                "bad frame magic {found:02x?} (expected {:02x?}): the peer does not speak the \
                 dormouse agent protocol or the stream is corrupt; reconnect",
                super::MAGIC
            ),
            Self::UnsupportedVersion { found, min, max } => write!(
                f,
                "unsupported protocol version {found} (this side accepts {min}..={max}): \
                 rebuild the guest template so host and agent come from the same release"
            ),
            Self::UnknownFrameType(t) => write!(
                f,
                "unknown frame type {t}: the peer is newer or corrupt; rebuild the guest \
                 template so host and agent come from the same release"
            ),
            Self::TooLarge { len, max } => write!(
                f,
                "frame payload of {len} bytes exceeds the limit of {max} bytes; the peer must \
                 split data into smaller frames"
            ),
            Self::Truncated { expected, got } => write!(
                f,
                "stream ended inside a frame ({got} of {expected} bytes): the peer closed the \
                 connection mid-frame"
            ),
            Self::InvalidPayload { frame, reason } => {
                write!(f, "invalid {frame:?} frame payload: {reason}")
            }
            Self::UnexpectedFrame { got, expected } => write!(
                f,
                "unexpected {got:?} frame while waiting for {expected}: the peer violates the \
                 protocol"
            ),
            Self::Io(e) => write!(f, "I/O error on the agent stream: {e}"),
        }
    }
}

impl std::error::Error for ProtoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ProtoError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}
