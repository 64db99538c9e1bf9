//! What code in a running sandbox is driven with: commands, files, the
//! Python code interpreter and port forwards. Each is a thin, typed layer
//! over one request to the guest agent ([`crate::agent`]) on a fresh vsock
//! connection, so any number of them run concurrently on one sandbox.

mod code;
mod commands;
mod files;
pub(crate) use files::join_all;
mod ports;

pub use code::{CodeContexts, Execution};
pub use commands::{CommandEvent, CommandHandle, CommandOutput, Commands};
pub use files::{DirWatcher, Files, MAX_READ};
pub use ports::{PortForward, Ports};

use crate::sandbox::{Running, Sandbox};

impl Sandbox<Running> {
    /// Commands in the guest: run, spawn in the background, list, feed,
    /// signal and re-attach.
    pub fn commands(&self) -> Commands<'_> {
        Commands::new(self)
    }

    /// The guest's file system: read, write, list, stat, watch.
    pub fn files(&self) -> Files<'_> {
        Files::new(self)
    }

    /// The Python interpreter contexts used by [`Sandbox::run_code`].
    pub fn code_contexts(&self) -> CodeContexts<'_> {
        CodeContexts::new(self)
    }

    /// Guest TCP ports exposed on host addresses.
    pub fn ports(&self) -> Ports<'_> {
        Ports::new(self)
    }
}
