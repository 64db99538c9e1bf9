//! virtio-blk (virtio 1.2, section 5.2) over a copy-on-write [`CowDisk`].
//!
//! One request queue of [`QUEUE_SIZE`] entries, served by a worker thread
//! started at activation. Offered features: `VERSION_1`, `FLUSH`, `SEG_MAX`,
//! `BLK_SIZE` (512-byte logical blocks) and, for a read-only device, `RO`.
//! No `EVENT_IDX` and no indirect descriptors: every completion batch raises
//! one interrupt.

mod request;
mod worker;

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};

use super::{ActivateArgs, VirtioDevice, VirtioError, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::disk::CowDisk;
use worker::{Worker, WorkerArgs};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most data segments per request the device accepts (`seg_max`).
pub const SEG_MAX: u32 = 128;
/// virtio-blk's unit of addressing (`sector` and `capacity`), in bytes.
pub const SECTOR_SIZE: u64 = 512;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Bytes of `struct virtio_blk_config` we fill in: capacity (8), size_max
/// (4), seg_max (4), geometry (4), blk_size (4).
const CONFIG_LEN: usize = 24;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk has no whole sector to offer.
    #[error(
        "the disk image is {size} bytes, smaller than one 512-byte sector; give a real disk image"
    )]
    TooSmall {
        /// The disk's size in bytes.
        size: u64,
    },
}

/// A virtio block device serving a [`CowDisk`].
pub struct Block {
    disk: Arc<Mutex<CowDisk>>,
    read_only: bool,
    features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    worker: Option<Worker>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .field("acked_features", &self.acked_features)
            .field("running", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device exposing `disk` to the guest; with `read_only` the guest
    /// sees the `RO` feature and its writes fail.
    ///
    /// The disk's last `size % 512` bytes, if any, are not visible to the guest.
    pub fn new(disk: CowDisk, read_only: bool) -> Result<Self, BlockError> {
        let capacity = disk.size() / SECTOR_SIZE;
        if capacity == 0 {
            return Err(BlockError::TooSmall { size: disk.size() });
        }
        let mut features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Self {
            disk: Arc::new(Mutex::new(disk)),
            read_only,
            features,
            acked_features: 0,
            config,
            worker: None,
        })
    }

    /// The disk, shared with the worker thread. Keep a clone before handing
    /// the device to the transport to flush the disk when pausing (after
    /// the device is quiesced) or to find its files.
    pub fn disk(&self) -> Arc<Mutex<CowDisk>> {
        self.disk.clone()
    }

    /// The disk's size in 512-byte sectors, as the guest sees it.
    pub fn capacity(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.config[0..8]);
        u64::from_le_bytes(b)
    }

    /// Stops the worker; returns its queue (with its positions).
    fn stop_worker(&mut self) -> Option<virtio_queue::Queue> {
        self.worker.take().and_then(|worker| worker.stop())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field we offer is read-only (no CONFIG_WCE).
        log::debug!(
            "virtio-blk: ignoring a {}-byte config write at {offset:#x}",
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
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let (Some(queue), Some(queue_evt)) =
            (queues.into_iter().next(), queue_evts.into_iter().next())
        else {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        // A second activation without a reset replaces the first worker.
        self.stop_worker();
        let worker = Worker::spawn(WorkerArgs {
            queue,
            queue_evt,
            mem,
            irq,
            disk: self.disk.clone(),
            read_only: self.read_only,
        })
        .map_err(VirtioError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        // The queue (and its positions) is dropped: a reset forgets it.
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    fn quiesce(&mut self) -> Vec<virtio_queue::Queue> {
        // The worker finishes the request it is on before it stops.
        self.stop_worker().into_iter().collect()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests;
