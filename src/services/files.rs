//! `sbx.files()`: the guest's file system, streamed in bounded chunks.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use crate::agent::files as wire;
use crate::agent::AgentError;
use crate::error::{Error, Result};
use crate::proto::{EntryInfo, ErrorKind, FileEvent};
use crate::sandbox::{Running, Sandbox};

/// The most [`Files::read`] collects in memory (256 MiB); stream larger
/// files with [`Files::read_to`].
pub const MAX_READ: usize = 256 << 20;

/// The guest's file system: `sbx.files()`.
///
/// Paths are guest paths; relative ones are relative to `/`. Errors about
/// paths are typed: [`Error::PathNotFound`], [`Error::IsADirectory`],
/// [`Error::NotADirectory`], [`Error::AlreadyExists`].
///
/// ```no_run
/// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
/// sbx.files().write("/tmp/data/hello.txt", "hi").await?;
/// assert_eq!(sbx.files().read_to_string("/tmp/data/hello.txt").await?, "hi");
/// let names: Vec<String> = sbx.files().list("/tmp/data", 1).await?.into_iter().map(|e| e.name).collect();
/// assert_eq!(names, ["hello.txt"]);
/// # Ok(()) }
/// ```
pub struct Files<'a> {
    sandbox: &'a Sandbox<Running>,
}

impl<'a> Files<'a> {
    pub(crate) fn new(sandbox: &'a Sandbox<Running>) -> Self {
        Self { sandbox }
    }

    async fn stream(&self) -> Result<UnixStream> {
        self.sandbox.connect_agent().await
    }

    async fn call<T>(
        &self,
        path: &str,
        fut: impl std::future::Future<Output = std::result::Result<T, AgentError>>,
    ) -> Result<T> {
        self.sandbox
            .while_alive(fut)
            .await
            .map_err(|e| path_error(path, e))
    }

    /// A file's contents (at most [`MAX_READ`] bytes).
    pub async fn read(&self, path: &str) -> Result<Vec<u8>> {
        let stream = self.stream().await?;
        self.call(path, wire::read_to_vec(stream, path, MAX_READ))
            .await
    }

    /// A file's contents as text (invalid UTF-8 replaced).
    pub async fn read_to_string(&self, path: &str) -> Result<String> {
        let bytes = self.read(path).await?;
        Ok(String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// Streams a file of any size into `out`, chunk by chunk.
    pub async fn read_to<W: AsyncWrite + Unpin + Send>(
        &self,
        path: &str,
        out: &mut W,
    ) -> Result<EntryInfo> {
        let stream = self.stream().await?;
        self.call(path, wire::read(stream, path, out)).await
    }

    /// Writes `data` to a file, creating it and its parent directories,
    /// replacing what was there. The file is replaced whole or not at all.
    pub async fn write(&self, path: &str, data: impl AsRef<[u8]>) -> Result<EntryInfo> {
        let mut data = data.as_ref();
        self.write_from(path, &mut data).await
    }

    /// Writes everything `data` yields to a file, streamed in bounded chunks.
    pub async fn write_from<R: AsyncRead + Unpin + Send>(
        &self,
        path: &str,
        data: &mut R,
    ) -> Result<EntryInfo> {
        let stream = self.stream().await?;
        self.call(path, wire::write(stream, path, None, data)).await
    }

    /// Writes several files concurrently; fails with the first error.
    pub async fn write_many<P, D>(
        &self,
        files: impl IntoIterator<Item = (P, D)>,
    ) -> Result<Vec<EntryInfo>>
    where
        P: AsRef<str>,
        D: AsRef<[u8]>,
    {
        let files: Vec<(P, D)> = files.into_iter().collect();
        let writes = files
            .iter()
            .map(|(p, d)| self.write(p.as_ref(), d.as_ref()));
        let mut out = Vec::with_capacity(files.len());
        for entry in join_all(writes).await {
            out.push(entry?);
        }
        Ok(out)
    }

    /// The entries of a directory, `depth` levels deep (1 = its own).
    pub async fn list(&self, path: &str, depth: u32) -> Result<Vec<EntryInfo>> {
        let stream = self.stream().await?;
        self.call(path, wire::list(stream, path, depth)).await
    }

    /// A path's metadata (of a symlink itself, not its target).
    pub async fn stat(&self, path: &str) -> Result<EntryInfo> {
        let stream = self.stream().await?;
        self.call(path, wire::stat(stream, path)).await
    }

    /// Whether a path exists.
    pub async fn exists(&self, path: &str) -> Result<bool> {
        match self.stat(path).await {
            Ok(_) => Ok(true),
            Err(Error::PathNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates a directory and its missing parents; `false` when it existed
    /// already.
    pub async fn make_dir(&self, path: &str) -> Result<bool> {
        let stream = self.stream().await?;
        match self.call(path, wire::make_dir(stream, path)).await {
            Ok(_) => Ok(true),
            Err(Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes a file, a symlink, or a directory with everything in it.
    pub async fn remove(&self, path: &str) -> Result<()> {
        let stream = self.stream().await?;
        self.call(path, wire::remove(stream, path)).await
    }

    /// Renames (moves) `from` to `to`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<EntryInfo> {
        let stream = self.stream().await?;
        self.call(from, wire::rename(stream, from, to)).await
    }

    /// Watches a directory (and, with `recursive`, everything below it)
    /// for created, written, removed, renamed and chmod-ed entries.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// let mut watcher = sbx.files().watch_dir("/tmp", true).await?;
    /// sbx.commands().run("touch /tmp/new").await?;
    /// let event = watcher.next().await.expect("an event")?;
    /// assert_eq!(event.path, "/tmp/new");
    /// # Ok(()) }
    /// ```
    pub async fn watch_dir(&self, path: &str, recursive: bool) -> Result<DirWatcher> {
        let stream = self.stream().await?;
        let inner = self
            .call(path, wire::watch(stream, path, recursive))
            .await?;
        Ok(DirWatcher { inner })
    }
}

/// Changes under a watched directory; dropping it stops the watch.
pub struct DirWatcher {
    inner: wire::Watcher<UnixStream>,
}

impl std::fmt::Debug for DirWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatcher").finish_non_exhaustive()
    }
}

impl DirWatcher {
    /// The next change, or `None` when the watch ended (the sandbox was
    /// paused or stopped).
    pub async fn next(&mut self) -> Option<Result<FileEvent>> {
        self.inner.next().await.map(|r| r.map_err(Error::Agent))
    }
}

/// Turns the agent's path errors into the typed ones.
fn path_error(path: &str, e: Error) -> Error {
    let Error::Agent(AgentError::Remote { kind, message }) = e else {
        return e;
    };
    let path = path.to_owned();
    match kind {
        ErrorKind::NotFound => Error::PathNotFound { path },
        ErrorKind::IsADirectory => Error::IsADirectory { path },
        ErrorKind::NotADirectory => Error::NotADirectory { path },
        ErrorKind::AlreadyExists => Error::AlreadyExists { path },
        kind => Error::Agent(AgentError::Remote { kind, message }),
    }
}

/// Polls futures concurrently on the calling task.
pub(crate) async fn join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futs.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
