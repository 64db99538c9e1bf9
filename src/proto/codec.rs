//! Encoding and decoding of frames: pure functions over byte buffers, a
//! buffering [`Decoder`] for callers that do their own (possibly async) I/O,
//! and blocking helpers over `std::io`.

use std::io::{self, Read, Write};

use super::{
    Frame, FrameType, ProtoError, HEADER_LEN, MAGIC, MAX_FRAME_PAYLOAD, MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
};

/// A decoded and validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The protocol version of the frame.
    pub version: u16,
    /// The frame type.
    pub frame_type: FrameType,
    /// The payload length, at most [`MAX_FRAME_PAYLOAD`].
    pub len: usize,
}

/// The header of a frame of type `ty` with a payload of `len` bytes.
///
/// Fails with [`ProtoError::TooLarge`] when `len` exceeds
/// [`MAX_FRAME_PAYLOAD`].
pub fn encode_header(ty: FrameType, len: usize) -> Result<[u8; HEADER_LEN], ProtoError> {
    if len > MAX_FRAME_PAYLOAD {
        return Err(ProtoError::TooLarge {
            len: len as u64,
            max: MAX_FRAME_PAYLOAD,
        });
    }
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&ty.to_u16().to_le_bytes());
    // `len` fits: it is at most MAX_FRAME_PAYLOAD (1 MiB).
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(h)
}

/// Decodes and validates a frame header (magic, version, type, length).
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, ProtoError> {
    let [m0, m1, m2, m3, v0, v1, t0, t1, l0, l1, l2, l3] = *h;
    let magic = [m0, m1, m2, m3];
    if magic != MAGIC {
        return Err(ProtoError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([v0, v1]);
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
        return Err(ProtoError::UnsupportedVersion {
            found: version,
            min: MIN_PROTOCOL_VERSION,
            max: PROTOCOL_VERSION,
        });
    }
    let raw_type = u16::from_le_bytes([t0, t1]);
    let frame_type = FrameType::from_u16(raw_type).ok_or(ProtoError::UnknownFrameType(raw_type))?;
    let len = u32::from_le_bytes([l0, l1, l2, l3]);
    if u64::from(len) > MAX_FRAME_PAYLOAD as u64 {
        return Err(ProtoError::TooLarge {
            len: u64::from(len),
            max: MAX_FRAME_PAYLOAD,
        });
    }
    Ok(Header {
        version,
        frame_type,
        len: len as usize,
    })
}

/// Encodes a frame (header and payload) into a new buffer.
///
/// Fails with [`ProtoError::TooLarge`] when the payload would exceed
/// [`MAX_FRAME_PAYLOAD`]; split data into chunks of at most
/// [`super::DATA_CHUNK`] bytes.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, ProtoError> {
    let mut out = Vec::with_capacity(HEADER_LEN + 64);
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    frame.write_payload(&mut out)?;
    let header = encode_header(frame.frame_type(), out.len() - HEADER_LEN)?;
    out[..HEADER_LEN].copy_from_slice(&header);
    Ok(out)
}

/// Reads the header at the start of `buf` if enough bytes are there.
///
/// The magic is checked on as many bytes as are present, so a stream that
/// does not speak the protocol is rejected at its first byte.
fn peek_header(buf: &[u8]) -> Result<Option<Header>, ProtoError> {
    let n = buf.len().min(MAGIC.len());
    if buf[..n] != MAGIC[..n] {
        let mut found = [0u8; 4];
        found[..n].copy_from_slice(&buf[..n]);
        return Err(ProtoError::BadMagic { found });
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    decode_header(&h).map(Some)
}

/// Decodes the frame at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame (read more and
/// call again), or the frame and the number of bytes it used. Never reads
/// past the frame and never allocates more than the frame's validated
/// payload length.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some(header) = peek_header(buf)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + header.len;
    let Some(payload) = buf.get(HEADER_LEN..total) else {
        return Ok(None);
    };
    let frame = Frame::from_payload(header.frame_type, payload)?;
    Ok(Some((frame, total)))
}

/// Writes one frame to a blocking writer (one `write_all` of header and
/// payload together).
pub fn write_frame<W: Write + ?Sized>(w: &mut W, frame: &Frame) -> Result<(), ProtoError> {
    let bytes = encode(frame)?;
    w.write_all(&bytes)?;
    Ok(())
}

/// Writes one data frame (`Stdin`, `Stdout`, `Stderr` or `StdinEof`) with
/// `payload` as raw bytes, without building a [`Frame`].
///
/// Fails with [`ProtoError::InvalidPayload`] for a frame type whose payload is
/// JSON, or [`ProtoError::TooLarge`] for an oversized payload.
pub fn write_raw_frame<W: Write + ?Sized>(
    w: &mut W,
    ty: FrameType,
    payload: &[u8],
) -> Result<(), ProtoError> {
    if !(ty.is_data() || (ty.is_empty() && payload.is_empty())) {
        return Err(ProtoError::InvalidPayload {
            frame: ty,
            reason: "only data frames can be written from raw bytes".into(),
        });
    }
    let header = encode_header(ty, payload.len())?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&header);
    bytes.extend_from_slice(payload);
    w.write_all(&bytes)?;
    Ok(())
}

/// A receive buffer that turns a byte stream into frames.
///
/// The caller reads into [`Decoder::read_space`], reports the count with
/// [`Decoder::commit`] and takes frames out with [`Decoder::next_frame`].
/// The buffer never holds more than one incomplete frame plus one read, so
/// its size is bounded by [`MAX_FRAME_PAYLOAD`] plus the read size. After an
/// error the stream has lost its framing: drop the connection.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty decoder that reuses `buf`'s allocation (its contents are
    /// ignored).
    pub fn with_buffer(buf: Vec<u8>) -> Self {
        Self {
            buf,
            start: 0,
            end: 0,
        }
    }

    /// Gives the allocation back for reuse.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// The bytes received but not yet decoded.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// How many more bytes the next frame needs at least (0 when a complete
    /// frame, or an invalid header, is buffered).
    pub fn needed(&self) -> usize {
        let have = self.end - self.start;
        match peek_header(self.buffered()) {
            Ok(Some(h)) => (HEADER_LEN + h.len).saturating_sub(have),
            Ok(None) => HEADER_LEN.saturating_sub(have).max(1),
            Err(_) => 0,
        }
    }

    /// A writable slice of at least `min` bytes (and at least what the
    /// frame being received still needs) to read new bytes into.
    pub fn read_space(&mut self, min: usize) -> &mut [u8] {
        let want = min.max(self.needed()).max(1);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were read into the slice [`Self::read_space`]
    /// returned.
    pub fn commit(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end = (self.end + n).min(self.buf.len());
    }

    /// Appends received bytes (a copying alternative to
    /// [`Self::read_space`] + [`Self::commit`]).
    pub fn feed(&mut self, data: &[u8]) {
        let space = self.read_space(data.len());
        space[..data.len()].copy_from_slice(data);
        self.commit(data.len());
    }

    /// The next complete frame, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        match decode(self.buffered())? {
            Some((frame, used)) => {
                self.start += used;
                if self.start == self.end {
                    self.start = 0;
                    self.end = 0;
                }
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Checks the buffer at the end of the stream: an incomplete frame left
    /// in it means the peer closed mid-frame ([`ProtoError::Truncated`]).
    pub fn finish(&self) -> Result<(), ProtoError> {
        let got = self.end - self.start;
        if got == 0 {
            return Ok(());
        }
        Err(ProtoError::Truncated {
            expected: got + self.needed().max(1),
            got,
        })
    }
}

/// Reads frames from a blocking reader with few, large reads.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: Decoder,
    chunk: usize,
}

impl<R: Read> FrameReader<R> {
    /// Read size used when the frame being received does not need more.
    pub const DEFAULT_CHUNK: usize = 64 * 1024;

    /// A reader over `inner`.
    pub fn new(inner: R) -> Self {
        Self::with_decoder(inner, Decoder::new())
    }

    /// A reader over `inner` reusing `decoder` (and its buffer).
    pub fn with_decoder(inner: R, decoder: Decoder) -> Self {
        Self {
            inner,
            decoder,
            chunk: Self::DEFAULT_CHUNK,
        }
    }

    /// The next frame, blocking until it is complete. `Ok(None)` when the
    /// stream ends cleanly between frames; [`ProtoError::Truncated`] when it
    /// ends inside one.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(frame));
            }
            if self.fill()? == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }

    /// Performs one `read` on the underlying stream into the buffer
    /// (retrying only on `EINTR`). `Ok(0)` means end of stream.
    pub fn fill(&mut self) -> io::Result<usize> {
        let space = self.decoder.read_space(self.chunk);
        loop {
            match self.inner.read(space) {
                Ok(n) => {
                    self.decoder.commit(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next frame already buffered, without reading.
    pub fn next_buffered(&mut self) -> Result<Option<Frame>, ProtoError> {
        self.decoder.next_frame()
    }

    /// The decoder (to check [`Decoder::finish`] at end of stream).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The underlying stream, mutably.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Splits into the stream and the decoder (for buffer reuse).
    pub fn into_parts(self) -> (R, Decoder) {
        (self.inner, self.decoder)
    }
}
