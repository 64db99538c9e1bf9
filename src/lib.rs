//! dormouse: secure, pausable code sandboxes as a library.
//!
//! A [`Runtime`] owns a state directory; [`Runtime::create`] starts a KVM
//! microVM from a template (a guest kernel and a root filesystem with the
//! dormouse agent as PID 1) in this process, and returns a
//! [`Sandbox<Running>`](Sandbox) whose [`commands`](Sandbox::commands) run in
//! the guest. A template is booted once, at its first `create`, and
//! snapshotted; every sandbox starts from that snapshot, sharing its memory
//! pages until it writes them, and writes to its own copy-on-write overlay
//! of the template's disk image. Sandboxes pause to files and resume (also
//! in another process), time out (killed, or paused with auto-pause), are
//! listed and queried by id ([`Runtime::list`]), and snapshot or fork into
//! many ([`Sandbox::fork`]).
//!
//! ```no_run
//! use dormouse::{Runtime, SandboxConfig};
//!
//! # async fn demo() -> dormouse::Result<()> {
//! let rt = Runtime::open("/tmp/dormouse-state").await?;
//! let sbx = rt.create("python", SandboxConfig::default()).await?;
//! let out = sbx.commands().run("python3 -c 'print(6*7)'").await?;
//! assert_eq!(out.stdout, "42\n");
//! sbx.kill().await?;
//! # Ok(()) }
//! ```
//!
//! The VMM ([`vmm`]) is independent of the sandbox concept; the guest agent
//! protocol ([`proto`], [`agent`]) is independent of KVM.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod agent;
mod build;
pub mod disk;
mod error;
pub mod fault;
mod fsutil;
mod info;
pub mod proto;
mod runtime;
mod sandbox;
mod services;
pub mod snapshot;
pub mod template;
pub mod vmm;

pub use agent::code::{CodeOutput, CodeRun};
pub use agent::ExecRequest as Command;
pub use build::TemplateBuilder;
pub use error::{ConsoleTail, Error, Result};
pub use info::{ListQuery, SandboxInfo, SandboxPage, SandboxState, SnapshotInfo};
pub use proto::{
    CodeError, ContextInfo, EntryInfo, EntryKind, ExitStatus, FileEvent, FileEventKind, ProcessInfo,
};
pub use runtime::{default_cache_dir, Runtime, RuntimeBuilder, DEFAULT_MAX_RUNNING};
pub use sandbox::{
    PauseError, Paused, ResumeError, Running, Sandbox, SandboxConfig, SandboxId, StartTimings,
    DEFAULT_TIMEOUT,
};
pub use services::{
    CodeContexts, CommandEvent, CommandHandle, CommandOutput, Commands, DirWatcher, Execution,
    Files, PortForward, Ports, MAX_READ,
};
pub use vmm::cpu::HostKind;
