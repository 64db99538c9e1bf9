//! The on-disk form of a paused sandbox.
//!
//! A sandbox directory holds, besides its disk overlay and console log:
//!
//! - `snapshot.json`, the manifest: which generation of state and memory
//!   files make up the snapshot, with their sizes and the state's CRC-32.
//!   It is replaced atomically (temporary file, fsync, rename, fsync of the
//!   directory), so it always names one complete snapshot.
//! - `state-<generation>.json`: the machine state (vCPUs, interrupt
//!   controllers, clock, devices), CRC-32 checked.
//! - memory layers. The base, `memory-<generation>`, holds every page the
//!   guest touched (all-zero pages left as holes); it is mapped privately
//!   on resume so pages load lazily. Each later pause adds a layer with only
//!   the pages written since the resume before it (KVM's dirty log and the
//!   VMM's own writes): `memory-<generation>.pages`, a bitmap of them
//!   (CRC-32 in the manifest), and `memory-<generation>`, the pages packed
//!   one after another in page order (written with direct I/O where the
//!   file system allows it; layers of earlier versions, not `packed`, hold
//!   each page at its own offset). Resume maps the layers' long runs over
//!   the base, oldest first, and copies the short ones. When the chain
//!   reaches [`MAX_LAYERS`] the next pause writes one layer in place of all
//!   of them (their pages and the dirty ones, from guest memory).
//!
//! - the disk: the overlay (`disk`, `disk.meta`) holds the disk of the
//!   snapshot before; the guest's writes since then are sealed into a layer
//!   (`disk.layer-<generation>`, see [`crate::disk`]) that the manifest
//!   names with its CRC-32 and the next resume applies.
//!
//! A pause writes a new generation next to the current one and switches the
//! manifest last; files the new manifest does not name are removed
//! afterwards, and ones a crash left behind are removed at the next pause.
//! The manifest stays while the sandbox runs again (nothing it names is
//! written then), so a crash of the process at any moment, during a pause
//! or not, leaves the last snapshot resumable. Every byte read back is
//! validated before use.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::disk::{crc32, SealedLayer};
use crate::fault::crash_point;
use crate::vmm::memory::{self, GuestMemory, SaveStats};
use crate::vmm::MachineState;

/// The manifest's file name.
pub const MANIFEST: &str = "snapshot.json";
/// What the manifest's `format` field says.
pub const FORMAT: &str = "dormouse-snapshot";
/// The version this build writes and reads.
pub const VERSION: u32 = 2;
/// The largest state file accepted (it is a few hundred KiB).
const MAX_STATE_LEN: u64 = 64 << 20;
/// The largest manifest accepted.
const MAX_MANIFEST_LEN: u64 = 64 << 10;
/// Memory files (base and layers) a snapshot may have; a pause that
/// would pass it merges the layers into one.
pub const MAX_LAYERS: usize = 8;

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file is damaged: wrong checksum, size, or content.
    #[error("snapshot file {path} is corrupt: {reason}; this sandbox cannot be resumed (kill it)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file was written by another version of dormouse or for another host.
    #[error("snapshot file {path} cannot be used here: {reason}")]
    Incompatible {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or writing failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| SnapshotError::Io { what, path, source }
    }

    fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        SnapshotError::Corrupt {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// What a snapshot is of, recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    /// The sandbox id.
    pub id: String,
    /// The template's name.
    pub template: String,
    /// The template's kernel hash (the snapshot needs that very kernel).
    pub kernel_hash: String,
    /// The template's root filesystem hash (the overlay sits on it).
    pub rootfs_hash: String,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// vCPUs.
    pub vcpus: u8,
    /// The host the sandbox's guest was started on, whose CPU model it
    /// keeps (absent in snapshots of builds before it was recorded).
    #[serde(default)]
    pub host: Option<crate::vmm::cpu::HostProfile>,
}

/// The manifest: one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`VERSION`] of the writer.
    pub version: u32,
    /// The sandbox.
    pub sandbox: SandboxRecord,
    /// Increases with every pause.
    pub generation: u64,
    /// The state file's name.
    pub state_file: String,
    /// Its length.
    pub state_len: u64,
    /// Its CRC-32.
    pub state_crc32: u32,
    /// Guest memory size (every memory file's length).
    pub memory_len: u64,
    /// The base memory file, then the layers over it, oldest first.
    pub memory: Vec<MemoryLayer>,
    /// When the pause finished, in milliseconds since the Unix epoch.
    pub paused_at_ms: u64,
    /// The disk writes this snapshot commits (`None`: the disk overlay as
    /// it is); see [`crate::disk`].
    #[serde(default)]
    pub disk_layer: Option<SealedLayer>,
    /// CRC-32 of the manifest as written with this field 0.
    pub checksum: u32,
}

impl Manifest {
    /// The manifest's bytes with its checksum set.
    pub fn seal(mut self) -> (Manifest, Vec<u8>) {
        self.checksum = 0;
        self.checksum = crc32(&self.encode());
        let bytes = self.encode();
        (self, bytes)
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serialises")
    }

    /// Whether the checksum matches the content.
    fn verify(&self) -> bool {
        let mut unsealed = self.clone();
        unsealed.checksum = 0;
        crc32(&unsealed.encode()) == self.checksum
    }
}

/// One memory file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryLayer {
    /// The file's name.
    pub file: String,
    /// Bytes of page data written to it.
    pub written: u64,
    /// For a layer (not the base): the CRC-32 of its page bitmap, which is
    /// in `<file>.pages`.
    pub pages_crc32: Option<u32>,
    /// The [`PageDigest`](memory::PageDigest) of the pages written to it:
    /// for the base its non-zero pages, for a layer the pages of its
    /// bitmap. Checked when they are read ([`check_base`] for the base,
    /// which is mapped lazily).
    pub data_crc32: u32,
    /// For a layer: its pages lie one after another in page order (the
    /// file holds `written` bytes), as [`memory::save_layer`] writes them;
    /// else each page at its offset in memory (layers of snapshot format
    /// 1 before packing; absent from the manifest when false, so their
    /// checksums still match).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub packed: bool,
}

impl MemoryLayer {
    /// `Corrupt`, naming the file in `dir`, unless `found` (the
    /// [`PageDigest`](memory::PageDigest) of the pages read back) is the
    /// one the pause wrote.
    pub fn check_digest(&self, dir: &Path, found: u32) -> Result<(), SnapshotError> {
        if found == self.data_crc32 {
            return Ok(());
        }
        Err(SnapshotError::corrupt(
            &dir.join(&self.file),
            format!(
                "its pages have digest {found:#010x}, the pause wrote {:#010x}",
                self.data_crc32
            ),
        ))
    }
}

/// The memory files of a snapshot, opened and checked.
#[derive(Debug)]
pub struct MemoryFiles {
    /// The base: every page as it was at the base's pause.
    pub base: File,
    /// Layers, oldest first.
    pub layers: Vec<LayerFile>,
}

/// A memory layer of a snapshot, opened and checked.
#[derive(Debug)]
pub struct LayerFile {
    /// The file.
    pub file: File,
    /// Where its pages are (from its page bitmap).
    pub pages: memory::LayerPages,
}

impl LayerFile {
    /// The layer as [`memory::map_layers`] and [`memory::layer_digest`]
    /// take it.
    pub fn as_layer(&self) -> memory::Layer<'_> {
        memory::Layer {
            file: &self.file,
            pages: &self.pages,
        }
    }
}

/// How a pause writes guest memory.
#[derive(Debug, Clone, Copy)]
pub enum MemoryWrite<'a> {
    /// A new base with every non-zero page (a scan of all of memory).
    Full,
    /// A new base with the non-zero pages among the ones given (the first
    /// pause after boot: the pages ever written).
    BaseOf(&'a [u64]),
    /// A layer of the pages given (written since the resume from `on`).
    Layer {
        /// The pages written since the resume.
        dirty: &'a [u64],
        /// The snapshot the machine was resumed from.
        on: &'a Manifest,
    },
}

/// Whether `dir` holds a snapshot.
pub fn exists(dir: &Path) -> bool {
    dir.join(MANIFEST).exists()
}

fn state_name(generation: u64) -> String {
    format!("state-{generation}.json")
}

fn memory_name(generation: u64) -> String {
    format!("memory-{generation}")
}

fn pages_name(memory_file: &str) -> String {
    format!("{memory_file}.pages")
}

fn bitmap_bytes(bits: &[u64]) -> Vec<u8> {
    bits.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    crate::fsutil::sync_dir(dir).map_err(SnapshotError::io("fsync the directory", dir))
}

/// The generation after every one that has files in `dir` (a resumed
/// sandbox has no manifest, but its memory may still be mapped from the
/// last generation's file, which must not be overwritten).
fn next_generation(dir: &Path) -> Result<u64, SnapshotError> {
    let mut last = read_manifest(dir).ok().map_or(0, |m| m.generation);
    for entry in std::fs::read_dir(dir).map_err(SnapshotError::io("list", dir))? {
        let entry = entry.map_err(SnapshotError::io("list", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let number = name
            .strip_prefix("memory-")
            .map(|n| n.strip_suffix(".pages").unwrap_or(n))
            .or_else(|| {
                name.strip_prefix("state-")
                    .and_then(|n| n.strip_suffix(".json"))
            });
        if let Some(n) = number.and_then(|n| n.parse::<u64>().ok()) {
            last = last.max(n);
        }
    }
    Ok(last + 1)
}

/// Writes `data` to `path` (new file) and fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<(), SnapshotError> {
    let mut file = File::create(path).map_err(SnapshotError::io("create", path))?;
    file.write_all(data)
        .map_err(SnapshotError::io("write", path))?;
    file.sync_all().map_err(SnapshotError::io("fsync", path))
}

/// Writes a snapshot of a paused machine into `dir` as a new generation and
/// makes it the current one. `before_commit` runs with the generation after
/// the new files are durable and before the manifest switches: the caller
/// seals the disk's writes there, and the manifest commits that layer. Returns the new manifest and what was written of memory.
pub fn write(
    dir: &Path,
    sandbox: &SandboxRecord,
    state: &MachineState,
    mem: &GuestMemory,
    how: MemoryWrite<'_>,
    before_commit: impl FnOnce(u64) -> Result<Option<SealedLayer>, SnapshotError>,
) -> Result<(Manifest, SaveStats), SnapshotError> {
    // A full chain's layers are merged into one: the new layer holds the
    // pages of every layer plus the dirty ones (read from guest memory,
    // which holds their latest data), over the same base. What a merging
    // pause writes is what the guest wrote since the base, never all its
    // memory, and a template's base stays shared.
    let merged;
    let on_base;
    let how = match how {
        MemoryWrite::Layer { dirty, on } if on.memory.len() >= MAX_LAYERS => {
            merged = layer_pages(dir, on, dirty)?;
            on_base = Manifest {
                memory: on.memory[..1].to_vec(),
                ..on.clone()
            };
            MemoryWrite::Layer {
                dirty: &merged,
                on: &on_base,
            }
        }
        other => other,
    };
    let generation = next_generation(dir)?;
    let state_file = state_name(generation);
    let memory_file = memory_name(generation);
    let state_path = dir.join(&state_file);
    let memory_path = dir.join(&memory_file);
    let pages_path = dir.join(pages_name(&memory_file));
    let result = (|| {
        // Never an existing file: the running guest's memory may be a
        // mapping of an earlier generation's.
        let mem_file = crate::fsutil::create_new_rw(&memory_path)
            .map_err(SnapshotError::io("create", &memory_path))?;
        let (stats, mut layers, pages_crc32) = match how {
            MemoryWrite::Full => (memory::save_pages(mem, &mem_file, None), Vec::new(), None),
            MemoryWrite::BaseOf(pages) => (
                memory::save_pages(mem, &mem_file, Some(pages)),
                Vec::new(),
                None,
            ),
            MemoryWrite::Layer { dirty, on } => {
                let bytes = bitmap_bytes(dirty);
                write_synced(&pages_path, &bytes)?;
                (
                    memory::save_layer(mem, &mem_file, dirty),
                    on.memory.clone(),
                    Some(crc32(&bytes)),
                )
            }
        };
        let stats = stats.map_err(SnapshotError::io("write", &memory_path))?;
        mem_file
            .sync_all()
            .map_err(SnapshotError::io("fsync", &memory_path))?;
        crash_point("pause:memory-written");
        layers.push(MemoryLayer {
            file: memory_file.clone(),
            written: stats.written,
            pages_crc32,
            data_crc32: stats.digest,
            packed: pages_crc32.is_some(),
        });
        let state_json = serde_json::to_vec(state).map_err(|e| SnapshotError::Io {
            what: "serialise the machine state for",
            path: state_path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_synced(&state_path, &state_json)?;
        crash_point("pause:state-written");
        let disk_layer = before_commit(generation)?;
        crash_point("pause:disk-sealed");
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            sandbox: sandbox.clone(),
            generation,
            state_file: state_file.clone(),
            state_len: state_json.len() as u64,
            state_crc32: crc32(&state_json),
            memory_len: stats.total,
            memory: layers,
            paused_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            disk_layer,
            checksum: 0,
        };
        let (manifest, json) = manifest.seal();
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        write_synced(&tmp, &json)?;
        crash_point("pause:manifest-written");
        std::fs::rename(&tmp, dir.join(MANIFEST))
            .map_err(SnapshotError::io("rename into place", &tmp))?;
        sync_dir(dir)?;
        crash_point("pause:committed");
        Ok((manifest, stats))
    })();
    match &result {
        Ok((manifest, _)) => remove_stale(dir, manifest),
        Err(_) => {
            let _ = std::fs::remove_file(&state_path);
            let _ = std::fs::remove_file(&memory_path);
            let _ = std::fs::remove_file(&pages_path);
        }
    }
    result
}

/// Copies the snapshot of `src` into the empty directory `dst` as a
/// snapshot of the sandbox `sandbox` (a new one started from it, or a named
/// snapshot): state and memory files are linked (they are never written
/// after their pause, so every copy shares their data and page cache), the
/// disk overlay named `disk` is copied (see
/// [`copy_snapshot_disk`](crate::disk::copy_snapshot_disk)), and the
/// manifest, naming the new sandbox, is written last. Returns it.
pub fn copy_to(src: &Path, dst: &Path, sandbox: SandboxRecord) -> Result<Manifest, SnapshotError> {
    let manifest = read_manifest(src)?;
    let mut names = vec![manifest.state_file.clone()];
    for layer in &manifest.memory {
        names.push(layer.file.clone());
        if layer.pages_crc32.is_some() {
            names.push(pages_name(&layer.file));
        }
    }
    for name in &names {
        let from = src.join(name);
        crate::fsutil::link_or_copy(&from, &dst.join(name))
            .map_err(SnapshotError::io("link", &from))?;
    }
    crate::disk::copy_snapshot_disk(&src.join("disk"), &dst.join("disk"), manifest.disk_layer)
        .map_err(|e| SnapshotError::Io {
            what: "copy the disk of",
            path: src.join("disk"),
            source: std::io::Error::other(e),
        })?;
    let (manifest, json) = Manifest {
        sandbox,
        ..manifest
    }
    .seal();
    let tmp = dst.join(format!("{MANIFEST}.tmp"));
    write_synced(&tmp, &json)?;
    std::fs::rename(&tmp, dst.join(MANIFEST))
        .map_err(SnapshotError::io("rename into place", &tmp))?;
    sync_dir(dst)?;
    Ok(manifest)
}

/// Reads the base memory file of `manifest` (`file`, opened from `dir`)
/// and checks its data against the manifest: its non-zero pages, in the
/// extents the file has data in, must have the digest recorded at the
/// pause. A flipped or lost byte is [`SnapshotError::Corrupt`] naming the
/// file. Reads every page the pause wrote (from the page cache, where a
/// resume finds them warm).
pub fn check_base(dir: &Path, manifest: &Manifest, file: &File) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let path = dir.join(&manifest.memory[0].file);
    let page = memory::PAGE_SIZE as u64;
    let extents = crate::fsutil::data_extents(file, manifest.memory_len)
        .map_err(SnapshotError::io("find the data of", &path))?;
    let mut digest = memory::PageDigest::default();
    let mut buf = vec![0u8; 1 << 20];
    for (data, hole) in extents {
        let mut at = data / page * page;
        let end = hole.div_ceil(page) * page;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(SnapshotError::io("read", &path))?;
            for (i, bytes) in buf[..n].chunks(memory::PAGE_SIZE).enumerate() {
                if !memory::is_zero_page(bytes) {
                    digest.add(at / page + i as u64, bytes);
                }
            }
            at += n as u64;
        }
    }
    manifest.memory[0].check_digest(dir, digest.finish())
}

/// The pages of `on`'s layers (every memory file but the base) plus
/// `dirty`: what a layer replacing them must hold. Each page bitmap is
/// checked against its CRC-32.
fn layer_pages(dir: &Path, on: &Manifest, dirty: &[u64]) -> Result<Vec<u64>, SnapshotError> {
    let mut pages = dirty.to_vec();
    let page = memory::PAGE_SIZE as u64;
    for layer in &on.memory[1..] {
        let path = dir.join(pages_name(&layer.file));
        let bytes = read_bounded(&path, on.memory_len.div_ceil(page * 64) * 8)?;
        if Some(crc32(&bytes)) != layer.pages_crc32 {
            return Err(SnapshotError::corrupt(&path, "CRC-32 mismatch"));
        }
        for (w, chunk) in pages.iter_mut().zip(bytes.chunks_exact(8)) {
            *w |= u64::from_le_bytes(chunk.try_into().expect("8-byte chunk"));
        }
    }
    Ok(pages)
}

/// Removes state and memory files `manifest` does not name.
fn remove_stale(dir: &Path, manifest: &Manifest) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut keep = vec![manifest.state_file.clone()];
    for layer in &manifest.memory {
        keep.push(layer.file.clone());
        keep.push(pages_name(&layer.file));
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("state-") || name.starts_with("memory-");
        if ours && !keep.iter().any(|k| k == name) {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                log::warn!("cannot remove the stale snapshot file {name}: {e}");
            }
        }
    }
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, SnapshotError> {
    let file = File::open(path).map_err(SnapshotError::io("open", path))?;
    let len = file
        .metadata()
        .map_err(SnapshotError::io("stat", path))?
        .len();
    if len > max {
        return Err(SnapshotError::corrupt(
            path,
            format!("{len} bytes, more than the {max} a valid file has"),
        ));
    }
    let mut data = Vec::with_capacity(len as usize);
    use std::io::Read;
    file.take(max + 1)
        .read_to_end(&mut data)
        .map_err(SnapshotError::io("read", path))?;
    Ok(data)
}

/// Reads the page bitmap of memory layer `layer` at `path` (`len` bytes
/// for guest memory of `total_pages` pages) and checks its CRC, in pieces:
/// a large guest's bitmap is never held whole (see [`memory::LayerPages`]).
fn read_page_bitmap(
    path: &Path,
    len: u64,
    layer: &MemoryLayer,
    total_pages: usize,
) -> Result<memory::LayerPages, SnapshotError> {
    let file = File::open(path).map_err(SnapshotError::io("open", path))?;
    let actual = file
        .metadata()
        .map_err(SnapshotError::io("stat", path))?
        .len();
    if actual != len {
        return Err(SnapshotError::corrupt(
            path,
            format!("{actual} bytes, a page bitmap of this memory has {len}"),
        ));
    }
    let mut crc = crc32fast::Hasher::new();
    let mut pages = memory::LayerPagesBuilder::new(total_pages, layer.packed);
    let mut buf = [0u8; 16 << 10];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, at)
            .map_err(SnapshotError::io("read", path))?;
        crc.update(chunk);
        for word in chunk.chunks_exact(8) {
            pages.push(u64::from_le_bytes(word.try_into().expect("8-byte chunk")));
        }
        at += n as u64;
    }
    if Some(crc.finalize()) != layer.pages_crc32 {
        return Err(SnapshotError::corrupt(path, "CRC-32 mismatch"));
    }
    Ok(pages.finish())
}

/// A file name the manifest may name: ours, in the same directory.
fn valid_file_name(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix).is_some_and(|rest| {
        let digits = rest.strip_suffix(".json").unwrap_or(rest);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    })
}

/// Reads and validates the manifest of `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(MANIFEST);
    let data = read_bounded(&path, MAX_MANIFEST_LEN)?;
    parse_manifest(&path, &data)
}

/// Parses and validates manifest bytes; `path` names the file in errors.
pub fn parse_manifest(path: &Path, data: &[u8]) -> Result<Manifest, SnapshotError> {
    let path = path.to_owned();
    if data.len() as u64 > MAX_MANIFEST_LEN {
        return Err(SnapshotError::corrupt(&path, "too long"));
    }
    // Format and version first, so that a newer writer's extra fields give
    // "incompatible", not "corrupt".
    #[derive(Deserialize)]
    struct Head {
        format: String,
        version: u32,
    }
    let head: Head = serde_json::from_slice(data)
        .map_err(|e| SnapshotError::corrupt(&path, format!("not a snapshot manifest: {e}")))?;
    if head.format != FORMAT {
        return Err(SnapshotError::corrupt(
            &path,
            format!("format {:?}, expected {FORMAT:?}", head.format),
        ));
    }
    if head.version != VERSION {
        return Err(SnapshotError::Incompatible {
            path,
            reason: format!(
                "snapshot format version {}, this dormouse reads version {VERSION}",
                head.version
            ),
        });
    }
    let manifest: Manifest = serde_json::from_slice(data)
        .map_err(|e| SnapshotError::corrupt(&path, format!("invalid manifest: {e}")))?;
    if !manifest.verify() {
        return Err(SnapshotError::corrupt(&path, "checksum mismatch"));
    }
    if !valid_file_name(&manifest.state_file, "state-")
        || manifest
            .memory
            .iter()
            .any(|layer| !valid_file_name(&layer.file, "memory-"))
    {
        return Err(SnapshotError::corrupt(
            &path,
            "it names files that are not snapshot files",
        ));
    }
    if manifest.state_len > MAX_STATE_LEN {
        return Err(SnapshotError::corrupt(&path, "state length out of range"));
    }
    if manifest.memory.is_empty() || manifest.memory.len() > MAX_LAYERS {
        return Err(SnapshotError::corrupt(
            &path,
            format!(
                "{} memory files (1 to {MAX_LAYERS} allowed)",
                manifest.memory.len()
            ),
        ));
    }
    let layers_ok = manifest.memory[0].pages_crc32.is_none()
        && !manifest.memory[0].packed
        && manifest.memory[1..].iter().all(|l| l.pages_crc32.is_some());
    if !layers_ok {
        return Err(SnapshotError::corrupt(
            &path,
            "the memory files are not a base followed by layers",
        ));
    }
    if manifest.memory_len != u64::from(manifest.sandbox.mem_mib) << 20 {
        return Err(SnapshotError::corrupt(
            &path,
            "memory length does not match the memory size",
        ));
    }
    Ok(manifest)
}

/// Parses machine state bytes (after their checksum was checked); `path`
/// names the file in errors. Only the shape is checked here: KVM validates
/// register contents when they are restored.
pub fn parse_state(path: &Path, data: &[u8]) -> Result<MachineState, SnapshotError> {
    if data.len() as u64 > MAX_STATE_LEN {
        return Err(SnapshotError::corrupt(path, "too long"));
    }
    let state: MachineState = serde_json::from_slice(data)
        .map_err(|e| SnapshotError::corrupt(path, format!("invalid machine state: {e}")))?;
    if state.vcpus.is_empty() || state.vcpus.len() > 254 {
        return Err(SnapshotError::corrupt(
            path,
            format!("{} vCPUs", state.vcpus.len()),
        ));
    }
    if state.devices.len() > 32 {
        return Err(SnapshotError::corrupt(
            path,
            format!("{} devices", state.devices.len()),
        ));
    }
    Ok(state)
}

/// Opens a memory file and checks its length.
fn open_memory(dir: &Path, name: &str, len: u64) -> Result<File, SnapshotError> {
    let path = dir.join(name);
    let file = File::open(&path).map_err(SnapshotError::io("open", &path))?;
    let actual = file
        .metadata()
        .map_err(SnapshotError::io("stat", &path))?
        .len();
    if actual != len {
        return Err(SnapshotError::corrupt(
            &path,
            format!("{actual} bytes, the manifest says {len}"),
        ));
    }
    Ok(file)
}

/// Reads the snapshot of `dir`: the manifest, the machine state, and the
/// memory files (opened; lengths and page bitmaps checked).
pub fn read(dir: &Path) -> Result<(Manifest, MachineState, MemoryFiles), SnapshotError> {
    let manifest = read_manifest(dir)?;
    let state_path = dir.join(&manifest.state_file);
    let data = read_bounded(&state_path, MAX_STATE_LEN)?;
    if data.len() as u64 != manifest.state_len {
        return Err(SnapshotError::corrupt(
            &state_path,
            format!(
                "{} bytes, the manifest says {}",
                data.len(),
                manifest.state_len
            ),
        ));
    }
    let crc = crc32(&data);
    if crc != manifest.state_crc32 {
        return Err(SnapshotError::corrupt(
            &state_path,
            format!(
                "CRC-32 {crc:#010x}, the manifest says {:#010x}",
                manifest.state_crc32
            ),
        ));
    }
    let state = parse_state(&state_path, &data)?;
    if state.mem_size != manifest.memory_len
        || state.vcpus.len() != usize::from(manifest.sandbox.vcpus)
    {
        return Err(SnapshotError::corrupt(
            &state_path,
            "machine state does not match the manifest",
        ));
    }
    let len = manifest.memory_len;
    let base = open_memory(dir, &manifest.memory[0].file, len)?;
    let bitmap_len = len.div_ceil(memory::PAGE_SIZE as u64 * 64) * 8;
    let total_pages = (len / memory::PAGE_SIZE as u64) as usize;
    let mut layers = Vec::with_capacity(manifest.memory.len() - 1);
    for layer in &manifest.memory[1..] {
        let pages_path = dir.join(pages_name(&layer.file));
        let pages = read_page_bitmap(&pages_path, bitmap_len, layer, total_pages)?;
        let file_len = if layer.packed {
            (pages.count() * memory::PAGE_SIZE) as u64
        } else {
            len
        };
        if layer.packed && layer.written != file_len {
            return Err(SnapshotError::corrupt(
                &dir.join(&layer.file),
                format!(
                    "its bitmap has {file_len} bytes of pages, the manifest says {} were written",
                    layer.written
                ),
            ));
        }
        let file = open_memory(dir, &layer.file, file_len)?;
        layers.push(LayerFile { file, pages });
    }
    Ok((manifest, state, MemoryFiles { base, layers }))
}

#[cfg(test)]
mod tests;
