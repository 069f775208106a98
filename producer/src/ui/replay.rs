//! Replaying a batch's dead letters from the console, operators only: a confirmation page
//! (`GET /ui/batches/{id}/replay[?seq=N]`) says what will happen and holds the form; the
//! form's POST, with the session's CSRF token, replays through
//! [`bulkops_shared::deadletters::replay`], the same function as `bulkops dlq replay`:
//! the item goes back to pending (its batch reopens), the message goes back to its work
//! queue with a fresh attempt budget, and the item gets a real outcome. Then the batch
//! page says what was done.

use axum::extract::{Form, Path, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use bulkops_shared::deadletters;
use maud::html;
use serde::Deserialize;

use super::batch::batch_id;
use super::batches::load;
use super::session::{Session, Who};
use super::views::{self, Nav};
use super::{DLQ_SCAN_LIMIT, UiError};
use crate::state::AppState;

/// Which dead letters: one item's (`seq`), or every one of the batch.
#[derive(Debug, Default, Deserialize)]
pub struct Target {
    seq: Option<String>,
}

fn seq_of(raw: Option<&str>) -> Result<Option<i64>, UiError> {
    raw.map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<i64>()
                .map_err(|_| UiError::BadRequest("seq must be an item's number".into()))
        })
        .transpose()
}

/// `GET /ui/batches/{id}/replay`: the confirmation step.
pub async fn confirm(
    State(state): State<AppState>,
    Session(viewer, _): Session,
    Path(id): Path<String>,
    Query(t): Query<Target>,
) -> Result<Html<String>, UiError> {
    viewer.require_operator()?;
    let id = batch_id(&id)?;
    let seq = seq_of(t.seq.as_deref())?;
    let b = load(&state.db, id, None).await?;
    let what = match seq {
        Some(s) => format!("the dead letter of item {s} of batch {id}"),
        None => format!("every dead letter of batch {id}"),
    };
    let body = html! {
        h1 { "Replay " (what) "?" }
        p { "Do this once the cause of the failure is fixed. Replaying:" }
        ul {
            li { "puts the item back from " code { "failed" } " to " code { "pending" } " (the batch, now "
                 (b.view.state.as_str()) ", runs again until it has an outcome);" }
            li { "publishes its message to the work queue with a fresh attempt budget, then removes it from the dead-letter queue;" }
            li { "gives the item a real outcome; an item that already has another outcome is left as it is and its message removed." }
        }
        form #replay-form method="post" action=(format!("/ui/batches/{id}/replay")) {
            input type="hidden" name="csrf" value=(viewer.csrf);
            @if let Some(s) = seq { input type="hidden" name="seq" value=(s); }
            button #confirm-replay.danger type="submit" { "Replay" }
            " "
            a #cancel href=(format!("/ui/batches/{id}")) { "Cancel" }
        }
    };
    Ok(Html(
        views::page("Replay", Some(&viewer), Nav::Batches, html! {}, body).into_string(),
    ))
}

/// The replay form.
#[derive(Debug, Deserialize)]
pub struct ReplayForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    seq: Option<String>,
}

/// `POST /ui/batches/{id}/replay`.
pub async fn replay(
    State(state): State<AppState>,
    Session(viewer, token): Session,
    Path(id): Path<String>,
    Form(form): Form<ReplayForm>,
) -> Result<Response, UiError> {
    let console = state.ui.as_deref().ok_or(UiError::NotFound("page"))?;
    viewer.require_operator()?;
    viewer.check_csrf(console, form.csrf.as_deref(), &token)?;
    let id = batch_id(&id)?;
    let seq = seq_of(form.seq.as_deref())?;
    load(&state.db, id, None).await?;
    let report = deadletters::replay(
        &console.link,
        &state.db,
        &console.publisher,
        &state.topology,
        |m| m.batch_id == id && seq.is_none_or(|s| m.seq == s),
        DLQ_SCAN_LIMIT,
    )
    .await
    .map_err(|e| UiError::Unavailable(e.into()))?;
    let operator = match &viewer.who {
        Who::Operator { name } => name.as_str(),
        Who::Agency(_) => "",
    };
    tracing::info!(
        operator,
        batch_id = %id,
        seq,
        replayed = report.replayed.len(),
        removed = report.dropped,
        "console: dead letters replayed"
    );
    Ok(Redirect::to(&format!(
        "/ui/batches/{id}?replayed={}&removed={}",
        report.replayed.len(),
        report.dropped
    ))
    .into_response())
}
