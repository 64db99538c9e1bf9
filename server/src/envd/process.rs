//! `process.Process`: commands started, listed, fed, signalled and
//! attached to, on the agent's background commands (a command keeps
//! running when its stream's client goes away, as under envd).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request};
use axum::response::Response;
use axum::Extension;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use dormouse::{Command, CommandEvent, CommandHandle, ExitStatus};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{guest_path, rpc_user, HOME};
use crate::connect::{self, AbortOnDrop, ChannelStream, Code, RpcError};
use crate::state::Live;

pub async fn call(
    Extension(live): Extension<Arc<Live>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let result = match method.as_str() {
        "Start" => return start(live, req).await,
        "Connect" => return attach(live, req).await,
        "List" => list(&live, req).await,
        "SendInput" => send_input(&live, req).await,
        "SendSignal" => send_signal(&live, req).await,
        "CloseStdin" => close_stdin(&live, req).await,
        "StreamInput" => return stream_input(live, req).await,
        "Update" => Err(RpcError::new(
            Code::Unimplemented,
            "process.Process/Update resizes a PTY; this server runs commands without one",
        )),
        _ => Err(connect::no_method("process.Process", &method)),
    };
    connect::unary(result)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProcessConfig {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<Value>,
    stdin: Option<bool>,
    tag: Option<String>,
}

/// `{"pid": N}` or `{"tag": "..."}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Selected {
    process: Option<Selector>,
}

/// The pid a selector names (a tag is looked up among running commands).
async fn select(live: &Live, selector: Option<Selector>) -> Result<i32, RpcError> {
    let selector =
        selector.ok_or_else(|| RpcError::invalid("missing \"process\": give {\"pid\": N}"))?;
    if let Some(pid) = selector.pid {
        return i32::try_from(pid)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| RpcError::invalid(format!("pid {pid} is out of range")));
    }
    let tag = selector
        .tag
        .ok_or_else(|| RpcError::invalid("the process selector names no pid or tag"))?;
    let list = live.sandbox.commands().list().await?;
    list.into_iter()
        .find(|p| p.tag.as_deref() == Some(tag.as_str()))
        .map(|p| p.pid)
        .ok_or_else(|| RpcError::new(Code::NotFound, format!("no running process tagged {tag:?}")))
}

/// How often a stream says it is alive: the client's
/// `Keepalive-Ping-Interval` (seconds), 50 s by default.
fn keepalive(req: &Request) -> Duration {
    let secs = req
        .headers()
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(50)
        .clamp(1, 3600);
    Duration::from_secs(secs)
}

fn event(e: Value) -> Value {
    json!({ "event": e })
}

fn end_event(status: &ExitStatus) -> Value {
    let end = match (status.code, status.signal) {
        (Some(code), _) => {
            json!({"exitCode": code, "exited": true, "status": format!("exit status {code}")})
        }
        (None, Some(sig)) => json!({
            "exitCode": -1,
            "exited": false,
            "status": format!("signal: {}", signal_name(sig)),
        }),
        (None, None) => {
            json!({"exitCode": -1, "exited": false, "status": "unknown", "error": "the command ended without an exit status"})
        }
    };
    event(json!({ "end": end }))
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc_sig::SIGKILL => "killed".into(),
        libc_sig::SIGTERM => "terminated".into(),
        libc_sig::SIGINT => "interrupt".into(),
        libc_sig::SIGHUP => "hangup".into(),
        n => format!("signal {n}"),
    }
}

mod libc_sig {
    pub const SIGHUP: i32 = 1;
    pub const SIGINT: i32 = 2;
    pub const SIGKILL: i32 = 9;
    pub const SIGTERM: i32 = 15;
}

/// Streams a command's events: `start` first, then its output, then its
/// end; keepalives while it is quiet.
fn stream_command(mut handle: CommandHandle, ping: Duration) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Value, RpcError>>(32);
    let task = tokio::spawn(async move {
        let pid = handle.pid();
        if tx
            .send(Ok(event(json!({"start": {"pid": pid}}))))
            .await
            .is_err()
        {
            return;
        }
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + ping, ping);
        loop {
            let message = tokio::select! {
                next = handle.next() => match next {
                    Ok(Ok(CommandEvent::Stdout(d))) => Ok(event(json!({"data": {"stdout": B64.encode(d)}}))),
                    Ok(Ok(CommandEvent::Stderr(d))) => Ok(event(json!({"data": {"stderr": B64.encode(d)}}))),
                    Ok(Err(status)) => {
                        let _ = tx.send(Ok(end_event(&status))).await;
                        return;
                    }
                    Err(e) => Err(RpcError::from(e)),
                },
                _ = ticker.tick() => Ok(event(json!({"keepalive": {}}))),
            };
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                return;
            }
            ticker.reset();
        }
    });
    connect::stream_response(ChannelStream {
        rx,
        _guard: AbortOnDrop(task),
    })
}

async fn start(live: Arc<Live>, req: Request) -> Response {
    let ping = keepalive(&req);
    let user = match rpc_user(req.headers()) {
        Ok(user) => user,
        Err(e) => return connect::stream_error(e),
    };
    let request: StartRequest = match connect::stream_request(req).await {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e),
    };
    match command_of(request, user) {
        Ok(command) => match live.sandbox.commands().spawn(command).await {
            Ok(handle) => stream_command(handle, ping),
            Err(e) => connect::stream_error(e.into()),
        },
        Err(e) => connect::stream_error(e),
    }
}

fn command_of(request: StartRequest, user: Option<String>) -> Result<Command, RpcError> {
    if request.pty.is_some() {
        return Err(RpcError::new(
            Code::Unimplemented,
            "PTY sessions are not supported by this server; run commands without a pty",
        ));
    }
    let config = request
        .process
        .ok_or_else(|| RpcError::invalid("missing \"process\" (cmd, args)"))?;
    if config.cmd.is_empty() {
        return Err(RpcError::invalid("empty \"cmd\""));
    }
    let mut argv = vec![config.cmd];
    argv.extend(config.args);
    let cwd = match config.cwd {
        Some(cwd) => guest_path(&cwd).map_err(RpcError::invalid)?,
        None => HOME.to_owned(),
    };
    let mut command = Command::new(argv).cwd(cwd).background(true);
    for (k, v) in config.envs {
        command = command.env(k, v);
    }
    if request.stdin == Some(true) {
        command = command.keep_stdin_open(true);
    }
    if let Some(tag) = request.tag {
        command = command.tag(tag);
    }
    if let Some(user) = user.filter(|u| u != "root") {
        command = command.user(user);
    }
    Ok(command)
}

async fn attach(live: Arc<Live>, req: Request) -> Response {
    let ping = keepalive(&req);
    let request: Selected = match connect::stream_request(req).await {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e),
    };
    let pid = match select(&live, request.process).await {
        Ok(pid) => pid,
        Err(e) => return connect::stream_error(e),
    };
    match live.sandbox.commands().connect(pid).await {
        Ok(handle) => stream_command(handle, ping),
        Err(e) => connect::stream_error(e.into()),
    }
}

async fn list(live: &Live, req: Request) -> Result<Value, RpcError> {
    let _: Value = connect::unary_request(req).await?;
    let processes = live.sandbox.commands().list().await?;
    let items: Vec<Value> = processes
        .into_iter()
        .map(|p| {
            let mut argv = p.argv.into_iter();
            let cmd = argv.next().unwrap_or_default();
            let envs: BTreeMap<String, String> = p.env.into_iter().collect();
            let mut config = json!({"cmd": cmd, "args": argv.collect::<Vec<_>>(), "envs": envs});
            if let Some(cwd) = p.cwd {
                config["cwd"] = json!(cwd);
            }
            let mut info = json!({"config": config, "pid": p.pid});
            if let Some(tag) = p.tag {
                info["tag"] = json!(tag);
            }
            info
        })
        .collect();
    Ok(json!({ "processes": items }))
}

#[derive(Debug, Deserialize)]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<ProcessInput>,
}

#[derive(Debug, Deserialize)]
struct ProcessInput {
    stdin: Option<String>,
    pty: Option<String>,
}

fn decode_b64(data: &str) -> Result<Vec<u8>, RpcError> {
    let trimmed = data.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|e| RpcError::invalid(format!("input is not base64: {e}")))
}

async fn send_input(live: &Live, req: Request) -> Result<Value, RpcError> {
    let request: SendInputRequest = connect::unary_request(req).await?;
    let input = request
        .input
        .ok_or_else(|| RpcError::invalid("missing \"input\""))?;
    if input.pty.is_some() {
        return Err(RpcError::new(
            Code::Unimplemented,
            "PTY input is not supported by this server",
        ));
    }
    let data = decode_b64(input.stdin.as_deref().unwrap_or(""))?;
    let pid = select(live, request.process).await?;
    live.sandbox.commands().send_stdin(pid, data).await?;
    Ok(json!({}))
}

#[derive(Debug, Deserialize)]
struct SendSignalRequest {
    process: Option<Selector>,
    signal: Option<Value>,
}

async fn send_signal(live: &Live, req: Request) -> Result<Value, RpcError> {
    let request: SendSignalRequest = connect::unary_request(req).await?;
    let signal = match request.signal {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => libc_sig::SIGKILL,
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => libc_sig::SIGTERM,
        Some(Value::Number(n)) if n.as_i64() == Some(9) => libc_sig::SIGKILL,
        Some(Value::Number(n)) if n.as_i64() == Some(15) => libc_sig::SIGTERM,
        other => {
            return Err(RpcError::invalid(format!(
                "signal {other:?}: give SIGNAL_SIGKILL or SIGNAL_SIGTERM"
            )))
        }
    };
    let pid = select(live, request.process).await?;
    live.sandbox.commands().signal(pid, signal).await?;
    Ok(json!({}))
}

#[derive(Debug, Deserialize)]
struct StreamInputRequest {
    start: Option<Selected>,
    data: Option<StreamData>,
}

#[derive(Debug, Deserialize)]
struct StreamData {
    input: Option<ProcessInput>,
}

/// `StreamInput`: a `start` naming the process, then `data` messages
/// written to its stdin in order as they arrive; one empty answer at the
/// end.
async fn stream_input(live: Arc<Live>, req: Request) -> Response {
    let result = async {
        let mut reader = connect::MessageReader::new(req)?;
        let first: StreamInputRequest = reader
            .next()
            .await?
            .ok_or_else(|| RpcError::invalid("an empty input stream: send start first"))?;
        let start = first
            .start
            .ok_or_else(|| RpcError::invalid("the first message must be start"))?;
        let pid = select(&live, start.process).await?;
        while let Some(message) = reader.next::<StreamInputRequest>().await? {
            let Some(input) = message.data.and_then(|d| d.input) else {
                continue; // keepalive
            };
            if input.pty.is_some() {
                return Err(RpcError::new(
                    Code::Unimplemented,
                    "PTY input is not supported by this server",
                ));
            }
            let data = decode_b64(input.stdin.as_deref().unwrap_or(""))?;
            live.sandbox.commands().send_stdin(pid, data).await?;
        }
        Ok(json!({}))
    }
    .await;
    connect::stream_response(futures_util::stream::iter([result]))
}

async fn close_stdin(live: &Live, req: Request) -> Result<Value, RpcError> {
    let request: Selected = connect::unary_request(req).await?;
    let pid = select(live, request.process).await?;
    live.sandbox.commands().close_stdin(pid).await?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_requests_become_commands() {
        let r: StartRequest = serde_json::from_value(json!({
            "process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"], "envs": {"A": "1"}},
            "stdin": false
        }))
        .unwrap();
        let c = command_of(r, None).unwrap();
        assert_eq!(c.argv, ["/bin/bash", "-l", "-c", "echo hi"]);
        assert_eq!(c.cwd.as_deref(), Some(HOME));
        assert_eq!(c.env, [("A".to_string(), "1".to_string())]);
        assert!(c.background && !c.keep_stdin_open && c.user.is_none());
        let r: StartRequest = serde_json::from_value(json!({
            "process": {"cmd": "cat", "cwd": "/tmp"}, "stdin": true
        }))
        .unwrap();
        let c = command_of(r, Some("user".into())).unwrap();
        assert_eq!((c.cwd.as_deref(), c.keep_stdin_open), (Some("/tmp"), true));
        assert_eq!(c.user.as_deref(), Some("user"));
        let pty: StartRequest =
            serde_json::from_value(json!({"process": {"cmd": "bash"}, "pty": {}})).unwrap();
        assert_eq!(command_of(pty, None).unwrap_err().code, Code::Unimplemented);
        let empty: StartRequest = serde_json::from_value(json!({})).unwrap();
        assert_eq!(
            command_of(empty, None).unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn exits_and_signals_read_as_envd_reports_them() {
        let e = end_event(&ExitStatus::exited(3));
        assert_eq!(e["event"]["end"]["exitCode"], 3);
        assert_eq!(e["event"]["end"]["status"], "exit status 3");
        let killed = ExitStatus {
            code: None,
            signal: Some(9),
            timed_out: false,
        };
        let e = end_event(&killed);
        assert_eq!(e["event"]["end"]["exitCode"], -1);
        assert_eq!(e["event"]["end"]["status"], "signal: killed");
        assert_eq!(decode_b64("aGkK").unwrap(), b"hi\n");
        assert_eq!(decode_b64("aGk").unwrap(), b"hi");
        assert!(decode_b64("!!").is_err());
    }
}
