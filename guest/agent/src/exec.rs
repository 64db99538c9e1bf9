//! `Exec` and `ProcessRequest`: starting commands, then feeding, signalling,
//! listing and re-attaching to them (the commands themselves live in
//! [`crate::procs`]).

use std::fs::File;
use std::time::Duration;

use crate::log::log;
use crate::procs::{self, Proc, StdinError};
use crate::proto::{
    write_frame, ErrorKind, Exec, Frame, FrameReader, ProcessInfo, ProcessRequest, ProtoError,
    Started,
};
use crate::spawn::spawn;

/// Starts `req` and serves its connection: the command's output and exit
/// go out through [`procs`]; this thread reads the host's stdin frames. When
/// the host goes away a foreground command's process group is killed; a
/// background command runs on.
pub fn run(conn: &File, reader: &mut FrameReader<&File>, req: Exec) {
    let child = match spawn(&req) {
        Ok(child) => child,
        Err(refusal) => {
            let _ = write_frame(&mut &*conn, &Frame::error(refusal.kind, refusal.message));
            return;
        }
    };
    let pid = child.pid;
    let info = ProcessInfo {
        pid,
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        tag: req.tag.clone(),
        stdin_open: child.stdin.is_some(),
    };
    let first = req.report_pid.then_some(Frame::Started(Started { pid }));
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let proc = match procs::start(child, info, timeout, conn, first.as_ref()) {
        Ok(proc) => proc,
        Err(e) => {
            let _ = write_frame(
                &mut &*conn,
                &Frame::error(ErrorKind::Internal, format!("cannot run the command: {e}")),
            );
            return;
        }
    };
    if let Err(e) = read_stdin(&proc, reader) {
        proc.unsubscribe(conn);
        if !req.background {
            proc.signal(libc::SIGKILL);
        }
        if let Some(e) = e {
            log!("stopped listening to command {:?}: {e}", req.argv[0]);
            let _ = write_frame(
                &mut &*conn,
                &Frame::error(ErrorKind::Protocol, e.to_string()),
            );
        }
    }
}

/// Passes the host's `Stdin` / `StdinEof` frames to the command until the
/// connection ends: `Err(None)` when the host went away (or the command
/// ended and its socket was shut down), `Err(Some(e))` on a protocol
/// violation.
fn read_stdin(proc: &Proc, reader: &mut FrameReader<&File>) -> Result<(), Option<ProtoError>> {
    loop {
        loop {
            let frame = match reader.next_buffered() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(Some(e)),
            };
            let (data, eof) = match frame {
                Frame::Stdin(data) => (data, false),
                Frame::StdinEof => (Vec::new(), true),
                other => return Err(Some(unexpected(&other, "Stdin or StdinEof"))),
            };
            match proc.push_stdin(&data, eof) {
                Ok(()) | Err(StdinError::Ended) => {}
                Err(StdinError::Closed) => {
                    return Err(Some(ProtoError::UnexpectedFrame {
                        got: if eof {
                            crate::proto::FrameType::StdinEof
                        } else {
                            crate::proto::FrameType::Stdin
                        },
                        expected: "no more frames (the command's stdin is closed or was never \
                                   a pipe)",
                    }))
                }
            }
        }
        match reader.fill() {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

fn unexpected(frame: &Frame, expected: &'static str) -> ProtoError {
    ProtoError::UnexpectedFrame {
        got: frame.frame_type(),
        expected,
    }
}

/// Answers one `ProcessRequest`.
pub fn serve_request(conn: &File, reader: &mut FrameReader<&File>, req: ProcessRequest) {
    let reply = match req {
        ProcessRequest::List => {
            for info in procs::list() {
                if write_frame(&mut &*conn, &Frame::Process(info)).is_err() {
                    return;
                }
            }
            Frame::Done
        }
        ProcessRequest::Connect { pid } => match procs::get(pid) {
            Some(proc) => return attach(conn, reader, &proc),
            None => not_found(pid),
        },
        ProcessRequest::Signal { pid, signal } => match procs::get(pid) {
            Some(proc) => {
                proc.signal(signal);
                Frame::Done
            }
            None => not_found(pid),
        },
        ProcessRequest::SendStdin { pid } => match procs::get(pid) {
            Some(proc) => send_stdin(reader, &proc),
            None => not_found(pid),
        },
    };
    let _ = write_frame(&mut &*conn, &reply);
}

fn not_found(pid: i32) -> Frame {
    Frame::error(
        ErrorKind::NotFound,
        format!("no running command with pid {pid}: it has ended or was not started by the agent"),
    )
}

/// Streams a running command's output to `conn` until it ends or the host
/// detaches (closing the stream, which leaves the command running). The
/// `Started` frame first tells the host it is attached: output the command
/// writes from then on reaches it.
fn attach(conn: &File, reader: &mut FrameReader<&File>, proc: &Proc) {
    let attached = Frame::Started(Started { pid: proc.pid });
    match proc.subscribe(conn, Some(&attached)) {
        Ok(true) => {}
        Ok(false) => {
            let _ = write_frame(&mut &*conn, &not_found(proc.pid));
            return;
        }
        Err(_) => return,
    }
    // Nothing is expected from the host; any frame is a violation.
    let outcome = match reader.read_frame() {
        Ok(Some(other)) => Some(unexpected(&other, "nothing (close to detach)")),
        Ok(None) | Err(ProtoError::Io(_)) => None,
        Err(e) => Some(e),
    };
    proc.unsubscribe(conn);
    if let Some(e) = outcome {
        if !proc.ended() {
            let _ = write_frame(
                &mut &*conn,
                &Frame::error(ErrorKind::Protocol, e.to_string()),
            );
        }
    }
}

/// Queues the `Stdin` frames that follow a `SendStdin` until `Done` or
/// `StdinEof`.
fn send_stdin(reader: &mut FrameReader<&File>, proc: &Proc) -> Frame {
    loop {
        let (data, eof) = match reader.read_frame() {
            Ok(Some(Frame::Stdin(data))) => (data, false),
            Ok(Some(Frame::StdinEof)) => (Vec::new(), true),
            Ok(Some(Frame::Done)) => return Frame::Done,
            Ok(Some(other)) => {
                return Frame::error(
                    ErrorKind::Protocol,
                    unexpected(&other, "Stdin, StdinEof or Done").to_string(),
                )
            }
            Ok(None) | Err(ProtoError::Io(_)) => return Frame::Done,
            Err(e) => return Frame::error(ErrorKind::Protocol, e.to_string()),
        };
        match proc.push_stdin(&data, eof) {
            Ok(()) if eof => return Frame::Done,
            Ok(()) => {}
            Err(StdinError::Ended) => return not_found(proc.pid),
            Err(StdinError::Closed) => {
                return Frame::error(
                    ErrorKind::InvalidRequest,
                    format!(
                        "the standard input of command {} is closed (or it was started \
                         without an open stdin)",
                        proc.pid
                    ),
                )
            }
        }
    }
}
