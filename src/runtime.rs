//! The runtime: a state directory, where templates are found, and the
//! sandboxes created from them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::info::{self, ListQuery, SandboxInfo, SandboxPage, SandboxState, SnapshotInfo};
use crate::sandbox::{self, Live, Paused, Restored, Running, Sandbox, SandboxConfig, SandboxId};
use crate::snapshot::{self as snap, SandboxRecord};
use crate::template::Template;
use crate::vmm::cpu::{HostKind, HostProfile};
use crate::vmm::vm::SpareVm;

/// Environment variable: extra template directories, `:`-separated.
pub const TEMPLATE_PATH_ENV: &str = "DORMOUSE_TEMPLATE_PATH";
/// Environment variable: the build cache of `guest/build.sh`.
pub const CACHE_ENV: &str = "DORMOUSE_CACHE";
/// The longest a sandbox runs without a pause unless
/// [`RuntimeBuilder::max_running_time`] says otherwise.
pub const DEFAULT_MAX_RUNNING: Duration = Duration::from_secs(24 * 3600);
/// How old a sandbox directory with neither a snapshot nor a live handle
/// must be before a sweep deletes it (a creation that crashed; younger ones
/// may be a creation in progress in another process).
const ABANDONED_AFTER: Duration = Duration::from_secs(600);

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

pub(crate) struct RuntimeInner {
    pub(crate) dir: PathBuf,
    template_dirs: Vec<PathBuf>,
    pub(crate) kvm_path: PathBuf,
    /// A VM made ahead of time for the next create or resume.
    pub(crate) spare_vm: Arc<SpareVm>,
    pub(crate) host: HostKind,
    /// The longest a sandbox runs without a pause (then its timeout action
    /// applies), if limited.
    pub(crate) max_running: Option<Duration>,
    /// How long paused sandboxes are kept, if not until killed.
    retention: Option<Duration>,
    /// The sandboxes running under a handle of this runtime, by id.
    registry: Mutex<HashMap<String, Weak<Live>>>,
    /// Base memory files whose data was checked (see
    /// [`snapshot::check_base`](crate::snapshot::check_base)), by identity:
    /// every sandbox created from a template maps the same file, which is
    /// read once per process, not at every create.
    checked_memory: Mutex<std::collections::HashSet<FileIdentity>>,
}

/// A file as the kernel knows it: a write changes its modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileIdentity {
    pub(crate) fn of(file: &std::fs::File) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

impl std::fmt::Debug for RuntimeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeInner")
            .field("dir", &self.dir)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Options for opening a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    dir: PathBuf,
    template_dirs: Vec<PathBuf>,
    kvm_path: PathBuf,
    max_running: Option<Duration>,
    retention: Option<Duration>,
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

    /// Limits how long a sandbox runs without a pause (default
    /// [`DEFAULT_MAX_RUNNING`]): then it is paused if it was created with
    /// auto-pause, else killed, whatever its timeout says. Pausing and
    /// resuming starts the count again.
    pub fn max_running_time(mut self, max: Option<Duration>) -> Self {
        self.max_running = max;
        self
    }

    /// Deletes paused sandboxes `retention` after their pause (default:
    /// kept until killed), at [`open`](Self::open) and at every
    /// [`Runtime::sweep`].
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Creates the state directory if needed and opens the runtime. Sweeps
    /// it (see [`Runtime::sweep`]).
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
        let rt = Runtime {
            inner: Arc::new(RuntimeInner {
                dir: self.dir,
                template_dirs,
                spare_vm: SpareVm::new(self.kvm_path.clone()),
                kvm_path: self.kvm_path,
                host: HostKind::detect(),
                max_running: self.max_running,
                retention: self.retention,
                registry: Mutex::new(HashMap::new()),
                checked_memory: Mutex::new(std::collections::HashSet::new()),
            }),
        };
        rt.sweep().await?;
        Ok(rt)
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

pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

impl RuntimeInner {
    /// Whether the memory file `id` was checked in this process.
    pub(crate) fn memory_checked(&self, id: &FileIdentity) -> bool {
        self.checked_memory.lock().unwrap().contains(id)
    }

    pub(crate) fn set_memory_checked(&self, id: FileIdentity) {
        self.checked_memory.lock().unwrap().insert(id);
    }

    /// Records that `live` runs under a handle of this runtime.
    pub(crate) fn register(&self, id: &SandboxId, live: &Arc<Live>) {
        let mut registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        registry.retain(|_, l| l.strong_count() > 0);
        registry.insert(id.to_string(), Arc::downgrade(live));
    }

    /// The sandbox `id` if it runs under a handle of this runtime.
    fn running(&self, id: &str) -> Option<Arc<Live>> {
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        registry
            .get(id)
            .and_then(Weak::upgrade)
            .filter(|live| live.is_running())
    }

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
    pub(crate) async fn template_snapshot(
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
            "{}/{}/{}/{}/{mem_mib}/{vcpus}/{}/{}/code-interpreter-started",
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
            // Start the default code interpreter, so that every sandbox of
            // the template has it running (its first `run_code` takes as
            // long as any other, not the seconds an interpreter takes to
            // start). Best effort: a template may have no Python.
            if let Err(e) = booted.run_code("pass").await {
                log::info!(
                    "template {:?} has no code interpreter: {e}",
                    template.manifest.name
                );
            }
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
            max_running: Some(DEFAULT_MAX_RUNNING),
            retention: None,
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn inner(&self) -> Arc<RuntimeInner> {
        self.inner.clone()
    }

    /// The snapshot sandboxes of `template` start from (made if needed).
    pub(crate) async fn inner_template_snapshot(
        &self,
        template: &Template,
        config: &SandboxConfig,
    ) -> Result<PathBuf> {
        self.inner.template_snapshot(template, config).await
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
    /// Templates built with [`Runtime::build_template`] are found first.
    /// [`Error::TemplateNotFound`] for an unknown template.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime) -> dormouse::Result<()> {
    /// use dormouse::SandboxConfig;
    /// let sbx = rt.create("python", SandboxConfig::default().metadata("user", "alice")).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create(&self, template: &str, config: SandboxConfig) -> Result<Sandbox<Running>> {
        if let Some((dir, spec)) = crate::build::find(&self.inner.dir, template) {
            let manifest = snap::read_manifest(&dir)?;
            let fixed = |asked: Option<u32>, built: u32, what: &str| {
                match asked {
                Some(asked) if asked != built => Err(Error::InvalidConfig(format!(
                    "template {template:?} was built with {built} {what}; build another one for {asked}"
                ))),
                _ => Ok(()),
            }
            };
            fixed(config.memory_mib, manifest.sandbox.mem_mib, "MiB of memory")?;
            fixed(
                config.vcpus.map(u32::from),
                u32::from(manifest.sandbox.vcpus),
                "vCPUs",
            )?;
            let mut env = spec.env;
            env.extend(config.env.clone());
            let config = SandboxConfig {
                env,
                cwd: config.cwd.clone().or(spec.cwd),
                ..config
            };
            return Sandbox::start_from(self.inner.clone(), dir, Some(spec.name), config).await;
        }
        let template = self.template(template)?;
        let source = self.inner.template_snapshot(&template, &config).await?;
        Sandbox::start_from(self.inner.clone(), source, None, config).await
    }

    /// Makes sure `template` can be created from without a boot: for a
    /// base template, boots it and keeps its snapshot if this state
    /// directory has none yet (what the first [`Self::create`] would do,
    /// minus the sandbox). A server calls this before it says it is ready.
    ///
    /// [`Error::TemplateNotFound`] for an unknown template.
    pub async fn prepare(&self, template: &str) -> Result<()> {
        if crate::build::find(&self.inner.dir, template).is_some() {
            return Ok(());
        }
        let template = self.template(template)?;
        self.inner
            .template_snapshot(&template, &SandboxConfig::default())
            .await
            .map(drop)
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
        let template = Some(info.template.clone());
        let config = SandboxConfig {
            metadata: info.metadata,
            env: info.env,
            cwd: info.cwd,
            ..SandboxConfig::default()
        };
        start_many(&self.inner, dir, n, template, config).await
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
    /// one, before or after a restart), or gives another handle on it if it
    /// runs under a handle of this runtime.
    ///
    /// Handles on a running sandbox share it: each can run commands, use
    /// files and ports, snapshot or fork it; the sandbox is killed when the
    /// last of them is dropped (or by [`Sandbox::kill`] on any, which spends
    /// the others: [`Error::NotFound`]); [`Sandbox::pause`] on one spends
    /// the others ([`Error::SandboxPaused`]; connect again after a resume).
    ///
    /// Gives [`Error::NotFound`] for an unknown or killed id,
    /// [`Error::Busy`] while another process (or a paused handle of this
    /// one) holds it.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime, id: &str) -> dormouse::Result<()> {
    /// let sbx = rt.connect(id).await?;
    /// let out = sbx.commands().run("cat /tmp/state").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, id: &str) -> Result<Sandbox<Running>> {
        if let Some(sbx) = self.attach(id).await {
            return Ok(sbx);
        }
        Ok(self.paused(id).await?.resume().await?)
    }

    /// [`connect`](Self::connect) with a timeout other than the one the
    /// sandbox was created with, from now on (also for one that runs).
    pub async fn connect_with_timeout(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Sandbox<Running>> {
        if let Some(sbx) = self.attach(id).await {
            sbx.set_timeout(timeout)?;
            return Ok(sbx);
        }
        Ok(self.paused(id).await?.resume_with_timeout(timeout).await?)
    }

    /// Another handle on the sandbox `id` if it runs under a handle of this
    /// runtime.
    async fn attach(&self, id: &str) -> Option<Sandbox<Running>> {
        Sandbox::attach(self.inner.clone(), self.inner.running(id)?).await
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

    /// Pauses the sandbox `id`, running under a handle of this runtime, as
    /// [`Sandbox::pause`] does; that handle is spent (its calls give
    /// [`Error::SandboxPaused`]) and the sandbox can be resumed by id.
    ///
    /// [`Error::AlreadyPaused`] if it is paused, [`Error::NotFound`] for an
    /// unknown or killed id, [`Error::Busy`] if another process runs it.
    pub async fn pause(&self, id: &str) -> Result<()> {
        if let Some(live) = self.inner.running(id) {
            return live.pause(true).await;
        }
        match self.info(id).await?.state {
            SandboxState::Paused => Err(Error::AlreadyPaused { id: id.to_owned() }),
            _ => Err(Error::Busy { id: id.to_owned() }),
        }
    }

    /// Sets the timeout of the sandbox `id`, running under a handle of this
    /// runtime (see [`Sandbox::set_timeout`]).
    ///
    /// [`Error::SandboxPaused`] if it is paused, [`Error::NotFound`] for an
    /// unknown or killed id, [`Error::Busy`] if another process runs it.
    pub async fn set_timeout(&self, id: &str, timeout: Duration) -> Result<()> {
        if let Some(live) = self.inner.running(id) {
            return live.set_timeout(timeout);
        }
        match self.info(id).await?.state {
            SandboxState::Paused => Err(Error::SandboxPaused { id: id.to_owned() }),
            _ => Err(Error::Busy { id: id.to_owned() }),
        }
    }

    /// Kills the sandbox `id` and deletes all its files: a paused one, or
    /// one running under a handle of this runtime (that handle is spent:
    /// its calls give [`Error::NotFound`]).
    ///
    /// A sandbox that cannot be resumed (damaged or foreign snapshot,
    /// template gone or rebuilt, a creation that crashed) is deleted all
    /// the same.
    ///
    /// [`Error::NotFound`] for an unknown or killed id, [`Error::Busy`] if
    /// another process (or a handle on it paused) holds it.
    pub async fn kill(&self, id: &str) -> Result<()> {
        if let Some(live) = self.inner.running(id) {
            return live.kill().await;
        }
        match self.paused(id).await {
            Ok(paused) => paused.kill().await,
            Err(e @ (Error::NotFound { .. } | Error::Busy { .. })) => Err(e),
            Err(why) => {
                log::warn!("killing sandbox {id}, which cannot be resumed: {why}");
                let rt = self.inner.clone();
                let id = id.to_owned();
                tokio::task::spawn_blocking(move || Sandbox::delete_unopened(&rt, &id))
                    .await
                    .map_err(|e| crate::sandbox::join_error("kill", e))?
            }
        }
    }

    /// Deletes what no one will use: paused sandboxes whose retention
    /// period (see [`RuntimeBuilder::retention`]) has ended, and sandbox
    /// directories a crashed creation left (no snapshot, no handle). Runs
    /// at [`open`](Self::open); call it now and then to apply retention in
    /// a long-lived process. Returns the ids deleted.
    pub async fn sweep(&self) -> Result<Vec<String>> {
        let dir = self.inner.dir.join("sandboxes");
        let retention = self.inner.retention;
        let candidates = tokio::task::spawn_blocking(move || -> Result<Vec<(String, bool)>> {
            let entries = std::fs::read_dir(&dir)
                .map_err(Error::io(format!("cannot list {}", dir.display())))?;
            let now = crate::fsutil::now_ms();
            let mut doomed = Vec::new();
            for entry in entries.flatten() {
                let Some(id) = entry.file_name().to_str().and_then(SandboxId::parse) else {
                    continue;
                };
                let path = entry.path();
                if sandbox::is_held(&path) {
                    continue;
                }
                if snap::exists(&path) {
                    let expired = retention.is_some_and(|keep| {
                        snap::read_manifest(&path).is_ok_and(|m| {
                            m.paused_at_ms.saturating_add(keep.as_millis() as u64) <= now
                        })
                    });
                    if expired {
                        doomed.push((id.to_string(), true));
                    }
                } else {
                    let age = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if age.is_some_and(|age| age >= ABANDONED_AFTER) {
                        doomed.push((id.to_string(), false));
                    }
                }
            }
            Ok(doomed)
        })
        .await
        .map_err(|e| Error::io("the sweep task failed")(std::io::Error::other(e)))??;
        let mut deleted = Vec::new();
        for (id, paused) in candidates {
            let result = if paused {
                self.kill(&id).await
            } else {
                let path = self.inner.dir.join("sandboxes").join(&id);
                tokio::fs::remove_dir_all(&path)
                    .await
                    .map_err(Error::io(format!("cannot delete {}", path.display())))
            };
            match result {
                Ok(()) => deleted.push(id),
                // Resumed or deleted by someone else meanwhile.
                Err(Error::Busy { .. } | Error::NotFound { .. }) => {}
                Err(e) => log::warn!("sweep: cannot delete sandbox {id}: {e}"),
            }
        }
        if !deleted.is_empty() {
            log::info!("sweep deleted {} sandboxes: {deleted:?}", deleted.len());
        }
        Ok(deleted)
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
    let mut info = info::read(dir).unwrap_or_else(|| SandboxInfo::of_snapshot(&manifest, 0));
    info.state = SandboxState::Paused;
    info.paused_at_ms = Some(manifest.paused_at_ms);
    Some(info)
}

/// Starts `n` sandboxes from the snapshot in `dir`: makes every sandbox's
/// directory, then restores every machine with its vCPUs parked, one after
/// another, and only then starts the guests, as many at a time as the host
/// has cores, each waited for until its agent answers. So no restore
/// competes for the CPU with a guest that already runs, and the guests'
/// starts do not crowd each other (on a PVM host, where a start is
/// emulated guest kernel work, 16 at once on 2 cores took 8 s, 2 at a time
/// 3.1-3.6 s). If one fails, the others are killed and its error returned.
pub(crate) async fn start_many(
    rt: &Arc<RuntimeInner>,
    dir: PathBuf,
    n: usize,
    template: Option<String>,
    config: SandboxConfig,
) -> Result<Vec<Sandbox<Running>>> {
    let prepares = (0..n).map(|_| {
        Sandbox::<Paused>::prepare_from(rt.clone(), dir.clone(), template.clone(), config.clone())
    });
    let mut prepared = Vec::with_capacity(n);
    let mut first_error = None;
    for result in crate::services::join_all(prepares).await {
        match result {
            Ok(sandbox) => prepared.push(sandbox),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let mut restored = Vec::with_capacity(n);
    let mut prepared = prepared.into_iter();
    if first_error.is_none() {
        for (paused, took) in prepared.by_ref() {
            match paused.restore_parked(took).await {
                Ok(sandbox) => restored.push(sandbox),
                Err(e) => {
                    first_error = Some(e.discard().await);
                    break;
                }
            }
        }
    }
    if let Some(e) = first_error {
        crate::services::join_all(prepared.map(|(paused, _)| paused.kill())).await;
        crate::services::join_all(restored.into_iter().map(Restored::discard)).await;
        return Err(e);
    }
    // Guests start a few at a time (one per host core): more at once only
    // take turns on the cores, and slower (on a PVM host each start is
    // emulated guest kernel work).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let turns = Arc::new(tokio::sync::Semaphore::new(cores));
    let runs = restored.into_iter().map(|restored| {
        let turns = turns.clone();
        async move {
            let _turn = turns.acquire().await;
            restored.run(None).await
        }
    });
    let mut started = Vec::with_capacity(n);
    for result in crate::services::join_all(runs).await {
        match result {
            Ok(sandbox) => started.push(sandbox),
            Err(e) => {
                let error = e.discard().await;
                first_error.get_or_insert(error);
            }
        }
    }
    if let Some(e) = first_error {
        crate::services::join_all(started.into_iter().map(Sandbox::<Running>::kill)).await;
        return Err(e);
    }
    Ok(started)
}

/// Takes an exclusive `flock` on `path` (created if needed), waiting for it.
pub(crate) fn lock_file(path: &Path) -> Result<std::fs::File> {
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
