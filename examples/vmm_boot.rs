//! Boots a kernel and root filesystem with the bare VMM (no sandbox, no
//! agent) and streams the serial console: a debugging tool for guest images.
//!
//! Usage: cargo run --release --example vmm_boot -- VMLINUX ROOTFS SECONDS [KERNEL ARGS...]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dormouse::disk::CowDisk;
use dormouse::vmm::devices::virtio::block::Block;
use dormouse::vmm::{Machine, MachineConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: vmm_boot VMLINUX ROOTFS SECONDS [KERNEL ARGS...]");
        std::process::exit(2);
    }
    let dir = tempfile::tempdir()?;
    let disk = CowDisk::create(&PathBuf::from(&args[1]), &dir.path().join("overlay"))?;
    let seconds: u64 = args[2].parse()?;
    let extra = if args.len() > 3 {
        args[3..].join(" ")
    } else {
        "root=/dev/vda rw init=/bin/sh".to_owned()
    };
    let console_log = dir.path().join("console.log");
    let start = Instant::now();
    let machine = Machine::boot(MachineConfig {
        kernel: PathBuf::from(&args[0]),
        cmdline: extra,
        mem_mib: 512,
        vcpus: 1,
        kvm_path: "/dev/kvm".into(),
        console_log: console_log.clone(),
        devices: vec![Box::new(Block::new(disk, false)?)],
    })?;
    println!("host: {}", machine.host_kind());
    let mut printed = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(200));
        let log = std::fs::read_to_string(&console_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[printed..] {
            println!("[{:6.2}s] {line}", start.elapsed().as_secs_f64());
        }
        printed = lines.len();
        if let Some(reason) = machine.stop_reason() {
            println!("stopped after {:.2?}: {reason}", start.elapsed());
            break;
        }
    }
    drop(machine);
    Ok(())
}
