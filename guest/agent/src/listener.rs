//! Where connections come from: AF_VSOCK in a VM, a Unix socket in
//! development. This is the only code that differs between the two modes.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::sys::cvt;

/// A listening socket.
pub enum Listener {
    /// AF_VSOCK on every CID, the given port.
    Vsock(OwnedFd, u32),
    /// A Unix socket at the given path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on AF_VSOCK port `port` for any CID.
    pub fn vsock(port: u32) -> io::Result<Self> {
        // SAFETY: socket has no memory effects.
        let fd = cvt(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: socket succeeded, so `fd` is open and ours alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_vm is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // SAFETY: the pointer and length describe `addr`, a sockaddr_vm.
        cvt(unsafe {
            libc::bind(
                raw,
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen has no memory effects.
        cvt(unsafe { libc::listen(raw, 128) })?;
        Ok(Self::Vsock(fd, port))
    }

    /// Listens on a Unix socket at `path`, replacing a stale socket file.
    pub fn unix(path: &Path) -> io::Result<Self> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Self::Unix(UnixListener::bind(path)?, path.to_owned()))
    }

    /// Waits for the next connection. The connection is returned as a
    /// `File` (a plain close-on-exec descriptor read and written with
    /// `read(2)`/`write(2)`), whatever the socket family.
    pub fn accept(&self) -> io::Result<File> {
        match self {
            Self::Vsock(fd, _) => {
                let raw = std::os::fd::AsRawFd::as_raw_fd(fd);
                loop {
                    // SAFETY: null address pointers are allowed; accept4 has no
                    // other memory effects.
                    let conn = unsafe {
                        libc::accept4(
                            raw,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        )
                    };
                    match cvt(conn) {
                        // SAFETY: accept4 succeeded, so `conn` is open and ours.
                        Ok(conn) => return Ok(File::from(unsafe { OwnedFd::from_raw_fd(conn) })),
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
            }
            Self::Unix(listener, _) => {
                let (stream, _) = listener.accept()?;
                Ok(File::from(OwnedFd::from(stream)))
            }
        }
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Vsock(_, port) => format!("vsock port {port}"),
            Self::Unix(_, path) => format!("unix socket {}", path.display()),
        }
    }
}
