//! The web console (`--console-listen`): a single-page application served by every master over
//! HTTPS, and the JSON API it calls.
//!
//! - TLS: the master's own certificate (from the cluster CA; import `ca.crt` into the browser, or
//!   accept it once). A client certificate is optional: one from the cluster CA (an admin's or a
//!   user's, the same as the CLI's) logs in by itself; without one, the console asks for a token
//!   an admin issued (`berth console token create`), kept in an HttpOnly, Secure, SameSite=Strict
//!   cookie.
//! - Every API call is made in-process through the same gRPC service handlers the CLI reaches,
//!   with the logged-in identity as the caller: the same authorization, audit records,
//!   forwarding to the leader and errors.
//! - A change (POST) must carry the `X-Berth-Console` header, which a cross-site form or image
//!   cannot send, so another site cannot make a logged-in browser act.
//! - The assets (HTML, JavaScript, CSS) are built into the binary; the page loads nothing from
//!   elsewhere (its Content-Security-Policy allows only this origin).

mod api;
pub(crate) mod tokens;

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use berth_pki::{CertInfo, Role};
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::{debug, info, warn};

use crate::{authz::Caller, node::Ctx};

/// The cookie that carries a console token.
const COOKIE: &str = "berth_console";
/// The header every change must carry.
const CHANGE_HEADER: &str = "x-berth-console";

/// Who a request is from, once authenticated.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pub caller: Caller,
    /// "certificate" or "token".
    pub via: &'static str,
    /// When the token expires (ms since the epoch); None for a certificate.
    pub expires_ms: Option<i64>,
}

/// The client certificate of the connection a request came on, if it presented one.
#[derive(Clone, Debug)]
struct PeerCert(Option<CertInfo>);

#[derive(Clone)]
struct Console {
    ctx: Arc<Ctx>,
}

/// An error as the console's JavaScript reads it: `{"error": "..."}` with a fitting status.
pub(crate) struct ApiError(StatusCode, String);

impl ApiError {
    pub(crate) fn new(code: StatusCode, msg: impl Into<String>) -> ApiError {
        ApiError(code, msg.into())
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> ApiError {
        use tonic::Code;
        let code = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable | Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, s.message().to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(serde_json::json!({ "error": self.1 }))).into_response();
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

/// The console's address, checked before the master starts anything else.
pub(crate) async fn bind(addr: &str) -> Result<tokio::net::TcpListener, String> {
    berth_metrics::bind(addr, "--console-listen").await
}

fn router(console: Console) -> Router {
    let api = Router::new()
        .route("/whoami", get(api::whoami))
        .route("/logout", post(api::logout))
        .route("/cluster", get(api::cluster))
        .route("/nodes", get(api::nodes))
        .route("/nodes/{node}/availability", post(api::node_availability))
        .route("/services", get(api::services))
        .route("/services/{ns}/{name}", get(api::service))
        .route("/services/{ns}/{name}/scale", post(api::scale))
        .route("/services/{ns}/{name}/rollout", post(api::rollout))
        .route("/events", get(api::events))
        .route("/tasks/{id}/logs", get(api::logs))
        .route_layer(middleware::from_fn_with_state(console.clone(), authenticate))
        // Logging in needs no session, only the header every change carries.
        .route("/login", post(api::login))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such console API") })
        .layer(middleware::from_fn(require_change_header));
    Router::new()
        .route("/", get(|| asset("index.html")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/app.css", get(|| asset("app.css")))
        .nest("/api", api)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: the console lives at /\n") })
        .layer(middleware::from_fn(security_headers))
        .with_state(console)
}

/// The built-in assets.
async fn asset(name: &str) -> Response {
    let (body, mime): (&'static str, &str) = match name {
        "index.html" => (include_str!("assets/index.html"), "text/html; charset=utf-8"),
        "app.js" => (include_str!("assets/app.js"), "text/javascript; charset=utf-8"),
        "app.css" => (include_str!("assets/app.css"), "text/css; charset=utf-8"),
        _ => return (StatusCode::NOT_FOUND, "not found").into_response(),
    };
    ([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    r
}

/// A change without the console's header is refused: a page of another site can make a
/// browser post a form or load an image, never set a header without the console's consent.
async fn require_change_header(req: Request, next: Next) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD && !req.headers().contains_key(CHANGE_HEADER) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "a change must carry the X-Berth-Console header (the console's own page sends it); refused as a \
             possible cross-site request",
        )
        .into_response();
    }
    next.run(req).await
}

/// The token in the request's cookie, if any.
fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Who may use the console by certificate: admins and users (agents and masters have no
/// business in a browser).
fn certificate_session(ctx: &Ctx, info: &CertInfo) -> Result<Session, ApiError> {
    if !matches!(info.identity.role, Role::Admin | Role::User) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("certificate {} may not use the console: use an admin's or a user's", info.identity),
        ));
    }
    ctx.revoked
        .check(info)
        .map_err(|e| ApiError::new(StatusCode::FORBIDDEN, format!("{e}: ask an admin for a new certificate")))?;
    Ok(Session { caller: Caller { identity: info.identity.clone() }, via: "certificate", expires_ms: None })
}

fn token_session(ctx: &Ctx, token: &str) -> Result<Session, ApiError> {
    let (identity, rec) =
        tokens::authenticate(ctx, token).map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()))?;
    Ok(Session { caller: Caller { identity }, via: "token", expires_ms: Some(rec.expires_ms) })
}

/// The session of a request: its connection's certificate, else its cookie's token.
fn session_of(ctx: &Ctx, req: &Request) -> Result<Session, ApiError> {
    if let Some(PeerCert(Some(info))) = req.extensions().get::<PeerCert>() {
        return certificate_session(ctx, info);
    }
    match cookie_token(req.headers()) {
        Some(t) => token_session(ctx, &t),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "not logged in: present a client certificate from the cluster CA, or log in with a console token \
             (`berth console token create`)",
        )),
    }
}

async fn authenticate(State(c): State<Console>, mut req: Request, next: Next) -> Response {
    match session_of(&c.ctx, &req) {
        Ok(s) => {
            req.extensions_mut().insert(s);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// The cookie that logs a browser in with `token` until `expires_ms`.
fn login_cookie(token: &str, expires_ms: i64) -> HeaderValue {
    let max_age = ((expires_ms - crate::objects::now_ms()) / 1000).max(0);
    HeaderValue::from_str(&format!("{COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"))
        .expect("a console token is a valid header value")
}

fn logout_cookie() -> HeaderValue {
    HeaderValue::from_str(&format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict"))
        .expect("a constant header value")
}

/// Serves the console on `listener` until `token` fires.
pub(crate) async fn serve(ctx: Arc<Ctx>, listener: tokio::net::TcpListener, token: CancellationToken) {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!("web console on https://{addr}/");
    let app = router(Console { ctx: ctx.clone() });
    while let Some((tcp, peer)) = crate::tls::accept(&listener, &token).await {
        let config = match ctx.pki.console_server_config() {
            Ok(c) => c,
            Err(e) => {
                warn!("console: no TLS configuration: {e}");
                continue;
            }
        };
        let app = app.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, "console: TLS handshake failed: {e}"),
                Err(_) => return debug!(%peer, "console: no TLS handshake within 10s"),
            };
            let cert = PeerCert(
                tls.get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| berth_pki::cert_info_of_der(c.as_ref()).ok()),
            );
            let svc = hyper::service::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(cert.clone());
                let mut app = app.clone();
                async move { app.call(req.map(Body::new)).await }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
            tokio::select! {
                r = conn => if let Err(e) = r { debug!(%peer, "console: connection ended: {e}") },
                _ = token.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_found_among_other_cookies() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("theme=dark; berth_console=BERTHC-1-abc.def"));
        assert_eq!(cookie_token(&h).as_deref(), Some("BERTHC-1-abc.def"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("theme=dark"));
        h.append(header::COOKIE, HeaderValue::from_static("berth_consolex=no; berth_console=yes"));
        assert_eq!(cookie_token(&h).as_deref(), Some("yes"));
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_errors_keep_their_message_under_a_fitting_http_status() {
        for (status, code) in [
            (tonic::Status::invalid_argument("x"), StatusCode::BAD_REQUEST),
            (tonic::Status::permission_denied("x"), StatusCode::FORBIDDEN),
            (tonic::Status::not_found("x"), StatusCode::NOT_FOUND),
            (tonic::Status::failed_precondition("x"), StatusCode::CONFLICT),
            (tonic::Status::unavailable("x"), StatusCode::SERVICE_UNAVAILABLE),
            (tonic::Status::internal("x"), StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let e = ApiError::from(status);
            assert_eq!((e.0, e.1.as_str()), (code, "x"));
        }
    }

    #[test]
    fn the_login_cookie_is_http_only_secure_and_same_site() {
        let c = login_cookie("BERTHC-1-abc.def", crate::objects::now_ms() + 3_600_000);
        let c = c.to_str().unwrap();
        for part in ["berth_console=BERTHC-1-abc.def", "HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(c.contains(part), "{c}");
        }
        let max_age: i64 = c.split("Max-Age=").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
        assert!((3590..=3600).contains(&max_age), "{c}");
    }
}
