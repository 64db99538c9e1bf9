//! The code interpreter end to end on the host, without a VM: the real agent
//! binary (see `common/dev_agent.rs`) runs `python3` contexts and the async
//! client in `dormouse::agent::code` talks to it.

#[path = "common/dev_agent.rs"]
mod dev_agent;

use std::time::{Duration, Instant};

use dev_agent::Agent;

use dormouse::agent::code::{
    create_context, list_contexts, remove_context, restart_context, run_code, CodeOutput, CodeRun,
    Execution, INTERPRETER_DIED,
};
use dormouse::agent::{AgentError, ErrorKind};

async fn run(agent: &Agent, run: CodeRun) -> Execution {
    let out = run_code(agent.connect().await, &run, None)
        .await
        .unwrap_or_else(|e| panic!("run of {:?} failed: {e}", run.code));
    agent.assert_alive();
    out
}

async fn code(agent: &Agent, code: &str) -> Execution {
    run(agent, CodeRun::new(code)).await
}

fn ok(out: &Execution) {
    assert!(out.error.is_none(), "unexpected error: {out:?}");
}

#[tokio::test]
async fn variables_persist_and_the_last_expression_is_the_result() {
    let agent = Agent::start();
    let out = code(&agent, "x = 42").await;
    ok(&out);
    assert_eq!(out.result, None);
    assert_eq!(out.stdout, "");
    assert_eq!(code(&agent, "x").await.result.as_deref(), Some("42"));
    let out = code(&agent, "print(x)").await;
    assert_eq!(out.stdout, "42\n");
    assert_eq!(out.result, None, "print() returns None, which is no result");
    assert_eq!(
        code(&agent, "import math\ns = 'a'\ns * 2")
            .await
            .result
            .as_deref(),
        Some("'aa'")
    );
    assert_eq!(
        code(&agent, "math.floor(2.5)").await.result.as_deref(),
        Some("2")
    );
}

#[tokio::test]
async fn output_comes_before_the_result_in_order() {
    let agent = Agent::start();
    let out = code(
        &agent,
        "import sys\nfor i in range(3):\n    print(i)\nsys.stderr.write('err\\n')\n[1, 2]",
    )
    .await;
    ok(&out);
    assert_eq!(out.stdout, "0\n1\n2\n");
    assert_eq!(out.stderr, "err\n");
    assert_eq!(out.result.as_deref(), Some("[1, 2]"));

    // Streamed chunks arrive, and before the run ends.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let out = run_code(
        agent.connect().await,
        &CodeRun::new("print('a')\nimport sys; print('b', file=sys.stderr)\n7"),
        Some(tx),
    )
    .await
    .unwrap();
    assert_eq!(out.result.as_deref(), Some("7"));
    let mut streamed = (Vec::new(), Vec::new());
    while let Some(chunk) = rx.recv().await {
        match chunk {
            CodeOutput::Stdout(d) => streamed.0.extend(d),
            CodeOutput::Stderr(d) => streamed.1.extend(d),
        }
    }
    assert_eq!(
        (&streamed.0[..], &streamed.1[..]),
        (&b"a\n"[..], &b"b\n"[..])
    );
}

#[tokio::test]
async fn exceptions_are_reported_and_the_context_lives_on() {
    let agent = Agent::start();
    ok(&code(&agent, "y = 5").await);
    let out = code(&agent, "print('before')\ndef f():\n    return 1 / 0\nf()").await;
    assert_eq!(out.stdout, "before\n");
    assert_eq!(out.result, None);
    let err = out.error.expect("an exception");
    assert_eq!(err.name, "ZeroDivisionError");
    assert_eq!(err.value, "division by zero");
    assert!(err.traceback.contains("return 1 / 0"), "{}", err.traceback);
    assert!(err.traceback.contains("<cell"), "{}", err.traceback);
    assert!(
        !err.traceback.contains("dormouse-driver"),
        "driver frames are hidden: {}",
        err.traceback
    );
    assert_eq!(code(&agent, "y").await.result.as_deref(), Some("5"));

    let err = code(&agent, "def (:").await.error.expect("a syntax error");
    assert_eq!(err.name, "SyntaxError");
    let err = code(&agent, "raise ValueError('bad value')")
        .await
        .error
        .unwrap();
    assert_eq!(
        (err.name.as_str(), err.value.as_str()),
        ("ValueError", "bad value")
    );
    let err = code(&agent, "import sys; sys.exit(4)").await.error.unwrap();
    assert_eq!(err.name, "SystemExit");
    assert_eq!(code(&agent, "y + 1").await.result.as_deref(), Some("6"));
}

#[tokio::test]
async fn commands_started_by_the_code_reach_the_host() {
    let agent = Agent::start();
    let out = code(
        &agent,
        "import os, subprocess\nprint('py1')\nos.system('echo hi; echo oops >&2')\n\
         print('py2')\nsubprocess.run(['echo', 'sub'])\nNone",
    )
    .await;
    ok(&out);
    assert_eq!(out.stdout, "py1\nhi\npy2\nsub\n");
    assert_eq!(out.stderr, "oops\n");
}

#[tokio::test]
async fn reading_stdin_gets_eof() {
    let agent = Agent::start();
    let started = Instant::now();
    let out = run(
        &agent,
        CodeRun::new("input('name? ')").timeout(Duration::from_secs(20)),
    )
    .await;
    assert!(!out.timed_out, "input() hung: {out:?}");
    assert_eq!(out.error.expect("EOFError").name, "EOFError");
    let out = code(&agent, "import sys; sys.stdin.read()").await;
    assert_eq!(out.result.as_deref(), Some("''"));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn timeouts_interrupt_the_code_and_keep_the_context() {
    let agent = Agent::start();
    ok(&code(&agent, "kept = 'yes'").await);
    for busy in ["while True: pass", "import time\ntime.sleep(100)"] {
        let started = Instant::now();
        let out = run(
            &agent,
            CodeRun::new(busy).timeout(Duration::from_millis(500)),
        )
        .await;
        assert!(out.timed_out, "{busy}: {out:?}");
        let err = out.error.expect("KeyboardInterrupt");
        assert_eq!(err.name, "KeyboardInterrupt", "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{busy}");
        assert_eq!(code(&agent, "kept").await.result.as_deref(), Some("'yes'"));
    }
    // A foreground command the code waits for is stopped too.
    let started = Instant::now();
    let out = run(
        &agent,
        CodeRun::new("import os\nos.system('sleep 100')").timeout(Duration::from_millis(300)),
    )
    .await;
    assert!(out.timed_out, "{out:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(code(&agent, "kept").await.result.as_deref(), Some("'yes'"));
    // A run within its timeout is not flagged.
    let out = run(
        &agent,
        CodeRun::new("1 + 1").timeout(Duration::from_secs(30)),
    )
    .await;
    assert!(!out.timed_out);
    assert_eq!(out.result.as_deref(), Some("2"));
}

#[tokio::test]
async fn dropping_the_run_interrupts_it() {
    let agent = Agent::start();
    ok(&code(&agent, "import time\nstate = 1").await);
    let stream = agent.connect().await;
    let run = CodeRun::new("state = 2\ntime.sleep(100)\nstate = 3");
    let gone =
        tokio::time::timeout(Duration::from_millis(1500), run_code(stream, &run, None)).await;
    assert!(gone.is_err(), "the run should still be sleeping");
    let started = Instant::now();
    assert_eq!(code(&agent, "state").await.result.as_deref(), Some("2"));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn environment_variables_last_for_one_run() {
    let agent = Agent::start();
    let out = run(
        &agent,
        CodeRun::new(
            "import os\nprint(os.environ['DORMOUSE_T'])\nos.system('echo $DORMOUSE_T')\nNone",
        )
        .env("DORMOUSE_T", "v1"),
    )
    .await;
    ok(&out);
    assert_eq!(out.stdout, "v1\nv1\n");
    let out = code(&agent, "os.environ.get('DORMOUSE_T')").await;
    assert_eq!(out.result, None, "{out:?}");
    // A variable that existed is restored, not removed.
    ok(&code(&agent, "os.environ['DORMOUSE_T2'] = 'old'").await);
    let out = run(
        &agent,
        CodeRun::new("os.environ['DORMOUSE_T2']").env("DORMOUSE_T2", "new"),
    )
    .await;
    assert_eq!(out.result.as_deref(), Some("'new'"));
    assert_eq!(
        code(&agent, "os.environ['DORMOUSE_T2']")
            .await
            .result
            .as_deref(),
        Some("'old'")
    );
}

#[tokio::test]
async fn contexts_are_isolated_listed_restarted_and_removed() {
    let agent = Agent::start();
    let dir = agent.dir.path().to_str().unwrap().to_owned();
    let a = create_context(agent.connect().await, Some(&dir))
        .await
        .unwrap();
    let b = create_context(agent.connect().await, None).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(a.language, "python");
    assert_eq!(a.cwd, dir);
    let in_ctx = |id: &str, c: &str| CodeRun::new(c).context(id);
    ok(&run(&agent, in_ctx(&a.id, "v = 'a'")).await);
    ok(&run(&agent, in_ctx(&b.id, "v = 'b'")).await);
    ok(&code(&agent, "v = 'default'").await);
    assert_eq!(
        run(&agent, in_ctx(&a.id, "v")).await.result.as_deref(),
        Some("'a'")
    );
    assert_eq!(
        run(&agent, in_ctx(&b.id, "v")).await.result.as_deref(),
        Some("'b'")
    );
    assert_eq!(code(&agent, "v").await.result.as_deref(), Some("'default'"));
    let cwd = run(&agent, in_ctx(&a.id, "import os; os.getcwd()"))
        .await
        .result;
    assert_eq!(cwd, Some(format!("{dir:?}").replace('"', "'")));

    let mut ids: Vec<String> = list_contexts(agent.connect().await)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    ids.sort();
    let mut want = vec![a.id.clone(), b.id.clone(), "default".to_owned()];
    want.sort();
    assert_eq!(ids, want);

    let again = restart_context(agent.connect().await, &a.id).await.unwrap();
    assert_eq!(again, a);
    let err = run(&agent, in_ctx(&a.id, "v"))
        .await
        .error
        .expect("NameError");
    assert_eq!(err.name, "NameError");
    assert_eq!(
        run(&agent, in_ctx(&b.id, "v")).await.result.as_deref(),
        Some("'b'")
    );

    remove_context(agent.connect().await, &b.id).await.unwrap();
    let gone = run_code(agent.connect().await, &in_ctx(&b.id, "1"), None).await;
    assert!(
        matches!(
            gone,
            Err(AgentError::Remote {
                kind: ErrorKind::NotFound,
                ..
            })
        ),
        "{gone:?}"
    );
    for e in [
        remove_context(agent.connect().await, &b.id)
            .await
            .unwrap_err(),
        restart_context(agent.connect().await, "nosuchctx")
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(
                e,
                AgentError::Remote {
                    kind: ErrorKind::NotFound,
                    ..
                }
            ),
            "{e:?}"
        );
    }
    let ids: Vec<String> = list_contexts(agent.connect().await)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert!(!ids.contains(&b.id), "{ids:?}");

    let missing = create_context(agent.connect().await, Some("/no/such/dir")).await;
    assert!(
        matches!(
            missing,
            Err(AgentError::Remote {
                kind: ErrorKind::CwdNotFound,
                ..
            })
        ),
        "{missing:?}"
    );
    let bad = run_code(agent.connect().await, &in_ctx("bad id!", "1"), None).await;
    assert!(matches!(bad, Err(AgentError::InvalidRequest(_))), "{bad:?}");
}

#[tokio::test]
async fn execution_count_increments_and_restarts_from_one() {
    let agent = Agent::start();
    for n in 1..=3 {
        assert_eq!(code(&agent, "1").await.execution_count, n);
    }
    assert_eq!(code(&agent, "1/0").await.execution_count, 4);
    restart_context(agent.connect().await, "default")
        .await
        .unwrap();
    assert_eq!(code(&agent, "1").await.execution_count, 1);
}

#[tokio::test]
async fn concurrent_runs_on_one_context_are_serialized() {
    let agent = Agent::start();
    ok(&code(&agent, "import time\nlog = []").await);
    let mut tasks = Vec::new();
    for i in 0..4 {
        let stream = agent.connect().await;
        let run = CodeRun::new(format!(
            "log.append(('start', {i}))\ntime.sleep(0.2)\nlog.append(('end', {i}))\n{i}"
        ));
        tasks.push(tokio::spawn(
            async move { run_code(stream, &run, None).await },
        ));
    }
    let mut counts = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.unwrap().unwrap();
        assert_eq!(out.result, Some(i.to_string()));
        counts.push(out.execution_count);
    }
    counts.sort();
    assert_eq!(counts, [2, 3, 4, 5]);
    // Never two runs at once: every start is followed by its own end.
    let out = code(
        &agent,
        "all(log[k][0] == 'start' and log[k + 1] == ('end', log[k][1]) \
         for k in range(0, len(log), 2)) and len(log) == 8",
    )
    .await;
    assert_eq!(out.result.as_deref(), Some("True"), "{out:?}");
}

#[tokio::test]
async fn different_contexts_run_in_parallel() {
    let agent = Agent::start();
    let a = create_context(agent.connect().await, None).await.unwrap();
    let b = create_context(agent.connect().await, None).await.unwrap();
    // Warm both up so interpreter start-up is not timed.
    ok(&run(&agent, CodeRun::new("import time").context(&a.id)).await);
    ok(&run(&agent, CodeRun::new("import time").context(&b.id)).await);
    let started = Instant::now();
    let ra = CodeRun::new("time.sleep(1.5)").context(&a.id);
    let rb = CodeRun::new("time.sleep(1.5)").context(&b.id);
    let (sa, sb) = (agent.connect().await, agent.connect().await);
    let (x, y) = tokio::join!(run_code(sa, &ra, None), run_code(sb, &rb, None));
    ok(&x.unwrap());
    ok(&y.unwrap());
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_interpreter_that_dies_is_reported_and_replaced() {
    let agent = Agent::start();
    ok(&code(&agent, "z = 1").await);
    let out = code(&agent, "import os\nprint('bye')\nos._exit(3)").await;
    assert_eq!(out.stdout, "bye\n");
    let err = out.error.expect("an error saying the interpreter died");
    assert_eq!(err.name, INTERPRETER_DIED);
    assert!(err.value.contains("exited with code 3"), "{}", err.value);
    let out = code(&agent, "z").await;
    assert_eq!(out.error.expect("a fresh interpreter").name, "NameError");
    assert_eq!(out.execution_count, 1);
    assert_eq!(code(&agent, "2 * 21").await.result.as_deref(), Some("42"));

    // Killed between runs: the next run starts a fresh one and says so.
    let pid = code(&agent, "import os; os.getpid()").await.result.unwrap();
    let pid: i32 = pid.parse().unwrap();
    // SAFETY: kill has no memory effects; the pid is the interpreter's.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = code(&agent, "'works'").await;
    assert_eq!(out.result.as_deref(), Some("'works'"));
    assert!(out.stderr.contains("fresh one"), "{out:?}");
    assert_eq!(out.execution_count, 1);
}

#[tokio::test]
async fn restarting_or_removing_a_busy_context_ends_its_run() {
    let agent = Agent::start();
    for remove in [false, true] {
        let ctx = create_context(agent.connect().await, None).await.unwrap();
        ok(&run(&agent, CodeRun::new("import time\nq = 1").context(&ctx.id)).await);
        let busy = CodeRun::new("print('busy')\ntime.sleep(100)").context(&ctx.id);
        let stream = agent.connect().await;
        let running = tokio::spawn(async move { run_code(stream, &busy, None).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        if remove {
            remove_context(agent.connect().await, &ctx.id)
                .await
                .unwrap();
        } else {
            let again = restart_context(agent.connect().await, &ctx.id)
                .await
                .unwrap();
            assert_eq!(again, ctx);
        }
        let out = running.await.unwrap().unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(out.stdout, "busy\n");
        let err = out.error.expect("the run is told");
        assert_eq!(err.name, INTERPRETER_DIED);
        let why = if remove { "removed" } else { "restarted" };
        assert!(err.value.contains(why), "{}", err.value);
        let next = run_code(
            agent.connect().await,
            &CodeRun::new("q").context(&ctx.id),
            None,
        )
        .await;
        if remove {
            assert!(
                matches!(
                    next,
                    Err(AgentError::Remote {
                        kind: ErrorKind::NotFound,
                        ..
                    })
                ),
                "{next:?}"
            );
        } else {
            assert_eq!(next.unwrap().error.expect("fresh").name, "NameError");
        }
    }
}

#[tokio::test]
async fn big_results_and_output_arrive_whole_or_cut() {
    let agent = Agent::start();
    let out = code(&agent, "print('x' * 3_000_000)\n'y' * 1_000_000").await;
    ok(&out);
    assert_eq!(out.stdout.len(), 3_000_001);
    let result = out.result.unwrap();
    assert!(
        result.len() < 1_000_000 && result.starts_with("'yyy"),
        "{}",
        result.len()
    );
    // Lone surrogates and control characters survive the trip.
    let out = code(&agent, "print('\\x01é')\n'\\ud800'").await;
    assert_eq!(out.stdout, "\u{1}é\n");
    assert_eq!(out.result.as_deref(), Some("'\\ud800'"));
}

#[tokio::test]
async fn a_driver_that_sends_garbage_is_replaced() {
    let agent = Agent::start();
    ok(&code(&agent, "w = 1").await);
    for garbage in [
        "b'garbage\\n'",
        "b'{\"t\": \"end\", \"x\": ' + b'1' * (5 << 20)",
    ] {
        let run = CodeRun::new(format!(
            "import os, time\nos.write(4, {garbage})\ntime.sleep(5)"
        ));
        let failed = run_code(agent.connect().await, &run, None).await;
        assert!(
            matches!(
                failed,
                Err(AgentError::Remote {
                    kind: ErrorKind::Internal,
                    ..
                })
            ),
            "{failed:?}"
        );
        let out = code(&agent, "w").await;
        assert_eq!(out.error.expect("a fresh interpreter").name, "NameError");
        ok(&code(&agent, "w = 1").await);
    }
}
