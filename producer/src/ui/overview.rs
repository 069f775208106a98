//! The overview (`GET /ui`): active batches with progress, rate and ETA; for operators also
//! the throughput of the last minutes, queue depths per lane and shard, workers'
//! readiness, outbox lag and the dead-letter count. The page refreshes itself every few
//! seconds (in place with the script, by a `<noscript>` refresh without it).

use std::time::Duration;

use axum::extract::State;
use axum::response::Html;
use chrono::Utc;
use maud::html;

use super::batches::{Filter, batch_table, list};
use super::session::Session;
use super::views::{self, Nav, fmt_int};
use super::{UiError, sampler, system};
use crate::state::AppState;

/// Active batches listed at most.
const ACTIVE_SHOWN: i64 = 50;
/// The chart's window.
const CHART_WINDOW: Duration = Duration::from_secs(15 * 60);

/// `GET /ui`.
pub async fn page(
    State(state): State<AppState>,
    Session(viewer, _): Session,
) -> Result<Html<String>, UiError> {
    let active = list(
        &state.db,
        &Filter {
            agency: viewer.scope(),
            active: true,
            ..Filter::default()
        },
        ACTIVE_SHOWN,
    )
    .await?;
    let now = Utc::now();
    let system = if viewer.is_operator() {
        let topology = &state.topology;
        let workers = system::workers(&state.db).await.map_err(UiError::db)?;
        let (outbox_events, outbox_age) = bulkops_shared::outbox::backlog(&state.db)
            .await
            .map_err(UiError::db)?;
        let (db_now, bars) = sampler::recent(&state.db, CHART_WINDOW)
            .await
            .map_err(UiError::db)?;
        let dead = system::dead_letters(&state, topology);
        let queues = system::queues(&state, topology);
        let broker_up = state.publish_link.is_connected();
        Some(html! {
            section #throughput-section {
                h2 { "Throughput" }
                (views::throughput_chart(&bars, db_now, CHART_WINDOW.as_secs_f64()))
            }
            div.columns {
                section {
                    h2 { "Queues" }
                    (system::queues_table(&queues, broker_up))
                    p.hint { "Ready messages as this producer measured them (every 5 s)." }
                }
                section {
                    h2 { "Workers" }
                    (system::workers_table(&workers, now))
                    h2 { "Outbox" }
                    dl.facts #outbox {
                        dt { "Events waiting" } dd #outbox-events { (fmt_int(outbox_events)) }
                        dt { "Oldest waiting" } dd #outbox-age { (views::fmt_duration(outbox_age)) }
                    }
                    h2 { "Dead letters" }
                    p #dead-letters class=[(dead > 0).then_some("alert")] {
                        strong #dead-count { (fmt_int(dead)) } " message(s) in " code { (topology.dead_queue()) }
                        @if dead > 0 { ": open a batch with failed items to see and replay its own." }
                    }
                }
            }
        })
    } else {
        None
    };
    let body = html! {
        h1 { "Overview" }
        div #live data-refresh="5" {
            section {
                h2 { "Active batches" }
                (batch_table(&active, viewer.is_operator(), now))
                @if active.len() as i64 >= ACTIVE_SHOWN {
                    p.hint { "The " (ACTIVE_SHOWN) " newest; " a href="/ui/batches?state=active" { "all active batches" } "." }
                }
            }
            @if let Some(s) = system { (s) }
            @else {
                p.hint { "Queues, workers and the outbox are shown to operators." }
            }
        }
    };
    let head = html! { noscript { meta http-equiv="refresh" content="10"; } };
    Ok(Html(
        views::page("Overview", Some(&viewer), Nav::Overview, head, body).into_string(),
    ))
}
