//! The KVM VM: guest memory slots, in-kernel irqchip and PIT, irqfds and ioeventfds.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::layout::{ram_ranges, KVM_TSS_ADDRESS};
use super::memory::GuestMemory;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` is missing or not accessible.
    #[error("cannot open the KVM device ({0}): KVM is required; check that the kvm module is loaded and that this user may open /dev/kvm")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("{op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created (file descriptor limit?).
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Guest memory could not be allocated.
    #[error("cannot allocate {size_mib} MiB of guest memory: {reason}")]
    Memory {
        /// Requested size.
        size_mib: u64,
        /// Why.
        reason: String,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Opens the KVM device.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VmError::KvmUnavailable(kvm_ioctls::Error::new(libc::EINVAL)))?;
    Kvm::new_with_path(c_path).map_err(VmError::KvmUnavailable)
}

/// A KVM VM with its memory mapped.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: GuestMemory,
}

impl Vm {
    /// Opens the KVM device at `kvm_path` (normally `/dev/kvm`), creates a VM
    /// with `mem_size` bytes of anonymous guest memory, an in-kernel
    /// IOAPIC/PIC/LAPIC and a PIT.
    pub fn new(kvm_path: &Path, mem_size: u64) -> Result<Vm, VmError> {
        let kvm = open_kvm(kvm_path)?;
        let mem = GuestMemory::from_ranges(
            &ram_ranges(mem_size)
                .into_iter()
                .map(|(start, len)| (GuestAddress(start), len as usize))
                .collect::<Vec<_>>(),
        )
        .map_err(|e| VmError::Memory {
            size_mib: mem_size >> 20,
            reason: e.to_string(),
        })?;
        Self::with_memory(kvm, mem)
    }

    /// Creates a VM over already-populated guest memory.
    pub fn with_memory(kvm: Kvm, mem: GuestMemory) -> Result<Vm, VmError> {
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                // Dirty pages are logged from the start: a pause writes only
                // the pages written since the last one.
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`. This Vm
            // keeps it alive as long as the VM fd (fields drop in declaration
            // order: `fd` before `mem`); the only other references to the VM
            // are vCPU fds, and the machine joins every vCPU thread (dropping
            // its fd) before it drops the Vm.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { kvm, fd, mem })
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The pages written since the last call (or since the VM was created),
    /// by the guest (KVM's dirty log) or by the VMM and its devices (the
    /// memory's own bitmap): one bit per 4 KiB page, regions one after
    /// another in address order, and resets both. Call with the vCPUs and
    /// devices stopped.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, VmError> {
        let mut bitmap = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let len = region.len() as usize;
            let kvm = self
                .fd
                .get_dirty_log(slot as u32, len)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let mapping: &vm_memory::mmap::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
            let vmm = mapping.bitmap().get_and_reset();
            bitmap.extend(
                kvm.iter()
                    .zip(vmm.iter().chain(std::iter::repeat(&0)))
                    .map(|(k, v)| k | v),
            );
        }
        Ok(bitmap)
    }

    /// Creates an eventfd that injects `gsi` when written.
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, VmError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        Ok(evt)
    }

    /// Makes KVM signal `evt` on a 4-byte MMIO write of `datamatch` to `addr`.
    pub fn ioeventfd(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<(), VmError> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(kvm_err("KVM_IOEVENTFD"))
    }
}
