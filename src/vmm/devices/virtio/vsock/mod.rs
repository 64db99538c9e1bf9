//! virtio-vsock (virtio 1.2, section 5.10), emulated in the VMM: the host
//! side of every connection is a Unix socket in this process, no vhost and
//! no socket file.
//!
//! [`Vsock::new`] gives the device and a [`VsockConnector`]. The device goes
//! to the MMIO transport; the connector stays with the host code, which
//! calls [`VsockConnector::connect`] to open a stream to a guest port and
//! gets back one end of a `UnixStream` pair: bytes written to it reach the
//! guest socket, the guest's bytes can be read from it, closing it closes
//! the connection.
//!
//! Three queues of [`QUEUE_SIZE`] entries: rx (host to guest), tx (guest to
//! host) and event. Features: `VERSION_1` only (stream sockets, no
//! `SEQPACKET`). The configuration space holds the guest's CID.
//!
//! A worker thread (`dormouse-vsock`), started by
//! [`activate`](VirtioDevice::activate) and stopped by
//! [`reset`](VirtioDevice::reset) and `Drop`, does all the work; stopping it
//! closes every host end, whose readers see EOF. Flow control is the
//! protocol's credit scheme with bounded buffers per connection (see
//! [`CONN_BUF_SIZE`]): a slow host reader stalls the guest, not our memory.
//!
//! Guest-initiated connections to the host are refused (RST) for now: no
//! host listeners exist yet.
//!
//! After a snapshot is restored the guest's sockets refer to connections
//! this process never had: call [`Vsock::send_transport_reset`] (or
//! [`VsockConnector::send_transport_reset`]) so the guest drops them and
//! the host side reconnects.

mod connection;
mod muxer;
mod packet;
mod worker;

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateArgs, VirtioDevice, VirtioError, TYPE_VSOCK, VIRTIO_F_VERSION_1};
pub use connection::CONN_BUF_SIZE;
use muxer::ConnectRequest;
pub use muxer::{HOST_PORT_BASE, MAX_CONNECTIONS};
use worker::{Worker, WorkerArgs};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (packets from the host to the guest).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (packets from the guest to the host).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (transport reset events).
pub const EVENT_QUEUE: usize = 2;
/// The CID the guest gets unless told otherwise (the first one not reserved).
pub const DEFAULT_GUEST_CID: u64 = 3;

const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];
/// `struct virtio_vsock_config`: `le64 guest_cid`.
const CONFIG_LEN: usize = 8;
/// How much longer than its timeout a `connect` waits for the worker's
/// answer before giving up on it.
const REPLY_GRACE: Duration = Duration::from_secs(1);

/// Errors of the vsock device and its connector.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID cannot be given to a guest.
    #[error("vsock CID {cid} is reserved (0, 1, 2 and 0xffffffff are); give the guest a CID of 3 or more, below 0xffffffff")]
    InvalidCid {
        /// The refused CID.
        cid: u64,
    },
    /// The guest driver has not activated the device (or reset it).
    #[error("the vsock device is not active: the guest's virtio-vsock driver has not started yet (or reset the device); retry once the guest has booted")]
    NotReady,
    /// Nothing listens on the port in the guest.
    #[error("the guest refused the connection to vsock port {port}: nothing listens there; start the listener in the guest first")]
    ConnectionRefused {
        /// The guest port.
        port: u32,
    },
    /// The guest did not answer in time.
    #[error("the guest did not answer a connection to vsock port {port} within {timeout:?}; check that the guest is running and not overloaded, or allow more time")]
    Timeout {
        /// The guest port.
        port: u32,
        /// The timeout that passed.
        timeout: Duration,
    },
    /// The device was reset or stopped while connecting.
    #[error("the vsock device was reset while connecting to port {port}; connect again once the guest driver is back")]
    Reset {
        /// The guest port.
        port: u32,
    },
    /// The connection table is full.
    #[error("{max} vsock connections are open, the most the device allows; close some before opening more")]
    TooManyConnections {
        /// The limit.
        max: usize,
    },
    /// The host end of a connection could not be created.
    #[error("could not create the host end of a vsock connection: {0}; the process may have run out of file descriptors (raise RLIMIT_NOFILE)")]
    Io(#[source] std::io::Error),
}

/// A message from the host side to the worker.
enum Request {
    /// Open a connection to a guest port.
    Connect(ConnectRequest),
    /// Send the guest a transport reset event, dropping every connection.
    TransportReset,
}

/// The way into a running worker.
struct Link {
    requests: mpsc::Sender<Request>,
    wake: EventFd,
}

/// What the device and its connectors share.
#[derive(Default)]
struct Shared {
    link: Mutex<LinkState>,
}

#[derive(Default)]
struct LinkState {
    /// Set while a worker runs.
    active: Option<Link>,
    /// A transport reset was asked for while no worker ran: the next one
    /// sends it.
    reset_pending: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // The state stays consistent even if a holder panicked.
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send_transport_reset(&self) {
        let mut state = self.lock();
        let sent = state.active.as_ref().is_some_and(|link| {
            link.requests.send(Request::TransportReset).is_ok() && wake(&link.wake)
        });
        if !sent {
            state.reset_pending = true;
        }
    }
}

/// Signals the worker; false if that failed.
fn wake(evt: &EventFd) -> bool {
    match evt.write(1) {
        Ok(()) => true,
        Err(e) => {
            log::error!("virtio-vsock: could not wake the device worker: {e}");
            false
        }
    }
}

/// Opens connections from the host to ports in the guest. Cheap to clone;
/// usable from any thread.
#[derive(Clone)]
pub struct VsockConnector {
    shared: Arc<Shared>,
    guest_cid: u64,
}

impl std::fmt::Debug for VsockConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockConnector")
            .field("guest_cid", &self.guest_cid)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl VsockConnector {
    /// Connects to `port` in the guest and returns the host end of the
    /// connection (a blocking `UnixStream`). Blocks until the guest accepts
    /// or refuses, or `timeout` passes: call it from a blocking context
    /// (`spawn_blocking`).
    pub fn connect(&self, port: u32, timeout: Duration) -> Result<UnixStream, VsockError> {
        let (host_end, device_end) = UnixStream::pair().map_err(VsockError::Io)?;
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let state = self.shared.lock();
            let Some(link) = state.active.as_ref() else {
                return Err(VsockError::NotReady);
            };
            let req = ConnectRequest {
                port,
                stream: device_end,
                reply,
                timeout,
                deadline: Instant::now().checked_add(timeout),
            };
            if link.requests.send(Request::Connect(req)).is_err() || !wake(&link.wake) {
                return Err(VsockError::NotReady);
            }
        }
        match answer.recv_timeout(timeout.saturating_add(REPLY_GRACE)) {
            Ok(Ok(())) => Ok(host_end),
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Err(VsockError::Timeout { port, timeout }),
            // The worker stopped with our request unanswered.
            Err(RecvTimeoutError::Disconnected) => Err(VsockError::Reset { port }),
        }
    }

    /// Whether the device is active, i.e. `connect` can succeed.
    pub fn is_ready(&self) -> bool {
        self.shared.lock().active.is_some()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Sends the guest a `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event and
    /// drops every connection (their host ends see EOF). If the device is
    /// not active, the event is sent as soon as it is.
    pub fn send_transport_reset(&self) {
        self.shared.send_transport_reset();
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    acked_features: u64,
    shared: Arc<Shared>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("acked_features", &self.acked_features)
            .field("running", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device giving the guest CID `guest_cid`, and the connector the host
    /// opens connections with.
    pub fn new(guest_cid: u64) -> Result<(Self, VsockConnector), VsockError> {
        if guest_cid <= 2 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid { cid: guest_cid });
        }
        let shared = Arc::new(Shared::default());
        let device = Self {
            guest_cid,
            acked_features: 0,
            shared: shared.clone(),
            worker: None,
        };
        let connector = VsockConnector { shared, guest_cid };
        Ok((device, connector))
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// A connector for this device (the same as the one [`Vsock::new`] gave).
    pub fn connector(&self) -> VsockConnector {
        VsockConnector {
            shared: self.shared.clone(),
            guest_cid: self.guest_cid,
        }
    }

    /// See [`VsockConnector::send_transport_reset`].
    pub fn send_transport_reset(&self) {
        self.shared.send_transport_reset();
    }

    /// Stops the worker; returns its queues (with their positions).
    fn stop_worker(&mut self) -> Vec<virtio_queue::Queue> {
        // No new requests from here on; queued ones die with the channel
        // and their callers get `Reset`.
        self.shared.lock().active = None;
        self.worker
            .take()
            .and_then(|worker| worker.stop())
            .unwrap_or_default()
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.guest_cid.to_le_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < CONFIG_LEN)
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio-vsock: ignoring a {}-byte write to the read-only config space at {offset:#x}",
            data.len()
        );
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), VirtioError> {
        let ActivateArgs {
            mem,
            irq,
            queues,
            queue_evts,
        } = args;
        if queues.len() != QUEUE_SIZES.len() || queue_evts.len() != QUEUE_SIZES.len() {
            return Err(VirtioError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: queues.len().min(queue_evts.len()),
            });
        }
        // A second activation without a reset replaces the first worker.
        self.stop_worker();
        let (requests, receiver) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(VirtioError::Worker)?;
        let link_wake = wake.try_clone().map_err(VirtioError::Worker)?;
        let transport_reset = std::mem::take(&mut self.shared.lock().reset_pending);
        let worker = Worker::spawn(WorkerArgs {
            mem,
            irq,
            queues,
            queue_evts,
            requests: receiver,
            wake,
            guest_cid: self.guest_cid,
            transport_reset,
        });
        let worker = match worker {
            Ok(w) => w,
            Err(e) => {
                self.shared.lock().reset_pending |= transport_reset;
                return Err(VirtioError::Worker(e));
            }
        };
        self.worker = Some(worker);
        self.shared.lock().active = Some(Link {
            requests,
            wake: link_wake,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The queues (and their positions) are dropped: a reset forgets them.
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    /// Host connections do not survive: their host ends see EOF. The guest
    /// learns of it from the transport reset event sent when the device is
    /// activated again after a restore (see [`Vsock::send_transport_reset`]).
    fn quiesce(&mut self) -> Vec<virtio_queue::Queue> {
        self.stop_worker()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
