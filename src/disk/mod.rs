//! Copy-on-write block store over a read-only template image.
//!
//! A [`CowDisk`] combines a *base* image, shared by every sandbox made from a
//! template and never written (it is opened read-only), with a per-sandbox
//! *overlay* that holds only the blocks the guest wrote, as of the sandbox's
//! last snapshot. The overlay is two files:
//!
//! - the **data file** (the path given to [`CowDisk::create`]): a sparse file
//!   as large as the disk; block `i` of the disk, once written, lives at byte
//!   `i * BLOCK_SIZE` of it. Blocks never written are holes and take no space.
//! - the **metadata file** (the same path with `.meta` appended): magic,
//!   version, block size, disk size, an allocation bitmap with one bit per
//!   block, and a CRC-32. It is replaced atomically.
//!
//! What the guest writes while it runs never touches the overlay: it goes to
//! a *pending layer* (`<overlay>.pending`, a sparse file like the data file,
//! with its bitmap in memory), so the overlay always stays exactly the disk
//! of the last snapshot, whatever happens to the process. A pause seals the
//! layer for its snapshot generation ([`CowDisk::seal`]: data fsynced and
//! renamed to `<overlay>.layer-<generation>`, bitmap written atomically to
//! `<overlay>.layer-<generation>.meta`); the snapshot's manifest then names
//! the sealed layer ([`SealedLayer`]) and its switch is what commits it. The
//! next [`CowDisk::open`] of that snapshot copies the sealed layer into the
//! overlay, records that in `<overlay>.merged` and deletes the layer, and
//! drops any layer no snapshot committed: a crash at any moment leaves the
//! disk of the previous snapshot or of the new one, never a mix. The
//! copy-on-write unit is [`BLOCK_SIZE`] bytes: a write that covers a block
//! only partly first copies that block from below.

mod meta;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) use meta::crc32;
use meta::Meta;

/// The copy-on-write granularity, in bytes.
pub const BLOCK_SIZE: u64 = 4096;

/// Errors of the copy-on-write disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A file operation failed.
    #[error("could not {op} {}: {source}; check that the file exists, is accessible and the disk is not full", path.display())]
    Io {
        /// What was being done ("open", "read", "fsync", ...).
        op: &'static str,
        /// The file it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The base image is not a regular file.
    #[error("the base image {} is not a regular file; give the path of a disk image file", path.display())]
    BaseNotAFile {
        /// The base image.
        path: PathBuf,
    },
    /// `create` found overlay files already there.
    #[error("the overlay {} already exists; open it with CowDisk::open or delete its files first", path.display())]
    OverlayExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The overlay's metadata is damaged or is not an overlay at all.
    #[error("the overlay file {} is corrupt or not a dormouse overlay ({reason}); the sandbox's disk cannot be recovered, delete the sandbox", path.display())]
    CorruptOverlay {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The base image no longer has the size the overlay was made for.
    #[error("the base image {} is {actual} bytes but the overlay {} was made over a {expected}-byte image; the template image changed: restore the original image or delete the sandbox", base.display(), overlay.display())]
    BaseSizeChanged {
        /// The base image.
        base: PathBuf,
        /// The overlay's metadata file.
        overlay: PathBuf,
        /// The size recorded in the overlay.
        expected: u64,
        /// The base image's size now.
        actual: u64,
    },
    /// Another `CowDisk` (in this process or another) has the overlay open.
    #[error("the overlay {} is in use by another disk (a sandbox already running from it?); stop that one first", path.display())]
    Locked {
        /// The overlay's data file.
        path: PathBuf,
    },
    /// A request reaches past the end of the disk.
    #[error("a {len}-byte access at offset {offset} reaches past the end of the {size}-byte disk")]
    OutOfRange {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the disk.
        size: u64,
    },
}

impl DiskError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The disk writes of one snapshot, sealed by [`CowDisk::seal`]: what the
/// snapshot's manifest records so that [`CowDisk::open`] can apply them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedLayer {
    /// The snapshot generation the layer was sealed for (part of its name).
    pub generation: u64,
    /// CRC-32 of the layer's metadata file.
    pub meta_crc32: u32,
}

/// Writes since the disk was opened (or created): a sparse file as large as
/// the disk and the bitmap of the blocks it holds.
#[derive(Debug)]
struct Pending {
    file: File,
    path: PathBuf,
    bitmap: Vec<u8>,
    /// Written since its last fsync.
    dirty: bool,
}

/// A disk image made of a read-only base and a private copy-on-write overlay.
///
/// Dropping a `CowDisk` does not flush it: writes since the last
/// [`flush`](Self::flush) are lost from the overlay's point of view (their
/// blocks read from the base again when the overlay is reopened).
#[derive(Debug)]
pub struct CowDisk {
    base: File,
    base_path: PathBuf,
    data: File,
    data_path: PathBuf,
    meta_path: PathBuf,
    size: u64,
    /// One bit per block: set = the block's content is in the overlay.
    bitmap: Vec<u8>,
    /// The guest's writes since the last snapshot; created at the first.
    pending: Option<Pending>,
}

impl CowDisk {
    /// Creates a new, empty overlay at `overlay` (the data file; the
    /// metadata goes to `overlay` + `.meta`) over the image `base`. Fails
    /// with [`DiskError::OverlayExists`] rather than overwrite an overlay.
    pub fn create(base: &Path, overlay: &Path) -> Result<Self, DiskError> {
        let (base_file, size) = open_base(base)?;
        let meta_path = meta_path(overlay);
        if meta_path.exists() {
            return Err(DiskError::OverlayExists { path: meta_path });
        }
        let data = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(overlay)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(DiskError::OverlayExists {
                    path: overlay.to_path_buf(),
                })
            }
            Err(source) => return Err(DiskError::io("create", overlay, source)),
        };
        let cleanup = |e: DiskError| {
            // Best effort: leave nothing half-made behind.
            let _ = std::fs::remove_file(overlay);
            let _ = std::fs::remove_file(&meta_path);
            e
        };
        lock(&data, overlay).map_err(cleanup)?;
        data.set_len(size)
            .map_err(|source| cleanup(DiskError::io("resize", overlay, source)))?;
        let bitmap = vec![0u8; meta::bitmap_len(size, BLOCK_SIZE) as usize];
        let disk = Self {
            base: base_file,
            base_path: base.to_path_buf(),
            data,
            data_path: overlay.to_path_buf(),
            meta_path: meta_path.clone(),
            size,
            bitmap,
            pending: None,
        };
        disk.commit_overlay().map_err(cleanup)?;
        disk.discard_layers().map_err(cleanup)?;
        Ok(disk)
    }

    /// Releases the overlay's lock while its files stay open, so that the
    /// disk can be opened again at once: for a disk whose machine has
    /// stopped for good and is dropped later (see
    /// `Machine::drop_in_background`). Nothing may write through it after.
    pub fn unlock(&self) {
        // SAFETY: flock only reads the descriptor number, which `self.data`
        // keeps open for the duration of the call; it touches no memory.
        // Unlocking a descriptor that holds no lock does nothing.
        unsafe { libc::flock(self.data.as_raw_fd(), libc::LOCK_UN) };
    }

    /// Reopens an overlay made by [`create`](Self::create) over the same
    /// base image, validating its metadata against the base, as the disk of
    /// the snapshot that committed `sealed` (`None`: of the overlay alone):
    /// that layer is applied if it was not yet, every other layer dropped.
    /// A committed layer that is missing or damaged is
    /// [`DiskError::CorruptOverlay`].
    pub fn open(
        base: &Path,
        overlay: &Path,
        sealed: Option<SealedLayer>,
    ) -> Result<Self, DiskError> {
        let (base_file, size) = open_base(base)?;
        let meta_path = meta_path(overlay);
        // A temporary file left by a flush that crashed before its rename.
        let _ = std::fs::remove_file(meta::temp_path(&meta_path));
        let meta = Meta::read(&meta_path)?;
        if u64::from(meta.block_size) != BLOCK_SIZE {
            return Err(DiskError::CorruptOverlay {
                path: meta_path,
                reason: format!(
                    "block size {}, this build uses {BLOCK_SIZE}",
                    meta.block_size
                ),
            });
        }
        if meta.disk_size != size {
            return Err(DiskError::BaseSizeChanged {
                base: base.to_path_buf(),
                overlay: meta_path,
                expected: meta.disk_size,
                actual: size,
            });
        }
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .open(overlay)
            .map_err(|source| DiskError::io("open", overlay, source))?;
        lock(&data, overlay)?;
        let data_len = data
            .metadata()
            .map_err(|source| DiskError::io("stat", overlay, source))?
            .len();
        if data_len != size {
            return Err(DiskError::CorruptOverlay {
                path: overlay.to_path_buf(),
                reason: format!("data file is {data_len} bytes, the disk is {size}"),
            });
        }
        let mut disk = Self {
            base: base_file,
            base_path: base.to_path_buf(),
            data,
            data_path: overlay.to_path_buf(),
            meta_path,
            size,
            bitmap: meta.bitmap,
            pending: None,
        };
        if let Some(sealed) = sealed {
            if disk.merged_generation()? != Some(sealed.generation) {
                disk.merge(sealed)?;
            }
        }
        disk.discard_layers()?;
        Ok(disk)
    }

    /// The disk's size in bytes (the base image's size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The base image this disk reads unwritten blocks from.
    pub fn base_path(&self) -> &Path {
        &self.base_path
    }

    /// The overlay's files (data, metadata): what to delete with the sandbox.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.data_path.clone(), self.meta_path.clone()]
    }

    /// How many blocks of [`BLOCK_SIZE`] bytes no longer come from the
    /// base image (held by the overlay, the pending layer or both).
    pub fn allocated_blocks(&self) -> u64 {
        let pending = self.pending.as_ref().map(|p| p.bitmap.as_slice());
        self.bitmap
            .iter()
            .enumerate()
            .map(|(i, b)| b | pending.map_or(0, |p| p[i]))
            .map(|b| u64::from(b.count_ones()))
            .sum()
    }

    /// Fills `buf` with the disk's bytes starting at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let end = self.check_range(offset, buf.len())?;
        let mut pos = offset;
        while pos < end {
            // The longest run of blocks, from `pos`, that all come from the same file.
            let source = self.source(pos / BLOCK_SIZE);
            let mut run_end = ((pos / BLOCK_SIZE) + 1) * BLOCK_SIZE;
            while run_end < end && self.source(run_end / BLOCK_SIZE) == source {
                run_end += BLOCK_SIZE;
            }
            let run_end = run_end.min(end);
            let chunk = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            let (file, path) = match (source, &self.pending) {
                (Source::Pending, Some(p)) => (&p.file, &p.path),
                (Source::Overlay, _) => (&self.data, &self.data_path),
                _ => (&self.base, &self.base_path),
            };
            file.read_exact_at(chunk, pos)
                .map_err(|source| DiskError::io("read", path, source))?;
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `buf` to the disk at `offset` (into the pending layer: the
    /// overlay stays the last snapshot's disk).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let end = self.check_range(offset, buf.len())?;
        self.pending()?;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let (block_start, block_end) = self.block_bounds(block);
            let chunk_end = end.min(block_end);
            let partial = pos > block_start || chunk_end < block_end;
            if partial && self.source(block) != Source::Pending {
                // Copy the block up from below, merge the new bytes, write it whole.
                let mut tmp = vec![0u8; (block_end - block_start) as usize];
                self.read_at(&mut tmp, block_start)?;
                tmp[(pos - block_start) as usize..(chunk_end - block_start) as usize]
                    .copy_from_slice(&buf[(pos - offset) as usize..(chunk_end - offset) as usize]);
                self.write_pending(&tmp, block_start)?;
                pos = chunk_end;
                continue;
            }
            // Extend over following blocks that can be written in place: those
            // already pending or covered whole by this write.
            let mut run_end = chunk_end;
            while run_end < end {
                let (next_start, next_end) = self.block_bounds(run_end / BLOCK_SIZE);
                debug_assert_eq!(next_start, run_end);
                let next_chunk_end = end.min(next_end);
                if next_chunk_end == next_end
                    || self.source(run_end / BLOCK_SIZE) == Source::Pending
                {
                    run_end = next_chunk_end;
                } else {
                    break;
                }
            }
            self.write_pending(
                &buf[(pos - offset) as usize..(run_end - offset) as usize],
                pos,
            )?;
            pos = run_end;
        }
        Ok(())
    }

    /// Makes every completed write durable in the pending layer (a guest's
    /// flush request). What survives a crash is decided by snapshots, not
    /// by this: see [`seal`](Self::seal).
    pub fn flush(&mut self) -> Result<(), DiskError> {
        match &mut self.pending {
            Some(p) if p.dirty => {
                p.file
                    .sync_data()
                    .map_err(|source| DiskError::io("fsync", &p.path, source))?;
                p.dirty = false;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Seals the writes since the last snapshot as the disk layer of
    /// snapshot `generation` and makes it durable; the snapshot commits it
    /// by naming the returned [`SealedLayer`] in its manifest. `None` when
    /// nothing was written. The disk stays usable: if the snapshot is not
    /// committed after all, later writes join the same layer.
    pub fn seal(&mut self, generation: u64) -> Result<Option<SealedLayer>, DiskError> {
        self.flush()?;
        let size = self.size;
        let data_path = self.data_path.clone();
        let Some(p) = &mut self.pending else {
            return Ok(None);
        };
        let path = layer_path(&data_path, generation);
        if p.path != path {
            std::fs::rename(&p.path, &path)
                .map_err(|source| DiskError::io("rename", &p.path, source))?;
            p.path = path.clone();
        }
        let meta = Meta {
            block_size: BLOCK_SIZE as u32,
            disk_size: size,
            bitmap: p.bitmap.clone(),
        };
        // Also makes the data file's rename durable (fsync of the directory).
        meta.write_atomic(&meta_path(&path))?;
        Ok(Some(SealedLayer {
            generation,
            meta_crc32: crc32(&meta.encode()),
        }))
    }

    /// Applies the layer sealed by [`seal`](Self::seal) once its snapshot
    /// committed it, while the disk stays open (a snapshot of a sandbox
    /// that runs on): the overlay becomes that snapshot's disk and later
    /// writes start a new pending layer, so they never reach the layer or
    /// the overlay the snapshot names.
    pub fn commit(&mut self, sealed: SealedLayer) -> Result<(), DiskError> {
        self.merge(sealed)?;
        self.pending = None;
        self.discard_layers()
    }

    /// Which file holds `block` now.
    fn source(&self, block: u64) -> Source {
        if self.pending.as_ref().is_some_and(|p| bit(&p.bitmap, block)) {
            Source::Pending
        } else if bit(&self.bitmap, block) {
            Source::Overlay
        } else {
            Source::Base
        }
    }

    /// The pending layer, created (empty) at the first write.
    fn pending(&mut self) -> Result<&mut Pending, DiskError> {
        if self.pending.is_none() {
            let path = pending_path(&self.data_path);
            let _ = std::fs::remove_file(&path);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|source| DiskError::io("create", &path, source))?;
            file.set_len(self.size)
                .map_err(|source| DiskError::io("resize", &path, source))?;
            self.pending = Some(Pending {
                file,
                path,
                bitmap: vec![0u8; self.bitmap.len()],
                dirty: false,
            });
        }
        Ok(self.pending.as_mut().expect("just created"))
    }

    /// Writes whole blocks (or the disk's short last block) at `offset` into
    /// the pending layer and marks them.
    fn write_pending(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let p = self.pending()?;
        p.dirty = true;
        p.file
            .write_all_at(buf, offset)
            .map_err(|source| DiskError::io("write", &p.path, source))?;
        let first = offset / BLOCK_SIZE;
        let last = (offset + buf.len() as u64 - 1) / BLOCK_SIZE;
        for block in first..=last {
            set_bit(&mut p.bitmap, block);
        }
        Ok(())
    }

    /// fsyncs the overlay's data file, then replaces its metadata file.
    fn commit_overlay(&self) -> Result<(), DiskError> {
        self.data
            .sync_data()
            .map_err(|source| DiskError::io("fsync", &self.data_path, source))?;
        Meta {
            block_size: BLOCK_SIZE as u32,
            disk_size: self.size,
            bitmap: self.bitmap.clone(),
        }
        .write_atomic(&self.meta_path)
    }

    /// The generation whose layer was last merged into the overlay.
    fn merged_generation(&self) -> Result<Option<u64>, DiskError> {
        let path = merged_path(&self.data_path);
        match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| DiskError::CorruptOverlay {
                    path,
                    reason: format!("{text:?} is not a generation number"),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DiskError::io("read", &path, source)),
        }
    }

    /// Copies the sealed layer into the overlay, durably, and records that
    /// it was (a crash halfway repeats the copy at the next open).
    fn merge(&mut self, sealed: SealedLayer) -> Result<(), DiskError> {
        let path = layer_path(&self.data_path, sealed.generation);
        let meta_path = meta_path(&path);
        let damaged = |reason: String| DiskError::CorruptOverlay {
            path: meta_path.clone(),
            reason,
        };
        let bytes = std::fs::read(&meta_path).map_err(|e| {
            damaged(format!(
                "the disk writes of snapshot generation {} cannot be read: {e}",
                sealed.generation
            ))
        })?;
        if crc32(&bytes) != sealed.meta_crc32 {
            return Err(damaged(format!(
                "not the disk layer snapshot generation {} committed (CRC-32 mismatch)",
                sealed.generation
            )));
        }
        let meta = Meta::decode(&bytes, &meta_path)?;
        if u64::from(meta.block_size) != BLOCK_SIZE || meta.disk_size != self.size {
            return Err(damaged(format!(
                "a layer of {}-byte blocks for a {}-byte disk; this disk has {BLOCK_SIZE} and {}",
                meta.block_size, meta.disk_size, self.size
            )));
        }
        let layer = File::open(&path).map_err(|source| DiskError::io("open", &path, source))?;
        let mut block = vec![0u8; BLOCK_SIZE as usize];
        let blocks = self.size.div_ceil(BLOCK_SIZE);
        for b in (0..blocks).filter(|&b| bit(&meta.bitmap, b)) {
            let (start, end) = self.block_bounds(b);
            let buf = &mut block[..(end - start) as usize];
            layer
                .read_exact_at(buf, start)
                .map_err(|source| DiskError::io("read", &path, source))?;
            self.data
                .write_all_at(buf, start)
                .map_err(|source| DiskError::io("write", &self.data_path, source))?;
            set_bit(&mut self.bitmap, b);
        }
        self.commit_overlay()?;
        crate::fault::crash_point("resume:disk-merged");
        meta::write_atomic(
            &merged_path(&self.data_path),
            sealed.generation.to_string().as_bytes(),
        )
    }

    /// Deletes the pending and sealed layer files next to the overlay.
    fn discard_layers(&self) -> Result<(), DiskError> {
        let dir = match self.data_path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let Some(name) = self.data_path.file_name().and_then(|n| n.to_str()) else {
            return Ok(());
        };
        let pending = format!("{name}.pending");
        let layer = format!("{name}.layer-");
        let entries =
            std::fs::read_dir(dir).map_err(|source| DiskError::io("list", dir, source))?;
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if file == pending || file.starts_with(&layer) {
                std::fs::remove_file(entry.path())
                    .map_err(|source| DiskError::io("delete", &entry.path(), source))?;
            }
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<u64, DiskError> {
        let out_of_range = || DiskError::OutOfRange {
            offset,
            len: len as u64,
            size: self.size,
        };
        let end = offset.checked_add(len as u64).ok_or_else(out_of_range)?;
        if end > self.size {
            return Err(out_of_range());
        }
        Ok(end)
    }

    /// Byte range of `block`; the last block may be shorter than BLOCK_SIZE.
    fn block_bounds(&self, block: u64) -> (u64, u64) {
        let start = block * BLOCK_SIZE;
        (start, (start + BLOCK_SIZE).min(self.size))
    }
}

/// Copies the disk of a snapshot (the overlay `src` and, if the snapshot
/// commits one, its sealed layer) to the new overlay `dst`, for a sandbox
/// started from that snapshot. The overlay's data is copied (holes kept);
/// the sealed layer, never written again, is linked. A pending layer is
/// not: it belongs to no snapshot.
pub fn copy_snapshot_disk(
    src: &Path,
    dst: &Path,
    sealed: Option<SealedLayer>,
) -> Result<(), DiskError> {
    let copy = |from: &Path, to: &Path| {
        crate::fsutil::copy_sparse(from, to).map_err(|source| DiskError::io("copy", from, source))
    };
    copy(src, dst)?;
    let meta = std::fs::read(meta_path(src))
        .map_err(|source| DiskError::io("read", &meta_path(src), source))?;
    meta::write_atomic(&meta_path(dst), &meta)?;
    let merged = merged_path(src);
    let merged_generation = match std::fs::read_to_string(&merged) {
        Ok(text) => {
            copy(&merged, &merged_path(dst))?;
            text.trim().parse::<u64>().ok()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(DiskError::io("read", &merged, source)),
    };
    // A layer already applied to the overlay (a snapshot of a sandbox that
    // ran on) is not needed, and gone.
    if let Some(sealed) = sealed.filter(|s| Some(s.generation) != merged_generation) {
        for (from, to) in [
            (
                layer_path(src, sealed.generation),
                layer_path(dst, sealed.generation),
            ),
            (
                meta_path(&layer_path(src, sealed.generation)),
                meta_path(&layer_path(dst, sealed.generation)),
            ),
        ] {
            crate::fsutil::link_or_copy(&from, &to)
                .map_err(|source| DiskError::io("link", &from, source))?;
        }
    }
    Ok(())
}

/// Where a block's current content is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Pending,
    Overlay,
    Base,
}

fn bit(bitmap: &[u8], block: u64) -> bool {
    bitmap
        .get((block / 8) as usize)
        .is_some_and(|byte| byte & (1 << (block % 8)) != 0)
}

fn set_bit(bitmap: &mut [u8], block: u64) {
    if let Some(byte) = bitmap.get_mut((block / 8) as usize) {
        *byte |= 1 << (block % 8);
    }
}

/// The pending layer's data file of the overlay `overlay`.
fn pending_path(overlay: &Path) -> PathBuf {
    suffixed(overlay, ".pending")
}

/// The data file of the layer sealed for snapshot `generation`.
fn layer_path(overlay: &Path, generation: u64) -> PathBuf {
    suffixed(overlay, &format!(".layer-{generation}"))
}

/// The file naming the generation whose layer the overlay holds.
fn merged_path(overlay: &Path) -> PathBuf {
    suffixed(overlay, ".merged")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The metadata file of the overlay (or layer) whose data file is `overlay`.
fn meta_path(overlay: &Path) -> PathBuf {
    suffixed(overlay, ".meta")
}

/// Opens the base image read-only and returns it with its size.
fn open_base(base: &Path) -> Result<(File, u64), DiskError> {
    let file = File::open(base).map_err(|source| DiskError::io("open", base, source))?;
    let md = file
        .metadata()
        .map_err(|source| DiskError::io("stat", base, source))?;
    if !md.is_file() {
        return Err(DiskError::BaseNotAFile {
            path: base.to_path_buf(),
        });
    }
    Ok((file, md.len()))
}

/// Takes an exclusive advisory lock on the overlay's data file, so two
/// disks never write the same overlay. Released when the file is closed.
fn lock(file: &File, path: &Path) -> Result<(), DiskError> {
    // SAFETY: flock only reads the descriptor number, which `file` keeps open
    // for the duration of the call; it touches no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(DiskError::Locked {
            path: path.to_path_buf(),
        })
    } else {
        Err(DiskError::io("lock", path, err))
    }
}

#[cfg(test)]
mod tests;
