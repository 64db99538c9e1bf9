//! What the server keeps: the dormouse runtime, the API keys, and a handle
//! on every sandbox it runs (the data plane talks to those).
//!
//! Everything else lives in the runtime's state directory, so a restarted
//! server finds its paused sandboxes: which key owns a sandbox and the
//! token its data-plane requests must carry are kept in the sandbox's
//! metadata under the reserved `dormouse.` prefix (never shown to clients,
//! refused from them).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use dormouse::{Running, Runtime, Sandbox, SandboxInfo, SandboxState};
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ApiResult};

/// Metadata keys with this prefix belong to the server.
pub const RESERVED_PREFIX: &str = "dormouse.";
/// The owning key's digest.
pub const OWNER_KEY: &str = "dormouse.owner";
/// The envd access token.
pub const TOKEN_KEY: &str = "dormouse.token";
/// The access token of the sandbox's other ports.
pub const TRAFFIC_TOKEN_KEY: &str = "dormouse.traffic-token";

/// The API key digest a sandbox belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The API keys the server accepts, kept as digests.
pub struct Keys {
    digests: Vec<[u8; 32]>,
}

impl Keys {
    pub fn new(keys: &[String]) -> Self {
        Self {
            digests: keys.iter().map(|k| digest(k.as_bytes())).collect(),
        }
    }

    /// The owner a request's `X-API-KEY` names, or 401. The key is compared
    /// by digest, so a wrong key takes the same time whatever its prefix.
    pub fn authenticate(&self, headers: &HeaderMap) -> ApiResult<Owner> {
        let key = headers
            .get("x-api-key")
            .map(|v| v.as_bytes())
            .ok_or_else(ApiError::unauthorized)?;
        let d = digest(key);
        if !self.digests.contains(&d) {
            return Err(ApiError::unauthorized());
        }
        Ok(Owner(hex(&d[..16])))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A sandbox running under this server.
pub struct Live {
    pub sandbox: Sandbox<Running>,
    /// What envd requests must carry in `X-Access-Token`.
    pub token: String,
    /// What requests to the sandbox's other ports must carry in
    /// `E2B-Traffic-Access-Token` (or the envd token).
    pub traffic_token: String,
    /// envd's polled directory watchers, by id.
    pub watchers: Mutex<HashMap<String, crate::envd::PolledWatcher>>,
}

pub struct AppState {
    pub rt: Runtime,
    pub keys: Keys,
    /// The domain reported to clients (`{port}-{id}.{domain}` hosts).
    pub domain: String,
    /// E2B template names served by a dormouse template.
    pub aliases: HashMap<String, String>,
    running: Mutex<HashMap<String, Arc<Live>>>,
    transitions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// `Err(why)` until the templates are prepared (and if that failed).
    ready: Mutex<Result<(), String>>,
}

impl AppState {
    pub fn new(rt: Runtime, keys: Keys, domain: String, aliases: HashMap<String, String>) -> Self {
        Self {
            rt,
            keys,
            domain,
            aliases,
            running: Mutex::new(HashMap::new()),
            transitions: Mutex::new(HashMap::new()),
            ready: Mutex::new(Err("preparing templates".into())),
        }
    }

    /// Whether `GET /health` says ready, and if not why.
    pub fn readiness(&self) -> Result<(), String> {
        self.ready.lock().unwrap().clone()
    }

    pub fn set_readiness(&self, ready: Result<(), String>) {
        *self.ready.lock().unwrap() = ready;
    }

    /// The record of sandbox `id` if `owner` may see it; 404 otherwise
    /// (also for a malformed id: nothing is looked up for it).
    pub async fn info_for(&self, id: &str, owner: &Owner) -> ApiResult<SandboxInfo> {
        if dormouse::SandboxId::parse(id).is_none() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("sandbox {id:?} not found: sandbox ids are 20 lowercase hex digits"),
            ));
        }
        match self.rt.info(id).await {
            Ok(info)
                if info.metadata.get(OWNER_KEY).map(String::as_str) == Some(owner.as_str()) =>
            {
                Ok(info)
            }
            Ok(_) | Err(dormouse::Error::NotFound { .. }) => Err(ApiError::not_found(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Serializes lifecycle changes (connect, pause, kill) of one sandbox.
    pub async fn transition(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .transitions
            .lock()
            .unwrap()
            .entry(id.to_owned())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    pub fn forget_transitions(&self, id: &str) {
        self.transitions.lock().unwrap().remove(id);
    }

    /// The handle of a sandbox this server runs.
    pub fn running(&self, id: &str) -> Option<Arc<Live>> {
        self.running.lock().unwrap().get(id).cloned()
    }

    pub fn insert(&self, sandbox: Sandbox<Running>) -> Arc<Live> {
        let metadata = sandbox.metadata();
        let get = |key| metadata.get(key).cloned().unwrap_or_default();
        let (token, traffic_token) = (get(TOKEN_KEY), get(TRAFFIC_TOKEN_KEY));
        let id = sandbox.id().as_str().to_owned();
        let live = Arc::new(Live {
            sandbox,
            token,
            traffic_token,
            watchers: Mutex::new(HashMap::new()),
        });
        self.running.lock().unwrap().insert(id, live.clone());
        live
    }

    /// Drops this server's handle of `id` (after a pause or kill, or when
    /// the handle turned out to be spent).
    pub fn remove(&self, id: &str) {
        self.running.lock().unwrap().remove(id);
    }

    /// Drops `live` if it is still the handle of `id` (a newer one, from a
    /// resume, stays).
    pub fn remove_if(&self, id: &str, live: &Arc<Live>) {
        let mut running = self.running.lock().unwrap();
        if running.get(id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            running.remove(id);
        }
    }

    /// Drops the handles of sandboxes taken from them (killed or paused by
    /// their timeout) and the transition locks no one holds, so a
    /// long-running server keeps nothing of sandboxes that are gone.
    pub fn reap(&self) {
        let mut running = self.running.lock().unwrap();
        running.retain(|_, live| live.sandbox.check().is_ok());
        self.transitions
            .lock()
            .unwrap()
            .retain(|id, lock| running.contains_key(id) || Arc::strong_count(lock) > 1);
    }

    /// Ids of every sandbox with a handle here.
    pub fn running_ids(&self) -> Vec<String> {
        self.running.lock().unwrap().keys().cloned().collect()
    }
}

/// The metadata a client may see.
pub fn visible_metadata(info: &SandboxInfo) -> BTreeMap<String, String> {
    info.metadata
        .iter()
        .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// E2B knows two states; a sandbox writing a snapshot still runs.
pub fn e2b_state(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Paused => "paused",
        _ => "running",
    }
}

/// A fresh random token (128 bits, hex).
pub fn new_token() -> ApiResult<String> {
    let mut buf = [0u8; 16];
    getrandom::fill(&mut buf).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("no randomness from the OS for an access token: {e}"),
        )
    })?;
    Ok(hex(&buf))
}
