//! Drives the device like the Linux guest driver: split virtqueues laid out
//! by hand in real guest memory, RX and event buffers posted, packets put
//! on the TX queue, notifications through the queue eventfds. The host side
//! uses the real connector and Unix sockets.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::CLOSE_GRACE;
use super::packet::{
    op, Header, HOST_CID, PKT_HEADER_SIZE, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::*;
use crate::vmm::devices::virtio::{IrqTrigger, VIRTIO_MMIO_INT_VRING};
use crate::vmm::memory::GuestMemory;

const MEM_SIZE: usize = 4 << 20;
const CID: u64 = 3;
/// Descriptor table, available ring and used ring of queue q start at
/// `QUEUES + q * 0x4000`, 4 KiB apart.
const QUEUES: u64 = 0x1000;
const EVENT_BUFS: u64 = 0xf_0000;
const EVENT_BUF_COUNT: u16 = 8;
const RX_BUFS: u64 = 0x10_0000;
const RX_BUF_COUNT: u16 = 64;
/// Payload bytes of one RX buffer (Linux's VIRTIO_VSOCK_DEFAULT_RX_BUF_SIZE).
const RX_DATA: u32 = 4096;
/// TX descriptor `d` owns `TX_BUFS + d * 0x2000`.
const TX_BUFS: u64 = 0x20_0000;
const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(200);

/// How the guest lays out a packet: header and payload in one descriptor
/// (Linux 6.2 on) or in two.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    Single,
    Split,
}

/// The driver's side of one split virtqueue.
struct Vq {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    evt: EventFd,
}

impl Vq {
    fn new(index: u64) -> Self {
        let base = QUEUES + index * 0x4000;
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            avail_idx: 0,
            used_seen: 0,
            evt: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    fn queue(&self, mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn write_desc(&self, mem: &GuestMemory, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(self.desc + u64::from(id) * 16))
            .unwrap();
    }

    /// Makes chain `head` available (without notifying).
    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % QUEUE_SIZE) * 2;
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    fn kick(&self) {
        self.evt.write(1).unwrap();
    }

    /// The next used element, if the device returned one: (id, len).
    fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let elem = self.used + 4 + u64::from(self.used_seen % QUEUE_SIZE) * 8;
        self.used_seen = self.used_seen.wrapping_add(1);
        let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
        Some((id as u16, len))
    }

    fn all_used(&self, mem: &GuestMemory) -> bool {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        idx == self.avail_idx
    }
}

/// The guest driver: three queues in real guest memory.
struct Guest {
    mem: GuestMemory,
    rx: Vq,
    tx: Vq,
    ev: Vq,
    irq_evt: EventFd,
    irq: Arc<IrqTrigger>,
    layout: Layout,
    tx_free: Vec<u16>,
    tx_chains: HashMap<u16, Vec<u16>>,
    /// RX buffers returned with fewer bytes than a header.
    empty_rx: usize,
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

impl Guest {
    fn new(layout: Layout) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(IrqTrigger::new(irq_evt.try_clone().unwrap()));
        Self {
            mem,
            rx: Vq::new(0),
            tx: Vq::new(1),
            ev: Vq::new(2),
            irq_evt,
            irq,
            layout,
            tx_free: (0..QUEUE_SIZE).rev().collect(),
            tx_chains: HashMap::new(),
            empty_rx: 0,
        }
    }

    fn activate_args(&self) -> ActivateArgs {
        ActivateArgs {
            mem: self.mem.clone(),
            irq: self.irq.clone(),
            queues: vec![
                self.rx.queue(&self.mem),
                self.tx.queue(&self.mem),
                self.ev.queue(&self.mem),
            ],
            queue_evts: vec![
                self.rx.evt.try_clone().unwrap(),
                self.tx.evt.try_clone().unwrap(),
                self.ev.evt.try_clone().unwrap(),
            ],
        }
    }

    fn rx_buf_addr(i: u16) -> u64 {
        RX_BUFS + u64::from(i) * 0x2000
    }

    /// Header and payload addresses of RX buffer `i`.
    fn rx_addrs(&self, i: u16) -> (u64, u64) {
        let base = Self::rx_buf_addr(i);
        match self.layout {
            Layout::Single => (base, base + PKT_HEADER_SIZE as u64),
            Layout::Split => (base, base + 0x100),
        }
    }

    /// Writes the descriptors of RX buffer `i` and makes it available.
    fn post_rx(&mut self, i: u16) {
        let (hdr, data) = self.rx_addrs(i);
        let w = VRING_DESC_F_WRITE as u16;
        let head = match self.layout {
            Layout::Single => {
                self.rx
                    .write_desc(&self.mem, i, hdr, PKT_HEADER_SIZE as u32 + RX_DATA, w, 0);
                i
            }
            Layout::Split => {
                let n = VRING_DESC_F_NEXT as u16;
                self.rx.write_desc(
                    &self.mem,
                    2 * i,
                    hdr,
                    PKT_HEADER_SIZE as u32,
                    w | n,
                    2 * i + 1,
                );
                self.rx
                    .write_desc(&self.mem, 2 * i + 1, data, RX_DATA, w, 0);
                2 * i
            }
        };
        self.rx.publish(&self.mem, head);
    }

    fn post_rx_buffers(&mut self, count: u16) {
        for i in 0..count {
            self.post_rx(i);
        }
        self.rx.kick();
    }

    fn post_event_buffers(&mut self) {
        for i in 0..EVENT_BUF_COUNT {
            let addr = EVENT_BUFS + u64::from(i) * 16;
            self.mem
                .write_obj(0xffff_ffffu32, GuestAddress(addr))
                .unwrap();
            self.ev
                .write_desc(&self.mem, i, addr, 4, VRING_DESC_F_WRITE as u16, 0);
            self.ev.publish(&self.mem, i);
        }
        self.ev.kick();
    }

    /// The next packet the device delivered, if any (its buffer is posted again).
    fn try_recv(&mut self) -> Option<(Header, Vec<u8>)> {
        loop {
            let (id, len) = self.rx.pop_used(&self.mem)?;
            let i = match self.layout {
                Layout::Single => id,
                Layout::Split => id / 2,
            };
            let (hdr_addr, data_addr) = self.rx_addrs(i);
            self.post_rx(i);
            self.rx.kick();
            if (len as usize) < PKT_HEADER_SIZE {
                self.empty_rx += 1;
                continue;
            }
            let mut raw = [0u8; PKT_HEADER_SIZE];
            self.mem
                .read_slice(&mut raw, GuestAddress(hdr_addr))
                .unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(
                len as usize,
                PKT_HEADER_SIZE + hdr.len as usize,
                "used length matches the header"
            );
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(data_addr))
                .unwrap();
            return Some((hdr, data));
        }
    }

    fn recv_within(&mut self, wait: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(p) = self.try_recv() {
                return Some(p);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_within(WAIT)
            .expect("the device delivered no packet")
    }

    fn expect_quiet(&mut self) {
        if let Some((hdr, _)) = self.recv_within(QUIET) {
            panic!("unexpected packet {hdr:?}");
        }
    }

    /// Returns TX descriptors the device is done with to the free list.
    fn reclaim_tx(&mut self) {
        while let Some((id, len)) = self.tx.pop_used(&self.mem) {
            assert_eq!(len, 0, "the device writes nothing into TX buffers");
            let ids = self.tx_chains.remove(&id).expect("a chain we published");
            self.tx_free.extend(ids);
        }
    }

    fn alloc_tx(&mut self, n: usize) -> Vec<u16> {
        self.reclaim_tx();
        let deadline = Instant::now() + WAIT;
        while self.tx_free.len() < n {
            assert!(
                Instant::now() < deadline,
                "the device does not return TX buffers"
            );
            std::thread::sleep(Duration::from_millis(1));
            self.reclaim_tx();
        }
        (0..n).map(|_| self.tx_free.pop().unwrap()).collect()
    }

    /// Publishes a chain of (addr, len, flags) descriptors; NEXT is added.
    fn send_descs(&mut self, descs: &[(u64, u32, u16)]) {
        let ids = self.alloc_tx(descs.len());
        self.publish_tx(ids, descs);
    }

    /// Publishes `descs` in the descriptors `ids` (as many), chained.
    fn publish_tx(&mut self, ids: Vec<u16>, descs: &[(u64, u32, u16)]) {
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match ids.get(k + 1) {
                Some(&next) => (flags | VRING_DESC_F_NEXT as u16, next),
                None => (flags, 0),
            };
            self.tx
                .write_desc(&self.mem, ids[k], addr, len, flags, next);
        }
        self.tx_chains.insert(ids[0], ids.clone());
        self.tx.publish(&self.mem, ids[0]);
        self.tx.kick();
    }

    /// Puts a packet on the TX queue: `hdr` with `len` set to the payload's.
    /// Its bytes live in the buffer slot of the chain's first descriptor,
    /// which stays allocated until the device returns the chain.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        assert!(data.len() <= 0x2000 - PKT_HEADER_SIZE);
        hdr.len = data.len() as u32;
        let count = match (data.is_empty(), self.layout) {
            (true, _) | (false, Layout::Single) => 1,
            (false, Layout::Split) => 2,
        };
        let ids = self.alloc_tx(count);
        let addr = TX_BUFS + u64::from(ids[0]) * 0x2000;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        let h = PKT_HEADER_SIZE as u32;
        if data.is_empty() {
            return self.publish_tx(ids, &[(addr, h, 0)]);
        }
        match self.layout {
            Layout::Single => {
                self.mem
                    .write_slice(data, GuestAddress(addr + u64::from(h)))
                    .unwrap();
                self.publish_tx(ids, &[(addr, h + data.len() as u32, 0)]);
            }
            Layout::Split => {
                self.mem
                    .write_slice(data, GuestAddress(addr + 0x100))
                    .unwrap();
                self.publish_tx(ids, &[(addr, h, 0), (addr + 0x100, data.len() as u32, 0)]);
            }
        }
    }

    /// Waits until the device consumed every TX chain.
    fn wait_tx_done(&mut self) {
        let deadline = Instant::now() + WAIT;
        while !self.tx.all_used(&self.mem) {
            assert!(Instant::now() < deadline, "the device does not consume TX");
            std::thread::sleep(Duration::from_millis(1));
        }
        self.reclaim_tx();
    }

    /// Event ids the device delivered.
    fn events(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some((id, len)) = self.ev.pop_used(&self.mem) {
            assert_eq!(len, 4);
            let addr = EVENT_BUFS + u64::from(id) * 16;
            out.push(self.mem.read_obj(GuestAddress(addr)).unwrap());
        }
        out
    }

    fn wait_events(&mut self) -> Vec<u32> {
        let deadline = Instant::now() + WAIT;
        loop {
            let ev = self.events();
            if !ev.is_empty() || Instant::now() >= deadline {
                return ev;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The guest's side of one connection.
struct GuestConn {
    /// The guest's port.
    port: u32,
    /// The host's port.
    host_port: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    /// What the device advertised.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
}

impl GuestConn {
    fn hdr(&self, op: u16) -> Header {
        Header {
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
            ..guest_hdr(op, self.port, self.host_port)
        }
    }

    fn rw(&mut self, guest: &mut Guest, data: &[u8]) {
        self.tx_cnt = self.tx_cnt.wrapping_add(data.len() as u32);
        guest.send(self.hdr(op::RW), data);
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Checks a packet is ours and notes the device's credit information.
    fn saw(&mut self, hdr: &Header) {
        assert_eq!(
            (
                hdr.src_cid,
                hdr.dst_cid,
                hdr.src_port,
                hdr.dst_port,
                hdr.type_
            ),
            (HOST_CID, CID, self.host_port, self.port, TYPE_STREAM),
            "{hdr:?}"
        );
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Receives the next packet of this connection.
    fn recv(&mut self, guest: &mut Guest) -> (Header, Vec<u8>) {
        let (hdr, data) = guest.recv();
        self.saw(&hdr);
        (hdr, data)
    }
}

struct Setup {
    vsock: Vsock,
    connector: VsockConnector,
    guest: Guest,
}

fn start(layout: Layout) -> Setup {
    let (mut vsock, connector) = Vsock::new(CID).unwrap();
    let mut guest = Guest::new(layout);
    vsock.set_acked_features(vsock.device_features());
    vsock.activate(guest.activate_args()).unwrap();
    guest.post_rx_buffers(RX_BUF_COUNT);
    guest.post_event_buffers();
    Setup {
        vsock,
        connector,
        guest,
    }
}

/// Connects the host to guest `port`, the guest accepting with `buf_alloc`.
fn connect(s: &mut Setup, port: u32, buf_alloc: u32) -> (UnixStream, GuestConn) {
    let connector = s.connector.clone();
    let caller = std::thread::spawn(move || connector.connect(port, WAIT));
    let (req, data) = s.guest.recv();
    assert!(data.is_empty());
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port, req.type_),
        (HOST_CID, CID, port, TYPE_STREAM)
    );
    assert!(req.src_port >= HOST_PORT_BASE);
    assert_eq!(req.buf_alloc, CONN_BUF_SIZE);
    let mut conn = GuestConn {
        port,
        host_port: req.src_port,
        buf_alloc,
        fwd_cnt: 0,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
    };
    conn.saw(&req);
    s.guest.send(conn.hdr(op::RESPONSE), &[]);
    let stream = caller.join().unwrap().expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    (stream, conn)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// Reads until EOF; panics on timeout.
fn read_to_eof(stream: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("EOF from the device");
    out
}

fn assert_eof(stream: &mut UnixStream) {
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF, read {n} bytes"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected EOF: {e}"),
    }
}

#[test]
fn device_identity_and_config_space() {
    let (vsock, connector) = Vsock::new(0x1234_5678).unwrap();
    assert_eq!(vsock.device_type(), 19);
    assert_eq!(vsock.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(vsock.device_features(), 1 << VIRTIO_F_VERSION_1);
    let mut cid = [0u8; 8];
    vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut hi = [0xffu8; 4];
    vsock.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    let mut b = [0u8; 1];
    vsock.read_config(1, &mut b);
    assert_eq!(b[0], 0x56);
    let mut far = [0xffu8; 4];
    vsock.read_config(6, &mut far);
    assert_eq!(far, [0x00, 0x00, 0, 0]);
    vsock.read_config(u64::MAX, &mut far);
    assert_eq!(far, [0; 4]);
    assert_eq!(connector.guest_cid(), 0x1234_5678);
    assert!(!connector.is_ready());

    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(cid),
            Err(VsockError::InvalidCid { cid: c }) if c == cid
        ));
    }
}

#[test]
fn connector_is_shareable_between_threads() {
    fn check<T: Clone + Send + Sync + 'static>() {}
    check::<VsockConnector>();
    fn device<T: Send>() {}
    device::<Vsock>();
}

#[test]
fn activation_checks_the_queue_count() {
    let (mut vsock, _connector) = Vsock::new(CID).unwrap();
    let guest = Guest::new(Layout::Single);
    let mut args = guest.activate_args();
    args.queues.pop();
    args.queue_evts.pop();
    assert!(matches!(
        vsock.activate(args),
        Err(VirtioError::QueueCount {
            expected: 3,
            got: 2
        })
    ));
}

#[test]
fn connect_before_activation_is_not_ready() {
    let (_vsock, connector) = Vsock::new(CID).unwrap();
    assert!(matches!(
        connector.connect(1234, Duration::from_secs(1)),
        Err(VsockError::NotReady)
    ));
}

fn data_both_ways(layout: Layout) {
    let mut s = start(layout);
    assert!(s.connector.is_ready());
    let (mut host, mut conn) = connect(&mut s, 1234, 64 * 1024);

    // Host to guest.
    host.write_all(b"hello guest").unwrap();
    let (hdr, data) = conn.recv(&mut s.guest);
    assert_eq!(hdr.op, op::RW);
    assert_eq!(data, b"hello guest");
    assert_eq!(hdr.buf_alloc, CONN_BUF_SIZE);

    // Guest to host.
    conn.rw(&mut s.guest, b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");

    // A bigger payload than one RX buffer arrives in pieces, in order.
    let big = pattern(7, 3 * RX_DATA as usize + 123);
    host.write_all(&big).unwrap();
    let mut got = Vec::new();
    while got.len() < big.len() {
        let (hdr, data) = conn.recv(&mut s.guest);
        assert_eq!(hdr.op, op::RW);
        assert!(data.len() <= RX_DATA as usize);
        got.extend_from_slice(&data);
    }
    assert_eq!(got, big);

    // Guest to host, many packets.
    let mut sent = Vec::new();
    for i in 0..20u8 {
        let chunk = pattern(i, 4000);
        conn.rw(&mut s.guest, &chunk);
        sent.extend_from_slice(&chunk);
    }
    let mut got = vec![0u8; sent.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, sent);

    // The guest asks for credit: the device answers with its fwd_cnt.
    s.guest.send(conn.hdr(op::CREDIT_REQUEST), &[]);
    let (hdr, _) = conn.recv(&mut s.guest);
    assert_eq!(hdr.op, op::CREDIT_UPDATE);
    assert_eq!(
        hdr.fwd_cnt, conn.tx_cnt,
        "everything reached the host socket"
    );

    assert_ne!(s.guest.irq.status() & VIRTIO_MMIO_INT_VRING, 0);
    assert!(s.guest.irq_evt.read().unwrap() > 0);
}

#[test]
fn data_flows_both_ways_single_descriptor_buffers() {
    data_both_ways(Layout::Single);
}

#[test]
fn data_flows_both_ways_split_buffers() {
    data_both_ways(Layout::Split);
}

#[test]
fn connection_request_waits_for_rx_buffers() {
    let (mut vsock, connector) = Vsock::new(CID).unwrap();
    let mut guest = Guest::new(Layout::Single);
    vsock.set_acked_features(vsock.device_features());
    vsock.activate(guest.activate_args()).unwrap();
    let c = connector.clone();
    let caller = std::thread::spawn(move || c.connect(80, WAIT));
    std::thread::sleep(QUIET);
    assert!(guest.try_recv().is_none());
    guest.post_rx_buffers(1);
    let (req, _) = guest.recv();
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 80));
    guest.send(
        Header {
            buf_alloc: 4096,
            ..guest_hdr(op::RESPONSE, 80, req.src_port)
        },
        &[],
    );
    let _host = caller.join().unwrap().unwrap();
    drop(vsock);
}

#[test]
fn guest_rst_refuses_the_connection() {
    let mut s = start(Layout::Single);
    let c = s.connector.clone();
    let caller = std::thread::spawn(move || c.connect(4321, WAIT));
    let (req, _) = s.guest.recv();
    s.guest.send(guest_hdr(op::RST, 4321, req.src_port), &[]);
    assert!(matches!(
        caller.join().unwrap(),
        Err(VsockError::ConnectionRefused { port: 4321 })
    ));
    // The device forgot it: a later RST for it gets no answer, a RW an RST.
    s.guest.send(guest_hdr(op::RST, 4321, req.src_port), &[]);
    s.guest.expect_quiet();
    s.guest.send(guest_hdr(op::RW, 4321, req.src_port), b"late");
    let (rst, _) = s.guest.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 4321)
    );
}

#[test]
fn connect_times_out_when_the_guest_never_answers() {
    let mut s = start(Layout::Split);
    let started = Instant::now();
    let err = s
        .connector
        .connect(555, Duration::from_millis(300))
        .unwrap_err();
    assert!(
        matches!(err, VsockError::Timeout { port: 555, .. }),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(started.elapsed() < Duration::from_secs(3));
    // The guest saw the request, then its withdrawal.
    let (req, _) = s.guest.recv();
    assert_eq!(req.op, op::REQUEST);
    let (rst, _) = s.guest.recv();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 555)
    );
    // A late answer is reset, not accepted.
    s.guest
        .send(guest_hdr(op::RESPONSE, 555, req.src_port), &[]);
    let (rst, _) = s.guest.recv();
    assert_eq!(rst.op, op::RST);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut s = start(Layout::Single);
    // The guest grants only 8 KiB.
    let (host, mut conn) = connect(&mut s, 7, 8192);
    let payload = pattern(3, 100_000);
    let writer = {
        let mut host = host.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || host.write_all(&payload).unwrap())
    };
    let mut got = Vec::new();
    let mut credit_requests = 0;
    while got.len() < payload.len() {
        let (hdr, data) = conn.recv(&mut s.guest);
        match hdr.op {
            op::RW => {
                got.extend_from_slice(&data);
                let unacked = got.len() as u32 - conn.fwd_cnt;
                assert!(
                    unacked <= conn.buf_alloc,
                    "the device overran the guest's credit"
                );
            }
            op::CREDIT_REQUEST => {
                credit_requests += 1;
                // The guest "reads" everything and says so.
                conn.fwd_cnt = got.len() as u32;
                s.guest.send(conn.hdr(op::CREDIT_UPDATE), &[]);
            }
            other => panic!("unexpected op {other}"),
        }
    }
    assert_eq!(got, payload);
    assert!(credit_requests >= 10, "{credit_requests} credit requests");
    writer.join().unwrap();
    drop(host.shutdown(Shutdown::Both));
}

#[test]
fn slow_host_reader_stalls_guest_credit_then_catches_up() {
    let mut s = start(Layout::Split);
    let (mut host, mut conn) = connect(&mut s, 9, 64 * 1024);
    assert_eq!(conn.peer_buf_alloc, CONN_BUF_SIZE);
    let chunk = pattern(11, 4096);
    let mut sent = 0usize;
    // The host does not read: send while the device gives credit.
    let stalled_at = loop {
        while conn.credit() >= chunk.len() as u32 {
            conn.rw(&mut s.guest, &chunk);
            sent += chunk.len();
        }
        assert!(sent < 64 << 20, "the device never stopped granting credit");
        // Wait for a credit update, or conclude the credit stalled.
        match s.guest.recv_within(QUIET) {
            Some((hdr, _)) => {
                conn.saw(&hdr);
                assert_eq!(hdr.op, op::CREDIT_UPDATE);
            }
            None => break sent,
        }
    };
    // What the host socket did not take is buffered in the device, bounded
    // by the credit it gave.
    assert!(
        stalled_at >= CONN_BUF_SIZE as usize,
        "stalled at {stalled_at}"
    );
    let unforwarded = conn.tx_cnt.wrapping_sub(conn.peer_fwd_cnt);
    assert!(unforwarded <= CONN_BUF_SIZE);

    // The host reads everything: credit comes back and the rest flows.
    let reader = std::thread::spawn(move || read_to_eof(&mut host));
    let total = stalled_at + 2 * CONN_BUF_SIZE as usize;
    while sent < total {
        if conn.credit() >= chunk.len() as u32 {
            conn.rw(&mut s.guest, &chunk);
            sent += chunk.len();
        } else {
            let (hdr, _) = conn.recv(&mut s.guest);
            assert_eq!(hdr.op, op::CREDIT_UPDATE);
        }
    }
    s.guest.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..conn.hdr(op::SHUTDOWN)
        },
        &[],
    );
    let got = reader.join().unwrap();
    assert_eq!(got.len(), total);
    assert!(got == chunk.repeat(total / chunk.len()), "corrupted data");
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let mut s = start(Layout::Single);
    let (mut host, mut conn) = connect(&mut s, 10, 64 * 1024);
    let chunk = pattern(1, 4096);
    // Ignore credit entirely while the host does not read.
    let mut sent = 0usize;
    let rst = loop {
        conn.rw(&mut s.guest, &chunk);
        sent += chunk.len();
        assert!(sent < 8 << 20, "no reset after {sent} bytes");
        if let Some((hdr, _)) = s.guest.try_recv() {
            conn.saw(&hdr);
            if hdr.op == op::RST {
                break hdr;
            }
            assert_eq!(hdr.op, op::CREDIT_UPDATE);
        }
    };
    assert_eq!(rst.op, op::RST);
    // The host gets what was forwarded, then EOF.
    let got = read_to_eof(&mut host);
    assert!(got.len() < sent);
    assert!(got.chunks(4096).all(|c| c == &chunk[..c.len()]));
}

#[test]
fn host_close_shuts_down_then_guest_rst_ends_it() {
    let mut s = start(Layout::Single);
    let (mut host, mut conn) = connect(&mut s, 20, 64 * 1024);
    host.write_all(b"last words").unwrap();
    drop(host);
    let (hdr, data) = conn.recv(&mut s.guest);
    assert_eq!((hdr.op, data.as_slice()), (op::RW, &b"last words"[..]));
    // SHUTDOWN flags may arrive in one packet or two (RCV first).
    let mut flags = 0;
    while flags != SHUTDOWN_BOTH {
        let (hdr, _) = conn.recv(&mut s.guest);
        assert_eq!(hdr.op, op::SHUTDOWN);
        flags |= hdr.flags;
    }
    // Data the guest still sends is dropped without complaint.
    conn.rw(&mut s.guest, b"nobody listens");
    s.guest.send(conn.hdr(op::RST), &[]);
    // No RST comes back after the grace period: the connection is gone.
    std::thread::sleep(CLOSE_GRACE);
    s.guest.expect_quiet();
}

#[test]
fn host_close_without_guest_answer_is_reset_after_grace() {
    let mut s = start(Layout::Split);
    let (host, mut conn) = connect(&mut s, 21, 64 * 1024);
    drop(host);
    let mut flags = 0;
    let started = Instant::now();
    while flags != SHUTDOWN_BOTH {
        let (hdr, _) = conn.recv(&mut s.guest);
        assert_eq!(hdr.op, op::SHUTDOWN);
        flags |= hdr.flags;
    }
    let (rst, _) = conn.recv(&mut s.guest);
    assert_eq!(rst.op, op::RST);
    assert!(started.elapsed() >= CLOSE_GRACE - Duration::from_millis(50));
}

#[test]
fn host_half_close_lets_the_guest_keep_sending() {
    let mut s = start(Layout::Single);
    let (mut host, mut conn) = connect(&mut s, 22, 64 * 1024);
    host.write_all(b"request").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    let (hdr, data) = conn.recv(&mut s.guest);
    assert_eq!((hdr.op, data.as_slice()), (op::RW, &b"request"[..]));
    let (hdr, _) = conn.recv(&mut s.guest);
    assert_eq!((hdr.op, hdr.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    // The guest answers after the host's EOF, then closes.
    conn.rw(&mut s.guest, b"response");
    s.guest.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..conn.hdr(op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(read_to_eof(&mut host), b"response");
    let (rst, _) = conn.recv(&mut s.guest);
    assert_eq!(rst.op, op::RST);
}

#[test]
fn guest_shutdown_send_gives_the_host_eof() {
    let mut s = start(Layout::Split);
    let (mut host, mut conn) = connect(&mut s, 23, 64 * 1024);
    conn.rw(&mut s.guest, b"bye");
    s.guest.send(
        Header {
            flags: SHUTDOWN_SEND,
            ..conn.hdr(op::SHUTDOWN)
        },
        &[],
    );
    assert_eq!(read_to_eof(&mut host), b"bye");
    // The other direction still works.
    host.write_all(b"still here").unwrap();
    let (hdr, data) = conn.recv(&mut s.guest);
    assert_eq!((hdr.op, data.as_slice()), (op::RW, &b"still here"[..]));
    // Data after SHUTDOWN_SEND is a protocol violation: reset.
    conn.rw(&mut s.guest, b"oops");
    let (rst, _) = conn.recv(&mut s.guest);
    assert_eq!(rst.op, op::RST);
}

#[test]
fn guest_shutdown_rcv_makes_host_writes_fail() {
    let mut s = start(Layout::Single);
    let (mut host, mut conn) = connect(&mut s, 24, 64 * 1024);
    s.guest.send(
        Header {
            flags: SHUTDOWN_RCV,
            ..conn.hdr(op::SHUTDOWN)
        },
        &[],
    );
    s.guest.wait_tx_done();
    let deadline = Instant::now() + WAIT;
    loop {
        match host.write(b"x") {
            Err(e) if e.kind() == ErrorKind::BrokenPipe => break,
            _ => {
                assert!(Instant::now() < deadline, "host writes still succeed");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    // The guest still sends.
    conn.rw(&mut s.guest, b"one way");
    let mut buf = [0u8; 7];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"one way");
    s.guest.expect_quiet();
}

#[test]
fn guest_close_is_confirmed_with_rst_after_flushing() {
    let mut s = start(Layout::Single);
    let (mut host, mut conn) = connect(&mut s, 25, 64 * 1024);
    let data = pattern(5, 3000);
    conn.rw(&mut s.guest, &data);
    s.guest.send(
        Header {
            flags: SHUTDOWN_BOTH,
            ..conn.hdr(op::SHUTDOWN)
        },
        &[],
    );
    let (rst, _) = conn.recv(&mut s.guest);
    assert_eq!(rst.op, op::RST);
    assert_eq!(read_to_eof(&mut host), data);
}

#[test]
fn guest_rst_closes_the_host_end() {
    let mut s = start(Layout::Split);
    let (mut host, conn) = connect(&mut s, 26, 64 * 1024);
    s.guest.send(conn.hdr(op::RST), &[]);
    assert_eof(&mut host);
    s.guest.expect_quiet();
}

#[test]
fn unknown_ports_and_guest_connections_are_reset() {
    let mut s = start(Layout::Single);
    // A guest connect to the host: nothing listens.
    s.guest.send(guest_hdr(op::REQUEST, 40000, 5000), &[]);
    let (rst, _) = s.guest.recv();
    assert_eq!(
        (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
        (op::RST, HOST_CID, CID, 5000, 40000)
    );
    // Packets for connections that do not exist.
    for o in [
        op::RW,
        op::RESPONSE,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        0,
        99,
    ] {
        s.guest.send(guest_hdr(o, 40001, 5001), b"x");
        let (rst, _) = s.guest.recv();
        assert_eq!((rst.op, rst.dst_port), (op::RST, 40001), "op {o}");
    }
    // An RST is never answered.
    s.guest.send(guest_hdr(op::RST, 40002, 5002), &[]);
    s.guest.expect_quiet();
}

#[test]
fn malformed_packets_are_dropped_or_reset() {
    let mut s = start(Layout::Single);
    let (mut host, mut conn) = connect(&mut s, 30, 64 * 1024);
    let slot = TX_BUFS + 0x1f_0000;
    let h = PKT_HEADER_SIZE as u32;
    let write_hdr = |g: &Guest, hdr: Header| {
        g.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(slot))
            .unwrap()
    };

    // Wrong source CID: dropped silently.
    s.guest.send(
        Header {
            src_cid: 99,
            ..guest_hdr(op::REQUEST, 1, 2)
        },
        &[],
    );
    // Header descriptor shorter than a header: dropped.
    s.guest.send_descs(&[(slot, h - 1, 0)]);
    // Write-only TX descriptor: dropped.
    s.guest.send_descs(&[(slot, h, VRING_DESC_F_WRITE as u16)]);
    // Descriptor outside guest memory: dropped.
    s.guest.send_descs(&[(MEM_SIZE as u64 - 8, h, 0)]);
    s.guest.send_descs(&[(u64::MAX - 4, h, 0)]);
    s.guest.wait_tx_done();
    s.guest.expect_quiet();

    // `len` larger than the payload descriptor: answered with RST.
    write_hdr(
        &s.guest,
        Header {
            len: 1000,
            ..guest_hdr(op::RW, 41000, 6000)
        },
    );
    s.guest.send_descs(&[(slot, h, 0), (slot + 0x100, 100, 0)]);
    let (rst, _) = s.guest.recv();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 41000));
    // `len` beyond the protocol's maximum.
    write_hdr(
        &s.guest,
        Header {
            len: 1 << 20,
            ..guest_hdr(op::RW, 41001, 6000)
        },
    );
    s.guest
        .send_descs(&[(slot, h, 0), (slot + 0x100, 1 << 20, 0)]);
    let (rst, _) = s.guest.recv();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 41001));
    // Payload claimed but no payload descriptor.
    write_hdr(
        &s.guest,
        Header {
            len: 10,
            ..guest_hdr(op::RW, 41002, 6000)
        },
    );
    s.guest.send_descs(&[(slot, h, 0)]);
    let (rst, _) = s.guest.recv();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 41002));
    // A SEQPACKET socket (not offered): reset with its own type.
    s.guest.send(
        Header {
            type_: 2,
            ..guest_hdr(op::REQUEST, 41003, 6000)
        },
        &[],
    );
    let (rst, _) = s.guest.recv();
    assert_eq!((rst.op, rst.type_, rst.dst_port), (op::RST, 2, 41003));
    // A packet to another CID.
    s.guest.send(
        Header {
            dst_cid: 7,
            ..guest_hdr(op::REQUEST, 41004, 6000)
        },
        &[],
    );
    let (rst, _) = s.guest.recv();
    assert_eq!((rst.op, rst.src_cid, rst.dst_port), (op::RST, 7, 41004));

    // The established connection is untouched...
    conn.rw(&mut s.guest, b"fine");
    let mut buf = [0u8; 4];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"fine");
    // ...until a malformed packet names it: then it is reset.
    write_hdr(
        &s.guest,
        Header {
            len: 5000,
            ..conn.hdr(op::RW)
        },
    );
    s.guest.send_descs(&[(slot, h, 0), (slot + 0x100, 10, 0)]);
    let (rst, _) = conn.recv(&mut s.guest);
    assert_eq!(rst.op, op::RST);
    assert_eof(&mut host);
    // An unexpected op on a live connection resets it too.
    let (mut host, conn) = connect(&mut s, 31, 64 * 1024);
    s.guest.send(conn.hdr(op::REQUEST), &[]);
    let (rst, _) = s.guest.recv();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 31));
    assert_eof(&mut host);
}

#[test]
fn malformed_rx_buffers_are_skipped() {
    let (mut vsock, connector) = Vsock::new(CID).unwrap();
    let mut guest = Guest::new(Layout::Single);
    vsock.set_acked_features(vsock.device_features());
    vsock.activate(guest.activate_args()).unwrap();
    // A read-only buffer, a too-short one, one outside memory, then a good one.
    let w = VRING_DESC_F_WRITE as u16;
    guest.rx.write_desc(&guest.mem, 10, RX_BUFS, 4140, 0, 0);
    guest.rx.write_desc(&guest.mem, 11, RX_BUFS, 20, w, 0);
    guest
        .rx
        .write_desc(&guest.mem, 12, MEM_SIZE as u64 - 16, 4140, w, 0);
    for head in [10, 11, 12] {
        guest.rx.publish(&guest.mem, head);
    }
    guest.post_rx(0);
    guest.rx.kick();
    let c = connector.clone();
    let caller = std::thread::spawn(move || c.connect(77, Duration::from_millis(500)));
    let (req, _) = guest.recv();
    assert_eq!(req.op, op::REQUEST);
    assert_eq!(guest.empty_rx, 3);
    assert!(matches!(
        caller.join().unwrap(),
        Err(VsockError::Timeout { port: 77, .. })
    ));
}

/// Random descriptor chains and headers: the device must neither panic nor
/// stop working.
#[test]
fn random_tx_garbage_does_not_break_the_device() {
    let mut s = start(Layout::Single);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let ops = [
        op::REQUEST,
        op::RESPONSE,
        op::RST,
        op::SHUTDOWN,
        op::RW,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
    ];
    for round in 0..400 {
        let r = rand();
        if round % 2 == 0 {
            // A plausible header with random fields.
            let hdr = Header {
                src_cid: if r & 1 == 0 { CID } else { rand() },
                dst_cid: if r & 2 == 0 { HOST_CID } else { rand() },
                src_port: (rand() % 4) as u32,
                dst_port: if r & 4 == 0 {
                    HOST_PORT_BASE + (rand() % 3) as u32
                } else {
                    rand() as u32
                },
                len: 0,
                type_: if r & 8 == 0 {
                    TYPE_STREAM
                } else {
                    rand() as u16
                },
                op: ops[(rand() % ops.len() as u64) as usize],
                flags: rand() as u32,
                buf_alloc: rand() as u32,
                fwd_cnt: rand() as u32,
            };
            let data = pattern(round as u8, (rand() % 600) as usize);
            s.guest.send(hdr, &data);
        } else {
            // Raw descriptors: random addresses, lengths, flags and links.
            let n = 1 + (rand() % 4) as usize;
            let ids = s.guest.alloc_tx(n);
            for &id in &ids {
                let addr = match rand() % 3 {
                    0 => TX_BUFS + (rand() % 0x1f_0000),
                    1 => rand(),
                    _ => MEM_SIZE as u64 - (rand() % 64),
                };
                let len = match rand() % 3 {
                    0 => (rand() % 128) as u32,
                    1 => rand() as u32,
                    _ => PKT_HEADER_SIZE as u32,
                };
                let flags = (rand() & 0x7) as u16;
                let next = ids[(rand() % n as u64) as usize];
                s.guest
                    .tx
                    .write_desc(&s.guest.mem, id, addr, len, flags, next);
                // Sometimes a real-looking header at the address.
                if addr < MEM_SIZE as u64 - 64 && rand() % 2 == 0 {
                    let hdr = Header {
                        len: (rand() % 256) as u32,
                        ..guest_hdr(ops[(rand() % 7) as usize], 1, 2)
                    };
                    s.guest
                        .mem
                        .write_slice(&hdr.to_bytes(), GuestAddress(addr))
                        .unwrap();
                }
            }
            s.guest.tx_chains.insert(ids[0], ids.clone());
            s.guest.tx.publish(&s.guest.mem, ids[0]);
            s.guest.tx.kick();
        }
        // Drain whatever the device answers.
        while s.guest.try_recv().is_some() {}
    }
    // The device consumed everything it could and still works.
    std::thread::sleep(QUIET);
    while s.guest.try_recv().is_some() {}
    s.guest.reclaim_tx();
    // Chains that loop or point outside memory may be consumed as nothing;
    // reset the TX free list to what the device returned.
    let (mut host, mut conn) = connect(&mut s, 1, 64 * 1024);
    conn.rw(&mut s.guest, b"alive");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"alive");
}

#[test]
fn many_connections_interleave() {
    let mut s = start(Layout::Split);
    let mut conns: Vec<(UnixStream, GuestConn)> = (0..8)
        .map(|i| connect(&mut s, 100 + i, 64 * 1024))
        .collect();
    // Host writes to all at once; packets of every connection come back.
    for (i, (host, _)) in conns.iter_mut().enumerate() {
        host.write_all(&pattern(i as u8, 10_000)).unwrap();
    }
    let mut got: HashMap<u32, Vec<u8>> = HashMap::new();
    while got.values().map(Vec::len).sum::<usize>() < 80_000 {
        let (hdr, data) = s.guest.recv();
        assert_eq!(hdr.op, op::RW);
        got.entry(hdr.dst_port)
            .or_default()
            .extend_from_slice(&data);
    }
    for (i, (_, conn)) in conns.iter().enumerate() {
        assert_eq!(got[&conn.port], pattern(i as u8, 10_000));
    }
    // Guest to host on each.
    for (i, (host, conn)) in conns.iter_mut().enumerate() {
        conn.rw(&mut s.guest, &[i as u8; 100]);
        let mut buf = [0u8; 100];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [i as u8; 100]);
    }
    // Distinct host ports.
    let mut ports: Vec<u32> = conns.iter().map(|(_, c)| c.host_port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 8);
}

#[test]
fn transport_reset_drops_connections_and_notifies_the_guest() {
    let mut s = start(Layout::Single);
    let (mut host, _conn) = connect(&mut s, 50, 64 * 1024);
    assert!(s.guest.events().is_empty());
    s.connector.send_transport_reset();
    assert_eq!(s.guest.wait_events(), vec![0]);
    assert_eof(&mut host);
    // New connections work after it.
    let (mut host, mut conn) = connect(&mut s, 50, 64 * 1024);
    conn.rw(&mut s.guest, b"again");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"again");
}

#[test]
fn transport_reset_asked_before_activation_is_sent_at_activation() {
    let (mut vsock, _connector) = Vsock::new(CID).unwrap();
    vsock.send_transport_reset();
    let mut guest = Guest::new(Layout::Single);
    // The driver posts its event buffers before DRIVER_OK.
    for i in 0..EVENT_BUF_COUNT {
        let addr = EVENT_BUFS + u64::from(i) * 16;
        guest
            .ev
            .write_desc(&guest.mem, i, addr, 4, VRING_DESC_F_WRITE as u16, 0);
        guest.ev.publish(&guest.mem, i);
    }
    vsock.set_acked_features(vsock.device_features());
    vsock.activate(guest.activate_args()).unwrap();
    assert_eq!(guest.wait_events(), vec![0]);
}

#[test]
fn reset_and_drop_close_every_host_end() {
    let mut s = start(Layout::Single);
    let (mut host, _conn) = connect(&mut s, 60, 64 * 1024);
    // A connect in flight when the device resets fails cleanly.
    let c = s.connector.clone();
    let pending = std::thread::spawn(move || c.connect(61, WAIT));
    let (req, _) = s.guest.recv();
    assert_eq!(req.dst_port, 61);
    assert!(s.vsock.reset());
    assert_eof(&mut host);
    assert!(matches!(
        pending.join().unwrap(),
        Err(VsockError::Reset { port: 61 })
    ));
    assert!(!s.connector.is_ready());
    assert!(matches!(
        s.connector.connect(60, WAIT),
        Err(VsockError::NotReady)
    ));

    // Activate again (the driver re-initialises its queues), then drop.
    let mut guest = Guest::new(Layout::Single);
    s.vsock.activate(guest.activate_args()).unwrap();
    guest.post_rx_buffers(8);
    s.guest = guest;
    let (mut host, _conn) = connect(&mut s, 62, 64 * 1024);
    drop(s.vsock);
    assert_eof(&mut host);
    assert!(!s.connector.is_ready());
}

#[test]
fn device_writes_are_recorded_in_the_dirty_bitmap() {
    let mut s = start(Layout::Single);
    // The driver never writes RX buffer pages itself.
    let (mut host, mut conn) = connect(&mut s, 70, 64 * 1024);
    host.write_all(b"dirty").unwrap();
    let (hdr, _) = conn.recv(&mut s.guest);
    assert_eq!(hdr.op, op::RW);
    // Two packets went to RX buffers 0 and 1: both pages are dirty, as is
    // the used ring; an untouched buffer is not.
    let region = s.guest.mem.find_region(GuestAddress(0)).unwrap();
    assert!(region.bitmap().dirty_at(Guest::rx_buf_addr(0) as usize));
    assert!(region.bitmap().dirty_at(Guest::rx_buf_addr(1) as usize));
    assert!(region.bitmap().dirty_at(s.guest.rx.used as usize));
    assert!(!region.bitmap().dirty_at(Guest::rx_buf_addr(40) as usize));
}
