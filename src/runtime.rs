//! The runtime: a state directory, where templates are found, and the
//! sandboxes created from them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::sandbox::{Paused, Running, Sandbox, SandboxConfig};
use crate::template::Template;
use crate::vmm::cpu::HostKind;

/// Environment variable: extra template directories, `:`-separated.
pub const TEMPLATE_PATH_ENV: &str = "DORMOUSE_TEMPLATE_PATH";
/// Environment variable: the build cache of `guest/build.sh`.
pub const CACHE_ENV: &str = "DORMOUSE_CACHE";

/// Entry point of the library: owns a state directory in which every
/// sandbox keeps its files (`<dir>/sandboxes/<id>/`).
///
/// Templates are looked up by name, in order, in: directories added with
/// [`RuntimeBuilder::template_dir`], `<dir>/templates/`, each directory of
/// `$DORMOUSE_TEMPLATE_PATH`, and the `templates/` folder of the guest build
/// cache (`$DORMOUSE_CACHE`, default `~/.cache/dormouse`), where
/// `guest/build.sh` puts the `python` template.
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

#[derive(Debug)]
pub(crate) struct RuntimeInner {
    pub(crate) dir: PathBuf,
    template_dirs: Vec<PathBuf>,
    pub(crate) kvm_path: PathBuf,
    pub(crate) host: HostKind,
}

/// Options for opening a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    dir: PathBuf,
    template_dirs: Vec<PathBuf>,
    kvm_path: PathBuf,
}

impl RuntimeBuilder {
    /// Searches `dir` for templates before the default locations.
    pub fn template_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.template_dirs.push(dir.into());
        self
    }

    /// Uses another KVM device node than `/dev/kvm`.
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    /// Creates the state directory if needed and opens the runtime.
    pub async fn open(self) -> Result<Runtime> {
        let sandboxes = self.dir.join("sandboxes");
        tokio::fs::create_dir_all(&sandboxes)
            .await
            .map_err(Error::io(format!(
                "cannot create the state directory {}",
                sandboxes.display()
            )))?;
        let mut template_dirs = self.template_dirs;
        template_dirs.push(self.dir.join("templates"));
        if let Some(paths) = std::env::var_os(TEMPLATE_PATH_ENV) {
            template_dirs
                .extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
        }
        template_dirs.push(default_cache_dir().join("templates"));
        Ok(Runtime {
            inner: Arc::new(RuntimeInner {
                dir: self.dir,
                template_dirs,
                kvm_path: self.kvm_path,
                host: HostKind::detect(),
            }),
        })
    }
}

/// `$DORMOUSE_CACHE`, else `$XDG_CACHE_HOME/dormouse`, else `~/.cache/dormouse`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("dormouse");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("dormouse")
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

impl RuntimeInner {
    /// Finds the template `name` in the template directories.
    pub(crate) fn template(&self, name: &str) -> Result<Template> {
        if !valid_name(name) {
            return Err(Error::TemplateNotFound {
                name: name.to_owned(),
                searched: Vec::new(),
            });
        }
        for dir in &self.template_dirs {
            let candidate = dir.join(name);
            if candidate.join(crate::template::MANIFEST).exists() {
                return Template::load(&candidate);
            }
        }
        Err(Error::TemplateNotFound {
            name: name.to_owned(),
            searched: self.template_dirs.clone(),
        })
    }
}

impl Runtime {
    /// Opens (creating if needed) the runtime state directory `dir` with
    /// default options.
    ///
    /// ```no_run
    /// # async fn demo() -> dormouse::Result<()> {
    /// let rt = dormouse::Runtime::open("/var/lib/dormouse").await?;
    /// # Ok(()) }
    /// ```
    pub async fn open(dir: impl AsRef<Path>) -> Result<Runtime> {
        Self::builder(dir).open().await
    }

    /// Options for opening a runtime.
    pub fn builder(dir: impl AsRef<Path>) -> RuntimeBuilder {
        RuntimeBuilder {
            dir: dir.as_ref().to_path_buf(),
            template_dirs: Vec::new(),
            kvm_path: PathBuf::from("/dev/kvm"),
        }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The kind of virtualization this host offers (PVM or hardware).
    pub fn host_kind(&self) -> HostKind {
        self.inner.host
    }

    /// Finds and validates the template `name`.
    pub fn template(&self, name: &str) -> Result<Template> {
        self.inner.template(name)
    }

    pub async fn create(&self, template: &str, config: SandboxConfig) -> Result<Sandbox<Running>> {
        let template = self.template(template)?;
        Sandbox::boot(self.inner.clone(), template, config).await
    }

    /// Resumes the paused sandbox `id` (paused by this process or another
    /// one, before or after a restart).
    ///
    /// Gives [`Error::NotFound`] for an unknown or killed id,
    /// [`Error::NotPaused`] for one that is running, [`Error::Busy`] while
    /// another handle holds it.
    ///
    /// ```no_run
    /// # async fn demo(rt: dormouse::Runtime, id: &str) -> dormouse::Result<()> {
    /// let sbx = rt.connect(id).await?;
    /// let out = sbx.commands().run("cat /tmp/state").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self, id: &str) -> Result<Sandbox<Running>> {
        Ok(self.paused(id).await?.resume().await?)
    }

    /// A handle on the paused sandbox `id`, without resuming it.
    pub async fn paused(&self, id: &str) -> Result<Sandbox<Paused>> {
        let rt = self.inner.clone();
        let id = id.to_owned();
        tokio::task::spawn_blocking(move || Sandbox::open(rt, &id))
            .await
            .map_err(|e| Error::Io {
                what: "the open task failed".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    /// Deletes the paused sandbox `id` and all its files. A running sandbox
    /// is killed through its handle ([`Sandbox::kill`]); this gives
    /// [`Error::Busy`] for it.
    pub async fn kill(&self, id: &str) -> Result<()> {
        self.paused(id).await?.kill().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_cannot_traverse() {
        assert!(valid_name("python"));
        assert!(valid_name("py-3.11_x"));
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        assert!(!valid_name("../etc"));
        assert!(!valid_name("a/b"));
    }
}
