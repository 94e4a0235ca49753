//! The web console, on the HTTP port: notebooks (Markdown with live ```sql blocks) and the
//! pipelines page. The page and its scripts are embedded in the binary (`server/console/`,
//! plain ES modules and uPlot: no build step).
//!
//! Who may do what is the SQL port's business: the same users, privileges, failed-login
//! limit and `weir_logins_total`. A login gives a session cookie (`HttpOnly`,
//! `SameSite=Strict`); every request that changes something (login, logout, running SQL,
//! saving a notebook) must carry the `X-Weir-CSRF` header with the session's token, which
//! only a page of this origin can read, and an `Origin`, when the browser sends one, naming
//! this host. Under `--auth trust` anyone who reaches the port is an admin, as on the SQL
//! port.

mod notebooks;
mod pipelines;
mod run;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;

use crate::engine::{Caller, Engine};
use crate::pg::auth::{Auth, AuthMode, PasswordCheck};
use crate::users::fill_random;

use notebooks::Notebooks;
pub use notebooks::sql_blocks;

/// The session cookie's name.
const COOKIE: &str = "weir_session";
/// The header a changing request carries the session's CSRF token in.
const CSRF_HEADER: &str = "x-weir-csrf";
/// How long a session lasts after its login.
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most; the oldest go first (a flood of logins cannot grow memory).
const MAX_SESSIONS: usize = 10_000;

/// What the console's handlers share.
pub struct Console {
    engine: Arc<Engine>,
    auth: Arc<Auth>,
    notebooks: Notebooks,
    sessions: Mutex<HashMap<String, Session>>,
}

#[derive(Clone, Debug)]
struct Session {
    /// `None` under `--auth trust`.
    user: Option<String>,
    csrf: String,
    expires: Instant,
}

impl Session {
    fn caller(&self) -> Caller<'_> {
        self.user.as_deref().map_or(Caller::Trusted, Caller::User)
    }
}

impl Console {
    pub fn new(engine: Arc<Engine>, auth: Arc<Auth>, notebooks: PathBuf) -> Self {
        Self {
            engine,
            auth,
            notebooks: Notebooks::new(notebooks),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The console's routes: `/`, `/assets/*` and `/api/*`.
    pub fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/", get(index))
            .route("/assets/{file}", get(asset))
            .route("/api/session", get(session_info).post(login).delete(logout))
            .route("/api/pipelines", get(pipelines::pipelines))
            .route("/api/notebooks", get(notebooks::list))
            .route(
                "/api/notebooks/{*name}",
                get(notebooks::read).put(notebooks::write),
            )
            .route("/api/run", post(run::run))
            .with_state(self)
    }

    /// A new session for `user`, and its token.
    fn open_session(&self, user: Option<String>) -> Result<(String, Session), ApiError> {
        let session = Session {
            user,
            csrf: random_token()?,
            expires: Instant::now() + SESSION_TTL,
        };
        let token = random_token()?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires > Instant::now());
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(t, _)| t.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(token.clone(), session.clone());
        Ok((token, session))
    }

    /// The request's session, if its cookie names a live one.
    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let token = cookie(headers, COOKIE)?;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(token)
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    /// The session of a reading request; 401 without one.
    fn reader(&self, headers: &HeaderMap) -> Result<Session, ApiError> {
        self.session(headers).ok_or(ApiError::LoginRequired)
    }

    /// The session of a changing request: also its CSRF token and origin.
    fn writer(&self, headers: &HeaderMap) -> Result<Session, ApiError> {
        let session = self.reader(headers)?;
        check_origin(headers)?;
        let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if sent != Some(session.csrf.as_str()) {
            return Err(ApiError::Csrf);
        }
        Ok(session)
    }

    fn session_json(&self, session: &Session) -> serde_json::Value {
        serde_json::json!({
            "user": session.user,
            "csrf": session.csrf,
            "admin": self.auth.is_admin(session.user.as_deref()),
            "auth": match self.auth.mode {
                AuthMode::Trust => "trust",
                AuthMode::Scram => "scram",
            },
        })
    }
}

/// An API failure, answered as `{"error": ...}` with its status.
#[derive(Debug)]
enum ApiError {
    LoginRequired,
    Csrf,
    Forbidden(String),
    BadRequest(String),
    NotFound(String),
    Conflict(String),
    TooManyLogins(Duration),
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::LoginRequired => (StatusCode::UNAUTHORIZED, "log in first".to_string()),
            ApiError::Csrf => (
                StatusCode::FORBIDDEN,
                "missing or wrong X-Weir-CSRF header, or a foreign Origin".to_string(),
            ),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::TooManyLogins(wait) => (
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many failed logins from this address; try again in {} s",
                    wait.as_secs().max(1)
                ),
            ),
            ApiError::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        json_response(status, &serde_json::json!({ "error": message }))
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body.to_string(),
    )
        .into_response()
}

fn random_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    fill_random(&mut bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(BASE64URL.encode(bytes))
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// A browser names the page that sent a request in `Origin`: it must be this host.
fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin = origin.to_str().ok();
    let same = match (origin, host) {
        (Some(origin), Some(host)) => {
            origin
                .strip_prefix("http://")
                .or(origin.strip_prefix("https://"))
                == Some(host)
        }
        _ => false,
    };
    if same { Ok(()) } else { Err(ApiError::Csrf) }
}

fn parse_json(body: &Bytes) -> Result<serde_json::Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("not JSON: {e}")))
}

/// `GET /api/session`: who is logged in. Under `--auth trust` a session is opened on the
/// first request, as the SQL port lets everyone in.
async fn session_info(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Some(session) = console.session(&headers) {
        return json_response(StatusCode::OK, &console.session_json(&session));
    }
    if console.auth.mode == AuthMode::Trust {
        return match console.open_session(None) {
            Ok((token, session)) => with_cookie(
                json_response(StatusCode::OK, &console.session_json(&session)),
                &token,
                SESSION_TTL,
            ),
            Err(e) => e.into_response(),
        };
    }
    ApiError::LoginRequired.into_response()
}

/// `POST /api/session` `{"user", "password"}`: logs in.
async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = async {
        // No session yet, so no token to check: a custom header still cannot be sent by
        // another site's page without this server's (never given) CORS consent.
        check_origin(&headers)?;
        if !headers.contains_key(CSRF_HEADER) {
            return Err(ApiError::Csrf);
        }
        let body = parse_json(&body)?;
        let user = body["user"].as_str().unwrap_or_default().to_string();
        let password = body["password"].as_str().unwrap_or_default().to_string();
        let user = match console.auth.mode {
            AuthMode::Trust => None,
            AuthMode::Scram => {
                let auth = console.auth.clone();
                let name = user.clone();
                // PBKDF2 takes milliseconds: off the async workers.
                let check = tokio::task::spawn_blocking(move || {
                    auth.check_password(peer.ip(), &name, &password)
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
                match check {
                    PasswordCheck::Ok => Some(user),
                    PasswordCheck::Wrong => {
                        return Err(ApiError::Forbidden(
                            "wrong user name or password".to_string(),
                        ));
                    }
                    PasswordCheck::RateLimited(wait) => return Err(ApiError::TooManyLogins(wait)),
                }
            }
        };
        let (token, session) = console.open_session(user)?;
        Ok(with_cookie(
            json_response(StatusCode::OK, &console.session_json(&session)),
            &token,
            SESSION_TTL,
        ))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /api/session`: logs out.
async fn logout(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(e) = console.writer(&headers) {
        return e.into_response();
    }
    if let Some(token) = cookie(&headers, COOKIE) {
        console
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(token);
    }
    with_cookie(
        json_response(StatusCode::OK, &serde_json::json!({})),
        "",
        Duration::ZERO,
    )
}

fn with_cookie(mut response: Response, token: &str, ttl: Duration) -> Response {
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        ttl.as_secs()
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The embedded page and scripts: (name, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/console.js"),
    ),
    (
        "notebook.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/notebook.js"),
    ),
    (
        "pipelines.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/pipelines.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/console.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../console/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../../console/vendor/uPlot.min.css"),
    ),
];

/// What a page of the console may load and do: its own scripts, styles and API only.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_bytes!("../../console/index.html").as_slice(),
    )
        .into_response()
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, ..)| *name == file) {
        Some((_, content_type, bytes)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *bytes,
        )
            .into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}
