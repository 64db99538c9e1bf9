//! Parsing, validating and executing one virtio-blk request (virtio 1.2,
//! section 5.2.6).
//!
//! The layout expected is the one every Linux driver produces: a readable
//! descriptor holding the 16-byte header (`type`, `reserved`, `sector`),
//! zero or more data descriptors (device-writable for reads and GET_ID,
//! device-readable for writes), and a final device-writable descriptor whose
//! last byte receives the status. Everything in a chain is guest-controlled:
//! each check here either rejects the request with `IOERR` or, if the chain
//! has no usable status byte, returns it to the driver untouched.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{SECTOR_SIZE, SEG_MAX};
use crate::disk::CowDisk;
use crate::vmm::memory::GuestMemory;

/// Size of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u32 = 16;
/// Upper bound on the data of one request. Linux issues at most a few MiB
/// (`max_sectors_kb`); anything larger is treated as a malformed request.
pub(super) const MAX_REQUEST_BYTES: u64 = 256 << 20;
/// Size of the bounce buffer between guest memory and the disk.
const CHUNK: usize = 128 << 10;
/// The answer to GET_ID, padded with zeros to 20 bytes.
pub(super) const DEVICE_ID: &[u8] = b"dormouse";

/// What the driver asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            other => Self::Unsupported(other),
        }
    }
}

/// One data buffer in guest memory.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// A request whose layout has been validated.
#[derive(Debug)]
struct Request {
    kind: RequestType,
    sector: u64,
    data: Vec<Segment>,
    data_len: u64,
    status: GuestAddress,
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("descriptor chain longer than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("the last descriptor is not a writable status byte")]
    BadStatusDescriptor,
    #[error("the chain has no header descriptor")]
    NoHeader,
    #[error("the header descriptor is device-writable")]
    WritableHeader,
    #[error("the header descriptor is {0} bytes, shorter than 16")]
    ShortHeader(u32),
    #[error("guest memory range {addr:#x}+{len:#x} is not in guest memory")]
    BadAddress { addr: u64, len: u64 },
    #[error("a data descriptor of a {0:?} request has the wrong direction")]
    WrongDirection(&'static str),
    #[error("request data of {0} bytes is not a whole number of sectors")]
    UnalignedLength(u64),
    #[error("request data of {0} bytes exceeds the limit")]
    TooLarge(u64),
    #[error("sectors {sector}+{bytes} bytes are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        bytes: u64,
        capacity: u64,
    },
}

/// The result of processing one chain.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Completion {
    /// Bytes the device wrote into the chain (the used element's `len`).
    pub written: u32,
    /// The status written, or `None` if the chain had no status byte.
    pub status: Option<u8>,
}

/// Processes the request in `chain` against `disk` and writes its status.
pub(super) fn process<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemory,
    disk: &std::sync::Mutex<CowDisk>,
    read_only: bool,
) -> Completion
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    let capacity = lock(disk).size() / SECTOR_SIZE;
    let (status_addr, result) = match parse(chain, mem, capacity) {
        Ok(req) => {
            let status_addr = req.status;
            (status_addr, execute(&req, mem, disk, read_only))
        }
        Err((Some(status_addr), e)) => {
            log::warn!("virtio-blk: rejecting a malformed request: {e}");
            (status_addr, (VIRTIO_BLK_S_IOERR, 0))
        }
        Err((None, e)) => {
            log::warn!("virtio-blk: dropping a request without a status byte: {e}");
            return Completion {
                written: 0,
                status: None,
            };
        }
    };
    let (status, data_written) = result;
    let status = status as u8;
    if let Err(e) = mem.write_obj(status, status_addr) {
        log::warn!("virtio-blk: could not write the request status: {e}");
        return Completion {
            written: data_written,
            status: None,
        };
    }
    Completion {
        written: data_written.saturating_add(1),
        status: Some(status),
    }
}

fn lock(disk: &std::sync::Mutex<CowDisk>) -> std::sync::MutexGuard<'_, CowDisk> {
    disk.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

type ParseResult = Result<Request, (Option<GuestAddress>, RequestError)>;

/// Validates the chain's layout; on error also returns the status byte's
/// address when the chain has a usable one.
fn parse<M>(chain: DescriptorChain<M>, mem: &GuestMemory, capacity: u64) -> ParseResult
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
{
    // Header + SEG_MAX data segments + status. The iterator itself stops a
    // looping chain after `queue size` descriptors; this bounds it further.
    let max_descs = SEG_MAX as usize + 2;
    let mut descs = Vec::with_capacity(4);
    for desc in chain {
        if descs.len() == max_descs {
            return Err((None, RequestError::TooManyDescriptors(max_descs)));
        }
        descs.push(desc);
    }

    let status_desc = descs.last().ok_or((None, RequestError::Empty))?;
    if !status_desc.is_write_only() || status_desc.len() == 0 {
        return Err((None, RequestError::BadStatusDescriptor));
    }
    let status = status_desc
        .addr()
        .checked_add(u64::from(status_desc.len()) - 1)
        .filter(|a| mem.check_range(*a, 1))
        .ok_or((None, RequestError::BadStatusDescriptor))?;
    let fail = |e| Err((Some(status), e));

    if descs.len() < 2 {
        return fail(RequestError::NoHeader);
    }
    let header = &descs[0];
    if header.is_write_only() {
        return fail(RequestError::WritableHeader);
    }
    if header.len() < HEADER_LEN {
        return fail(RequestError::ShortHeader(header.len()));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    if mem.read_slice(&mut raw, header.addr()).is_err() {
        return fail(RequestError::BadAddress {
            addr: header.addr().0,
            len: u64::from(HEADER_LEN),
        });
    }
    let kind = RequestType::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&raw[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    let data_descs = &descs[1..descs.len() - 1];
    let device_writes = match kind {
        RequestType::In | RequestType::GetId => Some(true),
        RequestType::Out => Some(false),
        // A flush carries no data; an unsupported request is answered
        // without touching its data.
        RequestType::Flush | RequestType::Unsupported(_) => None,
    };
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len = 0u64;
    if let Some(device_writes) = device_writes {
        for d in data_descs {
            if d.is_write_only() != device_writes {
                return fail(RequestError::WrongDirection(if device_writes {
                    "read"
                } else {
                    "write"
                }));
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return fail(RequestError::BadAddress {
                    addr: d.addr().0,
                    len: u64::from(d.len()),
                });
            }
            data_len += u64::from(d.len());
            if data_len > MAX_REQUEST_BYTES {
                return fail(RequestError::TooLarge(data_len));
            }
            data.push(Segment {
                addr: d.addr(),
                len: d.len(),
            });
        }
    }
    if matches!(kind, RequestType::In | RequestType::Out) {
        if data_len % SECTOR_SIZE != 0 {
            return fail(RequestError::UnalignedLength(data_len));
        }
        let in_range = sector
            .checked_add(data_len / SECTOR_SIZE)
            .is_some_and(|end| end <= capacity);
        if !in_range {
            return fail(RequestError::OutOfRange {
                sector,
                bytes: data_len,
                capacity,
            });
        }
    }
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status,
    })
}

/// Performs a validated request; returns the status and the number of data
/// bytes written into guest memory.
fn execute(
    req: &Request,
    mem: &GuestMemory,
    disk: &std::sync::Mutex<CowDisk>,
    read_only: bool,
) -> (u32, u32) {
    match req.kind {
        RequestType::In => {
            let mut written = 0u32;
            let result = transfer(req, |seg_addr, disk_off, buf| {
                lock(disk)
                    .read_at(buf, disk_off)
                    .map_err(|e| e.to_string())?;
                mem.write_slice(buf, seg_addr).map_err(|e| e.to_string())?;
                written = written.saturating_add(buf.len() as u32);
                Ok(())
            });
            match result {
                Ok(()) => (VIRTIO_BLK_S_OK, written),
                Err(e) => {
                    log::warn!("virtio-blk: read of sector {} failed: {e}", req.sector);
                    (VIRTIO_BLK_S_IOERR, written)
                }
            }
        }
        RequestType::Out if read_only => (VIRTIO_BLK_S_IOERR, 0),
        RequestType::Out => {
            let result = transfer(req, |seg_addr, disk_off, buf| {
                mem.read_slice(buf, seg_addr).map_err(|e| e.to_string())?;
                lock(disk)
                    .write_at(buf, disk_off)
                    .map_err(|e| e.to_string())
            });
            match result {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: write of sector {} failed: {e}", req.sector);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            }
        }
        RequestType::Flush => match lock(disk).flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(e) => {
                log::error!("virtio-blk: flush failed: {e}");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        },
        RequestType::GetId => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            id[..DEVICE_ID.len()].copy_from_slice(DEVICE_ID);
            let mut written = 0u32;
            let mut rest = &id[..];
            for seg in &req.data {
                let n = rest.len().min(seg.len as usize);
                if mem.write_slice(&rest[..n], seg.addr).is_err() {
                    return (VIRTIO_BLK_S_IOERR, written);
                }
                written += n as u32;
                rest = &rest[n..];
            }
            (VIRTIO_BLK_S_OK, written)
        }
        RequestType::Unsupported(t) => {
            log::debug!("virtio-blk: unsupported request type {t}");
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    }
}

/// Walks the request's data in bounce-buffer-sized pieces, calling
/// `f(guest address, disk offset, buffer)` for each.
fn transfer(
    req: &Request,
    mut f: impl FnMut(GuestAddress, u64, &mut [u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK.min(req.data_len as usize)];
    // In range: checked by `parse` (sector + data_len/512 <= capacity).
    let mut disk_off = req.sector * SECTOR_SIZE;
    for seg in &req.data {
        let mut done = 0u64;
        while done < u64::from(seg.len) {
            let n = (u64::from(seg.len) - done).min(CHUNK as u64) as usize;
            let addr = GuestAddress(seg.addr.0 + done);
            f(addr, disk_off, &mut buf[..n])?;
            done += n as u64;
            disk_off += n as u64;
        }
    }
    Ok(())
}
