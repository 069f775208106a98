//! Errors at the HTTP edge, answered as `application/problem+json` (RFC 9457).
//!
//! Handlers return [`ApiError`]; it maps to a status, a stable `type` URI, a title and a
//! detail written for the caller. Causes (database errors, broker errors) are logged with
//! their chain and never reach the body, and no body ever carries record data. The
//! [`problem_fallback`] middleware turns every other error response (unknown route, wrong
//! method, body too large, timeout) into the same shape.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bulkops_shared::filter::FieldError;
use serde::Serialize;
use utoipa::ToSchema;

/// Content type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// A URI identifying the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// HTTP status code.
    pub status: u16,
    /// What went wrong in this request.
    pub detail: String,
    /// For invalid input: each rejected field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
}

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or names something that does not exist.
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// 401: no valid token for an active user of the token's agency.
    #[error("unauthorized: {0}")]
    Unauthorized(&'static str),
    /// 403: the user may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// 404: nothing with that id in the caller's agency.
    #[error("not found")]
    NotFound(&'static str),
    /// 410: what was asked for existed and was removed for good (pruned items).
    #[error("gone: {0}")]
    Gone(String),
    /// 409: the request conflicts with the current state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 413: the body is larger than `http.body_limit_bytes`.
    #[error("payload too large")]
    PayloadTooLarge,
    /// 415: the body is not JSON.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 422: understood but cannot be done.
    #[error("unprocessable: {0}")]
    Unprocessable(String),
    /// 429: the agency's quota of items in flight has no room for this request.
    #[error("quota exceeded")]
    QuotaExceeded(crate::quota::Refusal),
    /// 503: a dependency is down; try again.
    #[error("unavailable: {0}")]
    Unavailable(#[source] anyhow::Error),
    /// 500: a bug or an unexpected failure.
    #[error("internal: {0}")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    /// A 400 naming one field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldError::new(field, message)])
    }

    /// Database errors: transient ones are 503 (retry), others 500.
    pub fn db(err: sea_orm::DbErr) -> Self {
        if bulkops_shared::db::is_transient(&err) {
            Self::Unavailable(err.into())
        } else {
            Self::Internal(err.into())
        }
    }

    /// The problem document for this error.
    pub fn problem(&self) -> Problem {
        let (status, slug, title, detail, errors) = match self {
            Self::Invalid(errors) => (
                StatusCode::BAD_REQUEST,
                "invalid-request",
                "Invalid request",
                match errors.as_slice() {
                    [one] => format!("{}: {}", one.field, one.message),
                    _ => format!("{} fields are invalid", errors.len()),
                },
                Some(errors.clone()),
            ),
            Self::Unauthorized(why) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                (*why).to_owned(),
                None,
            ),
            Self::Forbidden(why) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "Forbidden",
                why.clone(),
                None,
            ),
            Self::NotFound(what) => (
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!("no such {what} in your agency"),
                None,
            ),
            Self::Conflict(why) => (
                StatusCode::CONFLICT,
                "conflict",
                "Conflict",
                why.clone(),
                None,
            ),
            Self::Gone(why) => (StatusCode::GONE, "gone", "Gone", why.clone(), None),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                "the request body is too large".to_owned(),
                None,
            ),
            Self::UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "Unsupported media type",
                "send the body as application/json".to_owned(),
                None,
            ),
            Self::Unprocessable(why) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "unprocessable",
                "Cannot be processed",
                why.clone(),
                None,
            ),
            Self::QuotaExceeded(r) => (
                StatusCode::TOO_MANY_REQUESTS,
                "quota-exceeded",
                "Too many items in flight",
                quota_detail(r),
                None,
            ),
            Self::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                "a dependency is unavailable; retry shortly".to_owned(),
                None,
            ),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the request failed unexpectedly; it has been logged".to_owned(),
                None,
            ),
        };
        Problem {
            kind: format!("https://bulkops.dev/problems/{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail,
            errors,
        }
    }
}

/// The 429's detail: how many items are in flight, what the request adds, the limit.
fn quota_detail(r: &crate::quota::Refusal) -> String {
    let limit = i64::try_from(r.limit).unwrap_or(i64::MAX);
    let adds = if r.requested_exact {
        format!("{}", r.requested)
    } else {
        format!("at least {}", r.requested)
    };
    if r.requested > limit {
        format!(
            "this request would add {adds} undecided items: more than your agency's limit of {} items in flight on its own; split it into smaller requests (your agency has {} in flight now)",
            r.limit, r.in_flight
        )
    } else {
        format!(
            "your agency has {} undecided items in flight and this request would add {adds}; the limit is {}. Retry after {} s, when enough of them are done",
            r.in_flight, r.limit, r.retry_after_secs
        )
    }
}

/// Renders a problem document with its status.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).unwrap_or_default();
    let mut response = (status, Body::from(body)).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            Self::Internal(e) => tracing::error!(error = format!("{e:#}"), "request failed"),
            Self::Unavailable(e) => {
                tracing::warn!(error = format!("{e:#}"), "dependency unavailable")
            }
            _ => {}
        }
        let mut response = problem_response(&self.problem());
        if matches!(self, Self::Unauthorized(_)) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Self::QuotaExceeded(r) = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(r.retry_after_secs));
        }
        response
    }
}

/// Middleware: any error response that is not already JSON (axum's own 404, 405, 413, a
/// timeout's 503, a panic's 500) is replaced by a problem document with the same status, so
/// clients and the OpenAPI document see one error shape.
pub async fn problem_fallback(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    // Problem documents, and deliberate JSON answers such as /readyz's 503, pass as they are.
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            v.as_bytes().starts_with(PROBLEM_JSON.as_bytes())
                || v.as_bytes().starts_with(b"application/json")
        });
    // The operator console answers its errors as HTML pages of its own.
    let is_html = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/html"));
    if is_json || is_html {
        return response;
    }
    let (slug, detail) = match status {
        StatusCode::NOT_FOUND => ("not-found", "no such resource"),
        StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "this method is not allowed here"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload-too-large", "the request body is too large"),
        StatusCode::REQUEST_TIMEOUT | StatusCode::SERVICE_UNAVAILABLE => {
            ("unavailable", "the request took too long; retry shortly")
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported-media-type",
            "send the body as application/json",
        ),
        s if s.is_server_error() => (
            "internal",
            "the request failed unexpectedly; it has been logged",
        ),
        _ => ("invalid-request", "the request could not be understood"),
    };
    let mut problem = problem_response(&Problem {
        kind: format!("https://bulkops.dev/problems/{slug}"),
        title: status.canonical_reason().unwrap_or("Error").to_owned(),
        status: status.as_u16(),
        detail: detail.to_owned(),
        errors: None,
    });
    for (name, value) in response.headers() {
        if name == header::ALLOW || name == header::WWW_AUTHENTICATE || name == header::RETRY_AFTER
        {
            problem.headers_mut().insert(name.clone(), value.clone());
        }
    }
    problem
}
