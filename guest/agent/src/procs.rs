//! The commands the agent started and are still running: a table by pid,
//! one pump thread per command, and any number of connections listening
//! to its output.
//!
//! The pump thread owns the command's pipes. It reads stdout and stderr in
//! [`DATA_CHUNK`] pieces and writes each piece, as one frame, to every
//! connection subscribed to the command (the `Exec` that started it, and
//! any `ProcessRequest::Connect` since); a connection whose write fails is
//! dropped. With no connection subscribed (a background command whose host
//! went away) the output is read and discarded, so the command never blocks
//! on a full pipe. When the command has exited and its pipes are drained,
//! the pump sends `Exit` to every subscriber, shuts their sockets down (which
//! ends their connection threads) and removes the command from the table.
//!
//! Standard input arrives from connection threads ([`Proc::push_stdin`]) and
//! is written by the pump as the pipe has room; a connection thread that
//! gets ahead by more than [`STDIN_BACKLOG`] bytes waits, which stops it
//! reading its connection and so pushes back on the host.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::log::log;
use crate::proto::DATA_CHUNK;
use crate::proto::{encode, encode_header, ExitStatus, Frame, FrameType, ProcessInfo, HEADER_LEN};
use crate::spawn::Child;
use crate::{reaper, sys};

/// Stdin bytes queued for a command that is not reading them.
pub const STDIN_BACKLOG: usize = 1 << 20;

/// The most commands the agent keeps at once.
const MAX_PROCS: usize = 1024;

static TABLE: Mutex<BTreeMap<libc::pid_t, Arc<Proc>>> = Mutex::new(BTreeMap::new());

fn table() -> MutexGuard<'static, BTreeMap<libc::pid_t, Arc<Proc>>> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running command.
pub struct Proc {
    /// Its pid (and process group id).
    pub pid: libc::pid_t,
    info: ProcessInfo,
    state: Mutex<State>,
    /// Signalled when stdin bytes were written (room in the backlog) or the
    /// command ended.
    drained: Condvar,
    /// Write end of the pump's wake-up pipe.
    wake: File,
}

struct State {
    subscribers: Vec<File>,
    /// Stdin bytes not yet written, from `pending_at`.
    pending: Vec<u8>,
    pending_at: usize,
    /// The host closed stdin (or the command has no stdin pipe).
    stdin_done: bool,
    /// The stdin pipe is still open on our side.
    stdin_open: bool,
    /// Set once the command has ended and `Exit` went out.
    ended: bool,
}

/// Why a stdin push was refused.
pub enum StdinError {
    /// The command was started without a stdin pipe, or it was closed.
    Closed,
    /// The command has ended.
    Ended,
}

impl Proc {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wake(&self) {
        // One byte into a non-blocking pipe; a full pipe already wakes.
        let _ = (&self.wake).write(&[1]);
    }

    /// What `List` reports.
    pub fn info(&self) -> ProcessInfo {
        let mut info = self.info.clone();
        let s = self.lock();
        info.stdin_open = s.stdin_open && !s.stdin_done;
        info
    }

    /// Sends `frame` now and then every output frame and the `Exit` to
    /// `conn`. Returns false when the command has already ended.
    pub fn subscribe(&self, conn: &File, first: Option<&Frame>) -> io::Result<bool> {
        let mut s = self.lock();
        if s.ended {
            return Ok(false);
        }
        if let Some(frame) = first {
            let bytes = encode(frame).map_err(io::Error::other)?;
            (&*conn).write_all(&bytes)?;
        }
        s.subscribers.push(conn.try_clone()?);
        Ok(true)
    }

    /// Stops sending to `conn` (matched by the socket it refers to).
    pub fn unsubscribe(&self, conn: &File) {
        let id = inode(conn);
        self.lock().subscribers.retain(|f| inode(f) != id);
    }

    /// Queues `data` for the command's stdin (empty `data` with `eof`
    /// closes it), waiting while the backlog is full.
    pub fn push_stdin(&self, data: &[u8], eof: bool) -> Result<(), StdinError> {
        let mut s = self.lock();
        loop {
            if s.ended {
                return Err(StdinError::Ended);
            }
            if s.stdin_done || !s.stdin_open {
                // Data for a command that closed its stdin is not wanted;
                // only a host that closed stdin itself gets an error.
                return if s.stdin_done {
                    Err(StdinError::Closed)
                } else {
                    Ok(())
                };
            }
            if s.pending.len() - s.pending_at < STDIN_BACKLOG {
                break;
            }
            s = self.drained.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.pending_at == s.pending.len() {
            s.pending.clear();
            s.pending_at = 0;
        }
        s.pending.extend_from_slice(data);
        if eof {
            s.stdin_done = true;
        }
        drop(s);
        self.wake();
        Ok(())
    }

    /// Whether the command has ended.
    pub fn ended(&self) -> bool {
        self.lock().ended
    }

    /// Signals the command's process group unless it has ended (its pid
    /// may then belong to another process).
    pub fn signal(&self, sig: libc::c_int) {
        let s = self.lock();
        if !s.ended {
            sys::kill_group(self.pid, sig);
        }
    }
}

fn inode(f: &File) -> (u64, u64) {
    f.metadata()
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        })
        .unwrap_or((0, 0))
}

/// The running command with this pid, if the agent started it.
pub fn get(pid: libc::pid_t) -> Option<Arc<Proc>> {
    table().get(&pid).cloned()
}

/// Every running command, by pid.
pub fn list() -> Vec<ProcessInfo> {
    let procs: Vec<Arc<Proc>> = table().values().cloned().collect();
    procs.iter().map(|p| p.info()).collect()
}

/// Registers a started command, subscribes `conn` (after sending it
/// `first`) and starts the pump thread. On failure the command is killed.
pub fn start(
    child: Child,
    info: ProcessInfo,
    timeout: Option<Duration>,
    conn: &File,
    first: Option<&Frame>,
) -> io::Result<Arc<Proc>> {
    let pid = child.pid;
    let started = (|| {
        if table().len() >= MAX_PROCS {
            return Err(io::Error::other(format!(
                "the agent already runs {MAX_PROCS} commands; kill some first"
            )));
        }
        let (wake_r, wake_w) = sys::pipe()?;
        sys::set_nonblocking(&wake_w)?;
        sys::set_nonblocking(&wake_r)?;
        let proc = Arc::new(Proc {
            pid,
            info,
            state: Mutex::new(State {
                subscribers: Vec::new(),
                pending: Vec::new(),
                pending_at: 0,
                stdin_done: child.stdin.is_none(),
                stdin_open: child.stdin.is_some(),
                ended: false,
            }),
            drained: Condvar::new(),
            wake: wake_w,
        });
        proc.subscribe(conn, first)?;
        table().insert(pid, proc.clone());
        let pump = Pump {
            proc: proc.clone(),
            stdout: Some(child.stdout),
            stderr: Some(child.stderr),
            status_pipe: Some(child.status),
            status: None,
            stdin: child.stdin,
            wake: wake_r,
            deadline: timeout.map(|t| Instant::now() + t),
            timed_out: false,
        };
        let spawned = std::thread::Builder::new()
            .name("pump".into())
            .spawn(move || pump.run());
        if let Err(e) = spawned {
            table().remove(&pid);
            return Err(e);
        }
        Ok(proc)
    })();
    if started.is_err() {
        sys::kill_group(pid, libc::SIGKILL);
        reaper::forget(pid);
    }
    started
}

#[derive(Clone, Copy)]
enum Source {
    Stdout,
    Stderr,
    Status,
    Stdin,
    Wake,
}

struct Pump {
    proc: Arc<Proc>,
    stdout: Option<File>,
    stderr: Option<File>,
    status_pipe: Option<File>,
    status: Option<libc::c_int>,
    stdin: Option<File>,
    wake: File,
    deadline: Option<Instant>,
    timed_out: bool,
}

impl Pump {
    fn run(mut self) {
        let status = match self.pump() {
            Ok(status) => status,
            Err(e) => {
                log!("lost command {}: {e}", self.proc.pid);
                sys::kill_group(self.proc.pid, libc::SIGKILL);
                reaper::forget(self.proc.pid);
                ExitStatus::signaled(libc::SIGKILL)
            }
        };
        let status = ExitStatus {
            timed_out: self.timed_out,
            ..status
        };
        table().remove(&self.proc.pid);
        let mut s = self.proc.lock();
        s.ended = true;
        if let Ok(bytes) = encode(&Frame::Exit(status)) {
            for conn in s.subscribers.drain(..) {
                let _ = (&conn).write_all(&bytes);
                // Ends the connection thread blocked reading this socket.
                // SAFETY: shutdown only acts on the fd we hold open.
                unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        drop(s);
        self.proc.drained.notify_all();
    }

    fn pump(&mut self) -> io::Result<ExitStatus> {
        let mut buf = vec![0u8; HEADER_LEN + DATA_CHUNK];
        let mut sources: Vec<Source> = Vec::with_capacity(5);
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
        loop {
            if let Some(status) = self.status {
                if self.stdout.is_none() && self.stderr.is_none() {
                    return exit_status(status);
                }
            }
            sources.clear();
            fds.clear();
            let mut watch = |src: Source, fd: &File, events: libc::c_short| {
                sources.push(src);
                fds.push(sys::pollfd(fd, events));
            };
            if let Some(f) = &self.stdout {
                watch(Source::Stdout, f, libc::POLLIN);
            }
            if let Some(f) = &self.stderr {
                watch(Source::Stderr, f, libc::POLLIN);
            }
            if let Some(f) = &self.status_pipe {
                watch(Source::Status, f, libc::POLLIN);
            }
            watch(Source::Wake, &self.wake, libc::POLLIN);
            if let Some(f) = &self.stdin {
                let s = self.proc.lock();
                if s.pending.len() > s.pending_at {
                    watch(Source::Stdin, f, libc::POLLOUT);
                }
            }
            // Once the command has exited, everything it wrote is already in
            // the pipes: take what is there without waiting for descendants
            // that may hold the pipes open for ever.
            let timeout = if self.status.is_some() {
                0
            } else {
                match self.deadline {
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        libc::c_int::try_from(left.as_millis().saturating_add(1))
                            .unwrap_or(libc::c_int::MAX)
                    }
                    None => -1,
                }
            };
            if sys::poll(&mut fds, timeout)? == 0 {
                if let Some(status) = self.status {
                    return exit_status(status);
                }
                if self.deadline.is_some_and(|d| Instant::now() >= d) {
                    self.timed_out = true;
                    self.deadline = None;
                    sys::kill_group(self.proc.pid, libc::SIGKILL);
                }
                continue;
            }
            for (src, fd) in sources.iter().zip(&fds) {
                if fd.revents == 0 {
                    continue;
                }
                match src {
                    Source::Stdout => self.forward(FrameType::Stdout, &mut buf),
                    Source::Stderr => self.forward(FrameType::Stderr, &mut buf),
                    Source::Status => self.read_status()?,
                    Source::Stdin => self.feed_stdin(),
                    Source::Wake => {
                        let mut sink = [0u8; 64];
                        let _ = (&self.wake).read(&mut sink);
                        self.close_stdin_if_done();
                    }
                }
            }
        }
    }

    /// Moves one read of a pipe to every subscriber as a `ty` frame.
    fn forward(&mut self, ty: FrameType, buf: &mut [u8]) {
        let pipe = match ty {
            FrameType::Stdout => &mut self.stdout,
            _ => &mut self.stderr,
        };
        let Some(file) = pipe else {
            return;
        };
        match file.read(&mut buf[HEADER_LEN..]) {
            Ok(0) => *pipe = None,
            Ok(n) => {
                let Ok(header) = encode_header(ty, n) else {
                    return;
                };
                buf[..HEADER_LEN].copy_from_slice(&header);
                let mut s = self.proc.lock();
                s.subscribers
                    .retain(|conn| (&*conn).write_all(&buf[..HEADER_LEN + n]).is_ok());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A failing pipe is as good as a closed one.
            Err(_) => *pipe = None,
        }
    }

    fn read_status(&mut self) -> io::Result<()> {
        let Some(pipe) = &mut self.status_pipe else {
            return Ok(());
        };
        let mut raw = [0u8; 4];
        match pipe.read(&mut raw) {
            Ok(4) => {
                self.status = Some(libc::c_int::from_ne_bytes(raw));
                self.status_pipe = None;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Ok(_) => Err(io::Error::other("lost the command's exit status")),
            Err(e) => Err(e),
        }
    }

    /// Writes pending stdin bytes the pipe has room for (non-blocking).
    fn feed_stdin(&mut self) {
        let Some(pipe) = &mut self.stdin else {
            return;
        };
        let mut s = self.proc.lock();
        let start = s.pending_at;
        match pipe.write(&s.pending[start..]) {
            Ok(n) => s.pending_at += n,
            Err(e) if sys::try_again(&e) => {}
            // EPIPE: the command closed its stdin; the rest is not wanted.
            Err(_) => {
                s.pending_at = s.pending.len();
                s.stdin_open = false;
                drop(s);
                self.stdin = None;
                self.proc.drained.notify_all();
                return;
            }
        }
        drop(s);
        self.proc.drained.notify_all();
        self.close_stdin_if_done();
    }

    /// Closes the stdin pipe once the host closed it and everything queued
    /// is written.
    fn close_stdin_if_done(&mut self) {
        let mut s = self.proc.lock();
        if s.stdin_done && s.pending_at == s.pending.len() && self.stdin.is_some() {
            s.stdin_open = false;
            drop(s);
            self.stdin = None;
        }
    }
}

fn exit_status(status: libc::c_int) -> io::Result<ExitStatus> {
    if libc::WIFEXITED(status) {
        Ok(ExitStatus::exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Ok(ExitStatus::signaled(libc::WTERMSIG(status)))
    } else {
        Err(io::Error::other(format!(
            "unexpected wait status {status:#x}"
        )))
    }
}
