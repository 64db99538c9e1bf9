//! Port forwarding: a stream spliced with a TCP connection to a guest port.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::{hello_msg, remote, unexpected, AgentError, Conn};
use crate::proto::{Forward, Frame};

/// Asks the agent to connect to `port` on the guest's loopback. Returns the
/// stream, which from then on carries the TCP connection's bytes, and the
/// first of those bytes if some arrived together with the agent's answer.
/// Fails with a remote `ConnectionRefused` when nothing listens there.
pub async fn forward<S>(stream: S, port: u16) -> Result<(S, Vec<u8>), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn::new(stream);
    conn.send(&[Frame::Hello(hello_msg()), Frame::Forward(Forward { port })])
        .await?;
    conn.read_ack().await?;
    match conn.next("waiting for the guest port to answer").await? {
        Frame::Done => {}
        Frame::Error(e) => return Err(remote(e)),
        other => return Err(unexpected(&other, "Done")),
    }
    let Conn { stream, dec } = conn;
    // Bytes of the TCP connection that arrived with the `Done`.
    Ok((stream, dec.buffered().to_vec()))
}

/// Connects `client` (e.g. an accepted host TCP connection) with `port` in
/// the guest through `stream`, copying both ways until both sides close.
pub async fn forward_and_copy<S, C>(stream: S, port: u16, mut client: C) -> Result<(), AgentError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut guest, early) = forward(stream, port).await?;
    client.write_all(&early).await?;
    tokio::io::copy_bidirectional(&mut client, &mut guest).await?;
    Ok(())
}
