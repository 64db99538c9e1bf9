//! Round trips of every frame type and hostile inputs for the decoder.

use std::io::Cursor;

use super::*;

/// A small deterministic PRNG (xorshift64*), so the property tests need no
/// extra crate and always run the same cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Hello(Hello {
            min_version: 1,
            max_version: 1,
            client: "dormouse test".into(),
        }),
        Frame::HelloAck(HelloAck {
            version: 1,
            agent_version: "0.1.0".into(),
            capabilities: vec![capability::EXEC.into(), capability::PING.into()],
            init: true,
        }),
        Frame::Ping(Ping { nonce: u64::MAX }),
        Frame::Pong(Ping { nonce: 7 }),
        Frame::error(ErrorKind::NotFound, "command not found: nope"),
        Frame::Exec(Exec {
            argv: vec!["sh".into(), "-c".into(), "echo \"hé\" \u{1F600}".into()],
            env: vec![("A".into(), "1=2".into()), ("EMPTY".into(), String::new())],
            cwd: Some("/tmp".into()),
            stdin: StdinMode::Pipe,
            report_pid: true,
            background: true,
            timeout_ms: Some(1500),
            tag: Some("server".into()),
            user: Some("user".into()),
        }),
        Frame::Stdin(b"input\0with nul".to_vec()),
        Frame::StdinEof,
        Frame::Stdout(Vec::new()),
        Frame::Stderr(vec![0xff; 1000]),
        Frame::Exit(ExitStatus::exited(3)),
        Frame::Exit(ExitStatus::signaled(9)),
        Frame::Exit(ExitStatus {
            timed_out: true,
            ..ExitStatus::signaled(9)
        }),
        Frame::Done,
        Frame::Started(Started { pid: 42 }),
        Frame::ProcessRequest(ProcessRequest::List),
        Frame::ProcessRequest(ProcessRequest::Signal { pid: 3, signal: 15 }),
        Frame::ProcessRequest(ProcessRequest::SendStdin { pid: 3 }),
        Frame::ProcessRequest(ProcessRequest::Connect { pid: 3 }),
        Frame::Process(ProcessInfo {
            pid: 9,
            argv: vec!["sleep".into(), "9".into()],
            env: vec![("A".into(), "b".into())],
            cwd: None,
            tag: Some("t".into()),
            stdin_open: true,
        }),
        Frame::FileRequest(FileRequest::List {
            path: "/tmp".into(),
            depth: 2,
        }),
        Frame::FileRequest(FileRequest::Write {
            path: "/tmp/a b/\u{e9}".into(),
            mode: Some(0o600),
        }),
        Frame::FileRequest(FileRequest::Rename {
            from: "/a".into(),
            to: "/b".into(),
        }),
        Frame::Entry(EntryInfo {
            name: "x".into(),
            path: "/tmp/x".into(),
            kind: EntryKind::Symlink,
            size: 1 << 40,
            mode: 0o777,
            owner: "root".into(),
            group: "1000".into(),
            modified_ns: -5,
            symlink_target: Some("/etc".into()),
        }),
        Frame::Data(vec![0, 1, 2]),
        Frame::FileEvent(FileEvent {
            kind: FileEventKind::Create,
            path: "/tmp/new".into(),
        }),
        Frame::CodeRequest(CodeRequest::Run {
            context: Some("ctx-1".into()),
            code: "x = 42\nx".into(),
            env: vec![("K".into(), "v".into())],
            timeout_ms: Some(10),
        }),
        Frame::CodeRequest(CodeRequest::CreateContext { cwd: None }),
        Frame::CodeRequest(CodeRequest::ListContexts),
        Frame::CodeResult(CodeResult { text: "42".into() }),
        Frame::CodeError(CodeError {
            name: "ZeroDivisionError".into(),
            value: "division by zero".into(),
            traceback: "Traceback...".into(),
        }),
        Frame::CodeEnd(CodeEnd {
            execution_count: 3,
            timed_out: false,
        }),
        Frame::Context(ContextInfo {
            id: "default".into(),
            language: "python".into(),
            cwd: "/root".into(),
        }),
        Frame::Forward(Forward { port: 8000 }),
        Frame::Sync(Sync {
            realtime_ns: 1_700_000_000_000_000_000,
            entropy: vec![7; 32],
        }),
    ]
}

#[test]
fn every_frame_type_round_trips() {
    let frames = sample_frames();
    for ty in FrameType::ALL {
        assert!(
            frames.iter().any(|f| f.frame_type() == ty),
            "no sample of {ty:?}"
        );
        assert_eq!(FrameType::from_u16(ty.to_u16()), Some(ty));
    }
    for frame in &frames {
        let bytes = encode(frame).unwrap();
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(&back, frame);
        assert_eq!(used, bytes.len());
        // Every strict prefix is incomplete, never an error.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).unwrap().is_none(), "prefix {cut}");
        }
    }
}

#[test]
fn stream_of_frames_through_reader_and_decoder() {
    let frames = sample_frames();
    let mut stream = Vec::new();
    for f in &frames {
        write_frame(&mut stream, f).unwrap();
    }
    let mut reader = FrameReader::new(Cursor::new(stream.clone()));
    for f in &frames {
        assert_eq!(reader.read_frame().unwrap().as_ref(), Some(f));
    }
    assert!(reader.read_frame().unwrap().is_none());

    // Byte-at-a-time feeding gives the same frames.
    let mut dec = Decoder::new();
    let mut got = Vec::new();
    for b in &stream {
        dec.feed(std::slice::from_ref(b));
        while let Some(f) = dec.next_frame().unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, frames);
    dec.finish().unwrap();
}

#[test]
fn raw_data_frames_match_encoded_ones() {
    let mut a = Vec::new();
    write_raw_frame(&mut a, FrameType::Stdout, b"abc").unwrap();
    assert_eq!(a, encode(&Frame::Stdout(b"abc".to_vec())).unwrap());
    assert!(matches!(
        write_raw_frame(&mut a, FrameType::Exec, b"{}"),
        Err(ProtoError::InvalidPayload { .. })
    ));
}

#[test]
fn truncated_stream_is_reported() {
    let bytes = encode(&Frame::Stdout(b"hello".to_vec())).unwrap();
    for cut in 1..bytes.len() {
        let mut reader = FrameReader::new(Cursor::new(bytes[..cut].to_vec()));
        assert!(
            matches!(reader.read_frame(), Err(ProtoError::Truncated { got, .. }) if got == cut),
            "cut at {cut}"
        );
    }
    let mut empty = FrameReader::new(Cursor::new(Vec::new()));
    assert!(empty.read_frame().unwrap().is_none());
}

#[test]
fn wrong_magic_is_rejected_at_the_first_byte() {
    assert!(matches!(
        decode(b"X"),
        Err(ProtoError::BadMagic { found }) if found == [b'X', 0, 0, 0]
    ));
    assert!(matches!(
        decode(b"GET / HTTP/1.1\r\n"),
        Err(ProtoError::BadMagic { .. })
    ));
}

fn header(version: u16, ty: u16, len: u32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&version.to_le_bytes());
    h.extend_from_slice(&ty.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h
}

#[test]
fn bad_header_fields_are_rejected_before_the_payload() {
    assert!(matches!(
        decode(&header(PROTOCOL_VERSION + 1, 1, 0)),
        Err(ProtoError::UnsupportedVersion { found, .. }) if found == PROTOCOL_VERSION + 1
    ));
    assert!(matches!(
        decode(&header(0, 1, 0)),
        Err(ProtoError::UnsupportedVersion { found: 0, .. })
    ));
    assert!(matches!(
        decode(&header(PROTOCOL_VERSION, 999, 0)),
        Err(ProtoError::UnknownFrameType(999))
    ));
    // A huge length is refused from the header alone: no allocation, no wait
    // for 4 GiB that will never come.
    assert!(matches!(
        decode(&header(PROTOCOL_VERSION, 19, u32::MAX)),
        Err(ProtoError::TooLarge { len, .. }) if len == u64::from(u32::MAX)
    ));
    assert!(matches!(
        decode(&header(PROTOCOL_VERSION, 19, MAX_FRAME_PAYLOAD as u32 + 1)),
        Err(ProtoError::TooLarge { .. })
    ));
    let mut dec = Decoder::new();
    dec.feed(&header(PROTOCOL_VERSION, 19, u32::MAX));
    assert_eq!(dec.needed(), 0);
    assert!(dec.read_space(16).len() < 1 << 20);
    assert!(dec.next_frame().is_err());
}

#[test]
fn oversized_frames_cannot_be_encoded() {
    let big = Frame::Stdout(vec![0; MAX_FRAME_PAYLOAD + 1]);
    assert!(matches!(encode(&big), Err(ProtoError::TooLarge { .. })));
    let max = Frame::Stdout(vec![1; MAX_FRAME_PAYLOAD]);
    let bytes = encode(&max).unwrap();
    assert_eq!(decode(&bytes).unwrap().unwrap().0, max);
}

fn with_payload(ty: FrameType, payload: &[u8]) -> Vec<u8> {
    let mut b = encode_header(ty, payload.len()).unwrap().to_vec();
    b.extend_from_slice(payload);
    b
}

#[test]
fn invalid_payloads_are_rejected() {
    let cases: &[(FrameType, &[u8])] = &[
        (FrameType::Hello, b"not json"),
        (FrameType::Hello, b""),
        (FrameType::HelloAck, b"{\"version\":1}"),
        (FrameType::Ping, b"{\"nonce\":-1}"),
        (FrameType::Exec, b"{\"argv\":[]}"),
        (FrameType::Exec, b"{\"argv\":[\"\"]}"),
        (FrameType::Exec, b"{\"argv\":[\"a\\u0000b\"]}"),
        (
            FrameType::Exec,
            b"{\"argv\":[\"sh\"],\"env\":[[\"A=B\",\"c\"]]}",
        ),
        (
            FrameType::Exec,
            b"{\"argv\":[\"sh\"],\"env\":[[\"\",\"c\"]]}",
        ),
        (FrameType::Exec, b"{\"argv\":[\"sh\"],\"cwd\":\"\"}"),
        (FrameType::Exec, b"{\"argv\":[\"\xff\xfe\"]}"),
        (FrameType::Exec, b"{\"argv\":[\"sh\"],\"stdin\":\"tty\"}"),
        (FrameType::Exit, b"{\"code\":null,\"signal\":null}"),
        (FrameType::Exit, b"{\"code\":1,\"signal\":9}"),
        (FrameType::Exit, b"{\"code\":256,\"signal\":null}"),
        (FrameType::Exit, b"{\"code\":null,\"signal\":0}"),
        (FrameType::Error, b"{\"kind\":\"not_found\"}"),
        (FrameType::StdinEof, b"x"),
    ];
    for (ty, payload) in cases {
        let bytes = with_payload(*ty, payload);
        assert!(
            matches!(decode(&bytes), Err(ProtoError::InvalidPayload { frame, .. }) if frame == *ty),
            "{ty:?} {:?}",
            String::from_utf8_lossy(payload)
        );
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
    let mut payload = vec![b'['; 100_000];
    payload.extend(vec![b']'; 100_000]);
    let bytes = with_payload(FrameType::Exec, &payload);
    assert!(matches!(
        decode(&bytes),
        Err(ProtoError::InvalidPayload { .. })
    ));
}

#[test]
fn unknown_error_kinds_and_fields_from_newer_peers_are_tolerated() {
    let bytes = with_payload(
        FrameType::Error,
        b"{\"kind\":\"quota_exceeded\",\"message\":\"m\",\"extra\":1}",
    );
    let (frame, _) = decode(&bytes).unwrap().unwrap();
    assert_eq!(frame, Frame::error(ErrorKind::Other, "m"));
    let bytes = with_payload(FrameType::Exec, b"{\"argv\":[\"ls\"],\"future\":true}");
    let (frame, _) = decode(&bytes).unwrap().unwrap();
    assert!(matches!(frame, Frame::Exec(e) if e.argv == ["ls"] && e.stdin == StdinMode::Null));
}

/// Random byte strings never panic the decoder, and the data frames it
/// accepts re-encode to the same bytes.
#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..20_000 {
        let len = rng.below(64);
        let mut bytes = rng.bytes(len);
        // Half of the cases get a valid header prefix so the decoder goes
        // past the magic into the interesting paths.
        if i % 2 == 0 && bytes.len() >= HEADER_LEN {
            let ty = FrameType::ALL[rng.below(FrameType::ALL.len())];
            let plen = rng.below(bytes.len() - HEADER_LEN + 1);
            bytes[..HEADER_LEN].copy_from_slice(&encode_header(ty, plen).unwrap());
        }
        if let Ok(Some((frame, used))) = decode(&bytes) {
            assert!(used <= bytes.len());
            let ty = frame.frame_type();
            if ty.is_data() || ty.is_empty() {
                assert_eq!(encode(&frame).unwrap(), bytes[..used]);
            }
        }
        let mut reader = FrameReader::new(Cursor::new(bytes));
        while let Ok(Some(_)) = reader.read_frame() {}
    }
}

/// Random corruptions (bit flips, truncations) of valid frame streams.
#[test]
fn mutated_valid_streams_never_panic() {
    let mut rng = Rng(42);
    let frames = sample_frames();
    let mut stream = Vec::new();
    for f in &frames {
        write_frame(&mut stream, f).unwrap();
    }
    for _ in 0..5_000 {
        let mut bytes = stream.clone();
        for _ in 0..=rng.below(4) {
            let at = rng.below(bytes.len());
            bytes[at] ^= 1 << rng.below(8);
        }
        bytes.truncate(rng.below(bytes.len() + 1));
        let mut dec = Decoder::new();
        let mut at = 0;
        while at < bytes.len() {
            let n = (1 + rng.below(300)).min(bytes.len() - at);
            dec.feed(&bytes[at..at + n]);
            at += n;
            loop {
                match dec.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        at = bytes.len();
                        break;
                    }
                }
            }
        }
    }
}

#[test]
fn exit_status_helpers() {
    assert!(ExitStatus::exited(0).success());
    assert!(!ExitStatus::exited(1).success());
    assert!(!ExitStatus::signaled(9).success());
    assert!(ExitStatus::signaled(9).validate().is_ok());
}
