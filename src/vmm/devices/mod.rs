//! Emulated devices and the bus that routes vCPU exits to them.

pub mod bus;
pub mod serial;
pub mod virtio;
