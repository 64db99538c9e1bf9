//! The code interpreter (port 49999): `POST /execute` streams a run's
//! output as NDJSON lines the way E2B's Jupyter server does (`stdout`,
//! `stderr`, `result`, `error`, `number_of_executions`,
//! `end_of_execution`); `/contexts` manages interpreter contexts. Both run
//! on the sandbox's persistent Python interpreter (`Sandbox::run_code_with`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::rejection::JsonRejection;
use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use dormouse::{CodeOutput, CodeRun};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::api::unknown_route;
use crate::connect::AbortOnDrop;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, Live};

/// Code is at most this long (the agent's own limit is lower).
const MAX_BODY: usize = 2 << 20;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route("/execute", post(execute))
        .route("/contexts", post(create_context).get(list_contexts))
        .route("/contexts/{id}", delete(remove_context))
        .route("/contexts/{id}/restart", post(restart_context))
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<BTreeMap<String, String>>,
}

fn check_language(language: Option<&str>) -> ApiResult<()> {
    match language {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(ApiError::bad_request(format!(
            "language {other:?} is not supported: this sandbox runs Python"
        ))),
    }
}

fn context_error(e: dormouse::Error) -> ApiError {
    match e {
        dormouse::Error::ContextNotFound { .. } => {
            ApiError::new(StatusCode::NOT_FOUND, e.to_string())
        }
        e => e.into(),
    }
}

/// Unix time in nanoseconds, what the SDK's `OutputMessage.timestamp` is.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One NDJSON line. The SDK splits lines like `str.splitlines`, so the
/// separators JSON leaves raw (U+0085, U+2028, U+2029) are escaped too.
fn line(value: Value) -> Bytes {
    let text = serde_json::to_string(&value).unwrap_or_default();
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        match c {
            '\u{85}' | '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('\n');
    out.into()
}

/// Output bytes as text, holding back a UTF-8 character cut at the end of
/// a chunk until its rest arrives.
#[derive(Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end: keep it for later.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes: replace them.
            Err(_) => self.pending.len(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }
}

/// A run's output as `stdout`/`stderr` lines.
#[derive(Default)]
struct OutputLines {
    stdout: Utf8Stream,
    stderr: Utf8Stream,
    /// Text not sent yet: a line is sent whole (`print` writes its text and
    /// its newline separately), the rest after [`HOLD`] or at the end.
    pending: [String; 2],
    /// When the oldest pending text arrived.
    since: Option<tokio::time::Instant>,
}

/// How long a partial line waits for its end.
const HOLD: std::time::Duration = std::time::Duration::from_millis(100);

impl OutputLines {
    async fn push(&mut self, lines: &mpsc::Sender<Bytes>, chunk: CodeOutput) {
        let (i, text) = match &chunk {
            CodeOutput::Stdout(b) => (0, self.stdout.push(b)),
            CodeOutput::Stderr(b) => (1, self.stderr.push(b)),
        };
        self.pending[i].push_str(&text);
        if let Some(end) = self.pending[i].rfind('\n') {
            let rest = self.pending[i].split_off(end + 1);
            let whole = std::mem::replace(&mut self.pending[i], rest);
            send_output(lines, i, whole).await;
        }
        if !self.has_pending() {
            self.since = None;
        } else if self.since.is_none() {
            self.since = Some(tokio::time::Instant::now());
        }
    }

    fn has_pending(&self) -> bool {
        self.pending.iter().any(|p| !p.is_empty())
    }

    /// When the pending text must go out.
    fn deadline(&self) -> tokio::time::Instant {
        self.since.unwrap_or_else(tokio::time::Instant::now) + HOLD
    }

    async fn flush(&mut self, lines: &mpsc::Sender<Bytes>) {
        self.since = None;
        for i in 0..2 {
            let text = std::mem::take(&mut self.pending[i]);
            send_output(lines, i, text).await;
        }
    }
}

async fn send_output(lines: &mpsc::Sender<Bytes>, stream: usize, text: String) {
    if text.is_empty() {
        return;
    }
    let kind = if stream == 0 { "stdout" } else { "stderr" };
    let value = json!({"type": kind, "text": text, "timestamp": now()});
    // A closed channel: the client went away, the run is aborted.
    let _ = lines.send(line(value)).await;
}

async fn execute(
    Extension(live): Extension<Arc<Live>>,
    body: Result<Json<ExecuteRequest>, JsonRejection>,
) -> ApiResult<Response> {
    let Json(body) = body?;
    check_language(body.language.as_deref())?;
    let mut run = CodeRun::new(body.code);
    if let Some(id) = body.context_id {
        run = run.context(id);
    }
    for (k, v) in body.env_vars.unwrap_or_default() {
        run = run.env(k, v);
    }
    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(64);
    let (out_tx, mut out_rx) = mpsc::channel::<CodeOutput>(64);
    // The run goes on in its own task; the response body owns an abort
    // guard, so a client that goes away interrupts the code.
    let task = tokio::spawn(async move {
        let run_fut = live.sandbox.run_code_with(run, Some(out_tx));
        tokio::pin!(run_fut);
        let mut output = OutputLines::default();
        let result = loop {
            tokio::select! {
                result = &mut run_fut => break result,
                Some(chunk) = out_rx.recv() => output.push(&lines_tx, chunk).await,
                () = tokio::time::sleep_until(output.deadline()), if output.has_pending() => output.flush(&lines_tx).await,
            }
        };
        // Output sent before the run ended but not read yet.
        while let Ok(chunk) = out_rx.try_recv() {
            output.push(&lines_tx, chunk).await;
        }
        output.flush(&lines_tx).await;
        let mut tail = Vec::new();
        match result {
            Ok(exec) => {
                if let Some(text) = exec.result {
                    tail.push(json!({"type": "result", "text": text, "is_main_result": true}));
                }
                if let Some(err) = exec.error {
                    tail.push(json!({"type": "error", "name": err.name, "value": err.value, "traceback": err.traceback}));
                }
                tail.push(json!({"type": "number_of_executions", "execution_count": exec.execution_count}));
                tail.push(json!({"type": "end_of_execution"}));
            }
            Err(e) => {
                // The run could not happen (unknown context, sandbox
                // paused): say so as the run's error, as Jupyter would.
                let name = match e {
                    dormouse::Error::ContextNotFound { .. } => "ContextNotFound",
                    _ => "SandboxError",
                };
                tail.push(
                    json!({"type": "error", "name": name, "value": e.to_string(), "traceback": ""}),
                );
                tail.push(json!({"type": "end_of_execution"}));
            }
        }
        for value in tail {
            let _ = lines_tx.send(line(value)).await;
        }
    });
    let guard = AbortOnDrop(task);
    let body = futures_util::stream::unfold((lines_rx, guard), |(mut rx, guard)| async move {
        let item = rx.recv().await?;
        Some((Ok::<_, Infallible>(item), (rx, guard)))
    });
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(response)
}

#[derive(Debug, Deserialize)]
struct NewContext {
    cwd: Option<String>,
    language: Option<String>,
}

fn context_json(c: &dormouse::ContextInfo) -> Value {
    json!({"id": c.id, "language": c.language, "cwd": c.cwd})
}

async fn create_context(
    Extension(live): Extension<Arc<Live>>,
    body: Result<Json<NewContext>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(body) = body?;
    check_language(body.language.as_deref())?;
    let c = live
        .sandbox
        .code_contexts()
        .create(body.cwd.as_deref())
        .await?;
    Ok(Json(context_json(&c)))
}

async fn list_contexts(Extension(live): Extension<Arc<Live>>) -> ApiResult<Json<Value>> {
    let list = live.sandbox.code_contexts().list().await?;
    Ok(Json(Value::Array(list.iter().map(context_json).collect())))
}

async fn remove_context(
    Extension(live): Extension<Arc<Live>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    live.sandbox
        .code_contexts()
        .remove(&id)
        .await
        .map_err(context_error)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_context(
    Extension(live): Extension<Arc<Live>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    live.sandbox
        .code_contexts()
        .restart(&id)
        .await
        .map_err(context_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_cut_between_chunks_is_held_back() {
        let mut s = Utf8Stream::default();
        let euro = "€".as_bytes();
        assert_eq!(s.push(&[b'a', euro[0]]), "a");
        assert_eq!(s.push(&euro[1..]), "€");
        assert_eq!(s.push(&[0xff, b'b']), "\u{fffd}b");
    }

    #[test]
    fn lines_escape_what_splitlines_would_split_on() {
        let l = line(json!({"text": "a\u{2028}b\u{85}c\nd"}));
        let text = std::str::from_utf8(&l).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(!text.contains('\u{2028}') && !text.contains('\u{85}'));
        let back: Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(back["text"], "a\u{2028}b\u{85}c\nd");
    }
}
