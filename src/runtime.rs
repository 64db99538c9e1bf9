//! The runtime: a state directory, where templates are found, and the
//! sandboxes created from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::info::{self, ListQuery, SandboxInfo, SandboxPage, SandboxState, SnapshotInfo};
use crate::sandbox::{self, Paused, Running, Sandbox, SandboxConfig, SandboxId};
use crate::snapshot::{self as snap, SandboxRecord};
use crate::template::Template;
use crate::vmm::cpu::{HostKind, HostProfile};

/// Environment variable: extra template directories, `:`-separated.
pub const TEMPLATE_PATH_ENV: &str = "DORMOUSE_TEMPLATE_PATH";
/// Environment variable: the build cache of `guest/build.sh`.
pub const CACHE_ENV: &str = "DORMOUSE_CACHE";

/// Entry point of the library: owns a state directory in which every
/// sandbox keeps its files (`<dir>/sandboxes/<id>/`).
///
/// Templates are looked up by name, in order, in: directories added with
/// [`RuntimeBuilder::template_dir`], `<dir>/templates/`, each directory of
/// `$DORMOUSE_TEMPLATE_PATH`, and the `templates/` folder of the guest build
/// cache (`$DORMOUSE_CACHE`, default `~/.cache/dormouse`), where
/// `guest/build.sh` puts the `python` template.
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

#[derive(Debug)]
pub(crate) struct RuntimeInner {
    pub(crate) dir: PathBuf,
    template_dirs: Vec<PathBuf>,
    pub(crate) kvm_path: PathBuf,
    pub(crate) host: HostKind,
}

/// Options for opening a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    dir: PathBuf,
    template_dirs: Vec<PathBuf>,
    kvm_path: PathBuf,
}

impl RuntimeBuilder {
    /// Searches `dir` for templates before the default locations.
    pub fn template_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.template_dirs.push(dir.into());
        self
    }

    /// Uses another KVM device node than `/dev/kvm`.
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    /// Creates the state directory if needed and opens the runtime.
    pub async fn open(self) -> Result<Runtime> {
        for sub in ["sandboxes", "snapshots", "template-snapshots"] {
            let path = self.dir.join(sub);
            tokio::fs::create_dir_all(&path)
                .await
                .map_err(Error::io(format!(
                    "cannot create the state directory {}",
                    path.display()
                )))?;
        }
        let mut template_dirs = self.template_dirs;
        template_dirs.push(self.dir.join("templates"));
        if let Some(paths) = std::env::var_os(TEMPLATE_PATH_ENV) {
            template_dirs
                .extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
        }
        template_dirs.push(default_cache_dir().join("templates"));
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                dir: self.dir,
                template_dirs,
                kvm_path: self.kvm_path,
                host: HostKind::detect(),
            }),
        })
    }
}

/// `$DORMOUSE_CACHE`, else `$XDG_CACHE_HOME/dormouse`, else `~/.cache/dormouse`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("dormouse");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("dormouse")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

impl RuntimeInner {
    /// The directory of the named snapshot `name` (which need not exist).
    pub(crate) fn snapshot_dir(&self, name: &str) -> Result<PathBuf> {
        if !valid_name(name) {
            return Err(Error::InvalidConfig(format!(
                "snapshot name {name:?}: use 1 to 64 of [A-Za-z0-9._-], not starting with a dot"
            )));
        }
        Ok(self.dir.join("snapshots").join(name))
    }

    /// The snapshot every sandbox of `template` (with this memory size and
    /// vCPU count) starts from: the template booted until its agent
    /// answered, then paused. Made at the first use (one boot; a concurrent
    /// caller, in this process or another, waits for it) and kept in
    /// `<state dir>/template-snapshots/`, keyed by everything it depends on.
    async fn template_snapshot(
        self: &Arc<Self>,
        template: &Template,
        config: &SandboxConfig,
    ) -> Result<PathBuf> {
        let mem_mib = config.memory_mib.unwrap_or(template.manifest.mem_mib);
        let vcpus = config.vcpus.unwrap_or(template.manifest.vcpus);
        // The files' identity too: a manifest's hashes are of build inputs,
        // and an image can be replaced under an unchanged manifest.
        let identity = |path: &Path| {
            std::fs::metadata(path).map_or_else(
                |_| "-".to_owned(),
                |m| {
                    use std::os::unix::fs::MetadataExt;
                    format!("{}:{}:{}.{}", m.ino(), m.len(), m.mtime(), m.mtime_nsec())
                },
            )
        };
        let key = format!(
            "{}/{}/{}/{}/{mem_mib}/{vcpus}/{}/{}",
            template.manifest.kernel_hash,
            template.manifest.rootfs_hash,
            identity(&template.kernel_path()),
            identity(&template.rootfs_path()),
            snap::VERSION,
            serde_json::to_string(&HostProfile::current(self.host)).expect("serialises"),
        );
        let name = format!(
            "{}-{:08x}",
            template.manifest.name,
            crate::disk::crc32(key.as_bytes())
        );
        let dir = self.dir.join("template-snapshots").join(&name);
        let lock_path = self
            .dir
            .join("template-snapshots")
            .join(format!(".{name}.lock"));
        let lock = tokio::task::spawn_blocking(move || lock_file(&lock_path))
            .await
            .map_err(|e| Error::io("the template lock task failed")(std::io::Error::other(e)))??;
        let usable = snap::read_manifest(&dir).is_ok_and(|m| {
            m.sandbox.kernel_hash == template.manifest.kernel_hash
                && m.sandbox.rootfs_hash == template.manifest.rootfs_hash
                && m.sandbox.mem_mib == mem_mib
                && m.sandbox.vcpus == vcpus
        });
        if !usable {
            if dir.exists() {
                log::warn!("rebuilding the template snapshot {}", dir.display());
                tokio::fs::remove_dir_all(&dir)
                    .await
                    .map_err(Error::io(format!("cannot delete {}", dir.display())))?;
            }
            log::info!(
                "booting template {:?} once for its snapshot",
                template.manifest.name
            );
            let config = SandboxConfig {
                metadata: Default::default(),
                ..config.clone()
            };
            let booted = Sandbox::boot(self.clone(), template.clone(), config).await?;
            let paused = booted.pause().await?;
            let from = paused.dir().to_path_buf();
            std::fs::rename(&from, &dir).map_err(Error::io(format!(
                "cannot move the template snapshot {} to {}",
                from.display(),
                dir.display()
            )))?;
            drop(paused);
            let _ = std::fs::remove_file(dir.join(info::RECORD));
            crate::fsutil::sync_dir(dir.parent().expect("has a parent"))
                .map_err(Error::io("cannot sync the template snapshot directory"))?;
        }
        drop(lock);
        Ok(dir)
    }

    /// Finds the template `name` in the template directories.
    pub(crate) fn template(&self, name: &str) -> Result<Template> {
        if !valid_name(name) {
            return Err(Error::TemplateNotFound {
                name: name.to_owned(),
                searched: Vec::new(),
            });
        }
        for dir in &self.template_dirs {
            let candidate = dir.join(name);
            if candidate.join(crate::template::MANIFEST).exists() {
                return Template::load(&candidate);
            }
        }
        Err(Error::TemplateNotFound {
            name: name.to_owned(),
            searched: self.template_dirs.clone(),
        })
    }
}

impl Runtime {
    /// Opens (creating if needed) the runtime state directory `dir` with
    /// default options.
    ///
    /// ```no_run
    /// # async fn demo() -> dormouse::Result<()> {
    /// let rt = dormouse::Runtime::open("/var/lib/dormouse").await?;
    /// # Ok(()) }
    /// ```
    pub async fn open(dir: impl AsRef<Path>) -> Result<Runtime> {
        Self::builder(dir).open().await
    }

    /// Options for opening a runtime.
    pub fn builder(dir: impl AsRef<Path>) -> RuntimeBuilder {
        RuntimeBuilder {
            dir: dir.as_ref().to_path_buf(),
            template_dirs: Vec::new(),
            kvm_path: PathBuf::from("/dev/kvm"),
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The kind of virtualization this host offers (PVM or hardware).
    pub fn host_kind(&self) -> HostKind {
        self.inner.host
    }

    /// Finds and validates the template `name`.
    pub fn template(&self, name: &str) -> Result<Template> {
        self.inner.template(name)
    }

    /// Creates a sandbox from the template `template` and returns it
    /// running, with the agent answering.
    ///
    /// The sandbox never boots: it starts from the template's snapshot
    /// (memory shared copy-on-write with every other sandbox of the
    /// template, a fresh disk overlay of its own). The first `create` of a
    /// template in a state directory makes that snapshot: it boots the
    /// template once (about 40 s on a PVM host) and pauses it.
    ///
    /// [`Error::TemplateNotFound`] for an unknown template.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime) -> dormouse::Result<()> {
    /// use dormouse::SandboxConfig;
    /// let sbx = rt.create("python", SandboxConfig::default().metadata("user", "alice")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create(&self, template: &str, config: SandboxConfig) -> Result<Sandbox<Running>> {
        let template = self.template(template)?;
        let source = self.inner.template_snapshot(&template, &config).await?;
        Sandbox::start_from(self.inner.clone(), source, config.metadata).await
    }

    /// Starts `n` sandboxes from the named snapshot `name` (see
    /// [`Sandbox::snapshot`]), concurrently. Each is independent from the
    /// start; they share the snapshot's memory pages until they write them,
    /// and inherit the metadata of the sandbox the snapshot was taken of.
    /// If any fails to start, the others are killed and the error returned.
    ///
    /// [`Error::SnapshotNotFound`] for an unknown name.
    pub async fn create_from_snapshot(
        &self,
        name: &str,
        n: usize,
    ) -> Result<Vec<Sandbox<Running>>> {
        let dir = self.inner.snapshot_dir(name)?;
        let not_found = || Error::SnapshotNotFound {
            name: name.to_owned(),
        };
        let info = info::read_snapshot(&dir).ok_or_else(not_found)?;
        start_many(&self.inner, dir, n, info.metadata).await
    }

    /// The named snapshots, by name.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let dir = self.inner.dir.join("snapshots");
        tokio::task::spawn_blocking(move || {
            let entries = std::fs::read_dir(&dir)
                .map_err(Error::io(format!("cannot list {}", dir.display())))?;
            let mut all: Vec<SnapshotInfo> = entries
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(valid_name))
                .filter_map(|e| info::read_snapshot(&e.path()))
                .collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(all)
        })
        .await
        .map_err(|e| Error::io("the list task failed")(std::io::Error::other(e)))?
    }

    /// Deletes the named snapshot. Sandboxes already started from it are
    /// not affected: they hold their own links to its memory files and
    /// their own copy of its disk, so the space its memory takes is freed
    /// when the last of them is killed (deletion is never refused).
    ///
    /// [`Error::SnapshotNotFound`] for an unknown name.
    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let dir = self.inner.snapshot_dir(name)?;
        if info::read_snapshot(&dir).is_none() {
            return Err(Error::SnapshotNotFound {
                name: name.to_owned(),
            });
        }
        remove_snapshot_dir(&dir).await
    }

    /// What is known about the sandbox `id`, in whatever state (also one
    /// run or paused by another process). [`Error::NotFound`] for an
    /// unknown or killed id.
    pub async fn info(&self, id: &str) -> Result<SandboxInfo> {
        let not_found = || Error::NotFound { id: id.to_owned() };
        let id = SandboxId::parse(id).ok_or_else(not_found)?;
        let dir = self.inner.dir.join("sandboxes").join(id.as_str());
        tokio::task::spawn_blocking(move || current_info(&dir))
            .await
            .map_err(|e| Error::io("the info task failed")(std::io::Error::other(e)))?
            .ok_or_else(not_found)
    }

    /// Lists sandboxes: running (in this process or another) and paused
    /// (also ones paused by an earlier process), filtered by state and
    /// metadata, oldest start first, a page at a time.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime) -> dormouse::Result<()> {
    /// use dormouse::{ListQuery, SandboxState};
    /// let mut query = ListQuery::default().state([SandboxState::Paused]).limit(20);
    /// loop {
    ///     let page = rt.list(query.clone()).await?;
    ///     for sbx in &page.sandboxes {
    ///         println!("{} {:?} {:?}", sbx.id, sbx.state, sbx.metadata);
    ///     }
    ///     match page.next_token {
    ///         Some(token) => query = query.next_token(token),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list(&self, query: ListQuery) -> Result<SandboxPage> {
        let dir = self.inner.dir.join("sandboxes");
        let all = tokio::task::spawn_blocking(move || -> Result<Vec<SandboxInfo>> {
            let entries = std::fs::read_dir(&dir)
                .map_err(Error::io(format!("cannot list {}", dir.display())))?;
            Ok(entries
                .flatten()
                .filter(|e| e.file_name().to_str().and_then(SandboxId::parse).is_some())
                .filter_map(|e| current_info(&e.path()))
                .collect())
        })
        .await
        .map_err(|e| Error::io("the list task failed")(std::io::Error::other(e)))??;
        info::page(all, &query)
    }

    /// Resumes the paused sandbox `id` (paused by this process or another
    /// one, before or after a restart).
    ///
    /// Gives [`Error::NotFound`] for an unknown or killed id,
    /// [`Error::NotPaused`] for one that is running, [`Error::Busy`] while
    /// another handle holds it.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime, id: &str) -> dormouse::Result<()> {
    /// let sbx = rt.connect(id).await?;
    /// let out = sbx.commands().run("cat /tmp/state").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, id: &str) -> Result<Sandbox<Running>> {
        Ok(self.paused(id).await?.resume().await?)
    }

    /// A handle on the paused sandbox `id`, without resuming it.
    pub async fn paused(&self, id: &str) -> Result<Sandbox<Paused>> {
        let rt = self.inner.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || Sandbox::open(rt, &id))
            .await
            .map_err(|e| Error::Io {
                what: "the open task failed".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Deletes the paused sandbox `id` and all its files. A running sandbox
    /// is killed through its handle ([`Sandbox::kill`]); this gives
    /// [`Error::Busy`] for it.
    pub async fn kill(&self, id: &str) -> Result<()> {
        self.paused(id).await?.kill().await
    }
}

/// The state of the sandbox directory `dir` as it is now: its record when
/// a live handle holds it, paused when it has a snapshot but no handle (its
/// process exited or died), `None` when it has neither (being created, or
/// a crashed creation).
fn current_info(dir: &Path) -> Option<SandboxInfo> {
    if sandbox::is_held(dir) {
        return info::read(dir);
    }
    if !snap::exists(dir) {
        return None;
    }
    let manifest = snap::read_manifest(dir).ok()?;
    let mut info =
        info::read(dir).unwrap_or_else(|| paused_info(&manifest.sandbox, manifest.paused_at_ms));
    info.state = SandboxState::Paused;
    info.paused_at_ms = Some(manifest.paused_at_ms);
    Some(info)
}

/// What a paused sandbox without a record file is known as.
fn paused_info(record: &SandboxRecord, paused_at_ms: u64) -> SandboxInfo {
    SandboxInfo {
        id: record.id.clone(),
        template: record.template.clone(),
        state: SandboxState::Paused,
        metadata: Default::default(),
        created_at_ms: paused_at_ms,
        started_at_ms: paused_at_ms,
        paused_at_ms: Some(paused_at_ms),
        vcpus: record.vcpus,
        memory_mib: record.mem_mib,
        disk_mib: 0,
    }
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<T, F>(futures: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let mut set: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<T>> = set.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in set.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
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
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

/// Starts `n` sandboxes from the snapshot directory `dir` concurrently;
/// if any fails, kills the others and returns its error.
pub(crate) async fn start_many(
    rt: &Arc<RuntimeInner>,
    dir: PathBuf,
    n: usize,
    metadata: std::collections::BTreeMap<String, String>,
) -> Result<Vec<Sandbox<Running>>> {
    let starts = (0..n).map(|_| Sandbox::start_from(rt.clone(), dir.clone(), metadata.clone()));
    let mut started = Vec::with_capacity(n);
    let mut first_error = None;
    for result in futures_join_all(starts).await {
        match result {
            Ok(sbx) => started.push(sbx),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        for sbx in started {
            let _ = sbx.kill().await;
        }
        return Err(e);
    }
    Ok(started)
}

/// Takes an exclusive `flock` on `path` (created if needed), waiting for it.
fn lock_file(path: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("cannot open {}", path.display())))?;
    loop {
        // SAFETY: flock on a descriptor `file` keeps open; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(file);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::io(format!("cannot lock {}", path.display()))(err));
        }
    }
}

/// Publishes a named snapshot: copies the snapshot of the sandbox
/// directory `from` (see [`snap::copy_to`]) into a temporary directory next
/// to `target`, describes it, and renames it into place.
pub(crate) fn publish_snapshot(
    from: &Path,
    target: &Path,
    record: SandboxRecord,
    info: &SnapshotInfo,
) -> Result<SnapshotInfo> {
    let parent = target.parent().expect("a snapshot directory has a parent");
    let mut suffix = [0u8; 6];
    crate::sandbox::fill_random(&mut suffix)?;
    let tmp = parent.join(format!(
        ".tmp-{}-{}",
        info.name,
        suffix
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    std::fs::create_dir(&tmp).map_err(Error::io(format!("cannot create {}", tmp.display())))?;
    let result = (|| {
        snap::copy_to(from, &tmp, record)?;
        let json = serde_json::to_vec_pretty(info).expect("a snapshot record serialises");
        std::fs::write(tmp.join(info::SNAPSHOT_RECORD), json)
            .map_err(Error::io(format!("cannot write {}", tmp.display())))?;
        crate::fsutil::sync_dir(&tmp).map_err(Error::io("cannot sync the snapshot"))?;
        match std::fs::rename(&tmp, target) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                return Err(Error::SnapshotExists {
                    name: info.name.clone(),
                })
            }
            Err(e) => return Err(Error::io(format!("cannot publish {}", target.display()))(e)),
        }
        crate::fsutil::sync_dir(parent).map_err(Error::io("cannot sync the snapshot directory"))?;
        Ok(info.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Deletes a snapshot directory: renamed away first, so that it vanishes
/// at once and a crash halfway leaves no half-deleted snapshot.
pub(crate) async fn remove_snapshot_dir(dir: &Path) -> Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let parent = dir.parent().expect("a snapshot directory has a parent");
        let name = dir.file_name().expect("has a name").to_string_lossy();
        let doomed = parent.join(format!(".deleted-{name}"));
        let _ = std::fs::remove_dir_all(&doomed);
        std::fs::rename(&dir, &doomed)
            .and_then(|()| std::fs::remove_dir_all(&doomed))
            .map_err(Error::io(format!(
                "cannot delete the snapshot {}",
                dir.display()
            )))
    })
    .await
    .map_err(|e| Error::io("the delete task failed")(std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_cannot_traverse() {
        assert!(valid_name("python"));
        assert!(valid_name("py-3.11_x"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("a/b"));
    }
}
