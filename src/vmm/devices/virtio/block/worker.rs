//! The thread that serves a block device's request queue.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::request;
use crate::disk::CowDisk;
use crate::vmm::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::vmm::memory::GuestMemory;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_STOP: u64 = 1;

/// Everything the worker thread owns while it runs.
pub(super) struct WorkerArgs {
    pub queue: Queue,
    pub queue_evt: EventFd,
    pub mem: GuestMemory,
    pub irq: Arc<IrqTrigger>,
    pub disk: Arc<Mutex<CowDisk>>,
    pub read_only: bool,
}

/// A running worker thread and the means to stop it.
pub(super) struct Worker {
    stop_evt: EventFd,
    stop_flag: Arc<AtomicBool>,
    handle: JoinHandle<Queue>,
}

impl Worker {
    /// Starts the thread.
    pub fn spawn(args: WorkerArgs) -> std::io::Result<Self> {
        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop_evt = stop_evt.try_clone()?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            args.queue_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_QUEUE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            thread_stop_evt.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_STOP),
        )?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        let thread_flag = stop_flag.clone();
        let handle = std::thread::Builder::new()
            .name("dormouse-blk".to_owned())
            .spawn(move || {
                // Keep the stop eventfd open as long as epoll watches it.
                let _stop_evt = thread_stop_evt;
                run(args, &epoll, &thread_flag)
            })?;
        Ok(Self {
            stop_evt,
            stop_flag,
            handle,
        })
    }

    /// Stops the thread, waits for it and returns its queue (with the
    /// positions it reached, for a later snapshot).
    pub fn stop(self) -> Option<Queue> {
        self.stop_flag.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_evt.write(1) {
            // The flag alone stops it at its next wake-up; log and wait.
            log::error!("virtio-blk: could not signal the worker to stop: {e}");
        }
        match self.handle.join() {
            Ok(queue) => Some(queue),
            Err(_) => {
                log::error!("virtio-blk: the worker thread panicked");
                None
            }
        }
    }
}

fn run(mut args: WorkerArgs, epoll: &Epoll, stop: &AtomicBool) -> Queue {
    // Requests made available before activation (e.g. when resuming a
    // snapshot) get no new notification: look once before waiting.
    process_queue(&mut args, stop);
    let mut events = [EpollEvent::default(); 2];
    while !stop.load(Ordering::SeqCst) {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-blk: epoll_wait failed, the device stops: {e}");
                break;
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_QUEUE => {
                    // Non-blocking: a spurious wake-up reads EAGAIN, which is fine.
                    let _ = args.queue_evt.read();
                    process_queue(&mut args, stop);
                }
                _ => return args.queue,
            }
        }
    }
    args.queue
}

/// Serves every available request, then interrupts the guest once.
fn process_queue(args: &mut WorkerArgs, stop: &AtomicBool) {
    let mut used = false;
    while !stop.load(Ordering::SeqCst) {
        let Some(chain) = args.queue.pop_descriptor_chain(&args.mem) else {
            break;
        };
        let head = chain.head_index();
        let done = request::process(chain, &args.mem, &args.disk, args.read_only);
        match args.queue.add_used(&args.mem, head, done.written) {
            Ok(()) => used = true,
            Err(e) => log::warn!("virtio-blk: could not return descriptor {head}: {e}"),
        }
    }
    if !used {
        return;
    }
    match args.queue.needs_notification(&args.mem) {
        Ok(false) => {}
        Ok(true) | Err(_) => {
            if let Err(e) = args.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                log::error!("virtio-blk: could not raise the interrupt: {e}");
            }
        }
    }
}
