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
