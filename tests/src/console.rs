//! The operator console from tests: the configuration that turns it on, operators'
//! tokens, and a plain HTTP client signed in with the session cookie (for tests that read
//! pages without a browser).

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION};

use crate::TestEnv;
use crate::api::token_with;

/// The operator secret of every test environment that enables the console.
pub const OPERATOR_SECRET: &str = "e2e-operator-secret-0123456789abcdef";

/// Turns the console on for the processes `env` starts from now on.
pub async fn enable(env: &TestEnv) {
    env.set("BULKOPS__UI__ENABLED", "true").await;
    env.set("BULKOPS__AUTH__OPERATOR_JWT_SECRET", OPERATOR_SECRET)
        .await;
}

/// An operator's token, valid an hour.
pub fn operator_token(name: &str) -> String {
    token_with(
        &serde_json::json!({
            "sub": name, "role": "operator", "exp": chrono::Utc::now().timestamp() + 3600,
        }),
        OPERATOR_SECRET,
    )
}

/// A page as fetched.
#[derive(Debug)]
pub struct Page {
    /// Status.
    pub status: StatusCode,
    /// `Location`, for redirects.
    pub location: Option<String>,
    /// Content type.
    pub content_type: String,
    /// Body.
    pub body: String,
}

/// Fetches console pages with a session cookie holding `token` (the session is the token
/// itself), without following redirects.
pub struct ConsoleClient {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl ConsoleClient {
    /// A client of the producer at `base`, signed in with `token` (or not at all).
    pub fn new(base: &str, token: Option<&str>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.map(str::to_owned),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
        }
    }

    /// GET a path.
    pub async fn get(&self, path: &str) -> anyhow::Result<Page> {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header(COOKIE, format!("bulkops_ui={t}"));
        }
        let resp = req.send().await?;
        let status = resp.status();
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let location = header(LOCATION);
        let content_type = header(reqwest::header::CONTENT_TYPE).unwrap_or_default();
        Ok(Page {
            status,
            location,
            content_type,
            body: resp.text().await?,
        })
    }
}
