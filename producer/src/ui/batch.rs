//! A batch's page (`GET /ui/batches/{id}`): live progress, counts, rate and ETA; failures
//! grouped by reason; the items table with a status filter, paging and CSV download (the
//! API's CSV stream); and the batch's dead letters with a replay button for operators.
//!
//! The grouping reads the batch's own items (one `GROUP BY` over its rows by primary key),
//! and only when it has failed or skipped items. Dead letters are read off the queue only
//! when the batch has failed items, at most [`super::DLQ_SCAN_LIMIT`] of them.

use axum::extract::{Path, Query, State};
use axum::response::{Html, Response};
use bulkops_shared::batch::{BatchState, ItemStatus};
use bulkops_shared::db::stmt;
use bulkops_shared::deadletters::{self, Listing};
use bulkops_shared::ids::BatchId;
use chrono::Utc;
use maud::{Markup, html};
use sea_orm::ConnectionTrait;
use serde::Deserialize;

use super::batches::{ConsoleBatch, load};
use super::session::{Session, Viewer};
use super::views::{self, Nav, fmt_int};
use super::{DLQ_SCAN_LIMIT, UiError, live};
use crate::routes::batches::{ItemPage, item_page, items_csv_response};
use crate::routes::search::Export;
use crate::state::AppState;

/// Items per page.
const ITEMS_PAGE: i64 = 50;
/// Reasons listed at most.
const REASONS_SHOWN: i64 = 50;

/// Parses a batch id from the path.
///
/// # Errors
/// [`UiError::NotFound`] for anything but an integer.
pub fn batch_id(raw: &str) -> Result<BatchId, UiError> {
    raw.parse::<i64>()
        .map(BatchId)
        .map_err(|_| UiError::NotFound("batch"))
}

/// Parses a status filter (empty: every status).
///
/// # Errors
/// [`UiError::BadRequest`] for an unknown status.
pub fn status_filter(raw: Option<&str>) -> Result<Option<ItemStatus>, UiError> {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => ItemStatus::parse(s).map(Some).ok_or_else(|| {
            UiError::BadRequest(
                "status must be pending, created, converted, skipped or failed".into(),
            )
        }),
    }
}

/// The batch page's query.
#[derive(Debug, Default, Deserialize)]
pub struct BatchQuery {
    status: Option<String>,
    after: Option<String>,
    replayed: Option<String>,
    removed: Option<String>,
}

/// Skipped and failed items counted by status and reason.
async fn reasons(
    db: &sea_orm::DatabaseConnection,
    id: BatchId,
) -> Result<Vec<(String, String, i64)>, UiError> {
    let rows = db
        .query_all_raw(stmt(
            "SELECT status, COALESCE(reason, '') AS reason, count(*) AS n FROM bulk_items
              WHERE batch_id = $1 AND status IN ('failed', 'skipped')
              GROUP BY 1, 2 ORDER BY n DESC, 1, 2 LIMIT $2",
            [id.into(), REASONS_SHOWN.into()],
        ))
        .await
        .map_err(UiError::db)?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("", "status")?,
                r.try_get("", "reason")?,
                r.try_get("", "n")?,
            ))
        })
        .collect::<Result<_, sea_orm::DbErr>>()
        .map_err(UiError::db)
}

/// `GET /ui/batches/{id}`.
pub async fn page(
    State(state): State<AppState>,
    Session(viewer, _): Session,
    Path(id): Path<String>,
    Query(q): Query<BatchQuery>,
) -> Result<Html<String>, UiError> {
    let id = batch_id(&id)?;
    let status = status_filter(q.status.as_deref())?;
    let after = q
        .after
        .as_deref()
        .and_then(|a| a.trim().parse::<i64>().ok())
        .unwrap_or(0);
    let b = load(&state.db, id, viewer.scope()).await?;
    let reasons = if b.view.counts.failed + b.view.counts.skipped > 0 {
        reasons(&state.db, id).await?
    } else {
        Vec::new()
    };
    let items = item_page(&state.db, id, status, after, ITEMS_PAGE).await?;
    let dead = if b.view.counts.failed > 0 {
        match state.ui.as_deref() {
            Some(console) => Some(
                deadletters::list(
                    &console.link,
                    &state.topology,
                    |l| l.is_of(id),
                    DLQ_SCAN_LIMIT,
                )
                .await
                .map_err(|e| {
                    tracing::warn!(batch_id = %id, error = %e, "console: dead letters not read");
                }),
            ),
            None => None,
        }
    } else {
        None
    };
    let notice = notice(&q);
    let title = format!("Batch {id}");
    let head = if b.view.state == BatchState::Completed {
        html! {}
    } else {
        html! { noscript { meta http-equiv="refresh" content="5"; } }
    };
    let body = html! {
        h1 { "Batch " (id) " " (views::state_badge(b.view.state)) }
        @if let Some(n) = notice { p.notice #notice role="status" { (n) } }
        (summary(&b, &viewer))
        (reasons_table(&reasons, id))
        @if let Some(dead) = &dead { (dead_letters(dead, &b, &viewer)) }
        (items_section(&b, status, after, &items))
    };
    Ok(Html(
        views::page(&title, Some(&viewer), Nav::Batches, head, body).into_string(),
    ))
}

fn notice(q: &BatchQuery) -> Option<String> {
    let n = |v: &Option<String>| v.as_deref().and_then(|s| s.parse::<u32>().ok());
    let (replayed, removed) = (n(&q.replayed)?, n(&q.removed).unwrap_or(0));
    let mut text = match replayed {
        0 => "No dead letter was replayed.".to_owned(),
        1 => "Replayed 1 dead letter: its item is pending again and will get a real outcome."
            .to_owned(),
        r => format!(
            "Replayed {r} dead letters: their items are pending again and will get a real outcome."
        ),
    };
    if removed > 0 {
        text.push_str(&format!(
            " Removed {removed} whose item already had an outcome."
        ));
    }
    if replayed == 0 && removed == 0 {
        text.push_str(&format!(
            " None matched in the first {DLQ_SCAN_LIMIT} messages of the queue (another operator may have replayed it)."
        ));
    }
    Some(text)
}

fn summary(b: &ConsoleBatch, viewer: &Viewer) -> Markup {
    let now = Utc::now();
    let rate = live::average_rate(b, now);
    let c = &b.view.counts;
    html! {
        section #batch-live data-live=(format!("/ui/batches/{}/live", b.view.id)) data-state=(b.view.state.as_str()) {
            div.bigprogress { (views::progress_bar(b.done(), b.view.total, Some("progress"))) }
            dl.facts {
                dt { "Rate" } dd #rate { (views::fmt_rate(rate)) }
                dt { "ETA" } dd #eta { (live::eta_text(b, rate)) }
                dt { "Kind" } dd { (b.view.kind.as_str()) }
                @if viewer.is_operator() { dt { "Agency" } dd #agency { (b.agency_id) } }
                dt { "Requested by" } dd { "user " (b.view.requested_by) }
                @if let Some(t) = b.view.record_type_id { dt { "Record type" } dd { (t) } }
                dt { "Lane" } dd { (b.lane.map_or("?", |l| l.as_str())) }
                dt { "Accepted" } dd { (views::fmt_time(b.view.created_at)) }
                @if let Some(t) = b.started_at { dt { "Started" } dd { (views::fmt_time(t)) } }
                @if let Some(t) = b.view.completed_at { dt { "Completed" } dd { (views::fmt_time(t)) } }
                dt { "Settled at acceptance" } dd { (fmt_int(b.presettled)) }
            }
            table.counts #counts {
                thead { tr { @for s in ItemStatus::ALL { th.num { (s.as_str()) } } } }
                tbody { tr {
                    @for (s, n) in [(ItemStatus::Pending, c.pending), (ItemStatus::Created, c.created), (ItemStatus::Converted, c.converted), (ItemStatus::Skipped, c.skipped), (ItemStatus::Failed, c.failed)] {
                        td.num { a id=(format!("count-{}", s.as_str())) href=(format!("/ui/batches/{}?status={}#items", b.view.id, s.as_str())) { (fmt_int(n)) } }
                    }
                } }
            }
            @if b.view.state != BatchState::Completed {
                p.hint { "Live while the batch runs. " a href=(format!("/ui/batches/{}", b.view.id)) { "Refresh" } }
            }
        }
    }
}

fn reasons_table(reasons: &[(String, String, i64)], id: BatchId) -> Markup {
    html! {
        @if !reasons.is_empty() {
            section #reasons {
                h2 { "Skipped and failed, by reason" }
                table {
                    thead { tr { th { "Status" } th { "Reason" } th.num { "Items" } } }
                    tbody {
                        @for (status, reason, n) in reasons {
                            tr {
                                td { a href=(format!("/ui/batches/{id}?status={status}#items")) { (status) } }
                                td { code { (if reason.is_empty() { "—" } else { reason }) } }
                                td.num { (fmt_int(*n)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn dead_letters(dead: &Result<Listing, ()>, b: &ConsoleBatch, viewer: &Viewer) -> Markup {
    let id = b.view.id;
    html! {
        section #dead {
            h2 { "Dead letters" }
            @match dead {
                Err(()) => p.warn { "The dead-letter queue cannot be read just now (the broker does not answer); try again shortly." },
                Ok(l) if l.letters.is_empty() => p.empty { "None of this batch's items is in the dead-letter queue"
                    @if l.scanned < l.depth { " (among the first " (fmt_int(i64::from(l.scanned))) " of " (fmt_int(i64::from(l.depth))) " messages)" }
                    "." },
                Ok(l) => {
                    @if l.scanned < l.depth {
                        p.hint { "Among the first " (fmt_int(i64::from(l.scanned))) " of " (fmt_int(i64::from(l.depth))) " messages in the queue; " code { "bulkops dlq list --batch " (id) } " lists them all." }
                    }
                    table #dead-letters {
                        thead { tr { th.num { "Item" } th.num { "Target" } th { "Reason" } th.num { "Attempts" } th { "History" } th { "Broker" } @if viewer.is_operator() { th {} } } }
                        tbody {
                            @for letter in &l.letters {
                                @if let Ok(m) = &letter.message {
                                    tr data-seq=(m.seq) {
                                        td.num { (m.seq) }
                                        td.num { (m.target_id) }
                                        td { code { (or_dash(&letter.reason)) } }
                                        td.num { (or_dash(&letter.attempts)) }
                                        td { code { (or_dash(&letter.history)) } }
                                        td { (or_dash(&letter.broker_reason)) }
                                        @if viewer.is_operator() {
                                            td { a.button.replay href=(format!("/ui/batches/{id}/replay?seq={}", m.seq)) data-seq=(m.seq) { "Replay…" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    @if viewer.is_operator() && l.letters.len() > 1 {
                        p { a.button #replay-all href=(format!("/ui/batches/{id}/replay")) { "Replay all " (l.letters.len()) "…" } }
                    }
                    @if !viewer.is_operator() {
                        p.hint { "An operator can replay them once the cause is fixed." }
                    }
                }
            }
        }
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "—" } else { s }
}

fn items_section(
    b: &ConsoleBatch,
    status: Option<ItemStatus>,
    after: i64,
    items: &ItemPage,
) -> Markup {
    let id = b.view.id;
    if let Some(at) = b.view.items_pruned_at {
        return html! {
            section #items {
                h2 { "Items" }
                p.notice { "This batch's items were pruned on " (at.format("%Y-%m-%d")) " under the retention policy; its counts above remain." }
            }
        };
    }
    let status_q = status.map_or(String::new(), |s| format!("status={}&", s.as_str()));
    html! {
        section #items {
            h2 { "Items" }
            form.filters #item-filter method="get" action=(format!("/ui/batches/{id}")) {
                label { "Status "
                    select #status name="status" {
                        option value="" { "any" }
                        @for s in ItemStatus::ALL {
                            option value=(s.as_str()) selected[status == Some(s)] { (s.as_str()) }
                        }
                    }
                }
                button #filter type="submit" { "Show" }
                " "
                a #csv href=(format!("/ui/batches/{id}/items.csv{}", status.map_or(String::new(), |s| format!("?status={}", s.as_str())))) download {
                    "Download CSV" @if let Some(s) = status { " (" (s.as_str()) ")" }
                }
            }
            @if items.items.is_empty() {
                p.empty { "No items" @if let Some(s) = status { " with status " (s.as_str()) } "." }
            } @else {
                table #item-table {
                    thead { tr { th.num { "Seq" } th.num { "Target" } th { "Status" } th.num { "Result" } th { "Reason" } } }
                    tbody {
                        @for i in &items.items {
                            tr data-status=(i.status.as_str()) {
                                td.num { (i.seq) }
                                td.num { (i.target_id) }
                                td { (i.status.as_str()) }
                                td.num { @if let Some(r) = i.result_id { (r) } @else { "—" } }
                                td { code { (i.reason.as_deref().unwrap_or("—")) } }
                            }
                        }
                    }
                }
            }
            nav.pager {
                @if after > 0 { a href=(format!("/ui/batches/{id}?{status_q}#items")) { "← First" } }
                @if let Some(next) = items.next_after {
                    a #next-items rel="next" href=(format!("/ui/batches/{id}?{status_q}after={next}#items")) { "Next →" }
                }
            }
        }
    }
}

/// The CSV download's query.
#[derive(Debug, Default, Deserialize)]
pub struct CsvQuery {
    status: Option<String>,
}

/// `GET /ui/batches/{id}/items.csv`: the batch's items (of one status, optionally) as the
/// API streams them.
pub async fn csv(
    State(state): State<AppState>,
    Session(viewer, _): Session,
    Path(id): Path<String>,
    Query(q): Query<CsvQuery>,
) -> Result<Response, UiError> {
    let id = batch_id(&id)?;
    let status = status_filter(q.status.as_deref())?;
    let b = load(&state.db, id, viewer.scope()).await?;
    if b.view.items_pruned_at.is_some() {
        return Err(UiError::Gone(
            "this batch's items were pruned under the retention policy".into(),
        ));
    }
    let Some(export) = Export::start(&state) else {
        return Err(UiError::Unavailable(anyhow::anyhow!(
            "too many CSV exports are streaming at once; retry shortly"
        )));
    };
    Ok(items_csv_response(export, id, status))
}
