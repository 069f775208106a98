//! The OpenAPI 3 document, generated from the handlers' annotations and the request and
//! response types, served at `GET /v1/openapi.json`.

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

/// The document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
