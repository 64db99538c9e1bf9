//! `FileRequest`: stat, list, make_dir, remove, rename, read and write
//! (watch lives in [`crate::watch`]).
//!
//! Every system call in the guest is emulated (milliseconds each), so file
//! bytes move in [`DATA_CHUNK`]-sized reads and writes, each `Data` frame
//! leaves in one write together with its header, and listings are sent in
//! batches. No request holds a whole file in memory.
//!
//! Paths are taken as given: relative ones are resolved against the agent's
//! working directory (`/` in a VM), and every `EntryInfo::path` sent back is
//! absolute. Names that are not UTF-8 are sent with U+FFFD replacements.

use std::collections::HashMap;
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::log::log;
use crate::proto::{
    encode, encode_header, write_frame, EntryInfo, EntryKind, ErrorKind, FileRequest, Frame,
    FrameReader, FrameType, ProtoError, DATA_CHUNK, HEADER_LEN,
};
use crate::watch;

/// The most entries one `List` answers; a larger tree is refused (the host
/// client enforces the same number, `dormouse::agent::files::MAX_LIST_ENTRIES`).
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// Permission bits of a file `Write` creates when the request gives none.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Listing frames are gathered up to this many bytes per write.
const LIST_BATCH: usize = 256 * 1024;

/// Answers one file request on `conn`.
pub fn serve(conn: &File, reader: &mut FrameReader<&File>, req: FileRequest) {
    let reply = match req {
        FileRequest::Stat { path } => stat(&path).map(Frame::Entry),
        FileRequest::List { path, depth } => list(conn, &path, depth),
        FileRequest::MakeDir { path } => make_dir(&path).map(Frame::Entry),
        FileRequest::Remove { path } => remove(&path).map(|()| Frame::Done),
        FileRequest::Rename { from, to } => rename(&from, &to).map(Frame::Entry),
        FileRequest::Read { path } => match read(conn, &path) {
            Ok(()) => return,
            Err(failure) => Err(failure),
        },
        FileRequest::Write { path, mode } => write(conn, reader, &path, mode),
        FileRequest::Watch { path, recursive } => {
            watch::serve(conn, reader, &path, recursive);
            return;
        }
    };
    let reply = match reply {
        Ok(frame) => frame,
        Err(Failure::Gone) => return,
        Err(Failure::Refused { kind, message }) => Frame::error(kind, message),
    };
    let _ = write_frame(&mut &*conn, &reply);
}

/// Why a request did not succeed.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answer with an `Error` frame.
    Refused {
        /// The category.
        kind: ErrorKind,
        /// A sentence that names the path and says what to do.
        message: String,
    },
    /// The host went away; nothing can be answered.
    Gone,
}

impl Failure {
    /// A refusal of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::Refused {
            kind,
            message: message.into(),
        }
    }
}

/// The error kind for an I/O error.
pub fn error_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        Some(libc::EEXIST | libc::ENOTEMPTY) => ErrorKind::AlreadyExists,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorKind::PermissionDenied,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::NoSpace,
        _ => ErrorKind::Internal,
    }
}

/// A refusal for `e`, which happened while `doing` (e.g. "read") `what`
/// (one path, or a sentence naming two).
pub fn io_failure(e: &io::Error, doing: &str, what: &str) -> Failure {
    let kind = error_kind(e);
    let hint = match kind {
        ErrorKind::NotFound => "it (or a directory on its path) does not exist; check the path",
        ErrorKind::IsADirectory => "it is a directory; give the path of a file",
        ErrorKind::NotADirectory => {
            "it (or a component of its path) is not a directory; check the path"
        }
        ErrorKind::AlreadyExists => {
            "something is in the way already; remove it first or choose another path"
        }
        ErrorKind::PermissionDenied => {
            "permission denied; change the permissions (or the read-only mount) in the guest"
        }
        ErrorKind::NoSpace => "the guest's disk is full; remove files or use a larger disk",
        _ => "the guest's file system failed; check the guest console",
    };
    Failure::new(kind, format!("cannot {doing} {what}: {hint} ({e})"))
}

/// [`io_failure`] about one path.
fn path_failure(e: &io::Error, doing: &str, path: &Path) -> Failure {
    io_failure(e, doing, &path.display().to_string())
}

/// `path` made absolute against the working directory (without touching
/// the file system: `..` and symlinks stay as they are).
pub fn absolute(path: &str) -> Result<PathBuf, Failure> {
    std::path::absolute(path).map_err(|e| {
        Failure::new(
            ErrorKind::Internal,
            format!("cannot make {path} absolute: {e}; give an absolute path"),
        )
    })
}

/// The metadata of `path` itself (a symlink is not followed).
fn stat(path: &str) -> Result<EntryInfo, Failure> {
    let path = absolute(path)?;
    let meta = fs::symlink_metadata(&path).map_err(|e| path_failure(&e, "stat", &path))?;
    Ok(entry(&path, &meta, &Names::load()))
}

/// Builds the entry of `path` from its `lstat` metadata (reading the link
/// target of a symlink).
fn entry(path: &Path, meta: &Metadata, names: &Names) -> EntryInfo {
    let symlink_target = meta
        .file_type()
        .is_symlink()
        .then(|| fs::read_link(path).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    entry_with_target(path, meta, names, symlink_target)
}

/// Builds an entry from metadata already at hand.
fn entry_with_target(
    path: &Path,
    meta: &Metadata,
    names: &Names,
    symlink_target: Option<String>,
) -> EntryInfo {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    let name = match path.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => path.to_string_lossy().into_owned(),
    };
    let modified_ns = meta
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec());
    EntryInfo {
        name,
        path: path.to_string_lossy().into_owned(),
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_ns,
        symlink_target,
    }
}

/// User and group names by id, from `/etc/passwd` and `/etc/group` (the
/// static agent cannot use NSS). Ids without a name show as numbers.
#[derive(Debug, Default, Clone)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

/// What a parsed id file looked like when it was read: re-read only when
/// it changed (one `stat` instead of an open, reads and a close).
type Stamp = (u64, u64, i64, i64, u64);

struct IdCache {
    passwd: Option<(Stamp, HashMap<u32, String>)>,
    group: Option<(Stamp, HashMap<u32, String>)>,
}

static ID_CACHE: Mutex<IdCache> = Mutex::new(IdCache {
    passwd: None,
    group: None,
});

impl Names {
    /// The current names (cached; re-parsed when a file changed).
    pub fn load() -> Self {
        let mut cache = ID_CACHE
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Self {
            users: cached_ids("/etc/passwd", &mut cache.passwd),
            groups: cached_ids("/etc/group", &mut cache.group),
        }
    }

    /// Names from the texts of a passwd and a group file.
    #[cfg(test)]
    pub fn parse(passwd: &str, group: &str) -> Self {
        Self {
            users: parse_id_file(passwd),
            groups: parse_id_file(group),
        }
    }

    /// The user name of `uid`, or the number.
    pub fn user(&self, uid: u32) -> String {
        self.users
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| uid.to_string())
    }

    /// The group name of `gid`, or the number.
    pub fn group(&self, gid: u32) -> String {
        self.groups
            .get(&gid)
            .cloned()
            .unwrap_or_else(|| gid.to_string())
    }
}

fn cached_ids(
    file: &str,
    slot: &mut Option<(Stamp, HashMap<u32, String>)>,
) -> HashMap<u32, String> {
    let Ok(meta) = fs::metadata(file) else {
        *slot = None;
        return HashMap::new();
    };
    let stamp = (
        meta.dev(),
        meta.ino(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.size(),
    );
    match slot {
        Some((s, map)) if *s == stamp => map.clone(),
        _ => {
            let map = fs::read_to_string(file)
                .map(|t| parse_id_file(&t))
                .unwrap_or_default();
            *slot = Some((stamp, map.clone()));
            map
        }
    }
}

/// Parses `name:password:id:...` lines (the layout of both `/etc/passwd`
/// and `/etc/group`); the first name of an id wins, malformed lines are
/// skipped.
pub fn parse_id_file(text: &str) -> HashMap<u32, String> {
    let mut map = HashMap::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') || line.starts_with(['+', '-']) {
            continue;
        }
        let mut fields = line.split(':');
        let (Some(name), Some(_), Some(id)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let Ok(id) = id.trim().parse::<u32>() else {
            continue;
        };
        if !name.is_empty() {
            map.entry(id).or_insert_with(|| name.to_string());
        }
    }
    map
}

/// Streams the entries under `path`, `depth` levels deep, then `Done`.
fn list(conn: &File, path: &str, depth: u32) -> Result<Frame, Failure> {
    let root = absolute(path)?;
    let names = Names::load();
    let mut out = Lister {
        conn,
        names: &names,
        batch: Vec::with_capacity(LIST_BATCH + 4096),
        count: 0,
    };
    out.dir(&root, depth, true)?;
    out.flush()?;
    Ok(Frame::Done)
}

struct Lister<'a> {
    conn: &'a File,
    names: &'a Names,
    batch: Vec<u8>,
    count: usize,
}

impl Lister<'_> {
    /// Sends the entries of `dir` (sorted by name), descending into
    /// subdirectories (never through symlinks) while `levels` > 1. Errors
    /// below the top directory (a subdirectory that vanished or may not be
    /// read) skip that subtree.
    fn dir(&mut self, dir: &Path, levels: u32, top: bool) -> Result<(), Failure> {
        let read = match fs::read_dir(dir) {
            Ok(read) => read,
            Err(e) if top => return Err(path_failure(&e, "list", dir)),
            Err(_) => return Ok(()),
        };
        let mut children = Vec::new();
        for item in read {
            let item = match item {
                Ok(item) => item,
                Err(e) if top => return Err(path_failure(&e, "list", dir)),
                Err(_) => break,
            };
            if self.count + children.len() >= MAX_LIST_ENTRIES {
                return Err(too_many());
            }
            children.push(item.file_name());
        }
        children.sort();
        for name in children {
            let path = dir.join(&name);
            // Gone since read_dir: skip it.
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            self.count += 1;
            if self.count > MAX_LIST_ENTRIES {
                return Err(too_many());
            }
            let info = entry(&path, &meta, self.names);
            // A path longer than the protocol allows (a very deep tree)
            // cannot be sent, nor can anything below it.
            if info.validate().is_err() {
                continue;
            }
            let frame = encode(&Frame::Entry(info)).map_err(internal)?;
            self.batch.extend_from_slice(&frame);
            if self.batch.len() >= LIST_BATCH {
                self.flush()?;
            }
            if levels > 1 && meta.is_dir() {
                self.dir(&path, levels - 1, false)?;
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Failure> {
        if !self.batch.is_empty() {
            (&mut &*self.conn)
                .write_all(&self.batch)
                .map_err(|_| Failure::Gone)?;
            self.batch.clear();
        }
        Ok(())
    }
}

fn too_many() -> Failure {
    Failure::new(
        ErrorKind::InvalidRequest,
        format!(
            "the listing has more than {MAX_LIST_ENTRIES} entries; list a smaller tree (a \
             subdirectory, or fewer levels)"
        ),
    )
}

fn internal(e: ProtoError) -> Failure {
    Failure::new(
        ErrorKind::Internal,
        format!("cannot encode the answer: {e}"),
    )
}

/// Creates `path` and its missing parents.
fn make_dir(path: &str) -> Result<EntryInfo, Failure> {
    let path = absolute(path)?;
    let created = match fs::create_dir(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Missing parents: create them, then the directory itself.
            match path.parent() {
                Some(parent) => fs::create_dir_all(parent),
                None => Ok(()),
            }
            .and_then(|()| fs::create_dir(&path))
        }
        other => other,
    };
    match created {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let is_dir = fs::metadata(&path).is_ok_and(|m| m.is_dir());
            let p = path.display();
            return Err(if is_dir {
                Failure::new(
                    ErrorKind::AlreadyExists,
                    format!("directory {p} exists already"),
                )
            } else {
                Failure::new(
                    ErrorKind::NotADirectory,
                    format!(
                        "cannot create directory {p}: a file is in the way; remove it first or \
                         choose another path"
                    ),
                )
            });
        }
        Err(e) => return Err(path_failure(&e, "create directory", &path)),
    }
    let meta = fs::symlink_metadata(&path).map_err(|e| path_failure(&e, "stat", &path))?;
    Ok(entry(&path, &meta, &Names::load()))
}

/// Removes a file, a symlink, or a directory with everything in it.
fn remove(path: &str) -> Result<(), Failure> {
    let path = absolute(path)?;
    if path.parent().is_none() {
        return Err(Failure::new(
            ErrorKind::InvalidRequest,
            "refusing to remove / (the guest's whole file system); remove the entries you mean",
        ));
    }
    let meta = fs::symlink_metadata(&path).map_err(|e| path_failure(&e, "remove", &path))?;
    let removed = if meta.is_dir() {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    };
    removed.map_err(|e| path_failure(&e, "remove", &path))
}

/// Renames `from` to `to` and returns the entry of `to`.
fn rename(from: &str, to: &str) -> Result<EntryInfo, Failure> {
    let (from, to) = (absolute(from)?, absolute(to)?);
    fs::rename(&from, &to).map_err(|e| {
        let what = format!("{} to {}", from.display(), to.display());
        io_failure(&e, "rename", &what)
    })?;
    let meta = fs::symlink_metadata(&to).map_err(|e| path_failure(&e, "stat", &to))?;
    Ok(entry(&to, &meta, &Names::load()))
}

/// Sends the file's entry, its bytes as `Data` frames and `Done`.
/// Symlinks are followed.
fn read(conn: &File, path: &str) -> Result<(), Failure> {
    let path = absolute(path)?;
    // O_NONBLOCK: opening a FIFO must not wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| path_failure(&e, "read", &path))?;
    let meta = file
        .metadata()
        .map_err(|e| path_failure(&e, "read", &path))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Failure::new(
            ErrorKind::IsADirectory,
            format!(
                "cannot read {}: it is a directory; list it instead, or give the path of a file",
                path.display()
            ),
        ));
    }
    if !ft.is_file() && !ft.is_char_device() && !ft.is_block_device() {
        return Err(Failure::new(
            ErrorKind::InvalidRequest,
            format!(
                "cannot read {}: it is a FIFO or socket, not a file; read it with a command",
                path.display()
            ),
        ));
    }
    if !ft.is_file() {
        clear_nonblocking(&file).map_err(|e| path_failure(&e, "read", &path))?;
    }
    let head = encode(&Frame::Entry(entry_with_target(
        &path,
        &meta,
        &Names::load(),
        None,
    )))
    .map_err(internal)?;
    send_data(conn, &file, head).map_err(|e| match e {
        SendError::Gone => Failure::Gone,
        SendError::Read(e) => path_failure(&e, "read", &path),
    })
}

fn clear_nonblocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd we hold open; no pointers involved.
    let flags = crate::sys::cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    crate::sys::cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) })?;
    Ok(())
}

enum SendError {
    /// The host went away.
    Gone,
    /// Reading the file failed.
    Read(io::Error),
}

/// Sends `head` (the entry frame), then `file` as `Data` frames, then
/// `Done`. Each chunk is read straight behind a header slot until it is
/// full or the file ends, and leaves with its header in one write; the
/// entry rides with the first chunk and `Done` with the last, so a small
/// file costs a single write.
fn send_data(conn: &File, mut file: &File, head: Vec<u8>) -> Result<(), SendError> {
    let done = encode_header(FrameType::Done, 0).map_err(|_| SendError::Gone)?;
    let mut buf = head;
    buf.reserve_exact(HEADER_LEN + DATA_CHUNK + done.len());
    loop {
        let start = buf.len();
        buf.resize(start + HEADER_LEN + DATA_CHUNK, 0);
        let mut n = 0;
        let mut eof = false;
        while n < DATA_CHUNK {
            match file.read(&mut buf[start + HEADER_LEN + n..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(m) => n += m,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Send the entry if it is still pending, then report
                    // the failure (the chunk read so far is dropped).
                    buf.truncate(start);
                    let _ = (&mut &*conn).write_all(&buf);
                    return Err(SendError::Read(e));
                }
            }
        }
        buf.truncate(start + HEADER_LEN + n);
        if n > 0 {
            // n <= DATA_CHUNK, far below the frame limit.
            let header = encode_header(FrameType::Data, n).map_err(|_| SendError::Gone)?;
            buf[start..start + HEADER_LEN].copy_from_slice(&header);
        } else {
            buf.truncate(start);
        }
        if eof {
            buf.extend_from_slice(&done);
        }
        (&mut &*conn).write_all(&buf).map_err(|_| SendError::Gone)?;
        if eof {
            return Ok(());
        }
        buf.clear();
    }
}

/// A counter for unique temporary names (with the pid).
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Receives the file's bytes into a temporary file next to the target and
/// renames it over the target on `Done`, so a host that goes away mid-way
/// leaves the old file (or none) in place. An existing file keeps its
/// permissions and owner; a new one gets `mode` (default 0o644). Where
/// the directory takes no new files (`/proc`, `/sys`) an existing file is
/// written in place instead, without that guarantee. A symlink
/// to a file is written through (the answer's entry then names the link's
/// target); a dangling one is replaced by the file.
fn write(
    conn: &File,
    reader: &mut FrameReader<&File>,
    path: &str,
    mode: Option<u32>,
) -> Result<Frame, Failure> {
    let prepared = prepare_write(path, mode);
    let (target, existing, mode) = match prepared {
        Ok(p) => p,
        Err(failure) => return Err(refuse_write(conn, reader, failure)),
    };
    let (mut temp, mut file) = match TempFile::create(&target, mode) {
        Ok((temp, file)) => (Some(temp), file),
        // A directory that takes no new files (/proc, /sys, a read-only
        // parent of a writable file): write the existing file in place.
        Err(Failure::Refused {
            kind: ErrorKind::PermissionDenied | ErrorKind::NotFound,
            ..
        }) if existing.is_some() => {
            match OpenOptions::new().write(true).truncate(true).open(&target) {
                Ok(file) => (None, file),
                Err(e) => {
                    return Err(refuse_write(
                        conn,
                        reader,
                        path_failure(&e, "write", &target),
                    ))
                }
            }
        }
        Err(failure) => return Err(refuse_write(conn, reader, failure)),
    };
    loop {
        match reader.read_frame() {
            Ok(Some(Frame::Data(data))) => {
                if let Err(e) = file.write_all(&data) {
                    let failure = path_failure(&e, "write", &target);
                    drop((temp.take(), file));
                    return Err(refuse_write(conn, reader, failure));
                }
            }
            Ok(Some(Frame::Done)) => break,
            Ok(Some(other)) => {
                return Err(Failure::new(
                    ErrorKind::Protocol,
                    ProtoError::UnexpectedFrame {
                        got: other.frame_type(),
                        expected: "Data or Done",
                    }
                    .to_string(),
                ))
            }
            // The host went away before Done: the temporary file goes.
            Ok(None) | Err(ProtoError::Io(_)) => return Err(Failure::Gone),
            Err(e) => return Err(Failure::new(ErrorKind::Protocol, e.to_string())),
        }
    }
    let meta = match temp {
        Some(temp) => temp.finish(file, &target, existing.as_ref(), mode)?,
        None => file
            .metadata()
            .map_err(|e| path_failure(&e, "write", &target))?,
    };
    Ok(Frame::Entry(entry_with_target(
        &target,
        &meta,
        &Names::load(),
        None,
    )))
}

/// The real target (symlinks followed), the metadata of the file there if
/// any, and the mode for a new file.
fn prepare_write(
    path: &str,
    mode: Option<u32>,
) -> Result<(PathBuf, Option<Metadata>, u32), Failure> {
    let target = absolute(path)?;
    let mode = mode.unwrap_or(DEFAULT_FILE_MODE) & 0o7777;
    let is_a_dir = |p: &Path| {
        Failure::new(
            ErrorKind::IsADirectory,
            format!(
                "cannot write {}: it is a directory; give the path of a file",
                p.display()
            ),
        )
    };
    match fs::symlink_metadata(&target) {
        Ok(meta) if meta.is_dir() => Err(is_a_dir(&target)),
        Ok(meta) if meta.file_type().is_symlink() => match fs::canonicalize(&target) {
            Ok(real) => match fs::metadata(&real) {
                Ok(m) if m.is_dir() => Err(is_a_dir(&target)),
                Ok(m) => Ok((real, Some(m), mode)),
                Err(_) => Ok((real, None, mode)),
            },
            // A dangling link: replace the link itself.
            Err(_) => Ok((target, None, mode)),
        },
        Ok(meta) if !meta.is_file() => Err(Failure::new(
            ErrorKind::InvalidRequest,
            format!(
                "cannot write {}: it is a device, FIFO or socket, not a file; write to it with \
                 a command",
                target.display()
            ),
        )),
        Ok(meta) => Ok((target, Some(meta), mode)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if path.ends_with('/') {
                return Err(is_a_dir(&target));
            }
            Ok((target, None, mode))
        }
        Err(e) => Err(path_failure(&e, "write", &target)),
    }
}

/// Answers a write refused before its `Done`, then reads (and drops) the
/// host's remaining frames up to its `Done`: closing with unread data could
/// reset the connection and lose the answer.
fn refuse_write(conn: &File, reader: &mut FrameReader<&File>, failure: Failure) -> Failure {
    if let Failure::Refused { kind, message } = failure {
        if write_frame(&mut &*conn, &Frame::error(kind, message)).is_err() {
            return Failure::Gone;
        }
        loop {
            match reader.read_frame() {
                Ok(Some(Frame::Done)) | Ok(None) | Err(_) => break,
                Ok(Some(_)) => {}
            }
        }
    }
    Failure::Gone
}

/// A temporary file next to a write's target, removed unless
/// [`TempFile::finish`] renamed it over the target.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// Creates `.NAME.dormouse-PID-N.tmp` in the target's directory,
    /// creating missing parent directories; returns it open for writing.
    fn create(target: &Path, mode: u32) -> Result<(Self, File), Failure> {
        let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(Failure::new(
                ErrorKind::IsADirectory,
                format!(
                    "cannot write {}: it names a directory; give the path of a file",
                    target.display()
                ),
            ));
        };
        let seq = TEMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        // The pid keeps temporary names of several agents apart; cached,
        // as every system call counts in the guest.
        static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let pid = *PID.get_or_init(std::process::id);
        temp_name.push(format!(".dormouse-{pid}-{seq}.tmp"));
        let path = dir.join(temp_name);
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dir)
                    .map_err(|e| path_failure(&e, "create the parent directories of", target))?;
                open()
            }
            other => other,
        }
        .map_err(|e| path_failure(&e, "write", target))?;
        Ok((Self { path, keep: false }, file))
    }

    /// Gives the file its final permissions (and owner) and renames it over
    /// `target` (closed first, so no event follows the rename); returns its
    /// metadata.
    fn finish(
        mut self,
        file: File,
        target: &Path,
        existing: Option<&Metadata>,
        mode: u32,
    ) -> Result<Metadata, Failure> {
        let fail = |e: io::Error| path_failure(&e, "write", target);
        let mode = existing.map_or(mode, |m| m.mode() & 0o7777);
        if let Some(m) = existing {
            // Best effort: only root may give a file away.
            let _ = std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()));
        }
        // After fchown, which clears set-id bits; also undoes the umask.
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        let meta = file.metadata().map_err(fail)?;
        drop(file);
        fs::rename(&self.path, target).map_err(fail)?;
        self.keep = true;
        Ok(meta)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = fs::remove_file(&self.path) {
                log!("cannot remove {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_group() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      # comment\n\
                      \n\
                      daemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n\
                      broken line\n\
                      bad:x:notanumber:0::/:/bin/sh\n\
                      alias:x:0:0::/:/bin/sh\n\
                      +nis::::::\n\
                      :x:7:7::/:/bin/sh\n\
                      user:x:1000:1000:User:/home/user:/bin/sh\r\n";
        let group = "root:x:0:\nwheel:x:10:root,user\nusers:x:100:";
        let names = Names::parse(passwd, group);
        assert_eq!(names.user(0), "root", "the first name of an id wins");
        assert_eq!(names.user(1), "daemon");
        assert_eq!(names.user(1000), "user");
        assert_eq!(names.user(7), "7", "an empty name is no name");
        assert_eq!(names.user(4242), "4242");
        assert_eq!(names.group(0), "root");
        assert_eq!(names.group(10), "wheel");
        assert_eq!(names.group(100), "users");
        assert_eq!(names.group(5), "5");
        assert!(parse_id_file("").is_empty());
        assert!(parse_id_file("a:b").is_empty());
    }

    #[test]
    fn maps_io_errors_to_kinds() {
        let cases = [
            (libc::ENOENT, ErrorKind::NotFound),
            (libc::EISDIR, ErrorKind::IsADirectory),
            (libc::ENOTDIR, ErrorKind::NotADirectory),
            (libc::EEXIST, ErrorKind::AlreadyExists),
            (libc::EACCES, ErrorKind::PermissionDenied),
            (libc::EPERM, ErrorKind::PermissionDenied),
            (libc::ENOSPC, ErrorKind::NoSpace),
            (libc::EDQUOT, ErrorKind::NoSpace),
            (libc::EIO, ErrorKind::Internal),
        ];
        for (errno, kind) in cases {
            assert_eq!(error_kind(&io::Error::from_raw_os_error(errno)), kind);
        }
        assert_eq!(
            error_kind(&io::Error::other("no errno")),
            ErrorKind::Internal
        );
        let Failure::Refused { kind, message } = io_failure(
            &io::Error::from_raw_os_error(libc::ENOENT),
            "read",
            "/no/such",
        ) else {
            panic!("a refusal")
        };
        assert_eq!(kind, ErrorKind::NotFound);
        assert!(message.contains("/no/such"), "{message}");
        assert!(message.contains("check the path"), "{message}");
    }

    #[test]
    fn builds_entries() {
        let dir = std::env::temp_dir().join(format!("dormouse-files-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.txt");
        fs::write(&file, b"hello").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("a.txt", dir.join("link")).unwrap();
        let names = Names::default();

        let meta = fs::symlink_metadata(&file).unwrap();
        let e = entry(&file, &meta, &names);
        assert_eq!(e.name, "a.txt");
        assert_eq!(e.path, file.to_str().unwrap());
        assert_eq!(e.kind, EntryKind::File);
        assert_eq!(e.size, 5);
        assert_eq!(e.mode, 0o640);
        assert_eq!(e.owner, meta.uid().to_string(), "no names: the number");
        assert!(e.modified_ns > 1_500_000_000 * 1_000_000_000);
        assert_eq!(e.symlink_target, None);
        e.validate().unwrap();

        let link = dir.join("link");
        let e = entry(&link, &fs::symlink_metadata(&link).unwrap(), &names);
        assert_eq!(e.kind, EntryKind::Symlink);
        assert_eq!(e.symlink_target.as_deref(), Some("a.txt"));

        let e = entry(&dir, &fs::symlink_metadata(&dir).unwrap(), &names);
        assert_eq!(e.kind, EntryKind::Dir);
        let root = Path::new("/");
        let e = entry(root, &fs::symlink_metadata(root).unwrap(), &names);
        assert_eq!((e.name.as_str(), e.path.as_str()), ("/", "/"));

        let dev = Path::new("/dev/null");
        let e = entry(dev, &fs::symlink_metadata(dev).unwrap(), &names);
        assert_eq!(e.kind, EntryKind::Other);

        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn relative_paths_become_absolute() {
        let p = absolute("some/file").unwrap();
        assert!(p.is_absolute());
        assert!(p.ends_with("some/file"));
    }

    #[test]
    fn write_replaces_atomically_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("dormouse-files-write-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let target = dir.join("deep/er/file");
        let (t, existing, mode) = prepare_write(target.to_str().unwrap(), None).unwrap();
        assert_eq!((existing.is_none(), mode), (true, 0o644));
        let (temp, mut file) = TempFile::create(&t, mode).unwrap();
        file.write_all(b"data").unwrap();
        let meta = temp.finish(file, &t, None, mode).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o644);
        assert_eq!(fs::read(&target).unwrap(), b"data");

        // An abandoned write leaves the old contents and no temporary file.
        let (t, existing, mode) = prepare_write(target.to_str().unwrap(), Some(0o600)).unwrap();
        assert!(existing.is_some());
        let (temp, mut file) = TempFile::create(&t, mode).unwrap();
        file.write_all(b"partial").unwrap();
        drop((temp, file));
        assert_eq!(fs::read(&target).unwrap(), b"data");
        assert_eq!(fs::read_dir(target.parent().unwrap()).unwrap().count(), 1);

        assert!(matches!(
            prepare_write(dir.to_str().unwrap(), None),
            Err(Failure::Refused {
                kind: ErrorKind::IsADirectory,
                ..
            })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
