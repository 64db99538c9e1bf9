//! Client behaviour against a scripted fake agent (no guest needed): the
//! client must reject whatever a hostile or broken agent sends.

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::proto::{capability, FrameType, MAGIC};

fn ack(version: u16) -> Frame {
    Frame::HelloAck(HelloAck {
        version,
        agent_version: "fake".into(),
        capabilities: vec![capability::EXEC.into()],
        init: false,
    })
}

/// Runs `exec` against a fake agent that reads the request and then sends
/// `reply` bytes and closes.
async fn exec_against(reply: Vec<u8>, req: ExecRequest) -> Result<ExecOutput, AgentError> {
    let (client, mut agent) = duplex(1 << 20);
    let fake = tokio::spawn(async move {
        // Read the Hello and Exec the client sends first.
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            let mut buf = [0u8; 4096];
            let n = agent.read(&mut buf).await.unwrap();
            assert!(n > 0, "client closed early");
            dec.feed(&buf[..n]);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert!(matches!(got[0], Frame::Hello(_)));
        assert!(matches!(got[1], Frame::Exec(_)));
        let _ = agent.write_all(&reply).await;
        let _ = agent.shutdown().await;
        // Keep our end alive until the client is done with it.
        let mut sink = Vec::new();
        let _ = agent.read_to_end(&mut sink).await;
    });
    let result = exec(client, req).await;
    fake.abort();
    result
}

fn frames(list: &[Frame]) -> Vec<u8> {
    list.iter().flat_map(|f| encode(f).unwrap()).collect()
}

#[tokio::test]
async fn collects_output_and_status() {
    let reply = frames(&[
        ack(PROTOCOL_VERSION),
        Frame::Stdout(b"he".to_vec()),
        Frame::Stderr(b"err".to_vec()),
        Frame::Stdout(b"llo".to_vec()),
        Frame::Exit(ExitStatus::exited(3)),
    ]);
    let out = exec_against(reply, ExecRequest::shell("x")).await.unwrap();
    assert_eq!(out.stdout, b"hello");
    assert_eq!(out.stderr, b"err");
    assert_eq!((out.exit_code, out.signal), (Some(3), None));
    assert!(!out.success());
}

#[tokio::test]
async fn output_over_the_limit_is_an_error() {
    let reply = frames(&[
        ack(PROTOCOL_VERSION),
        Frame::Stdout(vec![b'a'; 600]),
        Frame::Stderr(vec![b'b'; 600]),
        Frame::Exit(ExitStatus::exited(0)),
    ]);
    let err = exec_against(reply, ExecRequest::shell("x").max_output(1000))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::OutputTooLarge { limit: 1000 }),
        "{err}"
    );
}

#[tokio::test]
async fn closing_mid_stream_is_disconnected() {
    let mut reply = frames(&[ack(PROTOCOL_VERSION), Frame::Stdout(b"partial".to_vec())]);
    let err = exec_against(reply.clone(), ExecRequest::shell("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Disconnected { .. }), "{err}");
    // Closing inside a frame, too.
    reply.extend_from_slice(&encode(&Frame::Stdout(b"cut".to_vec())).unwrap()[..14]);
    let err = exec_against(reply, ExecRequest::shell("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Disconnected { .. }), "{err}");
}

#[tokio::test]
async fn protocol_violations_are_typed() {
    // Output before the handshake answer.
    let reply = frames(&[Frame::Stdout(b"x".to_vec())]);
    let err = exec_against(reply, ExecRequest::shell("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::Protocol(ProtoError::UnexpectedFrame {
                got: FrameType::Stdout,
                ..
            })
        ),
        "{err}"
    );
    // A frame only a host may send.
    let reply = frames(&[ack(PROTOCOL_VERSION), Frame::Exec(Exec::default())]);
    assert!(matches!(
        exec_against(reply, ExecRequest::shell("x")).await,
        Err(AgentError::Protocol(_))
    ));
    // Garbage.
    let err = exec_against(b"HTTP/1.1 200 OK\r\n".to_vec(), ExecRequest::shell("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, AgentError::Protocol(ProtoError::BadMagic { .. })),
        "{err}"
    );
    // A header announcing 4 GiB.
    let mut huge = MAGIC.to_vec();
    huge.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    huge.extend_from_slice(&FrameType::Stdout.to_u16().to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut reply = frames(&[ack(PROTOCOL_VERSION)]);
    reply.extend_from_slice(&huge);
    assert!(matches!(
        exec_against(reply, ExecRequest::shell("x")).await,
        Err(AgentError::Protocol(ProtoError::TooLarge { .. }))
    ));
    // An invalid exit status.
    let mut reply = frames(&[ack(PROTOCOL_VERSION)]);
    let bad = br#"{"code":1,"signal":9}"#;
    reply.extend_from_slice(&proto::encode_header(FrameType::Exit, bad.len()).unwrap());
    reply.extend_from_slice(bad);
    assert!(matches!(
        exec_against(reply, ExecRequest::shell("x")).await,
        Err(AgentError::Protocol(ProtoError::InvalidPayload { .. }))
    ));
}

#[tokio::test]
async fn remote_errors_and_versions() {
    let reply = frames(&[Frame::error(ErrorKind::UnsupportedVersion, "too old")]);
    let err = exec_against(reply, ExecRequest::shell("x"))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        AgentError::Remote {
            kind: ErrorKind::UnsupportedVersion,
            ..
        }
    ));
    let reply = frames(&[ack(PROTOCOL_VERSION + 7)]);
    let err = exec_against(reply, ExecRequest::shell("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::IncompatibleAgent { .. }), "{err}");
}

#[tokio::test]
async fn invalid_requests_fail_before_sending() {
    let (client, _agent): (DuplexStream, DuplexStream) = duplex(64);
    let err = exec(client, ExecRequest::new(Vec::<String>::new()))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
    let (client, _agent) = duplex(64);
    let err = exec(client, ExecRequest::shell("x").env("A=B", "c"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::InvalidRequest(_)), "{err}");
}

#[tokio::test]
async fn hello_reports_the_agent() {
    let (client, mut agent) = duplex(4096);
    let fake = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        let n = agent.read(&mut buf).await.unwrap();
        let (frame, _) = crate::proto::decode(&buf[..n]).unwrap().unwrap();
        assert!(matches!(frame, Frame::Hello(_)));
        agent.write_all(&encode(&ack(1)).unwrap()).await.unwrap();
        agent
    });
    let info = hello(client).await.unwrap();
    assert_eq!(info.agent_version, "fake");
    assert!(info.has_capability(capability::EXEC));
    assert!(!info.has_capability("files"));
    drop(fake.await);
}
