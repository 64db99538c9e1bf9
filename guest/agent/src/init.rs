//! The PID 1 duties: file systems, standard descriptors, host name, the
//! loopback interface, the base environment of commands, and power-off.
//!
//! Everything here is idempotent and logs (rather than fails on) what it
//! cannot do: PID 1 must never exit, and a guest with, say, no `/dev/shm` is
//! still useful.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::time::Duration;

use crate::log::log;
use crate::sys::cvt;

/// The `PATH` commands get.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host name when `/etc/hostname` gives none.
const DEFAULT_HOSTNAME: &str = "dormouse";

struct Mount {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const MOUNTS: &[Mount] = &[
    Mount {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: "",
    },
    Mount {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: "mode=0755",
    },
    Mount {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "gid=5,mode=0620,ptmxmode=0666",
    },
    Mount {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=1777",
    },
    Mount {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: "mode=0755",
    },
];

/// Sets the guest up. Called once, first thing, when the agent is PID 1 and
/// before any thread is started (it changes the process environment).
pub fn setup() {
    for m in MOUNTS {
        if let Err(e) = mount(m) {
            log!("cannot mount {} on {}: {e}", m.fstype, m.target);
        }
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        match std::os::unix::fs::symlink(target, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => log!("cannot create {link}: {e}"),
        }
    }
    if let Err(e) = set_hostname() {
        log!("cannot set the host name: {e}");
    }
    if let Err(e) = loopback_up() {
        log!("cannot bring the loopback interface up: {e}");
    }
    // SAFETY (of set_var): no other thread exists yet, so nothing reads the
    // environment concurrently.
    std::env::set_var("PATH", DEFAULT_PATH);
    std::env::set_var("HOME", "/root");
    std::env::set_var("LANG", "C.UTF-8");
    if std::env::var_os("TERM").is_none() {
        std::env::set_var("TERM", "linux");
    }
    if let Err(e) = std::env::set_current_dir("/") {
        log!("cannot change to /: {e}");
    }
}

/// Mounts `m` unless something is mounted there already (the kernel mounts
/// devtmpfs on `/dev` itself with `CONFIG_DEVTMPFS_MOUNT`).
fn mount(m: &Mount) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o755).create(m.target) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if is_mount_point(m.target)? {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (source, target, fstype, data) = (c(m.source)?, c(m.target)?, c(m.fstype)?, c(m.data)?);
    // SAFETY: all four pointers are NUL-terminated strings that outlive the
    // call.
    cvt(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            m.flags,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

/// Whether `path` is on another file system than its parent directory.
fn is_mount_point(path: &str) -> io::Result<bool> {
    let dev = fs::metadata(path)?.dev();
    let parent = fs::metadata(format!("{path}/.."))?.dev();
    Ok(dev != parent)
}

/// Makes sure descriptors 0, 1 and 2 are open (the kernel leaves them closed
/// when it found no console), so that no pipe or socket of the agent ever
/// gets one of those numbers. Called in both modes.
pub fn ensure_std_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on any number is harmless.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        for path in [c"/dev/console", c"/dev/null"] {
            // SAFETY: `path` is a NUL-terminated string; open returns the
            // lowest free number, which is `fd` as all lower ones are open.
            let got = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) };
            if got >= 0 {
                break;
            }
        }
    }
}

fn set_hostname() -> io::Result<()> {
    let name = fs::read_to_string("/etc/hostname").unwrap_or_default();
    let name = name.lines().next().unwrap_or("").trim();
    let name = if name.is_empty() || name.len() > 64 {
        DEFAULT_HOSTNAME
    } else {
        name
    };
    // SAFETY: the pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// `ip link set lo up`, so that programs in the guest can talk over
/// 127.0.0.1.
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket has no memory effects; the fd is closed below.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: an all-zero ifreq is a valid value (empty name, zero union).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq that SIOCGIFFLAGS fills in.
    let result = cvt(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) }).and_then(|_| {
        // SAFETY: SIOCGIFFLAGS set the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
        // SAFETY: `req` is a valid ifreq naming "lo" with the new flags.
        cvt(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) })
    });
    // SAFETY: `fd` is the socket opened above and closed exactly once.
    unsafe { libc::close(fd) };
    result.map(drop)
}

/// Stops every process, flushes the file systems and powers the VM off.
/// Never returns: if the power-off itself fails, the agent idles forever
/// (PID 1 exiting would panic the kernel).
pub fn power_off(reason: &str) -> ! {
    log!("powering off: {reason}");
    // SAFETY: kill(-1) signals every process but PID 1; no memory effects.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // SAFETY: sync has no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot with RB_POWER_OFF has no memory effects; it returns
    // only on failure.
    let rc = unsafe { libc::reboot(libc::RB_POWER_OFF) };
    if rc == -1 {
        log!("power-off failed: {}", io::Error::last_os_error());
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
