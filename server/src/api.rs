//! The control plane: E2B's REST API for sandboxes (create, connect, pause,
//! resume, list, info, timeout, kill), each request authenticated by its
//! `X-API-KEY` and limited to that key's sandboxes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dormouse::{ListQuery, SandboxConfig, SandboxInfo, SandboxState};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::state::{
    self, AppState, Live, Owner, OWNER_KEY, RESERVED_PREFIX, TOKEN_KEY, TRAFFIC_TOKEN_KEY,
};

/// The envd version reported for every sandbox: the SDK turns features on
/// by it, and the data plane here implements what that version has.
pub const ENVD_VERSION: &str = "0.5.7";
/// E2B's client id field; one host runs everything here.
const CLIENT_ID: &str = "dormouse";
/// The timeout of a create or connect that names none (what the SDK
/// documents: it leaves the field out and means 300 s).
const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// The longest timeout a request may ask for: the runtime's maximum
/// running time.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 3600;
/// The largest page of a list.
const MAX_LIST_LIMIT: usize = 1000;
/// Control-plane bodies are small JSON documents.
pub const MAX_BODY: usize = 256 << 10;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(health))
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/v2/sandboxes/{id}", get(detail))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/metrics", get(no_metrics))
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.readiness() {
        Ok(()) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        Err(why) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
    }
}

pub async fn unknown_route(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route {method} {}", uri.path()),
    )
}

/// `POST /sandboxes` and `/v2/sandboxes`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    auto_pause: Option<bool>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    lifecycle: Option<Lifecycle>,
}

/// The newer spelling of auto-pause: `{"lifecycle": {"onTimeout": "pause"}}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Lifecycle {
    on_timeout: Option<OnTimeout>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum OnTimeout {
    Kill,
    Pause,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TimeoutBody {
    timeout: Option<u64>,
}

fn timeout_of(secs: Option<u64>, default: u64) -> ApiResult<Duration> {
    let secs = secs.unwrap_or(default);
    if secs == 0 || secs > MAX_TIMEOUT_SECS {
        return Err(ApiError::bad_request(format!(
            "timeout {secs} s is out of range: give 1 to {MAX_TIMEOUT_SECS} seconds"
        )));
    }
    Ok(Duration::from_secs(secs))
}

async fn create(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Json<NewSandbox>, JsonRejection>,
) -> ApiResult<Response> {
    let owner = st.keys.authenticate(&headers)?;
    let Json(body) = body?;
    let timeout = timeout_of(body.timeout, DEFAULT_TIMEOUT_SECS)?;
    let auto_pause = body.auto_pause.unwrap_or(false)
        || body.lifecycle.and_then(|l| l.on_timeout) == Some(OnTimeout::Pause);
    let template = st
        .aliases
        .get(&body.template_id)
        .cloned()
        .unwrap_or_else(|| body.template_id.clone());
    let mut config = SandboxConfig::default()
        .timeout(timeout)
        .auto_pause(auto_pause)
        .metadata(OWNER_KEY, owner.as_str())
        .metadata(TOKEN_KEY, state::new_token()?)
        .metadata(TRAFFIC_TOKEN_KEY, state::new_token()?);
    for (k, v) in body.metadata.unwrap_or_default() {
        if k.starts_with(RESERVED_PREFIX) {
            return Err(ApiError::bad_request(format!(
                "metadata key {k:?} is reserved (keys starting with {RESERVED_PREFIX:?} are the server's)"
            )));
        }
        config = config.metadata(k, v);
    }
    for (k, v) in body.env_vars.unwrap_or_default() {
        config = config.env(k, v);
    }
    let sandbox = st.rt.create(&template, config).await.map_err(|e| match e {
        dormouse::Error::TemplateNotFound { .. } => ApiError::new(
            StatusCode::NOT_FOUND,
            format!("template {:?} not found", body.template_id),
        ),
        e => e.into(),
    })?;
    let live = st.insert(sandbox);
    log::info!("created sandbox {} from {template}", live.sandbox.id());
    Ok((StatusCode::CREATED, Json(st.sandbox_json(&live))).into_response())
}

/// Resumes `id` if it is paused; a running one gets the timeout if that
/// ends later than its current one (E2B's connect). Returns whether it was
/// resumed.
async fn ensure_running(
    st: &AppState,
    id: &str,
    owner: &Owner,
    timeout: Duration,
) -> ApiResult<(Arc<Live>, bool)> {
    let _transition = st.transition(id).await;
    let info = st.info_for(id, owner).await?;
    if info.state != SandboxState::Paused {
        if let Some(live) = st.running(id) {
            let asked_end = now_ms() + timeout.as_millis() as u64;
            if info.end_at_ms.is_none_or(|end| asked_end > end) {
                match live.sandbox.set_timeout(timeout) {
                    Ok(()) => return Ok((live, false)),
                    // Paused (its timeout ran out) since we looked: resume.
                    Err(dormouse::Error::SandboxPaused { .. }) => st.remove(id),
                    Err(e) => return Err(e.into()),
                }
            } else {
                return Ok((live, false));
            }
        }
    }
    let sandbox = st.rt.connect_with_timeout(id, timeout).await?;
    log::info!("resumed sandbox {id}");
    Ok((st.insert(sandbox), true))
}

async fn connect(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<TimeoutBody>, JsonRejection>,
) -> ApiResult<Response> {
    let owner = st.keys.authenticate(&headers)?;
    let Json(body) = body?;
    let timeout = timeout_of(body.timeout, DEFAULT_TIMEOUT_SECS)?;
    let (live, resumed) = ensure_running(&st, &id, &owner, timeout).await?;
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(st.sandbox_json(&live))).into_response())
}

/// The older `resume`: 409 for a sandbox that is not paused.
async fn resume(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<TimeoutBody>, JsonRejection>,
) -> ApiResult<Response> {
    let owner = st.keys.authenticate(&headers)?;
    let Json(body) = body?;
    let timeout = timeout_of(body.timeout, DEFAULT_TIMEOUT_SECS)?;
    if st.info_for(&id, &owner).await?.state != SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already running"),
        ));
    }
    let (live, _) = ensure_running(&st, &id, &owner, timeout).await?;
    Ok((StatusCode::CREATED, Json(st.sandbox_json(&live))).into_response())
}

async fn pause(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let owner = st.keys.authenticate(&headers)?;
    let _transition = st.transition(&id).await;
    if st.info_for(&id, &owner).await?.state == SandboxState::Paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("sandbox {id} is already paused"),
        ));
    }
    st.rt.pause(&id).await?;
    st.remove(&id);
    log::info!("paused sandbox {id}");
    Ok(StatusCode::NO_CONTENT)
}

async fn kill(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let owner = st.keys.authenticate(&headers)?;
    let transition = st.transition(&id).await;
    st.info_for(&id, &owner).await?;
    st.rt.kill(&id).await?;
    st.remove(&id);
    drop(transition);
    st.forget_transitions(&id);
    log::info!("killed sandbox {id}");
    Ok(StatusCode::NO_CONTENT)
}

async fn set_timeout(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<TimeoutBody>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let owner = st.keys.authenticate(&headers)?;
    let Json(body) = body?;
    let secs = body
        .timeout
        .ok_or_else(|| ApiError::bad_request("missing \"timeout\" (seconds)"))?;
    timeout_from_now(&st, &id, &owner, secs).await
}

/// The older keep-alive: `{"duration": seconds}` extends the timeout.
async fn refresh(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult<StatusCode> {
    let owner = st.keys.authenticate(&headers)?;
    let Json(body) = body?;
    let secs = match body.get("duration") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT_SECS,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ApiError::bad_request("\"duration\" must be a number of seconds"))?,
    };
    timeout_from_now(&st, &id, &owner, secs).await
}

/// Makes the timeout of `id` run out `secs` from now.
async fn timeout_from_now(
    st: &AppState,
    id: &str,
    owner: &Owner,
    secs: u64,
) -> ApiResult<StatusCode> {
    let timeout = timeout_of(Some(secs), secs)?;
    st.info_for(id, owner).await?;
    st.rt.set_timeout(id, timeout).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Metrics (CPU and memory use sampled in the guest) are not collected.
async fn no_metrics() -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "sandbox metrics are not collected by dormouse-server",
    )
}

async fn detail(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let owner = st.keys.authenticate(&headers)?;
    let info = st.info_for(&id, &owner).await?;
    let mut item = listed(&info);
    item["envdAccessToken"] = json!(info.metadata.get(TOKEN_KEY));
    item["trafficAccessToken"] = json!(info.metadata.get(TRAFFIC_TOKEN_KEY));
    item["domain"] = json!(st.domain);
    item["lifecycle"] = json!({
        "autoResume": false,
        "onTimeout": if info.auto_pause { "pause" } else { "kill" },
    });
    Ok(Json(item))
}

/// `GET /sandboxes`: the running sandboxes of the key (E2B's first list).
async fn list_v1(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let owner = st.keys.authenticate(&headers)?;
    let params = ListParams::parse(query.as_deref())?;
    let mut items = Vec::new();
    let mut token = None;
    loop {
        let mut q = params
            .query(&owner)
            .state([SandboxState::Running, SandboxState::Snapshotting])
            .limit(MAX_LIST_LIMIT);
        if let Some(t) = token.take() {
            q = q.next_token(t);
        }
        let page = st.rt.list(q).await?;
        items.extend(
            page.sandboxes
                .iter()
                .filter(|info| params.keeps(&st, info))
                .map(listed),
        );
        match page.next_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    Ok(Json(items).into_response())
}

/// `GET /v2/sandboxes`: filtered by state and metadata, paginated with
/// `limit` and `nextToken`, the next token in `X-Next-Token`.
async fn list_v2(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    let owner = st.keys.authenticate(&headers)?;
    let params = ListParams::parse(query.as_deref())?;
    let mut q = params.query(&owner);
    let states = if params.states.is_empty() {
        vec![SandboxState::Running, SandboxState::Paused]
    } else {
        params.states.clone()
    };
    let mut states_q = states.clone();
    if states.contains(&SandboxState::Running) {
        states_q.push(SandboxState::Snapshotting);
    }
    q = q.state(states_q);
    if let Some(limit) = params.limit {
        q = q.limit(limit);
    }
    if let Some(t) = &params.next_token {
        q = q.next_token(t.clone());
    }
    let page = st.rt.list(q).await.map_err(|e| match e {
        dormouse::Error::InvalidConfig(m) => ApiError::bad_request(m),
        e => e.into(),
    })?;
    let items: Vec<Value> = page
        .sandboxes
        .iter()
        .filter(|info| params.keeps(&st, info))
        .map(listed)
        .collect();
    let mut response = Json(items).into_response();
    if let Some(t) = page.next_token {
        let value = HeaderValue::from_str(&t).map_err(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "unprintable list token")
        })?;
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

/// The query of a list: `state` (comma-separated or repeated), `metadata`
/// (URL-encoded `k=v&k2=v2`, keys and values percent-encoded once more,
/// as the SDK sends it), `template`, `startedAfter` (RFC 3339), `order`
/// (`asc` only: oldest start first), `limit`, `nextToken`.
#[derive(Debug, Default)]
struct ListParams {
    states: Vec<SandboxState>,
    metadata: BTreeMap<String, String>,
    template: Option<String>,
    started_after_ms: Option<u64>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// Decodes `%XX` escapes (the SDK quotes metadata keys and values before
/// it URL-encodes them).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied(),
            bytes.get(i + 2).copied(),
        ) {
            (b'%', Some(h), Some(l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Milliseconds since the epoch of an RFC 3339 time with a `Z` or
/// `±HH:MM` offset (Python's `isoformat()`).
fn parse_time_ms(text: &str) -> Option<u64> {
    let (local, offset_secs) = match text.len().checked_sub(6).map(|at| text.split_at(at)) {
        Some((head, tail))
            if (tail.starts_with('+') || tail.starts_with('-')) && tail.as_bytes()[3] == b':' =>
        {
            let h: i64 = tail[1..3].parse().ok()?;
            let m: i64 = tail[4..6].parse().ok()?;
            let sign = if tail.starts_with('-') { -1 } else { 1 };
            (format!("{head}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (text.to_owned(), 0),
    };
    let t = humantime::parse_rfc3339(&local).ok()?;
    let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64 - offset_secs * 1000;
    u64::try_from(ms).ok()
}

impl ListParams {
    fn parse(query: Option<&str>) -> ApiResult<Self> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
        let mut params = ListParams::default();
        for (key, value) in pairs {
            match key.as_str() {
                "state" => {
                    for s in value.split(',').filter(|s| !s.is_empty()) {
                        params.states.push(match s {
                            "running" => SandboxState::Running,
                            "paused" => SandboxState::Paused,
                            other => {
                                return Err(ApiError::bad_request(format!(
                                    "unknown state {other:?}: use running or paused"
                                )))
                            }
                        });
                    }
                }
                "metadata" => {
                    let kv: Vec<(String, String)> =
                        serde_urlencoded::from_str(&value).map_err(|e| {
                            ApiError::bad_request(format!("invalid metadata filter: {e}"))
                        })?;
                    params.metadata.extend(
                        kv.iter()
                            .map(|(k, v)| (percent_decode(k), percent_decode(v))),
                    );
                }
                "limit" => {
                    let limit: usize = value.parse().map_err(|_| {
                        ApiError::bad_request(format!("limit {value:?} is not a number"))
                    })?;
                    if limit == 0 || limit > MAX_LIST_LIMIT {
                        return Err(ApiError::bad_request(format!(
                            "limit {limit} is out of range: give 1 to {MAX_LIST_LIMIT}"
                        )));
                    }
                    params.limit = Some(limit);
                }
                "nextToken" => params.next_token = Some(value).filter(|t| !t.is_empty()),
                "template" => params.template = Some(value).filter(|t| !t.is_empty()),
                "startedAfter" => {
                    params.started_after_ms = Some(parse_time_ms(&value).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "startedAfter {value:?} is not an RFC 3339 time"
                        ))
                    })?)
                }
                "order" if !value.eq_ignore_ascii_case("asc") => {
                    return Err(ApiError::bad_request(format!(
                        "order {value:?} is not supported: sandboxes are listed oldest start first (asc)"
                    )));
                }
                _ => {}
            }
        }
        if params
            .metadata
            .keys()
            .any(|k| k.starts_with(RESERVED_PREFIX))
        {
            return Err(ApiError::bad_request(format!(
                "metadata keys starting with {RESERVED_PREFIX:?} are reserved"
            )));
        }
        Ok(params)
    }

    /// The filters the runtime's query does not apply. A page may come out
    /// shorter than the limit; its next token still continues the list.
    fn keeps(&self, st: &AppState, info: &SandboxInfo) -> bool {
        let template_ok = self.template.as_ref().is_none_or(|t| {
            *t == info.template || st.aliases.get(t).is_some_and(|a| *a == info.template)
        });
        template_ok
            && self
                .started_after_ms
                .is_none_or(|t| info.started_at_ms >= t)
    }

    fn query(&self, owner: &Owner) -> ListQuery {
        let mut q = ListQuery::default().metadata(OWNER_KEY, owner.as_str());
        for (k, v) in &self.metadata {
            q = q.metadata(k.clone(), v.clone());
        }
        q
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A sandbox as E2B lists it.
fn listed(info: &SandboxInfo) -> Value {
    let end = info
        .end_at_ms
        .unwrap_or(info.started_at_ms + info.timeout_ms);
    json!({
        "templateID": info.template,
        "alias": info.template,
        "sandboxID": info.id,
        "clientID": CLIENT_ID,
        "startedAt": rfc3339(info.started_at_ms),
        "endAt": rfc3339(end),
        "cpuCount": info.vcpus,
        "memoryMB": info.memory_mib,
        "diskSizeMB": info.disk_mib,
        "state": state::e2b_state(info.state),
        "envdVersion": ENVD_VERSION,
        "metadata": state::visible_metadata(info),
    })
}

impl AppState {
    /// The body of a create or connect answer.
    fn sandbox_json(&self, live: &Live) -> Value {
        json!({
            "templateID": live.sandbox.template(),
            "sandboxID": live.sandbox.id().as_str(),
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": live.token,
            "trafficAccessToken": live.traffic_token,
            "domain": self.domain,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_params_parse_states_metadata_and_limits() {
        let p = ListParams::parse(Some(
            "state=running,paused&metadata=user%3Dalice%26env%3Ddev&limit=4&nextToken=abc",
        ))
        .unwrap();
        assert_eq!(p.states, [SandboxState::Running, SandboxState::Paused]);
        assert_eq!(p.metadata.get("user").map(String::as_str), Some("alice"));
        assert_eq!(p.metadata.get("env").map(String::as_str), Some("dev"));
        assert_eq!((p.limit, p.next_token.as_deref()), (Some(4), Some("abc")));
        let p = ListParams::parse(Some("state=paused&state=running")).unwrap();
        assert_eq!(p.states, [SandboxState::Paused, SandboxState::Running]);
        for bad in [
            "state=sleeping",
            "limit=0",
            "limit=1001",
            "limit=x",
            "metadata=dormouse.owner%3Dx",
        ] {
            let e = ListParams::parse(Some(bad)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{bad}");
        }
    }

    #[test]
    fn list_params_read_what_the_sdk_sends() {
        // SandboxQuery(metadata={"a b": "c+d"}): quoted, then URL-encoded.
        let p = ListParams::parse(Some(
            "metadata=a%252520b%3Dc%25252Bd&template=base&startedAfter=2025-01-01T10%3A00%3A00.5%2B02%3A00&order=asc",
        ))
        .unwrap();
        assert_eq!(
            p.metadata.get("a b").map(String::as_str),
            Some("c+d"),
            "{p:?}"
        );
        assert_eq!(p.template.as_deref(), Some("base"));
        assert_eq!(p.started_after_ms, Some(1_735_718_400_500));
        assert_eq!(
            parse_time_ms("2025-01-01T08:00:00Z"),
            Some(1_735_718_400_000)
        );
        assert!(ListParams::parse(Some("order=desc")).is_err());
        assert!(ListParams::parse(Some("startedAfter=yesterday")).is_err());
    }

    #[test]
    fn timeouts_are_bounded() {
        assert_eq!(timeout_of(None, 15).unwrap(), Duration::from_secs(15));
        assert!(timeout_of(Some(0), 15).is_err());
        assert!(timeout_of(Some(MAX_TIMEOUT_SECS + 1), 15).is_err());
    }
}
