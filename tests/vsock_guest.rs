//! The vsock device against the real Linux virtio-vsock driver: boots the
//! guest template (kernel + root filesystem with the agent as PID 1) with a
//! block and a vsock device, connects to the agent's port and pushes data
//! both ways through a command, more than either side's credit.
//!
//! Skips loudly when `/dev/kvm` or the template is missing (fails on CI).
//! The sandbox tests go through the same path; this one drives the device
//! directly, with the connector's own errors visible.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dormouse::agent::{self, ExecRequest};
use dormouse::disk::CowDisk;
use dormouse::proto::AGENT_VSOCK_PORT;
use dormouse::vmm::devices::virtio::block::Block;
use dormouse::vmm::devices::virtio::vsock::{Vsock, VsockConnector, VsockError};
use dormouse::vmm::devices::virtio::VirtioDevice;
use dormouse::vmm::{Machine, MachineConfig};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

fn boot((kernel, rootfs): &(PathBuf, PathBuf), work: &Path) -> (Machine, VsockConnector) {
    let disk = CowDisk::create(rootfs, &work.join("disk")).unwrap();
    let (vsock, connector) = Vsock::new(3).unwrap();
    let devices: Vec<Box<dyn VirtioDevice>> =
        vec![Box::new(Block::new(disk, false).unwrap()), Box::new(vsock)];
    let machine = Machine::boot(MachineConfig {
        // DORMOUSE_TEST_KERNEL overrides the template's kernel (debugging).
        kernel: std::env::var_os("DORMOUSE_TEST_KERNEL")
            .map_or_else(|| kernel.clone(), PathBuf::from),
        cmdline: "root=/dev/vda rw init=/sbin/dormouse-agent".into(),
        mem_mib: 512,
        vcpus: 1,
        kvm_path: "/dev/kvm".into(),
        console_log: work.join("console.log"),
        devices,
    })
    .unwrap();
    (machine, connector)
}

async fn connect(connector: &VsockConnector) -> Result<tokio::net::UnixStream, VsockError> {
    let c = connector.clone();
    let stream =
        tokio::task::spawn_blocking(move || c.connect(AGENT_VSOCK_PORT, Duration::from_secs(30)))
            .await
            .unwrap()?;
    stream.set_nonblocking(true).unwrap();
    Ok(tokio::net::UnixStream::from_std(stream).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_guest_agent_over_vsock() {
    let work = tempfile::tempdir().unwrap();
    let Some(rt) = common::runtime(work.path()).await else {
        return;
    };
    let template = rt.template(common::TEMPLATE).unwrap();
    let template = (template.kernel_path(), template.rootfs_path());
    let (machine, connector) = {
        let (t, w) = (template.clone(), work.path().to_owned());
        tokio::task::spawn_blocking(move || boot(&t, &w))
            .await
            .unwrap()
    };
    let console = work.path().join("console.log");
    let started = Instant::now();

    // Until the guest driver is up: NotReady; until the agent listens:
    // refused. Then the handshake works.
    let mut refused = 0;
    let info = loop {
        if let Some(reason) = machine.stop_reason() {
            panic!(
                "guest stopped: {reason:?}\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "no agent after {BOOT_TIMEOUT:?}:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        match connect(&connector).await {
            Ok(stream) => break agent::hello(stream).await.expect("hello"),
            Err(VsockError::NotReady | VsockError::ConnectionRefused { .. }) => {
                if connector.is_ready() {
                    refused += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    eprintln!(
        "agent up after {:.1?} ({refused} refused connects): {info:?}",
        started.elapsed()
    );

    // Both directions, more than a connection's credit (256 KiB each way):
    // the guest's reads and ours are slow, so credit must stall and resume.
    let input = noise(1, 600_000);
    let t = Instant::now();
    let out = agent::exec(
        connect(&connector).await.unwrap(),
        ExecRequest::shell("cat").stdin(input.clone()),
    )
    .await
    .expect("exec cat");
    eprintln!("echoed {} bytes in {:.1?}", input.len(), t.elapsed());
    assert_eq!(
        out.exit_code,
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout != input {
        describe_difference(&input, &out.stdout);
        panic!("echoed data differs ({} bytes back)", out.stdout.len());
    }

    // Several connections at once.
    let mut tasks = Vec::new();
    for i in 0..4 {
        let stream = connect(&connector).await.unwrap();
        tasks.push(tokio::spawn(agent::exec(
            stream,
            ExecRequest::shell(format!("echo conn{i}")),
        )));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let out = task.await.unwrap().unwrap();
        assert_eq!(out.stdout, format!("conn{i}\n").as_bytes());
    }

    // A port nothing listens on is refused by the guest kernel.
    let c = connector.clone();
    let err = tokio::task::spawn_blocking(move || c.connect(4242, Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, VsockError::ConnectionRefused { port: 4242 }),
        "{err}"
    );

    // A plain echo server in the guest, without the agent in the data path:
    // raw throughput both ways, and half-close semantics.
    // A raw string: `\` line continuations would eat Python's indentation.
    let server = r#"import socket
s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
s.bind((socket.VMADDR_CID_ANY, 5000))
s.listen(4)
print('listening', flush=True)
while True:
    c, _ = s.accept()
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
"#;
    let out = agent::exec(
        connect(&connector).await.unwrap(),
        ExecRequest::shell(
            "cat > /tmp/echo.py && (setsid python3 /tmp/echo.py </dev/null >/tmp/echo.log 2>&1 &)",
        )
        .stdin(server.as_bytes().to_vec()),
    )
    .await
    .expect("start the echo server");
    assert_eq!(out.exit_code, Some(0));
    let t = Instant::now();
    let mut echo = loop {
        let c = connector.clone();
        match tokio::task::spawn_blocking(move || c.connect(5000, Duration::from_secs(30)))
            .await
            .unwrap()
        {
            Ok(s) => break s,
            Err(VsockError::ConnectionRefused { .. }) if t.elapsed() < Duration::from_secs(300) => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => {
                let log = agent::exec(
                    connect(&connector).await.unwrap(),
                    ExecRequest::shell("cat /tmp/echo.log"),
                )
                .await
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
                panic!(
                    "echo server after {:.1?}: {e}; its log: {log:?}",
                    t.elapsed()
                )
            }
        }
    };
    eprintln!("echo server up after {:.1?}", t.elapsed());
    let payload = noise(2, 1_000_000);
    let echoed = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut writer = echo.try_clone().unwrap();
        let data = payload.clone();
        let t = Instant::now();
        let w = std::thread::spawn(move || {
            writer.write_all(&data).unwrap();
            // Half-close: the server sees EOF, finishes and closes.
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        echo.read_to_end(&mut back).unwrap();
        w.join().unwrap();
        (back, payload, t.elapsed())
    })
    .await
    .unwrap();
    eprintln!(
        "raw echo: {} bytes each way in {:.1?} ({:.0} KiB/s each way)",
        echoed.0.len(),
        echoed.2,
        echoed.0.len() as f64 / 1024.0 / echoed.2.as_secs_f64()
    );
    if echoed.0 != echoed.1 {
        describe_difference(&echoed.1, &echoed.0);
        panic!("raw echo differs ({} bytes back)", echoed.0.len());
    }

    // After a transport reset the guest drops its side and new connections work.
    connector.send_transport_reset();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let info = agent::hello(connect(&connector).await.unwrap())
        .await
        .expect("hello after reset");
    eprintln!("after transport reset: {info:?}");
    drop(machine);
}

/// Prints where `got` first differs from `want` and where the differing
/// bytes come from, to tell loss, reordering and corruption apart.
fn describe_difference(want: &[u8], got: &[u8]) {
    let first = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    eprintln!(
        "lengths: want {} got {}; first difference at {first}",
        want.len(),
        got.len()
    );
    let mut at = first;
    for _ in 0..12 {
        if at + 32 > got.len() {
            break;
        }
        let probe = &got[at..at + 32];
        let found: Vec<usize> = want
            .windows(32)
            .enumerate()
            .filter(|(_, w)| *w == probe)
            .map(|(i, _)| i)
            .take(3)
            .collect();
        let run = want
            .iter()
            .skip(found.first().copied().unwrap_or(0))
            .zip(&got[at..])
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!("got[{at}..] found in want at {found:?}, matching for {run} bytes");
        at += run.max(32);
    }
}

/// Pseudo-random bytes (no repeating patterns, so misplaced data is found).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
