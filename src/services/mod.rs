//! What code in a running sandbox is driven with: commands, files, the
//! Python code interpreter and port forwards. Each is a thin, typed layer
//! over one request to the guest agent ([`crate::agent`]) on a fresh vsock
//! connection, so any number of them run concurrently on one sandbox.

// WIRING: code, files
mod commands;
mod ports;

pub use commands::{CommandEvent, CommandHandle, CommandOutput, Commands};
pub use ports::{PortForward, Ports};

use crate::sandbox::{Running, Sandbox};

impl Sandbox<Running> {
    /// Commands in the guest: run, spawn in the background, list, feed,
    /// signal and re-attach.
    pub fn commands(&self) -> Commands<'_> {
        Commands::new(self)
    }


    /// Guest TCP ports exposed on host addresses.
    pub fn ports(&self) -> Ports<'_> {
        Ports::new(self)
    }

}
