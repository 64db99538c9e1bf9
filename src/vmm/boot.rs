//! Direct kernel boot with the Linux 64-bit boot protocol: load an ELF
//! `vmlinux`, write the command line, the zero page with its e820 map, the
//! identity page tables and a flat GDT, and put the boot vCPU in long mode at
//! the kernel's entry point.

use std::fs::File;
use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::Elf;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::*;
use super::memory::GuestMemory;

/// Errors preparing the guest for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file does not exist or cannot be opened.
    #[error(
        "cannot open the guest kernel {path}: {source}; build the guest image first (see README)"
    )]
    KernelOpen {
        /// The kernel path.
        path: std::path::PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is not a loadable x86_64 ELF `vmlinux`.
    #[error("{path} is not a loadable x86_64 ELF vmlinux: {reason}")]
    KernelLoad {
        /// The kernel path.
        path: std::path::PathBuf,
        /// The loader's complaint.
        reason: String,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// The host's random number source could not be read.
    #[error("cannot read /dev/urandom for the guest's RNG seed: {source}")]
    Entropy {
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Writing boot structures into guest memory failed (memory too small?).
    #[error("cannot write boot data into guest memory (is the memory size too small?): {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Where the kernel was loaded.
#[derive(Debug, Clone, Copy)]
pub struct KernelEntry {
    /// Guest-physical address of the 64-bit entry point.
    pub entry: u64,
}

/// Loads an ELF vmlinux into guest memory.
pub fn load_kernel(mem: &GuestMemory, path: &Path) -> Result<KernelEntry, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_path_buf(),
        source,
    })?;
    let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(|e| {
        BootError::KernelLoad {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    Ok(KernelEntry {
        entry: res.kernel_load.0,
    })
}

/// Builds a command line from its parts, validating length and characters.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for part in parts.iter().filter(|p| !p.trim().is_empty()) {
        cmdline
            .insert_str(part.trim())
            .map_err(|e| BootError::Cmdline(format!("{part:?}: {e}")))?;
    }
    Ok(cmdline)
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct BootParams(boot_params);

// SAFETY: boot_params is a packed, repr(C) plain-old-data struct of integers
// and arrays of integers: every byte pattern is a valid value and it has no padding.
unsafe impl ByteValued for BootParams {}

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Writes the command line and the zero page (with the e820 map of `mem`).
pub fn write_boot_params(mem: &GuestMemory, cmdline: &Cmdline) -> Result<(), BootError> {
    let cmdline_c = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let bytes = cmdline_c.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))?;

    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = bytes.len() as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.setup_data = write_rng_seed(mem)?;

    let mut e820 = vec![(0u64, EBDA_START)];
    let last_addr = mem.last_addr().0 + 1;
    for region_start in [HIMEM_START, MMIO_GAP_END] {
        let region_end = if region_start == HIMEM_START {
            last_addr.min(MMIO_GAP_START)
        } else {
            last_addr
        };
        if region_end > region_start {
            e820.push((region_start, region_end - region_start));
        }
    }
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(BootParams(params), GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// `SETUP_RNG_SEED` (arch/x86/include/uapi/asm/bootparam.h).
const SETUP_RNG_SEED: u32 = 9;
/// Bytes of seed handed to the guest.
const RNG_SEED_LEN: usize = 32;

/// Writes a `setup_data` node with a seed for the guest's RNG from the
/// host's and returns its address. The guest mixes it into its pool; it
/// credits it (so that its CRNG is ready at once instead of after a minute of
/// emulated entropy gathering on PVM) only if built with
/// `CONFIG_RANDOM_TRUST_BOOTLOADER`: the kernel reads `setup_data` before it
/// parses `random.trust_bootloader=`.
fn write_rng_seed(mem: &GuestMemory) -> Result<u64, BootError> {
    let mut seed = [0u8; RNG_SEED_LEN];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map_err(|source| BootError::Entropy { source })?;
    // struct setup_data { u64 next; u32 type; u32 len; u8 data[]; }
    let mut node = Vec::with_capacity(16 + RNG_SEED_LEN);
    node.extend_from_slice(&0u64.to_le_bytes());
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(RNG_SEED_LEN as u32).to_le_bytes());
    node.extend_from_slice(&seed);
    mem.write_slice(&node, GuestAddress(SETUP_DATA_START))?;
    Ok(SETUP_DATA_START)
}

/// A GDT entry from flags, base and limit (as in the Intel SDM, vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Writes the boot GDT, IDT and identity page tables, and sets the special
/// registers of the boot vCPU for 64-bit mode.
pub fn setup_sregs(mem: &GuestMemory, sregs: &mut kvm_sregs) -> Result<(), BootError> {
    let gdt = [
        gdt_entry(0, 0, 0),            // NULL
        gdt_entry(0xa09b, 0, 0xfffff), // CODE: 64-bit, present, execute/read
        gdt_entry(0xc093, 0, 0xfffff), // DATA: present, read/write
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + (i as u64) * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    // Identity-map the first GiB with 2 MiB pages.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// General registers of the boot vCPU: entry point, stack, zero page in `rsi`.
pub fn boot_regs(entry: KernelEntry) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry.entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// The x87/SSE state Linux expects at boot.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_segments_decode_as_64bit_flat() {
        let code = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.l, 1);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 8);
        assert_eq!(code.present, 1);
        let data = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(data.db, 1);
        assert_eq!(data.type_, 3);
    }

    #[test]
    fn missing_kernel_is_a_typed_error() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(err, BootError::KernelOpen { .. }), "{err}");
    }

    #[test]
    fn garbage_kernel_is_a_typed_error() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let err = load_kernel(&mem, &path).unwrap_err();
        assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
    }

    #[test]
    fn zero_page_has_e820_and_cmdline() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let cmdline = build_cmdline(&["console=ttyS0", "reboot=k"]).unwrap();
        write_boot_params(&mem, &cmdline).unwrap();
        let params: BootParams = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let p = params.0;
        assert_eq!({ p.e820_entries }, 2);
        let e1 = p.e820_table[1];
        assert_eq!({ e1.addr }, HIMEM_START);
        assert_eq!({ e1.size }, (64 << 20) - HIMEM_START);
        let mut buf = [0xffu8; 23];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf[..22], b"console=ttyS0 reboot=k");
        assert_eq!(buf[22], 0);
    }
}
