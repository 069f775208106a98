//! The operator console, served under `/ui` when `ui.enabled` is set: server-rendered HTML
//! pages that answer "why is this batch slow, and where are its failures?" without SQL.
//!
//! Every read page works without JavaScript (a `<noscript>` refresh keeps live pages
//! current); the one small script, vendored in [`assets`], adds live progress over
//! server-sent events and refreshes the overview in place. Pages show ids, statuses,
//! reasons and counts, never record data.
//!
//! Who sees what ([`session`]): an operator (an HS256 token signed with
//! `auth.operator_jwt_secret`, claim `role: "operator"`) sees every agency, the system's
//! queues, workers, outbox and dead letters, and may replay dead letters; a CRM user (the
//! API's token) sees only the batches of their agency, and another agency's batch is "not
//! found", as in the API. The token is pasted once into `/ui/login` and kept in an
//! `HttpOnly`, `SameSite=Strict` cookie; every form that changes something carries a CSRF
//! token derived from the session.
//!
//! # Layout
//! - [`session`]: sign-in, the session cookie, who is looking, CSRF tokens.
//! - [`views`]: the page layout and the pieces pages are made of (progress, tables, chart).
//! - [`overview`], [`batches`], [`batch`]: the pages.
//! - [`live`]: a batch's progress as server-sent events; rate and ETA.
//! - [`replay`]: the dead-letter replay (confirmation page, then POST).
//! - [`system`]: queue depths, workers' readiness, outbox lag.
//! - [`sampler`]: the throughput history several producers write between them.
//! - [`assets`]: the vendored stylesheet and script.

pub mod assets;
pub mod batch;
pub mod batches;
pub mod live;
pub mod overview;
pub mod replay;
pub mod sampler;
pub mod session;
pub mod system;
pub mod views;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use bulkops_shared::amqp::{AmqpLink, Publisher};
use bulkops_shared::config::{CookieSecure, Settings};
use jsonwebtoken::DecodingKey;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use crate::problem::ApiError;
use crate::state::AppState;

/// Dead letters read at most per page view or replay: the queue is read one message at a
/// time, so a page stays quick; `bulkops dlq` reads all of it.
pub const DLQ_SCAN_LIMIT: u32 = 2000;

/// What the console needs beside the API's state.
pub struct Console {
    /// Verifies operators' tokens (`auth.operator_jwt_secret`).
    pub operator_key: DecodingKey,
    /// Derives CSRF tokens; the same on every producer of a deployment.
    pub csrf_key: [u8; 32],
    /// When the session cookie is `Secure`.
    pub cookie_secure: CookieSecure,
    /// The console's own broker connection (reading dead letters, replaying them), apart
    /// from the splitter's and the relay's.
    pub link: Arc<AmqpLink>,
    /// Publishes replayed messages on [`Console::link`].
    pub publisher: Publisher,
    /// Ends live streams at shutdown.
    pub shutdown: CancellationToken,
}

impl Console {
    /// The console of a configuration with `ui.enabled`.
    ///
    /// # Errors
    /// Without `auth.operator_jwt_secret`, or with a bad AMQP URL.
    pub fn new(settings: &Settings, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let secret = settings
            .auth
            .operator_jwt_secret
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("ui.enabled needs auth.operator_jwt_secret"))?
            .expose_secret()
            .as_bytes()
            .to_vec();
        let link = Arc::new(AmqpLink::new(&settings.amqp, "bulkops-producer-console")?);
        Ok(Self {
            operator_key: DecodingKey::from_secret(&secret),
            csrf_key: session::derive_csrf_key(&secret),
            cookie_secure: settings.ui.cookie_secure,
            publisher: Publisher::new(link.clone(), settings.amqp.confirm_window),
            link,
            shutdown,
        })
    }
}

/// The console's routes, to be nested under `/ui`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(overview::page))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", axum::routing::post(session::logout))
        .route("/batches", get(batches::page))
        .route("/batches/{id}", get(batch::page))
        .route("/batches/{id}/live", get(live::stream))
        .route("/batches/{id}/items.csv", get(batch::csv))
        .route(
            "/batches/{id}/replay",
            get(replay::confirm).post(replay::replay),
        )
        .route("/static/{file}", get(assets::serve))
        .fallback(|| async { UiError::NotFound("page").into_response() })
        .layer(middleware::from_fn(guard))
}

/// Security headers on every console answer, and no cross-site form posts: a browser
/// says `Sec-Fetch-Site: cross-site` for a form another site made it submit (the
/// `SameSite=Strict` cookie would not be sent either; this refuses even the login).
async fn guard(request: Request, next: Next) -> Response {
    let cross_site = request
        .headers()
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"));
    let mut response = if cross_site && request.method() == axum::http::Method::POST {
        UiError::Forbidden("cross-site form posts are refused".into()).into_response()
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// How a console page fails: an HTML page with the status, never a cause's text.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 403.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404 (another agency's batch too).
    #[error("no such {0}")]
    NotFound(&'static str),
    /// 410: the batch's items were pruned.
    #[error("gone: {0}")]
    Gone(String),
    /// 503: a dependency is down.
    #[error("unavailable: {0}")]
    Unavailable(#[source] anyhow::Error),
    /// 500.
    #[error("internal: {0}")]
    Internal(#[source] anyhow::Error),
}

impl UiError {
    /// Database errors: transient ones are 503, others 500.
    pub fn db(err: sea_orm::DbErr) -> Self {
        if bulkops_shared::db::is_transient(&err) {
            Self::Unavailable(err.into())
        } else {
            Self::Internal(err.into())
        }
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::NotFound(what) => Self::NotFound(what),
            ApiError::Forbidden(why) => Self::Forbidden(why),
            ApiError::Gone(why) => Self::Gone(why),
            ApiError::Unavailable(e) => Self::Unavailable(e),
            ApiError::Internal(e) => Self::Internal(e),
            other => Self::BadRequest(other.problem().detail),
        }
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let (status, title, detail) = match &self {
            Self::BadRequest(why) => (StatusCode::BAD_REQUEST, "Bad request", why.clone()),
            Self::Forbidden(why) => (StatusCode::FORBIDDEN, "Forbidden", why.clone()),
            Self::Gone(why) => (StatusCode::GONE, "Gone", why.clone()),
            Self::NotFound(what) => (
                StatusCode::NOT_FOUND,
                "Not found",
                format!("No such {what}."),
            ),
            Self::Unavailable(e) => {
                tracing::warn!(error = format!("{e:#}"), "console: dependency unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unavailable",
                    "A dependency is unavailable; retry shortly.".to_owned(),
                )
            }
            Self::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "console page failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Internal error",
                    "The page failed unexpectedly; it has been logged.".to_owned(),
                )
            }
        };
        (
            status,
            Html(views::error_page(status.as_u16(), title, &detail).into_string()),
        )
            .into_response()
    }
}
