//! Sandboxes: a microVM booted from a template, with its own copy-on-write
//! disk, and the guest agent it talks to over vsock.
//!
//! `Sandbox<S>` is type-state: `Sandbox<Running>` has the operations that
//! need a running guest, `Sandbox<Paused>` the ones on a sandbox whose whole
//! state is in files (see [`crate::snapshot`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::{self, AgentError};
use crate::disk::CowDisk;
mod live;

pub(crate) use live::Live;
use live::LiveState;

use crate::error::{ConsoleTail, Error, Result};
use crate::fsutil::now_ms;
use crate::info::{self, SandboxInfo, SandboxState};
use crate::proto::AGENT_VSOCK_PORT;
use crate::runtime::RuntimeInner;
use crate::snapshot::{self, SandboxRecord};
use crate::template::Template;
use crate::vmm::cpu::HostProfile;
use crate::vmm::devices::virtio::block::Block;
use crate::vmm::devices::virtio::vsock::{Vsock, VsockConnector};
use crate::vmm::devices::virtio::VirtioDevice;
use crate::vmm::lazy::LoadFailure;
use crate::vmm::vm::TakenVm;
use crate::vmm::{memory, Machine, MachineConfig, MachineError, RestoreConfig};

/// The guest CID of every sandbox (each has its own vsock device).
const GUEST_CID: u64 = 3;
/// How often a booting guest is probed for its agent.
const READY_POLL: Duration = Duration::from_millis(250);
/// How long one connection attempt to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running request checks that the guest is still alive.
const LIVENESS_POLL: Duration = Duration::from_millis(200);
/// How long a resumed guest may take to answer its agent again.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);
/// The lock file every live handle of a sandbox holds (`flock`).
const LOCK_FILE: &str = "lock";

/// Type-state marker: the sandbox's guest is running.
#[derive(Debug)]
pub enum Running {}

/// Type-state marker: the sandbox is paused; its whole state is in files
/// and it uses no memory or CPU.
#[derive(Debug)]
pub enum Paused {}

/// A sandbox's id: 20 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    fn random() -> Result<SandboxId> {
        let mut bytes = [0u8; 10];
        fill_random(&mut bytes)?;
        Ok(SandboxId(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses an id; `None` if it is not one (so it cannot name a path).
    pub fn parse(s: &str) -> Option<SandboxId> {
        (s.len() == 20
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| SandboxId(s.to_owned()))
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub(crate) fn fill_random(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .map_err(Error::io("cannot read /dev/urandom"))
}

/// How a sandbox is created.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Guest memory in MiB; `None` takes the template's.
    pub memory_mib: Option<u32>,
    /// vCPUs; `None` takes the template's.
    pub vcpus: Option<u8>,
    /// How long the guest may take to boot to its agent before creation fails
    /// (default 5 minutes: a boot takes about a minute on a PVM host, well
    /// under a second on VT-x). Only the first sandbox of a template
    /// boots; later ones start from its snapshot.
    pub boot_timeout: Duration,
    /// The caller's labels, kept with the sandbox and matched by
    /// [`ListQuery::metadata`](crate::ListQuery::metadata).
    pub metadata: BTreeMap<String, String>,
    /// How long the sandbox runs after it is created or resumed before it
    /// is killed (or paused, with [`auto_pause`](Self::auto_pause));
    /// default [`DEFAULT_TIMEOUT`]. Change it while it runs with
    /// [`Sandbox::set_timeout`].
    pub timeout: Duration,
    /// Pause instead of kill when the timeout runs out, after every resume
    /// too (default false).
    pub auto_pause: bool,
    /// Environment variables every command of the sandbox gets (a
    /// command's own override them); added to its template's.
    pub env: BTreeMap<String, String>,
    /// The working directory of commands that give none (default: the
    /// template's, else `/`).
    pub cwd: Option<String>,
}

/// The timeout of a sandbox unless its [`SandboxConfig`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            memory_mib: None,
            vcpus: None,
            boot_timeout: Duration::from_secs(300),
            metadata: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            auto_pause: false,
            env: BTreeMap::new(),
            cwd: None,
        }
    }
}

impl SandboxConfig {
    /// Sets the guest memory size in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// Sets the vCPU count.
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = Some(n);
        self
    }

    /// Sets the boot timeout.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Sets the timeout (see [`SandboxConfig::timeout`](Self#structfield.timeout)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Pauses the sandbox at its timeout instead of killing it.
    pub fn auto_pause(mut self, on: bool) -> Self {
        self.auto_pause = on;
        self
    }

    /// Adds the environment variable `key` = `value` for every command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the working directory of commands that give none.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    fn check(&self) -> Result<()> {
        info::check_metadata(&self.metadata)?;
        info::check_map("environment", &self.env)?;
        live::check_timeout(self.timeout)
    }

    /// Adds the label `key` = `value` (at most 64 labels; keys up to 256
    /// bytes, values up to 2048).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// A sandbox in state `S`.
///
/// Dropping a `Sandbox<Running>` without [`Sandbox::kill`] does the same as
/// `kill`, synchronously: the vCPUs are stopped, every thread is joined, the
/// guest memory and all file descriptors are released and the sandbox's files
/// are deleted. (It blocks the dropping thread for the few milliseconds that
/// takes.)
pub struct Sandbox<S> {
    inner: SandboxInner,
    _state: PhantomData<S>,
}

struct SandboxInner {
    rt: Arc<RuntimeInner>,
    /// The sandbox: what never changes (id, directory, template, the
    /// connections to the guest, shared with port forwards, which outlive
    /// a pause) and the state that does, shared with the lifecycle timer,
    /// the runtime's registry and the other handles on a running sandbox.
    live: Arc<Live>,
    /// How the last start (create or resume) went.
    timings: Option<StartTimings>,
}

/// How long the last start of a sandbox (its creation, or its last resume)
/// took, by part: see [`Sandbox::start_timings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StartTimings {
    /// A new sandbox: its directory made from the snapshot it starts from
    /// (memory files linked, disk overlay copied). Zero for a resume.
    pub prepare: Duration,
    /// Until the vCPUs run: snapshot files read and checked, memory
    /// mapped, disk opened, machine state restored. The VMM's part.
    pub restore: Duration,
    /// From its vCPUs' start until the guest agent answered (the guest
    /// handles the vsock reset, sets its clock and takes fresh entropy).
    /// The guest's part: slow where its kernel runs emulated (PVM). The
    /// sandboxes of a fork or of
    /// [`Runtime::create_from_snapshot`](crate::Runtime::create_from_snapshot)
    /// are all restored first and then started a few at a time: the wait
    /// for a turn is in none of these parts.
    pub agent: Duration,
}

/// How the host reaches a sandbox's guest: the vsock connector while the
/// guest runs, nothing while it is paused, and closed for good once the
/// sandbox handle is gone (port forwards then stop listening).
pub(crate) struct AgentLink {
    connector: Mutex<Option<VsockConnector>>,
    closed: tokio::sync::watch::Sender<bool>,
}

impl AgentLink {
    fn new(connector: Option<VsockConnector>) -> Arc<Self> {
        Arc::new(Self {
            connector: Mutex::new(connector),
            closed: tokio::sync::watch::Sender::new(false),
        })
    }

    fn set(&self, connector: Option<VsockConnector>) {
        *self
            .connector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = connector;
    }

    /// The connector, while the guest runs.
    pub(crate) fn connector(&self) -> Option<VsockConnector> {
        self.connector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Resolves once the sandbox handle is gone (killed, dropped).
    pub(crate) async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
    }

    fn close(&self) {
        self.set(None);
        self.closed.send_replace(true);
    }

    /// A new connection to the agent's port, or `None` while paused.
    pub(crate) async fn connect(&self) -> Option<Result<tokio::net::UnixStream>> {
        let connector = self.connector()?;
        Some(connect_vsock(connector).await)
    }
}

/// A new connection to the guest agent through `connector`.
async fn connect_vsock(connector: VsockConnector) -> Result<tokio::net::UnixStream> {
    let stream =
        tokio::task::spawn_blocking(move || connector.connect(AGENT_VSOCK_PORT, CONNECT_TIMEOUT))
            .await
            .map_err(|e| Error::Io {
                what: "the vsock connect task failed".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(Error::Vsock)?;
    stream
        .set_nonblocking(true)
        .map_err(Error::io("cannot set the agent connection non-blocking"))?;
    tokio::net::UnixStream::from_std(stream)
        .map_err(Error::io("cannot register the agent connection"))
}

impl Drop for SandboxInner {
    fn drop(&mut self) {
        let mut st = self.live.st();
        st.handles = st.handles.saturating_sub(1);
        if st.handles > 0 {
            return; // the sandbox runs on under its other handles
        }
        if let Some(timer) = st.timer.take() {
            timer.abort();
        }
        self.live.link.close();
        if let Some(mut machine) = st.machine.take() {
            machine.stop();
        }
        st.disk = None;
        if st.delete_on_drop {
            st.delete_on_drop = false;
            st.taken = Some(live::Taken::Killed);
            if let Err(e) = std::fs::remove_dir_all(&self.live.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", self.live.dir.display());
                }
            }
        }
        st.lock = None;
    }
}

impl SandboxInner {
    /// A handle's inner part over the sandbox in `dir`, in `state`.
    fn new(
        rt: Arc<RuntimeInner>,
        id: SandboxId,
        dir: PathBuf,
        rootfs: PathBuf,
        link: Arc<AgentLink>,
        state: LiveState,
    ) -> Self {
        let live = Live::new(id, dir, rootfs, link, state);
        SandboxInner {
            rt,
            live,
            timings: None,
        }
    }

    /// Another handle's inner part over the running sandbox `live`, if it
    /// still runs.
    fn attach(rt: Arc<RuntimeInner>, live: Arc<Live>) -> Option<Self> {
        if !live.attach() {
            return None;
        }
        Some(SandboxInner {
            rt,
            live,
            timings: None,
        })
    }

    /// The sandbox runs (created or resumed): starts its timeout, `timeout`
    /// or the one it was created with, and registers it with the runtime.
    fn start_running(&mut self, timeout: Option<Duration>) {
        {
            let mut st = self.live.st();
            st.info.state = SandboxState::Running;
            st.info.started_at_ms = now_ms();
            let timeout = timeout.unwrap_or(Duration::from_millis(st.info.timeout_ms));
            let start = tokio::time::Instant::now();
            st.run_limit = self.rt.max_running.map(|max| start + max);
            st.set_deadline(timeout);
            if let Err(e) = st.save_info(&self.live.dir) {
                log::warn!("{e}");
            }
        }
        let timer = self.live.start_timer();
        if let Some(old) = self.live.st().timer.replace(timer) {
            old.abort();
        }
        self.rt.register(&self.live.id, &self.live);
    }

    /// The sandbox stopped running under this handle: its timer ends.
    fn stop_timer(&mut self) {
        self.live.stop_timer();
    }
}

/// An open-file-description write lock on the whole of `file`
/// (`F_OFD_SETLK`): held by one open file, in any process, until it is
/// closed; unlike `flock` it can be queried without taking it.
fn ofd_lock(file: &File, cmd: libc::c_int) -> std::io::Result<libc::flock> {
    // SAFETY: an all-zero `flock` is a valid value of the plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl reads and (for F_OFD_GETLK) writes `lock`, a local
    // that outlives the call, on a descriptor `file` keeps open.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut lock) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lock)
}

/// Takes the sandbox's lock, or says who has it.
/// The id, directory and lock of the existing sandbox `id`: `NotFound`
/// for a malformed or unknown id, `Busy` if a handle holds it.
fn lock_existing(rt: &RuntimeInner, id: &str) -> Result<(SandboxId, PathBuf, File)> {
    let not_found = || Error::NotFound { id: id.to_owned() };
    let id = SandboxId::parse(id).ok_or_else(not_found)?;
    let dir = rt.dir.join("sandboxes").join(id.as_str());
    if !dir.is_dir() {
        return Err(not_found());
    }
    let lock = lock_sandbox(&dir, &id)?;
    Ok((id, dir, lock))
}

fn lock_sandbox(dir: &Path, id: &SandboxId) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(Error::io(format!("cannot open {}", path.display())))?;
    match ofd_lock(&file, libc::F_OFD_SETLK) {
        Ok(_) => Ok(file),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            Err(Error::Busy { id: id.to_string() })
        }
        Err(source) => Err(Error::Io {
            what: format!("cannot lock {}", path.display()),
            source,
        }),
    }
}

/// Whether a live handle (of this process or another) holds the lock of the
/// sandbox directory `dir`. Does not take it.
pub(crate) fn is_held(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(LOCK_FILE)) else {
        return false;
    };
    // F_OFD_GETLK with a write lock needs only a readable descriptor.
    ofd_lock(&file, libc::F_OFD_GETLK)
        .is_ok_and(|lock| lock.l_type != libc::F_UNLCK as libc::c_short)
}

/// Why a pause failed, with the sandbox, still running.
///
/// Converting it into an [`Error`] (e.g. with `?`) drops the sandbox, which
/// kills it; keep [`PauseError::sandbox`] to go on using it.
#[derive(Debug)]
pub struct PauseError {
    /// The sandbox, running as before.
    pub sandbox: Sandbox<Running>,
    /// What went wrong.
    pub error: Error,
}

/// Why a resume failed, with the sandbox, still paused and resumable.
#[derive(Debug)]
pub struct ResumeError {
    /// The sandbox, paused. If the restored guest ran but did not answer,
    /// it was paused again as it was then. `None` only if it could not
    /// even be paused again; then it was killed.
    pub sandbox: Option<Sandbox<Paused>>,
    /// What went wrong.
    pub error: Error,
}

impl std::fmt::Display for PauseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot pause sandbox {}: {}",
            self.sandbox.id(),
            self.error
        )
    }
}

impl std::fmt::Display for ResumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sandbox {
            Some(sandbox) => write!(f, "cannot resume sandbox {}: {}", sandbox.id(), self.error),
            None => write!(
                f,
                "cannot resume the sandbox (it was killed): {}",
                self.error
            ),
        }
    }
}

impl std::error::Error for PauseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl std::error::Error for ResumeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<PauseError> for Error {
    fn from(e: PauseError) -> Error {
        e.error
    }
}

impl From<ResumeError> for Error {
    fn from(e: ResumeError) -> Error {
        e.error
    }
}

pub(crate) fn join_error(what: &str, e: tokio::task::JoinError) -> Error {
    Error::Io {
        what: format!("the {what} task failed"),
        source: std::io::Error::other(e.to_string()),
    }
}

impl<S> std::fmt::Debug for Sandbox<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.inner.live.id)
            .field("template", &self.inner.live.template)
            .finish()
    }
}

impl<S> Sandbox<S> {
    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.inner.live.id
    }

    /// The template it was created from.
    pub fn template(&self) -> &str {
        &self.inner.live.template
    }

    /// The directory holding the sandbox's files (console log, disk overlay).
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.live.dir
    }

    /// What is known about the sandbox: state, metadata, times, sizes,
    /// timeout.
    pub fn info(&self) -> SandboxInfo {
        self.inner.live.st().info.clone()
    }

    /// The labels it was created with.
    pub fn metadata(&self) -> BTreeMap<String, String> {
        self.inner.live.st().info.metadata.clone()
    }
}

impl Sandbox<Running> {
    /// Boots a new sandbox from the template's kernel and root filesystem:
    /// what a template's snapshot is made from (see
    /// [`Runtime::create`](crate::Runtime::create)). It has no timeout.
    pub(crate) async fn boot(
        rt: Arc<RuntimeInner>,
        template: Template,
        config: SandboxConfig,
    ) -> Result<Sandbox<Running>> {
        config.check()?;
        let mem_mib = config.memory_mib.unwrap_or(template.manifest.mem_mib);
        let vcpus = config.vcpus.unwrap_or(template.manifest.vcpus);
        let (id, dir, lock, guard) = new_sandbox_dir(&rt).await?;
        let kernel = template.kernel_path();
        let rootfs = template.rootfs_path();
        let overlay = dir.join("disk");
        let console_log = dir.join("console.log");
        let kvm_path = rt.kvm_path.clone();
        let booted = tokio::task::spawn_blocking(move || -> Result<_> {
            let disk = CowDisk::create(&rootfs, &overlay)?;
            let block = Block::new(disk, false).map_err(|e| Error::InvalidConfig(e.to_string()))?;
            let disk = block.disk();
            let (vsock, connector) =
                Vsock::new(GUEST_CID).map_err(|e| Error::InvalidConfig(e.to_string()))?;
            let devices: Vec<Box<dyn VirtioDevice>> = vec![Box::new(block), Box::new(vsock)];
            let machine = Machine::boot(MachineConfig {
                kernel,
                cmdline: "root=/dev/vda rw init=/sbin/dormouse-agent".into(),
                mem_mib,
                vcpus,
                kvm_path,
                console_log,
                devices,
            })?;
            Ok((machine, connector, disk))
        })
        .await
        .map_err(|e| join_error("boot", e))??;
        let (machine, vsock, disk) = booted;
        let record = SandboxRecord {
            id: id.to_string(),
            template: template.manifest.name.clone(),
            kernel_hash: template.manifest.kernel_hash.clone(),
            rootfs_hash: template.manifest.rootfs_hash.clone(),
            mem_mib,
            vcpus,
            host: Some(HostProfile::current(rt.host)),
        };
        let now = now_ms();
        let info = SandboxInfo {
            id: id.to_string(),
            template: record.template.clone(),
            state: SandboxState::Running,
            metadata: config.metadata,
            created_at_ms: now,
            started_at_ms: now,
            paused_at_ms: None,
            vcpus,
            memory_mib: mem_mib,
            disk_mib: disk_mib(&template.rootfs_path()),
            timeout_ms: config.timeout.as_millis() as u64,
            auto_pause: config.auto_pause,
            end_at_ms: None,
            env: config.env,
            cwd: config.cwd,
        };
        let state = LiveState {
            record,
            info,
            machine: Some(machine),
            disk: Some(disk),
            based_on: None,
            dirty_log_complete: true,
            lock: Some(lock),
            delete_on_drop: true,
            taken: None,
            deadline: None,
            run_limit: None,
            timer: None,
            handles: 1,
        };
        let link = AgentLink::new(Some(vsock));
        let mut sandbox = Sandbox {
            inner: SandboxInner::new(rt, id, dir, template.rootfs_path(), link, state),
            _state: PhantomData,
        };
        std::mem::forget(guard); // the sandbox now owns (and cleans) the directory
        sandbox.wait_for_agent(config.boot_timeout).await?;
        // No timer: a booted sandbox is a template's, paused once it is set
        // up, whatever the limits of the sandboxes made from it.
        Ok(sandbox)
    }

    /// Starts a new sandbox from the snapshot in `source` (a template's or
    /// a named one): its files are linked or copied into a new sandbox
    /// directory (see [`snapshot::copy_to`]) and it is resumed from there,
    /// sharing the snapshot's memory pages until it writes them.
    pub(crate) async fn start_from(
        rt: Arc<RuntimeInner>,
        source: PathBuf,
        template: Option<String>,
        config: SandboxConfig,
    ) -> Result<Sandbox<Running>> {
        let (paused, prepared) =
            Sandbox::<Paused>::prepare_from(rt, source, template, config).await?;
        let restored = match paused.restore_parked(prepared).await {
            Ok(restored) => restored,
            Err(e) => return Err(e.discard().await),
        };
        match restored.run(None).await {
            Ok(sandbox) => Ok(sandbox),
            Err(e) => Err(e.discard().await),
        }
    }

    /// Lets the vCPUs of a machine just restored run.
    fn start_vcpus(&self) -> Result<()> {
        let mut st = self.inner.live.st();
        let machine = st
            .machine
            .as_mut()
            .expect("a restored sandbox has its machine");
        Ok(machine.resume()?)
    }

    /// The console's last lines (none while a transition has the machine).
    fn console_tail(&self) -> ConsoleTail {
        let st = self.inner.live.st();
        ConsoleTail(
            st.machine
                .as_ref()
                .map_or_else(Vec::new, |m| m.console().tail()),
        )
    }

    /// Why requests cannot go on: the sandbox was taken from this handle,
    /// or its guest stopped. `None` while it runs (or a transition of this
    /// handle has the machine).
    fn stopped(&self) -> Option<Error> {
        let st = self.inner.live.st();
        if let Some(taken) = st.taken {
            return Some(self.inner.live.taken_error(taken));
        }
        let machine = st.machine.as_ref()?;
        let reason = machine.stop_reason()?;
        Some(Error::GuestStopped {
            reason,
            console: ConsoleTail(machine.console().tail()),
        })
    }

    /// Stops the guest of a sandbox resumed from a snapshot, dropping
    /// everything it did since (its pending disk writes go at the next
    /// open): the sandbox is paused at that snapshot again.
    async fn back_to_snapshot(mut self) -> Sandbox<Paused> {
        self.inner.stop_timer();
        let stopping = {
            let mut st = self.inner.live.st();
            st.based_on = None;
            st.delete_on_drop = false;
            (st.machine.take(), st.disk.take())
        };
        self.inner.live.link.set(None);
        let stopped = tokio::task::spawn_blocking(move || drop(stopping)).await;
        if let Err(e) = stopped {
            log::error!("stopping the guest panicked: {e}");
        }
        Sandbox {
            inner: self.inner,
            _state: PhantomData,
        }
    }

    async fn wait_for_agent(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(error) = self.stopped() {
                return Err(error);
            }
            // The first request that gets through is the sync itself (one
            // round trip less on every resume).
            match tokio::time::timeout(CONNECT_TIMEOUT, self.sync_guest()).await {
                Ok(Ok(())) => return Ok(()),
                // An agent without `Sync` (a template of an older release).
                Ok(Err(Error::Agent(AgentError::Remote {
                    kind: crate::proto::ErrorKind::Protocol,
                    ..
                }))) => return Ok(()),
                _ => {}
            }
            if start.elapsed() >= timeout {
                return Err(Error::BootTimeout {
                    after: timeout,
                    console: self.console_tail(),
                });
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Sets the guest's clock from the host's and credits fresh host
    /// entropy to its random pool: after boot (so the guest's CRNG is ready
    /// at once instead of after a minute of interrupt timings) and after
    /// every resume (the clock stood still while paused, and a restored
    /// random state is a copy of the snapshot's).
    async fn sync_guest(&self) -> Result<()> {
        let mut entropy = vec![0u8; 64];
        fill_random(&mut entropy)?;
        let stream = self.connect_agent().await?;
        agent::sync(stream, entropy).await.map_err(Error::Agent)
    }

    /// A new connection to the guest agent.
    pub(crate) async fn connect_agent(&self) -> Result<tokio::net::UnixStream> {
        let Some(connector) = self.inner.live.link.connector() else {
            // Only a sandbox taken from this handle has no connector.
            return Err(self.stopped().unwrap_or_else(|| Error::SandboxPaused {
                id: self.inner.live.id.to_string(),
            }));
        };
        match connect_vsock(connector).await {
            Ok(stream) => Ok(stream),
            Err(e) => Err(self.why_failed(e).await),
        }
    }

    /// The error to report for a request that failed with `error`: the
    /// guest stopping, or the sandbox being taken from this handle (by its
    /// timeout, or by id), cut requests off and say so better. A pause or
    /// kill still at work on the machine is waited for first.
    async fn why_failed(&self, error: Error) -> Error {
        let in_transition = {
            let st = self.inner.live.st();
            st.taken.is_none() && st.machine.is_none()
        };
        if in_transition {
            self.inner.live.wait_transition().await;
        }
        self.stopped().unwrap_or(error)
    }

    /// `Ok` while this handle's guest runs; else the error its calls give:
    /// [`Error::SandboxPaused`] or [`Error::NotFound`] once the sandbox was
    /// taken from it (its timeout, or by id), [`Error::GuestStopped`] if
    /// the guest stopped. Costs no request to the guest.
    pub fn check(&self) -> Result<()> {
        self.stopped().map_or(Ok(()), Err)
    }

    /// How long its last start (creation or resume) took, by part; `None`
    /// for a sandbox that booted (a template's).
    pub fn start_timings(&self) -> Option<StartTimings> {
        self.inner.timings
    }

    /// The environment and working directory commands get by default.
    pub(crate) fn command_defaults(&self) -> (BTreeMap<String, String>, Option<String>) {
        let st = self.inner.live.st();
        (st.info.env.clone(), st.info.cwd.clone())
    }

    /// The link port forwards use.
    pub(crate) fn link(&self) -> Arc<AgentLink> {
        self.inner.live.link.clone()
    }

    /// Runs `fut` (a request to the agent) unless the guest stops first.
    pub(crate) async fn while_alive<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                res = &mut fut => return match res {
                    Ok(value) => Ok(value),
                    Err(e) => Err(self.why_failed(Error::Agent(e)).await),
                },
                _ = tokio::time::sleep(LIVENESS_POLL) => {
                    if let Some(error) = self.stopped() {
                        return Err(error);
                    }
                }
            }
        }
    }

    /// Another handle on the sandbox running under `live`, if it still
    /// runs: see [`Runtime::connect`](crate::Runtime::connect). A snapshot
    /// at work on it is waited for; after a pause or kill there is none.
    pub(crate) async fn attach(rt: Arc<RuntimeInner>, live: Arc<Live>) -> Option<Self> {
        let inner = match SandboxInner::attach(rt.clone(), live.clone()) {
            Some(inner) => inner,
            None => {
                live.wait_transition().await;
                SandboxInner::attach(rt, live)?
            }
        };
        Some(Sandbox {
            inner,
            _state: PhantomData,
        })
    }

    /// Stops the guest and deletes every file of the sandbox. Permanent.
    pub async fn kill(mut self) -> Result<()> {
        self.inner.stop_timer();
        self.inner.live.kill().await
    }

    /// Makes the sandbox's timeout run out `timeout` from now (the
    /// runtime's maximum running time still applies). Then it is killed,
    /// or paused if it was created with
    /// [`auto_pause`](SandboxConfig::auto_pause).
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        self.inner.live.set_timeout(timeout)
    }

    /// Pauses the sandbox: stops the guest (no cooperation from it needed),
    /// writes its memory, vCPU and device state next to its disk overlay,
    /// makes all of it durable and releases the guest's memory and threads.
    /// The sandbox can then be resumed with [`Sandbox::resume`], or by id
    /// with [`Runtime::connect`](crate::Runtime::connect), also from another
    /// process.
    ///
    /// Written is every page the guest ever touched (all-zero pages are
    /// left as holes). On failure the sandbox is handed back running.
    ///
    /// Other handles on the sandbox (from
    /// [`Runtime::connect`](crate::Runtime::connect) while it ran) are
    /// spent by the pause: their calls give [`Error::SandboxPaused`].
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// let paused = sbx.pause().await?;
    /// let sbx = paused.resume().await?;
    /// # Ok(()) }
    /// ```
    pub async fn pause(mut self) -> std::result::Result<Sandbox<Paused>, PauseError> {
        if let Err(error) = self.inner.live.pause(false).await {
            return Err(PauseError {
                sandbox: self,
                error,
            });
        }
        self.inner.stop_timer();
        let lock = {
            let mut st = self.inner.live.st();
            if st.handles == 1 {
                drop(st);
                return Ok(Sandbox {
                    inner: self.inner,
                    _state: PhantomData,
                });
            }
            // Other handles share it: they are spent, as by a pause by id,
            // and this one hands its lock to a new paused handle; unless
            // one of them killed it just now.
            let lock = match st.taken {
                None => st.lock.take(),
                Some(_) => None,
            };
            let Some(lock) = lock else {
                let error = self
                    .inner
                    .live
                    .taken_error(st.taken.unwrap_or(live::Taken::Paused));
                drop(st);
                return Err(PauseError {
                    sandbox: self,
                    error,
                });
            };
            st.taken = Some(live::Taken::Paused);
            lock
        };
        let rt = self.inner.rt.clone();
        let (id, dir) = (self.inner.live.id.clone(), self.inner.live.dir.clone());
        let reopened = tokio::task::spawn_blocking(move || Sandbox::with_lock(rt, id, dir, lock))
            .await
            .map_err(|e| join_error("reopen", e))
            .and_then(|r| r);
        reopened.map_err(|error| PauseError {
            sandbox: self,
            error,
        })
    }

    /// Records a named snapshot of the sandbox, which then runs on: the
    /// guest is stopped only while its state is written (as by a pause:
    /// the pages dirtied since the last snapshot), then the snapshot's
    /// files are linked into `<state dir>/snapshots/<name>/`. Start
    /// sandboxes from it with
    /// [`Runtime::create_from_snapshot`](crate::Runtime::create_from_snapshot).
    ///
    /// [`Error::SnapshotExists`] if the name is taken; names take 1 to 64
    /// of `[A-Za-z0-9._-]`, not starting with a dot. On any error the
    /// sandbox runs on as before.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime, mut sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// sbx.run_code("import numpy; data = list(range(10**6))").await?;
    /// sbx.snapshot("warm").await?;
    /// let copies = rt.create_from_snapshot("warm", 3).await?;
    /// # Ok(()) }
    /// ```
    pub async fn snapshot(&mut self, name: &str) -> Result<crate::SnapshotInfo> {
        let target = self.inner.rt.snapshot_dir(name)?;
        if target.exists() {
            return Err(Error::SnapshotExists {
                name: name.to_owned(),
            });
        }
        self.snapshot_to(name, target).await
    }

    /// Forks the sandbox into `n` new ones: a snapshot (the guest stops
    /// only while its dirtied pages are written) and `n` sandboxes started
    /// from it, each with every process, file and variable of this one at
    /// that moment, independent from then on. This sandbox runs on. The
    /// snapshot is not kept (the new sandboxes keep what they need of it).
    ///
    /// ```no_run
    /// # async fn demo(mut sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// sbx.run_code("x = 42").await?;
    /// for (i, child) in sbx.fork(4).await?.iter().enumerate() {
    ///     child.run_code(&format!("x += {i}")).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn fork(&mut self, n: usize) -> Result<Vec<Sandbox<Running>>> {
        let mut suffix = [0u8; 6];
        fill_random(&mut suffix)?;
        let name = format!(
            ".fork-{}-{}",
            self.id(),
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        let target = self.inner.rt.dir.join("snapshots").join(&name);
        self.snapshot_to(&name, target.clone()).await?;
        let rt = self.inner.rt.clone();
        let info = self.info();
        let template = Some(info.template.clone());
        let config = SandboxConfig {
            metadata: info.metadata,
            timeout: Duration::from_millis(info.timeout_ms),
            auto_pause: info.auto_pause,
            env: info.env,
            cwd: info.cwd,
            ..SandboxConfig::default()
        };
        let children = crate::runtime::start_many(&rt, target.clone(), n, template, config).await;
        if let Err(e) = crate::runtime::remove_snapshot_dir(&target).await {
            log::warn!("{e}");
        }
        children
    }

    /// [`snapshot`](Self::snapshot) into `target`, with no check of the name.
    pub(crate) async fn snapshot_to(
        &mut self,
        name: &str,
        target: PathBuf,
    ) -> Result<crate::SnapshotInfo> {
        let live = self.inner.live.clone();
        let (transition, mut machine, job) = live.begin_snapshot().await?;
        let task = tokio::task::spawn_blocking(move || {
            let written = job.run(&mut machine).and_then(|(manifest, _)| {
                if let (Some(disk), Some(sealed)) = (&job.disk, manifest.disk_layer) {
                    live::lock_disk(disk).commit(sealed)?;
                }
                Ok(manifest)
            });
            let resumed = machine.resume();
            (machine, written, resumed)
        });
        let (machine, written, resumed) = match task.await {
            Ok(done) => done,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let (info, record) = {
            let mut st = live.st();
            st.machine = Some(machine);
            st.info.state = SandboxState::Running;
            if let Err(e) = st.save_info(&self.inner.live.dir) {
                log::warn!("{e}");
            }
            match written {
                Ok(manifest) => {
                    st.based_on = Some(manifest);
                    st.dirty_log_complete = true;
                }
                Err(e) => {
                    // The dirty log may have been read: the next pause
                    // writes everything.
                    st.dirty_log_complete = false;
                    return Err(e);
                }
            }
            (st.info.clone(), st.record.clone())
        };
        drop(transition);
        resumed?;
        let info = crate::SnapshotInfo::new(name, &info);
        let dir = self.inner.live.dir.clone();
        tokio::task::spawn_blocking(move || {
            crate::runtime::publish_snapshot(&dir, &target, record, &info)
        })
        .await
        .map_err(|e| join_error("snapshot", e))?
    }
}

impl Sandbox<Paused> {
    /// A new sandbox, paused, made from the snapshot in `source` (memory
    /// files linked, disk overlay copied) with `config`, and how long that
    /// took.
    pub(crate) async fn prepare_from(
        rt: Arc<RuntimeInner>,
        source: PathBuf,
        template: Option<String>,
        config: SandboxConfig,
    ) -> Result<(Sandbox<Paused>, Duration)> {
        config.check()?;
        let started = Instant::now();
        let (id, dir, lock, guard) = new_sandbox_dir(&rt).await?;
        let paused = tokio::task::spawn_blocking(move || -> Result<Sandbox<Paused>> {
            let source_manifest = snapshot::read_manifest(&source)?;
            let record = SandboxRecord {
                id: id.to_string(),
                ..source_manifest.sandbox
            };
            snapshot::copy_to(&source, &dir, record)?;
            let now = now_ms();
            let paused = Sandbox::<Paused>::with_lock(rt, id, dir, lock)?;
            {
                let mut st = paused.inner.live.st();
                st.info.metadata = config.metadata;
                st.info.created_at_ms = now;
                st.info.started_at_ms = now;
                st.info.paused_at_ms = None;
                st.info.timeout_ms = config.timeout.as_millis() as u64;
                st.info.auto_pause = config.auto_pause;
                st.info.env = config.env;
                st.info.cwd = config.cwd;
                if let Some(template) = template {
                    st.info.template = template;
                }
                st.save_info(&paused.inner.live.dir)?;
            }
            Ok(paused)
        })
        .await
        .map_err(|e| join_error("create", e))??;
        std::mem::forget(guard); // `paused` owns the directory now
        Ok((paused, started.elapsed()))
    }

    /// A handle on the paused sandbox `id` of the runtime.
    pub(crate) fn open(rt: Arc<RuntimeInner>, id: &str) -> Result<Sandbox<Paused>> {
        let (id, dir, lock) = lock_existing(&rt, id)?;
        Self::with_lock(rt, id, dir, lock)
    }

    /// Deletes the files of sandbox `id`, which no handle holds, without
    /// reading them: for a sandbox that cannot be opened (its snapshot is
    /// damaged or foreign, its template gone or rebuilt, its creation
    /// crashed), which must still be killable.
    pub(crate) fn delete_unopened(rt: &RuntimeInner, id: &str) -> Result<()> {
        let (_, dir, _lock) = lock_existing(rt, id)?;
        std::fs::remove_dir_all(&dir).map_err(Error::io(format!("cannot delete {}", dir.display())))
    }

    /// A handle on the paused sandbox in `dir`, whose lock the caller took.
    fn with_lock(rt: Arc<RuntimeInner>, id: SandboxId, dir: PathBuf, lock: File) -> Result<Self> {
        if !snapshot::exists(&dir) {
            return Err(Error::NotPaused { id: id.to_string() });
        }
        let manifest = snapshot::read_manifest(&dir)?;
        if manifest.sandbox.id != id.as_str() {
            return Err(Error::Incompatible {
                id: id.to_string(),
                reason: format!("its snapshot belongs to sandbox {}", manifest.sandbox.id),
            });
        }
        if let Some(saved) = &manifest.sandbox.host {
            if let Some(reason) = HostProfile::current(rt.host).cannot_run(saved) {
                return Err(Error::Incompatible {
                    id: id.to_string(),
                    reason,
                });
            }
        }
        let template = rt.template(&manifest.sandbox.template)?;
        if template.manifest.rootfs_hash != manifest.sandbox.rootfs_hash {
            return Err(Error::Incompatible {
                id: id.to_string(),
                reason: format!(
                    "template {:?} was rebuilt since the sandbox was created (root filesystem {} then, {} now); its disk overlay only fits the old image",
                    template.manifest.name, manifest.sandbox.rootfs_hash, template.manifest.rootfs_hash
                ),
            });
        }
        let record = manifest.sandbox.clone();
        let mut info = info::read(&dir).unwrap_or_else(|| {
            SandboxInfo::of_snapshot(&manifest, disk_mib(&template.rootfs_path()))
        });
        info.state = SandboxState::Paused;
        info.paused_at_ms = Some(manifest.paused_at_ms);
        info.end_at_ms = None;
        let state = LiveState {
            record,
            info,
            machine: None,
            disk: None,
            based_on: None,
            dirty_log_complete: false,
            lock: Some(lock),
            delete_on_drop: false,
            taken: None,
            deadline: None,
            run_limit: None,
            timer: None,
            handles: 1,
        };
        Ok(Sandbox {
            inner: SandboxInner::new(
                rt,
                id,
                dir,
                template.rootfs_path(),
                AgentLink::new(None),
                state,
            ),
            _state: PhantomData,
        })
    }

    /// Deletes every file of the sandbox. Permanent.
    pub async fn kill(self) -> Result<()> {
        self.inner.live.kill().await
    }

    /// [`resume`](Self::resume) with a timeout other than the one the
    /// sandbox was created with, from now on.
    pub async fn resume_with_timeout(
        self,
        timeout: Duration,
    ) -> std::result::Result<Sandbox<Running>, ResumeError> {
        if let Err(error) = live::check_timeout(timeout) {
            return Err(ResumeError {
                sandbox: Some(self),
                error,
            });
        }
        self.resume_for(Some(timeout)).await
    }

    /// Resumes the sandbox where it was paused: every process, open file
    /// and in-memory variable as it was. Memory is mapped from the snapshot
    /// and loads lazily. Connections to the guest open before the pause
    /// were reset; new ones work as before. On failure the sandbox is
    /// handed back, still paused and resumable.
    ///
    /// Its timeout starts again: the one it was created with (see
    /// [`resume_with_timeout`](Self::resume_with_timeout)); a sandbox
    /// created with auto-pause pauses again when it runs out.
    pub async fn resume(self) -> std::result::Result<Sandbox<Running>, ResumeError> {
        self.resume_for(None).await
    }

    async fn resume_for(
        self,
        timeout: Option<Duration>,
    ) -> std::result::Result<Sandbox<Running>, ResumeError> {
        self.restore_parked(Duration::ZERO)
            .await?
            .run(timeout)
            .await
    }

    /// Restores the machine, its vCPUs parked: [`Restored::run`] starts
    /// them. `prepare` is how long making the sandbox's directory took
    /// (zero for a resume).
    pub(crate) async fn restore_parked(
        mut self,
        prepare: Duration,
    ) -> std::result::Result<Restored, ResumeError> {
        let started = Instant::now();
        let check = match self.restore().await {
            Ok(check) => check,
            Err(error) => {
                return Err(ResumeError {
                    sandbox: Some(self),
                    error,
                })
            }
        };
        let sandbox = Sandbox::<Running> {
            inner: self.inner,
            _state: PhantomData,
        };
        sandbox.inner.live.st().delete_on_drop = true;
        Ok(Restored {
            sandbox,
            check,
            timings: StartTimings {
                prepare,
                restore: started.elapsed(),
                agent: Duration::ZERO,
            },
        })
    }

    /// Builds the machine from the snapshot. The snapshot stays as it is
    /// while the guest runs (its disk writes go to a pending layer, see
    /// [`crate::disk`]), so a crash of this process leaves it resumable.
    ///
    /// Memory loads lazily: the base file and the long runs of pages of
    /// each layer are mapped, the short runs are filled on first access
    /// through a userfaultfd (or copied where the host has none; see
    /// [`memory::map_layers`] and [`crate::vmm::lazy`]). The memory files are checked against their
    /// digests by the task returned (those this process has not checked
    /// before), which runs while the guest starts and which the caller
    /// awaits before it hands the sandbox out.
    async fn restore(&mut self) -> Result<Option<tokio::task::JoinHandle<Result<()>>>> {
        let dir = self.inner.live.dir.clone();
        let rootfs = self.inner.live.rootfs.clone();
        let spare_vm = self.inner.rt.spare_vm.clone();
        let id = self.inner.live.id.to_string();
        let restored = tokio::task::spawn_blocking(move || -> Result<_> {
            let (manifest, state, files) = snapshot::read(&dir)?;
            if manifest.sandbox.id != id {
                return Err(Error::Incompatible {
                    id,
                    reason: format!("its snapshot belongs to sandbox {}", manifest.sandbox.id),
                });
            }
            let corrupt_base = |reason| snapshot::SnapshotError::Corrupt {
                path: dir.join(&manifest.memory[0].file),
                reason,
            };
            let load_failure = Arc::new(LoadFailure::default());
            let taken = spare_vm
                .take(manifest.memory_len)
                .map_err(MachineError::from)?;
            let (vm, parts) = match taken {
                // The usual case: the spare VM has memory of this size
                // registered already; the file goes over it.
                TakenVm::WithMemory(vm) => {
                    memory::map_file_over(vm.memory(), &files.base).map_err(corrupt_base)?;
                    let parts = restore_devices(
                        &dir,
                        &rootfs,
                        vm.memory(),
                        &files,
                        manifest.disk_layer,
                        &load_failure,
                    );
                    (Ok(vm), parts)
                }
                // KVM takes its time to register the memory (the more, the
                // longer): it does so while the layers are put over it and
                // the devices made.
                TakenVm::Empty(empty_vm) => {
                    let memory =
                        memory::map_file(&files.base, manifest.memory_len).map_err(corrupt_base)?;
                    std::thread::scope(|scope| {
                        let vm = std::thread::Builder::new()
                            .name("dormouse-restore".into())
                            .spawn_scoped(scope, || empty_vm.with_memory(memory.clone()));
                        let parts = restore_devices(
                            &dir,
                            &rootfs,
                            &memory,
                            &files,
                            manifest.disk_layer,
                            &load_failure,
                        );
                        let vm = match vm {
                            Ok(thread) => thread
                                .join()
                                .unwrap_or_else(|e| std::panic::resume_unwind(e))
                                .map_err(MachineError::from),
                            Err(source) => Err(MachineError::Io {
                                what: "cannot start a thread to restore the VM".into(),
                                source,
                            }),
                        };
                        (vm, parts)
                    })
                }
            };
            let RestoredDevices {
                devices,
                connector,
                disk,
            } = parts?;
            let machine = Machine::restore(
                RestoreConfig {
                    vm: vm?,
                    console_log: dir.join("console.log"),
                    devices,
                    load_failure: Some(load_failure),
                },
                &state,
            );
            Ok((machine?, connector, disk, manifest, files))
        })
        .await
        .map_err(|e| join_error("resume", e))??;
        let (machine, connector, disk, manifest, files) = restored;
        // The memory files this process has not checked yet (each is
        // written once and never changed: checked once per process).
        let rt = &self.inner.rt;
        let unchecked = |file: &File| match crate::runtime::FileIdentity::of(file) {
            Ok(identity) if rt.memory_checked(&identity) => None,
            identity => Some(identity.ok()),
        };
        let base = unchecked(&files.base).map(|identity| (files.base, identity));
        let layers: Vec<_> = files
            .layers
            .into_iter()
            .zip(manifest.memory[1..].iter().cloned())
            .filter_map(|(file, layer)| {
                unchecked(&file.file).map(|identity| (file, layer, identity))
            })
            .collect();
        let check = (base.is_some() || !layers.is_empty()).then(|| {
            let rt = self.inner.rt.clone();
            let dir = self.inner.live.dir.clone();
            let manifest = manifest.clone();
            tokio::task::spawn_blocking(move || -> Result<()> {
                if let Some((base, identity)) = base {
                    snapshot::check_base(&dir, &manifest, &base)?;
                    if let Some(identity) = identity {
                        rt.set_memory_checked(identity);
                    }
                }
                for (file, layer, identity) in layers {
                    let digest = memory::layer_digest(file.as_layer()).map_err(|source| {
                        snapshot::SnapshotError::Io {
                            what: "read the memory layer",
                            path: dir.join(&layer.file),
                            source,
                        }
                    })?;
                    layer.check_digest(&dir, digest)?;
                    if let Some(identity) = identity {
                        rt.set_memory_checked(identity);
                    }
                }
                Ok(())
            })
        });
        let mut st = self.inner.live.st();
        st.based_on = Some(manifest);
        st.dirty_log_complete = true;
        st.machine = Some(machine);
        st.disk = Some(disk);
        self.inner.live.link.set(Some(connector));
        Ok(check)
    }
}

/// A sandbox whose machine is restored and whose vCPUs are parked (see
/// [`Sandbox::restore_parked`]): many can be restored before any guest
/// runs and competes with the restores for the CPU.
pub(crate) struct Restored {
    sandbox: Sandbox<Running>,
    /// The check of the memory files (see [`Sandbox::restore`]).
    check: Option<tokio::task::JoinHandle<Result<()>>>,
    timings: StartTimings,
}

impl Restored {
    /// Starts the vCPUs and waits for the agent: the sandbox runs, its
    /// timeout (the one it was created with, or `timeout`) started. On
    /// failure the guest is stopped and the sandbox handed back paused at
    /// its snapshot, as it was.
    pub(crate) async fn run(
        self,
        timeout: Option<Duration>,
    ) -> std::result::Result<Sandbox<Running>, ResumeError> {
        let Restored {
            mut sandbox,
            check,
            mut timings,
        } = self;
        let started = Instant::now();
        // The base memory file is checked while the guest starts; the
        // sandbox is handed out only if its memory is what was paused.
        let agent = match sandbox.start_vcpus() {
            Ok(()) => sandbox.wait_for_agent(RESUME_TIMEOUT).await,
            Err(error) => Err(error),
        };
        let ready = match (agent, check) {
            (Err(error), check) => {
                if let Some(check) = check {
                    check.abort();
                }
                Err(error)
            }
            (Ok(()), None) => Ok(()),
            (Ok(()), Some(check)) => match check.await {
                Ok(result) => result,
                Err(e) => Err(join_error("check the memory file", e)),
            },
        };
        match ready {
            Ok(()) => {
                timings.agent = started.elapsed();
                sandbox.inner.timings = Some(timings);
                sandbox.inner.start_running(timeout);
                Ok(sandbox)
            }
            // Stop the guest and forget what it did since the restore: the
            // snapshot (disk included) is still the one it was resumed from.
            Err(error) => Err(ResumeError {
                sandbox: Some(sandbox.back_to_snapshot().await),
                error,
            }),
        }
    }

    /// Kills the sandbox (when it never ran as itself: nothing to keep).
    pub(crate) async fn discard(self) {
        if let Some(check) = self.check {
            check.abort();
        }
        let _ = self.sandbox.kill().await;
    }
}

impl ResumeError {
    /// Kills the sandbox handed back, if any (one that never ran as
    /// itself: nothing to keep), and gives the error.
    pub(crate) async fn discard(self) -> Error {
        if let Some(paused) = self.sandbox {
            let _ = paused.kill().await;
        }
        self.error
    }
}

/// The devices of a restored machine, and the host's handles on them.
struct RestoredDevices {
    devices: Vec<Box<dyn VirtioDevice>>,
    connector: VsockConnector,
    disk: Arc<Mutex<CowDisk>>,
}

/// The devices of a machine restored from the snapshot in `dir` (the guest
/// disk over `rootfs`, vsock with its connections reset), after putting the
/// snapshot's memory layers over `memory` (a page loaded later that
/// cannot be read is reported to `failure`).
fn restore_devices(
    dir: &Path,
    rootfs: &Path,
    memory: &memory::GuestMemory,
    files: &snapshot::MemoryFiles,
    disk_layer: Option<crate::disk::SealedLayer>,
    failure: &Arc<LoadFailure>,
) -> Result<RestoredDevices> {
    let layers: Vec<memory::Layer<'_>> =
        files.layers.iter().map(|layer| layer.as_layer()).collect();
    let loading = memory::Loading::Lazily {
        base: &files.base,
        failure,
    };
    let stats = memory::map_layers(memory, &layers, loading).map_err(|source| {
        snapshot::SnapshotError::Io {
            what: "map the memory layers of",
            path: dir.to_owned(),
            source,
        }
    })?;
    log::debug!("memory layers of {}: {stats:?}", dir.display());
    let disk = CowDisk::open(rootfs, &dir.join("disk"), disk_layer)?;
    let block = Block::new(disk, false).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    let disk = block.disk();
    let (vsock, connector) =
        Vsock::new(GUEST_CID).map_err(|e| Error::InvalidConfig(e.to_string()))?;
    // The guest's connections refer to host ends that are gone.
    vsock.send_transport_reset();
    Ok(RestoredDevices {
        devices: vec![Box::new(block), Box::new(vsock)],
        connector,
        disk,
    })
}

/// A new sandbox id and its directory, created and locked; the guard
/// deletes the directory unless forgotten.
async fn new_sandbox_dir(rt: &RuntimeInner) -> Result<(SandboxId, PathBuf, File, DirGuard)> {
    let id = SandboxId::random()?;
    let dir = rt.dir.join("sandboxes").join(id.as_str());
    tokio::fs::create_dir(&dir)
        .await
        .map_err(Error::io(format!("cannot create {}", dir.display())))?;
    let guard = DirGuard(Some(dir.clone()));
    let lock = lock_sandbox(&dir, &id)?;
    Ok((id, dir, lock, guard))
}

/// The size of the disk image `rootfs` in MiB (0 if it cannot be read).
fn disk_mib(rootfs: &Path) -> u64 {
    std::fs::metadata(rootfs).map_or(0, |m| m.len() >> 20)
}

/// Deletes a directory on drop unless forgotten.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
