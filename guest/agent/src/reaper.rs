//! Child reaping and process-wide signals.
//!
//! One thread owns `SIGCHLD`, `SIGTERM` and `SIGINT` (blocked in every other
//! thread, taken with `sigwaitinfo`). On `SIGCHLD` it reaps every exited
//! child with `waitpid(-1, WNOHANG)`: statuses of commands the agent started
//! go to their waiters through a per-command pipe, the others (orphans
//! re-parented to PID 1) are discarded. No other code may call `waitpid`.
//!
//! A command is registered while the registry lock is held across its spawn,
//! so the reaper cannot reap it before its waiter is known.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use crate::log::log;
use crate::sys::{self, cvt};

/// Pid -> write end of the waiter's status pipe.
static WAITERS: Mutex<BTreeMap<libc::pid_t, File>> = Mutex::new(BTreeMap::new());

/// A Unix socket file to remove when a development agent is stopped.
static CLEANUP: OnceLock<PathBuf> = OnceLock::new();

fn waiters() -> MutexGuard<'static, BTreeMap<libc::pid_t, File>> {
    WAITERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The signals the reaper thread takes.
fn signal_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given; sigaddset only
    // writes into that initialised set, with valid signal numbers.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(set.as_mut_ptr(), sig);
        }
        set.assume_init()
    }
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Blocks the reaper's signals in the calling thread (and so in every thread
/// started after it) and gives them a no-op handler, so that they are
/// queued for `sigwaitinfo` even in PID 1 (which the kernel shields from
/// signals left at their default action) and even if the agent inherited
/// `SIGCHLD` as ignored (which would make the kernel auto-reap children).
///
/// Call it first in `main`, before any thread exists.
pub fn block_signals() -> io::Result<()> {
    let set = signal_set();
    for sig in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: an all-zero sigaction is a valid "no flags, empty mask"
        // value; we then set a handler that is a valid extern "C" fn.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = ignore_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: `action` is a fully initialised sigaction; the old action
        // pointer may be null.
        cvt(unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) })?;
    }
    // SAFETY: `set` is an initialised sigset; the old-mask pointer may be
    // null.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Remembers a socket file to remove when the agent is stopped by a signal
/// (development mode).
pub fn remove_on_exit(path: PathBuf) {
    let _ = CLEANUP.set(path);
}

/// Starts the reaper thread. `init` says whether the agent is PID 1 (then
/// `SIGTERM` powers the VM off; otherwise the agent exits).
pub fn start(init: bool) -> io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(move || run(init))
        .map(drop)
}

fn run(init: bool) {
    let set = signal_set();
    loop {
        // SAFETY: `set` is an initialised sigset; a null siginfo pointer is
        // allowed.
        let sig = unsafe { libc::sigwaitinfo(&set, std::ptr::null_mut()) };
        match sig {
            libc::SIGCHLD => reap_all(),
            libc::SIGTERM | libc::SIGINT => stop(init, sig),
            // EINTR (or a spurious wake-up): wait again.
            _ => {}
        }
    }
}

fn reap_all() {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid int for waitpid to write.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid > 0 {
            route(pid, status);
        } else if pid == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            // No more exited children (0), none at all (ECHILD).
            return;
        }
    }
}

fn route(pid: libc::pid_t, status: libc::c_int) {
    let waiter = waiters().remove(&pid);
    if let Some(mut pipe) = waiter {
        // Four bytes into an empty pipe never block; a waiter that has gone
        // away (EPIPE) no longer cares.
        let _ = pipe.write_all(&status.to_ne_bytes());
    }
}

fn stop(init: bool, sig: libc::c_int) {
    if init {
        crate::init::power_off(&format!("received signal {sig}"));
    }
    if let Some(path) = CLEANUP.get() {
        let _ = std::fs::remove_file(path);
    }
    log!("stopped by signal {sig}");
    std::process::exit(0);
}

/// Runs `spawn` (which returns a child pid) with the registry locked and
/// registers the child, returning its pid and the pipe its raw `waitpid`
/// status (4 native-endian bytes) will arrive on.
pub fn spawn_registered<E: From<io::Error>>(
    spawn: impl FnOnce() -> Result<libc::pid_t, E>,
) -> Result<(libc::pid_t, File), E> {
    let (status_r, status_w) = sys::pipe()?;
    let mut map = waiters();
    let pid = spawn()?;
    map.insert(pid, status_w);
    Ok((pid, status_r))
}

/// Stops routing `pid`'s status (its waiter has gone away); the reaper will
/// discard it.
pub fn forget(pid: libc::pid_t) {
    waiters().remove(&pid);
}
