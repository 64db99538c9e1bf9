//! The mutable part of a sandbox, shared by its handle, its lifecycle timer
//! and the runtime's registry of running sandboxes, and the transitions
//! that any of them can start: pause, kill, timeout.
//!
//! A handle owns its sandbox until the timer (timeout with auto-pause, or
//! kill) or the runtime (pause or kill by id) takes it: the sandbox is then
//! paused and unlocked (or deleted), and every later call on the handle
//! gives [`Error::SandboxPaused`] (or [`Error::NotFound`]); it never acts on
//! a stopped machine and never hangs.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::{join_error, AgentLink, SandboxId};
use crate::disk::CowDisk;
use crate::error::{Error, Result};
use crate::fsutil::now_ms;
use crate::info::{self, SandboxInfo, SandboxState};
use crate::snapshot::{self, SandboxRecord};
use crate::vmm::{memory, Machine};

/// How long the timer waits before trying again an auto-pause that failed
/// (a full disk, say); the sandbox runs on meanwhile.
const RETRY_PAUSE: Duration = Duration::from_secs(30);

/// What happened to a sandbox under its handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Taken {
    /// Paused (and unlocked) by its timeout or by id.
    Paused,
    /// Killed by its timeout or by id.
    Killed,
}

/// A sandbox's shared, mutable state.
pub(crate) struct Live {
    pub(super) id: SandboxId,
    pub(super) dir: PathBuf,
    /// The template it was created from.
    pub(super) template: String,
    /// The template's root filesystem image, under the disk overlay.
    pub(super) rootfs: PathBuf,
    pub(super) link: Arc<AgentLink>,
    state: Mutex<LiveState>,
    /// Held across a transition (pause, snapshot, kill): one at a time.
    transition: tokio::sync::Mutex<()>,
    /// Wakes the lifecycle timer when the deadline changes.
    wake: Arc<Notify>,
}

/// Everything about a sandbox that changes.
pub(super) struct LiveState {
    pub record: SandboxRecord,
    /// What `sandbox.json` says; rewritten at every transition.
    pub info: SandboxInfo,
    /// Set while running (taken out while a transition works on it).
    pub machine: Option<Machine>,
    /// The disk overlay, shared with the block device; set while running.
    pub disk: Option<Arc<Mutex<CowDisk>>>,
    /// While running: the snapshot the guest was resumed from, whose memory
    /// files a pause adds a layer to.
    pub based_on: Option<snapshot::Manifest>,
    /// While running: whether the dirty-page log covers every write since
    /// boot or resume (a failed pause consumes it; the next one then writes
    /// all of memory).
    pub dirty_log_complete: bool,
    /// The lock on the sandbox directory: one live handle per sandbox,
    /// across processes. Released with the handle, or when the sandbox is
    /// taken from it.
    pub lock: Option<File>,
    /// Whether dropping the handle deletes the sandbox's files (true while
    /// running: an abandoned running sandbox is killed).
    pub delete_on_drop: bool,
    /// Set once the sandbox was taken from the handle.
    pub taken: Option<Taken>,
    /// While running: when the timer acts.
    pub deadline: Option<Instant>,
    /// While running: the end of the runtime's maximum running time.
    pub run_limit: Option<Instant>,
    /// While running: the lifecycle timer.
    pub timer: Option<tokio::task::AbortHandle>,
    /// How many handles share the sandbox: one, or more while it runs
    /// (see [`Live::attach`]). The last one to go kills it.
    pub handles: usize,
}

impl LiveState {
    pub(super) fn save_info(&self, dir: &std::path::Path) -> Result<()> {
        info::write(dir, &self.info)
    }

    /// Makes the timer act `timeout` from now, within the maximum running
    /// time, and records when in the sandbox's record.
    pub(super) fn set_deadline(&mut self, timeout: Duration) {
        let now = Instant::now();
        let mut deadline = now + timeout;
        if let Some(limit) = self.run_limit {
            deadline = deadline.min(limit);
        }
        self.deadline = Some(deadline);
        self.info.end_at_ms = Some(now_ms() + (deadline - now).as_millis() as u64);
    }
}

impl Live {
    pub(super) fn new(
        id: SandboxId,
        dir: PathBuf,
        rootfs: PathBuf,
        link: Arc<AgentLink>,
        state: LiveState,
    ) -> Arc<Self> {
        Arc::new(Live {
            id,
            dir,
            template: state.record.template.clone(),
            rootfs,
            link,
            state: Mutex::new(state),
            transition: tokio::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
        })
    }

    /// The state, locked (never held across an await).
    pub(super) fn st(&self) -> MutexGuard<'_, LiveState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The error every call on a handle whose sandbox was taken gives.
    pub(super) fn taken_error(&self, taken: Taken) -> Error {
        match taken {
            Taken::Paused => Error::SandboxPaused {
                id: self.id.to_string(),
            },
            Taken::Killed => Error::NotFound {
                id: self.id.to_string(),
            },
        }
    }

    /// Whether the sandbox is running under this handle, in a way callers
    /// of the id-based API can act on.
    pub(crate) fn is_running(&self) -> bool {
        let st = self.st();
        st.taken.is_none() && st.info.state != SandboxState::Paused
    }

    /// One more handle on the sandbox, if it runs (not taken, not paused,
    /// no transition at work on it): see [`Runtime::connect`](crate::Runtime::connect).
    pub(super) fn attach(&self) -> bool {
        let mut st = self.st();
        let running = st.taken.is_none() && st.machine.is_some();
        if running {
            st.handles += 1;
        }
        running
    }

    /// Ends the lifecycle timer.
    pub(super) fn stop_timer(&self) {
        if let Some(timer) = self.st().timer.take() {
            timer.abort();
        }
    }

    /// Waits until no transition is at work.
    pub(super) async fn wait_transition(&self) {
        drop(self.transition.lock().await);
    }

    /// Pauses the running sandbox: writes its snapshot and releases its
    /// guest. With `release`, the handle loses it (the lock is released and
    /// later calls on the handle give [`Error::SandboxPaused`]), so that it
    /// can be resumed by id. On failure it runs on as before.
    pub(crate) async fn pause(&self, release: bool) -> Result<()> {
        let _transition = self.transition.lock().await;
        let (mut machine, job) = {
            let mut st = self.st();
            if let Some(taken) = st.taken {
                return Err(self.taken_error(taken));
            }
            let Some(machine) = st.machine.take() else {
                return Err(Error::AlreadyPaused {
                    id: self.id.to_string(),
                });
            };
            // Should this future be dropped halfway, the pause still
            // completes (or fails) on its thread; the files must stay.
            st.delete_on_drop = false;
            (machine, SnapshotJob::of(&self.dir, &st))
        };
        let task = tokio::task::spawn_blocking(move || {
            let written = job.run(&mut machine);
            match written {
                Ok((manifest, _)) => {
                    // The stopped machine's block device lets go of the
                    // disk now, not when the reaper drops it: a resume may
                    // open the disk at once.
                    if let Some(disk) = &job.disk {
                        lock_disk(disk).unlock();
                    }
                    // Releases guest memory and the VM, without waiting for
                    // KVM to tear it down (its threads have stopped).
                    machine.drop_in_background();
                    (None, Ok(manifest))
                }
                Err(e) => {
                    if let Err(resume) = machine.resume() {
                        log::error!("the sandbox could not run on after a failed pause: {resume}");
                    }
                    (Some(machine), Err(e))
                }
            }
        });
        let (machine, written) = match task.await {
            Ok(done) => done,
            // A panic on the pause thread is a bug: pass it on.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let mut st = self.st();
        match written {
            Ok(manifest) => {
                st.disk = None;
                st.based_on = None;
                self.link.set(None);
                st.info.state = SandboxState::Paused;
                st.info.paused_at_ms = Some(manifest.paused_at_ms);
                st.info.end_at_ms = None;
                st.deadline = None;
                if let Err(e) = st.save_info(&self.dir) {
                    // The snapshot is what counts; the record is advisory.
                    log::warn!("{e}");
                }
                if release {
                    st.lock = None;
                    st.taken = Some(Taken::Paused);
                }
                Ok(())
            }
            Err(error) => {
                st.machine = machine;
                st.delete_on_drop = true;
                // The dirty log was read: the next pause writes everything.
                st.dirty_log_complete = false;
                Err(error)
            }
        }
    }

    /// Stops the guest, if it runs, and deletes every file of the sandbox.
    pub(crate) async fn kill(&self) -> Result<()> {
        let _transition = self.transition.lock().await;
        let machine = {
            let mut st = self.st();
            if let Some(taken) = st.taken {
                return Err(self.taken_error(taken));
            }
            // The files are deleted here, and errors reported, not in Drop.
            st.delete_on_drop = false;
            st.taken = Some(Taken::Killed);
            st.deadline = None;
            self.link.set(None);
            st.disk = None;
            st.machine.take()
        };
        let dir = self.dir.clone();
        let deleted = tokio::task::spawn_blocking(move || {
            drop(machine);
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Io {
                    what: format!("cannot delete {}", dir.display()),
                    source: e,
                }),
                _ => Ok(()),
            }
        })
        .await
        .map_err(|e| join_error("kill", e))?;
        self.st().lock = None;
        deleted
    }

    /// Makes the sandbox's timer act `timeout` from now (within the
    /// runtime's maximum running time).
    pub(crate) fn set_timeout(&self, timeout: Duration) -> Result<()> {
        check_timeout(timeout)?;
        let mut st = self.st();
        if let Some(taken) = st.taken {
            return Err(self.taken_error(taken));
        }
        if st.info.state == SandboxState::Paused {
            return Err(Error::SandboxPaused {
                id: self.id.to_string(),
            });
        }
        st.set_deadline(timeout);
        if let Err(e) = st.save_info(&self.dir) {
            log::warn!("{e}");
        }
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Starts the timer that pauses or kills the sandbox at its deadline.
    pub(super) fn start_timer(self: &Arc<Self>) -> tokio::task::AbortHandle {
        tokio::spawn(timer(Arc::downgrade(self), self.wake.clone())).abort_handle()
    }

    /// The snapshot job of the running sandbox, for a snapshot that lets it
    /// run on: the transition lock and the machine, taken out.
    pub(super) async fn begin_snapshot(
        &self,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Machine, SnapshotJob)> {
        let transition = self.transition.lock().await;
        let mut st = self.st();
        if let Some(taken) = st.taken {
            return Err(self.taken_error(taken));
        }
        let machine = st.machine.take().ok_or_else(|| Error::SandboxPaused {
            id: self.id.to_string(),
        })?;
        let job = SnapshotJob::of(&self.dir, &st);
        st.info.state = SandboxState::Snapshotting;
        if let Err(e) = st.save_info(&self.dir) {
            log::warn!("{e}");
        }
        Ok((transition, machine, job))
    }
}

/// Rejects a zero timeout.
pub(crate) fn check_timeout(timeout: Duration) -> Result<()> {
    if timeout.is_zero() {
        return Err(Error::InvalidConfig(
            "a sandbox timeout must be longer than zero".into(),
        ));
    }
    Ok(())
}

/// The lifecycle timer: sleeps until the deadline (woken when it changes),
/// then pauses the sandbox if it has auto-pause, else kills it. Ends with
/// the sandbox (or its handle).
async fn timer(live: Weak<Live>, wake: Arc<Notify>) {
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let deadline = match live.upgrade() {
            Some(live) => {
                let st = live.st();
                if st.taken.is_some() {
                    return;
                }
                st.deadline
            }
            None => return,
        };
        match deadline {
            None => {
                notified.await;
                continue;
            }
            Some(deadline) => {
                tokio::select! {
                    _ = &mut notified => continue,
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
        }
        let Some(live) = live.upgrade() else { return };
        let (auto_pause, due) = {
            let st = live.st();
            let due = st.deadline.is_some_and(|d| d <= Instant::now());
            (st.info.auto_pause, due)
        };
        if !due {
            continue; // moved while we slept
        }
        if auto_pause {
            match live.pause(true).await {
                Ok(()) => {
                    log::info!("sandbox {} paused: its timeout ran out", live.id);
                    return;
                }
                Err(Error::AlreadyPaused { .. }) => continue,
                Err(e) => {
                    log::error!(
                        "sandbox {}: the auto-pause at its timeout failed, trying again in {RETRY_PAUSE:?}: {e}",
                        live.id
                    );
                    let mut st = live.st();
                    if st.taken.is_none() {
                        st.deadline = Some(Instant::now() + RETRY_PAUSE);
                    }
                }
            }
        } else {
            match live.kill().await {
                Ok(()) => log::info!("sandbox {} killed: its timeout ran out", live.id),
                Err(e) => log::error!("sandbox {}: the kill at its timeout failed: {e}", live.id),
            }
            return;
        }
    }
}

/// Locks the disk shared with the block device.
pub(super) fn lock_disk(disk: &Mutex<CowDisk>) -> MutexGuard<'_, CowDisk> {
    disk.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What writing a snapshot of a running sandbox needs, taken from it so
/// that the work can run on a blocking thread.
pub(super) struct SnapshotJob {
    dir: PathBuf,
    record: SandboxRecord,
    pub(super) disk: Option<Arc<Mutex<CowDisk>>>,
    based_on: Option<snapshot::Manifest>,
    dirty_log_complete: bool,
}

impl SnapshotJob {
    fn of(dir: &std::path::Path, st: &LiveState) -> Self {
        SnapshotJob {
            dir: dir.to_owned(),
            record: st.record.clone(),
            disk: st.disk.clone(),
            based_on: st.based_on.clone(),
            dirty_log_complete: st.dirty_log_complete,
        }
    }

    /// Stops the vCPUs of `machine` and writes a snapshot as the sandbox
    /// directory's new generation: the pages dirtied since the snapshot it
    /// was resumed from (or every touched page), its state, its disk
    /// writes. The machine stays stopped.
    pub(super) fn run(
        &self,
        machine: &mut Machine,
    ) -> Result<(snapshot::Manifest, memory::SaveStats)> {
        let state = machine.pause()?;
        let dirty = match machine.take_dirty_pages() {
            Ok(dirty) => self.dirty_log_complete.then_some(dirty),
            Err(e) => {
                log::warn!("no dirty-page log, writing all of memory: {e}");
                None
            }
        };
        let how = match (&dirty, &self.based_on) {
            (Some(dirty), Some(on)) => snapshot::MemoryWrite::Layer { dirty, on },
            (Some(dirty), None) => snapshot::MemoryWrite::BaseOf(dirty),
            (None, _) => snapshot::MemoryWrite::Full,
        };
        let dir = &self.dir;
        let machine: &Machine = machine;
        let seal = |generation| {
            // Reading guest memory may have found a page that cannot be
            // loaded (the guest stopped then): what was written is wrong.
            if let Some(reason) = machine.stop_reason() {
                return Err(snapshot::SnapshotError::Io {
                    what: "save the memory of",
                    path: dir.to_owned(),
                    source: std::io::Error::other(reason.to_string()),
                });
            }
            let Some(disk) = &self.disk else {
                return Ok(None);
            };
            lock_disk(disk)
                .seal(generation)
                .map_err(|e| snapshot::SnapshotError::Io {
                    what: "seal the disk writes of",
                    path: dir.join("disk"),
                    source: std::io::Error::other(e),
                })
        };
        let (manifest, stats) =
            snapshot::write(dir, &self.record, &state, machine.memory(), how, seal)?;
        log::debug!(
            "snapshot of sandbox {}: generation {}, {} of {} bytes of memory written",
            self.record.id,
            manifest.generation,
            stats.written,
            stats.total
        );
        Ok((manifest, stats))
    }
}
