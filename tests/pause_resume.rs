//! Pause and resume of a real guest: processes, memory (tmpfs) and disk
//! survive; a paused sandbox resumes by id in another process; damaged
//! snapshot files give typed errors and lose nothing.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command as Process;
use std::time::{Duration, Instant};

use common::{runtime, TEMPLATE};
use dormouse::snapshot::SnapshotError;
use dormouse::{Command, Error, Running, Sandbox, SandboxConfig};

/// Set in the child process this test spawns: the sandbox to resume.
const CHILD_ID_ENV: &str = "DORMOUSE_TEST_CHILD_SANDBOX";
/// Set in the child process: the runtime's state directory.
const CHILD_DIR_ENV: &str = "DORMOUSE_TEST_CHILD_STATE";

/// A process that counts in guest memory and writes the count out: a
/// process that is restarted would start again from 1. (Python rather than
/// a shell loop: a `sleep` process every tick would keep the guest's
/// emulated kernel busy on a PVM host.)
const COUNTER: &str = "cat > /tmp/counter.py <<'EOF'
import os, time
open('/tmp/counter.pid', 'w').write(str(os.getpid()))
i = 0
while True:
    i += 1
    with open('/tmp/count.tmp', 'w') as f:
        f.write(str(i))
    os.rename('/tmp/count.tmp', '/tmp/count')
    time.sleep(0.2)
EOF
setsid python3 /tmp/counter.py </dev/null >/tmp/counter.log 2>&1 &";

/// Longest any one guest command of this test may take: a guest process
/// that died or hung fails the test instead of hanging it.
const COMMAND_LIMIT: Duration = Duration::from_secs(300);

async fn run(sbx: &Sandbox<Running>, cmd: &str) -> String {
    let out = sbx
        .commands()
        .exec(Command::shell(cmd).timeout(COMMAND_LIMIT))
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert_eq!(out.exit_code, 0, "{cmd}: {out:?}");
    out.stdout
}

/// Checks what must survive every pause: the counter process (same pid,
/// counting on from where it was), a file in tmpfs (guest memory) and one
/// on the disk.
async fn check_state(sbx: &Sandbox<Running>, pid: &str, at_least: u64, booted: Instant) -> u64 {
    let out = run(
        sbx,
        "echo $(cat /tmp/counter.pid); kill -0 $(cat /tmp/counter.pid) && echo alive; \
         cat /tmp/in-memory; cat /root/on-disk; echo $(cat /tmp/count); cat /proc/uptime",
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    // The guest's clock runs on across restores: never ahead of the time
    // that passed here since the boot began.
    let uptime: f64 = lines[5]
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("uptime in {out}"));
    assert!(
        uptime <= booted.elapsed().as_secs_f64() + 5.0,
        "guest uptime {uptime} s, but only {:.0?} passed since boot",
        booted.elapsed()
    );
    assert_eq!(lines[..4], [pid, "alive", "memory 42", "disk 42"], "{out}");
    let n: u64 = lines[4].parse().unwrap();
    assert!(
        n >= at_least,
        "the counter went back from {at_least} to {n}"
    );
    n
}

fn memory_file(dir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("memory-") && !n.ends_with(".pages"))
        })
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .expect("a memory file")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_keeps_processes_memory_and_disk() {
    if std::env::var_os(CHILD_ID_ENV).is_some() {
        return; // this process is the child of `child_resumes_by_id`
    }
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    let booted = Instant::now();
    let sbx = rt
        .create(TEMPLATE, SandboxConfig::default())
        .await
        .expect("create");
    let id = sbx.id().to_string();
    let dir = sbx.dir().to_owned();
    run(
        &sbx,
        &format!("echo 'memory 42' > /tmp/in-memory; echo 'disk 42' > /root/on-disk; {COUNTER}"),
    )
    .await;
    let pid = run(
        &sbx,
        "for _ in $(seq 240); do [ -e /tmp/count ] && break; sleep 1; done; \
         [ -e /tmp/count ] || { echo 'the counter never counted:' >&2; cat /tmp/counter.log >&2; exit 1; }; \
         cat /tmp/counter.pid",
    )
    .await;
    let pid = pid.trim().to_owned();
    let mut seen = check_state(&sbx, &pid, 1, booted).await;

    // Pause and resume in this process, 20 times in a row (past the
    // number of memory layers a snapshot keeps before writing a new base).
    let mut sbx = sbx;
    for round in 0..20 {
        let t = Instant::now();
        let paused = sbx.pause().await.expect("pause");
        let pause_time = t.elapsed();
        let mem = memory_file(&dir);
        let meta = std::fs::metadata(&mem).unwrap();
        eprintln!(
            "round {round}: paused in {pause_time:.2?}; newest memory file {} MiB long, {} KiB on disk",
            meta.len() >> 20,
            (meta.blocks() * 512) >> 10
        );
        assert!(
            meta.blocks() * 512 < meta.len(),
            "never-touched memory must stay a hole"
        );
        let t = Instant::now();
        sbx = paused.resume().await.expect("resume");
        eprintln!(
            "round {round}: resumed (agent answering) in {:.2?}",
            t.elapsed()
        );
        seen = check_state(&sbx, &pid, seen, booted).await;
    }

    // Pause, drop the handle, resume in another process, which pauses it
    // again; then resume here.
    let paused = sbx.pause().await.expect("pause");
    drop(paused);
    assert!(dir.join("snapshot.json").exists());
    let status = Process::new(std::env::current_exe().unwrap())
        .args(["child_resumes_by_id", "--exact", "--nocapture"])
        .env(CHILD_ID_ENV, &id)
        .env(CHILD_DIR_ENV, state.path())
        .status()
        .unwrap();
    assert!(status.success(), "the child process failed");
    assert!(dir.join("snapshot.json").exists());

    // Damaged files: typed errors, and the snapshot still resumes after.
    let manifest = std::fs::read(dir.join("snapshot.json")).unwrap();
    let state_name = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .find(|n| n.starts_with("state-"))
        .unwrap();
    let state_path = dir.join(&state_name);
    let state_bytes = std::fs::read(&state_path).unwrap();
    let mut flipped = state_bytes.clone();
    flipped[state_bytes.len() / 2] ^= 0x20;
    std::fs::write(&state_path, &flipped).unwrap();
    let err = rt.connect(&id).await.unwrap_err();
    assert!(
        matches!(err, Error::Snapshot(SnapshotError::Corrupt { ref path, .. }) if path == &state_path),
        "{err}"
    );
    std::fs::write(&state_path, &state_bytes[..state_bytes.len() - 100]).unwrap();
    let err = rt.connect(&id).await.unwrap_err();
    assert!(
        matches!(err, Error::Snapshot(SnapshotError::Corrupt { .. })),
        "{err}"
    );
    std::fs::write(&state_path, &state_bytes).unwrap();
    let mut bad_manifest = manifest.clone();
    let at = bad_manifest.len() / 3;
    bad_manifest[at] ^= 0x55;
    std::fs::write(dir.join("snapshot.json"), &bad_manifest).unwrap();
    let err = rt.connect(&id).await.unwrap_err();
    assert!(matches!(err, Error::Snapshot(_)), "{err}");
    std::fs::write(dir.join("snapshot.json"), &manifest).unwrap();
    let mem = memory_file(&dir);
    let mem_len = std::fs::metadata(&mem).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    file.set_len(mem_len - 4096).unwrap();
    let err = rt.connect(&id).await.unwrap_err();
    assert!(
        matches!(err, Error::Snapshot(SnapshotError::Corrupt { ref path, .. }) if path == &mem),
        "{err}"
    );
    file.set_len(mem_len).unwrap(); // the hole reads as zeros, as before
    drop(file);

    // Unknown ids.
    assert!(matches!(
        rt.connect("00000000000000000000").await.unwrap_err(),
        Error::NotFound { .. }
    ));
    assert!(matches!(
        rt.connect("../../etc").await.unwrap_err(),
        Error::NotFound { .. }
    ));

    let sbx = rt.connect(&id).await.expect("resume after the child");
    let out = run(&sbx, "cat /tmp/from-child").await;
    assert_eq!(out, "child was here\n");
    check_state(&sbx, &pid, seen, booted).await;

    // A running sandbox cannot be taken by id; a paused one can be killed.
    assert!(matches!(
        rt.connect(&id).await.unwrap_err(),
        Error::Busy { .. }
    ));
    let paused = sbx.pause().await.expect("pause");
    drop(paused);
    rt.kill(&id).await.expect("kill by id");
    assert!(!dir.exists(), "kill leaves {}", dir.display());
    assert!(matches!(
        rt.connect(&id).await.unwrap_err(),
        Error::NotFound { .. }
    ));
}

/// Run only as the child process of the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_resumes_by_id() {
    let (Some(id), Some(state)) = (
        std::env::var_os(CHILD_ID_ENV),
        std::env::var_os(CHILD_DIR_ENV),
    ) else {
        return; // not the child
    };
    let rt = dormouse::Runtime::open(state).await.unwrap();
    let t = Instant::now();
    let sbx = rt.connect(id.to_str().unwrap()).await.expect("connect");
    eprintln!("child: resumed by id in {:.2?}", t.elapsed());
    let out = run(
        &sbx,
        "cat /tmp/in-memory; echo 'child was here' > /tmp/from-child",
    )
    .await;
    assert_eq!(out, "memory 42\n");
    let paused = sbx.pause().await.expect("child: pause");
    drop(paused);
}
