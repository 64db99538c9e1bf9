//! One Python interpreter process (a context of [`crate::code`]) and the
//! exchange of one run with it.
//!
//! The interpreter is `python3 -u` running `driver.py` (embedded in the
//! agent), in its own process group, with descriptor 0 on `/dev/null`
//! (code that reads stdin gets EOF), 1 and 2 on pipes the agent forwards as
//! the run's `Stdout`/`Stderr` frames (python's own output and that of any
//! command the code starts), 3 a pipe of requests and 4 a pipe of events,
//! one JSON object a line each way (the format is described at the top of
//! `driver.py`).
//!
//! The driver runs user code, so its events are untrusted: a line longer
//! than [`MAX_EVENT_LINE`], one that is not a known event, or an event out
//! of order ends the run with an `Internal` error and the interpreter is
//! replaced. Texts are cut to fit a frame.
//!
//! The pipes are read only while a run is in progress: what background
//! threads or commands write between runs waits in the pipes (up to their
//! size; a writer then blocks) and is sent with the next run's output.
//!
//! A run that passes its timeout, or whose host goes away, is interrupted in
//! three stages, [`STAGE_GRACE`] apart: `SIGINT` to the interpreter (the
//! driver raises `KeyboardInterrupt` in the code), then `SIGINT` to its
//! whole process group (a foreground command such as `os.system("sleep
//! 100")`, during which python ignores `SIGINT`), then `SIGKILL` to the
//! group, which ends the interpreter.

use std::fs::File;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::proto::{
    encode_header, write_frame, CodeEnd, CodeError, CodeResult, ErrorKind, Frame, FrameReader,
    FrameType, DATA_CHUNK, HEADER_LEN,
};
use crate::spawn::{self, Refusal};
use crate::sys;

/// The driver script.
const DRIVER: &str = include_str!("driver.py");

/// Runs the driver from the file named by the next argument, under a file
/// name of its own (so its frames can be told from the user's in
/// tracebacks).
const BOOTSTRAP: &str =
    "import sys;exec(compile(open(sys.argv.pop(1)).read(),'<dormouse-driver>','exec'))";

/// Writes the driver to a file of its own and returns the file's path:
/// `/run` (a tmpfs in the guest), else the temporary directory.
///
/// A file, not an argument: the driver is 10 KiB, which as an argument
/// would fill every process listing (`ps`, the commands service) of the
/// sandbox. Written at every interpreter start (user code may delete it),
/// through a temporary name and a rename, so a concurrent start never reads
/// half a file.
fn driver_file() -> io::Result<String> {
    let mut last = None;
    for dir in [std::path::PathBuf::from("/run"), std::env::temp_dir()] {
        let path = dir.join("dormouse-driver.py");
        let tmp = dir.join(format!(
            ".dormouse-driver-{}-{:?}.py",
            std::process::id(),
            std::thread::current().id()
        ));
        let written = std::fs::write(&tmp, DRIVER).and_then(|()| std::fs::rename(&tmp, &path));
        match written {
            Ok(()) => return Ok(path.to_string_lossy().into_owned()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no directory for the driver")))
}

/// The longest event line the driver may send (4 MiB).
pub const MAX_EVENT_LINE: usize = 4 << 20;

/// Time between the stages of an interrupt.
pub const STAGE_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the exit status of an interpreter that is gone.
const STATUS_WAIT_MS: libc::c_int = 5_000;

/// Caps, in bytes, of the texts sent to the host; with JSON's worst-case
/// escaping (6 bytes a byte) each frame stays under the 1 MiB frame cap.
const MAX_RESULT: usize = 160 * 1024;
const MAX_NAME: usize = 256;
const MAX_VALUE: usize = 64 * 1024;
const MAX_TRACEBACK: usize = 96 * 1024;

/// At most this many bytes are drained from an output pipe before an event
/// is forwarded (bounded even if a background command writes without end).
const MAX_DRAIN: usize = 4 * DATA_CHUNK;

/// The name of the [`CodeError`] reported when the interpreter ended during
/// a run (it exited, was killed, or ignored an interrupt).
pub const INTERPRETER_DIED: &str = "InterpreterDied";

/// A request line to the driver.
#[derive(Serialize)]
struct Request<'a> {
    code: &'a str,
    env: &'a [(String, String)],
}

/// An event line from the driver.
#[derive(Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Event {
    Ready,
    Result {
        text: String,
    },
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    End,
}

/// A running interpreter. Dropping it kills its process group.
pub struct Interp {
    /// Its pid, also its process group id.
    pub pid: libc::pid_t,
    /// Write end of the request pipe (non-blocking).
    requests: File,
    /// Read end of the event pipe (non-blocking).
    events: File,
    /// Read ends of its output pipes (non-blocking), `None` after EOF.
    stdout: Option<File>,
    stderr: Option<File>,
    /// Where the reaper sends its `waitpid` status.
    status: File,
    /// Bytes of an event line not complete yet.
    partial: Vec<u8>,
    /// Whether the driver has said it is ready.
    ready: bool,
    /// Runs executed, for `CodeEnd::execution_count`.
    count: u64,
}

/// How a run ended, for the context table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The interpreter is ready for the next run.
    Kept,
    /// The interpreter is gone or broken and must be replaced.
    Lost,
}

impl Interp {
    /// Starts an interpreter in `cwd`.
    pub fn start(cwd: &str) -> Result<Self, Refusal> {
        let driver = driver_file()?;
        let argv = ["python3", "-u", "-c", BOOTSTRAP, &driver].map(String::from);
        let env = [("PYTHONDONTWRITEBYTECODE", "1"), ("PYTHONUNBUFFERED", "1")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let prepared = spawn::prepare(&argv, &env, Some(cwd))?;
        let (req_r, req_w) = sys::pipe()?;
        let (ev_r, ev_w) = sys::pipe()?;
        let (out_r, out_w) = sys::pipe()?;
        let (err_r, err_w) = sys::pipe()?;
        // One write for a whole request of the biggest size, mostly.
        sys::grow_pipe(&req_w, 1 << 20);
        sys::grow_pipe(&out_r, DATA_CHUNK);
        sys::grow_pipe(&err_r, DATA_CHUNK);
        for ours in [&req_w, &ev_r, &out_r, &err_r] {
            sys::set_nonblocking(ours)?;
        }
        let null = File::open("/dev/null")?;
        let (pid, status) = prepared.spawn(&[
            (&null, 0),
            (&out_w, 1),
            (&err_w, 2),
            (&req_r, 3),
            (&ev_w, 4),
        ])?;
        Ok(Self {
            pid,
            requests: req_w,
            events: ev_r,
            stdout: Some(out_r),
            stderr: Some(err_r),
            status,
            partial: Vec::new(),
            ready: false,
            count: 0,
        })
    }

    /// Whether the interpreter has ended since its last run (checked
    /// without waiting): `Some(how)` when it has.
    pub fn ended(&mut self) -> Option<String> {
        let mut fds = [
            sys::pollfd(&self.status, libc::POLLIN),
            sys::pollfd(&self.events, libc::POLLIN),
        ];
        match sys::poll(&mut fds, 0) {
            Ok(0) => None,
            Ok(_) if fds[0].revents != 0 || fds[1].revents & libc::POLLHUP != 0 => {
                Some(self.reap())
            }
            Ok(_) => None,
            Err(e) => Some(format!("could not be checked ({e})")),
        }
    }

    /// Kills the process group and says how the interpreter ended.
    fn reap(&mut self) -> String {
        sys::kill_group(self.pid, libc::SIGKILL);
        let mut fds = [sys::pollfd(&self.status, libc::POLLIN)];
        let mut raw = [0u8; 4];
        match sys::poll(&mut fds, STATUS_WAIT_MS) {
            Ok(1) if matches!((&self.status).read(&mut raw), Ok(4)) => {
                describe_status(libc::c_int::from_ne_bytes(raw))
            }
            _ => "ended".into(),
        }
    }

    /// Runs `code` and answers the host on `conn` with its output, result,
    /// error and end. `stopped` says, when the interpreter was killed from
    /// outside (its context removed or restarted), why.
    pub fn run(
        &mut self,
        conn: &File,
        reader: &mut FrameReader<&File>,
        code: &str,
        env: &[(String, String)],
        timeout: Option<Duration>,
        stopped: &dyn Fn() -> Option<&'static str>,
    ) -> Outcome {
        let mut request = match serde_json::to_vec(&Request { code, env }) {
            Ok(r) => r,
            Err(e) => {
                let _ = write_frame(
                    &mut &*conn,
                    &Frame::error(ErrorKind::Internal, format!("cannot encode the code: {e}")),
                );
                return Outcome::Kept;
            }
        };
        request.push(b'\n');
        let mut run = Run {
            interp: self,
            conn,
            host: true,
            request,
            written: 0,
            timeout,
            deadline: None,
            stage: 0,
            next_stage: None,
            interrupt_on_ready: false,
            timed_out: false,
            result_sent: false,
            error_sent: false,
            buf: vec![0u8; HEADER_LEN + DATA_CHUNK],
            stopped,
        };
        if run.interp.ready {
            run.deadline = timeout.map(|t| Instant::now() + t);
        }
        // Frames the host sent after its request are a violation.
        if !matches!(reader.next_buffered(), Ok(None)) {
            run.host_violation();
        }
        run.drive(reader)
    }
}

impl Drop for Interp {
    fn drop(&mut self) {
        sys::kill_group(self.pid, libc::SIGKILL);
    }
}

/// The state of one run.
struct Run<'a> {
    interp: &'a mut Interp,
    conn: &'a File,
    /// Whether the host is still there to answer.
    host: bool,
    request: Vec<u8>,
    written: usize,
    timeout: Option<Duration>,
    /// When the code's time is up (starts once the driver is ready).
    deadline: Option<Instant>,
    /// Interrupt stages done (0..=3).
    stage: u8,
    next_stage: Option<Instant>,
    /// The host went away before the driver was ready.
    interrupt_on_ready: bool,
    timed_out: bool,
    result_sent: bool,
    error_sent: bool,
    /// Room for a frame header and one read of output.
    buf: Vec<u8>,
    stopped: &'a dyn Fn() -> Option<&'static str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Conn,
    Requests,
    Stdout,
    Stderr,
    Events,
}

impl Run<'_> {
    fn drive(&mut self, reader: &mut FrameReader<&File>) -> Outcome {
        let mut sources = Vec::with_capacity(5);
        let mut fds = Vec::with_capacity(5);
        loop {
            if !self.host && self.written == 0 {
                // The host left before the driver got anything: nothing to
                // interrupt.
                return Outcome::Kept;
            }
            sources.clear();
            fds.clear();
            if self.host {
                sources.push(Source::Conn);
                fds.push(sys::pollfd(self.conn, libc::POLLIN));
            }
            if self.written < self.request.len() {
                sources.push(Source::Requests);
                fds.push(sys::pollfd(&self.interp.requests, libc::POLLOUT));
            }
            if let Some(f) = &self.interp.stdout {
                sources.push(Source::Stdout);
                fds.push(sys::pollfd(f, libc::POLLIN));
            }
            if let Some(f) = &self.interp.stderr {
                sources.push(Source::Stderr);
                fds.push(sys::pollfd(f, libc::POLLIN));
            }
            sources.push(Source::Events);
            fds.push(sys::pollfd(&self.interp.events, libc::POLLIN));

            let wake = match (self.stage, self.deadline) {
                (0, Some(d)) => Some(d),
                (0, None) => None,
                _ => self.next_stage,
            };
            let timeout_ms = wake.map_or(-1, |w| {
                let left = w.saturating_duration_since(Instant::now());
                libc::c_int::try_from(left.as_millis().saturating_add(1))
                    .unwrap_or(libc::c_int::MAX)
            });
            let n = match sys::poll(&mut fds, timeout_ms) {
                Ok(n) => n,
                Err(e) => return self.broken(&format!("cannot wait for the interpreter: {e}")),
            };
            if n == 0 || wake.is_some_and(|w| Instant::now() >= w) {
                if self.stage == 0 {
                    self.timed_out = true;
                }
                self.escalate();
            }
            for (src, fd) in sources.iter().zip(&fds) {
                if fd.revents == 0 {
                    continue;
                }
                match src {
                    Source::Conn => self.read_host(reader),
                    Source::Requests => self.write_request(),
                    Source::Stdout => {
                        self.forward(FrameType::Stdout);
                    }
                    Source::Stderr => {
                        self.forward(FrameType::Stderr);
                    }
                    Source::Events => {
                        if let Some(outcome) = self.read_events() {
                            return outcome;
                        }
                    }
                }
            }
        }
    }

    /// The host sent bytes (a violation: nothing may follow a run request)
    /// or closed the connection.
    fn read_host(&mut self, reader: &mut FrameReader<&File>) {
        match reader.fill() {
            Ok(0) | Err(_) => self.host_gone(),
            Ok(_) => self.host_violation(),
        }
    }

    fn host_violation(&mut self) {
        let _ = write_frame(
            &mut &*self.conn,
            &Frame::error(
                ErrorKind::Protocol,
                "the host sent data after its code request, which takes none; the run was \
                 interrupted",
            ),
        );
        self.host_gone();
    }

    fn host_gone(&mut self) {
        if !self.host {
            return;
        }
        self.host = false;
        if self.written == 0 {
            return;
        }
        if self.interp.ready {
            if self.stage == 0 {
                self.escalate();
            }
        } else {
            self.interrupt_on_ready = true;
        }
    }

    /// Moves the interrupt on by one stage.
    fn escalate(&mut self) {
        let pid = self.interp.pid;
        match self.stage {
            0 => {
                // SAFETY: kill has no memory effects; `pid` is our child,
                // alive or a zombie we have not reaped (the reaper reaps it,
                // but its pid stays a process group id until the group is
                // empty, which a SIGINT to a gone group cannot hurt).
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            1 => sys::kill_group(pid, libc::SIGINT),
            2 => sys::kill_group(pid, libc::SIGKILL),
            _ => {
                // Killed: the event pipe's EOF ends the run.
                self.next_stage = None;
                return;
            }
        }
        self.stage += 1;
        self.next_stage = Some(Instant::now() + STAGE_GRACE);
    }

    fn write_request(&mut self) {
        if !self.host && self.written == 0 {
            return;
        }
        match (&self.interp.requests).write(&self.request[self.written..]) {
            Ok(n) => self.written += n,
            Err(e) if sys::try_again(&e) => {}
            // EPIPE: the interpreter is gone; its events pipe says so next.
            Err(_) => self.written = self.request.len(),
        }
    }

    /// Sends one read of an output pipe to the host. Returns whether
    /// anything was read.
    fn forward(&mut self, ty: FrameType) -> bool {
        let pipe = match ty {
            FrameType::Stdout => &mut self.interp.stdout,
            _ => &mut self.interp.stderr,
        };
        let Some(file) = pipe else {
            return false;
        };
        let n = match file.read(&mut self.buf[HEADER_LEN..]) {
            Ok(0) => {
                *pipe = None;
                return false;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => {
                *pipe = None;
                return false;
            }
        };
        if self.host {
            let Ok(header) = encode_header(ty, n) else {
                return true;
            };
            self.buf[..HEADER_LEN].copy_from_slice(&header);
            if (&*self.conn)
                .write_all(&self.buf[..HEADER_LEN + n])
                .is_err()
            {
                self.host_gone();
            }
        }
        true
    }

    /// Forwards what the output pipes hold now (the driver flushed its
    /// output before the event that follows).
    fn drain(&mut self) {
        for ty in [FrameType::Stdout, FrameType::Stderr] {
            let mut budget = MAX_DRAIN;
            while budget > 0 && self.forward(ty) {
                budget = budget.saturating_sub(DATA_CHUNK);
            }
        }
    }

    fn send(&mut self, frame: &Frame) {
        if self.host && write_frame(&mut &*self.conn, frame).is_err() {
            self.host_gone();
        }
    }

    /// Reads the event pipe and handles every complete line; `Some` once
    /// the run is over.
    fn read_events(&mut self) -> Option<Outcome> {
        let mut chunk = [0u8; 64 * 1024];
        let n = match (&self.interp.events).read(&mut chunk) {
            Ok(0) => return Some(self.died()),
            Ok(n) => n,
            Err(e) if sys::try_again(&e) => return None,
            Err(e) => return Some(self.broken(&format!("cannot read its events: {e}"))),
        };
        self.interp.partial.extend_from_slice(&chunk[..n]);
        while let Some(end) = self.interp.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.interp.partial.drain(..=end).collect();
            let event = match parse_event(&line[..end]) {
                Ok(event) => event,
                Err(why) => return Some(self.broken(&why)),
            };
            if let Some(outcome) = self.handle(event) {
                return Some(outcome);
            }
        }
        if self.interp.partial.len() > MAX_EVENT_LINE {
            return Some(self.broken(&format!(
                "it sent a message line longer than {MAX_EVENT_LINE} bytes"
            )));
        }
        None
    }

    fn handle(&mut self, event: Event) -> Option<Outcome> {
        let requested = self.written == self.request.len();
        match event {
            Event::Ready if !self.interp.ready => {
                self.interp.ready = true;
                self.deadline = self.timeout.map(|t| Instant::now() + t);
                if self.interrupt_on_ready {
                    self.escalate();
                }
                None
            }
            Event::Result { text }
                if self.interp.ready && requested && !self.result_sent && !self.error_sent =>
            {
                self.drain();
                self.result_sent = true;
                self.send(&Frame::CodeResult(CodeResult {
                    text: cut(text, MAX_RESULT, false),
                }));
                None
            }
            Event::Error {
                name,
                value,
                traceback,
            } if self.interp.ready && requested && !self.error_sent => {
                self.drain();
                self.error_sent = true;
                self.send(&Frame::CodeError(CodeError {
                    name: cut(name, MAX_NAME, false),
                    value: cut(value, MAX_VALUE, false),
                    traceback: cut(traceback, MAX_TRACEBACK, true),
                }));
                None
            }
            Event::End if self.interp.ready && requested => {
                self.drain();
                self.interp.count += 1;
                self.end();
                Some(Outcome::Kept)
            }
            other => Some(self.broken(&format!("it sent {other:?} out of order"))),
        }
    }

    fn end(&mut self) {
        let end = CodeEnd {
            execution_count: self.interp.count,
            timed_out: self.timed_out,
        };
        self.send(&Frame::CodeEnd(end));
    }

    /// The interpreter ended during the run: reported as an
    /// [`INTERPRETER_DIED`] error.
    fn died(&mut self) -> Outcome {
        self.drain();
        let how = self.interp.reap();
        let value = if let Some(why) = (self.stopped)() {
            format!("the Python interpreter was stopped because {why}")
        } else if self.stage >= 3 {
            format!(
                "the code did not stop within {} s of being interrupted, so the Python \
                 interpreter was killed; its variables are lost and the next run starts a fresh \
                 one",
                STAGE_GRACE.as_secs() * 2
            )
        } else {
            format!(
                "the Python interpreter {how} while the code ran; its variables are lost and \
                 the next run starts a fresh one"
            )
        };
        if !self.error_sent {
            self.send(&Frame::CodeError(CodeError {
                name: INTERPRETER_DIED.into(),
                value,
                traceback: String::new(),
            }));
        }
        self.interp.count += 1;
        self.end();
        Outcome::Lost
    }

    /// The driver broke the protocol (or the agent lost it): the run ends
    /// with an `Internal` error and the interpreter is replaced.
    fn broken(&mut self, why: &str) -> Outcome {
        self.drain();
        sys::kill_group(self.interp.pid, libc::SIGKILL);
        self.send(&Frame::error(
            ErrorKind::Internal,
            format!(
                "lost the Python interpreter: {why}; it was killed (its variables are lost) and \
                 the next run starts a fresh one"
            ),
        ));
        Outcome::Lost
    }
}

/// Parses one event line.
fn parse_event(line: &[u8]) -> Result<Event, String> {
    serde_json::from_slice(line).map_err(|e| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
        format!("it sent a malformed message ({e}): {shown:?}")
    })
}

/// Cuts `text` to at most `max` bytes at a character boundary, keeping the
/// start (or, with `keep_tail`, the end).
fn cut(mut text: String, max: usize, keep_tail: bool) -> String {
    if text.len() <= max {
        return text;
    }
    const MARK: &str = "[...]";
    let keep = max - MARK.len();
    if keep_tail {
        let mut start = text.len() - keep;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("{MARK}{}", &text[start..])
    } else {
        let mut end = keep;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(MARK);
        text
    }
}

/// "exited with code 3", "was killed by signal 9".
fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited with code {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("was killed by signal {}", libc::WTERMSIG(status))
    } else {
        "ended".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse_and_bad_ones_are_refused() {
        assert_eq!(parse_event(br#"{"t":"ready"}"#), Ok(Event::Ready));
        assert_eq!(parse_event(br#"{"t":"end","extra":1}"#), Ok(Event::End));
        assert_eq!(
            parse_event(br#"{"t":"result","text":"42"}"#),
            Ok(Event::Result { text: "42".into() })
        );
        for bad in [
            &br#"{"t":"result"}"#[..],
            br#"{"t":"launch"}"#,
            br#"[1,2]"#,
            b"\xff\xfe",
            br#"{"t":"result","text":"\ud800"}"#,
        ] {
            assert!(parse_event(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn texts_are_cut_at_character_boundaries() {
        assert_eq!(cut("short".into(), 10, false), "short");
        let long = "é".repeat(100);
        let head = cut(long.clone(), 51, false);
        assert!(head.len() <= 51 && head.ends_with("[...]"), "{head}");
        let tail = cut(long, 51, true);
        assert!(tail.len() <= 51 && tail.starts_with("[...]"), "{tail}");
    }

    #[test]
    fn frames_of_capped_texts_fit() {
        let worst = "\u{1}".repeat(MAX_TRACEBACK);
        let frame = Frame::CodeError(CodeError {
            name: "\u{1}".repeat(MAX_NAME),
            value: "\u{1}".repeat(MAX_VALUE),
            traceback: worst,
        });
        assert!(crate::proto::encode(&frame).is_ok());
        let frame = Frame::CodeResult(CodeResult {
            text: "\u{1}".repeat(MAX_RESULT),
        });
        assert!(crate::proto::encode(&frame).is_ok());
    }

    #[test]
    fn statuses_are_described() {
        assert_eq!(describe_status(3 << 8), "exited with code 3");
        assert_eq!(describe_status(9), "was killed by signal 9");
    }
}
