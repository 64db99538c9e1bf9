//! `Forward`: splices the host's stream with a TCP connection to a guest
//! port, so a host listener can expose a server running in the guest.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;

use crate::proto::{write_frame, ErrorKind, Forward, Frame, FrameReader, DATA_CHUNK};

/// Connects to `127.0.0.1:port` (then `[::1]:port`), answers `Done`, and
/// copies bytes both ways until both directions are closed.
pub fn serve(conn: &File, reader: &mut FrameReader<&File>, req: Forward) {
    let tcp = match TcpStream::connect(("127.0.0.1", req.port))
        .or_else(|_| TcpStream::connect(("::1", req.port)))
    {
        Ok(tcp) => tcp,
        Err(e) => {
            let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
                ErrorKind::ConnectionRefused
            } else {
                ErrorKind::Internal
            };
            let _ = write_frame(
                &mut &*conn,
                &Frame::error(
                    kind,
                    format!(
                        "cannot connect to port {} in the guest: {e}; is a server listening \
                         there on 127.0.0.1 or 0.0.0.0?",
                        req.port
                    ),
                ),
            );
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_frame(&mut &*conn, &Frame::Done).is_err() {
        return;
    }
    // Bytes the host sent right after the request are already buffered.
    let early = reader.decoder().buffered().to_vec();
    let (Ok(tcp_in), Ok(conn_out)) = (tcp.try_clone(), conn.try_clone()) else {
        return;
    };
    let upstream = std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || {
            // Guest server -> host.
            copy(&tcp_in, &conn_out);
            shutdown_write(&conn_out);
        });
    // Host -> guest server, on this thread.
    if (&tcp).write_all(&early).is_ok() {
        copy(conn, &tcp);
    }
    let _ = tcp.shutdown(Shutdown::Write);
    if let Ok(handle) = upstream {
        let _ = handle.join();
    }
}

/// Copies until EOF or an error on either side.
fn copy(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

fn shutdown_write(f: &File) {
    // SAFETY: shutdown only acts on the socket fd we hold open.
    unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
}
