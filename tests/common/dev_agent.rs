//! The real agent binary on the host, without a VM: it serves its protocol
//! on a Unix socket (`--listen-unix`) in a temporary directory.
//!
//! The agent binary is built on first use with `cargo build -p
//! dormouse-agent` into the test's target directory; set
//! `DORMOUSE_AGENT_BIN` to test a prebuilt binary instead.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc as std_mpsc, OnceLock};
use std::time::Duration;

use dormouse::agent::{exec, AgentError, ExecRequest};
use tokio::net::UnixStream;

/// Builds (once per test binary) and returns the agent binary.
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("DORMOUSE_AGENT_BIN") {
            return PathBuf::from(bin);
        }
        // This test runs from <target>/<profile>/deps/; build the agent into
        // the same <target>/<profile>/ with the same cargo.
        let exe = std::env::current_exe().expect("path of the test binary");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test binary lives in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("a target directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "dormouse-agent",
                "--manifest-path",
            ])
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir)
            .status()
            .expect("run cargo to build the agent");
        assert!(status.success(), "cargo build -p dormouse-agent failed");
        let bin = target_dir.join("debug").join("dormouse-agent");
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// A running development agent on a Unix socket in a temporary directory.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Agent {
    pub fn start() -> Agent {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new(agent_binary())
            .arg("--listen-unix")
            .arg(&socket)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        // Wait for the ready line, then keep relaying the agent's log.
        let stderr = child.stderr.take().expect("agent stderr");
        let (ready_tx, ready_rx) = std_mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line == "dormouse-agent ready" {
                    let _ = ready_tx.send(());
                } else {
                    eprintln!("[agent] {line}");
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent did not print `dormouse-agent ready` within 30 s");
        Agent { child, socket, dir }
    }

    pub async fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket)
            .await
            .expect("connect to the agent")
    }

    pub async fn run(&self, req: ExecRequest) -> Result<dormouse::agent::ExecOutput, AgentError> {
        let result = exec(self.connect().await, req).await;
        self.assert_alive();
        result
    }

    /// Fails if the agent process has exited (it is a zombie until we wait).
    pub fn assert_alive(&self) {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let state = stat.rsplit(')').next().unwrap_or("").trim_start();
        assert!(
            !state.is_empty() && !state.starts_with('Z'),
            "the agent died"
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
