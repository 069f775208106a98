//! The batches page (`GET /ui/batches`): every batch the viewer may see, newest first,
//! filtered by agency (operators), kind and state, in keyset pages; and the batch read
//! the console's pages share ([`ConsoleBatch`], the API's `BatchView` plus the columns an
//! operator needs).

use axum::extract::{Query, State};
use axum::response::Html;
use bulkops_shared::batch::{BatchKind, BatchState, Lane};
use bulkops_shared::db::stmt;
use bulkops_shared::ids::{AgencyId, BatchId};
use chrono::{DateTime, Utc};
use maud::{Markup, html};
use sea_orm::{ConnectionTrait, DatabaseConnection, QueryResult, Value};
use serde::Deserialize;

use super::UiError;
use super::session::Session;
use super::views::{self, Nav};
use crate::state::AppState;
use bulkops_shared::batch_view::{BATCH_COLUMNS, BatchView, batch_from_row};

/// Batches per page.
const PAGE: i64 = 50;

/// A batch as the console shows it.
#[derive(Debug)]
pub struct ConsoleBatch {
    /// What the API shows.
    pub view: BatchView,
    /// Its agency.
    pub agency_id: i64,
    /// The queue lane its messages take.
    pub lane: Option<Lane>,
    /// When its first message was published.
    pub started_at: Option<DateTime<Utc>>,
    /// Items given their outcome when it was accepted (no message, no worker).
    pub presettled: i64,
}

impl ConsoleBatch {
    /// Items the workers decided.
    pub fn worker_done(&self) -> i64 {
        (self.view.total - self.view.counts.pending - self.presettled).max(0)
    }

    /// Items with an outcome.
    pub fn done(&self) -> i64 {
        self.view.total - self.view.counts.pending
    }
}

/// The columns [`from_row`] reads.
pub fn columns() -> String {
    format!("{BATCH_COLUMNS}, agency_id, lane, started_at, n_presettled")
}

/// Reads a row of [`columns`].
///
/// # Errors
/// Database errors.
pub fn from_row(r: &QueryResult) -> Result<ConsoleBatch, sea_orm::DbErr> {
    let lane: String = r.try_get("", "lane")?;
    Ok(ConsoleBatch {
        view: batch_from_row(r)?,
        agency_id: r.try_get("", "agency_id")?,
        lane: Lane::parse(&lane),
        started_at: r.try_get("", "started_at")?,
        presettled: r.try_get("", "n_presettled")?,
    })
}

/// One batch, if `scope` (an agency, or every agency) may see it.
///
/// # Errors
/// [`UiError::NotFound`] when it does not exist or is another agency's; database errors.
pub async fn load(
    db: &DatabaseConnection,
    id: BatchId,
    scope: Option<AgencyId>,
) -> Result<ConsoleBatch, UiError> {
    let mut params: Vec<Value> = vec![id.into()];
    let mut sql = format!("SELECT {} FROM bulk_batches WHERE id = $1", columns());
    if let Some(agency) = scope {
        params.push(agency.into());
        sql.push_str(" AND agency_id = $2");
    }
    let row = db
        .query_one_raw(stmt(sql, params))
        .await
        .map_err(UiError::db)?
        .ok_or(UiError::NotFound("batch"))?;
    from_row(&row).map_err(UiError::db)
}

/// Which batches to list.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    /// Only this agency's (operators choose; a CRM user's is fixed).
    pub agency: Option<AgencyId>,
    /// Only this kind.
    pub kind: Option<BatchKind>,
    /// Only this state; `None` with `active` for "not completed".
    pub state: Option<BatchState>,
    /// Only batches not completed.
    pub active: bool,
    /// Older than this id (the next page).
    pub before: Option<i64>,
    /// Newer than this id (the previous page).
    pub after: Option<i64>,
}

/// Up to `limit` batches, newest first.
///
/// # Errors
/// Database errors.
pub async fn list(
    db: &DatabaseConnection,
    f: &Filter,
    limit: i64,
) -> Result<Vec<ConsoleBatch>, UiError> {
    let mut params: Vec<Value> = Vec::new();
    let mut conds: Vec<String> = Vec::new();
    let bind = |v: Value, params: &mut Vec<Value>| {
        params.push(v);
        format!("${}", params.len())
    };
    if let Some(a) = f.agency {
        conds.push(format!("agency_id = {}", bind(a.into(), &mut params)));
    }
    if let Some(k) = f.kind {
        conds.push(format!("kind = {}", bind(k.as_str().into(), &mut params)));
    }
    if let Some(s) = f.state {
        conds.push(format!("state = {}", bind(s.as_str().into(), &mut params)));
    }
    if f.active {
        // bulk_batches_active_idx.
        conds.push("completed_at IS NULL".to_owned());
    }
    if let Some(b) = f.before {
        conds.push(format!("id < {}", bind(b.into(), &mut params)));
    }
    if let Some(a) = f.after {
        conds.push(format!("id > {}", bind(a.into(), &mut params)));
    }
    let limit = bind(limit.into(), &mut params);
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    // A page of newer batches is read oldest first from `after`, then shown newest first.
    let order = if f.after.is_some() && f.before.is_none() {
        "ASC"
    } else {
        "DESC"
    };
    let sql = format!(
        "SELECT {} FROM bulk_batches {filter} ORDER BY id {order} LIMIT {limit}",
        columns()
    );
    let rows = db
        .query_all_raw(stmt(sql, params))
        .await
        .map_err(UiError::db)?;
    let mut out = rows
        .iter()
        .map(from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(UiError::db)?;
    if order == "ASC" {
        out.reverse();
    }
    Ok(out)
}

/// The batches page's query.
#[derive(Debug, Default, Deserialize)]
pub struct BatchesQuery {
    agency: Option<String>,
    kind: Option<String>,
    state: Option<String>,
    before: Option<String>,
    after: Option<String>,
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl BatchesQuery {
    fn filter(&self) -> Result<Filter, UiError> {
        let int = |name: &str, v: &Option<String>| -> Result<Option<i64>, UiError> {
            non_empty(v)
                .map(|s| {
                    s.parse::<i64>()
                        .map_err(|_| UiError::BadRequest(format!("{name} must be a number")))
                })
                .transpose()
        };
        let (state, active) = match non_empty(&self.state) {
            None => (None, false),
            Some("active") => (None, true),
            Some(s) => (
                Some(BatchState::parse(s).ok_or_else(|| {
                    UiError::BadRequest(
                        "state must be active, accepted, running or completed".into(),
                    )
                })?),
                false,
            ),
        };
        Ok(Filter {
            agency: int("agency", &self.agency)?.map(AgencyId),
            kind: non_empty(&self.kind)
                .map(|k| {
                    BatchKind::parse(k).ok_or_else(|| {
                        UiError::BadRequest(
                            "kind must be create_sales_records or convert_sales_records".into(),
                        )
                    })
                })
                .transpose()?,
            state,
            active,
            before: int("before", &self.before)?,
            after: int("after", &self.after)?,
        })
    }

    /// This query's filters (without paging) as a query string.
    fn filters_query(&self, f: &Filter) -> String {
        let mut parts = Vec::new();
        if let Some(a) = f.agency {
            parts.push(format!("agency={a}"));
        }
        if let Some(k) = f.kind {
            parts.push(format!("kind={}", k.as_str()));
        }
        if let Some(s) = non_empty(&self.state) {
            parts.push(format!("state={}", super::session::percent_encode(s)));
        }
        parts.join("&")
    }
}

/// `GET /ui/batches`.
pub async fn page(
    State(state): State<AppState>,
    Session(viewer, _): Session,
    Query(q): Query<BatchesQuery>,
) -> Result<Html<String>, UiError> {
    let mut filter = q.filter()?;
    if let Some(agency) = viewer.scope() {
        filter.agency = Some(agency);
    }
    let rows = list(&state.db, &filter, PAGE + 1).await?;
    // One row more than a page says whether another page follows in the direction read.
    let more = rows.len() as i64 > PAGE;
    let mut rows = rows;
    if more {
        if filter.after.is_some() && filter.before.is_none() {
            rows.remove(0);
        } else {
            rows.truncate(usize::try_from(PAGE).unwrap_or(50));
        }
    }
    let base = q.filters_query(&filter);
    let join = |extra: String| {
        if base.is_empty() {
            format!("/ui/batches?{extra}")
        } else {
            format!("/ui/batches?{base}&{extra}")
        }
    };
    let reading_newer = filter.after.is_some() && filter.before.is_none();
    let older_link = |b: &ConsoleBatch| join(format!("before={}", b.view.id));
    let newer_link = |b: &ConsoleBatch| join(format!("after={}", b.view.id));
    let (older, newer) = if reading_newer {
        (
            rows.last().map(older_link),
            rows.first().filter(|_| more).map(newer_link),
        )
    } else {
        (
            rows.last().filter(|_| more).map(older_link),
            rows.first()
                .filter(|_| filter.before.is_some())
                .map(newer_link),
        )
    };
    let now = Utc::now();
    let body = html! {
        h1 { "Batches" }
        form.filters method="get" action="/ui/batches" {
            @if viewer.is_operator() {
                label { "Agency " input type="number" name="agency" min="1" value=[filter.agency.map(|a| a.0)] placeholder="any"; }
            }
            label { "Kind "
                select name="kind" {
                    option value="" { "any" }
                    @for k in [BatchKind::CreateSalesRecords, BatchKind::ConvertSalesRecords] {
                        option value=(k.as_str()) selected[filter.kind == Some(k)] { (k.as_str()) }
                    }
                }
            }
            label { "State "
                select name="state" {
                    option value="" { "any" }
                    option value="active" selected[filter.active] { "active (not completed)" }
                    @for s in [BatchState::Accepted, BatchState::Running, BatchState::Completed] {
                        option value=(s.as_str()) selected[filter.state == Some(s)] { (s.as_str()) }
                    }
                }
            }
            button type="submit" { "Filter" }
            " " a href="/ui/batches" { "clear" }
        }
        (batch_table(&rows, viewer.is_operator(), now))
        nav.pager {
            @if let Some(href) = &newer { a rel="prev" href=(href) { "← Newer" } }
            @if let Some(href) = &older { a rel="next" href=(href) { "Older →" } }
        }
    };
    Ok(Html(
        views::page("Batches", Some(&viewer), Nav::Batches, html! {}, body).into_string(),
    ))
}

/// A table of batches with their progress, rate and ETA.
pub fn batch_table(rows: &[ConsoleBatch], show_agency: bool, now: DateTime<Utc>) -> Markup {
    html! {
        @if rows.is_empty() {
            p.empty { "No batches." }
        } @else {
            table.batches {
                thead { tr {
                    th { "Batch" }
                    @if show_agency { th { "Agency" } }
                    th { "Kind" } th { "State" } th { "Progress" } th.num { "Failed" }
                    th.num { "Rate" } th { "ETA" } th { "Accepted" }
                } }
                tbody {
                    @for b in rows {
                        @let rate = super::live::average_rate(b, now);
                        tr {
                            td { a href=(format!("/ui/batches/{}", b.view.id)) { (b.view.id) } }
                            @if show_agency { td.num { (b.agency_id) } }
                            td { (b.view.kind.as_str()) }
                            td { (views::state_badge(b.view.state)) }
                            td { (views::progress_bar(b.done(), b.view.total, None)) }
                            td.num { (views::fmt_int(b.view.counts.failed)) }
                            td.num { (views::fmt_rate(rate)) }
                            td { (super::live::eta_text(b, rate)) }
                            td { (views::ago(b.view.created_at, now)) }
                        }
                    }
                }
            }
        }
    }
}
