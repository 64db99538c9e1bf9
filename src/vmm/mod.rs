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

#[cfg(test)]
pub(crate) mod tests {
    /// For a test that cannot run here because of `missing`: fails on CI
    /// (where nothing may be skipped), else says loudly that it skips.
    pub(crate) fn skip_unless_ci(test: &str, missing: &str) {
        assert!(std::env::var_os("CI").is_none(), "{test}: {missing} on CI");
        eprintln!("!!! SKIPPING {test}: {missing} here");
    }
}
