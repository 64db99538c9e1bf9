//! The thread that runs an active vsock device: it waits (epoll) on the
//! three queue eventfds, the connector's wake eventfd, a stop eventfd and
//! the host ends of the connections, and moves packets between the
//! queues and the [`Muxer`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use virtio_queue::{Queue, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::{self, EVENT_SIZE, EVENT_TRANSPORT_RESET, MAX_PKT_DATA, PKT_HEADER_SIZE};
use super::{Request, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use crate::vmm::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::vmm::memory::GuestMemory;

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_EVENT: u64 = 2;
const TOKEN_WAKE: u64 = 3;
const TOKEN_STOP: u64 = 4;
/// Connection tokens start here.
const FIRST_CONN_TOKEN: u64 = 16;

/// Everything the worker thread owns while it runs.
pub(super) struct WorkerArgs {
    pub mem: GuestMemory,
    pub irq: Arc<IrqTrigger>,
    /// rx, tx, event, in that order.
    pub queues: Vec<Queue>,
    pub queue_evts: Vec<EventFd>,
    pub requests: Receiver<Request>,
    pub wake: EventFd,
    pub guest_cid: u64,
    /// Send a transport reset event as soon as the driver lets us.
    pub transport_reset: bool,
}

/// A running worker thread and the means to stop it.
pub(super) struct Worker {
    stop_evt: EventFd,
    stop_flag: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Queue>>,
}

impl Worker {
    /// Starts the thread.
    pub fn spawn(args: WorkerArgs) -> std::io::Result<Self> {
        let stop_evt = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop_evt = stop_evt.try_clone()?;
        let epoll = Epoll::new()?;
        let fixed = [
            (args.queue_evts[RX_QUEUE].as_raw_fd(), TOKEN_RX),
            (args.queue_evts[TX_QUEUE].as_raw_fd(), TOKEN_TX),
            (args.queue_evts[EVENT_QUEUE].as_raw_fd(), TOKEN_EVENT),
            (args.wake.as_raw_fd(), TOKEN_WAKE),
            (thread_stop_evt.as_raw_fd(), TOKEN_STOP),
        ];
        for (fd, token) in fixed {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let stop_flag = Arc::new(AtomicBool::new(false));
        let thread_flag = stop_flag.clone();
        let handle = std::thread::Builder::new()
            .name("dormouse-vsock".to_owned())
            .spawn(move || {
                // Keep the stop eventfd open as long as epoll watches it.
                let _stop_evt = thread_stop_evt;
                let mut state = Run::new(args, epoll);
                state.run(&thread_flag);
                state.args.queues
            })?;
        Ok(Self {
            stop_evt,
            stop_flag,
            handle,
        })
    }

    /// Stops the thread and waits for it; every host end is closed by then.
    /// Returns the queues with the positions they reached.
    pub fn stop(self) -> Option<Vec<Queue>> {
        self.stop_flag.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_evt.write(1) {
            // The flag alone stops it at its next wake-up; log and wait.
            log::error!("virtio-vsock: could not signal the worker to stop: {e}");
        }
        match self.handle.join() {
            Ok(queues) => Some(queues),
            Err(_) => {
                log::error!("virtio-vsock: the worker thread panicked");
                None
            }
        }
    }
}

/// The worker's state.
struct Run {
    args: WorkerArgs,
    epoll: Epoll,
    muxer: Muxer,
    /// A transport reset event waits for an event buffer.
    event_pending: bool,
    /// Payload copies between guest memory and sockets.
    scratch: Vec<u8>,
}

impl Run {
    fn new(args: WorkerArgs, epoll: Epoll) -> Self {
        let muxer = Muxer::new(args.guest_cid, FIRST_CONN_TOKEN);
        let event_pending = args.transport_reset;
        Self {
            args,
            epoll,
            muxer,
            event_pending,
            scratch: vec![0; MAX_PKT_DATA as usize],
        }
    }

    fn run(&mut self, stop: &AtomicBool) {
        // Buffers made available before activation (e.g. when resuming a
        // snapshot) get no new notification: look once before waiting.
        self.process();
        let mut events = [EpollEvent::default(); 32];
        while !stop.load(Ordering::SeqCst) {
            let timeout = self.epoll_timeout();
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("virtio-vsock: epoll_wait failed, the device stops: {e}");
                    break;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    TOKEN_RX => drain_evt(&self.args.queue_evts[RX_QUEUE]),
                    TOKEN_TX => drain_evt(&self.args.queue_evts[TX_QUEUE]),
                    TOKEN_EVENT => drain_evt(&self.args.queue_evts[EVENT_QUEUE]),
                    TOKEN_WAKE => {
                        drain_evt(&self.args.wake);
                        self.take_requests();
                    }
                    TOKEN_STOP => return,
                    token => self
                        .muxer
                        .on_host_event(token, event.event_set(), &mut self.scratch),
                }
            }
            self.process();
        }
    }

    /// Milliseconds until the next connection deadline (-1: none).
    fn epoll_timeout(&self) -> i32 {
        match self.muxer.next_deadline() {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Round up so we never wake just before the deadline.
                let ms = left.as_micros().div_ceil(1000);
                i32::try_from(ms).unwrap_or(i32::MAX)
            }
        }
    }

    fn take_requests(&mut self) {
        loop {
            match self.args.requests.try_recv() {
                Ok(Request::Connect(req)) => self.muxer.host_connect(req, Instant::now()),
                Ok(Request::TransportReset) => {
                    self.muxer.transport_reset();
                    self.event_pending = true;
                }
                // Disconnected: the device is stopping us.
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Moves every packet that can move, then interrupts the guest once if
    /// any queue got used entries.
    fn process(&mut self) {
        let mut used = [false; 3];
        self.muxer.on_timer(Instant::now());
        loop {
            let tx = self.process_tx();
            self.muxer.settle(&self.epoll, Instant::now());
            let rx = self.process_rx();
            self.muxer.settle(&self.epoll, Instant::now());
            used[TX_QUEUE] |= tx;
            used[RX_QUEUE] |= rx;
            if !tx && !rx {
                break;
            }
        }
        used[EVENT_QUEUE] = self.process_event();
        self.notify(used);
    }

    /// Handles the guest's packets until the TX queue is empty or answers
    /// pile up; returns whether any chain was used.
    fn process_tx(&mut self) -> bool {
        let mem = &self.args.mem;
        let mut used = false;
        while !self.muxer.ctrl_full() {
            let Some(mut chain) = self.args.queues[TX_QUEUE].pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match packet::parse_tx(mem, &mut chain) {
                Ok(pkt) => {
                    // At most MAX_PKT_DATA, the scratch size: the parser checked.
                    let len = pkt
                        .data
                        .as_ref()
                        .map_or(0, |d| d.len())
                        .min(self.scratch.len());
                    let data = &mut self.scratch[..len];
                    let copied = pkt.data.as_ref().map_or(0, |d| d.copy_to(data));
                    self.muxer.on_guest_packet(&pkt.header, &data[..copied]);
                }
                Err(bad) => {
                    log::debug!(
                        "virtio-vsock: dropping a malformed TX packet: {}",
                        bad.reason
                    );
                    self.muxer.on_malformed(bad.header.as_ref());
                }
            }
            if let Err(e) = self.args.queues[TX_QUEUE].add_used(mem, head, 0) {
                log::warn!("virtio-vsock: could not return TX descriptor {head}: {e}");
            }
            used = true;
        }
        used
    }

    /// Fills RX buffers with pending packets; returns whether any was used.
    fn process_rx(&mut self) -> bool {
        let mem = &self.args.mem;
        let mut used = false;
        while self.muxer.has_rx() {
            let Some(mut chain) = self.args.queues[RX_QUEUE].pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match VsockPacket::from_rx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(mut pkt) => match self.muxer.fill_rx(pkt.data_slice()) {
                    Some(hdr) => match pkt.set_header_from_raw(&hdr.to_bytes()) {
                        Ok(()) => PKT_HEADER_SIZE as u32 + hdr.len,
                        Err(e) => {
                            log::error!("virtio-vsock: could not write a packet header: {e}");
                            0
                        }
                    },
                    None => 0,
                },
                Err(e) => {
                    log::debug!("virtio-vsock: skipping a malformed RX buffer: {e}");
                    0
                }
            };
            if let Err(e) = self.args.queues[RX_QUEUE].add_used(mem, head, len) {
                log::warn!("virtio-vsock: could not return RX descriptor {head}: {e}");
            }
            used = true;
        }
        used
    }

    /// Delivers a pending transport reset event; returns whether an event
    /// buffer was used.
    fn process_event(&mut self) -> bool {
        let mem = &self.args.mem;
        let mut used = false;
        while self.event_pending {
            let queue = &mut self.args.queues[EVENT_QUEUE];
            let Some(mut chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.next() {
                Some(desc) if desc.is_write_only() && desc.len() >= EVENT_SIZE => mem
                    .write_slice(&EVENT_TRANSPORT_RESET.to_le_bytes(), desc.addr())
                    .map_or(0, |()| EVENT_SIZE),
                _ => 0,
            };
            if written == 0 {
                log::debug!("virtio-vsock: skipping a malformed event buffer");
            }
            if let Err(e) = queue.add_used(mem, head, written) {
                log::warn!("virtio-vsock: could not return event descriptor {head}: {e}");
            }
            used = true;
            self.event_pending = written == 0;
        }
        used
    }

    fn notify(&mut self, used: [bool; 3]) {
        let mem = &self.args.mem;
        let mut raise = false;
        for (queue, used) in self.args.queues.iter_mut().zip(used) {
            if used {
                // An error reading the ring's flags: interrupt to be safe.
                raise |= queue.needs_notification(mem).unwrap_or(true);
            }
        }
        if raise {
            if let Err(e) = self.args.irq.trigger(VIRTIO_MMIO_INT_VRING) {
                log::error!("virtio-vsock: could not raise the interrupt: {e}");
            }
        }
    }
}

/// Resets a non-blocking eventfd (a spurious wake-up reads EAGAIN: fine).
fn drain_evt(evt: &EventFd) {
    let _ = evt.read();
}
