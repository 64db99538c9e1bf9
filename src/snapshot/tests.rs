use super::*;

fn sample() -> Manifest {
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        sandbox: SandboxRecord {
            id: "0123456789abcdef0123".into(),
            template: "python".into(),
            kernel_hash: "k".into(),
            rootfs_hash: "r".into(),
            mem_mib: 512,
            vcpus: 1,
            host: None,
        },
        generation: 3,
        state_file: "state-3.json".into(),
        state_len: 100,
        state_crc32: 7,
        memory_len: 512 << 20,
        memory: vec![
            MemoryLayer {
                file: "memory-1".into(),
                written: 4096,
                pages_crc32: None,
                data_crc32: 11,
                packed: false,
            },
            MemoryLayer {
                file: "memory-3".into(),
                written: 8192,
                pages_crc32: Some(9),
                data_crc32: 12,
                packed: true,
            },
        ],
        paused_at_ms: 1,
        disk_layer: None,
        checksum: 0,
    }
}

fn parse(bytes: &[u8]) -> Result<Manifest, SnapshotError> {
    parse_manifest(Path::new("snapshot.json"), bytes)
}

#[test]
fn sealed_manifest_round_trips() {
    let (sealed, bytes) = sample().seal();
    assert_ne!(sealed.checksum, 0);
    assert_eq!(parse(&bytes).unwrap(), sealed);
}

#[test]
fn any_flipped_byte_is_an_error() {
    let (_, bytes) = sample().seal();
    for i in 0..bytes.len() {
        for bit in [0x01, 0x20, 0x80] {
            let mut bad = bytes.clone();
            bad[i] ^= bit;
            assert!(parse(&bad).is_err(), "byte {i} ^ {bit:#x} went unnoticed");
        }
    }
    for len in 0..bytes.len() {
        assert!(parse(&bytes[..len]).is_err(), "truncated to {len}");
    }
}

#[test]
fn manifests_from_before_packed_layers_still_verify() {
    // Written before `packed` existed: sealed without the key.
    let mut m = sample();
    m.memory[1].packed = false;
    let (sealed, bytes) = m.seal();
    assert!(!String::from_utf8_lossy(&bytes).contains("packed"));
    let parsed = parse(&bytes).unwrap();
    assert_eq!(parsed, sealed);
    assert!(!parsed.memory[1].packed);
    // A packed layer says so, and a packed base is refused.
    let (_, bytes) = sample().seal();
    assert!(String::from_utf8_lossy(&bytes).contains("\"packed\": true"));
    let mut m = sample();
    m.memory[0].packed = true;
    assert!(parse(&m.seal().1).is_err());
}

#[test]
fn other_versions_are_incompatible_not_corrupt() {
    let mut m = sample();
    m.version = VERSION + 1;
    let (_, bytes) = m.seal();
    assert!(matches!(
        parse(&bytes),
        Err(SnapshotError::Incompatible { .. })
    ));
}

#[test]
fn file_names_cannot_leave_the_directory() {
    for name in [
        "../memory-1",
        "memory-1/../../x",
        "/etc/passwd",
        "memory-",
        "memory-1x",
    ] {
        let mut m = sample();
        m.memory[0].file = name.into();
        let (_, bytes) = m.seal();
        assert!(parse(&bytes).is_err(), "{name} accepted");
    }
    let mut m = sample();
    m.state_file = "../state-1.json".into();
    let (_, bytes) = m.seal();
    assert!(parse(&bytes).is_err());
}

#[test]
fn memory_chain_must_be_a_base_then_layers() {
    let mut m = sample();
    m.memory[0].pages_crc32 = Some(1);
    assert!(parse(&m.seal().1).is_err());
    let mut m = sample();
    m.memory[1].pages_crc32 = None;
    assert!(parse(&m.seal().1).is_err());
    let mut m = sample();
    m.memory.clear();
    assert!(parse(&m.seal().1).is_err());
    let mut m = sample();
    m.memory = vec![m.memory[0].clone(); MAX_LAYERS + 1];
    assert!(parse(&m.seal().1).is_err());
    let mut m = sample();
    m.memory_len += 4096;
    assert!(parse(&m.seal().1).is_err());
}

#[test]
fn generations_never_reuse_a_file_name() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(next_generation(dir.path()).unwrap(), 1);
    std::fs::write(dir.path().join("memory-4"), b"").unwrap();
    std::fs::write(dir.path().join("memory-6.pages"), b"").unwrap();
    std::fs::write(dir.path().join("state-2.json"), b"").unwrap();
    assert_eq!(next_generation(dir.path()).unwrap(), 7);
}

#[test]
fn state_parser_rejects_garbage() {
    let path = Path::new("state-1.json");
    for bad in [
        &b""[..],
        b"{}",
        b"[]",
        b"null",
        b"{\"host\":\"Pvm\"}",
        &[0xff; 64],
    ] {
        assert!(parse_state(path, bad).is_err());
    }
}

#[test]
fn merging_a_chain_takes_the_pages_of_its_layers_not_of_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let len = 1u64 << 20; // 256 pages
    let layer = |name: &str, pages: &[u64]| {
        let mut bits = vec![0u64; 4];
        for &p in pages {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        let bytes = bitmap_bytes(&bits);
        std::fs::write(dir.path().join(pages_name(name)), &bytes).unwrap();
        MemoryLayer {
            file: name.into(),
            written: 0,
            pages_crc32: Some(crc32(&bytes)),
            data_crc32: 0,
            packed: true,
        }
    };
    let mut on = sample();
    on.sandbox.mem_mib = 1;
    on.memory_len = len;
    // The base's pages are not read at all (it has no file here).
    on.memory[0].file = "memory-1".into();
    on.memory[1] = layer("memory-2", &[7, 200]);
    on.memory.push(layer("memory-3", &[7, 255]));
    let mut dirty = vec![0u64; 4];
    dirty[0] = 1 << 9;
    let pages = layer_pages(dir.path(), &on, &dirty).unwrap();
    let set: Vec<u64> = (0..256)
        .filter(|p| pages[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect();
    assert_eq!(set, [7, 9, 200, 255]);
    // A damaged page bitmap is noticed.
    std::fs::write(dir.path().join("memory-3.pages"), vec![0xffu8; 32]).unwrap();
    assert!(matches!(
        layer_pages(dir.path(), &on, &dirty),
        Err(SnapshotError::Corrupt { .. })
    ));
}

#[test]
fn a_base_whose_pages_changed_is_corrupt() {
    use crate::vmm::memory::{save_to_file, GuestMemory};
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};
    let dir = tempfile::tempdir().unwrap();
    let size = 4usize << 20;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size)]).unwrap();
    mem.write_slice(b"hello", GuestAddress(0x3000)).unwrap();
    mem.write_slice(&[9u8; 8192], GuestAddress(0x20_0000))
        .unwrap();
    let path = dir.path().join("memory-1");
    let file = crate::fsutil::create_new_rw(&path).unwrap();
    let stats = save_to_file(&mem, &file).unwrap();
    let mut m = sample();
    m.memory.truncate(1);
    m.memory[0].file = "memory-1".into();
    m.memory[0].data_crc32 = stats.digest;
    m.memory_len = size as u64;
    check_base(dir.path(), &m, &file).unwrap();
    // A flipped byte; a page zeroed; a page moved: each is noticed.
    for (at, bytes) in [(0x3001u64, &b"E"[..]), (0x20_0000, &[0u8; 4096][..])] {
        let mut saved = vec![0u8; bytes.len()];
        file.read_exact_at(&mut saved, at).unwrap();
        file.write_all_at(bytes, at).unwrap();
        let err = check_base(dir.path(), &m, &file).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Corrupt { ref path, .. } if path.ends_with("memory-1")),
            "{err}"
        );
        file.write_all_at(&saved, at).unwrap();
        check_base(dir.path(), &m, &file).unwrap();
    }
    let mut page = vec![0u8; 4096];
    file.read_exact_at(&mut page, 0x3000).unwrap();
    file.write_all_at(&page, 0x5000).unwrap();
    file.write_all_at(&[0u8; 4096], 0x3000).unwrap();
    assert!(check_base(dir.path(), &m, &file).is_err());
}
