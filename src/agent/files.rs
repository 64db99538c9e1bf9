//! File operations in the guest ([`FileRequest`]): metadata, listings,
//! directories, removal, renames, streamed reads and writes, and watches.
//!
//! Each function takes a freshly opened stream to the agent, sends the
//! `Hello` and the request in one write, and consumes the stream. File
//! bytes travel in [`DATA_CHUNK`]-sized `Data` frames, so reads and writes
//! of any size use bounded memory. Failures the agent reports are
//! [`AgentError::Remote`] with a kind such as [`ErrorKind::NotFound`],
//! [`ErrorKind::IsADirectory`] or [`ErrorKind::AlreadyExists`].
//!
//! Paths are guest paths; relative ones are resolved against the agent's
//! working directory (`/` in a VM). Entries always carry absolute paths.
//!
//! ```no_run
//! # async fn demo() -> Result<(), dormouse::agent::AgentError> {
//! use dormouse::agent::files;
//! let connect = || tokio::net::UnixStream::connect("/tmp/agent.sock");
//! files::write(connect().await?, "/tmp/x/hello.txt", None, &mut &b"hi"[..]).await?;
//! let bytes = files::read_to_vec(connect().await?, "/tmp/x/hello.txt", 1 << 20).await?;
//! assert_eq!(bytes, b"hi");
//! let names: Vec<String> = files::list(connect().await?, "/tmp/x", 1)
//!     .await?
//!     .into_iter()
//!     .map(|e| e.name)
//!     .collect();
//! assert_eq!(names, ["hello.txt"]);
//! # Ok(()) }
//! ```
//!
//! [`ErrorKind::NotFound`]: crate::proto::ErrorKind::NotFound
//! [`ErrorKind::IsADirectory`]: crate::proto::ErrorKind::IsADirectory
//! [`ErrorKind::AlreadyExists`]: crate::proto::ErrorKind::AlreadyExists

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    hello_msg, info_from_ack, io_error, receive_while_sending, remote, unexpected, AgentError,
    Conn, READ_CHUNK,
};
use crate::proto::{
    encode, encode_header, Decoder, EntryInfo, EntryKind, FileEvent, FileRequest, Frame, FrameType,
    DATA_CHUNK, HEADER_LEN,
};

/// The most entries one [`list`] accepts (the agent refuses larger trees
/// with an `InvalidRequest` error): list a subdirectory or fewer levels.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// The most [`read_to_vec`] reserves up front, whatever size the (guest
/// controlled) entry claims.
const MAX_PREALLOC: usize = 64 << 20;

/// Validates `req`, sends it after the `Hello`, and reads the `HelloAck`.
async fn request<S>(stream: S, req: FileRequest) -> Result<Conn<S>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    req.validate().map_err(AgentError::InvalidRequest)?;
    let mut conn = Conn::new(stream);
    conn.send(&[Frame::Hello(hello_msg()), Frame::FileRequest(req)])
        .await?;
    conn.read_ack().await?;
    Ok(conn)
}

/// The next frame, which must be an `Entry` (or the agent's `Error`).
async fn expect_entry<S>(conn: &mut Conn<S>, during: &'static str) -> Result<EntryInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match conn.next(during).await? {
        Frame::Entry(entry) => Ok(entry),
        Frame::Error(e) => Err(remote(e)),
        other => Err(unexpected(&other, "Entry")),
    }
}

/// The metadata of `path` itself (a symlink is described, not followed).
pub async fn stat<S>(stream: S, path: &str) -> Result<EntryInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = request(stream, FileRequest::Stat { path: path.into() }).await?;
    expect_entry(&mut conn, "waiting for the entry").await
}

/// The entries under directory `path`, `depth` levels deep (1 = the
/// directory's own entries, 1..=[`crate::proto::MAX_LIST_DEPTH`]), each
/// directory's entries sorted by name and followed by their subtrees.
/// Symlinks to directories are listed, not descended into. At most
/// [`MAX_LIST_ENTRIES`] entries.
pub async fn list<S>(stream: S, path: &str, depth: u32) -> Result<Vec<EntryInfo>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = FileRequest::List {
        path: path.into(),
        depth,
    };
    let mut conn = request(stream, req).await?;
    let mut out = Vec::new();
    loop {
        match conn.next("while listing the directory").await? {
            Frame::Entry(entry) if out.len() < MAX_LIST_ENTRIES => out.push(entry),
            Frame::Done => return Ok(out),
            Frame::Error(e) => return Err(remote(e)),
            other => {
                return Err(unexpected(
                    &other,
                    "Entry (at most MAX_LIST_ENTRIES of them) or Done",
                ))
            }
        }
    }
}

/// Creates directory `path` and its missing parents and returns its entry.
/// Fails with a remote `AlreadyExists` when the directory was there
/// already, `NotADirectory` when a file is in the way.
pub async fn make_dir<S>(stream: S, path: &str) -> Result<EntryInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = request(stream, FileRequest::MakeDir { path: path.into() }).await?;
    expect_entry(&mut conn, "while creating the directory").await
}

/// Removes a file, a symlink (not its target), or a directory with
/// everything in it. Fails with a remote `NotFound` when nothing is there.
pub async fn remove<S>(stream: S, path: &str) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = request(stream, FileRequest::Remove { path: path.into() }).await?;
    match conn.next("while removing").await? {
        Frame::Done => Ok(()),
        Frame::Error(e) => Err(remote(e)),
        other => Err(unexpected(&other, "Done")),
    }
}

/// Renames (moves) `from` to `to` (within one guest file system) and
/// returns the entry of `to`.
pub async fn rename<S>(stream: S, from: &str, to: &str) -> Result<EntryInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = FileRequest::Rename {
        from: from.into(),
        to: to.into(),
    };
    let mut conn = request(stream, req).await?;
    expect_entry(&mut conn, "while renaming").await
}

/// Streams the bytes of file `path` (symlinks followed) into `out` as they
/// arrive, one chunk at a time, and returns the file's entry as it was
/// when the read began (a file that grows meanwhile yields more bytes than
/// its `size`). Fails with a remote `NotFound` or `IsADirectory`; a failure
/// of `out` is [`AgentError::Transfer`].
pub async fn read<S, W>(stream: S, path: &str, out: &mut W) -> Result<EntryInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    W: AsyncWrite + Unpin,
{
    let mut conn = request(stream, FileRequest::Read { path: path.into() }).await?;
    let entry = expect_entry(&mut conn, "waiting for the file's entry").await?;
    loop {
        match conn.next("while reading the file").await? {
            Frame::Data(data) => out.write_all(&data).await.map_err(AgentError::Transfer)?,
            Frame::Done => break,
            Frame::Error(e) => return Err(remote(e)),
            other => return Err(unexpected(&other, "Data or Done")),
        }
    }
    out.flush().await.map_err(AgentError::Transfer)?;
    Ok(entry)
}

/// The bytes of file `path` (symlinks followed), at most `max` of them:
/// a larger file fails with [`AgentError::FileTooLarge`] (stream it with
/// [`read`] instead).
pub async fn read_to_vec<S>(stream: S, path: &str, max: usize) -> Result<Vec<u8>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = request(stream, FileRequest::Read { path: path.into() }).await?;
    let entry = expect_entry(&mut conn, "waiting for the file's entry").await?;
    let size = usize::try_from(entry.size).unwrap_or(usize::MAX);
    // Device and /proc files report sizes that mean nothing; only a
    // regular file's size is known too large up front.
    if entry.kind == EntryKind::File && size > max {
        return Err(AgentError::FileTooLarge { limit: max });
    }
    let mut buf = Vec::with_capacity(size.min(max).min(MAX_PREALLOC));
    loop {
        match conn.next("while reading the file").await? {
            Frame::Data(data) => {
                if data.len() > max - buf.len() {
                    return Err(AgentError::FileTooLarge { limit: max });
                }
                buf.extend_from_slice(&data);
            }
            Frame::Done => return Ok(buf),
            Frame::Error(e) => return Err(remote(e)),
            other => return Err(unexpected(&other, "Data or Done")),
        }
    }
}

/// Why sending a file's bytes stopped.
enum SendError {
    /// The caller's reader failed: abandon the write.
    Source(io::Error),
    /// The stream failed: the agent's answer (an `Error` or the end of the
    /// stream) says why.
    Stream,
}

/// Reads from `data` until `buf` is full or `data` ends; returns the count.
async fn fill<R: AsyncRead + Unpin>(data: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match data.read(&mut buf[got..]).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Writes everything `data` yields to file `path`, creating missing parent
/// directories and replacing what the file held, and returns the file's
/// entry. `mode` sets the permission bits of a new file (default 0o644);
/// an existing file keeps its permissions and owner.
///
/// The agent writes a temporary file and renames it over `path` only once
/// all bytes arrived, so a write that fails or is dropped half-way leaves
/// the old file (or none) in place. `data` is read in [`DATA_CHUNK`]
/// pieces while the agent's answer is read concurrently: a refusal such as
/// `IsADirectory` is reported as soon as the agent sends it. A failure of
/// `data` is [`AgentError::Transfer`].
pub async fn write<S, R>(
    stream: S,
    path: &str,
    mode: Option<u32>,
    data: &mut R,
) -> Result<EntryInfo, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    R: AsyncRead + Unpin,
{
    let req = FileRequest::Write {
        path: path.into(),
        mode,
    };
    req.validate().map_err(AgentError::InvalidRequest)?;
    let mut first = encode(&Frame::Hello(hello_msg()))?;
    first.extend_from_slice(&encode(&Frame::FileRequest(req))?);
    let done = encode(&Frame::Done)?;

    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async move {
        wr.write_all(&first).await.map_err(|_| SendError::Stream)?;
        // Header slot, one chunk, and room for the final Done.
        let mut buf = vec![0u8; HEADER_LEN + DATA_CHUNK + HEADER_LEN];
        loop {
            let n = fill(data, &mut buf[HEADER_LEN..HEADER_LEN + DATA_CHUNK])
                .await
                .map_err(SendError::Source)?;
            let mut end = 0;
            if n > 0 {
                // n <= DATA_CHUNK, far below the frame limit.
                let header = encode_header(FrameType::Data, n).map_err(|_| SendError::Stream)?;
                buf[..HEADER_LEN].copy_from_slice(&header);
                end = HEADER_LEN + n;
            }
            let last = n < DATA_CHUNK;
            if last {
                buf[end..end + done.len()].copy_from_slice(&done);
                end += done.len();
            }
            wr.write_all(&buf[..end])
                .await
                .map_err(|_| SendError::Stream)?;
            if last {
                break;
            }
        }
        wr.flush().await.map_err(|_| SendError::Stream)
    };
    tokio::pin!(writer);
    let mut writing = true;
    let mut sent_done = false;

    let mut dec = Decoder::new();
    let mut acked = false;
    loop {
        while let Some(frame) = dec.next_frame()? {
            match frame {
                Frame::HelloAck(ack) if !acked => {
                    info_from_ack(ack)?;
                    acked = true;
                }
                Frame::Entry(entry) if acked && sent_done => return Ok(entry),
                Frame::Error(e) => return Err(remote(e)),
                other => {
                    let expected = match (acked, sent_done) {
                        (false, _) => "HelloAck",
                        (true, false) => "nothing (or Error) while the file's bytes are sent",
                        (true, true) => "Entry",
                    };
                    return Err(unexpected(&other, expected));
                }
            }
        }
        let during = if sent_done {
            "waiting for the written file's entry"
        } else {
            "while sending the file"
        };
        let sending = writing.then_some(writer.as_mut());
        if let Some(sent) = receive_while_sending(&mut rd, &mut dec, sending, during).await? {
            writing = false;
            match sent {
                Ok(()) => sent_done = true,
                Err(SendError::Source(e)) => return Err(AgentError::Transfer(e)),
                // The agent's Error frame or the end of the stream, read
                // next, is the answer.
                Err(SendError::Stream) => {}
            }
        }
    }
}

/// Watches directory `path` (with `recursive`, also every directory below
/// it, including ones created later) and returns once the agent has set the
/// watch up: every change made after this returns is reported. Fails with
/// a remote `NotFound`, or `NotADirectory` for a file.
pub async fn watch<S>(stream: S, path: &str, recursive: bool) -> Result<Watcher<S>, AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let req = FileRequest::Watch {
        path: path.into(),
        recursive,
    };
    let mut conn = request(stream, req).await?;
    match conn.next("while setting up the watch").await? {
        Frame::Done => {}
        Frame::Error(e) => return Err(remote(e)),
        other => return Err(unexpected(&other, "Done")),
    }
    let Conn { stream, dec } = conn;
    Ok(Watcher {
        stream,
        dec,
        ended: false,
    })
}

/// The changes under a watched directory, from [`watch`]. Dropping it
/// closes the stream, which ends the watch in the guest.
pub struct Watcher<S> {
    stream: S,
    dec: Decoder,
    ended: bool,
}

impl<S> std::fmt::Debug for Watcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Watcher<S> {
    /// The next change, or `None` once the watch ended (the agent closed
    /// the stream: the directory itself was removed, or the guest stopped
    /// or was paused). An error ends the watch too. Cancel safe: dropping
    /// the future loses no event.
    pub async fn next(&mut self) -> Option<Result<FileEvent, AgentError>> {
        if self.ended {
            return None;
        }
        let result = self.next_event().await;
        if !matches!(result, Some(Ok(_))) {
            self.ended = true;
        }
        result
    }

    async fn next_event(&mut self) -> Option<Result<FileEvent, AgentError>> {
        loop {
            match self.dec.next_frame() {
                Ok(Some(Frame::FileEvent(event))) => return Some(Ok(event)),
                Ok(Some(Frame::Error(e))) => return Some(Err(remote(e))),
                Ok(Some(other)) => return Some(Err(unexpected(&other, "FileEvent"))),
                Ok(None) => {}
                Err(e) => return Some(Err(e.into())),
            }
            let space = self.dec.read_space(READ_CHUNK);
            match self.stream.read(space).await {
                Ok(0) => return self.dec.finish().err().map(|e| Err(e.into())),
                Ok(n) => self.dec.commit(n),
                Err(e) => {
                    return match io_error(e, "while watching") {
                        AgentError::Disconnected { .. } => None,
                        other => Some(Err(other)),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, DuplexStream};

    use super::*;
    use crate::proto::{ErrorKind, FileEventKind, HelloAck, ProtoError, PROTOCOL_VERSION};

    fn ack() -> Frame {
        Frame::HelloAck(HelloAck {
            version: PROTOCOL_VERSION,
            agent_version: "fake".into(),
            capabilities: Vec::new(),
            init: false,
        })
    }

    fn entry(size: u64) -> EntryInfo {
        EntryInfo {
            name: "f".into(),
            path: "/f".into(),
            kind: EntryKind::File,
            size,
            mode: 0o644,
            owner: "root".into(),
            group: "root".into(),
            modified_ns: 0,
            symlink_target: None,
        }
    }

    fn frames(list: &[Frame]) -> Vec<u8> {
        list.iter().flat_map(|f| encode(f).unwrap()).collect()
    }

    /// A fake agent: reads the Hello and the request, sends `reply`, then
    /// reads (and drops) whatever else comes until the client closes.
    fn fake(reply: Vec<u8>) -> DuplexStream {
        let (client, mut agent) = duplex(64 * 1024);
        tokio::spawn(async move {
            let mut dec = Decoder::new();
            let mut got = Vec::new();
            while got.len() < 2 {
                let space = dec.read_space(4096);
                let n = agent.read(space).await.unwrap();
                assert!(n > 0, "the client closed early");
                dec.commit(n);
                while let Some(f) = dec.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert!(matches!(got[0], Frame::Hello(_)));
            assert!(matches!(got[1], Frame::FileRequest(_)));
            let _ = agent.write_all(&reply).await;
            let _ = agent.shutdown().await;
            let mut sink = [0u8; 64 * 1024];
            while agent.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        client
    }

    fn is_unexpected(e: &AgentError) -> bool {
        matches!(e, AgentError::Protocol(ProtoError::UnexpectedFrame { .. }))
    }

    #[tokio::test]
    async fn read_streams_data_after_the_entry() {
        let reply = frames(&[
            ack(),
            Frame::Entry(entry(5)),
            Frame::Data(b"hel".to_vec()),
            Frame::Data(b"lo".to_vec()),
            Frame::Done,
        ]);
        let mut out = Vec::new();
        let e = read(fake(reply), "/f", &mut out).await.unwrap();
        assert_eq!((e.size, out.as_slice()), (5, &b"hello"[..]));
    }

    #[tokio::test]
    async fn frames_out_of_order_are_rejected() {
        // Data before the entry.
        let reply = frames(&[ack(), Frame::Data(b"x".to_vec()), Frame::Done]);
        let err = read(fake(reply), "/f", &mut Vec::new()).await.unwrap_err();
        assert!(is_unexpected(&err), "{err}");
        // An entry before the handshake.
        let reply = frames(&[Frame::Entry(entry(1)), ack()]);
        let err = stat(fake(reply), "/f").await.unwrap_err();
        assert!(is_unexpected(&err), "{err}");
        // An entry where Done is due.
        let reply = frames(&[ack(), Frame::Entry(entry(1))]);
        let err = remove(fake(reply), "/f").await.unwrap_err();
        assert!(is_unexpected(&err), "{err}");
        // An event before the watch is set up.
        let reply = frames(&[
            ack(),
            Frame::FileEvent(FileEvent {
                kind: FileEventKind::Create,
                path: "/x".into(),
            }),
        ]);
        let err = watch(fake(reply), "/", true).await.unwrap_err();
        assert!(is_unexpected(&err), "{err}");
        // An entry before the host sent Done.
        let reply = frames(&[ack(), Frame::Entry(entry(1))]);
        let mut data = &vec![7u8; 3 * DATA_CHUNK][..];
        let err = write(fake(reply), "/f", None, &mut data).await.unwrap_err();
        assert!(is_unexpected(&err), "{err}");
    }

    #[tokio::test]
    async fn read_to_vec_enforces_the_limit() {
        let reply = frames(&[ack(), Frame::Entry(entry(100)), Frame::Done]);
        let err = read_to_vec(fake(reply), "/f", 10).await.unwrap_err();
        assert!(
            matches!(err, AgentError::FileTooLarge { limit: 10 }),
            "{err}"
        );
        // The entry lies about the size: the bytes count.
        let reply = frames(&[
            ack(),
            Frame::Entry(entry(1)),
            Frame::Data(vec![1; 8]),
            Frame::Data(vec![2; 8]),
            Frame::Done,
        ]);
        let err = read_to_vec(fake(reply), "/f", 10).await.unwrap_err();
        assert!(
            matches!(err, AgentError::FileTooLarge { limit: 10 }),
            "{err}"
        );
        let reply = frames(&[
            ack(),
            Frame::Entry(entry(u64::MAX)),
            Frame::Data(vec![1; 3]),
            Frame::Done,
        ]);
        let err = read_to_vec(fake(reply), "/f", usize::MAX).await.unwrap();
        assert_eq!(err, [1, 1, 1]);
    }

    #[tokio::test]
    async fn an_early_refusal_of_a_write_is_reported() {
        let reply = frames(&[
            ack(),
            Frame::error(ErrorKind::IsADirectory, "it is a directory"),
        ]);
        let mut data = &vec![0u8; 8 << 20][..];
        let err = write(fake(reply), "/d", None, &mut data).await.unwrap_err();
        assert!(
            matches!(
                err,
                AgentError::Remote {
                    kind: ErrorKind::IsADirectory,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn list_stops_at_the_entry_cap_and_requests_are_validated() {
        let err = list(fake(Vec::new()), "/a\0b", 1).await.unwrap_err();
        assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
        let err = list(fake(Vec::new()), "/", 0).await.unwrap_err();
        assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
        let reply = frames(&[ack(), Frame::Entry(entry(1)), Frame::Done]);
        assert_eq!(list(fake(reply), "/", 1).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn watcher_yields_events_until_the_agent_closes() {
        let event = FileEvent {
            kind: FileEventKind::Write,
            path: "/w/a".into(),
        };
        let reply = frames(&[ack(), Frame::Done, Frame::FileEvent(event.clone())]);
        let mut w = watch(fake(reply), "/w", false).await.unwrap();
        assert_eq!(w.next().await.unwrap().unwrap(), event);
        assert!(w.next().await.is_none());
        assert!(w.next().await.is_none());

        let reply = frames(&[ack(), Frame::Done, Frame::Done]);
        let mut w = watch(fake(reply), "/w", false).await.unwrap();
        assert!(is_unexpected(&w.next().await.unwrap().unwrap_err()));
        assert!(w.next().await.is_none());
    }
}
