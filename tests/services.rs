//! The services of a running sandbox against a real guest: commands,
//! files, the code interpreter and port forwards. One sandbox is booted for
//! the whole test binary and every test uses it (concurrently, which is
//! part of what is tested).

mod common;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{runtime, TEMPLATE};
use dormouse::{Command, CommandEvent, EntryKind, Error, FileEventKind, Running, Runtime, Sandbox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Shared {
    _rt: Runtime,
    sbx: Sandbox<Running>,
}

/// One tokio runtime for every test, so the shared sandbox's tasks outlive
/// each test.
fn tokio_rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn shared() -> Option<&'static Shared> {
    static SHARED: OnceLock<Option<Shared>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            tokio_rt().block_on(async {
                // Under target/, wiped each run: the sandbox of a static is
                // never dropped.
                let state = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("services");
                let _ = std::fs::remove_dir_all(&state);
                std::fs::create_dir_all(&state).unwrap();
                let rt = runtime(&state).await?;
                let start = Instant::now();
                let sbx = rt
                    .create(TEMPLATE, common::long_lived())
                    .await
                    .expect("create the shared sandbox");
                eprintln!("shared sandbox {} ready in {:?}", sbx.id(), start.elapsed());
                Some(Shared { _rt: rt, sbx })
            })
        })
        .as_ref()
}

/// Longest one test may have the sandbox: a guest process that died or hung
/// fails the test instead of hanging the run.
const TEST_LIMIT: Duration = Duration::from_secs(900);

async fn bounded(test: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, test).await.is_err() {
        panic!("the test did not finish within {TEST_LIMIT:?}");
    }
}

/// Runs `f` with the shared sandbox (skipping when there is none).
fn with_sandbox<F>(f: impl FnOnce(&'static Sandbox<Running>) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let Some(shared) = shared() else { return };
    tokio_rt().block_on(bounded(f(&shared.sbx)));
}

#[test]
fn commands_env_cwd_stdin_exit_codes_and_timeout() {
    with_sandbox(|sbx| async move {
        let cmds = sbx.commands();
        let out = cmds
            .exec(
                Command::new(["sh", "-c", "pwd; echo $GREETING; cat; echo err >&2; exit 5"])
                    .cwd("/tmp")
                    .env("GREETING", "hej")
                    .stdin("from stdin\n"),
            )
            .await
            .unwrap();
        assert_eq!(out.stdout, "/tmp\nhej\nfrom stdin\n");
        assert_eq!(out.stderr, "err\n");
        assert_eq!(out.exit_code, 5);

        let start = Instant::now();
        let err = cmds
            // Long enough for the shell to start and print on a busy
            // emulated guest (other tests run at the same time).
            .exec(Command::shell("echo started; sleep 600").timeout(Duration::from_secs(20)))
            .await
            .unwrap_err();
        let Error::CommandTimedOut { timeout, output } = err else {
            panic!("expected a timeout, got {err:?}");
        };
        assert_eq!(timeout, Duration::from_secs(20));
        assert_eq!(output.stdout, "started\n");
        assert_eq!(output.signal, Some(9));
        // Killed at 20 s; a busy emulated guest may take a while to say so,
        // but far less than the 600 s the command would run.
        assert!(start.elapsed() < Duration::from_secs(300));

        let missing = cmds.exec(Command::new(["no-such-program-4711"])).await;
        assert!(
            matches!(
                missing,
                Err(Error::Agent(dormouse::agent::AgentError::Remote {
                    kind: dormouse::proto::ErrorKind::NotFound,
                    ..
                }))
            ),
            "{missing:?}"
        );
    });
}

#[test]
fn background_commands_are_listed_fed_reattached_and_killed() {
    with_sandbox(|sbx| async move {
        let cmds = sbx.commands();
        let mut h = cmds
            .spawn(
                Command::shell("echo ready; while read l; do echo \"got $l\"; done; echo bye")
                    .keep_stdin_open(true)
                    .tag("echoer"),
            )
            .await
            .unwrap();
        let pid = h.pid();
        assert_eq!(next_stdout(&mut h).await, "ready\n");
        h.write_stdin("a\n").await.unwrap();
        assert_eq!(next_stdout(&mut h).await, "got a\n");
        drop(h); // detaches; the command runs on

        let listed = cmds.list().await.unwrap();
        let info = listed.iter().find(|p| p.pid == pid).expect("listed");
        assert_eq!(info.tag.as_deref(), Some("echoer"));

        let mut again = cmds.connect(pid).await.unwrap();
        cmds.send_stdin(pid, "b\n").await.unwrap();
        assert_eq!(next_stdout(&mut again).await, "got b\n");
        cmds.close_stdin(pid).await.unwrap();
        let out = again.wait().await.unwrap();
        assert_eq!((out.stdout.as_str(), out.exit_code), ("bye\n", 0));
        assert!(matches!(
            cmds.kill(pid).await,
            Err(Error::ProcessNotFound { pid: p }) if p == pid
        ));

        // A server that never ends, killed by pid.
        let h = cmds.spawn(Command::shell("sleep 600")).await.unwrap();
        let pid = h.pid();
        drop(h);
        cmds.kill(pid).await.unwrap();
        let start = Instant::now();
        while cmds.list().await.unwrap().iter().any(|p| p.pid == pid) {
            assert!(start.elapsed() < Duration::from_secs(30), "still listed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

async fn next_stdout(h: &mut dormouse::CommandHandle) -> String {
    let event = tokio::time::timeout(Duration::from_secs(60), h.next())
        .await
        .expect("output within 60 s")
        .unwrap();
    match event {
        Ok(CommandEvent::Stdout(d)) => String::from_utf8(d).unwrap(),
        Ok(CommandEvent::Stderr(d)) => panic!("stderr: {}", String::from_utf8_lossy(&d)),
        Err(status) => panic!("ended: {status:?}"),
    }
}

#[test]
fn fifty_concurrent_commands_all_return_their_own_output() {
    with_sandbox(|sbx| async move {
        let start = Instant::now();
        let runs = (0..50).map(|i| async move {
            let out = sbx
                .commands()
                .run(&format!("echo out-{i}; echo err-{i} >&2; exit {}", i % 5))
                .await
                .unwrap();
            assert_eq!(out.stdout, format!("out-{i}\n"));
            assert_eq!(out.stderr, format!("err-{i}\n"));
            assert_eq!(out.exit_code, i % 5);
        });
        let handles: Vec<_> = runs.map(tokio::spawn).collect();
        for h in handles {
            h.await.unwrap();
        }
        eprintln!("50 concurrent commands in {:?}", start.elapsed());
    });
}

#[test]
fn files_can_be_written_read_listed_moved_and_removed() {
    with_sandbox(|sbx| async move {
        let files = sbx.files();
        let base = "/tmp/files-test";
        let entry = files
            .write(&format!("{base}/a/b/hello.txt"), "hello files\n")
            .await
            .unwrap();
        assert_eq!(entry.kind, EntryKind::File);
        assert_eq!(entry.size, 12);
        assert_eq!(entry.path, format!("{base}/a/b/hello.txt"));
        assert_eq!(
            files
                .read_to_string(&format!("{base}/a/b/hello.txt"))
                .await
                .unwrap(),
            "hello files\n"
        );
        // A command sees what the file API wrote, and the other way round.
        let out = sbx
            .commands()
            .run(&format!(
                "cat {base}/a/b/hello.txt; echo made > {base}/a/cmd.txt"
            ))
            .await
            .unwrap();
        assert_eq!(out.stdout, "hello files\n");
        assert_eq!(
            files.read(&format!("{base}/a/cmd.txt")).await.unwrap(),
            b"made\n"
        );

        let mut names: Vec<String> = files
            .list(base, 3)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.path)
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                format!("{base}/a"),
                format!("{base}/a/b"),
                format!("{base}/a/b/hello.txt"),
                format!("{base}/a/cmd.txt"),
            ]
        );
        let dir = files.stat(&format!("{base}/a")).await.unwrap();
        assert_eq!((dir.kind, dir.owner.as_str()), (EntryKind::Dir, "root"));

        assert!(files.make_dir(&format!("{base}/new/deep")).await.unwrap());
        assert!(!files.make_dir(&format!("{base}/new/deep")).await.unwrap());
        files
            .rename(
                &format!("{base}/a/cmd.txt"),
                &format!("{base}/new/moved.txt"),
            )
            .await
            .unwrap();
        assert!(!files.exists(&format!("{base}/a/cmd.txt")).await.unwrap());
        assert!(files
            .exists(&format!("{base}/new/moved.txt"))
            .await
            .unwrap());

        // Typed errors.
        assert!(matches!(
            files.read(&format!("{base}/missing")).await,
            Err(Error::PathNotFound { .. })
        ));
        assert!(matches!(
            files.read(base).await,
            Err(Error::IsADirectory { .. })
        ));
        files.remove(base).await.unwrap();
        assert!(!files.exists(base).await.unwrap());
        assert!(matches!(
            files.remove(base).await,
            Err(Error::PathNotFound { .. })
        ));
    });
}

/// FNV-1a over a stream, so neither side's bytes are ever held whole.
struct Digest {
    hash: u64,
    len: u64,
}

impl Digest {
    fn new() -> Self {
        Self {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }

    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.hash = (self.hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
}

impl tokio::io::AsyncWrite for Digest {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.update(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A deterministic byte stream of `len` bytes, generated as it is read.
struct Pattern {
    left: u64,
    state: u64,
}

impl tokio::io::AsyncRead for Pattern {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = (buf.remaining() as u64).min(self.left) as usize;
        let mut chunk = vec![0u8; n];
        for b in &mut chunk {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
        self.left -= n as u64;
        buf.put_slice(&chunk);
        std::task::Poll::Ready(Ok(()))
    }
}

#[test]
fn a_file_many_chunks_long_round_trips_intact() {
    with_sandbox(|sbx| async move {
        // 32 times the 256 KiB transfer chunk.
        const LEN: u64 = 8 << 20;
        let mut expected = Digest::new();
        let mut src = Pattern {
            left: LEN,
            state: 0x1234_5678,
        };
        {
            let mut copy = Pattern {
                left: LEN,
                state: 0x1234_5678,
            };
            let mut buf = Vec::new();
            copy.read_to_end(&mut buf).await.unwrap();
            expected.update(&buf);
        }
        let start = Instant::now();
        let entry = sbx
            .files()
            .write_from("/tmp/big.bin", &mut src)
            .await
            .unwrap();
        let wrote = start.elapsed();
        assert_eq!(entry.size, LEN);
        let start = Instant::now();
        let mut got = Digest::new();
        sbx.files().read_to("/tmp/big.bin", &mut got).await.unwrap();
        eprintln!(
            "8 MiB: written in {wrote:?}, read back in {:?}",
            start.elapsed()
        );
        if (got.len, got.hash) != (expected.len, expected.hash) {
            // Say which way the bytes went wrong: a second read that
            // differs from the first points at the read path.
            let mut again = Digest::new();
            sbx.files()
                .read_to("/tmp/big.bin", &mut again)
                .await
                .unwrap();
            panic!(
                "8 MiB round trip: sent {:?}, read back {:?}, read again {:?}",
                (expected.len, expected.hash),
                (got.len, got.hash),
                (again.len, again.hash)
            );
        }
        // The guest agrees on the size.
        let out = sbx.commands().run("wc -c < /tmp/big.bin").await.unwrap();
        assert_eq!(out.stdout.trim(), LEN.to_string());
        sbx.files().remove("/tmp/big.bin").await.unwrap();
    });
}

#[test]
fn watch_dir_sees_what_a_command_does() {
    with_sandbox(|sbx| async move {
        let dir = "/tmp/watched";
        sbx.files().make_dir(&format!("{dir}/sub")).await.unwrap();
        let mut w = sbx.files().watch_dir(dir, true).await.unwrap();
        sbx.commands()
            .run(&format!("echo x > {dir}/sub/new.txt; rm {dir}/sub/new.txt"))
            .await
            .unwrap();
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|(k, _): &(FileEventKind, String)| *k == FileEventKind::Remove)
        {
            let ev = tokio::time::timeout(Duration::from_secs(60), w.next())
                .await
                .expect("an event within 60 s")
                .expect("the watch goes on")
                .unwrap();
            seen.push((ev.kind, ev.path));
        }
        let file = format!("{dir}/sub/new.txt");
        assert!(
            seen.contains(&(FileEventKind::Create, file.clone())),
            "{seen:?}"
        );
        assert!(
            seen.contains(&(FileEventKind::Write, file.clone())),
            "{seen:?}"
        );
        assert!(seen.contains(&(FileEventKind::Remove, file)), "{seen:?}");
    });
}

#[test]
fn run_code_keeps_state_reports_errors_and_times_out() {
    with_sandbox(|sbx| async move {
        let start = Instant::now();
        let run = sbx.run_code("x = 42").await.unwrap();
        eprintln!(
            "first run_code (starts the interpreter) in {:?}",
            start.elapsed()
        );
        assert!(run.error.is_none(), "{run:?}");
        let start = Instant::now();
        let run = sbx.run_code("print(x)").await.unwrap();
        eprintln!("second run_code in {:?}", start.elapsed());
        assert_eq!(run.stdout, "42\n");
        let run = sbx.run_code("print('a'); x + 1").await.unwrap();
        assert_eq!(
            (run.stdout.as_str(), run.result.as_deref()),
            ("a\n", Some("43"))
        );

        let run = sbx
            .run_code("def f():\n    return 1 / 0\nf()")
            .await
            .unwrap();
        let err = run.error.expect("an exception");
        assert_eq!(err.name, "ZeroDivisionError");
        assert_eq!(err.value, "division by zero");
        assert!(err.traceback.contains("return 1 / 0"), "{}", err.traceback);
        assert_eq!(
            sbx.run_code("x").await.unwrap().result.as_deref(),
            Some("42")
        );

        let run = sbx
            .run_code_with(
                dormouse::CodeRun::new("import time\ntime.sleep(600)")
                    .timeout(Duration::from_secs(3)),
                None,
            )
            .await
            .unwrap();
        assert!(run.timed_out, "{run:?}");
        assert_eq!(
            run.error.map(|e| e.name).as_deref(),
            Some("KeyboardInterrupt")
        );
        assert_eq!(
            sbx.run_code("x * 2").await.unwrap().result.as_deref(),
            Some("84")
        );
    });
}

#[test]
fn an_http_server_in_the_guest_answers_through_a_forwarded_port() {
    with_sandbox(|sbx| async move {
        let server = common::start_hello_server(sbx).await;
        let fwd = sbx.ports().expose(8000).await.unwrap();
        let start = Instant::now();
        let body = loop {
            let mut conn = tokio::net::TcpStream::connect(fwd.local_addr())
                .await
                .unwrap();
            conn.write_all(b"GET /hello.txt HTTP/1.0\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut resp = Vec::new();
            let _ = conn.read_to_end(&mut resp).await;
            let resp = String::from_utf8_lossy(&resp).into_owned();
            if resp.starts_with("HTTP/1.0 200") {
                break resp;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "the guest server never answered: {resp:?}"
            );
            let running = sbx.commands().list().await.unwrap();
            assert!(
                running.iter().any(|p| p.pid == server.pid()),
                "the guest's HTTP server exited: {:?}",
                server.wait().await
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        eprintln!(
            "HTTP answered through the forward after {:?}",
            start.elapsed()
        );
        assert!(body.ends_with(common::HELLO), "{body}");
        let local = fwd.local_addr();
        fwd.close();
        sbx.commands().kill(server.pid()).await.unwrap();
        assert!(
            tokio::net::TcpStream::connect(local).await.is_err(),
            "listener closed"
        );
    });
}

/// Builds `tests/guest/simd_state.c` as a static program for the guest, or
/// `None` (a loud skip, a failure on CI) without a C compiler.
fn build_simd_checker() -> Option<std::path::PathBuf> {
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("simd_state");
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/guest/simd_state.c");
    match std::process::Command::new("cc")
        .args(["-O2", "-Wall", "-static", "-o"])
        .arg(&out)
        .arg(src)
        .status()
    {
        Ok(status) if status.success() => Some(out),
        other => {
            common::require(&format!("cannot build {src} with cc: {other:?}"));
            None
        }
    }
}

/// Guest user mode may use AVX and AVX-512 registers (on PVM it runs
/// natively under the host's XCR0); the guest kernel must keep each task's
/// registers across task switches and signal handlers, or programs see
/// other programs' data (before the VMM completed XSAVE/XRSTOR for the
/// guest kernel, `xargs` arguments came out mangled and Python crashed).
#[test]
fn guest_tasks_keep_their_simd_registers() {
    let Some(checker) = build_simd_checker() else {
        return;
    };
    with_sandbox(|sbx| async move {
        let bin = std::fs::read(&checker).unwrap();
        sbx.files().write("/tmp/simd_state", &bin).await.unwrap();
        let out = sbx
            .commands()
            .run(
                "chmod +x /tmp/simd_state && \
                 (/tmp/simd_state switch 1500 & /tmp/simd_state switch 1500; wait) && \
                 /tmp/simd_state signal 200",
            )
            .await
            .unwrap();
        eprintln!("{}", out.stdout);
        if out.stdout.starts_with("skip:") {
            return; // a host CPU without AVX: nothing to check
        }
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert_eq!(out.stdout.matches("ok ").count(), 3, "{out:?}");
    });
}

#[test]
fn commands_run_as_another_user() {
    with_sandbox(|sbx| async move {
        let cmds = sbx.commands();
        let out = cmds
            .exec(
                Command::shell("id -un; id -u; echo $HOME $USER; touch /root/denied 2>&1; pwd")
                    .cwd("/tmp")
                    .user("user"),
            )
            .await
            .unwrap();
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines[..3], ["user", "1000", "/home/user user"], "{out:?}");
        assert!(lines[3].contains("Permission denied"), "{out:?}");
        assert_eq!(lines[4], "/tmp", "{out:?}");
        // Root stays the default, and an env of the request wins.
        let out = cmds
            .exec(Command::shell("id -u; echo $HOME").env("HOME", "/srv"))
            .await
            .unwrap();
        assert_eq!(out.stdout, "0\n/srv\n");
        // A user the guest does not have, or a program it cannot find.
        for cmd in [
            Command::shell("true").user("nobody-here"),
            Command::new(["no-such-program"]).user("user"),
        ] {
            assert!(
                matches!(
                    cmds.exec(cmd).await,
                    Err(Error::Agent(dormouse::agent::AgentError::Remote {
                        kind: dormouse::proto::ErrorKind::NotFound,
                        ..
                    }))
                ),
                "expected NotFound"
            );
        }
    });
}
