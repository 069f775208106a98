//! The OpenAPI 3 document, generated from the handlers' annotations and the request and
//! response types, served at `GET /v1/openapi.json`.
//!
//! The document states exactly what the API accepts, so that a client generated from it
//! (the CRM's) builds only requests the API takes: the derived schemas are overlaid where a
//! derive cannot say everything the parser checks ([`document_json`]): the filter's
//! schemas come from [`bulkops_shared::filter::json_schemas`] (nullable lists and ranges,
//! list and value limits, positive ids, `format: date`), "exactly one of `filter` and
//! `saved_search_id`" is a `oneOf`, and headers and query parameters carry their lengths,
//! patterns, enumerations and ranges. What JSON Schema cannot say (a range's `from` after
//! its `to`; a name made only of spaces) is said in descriptions.

use serde_json::{Value, json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::{batches, bulk, ops, saved, search};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "bulkops",
        description = "Bulk record jobs of the insurance-agency CRM: create Sales Records for every Individual a search finds, and convert Sales Records back into Individuals.",
    ),
    paths(
        search::search, search::search_csv,
        saved::create, saved::list, saved::get,
        bulk::preview, bulk::create, bulk::convert,
        batches::list, batches::get, batches::items, batches::items_csv,
        ops::metrics, ops::healthz, ops::readyz, ops::openapi,
    ),
    components(schemas(
        crate::problem::Problem,
        bulkops_shared::filter::SearchFilter,
        bulkops_shared::filter::FieldError,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "search", description = "Individual Advanced Search"),
        (name = "saved searches", description = "Named filters shared within an agency"),
        (name = "bulk", description = "Bulk create and conversion requests"),
        (name = "batches", description = "Progress and outcomes"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The derived document (before [`document_json`]'s overlay).
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as served: [`document`] with the exact schemas laid over it.
pub fn document_json() -> Value {
    let mut doc = serde_json::to_value(document()).unwrap_or_default();
    overlay(&mut doc);
    doc
}

const SCHEMAS: &str = "#/components/schemas/";

fn overlay(doc: &mut Value) {
    let schemas = &mut doc["components"]["schemas"];
    for (name, schema) in bulkops_shared::filter::json_schemas() {
        schemas[name] = schema;
    }
    for name in ["BulkCreateRequest", "PreviewRequest"] {
        let s = &mut schemas[name];
        s["properties"]["filter"] = json!({
            "description": "The filter; give this or saved_search_id.",
            "oneOf": [{"$ref": format!("{SCHEMAS}SearchFilter")}, {"type": "null"}],
        });
        s["oneOf"] = json!([
            {"required": ["filter"],
             "properties": {"filter": {"$ref": format!("{SCHEMAS}SearchFilter")},
                            "saved_search_id": {"type": "null"}}},
            {"required": ["saved_search_id"],
             "properties": {"saved_search_id": {"type": "integer"}, "filter": {"type": "null"}}},
        ]);
        let description = s["description"].as_str().unwrap_or_default().to_owned();
        s["description"] = json!(format!(
            "{description} Give exactly one of filter and saved_search_id (the other absent or null)."
        ));
    }
    schemas["NewSavedSearch"]["properties"]["name"] = json!({
        "description": "Its name: 1 to 200 characters, not all spaces (it is trimmed), no NUL.",
        "type": "string",
        "minLength": 1,
        "maxLength": 200,
        "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$",
    });
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for op in ops.values_mut() {
            // Every body is limited to http.body_limit_bytes.
            if op.get("requestBody").is_some()
                && let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut)
            {
                responses.entry("413").or_insert_with(|| {
                    json!({
                        "description": "The body is larger than http.body_limit_bytes",
                        "content": {"application/problem+json": {"schema": {"$ref": format!("{SCHEMAS}Problem")}}},
                    })
                });
            }
            let Some(params) = op.get_mut("parameters").and_then(Value::as_array_mut) else {
                continue;
            };
            for p in params {
                let name = p["name"].as_str().unwrap_or_default().to_owned();
                let location = p["in"].as_str().unwrap_or_default().to_owned();
                if let Some(schema) = parameter_schema(&name, &location) {
                    p["schema"] = schema;
                }
            }
        }
    }
}

/// The exact schema of a header, query or path parameter, where the derive's is looser.
fn parameter_schema(name: &str, location: &str) -> Option<Value> {
    let one_to_thousand =
        json!({"type": "integer", "format": "int64", "minimum": 1, "maximum": 1000});
    let id = json!({"type": "integer", "format": "int64"});
    let enumeration = |values: &[&str]| {
        // An empty value means "no condition", as if the parameter were absent.
        let mut all = vec![""];
        all.extend_from_slice(values);
        json!({"type": "string", "enum": all})
    };
    Some(match (location, name) {
        ("header", "Idempotency-Key") => json!({
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            // Visible ASCII and spaces, not only spaces (it is trimmed).
            "pattern": "^[ -~]*[!-~][ -~]*$",
        }),
        ("query", "limit") => one_to_thousand,
        ("query", "after") | ("path", "id") => id,
        ("query", "kind") => enumeration(&["create_sales_records", "convert_sales_records"]),
        ("query", "state") => enumeration(&["accepted", "running", "completed"]),
        ("query", "status") => {
            enumeration(&["pending", "created", "converted", "skipped", "failed"])
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_document_carries_the_exact_schemas() {
        let doc = document_json();
        let s = &doc["components"]["schemas"];
        assert_eq!(
            s["IndividualCriteria"]["properties"]["zip"]["maxItems"],
            1000
        );
        assert_eq!(s["DateRange"]["properties"]["from"]["format"], "date");
        assert_eq!(
            s["BulkCreateRequest"]["oneOf"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(
            s["PreviewRequest"]["oneOf"].as_array().map(Vec::len),
            Some(2)
        );
        for (name, schema) in s.as_object().unwrap() {
            if name.ends_with("Request") || name == "NewSavedSearch" {
                assert_eq!(schema["additionalProperties"], false, "{name}");
            }
        }
        let items = &doc["paths"]["/v1/batches/{id}/items"]["get"]["parameters"];
        let status = items
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "status")
            .unwrap();
        assert_eq!(status["schema"]["enum"][1], "pending");
        let create = &doc["paths"]["/v1/bulk/sales-records"]["post"];
        let key = create["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "Idempotency-Key")
            .unwrap();
        assert_eq!(key["schema"]["maxLength"], 255);
        assert!(create["responses"].get("429").is_some());
        assert!(create["responses"].get("413").is_some());
        assert!(doc["paths"]["/healthz"]["get"].get("parameters").is_none());
        assert!(
            doc["paths"]["/v1/batches/{id}/items.csv"]["get"]["responses"]
                .get("410")
                .is_some()
        );
    }
}
