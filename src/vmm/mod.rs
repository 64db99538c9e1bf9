//! The in-process VMM. It knows nothing about sandboxes.

pub mod devices;
pub mod memory;
