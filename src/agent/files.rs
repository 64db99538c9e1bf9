//! File operations in the guest (being written).
