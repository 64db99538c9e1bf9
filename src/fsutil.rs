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

/// Turns `O_DIRECT` on or off for `file`. Turning it on fails (`EINVAL`)
/// where the file system has no direct I/O (tmpfs): the caller then writes
/// through the page cache.
pub(crate) fn set_direct_io(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor `file` keeps open; no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `file` was opened or set for direct I/O.
fn is_direct_io(file: &File) -> bool {
    // SAFETY: fcntl on a descriptor `file` keeps open; no memory involved.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_DIRECT != 0
}

/// At most this many buffers per `pwritev` (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// At most this many bytes per `pwritev` (Linux writes at most ~2 GiB per
/// call; smaller calls keep each request a reasonable size).
const MAX_WRITE: usize = 64 << 20;

/// How many of the buffers of lengths `lens` (one at least) the next
/// vectored call takes: up to [`MAX_IOVECS`] and [`MAX_WRITE`] bytes.
fn batch(lens: impl Iterator<Item = usize>) -> usize {
    let (mut count, mut bytes) = (0, 0);
    for len in lens.take(MAX_IOVECS) {
        if count > 0 && bytes + len > MAX_WRITE {
            break;
        }
        bytes += len;
        count += 1;
    }
    count
}

/// Writes `bufs` one after another to `file` from `offset`, in calls of
/// up to [`MAX_IOVECS`] buffers. With `O_DIRECT` (see [`set_direct_io`])
/// every buffer, its length and `offset` must be aligned to the device's
/// block size; a write the kernel refuses as unaligned (`EINVAL`) turns
/// direct I/O off and is retried through the page cache.
pub(crate) fn write_all_vectored_at(
    file: &File,
    bufs: &[&[u8]],
    mut offset: u64,
) -> io::Result<()> {
    let mut slices: Vec<io::IoSlice<'_>> = bufs
        .iter()
        .flat_map(|buf| buf.chunks(MAX_WRITE))
        .map(io::IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let count = batch(rest.iter().map(|slice| slice.len()));
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix; the
        // `count` (≤ IOV_MAX) buffers are valid for reads of their lengths
        // for the call; the descriptor is open.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                rest.as_ptr().cast(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) if is_direct_io(file) => {
                    set_direct_io(file, false)?;
                    continue;
                }
                _ => return Err(err),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the file system accepted no more bytes",
            ));
        }
        offset += n as u64;
        io::IoSlice::advance_slices(&mut rest, n as usize);
    }
    Ok(())
}

/// Fills `bufs` one after another from `file` at `offset`, in calls of up
/// to [`MAX_IOVECS`] buffers and [`MAX_WRITE`] bytes: one sequential read
/// for data that lies in one piece in the file but in many places in
/// memory. The end of the file before every buffer is full is
/// `UnexpectedEof`.
pub(crate) fn read_exact_vectored_at(
    file: &File,
    bufs: &mut [&mut [u8]],
    mut offset: u64,
) -> io::Result<()> {
    let mut slices: Vec<io::IoSliceMut<'_>> = bufs
        .iter_mut()
        .flat_map(|buf| buf.chunks_mut(MAX_WRITE))
        .map(io::IoSliceMut::new)
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let count = batch(rest.iter().map(|slice| slice.len()));
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on Unix; the
        // `count` (≤ IOV_MAX) buffers are valid for writes of their
        // lengths for the call and borrowed by nothing else; the
        // descriptor is open.
        let n = unsafe {
            libc::preadv(
                file.as_raw_fd(),
                rest.as_ptr().cast(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file ends before the data read from it",
            ));
        }
        offset += n as u64;
        io::IoSliceMut::advance_slices(&mut rest, n as usize);
    }
    Ok(())
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

/// A new file at `path` (never an existing one), open for reading and
/// writing.
pub(crate) fn create_new_rw(path: &Path) -> io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
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
    fn vectored_writes_land_in_order_with_or_without_direct_io() {
        let dir = tempfile::tempdir().unwrap();
        // Page-aligned buffers (as guest memory is): 3 pages, 2 pages, and
        // one unaligned 100-byte tail that turns direct I/O off.
        let mut pages = vec![0u8; 6 * 4096 + 4096];
        let start = pages.as_ptr().align_offset(4096);
        let aligned = &mut pages[start..start + 6 * 4096];
        for (i, page) in aligned.chunks_mut(4096).enumerate() {
            page.fill(i as u8 + 1);
        }
        let (a, b) = aligned.split_at(3 * 4096);
        let tail = [9u8; 100];
        for direct in [true, false] {
            let path = dir.path().join(format!("f{direct}"));
            let file = super::create_new_rw(&path).unwrap();
            if direct {
                // May be refused (tmpfs): the writes must land either way.
                let _ = set_direct_io(&file, true);
            }
            write_all_vectored_at(&file, &[a, &b[..2 * 4096]], 4096).unwrap();
            write_all_vectored_at(&file, &[&tail], 6 * 4096).unwrap();
            let data = std::fs::read(&path).unwrap();
            assert_eq!(data.len(), 6 * 4096 + 100);
            assert!(data[..4096].iter().all(|&x| x == 0));
            for i in 0..5 {
                let page = &data[(i + 1) * 4096..(i + 2) * 4096];
                assert!(page.iter().all(|&x| x == i as u8 + 1), "page {i}");
            }
            assert_eq!(&data[6 * 4096..], &tail);
        }
        // More buffers than one call takes.
        let path = dir.path().join("many");
        let file = File::create(&path).unwrap();
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let bufs: Vec<&[u8]> = bytes.chunks(1).collect();
        write_all_vectored_at(&file, &bufs, 10).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[10..], &bytes[..]);

        // Read back into as many pieces, and past the end.
        let file = File::open(&path).unwrap();
        let mut back = vec![0u8; 3000];
        let mut pieces: Vec<&mut [u8]> = back.chunks_mut(1).collect();
        read_exact_vectored_at(&file, &mut pieces, 10).unwrap();
        assert_eq!(back, bytes);
        let mut two = [[0u8; 8]; 2];
        let [a, b] = &mut two;
        let mut pieces: Vec<&mut [u8]> = vec![a, b];
        let err = read_exact_vectored_at(&file, &mut pieces, 3000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(two[0], bytes[2990..2998], "what the file holds is read");
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
