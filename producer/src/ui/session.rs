//! Who is looking at the console: signing in by pasting a token, the session cookie, and
//! CSRF tokens.
//!
//! The session is the token itself, kept in the `bulkops_ui` cookie (`HttpOnly`,
//! `SameSite=Strict`, `Path=/ui`, `Secure` over TLS, expiring with the token), and checked
//! again on every request: an operator token against `auth.operator_jwt_secret` and its
//! `role` claim, a CRM token as the API checks it (signature, expiry, an active user of
//! the token's agency). Nothing is stored on the server, so any producer behind the
//! Service answers any request, and a deactivated CRM user loses the console at once.
//! Logging out deletes the cookie; the token itself stays valid until it expires.
//!
//! CSRF: every form that changes something carries `HMAC(key, session token)`, which only
//! the server can compute; the login form carries `HMAC(key, nonce)` for a nonce in a
//! short-lived cookie. The key is derived from the operator secret, so every producer of a
//! deployment accepts every other's forms.

use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use bulkops_shared::config::CookieSecure;
use bulkops_shared::ids::AgencyId;
use bulkops_shared::permissions::OPERATOR_ROLE;
use hmac::{Hmac, Mac};
use jsonwebtoken::{Algorithm, Validation, decode};
use serde::Deserialize;
use sha2::Sha256;

use super::{Console, UiError, views};
use crate::auth::{Caller, caller_from_token};
use crate::problem::ApiError;
use crate::state::AppState;

/// The session cookie.
pub const SESSION_COOKIE: &str = "bulkops_ui";
/// The login form's nonce cookie.
const LOGIN_COOKIE: &str = "bulkops_ui_login";
/// Longest token accepted (a cookie holds about 4 KiB).
const MAX_TOKEN_LEN: usize = 3000;

type HmacSha256 = Hmac<Sha256>;

/// Who is signed in.
#[derive(Debug, Clone)]
pub enum Who {
    /// An operator: every agency, the system panels, replays.
    Operator {
        /// The token's `sub`.
        name: String,
    },
    /// A CRM user: their agency's batches only.
    Agency(Caller),
}

/// The signed-in viewer of a page, with the CSRF token of their session.
#[derive(Debug, Clone)]
pub struct Viewer {
    /// Who.
    pub who: Who,
    /// The CSRF token forms of this session carry.
    pub csrf: String,
}

impl Viewer {
    /// The agency every query is confined to; `None` for operators (every agency).
    pub fn scope(&self) -> Option<AgencyId> {
        match &self.who {
            Who::Operator { .. } => None,
            Who::Agency(c) => Some(c.agency_id),
        }
    }

    /// Whether this is an operator.
    pub fn is_operator(&self) -> bool {
        matches!(self.who, Who::Operator { .. })
    }

    /// How the page header names the viewer.
    pub fn label(&self) -> String {
        match &self.who {
            Who::Operator { name } => format!("operator {name}"),
            Who::Agency(c) => format!("user {} of agency {}", c.user_id, c.agency_id),
        }
    }

    /// Refuses anyone but an operator.
    ///
    /// # Errors
    /// [`UiError::Forbidden`].
    pub fn require_operator(&self) -> Result<(), UiError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(UiError::Forbidden(
                "only operators may do this (sign in with an operator token)".into(),
            ))
        }
    }

    /// Checks a submitted form's CSRF token.
    ///
    /// # Errors
    /// [`UiError::Forbidden`] when it is missing or wrong.
    pub fn check_csrf(
        &self,
        console: &Console,
        submitted: Option<&str>,
        token: &str,
    ) -> Result<(), UiError> {
        verify(&console.csrf_key, "session", token, submitted)
    }
}

/// The CSRF key of an operator secret.
pub fn derive_csrf_key(operator_secret: &[u8]) -> [u8; 32] {
    let mut mac = hmac_with(operator_secret);
    mac.update(b"bulkops-ui-csrf-v1");
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 keyed with `key`. HMAC takes keys of any length, so the fallback (a
/// zero key) is never used; it only spares a panic path.
fn hmac_with(key: &[u8]) -> HmacSha256 {
    HmacSha256::new_from_slice(key).unwrap_or_else(|_| HmacSha256::new(&Default::default()))
}

fn mac(key: &[u8; 32], purpose: &str, value: &str) -> HmacSha256 {
    let mut mac = hmac_with(key);
    mac.update(purpose.as_bytes());
    mac.update(&[0]);
    mac.update(value.as_bytes());
    mac
}

/// The CSRF token for `value` (a session token, or a login nonce).
pub fn csrf_token(key: &[u8; 32], purpose: &str, value: &str) -> String {
    hex::encode(mac(key, purpose, value).finalize().into_bytes())
}

fn verify(
    key: &[u8; 32],
    purpose: &str,
    value: &str,
    submitted: Option<&str>,
) -> Result<(), UiError> {
    let refused = || {
        UiError::Forbidden(
            "the form's CSRF token is missing or wrong: reload the page and submit it again".into(),
        )
    };
    let bytes = hex::decode(submitted.ok_or_else(refused)?.trim()).map_err(|_| refused())?;
    // Constant-time comparison.
    mac(key, purpose, value)
        .verify_slice(&bytes)
        .map_err(|_| refused())
}

#[derive(Debug, Deserialize)]
struct OperatorClaims {
    sub: String,
    exp: i64,
    #[serde(default)]
    role: Option<String>,
}

/// The expiry of a CRM token.
#[derive(Debug, Deserialize)]
struct Expiry {
    exp: i64,
}

fn hs256_validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.algorithms = vec![Algorithm::HS256];
    v.set_required_spec_claims(&["exp", "sub"]);
    v.validate_exp = true;
    v.leeway = 0;
    v
}

/// Why a token does not open the console.
#[derive(Debug)]
pub enum Refusal {
    /// Not a valid operator or CRM token (signature, expiry, user).
    Invalid(&'static str),
    /// The database could not be asked about the CRM user.
    Unavailable(UiError),
}

/// Who a token says is signing in, and when the token expires (seconds since the epoch).
///
/// # Errors
/// [`Refusal`] with a reason a person can act on.
pub async fn identify(
    state: &AppState,
    console: &Console,
    token: &str,
) -> Result<(Who, i64), Refusal> {
    match decode::<OperatorClaims>(token, &console.operator_key, &hs256_validation()) {
        Ok(t)
            if t.claims.role.as_deref() == Some(OPERATOR_ROLE)
                && !t.claims.sub.trim().is_empty() =>
        {
            return Ok((Who::Operator { name: t.claims.sub }, t.claims.exp));
        }
        Ok(_) => {
            return Err(Refusal::Invalid(
                "the operator token lacks role \"operator\" or a subject",
            ));
        }
        // Not signed with the operator secret: perhaps a CRM token.
        Err(_) => {}
    }
    match caller_from_token(state, token).await {
        Ok(caller) => {
            let exp = decode::<Expiry>(token, &state.jwt, &hs256_validation())
                .map(|t| t.claims.exp)
                .map_err(|_| Refusal::Invalid("invalid or expired token"))?;
            Ok((Who::Agency(caller), exp))
        }
        Err(ApiError::Unauthorized(why)) => Err(Refusal::Invalid(why)),
        Err(other) => Err(Refusal::Unavailable(other.into())),
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether the request came over TLS, by what the ingress says.
pub fn over_tls(headers: &HeaderMap) -> bool {
    let forwarded_proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
    let forwarded = headers
        .get(header::FORWARDED)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split([';', ','])
                .any(|p| p.trim().eq_ignore_ascii_case("proto=https"))
        });
    forwarded_proto || forwarded
}

fn secure(console: &Console, headers: &HeaderMap) -> bool {
    match console.cookie_secure {
        CookieSecure::Always => true,
        CookieSecure::Never => false,
        CookieSecure::Auto => over_tls(headers),
    }
}

/// A `Set-Cookie` value for the console's path.
pub fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        max_age.max(0),
        if secure { "; Secure" } else { "" }
    )
}

/// Where to go after signing in: a console path, never another site.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if (n == "/ui" || n.starts_with("/ui/") || n.starts_with("/ui?"))
                && !n.contains("//")
                && !n.contains('\\')
                && n.chars().all(|c| c.is_ascii_graphic()) =>
        {
            n.to_owned()
        }
        _ => "/ui".to_owned(),
    }
}

fn console(state: &AppState) -> Result<&Console, UiError> {
    state.ui.as_deref().ok_or(UiError::NotFound("page"))
}

/// The viewer of a request, from the session cookie; without a valid one, a redirect to
/// the login page (which comes back to this page).
pub struct Session(pub Viewer, pub String);

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let console = console(state).map_err(IntoResponse::into_response)?;
        let to_login = || {
            // Inside the nested router the path lacks its `/ui` prefix; the original has it.
            let uri = parts
                .extensions
                .get::<axum::extract::OriginalUri>()
                .map_or(&parts.uri, |o| &o.0);
            let here = uri
                .path_and_query()
                .map_or("/ui", |p| p.as_str())
                .to_owned();
            let next = if parts.method == axum::http::Method::GET {
                here
            } else {
                "/ui".to_owned()
            };
            Redirect::to(&format!("/ui/login?next={}", percent_encode(&next))).into_response()
        };
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login());
        };
        match identify(state, console, &token).await {
            Ok((who, _)) => Ok(Session(
                Viewer {
                    who,
                    csrf: csrf_token(&console.csrf_key, "session", &token),
                },
                token,
            )),
            Err(Refusal::Invalid(_)) => Err(to_login()),
            Err(Refusal::Unavailable(e)) => Err(e.into_response()),
        }
    }
}

/// Percent-encodes a query value.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `?next=` of the login page.
#[derive(Debug, Deserialize, Default)]
pub struct LoginQuery {
    next: Option<String>,
}

/// `GET /ui/login`: the form to paste a token into.
pub async fn login_page(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Result<Response, UiError> {
    let console = console(&state)?;
    Ok(login_form(
        console,
        &headers,
        &safe_next(q.next.as_deref()),
        None,
        StatusCode::OK,
    ))
}

fn login_form(
    console: &Console,
    headers: &HeaderMap,
    next: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let csrf = csrf_token(&console.csrf_key, "login", &nonce);
    let mut response = (
        status,
        Html(views::login_page(next, &csrf, error).into_string()),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(
        LOGIN_COOKIE,
        &nonce,
        600,
        secure(console, headers),
    )) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

/// The login form.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

/// `POST /ui/login`: checks the token and sets the session cookie.
pub async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Result<Response, UiError> {
    let console = console(&state)?;
    let next = safe_next(form.next.as_deref());
    let nonce = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if nonce.is_empty() || verify(&console.csrf_key, "login", &nonce, form.csrf.as_deref()).is_err()
    {
        return Ok(login_form(
            console,
            &headers,
            &next,
            Some(
                "The sign-in form expired or did not come from this console: paste the token again.",
            ),
            StatusCode::FORBIDDEN,
        ));
    }
    let token: String = form.token.split_whitespace().collect();
    if token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Ok(login_form(
            console,
            &headers,
            &next,
            Some("That is not a token (a JWT: three base64url parts joined by dots)."),
            StatusCode::UNAUTHORIZED,
        ));
    }
    let (who, exp) = match identify(&state, console, &token).await {
        Ok(identified) => identified,
        Err(Refusal::Invalid(why)) => {
            return Ok(login_form(
                console,
                &headers,
                &next,
                Some(&format!("The token was refused: {why}.")),
                StatusCode::UNAUTHORIZED,
            ));
        }
        Err(Refusal::Unavailable(e)) => return Err(e),
    };
    match &who {
        Who::Operator { name } => tracing::info!(operator = %name, "console: operator signed in"),
        Who::Agency(c) => {
            tracing::info!(user_id = %c.user_id, agency_id = %c.agency_id, "console: CRM user signed in")
        }
    }
    let lifetime = exp - chrono::Utc::now().timestamp();
    let secure = secure(console, &headers);
    let mut response = Redirect::to(&next).into_response();
    for value in [
        set_cookie(SESSION_COOKIE, &token, lifetime, secure),
        set_cookie(LOGIN_COOKIE, "", 0, secure),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    Ok(response)
}

/// The logout form.
#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    #[serde(default)]
    csrf: Option<String>,
}

/// `POST /ui/logout`: deletes the session cookie.
pub async fn logout(
    State(state): State<AppState>,
    headers: HeaderMap,
    Session(viewer, token): Session,
    Form(form): Form<LogoutForm>,
) -> Result<Response, UiError> {
    let console = console(&state)?;
    viewer.check_csrf(console, form.csrf.as_deref(), &token)?;
    let mut response = Redirect::to("/ui/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(
        SESSION_COOKIE,
        "",
        0,
        secure(console, &headers),
    )) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_bind_to_their_value_and_purpose() {
        let key = derive_csrf_key(b"operator-secret-0123456789");
        let t = csrf_token(&key, "session", "tok");
        assert!(verify(&key, "session", "tok", Some(&t)).is_ok());
        assert!(verify(&key, "session", "other", Some(&t)).is_err());
        assert!(verify(&key, "login", "tok", Some(&t)).is_err());
        assert!(verify(&key, "session", "tok", None).is_err());
        assert!(verify(&key, "session", "tok", Some("zz")).is_err());
        let other = derive_csrf_key(b"another-secret-0123456789");
        assert!(verify(&other, "session", "tok", Some(&t)).is_err());
    }

    #[test]
    fn next_stays_on_the_console() {
        assert_eq!(
            safe_next(Some("/ui/batches/7?status=failed")),
            "/ui/batches/7?status=failed"
        );
        assert_eq!(safe_next(Some("/ui")), "/ui");
        for bad in [
            "https://evil.example/ui",
            "//evil.example",
            "/ui//evil",
            "/v1/batches",
            "/uix",
            "/ui/\\evil",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(safe_next(None), "/ui");
    }

    #[test]
    fn cookies_and_tls_are_read_from_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; bulkops_ui=abc.def.ghi; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc.def.ghi"));
        assert_eq!(cookie(&h, "missing"), None);
        assert!(!over_tls(&h));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(over_tls(&h));
        let mut f = HeaderMap::new();
        f.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=1.2.3.4;proto=https;host=x"),
        );
        assert!(over_tls(&f));
        let c = set_cookie(SESSION_COOKIE, "v", 60, true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/ui",
            "Max-Age=60",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!set_cookie(SESSION_COOKIE, "v", 60, false).contains("Secure"));
    }
}
