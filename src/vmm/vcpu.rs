//! vCPU threads: one per vCPU, each running `KVM_RUN` in a loop and
//! dispatching exits to the device bus. A vCPU is stopped by setting the
//! machine's stop flag and kicking its thread with a real-time signal whose
//! handler sets `immediate_exit`, so a vCPU inside (or about to enter) the
//! guest returns to the loop at once.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::cpu::{should_inject_breakpoint, HostKind};
use super::devices::bus::{BusAction, DeviceManager};
use super::devices::serial::Console;
use super::memory::GuestMemory;
use super::xsave;

/// Why a VM stopped running on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest powered off or rebooted.
    Shutdown,
    /// The guest kernel panicked (the console line).
    KernelPanic(String),
    /// KVM could not run a guest instruction.
    InternalError {
        /// The vCPU.
        vcpu: u8,
        /// KVM's suberror (1: emulation failure).
        suberror: u32,
        /// The instruction bytes KVM reported (may be empty).
        insn: Vec<u8>,
    },
    /// `KVM_RUN` failed or exited for a reason a VMM cannot continue from.
    VcpuFault {
        /// The vCPU.
        vcpu: u8,
        /// What happened.
        reason: String,
    },
    /// Guest memory could not be loaded from the snapshot's files (see
    /// [`super::lazy::LoadFailure`]): the guest was stopped before it could
    /// run on, or be saved, with memory that is not what was paused.
    MemoryLost(String),
}

impl std::fmt::Display for GuestStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GuestStop::Shutdown => write!(f, "the guest shut down"),
            GuestStop::KernelPanic(line) => write!(f, "the guest kernel panicked: {line}"),
            GuestStop::InternalError {
                vcpu,
                suberror,
                insn,
            } => write!(
                f,
                "KVM internal error on vCPU {vcpu} (suberror {suberror}), instruction bytes {insn:02x?}"
            ),
            GuestStop::VcpuFault { vcpu, reason } => write!(f, "vCPU {vcpu} failed: {reason}"),
            GuestStop::MemoryLost(reason) => write!(
                f,
                "guest memory could not be loaded from the snapshot ({reason}), so the guest was stopped; check the disk the snapshot is on"
            ),
        }
    }
}

/// State shared by the vCPU threads of one machine.
pub struct VcpuShared {
    stop: AtomicBool,
    reason: Mutex<Option<GuestStop>>,
    host: HostKind,
    console: Console,
    /// Guest memory, for the instructions the VMM completes itself.
    mem: GuestMemory,
    threads: Mutex<Vec<libc::pthread_t>>,
}

impl VcpuShared {
    /// Shared state for a machine on `host`.
    pub fn new(host: HostKind, console: Console, mem: GuestMemory) -> Arc<Self> {
        Arc::new(Self {
            stop: AtomicBool::new(false),
            reason: Mutex::new(None),
            host,
            console,
            mem,
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Why the guest stopped by itself, if it did.
    pub fn stop_reason(&self) -> Option<GuestStop> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records the first stop reason and stops every vCPU.
    pub(crate) fn guest_stopped(&self, reason: GuestStop) {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
        self.request_stop();
    }

    /// Forgets the vCPU threads once they have been joined.
    pub(crate) fn clear_threads(&self) {
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Lets vCPU threads run again after their threads were stopped and
    /// joined for a pause. False if the guest stopped by itself meanwhile.
    pub(crate) fn clear_stop(&self) -> bool {
        let reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if reason.is_some() {
            return false;
        }
        self.stop.store(false, Ordering::SeqCst);
        true
    }

    /// Makes every vCPU leave `KVM_RUN` and its thread exit.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            // SAFETY: the pthread_t belongs to a vCPU thread that is still
            // joinable (handles are only removed after join), and the signal
            // has a handler installed by `install_kick_handler`.
            unsafe { libc::pthread_kill(*thread, kick_signal()) };
        }
    }
}

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = KVM_RUN_PTR.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run, set while
        // its VcpuFd is alive and cleared before the VcpuFd drops; a single
        // byte store is async-signal-safe.
        unsafe { (*ptr).immediate_exit = 1 };
    }
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            log::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: Option<JoinHandle<VcpuFd>>,
}

impl VcpuThread {
    /// Starts vCPU `index` on its own thread.
    pub fn spawn(
        index: u8,
        fd: VcpuFd,
        bus: Arc<DeviceManager>,
        shared: Arc<VcpuShared>,
    ) -> std::io::Result<VcpuThread> {
        install_kick_handler();
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || run_loop(index, fd, &bus, &thread_shared))?;
        shared
            .threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle.as_pthread_t());
        // A stop requested while we were spawning must reach this thread too.
        if shared.stop.load(Ordering::SeqCst) {
            shared.request_stop();
        }
        Ok(VcpuThread {
            handle: Some(handle),
        })
    }

    /// Waits for the thread to exit (call after `VcpuShared::request_stop`)
    /// and takes back the vCPU, with any I/O it was doing completed, so its
    /// state can be saved. `None` if the thread panicked.
    pub fn join(mut self) -> Option<VcpuFd> {
        let handle = self.handle.take()?;
        match handle.join() {
            Ok(fd) => Some(fd),
            Err(_) => {
                log::error!("a vCPU thread panicked");
                None
            }
        }
    }
}

fn run_loop(index: u8, mut fd: VcpuFd, bus: &DeviceManager, shared: &VcpuShared) -> VcpuFd {
    KVM_RUN_PTR.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
    while !shared.stop.load(Ordering::SeqCst) {
        if let Some(stop) = run_once(index, &mut fd, bus, shared) {
            shared.guest_stopped(stop);
        }
        if let Some(line) = shared.console.panic_message() {
            shared.guest_stopped(GuestStop::KernelPanic(line));
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    complete_pending_io(index, &mut fd);
    fd
}

/// A port or MMIO read the VMM has answered lands in the guest's registers
/// only on the next `KVM_RUN`. Entering it once with `immediate_exit` set
/// completes that instruction without running any guest code, so that the
/// saved registers are consistent (the KVM API documentation asks for this
/// before saving state).
fn complete_pending_io(index: u8, fd: &mut VcpuFd) {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => log::warn!("vCPU {index}: completing pending I/O: {e}"),
        Ok(exit) => log::warn!("vCPU {index}: unexpected exit {exit:?} with immediate_exit set"),
    }
    fd.set_kvm_immediate_exit(0);
}

/// Runs the vCPU until one exit is handled; returns a stop reason if the
/// guest cannot continue.
fn run_once(
    index: u8,
    fd: &mut VcpuFd,
    bus: &DeviceManager,
    shared: &VcpuShared,
) -> Option<GuestStop> {
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
        Ok(VcpuExit::IoOut(port, data)) => {
            if bus.pio_write(port, data) == BusAction::Reset {
                return Some(GuestStop::Shutdown);
            }
        }
        Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
        Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
        Ok(VcpuExit::Hlt) | Ok(VcpuExit::Shutdown) => return Some(GuestStop::Shutdown),
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            log::debug!("vCPU {index}: system event {kind} (reset = {KVM_SYSTEM_EVENT_RESET})");
            return Some(GuestStop::Shutdown);
        }
        Ok(VcpuExit::InternalError) => return internal_error(index, fd, shared),
        Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => {}
        Ok(exit) => {
            return Some(GuestStop::VcpuFault {
                vcpu: index,
                reason: format!("unexpected exit {exit:?}"),
            })
        }
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
        }
        Err(e) => {
            return Some(GuestStop::VcpuFault {
                vcpu: index,
                reason: format!("KVM_RUN: {e}"),
            })
        }
    }
    None
}

/// Instruction bytes of an emulation failure, as laid out by KVM in
/// `kvm_run.internal.data`: `data[0]` flags (bit 0: bytes valid), then the
/// length byte and up to 15 instruction bytes.
fn emulation_insn_bytes(ndata: u32, data: &[u64; 16]) -> Vec<u8> {
    const FLAG_INSN_BYTES: u64 = 1;
    if ndata < 3 || data[0] & FLAG_INSN_BYTES == 0 {
        return Vec::new();
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let len = usize::from(raw[0]).min(15);
    raw[1..1 + len].to_vec()
}

fn internal_error(index: u8, fd: &mut VcpuFd, shared: &VcpuShared) -> Option<GuestStop> {
    let host = shared.host;
    // SAFETY: KVM set exit_reason to KVM_EXIT_INTERNAL_ERROR, so `internal`
    // is the active member of the exit union.
    let internal = unsafe { fd.get_kvm_run().__bindgen_anon_1.internal };
    let insn = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        emulation_insn_bytes(internal.ndata, &internal.data)
    } else {
        Vec::new()
    };
    if let Some(xsave) = host.is_pvm().then(|| xsave::decode(&insn)).flatten() {
        return match xsave::complete(fd, &shared.mem, &xsave) {
            Ok(()) => None,
            Err(e) => Some(GuestStop::VcpuFault {
                vcpu: index,
                reason: e.to_string(),
            }),
        };
    }
    if should_inject_breakpoint(host, &insn) {
        match inject_breakpoint(fd) {
            Ok(()) => return None,
            Err(e) => {
                return Some(GuestStop::VcpuFault {
                    vcpu: index,
                    reason: format!("cannot inject #BP for INT3: {e}"),
                })
            }
        }
    }
    Some(GuestStop::InternalError {
        vcpu: index,
        suberror: internal.suberror,
        insn,
    })
}

/// Completes an INT3 the emulator could not run: step over it and inject #BP,
/// so the guest's own breakpoint handler runs.
fn inject_breakpoint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const BP_VECTOR: u8 = 3;
    let mut regs = fd.get_regs()?;
    regs.rip += 1;
    fd.set_regs(&regs)?;
    let mut events = fd.get_vcpu_events()?;
    events.exception.injected = 1;
    events.exception.nr = BP_VECTOR;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    fd.set_vcpu_events(&events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insn_bytes_are_decoded_and_bounded() {
        let mut data = [0u64; 16];
        data[0] = 1;
        data[1] = u64::from_le_bytes([1, 0xcc, 0, 0, 0, 0, 0, 0]);
        assert_eq!(emulation_insn_bytes(3, &data), vec![0xcc]);
        data[1] = u64::from_le_bytes([0xff, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(emulation_insn_bytes(3, &data).len(), 15);
        assert!(emulation_insn_bytes(2, &data).is_empty());
        data[0] = 0;
        assert!(emulation_insn_bytes(3, &data).is_empty());
    }
}
