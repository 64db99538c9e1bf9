//! `sbx.commands()`: commands in the guest, in the foreground or the
//! background.

use tokio::net::UnixStream;

use crate::agent::process::{self, ProcessEvent, ProcessStream};
use crate::agent::{self, ExecOutput, ExecRequest as Command, OutputChunk};
use crate::error::{Error, Result};
use crate::proto::{ExitStatus, ProcessInfo};
use crate::sandbox::{Running, Sandbox};

/// The result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// The exit code; `128 + signal` when a signal killed the command.
    pub exit_code: i32,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
}

impl From<ExecOutput> for CommandOutput {
    fn from(out: ExecOutput) -> Self {
        let status = ExitStatus {
            code: out.exit_code,
            signal: out.signal,
            timed_out: out.timed_out,
        };
        Self::from_parts(&out.stdout, &out.stderr, status)
    }
}

impl CommandOutput {
    fn from_parts(stdout: &[u8], stderr: &[u8], status: ExitStatus) -> Self {
        Self {
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            stderr: String::from_utf8_lossy(stderr).into_owned(),
            exit_code: status
                .code
                .unwrap_or_else(|| 128 + status.signal.unwrap_or(0)),
            signal: status.signal,
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && self.signal.is_none()
    }
}

/// Commands in a running sandbox: `sbx.commands()`.
pub struct Commands<'a> {
    sandbox: &'a Sandbox<Running>,
}

impl<'a> Commands<'a> {
    pub(crate) fn new(sandbox: &'a Sandbox<Running>) -> Self {
        Self { sandbox }
    }

    /// Runs a shell command line (`/bin/sh -c`) and waits for it.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// let out = sbx.commands().run("echo hello; exit 3").await?;
    /// assert_eq!((out.stdout.as_str(), out.exit_code), ("hello\n", 3));
    /// # Ok(()) }
    /// ```
    pub async fn run(&self, cmdline: &str) -> Result<CommandOutput> {
        self.exec(Command::shell(cmdline)).await
    }

    /// Runs a [`Command`] (a program with arguments, environment, working
    /// directory, standard input and timeout) and waits for it.
    ///
    /// Output is collected up to [`Command::max_output`] (64 MiB by
    /// default), beyond which the call fails rather than cut it: stream
    /// larger output with [`Self::spawn`]. A command still running when its
    /// [`Command::timeout`] passes is killed and reported as
    /// [`Error::CommandTimedOut`] with what it wrote until then.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// use dormouse::Command;
    /// let cmd = Command::new(["tr", "a-z", "A-Z"]).stdin("hi\n").cwd("/tmp").env("LANG", "C");
    /// assert_eq!(sbx.commands().exec(cmd).await?.stdout, "HI\n");
    /// # Ok(()) }
    /// ```
    pub async fn exec(&self, request: Command) -> Result<CommandOutput> {
        let request = self.with_defaults(request);
        let timeout = request.timeout;
        let stream = self.sandbox.connect_agent().await?;
        let out = self
            .sandbox
            .while_alive(agent::exec(stream, request))
            .await?;
        let timed_out = out.timed_out;
        let out = CommandOutput::from(out);
        match timeout {
            Some(timeout) if timed_out => Err(Error::CommandTimedOut {
                timeout,
                output: Box::new(out),
            }),
            _ => Ok(out),
        }
    }

    /// Starts a command and returns a handle on it without waiting: its
    /// output streams through [`CommandHandle::next`], its stdin is open
    /// for [`CommandHandle::write_stdin`] when [`Command::keep_stdin_open`]
    /// is set. The command runs in the background: dropping the handle
    /// leaves it running, to be reached again by pid ([`Self::connect`],
    /// [`Self::kill`]...); [`Self::spawn_foreground`] ties it to the handle.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// use dormouse::Command;
    /// let server = sbx.commands().spawn(Command::shell("python3 -m http.server 8000")).await?;
    /// let pid = server.pid();
    /// drop(server); // still serving
    /// assert!(sbx.commands().list().await?.iter().any(|p| p.pid == pid));
    /// sbx.commands().kill(pid).await?;
    /// # Ok(()) }
    /// ```
    pub async fn spawn(&self, request: Command) -> Result<CommandHandle> {
        self.start(request.background(true)).await
    }

    /// Like [`Self::spawn`], but dropping the handle kills the command.
    pub async fn spawn_foreground(&self, request: Command) -> Result<CommandHandle> {
        self.start(request.background(false)).await
    }

    /// The sandbox's environment and working directory (see
    /// [`SandboxConfig::env`](crate::SandboxConfig::env)) under the
    /// request's own.
    fn with_defaults(&self, mut request: Command) -> Command {
        let (env, cwd) = self.sandbox.command_defaults();
        if !env.is_empty() {
            let own: Vec<(String, String)> = std::mem::take(&mut request.env);
            let mut merged: Vec<(String, String)> = env
                .into_iter()
                .filter(|(k, _)| !own.iter().any(|(o, _)| o == k))
                .collect();
            merged.extend(own);
            request.env = merged;
        }
        if request.cwd.is_none() {
            request.cwd = cwd;
        }
        request
    }

    async fn start(&self, request: Command) -> Result<CommandHandle> {
        let request = self.with_defaults(request);
        let max_output = request.max_output;
        let stream = self.sandbox.connect_agent().await?;
        let stream = self
            .sandbox
            .while_alive(process::start(stream, request))
            .await?;
        Ok(CommandHandle { stream, max_output })
    }

    /// Attaches to a running command started by [`Self::spawn`]: its output
    /// from now on (earlier output is not kept) and its exit.
    pub async fn connect(&self, pid: i32) -> Result<CommandHandle> {
        let stream = self.sandbox.connect_agent().await?;
        let stream = self
            .sandbox
            .while_alive(process::connect(stream, pid))
            .await
            .map_err(|e| process_error(pid, e))?;
        Ok(CommandHandle {
            stream,
            max_output: agent::DEFAULT_MAX_OUTPUT,
        })
    }

    /// The commands started through the agent that are still running.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox.while_alive(process::list(stream)).await
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the command's process
    /// group. Fails with [`Error::ProcessNotFound`] when it is not running.
    pub async fn signal(&self, pid: i32, signal: i32) -> Result<()> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox
            .while_alive(process::signal(stream, pid, signal))
            .await
            .map_err(|e| process_error(pid, e))
    }

    /// Kills the command and everything it started (`SIGKILL` to its
    /// process group).
    pub async fn kill(&self, pid: i32) -> Result<()> {
        self.signal(pid, libc::SIGKILL).await
    }

    /// Writes `data` to the standard input of a command started with
    /// [`Command::keep_stdin_open`].
    pub async fn send_stdin(&self, pid: i32, data: impl AsRef<[u8]>) -> Result<()> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox
            .while_alive(process::send_stdin(stream, pid, data.as_ref(), false))
            .await
            .map_err(|e| process_error(pid, e))
    }

    /// Closes the standard input of a command started with
    /// [`Command::keep_stdin_open`] (it then reads end-of-file).
    pub async fn close_stdin(&self, pid: i32) -> Result<()> {
        let stream = self.sandbox.connect_agent().await?;
        self.sandbox
            .while_alive(process::send_stdin(stream, pid, &[], true))
            .await
            .map_err(|e| process_error(pid, e))
    }
}

fn process_error(pid: i32, e: Error) -> Error {
    match e {
        Error::Agent(agent::AgentError::Remote {
            kind: crate::proto::ErrorKind::NotFound,
            ..
        }) => Error::ProcessNotFound { pid },
        other => other,
    }
}

/// What a command sent, from [`CommandHandle::next`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandEvent {
    /// Bytes it wrote to standard output.
    Stdout(Vec<u8>),
    /// Bytes it wrote to standard error.
    Stderr(Vec<u8>),
}

/// A command started with [`Commands::spawn`] or attached to with
/// [`Commands::connect`].
#[derive(Debug)]
pub struct CommandHandle {
    stream: ProcessStream<UnixStream>,
    max_output: usize,
}

impl CommandHandle {
    /// The command's pid in the guest.
    pub fn pid(&self) -> i32 {
        self.stream.pid()
    }

    /// The next piece of output as it comes, or `Ok(Err(status))` once the
    /// command ended.
    pub async fn next(&mut self) -> Result<std::result::Result<CommandEvent, ExitStatus>> {
        Ok(match self.stream.next().await? {
            ProcessEvent::Output(OutputChunk::Stdout(d)) => Ok(CommandEvent::Stdout(d)),
            ProcessEvent::Output(OutputChunk::Stderr(d)) => Ok(CommandEvent::Stderr(d)),
            ProcessEvent::Exit(status) => Err(status),
        })
    }

    /// Waits for the command to end, collecting the rest of its output (up
    /// to the command's `max_output`).
    pub async fn wait(mut self) -> Result<CommandOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut total = 0usize;
        loop {
            let (buf, data) = match self.next().await? {
                Ok(CommandEvent::Stdout(d)) => (&mut stdout, d),
                Ok(CommandEvent::Stderr(d)) => (&mut stderr, d),
                Err(status) => return Ok(CommandOutput::from_parts(&stdout, &stderr, status)),
            };
            total = total.saturating_add(data.len());
            if total > self.max_output {
                return Err(agent::AgentError::OutputTooLarge {
                    limit: self.max_output,
                }
                .into());
            }
            buf.extend_from_slice(&data);
        }
    }

    /// Writes to the command's standard input (started with
    /// [`Command::keep_stdin_open`]).
    pub async fn write_stdin(&mut self, data: impl AsRef<[u8]>) -> Result<()> {
        Ok(self.stream.write_stdin(data.as_ref()).await?)
    }

    /// Closes the command's standard input.
    pub async fn close_stdin(&mut self) -> Result<()> {
        Ok(self.stream.close_stdin().await?)
    }
}
