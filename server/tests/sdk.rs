//! The official E2B Python SDK (pinned: e2b 2.63.0, e2b-code-interpreter
//! 2.11.5, installed into a cached virtual environment) against a real
//! `dormouse-server`: the scripts under `tests/sdk/` are the judge. Then
//! 20 concurrent clients, bad input, no leaks, and a SIGTERM that pauses
//! every sandbox so a restarted server resumes them.
//!
//! Needs /dev/kvm, the guest template (`DORMOUSE_TEMPLATE_PATH`, built by
//! `scripts/test`) and PyPI (first run only); skips loudly without them,
//! except on CI where that is a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SDK_PINS: [&str; 2] = ["e2b==2.63.0", "e2b-code-interpreter==2.11.5"];
const KEY: &str = "e2b_test_key_0123456789abcdef";
const OTHER_KEY: &str = "e2b_other_key_0123456789abcdef";
const LOAD_KEY: &str = "e2b_load_key_0123456789abcdef";
/// The first start boots the template once; the PVM hosts are slow.
const READY_TIMEOUT: Duration = Duration::from_secs(900);

fn on_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn require(what: &str) {
    if on_ci() {
        panic!("CI=true but {what}; CI must provide everything (run scripts/test)");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPING TEST: {what}");
    eprintln!("!!! run scripts/test to build the guest image and run every test");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
}

/// A virtual environment with the pinned SDK, made once per machine.
fn sdk_venv() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = base
        .join("dormouse")
        .join(format!("e2b-sdk-{}", SDK_PINS.join("-")));
    let marker = dir.join(".installed");
    if marker.exists() {
        return Some(dir);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(SDK_PINS)
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        require("the E2B SDK could not be installed (python3 -m venv, pip install from PyPI)");
        return None;
    }
    std::fs::write(&marker, b"").expect("write the venv marker");
    Some(dir)
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    /// Starts the server on an ephemeral port and waits until `/health`
    /// says ready.
    fn start(state: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dormouse-server"))
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .env("DORMOUSE_API_KEYS", format!("{KEY},{OTHER_KEY},{LOAD_KEY}"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dormouse-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        // Forward the server's log to the test's output, picking out the
        // address it listens on.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("server: {line}");
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the server says where it listens");
        let server = Server {
            child,
            url: format!("http://{addr}"),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok((200, _)) = http_get(&addr, "/health") {
                break;
            }
            assert!(Instant::now() < deadline, "the server did not get ready");
            std::thread::sleep(Duration::from_millis(500));
        }
        server
    }

    fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid, which has not been
        // reaped (we hold the Child), so the pid is still that process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the server") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET with the status and body (HTTP/1.0, no client library needed).
fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    Ok((status, body))
}

/// Starts `tests/sdk/<script>` with the SDK pointed at `server`.
fn spawn_script(venv: &Path, server: &Server, script: &str, key: &str, args: &[&str]) -> Child {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    Command::new(venv.join("bin/python"))
        .arg("-u")
        .arg(path)
        .args(args)
        .env("E2B_API_URL", &server.url)
        .env("E2B_SANDBOX_URL", &server.url)
        .env("E2B_API_KEY", key)
        .env("E2B_OTHER_KEY", OTHER_KEY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {script}: {e}"))
}

/// Waits for a script; it must exit 0 with `OK` as its last line. Returns
/// its output.
fn finish(script: &str, child: Child) -> String {
    let out = child.wait_with_output().expect("wait for the script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in stdout.lines() {
        eprintln!("{script}: {line}");
    }
    assert!(
        out.status.success() && stdout.lines().last() == Some("OK"),
        "{script} failed ({}); its output is above",
        out.status
    );
    stdout
}

fn sandbox_dirs(state: &Path) -> usize {
    std::fs::read_dir(state.join("sandboxes"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_official_e2b_sdk_drives_dormouse() {
    if !Path::new("/dev/kvm").exists() {
        return require("/dev/kvm is missing");
    }
    let Some(venv) = sdk_venv() else { return };
    let state = tempfile::tempdir().expect("temp state dir");
    let server = Server::start(state.path());
    let idle_threads = server.threads();

    // The SDK's own flows, at once (each key sees only its sandboxes).
    let scripts = [
        "basic.py",
        "auto_pause.py",
        "bad_input.py",
        "list.py",
        "async_sdk.py",
    ]
    .map(|name| (name, spawn_script(&venv, &server, name, KEY, &[])));
    for (name, child) in scripts {
        finish(name, child);
    }
    assert_eq!(http_get(server.addr(), "/health").unwrap().0, 200);

    // Load: 20 clients, each its own sandbox, nothing failing or left.
    finish(
        "load.py",
        spawn_script(&venv, &server, "load.py", LOAD_KEY, &[]),
    );
    assert_eq!(
        sandbox_dirs(state.path()),
        0,
        "sandbox directories left behind"
    );
    // vCPU and device threads end with their sandbox; the async
    // runtime's blocking pool lets idle threads go after 10 s.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut threads = server.threads();
    while threads > idle_threads + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        threads = server.threads();
    }
    eprintln!("server threads: {idle_threads} idle at start, {threads} after the load");
    assert!(
        threads <= idle_threads + 2,
        "threads left behind: {threads} now, {idle_threads} when idle"
    );

    // SIGTERM pauses what runs; a new server resumes it with its state.
    let out = finish(
        "restart.py",
        spawn_script(&venv, &server, "restart.py", KEY, &["before"]),
    );
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("sandbox "))
        .expect("restart.py names its sandbox")
        .to_owned();
    let status = server.terminate();
    assert!(
        status.success(),
        "the server exited with {status} after SIGTERM"
    );
    let server = Server::start(state.path());
    finish(
        "restart.py",
        spawn_script(&venv, &server, "restart.py", KEY, &["after", &id]),
    );
    assert_eq!(
        sandbox_dirs(state.path()),
        0,
        "sandbox directories left behind"
    );
}
