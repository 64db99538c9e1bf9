//! (being written) files requests.

use std::fs::File;

use crate::proto::{ErrorKind, Frame, FrameReader, write_frame};

/// Answers one request on `conn`.
pub fn serve(conn: &File, _reader: &mut FrameReader<&File>, _req: crate::proto::FileRequest) {
    let _ = write_frame(&mut &*conn, &Frame::error(ErrorKind::Internal, "not built yet"));
}
