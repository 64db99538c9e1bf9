//! Payloads of the service requests: background processes, files, the code
//! interpreter, port forwarding and clock/entropy sync.
//!
//! Every struct here is decoded from bytes the peer controls; `validate`
//! methods (called by the decoder) check what serde cannot: NUL bytes in
//! paths, empty names, ranges.

use serde::{Deserialize, Serialize};

/// The longest path the agent accepts (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;

/// The deepest recursive listing a [`FileRequest::List`] may ask for.
pub const MAX_LIST_DEPTH: u32 = 64;

/// The most code one [`CodeRequest::Run`] may carry (its JSON frame must
/// stay under the 1 MiB frame cap).
pub const MAX_CODE: usize = 512 * 1024;

fn check_path(what: &str, path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("{what} is empty: give a path"));
    }
    if path.contains('\0') {
        return Err(format!("{what} {path:?} contains a NUL byte"));
    }
    if path.len() > MAX_PATH {
        return Err(format!(
            "{what} is {} bytes long, more than the {MAX_PATH} a path may have",
            path.len()
        ));
    }
    Ok(())
}

fn check_env(env: &[(String, String)]) -> Result<(), String> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!(
                "environment variable name {k:?} is invalid: it must be non-empty and contain \
                 neither '=' nor NUL"
            ));
        }
        if v.contains('\0') {
            return Err(format!(
                "environment variable {k} contains a NUL byte in its value"
            ));
        }
    }
    Ok(())
}

/// The agent started a command (agent -> host), sent first when
/// [`super::Exec::report_pid`] is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The command's pid in the guest (also its process group id).
    pub pid: i32,
}

impl Started {
    /// A pid is positive.
    pub fn validate(&self) -> Result<(), String> {
        if self.pid <= 0 {
            return Err(format!("pid {} is not a valid process id", self.pid));
        }
        Ok(())
    }
}

/// A request about a command that is already running (host -> agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProcessRequest {
    /// List the commands the agent started that are still running; answered
    /// by one [`super::Frame::Process`] each and a [`super::Frame::Done`].
    List,
    /// Stream the command's output from now on: answered by `Stdout` /
    /// `Stderr` frames and its `Exit`, like the `Exec` that started it.
    /// Closing the stream detaches without stopping the command.
    Connect {
        /// The command's pid.
        pid: i32,
    },
    /// Send `signal` to the command's process group; answered by `Done`.
    Signal {
        /// The command's pid.
        pid: i32,
        /// The signal number, 1..=64.
        signal: i32,
    },
    /// Feed the command's standard input: the host follows this request
    /// with `Stdin` frames and ends it with `Done` (keep stdin open) or
    /// `StdinEof` (close it); the agent answers `Done` once the bytes are
    /// queued.
    SendStdin {
        /// The command's pid.
        pid: i32,
    },
}

impl ProcessRequest {
    /// Checks the pid and signal ranges.
    pub fn validate(&self) -> Result<(), String> {
        let pid = match self {
            Self::List => return Ok(()),
            Self::Connect { pid } | Self::SendStdin { pid } => *pid,
            Self::Signal { pid, signal } => {
                if !(1..=64).contains(signal) {
                    return Err(format!("signal {signal} is not in 1..=64"));
                }
                *pid
            }
        };
        Started { pid }.validate()
    }
}

/// A running command the agent started (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Its pid (and process group id).
    pub pid: i32,
    /// The argv it was started with.
    pub argv: Vec<String>,
    /// The variables the request added to the environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// The working directory it was started in, if one was given.
    #[serde(default)]
    pub cwd: Option<String>,
    /// The caller's tag, if one was given.
    #[serde(default)]
    pub tag: Option<String>,
    /// Whether its standard input is a pipe that is still open.
    #[serde(default)]
    pub stdin_open: bool,
}

impl ProcessInfo {
    /// Checks the pid.
    pub fn validate(&self) -> Result<(), String> {
        Started { pid: self.pid }.validate()
    }
}

/// A file operation (host -> agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum FileRequest {
    /// Answered by one [`super::Frame::Entry`] (symlinks are not followed).
    Stat {
        /// The path.
        path: String,
    },
    /// Answered by one `Entry` per directory entry, `depth` levels deep
    /// (1 = the directory's own entries), then `Done`.
    List {
        /// The directory.
        path: String,
        /// How many levels to descend, 1..=[`MAX_LIST_DEPTH`].
        depth: u32,
    },
    /// Creates the directory and its missing parents; answered by the new
    /// directory's `Entry`, or `AlreadyExists` when it was there already.
    MakeDir {
        /// The directory.
        path: String,
    },
    /// Removes a file, a symlink or a directory with everything in it;
    /// answered by `Done`.
    Remove {
        /// The path.
        path: String,
    },
    /// Renames (moves) `from` to `to`; answered by the `Entry` of `to`.
    Rename {
        /// The current path.
        from: String,
        /// The new path.
        to: String,
    },
    /// Answered by the file's `Entry`, then its bytes as `Data` frames, then
    /// `Done`.
    Read {
        /// The file.
        path: String,
    },
    /// The host follows with the file's bytes as `Data` frames and a
    /// `Done`; the agent creates missing parent directories, replaces the
    /// file's contents, and answers with its `Entry`.
    Write {
        /// The file.
        path: String,
        /// Permission bits for a new file (default 0o644).
        #[serde(default)]
        mode: Option<u32>,
    },
    /// Answered by `Done` once the watch is set up, then one
    /// [`super::Frame::FileEvent`] per change until the host closes.
    Watch {
        /// The directory.
        path: String,
        /// Whether to watch subdirectories (also ones created later).
        #[serde(default)]
        recursive: bool,
    },
}

impl FileRequest {
    /// Checks paths and the listing depth.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Stat { path }
            | Self::MakeDir { path }
            | Self::Remove { path }
            | Self::Read { path }
            | Self::Watch { path, .. } => check_path("path", path),
            Self::List { path, depth } => {
                check_path("path", path)?;
                if !(1..=MAX_LIST_DEPTH).contains(depth) {
                    return Err(format!(
                        "listing depth {depth} is not in 1..={MAX_LIST_DEPTH}"
                    ));
                }
                Ok(())
            }
            Self::Rename { from, to } => {
                check_path("source path", from)?;
                check_path("destination path", to)
            }
            Self::Write { path, mode } => {
                check_path("path", path)?;
                match mode {
                    Some(m) if *m > 0o7777 => Err(format!("mode {m:#o} is not in 0..=0o7777")),
                    _ => Ok(()),
                }
            }
        }
    }
}

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Anything else (device, socket, FIFO) or a kind this build does not
    /// know.
    #[serde(other)]
    Other,
}

/// A file's metadata (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    /// The last component of the path.
    pub name: String,
    /// The absolute path.
    pub path: String,
    /// The file's kind (of the link itself for a symlink).
    pub kind: EntryKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner's user name (or numeric id when it has no name).
    pub owner: String,
    /// Group name (or numeric id).
    pub group: String,
    /// Modification time, nanoseconds since the Unix epoch (may be
    /// negative for files from before 1970).
    pub modified_ns: i64,
    /// Where a symlink points.
    #[serde(default)]
    pub symlink_target: Option<String>,
}

impl EntryInfo {
    /// Checks the path fields.
    pub fn validate(&self) -> Result<(), String> {
        check_path("entry path", &self.path)?;
        if self.name.contains('\0') || self.name.len() > MAX_PATH {
            return Err("entry name is not a valid file name".into());
        }
        if self.mode > 0o7777 {
            return Err(format!("mode {:#o} is not in 0..=0o7777", self.mode));
        }
        Ok(())
    }
}

/// What happened to a watched path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FileEventKind {
    /// A file or directory was created (or moved in).
    Create,
    /// A file was written to.
    Write,
    /// A file or directory was removed (or moved out).
    Remove,
    /// A file or directory was renamed within the watched tree (the event
    /// carries the new name).
    Rename,
    /// Permissions or other metadata changed.
    Chmod,
    /// A kind this build does not know.
    #[serde(other)]
    Other,
}

/// A change under a watched directory (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEvent {
    /// What happened.
    pub kind: FileEventKind,
    /// The absolute path it happened to.
    pub path: String,
}

impl FileEvent {
    /// Checks the path.
    pub fn validate(&self) -> Result<(), String> {
        check_path("event path", &self.path)
    }
}

/// A code-interpreter request (host -> agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum CodeRequest {
    /// Runs `code` in a context (the default one, started on first use,
    /// when `context` is `None`); answered by `Stdout`/`Stderr` frames,
    /// at most one [`super::Frame::CodeResult`], at most one
    /// [`super::Frame::CodeError`], and one [`super::Frame::CodeEnd`].
    /// Closing the stream interrupts the code.
    Run {
        /// The context id.
        #[serde(default)]
        context: Option<String>,
        /// Python source.
        code: String,
        /// Environment variables set for this run only.
        #[serde(default)]
        env: Vec<(String, String)>,
        /// Interrupt the code (KeyboardInterrupt) after this many
        /// milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Starts a new interpreter; answered by its [`super::Frame::Context`].
    CreateContext {
        /// Its working directory (`/root` when absent).
        #[serde(default)]
        cwd: Option<String>,
    },
    /// Answered by one `Context` per interpreter, then `Done`.
    ListContexts,
    /// Stops an interpreter; answered by `Done`.
    RemoveContext {
        /// The context id.
        id: String,
    },
    /// Replaces an interpreter by a fresh one with the same id and working
    /// directory; answered by its `Context`.
    RestartContext {
        /// The context id.
        id: String,
    },
}

/// The longest context id.
const MAX_CONTEXT_ID: usize = 64;

fn check_context_id(id: &str) -> Result<(), String> {
    if id.is_empty()
        || id.len() > MAX_CONTEXT_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "context id {id:?} is invalid: use 1..={MAX_CONTEXT_ID} ASCII letters, digits, '-' \
             or '_'"
        ));
    }
    Ok(())
}

impl CodeRequest {
    /// Checks ids, sizes, environment names and the working directory.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Run {
                context, code, env, ..
            } => {
                if let Some(id) = context {
                    check_context_id(id)?;
                }
                if code.len() > MAX_CODE {
                    return Err(format!(
                        "the code is {} bytes, more than the {MAX_CODE} one run may carry; \
                         write it to a file and run that",
                        code.len()
                    ));
                }
                check_env(env)
            }
            Self::CreateContext { cwd } => match cwd {
                Some(cwd) => check_path("working directory", cwd),
                None => Ok(()),
            },
            Self::ListContexts => Ok(()),
            Self::RemoveContext { id } | Self::RestartContext { id } => check_context_id(id),
        }
    }
}

/// An interpreter context (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextInfo {
    /// Its id.
    pub id: String,
    /// The language (always `python`).
    pub language: String,
    /// Its working directory.
    pub cwd: String,
}

impl ContextInfo {
    /// Checks the id and path.
    pub fn validate(&self) -> Result<(), String> {
        check_context_id(&self.id)?;
        check_path("working directory", &self.cwd)
    }
}

/// The value of the last expression of a run (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeResult {
    /// Its `repr()`.
    pub text: String,
}

/// The exception a run raised (agent -> host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeError {
    /// The exception class name, e.g. `ZeroDivisionError`.
    pub name: String,
    /// `str()` of the exception.
    pub value: String,
    /// The formatted traceback.
    pub traceback: String,
}

/// A run ended (agent -> host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeEnd {
    /// How many runs this context has executed, this one included.
    pub execution_count: u64,
    /// Whether the run was interrupted because its timeout passed.
    #[serde(default)]
    pub timed_out: bool,
}

/// Open a TCP connection to a guest port and splice it with this stream
/// (host -> agent). The agent answers `Done` once connected (or an `Error`
/// of kind `ConnectionRefused`); after that the stream carries the raw bytes
/// of the TCP connection in both directions, unframed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// The guest TCP port on 127.0.0.1.
    pub port: u16,
}

impl Forward {
    /// Port 0 cannot be connected to.
    pub fn validate(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port 0 cannot be forwarded; give the guest port".into());
        }
        Ok(())
    }
}

/// Sets the guest's clock and feeds its entropy pool (host -> agent),
/// sent after boot and after every resume: a restored guest's clock stands
/// where it was paused and its random state is a copy of the snapshot's.
/// Answered by `Done`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// The host's `CLOCK_REALTIME` in nanoseconds since the Unix epoch.
    pub realtime_ns: u64,
    /// Fresh random bytes from the host, credited to the guest's pool.
    pub entropy: Vec<u8>,
}

/// The most entropy one [`Sync`] may carry.
pub const MAX_SYNC_ENTROPY: usize = 512;

impl Sync {
    /// Checks the entropy size.
    pub fn validate(&self) -> Result<(), String> {
        if self.entropy.len() > MAX_SYNC_ENTROPY {
            return Err(format!(
                "{} bytes of entropy, more than {MAX_SYNC_ENTROPY}",
                self.entropy.len()
            ));
        }
        Ok(())
    }
}

/// The `validate` methods above behind one trait, for the decoder.
pub(super) trait Validate {
    fn check(&self) -> Result<(), String>;
}

macro_rules! validate_impl {
    ($($t:ty),*) => {$(
        impl Validate for $t {
            fn check(&self) -> Result<(), String> {
                self.validate()
            }
        }
    )*};
}

validate_impl!(
    Started,
    ProcessRequest,
    ProcessInfo,
    FileRequest,
    EntryInfo,
    FileEvent,
    CodeRequest,
    ContextInfo,
    Forward,
    Sync
);
