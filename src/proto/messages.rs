//! Frame types and the messages they carry.

use serde::{Deserialize, Serialize};

use super::services::{
    CodeEnd, CodeError, CodeRequest, CodeResult, ContextInfo, EntryInfo, FileEvent, FileRequest,
    Forward, ProcessInfo, ProcessRequest, Started, Sync,
};
use super::ProtoError;

/// The type of a frame, the `u16` at offset 6 of the header.
///
/// Values are grouped by concern: 1-15 connection control, 16-31 commands,
/// 32-47 files, 48-63 code interpreter, 64-79 port forwarding, 80-95
/// system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FrameType {
    /// Host -> agent: opens a connection, JSON [`Hello`].
    Hello,
    /// Agent -> host: accepts the connection, JSON [`HelloAck`].
    HelloAck,
    /// Host -> agent: liveness check, JSON [`Ping`].
    Ping,
    /// Agent -> host: answer to a ping, JSON [`Ping`] with the same nonce.
    Pong,
    /// Agent -> host: the request failed, JSON [`ErrorMsg`].
    Error,
    /// Host -> agent: run a command, JSON [`Exec`].
    Exec,
    /// Host -> agent: raw bytes for the command's standard input.
    Stdin,
    /// Host -> agent: the command's standard input ends (empty payload).
    StdinEof,
    /// Agent -> host: raw bytes the command wrote to standard output.
    Stdout,
    /// Agent -> host: raw bytes the command wrote to standard error.
    Stderr,
    /// Agent -> host: the command ended, JSON [`ExitStatus`].
    Exit,
    /// Either way: the request (or the host's part of it) is complete;
    /// empty payload.
    Done,
    /// Agent -> host: the command started, JSON [`Started`].
    Started,
    /// Host -> agent: a request about a running command, JSON
    /// [`ProcessRequest`].
    ProcessRequest,
    /// Agent -> host: a running command, JSON [`ProcessInfo`].
    Process,
    /// Host -> agent: a file operation, JSON [`FileRequest`].
    FileRequest,
    /// Agent -> host: a file's metadata, JSON [`EntryInfo`].
    Entry,
    /// Either way: raw bytes of a file.
    Data,
    /// Agent -> host: a change under a watched directory, JSON [`FileEvent`].
    FileEvent,
    /// Host -> agent: a code-interpreter request, JSON [`CodeRequest`].
    CodeRequest,
    /// Agent -> host: the value of a run's last expression, JSON
    /// [`CodeResult`].
    CodeResult,
    /// Agent -> host: the exception a run raised, JSON [`CodeError`].
    CodeError,
    /// Agent -> host: a run ended, JSON [`CodeEnd`].
    CodeEnd,
    /// Agent -> host: an interpreter context, JSON [`ContextInfo`].
    Context,
    /// Host -> agent: splice this stream with a guest TCP port, JSON
    /// [`Forward`].
    Forward,
    /// Host -> agent: set the clock and feed entropy, JSON [`Sync`].
    Sync,
}

impl FrameType {
    /// Every frame type, in wire-value order.
    pub const ALL: [FrameType; 26] = [
        Self::Hello,
        Self::HelloAck,
        Self::Ping,
        Self::Pong,
        Self::Error,
        Self::Exec,
        Self::Stdin,
        Self::StdinEof,
        Self::Stdout,
        Self::Stderr,
        Self::Exit,
        Self::Done,
        Self::Started,
        Self::ProcessRequest,
        Self::Process,
        Self::FileRequest,
        Self::Entry,
        Self::Data,
        Self::FileEvent,
        Self::CodeRequest,
        Self::CodeResult,
        Self::CodeError,
        Self::CodeEnd,
        Self::Context,
        Self::Forward,
        Self::Sync,
    ];

    /// The wire value.
    pub const fn to_u16(self) -> u16 {
        match self {
            Self::Hello => 1,
            Self::HelloAck => 2,
            Self::Ping => 3,
            Self::Pong => 4,
            Self::Error => 5,
            Self::Exec => 16,
            Self::Stdin => 17,
            Self::StdinEof => 18,
            Self::Stdout => 19,
            Self::Stderr => 20,
            Self::Exit => 21,
            Self::Done => 6,
            Self::Started => 22,
            Self::ProcessRequest => 23,
            Self::Process => 24,
            Self::FileRequest => 32,
            Self::Entry => 33,
            Self::Data => 34,
            Self::FileEvent => 35,
            Self::CodeRequest => 48,
            Self::CodeResult => 49,
            Self::CodeError => 50,
            Self::CodeEnd => 51,
            Self::Context => 52,
            Self::Forward => 64,
            Self::Sync => 80,
        }
    }

    /// The frame type of a wire value, `None` when unknown.
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::Ping,
            4 => Self::Pong,
            5 => Self::Error,
            16 => Self::Exec,
            17 => Self::Stdin,
            18 => Self::StdinEof,
            19 => Self::Stdout,
            20 => Self::Stderr,
            21 => Self::Exit,
            6 => Self::Done,
            22 => Self::Started,
            23 => Self::ProcessRequest,
            24 => Self::Process,
            32 => Self::FileRequest,
            33 => Self::Entry,
            34 => Self::Data,
            35 => Self::FileEvent,
            48 => Self::CodeRequest,
            49 => Self::CodeResult,
            50 => Self::CodeError,
            51 => Self::CodeEnd,
            52 => Self::Context,
            64 => Self::Forward,
            80 => Self::Sync,
            _ => return None,
        })
    }

    /// Whether the payload is raw bytes (as opposed to JSON or empty).
    pub const fn is_data(self) -> bool {
        matches!(self, Self::Stdin | Self::Stdout | Self::Stderr | Self::Data)
    }

    /// Whether the payload is always empty.
    pub const fn is_empty(self) -> bool {
        matches!(self, Self::StdinEof | Self::Done)
    }
}

/// Opens a connection (host -> agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The oldest protocol version the host accepts.
    pub min_version: u16,
    /// The newest protocol version the host speaks.
    pub max_version: u16,
    /// Free-form name and version of the host library, for the agent's log.
    #[serde(default)]
    pub client: String,
}

impl Default for Hello {
    fn default() -> Self {
        Self {
            min_version: super::MIN_PROTOCOL_VERSION,
            max_version: super::PROTOCOL_VERSION,
            client: String::new(),
        }
    }
}

/// Accepts a connection (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The protocol version chosen for this connection.
    pub version: u16,
    /// The agent's own version (its crate version).
    pub agent_version: String,
    /// What the agent implements, names from [`super::capability`].
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Whether the agent runs as PID 1 (in a VM) rather than in development
    /// mode on a host.
    #[serde(default)]
    pub init: bool,
}

/// A liveness check; the answer carries the same nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    /// Chosen by the host, echoed by the agent.
    pub nonce: u64,
}

/// Why a request failed, as reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// The command (argv\[0\]) was not found on `PATH` or does not exist.
    NotFound,
    /// The command exists but may not be executed.
    PermissionDenied,
    /// The requested working directory does not exist or is not a directory.
    CwdNotFound,
    /// The request is malformed (empty argv, NUL bytes, bad env names...).
    InvalidRequest,
    /// The host and agent have no protocol version in common.
    UnsupportedVersion,
    /// The peer violated the protocol (bad frame, unexpected frame).
    Protocol,
    /// Starting the command failed for another reason (out of memory, too
    /// many processes, bad executable format...).
    Spawn,
    /// The path is a directory where a file was expected.
    IsADirectory,
    /// A component of the path is not a directory where one was expected.
    NotADirectory,
    /// The path exists already.
    AlreadyExists,
    /// Nothing listens on the guest port.
    ConnectionRefused,
    /// The guest ran out of disk space.
    NoSpace,
    /// The agent failed internally (I/O error on its side).
    Internal,
    /// A kind this build does not know (sent by a newer peer).
    #[serde(other)]
    Other,
}

/// A failed request (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// The category, for programs.
    pub kind: ErrorKind,
    /// A sentence for people.
    pub message: String,
}

/// Where a command's standard input comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StdinMode {
    /// `/dev/null`.
    #[default]
    Null,
    /// A pipe fed by the host's [`Frame::Stdin`] frames, closed by
    /// [`Frame::StdinEof`].
    Pipe,
}

/// Runs a command (host -> agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    /// The program and its arguments; `argv[0]` without a `/` is looked up in
    /// the `PATH` of the command's environment.
    pub argv: Vec<String>,
    /// Variables added to (or replacing those of) the agent's base
    /// environment (`PATH`, `HOME`, `LANG`...).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory; the agent's (`/`) when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Where standard input comes from.
    #[serde(default)]
    pub stdin: StdinMode,
    /// Send a [`Frame::Started`] with the pid before any output.
    #[serde(default)]
    pub report_pid: bool,
    /// Keep the command running when this stream closes (it can be
    /// reached again with [`ProcessRequest::Connect`]); otherwise closing
    /// the stream kills it.
    #[serde(default)]
    pub background: bool,
    /// Kill the command's process group after this many milliseconds; its
    /// `Exit` then has `timed_out` set.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// A label of the caller's, shown by [`ProcessRequest::List`].
    #[serde(default)]
    pub tag: Option<String>,
    /// Run as this user of the guest's `/etc/passwd` (its uid, gid, groups,
    /// `HOME`, `USER`, `LOGNAME`); as the agent (root) when absent.
    #[serde(default)]
    pub user: Option<String>,
}

impl Exec {
    /// Checks what the agent needs to run the command: a non-empty `argv[0]`,
    /// no NUL bytes anywhere, environment names non-empty and without `=`,
    /// a non-empty `cwd`. Returns a sentence saying what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match self.argv.first() {
            None => return Err("argv is empty: give at least the program name".into()),
            Some(a) if a.is_empty() => return Err("argv[0] is empty: give the program name".into()),
            Some(_) => {}
        }
        if let Some(i) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(format!(
                "argv[{i}] contains a NUL byte, which a command line cannot hold"
            ));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(format!(
                    "environment variable name {k:?} is invalid: it must be non-empty and \
                     contain neither '=' nor NUL"
                ));
            }
            if v.contains('\0') {
                return Err(format!(
                    "environment variable {k} contains a NUL byte in its value"
                ));
            }
        }
        if let Some(tag) = &self.tag {
            if tag.contains('\0') || tag.len() > 256 {
                return Err("the tag must be at most 256 bytes without NUL".into());
            }
        }
        if let Some(user) = &self.user {
            let valid = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if user.is_empty() || user.len() > 32 || !user.chars().all(valid) {
                return Err(format!(
                    "user name {user:?} is invalid: use 1 to 32 letters, digits, '.', '_' or '-'"
                ));
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.contains('\0') {
                return Err(format!(
                    "working directory {cwd:?} is invalid: it must be non-empty without NUL"
                ));
            }
        }
        Ok(())
    }
}

/// How a command ended (agent -> host). Exactly one field is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code (0..=255) when the command exited.
    pub code: Option<i32>,
    /// The signal number (1..=64) when a signal killed the command.
    pub signal: Option<i32>,
    /// Whether the agent killed it because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    /// A normal exit with `code`.
    pub const fn exited(code: i32) -> Self {
        Self {
            code: Some(code),
            signal: None,
            timed_out: false,
        }
    }

    /// Death by `signal`.
    pub const fn signaled(signal: i32) -> Self {
        Self {
            code: None,
            signal: Some(signal),
            timed_out: false,
        }
    }

    /// Whether the command exited with code 0.
    pub const fn success(&self) -> bool {
        matches!(self.code, Some(0))
    }

    /// Checks that exactly one field is set and in range.
    pub fn validate(&self) -> Result<(), String> {
        match (self.code, self.signal) {
            (Some(c), None) if (0..=255).contains(&c) => Ok(()),
            (None, Some(s)) if (1..=64).contains(&s) => Ok(()),
            (code, signal) => Err(format!(
                "exit status must have exactly one of an exit code in 0..=255 or a signal in \
                 1..=64, got code {code:?} and signal {signal:?}"
            )),
        }
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// See [`FrameType::Hello`].
    Hello(Hello),
    /// See [`FrameType::HelloAck`].
    HelloAck(HelloAck),
    /// See [`FrameType::Ping`].
    Ping(Ping),
    /// See [`FrameType::Pong`].
    Pong(Ping),
    /// See [`FrameType::Error`].
    Error(ErrorMsg),
    /// See [`FrameType::Exec`].
    Exec(Exec),
    /// See [`FrameType::Stdin`].
    Stdin(Vec<u8>),
    /// See [`FrameType::StdinEof`].
    StdinEof,
    /// See [`FrameType::Stdout`].
    Stdout(Vec<u8>),
    /// See [`FrameType::Stderr`].
    Stderr(Vec<u8>),
    /// See [`FrameType::Exit`].
    Exit(ExitStatus),
    /// See [`FrameType::Done`].
    Done,
    /// See [`FrameType::Started`].
    Started(Started),
    /// See [`FrameType::ProcessRequest`].
    ProcessRequest(ProcessRequest),
    /// See [`FrameType::Process`].
    Process(ProcessInfo),
    /// See [`FrameType::FileRequest`].
    FileRequest(FileRequest),
    /// See [`FrameType::Entry`].
    Entry(EntryInfo),
    /// See [`FrameType::Data`].
    Data(Vec<u8>),
    /// See [`FrameType::FileEvent`].
    FileEvent(FileEvent),
    /// See [`FrameType::CodeRequest`].
    CodeRequest(CodeRequest),
    /// See [`FrameType::CodeResult`].
    CodeResult(CodeResult),
    /// See [`FrameType::CodeError`].
    CodeError(CodeError),
    /// See [`FrameType::CodeEnd`].
    CodeEnd(CodeEnd),
    /// See [`FrameType::Context`].
    Context(ContextInfo),
    /// See [`FrameType::Forward`].
    Forward(Forward),
    /// See [`FrameType::Sync`].
    Sync(Sync),
}

impl Frame {
    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Self::Hello(_) => FrameType::Hello,
            Self::HelloAck(_) => FrameType::HelloAck,
            Self::Ping(_) => FrameType::Ping,
            Self::Pong(_) => FrameType::Pong,
            Self::Error(_) => FrameType::Error,
            Self::Exec(_) => FrameType::Exec,
            Self::Stdin(_) => FrameType::Stdin,
            Self::StdinEof => FrameType::StdinEof,
            Self::Stdout(_) => FrameType::Stdout,
            Self::Stderr(_) => FrameType::Stderr,
            Self::Exit(_) => FrameType::Exit,
            Self::Done => FrameType::Done,
            Self::Started(_) => FrameType::Started,
            Self::ProcessRequest(_) => FrameType::ProcessRequest,
            Self::Process(_) => FrameType::Process,
            Self::FileRequest(_) => FrameType::FileRequest,
            Self::Entry(_) => FrameType::Entry,
            Self::Data(_) => FrameType::Data,
            Self::FileEvent(_) => FrameType::FileEvent,
            Self::CodeRequest(_) => FrameType::CodeRequest,
            Self::CodeResult(_) => FrameType::CodeResult,
            Self::CodeError(_) => FrameType::CodeError,
            Self::CodeEnd(_) => FrameType::CodeEnd,
            Self::Context(_) => FrameType::Context,
            Self::Forward(_) => FrameType::Forward,
            Self::Sync(_) => FrameType::Sync,
        }
    }

    /// Convenience constructor of an error frame.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Error(ErrorMsg {
            kind,
            message: message.into(),
        })
    }

    /// Appends the payload bytes of this frame to `out`.
    pub(super) fn write_payload(&self, out: &mut Vec<u8>) -> Result<(), ProtoError> {
        let written = match self {
            Self::Hello(m) => serde_json::to_writer(&mut *out, m),
            Self::HelloAck(m) => serde_json::to_writer(&mut *out, m),
            Self::Ping(m) | Self::Pong(m) => serde_json::to_writer(&mut *out, m),
            Self::Error(m) => serde_json::to_writer(&mut *out, m),
            Self::Exec(m) => serde_json::to_writer(&mut *out, m),
            Self::Exit(m) => serde_json::to_writer(&mut *out, m),
            Self::Started(m) => serde_json::to_writer(&mut *out, m),
            Self::ProcessRequest(m) => serde_json::to_writer(&mut *out, m),
            Self::Process(m) => serde_json::to_writer(&mut *out, m),
            Self::FileRequest(m) => serde_json::to_writer(&mut *out, m),
            Self::Entry(m) => serde_json::to_writer(&mut *out, m),
            Self::FileEvent(m) => serde_json::to_writer(&mut *out, m),
            Self::CodeRequest(m) => serde_json::to_writer(&mut *out, m),
            Self::CodeResult(m) => serde_json::to_writer(&mut *out, m),
            Self::CodeError(m) => serde_json::to_writer(&mut *out, m),
            Self::CodeEnd(m) => serde_json::to_writer(&mut *out, m),
            Self::Context(m) => serde_json::to_writer(&mut *out, m),
            Self::Forward(m) => serde_json::to_writer(&mut *out, m),
            Self::Sync(m) => serde_json::to_writer(&mut *out, m),
            Self::Stdin(d) | Self::Stdout(d) | Self::Stderr(d) | Self::Data(d) => {
                out.extend_from_slice(d);
                Ok(())
            }
            Self::StdinEof | Self::Done => Ok(()),
        };
        written.map_err(|e| invalid(self.frame_type(), format!("cannot encode as JSON: {e}")))
    }

    /// Parses and validates the payload of a frame of type `ty`.
    pub(super) fn from_payload(ty: FrameType, payload: &[u8]) -> Result<Self, ProtoError> {
        fn json<'a, T: Deserialize<'a>>(ty: FrameType, p: &'a [u8]) -> Result<T, ProtoError> {
            serde_json::from_slice(p).map_err(|e| invalid(ty, e.to_string()))
        }
        /// JSON with a `validate` check.
        macro_rules! checked {
            ($variant:ident) => {{
                let m = json(ty, payload)?;
                super::services::Validate::check(&m).map_err(|r| invalid(ty, r))?;
                Self::$variant(m)
            }};
        }
        let frame = match ty {
            FrameType::Hello => Self::Hello(json(ty, payload)?),
            FrameType::HelloAck => Self::HelloAck(json(ty, payload)?),
            FrameType::Ping => Self::Ping(json(ty, payload)?),
            FrameType::Pong => Self::Pong(json(ty, payload)?),
            FrameType::Error => Self::Error(json(ty, payload)?),
            FrameType::Exec => {
                let exec: Exec = json(ty, payload)?;
                exec.validate().map_err(|r| invalid(ty, r))?;
                Self::Exec(exec)
            }
            FrameType::Exit => {
                let status: ExitStatus = json(ty, payload)?;
                status.validate().map_err(|r| invalid(ty, r))?;
                Self::Exit(status)
            }
            FrameType::Stdin => Self::Stdin(payload.to_vec()),
            FrameType::Stdout => Self::Stdout(payload.to_vec()),
            FrameType::Stderr => Self::Stderr(payload.to_vec()),
            FrameType::Data => Self::Data(payload.to_vec()),
            FrameType::StdinEof | FrameType::Done => {
                if !payload.is_empty() {
                    return Err(invalid(
                        ty,
                        format!("must be empty, has {} bytes", payload.len()),
                    ));
                }
                if ty == FrameType::Done {
                    Self::Done
                } else {
                    Self::StdinEof
                }
            }
            FrameType::Started => checked!(Started),
            FrameType::ProcessRequest => checked!(ProcessRequest),
            FrameType::Process => checked!(Process),
            FrameType::FileRequest => checked!(FileRequest),
            FrameType::Entry => checked!(Entry),
            FrameType::FileEvent => checked!(FileEvent),
            FrameType::CodeRequest => checked!(CodeRequest),
            FrameType::CodeResult => Self::CodeResult(json(ty, payload)?),
            FrameType::CodeError => Self::CodeError(json(ty, payload)?),
            FrameType::CodeEnd => Self::CodeEnd(json(ty, payload)?),
            FrameType::Context => checked!(Context),
            FrameType::Forward => checked!(Forward),
            FrameType::Sync => checked!(Sync),
        };
        Ok(frame)
    }
}

fn invalid(frame: FrameType, reason: String) -> ProtoError {
    ProtoError::InvalidPayload { frame, reason }
}
