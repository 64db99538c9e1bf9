use std::os::unix::fs::MetadataExt;

use super::*;

/// A base image of `size` bytes whose every byte depends on its offset.
fn make_base(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("base.img");
    std::fs::write(&path, pattern(0, size as usize)).unwrap();
    path
}

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = offset + i;
            (x ^ (x >> 8) ^ (x >> 16)) as u8
        })
        .collect()
}

fn read(disk: &CowDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    disk.read_at(&mut buf, offset).unwrap();
    buf
}

/// Deterministic pseudo-random numbers (xorshift64*), no dependency needed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn reads_come_from_the_base_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("disk.overlay");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    assert_eq!(disk.size(), 64 * 1024);
    assert_eq!(read(&disk, 0, 64 * 1024), pattern(0, 64 * 1024));
    assert_eq!(read(&disk, 5000, 10), pattern(5000, 10));
    assert_eq!(disk.allocated_blocks(), 0);

    disk.write_at(&[0xaa; 4096], 8192).unwrap();
    assert_eq!(read(&disk, 8192, 4096), vec![0xaa; 4096]);
    // Neighbours still come from the base, also in a read spanning both.
    let all = read(&disk, 0, 64 * 1024);
    assert_eq!(all[..8192], pattern(0, 8192)[..]);
    assert_eq!(all[8192..12288], [0xaa; 4096]);
    assert_eq!(all[12288..], pattern(12288, 64 * 1024 - 12288)[..]);
    assert_eq!(disk.allocated_blocks(), 1);
}

#[test]
fn writes_never_touch_the_base_image() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 256 * 1024 + 100);
    let before = std::fs::read(&base).unwrap();
    let crc_before = meta::crc32(&before);
    let mtime_before = std::fs::metadata(&base).unwrap().mtime_nsec();

    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[1; 100_000], 12_345).unwrap();
    disk.write_at(&[2; 100], 256 * 1024).unwrap(); // the short last block
    disk.flush().unwrap();
    drop(disk);

    let after = std::fs::read(&base).unwrap();
    assert_eq!(meta::crc32(&after), crc_before);
    assert_eq!(after, before);
    assert_eq!(std::fs::metadata(&base).unwrap().mtime_nsec(), mtime_before);
}

#[test]
fn partial_block_writes_keep_the_rest_of_the_block() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * 4096 + 700; // last block is 700 bytes
    let base = make_base(dir.path(), size);
    let mut disk = CowDisk::create(&base, &dir.path().join("o")).unwrap();
    let mut model = pattern(0, size as usize);

    let mut write = |disk: &mut CowDisk, data: &[u8], off: u64| {
        disk.write_at(data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
        assert_eq!(read(disk, 0, size as usize), model, "after write at {off}");
    };
    write(&mut disk, &[9; 10], 100); // inside one block
    write(&mut disk, &[8; 10], 4090); // straddles two blocks
    write(&mut disk, &[7; 3 * 4096], 2 * 4096 + 1); // unaligned, spans 4 blocks
    write(&mut disk, &[6; 1], 0); // again into an allocated block
    write(&mut disk, &[5; 200], size - 200); // tail of the short last block
    write(&mut disk, &[4; 4096 + 700], 9 * 4096); // whole final two blocks
    write(&mut disk, &[], 77); // empty write is a no-op
    assert_eq!(disk.allocated_blocks(), 8);
}

#[test]
fn sealed_writes_are_applied_by_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 1 << 20);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[0x5a; 5000], 40_000).unwrap();
    let sealed = disk.seal(3).unwrap().expect("a layer");
    let blocks = disk.allocated_blocks();
    assert_eq!(sealed.generation, 3);
    let files = disk.files();
    drop(disk);
    assert!(files.iter().all(|f| f.exists()), "{files:?}");
    assert!(!meta::temp_path(&files[1]).exists());
    assert!(dir.path().join("o.layer-3").exists());

    let disk = CowDisk::open(&base, &overlay, Some(sealed)).unwrap();
    assert!(!dir.path().join("o.layer-3").exists(), "merged and deleted");
    assert_eq!(disk.allocated_blocks(), blocks);
    let mut disk = disk;
    // Rewritten after the snapshot: in the overlay and pending, one block.
    disk.write_at(&[0x5a; 10], 40_000).unwrap();
    assert_eq!(disk.allocated_blocks(), blocks);
    assert_eq!(read(&disk, 40_000, 5000), vec![0x5a; 5000]);
    assert_eq!(read(&disk, 0, 40_000), pattern(0, 40_000));
    assert_eq!(read(&disk, 45_000, 1000), pattern(45_000, 1000));
    assert_eq!(disk.files(), files);
}

#[test]
fn writes_no_snapshot_committed_are_dropped_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[1; 4096], 0).unwrap();
    let first = disk.seal(1).unwrap();
    drop(disk);
    let mut disk = CowDisk::open(&base, &overlay, first).unwrap();
    // Written after snapshot 1; the guest even flushed them.
    disk.write_at(&[2; 4096], 4096).unwrap();
    disk.write_at(&[2; 100], 10).unwrap();
    disk.flush().unwrap();
    assert_eq!(read(&disk, 0, 10), vec![1; 10]);
    assert_eq!(read(&disk, 10, 100), vec![2; 100]);
    drop(disk); // a crash before the next snapshot

    for _ in 0..2 {
        let disk = CowDisk::open(&base, &overlay, first).unwrap();
        assert_eq!(read(&disk, 0, 4096), vec![1; 4096]);
        assert_eq!(read(&disk, 4096, 4096), pattern(4096, 4096));
    }

    // Sealed for snapshot 2, but its manifest never switched: still 1.
    let mut disk = CowDisk::open(&base, &overlay, first).unwrap();
    disk.write_at(&[3; 4096], 8192).unwrap();
    let second = disk.seal(2).unwrap();
    assert!(second.is_some());
    drop(disk);
    let disk = CowDisk::open(&base, &overlay, first).unwrap();
    assert_eq!(read(&disk, 8192, 4096), pattern(8192, 4096));
    assert!(!dir.path().join("o.layer-2").exists());
    assert!(!dir.path().join("o.layer-2.meta").exists());
}

#[test]
fn a_crash_while_applying_a_layer_is_repaired_by_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[7; 6000], 1000).unwrap();
    let sealed = disk.seal(5).unwrap();
    drop(disk);
    let saved: Vec<(std::path::PathBuf, Vec<u8>)> = ["o.layer-5", "o.layer-5.meta"]
        .iter()
        .map(|n| dir.path().join(n))
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let expected = {
        let disk = CowDisk::open(&base, &overlay, sealed).unwrap();
        read(&disk, 0, 64 * 1024)
    };
    assert_eq!(expected[1000..7000], [7; 6000]);
    // As if the copy had been cut off before it was recorded: the layer is
    // still there and the overlay may hold part of it.
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::remove_file(dir.path().join("o.merged")).unwrap();
    let disk = CowDisk::open(&base, &overlay, sealed).unwrap();
    assert_eq!(read(&disk, 0, 64 * 1024), expected);
    drop(disk);
    // Recorded, but the layer's files were not deleted yet.
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).unwrap();
    }
    let disk = CowDisk::open(&base, &overlay, sealed).unwrap();
    assert_eq!(read(&disk, 0, 64 * 1024), expected);
    assert!(!saved[0].0.exists());
}

#[test]
fn a_committed_layer_that_is_missing_or_damaged_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[9; 4096], 0).unwrap();
    let sealed = disk.seal(2).unwrap();
    drop(disk);
    let meta = dir.path().join("o.layer-2.meta");
    let good = std::fs::read(&meta).unwrap();
    let mut bad = good.clone();
    bad[32] ^= 1; // the first bitmap byte
    std::fs::write(&meta, &bad).unwrap();
    let err = CowDisk::open(&base, &overlay, sealed).unwrap_err();
    assert!(
        matches!(&err, DiskError::CorruptOverlay { path, .. } if path == &meta),
        "{err}"
    );
    std::fs::remove_file(&meta).unwrap();
    let err = CowDisk::open(&base, &overlay, sealed).unwrap_err();
    assert!(matches!(err, DiskError::CorruptOverlay { .. }), "{err}");
    // Nothing was lost by the failed opens.
    std::fs::write(&meta, &good).unwrap();
    let disk = CowDisk::open(&base, &overlay, sealed).unwrap();
    assert_eq!(read(&disk, 0, 4096), vec![9; 4096]);
}

#[test]
fn the_overlay_is_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("big.img");
    let f = File::create(&base).unwrap();
    f.set_len(256 << 20).unwrap();
    drop(f);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[1; 4096], 100 << 20).unwrap();
    let sealed = disk.seal(1).unwrap();
    drop(disk);
    let disk = CowDisk::open(&base, &overlay, sealed).unwrap();
    let used = std::fs::metadata(&overlay).unwrap().blocks() * 512;
    assert!(used <= 1 << 20, "overlay uses {used} bytes for one block");
    // 65536 blocks -> 8 KiB of bitmap.
    let meta_len = std::fs::metadata(&disk.files()[1]).unwrap().len();
    assert_eq!(meta_len, 32 + 8192 + 4);
}

#[test]
fn out_of_range_requests_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 8192);
    let mut disk = CowDisk::create(&base, &dir.path().join("o")).unwrap();
    let mut buf = [0u8; 2];
    assert!(matches!(
        disk.read_at(&mut buf, 8191),
        Err(DiskError::OutOfRange {
            offset: 8191,
            len: 2,
            size: 8192
        })
    ));
    assert!(matches!(
        disk.read_at(&mut buf, u64::MAX),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write_at(&buf, 8192),
        Err(DiskError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.write_at(&buf, u64::MAX - 1),
        Err(DiskError::OutOfRange { .. })
    ));
    assert_eq!(disk.allocated_blocks(), 0);
    disk.read_at(&mut buf, 8190).unwrap();
    disk.write_at(&buf, 8190).unwrap();
    disk.read_at(&mut [], 8192).unwrap();
}

#[test]
fn create_refuses_to_overwrite_an_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 8192);
    let overlay = dir.path().join("o");
    let disk = CowDisk::create(&base, &overlay).unwrap();
    drop(disk);
    let err = CowDisk::create(&base, &overlay).unwrap_err();
    assert!(matches!(err, DiskError::OverlayExists { .. }), "{err}");
    // The failed create left the existing overlay intact.
    CowDisk::open(&base, &overlay, None).unwrap();
}

#[test]
fn an_overlay_is_used_by_one_disk_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 8192);
    let overlay = dir.path().join("o");
    let disk = CowDisk::create(&base, &overlay).unwrap();
    let err = CowDisk::open(&base, &overlay, None).unwrap_err();
    assert!(matches!(err, DiskError::Locked { .. }), "{err}");
    drop(disk);
    let disk = CowDisk::open(&base, &overlay, None).unwrap();
    // Unlocked while still open (a stopped machine dropped later): another
    // open takes the overlay at once.
    disk.unlock();
    let again = CowDisk::open(&base, &overlay, None).unwrap();
    drop(disk);
    assert!(matches!(
        CowDisk::open(&base, &overlay, None).unwrap_err(),
        DiskError::Locked { .. }
    ));
    drop(again);
}

#[test]
fn corrupt_or_truncated_metadata_is_a_typed_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[3; 4096], 0).unwrap();
    disk.flush().unwrap();
    let meta_path = disk.files()[1].clone();
    drop(disk);
    let good = std::fs::read(&meta_path).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() - 3].to_vec()),
        ("header only", good[..20].to_vec()),
        ("empty", Vec::new()),
        ("bit flipped", {
            let mut b = good.clone();
            b[32] ^= 0x02;
            b
        }),
        (
            "foreign",
            b"this is not an overlay at all, just some text".to_vec(),
        ),
        ("appended", {
            let mut b = good.clone();
            b.extend_from_slice(&[0; 16]);
            b
        }),
    ];
    for (what, bytes) in cases {
        std::fs::write(&meta_path, &bytes).unwrap();
        let err = CowDisk::open(&base, &overlay, None).unwrap_err();
        match &err {
            DiskError::CorruptOverlay { path, .. } => assert_eq!(path, &meta_path, "{what}"),
            other => panic!("{what}: expected CorruptOverlay, got {other}"),
        }
        assert!(err.to_string().contains(&meta_path.display().to_string()));
    }

    std::fs::remove_file(&meta_path).unwrap();
    let err = CowDisk::open(&base, &overlay, None).unwrap_err();
    assert!(matches!(err, DiskError::Io { op: "open", .. }), "{err}");
}

#[test]
fn a_truncated_data_file_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("o");
    drop(CowDisk::create(&base, &overlay).unwrap());
    File::options()
        .write(true)
        .open(&overlay)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = CowDisk::open(&base, &overlay, None).unwrap_err();
    match err {
        DiskError::CorruptOverlay { path, .. } => assert_eq!(path, overlay),
        other => panic!("expected CorruptOverlay, got {other}"),
    }
}

#[test]
fn a_base_image_whose_size_changed_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 64 * 1024);
    let overlay = dir.path().join("o");
    drop(CowDisk::create(&base, &overlay).unwrap());
    File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(128 * 1024)
        .unwrap();
    let err = CowDisk::open(&base, &overlay, None).unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::BaseSizeChanged {
                expected: 65536,
                actual: 131072,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn the_base_must_be_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = CowDisk::create(dir.path(), &dir.path().join("o")).unwrap_err();
    assert!(matches!(err, DiskError::BaseNotAFile { .. }), "{err}");
    let err = CowDisk::create(&dir.path().join("missing"), &dir.path().join("o")).unwrap_err();
    assert!(matches!(err, DiskError::Io { op: "open", .. }), "{err}");
    assert!(!dir.path().join("o").exists());
}

#[test]
fn random_reads_and_writes_match_a_model_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let size = 37 * 4096 + 1234;
    let base = make_base(dir.path(), size);
    let overlay = dir.path().join("o");
    let mut model = pattern(0, size as usize);
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for round in 0..600 {
        let off = rng.below(size);
        let len = rng.below((size - off).min(3 * 4096) + 1) as usize;
        if rng.below(2) == 0 {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            disk.write_at(&data, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(&data);
        } else {
            assert_eq!(
                read(&disk, off, len),
                model[off as usize..off as usize + len],
                "round {round}"
            );
        }
        if round % 100 == 99 {
            let sealed = disk.seal(round).unwrap();
            drop(disk);
            disk = CowDisk::open(&base, &overlay, sealed).unwrap();
        }
    }
    assert_eq!(read(&disk, 0, size as usize), model);
    assert_eq!(std::fs::read(&base).unwrap(), pattern(0, size as usize));
}

#[test]
fn a_committed_snapshot_of_a_running_disk_is_copied_whole_and_stays_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path(), 1 << 20);
    let overlay = dir.path().join("o");
    let mut disk = CowDisk::create(&base, &overlay).unwrap();
    disk.write_at(&[1; 4096], 0).unwrap();
    let first = disk.seal(1).unwrap().expect("a layer");
    disk.commit(first).unwrap();
    assert!(
        !dir.path().join("o.layer-1").exists(),
        "applied and deleted"
    );
    // Writes after the snapshot go to a new pending layer...
    disk.write_at(&[2; 4096], 0).unwrap();
    disk.write_at(&[3; 4096], 8192).unwrap();
    // ...and the snapshot's copy (taken before they are sealed) has none.
    let copy = dir.path().join("copy");
    copy_snapshot_disk(&overlay, &copy, Some(first)).unwrap();
    let copied = CowDisk::open(&base, &copy, Some(first)).unwrap();
    assert_eq!(read(&copied, 0, 4096), vec![1; 4096]);
    assert_eq!(read(&copied, 8192, 4096), pattern(8192, 4096));
    assert_eq!(read(&disk, 0, 4096), vec![2; 4096]);

    // A snapshot whose layer is not applied yet (a paused sandbox): the
    // copy gets the layer and applies it when opened.
    let second = disk.seal(2).unwrap().expect("a layer");
    drop(disk);
    let copy2 = dir.path().join("copy2");
    copy_snapshot_disk(&overlay, &copy2, Some(second)).unwrap();
    let copied2 = CowDisk::open(&base, &copy2, Some(second)).unwrap();
    assert_eq!(read(&copied2, 0, 4096), vec![2; 4096]);
    assert_eq!(read(&copied2, 8192, 4096), vec![3; 4096]);
    // The source still opens as its own snapshot.
    let disk = CowDisk::open(&base, &overlay, Some(second)).unwrap();
    assert_eq!(read(&disk, 8192, 4096), vec![3; 4096]);
    // And the first copy never saw any of it.
    assert_eq!(read(&copied, 0, 4096), vec![1; 4096]);
}
