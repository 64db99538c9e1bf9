//! Templates built on other templates: a base template's snapshot, set up
//! with commands, files, an environment, a working directory and a start
//! command, then snapshotted again under a new name.
//!
//! A built template lives in `<state dir>/built-templates/<name>/`: the
//! snapshot (as a named snapshot is kept) and `template.json`, the spec it
//! was built from. Building the same spec on the same base again reuses it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::runtime::{lock_file, remove_snapshot_dir, valid_name, Runtime};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::Command;

mod apt;

/// The file describing a built template.
const SPEC: &str = "template.json";
/// The folder of built templates in the state directory.
pub(crate) const BUILT: &str = "built-templates";

/// What to build: see [`Runtime::build_template`].
///
/// ```no_run
/// # async fn demo(rt: dormouse::Runtime) -> dormouse::Result<()> {
/// use dormouse::TemplateBuilder;
/// let spec = TemplateBuilder::new("web", "python")
///     .apt_install(["sqlite3"])
///     .run("mkdir -p /srv && echo hello > /srv/index.html")
///     .file("/srv/app.py", "print('app')\n")
///     .env("GREETING", "hi")
///     .cwd("/srv")
///     .start("python3 -m http.server 8000");
/// rt.build_template(spec).await?;
/// let sbx = rt.create("web", Default::default()).await?; // the server runs already
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TemplateBuilder {
    name: String,
    base: String,
    packages: Vec<String>,
    commands: Vec<String>,
    files: Vec<(String, Vec<u8>)>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    start: Option<String>,
    ready: Option<String>,
    memory_mib: Option<u32>,
    vcpus: Option<u8>,
    step_timeout: Duration,
}

/// How often a build polls its ready command.
const READY_POLL: Duration = Duration::from_millis(500);

impl TemplateBuilder {
    /// A template `name` built on the template `base` (e.g. `"python"`,
    /// the default Debian + python3 image).
    pub fn new(name: impl Into<String>, base: impl Into<String>) -> Self {
        TemplateBuilder {
            name: name.into(),
            base: base.into(),
            packages: Vec::new(),
            commands: Vec::new(),
            files: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            start: None,
            ready: None,
            memory_mib: None,
            vcpus: None,
            step_timeout: Duration::from_secs(1800),
        }
    }

    /// Installs Debian packages (`name` or `name=version`), with the
    /// dependencies the base lacks, before the files and commands. The
    /// guest has no network: the host's `apt-get` downloads them from the
    /// guest's apt sources (checked with the host's apt keys) and the
    /// build installs them in the guest with `dpkg -i`. Needs `apt-get` on
    /// the host and network there.
    pub fn apt_install<I, S>(mut self, packages: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.packages.extend(packages.into_iter().map(Into::into));
        self
    }

    /// Runs the shell command line at build time (in order with the other
    /// commands, after the files are written); a non-zero exit fails the
    /// build.
    pub fn run(mut self, cmdline: impl Into<String>) -> Self {
        self.commands.push(cmdline.into());
        self
    }

    /// Writes `data` to `path` in the template (parent directories made).
    pub fn file(mut self, path: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
        self.files.push((path.into(), data.into()));
        self
    }

    /// An environment variable of every command, at build time and in
    /// every sandbox of the template.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// The working directory of commands that give none.
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// A command started (in the background) last: it is running in every
    /// sandbox created from the template.
    pub fn start(mut self, cmdline: impl Into<String>) -> Self {
        self.start = Some(cmdline.into());
        self
    }

    /// A shell command that exits 0 once the start command is ready (a
    /// server listens, say): the build runs it until it does (within the
    /// step timeout) before the snapshot is taken. Without one, the start
    /// command is snapshotted as soon as it is started.
    pub fn ready(mut self, cmdline: impl Into<String>) -> Self {
        self.ready = Some(cmdline.into());
        self
    }

    /// Guest memory in MiB (default: the base template's).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = Some(mib);
        self
    }

    /// vCPUs (default: the base template's).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = Some(n);
        self
    }

    /// How long each build command may run (default 30 minutes).
    pub fn step_timeout(mut self, timeout: Duration) -> Self {
        self.step_timeout = timeout;
        self
    }

    /// What the build's output depends on, recorded to reuse it.
    fn spec(&self, base_snapshot: String) -> BuiltSpec {
        BuiltSpec {
            name: self.name.clone(),
            base: self.base.clone(),
            base_snapshot,
            packages: self.packages.clone(),
            commands: self.commands.clone(),
            files: self
                .files
                .iter()
                .map(|(path, data)| FileDigest {
                    path: path.clone(),
                    len: data.len() as u64,
                    crc32: crate::disk::crc32(data),
                    fnv64: fnv64(data),
                })
                .collect(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            start: self.start.clone(),
            ready: self.ready.clone(),
        }
    }
}

/// A built template's spec, as `template.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct BuiltSpec {
    pub name: String,
    pub base: String,
    /// The base template's snapshot directory (its name carries the key of
    /// everything it depends on).
    pub base_snapshot: String,
    #[serde(default)]
    pub packages: Vec<String>,
    pub commands: Vec<String>,
    pub files: Vec<FileDigest>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub start: Option<String>,
    #[serde(default)]
    pub ready: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FileDigest {
    path: String,
    len: u64,
    crc32: u32,
    fnv64: u64,
}

/// FNV-1a, 64 bits: with the CRC-32 and the length, enough to tell whether
/// a file given to a build changed.
fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The built template `name` of the state directory `state`: its
/// directory and spec, if it is complete.
pub(crate) fn find(state: &Path, name: &str) -> Option<(PathBuf, BuiltSpec)> {
    if !valid_name(name) {
        return None;
    }
    let dir = state.join(BUILT).join(name);
    let bytes = std::fs::read(dir.join(SPEC)).ok()?;
    let spec: BuiltSpec = serde_json::from_slice(&bytes).ok()?;
    (spec.name == name && crate::snapshot::exists(&dir)).then_some((dir, spec))
}

impl Runtime {
    /// Builds the template `spec` names on its base template: starts a
    /// sandbox from the base's snapshot, installs the Debian packages,
    /// writes the files, runs the commands, starts the start command, and
    /// snapshots it under the new
    /// name, for [`Runtime::create`] (which then looks for it first). If
    /// the same spec was built on the same base before, that build is kept
    /// and this returns at once. Returns whether it built.
    ///
    /// A command that exits non-zero (or runs past the step timeout) fails
    /// the build with [`Error::TemplateBuild`], naming it, with its output;
    /// so does a package apt cannot find or download (apt's message).
    /// [`Error::InvalidConfig`] for a malformed template or package name.
    pub async fn build_template(&self, spec: TemplateBuilder) -> Result<bool> {
        let name = spec.name.clone();
        if !valid_name(&name) || name == spec.base {
            return Err(Error::InvalidConfig(format!(
                "template name {name:?}: use 1 to 64 of [A-Za-z0-9._-], not starting with a dot, other than the base's"
            )));
        }
        if let Some(bad) = spec.packages.iter().find(|p| !apt::valid_package(p)) {
            return Err(Error::InvalidConfig(format!(
                "Debian package {bad:?}: give a package name (lower case letters, digits, + - .), optionally =version"
            )));
        }
        let built = self.dir().join(BUILT);
        tokio::fs::create_dir_all(&built)
            .await
            .map_err(Error::io(format!("cannot create {}", built.display())))?;
        let lock_path = built.join(format!(".{name}.lock"));
        let lock = tokio::task::spawn_blocking(move || lock_file(&lock_path))
            .await
            .map_err(|e| Error::io("the template lock task failed")(std::io::Error::other(e)))??;

        let base = self.template(&spec.base)?;
        let config = SandboxConfig {
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            // Each step has its own limit; the whole build none.
            timeout: crate::DEFAULT_MAX_RUNNING,
            ..SandboxConfig::default()
        };
        let base_dir = self.inner_template_snapshot(&base, &config).await?;
        let base_snapshot = base_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let wanted = spec.spec(base_snapshot);
        if let Some((_, existing)) = find(self.dir(), &name) {
            if existing == wanted {
                drop(lock);
                return Ok(false);
            }
        }
        let target = built.join(&name);
        if target.exists() {
            remove_snapshot_dir(&target).await?;
        }

        let mut sbx =
            Sandbox::start_from(self.inner(), base_dir, Some(name.clone()), config).await?;
        let fail = |step: String, reason: String| Error::TemplateBuild {
            template: name.clone(),
            step,
            reason,
        };
        let setup = async {
            if !spec.packages.is_empty() {
                install_packages(&sbx, &built, &name, &spec.packages, spec.step_timeout)
                    .await
                    .map_err(|reason| {
                        fail(format!("install {}", spec.packages.join(" ")), reason)
                    })?;
            }
            for (path, data) in &spec.files {
                sbx.files()
                    .write(path, data)
                    .await
                    .map_err(|e| fail(format!("write {path}"), e.to_string()))?;
            }
            for cmd in &spec.commands {
                let out = sbx
                    .commands()
                    .exec(Command::shell(cmd).timeout(spec.step_timeout))
                    .await
                    .map_err(|e| fail(format!("run {cmd:?}"), e.to_string()))?;
                if out.exit_code != 0 {
                    return Err(fail(
                        format!("run {cmd:?}"),
                        format!(
                            "exit code {}\nstdout: {}\nstderr: {}",
                            out.exit_code, out.stdout, out.stderr
                        ),
                    ));
                }
            }
            if let Some(start) = &spec.start {
                sbx.commands()
                    .spawn(Command::shell(start).tag("start"))
                    .await
                    .map_err(|e| fail(format!("start {start:?}"), e.to_string()))?;
            }
            if let Some(ready) = &spec.ready {
                let step = format!("wait until {ready:?} succeeds");
                let since = std::time::Instant::now();
                loop {
                    let out = sbx
                        .commands()
                        .exec(Command::shell(ready).timeout(spec.step_timeout))
                        .await
                        .map_err(|e| fail(step.clone(), e.to_string()))?;
                    if out.exit_code == 0 {
                        break;
                    }
                    if since.elapsed() >= spec.step_timeout {
                        return Err(fail(
                            step,
                            format!(
                                "still exit code {} after {:?}\nstderr: {}",
                                out.exit_code, spec.step_timeout, out.stderr
                            ),
                        ));
                    }
                    tokio::time::sleep(READY_POLL).await;
                }
            }
            Ok(())
        };
        if let Err(e) = setup.await {
            let _ = sbx.kill().await;
            return Err(e);
        }
        let snapshot = sbx.snapshot_to(&name, target.clone()).await;
        let killed = sbx.kill().await;
        snapshot?;
        killed?;
        let json = serde_json::to_vec_pretty(&wanted).expect("a spec serialises");
        let tmp = target.join(format!("{SPEC}.tmp"));
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, target.join(SPEC)))
            .and_then(|()| crate::fsutil::sync_dir(&target))
            .map_err(Error::io(format!(
                "cannot write {}",
                target.join(SPEC).display()
            )))?;
        drop(lock);
        Ok(true)
    }
}

/// Installs `packages` in the build sandbox `sbx` (see
/// [`TemplateBuilder::apt_install`]), downloading them in a work directory
/// under `built`. The error says what failed, with apt's or dpkg's output.
async fn install_packages(
    sbx: &Sandbox<crate::Running>,
    built: &Path,
    name: &str,
    packages: &[String],
    step_timeout: Duration,
) -> std::result::Result<(), String> {
    let out = sbx
        .commands()
        // From `/`: the template's working directory may not exist yet.
        .exec(Command::shell(apt::GUEST_FACTS).cwd("/"))
        .await
        .map_err(|e| format!("cannot ask the guest for its apt sources: {e}"))?;
    let facts = apt::parse_facts(&out.stdout)?;
    let status = sbx
        .files()
        .read("/var/lib/dpkg/status")
        .await
        .map_err(|e| format!("cannot read the guest's /var/lib/dpkg/status: {e}"))?;

    let work = built.join(format!(".apt-{name}"));
    let _ = std::fs::remove_dir_all(&work);
    let download = {
        let work = work.clone();
        let packages = packages.to_vec();
        tokio::task::spawn_blocking(move || apt::download(&work, &facts, &status, &packages))
    };
    let installed = async {
        let debs = download
            .await
            .map_err(|e| format!("the download task failed: {e}"))??;
        if debs.is_empty() {
            return Ok(()); // the base has them all
        }
        for deb in &debs {
            let mut file = tokio::fs::File::open(deb)
                .await
                .map_err(|e| format!("cannot open {}: {e}", deb.display()))?;
            let file_name = deb.file_name().unwrap_or_default().to_string_lossy();
            let target = format!("{}/{file_name}", apt::GUEST_DIR);
            sbx.files()
                .write_from(&target, &mut file)
                .await
                .map_err(|e| format!("cannot copy {file_name} into the guest: {e}"))?;
        }
        let out = sbx
            .commands()
            .exec(
                Command::shell(apt::install_command(&debs))
                    .cwd("/")
                    .timeout(step_timeout),
            )
            .await
            .map_err(|e| format!("dpkg -i: {e}"))?;
        if out.exit_code != 0 {
            return Err(format!(
                "dpkg -i: exit code {}\nstdout: {}\nstderr: {}",
                out.exit_code, out.stdout, out.stderr
            ));
        }
        Ok(())
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&work).await;
    installed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spec_changes_with_every_input() {
        let base = TemplateBuilder::new("t", "python")
            .run("true")
            .file("/a", "x")
            .env("K", "V")
            .cwd("/root")
            .start("sleep 1000");
        let spec = base.spec("python-1".into());
        assert_eq!(spec, base.clone().spec("python-1".into()));
        for other in [
            base.clone().run("false"),
            base.clone().file("/a", "y"),
            base.clone().env("K", "W"),
            base.clone().cwd("/tmp"),
            base.clone().start("sleep 1"),
            base.clone().ready("true"),
            base.clone().apt_install(["jq"]),
        ] {
            assert_ne!(spec, other.spec("python-1".into()));
        }
        assert_ne!(spec, base.spec("python-2".into()));
    }
}
