//! Checkpointing a long computation: a Python loop runs in the background
//! of a sandbox; every few seconds the host takes a named snapshot of it
//! (the guest stops only while the pages it dirtied are written). Then the
//! sandbox is killed, as by a crash, and the computation continues from
//! the last checkpoint in a new sandbox.
//!
//! Run with `cargo run --release --example checkpoint` after
//! `guest/build.sh` (or `scripts/quickstart`) built the `python` template.

use std::time::{Duration, Instant};

use dormouse::{Command, Runtime, SandboxConfig};

const WORK: &str = r#"
import os, time
n = int(open('/root/step').read()) if os.path.exists('/root/step') else 0
total = 0
while True:
    n += 1
    total += n * n
    with open('/tmp/progress.tmp', 'w') as f:
        f.write(f'{n} {total}')
    os.rename('/tmp/progress.tmp', '/tmp/progress')
    time.sleep(0.1)
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = Runtime::open(std::env::temp_dir().join("dormouse-examples")).await?;
    let mut sbx = rt.create("python", SandboxConfig::default()).await?;
    sbx.files().write("/root/work.py", WORK).await?;
    sbx.commands()
        .spawn(Command::new(["python3", "/root/work.py"]))
        .await?;
    sbx.commands()
        .run("while [ ! -s /tmp/progress ]; do sleep 0.2; done")
        .await?;

    let progress = |out: String| out.trim().to_owned();
    let mut last = None;
    for i in 0..3 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let name = format!("checkpoint-{}-{i}", sbx.id());
        let t = Instant::now();
        sbx.snapshot(&name).await?;
        let at = progress(sbx.files().read_to_string("/tmp/progress").await?);
        println!(
            "{name}: taken in {:.1?}, the loop is at step/total {at}",
            t.elapsed()
        );
        if let Some(old) = last.replace(name) {
            rt.delete_snapshot(&old).await?;
        }
    }
    let crashed_at = progress(sbx.files().read_to_string("/tmp/progress").await?);
    sbx.kill().await?;
    println!("the sandbox is gone (it was at {crashed_at}); restarting from the last checkpoint");

    let last = last.expect("three checkpoints were taken");
    let restored = rt.create_from_snapshot(&last, 1).await?.remove(0);
    let resumed_at = progress(restored.files().read_to_string("/tmp/progress").await?);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = progress(restored.files().read_to_string("/tmp/progress").await?);
    println!("restored at {resumed_at}, and the same loop goes on: {now}");
    restored.kill().await?;
    rt.delete_snapshot(&last).await?;
    Ok(())
}
