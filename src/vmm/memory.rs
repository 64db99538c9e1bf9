//! Guest memory: anonymous mappings (fresh boot) or private mappings of a
//! snapshot file (resume), with a bitmap of pages written by the VMM itself.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as seen by the VMM and its devices. Pages written by devices
/// are recorded in the bitmap (KVM's dirty log only sees vCPU writes).
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

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
/// [`layer_digest`] reads back, or a reader of a memory file's non-zero
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
    save_pages(mem, file, None)
}

/// Like [`save_to_file`], but writes only the pages whose bit is set in
/// `pages` (one bit per page in file order, as `Vm::take_dirty_pages`
/// gives), or every page if `None`: a new base. (Layers are packed, see
/// [`save_layer`].)
pub fn save_pages(mem: &GuestMemory, file: &File, pages: Option<&[u64]>) -> io::Result<SaveStats> {
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
            let write = wanted(first_page + i) && !is_zero(page);
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

/// Writes the pages whose bit is set in `pages` (one bit per page in file
/// order, as `Vm::take_dirty_pages` gives) to the new, empty file `file` as
/// a packed layer: one after another in page order, so the file holds
/// exactly those pages and a pause writes them in a few large requests
/// however scattered they are in guest memory. Uses direct I/O where the
/// file system has it (guest memory is page-aligned: no copy into the page
/// cache), computing the digest meanwhile. Zero pages are written too (a
/// layer covers older data). Call only while nothing writes guest memory;
/// the caller syncs the file. `total` in the result is the memory size.
pub fn save_layer(mem: &GuestMemory, file: &File, pages: &[u64]) -> io::Result<SaveStats> {
    let total_pages = mem.iter().map(|r| r.len() as usize / PAGE_SIZE).sum();
    let mut segments: Vec<(usize, &[u8])> = Vec::new();
    for (run, _) in LayerPages::from_bitmap(pages, total_pages, true).runs() {
        let mut page = run.start;
        while page < run.end {
            let (_, region, first_page) = region_of(mem, page)?;
            let stop = run.end.min(first_page + region.len() as usize / PAGE_SIZE);
            // SAFETY: pages `page..stop` lie within the region, a live
            // mapping owned by `mem`, which outlives this borrow; the caller
            // guarantees nothing writes guest memory meanwhile.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    region
                        .as_ptr()
                        .add((page - first_page) * PAGE_SIZE)
                        .cast_const(),
                    (stop - page) * PAGE_SIZE,
                )
            };
            segments.push((page, bytes));
            page = stop;
        }
    }
    let direct = crate::fsutil::set_direct_io(file, true).is_ok();
    if !direct {
        log::debug!("no direct I/O for memory layers here: writing through the page cache");
    }
    let bufs: Vec<&[u8]> = segments.iter().map(|&(_, bytes)| bytes).collect();
    let (digest, written) = std::thread::scope(|scope| {
        let digest = scope.spawn(|| {
            let mut digest = PageDigest::default();
            for &(first, bytes) in &segments {
                for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
                    digest.add((first + i) as u64, page);
                }
            }
            digest.finish()
        });
        let written = crate::fsutil::write_all_vectored_at(file, &bufs, 0);
        let digest = digest
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (digest, written)
    });
    written?;
    if direct {
        // The caller gets the file as it gave it (reads need no alignment).
        crate::fsutil::set_direct_io(file, false)?;
    }
    Ok(SaveStats {
        total: (total_pages * PAGE_SIZE) as u64,
        written: bufs.iter().map(|b| b.len() as u64).sum(),
        digest,
    })
}

/// Where a memory layer's pages are: runs of consecutive guest pages, in
/// page order, each with the offset of its first page in the layer file.
/// Its size follows the runs, not the size of guest memory: a resume of a
/// large guest that dirtied little reads little.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerPages {
    runs: Vec<(Range<usize>, u64)>,
    count: usize,
}

impl LayerPages {
    /// The pages of a layer from its page bitmap (one bit per page, bits
    /// beyond `total_pages` ignored), see [`LayerPagesBuilder`].
    pub fn from_bitmap(bitmap: &[u64], total_pages: usize, packed: bool) -> LayerPages {
        let mut builder = LayerPagesBuilder::new(total_pages, packed);
        bitmap.iter().for_each(|&word| builder.push(word));
        builder.finish()
    }

    /// The runs, in page order, with the file offset of each first page.
    pub fn runs(&self) -> &[(Range<usize>, u64)] {
        &self.runs
    }

    /// How many pages the layer holds.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Makes [`LayerPages`] from a page bitmap read one 64-bit word at a time
/// (bit `i` of word `w`: page `64 w + i`), so that a large bitmap need not
/// be held whole.
pub struct LayerPagesBuilder {
    total_pages: usize,
    packed: bool,
    next_page: usize,
    pages: LayerPages,
}

impl LayerPagesBuilder {
    /// For guest memory of `total_pages` pages. `packed`: the layer's
    /// pages lie one after another in its file ([`save_layer`]), rather
    /// than each at its own offset ([`save_pages`], layers of earlier
    /// versions).
    pub fn new(total_pages: usize, packed: bool) -> LayerPagesBuilder {
        LayerPagesBuilder {
            total_pages,
            packed,
            next_page: 0,
            pages: LayerPages::default(),
        }
    }

    /// Adds the next word of the bitmap.
    pub fn push(&mut self, word: u64) {
        let base = self.next_page;
        self.next_page += 64;
        let valid = self.total_pages.saturating_sub(base).min(64);
        let word = if valid == 64 {
            word
        } else {
            word & ((1u64 << valid) - 1)
        };
        let mut bit = 0;
        while bit < 64 && word >> bit != 0 {
            bit += (word >> bit).trailing_zeros() as usize;
            let ones = (!(word >> bit)).trailing_zeros() as usize;
            let start = base + bit;
            let offset = if self.packed {
                (self.pages.count * PAGE_SIZE) as u64
            } else {
                (start * PAGE_SIZE) as u64
            };
            match self.pages.runs.last_mut() {
                // Continues the last run (in the file too, packed or not).
                Some((run, _)) if run.end == start => run.end += ones,
                _ => self.pages.runs.push((start..start + ones, offset)),
            }
            self.pages.count += ones;
            bit += ones;
        }
    }

    /// The pages pushed.
    pub fn finish(self) -> LayerPages {
        self.pages
    }
}

/// One memory layer over the base, as a resume reads it.
#[derive(Debug, Clone, Copy)]
pub struct Layer<'a> {
    /// The layer's file.
    pub file: &'a File,
    /// Where its pages are.
    pub pages: &'a LayerPages,
}

impl Layer<'_> {
    /// The runs of the layer's pages that are not in `hidden` (sorted,
    /// disjoint page ranges: those of newer layers), each with the file
    /// offset of its first page, in page order.
    fn visible_runs(&self, hidden: &[Range<usize>]) -> Vec<(Range<usize>, u64)> {
        let mut visible = Vec::with_capacity(self.pages.runs.len());
        let mut h = 0;
        for (run, offset) in &self.pages.runs {
            let mut page = run.start;
            while page < run.end {
                // Skip the hidden ranges that end before this page.
                while h < hidden.len() && hidden[h].end <= page {
                    h += 1;
                }
                let stop = match hidden.get(h) {
                    Some(next) if next.start <= page => {
                        page = next.end.min(run.end);
                        continue;
                    }
                    Some(next) => next.start.min(run.end),
                    None => run.end,
                };
                visible.push((page..stop, offset + ((page - run.start) * PAGE_SIZE) as u64));
                page = stop;
            }
        }
        visible
    }
}

/// The union of two sets of sorted, disjoint page ranges, likewise.
fn union(a: &[Range<usize>], b: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut all: Vec<Range<usize>> = a.iter().cloned().chain(b).collect();
    all.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(all.len());
    for range in all {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// At most this many runs of a resume's memory layers are mapped (each
/// mapping is a VMA, and a process has ~65530 of them for all its
/// sandboxes); the shorter runs beyond it are copied.
pub const MAX_MAPPED_RUNS: usize = 1024;

/// Runs shorter than this many pages are copied, not mapped: a mapping
/// costs a VMA and a page fault per page anyway.
const MIN_MAPPED_RUN: usize = 16;

/// What [`map_layers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Bytes mapped from layer files (loaded lazily, on first access).
    pub mapped: u64,
    /// Bytes copied from layer files now.
    pub copied: u64,
    /// Mappings made.
    pub runs_mapped: usize,
    /// Bytes of short runs left to load on first access (see
    /// [`super::lazy`]).
    pub lazy: u64,
    /// Windows of guest memory loaded on first access.
    pub windows: usize,
}

/// How [`map_layers`] loads the runs it does not map.
#[derive(Debug, Clone, Copy)]
pub enum Loading<'a> {
    /// Copies them now.
    Now,
    /// Loads them on first access where the host has a userfaultfd (see
    /// [`super::lazy`]; pages between them come from `base`, the file
    /// the memory is mapped from), else copies them now.
    Lazily {
        /// The base memory file.
        base: &'a File,
        /// Where a page that cannot be read then is reported.
        failure: &'a Arc<super::lazy::LoadFailure>,
    },
}

/// At most this many windows of guest memory are loaded on first access
/// (each is a VMA); the short runs beyond them are copied.
pub const MAX_LAZY_WINDOWS: usize = 1024;

/// Short runs at most this many pages apart share a window (the base
/// pages between them are then loaded through it too, no longer shared
/// with the base file's page cache).
const MAX_WINDOW_GAP: usize = 512;

/// A short run of a layer (within one region) that is not mapped.
#[derive(Clone)]
struct ShortRun {
    layer: usize,
    /// Guest pages, counted across regions.
    pages: std::ops::Range<usize>,
    /// Host address of the first page.
    addr: *mut u8,
    /// Offset of the first page in the layer file.
    offset: u64,
    region: usize,
}

/// Puts the pages of memory layers (see [`Layer`]) over guest memory
/// `mem`, each page from the newest layer that holds it: long runs of pages
/// are mapped privately from the layer file (`MAP_FIXED`: they load lazily,
/// like the base), at most [`MAX_MAPPED_RUNS`] of them, the longest; the
/// short ones are loaded as `loading` says. Nothing is read to check the
/// data: see [`layer_digest`]. Call before the vCPUs and devices start.
pub fn map_layers(
    mem: &GuestMemory,
    layers: &[Layer<'_>],
    loading: Loading<'_>,
) -> io::Result<LayerStats> {
    // Only the pages no newer layer holds: newest first, each hiding its
    // pages from the older ones. What is left does not overlap.
    let mut hidden: Vec<Range<usize>> = Vec::new();
    let mut all: Vec<Vec<(Range<usize>, u64)>> = Vec::with_capacity(layers.len());
    for layer in layers.iter().rev() {
        all.push(layer.visible_runs(&hidden));
        hidden = union(&hidden, layer.pages.runs.iter().map(|(r, _)| r.clone()));
    }
    all.reverse();
    // The shortest run that is mapped: the longest runs fill the budget.
    let mut lengths: Vec<usize> = all.iter().flatten().map(|(r, _)| r.len()).collect();
    lengths.sort_unstable_by(|a, b| b.cmp(a));
    let min_mapped = lengths
        .get(MAX_MAPPED_RUNS)
        .map_or(MIN_MAPPED_RUN, |&l| (l + 1).max(MIN_MAPPED_RUN));

    let mut stats = LayerStats::default();
    let mut mapped_runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut short: Vec<ShortRun> = Vec::new();
    for (index, (layer, runs)) in layers.iter().zip(&all).enumerate() {
        for (run, run_offset) in runs {
            let (mut page, end) = (run.start, run.end);
            // A run may cross from one region into the next.
            while page < end {
                let (region_index, region, first_page) = region_of(mem, page)?;
                let region_pages = region.len() as usize / PAGE_SIZE;
                let stop = end.min(first_page + region_pages);
                let offset = (page - first_page) * PAGE_SIZE;
                let len = (stop - page) * PAGE_SIZE;
                let file_offset = run_offset + ((page - run.start) * PAGE_SIZE) as u64;
                // SAFETY: `offset + len` lies within the region, a live
                // mapping owned by `mem`; nothing accesses guest memory
                // before the vCPUs and devices start (the caller's promise).
                let target = unsafe { region.as_ptr().add(offset) };
                if run.len() >= min_mapped && stats.runs_mapped < MAX_MAPPED_RUNS {
                    // SAFETY: maps over part of `mem`'s own mapping (MAP_FIXED
                    // replaces those pages only), privately, from a file we
                    // hold open; `mem` unmaps the whole range when dropped.
                    let mapped = unsafe {
                        libc::mmap(
                            target.cast(),
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                            std::os::fd::AsRawFd::as_raw_fd(layer.file),
                            file_offset as libc::off_t,
                        )
                    };
                    if mapped == libc::MAP_FAILED {
                        return Err(io::Error::last_os_error());
                    }
                    stats.mapped += len as u64;
                    stats.runs_mapped += 1;
                    mapped_runs.push(page..stop);
                } else {
                    short.push(ShortRun {
                        layer: index,
                        pages: page..stop,
                        addr: target,
                        offset: file_offset,
                        region: region_index,
                    });
                }
                page = stop;
            }
        }
    }
    if let Loading::Lazily { base, failure } = loading {
        if let Some(uffd) = (!short.is_empty())
            .then(super::lazy::Userfaultfd::open)
            .flatten()
        {
            mapped_runs.sort_unstable_by_key(|r| r.start);
            short = load_lazily(
                uffd,
                short,
                &mapped_runs,
                layers,
                (base, failure),
                &mut stats,
            )?;
        }
    }
    copy_runs(&short, layers, &mut stats).map(|()| stats)
}

/// Registers windows of guest memory holding `short` runs (at most
/// [`MAX_LAZY_WINDOWS`], those with the most pages of runs) to be filled
/// on first access by a [`super::lazy`] server; returns the runs left to
/// copy.
fn load_lazily(
    uffd: super::lazy::Userfaultfd,
    mut short: Vec<ShortRun>,
    mapped_runs: &[std::ops::Range<usize>],
    layers: &[Layer<'_>],
    (base, failure): (&File, &Arc<super::lazy::LoadFailure>),
    stats: &mut LayerStats,
) -> io::Result<Vec<ShortRun>> {
    use super::lazy::{Piece, Window};
    short.sort_unstable_by_key(|r| r.pages.start);
    // Consecutive short runs share a window if they are in one region, near
    // each other, and no mapped run lies between them.
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new(); // indices into `short`
    for (i, run) in short.iter().enumerate() {
        let joins = i > 0 && {
            let prev = &short[i - 1];
            let first_mapped = mapped_runs.partition_point(|m| m.start < prev.pages.end);
            prev.region == run.region
                && run.pages.start - prev.pages.end <= MAX_WINDOW_GAP
                && mapped_runs
                    .get(first_mapped)
                    .is_none_or(|m| m.start >= run.pages.start)
        };
        match groups.last_mut() {
            Some(group) if joins => group.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    let run_pages = |g: &std::ops::Range<usize>| -> usize {
        short[g.clone()].iter().map(|r| r.pages.len()).sum()
    };
    groups.sort_unstable_by_key(|g| std::cmp::Reverse(run_pages(g)));
    // The runs of the windows beyond the budget are copied, in file order,
    // layer by layer.
    let mut left: Vec<ShortRun> = groups
        .iter()
        .skip(MAX_LAZY_WINDOWS)
        .flat_map(|g| short[g.clone()].iter().cloned())
        .collect();
    left.sort_unstable_by_key(|r| (r.layer, r.offset));
    groups.truncate(MAX_LAZY_WINDOWS);

    let mut files = Vec::with_capacity(layers.len() + 1);
    for layer in layers {
        files.push(layer.file.try_clone()?);
    }
    files.push(base.try_clone()?);
    let mut windows = Vec::with_capacity(groups.len());
    let mut pieces = Vec::new();
    for group in &groups {
        let (first, last) = (&short[group.start], &short[group.end - 1]);
        let pages = first.pages.start..last.pages.end;
        // SAFETY: the window lies within one region of `mem` (its runs
        // do), which nothing accesses before the vCPUs start; it holds no
        // mapped run.
        unsafe { uffd.register(first.addr, pages.len() * PAGE_SIZE)? };
        windows.push(Window {
            addr: first.addr as usize,
            pages,
        });
        for run in &short[group.clone()] {
            stats.lazy += (run.pages.len() * PAGE_SIZE) as u64;
            pieces.push(Piece {
                pages: run.pages.clone(),
                file: run.layer,
                offset: run.offset,
            });
        }
    }
    stats.windows = windows.len();
    super::lazy::serve(uffd, windows, pieces, files, layers.len(), failure.clone())?;
    Ok(left)
}

/// Copies `runs` (sorted by layer, then file offset) into guest memory; the
/// runs that lie one after another in their file are read at once.
fn copy_runs(runs: &[ShortRun], layers: &[Layer<'_>], stats: &mut LayerStats) -> io::Result<()> {
    let mut pending: Vec<&mut [u8]> = Vec::new();
    let (mut pending_at, mut pending_end, mut pending_layer) = (0u64, 0u64, 0usize);
    for run in runs {
        let len = run.pages.len() * PAGE_SIZE;
        // SAFETY: `len` bytes of `mem`'s mapping at `run.addr` (see
        // `map_layers`) that nothing else accesses now, borrowed once
        // (runs do not overlap).
        let bytes = unsafe { std::slice::from_raw_parts_mut(run.addr, len) };
        if run.offset != pending_end || run.layer != pending_layer {
            let file = layers[pending_layer].file;
            crate::fsutil::read_exact_vectored_at(file, &mut pending, pending_at)?;
            pending.clear();
            (pending_at, pending_layer) = (run.offset, run.layer);
        }
        pending.push(bytes);
        pending_end = run.offset + len as u64;
        stats.copied += len as u64;
    }
    if let Some(layer) = layers.get(pending_layer) {
        crate::fsutil::read_exact_vectored_at(layer.file, &mut pending, pending_at)?;
    }
    Ok(())
}

/// The region holding guest page `page` (counted across regions, as in a
/// memory file): its index, itself, and the number of its first page.
fn region_of(
    mem: &GuestMemory,
    page: usize,
) -> io::Result<(usize, &GuestRegionMmap<AtomicBitmap>, usize)> {
    let mut first = 0;
    for (index, region) in mem.iter().enumerate() {
        let count = region.len() as usize / PAGE_SIZE;
        if page < first + count {
            return Ok((index, region, first));
        }
        first += count;
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("page {page} is beyond guest memory"),
    ))
}

/// The [`PageDigest`] of a layer's pages read back from its file, to
/// compare with the one the pause recorded.
pub fn layer_digest(layer: Layer<'_>) -> io::Result<u32> {
    let mut digest = PageDigest::default();
    let mut buf = vec![0u8; 1 << 20];
    for &(ref run, offset) in layer.pages.runs() {
        let mut page = run.start;
        while page < run.end {
            let n = (run.end - page).min(buf.len() / PAGE_SIZE);
            let bytes = &mut buf[..n * PAGE_SIZE];
            let at = offset + ((page - run.start) * PAGE_SIZE) as u64;
            layer.file.read_exact_at(bytes, at)?;
            for (i, data) in bytes.chunks(PAGE_SIZE).enumerate() {
                digest.add((page + i) as u64, data);
            }
            page += n;
        }
    }
    Ok(digest.finish())
}

/// Checks that the memory file `file` holds `mem_size` bytes.
fn check_file_len(file: &File, mem_size: u64) -> Result<(), String> {
    let file_len = file
        .metadata()
        .map_err(|e| format!("cannot stat the memory file: {e}"))?
        .len();
    if file_len != mem_size {
        return Err(format!(
            "the memory file holds {file_len} bytes, the machine has {mem_size}"
        ));
    }
    Ok(())
}

/// Maps `file` (as written by [`save_to_file`]) as `mem_size` bytes of
/// guest memory, privately: pages load lazily on first access and guest
/// writes never reach the file.
pub fn map_file(file: &File, mem_size: u64) -> Result<GuestMemory, String> {
    check_file_len(file, mem_size)?;
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

/// Guest memory of `mem_size` bytes, anonymous and untouched (no RAM is
/// used until the guest writes): for a machine to boot in, or to map a
/// memory file over later ([`map_file_over`]).
pub fn anonymous(mem_size: u64) -> Result<GuestMemory, String> {
    let ranges: Vec<_> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| e.to_string())
}

/// Maps `file` (as [`map_file`] does: privately, loaded lazily) over the
/// whole of `mem`, memory made by [`anonymous`] for the file's size, at
/// the same addresses: what KVM was told about it stays true. Call before
/// the vCPUs and devices start (they would see the pages change).
pub fn map_file_over(mem: &GuestMemory, file: &File) -> Result<(), String> {
    let mem_size: u64 = mem.iter().map(|r| r.len()).sum();
    check_file_len(file, mem_size)?;
    let layout: Vec<(u64, u64)> = mem
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    if layout != ram_ranges(mem_size) {
        return Err(format!(
            "guest memory laid out as {layout:x?}, not as a machine's"
        ));
    }
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: replaces the whole of one of `mem`'s own mappings
        // (MAP_FIXED, same address and length), privately, with a file we
        // hold open (the mapping keeps its own reference); `mem` unmaps
        // the range when dropped. Nothing reads or writes guest memory
        // until the vCPUs and devices start (the caller's promise), and
        // pointers into it stay valid.
        let mapped = unsafe {
            libc::mmap(
                region.as_ptr().cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(format!(
                "cannot map {len} bytes of the memory file: {}",
                io::Error::last_os_error()
            ));
        }
        offset += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layer_pages_follow_the_bitmap_and_newer_layers_hide_older_pages() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let file = tempfile::tempfile().unwrap();
        for total in [1usize, 63, 64, 65, 200, 1000] {
            for _ in 0..40 {
                // Three layers, oldest first; bits beyond `total` set too
                // (ignored). Dense and sparse words, runs across words.
                let bitmaps: Vec<Vec<u64>> = (0..3)
                    .map(|_| {
                        (0..total.div_ceil(64))
                            .map(|_| match random() % 4 {
                                0 => 0,
                                1 => !0,
                                _ => random() & random(),
                            })
                            .collect()
                    })
                    .collect();
                let set = |bits: &[u64], page: usize| bits[page / 64] & (1 << (page % 64)) != 0;
                for packed in [true, false] {
                    let layers: Vec<LayerPages> = bitmaps
                        .iter()
                        .map(|bits| LayerPages::from_bitmap(bits, total, packed))
                        .collect();
                    for (bits, pages) in bitmaps.iter().zip(&layers) {
                        // Each page with its file offset, as the bitmap says.
                        let want: Vec<(usize, u64)> = (0..total)
                            .filter(|&page| set(bits, page))
                            .enumerate()
                            .map(|(index, page)| {
                                let at = if packed { index } else { page };
                                (page, (at * PAGE_SIZE) as u64)
                            })
                            .collect();
                        let got: Vec<(usize, u64)> = pages
                            .runs()
                            .iter()
                            .flat_map(|(run, offset)| {
                                run.clone().map(move |page| {
                                    (page, offset + ((page - run.start) * PAGE_SIZE) as u64)
                                })
                            })
                            .collect();
                        assert_eq!(got, want, "{total} pages, packed {packed}");
                        assert_eq!(pages.count(), want.len());
                        assert!(
                            pages.runs().windows(2).all(|w| w[0].0.end < w[1].0.start),
                            "runs are sorted and as long as they can be"
                        );
                    }
                    // As map_layers sees them: each page from the newest
                    // layer holding it, at that layer's offset.
                    let mut hidden = Vec::new();
                    let mut owner = vec![None; total];
                    for (index, pages) in layers.iter().enumerate().rev() {
                        let layer = Layer { file: &file, pages };
                        for (run, offset) in layer.visible_runs(&hidden) {
                            for page in run.clone() {
                                assert!(owner[page].is_none(), "page {page} twice");
                                let at = offset + ((page - run.start) * PAGE_SIZE) as u64;
                                owner[page] = Some((index, at));
                            }
                        }
                        hidden = union(&hidden, pages.runs().iter().map(|(r, _)| r.clone()));
                    }
                    for (page, owner) in owner.iter().enumerate() {
                        let newest = (0..3).rev().find(|&l| set(&bitmaps[l], page));
                        assert_eq!(owner.map(|(l, _)| l), newest, "page {page}");
                        if let (Some((l, at)), Some(_)) = (owner, newest) {
                            let (run, offset) = layers[*l]
                                .runs()
                                .iter()
                                .find(|(r, _)| r.contains(&page))
                                .unwrap();
                            assert_eq!(*at, offset + ((page - run.start) * PAGE_SIZE) as u64);
                        }
                    }
                }
            }
        }
    }

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
        let layer = crate::fsutil::create_new_rw(&layer_path).unwrap();
        let stats = save_layer(&mem, &layer, &pages).unwrap();
        assert_eq!(stats.written, 2 * PAGE_SIZE as u64);
        let back = map_file(&file, size as u64).unwrap();
        let layer_pages = LayerPages::from_bitmap(&pages, size / PAGE_SIZE, true);
        let layer = Layer {
            file: &layer,
            pages: &layer_pages,
        };
        let layers = [layer];
        assert_eq!(
            map_layers(&back, &layers, Loading::Now).unwrap(),
            LayerStats {
                copied: 2 * PAGE_SIZE as u64,
                ..LayerStats::default()
            },
            "short runs are copied"
        );
        assert_eq!(
            layer_digest(layer).unwrap(),
            stats.digest,
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

    /// A layer file holding `value` in `pages`, and its bitmap.
    fn layer(
        dir: &std::path::Path,
        name: &str,
        runs: &[(std::ops::Range<usize>, u8)],
    ) -> (File, Vec<u64>) {
        let file = crate::fsutil::create_new_rw(&dir.join(name)).unwrap();
        let mut bits = vec![0u64; 8];
        for (range, value) in runs {
            for page in range.clone() {
                file.write_all_at(&[*value; PAGE_SIZE], (page * PAGE_SIZE) as u64)
                    .unwrap();
                bits[page / 64] |= 1 << (page % 64);
            }
        }
        (file, bits)
    }

    #[test]
    fn layers_are_mapped_or_copied_in_order_across_regions() {
        // Two regions of 256 pages: file pages 0..256 and 256..512.
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(2 << 20), 1 << 20),
        ])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Older: 100 pages across the regions' border; what the newer layer
        // leaves of them is mapped, in two (200..250 and 260..300).
        let (old, old_bits) = layer(dir.path(), "old", &[(200..300, 1)]);
        // Newer: 10 pages over them (copied) and 20 at the start (mapped).
        let (new, new_bits) = layer(dir.path(), "new", &[(0..20, 3), (250..260, 2)]);
        let (old_bits, new_bits) = (
            LayerPages::from_bitmap(&old_bits, 512, false),
            LayerPages::from_bitmap(&new_bits, 512, false),
        );
        let sparse = |file, pages| Layer { file, pages };
        let stats = map_layers(
            &mem,
            &[sparse(&old, &old_bits), sparse(&new, &new_bits)],
            Loading::Now,
        )
        .unwrap();
        assert_eq!(
            stats,
            LayerStats {
                mapped: 110 * PAGE_SIZE as u64,
                copied: 10 * PAGE_SIZE as u64,
                runs_mapped: 3,
                ..LayerStats::default()
            }
        );
        let page_at = |page: usize| {
            let addr = if page < 256 {
                page * PAGE_SIZE
            } else {
                (2 << 20) + (page - 256) * PAGE_SIZE
            };
            let mut b = [0u8; PAGE_SIZE];
            mem.read_slice(&mut b, GuestAddress(addr as u64)).unwrap();
            assert!(b.iter().all(|&x| x == b[0]), "page {page} is uneven");
            b[0]
        };
        for (page, want) in [
            (0, 3),
            (19, 3),
            (20, 0),
            (199, 0),
            (200, 1),
            (249, 1),
            (250, 2),
            (255, 2),
            (256, 2),
            (259, 2),
            (260, 1),
            (299, 1),
            (300, 0),
            (511, 0),
        ] {
            assert_eq!(page_at(page), want, "page {page}");
        }
        // Private: a guest write stays out of the layer file.
        mem.write_slice(&[9u8; 16], GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 16];
        new.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(on_disk, [3u8; 16]);
        // The digest reads the layer's pages back from the file.
        let mut digest = PageDigest::default();
        for page in (0..20).chain(250..260) {
            digest.add(page as u64, &[if page < 20 { 3 } else { 2 }; PAGE_SIZE]);
        }
        assert_eq!(
            layer_digest(sparse(&new, &new_bits)).unwrap(),
            digest.finish()
        );
    }

    #[test]
    fn packed_layers_hold_only_their_pages_and_map_back() {
        // Two regions of 256 pages, as above.
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)];
        let mem = GuestMemory::from_ranges(&ranges).unwrap();
        let addr = |page: usize| {
            GuestAddress(if page < 256 {
                (page * PAGE_SIZE) as u64
            } else {
                (2 << 20) + ((page - 256) * PAGE_SIZE) as u64
            })
        };
        // Scattered pages, a run across the regions' border, a zero page.
        let dirty: Vec<usize> = (3..5)
            .chain(100..101)
            .chain(250..262)
            .chain(511..512)
            .collect();
        let mut bits = vec![0u64; 8];
        for &page in &dirty {
            bits[page / 64] |= 1 << (page % 64);
            if page != 100 {
                mem.write_slice(&[page as u8 | 1; PAGE_SIZE], addr(page))
                    .unwrap();
            }
        }
        mem.write_slice(&[0xee; PAGE_SIZE], addr(7)).unwrap(); // not dirty
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        let file = crate::fsutil::create_new_rw(&path).unwrap();
        let stats = save_layer(&mem, &file, &bits).unwrap();
        let len = (dirty.len() * PAGE_SIZE) as u64;
        assert_eq!(stats.total, 512 * PAGE_SIZE as u64);
        assert_eq!(stats.written, len);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
        let pages = LayerPages::from_bitmap(&bits, 512, true);
        assert_eq!(pages.count(), dirty.len());
        let mut digest = PageDigest::default();
        for &page in &dirty {
            let value = if page == 100 { 0 } else { page as u8 | 1 };
            digest.add(page as u64, &[value; PAGE_SIZE]);
        }
        assert_eq!(stats.digest, digest.finish());
        let layer = Layer {
            file: &file,
            pages: &pages,
        };
        assert_eq!(layer_digest(layer).unwrap(), stats.digest);
        // Over memory full of 0xff: the layer's pages come back, the rest
        // is untouched.
        let back = GuestMemory::from_ranges(&ranges).unwrap();
        for page in 0..512 {
            back.write_slice(&[0xff; PAGE_SIZE], addr(page)).unwrap();
        }
        let stats = map_layers(&back, &[layer], Loading::Now).unwrap();
        assert_eq!(stats.mapped + stats.copied, len);
        assert_eq!(
            stats.runs_mapped, 0,
            "no run reaches {MIN_MAPPED_RUN} pages"
        );
        for page in 0..512 {
            let mut b = [0u8; PAGE_SIZE];
            back.read_slice(&mut b, addr(page)).unwrap();
            let want = match page {
                100 => 0,
                p if dirty.contains(&p) => p as u8 | 1,
                _ => 0xff,
            };
            assert!(b.iter().all(|&x| x == want), "page {page}");
        }
        // A long packed run is mapped from its packed offset.
        let long: Vec<u64> = {
            let mut bits = vec![0u64; 8];
            bits[0] = 1; // page 0 first, so the run starts at file page 1
            for page in 300..340 {
                mem.write_slice(&[0x42; PAGE_SIZE], addr(page)).unwrap();
                bits[page / 64] |= 1 << (page % 64);
            }
            bits
        };
        let path = dir.path().join("long");
        let file = crate::fsutil::create_new_rw(&path).unwrap();
        save_layer(&mem, &file, &long).unwrap();
        let long = LayerPages::from_bitmap(&long, 512, true);
        let layer = Layer {
            file: &file,
            pages: &long,
        };
        let stats = map_layers(&back, &[layer], Loading::Now).unwrap();
        assert_eq!(stats.runs_mapped, 1);
        for page in [300, 339] {
            let mut b = [0u8; PAGE_SIZE];
            back.read_slice(&mut b, addr(page)).unwrap();
            assert!(b.iter().all(|&x| x == 0x42), "page {page}");
        }
    }

    #[test]
    fn pages_of_a_newer_layer_are_not_loaded_from_older_ones() {
        let pages = 256;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap();
        let fill = |value: u8, set: &[std::ops::Range<usize>]| {
            let mut bits = vec![0u64; pages / 64];
            for page in set.iter().cloned().flatten() {
                mem.write_slice(&[value; PAGE_SIZE], GuestAddress((page * PAGE_SIZE) as u64))
                    .unwrap();
                bits[page / 64] |= 1 << (page % 64);
            }
            bits
        };
        let dir = tempfile::tempdir().unwrap();
        let save = |name: &str, bits: &[u64]| {
            let file = crate::fsutil::create_new_rw(&dir.path().join(name)).unwrap();
            save_layer(&mem, &file, bits).unwrap();
            file
        };
        // Oldest: 10..60 (a mapped run), 70..72, 100..101; then 20..40 and
        // 71..72 again; newest: 30..35 and 100..101.
        let old = fill(1, &[10..60, 70..72, 100..101]);
        let old_file = save("old", &old);
        let mid = fill(2, &[20..40, 71..72]);
        let mid_file = save("mid", &mid);
        let new = fill(3, &[30..35, 100..101]);
        let new_file = save("new", &new);
        let (old, mid, new) = (
            LayerPages::from_bitmap(&old, pages, true),
            LayerPages::from_bitmap(&mid, pages, true),
            LayerPages::from_bitmap(&new, pages, true),
        );
        let layer = |file, pages| Layer { file, pages };
        let back = GuestMemory::from_ranges(&[(GuestAddress(0), pages * PAGE_SIZE)]).unwrap();
        let stats = map_layers(
            &back,
            &[
                layer(&old_file, &old),
                layer(&mid_file, &mid),
                layer(&new_file, &new),
            ],
            Loading::Now,
        )
        .unwrap();
        // Each page comes from one layer only: 50 + 2 + 1 pages in all.
        assert_eq!(stats.mapped + stats.copied, 53 * PAGE_SIZE as u64);
        for page in 0..pages {
            let want = match page {
                30..35 | 100 => 3,
                20..40 | 71 => 2,
                10..60 | 70 => 1,
                _ => 0,
            };
            let mut b = [0u8; PAGE_SIZE];
            back.read_slice(&mut b, GuestAddress((page * PAGE_SIZE) as u64))
                .unwrap();
            assert!(b.iter().all(|&x| x == want), "page {page}: want {want}");
        }
    }

    #[test]
    fn short_runs_load_on_first_access_in_windows_between_mapped_runs() {
        if crate::vmm::lazy::tests::userfaultfd_or_skip("lazy layers").is_none() {
            return;
        }
        let pages = 512;
        let size = pages * PAGE_SIZE;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let at = |page: usize| GuestAddress((page * PAGE_SIZE) as u64);
        let base_value = |page: usize| (page % 251) as u8 | 1;
        for page in 0..pages {
            mem.write_slice(&[base_value(page); PAGE_SIZE], at(page))
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let base = crate::fsutil::create_new_rw(&dir.path().join("base")).unwrap();
        save_to_file(&mem, &base).unwrap();
        let layer_of = |name: &str, value: u8, set: &[std::ops::Range<usize>]| {
            let mut bits = vec![0u64; pages / 64];
            for page in set.iter().cloned().flatten() {
                mem.write_slice(&[value; PAGE_SIZE], at(page)).unwrap();
                bits[page / 64] |= 1 << (page % 64);
            }
            let file = crate::fsutil::create_new_rw(&dir.path().join(name)).unwrap();
            save_layer(&mem, &file, &bits).unwrap();
            (file, bits)
        };
        // A long run (mapped) between short ones; the newer layer hides
        // page 11 of the older.
        let (old, old_bits) = layer_of("old", 0xa0, &[10..12, 30..31, 40..80, 90..93, 400..402]);
        let (new, new_bits) = layer_of("new", 0xb0, &[11..12, 95..96, 300..303]);
        let back = map_file(&base, size as u64).unwrap();
        let (old_bits, new_bits) = (
            LayerPages::from_bitmap(&old_bits, pages, true),
            LayerPages::from_bitmap(&new_bits, pages, true),
        );
        let layers = [
            Layer {
                file: &old,
                pages: &old_bits,
            },
            Layer {
                file: &new,
                pages: &new_bits,
            },
        ];
        let stats = map_layers(
            &back,
            &layers,
            Loading::Lazily {
                base: &base,
                failure: &Arc::default(),
            },
        )
        .unwrap();
        assert_eq!(
            stats,
            LayerStats {
                mapped: 40 * PAGE_SIZE as u64,
                runs_mapped: 1,
                copied: 0,
                lazy: 12 * PAGE_SIZE as u64,
                // 10..31 and 90..402: the mapped run splits them.
                windows: 2,
            }
        );
        let want = |page: usize| match page {
            11 | 95 | 300..303 => 0xb0,
            10 | 30 | 40..80 | 90..93 | 400..402 => 0xa0,
            _ => base_value(page),
        };
        std::thread::scope(|s| {
            for t in 0..2 {
                let (back, want) = (&back, &want);
                s.spawn(move || {
                    for page in (0..pages).filter(|p| p % 2 == t).rev() {
                        let mut b = [0u8; PAGE_SIZE];
                        back.read_slice(&mut b, at(page)).unwrap();
                        let w = want(page);
                        assert!(b.iter().all(|&x| x == w), "page {page}: want {w:#x}");
                    }
                });
            }
        });
        // Guest writes stay private.
        back.write_slice(&[7u8; 8], at(300)).unwrap();
        let mut on_disk = [0u8; 8];
        new.read_exact_at(&mut on_disk, 2 * PAGE_SIZE as u64)
            .unwrap();
        assert_eq!(on_disk, [0xb0; 8]);
    }

    #[test]
    fn a_page_that_cannot_be_read_is_reported_and_never_waited_for() {
        if crate::vmm::lazy::tests::userfaultfd_or_skip("lazy layers").is_none() {
            return;
        }
        let pages = 256;
        let size = pages * PAGE_SIZE;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        let at = |page: usize| GuestAddress((page * PAGE_SIZE) as u64);
        mem.write_slice(&[1u8; PAGE_SIZE], at(5)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = crate::fsutil::create_new_rw(&dir.path().join("base")).unwrap();
        save_to_file(&mem, &base).unwrap();
        let mut bits = vec![0u64; pages / 64];
        mem.write_slice(&[2u8; PAGE_SIZE], at(5)).unwrap();
        bits[0] |= 1 << 5;
        let file = crate::fsutil::create_new_rw(&dir.path().join("layer")).unwrap();
        save_layer(&mem, &file, &bits).unwrap();
        // The layer file loses its data after the resume checked it.
        file.set_len(0).unwrap();
        let set = LayerPages::from_bitmap(&bits, pages, true);
        let layers = [Layer {
            file: &file,
            pages: &set,
        }];
        let failure = Arc::new(super::super::lazy::LoadFailure::default());
        let (tx, rx) = std::sync::mpsc::channel();
        failure.on_failure(Box::new(move |reason| {
            let _ = tx.send(reason.to_owned());
        }));
        let back = map_file(&base, size as u64).unwrap();
        let stats = map_layers(
            &back,
            &layers,
            Loading::Lazily {
                base: &base,
                failure: &failure,
            },
        )
        .unwrap();
        assert_eq!(stats.windows, 1);
        // Whoever touches the page gets it (not the old data; zeros), and
        // the watcher hears why.
        let mut b = [9u8; PAGE_SIZE];
        back.read_slice(&mut b, at(5)).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let reason = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the failure is reported");
        assert!(reason.contains("cannot read guest pages"), "{reason}");
        assert_eq!(failure.reason(), Some(reason.clone()));
        // A watcher that comes later hears it at once.
        let (tx, rx) = std::sync::mpsc::channel();
        failure.on_failure(Box::new(move |reason| {
            let _ = tx.send(reason.to_owned());
        }));
        assert_eq!(rx.try_recv().unwrap(), reason);
    }
}
