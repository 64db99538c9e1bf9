//! Guest-physical memory map of an x86_64 microVM.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT
//! 0x0000_7000  zero page      0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4           0x0000_a000  PDPT   0x0000_b000  PD
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP table
//! 0x0010_0000  kernel (ELF vmlinux loads at its own physical address)
//! 0xd000_0000  virtio-mmio devices, 4 KiB each     (MMIO gap up to 4 GiB)
//! 0xfec0_0000  IOAPIC         0xfee0_0000  LAPIC
//! 4 GiB ..     RAM above the gap
//! ```

/// Where the boot GDT is written.
pub const GDT_START: u64 = 0x500;
/// Where the (empty) boot IDT is written.
pub const IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages covering the first GiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we pass (the kernel's COMMAND_LINE_SIZE on x86).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The boot protocol's `setup_data` list (an RNG seed), after the command line.
pub const SETUP_DATA_START: u64 = CMDLINE_START + CMDLINE_MAX_SIZE as u64;
/// Start of the extended BIOS data area; the MP table lives here.
pub const EBDA_START: u64 = 0x9fc00;
/// The first byte of "high" memory, where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Base of the first virtio-mmio device window.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The first GSI handed to virtio devices (0-4 are legacy: timer, i8042, cascade, COM2, COM1).
pub const IRQ_BASE: u32 = 5;
/// The last GSI the IOAPIC has.
pub const IRQ_MAX: u32 = 23;
/// TSS address for `KVM_SET_TSS_ADDR` (three pages inside the gap).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// GSI of COM1.
pub const COM1_IRQ: u32 = 4;

/// The RAM ranges of a guest of `mem_size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_split_around_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
