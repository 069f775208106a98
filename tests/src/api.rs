//! An HTTP client for the producer's API, with the test's tokens.

use std::time::{Duration, Instant};

use anyhow::bail;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::env::SECRET;

/// A response: status, headers, body (JSON when it parses, else text).
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: reqwest::header::HeaderMap,
    /// Raw body.
    pub text: String,
    /// Parsed body (Null when not JSON).
    pub json: Value,
}

impl Reply {
    /// The content type, lower-cased.
    pub fn content_type(&self) -> String {
        self.headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    }
}

/// A client of one producer.
#[derive(Clone)]
pub struct Api {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    client: reqwest::Client,
}

/// A valid token for a user of an agency, valid an hour.
pub fn token(user_id: i64, agency_id: i64) -> String {
    token_with(
        &serde_json::json!({
            "sub": user_id.to_string(), "agency_id": agency_id,
            "exp": chrono::Utc::now().timestamp() + 3600,
        }),
        SECRET,
    )
}

/// A token with any claims and secret (HS256).
pub fn token_with(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

impl Api {
    /// A client for `base`.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Sends a request; `token` is sent as a bearer token when given.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<Reply> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await?;
        let json = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            headers,
            text,
            json,
        })
    }

    /// GET with a token.
    pub async fn get(&self, path: &str, token: &str) -> anyhow::Result<Reply> {
        self.send(Method::GET, path, Some(token), None, &[]).await
    }

    /// POST JSON with a token.
    pub async fn post(&self, path: &str, token: &str, body: &Value) -> anyhow::Result<Reply> {
        self.send(Method::POST, path, Some(token), Some(body), &[])
            .await
    }

    /// Submits a bulk create and returns the batch id (asserting 202).
    pub async fn bulk_create(&self, token: &str, body: &Value) -> anyhow::Result<i64> {
        let r = self.post("/v1/bulk/sales-records", token, body).await?;
        if r.status != StatusCode::ACCEPTED {
            bail!("bulk create answered {}: {}", r.status, r.text);
        }
        Ok(r.json["batch_id"].as_i64().unwrap_or_default())
    }

    /// Submits a conversion and returns the batch id (asserting 202).
    pub async fn convert(&self, token: &str, ids: &[i64]) -> anyhow::Result<i64> {
        let r = self
            .post(
                "/v1/bulk/conversions",
                token,
                &serde_json::json!({"sales_record_ids": ids}),
            )
            .await?;
        if r.status != StatusCode::ACCEPTED {
            bail!("conversion answered {}: {}", r.status, r.text);
        }
        Ok(r.json["batch_id"].as_i64().unwrap_or_default())
    }

    /// Polls a batch until it is completed (or `within` passes, which fails the test: the
    /// deadline only keeps a broken run from hanging).
    pub async fn wait_completed(
        &self,
        token: &str,
        batch_id: i64,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        loop {
            let r = self.get(&format!("/v1/batches/{batch_id}"), token).await;
            if let Ok(r) = &r
                && r.status == StatusCode::OK
                && r.json["state"] == "completed"
            {
                return Ok(r.json.clone());
            }
            if started.elapsed() > within {
                bail!(
                    "batch {batch_id} not completed within {within:?}: {:?}",
                    r.map(|r| r.text)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every item of a batch (all pages).
    pub async fn items(&self, token: &str, batch_id: i64) -> anyhow::Result<Vec<Value>> {
        let mut all = Vec::new();
        let mut after = 0_i64;
        loop {
            let r = self
                .get(
                    &format!("/v1/batches/{batch_id}/items?after={after}&limit=1000"),
                    token,
                )
                .await?;
            if r.status != StatusCode::OK {
                bail!("items answered {}: {}", r.status, r.text);
            }
            let page = r.json["items"].as_array().cloned().unwrap_or_default();
            all.extend(page);
            match r.json["next_after"].as_i64() {
                Some(n) => after = n,
                None => return Ok(all),
            }
        }
    }
}

/// The sum of every series of metric `name` in a Prometheus text exposition whose labels
/// include each `label="value"` of `filters` (0 when there is none).
pub fn metric_sum(text: &str, name: &str, filters: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = filters
                .iter()
                .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            if !all {
                return None;
            }
            value.parse::<f64>().ok()
        })
        .sum()
}

impl Api {
    /// The text of `GET /metrics`.
    pub async fn metrics_text(&self) -> anyhow::Result<String> {
        Ok(self
            .send(Method::GET, "/metrics", None, None, &[])
            .await?
            .text)
    }
}
