//! `sbx.ports()`: guest TCP ports on host addresses.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::agent::ports::forward_and_copy;
use crate::error::{Error, Result};
use crate::sandbox::{AgentLink, Running, Sandbox};

/// Port forwards of a running sandbox: `sbx.ports()`.
pub struct Ports<'a> {
    sandbox: &'a Sandbox<Running>,
}

impl<'a> Ports<'a> {
    pub(crate) fn new(sandbox: &'a Sandbox<Running>) -> Self {
        Self { sandbox }
    }

    /// Listens on `127.0.0.1` (an ephemeral port) and forwards every
    /// connection to `guest_port` on the guest's loopback.
    ///
    /// While the sandbox is paused, connections are accepted and closed at
    /// once; after a resume they reach the guest again (clients reconnect).
    /// Closing the forward, or killing or dropping the sandbox, closes the
    /// listener.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// use dormouse::Command;
    /// sbx.commands().spawn(Command::shell("python3 -m http.server 8000")).await?;
    /// let fwd = sbx.ports().expose(8000).await?;
    /// println!("http://{}/", fwd.local_addr());
    /// # Ok(()) }
    /// ```
    pub async fn expose(&self, guest_port: u16) -> Result<PortForward> {
        self.expose_on(guest_port, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
    }

    /// One connection to `guest_port` on the guest's loopback, as a stream
    /// in this process (what [`Self::expose`] does for each client it
    /// accepts, for a caller that is its own proxy). Nothing listening
    /// there gives the guest's "connection refused" as an error.
    ///
    /// ```no_run
    /// # async fn demo(sbx: dormouse::Sandbox<dormouse::Running>) -> dormouse::Result<()> {
    /// use tokio::io::{AsyncReadExt, AsyncWriteExt};
    /// let mut conn = sbx.ports().connect(8000).await?;
    /// conn.write_all(b"GET / HTTP/1.0\r\n\r\n").await.ok();
    /// let mut answer = Vec::new();
    /// conn.read_to_end(&mut answer).await.ok();
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, guest_port: u16) -> Result<tokio::io::DuplexStream> {
        check_port(guest_port, "connected to")?;
        let stream = self.sandbox.connect_agent().await?;
        let (mut guest, early) = self
            .sandbox
            .while_alive(crate::agent::ports::forward(stream, guest_port))
            .await?;
        let (ours, mut theirs) = tokio::io::duplex(256 << 10);
        let link = self.sandbox.link();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let copy = async {
                theirs.write_all(&early).await?;
                tokio::io::copy_bidirectional(&mut theirs, &mut guest).await
            };
            tokio::select! {
                result = copy => if let Err(e) = result {
                    log::debug!("port {guest_port}: connection ended: {e}");
                },
                // Killed or paused: the connection ends with the guest.
                () = link.closed() => {}
            }
        });
        Ok(ours)
    }

    /// Like [`Self::expose`] on a host address of your choice.
    pub async fn expose_on(&self, guest_port: u16, addr: SocketAddr) -> Result<PortForward> {
        check_port(guest_port, "forwarded")?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(Error::io(format!("cannot listen on {addr}")))?;
        let local = listener
            .local_addr()
            .map_err(Error::io("cannot read the listener's address"))?;
        let link = self.sandbox.link();
        let task = tokio::spawn(accept_loop(listener, link, guest_port));
        Ok(PortForward {
            local,
            guest_port,
            task,
        })
    }
}

/// `InvalidConfig` for guest port 0, which no guest server listens on.
fn check_port(guest_port: u16, what: &str) -> Result<()> {
    if guest_port == 0 {
        return Err(Error::InvalidConfig(format!(
            "guest port 0 cannot be {what}; give the port the guest server listens on"
        )));
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, link: Arc<AgentLink>, port: u16) {
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = link.closed() => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok((client, peer)) = accepted else {
            // E.g. EMFILE: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let link = link.clone();
        conns.spawn(async move {
            let stream = match link.connect().await {
                Some(Ok(stream)) => stream,
                // Paused: the client sees the connection close.
                None => return,
                Some(Err(e)) => {
                    log::debug!("port {port}: cannot reach the guest for {peer}: {e}");
                    return;
                }
            };
            if let Err(e) = forward_and_copy(stream, port, client).await {
                log::debug!("port {port}: forward for {peer} ended: {e}");
            }
        });
    }
}

/// A guest port exposed on a host address. Dropping it (or
/// [`Self::close`]) closes the listener and its connections.
#[derive(Debug)]
pub struct PortForward {
    local: SocketAddr,
    guest_port: u16,
    task: JoinHandle<()>,
}

impl PortForward {
    /// The host address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The guest port connections go to.
    pub fn guest_port(&self) -> u16 {
        self.guest_port
    }

    /// Stops listening and closes the forwarded connections.
    pub fn close(self) {}
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}
