//! The console's stylesheet and script, vendored in the repository (`ui/static/`) and
//! compiled into the binary: nothing is fetched from a CDN, nothing is built with a
//! network, and the console works offline. URLs carry the version, so they are cached
//! for a day.

use axum::extract::Path;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::UiError;

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

/// `GET /ui/static/{file}`.
pub async fn serve(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "console.css" => (CSS, "text/css; charset=utf-8"),
        "console.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return UiError::NotFound("file").into_response(),
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400"),
    );
    response
}
