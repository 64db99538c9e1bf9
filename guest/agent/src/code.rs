//! `CodeRequest`s: the Python code interpreter's contexts.
//!
//! A context is one long-lived interpreter ([`Interp`]) with its own
//! variables, imports and open files, kept in a global table by id. The
//! default context (id [`DEFAULT_ID`], in `/root`, or `/` where there is no
//! `/root` to enter) is created by the first run that names no context;
//! others by `CreateContext`. Runs on one context are serialized (each holds
//! the context's lock while it runs); runs on different contexts run in
//! parallel.
//!
//! An interpreter is started lazily for the default context, at once for
//! the others. When one ends while code runs (the code called `os._exit`,
//! something killed it, it ignored an interrupt), the run reports an
//! [`crate::interp::INTERPRETER_DIED`] error and the next run starts a fresh one.
//! When one has ended between runs, the next run starts a fresh one and
//! says so first on its standard error. A fresh interpreter counts runs
//! from 1 again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::interp::{Interp, Outcome};
use crate::proto::{encode, write_frame, CodeRequest, ContextInfo, ErrorKind, Frame, FrameReader};
use crate::spawn::Refusal;
use crate::sys;

/// The id of the context runs use when they name none.
pub const DEFAULT_ID: &str = "default";

/// The most contexts the agent keeps at once.
const MAX_CONTEXTS: usize = 64;

static CONTEXTS: Mutex<BTreeMap<String, Arc<Context>>> = Mutex::new(BTreeMap::new());

fn contexts() -> MutexGuard<'static, BTreeMap<String, Arc<Context>>> {
    CONTEXTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why an interpreter was killed from outside its run.
const STOP_NONE: u8 = 0;
const STOP_REMOVED: u8 = 1;
const STOP_RESTARTED: u8 = 2;

/// One context.
struct Context {
    id: String,
    cwd: String,
    /// The interpreter (`None` before its first start and after it was
    /// lost). A run holds this lock throughout.
    interp: Mutex<Option<Interp>>,
    /// The interpreter's pid (0 when none), to kill it without waiting for
    /// a run to end.
    pid: AtomicI32,
    /// A `STOP_*` value.
    stop: AtomicU8,
    /// Set once the context is out of the table.
    removed: AtomicBool,
}

impl Context {
    fn new(id: String, cwd: String) -> Arc<Self> {
        Arc::new(Self {
            id,
            cwd,
            interp: Mutex::new(None),
            pid: AtomicI32::new(0),
            stop: AtomicU8::new(STOP_NONE),
            removed: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Interp>> {
        self.interp.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn info(&self) -> ContextInfo {
        ContextInfo {
            id: self.id.clone(),
            language: "python".into(),
            cwd: self.cwd.clone(),
        }
    }

    /// Starts an interpreter into `slot` (which the caller holds locked).
    fn start(&self, slot: &mut Option<Interp>) -> Result<(), Refusal> {
        *slot = None;
        self.pid.store(0, Ordering::SeqCst);
        let interp = Interp::start(&self.cwd).map_err(|r| Refusal {
            message: format!(
                "cannot start the Python interpreter (python3) of context {}: {}",
                self.id, r.message
            ),
            // NotFound means "no such context" to the host.
            kind: match r.kind {
                ErrorKind::CwdNotFound => ErrorKind::CwdNotFound,
                _ => ErrorKind::Spawn,
            },
        })?;
        self.pid.store(interp.pid, Ordering::SeqCst);
        *slot = Some(interp);
        Ok(())
    }

    /// Kills the interpreter now, even while a run holds the lock (the run
    /// then reports why).
    fn kill(&self, why: u8) {
        self.stop.store(why, Ordering::SeqCst);
        sys::kill_group(self.pid.load(Ordering::SeqCst), libc::SIGKILL);
    }
}

/// Answers one request on `conn`.
pub fn serve(conn: &File, reader: &mut FrameReader<&File>, req: CodeRequest) {
    let reply = match req {
        CodeRequest::Run {
            context,
            code,
            env,
            timeout_ms,
        } => {
            let timeout = timeout_ms.map(Duration::from_millis);
            let id = context.as_deref().unwrap_or(DEFAULT_ID);
            return run(conn, reader, id, &code, &env, timeout);
        }
        CodeRequest::CreateContext { cwd } => create(cwd),
        CodeRequest::ListContexts => return list(conn),
        CodeRequest::RemoveContext { id } => remove(&id),
        CodeRequest::RestartContext { id } => restart(&id),
    };
    let _ = write_frame(&mut &*conn, &reply);
}

fn not_found(id: &str) -> Refusal {
    Refusal {
        kind: ErrorKind::NotFound,
        message: format!("no code context {id:?}: it was removed or never created"),
    }
}

fn refused(r: Refusal) -> Frame {
    Frame::error(r.kind, r.message)
}

/// The context `id`; the default one is created when missing.
fn lookup(id: &str) -> Result<Arc<Context>, Refusal> {
    let mut table = contexts();
    if let Some(ctx) = table.get(id) {
        return Ok(ctx.clone());
    }
    if id != DEFAULT_ID {
        return Err(not_found(id));
    }
    if table.len() >= MAX_CONTEXTS {
        return Err(too_many());
    }
    let ctx = Context::new(DEFAULT_ID.into(), default_cwd());
    table.insert(DEFAULT_ID.into(), ctx.clone());
    Ok(ctx)
}

fn too_many() -> Refusal {
    Refusal {
        kind: ErrorKind::Spawn,
        message: format!("the guest already has {MAX_CONTEXTS} code contexts; remove some first"),
    }
}

/// `/root` when it is a directory we may enter, else `/`.
fn default_cwd() -> String {
    // SAFETY: the path is a NUL-terminated string; access only reads it.
    let ok = unsafe { libc::access(c"/root".as_ptr(), libc::X_OK) } == 0;
    if ok && std::path::Path::new("/root").is_dir() {
        "/root".into()
    } else {
        "/".into()
    }
}

fn run(
    conn: &File,
    reader: &mut FrameReader<&File>,
    id: &str,
    code: &str,
    env: &[(String, String)],
    timeout: Option<Duration>,
) {
    let ctx = match lookup(id) {
        Ok(ctx) => ctx,
        Err(r) => {
            let _ = write_frame(&mut &*conn, &refused(r));
            return;
        }
    };
    let mut slot = ctx.lock();
    if ctx.removed.load(Ordering::SeqCst) {
        let _ = write_frame(&mut &*conn, &refused(not_found(id)));
        return;
    }
    let mut note = None;
    if let Some(interp) = slot.as_mut() {
        if let Some(how) = interp.ended() {
            note = Some(how);
            *slot = None;
        }
    }
    if slot.is_none() {
        if let Err(r) = ctx.start(&mut slot) {
            let _ = write_frame(&mut &*conn, &refused(r));
            return;
        }
    }
    // Checked after the pid is published: a removal either sees the pid or
    // is seen here.
    if ctx.removed.load(Ordering::SeqCst) {
        *slot = None;
        let _ = write_frame(&mut &*conn, &refused(not_found(id)));
        return;
    }
    let Some(interp) = slot.as_mut() else {
        return;
    };
    if let Some(how) = note {
        let text = format!(
            "[dormouse] the Python interpreter of context {id} ended after the last run ({how}); \
             this run uses a fresh one, without the earlier variables\n"
        );
        if write_frame(&mut &*conn, &Frame::Stderr(text.into_bytes())).is_err() {
            return;
        }
    }
    let stopped = || match ctx.stop.load(Ordering::SeqCst) {
        STOP_REMOVED => Some("its context was removed"),
        STOP_RESTARTED => Some("its context was restarted"),
        _ => None,
    };
    if interp.run(conn, reader, code, env, timeout, &stopped) == Outcome::Lost {
        *slot = None;
        ctx.pid.store(0, Ordering::SeqCst);
    }
}

fn create(cwd: Option<String>) -> Frame {
    let cwd = match cwd {
        Some(cwd) if cwd.starts_with('/') => cwd,
        Some(cwd) => match std::env::current_dir() {
            Ok(here) => here.join(cwd).to_string_lossy().into_owned(),
            Err(e) => return Frame::error(ErrorKind::Internal, e.to_string()),
        },
        None => default_cwd(),
    };
    let ctx = {
        let mut table = contexts();
        if table.len() >= MAX_CONTEXTS {
            return refused(too_many());
        }
        let id = new_id(&table);
        let ctx = Context::new(id.clone(), cwd);
        table.insert(id, ctx.clone());
        ctx
    };
    let mut slot = ctx.lock();
    match ctx.start(&mut slot) {
        Ok(()) => Frame::Context(ctx.info()),
        Err(r) => {
            drop(slot);
            contexts().remove(&ctx.id);
            refused(r)
        }
    }
}

/// A fresh id: 12 hex digits mixed from the clock and a counter (the
/// guest's entropy may not be credited yet, so no random numbers).
fn new_id(table: &BTreeMap<String, Arc<Context>>) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:012x}",
            mix(now ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) >> 16
        );
        if !table.contains_key(&id) {
            return id;
        }
    }
}

/// splitmix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn list(conn: &File) {
    let infos: Vec<ContextInfo> = contexts().values().map(|c| c.info()).collect();
    let mut bytes = Vec::new();
    for frame in infos.into_iter().map(Frame::Context).chain([Frame::Done]) {
        match encode(&frame) {
            Ok(b) => bytes.extend_from_slice(&b),
            Err(e) => {
                let _ = write_frame(
                    &mut &*conn,
                    &Frame::error(ErrorKind::Internal, e.to_string()),
                );
                return;
            }
        }
    }
    let _ = (&*conn).write_all(&bytes);
}

fn remove(id: &str) -> Frame {
    let Some(ctx) = contexts().remove(id) else {
        return refused(not_found(id));
    };
    ctx.removed.store(true, Ordering::SeqCst);
    ctx.kill(STOP_REMOVED);
    // The interpreter's pipes close when the last holder (a run still
    // reporting, or this) lets the context go.
    Frame::Done
}

fn restart(id: &str) -> Frame {
    let ctx = match lookup(id) {
        Ok(ctx) => ctx,
        Err(r) => return refused(r),
    };
    ctx.kill(STOP_RESTARTED);
    let mut slot = ctx.lock();
    let started = ctx.start(&mut slot);
    ctx.stop.store(STOP_NONE, Ordering::SeqCst);
    if ctx.removed.load(Ordering::SeqCst) {
        *slot = None;
        return refused(not_found(id));
    }
    match started {
        Ok(()) => Frame::Context(ctx.info()),
        Err(r) => refused(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_valid_and_distinct() {
        let mut table = BTreeMap::new();
        for _ in 0..1000 {
            let id = new_id(&table);
            assert_eq!(id.len(), 12);
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
            let info = ContextInfo {
                id: id.clone(),
                language: "python".into(),
                cwd: "/".into(),
            };
            assert!(info.validate().is_ok());
            let ctx = Context::new(id.clone(), "/".into());
            assert!(table.insert(id, ctx).is_none());
        }
    }
}
