//! Guest memory: anonymous mappings (fresh boot) or private mappings of a
//! snapshot file (resume), with a bitmap of pages written by the VMM itself.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as seen by the VMM and its devices. Pages written by devices
/// are recorded in the bitmap (KVM's dirty log only sees vCPU writes).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;
