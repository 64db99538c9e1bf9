//! A running microVM: VM, vCPU threads, devices.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::cpu::{self, HostKind};
use super::devices::bus::{DeviceManager, MmioSlot};
use super::devices::serial::{new_serial, restore_serial, Console, SerialSnapshot};
use super::devices::virtio::mmio::{
    MmioSnapshot, MmioTransport, MMIO_DEVICE_SIZE, MMIO_NOTIFY_OFFSET,
};
use super::devices::virtio::{IrqTrigger, VirtioDevice};
use super::layout::{COM1_IRQ, IRQ_BASE, IRQ_MAX, VIRTIO_MMIO_BASE};
use super::lazy::LoadFailure;
use super::state::{self, StateError, VcpuState, VmState};
use super::vcpu::{GuestStop, VcpuShared, VcpuThread};
use super::vm::{Vm, VmError};
use super::{boot, memory, mptable};

/// What to boot.
pub struct MachineConfig {
    /// ELF `vmlinux` to boot.
    pub kernel: PathBuf,
    /// Kernel parameters beyond the ones the VMM adds (console, devices, host quirks).
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Number of vCPUs (1..=254).
    pub vcpus: u8,
    /// The KVM device, normally `/dev/kvm`.
    pub kvm_path: PathBuf,
    /// Where the serial console is written.
    pub console_log: PathBuf,
    /// Virtio devices, in order: the first block device becomes `/dev/vda`.
    pub devices: Vec<Box<dyn VirtioDevice>>,
}

/// Errors starting a machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// KVM or VM setup failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Loading the kernel or writing boot data failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// The CPU model could not be built.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// The configuration is invalid.
    #[error("invalid machine configuration: {0}")]
    Config(String),
    /// A vCPU could not be configured.
    #[error("cannot configure vCPU {index}: {op}: {source}")]
    Vcpu {
        /// The vCPU.
        index: u8,
        /// The ioctl.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A device could not be set up.
    #[error("cannot set up a device: {0}")]
    Device(String),
    /// Saving or restoring KVM state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The guest stopped by itself (so it cannot be paused or resumed).
    #[error("the guest is not running: {0}")]
    Stopped(GuestStop),
    /// A saved machine state does not fit this host or configuration.
    #[error("cannot restore the machine: {0}")]
    Incompatible(String),
    /// A file or thread could not be created.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// What to restore a saved machine with: the same kind of devices, in the
/// same order, as the machine that was saved had, and its memory.
pub struct RestoreConfig {
    /// The VM, its memory holding the saved contents (e.g. a private
    /// mapping of a snapshot file; see
    /// [`EmptyVm::with_memory`](super::vm::EmptyVm::with_memory)).
    pub vm: Vm,
    /// Where the serial console is appended.
    pub console_log: PathBuf,
    /// Virtio devices, as at boot (same types, same order).
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// Where the loading of memory on first access reports a page it
    /// cannot read (see [`memory::map_layers`]): the guest stops then.
    pub load_failure: Option<Arc<LoadFailure>>,
}

/// Everything of a paused machine except guest memory and disk contents:
/// a plain, serialisable struct.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MachineState {
    /// The host kind it ran on; it resumes only on the same kind.
    pub host: HostKind,
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// The VM-wide KVM state.
    pub vm: VmState,
    /// One entry per vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// One entry per virtio device, in order.
    pub devices: Vec<MmioSnapshot>,
}

/// A running microVM. Dropping it stops the vCPUs, joins every thread and
/// releases guest memory and all file descriptors.
pub struct Machine {
    vcpus: Vec<VcpuThread>,
    /// vCPUs taken back from their threads by [`Machine::pause`].
    parked: Vec<VcpuFd>,
    shared: Arc<VcpuShared>,
    bus: Arc<DeviceManager>,
    console: Console,
    host: HostKind,
    // Dropped last: guest memory must outlive the vCPU threads and devices.
    vm: Vm,
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lint(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let value = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let value = (value & !0x700) | (mode << 8);
        for (dst, src) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
            *dst = src as _;
        }
    }
}

impl Machine {
    /// Creates the VM, loads the kernel and starts the vCPUs.
    pub fn boot(config: MachineConfig) -> Result<Machine, MachineError> {
        if config.vcpus == 0 || config.vcpus > mptable::MAX_CPUS {
            return Err(MachineError::Config(format!(
                "{} vCPUs requested; use 1 to {}",
                config.vcpus,
                mptable::MAX_CPUS
            )));
        }
        let host = HostKind::detect();
        if config.vcpus > 1 && host == HostKind::Pvm {
            return Err(MachineError::Config(format!(
                "{} vCPUs requested, but on a PVM host a guest kernel that is not PVM-aware \
                 cannot start secondary vCPUs (its real-mode AP startup never completes); \
                 use 1 vCPU here, hardware VT-x/AMD-V hosts run more",
                config.vcpus
            )));
        }
        if config.mem_mib < 64 {
            return Err(MachineError::Config(format!(
                "{} MiB of memory requested; a Linux guest needs at least 64 MiB",
                config.mem_mib
            )));
        }
        let max_devices = (IRQ_MAX - IRQ_BASE + 1) as usize;
        if config.devices.len() > max_devices {
            return Err(MachineError::Config(format!(
                "{} virtio devices requested; at most {max_devices}",
                config.devices.len()
            )));
        }
        let vm = Vm::new(&config.kvm_path, u64::from(config.mem_mib) << 20)?;
        let console = Console::to_file(&config.console_log).map_err(|source| MachineError::Io {
            what: format!(
                "cannot create the console log {}",
                config.console_log.display()
            ),
            source,
        })?;
        let serial = new_serial(console.clone(), vm.irqfd(COM1_IRQ)?);

        let mut cmdline = vec![
            "console=ttyS0".to_owned(),
            "reboot=k".to_owned(),
            "panic=-1".to_owned(),
            "i8042.noaux".to_owned(),
            "i8042.nokbd".to_owned(),
            // kvmclock, which KVM_SET_CLOCK restores, rather than the raw
            // TSC, which starts from a new offset in every restored VM.
            "clocksource=kvm-clock".to_owned(),
            host.kernel_params().to_owned(),
        ];
        let slots = attach_devices(&vm, config.devices, None)?;
        for slot in &slots {
            let gsi = IRQ_BASE + ((slot.base - VIRTIO_MMIO_BASE) / MMIO_DEVICE_SIZE) as u32;
            cmdline.push(format!("virtio_mmio.device=4K@{:#x}:{gsi}", slot.base));
        }
        cmdline.push(config.cmdline);
        let parts: Vec<&str> = cmdline.iter().map(String::as_str).collect();

        let mem = vm.memory();
        let entry = boot::load_kernel(mem, &config.kernel)?;
        boot::write_boot_params(mem, &boot::build_cmdline(&parts)?)?;
        mptable::setup_mptable(mem, config.vcpus)?;

        let mut fds = Vec::new();
        for index in 0..config.vcpus {
            fds.push(Self::configure_vcpu(&vm, host, index, config.vcpus, entry)?);
        }

        let bus = Arc::new(DeviceManager::new(serial, slots));
        let shared = VcpuShared::new(host, console.clone(), vm.memory().clone());
        let mut machine = Machine {
            vcpus: Vec::new(),
            parked: Vec::new(),
            shared,
            bus,
            console,
            host,
            vm,
        };
        machine.parked = fds;
        machine.start_vcpus()?;
        Ok(machine)
    }

    /// Starts a thread for every parked vCPU.
    fn start_vcpus(&mut self) -> Result<(), MachineError> {
        for (index, fd) in std::mem::take(&mut self.parked).into_iter().enumerate() {
            let thread = VcpuThread::spawn(index as u8, fd, self.bus.clone(), self.shared.clone())
                .map_err(|source| MachineError::Io {
                    what: format!("cannot start the thread of vCPU {index}"),
                    source,
                })?;
            self.vcpus.push(thread);
        }
        Ok(())
    }

    /// Stops the vCPUs and the devices and returns the machine's state.
    /// Guest memory is then at rest: save it now (see [`Machine::memory`]).
    /// Afterwards either [`resume`](Self::resume) it or drop it. Needs no
    /// cooperation from the guest.
    pub fn pause(&mut self) -> Result<MachineState, MachineError> {
        if let Some(reason) = self.stop_reason() {
            return Err(MachineError::Stopped(reason));
        }
        if self.parked.is_empty() {
            self.shared.request_stop();
            for vcpu in self.vcpus.drain(..) {
                match vcpu.join() {
                    Some(fd) => self.parked.push(fd),
                    None => {
                        return Err(MachineError::Stopped(GuestStop::VcpuFault {
                            vcpu: self.parked.len() as u8,
                            reason: "the vCPU thread panicked".into(),
                        }))
                    }
                }
            }
            self.shared.clear_threads();
        }
        if let Some(reason) = self.stop_reason() {
            return Err(MachineError::Stopped(reason));
        }
        let devices = self
            .bus
            .mmio_slots()
            .iter()
            .map(|slot| {
                slot.transport
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pause()
            })
            .collect();
        let kvm = self.vm.kvm();
        let msrs = state::saveable_msrs(kvm)?;
        let vcpus = self
            .parked
            .iter()
            .enumerate()
            .map(|(i, fd)| state::save_vcpu(kvm, i as u8, fd, &msrs))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MachineState {
            host: self.host,
            mem_size: self.vm.memory().iter().map(|r| r.len()).sum(),
            vm: state::save_vm(self.vm.fd())?,
            vcpus,
            serial: self.bus.serial_state(),
            devices,
        })
    }

    /// The pages written since the last call, or since the machine was
    /// booted or restored (see [`Vm::take_dirty_pages`]). Call while paused.
    pub fn take_dirty_pages(&self) -> Result<Vec<u64>, MachineError> {
        Ok(self.vm.take_dirty_pages()?)
    }

    /// Lets a machine stopped by [`pause`](Self::pause), or just restored,
    /// run on.
    pub fn resume(&mut self) -> Result<(), MachineError> {
        if self.parked.is_empty() {
            return Ok(());
        }
        if !self.shared.clear_stop() {
            return Err(MachineError::Stopped(
                self.stop_reason().unwrap_or(GuestStop::Shutdown),
            ));
        }
        for slot in self.bus.mmio_slots() {
            slot.transport
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .resume();
        }
        self.start_vcpus()
    }

    /// Creates a machine from a saved state. Its devices run; its vCPUs
    /// are parked until [`resume`](Self::resume), so that many machines can
    /// be restored before any guest competes with the restores for the CPU.
    pub fn restore(config: RestoreConfig, saved: &MachineState) -> Result<Machine, MachineError> {
        let host = HostKind::detect();
        if host != saved.host {
            return Err(MachineError::Incompatible(format!(
                "it was saved on a {} host, this one is {host}",
                saved.host
            )));
        }
        let vm = config.vm;
        let mem_size: u64 = vm.memory().iter().map(|r| r.len()).sum();
        if mem_size != saved.mem_size {
            return Err(MachineError::Incompatible(format!(
                "{mem_size} bytes of memory given, {} saved",
                saved.mem_size
            )));
        }
        if saved.vcpus.is_empty() || saved.vcpus.len() > usize::from(mptable::MAX_CPUS) {
            return Err(MachineError::Incompatible(format!(
                "{} saved vCPUs",
                saved.vcpus.len()
            )));
        }
        if config.devices.len() != saved.devices.len() {
            return Err(MachineError::Incompatible(format!(
                "{} devices given, {} saved",
                config.devices.len(),
                saved.devices.len()
            )));
        }
        let console =
            Console::append_to_file(&config.console_log).map_err(|source| MachineError::Io {
                what: format!(
                    "cannot open the console log {}",
                    config.console_log.display()
                ),
                source,
            })?;
        let serial = restore_serial(&saved.serial, console.clone(), vm.irqfd(COM1_IRQ)?)
            .map_err(MachineError::Incompatible)?;
        let slots = attach_devices(&vm, config.devices, Some(&saved.devices))?;
        let mut fds = Vec::with_capacity(saved.vcpus.len());
        for (index, vcpu) in saved.vcpus.iter().enumerate() {
            let index = index as u8;
            let fd =
                vm.fd()
                    .create_vcpu(u64::from(index))
                    .map_err(|source| MachineError::Vcpu {
                        index,
                        op: "KVM_CREATE_VCPU",
                        source,
                    })?;
            state::restore_vcpu(index, &fd, vcpu)?;
            fds.push(fd);
        }
        // After the vCPUs: their TSC MSRs move the TSC, and kvmclock must be
        // set relative to the TSC the guest will see (Firecracker's order).
        state::restore_vm(vm.fd(), &saved.vm)?;
        let shared = VcpuShared::new(host, console.clone(), vm.memory().clone());
        if let Some(failure) = &config.load_failure {
            let shared = Arc::downgrade(&shared);
            failure.on_failure(Box::new(move |reason| {
                if let Some(shared) = shared.upgrade() {
                    shared.guest_stopped(GuestStop::MemoryLost(reason.to_owned()));
                }
            }));
        }
        Ok(Machine {
            vcpus: Vec::new(),
            parked: fds,
            shared,
            bus: Arc::new(DeviceManager::new(serial, slots)),
            console,
            host,
            vm,
        })
    }

    fn configure_vcpu(
        vm: &Vm,
        host: HostKind,
        index: u8,
        count: u8,
        entry: boot::KernelEntry,
    ) -> Result<VcpuFd, MachineError> {
        let err = |op| move |source| MachineError::Vcpu { index, op, source };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&cpu::vcpu_cpuid(vm.kvm(), host, index, count)?)
            .map_err(err("KVM_SET_CPUID2"))?;
        let msrs = cpu::boot_msrs()?;
        let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            log::warn!(
                "vCPU {index}: KVM accepted {set} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }
        let mut lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        set_lint(&mut lapic);
        fd.set_lapic(&lapic).map_err(err("KVM_SET_LAPIC"))?;
        if index == 0 {
            fd.set_regs(&boot::boot_regs(entry))
                .map_err(err("KVM_SET_REGS"))?;
            fd.set_fpu(&boot::boot_fpu()).map_err(err("KVM_SET_FPU"))?;
            let mut sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
            boot::setup_sregs(vm.memory(), &mut sregs)?;
            fd.set_sregs(&sregs).map_err(err("KVM_SET_SREGS"))?;
        }
        Ok(fd)
    }

    /// The host kind this machine runs on.
    pub fn host_kind(&self) -> HostKind {
        self.host
    }

    /// The serial console.
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Why the guest stopped by itself, if it did (shutdown, panic, KVM error).
    pub fn stop_reason(&self) -> Option<GuestStop> {
        self.shared.stop_reason()
    }

    /// Guest memory.
    pub fn memory(&self) -> &memory::GuestMemory {
        self.vm.memory()
    }

    /// Stops every vCPU and joins the threads. Idempotent.
    pub fn stop(&mut self) {
        self.shared.request_stop();
        for vcpu in self.vcpus.drain(..) {
            drop(vcpu.join());
        }
        self.shared.clear_threads();
        self.parked.clear();
    }
}

/// Puts `devices` behind virtio-mmio windows (one per device, from
/// `VIRTIO_MMIO_BASE`, GSIs from `IRQ_BASE`), in a saved state if given.
fn attach_devices(
    vm: &Vm,
    devices: Vec<Box<dyn VirtioDevice>>,
    saved: Option<&[MmioSnapshot]>,
) -> Result<Vec<MmioSlot>, MachineError> {
    let mut slots = Vec::with_capacity(devices.len());
    for (i, device) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_DEVICE_SIZE;
        let gsi = IRQ_BASE + i as u32;
        let irq = Arc::new(IrqTrigger::new(vm.irqfd(gsi)?));
        let mem = vm.memory().clone();
        let transport = match saved.and_then(|s| s.get(i)) {
            Some(state) => MmioTransport::restore(device, mem, irq, state)
                .map_err(|e| MachineError::Incompatible(format!("device {i}: {e}")))?,
            None => MmioTransport::new(device, mem, irq)
                .map_err(|e| MachineError::Device(e.to_string()))?,
        };
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.ioeventfd(evt, base + MMIO_NOTIFY_OFFSET, queue as u32)?;
        }
        slots.push(MmioSlot {
            base,
            size: MMIO_DEVICE_SIZE,
            transport: Mutex::new(transport),
        });
    }
    Ok(slots)
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Machine {
    /// Drops the machine on a thread that does only that, one machine after
    /// another: KVM takes its time to tear a VM down (~15 ms on the PVM
    /// host, most of it waiting for grace periods), which a pause that has
    /// written its snapshot need not wait for. Its guest memory is unmapped
    /// there, shortly after. Dropped here if that thread cannot start.
    pub fn drop_in_background(self) {
        super::drop_in_background(Box::new(self));
    }
}
