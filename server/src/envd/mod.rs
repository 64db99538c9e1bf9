//! envd (port 49983): plain HTTP `/files` and `/health`, and the Connect
//! RPC services `process.Process` and `filesystem.Filesystem`, each on the
//! dormouse agent of the sandbox.
//!
//! Users: E2B's envd runs requests as the template's `user` unless told
//! otherwise; here requests run as root unless the SDK names a user
//! (`Authorization: Basic base64("<user>:")` on RPC, `?username=` on
//! `/files`), and relative paths and the default working directory are
//! `/home/user`, as in E2B's templates.

mod files;
mod filesystem;
mod process;

pub use filesystem::PolledWatcher;

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;

use crate::api::unknown_route;
use crate::connect::RpcError;
use crate::state::AppState;

/// Where relative paths and commands start.
pub const HOME: &str = "/home/user";

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route("/files", get(files::download).post(files::upload))
        .route("/process.Process/{method}", post(process::call))
        .route("/filesystem.Filesystem/{method}", post(filesystem::call))
        .fallback(unknown_route)
        // `/files` streams bodies of any size; RPC messages are bounded by
        // the Connect layer.
        .layer(axum::extract::DefaultBodyLimit::disable())
}

/// The user an RPC names in `Authorization: Basic base64("<user>:")`.
pub fn rpc_user(headers: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(value) = headers.get("authorization") else {
        return Ok(None);
    };
    let bad = || {
        RpcError::new(
            crate::connect::Code::Unauthenticated,
            "invalid Authorization header: expected Basic base64(\"<user>:\")",
        )
    };
    let value = value.to_str().map_err(|_| bad())?;
    let encoded = value.strip_prefix("Basic ").ok_or_else(bad)?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let user = decoded.split(':').next().unwrap_or("");
    check_user(user).map_err(RpcError::invalid)?;
    Ok(Some(user.to_owned()))
}

/// A user name as Linux allows it.
pub fn check_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !user.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{user:?} is not a valid user name"))
    }
}

/// A guest path from a request, absolute and normalized: relative paths
/// are taken from the home directory, `.` and `..` resolved. A path that
/// climbs above `/`, is empty, or holds a NUL is refused.
pub fn guest_path(path: &str) -> Result<String, String> {
    if path.is_empty() {
        return Err("empty path: give a file path in the sandbox".into());
    }
    if path.contains('\0') {
        return Err("a path cannot contain NUL bytes".into());
    }
    if path.len() > 4096 {
        return Err("path longer than 4096 bytes".into());
    }
    let full = if path.starts_with('/') {
        path.to_owned()
    } else if let Some(rest) = path.strip_prefix("~/") {
        format!("{HOME}/{rest}")
    } else if path == "~" {
        HOME.to_owned()
    } else {
        format!("{HOME}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in full.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!(
                        "path {path:?} climbs above the root of the sandbox's filesystem"
                    ));
                }
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_absolute_and_may_not_climb_out() {
        assert_eq!(guest_path("a.txt").unwrap(), "/home/user/a.txt");
        assert_eq!(guest_path("~/x/../y").unwrap(), "/home/user/y");
        assert_eq!(guest_path("/tmp/./a//b/").unwrap(), "/tmp/a/b");
        assert_eq!(guest_path("/").unwrap(), "/");
        assert_eq!(guest_path("../../etc/passwd").unwrap(), "/etc/passwd");
        assert!(guest_path("/../etc/passwd").is_err());
        assert!(guest_path("../../../etc").is_err());
        assert!(guest_path("").is_err());
        assert!(guest_path("a\0b").is_err());
    }

    #[test]
    fn rpc_users_come_from_basic_auth() {
        let mut h = HeaderMap::new();
        assert_eq!(rpc_user(&h).unwrap(), None);
        h.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        assert_eq!(rpc_user(&h).unwrap().as_deref(), Some("user"));
        h.insert("authorization", "Basic cm9vdDo=".parse().unwrap());
        assert_eq!(rpc_user(&h).unwrap().as_deref(), Some("root"));
        h.insert("authorization", "Bearer x".parse().unwrap());
        assert!(rpc_user(&h).is_err());
        assert!(check_user("-rf").is_err());
        assert!(check_user("a b").is_err());
    }
}
