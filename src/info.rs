//! What the runtime knows about each sandbox without touching its guest:
//! the record file `sandbox.json` in its directory, and listing them.
//!
//! The record is rewritten (atomically) at every transition. Which state a
//! sandbox is really in does not depend on it alone: a sandbox whose lock
//! no live handle holds is paused if it has a snapshot (the process that
//! ran it exited or died; it resumes from its last snapshot) and gone
//! otherwise, whatever its record says.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The record file's name in a sandbox directory.
pub(crate) const RECORD: &str = "sandbox.json";
/// The largest record accepted (metadata included).
const MAX_RECORD_LEN: u64 = 256 << 10;
/// The most metadata entries a sandbox may have, and their sizes.
pub(crate) const MAX_METADATA_ENTRIES: usize = 64;
pub(crate) const MAX_METADATA_KEY: usize = 256;
pub(crate) const MAX_METADATA_VALUE: usize = 2048;
/// The default and largest page size of [`ListQuery`].
pub const DEFAULT_LIMIT: usize = 100;
/// The largest page size of [`ListQuery`].
pub const MAX_LIMIT: usize = 1000;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Its guest runs.
    Running,
    /// Its whole state is in files; it uses no memory or CPU.
    Paused,
    /// A snapshot of it is being taken; it runs again afterwards.
    Snapshotting,
}

/// What is known about a sandbox, from [`Runtime::info`](crate::Runtime::info),
/// [`Runtime::list`](crate::Runtime::list) or
/// [`Sandbox::info`](crate::Sandbox::info).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// The sandbox's id.
    pub id: String,
    /// The template it was created from.
    pub template: String,
    /// Its state.
    pub state: SandboxState,
    /// The caller's labels, given at creation.
    pub metadata: BTreeMap<String, String>,
    /// When it was created (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When its guest last started running: created or resumed.
    pub started_at_ms: u64,
    /// When it was last paused, if ever.
    pub paused_at_ms: Option<u64>,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Disk size in MiB.
    pub disk_mib: u64,
    /// The timeout it was created with, in ms: how long it runs after a
    /// create or resume before [`SandboxInfo::auto_pause`] applies.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// At its timeout: paused if true, killed if false.
    #[serde(default)]
    pub auto_pause: bool,
    /// While running: when its timeout (or the runtime's maximum running
    /// time) ends, in ms since the Unix epoch.
    #[serde(default)]
    pub end_at_ms: Option<u64>,
    /// Environment variables every command gets (its own override them).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory of commands that give none.
    #[serde(default)]
    pub cwd: Option<String>,
}

fn default_timeout_ms() -> u64 {
    crate::sandbox::DEFAULT_TIMEOUT.as_millis() as u64
}

impl SandboxInfo {
    /// What a paused sandbox whose record file is missing or damaged is
    /// known as, from its snapshot's manifest.
    pub(crate) fn of_snapshot(manifest: &crate::snapshot::Manifest, disk_mib: u64) -> Self {
        let record = &manifest.sandbox;
        SandboxInfo {
            id: record.id.clone(),
            template: record.template.clone(),
            state: SandboxState::Paused,
            metadata: BTreeMap::new(),
            created_at_ms: manifest.paused_at_ms,
            started_at_ms: manifest.paused_at_ms,
            paused_at_ms: Some(manifest.paused_at_ms),
            vcpus: record.vcpus,
            memory_mib: record.mem_mib,
            disk_mib,
            timeout_ms: default_timeout_ms(),
            auto_pause: false,
            end_at_ms: None,
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    /// When it was created.
    pub fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_at_ms)
    }

    /// When its guest last started running.
    pub fn started_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.started_at_ms)
    }
}

/// Which sandboxes [`Runtime::list`](crate::Runtime::list) returns.
///
/// ```
/// use dormouse::{ListQuery, SandboxState};
/// let query = ListQuery::default()
///     .state([SandboxState::Paused])
///     .metadata("user", "alice")
///     .limit(10);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    states: Vec<SandboxState>,
    metadata: BTreeMap<String, String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

impl ListQuery {
    /// Only sandboxes in one of `states` (default: every state).
    pub fn state(mut self, states: impl IntoIterator<Item = SandboxState>) -> Self {
        self.states = states.into_iter().collect();
        self
    }

    /// Only sandboxes whose metadata has `key` = `value` (every pair given
    /// must match).
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// At most `limit` sandboxes per page (default 100, at
    /// most 1000).
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = Some(limit);
        self
    }

    /// The page after the one that returned `token` as its
    /// [`SandboxPage::next_token`].
    pub fn next_token(mut self, token: impl Into<String>) -> Self {
        self.next_token = Some(token.into());
        self
    }

    fn matches(&self, info: &SandboxInfo) -> bool {
        (self.states.is_empty() || self.states.contains(&info.state))
            && self
                .metadata
                .iter()
                .all(|(k, v)| info.metadata.get(k) == Some(v))
    }
}

/// One page of [`Runtime::list`](crate::Runtime::list).
#[derive(Debug, Clone)]
pub struct SandboxPage {
    /// The sandboxes, oldest start first (ties by id).
    pub sandboxes: Vec<SandboxInfo>,
    /// Give this to [`ListQuery::next_token`] for the next page; `None` on
    /// the last page.
    pub next_token: Option<String>,
}

/// The position after `info` in list order, as an opaque token.
fn token_after(info: &SandboxInfo) -> String {
    format!("{:016x}{}", info.started_at_ms, info.id)
}

fn parse_token(token: &str) -> Result<(u64, String)> {
    let invalid = || {
        Error::InvalidConfig(format!(
            "invalid list token {token:?}: pass the next_token of the previous page unchanged"
        ))
    };
    if token.len() != 36 || !token.is_ascii() {
        return Err(invalid());
    }
    let (time, id) = token.split_at(16);
    let time = u64::from_str_radix(time, 16).map_err(|_| invalid())?;
    crate::sandbox::SandboxId::parse(id).ok_or_else(invalid)?;
    Ok((time, id.to_owned()))
}

/// Sorts, filters and cuts one page out of `all`.
pub(crate) fn page(mut all: Vec<SandboxInfo>, query: &ListQuery) -> Result<SandboxPage> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(Error::InvalidConfig(format!(
            "list limit {limit}: give 1 to {MAX_LIMIT}"
        )));
    }
    let after = query.next_token.as_deref().map(parse_token).transpose()?;
    all.retain(|info| query.matches(info));
    all.sort_by(|a, b| (a.started_at_ms, &a.id).cmp(&(b.started_at_ms, &b.id)));
    if let Some((time, id)) = after {
        all.retain(|info| (info.started_at_ms, &info.id) > (time, &id));
    }
    let more = all.len() > limit;
    all.truncate(limit);
    let next_token = more.then(|| token_after(all.last().expect("limit >= 1")));
    Ok(SandboxPage {
        sandboxes: all,
        next_token,
    })
}

/// Checks metadata given at creation.
pub(crate) fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<()> {
    check_map("metadata", metadata)
}

/// Checks a string map of a sandbox (metadata, environment): bounded, and
/// environment names the guest can take.
pub(crate) fn check_map(what: &str, map: &BTreeMap<String, String>) -> Result<()> {
    if map.len() > MAX_METADATA_ENTRIES {
        return Err(Error::InvalidConfig(format!(
            "{} {what} entries, at most {MAX_METADATA_ENTRIES} allowed",
            map.len()
        )));
    }
    for (k, v) in map {
        if k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE {
            return Err(Error::InvalidConfig(format!(
                "{what} {k:?}: keys take 1 to {MAX_METADATA_KEY} bytes, values at most {MAX_METADATA_VALUE}"
            )));
        }
        if what == "environment" && (k.contains('=') || k.contains('\0') || v.contains('\0')) {
            return Err(Error::InvalidConfig(format!(
                "environment variable {k:?}: names cannot hold '=' or NUL, values cannot hold NUL"
            )));
        }
    }
    Ok(())
}

/// Writes the record of the sandbox directory `dir` (atomically: a reader
/// sees the old record or the new one).
pub(crate) fn write(dir: &Path, info: &SandboxInfo) -> Result<()> {
    let path = dir.join(RECORD);
    let tmp = dir.join(format!("{RECORD}.tmp"));
    let json = serde_json::to_vec(info).expect("a sandbox record serialises");
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(Error::io(format!("cannot write {}", path.display())))
}

/// Reads the record of the sandbox directory `dir`, validated; `None` if
/// it has none (or a damaged one).
pub(crate) fn read(dir: &Path) -> Option<SandboxInfo> {
    let path = dir.join(RECORD);
    let file = std::fs::File::open(&path).ok()?;
    if file.metadata().ok()?.len() > MAX_RECORD_LEN {
        log::warn!("ignoring {}: too long", path.display());
        return None;
    }
    let info: SandboxInfo = match serde_json::from_reader(std::io::BufReader::new(file)) {
        Ok(info) => info,
        Err(e) => {
            log::warn!("ignoring {}: {e}", path.display());
            return None;
        }
    };
    let dir_name = dir.file_name().and_then(|n| n.to_str());
    if dir_name != Some(info.id.as_str())
        || check_metadata(&info.metadata).is_err()
        || check_map("environment", &info.env).is_err()
    {
        log::warn!("ignoring {}: it does not belong here", path.display());
        return None;
    }
    Some(info)
}

/// A named snapshot, from [`Runtime::list_snapshots`](crate::Runtime::list_snapshots)
/// or [`Sandbox::snapshot`](crate::Sandbox::snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// The template of the sandbox it was taken of.
    pub template: String,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// That sandbox's metadata, which sandboxes started from it inherit.
    pub metadata: BTreeMap<String, String>,
    /// When it was taken (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// That sandbox's environment variables and working directory for
    /// commands, which sandboxes started from it inherit.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// See `env`.
    #[serde(default)]
    pub cwd: Option<String>,
}

impl SnapshotInfo {
    pub(crate) fn new(name: &str, of: &SandboxInfo) -> Self {
        SnapshotInfo {
            name: name.to_owned(),
            template: of.template.clone(),
            sandbox_id: of.id.clone(),
            metadata: of.metadata.clone(),
            created_at_ms: crate::fsutil::now_ms(),
            vcpus: of.vcpus,
            memory_mib: of.memory_mib,
            env: of.env.clone(),
            cwd: of.cwd.clone(),
        }
    }
}

/// The file in a snapshot directory that describes it.
pub(crate) const SNAPSHOT_RECORD: &str = "snapshot-info.json";

/// Reads the description of the snapshot directory `dir`.
pub(crate) fn read_snapshot(dir: &Path) -> Option<SnapshotInfo> {
    let path = dir.join(SNAPSHOT_RECORD);
    let file = std::fs::File::open(&path).ok()?;
    if file.metadata().ok()?.len() > MAX_RECORD_LEN {
        return None;
    }
    let info: SnapshotInfo = serde_json::from_reader(std::io::BufReader::new(file)).ok()?;
    let dir_name = dir.file_name().and_then(|n| n.to_str());
    (dir_name == Some(info.name.as_str())
        && check_metadata(&info.metadata).is_ok()
        && check_map("environment", &info.env).is_ok())
    .then_some(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(i: u64, state: SandboxState, user: &str) -> SandboxInfo {
        SandboxInfo {
            id: format!("{i:020x}"),
            template: "python".into(),
            state,
            metadata: [("user".to_owned(), user.to_owned())].into(),
            created_at_ms: 1000 + i,
            started_at_ms: 5000 - (i % 3),
            paused_at_ms: None,
            vcpus: 1,
            memory_mib: 512,
            disk_mib: 1024,
            timeout_ms: 300_000,
            auto_pause: false,
            end_at_ms: None,
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    #[test]
    fn pages_cover_each_match_once_in_start_order() {
        let all: Vec<_> = (0..25)
            .map(|i| {
                let state = if i % 2 == 0 {
                    SandboxState::Running
                } else {
                    SandboxState::Paused
                };
                info(i, state, if i < 10 { "a" } else { "b" })
            })
            .collect();
        let mut seen = Vec::new();
        let mut query = ListQuery::default().limit(4);
        loop {
            let page = page(all.clone(), &query).unwrap();
            assert!(page.sandboxes.len() <= 4);
            seen.extend(page.sandboxes);
            match page.next_token {
                Some(t) => query = query.next_token(t),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        assert!(seen
            .windows(2)
            .all(|w| (w[0].started_at_ms, &w[0].id) < (w[1].started_at_ms, &w[1].id)));

        let paused_b = ListQuery::default()
            .state([SandboxState::Paused])
            .metadata("user", "b");
        let got = page(all.clone(), &paused_b).unwrap();
        assert_eq!(got.sandboxes.len(), 7); // 11, 13, ..., 23
        assert!(got.next_token.is_none());
    }

    #[test]
    fn bad_tokens_and_limits_are_errors() {
        for token in [
            "",
            "zz",
            &"0".repeat(35),
            &format!("{:016x}../../etc/passwd00", 1),
        ] {
            let q = ListQuery::default().next_token(token);
            assert!(page(Vec::new(), &q).is_err(), "{token:?}");
        }
        assert!(page(Vec::new(), &ListQuery::default().limit(0)).is_err());
        assert!(page(Vec::new(), &ListQuery::default().limit(MAX_LIMIT + 1)).is_err());
    }

    #[test]
    fn metadata_is_bounded() {
        let mut m = BTreeMap::new();
        m.insert("k".repeat(MAX_METADATA_KEY + 1), String::new());
        assert!(check_metadata(&m).is_err());
        let m: BTreeMap<_, _> = (0..=MAX_METADATA_ENTRIES)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(check_metadata(&m).is_err());
    }
}
