//! Copy-on-write block store over a read-only template image.
