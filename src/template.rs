//! Templates: a guest kernel + root filesystem image (+, later, a booted
//! snapshot), kept in a directory with a small manifest, `template.json`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The manifest file of a template directory.
pub const MANIFEST: &str = "template.json";
/// Largest manifest we read.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// `template.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TemplateManifest {
    /// Template name (what `Runtime::create` takes).
    pub name: String,
    /// Kernel file, relative to the template directory.
    pub kernel: String,
    /// Root filesystem image (ext4), relative to the template directory.
    pub rootfs: String,
    /// Content hash of the kernel build inputs.
    #[serde(default)]
    pub kernel_hash: String,
    /// Content hash of the rootfs build inputs.
    #[serde(default)]
    pub rootfs_hash: String,
    /// Default guest memory in MiB.
    pub mem_mib: u32,
    /// Default vCPU count.
    pub vcpus: u8,
}

/// A validated template on disk.
#[derive(Debug, Clone)]
pub struct Template {
    /// Where it lives.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: TemplateManifest,
}

impl Template {
    /// Reads and validates the template in `dir`: the manifest parses, the
    /// kernel is an ELF file and the rootfs is an ext2/3/4 image.
    pub fn load(dir: &Path) -> Result<Template, Error> {
        let manifest_path = dir.join(MANIFEST);
        let bad = |reason: String| Error::InvalidTemplate {
            path: manifest_path.clone(),
            reason,
        };
        let mut text = String::new();
        File::open(&manifest_path)
            .map_err(|e| bad(e.to_string()))?
            .take(MAX_MANIFEST_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| bad(e.to_string()))?;
        let manifest: TemplateManifest =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        for file in [&manifest.kernel, &manifest.rootfs] {
            if file.is_empty() || Path::new(file).components().count() != 1 || file.starts_with('.')
            {
                return Err(bad(format!(
                    "{file:?} must be a plain file name inside the template directory"
                )));
            }
        }
        let template = Template {
            dir: dir.to_path_buf(),
            manifest,
        };
        check_kernel(&template.kernel_path())?;
        check_rootfs(&template.rootfs_path())?;
        Ok(template)
    }

    /// The kernel's path.
    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.kernel)
    }

    /// The root filesystem image's path.
    pub fn rootfs_path(&self) -> PathBuf {
        self.dir.join(&self.manifest.rootfs)
    }
}

fn check_kernel(path: &Path) -> Result<(), Error> {
    let mut magic = [0u8; 4];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::KernelMissing {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(Error::InvalidKernel {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Ok(()) if magic != *b"\x7fELF" => Err(Error::InvalidKernel {
            path: path.to_path_buf(),
            reason: "not an ELF file (expected an uncompressed vmlinux)".into(),
        }),
        Ok(()) => Ok(()),
    }
}

/// ext2/3/4 superblock: at byte 1024; `s_magic` (0xEF53) at offset 56 in it.
fn check_rootfs(path: &Path) -> Result<(), Error> {
    const SUPERBLOCK: u64 = 1024;
    const MAGIC_OFFSET: u64 = 56;
    let corrupt = |reason: String| Error::CorruptRootfs {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::RootfsMissing {
                path: path.to_path_buf(),
            }
        } else {
            corrupt(e.to_string())
        }
    })?;
    let len = file.metadata().map_err(|e| corrupt(e.to_string()))?.len();
    if len < SUPERBLOCK * 2 || len % 512 != 0 {
        return Err(corrupt(format!(
            "{len} bytes is not a disk image (must be a multiple of 512 bytes, at least 2 KiB)"
        )));
    }
    let mut magic = [0u8; 2];
    file.seek(SeekFrom::Start(SUPERBLOCK + MAGIC_OFFSET))
        .and_then(|_| file.read_exact(&mut magic))
        .map_err(|e| corrupt(e.to_string()))?;
    if u16::from_le_bytes(magic) != 0xef53 {
        return Err(corrupt("no ext2/3/4 superblock (bad magic)".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_template(dir: &Path, kernel: &[u8], rootfs: &[u8]) {
        std::fs::write(dir.join("vmlinux"), kernel).unwrap();
        std::fs::write(dir.join("rootfs.ext4"), rootfs).unwrap();
        std::fs::write(
            dir.join(MANIFEST),
            r#"{"name":"t","kernel":"vmlinux","rootfs":"rootfs.ext4","mem_mib":256,"vcpus":1}"#,
        )
        .unwrap();
    }

    fn ext4_like() -> Vec<u8> {
        let mut img = vec![0u8; 8192];
        img[1024 + 56] = 0x53;
        img[1024 + 57] = 0xef;
        img
    }

    #[test]
    fn valid_template_loads() {
        let dir = tempfile::tempdir().unwrap();
        write_template(dir.path(), b"\x7fELF....", &ext4_like());
        let t = Template::load(dir.path()).unwrap();
        assert_eq!(t.manifest.mem_mib, 256);
    }

    #[test]
    fn missing_kernel_and_corrupt_rootfs_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        write_template(dir.path(), b"\x7fELF....", &vec![0u8; 8192]);
        assert!(matches!(
            Template::load(dir.path()),
            Err(Error::CorruptRootfs { .. })
        ));
        std::fs::remove_file(dir.path().join("vmlinux")).unwrap();
        assert!(matches!(
            Template::load(dir.path()),
            Err(Error::KernelMissing { .. })
        ));
        write_template(dir.path(), b"MZ......", &ext4_like());
        assert!(matches!(
            Template::load(dir.path()),
            Err(Error::InvalidKernel { .. })
        ));
    }

    #[test]
    fn manifest_cannot_escape_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        write_template(dir.path(), b"\x7fELF....", &ext4_like());
        std::fs::write(
            dir.path().join(MANIFEST),
            r#"{"name":"t","kernel":"../../etc/passwd","rootfs":"rootfs.ext4","mem_mib":256,"vcpus":1}"#,
        )
        .unwrap();
        assert!(matches!(
            Template::load(dir.path()),
            Err(Error::InvalidTemplate { .. })
        ));
    }
}
