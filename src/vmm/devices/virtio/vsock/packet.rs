//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) and the
//! constants of the stream protocol.
//!
//! Guest buffers are parsed with [`virtio_vsock::packet::VsockPacket`],
//! which reads the header once (no time-of-check/time-of-use games) and
//! checks that header and payload lie in guest memory. Everything in a
//! header is guest-controlled: callers validate addresses, type and op
//! before acting on one.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestMemory as GuestMemoryTrait, VolatileSlice};

pub(super) use virtio_vsock::packet::PKT_HEADER_SIZE;

/// The host's CID (`VMADDR_CID_HOST`): every packet we send comes from it.
pub(super) const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type we offer.
pub(super) const TYPE_STREAM: u16 = 1;

/// The largest payload of one packet, in either direction (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub(super) const MAX_PKT_DATA: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub(super) const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub(super) const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub(super) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the id of the only event.
pub(super) const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub(super) const EVENT_SIZE: u32 = 4;

/// `VIRTIO_VSOCK_OP_*`: what a packet asks for.
pub(super) mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, aborted or closed).
    pub const RST: u16 = 3;
    /// One or both directions shut down (flags say which).
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// Unsolicited credit information.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// The fields of `struct virtio_vsock_hdr`, in host byte order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    /// The sender's CID.
    pub src_cid: u64,
    /// The receiver's CID.
    pub dst_cid: u64,
    /// The sender's port.
    pub src_port: u32,
    /// The receiver's port.
    pub dst_port: u32,
    /// Payload bytes following the header.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// What the packet asks for (`op::*`).
    pub op: u16,
    /// `SHUTDOWN_*` flags of a SHUTDOWN packet.
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Payload bytes the sender has consumed on this connection (wraps).
    pub fwd_cnt: u32,
}

impl Header {
    /// The header as the virtio spec lays it out (little-endian, packed).
    pub fn to_bytes(self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes a header laid out as in [`Header::to_bytes`].
    pub fn from_bytes(b: &[u8; PKT_HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(x)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// A header-only reply to this packet: addresses swapped, no credit
    /// information.
    pub fn reply(&self, op: u16) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            len: 0,
            type_: self.type_,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// A packet the guest put on the TX queue.
pub(super) struct TxPacket<'a, B: BitmapSlice> {
    /// Its header, read once from guest memory.
    pub header: Header,
    /// Its payload (`header.len` bytes), still in guest memory.
    pub data: Option<VolatileSlice<'a, B>>,
}

/// A TX chain that is not a valid packet.
#[derive(Debug)]
pub(super) struct MalformedTx {
    /// The header, if the chain's first descriptor holds a readable one
    /// (so the sender can be told with a reset).
    pub header: Option<Header>,
    /// What is wrong with it.
    pub reason: virtio_vsock::packet::Error,
}

/// Parses a guest-to-host packet.
pub(super) fn parse_tx<'a, M, T>(
    mem: &'a M,
    chain: &mut DescriptorChain<T>,
) -> Result<TxPacket<'a, <M::Bitmap as vm_memory::bitmap::WithBitmapSlice<'a>>::S>, MalformedTx>
where
    M: GuestMemoryTrait,
    T: Deref + Clone,
    T::Target: GuestMemoryTrait,
{
    // Keep a copy of the chain: if parsing fails we still try to find out
    // whom to reset.
    let fallback = chain.clone();
    match VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA) {
        Ok(pkt) => {
            let header = Header::from_packet(&pkt);
            // `from_tx_virtq_chain` maps exactly `len` bytes of payload (or
            // none when `len` is 0).
            let data = pkt.data_slice().cloned();
            Ok(TxPacket { header, data })
        }
        Err(reason) => Err(MalformedTx {
            header: readable_header(mem, fallback),
            reason,
        }),
    }
}

/// The header in the first descriptor of `chain`, if that descriptor is
/// device-readable and large enough.
fn readable_header<M, T>(mem: &M, mut chain: DescriptorChain<T>) -> Option<Header>
where
    M: GuestMemoryTrait,
    T: Deref,
    T::Target: GuestMemoryTrait,
{
    let desc = chain.next()?;
    if desc.is_write_only() || (desc.len() as usize) < PKT_HEADER_SIZE {
        return None;
    }
    let mut raw = [0u8; PKT_HEADER_SIZE];
    mem.read_slice(&mut raw, desc.addr()).ok()?;
    Some(Header::from_bytes(&raw))
}

/// Copies `parts` one after the other into the start of `slice`; returns
/// the bytes copied (all of them unless `slice` is too short).
pub(super) fn write_parts<B: BitmapSlice>(slice: &VolatileSlice<'_, B>, parts: &[&[u8]]) -> usize {
    let mut offset = 0;
    for part in parts {
        let n = part.len().min(slice.len().saturating_sub(offset));
        if n == 0 {
            break;
        }
        // In bounds by construction; `write_slice` marks the pages dirty.
        if slice.write_slice(&part[..n], offset).is_err() {
            break;
        }
        offset += n;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_bytes() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 3,
            src_port: 0xdead_beef,
            dst_port: 1234,
            len: 4096,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_BOTH,
            buf_alloc: 256 * 1024,
            fwd_cnt: u32::MAX,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08, "little-endian");
        assert_eq!(&b[24..28], &4096u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn reply_swaps_addresses() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 10,
            dst_port: 20,
            len: 7,
            type_: 2,
            op: op::RW,
            flags: 1,
            buf_alloc: 5,
            fwd_cnt: 6,
        };
        let r = h.reply(op::RST);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (2, 3, 20, 10)
        );
        assert_eq!((r.len, r.type_, r.op, r.flags), (0, 2, op::RST, 0));
    }
}
