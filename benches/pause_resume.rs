//! Pause and resume against guest memory size and the memory dirtied since
//! the last resume, next to the raw `pwrite` + `fdatasync` bandwidth of the
//! same disk, measured in the same run.
//!
//! Run with `cargo bench --bench pause_resume` after `guest/build.sh`.
//! Prints the host kind and, at the end, a table: for each memory size and
//! dirty size the median pause and resume times, the bytes a pause wrote,
//! and the pause time the disk bandwidth allows (bytes ÷ bandwidth).
//!
//! Guest memory is dirtied by a Python process in the guest that owns a
//! buffer (touched once, so later rewrites cost no guest page faults) and
//! rewrites one byte per page of its first N MiB on request.
//!
//! `DORMOUSE_BENCH_SIZES` (MiB, comma-separated; default `256,1024,4096`)
//! and `DORMOUSE_BENCH_DIRTY` (MiB; default `0,64,512`) choose the grid.
//! `DORMOUSE_BENCH_STRIDE=K` (default 1) dirties one page in every K, so
//! that the pages dirtied lie scattered (a fragmented memory layer).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use dormouse::{HostKind, Runtime, SandboxConfig};

const TEMPLATE: &str = "python";

/// The guest-side dirtier: `/tmp/dirty.py N S` keeps an N x S MiB buffer
/// and, for every line `K` written to /tmp/dirty.in, rewrites K MiB of it,
/// one page in every S, and writes `done` to /tmp/dirty.out.
const DIRTIER: &str = r#"
import os, sys
stride = int(sys.argv[2])
size = (int(sys.argv[1]) << 20) * stride
buf = bytearray(size)
for i in range(0, size, 4096):
    buf[i] = 1
os.mkfifo('/tmp/dirty.in')
open('/tmp/dirty.ready', 'w').write('ready')
n = 1
while True:
    with open('/tmp/dirty.in') as f:
        for line in f:
            n = (n + 1) & 0xff
            for i in range(0, (int(line) << 20) * stride, 4096 * stride):
                buf[i] = n
            with open('/tmp/dirty.out', 'w') as out:
                out.write('done')
"#;

fn list(var: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// MiB/s of 64 MiB written with `pwrite` in 1 MiB blocks to a new file,
/// then `fdatasync`: what a pause does (each writes a new memory file, so
/// the page cache takes new pages). Best of three. Also returns the same
/// for rewriting the file in place (pages already cached), for reference.
fn raw_write_bandwidth(dir: &std::path::Path) -> (f64, f64) {
    let block = vec![0x5au8; 1 << 20];
    let pass = |file: &std::fs::File| {
        let t = Instant::now();
        for i in 0..64u64 {
            file.write_all_at(&block, i << 20).expect("pwrite");
        }
        file.sync_data().expect("fdatasync");
        t.elapsed().as_secs_f64()
    };
    let (mut fresh, mut rewrite) = (f64::MAX, f64::MAX);
    for round in 0..3 {
        let path = dir.join(format!("bandwidth-probe-{round}"));
        let file = std::fs::File::create(&path).expect("probe file");
        fresh = fresh.min(pass(&file));
        rewrite = rewrite.min(pass(&file));
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    (64.0 / fresh, 64.0 / rewrite)
}

#[derive(Default)]
struct Sample {
    pause: Vec<Duration>,
    resume: Vec<Duration>,
    restore: Vec<Duration>,
    written: Vec<u64>,
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn benches(c: &mut Criterion) {
    let host = HostKind::detect();
    eprintln!("dormouse pause/resume benchmarks on host kind: {host}");
    let tag = format!("{host:?}").to_lowercase();
    let tokio_rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    // The state directory is on the disk being measured.
    let state =
        tempfile::tempdir_in(std::env::var_os("DORMOUSE_BENCH_DIR").unwrap_or_else(|| ".".into()))
            .expect("state dir");
    let rt = tokio_rt
        .block_on(Runtime::open(state.path()))
        .expect("runtime");
    if let Err(e) = rt.template(TEMPLATE) {
        eprintln!("\n!!! SKIPPING BENCHMARK: {e}\n!!! run guest/build.sh first\n");
        return;
    }
    let (bandwidth, rewrite) = raw_write_bandwidth(state.path());
    eprintln!(
        "raw pwrite+fdatasync bandwidth: {bandwidth:.0} MiB/s to a new file \
         ({rewrite:.0} MiB/s rewriting one in place)"
    );

    let results: Arc<Mutex<BTreeMap<(u64, u64), Sample>>> = Arc::default();
    let mut group = c.benchmark_group(format!("pause_resume-{tag}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(1));
    let stride = list("DORMOUSE_BENCH_STRIDE", &[1])
        .first()
        .copied()
        .unwrap_or(1)
        .max(1);
    if stride > 1 {
        eprintln!("dirtying one page in every {stride}");
    }
    for mem in list("DORMOUSE_BENCH_SIZES", &[256, 1024, 4096]) {
        let dirty_sizes: Vec<u64> = list("DORMOUSE_BENCH_DIRTY", &[0, 64, 512])
            .into_iter()
            .filter(|&d| d * stride + 128 < mem)
            .collect();
        let max_dirty = dirty_sizes.iter().copied().max().unwrap_or(0);
        let t = Instant::now();
        let sbx = tokio_rt
            .block_on(
                rt.create(
                    TEMPLATE,
                    // Longer than the bench: the default 5-minute timeout
                    // would kill it while the dirtier starts.
                    SandboxConfig::default()
                        .memory_mib(mem as u32)
                        .timeout(Duration::from_secs(24 * 3600)),
                ),
            )
            .expect("create");
        eprintln!("{mem} MiB guest booted in {:.1?}", t.elapsed());
        tokio_rt.block_on(async {
            let mut script = String::from("cat > /tmp/dirty.py <<'EOF'\n");
            script.push_str(DIRTIER);
            script.push_str(&format!(
                "EOF\nsetsid python3 /tmp/dirty.py {max_dirty} {stride} </dev/null >/tmp/dirty.log 2>&1 &\n\
                 while [ ! -e /tmp/dirty.ready ]; do sleep 0.5; done"
            ));
            let out = sbx.commands().run(&script).await.expect("start dirtier");
            assert_eq!(out.exit_code, 0, "{out:?}");
        });
        let mut sbx = Some(sbx);
        for &dirty in &dirty_sizes {
            let results = results.clone();
            let stride_label = if stride > 1 {
                format!("/stride{stride}")
            } else {
                String::new()
            };
            group.bench_function(format!("{mem}MiB/dirty{dirty}MiB{stride_label}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let running = sbx.take().expect("sandbox");
                        tokio_rt.block_on(async {
                            if dirty > 0 {
                                let cmd = format!(
                                    "rm -f /tmp/dirty.out; echo {dirty} > /tmp/dirty.in; \
                                     while [ ! -e /tmp/dirty.out ]; do sleep 0.05; done"
                                );
                                running.commands().run(&cmd).await.expect("dirty");
                            } else {
                                // Let the guest settle so that "0" is close to idle.
                                running.commands().run("true").await.expect("idle");
                            }
                        });
                        let t = Instant::now();
                        let paused = tokio_rt.block_on(running.pause()).expect("pause");
                        let pause = t.elapsed();
                        let written = latest_written(paused.dir());
                        let t = Instant::now();
                        let running = tokio_rt.block_on(paused.resume()).expect("resume");
                        let resume = t.elapsed();
                        let restore = running
                            .start_timings()
                            .map_or(Duration::ZERO, |t| t.restore);
                        sbx = Some(running);
                        let mut r = results.lock().unwrap();
                        let s = r.entry((mem, dirty)).or_default();
                        s.pause.push(pause);
                        s.resume.push(resume);
                        s.restore.push(restore);
                        s.written.push(written);
                        total += pause + resume;
                    }
                    total
                })
            });
        }
        if let Some(sbx) = sbx.take() {
            tokio_rt.block_on(sbx.kill()).expect("kill");
        }
    }
    group.finish();

    let mut out = std::io::stderr().lock();
    let _ = writeln!(
        out,
        "\nhost kind: {host}; raw write bandwidth {bandwidth:.0} MiB/s to a new file \
         ({rewrite:.0} MiB/s in place)"
    );
    if stride > 1 {
        let _ = writeln!(out, "dirtied: one page in every {stride}");
    }
    let _ = writeln!(
        out,
        "{:>8} {:>8} {:>10} {:>11} {:>10} {:>6} {:>10} {:>10}",
        "memory", "dirtied", "pause", "written", "goal", "met", "to vCPUs", "to agent"
    );
    for ((mem, dirty), s) in results.lock().unwrap().iter_mut() {
        // Per pause: its goal from what it wrote.
        let goal = |written: u64| {
            Duration::from_secs_f64(1.25 * written as f64 / (1 << 20) as f64 / bandwidth)
                + Duration::from_millis(30)
        };
        let met = s
            .pause
            .iter()
            .zip(&s.written)
            .filter(|(pause, written)| **pause <= goal(**written))
            .count();
        let mut goals: Vec<Duration> = s.written.iter().map(|&w| goal(w)).collect();
        let mut written = s.written.clone();
        written.sort_unstable();
        let _ = writeln!(
            out,
            "{:>6}Mi {:>6}Mi {:>10.1?} {:>9}Mi {:>10.1?} {:>3}/{:<2} {:>10.1?} {:>10.1?}",
            mem,
            dirty,
            median(&mut s.pause),
            written.get(written.len() / 2).copied().unwrap_or(0) >> 20,
            median(&mut goals),
            met,
            s.pause.len(),
            median(&mut s.restore),
            median(&mut s.resume)
        );
    }
    // Resume against memory size, nothing dirtied: largest over smallest.
    {
        let r = results.lock().unwrap();
        let at = |mem: u64| r.get(&(mem, 0)).map(|s| s.restore.clone());
        let sizes: Vec<u64> = r.keys().map(|k| k.0).collect();
        if let (Some(&small), Some(&large)) = (sizes.first(), sizes.last()) {
            if let (Some(mut a), Some(mut b)) = (at(small), at(large)) {
                if small != large {
                    let (a, b) = (median(&mut a), median(&mut b));
                    let _ = writeln!(
                        out,
                        "resume to vCPUs, {large} MiB vs {small} MiB, nothing dirtied: {b:.1?} vs {a:.1?} ({:.2}x)",
                        b.as_secs_f64() / a.as_secs_f64().max(1e-9)
                    );
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "medians; written: the pause's new memory file; goal: 1.25 x written / bandwidth + 30 ms, \
         met: pauses within their own goal; resume: \"to vCPUs\" is the VMM's part (files \
         opened, memory mapped, state restored, vCPUs running), \"to agent\" until the guest \
         agent answers again (memory files checked meanwhile)"
    );
}

/// Bytes the newest memory file of the snapshot in `dir` holds.
fn latest_written(dir: &std::path::Path) -> u64 {
    let manifest = dormouse::snapshot::read_manifest(dir).expect("manifest");
    manifest.memory.last().map_or(0, |l| l.written)
}

criterion_group!(pause_resume, benches);
criterion_main!(pause_resume);
