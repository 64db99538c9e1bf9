//! `Sync`: the host sets the guest's clock and feeds its entropy pool,
//! after boot and after every resume (a restored guest's clock stands where
//! it was paused, and its random state is a copy of the snapshot's).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::log::log;
use crate::proto::{write_frame, ErrorKind, Frame, Sync};
use crate::sys::cvt;

/// `RNDADDENTROPY` from `<linux/random.h>`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;

/// Applies `req` and answers `Done`. A development agent (not PID 1) leaves
/// its host's clock and entropy alone.
pub fn serve(conn: &File, req: Sync, init: bool) {
    let reply = if init {
        match apply(&req) {
            Ok(()) => Frame::Done,
            Err(e) => {
                log!("sync failed: {e}");
                Frame::error(ErrorKind::Internal, format!("cannot sync the guest: {e}"))
            }
        }
    } else {
        Frame::Done
    };
    let _ = write_frame(&mut &*conn, &reply);
}

fn apply(req: &Sync) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (req.realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (req.realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the call to read.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
        .map_err(|e| io::Error::new(e.kind(), format!("setting the clock: {e}")))?;
    if !req.entropy.is_empty() {
        credit_entropy(&req.entropy)
            .map_err(|e| io::Error::new(e.kind(), format!("adding entropy: {e}")))?;
    }
    Ok(())
}

/// Mixes `bytes` into the kernel's pool and credits them in full, which
/// makes the CRNG ready at once (a fresh guest otherwise waits up to a
/// minute for enough interrupt timing entropy, and `getrandom` blocks).
fn credit_entropy(bytes: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    let bits = i32::try_from(bytes.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(8 + bytes.len().div_ceil(4) * 4, 0);
    let random = File::open("/dev/urandom")?;
    // SAFETY: `info` holds a rand_pool_info header followed by `buf_size`
    // bytes, which is all the ioctl reads.
    cvt(unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    Ok(())
}
