//! CPU model of the guest: host-kind detection, CPUID, boot MSRs, and every
//! quirk this VMM applies for a particular host kind, in one place.
//!
//! On a PVM host (`/sys/module/kvm_pvm`, a "pagetable-based virtual machine"
//! hypervisor instead of VT-x/AMD-V) guest kernel code runs in KVM's
//! instruction emulator, which cannot execute SSE, POPCNT, XSAVE, CLAC/STAC or
//! INT3 at CPL0. There we hide those features from the guest (CPUID and kernel
//! parameters) and turn the emulator's INT3 failure into a #BP injection. On
//! hardware virtualization none of this is applied.

use std::fmt;
use std::path::Path;

use kvm_bindings::{kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use super::xsave::{XFEATURE_AVX512, XFEATURE_FP, XFEATURE_SSE, XFEATURE_YMM};

/// What kind of virtualization `/dev/kvm` offers on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HostKind {
    /// PVM: KVM without hardware virtualization; guest kernel code is emulated.
    Pvm,
    /// Intel VT-x.
    IntelVmx,
    /// AMD-V.
    AmdSvm,
    /// KVM is present but the CPU flags name neither VT-x nor AMD-V (nested, unusual kernel).
    Unknown,
}

impl HostKind {
    /// Detects the host kind from sysfs and `/proc/cpuinfo`.
    pub fn detect() -> HostKind {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return HostKind::Pvm;
        }
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let has = |flag: &str| {
            flags
                .lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|w| w == flag))
        };
        if has("vmx") {
            HostKind::IntelVmx
        } else if has("svm") {
            HostKind::AmdSvm
        } else {
            HostKind::Unknown
        }
    }

    /// Whether the PVM workarounds apply.
    pub fn is_pvm(self) -> bool {
        self == HostKind::Pvm
    }

    /// Kernel parameters the guest needs on this host kind.
    ///
    /// On PVM: `clearcpuid=` for SMAP (308), SMEP (295), POPCNT
    /// (151), ERMS (297), FSRM (580), XSAVEOPT (320), XSAVEC (321), XGETBV1
    /// (322) and XSAVES (323), which the guest would otherwise still see
    /// through PVM. Without ERMS/FSRM the kernel copies with `rep movsq`
    /// instead of byte-wise `rep movsb`, which the emulator runs one iteration
    /// at a time; without the XSAVE variants it uses plain XSAVE/XRSTOR in
    /// the standard format, which the VMM completes (`xsave.rs`).
    pub fn kernel_params(self) -> &'static str {
        match self {
            HostKind::Pvm => "clearcpuid=308,295,151,297,580,320,321,322,323",
            _ => "",
        }
    }
}

impl fmt::Display for HostKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HostKind::Pvm => "PVM (software, guest kernel emulated)",
            HostKind::IntelVmx => "hardware VT-x",
            HostKind::AmdSvm => "hardware AMD-V",
            HostKind::Unknown => "KVM (unknown kind)",
        })
    }
}

/// Errors building the CPU model.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// Building the MSR list failed.
    #[error("cannot build the boot MSR list: {0}")]
    Msrs(String),
}

// CPUID bit positions.
const LEAF1_ECX_POPCNT: u32 = 23;
const LEAF1_ECX_XSAVE: u32 = 26;
const LEAF1_ECX_OSXSAVE: u32 = 27;
const LEAF1_ECX_AVX: u32 = 28;
const LEAF1_ECX_HYPERVISOR: u32 = 31;
const LEAF1_EDX_HTT: u32 = 28;
const LEAF7_EBX_SMEP: u32 = 7;
const LEAF7_EBX_ERMS: u32 = 9;
const LEAF7_EBX_SMAP: u32 = 20;
const LEAF7_EBX_AVX512F: u32 = 16;
const LEAF7_EDX_FSRM: u32 = 4;

/// What a snapshot's guest depends on in its host: the kind of
/// virtualization (the guest kernel was booted with that kind's
/// workarounds) and the CPU's extended state (XCR0: the registers the guest
/// may hold, e.g. AVX-512's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostProfile {
    /// The kind of virtualization.
    pub kind: HostKind,
    /// The host's XCR0.
    pub xcr0: u64,
}

impl HostProfile {
    /// This host's profile.
    pub fn current(kind: HostKind) -> Self {
        Self {
            kind,
            xcr0: host_xcr0(),
        }
    }

    /// Why a guest that ran on `saved` cannot run here, if it cannot: a
    /// different kind of host, or state components this CPU lacks.
    pub fn cannot_run(&self, saved: &HostProfile) -> Option<String> {
        if saved.kind != self.kind {
            return Some(format!(
                "it was paused on a {} host and this one is {}; resume it on a host of the same kind",
                saved.kind, self.kind
            ));
        }
        let missing = saved.xcr0 & !self.xcr0;
        if missing != 0 {
            return Some(format!(
                "its guest may hold CPU state this host lacks (XCR0 {:#x} there, {:#x} here:                  bits {missing:#x} missing, e.g. AVX-512); resume it on a host with the same CPU features",
                saved.xcr0, self.xcr0
            ));
        }
        None
    }
}

/// The XCR0 this host runs user code with, which on PVM is also the XCR0
/// guest user mode runs with: PVM does not switch it.
pub fn host_xcr0() -> u64 {
    if std::arch::is_x86_feature_detected!("xsave") {
        // SAFETY: the CPU has XSAVE and the OS enabled it (OSXSAVE), which
        // is what the detection above checks, so XGETBV(0) is valid.
        unsafe { std::arch::x86_64::_xgetbv(0) }
    } else {
        XFEATURE_FP | XFEATURE_SSE
    }
}

/// The CPUID table for vCPU `index` of `count`, derived from what KVM supports.
pub fn vcpu_cpuid(kvm: &Kvm, host: HostKind, index: u8, count: u8) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)?;
    let xcr0 = host_xcr0();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            0x1 => {
                // APIC ID, logical processor count, CLFLUSH line size (8 * 8 bytes).
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx |= 1 << LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= 1 << LEAF1_EDX_HTT;
                }
                if host.is_pvm() {
                    // XSAVE (completed by the VMM, see `xsave.rs`) and AVX
                    // exactly when guest user mode can use them: the guest
                    // kernel then saves that state on task switches.
                    entry.ecx &= !((1 << LEAF1_ECX_POPCNT)
                        | (1 << LEAF1_ECX_OSXSAVE)
                        | (1 << LEAF1_ECX_AVX));
                    entry.ecx |= 1 << LEAF1_ECX_XSAVE;
                    if xcr0 & XFEATURE_YMM != 0 {
                        entry.ecx |= 1 << LEAF1_ECX_AVX;
                    }
                }
            }
            0x7 if entry.index == 0 && host.is_pvm() => {
                entry.ebx &= !((1 << LEAF7_EBX_SMEP)
                    | (1 << LEAF7_EBX_ERMS)
                    | (1 << LEAF7_EBX_SMAP)
                    | (1 << LEAF7_EBX_AVX512F));
                if xcr0 & XFEATURE_AVX512 == XFEATURE_AVX512 {
                    entry.ebx |= 1 << LEAF7_EBX_AVX512F;
                }
                entry.edx &= !(1 << LEAF7_EDX_FSRM);
            }
            0xb | 0x1f => {
                // x2APIC topology: one thread per core, `count` cores.
                entry.edx = u32::from(index);
            }
            0xd if host.is_pvm() => match entry.index {
                // The state components user mode has, in the standard
                // format (sizes as KVM reports them).
                0 => {
                    entry.eax &= xcr0 as u32;
                    entry.edx &= (xcr0 >> 32) as u32;
                }
                // No XSAVEOPT, XSAVEC, XGETBV1 or XSAVES: `xsave.rs`
                // completes plain XSAVE and XRSTOR only.
                1 => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = 0;
                    entry.edx = 0;
                }
                i if i < 64 && xcr0 & (1 << i) == 0 => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = 0;
                    entry.edx = 0;
                }
                _ => {}
            },
            _ => {}
        }
    }
    Ok(cpuid)
}

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 0x1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// The MSR values a vCPU starts with.
pub fn boot_msrs() -> Result<Msrs, CpuError> {
    let entry = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ])
    .map_err(|e| CpuError::Msrs(format!("{e:?}")))
}

/// The first byte of INT3.
pub const INT3_OPCODE: u8 = 0xcc;

/// Whether an emulation failure on `insn` should be turned into a #BP
/// injection (PVM only: the emulator cannot run INT3 in guest kernel mode).
pub fn should_inject_breakpoint(host: HostKind, insn: &[u8]) -> bool {
    host.is_pvm() && insn.first() == Some(&INT3_OPCODE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_params_only_on_pvm() {
        assert!(HostKind::Pvm.kernel_params().contains("clearcpuid"));
        assert_eq!(HostKind::IntelVmx.kernel_params(), "");
        assert!(should_inject_breakpoint(HostKind::Pvm, &[0xcc]));
        assert!(!should_inject_breakpoint(HostKind::IntelVmx, &[0xcc]));
        assert!(!should_inject_breakpoint(HostKind::Pvm, &[0x0f, 0x01]));
    }

    #[test]
    fn host_profiles_refuse_other_kinds_and_missing_state() {
        let here = HostProfile {
            kind: HostKind::Pvm,
            xcr0: 0x7,
        };
        assert_eq!(here.cannot_run(&here), None);
        let smaller = HostProfile { xcr0: 0x3, ..here };
        assert_eq!(here.cannot_run(&smaller), None);
        let avx512 = HostProfile { xcr0: 0xe7, ..here };
        assert!(here.cannot_run(&avx512).unwrap().contains("0xe0 missing"));
        let vmx = HostProfile {
            kind: HostKind::IntelVmx,
            ..here
        };
        assert!(here.cannot_run(&vmx).unwrap().contains("same kind"));
    }

    #[test]
    fn boot_msrs_build() {
        assert_eq!(boot_msrs().unwrap().as_slice().len(), 11);
    }
}
