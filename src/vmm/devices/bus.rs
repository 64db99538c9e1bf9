//! The bus that routes vCPU port and MMIO exits to devices.

use std::sync::{Mutex, PoisonError};

use super::serial::SerialDevice;
use super::virtio::mmio::MmioTransport;
use crate::vmm::layout::COM1_PORT;

/// i8042 command port: writing `0xfe` pulses the CPU reset line.
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET_CMD: u8 = 0xfe;

/// What a port write asks the VMM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing beyond the device's own effect.
    None,
    /// The guest asked for a CPU reset (reboot); the VM stops.
    Reset,
}

/// One virtio-mmio device window.
pub struct MmioSlot {
    /// Guest-physical base address.
    pub base: u64,
    /// Window size.
    pub size: u64,
    /// The transport behind the window.
    pub transport: Mutex<MmioTransport>,
}

/// All devices of a VM, shared by its vCPU threads.
pub struct DeviceManager {
    serial: Mutex<SerialDevice>,
    mmio: Vec<MmioSlot>,
}

impl DeviceManager {
    /// A bus with COM1 and the given virtio-mmio devices.
    pub fn new(serial: SerialDevice, mmio: Vec<MmioSlot>) -> Self {
        Self {
            serial: Mutex::new(serial),
            mmio,
        }
    }

    fn slot(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        self.mmio
            .iter()
            .find(|s| addr >= s.base && addr - s.base < s.size)
            .map(|s| (s, addr - s.base))
    }

    /// COM1's registers.
    pub fn serial_state(&self) -> super::serial::SerialSnapshot {
        super::serial::save_serial(&self.serial.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The virtio-mmio slots (for snapshotting and teardown).
    pub fn mmio_slots(&self) -> &[MmioSlot] {
        &self.mmio
    }

    /// A port read. Unknown ports read as all ones, like an empty ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (COM1_PORT..COM1_PORT + 8).contains(&port) {
            let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
            for b in data.iter_mut() {
                *b = serial.read((port - COM1_PORT) as u8);
            }
        } else if port == I8042_COMMAND_PORT {
            data.fill(0); // status: output buffer empty, input buffer empty
        } else {
            data.fill(0xff);
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        if (COM1_PORT..COM1_PORT + 8).contains(&port) {
            let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
            for b in data {
                if let Err(e) = serial.write((port - COM1_PORT) as u8, *b) {
                    log::warn!("serial write failed: {e:?}");
                }
            }
        } else if port == I8042_COMMAND_PORT && data.first() == Some(&I8042_RESET_CMD) {
            return BusAction::Reset;
        }
        BusAction::None
    }

    /// An MMIO read. Unmapped addresses read as zero.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.slot(addr) {
            Some((slot, offset)) => slot
                .transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .read(offset, data),
            None => data.fill(0),
        }
    }

    /// An MMIO write. Writes to unmapped addresses are ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.slot(addr) {
            slot.transport
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(offset, data);
        }
    }
}
