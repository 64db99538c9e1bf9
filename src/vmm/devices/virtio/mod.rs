//! Virtio devices over the virtio-mmio transport (virtio 1.x, "modern" only).
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] owns it,
//! decodes the guest's register accesses and, once the driver sets
//! `DRIVER_OK`, hands the device its queues through [`VirtioDevice::activate`].
//! Devices process their queues on a worker thread of their own, woken by the
//! per-queue ioeventfds that the transport registers with KVM, and signal the
//! guest through an [`IrqTrigger`] (an irqfd bound to the device's GSI).

pub mod block;
pub mod mmio;
pub mod vsock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::memory::GuestMemory;

/// Virtio device IDs (virtio 1.2, section 5).
pub const TYPE_BLOCK: u32 = 2;
/// Virtio device ID of the socket device.
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit every modern device offers: the device conforms to virtio 1.x.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Bits of the MMIO `InterruptStatus` register.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x1;
/// The configuration space changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x2;

/// Errors of a virtio device's activation or queue processing.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The driver activated the device with a queue layout it did not offer.
    #[error("the guest driver activated the device with {got} queues, the device has {expected}")]
    QueueCount { expected: usize, got: usize },
    /// A worker thread or eventfd could not be created.
    #[error("could not start the device worker: {0}")]
    Worker(#[source] std::io::Error),
    /// A backing file operation failed.
    #[error("device backend I/O failed: {0}")]
    Backend(#[source] std::io::Error),
}

/// Raises the device's interrupt in the guest: sets a bit of the MMIO
/// `InterruptStatus` register and signals the irqfd bound to the device's GSI.
#[derive(Debug)]
pub struct IrqTrigger {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl IrqTrigger {
    /// Wraps an irqfd that the VM has already registered for the device's GSI.
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq_evt,
        }
    }

    /// Sets `bits` in `InterruptStatus` and injects the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The current value of `InterruptStatus`.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver's write to `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Overwrites `InterruptStatus` (used by reset and snapshot restore).
    pub fn set_status(&self, value: u32) {
        self.status.store(value, Ordering::SeqCst);
    }
}

/// The queues and notification fds a device receives when the driver is ready.
pub struct ActivateArgs {
    /// Guest memory the queues live in.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub irq: Arc<IrqTrigger>,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], configured and ready.
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled (through KVM ioeventfd) when the driver
    /// writes the queue's index to `QueueNotify`.
    pub queue_evts: Vec<EventFd>,
}

/// A virtio device behind the MMIO transport.
///
/// Called from the vCPU thread that performed the register access; the
/// device's own processing runs on the worker thread started by `activate`.
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. [`TYPE_BLOCK`]).
    fn device_type(&self) -> u32;
    /// The maximum size of each of the device's queues; its length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// All feature bits the device offers (must include [`VIRTIO_F_VERSION_1`]).
    fn device_features(&self) -> u64;
    /// The feature bits the driver accepted (a subset of `device_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads `data.len()` bytes of the device-specific configuration space at `offset`.
    /// Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only or out-of-range
    /// bytes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts processing: called once, when the driver sets `DRIVER_OK`.
    fn activate(&mut self, args: ActivateArgs) -> Result<(), VirtioError>;
    /// The driver reset the device (wrote 0 to `Status`): stop the worker and
    /// drop the queues. Returns false if the device cannot be reset, in which
    /// case the transport marks it `DEVICE_NEEDS_RESET`.
    fn reset(&mut self) -> bool;
    /// Stops the device's worker so that a snapshot sees guest memory and the
    /// queues at rest, and returns the queues with their ring positions
    /// (empty if the device is not active). Requests taken from a queue are
    /// finished first. [`activate`](Self::activate) with the same queues
    /// starts the device again where it stopped.
    fn quiesce(&mut self) -> Vec<Queue>;
}
