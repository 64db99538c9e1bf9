//! Drives the device like a guest driver: a split virtqueue laid out by hand
//! in real guest memory, notifications through the queue eventfd.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::vmm::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::vmm::memory::GuestMemory;

const MEM_SIZE: usize = 1 << 20;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x2000;
const USED_RING: u64 = 0x3000;
/// Where tests put request headers, data and status bytes.
const BUFFERS: u64 = 0x10000;
const DISK_SIZE: u64 = 256 * 1024;

/// A base image whose bytes depend on their offset.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = offset + i;
            (x ^ (x >> 9) ^ 0x5a) as u8
        })
        .collect()
}

fn make_disk(dir: &Path) -> (PathBuf, CowDisk) {
    let base = dir.join("base.img");
    std::fs::write(&base, pattern(0, DISK_SIZE as usize)).unwrap();
    let disk = CowDisk::create(&base, &dir.join("overlay")).unwrap();
    (base, disk)
}

/// One descriptor as the driver writes it.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    write: bool,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: false,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        write: true,
    }
}

/// The guest driver's side of the queue.
struct Driver {
    mem: GuestMemory,
    queue_evt: EventFd,
    irq_evt: EventFd,
    irq: Arc<IrqTrigger>,
    /// Next free descriptor slot (wraps around the table).
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl Driver {
    fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC_TABLE + u64::from(index) * 16;
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(base)).unwrap();
    }

    /// Writes a chain into the descriptor table; returns its head.
    fn add_chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (self.next_desc + i as u16) % QUEUE_SIZE;
            let last = i + 1 == descs.len();
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(index, d.addr, d.len, flags, (index + 1) % QUEUE_SIZE);
        }
        self.next_desc = (self.next_desc + descs.len() as u16) % QUEUE_SIZE;
        head
    }

    /// Puts `head` in the available ring (without notifying).
    fn publish(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    fn kick(&self) {
        self.queue_evt.write(1).unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// Waits for the next used element; returns (id, len).
    fn wait_used(&mut self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() == self.used_seen {
            assert!(
                Instant::now() < deadline,
                "the device did not complete a request"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let elem = USED_RING + 4 + u64::from(self.used_seen % QUEUE_SIZE) * 8;
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        (id, len)
    }

    /// Submits one chain, kicks, waits; returns (used len, status byte).
    fn submit(&mut self, descs: &[D]) -> (u32, u8) {
        let head = self.add_chain(descs);
        self.publish(head);
        self.kick();
        let (id, len) = self.wait_used();
        assert_eq!(id, u32::from(head));
        let status_desc = descs[descs.len() - 1];
        let status: u8 = self
            .mem
            .read_obj(GuestAddress(
                status_desc.addr + u64::from(status_desc.len) - 1,
            ))
            .unwrap_or(0xff); // the status may be outside guest memory
        (len, status)
    }

    fn header(&self, addr: u64, kind: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    }

    /// A well-formed request: header at BUFFERS, data from BUFFERS + 0x1000,
    /// status at BUFFERS + 0x100. The status byte is preset to 0xff.
    fn request(&mut self, kind: u32, sector: u64, data: &[D]) -> (u32, u8) {
        self.header(BUFFERS, kind, sector);
        self.mem
            .write_obj(0xffu8, GuestAddress(BUFFERS + 0x100))
            .unwrap();
        let mut descs = vec![r(BUFFERS, 16)];
        descs.extend_from_slice(data);
        descs.push(w(BUFFERS + 0x100, 1));
        self.submit(&descs)
    }

    fn read_sectors(&mut self, sector: u64, len: u32) -> Vec<u8> {
        let data = BUFFERS + 0x1000;
        let (used, status) = self.request(VIRTIO_BLK_T_IN, sector, &[w(data, len)]);
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        assert_eq!(used, len + 1);
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, GuestAddress(data)).unwrap();
        buf
    }

    fn write_sectors(&mut self, sector: u64, bytes: &[u8]) -> u8 {
        let data = BUFFERS + 0x1000;
        self.mem.write_slice(bytes, GuestAddress(data)).unwrap();
        let (used, status) = self.request(VIRTIO_BLK_T_OUT, sector, &[r(data, bytes.len() as u32)]);
        assert_eq!(used, 1);
        status
    }
}

/// A block device activated directly (no transport) on a fresh queue.
fn start(disk: CowDisk, read_only: bool) -> (Block, Driver) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .unwrap();
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .unwrap();
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .unwrap();
    queue.set_ready(true);
    assert!(queue.is_valid(&mem));
    let queue_evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(IrqTrigger::new(irq_evt.try_clone().unwrap()));
    let mut block = Block::new(disk, read_only).unwrap();
    block.set_acked_features(block.device_features());
    block
        .activate(ActivateArgs {
            mem: mem.clone(),
            irq: irq.clone(),
            queues: vec![queue],
            queue_evts: vec![queue_evt.try_clone().unwrap()],
        })
        .unwrap();
    let driver = Driver {
        mem,
        queue_evt,
        irq_evt,
        irq,
        next_desc: 0,
        avail_idx: 0,
        used_seen: 0,
    };
    (block, driver)
}

#[test]
fn config_space_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let block = Block::new(disk, false).unwrap();
    assert_eq!(block.device_type(), 2);
    assert_eq!(block.queue_max_sizes(), &[256]);
    let f = block.device_features();
    assert_ne!(f & (1 << VIRTIO_F_VERSION_1), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_BLK_SIZE), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << 29), 0, "EVENT_IDX is not offered");

    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    assert_eq!(block.capacity(), DISK_SIZE / 512);
    let mut word = [0u8; 4];
    block.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), SEG_MAX);
    block.read_config(20, &mut word);
    assert_eq!(u32::from_le_bytes(word), 512);
    let mut byte = [0xffu8; 1];
    block.read_config(1, &mut byte);
    assert_eq!(byte[0], ((DISK_SIZE / 512) >> 8) as u8);
    let mut far = [0xffu8; 4];
    block.read_config(22, &mut far);
    assert_eq!(far, [0, 0, 0, 0]);
    block.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);

    let (_, disk) = make_disk(tempfile::tempdir().unwrap().path());
    assert_ne!(
        Block::new(disk, true).unwrap().device_features() & (1 << VIRTIO_BLK_F_RO),
        0
    );
}

#[test]
fn a_disk_smaller_than_a_sector_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("tiny.img");
    std::fs::write(&base, [0u8; 511]).unwrap();
    let disk = CowDisk::create(&base, &dir.path().join("o")).unwrap();
    assert!(matches!(
        Block::new(disk, false),
        Err(BlockError::TooSmall { size: 511 })
    ));
}

#[test]
fn reads_return_the_disk_contents_and_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    assert_eq!(drv.read_sectors(0, 4096), pattern(0, 4096));
    assert_eq!(drv.read_sectors(17, 1024), pattern(17 * 512, 1024));
    // The last sector.
    let last = DISK_SIZE / 512 - 1;
    assert_eq!(drv.read_sectors(last, 512), pattern(last * 512, 512));
    assert!(drv.irq_evt.read().unwrap() >= 1);
    assert_ne!(drv.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
}

#[test]
fn a_read_split_over_several_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    let a = BUFFERS + 0x1000;
    let b = BUFFERS + 0x8000;
    let (used, status) = drv.request(VIRTIO_BLK_T_IN, 3, &[w(a, 512), w(b, 1536)]);
    assert_eq!((used, status), (2049, VIRTIO_BLK_S_OK as u8));
    let mut buf = vec![0u8; 512];
    drv.mem.read_slice(&mut buf, GuestAddress(a)).unwrap();
    assert_eq!(buf, pattern(3 * 512, 512));
    let mut buf = vec![0u8; 1536];
    drv.mem.read_slice(&mut buf, GuestAddress(b)).unwrap();
    assert_eq!(buf, pattern(4 * 512, 1536));
}

#[test]
fn device_writes_to_guest_memory_are_recorded_in_the_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    let region = drv.mem.find_region(GuestAddress(0)).unwrap();
    let data_page = (BUFFERS + 0x1000) as usize;
    assert!(!region.bitmap().dirty_at(data_page + 0x3000));
    drv.read_sectors(0, 0x4000);
    let region = drv.mem.find_region(GuestAddress(0)).unwrap();
    for page in 0..4 {
        assert!(
            region.bitmap().dirty_at(data_page + page * 0x1000),
            "data page {page}"
        );
    }
    assert!(region.bitmap().dirty_at(USED_RING as usize), "used ring");
    assert!(
        region.bitmap().dirty_at((BUFFERS + 0x100) as usize),
        "status byte"
    );
}

#[test]
fn writes_land_in_the_overlay_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (base, disk) = make_disk(dir.path());
    let base_before = std::fs::read(&base).unwrap();
    let (block, mut drv) = start(disk, false);
    let data: Vec<u8> = (0..3 * 512).map(|i| (i * 7) as u8).collect();
    assert_eq!(drv.write_sectors(5, &data), VIRTIO_BLK_S_OK as u8);
    assert_eq!(drv.read_sectors(5, 3 * 512), data);
    assert_eq!(drv.read_sectors(4, 512), pattern(4 * 512, 512));
    assert_eq!(drv.read_sectors(8, 512), pattern(8 * 512, 512));
    assert_eq!(std::fs::read(&base).unwrap(), base_before);
    assert_eq!(block.disk().lock().unwrap().allocated_blocks(), 1);
}

#[test]
fn flushed_writes_survive_a_reopen_once_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let (base, disk) = make_disk(dir.path());
    let overlay = disk.files()[0].clone();
    let (block, mut drv) = start(disk, false);
    assert_eq!(drv.write_sectors(100, &[0xcd; 1024]), VIRTIO_BLK_S_OK as u8);
    let (used, status) = drv.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!((used, status), (1, VIRTIO_BLK_S_OK as u8));
    let sealed = block.disk().lock().unwrap().seal(1).unwrap();
    drop(block);
    let disk = CowDisk::open(&base, &overlay, sealed).unwrap();
    let mut buf = [0u8; 1024];
    disk.read_at(&mut buf, 100 * 512).unwrap();
    assert_eq!(buf, [0xcd; 1024]);
}

#[test]
fn get_id_returns_the_serial() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    let data = BUFFERS + 0x1000;
    drv.mem
        .write_slice(&[0xee; 20], GuestAddress(data))
        .unwrap();
    let (used, status) = drv.request(VIRTIO_BLK_T_GET_ID, 0, &[w(data, 20)]);
    assert_eq!((used, status), (21, VIRTIO_BLK_S_OK as u8));
    let mut id = [0u8; 20];
    drv.mem.read_slice(&mut id, GuestAddress(data)).unwrap();
    assert_eq!(&id[..8], b"dormouse");
    assert_eq!(id[8..], [0; 12]);
    // A shorter buffer gets a truncated id.
    let (used, status) = drv.request(VIRTIO_BLK_T_GET_ID, 0, &[w(data, 4)]);
    assert_eq!((used, status), (5, VIRTIO_BLK_S_OK as u8));
}

#[test]
fn unknown_request_types_are_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    for kind in [2, 11, 13, 0xdead] {
        let (used, status) = drv.request(kind, 0, &[r(BUFFERS + 0x1000, 512)]);
        assert_eq!(
            (used, status),
            (1, VIRTIO_BLK_S_UNSUPP as u8),
            "type {kind}"
        );
    }
}

#[test]
fn out_of_range_and_unaligned_requests_fail_with_ioerr() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (block, mut drv) = start(disk, false);
    let data = BUFFERS + 0x1000;
    let capacity = DISK_SIZE / 512;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    for (kind, sector, len) in [
        (VIRTIO_BLK_T_IN, capacity, 512),
        (VIRTIO_BLK_T_IN, capacity - 1, 1024),
        (VIRTIO_BLK_T_OUT, capacity - 1, 1024),
        (VIRTIO_BLK_T_IN, u64::MAX, 512),
        (VIRTIO_BLK_T_OUT, u64::MAX / 512 + 1, 512),
        (VIRTIO_BLK_T_IN, 0, 100),
        (VIRTIO_BLK_T_OUT, 0, 513),
    ] {
        let seg = if kind == VIRTIO_BLK_T_IN {
            w(data, len)
        } else {
            r(data, len)
        };
        let (used, status) = drv.request(kind, sector, &[seg]);
        assert_eq!(
            (used, status),
            (1, ioerr),
            "type {kind} sector {sector} len {len}"
        );
    }
    assert_eq!(block.disk().lock().unwrap().allocated_blocks(), 0);
    assert_eq!(drv.read_sectors(0, 512), pattern(0, 512));
}

#[test]
fn writes_to_a_read_only_device_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (block, mut drv) = start(disk, true);
    assert_eq!(drv.write_sectors(0, &[1; 512]), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(block.disk().lock().unwrap().allocated_blocks(), 0);
    assert_eq!(drv.read_sectors(0, 512), pattern(0, 512));
}

#[test]
fn malformed_chains_do_not_stop_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (block, mut drv) = start(disk, false);
    let hdr = BUFFERS;
    let data = BUFFERS + 0x1000;
    let st = BUFFERS + 0x100;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    drv.header(hdr, VIRTIO_BLK_T_IN, 0);

    // (chain, expected used len, expected status or None if untouched)
    let cases: Vec<(&str, Vec<D>, u32, Option<u8>)> = vec![
        (
            "header too short",
            vec![r(hdr, 8), w(data, 512), w(st, 1)],
            1,
            Some(ioerr),
        ),
        (
            "header writable",
            vec![w(hdr, 16), w(data, 512), w(st, 1)],
            1,
            Some(ioerr),
        ),
        (
            "read into readable data",
            vec![r(hdr, 16), r(data, 512), w(st, 1)],
            1,
            Some(ioerr),
        ),
        (
            "status readable",
            vec![r(hdr, 16), w(data, 512), r(st, 1)],
            0,
            None,
        ),
        (
            "status empty",
            vec![r(hdr, 16), w(data, 512), w(st, 0)],
            0,
            None,
        ),
        (
            "status outside memory",
            vec![r(hdr, 16), w(data, 512), w(1 << 40, 1)],
            0,
            None,
        ),
        ("only a status", vec![w(st, 1)], 1, Some(ioerr)),
        (
            "data outside memory",
            vec![r(hdr, 16), w(MEM_SIZE as u64 - 256, 512), w(st, 1)],
            1,
            Some(ioerr),
        ),
        // virtio-queue ends a chain at 4 GiB: the huge data descriptor
        // becomes the (unusable) status descriptor.
        (
            "chain over 4 GiB",
            vec![r(hdr, 16), w(data, u32::MAX), w(st, 1)],
            0,
            None,
        ),
        (
            "data larger than memory",
            vec![r(hdr, 16), w(data, 1 << 30), w(st, 1)],
            1,
            Some(ioerr),
        ),
        (
            "header outside memory",
            vec![r(u64::MAX - 8, 16), w(data, 512), w(st, 1)],
            1,
            Some(ioerr),
        ),
    ];
    for (what, chain, used_len, status) in cases {
        drv.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let (used, got) = drv.submit(&chain);
        assert_eq!(used, used_len, "{what}");
        match status {
            Some(s) => assert_eq!(got, s, "{what}"),
            None => assert_eq!(
                drv.mem.read_obj::<u8>(GuestAddress(st)).unwrap(),
                0xff,
                "{what}"
            ),
        }
        // The device still serves a good request.
        assert_eq!(drv.read_sectors(1, 512), pattern(512, 512), "after {what}");
    }

    // A write whose data descriptor is device-writable.
    drv.header(hdr, VIRTIO_BLK_T_OUT, 0);
    let (used, status) = drv.submit(&[r(hdr, 16), w(data, 512), w(st, 1)]);
    assert_eq!((used, status), (1, ioerr));
    assert_eq!(block.disk().lock().unwrap().allocated_blocks(), 0);

    // Too many segments.
    drv.header(hdr, VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![r(hdr, 16)];
    chain.extend((0..SEG_MAX + 1).map(|i| w(data + u64::from(i) * 512, 512)));
    chain.push(w(st, 1));
    let (used, _) = drv.submit(&chain);
    assert_eq!(used, 0);
    assert_eq!(drv.read_sectors(2, 512), pattern(1024, 512));
}

#[test]
fn looping_and_bogus_chains_do_not_hang_or_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    drv.header(BUFFERS, VIRTIO_BLK_T_IN, 0);
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;

    // 200 -> 201 -> 200 -> ...
    drv.write_desc(200, BUFFERS, 16, next, 201);
    drv.write_desc(201, BUFFERS + 0x1000, 512, next | write, 200);
    drv.publish(200);
    drv.kick();
    let (id, len) = drv.wait_used();
    assert_eq!((id, len), (200, 0));

    // A chain whose `next` points past the table.
    drv.write_desc(202, BUFFERS, 16, next, 4000);
    drv.publish(202);
    drv.kick();
    assert_eq!(drv.wait_used(), (202, 0));

    // An indirect descriptor (not offered) pointing at garbage.
    drv.write_desc(203, 1 << 40, 64, VRING_DESC_F_INDIRECT as u16, 0);
    drv.publish(203);
    drv.kick();
    assert_eq!(drv.wait_used(), (203, 0));

    // A head index beyond the queue: cannot be returned, must not wedge the device.
    drv.publish(1000);
    drv.kick();
    assert_eq!(drv.read_sectors(0, 512), pattern(0, 512));
}

#[test]
fn many_requests_in_one_notification_and_around_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (_block, mut drv) = start(disk, false);
    // 16 reads published together, each into its own buffer, one kick.
    let mut heads = Vec::new();
    for i in 0..16u64 {
        let hdr = BUFFERS + i * 0x20;
        drv.header(hdr, VIRTIO_BLK_T_IN, i);
        let head = drv.add_chain(&[
            r(hdr, 16),
            w(BUFFERS + 0x10000 + i * 512, 512),
            w(BUFFERS + 0x400 + i, 1),
        ]);
        drv.publish(head);
        heads.push(head);
    }
    drv.kick();
    for head in heads {
        assert_eq!(drv.wait_used(), (u32::from(head), 513));
    }
    for i in 0..16u64 {
        let mut buf = vec![0u8; 512];
        drv.mem
            .read_slice(&mut buf, GuestAddress(BUFFERS + 0x10000 + i * 512))
            .unwrap();
        assert_eq!(buf, pattern(i * 512, 512));
        assert_eq!(
            drv.mem
                .read_obj::<u8>(GuestAddress(BUFFERS + 0x400 + i))
                .unwrap(),
            0
        );
    }
    // Wrap the ring several times with writes and reads checked against a model.
    let mut model = pattern(0, DISK_SIZE as usize);
    for i in 0..700u64 {
        let sector = (i * 37) % (DISK_SIZE / 512 - 8);
        let len = 512 * (1 + i % 8) as usize;
        if i % 2 == 0 {
            let bytes: Vec<u8> = (0..len).map(|j| (i as usize + j) as u8).collect();
            assert_eq!(drv.write_sectors(sector, &bytes), VIRTIO_BLK_S_OK as u8);
            model[sector as usize * 512..sector as usize * 512 + len].copy_from_slice(&bytes);
        } else {
            assert_eq!(
                drv.read_sectors(sector, len as u32),
                model[sector as usize * 512..sector as usize * 512 + len]
            );
        }
    }
}

#[test]
fn reset_and_drop_stop_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let (mut block, mut drv) = start(disk, false);
    let disk = block.disk();
    assert_eq!(Arc::strong_count(&disk), 3, "device, worker, test");
    drv.read_sectors(0, 512);
    assert!(block.reset());
    assert_eq!(Arc::strong_count(&disk), 2, "the worker is gone");
    // Requests after the reset are not served.
    drv.header(BUFFERS, VIRTIO_BLK_T_IN, 0);
    let head = drv.add_chain(&[
        r(BUFFERS, 16),
        w(BUFFERS + 0x1000, 512),
        w(BUFFERS + 0x100, 1),
    ]);
    drv.publish(head);
    drv.kick();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(drv.used_idx(), drv.used_seen);
    assert!(block.reset(), "resetting twice is fine");

    drop(block);
    let Ok(disk) = Arc::try_unwrap(disk) else {
        panic!("only the test holds the disk");
    };
    let disk = disk.into_inner().unwrap();

    let (block, mut drv) = start(disk, false);
    drv.read_sectors(0, 512);
    let disk = block.disk();
    drop(block);
    assert_eq!(Arc::strong_count(&disk), 1, "drop joined the worker");
}

#[test]
fn end_to_end_through_the_mmio_transport() {
    use crate::vmm::devices::virtio::mmio::MmioTransport;
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = make_disk(dir.path());
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
    let irq = Arc::new(IrqTrigger::new(irq_evt.try_clone().unwrap()));
    let mut t = MmioTransport::new(
        Box::new(Block::new(disk, false).unwrap()),
        mem.clone(),
        irq.clone(),
    )
    .unwrap();
    let rd = |t: &mut MmioTransport, off: u64| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    assert_eq!(rd(&mut t, 0x8), 2);
    wr(&mut t, 0x70, 0);
    wr(&mut t, 0x70, 1);
    wr(&mut t, 0x70, 3);
    wr(&mut t, 0x14, 1);
    let hi = rd(&mut t, 0x10);
    wr(&mut t, 0x14, 0);
    let lo = rd(&mut t, 0x10);
    wr(&mut t, 0x24, 1);
    wr(&mut t, 0x20, hi);
    wr(&mut t, 0x24, 0);
    wr(&mut t, 0x20, lo);
    wr(&mut t, 0x70, 0xb);
    assert_eq!(rd(&mut t, 0x70), 0xb);
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SIZE / 512);
    wr(&mut t, 0x30, 0);
    assert_eq!(rd(&mut t, 0x34), 256);
    wr(&mut t, 0x38, 256);
    wr(&mut t, 0x80, DESC_TABLE as u32);
    wr(&mut t, 0x84, 0);
    wr(&mut t, 0x90, AVAIL_RING as u32);
    wr(&mut t, 0x94, 0);
    wr(&mut t, 0xa0, USED_RING as u32);
    wr(&mut t, 0xa4, 0);
    wr(&mut t, 0x44, 1);
    wr(&mut t, 0x70, 0xf);
    assert_eq!(rd(&mut t, 0x70), 0xf);
    assert!(t.is_activated());

    let mut drv = Driver {
        mem,
        queue_evt: t.queue_evts()[0].try_clone().unwrap(),
        irq_evt,
        irq,
        next_desc: 0,
        avail_idx: 0,
        used_seen: 0,
    };
    assert_eq!(drv.read_sectors(9, 1024), pattern(9 * 512, 1024));
    // A notify that arrives as an MMIO exit instead of the ioeventfd.
    drv.header(BUFFERS, VIRTIO_BLK_T_IN, 1);
    let head = drv.add_chain(&[
        r(BUFFERS, 16),
        w(BUFFERS + 0x1000, 512),
        w(BUFFERS + 0x100, 1),
    ]);
    drv.publish(head);
    wr(&mut t, 0x50, 0);
    assert_eq!(drv.wait_used(), (u32::from(head), 513));
    assert_eq!(
        rd(&mut t, 0x60) & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    wr(&mut t, 0x64, VIRTIO_MMIO_INT_VRING);
    // Reset through the status register stops the worker.
    wr(&mut t, 0x70, 0);
    assert!(!t.is_activated());
}
