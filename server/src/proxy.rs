//! Requests for a sandbox port other than envd's and the interpreter's go
//! to the guest's own server on that port, one HTTP/1.1 connection per
//! request (through the agent's port forward).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use crate::error::ApiError;
use crate::state::Live;

/// Headers of ours that the guest's server must not see.
const STRIPPED: [&str; 4] = [
    "x-access-token",
    "e2b-traffic-access-token",
    "e2b-sandbox-id",
    "e2b-sandbox-port",
];

pub async fn forward(live: Arc<Live>, port: u16, mut req: Request) -> Response {
    let conn = match live.sandbox.ports().connect(port).await {
        Ok(conn) => conn,
        Err(e) => {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "nothing answers on port {port} in sandbox {}: {e}",
                    live.sandbox.id()
                ),
            )
            .into_response()
        }
    };
    let (mut sender, connection) =
        match hyper::client::conn::http1::handshake(TokioIo::new(conn)).await {
            Ok(pair) => pair,
            Err(e) => {
                return ApiError::new(StatusCode::BAD_GATEWAY, format!("port {port}: {e}"))
                    .into_response()
            }
        };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("port {port}: connection ended: {e}");
        }
    });
    for name in STRIPPED {
        req.headers_mut().remove(HeaderName::from_static(name));
    }
    // HTTP/2 requests carry the authority in the URI; HTTP/1.1 wants a
    // Host header and an origin-form target.
    if !req.headers().contains_key(header::HOST) {
        if let Some(host) = req.uri().authority().and_then(|a| a.as_str().parse().ok()) {
            req.headers_mut().insert(header::HOST, host);
        }
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *req.uri_mut() = match path.parse() {
        Ok(uri) => uri,
        Err(_) => return ApiError::bad_request("invalid request target").into_response(),
    };
    *req.version_mut() = axum::http::Version::HTTP_11;
    match sender.send_request(req).await {
        Ok(response) => response.map(Body::new),
        Err(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("port {port} of sandbox {}: {e}", live.sandbox.id()),
        )
        .into_response(),
    }
}
