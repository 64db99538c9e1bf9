//! Fork: load data once, then explore several continuations of the same
//! state in parallel. The parent computes something expensive, forks into
//! four sandboxes that each start with its variables, and each goes its own
//! way; the parent is untouched.
//!
//! Run with `cargo run --release --example fork` after `guest/build.sh`
//! (or `scripts/quickstart`) built the `python` template.

use std::time::Instant;

use dormouse::{Runtime, SandboxConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = Runtime::open(std::env::temp_dir().join("dormouse-examples")).await?;
    let mut parent = rt.create("python", SandboxConfig::default()).await?;
    parent
        .run_code("import random\nrandom.seed(7)\ndata = [random.random() for _ in range(200_000)]")
        .await?;

    let t = Instant::now();
    let children = parent.fork(4).await?;
    println!(
        "forked into {} sandboxes in {:.1?}",
        children.len(),
        t.elapsed()
    );

    for (i, child) in children.iter().enumerate() {
        let code = format!("k = {}\nprint(sorted(data)[len(data) * k // 5])", i + 1);
        let out = child.run_code(&code).await?;
        println!("child {i}: quantile {}/5 = {}", i + 1, out.stdout.trim());
    }
    let out = parent
        .run_code("print('k' in globals(), len(data))")
        .await?;
    println!("parent: has k? {}", out.stdout.trim());

    for child in children {
        child.kill().await?;
    }
    parent.kill().await?;
    Ok(())
}
