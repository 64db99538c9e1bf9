//! The crate's error type: every variant says what went wrong and what to do.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::vmm::vcpu::GuestStop;

/// The last lines of a guest's serial console, attached to errors about a
/// guest that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleTail(pub Vec<String>);

impl fmt::Display for ConsoleTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return write!(f, "(the guest printed nothing on its console)");
        }
        writeln!(f, "last lines of the guest console:")?;
        for line in &self.0 {
            writeln!(f, "  | {line}")?;
        }
        Ok(())
    }
}

/// Errors of the dormouse API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No sandbox with this id exists (never did, or it was killed).
    #[error("sandbox {id} not found: it does not exist or was killed")]
    NotFound {
        /// The id asked for.
        id: String,
    },
    /// No template of that name in any template directory.
    #[error("template {name:?} not found (looked in {searched:?}); build it with guest/build.sh or set DORMOUSE_TEMPLATE_PATH")]
    TemplateNotFound {
        /// The name asked for.
        name: String,
        /// The directories searched.
        searched: Vec<PathBuf>,
    },
    /// A step of [`Runtime::build_template`](crate::Runtime::build_template) failed.
    #[error("building template {template:?} failed at {step}: {reason}")]
    TemplateBuild {
        /// The template being built.
        template: String,
        /// The step: the command or file.
        step: String,
        /// What went wrong (a command's exit code and output).
        reason: String,
    },
    /// No snapshot of that name (never made, or deleted).
    #[error("snapshot {name:?} not found: see Runtime::list_snapshots for the ones there are")]
    SnapshotNotFound {
        /// The name asked for.
        name: String,
    },
    /// A snapshot of that name exists already.
    #[error("a snapshot named {name:?} exists already: pick another name or delete it first (Runtime::delete_snapshot)")]
    SnapshotExists {
        /// The name.
        name: String,
    },
    /// A template's manifest is unreadable or invalid.
    #[error("invalid template manifest {path}: {reason}; rebuild the template")]
    InvalidTemplate {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The template's kernel file is missing.
    #[error("guest kernel {path} is missing; rebuild the template with guest/build.sh")]
    KernelMissing {
        /// The expected kernel path.
        path: PathBuf,
    },
    /// The template's kernel is not a bootable vmlinux.
    #[error(
        "guest kernel {path} is not usable: {reason}; rebuild the template with guest/build.sh"
    )]
    InvalidKernel {
        /// The kernel.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The template's root filesystem image is missing.
    #[error("root filesystem image {path} is missing; rebuild the template with guest/build.sh")]
    RootfsMissing {
        /// The expected image path.
        path: PathBuf,
    },
    /// The template's root filesystem image is corrupt.
    #[error("root filesystem image {path} is corrupt: {reason}; rebuild the template with guest/build.sh")]
    CorruptRootfs {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `/dev/kvm` cannot be used.
    #[error("KVM is not available: {reason}; dormouse needs /dev/kvm (load the kvm module, or run where hardware or PVM virtualization is exposed)")]
    KvmUnavailable {
        /// Why.
        reason: String,
    },
    /// The sandbox configuration is invalid.
    #[error("invalid sandbox configuration: {0}")]
    InvalidConfig(String),
    /// The VMM could not start the machine.
    #[error("cannot start the microVM: {0}")]
    Vmm(#[source] crate::vmm::MachineError),
    /// The guest did not reach its agent in time.
    #[error("the guest did not become ready within {after:?} (raise SandboxConfig::boot_timeout on slow hosts)\n{console}")]
    BootTimeout {
        /// The timeout that expired.
        after: Duration,
        /// The end of the console.
        console: ConsoleTail,
    },
    /// The guest stopped running (kernel panic, shutdown, KVM error).
    #[error("the guest stopped: {reason}\n{console}")]
    GuestStopped {
        /// Why it stopped.
        reason: GuestStop,
        /// The end of the console.
        console: ConsoleTail,
    },
    /// No connection to the guest agent could be opened.
    #[error("cannot connect to the guest agent: {0}")]
    Vsock(#[source] crate::vmm::devices::virtio::vsock::VsockError),
    /// Talking to the guest agent failed.
    #[error("guest agent: {0}")]
    Agent(#[from] crate::agent::AgentError),
    /// The sandbox's disk could not be set up.
    #[error("sandbox disk: {0}")]
    Disk(#[from] crate::disk::DiskError),
    /// The sandbox's snapshot files are damaged, foreign, or unreadable.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// The sandbox exists but is not paused (it runs, in this process or
    /// another one, or that process died while it ran).
    #[error("sandbox {id} is not paused: it is running (use its Sandbox handle), or the process running it died (then kill it)")]
    NotPaused {
        /// The id.
        id: String,
    },
    /// The sandbox is paused already (the id-based [`Runtime::pause`](crate::Runtime::pause)).
    #[error("sandbox {id} is already paused; resume it with Runtime::connect")]
    AlreadyPaused {
        /// The id.
        id: String,
    },
    /// This handle's sandbox was paused under it: its timeout ran out with
    /// auto-pause on, or it was paused by id. It is intact; resume it by id.
    #[error("sandbox {id} was paused (its timeout ran out with auto-pause, or it was paused by id); this handle is spent: resume it with Runtime::connect({id:?})")]
    SandboxPaused {
        /// The id.
        id: String,
    },
    /// Another handle (in this process or another one) holds the sandbox.
    #[error("sandbox {id} is in use by another handle or process; drop that handle first")]
    Busy {
        /// The id.
        id: String,
    },
    /// The snapshot cannot resume with what this runtime has.
    #[error("sandbox {id} cannot be resumed here: {reason}")]
    Incompatible {
        /// The id.
        id: String,
        /// Why.
        reason: String,
    },
    /// A command ran past its timeout and was killed.
    #[error("the command did not finish within {timeout:?} and was killed (raise Command::timeout, or run it with spawn)")]
    CommandTimedOut {
        /// The timeout that passed.
        timeout: Duration,
        /// What it wrote until then.
        output: Box<crate::services::CommandOutput>,
    },
    /// No running command with this pid was started through the agent.
    #[error("no running command with pid {pid} in the sandbox: it has ended (or was not started through dormouse)")]
    ProcessNotFound {
        /// The pid asked for.
        pid: i32,
    },
    /// No interpreter context with this id.
    #[error("no code context {id:?} in the sandbox: it was removed or never created (see code_contexts().list())")]
    ContextNotFound {
        /// The id asked for.
        id: String,
    },
    /// A guest path does not exist.
    #[error("{path}: no such file or directory in the sandbox")]
    PathNotFound {
        /// The guest path.
        path: String,
    },
    /// A guest path is a directory where a file was expected.
    #[error("{path} is a directory in the sandbox; give a file path (or list the directory)")]
    IsADirectory {
        /// The guest path.
        path: String,
    },
    /// A guest path (or one of its parents) is not a directory where one
    /// was expected.
    #[error("{path}: a component of the path is not a directory in the sandbox")]
    NotADirectory {
        /// The guest path.
        path: String,
    },
    /// A guest path exists already.
    #[error("{path} already exists in the sandbox")]
    AlreadyExists {
        /// The guest path.
        path: String,
    },
    /// A file operation on the host failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

impl From<crate::vmm::MachineError> for Error {
    fn from(e: crate::vmm::MachineError) -> Error {
        use crate::vmm::vm::VmError;
        match e {
            crate::vmm::MachineError::Vm(VmError::KvmUnavailable(err)) => Error::KvmUnavailable {
                reason: err.to_string(),
            },
            other => Error::Vmm(other),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
