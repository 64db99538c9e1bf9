//! The virtio-mmio transport (virtio 1.2, section 4.2.2), modern (version 2)
//! register layout only.
//!
//! [`MmioTransport`] decodes the guest's accesses to one 4 KiB MMIO window:
//! feature negotiation, the device status state machine, queue setup and
//! interrupt acknowledgement, and delegates the device-specific
//! configuration space (offset `0x100` on) to the [`VirtioDevice`]. When the
//! driver sets `DRIVER_OK` it validates the queues the driver registered and
//! activates the device with them.
//!
//! Every register write is guest-controlled input: a write that makes no
//! sense is ignored (and logged), and a queue layout that cannot be used
//! puts the device in `DEVICE_NEEDS_RESET` instead of activating it.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateArgs, IrqTrigger, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_MMIO_INT_CONFIG};
use crate::vmm::memory::GuestMemory;

/// Offset of the `QueueNotify` register: register each of
/// [`MmioTransport::queue_evts`] as a KVM ioeventfd at `base + MMIO_NOTIFY_OFFSET`,
/// 4 bytes wide, with the queue's index as datamatch.
pub const MMIO_NOTIFY_OFFSET: u64 = 0x50;
/// Size of one device's MMIO window.
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;

/// "virt" in little-endian.
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio layout.
const MMIO_VERSION: u32 = 2;
/// We are no registered vendor.
const VENDOR_ID: u32 = 0;
/// Where the device-specific configuration space starts.
const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// The largest queue size virtio allows.
const MAX_QUEUE_SIZE: u16 = 32768;

// Register offsets (virtio 1.2, table 4.1).
const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = MMIO_NOTIFY_OFFSET;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_SHM_SEL: u64 = 0x0ac;
const REG_SHM_LEN_LOW: u64 = 0x0b0;
const REG_SHM_LEN_HIGH: u64 = 0x0b4;
const REG_SHM_BASE_LOW: u64 = 0x0b8;
const REG_SHM_BASE_HIGH: u64 = 0x0bc;
const REG_CONFIG_GENERATION: u64 = 0x0fc;

/// Status bits a driver may set.
const DRIVER_STATUS_BITS: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE
    | VIRTIO_CONFIG_S_DRIVER
    | VIRTIO_CONFIG_S_FEATURES_OK
    | VIRTIO_CONFIG_S_DRIVER_OK
    | VIRTIO_CONFIG_S_FAILED;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue's notification eventfd could not be created.
    #[error("could not create the notification eventfd of queue {queue}: {source}; the process may have run out of file descriptors (raise RLIMIT_NOFILE)")]
    EventFd {
        /// The queue's index.
        queue: usize,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The device declares a queue size virtio does not allow.
    #[error("the device declares queue {queue} with maximum size {size}; a virtio queue size must be a power of two between 1 and 32768 (a bug in the device model)")]
    InvalidQueueMaxSize {
        /// The queue's index.
        queue: usize,
        /// The declared size.
        size: u16,
    },
    /// A saved transport state does not fit the device it is restored onto.
    #[error("the saved state of a virtio-mmio device does not fit the device: {0}; the snapshot belongs to another machine configuration")]
    StateMismatch(String),
    /// The restored device could not be started.
    #[error("the restored virtio device (type {device_type}) could not be started: {reason}")]
    Restore {
        /// The virtio device type.
        device_type: u32,
        /// Why.
        reason: String,
    },
}

/// One queue's registers as the driver programmed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegs {
    /// The largest size the device supports (`QueueNumMax`).
    pub max_size: u16,
    /// The size the driver chose (`QueueNum`).
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Guest-physical address of the descriptor table (`QueueDesc`).
    pub desc_table: u64,
    /// Guest-physical address of the available ring (`QueueDriver`).
    pub avail_ring: u64,
    /// Guest-physical address of the used ring (`QueueDevice`).
    pub used_ring: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ready: false,
            desc_table: 0,
            avail_ring: 0,
            used_ring: 0,
        }
    }
}

/// Everything the transport itself remembers (the interrupt status lives in
/// the [`IrqTrigger`], queue positions in the device once it is active).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The `Status` register.
    pub device_status: u32,
    /// `DeviceFeaturesSel`: which 32-bit word `DeviceFeatures` shows.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`: which 32-bit word `DriverFeatures` writes.
    pub driver_features_sel: u32,
    /// The features the driver wrote (validated when it sets `FEATURES_OK`).
    pub acked_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// One entry per device queue.
    pub queues: Vec<QueueRegs>,
    /// Whether the device was activated since the last reset.
    pub activated: bool,
}

impl MmioTransportState {
    fn new(queue_max_sizes: &[u16]) -> Self {
        Self {
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            queues: queue_max_sizes.iter().map(|&m| QueueRegs::new(m)).collect(),
            activated: false,
        }
    }
}

/// Where a queue's rings stood when the device was quiesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePosition {
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The next used-ring entry the device will fill.
    pub next_used: u16,
}

/// A transport's saved state: registers, interrupt status and, for an
/// active device, its queues' positions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    /// The virtio device type (checked on restore).
    pub device_type: u32,
    /// The registers.
    pub regs: MmioTransportState,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
    /// One entry per queue if the device was active, else empty.
    pub queues: Vec<QueuePosition>,
}

/// A virtio device behind one virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: Arc<IrqTrigger>,
    queue_evts: Vec<EventFd>,
    state: MmioTransportState,
    /// The queues of a device stopped by [`MmioTransport::pause`].
    paused_queues: Option<Vec<Queue>>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`, creating one notification eventfd per queue.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
    ) -> Result<Self, MmioError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        for (queue, &size) in max_sizes.iter().enumerate() {
            if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
                return Err(MmioError::InvalidQueueMaxSize { queue, size });
            }
        }
        let queue_evts = (0..max_sizes.len())
            .map(|queue| {
                EventFd::new(EFD_NONBLOCK).map_err(|source| MmioError::EventFd { queue, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            irq,
            queue_evts,
            state: MmioTransportState::new(&max_sizes),
            paused_queues: None,
        })
    }

    /// Stops the device (see [`VirtioDevice::quiesce`]) and returns the
    /// transport's state. Call with the vCPUs stopped. [`resume`](Self::resume)
    /// starts the device again.
    pub fn pause(&mut self) -> MmioSnapshot {
        let queues = match self.paused_queues.take() {
            Some(queues) => queues,
            None if self.state.activated => self.device.quiesce(),
            None => Vec::new(),
        };
        let snapshot = MmioSnapshot {
            device_type: self.device.device_type(),
            regs: self.state.clone(),
            interrupt_status: self.irq.status(),
            queues: queues
                .iter()
                .map(|q| QueuePosition {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
        };
        self.paused_queues = Some(queues);
        snapshot
    }

    /// Starts a device stopped by [`pause`](Self::pause) again.
    pub fn resume(&mut self) {
        if let Some(queues) = self.paused_queues.take() {
            if self.state.activated && !queues.is_empty() {
                self.state.activated = false;
                if let Err(reason) = self.start(queues) {
                    log::error!("virtio-mmio: restarting a paused device failed: {reason}");
                    self.needs_reset();
                }
            }
        }
    }

    /// A transport for `device` in the state `snapshot` recorded; an active
    /// device is started with its queues where they were.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq: Arc<IrqTrigger>,
        snapshot: &MmioSnapshot,
    ) -> Result<Self, MmioError> {
        let device_type = device.device_type();
        let mut t = Self::new(device, mem, irq)?;
        let mismatch = |what: String| Err(MmioError::StateMismatch(what));
        if snapshot.device_type != device_type {
            return mismatch(format!(
                "saved device type {}, restored onto type {device_type}",
                snapshot.device_type
            ));
        }
        let max_sizes: Vec<u16> = snapshot.regs.queues.iter().map(|q| q.max_size).collect();
        if max_sizes != t.device.queue_max_sizes() {
            return mismatch(format!(
                "saved queue sizes {max_sizes:?}, the device has {:?}",
                t.device.queue_max_sizes()
            ));
        }
        let activated = snapshot.regs.activated;
        if activated && snapshot.queues.len() != max_sizes.len() {
            return mismatch(format!(
                "{} saved queue positions for {} queues",
                snapshot.queues.len(),
                max_sizes.len()
            ));
        }
        if snapshot.regs.acked_features & !t.device.device_features() != 0 {
            return mismatch(format!(
                "saved features {:#x} include some the device does not offer ({:#x})",
                snapshot.regs.acked_features,
                t.device.device_features()
            ));
        }
        t.state = snapshot.regs.clone();
        t.state.activated = false;
        t.irq.set_status(snapshot.interrupt_status);
        if t.state.device_status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            t.device.set_acked_features(t.state.acked_features);
        }
        if activated {
            let restore_err = |reason| MmioError::Restore {
                device_type,
                reason,
            };
            let mut queues = t.build_queues().map_err(restore_err)?;
            for (q, pos) in queues.iter_mut().zip(&snapshot.queues) {
                q.set_next_avail(pos.next_avail);
                q.set_next_used(pos.next_used);
            }
            t.start(queues).map_err(restore_err)?;
        }
        Ok(t)
    }

    /// The queues' notification eventfds, in queue order. The VM registers
    /// each as an ioeventfd for a 4-byte write of the queue's index to
    /// `base + MMIO_NOTIFY_OFFSET`; the device's worker waits on clones of them.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The transport's register state.
    pub fn state(&self) -> &MmioTransportState {
        &self.state
    }

    /// The device behind the transport.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Whether the driver has activated the device since the last reset.
    pub fn is_activated(&self) -> bool {
        self.state.activated
    }

    /// A vCPU read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 {
            log::warn!(
                "virtio-mmio: ignoring a {}-byte read of register {offset:#x} (registers are 4 bytes)",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.device.device_features() as u32,
                1 => (self.device.device_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.irq.status(),
            REG_STATUS => self.state.device_status,
            // No shared memory regions: every region reads as length -1.
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.state.config_generation,
            _ => {
                log::warn!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A vCPU write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::warn!(
                "virtio-mmio: ignoring a {}-byte write to register {offset:#x} (registers are 4 bytes)",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            REG_DRIVER_FEATURES => self.write_driver_features(value),
            REG_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            REG_QUEUE_SEL => self.state.queue_sel = value,
            REG_QUEUE_NUM => self.write_queue(offset, |q| match u16::try_from(value) {
                Ok(size) => q.size = size,
                // Out of u16 range: make it invalid (0) so activation refuses it.
                Err(_) => q.size = 0,
            }),
            REG_QUEUE_READY => self.write_queue(offset, |q| q.ready = value == 1),
            REG_QUEUE_DESC_LOW => self.write_queue(offset, |q| set_low(&mut q.desc_table, value)),
            REG_QUEUE_DESC_HIGH => self.write_queue(offset, |q| set_high(&mut q.desc_table, value)),
            REG_QUEUE_DRIVER_LOW => self.write_queue(offset, |q| set_low(&mut q.avail_ring, value)),
            REG_QUEUE_DRIVER_HIGH => {
                self.write_queue(offset, |q| set_high(&mut q.avail_ring, value))
            }
            REG_QUEUE_DEVICE_LOW => self.write_queue(offset, |q| set_low(&mut q.used_ring, value)),
            REG_QUEUE_DEVICE_HIGH => {
                self.write_queue(offset, |q| set_high(&mut q.used_ring, value))
            }
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.irq.ack(value),
            REG_STATUS => self.write_status(value),
            // We have no shared memory regions; selecting one is harmless.
            REG_SHM_SEL => {}
            _ => log::warn!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn selected_queue(&self) -> Option<&QueueRegs> {
        self.state.queues.get(self.state.queue_sel as usize)
    }

    fn status_has(&self, bits: u32) -> bool {
        self.state.device_status & bits == bits
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features can only change between DRIVER and FEATURES_OK.
        if !self.status_has(VIRTIO_CONFIG_S_DRIVER)
            || self.state.device_status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED)
                != 0
        {
            log::warn!(
                "virtio-mmio: ignoring a DriverFeatures write in device status {:#x}",
                self.state.device_status
            );
            return;
        }
        let acked = &mut self.state.acked_features;
        match self.state.driver_features_sel {
            0 => *acked = (*acked & !0xffff_ffff) | u64::from(value),
            1 => *acked = (*acked & 0xffff_ffff) | (u64::from(value) << 32),
            sel if value != 0 => {
                log::warn!("virtio-mmio: driver acked features {value:#x} in unknown word {sel}")
            }
            _ => {}
        }
    }

    /// Applies `f` to the selected queue's registers if the driver may
    /// configure queues now (after FEATURES_OK, before DRIVER_OK).
    fn write_queue(&mut self, offset: u64, f: impl FnOnce(&mut QueueRegs)) {
        let status = self.state.device_status;
        let mask = VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
            | VIRTIO_CONFIG_S_FAILED
            | VIRTIO_CONFIG_S_NEEDS_RESET;
        if status & mask != VIRTIO_CONFIG_S_FEATURES_OK {
            log::warn!(
                "virtio-mmio: ignoring a write to queue register {offset:#x} in device status {status:#x}"
            );
            return;
        }
        let sel = self.state.queue_sel;
        match self.state.queues.get_mut(sel as usize) {
            Some(q) => f(q),
            None => log::warn!(
                "virtio-mmio: ignoring a write to queue register {offset:#x} of nonexistent queue {sel}"
            ),
        }
    }

    /// A `QueueNotify` that reached us as an MMIO exit rather than through
    /// the ioeventfd: signal the queue's eventfd ourselves.
    fn notify(&self, queue: u32) {
        match self.queue_evts.get(queue as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: could not signal queue {queue}: {e}");
                }
            }
            None => log::warn!("virtio-mmio: notify for nonexistent queue {queue}"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.state.device_status;
        // DEVICE_NEEDS_RESET belongs to the device: a driver that writes back
        // what it read (Linux ORs new bits into the current value) may echo it.
        let old_driver = old & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let new = value & !VIRTIO_CONFIG_S_NEEDS_RESET;
        let valid = new & !DRIVER_STATUS_BITS == 0
            && new & old_driver == old_driver
            && (new & VIRTIO_CONFIG_S_DRIVER == 0 || new & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0)
            && (new & VIRTIO_CONFIG_S_FEATURES_OK == 0 || new & VIRTIO_CONFIG_S_DRIVER != 0)
            && (new & VIRTIO_CONFIG_S_DRIVER_OK == 0 || new & VIRTIO_CONFIG_S_FEATURES_OK != 0);
        if !valid {
            log::warn!(
                "virtio-mmio: ignoring invalid device status transition {old:#x} -> {value:#x}"
            );
            return;
        }
        let added = new & !old_driver;
        let mut status = old | added;

        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            log::warn!(
                "virtio-mmio: the guest driver gave up on device type {} (status {status:#x})",
                self.device.device_type()
            );
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0 && !self.accept_features() {
            status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                // DRIVER_OK cannot stand without FEATURES_OK.
                log::warn!("virtio-mmio: ignoring DRIVER_OK set together with refused features");
                status &= !VIRTIO_CONFIG_S_DRIVER_OK;
            }
        }
        self.state.device_status = status;

        let activate = added & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && status
                & (VIRTIO_CONFIG_S_DRIVER_OK
                    | VIRTIO_CONFIG_S_FAILED
                    | VIRTIO_CONFIG_S_NEEDS_RESET)
                == VIRTIO_CONFIG_S_DRIVER_OK
            && !self.state.activated;
        if activate {
            self.activate();
        }
    }

    /// Validates the driver's features when it sets FEATURES_OK and passes
    /// them to the device. Refusing leaves FEATURES_OK clear, which the
    /// driver reads back as "feature negotiation failed".
    fn accept_features(&mut self) -> bool {
        let offered = self.device.device_features();
        let acked = self.state.acked_features;
        if acked & !offered != 0 {
            log::warn!(
                "virtio-mmio: refusing driver features {acked:#x}: not offered by the device ({offered:#x})"
            );
            return false;
        }
        if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
            log::warn!("virtio-mmio: refusing a legacy driver (VIRTIO_F_VERSION_1 not acked)");
            return false;
        }
        self.device.set_acked_features(acked);
        true
    }

    /// Builds the queues from the registers and hands them to the device;
    /// anything wrong marks the device DEVICE_NEEDS_RESET.
    fn activate(&mut self) {
        let queues = match self.build_queues() {
            Ok(q) => q,
            Err(reason) => {
                log::warn!(
                    "virtio-mmio: the guest driver set up an unusable queue for device type {}: {reason}",
                    self.device.device_type()
                );
                self.needs_reset();
                return;
            }
        };
        if let Err(reason) = self.start(queues) {
            log::error!("virtio-mmio: {reason}");
            self.needs_reset();
        }
    }

    /// Hands the device its queues and the notification fds.
    fn start(&mut self, queues: Vec<Queue>) -> Result<(), String> {
        let queue_evts = self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("could not duplicate the queue eventfds: {e}"))?;
        let args = ActivateArgs {
            mem: self.mem.clone(),
            irq: self.irq.clone(),
            queues,
            queue_evts,
        };
        self.device.activate(args).map_err(|e| {
            format!(
                "activating device type {} failed: {e}",
                self.device.device_type()
            )
        })?;
        self.state.activated = true;
        Ok(())
    }

    fn build_queues(&self) -> Result<Vec<Queue>, String> {
        let event_idx = self.state.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        self.state
            .queues
            .iter()
            .enumerate()
            .map(|(i, regs)| {
                if !regs.ready {
                    return Err(format!("queue {i} is not ready"));
                }
                let mut q = Queue::new(regs.max_size)
                    .map_err(|e| format!("queue {i}: maximum size {}: {e}", regs.max_size))?;
                q.try_set_size(regs.size)
                    .map_err(|e| format!("queue {i}: size {}: {e}", regs.size))?;
                q.try_set_desc_table_address(GuestAddress(regs.desc_table))
                    .map_err(|e| {
                        format!("queue {i}: descriptor table {:#x}: {e}", regs.desc_table)
                    })?;
                q.try_set_avail_ring_address(GuestAddress(regs.avail_ring))
                    .map_err(|e| {
                        format!("queue {i}: available ring {:#x}: {e}", regs.avail_ring)
                    })?;
                q.try_set_used_ring_address(GuestAddress(regs.used_ring))
                    .map_err(|e| format!("queue {i}: used ring {:#x}: {e}", regs.used_ring))?;
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    return Err(format!("queue {i}: rings outside guest memory"));
                }
                Ok(q)
            })
            .collect()
    }

    /// Sets DEVICE_NEEDS_RESET and tells the driver (configuration change
    /// interrupt, as virtio 1.2 section 2.1.2 asks).
    fn needs_reset(&mut self) {
        self.state.device_status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if let Err(e) = self.irq.trigger(VIRTIO_MMIO_INT_CONFIG) {
            log::error!("virtio-mmio: could not raise the configuration interrupt: {e}");
        }
    }

    /// The driver wrote 0 to `Status`.
    fn reset(&mut self) {
        if self.state.activated && !self.device.reset() {
            log::error!(
                "virtio-mmio: device type {} cannot be reset; it needs a reset that never comes",
                self.device.device_type()
            );
            self.needs_reset();
            return;
        }
        self.state = MmioTransportState::new(self.device.queue_max_sizes());
        self.irq.set_status(0);
        // Drop notifications that arrived before the reset.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
    }
}

fn set_low(addr: &mut u64, value: u32) {
    *addr = (*addr & !0xffff_ffff) | u64::from(value);
}

fn set_high(addr: &mut u64, value: u32) {
    *addr = (*addr & 0xffff_ffff) | (u64::from(value) << 32);
}

#[cfg(test)]
mod tests;
