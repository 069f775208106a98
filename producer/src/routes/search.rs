//! `POST /v1/individuals/search` and `POST /v1/individuals/search.csv`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bulkops_shared::csv_safe;
use bulkops_shared::db::stmt;
use bulkops_shared::filter::SearchFilter;
use bulkops_shared::ids::AgencyId;
use futures_util::StreamExt;
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult, QueryResult, Statement, Value};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Caller, require};
use crate::extract::ApiJson;
use crate::problem::{ApiError, Problem};
use crate::state::AppState;

/// Largest page.
pub const MAX_LIMIT: i64 = 1000;
/// Rows fetched per round while streaming CSV.
const CSV_PAGE: i64 = 5000;

/// A search request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The filter (`{}` matches every Individual of the agency).
    #[serde(default)]
    pub filter: SearchFilter,
    /// Return Individuals with an id greater than this (keyset paging).
    #[serde(default)]
    pub after: Option<i64>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub limit: Option<i64>,
}

/// A CSV export request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchCsvRequest {
    /// The filter.
    #[serde(default)]
    pub filter: SearchFilter,
}

/// One Individual found (read from a row of [`ITEM_COLUMNS`] by column name).
#[derive(Debug, Serialize, ToSchema, FromQueryResult)]
pub struct SearchItem {
    /// The Individual.
    pub id: i64,
    /// First name.
    pub first_name: Option<String>,
    /// Last name.
    pub last_name: Option<String>,
    /// Status.
    pub status: Option<String>,
    /// State.
    pub state: Option<String>,
    /// Servicing agent.
    pub servicing_agent_id: Option<i64>,
    /// Whether a Sales Record was created from this Individual.
    pub has_sales_record: bool,
}

/// A page of search results.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    /// Individuals matching the filter in all.
    pub total: i64,
    /// This page, by id.
    pub items: Vec<SearchItem>,
    /// Pass as `after` for the next page; null on the last.
    pub next_after: Option<i64>,
}

const ITEM_COLUMNS: &str =
    "i.id, i.first_name, i.last_name, i.status, i.state, i.servicing_agent_id,
     EXISTS (SELECT 1 FROM sales_records sr WHERE sr.individual_id = i.id) AS has_sales_record";

/// The CSV export's header, in [`SearchItem::csv_line`]'s order.
const CSV_HEADER: [&str; 7] = [
    "id",
    "first_name",
    "last_name",
    "status",
    "state",
    "servicing_agent_id",
    "has_sales_record",
];

fn item_from_row(r: &QueryResult) -> Result<SearchItem, DbErr> {
    SearchItem::from_query_result(r, "")
}

impl SearchItem {
    /// The Individual as a CSV line in [`CSV_HEADER`]'s order (empty cells for missing
    /// values).
    fn csv_line(&self) -> bytes::Bytes {
        csv_safe::line(&[
            &self.id.to_string(),
            self.first_name.as_deref().unwrap_or(""),
            self.last_name.as_deref().unwrap_or(""),
            self.status.as_deref().unwrap_or(""),
            self.state.as_deref().unwrap_or(""),
            &self
                .servicing_agent_id
                .map(|v| v.to_string())
                .unwrap_or_default(),
            if self.has_sales_record {
                "true"
            } else {
                "false"
            },
        ])
    }
}

/// One keyset page of the agency's Individuals that match `filter`: ids above `after`, by
/// id, at most `limit`.
fn page_statement(agency: AgencyId, filter: &SearchFilter, after: i64, limit: i64) -> Statement {
    let mut params: Vec<Value> = vec![agency.into()];
    let conditions = filter.to_sql("i", &mut params);
    params.push(after.into());
    params.push(limit.into());
    let sql = format!(
        "SELECT {ITEM_COLUMNS} FROM individuals i
          WHERE i.agency_id = $1 AND {conditions} AND i.id > ${}
          ORDER BY i.id LIMIT ${}",
        params.len() - 1,
        params.len()
    );
    stmt(sql, params)
}

/// Validates a filter that came with a request body.
///
/// # Errors
/// A 400 naming each invalid field.
pub fn checked(filter: SearchFilter) -> Result<SearchFilter, ApiError> {
    filter.validate("filter").map_err(ApiError::Invalid)?;
    Ok(filter)
}

/// Searches the caller's Individuals.
#[utoipa::path(
    post, path = "/v1/individuals/search", tag = "search",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "A page of Individuals, by id", body = SearchResponse),
        (status = 400, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No access to Individuals", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn search(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<axum::Json<SearchResponse>, ApiError> {
    require(bulkops_shared::permissions::may_search(&caller.access))?;
    let filter = checked(req.filter)?;
    let limit = req.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let mut params: Vec<Value> = vec![caller.agency_id.into()];
    let conditions = filter.to_sql("i", &mut params);
    let count_sql =
        format!("SELECT count(*) AS n FROM individuals i WHERE i.agency_id = $1 AND {conditions}");
    let total: i64 = state
        .db
        .query_one_raw(stmt(count_sql, params))
        .await
        .map_err(ApiError::db)?
        .map(|r| r.try_get("", "n"))
        .transpose()
        .map_err(ApiError::db)?
        .unwrap_or(0);
    let rows = state
        .db
        .query_all_raw(page_statement(
            caller.agency_id,
            &filter,
            req.after.unwrap_or(0),
            limit + 1,
        ))
        .await
        .map_err(ApiError::db)?;
    let (items, next_after) = super::keyset_page(&rows, limit, item_from_row, |i| i.id)?;
    Ok(axum::Json(SearchResponse {
        total,
        items,
        next_after,
    }))
}

/// Exports every Individual the filter finds as CSV, streamed in keyset pages.
///
/// Each page is one short statement on the exports' own pool, so a slow reader holds
/// neither a connection nor a snapshot between pages, and vacuum is never held back by an
/// export. Without one snapshot for the whole export, consistency is per page and by id:
/// every Individual that matches throughout the export appears exactly once (ids never
/// change, pages follow `id > last`), one created or changed meanwhile may or may not
/// appear, and each row shows its values as of its page. For an export of a search result
/// that is what the CRM's own list shows while it is being paged; a point-in-time audit
/// is the batch itself (its items are frozen at acceptance).
#[utoipa::path(
    post, path = "/v1/individuals/search.csv", tag = "search",
    request_body = SearchCsvRequest,
    responses(
        (status = 200, description = "Header row, then one row per match", content_type = "text/csv", body = String),
        (status = 400, description = "Invalid filter", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Not authenticated", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "No access to Individuals", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Too many exports at once; retry after the Retry-After seconds", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn search_csv(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<SearchCsvRequest>,
) -> Result<Response, ApiError> {
    require(bulkops_shared::permissions::may_search(&caller.access))?;
    let filter = checked(req.filter)?;
    let Some(export) = Export::start(&state) else {
        return Ok(exports_busy());
    };
    let agency = caller.agency_id;
    Ok(export.stream(
        "individuals.csv",
        csv_safe::line(&CSV_HEADER),
        CSV_PAGE,
        move |after| page_statement(agency, &filter, after, CSV_PAGE),
        |r| item_from_row(r).map(|item| (item.id, item.csv_line())),
    ))
}

/// One running CSV export: its permit, its pool and its timeouts.
pub struct Export {
    _permit: tokio::sync::OwnedSemaphorePermit,
    db: sea_orm::DatabaseConnection,
    call_timeout: std::time::Duration,
    write_timeout: std::time::Duration,
}

impl Export {
    /// Takes an export permit, or `None` when `http.max_concurrent_exports` run already.
    pub fn start(state: &AppState) -> Option<Self> {
        let permit = state.exports.clone().try_acquire_owned().ok()?;
        Some(Self {
            _permit: permit,
            db: state.export_db.clone(),
            call_timeout: state.settings.database.call_timeout(),
            write_timeout: state.settings.http.write_timeout(),
        })
    }

    /// One page: a single statement (its own short transaction) on the exports' pool.
    ///
    /// # Errors
    /// Database errors and the client-side timeout.
    pub async fn page(&self, statement: Statement) -> Result<Vec<QueryResult>, DbErr> {
        bulkops_shared::db::timed(
            self.call_timeout,
            "csv export page",
            self.db.query_all_raw(statement),
        )
        .await
    }

    /// Hands a chunk to the response body; false when the client is gone or took nothing
    /// for the write timeout (the export then ends).
    pub async fn send(
        &self,
        tx: &tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        chunk: bytes::Bytes,
    ) -> bool {
        matches!(
            tokio::time::timeout(self.write_timeout, tx.send(Ok(chunk))).await,
            Ok(Ok(()))
        )
    }

    /// Streams a CSV download called `filename`: `header`, then the lines of keyset pages
    /// of `page_size` rows, each page read by the statement `page(after)` (rows keyed
    /// above `after`, by key) on the exports' pool, each row turned into its key and its
    /// line by `line`. A page shorter than `page_size` is the last. The task behind the
    /// stream ends when the rows run out, when the client goes away or stops reading (a
    /// send fails or times out), or when a read fails (the response is then cut short);
    /// it holds the export permit until then.
    pub fn stream(
        self,
        filename: &str,
        header: bytes::Bytes,
        page_size: i64,
        page: impl Fn(i64) -> Statement + Send + 'static,
        line: impl Fn(&QueryResult) -> Result<(i64, bytes::Bytes), DbErr> + Send + 'static,
    ) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
        tokio::spawn(async move {
            if !self.send(&tx, header).await {
                return;
            }
            let mut after = 0_i64;
            loop {
                let rows = match self.page(page(after)).await {
                    Ok(rows) => rows,
                    Err(e) => return self.fail(&tx, &e).await,
                };
                let mut buf = Vec::with_capacity(rows.len() * 64);
                for r in &rows {
                    let (key, bytes) = match line(r) {
                        Ok(keyed) => keyed,
                        Err(e) => return self.fail(&tx, &e).await,
                    };
                    after = key;
                    buf.extend_from_slice(&bytes);
                }
                if !buf.is_empty() && !self.send(&tx, bytes::Bytes::from(buf)).await {
                    return;
                }
                if (rows.len() as i64) < page_size {
                    return;
                }
            }
        });
        csv_response(rx, filename)
    }

    /// Ends the stream with an error (the client sees a cut response, never a short one
    /// that looks complete).
    pub async fn fail(
        &self,
        tx: &tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        err: &DbErr,
    ) {
        tracing::warn!(error = %err, "csv export failed; the response is cut short");
        let _ = tokio::time::timeout(
            self.write_timeout,
            tx.send(Err(std::io::Error::other("export failed"))),
        )
        .await;
    }
}

/// The 503 answer when `http.max_concurrent_exports` exports stream already.
pub fn exports_busy() -> Response {
    let mut response = crate::problem::problem_response(&Problem {
        kind: "https://bulkops.dev/problems/exports-busy".to_owned(),
        title: "Too many exports".to_owned(),
        status: 503,
        detail: "too many CSV exports are streaming at once; retry shortly".to_owned(),
        errors: None,
    });
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// A streamed `text/csv` response.
fn csv_response(
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
    filename: &str,
) -> Response {
    let stream = tokio_stream_from(rx);
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    response
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
