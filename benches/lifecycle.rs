//! Creating sandboxes from a template's snapshot, forking, and the memory
//! each extra sandbox costs.
//!
//! Run with `cargo bench --bench lifecycle` after `guest/build.sh`. Prints
//! the host kind, then criterion's timings, then a table:
//!
//! - `create`: from the template's snapshot to a running sandbox whose
//!   agent answered (the template snapshot is made before, untimed);
//! - `create + first command`: the same, then `true` run in the guest;
//! - `create` for the template at its memory size and at 4x it: the VMM
//!   side should not grow with it (memory is mapped, not copied);
//! - `fork N` (N = 1, 4, 16): total, and per sandbox; the VMM side per
//!   sandbox (the VMM's wall time for the N children divided by N), and
//!   each child's time from the start of the fork's creates to its vCPUs;
//! - memory per extra idle sandbox of the template: the growth of this
//!   process's proportional set size (PSS, which counts a page shared by
//!   mappings once), its anonymous part (pages the sandbox wrote: its own)
//!   and its file part (pages read from the snapshot, shared by all), for
//!   `DORMOUSE_BENCH_IDLE` (default 8) sandboxes, divided by their number.
//!
//! On a PVM host the guest kernel runs emulated, so everything after the
//! vCPUs start (the agent answering, a command) is slow; compare numbers
//! only between runs on the same host kind.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use dormouse::{HostKind, Runtime, SandboxConfig};

const TEMPLATE: &str = "python";

/// `Pss`, `Pss_Anon` and `Pss_File` of this process, in KiB.
fn pss() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Pss_Anon:"), field("Pss_File:"))
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn benches(c: &mut Criterion) {
    let host = HostKind::detect();
    eprintln!("dormouse lifecycle benchmarks on host kind: {host}");
    let tag = format!("{host:?}").to_lowercase();
    let tokio_rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let state = tempfile::tempdir().expect("state dir");
    let rt = tokio_rt
        .block_on(Runtime::open(state.path()))
        .expect("open runtime");
    if let Err(e) = rt.template(TEMPLATE) {
        eprintln!("\n!!! SKIPPING BENCHMARK: {e}\n!!! run guest/build.sh first\n");
        return;
    }
    // The template's snapshot, made once (a boot), untimed.
    let t = Instant::now();
    let first = tokio_rt
        .block_on(rt.create(TEMPLATE, SandboxConfig::default()))
        .expect("create");
    eprintln!("template snapshot made (boot) in {:.1?}", t.elapsed());
    tokio_rt.block_on(first.kill()).expect("kill");

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut group = c.benchmark_group(format!("lifecycle-{tag}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(1));
    let creates = Arc::new(Mutex::new(Vec::new()));
    let first_commands = Arc::new(Mutex::new(Vec::new()));
    let vmm_side = Arc::new(Mutex::new(Vec::new()));
    let guest_side = Arc::new(Mutex::new(Vec::new()));
    for (name, command, times) in [
        ("create_from_template", false, &creates),
        ("create_and_first_command", true, &first_commands),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&tokio_rt).iter_custom(|iters| {
                let rt = rt.clone();
                let times = times.clone();
                let (vmm_side, guest_side) = (vmm_side.clone(), guest_side.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        let sbx = rt
                            .create(TEMPLATE, SandboxConfig::default())
                            .await
                            .expect("create");
                        let parts = sbx.start_timings().expect("a created sandbox has timings");
                        vmm_side.lock().unwrap().push(parts.prepare + parts.restore);
                        guest_side.lock().unwrap().push(parts.agent);
                        if command {
                            let out = sbx.commands().run("true").await.expect("command");
                            assert_eq!(out.exit_code, 0);
                        }
                        let took = start.elapsed();
                        times.lock().unwrap().push(took);
                        total += took;
                        sbx.kill().await.expect("kill");
                    }
                    total
                }
            })
        });
    }
    group.finish();
    rows.push((
        "create".into(),
        format!("{:.1?}", median(&mut creates.lock().unwrap())),
    ));
    rows.push((
        "  of which VMM side (files, restore)".into(),
        format!("{:.1?}", median(&mut vmm_side.lock().unwrap())),
    ));
    rows.push((
        "  of which guest side (agent answers)".into(),
        format!("{:.1?}", median(&mut guest_side.lock().unwrap())),
    ));
    rows.push((
        "create + first command".into(),
        format!("{:.1?}", median(&mut first_commands.lock().unwrap())),
    ));

    // Create against template memory size: the same template at 4x the
    // memory (its own snapshot, made untimed), five creates each.
    let big_mib = 4 * rt.template(TEMPLATE).expect("template").manifest.mem_mib;
    let big = SandboxConfig::default().memory_mib(big_mib);
    let t = Instant::now();
    tokio_rt
        .block_on(async { rt.create(TEMPLATE, big.clone()).await?.kill().await })
        .expect("create");
    eprintln!(
        "{big_mib} MiB template snapshot made (boot) in {:.1?}",
        t.elapsed()
    );
    for (label, config) in [("default", SandboxConfig::default()), ("4x", big)] {
        let (mut total, mut vmm) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let start = Instant::now();
            let sbx = tokio_rt
                .block_on(rt.create(TEMPLATE, config.clone()))
                .expect("create");
            total.push(start.elapsed());
            let parts = sbx.start_timings().expect("timings");
            vmm.push(parts.prepare + parts.restore);
            let memory = sbx.info().memory_mib;
            tokio_rt.block_on(sbx.kill()).expect("kill");
            if vmm.len() == 5 {
                rows.push((
                    format!("create, {label} template memory ({memory} MiB)"),
                    format!(
                        "{:.1?} (VMM side {:.1?})",
                        median(&mut total),
                        median(&mut vmm)
                    ),
                ));
            }
        }
    }

    // Fork: N = 1, 4, 16, three times each; medians.
    let mut parent = tokio_rt
        .block_on(rt.create(TEMPLATE, SandboxConfig::default()))
        .expect("create");
    tokio_rt
        .block_on(parent.run_code("data = list(range(100_000))"))
        .expect("run_code");
    for n in [1usize, 4, 16] {
        let mut times = Vec::new();
        let mut each = Vec::new();
        let mut per_sandbox = Vec::new();
        for _ in 0..3 {
            let start = Instant::now();
            let children = tokio_rt.block_on(parent.fork(n)).expect("fork");
            times.push(start.elapsed());
            let timings: Vec<_> = children.iter().filter_map(|c| c.start_timings()).collect();
            each.extend(timings.iter().map(|t| t.prepare + t.restore));
            // The directories are made concurrently, then the machines
            // restored one after another: the VMM's wall time for the fork
            // is the slowest directory plus every restore.
            let slowest_prepare = timings.iter().map(|t| t.prepare).max().unwrap_or_default();
            let restores: Duration = timings.iter().map(|t| t.restore).sum();
            per_sandbox.push((slowest_prepare + restores) / n as u32);
            for child in children {
                tokio_rt.block_on(child.kill()).expect("kill");
            }
        }
        let total = median(&mut times);
        rows.push((
            format!("fork {n}"),
            format!(
                "{total:.1?} total, {:.1?} per sandbox; VMM side {:.1?} per sandbox ({:.1?} each: its own directory and restore)",
                total / n as u32,
                median(&mut per_sandbox),
                median(&mut each)
            ),
        ));
    }
    tokio_rt.block_on(parent.kill()).expect("kill");

    // Memory per extra idle sandbox.
    let idle: usize = std::env::var("DORMOUSE_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let before = pss();
    let sandboxes: Vec<_> = (0..idle)
        .map(|_| {
            tokio_rt
                .block_on(rt.create(TEMPLATE, SandboxConfig::default()))
                .expect("create")
        })
        .collect();
    // Let them settle (the guest's post-resume work).
    std::thread::sleep(Duration::from_secs(5));
    let after = pss();
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / idle as f64 / 1024.0;
    rows.push((
        format!("memory per idle sandbox ({idle})"),
        format!(
            "PSS {:.1} MiB (own pages {:.1} MiB, shared snapshot pages {:.1} MiB); guest memory {} MiB",
            per(before.0, after.0),
            per(before.1, after.1),
            per(before.2, after.2),
            sandboxes[0].info().memory_mib,
        ),
    ));
    for sbx in sandboxes {
        tokio_rt.block_on(sbx.kill()).expect("kill");
    }

    println!("\nlifecycle on host kind {host}:");
    for (what, value) in rows {
        println!("  {what:<40} {value}");
    }
}

criterion_group!(lifecycle, benches);
criterion_main!(lifecycle);
