//! Running one `Exec` request: stream the command's output to the host as it
//! comes, feed it the host's stdin, and report how it ended.
//!
//! One thread, one `poll` loop over the command's stdout, stderr, stdin and
//! exit-status pipes and the connection. Reads are up to [`DATA_CHUNK`]
//! bytes and each chunk goes out as one frame in one `write`, because every
//! system call in the guest runs emulated kernel code.

use std::fs::File;
use std::io::{self, Read, Write};

use crate::log::log;
use crate::proto::{
    encode_header, write_frame, ErrorKind, Exec, ExitStatus, Frame, FrameReader, FrameType,
    ProtoError, DATA_CHUNK, HEADER_LEN,
};
use crate::spawn::{spawn, Child};
use crate::{reaper, sys};

/// Stdin bytes held for a command that is not reading them; past this the
/// agent stops reading the connection, which pushes back on the host.
const STDIN_BACKLOG: usize = 1 << 20;

/// How a command's stream ended early.
enum Abort {
    /// The host closed the connection (or it failed): cancel the command.
    Disconnected,
    /// The host sent something the protocol does not allow here.
    Protocol(ProtoError),
    /// The agent itself failed.
    Internal(io::Error),
}

/// Runs `req` and answers on `conn` until the command ends or the host goes
/// away; in the latter case the command's process group is killed.
pub fn run(conn: &File, reader: &mut FrameReader<&File>, req: Exec) {
    let child = match spawn(&req) {
        Ok(child) => child,
        Err(refusal) => {
            let _ = write_frame(&mut &*conn, &Frame::error(refusal.kind, refusal.message));
            return;
        }
    };
    let pid = child.pid;
    let reply = match pump(conn, reader, child) {
        Ok(status) => Frame::Exit(status),
        Err(abort) => {
            sys::kill_group(pid, libc::SIGKILL);
            reaper::forget(pid);
            match abort {
                Abort::Disconnected => return,
                Abort::Protocol(e) => {
                    log!("killed command {:?}: {e}", req.argv[0]);
                    Frame::error(ErrorKind::Protocol, e.to_string())
                }
                Abort::Internal(e) => {
                    log!("killed command {:?}: {e}", req.argv[0]);
                    Frame::error(ErrorKind::Internal, format!("the agent failed: {e}"))
                }
            }
        }
    };
    let _ = write_frame(&mut &*conn, &reply);
}

#[derive(Clone, Copy)]
enum Source {
    Stdout,
    Stderr,
    Status,
    Conn,
    Stdin,
}

/// The command's state as seen by the loop; a closed pipe is `None`.
struct Streams {
    stdout: Option<File>,
    stderr: Option<File>,
    status_pipe: Option<File>,
    status: Option<libc::c_int>,
    stdin: Option<File>,
    /// The host sent `StdinEof` (or the command has no stdin pipe).
    stdin_done: bool,
    pending: Vec<u8>,
    pending_at: usize,
}

fn pump(conn: &File, reader: &mut FrameReader<&File>, child: Child) -> Result<ExitStatus, Abort> {
    let mut s = Streams {
        stdout: Some(child.stdout),
        stderr: Some(child.stderr),
        status_pipe: Some(child.status),
        status: None,
        stdin_done: child.stdin.is_none(),
        stdin: child.stdin,
        pending: Vec::new(),
        pending_at: 0,
    };
    take_buffered(&mut s, reader)?;
    let mut buf = vec![0u8; HEADER_LEN + DATA_CHUNK];
    let mut sources: Vec<Source> = Vec::with_capacity(5);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(5);
    loop {
        if let Some(status) = s.status {
            if s.stdout.is_none() && s.stderr.is_none() {
                return exit_status(status);
            }
        }
        sources.clear();
        fds.clear();
        let mut watch = |src: Source, fd: &File, events: libc::c_short| {
            sources.push(src);
            fds.push(sys::pollfd(fd, events));
        };
        if let Some(f) = &s.stdout {
            watch(Source::Stdout, f, libc::POLLIN);
        }
        if let Some(f) = &s.stderr {
            watch(Source::Stderr, f, libc::POLLIN);
        }
        if let Some(f) = &s.status_pipe {
            watch(Source::Status, f, libc::POLLIN);
        }
        // Hang-ups are reported even without POLLIN, so a host that goes away
        // is noticed while its stdin backlog is full.
        let backlog = s.pending.len() - s.pending_at;
        watch(
            Source::Conn,
            conn,
            if backlog < STDIN_BACKLOG {
                libc::POLLIN
            } else {
                0
            },
        );
        if let Some(f) = &s.stdin {
            if backlog > 0 {
                watch(Source::Stdin, f, libc::POLLOUT);
            }
        }
        // Once the command has exited, everything it wrote is already in the
        // pipes: take what is there without waiting for descendants that may
        // hold the pipes open for ever.
        let timeout = if s.status.is_some() { 0 } else { -1 };
        if sys::poll(&mut fds, timeout).map_err(Abort::Internal)? == 0 {
            if let Some(status) = s.status {
                return exit_status(status);
            }
            continue;
        }
        for (src, fd) in sources.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            match src {
                Source::Stdout => forward(&mut s.stdout, FrameType::Stdout, conn, &mut buf)?,
                Source::Stderr => forward(&mut s.stderr, FrameType::Stderr, conn, &mut buf)?,
                Source::Status => read_status(&mut s)?,
                Source::Conn if fd.revents & libc::POLLIN != 0 => from_host(&mut s, reader)?,
                Source::Conn => return Err(Abort::Disconnected),
                Source::Stdin => feed_stdin(&mut s),
            }
        }
    }
}

/// Moves one read of `pipe` to the host as a `ty` frame (read straight into
/// the frame buffer after its header, sent with one write).
fn forward(
    pipe: &mut Option<File>,
    ty: FrameType,
    conn: &File,
    buf: &mut [u8],
) -> Result<(), Abort> {
    let Some(file) = pipe else {
        return Ok(());
    };
    match file.read(&mut buf[HEADER_LEN..]) {
        Ok(0) => *pipe = None,
        Ok(n) => {
            let header = encode_header(ty, n)
                .map_err(|e| Abort::Internal(io::Error::other(e.to_string())))?;
            buf[..HEADER_LEN].copy_from_slice(&header);
            (&*conn)
                .write_all(&buf[..HEADER_LEN + n])
                .map_err(|_| Abort::Disconnected)?;
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        // A failing pipe is as good as a closed one.
        Err(_) => *pipe = None,
    }
    Ok(())
}

fn read_status(s: &mut Streams) -> Result<(), Abort> {
    let Some(pipe) = &mut s.status_pipe else {
        return Ok(());
    };
    let mut raw = [0u8; 4];
    match pipe.read(&mut raw) {
        Ok(4) => {
            s.status = Some(libc::c_int::from_ne_bytes(raw));
            s.status_pipe = None;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Ok(_) => Err(Abort::Internal(io::Error::other(
            "lost the command's exit status",
        ))),
        Err(e) => Err(Abort::Internal(e)),
    }
}

/// Reads what the host sent: stdin data, the end of stdin, or a hang-up.
fn from_host(s: &mut Streams, reader: &mut FrameReader<&File>) -> Result<(), Abort> {
    match reader.fill() {
        Ok(0) | Err(_) => Err(Abort::Disconnected),
        Ok(_) => take_buffered(s, reader),
    }
}

/// Handles the frames already in the connection's buffer (they may have
/// arrived together with the request).
fn take_buffered(s: &mut Streams, reader: &mut FrameReader<&File>) -> Result<(), Abort> {
    loop {
        let frame = match reader.next_buffered() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(e) => return Err(Abort::Protocol(e)),
        };
        match frame {
            Frame::Stdin(data) if !s.stdin_done => {
                // The command may have closed its stdin already: drop the data.
                if s.stdin.is_some() {
                    if s.pending_at == s.pending.len() {
                        s.pending.clear();
                        s.pending_at = 0;
                    }
                    s.pending.extend_from_slice(&data);
                }
            }
            Frame::StdinEof if !s.stdin_done => {
                s.stdin_done = true;
                if s.pending_at == s.pending.len() {
                    s.stdin = None;
                }
            }
            other => {
                return Err(Abort::Protocol(ProtoError::UnexpectedFrame {
                    got: other.frame_type(),
                    expected: if s.stdin_done {
                        "no more frames (the command's stdin is closed or was never a pipe)"
                    } else {
                        "Stdin or StdinEof"
                    },
                }))
            }
        }
    }
}

/// Writes pending stdin bytes the pipe has room for (non-blocking).
fn feed_stdin(s: &mut Streams) {
    let Some(pipe) = &mut s.stdin else {
        return;
    };
    match pipe.write(&s.pending[s.pending_at..]) {
        Ok(n) => s.pending_at += n,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) => {}
        // EPIPE: the command closed its stdin; the rest is not wanted.
        Err(_) => {
            s.stdin = None;
            s.pending_at = s.pending.len();
        }
    }
    if s.pending_at == s.pending.len() {
        s.pending.clear();
        s.pending_at = 0;
        if s.stdin_done {
            s.stdin = None;
        }
    }
}

fn exit_status(status: libc::c_int) -> Result<ExitStatus, Abort> {
    if libc::WIFEXITED(status) {
        Ok(ExitStatus::exited(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Ok(ExitStatus::signaled(libc::WTERMSIG(status)))
    } else {
        Err(Abort::Internal(io::Error::other(format!(
            "unexpected wait status {status:#x}"
        ))))
    }
}
