//! Quickstart: create a sandbox from the `python` template, run code in it,
//! pause it (everything to files, nothing left running), resume it and show
//! that a running process and in-memory files survived; then kill it.
//! Run with `scripts/quickstart` (builds the guest image first).

use std::time::Instant;

use dormouse::{Runtime, SandboxConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let state = std::env::temp_dir().join("dormouse-quickstart");
    let rt = Runtime::open(&state).await?;
    println!("host: {}", rt.host_kind());

    let t = Instant::now();
    let sbx = rt.create("python", SandboxConfig::default()).await?;
    println!("sandbox {} ready in {:.1?}", sbx.id(), t.elapsed());

    let t = Instant::now();
    let out = sbx
        .commands()
        .run("echo hello; uname -r; python3 -c 'print(6*7)'")
        .await?;
    println!(
        "command took {:.1?}, exit code {}",
        t.elapsed(),
        out.exit_code
    );
    print!("{}", out.stdout);
    assert_eq!(out.exit_code, 0);
    assert!(out.stdout.contains("hello") && out.stdout.contains("42"));

    // State that lives only in guest memory: a file in tmpfs and a process
    // that counts.
    sbx.commands()
        .run(
            "echo 'x = 42' > /tmp/vars; \
             setsid python3 -c 'import os, time\ni = 0\nwhile True:\n    i += 1\n    open(\"/tmp/c\", \"w\").write(str(i))\n    os.rename(\"/tmp/c\", \"/tmp/count\")\n    time.sleep(0.2)' \
             </dev/null >/dev/null 2>&1 &",
        )
        .await?;
    let before = sbx
        .commands()
        .run("while [ ! -s /tmp/count ]; do sleep 1; done; cat /tmp/count")
        .await?
        .stdout;

    let t = Instant::now();
    let paused = sbx.pause().await?;
    println!(
        "paused in {:.1?}: the guest's memory, CPU and devices are in {}",
        t.elapsed(),
        paused.dir().display()
    );
    let id = paused.id().clone();
    drop(paused); // nothing of the sandbox runs now

    let t = Instant::now();
    let sbx = rt.connect(id.as_str()).await?;
    println!("resumed by id in {:.1?}", t.elapsed());
    let out = sbx.commands().run("cat /tmp/vars; cat /tmp/count").await?;
    let mut lines = out.stdout.lines();
    let vars = lines.next().unwrap_or_default();
    let after = lines.next().unwrap_or_default();
    println!(
        "after resume: /tmp/vars says {vars:?}; the counter was at {} before the pause and is at {after} now",
        before.trim()
    );
    assert_eq!(vars, "x = 42");
    assert!(after.parse::<u64>()? >= before.trim().parse::<u64>()?);

    sbx.kill().await?;
    println!("killed; state dir {}", state.display());
    Ok(())
}
