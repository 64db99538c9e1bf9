//! Guest memory loaded on first access through `userfaultfd(2)`.
//!
//! A resume maps the long runs of a memory layer privately from its file
//! (see [`super::memory::map_layers`]); a mapping per short run would cost a
//! VMA each, so those are served here instead: each *window* (a stretch of
//! guest memory holding short runs, with the base pages between them) is made
//! anonymous and registered with a userfaultfd, and a thread of its own
//! fills a page the first time anything touches it (a vCPU through KVM, a
//! device, a pause reading it) with the data of the layer that holds it, or
//! of the base. Nothing is read before the vCPUs start, so a resume costs the
//! same whether the layers hold a few long runs or thousands of short ones.
//!
//! The thread ends when the last window is unmapped (the memory dropped):
//! the userfaultfd reports each unmapping (`UFFD_FEATURE_EVENT_UNMAP`). A
//! host whose kernel or permissions refuse a userfaultfd gets `None` from
//! [`Userfaultfd::open`], and the caller copies the pages instead.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use super::memory::PAGE_SIZE;

// From <linux/userfaultfd.h>.
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_UNMAP: u8 = 0x16;
/// `sizeof(struct uffd_msg)`.
const MSG_SIZE: usize = 32;

/// `_IOC(dir, 0xAA, nr, size)`.
const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr) as libc::c_ulong
}
const IOC_READ_WRITE: u64 = 3;
const IOC_READ: u64 = 2;
const UFFDIO_API: libc::c_ulong = ioc(IOC_READ_WRITE, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(IOC_READ_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(IOC_READ_WRITE, 0x03, size_of::<UffdioCopy>());
/// `USERFAULTFD_IOC_NEW` of `/dev/userfaultfd`: `_IO(0xAA, 0)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, 0x00, 0);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// An open userfaultfd that reports page faults and unmappings.
#[derive(Debug)]
pub struct Userfaultfd(OwnedFd);

impl Userfaultfd {
    /// A new userfaultfd, or `None` (with the reason logged) where the
    /// kernel has none or this process may not handle kernel-mode faults
    /// with one (`vm.unprivileged_userfaultfd` is 0 and neither
    /// `CAP_SYS_PTRACE` nor access to `/dev/userfaultfd`).
    pub fn open() -> Option<Userfaultfd> {
        match Self::try_open() {
            Ok(uffd) => Some(uffd),
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    log::info!(
                        "no userfaultfd ({e}): short runs of memory layers are copied at resume"
                    )
                });
                None
            }
        }
    }

    fn try_open() -> io::Result<Userfaultfd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the system call takes flags only and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as libc::c_int
        } else {
            let syscall_error = io::Error::last_os_error();
            // Where the system call is refused, the device may be allowed.
            let dev = File::open("/dev/userfaultfd").map_err(|_| syscall_error)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and
            // returns a new descriptor or -1.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let uffd = Userfaultfd(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_EVENT_UNMAP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `api` is and outlives the call.
        if unsafe { libc::ioctl(uffd.0.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(uffd)
    }

    /// Makes `len` bytes at `addr` anonymous and empty (`MAP_FIXED`: the
    /// pages there before are dropped) and reports their first accesses.
    ///
    /// # Safety
    /// `addr..addr + len` must be page-aligned and lie within a mapping
    /// the caller owns and that nothing accesses meanwhile.
    pub unsafe fn register(&self, addr: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: the caller's promise: the range is its own mapping, so
        // replacing it changes no memory anything else relies on.
        let mapped = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut register = UffdioRegister {
            range: UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct
        // uffdio_register`, which `register` is and outlives the call.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), UFFDIO_REGISTER, &mut register) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Where some pages of a window come from: `file` at `offset` (pages not
/// in any piece come from the base, at their own offset).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Guest pages (counted across regions, as in a memory file).
    pub pages: Range<usize>,
    /// Index into the files given to [`serve`].
    pub file: usize,
    /// Offset of the first page in that file.
    pub offset: u64,
}

/// A registered stretch of guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Its host address.
    pub addr: usize,
    /// Its guest pages (counted across regions).
    pub pages: Range<usize>,
}

/// Where the thread filling guest memory reports a page whose data it
/// cannot read (the memory file went bad after the resume checked it).
/// Whoever watches it ([`on_failure`](Self::on_failure): the machine)
/// stops the guest for good, so that no guest runs on, and no pause
/// saves, memory that is not what was paused.
#[derive(Default)]
pub struct LoadFailure(Mutex<FailureState>);

type FailureWatcher = Box<dyn Fn(&str) + Send>;

#[derive(Default)]
struct FailureState {
    reason: Option<String>,
    watcher: Option<FailureWatcher>,
}

impl LoadFailure {
    fn state(&self) -> std::sync::MutexGuard<'_, FailureState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records the first failure and tells the watcher.
    pub fn report(&self, reason: String) {
        let mut state = self.state();
        if state.reason.is_some() {
            return;
        }
        if let Some(watcher) = &state.watcher {
            watcher(&reason);
        }
        state.reason = Some(reason);
    }

    /// Calls `watcher` with the failure: now if there was one, else when
    /// one is reported.
    pub fn on_failure(&self, watcher: FailureWatcher) {
        let mut state = self.state();
        if let Some(reason) = &state.reason {
            watcher(reason);
        }
        state.watcher = Some(watcher);
    }

    /// The failure, if one was reported.
    pub fn reason(&self) -> Option<String> {
        self.state().reason.clone()
    }
}

impl std::fmt::Debug for LoadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LoadFailure").field(&self.reason()).finish()
    }
}

/// Starts the thread that fills `windows` (each registered with `uffd`):
/// a page that is touched at once, the others in the background, in
/// address order, between faults. A page comes from the piece holding it
/// (`pieces`, non-overlapping), else from `files[base]` at the page's own
/// offset. The thread ends when every window is unmapped. A page it
/// cannot read is reported to `failure` (and filled with zeros, for
/// whoever waits for it must not wait forever: the guest is stopped).
pub fn serve(
    uffd: Userfaultfd,
    mut windows: Vec<Window>,
    mut pieces: Vec<Piece>,
    files: Vec<File>,
    base: usize,
    failure: Arc<LoadFailure>,
) -> io::Result<std::thread::JoinHandle<()>> {
    windows.sort_by_key(|w| w.addr);
    pieces.sort_by_key(|p| p.pages.start);
    let mapped = windows.iter().map(|w| w.pages.len() * PAGE_SIZE).sum();
    let next = windows.first().map(|w| (0, w.pages.start));
    let server = Server {
        uffd,
        windows,
        pieces,
        files,
        base,
        mapped,
        next,
        buf: vec![0; BACKGROUND_PAGES.max(FAULT_PAGES) * PAGE_SIZE],
        failure,
    };
    std::thread::Builder::new()
        .name("dormouse-pages".into())
        .spawn(move || server.run())
}

/// Pages filled per fault at most (the rest of a run is likely next).
const FAULT_PAGES: usize = 16;

/// Pages filled per step of the background fill.
const BACKGROUND_PAGES: usize = 64;

struct Server {
    uffd: Userfaultfd,
    windows: Vec<Window>,
    pieces: Vec<Piece>,
    files: Vec<File>,
    base: usize,
    /// Bytes of the windows still mapped.
    mapped: usize,
    /// Where the background fill goes on: a window and a page in it.
    next: Option<(usize, usize)>,
    buf: Vec<u8>,
    failure: Arc<LoadFailure>,
}

/// How a fill ended.
enum Filled {
    /// These many pages from the one asked for are there now.
    Pages(usize),
    /// The kernel asked to try again (the memory map is changing).
    Again,
}

impl Server {
    fn run(mut self) {
        let fd = self.uffd.0.as_raw_fd();
        let mut msgs = [0u8; MSG_SIZE * 16];
        // Faults the kernel asked to retry.
        let mut retry: Vec<usize> = Vec::new();
        while self.mapped > 0 {
            let mut poll = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = if !retry.is_empty() {
                10
            } else if self.next.is_some() {
                0
            } else {
                -1
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("guest memory server: poll: {e}");
                return;
            }
            for addr in std::mem::take(&mut retry) {
                self.fault(addr, &mut retry);
            }
            if ready == 0 {
                self.fill_next();
                continue;
            }
            // SAFETY: reads at most `msgs.len()` bytes into `msgs`.
            let n = unsafe { libc::read(fd, msgs.as_mut_ptr().cast(), msgs.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    log::error!("guest memory server: read: {e}");
                    return;
                }
                continue;
            }
            for msg in msgs[..n as usize].chunks_exact(MSG_SIZE) {
                let word = |i: usize| {
                    u64::from_ne_bytes(msg[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"))
                };
                match msg[0] {
                    UFFD_EVENT_PAGEFAULT => self.fault(word(1) as usize, &mut retry),
                    UFFD_EVENT_UNMAP => self.unmapped(word(0) as usize..word(1) as usize),
                    other => log::debug!("guest memory server: event {other:#x} ignored"),
                }
            }
        }
    }

    /// Fills the page at `addr` and what follows it from the same source
    /// (up to [`FAULT_PAGES`]), and wakes whoever waits for it.
    fn fault(&mut self, addr: usize, retry: &mut Vec<usize>) {
        let addr = addr & !(PAGE_SIZE - 1);
        let i = self
            .windows
            .partition_point(|w| w.addr + w.pages.len() * PAGE_SIZE <= addr);
        let Some(window) = self.windows.get(i).filter(|w| w.addr <= addr) else {
            // Not ours (a window already unmapped): let it fault again.
            self.wake(addr);
            return;
        };
        let page = window.pages.start + (addr - window.addr) / PAGE_SIZE;
        if let Filled::Again = self.fill(i, page, FAULT_PAGES) {
            retry.push(addr);
        }
    }

    /// One step of the background fill.
    fn fill_next(&mut self) {
        let Some((i, page)) = self.next else {
            return;
        };
        let filled = match self.fill(i, page, BACKGROUND_PAGES) {
            Filled::Pages(n) => n,
            Filled::Again => return, // after the next event
        };
        let end = self.windows[i].pages.end;
        self.next = if page + filled < end {
            Some((i, page + filled))
        } else {
            self.windows.get(i + 1).map(|w| (i + 1, w.pages.start))
        };
    }

    /// Fills guest page `page` of window `i` and up to `max - 1` pages
    /// after it from the same source, skipping those already there.
    fn fill(&mut self, i: usize, page: usize, max: usize) -> Filled {
        let window = &self.windows[i];
        let last = window.pages.end;
        let addr = window.addr + (page - window.pages.start) * PAGE_SIZE;
        let j = self.pieces.partition_point(|p| p.pages.end <= page);
        let (file, offset, pages) = match self.pieces.get(j) {
            Some(piece) if piece.pages.start <= page => (
                piece.file,
                piece.offset + ((page - piece.pages.start) * PAGE_SIZE) as u64,
                piece.pages.end - page,
            ),
            next => (
                self.base,
                (page * PAGE_SIZE) as u64,
                next.map_or(last, |p| p.pages.start.min(last)) - page,
            ),
        };
        let pages = pages.min(last - page).min(max);
        let len = pages * PAGE_SIZE;
        if let Err(e) = read_retrying(&self.files[file], &mut self.buf[..len], offset) {
            // The guest is stopped first; the pages cannot stay missing
            // (whoever touched them would wait forever): zeros.
            let reason =
                format!("cannot read guest pages from a memory file (at offset {offset}): {e}");
            log::error!("guest memory server: {reason}; the guest is stopped");
            self.failure.report(reason);
            self.buf[..len].fill(0);
        }
        let mut done = 0;
        while done < pages {
            let at = addr + done * PAGE_SIZE;
            match self.copy(at, done * PAGE_SIZE..len) {
                Ok(()) => done = pages,
                Err((e, copied)) => {
                    done += copied / PAGE_SIZE;
                    match e.raw_os_error() {
                        // The page at `done` is there already: wake whoever
                        // waits for it, go on after it.
                        Some(libc::EEXIST) => {
                            self.wake(addr + done * PAGE_SIZE);
                            done += 1;
                        }
                        Some(libc::EAGAIN) if done == 0 => return Filled::Again,
                        Some(libc::EAGAIN) => break,
                        // The window was unmapped meanwhile.
                        _ => return Filled::Pages(pages),
                    }
                }
            }
        }
        Filled::Pages(done)
    }

    /// Copies `self.buf[range]` to `addr`; on failure, the error and the
    /// bytes copied before it.
    fn copy(&self, addr: usize, range: Range<usize>) -> Result<(), (io::Error, usize)> {
        let mut copy = UffdioCopy {
            dst: addr as u64,
            src: self.buf[range.clone()].as_ptr() as u64,
            len: range.len() as u64,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes a `struct uffdio_copy`,
        // which `copy` is; it reads `range.len()` bytes of `self.buf` into
        // the registered range, which only this thread fills.
        if unsafe { libc::ioctl(self.uffd.0.as_raw_fd(), UFFDIO_COPY, &mut copy) } != 0 {
            let e = io::Error::last_os_error();
            return Err((e, usize::try_from(copy.copy).unwrap_or(0)));
        }
        Ok(())
    }

    /// Wakes whoever waits for the page at `addr`.
    fn wake(&self, addr: usize) {
        let mut range = UffdioRange {
            start: addr as u64,
            len: PAGE_SIZE as u64,
        };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which `range`
        // is. An error means nothing waits there.
        unsafe { libc::ioctl(self.uffd.0.as_raw_fd(), UFFDIO_WAKE, &mut range) };
    }

    fn unmapped(&mut self, range: Range<usize>) {
        for w in &self.windows {
            let (start, end) = (w.addr, w.addr + w.pages.len() * PAGE_SIZE);
            let overlap = end.min(range.end).saturating_sub(start.max(range.start));
            self.mapped = self.mapped.saturating_sub(overlap);
        }
    }
}

/// `read_exact_at`, tried again after a transient error.
fn read_retrying(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match file.read_exact_at(buf, offset) {
            Err(e) if tries < 3 && e.kind() != io::ErrorKind::UnexpectedEof => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(1 << tries));
            }
            result => return result,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Whether this test may go on: a userfaultfd is there, or (outside
    /// CI) the test says loudly that it skips.
    pub(crate) fn userfaultfd_or_skip(test: &str) -> Option<Userfaultfd> {
        let uffd = Userfaultfd::open();
        if uffd.is_none() {
            crate::vmm::tests::skip_unless_ci(test, "no userfaultfd");
        }
        uffd
    }

    #[test]
    fn pages_are_filled_on_first_access_and_the_server_ends_with_the_mapping() {
        let Some(uffd) = userfaultfd_or_skip("lazy pages") else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let pages = 64;
        let file_of = |name: &str, value: &dyn Fn(usize) -> u8, count: usize| {
            let file = crate::fsutil::create_new_rw(&dir.path().join(name)).unwrap();
            for page in 0..count {
                file.write_all_at(&[value(page); PAGE_SIZE], (page * PAGE_SIZE) as u64)
                    .unwrap();
            }
            file
        };
        // The base: page p holds p; a layer: its page i holds 200 + i.
        let base = file_of("base", &|p| p as u8, pages);
        let layer = file_of("layer", &|i| 200 + i as u8, 10);
        // SAFETY: a new anonymous mapping that this test owns.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        let mem = mem.cast::<u8>();
        // Guest pages 10..50 lazily; the layer holds 12..15 and 40..46.
        let window = Window {
            // SAFETY: page 10 of the mapping.
            addr: unsafe { mem.add(10 * PAGE_SIZE) } as usize,
            pages: 10..50,
        };
        // SAFETY: pages 10..50 of this test's own mapping.
        unsafe { uffd.register(window.addr as *mut u8, 40 * PAGE_SIZE) }.unwrap();
        let pieces = vec![
            Piece {
                pages: 40..46,
                file: 0,
                offset: 4 * PAGE_SIZE as u64,
            },
            Piece {
                pages: 12..15,
                file: 0,
                offset: 0,
            },
        ];
        let server = serve(
            uffd,
            vec![window],
            pieces,
            vec![layer, base],
            1,
            Arc::default(),
        )
        .unwrap();
        // Touched from several threads at once, out of order.
        let expected = |page: usize| match page {
            12..15 => 200 + (page - 12) as u8,
            40..46 => 204 + (page - 40) as u8,
            10..50 => page as u8,
            _ => 0, // outside the window: the anonymous mapping's zeros
        };
        let addr = mem as usize;
        std::thread::scope(|s| {
            for t in 0..4 {
                s.spawn(move || {
                    for page in (0..pages).rev().filter(|p| p % 4 == t).chain(0..pages) {
                        // SAFETY: within this test's mapping, which lives
                        // until after the scope; the server only writes
                        // missing pages, atomically.
                        let byte = unsafe { *((addr + page * PAGE_SIZE + 7) as *const u8) };
                        assert_eq!(byte, expected(page), "page {page}");
                    }
                });
            }
        });
        // Writes stay private to the mapping.
        // SAFETY: page 13 of this test's mapping.
        unsafe { *mem.add(13 * PAGE_SIZE) = 1 };
        // SAFETY: as above.
        assert_eq!(unsafe { *mem.add(13 * PAGE_SIZE) }, 1);
        // SAFETY: unmaps this test's own mapping, which nothing uses now.
        assert_eq!(unsafe { libc::munmap(mem.cast(), pages * PAGE_SIZE) }, 0);
        server.join().unwrap();
    }
}
