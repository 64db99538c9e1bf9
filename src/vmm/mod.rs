//! The in-process VMM: a KVM microVM with serial console and virtio-mmio
//! devices, booted directly from an ELF kernel. It knows nothing about
//! sandboxes; callers hand it virtio devices and a kernel command line.

pub mod boot;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod lazy;
pub mod memory;
pub mod mptable;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod xsave;

pub mod machine;
pub use machine::{Machine, MachineConfig, MachineError, MachineState, RestoreConfig};

use std::sync::{mpsc, OnceLock};

/// Drops `item` (a machine, a VM) on a thread that does only that, one
/// after another: KVM takes its time to tear a VM down (~15 ms on the PVM
/// host, most of it waiting for grace periods), which nobody need wait
/// for. Dropped here if that thread cannot start.
pub(crate) fn drop_in_background(item: Box<dyn Send>) {
    static REAPER: OnceLock<Option<mpsc::Sender<Box<dyn Send>>>> = OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (send, receive) = mpsc::channel::<Box<dyn Send>>();
        let spawned = std::thread::Builder::new()
            .name("dormouse-reaper".into())
            .spawn(move || receive.into_iter().for_each(drop));
        match spawned {
            Ok(_) => Some(send),
            Err(e) => {
                log::warn!("no thread to release machines on: {e}");
                None
            }
        }
    });
    // Without the thread (or should it have ended), dropped here.
    if let Some(reaper) = reaper {
        drop(reaper.send(item));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// For a test that cannot run here because of `missing`: fails on CI
    /// (where nothing may be skipped), else says loudly that it skips.
    pub(crate) fn skip_unless_ci(test: &str, missing: &str) {
        assert!(std::env::var_os("CI").is_none(), "{test}: {missing} on CI");
        eprintln!("!!! SKIPPING {test}: {missing} here");
    }
}
