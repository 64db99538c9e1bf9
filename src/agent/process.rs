//! Commands that run on their own: started with a pid, fed, signalled,
//! listed and re-attached to ([`crate::proto::ProcessRequest`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), dormouse::agent::AgentError> {
//! use dormouse::agent::{process, ExecRequest};
//! let connect = || tokio::net::UnixStream::connect("/tmp/agent.sock");
//! let mut cmd = process::start(connect().await?, ExecRequest::shell("sleep 60").background(true))
//!     .await?;
//! let pid = cmd.pid();
//! drop(cmd); // a background command runs on
//! assert!(process::list(connect().await?).await?.iter().any(|p| p.pid == pid));
//! process::signal(connect().await?, pid, 9).await?;
//! # Ok(()) }
//! ```

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::{
    hello_msg, info_from_ack, io_error, receive, remote, unexpected, AgentError, Conn, ExecRequest,
    OutputChunk,
};
use crate::proto::{
    encode, Decoder, ExitStatus, Frame, ProcessInfo, ProcessRequest, Started, DATA_CHUNK,
};

/// What a running command sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    /// A piece of its output.
    Output(OutputChunk),
    /// It ended; nothing follows.
    Exit(ExitStatus),
}

/// A connection to a running command: its output as it comes, and (for the
/// connection that started it) its standard input.
///
/// Dropping it closes the connection: a foreground command is then killed,
/// a background one runs on and can be reached again with [`connect`].
pub struct ProcessStream<S> {
    pid: i32,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    dec: Decoder,
    ended: bool,
}

impl<S> std::fmt::Debug for ProcessStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessStream")
            .field("pid", &self.pid)
            .field("ended", &self.ended)
            .finish()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ProcessStream<S> {
    /// The command's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The next piece of output, or how the command ended. After the exit
    /// it fails with [`AgentError::Disconnected`].
    pub async fn next(&mut self) -> Result<ProcessEvent, AgentError> {
        if self.ended {
            return Err(AgentError::Disconnected {
                during: "after the command ended",
            });
        }
        loop {
            if let Some(frame) = self.dec.next_frame()? {
                return match frame {
                    Frame::Stdout(d) => Ok(ProcessEvent::Output(OutputChunk::Stdout(d))),
                    Frame::Stderr(d) => Ok(ProcessEvent::Output(OutputChunk::Stderr(d))),
                    Frame::Exit(status) => {
                        self.ended = true;
                        Ok(ProcessEvent::Exit(status))
                    }
                    Frame::Error(e) => Err(remote(e)),
                    other => Err(unexpected(&other, "Stdout, Stderr, Exit or Error")),
                };
            }
            receive(&mut self.rd, &mut self.dec, "while the command ran").await?;
        }
    }

    /// Sends bytes to the command's standard input (only on the stream that
    /// started it with an open stdin; elsewhere use [`send_stdin`]).
    ///
    /// The agent queues up to 1 MiB that the command has not read yet;
    /// beyond that this call waits, so do not send more than the command
    /// reads without also reading its output with [`Self::next`].
    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<(), AgentError> {
        let mut bytes = Vec::with_capacity(data.len() + 64);
        for chunk in data.chunks(DATA_CHUNK) {
            bytes.extend_from_slice(&encode(&Frame::Stdin(chunk.to_vec()))?);
        }
        self.write(&bytes).await
    }

    /// Closes the command's standard input.
    pub async fn close_stdin(&mut self) -> Result<(), AgentError> {
        let bytes = encode(&Frame::StdinEof)?;
        self.write(&bytes).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        let sent = async {
            self.wr.write_all(bytes).await?;
            self.wr.flush().await
        };
        sent.await
            .map_err(|e| io_error(e, "while sending standard input"))
    }
}

/// Starts a command and returns once the agent reported its pid. With
/// [`ExecRequest::stdin`] data, the data is sent (and stdin closed unless
/// [`ExecRequest::keep_stdin_open`]) right after the request.
pub async fn start<S>(stream: S, req: ExecRequest) -> Result<ProcessStream<S>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut exec = req.to_wire()?;
    exec.report_pid = true;
    let mut first = encode(&Frame::Hello(hello_msg()))?;
    first.extend_from_slice(&encode(&Frame::Exec(exec))?);
    let (rd, wr) = tokio::io::split(stream);
    let mut ps = ProcessStream {
        pid: 0,
        rd,
        wr,
        dec: Decoder::new(),
        ended: false,
    };
    ps.write(&first).await?;
    let mut acked = false;
    let pid = loop {
        if let Some(frame) = ps.dec.next_frame()? {
            match frame {
                Frame::HelloAck(ack) if !acked => {
                    info_from_ack(ack)?;
                    acked = true;
                }
                Frame::Started(Started { pid }) if acked => break pid,
                Frame::Error(e) => return Err(remote(e)),
                other => return Err(unexpected(&other, "HelloAck, then Started")),
            }
            continue;
        }
        receive(&mut ps.rd, &mut ps.dec, "while starting the command").await?;
    };
    ps.pid = pid;
    if let Some(data) = &req.stdin {
        ps.write_stdin(data).await?;
    }
    if req.stdin.is_some() && !req.keep_stdin_open {
        ps.close_stdin().await?;
    }
    Ok(ps)
}

/// Attaches to a running command's output (from now on; earlier output is
/// not kept). Fails with a remote `NotFound` when no such command runs.
pub async fn connect<S>(stream: S, pid: i32) -> Result<ProcessStream<S>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream);
    conn.send(&[
        Frame::Hello(hello_msg()),
        Frame::ProcessRequest(ProcessRequest::Connect { pid }),
    ])
    .await?;
    conn.read_ack().await?;
    // The agent answers once the stream is attached, so no output written
    // after this returns is missed.
    match conn.next("while attaching").await? {
        Frame::Started(Started { pid: attached }) if attached == pid => {}
        Frame::Error(e) => return Err(remote(e)),
        other => return Err(unexpected(&other, "Started")),
    }
    let Conn { stream, dec } = conn;
    let (rd, wr) = tokio::io::split(stream);
    Ok(ProcessStream {
        pid,
        rd,
        wr,
        dec,
        ended: false,
    })
}

/// The commands the agent started that are still running.
pub async fn list<S>(stream: S) -> Result<Vec<ProcessInfo>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream);
    conn.send(&[
        Frame::Hello(hello_msg()),
        Frame::ProcessRequest(ProcessRequest::List),
    ])
    .await?;
    conn.read_ack().await?;
    let mut out = Vec::new();
    loop {
        match conn.next("while listing commands").await? {
            Frame::Process(info) => out.push(info),
            Frame::Done => return Ok(out),
            Frame::Error(e) => return Err(remote(e)),
            other => return Err(unexpected(&other, "Process or Done")),
        }
    }
}

/// Sends `signal` to a running command's process group.
pub async fn signal<S>(stream: S, pid: i32, signal: i32) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = ProcessRequest::Signal { pid, signal };
    request_done(stream, Frame::ProcessRequest(req), Vec::new()).await
}

/// Sends `data` to a running command's standard input, closing it
/// afterwards when `close` is set.
pub async fn send_stdin<S>(stream: S, pid: i32, data: &[u8], close: bool) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut frames: Vec<Frame> = data
        .chunks(DATA_CHUNK)
        .map(|c| Frame::Stdin(c.to_vec()))
        .collect();
    frames.push(if close { Frame::StdinEof } else { Frame::Done });
    request_done(
        stream,
        Frame::ProcessRequest(ProcessRequest::SendStdin { pid }),
        frames,
    )
    .await
}

/// Sends Hello, `req` and `then`, and expects `Done`.
pub(super) async fn request_done<S>(
    stream: S,
    req: Frame,
    then: Vec<Frame>,
) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream);
    let mut frames = vec![Frame::Hello(hello_msg()), req];
    frames.extend(then);
    conn.send(&frames).await?;
    conn.read_ack().await?;
    match conn.next("waiting for the answer").await? {
        Frame::Done => Ok(()),
        Frame::Error(e) => Err(remote(e)),
        other => Err(unexpected(&other, "Done")),
    }
}
