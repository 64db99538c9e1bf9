//! The wire protocol shared by the host and the guest agent.
//!
//! This module is compiled twice: into the host crate (as `dormouse::proto`)
//! and into the guest agent (through a `#[path]` module). It therefore uses
//! only `std`, `serde` and `serde_json`: no async runtime, no `libc`, no
//! `crate::` paths.
//!
//! # Connections
//!
//! The host opens one stream per request (a virtio-vsock connection to
//! [`AGENT_VSOCK_PORT`] in a VM, a Unix socket in development). Each stream
//! starts with a [`Hello`] from the host, answered by a [`HelloAck`] (or an
//! [`ErrorMsg`] when the versions cannot agree), and then carries exactly one
//! request:
//!
//! - [`Frame::Ping`] is answered by [`Frame::Pong`] with the same nonce.
//! - [`Frame::Exec`] starts a command. When its [`StdinMode`] is
//!   [`StdinMode::Pipe`], the host follows it with any number of
//!   [`Frame::Stdin`] chunks and one [`Frame::StdinEof`]. The agent answers
//!   with [`Frame::Stdout`] / [`Frame::Stderr`] chunks as the command writes
//!   them and ends with one [`Frame::Exit`], or with one [`Frame::Error`] when
//!   the command could not run. Closing the stream cancels the command (the
//!   agent kills its process group).
//!
//! The host may send the `Hello` and the request back to back without
//! waiting for the `HelloAck` (the agent reads them in order), which saves a
//! round trip per request.
//!
//! # Frames
//!
//! Every frame is a fixed [`HEADER_LEN`]-byte header followed by its payload:
//!
//! | offset | size | field                                           |
//! |-------:|-----:|-------------------------------------------------|
//! | 0      | 4    | magic, [`MAGIC`] (`b"DMSE"`)                    |
//! | 4      | 2    | protocol version, little endian                 |
//! | 6      | 2    | frame type ([`FrameType`]), little endian       |
//! | 8      | 4    | payload length, little endian, at most [`MAX_FRAME_PAYLOAD`] |
//!
//! Control frames carry small JSON objects; data frames (`Stdin`, `Stdout`,
//! `Stderr`) carry raw bytes. Every header field is validated before any
//! payload buffer is allocated, so hostile bytes give a [`ProtoError`] and
//! never a panic or an oversized allocation.
//!
//! # Evolution
//!
//! New requests (file operations, the code interpreter, port forwarding,
//! signals, background processes, clock sync) are new [`FrameType`] values;
//! new optional fields of JSON messages carry `#[serde(default)]` so older
//! peers keep parsing them. The agent lists what it implements in
//! [`HelloAck::capabilities`]. [`PROTOCOL_VERSION`] changes only when the
//! framing itself or the meaning of an existing message changes.

mod codec;
mod error;
mod messages;
mod services;
#[cfg(test)]
mod tests;

pub use codec::{
    decode, decode_header, encode, encode_header, write_frame, write_raw_frame, Decoder,
    FrameReader, Header,
};
pub use error::ProtoError;
pub use messages::{
    ErrorKind, ErrorMsg, Exec, ExitStatus, Frame, FrameType, Hello, HelloAck, Ping, StdinMode,
};
pub use services::{
    CodeEnd, CodeError, CodeRequest, CodeResult, ContextInfo, EntryInfo, EntryKind, FileEvent,
    FileEventKind, FileRequest, Forward, ProcessInfo, ProcessRequest, Started, Sync, MAX_CODE,
    MAX_LIST_DEPTH, MAX_PATH, MAX_SYNC_ENTROPY,
};

/// The vsock port the guest agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The protocol version this build speaks (written in every frame header).
pub const PROTOCOL_VERSION: u16 = 1;

/// The oldest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"DMSE";

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// The largest payload a frame may carry (1 MiB). Larger data is split into
/// several data frames.
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

/// The largest data chunk a sender should put in one `Stdin`, `Stdout` or
/// `Stderr` frame (256 KiB): big enough to keep the number of (slow, emulated)
/// guest system calls low, small enough to stream.
pub const DATA_CHUNK: usize = 256 * 1024;

/// Capability names an agent reports in [`HelloAck::capabilities`].
pub mod capability {
    /// The agent answers [`super::Frame::Ping`].
    pub const PING: &str = "ping";
    /// The agent runs [`super::Frame::Exec`] requests.
    pub const EXEC: &str = "exec";
    /// The agent answers [`super::Frame::ProcessRequest`]s and honours
    /// `Exec`'s `background`, `report_pid` and `timeout_ms`.
    pub const PROCESSES: &str = "processes";
    /// The agent answers [`super::Frame::FileRequest`]s.
    pub const FILES: &str = "files";
    /// The agent answers [`super::Frame::CodeRequest`]s (Python).
    pub const CODE: &str = "code";
    /// The agent answers [`super::Frame::Forward`].
    pub const FORWARD: &str = "forward";
    /// The agent answers [`super::Frame::Sync`].
    pub const SYNC: &str = "sync";
}
