//! The guest agent end to end on the host, without a VM: the real agent
//! binary serves its protocol on a Unix socket (`--listen-unix`) and the
//! async client in `dormouse::agent` talks to it.
//!
//! The agent binary is built on first use (see `common/dev_agent.rs`).

#[path = "common/dev_agent.rs"]
mod dev_agent;

use std::path::Path;
use std::time::{Duration, Instant};

use dev_agent::Agent;

use dormouse::agent::{
    exec_streaming, hello, ping, AgentError, ErrorKind, ExecRequest, OutputChunk,
};
use dormouse::proto::{self, Frame, FrameType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", cmd])
}

#[tokio::test]
async fn handshake_and_ping() {
    let agent = Agent::start();
    let info = hello(agent.connect().await).await.unwrap();
    assert_eq!(info.protocol_version, proto::PROTOCOL_VERSION);
    assert!(info.has_capability(proto::capability::EXEC));
    assert!(!info.init, "a --listen-unix agent is not PID 1");
    let info = ping(agent.connect().await).await.unwrap();
    assert_eq!(info.agent_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn echo_hello() {
    let agent = Agent::start();
    let out = agent
        .run(ExecRequest::new(["echo", "hello"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.stderr, b"");
    assert_eq!((out.exit_code, out.signal), (Some(0), None));
    assert!(out.success());
}

#[tokio::test]
async fn stdout_and_stderr_are_kept_apart() {
    let agent = Agent::start();
    let out = agent
        .run(sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out1\nout2\n");
    assert_eq!(out.stderr, b"err1\nerr2\n");
}

#[tokio::test]
async fn exit_codes_and_signals() {
    let agent = Agent::start();
    let out = agent.run(sh("echo bye; exit 7")).await.unwrap();
    assert_eq!((out.exit_code, out.signal), (Some(7), None));
    assert_eq!(out.stdout, b"bye\n");
    let out = agent.run(sh("kill -9 $$")).await.unwrap();
    assert_eq!((out.exit_code, out.signal), (None, Some(9)));
    assert!(!out.success());
}

#[tokio::test]
async fn env_and_cwd_are_honoured() {
    let agent = Agent::start();
    let work = agent.dir.path().join("work dir");
    std::fs::create_dir(&work).unwrap();
    let out = agent
        .run(
            sh("printf '%s|%s|' \"$FOO\" \"$EMPTY\"; pwd")
                .env("FOO", "bar baz")
                .env("EMPTY", "")
                .cwd(work.to_str().unwrap()),
        )
        .await
        .unwrap();
    let expected = format!("bar baz||{}\n", work.display());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    // The request's PATH is the one argv[0] is looked up in.
    let bin = agent.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let tool = bin.join("my-tool");
    std::fs::write(&tool, "#!/bin/sh\necho tool \"$@\"\n").unwrap();
    let mut perms = std::fs::metadata(&tool).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&tool, perms).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let out = agent
        .run(ExecRequest::new(["my-tool", "x"]).env("PATH", path))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"tool x\n");
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn large_output_is_intact() {
    let agent = Agent::start();
    let data = pattern(3 << 20, 1);
    let file = agent.dir.path().join("big.bin");
    std::fs::write(&file, &data).unwrap();
    let path = file.to_str().unwrap();
    let out = agent.run(ExecRequest::new(["cat", path])).await.unwrap();
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "3 MiB of stdout differ");
    // Both streams at once, each in order.
    let out = agent
        .run(sh(&format!("cat '{path}' & cat '{path}' >&2; wait")))
        .await
        .unwrap();
    assert!(out.stdout == data && out.stderr == data);
    // The collecting client refuses more than its limit.
    let err = agent
        .run(ExecRequest::new(["cat", path]).max_output(1 << 20))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::OutputTooLarge { limit } if limit == 1 << 20));
}

#[tokio::test]
async fn streaming_delivers_chunks_in_order() {
    let agent = Agent::start();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let run = tokio::spawn({
        let stream = agent.connect().await;
        async move { exec_streaming(stream, sh("seq 1 20000; echo done >&2"), tx).await }
    });
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(chunk) = rx.recv().await {
        match chunk {
            OutputChunk::Stdout(d) => stdout.extend(d),
            OutputChunk::Stderr(d) => stderr.extend(d),
        }
    }
    let status = run.await.unwrap().unwrap();
    assert!(status.success());
    let expected: String = (1..=20000).map(|i| format!("{i}\n")).collect();
    assert!(stdout == expected.as_bytes());
    assert_eq!(stderr, b"done\n");
}

#[tokio::test]
async fn stdin_is_fed() {
    let agent = Agent::start();
    let out = agent
        .run(ExecRequest::new(["cat"]).stdin(b"line one\nline two\n".to_vec()))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"line one\nline two\n");
    // Large stdin streamed in while large output streams out.
    let data = pattern(5 << 20, 2);
    let out = agent
        .run(ExecRequest::new(["cat"]).stdin(data.clone()))
        .await
        .unwrap();
    assert!(out.stdout == data, "5 MiB through cat differ");
    // A command that ignores its stdin neither hangs nor fails.
    let out = agent
        .run(ExecRequest::new(["true"]).stdin(data))
        .await
        .unwrap();
    assert!(out.success());
    // Without stdin, the command reads /dev/null.
    let out = agent.run(ExecRequest::new(["wc", "-c"])).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
}

#[tokio::test]
async fn refusals_are_remote_errors() {
    let agent = Agent::start();
    let err = agent
        .run(ExecRequest::new(["definitely-not-a-command-4711"]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::Remote { kind: ErrorKind::NotFound, message }
            if message.contains("definitely-not-a-command-4711")),
        "{err}"
    );
    let err = agent
        .run(ExecRequest::new(["/no/such/program"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Remote {
                kind: ErrorKind::NotFound,
                ..
            }
        ),
        "{err}"
    );
    let err = agent
        .run(ExecRequest::new(["true"]).cwd("/no/such/dir"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Remote {
                kind: ErrorKind::CwdNotFound,
                ..
            }
        ),
        "{err}"
    );
    let not_exec = agent.dir.path().join("plain.txt");
    std::fs::write(&not_exec, "data").unwrap();
    let err = agent
        .run(ExecRequest::new([not_exec.to_str().unwrap()]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Remote {
                kind: ErrorKind::PermissionDenied,
                ..
            }
        ),
        "{err}"
    );
}

/// Sends raw bytes, closes the sending side and returns everything the
/// agent answers until it closes.
async fn raw_exchange(agent: &Agent, bytes: &[u8]) -> Vec<Frame> {
    let mut stream = agent.connect().await;
    stream.write_all(bytes).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
        .await
        .expect("the agent neither answered nor closed")
        .unwrap_or_default();
    let mut dec = proto::Decoder::new();
    dec.feed(&answer);
    let mut frames = Vec::new();
    while let Some(f) = dec.next_frame().expect("the agent's answer is well-formed") {
        frames.push(f);
    }
    frames
}

fn is_protocol_error(frames: &[Frame]) -> bool {
    matches!(
        frames.last(),
        Some(Frame::Error(e)) if e.kind == ErrorKind::Protocol
    )
}

#[tokio::test]
async fn malformed_frames_are_rejected_and_the_agent_keeps_serving() {
    let agent = Agent::start();
    let hello = proto::encode(&Frame::Hello(proto::Hello::default())).unwrap();

    // Not the protocol at all.
    let frames = raw_exchange(&agent, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(is_protocol_error(&frames), "{frames:?}");

    // A header announcing a 4 GiB payload.
    let mut huge = proto::MAGIC.to_vec();
    huge.extend_from_slice(&proto::PROTOCOL_VERSION.to_le_bytes());
    huge.extend_from_slice(&FrameType::Hello.to_u16().to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(is_protocol_error(&raw_exchange(&agent, &huge).await));

    // A future protocol version.
    let mut future = hello.clone();
    future[4] = 0xee;
    assert!(is_protocol_error(&raw_exchange(&agent, &future).await));

    // Invalid JSON in an Exec after a good handshake.
    let mut bad_exec = hello.clone();
    bad_exec.extend_from_slice(&proto::encode_header(FrameType::Exec, 5).unwrap());
    bad_exec.extend_from_slice(b"{oops");
    let frames = raw_exchange(&agent, &bad_exec).await;
    assert!(matches!(frames[0], Frame::HelloAck(_)), "{frames:?}");
    assert!(is_protocol_error(&frames), "{frames:?}");

    // A request before the handshake, and stdin for a command without one.
    let exec = proto::encode(&Frame::Exec(proto::Exec {
        argv: vec!["cat".into()],
        ..Default::default()
    }))
    .unwrap();
    assert!(is_protocol_error(&raw_exchange(&agent, &exec).await));
    let mut stray = hello.clone();
    stray.extend_from_slice(&exec);
    stray.extend_from_slice(&proto::encode(&Frame::Stdin(b"x".to_vec())).unwrap());
    assert!(is_protocol_error(&raw_exchange(&agent, &stray).await));

    // A connection that closes at once, or inside a frame.
    drop(agent.connect().await);
    let _ = raw_exchange(&agent, &hello[..5]).await;

    // Still serving.
    let out = agent
        .run(ExecRequest::new(["echo", "alive"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"alive\n");
}

#[tokio::test]
async fn disconnecting_kills_the_command() {
    let agent = Agent::start();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let stream = agent.connect().await;
    let run = tokio::spawn(exec_streaming(
        stream,
        sh("echo $$; sleep 1000 & sleep 1000; echo never"),
        tx,
    ));
    let Some(OutputChunk::Stdout(first)) = rx.recv().await else {
        panic!("no pid printed")
    };
    let pid: u32 = String::from_utf8_lossy(&first).trim().parse().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    run.abort();
    let _ = run.await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "command {pid} still runs after the host went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.assert_alive();
}

#[tokio::test]
async fn background_processes_do_not_hold_the_answer() {
    let agent = Agent::start();
    let started = Instant::now();
    let out = agent.run(sh("sleep 30 & echo started")).await.unwrap();
    assert_eq!(out.stdout, b"started\n");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exec waited for a background process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_commands_get_their_own_status() {
    let agent = std::sync::Arc::new(Agent::start());
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..16 {
        let agent = agent.clone();
        runs.spawn(async move {
            let out = agent.run(sh(&format!("echo {i}; exit {i}"))).await.unwrap();
            assert_eq!(out.stdout, format!("{i}\n").as_bytes());
            assert_eq!(out.exit_code, Some(i));
        });
    }
    while let Some(done) = runs.join_next().await {
        done.unwrap();
    }
}

/// Reads a process stream until `want` appeared on stdout (or it ends).
async fn read_until(
    ps: &mut dormouse::agent::process::ProcessStream<tokio::net::UnixStream>,
    want: &str,
) -> String {
    use dormouse::agent::process::ProcessEvent;
    let mut out = String::new();
    while !out.contains(want) {
        match tokio::time::timeout(Duration::from_secs(10), ps.next())
            .await
            .expect("output within 10 s")
            .unwrap()
        {
            ProcessEvent::Output(OutputChunk::Stdout(d)) => {
                out.push_str(&String::from_utf8_lossy(&d))
            }
            ProcessEvent::Output(OutputChunk::Stderr(_)) => {}
            ProcessEvent::Exit(s) => panic!("ended early with {s:?}; output {out:?}"),
        }
    }
    out
}

#[tokio::test]
async fn background_command_lives_on_and_can_be_fed_listed_reattached_and_signalled() {
    use dormouse::agent::process::{self, ProcessEvent};
    let agent = Agent::start();
    let req = sh("echo start; read line; echo got $line; read again; echo then $again; sleep 30")
        .background(true)
        .keep_stdin_open(true)
        .tag("svc");
    let mut ps = process::start(agent.connect().await, req).await.unwrap();
    let pid = ps.pid();
    assert!(pid > 0);
    read_until(&mut ps, "start\n").await;
    // Stdin on the starting stream, then detach: it keeps running.
    ps.write_stdin(b"one\n").await.unwrap();
    read_until(&mut ps, "got one\n").await;
    drop(ps);
    let list = process::list(agent.connect().await).await.unwrap();
    let info = list
        .iter()
        .find(|p| p.pid == pid)
        .expect("listed after detach");
    assert_eq!(info.tag.as_deref(), Some("svc"));
    assert!(info.stdin_open);
    // Re-attach, feed stdin through a separate request, see the output.
    let mut again = process::connect(agent.connect().await, pid).await.unwrap();
    process::send_stdin(agent.connect().await, pid, b"two\n", true)
        .await
        .unwrap();
    read_until(&mut again, "then two\n").await;
    // Stdin was closed: more is refused.
    let err = process::send_stdin(agent.connect().await, pid, b"x", false)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Remote {
                kind: ErrorKind::InvalidRequest,
                ..
            }
        ),
        "{err:?}"
    );
    process::signal(agent.connect().await, pid, 15)
        .await
        .unwrap();
    loop {
        match again.next().await.unwrap() {
            ProcessEvent::Exit(status) => {
                assert_eq!(status.signal, Some(15));
                break;
            }
            ProcessEvent::Output(_) => {}
        }
    }
    let list = process::list(agent.connect().await).await.unwrap();
    assert!(list.iter().all(|p| p.pid != pid));
    let err = process::signal(agent.connect().await, pid, 9)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        AgentError::Remote {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    // Attaching to an ended command fails at once.
    let err = process::connect(agent.connect().await, pid)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        AgentError::Remote {
            kind: ErrorKind::NotFound,
            ..
        }
    ));
    agent.assert_alive();
}

#[tokio::test]
async fn foreground_command_dies_with_its_stream() {
    use dormouse::agent::process;
    let agent = Agent::start();
    let ps = process::start(agent.connect().await, sh("sleep 30"))
        .await
        .unwrap();
    let pid = ps.pid();
    drop(ps);
    let start = Instant::now();
    while process::list(agent.connect().await)
        .await
        .unwrap()
        .iter()
        .any(|p| p.pid == pid)
    {
        assert!(start.elapsed() < Duration::from_secs(10), "still running");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn timeout_kills_the_command_and_says_so() {
    let agent = Agent::start();
    let start = Instant::now();
    let out = agent
        .run(sh("echo before; sleep 30").timeout(Duration::from_millis(300)))
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(out.stdout, b"before\n");
    assert_eq!(out.signal, Some(9));
    assert!(out.timed_out);
    let out = agent
        .run(sh("true").timeout(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(!out.timed_out && out.success());
}

#[tokio::test]
async fn fifty_concurrent_commands_each_get_their_own_output() {
    let agent = Agent::start();
    let runs = (0..50).map(|i| {
        let agent = &agent;
        async move {
            let out = agent
                .run(sh(&format!("echo out{i}; echo err{i} >&2; exit {}", i % 7)))
                .await
                .unwrap();
            assert_eq!(out.stdout, format!("out{i}\n").into_bytes());
            assert_eq!(out.stderr, format!("err{i}\n").into_bytes());
            assert_eq!(out.exit_code, Some(i % 7));
        }
    });
    futures_join_all(runs).await;
}

/// Runs futures concurrently on this task (no extra crate).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut pending: Vec<_> = set.iter_mut().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut left = false;
        for slot in pending.iter_mut() {
            if let Some(f) = slot {
                if f.as_mut().poll(cx).is_ready() {
                    *slot = None;
                } else {
                    left = true;
                }
            }
        }
        if left {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
}

#[tokio::test]
async fn forward_splices_a_tcp_connection_and_refuses_closed_ports() {
    use dormouse::agent::ports;
    let agent = Agent::start();
    // A TCP echo server standing in for a guest server (the dev agent runs
    // on this host, so "the guest's loopback" is ours).
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = server.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let (mut stream, early) = ports::forward(agent.connect().await, port).await.unwrap();
    assert!(early.is_empty());
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = stream.split();
    let send = async {
        wr.write_all(&payload).await.unwrap();
        wr.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = rd.read_to_end(&mut back);
    let ((), got) = tokio::join!(send, recv);
    got.unwrap();
    assert_eq!(back, payload);

    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = ports::forward(agent.connect().await, closed)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Remote {
                kind: ErrorKind::ConnectionRefused,
                ..
            }
        ),
        "{err:?}"
    );
    // Sync is accepted (and ignored by a development agent).
    dormouse::agent::sync(agent.connect().await, vec![1; 32])
        .await
        .unwrap();
    agent.assert_alive();
}
