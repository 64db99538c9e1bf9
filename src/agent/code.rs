//! The guest's Python code interpreter ([`crate::proto::CodeRequest`]): code
//! runs in long-lived interpreter contexts whose variables, imports and open
//! files persist from one run to the next, like the cells of a notebook.
//!
//! A run returns what the code printed (also what commands it started
//! printed), the `repr()` of the value of its last expression when that is
//! not `None` (a cell's `Out[n]`), and the exception it raised, with its
//! traceback. An exception does not end the context. The code's standard
//! input is empty (`input()` raises `EOFError`).
//!
//! A run whose [`CodeRun::timeout`] passes, or whose future is dropped, is
//! interrupted: `KeyboardInterrupt` is raised in the code and the context
//! stays usable. Code that ignores the interrupt for a few seconds has its
//! interpreter killed. When the interpreter ends during a run (the code
//! called `os._exit`, something killed it) the run reports an error named
//! [`INTERPRETER_DIED`] and the next run starts a fresh interpreter; when
//! it ended between runs, the next run starts a fresh one and says so
//! first on its standard error. A fresh interpreter has no variables and
//! counts runs from 1 again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dormouse::agent::AgentError> {
//! use dormouse::agent::code::{run_code, CodeRun};
//! let connect = || tokio::net::UnixStream::connect("/tmp/agent.sock");
//! run_code(connect().await?, &CodeRun::new("x = 41"), None).await?;
//! let run = run_code(connect().await?, &CodeRun::new("print('hi'); x + 1"), None).await?;
//! assert_eq!((run.stdout.as_str(), run.result.as_deref()), ("hi\n", Some("42")));
//! # Ok(()) }
//! ```

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{
    hello_msg, info_from_ack, io_error, receive, remote, unexpected, AgentError, Conn,
    DEFAULT_MAX_OUTPUT,
};
use crate::proto::{self, encode, CodeRequest, ContextInfo, Decoder, Frame};

/// The name of the [`proto::CodeError`] a run reports when its interpreter
/// ended while the code ran (its variables are lost).
pub const INTERPRETER_DIED: &str = "InterpreterDied";

/// The most output (stdout and stderr together) [`run_code`] collects before
/// failing with [`AgentError::OutputTooLarge`]: 64 MiB.
pub const MAX_CODE_OUTPUT: usize = DEFAULT_MAX_OUTPUT;

/// Code to run in a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeRun {
    /// The context's id; the default context (started on first use) when
    /// `None`.
    pub context: Option<String>,
    /// Python source (at most [`proto::MAX_CODE`] bytes).
    pub code: String,
    /// Environment variables set (in `os.environ`) for this run only.
    pub env: Vec<(String, String)>,
    /// Interrupt the code after this long.
    pub timeout: Option<Duration>,
}

impl CodeRun {
    /// Runs `code` in the default context, without a timeout.
    pub fn new(code: impl Into<String>) -> Self {
        Self {
            context: None,
            code: code.into(),
            env: Vec::new(),
            timeout: None,
        }
    }

    /// Runs in the context with this id.
    pub fn context(mut self, id: impl Into<String>) -> Self {
        self.context = Some(id.into());
        self
    }

    /// Sets an environment variable for this run.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Interrupts the code (`KeyboardInterrupt`) after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn to_wire(&self) -> Result<CodeRequest, AgentError> {
        let req = CodeRequest::Run {
            context: self.context.clone(),
            code: self.code.clone(),
            env: self.env.clone(),
            timeout_ms: self
                .timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        };
        req.validate().map_err(AgentError::InvalidRequest)?;
        Ok(req)
    }
}

/// What a run produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Execution {
    /// Its standard output (invalid UTF-8 replaced by U+FFFD).
    pub stdout: String,
    /// Its standard error (invalid UTF-8 replaced by U+FFFD).
    pub stderr: String,
    /// `repr()` of the value of the last expression, when the code ended
    /// with an expression whose value is not `None`.
    pub result: Option<String>,
    /// The exception the code raised.
    pub error: Option<proto::CodeError>,
    /// How many runs the context's interpreter has executed, this one
    /// included.
    pub execution_count: u64,
    /// Whether the code was interrupted because its timeout passed.
    pub timed_out: bool,
}

/// A piece of a run's output as it is produced: raw bytes, which may end
/// inside a UTF-8 character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeOutput {
    /// Bytes written to standard output.
    Stdout(Vec<u8>),
    /// Bytes written to standard error.
    Stderr(Vec<u8>),
}

/// Runs code in a context and collects what it produced (at most
/// [`MAX_CODE_OUTPUT`] bytes of output, else
/// [`AgentError::OutputTooLarge`]). With `output`, every chunk of output is
/// also sent there as it arrives; dropping its receiver abandons (and so
/// interrupts) the run with [`AgentError::ReceiverDropped`].
///
/// A context that does not exist is a [`AgentError::Remote`] error of kind
/// [`proto::ErrorKind::NotFound`].
pub async fn run_code<S>(
    stream: S,
    run: &CodeRun,
    output: Option<mpsc::Sender<CodeOutput>>,
) -> Result<Execution, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = run.to_wire()?;
    let mut first = encode(&Frame::Hello(hello_msg()))?;
    first.extend_from_slice(&encode(&Frame::CodeRequest(req))?);
    let mut stream = stream;
    let sent = async {
        stream.write_all(&first).await?;
        stream.flush().await
    };
    sent.await
        .map_err(|e| io_error(e, "while sending the code"))?;

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let mut exec = Execution::default();
    let mut dec = Decoder::new();
    let mut acked = false;
    let mut total = 0usize;
    loop {
        while let Some(frame) = dec.next_frame()? {
            let chunk = match frame {
                Frame::HelloAck(ack) if !acked => {
                    info_from_ack(ack)?;
                    acked = true;
                    continue;
                }
                Frame::Error(e) => return Err(remote(e)),
                Frame::Stdout(d) if acked => CodeOutput::Stdout(d),
                Frame::Stderr(d) if acked => CodeOutput::Stderr(d),
                Frame::CodeResult(r) if acked && exec.result.is_none() && exec.error.is_none() => {
                    exec.result = Some(r.text);
                    continue;
                }
                Frame::CodeError(e) if acked && exec.error.is_none() => {
                    exec.error = Some(e);
                    continue;
                }
                Frame::CodeEnd(end) if acked => {
                    exec.stdout = String::from_utf8_lossy(&stdout).into_owned();
                    exec.stderr = String::from_utf8_lossy(&stderr).into_owned();
                    exec.execution_count = end.execution_count;
                    exec.timed_out = end.timed_out;
                    return Ok(exec);
                }
                other => {
                    return Err(unexpected(
                        &other,
                        if !acked {
                            "HelloAck"
                        } else if exec.error.is_some() {
                            "Stdout, Stderr, CodeEnd or Error"
                        } else if exec.result.is_some() {
                            "Stdout, Stderr, CodeError, CodeEnd or Error"
                        } else {
                            "Stdout, Stderr, CodeResult, CodeError, CodeEnd or Error"
                        },
                    ))
                }
            };
            let (buf, data) = match &chunk {
                CodeOutput::Stdout(d) => (&mut stdout, d),
                CodeOutput::Stderr(d) => (&mut stderr, d),
            };
            total = total.saturating_add(data.len());
            if total > MAX_CODE_OUTPUT {
                return Err(AgentError::OutputTooLarge {
                    limit: MAX_CODE_OUTPUT,
                });
            }
            buf.extend_from_slice(data);
            if let Some(tx) = &output {
                tx.send(chunk)
                    .await
                    .map_err(|_| AgentError::ReceiverDropped)?;
            }
        }
        let during = if acked {
            "while the code ran"
        } else {
            "during the handshake"
        };
        receive(&mut stream, &mut dec, during).await?;
    }
}

/// Starts a new interpreter context in `cwd` (the guest's `/root` when
/// `None`); pass its id to [`CodeRun::context`].
pub async fn create_context<S>(stream: S, cwd: Option<&str>) -> Result<ContextInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = CodeRequest::CreateContext {
        cwd: cwd.map(str::to_owned),
    };
    request_context(stream, req, "while creating the context").await
}

/// The contexts that exist (the default one once it has been used).
pub async fn list_contexts<S>(stream: S) -> Result<Vec<ContextInfo>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = start(stream, CodeRequest::ListContexts).await?;
    let mut out = Vec::new();
    loop {
        match conn.next("while listing contexts").await? {
            Frame::Context(info) => out.push(info),
            Frame::Done => return Ok(out),
            Frame::Error(e) => return Err(remote(e)),
            other => return Err(unexpected(&other, "Context, Done or Error")),
        }
    }
}

/// Stops a context's interpreter and forgets the context. A run in progress
/// on it ends with an [`INTERPRETER_DIED`] error.
pub async fn remove_context<S>(stream: S, id: &str) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = CodeRequest::RemoveContext { id: id.to_owned() };
    let mut conn = start(stream, req).await?;
    match conn.next("while removing the context").await? {
        Frame::Done => Ok(()),
        Frame::Error(e) => Err(remote(e)),
        other => Err(unexpected(&other, "Done or Error")),
    }
}

/// Replaces a context's interpreter by a fresh one (same id and working
/// directory, no variables). A run in progress on it ends with an
/// [`INTERPRETER_DIED`] error.
pub async fn restart_context<S>(stream: S, id: &str) -> Result<ContextInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = CodeRequest::RestartContext { id: id.to_owned() };
    request_context(stream, req, "while restarting the context").await
}

/// Sends the handshake and `req` (validated first) and reads the
/// `HelloAck`.
async fn start<S>(stream: S, req: CodeRequest) -> Result<Conn<S>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    req.validate().map_err(AgentError::InvalidRequest)?;
    let mut conn = Conn::new(stream);
    conn.send(&[Frame::Hello(hello_msg()), Frame::CodeRequest(req)])
        .await?;
    conn.read_ack().await?;
    Ok(conn)
}

/// A request answered by one `Context`.
async fn request_context<S>(
    stream: S,
    req: CodeRequest,
    during: &'static str,
) -> Result<ContextInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = start(stream, req).await?;
    match conn.next(during).await? {
        Frame::Context(info) => Ok(info),
        Frame::Error(e) => Err(remote(e)),
        other => Err(unexpected(&other, "Context or Error")),
    }
}
