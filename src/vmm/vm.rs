//! The KVM VM: guest memory slots, in-kernel irqchip and PIT, irqfds and ioeventfds.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::layout::KVM_TSS_ADDRESS;
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

/// A VM with its in-kernel irqchip and PIT but no memory yet: the part of
/// making a VM that does not depend on the guest. It costs a few
/// milliseconds (the PIT starts a kernel thread), so a [`SpareVm`] keeps one
/// ready for the next restore.
pub struct EmptyVm {
    kvm: Kvm,
    fd: VmFd,
}

impl EmptyVm {
    /// Opens the KVM device at `kvm_path` and creates the VM.
    pub fn new(kvm_path: &Path) -> Result<EmptyVm, VmError> {
        Self::create(open_kvm(kvm_path)?)
    }

    fn create(kvm: Kvm) -> Result<EmptyVm, VmError> {
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
        Ok(EmptyVm { kvm, fd })
    }

    /// Gives the VM its memory, one slot per region, dirty pages logged
    /// from the start. Takes a few milliseconds whatever the size (KVM
    /// waits for an SRCU grace period): overlap it with other work.
    ///
    /// The regions' pages may still be replaced (`MAP_FIXED` over part of
    /// a region) until the vCPUs run: KVM looks up guest pages by host
    /// address when the guest first touches them.
    pub fn with_memory(self, mem: GuestMemory) -> Result<Vm, VmError> {
        let EmptyVm { kvm, fd } = self;
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
            // SAFETY: the region is a live mapping owned by `mem`. The Vm
            // made here keeps it alive as long as the VM fd (fields drop in
            // declaration order: `fd` before `mem`); the only other
            // references to the VM are vCPU fds, and the machine joins every
            // vCPU thread (dropping its fd) before it drops the Vm. On an
            // error here `fd` is dropped with this function, before `mem`.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(Vm { kvm, fd, mem })
    }

    /// Gives the VM `mem_size` bytes of anonymous, untouched memory (see
    /// [`memory::anonymous`](super::memory::anonymous)).
    pub fn with_anonymous_memory(self, mem_size: u64) -> Result<Vm, VmError> {
        let mem = super::memory::anonymous(mem_size).map_err(|reason| VmError::Memory {
            size_mib: mem_size >> 20,
            reason,
        })?;
        self.with_memory(mem)
    }
}

/// Keeps one VM made ahead of time, so that a restore waits neither for
/// KVM to create the VM and its PIT nor for it to register the guest
/// memory (which takes longer the more memory there is: KVM allocates and
/// clears its page bookkeeping). [`take`](Self::take) hands it out and
/// makes the next one on a thread of its own, with anonymous memory of the
/// size just taken registered (a runtime mostly starts sandboxes of one
/// size), over which the restore maps its memory file
/// ([`memory::map_file_over`](super::memory::map_file_over)).
///
/// The spare costs no guest RAM (its memory is untouched), only KVM's
/// bookkeeping for it: about 0.2 % of its size on a host without
/// two-dimensional paging (PVM), less with it.
pub struct SpareVm {
    kvm_path: PathBuf,
    slot: Mutex<SpareSlot>,
}

#[derive(Default)]
struct SpareSlot {
    vm: Option<Spare>,
    /// A thread is making the next spare.
    filling: bool,
}

enum Spare {
    Empty(EmptyVm),
    WithMemory(Vm),
}

/// What [`SpareVm::take`] hands out.
pub enum TakenVm {
    /// A VM with anonymous memory of the size asked for registered: map
    /// the memory file over it.
    WithMemory(Vm),
    /// A VM without memory: give it some ([`EmptyVm::with_memory`]).
    Empty(EmptyVm),
}

impl SpareVm {
    /// Starts making the first spare VM (without memory: its size is
    /// known at the first take).
    pub fn new(kvm_path: PathBuf) -> Arc<SpareVm> {
        let spare = Arc::new(SpareVm {
            kvm_path,
            slot: Mutex::default(),
        });
        spare.refill(&mut spare.slot(), None);
        spare
    }

    /// A VM for a machine with `mem_size` bytes of memory: the spare, or
    /// a new one made now if there is none (it is still being made, or
    /// making it failed: then this reports why). The next spare will have
    /// `mem_size` bytes registered.
    pub fn take(self: &Arc<Self>, mem_size: u64) -> Result<TakenVm, VmError> {
        let spare = {
            let mut slot = self.slot();
            let spare = slot.vm.take();
            self.refill(&mut slot, Some(mem_size));
            spare
        };
        match spare {
            Some(Spare::WithMemory(vm)) if vm.memory_size() == mem_size => {
                Ok(TakenVm::WithMemory(vm))
            }
            Some(Spare::WithMemory(vm)) => {
                // Memory of another size cannot be unregistered quickly.
                super::drop_in_background(Box::new(vm));
                EmptyVm::new(&self.kvm_path).map(TakenVm::Empty)
            }
            Some(Spare::Empty(vm)) => Ok(TakenVm::Empty(vm)),
            None => EmptyVm::new(&self.kvm_path).map(TakenVm::Empty),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, SpareSlot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a spare VM (with `mem_size` bytes of memory registered, if
    /// given) on a new thread, unless one is being made. The thread holds
    /// only a weak reference: a spare made for a runtime that is gone is
    /// dropped.
    fn refill(self: &Arc<Self>, slot: &mut SpareSlot, mem_size: Option<u64>) {
        if slot.filling {
            return;
        }
        let this = Arc::downgrade(self);
        let kvm_path = self.kvm_path.clone();
        let spawned = std::thread::Builder::new()
            .name("dormouse-spare-vm".into())
            .spawn(move || {
                let made = EmptyVm::new(&kvm_path).and_then(|vm| match mem_size {
                    None => Ok(Spare::Empty(vm)),
                    Some(size) => vm.with_anonymous_memory(size).map(Spare::WithMemory),
                });
                let Some(this) = this.upgrade() else {
                    return;
                };
                let mut slot = this.slot();
                slot.filling = false;
                match made {
                    Ok(vm) => slot.vm = Some(vm),
                    // The next `take` makes one itself and reports the error.
                    Err(e) => log::debug!("no spare VM: {e}"),
                }
            });
        match spawned {
            Ok(_) => slot.filling = true,
            Err(e) => log::debug!("no thread to make a spare VM on: {e}"),
        }
    }
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
        EmptyVm::new(kvm_path)?.with_anonymous_memory(mem_size)
    }

    /// Creates a VM over already-populated guest memory.
    pub fn with_memory(kvm: Kvm, mem: GuestMemory) -> Result<Vm, VmError> {
        EmptyVm::create(kvm)?.with_memory(mem)
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

    /// Bytes of guest memory.
    pub fn memory_size(&self) -> u64 {
        self.mem.iter().map(|r| r.len()).sum()
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_spare_vm_is_made_ahead_and_errors_reach_the_taker() {
        // Without KVM every take says why, spare or not.
        let none = SpareVm::new(PathBuf::from("/nonexistent/kvm"));
        for _ in 0..2 {
            assert!(matches!(
                none.take(1 << 20),
                Err(VmError::KvmUnavailable(_))
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            crate::vmm::tests::skip_unless_ci("the rest of this test", "no /dev/kvm");
            return;
        }
        let spare = SpareVm::new(PathBuf::from("/dev/kvm"));
        let wait_for_spare = |spare: &Arc<SpareVm>| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while spare.slot().vm.is_none() {
                assert!(std::time::Instant::now() < deadline, "no spare VM made");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        };
        wait_for_spare(&spare);
        // The first spare has no memory (no size known yet); the second
        // take finds none ready and makes one at once.
        let size = 2 << 20;
        let Ok(TakenVm::Empty(first)) = spare.take(size) else {
            panic!("the first spare has memory");
        };
        let Ok(TakenVm::Empty(second)) = spare.take(size) else {
            panic!("a VM made at once has memory");
        };
        let vm = first.with_anonymous_memory(size).unwrap();
        assert_eq!(vm.memory_size(), size);
        drop(second);
        // The next spare has memory of the size last taken, registered:
        // a memory file goes over it, and KVM logs dirty pages of it.
        wait_for_spare(&spare);
        let Ok(TakenVm::WithMemory(vm)) = spare.take(size) else {
            panic!("the spare has no memory");
        };
        assert_eq!(vm.memory_size(), size);
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"from the file", 0x1000).unwrap();
        crate::vmm::memory::map_file_over(vm.memory(), &file).unwrap();
        let mut read = [0u8; 13];
        vm.memory()
            .read_slice(&mut read, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&read, b"from the file");
        assert!(vm.take_dirty_pages().unwrap().iter().all(|&w| w == 0));
        let short = tempfile::tempfile().unwrap();
        short.set_len(size / 2).unwrap();
        assert!(crate::vmm::memory::map_file_over(vm.memory(), &short).is_err());
        // A spare of another size is not handed out.
        wait_for_spare(&spare);
        assert!(matches!(spare.take(size * 2), Ok(TakenVm::Empty(_))));
        // Weak: the spare being made dies with its owner.
        drop(spare);
    }
}
