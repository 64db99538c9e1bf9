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
            },
            MemoryLayer {
                file: "memory-3".into(),
                written: 8192,
                pages_crc32: Some(9),
            },
        ],
        paused_at_ms: 1,
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
