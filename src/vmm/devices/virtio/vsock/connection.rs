//! One stream connection between a host-side Unix socket and a guest
//! `AF_VSOCK` socket: its state machine and credit-based flow control
//! (virtio 1.2, section 5.10.6.3).
//!
//! Flow control in both directions is bounded:
//! - guest to host: we advertise [`CONN_BUF_SIZE`] bytes of buffer
//!   (`buf_alloc`) and count what we wrote to the host socket (`fwd_cnt`).
//!   What the host socket does not take at once waits in `to_host`; a guest
//!   that sends more than it was granted is reset. A slow host reader
//!   therefore stalls the guest's credit, never our memory.
//! - host to guest: we read from the host socket only as much as the guest
//!   has room for (its `buf_alloc` minus what is in flight) and at most
//!   [`STAGE_SIZE`] bytes ahead of the RX queue.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    self, op, Header, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::VsockError;

/// The receive buffer we advertise to the guest for each connection
/// (`buf_alloc`): the most guest data we hold for a host reader that is
/// slower than the guest.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;

/// The most host data read ahead of the guest's RX buffers, per connection.
pub(super) const STAGE_SIZE: usize = 64 * 1024;

/// How long a closing connection waits for the guest's final RST (or for
/// its last data to reach the host) before we reset it ourselves.
#[cfg(not(test))]
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(5);
#[cfg(test)]
pub(super) const CLOSE_GRACE: Duration = Duration::from_millis(300);

/// Where the answer to a host `connect` goes.
pub(super) type ConnectReply = SyncSender<Result<(), VsockError>>;

/// A connection's address: our (host) port and the guest's port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    /// The host-side port (`src_port` of the packets we send).
    pub local_port: u32,
    /// The guest-side port (`dst_port` of the packets we send).
    pub peer_port: u32,
}

/// What the muxer must do with a connection after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(super) enum Verdict {
    /// It lives on.
    Keep,
    /// Send the guest an RST and forget the connection.
    Reset,
    /// Forget the connection without telling the guest (it reset it).
    Close,
}

enum State {
    /// We sent (or are about to send) REQUEST and wait for the guest.
    Connecting {
        reply: Option<ConnectReply>,
        request_sent: bool,
        timeout: Duration,
    },
    /// Data flows.
    Established,
    /// Both sides are done, or the guest shut down both directions: we
    /// wait for the guest's RST (or for our last data to reach the host)
    /// until `deadline`.
    Closing,
}

/// One connection. See the module documentation for the flow control.
pub(super) struct Connection {
    key: ConnKey,
    guest_cid: u64,
    stream: UnixStream,
    state: State,
    /// When the connect times out, or a closing connection is reset.
    deadline: Option<Instant>,

    // Guest to host.
    /// Guest data the host socket has not taken yet (at most `CONN_BUF_SIZE`).
    to_host: VecDeque<u8>,
    /// Bytes of guest data written to the host socket (or discarded).
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest sent CREDIT_REQUEST.
    credit_update_asked: bool,

    // Host to guest.
    /// Host data read ahead of the guest's RX buffers.
    to_guest: VecDeque<u8>,
    /// Bytes of host data sent to the guest.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// We asked the guest for credit and have heard nothing new since.
    credit_requested: bool,

    // Shutdown.
    /// The host end reached EOF: the host sends no more.
    host_eof: bool,
    /// The host end hung up: nothing can be written to it any more.
    host_hup: bool,
    /// We shut down the write side of the host end (its reader saw EOF).
    host_write_shut: bool,
    /// The `SHUTDOWN_*` flags the guest sent so far.
    guest_shut: u32,
    /// The `SHUTDOWN_*` flags we sent so far.
    shutdown_sent: u32,

    // Muxer bookkeeping.
    /// The epoll token of the host end.
    pub token: u64,
    /// The events the host end is registered for, if it is registered.
    pub registered: Option<EventSet>,
    /// The connection is in the muxer's list of connections with packets to send.
    pub in_ready: bool,
    /// The connection is in the muxer's list of connections to re-examine.
    pub touched: bool,
}

impl Connection {
    /// A host-initiated connection to guest port `key.peer_port`; its
    /// REQUEST goes out with the next RX buffer. `stream` must be non-blocking.
    pub fn connecting(
        key: ConnKey,
        guest_cid: u64,
        stream: UnixStream,
        reply: ConnectReply,
        timeout: Duration,
        deadline: Option<Instant>,
        token: u64,
    ) -> Self {
        Self {
            key,
            guest_cid,
            stream,
            state: State::Connecting {
                reply: Some(reply),
                request_sent: false,
                timeout,
            },
            deadline,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            credit_update_asked: false,
            to_guest: VecDeque::new(),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            credit_requested: false,
            host_eof: false,
            host_hup: false,
            host_write_shut: false,
            guest_shut: 0,
            shutdown_sent: 0,
            token,
            registered: None,
            in_ready: false,
            touched: false,
        }
    }

    /// The connection's address.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The host end, for epoll.
    pub fn raw_fd(&self) -> i32 {
        self.stream.as_raw_fd()
    }

    /// When the connection next needs attention without any event.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the guest has heard of this connection (so an RST means
    /// something to it).
    pub fn guest_knows(&self) -> bool {
        !matches!(
            self.state,
            State::Connecting {
                request_sent: false,
                ..
            }
        )
    }

    /// Answers a pending host `connect` with `err` (no-op once answered).
    pub fn fail_connect(&mut self, err: VsockError) {
        if let State::Connecting { reply, .. } = &mut self.state {
            if let Some(reply) = reply.take() {
                // The caller may have given up already; nothing to do then.
                let _ = reply.send(Err(err));
            }
        }
    }

    /// A header from us to the guest, carrying our credit information.
    fn header(&self, op: u16, len: u32, flags: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// An RST for this connection.
    pub fn rst_header(&self) -> Header {
        self.header(op::RST, 0, 0)
    }

    /// Bytes the guest can still take: its `buf_alloc` minus what is in
    /// flight. Zero if the guest's numbers make no sense.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn is_connecting(&self) -> bool {
        matches!(self.state, State::Connecting { .. })
    }

    /// How many bytes we may read from the host end now.
    fn read_room(&self) -> usize {
        if self.is_connecting() || self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0 {
            return 0;
        }
        let credit = (self.peer_credit() as usize).saturating_sub(self.to_guest.len());
        credit.min(STAGE_SIZE.saturating_sub(self.to_guest.len()))
    }

    /// The epoll events the host end should be registered for.
    pub fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.read_room() > 0 {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() && !self.host_hup {
            events |= EventSet::OUT;
        }
        events
    }

    /// Whether the host end should be in the epoll set at all. Once it hung
    /// up, epoll reports it ready (`EPOLLHUP`) whatever we ask for, so it is
    /// registered only while we want to read from or write to it.
    pub fn should_register(&self) -> bool {
        !self.is_connecting() && (!self.host_hup || !self.wanted_events().is_empty())
    }

    /// Discards guest data no one will read, as if forwarded.
    fn discard_to_host(&mut self) {
        self.fwd_cnt += Wrapping(self.to_host.len() as u32);
        self.to_host.clear();
    }

    /// The host end is ready (`events` as epoll reported them).
    pub fn on_host_event(&mut self, events: EventSet, scratch: &mut [u8]) -> Verdict {
        if events.intersects(EventSet::HANG_UP | EventSet::ERROR) && !self.host_hup {
            self.host_hup = true;
            self.discard_to_host();
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            if let Verdict::Reset = self.read_host(scratch) {
                return Verdict::Reset;
            }
        }
        if events.contains(EventSet::OUT) {
            return self.flush_to_host();
        }
        Verdict::Keep
    }

    /// Reads what the guest has room for from the host end.
    fn read_host(&mut self, scratch: &mut [u8]) -> Verdict {
        loop {
            let room = self.read_room().min(scratch.len());
            if room == 0 {
                return Verdict::Keep;
            }
            match (&self.stream).read(&mut scratch[..room]) {
                Ok(0) => {
                    self.host_eof = true;
                    return Verdict::Keep;
                }
                Ok(n) => self.to_guest.extend(&scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Verdict::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!(
                        "virtio-vsock: reading the host end of {:?} failed, resetting it: {e}",
                        self.key
                    );
                    return Verdict::Reset;
                }
            }
        }
    }

    /// Writes pending guest data to the host end.
    fn flush_to_host(&mut self) -> Verdict {
        while !self.to_host.is_empty() && !self.host_hup {
            let (front, _) = self.to_host.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!(
                        "virtio-vsock: writing to the host end of {:?} failed, resetting it: {e}",
                        self.key
                    );
                    return Verdict::Reset;
                }
            }
        }
        self.shut_host_write_if_done();
        Verdict::Keep
    }

    /// Once the guest sends no more and everything reached the host, the
    /// host reader sees EOF.
    fn shut_host_write_if_done(&mut self) {
        if self.guest_shut & SHUTDOWN_SEND != 0 && self.to_host.is_empty() && !self.host_write_shut
        {
            self.host_write_shut = true;
            // Fails only if the host end is gone already, which is fine.
            let _ = self.stream.shutdown(Shutdown::Write);
        }
    }

    /// A packet from the guest for this connection (addresses and type
    /// already checked); `data` is its payload.
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) -> Verdict {
        // Every packet carries the sender's credit information.
        if self.peer_buf_alloc != hdr.buf_alloc || self.peer_fwd_cnt.0 != hdr.fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);

        if let State::Connecting { reply, .. } = &mut self.state {
            let port = self.key.peer_port;
            let reply = reply.take();
            return match hdr.op {
                op::RESPONSE => {
                    self.state = State::Established;
                    self.deadline = None;
                    match reply.map(|r| r.send(Ok(()))) {
                        Some(Ok(())) => Verdict::Keep,
                        // The caller gave up (timed out) in the meantime.
                        _ => Verdict::Reset,
                    }
                }
                op::RST => {
                    if let Some(r) = reply {
                        let _ = r.send(Err(VsockError::ConnectionRefused { port }));
                    }
                    Verdict::Close
                }
                other => {
                    log::debug!(
                        "virtio-vsock: the guest answered a connection request to port {port} with op {other}; resetting"
                    );
                    if let Some(r) = reply {
                        let _ = r.send(Err(VsockError::ConnectionRefused { port }));
                    }
                    Verdict::Reset
                }
            };
        }

        match hdr.op {
            op::RW => self.on_guest_data(data),
            op::CREDIT_UPDATE => Verdict::Keep,
            op::CREDIT_REQUEST => {
                self.credit_update_asked = true;
                Verdict::Keep
            }
            op::SHUTDOWN => {
                self.on_guest_shutdown(hdr.flags);
                Verdict::Keep
            }
            op::RST => Verdict::Close,
            other => {
                log::debug!(
                    "virtio-vsock: unexpected op {other} on connection {:?}; resetting it",
                    self.key
                );
                Verdict::Reset
            }
        }
    }

    fn on_guest_data(&mut self, data: &[u8]) -> Verdict {
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            log::debug!(
                "virtio-vsock: the guest sent data on {:?} after shutting down sending; resetting",
                self.key
            );
            return Verdict::Reset;
        }
        if self.host_hup {
            // We told the guest (SHUTDOWN_RCV) that no one reads any more.
            self.fwd_cnt += Wrapping(data.len() as u32);
            return Verdict::Keep;
        }
        if self.to_host.len() + data.len() > CONN_BUF_SIZE as usize {
            log::warn!(
                "virtio-vsock: the guest sent {} bytes on {:?} with {} bytes already buffered, more than the {CONN_BUF_SIZE} bytes of credit it was given; resetting the connection",
                data.len(),
                self.key,
                self.to_host.len()
            );
            return Verdict::Reset;
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            while written < data.len() {
                match send_nosignal(&self.stream, &data[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!(
                            "virtio-vsock: writing to the host end of {:?} failed, resetting it: {e}",
                            self.key
                        );
                        return Verdict::Reset;
                    }
                }
            }
            self.fwd_cnt += Wrapping(written as u32);
        }
        self.to_host.extend(&data[written..]);
        Verdict::Keep
    }

    fn on_guest_shutdown(&mut self, flags: u32) {
        let new = flags & SHUTDOWN_BOTH & !self.guest_shut;
        self.guest_shut |= new;
        if new & SHUTDOWN_RCV != 0 {
            // The guest reads no more: stop reading the host, and let the
            // host writer see EPIPE.
            self.to_guest.clear();
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if new & SHUTDOWN_SEND != 0 {
            self.shut_host_write_if_done();
        }
    }

    /// The SHUTDOWN flags we owe the guest.
    fn shutdown_wanted(&self) -> u32 {
        let mut flags = 0;
        if self.host_eof && self.to_guest.is_empty() {
            flags |= SHUTDOWN_SEND;
        }
        if self.host_hup {
            flags |= SHUTDOWN_RCV;
        }
        flags
    }

    fn shutdown_pending(&self) -> bool {
        self.shutdown_wanted() & !self.shutdown_sent != 0
    }

    fn data_ready(&self) -> bool {
        !self.to_guest.is_empty() && self.peer_credit() > 0
    }

    /// Whether the guest should hear our `fwd_cnt` now: it asked, or it
    /// believes our buffer is less than half free while we freed a quarter
    /// of it since we last told it.
    fn credit_update_due(&self) -> bool {
        if self.credit_update_asked {
            return true;
        }
        let rx_cnt = self.fwd_cnt + Wrapping(self.to_host.len() as u32);
        let believed_used = (rx_cnt - self.last_fwd_cnt_sent).0;
        let believed_free = CONN_BUF_SIZE.saturating_sub(believed_used);
        let freed = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        believed_free < CONN_BUF_SIZE / 2 && freed >= CONN_BUF_SIZE / 4
    }

    /// Whether to ask the guest for credit: it has none left for us, the
    /// host may have more to say, and we have not asked since it last told
    /// us anything.
    fn credit_request_due(&self) -> bool {
        !self.credit_requested
            && self.peer_credit() == 0
            && !self.host_eof
            && self.guest_shut & SHUTDOWN_RCV == 0
    }

    /// Whether [`Connection::next_rx`] has a packet to give.
    pub fn has_rx(&self) -> bool {
        match self.state {
            State::Connecting { request_sent, .. } => !request_sent,
            State::Established | State::Closing => {
                self.data_ready()
                    || self.shutdown_pending()
                    || self.credit_update_due()
                    || self.credit_request_due()
            }
        }
    }

    /// The next packet for the guest, its payload (if any) copied into
    /// `data`, the RX buffer's payload area.
    pub fn next_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<Header> {
        if let State::Connecting { request_sent, .. } = &mut self.state {
            if *request_sent {
                return None;
            }
            *request_sent = true;
            self.last_fwd_cnt_sent = self.fwd_cnt;
            return Some(self.header(op::REQUEST, 0, 0));
        }
        let hdr = if let Some(n) = self
            .data_ready()
            .then(|| self.copy_to_guest(data))
            .flatten()
        {
            self.header(op::RW, n, 0)
        } else if self.shutdown_pending() {
            let flags = self.shutdown_wanted();
            self.shutdown_sent |= flags;
            self.header(op::SHUTDOWN, 0, flags)
        } else if self.credit_update_due() {
            self.header(op::CREDIT_UPDATE, 0, 0)
        } else if self.credit_request_due() {
            self.credit_requested = true;
            self.header(op::CREDIT_REQUEST, 0, 0)
        } else {
            return None;
        };
        // Every packet tells the guest our fwd_cnt.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_asked = false;
        Some(hdr)
    }

    /// Moves as much staged host data as the buffer and the guest's credit
    /// allow into `data`; returns the byte count, `None` if nothing moved.
    fn copy_to_guest<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<u32> {
        let slice = data?;
        let n = slice
            .len()
            .min(self.to_guest.len())
            .min(self.peer_credit() as usize)
            .min(packet::MAX_PKT_DATA as usize);
        let (a, b) = self.to_guest.as_slices();
        let first = n.min(a.len());
        let copied = packet::write_parts(slice, &[&a[..first], &b[..n - first]]);
        if copied == 0 {
            return None;
        }
        self.to_guest.drain(..copied);
        self.tx_cnt += Wrapping(copied as u32);
        Some(copied as u32)
    }

    /// Checks deadlines and whether the connection is finished.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let expired = self.deadline.is_some_and(|d| now >= d);
        match &mut self.state {
            State::Connecting {
                reply,
                request_sent,
                timeout,
            } => {
                if !expired {
                    return Verdict::Keep;
                }
                if let Some(r) = reply.take() {
                    let _ = r.send(Err(VsockError::Timeout {
                        port: self.key.peer_port,
                        timeout: *timeout,
                    }));
                }
                // A REQUEST the guest may still answer must be withdrawn.
                return if *request_sent {
                    Verdict::Reset
                } else {
                    Verdict::Close
                };
            }
            State::Closing if expired => return Verdict::Reset,
            State::Closing | State::Established => {}
        }
        let flushed = self.to_host.is_empty();
        if self.guest_shut == SHUTDOWN_BOTH {
            // The guest closed its socket and waits for our RST; it gets
            // it once its last data reached the host.
            if flushed {
                return Verdict::Reset;
            }
            self.start_closing(now);
            return Verdict::Keep;
        }
        let guest_done =
            self.guest_shut & SHUTDOWN_SEND != 0 || self.shutdown_sent & SHUTDOWN_RCV != 0;
        let we_done =
            self.shutdown_sent & SHUTDOWN_SEND != 0 || self.guest_shut & SHUTDOWN_RCV != 0;
        if guest_done && we_done && flushed {
            // Nothing can flow any more: wait a little for the guest's RST.
            self.start_closing(now);
        }
        Verdict::Keep
    }

    fn start_closing(&mut self, now: Instant) {
        if !matches!(self.state, State::Closing) {
            self.state = State::Closing;
            self.deadline = Some(now + CLOSE_GRACE);
        }
    }
}

/// `send(2)` with `MSG_NOSIGNAL`: a host end closed under us gives `EPIPE`,
/// not a `SIGPIPE` that would kill an embedding process that did not
/// ignore it.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is a valid, initialised slice for `buf.len()` bytes for
    // the duration of the call, and the fd is owned by `stream`, open while
    // we borrow it.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
