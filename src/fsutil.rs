//! File helpers shared by the snapshot and disk code: sparse files and
//! sharing immutable files between sandbox directories.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The data extents `[start, end)` of the first `len` bytes of `file`
/// (holes skipped), from `SEEK_DATA`/`SEEK_HOLE`.
pub(crate) fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        // SAFETY: lseek on a descriptor `file` keeps open; no memory involved.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(err);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if hole <= data {
            break;
        }
        extents.push((data, hole));
        pos = hole;
    }
    Ok(extents)
}

/// Copies `src` to the new file `dst` keeping its holes (only data extents
/// are copied, in the kernel), and fsyncs it.
pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> io::Result<()> {
    let from = File::open(src)?;
    let len = from.metadata()?.len();
    let to = File::options().write(true).create_new(true).open(dst)?;
    let copied = (|| {
        to.set_len(len)?;
        for (start, end) in data_extents(&from, len)? {
            let (mut off_in, mut off_out) = (start as libc::loff_t, start as libc::loff_t);
            while (off_in as u64) < end {
                let want = (end - off_in as u64).min(1 << 30) as usize;
                // SAFETY: both descriptors are open for the call; the offset
                // pointers point at locals that outlive it.
                let n = unsafe {
                    libc::copy_file_range(
                        from.as_raw_fd(),
                        &mut off_in,
                        to.as_raw_fd(),
                        &mut off_out,
                        want,
                        0,
                    )
                };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if err.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(err);
                }
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} shrank while being copied", src.display()),
                    ));
                }
            }
        }
        to.sync_all()
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    copied
}

/// Makes `dst` a second name of the immutable file `src` (a hard link, so
/// the two share their data and page cache), or a sparse copy where links
/// cannot be made (another file system).
pub(crate) fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EXDEV) | Some(libc::EPERM) | Some(libc::EMLINK)
            ) =>
        {
            copy_sparse(src, dst)
        }
        Err(e) => Err(e),
    }
}

/// fsyncs a directory (makes renames and new names in it durable).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 5000], 3 << 20).unwrap();
        drop(f);
        let dst = dir.path().join("dst");
        copy_sparse(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let copy = File::open(&dst).unwrap();
        let extents = data_extents(&copy, 8 << 20).unwrap();
        let data: u64 = extents.iter().map(|(s, e)| e - s).sum();
        assert!(data < 1 << 20, "holes were filled: {extents:?}");
        // Never over an existing file.
        assert!(copy_sparse(&src, &dst).is_err());
    }

    #[test]
    fn links_share_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        std::fs::write(&src, b"x").unwrap();
        let dst = dir.path().join("b");
        link_or_copy(&src, &dst).unwrap();
        std::fs::remove_file(&src).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"x");
    }
}
