//! Starting a command: environment, `PATH` lookup, working directory, pipes,
//! and `posix_spawn` (a vfork-style spawn, cheap in a guest where every page
//! fault of a `fork` copy would be emulated).

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::proto::{ErrorKind, Exec, StdinMode, DATA_CHUNK};
use crate::{init, reaper, sys};

/// Why a command could not be started, as sent to the host.
#[derive(Debug)]
pub struct Refusal {
    /// The category.
    pub kind: ErrorKind,
    /// A sentence saying what to do.
    pub message: String,
}

impl Refusal {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<io::Error> for Refusal {
    fn from(e: io::Error) -> Self {
        Self::new(
            ErrorKind::Internal,
            format!("the agent could not prepare the command: {e}"),
        )
    }
}

/// A started command: its own process group, with our ends of its pipes.
pub struct Child {
    /// Its pid, which is also its process group id.
    pub pid: libc::pid_t,
    /// Where its raw `waitpid` status arrives (see [`reaper`]).
    pub status: File,
    /// Read end of its standard output.
    pub stdout: File,
    /// Read end of its standard error.
    pub stderr: File,
    /// Non-blocking write end of its standard input, for [`StdinMode::Pipe`].
    pub stdin: Option<File>,
}

/// Starts `req` (already validated by the decoder).
pub fn spawn(req: &Exec) -> Result<Child, Refusal> {
    let prepared = match req.user.as_deref() {
        None | Some("root") => prepare(&req.argv, &req.env, req.cwd.as_deref())?,
        Some(name) => prepare_as(&lookup_user(name)?, req)?,
    };

    let (stdout_r, stdout_w) = sys::pipe()?;
    let (stderr_r, stderr_w) = sys::pipe()?;
    sys::grow_pipe(&stdout_r, DATA_CHUNK);
    sys::grow_pipe(&stderr_r, DATA_CHUNK);
    let (stdin_child, stdin_ours) = match req.stdin {
        StdinMode::Pipe => {
            let (r, w) = sys::pipe()?;
            sys::set_nonblocking(&w)?;
            (r, Some(w))
        }
        _ => (File::open("/dev/null")?, None),
    };

    let (pid, status) = prepared.spawn(&[(&stdin_child, 0), (&stdout_w, 1), (&stderr_w, 2)])?;
    // Only the child keeps its ends: EOF on our read ends then means the
    // command (and everything it started) closed its output.
    drop((stdin_child, stdout_w, stderr_w));
    Ok(Child {
        pid,
        status,
        stdout: stdout_r,
        stderr: stderr_r,
        stdin: stdin_ours,
    })
}

/// A command resolved and converted for `posix_spawn`, not started yet.
pub struct Prepared {
    program: PathBuf,
    c_program: CString,
    c_argv: Vec<CString>,
    c_env: Vec<CString>,
    c_cwd: Option<CString>,
}

/// Resolves `argv[0]` (looked up in the command's `PATH` unless it holds a
/// `/`), builds the agent's environment plus `env`, and checks `cwd` (the
/// agent's own when `None`). `argv` must not be empty.
pub fn prepare(
    argv: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
) -> Result<Prepared, Refusal> {
    let env = environment(env);
    let cwd = match cwd {
        Some(cwd) => Some(working_dir(cwd)?),
        None => None,
    };
    let name = argv
        .first()
        .ok_or_else(|| Refusal::new(ErrorKind::InvalidRequest, "argv is empty"))?;
    let program = resolve(name, &env, cwd.as_deref())?;
    Ok(Prepared {
        c_program: cstring(program.as_os_str().as_bytes())?,
        program,
        c_argv: argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<_, _>>()?,
        c_env: env
            .iter()
            .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat()))
            .collect::<Result<_, _>>()?,
        c_cwd: cwd
            .as_ref()
            .map(|c| cstring(c.as_os_str().as_bytes()))
            .transpose()?,
    })
}

impl Prepared {
    /// Starts the command in its own process group with each `(file, n)`
    /// of `fds` as its descriptor `n` (every other descriptor of ours is
    /// close-on-exec), registered with the [`reaper`]: returns its pid and
    /// the pipe its raw `waitpid` status arrives on.
    pub fn spawn(&self, fds: &[(&File, libc::c_int)]) -> Result<(libc::pid_t, File), Refusal> {
        // The child performs the dup2s in order, so a source numbered like
        // an earlier target would be overwritten first: move such sources
        // above every target (never the case for targets 0..=2).
        let top = fds.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let mut moved = Vec::new();
        let mut sources = Vec::with_capacity(fds.len());
        for &(file, target) in fds {
            let fd = file.as_raw_fd();
            if fd > 2 && fd <= top {
                // SAFETY: F_DUPFD_CLOEXEC duplicates an fd we hold open to
                // the lowest free number above `top`; no pointers involved.
                let high = sys::cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, top + 1) })?;
                // SAFETY: fcntl succeeded, so `high` is open and ours alone.
                moved.push(unsafe { OwnedFd::from_raw_fd(high) });
                sources.push((high, target));
            } else {
                sources.push((fd, target));
            }
        }
        let argv_ptrs = null_terminated(&self.c_argv);
        let env_ptrs = null_terminated(&self.c_env);
        let mut actions = FileActions::new()?;
        for &(fd, target) in &sources {
            actions.dup2(fd, target)?;
        }
        if let Some(dir) = &self.c_cwd {
            actions.chdir(dir)?;
        }
        let attr = SpawnAttr::new()?;

        let spawned = reaper::spawn_registered(|| {
            let mut pid: libc::pid_t = 0;
            // SAFETY: every pointer is valid for the call: the C strings and
            // the NULL-terminated pointer arrays outlive it, and
            // `actions`/`attr` are initialised objects.
            let rc = unsafe {
                libc::posix_spawn(
                    &mut pid,
                    self.c_program.as_ptr(),
                    actions.as_ptr(),
                    attr.as_ptr(),
                    argv_ptrs.as_ptr(),
                    env_ptrs.as_ptr(),
                )
            };
            if rc == 0 {
                Ok(pid)
            } else {
                Err(spawn_error(rc, &self.program))
            }
        });
        drop(moved);
        spawned
    }
}

/// Drops to a user's ids between `posix_spawn` and the program: util-linux
/// `setpriv` (in every Debian system), which execs the program in place,
/// so the pid the host sees is the program's.
const SETPRIV: &str = "/usr/bin/setpriv";

/// A user of the guest's `/etc/passwd`.
#[derive(Debug, PartialEq, Eq)]
struct User {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

/// Finds `name` in `/etc/passwd`.
fn lookup_user(name: &str) -> Result<User, Refusal> {
    let passwd = fs::read_to_string("/etc/passwd")?;
    find_user(&passwd, name).ok_or_else(|| {
        Refusal::new(
            ErrorKind::NotFound,
            format!("user {name} does not exist in the sandbox (see /etc/passwd)"),
        )
    })
}

fn find_user(passwd: &str, name: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(User {
            name: name.to_owned(),
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5].to_owned(),
        })
    })
}

/// Like [`prepare`] for `req`, run as `user`: the program is resolved
/// here (so a missing one is `NotFound` as for root) and started through
/// [`SETPRIV`] with the user's ids and groups; `HOME`, `USER` and
/// `LOGNAME` are the user's unless the request sets them.
fn prepare_as(user: &User, req: &Exec) -> Result<Prepared, Refusal> {
    let mut env = vec![
        ("HOME".to_owned(), user.home.clone()),
        ("USER".to_owned(), user.name.clone()),
        ("LOGNAME".to_owned(), user.name.clone()),
    ];
    env.extend(req.env.iter().cloned());
    let cwd = req.cwd.as_deref().map(working_dir).transpose()?;
    let name = req
        .argv
        .first()
        .ok_or_else(|| Refusal::new(ErrorKind::InvalidRequest, "argv is empty"))?;
    let program = resolve(name, &environment(&env), cwd.as_deref())?;
    let mut argv = vec![
        SETPRIV.to_owned(),
        format!("--reuid={}", user.uid),
        format!("--regid={}", user.gid),
        "--init-groups".to_owned(),
        "--".to_owned(),
        program.to_string_lossy().into_owned(),
    ];
    argv.extend(req.argv[1..].iter().cloned());
    prepare(&argv, &env, req.cwd.as_deref())
}

/// The agent's environment with the request's variables added or replaced.
fn environment(extra: &[(String, String)]) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    for (k, v) in extra {
        match env.iter_mut().find(|(name, _)| name == k.as_str()) {
            Some(slot) => slot.1 = v.into(),
            None => env.push((k.into(), v.into())),
        }
    }
    env
}

/// The absolute working directory, checked to exist.
fn working_dir(cwd: &str) -> Result<PathBuf, Refusal> {
    let path = Path::new(cwd);
    let path = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()?.join(path)
    };
    match fs::metadata(&path) {
        Ok(m) if m.is_dir() => Ok(path),
        _ => Err(Refusal::new(
            ErrorKind::CwdNotFound,
            format!(
                "working directory {cwd} does not exist or is not a directory; create it first"
            ),
        )),
    }
}

/// `argv[0]` as a path to execute: as given when it contains a `/`, else
/// the first executable file of that name in the command's `PATH`.
fn resolve(
    name: &str,
    env: &[(OsString, OsString)],
    cwd: Option<&Path>,
) -> Result<PathBuf, Refusal> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| init::DEFAULT_PATH.into());
    for dir in path.as_bytes().split(|b| *b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let mut candidate = dir.join(name);
        if candidate.is_relative() {
            if let Some(cwd) = cwd {
                candidate = cwd.join(candidate);
            }
        }
        if let Ok(meta) = fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(Refusal::new(
        ErrorKind::NotFound,
        format!(
            "command not found: {name} (no executable of that name in PATH={}); install it or \
             give its full path",
            path.to_string_lossy()
        ),
    ))
}

fn spawn_error(errno: libc::c_int, program: &Path) -> Refusal {
    let err = io::Error::from_raw_os_error(errno);
    let program = program.display();
    match errno {
        libc::ENOENT | libc::ENOTDIR => Refusal::new(
            ErrorKind::NotFound,
            format!("command not found: {program}: {err}; check the path"),
        ),
        libc::EACCES | libc::EPERM => Refusal::new(
            ErrorKind::PermissionDenied,
            format!("cannot execute {program}: {err}; make it executable (chmod +x)"),
        ),
        libc::ENOEXEC => Refusal::new(
            ErrorKind::Spawn,
            format!("cannot execute {program}: not an executable format; add a #! line"),
        ),
        _ => Refusal::new(ErrorKind::Spawn, format!("cannot start {program}: {err}")),
    }
}

fn cstring(bytes: &[u8]) -> Result<CString, Refusal> {
    CString::new(bytes).map_err(|_| {
        Refusal::new(
            ErrorKind::InvalidRequest,
            "a string of the request contains a NUL byte; remove it",
        )
    })
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// `posix_spawn_file_actions_t`, destroyed on drop.
struct FileActions(Box<MaybeUninit<libc::posix_spawn_file_actions_t>>);

impl FileActions {
    fn new() -> io::Result<Self> {
        let mut inner = Box::new(MaybeUninit::uninit());
        // SAFETY: init writes a valid object into the boxed storage.
        check(unsafe { libc::posix_spawn_file_actions_init(inner.as_mut_ptr()) })?;
        Ok(Self(inner))
    }

    fn as_ptr(&self) -> *const libc::posix_spawn_file_actions_t {
        self.0.as_ptr()
    }

    /// Makes `fd` the child's descriptor `target` (glibc clears
    /// close-on-exec, also when the numbers are equal).
    fn dup2(&mut self, fd: libc::c_int, target: libc::c_int) -> io::Result<()> {
        // SAFETY: the object was initialised in `new`.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(self.0.as_mut_ptr(), fd, target) })
    }

    fn chdir(&mut self, dir: &CString) -> io::Result<()> {
        // SAFETY: the object was initialised in `new`; glibc copies the path.
        check(unsafe {
            libc::posix_spawn_file_actions_addchdir_np(self.0.as_mut_ptr(), dir.as_ptr())
        })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: the object was initialised in `new` and is destroyed once.
        unsafe { libc::posix_spawn_file_actions_destroy(self.0.as_mut_ptr()) };
    }
}

/// `posix_spawnattr_t` for a command: its own process group, an empty
/// signal mask and every signal at its default action (the agent ignores
/// `SIGPIPE` and blocks `SIGCHLD`, which a command must not inherit).
struct SpawnAttr(Box<MaybeUninit<libc::posix_spawnattr_t>>);

impl SpawnAttr {
    fn new() -> io::Result<Self> {
        let mut inner = Box::new(MaybeUninit::uninit());
        // SAFETY: init writes a valid object into the boxed storage.
        check(unsafe { libc::posix_spawnattr_init(inner.as_mut_ptr()) })?;
        let mut attr = Self(inner);
        let p = attr.0.as_mut_ptr();
        let mut empty = MaybeUninit::<libc::sigset_t>::uninit();
        let mut all = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: the set functions initialise the sets they are given; the
        // attr setters copy them into the initialised attribute object.
        unsafe {
            libc::sigemptyset(empty.as_mut_ptr());
            libc::sigfillset(all.as_mut_ptr());
            libc::sigdelset(all.as_mut_ptr(), libc::SIGKILL);
            libc::sigdelset(all.as_mut_ptr(), libc::SIGSTOP);
            check(libc::posix_spawnattr_setsigmask(p, empty.as_ptr()))?;
            check(libc::posix_spawnattr_setsigdefault(p, all.as_ptr()))?;
            check(libc::posix_spawnattr_setpgroup(p, 0))?;
            check(libc::posix_spawnattr_setflags(
                p,
                (libc::POSIX_SPAWN_SETPGROUP
                    | libc::POSIX_SPAWN_SETSIGMASK
                    | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
            ))?;
        }
        Ok(attr)
    }

    fn as_ptr(&self) -> *const libc::posix_spawnattr_t {
        self.0.as_ptr()
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: the object was initialised in `new` and is destroyed once.
        unsafe { libc::posix_spawnattr_destroy(self.0.as_mut_ptr()) };
    }
}

/// posix_spawn functions return an error number instead of setting errno.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn users_come_from_passwd_lines() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      broken:x:zero:0::/:/bin/sh\n\
                      user:x:1000:1000:dormouse user:/home/user:/bin/bash\n";
        assert_eq!(
            super::find_user(passwd, "user"),
            Some(super::User {
                name: "user".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/user".into(),
            })
        );
        assert_eq!(super::find_user(passwd, "broken"), None);
        assert_eq!(super::find_user(passwd, "nobody"), None);
        assert_eq!(super::find_user(passwd, "use"), None);
    }

    use super::*;

    #[test]
    fn request_variables_replace_or_extend_the_base_environment() {
        let env = environment(&[
            ("PATH".into(), "/x".into()),
            ("DORMOUSE_TEST_NEW".into(), "1".into()),
        ]);
        let get = |k: &str| env.iter().filter(|(n, _)| n == k).collect::<Vec<_>>();
        assert_eq!(get("PATH").len(), 1);
        assert_eq!(get("PATH")[0].1, "/x");
        assert_eq!(get("DORMOUSE_TEST_NEW")[0].1, "1");
    }

    #[test]
    fn argv0_is_looked_up_in_the_command_path() {
        let env = vec![(OsString::from("PATH"), OsString::from("/nonexistent:/bin"))];
        assert_eq!(resolve("sh", &env, None).unwrap(), Path::new("/bin/sh"));
        assert_eq!(
            resolve("./rel/tool", &env, None).unwrap(),
            Path::new("./rel/tool")
        );
        let err = resolve("no-such-tool-4711", &env, None).unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.message.contains("/nonexistent:/bin"));
    }

    #[test]
    fn missing_working_directory_is_refused() {
        let err = working_dir("/no/such/dir").unwrap_err();
        assert_eq!(err.kind, ErrorKind::CwdNotFound);
        assert!(working_dir("/").is_ok());
    }
}
