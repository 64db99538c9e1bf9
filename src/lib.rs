//! dormouse: secure, pausable code sandboxes as a library.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod agent;
pub mod disk;
pub mod proto;
pub mod vmm;
