//! The state KVM holds for a VM and its vCPUs, saved to plain serialisable
//! structs and restored into a new VM (in this process or another one).
//!
//! What is saved follows what KVM's API documentation lists as the
//! migratable state of an x86 guest: per vCPU the CPUID, MP state,
//! registers, FPU/XSAVE/XCRs, debug registers, local APIC, every MSR KVM
//! can save and pending events; per VM the in-kernel PIC and IOAPIC, the
//! PIT and kvmclock. The order of the restore calls matters (MSRs after
//! the special registers, events last) and is the one Firecracker uses.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed.
    #[error("{op} failed on vCPU {index}: {source}")]
    Vcpu {
        /// The vCPU.
        index: u8,
        /// The ioctl.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM ioctl failed.
    #[error("{op} failed: {source}")]
    Vm {
        /// The ioctl.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused some saved MSRs.
    #[error("KVM accepted {set} of the {total} saved MSRs of vCPU {index} (first refused: {first:#x}); the snapshot was taken on a host with another CPU or KVM version")]
    Msrs {
        /// The vCPU.
        index: u8,
        /// How many were set.
        set: usize,
        /// How many were saved.
        total: usize,
        /// The first MSR KVM refused.
        first: u32,
    },
    /// The saved state is inconsistent.
    #[error("invalid saved vCPU state: {0}")]
    Invalid(String),
}

/// `struct kvm_fpu` (kvm-bindings has no serde support for it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (also inside `xsave` when KVM supports that).
    pub fpu: FpuState,
    /// The XSAVE area, where KVM has `KVM_CAP_XSAVE`.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, where KVM has `KVM_CAP_XCRS`.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists as saveable and could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// The TSC frequency, where KVM reports it.
    pub tsc_khz: Option<u32>,
}

fn vcpu_err(index: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vcpu { index, op, source }
}

fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Vm { op, source }
}

/// The MSRs worth saving: every index KVM lists.
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// Reads the MSRs in `indices`; ones KVM cannot read are left out.
fn save_msrs(index: u8, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(index, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[skip.min(rest.len())..];
    }
    Ok(out)
}

/// Saves vCPU `index`. Its thread must have left `KVM_RUN` with pending I/O
/// completed (see `vcpu::complete_pending_io`).
pub fn save_vcpu(
    kvm: &Kvm,
    index: u8,
    fd: &VcpuFd,
    msr_indices: &[u32],
) -> Result<VcpuState, StateError> {
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err(index, "KVM_GET_CPUID2"))?;
    let xsave = if kvm.check_extension(Cap::Xsave) {
        Some(fd.get_xsave().map_err(vcpu_err(index, "KVM_GET_XSAVE"))?)
    } else {
        None
    };
    let xcrs = if kvm.check_extension(Cap::Xcrs) {
        Some(fd.get_xcrs().map_err(vcpu_err(index, "KVM_GET_XCRS"))?)
    } else {
        None
    };
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: fd
            .get_mp_state()
            .map_err(vcpu_err(index, "KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(vcpu_err(index, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(vcpu_err(index, "KVM_GET_SREGS"))?,
        fpu: FpuState::from(&fd.get_fpu().map_err(vcpu_err(index, "KVM_GET_FPU"))?),
        xsave,
        xcrs,
        debugregs: fd
            .get_debug_regs()
            .map_err(vcpu_err(index, "KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(vcpu_err(index, "KVM_GET_LAPIC"))?,
        msrs: save_msrs(index, fd, msr_indices)?,
        events: fd
            .get_vcpu_events()
            .map_err(vcpu_err(index, "KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Restores `state` into a freshly created vCPU.
pub fn restore_vcpu(index: u8, fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                // Not fatal: the guest's clocksource copes with a TSC of
                // another frequency after kvmclock is restored.
                log::warn!("vCPU {index}: cannot set the TSC frequency to {khz} kHz: {e}");
            }
        }
    }
    let cpuid = CpuId::from_entries(&state.cpuid)
        .map_err(|e| StateError::Invalid(format!("{} CPUID entries: {e:?}", state.cpuid.len())))?;
    fd.set_cpuid2(&cpuid)
        .map_err(vcpu_err(index, "KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(vcpu_err(index, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(vcpu_err(index, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(vcpu_err(index, "KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(vcpu_err(index, "KVM_SET_FPU"))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: `xsave` is a whole `kvm_xsave` as KVM_GET_XSAVE returned it
        // (no trailing dynamic area: we never use KVM_GET_XSAVE2).
        unsafe { fd.set_xsave(xsave) }.map_err(vcpu_err(index, "KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(vcpu_err(index, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debugregs)
        .map_err(vcpu_err(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(vcpu_err(index, "KVM_SET_LAPIC"))?;
    for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk)
            .map_err(|e| StateError::Invalid(format!("MSR list: {e:?}")))?;
        let set = fd
            .set_msrs(&msrs)
            .map_err(vcpu_err(index, "KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(StateError::Msrs {
                index,
                set,
                total: state.msrs.len(),
                first: chunk.get(set).map_or(0, |e| e.index),
            });
        }
    }
    fd.set_vcpu_events(&state.events)
        .map_err(vcpu_err(index, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The VM-wide state: in-kernel interrupt controllers, PIT, kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saves the VM-wide state (vCPUs stopped).
pub fn save_vm(fd: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

/// Restores the VM-wide state into a VM with an in-kernel irqchip and PIT,
/// after its vCPUs were restored.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), StateError> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(StateError::Invalid(format!(
                "irqchip {id} saved with id {}",
                chip.chip_id
            )));
        }
        fd.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    fd.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    // Only the clock value is restored; flags such as KVM_CLOCK_TSC_STABLE
    // describe the old host and KVM_SET_CLOCK refuses most of them.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    fd.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    Ok(())
}
