//! Quickstart: create a sandbox from the `python` template, run code in it,
//! and kill it. Run with `scripts/quickstart` (builds the guest image first).

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

    sbx.kill().await?;
    println!("killed; state dir {}", state.display());
    Ok(())
}
