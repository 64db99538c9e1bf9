//! One connection: the `Hello` handshake, then one request.

use std::fs::File;

use crate::log::log;
use crate::proto::{
    capability, write_frame, ErrorKind, Frame, FrameReader, Hello, HelloAck, ProtoError,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::{code, exec, files, forward, sync};

/// Serves `conn` until its request is answered, then closes it. Errors are
/// answered with an `Error` frame where the peer can still read it; a peer
/// that goes away is not an error.
pub fn serve(conn: File, init: bool) {
    let mut reader = FrameReader::new(&conn);
    let hello = match reader.read_frame() {
        Ok(Some(Frame::Hello(hello))) => hello,
        Ok(Some(other)) => {
            return reject(
                &conn,
                ProtoError::UnexpectedFrame {
                    got: other.frame_type(),
                    expected: "Hello",
                },
            )
        }
        // A probe that connects and leaves, or a peer that died.
        Ok(None) | Err(ProtoError::Io(_)) => return,
        Err(e) => return reject(&conn, e),
    };
    let version = match negotiate(&hello) {
        Ok(v) => v,
        Err(message) => {
            log!("refused a host: {message}");
            let _ = write_frame(
                &mut &conn,
                &Frame::error(ErrorKind::UnsupportedVersion, message),
            );
            return;
        }
    };
    let ack = Frame::HelloAck(HelloAck {
        version,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        capabilities: [
            capability::PING,
            capability::EXEC,
            capability::PROCESSES,
            capability::FILES,
            capability::CODE,
            capability::FORWARD,
            capability::SYNC,
        ]
        .map(String::from)
        .to_vec(),
        init,
    });
    if write_frame(&mut &conn, &ack).is_err() {
        return;
    }
    match reader.read_frame() {
        Ok(Some(Frame::Ping(ping))) => {
            let _ = write_frame(&mut &conn, &Frame::Pong(ping));
        }
        Ok(Some(Frame::Exec(req))) => exec::run(&conn, &mut reader, req),
        Ok(Some(Frame::ProcessRequest(req))) => exec::serve_request(&conn, &mut reader, req),
        Ok(Some(Frame::Forward(req))) => forward::serve(&conn, &mut reader, req),
        Ok(Some(Frame::Sync(req))) => sync::serve(&conn, req, init),
        Ok(Some(Frame::FileRequest(req))) => files::serve(&conn, &mut reader, req),
        Ok(Some(Frame::CodeRequest(req))) => code::serve(&conn, &mut reader, req),
        Ok(Some(other)) => reject(
            &conn,
            ProtoError::UnexpectedFrame {
                got: other.frame_type(),
                expected: "a request",
            },
        ),
        Ok(None) | Err(ProtoError::Io(_)) => {}
        Err(e) => reject(&conn, e),
    }
}

/// The highest version both sides speak.
fn negotiate(hello: &Hello) -> Result<u16, String> {
    let high = hello.max_version.min(PROTOCOL_VERSION);
    let low = hello.min_version.max(MIN_PROTOCOL_VERSION);
    if high < low {
        return Err(format!(
            "no common protocol version: the host speaks {}..={}, this agent \
             {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}; rebuild the guest template with the \
             host library's release",
            hello.min_version, hello.max_version
        ));
    }
    Ok(high)
}

/// Tells the peer what it did wrong (best effort) and logs it.
fn reject(conn: &File, e: ProtoError) {
    log!("rejected a connection: {e}");
    let _ = write_frame(
        &mut &*conn,
        &Frame::error(ErrorKind::Protocol, e.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min_version: u16, max_version: u16) -> Hello {
        Hello {
            min_version,
            max_version,
            client: String::new(),
        }
    }

    #[test]
    fn picks_the_highest_common_version() {
        assert_eq!(negotiate(&hello(1, 1)), Ok(1));
        assert_eq!(negotiate(&hello(1, 9)), Ok(PROTOCOL_VERSION));
        assert!(negotiate(&hello(PROTOCOL_VERSION + 1, 9)).is_err());
        assert!(negotiate(&hello(0, 0)).is_err());
        assert!(negotiate(&hello(5, 2)).is_err());
    }
}
