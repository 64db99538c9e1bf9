//! An interactive session with auto-pause, and a persistent development
//! environment: the sandbox pauses itself when the user is idle for its
//! timeout (here 10 s), costs nothing while paused, and the next request
//! resumes it by id with everything as it was (installed files, variables,
//! the working directory's contents).
//!
//! Run with `cargo run --release --example auto_pause` after
//! `guest/build.sh` (or `scripts/quickstart`) built the `python` template.
//! Run it twice: the second run finds the environment the first one left
//! (its id is kept in the state directory) and resumes it.

use std::time::{Duration, Instant};

use dormouse::{Error, Runtime, SandboxConfig, SandboxState};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let state = std::env::temp_dir().join("dormouse-examples");
    let rt = Runtime::open(&state).await?;
    let id_file = state.join("dev-env.id");

    // Resume the environment of an earlier run, or set one up.
    let earlier = std::fs::read_to_string(&id_file).ok();
    let sbx = match earlier {
        Some(id) if rt.info(id.trim()).await.is_ok() => {
            let t = Instant::now();
            let sbx = rt.connect(id.trim()).await?;
            println!(
                "resumed the environment {} in {:.1?}",
                sbx.id(),
                t.elapsed()
            );
            sbx
        }
        _ => {
            let config = SandboxConfig::default()
                .timeout(Duration::from_secs(10))
                .auto_pause(true)
                .metadata("purpose", "dev-env");
            let sbx = rt.create("python", config).await?;
            // "Install" once: a module in the environment's disk.
            sbx.files()
                .write(
                    "/root/project/tool.py",
                    "def greet(who):\n    return f'hello, {who}'\n",
                )
                .await?;
            sbx.run_code("import sys; sys.path.insert(0, '/root/project'); import tool; runs = 0")
                .await?;
            std::fs::write(&id_file, sbx.id().as_str())?;
            println!("set up a new environment {}", sbx.id());
            sbx
        }
    };
    let out = sbx
        .run_code("runs += 1; print(tool.greet('dormouse'), runs)")
        .await?;
    println!("in the sandbox: {}", out.stdout.trim());

    // Idle past the timeout: the sandbox pauses itself.
    let id = sbx.id().to_string();
    println!("idle for 15 s...");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let info = rt.info(&id).await?;
    println!("state after the idle time: {:?}", info.state);
    assert_eq!(info.state, SandboxState::Paused);
    // The old handle is spent; it says so instead of acting on a stopped VM.
    match sbx.run_code("print(runs)").await {
        Err(Error::SandboxPaused { .. }) => println!("the old handle says: paused, connect again"),
        other => println!("unexpected: {other:?}"),
    }

    // The next request resumes it.
    let t = Instant::now();
    let sbx = rt.connect(&id).await?;
    let out = sbx.run_code("print(runs)").await?;
    println!(
        "resumed in {:.1?}; runs = {}",
        t.elapsed(),
        out.stdout.trim()
    );
    let _paused = sbx.pause().await?; // keep it for the next run of the example
    println!("paused again; run the example again to continue, or kill {id}");
    Ok(())
}
