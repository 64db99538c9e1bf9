//! The runtime's lifecycle: sandboxes created from the template's snapshot,
//! named snapshots, fork, list/info with filters and pagination.

mod common;

use std::time::{Duration, Instant};

use common::{runtime, TEMPLATE};
use dormouse::{Error, ListQuery, Running, Sandbox, SandboxConfig, SandboxState};

/// Every guest call of these tests is bounded: a dead guest fails the test.
const LIMIT: Duration = Duration::from_secs(300);

async fn code(sbx: &Sandbox<Running>, src: &str) -> String {
    let out = tokio::time::timeout(LIMIT, sbx.run_code(src))
        .await
        .expect("run_code within the limit")
        .expect("run_code");
    assert!(out.error.is_none(), "{src}: {out:?}");
    out.stdout
}

async fn sh(sbx: &Sandbox<Running>, cmd: &str) -> String {
    let out = tokio::time::timeout(LIMIT, sbx.commands().run(cmd))
        .await
        .expect("command within the limit")
        .expect("command");
    assert_eq!(out.exit_code, 0, "{cmd}: {out:?}");
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_forks_start_independent_copies() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    // The first create boots the template once and snapshots it; the
    // second starts from that snapshot.
    let t = Instant::now();
    let mut parent = rt
        .create(
            TEMPLATE,
            SandboxConfig::default().metadata("role", "parent"),
        )
        .await
        .expect("create");
    eprintln!("first create (boots the template): {:.2?}", t.elapsed());
    let t = Instant::now();
    let other = rt
        .create(TEMPLATE, SandboxConfig::default())
        .await
        .expect("create");
    eprintln!(
        "second create (from the snapshot): {:.2?}: {:?}",
        t.elapsed(),
        other.start_timings()
    );
    let parts = other
        .start_timings()
        .expect("a created sandbox has timings");
    assert!(parts.prepare + parts.restore + parts.agent <= t.elapsed());
    assert_eq!(sh(&other, "echo ready").await, "ready\n");
    assert_eq!(
        std::fs::read_dir(state.path().join("template-snapshots"))
            .unwrap()
            .filter(|e| !e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.'))
            .count(),
        1,
        "one template snapshot"
    );
    other.kill().await.unwrap();

    code(&parent, "x = 42").await;
    sh(&parent, "echo parent > /root/file && sync").await;

    // Fork into 4: each sees the parent's variable and file, then diverges.
    let t = Instant::now();
    let children = parent.fork(4).await.expect("fork");
    eprintln!("fork into 4: {:.2?}", t.elapsed());
    assert_eq!(children.len(), 4);
    for (i, child) in children.iter().enumerate() {
        assert_ne!(child.id(), parent.id());
        assert_eq!(
            child.metadata().get("role").map(String::as_str),
            Some("parent")
        );
        assert_eq!(code(child, "print(x)").await, "42\n");
        assert_eq!(sh(child, "cat /root/file").await, "parent\n");
        code(child, &format!("x = {i}")).await;
        sh(child, &format!("echo child{i} > /root/file && sync")).await;
    }
    for (i, child) in children.iter().enumerate() {
        assert_eq!(code(child, "print(x)").await, format!("{i}\n"));
        assert_eq!(sh(child, "cat /root/file").await, format!("child{i}\n"));
    }
    assert_eq!(
        code(&parent, "print(x)").await,
        "42\n",
        "the parent runs on"
    );
    assert_eq!(sh(&parent, "cat /root/file").await, "parent\n");
    assert!(
        std::fs::read_dir(state.path().join("snapshots"))
            .unwrap()
            .next()
            .is_none(),
        "fork keeps no snapshot"
    );

    // A named snapshot: listed, started twice, deleted while its sandboxes
    // run (they keep working, pause and resume).
    code(&parent, "x = 7").await;
    // `connect` while the snapshot is at work waits for it, then shares the
    // sandbox (not `Busy`).
    let parent_id = parent.id().to_string();
    let snapshot_done = std::sync::atomic::AtomicBool::new(false);
    let (info, other) = tokio::join!(
        async {
            let info = parent.snapshot("seven").await;
            snapshot_done.store(true, std::sync::atomic::Ordering::SeqCst);
            info
        },
        async {
            let deadline = Instant::now() + LIMIT;
            while !snapshot_done.load(std::sync::atomic::Ordering::SeqCst)
                && Instant::now() < deadline
            {
                let state = rt.info(&parent_id).await.map(|i| i.state);
                if matches!(state, Ok(SandboxState::Snapshotting)) {
                    eprintln!("connecting during the snapshot");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            rt.connect(&parent_id).await
        }
    );
    let info = info.expect("snapshot");
    let other = other.expect("connect during a snapshot");
    assert_eq!(code(&other, "print(x)").await, "7\n");
    drop(other);
    assert_eq!(info.name, "seven");
    assert!(matches!(
        parent.snapshot("seven").await,
        Err(Error::SnapshotExists { .. })
    ));
    assert!(matches!(
        parent.snapshot("../evil").await,
        Err(Error::InvalidConfig(_))
    ));
    code(&parent, "x = 8").await;
    let names: Vec<String> = rt
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["seven"]);
    let copies = rt
        .create_from_snapshot("seven", 2)
        .await
        .expect("create_from_snapshot");
    rt.delete_snapshot("seven").await.expect("delete_snapshot");
    assert!(rt.list_snapshots().await.unwrap().is_empty());
    assert!(matches!(
        rt.create_from_snapshot("seven", 1).await,
        Err(Error::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        rt.delete_snapshot("seven").await,
        Err(Error::SnapshotNotFound { .. })
    ));
    for copy in copies {
        assert_eq!(code(&copy, "print(x)").await, "7\n");
        code(&copy, "x += 1000").await;
        let paused = copy
            .pause()
            .await
            .expect("pause a copy of a deleted snapshot");
        let copy = paused.resume().await.expect("resume it");
        assert_eq!(code(&copy, "print(x)").await, "1007\n");
        copy.kill().await.unwrap();
    }
    assert_eq!(code(&parent, "print(x)").await, "8\n");

    // The parent's own pause/resume still works after snapshots.
    let parent = parent
        .pause()
        .await
        .expect("pause")
        .resume()
        .await
        .expect("resume");
    assert_eq!(code(&parent, "print(x)").await, "8\n");
    for child in children {
        child.kill().await.unwrap();
    }
    parent.kill().await.unwrap();
    assert_eq!(
        std::fs::read_dir(state.path().join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "killed sandboxes leave nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_paginates_across_runtimes() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    // 25 sandboxes: 15 paused (handles dropped, as by an exiting process),
    // 10 running.
    let mut running = Vec::new();
    let mut paused_ids = Vec::new();
    for i in 0..25 {
        let config = SandboxConfig::default()
            .metadata("group", format!("g{}", i % 3))
            .metadata("n", i.to_string());
        let sbx = tokio::time::timeout(LIMIT, rt.create(TEMPLATE, config))
            .await
            .expect("create within the limit")
            .expect("create");
        if i % 5 < 3 {
            paused_ids.push(sbx.id().to_string());
            drop(sbx.pause().await.expect("pause"));
        } else {
            running.push(sbx);
        }
    }
    assert_eq!(paused_ids.len(), 15);

    async fn all(rt: &dormouse::Runtime, query: ListQuery) -> Vec<dormouse::SandboxInfo> {
        let mut query = query.limit(4);
        let mut out = Vec::new();
        loop {
            let page = rt.list(query.clone()).await.expect("list");
            assert!(page.sandboxes.len() <= 4);
            out.extend(page.sandboxes);
            match page.next_token {
                Some(token) => query = query.next_token(token),
                None => return out,
            }
        }
    }
    let everything = all(&rt, ListQuery::default()).await;
    assert_eq!(everything.len(), 25);
    assert!(everything
        .windows(2)
        .all(|w| (w[0].started_at_ms, &w[0].id) < (w[1].started_at_ms, &w[1].id)));
    let paused = all(&rt, ListQuery::default().state([SandboxState::Paused])).await;
    let mut ids: Vec<String> = paused.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    let mut want = paused_ids.clone();
    want.sort();
    assert_eq!(ids, want);
    assert!(paused.iter().all(|s| s.paused_at_ms.is_some()));
    let live = all(&rt, ListQuery::default().state([SandboxState::Running])).await;
    assert_eq!(live.len(), 10);
    let g1 = all(&rt, ListQuery::default().metadata("group", "g1")).await;
    assert_eq!(g1.len(), 8); // 1, 4, ..., 22
    let g1_paused = all(
        &rt,
        ListQuery::default()
            .metadata("group", "g1")
            .state([SandboxState::Paused]),
    )
    .await;
    assert!(g1_paused
        .iter()
        .all(|s| s.metadata["group"] == "g1" && s.state == SandboxState::Paused));
    assert_eq!(
        g1_paused.len(),
        (0..25).filter(|i| i % 3 == 1 && i % 5 < 3).count()
    );
    assert!(matches!(
        rt.list(ListQuery::default().next_token("not a token"))
            .await,
        Err(Error::InvalidConfig(_))
    ));

    // info by id, in each state; unknown ids are NotFound.
    let info = rt.info(&paused_ids[0]).await.unwrap();
    assert_eq!(info.state, SandboxState::Paused);
    assert_eq!(info.template, TEMPLATE);
    assert!(info.memory_mib > 0 && info.disk_mib > 0);
    let info = rt.info(running[0].id().as_str()).await.unwrap();
    assert_eq!(info.state, SandboxState::Running);
    assert_eq!(info, running[0].info());
    for bad in ["00000000000000000000", "nope", "../../etc"] {
        assert!(
            matches!(rt.info(bad).await, Err(Error::NotFound { .. })),
            "{bad}"
        );
    }

    // Another runtime on the same directory (as a new process would) sees
    // the paused ones and resumes one by id.
    drop(running.pop());
    let rt2 = dormouse::Runtime::open(state.path()).await.unwrap();
    let paused2 = all(&rt2, ListQuery::default().state([SandboxState::Paused])).await;
    assert_eq!(paused2.len(), 15);
    let sbx = rt2.connect(&paused_ids[3]).await.expect("connect");
    assert_eq!(sh(&sbx, "echo back").await, "back\n");
    assert_eq!(
        rt.info(&paused_ids[3]).await.unwrap().state,
        SandboxState::Running
    );
    assert_eq!(sbx.metadata()["n"], "5");

    // Kill: running through the handle, paused by id; then nothing is left.
    sbx.kill().await.unwrap();
    for s in running {
        s.kill().await.unwrap();
    }
    for id in paused_ids.iter().filter(|id| **id != paused_ids[3]) {
        rt.kill(id).await.unwrap();
    }
    assert!(matches!(
        rt.kill(&paused_ids[0]).await,
        Err(Error::NotFound { .. })
    ));
    assert!(rt
        .list(ListQuery::default())
        .await
        .unwrap()
        .sandboxes
        .is_empty());
}

/// Polls `rt.info(id)` until `done` says so (at most 150 s).
async fn wait_for(
    rt: &dormouse::Runtime,
    id: &str,
    what: &str,
    done: impl Fn(&dormouse::Result<dormouse::SandboxInfo>) -> bool,
) {
    let start = Instant::now();
    loop {
        let info = rt.info(id).await;
        if done(&info) {
            eprintln!("{id}: {what} after {:.1?}", start.elapsed());
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "{id}: never {what}: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_paused(info: &dormouse::Result<dormouse::SandboxInfo>) -> bool {
    matches!(info, Ok(i) if i.state == SandboxState::Paused)
}

/// A call on a handle whose sandbox was taken fails at once, never hangs.
async fn spent<T: std::fmt::Debug>(
    call: impl std::future::Future<Output = dormouse::Result<T>>,
) -> Error {
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("a spent handle answers at once")
        .expect_err("a spent handle cannot act")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_kill_or_auto_pause_and_resume_resets_them() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    let short = Duration::from_secs(3);
    // Long enough for the work below on a PVM host (guest kernel emulated).
    let work = Duration::from_secs(60);
    let doomed = rt
        .create(TEMPLATE, SandboxConfig::default().timeout(short))
        .await
        .expect("create");
    let sleeper = rt
        .create(
            TEMPLATE,
            SandboxConfig::default().timeout(work).auto_pause(true),
        )
        .await
        .expect("create");
    let (doomed_id, id) = (doomed.id().to_string(), sleeper.id().to_string());
    assert!(sleeper.info().auto_pause);
    let end = sleeper
        .info()
        .end_at_ms
        .expect("a running sandbox has an end");
    assert!(end > sleeper.info().started_at_ms);
    // Keep the auto-pausing one busy in memory and on disk.
    code(&sleeper, "x = 42").await;
    sh(&sleeper, "echo kept > /root/kept && sync").await;

    wait_for(&rt, &doomed_id, "killed at its timeout", |i| {
        matches!(i, Err(Error::NotFound { .. }))
    })
    .await;
    wait_for(&rt, &id, "paused at its timeout", is_paused).await;
    assert!(!state.path().join("sandboxes").join(&doomed_id).exists());
    // The handles are spent: typed errors at once.
    let e = spent(doomed.commands().run("true")).await;
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let e = spent(sleeper.run_code("print(x)")).await;
    assert!(matches!(e, Error::SandboxPaused { .. }), "{e}");
    assert!(e.to_string().contains("Runtime::connect"), "{e}");
    let e = spent(sleeper.files().read("/root/kept")).await;
    assert!(matches!(e, Error::SandboxPaused { .. }), "{e}");
    assert!(matches!(
        sleeper.set_timeout(short),
        Err(Error::SandboxPaused { .. })
    ));
    assert!(matches!(
        rt.pause(&id).await,
        Err(Error::AlreadyPaused { .. })
    ));
    assert!(matches!(
        rt.set_timeout(&id, short).await,
        Err(Error::SandboxPaused { .. })
    ));
    drop((doomed, sleeper)); // spent handles delete nothing

    // Connect resumes it with its state; the timeout starts again and
    // auto-pause holds after the resume.
    let sbx = rt.connect(&id).await.expect("connect");
    assert_eq!(code(&sbx, "print(x)").await, "42\n");
    assert_eq!(sh(&sbx, "cat /root/kept").await, "kept\n");
    let info = sbx.info();
    assert_eq!(info.state, SandboxState::Running);
    assert!(
        info.end_at_ms.unwrap() <= info.started_at_ms + 60_100,
        "{info:?}"
    );
    wait_for(&rt, &id, "paused again at its timeout", is_paused).await;
    drop(sbx);

    // A timeout given at connect, then changed by set_timeout (by id).
    let sbx = rt
        .connect_with_timeout(&id, Duration::from_secs(600))
        .await
        .expect("connect");
    let info = sbx.info();
    assert!(
        info.end_at_ms.unwrap() >= info.started_at_ms + 590_000,
        "{info:?}"
    );
    assert!(matches!(
        sbx.set_timeout(Duration::ZERO),
        Err(Error::InvalidConfig(_))
    ));
    rt.set_timeout(&id, Duration::from_secs(2)).await.unwrap();
    wait_for(&rt, &id, "paused at the new timeout", is_paused).await;
    let e = spent(sbx.commands().run("true")).await;
    assert!(matches!(e, Error::SandboxPaused { .. }), "{e}");
    drop(sbx);

    // Pause and kill by id take a running sandbox from its handle.
    let sbx = rt
        .connect_with_timeout(&id, Duration::from_secs(600))
        .await
        .unwrap();
    rt.pause(&id).await.expect("pause by id");
    assert!(matches!(
        spent(sbx.commands().run("true")).await,
        Error::SandboxPaused { .. }
    ));
    let sbx2 = rt.connect(&id).await.expect("resume after a pause by id");
    assert_eq!(code(&sbx2, "print(x)").await, "42\n");
    // connect on a running sandbox gives another handle on it: they share
    // it, and dropping one leaves it running under the others.
    let sbx3 = rt.connect(&id).await.expect("a second handle");
    assert_eq!(code(&sbx3, "x += 1\nprint(x)").await, "43\n");
    assert_eq!(code(&sbx2, "print(x)").await, "43\n");
    drop(sbx2);
    assert_eq!(code(&sbx3, "print(x)").await, "43\n");
    let sbx4 = rt
        .connect_with_timeout(&id, Duration::from_secs(900))
        .await
        .expect("a third handle");
    let end = rt.info(&id).await.unwrap().end_at_ms.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(end > now_ms + 800_000, "connect_with_timeout sets it");
    rt.kill(&id).await.expect("kill by id");
    for handle in [&sbx3, &sbx4] {
        assert!(matches!(
            spent(handle.commands().run("true")).await,
            Error::NotFound { .. }
        ));
    }
    assert!(matches!(rt.info(&id).await, Err(Error::NotFound { .. })));
    drop((sbx, sbx3, sbx4));
    // The last handle to go kills it.
    let first = rt.create(TEMPLATE, SandboxConfig::default()).await.unwrap();
    let shared_id = first.id().to_string();
    let second = rt.connect(&shared_id).await.unwrap();
    drop(first);
    assert_eq!(sh(&second, "echo still").await, "still\n");
    drop(second);
    assert!(matches!(
        rt.info(&shared_id).await,
        Err(Error::NotFound { .. })
    ));

    // The runtime's maximum running time overrides a long timeout.
    let capped = dormouse::Runtime::builder(state.path())
        .max_running_time(Some(Duration::from_secs(4)))
        .open()
        .await
        .unwrap();
    let sbx = capped
        .create(
            TEMPLATE,
            SandboxConfig::default()
                .timeout(Duration::from_secs(3600))
                .auto_pause(true),
        )
        .await
        .unwrap();
    let capped_id = sbx.id().to_string();
    let info = sbx.info();
    assert!(
        info.end_at_ms.unwrap() <= info.started_at_ms + 4_100,
        "{info:?}"
    );
    wait_for(
        &capped,
        &capped_id,
        "paused at the maximum running time",
        is_paused,
    )
    .await;
    drop(sbx);
    capped.kill(&capped_id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_only_expired_paused_sandboxes() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    let old = rt.create(TEMPLATE, SandboxConfig::default()).await.unwrap();
    let young = rt.create(TEMPLATE, SandboxConfig::default()).await.unwrap();
    let live = rt.create(TEMPLATE, SandboxConfig::default()).await.unwrap();
    let old = old.pause().await.expect("pause").id().to_string();
    tokio::time::sleep(Duration::from_secs(25)).await;
    let young = young.pause().await.expect("pause").id().to_string();
    // A crashed creation: a directory with neither snapshot nor handle.
    let crashed = state.path().join("sandboxes").join("0123456789abcdef0123");
    std::fs::create_dir(&crashed).unwrap();

    let kept = dormouse::Runtime::builder(state.path())
        .retention(Duration::from_secs(20))
        .open()
        .await
        .unwrap();
    assert!(matches!(kept.info(&old).await, Err(Error::NotFound { .. })));
    assert!(!state.path().join("sandboxes").join(&old).exists());
    assert_eq!(kept.info(&young).await.unwrap().state, SandboxState::Paused);
    assert_eq!(
        kept.info(live.id().as_str()).await.unwrap().state,
        SandboxState::Running
    );
    assert!(crashed.exists(), "too young to be called abandoned");
    assert_eq!(sh(&live, "echo alive").await, "alive\n");
    // Without retention nothing paused goes.
    assert!(rt.sweep().await.unwrap().is_empty());
    live.kill().await.unwrap();
    kept.kill(&young).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_built_on_templates_start_with_their_setup_running() {
    let state = tempfile::tempdir().unwrap();
    let Some(rt) = runtime(state.path()).await else {
        return;
    };
    let spec = dormouse::TemplateBuilder::new("web", TEMPLATE)
        // Not in the base image, with dependencies (libjq1, libonig5) it
        // lacks too; installed before the commands run.
        .apt_install(["jq"])
        .run("jq --version")
        .file("/srv/www/hello.txt", common::HELLO)
        .run("mkdir -p /srv/www/sub && echo built > /srv/www/sub/marker")
        .run("test \"$GREETING\" = hi")
        .env("GREETING", "hi")
        .cwd("/srv/www")
        .start("exec python3 -m http.server 8000 --bind 127.0.0.1")
        .ready("bash -c 'exec 3<>/dev/tcp/127.0.0.1/8000'");
    let t = Instant::now();
    assert!(
        rt.build_template(spec.clone()).await.expect("build"),
        "built"
    );
    eprintln!("template built in {:.1?}", t.elapsed());
    let t = Instant::now();
    assert!(
        !rt.build_template(spec.clone()).await.expect("rebuild"),
        "reused"
    );
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "a reuse does no work"
    );

    let sbx = rt
        .create("web", SandboxConfig::default().env("EXTRA", "1"))
        .await
        .expect("create from the built template");
    assert_eq!(sbx.info().template, "web");
    assert_eq!(
        sh(&sbx, "echo $GREETING $EXTRA; pwd; cat sub/marker").await,
        "hi 1\n/srv/www\nbuilt\n"
    );
    assert_eq!(
        sh(&sbx, "echo '{\"a\": [1, 2]}' | jq -c .a").await,
        "[1,2]\n"
    );
    // The start command runs from the start.
    let procs = sbx.commands().list().await.unwrap();
    assert!(
        procs.iter().any(|p| p.tag.as_deref() == Some("start")),
        "{procs:?}"
    );
    let got = code(
        &sbx,
        "import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:8000/hello.txt').read().decode(), end='')",
    )
    .await;
    assert_eq!(got, common::HELLO);
    assert!(matches!(
        rt.create("web", SandboxConfig::default().memory_mib(4096))
            .await,
        Err(Error::InvalidConfig(_))
    ));
    sbx.kill().await.unwrap();

    // A failing step names itself; nothing is left of the build.
    let err = rt
        .build_template(
            dormouse::TemplateBuilder::new("bad", TEMPLATE).run("echo oops >&2; exit 3"),
        )
        .await
        .unwrap_err();
    match &err {
        Error::TemplateBuild { step, reason, .. } => {
            assert!(step.contains("exit 3"), "{err}");
            assert!(reason.contains("oops"), "{err}");
        }
        other => panic!("expected a build error, got {other}"),
    }
    assert!(matches!(
        rt.create("bad", SandboxConfig::default()).await,
        Err(Error::TemplateNotFound { .. })
    ));
    // A package apt does not know fails the build with apt's word; a
    // name that is not a package name is refused before any work.
    let err = rt
        .build_template(
            dormouse::TemplateBuilder::new("nopkg", TEMPLATE)
                .apt_install(["dormouse-no-such-package"]),
        )
        .await
        .unwrap_err();
    match &err {
        Error::TemplateBuild { step, reason, .. } => {
            assert!(step.contains("dormouse-no-such-package"), "{err}");
            assert!(reason.contains("Unable to locate package"), "{err}");
        }
        other => panic!("expected a build error, got {other}"),
    }
    assert!(matches!(
        rt.build_template(
            dormouse::TemplateBuilder::new("badpkg", TEMPLATE).apt_install(["--force-yes"])
        )
        .await,
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(
        std::fs::read_dir(state.path().join("sandboxes"))
            .unwrap()
            .count(),
        0,
        "build sandboxes are gone"
    );
}
