//! A batch's progress, live: `GET /ui/batches/{id}/live` streams it as server-sent events
//! (one `progress` event a second, from the batch row's counters alone), and the rate and
//! ETA every page shows.
//!
//! The rate on a page is the average since the batch started (items the workers decided,
//! those settled at acceptance left out); the stream replaces it with the rate over its
//! last 15 seconds once it has watched that long, so a batch that slows down shows it.
//! The stream ends when the batch completes, after ten minutes (the browser reconnects),
//! or when the producer shuts down.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bulkops_shared::batch::BatchState;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::UiError;
use super::batches::{ConsoleBatch, load};
use super::session::Session;
use super::views::{fmt_duration, fmt_int, fmt_rate};
use crate::state::AppState;

/// How often the stream reads the batch.
const TICK: Duration = Duration::from_secs(1);
/// The window of the stream's recent rate.
const WINDOW: Duration = Duration::from_secs(15);
/// Longest a stream lasts before the browser reconnects.
const MAX_STREAM: Duration = Duration::from_secs(600);

/// Items per second the workers decided since the batch started, until it completed (or
/// now); `None` before it started.
pub fn average_rate(b: &ConsoleBatch, now: DateTime<Utc>) -> Option<f64> {
    let started = b.started_at?;
    let end = b.view.completed_at.unwrap_or(now);
    let secs = (end - started).num_milliseconds() as f64 / 1000.0;
    if secs <= 0.0 {
        return None;
    }
    Some((b.worker_done() as f64 / secs).max(0.0))
}

/// Seconds left at `rate` for `pending` items; `None` when nothing moves or nothing is left.
pub fn eta_secs(pending: i64, rate: Option<f64>) -> Option<f64> {
    match rate {
        Some(r) if r > 0.0 && pending > 0 => Some(pending as f64 / r),
        _ => None,
    }
}

/// The done counts a stream has seen, to measure the recent rate.
#[derive(Debug, Default)]
pub struct RateWindow {
    readings: VecDeque<(Instant, i64)>,
}

impl RateWindow {
    /// Records a reading and returns the rate over the window, once it spans at least
    /// `WINDOW` (before that, `None`: the average is better than a few seconds' noise).
    pub fn push(&mut self, at: Instant, done: i64) -> Option<f64> {
        self.readings.push_back((at, done));
        while self
            .readings
            .get(1)
            .is_some_and(|(t, _)| at.duration_since(*t) >= WINDOW)
        {
            self.readings.pop_front();
        }
        let (t0, d0) = *self.readings.front()?;
        let span = at.duration_since(t0);
        if span < WINDOW {
            return None;
        }
        Some(((done - d0) as f64 / span.as_secs_f64()).max(0.0))
    }
}

/// One `progress` event: what the page's script writes into the page.
#[derive(Debug, Serialize)]
pub struct ProgressEvent {
    /// `accepted`, `running` or `completed`.
    pub state: &'static str,
    /// Items in the batch.
    pub total: i64,
    /// Items with an outcome.
    pub done: i64,
    /// `done / total` as text.
    pub pct: String,
    /// Items per status, as text.
    pub counts: std::collections::BTreeMap<&'static str, String>,
    /// The rate, as text.
    pub rate: String,
    /// The ETA (or the duration, once completed), as text.
    pub eta: String,
}

/// The percentage done, as text.
pub fn pct(done: i64, total: i64) -> String {
    if total <= 0 {
        return "100%".to_owned();
    }
    let p = done as f64 * 100.0 / total as f64;
    if done < total && p >= 99.95 {
        // Never say 100% while something is left.
        return "99.9%".to_owned();
    }
    format!("{p:.1}%")
}

/// The ETA column: how long is left, or how long it took once completed.
pub fn eta_text(b: &ConsoleBatch, rate: Option<f64>) -> String {
    if b.view.state == BatchState::Completed {
        let secs = b
            .view
            .completed_at
            .map(|c| (c - b.view.created_at).num_milliseconds() as f64 / 1000.0);
        return match secs {
            Some(s) => format!("took {}", fmt_duration(s)),
            None => "done".to_owned(),
        };
    }
    match (eta_secs(b.view.counts.pending, rate), rate) {
        (Some(s), _) => fmt_duration(s),
        (None, Some(r)) if r <= 0.0 => "stalled".to_owned(),
        _ => "—".to_owned(),
    }
}

/// The event for a batch at a rate.
pub fn event(b: &ConsoleBatch, rate: Option<f64>) -> ProgressEvent {
    let c = &b.view.counts;
    let done = b.view.total - c.pending;
    let counts = [
        ("pending", c.pending),
        ("created", c.created),
        ("converted", c.converted),
        ("skipped", c.skipped),
        ("failed", c.failed),
    ]
    .into_iter()
    .map(|(k, v)| (k, fmt_int(v)))
    .collect();
    ProgressEvent {
        state: b.view.state.as_str(),
        total: b.view.total,
        done,
        pct: pct(done, b.view.total),
        counts,
        rate: fmt_rate(rate),
        eta: eta_text(b, rate),
    }
}

/// `GET /ui/batches/{id}/live`: the batch's progress as server-sent events.
pub async fn stream(
    State(state): State<AppState>,
    Session(viewer, _): Session,
    Path(id): Path<String>,
) -> Result<Response, UiError> {
    let id = super::batch::batch_id(&id)?;
    let scope = viewer.scope();
    // The first read answers 404 for a batch that is not the viewer's.
    load(&state.db, id, scope).await?;
    let shutdown = state
        .ui
        .as_ref()
        .map(|c| c.shutdown.clone())
        .unwrap_or_default();
    let db = state.db.clone();
    let events = async_stream(db, id, scope, shutdown);
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Proxies (nginx) must pass each event on at once.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

fn async_stream(
    db: sea_orm::DatabaseConnection,
    id: bulkops_shared::ids::BatchId,
    scope: Option<bulkops_shared::ids::AgencyId>,
    shutdown: tokio_util::sync::CancellationToken,
) -> impl futures_util::Stream<Item = Result<Event, Infallible>> {
    struct Tail {
        db: sea_orm::DatabaseConnection,
        window: RateWindow,
        started: Instant,
        finished: bool,
        first: bool,
    }
    let tail = Tail {
        db,
        window: RateWindow::default(),
        started: Instant::now(),
        finished: false,
        first: true,
    };
    futures_util::stream::unfold(tail, move |mut t| {
        let shutdown = shutdown.clone();
        async move {
            if t.finished || t.started.elapsed() >= MAX_STREAM {
                return None;
            }
            if !t.first {
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(TICK) => {}
                }
            }
            t.first = false;
            let event = match load(&t.db, id, scope).await {
                Ok(b) => {
                    let recent = t.window.push(Instant::now(), b.worker_done());
                    let rate = recent.or_else(|| average_rate(&b, Utc::now()));
                    t.finished = b.view.state == BatchState::Completed;
                    Event::default()
                        .event("progress")
                        .json_data(event(&b, rate))
                        .unwrap_or_else(|_| Event::default().comment("unencodable"))
                }
                // The page keeps its last numbers; the next tick tries again.
                Err(_) => Event::default().comment("batch not readable just now"),
            };
            Some((Ok(event), t))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_needs_movement_and_work_left() {
        assert_eq!(eta_secs(100, Some(10.0)), Some(10.0));
        assert_eq!(eta_secs(0, Some(10.0)), None);
        assert_eq!(eta_secs(100, Some(0.0)), None);
        assert_eq!(eta_secs(100, None), None);
    }

    #[test]
    fn the_window_rate_waits_for_a_full_window() {
        let t0 = Instant::now();
        let mut w = RateWindow::default();
        assert_eq!(w.push(t0, 0), None);
        assert_eq!(w.push(t0 + Duration::from_secs(5), 50), None);
        let r = w.push(t0 + Duration::from_secs(15), 150).unwrap();
        assert!((r - 10.0).abs() < 1e-9, "{r}");
        // Old readings fall out: from 15 s on, only the last 15 s count.
        let r = w.push(t0 + Duration::from_secs(30), 150).unwrap();
        assert!(r.abs() < 1e-9, "{r}");
        assert_eq!(w.readings.len(), 2);
    }

    #[test]
    fn percentages_never_round_up_to_done() {
        assert_eq!(pct(0, 0), "100%");
        assert_eq!(pct(50, 200), "25.0%");
        assert_eq!(pct(999_999, 1_000_000), "99.9%");
        assert_eq!(pct(10, 10), "100.0%");
    }
}
