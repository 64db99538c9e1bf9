//! Drives the register protocol the way Linux's virtio_mmio driver does.

use std::sync::Mutex;

use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::*;
use crate::vmm::devices::virtio::{VirtioError, VIRTIO_MMIO_INT_VRING};

const FEATURE_A: u64 = 1 << 3;
const FEATURE_B: u64 = 1 << 40;
const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | FEATURE_A | FEATURE_B;

const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;

/// What the dummy device saw.
#[derive(Default)]
struct Record {
    acked: Option<u64>,
    activations: Vec<Vec<Queue>>,
    resets: usize,
    config: [u8; 8],
    fail_activate: bool,
    fail_reset: bool,
}

struct Dummy {
    sizes: Vec<u16>,
    rec: Arc<Mutex<Record>>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn device_features(&self) -> u64 {
        DEVICE_FEATURES
    }
    fn set_acked_features(&mut self, features: u64) {
        self.rec.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let rec = self.rec.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = rec.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut rec = self.rec.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(c) = rec.config.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
    }
    fn activate(&mut self, args: ActivateArgs) -> Result<(), VirtioError> {
        let mut rec = self.rec.lock().unwrap();
        assert_eq!(args.queue_evts.len(), args.queues.len());
        if rec.fail_activate {
            return Err(VirtioError::Worker(std::io::Error::other("no")));
        }
        rec.activations.push(args.queues);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        let mut rec = self.rec.lock().unwrap();
        rec.resets += 1;
        !rec.fail_reset
    }
    fn quiesce(&mut self) -> Vec<Queue> {
        self.rec
            .lock()
            .unwrap()
            .activations
            .pop()
            .unwrap_or_default()
    }
}

struct Fixture {
    t: MmioTransport,
    rec: Arc<Mutex<Record>>,
    irq: Arc<IrqTrigger>,
}

fn fixture(sizes: &[u16]) -> Fixture {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let rec = Arc::new(Mutex::new(Record::default()));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let dev = Dummy {
        sizes: sizes.to_vec(),
        rec: rec.clone(),
    };
    let t = MmioTransport::new(Box::new(dev), mem, irq.clone()).unwrap();
    Fixture { t, rec, irq }
}

impl Fixture {
    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }
    fn add_status(&mut self, bits: u32) {
        let s = self.r(REG_STATUS);
        self.w(REG_STATUS, s | bits);
    }
    fn status(&mut self) -> u32 {
        self.r(REG_STATUS)
    }
    fn activations(&self) -> usize {
        self.rec.lock().unwrap().activations.len()
    }

    /// virtio_mmio probe + virtio_dev_probe up to FEATURES_OK.
    fn negotiate(&mut self, driver_features: u64) {
        assert_eq!(self.r(REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.r(REG_VERSION), 2);
        assert_eq!(self.r(REG_DEVICE_ID), 42);
        self.w(REG_STATUS, 0);
        self.add_status(ACK);
        self.add_status(DRIVER);
        self.w(REG_DEVICE_FEATURES_SEL, 1);
        let hi = u64::from(self.r(REG_DEVICE_FEATURES));
        self.w(REG_DEVICE_FEATURES_SEL, 0);
        let lo = u64::from(self.r(REG_DEVICE_FEATURES));
        assert_eq!(hi << 32 | lo, DEVICE_FEATURES);
        self.w(REG_DRIVER_FEATURES_SEL, 1);
        self.w(REG_DRIVER_FEATURES, (driver_features >> 32) as u32);
        self.w(REG_DRIVER_FEATURES_SEL, 0);
        self.w(REG_DRIVER_FEATURES, driver_features as u32);
        self.add_status(FEATURES_OK);
    }

    /// vm_setup_vq for queue `i` with rings at `base`.
    fn setup_queue(&mut self, i: u32, size: u32, base: u64) {
        self.w(REG_QUEUE_SEL, i);
        assert_eq!(self.r(REG_QUEUE_READY), 0, "queue {i} already active");
        assert!(self.r(REG_QUEUE_NUM_MAX) >= size);
        self.w(REG_QUEUE_NUM, size);
        let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
        self.w(REG_QUEUE_DESC_LOW, desc as u32);
        self.w(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(REG_QUEUE_DRIVER_LOW, avail as u32);
        self.w(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(REG_QUEUE_DEVICE_LOW, used as u32);
        self.w(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w(REG_QUEUE_READY, 1);
        assert_eq!(self.r(REG_QUEUE_READY), 1);
    }

    fn bring_up(&mut self) {
        self.negotiate(DEVICE_FEATURES);
        assert_ne!(self.status() & FEATURES_OK, 0);
        self.setup_queue(0, 256, 0x10000);
        self.setup_queue(1, 64, 0x20000);
        self.add_status(DRIVER_OK);
    }
}

#[test]
fn identification_registers() {
    let mut f = fixture(&[256, 64]);
    assert_eq!(f.r(REG_MAGIC_VALUE), u32::from_le_bytes(*b"virt"));
    assert_eq!(f.r(REG_VERSION), 2);
    assert_eq!(f.r(REG_DEVICE_ID), 42);
    assert_eq!(f.r(REG_VENDOR_ID), 0);
    assert_eq!(f.r(REG_SHM_LEN_LOW), u32::MAX);
    assert_eq!(f.r(REG_SHM_LEN_HIGH), u32::MAX);
    assert_eq!(f.r(REG_CONFIG_GENERATION), 0);
    assert_eq!(f.t.queue_evts().len(), 2);
    f.w(REG_DEVICE_FEATURES_SEL, 7);
    assert_eq!(f.r(REG_DEVICE_FEATURES), 0);
}

#[test]
fn full_bring_up_activates_once_with_the_registered_queues() {
    let mut f = fixture(&[256, 64]);
    f.bring_up();
    assert_eq!(f.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.rec.lock().unwrap().acked, Some(DEVICE_FEATURES));
    assert!(f.t.is_activated());
    {
        let rec = f.rec.lock().unwrap();
        assert_eq!(rec.activations.len(), 1);
        let qs = &rec.activations[0];
        assert_eq!(qs.len(), 2);
        assert_eq!(qs[0].size(), 256);
        assert_eq!(qs[0].desc_table(), 0x10000);
        assert_eq!(qs[0].avail_ring(), 0x11000);
        assert_eq!(qs[0].used_ring(), 0x12000);
        assert!(qs[0].ready());
        assert!(!qs[0].event_idx_enabled());
        assert_eq!(qs[1].size(), 64);
        assert_eq!(qs[1].desc_table(), 0x20000);
    }
    // Writing DRIVER_OK again does not activate twice.
    f.add_status(DRIVER_OK);
    f.w(REG_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(f.activations(), 1);
    // Queue registers are frozen while the device runs.
    f.w(REG_QUEUE_SEL, 0);
    f.w(REG_QUEUE_NUM, 16);
    f.w(REG_QUEUE_READY, 0);
    assert_eq!(f.r(REG_QUEUE_READY), 1);
    assert_eq!(f.t.state().queues[0].size, 256);
}

#[test]
fn features_are_negotiated_per_32_bit_word() {
    let mut f = fixture(&[16]);
    f.negotiate((1 << VIRTIO_F_VERSION_1) | FEATURE_A);
    assert_ne!(f.status() & FEATURES_OK, 0);
    assert_eq!(
        f.rec.lock().unwrap().acked,
        Some((1 << VIRTIO_F_VERSION_1) | FEATURE_A)
    );
    // After FEATURES_OK the features are fixed.
    f.w(REG_DRIVER_FEATURES_SEL, 0);
    f.w(REG_DRIVER_FEATURES, 0);
    assert_eq!(
        f.t.state().acked_features,
        (1 << VIRTIO_F_VERSION_1) | FEATURE_A
    );
}

#[test]
fn features_not_offered_are_refused() {
    let mut f = fixture(&[16]);
    f.negotiate(DEVICE_FEATURES | (1 << 5));
    assert_eq!(f.status(), ACK | DRIVER, "FEATURES_OK must not stick");
    assert_eq!(f.rec.lock().unwrap().acked, None);
    // Linux then sets FAILED.
    f.add_status(FAILED);
    assert_eq!(f.status(), ACK | DRIVER | FAILED);
    f.add_status(DRIVER_OK);
    assert_eq!(f.activations(), 0);
}

#[test]
fn legacy_drivers_are_refused() {
    let mut f = fixture(&[16]);
    f.negotiate(FEATURE_A);
    assert_eq!(f.status() & FEATURES_OK, 0);
}

#[test]
fn out_of_order_status_transitions_are_ignored() {
    let mut f = fixture(&[16]);
    f.w(REG_STATUS, DRIVER); // DRIVER before ACKNOWLEDGE
    assert_eq!(f.status(), 0);
    f.w(REG_STATUS, ACK);
    f.w(REG_STATUS, ACK | FEATURES_OK); // FEATURES_OK before DRIVER
    assert_eq!(f.status(), ACK);
    f.w(REG_STATUS, ACK | DRIVER | DRIVER_OK); // DRIVER_OK before FEATURES_OK
    assert_eq!(f.status(), ACK);
    f.w(REG_STATUS, ACK | 0x100); // unknown bit
    assert_eq!(f.status(), ACK);
    f.w(REG_STATUS, ACK | DRIVER);
    f.w(REG_STATUS, ACK); // clearing a bit without a reset
    assert_eq!(f.status(), ACK | DRIVER);
    assert_eq!(f.activations(), 0);
}

#[test]
fn queue_setup_before_features_ok_is_ignored() {
    let mut f = fixture(&[16]);
    f.add_status(ACK);
    f.add_status(DRIVER);
    f.w(REG_QUEUE_SEL, 0);
    f.w(REG_QUEUE_NUM, 8);
    f.w(REG_QUEUE_READY, 1);
    assert_eq!(f.r(REG_QUEUE_READY), 0);
    assert_eq!(f.t.state().queues[0].size, 16);
}

#[test]
fn notify_by_mmio_exit_signals_the_queue_eventfd() {
    let mut f = fixture(&[16, 16]);
    f.w(REG_QUEUE_NOTIFY, 1);
    assert_eq!(f.t.queue_evts()[1].read().unwrap(), 1);
    assert!(
        f.t.queue_evts()[0].read().is_err(),
        "queue 0 was not notified"
    );
    f.w(REG_QUEUE_NOTIFY, 2); // no such queue: ignored
    f.w(REG_QUEUE_NOTIFY, u32::MAX);
}

#[test]
fn interrupt_status_and_ack() {
    let mut f = fixture(&[16]);
    f.irq
        .trigger(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG)
        .unwrap();
    assert_eq!(f.r(REG_INTERRUPT_STATUS), 3);
    f.w(REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(f.r(REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    f.w(REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(f.r(REG_INTERRUPT_STATUS), 0);
}

#[test]
fn reset_stops_the_device_and_allows_a_second_bring_up() {
    let mut f = fixture(&[256, 64]);
    f.bring_up();
    f.irq.trigger(VIRTIO_MMIO_INT_VRING).unwrap();
    f.w(REG_QUEUE_NOTIFY, 0);
    f.w(REG_STATUS, 0);
    assert_eq!(f.rec.lock().unwrap().resets, 1);
    assert_eq!(f.status(), 0);
    assert_eq!(f.r(REG_INTERRUPT_STATUS), 0);
    assert!(!f.t.is_activated());
    assert_eq!(f.t.state(), &MmioTransportState::new(&[256, 64]));
    for q in 0..2 {
        f.w(REG_QUEUE_SEL, q);
        assert_eq!(f.r(REG_QUEUE_READY), 0);
    }
    assert!(
        f.t.queue_evts()[0].read().is_err(),
        "stale notify survived reset"
    );

    f.bring_up();
    assert_eq!(f.activations(), 2);
}

#[test]
fn reset_before_activation_does_not_reset_the_device() {
    let mut f = fixture(&[16]);
    f.negotiate(DEVICE_FEATURES);
    f.w(REG_STATUS, 0);
    assert_eq!(f.rec.lock().unwrap().resets, 0);
    assert_eq!(f.status(), 0);
}

#[test]
fn a_device_that_cannot_reset_needs_reset() {
    let mut f = fixture(&[256, 64]);
    f.bring_up();
    f.rec.lock().unwrap().fail_reset = true;
    f.w(REG_STATUS, 0);
    assert_ne!(f.status() & NEEDS_RESET, 0);
    assert_ne!(f.r(REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG, 0);
}

/// Brings a one-queue device up to DRIVER_OK with `tweak` applied to the
/// queue setup; returns the fixture.
fn bring_up_with(tweak: impl FnOnce(&mut Fixture)) -> Fixture {
    let mut f = fixture(&[16]);
    f.negotiate(DEVICE_FEATURES);
    f.setup_queue(0, 16, 0x10000);
    tweak(&mut f);
    f.add_status(DRIVER_OK);
    f
}

#[test]
fn invalid_queue_configs_set_needs_reset_instead_of_activating() {
    type Tweak = Box<dyn FnOnce(&mut Fixture)>;
    let cases: Vec<(&str, Tweak)> = vec![
        (
            "size not a power of two",
            Box::new(|f| f.w(REG_QUEUE_NUM, 12)),
        ),
        ("size zero", Box::new(|f| f.w(REG_QUEUE_NUM, 0))),
        ("size above max", Box::new(|f| f.w(REG_QUEUE_NUM, 32))),
        (
            "size beyond u16",
            Box::new(|f| f.w(REG_QUEUE_NUM, 0x1_0010)),
        ),
        ("not ready", Box::new(|f| f.w(REG_QUEUE_READY, 0))),
        (
            "misaligned desc",
            Box::new(|f| f.w(REG_QUEUE_DESC_LOW, 0x10008)),
        ),
        (
            "misaligned used",
            Box::new(|f| f.w(REG_QUEUE_DEVICE_LOW, 0x12002)),
        ),
        (
            "desc outside memory",
            Box::new(|f| f.w(REG_QUEUE_DESC_HIGH, 1)),
        ),
        (
            "used ring straddles the end",
            Box::new(|f| f.w(REG_QUEUE_DEVICE_LOW, 0xffffc)),
        ),
        (
            "avail at u64 max",
            Box::new(|f| {
                f.w(REG_QUEUE_DRIVER_LOW, 0xffff_fffe);
                f.w(REG_QUEUE_DRIVER_HIGH, u32::MAX);
            }),
        ),
    ];
    for (what, tweak) in cases {
        let mut f = bring_up_with(tweak);
        assert_eq!(f.activations(), 0, "{what}");
        assert_ne!(f.status() & NEEDS_RESET, 0, "{what}");
        assert_ne!(
            f.r(REG_INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG,
            0,
            "{what}"
        );
        // The driver may echo NEEDS_RESET back while setting FAILED.
        f.add_status(FAILED);
        assert_ne!(f.status() & FAILED, 0, "{what}");
        // A reset recovers the device.
        f.w(REG_STATUS, 0);
        assert_eq!(f.status(), 0, "{what}");
        f.negotiate(DEVICE_FEATURES);
        f.setup_queue(0, 16, 0x10000);
        f.add_status(DRIVER_OK);
        assert_eq!(f.activations(), 1, "{what}");
    }
}

#[test]
fn a_failing_activation_sets_needs_reset() {
    let mut f = fixture(&[16]);
    f.rec.lock().unwrap().fail_activate = true;
    f.negotiate(DEVICE_FEATURES);
    f.setup_queue(0, 16, 0x10000);
    f.add_status(DRIVER_OK);
    assert!(!f.t.is_activated());
    assert_ne!(f.status() & NEEDS_RESET, 0);
}

#[test]
fn event_idx_is_passed_to_the_queues_when_negotiated() {
    struct EvIdx(Dummy);
    impl VirtioDevice for EvIdx {
        fn device_type(&self) -> u32 {
            self.0.device_type()
        }
        fn queue_max_sizes(&self) -> &[u16] {
            self.0.queue_max_sizes()
        }
        fn device_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
        }
        fn set_acked_features(&mut self, features: u64) {
            self.0.set_acked_features(features)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            self.0.read_config(offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.0.write_config(offset, data)
        }
        fn activate(&mut self, args: ActivateArgs) -> Result<(), VirtioError> {
            self.0.activate(args)
        }
        fn reset(&mut self) -> bool {
            self.0.reset()
        }
        fn quiesce(&mut self) -> Vec<Queue> {
            self.0.quiesce()
        }
    }
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let rec = Arc::new(Mutex::new(Record::default()));
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let dev = EvIdx(Dummy {
        sizes: vec![16],
        rec: rec.clone(),
    });
    let t = MmioTransport::new(Box::new(dev), mem, irq.clone()).unwrap();
    let mut f = Fixture { t, rec, irq };
    f.add_status(ACK);
    f.add_status(DRIVER);
    f.w(REG_DRIVER_FEATURES_SEL, 0);
    f.w(REG_DRIVER_FEATURES, 1 << VIRTIO_RING_F_EVENT_IDX);
    f.w(REG_DRIVER_FEATURES_SEL, 1);
    f.w(REG_DRIVER_FEATURES, 1);
    f.add_status(FEATURES_OK);
    f.setup_queue(0, 16, 0x10000);
    f.add_status(DRIVER_OK);
    assert!(f.rec.lock().unwrap().activations[0][0].event_idx_enabled());
}

#[test]
fn config_space_is_delegated_at_any_width() {
    let mut f = fixture(&[16]);
    f.t.write(0x100 + 2, &[0xab]);
    f.t.write(0x100 + 4, &[1, 2, 3, 4]);
    f.t.write(0x100 + 6, &[9, 9, 9, 9, 9, 9, 9, 9]); // partly out of range
    let mut b8 = [0u8; 8];
    f.t.read(0x100, &mut b8);
    assert_eq!(b8, [0, 0, 0xab, 0, 1, 2, 9, 9]);
    let mut b2 = [0u8; 2];
    f.t.read(0x102, &mut b2);
    assert_eq!(b2, [0xab, 0]);
    let mut far = [0xffu8; 4];
    f.t.read(0xffc, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn bogus_register_accesses_are_ignored() {
    let mut f = fixture(&[16]);
    // Non-4-byte register accesses.
    let mut b = [0xffu8; 2];
    f.t.read(REG_MAGIC_VALUE, &mut b);
    assert_eq!(b, [0, 0]);
    f.t.write(REG_STATUS, &[ACK as u8]);
    assert_eq!(f.status(), 0);
    f.t.write(REG_STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.status(), 0);
    f.t.read(REG_STATUS, &mut []);
    // Writes to read-only registers and holes.
    for off in [
        REG_MAGIC_VALUE,
        REG_VERSION,
        REG_DEVICE_ID,
        REG_QUEUE_NUM_MAX,
        0x28,
        0x3c,
        0xfc,
    ] {
        f.w(off, 0xdead_beef);
    }
    assert_eq!(f.r(REG_MAGIC_VALUE), 0x7472_6976);
    // Reads of write-only registers and holes.
    for off in [
        REG_QUEUE_NOTIFY,
        REG_INTERRUPT_ACK,
        REG_QUEUE_DESC_LOW,
        0x0c0,
        0x0f8,
    ] {
        assert_eq!(f.r(off), 0);
    }
    // Nonexistent queue.
    f.negotiate(DEVICE_FEATURES);
    f.w(REG_QUEUE_SEL, 5);
    assert_eq!(f.r(REG_QUEUE_NUM_MAX), 0);
    assert_eq!(f.r(REG_QUEUE_READY), 0);
    f.w(REG_QUEUE_NUM, 8);
    f.w(REG_QUEUE_READY, 1);
    f.w(REG_QUEUE_DESC_LOW, 0x1000);
    assert_eq!(f.t.state().queues.len(), 1);
    // Feature words beyond 64 bits.
    f.w(REG_DRIVER_FEATURES_SEL, 9);
    f.w(REG_DRIVER_FEATURES, 0xffff_ffff);
}

#[test]
fn random_register_traffic_never_panics() {
    let mut f = fixture(&[256, 64]);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let r = next();
        let off = (r % 0x140) & !0x3 | if r & (1 << 20) != 0 { r >> 30 & 3 } else { 0 };
        let len = [4usize, 4, 4, 1, 2, 8][(r >> 40) as usize % 6];
        // Bias values towards plausible ones.
        let v = match (r >> 50) % 4 {
            0 => (r >> 8) as u32 & 0xff,
            1 => 0x10000,
            2 => (r >> 16) as u32,
            _ => 1,
        };
        let data = [v.to_le_bytes(), v.to_le_bytes()].concat();
        if r & 1 == 0 {
            f.t.write(off, &data[..len]);
        } else {
            let mut buf = vec![0u8; len];
            f.t.read(off, &mut buf);
        }
    }
}

#[test]
fn invalid_device_queue_sizes_are_rejected_at_creation() {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = Arc::new(IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    for sizes in [vec![0u16], vec![16, 100], vec![65535]] {
        let dev = Dummy {
            sizes,
            rec: Arc::default(),
        };
        let err = MmioTransport::new(Box::new(dev), mem.clone(), irq.clone()).unwrap_err();
        assert!(
            matches!(err, MmioError::InvalidQueueMaxSize { .. }),
            "{err}"
        );
    }
}
