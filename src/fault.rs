//! Crash points for testing durability (cargo feature `fault-injection`,
//! which the crate's own tests turn on; off in normal builds, where
//! `crash_point` compiles to nothing).
//!
//! With the feature, a process whose `DORMOUSE_CRASH_AT` names a point
//! kills itself with SIGKILL when it reaches that point: what is on disk at
//! that moment must still resume.

/// The environment variable naming the point to crash at.
pub const CRASH_AT_ENV: &str = "DORMOUSE_CRASH_AT";

/// Every crash point, in the order a pause and the following resume reach
/// them.
pub const POINTS: &[&str] = &[
    // Pause: the new memory file is written and fsynced.
    "pause:memory-written",
    // Pause: the new state file is written and fsynced.
    "pause:state-written",
    // Pause: the disk's writes are sealed as a layer.
    "pause:disk-sealed",
    // Pause: the new manifest is written under its temporary name.
    "pause:manifest-written",
    // Pause: the new manifest replaced the old one (the commit).
    "pause:committed",
    // Resume: a committed disk layer was copied into the overlay, before
    // that was recorded.
    "resume:disk-merged",
];

/// Kills this process with SIGKILL if `DORMOUSE_CRASH_AT` names `point`
/// (only with the `fault-injection` feature).
#[cfg(feature = "fault-injection")]
pub(crate) fn crash_point(point: &str) {
    debug_assert!(POINTS.contains(&point), "unknown crash point {point}");
    if std::env::var(CRASH_AT_ENV).is_ok_and(|p| p == point) {
        log::warn!("crashing at {point} ({CRASH_AT_ENV})");
        // SAFETY: kill(2) on our own pid; no memory is involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Does nothing: built without the `fault-injection` feature.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub(crate) fn crash_point(_point: &str) {}
