//! dormouse-agent: the guest side of dormouse.
//!
//! As PID 1 of a dormouse microVM it sets the guest up (file systems, host
//! name, loopback, environment), reaps orphans, powers off on `SIGTERM`, and
//! serves the host's requests on AF_VSOCK port [`proto::AGENT_VSOCK_PORT`]:
//! one thread per connection, one request per connection (see the protocol
//! in `src/proto/`). It logs `dormouse-agent ready` on the console once it
//! listens.
//!
//! For development on a host without a VM, `--listen-unix PATH` serves the
//! same protocol on a Unix socket; everything but the listener is the same
//! code. The PID 1 duties are done only when the agent really is PID 1 (in a
//! VM, or in a test's PID namespace), whatever the listener.
//!
//! The guest runs every system call as emulated kernel code (milliseconds
//! each), so the agent does few, large reads and writes and never polls
//! on a timer.

#[allow(dead_code, unused_imports)]
#[path = "../../../src/proto/mod.rs"]
mod proto;

mod code;
mod exec;
mod files;
mod forward;
mod init;
mod interp;
mod listener;
mod log;
mod procs;
mod reaper;
mod session;
mod spawn;
mod sync;
mod sys;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use listener::Listener;
use log::log;

/// Line printed once the agent accepts connections; the VMM may wait for it.
const READY_LINE: &str = "dormouse-agent ready\n";

const USAGE: &str = "usage: dormouse-agent [--listen-unix PATH] [--vsock-port PORT]\n\
  As PID 1 in a dormouse VM: sets the guest up and serves on vsock.\n\
  --listen-unix PATH  serve on a Unix socket instead of vsock (development)\n\
  --vsock-port PORT   vsock port to listen on (default 1024)";

struct Args {
    listen_unix: Option<PathBuf>,
    vsock_port: u32,
}

/// Parses the command line. As PID 1 the kernel passes unknown boot
/// parameters as arguments, so those are ignored there rather than fatal.
fn parse_args(init: bool) -> Result<Args, String> {
    let mut args = Args {
        listen_unix: None,
        vsock_port: proto::AGENT_VSOCK_PORT,
    };
    let mut it = std::env::args_os().skip(1);
    while let Some(arg) = it.next() {
        match arg.to_str() {
            Some("--listen-unix") => {
                let path = it.next().ok_or("--listen-unix needs a socket path")?;
                args.listen_unix = Some(PathBuf::from(path));
            }
            Some("--vsock-port") => {
                let port = it.next().ok_or("--vsock-port needs a port number")?;
                args.vsock_port = port
                    .to_str()
                    .and_then(|p| p.parse().ok())
                    .ok_or("--vsock-port needs a port number (0..=4294967295)")?;
            }
            Some("--help" | "-h") if !init => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            Some("--version" | "-V") if !init => {
                println!("dormouse-agent {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            _ if init => {}
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(args)
}

/// Ends the agent after a fatal error: PID 1 powers the VM off (exiting
/// would panic the kernel), a development agent exits with status 1.
fn fatal(init: bool, message: &str) -> ! {
    if init {
        init::power_off(message);
    }
    log!("{message}");
    std::process::exit(1);
}

fn main() {
    let init = sys::getpid() == 1;
    // Before any thread: the signal mask is inherited by every thread.
    if let Err(e) = reaper::block_signals() {
        fatal(init, &format!("cannot set up signal handling: {e}"));
    }
    let args = match parse_args(init) {
        Ok(args) => args,
        Err(e) => fatal(init, &format!("{e}\n{USAGE}")),
    };
    init::ensure_std_fds();
    if init {
        init::setup();
    }
    tune_malloc();
    if let Err(e) = reaper::start(init) {
        fatal(init, &format!("cannot start the reaper thread: {e}"));
    }
    let listener = match &args.listen_unix {
        Some(path) => Listener::unix(path).inspect(|_| reaper::remove_on_exit(path.clone())),
        None => Listener::vsock(args.vsock_port),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => fatal(init, &format!("cannot listen: {e}")),
    };
    let ready = std::panic::catch_unwind(|| {
        use std::io::Write;
        let _ = std::io::stderr().lock().write_all(READY_LINE.as_bytes());
        serve(&listener, init)
    });
    // `serve` never returns; only a panic gets here.
    fatal(init, &format!("the accept loop panicked: {ready:?}"));
}

/// Accepts connections for ever, one thread each.
fn serve(listener: &Listener, init: bool) -> ! {
    let mut failures = 0u32;
    loop {
        match listener.accept() {
            Ok(conn) => {
                failures = 0;
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || session::serve(conn, init));
                if let Err(e) = spawned {
                    log!("cannot start a connection thread: {e}");
                }
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning on the error.
                failures = failures.saturating_add(1);
                if failures % 100 == 1 {
                    log!("accept on {} failed: {e}", listener.describe());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Keeps freed memory in one heap instead of returning it to the kernel, so
/// the buffers of one request reuse the already-mapped pages of the last
/// (each fresh page costs an emulated page fault in the guest).
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator tunables; it is called before
    // the connection threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}
