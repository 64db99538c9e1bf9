//! Host side of the guest-agent protocol: an async client over any byte
//! stream.
//!
//! Each function takes a freshly opened stream to the agent (a vsock
//! connection handed out by the VMM, a Unix socket to a development agent),
//! performs the [`proto`] handshake and one request, and
//! consumes the stream. Everything the guest sends is validated: the guest
//! is untrusted. Timeouts are the caller's (wrap a call in
//! `tokio::time::timeout`); dropping the future or the stream cancels the
//! request, and the agent then kills the command's process group.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dormouse::agent::AgentError> {
//! use dormouse::agent::{exec, ExecRequest};
//! let stream = tokio::net::UnixStream::connect("/tmp/agent.sock").await?;
//! let out = exec(stream, ExecRequest::shell("echo hello")).await?;
//! assert_eq!(out.stdout, b"hello\n");
//! assert_eq!(out.exit_code, Some(0));
//! # Ok(()) }
//! ```

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::proto::{
    self, encode, Decoder, Exec, Frame, Hello, HelloAck, Ping, ProtoError, StdinMode, DATA_CHUNK,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use crate::proto::{ErrorKind, ExitStatus};

pub mod code;
pub mod files;
pub mod ports;
pub mod process;
#[cfg(test)]
mod tests;

/// The default cap on a collected command's output (stdout and stderr
/// together): 64 MiB.
pub const DEFAULT_MAX_OUTPUT: usize = 64 << 20;

/// Size of one read from the agent stream.
const READ_CHUNK: usize = 64 * 1024;

/// Errors of a request to the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The agent closed the stream (or the stream broke) before answering.
    #[error(
        "the guest agent closed the connection {during}; the guest may have stopped, crashed or \
         been paused: check the guest console, then reconnect and retry"
    )]
    Disconnected {
        /// What the client was waiting for.
        during: &'static str,
    },
    /// The agent sent bytes that violate the protocol.
    #[error("the guest agent violated the protocol: {0}")]
    Protocol(#[from] ProtoError),
    /// The agent could not carry out the request and said why.
    #[error("the guest agent refused the request ({kind:?}): {message}")]
    Remote {
        /// The category.
        kind: ErrorKind,
        /// The agent's explanation (guest-controlled text).
        message: String,
    },
    /// The agent speaks a protocol version this host does not support.
    #[error(
        "the guest agent chose protocol version {version}, but this host supports \
         {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; rebuild the guest template with this \
         release of dormouse"
    )]
    IncompatibleAgent {
        /// The version the agent chose.
        version: u16,
    },
    /// A command or code run wrote more than its output limit
    /// ([`ExecRequest::max_output`], or the code interpreter's limit).
    #[error(
        "the output exceeded the limit of {limit} bytes; raise the limit \
         (Command::max_output), receive the output as a stream instead of \
         collecting it (CommandHandle::next, or an output channel for run_code), \
         or redirect it to a file in the guest"
    )]
    OutputTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The request cannot be sent as it is.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The receiver of [`exec_streaming`]'s chunks was dropped; the command
    /// was abandoned (and is killed by the agent).
    #[error("the output receiver was dropped, so the command was abandoned")]
    ReceiverDropped,
    /// A file is larger than the caller's limit ([`files::read_to_vec`]).
    #[error(
        "the file is larger than the limit of {limit} bytes; raise the limit or stream it with \
         files::read"
    )]
    FileTooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The caller's reader or writer of a file transfer failed
    /// ([`files::write`], [`files::read`]); a write left the guest's file
    /// unchanged.
    #[error("the host-side source or destination of the file transfer failed: {0}")]
    Transfer(#[source] io::Error),
    /// The stream failed for a reason other than the peer going away.
    #[error("I/O error on the guest agent stream: {0}")]
    Io(#[source] io::Error),
}

impl From<io::Error> for AgentError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// What the agent said about itself in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The protocol version in use on this connection.
    pub protocol_version: u16,
    /// The agent's release (guest-controlled text).
    pub agent_version: String,
    /// What the agent implements ([`proto::capability`] names).
    pub capabilities: Vec<String>,
    /// Whether the agent runs as PID 1 of a VM.
    pub init: bool,
}

impl AgentInfo {
    /// Whether the agent reported capability `name`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments; `argv[0]` without a `/` is looked up
    /// in the command's `PATH`.
    pub argv: Vec<String>,
    /// Environment variables added to (or replacing) the agent's defaults.
    pub env: Vec<(String, String)>,
    /// The working directory (the guest's `/` when `None`).
    pub cwd: Option<String>,
    /// Bytes for standard input (`/dev/null` when `None`).
    pub stdin: Option<Vec<u8>>,
    /// The most output (stdout and stderr together) [`exec`] collects
    /// before failing with [`AgentError::OutputTooLarge`].
    pub max_output: usize,
    /// Keep running when the connection closes ([`process::start`]).
    pub background: bool,
    /// Leave standard input open after the [`Self::stdin`] data (a pipe
    /// even without data), for [`process::send_stdin`].
    pub keep_stdin_open: bool,
    /// The agent kills the command after this long.
    pub timeout: Option<std::time::Duration>,
    /// A label shown by [`process::list`].
    pub tag: Option<String>,
    /// The guest user to run as (root when `None`).
    pub user: Option<String>,
}

impl ExecRequest {
    /// Runs `argv` directly (no shell).
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            stdin: None,
            max_output: DEFAULT_MAX_OUTPUT,
            background: false,
            keep_stdin_open: false,
            timeout: None,
            tag: None,
            user: None,
        }
    }

    /// Runs `command` with `/bin/sh -c`.
    pub fn shell(command: impl Into<String>) -> Self {
        Self::new(["/bin/sh".to_string(), "-c".to_string(), command.into()])
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Runs the command as `name`, a user of the guest's `/etc/passwd`
    /// (the default template has `root` and the unprivileged `user`, whose
    /// home is `/home/user`): its uid, gid and groups, with `HOME`, `USER`
    /// and `LOGNAME` set (unless [`Self::env`] sets them). Root by default.
    /// An unknown user fails with a remote `NotFound`.
    ///
    /// ```no_run
    /// # async fn demo(sbx: &dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// let out = sbx.commands().exec(dormouse::Command::shell("id -un").user("user")).await?;
    /// assert_eq!(out.stdout, "user\n");
    /// # Ok(()) }
    /// ```
    pub fn user(mut self, name: impl Into<String>) -> Self {
        self.user = Some(name.into());
        self
    }

    /// Sets the bytes fed to standard input.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// Sets the output cap of [`exec`].
    pub fn max_output(mut self, bytes: usize) -> Self {
        self.max_output = bytes;
        self
    }

    /// Keeps the command running after its connection closes.
    pub fn background(mut self, yes: bool) -> Self {
        self.background = yes;
        self
    }

    /// Leaves standard input open (a pipe) for later writes.
    pub fn keep_stdin_open(mut self, yes: bool) -> Self {
        self.keep_stdin_open = yes;
        self
    }

    /// Has the agent kill the command after `timeout`.
    pub fn timeout(mut self, timeout: std::time::Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sets the label shown by [`process::list`].
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = Some(tag.into());
        self
    }

    fn to_wire(&self) -> Result<Exec, AgentError> {
        let exec = Exec {
            argv: self.argv.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            stdin: if self.stdin.is_some() || self.keep_stdin_open {
                StdinMode::Pipe
            } else {
                StdinMode::Null
            },
            background: self.background,
            timeout_ms: self
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
            tag: self.tag.clone(),
            report_pid: false,
            user: self.user.clone(),
        };
        exec.validate().map_err(AgentError::InvalidRequest)?;
        Ok(exec)
    }
}

/// The collected result of [`exec`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Everything the command wrote to standard output.
    pub stdout: Vec<u8>,
    /// Everything the command wrote to standard error.
    pub stderr: Vec<u8>,
    /// The exit code, when the command exited.
    pub exit_code: Option<i32>,
    /// The signal number, when a signal killed the command.
    pub signal: Option<i32>,
    /// Whether the agent killed it because [`ExecRequest::timeout`] passed.
    pub timed_out: bool,
}

impl ExecOutput {
    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// A piece of a running command's output, in the order the agent read it
/// (each stream in order; the interleaving of the two is approximate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    /// Bytes from standard output.
    Stdout(Vec<u8>),
    /// Bytes from standard error.
    Stderr(Vec<u8>),
}

/// Performs the handshake only and reports what the agent is. The stream
/// is spent afterwards (one request per connection).
pub async fn hello<S>(stream: S) -> Result<AgentInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream);
    conn.send(&[Frame::Hello(hello_msg())]).await?;
    conn.read_ack().await
}

/// Performs the handshake and a ping round trip through the agent's request
/// dispatch (a readiness check), returning what the agent is.
pub async fn ping<S>(stream: S) -> Result<AgentInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    const NONCE: u64 = 0x646f_726d_6f75_7365;
    let mut conn = Conn::new(stream);
    conn.send(&[
        Frame::Hello(hello_msg()),
        Frame::Ping(Ping { nonce: NONCE }),
    ])
    .await?;
    let info = conn.read_ack().await?;
    match conn.next("waiting for Pong").await? {
        Frame::Pong(Ping { nonce: NONCE }) => Ok(info),
        Frame::Pong(_) => Err(ProtoError::InvalidPayload {
            frame: proto::FrameType::Pong,
            reason: "the nonce differs from the ping's".into(),
        }
        .into()),
        Frame::Error(e) => Err(remote(e)),
        other => Err(unexpected(&other, "Pong")),
    }
}

/// Runs a command and collects its output (at most
/// [`ExecRequest::max_output`] bytes, else [`AgentError::OutputTooLarge`]).
pub async fn exec<S>(stream: S, req: ExecRequest) -> Result<ExecOutput, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limit = req.max_output;
    let mut out = ExecOutput::default();
    let mut total = 0usize;
    let mut collect = |chunk: OutputChunk| {
        let (buf, data) = match chunk {
            OutputChunk::Stdout(d) => (&mut out.stdout, d),
            OutputChunk::Stderr(d) => (&mut out.stderr, d),
        };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(AgentError::OutputTooLarge { limit });
        }
        if buf.is_empty() {
            *buf = data;
        } else {
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    let status = drive(stream, req, |chunk| std::future::ready(collect(chunk))).await?;
    out.exit_code = status.code;
    out.signal = status.signal;
    out.timed_out = status.timed_out;
    Ok(out)
}

/// Runs a command and sends its output to `chunks` as it arrives (no
/// output cap: the receiver decides, and a slow receiver slows the command
/// down), returning how it ended. Dropping the receiver abandons the
/// command ([`AgentError::ReceiverDropped`]).
pub async fn exec_streaming<S>(
    stream: S,
    req: ExecRequest,
    chunks: mpsc::Sender<OutputChunk>,
) -> Result<ExitStatus, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    drive(stream, req, |chunk| {
        let tx = chunks.clone();
        async move {
            tx.send(chunk)
                .await
                .map_err(|_| AgentError::ReceiverDropped)
        }
    })
    .await
}

/// The exec state machine: sends the handshake, the request and its stdin
/// while reading the answer, and hands each output chunk to `sink`.
async fn drive<S, F, Fut>(
    stream: S,
    req: ExecRequest,
    mut sink: F,
) -> Result<ExitStatus, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    F: FnMut(OutputChunk) -> Fut,
    Fut: std::future::Future<Output = Result<(), AgentError>>,
{
    let exec = req.to_wire()?;
    let mut first = encode(&Frame::Hello(hello_msg()))?;
    first.extend_from_slice(&encode(&Frame::Exec(exec))?);
    // `exec` waits for the command, so its stdin always ends.
    let stdin = req.stdin.or_else(|| req.keep_stdin_open.then(Vec::new));

    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async move {
        wr.write_all(&first).await?;
        if let Some(data) = stdin {
            for chunk in data.chunks(DATA_CHUNK) {
                let frame = encode(&Frame::Stdin(chunk.to_vec())).map_err(io::Error::other)?;
                wr.write_all(&frame).await?;
            }
            let eof = encode(&Frame::StdinEof).map_err(io::Error::other)?;
            wr.write_all(&eof).await?;
        }
        wr.flush().await
    };
    tokio::pin!(writer);
    let mut writing = true;

    let mut dec = Decoder::new();
    let mut acked = false;
    loop {
        while let Some(frame) = dec.next_frame()? {
            match frame {
                Frame::HelloAck(ack) if !acked => {
                    info_from_ack(ack)?;
                    acked = true;
                }
                Frame::Stdout(d) if acked => sink(OutputChunk::Stdout(d)).await?,
                Frame::Stderr(d) if acked => sink(OutputChunk::Stderr(d)).await?,
                Frame::Exit(status) if acked => return Ok(status),
                Frame::Error(e) => return Err(remote(e)),
                other => {
                    return Err(unexpected(
                        &other,
                        if acked {
                            "Stdout, Stderr, Exit or Error"
                        } else {
                            "HelloAck"
                        },
                    ))
                }
            }
        }
        let during = if acked {
            "while the command ran"
        } else {
            "during the handshake"
        };
        let sending = writing.then_some(writer.as_mut());
        if receive_while_sending(&mut rd, &mut dec, sending, during)
            .await?
            .is_some()
        {
            // Sent, or failed to (the agent closed early): either way the
            // answer is the agent's frames or EOF, read next.
            writing = false;
        }
    }
}

/// Sets the guest's clock to the host's and credits `entropy` to its random
/// pool (see [`proto::Sync`]). Call it after boot and after every resume.
pub async fn sync<S>(stream: S, entropy: Vec<u8>) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let req = Frame::Sync(proto::Sync {
        realtime_ns,
        entropy,
    });
    process::request_done(stream, req, Vec::new()).await
}

fn hello_msg() -> Hello {
    Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        client: concat!("dormouse ", env!("CARGO_PKG_VERSION")).into(),
    }
}

fn info_from_ack(ack: HelloAck) -> Result<AgentInfo, AgentError> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&ack.version) {
        return Err(AgentError::IncompatibleAgent {
            version: ack.version,
        });
    }
    Ok(AgentInfo {
        protocol_version: ack.version,
        agent_version: ack.agent_version,
        capabilities: ack.capabilities,
        init: ack.init,
    })
}

fn remote(e: proto::ErrorMsg) -> AgentError {
    AgentError::Remote {
        kind: e.kind,
        message: e.message,
    }
}

fn unexpected(frame: &Frame, expected: &'static str) -> AgentError {
    AgentError::Protocol(ProtoError::UnexpectedFrame {
        got: frame.frame_type(),
        expected,
    })
}

/// A peer going away is [`AgentError::Disconnected`]; other failures are
/// [`AgentError::Io`].
fn io_error(e: io::Error, during: &'static str) -> AgentError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => AgentError::Disconnected { during },
        _ => AgentError::Io(e),
    }
}

/// Reads the agent's next bytes into `dec`; the end of the stream is
/// [`AgentError::Disconnected`] `during` the named step.
async fn receive<R>(rd: &mut R, dec: &mut Decoder, during: &'static str) -> Result<(), AgentError>
where
    R: AsyncRead + Unpin,
{
    match rd.read(dec.read_space(READ_CHUNK)).await {
        Ok(0) => Err(AgentError::Disconnected { during }),
        Ok(n) => {
            dec.commit(n);
            Ok(())
        }
        Err(e) => Err(io_error(e, during)),
    }
}

/// Like [`receive`] while `sending` (the rest of a request, if still being
/// sent) makes progress at the same time: the agent may answer, or fail,
/// before it has read everything. Gives `Some` with the sender's result
/// when that finishes first (nothing was read then); pass `None` from then
/// on.
async fn receive_while_sending<R, W>(
    rd: &mut R,
    dec: &mut Decoder,
    sending: Option<std::pin::Pin<&mut W>>,
    during: &'static str,
) -> Result<Option<W::Output>, AgentError>
where
    R: AsyncRead + Unpin,
    W: std::future::Future,
{
    let Some(sending) = sending else {
        return receive(rd, dec, during).await.map(|()| None);
    };
    tokio::select! {
        biased;
        read = receive(rd, dec, during) => read.map(|()| None),
        sent = sending => Ok(Some(sent)),
    }
}

/// A stream with a frame decoder, for the simple request/answer exchanges.
struct Conn<S> {
    stream: S,
    dec: Decoder,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    fn new(stream: S) -> Self {
        Self {
            stream,
            dec: Decoder::new(),
        }
    }

    /// Sends `frames` with one write.
    async fn send(&mut self, frames: &[Frame]) -> Result<(), AgentError> {
        let mut bytes = Vec::new();
        for f in frames {
            bytes.extend_from_slice(&encode(f)?);
        }
        let sent = async {
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await
        };
        sent.await
            .map_err(|e| io_error(e, "while sending the request"))
    }

    async fn next(&mut self, during: &'static str) -> Result<Frame, AgentError> {
        loop {
            if let Some(frame) = self.dec.next_frame()? {
                return Ok(frame);
            }
            receive(&mut self.stream, &mut self.dec, during).await?;
        }
    }

    async fn read_ack(&mut self) -> Result<AgentInfo, AgentError> {
        match self.next("during the handshake").await? {
            Frame::HelloAck(ack) => info_from_ack(ack),
            Frame::Error(e) => Err(remote(e)),
            other => Err(unexpected(&other, "HelloAck")),
        }
    }
}
