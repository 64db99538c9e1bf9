//! `filesystem.Filesystem`: stat, list, make, move and remove paths, and
//! watch directories, either as a stream (`WatchDir`) or through a
//! watcher polled for its events (`CreateWatcher`, `GetWatcherEvents`,
//! `RemoveWatcher`: what the synchronous SDK uses).

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Request};
use axum::response::Response;
use axum::Extension;
use dormouse::{DirWatcher, EntryInfo, EntryKind, FileEvent, FileEventKind};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::guest_path;
use crate::connect::{self, AbortOnDrop, ChannelStream, Code, RpcError};
use crate::state::{self, Live};

/// Events a polled watcher keeps until they are fetched; more are dropped
/// (and the watcher reports the overflow).
const MAX_PENDING_EVENTS: usize = 10_000;
/// Watchers one sandbox may have at once.
const MAX_WATCHERS: usize = 64;

pub async fn call(
    Extension(live): Extension<Arc<Live>>,
    Path(method): Path<String>,
    req: Request,
) -> Response {
    let result = match method.as_str() {
        "WatchDir" => return watch_dir(live, req).await,
        "Stat" => stat(&live, req).await,
        "ListDir" => list_dir(&live, req).await,
        "MakeDir" => make_dir(&live, req).await,
        "Move" => move_path(&live, req).await,
        "Remove" => remove(&live, req).await,
        "CreateWatcher" => create_watcher(&live, req).await,
        "GetWatcherEvents" => watcher_events(&live, req).await,
        "RemoveWatcher" => remove_watcher(&live, req).await,
        _ => Err(connect::no_method("filesystem.Filesystem", &method)),
    };
    connect::unary(result)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PathRequest {
    #[serde(default)]
    path: String,
    depth: Option<u32>,
    #[serde(default)]
    recursive: bool,
}

fn path_of(path: &str) -> Result<String, RpcError> {
    guest_path(path).map_err(RpcError::invalid)
}

fn permissions(kind: EntryKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        _ => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// An entry as envd's `EntryInfo` in proto3 JSON.
pub fn entry_json(e: &EntryInfo) -> Value {
    let file_type = match e.kind {
        EntryKind::Dir => "FILE_TYPE_DIRECTORY",
        // A symlink is told by `isSymlink`; devices and sockets read as
        // files (the SDK drops entries without a type).
        _ => "FILE_TYPE_FILE",
    };
    let modified = UNIX_EPOCH + Duration::from_nanos(u64::try_from(e.modified_ns).unwrap_or(0));
    let mut v = json!({
        "name": e.name,
        "type": file_type,
        "path": e.path,
        "size": e.size.to_string(),
        "mode": e.mode,
        "permissions": permissions(e.kind, e.mode),
        "owner": e.owner,
        "group": e.group,
        "modifiedTime": humantime::format_rfc3339_nanos(modified).to_string(),
    });
    if e.kind == EntryKind::Symlink {
        v["isSymlink"] = json!(true);
    }
    if let Some(target) = &e.symlink_target {
        v["symlinkTarget"] = json!(target);
    }
    v
}

async fn stat(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: PathRequest = connect::unary_request(req).await?;
    let entry = live.sandbox.files().stat(&path_of(&r.path)?).await?;
    Ok(json!({ "entry": entry_json(&entry) }))
}

async fn list_dir(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: PathRequest = connect::unary_request(req).await?;
    let depth = r.depth.unwrap_or(1).max(1);
    let entries = live.sandbox.files().list(&path_of(&r.path)?, depth).await?;
    let entries: Vec<Value> = entries.iter().map(entry_json).collect();
    Ok(json!({ "entries": entries }))
}

async fn make_dir(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: PathRequest = connect::unary_request(req).await?;
    let path = path_of(&r.path)?;
    let files = live.sandbox.files();
    if !files.make_dir(&path).await? {
        return Err(RpcError::new(
            Code::AlreadyExists,
            format!("{path} already exists"),
        ));
    }
    let entry = files.stat(&path).await?;
    Ok(json!({ "entry": entry_json(&entry) }))
}

#[derive(Debug, Deserialize)]
struct MoveRequest {
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

async fn move_path(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: MoveRequest = connect::unary_request(req).await?;
    let entry = live
        .sandbox
        .files()
        .rename(&path_of(&r.source)?, &path_of(&r.destination)?)
        .await?;
    Ok(json!({ "entry": entry_json(&entry) }))
}

async fn remove(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: PathRequest = connect::unary_request(req).await?;
    live.sandbox.files().remove(&path_of(&r.path)?).await?;
    Ok(json!({}))
}

fn event_type(kind: FileEventKind) -> &'static str {
    match kind {
        FileEventKind::Create => "EVENT_TYPE_CREATE",
        FileEventKind::Write => "EVENT_TYPE_WRITE",
        FileEventKind::Remove => "EVENT_TYPE_REMOVE",
        FileEventKind::Rename => "EVENT_TYPE_RENAME",
        FileEventKind::Chmod => "EVENT_TYPE_CHMOD",
        _ => "EVENT_TYPE_UNSPECIFIED",
    }
}

/// An event as envd's `FilesystemEvent`: the path relative to the watched
/// directory.
fn event_json(root: &str, e: &FileEvent) -> Value {
    let name = e
        .path
        .strip_prefix(root)
        .map(|rest| rest.trim_start_matches('/'))
        .filter(|rest| !rest.is_empty())
        .unwrap_or(&e.path);
    json!({"name": name, "type": event_type(e.kind)})
}

async fn start_watch(live: &Live, r: &PathRequest) -> Result<(String, DirWatcher), RpcError> {
    let path = path_of(&r.path)?;
    let watcher = live.sandbox.files().watch_dir(&path, r.recursive).await?;
    Ok((path, watcher))
}

async fn watch_dir(live: Arc<Live>, req: Request) -> Response {
    let r: PathRequest = match connect::stream_request(req).await {
        Ok(r) => r,
        Err(e) => return connect::stream_error(e),
    };
    let (root, mut watcher) = match start_watch(&live, &r).await {
        Ok(w) => w,
        Err(e) => return connect::stream_error(e),
    };
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        if tx.send(Ok(json!({"start": {}}))).await.is_err() {
            return;
        }
        let ping = Duration::from_secs(50);
        loop {
            let message = tokio::select! {
                next = watcher.next() => match next {
                    Some(Ok(e)) => Ok(json!({"filesystem": event_json(&root, &e)})),
                    Some(Err(e)) => Err(RpcError::from(e)),
                    None => return,
                },
                () = tokio::time::sleep(ping) => Ok(json!({"keepalive": {}})),
            };
            let failed = message.is_err();
            if tx.send(message).await.is_err() || failed {
                return;
            }
        }
    });
    connect::stream_response(ChannelStream {
        rx,
        _guard: AbortOnDrop(task),
    })
}

/// A watcher polled with `GetWatcherEvents`.
pub struct PolledWatcher {
    events: Arc<Mutex<Pending>>,
    _task: AbortOnDrop,
}

#[derive(Default)]
struct Pending {
    events: Vec<Value>,
    dropped: usize,
    error: Option<String>,
}

async fn create_watcher(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: PathRequest = connect::unary_request(req).await?;
    if live.watchers.lock().unwrap().len() >= MAX_WATCHERS {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("{MAX_WATCHERS} watchers exist in this sandbox already; remove one first"),
        ));
    }
    let (root, mut watcher) = start_watch(live, &r).await?;
    let events = Arc::new(Mutex::new(Pending::default()));
    let sink = events.clone();
    let task = tokio::spawn(async move {
        while let Some(event) = watcher.next().await {
            let mut pending = sink.lock().unwrap();
            match event {
                Ok(e) if pending.events.len() < MAX_PENDING_EVENTS => {
                    pending.events.push(event_json(&root, &e))
                }
                Ok(_) => pending.dropped += 1,
                Err(e) => {
                    pending.error = Some(e.to_string());
                    return;
                }
            }
        }
    });
    let id = state::new_token().map_err(|e| RpcError::new(Code::Internal, e.message))?;
    live.watchers.lock().unwrap().insert(
        id.clone(),
        PolledWatcher {
            events,
            _task: AbortOnDrop(task),
        },
    );
    Ok(json!({ "watcherId": id }))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatcherRequest {
    #[serde(default)]
    watcher_id: String,
}

fn unknown_watcher(id: &str) -> RpcError {
    RpcError::new(Code::NotFound, format!("no watcher {id:?} in this sandbox"))
}

async fn watcher_events(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: WatcherRequest = connect::unary_request(req).await?;
    let events = live
        .watchers
        .lock()
        .unwrap()
        .get(&r.watcher_id)
        .map(|w| w.events.clone())
        .ok_or_else(|| unknown_watcher(&r.watcher_id))?;
    let mut pending = events.lock().unwrap();
    if let Some(error) = pending.error.take() {
        return Err(RpcError::new(
            Code::Unknown,
            format!("the watcher stopped: {error}"),
        ));
    }
    if pending.dropped > 0 {
        let dropped = std::mem::take(&mut pending.dropped);
        pending.events.clear();
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("{dropped} events were dropped: fetch events more often"),
        ));
    }
    let events = std::mem::take(&mut pending.events);
    Ok(json!({ "events": events }))
}

async fn remove_watcher(live: &Live, req: Request) -> Result<Value, RpcError> {
    let r: WatcherRequest = connect::unary_request(req).await?;
    live.watchers
        .lock()
        .unwrap()
        .remove(&r.watcher_id)
        .ok_or_else(|| unknown_watcher(&r.watcher_id))?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_read_like_ls() {
        assert_eq!(permissions(EntryKind::File, 0o644), "-rw-r--r--");
        assert_eq!(permissions(EntryKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(permissions(EntryKind::Symlink, 0o777), "lrwxrwxrwx");
    }
}
