//! The Connect RPC protocol (connectrpc.com/docs/protocol), JSON codec, as
//! envd speaks it: unary calls are `application/json` bodies answered by a
//! JSON message or a `{"code", "message"}` error with the matching HTTP
//! status; server-streaming calls take one enveloped message
//! (`application/connect+json`: a flags byte, a big-endian u32 length, the
//! JSON) and answer 200 with enveloped messages and a final end-of-stream
//! envelope (flags 0x02) that carries the error, if any.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{Stream, StreamExt};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

/// The largest request message accepted (a message, not a file: files go
/// through `/files`).
pub const MAX_MESSAGE: usize = 4 << 20;
const END_STREAM: u8 = 0x02;
const COMPRESSED: u8 = 0x01;

/// Connect's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code.
    pub fn status(self) -> StatusCode {
        match self {
            Code::Canceled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Code::Unknown | Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::InvalidArgument => StatusCode::BAD_REQUEST,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// An RPC error.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    fn json(&self) -> Value {
        json!({ "code": self.code.as_str(), "message": self.message })
    }
}

impl From<dormouse::Error> for RpcError {
    fn from(e: dormouse::Error) -> Self {
        use dormouse::Error as E;
        let code = match &e {
            E::PathNotFound { .. } | E::ProcessNotFound { .. } | E::ContextNotFound { .. } => {
                Code::NotFound
            }
            E::NotFound { .. } => Code::NotFound,
            E::AlreadyExists { .. } => Code::AlreadyExists,
            E::IsADirectory { .. } | E::NotADirectory { .. } => Code::InvalidArgument,
            E::InvalidConfig(_) => Code::InvalidArgument,
            E::CommandTimedOut { .. } => Code::DeadlineExceeded,
            E::SandboxPaused { .. } | E::GuestStopped { .. } => Code::Unavailable,
            E::Agent(a) if a.to_string().contains("permission denied") => Code::PermissionDenied,
            _ => Code::Unknown,
        };
        Self::new(code, e.to_string())
    }
}

/// A unary error answer.
impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        let mut r = (self.code.status(), axum::Json(self.json())).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

async fn body_bytes(req: Request) -> Result<Bytes, RpcError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_MESSAGE);
    limited.collect().await.map(|b| b.to_bytes()).map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            RpcError::new(
                Code::ResourceExhausted,
                format!("request message over {MAX_MESSAGE} bytes"),
            )
        } else {
            RpcError::new(Code::Canceled, format!("cannot read the request: {e}"))
        }
    })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RpcError> {
    // An empty unary body is the empty message.
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| RpcError::invalid(format!("invalid message: {e}")))
}

fn content_type(req: &Request) -> &str {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The message of a unary call.
pub async fn unary_request<T: DeserializeOwned>(req: Request) -> Result<T, RpcError> {
    let ct = content_type(&req);
    if !ct.starts_with("application/json") {
        return Err(RpcError::invalid(format!(
            "content type {ct:?}: this server speaks Connect with the JSON codec (application/json)"
        )));
    }
    parse(&body_bytes(req).await?)
}

/// A unary answer.
pub fn unary_response<T: Serialize>(message: &T) -> Response {
    let mut r = axum::Json(message).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The one enveloped message of a server-streaming call.
pub async fn stream_request<T: DeserializeOwned>(req: Request) -> Result<T, RpcError> {
    let ct = content_type(&req);
    if !ct.starts_with("application/connect+json") {
        return Err(RpcError::invalid(format!(
            "content type {ct:?}: streaming calls take application/connect+json"
        )));
    }
    let bytes = body_bytes(req).await?;
    let (flags, message) = split_envelope(&bytes)?;
    if flags & COMPRESSED != 0 {
        return Err(RpcError::new(
            Code::Unimplemented,
            "compressed messages are not supported; send them uncompressed",
        ));
    }
    parse(message)
}

/// The messages of a client-streaming call, read as they arrive.
pub struct MessageReader {
    body: axum::body::BodyDataStream,
    buf: Vec<u8>,
    ended: bool,
}

impl MessageReader {
    pub fn new(req: Request) -> Result<Self, RpcError> {
        let ct = content_type(&req);
        if !ct.starts_with("application/connect+json") {
            return Err(RpcError::invalid(format!(
                "content type {ct:?}: streaming calls take application/connect+json"
            )));
        }
        Ok(Self {
            body: req.into_body().into_data_stream(),
            buf: Vec::new(),
            ended: false,
        })
    }

    /// The next message, `None` at the end of the request.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, RpcError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > MAX_MESSAGE {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("request message of {len} bytes, over {MAX_MESSAGE}"),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    let frame: Vec<u8> = self.buf.drain(..5 + len).collect();
                    if flags & COMPRESSED != 0 {
                        return Err(RpcError::new(
                            Code::Unimplemented,
                            "compressed messages are not supported; send them uncompressed",
                        ));
                    }
                    if flags & END_STREAM != 0 {
                        self.ended = true;
                        return Ok(None);
                    }
                    return parse(&frame[5..]).map(Some);
                }
            }
            if self.ended {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(RpcError::invalid("the request ends inside a message"))
                };
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    return Err(RpcError::new(
                        Code::Canceled,
                        format!("cannot read the request: {e}"),
                    ))
                }
                None => self.ended = true,
            }
        }
    }
}

/// The first envelope of `bytes`: its flags and message. Anything after it
/// is ignored (a server-streaming request has one message).
fn split_envelope(bytes: &[u8]) -> Result<(u8, &[u8]), RpcError> {
    if bytes.len() < 5 {
        return Err(RpcError::invalid(
            "the request is not an enveloped message (under 5 bytes)",
        ));
    }
    let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
    let message = bytes.get(5..5 + len).ok_or_else(|| {
        RpcError::invalid(format!(
            "envelope says {len} bytes, {} follow",
            bytes.len() - 5
        ))
    })?;
    Ok((bytes[0], message))
}

fn envelope(flags: u8, message: &Value) -> Bytes {
    let json = serde_json::to_vec(message).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(5 + json.len());
    out.push(flags);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out.into()
}

/// A server-streaming answer: every item of `messages` enveloped, then the
/// end of stream with the first error (which ends the stream).
pub fn stream_response<S>(messages: S) -> Response
where
    S: Stream<Item = Result<Value, RpcError>> + Send + 'static,
{
    let mut ended = false;
    let frames = messages
        .map(Some)
        .chain(futures_util::stream::once(async { None }))
        .filter_map(move |item| {
            let frame = if ended {
                None
            } else {
                match item {
                    Some(Ok(m)) => Some(envelope(0, &m)),
                    Some(Err(e)) => {
                        ended = true;
                        Some(envelope(END_STREAM, &json!({ "error": e.json() })))
                    }
                    None => {
                        ended = true;
                        Some(envelope(END_STREAM, &json!({})))
                    }
                }
            };
            std::future::ready(frame.map(Ok::<_, Infallible>))
        });
    let mut r = Response::new(Body::from_stream(frames));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/connect+json"),
    );
    r
}

/// The answer of a unary call.
pub fn unary(result: Result<Value, RpcError>) -> Response {
    match result {
        Ok(message) => unary_response(&message),
        Err(e) => e.into_response(),
    }
}

/// The error for a method a service does not have.
pub fn no_method(service: &str, method: &str) -> RpcError {
    RpcError::new(Code::Unimplemented, format!("no method {service}/{method}"))
}

/// Stops a task when dropped: a stream's producer, owned by the response
/// body, so a client that goes away stops it.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The messages a task sends, as a stream; dropping it stops the task.
pub struct ChannelStream {
    pub rx: tokio::sync::mpsc::Receiver<Result<Value, RpcError>>,
    pub _guard: AbortOnDrop,
}

impl Stream for ChannelStream {
    type Item = Result<Value, RpcError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// A streaming call that failed before it started: still 200, the error in
/// the end of stream.
pub fn stream_error(e: RpcError) -> Response {
    stream_response(futures_util::stream::once(async move { Err(e) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let frame = envelope(0, &json!({"a": 1}));
        let (flags, msg) = split_envelope(&frame).unwrap();
        assert_eq!((flags, msg), (0, &b"{\"a\":1}"[..]));
        assert!(split_envelope(&frame[..4]).is_err());
        assert!(split_envelope(&frame[..frame.len() - 1]).is_err());
        let mut huge = frame.to_vec();
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(split_envelope(&huge).is_err());
    }

    #[tokio::test]
    async fn streams_end_with_the_first_error() {
        let items = vec![
            Ok(json!({"n": 1})),
            Err(RpcError::new(Code::NotFound, "gone")),
            Ok(json!({"n": 2})),
        ];
        let r = stream_response(futures_util::stream::iter(items));
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let (f1, m1) = split_envelope(&body).unwrap();
        assert_eq!((f1, m1), (0, &b"{\"n\":1}"[..]));
        let rest = &body[5 + m1.len()..];
        let (f2, m2) = split_envelope(rest).unwrap();
        assert_eq!(f2, END_STREAM);
        let end: Value = serde_json::from_slice(m2).unwrap();
        assert_eq!(end["error"]["code"], "not_found");
        assert_eq!(rest.len(), 5 + m2.len(), "nothing after the end of stream");
    }
}
