//! Feeds arbitrary bytes, split at an arbitrary point, to the agent
//! protocol's stream decoder: it must return frames or a typed error, never
//! panic, loop or allocate beyond its bounds.
//!
//! Run with `cargo +nightly fuzz run proto_decode` from the repository root.
#![no_main]

use dormouse::proto::{self, Decoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One-shot decoding of the whole buffer.
    let mut rest = data;
    while let Ok(Some((frame, used))) = proto::decode(rest) {
        assert!(used > 0 && used <= rest.len());
        // Whatever decodes must encode again to the same bytes' meaning.
        let again = proto::encode(&frame).expect("a decoded frame encodes");
        let (back, n) = proto::decode(&again).unwrap().unwrap();
        assert_eq!(n, again.len());
        assert_eq!(format!("{back:?}"), format!("{frame:?}"));
        rest = &rest[used..];
    }
    // Streaming: the first byte picks where the input is split.
    let split = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut decoder = Decoder::new();
    for chunk in [&data[..split], &data[split..]] {
        decoder.feed(chunk);
        loop {
            match decoder.next_frame() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = decoder.finish();
});
