//! `GET /files?path=` streams a file out of the sandbox; `POST /files`
//! writes files into it, from a multipart body (one part per file, its
//! filename the path, or `?path=` for a single part) or a raw
//! `application/octet-stream` body. Parent directories are created and
//! existing files replaced.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::TryStreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;
use tokio_util::io::{ReaderStream, StreamReader};

use super::{check_user, guest_path};
use crate::error::{ApiError, ApiResult};
use crate::state::Live;

/// Status and message for a failed file operation, as envd answers
/// (the SDK maps 404 to `FileNotFoundException`, 400 to
/// `InvalidArgumentException`, 507 to `NotEnoughSpaceException`).
fn file_error(e: dormouse::Error) -> ApiError {
    use dormouse::Error as E;
    let status = match &e {
        E::PathNotFound { .. } => StatusCode::NOT_FOUND,
        E::IsADirectory { .. } | E::NotADirectory { .. } | E::InvalidConfig(_) => {
            StatusCode::BAD_REQUEST
        }
        E::AlreadyExists { .. } => StatusCode::CONFLICT,
        E::Agent(a) if a.to_string().contains("No space left") => StatusCode::INSUFFICIENT_STORAGE,
        E::SandboxPaused { .. } | E::NotFound { .. } | E::GuestStopped { .. } => {
            StatusCode::BAD_GATEWAY
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn path_param(params: &HashMap<String, String>) -> ApiResult<Option<String>> {
    if let Some(user) = params.get("username") {
        check_user(user).map_err(ApiError::bad_request)?;
    }
    params
        .get("path")
        .map(|p| guest_path(p).map_err(ApiError::bad_request))
        .transpose()
}

pub async fn download(
    Extension(live): Extension<Arc<Live>>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let path = path_param(&params)?.ok_or_else(|| ApiError::bad_request("missing ?path="))?;
    let (mut writer, reader) = tokio::io::duplex(256 << 10);
    let task_live = live.clone();
    let task_path = path.clone();
    let mut task = tokio::spawn(async move {
        task_live
            .sandbox
            .files()
            .read_to(&task_path, &mut writer)
            .await
    });
    let mut reader = tokio::io::BufReader::with_capacity(256 << 10, reader);
    // Answer once the first bytes are there, or the read failed or ended:
    // an error known before the first byte gets its own status.
    let ended = tokio::select! {
        joined = &mut task => Some(joined),
        filled = reader.fill_buf() => match filled {
            // End of file at once: the read ended, well or not.
            Ok([]) => Some((&mut task).await),
            Ok(_) => None,
            Err(e) => {
                return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading {path}: {e}")))
            }
        },
    };
    match ended {
        Some(Ok(Ok(_))) => {}
        Some(Ok(Err(e))) => return Err(file_error(e)),
        Some(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading {path}: {e}"),
            ))
        }
        None => {
            tokio::spawn(async move {
                if let Ok(Err(e)) = task.await {
                    log::warn!("download of {path} cut off: {e}");
                }
            });
        }
    }
    let mut response = Response::new(Body::from_stream(ReaderStream::new(reader)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    Ok(response)
}

fn written(path: &str) -> Value {
    let name = path.rsplit('/').next().unwrap_or(path);
    json!({"name": name, "type": "file", "path": path})
}

pub async fn upload(
    Extension(live): Extension<Arc<Live>>,
    Query(params): Query<HashMap<String, String>>,
    req: Request,
) -> ApiResult<Response> {
    let query_path = path_param(&params)?;
    if req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v != "identity")
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads are not supported: send the file uncompressed",
        ));
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let files = live.sandbox.files();
    let mut out = Vec::new();
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(req, &()).await.map_err(|e| {
            ApiError::bad_request(format!("invalid multipart body: {}", e.body_text()))
        })?;
        let mut parts = 0usize;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("invalid multipart body: {e}")))?
        {
            parts += 1;
            // The part's filename is its path; a single part may take
            // `?path=` instead.
            let path = match (field.file_name(), &query_path) {
                (_, Some(p)) if parts == 1 => p.clone(),
                (Some(name), _) => guest_path(name).map_err(ApiError::bad_request)?,
                (None, _) => return Err(ApiError::bad_request(
                    "a multipart part without a filename: give each file's path as its filename",
                )),
            };
            let mut data = StreamReader::new(field.map_err(std::io::Error::other));
            files
                .write_from(&path, &mut data)
                .await
                .map_err(file_error)?;
            out.push(written(&path));
        }
        if out.is_empty() {
            return Err(ApiError::bad_request("the multipart body has no file part"));
        }
    } else if content_type.is_empty() || content_type.starts_with("application/octet-stream") {
        let path = query_path.ok_or_else(|| {
            ApiError::bad_request("missing ?path= for an application/octet-stream upload")
        })?;
        let body = req.into_body().into_data_stream();
        let mut data = StreamReader::new(body.map_err(std::io::Error::other));
        files
            .write_from(&path, &mut data)
            .await
            .map_err(file_error)?;
        out.push(written(&path));
    } else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {content_type:?}: upload multipart/form-data or application/octet-stream"),
        ));
    }
    Ok(Json(out).into_response())
}
