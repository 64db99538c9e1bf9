//! Create-to-agent-ready (from the template's snapshot, made first), command and
//! `run_code` round-trip times and file transfer throughput of a real
//! sandbox.
//!
//! Run with `cargo bench --bench sandbox` after `guest/build.sh` (the test
//! command builds it too). The host kind is printed first: on a PVM host the
//! guest kernel runs emulated (a boot takes about a minute and a round trip
//! tens of milliseconds); on hardware VT-x / AMD-V a boot must take well
//! under a second. Compare numbers only between runs on the same host kind.
//!
//! `DORMOUSE_BENCH_BOOTS` sets how many creates are timed (default 10, the
//! fewest criterion accepts).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use dormouse::{HostKind, Runtime, SandboxConfig};

const TEMPLATE: &str = "python";

fn runtime(tokio_rt: &tokio::runtime::Runtime, state: &std::path::Path) -> Option<Runtime> {
    let rt = tokio_rt
        .block_on(Runtime::open(state))
        .expect("open runtime");
    match rt.template(TEMPLATE) {
        Ok(_) => Some(rt),
        Err(e) => {
            eprintln!("\n!!! SKIPPING BENCHMARK: {e}\n!!! run guest/build.sh first\n");
            None
        }
    }
}

fn benches(c: &mut Criterion) {
    let host = HostKind::detect();
    eprintln!("dormouse benchmarks on host kind: {host}");
    // Benchmark ids carry the host kind, so results of different kinds are
    // never compared with each other.
    let tag = format!("{host:?}").to_lowercase();
    let tokio_rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let state = tempfile::tempdir().expect("state dir");
    let Some(rt) = runtime(&tokio_rt, state.path()) else {
        return;
    };
    let boots = std::env::var("DORMOUSE_BENCH_BOOTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10usize)
        .max(10);

    // The template's snapshot, made by the first create (a boot), untimed.
    let t = Instant::now();
    let first = tokio_rt
        .block_on(rt.create(TEMPLATE, SandboxConfig::default()))
        .expect("create sandbox");
    eprintln!("template snapshot made (boot) in {:.1?}", t.elapsed());
    tokio_rt.block_on(first.kill()).expect("kill sandbox");

    let mut group = c.benchmark_group(format!("sandbox-{tag}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(boots);
    // One create per sample: criterion must not try to fit more in.
    group.measurement_time(Duration::from_secs(1));
    group.warm_up_time(Duration::from_millis(1));
    group.bench_function("create_to_agent_ready", |b| {
        b.to_async(&tokio_rt).iter_custom(|iters| {
            let rt = rt.clone();
            async move {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let sbx = rt
                        .create(TEMPLATE, SandboxConfig::default())
                        .await
                        .expect("create sandbox");
                    total += start.elapsed();
                    sbx.kill().await.expect("kill sandbox");
                }
                total
            }
        })
    });
    group.finish();

    let sbx = tokio_rt
        .block_on(rt.create(TEMPLATE, SandboxConfig::default()))
        .expect("create sandbox");
    let mut group = c.benchmark_group(format!("sandbox-{tag}"));
    // A command is a process start in the guest: seconds of emulated kernel
    // work on PVM, milliseconds on VT-x. One run per sample.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(1));
    group.bench_function("command_round_trip_true", |b| {
        b.to_async(&tokio_rt).iter(|| async {
            let out = sbx.commands().run("true").await.expect("run");
            assert_eq!(out.exit_code, 0);
        })
    });
    group.bench_function("command_round_trip_echo_64b", |b| {
        let line = "x".repeat(64);
        let cmd = format!("echo {line}");
        b.to_async(&tokio_rt).iter(|| async {
            let out = sbx.commands().run(&cmd).await.expect("run");
            assert_eq!(out.stdout.len(), 65);
        })
    });
    // The interpreter is started by the first run, outside the samples.
    tokio_rt
        .block_on(sbx.run_code("0"))
        .expect("start the interpreter");
    group.bench_function("run_code_round_trip_1_plus_1", |b| {
        b.to_async(&tokio_rt).iter(|| async {
            let run = sbx.run_code("1+1").await.expect("run_code");
            assert_eq!(run.result.as_deref(), Some("2"));
        })
    });
    group.finish();

    // File throughput in both directions: every byte crosses vsock and the
    // guest kernel (emulated on PVM: about 1 MiB/s there).
    let mut group = c.benchmark_group(format!("files-{tag}"));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(1));
    for mib in [1usize, 16] {
        let data: Vec<u8> = (0..mib << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
        let path = format!("/tmp/bench-{mib}MiB");
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(format!("write_{mib}MiB"), |b| {
            b.to_async(&tokio_rt).iter(|| async {
                let info = sbx.files().write(&path, &data).await.expect("write");
                assert_eq!(info.size, data.len() as u64);
            })
        });
        group.bench_function(format!("read_{mib}MiB"), |b| {
            b.to_async(&tokio_rt).iter(|| async {
                let back = sbx.files().read(&path).await.expect("read");
                assert_eq!(back.len(), data.len());
            })
        });
    }
    group.finish();
    tokio_rt.block_on(sbx.kill()).expect("kill sandbox");
}

criterion_group!(sandbox, benches);
criterion_main!(sandbox);
