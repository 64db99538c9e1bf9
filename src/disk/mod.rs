//! Copy-on-write block store over a read-only template image.
//!
//! A [`CowDisk`] combines a *base* image, shared by every sandbox made from a
//! template and never written (it is opened read-only), with a per-sandbox
//! *overlay* that holds only the blocks the guest wrote. The overlay is two
//! files:
//!
//! - the **data file** (the path given to [`CowDisk::create`]): a sparse file
//!   as large as the disk; block `i` of the disk, once written, lives at byte
//!   `i * BLOCK_SIZE` of it. Blocks never written are holes and take no space.
//! - the **metadata file** (the same path with `.meta` appended): magic,
//!   version, block size, disk size, an allocation bitmap with one bit per
//!   block, and a CRC-32. It is replaced atomically by [`CowDisk::flush`].
//!
//! Writes go to the data file at once; the bitmap is persisted only by
//! `flush`. After a crash the disk therefore reads as it was at the last
//! flush, except that blocks already recorded may hold newer data, which is
//! what a real disk with a volatile write cache does. The copy-on-write unit
//! is [`BLOCK_SIZE`] bytes: a write that covers a block only partly first
//! copies that block from the base.

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
    /// The data file was written since its last fsync.
    data_dirty: bool,
    /// The bitmap changed since it was last persisted.
    bitmap_dirty: bool,
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
        let mut disk = Self {
            base: base_file,
            base_path: base.to_path_buf(),
            data,
            data_path: overlay.to_path_buf(),
            meta_path: meta_path.clone(),
            size,
            bitmap,
            data_dirty: true,
            bitmap_dirty: true,
        };
        disk.flush().map_err(cleanup)?;
        Ok(disk)
    }

    /// Reopens an overlay made by [`create`](Self::create) over the same
    /// base image, validating its metadata against the base.
    pub fn open(base: &Path, overlay: &Path) -> Result<Self, DiskError> {
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
        Ok(Self {
            base: base_file,
            base_path: base.to_path_buf(),
            data,
            data_path: overlay.to_path_buf(),
            meta_path,
            size,
            bitmap: meta.bitmap,
            data_dirty: false,
            bitmap_dirty: false,
        })
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

    /// How many blocks of [`BLOCK_SIZE`] bytes the overlay holds.
    pub fn allocated_blocks(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Fills `buf` with the disk's bytes starting at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let end = self.check_range(offset, buf.len())?;
        let mut pos = offset;
        while pos < end {
            // The longest run of blocks, from `pos`, that all come from the same file.
            let in_overlay = self.is_allocated(pos / BLOCK_SIZE);
            let mut run_end = ((pos / BLOCK_SIZE) + 1) * BLOCK_SIZE;
            while run_end < end && self.is_allocated(run_end / BLOCK_SIZE) == in_overlay {
                run_end += BLOCK_SIZE;
            }
            let run_end = run_end.min(end);
            let chunk = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            let (file, path) = if in_overlay {
                (&self.data, &self.data_path)
            } else {
                (&self.base, &self.base_path)
            };
            file.read_exact_at(chunk, pos)
                .map_err(|source| DiskError::io("read", path, source))?;
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `buf` to the disk at `offset` (into the overlay only).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let end = self.check_range(offset, buf.len())?;
        let mut pos = offset;
        while pos < end {
            let block = pos / BLOCK_SIZE;
            let (block_start, block_end) = self.block_bounds(block);
            let chunk_end = end.min(block_end);
            let partial = pos > block_start || chunk_end < block_end;
            if partial && !self.is_allocated(block) {
                // Copy the block up from the base, merge the new bytes, write it whole.
                let mut tmp = vec![0u8; (block_end - block_start) as usize];
                self.base
                    .read_exact_at(&mut tmp, block_start)
                    .map_err(|source| DiskError::io("read", &self.base_path, source))?;
                tmp[(pos - block_start) as usize..(chunk_end - block_start) as usize]
                    .copy_from_slice(&buf[(pos - offset) as usize..(chunk_end - offset) as usize]);
                self.write_data(&tmp, block_start)?;
                self.set_allocated(block);
                pos = chunk_end;
                continue;
            }
            // Extend over following blocks that can be written in place: those
            // already in the overlay or covered whole by this write.
            let mut run_end = chunk_end;
            while run_end < end {
                let (next_start, next_end) = self.block_bounds(run_end / BLOCK_SIZE);
                debug_assert_eq!(next_start, run_end);
                let next_chunk_end = end.min(next_end);
                if next_chunk_end == next_end || self.is_allocated(run_end / BLOCK_SIZE) {
                    run_end = next_chunk_end;
                } else {
                    break;
                }
            }
            self.write_data(
                &buf[(pos - offset) as usize..(run_end - offset) as usize],
                pos,
            )?;
            for b in block..=(run_end - 1) / BLOCK_SIZE {
                self.set_allocated(b);
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Makes every completed write durable: fsyncs the data file, then
    /// replaces the metadata file atomically (temporary file, fsync, rename,
    /// fsync of the directory). Does nothing if nothing changed.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        if self.data_dirty {
            self.data
                .sync_data()
                .map_err(|source| DiskError::io("fsync", &self.data_path, source))?;
            self.data_dirty = false;
        }
        if self.bitmap_dirty {
            let meta = Meta {
                block_size: BLOCK_SIZE as u32,
                disk_size: self.size,
                bitmap: self.bitmap.clone(),
            };
            meta.write_atomic(&self.meta_path)?;
            self.bitmap_dirty = false;
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

    fn is_allocated(&self, block: u64) -> bool {
        self.bitmap
            .get((block / 8) as usize)
            .is_some_and(|byte| byte & (1 << (block % 8)) != 0)
    }

    fn set_allocated(&mut self, block: u64) {
        if let Some(byte) = self.bitmap.get_mut((block / 8) as usize) {
            let bit = 1 << (block % 8);
            if *byte & bit == 0 {
                *byte |= bit;
                self.bitmap_dirty = true;
            }
        }
    }

    fn write_data(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.data_dirty = true;
        self.data
            .write_all_at(buf, offset)
            .map_err(|source| DiskError::io("write", &self.data_path, source))
    }
}

/// The metadata file of the overlay whose data file is `overlay`.
fn meta_path(overlay: &Path) -> PathBuf {
    let mut name = overlay.as_os_str().to_owned();
    name.push(".meta");
    PathBuf::from(name)
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
