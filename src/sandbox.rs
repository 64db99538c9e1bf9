//! Sandboxes: a microVM booted from a template, with its own copy-on-write
//! disk, and the guest agent it talks to over vsock.
//!
//! `Sandbox<S>` is type-state: `Sandbox<Running>` has the operations that
//! need a running guest. (`Paused` arrives with pause/resume.)

use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::agent::ExecRequest as Command;
use crate::agent::{self, AgentError, ExecOutput};
use crate::disk::CowDisk;
use crate::error::{ConsoleTail, Error, Result};
use crate::proto::AGENT_VSOCK_PORT;
use crate::runtime::RuntimeInner;
use crate::template::Template;
use crate::vmm::devices::virtio::block::Block;
use crate::vmm::devices::virtio::vsock::{Vsock, VsockConnector};
use crate::vmm::devices::virtio::VirtioDevice;
use crate::vmm::vcpu::GuestStop;
use crate::vmm::{Machine, MachineConfig};

/// The guest CID of every sandbox (each has its own vsock device).
const GUEST_CID: u64 = 3;
/// How often a booting guest is probed for its agent.
const READY_POLL: Duration = Duration::from_millis(250);
/// How long one connection attempt to the agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running request checks that the guest is still alive.
const LIVENESS_POLL: Duration = Duration::from_millis(200);

/// Type-state marker: the sandbox's guest is running.
#[derive(Debug)]
pub enum Running {}

/// A sandbox's id: 20 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SandboxId(String);

impl SandboxId {
    fn random() -> Result<SandboxId> {
        let mut bytes = [0u8; 10];
        getrandom(&mut bytes)?;
        Ok(SandboxId(
            bytes.iter().map(|b| format!("{b:02x}")).collect(),
        ))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn getrandom(buf: &mut [u8]) -> Result<()> {
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
    /// under a second on VT-x).
    pub boot_timeout: Duration,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            memory_mib: None,
            vcpus: None,
            boot_timeout: Duration::from_secs(300),
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
    id: SandboxId,
    dir: PathBuf,
    template: String,
    machine: Option<Machine>,
    vsock: VsockConnector,
}

impl Drop for SandboxInner {
    fn drop(&mut self) {
        if let Some(mut machine) = self.machine.take() {
            machine.stop();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

impl<S> std::fmt::Debug for Sandbox<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.inner.id)
            .field("template", &self.inner.template)
            .finish()
    }
}

impl<S> Sandbox<S> {
    /// The sandbox's id.
    pub fn id(&self) -> &SandboxId {
        &self.inner.id
    }

    /// The template it was created from.
    pub fn template(&self) -> &str {
        &self.inner.template
    }

    /// The directory holding the sandbox's files (console log, disk overlay).
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }
}

impl Sandbox<Running> {
    pub(crate) async fn boot(
        rt: Arc<RuntimeInner>,
        template: Template,
        config: SandboxConfig,
    ) -> Result<Sandbox<Running>> {
        let mem_mib = config.memory_mib.unwrap_or(template.manifest.mem_mib);
        let vcpus = config.vcpus.unwrap_or(template.manifest.vcpus);
        let id = SandboxId::random()?;
        let dir = rt.dir.join("sandboxes").join(id.as_str());
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        // From here on, dropping `guard` deletes the directory again.
        let guard = DirGuard(Some(dir.clone()));

        let kernel = template.kernel_path();
        let rootfs = template.rootfs_path();
        let overlay = dir.join("disk");
        let console_log = dir.join("console.log");
        let kvm_path = rt.kvm_path.clone();
        let booted = tokio::task::spawn_blocking(move || -> Result<(Machine, VsockConnector)> {
            let disk = CowDisk::create(&rootfs, &overlay)?;
            let block = Block::new(disk, false).map_err(|e| Error::InvalidConfig(e.to_string()))?;
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
            Ok((machine, connector))
        })
        .await
        .map_err(|e| Error::Io {
            what: "the boot task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        let (machine, vsock) = booted;
        let mut sandbox = Sandbox {
            inner: SandboxInner {
                id,
                dir,
                template: template.manifest.name.clone(),
                machine: Some(machine),
                vsock,
            },
            _state: PhantomData,
        };
        std::mem::forget(guard); // the sandbox now owns (and cleans) the directory
        sandbox.wait_for_agent(config.boot_timeout).await?;
        Ok(sandbox)
    }

    fn machine(&self) -> &Machine {
        // Invariant: a Sandbox<Running> always has its machine.
        self.inner
            .machine
            .as_ref()
            .expect("a running sandbox has a machine")
    }

    fn console_tail(&self) -> ConsoleTail {
        ConsoleTail(self.machine().console().tail())
    }

    fn stopped_error(&self, reason: GuestStop) -> Error {
        Error::GuestStopped {
            reason,
            console: self.console_tail(),
        }
    }

    async fn wait_for_agent(&mut self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(reason) = self.machine().stop_reason() {
                return Err(self.stopped_error(reason));
            }
            if let Ok(stream) = self.connect_agent().await {
                if let Ok(Ok(_info)) =
                    tokio::time::timeout(CONNECT_TIMEOUT, agent::hello(stream)).await
                {
                    return Ok(());
                }
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

    /// A new connection to the guest agent.
    async fn connect_agent(&self) -> Result<tokio::net::UnixStream> {
        let connector = self.inner.vsock.clone();
        let stream = tokio::task::spawn_blocking(move || {
            connector.connect(AGENT_VSOCK_PORT, CONNECT_TIMEOUT)
        })
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

    /// Runs `fut` (a request to the agent) unless the guest stops first.
    async fn while_alive<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, AgentError>>,
    ) -> Result<T> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                res = &mut fut => return res.map_err(Error::Agent),
                _ = tokio::time::sleep(LIVENESS_POLL) => {
                    if let Some(reason) = self.machine().stop_reason() {
                        return Err(self.stopped_error(reason));
                    }
                }
            }
        }
    }

    /// Running commands in the guest.
    pub fn commands(&self) -> Commands<'_> {
        Commands { sandbox: self }
    }

    /// Stops the guest and deletes every file of the sandbox. Permanent.
    pub async fn kill(mut self) -> Result<()> {
        let machine = self.inner.machine.take();
        let dir = self.inner.dir.clone();
        tokio::task::spawn_blocking(move || {
            drop(machine);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                    what: format!("cannot delete {}", dir.display()),
                    source: e,
                }),
                _ => Ok(()),
            }
        })
        .await
        .map_err(|e| Error::Io {
            what: "the kill task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })?
    }
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

/// The result of a finished command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// The exit code; `128 + signal` when a signal killed the command.
    pub exit_code: i32,
    /// The signal that killed the command, if one did.
    pub signal: Option<i32>,
}

impl From<ExecOutput> for CommandOutput {
    fn from(out: ExecOutput) -> Self {
        let signal = out.signal;
        Self {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            exit_code: out.exit_code.unwrap_or_else(|| 128 + signal.unwrap_or(0)),
            signal,
        }
    }
}

/// Commands in a running sandbox: `sbx.commands()`.
pub struct Commands<'a> {
    sandbox: &'a Sandbox<Running>,
}

impl Commands<'_> {
    /// Runs a shell command line (`/bin/sh -c`) and waits for it.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// let out = sbx.commands().run("echo hello; exit 3").await?;
    /// assert_eq!((out.stdout.as_str(), out.exit_code), ("hello\n", 3));
    /// # Ok(()) }
    /// ```
    pub async fn run(&self, cmdline: &str) -> Result<CommandOutput> {
        self.exec(Command::shell(cmdline)).await
    }

    /// Runs a [`Command`] (a program with arguments, environment, working
    /// directory and standard input) and waits for it.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// use dormouse::Command;
    /// let cmd = Command::new(["tr", "a-z", "A-Z"]).stdin("hi\n").cwd("/tmp").env("LANG", "C");
    /// assert_eq!(sbx.commands().exec(cmd).await?.stdout, "HI\n");
    /// # Ok(()) }
    /// ```
    pub async fn exec(&self, request: Command) -> Result<CommandOutput> {
        let stream = self.sandbox.connect_agent().await?;
        let out = self
            .sandbox
            .while_alive(agent::exec(stream, request))
            .await?;
        Ok(out.into())
    }
}
