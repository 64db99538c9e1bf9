//! Boots real guests from the `python` template and runs commands in them.

mod common;

use std::hash::Hasher;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use common::{runtime, TEMPLATE};
use dormouse::{Command, Error, Runtime, SandboxConfig};

fn file_digest(path: &Path) -> (u64, u64) {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        len += n as u64;
        hasher.write(&buf[..n]);
    }
    (len, hasher.finish())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sandboxes_run_commands_in_isolation() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    let rootfs = rt.template(TEMPLATE).unwrap().rootfs_path();
    let before = file_digest(&rootfs);

    let (a, b) = tokio::join!(
        rt.create(TEMPLATE, SandboxConfig::default()),
        rt.create(TEMPLATE, SandboxConfig::default())
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.id(), b.id());

    // The example.
    let out = a
        .commands()
        .run("echo hello; uname -r; python3 -c 'print(6*7)'")
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert_eq!(lines[0], "hello");
    assert!(lines[1].starts_with("6.1."), "kernel version: {}", lines[1]);
    assert_eq!(lines[2], "42");

    // stdout and stderr kept apart.
    let out = a
        .commands()
        .run("echo out1; echo err1 >&2; echo out2; echo err2 >&2")
        .await
        .unwrap();
    assert_eq!(out.stdout, "out1\nout2\n");
    assert_eq!(out.stderr, "err1\nerr2\n");

    // Exit codes and signals.
    let out = a.commands().run("echo bye; exit 7").await.unwrap();
    assert_eq!((out.exit_code, out.signal), (7, None));
    assert_eq!(out.stdout, "bye\n");
    let out = a.commands().run("kill -9 $$").await.unwrap();
    assert_eq!(out.signal, Some(9), "{out:?}");
    assert_eq!(out.exit_code, 128 + 9);

    // Environment, working directory, stdin, no shell.
    let out = a
        .commands()
        .exec(
            Command::shell("echo \"$GREETING\"; pwd")
                .env("GREETING", "hi there")
                .cwd("/usr/lib"),
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, "hi there\n/usr/lib\n");
    let out = a
        .commands()
        .exec(Command::new(["tr", "a-z", "A-Z"]).stdin("shout\n"))
        .await
        .unwrap();
    assert_eq!(out.stdout, "SHOUT\n");

    // More than 1 MiB of output arrives intact.
    let n = 3 * 1024 * 1024 + 17;
    let out = a
        .commands()
        .run(&format!(
            "python3 -c \"import sys; sys.stdout.write(''.join(chr(97 + i % 26) for i in range({n})))\""
        ))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.len(), n);
    assert!(out
        .stdout
        .bytes()
        .enumerate()
        .all(|(i, c)| c == b'a' + (i % 26) as u8));

    // A file written in one sandbox is absent in the other.
    let out = a
        .commands()
        .run("echo secret > /root/only-in-a && sync && cat /root/only-in-a")
        .await
        .unwrap();
    assert_eq!(out.stdout, "secret\n");
    let out = b.commands().run("test -e /root/only-in-a").await.unwrap();
    assert_eq!(out.exit_code, 1, "file leaked between sandboxes");
    let out = b
        .commands()
        .run("echo b > /root/only-in-b && sync")
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    let out = a.commands().run("test -e /root/only-in-b").await.unwrap();
    assert_eq!(out.exit_code, 1, "file leaked between sandboxes");

    // Kill removes every file of the sandbox.
    let (dir_a, dir_b) = (a.dir().to_path_buf(), b.dir().to_path_buf());
    assert!(dir_a.join("console.log").exists());
    a.kill().await.unwrap();
    assert!(!dir_a.exists(), "{} survived kill", dir_a.display());
    // Dropping a running sandbox also stops it and removes its files.
    drop(b);
    assert!(!dir_b.exists(), "{} survived drop", dir_b.display());
    assert_eq!(
        std::fs::read_dir(state.path().join("sandboxes"))
            .unwrap()
            .count(),
        0
    );

    // The shared template image was never written.
    assert_eq!(file_digest(&rootfs), before, "the template image changed");
}

#[tokio::test]
async fn guest_that_never_gets_ready_times_out_and_is_torn_down() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    let err = rt
        .create(
            TEMPLATE,
            SandboxConfig::default().boot_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BootTimeout { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(state.path().join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "a failed boot left files behind"
    );
}

/// A template directory whose files are links to the real template's,
/// with `replace` applied.
fn template_copy(rt: &Runtime, into: &Path, replace: impl FnOnce(&Path)) -> std::path::PathBuf {
    let real = rt.template(TEMPLATE).unwrap();
    let dir = into.join(TEMPLATE);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&real.dir).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    replace(&dir);
    into.to_path_buf()
}

#[tokio::test]
async fn missing_kernel_corrupt_rootfs_and_missing_kvm_are_typed_errors() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };

    let t = tempfile::tempdir().unwrap();
    let dirs = template_copy(&rt, t.path(), |dir| {
        std::fs::remove_file(dir.join("vmlinux")).unwrap();
    });
    let rt2 = Runtime::builder(state.path())
        .template_dir(dirs)
        .open()
        .await
        .unwrap();
    let err = rt2
        .create(TEMPLATE, SandboxConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KernelMissing { .. }), "{err}");

    let t = tempfile::tempdir().unwrap();
    let dirs = template_copy(&rt, t.path(), |dir| {
        std::fs::remove_file(dir.join("rootfs.ext4")).unwrap();
        std::fs::write(dir.join("rootfs.ext4"), vec![0xa5u8; 1 << 20]).unwrap();
    });
    let rt2 = Runtime::builder(state.path())
        .template_dir(dirs)
        .open()
        .await
        .unwrap();
    let err = rt2
        .create(TEMPLATE, SandboxConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::CorruptRootfs { .. }), "{err}");

    let rt2 = Runtime::builder(state.path())
        .kvm_path("/nonexistent/kvm")
        .open()
        .await
        .unwrap();
    let err = rt2
        .create(TEMPLATE, SandboxConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::KvmUnavailable { .. }), "{err}");
    assert!(err.to_string().contains("KVM"), "{err}");

    // A limit of PVM hosts is said at once, not found by a boot that hangs.
    if rt.host_kind() == dormouse::HostKind::Pvm {
        let err = rt
            .create(TEMPLATE, SandboxConfig::default().vcpus(2))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("1 vCPU"), "{err}");
    }

    assert_eq!(
        std::fs::read_dir(state.path().join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "a failed create left files behind"
    );
}

#[tokio::test]
async fn guest_kernel_panic_is_a_typed_error_with_console() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    // An image with a valid ext4 superblock magic but nothing else: the
    // kernel cannot mount it and panics.
    let t = tempfile::tempdir().unwrap();
    let dirs = template_copy(&rt, t.path(), |dir| {
        std::fs::remove_file(dir.join("rootfs.ext4")).unwrap();
        let mut img = vec![0u8; 8 << 20];
        img[1024 + 56] = 0x53;
        img[1024 + 57] = 0xef;
        std::fs::write(dir.join("rootfs.ext4"), img).unwrap();
    });
    let rt2 = Runtime::builder(state.path())
        .template_dir(dirs)
        .open()
        .await
        .unwrap();
    let err = rt2
        .create(TEMPLATE, SandboxConfig::default())
        .await
        .unwrap_err();
    match &err {
        Error::GuestStopped { reason, console } => {
            assert!(
                matches!(reason, dormouse::vmm::vcpu::GuestStop::KernelPanic(_)),
                "{err}"
            );
            assert!(!console.0.is_empty());
        }
        other => panic!("expected a kernel panic, got {other}"),
    }
}
