//! Guest memory: anonymous mappings (fresh boot) or private mappings of a
//! snapshot file (resume), with a bitmap of pages written by the VMM itself.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as seen by the VMM and its devices. Pages written by devices
/// are recorded in the bitmap (KVM's dirty log only sees vCPU writes).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::layout::ram_ranges;

/// Guest page size.
pub const PAGE_SIZE: usize = 4096;

/// What [`save_to_file`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaveStats {
    /// Bytes of guest memory (the file's length).
    pub total: u64,
    /// Bytes written (pages that are not all zero).
    pub written: u64,
    /// The [`PageDigest`] of the pages written.
    pub digest: u32,
}

/// A CRC-32 of pages with their page numbers (a page moved within a file
/// changes it too), in increasing page order: what [`save_pages`] writes,
/// [`load_pages`] reads back, or a reader of a memory file's non-zero
/// pages sees.
#[derive(Debug, Default, Clone)]
pub struct PageDigest(crc32fast::Hasher);

impl PageDigest {
    /// Adds page number `page` with its bytes.
    pub fn add(&mut self, page: u64, bytes: &[u8]) {
        self.0.update(&page.to_le_bytes());
        self.0.update(bytes);
    }

    /// The digest of the pages added.
    pub fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// Whether a page (or any byte slice) is all zeros.
pub fn is_zero_page(page: &[u8]) -> bool {
    is_zero(page)
}

fn is_zero(page: &[u8]) -> bool {
    // Compare in 8-byte words: this runs over all of guest memory.
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; `align_to` only
        // reinterprets the aligned middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes guest memory to `file`, its regions one after another in address
/// order, leaving all-zero pages as holes (never-touched memory costs no
/// disk), and sets the file's length to the memory size. Call only while
/// nothing writes guest memory (vCPUs and device workers stopped), to a new,
/// empty file (never one guest memory is mapped from). The caller syncs it.
pub fn save_to_file(mem: &GuestMemory, file: &File) -> io::Result<SaveStats> {
    save_pages(mem, file, None, true)
}

/// Like [`save_to_file`], but writes only the pages whose bit is set in
/// `pages` (one bit per page in file order, as `Vm::take_dirty_pages`
/// gives), or every page if `None`. All-zero pages are skipped (left as
/// holes) if `skip_zero`; a layer over older data must keep them.
pub fn save_pages(
    mem: &GuestMemory,
    file: &File,
    pages: Option<&[u64]>,
    skip_zero: bool,
) -> io::Result<SaveStats> {
    let mut stats = SaveStats::default();
    let mut digest = PageDigest::default();
    let wanted = |page: usize| {
        pages.is_none_or(|bits| {
            bits.get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        })
    };
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by
        // `mem`, which outlives this borrow; the caller guarantees nothing
        // writes guest memory meanwhile, so reading it as a byte slice is
        // sound.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len) };
        let base = stats.total;
        let first_page = (base / PAGE_SIZE as u64) as usize;
        let mut run: Option<usize> = None; // start of a run of pages to write
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            let at = i * PAGE_SIZE;
            let write = wanted(first_page + i) && !(skip_zero && is_zero(page));
            if write {
                digest.add((first_page + i) as u64, page);
            }
            match (write, run) {
                (true, None) => run = Some(at),
                (false, Some(start)) => {
                    file.write_all_at(&bytes[start..at], base + start as u64)?;
                    stats.written += (at - start) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            file.write_all_at(&bytes[start..], base + start as u64)?;
            stats.written += (len - start) as u64;
        }
        stats.total += len as u64;
    }
    file.set_len(stats.total)?;
    stats.digest = digest.finish();
    Ok(stats)
}

/// Copies the pages whose bit is set in `pages` from `file` (a layer
/// written by [`save_pages`]) into guest memory; returns the bytes copied
/// and their [`PageDigest`]. Call before the vCPUs start.
pub fn load_pages(mem: &GuestMemory, file: &File, pages: &[u64]) -> io::Result<(u64, u32)> {
    let mut copied = 0;
    let mut digest = PageDigest::default();
    let mut base = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live, writable mapping of `len` bytes owned
        // by `mem`; nothing else accesses guest memory before the vCPUs and
        // devices start, which the caller guarantees.
        let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len) };
        let first_page = (base / PAGE_SIZE as u64) as usize;
        let count = len / PAGE_SIZE;
        let set = |i: usize| {
            let page = first_page + i;
            pages
                .get(page / 64)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
        };
        let mut i = 0;
        while i < count {
            if !set(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < count && set(i) {
                i += 1;
            }
            let range = start * PAGE_SIZE..i * PAGE_SIZE;
            file.read_exact_at(&mut bytes[range.clone()], base + range.start as u64)?;
            for (k, page) in bytes[range.clone()].chunks(PAGE_SIZE).enumerate() {
                digest.add((first_page + start + k) as u64, page);
            }
            copied += range.len() as u64;
        }
        base += len as u64;
    }
    Ok((copied, digest.finish()))
}

/// Maps `file` (as written by [`save_to_file`]) as `mem_size` bytes of
/// guest memory, privately: pages load lazily on first access and guest
/// writes never reach the file.
pub fn map_file(file: &File, mem_size: u64) -> Result<GuestMemory, String> {
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot stat the memory file: {e}"))?
        .len();
    if file_len != mem_size {
        return Err(format!(
            "the memory file holds {file_len} bytes, the machine has {mem_size}"
        ));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(mem_size) {
        let fd = file
            .try_clone()
            .map_err(|e| format!("cannot duplicate the memory file descriptor: {e}"))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(fd, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| format!("cannot map {len} bytes of the memory file: {e}"))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| format!("guest region at {start:#x} overflows"))?;
        regions.push(region);
        offset += len;
    }
    GuestMemory::from_regions(regions).map_err(|e| format!("invalid guest memory layout: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn saved_memory_maps_back_with_holes_for_zero_pages() {
        let size = 8 << 20;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[7u8; 5000], GuestAddress(0x7ff000 - 904))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let stats = save_to_file(&mem, &file).unwrap();
        assert_eq!(stats.total, size as u64);
        assert_eq!(stats.written, 3 * PAGE_SIZE as u64);
        let back = map_file(&file, size as u64).unwrap();
        let mut buf = [0u8; 5];
        back.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"hello");
        let mut big = vec![0u8; 5000];
        back.read_slice(&mut big, GuestAddress(0x7ff000 - 904))
            .unwrap();
        assert!(big.iter().all(|&b| b == 7));
        // Private: writes do not reach the file.
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 5];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(&on_disk, b"hello");
        // The wrong size is refused.
        assert!(map_file(&file, 4 << 20).is_err());

        // A layer: only the marked pages, zero ones included, land on top.
        mem.write_slice(&[0u8; 5], GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"layer", GuestAddress(0x3000)).unwrap();
        let mut pages = vec![0u64; size / PAGE_SIZE / 64];
        pages[0] = 0b1010; // pages 1 and 3
        let layer_path = dir.path().join("layer");
        let layer = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&layer_path)
            .unwrap();
        let stats = save_pages(&mem, &layer, Some(&pages), false).unwrap();
        assert_eq!(stats.written, 2 * PAGE_SIZE as u64);
        let back = map_file(&file, size as u64).unwrap();
        assert_eq!(
            load_pages(&back, &layer, &pages).unwrap(),
            (2 * PAGE_SIZE as u64, stats.digest),
            "the pages read back have the digest of the pages written"
        );
        back.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(buf, [0; 5]);
        back.read_slice(&mut buf, GuestAddress(0x3000)).unwrap();
        assert_eq!(&buf, b"layer");
        back.read_slice(&mut big, GuestAddress(0x7ff000 - 904))
            .unwrap();
        assert!(big.iter().all(|&b| b == 7));
    }
}
