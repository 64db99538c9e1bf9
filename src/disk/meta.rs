//! The overlay's metadata file: which blocks of the disk live in the overlay.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"DMSECOW\0"` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | block size in bytes (4096) |
//! | 16 | 8 | disk size in bytes (the base image's size when the overlay was created) |
//! | 24 | 8 | bitmap length in bytes (`ceil(ceil(disk size / block size) / 8)`) |
//! | 32 | n | allocation bitmap: bit `i % 8` of byte `i / 8` set = block `i` is in the overlay |
//! | 32 + n | 4 | CRC-32 (IEEE) of bytes `0 .. 32 + n` |
//!
//! The file is only ever replaced whole (write a temporary file, fsync,
//! rename over the old one, fsync the directory), so a crash leaves either
//! the previous version or the new one.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use super::DiskError;

/// Identifies a dormouse overlay metadata file.
pub(super) const MAGIC: [u8; 8] = *b"DMSECOW\0";
/// The only format version this code reads and writes.
pub(super) const VERSION: u32 = 1;
/// Bytes before the bitmap.
const HEADER_LEN: usize = 32;
/// Bytes after the bitmap (the checksum).
const TRAILER_LEN: usize = 4;
/// A metadata file larger than this is rejected before it is read: it would
/// describe a disk of more than 2^30 blocks (4 TiB at 4 KiB blocks).
const MAX_BITMAP_LEN: u64 = 1 << 27;

/// The decoded contents of a metadata file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Meta {
    /// Granularity of copy-on-write, in bytes.
    pub block_size: u32,
    /// Size of the disk (and of the base image) in bytes.
    pub disk_size: u64,
    /// One bit per block, see the module docs.
    pub bitmap: Vec<u8>,
}

/// Number of bitmap bytes for a disk of `disk_size` bytes.
pub(super) fn bitmap_len(disk_size: u64, block_size: u64) -> u64 {
    disk_size.div_ceil(block_size).div_ceil(8)
}

impl Meta {
    /// Serialises the metadata, checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.bitmap.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.bitmap.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.bitmap);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and validates `bytes` read from `path` (named in errors).
    /// Checks everything that does not need the base image: the caller
    /// compares `disk_size` with the base.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<Self, DiskError> {
        let corrupt = |reason: String| DiskError::CorruptOverlay {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_LEN + TRAILER_LEN {
            return Err(corrupt(format!(
                "{} bytes long, shorter than the {}-byte header",
                bytes.len(),
                HEADER_LEN + TRAILER_LEN
            )));
        }
        if bytes[0..8] != MAGIC {
            return Err(corrupt("wrong magic: not a dormouse overlay".to_owned()));
        }
        let version = le_u32(&bytes[8..12]);
        if version != VERSION {
            return Err(corrupt(format!(
                "format version {version}, this build reads version {VERSION}"
            )));
        }
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
        let stored_crc = le_u32(trailer);
        if crc32(body) != stored_crc {
            return Err(corrupt("checksum mismatch".to_owned()));
        }
        let block_size = le_u32(&bytes[12..16]);
        if !block_size.is_power_of_two() || block_size < 512 {
            return Err(corrupt(format!("invalid block size {block_size}")));
        }
        let disk_size = le_u64(&bytes[16..24]);
        let stored_len = le_u64(&bytes[24..32]);
        let expected_len = bitmap_len(disk_size, u64::from(block_size));
        if stored_len != expected_len || stored_len != (body.len() - HEADER_LEN) as u64 {
            return Err(corrupt(format!(
                "bitmap of {stored_len} bytes in a {}-byte file, a {disk_size}-byte disk needs \
                 {expected_len}",
                bytes.len()
            )));
        }
        let bitmap = body[HEADER_LEN..].to_vec();
        let blocks = disk_size.div_ceil(u64::from(block_size));
        if let Some(&last) = bitmap.last() {
            let used_bits = blocks - (bitmap.len() as u64 - 1) * 8;
            if used_bits < 8 && last >> used_bits != 0 {
                return Err(corrupt(
                    "bits set for blocks past the end of the disk".to_owned(),
                ));
            }
        }
        Ok(Self {
            block_size,
            disk_size,
            bitmap,
        })
    }

    /// Reads and decodes the metadata file at `path`.
    pub fn read(path: &Path) -> Result<Self, DiskError> {
        let mut file = File::open(path).map_err(|source| DiskError::io("open", path, source))?;
        let len = file
            .metadata()
            .map_err(|source| DiskError::io("stat", path, source))?
            .len();
        let max = (HEADER_LEN + TRAILER_LEN) as u64 + MAX_BITMAP_LEN;
        if len > max {
            return Err(DiskError::CorruptOverlay {
                path: path.to_path_buf(),
                reason: format!("{len} bytes long, larger than any valid overlay metadata"),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        file.read_to_end(&mut bytes)
            .map_err(|source| DiskError::io("read", path, source))?;
        Self::decode(&bytes, path)
    }

    /// Replaces the metadata file at `path` atomically and durably.
    pub fn write_atomic(&self, path: &Path) -> Result<(), DiskError> {
        write_atomic(path, &self.encode())
    }
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file,
/// fsync, rename, fsync of the directory.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DiskError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|source| DiskError::io("create", &tmp, source))?;
        file.write_all(bytes)
            .map_err(|source| DiskError::io("write", &tmp, source))?;
        file.sync_all()
            .map_err(|source| DiskError::io("fsync", &tmp, source))?;
        std::fs::rename(&tmp, path).map_err(|source| DiskError::io("rename over", path, source))
    })();
    if result.is_err() {
        // Best effort: the temporary file is garbage now.
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_parent_dir(path)
}

/// The temporary file `write_atomic` writes before renaming it over `path`.
pub(super) fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Makes a rename or creation in `path`'s directory durable.
pub(super) fn sync_parent_dir(path: &Path) -> Result<(), DiskError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file = File::open(dir).map_err(|source| DiskError::io("open directory", dir, source))?;
    match file.sync_all() {
        Ok(()) => Ok(()),
        // Some file systems cannot fsync a directory; there is nothing better to do.
        Err(e) if e.kind() == ErrorKind::InvalidInput => Ok(()),
        Err(source) => Err(DiskError::io("fsync directory", dir, source)),
    }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), as zlib computes
/// it (`crc32fast`: several GB/s where the CPU has carry-less multiply).
pub(crate) fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    fn sample() -> Meta {
        Meta {
            block_size: 4096,
            disk_size: 10 * 4096 + 100,
            bitmap: vec![0b1000_0001, 0b0000_0100],
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(bytes.len(), 32 + 2 + 4);
        assert_eq!(Meta::decode(&bytes, Path::new("x")).unwrap(), m);
    }

    #[test]
    fn every_single_byte_corruption_is_detected() {
        let bytes = sample().encode();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                matches!(
                    Meta::decode(&b, Path::new("x")),
                    Err(DiskError::CorruptOverlay { .. })
                ),
                "flipping byte {i} went unnoticed"
            );
        }
        for len in 0..bytes.len() {
            assert!(Meta::decode(&bytes[..len], Path::new("x")).is_err());
        }
    }

    #[test]
    fn bits_past_the_end_are_rejected() {
        let mut m = sample();
        // 11 blocks: bits 0..=10 valid, bit 11 (byte 1, bit 3) is not.
        m.bitmap[1] |= 0b0000_1000;
        let err = Meta::decode(&m.encode(), Path::new("x")).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
    }
}
