//! XSAVE, XRSTOR and XGETBV in guest kernel mode on PVM hosts, completed by
//! the VMM.
//!
//! On PVM, guest user mode runs natively on the host CPU under the host's
//! XCR0 (AVX and AVX-512 usable: glibc's string functions use them), while
//! guest kernel code runs in KVM's instruction emulator, which cannot run the
//! XSAVE family. A guest kernel that cannot save what user mode can use
//! leaks the upper halves of YMM/ZMM registers from one task into another:
//! corrupted `exec` arguments, interpreters crashing at start. So the guest
//! kernel gets XSAVE (standard format only: no XSAVEOPT, XSAVEC or XSAVES,
//! see `cpu.rs`), and when the emulator gives up on one of these
//! instructions the vCPU thread completes it here: the guest's register
//! state comes from `KVM_GET_XSAVE` (the same standard layout) and goes to
//! or from guest memory through the guest's page tables (`KVM_TRANSLATE`).
//! Faults are the architectural ones: a misaligned area or a malformed
//! header is #GP(0), an unmapped or read-only page is #PF, so the guest's
//! exception fixups (signal frames in user memory) work as on hardware.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::memory::{GuestMemory, PAGE_SIZE};

/// The instruction the emulator gave up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `XSAVE m` (0F AE /4): registers to memory.
    Save,
    /// `XRSTOR m` (0F AE /5): memory to registers.
    Restore,
    /// `XGETBV` (0F 01 D0): an extended control register to EDX:EAX.
    GetBv,
}

/// Segment override of a memory operand (the others are flat in 64-bit mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment {
    Flat,
    Fs,
    Gs,
}

/// A decoded ModRM memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MemOperand {
    segment: Segment,
    base: Option<u8>,
    /// Register and scale (1, 2, 4 or 8).
    index: Option<(u8, u8)>,
    disp: i32,
    rip_relative: bool,
}

/// A decoded instruction this module completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    op: Op,
    /// Length in bytes: RIP advances by this much once it is done.
    len: u8,
    mem: Option<MemOperand>,
}

impl Insn {
    /// What the instruction does.
    pub fn op(&self) -> Op {
        self.op
    }
}

/// Decodes `bytes` (as KVM reports them for an emulation failure) if they
/// start with XSAVE, XRSTOR (either with REX.W or without) or XGETBV in
/// 64-bit mode; `None` for anything else.
pub fn decode(bytes: &[u8]) -> Option<Insn> {
    let mut at = 0;
    let mut segment = Segment::Flat;
    let mut rex = 0u8;
    loop {
        match *bytes.get(at)? {
            0x64 => segment = Segment::Fs,
            0x65 => segment = Segment::Gs,
            // CS, SS, DS, ES overrides: ignored in 64-bit mode.
            0x2e | 0x36 | 0x3e | 0x26 => {}
            b @ 0x40..=0x4f => {
                rex = b;
                at += 1;
                break;
            }
            _ => break,
        }
        at += 1;
    }
    if bytes.get(at..at + 2)? == [0x0f, 0x01] && *bytes.get(at + 2)? == 0xd0 {
        return Some(Insn {
            op: Op::GetBv,
            len: u8::try_from(at + 3).ok()?,
            mem: None,
        });
    }
    if bytes.get(at..at + 2)? != [0x0f, 0xae] {
        return None;
    }
    at += 2;
    let modrm = *bytes.get(at)?;
    at += 1;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    let op = match reg {
        4 => Op::Save,
        5 => Op::Restore,
        _ => return None,
    };
    if md == 3 {
        return None; // register forms are fences and others, not ours
    }
    let rex_b = (rex & 1) << 3;
    let rex_x = (rex & 2) << 2;
    let mut mem = MemOperand {
        segment,
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
    };
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = *bytes.get(at)?;
        at += 1;
        let (scale, index, base) = (1u8 << (sib >> 6), (sib >> 3) & 7, sib & 7);
        if index | rex_x != 4 {
            mem.index = Some((index | rex_x, scale));
        }
        if base == 5 && md == 0 {
            disp_len = 4;
        } else {
            mem.base = Some(base | rex_b);
        }
    } else if rm == 5 && md == 0 {
        mem.rip_relative = true;
        disp_len = 4;
    } else {
        mem.base = Some(rm | rex_b);
    }
    mem.disp = match disp_len {
        1 => i32::from(*bytes.get(at)? as i8),
        4 => i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?),
        _ => 0,
    };
    at += disp_len;
    Some(Insn {
        op,
        len: u8::try_from(at).ok()?,
        mem: Some(mem),
    })
}

/// General-purpose register `n` in the encoding's order (RAX, RCX, RDX,
/// RBX, RSP, RBP, RSI, RDI, R8..R15).
fn gpr(regs: &kvm_regs, n: u8) -> u64 {
    [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15,
    ][usize::from(n & 15)]
}

impl MemOperand {
    /// The linear address the operand names; `next_rip` is the address of
    /// the following instruction (for RIP-relative operands).
    fn address(&self, regs: &kvm_regs, sregs: &kvm_sregs, next_rip: u64) -> u64 {
        let mut addr = i64::from(self.disp) as u64;
        if self.rip_relative {
            addr = addr.wrapping_add(next_rip);
        }
        if let Some(base) = self.base {
            addr = addr.wrapping_add(gpr(regs, base));
        }
        if let Some((index, scale)) = self.index {
            addr = addr.wrapping_add(gpr(regs, index).wrapping_mul(u64::from(scale)));
        }
        match self.segment {
            Segment::Flat => addr,
            Segment::Fs => addr.wrapping_add(sregs.fs.base),
            Segment::Gs => addr.wrapping_add(sregs.gs.base),
        }
    }
}

// The legacy (FXSAVE) region and the XSAVE header, in bytes.
const FCW: usize = 0;
const MXCSR: usize = 24;
const MXCSR_MASK: usize = 28;
const ST_REGS: std::ops::Range<usize> = 32..160;
const X87_CONTROL: std::ops::Range<usize> = 0..24;
const XMM_REGS: std::ops::Range<usize> = 160..416;
const HEADER: usize = 512;
const HEADER_LEN: usize = 64;
const X87_INIT_FCW: u16 = 0x037f;
/// XCR0 / XSTATE_BV bits: x87, SSE and AVX state.
pub const XFEATURE_FP: u64 = 1 << 0;
pub const XFEATURE_SSE: u64 = 1 << 1;
pub const XFEATURE_YMM: u64 = 1 << 2;
/// Opmask, ZMM_Hi256 and Hi16_ZMM: the AVX-512 state.
pub const XFEATURE_AVX512: u64 = 0b111 << 5;
/// MXCSR_MASK when the processor stores 0 there.
const DEFAULT_MXCSR_MASK: u32 = 0xffbf;

const GP_VECTOR: u8 = 13;
const PF_VECTOR: u8 = 14;
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

/// Offset and size of state component `i` (2..63) in the standard format,
/// as the host CPU lays it out (which is also `KVM_GET_XSAVE`'s layout).
fn component(i: u32) -> (usize, usize) {
    let leaf = std::arch::x86_64::__cpuid_count(0xd, i);
    (leaf.ebx as usize, leaf.eax as usize)
}

/// The bytes of the standard-format area that the components in `mask` use.
fn area_len(mask: u64) -> usize {
    (2..64)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| {
            let (offset, size) = component(i);
            offset + size
        })
        .fold(HEADER + HEADER_LEN, usize::max)
}

/// A fault the instruction raises in the guest instead of completing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Gp,
    Pf { address: u64, error_code: u32 },
}

/// Errors of the VMM (not of the guest) while completing an instruction.
#[derive(Debug, thiserror::Error)]
pub enum XsaveError {
    /// A KVM ioctl failed.
    #[error("{what} failed while completing {op:?} for the guest: {source}")]
    Kvm {
        op: Op,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm<T>(op: Op, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, XsaveError> {
    r.map_err(|source| XsaveError::Kvm { op, what, source })
}

/// The guest-physical pieces of `len` bytes at linear address `addr`, page
/// by page, or the #PF an access to them raises.
fn translate(
    fd: &VcpuFd,
    op: Op,
    addr: u64,
    len: usize,
    write: bool,
    user: bool,
) -> Result<Result<Vec<(u64, usize)>, Fault>, XsaveError> {
    let mut pieces = Vec::new();
    let mut at = addr;
    let end = addr.wrapping_add(len as u64);
    while at != end {
        let in_page = PAGE_SIZE - (at as usize & (PAGE_SIZE - 1));
        let n = in_page.min(end.wrapping_sub(at) as usize);
        let t = kvm(op, "KVM_TRANSLATE", fd.translate_gva(at))?;
        let mut error_code = (u32::from(write) * PF_WRITE) | (u32::from(user) * PF_USER);
        let allowed = t.valid != 0 && (!write || t.writeable != 0) && (!user || t.usermode != 0);
        if !allowed {
            if t.valid != 0 {
                error_code |= PF_PRESENT;
            }
            return Ok(Err(Fault::Pf {
                address: at,
                error_code,
            }));
        }
        pieces.push((t.physical_address, n));
        at = at.wrapping_add(n as u64);
    }
    Ok(Ok(pieces))
}

/// Reads or writes guest memory in `pieces`; false if one is not RAM.
fn read_pieces(mem: &GuestMemory, pieces: &[(u64, usize)], buf: &mut [u8]) -> bool {
    let mut at = 0;
    for &(gpa, n) in pieces {
        if mem
            .read_slice(&mut buf[at..at + n], GuestAddress(gpa))
            .is_err()
        {
            return false;
        }
        at += n;
    }
    true
}

fn write_pieces(mem: &GuestMemory, pieces: &[(u64, usize)], buf: &[u8]) -> bool {
    let mut at = 0;
    for &(gpa, n) in pieces {
        // Writes through `GuestMemory` are marked in its dirty bitmap, so
        // the next pause saves these pages.
        if mem
            .write_slice(&buf[at..at + n], GuestAddress(gpa))
            .is_err()
        {
            return false;
        }
        at += n;
    }
    true
}

fn region_bytes(x: &kvm_xsave) -> &[u8] {
    // SAFETY: `region` is a plain array of u32; viewing it as bytes (u8 has
    // no alignment or validity requirements) covers exactly its memory.
    unsafe { std::slice::from_raw_parts(x.region.as_ptr().cast::<u8>(), size_of_val(&x.region)) }
}

fn region_bytes_mut(x: &mut kvm_xsave) -> &mut [u8] {
    // SAFETY: as in `region_bytes`; any byte pattern is a valid u32.
    unsafe {
        std::slice::from_raw_parts_mut(x.region.as_mut_ptr().cast::<u8>(), size_of_val(&x.region))
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Copies (or, with `from` = `None`, puts in its initial state) component
/// `i` of the standard format.
fn set_component(to: &mut [u8], from: Option<&[u8]>, i: u32) {
    let ranges = match i {
        0 => [X87_CONTROL, ST_REGS],
        1 => [XMM_REGS, 0..0],
        _ => {
            let (offset, size) = component(i);
            [offset..offset + size, 0..0]
        }
    };
    for r in ranges {
        match from {
            Some(from) => to[r.clone()].copy_from_slice(&from[r]),
            None => to[r].fill(0),
        }
    }
    if i == 0 && from.is_none() {
        to[FCW..FCW + 2].copy_from_slice(&X87_INIT_FCW.to_le_bytes());
    }
}

fn mask_bits(mask: u64) -> impl Iterator<Item = u32> {
    (0..64).filter(move |i| mask & (1u64 << i) != 0)
}

/// Completes `insn`, which the emulator could not run, for the vCPU `fd`
/// (stopped at it): the guest continues after it, or in the handler of the
/// fault it raised.
pub fn complete(fd: &VcpuFd, mem: &GuestMemory, insn: &Insn) -> Result<(), XsaveError> {
    let op = insn.op;
    let mut regs = kvm(op, "KVM_GET_REGS", fd.get_regs())?;
    let sregs = kvm(op, "KVM_GET_SREGS", fd.get_sregs())?;
    let xcrs = kvm(op, "KVM_GET_XCRS", fd.get_xcrs())?;
    let xcr0 = xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(XFEATURE_FP, |x| x.value);
    let next_rip = regs.rip.wrapping_add(u64::from(insn.len));
    let user = sregs.cs.dpl == 3;
    let requested = (regs.rdx << 32) | (regs.rax & 0xffff_ffff);
    let rfbm = xcr0 & requested;

    let outcome = match (insn.op, insn.mem) {
        (Op::GetBv, _) => {
            if regs.rcx & 0xffff_ffff == 0 {
                regs.rax = xcr0 & 0xffff_ffff;
                regs.rdx = xcr0 >> 32;
                Ok(())
            } else {
                Err(Fault::Gp) // XCR 1 (XINUSE) is not offered: no XGETBV1
            }
        }
        (Op::Save, Some(operand)) => save(
            fd,
            mem,
            operand.address(&regs, &sregs, next_rip),
            rfbm,
            user,
        )?,
        (Op::Restore, Some(operand)) => restore(
            fd,
            mem,
            operand.address(&regs, &sregs, next_rip),
            rfbm,
            xcr0,
            user,
        )?,
        (_, None) => Err(Fault::Gp),
    };
    match outcome {
        Ok(()) => {
            regs.rip = next_rip;
            kvm(op, "KVM_SET_REGS", fd.set_regs(&regs))
        }
        Err(fault) => {
            log::debug!("{op:?} at {:#x} raises {fault:?}", regs.rip);
            inject(fd, op, sregs, fault)
        }
    }
}

/// An XSAVE area in guest memory: where it lies and what it holds.
struct Area {
    /// Guest-physical address and length of each page's part.
    pieces: Vec<(u64, usize)>,
    bytes: Vec<u8>,
}

/// The XSAVE area at `addr` for the components in `rfbm`: its
/// guest-physical pieces and its current bytes, or the fault an access to
/// it raises (#GP unless 64-byte aligned and in RAM; #PF from the page
/// tables, for a `write` access if the instruction writes it).
fn read_area(
    fd: &VcpuFd,
    mem: &GuestMemory,
    op: Op,
    addr: u64,
    rfbm: u64,
    user: bool,
) -> Result<Result<Area, Fault>, XsaveError> {
    if addr % 64 != 0 {
        return Ok(Err(Fault::Gp));
    }
    let len = area_len(rfbm);
    let pieces = match translate(fd, op, addr, len, op == Op::Save, user)? {
        Ok(p) => p,
        Err(fault) => return Ok(Err(fault)),
    };
    let mut bytes = vec![0u8; len];
    if !read_pieces(mem, &pieces, &mut bytes) {
        return Ok(Err(Fault::Gp));
    }
    Ok(Ok(Area { pieces, bytes }))
}

fn save(
    fd: &VcpuFd,
    mem: &GuestMemory,
    addr: u64,
    rfbm: u64,
    user: bool,
) -> Result<Result<(), Fault>, XsaveError> {
    let op = Op::Save;
    let Area {
        pieces,
        bytes: mut area,
    } = match read_area(fd, mem, op, addr, rfbm, user)? {
        Ok(read) => read,
        Err(fault) => return Ok(Err(fault)),
    };
    let state = kvm(op, "KVM_GET_XSAVE", fd.get_xsave())?;
    let regs = region_bytes(&state);
    let in_use = u64_at(regs, HEADER);
    for i in mask_bits(rfbm) {
        // A component in its initial state may be left unwritten; its
        // XSTATE_BV bit (0) says so.
        if i < 2 || in_use & (1 << i) != 0 {
            set_component(&mut area, Some(regs), i);
        }
    }
    if rfbm & (XFEATURE_SSE | XFEATURE_YMM) != 0 {
        area[MXCSR..MXCSR_MASK + 4].copy_from_slice(&regs[MXCSR..MXCSR_MASK + 4]);
    }
    let old_bv = u64_at(&area, HEADER);
    let bv = (old_bv & !rfbm) | (in_use & rfbm) | (rfbm & (XFEATURE_FP | XFEATURE_SSE));
    area[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
    if !write_pieces(mem, &pieces, &area) {
        return Ok(Err(Fault::Gp));
    }
    Ok(Ok(()))
}

fn restore(
    fd: &VcpuFd,
    mem: &GuestMemory,
    addr: u64,
    rfbm: u64,
    xcr0: u64,
    user: bool,
) -> Result<Result<(), Fault>, XsaveError> {
    let op = Op::Restore;
    let area = match read_area(fd, mem, op, addr, rfbm, user)? {
        Ok(read) => read.bytes,
        Err(fault) => return Ok(Err(fault)),
    };
    let header = &area[HEADER..HEADER + HEADER_LEN];
    let bv = u64_at(header, 0);
    // Standard form only (XCOMP_BV 0, no XSAVEC offered), reserved bytes
    // zero, and no component the guest has not enabled: else #GP, as the
    // guest kernel relies on for signal frames a user program handed back.
    if header[8..].iter().any(|&b| b != 0) || bv & !xcr0 != 0 {
        return Ok(Err(Fault::Gp));
    }
    let mut state = kvm(op, "KVM_GET_XSAVE", fd.get_xsave())?;
    let regs = region_bytes_mut(&mut state);
    if rfbm & (XFEATURE_SSE | XFEATURE_YMM) != 0 {
        let mask = match u32_at(regs, MXCSR_MASK) {
            0 => DEFAULT_MXCSR_MASK,
            m => m,
        };
        if u32_at(&area, MXCSR) & !mask != 0 {
            return Ok(Err(Fault::Gp));
        }
        regs[MXCSR..MXCSR + 4].copy_from_slice(&area[MXCSR..MXCSR + 4]);
    }
    for i in mask_bits(rfbm) {
        let from = (bv & (1 << i) != 0).then_some(area.as_slice());
        set_component(regs, from, i);
    }
    let old_bv = u64_at(regs, HEADER);
    let new_bv = (old_bv & !rfbm) | (bv & rfbm) | (rfbm & (XFEATURE_FP | XFEATURE_SSE));
    regs[HEADER..HEADER + 8].copy_from_slice(&new_bv.to_le_bytes());
    regs[HEADER + 8..HEADER + HEADER_LEN].fill(0);
    // SAFETY: `state` is a whole `kvm_xsave` (4 KiB) as `KVM_GET_XSAVE` gave
    // it; this host's XSAVE area fits in it, or `KVM_GET_XSAVE` would have
    // failed (KVM asks for `KVM_GET_XSAVE2` then).
    match unsafe { fd.set_xsave(&state) } {
        Ok(()) => Ok(Ok(())),
        // KVM refuses state the CPU would refuse: the guest gets the #GP.
        Err(e) if e.errno() == libc::EINVAL => Ok(Err(Fault::Gp)),
        Err(source) => Err(XsaveError::Kvm {
            op,
            what: "KVM_SET_XSAVE",
            source,
        }),
    }
}

/// Raises `fault` in the guest at the faulting instruction.
fn inject(fd: &VcpuFd, op: Op, mut sregs: kvm_sregs, fault: Fault) -> Result<(), XsaveError> {
    let (vector, error_code) = match fault {
        Fault::Gp => (GP_VECTOR, 0),
        Fault::Pf {
            address,
            error_code,
        } => {
            sregs.cr2 = address;
            kvm(op, "KVM_SET_SREGS", fd.set_sregs(&sregs))?;
            (PF_VECTOR, error_code)
        }
    };
    let mut events = kvm(op, "KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?;
    events.exception.injected = 1;
    events.exception.nr = vector;
    events.exception.has_error_code = 1;
    events.exception.error_code = error_code;
    kvm(op, "KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem(segment: Segment, base: Option<u8>, index: Option<(u8, u8)>, disp: i32) -> MemOperand {
        MemOperand {
            segment,
            base,
            index,
            disp,
            rip_relative: false,
        }
    }

    #[test]
    fn decodes_the_forms_the_kernel_uses() {
        // xsave64 (%rdi)
        let i = decode(&[0x48, 0x0f, 0xae, 0x27, 0x90]).unwrap();
        assert_eq!((i.op, i.len), (Op::Save, 4));
        assert_eq!(i.mem, Some(mem(Segment::Flat, Some(7), None, 0)));
        // xrstor64 0x40(%r12)  (REX.WB, SIB base r12, disp8)
        let i = decode(&[0x49, 0x0f, 0xae, 0x6c, 0x24, 0x40]).unwrap();
        assert_eq!((i.op, i.len), (Op::Restore, 6));
        assert_eq!(i.mem, Some(mem(Segment::Flat, Some(12), None, 0x40)));
        // xsave (%rax,%rcx,8) with a GS override and disp32
        let i = decode(&[0x65, 0x0f, 0xae, 0xa4, 0xc8, 0x00, 0x01, 0x00, 0x00]).unwrap();
        assert_eq!((i.op, i.len), (Op::Save, 9));
        assert_eq!(i.mem, Some(mem(Segment::Gs, Some(0), Some((1, 8)), 0x100)));
        // xrstor -8(%rip)
        let i = decode(&[0x0f, 0xae, 0x2d, 0xf8, 0xff, 0xff, 0xff]).unwrap();
        assert_eq!((i.op, i.len), (Op::Restore, 7));
        assert!(i.mem.unwrap().rip_relative);
        assert_eq!(i.mem.unwrap().disp, -8);
        // xgetbv
        let i = decode(&[0x0f, 0x01, 0xd0]).unwrap();
        assert_eq!((i.op, i.len, i.mem), (Op::GetBv, 3, None));
    }

    #[test]
    fn leaves_other_instructions_alone() {
        for bytes in [
            &[0xcc][..],                   // int3
            &[0x0f, 0xae, 0xe8],           // lfence
            &[0x0f, 0xae, 0x07],           // fxsave (%rdi)
            &[0x0f, 0xae, 0x37],           // xsaveopt (%rdi)
            &[0x0f, 0xc7, 0x2f],           // xsaves (%rdi)
            &[0x0f, 0x01, 0xd1],           // xsetbv (KVM emulates it)
            &[0x48, 0x0f, 0xae],           // truncated
            &[0x0f, 0xae, 0xa4, 0xc8],     // SIB without its disp32
            &[0x65, 0x65, 0x65, 0x65][..], // prefixes only
            &[][..],
        ] {
            assert_eq!(decode(bytes), None, "{bytes:02x?}");
        }
    }

    #[test]
    fn effective_addresses() {
        let regs = kvm_regs {
            rax: 0x1000,
            rcx: 2,
            r12: 0xffff_8880_0000_0000,
            rip: 0x10,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.gs.base = 0x50_0000;
        let m = mem(Segment::Gs, Some(0), Some((1, 8)), -0x10);
        assert_eq!(
            m.address(&regs, &sregs, 0x20),
            0x50_0000 + 0x1000 + 16 - 0x10
        );
        let m = mem(Segment::Flat, Some(12), None, 0x40);
        assert_eq!(m.address(&regs, &sregs, 0x20), 0xffff_8880_0000_0040);
        let rip = MemOperand {
            rip_relative: true,
            ..mem(Segment::Flat, None, None, 0x100)
        };
        assert_eq!(rip.address(&regs, &sregs, 0x20), 0x120);
    }

    #[test]
    fn components_and_init_state() {
        let mut to = vec![0xaau8; area_len(0xff)];
        set_component(&mut to, None, 0);
        assert_eq!(&to[..2], &X87_INIT_FCW.to_le_bytes());
        assert!(to[2..24].iter().all(|&b| b == 0));
        assert!(to[ST_REGS].iter().all(|&b| b == 0));
        assert!(
            to[MXCSR..MXCSR + 4].iter().all(|&b| b == 0xaa),
            "MXCSR is not x87 state"
        );
        let from = vec![0x55u8; to.len()];
        set_component(&mut to, Some(&from), 1);
        assert!(to[XMM_REGS].iter().all(|&b| b == 0x55));
        assert!(area_len(XFEATURE_FP | XFEATURE_SSE) == HEADER + HEADER_LEN);
    }
}
