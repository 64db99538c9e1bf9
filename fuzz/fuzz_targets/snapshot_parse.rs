//! Feeds arbitrary bytes to the snapshot manifest and machine-state
//! parsers: they must return a value or a typed error, never panic.
//!
//! Run with `cargo +nightly fuzz run snapshot_parse` from the repository root.
#![no_main]

use std::path::Path;

use dormouse::snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = snapshot::parse_manifest(Path::new("snapshot.json"), data) {
        // Whatever is accepted names only files inside the directory.
        for layer in &manifest.memory {
            assert!(!layer.file.contains('/'));
        }
        assert!(!manifest.state_file.contains('/'));
    }
    let _ = snapshot::parse_state(Path::new("state-1.json"), data);
});
