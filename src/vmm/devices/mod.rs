//! Emulated devices and the bus that routes vCPU exits to them.

// pub mod bus; (enabled once the MMIO transport lands)
pub mod serial;
pub mod virtio;
