//! Request parsing at the edge: JSON bodies and query strings become typed values, and
//! every rejection is a 400 problem naming the field, without echoing the input.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use bulkops_shared::filter::{FieldError, field_error_from_serde};
use serde::de::DeserializeOwned;

use crate::problem::ApiError;

/// A JSON body parsed into `T`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or_default().trim();
            if !(essence == "application/json" || essence.ends_with("+json")) {
                return Err(ApiError::UnsupportedMediaType);
            }
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::field("body", "the request body could not be read")
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a JSON document into `T`, naming the offending field on failure.
///
/// # Errors
/// A 400 [`ApiError`] naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|_| ApiError::field("body", "the request body is not valid JSON"))?;
    integral_numbers_as_integers(&mut value);
    if !value.is_object() {
        return Err(ApiError::field(
            "body",
            "wrong type: expected a JSON object",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let msg = e.inner().to_string();
        ApiError::Invalid(vec![field_error_from_serde("", e.path(), &msg)])
    })
}

/// JSON Schema's `integer` is any number without a fractional part, so `1500.0` and `1e3`
/// are integers to a client generated from the document; serde would refuse them where an
/// `i64` is expected. Every number in a request body that is integral and within `i64`
/// becomes an integer before parsing (no request field is fractional).
fn integral_numbers_as_integers(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64()
                && f.fract() == 0.0
                && (-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&f)
            {
                *v = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        serde_json::Value::Object(map) => map.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

/// A query string parsed into `T`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded_deserializer(query);
        serde_path_to_error::deserialize(de)
            .map(ApiQuery)
            .map_err(|e| {
                let msg = e.inner().to_string();
                let mut err = field_error_from_serde("", e.path(), &msg);
                if err.field.is_empty() {
                    // Unknown or unparsable parameters name themselves in the message.
                    err = FieldError::new("query", "invalid query parameters");
                }
                ApiError::Invalid(vec![err])
            })
    }
}

fn serde_urlencoded_deserializer(query: &str) -> serde_json::Value {
    // Query parameters are flat `key=value` pairs; read them into a JSON object of strings
    // so that one deserialiser (with paths) serves bodies and queries alike.
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k);
        let v = percent_decode(v);
        map.insert(k, serde_json::Value::String(v));
    }
    serde_json::Value::Object(map)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Deserialises an optional integer carried as a query string.
pub mod int_from_str {
    use serde::{Deserialize, Deserializer, de::Error};

    /// An optional `i64` from a string.
    ///
    /// # Errors
    /// When the string is not an integer.
    pub fn option<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s.as_deref() {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse::<i64>()
                .map(Some)
                .map_err(|_| D::Error::custom("invalid type: string, expected an integer")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integral_numbers_are_integers() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct R {
            a: i64,
            b: Vec<i64>,
        }
        let r: R = parse_json(br#"{"a": 1500.0, "b": [1e3, -2.0, 7]}"#).unwrap();
        assert_eq!(
            r,
            R {
                a: 1500,
                b: vec![1000, -2, 7]
            }
        );
        assert!(parse_json::<R>(br#"{"a": 1.5, "b": []}"#).is_err());
        assert!(parse_json::<R>(br#"{"a": 1e19, "b": []}"#).is_err());
    }

    #[test]
    fn decodes_query_strings() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        let v = serde_urlencoded_deserializer("kind=create_sales_records&limit=5&x");
        assert_eq!(v["kind"], "create_sales_records");
        assert_eq!(v["limit"], "5");
        assert_eq!(v["x"], "");
    }
}
