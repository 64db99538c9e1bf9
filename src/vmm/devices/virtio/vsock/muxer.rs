//! The connection table: routes guest packets to connections, host
//! requests to new connections, and picks the next packet for the guest.
//!
//! Packets for the guest come from two places: a short queue of RSTs that
//! answer packets we cannot use (bounded: TX processing pauses while it is
//! full, so a flooding guest is slowed down instead of growing it), and the
//! connections themselves, each of which has at most one kind of control
//! packet pending at a time plus a bounded amount of data. Connections with
//! something to send wait in a round-robin list, so one busy connection
//! cannot starve the others.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, ConnectReply, Connection, Verdict};
use super::packet::{op, Header, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// The first host-side port of host-initiated connections; ports are
/// allocated upwards from here and wrap around to it.
pub const HOST_PORT_BASE: u32 = 1 << 30;

/// The most connections open at once.
pub const MAX_CONNECTIONS: usize = 1024;

/// Queued answers (RSTs) to guest packets we could not use; TX processing
/// pauses while this many wait for RX buffers.
const CTRL_QUEUE_CAP: usize = 256;

/// A host `connect` on its way to the worker.
pub(super) struct ConnectRequest {
    /// The guest port to connect to.
    pub port: u32,
    /// The device's end of the socket pair.
    pub stream: UnixStream,
    /// Where the outcome goes.
    pub reply: ConnectReply,
    /// The caller's timeout (for the error message).
    pub timeout: Duration,
    /// When to give up; `None` for never.
    pub deadline: Option<Instant>,
}

/// Every connection of one activation of the device.
pub(super) struct Muxer {
    guest_cid: u64,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    /// Local ports of host-initiated connections.
    local_ports: HashSet<u32>,
    next_local_port: u32,
    /// RSTs answering packets that belong to no connection.
    ctrl: VecDeque<Header>,
    /// Connections that (probably) have a packet for the guest.
    ready: VecDeque<ConnKey>,
    /// Connections to re-examine in [`Muxer::settle`].
    touched: Vec<ConnKey>,
}

/// Where a device starts numbering host ports: a random place in the range.
/// After a snapshot is restored the guest may still hold sockets of the
/// connections the old device made (reset, but not yet closed by their
/// owners); a new connection with the same port pair would hit one of them
/// and be refused. With 3 * 2^30 ports to start from, that does not happen.
fn first_local_port() -> u32 {
    let mut seed = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .map(|()| u32::from_le_bytes(seed))
        .unwrap_or_else(|_| {
            // No /dev/urandom: the clock is random enough for this.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        });
    HOST_PORT_BASE + random % (u32::MAX - HOST_PORT_BASE)
}

impl Muxer {
    /// An empty table; connection epoll tokens start at `first_token`.
    pub fn new(guest_cid: u64, first_token: u64) -> Self {
        Self {
            guest_cid,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            next_token: first_token,
            local_ports: HashSet::new(),
            next_local_port: first_local_port(),
            ctrl: VecDeque::new(),
            ready: VecDeque::new(),
            touched: Vec::new(),
        }
    }

    fn touch(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.touched {
                conn.touched = true;
                self.touched.push(key);
            }
        }
    }

    /// Forgets a connection, telling the guest with an RST if `rst`, and
    /// failing a pending host `connect`. Closing the host end removes it
    /// from epoll (its fd is never duplicated).
    fn remove(&mut self, key: ConnKey, rst: bool) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        self.tokens.remove(&conn.token);
        if key.local_port >= HOST_PORT_BASE {
            self.local_ports.remove(&key.local_port);
        }
        conn.fail_connect(VsockError::Reset {
            port: key.peer_port,
        });
        if rst && conn.guest_knows() {
            // One per connection at most: may exceed the cap, which only
            // bounds answers to unusable packets.
            self.ctrl.push_back(conn.rst_header());
        }
    }

    fn apply(&mut self, key: ConnKey, verdict: Verdict) {
        match verdict {
            Verdict::Keep => self.touch(key),
            Verdict::Reset => self.remove(key, true),
            Verdict::Close => self.remove(key, false),
        }
    }

    /// Answers `hdr` with an RST (never an RST with an RST).
    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == op::RST {
            return;
        }
        if self.ctrl.len() >= CTRL_QUEUE_CAP {
            log::debug!("virtio-vsock: dropping an RST: too many are waiting for RX buffers");
            return;
        }
        self.ctrl.push_back(hdr.reply(op::RST));
    }

    /// Whether TX processing should pause until RX buffers drain the
    /// queue of answers.
    pub fn ctrl_full(&self) -> bool {
        self.ctrl.len() >= CTRL_QUEUE_CAP
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        // At most MAX_CONNECTIONS ports are taken, so this ends quickly.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(HOST_PORT_BASE);
            if self.local_ports.insert(port) {
                return Some(port);
            }
        }
        None
    }

    /// Starts a host-initiated connection: its REQUEST goes to the guest
    /// with the next RX buffer.
    pub fn host_connect(&mut self, req: ConnectRequest, now: Instant) {
        let ConnectRequest {
            port,
            stream,
            reply,
            timeout,
            deadline,
        } = req;
        let refuse = |err: VsockError| {
            // The caller may have given up already.
            let _ = reply.send(Err(err));
        };
        if deadline.is_some_and(|d| now >= d) {
            return refuse(VsockError::Timeout { port, timeout });
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            return refuse(VsockError::TooManyConnections {
                max: MAX_CONNECTIONS,
            });
        }
        if let Err(e) = stream.set_nonblocking(true) {
            return refuse(VsockError::Io(e));
        }
        let Some(local_port) = self.alloc_local_port() else {
            return refuse(VsockError::TooManyConnections {
                max: MAX_CONNECTIONS,
            });
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let token = self.next_token;
        self.next_token += 1;
        let conn =
            Connection::connecting(key, self.guest_cid, stream, reply, timeout, deadline, token);
        self.conns.insert(key, conn);
        self.tokens.insert(token, key);
        self.touch(key);
    }

    /// A valid packet from the guest's TX queue, `data` its payload.
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            log::debug!(
                "virtio-vsock: dropping a packet from CID {} (the guest is CID {})",
                hdr.src_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            log::debug!(
                "virtio-vsock: resetting a packet to CID {} of type {} (only stream sockets to the host exist)",
                hdr.dst_cid,
                hdr.type_
            );
            return self.reply_rst(hdr);
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_guest_packet(hdr, data);
            return self.apply(key, verdict);
        }
        match hdr.op {
            op::RST => {}
            op::REQUEST => self.on_guest_request(hdr),
            _ => self.reply_rst(hdr),
        }
    }

    /// A guest `connect` to host port `hdr.dst_port`. No host listeners
    /// exist yet, so it is refused; a listener table would be consulted
    /// here, and an accepted connection created `Established` with a
    /// RESPONSE pending.
    fn on_guest_request(&mut self, hdr: &Header) {
        log::debug!(
            "virtio-vsock: refusing a guest connection to host port {}: nothing listens on the host",
            hdr.dst_port
        );
        self.reply_rst(hdr);
    }

    /// A TX chain that is not a valid packet; `hdr` is its header if one
    /// could be read. A connection it names is reset (its stream would be
    /// corrupt otherwise); anything else is answered with an RST.
    pub fn on_malformed(&mut self, hdr: Option<&Header>) {
        let Some(hdr) = hdr else {
            return;
        };
        if hdr.src_cid != self.guest_cid {
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if self.conns.contains_key(&key) {
            self.remove(key, true);
        } else {
            self.reply_rst(hdr);
        }
    }

    /// epoll reported `events` for the host end with `token`.
    pub fn on_host_event(&mut self, token: u64, events: EventSet, scratch: &mut [u8]) {
        // A connection removed earlier in the same batch: ignore.
        let Some(&key) = self.tokens.get(&token) else {
            return;
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            let verdict = conn.on_host_event(events, scratch);
            self.apply(key, verdict);
        }
    }

    /// The earliest deadline of any connection.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(Connection::deadline).min()
    }

    /// Marks connections whose deadline passed for [`Muxer::settle`].
    pub fn on_timer(&mut self, now: Instant) {
        let due: Vec<ConnKey> = self
            .conns
            .values()
            .filter(|c| c.deadline().is_some_and(|d| now >= d))
            .map(Connection::key)
            .collect();
        for key in due {
            self.touch(key);
        }
    }

    /// Re-examines every connection that changed: ends finished ones,
    /// updates epoll interest and the list of connections with packets.
    pub fn settle(&mut self, epoll: &Epoll, now: Instant) {
        while let Some(key) = self.touched.pop() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.touched = false;
            match conn.check(now) {
                Verdict::Keep => {}
                verdict => {
                    self.apply(key, verdict);
                    continue;
                }
            }
            if let Err(e) = sync_epoll(conn, epoll) {
                log::warn!(
                    "virtio-vsock: epoll_ctl on the host end of {key:?} failed, resetting it: {e}"
                );
                self.remove(key, true);
                continue;
            }
            if !conn.in_ready && conn.has_rx() {
                conn.in_ready = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Whether a packet waits for an RX buffer.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty()
            || self
                .ready
                .iter()
                .any(|k| self.conns.get(k).is_some_and(Connection::has_rx))
    }

    /// The next packet for the guest, its payload copied into `data` (the
    /// RX buffer's payload area, `None` for a header-only buffer).
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if let Some(hdr) = self.ctrl.pop_front() {
            return Some(hdr);
        }
        // Each connection gets one turn: one whose only packet is data
        // cannot use a header-only buffer.
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_ready = false;
            let hdr = conn.next_rx(data);
            if conn.has_rx() {
                conn.in_ready = true;
                self.ready.push_back(key);
            }
            // Sending may have made room for host data or finished it.
            self.touch(key);
            if hdr.is_some() {
                return hdr;
            }
        }
        None
    }

    /// Drops every connection (host ends see EOF, pending connects fail)
    /// and every queued packet: the guest forgets its side on a transport
    /// reset event.
    pub fn transport_reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key, false);
        }
        self.ctrl.clear();
        self.ready.clear();
        self.touched.clear();
    }
}

/// Brings the host end's epoll registration in line with what the
/// connection wants.
fn sync_epoll(conn: &mut Connection, epoll: &Epoll) -> std::io::Result<()> {
    let wanted = conn.should_register().then(|| conn.wanted_events());
    if wanted == conn.registered {
        return Ok(());
    }
    let fd = conn.raw_fd();
    match (conn.registered, wanted) {
        (None, Some(events)) => epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, conn.token),
        )?,
        (Some(_), Some(events)) => epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, conn.token),
        )?,
        (Some(_), None) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?,
        (None, None) => {}
    }
    conn.registered = wanted;
    Ok(())
}
