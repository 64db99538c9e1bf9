//! File operations end to end on the host, without a VM: the real agent
//! binary serves them on a Unix socket and `dormouse::agent::files` talks to
//! it. Every test works inside the agent's temporary directory.

#[path = "common/dev_agent.rs"]
mod dev_agent;

use std::path::Path;
use std::time::{Duration, Instant};

use dev_agent::Agent;

use dormouse::agent::{files, AgentError, ErrorKind, ExecRequest};
use dormouse::proto::{self, EntryKind, FileEvent, FileEventKind, FileRequest, Frame, FrameType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn path_in(agent: &Agent, rel: &str) -> String {
    agent.dir.path().join(rel).to_str().unwrap().to_owned()
}

#[track_caller]
fn assert_remote(result: Result<impl std::fmt::Debug, AgentError>, want: ErrorKind) {
    match result {
        Err(AgentError::Remote { kind, message }) => {
            assert_eq!(kind, want, "{message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected a remote {want:?} error, got {other:?}"),
    }
}

/// Deterministic, incompressible-looking bytes (xorshift64).
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// FNV-1a over the bytes.
fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[tokio::test]
async fn stat_list_make_dir_rename_remove() {
    let agent = Agent::start();
    let a = path_in(&agent, "a");
    let b = path_in(&agent, "a/b");

    let dir = files::make_dir(agent.connect().await, &b).await.unwrap();
    assert_eq!(
        (dir.kind, dir.name.as_str(), dir.path.as_str()),
        (EntryKind::Dir, "b", b.as_str())
    );
    assert_remote(
        files::make_dir(agent.connect().await, &b).await,
        ErrorKind::AlreadyExists,
    );

    let x = format!("{a}/x.txt");
    let written = files::write(agent.connect().await, &x, None, &mut &b"hello"[..])
        .await
        .unwrap();
    assert_eq!((written.size, written.mode), (5, 0o644));
    files::write(
        agent.connect().await,
        &format!("{b}/y.txt"),
        None,
        &mut &b"y"[..],
    )
    .await
    .unwrap();
    std::os::unix::fs::symlink("b", format!("{a}/link")).unwrap();
    assert_remote(
        files::make_dir(agent.connect().await, &x).await,
        ErrorKind::NotADirectory,
    );

    let st = files::stat(agent.connect().await, &x).await.unwrap();
    assert_eq!(
        (st.kind, st.name.as_str(), st.path.as_str()),
        (EntryKind::File, "x.txt", x.as_str())
    );
    assert_eq!((st.size, st.mode), (5, 0o644));
    assert!(!st.owner.is_empty() && !st.group.is_empty());
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
        - st.modified_ns;
    assert!((0..60_000_000_000).contains(&age), "modified {age} ns ago");
    let link = files::stat(agent.connect().await, &format!("{a}/link"))
        .await
        .unwrap();
    assert_eq!(
        (link.kind, link.symlink_target.as_deref()),
        (EntryKind::Symlink, Some("b"))
    );

    // Relative paths are resolved against the agent's working directory
    // (its temporary directory here); entries carry absolute paths.
    let sock = files::stat(agent.connect().await, "agent.sock")
        .await
        .unwrap();
    assert_eq!(
        (sock.kind, sock.path.as_str()),
        (EntryKind::Other, path_in(&agent, "agent.sock").as_str())
    );

    let one = files::list(agent.connect().await, &a, 1).await.unwrap();
    let names: Vec<&str> = one.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["b", "link", "x.txt"]);
    let two = files::list(agent.connect().await, &a, 2).await.unwrap();
    let paths: Vec<&str> = two.iter().map(|e| e.path.as_str()).collect();
    let y = format!("{b}/y.txt");
    let (l, xs) = (format!("{a}/link"), x.clone());
    assert_eq!(
        paths,
        [b.as_str(), y.as_str(), l.as_str(), xs.as_str()],
        "the symlink is not descended into"
    );
    assert_remote(
        files::list(agent.connect().await, &x, 1).await,
        ErrorKind::NotADirectory,
    );
    assert_remote(
        files::list(agent.connect().await, &format!("{a}/nope"), 1).await,
        ErrorKind::NotFound,
    );

    let z = format!("{a}/z.txt");
    let renamed = files::rename(agent.connect().await, &x, &z).await.unwrap();
    assert_eq!((renamed.name.as_str(), renamed.size), ("z.txt", 5));
    assert_remote(
        files::stat(agent.connect().await, &x).await,
        ErrorKind::NotFound,
    );
    assert_remote(
        files::rename(agent.connect().await, &x, &z).await,
        ErrorKind::NotFound,
    );

    files::remove(agent.connect().await, &format!("{a}/link"))
        .await
        .unwrap();
    assert!(
        Path::new(&y).exists(),
        "removing a symlink leaves its target"
    );
    files::remove(agent.connect().await, &a).await.unwrap();
    assert!(
        !Path::new(&a).exists(),
        "a directory is removed with its contents"
    );
    assert_remote(
        files::remove(agent.connect().await, &a).await,
        ErrorKind::NotFound,
    );
    agent.assert_alive();
}

#[tokio::test]
async fn read_errors_are_typed() {
    let agent = Agent::start();
    let missing = path_in(&agent, "missing.txt");
    assert_remote(
        files::read(agent.connect().await, &missing, &mut Vec::new()).await,
        ErrorKind::NotFound,
    );
    assert_remote(
        files::read_to_vec(agent.connect().await, &missing, 10).await,
        ErrorKind::NotFound,
    );
    let dir = agent.dir.path().to_str().unwrap();
    assert_remote(
        files::read(agent.connect().await, dir, &mut Vec::new()).await,
        ErrorKind::IsADirectory,
    );
    assert_remote(
        files::write(agent.connect().await, dir, None, &mut &b"x"[..]).await,
        ErrorKind::IsADirectory,
    );
    let f = path_in(&agent, "f");
    std::fs::write(&f, vec![1u8; 100]).unwrap();
    assert_remote(
        files::write(
            agent.connect().await,
            &format!("{f}/under-a-file"),
            None,
            &mut &b"x"[..],
        )
        .await,
        ErrorKind::NotADirectory,
    );
    let err = files::read_to_vec(agent.connect().await, &f, 99)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::FileTooLarge { limit: 99 }),
        "{err}"
    );
    assert_eq!(
        files::read_to_vec(agent.connect().await, &f, 100)
            .await
            .unwrap(),
        vec![1u8; 100]
    );
    agent.assert_alive();
}

#[tokio::test]
async fn a_large_file_round_trips() {
    let agent = Agent::start();
    let data = pseudo_random(24 << 20, 0x9e37_79b9_7f4a_7c15);
    let path = path_in(&agent, "big/nested/file.bin");

    let started = Instant::now();
    let entry = files::write(agent.connect().await, &path, Some(0o600), &mut &data[..])
        .await
        .unwrap();
    let wrote = started.elapsed();
    assert_eq!(
        (entry.kind, entry.size, entry.mode),
        (EntryKind::File, data.len() as u64, 0o600)
    );
    assert_eq!(entry.path, path);

    let started = Instant::now();
    let mut back = Vec::new();
    let entry = files::read(agent.connect().await, &path, &mut back)
        .await
        .unwrap();
    eprintln!("24 MiB: write {wrote:?}, read {:?}", started.elapsed());
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(back.len(), data.len());
    assert_eq!(checksum(&back), checksum(&data));
    assert!(back == data);

    // Replacing keeps the permissions; no temporary file is left behind.
    files::write(agent.connect().await, &path, None, &mut &b"short"[..])
        .await
        .unwrap();
    let st = files::stat(agent.connect().await, &path).await.unwrap();
    assert_eq!((st.size, st.mode), (5, 0o600));
    let dir = path_in(&agent, "big/nested");
    let listed = files::list(agent.connect().await, &dir, 1).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    // An empty write gives an empty file.
    let empty = files::write(agent.connect().await, &path, None, &mut &b""[..])
        .await
        .unwrap();
    assert_eq!(empty.size, 0);
    assert!(files::read_to_vec(agent.connect().await, &path, 0)
        .await
        .unwrap()
        .is_empty());
    agent.assert_alive();
}

#[tokio::test]
async fn write_creates_parent_directories() {
    let agent = Agent::start();
    let path = path_in(&agent, "p/q/r/file.txt");
    let entry = files::write(
        agent.connect().await,
        &path,
        Some(0o755),
        &mut &b"#!/bin/sh\n"[..],
    )
    .await
    .unwrap();
    assert_eq!((entry.name.as_str(), entry.mode), ("file.txt", 0o755));
    assert_eq!(std::fs::read(&path).unwrap(), b"#!/bin/sh\n");
    // A size that is not a multiple of the chunk size.
    let data = pseudo_random(300_001, 7);
    let odd = path_in(&agent, "p/odd.bin");
    files::write(agent.connect().await, &odd, None, &mut &data[..])
        .await
        .unwrap();
    let back = files::read_to_vec(agent.connect().await, &odd, data.len())
        .await
        .unwrap();
    assert_eq!(checksum(&back), checksum(&data));
    assert!(back == data);
    let dir = files::stat(agent.connect().await, &path_in(&agent, "p/q/r"))
        .await
        .unwrap();
    assert_eq!(dir.kind, EntryKind::Dir);
}

/// A host that goes away before `Done` leaves the old file and no
/// temporary file.
#[tokio::test]
async fn an_abandoned_write_changes_nothing() {
    let agent = Agent::start();
    let dir = agent.dir.path().join("w");
    std::fs::create_dir(&dir).unwrap();
    let target = dir.join("f");
    std::fs::write(&target, b"old").unwrap();

    let mut s = agent.connect().await;
    let mut bytes = proto::encode(&Frame::Hello(Default::default())).unwrap();
    bytes.extend(
        proto::encode(&Frame::FileRequest(FileRequest::Write {
            path: target.to_str().unwrap().into(),
            mode: None,
        }))
        .unwrap(),
    );
    bytes.extend(proto::encode(&Frame::Data(vec![b'n'; 1000])).unwrap());
    s.write_all(&bytes).await.unwrap();
    let count = || std::fs::read_dir(&dir).unwrap().count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the agent never started the write"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(s);
    while count() > 1 {
        assert!(
            Instant::now() < deadline,
            "the temporary file was not removed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"old");
    agent.assert_alive();
}

/// Waits for an event matching `want`, skipping others.
async fn wait_for(
    watcher: &mut files::Watcher<UnixStream>,
    what: &str,
    want: impl Fn(&FileEvent) -> bool,
) -> FileEvent {
    let deadline = Duration::from_secs(10);
    let found = tokio::time::timeout(deadline, async {
        while let Some(event) = watcher.next().await {
            let event = event.expect("a valid event");
            if want(&event) {
                return event;
            }
            eprintln!("(skipping {event:?})");
        }
        panic!("the watch ended while waiting for {what}");
    })
    .await;
    found.unwrap_or_else(|_| panic!("no {what} within {deadline:?}"))
}

#[tokio::test]
async fn watch_reports_changes_recursively() {
    let agent = Agent::start();
    let root = path_in(&agent, "watched");
    std::fs::create_dir(&root).unwrap();
    assert_remote(
        files::watch(agent.connect().await, &path_in(&agent, "nope"), true).await,
        ErrorKind::NotFound,
    );
    assert_remote(
        files::watch(agent.connect().await, &path_in(&agent, "agent.sock"), true).await,
        ErrorKind::NotADirectory,
    );

    let mut watcher = files::watch(agent.connect().await, &root, true)
        .await
        .unwrap();
    let sh = |cmd: String| ExecRequest::new(["sh".to_string(), "-c".to_string(), cmd]);

    let out = agent
        .run(sh(format!("touch {root}/new.txt")))
        .await
        .unwrap();
    assert!(out.success());
    let new = format!("{root}/new.txt");
    wait_for(&mut watcher, "the touched file", |e| {
        e.kind == FileEventKind::Create && e.path == new
    })
    .await;

    // A directory created later is watched too (the file may be reported
    // from the directory scan or from its own watch).
    let out = agent
        .run(sh(format!("mkdir {root}/sub && echo hi > {root}/sub/f")))
        .await
        .unwrap();
    assert!(out.success());
    let f = format!("{root}/sub/f");
    wait_for(&mut watcher, "the file in the new directory", |e| {
        e.path == f
    })
    .await;
    agent
        .run(sh(format!("echo more >> {root}/sub/f")))
        .await
        .unwrap();
    wait_for(&mut watcher, "the append", |e| {
        e.kind == FileEventKind::Write && e.path == f
    })
    .await;

    // A write through the API renames its temporary file into place.
    let g = format!("{root}/sub/g");
    files::write(agent.connect().await, &g, None, &mut &b"g"[..])
        .await
        .unwrap();
    wait_for(&mut watcher, "the written file", |e| {
        matches!(e.kind, FileEventKind::Rename | FileEventKind::Create) && e.path == g
    })
    .await;
    files::remove(agent.connect().await, &g).await.unwrap();
    wait_for(&mut watcher, "the removal", |e| {
        e.kind == FileEventKind::Remove && e.path == g
    })
    .await;

    agent.run(sh(format!("chmod 600 {new}"))).await.unwrap();
    wait_for(&mut watcher, "the chmod", |e| {
        e.kind == FileEventKind::Chmod && e.path == new
    })
    .await;
    agent
        .run(sh(format!("mv {new} {root}/sub/moved.txt")))
        .await
        .unwrap();
    let moved = format!("{root}/sub/moved.txt");
    wait_for(&mut watcher, "the rename", |e| {
        e.kind == FileEventKind::Rename && e.path == moved
    })
    .await;

    // Removing the watched directory ends the watch.
    files::remove(agent.connect().await, &root).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = watcher.next().await {
            event.unwrap();
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the watch did not end when its directory went"
    );
    agent.assert_alive();
}

/// Sends `payload` as a raw `FileRequest` frame after a `Hello` and returns
/// what the agent answered after its `HelloAck`.
async fn raw_file_request(agent: &Agent, payload: &[u8]) -> Frame {
    let mut s = agent.connect().await;
    let mut bytes = proto::encode(&Frame::Hello(Default::default())).unwrap();
    bytes.extend(proto::encode_header(FrameType::FileRequest, payload.len()).unwrap());
    bytes.extend_from_slice(payload);
    s.write_all(&bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .expect("the agent answers and closes")
        .unwrap();
    let mut dec = proto::Decoder::new();
    dec.feed(&answer);
    assert!(matches!(
        dec.next_frame().unwrap(),
        Some(Frame::HelloAck(_))
    ));
    dec.next_frame()
        .unwrap()
        .expect("an answer after the HelloAck")
}

#[tokio::test]
async fn hostile_requests_are_refused() {
    let agent = Agent::start();
    // The client refuses to send them...
    let err = files::stat(agent.connect().await, "/etc/\0passwd")
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
    let err = files::list(agent.connect().await, "/", 65)
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
    let err = files::write(agent.connect().await, "", None, &mut &b""[..])
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
    // ...and the agent's decoder rejects them when sent anyway.
    for payload in [
        &br#"{"op":"read","path":"/etc/\u0000passwd"}"#[..],
        br#"{"op":"list","path":"/","depth":0}"#,
        br#"{"op":"write","path":"/tmp/x","mode":65535}"#,
        br#"{"op":"rename","from":"","to":"/x"}"#,
        br#"{"op":"format_disk","path":"/"}"#,
    ] {
        match raw_file_request(&agent, payload).await {
            Frame::Error(e) => assert_eq!(e.kind, ErrorKind::Protocol, "{}", e.message),
            other => panic!("expected a Protocol error, got {other:?}"),
        }
    }
    let payload = br#"{"op":"stat","path":"/a\u0000b"}"#;
    let mut frame = proto::encode_header(FrameType::FileRequest, payload.len())
        .unwrap()
        .to_vec();
    frame.extend_from_slice(payload);
    let nul = proto::decode(&frame);
    assert!(
        matches!(nul, Err(proto::ProtoError::InvalidPayload { .. })),
        "{nul:?}"
    );
    agent.assert_alive();
}

/// Where no new file can be created next to the target (here `/proc`), an
/// existing file is written in place.
#[tokio::test]
async fn a_file_in_a_directory_without_new_files_is_written_in_place() {
    let agent = Agent::start();
    // The agent's own main-thread name.
    let comm = format!("/proc/{}/comm", agent.child.id());
    let entry = files::write(
        agent.connect().await,
        &comm,
        None,
        &mut &b"renamed-agent"[..],
    )
    .await
    .unwrap();
    assert_eq!(entry.path, comm);
    let name = files::read_to_vec(agent.connect().await, &comm, 4096)
        .await
        .unwrap();
    assert_eq!(name, b"renamed-agent\n");
    agent.assert_alive();
}
