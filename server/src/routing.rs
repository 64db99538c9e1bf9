//! One listener, two planes: a request naming a sandbox (the SDK's
//! `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers, or a `Host` of the form
//! `{port}-{id}.{domain}`) goes to that sandbox's port; anything else to
//! the control plane.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::state::{AppState, Live};
use crate::{api, envd, interpreter, proxy};

/// envd's port: files, processes, the filesystem.
pub const ENVD_PORT: u16 = 49983;
/// The code interpreter's port.
pub const INTERPRETER_PORT: u16 = 49999;

#[derive(Clone)]
struct Planes {
    st: Arc<AppState>,
    control: Router,
    envd: Router,
    interpreter: Router,
}

pub fn app(st: Arc<AppState>) -> Router {
    let planes = Planes {
        control: api::router().with_state(st.clone()),
        envd: envd::router().with_state(st.clone()),
        interpreter: interpreter::router().with_state(st.clone()),
        st,
    };
    Router::new().fallback(dispatch).with_state(planes)
}

/// Where a request is going.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Control,
    Sandbox {
        id: String,
        port: u16,
    },
    /// Names a sandbox, badly.
    Invalid(String),
}

fn target(headers: &HeaderMap, domain: &str) -> Target {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
    if let Some(id) = header("e2b-sandbox-id") {
        let port = match header("e2b-sandbox-port") {
            None => ENVD_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Target::Invalid(format!("E2b-Sandbox-Port {p:?} is not a port")),
            },
        };
        return Target::Sandbox {
            id: id.to_owned(),
            port,
        };
    }
    // `{port}-{id}.{domain}`: the SDK's get_host(port).
    if let Some(host) = header("host") {
        if let Some(label) = host.strip_suffix(domain).and_then(|h| h.strip_suffix('.')) {
            if let Some((port, id)) = label.split_once('-') {
                return match port.parse::<u16>() {
                    Ok(p) if p != 0 => Target::Sandbox {
                        id: id.to_owned(),
                        port: p,
                    },
                    _ => Target::Invalid(format!("host {host:?}: {port:?} is not a port")),
                };
            }
        }
    }
    Target::Control
}

async fn dispatch(State(planes): State<Planes>, req: Request) -> Response {
    match target(req.headers(), &planes.st.domain) {
        Target::Control => oneshot(planes.control, req).await,
        Target::Invalid(why) => ApiError::bad_request(why).into_response(),
        Target::Sandbox { id, port } => {
            let live = match sandbox_for(&planes.st, &id, port, req.headers()).await {
                Ok(live) => live,
                Err(e) => return e.into_response(),
            };
            let mut req = req;
            req.extensions_mut().insert(live.clone());
            match port {
                ENVD_PORT => oneshot(planes.envd, req).await,
                INTERPRETER_PORT => oneshot(planes.interpreter, req).await,
                _ => proxy::forward(live, port, req).await,
            }
        }
    }
}

async fn oneshot(router: Router, req: Request) -> Response {
    match router.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// The running sandbox a data-plane request may use: it must run here and
/// the request must carry its token (`X-Access-Token` for envd,
/// `E2B-Traffic-Access-Token` or `X-Access-Token` for other ports).
async fn sandbox_for(
    st: &AppState,
    id: &str,
    port: u16,
    headers: &HeaderMap,
) -> Result<Arc<Live>, ApiError> {
    let unknown = || {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("sandbox {id:?} was not found running: it is paused (connect to resume it), was killed, or never existed"),
        )
    };
    let live = st.running(id).ok_or_else(unknown)?;
    let given = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let ok = given("x-access-token") == Some(live.token.as_str())
        || (port != ENVD_PORT
            && given("e2b-traffic-access-token") == Some(live.traffic_token.as_str()));
    if !ok {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("missing or wrong access token for sandbox {id}: send the envdAccessToken of its create or connect answer in X-Access-Token"),
        ));
    }
    if let Err(e) = live.sandbox.check() {
        log::debug!("sandbox {id}: handle spent: {e}");
        st.remove_if(id, &live);
        return Err(unknown());
    }
    Ok(live)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn requests_are_routed_by_header_then_host() {
        let id = "0123456789abcdef0123";
        let d = "localhost:3000";
        assert_eq!(
            target(&headers(&[("host", "localhost:3000")]), d),
            Target::Control
        );
        assert_eq!(
            target(
                &headers(&[("e2b-sandbox-id", id), ("e2b-sandbox-port", "49999")]),
                d
            ),
            Target::Sandbox {
                id: id.into(),
                port: 49999
            }
        );
        assert_eq!(
            target(&headers(&[("e2b-sandbox-id", id)]), d),
            Target::Sandbox {
                id: id.into(),
                port: ENVD_PORT
            }
        );
        assert_eq!(
            target(
                &headers(&[("host", &format!("8000-{id}.localhost:3000"))]),
                d
            ),
            Target::Sandbox {
                id: id.into(),
                port: 8000
            }
        );
        assert!(matches!(
            target(
                &headers(&[("e2b-sandbox-id", id), ("e2b-sandbox-port", "0")]),
                d
            ),
            Target::Invalid(_)
        ));
        assert!(matches!(
            target(
                &headers(&[("host", &format!("http-{id}.localhost:3000"))]),
                d
            ),
            Target::Invalid(_)
        ));
        assert_eq!(
            target(&headers(&[("host", "evil.example")]), d),
            Target::Control
        );
    }
}
