//! `FileRequest::Watch`: reports changes under a directory with inotify.
//!
//! The watch answers `Done` once every directory is watched, then sends one
//! `FileEvent` frame per change, all events of one inotify read in one
//! write. It waits in `poll` on the inotify descriptor and the connection
//! together (never on a timer) and ends, closing the inotify descriptor,
//! when the host closes the connection or the watched directory itself is
//! removed or moved away.
//!
//! Mapping: `IN_CREATE` is Create; `IN_MODIFY` and `IN_CLOSE_WRITE` are
//! Write (repeats of the same event within one read are sent once);
//! `IN_DELETE` and an unmatched `IN_MOVED_FROM` are Remove; `IN_MOVED_TO`
//! is Rename when it completes an `IN_MOVED_FROM` of the same move (the
//! event names the new path), else Create; `IN_ATTRIB` is Chmod. A
//! recursive watch also watches directories created (or moved in) later,
//! and reports Create for what a new directory already holds when its watch
//! starts, so an entry can occasionally be reported twice. A queue overflow
//! loses events; it is logged and the watch goes on.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::files::{absolute, io_failure, Failure};
use crate::log::log;
use crate::proto::{
    encode, write_frame, ErrorKind, FileEvent, FileEventKind, Frame, FrameReader, ProtoError,
};
use crate::sys;

/// The changes every watched directory reports.
const EVENTS: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;

/// Size of one read of the inotify descriptor: many events per (emulated)
/// system call.
const READ_SIZE: usize = 64 * 1024;

/// Sets up the watch, answers `Done`, and streams events until the host
/// closes the connection.
pub fn serve(conn: &File, reader: &mut FrameReader<&File>, path: &str, recursive: bool) {
    let mut watch = match Watch::start(path, recursive) {
        Ok(w) => w,
        Err(Failure::Refused { kind, message }) => {
            let _ = write_frame(&mut &*conn, &Frame::error(kind, message));
            return;
        }
        Err(Failure::Gone) => return,
    };
    if write_frame(&mut &*conn, &Frame::Done).is_err() {
        return;
    }
    if let Err(Failure::Refused { kind, message }) = watch.run(conn, reader) {
        let _ = write_frame(&mut &*conn, &Frame::error(kind, message));
    }
}

/// An inotify instance and the directories it watches.
struct Watch {
    inotify: File,
    root: PathBuf,
    root_wd: i32,
    recursive: bool,
    /// Watch descriptor -> the directory's current path.
    dirs: HashMap<i32, PathBuf>,
    /// Whether running out of watches was logged already.
    warned_full: bool,
    /// The root went away: send what is pending and stop.
    ended: bool,
}

/// One inotify event, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// The watch descriptor.
    pub wd: i32,
    /// `IN_*` bits.
    pub mask: u32,
    /// Ties the two halves of a rename together.
    pub cookie: u32,
    /// The entry's name in the watched directory (empty for the directory
    /// itself).
    pub name: &'a [u8],
}

/// Splits a buffer filled by `read` on an inotify descriptor into events
/// (`struct inotify_event`: wd, mask, cookie, len, then `len` bytes of
/// NUL-padded name). A truncated tail is ignored.
pub fn parse_events(buf: &[u8]) -> Vec<RawEvent<'_>> {
    const FIXED: usize = 16;
    let mut out = Vec::new();
    let mut rest = buf;
    while rest.len() >= FIXED {
        let word = |i: usize| [rest[i], rest[i + 1], rest[i + 2], rest[i + 3]];
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let cookie = u32::from_ne_bytes(word(8));
        let len = u32::from_ne_bytes(word(12)) as usize;
        let Some(name) = rest.get(FIXED..FIXED + len) else {
            break;
        };
        let name = match name.iter().position(|&b| b == 0) {
            Some(end) => &name[..end],
            None => name,
        };
        out.push(RawEvent {
            wd,
            mask,
            cookie,
            name,
        });
        rest = &rest[FIXED + len..];
    }
    out
}

impl Watch {
    /// Watches `path` (following a symlink to it) and, when `recursive`,
    /// every directory below it.
    fn start(path: &str, recursive: bool) -> Result<Self, Failure> {
        let root = absolute(path)?;
        let meta = fs::metadata(&root)
            .map_err(|e| io_failure(&e, "watch", &root.display().to_string()))?;
        if !meta.is_dir() {
            return Err(Failure::new(
                ErrorKind::NotADirectory,
                format!(
                    "cannot watch {}: it is not a directory; watch the directory that holds it",
                    root.display()
                ),
            ));
        }
        let inotify = inotify_init().map_err(|e| {
            Failure::new(
                ErrorKind::Internal,
                format!(
                    "cannot watch {}: no inotify instance ({e}); close other watches (the \
                     guest allows fs.inotify.max_user_instances of them)",
                    root.display()
                ),
            )
        })?;
        let root_wd = add_watch(&inotify, &root, EVENTS).map_err(|e| watch_failure(&e, &root))?;
        let mut watch = Self {
            inotify,
            root: root.clone(),
            root_wd,
            recursive,
            dirs: HashMap::from([(root_wd, root.clone())]),
            warned_full: false,
            ended: false,
        };
        if recursive {
            watch.add_tree(&root, None, true)?;
        }
        Ok(watch)
    }

    /// Watches the directories below `dir` (not through symlinks). With
    /// `found`, reports a Create for every entry met. During set-up
    /// (`strict`) running out of watches fails the request; later it is
    /// logged and the tree is watched in part.
    fn add_tree(
        &mut self,
        dir: &Path,
        mut found: Option<&mut Vec<FileEvent>>,
        strict: bool,
    ) -> Result<(), Failure> {
        let mut stack = vec![dir.to_path_buf()];
        while let Some(dir) = stack.pop() {
            // A directory that vanished or may not be read is skipped.
            let Ok(read) = fs::read_dir(&dir) else {
                continue;
            };
            for item in read.flatten() {
                let path = item.path();
                if let Some(out) = found.as_deref_mut() {
                    push(out, FileEventKind::Create, &path);
                }
                // d_type from readdir: no extra system call.
                if !item.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                match add_watch(&self.inotify, &path, EVENTS | libc::IN_DONT_FOLLOW) {
                    Ok(wd) => {
                        self.dirs.insert(wd, path.clone());
                        stack.push(path);
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                        if strict {
                            return Err(watch_failure(&e, &path));
                        }
                        if !self.warned_full {
                            self.warned_full = true;
                            log!(
                                "watch of {}: out of inotify watches at {}; changes below it \
                                 are not reported",
                                self.root.display(),
                                path.display()
                            );
                        }
                    }
                    // Gone already, or not a directory any more.
                    Err(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Streams events until the host closes the connection (`Ok`) or
    /// violates the protocol (`Err`).
    fn run(&mut self, conn: &File, reader: &mut FrameReader<&File>) -> Result<(), Failure> {
        let mut buf = vec![0u8; READ_SIZE];
        loop {
            // The host sends nothing after the request: any frame is a
            // violation.
            match reader.next_buffered() {
                Ok(None) => {}
                Ok(Some(other)) => {
                    return Err(protocol(ProtoError::UnexpectedFrame {
                        got: other.frame_type(),
                        expected: "nothing (close the connection to stop watching)",
                    }))
                }
                Err(e) => return Err(protocol(e)),
            }
            let mut fds = [
                sys::pollfd(&self.inotify, libc::POLLIN),
                sys::pollfd(conn, libc::POLLIN),
            ];
            if let Err(e) = sys::poll(&mut fds, -1) {
                log!("watch of {}: poll failed: {e}", self.root.display());
                return Ok(());
            }
            if fds[1].revents != 0 {
                match reader.fill() {
                    Ok(0) | Err(_) => return Ok(()),
                    Ok(_) => continue,
                }
            }
            if fds[0].revents == 0 {
                continue;
            }
            let n = match (&self.inotify).read(&mut buf) {
                Ok(n) => n,
                Err(e) if sys::try_again(&e) => continue,
                Err(e) => {
                    return Err(Failure::new(
                        ErrorKind::Internal,
                        format!(
                            "watching {} failed: {e}; watch it again",
                            self.root.display()
                        ),
                    ))
                }
            };
            let events = self.handle(&parse_events(&buf[..n]));
            let mut bytes = Vec::new();
            for event in events {
                if let Ok(frame) = encode(&Frame::FileEvent(event)) {
                    bytes.extend_from_slice(&frame);
                }
            }
            if !bytes.is_empty() && (&mut &*conn).write_all(&bytes).is_err() {
                return Ok(());
            }
            if self.ended {
                return Ok(());
            }
        }
    }

    /// Turns one read's inotify events into file events, keeping the
    /// watched-directory table up to date.
    fn handle(&mut self, events: &[RawEvent<'_>]) -> Vec<FileEvent> {
        let mut out = Vec::new();
        // The first half of a move, until its second half (or another
        // event) arrives: (cookie, old path, is a directory).
        let mut moved_from: Option<(u32, PathBuf, bool)> = None;
        for ev in events {
            let completes_move = ev.mask & libc::IN_MOVED_TO != 0
                && moved_from.as_ref().is_some_and(|(c, _, _)| *c == ev.cookie);
            if !completes_move {
                if let Some((_, from, is_dir)) = moved_from.take() {
                    self.moved_out(&mut out, &from, is_dir);
                }
            }
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                log!(
                    "watch of {}: the inotify queue overflowed; some changes were not reported",
                    self.root.display()
                );
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                self.dirs.remove(&ev.wd);
                if ev.wd == self.root_wd {
                    self.ended = true;
                }
                continue;
            }
            let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
                continue;
            };
            if ev.name.is_empty() {
                // The watched directory itself. Its parent's watch reports
                // it by name, except for the root.
                if ev.wd == self.root_wd {
                    if ev.mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF) != 0 {
                        push(&mut out, FileEventKind::Remove, &self.root);
                        self.ended = true;
                    } else if ev.mask & libc::IN_ATTRIB != 0 {
                        push(&mut out, FileEventKind::Chmod, &self.root);
                    }
                }
                continue;
            }
            let path = dir.join(OsStr::from_bytes(ev.name));
            let is_dir = ev.mask & libc::IN_ISDIR != 0;
            if ev.mask & libc::IN_CREATE != 0 {
                push(&mut out, FileEventKind::Create, &path);
                if is_dir && self.recursive {
                    self.watch_new_dir(&path, Some(&mut out));
                }
            } else if ev.mask & (libc::IN_MODIFY | libc::IN_CLOSE_WRITE) != 0 {
                push(&mut out, FileEventKind::Write, &path);
            } else if ev.mask & libc::IN_DELETE != 0 {
                push(&mut out, FileEventKind::Remove, &path);
            } else if ev.mask & libc::IN_MOVED_FROM != 0 {
                moved_from = Some((ev.cookie, path, is_dir));
            } else if ev.mask & libc::IN_MOVED_TO != 0 {
                if completes_move {
                    let from = moved_from.take().map(|(_, from, _)| from);
                    push(&mut out, FileEventKind::Rename, &path);
                    if let (Some(from), true) = (from, is_dir && self.recursive) {
                        self.renamed_dir(&from, &path);
                    }
                } else {
                    push(&mut out, FileEventKind::Create, &path);
                    if is_dir && self.recursive {
                        self.watch_new_dir(&path, None);
                    }
                }
            } else if ev.mask & libc::IN_ATTRIB != 0 {
                push(&mut out, FileEventKind::Chmod, &path);
            }
        }
        if let Some((_, from, is_dir)) = moved_from.take() {
            self.moved_out(&mut out, &from, is_dir);
        }
        out
    }

    /// Watches a directory that appeared (and what is below it).
    fn watch_new_dir(&mut self, path: &Path, found: Option<&mut Vec<FileEvent>>) {
        match add_watch(&self.inotify, path, EVENTS | libc::IN_DONT_FOLLOW) {
            Ok(wd) => {
                self.dirs.insert(wd, path.to_path_buf());
            }
            // Gone already, or out of watches (logged by add_tree next time).
            Err(_) => return,
        }
        let _ = self.add_tree(path, found, false);
    }

    /// An entry left the watched tree: report it, and stop watching a
    /// directory's subtree (its events would carry stale paths).
    fn moved_out(&mut self, out: &mut Vec<FileEvent>, from: &Path, is_dir: bool) {
        push(out, FileEventKind::Remove, from);
        if !is_dir {
            return;
        }
        let gone: Vec<i32> = self
            .dirs
            .iter()
            .filter(|(_, p)| p.starts_with(from))
            .map(|(wd, _)| *wd)
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            // SAFETY: inotify_rm_watch has no memory effects; a stale wd
            // only gives EINVAL.
            unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), wd) };
        }
    }

    /// A watched directory moved within the tree: its watches stay, their
    /// paths change.
    fn renamed_dir(&mut self, from: &Path, to: &Path) {
        for path in self.dirs.values_mut() {
            if let Ok(rest) = path.strip_prefix(from) {
                *path = to.join(rest);
            }
        }
    }
}

/// Appends an event unless it repeats the last one (a write is often
/// reported as several `IN_MODIFY` and an `IN_CLOSE_WRITE`), or its path
/// cannot travel in a frame.
fn push(out: &mut Vec<FileEvent>, kind: FileEventKind, path: &Path) {
    let event = FileEvent {
        kind,
        path: path.to_string_lossy().into_owned(),
    };
    if out.last() != Some(&event) && event.validate().is_ok() {
        out.push(event);
    }
}

fn protocol(e: ProtoError) -> Failure {
    Failure::new(ErrorKind::Protocol, e.to_string())
}

fn watch_failure(e: &io::Error, path: &Path) -> Failure {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Failure::new(
            ErrorKind::InvalidRequest,
            format!(
                "cannot watch {}: the guest ran out of inotify watches (one per directory); \
                 watch a smaller tree, or raise /proc/sys/fs/inotify/max_user_watches",
                path.display()
            ),
        );
    }
    io_failure(e, "watch", &path.display().to_string())
}

/// A non-blocking, close-on-exec inotify instance.
fn inotify_init() -> io::Result<File> {
    // SAFETY: inotify_init1 takes only flags and returns a new fd or -1.
    let fd = sys::cvt(unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) })?;
    // SAFETY: the call succeeded, so `fd` is a fresh descriptor owned by
    // nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Adds (or updates) the watch of `path`; returns its watch descriptor.
fn add_watch(inotify: &File, path: &Path, mask: u32) -> io::Result<i32> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call;
    // the fd is our open inotify instance.
    sys::cvt(unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), c_path.as_ptr(), mask) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(wd: i32, mask: u32, cookie: u32, name: &str, pad: usize) -> Vec<u8> {
        let mut b = Vec::new();
        let len = if name.is_empty() { 0 } else { name.len() + pad };
        b.extend_from_slice(&wd.to_ne_bytes());
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&cookie.to_ne_bytes());
        b.extend_from_slice(&(len as u32).to_ne_bytes());
        b.extend_from_slice(name.as_bytes());
        b.resize(b.len() + len - name.len().min(len), 0);
        b
    }

    #[test]
    fn parses_inotify_records() {
        let mut buf = raw(1, libc::IN_CREATE, 0, "a.txt", 3);
        buf.extend(raw(2, libc::IN_ATTRIB, 0, "", 0));
        buf.extend(raw(1, libc::IN_MOVED_FROM, 7, "b", 15));
        // A truncated record at the end is ignored.
        buf.extend_from_slice(&raw(3, libc::IN_DELETE, 0, "zzz", 1)[..18]);
        let evs = parse_events(&buf);
        assert_eq!(evs.len(), 3);
        assert_eq!((evs[0].wd, evs[0].name), (1, &b"a.txt"[..]));
        assert_eq!((evs[1].mask, evs[1].name), (libc::IN_ATTRIB, &b""[..]));
        assert_eq!((evs[2].cookie, evs[2].name), (7, &b"b"[..]));
        assert!(parse_events(&[0u8; 5]).is_empty());
    }

    fn watch_of(root: &str) -> Watch {
        Watch {
            inotify: inotify_init().unwrap(),
            root: root.into(),
            root_wd: 1,
            recursive: false,
            dirs: HashMap::from([(1, PathBuf::from(root)), (2, PathBuf::from("/r/sub"))]),
            warned_full: false,
            ended: false,
        }
    }

    fn ev(wd: i32, mask: u32, cookie: u32, name: &str) -> RawEvent<'_> {
        RawEvent {
            wd,
            mask,
            cookie,
            name: name.as_bytes(),
        }
    }

    fn kinds(events: &[FileEvent]) -> Vec<(FileEventKind, &str)> {
        events.iter().map(|e| (e.kind, e.path.as_str())).collect()
    }

    #[test]
    fn maps_events() {
        use FileEventKind::*;
        let mut w = watch_of("/r");
        let out = w.handle(&[
            ev(1, libc::IN_CREATE, 0, "f"),
            ev(1, libc::IN_MODIFY, 0, "f"),
            ev(1, libc::IN_MODIFY, 0, "f"),
            ev(1, libc::IN_CLOSE_WRITE, 0, "f"),
            ev(1, libc::IN_ATTRIB, 0, "f"),
            ev(1, libc::IN_MOVED_FROM, 9, "f"),
            ev(2, libc::IN_MOVED_TO, 9, "g"),
            ev(1, libc::IN_MOVED_TO, 10, "in"),
            ev(1, libc::IN_MOVED_FROM, 11, "out"),
            ev(2, libc::IN_DELETE, 0, "g"),
            ev(2, libc::IN_ATTRIB, 0, ""),
            ev(1, libc::IN_Q_OVERFLOW, 0, ""),
            ev(99, libc::IN_CREATE, 0, "unknown-wd"),
            ev(1, libc::IN_ATTRIB, 0, ""),
        ]);
        assert_eq!(
            kinds(&out),
            [
                (Create, "/r/f"),
                (Write, "/r/f"),
                (Chmod, "/r/f"),
                (Rename, "/r/sub/g"),
                (Create, "/r/in"),
                (Remove, "/r/out"),
                (Remove, "/r/sub/g"),
                (Chmod, "/r"),
            ]
        );
        assert!(!w.ended);
        // A move-out at the end of a read is a Remove.
        let out = w.handle(&[ev(1, libc::IN_MOVED_FROM, 12, "last")]);
        assert_eq!(kinds(&out), [(Remove, "/r/last")]);
        // The root going away ends the watch.
        let out = w.handle(&[
            ev(1, libc::IN_DELETE_SELF, 0, ""),
            ev(1, libc::IN_IGNORED, 0, ""),
        ]);
        assert_eq!(kinds(&out), [(Remove, "/r")]);
        assert!(w.ended);
    }

    #[test]
    fn tracks_moved_directories() {
        use FileEventKind::*;
        let mut w = watch_of("/r");
        w.recursive = true;
        w.dirs.insert(3, "/r/sub/deep".into());
        let out = w.handle(&[
            ev(1, libc::IN_MOVED_FROM | libc::IN_ISDIR, 5, "sub"),
            ev(1, libc::IN_MOVED_TO | libc::IN_ISDIR, 5, "moved"),
        ]);
        assert_eq!(kinds(&out), [(Rename, "/r/moved")]);
        assert_eq!(w.dirs[&2], Path::new("/r/moved"));
        assert_eq!(w.dirs[&3], Path::new("/r/moved/deep"));
        let out = w.handle(&[ev(3, libc::IN_CREATE, 0, "x")]);
        assert_eq!(kinds(&out), [(Create, "/r/moved/deep/x")]);
        // Moved out of the tree: its watches go.
        let out = w.handle(&[ev(1, libc::IN_MOVED_FROM | libc::IN_ISDIR, 6, "moved")]);
        assert_eq!(kinds(&out), [(Remove, "/r/moved")]);
        assert_eq!(w.dirs.len(), 1);
    }
}
